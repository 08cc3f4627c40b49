//! The host's Hayes (AT) modem controller, as a state machine without I/O: bytes from the port, the current time
//! and the carrier-detect line (where the port has one) go in; bytes to write, DTR changes, data for the link, events
//! and the next deadline come out. `protocols/dialup-link.md` describes the conversation.
//!
//! Life of a modem line: initialise (each command of the init string must answer `OK`; a modem that answers
//! `ERROR` or nothing is retried, then reported and tried again later) → ready (answer on `RING` with `ATA`, or let
//! the modem auto-answer) → online after `CONNECT` (the speed is recorded; bytes are the terminal's) → hang up (drop
//! DTR where the port has modem-control lines, else `+++` between guard times and `ATH0`) → initialise again, which
//! re-arms the line. An idle modem is re-initialised periodically. The carrier going (`NO CARRIER` from the modem, or
//! DCD dropping) ends the call at any point.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// How incoming calls are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerMode {
    /// The host answers with `ATA` after this many `RING`s (the modem's `S0=0`).
    Host { rings: u32 },
    /// The modem answers by itself (`S0=n` in the init string); the host waits for `CONNECT`.
    Auto,
}

/// Commands and timers of a modem line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModemConfig {
    /// Sent one by one, each must answer `OK`.
    pub init: Vec<String>,
    pub answer: AnswerMode,
    /// Time for a command's result code.
    pub command_timeout: Duration,
    /// Tries of the whole init string before the modem is reported as not answering.
    pub init_attempts: u32,
    /// After the init failed `init_attempts` times, wait this long before trying again.
    pub retry_after: Duration,
    /// From `ATA` (or the first `RING` in auto-answer) to `CONNECT` (the modem's S7 is usually 50-60 s).
    pub connect_timeout: Duration,
    /// Silence before and after `+++` (the modem's S12; 1 s by default).
    pub guard_time: Duration,
    /// How long DTR is held low to hang up.
    pub dtr_drop: Duration,
    /// An idle modem is re-initialised this often.
    pub reinit_every: Duration,
}

impl Default for ModemConfig {
    fn default() -> Self {
        ModemConfig {
            init: ["ATZ", "ATE0V1Q0", "AT&C1&D2", "ATS0=0"].map(String::from).to_vec(),
            answer: AnswerMode::Host { rings: 1 },
            command_timeout: Duration::from_secs(3),
            init_attempts: 3,
            retry_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(60),
            guard_time: Duration::from_millis(1200),
            dtr_drop: Duration::from_secs(1),
            reinit_every: Duration::from_secs(120),
        }
    }
}

/// A result code, verbose (`CONNECT 2400/ARQ`) or numeric (`10`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultCode {
    Ok,
    /// `CONNECT`, with the speed and what follows it (`ARQ/V42BIS`) when given.
    Connect {
        speed: Option<u32>,
        protocol: Option<String>,
    },
    Ring,
    NoCarrier,
    Error,
    NoDialtone,
    Busy,
    NoAnswer,
}

impl ResultCode {
    /// Reads one result line (without CR/LF). `None` for anything else (an echo, an informational line).
    pub fn parse(line: &str) -> Option<ResultCode> {
        let line = line.trim();
        if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) {
            // Numeric codes (V0); codes above 10 differ between vendors.
            return Some(match line.parse::<u32>().ok()? {
                0 => ResultCode::Ok,
                1 => ResultCode::Connect {
                    speed: None,
                    protocol: None,
                },
                2 => ResultCode::Ring,
                3 => ResultCode::NoCarrier,
                4 => ResultCode::Error,
                5 => ResultCode::Connect {
                    speed: Some(1200),
                    protocol: None,
                },
                6 => ResultCode::NoDialtone,
                7 => ResultCode::Busy,
                8 => ResultCode::NoAnswer,
                10 => ResultCode::Connect {
                    speed: Some(2400),
                    protocol: None,
                },
                _ => return None,
            });
        }
        let upper = line.to_ascii_uppercase();
        Some(match upper.as_str() {
            "OK" => ResultCode::Ok,
            "RING" => ResultCode::Ring,
            "NO CARRIER" => ResultCode::NoCarrier,
            "ERROR" => ResultCode::Error,
            "NO DIALTONE" | "NO DIAL TONE" => ResultCode::NoDialtone,
            "BUSY" => ResultCode::Busy,
            "NO ANSWER" => ResultCode::NoAnswer,
            _ => {
                let rest = upper.strip_prefix("CONNECT")?;
                if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('/')) {
                    return None;
                }
                // `CONNECT 2400/ARQ/V42BIS`, `CONNECT 9600 V42BIS`, `CONNECT/ARQ`: digits are the speed, the rest
                // (without its separator) the protocol.
                let rest = rest.trim_start();
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let speed = if digits == 0 { None } else { rest[..digits].parse().ok() };
                let protocol = rest[digits..].trim_start_matches(['/', ' ']).trim();
                ResultCode::Connect {
                    speed,
                    protocol: (!protocol.is_empty()).then(|| protocol.to_string()),
                }
            }
        })
    }
}

