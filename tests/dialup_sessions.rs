//! Golden dial-up sessions: whole calls, both directions, with timing, replayed through the modem controller and
//! the dial-up link (the cores the serial lines run, without I/O) on a virtual clock.
//!
//! Each `fixtures/dialup/*.session` file holds what the line said (`<` lines, fed in at their times), what the host
//! must say (`>` lines) and what the cores must report (`!` lines: requests, deliveries, the ends of calls). The
//! format is in `fixtures/dialup/README.md`. `PINGATE_BLESS=1 cargo test --test dialup_sessions` rewrites the `>` and
//! `!` lines from the cores (then read the diff before committing it).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pingate::link::dialup::{DialupLink, LinkConfig, LinkEvent};
use pingate::link::modem::{ModemConfig, ModemController, ModemEvent};

const NAMES: [(u8, &str); 8] = [
    (0x02, "STX"),
    (0x03, "ETX"),
    (0x04, "EOT"),
    (0x05, "ENQ"),
    (0x06, "ACK"),
    (0x15, "NAK"),
    (0x0D, "CR"),
    (0x0A, "LF"),
];

/// Bytes as text: printable ASCII as it is, control bytes by name, the rest as hex, each in angle brackets.
fn render(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        if let Some((_, n)) = NAMES.iter().find(|(c, _)| *c == b) {
            let _ = write!(s, "<{n}>");
        } else if (0x20..0x7F).contains(&b) && b != b'<' {
            s.push(b as char);
        } else {
            let _ = write!(s, "<{b:02X}>");
        }
    }
    s
}

fn parse_bytes(text: &str, at: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '<' {
            let end = rest.find('>').unwrap_or_else(|| panic!("{at}: `<` without `>`"));
            let tok = &rest[1..end];
            match NAMES.iter().find(|(_, n)| *n == tok) {
                Some((b, _)) => out.push(*b),
                None => out.push(u8::from_str_radix(tok, 16).unwrap_or_else(|_| panic!("{at}: bad token <{tok}>"))),
            }
            rest = &rest[end + 1..];
        } else {
            out.push(c as u8);
            rest = &rest[1..];
        }
    }
    out
}

struct Fixture {
    /// Comment and `@` lines, kept as they are.
    head: Vec<String>,
    /// What the line says: (ms, bytes).
    inputs: Vec<(u64, Vec<u8>)>,
    /// Answers the controller gives, in order.
    answers: VecDeque<Vec<u8>>,
    /// The whole transcript as written (`<`, `>` and `!` lines), for comparison.
    transcript: Vec<String>,
    /// `@line key=value` settings.
    settings: Vec<(String, String)>,
}

fn load(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path).unwrap();
    let mut f = Fixture {
        head: Vec::new(),
        inputs: Vec::new(),
        answers: VecDeque::new(),
        transcript: Vec::new(),
        settings: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            f.head.push(line.to_string());
            continue;
        }
        if let Some(a) = t.strip_prefix("@answer ") {
            f.answers.push_back(parse_bytes(a.trim(), &at));
            f.head.push(line.to_string());
            continue;
        }
        if let Some(a) = t.strip_prefix("@set ") {
            let (k, v) = a.split_once('=').unwrap_or_else(|| panic!("{at}: @set key=value"));
            f.settings.push((k.trim().into(), v.trim().into()));
            f.head.push(line.to_string());
            continue;
        }
        let mut parts = t.splitn(3, ' ');
        let ms: u64 = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{at}: time in ms first"));
        let dir = parts.next().unwrap_or_else(|| panic!("{at}: direction"));
        let rest = parts.next().unwrap_or("");
        if dir == "<" {
            f.inputs.push((ms, parse_bytes(rest, &at)));
        }
        f.transcript.push(line.trim_end().to_string());
    }
    f
}

fn configs(settings: &[(String, String)]) -> (ModemConfig, LinkConfig) {
    let mut modem = ModemConfig::default();
    let mut link = LinkConfig {
        inter_char: Some(Duration::from_millis(50)),
        ..LinkConfig::default()
    };
    for (k, v) in settings {
        let ms = || Duration::from_millis(v.parse().unwrap());
        match k.as_str() {
            "inter_char_ms" => link.inter_char = Some(ms()),
            "text" => link.inter_char = None,
            "ack_timeout_ms" => link.ack_timeout = ms(),
            "idle_timeout_ms" => link.idle_timeout = ms(),
            "guard_time_ms" => modem.guard_time = ms(),
            "init_attempts" => modem.init_attempts = v.parse().unwrap(),
            "retry_after_ms" => modem.retry_after = ms(),
            "init" => modem.init = v.split(',').map(String::from).collect(),
            other => panic!("unknown setting {other}"),
        }
    }
    (modem, link)
}

