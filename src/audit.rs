//! `pingate audit`: checks the inventory's invariants, reconciles gateways' journals with it, and reports a day.
//!
//! Invariants, each a query (the same SQL on SQLite and PostgreSQL, read-only):
//! - every sold or voided PIN has exactly one sale, and every sale's PIN is sold or voided (and exists);
//! - every voided PIN was reversed (a reversal names it), or voided by a refused confirm whose conflict is recorded;
//! - every sale key (terminal, STAN, transmission) was sold once, and no refused confirm's conflict is left open;
//! - every reserved PIN has a holder and a lease, and the lease has not ended (a reservation whose holder is not
//!   alive must be reconciled: `pingate pins leases`, `pingate pins return-expired`);
//! - no available or expired PIN has a sale;
//! - the audit trail agrees with the states: each PIN's last audit row is its state, each row starts where the
//!   previous one ended, every step is an allowed edge and the first one a load into `available`, and every PIN
//!   with a trail still has its row (PINs are never deleted). The trail is read one row per PIN and change from
//!   `audit_trail`: on SQLite (schema version 7) it expands records that each name the PINs one batch moved, so a
//!   PIN left out of its record, or named twice, breaks its trail as a missing or repeated row would.
//!
//! A gateway journal given with `--journal` is read (never written) and checked against the server: every PIN
//! it caches is reserved to it, every cache sale it has not had confirmed is reserved to it or sold. Its open
//! store-and-forward items are reported.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::store::handle::DbUrl;
use crate::store::PinState;

/// Errors that stop an audit (violations are not errors: they are its findings).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("database: {0}")]
    Db(String),
    #[error("journal {path}: {reason}")]
    Journal { path: PathBuf, reason: String },
    /// `--day` is not `YYYY-MM-DD`.
    #[error("day `{0}`: expected YYYY-MM-DD")]
    Day(String),
}

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which check (`sold-without-sale`, ...).
    pub check: &'static str,
    /// What and where (PIN ids, gateway).
    pub detail: String,
}

/// A day's sales of one terminal, product and amount (dated when the PIN server recorded them: a cache sale when
/// it was confirmed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaySales {
    pub terminal: String,
    pub product: String,
    pub amount: String,
    pub sales: i64,
    /// Sum of the amounts, in minor units.
    pub total: i64,
    /// Of these sales, how many were reversed since (their PINs voided).
    pub voided: i64,
}

/// A gateway journal's part of the reconciliation.
#[derive(Clone, Debug, Default)]
pub struct JournalPart {
    pub path: PathBuf,
    pub gateway: String,
    pub cached: usize,
    pub unconfirmed: usize,
    pub releasing: usize,
    pub reversals: usize,
}

