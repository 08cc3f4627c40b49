//! Limits that bound a loss (issue 20, §4), kept by this gateway, without I/O: the time goes in as seconds since
//! the epoch. Per terminal and per merchant: sales per minute (a sliding 60-second window; past it `65`, "exceeds
//! withdrawal frequency limit") and value per UTC day in each currency (past it `61`, "exceeds withdrawal amount
//! limit"). A sale is admitted before a PIN is asked for, and handed back ([`Limits::refund`]) when it ends without
//! one, so that declines do not use up a limit.
//!
//! Only terminals of the registry get here (an unknown one is refused before), so the maps are bounded by the
//! registry. A merchant served by several gateways is limited by each gateway on its own here; its limits across
//! gateways are the PIN server's to keep, which this gateway sells from in slices: [`Allowances`] (value per day) and
//! [`SalesAllowances`] (sales per minute).

use std::collections::{HashMap, VecDeque};

use crate::sale::ResponseCode;

/// The limits (each `None` or absent: no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsConfig {
    pub terminal_sales_per_minute: Option<u32>,
    pub merchant_sales_per_minute: Option<u32>,
    /// Currency (ISO 4217 numeric) → most value (minor units) per UTC day.
    pub terminal_value_per_day: HashMap<String, u64>,
    pub merchant_value_per_day: HashMap<String, u64>,
}

impl LimitsConfig {
    pub fn any(&self) -> bool {
        self.terminal_sales_per_minute.is_some()
            || self.merchant_sales_per_minute.is_some()
            || !self.terminal_value_per_day.is_empty()
            || !self.merchant_value_per_day.is_empty()
    }
}

/// What one terminal or merchant has used.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Times of the sales admitted in the last 60 seconds (at most the per-minute limit of them).
    recent: VecDeque<i64>,
    /// The UTC day (`unix / 86400`) `value` counts.
    day: i64,
    /// Currency → value admitted on `day`.
    value: HashMap<String, u64>,
}

impl Usage {
    fn roll(&mut self, now: i64) {
        while self.recent.front().is_some_and(|t| *t <= now - 60) {
            self.recent.pop_front();
        }
        let day = now.div_euclid(86_400);
        if day != self.day {
            self.day = day;
            self.value.clear();
        }
    }

    /// The value admitted today in `currency`.
    pub fn value_today(&self, currency: &str) -> u64 {
        self.value.get(currency).copied().unwrap_or(0)
    }

    /// The sales admitted in the last 60 seconds.
    pub fn sales_last_minute(&self) -> usize {
        self.recent.len()
    }

    fn refusal(&self, per_minute: Option<u32>, per_day: Option<u64>, currency: &str, amount: u64) -> Option<Refusal> {
        if per_day.is_some_and(|max| self.value_today(currency).saturating_add(amount) > max) {
            return Some(Refusal::Amount);
        }
        if per_minute.is_some_and(|max| self.recent.len() >= max as usize) {
            return Some(Refusal::Frequency);
        }
        None
    }
}

/// Why a sale is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Value per day: `61`.
    Amount,
    /// Sales per minute: `65`.
    Frequency,
}

impl Refusal {
    pub fn code(self) -> ResponseCode {
        match self {
            Refusal::Amount => ResponseCode::ExceedsAmountLimit,
            Refusal::Frequency => ResponseCode::ExceedsFrequencyLimit,
        }
    }
}

/// A refusal and whose limit it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    /// `true`: the merchant's limit; `false`: the terminal's.
    pub merchant: bool,
}

/// Usage by terminal and by merchant.
#[derive(Debug, Default)]
pub struct Limits {
    pub cfg: LimitsConfig,
    terminals: HashMap<String, Usage>,
    merchants: HashMap<String, Usage>,
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Limits {
        Limits {
            cfg,
            ..Limits::default()
        }
    }

