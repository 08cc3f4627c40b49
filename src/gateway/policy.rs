//! Fraud controls that bound what a dishonest merchant can take (issue 20, §4 and §5): the `[policy]` table of the
//! gateway's configuration, and reversal rates per merchant and terminal for the metrics endpoint (a `Collector`).
//!
//! The rules themselves are decided without I/O in the controller (`controller::decide_reversal`, with the time as
//! an input); this module only holds their configuration and their counters.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Deserialize;

use crate::metrics::write_family;

/// `[policy]` in the gateway's configuration (every key optional).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicySection {
    /// A terminal's reversal (0400/0420) is accepted only this long after its sale; later it gets `21` and the PIN
    /// stays sold. Absent: no window (every reversal is accepted, as before).
    reversal_window_secs: Option<u64>,
    /// Limits kept by this gateway (`super::limits`): sales per minute of one terminal, of one merchant (all its
    /// terminals on this gateway); value per UTC day in minor units, by currency (`{ "978" = 100000 }`).
    terminal_sales_per_minute: Option<u64>,
    merchant_sales_per_minute: Option<u64>,
    #[serde(default)]
    terminal_value_per_day: std::collections::HashMap<String, u64>,
    #[serde(default)]
    merchant_value_per_day: std::collections::HashMap<String, u64>,
    /// Merchants' limits kept by the PIN server (`pingate limits set`): by currency, the slice of a merchant's value
    /// per day to ask for at a time (`{ "978" = 10000 }`), and what may be sold beyond the allowance per merchant
    /// and day when the server cannot be asked (0 by default).
    #[serde(default)]
    merchant_allowance: std::collections::HashMap<String, u64>,
    #[serde(default)]
    merchant_allowance_margin: std::collections::HashMap<String, u64>,
    /// Merchants' sales per minute kept by the PIN server (`pingate limits set --sales-per-minute`): the sales to
    /// ask for at a time, and what may be sold beyond them per merchant and minute when the server cannot be asked
    /// (0 by default).
    merchant_sales_allowance: Option<u64>,
    merchant_sales_allowance_margin: Option<u64>,
}

/// The fraud controls, read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// See [`PolicySection`]: `None`, no window.
    pub reversal_window: Option<Duration>,
    /// Sales per minute and value per day, per terminal and per merchant.
    pub limits: super::limits::LimitsConfig,
    /// Currency → (slice asked of the PIN server, margin without it) for merchants' limits across gateways.
    pub allowances: std::collections::HashMap<String, (u64, u64)>,
    /// (Sales asked of the PIN server at a time, margin a minute without it) for merchants' sales per minute across
    /// gateways; `None`: not asked.
    pub sales_allowance: Option<(u32, u32)>,
}

/// The reversal window's range (seconds): from a minute (a terminal's reversal follows its timeout at once) to a
/// week.
pub(super) const REVERSAL_WINDOW_RANGE: (u64, u64) = (60, 604_800);

