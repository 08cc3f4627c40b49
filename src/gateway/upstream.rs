//! The gateway's connections to its PIN servers: a few TLS connections per server kept open in the background
//! (reconnect with jittered exponential backoff, a ping when idle), failover between servers, and a circuit breaker
//! per server so that a server that accepts but does not answer costs a terminal at most one deadline, and after a
//! few such failures nothing at all (calls fail fast with [`UpstreamError::Unavailable`] until a probe succeeds).
//!
//! Every server in one list must serve the same inventory (one SQLite server, or several servers on one
//! PostgreSQL): a call that failed on one server is asked again on the next, which is safe only because every
//! operation is idempotent on the shared inventory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::logging::limited;
use crate::psp::client::{ClientError, PspClient};
use crate::psp::{CatalogEntry, Request, Response, WireError};

/// Why an upstream call has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No server could take the call: none connected, or every circuit open.
    #[error("no PIN server available")]
    Unavailable,
    /// The call was sent but not answered before its deadline (the server may have done it).
    #[error("PIN server did not answer in time")]
    Timeout,
    /// The server answered with an error.
    #[error("PIN server: {:?}: {}", .0.code, .0.message)]
    Server(WireError),
}

/// One PIN server to connect to.
#[derive(Clone, Debug)]
pub struct ServerAddr {
    pub addr: SocketAddr,
    /// The name its certificate is checked against.
    pub name: String,
}

/// Tuning of the pool.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Connections kept open to each server.
    pub connections: usize,
    /// Time allowed for TCP connect, TLS handshake and hello.
    pub connect_timeout: Duration,
    /// First and longest wait between reconnect attempts (the wait doubles, with jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A connection idle this long is pinged; no pong within `connect_timeout` drops it.
    pub ping_every: Duration,
    /// Consecutive failures (timeouts, dropped connections) that open a server's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before one probe is let through.
    pub breaker_cooldown: Duration,
    /// Requests in flight per connection; more wait here for room on a connection (the server answers `busy`
    /// past its own cap, 256, per connection).
    pub max_in_flight: usize,
}

impl Default for UpstreamOptions {
    fn default() -> UpstreamOptions {
        UpstreamOptions {
            connections: 2,
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            ping_every: Duration::from_secs(10),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
            max_in_flight: 200,
        }
    }
}

/// A circuit breaker. No I/O: the caller says what happened and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; others are refused until it comes back.
    HalfOpen,
}

impl Breaker {
    /// Whether a call may go now (an open circuit past its cooldown lets one probe through).
    pub fn allow(&mut self, now: Instant) -> bool {
        match *self {
            Breaker::Closed { .. } => true,
            Breaker::Open { until } if now >= until => {
                *self = Breaker::HalfOpen;
                true
            }
            Breaker::Open { .. } | Breaker::HalfOpen => false,
        }
    }

    pub fn success(&mut self) {
        *self = Breaker::Closed { failures: 0 };
    }

    pub fn failure(&mut self, now: Instant, threshold: u32, cooldown: Duration) {
        *self = match *self {
            Breaker::Closed { failures } if failures + 1 < threshold => Breaker::Closed { failures: failures + 1 },
            _ => Breaker::Open { until: now + cooldown },
        };
    }

    pub fn is_open(&self) -> bool {
        !matches!(self, Breaker::Closed { .. })
    }
}

/// A live connection and its room for requests in flight.
type Conn = (Arc<PspClient>, Arc<Semaphore>);

struct Slot {
    server: ServerAddr,
    conns: Vec<Mutex<Option<Conn>>>,
    breaker: Mutex<Breaker>,
    next: AtomicUsize,
}

/// A connection to send on.
enum Pick {
    /// With room: the permit is held for the call.
    Ready(Arc<PspClient>, OwnedSemaphorePermit),
    /// Every live connection is full: wait for room on this one.
    Full(Arc<PspClient>, Arc<Semaphore>),
    None,
}

impl Slot {
    fn live(&self) -> Vec<Conn> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .filter_map(|i| {
                let c = self.conns[(start + i) % n].lock().expect("not poisoned").clone()?;
                (!c.0.is_closed()).then_some(c)
            })
            .collect()
    }

    /// A live connection with room (round robin), or one to wait for room on.
    fn pick(&self) -> Pick {
        let live = self.live();
        for (c, room) in &live {
            if let Ok(p) = room.clone().try_acquire_owned() {
                return Pick::Ready(c.clone(), p);
            }
        }
        match live.into_iter().next() {
            Some((c, room)) => Pick::Full(c, room),
            None => Pick::None,
        }
    }
}

/// Health of one server, for `gateway stock` and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerHealth {
    pub server: String,
    pub connected: usize,
    pub circuit_open: bool,
}

/// The gateway id and catalog a server's welcome gave.
pub type Catalog = (String, Vec<CatalogEntry>);

/// The pool. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    slots: Arc<Vec<Slot>>,
    opts: Arc<UpstreamOptions>,
    next: Arc<AtomicUsize>,
    catalog: Arc<RwLock<Option<Arc<Catalog>>>>,
    connected: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

