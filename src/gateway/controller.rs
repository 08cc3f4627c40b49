//! The controller: the rules of the PIN sale contract (`protocols/pin-sale-messages.md`) for sales, repeats and
//! reversals, without I/O, in the manner of the dial-up link's core (`crate::link::dialup`). What the gateway knows
//! goes in: the request, the terminal registry, the PIN server's catalog, what the repeat window holds, and the time
//! (the monotonic instant for the window, the wall-clock second of receipt for field 7). What to do comes out: answer
//! at once with a code, wait for the key's sale, sell a new one from the cache or from the PIN server, reverse a sale
//! remembered here or ask the server. `transaction.rs` carries it out (the journal, the PIN server, the waiting) and
//! builds the answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::config::TerminalRegistry;
use super::journal;
use super::upstream::{Catalog, UpstreamError};
use super::window::{Begin, Content, Entry, Outcome, Recent};
use crate::psp::{ErrorCode, Response};
use crate::sale::{ResponseCode, ReversalRequest, SaleKey, SaleRequest};

/// A request answered at once with `code`: nothing is journaled, nothing asked of the PIN server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Decline {
    pub(super) code: ResponseCode,
    /// Counted as a repeat: the key is known here with other content (`94`).
    pub(super) repeat: bool,
}

/// What to do with a sale (0200) or a repeat (0201) once the window has seen it.
#[derive(Debug)]
pub(super) enum SaleStep {
    Decline(Decline),
    /// The key's sale is in progress or done here (a duplicate or a repeat within the window, or a late repeat of a
    /// sale whose confirm or reversal is still queued): its outcome answers this request, waited for until the
    /// deadline. Counted as a repeat.
    Wait(Arc<Entry>),
    /// A new sale, begun in the window as `entry`: a PIN from `source`.
    Sell {
        entry: Arc<Entry>,
        source: Source,
    },
}

/// Where a new sale's PIN comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The prefetch cache, when the product has one (for another product, or an empty cache, the PIN server).
    Cache,
    /// The PIN server: a repeat (0201) of a sale this gateway does not remember.
    ServerRepeat,
    /// The PIN server: a key that may have been sold before ([`cache_may_sell`]).
    ServerUnsureKey,
}

/// The checks of a sale before the window begins it: the terminal may buy this product for this merchant, the key is
/// not known here with other content, and the catalog (when one was received) has the product, currency and amount.
/// `known`: what the window holds for the key.
pub(super) fn screen_sale(
    s: &SaleRequest,
    content: &Content,
    registry: &TerminalRegistry,
    known: Option<&Entry>,
    catalog: Option<&Catalog>,
) -> Result<(), Decline> {
    let decline = |code| Err(Decline { code, repeat: false });
    if !registry.permits(&s.key.terminal_id, Some(&s.merchant_id), Some(&s.product)) {
        return decline(ResponseCode::NotPermitted);
    }
    // Same key, other content: 94, whatever else is wrong with the content.
    if known.is_some_and(|e| !e.matches(content)) {
        return Err(Decline {
            code: ResponseCode::DuplicateMismatch,
            repeat: true,
        });
    }
    if let Some(code) = check_catalog(catalog, s) {
        return decline(code);
    }
    Ok(())
}

/// Begins a sale that passed [`screen_sale`] in the window, at `now` (received at `received_unix`, seconds since the
/// epoch): the key's sale if the window has one, else a new sale and where its PIN comes from.
pub(super) fn begin_sale(
    window: &mut Recent,
    s: &SaleRequest,
    content: &Content,
    now: Instant,
    received_unix: i64,
    clock_skew: Duration,
) -> SaleStep {
    match window.begin(&s.key, content.clone(), now, received_unix) {
        // Begun by another request since the screening, with other content.
        Begin::Existing(e) if !e.matches(content) => SaleStep::Decline(Decline {
            code: ResponseCode::DuplicateMismatch,
            repeat: true,
        }),
        Begin::Existing(e) => SaleStep::Wait(e),
        Begin::New(entry) => {
            // A repeat (0201) of a sale this gateway no longer remembers goes to the server, which knows every key it
            // sold or had confirmed: the original PIN comes back, never a second one; so does a key that may have
            // been sold before. The horizon is read after the window began this sale (which may have moved it).
            let source = if s.repeat {
                Source::ServerRepeat
            } else if cache_may_sell(&s.key, received_unix, window.horizon, clock_skew) {
                Source::Cache
            } else {
                Source::ServerUnsureKey
            };
            SaleStep::Sell { entry, source }
        }
    }
}

/// Whether a sale with this key may be served from the cache (see `clock_skew_secs` in the example
/// configuration). Every earlier cache sale had its field 7 no later than its receipt plus the skew; so a key
/// whose time is past `horizon` (the second after which every sale begun here is still remembered: sales of that
/// very second may be forgotten) plus the skew was never sold from the cache before unless it is remembered, and a
/// remembered key never gets here. Any other key
/// may have been sold (before a restart, or beyond the window): it goes to the PIN server, which knows every key.
pub(super) fn cache_may_sell(key: &SaleKey, received_unix: i64, horizon: i64, clock_skew: Duration) -> bool {
    let skew = clock_skew.as_secs() as i64;
    key.transmitted_at()
        .is_some_and(|t| t <= received_unix + skew && t > horizon + skew)
}

/// Product, amount and currency against the server's catalog (when one was received).
pub(super) fn check_catalog(catalog: Option<&Catalog>, s: &SaleRequest) -> Option<ResponseCode> {
    let catalog = catalog?;
    let Some(p) = catalog.1.iter().find(|p| p.code == s.product) else {
        return Some(ResponseCode::UnknownProduct);
    };
    if p.currency != s.currency || !p.denominations.contains(&(s.amount as i64)) {
        return Some(ResponseCode::InvalidAmount);
    }
    None
}

