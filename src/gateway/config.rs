//! The gateway's configuration file (TOML), validated at load into typed values; nothing reads configuration deeper
//! in. `protocols/gateway.example.toml` is the annotated example.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::cache::Mode;
use super::upstream::{ServerAddr, UpstreamOptions};
use crate::link::dialup::LinkConfig;
use crate::link::framing::Framing;
use crate::link::modem::{AnswerMode, ModemConfig};
use crate::link::parity::Parity;

/// Errors of the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML for a gateway configuration (unknown keys included).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or contradicts another; `at` names the key.
    #[error("{path}: {at}: {reason}")]
    Invalid { path: PathBuf, at: String, reason: String },
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    gateway: GatewaySection,
    upstream: UpstreamSection,
    #[serde(default, rename = "listener")]
    listeners: Vec<ListenerSection>,
    #[serde(default, rename = "terminal")]
    terminals: Vec<TerminalSection>,
    #[serde(default, rename = "product")]
    products: Vec<ProductSection>,
    #[serde(default, rename = "serial")]
    serial: Vec<SerialSection>,
}

fn d_deadline() -> u64 {
    15_000
}
fn d_window() -> u64 {
    900
}
fn d_repeat_max() -> usize {
    200_000
}
fn d_lease() -> u64 {
    3_600
}
fn d_cover() -> u64 {
    30
}
fn d_lead() -> u64 {
    2
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    journal: PathBuf,
    /// Keys sealing cached PINs in the journal: a file holding `id:hex` entries.
    journal_keys_file: Option<PathBuf>,
    #[serde(default = "d_deadline")]
    response_deadline_ms: u64,
    #[serde(default)]
    keep_cache_on_shutdown: bool,
    admin: Option<SocketAddr>,
    #[serde(default = "d_window")]
    repeat_window_secs: u64,
    #[serde(default = "d_repeat_max")]
    repeat_max: usize,
    #[serde(default = "d_lease")]
    lease_secs: u64,
    #[serde(default = "d_cover")]
    refill_cover_secs: u64,
    #[serde(default = "d_lead")]
    refill_lead_secs: u64,
    protocols: Option<PathBuf>,
    log: Option<String>,
    metrics: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    addr: SocketAddr,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    servers: Vec<ServerSection>,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    connections: Option<usize>,
    connect_timeout_ms: Option<u64>,
    ping_every_ms: Option<u64>,
    breaker_failures: Option<u32>,
    breaker_cooldown_ms: Option<u64>,
}

