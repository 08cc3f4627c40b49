//! The gateway's status page (`GET /status` on the metrics endpoint), and the little it counts only for it:
//! connections open per listener and the registered terminals that spoke lately. Read from the same places as the
//! metrics (`Gateway::stock`, the line board, the MAC guard); no PIN, key or MAC is in reach of what it shows.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::status_page::{age, percent, Cell, Page, Tone};

use super::cache::Mode;
use super::Gateway;

/// Terminals listed by name on the page at most (the most recent first; locked ones are always listed): a gateway
/// with thousands of terminals keeps a page a browser shows at once, and counts the rest.
const TERMINAL_ROWS: usize = 50;
/// A terminal is counted as active when it spoke within this many seconds.
const ACTIVE_SECS: i64 = 300;

/// One listener's connections: open now, and accepted since start.
#[derive(Debug, Default)]
pub(crate) struct ListenerLoad {
    /// Where it listens (the configured address may have port 0).
    addr: std::sync::OnceLock<std::net::SocketAddr>,
    open: AtomicU64,
    accepted: AtomicU64,
}

impl ListenerLoad {
    pub(crate) fn listening_on(&self, addr: std::net::SocketAddr) {
        let _ = self.addr.set(addr);
    }

    /// A connection accepted; it counts as open until the guard is dropped.
    pub(crate) fn opened(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }
}

