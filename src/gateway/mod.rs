//! The gateway (host connection manager): terminals on one side ([`terminal`]), PIN servers on the other
//! ([`upstream`]), and between them the controller (this module), the prefetch [`cache`], the [`journal`] that makes
//! every PIN the gateway holds and every unfinished sale survive a crash, and the store-and-forward queue of
//! confirms, reversals and releases. `protocols/gateway.md` says, step by step, what a crash leaves behind.

pub mod admin;
pub mod cache;
pub mod config;
mod forward;
pub mod journal;
mod metrics;
mod refill;
mod reload;
pub mod serial;
pub mod terminal;
pub mod upstream;
mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::iso8583::Message;
use crate::logging::limited;
use crate::psp::{ErrorCode, Request, Response};
use crate::sale::{
    answer, sale_answer, PinReceipt, ResponseCode, ReversalRequest, SaleKey, SaleRequest, TerminalRequest,
};
use crate::store::crypto::PinCipher;
use crate::store::SaleContent;
use cache::{Level, PinCache, Take};
use config::GatewayConfig;
use forward::{Forward, Job};
use metrics::GatewayMetrics;
pub use admin::{ask_admin, serve_admin};
pub use metrics::{MetricsSource, Stats, StockReport};
pub use reload::ReloadReport;
use journal::{CachedPin, Journal, JournalOptions, KeyRecord, Record, SaleRecord};
use upstream::{ServerHealth, Upstream, UpstreamError};
use window::{Begin, Content, Entry, Outcome, Recent};

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
}

/// An answer for the terminal, and the sale to reverse if it cannot be delivered.
#[derive(Debug)]
pub struct Reply {
    pub message: Message,
    pub reverse_if_undelivered: Option<SaleKey>,
}

impl Reply {
    fn plain(message: Message) -> Reply {
        Reply {
            message,
            reverse_if_undelivered: None,
        }
    }
}

/// The gateway's shared state. Start with [`Gateway::start`]; serve terminals with [`terminal::run`].
pub struct Gateway {
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
    /// The terminal registry, replaced whole on a reload (SIGHUP).
    terminals: std::sync::RwLock<Arc<config::TerminalRegistry>>,
    /// Products and amounts with their modes, as last loaded (a reload compares against these).
    products: Mutex<Vec<config::ProductConfig>>,
}

pub use crate::sale::rrn_of_pin;

/// The retrieval reference of a declined request: `9` and 11 digits derived from its key (the same for its repeats),
/// never an approved sale's ([`rrn_of_pin`]).
pub fn rrn_of(key: &SaleKey) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [&key.terminal_id, &key.stan, &key.transmission] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let d = ctx.finish();
    let n = u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"));
    format!("9{:011}", n % 100_000_000_000)
}

/// The response code a PIN server error means to a terminal (the one place this is decided).
pub fn code_for(e: &UpstreamError) -> ResponseCode {
    match e {
        UpstreamError::Unavailable | UpstreamError::Timeout => ResponseCode::ServerUnavailable,
        UpstreamError::Server(w) => match w.code {
            ErrorCode::OutOfStock => ResponseCode::OutOfStock,
            ErrorCode::UnknownProduct => ResponseCode::UnknownProduct,
            ErrorCode::UnknownDenomination => ResponseCode::InvalidAmount,
            ErrorCode::DuplicateMismatch => ResponseCode::DuplicateMismatch,
            ErrorCode::AlreadyReversed => ResponseCode::InvalidTransaction,
            // A repeat older than the repeat age re-delivers nothing: `12`, as for a reversed sale.
            ErrorCode::RepeatExpired => ResponseCode::InvalidTransaction,
            ErrorCode::ReversalMismatch => ResponseCode::InvalidAmount,
            ErrorCode::Busy => ResponseCode::ServerUnavailable,
            ErrorCode::NotHolder | ErrorCode::BadRequest | ErrorCode::Internal => ResponseCode::SystemError,
        },
    }
}

