//! The repeat window: the sales of the last `repeat_window_secs` (at most `repeat_max`), by key, each with its
//! outcome once known, so that a repeat (0201) or duplicate 0200 gets the original answer (or waits for it), one with
//! other content gets `94`, and a reversed sale never hands out its PIN again. Beyond the window, a sale stays for as
//! long as a confirm or reversal of it waits for the PIN server. No I/O: the times come in as arguments.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::sale::SaleContent;
use crate::sale::{PinReceipt, ResponseCode, SaleKey};

/// What a sale came to; kept for repeats while the sale is in the repeat window.
#[derive(Debug)]
pub(super) enum Outcome {
    Approved { pin_id: i64, receipt: PinReceipt },
    Declined(ResponseCode),
}

/// What identifies a sale's content: a repeat with other content is a `94`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Content {
    pub(super) merchant: String,
    pub(super) product: String,
    pub(super) amount: u64,
    pub(super) currency: String,
}

impl Content {
    pub(super) fn to_sale_content(&self) -> SaleContent {
        SaleContent {
            merchant_id: self.merchant.clone(),
            product: self.product.clone(),
            amount: self.amount as i64,
            currency: self.currency.clone(),
        }
    }
}

/// A sale of the window: what it bought, and its outcome (`None` while it is in progress; its duplicates wait for it).
#[derive(Debug)]
pub(super) struct Entry {
    /// `None` for a reversal of a sale this gateway never saw: it matches any content.
    pub(super) content: Option<Content>,
    pub(super) outcome: watch::Sender<Option<Arc<Outcome>>>,
}

impl Entry {
    pub(super) fn new(content: Option<Content>, outcome: Option<Outcome>) -> Arc<Entry> {
        Arc::new(Entry {
            content,
            outcome: watch::channel(outcome.map(Arc::new)).0,
        })
    }

    pub(super) fn matches(&self, c: &Content) -> bool {
        self.content.as_ref().is_none_or(|mine| mine == c)
    }

    /// Sets the outcome unless one was set meanwhile (a reversal that came while the sale was in progress wins).
    pub(super) fn settle(&self, outcome: Arc<Outcome>) {
        self.outcome.send_if_modified(|o| {
            if o.is_none() {
                *o = Some(outcome);
                true
            } else {
                false
            }
        });
    }

    /// Replaces the outcome: the sale is being reversed, repeats must not get its PIN.
    pub(super) fn overrule(&self, code: ResponseCode) {
        self.outcome.send_replace(Some(Arc::new(Outcome::Declined(code))));
    }
}

/// Sales of the repeat window, by key; and, beyond the window, every sale with a confirm or reversal the server
/// has not acknowledged yet (until then the server cannot answer a repeat of it correctly).
pub(super) struct Recent {
    map: HashMap<SaleKey, Arc<Entry>>,
    /// When each entry was begun: the monotonic instant (for the window) and the wall-clock second (for the horizon).
    order: VecDeque<(Instant, i64, SaleKey)>,
    /// Wall-clock second (since the epoch) after which every sale begun here is still remembered: the gateway's
    /// start, then that of the latest sale forgotten (out of the window, or past `max`). A key of this second or
    /// older may have been sold without this gateway remembering it.
    pub(super) horizon: i64,
    /// Held by pending confirms and reversals (with how many hold each).
    held: HashMap<SaleKey, (Arc<Entry>, u32)>,
    window: Duration,
    max: usize,
}

pub(super) enum Begin {
    New(Arc<Entry>),
    Existing(Arc<Entry>),
}

