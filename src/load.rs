//! Load generation against a terminal listener, and the bare echo server that is its ceiling: many simulated
//! terminal connections, each keeping several 0200s in flight (closed loop) or sending at a fixed rate (open
//! loop), answers matched by STAN, latencies recorded. The echo server answers every frame with itself, with the
//! same framing: what a gateway could do at best on the same machine, measured in the same run.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::iso8583::Dialect;
use crate::link::framing::{FrameCodec, Framing};
use crate::sim::{Identity, SaleSpec};

/// Serves frames back as they came until `shutdown`.
pub async fn echo_server(listener: TcpListener, framing: Framing, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut sink, mut src) = Framed::new(stream, FrameCodec::new(framing, false, 0xFFFF)).split();
            // Echo everything that is ready, then flush once: the batching a real server's writer does.
            while let Some(Ok(f)) = src.next().await {
                if sink.feed(f).await.is_err() {
                    return;
                }
                while let Some(Some(Ok(f))) = futures_util::FutureExt::now_or_never(src.next()) {
                    if sink.feed(f).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub framing: Framing,
    pub connections: usize,
    /// Requests kept in flight per connection (closed loop).
    pub in_flight: usize,
    /// Open loop instead: this many requests per second in all, spread over the connections.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Terminal `n` (1-based connection number) is `{terminal_prefix}{n:04}`.
    pub terminal_prefix: String,
    pub merchant: String,
    pub product: String,
    pub amount: u64,
    /// Distinguishes runs against the same gateway (the sale keys must be new).
    pub transmission: String,
}

/// What came back.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    /// Answers by field 39.
    pub codes: BTreeMap<String, u64>,
    /// Latencies of answers with code `00`.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn approved(&self) -> u64 {
        self.codes.get("00").copied().unwrap_or(0)
    }

    pub fn answered(&self) -> u64 {
        self.codes.values().sum()
    }

    /// Answers per second.
    pub fn rate(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency at quantile `q` (0..1), in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        quantile_ms(&mut self.latencies, q)
    }
}

/// The latency at quantile `q` (0..1) of `v`, in milliseconds (0 for none); sorts `v`.
pub fn quantile_ms(v: &mut [Duration], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

/// Runs the load and reports. Errors of single connections end those connections only.
pub async fn run(spec: LoadSpec, dialect: Arc<Dialect>) -> Result<LoadReport, String> {
    let mut conns = Vec::new();
    for _ in 0..spec.connections {
        let s = TcpStream::connect(spec.addr)
            .await
            .map_err(|e| format!("{}: {e}", spec.addr))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        conns.push(s);
    }
    let start = Instant::now();
    let end = start + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in conns.into_iter().enumerate() {
        let (spec, dialect) = (spec.clone(), dialect.clone());
        tasks.spawn(async move { connection(i + 1, s, spec, dialect, start, end).await });
    }
    let mut report = LoadReport::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.map_err(|e| e.to_string())?;
        report.sent += r.sent;
        for (c, n) in r.codes {
            *report.codes.entry(c).or_default() += n;
        }
        report.latencies.extend(r.latencies);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

async fn connection(
    n: usize,
    stream: TcpStream,
    spec: LoadSpec,
    dialect: Arc<Dialect>,
    start: Instant,
    end: Instant,
) -> LoadReport {
    let id = Identity {
        terminal_id: format!("{}{n:04}", spec.terminal_prefix),
        merchant_id: spec.merchant.clone(),
    };
    let (mut sink, mut src) = Framed::new(stream, FrameCodec::new(spec.framing, false, 0xFFFF)).split();
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut report = LoadReport::default();
    let mut stan = 0u32;
    // Open loop: this connection's share of the rate, with its first send offset so connections interleave.
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.connections as f64 / r.max(0.001)));
    let mut next_send = start
        + interval
            .map(|i| i.mul_f64(n as f64 / spec.connections as f64))
            .unwrap_or_default();
    let send = |stan: u32| {
        let s = SaleSpec {
            stan,
            transmission: spec.transmission.clone(),
            product: spec.product.clone(),
            amount: spec.amount,
            currency: "978".into(),
        };
        dialect.encode(&id.sale(&s, false)).map(|b| b.freeze())
    };
    loop {
        let now = Instant::now();
        let may_send = now < end
            && match interval {
                None => pending.len() < spec.in_flight,
                Some(_) => now >= next_send,
            };
        if may_send && stan < 999_999 {
            stan += 1;
            let Ok(body) = send(stan) else { break };
            let frame = crate::link::framing::Frame {
                tpdu: None,
                message: body,
            };
            if sink.send(frame).await.is_err() {
                break;
            }
            pending.insert(format!("{stan:06}"), Instant::now());
            report.sent += 1;
            if let Some(i) = interval {
                next_send += i;
            }
            continue;
        }
        if now >= end && pending.is_empty() {
            break;
        }
        let wake = match interval {
            Some(_) if now < end => next_send.min(end),
            _ => end.max(now) + Duration::from_secs(30),
        };
        tokio::select! {
            f = src.next() => match f {
                Some(Ok(f)) => {
                    if let Ok(m) = dialect.decode(&f.message) {
                        if let Some(t0) = m.get_str(11).and_then(|s| pending.remove(s)) {
                            let code = m.get_str(39).unwrap_or("echo").to_string();
                            if code == "00" || code == "echo" {
                                report.latencies.push(t0.elapsed());
                            }
                            *report.codes.entry(code).or_default() += 1;
                        }
                    }
                }
                _ => break,
            },
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= end + Duration::from_secs(30) {
                    break;
                }
            }
        }
    }
    report
}

/// A TCP proxy that holds every chunk for `delay` in each direction: a slow network between two parts.
pub async fn delay_proxy(listener: TcpListener, target: SocketAddr, delay: Duration) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pipe(ri, wo, delay));
            pipe(ro, wi, delay).await;
        });
    }
}

async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
