//! Load generation against a terminal listener, and the bare echo server that is its ceiling: many simulated
//! terminal connections, each keeping several 0200s in flight (closed loop) or sending at a fixed rate (open
//! loop), answers matched by STAN, latencies recorded. The echo server answers every frame with itself, with the
//! same framing: what a gateway could do at best on the same machine, measured in the same run.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::iso8583::Dialect;
use crate::link::framing::{FrameCodec, Framing, Tpdu};
use crate::traffic::secure::{MacSigner, TerminalStream};
use crate::traffic::sim::{Identity, SaleSpec};

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

/// One product of the mix, sent `weight` times in every `sum of weights` requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MixItem {
    pub product: String,
    pub amount: u64,
    pub weight: u32,
    /// ISO 4217 numeric code sent in field 49 (`978`, euro, unless the mix item names another).
    pub currency: String,
}

/// The currency of a mix item that names none: the euro (ISO 4217 `978`), that of the demo's products.
pub const DEFAULT_CURRENCY: &str = "978";

impl MixItem {
    /// `PRODUCT:AMOUNT[:WEIGHT[:CURRENCY]]`, e.g. `TOPUP-EU-10:1000:3` or `GIFT-US-25:2500:1:840` (currency: ISO 4217
    /// numeric, 978 by default).
    pub fn parse(s: &str) -> Result<MixItem, String> {
        const FORM: &str = "PRODUCT:AMOUNT[:WEIGHT[:CURRENCY]]";
        let mut p = s.split(':');
        let (Some(product), Some(amount)) = (p.next(), p.next()) else {
            return Err(format!("`{s}`: {FORM}"));
        };
        let amount = amount
            .parse()
            .map_err(|_| format!("`{s}`: the amount is not a number"))?;
        let weight = match p.next() {
            Some(w) => w
                .parse()
                .ok()
                .filter(|&w| w > 0)
                .ok_or_else(|| format!("`{s}`: weight 1 or more"))?,
            None => 1,
        };
        let currency = match p.next() {
            Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()) => c.to_string(),
            Some(c) => {
                return Err(format!(
                    "`{s}`: currency `{c}` is not an ISO 4217 numeric code (3 digits, e.g. 978)"
                ))
            }
            None => DEFAULT_CURRENCY.to_string(),
        };
        if p.next().is_some() || product.is_empty() {
            return Err(format!("`{s}`: {FORM}"));
        }
        Ok(MixItem {
            product: product.into(),
            amount,
            weight,
            currency,
        })
    }
}

/// Counters the progress bar reads while the load runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub approved: AtomicU64,
}

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub framing: Framing,
    pub tpdu: Option<Tpdu>,
    pub connections: usize,
    /// Requests kept in flight per connection (closed loop).
    pub in_flight: usize,
    /// Open loop instead: this many requests per second in all, spread over the connections.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Terminal `n` (1-based connection number) is `{terminal_prefix}{n:04}`.
    pub terminal_prefix: String,
    pub merchant: String,
    /// Products and amounts, by weight (request `stan` of every connection takes its turn in the mix).
    pub mix: Vec<MixItem>,
    /// Field 7 of every sale (`MMDDhhmmss`); `None`: each sale's own time, as a terminal's clock gives it. A fixed
    /// one makes every key of the run as old as its start: a gateway sells from its cache only keys newer than what
    /// it has forgotten (`clock_skew_secs`), so once its repeat window has turned over, such a run's sales all go
    /// to the PIN server.
    pub transmission: Option<String>,
    pub progress: Option<Arc<Progress>>,
}

impl LoadSpec {
    fn item(&self, stan: u32) -> &MixItem {
        let total: u32 = self.mix.iter().map(|m| m.weight).sum();
        let mut k = stan % total.max(1);
        for m in &self.mix {
            if k < m.weight {
                return m;
            }
            k -= m.weight;
        }
        &self.mix[0]
    }
}

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// One second of the run.
#[derive(Debug, Clone)]
pub struct Second {
    pub answered: u64,
    pub latency: Histogram<u64>,
}

/// What came back.
#[derive(Debug)]
pub struct LoadReport {
    pub sent: u64,
    /// Answers by field 39 (`echo` for an echo server's answers).
    pub codes: BTreeMap<String, u64>,
    /// Latencies of approved (or echoed) answers, in microseconds.
    pub latency: Histogram<u64>,
    /// The run second by second (by when the answer came).
    pub seconds: Vec<Second>,
    pub elapsed: Duration,
    /// MACs (with `--mac-key-file`): what signing the requests and checking the answers' MACs took here.
    pub mac: MacCost,
}

