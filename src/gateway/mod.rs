//! The gateway (host connection manager): terminals on one side ([`terminal`], [`serial`]), PIN servers on the other
//! ([`upstream`]), and between them the controller's rules (`controller.rs`, no I/O) carried out by
//! `transaction.rs`, the repeat window (`window.rs`), the prefetch [`cache`] kept stocked by `refill.rs`, the
//! [`journal`] that makes every PIN the gateway holds and every unfinished sale survive a crash, and the
//! store-and-forward queue of confirms, reversals and releases (`forward.rs`); besides, configuration reload
//! (`reload.rs`), metrics (`metrics.rs`) and the [`admin`] socket. This module holds the gateway's state, its start
//! (with recovery from the journal), the entry point for terminal requests, and its shutdown.
//! `protocols/gateway.md` says, step by step, what a crash leaves behind.

pub mod admin;
pub mod cache;
pub mod config;
mod controller;
mod forward;
pub mod journal;
mod limits;
mod metrics;
pub mod origin;
pub mod policy;
mod refill;
mod reload;
pub mod serial;
mod status;
pub mod terminal;
mod transaction;
pub mod upstream;
mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::crypto::PinCipher;
use crate::iso8583::{Dialect, Message};
use crate::logging::limited;
use crate::sale::{ResponseCode, SaleKey};
use crate::terminal_keys::TerminalKeys;
pub use admin::{ask_admin, serve_admin};
use cache::PinCache;
use config::GatewayConfig;
use config::MacPolicy;
pub use controller::MacStatus;
use forward::{Forward, Job};
use journal::{Journal, JournalOptions};
use metrics::GatewayMetrics;
pub use metrics::{MetricsSource, Stats, StockReport};
pub use reload::ReloadReport;
use transaction::receipt_of;
use upstream::Upstream;
use window::{Begin, Content, Outcome, Recent};

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration file is wrong.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The journal could not be opened or recovered.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// Certificates or keys for the PIN server connection could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The journal key is missing or malformed.
    #[error("journal key: {0}")]
    Keys(String),
    /// A dialect named by a listener is unknown, or `protocols/` has a bad dialect file.
    #[error(transparent)]
    Dialect(#[from] crate::iso8583::DialectError),
    /// A listening socket could not be opened.
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The admin socket could not be opened.
    #[error("admin socket {at}: {source}")]
    Admin { at: String, source: std::io::Error },
    /// The file of terminals locked for bad MACs cannot be read.
    #[error("{}: {reason} (the terminals locked for bad MACs; fix or remove it to unlock them all)", path.display())]
    Locks { path: std::path::PathBuf, reason: String },
}

/// An answer for the terminal, and the sale to reverse if it cannot be delivered.
#[derive(Debug)]
pub struct Reply {
    pub message: Message,
    pub reverse_if_undelivered: Option<SaleKey>,
    /// The terminal whose newest key MACs the answer ([`Gateway::encode_reply`]): set when the request's MAC was
    /// verified.
    pub sign_as: Option<Box<str>>,
}

impl Reply {
    fn plain(message: Message) -> Reply {
        Reply {
            message,
            reverse_if_undelivered: None,
            sign_as: None,
        }
    }
}

