//! Capture files: terminal-side traffic as a line-oriented text file a person can read and edit. Written by the
//! gateway (opt-in per listener), by `pingate-replay import` from pcap files, and read by `pingate replay`.
//!
//! ```text
//! # pingate capture: one frame per line, `seconds connection direction hex`
//! #! framing=binary2 tpdu=false dialect=iso87-ascii-binbitmap pins=masked
//! 0.000000 1 T 02003020...
//! 0.001873 1 H 02103020...
//! ```
//!
//! - `#!` lines carry settings (`key=value`, space separated): `framing` and `tpdu` (how the frames were carried),
//!   `dialect`, `pins` (`masked`: PIN values replaced by `*`, `omitted`: field 63 left out, `clear`: as sent; in an
//!   import of another host's traffic, the places `--pin-at` names, or its whole field 63: [`protect_answer`]).
//!   Other `#` lines are comments.
//! - Each frame: seconds since the capture started (decimal), the connection number, `T` (from the terminal) or `H`
//!   (from the host, i.e. the gateway), and the frame's content in hex: the TPDU if any, then the message, without
//!   the length header (the framing is a setting, so a capture can be replayed on any framing). An empty frame (a
//!   keep-alive) is `-`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::iso8583::{from_hex, to_hex, Dialect, Message};
use crate::link::framing::Framing;
use crate::sale::PinReceipt;

/// Errors reading a capture file.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A line that is not a frame, a setting or a comment; `line` counts from 1.
    #[error("capture line {line}: {reason}")]
    Line { line: usize, reason: String },
    /// A setting that is missing or wrong.
    #[error("capture setting `{key}`: {reason}")]
    Setting { key: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Who sent a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The terminal (a request).
    Terminal,
    /// The host: the gateway (an answer).
    Host,
}

/// What happened to PIN values in the captured answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinPolicy {
    /// Each PIN's characters replaced by `*` (the message keeps its length and layout).
    Masked,
    /// Field 63 left out of the answer.
    Omitted,
    /// As sent (only for test traffic).
    Clear,
}

impl PinPolicy {
    fn name(self) -> &'static str {
        match self {
            PinPolicy::Masked => "masked",
            PinPolicy::Omitted => "omitted",
            PinPolicy::Clear => "clear",
        }
    }
}

/// One captured frame. Its `Debug` shows the length of the data, not the data (a `clear` capture holds PINs).
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub at: Duration,
    pub conn: u64,
    pub dir: Direction,
    /// TPDU (if the capture has one) and message.
    pub data: Bytes,
    /// The line in the file (1-based), for messages.
    pub line: usize,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("at", &self.at)
            .field("conn", &self.conn)
            .field("dir", &self.dir)
            .field("bytes", &self.data.len())
            .field("line", &self.line)
            .finish()
    }
}

/// A whole capture.
#[derive(Clone, Debug)]
pub struct Capture {
    pub framing: Framing,
    pub tpdu: bool,
    pub dialect: String,
    pub pins: PinPolicy,
    /// Settings this version does not use, kept.
    pub other: BTreeMap<String, String>,
    pub records: Vec<Record>,
}

/// Capture hex: the codec's, with the column of a bad digit for the person editing the file.
fn unhex(s: &str) -> Result<Vec<u8>, String> {
    from_hex(s).map_err(|i| {
        if i >= s.len() {
            "odd number of hex digits".to_string()
        } else {
            format!("column {} is not a hex digit", i + 1)
        }
    })
}

impl Capture {
    pub fn new(framing: Framing, tpdu: bool, dialect: &str, pins: PinPolicy) -> Capture {
        Capture {
            framing,
            tpdu,
            dialect: dialect.into(),
            pins,
            other: BTreeMap::new(),
            records: Vec::new(),
        }
    }

    /// The settings line.
    pub fn settings_line(&self) -> String {
        let mut s = format!(
            "#! framing={} tpdu={} dialect={} pins={}",
            self.framing.name(),
            self.tpdu,
            self.dialect,
            self.pins.name()
        );
        for (k, v) in &self.other {
            let _ = write!(s, " {k}={v}");
        }
        s
    }