/// The MAC's cost measured in the load generator: requests signed and answers checked, and the time each took (the
/// gateway does the same work for each request: one check, one signature).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MacCost {
    pub signed: u64,
    pub sign_time: Duration,
    pub verified: u64,
    pub verify_time: Duration,
    /// Answers whose MAC was missing or did not check (a `63` carries none).
    pub failed: u64,
}

impl MacCost {
    /// Microseconds per request to sign it and to check its answer's MAC.
    pub fn per_request_us(&self) -> (f64, f64) {
        let per = |t: Duration, n: u64| if n == 0 { 0.0 } else { t.as_secs_f64() * 1e6 / n as f64 };
        (per(self.sign_time, self.signed), per(self.verify_time, self.verified))
    }

    fn add(&mut self, o: &MacCost) {
        self.signed += o.signed;
        self.sign_time += o.sign_time;
        self.verified += o.verified;
        self.verify_time += o.verify_time;
        self.failed += o.failed;
    }
}

/// TLS and MACs for a load run against a secured gateway.
pub type LoadSecurity = crate::traffic::secure::Security;

impl Default for LoadReport {
    fn default() -> Self {
        LoadReport {
            sent: 0,
            codes: BTreeMap::new(),
            latency: histogram(),
            seconds: Vec::new(),
            elapsed: Duration::ZERO,
            mac: MacCost::default(),
        }
    }
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
        self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at quantile `q` (0..1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(q) as f64 / 1e3
    }

    pub fn max_ms(&self) -> f64 {
        self.latency.max() as f64 / 1e3
    }

    fn record(&mut self, at: Duration, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 600_000_000);
        let _ = self.latency.record(us);
        let sec = at.as_secs() as usize;
        while self.seconds.len() <= sec {
            self.seconds.push(Second {
                answered: 0,
                latency: histogram(),
            });
        }
        self.seconds[sec].answered += 1;
        let _ = self.seconds[sec].latency.record(us);
    }

    fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.mac.add(&other.mac);
        for (c, n) in other.codes {
            *self.codes.entry(c).or_default() += n;
        }
        let _ = self.latency.add(&other.latency);
        for (i, s) in other.seconds.into_iter().enumerate() {
            while self.seconds.len() <= i {
                self.seconds.push(Second {
                    answered: 0,
                    latency: histogram(),
                });
            }
            self.seconds[i].answered += s.answered;
            let _ = self.seconds[i].latency.add(&s.latency);
        }
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
/// Length of a terminal id (field 41, `ans 8`).
const TERMINAL_ID_LEN: usize = 8;

/// Refuses a prefix whose ids (`{prefix}{n:04}` for n up to `connections`) are not 8 characters: the gateway would
/// answer every request as unreadable, and nothing would be sold.
pub fn check_terminal_ids(prefix: &str, connections: usize) -> Result<(), String> {
    let (first, last) = (format!("{prefix}{:04}", 1), format!("{prefix}{connections:04}"));
    for id in [&first, &last] {
        if id.len() != TERMINAL_ID_LEN {
            return Err(format!(
                "--terminal-prefix `{prefix}` makes terminal ids like `{id}` ({} characters): field 41 takes exactly \
                 {TERMINAL_ID_LEN}, so give a prefix of {} characters (with up to 9999 connections)",
                id.len(),
                TERMINAL_ID_LEN - 4
            ));
        }
    }
    Ok(())
}

pub async fn run(spec: LoadSpec, dialect: Arc<Dialect>) -> Result<LoadReport, String> {
    run_secured(spec, dialect, &LoadSecurity::default()).await
}