fn d_max_frame() -> usize {
    4096
}
fn d_max_conn() -> usize {
    20_000
}
fn d_per_source() -> usize {
    2_000
}
fn d_idle() -> u64 {
    300_000
}
fn d_frame_timeout() -> u64 {
    5_000
}
fn d_in_flight() -> usize {
    32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerSection {
    name: String,
    bind: SocketAddr,
    framing: Framing,
    #[serde(default)]
    tpdu: bool,
    dialect: String,
    #[serde(default = "d_max_frame")]
    max_frame: usize,
    #[serde(default = "d_max_conn")]
    max_connections: usize,
    #[serde(default = "d_per_source")]
    max_per_source: usize,
    #[serde(default = "d_idle")]
    idle_timeout_ms: u64,
    #[serde(default = "d_frame_timeout")]
    frame_timeout_ms: u64,
    #[serde(default = "d_in_flight")]
    max_in_flight: usize,
    capture: Option<PathBuf>,
    capture_pins: Option<crate::capture::PinPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialSection {
    name: String,
    device: PathBuf,
    baud: Option<u32>,
    data_bits: Option<u8>,
    parity: Option<Parity>,
    stop_bits: Option<u8>,
    flow_control: Option<FlowControl>,
    #[serde(default)]
    software_parity: bool,
    dialect: String,
    #[serde(default)]
    tpdu: bool,
    link: Option<String>,
    #[serde(default)]
    modem: bool,
    modem_init: Option<Vec<String>>,
    answer: Option<String>,
    rings: Option<u32>,
    command_timeout_ms: Option<u64>,
    init_attempts: Option<u32>,
    modem_retry_secs: Option<u64>,
    connect_timeout_ms: Option<u64>,
    guard_time_ms: Option<u64>,
    dtr_drop_ms: Option<u64>,
    reinit_every_secs: Option<u64>,
    send_enq: Option<bool>,
    enq_delay_ms: Option<u64>,
    enq_interval_ms: Option<u64>,
    enq_max: Option<u32>,
    frame_timeout_ms: Option<u64>,
    ack_timeout_ms: Option<u64>,
    max_naks: Option<u32>,
    max_sends: Option<u32>,
    idle_timeout_ms: Option<u64>,
    max_frame: Option<usize>,
    binary: Option<bool>,
    inter_char_ms: Option<u64>,
    hangup: Option<Hangup>,
    capture: Option<PathBuf>,
    capture_pins: Option<crate::capture::PinPolicy>,
}

/// Flow control of a serial line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    /// RTS/CTS.
    Hardware,
    /// XON/XOFF.
    Software,
}

/// How a modem line hangs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hangup {
    /// Drop DTR where the port has it (the modem needs `&D2`), else escape.
    Dtr,
    /// `+++` between guard times, then `ATH0` (three-wire cables, ports without DTR).
    Escape,
}

/// What carries the messages on a serial line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineLink {
    /// `STX data ETX LRC` with ENQ/ACK/NAK/EOT (dial-up terminals).
    StxEtx(LinkConfig),
    /// A length header, as on TCP.
    Framed(Framing),
}

/// One serial line: a modem of a modem bank, or a terminal wired directly.
#[derive(Clone, Debug)]
pub struct SerialLineConfig {
    pub name: String,
    pub device: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub flow_control: FlowControl,
    /// The port runs 8N1 and the parity bit is added and checked here (ptys, adapters that ignore parity).
    pub software_parity: bool,
    pub dialect: String,
    /// A 5-byte TPDU comes before each message (addresses swapped in the answer).
    pub tpdu: bool,
    pub link: LineLink,
    /// `None`: the terminal is wired directly.
    pub modem: Option<ModemConfig>,
    /// A call that carries no frame for this long ends (and a modem hangs up).
    pub idle_timeout: Duration,
    pub max_frame: usize,
    pub hangup: Hangup,
    /// Every message each way is appended to this capture file (`src/capture.rs`), without the link's framing
    /// (connection numbers are calls); off when `None`.
    pub capture: Option<PathBuf>,
    /// What happens to PIN values in captured answers.
    pub capture_pins: crate::capture::PinPolicy,
}

impl SerialLineConfig {
    /// Bits a character takes on the wire: start, data, parity, stop.
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits) + u32::from(self.parity != Parity::None) + u32::from(self.stop_bits)
    }

    /// A dial-up line with every default: STX/ETX link, 2400 baud 8N1, a Hayes modem answered by the host.
    pub fn dialup(name: &str, device: &Path, dialect: &str) -> SerialLineConfig {
        SerialLineConfig {
            name: name.into(),
            device: device.into(),
            baud: 2400,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
            software_parity: false,
            dialect: dialect.into(),
            tpdu: false,
            link: LineLink::StxEtx(LinkConfig::default()),
            modem: Some(ModemConfig::default()),
            idle_timeout: LinkConfig::default().idle_timeout,
            max_frame: LinkConfig::default().max_frame,
            hangup: Hangup::Dtr,
            capture: None,
            capture_pins: crate::capture::PinPolicy::Masked,
        }
    }
}