    pub fn load(path: &Path) -> Result<Capture, CaptureError> {
        Capture::parse(&std::fs::read_to_string(path)?)
    }

    pub fn parse(text: &str) -> Result<Capture, CaptureError> {
        let mut settings: BTreeMap<String, String> = BTreeMap::new();
        let mut records: Vec<Record> = Vec::new();
        // After a `#! restart` (the gateway started again, appending): connection numbers and times continue from
        // where the previous session ended, and the settings must be the same.
        let (mut conn_offset, mut time_offset) = (0u64, Duration::ZERO);
        let mut restarted = false;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            let bad = |reason: String| CaptureError::Line { line, reason };
            if let Some(rest) = l.strip_prefix("#!") {
                if rest.trim() == "restart" {
                    conn_offset = records.iter().map(|r| r.conn).max().unwrap_or(0);
                    time_offset = records.last().map_or(Duration::ZERO, |r| r.at);
                    restarted = true;
                    continue;
                }
                for kv in rest.split_whitespace() {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| bad(format!("setting `{kv}` is not key=value")))?;
                    if let Some(old) = settings.insert(k.into(), v.into()) {
                        if old != v && restarted {
                            return Err(bad(format!(
                                "setting `{k}` changes from `{old}` to `{v}` at a restart: split the file there"
                            )));
                        }
                    }
                }
                continue;
            }
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = l.split_whitespace().collect();
            if parts.len() != 4 {
                return Err(bad(format!(
                    "expected `seconds connection T|H hex`, found {} words",
                    parts.len()
                )));
            }
            // At most a year into a capture: anything later is a mistake, and keeps time arithmetic safe.
            let at = parts[0]
                .parse::<f64>()
                .ok()
                .filter(|s| *s <= 366.0 * 86_400.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| bad(format!("time `{}` is not a number of seconds", parts[0])))?;
            let conn: u64 = parts[1]
                .parse()
                .map_err(|_| bad(format!("connection `{}` is not a number", parts[1])))?;
            let dir = match parts[2] {
                "T" => Direction::Terminal,
                "H" => Direction::Host,
                d => return Err(bad(format!("direction `{d}` is neither T nor H"))),
            };
            let data = if parts[3] == "-" {
                Vec::new()
            } else {
                unhex(parts[3]).map_err(bad)?
            };
            records.push(Record {
                at: time_offset.saturating_add(at),
                conn: conn.saturating_add(conn_offset),
                dir,
                data: Bytes::from(data),
                line,
            });
        }
        let take = |settings: &mut BTreeMap<String, String>, key: &str| {
            settings.remove(key).ok_or_else(|| CaptureError::Setting {
                key: key.into(),
                reason: "missing (a `#!` line names it)".into(),
            })
        };
        let framing_s = take(&mut settings, "framing")?;
        let framing = framing_s.parse::<Framing>().map_err(|reason| CaptureError::Setting {
            key: "framing".into(),
            reason,
        })?;
        let tpdu = match settings.remove("tpdu").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(CaptureError::Setting {
                    key: "tpdu".into(),
                    reason: format!("`{v}` is neither true nor false"),
                })
            }
        };
        let dialect = take(&mut settings, "dialect")?;
        let pins = match settings.remove("pins").as_deref() {
            None | Some("masked") => PinPolicy::Masked,
            Some("omitted") => PinPolicy::Omitted,
            Some("clear") => PinPolicy::Clear,
            Some(v) => {
                return Err(CaptureError::Setting {
                    key: "pins".into(),
                    reason: format!("`{v}`: masked, omitted or clear"),
                })
            }
        };
        Ok(Capture {
            framing,
            tpdu,
            dialect,
            pins,
            other: settings,
            records,
        })
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut s = String::from(
            "# pingate capture: one frame per line, `seconds connection T|H hex` (T: terminal, H: host)\n",
        );
        s.push_str(&self.settings_line());
        s.push('\n');
        for r in &self.records {
            s.push_str(&record_line(r.at, r.conn, r.dir, &r.data));
        }
        s
    }
}