/// What to do with a reversal (0400, 0420 and their repeats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReversalStep {
    /// Answered at once, nothing reversed: a terminal not permitted, or (`mismatch`, counted) a reversal naming
    /// another product, amount, currency or merchant than the sale remembered here (`13`).
    Refuse { code: ResponseCode, mismatch: bool },
    /// The sale is in progress or approved here, with the content named: journaled, queued for the PIN server, and
    /// approved.
    Reverse,
    /// The window has no sale of the key, or one that was declined here: journaled, then the PIN server is asked.
    AskServer,
}

/// A reversal naming `named`, given what the window holds for the key (`known`), received at `received_unix`
/// (seconds since the epoch); `window`: the reversal window (`reversal_window_secs`; `None`: no window).
pub(super) fn decide_reversal(
    r: &ReversalRequest,
    named: &Content,
    registry: &TerminalRegistry,
    known: Option<&Entry>,
    received_unix: i64,
    window: Option<Duration>,
) -> ReversalStep {
    if !registry.permits(&r.sale.terminal_id, Some(&r.merchant_id), Some(&r.product)) {
        return ReversalStep::Refuse {
            code: ResponseCode::NotPermitted,
            mismatch: false,
        };
    }
    // What a sale in progress or approved here bought; a request that was declined here (the server out of
    // reach, a mismatch) says nothing of the key's sale: the server is asked.
    let known = known.filter(|e| matches!(e.outcome().as_deref(), None | Some(Outcome::Approved { .. })));
    match known.and_then(|e| e.content.as_deref().map(|c| (e, c))) {
        Some((_, c)) if c != named => ReversalStep::Refuse {
            code: ResponseCode::InvalidAmount,
            mismatch: true,
        },
        // A sale received here longer ago than the window: `21`, the sale stands. (One this gateway does not
        // remember is judged by the PIN server, which knows when every sale was made.)
        Some((e, _)) if window.is_some_and(|w| reversal_too_late(e.begun_unix, received_unix, w)) => {
            ReversalStep::Refuse {
                code: ResponseCode::NoActionTaken,
                mismatch: false,
            }
        }
        Some(_) => ReversalStep::Reverse,
        // A sale this gateway does not remember (made before its start or beyond its window, or through another
        // gateway): the PIN server, which knows every sale, is asked now, so that a reversal naming another
        // product, amount, currency or merchant than its sale gets 13 and reverses nothing.
        None => ReversalStep::AskServer,
    }
}

/// Whether a terminal's reversal received at `received_unix` of a sale made at `sold_unix` (0: not known) comes
/// after the reversal window. The PIN server applies the same rule (`store::reversal_too_late`).
pub(super) fn reversal_too_late(sold_unix: i64, received_unix: i64, window: Duration) -> bool {
    sold_unix > 0 && received_unix.saturating_sub(sold_unix) > window.as_secs() as i64
}

/// What the PIN server's answer to a reversal asked of it at once ([`ReversalStep::AskServer`]) comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ServerReversal {
    /// Reversed: approved, and a late sale with the key is refused here (`12`) as the server would, never sold from
    /// the cache.
    Reversed,
    /// It named another sale's content: `13`, nothing reversed.
    Mismatch,
    /// After the server's reversal window: `21`, nothing reversed, the PIN stays sold.
    TooLate,
    /// Not answered in time, or refused otherwise: store-and-forward, as for a sale remembered here.
    Forward,
}

pub(super) fn server_reversal(answer: &Result<Response, UpstreamError>) -> ServerReversal {
    match answer {
        Ok(Response::Reversed { .. }) => ServerReversal::Reversed,
        Err(UpstreamError::Server(w)) if w.code == ErrorCode::ReversalMismatch => ServerReversal::Mismatch,
        Err(UpstreamError::Server(w)) if w.code == ErrorCode::ReversalTooLate => ServerReversal::TooLate,
        _ => ServerReversal::Forward,
    }
}

/// A network message (sign-on, echo, sign-off): approved for a terminal of the registry (and of its merchant, when
/// the message names one).
pub(super) fn network_answer(registry: &TerminalRegistry, terminal: &str, merchant: Option<&str>) -> ResponseCode {
    if registry.permits(terminal, merchant, None) {
        ResponseCode::Approved
    } else {
        ResponseCode::NotPermitted
    }
}

/// The retrieval reference of a declined request: `9` and 11 digits derived from its key (the same for its repeats),
/// never an approved sale's ([`rrn_of_pin`](crate::sale::rrn_of_pin)).
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
            ErrorCode::ReversalTooLate => ResponseCode::NoActionTaken,
            ErrorCode::Busy => ResponseCode::ServerUnavailable,
            ErrorCode::NotHolder | ErrorCode::BadRequest | ErrorCode::Internal => ResponseCode::SystemError,
        },
    }
}

/// The response code for a sale the journal did not take: late (a stalled disk) is "try again", failed is a
/// system error. Beside [`code_for`]: the two places the terminal's code is decided.
pub(super) fn code_for_journal(e: &journal::JournalError) -> ResponseCode {
    match e {
        journal::JournalError::Late => ResponseCode::ServerUnavailable,
        _ => ResponseCode::SystemError,
    }
}

// ---- MACs ------------------------------------------------------------------------------------------------------

/// Why a request on a line that requires MACs is refused (`63`, no PIN). The label goes to the metrics and the log;
/// none names a key or a MAC byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MacRefusal {
    /// No field 41: no terminal whose key could check it.
    NoTerminal,
    /// The terminal has no MAC key (or none still valid); a stranger's made-up terminal id gets the same answer.
    NoKey,
    /// No MAC field, or one of the wrong length or not at the end of the message.
    Missing,
    /// The MAC does not match under any of the terminal's valid keys.
    Mismatch,
    /// The terminal's key is not of the algorithm of the listener's or line's terminal group.
    WrongAlgorithm,
    /// The dialect cannot carry a MAC.
    Unsupported,
    /// The terminal is locked after too many failures, until an operator unlocks it.
    Locked,
}

