//! Replay of capture files: against a gateway (requests sent again, in order per connection, with the original
//! pacing or as fast as possible; each answer compared field by field with the captured one) or offline against
//! the codec alone (every frame decoded and re-encoded).
//!
//! Comparison rules: by default every field must be equal except those that differ by nature from one run to the
//! next, which must only be present in both or absent in both: 38 (authorisation id) and 63 (PIN data). Options
//! change both lists.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::traffic::secure::TerminalStream;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::iso8583::{Dialect, Message};
use crate::link::framing::{Frame, FrameCodec, Tpdu};
use crate::traffic::capture::{Capture, Direction, Record};

/// How a replay runs.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub addr: SocketAddr,
    /// Keep the captured time between requests (else as fast as answers come).
    pub original_pacing: bool,
    /// Fields compared for presence only.
    pub may_differ: BTreeSet<u8>,
    /// Fields not compared at all.
    pub ignore: BTreeSet<u8>,
    /// Time allowed for each answer.
    pub timeout: Duration,
    /// TLS to the listener; requests MACed again with their terminals' keys (the answers' MAC fields are then not
    /// compared: they cover fields that differ by nature, and a capture made without MACs has none).
    pub security: crate::traffic::secure::Security,
    /// Advanced by one for each request replayed (`pingate replay` draws it on a terminal; hidden by default).
    pub progress: indicatif::ProgressBar,
}

impl ReplayOptions {
    pub fn new(addr: SocketAddr) -> ReplayOptions {
        ReplayOptions {
            addr,
            original_pacing: false,
            may_differ: [37, 38, 63].into(),
            ignore: BTreeSet::new(),
            timeout: Duration::from_secs(30),
            security: Default::default(),
            progress: indicatif::ProgressBar::hidden(),
        }
    }
}

/// One difference, or one missing answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub conn: u64,
    /// Line of the request in the capture file.
    pub line: usize,
    /// `0200 STAN 000002`, for a person.
    pub request: String,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {} (connection {}, {}): {}",
            self.line, self.conn, self.request, self.what
        )
    }
}

/// What a replay found.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    pub requests: usize,
    pub matched: usize,
    pub mismatches: Vec<Finding>,
    pub missing: Vec<Finding>,
}

impl ReplayReport {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty() && self.missing.is_empty()
    }
}

fn split(data: &Bytes, tpdu: bool) -> (Option<Tpdu>, Bytes) {
    if tpdu && data.len() >= 5 {
        (
            Some(Tpdu::parse(data[..5].try_into().expect("5 bytes"))),
            data.slice(5..),
        )
    } else {
        (None, data.clone())
    }
}

fn describe(dialect: &Dialect, msg: &Bytes) -> String {
    match dialect.decode(msg) {
        Ok(m) => format!("{} STAN {}", m.mti(), m.get_str(11).unwrap_or("?")),
        Err(_) => "undecodable".into(),
    }
}

fn show(dialect: &Dialect, n: u8, v: &[u8]) -> String {
    let binary = dialect
        .field(n)
        .is_some_and(|s| s.class == crate::iso8583::spec::Class::Binary);
    if binary || std::str::from_utf8(v).is_err() {
        v.iter().map(|b| format!("{b:02X}")).collect()
    } else {
        format!("{:?}", String::from_utf8_lossy(v))
    }
}

/// The differences between a captured and a replayed answer under the rules.
pub fn compare(dialect: &Dialect, captured: &Message, got: &Message, opts: &ReplayOptions) -> Vec<String> {
    let mut out = Vec::new();
    if captured.mti() != got.mti() {
        out.push(format!("MTI: captured {}, replayed {}", captured.mti(), got.mti()));
    }
    let fields: BTreeSet<u8> = captured
        .fields()
        .map(|(n, _)| n)
        .chain(got.fields().map(|(n, _)| n))
        .collect();
    for n in fields {
        if opts.ignore.contains(&n) {
            continue;
        }
        let (a, b) = (captured.get(n), got.get(n));
        match (a, b) {
            (Some(_), None) => out.push(format!("field {n}: captured, missing in the replay")),
            (None, Some(v)) => out.push(format!(
                "field {n}: not captured, replayed {}",
                if opts.may_differ.contains(&n) {
                    "(present)".into()
                } else {
                    got.masked(n).unwrap_or_else(|| show(dialect, n, v))
                }
            )),
            // Sensitive fields (the PIN in 63) are shown masked, never as they are.
            (Some(x), Some(y)) if x != y && !opts.may_differ.contains(&n) => out.push(format!(
                "field {n}: captured {}, replayed {}",
                captured.masked(n).unwrap_or_else(|| show(dialect, n, x)),
                got.masked(n).unwrap_or_else(|| show(dialect, n, y))
            )),
            _ => {}
        }
    }
    out
}

