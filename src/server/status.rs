//! The PIN server's status page (`GET /status` on `--metrics`): connections, and the stock by product and amount
//! with its days of cover. Made from the stock reading the metrics show (read in the background, never by a page
//! view) and the history of those readings kept here; no PIN, key or MAC is in reach.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::psp::StockEntry;
use crate::status_page::{age, Cell, Page, Tone};

/// How far back the sale rate looks: a day evens out the hours of the day (or the time since start, if shorter).
const RATE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Readings kept for the rate at most this often (a day of them is 1,440 at most).
const SAMPLE_EVERY: Duration = Duration::from_secs(60);
/// A rate measured over less than this is not shown (too few sales to say anything).
const MIN_SPAN: Duration = Duration::from_secs(60);

type Key = (String, i64);

/// Sold counts by product and amount at past stock readings, oldest first, within [`RATE_WINDOW`].
#[derive(Debug, Default)]
pub(super) struct SoldHistory {
    samples: VecDeque<(Instant, BTreeMap<Key, i64>)>,
}

fn sold(rows: &[StockEntry]) -> BTreeMap<Key, i64> {
    rows.iter()
        .filter(|r| r.state == "sold")
        .map(|r| ((r.product.clone(), r.amount), r.count))
        .collect()
}

impl SoldHistory {
    /// A stock reading taken at `at`.
    pub(super) fn record(&mut self, at: Instant, rows: &[StockEntry]) {
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| at.saturating_duration_since(*t) >= SAMPLE_EVERY)
        {
            self.samples.push_back((at, sold(rows)));
        }
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// PINs sold per day of `key`, from the oldest kept reading to `rows` (read at `at`); `None` while the span is
    /// shorter than [`MIN_SPAN`].
    fn per_day(&self, key: &Key, rows: &BTreeMap<Key, i64>, at: Instant) -> Option<f64> {
        let (t0, first) = self.samples.front()?;
        let span = at.saturating_duration_since(*t0);
        if span < MIN_SPAN {
            return None;
        }
        let sold = (rows.get(key).copied().unwrap_or(0) - first.get(key).copied().unwrap_or(0)).max(0);
        Some(sold as f64 * 86_400.0 / span.as_secs_f64())
    }

    fn span(&self, at: Instant) -> Option<Duration> {
        self.samples.front().map(|(t0, _)| at.saturating_duration_since(*t0))
    }
}

/// What the page shows, as the server holds it.
pub(super) struct View<'a> {
    pub ready: Result<(), String>,
    pub connections: u64,
    pub unauthenticated: usize,
    pub max_connections: usize,
    /// The last stock reading, and when it was taken.
    pub stock: &'a [StockEntry],
    pub read_at: Option<Instant>,
    pub history: &'a SoldHistory,
}

/// Days of cover: available PINs over the sale rate; `None` when nothing sold over the window.
fn cover(available: i64, per_day: Option<f64>) -> Option<f64> {
    per_day.filter(|r| *r > 0.0).map(|r| available as f64 / r)
}

