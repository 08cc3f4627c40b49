//! Serial lines: modems of a modem bank and terminals wired directly, one task per line through `tokio-serial`.
//!
//! The task is a thin loop around the cores in [`crate::link`]: bytes from the port go through software parity (when
//! configured) to the [`ModemController`] (modem lines), whose data goes to the call's link ([`DialupLink`] for
//! `STX data ETX LRC`, or a length framing); requests go to the same [`Gateway`] controller as TCP terminals.
//!
//! Money on a dropped line: an approved sale counts as delivered only when the terminal ACKs the answer frame (on a
//! length-framed line: when the answer is written). If the call ends first (carrier lost, EOT, no ACK after the
//! retries), or ends while the answer is still being built, the sale is reversed through [`Gateway::undelivered`]
//! (journaled, then forwarded to the server): the PIN is voided, never sold to anyone else.
//!
//! A line that fails (device gone, an I/O error, reads returning end of file) is reported on the line board and
//! reopened with backoff; other lines and TCP terminals do not notice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::{FlowControl, Hangup, LineLink, SerialLineConfig};
use super::terminal::{captured, decode_request};
use super::upstream::backoff;
use super::Gateway;
use crate::iso8583::Dialect;
use crate::link::dialup::{wire_time, DialupLink, EndReason, LinkEvent};
use crate::link::framing::{Frame, FrameCodec, Framing, Tpdu};
use crate::link::modem::{ModemController, ModemEvent};
use crate::link::parity::{self, Parity};
use crate::logging::limited;
use crate::sale::SaleKey;
use crate::traffic::capture::{protect_pins, terminal_frame, Capture, CaptureSink, Direction};

/// What the operator sees of one line (`gateway lines` on the admin socket).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LineStatus {
    /// `opening`, `down`, `initialising`, `ready`, `not answering`, `online`, `hanging up`, `open` (direct lines).
    pub state: String,
    /// Calls connected since the gateway started (direct lines: link sessions).
    pub calls: u64,
    /// Requests answered and acknowledged by the terminal.
    pub delivered: u64,
    /// Sales reversed because their answer did not reach the terminal.
    pub reversed: u64,
    /// Speed of the current or last call.
    pub speed: Option<u32>,
    /// The last problem, for the operator.
    pub last_error: Option<String>,
    /// Times the port was (re)opened.
    pub opens: u64,
}

/// Every serial line's status, by name.
pub type LineBoard = BTreeMap<String, LineStatus>;

/// Errors that take a line down (it is reopened with backoff).
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The device could not be opened or configured.
    #[error("cannot open {device}: {source}")]
    Open {
        device: String,
        source: tokio_serial::Error,
    },
    /// A read or write failed (EIO after the device went, and the like).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Reads return end of file: the device is gone (an unplugged USB adapter does this forever).
    #[error("the device returned end of file")]
    Eof,
    /// A write did not complete in time (flow control stuck, or the device hangs).
    #[error("a write of {0} bytes did not complete in time")]
    WriteStalled(usize),
    /// Eight-bit data for a seven-bit line (a bug: answers are checked before they are handed over).
    #[error("{0}")]
    EightBit(parity::EightBitByte),
}

/// A serial line's capture: the file, and the count of calls across reopens (a call is a capture's connection).
#[derive(Clone)]
struct LineCapture {
    sink: CaptureSink,
    calls: Arc<AtomicU64>,
    /// The current call's number in the capture.
    conn: u64,
}

/// The capture header of a serial line: its messages as a TCP listener's capture has them (TPDU, then message),
/// so that `pingate replay` sends them again over TCP, length-framed like the line when it is (binary2 for an
/// STX/ETX line); `serial` and `link` say where they came from.
fn capture_header(cfg: &SerialLineConfig) -> Capture {
    let (framing, link) = match &cfg.link {
        LineLink::StxEtx(_) => (Framing::Binary2, "stx-etx".to_string()),
        LineLink::Framed(f) => (*f, f.name().to_string()),
    };
    let mut header = Capture::new(framing, cfg.tpdu, &cfg.dialect, cfg.capture_pins);
    header.other.insert("serial".into(), cfg.name.clone());
    header.other.insert("link".into(), link);
    header
}

