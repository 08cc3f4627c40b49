//! A Hayes modem emulator on one side of a pseudo-terminal, and a dial-up terminal that calls through it: what the
//! gateway's serial lines are tested with, and what `pingate-dialup` runs by hand.
//!
//! The emulator plays the host's modem: the gateway opens the pty's other side as its serial device and talks AT
//! commands to it. The "phone" side of the emulator is in-process: a [`DialupTerminal`] rings the modem, and once the
//! gateway answers, its bytes and the gateway's pass through. The emulator can drop the carrier on command, answer
//! `ERROR` to everything, or stay silent, and it records every byte with its time (a session transcript).
//!
//! Guard times are real time here (this drives real ptys); keep them short in tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialStream};

use crate::link::dialup::{frame, lrc, ACK, ENQ, EOT, ETX, NAK, STX};
use crate::link::parity::{self, Parity};

/// How the emulated modem answers commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandReply {
    /// `OK` to every command (the normal modem).
    Ok,
    /// `ERROR` to every command (a broken or wrongly configured modem).
    Error,
    /// Nothing at all (a modem that is off).
    Silent,
}

/// Settings of the emulated modem.
#[derive(Clone, Debug)]
pub struct ModemOptions {
    /// The result line when a call connects.
    pub connect: String,
    pub replies: CommandReply,
    /// Escape guard time (S12): `+++` counts only with this much silence before and after it.
    pub guard: Duration,
    /// The line's parity (7-bit lines): commands are read without it, result codes are sent with it.
    pub parity: Parity,
    /// Caller ID: after the first RING of a call the modem reports `DATE`, `TIME` and `NMBR = this` (as modems do
    /// with `AT+VCID=1`); `None`: no caller ID.
    pub caller_id: Option<String>,
}

impl Default for ModemOptions {
    fn default() -> Self {
        ModemOptions {
            connect: "CONNECT 2400/ARQ".into(),
            replies: CommandReply::Ok,
            guard: Duration::from_millis(50),
            parity: Parity::None,
            caller_id: None,
        }
    }
}

/// Who sent a byte of the transcript.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The gateway (host) to its modem and, online, to the terminal.
    Host,
    /// The modem or the terminal to the gateway.
    Line,
}

/// One chunk of the transcript: when (since the emulator started), who, what. Its `Debug` leaves the bytes out
/// (answers carry PINs).
#[derive(Clone)]
pub struct Chunk {
    pub at: Duration,
    pub dir: Dir,
    pub bytes: Bytes,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("at", &self.at)
            .field("dir", &self.dir)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What the phone side hears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PhoneSignal {
    /// The host's modem answered: the result line it got.
    Connected(String),
    /// Bytes from the host.
    Data(Bytes),
    /// The host hung up (or the carrier was dropped).
    Hangup,
}

enum Control {
    Ring,
    DropCarrier,
    PhoneData(Bytes),
    PhoneHangup,
    Replies(CommandReply),
}

/// Drives an emulated modem. Dropping every handle stops it and closes the pty (the line "is removed").
#[derive(Clone)]
pub struct ModemHandle {
    control: mpsc::UnboundedSender<Control>,
    transcript: Arc<Mutex<Vec<Chunk>>>,
    commands: Arc<Mutex<Vec<String>>>,
    phone: Arc<Mutex<Option<mpsc::UnboundedSender<PhoneSignal>>>>,
    state: watch::Receiver<&'static str>,
    stop: Arc<tokio_util::sync::CancellationToken>,
    /// The pty's other side, for the gateway.
    pub device: String,
}

impl ModemHandle {
    /// The AT commands the host sent, in order.
    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().expect("not poisoned").clone()
    }

    /// Every byte each way, with times.
    pub fn transcript(&self) -> Vec<Chunk> {
        self.transcript.lock().expect("not poisoned").clone()
    }