/// The gateway's shared state. Start with [`Gateway::start`]; serve terminals with [`terminal::run`].
pub struct Gateway {
    /// Sales per minute and value per day by terminal and merchant (`None`: no limits configured).
    limits: Option<Mutex<limits::Limits>>,
    /// Merchants' allowances from the PIN server (`None`: none configured).
    allowances: Option<Mutex<limits::Allowances>>,
    /// Merchants' sales per minute from the PIN server (`None`: not configured).
    sales_allowances: Option<Mutex<limits::SalesAllowances>>,
    cfg: GatewayConfig,
    journal: Journal,
    upstream: Upstream,
    cache: Mutex<PinCache>,
    refill_wake: Notify,
    recent: Mutex<Recent>,
    forward: Mutex<Forward>,
    forward_wake: Notify,
    pub stats: Stats,
    /// Stops refills and renewals (shutdown begins).
    stop: CancellationToken,
    /// Stops store-and-forward (shutdown ended, or the gateway is abandoned).
    halt: CancellationToken,
    /// Refills sent and not yet cached (shutdown waits for them, so that no reserved PIN is left unjournaled).
    refills: AtomicU64,
    /// Until the first reconciliation with the server: the PINs the journal says this gateway holds. Any other PIN
    /// the server has reserved to it was reserved and never journaled (a reserve cut off, a crash between the
    /// answer and the journal): it goes back. No refill runs before this is done.
    unreconciled: Mutex<Option<std::collections::HashSet<i64>>>,
    /// The serial lines' status, for the operator and for tests that wait on a line.
    lines: watch::Sender<serial::LineBoard>,
    metrics: GatewayMetrics,
    /// Connections per listener and terminals seen, for the status page.
    activity: status::Activity,
    /// The terminal registry, replaced whole on a reload (SIGHUP).
    terminals: std::sync::RwLock<Arc<config::TerminalRegistry>>,
    /// Products and amounts with their modes, as last loaded (a reload compares against these).
    products: Mutex<Vec<config::ProductConfig>>,
    /// Terminals' MAC keys, replaced whole on a reload (SIGHUP): a terminal re-keyed with `pingate terminals key
    /// rotate` is signed for with its new key from the reload on.
    terminal_keys: std::sync::RwLock<Arc<TerminalKeys>>,
    /// Bad or missing MACs per terminal, and the terminals locked after too many.
    mac_guard: Mutex<controller::MacGuard>,
    /// Checks the MAC of a request from a terminal that has no key, so that its answer takes as long as another's.
    decoy: crate::mac::MacKey,
}

pub use crate::sale::rrn_of_pin;
pub use controller::{code_for, rrn_of};

/// Options the configuration file does not carry (tests and benchmarks).
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Do not fsync the journal (only for tests of other parts; never in production).
    pub journal_no_sync: bool,
}