/// What the controller tells its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModemEvent {
    /// The init string was accepted; the line waits for calls.
    Ready,
    /// One try of the init string failed at `command`: `reply` is what the modem said (`None`: nothing in time).
    InitFailed {
        command: String,
        reply: Option<String>,
        attempt: u32,
    },
    /// Every try failed: the modem does not answer. It is tried again after `retry_after`.
    NotAnswering,
    Ring,
    /// A call is up; the bytes from now on are the terminal's.
    Connected {
        speed: Option<u32>,
        protocol: Option<String>,
    },
    /// A call did not come up (a result code other than CONNECT, or none in time).
    CallFailed {
        reply: Option<ResultCode>,
    },
    /// The carrier went during the call.
    CarrierLost,
    /// The hang-up finished (or was given up on); the line is being re-armed.
    HungUp,
}

#[derive(Debug)]
enum Hangup {
    /// DTR is low until then.
    DtrLow { until: Instant },
    /// Silence before `+++`.
    GuardBefore { until: Instant },
    /// `+++` sent: waiting for `OK` (after the modem's own guard time).
    Escape { deadline: Instant },
    /// `ATH0` sent.
    Ath { deadline: Instant },
}

#[derive(Debug)]
enum State {
    /// `init[step]` was sent.
    Init {
        step: usize,
        attempt: u32,
        deadline: Instant,
    },
    /// Between two tries of the init string, or after giving up (`retry_after`).
    Pause {
        until: Instant,
        attempt: u32,
    },
    /// `rings` RINGs of the current call so far, the last at `last_ring`.
    Ready {
        reinit_at: Instant,
        rings: u32,
        last_ring: Option<Instant>,
    },
    Answering {
        deadline: Instant,
    },
    Online,
    HangingUp(Hangup),
}

/// The number of a caller ID line (`NMBR = 5551234`, `NMBR: 5551234`, spaces optional), if `line` is one.
fn caller_id_line(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("NMBR")?;
    let number = rest.trim_start().strip_prefix(['=', ':'])?.trim();
    (!number.is_empty() && number.len() <= 32 && number.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| number.to_string())
}

/// Longest silence between two RINGs of one call.
const RING_GAP: Duration = Duration::from_secs(10);

/// `CR LF NO CARRIER CR LF`: how a modem in data mode reports that the carrier went (verbose codes, `V1`).
const NO_CARRIER: &[u8] = b"\r\nNO CARRIER\r\n";

/// The controller of one modem.
#[derive(Debug)]
pub struct ModemController {
    cfg: ModemConfig,
    /// Whether the port has a DTR line to drop (ptys and some adapters do not).
    dtr: bool,
    state: State,
    line: Vec<u8>,
    /// The last bytes seen online, to find `NO CARRIER` split across reads.
    tail: Vec<u8>,
    out: BytesMut,
    data: BytesMut,
    dtr_out: VecDeque<bool>,
    events: VecDeque<ModemEvent>,
    speed: Option<u32>,
    /// A CR ended the last result line; an LF right after it belongs to the line.
    skip_lf: bool,
    /// The caller's number the modem reported for the current call (caller ID, `NMBR = …` between the RINGs).
    caller_id: Option<String>,
}

