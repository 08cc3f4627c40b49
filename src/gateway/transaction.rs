//! Each terminal request carried out: sales (from the cache or on demand), repeats and reversals, with what they
//! write to the journal and ask of the PIN server, and the answers built for the terminal.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::cache::Take;
use super::controller::{
    self, code_for, code_for_journal, rrn_of, Decline, ReversalStep, SaleStep, ServerReversal, Source,
};
use super::forward::Job;
use super::journal::{KeyRecord, Record, Reversing, SaleRecord};
use super::upstream::UpstreamError;
use super::window::{Content, Outcome};
use super::{Gateway, Reply};
use crate::iso8583::Message;
use crate::logging::limited;
use crate::psp::{Request, Response, SaleState};
use crate::sale::{
    answer, approved_answer, rrn_of_pin, sale_answer, PinReceipt, ResponseCode, ReversalRequest, SaleKey, SaleRequest,
    TerminalRequest,
};
use crate::sale::{ReversalReason, SaleContent};

impl Gateway {
    pub(super) async fn handle_request(&self, msg: &Message, received: Instant, received_unix: i64) -> Reply {
        let deadline = received + self.cfg.response_deadline;
        match TerminalRequest::parse(msg, received_unix) {
            Err(refusal) => {
                limited!(debug, "request refused", code = refusal.code.code(), reason = %refusal.reason);
                Reply::plain(answer(msg, refusal.code))
            }
            Ok(TerminalRequest::Network(_)) => {
                let terminal = msg.terminal_id().unwrap_or_default();
                let code = controller::network_answer(&self.registry(), terminal, msg.merchant_id());
                if code != ResponseCode::Approved {
                    limited!(info, "network request from an unknown terminal", terminal);
                }
                Reply::plain(answer(msg, code))
            }
            Ok(TerminalRequest::Sale(s)) => self.sale(msg, s, deadline, received_unix).await,
            Ok(TerminalRequest::Reversal(r)) => Reply::plain(self.reversal(msg, r, deadline, received_unix).await),
        }
    }

    fn declined(&self, msg: &Message, key: &SaleKey, code: ResponseCode) -> Reply {
        self.stats.declined.fetch_add(1, Ordering::Relaxed);
        let m = sale_answer(msg, &rrn_of(key), Err(code)).unwrap_or_else(|_| answer(msg, code));
        Reply::plain(m)
    }