/// What an audit found.
#[derive(Clone, Debug, Default)]
pub struct AuditReport {
    pub violations: Vec<Violation>,
    /// (product, amount, state, count)
    pub stock: Vec<(String, String, String, i64)>,
    /// The day reported (`YYYY-MM-DD`, UTC) and its sales by terminal, product and amount.
    pub day: Option<String>,
    pub sales: Vec<DaySales>,
    /// Reversals of the day: (terminal, count).
    pub reversals: Vec<(String, i64)>,
    pub journals: Vec<JournalPart>,
    /// PINs taken out of sale because their row does not decrypt (tampered or damaged): (id, product, amount,
    /// serial), for the operator to look into. Not a violation: each is accounted for, and never sold.
    pub quarantined: Vec<(i64, String, String, String)>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report for a person.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "stock by product, amount and state:");
        for (p, a, st, n) in &self.stock {
            let _ = writeln!(s, "  {p} {a} {st}: {n}");
        }
        if let Some(day) = &self.day {
            let _ = writeln!(s, "sales on {day} (UTC), by terminal, product and amount:");
            for d in &self.sales {
                let _ = writeln!(
                    s,
                    "  {} {} {}: {} sales, {} in all, {} reversed since",
                    d.terminal, d.product, d.amount, d.sales, d.total, d.voided
                );
            }
            let n: i64 = self.sales.iter().map(|x| x.sales).sum();
            let v: i64 = self.sales.iter().map(|x| x.voided).sum();
            let _ = writeln!(s, "  total: {n} sales, {v} reversed since, {} standing", n - v);
            let _ = writeln!(s, "reversals on {day}:");
            for (t, n) in &self.reversals {
                let _ = writeln!(s, "  {t}: {n}");
            }
        }
        for j in &self.journals {
            let _ = writeln!(
                s,
                "gateway {} ({}): {} PINs cached, {} cache sales to confirm, {} releases and {} reversals to forward",
                j.gateway,
                j.path.display(),
                j.cached,
                j.unconfirmed,
                j.releasing,
                j.reversals
            );
        }
        if !self.quarantined.is_empty() {
            let _ = writeln!(
                s,
                "quarantined PINs (their rows do not decrypt; never sold; see the server's log): {}",
                self.quarantined.len()
            );
            for (id, p, a, serial) in &self.quarantined {
                let _ = writeln!(s, "  PIN {id}: {p} {a}, serial {serial}");
            }
        }
        if self.violations.is_empty() {
            let _ = writeln!(s, "every invariant holds");
        } else {
            let _ = writeln!(s, "{} violations:", self.violations.len());
            for v in &self.violations {
                let _ = writeln!(s, "  {}: {}", v.check, v.detail);
            }
        }
        s
    }

    /// The report as CSV: `section,key1,key2,key3,value` rows.
    pub fn csv(&self) -> String {
        let mut s = String::from("section,a,b,c,value\n");
        let q = |v: &str| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.to_string()
            }
        };
        for (p, a, st, n) in &self.stock {
            let _ = writeln!(s, "stock,{},{},{},{n}", q(p), q(a), q(st));
        }
        for d in &self.sales {
            let (t, p, a) = (q(&d.terminal), q(&d.product), q(&d.amount));
            let _ = writeln!(s, "sales,{t},{p},{a},{}", d.sales);
            let _ = writeln!(s, "sales_total,{t},{p},{a},{}", d.total);
            let _ = writeln!(s, "sales_voided,{t},{p},{a},{}", d.voided);
        }
        for (t, n) in &self.reversals {
            let _ = writeln!(s, "reversals,{},,,{n}", q(t));
        }
        for j in &self.journals {
            let g = q(&j.gateway);
            let _ = writeln!(s, "open_confirms,{g},,,{}", j.unconfirmed);
            let _ = writeln!(s, "open_reversals,{g},,,{}", j.reversals);
            let _ = writeln!(s, "open_releases,{g},,,{}", j.releasing);
        }
        for (id, p, a, serial) in &self.quarantined {
            let _ = writeln!(s, "quarantined,{},{},{},{id}", q(p), q(a), q(serial));
        }
        for v in &self.violations {
            let _ = writeln!(s, "violation,{},{},,1", v.check, q(&v.detail));
        }
        s
    }
}

/// A read-only connection to either backend; every query returns text columns.
enum Db {
    Sqlite(rusqlite::Connection),
    Pg(tokio_postgres::Client),
}

impl Db {
    async fn open(url: &DbUrl) -> Result<Db, AuditError> {
        match url {
            DbUrl::Sqlite(p) => rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map(Db::Sqlite)
                .map_err(|e| AuditError::Db(format!("{}: {e}", p.display()))),
            DbUrl::Postgres(u) => {
                // TLS when the URL asks for it, as the stores connect.
                let client = crate::store::pgtls::connect(u)
                    .await
                    .map_err(|e| AuditError::Db(e.to_string()))?;
                Ok(Db::Pg(client))
            }
        }
    }

    async fn rows(&self, sql: &str) -> Result<Vec<Vec<String>>, AuditError> {
        let err = |e: String| {
            AuditError::Db(format!(
                "{e} in `{}`",
                sql.split_whitespace().collect::<Vec<_>>().join(" ")
            ))
        };
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare(sql).map_err(|e| err(e.to_string()))?;
                let n = st.column_count();
                let rows = st
                    .query_map([], |r| {
                        (0..n)
                            .map(|i| r.get::<_, Option<String>>(i).map(Option::unwrap_or_default))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .map_err(|e| err(e.to_string()))?;
                rows.collect::<Result<Vec<_>, _>>().map_err(|e| err(e.to_string()))
            }
            Db::Pg(c) => {
                let rows = c.query(sql, &[]).await.map_err(|e| err(e.to_string()))?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<_, Option<String>>(i).unwrap_or_default())
                            .collect()
                    })
                    .collect())
            }
        }
    }
}

/// A voided PIN whose confirm was refused for good: voided without a sale or a reversal, by the rule of
/// `Confirmation::Conflict` (the conflict itself is a finding until an operator resolves it).
const VOIDED_BY_CONFLICT: &str =
    "EXISTS (SELECT 1 FROM confirm_conflicts c WHERE c.pin_id = p.id AND c.voided AND p.state = 'voided')";