impl MacRefusal {
    pub(super) fn label(self) -> &'static str {
        match self {
            MacRefusal::NoTerminal => "no_terminal",
            MacRefusal::NoKey => "no_key",
            MacRefusal::Missing => "missing",
            MacRefusal::Mismatch => "mismatch",
            MacRefusal::WrongAlgorithm => "wrong_algorithm",
            MacRefusal::Unsupported => "unsupported",
            MacRefusal::Locked => "locked",
        }
    }

    /// What a MAC check's error means here.
    pub(super) fn of(e: &crate::mac::MacError) -> MacRefusal {
        use crate::mac::MacError as E;
        match e {
            E::Missing { .. } | E::WrongLength { .. } | E::Misplaced { .. } | E::Malformed { .. } => {
                MacRefusal::Missing
            }
            E::Mismatch => MacRefusal::Mismatch,
            E::NoKey => MacRefusal::NoKey,
            E::Dialect { .. } | E::Encode(_) => MacRefusal::Unsupported,
        }
    }
}

/// One terminal's MAC failures, for the operator (`pingate terminals status`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MacStatus {
    pub terminal: String,
    /// Failures since the gateway started.
    pub failures: u64,
    /// Failures within the current window.
    pub recent: usize,
    /// Since when (seconds since the epoch) it is locked, if it is.
    pub locked_since: Option<i64>,
}

/// Bad or missing MACs counted per terminal within a sliding window, and the terminals locked after too many of them,
/// until an operator unlocks them. Only terminals that have a key are counted: terminal ids a stranger makes up take
/// no memory here.
#[derive(Debug)]
pub(super) struct MacGuard {
    limit: u32,
    window: Duration,
    /// The instants of each terminal's recent failures (at most `limit`).
    recent: HashMap<Box<str>, VecDeque<Instant>>,
    total: HashMap<Box<str>, u64>,
    locked: BTreeMap<Box<str>, i64>,
    /// The locks changed since [`MacGuard::take_changed`] last said so (they are to be written down).
    changed: bool,
}

impl MacGuard {
    pub(super) fn new(limit: u32, window: Duration) -> MacGuard {
        MacGuard {
            limit: limit.max(1),
            window,
            recent: HashMap::new(),
            total: HashMap::new(),
            locked: BTreeMap::new(),
            changed: false,
        }
    }

    /// Starts with the terminals locked before a restart (terminal id, since when).
    pub(super) fn with_locks(mut self, locked: impl IntoIterator<Item = (String, i64)>) -> MacGuard {
        self.locked = locked
            .into_iter()
            .map(|(t, since)| (t.into_boxed_str(), since))
            .collect();
        self
    }

    /// The locks, when they changed since the last call: what is to be kept across a restart.
    pub(super) fn take_changed(&mut self) -> Option<BTreeMap<String, i64>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(self.locked.iter().map(|(t, s)| (t.to_string(), *s)).collect())
    }

    pub(super) fn is_locked(&self, terminal: &str) -> bool {
        self.locked.contains_key(terminal)
    }

    /// Counts a failure of `terminal` at `now` (`unix`: the same, in seconds since the epoch); true when it locks the
    /// terminal.
    pub(super) fn failed(&mut self, terminal: &str, now: Instant, unix: i64) -> bool {
        *self.total.entry(terminal.into()).or_default() += 1;
        let recent = self.recent.entry(terminal.into()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        while recent.len() > self.limit as usize {
            recent.pop_front();
        }
        if recent.len() >= self.limit as usize && !self.locked.contains_key(terminal) {
            self.locked.insert(terminal.into(), unix);
            self.changed = true;
            return true;
        }
        false
    }

    /// Unlocks `terminal` and forgets its recent failures; false if it was not locked.
    pub(super) fn unlock(&mut self, terminal: &str) -> bool {
        self.recent.remove(terminal);
        let was = self.locked.remove(terminal).is_some();
        self.changed |= was;
        was
    }

    /// Every terminal with a failure since start, by id.
    pub(super) fn status(&self, now: Instant) -> Vec<MacStatus> {
        // Locked before a restart and quiet since: listed too.
        let locked_only = self
            .locked
            .keys()
            .filter(|t| !self.total.contains_key(*t))
            .map(|t| (t, &0u64));
        let mut out: Vec<MacStatus> = self
            .total
            .iter()
            .chain(locked_only)
            .map(|(t, n)| MacStatus {
                terminal: t.to_string(),
                failures: *n,
                recent: self.recent.get(t).map_or(0, |r| {
                    r.iter()
                        .filter(|i| now.saturating_duration_since(**i) < self.window)
                        .count()
                }),
                locked_since: self.locked.get(t).copied(),
            })
            .collect();
        out.sort_by(|a, b| a.terminal.cmp(&b.terminal));
        out
    }
}

/// The MAC check of a request on a line that requires MACs, once its MAC was checked (`verdict`: the key id that
/// matched, or why not): a locked terminal is refused whatever its MAC, and a failure of a terminal that has a key
/// (`known`) is counted, locking it at the limit. The verdict is computed before the lock is looked at, so that the
/// time of an answer does not tell a lock.
pub(super) fn check_mac(
    guard: &mut MacGuard,
    terminal: &str,
    known: bool,
    verdict: Result<u32, MacRefusal>,
    now: Instant,
    unix: i64,
) -> Result<u32, MacRefusal> {
    if guard.is_locked(terminal) {
        return Err(MacRefusal::Locked);
    }
    match verdict {
        Ok(key_id) => Ok(key_id),
        Err(r) => {
            if known && guard.failed(terminal, now, unix) {
                tracing::warn!(
                    terminal,
                    limit = guard.limit,
                    "terminal locked after too many bad or missing MACs"
                );
            }
            Err(r)
        }
    }
}

