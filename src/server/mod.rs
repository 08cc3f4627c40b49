//! The PIN server: accepts gateways over mutual TLS, speaks PSP, and applies their requests to the inventory. This
//! file holds the listener, the connections, their caps and the shutdown; `handler.rs` maps each request to a store
//! operation and its result to an answer.
//!
//! Shaped like mini-redis: [`run`] takes a bound listener and a shutdown future; one task per connection with a
//! tracing span (connection id, peer, gateway); caps on connections; on shutdown it stops accepting, lets every
//! connection finish the requests it has in flight, then returns (the caller then closes the store).
//!
//! Connection slots: a connection is unauthenticated from its accept until its TLS handshake is done with a listed
//! gateway certificate, and must say hello within `handshake_timeout` of its accept. Unauthenticated connections
//! are capped per source address and in all, and a new one is always taken: at a cap it closes the oldest one of
//! its source, or of all, so idle sockets, however many, only shorten each other's lives and cannot keep a gateway
//! out. Authenticated connections have slots of their own (`max_connections`) that no unauthenticated one takes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

mod handler;
mod status;

use crate::logging::limited;
use crate::metrics::{write_family, write_single, CounterSlots, Described, LatencyHistogram, Registry};
use crate::psp::{
    parse_request, ErrorCode, FrameCodec, Request, ResponseFrame, StockEntry, MAX_ANSWER_FRAME, MAX_REQUEST_FRAME,
    VERSION,
};
use crate::store::handle::StoreHandle;
use crate::store::{Op, Outcome};
use crate::tls::{GatewayList, SharedGatewayList};

/// How long one answer may take to write before the gateway is deemed not to read, and the connection ends.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing connection keeps reading what the gateway still sends (see the end of `connection`).
const LINGER: Duration = Duration::from_millis(500);

/// Default of [`ServerOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of [`ServerOptions::max_unauthenticated`].
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 128;
/// Default of [`ServerOptions::max_unauthenticated_per_source`].
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 32;
/// Default of [`ServerOptions::handshake_timeout`], in milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Limits of the server. Every one of them protects it from a client it does not trust.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Gateway connections (TLS handshake done with a listed certificate) open at once; more are closed.
    pub max_connections: usize,
    /// Connections not authenticated yet, in all: past it, a new connection closes the oldest of them.
    pub max_unauthenticated: usize,
    /// Connections not authenticated yet from one source address: past it, a new one closes the oldest of them.
    pub max_unauthenticated_per_source: usize,
    /// Requests in flight on one connection; more are answered `busy`.
    pub max_in_flight: usize,
    /// Largest frame body accepted; a larger one closes the connection.
    pub max_frame: usize,
    /// Time from a connection's accept to its hello: the TLS handshake and the hello must both be done within it.
    pub handshake_timeout: Duration,
    /// A connection with nothing in flight and no request for this long is closed.
    pub idle_timeout: Duration,
    /// Longest lease a gateway may ask for.
    pub max_lease: Duration,
    /// A repeat of a sale older than this gets no PIN (`repeat_expired`); a day by default.
    pub repeat_age: Duration,
    /// A terminal's reversal later than this after its sale is refused (`reversal_too_late`, 21 to the terminal)
    /// and the PIN stays sold; `None`: no window.
    pub reversal_window: Option<Duration>,
    /// Prometheus metrics, health and readiness over HTTP (off when `None`; keep it on loopback).
    pub metrics: Option<SocketAddr>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            max_in_flight: 256,
            max_frame: MAX_REQUEST_FRAME,
            handshake_timeout: Duration::from_millis(DEFAULT_HANDSHAKE_TIMEOUT_MS),
            idle_timeout: Duration::from_secs(300),
            max_lease: Duration::from_secs(24 * 3600),
            repeat_age: Duration::from_secs(crate::store::DEFAULT_REPEAT_AGE_SECS as u64),
            reversal_window: None,
            metrics: None,
        }
    }
}