fn record_line(at: Duration, conn: u64, dir: Direction, data: &[u8]) -> String {
    format!(
        "{:.6} {conn} {} {}\n",
        at.as_secs_f64(),
        if dir == Direction::Terminal { "T" } else { "H" },
        if data.is_empty() { "-".to_string() } else { to_hex(data) }
    )
}

/// Where a host that is not pingate puts the PINs of its answers (`pingate-replay import --pin-at`).
///
/// Written `FIELD` (the whole field), `FIELD:TAG` (the value of every element `TAG` of the field, read in
/// pingate's field-63 TLV form: a 2-character ASCII tag, the value's length in 3 ASCII digits, the value; see
/// `protocols/pin-sale-messages.md`) or `FIELD@OFFSET+LEN` (`LEN` bytes of the field's value from `OFFSET`, counted
/// from 0 in the value as decoded: characters for text and numeric fields, bytes for binary ones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinLocation {
    Field(u8),
    Tag { field: u8, tag: [u8; 2] },
    Span { field: u8, offset: usize, len: usize },
}

impl PinLocation {
    /// The field it is in.
    pub fn field(&self) -> u8 {
        match self {
            PinLocation::Field(f) | PinLocation::Tag { field: f, .. } | PinLocation::Span { field: f, .. } => *f,
        }
    }
}

impl std::fmt::Display for PinLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinLocation::Field(n) => write!(f, "{n}"),
            PinLocation::Tag { field, tag } => write!(f, "{field}:{}", String::from_utf8_lossy(tag)),
            PinLocation::Span { field, offset, len } => write!(f, "{field}@{offset}+{len}"),
        }
    }
}

impl std::str::FromStr for PinLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<PinLocation, String> {
        let field_of = |t: &str| -> Result<u8, String> {
            t.parse::<u8>()
                .ok()
                .filter(|n| (2..=128).contains(n))
                .ok_or_else(|| format!("`{s}`: `{t}` is not a field number (2-128)"))
        };
        if let Some((field, tag)) = s.split_once(':') {
            let field = field_of(field)?;
            let tag: [u8; 2] = tag
                .as_bytes()
                .try_into()
                .ok()
                .filter(|t: &[u8; 2]| t.iter().all(u8::is_ascii_graphic))
                .ok_or_else(|| format!("`{s}`: a tag is 2 printable ASCII characters (pingate's field-63 TLV form)"))?;
            Ok(PinLocation::Tag { field, tag })
        } else if let Some((field, span)) = s.split_once('@') {
            let field = field_of(field)?;
            let (offset, len) = span
                .split_once('+')
                .and_then(|(o, l)| Some((o.parse::<usize>().ok()?, l.parse::<usize>().ok()?)))
                .filter(|(_, l)| *l > 0)
                .ok_or_else(|| format!("`{s}`: FIELD@OFFSET+LEN with LEN at least 1, e.g. 62@10+16"))?;
            Ok(PinLocation::Span { field, offset, len })
        } else {
            Ok(PinLocation::Field(field_of(s)?))
        }
    }
}

/// Something done to an answer's PIN data that a person should know (reported once per kind, with a count).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinNote {
    /// Field 63 is not pingate's receipt layout and no `--pin-at` was given: masked whole (or omitted).
    NotReceipt { field: u8 },
    /// A `--pin-at` place is not in a field that is present (no such tag, the field shorter than the span, a TLV
    /// that does not parse): that whole field was masked.
    PlaceMissing { place: PinLocation, why: String },
}

/// Why an answer was left out of a capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It does not decode in the dialect, so it cannot be checked for PINs.
    DoesNotDecode(String),
    /// Masked, it no longer encodes (a field whose class takes neither `*` nor `0`).
    DoesNotEncode(String),
    /// A PIN found at its place is still somewhere else in the message.
    PinElsewhere { field: u8 },
}