/// How long a request the capture shows no answer to is given to stay unanswered.
const UNANSWERED_WAIT: Duration = Duration::from_secs(1);

/// Connections replayed at once at most.
const MAX_CONNECTIONS: usize = 256;

/// How the captured frames were carried: framing, TPDU, and what was done to PINs.
#[derive(Clone, Copy)]
struct Carried {
    framing: crate::link::framing::Framing,
    tpdu: bool,
    pins: crate::traffic::capture::PinPolicy,
}

/// Replays `capture` against a gateway; connections run side by side, each in its captured order.
pub async fn replay(capture: &Capture, dialect: Arc<Dialect>, opts: &ReplayOptions) -> ReplayReport {
    let mut by_conn: HashMap<u64, Vec<Record>> = HashMap::new();
    for r in &capture.records {
        by_conn.entry(r.conn).or_default().push(r.clone());
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Connections side by side, but not more at once than a gateway's per-source cap would take.
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let carried = Carried {
        framing: capture.framing,
        tpdu: capture.tpdu,
        pins: capture.pins,
    };
    for (conn, records) in by_conn {
        let (dialect, opts, room) = (dialect.clone(), opts.clone(), room.clone());
        tasks.spawn(async move {
            let _slot = room.acquire_owned().await;
            one_connection(conn, records, carried, dialect, &opts, start).await
        });
    }
    let mut report = ReplayReport::default();
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            report.requests += r.requests;
            report.matched += r.matched;
            report.mismatches.extend(r.mismatches);
            report.missing.extend(r.missing);
        }
    }
    report.mismatches.sort_by_key(|f| f.line);
    report.missing.sort_by_key(|f| f.line);
    report
}

/// The MTI that answers `request` (`0200` → `0210`, `0420` → `0430`).
fn response_mti(request: &str) -> Option<String> {
    let b = request.as_bytes();
    if b.len() != 4 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(format!(
        "{}{}{}0",
        b[0] as char,
        b[1] as char,
        (b'0' + (b[2] - b'0' + 1) % 10) as char
    ))
}

/// STAN and MTI of a frame's message.
fn stan_mti(dialect: &Dialect, data: &Bytes, tpdu: bool) -> (Option<String>, Option<String>) {
    match dialect.decode(&split(data, tpdu).1) {
        Ok(m) => (m.get_str(11).map(String::from), Some(m.mti().to_string())),
        Err(_) => (None, None),
    }
}

/// The captured answer to the request at `i`: the first host frame after it, not yet taken by an earlier request,
/// with the request's STAN and the response MTI; a keep-alive's is the next keep-alive. A request the capture shows
/// no answer to gets `None`.
fn expected(records: &[Record], i: usize, dialect: &Dialect, tpdu: bool, used: &mut [bool]) -> Option<usize> {
    let req = &records[i];
    let keepalive = split(&req.data, tpdu).1.is_empty();
    let (stan, mti) = stan_mti(dialect, &req.data, tpdu);
    let want_mti = mti.as_deref().and_then(response_mti);
    let found = (i + 1..records.len()).find(|&j| {
        let r = &records[j];
        if r.dir != Direction::Host || used[j] {
            return false;
        }
        let empty = split(&r.data, tpdu).1.is_empty();
        if keepalive || empty {
            return keepalive && empty;
        }
        let (s, m) = stan_mti(dialect, &r.data, tpdu);
        match (&stan, &want_mti) {
            (Some(_), Some(_)) => s == stan && m == want_mti,
            // A request that does not decode: its answer, if it has one, is a format error carrying no STAN.
            _ => m.is_some() && s.is_none(),
        }
    });
    if let Some(j) = found {
        used[j] = true;
    }
    found
}