impl ServerOptions {
    /// Each limit within its range (the command line's flags name them), or the first one out of it, with its range.
    /// `pg_connections` is the store's, checked here with the others.
    pub fn check(&self, pg_connections: usize) -> Result<(), String> {
        let secs = |d: Duration| d.as_secs();
        for (flag, v, lo, hi) in [
            ("--max-connections", self.max_connections as u64, 1, 100_000),
            // A gateway sends up to 200 requests at once on a connection; fewer are answered `busy`.
            ("--max-in-flight", self.max_in_flight as u64, 1, 4_096),
            // The protocol's largest request (a confirm_batch at its longest) needs the default.
            (
                "--max-frame",
                self.max_frame as u64,
                MAX_REQUEST_FRAME as u64,
                16 * 1024 * 1024,
            ),
            ("--max-unauthenticated", self.max_unauthenticated as u64, 1, 100_000),
            (
                "--max-unauthenticated-per-source",
                self.max_unauthenticated_per_source as u64,
                1,
                100_000,
            ),
            (
                "--handshake-timeout-ms",
                self.handshake_timeout.as_millis() as u64,
                100,
                600_000,
            ),
            // Above the gateways' ping interval (at most 120 s), or their idle connections are closed.
            ("--idle-timeout-secs", secs(self.idle_timeout), 30, 86_400),
            ("--max-lease-secs", secs(self.max_lease), 60, 7 * 86_400),
            ("--repeat-age-secs", secs(self.repeat_age), 60, 30 * 86_400),
            ("--pg-connections", pg_connections as u64, 1, 64),
            (
                "--reversal-window-secs",
                self.reversal_window.map_or(60, secs),
                60,
                604_800,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{flag}: must be {lo} to {hi}"));
            }
        }
        Ok(())
    }
}

struct Shared {
    store: StoreHandle,
    /// The list in force: replaced by [`reload_gateways`], watched by every connection.
    gateways: SharedGatewayList,
    opts: ServerOptions,
    metrics: ServerMetrics,
    unauthenticated: Mutex<Unauthenticated>,
    /// One permit per authenticated connection.
    gateway_slots: Arc<Semaphore>,
    /// Sold counts of past stock readings, for the status page's sale rate and days of cover.
    sold_history: Mutex<status::SoldHistory>,
}

/// Connections not authenticated yet (TLS handshake or hello under way), oldest first (see the module).
#[derive(Default)]
struct Unauthenticated {
    /// By connection id (ids grow: the oldest first): the source address, and the token that closes it.
    conns: BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_source: HashMap<IpAddr, usize>,
}

impl Unauthenticated {
    /// Takes connection `id` from `source`. At a cap, the oldest connection of the same source (`source_cap`), or
    /// of all (`pool_cap`), is closed to make room: returned with its source address.
    fn admit(
        &mut self,
        id: u64,
        source: IpAddr,
        token: CancellationToken,
        max: usize,
        max_per_source: usize,
    ) -> Vec<(&'static str, IpAddr)> {
        let mut closed = Vec::new();
        if self.per_source.get(&source).copied().unwrap_or(0) >= max_per_source.max(1) {
            let oldest = self.conns.iter().find(|(_, (ip, _))| *ip == source).map(|(id, _)| *id);
            if let Some(old) = oldest {
                self.close(old);
                closed.push(("source_cap", source));
            }
        }
        if self.conns.len() >= max.max(1) {
            let oldest = self.conns.iter().next().map(|(id, (ip, _))| (*id, *ip));
            if let Some((old, ip)) = oldest {
                self.close(old);
                closed.push(("pool_cap", ip));
            }
        }
        self.conns.insert(id, (source, token));
        *self.per_source.entry(source).or_default() += 1;
        closed
    }

    fn close(&mut self, id: u64) {
        if let Some((_, token)) = self.conns.get(&id) {
            token.cancel();
        }
        self.remove(id);
    }

    /// Connection `id` is authenticated or gone (nothing if it was closed to make room already).
    fn remove(&mut self, id: u64) {
        if let Some((ip, _)) = self.conns.remove(&id) {
            if let Some(n) = self.per_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(&ip);
                }
            }
        }
    }
}

/// A connection's place among the unauthenticated ones, given up when dropped (authenticated, or gone).
struct Pending {
    shared: Arc<Shared>,
    id: u64,
    /// Cancelled when the connection is closed to make room for a newer one, or at shutdown.
    closed: CancellationToken,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.shared
            .unauthenticated
            .lock()
            .expect("not poisoned")
            .remove(self.id);
    }
}

/// A PSP request's labels: its operation, and its result (`ok` or the error code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    result: &'static str,
}