/// An answer with its PINs treated.
#[derive(Clone, Debug)]
pub struct Protected {
    pub data: Bytes,
    pub notes: Vec<PinNote>,
}

/// The character a masked byte of field `n` becomes: `*`, as pingate masks its own PINs, or `0` where the field's
/// class does not take `*` (numeric, alphanumeric, track fields), so the answer still encodes with its length.
fn mask_char(dialect: &Dialect, n: u8) -> u8 {
    match dialect.field(n) {
        Some(spec) if !spec.class.allows(b'*') => b'0',
        _ => b'*',
    }
}

/// An element of a value in pingate's field-63 TLV form: its tag and where its value is.
type TlvElement = ([u8; 2], std::ops::Range<usize>);

/// The elements of a value in pingate's field-63 TLV form.
fn tlv_elements(data: &[u8]) -> Result<Vec<TlvElement>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let head = data.get(i..i + 5).ok_or_else(|| {
            format!(
                "TLV element header at offset {i} needs 5 bytes, {} remain",
                data.len() - i
            )
        })?;
        if !head[2..].iter().all(u8::is_ascii_digit) {
            return Err(format!("TLV length at offset {} is not 3 digits", i + 2));
        }
        let len = head[2..].iter().fold(0usize, |a, d| a * 10 + usize::from(d - b'0'));
        if data.len() - i - 5 < len {
            return Err(format!(
                "TLV element at offset {i} announces {len} bytes, {} remain",
                data.len() - i - 5
            ));
        }
        out.push(([head[0], head[1]], i + 5..i + 5 + len));
        i += 5 + len;
    }
    Ok(out)
}

/// Replaces every other occurrence of `pin` in `value` (a receipt line that prints it, say) with `c`.
fn mask_occurrences(value: &mut [u8], pin: &[u8], c: u8) {
    if pin.is_empty() {
        return;
    }
    let mut i = 0;
    while i + pin.len() <= value.len() {
        if &value[i..i + pin.len()] == pin {
            value[i..i + pin.len()].fill(c);
            i += pin.len();
        } else {
            i += 1;
        }
    }
}

/// PINs shorter than this are not searched for elsewhere in the message: 4 digits occur by chance in amounts and
/// dates, and masking them there would change data that is not a PIN.
const PIN_SEARCH_MIN: usize = 4;

