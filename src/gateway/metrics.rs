//! What the gateway shows of itself: the counters since start ([`Stats`]), `gateway stock` ([`StockReport`]), and
//! the metrics endpoint's text and readiness.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;
use tokio::time::Instant;

use super::cache::Level;
use super::upstream::ServerHealth;
use super::Gateway;
use crate::metrics::{write_family, write_single, CounterSlots, Described, LatencyHistogram, Registry};
use crate::sale::ResponseCode;

/// Counters since start.
#[derive(Default, Debug, Serialize)]
pub struct Stats {
    /// Refills asked of the PIN server (each a `reserve` of up to a product's target).
    pub refills_started: AtomicU64,
    pub sales_from_cache: AtomicU64,
    pub sales_on_demand: AtomicU64,
    pub declined: AtomicU64,
    pub repeats: AtomicU64,
    pub reversals: AtomicU64,
    pub undelivered: AtomicU64,
    /// Sold PINs handed out again from memory to a repeat of their sale (the server counts those it hands out).
    pub redeliveries: AtomicU64,
    /// Sales of a prefetch product sent to the server because their key may have been sold before (field 7 too far
    /// from the gateway's clock, or older than what the repeat window remembers).
    pub unsure_keys: AtomicU64,
    /// Cache sales whose confirm the server refused for good (a conflict it recorded for the operator).
    pub confirm_conflicts: AtomicU64,
    /// Store-and-forward steps the server refused for good (not retried; logged).
    pub forward_refused: AtomicU64,
    /// Reversals answered 13: they named another product, amount, currency or merchant than their sale.
    pub reversal_mismatches: AtomicU64,
    pub confirms_done: AtomicU64,
    pub forward_failures: AtomicU64,
}

/// `gateway stock`: what the gateway holds and owes.
#[derive(Debug, Serialize)]
pub struct StockReport {
    pub cache: Vec<Level>,
    pub pending_confirms: usize,
    pub pending_reversals: usize,
    pub pending_releases: usize,
    pub servers: Vec<ServerHealth>,
    pub stats: serde_json::Value,
}

/// A request's labels: its message type and the response code it was answered with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    mti: &'static str,
    code: Cow<'static, str>,
}

/// A terminal connection closed by the gateway: on which listener, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    listener: String,
    reason: &'static str,
}

/// Why a request was refused (a fixed word).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// A sale refused for a limit: whose and which.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    scope: &'static str,
    kind: &'static str,
}

/// The message types counted by name; any other is `other` (a terminal sending made-up MTIs must not grow the
/// metrics), and a frame that did not decode is `unreadable`.
const MTIS: [&str; 9] = [
    "0200",
    "0201",
    "0400",
    "0401",
    "0420",
    "0421",
    "0800",
    "other",
    "unreadable",
];
/// The response codes with a slot: the contract's, then `none` (a frame not answered) and `other`.
const CODES: usize = ResponseCode::ALL.len() + 2;

/// Counters and timings the metrics endpoint shows beside [`Stats`] and [`StockReport`], and the registry that
/// holds them: one per gateway.
pub(super) struct GatewayMetrics {
    /// By message type and response code.
    requests: CounterSlots<RequestLabels>,
    pub(super) latency: LatencyHistogram,
    /// Terminal connections the gateway closed, by listener and reason.
    connections_closed: Family<ClosedLabels, Counter>,
    /// Requests refused for their MAC (63), by reason.
    mac_refused: Family<ReasonLabels, Counter>,
    /// Sales and accepted reversals by merchant and by terminal (`policy`).
    pub(super) reversal_rates: Arc<super::policy::ReversalRates>,
    /// Terminal reversals answered 21: after the reversal window.
    pub(super) reversals_too_late: Counter,
    /// Sales refused for a limit (61, 65), by whose limit (`terminal`, `merchant`: this gateway's;
    /// `merchant_all_gateways`: kept by the PIN server) and which (`amount`, `frequency`).
    limit_refusals: Family<LimitLabels, Counter>,
    /// Requests refused for where they came from (certificate, source network, caller's number), by reason.
    origin_refused: Family<ReasonLabels, Counter>,
    registry: Registry,
}