    /// `command` or `online`.
    pub fn state(&self) -> watch::Receiver<&'static str> {
        self.state.clone()
    }

    /// Drops the carrier: `NO CARRIER` to the host, hang-up to the phone.
    pub fn drop_carrier(&self) {
        let _ = self.control.send(Control::DropCarrier);
    }

    /// From now on, answer every command this way.
    pub fn set_replies(&self, r: CommandReply) {
        let _ = self.control.send(Control::Replies(r));
    }

    /// Removes the line: the emulator stops and its side of the pty closes.
    pub fn remove(&self) {
        self.stop.cancel();
    }

    /// Rings the modem for a new call; the phone hears what happens on the returned receiver.
    pub fn dial(&self) -> Phone {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.phone.lock().expect("not poisoned") = Some(tx);
        let _ = self.control.send(Control::Ring);
        Phone {
            rx,
            control: self.control.clone(),
            parity: Parity::None,
            parity_errors: 0,
        }
    }
}

/// The phone end of a call.
pub struct Phone {
    rx: mpsc::UnboundedReceiver<PhoneSignal>,
    control: mpsc::UnboundedSender<Control>,
    /// The terminal's parity on a 7-bit line.
    pub parity: Parity,
    /// Bytes received with a parity error.
    pub parity_errors: usize,
}

impl Phone {
    pub fn send(&self, bytes: &[u8]) {
        let mut b = bytes.to_vec();
        if parity::add(&mut b, self.parity).is_err() {
            // Eight-bit data on a seven-bit line goes out as it is (and the host will refuse it).
            b = bytes.to_vec();
        }
        let _ = self.control.send(Control::PhoneData(Bytes::from(b)));
    }

    pub async fn recv(&mut self) -> Option<PhoneSignal> {
        match self.rx.recv().await {
            Some(PhoneSignal::Data(b)) if self.parity != Parity::None => {
                let mut b = b.to_vec();
                self.parity_errors += parity::strip(&mut b, self.parity).len();
                Some(PhoneSignal::Data(Bytes::from(b)))
            }
            other => other,
        }
    }

    /// The terminal hangs up.
    pub fn hang_up(&self) {
        let _ = self.control.send(Control::PhoneHangup);
    }
}

/// A pty pair with an emulated modem on one side; the gateway opens [`ModemHandle::device`].
pub fn start_modem(opts: ModemOptions) -> std::io::Result<ModemHandle> {
    let (master, slave) = SerialStream::pair().map_err(std::io::Error::other)?;
    let device = slave
        .name()
        .ok_or_else(|| std::io::Error::other("the pty has no name"))?;
    let (control, control_rx) = mpsc::unbounded_channel();
    let (state_tx, state) = watch::channel("command");
    let h = ModemHandle {
        control,
        transcript: Arc::default(),
        commands: Arc::default(),
        phone: Arc::default(),
        state,
        stop: Arc::default(),
        device,
    };
    let emu = Emulator {
        opts,
        h: h.clone(),
        state_tx,
        echo: true,
        verbose: true,
        auto_rings: 0,
        online: false,
        ringing: false,
        rings: 0,
        caller_id_sent: false,
        line: Vec::new(),
        started: Instant::now(),
        last_host: Instant::now(),
        escape_at: None,
    };
    // The slave stays open in the task so that the master reads nothing but EIO-free silence until the gateway opens
    // the device; both close when the emulator stops.
    tokio::spawn(emu.run(master, slave, control_rx));
    Ok(h)
}

struct Emulator {
    opts: ModemOptions,
    h: ModemHandle,
    state_tx: watch::Sender<&'static str>,
    echo: bool,
    verbose: bool,
    /// S0: rings before the modem answers by itself (0: the host answers with ATA).
    auto_rings: u32,
    online: bool,
    ringing: bool,
    /// Rings of the current call so far.
    rings: u32,
    /// The caller's number was reported for the current call.
    caller_id_sent: bool,
    line: Vec<u8>,
    started: Instant,
    last_host: Instant,
    /// `+++` seen after a guard time: escape when the host stays silent until then.
    escape_at: Option<Instant>,
}