impl Recent {
    /// An empty window of `window` (at most `max` sales) that remembers every sale after `horizon` (seconds since the
    /// epoch: the gateway's start).
    pub(super) fn new(window: Duration, max: usize, horizon: i64) -> Recent {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            horizon,
            held: HashMap::new(),
            window,
            max,
        }
    }

    pub(super) fn begin(&mut self, key: &SaleKey, content: Content, now: Instant, now_unix: i64) -> Begin {
        // Each entry is looked at once at most: with more sales in progress than `max`, the map stays over it for
        // a while rather than dropping one (or spinning).
        let mut budget = self.order.len();
        while let Some((t, _, _)) = self.order.front() {
            if budget == 0 || now.duration_since(*t) <= self.window && self.map.len() <= self.max {
                break;
            }
            budget -= 1;
            let (t, at, k) = self.order.pop_front().expect("looked at");
            match self.map.get(&k) {
                // A sale still in progress stays (its duplicates must wait for it, not start another).
                Some(e) if e.outcome.borrow().is_none() && now.duration_since(t) <= self.window * 2 => {
                    self.order.push_back((now, at, k));
                }
                _ => {
                    self.map.remove(&k);
                    self.horizon = self.horizon.max(at);
                }
            }
        }
        if let Some(e) = self.get(key) {
            return Begin::Existing(e);
        }
        let e = Entry::new(Some(content), None);
        self.map.insert(key.clone(), e.clone());
        self.order.push_back((now, now_unix, key.clone()));
        Begin::New(e)
    }

    pub(super) fn get(&self, key: &SaleKey) -> Option<Arc<Entry>> {
        self.held
            .get(key)
            .map(|(e, _)| e.clone())
            .or_else(|| self.map.get(key).cloned())
    }

    /// A reversal of a sale not remembered here was done by the server: a late sale with its key gets `12` from
    /// memory for as long as the window keeps it.
    pub(super) fn remember_reversed(&mut self, key: &SaleKey, now: Instant, now_unix: i64) {
        if self.get(key).is_none() {
            let e = Entry::new(None, Some(Outcome::Declined(ResponseCode::InvalidTransaction)));
            self.map.insert(key.clone(), e);
            self.order.push_back((now, now_unix, key.clone()));
        }
    }

    /// Drops `entry` (begun for `key` by a request that turned out not to be the key's sale), unless the key has
    /// another entry by now.
    pub(super) fn forget(&mut self, key: &SaleKey, entry: &Arc<Entry>) {
        if self.map.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            self.map.remove(key);
        }
    }

    pub(super) fn hold(&mut self, key: &SaleKey, entry: Arc<Entry>) {
        self.held.entry(key.clone()).or_insert((entry, 0)).1 += 1;
    }

    pub(super) fn unhold(&mut self, key: &SaleKey) {
        if let Some((_, n)) = self.held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(key);
            }
        }
    }
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

    fn content() -> Content {
        Content {
            merchant: "M".into(),
            product: "P".into(),
            amount: 100,
            currency: "978".into(),
        }
    }

    #[test]
    fn more_sales_in_progress_than_the_cap_neither_spin_nor_drop_one() {
        let mut r = Recent::new(Duration::from_secs(900), 2, 0);
        let t = Instant::now();
        for i in 0..5 {
            assert!(matches!(r.begin(&key(i), content(), t, 0), Begin::New(_)));
        }
        // All five still in progress: each is still found (a duplicate waits for it).
        for i in 0..5 {
            assert!(matches!(r.begin(&key(i), content(), t, 0), Begin::Existing(_)));
        }
        // Once answered, the oldest go as new sales come.
        for i in 0..5 {
            r.get(&key(i))
                .unwrap()
                .settle(Arc::new(Outcome::Declined(ResponseCode::OutOfStock)));
        }
        r.begin(&key(99), content(), t, 0);
        assert!(r.map.len() <= 3, "{}", r.map.len());
    }

    #[test]
    fn a_reversal_overrules_an_approval_but_not_a_91() {
        let e = Entry::new(Some(content()), None);
        e.overrule(ResponseCode::InvalidTransaction);
        e.settle(Arc::new(Outcome::Declined(ResponseCode::OutOfStock)));
        assert!(matches!(
            e.outcome.borrow().as_deref(),
            Some(Outcome::Declined(ResponseCode::InvalidTransaction))
        ));
    }
}