/// An open terminal connection, counted in its listener's load while it lives.
pub(crate) struct OpenConnection(Arc<ListenerLoad>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a terminal last spoke, how often it did, and its last answer's code.
#[derive(Clone, Copy, Debug)]
struct Seen {
    last: i64,
    requests: u64,
    code: [u8; 2],
}

/// What only the status page needs counted.
#[derive(Debug, Default)]
pub(super) struct Activity {
    listeners: Mutex<BTreeMap<String, Arc<ListenerLoad>>>,
    /// Registered terminals only (checked by the caller): ids a stranger makes up take no memory here.
    terminals: Mutex<HashMap<Box<str>, Seen>>,
}

impl Activity {
    pub(super) fn listener(&self, name: &str) -> Arc<ListenerLoad> {
        let mut l = self.listeners.lock().expect("not poisoned");
        l.entry(name.to_string()).or_default().clone()
    }

    /// A request of `terminal` answered with `code` at `now` (seconds since the epoch); a terminal not seen before is
    /// remembered only if `registered` says so (asked once per terminal, not per request).
    pub(super) fn seen(&self, terminal: &str, code: &str, now: i64, registered: impl FnOnce() -> bool) {
        // Two characters of the contract's codes, or `??`: the page shows nothing the peer chose freely.
        let code = match code.as_bytes() {
            [a, b] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => [*a, *b],
            _ => *b"??",
        };
        let mut t = self.terminals.lock().expect("not poisoned");
        match t.get_mut(terminal) {
            Some(s) => {
                s.last = now;
                s.requests += 1;
                s.code = code;
            }
            None if registered() => {
                t.insert(
                    terminal.into(),
                    Seen {
                        last: now,
                        requests: 1,
                        code,
                    },
                );
            }
            None => {}
        }
    }
}

impl Gateway {
    /// The connections of listener `name`, counted for the status page.
    pub(crate) fn listener_load(&self, name: &str) -> Arc<ListenerLoad> {
        self.activity.listener(name)
    }

    /// A request from `terminal` received at `at` (seconds since the epoch) answered with `code`: remembered for the
    /// page if the terminal is registered.
    pub(super) fn note_seen(&self, terminal: &str, code: &str, at: i64) {
        self.activity
            .seen(terminal, code, at, || self.registry().terminals.contains_key(terminal));
    }

    /// The status page: one HTML document (see `crate::status_page`).
    pub fn status_page(&self) -> String {
        let now = crate::clock::unix_now();
        let stock = self.stock();
        let id = self
            .upstream
            .catalog()
            .map(|c| c.0.clone())
            .unwrap_or_else(|| "(no PIN server has answered yet)".into());
        let mut p = Page::new("pingate gateway", &format!("gateway {id}"));

        let ready = self.readiness();
        let st = &self.stats;
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        p.section("Summary").facts(&[
            (
                "ready",
                match &ready {
                    Ok(()) => "yes".into(),
                    Err(why) => format!("no: {why}"),
                },
                if ready.is_ok() { Tone::Good } else { Tone::Bad },
            ),
            (
                "journal",
                if self.journal.is_writing() {
                    "writing"
                } else {
                    "CANNOT WRITE"
                }
                .into(),
                if self.journal.is_writing() {
                    Tone::Good
                } else {
                    Tone::Bad
                },
            ),
            ("sales from cache", c(&st.sales_from_cache).to_string(), Tone::Plain),
            ("sales on demand", c(&st.sales_on_demand).to_string(), Tone::Plain),
            ("declined", c(&st.declined).to_string(), Tone::Plain),
            ("repeats", c(&st.repeats).to_string(), Tone::Plain),
            ("reversals taken", c(&st.reversals).to_string(), Tone::Plain),
            ("undelivered", c(&st.undelivered).to_string(), Tone::Plain),
        ]);

        p.section("Listeners");
        let loads = self.activity.listeners.lock().expect("not poisoned").clone();
        let rows: Vec<Vec<Cell>> = self
            .cfg
            .listeners
            .iter()
            .map(|l| {
                let load = loads.get(&l.name);
                let open = load.map_or(0, |x| x.open.load(Ordering::Relaxed));
                let tls = match &l.tls {
                    None => "no",
                    Some(t) if t.client_ca.is_some() => "yes, client certificates",
                    Some(_) => "yes",
                };
                let full = l.max_connections > 0 && open as usize >= l.max_connections;
                vec![
                    Cell::text(&l.name),
                    Cell::text(load.and_then(|x| x.addr.get()).unwrap_or(&l.bind).to_string()),
                    Cell::text(format!("{}{}", l.framing.name(), if l.tpdu { " + TPDU" } else { "" })),
                    Cell::text(&l.dialect),
                    Cell::text(tls),
                    Cell::text(if l.mac.required() { "required" } else { "not required" }),
                    Cell::num(open)
                        .bar(open as f64 / l.max_connections.max(1) as f64)
                        .tone(if full { Tone::Warn } else { Tone::Plain }),
                    Cell::num(l.max_connections),
                    Cell::num(load.map_or(0, |x| x.accepted.load(Ordering::Relaxed))),
                ]
            })
            .collect();
        p.table(
            &[
                "listener", "address", "framing", "dialect", "TLS", "MAC", "open", "max", "accepted",
            ],
            &rows,
            "No TCP listener is configured.",
        );

        p.section("PIN servers");
        let rows: Vec<Vec<Cell>> = stock
            .servers
            .iter()
            .map(|s| {
                vec![
                    Cell::text(&s.server),
                    Cell::num(s.connected).tone(if s.connected > 0 { Tone::Good } else { Tone::Bad }),
                    if s.circuit_open {
                        Cell::text("open (failing fast)").tone(Tone::Bad)
                    } else {
                        Cell::text("closed").tone(Tone::Good)
                    },
                ]
            })
            .collect();
        p.table(
            &["server", "connections", "circuit"],
            &rows,
            "No PIN server is configured.",
        );

        p.section("Cache by product and amount");
        let mut rows: Vec<Vec<Cell>> = stock
            .cache
            .iter()
            .map(|l| {
                let tone = if l.cached == 0 {
                    Tone::Bad
                } else if l.cached < l.low {
                    Tone::Warn
                } else {
                    Tone::Good
                };
                vec![
                    Cell::text(&l.product),
                    Cell::num(l.amount),
                    Cell::text("prefetch"),
                    Cell::num(l.cached)
                        .tone(tone)
                        .bar(l.cached as f64 / l.high.max(1) as f64),
                    Cell::num(l.low),
                    Cell::num(l.target),
                    Cell::num(l.high),
                    Cell::num(l.hits),
                    Cell::num(l.misses),
                    Cell::text(percent(l.hits, l.hits + l.misses)),
                    Cell::num(format!("{:.1}", l.rate_per_sec * 60.0)),
                ]
            })
            .collect();
        let products = self.products.lock().expect("not poisoned").clone();
        for pc in products.iter().filter(|p| p.mode == Mode::OnDemand) {
            let dash = || Cell::text("–");
            rows.push(vec![
                Cell::text(&pc.code),
                Cell::num(pc.amount),
                Cell::text("on demand"),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
            ]);
        }
        p.table(
            &[
                "product",
                "amount",
                "mode",
                "level",
                "low mark",
                "target",
                "high mark",
                "hits",
                "misses",
                "hit rate",
                "sales/min",
            ],
            &rows,
            "No product is configured.",
        )
        .note(
            "Level: PINs held here for prefetch sales. A refill is due under the low mark; the target follows the \
             sale rate, up to the high mark. A miss is sold on demand. Products not listed are sold on demand.",
        );

        p.section("Store and forward (waiting for a PIN server)");
        let waiting = |n: usize| Cell::num(n).tone(if n > 0 { Tone::Warn } else { Tone::Plain });
        p.table(
            &[
                "confirms waiting",
                "reversals waiting",
                "releases waiting",
                "confirmed",
                "failed attempts (retried)",
                "refused for good",
                "confirm conflicts",
            ],
            &[vec![
                waiting(stock.pending_confirms),
                waiting(stock.pending_reversals),
                waiting(stock.pending_releases),
                Cell::num(c(&st.confirms_done)),
                Cell::num(c(&st.forward_failures)),
                Cell::num(c(&st.forward_refused)).tone(if c(&st.forward_refused) > 0 {
                    Tone::Bad
                } else {
                    Tone::Plain
                }),
                Cell::num(c(&st.confirm_conflicts)).tone(if c(&st.confirm_conflicts) > 0 {
                    Tone::Bad
                } else {
                    Tone::Plain
                }),
            ]],
            "",
        );

        p.section("Serial lines");
        let board = self.lines.borrow().clone();
        let rows: Vec<Vec<Cell>> = board
            .iter()
            .map(|(name, l)| {
                let tone = match l.state.as_str() {
                    "down" | "not answering" => Tone::Bad,
                    "opening" | "initialising" | "hanging up" => Tone::Warn,
                    _ => Tone::Good,
                };
                vec![
                    Cell::text(name),
                    Cell::text(&l.state).tone(tone),
                    Cell::num(l.calls),
                    Cell::num(l.delivered),
                    Cell::num(l.reversed),
                    Cell::num(l.opens),
                    Cell::text(l.speed.map_or("–".into(), |s| s.to_string())),
                    Cell::text(l.last_error.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        p.table(
            &[
                "line",
                "state",
                "calls",
                "delivered",
                "reversed",
                "opens",
                "speed",
                "last problem",
            ],
            &rows,
            "No serial line is configured.",
        );

        p.section("Terminals");
        let registry = self.registry();
        let seen = self.activity.terminals.lock().expect("not poisoned").clone();
        let macs: HashMap<String, super::controller::MacStatus> =
            self.mac_status().into_iter().map(|m| (m.terminal.clone(), m)).collect();
        let locked = macs.values().filter(|m| m.locked_since.is_some()).count();
        let active = seen.values().filter(|s| now - s.last < ACTIVE_SECS).count();
        p.facts(&[
            ("registered", registry.terminals.len().to_string(), Tone::Plain),
            ("seen since start", seen.len().to_string(), Tone::Plain),
            ("active (last 5 min)", active.to_string(), Tone::Plain),
            (
                "locked (MAC failures)",
                locked.to_string(),
                if locked > 0 { Tone::Bad } else { Tone::Plain },
            ),
        ]);
        // Locked terminals first, then the most recently seen.
        let mut ids: Vec<&str> = macs
            .values()
            .filter(|m| m.locked_since.is_some())
            .map(|m| m.terminal.as_str())
            .collect();
        let mut by_recent: Vec<(&Box<str>, &Seen)> = seen.iter().collect();
        by_recent.sort_by(|a, b| b.1.last.cmp(&a.1.last).then(a.0.cmp(b.0)));
        for (t, _) in by_recent {
            if ids.len() >= TERMINAL_ROWS.max(locked) {
                break;
            }
            if !ids.contains(&&**t) {
                ids.push(t);
            }
        }
        let rows: Vec<Vec<Cell>> = ids
            .iter()
            .map(|t| {
                let s = seen.get(*t);
                let m = macs.get(*t);
                let merchant = registry
                    .terminals
                    .get(*t)
                    .map_or("(not registered now)", |e| e.merchant.as_str());
                let code = s.map_or(String::new(), |s| String::from_utf8_lossy(&s.code).into_owned());
                vec![
                    Cell::text(*t),
                    Cell::text(merchant),
                    Cell::text(s.map_or("–".into(), |s| format!("{} ago", age((now - s.last).max(0) as u64)))),
                    Cell::num(s.map_or(0, |s| s.requests)),
                    Cell::text(&code).tone(if code == "00" { Tone::Plain } else { Tone::Warn }),
                    Cell::num(m.map_or(0, |m| m.failures)),
                    match m.and_then(|m| m.locked_since) {
                        Some(since) => {
                            Cell::text(format!("locked {} ago", age((now - since).max(0) as u64))).tone(Tone::Bad)
                        }
                        None => Cell::text("no"),
                    },
                ]
            })
            .collect();
        p.table(
            &[
                "terminal",
                "merchant",
                "last request",
                "requests",
                "last code",
                "MAC failures",
                "locked",
            ],
            &rows,
            "No registered terminal has spoken since the gateway started.",
        );
        if ids.len() < seen.len() {
            p.note(&format!(
                "The {} most recent of {} terminals seen; `pingate terminals status` lists MAC failures of all.",
                ids.len(),
                seen.len()
            ));
        }
        p.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registered_terminals_are_remembered_and_codes_are_the_contracts() {
        let a = Activity::default();
        a.seen("STRANGER", "00", 10, || false);
        a.seen("T1", "00", 10, || true);
        // Known now: the registry is not asked again.
        a.seen("T1", "<script>", 20, || panic!("asked twice"));
        let t = a.terminals.lock().unwrap();
        assert_eq!(t.len(), 1);
        let s = t["T1"];
        assert_eq!((s.last, s.requests, &s.code), (20, 2, b"??"));
    }

    #[test]
    fn open_connections_are_counted_while_they_live() {
        let a = Activity::default();
        let l = a.listener("tcp");
        let one = l.opened();
        let two = a.listener("tcp").opened();
        drop(one);
        assert_eq!(l.open.load(Ordering::Relaxed), 1);
        assert_eq!(l.accepted.load(Ordering::Relaxed), 2);
        drop(two);
        assert_eq!(l.open.load(Ordering::Relaxed), 0);
    }
}