/// After this long up, a line that fails is retried at once again (its backoff starts over).
const STABLE: Duration = Duration::from_secs(60);
/// DCD is read this often while online, where the port has it.
const DCD_POLL: Duration = Duration::from_millis(250);
/// DCD is not trusted this soon after CONNECT (it may still be settling).
const DCD_SETTLE: Duration = Duration::from_millis(500);

/// Runs one serial line until `stop` is cancelled, reopening it with backoff whenever it fails.
pub async fn run_line(cfg: SerialLineConfig, dialect: Arc<Dialect>, gw: Arc<Gateway>, stop: CancellationToken) {
    let span = tracing::info_span!("serial", line = %cfg.name, device = %cfg.device.display());
    async move {
        // One capture file for the line's life, its calls numbered across reopens.
        let capture = cfg.capture.as_ref().and_then(|path| {
            let sink = crate::traffic::capture::open_logged(
                path,
                &capture_header(&cfg),
                &format!("serial line {}", cfg.name),
            )?;
            Some(LineCapture {
                sink,
                calls: Arc::new(AtomicU64::new(0)),
                conn: 0,
            })
        });
        let mut attempt = 0u32;
        loop {
            gw.set_line(&cfg.name, |s| s.state = "opening".into());
            let opened = Instant::now();
            let result = match open(&cfg) {
                Ok(port) => {
                    gw.set_line(&cfg.name, |s| s.opens += 1);
                    let mut line = Line::new(&cfg, dialect.clone(), gw.clone());
                    line.capture = capture.clone();
                    line.serve(port, &stop).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    gw.set_line(&cfg.name, |s| s.state = "stopped".into());
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "serial line down; reopening with backoff");
                    gw.set_line(&cfg.name, |s| {
                        s.state = "down".into();
                        s.last_error = Some(e.to_string());
                    });
                }
            }
            attempt = if opened.elapsed() > STABLE { 0 } else { attempt + 1 };
            let wait = backoff(Duration::from_millis(200), Duration::from_secs(30), attempt);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    .instrument(span)
    .await
}

fn open(cfg: &SerialLineConfig) -> Result<SerialStream, LineError> {
    use tokio_serial::{DataBits, FlowControl as Fc, Parity as P, StopBits};
    let (data_bits, parity) = if cfg.software_parity {
        (DataBits::Eight, P::None)
    } else {
        (
            if cfg.data_bits == 7 {
                DataBits::Seven
            } else {
                DataBits::Eight
            },
            match cfg.parity {
                Parity::None => P::None,
                Parity::Even => P::Even,
                Parity::Odd => P::Odd,
            },
        )
    };
    tokio_serial::new(cfg.device.to_string_lossy(), cfg.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(if cfg.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .flow_control(match cfg.flow_control {
            FlowControl::None => Fc::None,
            FlowControl::Hardware => Fc::Hardware,
            FlowControl::Software => Fc::Software,
        })
        .open_native_async()
        .map_err(|source| LineError::Open {
            device: cfg.device.display().to_string(),
            source,
        })
}

/// A call in progress: a dial-up link, or a length-framed session.
enum Call {
    Dialup(Box<DialupLink>),
    Framed {
        codec: FrameCodec,
        buf: BytesMut,
        /// The call ends when no frame comes before this (and nothing is in flight).
        idle_at: Instant,
        /// Requests at the controller.
        in_flight: usize,
    },
}

/// An answer coming back from the controller for call `call`. `message` empty: there is no answer (the request
/// could not be read, or the answer could not be encoded); the link stops waiting for one.
struct Answer {
    call: u64,
    /// The request's number on the line: a dial-up link waits for the answer to its latest request only.
    seq: u64,
    tpdu: Option<Tpdu>,
    message: Bytes,
    sale: Option<SaleKey>,
}

struct Line<'a> {
    cfg: &'a SerialLineConfig,
    dialect: Arc<Dialect>,
    gw: Arc<Gateway>,
    modem: Option<ModemController>,
    call: Option<Call>,
    /// Where the current call comes from: the caller's number the modem reported (no address: not TCP).
    origin: Arc<super::origin::Origin>,
    /// Numbers calls, so that an answer for a call that is over is known as undelivered.
    call_id: u64,
    /// Numbers requests on the line.
    seq: u64,
    /// Requests at the controller: (call, seq) → the sale key they are about (sales and repeats), so that a late
    /// answer whose sale a newer request carries again (a repeat) is not reversed under it.
    in_flight: std::collections::HashMap<(u64, u64), Option<SaleKey>>,
    /// The sale whose answer the link is carrying, until the terminal ACKs it.
    carrying: Option<SaleKey>,
    answers_tx: mpsc::Sender<Answer>,
    answers_rx: mpsc::Receiver<Answer>,
    /// Whether DCD can be read (ports with modem-control lines; not ptys).
    dcd: bool,
    /// DCD was seen high in this call: only then does it going low mean anything (a three-wire cable reads low).
    dcd_seen: bool,
    connected_at: Option<Instant>,
    dcd_low: u8,
    out: Vec<Bytes>,
    /// Requests at the controller and reversals of undelivered answers: the line waits for them before it
    /// closes, so that a shutdown never drops a reversal that was not journaled yet.
    work: tokio::task::JoinSet<()>,
    /// Where this line's traffic is captured, if it is.
    capture: Option<LineCapture>,
}

impl<'a> Line<'a> {
    fn new(cfg: &'a SerialLineConfig, dialect: Arc<Dialect>, gw: Arc<Gateway>) -> Line<'a> {
        let (answers_tx, answers_rx) = mpsc::channel(8);
        Line {
            cfg,
            dialect,
            gw,
            modem: None,
            call: None,
            origin: Arc::default(),
            call_id: 0,
            seq: 0,
            in_flight: std::collections::HashMap::new(),
            carrying: None,
            answers_tx,
            answers_rx,
            dcd: false,
            dcd_seen: false,
            connected_at: None,
            dcd_low: 0,
            out: Vec::new(),
            work: tokio::task::JoinSet::new(),
            capture: None,
        }
    }

    /// Records a message of the current call in the capture, if there is one: `data` is TPDU, then message; an
    /// answer's PINs are treated as the line's `capture_pins` says.
    fn record(&self, dir: Direction, data: Bytes) {
        let Some(c) = &self.capture else { return };
        let data = match dir {
            Direction::Terminal => terminal_frame(&self.dialect, data, self.cfg.tpdu, self.cfg.capture_pins),
            Direction::Host => protect_pins(&self.dialect, &data, self.cfg.tpdu, self.cfg.capture_pins),
        };
        if let Some(data) = data {
            c.sink.record(c.conn, dir, data);
        }
    }

    fn software_parity(&self) -> Parity {
        if self.cfg.software_parity {
            self.cfg.parity
        } else {
            Parity::None
        }
    }

    async fn serve(mut self, mut port: SerialStream, stop: &CancellationToken) -> Result<(), LineError> {
        let now = Instant::now();
        if let Some(m) = &self.cfg.modem {
            // Ptys and some adapters have no modem-control lines: hang up with +++/ATH0 there, and on three-wire
            // cables where the operator said so (`hangup = "escape"`).
            let dtr_works = port.write_data_terminal_ready(true).is_ok();
            let dtr = dtr_works && self.cfg.hangup != Hangup::Escape;
            self.dcd = dtr_works && port.read_carrier_detect().is_ok();
            tracing::info!(dtr, dcd = self.dcd, "modem line open");
            self.modem = Some(ModemController::new(m.clone(), dtr, now.into_std()));
            self.status(|s| s.state = "initialising".into());
        } else {
            tracing::info!("direct line open");
            self.start_call(now);
        }
        let mut rbuf = vec![0u8; 1024];
        let result = loop {
            if let Err(e) = self.pump(&mut port).await {
                break Err(e);
            }
            let deadline = self.next_deadline();
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                r = port.read(&mut rbuf) => match r {
                    Ok(0) => break Err(LineError::Eof),
                    Ok(n) => self.input(&mut rbuf[..n], Instant::now()),
                    Err(e) => break Err(e.into()),
                },
                Some(a) = self.answers_rx.recv() => {
                    if let Err(e) = self.answer(a, &mut port).await {
                        break Err(e);
                    }
                }
                Some(_) = self.work.join_next(), if !self.work.is_empty() => {}
                _ = sleep_until(deadline) => self.timeout(&mut port, Instant::now()),
            }
        };
        // The line is going away: whatever the terminal has not acknowledged is undelivered, and so is every
        // answer still queued or still being built.
        self.end_call_silently();
        let _ = self.pump(&mut port).await;
        self.answers_rx.close();
        while let Some(a) = self.answers_rx.recv().await {
            if let Some(key) = a.sale {
                self.reverse(key, "the line closed before the answer was sent");
            }
        }
        // Requests still at the controller find the queue closed and reverse their own sales.
        while self.work.join_next().await.is_some() {}
        result
    }

    fn status(&self, f: impl FnOnce(&mut LineStatus)) {
        self.gw.set_line(&self.cfg.name, f);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let modem = self
            .modem
            .as_ref()
            .and_then(|m| m.poll_timeout())
            .map(Instant::from_std);
        let call = match &self.call {
            Some(Call::Dialup(l)) => l.poll_timeout().map(Instant::from_std),
            Some(Call::Framed { idle_at, in_flight, .. }) if *in_flight == 0 => Some(*idle_at),
            _ => None,
        };
        let dcd = (self.dcd && self.modem.as_ref().is_some_and(|m| m.is_online())).then(|| Instant::now() + DCD_POLL);
        [modem, call, dcd].into_iter().flatten().min()
    }

    /// Writes what the cores want written and acts on their events, until they are quiet.
    async fn pump(&mut self, port: &mut SerialStream) -> Result<(), LineError> {
        loop {
            let now = Instant::now();
            let mut events = false;
            if let Some(m) = &mut self.modem {
                while let Some(level) = m.poll_dtr() {
                    if let Err(e) = port.write_data_terminal_ready(level) {
                        tracing::warn!(error = %e, level, "cannot set DTR");
                    }
                }
                if let Some(b) = m.poll_transmit() {
                    self.out.push(b);
                }
                events |= self.modem_events(&[], now);
            }
            if let Some(Call::Dialup(link)) = &mut self.call {
                if let Some(b) = link.poll_transmit() {
                    self.out.push(b);
                }
                let mut evs = Vec::new();
                while let Some(ev) = link.poll_event() {
                    evs.push(ev);
                }
                for ev in evs {
                    events = true;
                    self.on_link_event(ev, now);
                }
            }
            for b in std::mem::take(&mut self.out) {
                self.write(port, b).await?;
            }
            if !events {
                return Ok(());
            }
        }
    }

    /// Acts on the modem's events and hands its data to the call, in the order they happened: data that came with
    /// CONNECT goes to the new call, data that came before NO CARRIER goes to the call that is ending. `bad`: offsets
    /// of parity errors in that data. Returns whether there were events.
    fn modem_events(&mut self, bad: &[usize], now: Instant) -> bool {
        let Some(m) = &mut self.modem else { return false };
        let mut data = m.poll_data();
        let mut evs = Vec::new();
        while let Some(ev) = m.poll_event() {
            evs.push(ev);
        }
        let any = !evs.is_empty();
        for ev in evs {
            match ev {
                ModemEvent::Connected { .. } => {
                    self.on_modem_event(ev, now);
                    if let Some(d) = data.take() {
                        self.call_input(&d, bad, now);
                    }
                }
                ModemEvent::CarrierLost => {
                    if let Some(d) = data.take() {
                        self.call_input(&d, bad, now);
                    }
                    self.on_modem_event(ev, now);
                }
                _ => self.on_modem_event(ev, now),
            }
        }
        if let Some(d) = data {
            self.call_input(&d, bad, now);
        }
        any
    }

    async fn write(&self, port: &mut SerialStream, bytes: Bytes) -> Result<(), LineError> {
        let mut b = bytes.to_vec();
        if let Err(e) = parity::add(&mut b, self.software_parity()) {
            // Answers are checked before they are handed over; this is a bug, and nothing is sent.
            tracing::error!(error = %e, "eight-bit data on a seven-bit line; not sent");
            return Err(LineError::EightBit(e));
        }
        let limit = Duration::from_secs(10) + wire_time(self.cfg.baud, self.cfg.bits_per_char(), b.len());
        match tokio::time::timeout(limit, port.write_all(&b)).await {
            Ok(r) => r.map_err(LineError::from),
            Err(_) => Err(LineError::WriteStalled(b.len())),
        }
    }

    fn input(&mut self, bytes: &mut [u8], now: Instant) {
        let bad = parity::strip(bytes, self.software_parity());
        match &mut self.modem {
            Some(m) => {
                m.handle_input(bytes, now.into_std());
                // Online, the modem passes a tail of what it got straight through: map parity errors onto it.
                let skip = bytes.len().saturating_sub(m.pending_data());
                let bad: Vec<usize> = bad.iter().filter(|&&o| o >= skip).map(|o| o - skip).collect();
                self.modem_events(&bad, now);
            }
            None => self.call_input(bytes, &bad, now),
        }
    }

    /// The terminal's bytes; `bad` are offsets of bytes with parity errors.
    fn call_input(&mut self, data: &[u8], bad: &[usize], now: Instant) {
        let mut requests = Vec::new();
        let mut end = false;
        match &mut self.call {
            None => {}
            Some(Call::Dialup(link)) => link.handle_input_checked(data, bad, now.into_std()),
            Some(Call::Framed {
                codec, buf, idle_at, ..
            }) => {
                if !bad.is_empty() {
                    tracing::info!(offset = bad[0], "parity error on a length-framed line; the call ends");
                    end = true;
                } else {
                    buf.extend_from_slice(data);
                    // Any byte keeps the call alive (a long frame at a low speed is not idleness).
                    *idle_at = now + self.cfg.idle_timeout;
                    loop {
                        match codec.decode(buf) {
                            Ok(Some(frame)) => {
                                requests.push(frame);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::info!(error = %e, "framing error; the call ends");
                                end = true;
                                break;
                            }
                        }
                    }
                }
            }
        }
        for f in requests {
            if f.message.is_empty() {
                continue; // keep-alive
            }
            self.dispatch(f.tpdu, f.message, now);
        }
        if end {
            self.end_framed_call(now);
        }
    }

    fn on_modem_event(&mut self, ev: ModemEvent, now: Instant) {
        match ev {
            ModemEvent::Ready => {
                tracing::debug!("modem ready");
                self.status(|s| s.state = "ready".into());
            }
            ModemEvent::InitFailed {
                command,
                reply,
                attempt,
            } => {
                let reply = reply.unwrap_or_else(|| "no answer".into());
                tracing::warn!(%command, %reply, attempt, "modem refused its init string");
                self.status(|s| s.last_error = Some(format!("init `{command}`: {reply}")));
            }
            ModemEvent::NotAnswering => {
                tracing::error!("the modem does not accept its init string; trying again later");
                self.status(|s| s.state = "not answering".into());
            }
            ModemEvent::Ring => tracing::debug!("RING"),
            ModemEvent::Connected { speed, protocol } => {
                let caller_id = self.modem.as_ref().and_then(|m| m.caller_id()).map(Box::from);
                tracing::info!(?speed, ?protocol, caller_id = caller_id.as_deref(), "call connected");
                self.origin = Arc::new(super::origin::Origin {
                    caller_id,
                    ..Default::default()
                });
                self.status(|s| {
                    s.state = "online".into();
                    s.speed = speed;
                });
                self.start_call(now);
            }
            ModemEvent::CallFailed { reply } => tracing::info!(?reply, "incoming call did not connect"),
            ModemEvent::CarrierLost => {
                tracing::info!("carrier lost");
                match &mut self.call {
                    Some(Call::Dialup(link)) => link.carrier_lost(),
                    Some(Call::Framed { .. }) => self.end_framed_call(now),
                    None => {}
                }
                self.status(|s| s.state = "initialising".into());
            }
            ModemEvent::HungUp => {
                tracing::debug!("hung up");
                self.status(|s| s.state = "initialising".into());
            }
        }
    }

    fn on_link_event(&mut self, ev: LinkEvent, now: Instant) {
        match ev {
            LinkEvent::Request(data) => {
                let (tpdu, message) = match split_tpdu(data, self.cfg.tpdu) {
                    Some(x) => x,
                    None => {
                        tracing::info!("frame too short for its TPDU; not answered");
                        if let Some(Call::Dialup(l)) = &mut self.call {
                            l.decline(now.into_std());
                        }
                        return;
                    }
                };
                self.dispatch(tpdu, message, now);
            }
            LinkEvent::Rejected(fault) => tracing::info!(%fault, "frame refused (NAK)"),
            LinkEvent::Delivered => {
                self.carrying = None;
                self.status(|s| s.delivered += 1);
            }
            LinkEvent::Undelivered => self.undelivered("the terminal did not acknowledge the answer"),
            LinkEvent::Ended(reason) => {
                tracing::info!(?reason, "call ended");
                if reason == EndReason::CarrierLost {
                    self.undelivered("carrier lost before the terminal acknowledged the answer");
                } else {
                    self.undelivered("the call ended before the terminal acknowledged the answer");
                }
                self.call = None;
                match &mut self.modem {
                    Some(m) => {
                        m.hang_up(now.into_std());
                        let state = m.state_name();
                        self.status(|s| s.state = state.into());
                    }
                    None => self.start_call(now),
                }
            }
        }
    }

    /// The answer the link was carrying was not acknowledged: reversed, as `unacknowledged` when the link had
    /// written it whole (the terminal may have it), else as undelivered.
    fn undelivered(&mut self, why: &str) {
        let sent_whole = match &self.call {
            Some(Call::Dialup(link)) => link.answer_sent_whole(),
            _ => false,
        };
        if let Some(key) = self.carrying.take() {
            self.reverse_as(key, why, sent_whole);
        }
    }

    /// Reverses sale `key` (journaled, then forwarded to the server by the controller).
    fn reverse(&mut self, key: SaleKey, why: &str) {
        self.reverse_as(key, why, false)
    }

    /// [`reverse`](Self::reverse); `sent_whole`: the answer was sent in full but not acknowledged.
    fn reverse_as(&mut self, key: SaleKey, why: &str, sent_whole: bool) {
        limited!(warn, "PIN not delivered; reversing the sale", terminal = %key.terminal_id, stan = %key.stan, why, sent_whole);
        self.status(|s| s.reversed += 1);
        let gw = self.gw.clone();
        let work = async move {
            if sent_whole {
                gw.unacknowledged(&key).await
            } else {
                gw.undelivered(&key).await
            }
        };
        self.work.spawn(work.in_current_span());
    }

    fn start_call(&mut self, now: Instant) {
        self.call_id += 1;
        if let Some(c) = &mut self.capture {
            c.conn = c.calls.fetch_add(1, Ordering::Relaxed) + 1;
        }
        self.carrying = None;
        self.connected_at = Some(now);
        self.dcd_low = 0;
        self.dcd_seen = false;
        self.call = Some(match &self.cfg.link {
            LineLink::StxEtx(c) => {
                // The ACK timeout runs at the call's speed, which may be below the port's.
                let mut c = c.clone();
                if let Some(speed) = self.modem.as_ref().and_then(|m| m.speed()) {
                    c.baud = c.baud.min(speed.max(1));
                }
                Call::Dialup(Box::new(DialupLink::new(c, now.into_std())))
            }
            LineLink::Framed(framing) => Call::Framed {
                codec: FrameCodec::new(*framing, self.cfg.tpdu, self.cfg.max_frame),
                buf: BytesMut::new(),
                idle_at: now + self.cfg.idle_timeout,
                in_flight: 0,
            },
        });
        self.status(|s| {
            s.calls += 1;
            if self.modem.is_none() {
                s.state = "open".into();
            }
        });
    }

    fn end_framed_call(&mut self, now: Instant) {
        self.call = None;
        match &mut self.modem {
            Some(m) => m.hang_up(now.into_std()),
            None => self.start_call(now),
        }
    }

    /// The line is closing under a call: what was not acknowledged is undelivered.
    fn end_call_silently(&mut self) {
        if let Some(Call::Dialup(link)) = &mut self.call {
            link.carrier_lost();
            while link.poll_event().is_some() {}
        }
        self.undelivered("the line closed before the terminal acknowledged the answer");
        self.call = None;
        self.call_id += 1;
    }

    fn dispatch(&mut self, tpdu: Option<Tpdu>, message: Bytes, now: Instant) {
        if self.capture.is_some() {
            self.record(
                Direction::Terminal,
                captured(&Frame {
                    tpdu,
                    message: message.clone(),
                }),
            );
        }
        let reply_tpdu = tpdu.map(|t| t.reply());
        let call = self.call_id;
        self.seq += 1;
        let seq = self.seq;
        if let Some(Call::Framed { in_flight, .. }) = &mut self.call {
            *in_flight += 1;
        }
        let (gw, dialect, tx) = (self.gw.clone(), self.dialect.clone(), self.answers_tx.clone());
        let mac = self.cfg.mac;
        let origin = self.origin.clone();
        let msg = match decode_request(&dialect, &message) {
            Ok(m) => m,
            Err(answer) => {
                gw.note_unreadable(answer.is_some());
                // A format error answer, or none: either way through the queue, so that the link stops waiting.
                let a = Answer {
                    call,
                    seq,
                    tpdu: reply_tpdu,
                    message: answer.unwrap_or_default(),
                    sale: None,
                };
                self.in_flight.insert((call, seq), None);
                self.work.spawn(async move {
                    let _ = tx.send(a).await;
                });
                return;
            }
        };
        // The sale a request is about (a 0200 or 0201): its key, as the controller makes it.
        let key = SaleKey::of(&msg, crate::clock::unix_now())
            .ok()
            .filter(|_| msg.mti().to_string().starts_with("02"));
        self.in_flight.insert((call, seq), key);
        let span = tracing::info_span!("request", terminal = msg.terminal_id().unwrap_or("?"), call);
        self.work.spawn(
            async move {
                let reply = gw.handle_from(&dialect, &message, &msg, mac, &origin, now).await;
                let encoded = gw.encode_reply(&dialect, &reply);
                let mut sale = reply.reverse_if_undelivered;
                let message = match encoded {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "answer does not encode");
                        if let Some(k) = sale.take() {
                            gw.undelivered(&k).await;
                        }
                        Bytes::new()
                    }
                };
                let a = Answer {
                    call,
                    seq,
                    tpdu: reply_tpdu,
                    sale,
                    message,
                };
                if let Err(mpsc::error::SendError(a)) = tx.send(a).await {
                    // The line is gone.
                    if let Some(k) = a.sale {
                        gw.undelivered(&k).await;
                    }
                }
            }
            .instrument(span),
        );
    }

    async fn answer(&mut self, a: Answer, port: &mut SerialStream) -> Result<(), LineError> {
        let now = Instant::now();
        let seven_bit = self.cfg.data_bits == 7;
        self.in_flight.remove(&(a.call, a.seq));
        // A dial-up link answers its latest request only; a length-framed call answers every request.
        let live = a.call == self.call_id
            && match &self.call {
                Some(Call::Dialup(_)) => a.seq == self.seq,
                _ => true,
            };
        if let (true, Some(Call::Framed { in_flight, idle_at, .. })) = (live, &mut self.call) {
            *in_flight = in_flight.saturating_sub(1);
            *idle_at = now + self.cfg.idle_timeout;
        }
        let mut data = BytesMut::new();
        if let Some(t) = a.tpdu {
            data.extend_from_slice(&t.bytes());
        }
        data.extend_from_slice(&a.message);
        let eight_bit = seven_bit && data.iter().any(|&b| b > 0x7F);
        if eight_bit {
            tracing::error!("the answer has eight-bit bytes and the line has seven data bits: use a text dialect");
        }
        match &mut self.call {
            Some(Call::Dialup(link)) if live => {
                if a.message.is_empty() || eight_bit {
                    link.decline(now.into_std());
                } else if link.respond(&data, now.into_std()) {
                    self.record(Direction::Host, data.freeze());
                    self.carrying = a.sale;
                    return Ok(());
                }
            }
            Some(Call::Framed { codec, idle_at, .. }) if live && !a.message.is_empty() && !eight_bit => {
                *idle_at = now + self.cfg.idle_timeout;
                let mut buf = BytesMut::new();
                let framed = codec.encode(
                    Frame {
                        tpdu: a.tpdu,
                        message: a.message.clone(),
                    },
                    &mut buf,
                );
                let framed_ok = framed.is_ok() && !(seven_bit && buf.iter().any(|&b| b > 0x7F));
                if framed_ok {
                    match self.write(port, buf.freeze()).await {
                        Ok(()) => {
                            self.record(Direction::Host, data.freeze());
                            self.status(|s| s.delivered += 1);
                            return Ok(());
                        }
                        Err(e) => {
                            if let Some(key) = a.sale {
                                self.reverse(key, "the answer could not be written");
                            }
                            return Err(e);
                        }
                    }
                }
                tracing::error!("the answer cannot be framed for this line");
            }
            _ => {}
        }
        // The call this answer belongs to is over, or a newer request replaced it, or it could not go out. The
        // sale the current call may be carrying is not touched; nor is a sale a newer request is about (a repeat:
        // its answer carries the same PIN, and is reversed itself if it is not delivered).
        if let Some(key) = a.sale {
            let carried_again =
                self.carrying.as_ref() == Some(&key) || self.in_flight.values().any(|k| k.as_ref() == Some(&key));
            if carried_again {
                tracing::info!(terminal = %key.terminal_id, stan = %key.stan, "a late answer; a newer request carries the same sale");
            } else {
                self.reverse(key, "the call ended (or moved on) before the answer was ready");
            }
        }
        Ok(())
    }

    fn timeout(&mut self, port: &mut SerialStream, now: Instant) {
        if let Some(m) = &mut self.modem {
            m.handle_timeout(now.into_std());
            if self.dcd && m.is_online() && self.connected_at.is_some_and(|t| now >= t + DCD_SETTLE) {
                // Only a DCD seen high can drop (a three-wire cable reads low for ever), and two low readings in a
                // row: a glitch is not a hang-up.
                match port.read_carrier_detect() {
                    Ok(true) => {
                        self.dcd_seen = true;
                        self.dcd_low = 0;
                    }
                    Ok(false) if self.dcd_seen => {
                        self.dcd_low += 1;
                        if self.dcd_low >= 2 {
                            m.carrier_lost(now.into_std());
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut end_framed = false;
        match &mut self.call {
            Some(Call::Dialup(link)) => link.handle_timeout(now.into_std()),
            Some(Call::Framed { idle_at, in_flight, .. }) if *in_flight == 0 && now >= *idle_at => end_framed = true,
            _ => {}
        }
        if end_framed {
            tracing::info!("no frame within the idle timeout; the call ends");
            self.end_framed_call(now);
        }
    }
}

fn split_tpdu(data: Bytes, tpdu: bool) -> Option<(Option<Tpdu>, Bytes)> {
    if !tpdu {
        return Some((None, data));
    }
    if data.len() < 5 {
        return None;
    }
    let t = Tpdu::parse(data[..5].try_into().expect("5 bytes"));
    Some((Some(t), data.slice(5..)))
}

/// Sleeps until `deadline`, or for ever when there is none (a `select!` arm for the next timer of a core).
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