impl Gateway {
    /// Opens the journal and recovers from it, starts the PIN server connections and the background work
    /// (refills, lease renewals, confirms, reversals, releases).
    pub async fn start(cfg: GatewayConfig, opts: StartOptions) -> Result<Arc<Gateway>, GatewayError> {
        let spec = match &cfg.journal_keys {
            Some(s) => s.clone(),
            None => crate::keyfile::Secret::new(
                std::env::var("PINGATE_JOURNAL_KEYS")
                    .map_err(|_| GatewayError::Keys("set gateway.journal_keys_file or $PINGATE_JOURNAL_KEYS".into()))?,
            ),
        };
        let cipher = Arc::new(PinCipher::from_spec(spec.expose()).map_err(|e| GatewayError::Keys(e.to_string()))?);
        let jopts = JournalOptions {
            sync: !opts.journal_no_sync,
            group: cfg.journal_group,
            ..JournalOptions::default()
        };
        let (journal, recovered) = Journal::open(&cfg.journal, cipher, jopts)?;
        if recovered.torn_bytes > 0 {
            tracing::warn!(
                bytes = recovered.torn_bytes,
                "journal had a torn last record (kept aside)"
            );
        }
        let tls = Arc::new(crate::tls::client_config(&cfg.cert, &cfg.key, &cfg.ca)?);
        let upstream = Upstream::start(cfg.servers.clone(), tls, cfg.upstream.clone());
        let now = Instant::now();
        let (cfg_terminals, cfg_products) = (cfg.terminals.clone(), cfg.products.clone());
        let cfg_limits = cfg.policy.limits.clone();
        let cfg_allowances = cfg.policy.allowances.clone();
        let cfg_sales_allowance = cfg.policy.sales_allowance;
        let terminal_keys = cfg.terminal_keys.as_ref().map(|k| k.keys.clone()).unwrap_or_default();
        let mac_guard = controller::MacGuard::new(cfg.mac_failures, cfg.mac_failure_window)
            .with_locks(read_locks(&cfg.terminal_locks)?);
        let decoy = crate::mac::MacKey::generate(crate::mac::MacAlgorithm::RetailDes)
            .map_err(|e| GatewayError::Keys(e.to_string()))?;
        let cache = PinCache::new(
            cfg.products.iter().map(|p| (p.code.clone(), p.amount, p.mode)),
            cfg.refill_cover,
            cfg.refill_lead,
            now,
        );
        let gw = Arc::new_cyclic(|me| Gateway {
            recent: Mutex::new(Recent::new(cfg.repeat_window, cfg.repeat_max, crate::clock::unix_now())),
            cfg,
            journal,
            upstream,
            cache: Mutex::new(cache),
            refill_wake: Notify::new(),
            forward: Mutex::new(Forward::default()),
            forward_wake: Notify::new(),
            stats: Stats::default(),
            stop: CancellationToken::new(),
            halt: CancellationToken::new(),
            refills: AtomicU64::new(0),
            unreconciled: Mutex::new(None),
            lines: watch::Sender::new(serial::LineBoard::new()),
            metrics: GatewayMetrics::new(me.clone()),
            activity: Default::default(),
            terminals: std::sync::RwLock::new(Arc::new(cfg_terminals)),
            products: Mutex::new(cfg_products),
            terminal_keys: std::sync::RwLock::new(terminal_keys),
            mac_guard: Mutex::new(mac_guard),
            limits: cfg_limits.any().then(|| Mutex::new(limits::Limits::new(cfg_limits))),
            allowances: (!cfg_allowances.is_empty()).then(|| Mutex::new(limits::Allowances::new(cfg_allowances))),
            sales_allowances: cfg_sales_allowance
                .map(|(slice, margin)| Mutex::new(limits::SalesAllowances::new(slice, margin))),
            decoy,
        });
        tracing::info!(
            cached = recovered.cached.len(),
            unconfirmed = recovered.unconfirmed.len(),
            releasing = recovered.releasing.len(),
            reversals = recovered.reverse.len(),
            "journal recovered"
        );
        let known: std::collections::HashSet<i64> = recovered
            .cached
            .iter()
            .map(|c| c.pin.pin_id)
            .chain(recovered.unconfirmed.iter().map(|(c, _)| c.pin.pin_id))
            .chain(recovered.releasing.iter().copied())
            .collect();
        *gw.unreconciled.lock().expect("not poisoned") = Some(known);
        let stray = gw.cache.lock().expect("not poisoned").put(recovered.cached);
        if !stray.is_empty() {
            // Cached for a product no longer configured for prefetch: back to the server.
            let ids: Vec<i64> = stray.iter().map(|p| p.pin.pin_id).collect();
            gw.release(&ids).await?;
        }
        for (pin, sale) in recovered.unconfirmed {
            let key = sale.key();
            let content = Content {
                merchant: sale.merchant_id.clone(),
                product: sale.product.clone(),
                amount: sale.amount as u64,
                currency: sale.currency.clone(),
            };
            let begun = gw
                .recent
                .lock()
                .expect("not poisoned")
                .begin(&key, content, now, crate::clock::unix_now());
            if let Begin::New(e) = begun {
                e.set(Outcome::approved(pin.pin.pin_id, &receipt_of(&pin.pin)));
            }
            gw.enqueue(Job::Confirm {
                pin_id: pin.pin.pin_id,
                sale,
            });
        }
        for chunk in recovered.releasing.chunks(journal::RELEASE_CHUNK) {
            gw.enqueue(Job::Release {
                pin_ids: chunk.to_vec(),
            });
        }
        for (key, content, why) in recovered.reverse {
            // A sale being reversed never hands out its PIN again, even to a repeat of a sale recovered above.
            if let Some(e) = gw.recent.lock().expect("not poisoned").get(&key.key()) {
                e.overrule(ResponseCode::InvalidTransaction);
            }
            gw.enqueue(Job::Reverse { key, content, why });
        }
        tokio::spawn(gw.clone().forward_loop());
        tokio::spawn(gw.clone().refill_loop());
        tokio::spawn(gw.clone().renew_loop());
        Ok(gw)
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.cfg
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Answers one decoded terminal request. Never fails: every outcome is an answer.
    /// Answers one terminal request, in a span of its own (terminal, STAN, message type), counted and timed for
    /// the metrics.
    pub async fn handle(&self, msg: &Message, received: Instant) -> Reply {
        use tracing::Instrument;
        let mti = msg.mti().to_string();
        // The wall-clock second of receipt: field 7 is bound to its year by it.
        let received_unix = crate::clock::unix_now();
        // The RRN is known once the sale is decided (an approval's is its PIN's): recorded then, once.
        let span = tracing::info_span!(
            "transaction",
            mti = %mti,
            terminal = msg.terminal_id().unwrap_or(""),
            stan = msg.get_str(11).unwrap_or(""),
            rrn = tracing::field::Empty,
        );
        let reply = self
            .handle_request(msg, received, received_unix)
            .instrument(span.clone())
            .await;
        if let Some(rrn) = reply.message.get_str(37) {
            span.record("rrn", rrn);
        }
        let code = reply.message.get_str(39).unwrap_or("none");
        self.count_request(&mti, code, received);
        if let Some(terminal) = msg.terminal_id() {
            self.note_seen(terminal, code, received_unix);
        }
        reply
    }

    /// A request answered, for the metrics: by message type and code, and its latency.
    fn count_request(&self, mti: &str, code: &str, received: Instant) {
        // Label values from the contract only (the MTIs are, in `count`): a terminal sending made-up MTIs must not
        // grow the metrics.
        let code = if code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            code
        } else {
            "other"
        };
        self.metrics.count(mti, code);
        self.metrics.latency.observe(received.elapsed());
    }