/// The invariants: (check name, what a row means, SQL returning one text column per finding). `trail` is where the
/// audit trail is read one row per PIN and change: the view `audit_trail` since schema version 7 (on SQLite the
/// records it expands each name the PINs of a batch), the table `audit` in a database not migrated yet.
fn checks(now: i64, trail: &str) -> Vec<(&'static str, &'static str, String)> {
    let allowed: Vec<String> = PinState::ALL
        .iter()
        .flat_map(|a| PinState::ALL.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a.can_move_to(*b))
        .map(|(a, b)| format!("'{}>{}'", a.as_str(), b.as_str()))
        .collect();
    vec![
        (
            "sold-without-sale",
            "PIN sold or voided with no sale",
            format!(
                "SELECT CAST(id AS TEXT) FROM pins p WHERE state IN ('sold', 'voided') \
                 AND NOT EXISTS (SELECT 1 FROM sales s WHERE s.pin_id = p.id) AND NOT {VOIDED_BY_CONFLICT}"
            ),
        ),
        (
            "sale-of-unsold-pin",
            "a sale of a PIN that is neither sold nor voided",
            "SELECT CAST(s.pin_id AS TEXT) || ' (' || COALESCE(p.state, 'missing') || ')' \
             FROM sales s LEFT JOIN pins p ON p.id = s.pin_id \
             WHERE p.id IS NULL OR p.state NOT IN ('sold', 'voided')"
                .into(),
        ),
        (
            "sold-twice",
            "a PIN with more than one sale",
            "SELECT CAST(pin_id AS TEXT) FROM sales GROUP BY pin_id HAVING COUNT(*) > 1".into(),
        ),
        (
            "voided-without-reversal",
            "a voided PIN that no reversal names",
            format!(
                "SELECT CAST(id AS TEXT) FROM pins p WHERE state = 'voided' \
                 AND NOT EXISTS (SELECT 1 FROM reversals r WHERE r.pin_id = p.id) AND NOT {VOIDED_BY_CONFLICT}"
            ),
        ),
        (
            "key-sold-twice",
            "a sale key (terminal, STAN, transmission) with more than one sale",
            "SELECT terminal_id || '/' || stan || '/' || transmission FROM sales \
             GROUP BY transmission, stan, terminal_id HAVING COUNT(*) > 1"
                .into(),
        ),
        (
            "confirm-conflict-open",
            "a cached sale the server could not confirm (its PIN was handed out with no sale recorded), not yet \
             resolved by an operator (pingate pins conflicts)",
            "SELECT 'conflict ' || CAST(id AS TEXT) || ': PIN ' || CAST(pin_id AS TEXT) || ' sold by ' || gateway || \
             ' to ' || terminal_id || '/' || stan || '/' || transmission || ' (' || reason || \
             CASE WHEN voided THEN ', voided' ELSE '' END || ')' FROM confirm_conflicts WHERE resolved_at IS NULL \
             ORDER BY id"
                .into(),
        ),
        (
            "reservation-without-holder",
            "a reserved PIN with no holder or no lease",
            "SELECT CAST(id AS TEXT) FROM pins WHERE state = 'reserved' AND (holder IS NULL OR lease_until IS NULL)"
                .into(),
        ),
        (
            "reservation-expired",
            "a reservation whose lease ended: its holder must be reconciled (pins leases, pins return-expired)",
            format!(
                "SELECT CAST(id AS TEXT) || ' held by ' || holder FROM pins \
                 WHERE state = 'reserved' AND lease_until < {now}"
            ),
        ),
        (
            "trail-disagrees",
            "a PIN whose last audit row is not its state",
            // One pass over the trail (no query per PIN): each PIN's last row, joined to the PIN.
            format!(
                "SELECT CAST(p.id AS TEXT) || ' is ' || p.state FROM pins p LEFT JOIN \
                 (SELECT pin_id, to_state, ROW_NUMBER() OVER (PARTITION BY pin_id ORDER BY seq DESC) AS n \
                  FROM {trail}) a \
                 ON a.pin_id = p.id AND a.n = 1 \
                 WHERE a.to_state IS NULL OR a.to_state <> p.state"
            ),
        ),
        (
            "pin-missing",
            "a PIN with an audit trail and no row (PINs are never deleted)",
            format!(
                "SELECT DISTINCT CAST(a.pin_id AS TEXT) FROM {trail} a \
                 WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.id = a.pin_id)"
            ),
        ),
        (
            "trail-broken",
            "an audit row that does not start where the PIN's previous row ended",
            format!(
                "SELECT CAST(pin_id AS TEXT) || ' row ' || CAST(seq AS TEXT) FROM \
                 (SELECT pin_id, seq, from_state, LAG(to_state) OVER (PARTITION BY pin_id ORDER BY seq) AS prev \
                  FROM {trail}) t \
                 WHERE COALESCE(from_state, '-') <> COALESCE(prev, '-')"
            ),
        ),
        (
            "trail-edge-not-allowed",
            "an audit row moving a PIN along an edge that is not allowed (or loading it other than available)",
            format!(
                "SELECT CAST(pin_id AS TEXT) || ' ' || COALESCE(from_state, 'loaded') || ' -> ' || to_state \
                 FROM {trail} WHERE (from_state IS NOT NULL AND from_state || '>' || to_state NOT IN ({})) \
                 OR (from_state IS NULL AND to_state <> 'available')",
                allowed.join(", ")
            ),
        ),
    ]
}

