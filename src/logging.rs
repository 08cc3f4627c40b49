//! Warnings that repeat, aggregated: a PIN server outage makes every sale fail the same way, a hostile terminal
//! can make every frame fail, and one line each wrote gigabytes of log in a minute. With [`limited!`] in place of
//! `tracing::warn!` (or `error!`, `info!`, `debug!`), the first occurrence of a warning in an interval (10 s) is
//! logged as it was; the others are only counted, and one line `… (N more in the last 10s)` is written when the
//! interval ends (by a background thread), or before the next occurrence when that comes first. So each kind of
//! warning writes at most two lines per interval, whatever the traffic.
//!
//! A kind is a call site; `limited!(warn, key: addr; "…")` keeps one interval per key at that call site (e.g. one per
//! PIN server), at most [`MAX_KEYS`] of them (further keys share one). A key must not be something a peer chooses
//! freely, and like everything logged it must never be a PIN, key or MAC.
//!
//! The summary lines come from this module (target `pingate::logging`), at the level of the warning they count, with
//! fields `repeated` (the count) and `key` (when there is one). [`flush`] writes every count still open, for a
//! clean exit.

use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use tracing::Level;

/// The interval of every limited warning.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Keys with an interval of their own per call site; further keys share one more.
pub const MAX_KEYS: usize = 16;

/// The key that keys beyond [`MAX_KEYS`] share.
const OTHERS: &str = "(others)";

/// Logs at `level` (`error`, `warn`, `info` or `debug`) as `tracing` would, but only the first occurrence per
/// interval; later ones are counted and summed up in one line (see the module). The message comes first and must be
/// a literal, the fields follow as in `tracing`: `limited!(warn, "sale not answered", error = %e)`, or with a key:
/// `limited!(warn, key: &addr; "cannot connect", error = %e)`.
macro_rules! limited {
    ($level:ident, key: $key:expr; $msg:literal $(, $($field:tt)+)?) => {{
        static LIMITER: $crate::logging::Limiter =
            $crate::logging::Limiter::new($crate::logging::level!($level), $msg);
        if ::tracing::enabled!($crate::logging::level!($level)) && LIMITER.admit($key) {
            ::tracing::$level!($($($field)+ ,)? $msg);
        }
    }};
    ($level:ident, $msg:literal $(, $($field:tt)+)?) => {
        $crate::logging::limited!($level, key: ""; $msg $(, $($field)+)?)
    };
}
pub(crate) use limited;

/// The `tracing` level of a level macro's name.
macro_rules! level {
    (error) => {
        ::tracing::Level::ERROR
    };
    (warn) => {
        ::tracing::Level::WARN
    };
    (info) => {
        ::tracing::Level::INFO
    };
    (debug) => {
        ::tracing::Level::DEBUG
    };
}
pub(crate) use level;

/// The interval state of one call site (see the module).
pub struct Limiter {
    level: Level,
    message: &'static str,
    interval: Duration,
    windows: Mutex<Vec<Window>>,
}

/// One key's interval: when it started (with the occurrence that was logged) and how many came after.
struct Window {
    key: Box<str>,
    start: Instant,
    more: u64,
}

/// What a limiter counted and has yet to write: `count` occurrences of `key` over `over`.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub key: Box<str>,
    pub count: u64,
    pub over: Duration,
}

/// What to do with one occurrence.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it, after the summary of the interval before when there is one.
    Log(Option<Summary>),
    /// Counted. `Some(end)`: the first count of its interval, whose summary is due at `end`.
    Counted(Option<Instant>),
}

impl Limiter {
    pub const fn new(level: Level, message: &'static str) -> Limiter {
        Limiter::with_interval(level, message, INTERVAL)
    }

    pub const fn with_interval(level: Level, message: &'static str, interval: Duration) -> Limiter {
        Limiter {
            level,
            message,
            interval,
            windows: Mutex::new(Vec::new()),
        }
    }

    /// Whether to log this occurrence of the warning (of `key`, `""` for none); writes the summary that precedes
    /// it, or has the summary of the count it starts written when its interval ends.
    pub fn admit(&'static self, key: &str) -> bool {
        match self.admit_at(key, Instant::now()) {
            Admit::Log(summary) => {
                if let Some(s) = summary {
                    self.write(&s);
                }
                true
            }
            Admit::Counted(Some(due)) => {
                schedule(self, due);
                false
            }
            Admit::Counted(None) => false,
        }
    }