pub(super) fn render(v: &View) -> String {
    let mut p = Page::new("pingate PIN server", "inventory and gateway connections");
    let read = match v.read_at {
        Some(t) => format!("{} ago", age(t.elapsed().as_secs())),
        None => "not yet".into(),
    };
    p.section("Summary").facts(&[
        (
            "ready",
            match &v.ready {
                Ok(()) => "yes".into(),
                Err(why) => format!("no: {why}"),
            },
            if v.ready.is_ok() { Tone::Good } else { Tone::Bad },
        ),
        (
            "gateway connections",
            format!("{} of {}", v.connections, v.max_connections),
            Tone::Plain,
        ),
        ("connections authenticating", v.unauthenticated.to_string(), Tone::Plain),
        (
            "stock read",
            read,
            if v.read_at.is_some() { Tone::Plain } else { Tone::Warn },
        ),
    ]);

    // By product and amount: each state's count.
    let mut by: BTreeMap<Key, BTreeMap<&str, i64>> = BTreeMap::new();
    for r in v.stock {
        *by.entry((r.product.clone(), r.amount))
            .or_default()
            .entry(r.state.as_str())
            .or_default() += r.count;
    }
    let sold_now: BTreeMap<Key, i64> = by
        .iter()
        .map(|(k, s)| (k.clone(), s.get("sold").copied().unwrap_or(0)))
        .collect();
    let at = v.read_at.unwrap_or_else(Instant::now);
    let rows: Vec<Vec<Cell>> = by
        .iter()
        .map(|(key, s)| {
            let n = |state: &str| s.get(state).copied().unwrap_or(0);
            let (available, sold) = (n("available"), n("sold"));
            let other = n("voided") + n("expired") + n("quarantined");
            let per_day = v.history.per_day(key, &sold_now, at);
            let days = cover(available, per_day);
            let cover_tone = match days {
                _ if available == 0 => Tone::Bad,
                Some(d) if d < 1.0 => Tone::Bad,
                Some(d) if d < 7.0 => Tone::Warn,
                Some(_) => Tone::Good,
                None => Tone::Plain,
            };
            vec![
                Cell::text(&key.0),
                Cell::num(key.1),
                Cell::num(available)
                    .bar(available as f64 / (available + n("reserved") + sold).max(1) as f64)
                    .tone(if available == 0 { Tone::Bad } else { Tone::Plain }),
                Cell::num(n("reserved")),
                Cell::num(sold),
                Cell::num(other).tone(if n("quarantined") > 0 { Tone::Warn } else { Tone::Plain }),
                Cell::num(per_day.map_or("–".into(), |r| format!("{r:.1}"))),
                Cell::num(match (days, per_day) {
                    (Some(d), _) => format!("{d:.1}"),
                    (None, Some(_)) => "no sales".into(),
                    (None, None) => "measuring".into(),
                })
                .tone(cover_tone),
            ]
        })
        .collect();
    let span = v.history.span(at).map_or("nothing yet".into(), |s| age(s.as_secs()));
    p.section("Stock by product and amount")
        .table(
            &[
                "product",
                "amount",
                "available",
                "reserved (in gateways' caches)",
                "sold",
                "voided, expired, quarantined",
                "sold per day",
                "days of cover",
            ],
            &rows,
            "No stock reading yet (the inventory is read every 10 s).",
        )
        .note(&format!(
            "Days of cover = available PINs ÷ PINs sold per day. The sale rate is the growth of the sold count (all \
             gateways and servers on this database) from the oldest stock reading this server kept within the last \
             24 hours to the latest one, scaled to a day; it spans {span} now (since this server started, if later). \
             Shown once it spans a minute; \"no sales\" when none were sold in it."
        ));
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(available: i64, sold: i64) -> Vec<StockEntry> {
        ["available", "sold"]
            .iter()
            .zip([available, sold])
            .map(|(s, count)| StockEntry {
                product: "TOPUP".into(),
                amount: 1000,
                state: s.to_string(),
                count,
            })
            .collect()
    }

    #[test]
    fn days_of_cover_from_the_sale_rate_of_the_window() {
        let t0 = Instant::now();
        let mut h = SoldHistory::default();
        let key = ("TOPUP".to_string(), 1000);
        h.record(t0, &rows(1000, 0));
        // Within the first minute: no rate yet.
        assert_eq!(
            h.per_day(&key, &sold(&rows(990, 10)), t0 + Duration::from_secs(30)),
            None
        );
        // 100 sold in an hour: 2,400 a day; 900 left cover 0.375 days.
        let at = t0 + Duration::from_secs(3600);
        h.record(at, &rows(900, 100));
        let r = h.per_day(&key, &sold(&rows(900, 100)), at).unwrap();
        assert!((r - 2400.0).abs() < 1e-6, "{r}");
        assert!((cover(900, Some(r)).unwrap() - 0.375).abs() < 1e-9);
        assert_eq!(cover(900, Some(0.0)), None);
        // Readings older than a day are forgotten: the rate is that of the last day.
        let later = t0 + Duration::from_secs(25 * 3600);
        h.record(later, &rows(800, 200));
        let r = h.per_day(&key, &sold(&rows(800, 200)), later).unwrap();
        assert!((r - 100.0 * 86_400.0 / (24.0 * 3600.0)).abs() < 1e-6, "{r}");
    }

    #[test]
    fn the_page_shows_stock_and_cover_and_escapes_names() {
        let h = SoldHistory::default();
        let stock = vec![
            StockEntry {
                product: "<b>GIFT</b>".into(),
                amount: 2500,
                state: "available".into(),
                count: 7,
            },
            StockEntry {
                product: "<b>GIFT</b>".into(),
                amount: 2500,
                state: "sold".into(),
                count: 3,
            },
        ];
        let html = render(&View {
            ready: Ok(()),
            connections: 1,
            unauthenticated: 0,
            max_connections: 256,
            stock: &stock,
            read_at: Some(Instant::now()),
            history: &h,
        });
        assert!(
            html.contains("&lt;b&gt;GIFT&lt;/b&gt;") && !html.contains("<b>GIFT"),
            "{html}"
        );
        assert!(html.contains("<span>7</span>") && html.contains("measuring"), "{html}");
    }
}
