//! The gateway's configuration file (TOML), validated at load into typed values; nothing reads configuration deeper
//! in. `protocols/gateway.example.toml` is the annotated example.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::admin::AdminAddr;
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

/// The folder a path is in, `.` for a bare file name (whose parent is empty): where a configuration's relative paths
/// start, and where a file named by one must be created.
pub fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A number outside `lo..=hi` is refused with both bounds, never clamped.
fn out_of_range(
    at: &str,
    v: u64,
    lo: u64,
    hi: u64,
    invalid: &dyn Fn(&str, &str) -> ConfigError,
) -> Option<ConfigError> {
    (!(lo..=hi).contains(&v)).then(|| invalid(at, &format!("must be {lo} to {hi}")))
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
    /// Fraud controls (`super::policy`).
    #[serde(default)]
    policy: super::policy::PolicySection,
    /// Network access controllers: a certificate name that speaks for a list of terminal ids.
    #[serde(default, rename = "nac")]
    nacs: Vec<NacSection>,
}

// ---- Origins (issue 20, §2 and §3): TLS listeners, source networks, NACs, callers' numbers -----------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerTlsSection {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_certs: Option<super::origin::ClientCerts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NacSection {
    name: String,
    terminals: Vec<String>,
}

/// A listener's `tls` table, its files checked (the certificate and key read, the client CA's certificates too).
fn listener_tls(
    t: ListenerTlsSection,
    base: &Path,
    at: &str,
    invalid: &dyn Fn(&str, &str) -> ConfigError,
) -> Result<super::origin::ListenerTls, ConfigError> {
    if t.client_certs.is_some() && t.client_ca.is_none() {
        return Err(invalid(
            &format!("{at}.tls.client_certs"),
            "client certificates are verified against client_ca: set it too",
        ));
    }
    let tls = super::origin::ListenerTls {
        cert: t.cert,
        key: t.key,
        client_ca: t.client_ca,
        client_certs: t.client_certs.unwrap_or_default(),
    }
    .relative_to(base);
    tls.server_config()
        .map_err(|e| invalid(&format!("{at}.tls"), &e.to_string()))?;
    Ok(tls)
}

fn d_deadline() -> u64 {
    15_000
}
fn d_window() -> u64 {
    900
}
fn d_forward_retry_max() -> u64 {
    60_000
}
fn d_journal_group() -> u64 {
    1_000
}
fn d_clock_skew() -> u64 {
    60
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
fn d_mac_failures() -> u64 {
    5
}
fn d_mac_failure_window() -> u64 {
    300
}

/// Whether a listener or serial line requires MACs on its terminals' requests (`mac` in its table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacMode {
    /// Requests are not MACed (the default).
    #[default]
    Off,
    /// Every request's MAC is checked with its terminal's key (field 64, or 128 with the secondary bitmap); a bad or
    /// missing one gets `63` and no PIN. Answers carry a MAC by the same key.
    Required,
}

/// How a listener or serial line authenticates its terminals: whether MACs are required, and the algorithm of the
/// terminal group it serves (a terminal whose key is of another algorithm is refused; any when `None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacPolicy {
    pub mode: MacMode,
    pub algorithm: Option<crate::mac::MacAlgorithm>,
}

impl MacPolicy {
    pub fn required(&self) -> bool {
        self.mode == MacMode::Required
    }
}