impl GatewayMetrics {
    /// The metrics of `gateway` (the one being made: its levels and queues are read at scrape time through it).
    pub(super) fn new(gateway: Weak<Gateway>) -> GatewayMetrics {
        let mut r = Registry::default();
        let (requests, latency) = crate::metrics::request_metrics(
            &mut r,
            "pingate_gateway",
            "Terminal requests by message type and response code.",
            "Time from a request's arrival to its answer.",
            MTIS.len() * CODES,
        );
        let reversal_rates = Arc::new(super::policy::ReversalRates::default());
        let (connections_closed, mac_refused) = (Family::default(), Family::default());
        let (limit_refusals, origin_refused) = (Family::default(), Family::default());
        let reversals_too_late = Counter::default();
        r.register(
            "pingate_gateway_terminal_connections_closed",
            "Terminal connections closed by the gateway, by listener and reason: no_first_frame (nothing within \
             first_frame_timeout_ms), slow_sender, connection_cap, source_cap, source_not_allowed (outside the \
             listener's allow list), tls_handshake (failed), tls_handshake_timeout (not done within \
             first_frame_timeout_ms).",
            Described(connections_closed.clone()),
        );
        r.register_collector(Box::new(reversal_rates.clone()));
        r.register(
            "pingate_gateway_limit_refusals",
            "Sales refused for a limit: 61 (amount: value per day) or 65 (frequency: sales per minute), by scope \
             (terminal, merchant: this gateway's; merchant_all_gateways: kept by the PIN server).",
            Described(limit_refusals.clone()),
        );
        r.register(
            "pingate_gateway_reversals_too_late",
            "Terminal reversals answered 21 (after the reversal window): not reversed, the PIN stays sold.",
            reversals_too_late.clone(),
        );
        r.register(
            "pingate_gateway_mac_refused",
            "Requests answered 63 on listeners and lines that require MACs, by reason: missing, mismatch, no_key, \
             no_terminal, wrong_algorithm, unsupported, locked.",
            Described(mac_refused.clone()),
        );
        r.register(
            "pingate_gateway_origin_refused",
            "Requests answered 63 for where they came from, by reason: certificate (a client certificate that may not \
             speak for the terminal id), source (a terminal's allow list), caller_id (a terminal's caller_ids), \
             no_terminal.",
            Described(origin_refused.clone()),
        );
        r.register_collector(Box::new(StateCollector(gateway)));
        GatewayMetrics {
            requests,
            latency,
            connections_closed,
            mac_refused,
            reversal_rates,
            reversals_too_late,
            limit_refusals,
            origin_refused,
            registry: r,
        }
    }

    /// A request refused (63) for its MAC, for `reason`.
    pub(super) fn refused_for_mac(&self, reason: &'static str) {
        self.mac_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A request refused (63) for where it came from, for `reason`.
    pub(super) fn refused_for_origin(&self, reason: &'static str) {
        self.origin_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A sale refused for a limit: whose (`scope`) and which (`kind`).
    pub(super) fn refused_for_limit(&self, scope: &'static str, kind: &'static str) {
        self.limit_refusals.get_or_create(&LimitLabels { scope, kind }).inc();
    }

    /// A request answered with `code` (`none`: not answered), by its message type `mti`: one of [`MTIS`], else
    /// counted as `other`.
    pub(super) fn count(&self, mti: &str, code: &str) {
        let m = MTIS.iter().position(|x| *x == mti).unwrap_or(MTIS.len() - 2);
        let (c, code): (Option<usize>, Cow<'static, str>) =
            match ResponseCode::ALL.iter().position(|r| r.code() == code) {
                Some(i) => (Some(i), Cow::Borrowed(ResponseCode::ALL[i].code())),
                None if code == "none" => (Some(CODES - 2), Cow::Borrowed("none")),
                None if code == "other" => (Some(CODES - 1), Cow::Borrowed("other")),
                // A code outside the contract: counted by its name, through the family's lock.
                None => (None, Cow::Owned(code.to_string())),
            };
        let mti = MTIS[m];
        self.requests
            .inc(c.map(|c| m * CODES + c), || RequestLabels { mti, code });
    }
}

/// The gateway's levels, queues and counters read at scrape time: the cache, store-and-forward, PIN servers,
/// journal, serial lines, limits and allowances, locked terminals, and [`Stats`].
#[derive(Debug)]
struct StateCollector(Weak<Gateway>);

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A scrape that outlives its gateway shows nothing more of it.
        match self.0.upgrade() {
            Some(gw) => gw.encode_state(&mut e),
            None => Ok(()),
        }
    }
}

/// A gauge of a count.
fn gauge(v: impl TryInto<i64>) -> ConstGauge {
    ConstGauge::new(v.try_into().unwrap_or(i64::MAX))
}

/// A gauge of a condition: 1 or 0.
fn flag(on: bool) -> ConstGauge {
    ConstGauge::new(i64::from(on))
}

/// The gateway as the metrics endpoint sees it.
pub struct MetricsSource(pub Arc<Gateway>);

impl crate::metrics::Source for MetricsSource {
    fn metrics(&self) -> String {
        self.0.metrics_text()
    }
    fn ready(&self) -> Result<(), String> {
        self.0.readiness()
    }
    fn status(&self) -> String {
        self.0.status_page()
    }
}

impl Gateway {
    /// The metrics endpoint's text (Prometheus exposition format), from the gateway's registry.
    pub fn metrics_text(&self) -> String {
        crate::metrics::exposition(&self.metrics.registry)
    }