// ---- Origins: certificates, source networks, callers' numbers (issue 20, §2 and §3) ------------------------------

/// Why a request is refused for where it came from (`63`, no PIN). The label goes to the metrics and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OriginRefusal {
    /// A connection with a client certificate sent a request without field 41.
    NoTerminal,
    /// The connection's client certificate may not speak for this terminal id (neither its own nor on its NAC's list).
    CertNotFor,
    /// The terminal is bound to source networks (`allow`) and the peer's address is in none of them.
    SourceNotAllowed,
    /// The terminal is bound to callers' numbers (`caller_ids`) and the call came from another number, or from none
    /// the modem reported.
    CallerNotAllowed,
}

impl OriginRefusal {
    pub(super) fn label(self) -> &'static str {
        match self {
            OriginRefusal::NoTerminal => "no_terminal",
            OriginRefusal::CertNotFor => "certificate",
            OriginRefusal::SourceNotAllowed => "source",
            OriginRefusal::CallerNotAllowed => "caller_id",
        }
    }
}

/// Whether a request naming `terminal` (field 41) may come from `origin`. A client certificate speaks for its own
/// terminal id, or for the list of its NAC; a terminal bound to source networks and/or callers' numbers must come
/// from one of them (a terminal with both may come either way; a terminal with only `caller_ids` cannot come over
/// TCP, nor one with only `allow` over a phone line). Checked before the MAC, and for every message class.
pub(super) fn check_origin(
    registry: &TerminalRegistry,
    terminal: Option<&str>,
    origin: &super::origin::Origin,
) -> Result<(), OriginRefusal> {
    let Some(terminal) = terminal else {
        return match origin.cert {
            Some(_) => Err(OriginRefusal::NoTerminal),
            None => Ok(()),
        };
    };
    let origins = &registry.origins;
    if let Some(names) = &origin.cert {
        if !origins.cert_speaks_for(names, terminal) {
            return Err(OriginRefusal::CertNotFor);
        }
    }
    let Some(b) = origins.bindings.get(terminal).filter(|b| !b.is_empty()) else {
        return Ok(());
    };
    let by_addr = !b.allow.is_empty() && origin.addr.is_some_and(|a| super::origin::allowed(&b.allow, a));
    let by_call = !b.caller_ids.is_empty()
        && origin
            .caller_id
            .as_deref()
            .is_some_and(|n| b.caller_ids.iter().any(|c| c == n));
    match (by_addr || by_call, origin.addr) {
        (true, _) => Ok(()),
        (false, Some(_)) => Err(OriginRefusal::SourceNotAllowed),
        (false, None) => Err(OriginRefusal::CallerNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psp::{CatalogEntry, WireError};
    use crate::sale::rrn_of_pin;

    /// 2025-12-01 12:00:00 UTC: when the requests of these tests are received.
    const NOW: i64 = 1_764_590_400;
    const SKEW: Duration = Duration::from_secs(300);
    const PRODUCT: &str = "TOPUP-EU-10";

    fn key(stan: u32) -> SaleKey {
        SaleKey {
            terminal_id: "T1".into(),
            stan: format!("{stan:06}"),
            transmission: "1128120000".into(),
        }
    }

    /// Field 7 bound to its year (`YYYYMMDDhhmmss`) for `unix`.
    fn transmission(unix: i64) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
        format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }

    /// A 0200 (or with `repeat`, a 0201) of terminal T1 of merchant M1 whose field 7 says `transmitted`.
    fn sale(stan: u32, transmitted: i64, repeat: bool) -> SaleRequest {
        SaleRequest {
            key: SaleKey {
                terminal_id: "T1".into(),
                stan: format!("{stan:06}"),
                transmission: transmission(transmitted),
            },
            merchant_id: "M1".into(),
            product: PRODUCT.into(),
            amount: 1000,
            currency: "978".into(),
            repeat,
        }
    }

    fn content_of(s: &SaleRequest) -> Content {
        Content {
            merchant: s.merchant_id.clone(),
            product: s.product.clone(),
            amount: s.amount,
            currency: s.currency.clone(),
        }
    }

    fn reversal_of(s: &SaleRequest) -> ReversalRequest {
        ReversalRequest {
            sale: s.key.clone(),
            merchant_id: s.merchant_id.clone(),
            product: s.product.clone(),
            amount: s.amount,
            currency: s.currency.clone(),
            advice: false,
        }
    }

    fn registry() -> TerminalRegistry {
        let mut r = TerminalRegistry::default();
        r.add("T1", "M1", Some(&[PRODUCT]));
        r
    }

    fn catalog() -> Catalog {
        let entry = CatalogEntry {
            code: PRODUCT.into(),
            name: "Top-up 10".into(),
            supplier: "Telco".into(),
            currency: "978".into(),
            denominations: vec![1000, 2000],
        };
        ("v1".into(), vec![entry])
    }

    /// A window of 900 s, begun (the gateway started) at the wall-clock second `horizon`.
    fn window(horizon: i64) -> Recent {
        Recent::new(Duration::from_secs(900), 1000, horizon)
    }

    fn approved() -> Arc<Outcome> {
        Arc::new(Outcome::approved(
            42,
            &crate::sale::PinReceipt {
                pin: crate::sale::Pin::new("1234567890123456"),
                serial: "S42".into(),
                expiry: None,
                lines: Vec::new(),
            },
        ))
    }

    fn outcome_of(e: &Entry) -> Option<ResponseCode> {
        match e.outcome().as_deref() {
            None => None,
            Some(Outcome::Approved { .. }) => Some(ResponseCode::Approved),
            Some(Outcome::Declined(code)) => Some(*code),
        }
    }

    #[test]
    fn the_cache_sells_only_keys_past_the_horizon_and_not_ahead_of_the_clock() {
        let horizon = NOW - 3600;
        let may = |t: i64, skew: Duration| cache_may_sell(&sale(1, t, false).key, NOW, horizon, skew);
        assert!(may(NOW, SKEW));
        // Field 7 ahead of the gateway's clock: within the skew, still new; beyond it, maybe an old key of a
        // terminal with a wrong clock.
        assert!(may(NOW + 300, SKEW));
        assert!(!may(NOW + 301, SKEW));
        // At the horizon plus the skew, a cache sale before the horizon (field 7 up to the skew ahead) may have
        // had it; one second later, none can.
        assert!(!may(horizon + 300, SKEW));
        assert!(may(horizon + 301, SKEW));
        assert!(!may(NOW - 86_400, SKEW));
        // Without skew, the horizon's own second is unsure (sales of that second may be forgotten).
        assert!(!may(horizon, Duration::ZERO));
        assert!(may(horizon + 1, Duration::ZERO));
        assert!(!may(NOW + 1, Duration::ZERO));
        // A transmission time that is not a date-time of a year is never the cache's.
        assert!(!cache_may_sell(&key(1), NOW, horizon, SKEW));
    }

    #[test]
    fn a_new_sale_goes_to_the_cache_only_when_its_key_cannot_have_been_sold() {
        let mut w = window(NOW - 3600);
        let t = Instant::now();
        let fresh = sale(1, NOW, false);
        let step = begin_sale(&mut w, &fresh, &content_of(&fresh), t, NOW, SKEW);
        assert!(
            matches!(
                step,
                SaleStep::Sell {
                    source: Source::Cache,
                    ..
                }
            ),
            "{step:?}"
        );
        // A key from before the gateway started (plus the skew), or too far ahead: the PIN server decides.
        for transmitted in [NOW - 3600 + 300, NOW - 2 * 86_400, NOW + 301] {
            let s = sale(2, transmitted, false);
            let step = begin_sale(&mut w, &s, &content_of(&s), t, NOW, SKEW);
            assert!(
                matches!(
                    step,
                    SaleStep::Sell {
                        source: Source::ServerUnsureKey,
                        ..
                    }
                ),
                "{transmitted}: {step:?}"
            );
            w.forget(&s.key, &w.get(&s.key).unwrap());
        }
    }

    #[test]
    fn a_repeat_of_a_key_not_remembered_goes_to_the_server() {
        let mut w = window(NOW - 3600);
        // Even a key the cache could sell: a 0201 names a sale that may have been made, and the server knows it.
        let s = sale(1, NOW, true);
        assert!(cache_may_sell(&s.key, NOW, NOW - 3600, SKEW));
        let step = begin_sale(&mut w, &s, &content_of(&s), Instant::now(), NOW, SKEW);
        assert!(
            matches!(
                step,
                SaleStep::Sell {
                    source: Source::ServerRepeat,
                    ..
                }
            ),
            "{step:?}"
        );
    }

    #[test]
    fn the_horizon_is_read_after_the_window_forgets_what_it_must() {
        let mut w = window(NOW - 3600);
        let t0 = Instant::now();
        let first = sale(1, NOW, false);
        let SaleStep::Sell { entry, .. } = begin_sale(&mut w, &first, &content_of(&first), t0, NOW, Duration::ZERO)
        else {
            panic!("a new sale")
        };
        entry.settle(approved());
        // 901 s later the first sale leaves the window: another key of its second may have been sold with it
        // forgotten, so it is not the cache's; a key of the next second is.
        let later = t0 + Duration::from_secs(901);
        let same_second = sale(2, NOW, false);
        let step = begin_sale(
            &mut w,
            &same_second,
            &content_of(&same_second),
            later,
            NOW + 901,
            Duration::ZERO,
        );
        assert!(
            matches!(
                step,
                SaleStep::Sell {
                    source: Source::ServerUnsureKey,
                    ..
                }
            ),
            "{step:?}"
        );
        assert_eq!(w.horizon, NOW);
        assert!(w.get(&first.key).is_none());
        let next_second = sale(3, NOW + 1, false);
        let step = begin_sale(
            &mut w,
            &next_second,
            &content_of(&next_second),
            later,
            NOW + 901,
            Duration::ZERO,
        );
        assert!(
            matches!(
                step,
                SaleStep::Sell {
                    source: Source::Cache,
                    ..
                }
            ),
            "{step:?}"
        );
    }

    #[test]
    fn same_key_other_content_is_94_whatever_else_is_wrong_with_it() {
        let (reg, cat) = (registry(), catalog());
        let mut w = window(NOW - 3600);
        let s = sale(1, NOW, false);
        let step = begin_sale(&mut w, &s, &content_of(&s), Instant::now(), NOW, SKEW);
        assert!(matches!(step, SaleStep::Sell { .. }));
        // The same key for another amount, one the catalog does not even have.
        let mut other = s.clone();
        other.amount = 1500;
        let known = w.get(&other.key);
        let screened = screen_sale(&other, &content_of(&other), &reg, known.as_deref(), Some(&cat));
        let dup = Decline {
            code: ResponseCode::DuplicateMismatch,
            repeat: true,
        };
        assert_eq!(screened, Err(dup));
        // The same content passes the screening (and then waits for the sale).
        let known = w.get(&s.key);
        assert_eq!(
            screen_sale(&s, &content_of(&s), &reg, known.as_deref(), Some(&cat)),
            Ok(())
        );
        // Begun by another request after the screening, with other content: 94 too.
        let step = begin_sale(&mut w, &other, &content_of(&other), Instant::now(), NOW, SKEW);
        assert!(matches!(step, SaleStep::Decline(d) if d == dup), "{step:?}");
        // A terminal not permitted is told so before anything about the key.
        let mut stranger = other.clone();
        stranger.merchant_id = "M2".into();
        let known = w.get(&stranger.key);
        assert_eq!(
            screen_sale(&stranger, &content_of(&stranger), &reg, known.as_deref(), Some(&cat)),
            Err(Decline {
                code: ResponseCode::NotPermitted,
                repeat: false
            })
        );
    }

    #[test]
    fn a_duplicate_waits_for_its_sale_and_a_repeat_of_a_reversed_sale_gets_12() {
        let mut w = window(NOW - 3600);
        let t = Instant::now();
        let s = sale(1, NOW, false);
        let SaleStep::Sell { entry, .. } = begin_sale(&mut w, &s, &content_of(&s), t, NOW, SKEW) else {
            panic!("a new sale")
        };
        // A duplicate 0200 while the sale is in progress waits for it.
        let SaleStep::Wait(e) = begin_sale(&mut w, &s, &content_of(&s), t, NOW, SKEW) else {
            panic!("waits")
        };
        assert!(Arc::ptr_eq(&e, &entry));
        assert_eq!(outcome_of(&e), None);
        entry.settle(approved());
        // The terminal reverses the sale: its entry is overruled (the reversal's own step), and a 0201 afterwards
        // gets the entry's answer, 12, never the PIN.
        let rev = reversal_of(&s);
        let known = w.get(&s.key);
        assert_eq!(
            decide_reversal(&rev, &content_of(&s), &registry(), known.as_deref(), NOW, None),
            ReversalStep::Reverse
        );
        entry.overrule(ResponseCode::InvalidTransaction);
        let mut repeat = s.clone();
        repeat.repeat = true;
        let SaleStep::Wait(e) = begin_sale(&mut w, &repeat, &content_of(&repeat), t, NOW + 5, SKEW) else {
            panic!("the repeat is answered from the window")
        };
        assert_eq!(outcome_of(&e), Some(ResponseCode::InvalidTransaction));
        // A sale the server reversed before this gateway saw it: a late 0200 with its key, whatever it buys, gets
        // 12 from the window.
        let late = sale(7, NOW, false);
        w.remember_reversed(&late.key, t, NOW);
        let mut other = late.clone();
        other.amount = 2000;
        let known = w.get(&other.key);
        assert_eq!(
            screen_sale(&other, &content_of(&other), &registry(), known.as_deref(), None),
            Ok(())
        );
        let SaleStep::Wait(e) = begin_sale(&mut w, &other, &content_of(&other), t, NOW, SKEW) else {
            panic!("the late sale is answered from the window")
        };
        assert_eq!(outcome_of(&e), Some(ResponseCode::InvalidTransaction));
    }

    #[test]
    fn the_catalog_checks_product_currency_and_amount() {
        let cat = catalog();
        let s = sale(1, NOW, false);
        assert_eq!(check_catalog(Some(&cat), &s), None);
        // No catalog received yet: the PIN server judges.
        assert_eq!(check_catalog(None, &s), None);
        let mut unknown = s.clone();
        unknown.product = "GIFT-25".into();
        assert_eq!(check_catalog(Some(&cat), &unknown), Some(ResponseCode::UnknownProduct));
        let mut currency = s.clone();
        currency.currency = "840".into();
        assert_eq!(check_catalog(Some(&cat), &currency), Some(ResponseCode::InvalidAmount));
        let mut amount = s.clone();
        amount.amount = 1500;
        assert_eq!(check_catalog(Some(&cat), &amount), Some(ResponseCode::InvalidAmount));
        // Through the screening, after the registry: a terminal allowed every product still meets the catalog.
        let mut reg = TerminalRegistry::default();
        reg.add("T1", "M1", None);
        assert_eq!(
            screen_sale(&unknown, &content_of(&unknown), &reg, None, Some(&cat)),
            Err(Decline {
                code: ResponseCode::UnknownProduct,
                repeat: false
            })
        );
        assert_eq!(
            screen_sale(&unknown, &content_of(&unknown), &registry(), None, Some(&cat)),
            Err(Decline {
                code: ResponseCode::NotPermitted,
                repeat: false
            })
        );
    }

    #[test]
    fn a_reversal_is_done_here_only_for_a_sale_in_progress_or_approved_here() {
        let reg = registry();
        let mut w = window(NOW - 3600);
        let s = sale(1, NOW, false);
        let rev = reversal_of(&s);
        // Never seen here: the PIN server is asked.
        assert_eq!(
            decide_reversal(&rev, &content_of(&s), &reg, None, NOW, None),
            ReversalStep::AskServer
        );
        let SaleStep::Sell { entry, .. } = begin_sale(&mut w, &s, &content_of(&s), Instant::now(), NOW, SKEW) else {
            panic!("a new sale")
        };
        // In progress, then approved: reversed here; naming another amount: 13, counted.
        let mut other = content_of(&s);
        other.amount = 2000;
        let mismatch = ReversalStep::Refuse {
            code: ResponseCode::InvalidAmount,
            mismatch: true,
        };
        for _ in 0..2 {
            assert_eq!(
                decide_reversal(&rev, &content_of(&s), &reg, Some(&entry), NOW, None),
                ReversalStep::Reverse
            );
            assert_eq!(decide_reversal(&rev, &other, &reg, Some(&entry), NOW, None), mismatch);
            entry.settle(approved());
        }
        // Declined here (the server out of reach): that says nothing of the key's sale; the server is asked.
        let declined = Entry::new(
            Some(Arc::new(content_of(&s))),
            Some(Outcome::Declined(ResponseCode::ServerUnavailable)),
        );
        assert_eq!(
            decide_reversal(&rev, &other, &reg, Some(&declined), NOW, None),
            ReversalStep::AskServer
        );
        // A terminal not permitted is refused before anything is looked at.
        let mut stranger = rev.clone();
        stranger.sale.terminal_id = "T9".into();
        assert_eq!(
            decide_reversal(&stranger, &content_of(&s), &reg, Some(&entry), NOW, None),
            ReversalStep::Refuse {
                code: ResponseCode::NotPermitted,
                mismatch: false
            }
        );
    }

    #[test]
    fn a_reversal_after_the_window_gets_21_and_the_sale_stands() {
        let reg = registry();
        let mut w = window(NOW - 3600);
        let s = sale(1, NOW, false);
        let rev = reversal_of(&s);
        let win = Some(Duration::from_secs(600));
        let SaleStep::Sell { entry, .. } = begin_sale(&mut w, &s, &content_of(&s), Instant::now(), NOW, SKEW) else {
            panic!("a new sale")
        };
        entry.settle(approved());
        let too_late = ReversalStep::Refuse {
            code: ResponseCode::NoActionTaken,
            mismatch: false,
        };
        // Within the window, up to its last second: reversed here.
        for at in [NOW, NOW + 1, NOW + 600] {
            assert_eq!(
                decide_reversal(&rev, &content_of(&s), &reg, Some(&entry), at, win),
                ReversalStep::Reverse,
                "{at}"
            );
        }
        // One second after it, and later: 21, nothing reversed.
        for at in [NOW + 601, NOW + 86_400] {
            assert_eq!(
                decide_reversal(&rev, &content_of(&s), &reg, Some(&entry), at, win),
                too_late
            );
        }
        // No window configured: any time.
        assert_eq!(
            decide_reversal(&rev, &content_of(&s), &reg, Some(&entry), NOW + 86_400, None),
            ReversalStep::Reverse
        );
        // A mismatch is still a mismatch (13) after the window; a sale not remembered here goes to the server, which
        // knows when it was made.
        let mut other = content_of(&s);
        other.amount = 2000;
        assert!(matches!(
            decide_reversal(&rev, &other, &reg, Some(&entry), NOW + 601, win),
            ReversalStep::Refuse { mismatch: true, .. }
        ));
        assert_eq!(
            decide_reversal(&rev, &content_of(&s), &reg, None, NOW + 601, win),
            ReversalStep::AskServer
        );
        // The rule itself: an unknown time (0) is never too late.
        assert!(!reversal_too_late(0, NOW, Duration::from_secs(1)));
        assert!(reversal_too_late(NOW - 2, NOW, Duration::from_secs(1)));
        assert!(!reversal_too_late(NOW - 1, NOW, Duration::from_secs(1)));
    }

    #[test]
    fn what_the_servers_answer_to_a_reversal_comes_to() {
        let refused = |code| {
            Err(UpstreamError::Server(WireError {
                code,
                message: String::new(),
            }))
        };
        let reversed = Ok(Response::Reversed {
            outcome: crate::psp::ReverseOutcome::Remembered,
            pin_id: None,
        });
        assert_eq!(server_reversal(&reversed), ServerReversal::Reversed);
        assert_eq!(
            server_reversal(&refused(ErrorCode::ReversalMismatch)),
            ServerReversal::Mismatch
        );
        for other in [
            refused(ErrorCode::Busy),
            refused(ErrorCode::Internal),
            Err(UpstreamError::Timeout),
            Err(UpstreamError::Unavailable),
            Ok(Response::Released { refused: Vec::new() }),
        ] {
            assert_eq!(server_reversal(&other), ServerReversal::Forward, "{other:?}");
        }
    }

    #[test]
    fn network_messages_are_approved_for_known_terminals() {
        let reg = registry();
        assert_eq!(network_answer(&reg, "T1", None), ResponseCode::Approved);
        assert_eq!(network_answer(&reg, "T1", Some("M1")), ResponseCode::Approved);
        assert_eq!(network_answer(&reg, "T1", Some("M2")), ResponseCode::NotPermitted);
        assert_eq!(network_answer(&reg, "T9", None), ResponseCode::NotPermitted);
    }

    #[test]
    fn server_errors_and_journal_failures_have_one_code_each() {
        let server = |code| {
            code_for(&UpstreamError::Server(WireError {
                code,
                message: String::new(),
            }))
        };
        assert_eq!(code_for(&UpstreamError::Timeout), ResponseCode::ServerUnavailable);
        assert_eq!(server(ErrorCode::OutOfStock), ResponseCode::OutOfStock);
        assert_eq!(server(ErrorCode::DuplicateMismatch), ResponseCode::DuplicateMismatch);
        assert_eq!(server(ErrorCode::RepeatExpired), ResponseCode::InvalidTransaction);
        assert_eq!(server(ErrorCode::NotHolder), ResponseCode::SystemError);
        assert_eq!(
            code_for_journal(&journal::JournalError::Late),
            ResponseCode::ServerUnavailable
        );
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

    #[test]
    fn mac_failures_lock_a_terminal_within_the_window_until_unlocked() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut g = MacGuard::new(3, window);
        let bad = Err(MacRefusal::Mismatch);
        // Two failures, then a good MAC: served; failures older than the window do not add up.
        assert_eq!(check_mac(&mut g, "T1", true, bad, t0, NOW), Err(MacRefusal::Mismatch));
        assert_eq!(check_mac(&mut g, "T1", true, bad, t0, NOW), Err(MacRefusal::Mismatch));
        assert_eq!(check_mac(&mut g, "T1", true, Ok(2), t0, NOW), Ok(2));
        let later = t0 + window;
        assert_eq!(
            check_mac(&mut g, "T1", true, bad, later, NOW + 60),
            Err(MacRefusal::Mismatch)
        );
        assert!(!g.is_locked("T1"));
        // A terminal without a key is never counted (made-up ids take no memory); another terminal is apart.
        for _ in 0..10 {
            assert_eq!(
                check_mac(&mut g, "NOBODY", false, Err(MacRefusal::NoKey), later, NOW + 60),
                Err(MacRefusal::NoKey)
            );
        }
        assert_eq!(
            check_mac(&mut g, "T2", true, bad, later, NOW + 60),
            Err(MacRefusal::Mismatch)
        );
        // The third failure within the window locks T1: then even a good MAC is refused.
        assert_eq!(
            check_mac(&mut g, "T1", true, Err(MacRefusal::Missing), later, NOW + 60),
            Err(MacRefusal::Missing)
        );
        assert_eq!(
            check_mac(&mut g, "T1", true, bad, later, NOW + 61),
            Err(MacRefusal::Mismatch)
        );
        assert!(g.is_locked("T1"));
        assert_eq!(
            check_mac(&mut g, "T1", true, Ok(2), later, NOW + 62),
            Err(MacRefusal::Locked)
        );
        let status = g.status(later);
        assert_eq!(
            status,
            vec![
                MacStatus {
                    terminal: "T1".into(),
                    failures: 5,
                    recent: 3,
                    locked_since: Some(NOW + 61)
                },
                MacStatus {
                    terminal: "T2".into(),
                    failures: 1,
                    recent: 1,
                    locked_since: None
                },
            ]
        );
        // Unlocked by the operator: served again, its count starting afresh.
        assert!(g.unlock("T1"));
        assert!(!g.unlock("T1"));
        assert_eq!(check_mac(&mut g, "T1", true, Ok(2), later, NOW + 70), Ok(2));
        assert_eq!(
            check_mac(&mut g, "T1", true, bad, later, NOW + 70),
            Err(MacRefusal::Mismatch)
        );
        assert!(!g.is_locked("T1"));
        assert_eq!(g.status(later + window)[0].recent, 0);
        // Locks and unlocks are what is written down, once each.
        let mut g = MacGuard::new(1, window).with_locks([("OLD".to_string(), NOW - 5)]);
        assert_eq!(g.take_changed(), None);
        assert_eq!(check_mac(&mut g, "OLD", true, Ok(1), t0, NOW), Err(MacRefusal::Locked));
        assert_eq!(g.status(t0)[0].locked_since, Some(NOW - 5));
        assert_eq!(check_mac(&mut g, "T9", true, bad, t0, NOW), Err(MacRefusal::Mismatch));
        assert_eq!(
            g.take_changed(),
            Some([("OLD".to_string(), NOW - 5), ("T9".to_string(), NOW)].into())
        );
        assert_eq!(g.take_changed(), None);
        assert!(g.unlock("OLD") && !g.unlock("NEVER"));
        assert_eq!(g.take_changed(), Some([("T9".to_string(), NOW)].into()));
    }

    #[test]
    fn origins_bind_terminals_to_certificates_networks_and_callers() {
        use super::super::origin::{parse_nets, Binding, CertNames, Origin};
        let mut reg = registry();
        reg.add("T2", "M1", None);
        reg.add("T3", "M1", None);
        reg.add("T4", "M1", None);
        reg.origins
            .nacs
            .insert("nac-north".into(), ["T1".to_string(), "T2".to_string()].into());
        reg.origins.bindings.insert(
            "T3".into(),
            Binding {
                allow: parse_nets(&["10.0.0.0/8".into()]).unwrap(),
                caller_ids: vec![],
            },
        );
        reg.origins.bindings.insert(
            "T4".into(),
            Binding {
                allow: vec![],
                caller_ids: vec!["5551234".into()],
            },
        );
        let from = |addr: Option<&str>, cert: Option<&str>, caller: Option<&str>| Origin {
            addr: addr.map(|a| a.parse().unwrap()),
            cert: cert.map(|c| Arc::new(CertNames(vec![c.to_string()]))),
            caller_id: caller.map(Into::into),
        };
        let lan = Some("10.1.2.3");
        let outside = Some("192.0.2.1");
        // No certificate, no binding: anything goes (the MAC, when required, is what proves it).
        assert_eq!(check_origin(&reg, Some("T1"), &from(outside, None, None)), Ok(()));
        assert_eq!(check_origin(&reg, None, &from(outside, None, None)), Ok(()));
        // A NAC's certificate speaks for its list only; a terminal's for itself only.
        assert_eq!(
            check_origin(&reg, Some("T2"), &from(lan, Some("nac-north"), None)),
            Ok(())
        );
        assert_eq!(
            check_origin(&reg, Some("T4"), &from(lan, Some("nac-north"), None)),
            Err(OriginRefusal::CertNotFor)
        );
        assert_eq!(check_origin(&reg, Some("T2"), &from(lan, Some("T2"), None)), Ok(()));
        assert_eq!(
            check_origin(&reg, Some("T1"), &from(lan, Some("T2"), None)),
            Err(OriginRefusal::CertNotFor)
        );
        assert_eq!(
            check_origin(&reg, None, &from(lan, Some("T2"), None)),
            Err(OriginRefusal::NoTerminal)
        );
        // Source networks.
        assert_eq!(check_origin(&reg, Some("T3"), &from(lan, None, None)), Ok(()));
        assert_eq!(
            check_origin(&reg, Some("T3"), &from(outside, None, None)),
            Err(OriginRefusal::SourceNotAllowed)
        );
        // Bound to networks only: not over a phone line.
        assert_eq!(
            check_origin(&reg, Some("T3"), &from(None, None, Some("5551234"))),
            Err(OriginRefusal::CallerNotAllowed)
        );
        // Callers' numbers: the right number, another, none reported, or over TCP.
        assert_eq!(
            check_origin(&reg, Some("T4"), &from(None, None, Some("5551234"))),
            Ok(())
        );
        for o in [from(None, None, Some("5559999")), from(None, None, None)] {
            assert_eq!(check_origin(&reg, Some("T4"), &o), Err(OriginRefusal::CallerNotAllowed));
        }
        assert_eq!(
            check_origin(&reg, Some("T4"), &from(lan, None, None)),
            Err(OriginRefusal::SourceNotAllowed)
        );
        // A certificate does not lift a binding: both must hold.
        assert_eq!(
            check_origin(&reg, Some("T3"), &from(outside, Some("T3"), None)),
            Err(OriginRefusal::SourceNotAllowed)
        );
    }
}