/// `YYYY-MM-DD` → the day's first second and the next day's (UTC).
fn day_bounds(day: &str) -> Result<(i64, i64), AuditError> {
    let bad = || AuditError::Day(day.into());
    let mut parts = day.split('-');
    let (Some(y), Some(m), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let y: i32 = y.parse().map_err(|_| bad())?;
    let m: u8 = m.parse().map_err(|_| bad())?;
    let d: u8 = d.parse().map_err(|_| bad())?;
    let month = time::Month::try_from(m).map_err(|_| bad())?;
    let d = time::Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    let start = d.midnight().assume_utc().unix_timestamp();
    Ok((start, start + 86_400))
}

/// How the server has a PIN a journal names: its state and holder (or seller), or missing.
fn server_view(found: Option<&(String, String)>) -> String {
    found.map_or("missing".to_string(), |(s, h)| format!("{s} (holder {h})"))
}

/// A gateway journal to reconcile, with the keys that open it.
#[derive(Clone, Debug)]
pub struct JournalInput {
    pub path: PathBuf,
    pub keys: String,
    /// The gateway's id at the PIN server (the holder of its reservations).
    pub gateway: String,
}

/// Runs every check, reads the journals, and reports `day` (UTC) if given.
pub async fn run(db: &DbUrl, journals: &[JournalInput], day: Option<&str>) -> Result<AuditReport, AuditError> {
    run_with_progress(db, journals, day, true).await
}

/// [`run`], with a progress bar on stderr (`pingate audit`) unless `quiet`: one step per check, summary and
/// journal, drawn only when stderr is a terminal. The library's callers (the tests among them) run quiet, so a
/// test run in a terminal draws no bar either.
pub async fn run_with_progress(
    db: &DbUrl,
    journals: &[JournalInput],
    day: Option<&str>,
    quiet: bool,
) -> Result<AuditReport, AuditError> {
    let conn = Db::open(db).await?;
    let trail = if conn.rows("SELECT 1 FROM audit_trail WHERE 1 = 0").await.is_ok() {
        "audit_trail"
    } else {
        "audit"
    };
    let checks = checks(crate::clock::unix_now(), trail);
    // Each step is one query over the whole inventory (minutes on tens of millions of PINs) or one journal read:
    // the bar says which is running and how many are left.
    let steps = checks.len() + 2 + if day.is_some() { 2 } else { 0 } + journals.len();
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        crate::progress::bar("auditing", steps as u64, "steps")
    };
    let report = run_steps(&conn, &bar, checks, journals, day).await;
    bar.finish_and_clear();
    report
}