/// An answer's bytes with its PIN values treated by `policy`; `tpdu` bytes come first and are kept.
///
/// - Each `pin_at` place present in the answer is masked exactly (its bytes become `*`, or `0` in a field that does
///   not take `*`; lengths kept), and so is any other occurrence of the PIN found there in the same field. A place
///   missing from a field that is present masks that whole field.
/// - Field 63, unless a `pin_at` names it: pingate's receipt layout has its PIN masked wherever the receipt prints
///   it; another layout is masked whole when `pin_at` is empty (the capture of any host keeps its answers), and
///   kept when `pin_at` is given (the user said where that host's PINs are).
/// - `Omitted` leaves out field 63 and every field `pin_at` names instead of masking.
///
/// An answer that does not decode cannot be checked and is refused, as is one whose PIN (of at least 8 characters,
/// the last check) is still elsewhere in its bytes.
pub fn protect_answer(
    dialect: &Dialect,
    data: &[u8],
    tpdu: bool,
    policy: PinPolicy,
    pin_at: &[PinLocation],
) -> Result<Protected, Refused> {
    let mut notes = Vec::new();
    if policy == PinPolicy::Clear {
        return Ok(Protected {
            data: Bytes::copy_from_slice(data),
            notes,
        });
    }
    let head = if tpdu { 5.min(data.len()) } else { 0 };
    let body = Bytes::copy_from_slice(&data[head..]);
    if body.is_empty() {
        return Ok(Protected {
            data: Bytes::copy_from_slice(data),
            notes,
        });
    }
    let mut msg: Message = dialect
        .decode(&body)
        .map_err(|e| Refused::DoesNotDecode(e.to_string()))?;
    // PINs found, with the field they came from: none of them may be left in the answer's bytes. Wiped when
    // dropped, as pingate's own `Pin` is.
    let mut pins: Vec<(u8, zeroize::Zeroizing<Vec<u8>>)> = Vec::new();
    let mut named: Vec<u8> = pin_at.iter().map(PinLocation::field).collect();
    named.sort_unstable();
    named.dedup();
    for &field in &named {
        let Some(value) = msg.get(field).cloned() else { continue };
        if policy == PinPolicy::Omitted {
            msg.remove(field);
            continue;
        }
        let c = mask_char(dialect, field);
        let mut v = value.to_vec();
        let mut found: Vec<zeroize::Zeroizing<Vec<u8>>> = Vec::new();
        let mut whole = false;
        for place in pin_at.iter().filter(|p| p.field() == field) {
            let ranges = match place {
                PinLocation::Field(_) => Ok(std::iter::once(0..v.len()).collect::<Vec<_>>()),
                PinLocation::Span { offset, len, .. } => match offset.checked_add(*len) {
                    Some(end) if end <= value.len() => Ok(std::iter::once(*offset..end).collect()),
                    _ => Err(format!("field {field} is shorter than the span")),
                },
                PinLocation::Tag { tag, .. } => match tlv_elements(&value) {
                    Ok(els) => {
                        let r: Vec<_> = els.into_iter().filter(|(t, _)| t == tag).map(|(_, r)| r).collect();
                        if r.is_empty() {
                            Err(format!(
                                "field {field} has no element {} in pingate's TLV form",
                                String::from_utf8_lossy(tag)
                            ))
                        } else {
                            Ok(r)
                        }
                    }
                    Err(e) => Err(format!("field {field} is not in pingate's TLV form ({e})")),
                },
            };
            match ranges {
                Ok(ranges) => {
                    for r in ranges {
                        found.push(zeroize::Zeroizing::new(value[r.clone()].to_vec()));
                        v[r].fill(c);
                    }
                }
                Err(why) => {
                    notes.push(PinNote::PlaceMissing {
                        place: place.clone(),
                        why,
                    });
                    whole = true;
                }
            }
        }
        if whole {
            v.fill(c);
        }
        for pin in &found {
            if pin.len() >= PIN_SEARCH_MIN {
                mask_occurrences(&mut v, pin, c);
            }
        }
        pins.extend(found.into_iter().map(|p| (field, p)));
        msg.set(field, v);
    }
    if let (Some(f), false) = (msg.get(63).cloned(), named.contains(&63)) {
        match PinReceipt::from_tlv(&f) {
            Ok(mut r) => {
                let value = r.pin.expose().to_string();
                if policy == PinPolicy::Omitted {
                    msg.remove(63);
                } else {
                    // The PIN may also be printed in a receipt line ("dial *100*PIN#") or a serial: masked everywhere.
                    let stars = "*".repeat(value.len());
                    if !value.is_empty() {
                        r.serial = r.serial.replace(&value, &stars);
                        r.lines = r.lines.iter().map(|l| l.replace(&value, &stars)).collect();
                    }
                    r.pin = crate::sale::Pin::new(stars);
                    let tlv = r.to_tlv().map_err(|e| Refused::DoesNotEncode(e.to_string()))?;
                    msg.set(63, tlv.into_bytes());
                }
                pins.push((63, zeroize::Zeroizing::new(value.into_bytes())));
            }
            Err(_) if pin_at.is_empty() => {
                // Another host's layout: where its PIN is, is not known, so none of it is kept.
                notes.push(PinNote::NotReceipt { field: 63 });
                if policy == PinPolicy::Omitted {
                    msg.remove(63);
                } else {
                    msg.set(63, vec![mask_char(dialect, 63); f.len()]);
                }
            }
            Err(_) => {}
        }
    }
    let enc = dialect
        .encode(&msg)
        .map_err(|e| Refused::DoesNotEncode(e.to_string()))?;
    let mut out = data[..head].to_vec();
    out.extend_from_slice(&enc);
    // The last word: if a PIN is still in there, in any field, nothing is written.
    for (field, p) in &pins {
        if p.len() >= 8 && out.windows(p.len()).any(|w| w == &p[..]) {
            return Err(Refused::PinElsewhere { field: *field });
        }
    }
    Ok(Protected {
        data: Bytes::from(out),
        notes,
    })
}