    async fn reply_of(&self, msg: &Message, key: &SaleKey, outcome: &Outcome) -> Reply {
        match outcome {
            Outcome::Approved { pin_id, field63 } => {
                let auth = format!("{:06}", pin_id % 1_000_000);
                match field63 {
                    Some(f63) => Reply {
                        message: approved_answer(msg, &rrn_of_pin(*pin_id), &auth, f63.expose()),
                        reverse_if_undelivered: Some(key.clone()),
                        sign_as: None,
                    },
                    None => {
                        // A receipt too long for field 63 (or not printable): the PIN cannot reach the terminal.
                        limited!(error, "receipt does not fit field 63; the sale is reversed", pin_id);
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
        let content = Content {
            merchant: s.merchant_id.clone(),
            product: s.product.clone(),
            amount: s.amount,
            currency: s.currency.clone(),
        };
        let known = self.recent.lock().expect("not poisoned").get(&key);
        let screened = controller::screen_sale(
            &s,
            &content,
            &self.registry(),
            known.as_deref(),
            self.upstream.catalog().as_deref(),
        );
        let step = match screened {
            Err(d) => SaleStep::Decline(d),
            Ok(()) => {
                let mut recent = self.recent.lock().expect("not poisoned");
                controller::begin_sale(
                    &mut recent,
                    &s,
                    &content,
                    Instant::now(),
                    received_unix,
                    self.cfg.clock_skew,
                )
            }
        };
        let (entry, source) = match step {
            SaleStep::Decline(Decline { code, repeat }) => {
                if repeat {
                    self.stats.repeats.fetch_add(1, Ordering::Relaxed);
                }
                return self.declined(msg, &key, code);
            }
            SaleStep::Wait(e) => {
                self.stats.repeats.fetch_add(1, Ordering::Relaxed);
                let waited = tokio::time::timeout_at(deadline, e.wait()).await.ok();
                return match waited {
                    Some(o) => {
                        if matches!(*o, Outcome::Approved { .. }) {
                            if self.reversed_elsewhere(&s, deadline).await {
                                self.overrule_reversed(&key);
                                return self.declined(msg, &key, ResponseCode::InvalidTransaction);
                            }
                            self.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
                        }
                        self.reply_of(msg, &key, &o).await
                    }
                    None => self.declined(msg, &key, ResponseCode::ServerUnavailable),
                };
            }
            SaleStep::Sell { entry, source } => (entry, source),
        };
        if s.repeat {
            self.stats.repeats.fetch_add(1, Ordering::Relaxed);
        }
        // A new sale within the limits, counted before the PIN is asked for; handed back if it ends without one. A
        // repeat (0201) gets here only when this gateway does not remember its sale: the server may sell a new PIN
        // for it, so it counts as a new sale (else 0201s with fresh keys would pass every limit); one the window
        // remembers waited above and is never refused for a limit.
        let admitted = match &self.limits {
            Some(l) => {
                let checked = l.lock().expect("not poisoned").admit(
                    &s.key.terminal_id,
                    &s.merchant_id,
                    &s.currency,
                    s.amount,
                    received_unix,
                );
                if let Err(r) = checked {
                    let scope = if r.merchant { "merchant" } else { "terminal" };
                    let kind = match r.refusal {
                        super::limits::Refusal::Amount => "amount",
                        super::limits::Refusal::Frequency => "frequency",
                    };
                    self.metrics.refused_for_limit(scope, kind);
                    limited!(info, "sale refused for a limit", terminal = %s.key.terminal_id, merchant = %s.merchant_id, scope, kind);
                    let code = r.refusal.code();
                    entry.settle(Arc::new(Outcome::Declined(code)));
                    return self.declined(msg, &key, code);
                }
                true
            }
            None => false,
        };
        let allowed = match self.take_allowance(&s, received_unix, deadline).await {
            Ok(taken) => taken,
            Err(code) => {
                self.refund_admitted(&s, admitted, received_unix);
                entry.settle(Arc::new(Outcome::Declined(code)));
                return self.declined(msg, &key, code);
            }
        };
        let counted = match self.take_sales_allowance(&s, received_unix, deadline).await {
            Ok(taken) => taken,
            Err(code) => {
                // The value taken for this sale goes back: it was never sold.
                self.give_back_value(&s, allowed, received_unix);
                self.refund_admitted(&s, admitted, received_unix);
                entry.settle(Arc::new(Outcome::Declined(code)));
                return self.declined(msg, &key, code);
            }
        };
        let outcome = Arc::new(self.sell(&s, deadline, source).await);
        if matches!(*outcome, Outcome::Declined(_)) {
            self.give_back_value(&s, allowed, received_unix);
            if counted {
                if let Some(a) = &self.sales_allowances {
                    a.lock().expect("not poisoned").give_back(&s.merchant_id, received_unix);
                }
            }
        }
        if matches!(*outcome, Outcome::Declined(_)) {
            self.refund_admitted(&s, admitted, received_unix);
        }
        if !s.repeat && matches!(*outcome, Outcome::Approved { .. }) {
            self.metrics.reversal_rates.sale(&s.key.terminal_id, &s.merchant_id);
        }
        if matches!(*outcome, Outcome::Declined(ResponseCode::DuplicateMismatch)) {
            // The key is another sale's (the server knows it with other content): this request's content must not
            // stand for the key here, or that sale's own repeats and reversal would be refused as mismatches.
            self.recent.lock().expect("not poisoned").forget(&key, &entry);
        }
        entry.settle(outcome.clone());
        // A reversal that came meanwhile overruled the sale: the original request is answered as the sale now
        // stands, never with a PIN being voided.
        let outcome = entry.outcome().unwrap_or(outcome);
        self.reply_of(msg, &key, &outcome).await
    }

    /// A sale admitted by this gateway's limits ended without a PIN: it no longer counts.
    fn refund_admitted(&self, s: &SaleRequest, admitted: bool, at: i64) {
        if let (true, Some(l)) = (admitted, &self.limits) {
            let mut l = l.lock().expect("not poisoned");
            l.refund(&s.key.terminal_id, &s.merchant_id, &s.currency, s.amount, at);
        }
    }

    /// A sale whose value came from the merchant's allowance (`taken`) ended without a PIN: the value goes back.
    fn give_back_value(&self, s: &SaleRequest, taken: bool, at: i64) {
        if let (true, Some(a)) = (taken, &self.allowances) {
            let mut a = a.lock().expect("not poisoned");
            a.give_back(&s.merchant_id, &s.currency, s.amount, at);
        }
    }

    /// Takes a new sale from its merchant's sales per minute granted by the PIN server (`Ok(true)`; `Ok(false)`: no
    /// sales allowance applies, or the sale was sold within the margin, which is never given back), asking for a
    /// slice when none is left; `Err(65)` when the merchant's sales this minute across gateways are used up,
    /// `Err(91)` when the server cannot be asked and the margin is used up (as for value).
    async fn take_sales_allowance(&self, s: &SaleRequest, now: i64, deadline: Instant) -> Result<bool, ResponseCode> {
        use super::limits::Take;
        let Some(a) = &self.sales_allowances else {
            return Ok(false);
        };
        let m = &s.merchant_id;
        let ask = match a.lock().expect("not poisoned").take(m, now) {
            Take::Unmanaged => return Ok(false),
            Take::Taken => return Ok(true),
            Take::Ask(n) => n,
        };
        let request = Request::SalesAllowance {
            merchant_id: m.clone(),
            count: u32::try_from(ask).unwrap_or(crate::psp::MAX_SALES_SLICE),
        };
        let answer = self.upstream.call(request, half_way(deadline)).await;
        let mut a = a.lock().expect("not poisoned");
        match answer {
            Ok(Response::Allowance { granted, .. }) => {
                let granted = u32::try_from(granted.max(0)).unwrap_or(u32::MAX);
                a.add(m, granted, now);
                match a.take(m, now) {
                    Take::Taken | Take::Unmanaged => Ok(true),
                    Take::Ask(_) => {
                        self.metrics.refused_for_limit("merchant_all_gateways", "frequency");
                        limited!(info, "sale refused: the merchant's sales per minute across gateways are used up", merchant = %m);
                        Err(ResponseCode::ExceedsFrequencyLimit)
                    }
                }
            }
            other => {
                if a.take_offline(m, now) {
                    limited!(warn, "no sales allowance from the PIN server; sold within the margin", merchant = %m, answer = ?other);
                    Ok(false)
                } else {
                    limited!(warn, "no sales allowance from the PIN server and the margin is used", merchant = %m, answer = ?other);
                    Err(ResponseCode::ServerUnavailable)
                }
            }
        }
    }

    /// Takes a new sale's value from its merchant's allowance (`Ok(true)`; `Ok(false)`: no allowance applies), asking
    /// the PIN server for a slice when it does not fit; `Err(61)` when the merchant's limit is reached, `Err(91)`
    /// when the server cannot be asked and the margin is used up.
    async fn take_allowance(&self, s: &SaleRequest, now: i64, deadline: Instant) -> Result<bool, ResponseCode> {
        use super::limits::Take;
        let Some(a) = &self.allowances else {
            return Ok(false);
        };
        let (m, c) = (&s.merchant_id, &s.currency);
        let ask = match a.lock().expect("not poisoned").take(m, c, s.amount, now) {
            Take::Unmanaged => return Ok(false),
            Take::Taken => return Ok(true),
            Take::Ask(n) => n,
        };
        let request = Request::Allowance {
            merchant_id: m.clone(),
            currency: c.clone(),
            amount: ask as i64,
        };
        let answer = self.upstream.call(request, half_way(deadline)).await;
        let mut a = a.lock().expect("not poisoned");
        match answer {
            Ok(Response::Allowance { granted, .. }) => {
                a.add(m, c, granted.max(0) as u64, now);
                match a.take(m, c, s.amount, now) {
                    Take::Taken | Take::Unmanaged => Ok(true),
                    Take::Ask(_) => {
                        self.metrics.refused_for_limit("merchant_all_gateways", "amount");
                        limited!(info, "sale refused: the merchant's limit across gateways is reached", merchant = %m);
                        Err(ResponseCode::ExceedsAmountLimit)
                    }
                }
            }
            other => {
                if a.take_offline(m, c, s.amount, now) {
                    limited!(warn, "no allowance from the PIN server; sold within the margin", merchant = %m, answer = ?other);
                    Ok(false)
                } else {
                    limited!(warn, "no allowance from the PIN server and the margin is used", merchant = %m, answer = ?other);
                    Err(ResponseCode::ServerUnavailable)
                }
            }
        }
    }

    /// Whether the PIN server says the sale with this key, which this gateway remembers approved, was reversed since
    /// (through another gateway: a NAC failing over): its PIN is then never handed to a repeat again. Asked before
    /// every re-delivery from the window; repeats are rare, so this costs little. When the server cannot say in
    /// time, the window's record stands (the server would answer `unknown` for a cache sale whose confirm is still
    /// queued here, and the PIN was sold to this very terminal).
    async fn reversed_elsewhere(&self, s: &SaleRequest, deadline: Instant) -> bool {
        let request = Request::CheckSale {
            terminal: self.sale_record(s).terminal(),
        };
        match self.upstream.call(request, half_way(deadline)).await {
            Ok(Response::SaleState { state }) => {
                let reversed = state == SaleState::Reversed;
                if reversed {
                    limited!(info, "a repeat of a sale reversed through another gateway; no PIN", terminal = %s.key.terminal_id);
                }
                reversed
            }
            Ok(other) => {
                limited!(error, "PIN server answered check_sale with something else", answer = ?other);
                false
            }
            Err(e) => {
                limited!(warn, "PIN server not asked whether a repeated sale stands; the gateway's record answers", error = %e);
                false
            }
        }
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

    /// One PIN for a new sale, from `source` (see [`controller::begin_sale`]): the cache, or the server.
    async fn sell(&self, s: &SaleRequest, deadline: Instant, source: Source) -> Outcome {
        let record = self.sale_record(s);
        let amount = s.amount as i64;
        let take = match source {
            Source::ServerRepeat => Take::OnDemand,
            Source::ServerUnsureKey => {
                if self.cache.lock().expect("not poisoned").is_prefetch(&s.product, amount) {
                    self.stats.unsure_keys.fetch_add(1, Ordering::Relaxed);
                }
                Take::OnDemand
            }
            Source::Cache => {
                // A PIN is sold only with a minute of its lease left (the server keeps it ours till then).
                let min_lease = crate::clock::unix_now() + 60;
                self.cache
                    .lock()
                    .expect("not poisoned")
                    .take(&s.product, amount, Instant::now(), min_lease)
            }
        };
        match take {
            Take::Hit(pin) => {
                self.refill_wake.notify_one();
                let pin_id = pin.pin.pin_id;
                if let Err(e) = self.journal.append_cache_sold_by(pin_id, &record, deadline).await {
                    // Not acknowledged in time, so not handed out; but the record may be (or get) on disk. The
                    // PIN is confirmed and reversed at once (voided: accounted for, never sold twice), and the
                    // reversal is journaled behind the sale record.
                    limited!(error, "journal did not take a cache sale; the PIN is voided", error = %e, pin_id);
                    let key = KeyRecord::from(&s.key);
                    let content = Some(record.content());
                    let why = Reversing {
                        reason: ReversalReason::Undelivered,
                        requested_at: None,
                    };
                    self.journal.append_lazy(vec![Record::Reverse {
                        key: key.clone(),
                        content: content.clone(),
                        why,
                    }]);
                    self.enqueue(Job::Confirm { pin_id, sale: record });
                    self.enqueue(Job::Reverse { key, content, why });
                    return Outcome::Declined(code_for_journal(&e));
                }
                self.stats.sales_from_cache.fetch_add(1, Ordering::Relaxed);
                let outcome = Outcome::approved(pin_id, &receipt_of(&pin.pin));
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
            .append_by(&[Record::Asked { sale: record.clone() }], deadline)
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
                    .append_by(&[Record::Resolved { key: key.clone() }], deadline)
                    .await
                {
                    limited!(error, "journal failed after a sale; the sale is reversed", error = %e);
                    self.reverse_unanswered(key, record.content());
                    return Outcome::Declined(ResponseCode::SystemError);
                }
                self.stats.sales_on_demand.fetch_add(1, Ordering::Relaxed);
                Outcome::approved(pin.pin_id, &receipt_of(&pin))
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
        let why = Reversing {
            reason: ReversalReason::Undelivered,
            requested_at: None,
        };
        self.journal.append_lazy(vec![
            Record::Reverse {
                key: key.clone(),
                content: content.clone(),
                why,
            },
            Record::Resolved { key: key.clone() },
        ]);
        self.enqueue(Job::Reverse { key, content, why });
    }

    /// An approved answer could not be written to the terminal: reverse the sale (the reversal is on disk before
    /// this returns), and answer repeats with `91`.
    pub async fn undelivered(&self, key: &SaleKey) {
        self.reverse_own(key, ReversalReason::Undelivered).await
    }

    /// An approved answer was sent in full but the terminal never acknowledged it (a dial-up line gone after the
    /// answer's last byte): reversed as [`undelivered`](Self::undelivered), marked so that the PIN, which the
    /// terminal may have printed, stays out of the supplier's deactivation list by default.
    pub async fn unacknowledged(&self, key: &SaleKey) {
        self.reverse_own(key, ReversalReason::Unacknowledged).await
    }

    async fn reverse_own(&self, key: &SaleKey, reason: ReversalReason) {
        self.stats.undelivered.fetch_add(1, Ordering::Relaxed);
        limited!(warn, "answer not delivered; the sale is reversed", terminal = %key.terminal_id, stan = %key.stan);
        let entry = self.recent.lock().expect("not poisoned").get(key);
        if let Some(e) = &entry {
            e.overrule(ResponseCode::ServerUnavailable);
        }
        let content = entry.and_then(|e| e.content.as_deref().map(Content::to_sale_content));
        let key = KeyRecord::from(key);
        let why = Reversing {
            reason,
            requested_at: None,
        };
        let record = Record::Reverse {
            key: key.clone(),
            content: content.clone(),
            why,
        };
        if let Err(e) = self.journal.append(vec![record]).await {
            limited!(error, "journal failed; the reversal of an undelivered sale is in memory only", error = %e);
        }
        self.enqueue(Job::Reverse { key, content, why });
    }

    async fn reversal(&self, msg: &Message, r: ReversalRequest, deadline: Instant, received_unix: i64) -> Message {
        let named = Content {
            merchant: r.merchant_id.clone(),
            product: r.product.clone(),
            amount: r.amount,
            currency: r.currency.clone(),
        };
        let known = self.recent.lock().expect("not poisoned").get(&r.sale);
        let window = self.cfg.policy.reversal_window;
        let step = controller::decide_reversal(&r, &named, &self.registry(), known.as_deref(), received_unix, window);
        if let ReversalStep::Refuse { code, mismatch } = step {
            if mismatch {
                self.stats.reversal_mismatches.fetch_add(1, Ordering::Relaxed);
            }
            if code == ResponseCode::NoActionTaken {
                self.metrics.reversals_too_late.inc();
                limited!(info, "reversal after the reversal window; the sale stands", terminal = %r.sale.terminal_id, stan = %r.sale.stan);
            }
            return answer(msg, code);
        }
        let key = KeyRecord::from(&r.sale);
        let content = Some(named.to_sale_content());
        // Measured by the PIN server from when the terminal asked, even if the reversal reaches it later.
        let why = Reversing {
            reason: ReversalReason::Terminal,
            requested_at: Some(received_unix),
        };
        let record = Record::Reverse {
            key: key.clone(),
            content: content.clone(),
            why,
        };
        if let Err(e) = self.journal.append_by(std::slice::from_ref(&record), deadline).await {
            // The terminal is told to repeat it; the reversal is still sent (repeats are idempotent).
            limited!(error, "journal did not record a reversal in time", error = %e);
            self.enqueue(Job::Reverse { key, content, why });
            return answer(msg, ResponseCode::ServerUnavailable);
        }
        let mut code = ResponseCode::Approved;
        if step == ReversalStep::AskServer {
            let margin = (self.cfg.response_deadline / 20).min(Duration::from_millis(500));
            let request = Request::Reverse {
                terminal_id: key.terminal_id.clone(),
                stan: key.stan.clone(),
                transmission: key.transmission.clone(),
                content: content.clone(),
                reason: why.reason,
                requested_at: why.requested_at,
            };
            match controller::server_reversal(&self.upstream.call(request, deadline - margin).await) {
                ServerReversal::Reversed => {
                    self.journal.append_lazy(vec![Record::Reversed { key: key.clone() }]);
                    self.stats.reversals.fetch_add(1, Ordering::Relaxed);
                    // A late sale with this key is refused here (12) as the server would, never sold from the cache.
                    self.recent.lock().expect("not poisoned").remember_reversed(
                        &r.sale,
                        Instant::now(),
                        crate::clock::unix_now(),
                    );
                    self.overrule_reversed(&r.sale);
                    self.metrics
                        .reversal_rates
                        .reversal(&r.sale.terminal_id, &r.merchant_id);
                    return answer(msg, ResponseCode::Approved);
                }
                ServerReversal::TooLate => {
                    // Nothing to reverse, ever: the sale stands.
                    self.journal.append_lazy(vec![Record::Reversed { key }]);
                    self.metrics.reversals_too_late.inc();
                    return answer(msg, ResponseCode::NoActionTaken);
                }
                ServerReversal::Mismatch => {
                    self.journal.append_lazy(vec![Record::Reversed { key }]);
                    self.stats.reversal_mismatches.fetch_add(1, Ordering::Relaxed);
                    return answer(msg, ResponseCode::InvalidAmount);
                }
                // Not answered in time under a reversal window: whether the sale is within it only the server
                // knows (this gateway does not remember the sale). The reversal is sent on as it stands (judged by
                // when the terminal asked), and the terminal is told to repeat it (91): it learns the server's
                // answer then, never an approval the server may refuse as too late.
                ServerReversal::Forward if window.is_some() => code = ResponseCode::ServerUnavailable,
                // Not answered in time, or refused otherwise: store-and-forward, as before (remembered).
                ServerReversal::Forward => {}
            }
        }
        if code == ResponseCode::Approved {
            self.stats.reversals.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .reversal_rates
                .reversal(&r.sale.terminal_id, &r.merchant_id);
        }
        self.enqueue(Job::Reverse { key, content, why });
        self.overrule_reversed(&r.sale);
        answer(msg, code)
    }

    /// A terminal reversed `key`: whatever entry the sale has now (even one begun while the reversal was being
    /// written) never hands out its PIN again; a `91` given for an undelivered answer stays.
    fn overrule_reversed(&self, key: &SaleKey) {
        if let Some(e) = self.recent.lock().expect("not poisoned").get(key) {
            let approved_or_open = matches!(e.outcome().as_deref(), None | Some(Outcome::Approved { .. }));
            if approved_or_open {
                e.overrule(ResponseCode::InvalidTransaction);
            }
        }
    }
}

/// The deadline of a question asked of the PIN server before a sale that has an answer of its own when the server
/// cannot be asked (an allowance: the margin; a re-delivery: the window's record): half the time left, so that the
/// sale itself still fits before the terminal's deadline when the server does not answer at all (a server stopped
/// without closing its connections leaves the call waiting to its deadline).
fn half_way(deadline: Instant) -> Instant {
    let now = Instant::now();
    now + deadline.saturating_duration_since(now) / 2
}

pub(super) fn receipt_of(p: &crate::psp::PinOut) -> PinReceipt {
    PinReceipt {
        pin: p.pin.clone(),
        serial: p.serial.clone(),
        expiry: p.expiry.clone(),
        lines: p.receipt.clone(),
    }
}