impl PolicySection {
    /// The checked configuration, or the problems (`at`, `reason`), each with its key.
    pub(super) fn read(&self) -> Result<PolicyConfig, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let (lo, hi) = REVERSAL_WINDOW_RANGE;
        if let Some(v) = self.reversal_window_secs {
            if !(lo..=hi).contains(&v) {
                problems.push(("policy.reversal_window_secs".into(), format!("must be {lo} to {hi}")));
            }
        }
        for (at, v) in [
            ("policy.terminal_sales_per_minute", self.terminal_sales_per_minute),
            ("policy.merchant_sales_per_minute", self.merchant_sales_per_minute),
        ] {
            if v.is_some_and(|v| !(1..=100_000).contains(&v)) {
                problems.push((at.into(), "must be 1 to 100000".into()));
            }
        }
        for c in self.merchant_allowance_margin.keys() {
            if !self.merchant_allowance.contains_key(c) {
                problems.push((
                    format!("policy.merchant_allowance_margin.{c}"),
                    "a margin without a merchant_allowance in that currency".into(),
                ));
            }
        }
        let max = u64::from(crate::psp::MAX_SALES_SLICE);
        if self.merchant_sales_allowance.is_some_and(|v| !(1..=max).contains(&v)) {
            problems.push(("policy.merchant_sales_allowance".into(), format!("must be 1 to {max}")));
        }
        match self.merchant_sales_allowance_margin {
            Some(v) if v > max => {
                problems.push((
                    "policy.merchant_sales_allowance_margin".into(),
                    format!("must be 0 to {max}"),
                ));
            }
            Some(_) if self.merchant_sales_allowance.is_none() => problems.push((
                "policy.merchant_sales_allowance_margin".into(),
                "a margin without a merchant_sales_allowance".into(),
            )),
            _ => {}
        }
        let margins: std::collections::HashMap<String, u64> = self
            .merchant_allowance_margin
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(c, v)| (c.clone(), *v))
            .collect();
        for (at, m) in [
            ("policy.terminal_value_per_day", &self.terminal_value_per_day),
            ("policy.merchant_value_per_day", &self.merchant_value_per_day),
            ("policy.merchant_allowance", &self.merchant_allowance),
            ("policy.merchant_allowance_margin", &margins),
        ] {
            for (currency, v) in m {
                if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_digit()) {
                    problems.push((
                        format!("{at}.{currency}"),
                        "the currency must be ISO 4217 numeric (3 digits)".into(),
                    ));
                } else if !(1..=1_000_000_000_000).contains(v) {
                    problems.push((format!("{at}.{currency}"), "must be 1 to 1000000000000".into()));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(PolicyConfig {
            reversal_window: self.reversal_window_secs.map(Duration::from_secs),
            limits: super::limits::LimitsConfig {
                terminal_sales_per_minute: self.terminal_sales_per_minute.map(|v| v as u32),
                merchant_sales_per_minute: self.merchant_sales_per_minute.map(|v| v as u32),
                terminal_value_per_day: self.terminal_value_per_day.clone(),
                merchant_value_per_day: self.merchant_value_per_day.clone(),
            },
            allowances: self
                .merchant_allowance
                .iter()
                .map(|(c, v)| {
                    (
                        c.clone(),
                        (*v, self.merchant_allowance_margin.get(c).copied().unwrap_or(0)),
                    )
                })
                .collect(),
            // Both checked above to fit `MAX_SALES_SLICE`.
            sales_allowance: self
                .merchant_sales_allowance
                .map(|v| (v as u32, self.merchant_sales_allowance_margin.unwrap_or(0) as u32)),
        })
    }
}

/// How many terminals the metrics show by name: the ones with the most reversals. A gateway may serve thousands
/// of terminals (5,000 is the sizing of the store's indexes); a series per terminal and counter would make every
/// scrape as big as the registry, so only the top ones are named, and every merchant (far fewer) is.
pub const TOP_TERMINALS: usize = 20;

/// Sales and reversals by merchant and by terminal, since start. Only requests from terminals of the registry are
/// counted (an unknown terminal is refused before), so both maps are bounded by the registry.
#[derive(Debug, Default)]
pub struct ReversalRates {
    inner: Mutex<Rates>,
}

#[derive(Debug, Default)]
struct Rates {
    /// merchant → (sales, reversals)
    merchants: HashMap<String, (u64, u64)>,
    /// terminal → (merchant, sales, reversals)
    terminals: HashMap<String, (String, u64, u64)>,
}

impl ReversalRates {
    /// A new sale approved (not a repeat).
    pub fn sale(&self, terminal: &str, merchant: &str) {
        self.add(terminal, merchant, 1, 0);
    }

    /// A terminal's reversal accepted.
    pub fn reversal(&self, terminal: &str, merchant: &str) {
        self.add(terminal, merchant, 0, 1);
    }

    fn add(&self, terminal: &str, merchant: &str, sales: u64, reversals: u64) {
        let mut r = self.inner.lock().expect("not poisoned");
        match r.merchants.get_mut(merchant) {
            Some(m) => {
                m.0 += sales;
                m.1 += reversals;
            }
            None => {
                r.merchants.insert(merchant.to_string(), (sales, reversals));
            }
        }
        match r.terminals.get_mut(terminal) {
            Some(t) => {
                t.1 += sales;
                t.2 += reversals;
            }
            None => {
                r.terminals
                    .insert(terminal.to_string(), (merchant.to_string(), sales, reversals));
            }
        }
    }

    /// Per merchant `(merchant, sales, reversals)`, sorted; and the [`TOP_TERMINALS`] terminals with the most
    /// reversals `(terminal, merchant, sales, reversals)`, most first.
    #[allow(clippy::type_complexity)]
    pub fn snapshot(&self) -> (Vec<(String, u64, u64)>, Vec<(String, String, u64, u64)>) {
        let r = self.inner.lock().expect("not poisoned");
        let mut merchants: Vec<_> = r.merchants.iter().map(|(m, (s, v))| (m.clone(), *s, *v)).collect();
        merchants.sort();
        let mut terminals: Vec<_> = r
            .terminals
            .iter()
            .filter(|(_, (_, _, v))| *v > 0)
            .map(|(t, (m, s, v))| (t.clone(), m.clone(), *s, *v))
            .collect();
        terminals.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| a.0.cmp(&b.0)));
        terminals.truncate(TOP_TERMINALS);
        (merchants, terminals)
    }
}

