//! The dial-up link, host side: the half-duplex `STX data ETX LRC` protocol of modem-attached terminals (Visa-1
//! style), as a state machine without I/O. Bytes from the line and the current time go in; bytes to send, events and
//! the next deadline come out. `protocols/dialup-link.md` describes it byte by byte.
//!
//! A call, as the host sees it: after the modem connects, the host sends ENQ (every `enq_interval`, at most
//! `enq_max` times) until the terminal sends a frame. A good frame is ACKed and handed up as a [`LinkEvent::Request`];
//! a bad one (LRC, parity, too long, not finished in time) is NAKed, and after `max_naks` bad frames in a row the host
//! sends EOT and ends the call. The answer goes back the same way, sent again on NAK or when no ACK comes within the
//! ACK timeout (counted from when the last byte is on the wire at the line's speed), at most `max_sends` times. After
//! an ACKed answer the terminal either sends EOT (the call is over) or another frame (a second message in the call).
//!
//! What "delivered" means matters for money: an answer carrying a PIN counts as delivered only when the terminal ACKs
//! it ([`LinkEvent::Delivered`]). Every other ending ([`LinkEvent::Undelivered`], or the call ending while the answer
//! is still being built) leaves the sale to be reversed by the caller.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// Start of text: opens a frame.
pub const STX: u8 = 0x02;
/// End of text: closes a frame's data; the LRC follows.
pub const ETX: u8 = 0x03;
/// End of transmission: the call is over.
pub const EOT: u8 = 0x04;
/// Enquiry: the host asks the terminal to send.
pub const ENQ: u8 = 0x05;
/// Positive acknowledgement of a frame.
pub const ACK: u8 = 0x06;
/// Negative acknowledgement: send the frame again.
pub const NAK: u8 = 0x15;

/// The longitudinal redundancy check: XOR of every byte after STX up to and including ETX.
pub fn lrc(data: &[u8]) -> u8 {
    data.iter().fold(ETX, |acc, b| acc ^ b)
}

/// `STX data ETX LRC`.
pub fn frame(data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + 3);
    b.put_u8(STX);
    b.put_slice(data);
    b.put_u8(ETX);
    b.put_u8(lrc(data));
    b.freeze()
}

/// Timers and limits of the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// The host sends ENQ to start (modem lines). When false (terminals wired directly), the host waits for STX.
    pub send_enq: bool,
    /// From the start of the call to the first ENQ.
    pub enq_delay: Duration,
    /// Between ENQs.
    pub enq_interval: Duration,
    /// ENQs sent without a frame coming back before the host gives up (EOT).
    pub enq_max: u32,
    /// A frame, once STX came, must be complete (LRC included) within this, and after a NAK the next frame must start
    /// within it.
    pub frame_timeout: Duration,
    /// How long the host waits for ACK or NAK after the last byte of its answer is on the wire.
    pub ack_timeout: Duration,
    /// Bad frames in a row before the host sends EOT.
    pub max_naks: u32,
    /// Times the host sends its answer before it gives up.
    pub max_sends: u32,
    /// After an ACKed answer, how long the host waits for EOT or another frame before it ends the call.
    pub idle_timeout: Duration,
    /// Largest frame data (TPDU and message) accepted; a longer frame is NAKed.
    pub max_frame: usize,
    /// Line speed in bits per second, to know when an answer has left. On a modem line, the call's speed.
    pub baud: u32,
    /// Bits a character takes on the wire: start, data, parity and stop bits (10 for 8N1 and 7E1, 11 for 8E1).
    pub bits_per_char: u32,
    /// Without ENQ (`send_enq = false`): how long the first frame may take to start. `None` waits for ever (a
    /// terminal wired directly, which calls when it has something to say).
    pub first_frame: Option<Duration>,
    /// How long a request may wait for its answer before the host stops waiting (the controller's own deadline
    /// plus a margin); an answer that comes later is undelivered.
    pub answer_timeout: Duration,
    /// Frames start with a 5-byte TPDU (whose bytes may look like control bytes even on a text line).
    pub tpdu: bool,
    /// Transparent (binary) mode: `None` for text data, where the first ETX ends the frame. With binary data (BCD
    /// messages hold 0x03 bytes) a frame ends at `ETX x` followed by this much silence, and `x` is its LRC; the
    /// terminal, half duplex, sends nothing after its frame until the host answers.
    pub inter_char: Option<Duration>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            send_enq: true,
            enq_delay: Duration::ZERO,
            enq_interval: Duration::from_secs(1),
            enq_max: 10,
            frame_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(1),
            max_naks: 3,
            max_sends: 3,
            idle_timeout: Duration::from_secs(15),
            max_frame: 2048,
            baud: 2400,
            bits_per_char: 10,
            first_frame: None,
            answer_timeout: Duration::from_secs(20),
            tpdu: false,
            inter_char: None,
        }
    }
}

impl LinkConfig {
    /// Time `n` bytes take on the wire.
    pub fn wire_time(&self, n: usize) -> Duration {
        wire_time(self.baud, self.bits_per_char, n)
    }

    /// A frame being read is dropped without a word after this much silence in its middle (line noise that looked
    /// like STX must not swallow the terminal's next ACK or EOT).
    fn abandon_after(&self) -> Duration {
        // Error-correcting modems pause inside frames; a pause of a second is not one of those.
        self.inter_char
            .map_or(self.frame_timeout, |q| (q * 4).max(Duration::from_secs(1)))
    }
}