impl Upstream {
    /// Starts keeping connections to `servers`; returns at once (connections come up in the background).
    pub fn start(servers: Vec<ServerAddr>, tls: Arc<rustls::ClientConfig>, opts: UpstreamOptions) -> Upstream {
        let slots: Vec<Slot> = servers
            .into_iter()
            .map(|server| Slot {
                server,
                conns: (0..opts.connections.max(1)).map(|_| Mutex::new(None)).collect(),
                breaker: Mutex::new(Breaker::Closed { failures: 0 }),
                next: AtomicUsize::new(0),
            })
            .collect();
        let up = Upstream {
            slots: Arc::new(slots),
            opts: Arc::new(opts),
            next: Arc::new(AtomicUsize::new(0)),
            catalog: Arc::new(RwLock::new(None)),
            connected: Arc::new(tokio::sync::Notify::new()),
            stop: CancellationToken::new(),
        };
        for s in 0..up.slots.len() {
            for c in 0..up.slots[s].conns.len() {
                tokio::spawn(up.clone().keep(s, c, tls.clone()));
            }
        }
        up
    }

    /// Keeps connection `c` of server `s` open until the pool stops.
    async fn keep(self, s: usize, c: usize, tls: Arc<rustls::ClientConfig>) {
        let slot = &self.slots[s];
        let mut attempt = 0u32;
        loop {
            let connect = PspClient::connect(slot.server.addr, &slot.server.name, tls.clone());
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = tokio::time::timeout(self.opts.connect_timeout, connect) => r,
            };
            match result {
                Ok(Ok((client, welcome))) => {
                    attempt = 0;
                    tracing::info!(server = %slot.server.addr, conn = c, gateway = %welcome.gateway, "connected to PIN server");
                    *self.catalog.write().expect("not poisoned") = Some(Arc::new((welcome.gateway, welcome.catalog)));
                    let client = Arc::new(client);
                    let room = Arc::new(Semaphore::new(self.opts.max_in_flight.max(1)));
                    *slot.conns[c].lock().expect("not poisoned") = Some((client.clone(), room));
                    self.connected.notify_waiters();
                    self.watch(s, &client).await;
                    *slot.conns[c].lock().expect("not poisoned") = None;
                    if self.stop.is_cancelled() {
                        return;
                    }
                    limited!(warn, key: &slot.server.addr.to_string(); "connection to PIN server lost", server = %slot.server.addr, conn = c);
                }
                Ok(Err(e)) => {
                    limited!(warn, key: &slot.server.addr.to_string(); "cannot connect to PIN server", server = %slot.server.addr, conn = c, error = %e)
                }
                Err(_) => {
                    limited!(warn, key: &slot.server.addr.to_string(); "connect to PIN server timed out", server = %slot.server.addr, conn = c)
                }
            }
            let wait = backoff(self.opts.backoff_min, self.opts.backoff_max, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Returns when `client` is gone: closed by the server, or silent to a ping.
    async fn watch(&self, s: usize, client: &PspClient) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = client.closed() => return,
                _ = tokio::time::sleep(self.opts.ping_every) => {
                    match tokio::time::timeout(self.opts.connect_timeout, client.call(Request::Ping)).await {
                        Ok(Ok(_)) => {}
                        _ => {
                            let slot = &self.slots[s];
                            slot.breaker.lock().expect("not poisoned").failure(
                                Instant::now(),
                                self.opts.breaker_failures,
                                self.opts.breaker_cooldown,
                            );
                            limited!(warn, key: &slot.server.addr.to_string(); "PIN server did not answer a ping; reconnecting", server = %slot.server.addr);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Waits until at least one connection is up, or `timeout` passes. Returns whether one is up.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.connected.notified();
            if self.slots.iter().any(|s| !s.live().is_empty()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// The gateway id and catalog of the last welcome (shared: every sale checks it).
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.catalog.read().expect("not poisoned").clone()
    }

    pub fn health(&self) -> Vec<ServerHealth> {
        self.slots
            .iter()
            .map(|s| ServerHealth {
                server: s.server.addr.to_string(),
                connected: s
                    .conns
                    .iter()
                    .filter(|c| {
                        c.lock()
                            .expect("not poisoned")
                            .as_ref()
                            .is_some_and(|c| !c.0.is_closed())
                    })
                    .count(),
                circuit_open: s.breaker.lock().expect("not poisoned").is_open(),
            })
            .collect()
    }

    /// Sends `request` to a server that can take it, failing over to the next on a dropped connection; gives up at
    /// `deadline`. Once an attempt may have reached a server, a later failure anywhere is reported as
    /// [`UpstreamError::Timeout`] ("may have been done"), never as a refusal: the caller must not conclude that
    /// nothing happened.
    pub async fn call(&self, request: Request, deadline: Instant) -> Result<Response, UpstreamError> {
        self.call_with(request, deadline, true).await
    }

    /// [`Upstream::call`] without failover: for requests that are not idempotent (`reserve`), which must not be
    /// asked twice.
    pub async fn call_once(&self, request: Request, deadline: Instant) -> Result<Response, UpstreamError> {
        self.call_with(request, deadline, false).await
    }

    async fn call_with(&self, request: Request, deadline: Instant, failover: bool) -> Result<Response, UpstreamError> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut maybe_sent = false;
        let uncertain = |e: UpstreamError, maybe_sent: bool| if maybe_sent { UpstreamError::Timeout } else { e };
        for i in 0..n {
            let slot = &self.slots[(start + i) % n];
            let probe = {
                let mut b = slot.breaker.lock().expect("not poisoned");
                if !b.allow(Instant::now()) {
                    continue;
                }
                *b == Breaker::HalfOpen
            };
            // A probe that ends without an answer must not leave the circuit half-open for ever.
            let fail_probe = || {
                if probe {
                    slot.breaker.lock().expect("not poisoned").failure(
                        Instant::now(),
                        self.opts.breaker_failures,
                        self.opts.breaker_cooldown,
                    );
                }
            };
            // Waiting for room is bounded by the deadline; nothing was sent if it runs out.
            let (conn, _permit) = match slot.pick() {
                Pick::Ready(c, p) => (c, p),
                Pick::Full(c, room) => match tokio::time::timeout_at(deadline, room.acquire_owned()).await {
                    Ok(Ok(p)) => (c, p),
                    _ => {
                        fail_probe();
                        return Err(uncertain(UpstreamError::Unavailable, maybe_sent));
                    }
                },
                Pick::None => {
                    fail_probe();
                    continue;
                }
            };
            let given = deadline.saturating_duration_since(Instant::now());
            let sent_before = maybe_sent;
            maybe_sent = true;
            match tokio::time::timeout_at(deadline, conn.call(request.clone())).await {
                Ok(Ok(r)) => {
                    slot.breaker.lock().expect("not poisoned").success();
                    return Ok(r);
                }
                Ok(Err(ClientError::Server(e))) => {
                    slot.breaker.lock().expect("not poisoned").success();
                    // A refusal after an earlier attempt was cut off says nothing about that attempt.
                    return Err(uncertain(UpstreamError::Server(e), sent_before));
                }
                Ok(Err(e)) => {
                    tracing::debug!(server = %slot.server.addr, error = %e, "call failed; trying the next server");
                    slot.breaker.lock().expect("not poisoned").failure(
                        Instant::now(),
                        self.opts.breaker_failures,
                        self.opts.breaker_cooldown,
                    );
                    if !failover {
                        return Err(UpstreamError::Timeout);
                    }
                }
                Err(_) => {
                    // A caller that gave the server almost no time says nothing about the server's health.
                    if given >= Duration::from_millis(500) || probe {
                        slot.breaker.lock().expect("not poisoned").failure(
                            Instant::now(),
                            self.opts.breaker_failures,
                            self.opts.breaker_cooldown,
                        );
                    }
                    return Err(UpstreamError::Timeout);
                }
            }
        }
        Err(uncertain(UpstreamError::Unavailable, maybe_sent))
    }

    /// Stops reconnecting and drops every connection.
    pub fn stop(&self) {
        self.stop.cancel();
        for s in self.slots.iter() {
            for c in &s.conns {
                c.lock().expect("not poisoned").take();
            }
        }
    }
}

/// The wait before retry `attempt`: exponential from `min`, capped at `max`, then a random half to the whole of it
/// (so that gateways cut off together do not come back together).
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let frac = 0.5 + (u32::from_le_bytes(r) as f64 / u32::MAX as f64) / 2.0;
    base.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_lets_one_probe_through_after_cooldown() {
        let t0 = Instant::now();
        let cool = Duration::from_secs(5);
        let mut b = Breaker::Closed { failures: 0 };
        b.failure(t0, 3, cool);
        b.failure(t0, 3, cool);
        assert!(b.allow(t0));
        b.failure(t0, 3, cool);
        assert!(b.is_open());
        assert!(!b.allow(t0 + Duration::from_secs(4)));
        assert!(b.allow(t0 + Duration::from_secs(5)), "probe");
        assert!(!b.allow(t0 + Duration::from_secs(5)), "only one probe");
        b.failure(t0 + Duration::from_secs(5), 3, cool);
        assert!(!b.allow(t0 + Duration::from_secs(9)));
        assert!(b.allow(t0 + Duration::from_secs(10)));
        b.success();
        assert_eq!(b, Breaker::Closed { failures: 0 });
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let o = UpstreamOptions::default();
        for a in 0..30 {
            let exp = o.backoff_min.saturating_mul(1u32 << a.min(16)).min(o.backoff_max);
            let w = backoff(o.backoff_min, o.backoff_max, a);
            assert!(w <= exp && w >= exp / 2, "attempt {a}: {w:?} vs {exp:?}");
        }
        let waits: std::collections::HashSet<_> = (0..20).map(|_| backoff(o.backoff_min, o.backoff_max, 5)).collect();
        assert!(waits.len() > 1, "jitter");
    }
}
