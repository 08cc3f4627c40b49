//! What the gateway shows of itself: the counters since start ([`Stats`]), `gateway stock` ([`StockReport`]), and
//! the metrics endpoint's text and readiness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;

use super::cache::Level;
use super::upstream::ServerHealth;
use super::Gateway;

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

/// Counters and timings the metrics endpoint shows beside [`Stats`] and [`StockReport`].
pub(super) struct GatewayMetrics {
    /// By message type and response code.
    pub(super) requests: crate::metrics::LabelledCounter,
    pub(super) latency: crate::metrics::Histogram,
    /// Terminal connections the gateway closed, by listener and reason.
    pub(super) connections_closed: crate::metrics::LabelledCounter,
    /// Requests refused for their MAC (63), by reason.
    pub(super) mac_refused: crate::metrics::LabelledCounter,
    /// Sales and accepted reversals by merchant and by terminal (`policy`).
    pub(super) reversal_rates: super::policy::ReversalRates,
    /// Terminal reversals answered 21: after the reversal window.
    pub(super) reversals_too_late: AtomicU64,
    /// Sales refused for a limit (61, 65), by whose limit (`terminal`, `merchant`) and which (`amount`, `frequency`).
    pub(super) limit_refusals: crate::metrics::LabelledCounter,
    /// Requests refused for where they came from (certificate, source network, caller's number), by reason.
    pub(super) origin_refused: crate::metrics::LabelledCounter,
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
    /// The metrics endpoint's text (Prometheus exposition format).
    pub fn metrics_text(&self) -> String {
        use crate::metrics::Exposition;
        let mut e = Exposition::default();
        self.metrics.requests.render(
            &mut e,
            "pingate_gateway_requests_total",
            "Terminal requests by message type and response code.",
        );
        self.metrics.latency.render(
            &mut e,
            "pingate_gateway_request_duration_seconds",
            "Time from a request's arrival to its answer.",
        );
        self.metrics.connections_closed.render(
            &mut e,
            "pingate_gateway_terminal_connections_closed_total",
            "Terminal connections closed by the gateway, by listener and reason: no_first_frame (nothing within \
             first_frame_timeout_ms), slow_sender, connection_cap, source_cap, source_not_allowed (outside the \
             listener's allow list), tls_handshake (failed), tls_handshake_timeout (not done within \
             first_frame_timeout_ms).",
        );
        self.metrics.reversal_rates.render(&mut e);
        self.metrics.limit_refusals.render(
            &mut e,
            "pingate_gateway_limit_refusals_total",
            "Sales refused for a limit: 61 (amount: value per day) or 65 (frequency: sales per minute), by scope \
             (terminal, merchant: this gateway's; merchant_all_gateways: kept by the PIN server).",
        );
        if let Some(a) = &self.allowances {
            let left = a.lock().expect("not poisoned").left(crate::clock::unix_now());
            e.family(
                "pingate_gateway_merchant_allowance_left",
                "gauge",
                "What is left today of the allowance the PIN server granted this gateway, by merchant and currency.",
            );
            for (m, c, v) in &left {
                e.sample(
                    "pingate_gateway_merchant_allowance_left",
                    &[("merchant", m), ("currency", c)],
                    *v as f64,
                );
            }
        }
        if let Some(a) = &self.sales_allowances {
            let left = a.lock().expect("not poisoned").left(crate::clock::unix_now());
            e.family(
                "pingate_gateway_merchant_sales_allowance_left",
                "gauge",
                "Sales left this minute of those the PIN server granted this gateway, by merchant.",
            );
            for (m, n) in &left {
                e.sample(
                    "pingate_gateway_merchant_sales_allowance_left",
                    &[("merchant", m)],
                    f64::from(*n),
                );
            }
        }
        if let Some(l) = &self.limits {
            let usage = l.lock().expect("not poisoned").merchant_usage(crate::clock::unix_now());
            e.family(
                "pingate_gateway_merchant_value_today",
                "gauge",
                "Value sold today (UTC, minor units) by merchant and currency at this gateway, against its limits.",
            );
            for (m, _, values) in &usage {
                for (c, v) in values {
                    e.sample(
                        "pingate_gateway_merchant_value_today",
                        &[("merchant", m), ("currency", c)],
                        *v as f64,
                    );
                }
            }
            e.family(
                "pingate_gateway_merchant_sales_last_minute",
                "gauge",
                "Sales in the last 60 seconds by merchant at this gateway, against its limits.",
            );
            for (m, n, _) in &usage {
                e.sample(
                    "pingate_gateway_merchant_sales_last_minute",
                    &[("merchant", m)],
                    *n as f64,
                );
            }
        }
        e.single(
            "pingate_gateway_reversals_too_late_total",
            "counter",
            "Terminal reversals answered 21 (after the reversal window): not reversed, the PIN stays sold.",
            self.metrics.reversals_too_late.load(Ordering::Relaxed) as f64,
        );
        self.metrics.mac_refused.render(
            &mut e,
            "pingate_gateway_mac_refused_total",
            "Requests answered 63 on listeners and lines that require MACs, by reason: missing, mismatch, no_key, \
             no_terminal, wrong_algorithm, unsupported, locked.",
        );
        self.metrics.origin_refused.render(
            &mut e,
            "pingate_gateway_origin_refused_total",
            "Requests answered 63 for where they came from, by reason: certificate (a client certificate that may not \
             speak for the terminal id), source (a terminal's allow list), caller_id (a terminal's caller_ids), \
             no_terminal.",
        );
        let locked = self.mac_status().iter().filter(|s| s.locked_since.is_some()).count();
        e.family(
            "pingate_gateway_terminals_locked",
            "gauge",
            "Terminals locked after too many bad or missing MACs (until `pingate terminals unlock`).",
        );
        e.sample("pingate_gateway_terminals_locked", &[], locked as f64);
        let st = &self.stats;
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        e.family(
            "pingate_gateway_sales_total",
            "counter",
            "Approved sales by where the PIN came from.",
        )
        .sample(
            "pingate_gateway_sales_total",
            &[("source", "cache")],
            c(&st.sales_from_cache),
        )
        .sample(
            "pingate_gateway_sales_total",
            &[("source", "on_demand")],
            c(&st.sales_on_demand),
        );
        for (name, help, v) in [
            ("pingate_gateway_declined_total", "Sales declined.", &st.declined),
            (
                "pingate_gateway_refills_total",
                "Cache refills asked of the PIN server.",
                &st.refills_started,
            ),
            (
                "pingate_gateway_repeats_total",
                "Repeats and duplicates answered from memory.",
                &st.repeats,
            ),
            (
                "pingate_gateway_reversals_total",
                "Reversals taken from terminals.",
                &st.reversals,
            ),
            (
                "pingate_gateway_undelivered_total",
                "Approved answers that did not reach the terminal (the sale is reversed).",
                &st.undelivered,
            ),
            (
                "pingate_gateway_confirms_total",
                "Cache sales confirmed to the PIN server.",
                &st.confirms_done,
            ),
            (
                "pingate_gateway_forward_failures_total",
                "Store-and-forward attempts that failed (retried).",
                &st.forward_failures,
            ),
            (
                "pingate_gateway_forward_refused_total",
                "Store-and-forward steps the PIN server refused for good (taken out of the queue, logged).",
                &st.forward_refused,
            ),
            (
                "pingate_gateway_confirm_conflicts_total",
                "Cache sales the PIN server could not confirm (a conflict it recorded; pingate audit shows it).",
                &st.confirm_conflicts,
            ),
            (
                "pingate_gateway_redeliveries_total",
                "Sold PINs handed out again from memory to a repeat of their sale.",
                &st.redeliveries,
            ),
            (
                "pingate_gateway_unsure_keys_total",
                "Sales of prefetch products sent to the PIN server because their key may have been sold before.",
                &st.unsure_keys,
            ),
            (
                "pingate_gateway_reversal_mismatches_total",
                "Reversals refused (13) for naming another product, amount, currency or merchant than their sale.",
                &st.reversal_mismatches,
            ),
        ] {
            e.single(name, "counter", help, c(v));
        }
        let stock = self.stock();
        type Reading = fn(&Level) -> f64;
        let gauges: [(&str, &str, Reading); 3] = [
            ("pingate_gateway_cache_pins", "PINs held in the prefetch cache.", |l| {
                l.cached as f64
            }),
            (
                "pingate_gateway_cache_low",
                "The cache's low mark (a refill is due under it; configured).",
                |l| l.low as f64,
            ),
            (
                "pingate_gateway_cache_target",
                "What the cache refills towards (adapts to the sale rate).",
                |l| l.target as f64,
            ),
        ];
        for (name, help, value) in gauges {
            e.family(name, "gauge", help);
            for l in &stock.cache {
                let amount = l.amount.to_string();
                e.sample(name, &[("product", &l.product), ("amount", &amount)], value(l));
            }
        }
        e.family(
            "pingate_gateway_cache_lookups_total",
            "counter",
            "Cache lookups by result (a miss is sold on demand).",
        );
        for l in &stock.cache {
            let amount = l.amount.to_string();
            let p = [("product", l.product.as_str()), ("amount", amount.as_str())];
            e.sample(
                "pingate_gateway_cache_lookups_total",
                &[p[0], p[1], ("result", "hit")],
                l.hits as f64,
            );
            e.sample(
                "pingate_gateway_cache_lookups_total",
                &[p[0], p[1], ("result", "miss")],
                l.misses as f64,
            );
        }
        e.family(
            "pingate_gateway_pending",
            "gauge",
            "Store-and-forward work waiting for the PIN server.",
        )
        .sample(
            "pingate_gateway_pending",
            &[("kind", "confirm")],
            stock.pending_confirms as f64,
        )
        .sample(
            "pingate_gateway_pending",
            &[("kind", "reversal")],
            stock.pending_reversals as f64,
        )
        .sample(
            "pingate_gateway_pending",
            &[("kind", "release")],
            stock.pending_releases as f64,
        );
        e.family(
            "pingate_gateway_server_connections",
            "gauge",
            "Open TLS connections per PIN server.",
        );
        for s in &stock.servers {
            e.sample(
                "pingate_gateway_server_connections",
                &[("server", &s.server)],
                s.connected as f64,
            );
        }
        e.family(
            "pingate_gateway_server_circuit_open",
            "gauge",
            "1 while a PIN server's circuit breaker is open.",
        );
        for s in &stock.servers {
            let open = if s.circuit_open { 1.0 } else { 0.0 };
            e.sample("pingate_gateway_server_circuit_open", &[("server", &s.server)], open);
        }
        e.single(
            "pingate_gateway_journal_writing",
            "gauge",
            "1 while the journal takes records; 0 after a write it could not make (no sale is answered until a \
             restart).",
            if self.journal.is_writing() { 1.0 } else { 0.0 },
        );
        let board = self.lines.borrow().clone();
        e.family(
            "pingate_gateway_serial_line_state",
            "gauge",
            "1 for each serial line's current state.",
        );
        for (name, l) in &board {
            e.sample(
                "pingate_gateway_serial_line_state",
                &[("line", name), ("state", &l.state)],
                1.0,
            );
        }
        for (metric, help, f) in [
            (
                "pingate_gateway_serial_calls_total",
                "Calls connected per serial line.",
                0,
            ),
            (
                "pingate_gateway_serial_delivered_total",
                "Answers acknowledged per serial line.",
                1,
            ),
            (
                "pingate_gateway_serial_reversed_total",
                "Sales reversed for undelivered answers per line.",
                2,
            ),
            (
                "pingate_gateway_serial_opens_total",
                "Times each serial device was opened.",
                3,
            ),
        ] {
            e.family(metric, "counter", help);
            for (name, l) in &board {
                let v = [l.calls, l.delivered, l.reversed, l.opens][f];
                e.sample(metric, &[("line", name)], v as f64);
            }
        }
        e.finish()
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
        self.metrics
            .connections_closed
            .inc(&[("listener", listener), ("reason", reason)]);
    }

    /// A frame that did not decode (`answered`: with a format error): counted beside the requests.
    pub fn note_unreadable(&self, answered: bool) {
        let code = if answered { "30" } else { "none" };
        self.metrics.requests.inc(&[("mti", "unreadable"), ("code", code)]);
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