/// [`run`] over TLS and/or with MACs: each request MACed with its terminal's key (`{terminal_prefix}{n:04}`), each
/// answer's MAC checked, both timed ([`LoadReport::mac`]).
pub async fn run_secured(spec: LoadSpec, dialect: Arc<Dialect>, security: &LoadSecurity) -> Result<LoadReport, String> {
    if spec.mix.is_empty() {
        return Err("the product mix is empty".into());
    }
    check_terminal_ids(&spec.terminal_prefix, spec.connections)?;
    let mut conns = Vec::new();
    for _ in 0..spec.connections {
        let s = TerminalStream::connect(spec.addr, security.tls.as_ref())
            .await
            .map_err(|e| format!("{}: {e}", spec.addr))?;
        conns.push(s);
    }
    let start = Instant::now();
    let end = start + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in conns.into_iter().enumerate() {
        let (spec, dialect, mac) = (spec.clone(), dialect.clone(), security.mac.clone());
        tasks.spawn(async move { connection(i + 1, s, spec, dialect, mac, start, end).await });
    }
    let mut report = LoadReport::default();
    while let Some(r) = tasks.join_next().await {
        report.merge(r.map_err(|e| e.to_string())?);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

async fn connection(
    n: usize,
    stream: TerminalStream,
    spec: LoadSpec,
    dialect: Arc<Dialect>,
    mac: Option<MacSigner>,
    start: Instant,
    end: Instant,
) -> LoadReport {
    let id = Identity {
        terminal_id: format!("{}{n:04}", spec.terminal_prefix),
        merchant_id: spec.merchant.clone(),
    };
    let codec = FrameCodec::new(spec.framing, spec.tpdu.is_some(), 0xFFFF);
    let (mut sink, mut src) = Framed::new(stream, codec).split();
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut report = LoadReport::default();
    let mut stan = 0u32;
    let progress = spec.progress.clone().unwrap_or_default();
    // Open loop: this connection's share of the rate, with its first send offset so connections interleave.
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.connections as f64 / r.max(0.001)));
    let mut next_send = start
        + interval
            .map(|i| i.mul_f64(n as f64 / spec.connections as f64))
            .unwrap_or_default();
    let mut cost = MacCost::default();
    let mut send = |stan: u32| {
        let item = spec.item(stan);
        let s = SaleSpec {
            stan,
            transmission: spec
                .transmission
                .clone()
                .unwrap_or_else(crate::traffic::sim::now_transmission),
            product: item.product.clone(),
            amount: item.amount,
            currency: item.currency.clone(),
        };
        let msg = id.sale(&s, false);
        match &mac {
            None => dialect.encode(&msg).map(|b| b.freeze()).map_err(|_| ()),
            Some(m) => {
                let t0 = std::time::Instant::now();
                let signed = m.sign(&dialect, &msg).map(|b| b.freeze()).map_err(|_| ());
                cost.sign_time += t0.elapsed();
                cost.signed += 1;
                signed
            }
        }
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
                tpdu: spec.tpdu,
                message: body,
            };
            if sink.send(frame).await.is_err() {
                break;
            }
            pending.insert(format!("{stan:06}"), Instant::now());
            report.sent += 1;
            progress.sent.fetch_add(1, Ordering::Relaxed);
            if let Some(i) = interval {
                next_send += i;
            }
            continue;
        }
        if now >= end && pending.is_empty() {
            break;
        }
        // STANs run out at 999999: then this connection only waits for its answers.
        let exhausted = stan >= 999_999;
        let wake = match interval {
            Some(_) if now < end && !exhausted => next_send.min(end),
            _ => end.max(now) + Duration::from_secs(30),
        };
        tokio::select! {
            f = src.next() => match f {
                Some(Ok(f)) => {
                    if let Ok(m) = dialect.decode(&f.message) {
                        if let Some(signer) = &mac {
                            let t0 = std::time::Instant::now();
                            let checked = signer.verify(&dialect, &f.message, &m);
                            report.mac.verify_time += t0.elapsed();
                            report.mac.verified += 1;
                            report.mac.failed += u64::from(checked.is_err());
                        }
                        if let Some(t0) = m.get_str(11).and_then(|s| pending.remove(s)) {
                            let now = Instant::now();
                            let code = m.get_str(39).unwrap_or("echo").to_string();
                            progress.answered.fetch_add(1, Ordering::Relaxed);
                            if code == "00" || code == "echo" {
                                progress.approved.fetch_add(1, Ordering::Relaxed);
                                report.record(now.duration_since(start), now.duration_since(t0));
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
    report.mac.add(&cost);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_item_may_name_its_currency() {
        let m = MixItem::parse("GIFT-US-25:2500:3:840").unwrap();
        assert_eq!(
            (m.product.as_str(), m.amount, m.weight, m.currency.as_str()),
            ("GIFT-US-25", 2500, 3, "840")
        );
        assert_eq!(MixItem::parse("GIFT-25:2500").unwrap().currency, DEFAULT_CURRENCY);
        let e = MixItem::parse("GIFT-25:2500:1:EUR").unwrap_err();
        assert!(e.contains("ISO 4217"), "{e}");
        assert!(MixItem::parse("GIFT-25:2500:1:978:x").is_err());
    }

    #[test]
    fn terminal_ids_of_the_wrong_length_are_refused_with_the_reason() {
        assert!(check_terminal_ids("DEMO", 32).is_ok());
        assert!(check_terminal_ids("DEMO", 9999).is_ok());
        let e = check_terminal_ids("G1", 8).unwrap_err();
        assert!(
            e.contains("`G10001` (6 characters)") && e.contains("4 characters"),
            "{e}"
        );
        assert!(check_terminal_ids("DEMO", 10_000).unwrap_err().contains("DEMO10000"));
        assert!(check_terminal_ids("TERMINAL", 1).is_err());
    }
}