    /// What [`StateCollector`] shows.
    fn encode_state(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = crate::clock::unix_now();
        if let Some(a) = &self.allowances {
            let left = a.lock().expect("not poisoned").left(now);
            write_family(
                e,
                "pingate_gateway_merchant_allowance_left",
                "What is left today of the allowance the PIN server granted this gateway, by merchant and currency.",
                left.iter()
                    .map(|(m, c, v)| ([("merchant", m), ("currency", c)], gauge(*v))),
            )?;
        }
        if let Some(a) = &self.sales_allowances {
            let left = a.lock().expect("not poisoned").left(now);
            write_family(
                e,
                "pingate_gateway_merchant_sales_allowance_left",
                "Sales left this minute of those the PIN server granted this gateway, by merchant.",
                left.iter().map(|(m, n)| ([("merchant", m)], gauge(*n))),
            )?;
        }
        if let Some(l) = &self.limits {
            let usage = l.lock().expect("not poisoned").merchant_usage(now);
            write_family(
                e,
                "pingate_gateway_merchant_value_today",
                "Value sold today (UTC, minor units) by merchant and currency at this gateway, against its limits.",
                usage.iter().flat_map(|(m, _, values)| {
                    values
                        .iter()
                        .map(move |(c, v)| ([("merchant", m), ("currency", c)], gauge(*v)))
                }),
            )?;
            write_family(
                e,
                "pingate_gateway_merchant_sales_last_minute",
                "Sales in the last 60 seconds by merchant at this gateway, against its limits.",
                usage.iter().map(|(m, n, _)| ([("merchant", m)], gauge(*n))),
            )?;
        }
        let locked = self.mac_status().iter().filter(|s| s.locked_since.is_some()).count();
        write_single(
            e,
            "pingate_gateway_terminals_locked",
            "Terminals locked after too many bad or missing MACs (until `pingate terminals unlock`).",
            gauge(locked),
        )?;
        let st = &self.stats;
        let c = |a: &AtomicU64| ConstCounter::new(a.load(Ordering::Relaxed));
        write_family(
            e,
            "pingate_gateway_sales",
            "Approved sales by where the PIN came from.",
            [
                ([("source", "cache")], c(&st.sales_from_cache)),
                ([("source", "on_demand")], c(&st.sales_on_demand)),
            ],
        )?;
        for (name, help, v) in [
            ("pingate_gateway_declined", "Sales declined.", &st.declined),
            (
                "pingate_gateway_refills",
                "Cache refills asked of the PIN server.",
                &st.refills_started,
            ),
            (
                "pingate_gateway_repeats",
                "Repeats and duplicates answered from memory.",
                &st.repeats,
            ),
            (
                "pingate_gateway_reversals",
                "Reversals taken from terminals.",
                &st.reversals,
            ),
            (
                "pingate_gateway_undelivered",
                "Approved answers that did not reach the terminal (the sale is reversed).",
                &st.undelivered,
            ),
            (
                "pingate_gateway_confirms",
                "Cache sales confirmed to the PIN server.",
                &st.confirms_done,
            ),
            (
                "pingate_gateway_forward_failures",
                "Store-and-forward attempts that failed (retried).",
                &st.forward_failures,
            ),
            (
                "pingate_gateway_forward_refused",
                "Store-and-forward steps the PIN server refused for good (taken out of the queue, logged).",
                &st.forward_refused,
            ),
            (
                "pingate_gateway_confirm_conflicts",
                "Cache sales the PIN server could not confirm (a conflict it recorded; pingate audit shows it).",
                &st.confirm_conflicts,
            ),
            (
                "pingate_gateway_redeliveries",
                "Sold PINs handed out again from memory to a repeat of their sale.",
                &st.redeliveries,
            ),
            (
                "pingate_gateway_unsure_keys",
                "Sales of prefetch products sent to the PIN server because their key may have been sold before.",
                &st.unsure_keys,
            ),
            (
                "pingate_gateway_reversal_mismatches",
                "Reversals refused (13) for naming another product, amount, currency or merchant than their sale.",
                &st.reversal_mismatches,
            ),
        ] {
            write_single(e, name, help, c(v))?;
        }
        let stock = self.stock();
        let amounts: Vec<String> = stock.cache.iter().map(|l| l.amount.to_string()).collect();
        let at = |i: usize| {
            [
                ("product", stock.cache[i].product.as_str()),
                ("amount", amounts[i].as_str()),
            ]
        };
        type Reading = fn(&Level) -> usize;
        let gauges: [(&str, &str, Reading); 3] = [
            ("pingate_gateway_cache_pins", "PINs held in the prefetch cache.", |l| {
                l.cached
            }),
            (
                "pingate_gateway_cache_low",
                "The cache's low mark (a refill is due under it; configured).",
                |l| l.low,
            ),
            (
                "pingate_gateway_cache_target",
                "What the cache refills towards (adapts to the sale rate).",
                |l| l.target,
            ),
        ];
        for (name, help, value) in gauges {
            write_family(
                e,
                name,
                help,
                stock.cache.iter().enumerate().map(|(i, l)| (at(i), gauge(value(l)))),
            )?;
        }
        write_family(
            e,
            "pingate_gateway_cache_lookups",
            "Cache lookups by result (a miss is sold on demand).",
            stock.cache.iter().enumerate().flat_map(|(i, l)| {
                [("hit", l.hits), ("miss", l.misses)]
                    .map(|(result, n)| ((at(i), [("result", result)]), ConstCounter::new(n)))
            }),
        )?;
        write_family(
            e,
            "pingate_gateway_pending",
            "Store-and-forward work waiting for the PIN server.",
            [
                ("confirm", stock.pending_confirms),
                ("reversal", stock.pending_reversals),
                ("release", stock.pending_releases),
            ]
            .map(|(kind, n)| ([("kind", kind)], gauge(n))),
        )?;
        write_family(
            e,
            "pingate_gateway_server_connections",
            "Open TLS connections per PIN server.",
            stock
                .servers
                .iter()
                .map(|s| ([("server", &s.server)], gauge(s.connected))),
        )?;
        write_family(
            e,
            "pingate_gateway_server_circuit_open",
            "1 while a PIN server's circuit breaker is open.",
            stock
                .servers
                .iter()
                .map(|s| ([("server", &s.server)], flag(s.circuit_open))),
        )?;
        write_single(
            e,
            "pingate_gateway_journal_writing",
            "1 while the journal takes records; 0 after a write it could not make (no sale is answered until a \
             restart).",
            flag(self.journal.is_writing()),
        )?;
        let board = self.lines.borrow().clone();
        write_family(
            e,
            "pingate_gateway_serial_line_state",
            "1 for each serial line's current state.",
            board
                .iter()
                .map(|(name, l)| ([("line", name), ("state", &l.state)], flag(true))),
        )?;
        type Count = fn(&super::serial::LineStatus) -> u64;
        let counters: [(&str, &str, Count); 4] = [
            (
                "pingate_gateway_serial_calls",
                "Calls connected per serial line.",
                |l| l.calls,
            ),
            (
                "pingate_gateway_serial_delivered",
                "Answers acknowledged per serial line.",
                |l| l.delivered,
            ),
            (
                "pingate_gateway_serial_reversed",
                "Sales reversed for undelivered answers per line.",
                |l| l.reversed,
            ),
            (
                "pingate_gateway_serial_opens",
                "Times each serial device was opened.",
                |l| l.opens,
            ),
        ];
        for (name, help, value) in counters {
            write_family(
                e,
                name,
                help,
                board
                    .iter()
                    .map(|(line, l)| ([("line", line)], ConstCounter::new(value(l)))),
            )?;
        }
        Ok(())
    }