/// Why a connection was closed before it was authenticated (a fixed word).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The operations with a counter slot of their own ([`Request::op_name`]); one not listed is counted all the same,
/// through the family's lock.
const OPS: [&str; 15] = [
    "hello",
    "sell",
    "reserve",
    "confirm",
    "confirm_batch",
    "release",
    "reverse",
    "reverse_pin",
    "renew",
    "stock",
    "held",
    "ping",
    "allowance",
    "check_sale",
    "sales_allowance",
];
/// Results with a slot: `ok`, then each [`ErrorCode`] by its place in [`ErrorCode::ALL`].
const RESULTS: usize = 1 + ErrorCode::ALL.len();

/// What the metrics endpoint shows, and the registry that holds it: one per server.
struct ServerMetrics {
    /// By operation and result (`ok` or the error code).
    requests: CounterSlots<RequestLabels>,
    latency: LatencyHistogram,
    /// Authenticated (gateway) connections open.
    connections: Gauge,
    /// Connections closed before they were authenticated, by reason.
    unauthenticated_closed: Family<ReasonLabels, Counter>,
    /// Stock by product, amount and state, refreshed in the background (a scrape never queries the database), and
    /// when it was last read successfully.
    stock: std::sync::Mutex<(Vec<StockEntry>, Option<std::time::Instant>)>,
    /// A scrape that finds the stock older than a second asks for a new reading (and shows the last one).
    refresh: tokio::sync::Notify,
    /// Merchants' limits across gateways and what was granted of them (today; this minute), read with the stock.
    limits: std::sync::Mutex<(Vec<crate::store::LimitRow>, Vec<crate::store::RateRow>)>,
    /// Sold PINs handed out again to a repeat of their sale.
    redeliveries: Counter,
    /// Cached sales whose confirm was refused for good (see `Confirmation::Conflict`).
    confirm_conflicts: Counter,
    registry: Registry,
}

impl ServerMetrics {
    /// The metrics of the server `shared` (the one being made: what it holds is read at scrape time through it).
    fn new(shared: std::sync::Weak<Shared>) -> ServerMetrics {
        let mut r = Registry::default();
        let (requests, latency) = crate::metrics::request_metrics(
            &mut r,
            "pingate_server",
            "PSP requests by operation and result.",
            "Time to answer a PSP request.",
            OPS.len() * RESULTS,
        );
        let (connections, unauthenticated_closed) = (Gauge::default(), Family::default());
        let (redeliveries, confirm_conflicts) = (Counter::default(), Counter::default());
        r.register(
            "pingate_server_connections",
            "Open gateway connections.",
            connections.clone(),
        );
        r.register(
            "pingate_server_redeliveries",
            "Sold PINs handed out again to a repeat of their sale (each recorded in the redeliveries table).",
            redeliveries.clone(),
        );
        r.register(
            "pingate_server_confirm_conflicts",
            "Cached sales whose confirm was refused for good (recorded in confirm_conflicts for the operator).",
            confirm_conflicts.clone(),
        );
        r.register(
            "pingate_server_unauthenticated_closed",
            "Connections closed before they were authenticated: source_cap and pool_cap (the oldest, to make room \
             for a new one), deadline (no TLS handshake and hello in time), tls (handshake failed), gateway_cap (too \
             many gateway connections).",
            Described(unauthenticated_closed.clone()),
        );
        r.register_collector(Box::new(StateCollector(shared)));
        ServerMetrics {
            requests,
            latency,
            connections,
            unauthenticated_closed,
            stock: std::sync::Mutex::new((Vec::new(), None)),
            refresh: tokio::sync::Notify::new(),
            limits: std::sync::Mutex::new((Vec::new(), Vec::new())),
            redeliveries,
            confirm_conflicts,
            registry: r,
        }
    }

    /// A request of operation `op` answered with `error` (`None`: ok).
    fn count(&self, op: &'static str, error: Option<ErrorCode>) {
        let r = error.map_or(Some(0), |e| ErrorCode::ALL.iter().position(|c| *c == e).map(|i| i + 1));
        let slot = OPS.iter().position(|o| *o == op).zip(r).map(|(o, r)| o * RESULTS + r);
        let result = error.map_or("ok", ErrorCode::as_str);
        self.requests.inc(slot, || RequestLabels { op, result });
    }

