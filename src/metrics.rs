//! Prometheus metrics (text exposition format 0.0.4), and the small HTTP endpoint that serves them beside health and
//! readiness: `GET /metrics`, `GET /healthz` (the process answers), `GET /readyz` (it can do its work: 200, else 503).
//! Off unless an address is configured; bind it to loopback (or a management network), it has no authentication.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
}

/// Requests served at once at most; more connections are closed at once (a scraper needs one or two).
const MAX_CONNECTIONS: usize = 16;

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>, stop: CancellationToken) {
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = Vec::with_capacity(512);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 512];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", source.metrics()),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                ("GET", "/readyz") => match source.ready() {
                    Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
                    Err(why) => ("503 Service Unavailable", "text/plain", format!("not ready: {why}\n")),
                },
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics, /healthz or /readyz\n".into(),
                ),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            // A reader that does not read is cut off.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

/// A GET of `path` on `addr` (for tests and `pingate` admin commands): status code and body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    Ok((status, body))
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