    /// Admits a sale of `amount` in `currency` by `terminal` of `merchant` at `now` (seconds since the epoch), or
    /// says which limit it would pass (the terminal's before the merchant's; value before frequency). An admitted
    /// sale counts at once.
    pub fn admit(
        &mut self,
        terminal: &str,
        merchant: &str,
        currency: &str,
        amount: u64,
        now: i64,
    ) -> Result<(), Refused> {
        let t = self.terminals.entry(terminal.to_string()).or_default();
        t.roll(now);
        if let Some(r) = t.refusal(
            self.cfg.terminal_sales_per_minute,
            self.cfg.terminal_value_per_day.get(currency).copied(),
            currency,
            amount,
        ) {
            return Err(Refused {
                refusal: r,
                merchant: false,
            });
        }
        let m = self.merchants.entry(merchant.to_string()).or_default();
        m.roll(now);
        if let Some(r) = m.refusal(
            self.cfg.merchant_sales_per_minute,
            self.cfg.merchant_value_per_day.get(currency).copied(),
            currency,
            amount,
        ) {
            return Err(Refused {
                refusal: r,
                merchant: true,
            });
        }
        for u in [
            self.terminals.get_mut(terminal).expect("entered"),
            self.merchants.get_mut(merchant).expect("entered"),
        ] {
            u.recent.push_back(now);
            *u.value.entry(currency.to_string()).or_default() += amount;
        }
        Ok(())
    }

    /// A sale admitted at `at` ended without a PIN: it no longer counts.
    pub fn refund(&mut self, terminal: &str, merchant: &str, currency: &str, amount: u64, at: i64) {
        for u in [self.terminals.get_mut(terminal), self.merchants.get_mut(merchant)]
            .into_iter()
            .flatten()
        {
            if let Some(i) = u.recent.iter().rposition(|t| *t == at) {
                u.recent.remove(i);
            }
            if u.day == at.div_euclid(86_400) {
                if let Some(v) = u.value.get_mut(currency) {
                    *v = v.saturating_sub(amount);
                }
            }
        }
    }