    /// Ready: at least one PIN server connected (sales from the cache would still work without, but on-demand sales
    /// and confirmations would not).
    pub fn readiness(&self) -> Result<(), String> {
        if !self.journal.is_writing() {
            return Err("the journal cannot be written (every sale is refused)".into());
        }
        let servers = self.upstream.health();
        if servers.iter().any(|s| s.connected > 0) {
            Ok(())
        } else {
            Err("no PIN server connected".into())
        }
    }

    /// A terminal connection of `listener` closed by the gateway, for `reason` (a fixed word, not the peer's).
    pub(crate) fn note_closed(&self, listener: &str, reason: &'static str) {
        let labels = ClosedLabels {
            listener: listener.to_string(),
            reason,
        };
        self.metrics.connections_closed.get_or_create(&labels).inc();
    }

    /// A frame that did not decode (`answered`: with a format error): counted beside the requests.
    pub fn note_unreadable(&self, answered: bool) {
        let code = if answered { "30" } else { "none" };
        self.metrics.count("unreadable", code);
    }

    /// What the gateway holds and owes now.
    pub fn stock(&self) -> StockReport {
        let cache = self.cache.lock().expect("not poisoned").levels(Instant::now());
        let f = self.forward.lock().expect("not poisoned");
        StockReport {
            cache,
            pending_confirms: f.confirms,
            pending_reversals: f.reversals,
            pending_releases: f.releases,
            servers: self.upstream.health(),
            stats: serde_json::to_value(&self.stats).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name and labels) in `text`, if there is one.
    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn each_type_and_code_is_its_own_series_and_unknown_ones_are_still_counted() {
        // No gateway behind it: its state is not shown, the counters are.
        let m = GatewayMetrics::new(Weak::new());
        for (mti, code) in [
            ("0200", "00"),
            ("0200", "00"),
            ("0200", "91"),
            ("0800", "00"),
            ("0421", "none"),
            ("0421", "other"),
            ("9999", "00"),
            ("0200", "Z9"),
            ("0200", "Z9"),
            ("unreadable", "30"),
        ] {
            m.count(mti, code);
        }
        let text = crate::metrics::exposition(&m.registry);
        let requests = |mti: &str, code: &str| {
            value(
                &text,
                &format!("pingate_gateway_requests_total{{mti=\"{mti}\",code=\"{code}\"}}"),
            )
        };
        assert_eq!(requests("0200", "00"), Some(2), "{text}");
        assert_eq!(requests("0200", "91"), Some(1), "{text}");
        assert_eq!(requests("0800", "00"), Some(1), "{text}");
        assert_eq!(requests("0421", "none"), Some(1), "{text}");
        assert_eq!(requests("0421", "other"), Some(1), "{text}");
        assert_eq!(requests("other", "00"), Some(1), "an MTI outside the contract: {text}");
        assert_eq!(requests("0200", "Z9"), Some(2), "a code outside the contract: {text}");
        assert_eq!(requests("unreadable", "30"), Some(1), "{text}");
        let series = text
            .lines()
            .filter(|l| l.starts_with("pingate_gateway_requests_total{"))
            .count();
        assert_eq!(series, 8, "one series per label set seen, no more:\n{text}");
    }
}