    /// [`Limiter::admit`] at `now`, without writing or scheduling anything.
    pub fn admit_at(&self, key: &str, now: Instant) -> Admit {
        let mut windows = self.windows.lock().expect("not poisoned");
        let at = match windows.iter().position(|w| *w.key == *key) {
            Some(i) => i,
            None => {
                let key = if windows.len() < MAX_KEYS { key } else { OTHERS };
                match windows.iter().position(|w| *w.key == *key) {
                    Some(i) => i,
                    None => {
                        windows.push(Window {
                            key: key.into(),
                            start: now,
                            more: 0,
                        });
                        return Admit::Log(None);
                    }
                }
            }
        };
        let w = &mut windows[at];
        let end = w.start + self.interval;
        if now < end {
            w.more += 1;
            return Admit::Counted((w.more == 1).then_some(end));
        }
        let summary = (w.more > 0).then(|| Summary {
            key: w.key.clone(),
            count: w.more,
            over: self.interval,
        });
        w.start = now;
        w.more = 0;
        Admit::Log(summary)
    }

    /// The counts to write at `now`: those of intervals that have ended, or every one with `all` (at exit, over
    /// the time they ran).
    pub fn take_due(&self, now: Instant, all: bool) -> Vec<Summary> {
        let mut windows = self.windows.lock().expect("not poisoned");
        let mut due = Vec::new();
        for w in windows.iter_mut() {
            let over = now.saturating_duration_since(w.start).min(self.interval);
            if w.more > 0 && (all || over >= self.interval) {
                due.push(Summary {
                    key: w.key.clone(),
                    count: w.more,
                    over,
                });
                w.more = 0;
            }
        }
        due
    }

    /// Writes a summary line at the warning's level.
    fn write(&self, s: &Summary) {
        // Whole seconds, rounded up: "in the last 10s".
        let secs = s.over.as_millis().div_ceil(1000).max(1);
        macro_rules! line {
            ($level:ident) => {
                if s.key.is_empty() {
                    tracing::$level!(repeated = s.count, "{} ({} more in the last {secs}s)", self.message, s.count)
                } else {
                    tracing::$level!(key = %s.key, repeated = s.count, "{} ({} more in the last {secs}s)", self.message, s.count)
                }
            };
        }
        if self.level == Level::ERROR {
            line!(error)
        } else if self.level == Level::WARN {
            line!(warn)
        } else if self.level == Level::INFO {
            line!(info)
        } else if self.level == Level::DEBUG {
            line!(debug)
        } else {
            line!(trace)
        }
    }
}