    /// Each merchant's usage as of `now`: `(merchant, sales in the last minute, [(currency, value today)])`, sorted.
    #[allow(clippy::type_complexity)]
    pub fn merchant_usage(&mut self, now: i64) -> Vec<(String, usize, Vec<(String, u64)>)> {
        let mut out: Vec<_> = self
            .merchants
            .iter_mut()
            .map(|(m, u)| {
                u.roll(now);
                let mut v: Vec<(String, u64)> = u.value.iter().map(|(c, v)| (c.clone(), *v)).collect();
                v.sort();
                (m.clone(), u.sales_last_minute(), v)
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-12-01 12:00:00 UTC.
    const NOW: i64 = 1_764_590_400;

    fn limits() -> Limits {
        Limits::new(LimitsConfig {
            terminal_sales_per_minute: Some(3),
            merchant_sales_per_minute: Some(5),
            terminal_value_per_day: HashMap::from([("978".to_string(), 10_000)]),
            merchant_value_per_day: HashMap::from([("978".to_string(), 12_000)]),
        })
    }

    fn refused(refusal: Refusal, merchant: bool) -> Result<(), Refused> {
        Err(Refused { refusal, merchant })
    }

    #[test]
    fn sales_per_minute_slide_with_the_time() {
        let mut l = limits();
        for i in 0..3 {
            assert_eq!(l.admit("T1", "M1", "978", 100, NOW + i), Ok(()));
        }
        // The fourth within 60 s of the first: 65.
        assert_eq!(
            l.admit("T1", "M1", "978", 100, NOW + 59),
            refused(Refusal::Frequency, false)
        );
        assert_eq!(Refusal::Frequency.code().code(), "65");
        // 60 s after the first, it has left the window: one more fits, not two.
        assert_eq!(l.admit("T1", "M1", "978", 100, NOW + 60), Ok(()));
        assert_eq!(
            l.admit("T1", "M1", "978", 100, NOW + 60),
            refused(Refusal::Frequency, false)
        );
        // At NOW + 61 the merchant has 2 in its window (NOW + 2, NOW + 60): its 5 a minute hold across its
        // terminals, each within its own 3.
        assert_eq!(l.admit("T2", "M1", "978", 100, NOW + 61), Ok(()));
        assert_eq!(l.admit("T2", "M1", "978", 100, NOW + 61), Ok(()));
        assert_eq!(l.admit("T3", "M1", "978", 100, NOW + 61), Ok(()));
        assert_eq!(
            l.admit("T3", "M1", "978", 100, NOW + 61),
            refused(Refusal::Frequency, true)
        );
        // Another merchant is not touched.
        assert_eq!(l.admit("T4", "M2", "978", 100, NOW + 61), Ok(()));
    }

    #[test]
    fn value_per_day_per_currency_resets_at_midnight_utc() {
        let mut l = limits();
        assert_eq!(l.admit("T1", "M1", "978", 6_000, NOW), Ok(()));
        assert_eq!(
            l.admit("T1", "M1", "978", 4_000, NOW + 100),
            Ok(()),
            "up to the limit itself"
        );
        assert_eq!(
            l.admit("T1", "M1", "978", 1, NOW + 200),
            refused(Refusal::Amount, false)
        );
        assert_eq!(Refusal::Amount.code().code(), "61");
        // Another currency has no limit here.
        assert_eq!(l.admit("T1", "M1", "840", 50_000, NOW + 300), Ok(()));
        // The merchant's 12,000 a day across its terminals.
        assert_eq!(l.admit("T2", "M1", "978", 2_000, NOW + 400), Ok(()));
        assert_eq!(l.admit("T2", "M1", "978", 1, NOW + 500), refused(Refusal::Amount, true));
        // The next UTC day: all of it again.
        let midnight = (NOW / 86_400 + 1) * 86_400;
        assert_eq!(
            l.admit("T1", "M1", "978", 1, midnight - 1),
            refused(Refusal::Amount, false)
        );
        assert_eq!(l.admit("T1", "M1", "978", 10_000, midnight), Ok(()));
        let usage = l.merchant_usage(midnight);
        assert_eq!(usage, vec![("M1".to_string(), 1, vec![("978".to_string(), 10_000)])]);
    }

    #[test]
    fn a_sale_that_ends_without_a_pin_is_handed_back() {
        let mut l = limits();
        for i in 0..3 {
            assert_eq!(l.admit("T1", "M1", "978", 3_000, NOW + i), Ok(()));
        }
        assert_eq!(
            l.admit("T1", "M1", "978", 1_000, NOW + 3),
            refused(Refusal::Frequency, false)
        );
        l.refund("T1", "M1", "978", 3_000, NOW + 2);
        assert_eq!(l.admit("T1", "M1", "978", 1_000, NOW + 3), Ok(()));
        // 3,000 + 3,000 + 1,000 used: 3,000 more fits, not 3,001.
        assert_eq!(l.admit("T9", "M9", "978", 0, NOW + 4), Ok(()));
        assert_eq!(
            l.admit("T1", "M1", "978", 3_001, NOW + 70),
            refused(Refusal::Amount, false)
        );
        assert_eq!(l.admit("T1", "M1", "978", 3_000, NOW + 70), Ok(()));
    }

    #[test]
    fn no_limits_admit_everything() {
        let mut l = Limits::default();
        assert!(!l.cfg.any());
        for i in 0..1000 {
            assert_eq!(l.admit("T1", "M1", "978", 1_000_000, NOW + i / 100), Ok(()));
        }
    }
}

/// Merchants' limits kept by the PIN server across every gateway: this gateway sells from an allowance, a slice of
/// the merchant's value per day in a currency that the server granted it (`allowance` in PSP), and asks for the next
/// slice only when a sale does not fit what is left (one round trip per slice, not per sale). The server never grants
/// past the limit, so the merchant never exceeds it through allowances; what a gateway holds unused at the end of the
/// day is lost (the merchant may sell up to one slice per gateway less than its limit). When the server cannot be
/// asked, a gateway may sell up to `margin` more per merchant and day on its own: across N gateways the limit is
/// exceeded by at most N × margin (0 by default: never). Without I/O; the time goes in.
#[derive(Debug, Default)]
pub struct Allowances {
    /// Currency → the slice to ask for (and the margin when the server cannot be asked).
    pub slices: HashMap<String, (u64, u64)>,
    held: HashMap<(String, String), Held>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    day: i64,
    left: u64,
    offline: u64,
}

/// What [`Allowances::take`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// The currency is not limited by the server: nothing to do.
    Unmanaged,
    /// Taken from the allowance.
    Taken,
    /// Not enough left: ask the server for this much, then [`Allowances::add`] and take again.
    Ask(u64),
}

impl Allowances {
    pub fn new(slices: HashMap<String, (u64, u64)>) -> Allowances {
        Allowances {
            slices,
            held: HashMap::new(),
        }
    }

    fn held(&mut self, merchant: &str, currency: &str, now: i64) -> &mut Held {
        let day = now.div_euclid(86_400);
        let h = self
            .held
            .entry((merchant.to_string(), currency.to_string()))
            .or_default();
        if h.day != day {
            *h = Held {
                day,
                left: 0,
                offline: 0,
            };
        }
        h
    }

    pub fn take(&mut self, merchant: &str, currency: &str, amount: u64, now: i64) -> Take {
        let Some(&(slice, _)) = self.slices.get(currency) else {
            return Take::Unmanaged;
        };
        let h = self.held(merchant, currency, now);
        if h.left >= amount {
            h.left -= amount;
            Take::Taken
        } else {
            Take::Ask(slice.max(amount - h.left))
        }
    }

    /// What the server granted.
    pub fn add(&mut self, merchant: &str, currency: &str, granted: u64, now: i64) {
        self.held(merchant, currency, now).left += granted;
    }

    /// The server could not be asked: taken from the margin if it fits.
    pub fn take_offline(&mut self, merchant: &str, currency: &str, amount: u64, now: i64) -> bool {
        let margin = self.slices.get(currency).map_or(0, |s| s.1);
        let h = self.held(merchant, currency, now);
        if h.offline + amount <= margin {
            h.offline += amount;
            true
        } else {
            false
        }
    }

    /// A sale taken at `at` ended without a PIN: its value goes back to the allowance (the same day only).
    pub fn give_back(&mut self, merchant: &str, currency: &str, amount: u64, at: i64) {
        if self.slices.contains_key(currency) {
            let h = self.held(merchant, currency, at);
            if h.day == at.div_euclid(86_400) {
                h.left += amount;
            }
        }
    }

    /// Allowance left by merchant and currency today, sorted.
    pub fn left(&mut self, now: i64) -> Vec<(String, String, u64)> {
        let day = now.div_euclid(86_400);
        let mut v: Vec<_> = self
            .held
            .iter()
            .filter(|(_, h)| h.day == day)
            .map(|((m, c), h)| (m.clone(), c.clone(), h.left))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod allowance_tests {
    use super::*;

    const NOW: i64 = 1_764_590_400;

    #[test]
    fn sales_come_out_of_the_allowance_and_a_new_slice_is_asked_only_when_one_does_not_fit() {
        let mut a = Allowances::new(HashMap::from([("978".to_string(), (5_000, 0))]));
        assert_eq!(a.take("M1", "840", 100, NOW), Take::Unmanaged);
        assert_eq!(a.take("M1", "978", 2_500, NOW), Take::Ask(5_000));
        a.add("M1", "978", 5_000, NOW);
        assert_eq!(a.take("M1", "978", 2_500, NOW), Take::Taken);
        assert_eq!(a.take("M1", "978", 2_500, NOW + 1), Take::Taken);
        assert_eq!(a.take("M1", "978", 2_500, NOW + 2), Take::Ask(5_000));
        // The server had only 1,000 left: not enough; the sale is refused (61) by the caller, the 1,000 kept.
        a.add("M1", "978", 1_000, NOW + 2);
        assert_eq!(a.take("M1", "978", 2_500, NOW + 2), Take::Ask(5_000));
        assert_eq!(a.take("M1", "978", 1_000, NOW + 2), Take::Taken);
        // A larger sale than a slice asks for what it needs.
        assert_eq!(a.take("M1", "978", 7_000, NOW + 3), Take::Ask(7_000));
        // Given back when a sale ends without a PIN; a new UTC day starts with nothing.
        a.give_back("M1", "978", 1_000, NOW + 2);
        assert_eq!(a.left(NOW + 3), vec![("M1".into(), "978".into(), 1_000)]);
        let midnight = (NOW / 86_400 + 1) * 86_400;
        assert_eq!(a.take("M1", "978", 1_000, midnight), Take::Ask(5_000));
    }

    #[test]
    fn without_the_server_only_the_margin_is_sold() {
        let mut a = Allowances::new(HashMap::from([("978".to_string(), (5_000, 3_000))]));
        assert!(a.take_offline("M1", "978", 2_500, NOW));
        assert!(!a.take_offline("M1", "978", 2_500, NOW + 1), "past the margin");
        assert!(a.take_offline("M2", "978", 2_500, NOW + 1), "each merchant its own");
        let mut none = Allowances::new(HashMap::from([("978".to_string(), (5_000, 0))]));
        assert!(!none.take_offline("M1", "978", 1, NOW));
    }
}

/// Merchants' sales per minute kept by the PIN server across every gateway, as [`Allowances`] keeps their value per
/// day: this gateway sells from a count of sales the server granted it (`sales_allowance` in PSP) and asks for the
/// next `slice` only when none is left. The server grants in fixed minutes of its clock and never past the limit;
/// here a count is used within the minute of this gateway's clock it was granted in, and what is left when that
/// minute ends is dropped (the clocks are expected to agree, as NTP keeps them; a count granted late in a server's
/// minute is never carried into the next one here). When the server cannot be asked, a gateway may sell up to
/// `margin` sales per merchant and minute on its own: across N gateways the limit is exceeded by at most N ×
/// margin a minute (0 by default: never). Without I/O; the time goes in.
#[derive(Debug, Default)]
pub struct SalesAllowances {
    /// Sales to ask for at a time.
    pub slice: u32,
    /// Sales per merchant and minute sold without the server.
    pub margin: u32,
    held: HashMap<String, HeldSales>,
}

#[derive(Debug, Default, Clone, Copy)]
struct HeldSales {
    minute: i64,
    left: u32,
    offline: u32,
}

impl SalesAllowances {
    pub fn new(slice: u32, margin: u32) -> SalesAllowances {
        SalesAllowances {
            slice,
            margin,
            held: HashMap::new(),
        }
    }

    fn held(&mut self, merchant: &str, now: i64) -> &mut HeldSales {
        let minute = now.div_euclid(60);
        let h = self.held.entry(merchant.to_string()).or_default();
        if h.minute != minute {
            *h = HeldSales {
                minute,
                left: 0,
                offline: 0,
            };
        }
        h
    }

    /// One sale of `merchant` at `now`: [`Take::Taken`] from what is held, or [`Take::Ask`] the server for a slice
    /// (then [`SalesAllowances::add`] and take again).
    pub fn take(&mut self, merchant: &str, now: i64) -> Take {
        let slice = self.slice;
        let h = self.held(merchant, now);
        if h.left > 0 {
            h.left -= 1;
            Take::Taken
        } else {
            Take::Ask(u64::from(slice.max(1)))
        }
    }

    /// What the server granted, for the minute of `now`.
    pub fn add(&mut self, merchant: &str, granted: u32, now: i64) {
        let h = self.held(merchant, now);
        h.left = h.left.saturating_add(granted);
    }

    /// The server could not be asked: one sale from the margin if it has one left this minute.
    pub fn take_offline(&mut self, merchant: &str, now: i64) -> bool {
        let margin = self.margin;
        let h = self.held(merchant, now);
        if h.offline < margin {
            h.offline += 1;
            true
        } else {
            false
        }
    }

    /// A sale taken at `at` ended without a PIN: it goes back to what is held (within the same minute only; a later
    /// minute started afresh).
    pub fn give_back(&mut self, merchant: &str, at: i64) {
        if let Some(h) = self.held.get_mut(merchant) {
            if h.minute == at.div_euclid(60) {
                h.left = h.left.saturating_add(1);
            }
        }
    }

    /// Sales left by merchant this minute, sorted.
    pub fn left(&self, now: i64) -> Vec<(String, u32)> {
        let minute = now.div_euclid(60);
        let mut v: Vec<_> = self
            .held
            .iter()
            .filter(|(_, h)| h.minute == minute)
            .map(|(m, h)| (m.clone(), h.left))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod sales_allowance_tests {
    use super::*;

    /// 2025-12-01 12:00:00 UTC, the start of a minute.
    const NOW: i64 = 1_764_590_400;

    #[test]
    fn sales_come_out_of_the_count_and_a_slice_is_asked_only_when_none_is_left() {
        let mut a = SalesAllowances::new(2, 0);
        assert_eq!(a.take("M1", NOW), Take::Ask(2));
        a.add("M1", 2, NOW);
        assert_eq!(a.take("M1", NOW + 1), Take::Taken);
        assert_eq!(a.take("M1", NOW + 2), Take::Taken);
        assert_eq!(a.take("M1", NOW + 3), Take::Ask(2));
        // The server had only one left: one sale, then ask again (and the caller answers 65 on a 0).
        a.add("M1", 1, NOW + 3);
        assert_eq!(a.take("M1", NOW + 3), Take::Taken);
        assert_eq!(a.take("M1", NOW + 4), Take::Ask(2));
        a.add("M1", 0, NOW + 4);
        assert_eq!(a.take("M1", NOW + 4), Take::Ask(2));
        // Another merchant holds its own.
        assert_eq!(a.take("M2", NOW + 4), Take::Ask(2));
        assert_eq!(a.left(NOW + 5), vec![("M1".into(), 0), ("M2".into(), 0)]);
    }

    #[test]
    fn a_sale_without_a_pin_is_given_back_and_the_count_ends_with_its_minute() {
        let mut a = SalesAllowances::new(3, 0);
        a.add("M1", 3, NOW + 10);
        assert_eq!(a.take("M1", NOW + 10), Take::Taken);
        a.give_back("M1", NOW + 10);
        assert_eq!(a.left(NOW + 20), vec![("M1".into(), 3)]);
        assert_eq!(a.take("M1", NOW + 59), Take::Taken);
        // The next minute (of this clock): what was left is dropped, never carried over.
        assert_eq!(a.take("M1", NOW + 60), Take::Ask(3));
        assert!(a.left(NOW + 60).iter().all(|(_, n)| *n == 0));
        // A sale of the minute before, given back now, does not add to this minute's count.
        a.give_back("M1", NOW + 59);
        assert_eq!(a.take("M1", NOW + 61), Take::Ask(3));
    }

    #[test]
    fn without_the_server_only_the_margin_is_sold_each_minute() {
        let mut a = SalesAllowances::new(5, 2);
        assert!(a.take_offline("M1", NOW));
        assert!(a.take_offline("M1", NOW + 30));
        assert!(!a.take_offline("M1", NOW + 59), "past the margin");
        assert!(a.take_offline("M2", NOW + 59), "each merchant its own");
        assert!(a.take_offline("M1", NOW + 60), "a new minute");
        let mut none = SalesAllowances::new(5, 0);
        assert!(!none.take_offline("M1", NOW));
    }
}