/// Time `n` characters of `bits` bits each take on a line of `baud` bits per second.
pub fn wire_time(baud: u32, bits: u32, n: usize) -> Duration {
    Duration::from_micros(n as u64 * u64::from(bits) * 1_000_000 / u64::from(baud.max(1)))
}

/// Why a frame was refused with NAK.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameFault {
    /// The LRC byte does not match the data.
    #[error("LRC is 0x{found:02X}, the data gives 0x{expected:02X}")]
    BadLrc { expected: u8, found: u8 },
    /// A byte of the frame had the wrong parity (lines with software parity).
    #[error("parity error at byte {offset} of the frame")]
    Parity { offset: usize },
    /// More data than `max_frame` before ETX.
    #[error("frame longer than {max} bytes")]
    TooLong { max: usize },
    /// STX came but the frame was not complete within the frame timeout.
    #[error("frame not complete in time ({received} bytes received)")]
    Timeout { received: usize },
    /// A frame with nothing between STX and ETX.
    #[error("empty frame")]
    Empty,
}

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The terminal sent EOT.
    Eot,
    /// No frame came: ENQs unanswered, or no frame after a NAK within the frame timeout.
    NoRequest,
    /// `max_naks` bad frames in a row; the host sent EOT.
    TooManyNaks,
    /// The answer was not ACKed after `max_sends` tries; the host sent EOT.
    NotAcknowledged,
    /// Nothing came within the idle timeout after an ACKed answer; the host sent EOT.
    Idle,
    /// The carrier went (told by the caller).
    CarrierLost,
}

/// Where the last answer is ([`DialupLink::answer_sent_whole`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AnswerOut {
    None,
    /// Given to the link, not taken by the caller yet.
    Given,
    /// Taken whole to be written to the line.
    Taken,
}

/// What the link tells its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A good frame's data (TPDU and message), already ACKed. Answer it with [`DialupLink::respond`].
    Request(Bytes),
    /// A bad frame was NAKed.
    Rejected(FrameFault),
    /// The terminal ACKed the answer.
    Delivered,
    /// The answer was given to the link but the terminal never ACKed it (sends exhausted, EOT or carrier lost).
    Undelivered,
    /// The call is over; hang up.
    Ended(EndReason),
}

/// Reads one frame after STX.
struct FrameReader {
    /// Text mode: the data so far. Transparent mode: every byte after STX (the last two may be ETX and the LRC).
    buf: Vec<u8>,
    deadline: Instant,
    /// Text mode: ETX seen; the next byte is the LRC.
    want_lrc: bool,
    /// Transparent mode: the bytes end in `ETX x`; if the line stays quiet until then, that was the end.
    quiet_at: Option<Instant>,
    /// The last byte's time: a frame gone quiet in its middle is abandoned.
    last: Instant,
    overflow: bool,
    parity: Option<usize>,
}

enum Read {
    More,
    Good(Vec<u8>),
    Bad(FrameFault),
}

impl FrameReader {
    fn new(deadline: Instant, now: Instant) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            deadline,
            want_lrc: false,
            quiet_at: None,
            last: now,
            overflow: false,
            parity: None,
        }
    }

    fn feed(&mut self, b: u8, cfg: &LinkConfig, now: Instant) -> Read {
        let max = cfg.max_frame;
        self.last = now;
        if let Some(quiet) = cfg.inter_char {
            // Binary data may hold ETX: the frame ends at an ETX and one more byte followed by silence.
            if self.buf.len() < max + 2 {
                self.buf.push(b);
            } else {
                self.overflow = true;
                self.buf.copy_within(1.., 0);
                *self.buf.last_mut().expect("not empty") = b;
            }
            let n = self.buf.len();
            self.quiet_at = (n >= 2 && self.buf[n - 2] == ETX).then(|| now + quiet);
            return Read::More;
        }
        if self.want_lrc {
            let data = std::mem::take(&mut self.buf);
            return self.judge(data, b, max);
        }
        if b == ETX {
            self.want_lrc = true;
        } else if self.buf.len() < max {
            self.buf.push(b);
        } else {
            // Keep reading to ETX so that the NAK comes after the frame, but store nothing more.
            self.overflow = true;
        }
        Read::More
    }

    /// Transparent mode: the line was quiet after `ETX x`.
    fn finish(&mut self, max: usize) -> Read {
        let mut data = std::mem::take(&mut self.buf);
        let lrc_byte = data.pop().expect("ETX and LRC");
        data.pop();
        self.judge(data, lrc_byte, max)
    }

    fn judge(&self, data: Vec<u8>, found: u8, max: usize) -> Read {
        if self.overflow {
            return Read::Bad(FrameFault::TooLong { max });
        }
        if let Some(offset) = self.parity {
            return Read::Bad(FrameFault::Parity { offset });
        }
        let expected = lrc(&data);
        if expected != found {
            return Read::Bad(FrameFault::BadLrc { expected, found });
        }
        if data.is_empty() {
            return Read::Bad(FrameFault::Empty);
        }
        Read::Good(data)
    }
}

enum Phase {
    /// Sending ENQs until a frame starts.
    Enquiring {
        next: Instant,
        sent: u32,
    },
    /// Waiting for a frame (direct lines: without a deadline).
    Waiting {
        deadline: Option<Instant>,
    },
    /// A request was handed up; waiting for [`DialupLink::respond`] until `deadline`.
    Processing {
        deadline: Instant,
    },
    /// The answer is out; waiting for ACK or NAK.
    Sending {
        frame: Bytes,
        sends: u32,
        deadline: Instant,
    },
    /// The answer was ACKed; waiting for EOT or another frame.
    After {
        deadline: Instant,
    },
    Ended(EndReason),
}