async fn one_connection(
    conn: u64,
    records: Vec<Record>,
    capture: Carried,
    dialect: Arc<Dialect>,
    opts: &ReplayOptions,
    start: Instant,
) -> ReplayReport {
    let mut report = ReplayReport::default();
    let finding = |r: &Record, what: String| Finding {
        conn,
        line: r.line,
        request: describe(&dialect, &split(&r.data, capture.tpdu).1),
        what,
    };
    let stream = match TerminalStream::connect(opts.addr, opts.security.tls.as_ref()).await {
        Ok(s) => s,
        Err(e) => {
            for r in records.iter().filter(|r| r.dir == Direction::Terminal) {
                report.requests += 1;
                opts.progress.inc(1);
                report
                    .missing
                    .push(finding(r, format!("cannot connect to {}: {e}", opts.addr)));
            }
            return report;
        }
    };
    let mut framed = Framed::new(stream, FrameCodec::new(capture.framing, capture.tpdu, 0xFFFF));
    // Host frames already matched to a request.
    let mut used = vec![false; records.len()];
    for (i, r) in records.iter().enumerate() {
        if r.dir != Direction::Terminal {
            continue;
        }
        report.requests += 1;
        // Counted when its turn comes: a request that ends early (no answer, a send that failed) is done too.
        opts.progress.inc(1);
        if opts.original_pacing {
            if let Some(t) = start.checked_add(r.at) {
                tokio::time::sleep_until(t).await;
            }
        }
        let (tpdu, message) = split(&r.data, capture.tpdu);
        let message = match (&opts.security.mac, dialect.decode(&message)) {
            (Some(signer), Ok(m)) if !message.is_empty() => match signer.sign(&dialect, &m) {
                Ok(signed) => signed.freeze(),
                Err(e) => {
                    report.missing.push(finding(r, format!("cannot MAC the request: {e}")));
                    continue;
                }
            },
            _ => message,
        };
        let keepalive = message.is_empty();
        let (want_stan, request_mti) = match dialect.decode(&message) {
            Ok(m) => (m.get_str(11).map(String::from), Some(m.mti().to_string())),
            Err(_) => (None, None),
        };
        let want_mti = request_mti.as_deref().and_then(response_mti);
        if let Err(e) = framed.send(Frame { tpdu, message }).await {
            report.missing.push(finding(r, format!("send failed: {e}")));
            continue;
        }
        let expected = expected(&records, i, &dialect, capture.tpdu, &mut used).map(|j| &records[j]);
        // A request the capture shows no answer to (a frame with no readable MTI, say) must get none now either:
        // a short wait tells.
        let wait = if expected.is_some() {
            opts.timeout
        } else {
            opts.timeout.min(UNANSWERED_WAIT)
        };
        // The answer: the next frame with the request's STAN (answers to other requests are not expected, since
        // requests go one at a time).
        let got = tokio::time::timeout(wait, async {
            loop {
                match framed.next().await {
                    Some(Ok(f)) => {
                        if keepalive {
                            return Ok(f);
                        }
                        if f.message.is_empty() {
                            continue;
                        }
                        let stan = dialect
                            .decode(&f.message)
                            .ok()
                            .and_then(|m| m.get_str(11).map(String::from));
                        let mti = dialect.decode(&f.message).ok().map(|m| m.mti().to_string());
                        if want_stan.is_none() || (stan == want_stan && (want_mti.is_none() || mti == want_mti)) {
                            return Ok(f);
                        }
                    }
                    Some(Err(e)) => return Err(format!("framing: {e}")),
                    None => return Err("the gateway closed the connection".to_string()),
                }
            }
        })
        .await;
        let got = match got {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                report.missing.push(finding(r, format!("no answer: {e}")));
                continue;
            }
            Err(_) if expected.is_none() => {
                report.matched += 1;
                continue;
            }
            Err(_) => {
                report
                    .missing
                    .push(finding(r, format!("no answer within {} ms", opts.timeout.as_millis())));
                continue;
            }
        };
        let Some(exp) = expected else {
            // Nothing was captured in answer: a replayed answer is a difference.
            report
                .mismatches
                .push(finding(r, "answered, but no answer was captured".into()));
            continue;
        };
        // The replayed answer is treated as the captured ones were (PINs masked or left out), so that like is
        // compared with like and no live PIN is ever printed.
        let got = crate::link::framing::Frame {
            message: crate::traffic::capture::protect_pins(&dialect, &got.message, false, capture.pins)
                .unwrap_or_else(|| Bytes::from_static(b"")),
            ..got
        };
        let (exp_tpdu, exp_msg) = split(&exp.data, capture.tpdu);
        let mut diffs = Vec::new();
        if exp_tpdu.map(|t| t.bytes()) != got.tpdu.map(|t| t.bytes()) {
            diffs.push("TPDU differs".to_string());
        }
        if keepalive || exp_msg.is_empty() {
            if exp_msg.len() != got.message.len() {
                diffs.push("keep-alive answered with a message, or the other way round".into());
            }
        } else {
            match (dialect.decode(&exp_msg), dialect.decode(&got.message)) {
                (Ok(a), Ok(b)) => diffs.extend(compare(&dialect, &a, &b, opts)),
                (Err(e), _) => diffs.push(format!("the captured answer (line {}) does not decode: {e}", exp.line)),
                (_, Err(e)) => diffs.push(format!("the replayed answer does not decode: {e}")),
            }
        }
        if diffs.is_empty() {
            report.matched += 1;
        } else {
            for d in diffs {
                report.mismatches.push(finding(r, d));
            }
        }
    }
    report
}

/// What the offline replay found.
#[derive(Clone, Debug, Default)]
pub struct OfflineReport {
    pub frames: usize,
    pub ok: usize,
    /// (line, problem)
    pub failures: Vec<(usize, String)>,
}

