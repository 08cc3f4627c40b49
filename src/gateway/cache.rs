//! The prefetch cache: PINs reserved in advance, per product and amount. No I/O and no clock of its own: the caller
//! passes the time, takes PINs, puts reserved ones in, and asks what to reserve next.
//!
//! Refill adapts to the sale rate (an exponentially weighted rate over one-second windows): a refill is due when
//! the stock falls under `max(low, rate × lead)` — enough to last while a refill travels — and fills up to
//! `clamp(rate × cover, low, high)`. A hot product holds up to `high`; a cold one sinks to `low`, because every
//! reserved PIN is money at risk at the gateway.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::journal::CachedPin;
use crate::psp::MAX_RESERVE;

/// How a product and amount is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every sale is a `sell` at the PIN server.
    OnDemand,
    /// Sales come from PINs reserved in advance; `low` and `high` bound the stock held.
    Prefetch { low: usize, high: usize },
}

/// The outcome of taking a PIN.
#[derive(Debug)]
pub enum Take {
    Hit(Box<CachedPin>),
    /// Prefetch product with an empty cache: sell on demand (and a refill is due).
    Miss,
    /// Not a prefetch product.
    OnDemand,
}

const WINDOW: Duration = Duration::from_secs(1);
/// Weight of the newest window in the rate.
const ALPHA: f64 = 0.3;

#[derive(Debug)]
struct Slot {
    low: usize,
    high: usize,
    pins: VecDeque<CachedPin>,
    /// Sales per second, smoothed.
    rate: f64,
    window_start: Instant,
    window_sales: u64,
    refilling: bool,
    hits: u64,
    misses: u64,
}

impl Slot {
    fn new(low: usize, high: usize, now: Instant) -> Slot {
        Slot {
            low,
            high,
            pins: VecDeque::new(),
            rate: 0.0,
            window_start: now,
            window_sales: 0,
            refilling: false,
            hits: 0,
            misses: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        while now.duration_since(self.window_start) >= WINDOW {
            let r = self.window_sales as f64 / WINDOW.as_secs_f64();
            self.rate = ALPHA * r + (1.0 - ALPHA) * self.rate;
            self.window_sales = 0;
            self.window_start += WINDOW;
            if self.rate < 0.01 && now.duration_since(self.window_start) > WINDOW * 60 {
                // Long quiet: skip the empty windows at once.
                self.rate = 0.0;
                self.window_start = now;
            }
        }
    }

    /// The smoothed rate, or the sales of the window in progress when they are a burst (at least the low mark
    /// already): a burst is seen within its window, not a second later, while a few sales of a quiet product do
    /// not make it look hot.
    fn rate_now(&self) -> f64 {
        if self.window_sales as usize >= self.low.max(5) {
            self.rate.max(self.window_sales as f64 / WINDOW.as_secs_f64())
        } else {
            self.rate
        }
    }

    fn due_under(&self, lead: Duration) -> usize {
        self.low.max((self.rate_now() * lead.as_secs_f64()).ceil() as usize)
    }

    fn target(&self, cover: Duration) -> usize {
        ((self.rate_now() * cover.as_secs_f64()).ceil() as usize).clamp(self.low, self.high)
    }
}

/// Stock and demand of one product and amount, for `gateway stock`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Level {
    pub product: String,
    pub amount: i64,
    pub cached: usize,
    pub low: usize,
    pub high: usize,
    pub target: usize,
    pub rate_per_sec: f64,
    pub hits: u64,
    pub misses: u64,
}

/// The cache of every prefetch product.
#[derive(Debug)]
pub struct PinCache {
    slots: HashMap<(String, i64), Slot>,
    cover: Duration,
    lead: Duration,
    stale: Vec<CachedPin>,
}

impl PinCache {
    /// A cache for the prefetch products among `products`.
    pub fn new(
        products: impl IntoIterator<Item = (String, i64, Mode)>,
        cover: Duration,
        lead: Duration,
        now: Instant,
    ) -> PinCache {
        let slots = products
            .into_iter()
            .filter_map(|(code, amount, mode)| match mode {
                Mode::Prefetch { low, high } => Some(((code, amount), Slot::new(low, high, now))),
                Mode::OnDemand => None,
            })
            .collect();
        PinCache {
            slots,
            cover,
            lead,
            stale: Vec::new(),
        }
    }