fn serial_line(
    l: SerialSection,
    at: &str,
    response_deadline: Duration,
    invalid: &dyn Fn(&str, &str) -> ConfigError,
) -> Result<SerialLineConfig, ConfigError> {
    let field = |k: &str| format!("{at}.{k}");
    let baud = l.baud.unwrap_or(2400);
    if !(50..=1_000_000).contains(&baud) {
        return Err(invalid(&field("baud"), "must be 50 to 1000000"));
    }
    let data_bits = l.data_bits.unwrap_or(8);
    if data_bits != 7 && data_bits != 8 {
        return Err(invalid(&field("data_bits"), "must be 7 or 8"));
    }
    let stop_bits = l.stop_bits.unwrap_or(1);
    if stop_bits != 1 && stop_bits != 2 {
        return Err(invalid(&field("stop_bits"), "must be 1 or 2"));
    }
    let parity = l.parity.unwrap_or(Parity::None);
    if l.software_parity && (data_bits != 7 || parity == Parity::None) {
        return Err(invalid(
            &field("software_parity"),
            "needs data_bits = 7 and parity `even` or `odd`",
        ));
    }
    let max_frame = l.max_frame.unwrap_or(2048);
    if !(16..=65_535).contains(&max_frame) {
        return Err(invalid(&field("max_frame"), "must be 16 to 65535"));
    }
    // Timers: zero or tiny values would spin a line or cut every frame.
    for (key, v, min) in [
        ("idle_timeout_ms", l.idle_timeout_ms, 100),
        ("frame_timeout_ms", l.frame_timeout_ms, 100),
        ("ack_timeout_ms", l.ack_timeout_ms, 50),
        ("enq_interval_ms", l.enq_interval_ms, 50),
        ("inter_char_ms", l.inter_char_ms, 5),
        ("command_timeout_ms", l.command_timeout_ms, 100),
        ("connect_timeout_ms", l.connect_timeout_ms, 1000),
        ("guard_time_ms", l.guard_time_ms, 20),
        ("dtr_drop_ms", l.dtr_drop_ms, 50),
        ("reinit_every_secs", l.reinit_every_secs, 10),
        ("modem_retry_secs", l.modem_retry_secs, 1),
    ] {
        if v.is_some_and(|v| v < min) {
            return Err(invalid(&field(key), &format!("must be at least {min}")));
        }
    }
    let binary = l.binary.unwrap_or(data_bits == 8);
    if binary && data_bits == 7 {
        return Err(invalid(&field("binary"), "binary frames need 8 data bits"));
    }
    let d = LinkConfig::default();
    let idle_timeout = l.idle_timeout_ms.map(ms).unwrap_or(d.idle_timeout);
    let bits_per_char = 1 + u32::from(data_bits) + u32::from(parity != Parity::None) + u32::from(stop_bits);
    let link = match l.link.as_deref().unwrap_or("stx-etx") {
        "stx-etx" => {
            let send_enq = l.send_enq.unwrap_or(l.modem);
            let enq_interval = l.enq_interval_ms.map(ms).unwrap_or(d.enq_interval);
            let enq_max = l.enq_max.unwrap_or(d.enq_max);
            let c = LinkConfig {
                send_enq,
                enq_delay: l.enq_delay_ms.map(ms).unwrap_or(d.enq_delay),
                enq_interval,
                enq_max,
                frame_timeout: l.frame_timeout_ms.map(ms).unwrap_or(d.frame_timeout),
                ack_timeout: l.ack_timeout_ms.map(ms).unwrap_or(d.ack_timeout),
                max_naks: l.max_naks.unwrap_or(d.max_naks),
                max_sends: l.max_sends.unwrap_or(d.max_sends),
                idle_timeout,
                max_frame,
                baud,
                bits_per_char,
                // A call on a modem line must not wait for ever for a terminal that says nothing.
                first_frame: (l.modem && !send_enq).then(|| enq_interval * enq_max.max(1)),
                // The controller answers within its deadline; a margin for the line, then the link stops waiting.
                answer_timeout: response_deadline + Duration::from_secs(5),
                tpdu: l.tpdu,
                // Binary messages (8 data bits) may hold ETX: the frame ends at `ETX LRC` then silence, by default
                // 20 character times and at least 50 ms.
                inter_char: binary.then(|| {
                    l.inter_char_ms
                        .map(ms)
                        .unwrap_or_else(|| crate::link::dialup::wire_time(baud, bits_per_char, 20).max(ms(50)))
                }),
            };
            if c.max_naks == 0 || c.max_sends == 0 || c.enq_max == 0 {
                return Err(invalid(at, "max_naks, max_sends and enq_max must be at least 1"));
            }
            LineLink::StxEtx(c)
        }
        other if data_bits == 7 && other != "ascii4" => {
            return Err(invalid(
                &field("link"),
                "a binary length header cannot go on a 7-bit line: use `stx-etx` or `ascii4`",
            ))
        }
        other => LineLink::Framed(
            other
                .parse()
                .map_err(|e: String| invalid(&field("link"), &format!("{e}, or `stx-etx`")))?,
        ),
    };
    let modem = if l.modem {
        let d = ModemConfig::default();
        let answer = match l.answer.as_deref().unwrap_or("host") {
            "host" => AnswerMode::Host {
                rings: l.rings.unwrap_or(1).max(1),
            },
            "auto" => AnswerMode::Auto,
            _ => return Err(invalid(&field("answer"), "`host` (ATA on RING) or `auto` (S0=n)")),
        };
        let init = l.modem_init.unwrap_or(d.init);
        if init.iter().any(|c| c.is_empty() || c.contains(['\r', '\n'])) {
            return Err(invalid(&field("modem_init"), "commands must be non-empty single lines"));
        }
        let auto_answers = init.iter().any(|c| {
            let c = c.to_ascii_uppercase();
            c.find("S0=")
                .is_some_and(|i| c[i + 3..].starts_with(|ch: char| ch.is_ascii_digit() && ch != '0'))
        });
        if answer == AnswerMode::Auto && !auto_answers {
            return Err(invalid(
                &field("answer"),
                "`auto` needs S0=n (n > 0) in modem_init, or the modem never answers",
            ));
        }
        Some(ModemConfig {
            init,
            answer,
            command_timeout: l.command_timeout_ms.map(ms).unwrap_or(d.command_timeout),
            init_attempts: l.init_attempts.unwrap_or(d.init_attempts).max(1),
            retry_after: l.modem_retry_secs.map(Duration::from_secs).unwrap_or(d.retry_after),
            connect_timeout: l.connect_timeout_ms.map(ms).unwrap_or(d.connect_timeout),
            guard_time: l.guard_time_ms.map(ms).unwrap_or(d.guard_time),
            dtr_drop: l.dtr_drop_ms.map(ms).unwrap_or(d.dtr_drop),
            reinit_every: l.reinit_every_secs.map(Duration::from_secs).unwrap_or(d.reinit_every),
        })
    } else {
        None
    };
    Ok(SerialLineConfig {
        name: l.name,
        device: l.device,
        baud,
        data_bits,
        parity,
        stop_bits,
        flow_control: l.flow_control.unwrap_or(FlowControl::None),
        software_parity: l.software_parity,
        dialect: l.dialect,
        tpdu: l.tpdu,
        link,
        modem,
        idle_timeout,
        max_frame,
        hangup: l.hangup.unwrap_or(Hangup::Dtr),
        capture: l.capture,
        capture_pins: l.capture_pins.unwrap_or(crate::capture::PinPolicy::Masked),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminalSection {
    id: String,
    merchant: String,
    #[serde(default = "all_products")]
    products: Vec<String>,
}

fn all_products() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductSection {
    code: String,
    amount: i64,
    mode: String,
    #[serde(default)]
    low: usize,
    #[serde(default)]
    high: usize,
}

/// One terminal listener.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub framing: Framing,
    pub tpdu: bool,
    pub dialect: String,
    /// Largest frame (TPDU included); a larger announced length closes the connection.
    pub max_frame: usize,
    pub max_connections: usize,
    pub max_per_source: usize,
    /// A connection with nothing in flight and no byte for this long is closed.
    pub idle_timeout: Duration,
    /// A frame, once its first byte came, must be complete within this (slow senders are cut off).
    pub frame_timeout: Duration,
    /// Requests answered concurrently per connection; further frames wait to be read.
    pub max_in_flight: usize,
    /// Every frame each way is appended to this capture file (`src/capture.rs`); off when `None`.
    pub capture: Option<PathBuf>,
    /// What happens to PIN values in captured answers.
    pub capture_pins: crate::capture::PinPolicy,
}

impl ListenerConfig {
    /// A listener with the defaults, for tests and the demo.
    pub fn new(name: &str, bind: SocketAddr, framing: Framing, tpdu: bool, dialect: &str) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            bind,
            framing,
            tpdu,
            dialect: dialect.into(),
            max_frame: d_max_frame(),
            max_connections: d_max_conn(),
            max_per_source: d_per_source(),
            idle_timeout: ms(d_idle()),
            frame_timeout: ms(d_frame_timeout()),
            max_in_flight: d_in_flight(),
            capture: None,
            capture_pins: crate::capture::PinPolicy::Masked,
        }
    }
}