    fn closed(&self, reason: &'static str) {
        self.unauthenticated_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// What the server holds, read at scrape time: connections under way, and the stock last read.
#[derive(Debug)]
struct StateCollector(std::sync::Weak<Shared>);

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A scrape that outlives its server shows nothing more of it.
        let Some(shared) = self.0.upgrade() else {
            return Ok(());
        };
        let under_way = shared.unauthenticated.lock().expect("not poisoned").conns.len();
        write_single(
            &mut e,
            "pingate_server_unauthenticated_connections",
            "Connections whose TLS handshake or hello is under way.",
            ConstGauge::new(i64::try_from(under_way).unwrap_or(i64::MAX)),
        )?;
        {
            // Limits set with `pingate limits set` (kept in the database, shared by every server on it); what was
            // granted is what gateways took in slices to sell from, at most the limit, not what they sold.
            let limits = shared.metrics.limits.lock().expect("not poisoned");
            fn value_labels(l: &crate::store::LimitRow) -> [(&'static str, &str); 2] {
                [("merchant", &l.merchant_id), ("currency", &l.currency)]
            }
            write_family(
                &mut e,
                "pingate_server_merchant_value_limit",
                "A merchant's value per UTC day in a currency (minor units) across every gateway (pingate limits set).",
                limits
                    .0
                    .iter()
                    .map(|l| (value_labels(l), ConstGauge::new(l.value_per_day))),
            )?;
            write_family(
                &mut e,
                "pingate_server_merchant_value_granted_today",
                "What of a merchant's value limit was granted to gateways today (UTC), in slices they sell from.",
                limits
                    .0
                    .iter()
                    .map(|l| (value_labels(l), ConstGauge::new(l.granted_today))),
            )?;
            write_family(
                &mut e,
                "pingate_server_merchant_sales_per_minute_limit",
                "A merchant's sales per UTC minute across every gateway (pingate limits set --sales-per-minute).",
                limits.1.iter().map(|l| {
                    (
                        [("merchant", l.merchant_id.as_str())],
                        ConstGauge::new(l.sales_per_minute),
                    )
                }),
            )?;
            write_family(
                &mut e,
                "pingate_server_merchant_sales_granted_this_minute",
                "What of a merchant's sales per minute was granted to gateways in the current UTC minute.",
                limits.1.iter().map(|l| {
                    (
                        [("merchant", l.merchant_id.as_str())],
                        ConstGauge::new(l.granted_this_minute),
                    )
                }),
            )?;
        }
        let stock = shared.metrics.stock.lock().expect("not poisoned");
        let amounts: Vec<String> = stock.0.iter().map(|s| s.amount.to_string()).collect();
        write_family(
            &mut e,
            "pingate_server_stock_pins",
            "PINs by product, amount and state.",
            stock.0.iter().zip(&amounts).map(|(s, amount)| {
                (
                    [("product", &s.product), ("amount", amount), ("state", &s.state)],
                    ConstGauge::new(s.count),
                )
            }),
        )
    }
}

/// How often the stock shown in the metrics is read again; readiness fails when it could not be read for 3 times
/// as long.
const STOCK_EVERY: Duration = Duration::from_secs(10);
/// How often available PINs past their expiry date are moved to `expired`.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

async fn expire_pins(shared: &Shared) {
    match shared.store.call(Op::Expire).await {
        Ok(Outcome::Expired(0)) => {}
        Ok(Outcome::Expired(n)) => info!(pins = n, "PINs past their expiry date moved to expired"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "expiring PINs failed (tried again within the hour)"),
    }
}

/// A scrape finding the stock older than this asks for a new reading (the database is read for scrapes at most
/// this often).
const STOCK_FRESH: Duration = Duration::from_secs(2);

struct MetricsSource(Arc<Shared>);

impl MetricsSource {
    /// A stock reading older than [`STOCK_FRESH`] is asked for again (the page or scrape shows the last one).
    fn refresh_stale(&self) {
        let m = &self.0.metrics;
        if m.stock
            .lock()
            .expect("not poisoned")
            .1
            .is_none_or(|t| t.elapsed() > STOCK_FRESH)
        {
            m.refresh.notify_one();
        }
    }
}

impl crate::metrics::Source for MetricsSource {
    fn metrics(&self) -> String {
        self.refresh_stale();
        crate::metrics::exposition(&self.0.metrics.registry)
    }