impl Emulator {
    async fn run(
        mut self,
        mut master: SerialStream,
        slave: SerialStream,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let _slave = slave;
        let mut buf = vec![0u8; 1024];
        let stop = self.h.stop.clone();
        let mut ring_timer: Option<Instant> = None;
        loop {
            let deadline = [self.escape_at, ring_timer].into_iter().flatten().min();
            tokio::select! {
                _ = stop.cancelled() => return,
                r = master.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let bytes = Bytes::copy_from_slice(&buf[..n]);
                        self.record(Dir::Host, bytes.clone());
                        let out = self.host_bytes(&bytes);
                        let out = self.with_parity(out);
                        if !out.is_empty() && self.write(&mut master, &out).await.is_err() {
                            return;
                        }
                    }
                },
                c = control.recv() => {
                    let Some(c) = c else { return };
                    let out = match c {
                        Control::Ring => {
                            self.ringing = true;
                            self.rings = 0;
                            self.caller_id_sent = false;
                            ring_timer = Some(Instant::now());
                            Vec::new()
                        }
                        Control::DropCarrier | Control::PhoneHangup => {
                            let out = self.carrier_gone();
                            self.with_parity(out)
                        }
                        Control::PhoneData(b) => if self.online { b.to_vec() } else { Vec::new() },
                        Control::Replies(r) => { self.opts.replies = r; Vec::new() }
                    };
                    if !out.is_empty() && self.write(&mut master, &out).await.is_err() {
                        return;
                    }
                },
                // With no timer pending the branch is off: its future is made but never polled.
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let now = Instant::now();
                    let mut out = Vec::new();
                    if self.escape_at.is_some_and(|t| now >= t) {
                        self.escape_at = None;
                        self.set_online(false);
                        out.extend_from_slice(&self.result("OK", 0));
                    }
                    if ring_timer.is_some_and(|t| now >= t) {
                        ring_timer = None;
                        if self.ringing && !self.online {
                            out.extend_from_slice(&self.result("RING", 2));
                            if let (false, Some(n)) = (self.caller_id_sent, &self.opts.caller_id) {
                                self.caller_id_sent = true;
                                out.extend_from_slice(format!("\r\nDATE = 1206\r\nTIME = 1412\r\nNMBR = {n}\r\n").as_bytes());
                            }
                            self.auto_ring_count_down(&mut out);
                            if self.ringing && !self.online {
                                ring_timer = Some(now + Duration::from_millis(500));
                            }
                        }
                    }
                    let out = self.with_parity(out);
                    if !out.is_empty() && self.write(&mut master, &out).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The modem's own words on a 7-bit line carry its parity.
    fn with_parity(&self, mut out: Vec<u8>) -> Vec<u8> {
        if parity::add(&mut out, self.opts.parity).is_err() {
            // Online data from the host is passed on as it came; only text reaches here.
        }
        out
    }

    fn auto_ring_count_down(&mut self, out: &mut Vec<u8>) {
        self.rings += 1;
        if self.auto_rings > 0 && self.rings >= self.auto_rings {
            out.extend_from_slice(&self.connect());
        }
    }

    async fn write(&mut self, master: &mut SerialStream, out: &[u8]) -> std::io::Result<()> {
        self.record(Dir::Line, Bytes::copy_from_slice(out));
        master.write_all(out).await
    }

    fn record(&self, dir: Dir, bytes: Bytes) {
        self.h.transcript.lock().expect("not poisoned").push(Chunk {
            at: self.started.elapsed(),
            dir,
            bytes,
        });
    }

    fn set_online(&mut self, on: bool) {
        self.online = on;
        let _ = self.state_tx.send(if on { "online" } else { "command" });
    }

    fn to_phone(&self, s: PhoneSignal) {
        if let Some(p) = &*self.h.phone.lock().expect("not poisoned") {
            let _ = p.send(s);
        }
    }

    /// Tells the phone of the current call that it is over, and forgets it, in one step (a new call may be dialled
    /// at once, from another thread).
    fn hang_up_phone(&self) {
        if let Some(p) = self.h.phone.lock().expect("not poisoned").take() {
            let _ = p.send(PhoneSignal::Hangup);
        }
    }

    fn result(&self, text: &str, code: u8) -> Vec<u8> {
        if self.verbose {
            format!("\r\n{text}\r\n").into_bytes()
        } else {
            format!("{code}\r").into_bytes()
        }
    }

    fn connect(&mut self) -> Vec<u8> {
        self.ringing = false;
        self.set_online(true);
        self.to_phone(PhoneSignal::Connected(self.opts.connect.clone()));
        self.result(&self.opts.connect.clone(), 1)
    }

    /// The call is over from the line's side.
    fn carrier_gone(&mut self) -> Vec<u8> {
        self.ringing = false;
        self.escape_at = None;
        self.hang_up_phone();
        if self.online {
            self.set_online(false);
            return self.result("NO CARRIER", 3);
        }
        Vec::new()
    }

    fn host_bytes(&mut self, bytes: &[u8]) -> Vec<u8> {
        let now = Instant::now();
        let quiet_before = now.duration_since(self.last_host) >= self.opts.guard;
        self.last_host = now;
        if self.online {
            if bytes == b"+++" && quiet_before {
                self.escape_at = Some(now + self.opts.guard);
                return Vec::new();
            }
            self.escape_at = None;
            self.to_phone(PhoneSignal::Data(Bytes::copy_from_slice(bytes)));
            return Vec::new();
        }
        let mut bytes = bytes.to_vec();
        parity::strip(&mut bytes, self.opts.parity);
        let mut out = Vec::new();
        for &b in &bytes {
            if self.echo {
                out.push(b);
            }
            if b == b'\r' {
                let line = String::from_utf8_lossy(&std::mem::take(&mut self.line))
                    .trim()
                    .to_string();
                if !line.is_empty() {
                    out.extend(self.command(&line));
                }
            } else if b != b'\n' && self.line.len() < 256 {
                self.line.push(b);
            }
        }
        out
    }

    fn command(&mut self, line: &str) -> Vec<u8> {
        self.h.commands.lock().expect("not poisoned").push(line.to_string());
        match self.opts.replies {
            CommandReply::Silent => return Vec::new(),
            CommandReply::Error => return self.result("ERROR", 4),
            CommandReply::Ok => {}
        }
        let upper = line.to_ascii_uppercase();
        let Some(body) = upper.strip_prefix("AT") else {
            return self.result("ERROR", 4);
        };
        if body.starts_with('Z') {
            self.echo = true;
            self.verbose = true;
            self.auto_rings = 0;
        }
        if body.contains("E0") {
            self.echo = false;
        }
        if body.contains("E1") {
            self.echo = true;
        }
        if body.contains("V0") {
            self.verbose = false;
        }
        if body.contains("V1") {
            self.verbose = true;
        }
        if let Some(i) = body.find("S0=") {
            self.auto_rings = body[i + 3..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap_or(0);
        }
        if body == "A" {
            return if self.ringing {
                self.connect()
            } else {
                self.result("NO CARRIER", 3)
            };
        }
        if body.starts_with('H') {
            // On hook: a call still up (after +++) ends for the phone too.
            self.ringing = false;
            self.hang_up_phone();
        }
        self.result("OK", 0)
    }
}

/// How a simulated dial-up terminal behaves in a call.
#[derive(Clone, Debug)]
pub struct CallScript {
    /// Frames sent with a wrong LRC before the good one.
    pub bad_frames: u32,
    /// Whether the terminal ACKs the answer. When false it drops the line instead (carrier lost before the ACK).
    pub ack_answer: bool,
    /// Time allowed for each step (connect, ENQ, ACK, answer).
    pub step_timeout: Duration,
    /// Silence after `ETX x` that ends the host's frame.
    pub quiet: Duration,
    /// The line's parity (7-bit lines): added to what the terminal sends, checked and stripped from what it gets.
    pub parity: Parity,
}

impl Default for CallScript {
    fn default() -> Self {
        CallScript {
            bad_frames: 0,
            ack_answer: true,
            step_timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(100),
            parity: Parity::None,
        }
    }
}

/// What happened in a call.
#[derive(Clone, Debug, Default)]
pub struct CallOutcome {
    /// The connect line the terminal's modem reported.
    pub connect: Option<String>,
    /// NAKs the host sent.
    pub naks: u32,
    /// The host ended the call with EOT before answering (e.g. after too many bad frames).
    pub host_eot: bool,
    /// The answer's data (TPDU and message), when one came with a good LRC.
    pub answer: Option<Bytes>,
    /// Frames the host sent (first answer and retransmissions).
    pub answer_frames: u32,
    /// The host hung up at the end.
    pub hung_up: bool,
}

/// A dial-up terminal calling through an emulated modem.
pub struct DialupTerminal;

/// Errors of a simulated call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A step did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The host hung up before the step.
    #[error("the host hung up while waiting for {0}")]
    HungUp(&'static str),
}

impl DialupTerminal {
    /// One call: dial, wait for ENQ, send `request` (TPDU and message) framed, ACK the answer, send EOT.
    pub async fn call(modem: &ModemHandle, request: &[u8], script: &CallScript) -> Result<CallOutcome, CallError> {
        let mut phone = modem.dial();
        phone.parity = script.parity;
        let mut out = CallOutcome::default();
        let mut bytes: Vec<u8> = Vec::new();
        let t = script.step_timeout;
        // Connected.
        match next(&mut phone, t, "CONNECT").await? {
            PhoneSignal::Connected(c) => out.connect = Some(c),
            PhoneSignal::Hangup => return Err(CallError::HungUp("CONNECT")),
            PhoneSignal::Data(b) => bytes.extend_from_slice(&b),
        }
        // ENQ.
        wait_byte(&mut phone, &mut bytes, t, "ENQ", |b| b == ENQ).await?;
        let good = frame(request);
        let mut bad = good.to_vec();
        *bad.last_mut().expect("framed") ^= 0x55;
        for _ in 0..script.bad_frames {
            phone.send(&bad);
            match wait_byte(&mut phone, &mut bytes, t, "ACK/NAK", |b| {
                b == ACK || b == NAK || b == EOT
            })
            .await?
            {
                NAK => out.naks += 1,
                EOT => {
                    out.host_eot = true;
                    out.hung_up = wait_hangup(&mut phone, t).await;
                    return Ok(out);
                }
                _ => {}
            }
        }
        phone.send(&good);
        loop {
            match wait_byte(&mut phone, &mut bytes, t, "ACK", |b| b == ACK || b == NAK || b == EOT).await? {
                ACK => break,
                NAK => {
                    out.naks += 1;
                    phone.send(&good);
                }
                _ => {
                    out.host_eot = true;
                    out.hung_up = wait_hangup(&mut phone, t).await;
                    return Ok(out);
                }
            }
        }
        // The answer: STX, then bytes until `ETX x` and a quiet line (binary data may hold ETX; x is the LRC).
        wait_byte(&mut phone, &mut bytes, t, "STX", |b| b == STX).await?;
        loop {
            let n = bytes.len();
            let candidate = n >= 2 && bytes[n - 2] == ETX;
            let wait = if candidate { script.quiet } else { t };
            match tokio::time::timeout(wait, phone.recv()).await {
                Ok(Some(PhoneSignal::Data(b))) => bytes.extend_from_slice(&b),
                Ok(Some(PhoneSignal::Connected(_))) => {}
                Ok(_) => return Err(CallError::HungUp("the answer")),
                Err(_) if candidate => {
                    let data = bytes[..n - 2].to_vec();
                    let got = bytes[n - 1];
                    bytes.clear();
                    out.answer_frames += 1;
                    if got == lrc(&data) {
                        out.answer = Some(Bytes::from(data));
                        break;
                    }
                    phone.send(&[NAK]);
                    wait_byte(&mut phone, &mut bytes, t, "STX", |b| b == STX).await?;
                }
                Err(_) => return Err(CallError::Timeout("the answer")),
            }
        }
        if !script.ack_answer {
            phone.hang_up();
            return Ok(out);
        }
        phone.send(&[ACK]);
        phone.send(&[EOT]);
        out.hung_up = wait_hangup(&mut phone, t).await;
        Ok(out)
    }
}

async fn next(phone: &mut Phone, t: Duration, what: &'static str) -> Result<PhoneSignal, CallError> {
    match tokio::time::timeout(t, phone.recv()).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(CallError::HungUp(what)),
        Err(_) => Err(CallError::Timeout(what)),
    }
}

/// Reads until a byte `want` accepts; bytes before it are dropped, bytes after it stay in `buf`.
async fn wait_byte(
    phone: &mut Phone,
    buf: &mut Vec<u8>,
    t: Duration,
    what: &'static str,
    want: impl Fn(u8) -> bool,
) -> Result<u8, CallError> {
    loop {
        if let Some(i) = buf.iter().position(|&b| want(b)) {
            let b = buf[i];
            buf.drain(..=i);
            return Ok(b);
        }
        buf.clear();
        match next(phone, t, what).await? {
            PhoneSignal::Data(b) => buf.extend_from_slice(&b),
            PhoneSignal::Hangup => return Err(CallError::HungUp(what)),
            PhoneSignal::Connected(_) => {}
        }
    }
}

async fn wait_hangup(phone: &mut Phone, t: Duration) -> bool {
    loop {
        match tokio::time::timeout(t, phone.recv()).await {
            Ok(Some(PhoneSignal::Hangup)) | Ok(None) => return true,
            Ok(Some(_)) => {}
            Err(_) => return false,
        }
    }
}

/// How a terminal wired to a serial line frames its messages.
#[derive(Clone, Debug)]
pub enum LineMode {
    /// `STX data ETX LRC`, ACK/NAK, EOT at the end; the host's frames end at `ETX x` and `quiet` of silence.
    StxEtx { quiet: Duration },
    /// A length header, as on TCP.
    Framed(crate::link::framing::Framing),
}

/// A terminal wired to a serial line (no modem), over any byte stream: a serial port, or one side of a pty.
pub struct LineTerminal<S> {
    stream: S,
    mode: LineMode,
    parity: Parity,
    /// Time allowed for each step (ACK, answer).
    timeout: Duration,
    buf: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LineTerminal<S> {
    pub fn new(stream: S, mode: LineMode, parity: Parity, timeout: Duration) -> LineTerminal<S> {
        LineTerminal {
            stream,
            mode,
            parity,
            timeout,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), CallError> {
        let mut b = bytes.to_vec();
        if parity::add(&mut b, self.parity).is_err() {
            b = bytes.to_vec();
        }
        self.stream
            .write_all(&b)
            .await
            .map_err(|_| CallError::HungUp("a write"))
    }

    /// Reads more bytes (parity stripped); `Ok(false)` when nothing came within `wait`.
    async fn more(&mut self, wait: Duration, what: &'static str) -> Result<bool, CallError> {
        let mut b = [0u8; 512];
        match tokio::time::timeout(wait, self.stream.read(&mut b)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) | Ok(Err(_)) => Err(CallError::HungUp(what)),
            Ok(Ok(n)) => {
                let mut got = b[..n].to_vec();
                parity::strip(&mut got, self.parity);
                self.buf.extend_from_slice(&got);
                Ok(true)
            }
        }
    }

    /// Sends a request (TPDU and message) and returns the answer (TPDU and message).
    pub async fn exchange(&mut self, data: &[u8]) -> Result<Bytes, CallError> {
        match self.mode.clone() {
            LineMode::Framed(framing) => {
                use tokio_util::codec::{Decoder, Encoder};
                let mut codec = crate::link::framing::FrameCodec::new(framing, false, 0xFFFF);
                let mut out = bytes::BytesMut::new();
                codec
                    .encode(
                        crate::link::framing::Frame {
                            tpdu: None,
                            message: Bytes::copy_from_slice(data),
                        },
                        &mut out,
                    )
                    .map_err(|_| CallError::HungUp("framing the request"))?;
                self.send(&out).await?;
                loop {
                    let mut b = bytes::BytesMut::from(&self.buf[..]);
                    if let Ok(Some(f)) = codec.decode(&mut b) {
                        self.buf = b.to_vec();
                        if f.message.is_empty() {
                            continue;
                        }
                        return Ok(f.message);
                    }
                    if !self.more(self.timeout, "the answer").await? {
                        return Err(CallError::Timeout("the answer"));
                    }
                }
            }
            LineMode::StxEtx { quiet } => {
                let f = frame(data);
                let mut sends = 0;
                // The request, until ACKed.
                loop {
                    sends += 1;
                    self.buf.clear();
                    self.send(&f).await?;
                    let got = loop {
                        if let Some(i) = self.buf.iter().position(|&b| matches!(b, ACK | NAK | EOT)) {
                            let b = self.buf[i];
                            self.buf.drain(..=i);
                            break Some(b);
                        }
                        self.buf.clear();
                        if !self.more(self.timeout, "ACK").await? {
                            break None;
                        }
                    };
                    match got {
                        Some(ACK) => break,
                        Some(EOT) => return Err(CallError::HungUp("ACK")),
                        _ if sends >= 3 => return Err(CallError::Timeout("ACK")),
                        _ => {}
                    }
                }
                // The answer: STX, then up to `ETX x` and a quiet line.
                loop {
                    while !self.buf.contains(&STX) {
                        self.buf.clear();
                        if !self.more(self.timeout, "STX").await? {
                            return Err(CallError::Timeout("the answer"));
                        }
                    }
                    let i = self.buf.iter().position(|&b| b == STX).expect("present");
                    self.buf.drain(..=i);
                    loop {
                        let n = self.buf.len();
                        let candidate = n >= 2 && self.buf[n - 2] == ETX;
                        let wait = if candidate { quiet } else { self.timeout };
                        if !self.more(wait, "the answer").await? {
                            if !candidate {
                                return Err(CallError::Timeout("the answer"));
                            }
                            let data = self.buf[..n - 2].to_vec();
                            let ok = self.buf[n - 1] == lrc(&data);
                            self.buf.clear();
                            if ok {
                                self.send(&[ACK]).await?;
                                return Ok(Bytes::from(data));
                            }
                            self.send(&[NAK]).await?;
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Ends the session (EOT on STX/ETX lines).
    pub async fn end(&mut self) {
        if matches!(self.mode, LineMode::StxEtx { .. }) {
            let _ = self.send(&[EOT]).await;
        }
    }
}

/// A [`LineTerminal`] that speaks messages of a dialect, behind a TPDU if the line carries one.
pub struct LineClient<S> {
    pub line: LineTerminal<S>,
    pub dialect: std::sync::Arc<crate::iso8583::Dialect>,
    pub tpdu: Option<crate::link::framing::Tpdu>,
    /// Requests are MACed with their terminal's key (`--mac-key-file`).
    pub mac: Option<crate::traffic::secure::MacSigner>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> crate::traffic::scenario::Exchange
    for LineClient<S>
{
    async fn exchange(&mut self, msg: &crate::iso8583::Message) -> Result<crate::iso8583::Message, String> {
        let body = match &self.mac {
            Some(m) => m.sign(&self.dialect, msg).map_err(|e| e.to_string())?,
            None => self.dialect.encode(msg).map_err(|e| e.to_string())?,
        };
        let mut data = Vec::new();
        if let Some(t) = self.tpdu {
            data.extend_from_slice(&t.bytes());
        }
        data.extend_from_slice(&body);
        let answer = self.line.exchange(&data).await.map_err(|e| e.to_string())?;
        let skip = if self.tpdu.is_some() { 5.min(answer.len()) } else { 0 };
        self.dialect.decode(&answer.slice(skip..)).map_err(|e| e.to_string())
    }
}