/// A terminal allowed to buy, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminalEntry {
    pub merchant: String,
    /// `None`: every product.
    pub products: Option<HashSet<String>>,
}

/// Known terminals.
#[derive(Clone, Debug, Default)]
pub struct TerminalRegistry {
    pub terminals: HashMap<String, TerminalEntry>,
}

impl TerminalRegistry {
    /// Whether `terminal` of `merchant` may buy `product` (`None` for network messages: only the terminal).
    pub fn permits(&self, terminal: &str, merchant: Option<&str>, product: Option<&str>) -> bool {
        let Some(t) = self.terminals.get(terminal) else {
            return false;
        };
        if merchant.is_some_and(|m| m != t.merchant) {
            return false;
        }
        match (product, &t.products) {
            (Some(p), Some(set)) => set.contains(p),
            _ => true,
        }
    }

    pub fn add(&mut self, id: &str, merchant: &str, products: Option<&[&str]>) {
        self.terminals.insert(
            id.into(),
            TerminalEntry {
                merchant: merchant.into(),
                products: products.map(|p| p.iter().map(|s| s.to_string()).collect()),
            },
        );
    }
}

/// How one product and amount is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductConfig {
    pub code: String,
    pub amount: i64,
    pub mode: Mode,
}

/// The whole configuration.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub journal: PathBuf,
    /// `id:hex` key entries for the journal (from the keys file; `None`: `$PINGATE_JOURNAL_KEYS` at start).
    pub journal_keys: Option<crate::keyfile::Secret>,
    pub response_deadline: Duration,
    pub keep_cache_on_shutdown: bool,
    pub admin: Option<SocketAddr>,
    pub repeat_window: Duration,
    pub repeat_max: usize,
    pub lease: Duration,
    pub refill_cover: Duration,
    pub refill_lead: Duration,
    pub protocols: Option<PathBuf>,
    /// Log levels (`info`, `warn,pingate::gateway=debug`); `--log-level` and `$RUST_LOG` win.
    pub log: Option<String>,
    /// Prometheus metrics, health and readiness over HTTP (off when `None`; keep it on loopback).
    pub metrics: Option<SocketAddr>,
    pub servers: Vec<ServerAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub upstream: UpstreamOptions,
    pub listeners: Vec<ListenerConfig>,
    /// Serial lines: modems and directly wired terminals.
    pub serial: Vec<SerialLineConfig>,
    pub terminals: TerminalRegistry,
    /// Products and amounts not listed are sold on demand.
    pub products: Vec<ProductConfig>,
}