/// The terminal key file and its key-encrypting key (`terminal_keys_file`, `terminal_kek_file`), opened.
#[derive(Clone, Debug)]
pub struct TerminalKeysConfig {
    pub file: PathBuf,
    pub kek: PathBuf,
    /// Every key still valid when the configuration was read.
    pub keys: Arc<crate::terminal_keys::TerminalKeys>,
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
    admin: Option<String>,
    #[serde(default = "d_window")]
    repeat_window_secs: u64,
    #[serde(default = "d_repeat_max")]
    repeat_max: usize,
    #[serde(default = "d_clock_skew")]
    clock_skew_secs: u64,
    #[serde(default = "d_journal_group")]
    journal_group_us: u64,
    #[serde(default = "d_forward_retry_max")]
    forward_retry_max_ms: u64,
    #[serde(default = "d_lease")]
    lease_secs: u64,
    #[serde(default = "d_cover")]
    refill_cover_secs: u64,
    #[serde(default = "d_lead")]
    refill_lead_secs: u64,
    protocols: Option<PathBuf>,
    log: Option<String>,
    metrics: Option<SocketAddr>,
    /// Terminals' MAC keys, sealed (`pingate terminals key …`), and the key that seals them.
    terminal_keys_file: Option<PathBuf>,
    terminal_kek_file: Option<PathBuf>,
    /// Where terminals locked for bad MACs are kept across restarts (default: beside the journal).
    terminal_locks_file: Option<PathBuf>,
    #[serde(default = "d_mac_failures")]
    mac_failures: u64,
    #[serde(default = "d_mac_failure_window")]
    mac_failure_window_secs: u64,
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
fn d_first_frame_timeout() -> u64 {
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
    #[serde(default = "d_first_frame_timeout")]
    first_frame_timeout_ms: u64,
    #[serde(default = "d_in_flight")]
    max_in_flight: usize,
    capture: Option<PathBuf>,
    capture_pins: Option<crate::traffic::capture::PinPolicy>,
    #[serde(default)]
    mac: MacMode,
    mac_algorithm: Option<crate::mac::MacAlgorithm>,
    /// Source networks (CIDRs) connections are accepted from; empty: any.
    #[serde(default)]
    allow: Vec<String>,
    tls: Option<ListenerTlsSection>,
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
    capture_pins: Option<crate::traffic::capture::PinPolicy>,
    #[serde(default)]
    mac: MacMode,
    mac_algorithm: Option<crate::mac::MacAlgorithm>,
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
    /// Every message each way is appended to this capture file (`src/traffic/capture.rs`), without the link's framing
    /// (connection numbers are calls); off when `None`.
    pub capture: Option<PathBuf>,
    /// What happens to PIN values in captured answers.
    pub capture_pins: crate::traffic::capture::PinPolicy,
    /// Whether its terminals' requests must carry a MAC.
    pub mac: MacPolicy,
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
            capture_pins: crate::traffic::capture::PinPolicy::Masked,
            mac: MacPolicy::default(),
        }
    }
}