/// Decodes and re-encodes every frame of `capture` with `dialect`: every frame must decode, and re-encode to the
/// same bytes.
pub fn replay_offline(capture: &Capture, dialect: &Dialect) -> OfflineReport {
    let mut report = OfflineReport::default();
    for r in &capture.records {
        let (_, msg) = split(&r.data, capture.tpdu);
        if msg.is_empty() {
            continue;
        }
        report.frames += 1;
        match dialect.decode(&msg) {
            Err(e) => report.failures.push((r.line, format!("does not decode: {e}"))),
            Ok(m) => match dialect.encode(&m) {
                Err(e) => report
                    .failures
                    .push((r.line, format!("decodes but does not encode again: {e}"))),
                Ok(b) if b[..] != msg[..] => {
                    let at = b
                        .iter()
                        .zip(msg.iter())
                        .position(|(x, y)| x != y)
                        .unwrap_or(b.len().min(msg.len()));
                    report
                        .failures
                        .push((r.line, format!("re-encodes differently from byte {at}")));
                }
                Ok(_) => report.ok += 1,
            },
        }
    }
    report
}

/// `pingate replay` (and `pingate-replay replay`): the command line.
#[cfg(test)]
mod tests {
    #[test]
    fn response_mtis() {
        for (req, resp) in [("0200", "0210"), ("0201", "0210"), ("0420", "0430"), ("0800", "0810")] {
            assert_eq!(super::response_mti(req).as_deref(), Some(resp));
        }
        assert_eq!(super::response_mti("02x0"), None);
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The capture file.
    pub capture: std::path::PathBuf,
    /// The gateway's terminal listener (framing and TPDU as the capture says).
    #[arg(long, required_unless_present = "offline")]
    pub gateway: Option<SocketAddr>,
    /// Against the codec alone: decode and re-encode every frame.
    #[arg(long)]
    pub offline: bool,
    /// `original`: keep the captured time between requests; `fast`: as fast as answers come.
    #[arg(long, default_value = "fast", value_parser = ["original", "fast"])]
    pub pace: String,
    /// Fields that must only be present in both answers or absent in both (comma separated).
    #[arg(long, default_value = "37,38,63")]
    pub may_differ: String,
    /// Fields not compared at all (comma separated).
    #[arg(long, default_value = "")]
    pub ignore: String,
    /// Time allowed for each answer, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// TLS (`--tls --ca --cert --key`) and MACs (`--mac-key-file --kek-file`) for a secured gateway.
    #[command(flatten)]
    pub security: crate::traffic::secure::SecurityArgs,
}

fn field_list(s: &str, what: &str) -> Result<BTreeSet<u8>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u8>()
                .ok()
                .filter(|n| (2..=128).contains(n))
                .ok_or_else(|| format!("--{what}: `{x}` is not a field number (2-128)"))
        })
        .collect()
}

/// Runs the command; prints one line per difference and a summary. `Ok(false)`: differences or missing answers.
pub async fn run_cli(args: ReplayArgs) -> Result<bool, String> {
    let capture = Capture::load(&args.capture).map_err(|e| format!("{}: {e}", args.capture.display()))?;
    let dialects = crate::iso8583::Dialects::builtin();
    let dialect = Arc::new(dialects.get(&capture.dialect).map_err(|e| e.to_string())?.clone());
    if args.offline {
        let r = replay_offline(&capture, &dialect);
        for (line, problem) in &r.failures {
            println!("line {line}: {problem}");
        }
        println!(
            "{} frames: {} decode and re-encode byte for byte, {} fail",
            r.frames,
            r.ok,
            r.failures.len()
        );
        return Ok(r.failures.is_empty());
    }
    let addr = args.gateway.ok_or("--gateway is needed (or --offline)")?;
    let security = args.security.security()?;
    let may_differ = field_list(&args.may_differ, "may-differ")?;
    let mut ignore = field_list(&args.ignore, "ignore")?;
    if security.mac.is_some() {
        // The answers' MACs cover fields that differ by nature, and a capture made without MACs has none.
        ignore.extend([64, 128]);
    }
    let opts = ReplayOptions {
        addr,
        original_pacing: args.pace == "original",
        may_differ,
        ignore,
        timeout: Duration::from_millis(args.timeout_ms),
        security,
        progress: crate::progress::bar(
            "replaying",
            capture.records.iter().filter(|r| r.dir == Direction::Terminal).count() as u64,
            "requests",
        ),
    };
    let r = replay(&capture, dialect, &opts).await;
    opts.progress.finish_and_clear();
    for f in &r.mismatches {
        println!("differs: {f}");
    }
    for f in &r.missing {
        println!("missing: {f}");
    }
    println!(
        "{} requests replayed: {} answers match, {} differences, {} missing",
        r.requests,
        r.matched,
        r.mismatches.len(),
        r.missing.len()
    );
    Ok(r.ok())
}
