//! Prometheus metrics (text exposition format 0.0.4), and the small HTTP endpoint that serves them beside health,
//! readiness and the status page: `GET /metrics`, `GET /healthz` (the process answers), `GET /readyz` (it can do its
//! work: 200, else 503), `GET /status` (HTML for a person, built by the `status_page` module). HTTP is hyper's (no
//! parser of our own on a listening socket). Off unless an address is configured; bind it to loopback (or a
//! management network), it has no authentication.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets, in seconds: from a cache hit to a response deadline.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A warning when an endpoint without authentication (`what`, named as in the configuration) is bound to `addr`
/// off loopback: anyone who reaches it reads what it shows. Logged at start and printed by `check-config`.
pub fn off_loopback(what: &str, addr: std::net::SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "{what}: {addr} is not on loopback, and the endpoint has no authentication: bind it to 127.0.0.1, or keep \
             it on a management network behind a firewall"
        )
    })
}

/// A label value, escaped for the exposition format.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

/// Builds an exposition: `# HELP`, `# TYPE`, then samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let _ = writeln!(self.out, "{name}{} {value}", labels_text(labels));
        self
    }

    /// One family with one sample and no labels.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A counter with labels, e.g. requests by message type and response code. Label sets are few (tens): counting
/// looks its set up without allocating, and allocates only the first time a set is seen.
#[derive(Default)]
pub struct LabelledCounter {
    values: Mutex<Vec<(LabelSet, u64)>>,
}

/// Label names and values.
type LabelSet = Vec<(String, String)>;

impl LabelledCounter {
    pub fn inc(&self, labels: &[(&str, &str)]) {
        let mut values = self.values.lock().expect("not poisoned");
        let same = |set: &[(String, String)]| {
            set.len() == labels.len() && set.iter().zip(labels).all(|((k, v), (k2, v2))| k == k2 && v == v2)
        };
        match values.iter_mut().find(|(set, _)| same(set)) {
            Some((_, n)) => *n += 1,
            None => values.push((labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), 1)),
        }
    }

    pub fn render(&self, e: &mut Exposition, name: &str, help: &str) {
        e.family(name, "counter", help);
        let mut values = self.values.lock().expect("not poisoned").clone();
        values.sort();
        for (labels, v) in &values {
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            e.sample(name, &l, *v as f64);
        }
    }
}

/// A histogram with fixed buckets, lock-free to observe.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| s <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, e: &mut Exposition, name: &str, help: &str) {
        e.family(name, "histogram", help);
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            e.sample(&bucket, &[("le", &b.to_string())], cumulative as f64);
        }
        let count = self.count.load(Ordering::Relaxed);
        e.sample(&bucket, &[("le", "+Inf")], count as f64);
        e.sample(
            &format!("{name}_sum"),
            &[],
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        );
        e.sample(&format!("{name}_count"), &[], count as f64);
    }
}

/// What the endpoint serves.
pub trait Source: Send + Sync + 'static {
    /// The exposition text.
    fn metrics(&self) -> String;
    /// Whether the service can do its work now; `Err` says why not.
    fn ready(&self) -> Result<(), String>;
    /// The status page: one self-contained HTML document (no PIN, key or MAC in it; every value escaped).
    fn status(&self) -> String;
}

/// Connections served at once at most; more are closed at accept (a scraper needs one or two, a browser a few).
const MAX_CONNECTIONS: usize = 16;
/// A request's start line and headers, in bytes: more is answered 431 and the connection closed. Scrapers and
/// browsers send well under 2 KiB.
const MAX_HEADER_BYTES: usize = 8192;
/// A connection must send a request's headers within this, and an idle keep-alive connection is closed after it
/// (hyper's header read timeout also runs while waiting for the next request): a silent client holds no slot
/// for longer.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is asked to close (after the answer under way) once this old, so that a client that stops reading
/// an answer, which no header timeout catches, holds its slot no longer.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// At shutdown or at the end of its lifetime, what a connection has begun must be written within this.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/healthz`, `/readyz` and `/status` on `listener` (HTTP/1.1 by hyper, keep-alive, HEAD) until
/// `stop`; then stops accepting, lets each connection finish the answer it is writing, and returns.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>, stop: CancellationToken) {
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (source, stop) = (source.clone(), stop.clone());
        conns.spawn(async move {
            let _permit = permit;
            connection(stream, source, stop).await;
        });
    }
    let drained = tokio::time::timeout(DRAIN + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
}

/// One connection, by hyper: requests answered in turn until the client closes, a limit is hit, the connection's
/// lifetime ends or the endpoint stops (then the answer under way is finished first).
async fn connection(stream: tokio::net::TcpStream, source: Arc<dyn Source>, stop: CancellationToken) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let source = source.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(&*source, &req)) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES);
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN, conn).await;
}

/// The answer to one request (no log line: a scraper asks every few seconds).
fn respond(
    source: &dyn Source,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::body::Body as _;
    use hyper::{header, Method, StatusCode};
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, ctype, body) = if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET or HEAD only\n".to_string())
    } else if !req.body().is_end_stream() {
        // Nothing here takes a body; none is read.
        (StatusCode::PAYLOAD_TOO_LARGE, TEXT, "no request body is taken\n".into())
    } else {
        match req.uri().path() {
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", source.metrics()),
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => match source.ready() {
                Ok(()) => (StatusCode::OK, TEXT, "ready\n".into()),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready: {why}\n")),
            },
            "/status" => (StatusCode::OK, "text/html; charset=utf-8", source.status()),
            _ => (
                StatusCode::NOT_FOUND,
                TEXT,
                "try /metrics, /healthz, /readyz or /status\n".into(),
            ),
        }
    };
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    // Every answer is of the moment: no cache keeps an old one.
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    r
}

/// Why [`get`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("connecting: {0}")]
    Connect(#[from] std::io::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A GET of `path` on `addr`, by hyper's client (for tests): status code and body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), GetError> {
    const WITHIN: Duration = Duration::from_secs(10);
    tokio::time::timeout(WITHIN, async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let answer = sender.send_request(req).await?;
        let status = answer.status().as_u16();
        let body = http_body_util::BodyExt::collect(answer.into_body()).await?.to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .unwrap_or(Err(GetError::Timeout(WITHIN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_text_histograms_and_escaping() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let c = LabelledCounter::default();
        c.inc(&[("mti", "0200"), ("code", "00")]);
        c.inc(&[("mti", "0200"), ("code", "00")]);
        c.inc(&[("mti", "0800"), ("code", "a\"b")]);
        let mut e = Exposition::default();
        h.render(&mut e, "x_seconds", "latency");
        c.render(&mut e, "x_total", "requests");
        e.single("x_up", "gauge", "up", 1.0);
        let t = e.finish();
        for want in [
            "# TYPE x_seconds histogram",
            "x_seconds_bucket{le=\"0.001\"} 1",
            "x_seconds_bucket{le=\"0.01\"} 2",
            "x_seconds_bucket{le=\"+Inf\"} 3",
            "x_seconds_count 3",
            "x_total{mti=\"0200\",code=\"00\"} 2",
            "x_total{mti=\"0800\",code=\"a\\\"b\"} 1",
            "x_up 1",
        ] {
            assert!(t.contains(want), "{want} in\n{t}");
        }
    }
}