    /// New modes and watermarks (a reload): prefetch products keep their PINs with the new marks, new ones start
    /// empty, and the PINs of products no longer prefetched are set aside to go back to the server
    /// ([`PinCache::take_stale`]).
    pub fn set_modes(&mut self, products: impl IntoIterator<Item = (String, i64, Mode)>, now: Instant) {
        let mut keep = std::collections::HashSet::new();
        for (code, amount, mode) in products {
            if let Mode::Prefetch { low, high } = mode {
                keep.insert((code.clone(), amount));
                let slot = self
                    .slots
                    .entry((code, amount))
                    .or_insert_with(|| Slot::new(low, high, now));
                slot.low = low;
                slot.high = high;
            }
        }
        let gone: Vec<(String, i64)> = self.slots.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        for k in gone {
            if let Some(slot) = self.slots.remove(&k) {
                self.stale.extend(slot.pins);
            }
        }
    }

    /// PINs set aside by [`PinCache::take`] because their lease was ending: to release.
    pub fn take_stale(&mut self) -> Vec<CachedPin> {
        std::mem::take(&mut self.stale)
    }

    /// Whether `product`/`amount` is prefetched.
    pub fn is_prefetch(&self, product: &str, amount: i64) -> bool {
        self.slots.contains_key(&(product.to_string(), amount))
    }

    /// Takes the oldest PIN of `product`/`amount`.
    /// PINs whose lease ends before `min_lease` (unix seconds) are set aside, never sold ([`PinCache::take_stale`]).
    pub fn take(&mut self, product: &str, amount: i64, now: Instant, min_lease: i64) -> Take {
        let Some(slot) = self.slots.get_mut(&(product.to_string(), amount)) else {
            return Take::OnDemand;
        };
        slot.roll(now);
        slot.window_sales += 1;
        while slot.pins.front().is_some_and(|p| p.lease_until < min_lease) {
            self.stale.extend(slot.pins.pop_front());
        }
        match slot.pins.pop_front() {
            Some(p) => {
                slot.hits += 1;
                Take::Hit(Box::new(p))
            }
            None => {
                slot.misses += 1;
                Take::Miss
            }
        }
    }

    /// Puts PINs in (reserved by a refill, or recovered from the journal). PINs of products no longer configured
    /// for prefetch are handed back, for release.
    pub fn put(&mut self, pins: Vec<CachedPin>) -> Vec<CachedPin> {
        let mut back = Vec::new();
        for p in pins {
            match self.slots.get_mut(&(p.pin.product.clone(), p.pin.amount)) {
                Some(s) => s.pins.push_back(p),
                None => back.push(p),
            }
        }
        back
    }

    /// The refills due now, as (product, amount, count); each is marked in progress until [`PinCache::refilled`].
    pub fn due(&mut self, now: Instant) -> Vec<(String, i64, usize)> {
        let (cover, lead) = (self.cover, self.lead);
        let mut out = Vec::new();
        for ((code, amount), s) in self.slots.iter_mut() {
            s.roll(now);
            if s.refilling || s.pins.len() >= s.due_under(lead) {
                continue;
            }
            let want = s.target(cover).saturating_sub(s.pins.len()).min(MAX_RESERVE);
            if want > 0 {
                s.refilling = true;
                out.push((code.clone(), *amount, want));
            }
        }
        out
    }

    /// A refill of `product`/`amount` ended (with or without PINs; `full` when it got every PIN it asked for).
    /// True when the slot is still under its refill mark after a full refill: a cold cache (one refill at a time,
    /// each at most `MAX_RESERVE`) goes on filling at once instead of at the next tick. Never after a failed or
    /// partial refill, so a server that is out of stock or failing is not asked in a loop.
    pub fn refilled(&mut self, product: &str, amount: i64, full: bool) -> bool {
        let lead = self.lead;
        match self.slots.get_mut(&(product.to_string(), amount)) {
            Some(s) => {
                s.refilling = false;
                full && s.pins.len() < s.due_under(lead)
            }
            None => false,
        }
    }

    /// PIN ids whose lease ends before `before` (unix seconds), to renew.
    pub fn expiring(&self, before: i64) -> Vec<i64> {
        self.slots
            .values()
            .flat_map(|s| s.pins.iter())
            .filter(|p| p.lease_until < before)
            .map(|p| p.pin.pin_id)
            .collect()
    }

    /// Records renewed leases.
    pub fn renewed(&mut self, ids: &[i64], lease_until: i64) {
        let ids: std::collections::HashSet<i64> = ids.iter().copied().collect();
        for p in self.slots.values_mut().flat_map(|s| s.pins.iter_mut()) {
            if ids.contains(&p.pin.pin_id) {
                p.lease_until = lease_until;
            }
        }
    }