/// The response code for a sale the journal did not take: late (a stalled disk) is "try again", failed is a
/// system error. Beside [`code_for`]: the two places the terminal's code is decided.
fn code_for_journal(e: &journal::JournalError) -> ResponseCode {
    match e {
        journal::JournalError::Late => ResponseCode::ServerUnavailable,
        _ => ResponseCode::SystemError,
    }
}

fn receipt_of(p: &crate::psp::PinOut) -> PinReceipt {
    PinReceipt {
        pin: p.pin.clone(),
        serial: p.serial.clone(),
        expiry: p.expiry.clone(),
        lines: p.receipt.clone(),
    }
}

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
        let cache = PinCache::new(
            cfg.products.iter().map(|p| (p.code.clone(), p.amount, p.mode)),
            cfg.refill_cover,
            cfg.refill_lead,
            now,
        );
        let gw = Arc::new(Gateway {
            recent: Mutex::new(Recent::new(cfg.repeat_window, cfg.repeat_max, crate::store::unix_now())),
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
            metrics: GatewayMetrics {
                requests: Default::default(),
                latency: crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS),
                connections_closed: Default::default(),
            },
            terminals: std::sync::RwLock::new(Arc::new(cfg_terminals)),
            products: Mutex::new(cfg_products),
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
                .begin(&key, content, now, crate::store::unix_now());
            if let Begin::New(e) = begun {
                e.outcome.send_replace(Some(Arc::new(Outcome::Approved {
                    pin_id: pin.pin.pin_id,
                    receipt: receipt_of(&pin.pin),
                })));
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
        for (key, content) in recovered.reverse {
            // A sale being reversed never hands out its PIN again, even to a repeat of a sale recovered above.
            if let Some(e) = gw.recent.lock().expect("not poisoned").get(&key.key()) {
                e.overrule(ResponseCode::InvalidTransaction);
            }
            gw.enqueue(Job::Reverse { key, content });
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
        let received_unix = crate::store::unix_now();
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
        // Label values from the contract only: a terminal sending made-up MTIs must not grow the metrics.
        let label = match mti.as_str() {
            "0200" | "0201" | "0400" | "0401" | "0420" | "0421" | "0800" => mti.as_str(),
            _ => "other",
        };
        let code = if code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            code
        } else {
            "other"
        };
        self.metrics.requests.inc(&[("mti", label), ("code", code)]);
        self.metrics.latency.observe(received.elapsed());
        reply
    }

    async fn handle_request(&self, msg: &Message, received: Instant, received_unix: i64) -> Reply {
        let deadline = received + self.cfg.response_deadline;
        match TerminalRequest::parse(msg, received_unix) {
            Err(refusal) => {
                limited!(debug, "request refused", code = refusal.code.code(), reason = %refusal.reason);
                Reply::plain(answer(msg, refusal.code))
            }
            Ok(TerminalRequest::Network(_)) => {
                let terminal = msg.terminal_id().unwrap_or_default();
                let ok = self.registry().permits(terminal, msg.merchant_id(), None);
                if !ok {
                    limited!(info, "network request from an unknown terminal", terminal);
                }
                Reply::plain(answer(
                    msg,
                    if ok {
                        ResponseCode::Approved
                    } else {
                        ResponseCode::NotPermitted
                    },
                ))
            }
            Ok(TerminalRequest::Sale(s)) => self.sale(msg, s, deadline, received_unix).await,
            Ok(TerminalRequest::Reversal(r)) => Reply::plain(self.reversal(msg, r, deadline).await),
        }
    }

    fn declined(&self, msg: &Message, key: &SaleKey, code: ResponseCode) -> Reply {
        self.stats.declined.fetch_add(1, Ordering::Relaxed);
        let m = sale_answer(msg, &rrn_of(key), Err(code)).unwrap_or_else(|_| answer(msg, code));
        Reply::plain(m)
    }

    async fn reply_of(&self, msg: &Message, key: &SaleKey, outcome: &Outcome) -> Reply {
        match outcome {
            Outcome::Approved { pin_id, receipt } => {
                let auth = format!("{:06}", pin_id % 1_000_000);
                match sale_answer(msg, &rrn_of_pin(*pin_id), Ok((&auth, receipt))) {
                    Ok(m) => Reply {
                        message: m,
                        reverse_if_undelivered: Some(key.clone()),
                    },
                    Err(e) => {
                        // A receipt too long for field 63: the PIN cannot reach the terminal.
                        limited!(error, "receipt does not fit field 63; the sale is reversed", pin_id, error = %e);
                        self.undelivered(key).await;
                        self.declined(msg, key, ResponseCode::SystemError)
                    }
                }
            }
            Outcome::Declined(code) => self.declined(msg, key, *code),
        }
    }

    async fn sale(&self, msg: &Message, s: SaleRequest, deadline: Instant, received_unix: i64) -> Reply {
        let key = s.key.clone();
        if !self
            .registry()
            .permits(&key.terminal_id, Some(&s.merchant_id), Some(&s.product))
        {
            return self.declined(msg, &key, ResponseCode::NotPermitted);
        }
        let content = Content {
            merchant: s.merchant_id.clone(),
            product: s.product.clone(),
            amount: s.amount,
            currency: s.currency.clone(),
        };
        // Same key, other content: 94, whatever else is wrong with the content.
        let known = self.recent.lock().expect("not poisoned").get(&key);
        if known.is_some_and(|e| !e.matches(&content)) {
            self.stats.repeats.fetch_add(1, Ordering::Relaxed);
            return self.declined(msg, &key, ResponseCode::DuplicateMismatch);
        }
        if let Some(code) = self.check_catalog(&s) {
            return self.declined(msg, &key, code);
        }
        let (begun, horizon) = {
            let mut recent = self.recent.lock().expect("not poisoned");
            let begun = recent.begin(&key, content.clone(), Instant::now(), received_unix);
            (begun, recent.horizon)
        };
        let entry = match begun {
            Begin::Existing(e) => {
                self.stats.repeats.fetch_add(1, Ordering::Relaxed);
                if !e.matches(&content) {
                    return self.declined(msg, &key, ResponseCode::DuplicateMismatch);
                }
                let mut rx = e.outcome.subscribe();
                let waited = match tokio::time::timeout_at(deadline, rx.wait_for(|o| o.is_some())).await {
                    Ok(Ok(o)) => o.clone(),
                    _ => None,
                };
                return match waited {
                    Some(o) => {
                        if matches!(*o, Outcome::Approved { .. }) {
                            self.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
                        }
                        self.reply_of(msg, &key, &o).await
                    }
                    None => self.declined(msg, &key, ResponseCode::ServerUnavailable),
                };
            }
            Begin::New(e) => e,
        };
        if s.repeat {
            self.stats.repeats.fetch_add(1, Ordering::Relaxed);
        }
        let from_cache = self.cache_may_sell(&key, received_unix, horizon);
        let outcome = Arc::new(self.sell(&s, deadline, from_cache).await);
        if matches!(*outcome, Outcome::Declined(ResponseCode::DuplicateMismatch)) {
            // The key is another sale's (the server knows it with other content): this request's content must not
            // stand for the key here, or that sale's own repeats and reversal would be refused as mismatches.
            self.recent.lock().expect("not poisoned").forget(&key, &entry);
        }
        entry.settle(outcome.clone());
        // A reversal that came meanwhile overruled the sale: the original request is answered as the sale now
        // stands, never with a PIN being voided.
        let outcome = entry.outcome.borrow().clone().unwrap_or(outcome);
        self.reply_of(msg, &key, &outcome).await
    }

    /// Whether a sale with this key may be served from the cache (see `clock_skew_secs` in the example
    /// configuration). Every earlier cache sale had its field 7 no later than its receipt plus the skew; so a key
    /// whose time is past `horizon` (the second after which every sale begun here is still remembered: sales of that
    /// very second may be forgotten) plus the skew was never sold from the cache before unless it is remembered, and a
    /// remembered key never gets here. Any other key
    /// may have been sold (before a restart, or beyond the window): it goes to the PIN server, which knows every key.
    fn cache_may_sell(&self, key: &SaleKey, received_unix: i64, horizon: i64) -> bool {
        let skew = self.cfg.clock_skew.as_secs() as i64;
        key.transmitted_at()
            .is_some_and(|t| t <= received_unix + skew && t > horizon + skew)
    }

    /// Product, amount and currency against the server's catalog (when one was received).
    fn check_catalog(&self, s: &SaleRequest) -> Option<ResponseCode> {
        let catalog = self.upstream.catalog()?;
        let Some(p) = catalog.1.iter().find(|p| p.code == s.product) else {
            return Some(ResponseCode::UnknownProduct);
        };
        if p.currency != s.currency || !p.denominations.contains(&(s.amount as i64)) {
            return Some(ResponseCode::InvalidAmount);
        }
        None
    }

    fn sale_record(&self, s: &SaleRequest) -> SaleRecord {
        SaleRecord {
            terminal_id: s.key.terminal_id.clone(),
            merchant_id: s.merchant_id.clone(),
            stan: s.key.stan.clone(),
            transmission: s.key.transmission.clone(),
            // Assigned by the PIN sold ([`rrn_of_pin`]); the PIN server records that one.
            rrn: String::new(),
            product: s.product.clone(),
            amount: s.amount as i64,
            currency: s.currency.clone(),
        }
    }

    /// One PIN for a new sale: from the cache when `from_cache` (see [`Gateway::cache_may_sell`]), else from the
    /// server.
    async fn sell(&self, s: &SaleRequest, deadline: Instant, from_cache: bool) -> Outcome {
        let record = self.sale_record(s);
        let amount = s.amount as i64;
        // A repeat (0201) of a sale this gateway no longer remembers goes to the server, which knows every key it
        // sold or had confirmed: the original PIN comes back, never a second one; so does a key that may have been
        // sold before.
        let take = if s.repeat || !from_cache {
            if !s.repeat && self.cache.lock().expect("not poisoned").is_prefetch(&s.product, amount) {
                self.stats.unsure_keys.fetch_add(1, Ordering::Relaxed);
            }
            Take::OnDemand
        } else {
            // A PIN is sold only with a minute of its lease left (the server keeps it ours till then).
            let min_lease = crate::store::unix_now() + 60;
            self.cache
                .lock()
                .expect("not poisoned")
                .take(&s.product, amount, Instant::now(), min_lease)
        };
        match take {
            Take::Hit(pin) => {
                self.refill_wake.notify_one();
                let pin_id = pin.pin.pin_id;
                let sold = Record::CacheSold {
                    pin_id,
                    sale: record.clone(),
                };
                if let Err(e) = self.journal.append_by(vec![sold], deadline).await {
                    // Not acknowledged in time, so not handed out; but the record may be (or get) on disk. The
                    // PIN is confirmed and reversed at once (voided: accounted for, never sold twice), and the
                    // reversal is journaled behind the sale record.
                    limited!(error, "journal did not take a cache sale; the PIN is voided", error = %e, pin_id);
                    let key = KeyRecord::from(&s.key);
                    let content = Some(record.content());
                    self.journal.append_lazy(vec![Record::Reverse {
                        key: key.clone(),
                        content: content.clone(),
                    }]);
                    self.enqueue(Job::Confirm { pin_id, sale: record });
                    self.enqueue(Job::Reverse { key, content });
                    return Outcome::Declined(code_for_journal(&e));
                }
                self.stats.sales_from_cache.fetch_add(1, Ordering::Relaxed);
                let receipt = receipt_of(&pin.pin);
                let outcome = Outcome::Approved { pin_id, receipt };
                // Until the confirm is acknowledged only this gateway knows the sale: the queue holds its entry
                // (see `enqueue`) so a repeat, however late, gets this PIN and never a second one.
                self.enqueue(Job::Confirm { pin_id, sale: record });
                outcome
            }
            Take::Miss | Take::OnDemand => {
                if matches!(take, Take::Miss) {
                    self.refill_wake.notify_one();
                }
                self.sell_on_demand(s, record, deadline).await
            }
        }
    }

    async fn sell_on_demand(&self, s: &SaleRequest, record: SaleRecord, deadline: Instant) -> Outcome {
        let key = KeyRecord::from(&s.key);
        if let Err(e) = self
            .journal
            .append_by(vec![Record::Asked { sale: record.clone() }], deadline)
            .await
        {
            // Nothing was asked of the server (a late `asked` only causes a harmless remembered reversal).
            limited!(error, "journal did not take an on-demand sale; refused", error = %e);
            return Outcome::Declined(code_for_journal(&e));
        }
        // Leave time to journal the outcome and write the answer before the terminal's deadline.
        let margin = (self.cfg.response_deadline / 20).min(Duration::from_millis(500));
        let request = Request::Sell {
            product: s.product.clone(),
            amount: s.amount as i64,
            terminal: record.terminal(),
        };
        match self.upstream.call(request, deadline - margin).await {
            Ok(Response::Sold { pin }) => {
                if let Err(e) = self
                    .journal
                    .append_by(vec![Record::Resolved { key: key.clone() }], deadline)
                    .await
                {
                    limited!(error, "journal failed after a sale; the sale is reversed", error = %e);
                    self.reverse_unanswered(key, record.content());
                    return Outcome::Declined(ResponseCode::SystemError);
                }
                self.stats.sales_on_demand.fetch_add(1, Ordering::Relaxed);
                Outcome::Approved {
                    pin_id: pin.pin_id,
                    receipt: receipt_of(&pin),
                }
            }
            Ok(other) => {
                limited!(error, "PIN server answered sell with something else", answer = ?other);
                self.reverse_unanswered(key, record.content());
                Outcome::Declined(ResponseCode::SystemError)
            }
            Err(e @ UpstreamError::Server(_)) => {
                // The server refused (and no earlier attempt may have been done: the pool says so): nothing sold.
                self.journal.append_lazy(vec![Record::Resolved { key }]);
                Outcome::Declined(code_for(&e))
            }
            Err(e) => {
                // Timed out or cut off: the server may have sold. Reverse (remembered if it had not).
                limited!(warn, "sale not answered by the PIN server; reversing it", error = %e);
                self.reverse_unanswered(key, record.content());
                Outcome::Declined(code_for(&e))
            }
        }
    }

    /// The `asked` sale becomes a reversal: `reverse` is written before `resolved`, so a torn write can only keep
    /// the reversal (and the `asked` record alone means a reversal at recovery too).
    fn reverse_unanswered(&self, key: KeyRecord, content: SaleContent) {
        let content = Some(content);
        self.journal.append_lazy(vec![
            Record::Reverse {
                key: key.clone(),
                content: content.clone(),
            },
            Record::Resolved { key: key.clone() },
        ]);
        self.enqueue(Job::Reverse { key, content });
    }

    /// An approved answer could not be written to the terminal: reverse the sale (the reversal is on disk before
    /// this returns), and answer repeats with `91`.
    pub async fn undelivered(&self, key: &SaleKey) {
        self.stats.undelivered.fetch_add(1, Ordering::Relaxed);
        limited!(warn, "answer not delivered; the sale is reversed", terminal = %key.terminal_id, stan = %key.stan);
        let entry = self.recent.lock().expect("not poisoned").get(key);
        if let Some(e) = &entry {
            e.overrule(ResponseCode::ServerUnavailable);
        }
        let content = entry.and_then(|e| e.content.as_ref().map(Content::to_sale_content));
        let key = KeyRecord::from(key);
        let record = Record::Reverse {
            key: key.clone(),
            content: content.clone(),
        };
        if let Err(e) = self.journal.append(vec![record]).await {
            limited!(error, "journal failed; the reversal of an undelivered sale is in memory only", error = %e);
        }
        self.enqueue(Job::Reverse { key, content });
    }

    async fn reversal(&self, msg: &Message, r: ReversalRequest, deadline: Instant) -> Message {
        if !self
            .registry()
            .permits(&r.sale.terminal_id, Some(&r.merchant_id), Some(&r.product))
        {
            return answer(msg, ResponseCode::NotPermitted);
        }
        let named = Content {
            merchant: r.merchant_id.clone(),
            product: r.product.clone(),
            amount: r.amount,
            currency: r.currency.clone(),
        };
        let known = self.recent.lock().expect("not poisoned").get(&r.sale);
        // What a sale in progress or approved here bought; a request that was declined here (the server out of
        // reach, a mismatch) says nothing of the key's sale: the server is asked.
        let known_content = known
            .as_ref()
            .filter(|e| matches!(e.outcome.borrow().as_deref(), None | Some(Outcome::Approved { .. })))
            .and_then(|e| e.content.clone());
        if known_content.as_ref().is_some_and(|c| *c != named) {
            self.stats.reversal_mismatches.fetch_add(1, Ordering::Relaxed);
            return answer(msg, ResponseCode::InvalidAmount);
        }
        let key = KeyRecord::from(&r.sale);
        let content = Some(named.to_sale_content());
        let record = Record::Reverse {
            key: key.clone(),
            content: content.clone(),
        };
        if let Err(e) = self.journal.append_by(vec![record], deadline).await {
            // The terminal is told to repeat it; the reversal is still sent (repeats are idempotent).
            limited!(error, "journal did not record a reversal in time", error = %e);
            self.enqueue(Job::Reverse { key, content });
            return answer(msg, ResponseCode::ServerUnavailable);
        }
        if known_content.is_none() {
            // A sale this gateway does not remember (made before its start or beyond its window, or through another
            // gateway): the PIN server, which knows every sale, is asked now, so that a reversal naming another
            // product, amount, currency or merchant than its sale gets 13 and reverses nothing.
            let margin = (self.cfg.response_deadline / 20).min(Duration::from_millis(500));
            let request = Request::Reverse {
                terminal_id: key.terminal_id.clone(),
                stan: key.stan.clone(),
                transmission: key.transmission.clone(),
                content: content.clone(),
            };
            match self.upstream.call(request, deadline - margin).await {
                Ok(Response::Reversed { .. }) => {
                    self.journal.append_lazy(vec![Record::Reversed { key: key.clone() }]);
                    self.stats.reversals.fetch_add(1, Ordering::Relaxed);
                    // A late sale with this key is refused here (12) as the server would, never sold from the cache.
                    self.recent
                        .lock()
                        .expect("not poisoned")
                        .remember_reversed(&r.sale, Instant::now(), crate::store::unix_now());
                    self.overrule_reversed(&r.sale);
                    return answer(msg, ResponseCode::Approved);
                }
                Err(UpstreamError::Server(w)) if w.code == ErrorCode::ReversalMismatch => {
                    self.journal.append_lazy(vec![Record::Reversed { key }]);
                    self.stats.reversal_mismatches.fetch_add(1, Ordering::Relaxed);
                    return answer(msg, ResponseCode::InvalidAmount);
                }
                // Not answered in time, or refused otherwise: store-and-forward, as before (remembered).
                _ => {}
            }
        }
        self.stats.reversals.fetch_add(1, Ordering::Relaxed);
        self.enqueue(Job::Reverse { key, content });
        self.overrule_reversed(&r.sale);
        answer(msg, ResponseCode::Approved)
    }

    /// A terminal reversed `key`: whatever entry the sale has now (even one begun while the reversal was being
    /// written) never hands out its PIN again; a `91` given for an undelivered answer stays.
    fn overrule_reversed(&self, key: &SaleKey) {
        if let Some(e) = self.recent.lock().expect("not poisoned").get(key) {
            let approved_or_open = matches!(e.outcome.borrow().as_deref(), None | Some(Outcome::Approved { .. }));
            if approved_or_open {
                e.overrule(ResponseCode::InvalidTransaction);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stan: u32) -> SaleKey {
        SaleKey {
            terminal_id: "T1".into(),
            stan: format!("{stan:06}"),
            transmission: "1128120000".into(),
        }
    }

    #[test]
    fn rrn_is_twelve_digits_and_stable_per_key() {
        assert_eq!(rrn_of(&key(1)), rrn_of(&key(1)));
        assert_ne!(rrn_of(&key(1)), rrn_of(&key(2)));
        assert_eq!(rrn_of(&key(1)).len(), 12);
        assert!(rrn_of(&key(1)).bytes().all(|c| c.is_ascii_digit()));
        // A decline's never meets an approval's: the PIN's id.
        assert!(rrn_of(&key(1)).starts_with('9'));
        assert_eq!(rrn_of_pin(42), "000000000042");
    }
}