/// The MAC policy of a listener's or line's table.
fn mac_policy(
    mode: MacMode,
    algorithm: Option<crate::mac::MacAlgorithm>,
    at: &str,
    invalid: &dyn Fn(&str, &str) -> ConfigError,
) -> Result<MacPolicy, ConfigError> {
    if algorithm.is_some() && mode != MacMode::Required {
        return Err(invalid(
            &format!("{at}.mac_algorithm"),
            "names the algorithm of required MACs: set mac = \"required\" too",
        ));
    }
    Ok(MacPolicy { mode, algorithm })
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
    let mac = mac_policy(l.mac, l.mac_algorithm, at, invalid)?;
    // Timers and counts: zero or tiny values would spin a line or cut every frame; huge ones hold a line for ever.
    for (key, v, lo, hi) in [
        ("max_frame", l.max_frame.map(|v| v as u64), 16, 65_535),
        ("idle_timeout_ms", l.idle_timeout_ms, 100, 600_000),
        ("frame_timeout_ms", l.frame_timeout_ms, 100, 120_000),
        ("ack_timeout_ms", l.ack_timeout_ms, 50, 60_000),
        ("enq_delay_ms", l.enq_delay_ms, 0, 10_000),
        ("enq_interval_ms", l.enq_interval_ms, 50, 60_000),
        ("enq_max", l.enq_max.map(u64::from), 1, 100),
        ("max_naks", l.max_naks.map(u64::from), 1, 10),
        ("max_sends", l.max_sends.map(u64::from), 1, 10),
        ("inter_char_ms", l.inter_char_ms, 5, 10_000),
        ("rings", l.rings.map(u64::from), 1, 20),
        ("init_attempts", l.init_attempts.map(u64::from), 1, 20),
        ("command_timeout_ms", l.command_timeout_ms, 100, 60_000),
        ("connect_timeout_ms", l.connect_timeout_ms, 1_000, 300_000),
        ("guard_time_ms", l.guard_time_ms, 20, 10_000),
        ("dtr_drop_ms", l.dtr_drop_ms, 50, 10_000),
        ("reinit_every_secs", l.reinit_every_secs, 10, 86_400),
        ("modem_retry_secs", l.modem_retry_secs, 1, 3_600),
    ] {
        if let Some(e) = v.and_then(|v| out_of_range(&field(key), v, lo, hi, invalid)) {
            return Err(e);
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
            LineLink::StxEtx(c)
        }
        other if data_bits == 7 && other != "ascii4" => {
            return Err(invalid(
                &field("link"),
                "a binary length header cannot go on a 7-bit line: use `stx-etx` or `ascii4`",
            ))
        }
        other => {
            let framing: Framing = other
                .parse()
                .map_err(|e: String| invalid(&field("link"), &format!("{e}, or `stx-etx`")))?;
            if max_frame > framing.max_len() {
                return Err(invalid(
                    &field("max_frame"),
                    &format!("must be 16 to {} with {}", framing.max_len(), framing.name()),
                ));
            }
            LineLink::Framed(framing)
        }
    };
    let modem = if l.modem {
        let d = ModemConfig::default();
        let answer = match l.answer.as_deref().unwrap_or("host") {
            "host" => AnswerMode::Host {
                rings: l.rings.unwrap_or(1),
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
            init_attempts: l.init_attempts.unwrap_or(d.init_attempts),
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
        capture_pins: l.capture_pins.unwrap_or(crate::traffic::capture::PinPolicy::Masked),
        mac,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminalSection {
    id: String,
    merchant: String,
    #[serde(default = "all_products")]
    products: Vec<String>,
    /// Source networks its requests may come from over TCP.
    #[serde(default)]
    allow: Vec<String>,
    /// Callers' numbers its calls may come from (caller ID).
    #[serde(default)]
    caller_ids: Vec<String>,
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
    /// A new connection's first frame must be complete within this of its accept (idle sockets are cut off).
    pub first_frame_timeout: Duration,
    /// Requests answered concurrently per connection; further frames wait to be read.
    pub max_in_flight: usize,
    /// Every frame each way is appended to this capture file (`src/traffic/capture.rs`); off when `None`.
    pub capture: Option<PathBuf>,
    /// What happens to PIN values in captured answers.
    pub capture_pins: crate::traffic::capture::PinPolicy,
    /// Whether its terminals' requests must carry a MAC.
    pub mac: MacPolicy,
    /// Connections from outside these networks are closed at accept; empty: any.
    pub allow: Vec<ipnet::IpNet>,
    /// TLS, with or without client certificates; `None`: plain TCP.
    pub tls: Option<super::origin::ListenerTls>,
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
            first_frame_timeout: ms(d_first_frame_timeout()),
            max_in_flight: d_in_flight(),
            capture: None,
            capture_pins: crate::traffic::capture::PinPolicy::Masked,
            mac: MacPolicy::default(),
            allow: Vec::new(),
            tls: None,
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
    /// Where terminals may come from: certificates of NACs, source networks, callers' numbers.
    pub origins: super::origin::Origins,
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
    /// `pingate gateway stock` and `lines` ask here: a Unix socket (mode 0600), or a TCP address on loopback.
    pub admin: Option<AdminAddr>,
    pub repeat_window: Duration,
    pub repeat_max: usize,
    /// How far a terminal's clock (field 7) may be from the gateway's for a sale to be served from the cache: a key
    /// whose time is further off, or older than what the repeat window still remembers, may be a key sold before
    /// (a reset terminal, a duplicate beyond the window), so its sale goes to the PIN server, which knows every key.
    pub clock_skew: Duration,
    /// Group commit: the journal syncs at most once per this interval while records keep coming (records that
    /// arrive meanwhile share the next sync); a record arriving after a quiet spell is synced at once.
    pub journal_group: Duration,
    /// Longest wait between two tries of a store-and-forward step (confirms, reversals, releases).
    pub forward_retry_max: Duration,
    pub lease: Duration,
    pub refill_cover: Duration,
    pub refill_lead: Duration,
    pub protocols: Option<PathBuf>,
    /// Log levels (`info`, `warn,pingate::gateway=debug`); `--log-level` and `$RUST_LOG` win.
    pub log: Option<String>,
    /// Prometheus metrics, health and readiness over HTTP (off when `None`; keep it on loopback).
    pub metrics: Option<SocketAddr>,
    /// Terminals' MAC keys (needed when a listener or line requires MACs).
    pub terminal_keys: Option<TerminalKeysConfig>,
    /// A terminal is locked after this many bad or missing MACs within [`GatewayConfig::mac_failure_window`].
    pub mac_failures: u32,
    pub mac_failure_window: Duration,
    /// The terminals locked for bad MACs, kept across restarts (`gateway.terminal_locks_file`; by default the
    /// journal's path with the extension `mac-locks`).
    pub terminal_locks: PathBuf,
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
    /// Fraud controls: the reversal window (`[policy]`).
    pub policy: super::policy::PolicyConfig,
}

impl GatewayConfig {
    /// What is allowed but unwise: the admin socket or the metrics endpoint off loopback (neither authenticates).
    pub fn warnings(&self) -> Vec<String> {
        let admin = match &self.admin {
            Some(AdminAddr::Tcp(a)) => Some(*a),
            _ => None,
        };
        let mut w: Vec<String> = [("gateway.admin", admin), ("gateway.metrics", self.metrics)]
            .into_iter()
            .filter_map(|(key, addr)| addr.and_then(|a| crate::metrics::off_loopback(key, a)))
            .collect();
        if let Some(tk) = &self.terminal_keys {
            let mut keyless: Vec<&str> = self
                .terminals
                .terminals
                .keys()
                .map(String::as_str)
                .filter(|t| tk.keys.signing_key(t).is_none())
                .collect();
            if !keyless.is_empty() {
                keyless.sort_unstable();
                w.push(format!(
                    "gateway.terminal_keys_file: no MAC key for terminal{} {}: {} requests get 63 where MACs are \
                     required",
                    if keyless.len() == 1 { "" } else { "s" },
                    keyless.join(", "),
                    if keyless.len() == 1 { "its" } else { "their" }
                ));
            }
        }
        w
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
        let base = folder_of(path);
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let invalid = |at: &str, reason: &str| ConfigError::Invalid {
            path: path.into(),
            at: at.into(),
            reason: reason.into(),
        };
        let g = f.gateway;
        // Every duration and count has a range (protocols/gateway.example.toml): out of it is refused, never
        // clamped, so that what runs is what the file says.
        let range = |at: &str, v: u64, lo: u64, hi: u64| out_of_range(at, v, lo, hi, &invalid);
        let mut bounded = true;
        for (at, v, lo, hi) in [
            ("gateway.response_deadline_ms", g.response_deadline_ms, 100, 120_000),
            ("gateway.repeat_window_secs", g.repeat_window_secs, 1, 86_400),
            ("gateway.repeat_max", g.repeat_max as u64, 1_000, 10_000_000),
            ("gateway.lease_secs", g.lease_secs, 60, 86_400),
            ("gateway.refill_cover_secs", g.refill_cover_secs, 1, 3_600),
            ("gateway.refill_lead_secs", g.refill_lead_secs, 1, 600),
        ] {
            if let Some(e) = range(at, v, lo, hi) {
                problems.push(e);
                bounded = false;
            }
        }
        if bounded {
            // A sale in progress stays in the window until answered only if the window outlasts the deadline;
            // dropped earlier, its duplicate would start a second sale.
            if g.repeat_window_secs * 1000 < g.response_deadline_ms {
                problems.push(invalid(
                    "gateway.repeat_window_secs",
                    &format!(
                        "must be at least the response deadline ({} s)",
                        g.response_deadline_ms.div_ceil(1000)
                    ),
                ));
            }
            // Due under rate x lead but filled to rate x cover: a lead past the cover would refill without end.
            if g.refill_lead_secs > g.refill_cover_secs {
                problems.push(invalid(
                    "gateway.refill_lead_secs",
                    &format!("must not be more than refill_cover_secs ({})", g.refill_cover_secs),
                ));
            }
        }
        if let Some(e) = range("gateway.clock_skew_secs", g.clock_skew_secs, 0, 86_400) {
            problems.push(e);
        }
        if let Some(e) = range("gateway.journal_group_us", g.journal_group_us, 0, 100_000) {
            problems.push(e);
        }
        if let Some(e) = range("gateway.forward_retry_max_ms", g.forward_retry_max_ms, 200, 600_000) {
            problems.push(e);
        }
        if f.upstream.servers.is_empty() {
            problems.push(invalid("upstream.servers", "at least one PIN server is needed"));
        }
        let admin = match g.admin.as_deref().map(|a| AdminAddr::parse(a, base)) {
            Some(Err(e)) => {
                problems.push(invalid("gateway.admin", &e));
                None
            }
            Some(Ok(a)) => Some(a),
            None => None,
        };
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
        for (at, v, lo, hi) in [
            ("upstream.connections", u.connections.map(|v| v as u64), 1, 64),
            ("upstream.connect_timeout_ms", u.connect_timeout_ms, 100, 60_000),
            // Under the PIN server's idle timeout (300 s by default), or idle connections are closed by it.
            ("upstream.ping_every_ms", u.ping_every_ms, 100, 120_000),
            ("upstream.breaker_failures", u.breaker_failures.map(u64::from), 1, 100),
            ("upstream.breaker_cooldown_ms", u.breaker_cooldown_ms, 100, 600_000),
        ] {
            problems.extend(v.and_then(|v| range(at, v, lo, hi)));
        }
        if let Some(c) = u.connections {
            upstream.connections = c;
        }
        if let Some(v) = u.connect_timeout_ms {
            upstream.connect_timeout = ms(v);
        }
        if let Some(v) = u.ping_every_ms {
            upstream.ping_every = ms(v);
        }
        if let Some(v) = u.breaker_failures {
            upstream.breaker_failures = v;
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
            let before = problems.len();
            // Up to what the framing's length header can express.
            let frame_max = l.framing.max_len() as u64;
            if !(16..=frame_max).contains(&(l.max_frame as u64)) {
                let with = if frame_max < 65_535 {
                    format!(" with {}", l.framing.name())
                } else {
                    String::new()
                };
                problems.push(invalid(
                    &format!("{at}.max_frame"),
                    &format!("must be 16 to {frame_max}{with}"),
                ));
            }
            for (key, v, lo, hi) in [
                ("max_connections", l.max_connections as u64, 1, 1_000_000),
                ("max_per_source", l.max_per_source as u64, 1, 1_000_000),
                ("idle_timeout_ms", l.idle_timeout_ms, 1_000, 86_400_000),
                ("frame_timeout_ms", l.frame_timeout_ms, 100, 120_000),
                ("max_in_flight", l.max_in_flight as u64, 1, 1_024),
            ] {
                problems.extend(range(&format!("{at}.{key}"), v, lo, hi));
            }
            if problems.len() > before {
                continue;
            }
            if l.first_frame_timeout_ms < 100 {
                problems.push(invalid(&format!("{at}.first_frame_timeout_ms"), "must be at least 100"));
                continue;
            }
            let mac = match mac_policy(l.mac, l.mac_algorithm, &at, &invalid) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            let allow = match super::origin::parse_nets(&l.allow) {
                Ok(a) => a,
                Err(e) => {
                    problems.push(invalid(&format!("{at}.allow"), &e));
                    continue;
                }
            };
            let tls = match l.tls.map(|t| listener_tls(t, base, &at, &invalid)).transpose() {
                Ok(t) => t,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
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
                first_frame_timeout: ms(l.first_frame_timeout_ms),
                max_in_flight: l.max_in_flight,
                capture: l.capture.map(&rel),
                capture_pins: l.capture_pins.unwrap_or(crate::traffic::capture::PinPolicy::Masked),
                mac,
                allow,
                tls,
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
            match super::origin::parse_nets(&t.allow) {
                Ok(allow) if !allow.is_empty() || !t.caller_ids.is_empty() => {
                    let binding = super::origin::Binding {
                        allow,
                        caller_ids: t.caller_ids.clone(),
                    };
                    terminals.origins.bindings.insert(t.id.clone(), binding);
                }
                Ok(_) => {}
                Err(e) => problems.push(invalid(&format!("terminal[{i}].allow"), &e)),
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
        for (i, n) in f.nacs.into_iter().enumerate() {
            let at = format!("nac[{i}]");
            if terminals.origins.nacs.contains_key(&n.name) {
                problems.push(invalid(&format!("{at}.name"), "NAC listed twice"));
            } else if terminals.terminals.contains_key(&n.name) {
                problems.push(invalid(
                    &format!("{at}.name"),
                    "a terminal has this id: a NAC needs a name of its own",
                ));
            } else if let Some(t) = n.terminals.iter().find(|t| !terminals.terminals.contains_key(*t)) {
                problems.push(invalid(
                    &format!("{at}.terminals"),
                    &format!("`{t}` is not a [[terminal]]"),
                ));
            } else {
                terminals.origins.nacs.insert(n.name, n.terminals.into_iter().collect());
            }
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
        for (at, v, lo, hi) in [
            ("gateway.mac_failures", g.mac_failures, 1, 1_000),
            (
                "gateway.mac_failure_window_secs",
                g.mac_failure_window_secs,
                10,
                604_800,
            ),
        ] {
            problems.extend(range(at, v, lo, hi));
        }
        let macs_required = listeners
            .iter()
            .map(|l| (&l.name, l.mac))
            .chain(serial.iter().map(|l| (&l.name, l.mac)));
        let requiring: Vec<&String> = macs_required.filter(|(_, m)| m.required()).map(|(n, _)| n).collect();
        let terminal_keys = match (&g.terminal_keys_file, &g.terminal_kek_file) {
            (Some(file), Some(kek)) => {
                let (file, kek) = (rel(file.clone()), rel(kek.clone()));
                let opened = crate::terminal_keys::load_kek(&kek)
                    .map_err(|e| invalid("gateway.terminal_kek_file", &e.to_string()))
                    .and_then(|kek| {
                        crate::terminal_keys::TerminalKeyFile::load(&file)
                            .and_then(|f| f.open(&kek, crate::clock::unix_now()))
                            .map_err(|e| invalid("gateway.terminal_keys_file", &e.to_string()))
                    });
                match opened {
                    Ok(keys) => Some(TerminalKeysConfig {
                        file,
                        kek,
                        keys: Arc::new(keys),
                    }),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            }
            (None, None) => {
                if let Some(name) = requiring.first() {
                    problems.push(invalid(
                        "gateway.terminal_keys_file",
                        &format!(
                            "`{name}` requires MACs: name the terminal key file and its key-encrypting key \
                             (terminal_keys_file, terminal_kek_file)"
                        ),
                    ));
                }
                None
            }
            (Some(_), None) => {
                problems.push(invalid(
                    "gateway.terminal_kek_file",
                    "the terminal key file needs its KEK",
                ));
                None
            }
            (None, Some(_)) => {
                problems.push(invalid(
                    "gateway.terminal_keys_file",
                    "a KEK without a terminal key file",
                ));
                None
            }
        };
        let policy = f.policy.read().unwrap_or_else(|e| {
            problems.extend(e.iter().map(|(at, reason)| invalid(at, reason)));
            Default::default()
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        let terminal_locks = match g.terminal_locks_file {
            Some(p) => rel(p),
            None => rel(g.journal.with_extension("mac-locks")),
        };
        Ok(GatewayConfig {
            journal: rel(g.journal),
            journal_keys,
            response_deadline: ms(g.response_deadline_ms),
            keep_cache_on_shutdown: g.keep_cache_on_shutdown,
            admin,
            repeat_window: Duration::from_secs(g.repeat_window_secs),
            repeat_max: g.repeat_max,
            clock_skew: Duration::from_secs(g.clock_skew_secs),
            journal_group: Duration::from_micros(g.journal_group_us),
            forward_retry_max: Duration::from_millis(g.forward_retry_max_ms),
            lease: Duration::from_secs(g.lease_secs),
            refill_cover: Duration::from_secs(g.refill_cover_secs),
            refill_lead: Duration::from_secs(g.refill_lead_secs),
            protocols: g.protocols.map(rel),
            log: g.log,
            metrics: g.metrics,
            terminal_keys,
            mac_failures: g.mac_failures as u32,
            mac_failure_window: Duration::from_secs(g.mac_failure_window_secs),
            terminal_locks,
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
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with one listener and one modem line, each table with `extra` lines added.
    fn text(gateway: &str, upstream: &str, listener: &str, serial: &str) -> String {
        format!(
            "[gateway]\njournal = \"gw.journal\"\n{gateway}\n\
             [upstream]\nservers = [{{ addr = \"127.0.0.1:7443\", name = \"localhost\" }}]\n\
             cert = \"c.pem\"\nkey = \"c.key\"\nca = \"ca.pem\"\n{upstream}\n\
             [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nframing = \"binary2\"\ndialect = \"iso87-ascii\"\n\
             {listener}\n\
             [[serial]]\nname = \"m1\"\ndevice = \"/dev/null\"\ndialect = \"iso87-bcd\"\nmodem = true\n{serial}\n"
        )
    }

    fn problems(text: &str) -> Vec<String> {
        match GatewayConfig::check(text, Path::new("gateway.toml")) {
            Ok(_) => Vec::new(),
            Err(all) => all.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// Every duration and count, by table: (table, key, lowest allowed, highest allowed, other keys of the table
    /// that the bounds need: keys bounded by others are tested at their bounds with those set to fit).
    const RANGES: &[(&str, &str, u64, u64, &str)] = &[
        ("gateway", "response_deadline_ms", 100, 120_000, ""),
        (
            "gateway",
            "repeat_window_secs",
            1,
            86_400,
            "response_deadline_ms = 1000",
        ),
        ("gateway", "repeat_max", 1_000, 10_000_000, ""),
        ("gateway", "lease_secs", 60, 86_400, ""),
        ("gateway", "refill_cover_secs", 1, 3_600, "refill_lead_secs = 1"),
        ("gateway", "refill_lead_secs", 1, 600, "refill_cover_secs = 3600"),
        ("gateway", "mac_failures", 1, 1_000, ""),
        ("gateway", "mac_failure_window_secs", 10, 604_800, ""),
        ("upstream", "connections", 1, 64, ""),
        ("upstream", "connect_timeout_ms", 100, 60_000, ""),
        ("upstream", "ping_every_ms", 100, 120_000, ""),
        ("upstream", "breaker_failures", 1, 100, ""),
        ("upstream", "breaker_cooldown_ms", 100, 600_000, ""),
        ("listener", "max_frame", 16, 65_535, ""),
        ("listener", "max_connections", 1, 1_000_000, ""),
        ("listener", "max_per_source", 1, 1_000_000, ""),
        ("listener", "idle_timeout_ms", 1_000, 86_400_000, ""),
        ("listener", "frame_timeout_ms", 100, 120_000, ""),
        ("listener", "max_in_flight", 1, 1_024, ""),
        ("serial", "max_frame", 16, 65_535, ""),
        ("serial", "idle_timeout_ms", 100, 600_000, ""),
        ("serial", "frame_timeout_ms", 100, 120_000, ""),
        ("serial", "ack_timeout_ms", 50, 60_000, ""),
        ("serial", "enq_delay_ms", 0, 10_000, ""),
        ("serial", "enq_interval_ms", 50, 60_000, ""),
        ("serial", "enq_max", 1, 100, ""),
        ("serial", "max_naks", 1, 10, ""),
        ("serial", "max_sends", 1, 10, ""),
        ("serial", "inter_char_ms", 5, 10_000, ""),
        ("serial", "rings", 1, 20, ""),
        ("serial", "init_attempts", 1, 20, ""),
        ("serial", "command_timeout_ms", 100, 60_000, ""),
        ("serial", "connect_timeout_ms", 1_000, 300_000, ""),
        ("serial", "guard_time_ms", 20, 10_000, ""),
        ("serial", "dtr_drop_ms", 50, 10_000, ""),
        ("serial", "reinit_every_secs", 10, 86_400, ""),
        ("serial", "modem_retry_secs", 1, 3_600, ""),
    ];

    fn with(table: &str, line: &str) -> String {
        let pick = |t: &str| if t == table { line } else { "" };
        text(pick("gateway"), pick("upstream"), pick("listener"), pick("serial"))
    }

    #[test]
    fn every_duration_and_count_is_refused_out_of_its_range_and_named_with_it() {
        assert_eq!(problems(&text("", "", "", "")), Vec::<String>::new());
        for &(table, key, lo, hi, context) in RANGES {
            let at = match table {
                "listener" => format!("listener[0].{key}"),
                "serial" => format!("serial[0].{key}"),
                t => format!("{t}.{key}"),
            };
            // The bounds themselves are allowed.
            for v in [lo, hi] {
                let p = problems(&with(table, &format!("{key} = {v}\n{context}")));
                assert!(p.is_empty(), "{at} = {v}: {p:?}");
            }
            let below = lo.checked_sub(1).map(|v| v.to_string());
            for v in below.into_iter().chain([(hi + 1).to_string()]) {
                let p = problems(&with(table, &format!("{key} = {v}")));
                let want = format!("gateway.toml: {at}: must be {lo} to {hi}");
                assert!(p.iter().any(|e| e == &want), "{at} = {v}: {p:?}, want {want}");
            }
        }
    }

    #[test]
    fn a_zero_window_or_timeout_is_refused_not_raised() {
        for (table, line, at) in [
            ("gateway", "repeat_window_secs = 0", "gateway.repeat_window_secs"),
            ("gateway", "repeat_max = 10", "gateway.repeat_max"),
            ("gateway", "lease_secs = 5", "gateway.lease_secs"),
            ("upstream", "ping_every_ms = 0", "upstream.ping_every_ms"),
            ("upstream", "breaker_failures = 0", "upstream.breaker_failures"),
            ("listener", "idle_timeout_ms = 0", "listener[0].idle_timeout_ms"),
            ("serial", "rings = 0", "serial[0].rings"),
        ] {
            let p = problems(&with(table, line));
            assert!(p.iter().any(|e| e.contains(at)), "{line}: {p:?}");
        }
    }

    #[test]
    fn keys_bounded_by_other_keys_say_by_which() {
        // A sale still in progress must stay in the repeat window until it is answered.
        let p = problems(&with(
            "gateway",
            "response_deadline_ms = 30000\nrepeat_window_secs = 29",
        ));
        assert_eq!(
            p,
            ["gateway.toml: gateway.repeat_window_secs: must be at least the response deadline (30 s)"]
        );
        assert!(problems(&with(
            "gateway",
            "response_deadline_ms = 30000\nrepeat_window_secs = 30"
        ))
        .is_empty());
        let p = problems(&with("gateway", "refill_cover_secs = 10\nrefill_lead_secs = 11"));
        assert_eq!(
            p,
            ["gateway.toml: gateway.refill_lead_secs: must not be more than refill_cover_secs (10)"]
        );
        // A frame cap the framing's length header cannot express is refused, not lowered.
        let ascii4 = |max: &str| {
            text("", "", &format!("max_frame = {max}"), "").replace("framing = \"binary2\"", "framing = \"ascii4\"")
        };
        let p = problems(&ascii4("10000"));
        assert!(
            p.iter()
                .any(|e| e.contains("listener[0].max_frame: must be 16 to 9999 with ascii4")),
            "{p:?}"
        );
        assert!(problems(&ascii4("9999")).is_empty());
    }

    #[test]
    fn macs_required_need_the_terminal_key_file_and_its_kek() {
        use crate::mac::{MacAlgorithm, MacKey};
        use crate::terminal_keys::{load_kek, TerminalKeyFile};
        let p = problems(&with("listener", "mac = \"required\""));
        assert_eq!(
            p,
            [
                "gateway.toml: gateway.terminal_keys_file: `tcp` requires MACs: name the terminal key file and its \
              key-encrypting key (terminal_keys_file, terminal_kek_file)"
            ]
        );
        let p = problems(&with("serial", "mac_algorithm = \"retail-des\""));
        assert_eq!(
            p,
            [
                "gateway.toml: serial[0].mac_algorithm: names the algorithm of required MACs: set mac = \"required\" \
              too"
            ]
        );
        assert!(problems(&with("serial", "mac = \"sometimes\"")).len() == 1);
        let p = problems(&with("gateway", "terminal_keys_file = \"k.toml\""));
        assert_eq!(
            p,
            ["gateway.toml: gateway.terminal_kek_file: the terminal key file needs its KEK"]
        );

        // With the files: the keys are opened at load, and terminals without one are warned about.
        let dir = std::env::temp_dir().join(format!("pingate-config-mac-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        crate::tls::write_new_key(&dir.join("kek")).unwrap();
        let kek = load_kek(&dir.join("kek")).unwrap();
        let mut file = TerminalKeyFile::default();
        let key = MacKey::generate(MacAlgorithm::AesCmac).unwrap();
        file.add(&kek, "TERM0001", &key, crate::clock::unix_now(), None)
            .unwrap();
        file.save(&dir.join("keys.toml")).unwrap();
        let text = with(
            "gateway",
            "terminal_keys_file = \"keys.toml\"\nterminal_kek_file = \"kek\"\nmac_failures = 3",
        )
        .replace("modem = true\n", "modem = true\nmac = \"required\"\nmac_algorithm = \"aes-cmac\"\n")
            + "[[terminal]]\nid = \"TERM0001\"\nmerchant = \"M1\"\n[[terminal]]\nid = \"TERM0002\"\nmerchant = \"M1\"\n";
        let c = GatewayConfig::parse(&text, &dir.join("gateway.toml")).unwrap();
        assert_eq!(c.mac_failures, 3);
        assert_eq!(
            c.terminal_locks,
            dir.join("gw.mac-locks"),
            "beside the journal by default"
        );
        assert!(!c.listeners[0].mac.required());
        assert_eq!(
            c.serial[0].mac,
            MacPolicy {
                mode: MacMode::Required,
                algorithm: Some(MacAlgorithm::AesCmac)
            }
        );
        let keys = &c.terminal_keys.as_ref().unwrap().keys;
        assert_eq!(keys.signing_key("TERM0001").unwrap().key, key);
        assert!(!format!("{c:?}").contains(&crate::iso8583::to_hex(&key.expose()[..4])));
        let w = c.warnings();
        assert!(
            w.iter().any(|w| w.contains("no MAC key for terminal TERM0002")),
            "{w:?}"
        );
        // Another KEK: the file does not open, and the problem names the key.
        crate::tls::write_new_key(&dir.join("kek2")).unwrap();
        let e = GatewayConfig::parse(
            &text.replace("terminal_kek_file = \"kek\"", "terminal_kek_file = \"kek2\""),
            &dir.join("gateway.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("gateway.terminal_keys_file: terminal TERM0001 key 1: does not open"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn origins_allow_lists_nacs_callers_and_tls_are_checked_and_named() {
        let terminals = "\n[[terminal]]\nid = \"T1\"\nmerchant = \"M\"\nallow = [\"10.0.0.0/8\", \"2001:db8::1\"]\n\
                         caller_ids = [\"5551234\"]\n\n[[terminal]]\nid = \"T2\"\nmerchant = \"M\"\n\n\
                         [[nac]]\nname = \"nac-1\"\nterminals = [\"T1\", \"T2\"]\n";
        let c = GatewayConfig::parse(
            &text("", "", "allow = [\"127.0.0.0/8\", \"::1\"]", terminals),
            Path::new("gateway.toml"),
        )
        .unwrap();
        assert_eq!(c.listeners[0].allow.len(), 2);
        assert!(c.listeners[0].tls.is_none());
        let b = &c.terminals.origins.bindings["T1"];
        assert_eq!((b.allow.len(), b.caller_ids.clone()), (2, vec!["5551234".to_string()]));
        assert!(!c.terminals.origins.bindings.contains_key("T2"));
        assert_eq!(c.terminals.origins.nacs["nac-1"].len(), 2);

        let p = problems(&text("", "", "allow = [\"10.0.0.0/33\"]", ""));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("gateway.toml: listener[0].allow: `10.0.0.0/33`"),
            "{p:?}"
        );
        let p = problems(&text("", "", "", &terminals.replace("\"T2\"]", "\"T9\"]")));
        assert_eq!(p, ["gateway.toml: nac[0].terminals: `T9` is not a [[terminal]]"]);
        let p = problems(&text("", "", "", &terminals.replace("nac-1", "T2")));
        assert_eq!(
            p,
            ["gateway.toml: nac[0].name: a terminal has this id: a NAC needs a name of its own"]
        );
        let p = problems(&text(
            "",
            "",
            "tls = { cert = \"l.pem\", key = \"l.key\", client_certs = \"optional\" }",
            "",
        ));
        assert_eq!(
            p,
            ["gateway.toml: listener[0].tls.client_certs: client certificates are verified against client_ca: set it too"]
        );
        // Files that are not there are named.
        let p = problems(&text(
            "",
            "",
            "tls = { cert = \"nowhere.pem\", key = \"nowhere.key\" }",
            "",
        ));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("gateway.toml: listener[0].tls: ") && p[0].contains("nowhere.pem"),
            "{p:?}"
        );
    }
}