impl GatewayConfig {
    /// What is allowed but unwise: the admin socket or the metrics endpoint off loopback (neither authenticates).
    pub fn warnings(&self) -> Vec<String> {
        [("gateway.admin", self.admin), ("gateway.metrics", self.metrics)]
            .into_iter()
            .filter_map(|(key, addr)| addr.and_then(|a| crate::metrics::off_loopback(key, a)))
            .collect()
    }

    /// Reads and checks a configuration file; relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        GatewayConfig::parse(&text, path)
    }

    /// Checks a configuration's text; the first problem found is the error (see [`check`](Self::check) for all).
    pub fn parse(text: &str, path: &Path) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::check(text, path).map_err(|mut all| all.remove(0))
    }

    /// Checks a configuration's text and returns every problem found, each naming its key (`pingate check-config`).
    /// A file that is not valid TOML, or has an unknown key, stops at that one problem.
    pub fn check(text: &str, path: &Path) -> Result<GatewayConfig, Vec<ConfigError>> {
        let f: File = toml::from_str(text).map_err(|e| {
            vec![ConfigError::Parse {
                path: path.into(),
                message: e.to_string(),
            }]
        })?;
        let mut problems: Vec<ConfigError> = Vec::new();
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let invalid = |at: &str, reason: &str| ConfigError::Invalid {
            path: path.into(),
            at: at.into(),
            reason: reason.into(),
        };
        let g = f.gateway;
        if g.response_deadline_ms < 100 || g.response_deadline_ms > 120_000 {
            problems.push(invalid("gateway.response_deadline_ms", "must be 100 to 120000"));
        }
        if f.upstream.servers.is_empty() {
            problems.push(invalid("upstream.servers", "at least one PIN server is needed"));
        }
        let journal_keys = match &g.journal_keys_file {
            // A key file group or others may read is refused (the error names it and its mode).
            Some(p) => match crate::keyfile::read_to_string(&rel(p.clone())) {
                Ok(t) => Some(crate::keyfile::Secret::new(t.trim())),
                Err(e) => {
                    problems.push(invalid("gateway.journal_keys_file", &e.to_string()));
                    None
                }
            },
            None => None,
        };
        let mut upstream = UpstreamOptions::default();
        let u = &f.upstream;
        if let Some(c) = u.connections {
            if c == 0 || c > 64 {
                problems.push(invalid("upstream.connections", "must be 1 to 64"));
            }
            upstream.connections = c;
        }
        if let Some(v) = u.connect_timeout_ms {
            if v < 100 {
                problems.push(invalid("upstream.connect_timeout_ms", "must be at least 100"));
            }
            upstream.connect_timeout = ms(v);
        }
        if let Some(v) = u.ping_every_ms {
            upstream.ping_every = ms(v.max(100));
        }
        if let Some(v) = u.breaker_failures {
            upstream.breaker_failures = v.max(1);
        }
        if let Some(v) = u.breaker_cooldown_ms {
            upstream.breaker_cooldown = ms(v);
        }
        let mut names = HashSet::new();
        let mut listeners = Vec::new();
        for (i, l) in f.listeners.into_iter().enumerate() {
            let at = format!("listener[{i}]");
            if !names.insert(l.name.clone()) {
                {
                    problems.push(invalid(&at, "listener names must be unique"));
                    continue;
                }
            }
            if l.max_frame < 16 {
                {
                    problems.push(invalid(&format!("{at}.max_frame"), "must be at least 16"));
                    continue;
                }
            }
            if l.max_in_flight == 0 || l.max_connections == 0 || l.max_per_source == 0 {
                {
                    problems.push(invalid(
                        &at,
                        "max_in_flight, max_connections and max_per_source must be at least 1",
                    ));
                    continue;
                }
            }
            listeners.push(ListenerConfig {
                name: l.name,
                bind: l.bind,
                framing: l.framing,
                tpdu: l.tpdu,
                dialect: l.dialect,
                max_frame: l.max_frame,
                max_connections: l.max_connections,
                max_per_source: l.max_per_source,
                idle_timeout: ms(l.idle_timeout_ms),
                frame_timeout: ms(l.frame_timeout_ms),
                max_in_flight: l.max_in_flight,
                capture: l.capture.map(&rel),
                capture_pins: l.capture_pins.unwrap_or(crate::capture::PinPolicy::Masked),
            });
        }
        let mut serial = Vec::new();
        let mut lines = HashSet::new();
        for (i, l) in f.serial.into_iter().enumerate() {
            let at = format!("serial[{i}]");
            if !lines.insert(l.name.clone()) {
                {
                    problems.push(invalid(&format!("{at}.name"), "serial line names must be unique"));
                    continue;
                }
            }
            let mut line = match serial_line(l, &at, ms(g.response_deadline_ms), &invalid) {
                Ok(line) => line,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            line.device = rel(line.device);
            line.capture = line.capture.map(&rel);
            serial.push(line);
        }
        let mut terminals = TerminalRegistry::default();
        for (i, t) in f.terminals.into_iter().enumerate() {
            if terminals.terminals.contains_key(&t.id) {
                {
                    problems.push(invalid(&format!("terminal[{i}].id"), "terminal listed twice"));
                    continue;
                }
            }
            let products = if t.products.iter().any(|p| p == "*") {
                None
            } else {
                Some(t.products.into_iter().collect())
            };
            terminals.terminals.insert(
                t.id,
                TerminalEntry {
                    merchant: t.merchant,
                    products,
                },
            );
        }
        let mut products = Vec::new();
        let mut seen = HashSet::new();
        for (i, p) in f.products.into_iter().enumerate() {
            let at = format!("product[{i}]");
            if !seen.insert((p.code.clone(), p.amount)) {
                {
                    problems.push(invalid(&at, "product and amount listed twice"));
                    continue;
                }
            }
            let mode = match p.mode.as_str() {
                "on_demand" | "on-demand" => Mode::OnDemand,
                "prefetch" => {
                    if p.low == 0 || p.high < p.low || p.high > 1_000_000 {
                        {
                            problems.push(invalid(&at, "prefetch needs 1 <= low <= high <= 1000000"));
                            continue;
                        }
                    }
                    Mode::Prefetch {
                        low: p.low,
                        high: p.high,
                    }
                }
                _ => {
                    problems.push(invalid(&format!("{at}.mode"), "`prefetch` or `on_demand`"));
                    continue;
                }
            };
            products.push(ProductConfig {
                code: p.code,
                amount: p.amount,
                mode,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(GatewayConfig {
            journal: rel(g.journal),
            journal_keys,
            response_deadline: ms(g.response_deadline_ms),
            keep_cache_on_shutdown: g.keep_cache_on_shutdown,
            admin: g.admin,
            repeat_window: Duration::from_secs(g.repeat_window_secs),
            repeat_max: g.repeat_max.max(1000),
            lease: Duration::from_secs(g.lease_secs.max(60)),
            refill_cover: Duration::from_secs(g.refill_cover_secs.max(1)),
            refill_lead: Duration::from_secs(g.refill_lead_secs.max(1)),
            protocols: g.protocols.map(rel),
            log: g.log,
            metrics: g.metrics,
            servers: f
                .upstream
                .servers
                .into_iter()
                .map(|s| ServerAddr {
                    addr: s.addr,
                    name: s.name,
                })
                .collect(),
            cert: rel(f.upstream.cert),
            key: rel(f.upstream.key),
            ca: rel(f.upstream.ca),
            upstream,
            listeners,
            serial,
            terminals,
            products,
        })
    }
}