/// Summaries due, by when: each interval with a count is here once, until its end.
static PENDING: Mutex<Vec<(Instant, &'static Limiter)>> = Mutex::new(Vec::new());
static WAKE: Condvar = Condvar::new();
static WRITER: Once = Once::new();

fn schedule(limiter: &'static Limiter, due: Instant) {
    PENDING.lock().expect("not poisoned").push((due, limiter));
    WRITER.call_once(|| {
        // Without the thread, counts are still written before the next occurrence of their warning (and by
        // `flush`); only the line at the interval's end would be missing.
        let _ = std::thread::Builder::new()
            .name("pingate-log-summaries".into())
            .spawn(write_due);
    });
    WAKE.notify_one();
}

/// The background thread: sleeps until the next interval with a count ends, then writes its summary.
fn write_due() {
    let mut pending = PENDING.lock().expect("not poisoned");
    loop {
        let now = Instant::now();
        match pending.iter().map(|(due, _)| *due).min() {
            None => pending = WAKE.wait(pending).expect("not poisoned"),
            Some(due) if due > now => {
                pending = WAKE.wait_timeout(pending, due - now).expect("not poisoned").0;
            }
            Some(_) => {
                let mut ready = Vec::new();
                pending.retain(|(due, l)| {
                    if *due <= now {
                        ready.push(*l);
                    }
                    *due > now
                });
                drop(pending);
                for l in ready {
                    for s in l.take_due(now, false) {
                        l.write(&s);
                    }
                }
                pending = PENDING.lock().expect("not poisoned");
            }
        }
    }
}

/// Writes every count not written yet, whether its interval has ended or not: for a clean exit.
pub fn flush() {
    let all: Vec<&'static Limiter> = std::mem::take(&mut *PENDING.lock().expect("not poisoned"))
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let now = Instant::now();
    for l in all {
        for s in l.take_due(now, true) {
            l.write(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Limiter {
        Limiter::new(Level::WARN, "sale not answered")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_is_logged_the_rest_of_the_interval_counted_and_summed_up_at_its_end() {
        let l = limiter();
        let t0 = Instant::now();
        assert_eq!(l.admit_at("", t0), Admit::Log(None));
        assert_eq!(l.admit_at("", t0 + ms(1)), Admit::Counted(Some(t0 + INTERVAL)));
        for i in 2..1_000 {
            assert_eq!(l.admit_at("", t0 + ms(i)), Admit::Counted(None));
        }
        assert_eq!(
            l.take_due(t0 + ms(9_999), false),
            vec![],
            "not before the interval ends"
        );
        let due = l.take_due(t0 + INTERVAL, false);
        assert_eq!(
            due,
            vec![Summary {
                key: "".into(),
                count: 999,
                over: INTERVAL
            }]
        );
        assert_eq!(l.take_due(t0 + INTERVAL + ms(1), false), vec![], "written once");
        // The next one opens a new interval: logged, with nothing left to sum up.
        assert_eq!(l.admit_at("", t0 + INTERVAL + ms(5)), Admit::Log(None));
        assert_eq!(
            l.admit_at("", t0 + INTERVAL + ms(6)),
            Admit::Counted(Some(t0 + INTERVAL + ms(5) + INTERVAL))
        );
    }

    #[test]
    fn an_occurrence_after_the_interval_writes_a_count_not_yet_written_first() {
        let l = limiter();
        let t0 = Instant::now();
        assert_eq!(l.admit_at("", t0), Admit::Log(None));
        l.admit_at("", t0 + ms(10));
        l.admit_at("", t0 + ms(20));
        assert_eq!(
            l.admit_at("", t0 + INTERVAL + ms(1)),
            Admit::Log(Some(Summary {
                key: "".into(),
                count: 2,
                over: INTERVAL
            }))
        );
        assert_eq!(l.take_due(t0 + INTERVAL * 3, false), vec![], "not twice");
    }

    #[test]
    fn keys_have_intervals_of_their_own_up_to_a_bound() {
        let l = limiter();
        let t0 = Instant::now();
        assert_eq!(l.admit_at("a", t0), Admit::Log(None));
        assert_eq!(l.admit_at("b", t0), Admit::Log(None));
        assert!(matches!(l.admit_at("a", t0 + ms(1)), Admit::Counted(_)));
        for k in 2..MAX_KEYS {
            assert_eq!(l.admit_at(&format!("k{k}"), t0), Admit::Log(None));
        }
        // Keys past the bound share one interval: the first is logged, the others counted.
        assert_eq!(l.admit_at("x", t0), Admit::Log(None));
        for k in 0..100 {
            assert!(matches!(l.admit_at(&format!("y{k}"), t0 + ms(1)), Admit::Counted(_)));
        }
        let due = l.take_due(t0 + INTERVAL, false);
        assert_eq!(due.len(), 2);
        assert!(due.contains(&Summary {
            key: "a".into(),
            count: 1,
            over: INTERVAL
        }));
        assert!(due.contains(&Summary {
            key: OTHERS.into(),
            count: 100,
            over: INTERVAL
        }));
        assert_eq!(l.windows.lock().unwrap().len(), MAX_KEYS + 1);
    }

    #[test]
    fn at_exit_every_open_count_is_written_over_the_time_it_ran() {
        let l = limiter();
        let t0 = Instant::now();
        l.admit_at("", t0);
        l.admit_at("", t0 + ms(100));
        assert_eq!(l.take_due(t0 + ms(2_500), false), vec![]);
        assert_eq!(
            l.take_due(t0 + ms(2_500), true),
            vec![Summary {
                key: "".into(),
                count: 1,
                over: ms(2_500)
            }]
        );
    }

    /// The macro logs the first occurrence with its fields, and writes the count before the next one logged.
    #[test]
    fn the_macro_logs_the_first_and_counts_the_rest() {
        use std::sync::Arc;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..500 {
                limited!(warn, "a test warning", attempt = i, error = %"boom");
            }
            flush();
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        // (`flush` also writes what other tests running meanwhile counted.)
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("a test warning")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("a test warning attempt=0 error=boom"), "{text}");
        assert!(
            lines[1].contains("a test warning (499 more in the last 1s) repeated=499"),
            "{text}"
        );
    }
}