/// An answer's bytes with its PIN values treated by `policy`, as pingate's own answers carry them (field 63 in the
/// receipt layout; another layout masked whole); `None` when it cannot be checked ([`protect_answer`]).
pub fn protect_pins(dialect: &Dialect, data: &[u8], tpdu: bool, policy: PinPolicy) -> Option<Bytes> {
    protect_answer(dialect, data, tpdu, policy, &[]).ok().map(|p| p.data)
}

/// Opens the capture file of `source` (a listener or a serial line, for the log), logging what it does; `None`, and
/// an error logged, when the file cannot be opened (the traffic still flows, uncaptured).
pub fn open_logged(path: &Path, header: &Capture, source: &str) -> Option<CaptureSink> {
    match CaptureSink::open(path, header) {
        Ok(sink) => {
            tracing::info!(source, path = %path.display(), pins = ?header.pins, "capturing terminal traffic");
            if header.pins == PinPolicy::Clear {
                tracing::warn!(
                    source,
                    "capture_pins = \"clear\": PIN values are written to the capture file (test traffic only)"
                );
            }
            Some(sink)
        }
        Err(e) => {
            tracing::error!(source, path = %path.display(), error = %e, "cannot open the capture file; not capturing");
            None
        }
    }
}

/// A request from a terminal as a capture records it (`raw`: TPDU, then the message). Terminals send no PINs, but
/// one that echoes field 63 must not put it in the file either; a request that does not decode is kept as it came
/// (it is what a replay must send again).
pub fn terminal_frame(dialect: &Dialect, raw: Bytes, tpdu: bool, pins: PinPolicy) -> Option<Bytes> {
    let head = if tpdu { 5.min(raw.len()) } else { 0 };
    if dialect.decode(&raw.slice(head..)).is_err() {
        Some(raw)
    } else {
        protect_pins(dialect, &raw, tpdu, pins)
    }
}

/// Frames waiting for the writer thread at most; beyond, frames are dropped (and counted) rather than held in
/// memory while a disk stalls.
const SINK_QUEUE: usize = 65_536;