/// The metrics: per merchant, sales and reversals (their ratio is the merchant's reversal rate); for the top
/// terminals, the same.
impl prometheus_client::collector::Collector for ReversalRates {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (merchants, terminals) = self.snapshot();
        write_family(
            &mut e,
            "pingate_gateway_merchant_sales",
            "New sales approved, by merchant (with reversals: the merchant's reversal rate).",
            merchants
                .iter()
                .map(|(m, s, _)| ([("merchant", m)], ConstCounter::new(*s))),
        )?;
        write_family(
            &mut e,
            "pingate_gateway_merchant_reversals",
            "Terminal reversals accepted, by merchant.",
            merchants
                .iter()
                .map(|(m, _, v)| ([("merchant", m)], ConstCounter::new(*v))),
        )?;
        let gauge = |n: u64| ConstGauge::new(n);
        write_family(
            &mut e,
            "pingate_gateway_top_terminal_reversals",
            "Terminal reversals accepted, for the terminals with the most of them (at most 20 terminals).",
            terminals
                .iter()
                .map(|(t, m, _, v)| ([("terminal", t), ("merchant", m)], gauge(*v))),
        )?;
        write_family(
            &mut e,
            "pingate_gateway_top_terminal_sales",
            "New sales approved, for the same terminals as pingate_gateway_top_terminal_reversals.",
            terminals
                .iter()
                .map(|(t, m, s, _)| ([("terminal", t), ("merchant", m)], gauge(*s))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_has_a_range_and_is_off_by_default() {
        assert_eq!(PolicySection::default().read().unwrap().reversal_window, None);
        let s = |v| PolicySection {
            reversal_window_secs: Some(v),
            ..PolicySection::default()
        };
        assert_eq!(s(900).read().unwrap().reversal_window, Some(Duration::from_secs(900)));
        for bad in [0, 59, 604_801] {
            let e = s(bad).read().unwrap_err();
            assert_eq!(e[0].0, "policy.reversal_window_secs");
        }
    }

    #[test]
    fn the_sales_allowance_has_a_range_and_its_margin_needs_it() {
        let s = |slice, margin| PolicySection {
            merchant_sales_allowance: slice,
            merchant_sales_allowance_margin: margin,
            ..PolicySection::default()
        };
        assert_eq!(PolicySection::default().read().unwrap().sales_allowance, None);
        assert_eq!(s(Some(5), None).read().unwrap().sales_allowance, Some((5, 0)));
        assert_eq!(s(Some(5), Some(0)).read().unwrap().sales_allowance, Some((5, 0)));
        assert_eq!(s(Some(5), Some(3)).read().unwrap().sales_allowance, Some((5, 3)));
        for (slice, margin, key) in [
            (Some(0), None, "policy.merchant_sales_allowance"),
            (Some(100_001), None, "policy.merchant_sales_allowance"),
            (Some(5), Some(100_001), "policy.merchant_sales_allowance_margin"),
            (None, Some(1), "policy.merchant_sales_allowance_margin"),
        ] {
            let e = s(slice, margin).read().unwrap_err();
            assert_eq!(e[0].0, key, "{slice:?} {margin:?}");
        }
    }

    #[test]
    fn rates_name_every_merchant_and_only_the_top_terminals() {
        let r = ReversalRates::default();
        for i in 0..50 {
            let t = format!("T{i:03}");
            r.sale(&t, "M1");
            for _ in 0..(i % 7) {
                r.reversal(&t, "M1");
            }
        }
        r.sale("X1", "M2");
        let (m, t) = r.snapshot();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, "M1");
        assert_eq!(m[0].1, 50);
        assert_eq!(t.len(), TOP_TERMINALS);
        assert!(t.iter().all(|x| x.3 >= 4) && t[0].3 == 6, "{t:?}");
        let mut registry = crate::metrics::Registry::default();
        registry.register_collector(Box::new(r));
        let text = crate::metrics::exposition(&registry);
        assert!(
            text.contains("pingate_gateway_merchant_reversals_total{merchant=\"M2\"} 0"),
            "{text}"
        );
    }
}