/// The host side of one call on a dial-up (or directly wired STX/ETX) line. Its `Debug` shows the state only: the
/// bytes it holds may carry a PIN.
pub struct DialupLink {
    cfg: LinkConfig,
    phase: Phase,
    reader: Option<FrameReader>,
    naks: u32,
    last_request: Option<Vec<u8>>,
    out: BytesMut,
    events: VecDeque<LinkEvent>,
    /// The last answer's first copy: given to the link, and taken by the caller to write to the line.
    answer: AnswerOut,
}

impl std::fmt::Debug for DialupLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match &self.phase {
            Phase::Enquiring { sent, .. } => format!("Enquiring({sent} ENQ)"),
            Phase::Waiting { .. } => "Waiting".into(),
            Phase::Processing { .. } => "Processing".into(),
            Phase::Sending { sends, frame, .. } => format!("Sending({sends}x, {} bytes)", frame.len()),
            Phase::After { .. } => "After".into(),
            Phase::Ended(r) => format!("Ended({r:?})"),
        };
        f.debug_struct("DialupLink")
            .field("phase", &phase)
            .field("reading", &self.reader.as_ref().map(|r| r.buf.len()))
            .field("naks", &self.naks)
            .finish_non_exhaustive()
    }
}

impl DialupLink {
    /// A call that starts now (the modem just connected, or a direct line was opened).
    pub fn new(cfg: LinkConfig, now: Instant) -> DialupLink {
        let phase = if cfg.send_enq {
            Phase::Enquiring {
                next: now + cfg.enq_delay,
                sent: 0,
            }
        } else {
            Phase::Waiting {
                deadline: cfg.first_frame.map(|d| now + d),
            }
        };
        DialupLink {
            cfg,
            phase,
            reader: None,
            naks: 0,
            last_request: None,
            out: BytesMut::new(),
            events: VecDeque::new(),
            answer: AnswerOut::None,
        }
    }

    /// Whether the last answer given to the link ([`respond`](Self::respond)) was taken whole to be written to the
    /// line ([`poll_transmit`](Self::poll_transmit)): an answer not acknowledged after that may have reached the
    /// terminal and been printed, the ACK lost with the line. The host cannot know more (a modem sends at the line's
    /// speed what it was given at once), so in doubt the answer counts as sent: a customer's PIN is never switched
    /// off on a guess.
    pub fn answer_sent_whole(&self) -> bool {
        self.answer == AnswerOut::Taken
    }