    /// Answers one request as received on a listener or serial line whose MAC policy is `mac`. Where MACs are
    /// required, the request's MAC (`raw`: the message as received, without length header or TPDU) is checked with
    /// its terminal's keys first: a bad or missing one, or any request of a locked terminal, is answered `63` with no
    /// PIN and no MAC, counted for the terminal (locked after `mac_failures` within `mac_failure_window_secs`); the
    /// answer to a verified request is MACed by [`Gateway::encode_reply`]. An unknown terminal id gets the same `63`
    /// as a known one with a wrong MAC (an 0800 tells a stranger nothing).
    /// [`Gateway::handle_frame`] for a request from `origin`: a terminal id the connection's certificate may not
    /// speak for, or one bound to networks or callers' numbers the request did not come from, is answered `63` with
    /// no PIN (before its MAC is looked at: such a refusal counts no MAC failure).
    pub async fn handle_from(
        &self,
        dialect: &Dialect,
        raw: &[u8],
        msg: &Message,
        mac: MacPolicy,
        origin: &origin::Origin,
        received: Instant,
    ) -> Reply {
        let registry = self.terminals.read().expect("not poisoned").clone();
        match controller::check_origin(&registry, msg.terminal_id(), origin) {
            Ok(()) => self.handle_frame(dialect, raw, msg, mac, received).await,
            Err(refusal) => {
                let reason = refusal.label();
                self.metrics.refused_for_origin(reason);
                limited!(
                    info,
                    "request refused: not from where its terminal may come from (63)",
                    terminal = msg.terminal_id().unwrap_or(""),
                    reason
                );
                self.security_violation(msg, received)
            }
        }
    }

    /// The `63` answer of a refused request (no PIN, no MAC), counted.
    fn security_violation(&self, msg: &Message, received: Instant) -> Reply {
        let code = ResponseCode::SecurityViolation;
        // A sale's decline carries its RRN (derived from its key), as every other decline does.
        let message = match SaleKey::of(msg, crate::clock::unix_now()) {
            Ok(key) if msg.mti().class() == 2 => crate::sale::sale_answer(msg, &rrn_of(&key), Err(code))
                .unwrap_or_else(|_| crate::sale::answer(msg, code)),
            _ => crate::sale::answer(msg, code),
        };
        self.count_request(msg.mti().as_str(), code.code(), received);
        Reply::plain(message)
    }

    pub async fn handle_frame(
        &self,
        dialect: &Dialect,
        raw: &[u8],
        msg: &Message,
        mac: MacPolicy,
        received: Instant,
    ) -> Reply {
        if !mac.required() {
            return self.handle(msg, received).await;
        }
        match self.authenticate(dialect, raw, msg, mac) {
            Ok(terminal) => {
                let mut reply = self.handle(msg, received).await;
                reply.sign_as = Some(terminal);
                reply
            }
            Err(refusal) => {
                let reason = refusal.label();
                self.metrics.refused_for_mac(reason);
                limited!(
                    info,
                    "request refused: bad or missing MAC (63)",
                    terminal = msg.terminal_id().unwrap_or(""),
                    reason
                );
                self.security_violation(msg, received)
            }
        }
    }