async fn run_steps(
    conn: &Db,
    bar: &indicatif::ProgressBar,
    checks: Vec<(&'static str, &'static str, String)>,
    journals: &[JournalInput],
    day: Option<&str>,
) -> Result<AuditReport, AuditError> {
    let mut report = AuditReport::default();
    for (check, meaning, sql) in checks {
        bar.set_message(check);
        let rows = conn.rows(&sql).await?;
        bar.inc(1);
        if !rows.is_empty() {
            let ids: Vec<String> = rows.iter().take(20).map(|r| r[0].clone()).collect();
            let more = if rows.len() > 20 {
                format!(" and {} more", rows.len() - 20)
            } else {
                String::new()
            };
            report.violations.push(Violation {
                check,
                detail: format!("{meaning}: {}{more}", ids.join(", ")),
            });
        }
    }
    bar.set_message("stock");
    for r in conn
        .rows(
            "SELECT product, CAST(amount AS TEXT), state, CAST(COUNT(*) AS TEXT) FROM pins \
             GROUP BY product, amount, state ORDER BY product, amount, state",
        )
        .await?
    {
        report
            .stock
            .push((r[0].clone(), r[1].clone(), r[2].clone(), r[3].parse().unwrap_or(0)));
    }
    bar.inc(1);
    bar.set_message("quarantined");
    for r in conn
        .rows(
            "SELECT CAST(id AS TEXT), product, CAST(amount AS TEXT), serial FROM pins WHERE state = 'quarantined' \
             ORDER BY id",
        )
        .await?
    {
        report
            .quarantined
            .push((r[0].parse().unwrap_or(-1), r[1].clone(), r[2].clone(), r[3].clone()));
    }
    bar.inc(1);
    if let Some(day) = day {
        let (from, to) = day_bounds(day)?;
        bar.set_message("day's sales");
        report.day = Some(day.into());
        for r in conn
            .rows(&format!(
                "SELECT s.terminal_id, s.product, CAST(s.amount AS TEXT), CAST(COUNT(*) AS TEXT), \
                 CAST(SUM(s.amount) AS TEXT), \
                 CAST(SUM(CASE WHEN p.state = 'voided' THEN 1 ELSE 0 END) AS TEXT) \
                 FROM sales s JOIN pins p ON p.id = s.pin_id WHERE s.sold_at >= {from} AND s.sold_at < {to} \
                 GROUP BY s.terminal_id, s.product, s.amount ORDER BY s.terminal_id, s.product, s.amount"
            ))
            .await?
        {
            report.sales.push(DaySales {
                terminal: r[0].clone(),
                product: r[1].clone(),
                amount: r[2].clone(),
                sales: r[3].parse().unwrap_or(0),
                total: r[4].parse().unwrap_or(0),
                voided: r[5].parse().unwrap_or(0),
            });
        }
        bar.inc(1);
        bar.set_message("day's reversals");
        for r in conn
            .rows(&format!(
                "SELECT terminal_id, CAST(COUNT(*) AS TEXT) FROM reversals WHERE at >= {from} AND at < {to} \
                 GROUP BY terminal_id ORDER BY terminal_id"
            ))
            .await?
        {
            report.reversals.push((r[0].clone(), r[1].parse().unwrap_or(0)));
        }
        bar.inc(1);
    }
    for j in journals {
        bar.set_message(format!("journal of {}", j.gateway));
        let cipher = crate::crypto::PinCipher::from_spec(&j.keys).map_err(|e| AuditError::Journal {
            path: j.path.clone(),
            reason: e.to_string(),
        })?;
        let held = crate::gateway::journal::inspect(&j.path, &cipher).map_err(|e| AuditError::Journal {
            path: j.path.clone(),
            reason: e.to_string(),
        })?;
        // Each PIN the journal holds: its state and holder at the server.
        let mut ids: Vec<i64> = held.cached.clone();
        ids.extend(held.unconfirmed.iter().copied());
        let mut states = std::collections::HashMap::new();
        for chunk in ids.chunks(500) {
            let list: Vec<String> = chunk.iter().map(|i| i.to_string()).collect();
            for r in conn
                .rows(&format!(
                    "SELECT CAST(p.id AS TEXT), p.state, COALESCE(p.holder, ''), COALESCE(s.gateway, '') \
                     FROM pins p LEFT JOIN sales s ON s.pin_id = p.id WHERE p.id IN ({})",
                    list.join(",")
                ))
                .await?
            {
                // (state, holder, or for a sold PIN the gateway that sold it)
                let holder = if r[3].is_empty() { r[2].clone() } else { r[3].clone() };
                states.insert(r[0].parse::<i64>().unwrap_or(-1), (r[1].clone(), holder));
            }
        }
        for id in &held.cached {
            match states.get(id) {
                Some((s, h)) if s == "reserved" && *h == j.gateway => {}
                other => report.violations.push(Violation {
                    check: "journal-cache-not-reserved",
                    detail: format!(
                        "{} caches PIN {id}, which the server has as {}",
                        j.gateway,
                        server_view(other)
                    ),
                }),
            }
        }
        for id in &held.unconfirmed {
            match states.get(id) {
                // Reserved to this gateway still, or sold (and maybe voided since) by this gateway: a PIN sold by
                // another gateway was handed out twice.
                Some((s, h)) if (s == "reserved" || s == "sold" || s == "voided") && *h == j.gateway => {}
                other => report.violations.push(Violation {
                    check: "journal-sale-unknown",
                    detail: format!(
                        "{} sold PIN {id} from its cache, which the server has as {}",
                        j.gateway,
                        server_view(other)
                    ),
                }),
            }
        }
        report.journals.push(JournalPart {
            path: j.path.clone(),
            gateway: j.gateway.clone(),
            cached: held.cached.len(),
            unconfirmed: held.unconfirmed.len(),
            releasing: held.releasing.len(),
            reversals: held.reverse,
        });
        bar.inc(1);
    }
    Ok(report)
}