    /// Empties the cache (for release at shutdown).
    pub fn drain(&mut self) -> Vec<CachedPin> {
        self.slots.values_mut().flat_map(|s| s.pins.drain(..)).collect()
    }

    pub fn levels(&mut self, now: Instant) -> Vec<Level> {
        let cover = self.cover;
        let mut v: Vec<Level> = self
            .slots
            .iter_mut()
            .map(|((code, amount), s)| {
                s.roll(now);
                Level {
                    product: code.clone(),
                    amount: *amount,
                    cached: s.pins.len(),
                    low: s.low,
                    high: s.high,
                    target: s.target(cover),
                    rate_per_sec: (s.rate_now() * 10.0).round() / 10.0,
                    hits: s.hits,
                    misses: s.misses,
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.product, a.amount).cmp(&(&b.product, b.amount)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psp::PinOut;
    use crate::sale::Pin;

    fn pins(product: &str, amount: i64, ids: std::ops::Range<i64>) -> Vec<CachedPin> {
        ids.map(|id| CachedPin {
            pin: PinOut {
                pin_id: id,
                product: product.into(),
                amount,
                pin: Pin::new(format!("{id:016}")),
                serial: format!("S{id}"),
                expiry: None,
                receipt: vec![],
            },
            lease_until: 1000 + id,
        })
        .collect()
    }

    fn cache(now: Instant) -> PinCache {
        PinCache::new(
            [
                ("HOT".to_string(), 100, Mode::Prefetch { low: 10, high: 2000 }),
                ("COLD".to_string(), 100, Mode::Prefetch { low: 5, high: 2000 }),
                ("OD".to_string(), 100, Mode::OnDemand),
            ],
            Duration::from_secs(30),
            Duration::from_secs(2),
            now,
        )
    }

    #[test]
    fn new_modes_keep_pins_move_marks_and_set_aside_what_is_no_longer_prefetched() {
        let t = Instant::now();
        let mut c = cache(t);
        assert!(c.put(pins("HOT", 100, 1..4)).is_empty());
        assert!(c.put(pins("COLD", 100, 10..12)).is_empty());
        c.set_modes(
            [
                ("HOT".to_string(), 100, Mode::Prefetch { low: 20, high: 40 }),
                ("COLD".to_string(), 100, Mode::OnDemand),
                ("NEW".to_string(), 500, Mode::Prefetch { low: 1, high: 2 }),
            ],
            t,
        );
        let levels = c.levels(t);
        let hot = levels.iter().find(|l| l.product == "HOT").unwrap();
        assert_eq!((hot.cached, hot.low, hot.high), (3, 20, 40), "PINs kept, marks moved");
        assert!(levels.iter().any(|l| l.product == "NEW" && l.cached == 0));
        assert!(levels.iter().all(|l| l.product != "COLD"));
        let mut back: Vec<i64> = c.take_stale().iter().map(|p| p.pin.pin_id).collect();
        back.sort();
        assert_eq!(back, [10, 11], "the PINs of a product no longer prefetched go back");
        // A refill that was out for the removed product lands: its PINs have no slot and come back to the caller.
        assert_eq!(c.put(pins("COLD", 100, 20..22)).len(), 2);
        assert!(matches!(c.take("COLD", 100, t, 0), Take::OnDemand));
    }

    #[test]
    fn takes_in_order_misses_when_empty_and_knows_on_demand_products() {
        let t = Instant::now();
        let mut c = cache(t);
        assert!(c.put(pins("HOT", 100, 1..3)).is_empty());
        assert_eq!(
            c.put(pins("GONE", 100, 9..10)).len(),
            1,
            "not a prefetch product: handed back"
        );
        assert!(matches!(c.take("HOT", 100, t, 0), Take::Hit(p) if p.pin.pin_id == 1));
        assert!(matches!(c.take("HOT", 100, t, 0), Take::Hit(p) if p.pin.pin_id == 2));
        assert!(matches!(c.take("HOT", 100, t, 0), Take::Miss));
        assert!(matches!(c.take("OD", 100, t, 0), Take::OnDemand));
        assert!(matches!(c.take("HOT", 500, t, 0), Take::OnDemand));
        let l = c.levels(t);
        let hot = l.iter().find(|l| l.product == "HOT").unwrap();
        assert_eq!((hot.hits, hot.misses, hot.cached), (2, 1, 0));
    }

    #[test]
    fn refill_is_due_under_low_once_at_a_time_and_fills_to_low_when_cold() {
        let t = Instant::now();
        let mut c = cache(t);
        let mut due = c.due(t);
        due.sort();
        assert_eq!(due, vec![("COLD".into(), 100, 5), ("HOT".into(), 100, 10)]);
        assert!(c.due(t).is_empty(), "refills in progress are not asked twice");
        c.put(pins("HOT", 100, 0..10));
        assert!(!c.refilled("HOT", 100, true), "at low: no refill again");
        assert!(c.due(t).is_empty(), "at low: nothing due");
        c.take("HOT", 100, t, 0);
        assert_eq!(c.due(t), vec![("HOT".into(), 100, 1)]);
    }

    #[test]
    fn a_full_refill_still_under_the_mark_asks_again_at_once_a_partial_or_failed_one_does_not() {
        let t = Instant::now();
        let mut c = cache(t);
        let _ = c.due(t);
        // COLD asked for 5 and got 3 (the server ran low): not again at once, even though still under its mark.
        c.put(pins("COLD", 100, 0..3));
        assert!(!c.refilled("COLD", 100, false));
        // HOT got everything it asked for but is still under its mark (the mark grew while it was out): again.
        c.put(pins("HOT", 100, 0..4));
        assert!(c.refilled("HOT", 100, true));
        // The next refill of HOT is due now; COLD's too, but its loop waits for the next tick to ask.
        let mut due = c.due(t);
        due.sort();
        assert_eq!(due, vec![("COLD".into(), 100, 2), ("HOT".into(), 100, 6)]);
        // A failed refill (nothing came) never asks again at once.
        assert!(!c.refilled("HOT", 100, false));
        // Unknown slots (a reload removed it while the refill was out): nothing to do.
        assert!(!c.refilled("GONE", 100, true));
    }

    #[test]
    fn a_hot_product_holds_more_and_cools_down_to_low() {
        let mut t = Instant::now();
        let mut c = cache(t);
        c.put(pins("HOT", 100, 0..100_000));
        // 200 sales a second for 20 seconds.
        for _ in 0..20 {
            for i in 0..200 {
                c.take("HOT", 100, t + Duration::from_millis(i * 5), 0);
            }
            t += Duration::from_secs(1);
        }
        let l = c.levels(t);
        let hot = l.iter().find(|l| l.product == "HOT").unwrap();
        assert!(hot.rate_per_sec > 190.0, "{hot:?}");
        assert_eq!(hot.target, 2000, "rate × 30 s, capped at high");
        let cold = l.iter().find(|l| l.product == "COLD").unwrap();
        assert_eq!(cold.target, 5);
        // Empty the hot slot but for 300: under rate × lead (400), so due; the target wants 1700 more, one
        // reserve brings at most MAX_RESERVE.
        c.drain();
        c.put(pins("HOT", 100, 0..300));
        assert!(c.due(t).iter().any(|(p, _, n)| p == "HOT" && *n == MAX_RESERVE));
        c.refilled("HOT", 100, true);
        // Quiet for two minutes: the rate decays, the target falls back to low.
        t += Duration::from_secs(120);
        let l = c.levels(t);
        assert_eq!(l.iter().find(|l| l.product == "HOT").unwrap().target, 10);
    }

    #[test]
    fn a_burst_is_seen_within_its_first_second() {
        let t = Instant::now();
        let mut c = cache(t);
        c.put(pins("HOT", 100, 0..150));
        for i in 0..100 {
            c.take("HOT", 100, t + Duration::from_millis(i), 0);
        }
        // 100 sales in 0.1 s: 1,000/s now, though the smoothed rate has not seen a whole window yet.
        let due = c.due(t + Duration::from_millis(100));
        assert!(due.iter().any(|(p, _, n)| p == "HOT" && *n == MAX_RESERVE), "{due:?}");
    }

    #[test]
    fn pins_whose_lease_is_ending_are_set_aside_not_sold() {
        let t = Instant::now();
        let mut c = cache(t);
        c.put(pins("HOT", 100, 0..5)); // leases end at 1000..1004
        assert!(matches!(c.take("HOT", 100, t, 1003), Take::Hit(p) if p.pin.pin_id == 3));
        assert_eq!(
            c.take_stale().iter().map(|p| p.pin.pin_id).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(c.take_stale().is_empty());
    }

    #[test]
    fn leases_close_to_their_end_are_listed_and_renewed() {
        let t = Instant::now();
        let mut c = cache(t);
        c.put(pins("HOT", 100, 0..5));
        assert_eq!(c.expiring(1003), vec![0, 1, 2]);
        c.renewed(&[0, 1], 5000);
        assert_eq!(c.expiring(1003), vec![2]);
    }
}