    /// Bytes received from the line (parity already stripped).
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        self.handle_input_checked(bytes, &[], now);
    }

    /// Bytes received from a line with software parity; `bad` are the offsets (ascending) of bytes whose parity was
    /// wrong. Such a byte spoils the frame it is in (NAK at its end) and is never read as a control byte.
    pub fn handle_input_checked(&mut self, bytes: &[u8], bad: &[usize], now: Instant) {
        let mut bad = bad.iter().peekable();
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(self.phase, Phase::Ended(_)) {
                return;
            }
            let spoiled = bad.next_if(|&&o| o == i).is_some();
            if spoiled {
                // Never a control byte: inside a frame it spoils the frame (NAK at its end); outside one it starts a
                // spoiled frame (an STX, or a garbled ACK), so that what follows is not read as control bytes either.
                match &mut self.reader {
                    Some(r) => {
                        let offset = r.buf.len();
                        r.parity.get_or_insert(offset);
                        self.feed_reader(b, now);
                    }
                    None => {
                        let mut r = FrameReader::new(now + self.cfg.frame_timeout, now);
                        r.parity = Some(0);
                        self.reader = Some(r);
                    }
                }
                continue;
            }
            self.byte(b, now);
        }
    }

    /// Timers: call at (or after) [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(r) = &mut self.reader {
            if r.quiet_at.is_some_and(|q| now >= q) {
                let read = r.finish(self.cfg.max_frame);
                self.reader = None;
                match read {
                    Read::Good(data) => self.good_frame(data, now),
                    Read::Bad(fault) => self.bad_frame(fault, now),
                    Read::More => {}
                }
                return;
            }
            if now >= r.deadline {
                let received = r.buf.len();
                self.reader = None;
                self.bad_frame(FrameFault::Timeout { received }, now);
                return;
            }
            if r.quiet_at.is_none() && now >= r.last + self.cfg.abandon_after() && self.cfg.inter_char.is_some() {
                // Gone quiet in its middle: noise that looked like STX, dropped without a word.
                self.reader = None;
            }
        }
        match &mut self.phase {
            Phase::Enquiring { next, sent } if self.reader.is_none() && now >= *next => {
                if *sent >= self.cfg.enq_max {
                    self.end_with_eot(EndReason::NoRequest);
                } else {
                    *sent += 1;
                    *next = now + self.cfg.enq_interval;
                    self.out.put_u8(ENQ);
                }
            }
            Phase::Waiting { deadline: Some(d) } if self.reader.is_none() && now >= *d => {
                self.end_with_eot(EndReason::NoRequest)
            }
            Phase::Sending { deadline, .. } if now >= *deadline => self.resend(now),
            Phase::Processing { deadline } if now >= *deadline => {
                // No answer came in time: the host stops waiting (a late answer is undelivered).
                self.phase = Phase::After {
                    deadline: now + self.cfg.idle_timeout,
                };
            }
            Phase::After { deadline } if self.reader.is_none() && now >= *deadline => {
                self.end_with_eot(EndReason::Idle)
            }
            _ => {}
        }
    }

    /// The answer to the last [`LinkEvent::Request`]; `data` is TPDU and message. Returns false (and sends
    /// nothing) when the link is not waiting for an answer: the call ended meanwhile, and the answer is undelivered.
    pub fn respond(&mut self, data: &[u8], now: Instant) -> bool {
        if !matches!(self.phase, Phase::Processing { .. }) {
            return false;
        }
        // A frame coming in meanwhile is read to its end (the terminal sending its request again: it then counts as
        // a NAK); its bytes are never taken for ACK or NAK.
        let f = frame(data);
        self.out.put_slice(&f);
        let deadline = now + self.cfg.wire_time(f.len()) + self.cfg.ack_timeout;
        self.answer = AnswerOut::Given;
        self.phase = Phase::Sending {
            frame: f,
            sends: 1,
            deadline,
        };
        true
    }

    /// No answer will come for the last request (it could not be read, or the answer cannot be sent): the host waits
    /// for the terminal's next move (another frame or EOT) as after an answer.
    pub fn decline(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Processing { .. }) {
            self.phase = Phase::After {
                deadline: now + self.cfg.idle_timeout,
            };
        }
    }

    /// The carrier went: the call ends without a word on the line.
    pub fn carrier_lost(&mut self) {
        if !matches!(self.phase, Phase::Ended(_)) {
            self.end(EndReason::CarrierLost);
        }
    }

    /// Bytes to write to the line, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.answer == AnswerOut::Given && !self.out.is_empty() {
            self.answer = AnswerOut::Taken;
        }
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Enquiring { next, .. } if self.reader.is_none() => Some(*next),
            Phase::Waiting { deadline } if self.reader.is_none() => *deadline,
            Phase::Sending { deadline, .. } | Phase::Processing { deadline } => Some(*deadline),
            Phase::After { deadline } if self.reader.is_none() => Some(*deadline),
            _ => None,
        };
        let abandon = self.cfg.abandon_after();
        let frame = self.reader.as_ref().map(|r| {
            let t = r.quiet_at.map_or(r.deadline, |q| q.min(r.deadline));
            match (self.cfg.inter_char, r.quiet_at) {
                (Some(_), None) => t.min(r.last + abandon),
                _ => t,
            }
        });
        match (phase, frame) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Why the call ended, once it has.
    pub fn ended(&self) -> Option<EndReason> {
        match self.phase {
            Phase::Ended(r) => Some(r),
            _ => None,
        }
    }

    /// A request was handed up and its answer has not been given yet.
    pub fn awaiting_answer(&self) -> bool {
        matches!(self.phase, Phase::Processing { .. })
    }

    fn byte(&mut self, b: u8, now: Instant) {
        if let Some(r) = &self.reader {
            let text = self.cfg.inter_char.is_none();
            let stale = !text && r.quiet_at.is_none() && now >= r.last + self.cfg.abandon_after();
            // The TPDU (5 bytes) may hold any byte, even on a text line.
            let in_tpdu = self.cfg.tpdu && r.buf.len() < 5;
            let control_in_text = text && !r.want_lrc && !in_tpdu && matches!(b, STX | EOT | ENQ | ACK | NAK);
            // While our answer is out, STX then at once ACK or NAK is noise before the terminal's word (no frame of
            // ours starts with those bytes: a TPDU starts 0x60, a BCD MTI 0x01-0x09 but not 0x06).
            let noise_then_ack = matches!(self.phase, Phase::Sending { .. })
                && r.buf.is_empty()
                && !r.want_lrc
                && matches!(b, ACK | NAK);
            if stale || control_in_text || noise_then_ack {
                // What was read was noise. The byte is read afresh (STX starts a new frame).
                self.reader = None;
                return self.byte(b, now);
            }
            self.feed_reader(b, now);
            return;
        }
        match (b, &self.phase) {
            // Also while our answer is out: a frame then is read whole (its bytes are not ACK or NAK) and counts
            // as a NAK.
            (STX, _) => self.reader = Some(FrameReader::new(now + self.cfg.frame_timeout, now)),
            (EOT, _) => self.end(EndReason::Eot),
            (ACK, Phase::Sending { .. }) => {
                self.events.push_back(LinkEvent::Delivered);
                self.phase = Phase::After {
                    deadline: now + self.cfg.idle_timeout,
                };
            }
            (NAK, Phase::Sending { .. }) => self.resend(now),
            // Line noise, modem chatter, a terminal's own ENQ: nothing to answer.
            _ => {}
        }
    }

    fn feed_reader(&mut self, b: u8, now: Instant) {
        let Some(r) = &mut self.reader else { return };
        match r.feed(b, &self.cfg, now) {
            Read::More => {}
            Read::Good(data) => {
                self.reader = None;
                self.good_frame(data, now);
            }
            Read::Bad(fault) => {
                self.reader = None;
                self.bad_frame(fault, now);
            }
        }
    }

    fn good_frame(&mut self, data: Vec<u8>, now: Instant) {
        match self.phase {
            Phase::Processing { .. } => {
                // The terminal did not hear our ACK and sent the request again: ACK it again, do not hand it up twice.
                if self.last_request.as_deref() == Some(&data[..]) {
                    self.out.put_u8(ACK);
                }
            }
            // The terminal did not take our answer and sent its request again: send the answer again.
            Phase::Sending { .. } => self.resend(now),
            Phase::Ended(_) => {}
            _ => {
                self.naks = 0;
                self.out.put_u8(ACK);
                let bytes = Bytes::copy_from_slice(&data);
                self.last_request = Some(data);
                self.events.push_back(LinkEvent::Request(bytes));
                self.phase = Phase::Processing {
                    deadline: now + self.cfg.answer_timeout,
                };
            }
        }
    }

    fn bad_frame(&mut self, fault: FrameFault, now: Instant) {
        if matches!(self.phase, Phase::Sending { .. }) {
            return self.resend(now);
        }
        if matches!(self.phase, Phase::Processing { .. } | Phase::Ended(_)) {
            return;
        }
        self.events.push_back(LinkEvent::Rejected(fault));
        self.naks += 1;
        if self.naks >= self.cfg.max_naks {
            self.end_with_eot(EndReason::TooManyNaks);
            return;
        }
        self.out.put_u8(NAK);
        self.phase = Phase::Waiting {
            deadline: Some(now + self.cfg.frame_timeout),
        };
    }

    fn resend(&mut self, now: Instant) {
        let Phase::Sending { frame, sends, deadline } = &mut self.phase else {
            return;
        };
        if *sends >= self.cfg.max_sends {
            self.end_with_eot(EndReason::NotAcknowledged);
            return;
        }
        *sends += 1;
        *deadline = now + self.cfg.wire_time(frame.len()) + self.cfg.ack_timeout;
        let f = frame.clone();
        self.out.put_slice(&f);
    }

    fn end_with_eot(&mut self, reason: EndReason) {
        self.out.put_u8(EOT);
        self.end(reason);
    }

    fn end(&mut self, reason: EndReason) {
        if matches!(self.phase, Phase::Sending { .. }) {
            self.events.push_back(LinkEvent::Undelivered);
        }
        self.reader = None;
        self.phase = Phase::Ended(reason);
        self.events.push_back(LinkEvent::Ended(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    struct T {
        link: DialupLink,
        now: Instant,
    }

    impl T {
        fn new(cfg: LinkConfig) -> T {
            let now = Instant::now();
            T {
                link: DialupLink::new(cfg, now),
                now,
            }
        }
        fn at(&mut self, after: Duration) -> &mut Self {
            self.now += after;
            self.link.handle_timeout(self.now);
            self
        }
        fn send(&mut self, bytes: &[u8]) -> &mut Self {
            self.link.handle_input(bytes, self.now);
            self
        }
        fn out(&mut self) -> Vec<u8> {
            self.link.poll_transmit().map(|b| b.to_vec()).unwrap_or_default()
        }
        fn events(&mut self) -> Vec<LinkEvent> {
            std::iter::from_fn(|| self.link.poll_event()).collect()
        }
    }

    #[test]
    fn lrc_matches_the_reference_example() {
        // STX "02001234" ETX -> 0x05 (the reference's check value; STX is not included).
        assert_eq!(lrc(b"02001234"), 0x05);
        assert_eq!(&frame(b"02001234")[..], b"\x0202001234\x03\x05");
    }

    #[test]
    fn a_whole_call() {
        let mut t = T::new(LinkConfig::default());
        assert_eq!(t.link.poll_timeout(), Some(t.now));
        t.at(ms(0));
        assert_eq!(t.out(), [ENQ]);
        t.at(ms(1000));
        assert_eq!(t.out(), [ENQ], "ENQ repeats every second");
        t.send(&frame(b"REQ"));
        assert_eq!(t.out(), [ACK]);
        assert_eq!(t.events(), [LinkEvent::Request(Bytes::from_static(b"REQ"))]);
        assert_eq!(
            t.link.poll_timeout(),
            Some(t.now + Duration::from_secs(20)),
            "the answer may take the controller's deadline and a margin"
        );
        assert!(t.link.respond(b"ANSWER", t.now));
        assert_eq!(t.out(), frame(b"ANSWER").to_vec());
        t.send(&[ACK]);
        assert_eq!(t.events(), [LinkEvent::Delivered]);
        t.send(&[EOT]);
        assert_eq!(t.events(), [LinkEvent::Ended(EndReason::Eot)]);
        assert_eq!(t.link.ended(), Some(EndReason::Eot));
        assert_eq!(
            t.out(),
            Vec::<u8>::new(),
            "the host says nothing after the terminal's EOT"
        );
    }

    #[test]
    fn a_frame_split_across_reads_with_noise_before_it() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        let f = frame(b"0200ABC");
        t.send(b"\r\nxx");
        t.send(&f[..3]);
        assert!(t.events().is_empty());
        t.send(&f[3..]);
        assert_eq!(t.events(), [LinkEvent::Request(Bytes::from_static(b"0200ABC"))]);
        assert_eq!(t.out(), [ACK]);
    }

    #[test]
    fn bad_lrc_is_nakked_and_a_good_retry_is_accepted() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        let mut bad = frame(b"REQ").to_vec();
        *bad.last_mut().unwrap() ^= 0xFF;
        t.send(&bad);
        assert_eq!(t.out(), [NAK]);
        assert_eq!(
            t.events(),
            [LinkEvent::Rejected(FrameFault::BadLrc {
                expected: lrc(b"REQ"),
                found: lrc(b"REQ") ^ 0xFF
            })]
        );
        t.at(ms(1500));
        assert_eq!(t.out(), Vec::<u8>::new(), "no ENQ after a NAK: the terminal resends");
        t.send(&frame(b"REQ"));
        assert_eq!(t.out(), [ACK]);
        assert_eq!(t.events(), [LinkEvent::Request(Bytes::from_static(b"REQ"))]);
    }

    #[test]
    fn three_bad_frames_end_the_call_with_eot() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        let mut bad = frame(b"REQ").to_vec();
        *bad.last_mut().unwrap() ^= 1;
        t.send(&bad).send(&bad);
        assert_eq!(t.out(), [NAK, NAK]);
        t.send(&bad);
        assert_eq!(t.out(), [EOT], "the third bad frame gets EOT, not a NAK");
        let ev = t.events();
        assert_eq!(ev.last(), Some(&LinkEvent::Ended(EndReason::TooManyNaks)));
        assert_eq!(ev.len(), 4);
        t.send(&frame(b"REQ"));
        assert!(t.out().is_empty() && t.events().is_empty(), "nothing after the end");
    }

    #[test]
    fn a_good_frame_resets_the_nak_count() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        let mut bad = frame(b"A").to_vec();
        *bad.last_mut().unwrap() ^= 1;
        t.send(&bad).send(&bad).send(&frame(b"A"));
        t.link.respond(b"R", t.now);
        t.send(&[ACK]);
        t.send(&bad).send(&bad);
        assert_eq!(t.out(), [&[NAK, NAK, ACK][..], &frame(b"R"), &[NAK, NAK]].concat());
        assert!(t.link.ended().is_none());
    }

    #[test]
    fn enq_gives_up_after_enq_max() {
        let cfg = LinkConfig {
            enq_max: 3,
            enq_delay: ms(200),
            ..LinkConfig::default()
        };
        let mut t = T::new(cfg);
        t.at(ms(199));
        assert!(t.out().is_empty(), "ENQ waits for enq_delay");
        t.at(ms(1));
        t.at(ms(1000)).at(ms(1000));
        assert_eq!(t.out(), [ENQ, ENQ, ENQ]);
        t.at(ms(999));
        assert!(t.out().is_empty());
        t.at(ms(1));
        assert_eq!(t.out(), [EOT]);
        assert_eq!(t.events(), [LinkEvent::Ended(EndReason::NoRequest)]);
    }

    #[test]
    fn a_frame_not_finished_in_time_is_nakked() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        t.send(b"\x02half");
        assert_eq!(t.link.poll_timeout(), Some(t.now + Duration::from_secs(10)));
        t.at(ms(9_999));
        assert!(t.out().is_empty(), "no ENQ while a frame is coming in");
        t.at(ms(1));
        assert_eq!(t.out(), [NAK]);
        assert_eq!(t.events(), [LinkEvent::Rejected(FrameFault::Timeout { received: 4 })]);
        t.at(ms(10_000));
        assert_eq!(t.out(), [EOT], "nothing after the NAK within the frame timeout");
        assert_eq!(t.events(), [LinkEvent::Ended(EndReason::NoRequest)]);
    }

    #[test]
    fn an_oversize_frame_is_read_to_its_end_and_nakked() {
        let cfg = LinkConfig {
            max_frame: 4,
            ..LinkConfig::default()
        };
        let mut t = T::new(cfg);
        t.at(ms(0));
        t.out();
        t.send(&frame(b"0123456789"));
        assert_eq!(t.out(), [NAK]);
        assert_eq!(t.events(), [LinkEvent::Rejected(FrameFault::TooLong { max: 4 })]);
        t.send(&frame(b"0123"));
        assert_eq!(t.out(), [ACK]);
    }

    #[test]
    fn parity_errors_and_empty_frames_are_nakked() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        let f = frame(b"ABCD");
        t.link.handle_input_checked(&f, &[2], t.now);
        assert_eq!(t.out(), [NAK]);
        assert_eq!(t.events(), [LinkEvent::Rejected(FrameFault::Parity { offset: 1 })]);
        t.send(&frame(b""));
        assert_eq!(t.events(), [LinkEvent::Rejected(FrameFault::Empty)]);
    }

    #[test]
    fn the_answer_is_resent_on_nak_and_on_ack_timeout_then_given_up() {
        let cfg = LinkConfig {
            baud: 1200,
            ..LinkConfig::default()
        };
        let mut t = T::new(cfg);
        t.at(ms(0));
        t.out();
        t.send(&frame(b"REQ"));
        t.out();
        t.events();
        let answer = [b'X'; 117]; // 120 bytes framed: 1 s on the wire at 1200 baud
        t.link.respond(&answer, t.now);
        let f = frame(&answer).to_vec();
        assert_eq!(t.out(), f);
        assert_eq!(
            t.link.poll_timeout(),
            Some(t.now + ms(2000)),
            "wire time plus the ACK timeout"
        );
        t.send(&[NAK]);
        assert_eq!(t.out(), f, "sent again on NAK");
        t.at(ms(1999));
        assert!(t.out().is_empty());
        t.at(ms(1));
        assert_eq!(t.out(), f, "sent again when no ACK came");
        t.at(ms(2000));
        assert_eq!(t.out(), [EOT], "three sends, then EOT");
        assert_eq!(
            t.events(),
            [LinkEvent::Undelivered, LinkEvent::Ended(EndReason::NotAcknowledged)]
        );
    }

    #[test]
    fn carrier_lost_or_eot_before_the_ack_is_undelivered() {
        for lose in [true, false] {
            let mut t = T::new(LinkConfig::default());
            t.at(ms(0));
            t.send(&frame(b"REQ"));
            t.link.respond(b"PIN", t.now);
            t.events();
            if lose {
                t.link.carrier_lost();
            } else {
                t.send(&[EOT]);
            }
            let reason = if lose { EndReason::CarrierLost } else { EndReason::Eot };
            assert_eq!(t.events(), [LinkEvent::Undelivered, LinkEvent::Ended(reason)]);
        }
    }

    #[test]
    fn an_answer_written_whole_but_not_acknowledged_is_told_apart() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.send(&frame(b"REQ"));
        t.out();
        t.events();
        assert!(!t.link.answer_sent_whole(), "no answer yet");
        t.link.respond(b"PIN", t.now);
        // Given to the link but not written yet (the line drops first): nobody can have the PIN.
        assert!(!t.link.answer_sent_whole());
        assert_eq!(t.out(), frame(b"PIN").to_vec());
        // Written whole: an ACK lost with the line leaves a terminal that may have printed it.
        assert!(t.link.answer_sent_whole());
        t.link.carrier_lost();
        assert_eq!(
            t.events(),
            [LinkEvent::Undelivered, LinkEvent::Ended(EndReason::CarrierLost)]
        );
        assert!(t.link.answer_sent_whole(), "still known once the call is over");
    }

    #[test]
    fn the_call_ending_while_the_answer_is_built_refuses_the_answer() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.send(&frame(b"REQ"));
        t.out();
        t.events();
        assert!(t.link.awaiting_answer());
        t.link.carrier_lost();
        assert_eq!(t.events(), [LinkEvent::Ended(EndReason::CarrierLost)]);
        assert!(
            !t.link.respond(b"PIN", t.now),
            "the caller must treat the answer as undelivered"
        );
        assert!(t.out().is_empty());
    }

    #[test]
    fn a_repeated_request_while_processing_is_acked_again_not_handed_up() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.out();
        t.send(&frame(b"REQ"));
        t.events();
        t.send(&frame(b"REQ"));
        assert_eq!(t.out(), [ACK, ACK]);
        assert!(t.events().is_empty());
    }

    #[test]
    fn a_second_message_in_the_same_call_and_idle_end() {
        let mut t = T::new(LinkConfig::default());
        t.at(ms(0));
        t.send(&frame(b"ONE"));
        t.link.respond(b"R1", t.now);
        t.send(&[ACK]);
        t.send(&frame(b"TWO"));
        t.link.respond(b"R2", t.now);
        t.send(&[ACK]);
        let ev = t.events();
        assert_eq!(ev.iter().filter(|e| matches!(e, LinkEvent::Request(_))).count(), 2);
        t.out();
        t.at(ms(14_999));
        assert!(t.link.ended().is_none());
        t.at(ms(1));
        assert_eq!(t.out(), [EOT]);
        assert_eq!(t.link.ended(), Some(EndReason::Idle));
    }

    #[test]
    fn a_direct_line_waits_for_the_terminal_without_enq() {
        let cfg = LinkConfig {
            send_enq: false,
            ..LinkConfig::default()
        };
        let mut t = T::new(cfg);
        assert_eq!(t.link.poll_timeout(), None);
        t.at(Duration::from_secs(3600));
        assert!(t.out().is_empty() && t.link.ended().is_none());
        t.send(&frame(b"REQ"));
        assert_eq!(t.out(), [ACK]);
    }

    fn transparent() -> LinkConfig {
        LinkConfig {
            inter_char: Some(ms(50)),
            ..LinkConfig::default()
        }
    }

    #[test]
    fn binary_data_holding_etx_is_read_whole_in_transparent_mode() {
        let mut t = T::new(transparent());
        t.at(ms(0));
        t.out();
        // ETX (0x03) and STX inside the data, even an ETX followed by a byte, then more data.
        let data = [0x02, 0x00, 0x03, 0x41, 0x03, 0x03, 0x10, 0x99];
        t.send(&frame(&data));
        assert!(t.events().is_empty(), "not before the line is quiet");
        assert_eq!(t.link.poll_timeout(), Some(t.now + ms(50)));
        t.at(ms(49));
        assert!(t.events().is_empty());
        t.at(ms(1));
        assert_eq!(t.out(), [ACK]);
        assert_eq!(t.events(), [LinkEvent::Request(Bytes::copy_from_slice(&data))]);
    }

    #[test]
    fn transparent_mode_a_pause_inside_the_data_is_not_an_end() {
        let mut t = T::new(transparent());
        t.at(ms(0));
        t.out();
        let data = [0x30, 0x03, 0x31, 0x32];
        let f = frame(&data);
        t.send(&f[..3]); // STX 0x30 ETX
        t.at(ms(100));
        t.send(&f[3..4]); // ETX then one byte, then a pause: a candidate end whose LRC is wrong
        t.at(ms(100));
        assert_eq!(t.out(), [NAK], "a wrong LRC after silence is a bad frame");
        // The terminal sends the frame again in one piece.
        t.send(&f);
        t.at(ms(50));
        assert_eq!(t.out(), [ACK]);
        assert_eq!(
            t.events().last(),
            Some(&LinkEvent::Request(Bytes::copy_from_slice(&data)))
        );
    }

    #[test]
    fn transparent_mode_bad_lrc_and_oversize() {
        let mut t = T::new(LinkConfig {
            max_frame: 4,
            ..transparent()
        });
        t.at(ms(0));
        t.out();
        let mut bad = frame(b"AB").to_vec();
        *bad.last_mut().unwrap() ^= 1;
        t.send(&bad).at(ms(50));
        assert_eq!(t.out(), [NAK]);
        t.send(&frame(b"0123456789")).at(ms(50));
        assert_eq!(t.out(), [NAK]);
        let ev = t.events();
        assert!(matches!(ev[0], LinkEvent::Rejected(FrameFault::BadLrc { .. })));
        assert_eq!(ev[1], LinkEvent::Rejected(FrameFault::TooLong { max: 4 }));
        t.send(&frame(b"0123")).at(ms(50));
        assert_eq!(t.out(), [ACK]);
    }

    /// A call with the request answered: the answer is out, waiting for ACK.
    fn answered(cfg: LinkConfig) -> T {
        let mut t = T::new(cfg);
        t.at(ms(0));
        t.send(&frame(b"REQ"));
        if t.link.cfg.inter_char.is_some() {
            t.at(ms(50));
        }
        assert!(t.link.respond(b"PIN", t.now));
        t.out();
        t.events();
        t
    }

    #[test]
    fn noise_that_looks_like_stx_does_not_swallow_the_ack() {
        // Text mode: a control byte cannot be inside a frame.
        let mut t = answered(LinkConfig::default());
        t.send(&[STX, b'x', ACK]);
        assert_eq!(t.events(), [LinkEvent::Delivered]);
        // Transparent mode: the half frame is dropped once the line has been quiet in its middle.
        let mut t = answered(transparent());
        t.send(&[STX, 0x41]);
        t.at(ms(1000));
        t.send(&[ACK]);
        assert_eq!(t.events(), [LinkEvent::Delivered]);
        // A lone STX right before the ACK (noise, then the terminal's word).
        let mut t = answered(transparent());
        t.send(&[STX, ACK]);
        assert_eq!(t.events(), [LinkEvent::Delivered]);
    }

    #[test]
    fn a_garbled_ack_is_no_ack_and_what_follows_a_bad_byte_is_not_read_as_control() {
        let mut t = answered(LinkConfig::default());
        // A parity error on what would have been ACK, then EOT and ACK as part of the spoiled frame's tail... in
        // text mode a real control byte ends the spoiled frame and is read: the second ACK counts.
        t.link.handle_input_checked(&[ACK], &[0], t.now);
        assert!(t.events().is_empty(), "a garbled ACK is no ACK");
        t.link.handle_input_checked(&[ACK], &[], t.now);
        assert_eq!(t.events(), [LinkEvent::Delivered]);
        // In a frame, a bad byte that strips to a control byte is data, not a control byte.
        let mut t = answered(LinkConfig::default());
        t.send(&[STX, b'A']);
        t.link.handle_input_checked(&[ACK], &[0], t.now);
        assert!(t.events().is_empty());
    }

    #[test]
    fn a_tpdu_on_a_text_line_may_hold_control_bytes() {
        let mut t = T::new(LinkConfig {
            tpdu: true,
            ..LinkConfig::default()
        });
        t.at(ms(0));
        t.out();
        let data = [0x60, 0x00, 0x05, 0x00, 0x06, b'0', b'2', b'0', b'0'];
        t.send(&frame(&data));
        assert_eq!(t.out(), [ACK]);
        assert_eq!(t.events(), [LinkEvent::Request(Bytes::copy_from_slice(&data))]);
    }

    #[test]
    fn a_frame_while_the_answer_is_out_counts_as_a_nak() {
        let mut t = answered(LinkConfig::default());
        // The request again, whose LRC happens to be ACK or whose bytes hold EOT, must not end or deliver anything.
        t.send(&frame(b"REQ"));
        assert_eq!(t.out(), frame(b"PIN").to_vec(), "the answer is sent again");
        assert!(t.events().is_empty());
        let data = [0x41, 0x42, 0x44]; // LRC = 0x03 ^ 0x41 ^ 0x42 ^ 0x44 = 0x46; and an EOT inside in binary mode
        let mut t = answered(transparent());
        t.send(&frame(&[0x04, 0x06, data[0]]));
        t.at(ms(50));
        assert_eq!(t.out(), frame(b"PIN").to_vec());
        assert!(
            t.events().is_empty(),
            "neither EOT nor ACK was read from inside a frame"
        );
    }

    #[test]
    fn a_byte_with_a_parity_error_is_never_a_control_byte() {
        let mut t = answered(LinkConfig::default());
        t.link.handle_input_checked(&[ACK, EOT], &[0, 1], t.now);
        assert!(t.events().is_empty() && t.link.ended().is_none());
        t.link.handle_input_checked(&[ACK], &[], t.now);
        assert_eq!(t.events(), [LinkEvent::Delivered]);
    }

    #[test]
    fn an_answer_that_never_comes_ends_the_wait_and_is_refused_later() {
        let mut t = T::new(LinkConfig {
            answer_timeout: ms(5000),
            ..LinkConfig::default()
        });
        t.at(ms(0));
        t.send(&frame(b"REQ"));
        assert_eq!(t.link.poll_timeout(), Some(t.now + ms(5000)));
        t.at(ms(5000));
        assert!(!t.link.awaiting_answer());
        assert!(!t.link.respond(b"PIN", t.now), "too late: the caller reverses it");
        t.at(ms(15_000));
        assert_eq!(t.link.ended(), Some(EndReason::Idle));
    }

    #[test]
    fn without_enq_the_first_frame_has_a_deadline_when_configured() {
        let mut t = T::new(LinkConfig {
            send_enq: false,
            first_frame: Some(ms(3000)),
            ..LinkConfig::default()
        });
        t.at(ms(3000));
        assert_eq!(t.out(), [EOT]);
        assert_eq!(t.link.ended(), Some(EndReason::NoRequest));
    }

    #[test]
    fn wire_time_counts_every_bit_of_a_character() {
        assert_eq!(wire_time(1200, 10, 120), Duration::from_secs(1));
        assert_eq!(wire_time(1200, 11, 120), Duration::from_millis(1100));
    }

    #[test]
    fn debug_output_holds_no_frame_bytes() {
        let t = answered(LinkConfig::default());
        let d = format!("{:?}", t.link);
        assert!(!d.contains("PIN") && d.contains("Sending"), "{d}");
    }
}
