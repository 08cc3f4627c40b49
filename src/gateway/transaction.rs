//! Each terminal request carried out: sales (from the cache or on demand), repeats and reversals, with what they
//! write to the journal and ask of the PIN server, and the answers built for the terminal.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::cache::Take;
use super::controller::{code_for, code_for_journal, rrn_of};
use super::forward::Job;
use super::journal::{KeyRecord, Record, SaleRecord};
use super::upstream::UpstreamError;
use super::window::{Begin, Content, Outcome};
use super::{Gateway, Reply};
use crate::iso8583::Message;
use crate::logging::limited;
use crate::psp::{ErrorCode, Request, Response};
use crate::sale::{
    answer, rrn_of_pin, sale_answer, PinReceipt, ResponseCode, ReversalRequest, SaleKey, SaleRequest, TerminalRequest,
};
use crate::store::SaleContent;

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
}

pub(super) fn receipt_of(p: &crate::psp::PinOut) -> PinReceipt {
    PinReceipt {
        pin: p.pin.clone(),
        serial: p.serial.clone(),
        expiry: p.expiry.clone(),
        lines: p.receipt.clone(),
    }
}