    /// The MAC check of a request on a line that requires MACs: the terminal whose key verified it, or why not.
    fn authenticate(
        &self,
        dialect: &Dialect,
        raw: &[u8],
        msg: &Message,
        mac: MacPolicy,
    ) -> Result<Box<str>, controller::MacRefusal> {
        use controller::MacRefusal;
        let Some(terminal) = msg.terminal_id() else {
            return Err(MacRefusal::NoTerminal);
        };
        let keys = self.terminal_keys.read().expect("not poisoned").clone();
        let unix = crate::clock::unix_now();
        let known = keys.signing_key(terminal).is_some();
        let verdict = if !known {
            // As much work as for a terminal with a key: the answer's time does not tell which ids exist.
            let _ = crate::mac::verify_request(dialect, raw, msg, &self.decoy);
            Err(MacRefusal::NoKey)
        } else if mac.algorithm.is_some_and(|a| keys.algorithm(terminal) != Some(a)) {
            Err(MacRefusal::WrongAlgorithm)
        } else {
            keys.verify(dialect, raw, msg, terminal, unix)
                .map_err(|e| MacRefusal::of(&e))
        };
        let mut guard = self.mac_guard.lock().expect("not poisoned");
        let checked = controller::check_mac(&mut guard, terminal, known, verdict, Instant::now(), unix);
        if let Some(locks) = guard.take_changed() {
            // Written under the guard's lock: the file follows the locks in their order.
            self.save_locks(&locks);
        }
        checked.map(|_| terminal.into())
    }

    /// Writes the locked terminals down (a new file, then renamed over the old one), so that a restart keeps them
    /// locked. A failure is logged: the locks hold in memory all the same.
    fn save_locks(&self, locks: &std::collections::BTreeMap<String, i64>) {
        let path = &self.cfg.terminal_locks;
        let text = serde_json::json!({ "version": 1, "locked": locks }).to_string();
        let tmp = path.with_extension("mac-locks-new");
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot write the locked terminals down; a restart would unlock them");
        }
    }

    /// Encodes an answer with `dialect`, adding the MAC of its terminal's newest key when the request's MAC was
    /// verified ([`Reply::sign_as`]).
    pub fn encode_reply(&self, dialect: &Dialect, reply: &Reply) -> Result<bytes::Bytes, String> {
        let mut out = dialect.encode(&reply.message).map_err(|e| e.to_string())?;
        if let Some(terminal) = &reply.sign_as {
            let keys = self.terminal_keys.read().expect("not poisoned").clone();
            keys.sign(dialect, &mut out, terminal).map_err(|e| e.to_string())?;
        }
        Ok(out.freeze())
    }

    /// Unlocks a terminal locked after too many bad or missing MACs (`pingate terminals unlock`); false if it was not
    /// locked.
    pub fn unlock_terminal(&self, terminal: &str) -> bool {
        let mut guard = self.mac_guard.lock().expect("not poisoned");
        let unlocked = guard.unlock(terminal);
        if let Some(locks) = guard.take_changed() {
            self.save_locks(&locks);
        }
        drop(guard);
        if unlocked {
            tracing::info!(terminal, "terminal unlocked by the operator");
        }
        unlocked
    }

    /// Terminals with bad or missing MACs since start, and which are locked (`pingate terminals status`).
    pub fn mac_status(&self) -> Vec<MacStatus> {
        self.mac_guard.lock().expect("not poisoned").status(Instant::now())
    }

    /// The serial lines' status; the receiver also says when it changes.
    pub fn lines(&self) -> watch::Receiver<serial::LineBoard> {
        self.lines.subscribe()
    }

    pub(crate) fn set_line(&self, name: &str, f: impl FnOnce(&mut serial::LineStatus)) {
        self.lines
            .send_modify(|board| f(board.entry(name.to_string()).or_default()));
    }

    /// Waits until every queued confirm, reversal and release is acknowledged, or `timeout` passes. Returns
    /// whether the queue is empty.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                if self.forward.lock().expect("not poisoned").is_empty() {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Clean shutdown, once the terminals are drained: cached PINs go back to the server (unless configured to be
    /// kept), queued work is given `timeout` to finish, and the connections close. What is not acknowledged stays
    /// in the journal for the next start.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop.cancel();
        // A barrier with the refill loop (which counts refills under this lock), then the refills on their way:
        // their PINs are journaled and released (each is bounded by its own deadline).
        drop(self.cache.lock().expect("not poisoned"));
        while self.refills.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.cfg.keep_cache_on_shutdown {
            let pins = self.cache.lock().expect("not poisoned").drain();
            if !pins.is_empty() {
                let ids: Vec<i64> = pins.iter().map(|p| p.pin.pin_id).collect();
                if let Err(e) = self.release(&ids).await {
                    tracing::error!(error = %e, "journal failed; cached PINs kept for the next start");
                }
            }
        }
        if !self.flush(timeout).await {
            let f = self.forward.lock().expect("not poisoned");
            tracing::warn!(
                confirms = f.confirms,
                reversals = f.reversals,
                releases = f.releases,
                "shutting down with work not acknowledged; it is in the journal for the next start"
            );
        }
        // Let the last lazy acknowledgements reach the disk.
        let _ = self.journal.append(Vec::new()).await;
        self.halt.cancel();
        self.upstream.stop();
    }

    /// Stops every background task and connection at once, releasing nothing: what a crash does, minus the lost
    /// process (the journal has everything acknowledged). For tests of recovery within one process.
    pub fn abandon(&self) {
        self.stop.cancel();
        self.halt.cancel();
        self.upstream.stop();
    }
}