impl ModemController {
    /// Starts initialising now. `dtr` says whether the port can drop DTR.
    pub fn new(cfg: ModemConfig, dtr: bool, now: Instant) -> ModemController {
        let mut m = ModemController {
            cfg,
            dtr,
            state: State::Pause { until: now, attempt: 1 },
            line: Vec::new(),
            tail: Vec::new(),
            out: BytesMut::new(),
            data: BytesMut::new(),
            dtr_out: VecDeque::new(),
            events: VecDeque::new(),
            speed: None,
            skip_lf: false,
            caller_id: None,
        };
        m.start_init(1, now);
        m
    }

    /// Bytes from the port.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(self.state, State::Online) {
                // The LF that ends `CONNECT ... CR LF` is the modem's, not the terminal's.
                let skip = usize::from(self.skip_lf && b == b'\n');
                self.skip_lf = false;
                self.online(&bytes[i + skip..], now);
                return;
            }
            if b == b'\r' || b == b'\n' {
                if !self.line.is_empty() {
                    let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
                    self.on_line(&line, now);
                    self.skip_lf = b == b'\r';
                }
            } else if self.line.len() < 256 {
                self.line.push(b);
            }
        }
    }

    /// The carrier-detect line dropped (ports that have one).
    pub fn carrier_lost(&mut self, now: Instant) {
        if matches!(self.state, State::Online) {
            self.lost(now);
        }
    }

    /// Timers: call at (or after) [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Init {
                step,
                attempt,
                deadline,
            } if now >= deadline => self.init_failed(step, attempt, None, now),
            State::Pause { until, attempt } if now >= until => self.start_init(attempt, now),
            State::Ready { reinit_at, .. } if now >= reinit_at => self.start_init(1, now),
            State::Answering { deadline } if now >= deadline => {
                // Any byte aborts a modem that is still trying to connect.
                self.out.put_u8(b'\r');
                self.events.push_back(ModemEvent::CallFailed { reply: None });
                self.start_init(1, now);
            }
            State::HangingUp(Hangup::DtrLow { until }) if now >= until => {
                self.dtr_out.push_back(true);
                self.hung_up(now);
            }
            State::HangingUp(Hangup::GuardBefore { until }) if now >= until => {
                self.out.put_slice(b"+++");
                self.state = State::HangingUp(Hangup::Escape {
                    deadline: now + self.cfg.guard_time + self.cfg.command_timeout,
                });
            }
            State::HangingUp(Hangup::Escape { deadline }) if now >= deadline => {
                // No OK to +++: the modem may already be in command mode. ATH0 either way.
                self.send_ath(now);
            }
            State::HangingUp(Hangup::Ath { deadline }) if now >= deadline => self.hung_up(now),
            _ => {}
        }
    }

    /// The call is over: hang up (no-op unless online).
    pub fn hang_up(&mut self, now: Instant) {
        if !matches!(self.state, State::Online) {
            return;
        }
        self.tail.clear();
        if self.dtr {
            self.dtr_out.push_back(false);
            self.state = State::HangingUp(Hangup::DtrLow {
                until: now + self.cfg.dtr_drop,
            });
        } else {
            self.state = State::HangingUp(Hangup::GuardBefore {
                until: now + self.cfg.guard_time,
            });
        }
    }

    /// Bytes to write to the port.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// The next DTR level to set.
    pub fn poll_dtr(&mut self) -> Option<bool> {
        self.dtr_out.pop_front()
    }

    /// How many of the terminal's bytes wait in [`poll_data`](Self::poll_data).
    pub fn pending_data(&self) -> usize {
        self.data.len()
    }

    /// The terminal's bytes received while online, for the link.
    pub fn poll_data(&mut self) -> Option<Bytes> {
        (!self.data.is_empty()).then(|| self.data.split().freeze())
    }

    pub fn poll_event(&mut self) -> Option<ModemEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Init { deadline, .. } | State::Answering { deadline } => Some(deadline),
            State::Pause { until, .. } => Some(until),
            State::Ready { reinit_at, .. } => Some(reinit_at),
            State::Online => None,
            State::HangingUp(
                Hangup::DtrLow { until } | Hangup::GuardBefore { until } | Hangup::Escape { deadline: until },
            ) => Some(until),
            State::HangingUp(Hangup::Ath { deadline }) => Some(deadline),
        }
    }

    pub fn is_online(&self) -> bool {
        matches!(self.state, State::Online)
    }

    /// The speed of the current or last call, from `CONNECT`.
    pub fn speed(&self) -> Option<u32> {
        self.speed
    }

    /// A short name of the state, for status pages and logs.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Init { .. } => "initialising",
            State::Pause { .. } => "waiting to retry",
            State::Ready { .. } => "ready",
            State::Answering { .. } => "answering",
            State::Online => "online",
            State::HangingUp(_) => "hanging up",
        }
    }

    fn online(&mut self, bytes: &[u8], now: Instant) {
        // Data passes straight through (holding bytes back could stall a frame that ends in CR); the last few bytes
        // are kept to find NO CARRIER split across reads.
        self.data.put_slice(bytes);
        self.tail.extend_from_slice(bytes);
        if self.tail.windows(NO_CARRIER.len()).any(|w| w == NO_CARRIER) {
            self.lost(now);
            return;
        }
        let keep = NO_CARRIER.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    fn lost(&mut self, now: Instant) {
        self.tail.clear();
        self.events.push_back(ModemEvent::CarrierLost);
        // The modem is back in command mode and on hook; initialising re-arms it.
        self.start_init(1, now);
    }

    /// The caller's number of the current (or last) call, as the modem reported it after the first RING with caller
    /// ID enabled (`AT+VCID=1`, `AT#CID=1`): `NMBR = 5551234`. `None` when it reported none for this call (a line
    /// without caller ID, a withheld number reported as `P` or `O` is kept as that letter).
    pub fn caller_id(&self) -> Option<&str> {
        self.caller_id.as_deref()
    }

    fn on_line(&mut self, line: &str, now: Instant) {
        if let (State::Ready { .. } | State::Answering { .. }, Some(number)) = (&self.state, caller_id_line(line)) {
            self.caller_id = Some(number);
            return;
        }
        let code = ResultCode::parse(line);
        match (&self.state, code) {
            (State::Init { step, attempt, .. }, Some(ResultCode::Ok)) => {
                let (step, attempt) = (*step + 1, *attempt);
                if step == self.cfg.init.len() {
                    self.events.push_back(ModemEvent::Ready);
                    self.state = State::Ready {
                        reinit_at: now + self.cfg.reinit_every,
                        rings: 0,
                        last_ring: None,
                    };
                } else {
                    self.send_init(step, attempt, now);
                }
            }
            (State::Init { step, attempt, .. }, Some(ResultCode::Error)) => {
                let (step, attempt) = (*step, *attempt);
                self.init_failed(step, attempt, Some(line.trim().to_string()), now)
            }
            (State::Ready { rings, last_ring, .. }, Some(ResultCode::Ring)) => {
                // Rings come every 6 s or so; after a longer silence the caller gave up and this is a new call.
                let rings = match last_ring {
                    Some(t) if now.duration_since(*t) < RING_GAP => rings + 1,
                    _ => 1,
                };
                if rings == 1 {
                    // A new call: the number of an earlier one is not this one's.
                    self.caller_id = None;
                }
                self.events.push_back(ModemEvent::Ring);
                match self.cfg.answer {
                    AnswerMode::Host { rings: n } if rings >= n => {
                        self.out.put_slice(b"ATA\r");
                        self.state = State::Answering {
                            deadline: now + self.cfg.connect_timeout,
                        };
                    }
                    // The modem answers by itself: CONNECT must follow within the connect timeout.
                    AnswerMode::Auto => {
                        self.state = State::Answering {
                            deadline: now + self.cfg.connect_timeout,
                        }
                    }
                    AnswerMode::Host { .. } => {
                        self.state = State::Ready {
                            reinit_at: now + self.cfg.reinit_every,
                            rings,
                            last_ring: Some(now),
                        }
                    }
                }
            }
            (State::Ready { .. } | State::Answering { .. }, Some(ResultCode::Connect { speed, protocol })) => {
                self.speed = speed;
                self.events.push_back(ModemEvent::Connected { speed, protocol });
                self.tail.clear();
                self.state = State::Online;
            }
            (State::Answering { .. }, Some(ResultCode::Ring)) => {}
            (State::Answering { .. }, Some(reply)) => {
                self.events.push_back(ModemEvent::CallFailed { reply: Some(reply) });
                self.start_init(1, now);
            }
            (State::HangingUp(Hangup::Escape { .. }), Some(ResultCode::Ok)) => self.send_ath(now),
            (State::HangingUp(Hangup::Ath { .. }), Some(ResultCode::Ok | ResultCode::Error)) => self.hung_up(now),
            // The terminal hung up first: the modem is on hook already.
            (State::HangingUp(Hangup::Escape { .. } | Hangup::GuardBefore { .. }), Some(ResultCode::NoCarrier)) => {
                self.hung_up(now)
            }
            // Echoes, RING while initialising, informational lines: nothing to do.
            _ => {}
        }
    }

    fn send_ath(&mut self, now: Instant) {
        self.out.put_slice(b"ATH0\r");
        self.state = State::HangingUp(Hangup::Ath {
            deadline: now + self.cfg.command_timeout,
        });
    }

    fn hung_up(&mut self, now: Instant) {
        self.events.push_back(ModemEvent::HungUp);
        self.start_init(1, now);
    }

    fn start_init(&mut self, attempt: u32, now: Instant) {
        self.line.clear();
        self.caller_id = None;
        if self.cfg.init.is_empty() {
            self.events.push_back(ModemEvent::Ready);
            self.state = State::Ready {
                reinit_at: now + self.cfg.reinit_every,
                rings: 0,
                last_ring: None,
            };
            return;
        }
        self.send_init(0, attempt, now);
    }

    fn send_init(&mut self, step: usize, attempt: u32, now: Instant) {
        self.out.put_slice(self.cfg.init[step].as_bytes());
        self.out.put_u8(b'\r');
        self.state = State::Init {
            step,
            attempt,
            deadline: now + self.cfg.command_timeout,
        };
    }

    fn init_failed(&mut self, step: usize, attempt: u32, reply: Option<String>, now: Instant) {
        self.events.push_back(ModemEvent::InitFailed {
            command: self.cfg.init[step].clone(),
            reply,
            attempt,
        });
        if attempt >= self.cfg.init_attempts {
            self.events.push_back(ModemEvent::NotAnswering);
            self.state = State::Pause {
                until: now + self.cfg.retry_after,
                attempt: 1,
            };
        } else {
            self.state = State::Pause {
                until: now + self.cfg.command_timeout,
                attempt: attempt + 1,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    struct T {
        m: ModemController,
        now: Instant,
    }

    impl T {
        fn new(cfg: ModemConfig, dtr: bool) -> T {
            let now = Instant::now();
            T {
                m: ModemController::new(cfg, dtr, now),
                now,
            }
        }
        fn at(&mut self, d: Duration) -> &mut Self {
            self.now += d;
            self.m.handle_timeout(self.now);
            self
        }
        fn hear(&mut self, s: &str) -> &mut Self {
            self.m.handle_input(s.as_bytes(), self.now);
            self
        }
        fn out(&mut self) -> String {
            self.m
                .poll_transmit()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
                .unwrap_or_default()
        }
        fn events(&mut self) -> Vec<ModemEvent> {
            std::iter::from_fn(|| self.m.poll_event()).collect()
        }
        fn init_ok(&mut self) {
            for cmd in ["ATZ", "ATE0V1Q0", "AT&C1&D2", "ATS0=0"] {
                assert_eq!(self.out(), format!("{cmd}\r"));
                self.hear("\r\nOK\r\n");
            }
            assert_eq!(self.events(), [ModemEvent::Ready]);
        }
    }

    #[test]
    fn result_codes_verbose_numeric_and_with_suffixes() {
        let c = |s: Option<u32>, p: Option<&str>| {
            Some(ResultCode::Connect {
                speed: s,
                protocol: p.map(String::from),
            })
        };
        assert_eq!(ResultCode::parse("OK"), Some(ResultCode::Ok));
        assert_eq!(ResultCode::parse("CONNECT"), c(None, None));
        assert_eq!(ResultCode::parse("CONNECT 1200"), c(Some(1200), None));
        assert_eq!(
            ResultCode::parse("CONNECT 2400/ARQ/V42BIS"),
            c(Some(2400), Some("ARQ/V42BIS"))
        );
        assert_eq!(
            ResultCode::parse("CONNECT 28800/ARQ/V34/LAPM/V42BIS"),
            c(Some(28800), Some("ARQ/V34/LAPM/V42BIS"))
        );
        assert_eq!(ResultCode::parse("connect 9600/SYNC"), c(Some(9600), Some("SYNC")));
        assert_eq!(ResultCode::parse("NO CARRIER"), Some(ResultCode::NoCarrier));
        assert_eq!(ResultCode::parse("BUSY"), Some(ResultCode::Busy));
        assert_eq!(ResultCode::parse("ERROR"), Some(ResultCode::Error));
        assert_eq!(ResultCode::parse("NO DIALTONE"), Some(ResultCode::NoDialtone));
        assert_eq!(ResultCode::parse("NO ANSWER"), Some(ResultCode::NoAnswer));
        assert_eq!(ResultCode::parse("0"), Some(ResultCode::Ok));
        assert_eq!(ResultCode::parse("3"), Some(ResultCode::NoCarrier));
        assert_eq!(ResultCode::parse("5"), c(Some(1200), None));
        assert_eq!(ResultCode::parse("10"), c(Some(2400), None));
        assert_eq!(ResultCode::parse("CONNECT 9600 V42BIS"), c(Some(9600), Some("V42BIS")));
        assert_eq!(
            ResultCode::parse("CONNECT 2400 LAPM/V42BIS"),
            c(Some(2400), Some("LAPM/V42BIS"))
        );
        assert_eq!(ResultCode::parse("CONNECT/ARQ"), c(None, Some("ARQ")));
        for not in ["", "ATZ", "CONNECTED", "12", "OK then"] {
            assert_eq!(ResultCode::parse(not), None, "{not:?}");
        }
    }

    #[test]
    fn init_then_answer_on_ring_then_connect_with_data_in_the_same_read() {
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.hear("\r\nRING\r\n");
        assert_eq!(t.out(), "ATA\r");
        t.hear("\r\nCONNECT 2400/ARQ\r\n\x02AB");
        assert_eq!(
            t.events(),
            [
                ModemEvent::Ring,
                ModemEvent::Connected {
                    speed: Some(2400),
                    protocol: Some("ARQ".into())
                }
            ]
        );
        assert_eq!(t.m.speed(), Some(2400));
        assert_eq!(t.m.poll_data().as_deref(), Some(&b"\x02AB"[..]));
        assert_eq!(t.m.poll_timeout(), None, "online, the link keeps time");
    }

    #[test]
    fn the_callers_number_between_the_rings_is_kept_for_the_call_and_forgotten_after() {
        let cfg = ModemConfig {
            answer: AnswerMode::Host { rings: 2 },
            ..ModemConfig::default()
        };
        let mut t = T::new(cfg, false);
        t.init_ok();
        t.hear("\r\nRING\r\n\r\nDATE = 1206\r\nTIME = 1412\r\nNMBR = 5551234\r\n");
        assert_eq!(t.m.caller_id(), Some("5551234"));
        t.hear("\r\nRING\r\n");
        assert_eq!(t.out(), "ATA\r");
        t.hear("\r\nCONNECT 2400\r\n");
        assert_eq!(t.m.caller_id(), Some("5551234"), "through the call");
        assert_eq!(caller_id_line("NMBR:5559999"), Some("5559999".into()));
        assert_eq!(
            caller_id_line("NMBR = P"),
            Some("P".into()),
            "withheld: kept as reported"
        );
        for not in ["NMBR =", "NAME = JOHN", "NMBR 555", "NMBRX = 1"] {
            assert_eq!(caller_id_line(not), None, "{not:?}");
        }
        // The next call without caller ID: nothing of the last one's number is left.
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.hear("\r\nRING\r\nNMBR = 5551234\r\n");
        t.hear("\r\nNO ANSWER\r\n");
        assert_eq!(t.m.caller_id(), None, "a call that did not come up re-arms the modem");
        t.hear("\r\nRING\r\n");
        assert_eq!(t.m.caller_id(), None);
    }

    #[test]
    fn echoed_commands_and_numeric_codes_are_understood() {
        let mut t = T::new(ModemConfig::default(), false);
        assert_eq!(t.out(), "ATZ\r");
        t.hear("ATZ\r\r\n0\r");
        assert_eq!(t.out(), "ATE0V1Q0\r");
    }

    #[test]
    fn rings_counted_before_answering() {
        let cfg = ModemConfig {
            answer: AnswerMode::Host { rings: 2 },
            ..ModemConfig::default()
        };
        let mut t = T::new(cfg, false);
        t.init_ok();
        t.hear("\r\nRING\r\n");
        assert_eq!(t.out(), "");
        t.hear("\r\nRING\r\n");
        assert_eq!(t.out(), "ATA\r");
    }

    #[test]
    fn auto_answer_waits_for_connect_without_ata() {
        let cfg = ModemConfig {
            answer: AnswerMode::Auto,
            init: vec!["ATZ".into(), "ATS0=1".into()],
            ..ModemConfig::default()
        };
        let mut t = T::new(cfg, false);
        t.out();
        t.hear("OK\r\n");
        t.out();
        t.hear("OK\r\n");
        t.hear("\r\nRING\r\n\r\nCONNECT 1200\r\n");
        assert_eq!(t.out(), "");
        assert!(t.m.is_online());
    }

    #[test]
    fn auto_answer_without_connect_gives_up_after_the_connect_timeout() {
        let cfg = ModemConfig {
            answer: AnswerMode::Auto,
            init: vec!["ATS0=1".into()],
            ..ModemConfig::default()
        };
        let mut t = T::new(cfg, false);
        t.out();
        t.hear("OK\r");
        t.hear("RING\r");
        t.at(ms(60_000));
        assert_eq!(t.events().last(), Some(&ModemEvent::CallFailed { reply: None }));
    }

    #[test]
    fn rings_of_an_abandoned_call_do_not_count_for_the_next() {
        let cfg = ModemConfig {
            answer: AnswerMode::Host { rings: 2 },
            ..ModemConfig::default()
        };
        let mut t = T::new(cfg, false);
        t.init_ok();
        t.hear("RING\r");
        t.at(ms(30_000));
        t.hear("RING\r");
        assert_eq!(t.out(), "", "a new call: one ring so far");
        t.at(ms(6_000));
        t.hear("RING\r");
        assert_eq!(t.out(), "ATA\r");
    }

    #[test]
    fn a_modem_answering_error_is_retried_then_reported_then_tried_again() {
        let mut t = T::new(ModemConfig::default(), false);
        assert_eq!(t.out(), "ATZ\r");
        t.hear("\r\nERROR\r\n");
        assert_eq!(
            t.events(),
            [ModemEvent::InitFailed {
                command: "ATZ".into(),
                reply: Some("ERROR".into()),
                attempt: 1
            }]
        );
        t.at(ms(2999));
        assert_eq!(t.out(), "");
        t.at(ms(1));
        assert_eq!(t.out(), "ATZ\r", "second try after a pause");
        t.hear("OK\r");
        assert_eq!(t.out(), "ATE0V1Q0\r");
        t.at(ms(3000)); // no answer at all
        assert_eq!(
            t.events(),
            [ModemEvent::InitFailed {
                command: "ATE0V1Q0".into(),
                reply: None,
                attempt: 2
            }]
        );
        t.at(ms(3000));
        assert_eq!(t.out(), "ATZ\r");
        t.hear("ERROR\r");
        assert_eq!(t.events().last(), Some(&ModemEvent::NotAnswering));
        t.at(ms(29_999));
        assert_eq!(t.out(), "");
        t.at(ms(1));
        assert_eq!(t.out(), "ATZ\r", "tried again after retry_after");
        t.hear("OK\r").hear("OK\r").hear("OK\r").hear("OK\r");
        assert_eq!(t.events(), [ModemEvent::Ready]);
    }

    #[test]
    fn an_idle_modem_is_reinitialised() {
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.at(ms(119_999));
        assert_eq!(t.out(), "");
        t.at(ms(1));
        assert_eq!(t.out(), "ATZ\r");
    }

    #[test]
    fn hang_up_with_escape_and_guard_times_then_rearm() {
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.hear("RING\r");
        t.out();
        t.hear("CONNECT 2400\r\n");
        t.events();
        t.m.hang_up(t.now);
        assert_eq!(t.out(), "");
        t.at(ms(1199));
        assert_eq!(t.out(), "", "silence before +++");
        t.at(ms(1));
        assert_eq!(t.out(), "+++");
        assert!(!t.m.is_online());
        t.at(ms(1200));
        t.hear("\r\nOK\r\n");
        assert_eq!(t.out(), "ATH0\r");
        t.hear("\r\nOK\r\n");
        assert_eq!(t.events(), [ModemEvent::HungUp]);
        assert_eq!(t.out(), "ATZ\r", "re-armed by initialising again");
    }

    #[test]
    fn hang_up_without_an_ok_to_the_escape_still_sends_ath() {
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.hear("RING\r");
        t.hear("CONNECT\r");
        t.out();
        t.m.hang_up(t.now);
        t.at(ms(1200));
        assert_eq!(t.out(), "+++");
        t.at(ms(4199));
        assert_eq!(t.out(), "");
        t.at(ms(1));
        assert_eq!(t.out(), "ATH0\r");
        t.at(ms(3000));
        assert_eq!(t.events().last(), Some(&ModemEvent::HungUp));
        assert_eq!(t.out(), "ATZ\r");
    }

    #[test]
    fn hang_up_by_dropping_dtr() {
        let mut t = T::new(ModemConfig::default(), true);
        t.init_ok();
        t.hear("RING\r");
        t.hear("CONNECT 9600\r");
        t.out();
        t.m.hang_up(t.now);
        assert_eq!(t.m.poll_dtr(), Some(false));
        assert_eq!(t.out(), "", "no +++ when DTR can be dropped");
        t.at(ms(999));
        assert_eq!(t.m.poll_dtr(), None);
        t.at(ms(1));
        assert_eq!(t.m.poll_dtr(), Some(true));
        assert_eq!(t.events().last(), Some(&ModemEvent::HungUp));
        assert_eq!(t.out(), "ATZ\r");
    }

    #[test]
    fn no_carrier_split_across_reads_ends_the_call() {
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.hear("RING\r");
        t.hear("CONNECT 2400\r");
        t.out();
        t.events();
        t.hear("\x06\r\nNO CAR");
        assert!(t.m.is_online());
        t.hear("RIER\r\n");
        assert_eq!(t.events(), [ModemEvent::CarrierLost]);
        assert!(!t.m.is_online());
        assert_eq!(t.out(), "ATZ\r");
        assert_eq!(t.m.poll_data().as_deref(), Some(&b"\x06\r\nNO CARRIER\r\n"[..]));
    }

    #[test]
    fn dcd_dropping_ends_the_call() {
        let mut t = T::new(ModemConfig::default(), true);
        t.init_ok();
        t.hear("RING\r");
        t.hear("CONNECT 2400\r");
        t.events();
        t.m.carrier_lost(t.now);
        assert_eq!(t.events(), [ModemEvent::CarrierLost]);
    }

    #[test]
    fn a_call_that_does_not_come_up() {
        let mut t = T::new(ModemConfig::default(), false);
        t.init_ok();
        t.hear("RING\r");
        t.out();
        t.hear("NO CARRIER\r");
        assert_eq!(
            t.events(),
            [
                ModemEvent::Ring,
                ModemEvent::CallFailed {
                    reply: Some(ResultCode::NoCarrier)
                }
            ]
        );
        t.init_ok();
        t.hear("RING\r");
        t.out();
        t.at(ms(60_000));
        assert_eq!(
            t.out(),
            "\rATZ\r",
            "a byte aborts the answer, then the line is re-armed"
        );
        assert_eq!(t.events().last(), Some(&ModemEvent::CallFailed { reply: None }));
    }
}
