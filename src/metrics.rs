//! Prometheus metrics, and the small HTTP endpoint that serves them beside health, readiness and the status page:
//! `GET /metrics`, `GET /healthz` (the process answers), `GET /readyz` (it can do its work: 200, else 503), `GET
//! /status` (HTML for a person, built by the `status_page` module). HTTP is hyper's (no parser of our own on a
//! listening socket). Off unless an address is configured; bind it to loopback (or a management network), it has no
//! authentication.
//!
//! The metrics are the `prometheus-client` crate's (the Prometheus project's Rust client): each process (a gateway, a
//! PIN server) has one [`Registry`] of typed counters, gauges and histograms, plus a `Collector` that reads the
//! levels and queues of its state at scrape time; the crate writes the text and escapes the labels. What is counted
//! on every request stays one atomic add ([`CounterSlots`], [`LatencyHistogram`]).

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
pub use prometheus_client::registry::Registry;
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

/// The exposition format served: Prometheus text 0.0.4, the one every Prometheus and promtool reads (a counter's
/// `# TYPE` line names it with its `_total`, as the rules and dashboards do).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The exposition text of everything `registry` holds (names, label escaping and number formats are the crate's).
pub fn exposition(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail, and neither do the collectors of this crate (they only read state).
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry).expect("encodes into a String");
    out
}

/// A counter family whose label sets are few and mostly known in advance, counted on the hot path (requests by
/// type and answer). `Family::get_or_create` takes a lock and may allocate on every call; here a label set known in
/// advance has a slot of its own, filled the first time the set is seen (so only sets seen appear, as before), and
/// counting it after that is one atomic add. A set without a slot goes through the family's lock.
pub struct CounterSlots<S> {
    family: Family<S, Counter>,
    slots: Box<[OnceLock<Counter>]>,
}

impl<S: Clone + Hash + Eq> CounterSlots<S> {
    /// `len` slots, numbered from 0.
    pub fn new(len: usize) -> CounterSlots<S> {
        CounterSlots {
            family: Family::default(),
            slots: (0..len).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts one for the label set `labels` makes, in `slot` when it has one: a slot must always be given the same
    /// label set (`labels` is called the first time only).
    pub fn inc(&self, slot: Option<usize>, labels: impl FnOnce() -> S) {
        match slot.and_then(|i| self.slots.get(i)) {
            Some(s) => s.get_or_init(|| self.family.get_or_create_owned(&labels())).inc(),
            None => self.family.get_or_create(&labels()).inc(),
        };
    }

    /// The family, to register (it shares its counters with this).
    pub fn family(&self) -> Family<S, Counter> {
        self.family.clone()
    }
}

/// A histogram of durations with fixed buckets, lock-free to observe. The crate's `Histogram` takes a lock on every
/// observation; this one is observed on every request, so it keeps atomic counts and only encodes through the crate.
/// A clone shares the counts (one is registered, the other observed), as the crate's metrics do.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Arc<Buckets>);

#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn new(bounds: &'static [f64]) -> LatencyHistogram {
        LatencyHistogram(Arc::new(Buckets {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let h = &self.0;
        let s = d.as_secs_f64();
        if let Some(i) = h.bounds.iter().position(|&b| s <= b) {
            h.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        h.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per bucket, not cumulative: the encoder adds them up, and writes `+Inf` with the count.
        let h = &self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .zip(h.counts.iter())
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, h.count.load(Ordering::Relaxed), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// What each process counts on every request, registered in `r`: `{prefix}_requests_total` by `S` (`slots` of them
/// known in advance, see [`CounterSlots`]) and `{prefix}_request_duration_seconds` over [`LATENCY_BUCKETS`].
pub fn request_metrics<S>(
    r: &mut Registry,
    prefix: &str,
    help: &str,
    latency_help: &str,
    slots: usize,
) -> (CounterSlots<S>, LatencyHistogram)
where
    S: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let requests = CounterSlots::new(slots);
    let latency = LatencyHistogram::new(LATENCY_BUCKETS);
    r.register(format!("{prefix}_requests"), help, Described(requests.family()));
    r.register(
        format!("{prefix}_request_duration_seconds"),
        latency_help,
        latency.clone(),
    );
    (requests, latency)
}

/// A registered metric described even before its first sample (`# HELP`, `# TYPE`; the crate leaves out a family
/// with no sample yet), as every family here always was: a scrape shows what can be counted, and the alert rules'
/// names are checked against a scrape.
#[derive(Debug)]
pub struct Described<M>(pub M);

impl<M: TypedMetric> TypedMetric for Described<M> {
    const TYPE: MetricType = M::TYPE;
}

impl<M: EncodeMetric> EncodeMetric for Described<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// Writes one family of a collector: its `# HELP` and `# TYPE` (even with no sample, like [`Described`]), then one
/// sample per `(labels, value)`. `M` is the crate's constant counter or gauge; the values are read at scrape time.
pub fn write_family<S: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (S, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// [`write_family`] of one sample without labels.
pub fn write_single<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, M::TYPE)?)
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
            "/metrics" => (StatusCode::OK, CONTENT_TYPE, source.metrics()),
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
    use prometheus_client::encoding::EncodeLabelSet;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        mti: &'static str,
        code: String,
    }

    #[test]
    fn histograms_slots_and_escaping_in_the_text() {
        let h = LatencyHistogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let c = CounterSlots::<Labels>::new(2);
        let l = |code: &str| {
            let code = code.to_string();
            move || Labels { mti: "0200", code }
        };
        c.inc(Some(0), l("00"));
        c.inc(Some(0), l("00"));
        c.inc(Some(1), l("13"));
        // Without a slot: the same family, through its lock.
        c.inc(None, l("a\"b"));
        c.inc(None, l("a\"b"));
        let mut r = Registry::default();
        r.register("x_seconds", "latency", h.clone());
        r.register("x", "requests", c.family());
        let t = exposition(&r);
        for want in [
            "# TYPE x_seconds histogram",
            "x_seconds_bucket{le=\"0.001\"} 1",
            "x_seconds_bucket{le=\"0.01\"} 2",
            "x_seconds_bucket{le=\"+Inf\"} 3",
            "x_seconds_sum 1.0055",
            "x_seconds_count 3",
            "# TYPE x_total counter",
            "x_total{mti=\"0200\",code=\"00\"} 2",
            "x_total{mti=\"0200\",code=\"13\"} 1",
            "x_total{mti=\"0200\",code=\"a\\\"b\"} 2",
        ] {
            assert!(t.contains(want), "{want} in\n{t}");
        }
        assert!(!t.contains("# EOF"), "Prometheus text, not OpenMetrics:\n{t}");
    }
}