    fn status(&self) -> String {
        self.refresh_stale();
        let m = &self.0.metrics;
        let stock = m.stock.lock().expect("not poisoned").clone();
        let history = self.0.sold_history.lock().expect("not poisoned");
        status::render(&status::View {
            ready: self.ready(),
            connections: m.connections.get().max(0) as u64,
            unauthenticated: self.0.unauthenticated.lock().expect("not poisoned").conns.len(),
            max_connections: self.0.opts.max_connections,
            stock: &stock.0,
            read_at: stock.1,
            history: &history,
        })
    }

    fn ready(&self) -> Result<(), String> {
        match self.0.metrics.stock.lock().expect("not poisoned").1 {
            Some(t) if t.elapsed() < STOCK_EVERY * 3 => Ok(()),
            Some(_) => Err("the inventory database has not answered lately".into()),
            None => Err("the inventory database has not answered yet".into()),
        }
    }
}

/// Reads the gateway list at `path` again and puts it in force (SIGHUP): handshakes from now on are checked against
/// it (when `gateways` is the list the TLS configuration checks, [`crate::tls::server_config_shared`]), and each open
/// connection whose certificate is no longer on it, or now names another gateway, stops taking requests, answers
/// those it took, and closes. A list that does not load, or lists no gateway, changes nothing; the log says why.
pub fn reload_gateways(path: &std::path::Path, gateways: &SharedGatewayList) {
    match GatewayList::load(path) {
        Err(e) => tracing::error!(error = %e, "SIGHUP: the gateway list has a problem; nothing changed"),
        Ok(list) if list.is_empty() => tracing::error!(
            path = %path.display(),
            "SIGHUP: the gateway list has a problem; nothing changed: it lists no gateway (every gateway would be refused)"
        ),
        Ok(list) => {
            let count = list.len();
            let c = gateways.replace(list);
            info!(
                gateways = count,
                added = %c.added.join(","),
                removed = %c.removed.join(","),
                new_certificate = %c.recertified.join(","),
                "SIGHUP: gateway list reloaded"
            );
        }
    }
}

/// Serves until `shutdown` completes, then drains and returns. `gateways` maps certificates to gateway ids; a
/// [`SharedGatewayList`] may be replaced while the server runs ([`reload_gateways`]).
pub async fn run(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    gateways: impl Into<SharedGatewayList>,
    store: StoreHandle,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let metrics_addr = opts.metrics;
    let gateway_slots = Arc::new(Semaphore::new(opts.max_connections));
    let shared = Arc::new_cyclic(|me| Shared {
        store,
        gateways: gateways.into(),
        opts,
        unauthenticated: Mutex::new(Unauthenticated::default()),
        gateway_slots,
        sold_history: Mutex::new(status::SoldHistory::default()),
        metrics: ServerMetrics::new(me.clone()),
    });
    let stop = CancellationToken::new();
    // The background tasks below hold the store; should this future be dropped before its end (a caller's timeout
    // or select!), they must still stop, or the store's close would wait for them forever.
    let _stop_on_drop = stop.clone().drop_guard();
    if let Some(addr) = metrics_addr {
        if let Some(w) = crate::metrics::off_loopback("--metrics", addr) {
            tracing::warn!("{w}");
        }
        match TcpListener::bind(addr).await {
            Ok(l) => {
                info!(addr = ?l.local_addr().ok(), "metrics, health and readiness over HTTP");
                let source: Arc<dyn crate::metrics::Source> = Arc::new(MetricsSource(shared.clone()));
                tokio::spawn(crate::metrics::serve(l, source, stop.clone()));
                let (shared, stop) = (shared.clone(), stop.clone());
                tokio::spawn(async move {
                    loop {
                        if let Ok(Outcome::Stock(rows)) = shared.store.call(Op::Stock).await {
                            let rows: Vec<StockEntry> = rows.into_iter().map(StockEntry::from).collect();
                            let now = std::time::Instant::now();
                            shared.sold_history.lock().expect("not poisoned").record(now, &rows);
                            *shared.metrics.stock.lock().expect("not poisoned") = (rows, Some(now));
                        }
                        let now = crate::clock::unix_now();
                        let (day, minute) = (now.div_euclid(86_400), now.div_euclid(60));
                        if let Ok(Outcome::Limits(value, rate)) = shared.store.call(Op::Limits { day, minute }).await {
                            *shared.metrics.limits.lock().expect("not poisoned") = (value, rate);
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(STOCK_EVERY) => {}
                            _ = shared.metrics.refresh.notified() => {}
                        }
                    }
                });
            }
            Err(e) => warn!(%addr, error = %e, "cannot serve metrics"),
        }
    }
    // PINs past their expiry date leave stock before the first sale, then every hour: they are never sold (the
    // picks check the date too), but left `available` they would be counted as stock and stepped over by every
    // pick of their product.
    expire_pins(&shared).await;
    tokio::spawn({
        let (shared, stop) = (shared.clone(), stop.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(EXPIRE_EVERY) => expire_pins(&shared).await,
                }
            }
        }
    });
    let mut conns = JoinSet::new();
    let ids = AtomicU64::new(1);
    tokio::pin!(shutdown);
    info!(addr = ?listener.local_addr().ok(), "PIN server listening");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little instead of spinning.
                        limited!(warn, "accept failed", error = %e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let pending = Pending { shared: shared.clone(), id, closed: stop.child_token() };
                let made_room = shared.unauthenticated.lock().expect("not poisoned").admit(
                    id,
                    peer.ip(),
                    pending.closed.clone(),
                    shared.opts.max_unauthenticated,
                    shared.opts.max_unauthenticated_per_source,
                );
                for (reason, source) in made_room {
                    shared.metrics.closed(reason);
                    limited!(warn, key: reason; "unauthenticated connections at their cap; the oldest closed", reason, %source);
                }
                let span = info_span!("psp", conn = id, %peer, gateway = tracing::field::Empty);
                let (acceptor, shared, stop) = (acceptor.clone(), shared.clone(), stop.clone());
                conns.spawn(async move {
                    connection(tcp, peer, acceptor, shared, stop, pending).await;
                }.instrument(span));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    info!(
        open = conns.len(),
        "shutting down: no new connections, finishing requests in flight"
    );
    stop.cancel();
    while conns.join_next().await.is_some() {}
    info!("PIN server stopped");
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: CancellationToken,
    pending: Pending,
) {
    let _ = tcp.set_nodelay(true);
    // The TLS handshake and the hello must both be done by then.
    let deadline = tokio::time::Instant::now() + shared.opts.handshake_timeout;
    let refused = |reason: &'static str| shared.metrics.closed(reason);
    // A client that never finishes its handshake neither holds a slot for long nor delays shutdown; one closed to
    // make room was counted then.
    // (Pinned here, the socket outlives the select: a connection is counted before its peer sees it closed.)
    let accept = tokio::time::timeout_at(deadline, acceptor.accept(tcp));
    tokio::pin!(accept);
    let handshake = tokio::select! {
        r = &mut accept => r,
        _ = pending.closed.cancelled() => return,
    };
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refused("tls");
            limited!(warn, "TLS handshake refused", error = %e);
            return;
        }
        Err(_) => {
            refused("deadline");
            limited!(warn, "TLS handshake timed out");
            return;
        }
    };
    // Watched from before the look-up, so that no new list is missed: one without this certificate ends the
    // connection (a gateway revoked while connected).
    let mut list = shared.gateways.subscribe();
    let fingerprint = {
        let (_, conn) = stream.get_ref();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(crate::tls::fingerprint)
            .unwrap_or_default()
    };
    let listed = |l: &GatewayList| l.gateway_of_fingerprint(&fingerprint).map(str::to_string);
    let gateway = listed(&list.borrow_and_update());
    let Some(gateway) = gateway else {
        // The verifier already refuses such certificates; this is a second lock on the same door.
        refused("tls");
        limited!(warn, "client certificate maps to no gateway");
        return;
    };
    tracing::Span::current().record("gateway", gateway.as_str());
    // Authenticated: out of the unauthenticated pool, into a gateway slot.
    drop(pending);
    let Ok(_slot) = shared.gateway_slots.clone().try_acquire_owned() else {
        refused("gateway_cap");
        limited!(warn, "gateway connections at their cap; closed", %gateway);
        return;
    };
    shared.metrics.connections.inc();
    info!(%peer, "gateway connected");

    // Requests are read up to `max_frame`, answers written up to the protocol's answer cap.
    let codec = FrameCodec::server(shared.opts.max_frame);
    let (rd, wr) = tokio::io::split(stream);
    let mut frames = FramedRead::new(rd, codec);
    let mut sink = FramedWrite::new(wr, codec);
    // Ends this connection: shutdown, or a writer that can no longer deliver answers.
    let done = stop.child_token();
    let (out, mut rx) = mpsc::channel::<Bytes>(shared.opts.max_in_flight + 8);
    let writer = tokio::spawn({
        let done = done.clone();
        async move {
            while let Some(frame) = rx.recv().await {
                match tokio::time::timeout(WRITE_TIMEOUT, sink.send(frame)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        limited!(warn, "write failed, closing connection", error = %e);
                        done.cancel();
                        break;
                    }
                    Err(_) => {
                        limited!(warn, "gateway does not read its answers, closing connection");
                        done.cancel();
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(WRITE_TIMEOUT, SinkExt::<Bytes>::close(&mut sink)).await;
        }
        .in_current_span()
    });
    let send = move |out: &mpsc::Sender<Bytes>, frame: ResponseFrame| {
        let out = out.clone();
        async move {
            let mut body = serde_json::to_vec(&frame).expect("responses serialise");
            if let Err(e) = codec.check_outgoing(body.len()) {
                // Written, it would fail the writer, and so the connection under every answer still to come.
                limited!(error, "answer over the answer frame cap; answered internal instead", error = %e, cap = MAX_ANSWER_FRAME);
                let refusal = ResponseFrame::err(frame.id, ErrorCode::Internal, "answer too large");
                body = serde_json::to_vec(&refusal).expect("responses serialise");
            }
            let _ = out.send(Bytes::from(body)).await;
        }
    };

    let in_flight = Arc::new(Semaphore::new(shared.opts.max_in_flight));
    let mut greeted = false;
    let mut last_request = tokio::time::Instant::now();
    loop {
        let wake = if greeted {
            last_request + shared.opts.idle_timeout
        } else {
            deadline
        };
        let next = tokio::select! {
            _ = done.cancelled() => break,
            Ok(()) = list.changed() => {
                if listed(&list.borrow_and_update()).as_ref() != Some(&gateway) {
                    warn!("gateway removed from the gateway list (or now another gateway's): closing its connection");
                    break;
                }
                continue;
            }
            n = frames.next() => n,
            _ = tokio::time::sleep_until(wake) => {
                if !greeted {
                    refused("deadline");
                    limited!(warn, "no hello in time; closing the connection");
                    break;
                }
                if in_flight.available_permits() < shared.opts.max_in_flight {
                    // Still answering: not idle yet.
                    last_request = tokio::time::Instant::now();
                    continue;
                }
                info!("idle timeout");
                break;
            }
        };
        last_request = tokio::time::Instant::now();
        let body = match next {
            None => break,
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                // Oversize frame or broken stream: the frame boundary is lost, so the connection ends.
                limited!(warn, "bad frame, closing connection", error = %e);
                break;
            }
        };
        let frame = match parse_request(&body) {
            Ok(f) => f,
            Err(e) => {
                send(
                    &out,
                    ResponseFrame::err(e.request_id(), ErrorCode::BadRequest, e.to_string()),
                )
                .await;
                if !greeted {
                    // Nothing but a well-formed hello opens a session.
                    break;
                }
                continue;
            }
        };
        let id = frame.id;
        if !greeted {
            match frame.request {
                Request::Hello { version } if version == VERSION => {
                    send(&out, handler::welcome(&shared, &gateway, id).await).await;
                    greeted = true;
                }
                Request::Hello { version } => {
                    send(
                        &out,
                        ResponseFrame::err(
                            id,
                            ErrorCode::BadRequest,
                            format!("version {version} not supported; this server speaks {VERSION}"),
                        ),
                    )
                    .await;
                    break;
                }
                _ => {
                    send(
                        &out,
                        ResponseFrame::err(id, ErrorCode::BadRequest, "the first request must be hello"),
                    )
                    .await;
                    break;
                }
            }
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            send(
                &out,
                ResponseFrame::err(id, ErrorCode::Busy, "too many requests in flight on this connection"),
            )
            .await;
            continue;
        };
        let (shared, gateway, out) = (shared.clone(), gateway.clone(), out.clone());
        tokio::spawn(
            async move {
                let answer = handler::handle(&shared, &gateway, id, frame.request).await;
                send(&out, answer).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
    // Drain: every request taken is answered before the connection closes.
    let _ = in_flight.acquire_many(shared.opts.max_in_flight as u32).await;
    drop(out);
    let _ = writer.await;
    // Lingering close: the answers are sent and our side is shut; now read (and drop, untaken) whatever the
    // gateway still sends, for a moment. Closing a socket with unread bytes resets the connection, and a reset
    // destroys answers the gateway has not read yet — answers to sales that are committed.
    let linger = async { while let Some(Ok(_)) = frames.next().await {} };
    let _ = tokio::time::timeout(LINGER, linger).await;
    shared.metrics.connections.dec();
    info!("gateway disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operation_and_result_is_its_own_series() {
        // No server behind it: its stock is not shown, the counters are.
        let m = ServerMetrics::new(std::sync::Weak::new());
        // Every operation with every result, each as many times as its place in the lists: a slot given to two label
        // sets would add up two of them.
        let results: Vec<Option<ErrorCode>> = std::iter::once(None).chain(ErrorCode::ALL.map(Some)).collect();
        assert_eq!(results.len(), RESULTS, "a slot for ok and for each error code");
        for (o, op) in OPS.iter().enumerate() {
            for (r, result) in results.iter().enumerate() {
                for _ in 0..(o * results.len() + r + 1) {
                    m.count(op, *result);
                }
            }
        }
        m.count("not_an_op_yet", None);
        let text = crate::metrics::exposition(&m.registry);
        for (o, op) in OPS.iter().enumerate() {
            for (r, result) in results.iter().enumerate() {
                let result = result.map_or("ok", ErrorCode::as_str);
                let line = format!(
                    "pingate_server_requests_total{{op=\"{op}\",result=\"{result}\"}} {}",
                    o * results.len() + r + 1
                );
                assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            }
        }
        assert!(
            text.contains("pingate_server_requests_total{op=\"not_an_op_yet\",result=\"ok\"} 1"),
            "{text}"
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// At the per-source cap a new connection closes the oldest of its source (not another source's); at the pool
    /// cap, the oldest of all. Authenticated ones leave the pool and free their place.
    #[test]
    fn a_new_connection_closes_the_oldest_of_its_source_then_of_all() {
        let mut u = Unauthenticated::default();
        let tokens: Vec<CancellationToken> = (0..7).map(|_| CancellationToken::new()).collect();
        let admit =
            |u: &mut Unauthenticated, id: u64, source: &str| u.admit(id, ip(source), tokens[id as usize].clone(), 4, 2);
        assert!(admit(&mut u, 0, "10.0.0.1").is_empty());
        assert!(admit(&mut u, 1, "10.0.0.2").is_empty());
        assert!(admit(&mut u, 2, "10.0.0.2").is_empty());
        // 10.0.0.2 is at its cap: its oldest (1) goes, not 0.
        assert_eq!(admit(&mut u, 3, "10.0.0.2"), vec![("source_cap", ip("10.0.0.2"))]);
        assert!(tokens[1].is_cancelled() && !tokens[0].is_cancelled());
        assert!(admit(&mut u, 4, "10.0.0.3").is_empty());
        // The pool (4) is full: the oldest of all (0) goes.
        assert_eq!(admit(&mut u, 5, "10.0.0.4"), vec![("pool_cap", ip("10.0.0.1"))]);
        assert!(tokens[0].is_cancelled());
        assert_eq!(u.conns.keys().copied().collect::<Vec<_>>(), [2, 3, 4, 5]);
        // Authenticated (or gone): its place is free; removing one already closed changes nothing.
        u.remove(3);
        u.remove(1);
        assert_eq!(u.per_source.get(&ip("10.0.0.2")), Some(&1));
        assert!(admit(&mut u, 6, "10.0.0.2").is_empty());
        assert_eq!(u.conns.len(), 4);
        assert_eq!(u.per_source.values().sum::<usize>(), 4);
    }
}