/// Appends a listener's traffic to a capture file from a thread of its own (terminal tasks never wait on disk).
#[derive(Clone)]
pub struct CaptureSink {
    tx: mpsc::SyncSender<(Duration, u64, Direction, Bytes)>,
    start: Instant,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CaptureSink {
    /// Creates (or appends to) `path` (mode 0600: it holds terminal traffic), writing the header first when the file
    /// is new, and a restart marker when it is not (the reader then keeps the sessions apart).
    pub fn open(path: &Path, header: &Capture) -> std::io::Result<CaptureSink> {
        use std::os::unix::fs::OpenOptionsExt;
        let new = !path.exists() || std::fs::metadata(path)?.len() == 0;
        let mut f = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?,
        );
        if new {
            f.write_all(header.to_text().as_bytes())?;
        } else {
            // A new start in the same file: times and connection numbers start again; the reader offsets them.
            writeln!(f, "#! restart\n{}", header.settings_line())?;
        }
        f.flush()?;
        let (tx, rx) = mpsc::sync_channel::<(Duration, u64, Direction, Bytes)>(SINK_QUEUE);
        let where_ = path.display().to_string();
        std::thread::Builder::new()
            .name("pingate-capture".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let mut ok = true;
                    for (at, conn, dir, data) in batch {
                        ok &= f.write_all(record_line(at, conn, dir, &data).as_bytes()).is_ok();
                    }
                    if !ok || f.flush().is_err() {
                        tracing::error!(path = %where_, "the capture file cannot be written; capture stops");
                        return;
                    }
                }
            })?;
        Ok(CaptureSink {
            tx,
            start: Instant::now(),
            dropped: Default::default(),
        })
    }

    /// Records a frame (already protected: see [`protect_pins`]). Never waits: when the writer is behind by
    /// [`SINK_QUEUE`] frames, the frame is dropped and counted.
    pub fn record(&self, conn: u64, dir: Direction, data: Bytes) {
        if self.tx.try_send((self.start.elapsed(), conn, dir, data)).is_err() {
            let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(dropped = n + 1, "capture falls behind; frames dropped from the capture");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_round_trips_and_mistakes_name_their_line() {
        let text = "# a comment\n#! framing=ascii4 tpdu=true dialect=iso87-bcd pins=omitted source=test\n\
                    0.5 3 T 6000030001AB\n0.75 3 H -\n";
        let c = Capture::parse(text).unwrap();
        assert_eq!((c.framing, c.tpdu, c.pins), (Framing::Ascii4, true, PinPolicy::Omitted));
        assert_eq!(c.other.get("source").map(String::as_str), Some("test"));
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.records[0].data.as_ref(), &[0x60, 0, 3, 0, 1, 0xAB]);
        assert_eq!(c.records[1].line, 4);
        assert!(c.records[1].data.is_empty());
        let again = Capture::parse(&c.to_text()).unwrap();
        assert_eq!(
            again
                .records
                .iter()
                .map(|r| (&r.data, r.dir, r.conn))
                .collect::<Vec<_>>(),
            c.records.iter().map(|r| (&r.data, r.dir, r.conn)).collect::<Vec<_>>()
        );
        let e = Capture::parse("#! framing=binary2 dialect=x\n0.1 1 X 00\n").unwrap_err();
        assert_eq!(e.to_string(), "capture line 2: direction `X` is neither T nor H");
        let e = Capture::parse("#! framing=binary2 dialect=x\n0.1 1 T 0G\n").unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("column 2 is not a hex digit"),
            "{e}"
        );
        let e = Capture::parse("#! dialect=x\n").unwrap_err();
        assert!(e.to_string().contains("`framing`"), "{e}");
        let e = Capture::parse("#! framing=binary2 dialect=x\n0.1 1 T 0\u{e9}0\n").unwrap_err();
        assert!(e.to_string().contains("column 2 is not a hex digit"), "{e}");
        let e = Capture::parse("#! framing=binary2 dialect=x\n1e300 1 T 00\n").unwrap_err();
        assert!(e.to_string().contains("time `1e300`"), "{e}");
        let e = Capture::parse("#! framing=binary2 dialect=x\n-1 1 T 00\n").unwrap_err();
        assert!(e.to_string().contains("time `-1`"), "{e}");
        let e = Capture::parse("#! framing=binary2 dialect=x\n1 2 T\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn pins_are_masked_wherever_they_are_printed_or_the_frame_is_left_out() {
        use crate::sale::{Pin, PinReceipt};
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii").unwrap();
        let mut m = Message::new(crate::iso8583::Mti::SALE_RESPONSE);
        m.set(11, "000001").set(39, "00");
        let r = PinReceipt {
            pin: Pin::new("5551234567"),
            serial: "SN1".into(),
            expiry: None,
            lines: vec!["Dial *100*5551234567# to top up".into()],
        };
        m.set(63, r.to_tlv().unwrap().into_bytes());
        let raw = dialect.encode(&m).unwrap();
        let masked = protect_pins(dialect, &raw, false, PinPolicy::Masked).unwrap();
        assert!(!masked.windows(10).any(|w| w == b"5551234567"), "the PIN is nowhere");
        let back = PinReceipt::from_tlv(dialect.decode(&masked).unwrap().get(63).unwrap()).unwrap();
        assert_eq!(back.pin.expose(), "**********");
        assert_eq!(back.lines, ["Dial *100***********# to top up"]);
        let omitted = protect_pins(dialect, &raw, false, PinPolicy::Omitted).unwrap();
        assert!(dialect.decode(&omitted).unwrap().get(63).is_none());
        assert_eq!(
            protect_pins(dialect, &raw, false, PinPolicy::Clear).unwrap(),
            raw.freeze()
        );
        // A frame that does not decode cannot be checked: left out.
        assert_eq!(protect_pins(dialect, b"0210garbage", false, PinPolicy::Masked), None);
    }

    #[test]
    fn pin_places_parse_and_print_back() {
        for (text, place) in [
            ("63", PinLocation::Field(63)),
            ("62:PI", PinLocation::Tag { field: 62, tag: *b"PI" }),
            (
                "48@10+16",
                PinLocation::Span {
                    field: 48,
                    offset: 10,
                    len: 16,
                },
            ),
        ] {
            assert_eq!(text.parse::<PinLocation>().unwrap(), place);
            assert_eq!(place.to_string(), text);
        }
        for bad in ["", "0", "129", "63:", "63:ABC", "63@", "63@1", "63@1+0", "x:PN"] {
            assert!(bad.parse::<PinLocation>().is_err(), "{bad}");
        }
    }

    /// Another host's answer: a PIN in a field that does not take `*` (37, class an: masked with `0`), one at an offset
    /// of a text field, and a place the answer does not have (that field masked whole, the reason noted).
    #[test]
    fn a_foreign_layout_is_masked_where_told_with_lengths_kept() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii").unwrap();
        let mut m = Message::new(crate::iso8583::Mti::SALE_RESPONSE);
        m.set(11, "000001").set(39, "00").set(37, "123456789012");
        m.set(48, "SER1 PIN 99887766554433 END 99887766554433");
        m.set(62, "NO TLV HERE");
        m.set(63, "something of its own");
        let raw = dialect.encode(&m).unwrap();
        let at: Vec<PinLocation> = ["37", "48@9+14", "62:PI"].iter().map(|p| p.parse().unwrap()).collect();
        let p = protect_answer(dialect, &raw, false, PinPolicy::Masked, &at).unwrap();
        assert_eq!(p.data.len(), raw.len(), "lengths kept");
        let got = dialect.decode(&p.data).unwrap();
        assert_eq!(got.get_str(37), Some("000000000000"), "an: 0");
        assert_eq!(got.get_str(48), Some("SER1 PIN ************** END **************"));
        assert_eq!(got.get_str(62), Some("***********"), "no such tag: masked whole");
        assert_eq!(
            got.get_str(63),
            Some("something of its own"),
            "--pin-at given: 63 is the user's call"
        );
        assert!(matches!(
            &p.notes[..],
            [PinNote::PlaceMissing {
                place: PinLocation::Tag { field: 62, .. },
                ..
            }]
        ));
        // Without --pin-at, field 63 of another layout is masked whole; omitted, it is left out.
        let p = protect_answer(dialect, &raw, false, PinPolicy::Masked, &[]).unwrap();
        assert_eq!(
            dialect.decode(&p.data).unwrap().get_str(63),
            Some("********************")
        );
        assert_eq!(p.notes, [PinNote::NotReceipt { field: 63 }]);
        let p = protect_answer(dialect, &raw, false, PinPolicy::Omitted, &at).unwrap();
        let got = dialect.decode(&p.data).unwrap();
        assert!(!got.has(37) && !got.has(48) && !got.has(62) && got.has(63));
        // A PIN still elsewhere (field 44 here) refuses the answer.
        m.set(44, "99887766554433");
        let raw = dialect.encode(&m).unwrap();
        let at: Vec<PinLocation> = vec!["48@9+14".parse().unwrap()];
        assert_eq!(
            protect_answer(dialect, &raw, false, PinPolicy::Masked, &at).unwrap_err(),
            Refused::PinElsewhere { field: 48 }
        );
    }
}