/// The terminals locked for bad MACs before a restart: `{"version": 1, "locked": {"TERM0001": since, …}}`; none when
/// the file is not there.
fn read_locks(path: &std::path::Path) -> Result<Vec<(String, i64)>, GatewayError> {
    let bad = |reason: String| GatewayError::Locks {
        path: path.to_path_buf(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bad(e.to_string())),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Locks {
        version: u32,
        locked: std::collections::BTreeMap<String, i64>,
    }
    let l: Locks = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if l.version != 1 {
        return Err(bad(format!("version {} (this pingate reads version 1)", l.version)));
    }
    Ok(l.locked.into_iter().collect())
}

/// Runs a gateway from its configuration until `shutdown`: every listener, the admin socket, then a clean
/// shutdown (terminals drained, cached PINs released unless kept, queued work flushed).
/// Runs the gateway of `cfg` until `shutdown`. With `reload_from`, SIGHUP reads that file again and applies what can
/// change without a restart ([`Gateway::reload`]); a file with problems changes nothing and its problems are logged.
pub async fn run(
    cfg: GatewayConfig,
    reload_from: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let dialects = match &cfg.protocols {
        Some(dir) => crate::iso8583::Dialects::load(dir)?,
        None => crate::iso8583::Dialects::builtin(),
    };
    let mut listeners = Vec::new();
    for lc in &cfg.listeners {
        let dialect = Arc::new(dialects.get(&lc.dialect)?.clone());
        let l = tokio::net::TcpListener::bind(lc.bind)
            .await
            .map_err(|source| GatewayError::Bind { addr: lc.bind, source })?;
        listeners.push((l, lc.clone(), dialect));
    }
    let mut lines = Vec::new();
    for sc in &cfg.serial {
        lines.push((sc.clone(), Arc::new(dialects.get(&sc.dialect)?.clone())));
    }
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = match cfg.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { addr, source })?,
        ),
        None => None,
    };
    let admin = match &cfg.admin {
        Some(addr) => Some(
            admin::AdminListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Admin {
                    at: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let gw = Gateway::start(cfg, StartOptions::default()).await?;
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (l, lc, dialect) in listeners {
        tracing::info!(listener = %lc.name, addr = %lc.bind, framing = ?lc.framing, dialect = %lc.dialect, "listening for terminals");
        let (gw, stop) = (gw.clone(), stop.clone());
        tasks.spawn(async move { terminal::run(l, lc, dialect, gw, stop.cancelled_owned()).await });
    }
    for (sc, dialect) in lines {
        tracing::info!(line = %sc.name, device = %sc.device.display(), baud = sc.baud, modem = sc.modem.is_some(), "serving a serial line");
        let (gw, stop) = (gw.clone(), stop.clone());
        tasks.spawn(async move { serial::run_line(sc, dialect, gw, stop).await });
    }
    if let Some(l) = admin {
        tracing::info!(at = %l.local(), "admin socket");
        let (gw, stop) = (gw.clone(), stop.clone());
        tasks.spawn(async move { serve_admin(l, gw, stop).await });
    }
    if let Some(l) = metrics {
        tracing::info!(addr = ?l.local_addr().ok(), "metrics, health and readiness over HTTP");
        let source: Arc<dyn crate::metrics::Source> = Arc::new(MetricsSource(gw.clone()));
        tasks.spawn(crate::metrics::serve(l, source, stop.clone()));
    }
    let reloads = gw.reload_on_hangup(reload_from);
    tokio::select! {
        _ = shutdown => {}
        _ = reloads => {}
    }
    tracing::info!("shutting down: draining terminals");
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    gw.shutdown(Duration::from_secs(30)).await;
    Ok(())
}