/// Replays the inputs through the cores and writes the transcript they produce.
fn run(f: &mut Fixture) -> Vec<String> {
    let (mcfg, lcfg) = configs(&f.settings);
    let t0 = Instant::now();
    let mut modem = ModemController::new(mcfg, false, t0);
    let mut link: Option<DialupLink> = None;
    let mut out = Vec::new();
    let mut inputs: VecDeque<(u64, Vec<u8>)> = f.inputs.clone().into();
    let last_input = inputs.back().map_or(0, |i| i.0);
    let ms_of = |t: Instant| t.duration_since(t0).as_millis() as u64;
    let mut now = t0;
    loop {
        // Everything the cores have to say at `now`.
        loop {
            let mut quiet = true;
            if let Some(b) = modem.poll_transmit() {
                out.push(format!("{:>6} > {}", ms_of(now), render(&b)));
            }
            while let Some(ev) = modem.poll_event() {
                quiet = false;
                out.push(format!("{:>6} ! modem {ev:?}", ms_of(now)));
                match ev {
                    ModemEvent::Connected { .. } => link = Some(DialupLink::new(lcfg.clone(), now)),
                    ModemEvent::CarrierLost => {
                        if let Some(l) = &mut link {
                            l.carrier_lost()
                        }
                    }
                    _ => {}
                }
            }
            if let Some(d) = modem.poll_data() {
                if let Some(l) = &mut link {
                    l.handle_input(&d, now);
                }
            }
            let mut ended = false;
            if let Some(l) = &mut link {
                if let Some(b) = l.poll_transmit() {
                    out.push(format!("{:>6} > {}", ms_of(now), render(&b)));
                }
                while let Some(ev) = l.poll_event() {
                    quiet = false;
                    let shown = match &ev {
                        LinkEvent::Request(d) => format!("request {} bytes", d.len()),
                        other => format!("{other:?}"),
                    };
                    out.push(format!("{:>6} ! link {shown}", ms_of(now)));
                    match ev {
                        LinkEvent::Request(_) => {
                            let answer = f.answers.pop_front().expect("an @answer for each request");
                            l.respond(&answer, now);
                        }
                        LinkEvent::Ended(_) => ended = true,
                        _ => {}
                    }
                }
            }
            if ended {
                link = None;
                modem.hang_up(now);
            }
            if quiet {
                break;
            }
        }
        let timer = [modem.poll_timeout(), link.as_ref().and_then(|l| l.poll_timeout())]
            .into_iter()
            .flatten()
            .min();
        let next_input = inputs.front().map(|i| t0 + Duration::from_millis(i.0));
        let next = match (timer, next_input) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => break,
            },
        };
        // The session is over when only far timers remain (the idle modem's re-initialisation).
        if next_input.is_none() && ms_of(next) > last_input + 10_000 {
            break;
        }
        now = next;
        if next_input == Some(now) {
            let (ms, bytes) = inputs.pop_front().unwrap();
            out.push(format!("{ms:>6} < {}", render(&bytes)));
            modem.handle_input(&bytes, now);
        } else {
            modem.handle_timeout(now);
            if let Some(l) = &mut link {
                l.handle_timeout(now);
            }
        }
    }
    out
}

fn sessions() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dialup");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "session"))
        .collect();
    v.sort();
    v
}

#[test]
fn golden_dialup_sessions() {
    let bless = std::env::var_os("PINGATE_BLESS").is_some();
    let files = sessions();
    assert!(files.len() >= 5, "the dial-up scenarios are all there: {files:?}");
    let mut failures = Vec::new();
    for path in files {
        let mut f = load(&path);
        let got = run(&mut f);
        assert!(f.answers.is_empty(), "{}: unused @answer lines", path.display());
        if bless {
            let mut text = f.head.join("\n");
            text.push('\n');
            for l in &got {
                text.push_str(l);
                text.push('\n');
            }
            std::fs::write(&path, text).unwrap();
        } else if got != f.transcript {
            let first = got
                .iter()
                .zip(&f.transcript)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(f.transcript.len()));
            failures.push(format!(
                "{}: differs at transcript line {}:\n  expected: {:?}\n  got:      {:?}",
                path.display(),
                first + 1,
                f.transcript.get(first),
                got.get(first)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rendering_round_trips() {
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(parse_bytes(&render(&all), "test"), all);
    assert_eq!(render(b"\x02AT<\x03\x9f"), "<STX>AT<3C><ETX><9F>");
}
