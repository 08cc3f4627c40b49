//! Operator commands on the inventory (`pingate pins …`), for both backends: their command line, and the PIN keys
//! as the command line gives them (`pingate server` takes them the same way).

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::clock::unix_now;
use crate::crypto::PinCipher;
use crate::sale::Pin;
use crate::store::handle::DbUrl;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{NewPin, PinStore, Product, StoreError};

/// Errors of reading an import file; `line` counts from 1 with the header as line 1.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct CsvError {
    pub line: usize,
    pub reason: String,
}

const HEADER: [&str; 6] = ["product", "amount", "pin", "serial", "expiry", "receipt"];

/// Splits one CSV line; fields may be quoted with `"` (a doubled `""` inside is one quote).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, ',') => {
                fields.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            (false, '"') if cur.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (_, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    fields.push(cur);
    Ok(fields)
}

/// Reads an import file. Every error names its line; a PIN value never appears in one.
pub fn read_csv(text: &str) -> Result<Vec<NewPin>, CsvError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let Some((_, header)) = lines.next() else {
        return Err(CsvError {
            line: 1,
            reason: "empty file; expected a header line".into(),
        });
    };
    let header = split_csv(header).map_err(|reason| CsvError { line: 1, reason })?;
    if header.iter().map(|h| h.trim()).ne(HEADER) {
        return Err(CsvError {
            line: 1,
            reason: format!("header must be `{}`", HEADER.join(",")),
        });
    }
    let mut out = Vec::new();
    for (line, text) in lines {
        if text.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| CsvError { line, reason };
        let f = split_csv(text).map_err(bad)?;
        if f.len() != HEADER.len() {
            return Err(bad(format!("{} fields, expected {}", f.len(), HEADER.len())));
        }
        let amount: i64 = f[1]
            .trim()
            .parse()
            .map_err(|_| bad(format!("amount `{}` is not a whole number of minor units", f[1])))?;
        if amount <= 0 {
            return Err(bad("amount must be positive".into()));
        }
        let pin = f[2].trim();
        if pin.len() < 4 || pin.len() > 40 || !pin.bytes().all(|c| c.is_ascii_alphanumeric()) {
            // The value itself is never echoed.
            return Err(bad(format!(
                "pin must be 4 to 40 letters or digits ({} characters given)",
                pin.len()
            )));
        }
        let serial = f[3].trim();
        if serial.is_empty() || serial.len() > 40 {
            return Err(bad("serial must be 1 to 40 characters".into()));
        }
        let expiry = f[4].trim();
        if !expiry.is_empty() && (expiry.len() != 8 || !expiry.bytes().all(|c| c.is_ascii_digit())) {
            return Err(bad(format!("expiry `{expiry}` is not YYYYMMDD")));
        }
        let receipt: Vec<String> = if f[5].is_empty() {
            Vec::new()
        } else {
            f[5].split('|').map(str::to_string).collect()
        };
        let new = NewPin {
            product: f[0].trim().to_string(),
            amount,
            pin: Pin::new(pin),
            serial: serial.to_string(),
            expiry: (!expiry.is_empty()).then(|| expiry.to_string()),
            receipt,
        };
        // Before any message that quotes a receipt line: one that shows the PIN is never echoed.
        new.check_receipt().map_err(bad)?;
        if let Some(l) = new.receipt.iter().find(|l| l.len() > 40) {
            return Err(bad(format!("receipt line longer than 40 characters: `{l}`")));
        }
        out.push(new);
    }
    Ok(out)
}

fn import_file(path: &Path) -> Result<Vec<NewPin>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    read_csv(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[derive(Subcommand)]
pub(crate) enum PinsCommand {
    /// Add a product (or update it) with its denominations.
    Product {
        #[arg(long)]
        db: String,
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        supplier: String,
        /// ISO 4217 numeric currency code.
        #[arg(long)]
        currency: String,
        /// Denominations in minor units, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        amounts: Vec<i64>,
    },
    /// Load PINs from CSV (`product,amount,pin,serial,expiry,receipt`, header first; receipt lines separated by
    /// `|`). All or nothing: any bad row rejects the file, naming its line.
    Import {
        #[arg(long)]
        db: String,
        #[command(flatten)]
        keys: KeyArgs,
        file: PathBuf,
    },
    /// Stock per product and denomination, by state.
    Stock {
        #[arg(long)]
        db: String,
    },
    /// Reservations whose lease has ended, per gateway (never freed by themselves).
    Leases {
        #[arg(long)]
        db: String,
    },
    /// Return a gateway's expired reservations to stock, once its journal is reconciled or it holds none.
    ReturnExpired {
        #[arg(long)]
        db: String,
        #[arg(long)]
        gateway: String,
    },
    /// Return a quarantined PIN (its row did not decrypt) to stock once its row is repaired: refused unless it now
    /// opens with the PIN keys.
    ReturnQuarantined {
        #[arg(long)]
        db: String,
        #[command(flatten)]
        keys: KeyArgs,
        /// The PIN's id (`pingate audit` lists the quarantined ones).
        #[arg(long)]
        id: i64,
    },
    /// Take an available PIN out of sale (quarantine it) on your word, e.g. a damaged row whose key id names a key
    /// nobody has (the server refuses to start while one is in stock). Undone by `return-quarantined`.
    Quarantine {
        #[arg(long)]
        db: String,
        /// The PIN's id.
        #[arg(long)]
        id: i64,
    },
    /// List the cached sales the PIN server could not confirm (their key was already sold with another PIN: the
    /// PIN was handed out and voided), open ones first; `--resolve ID --note TEXT` closes one once you have dealt
    /// with it (billed the merchant, had the supplier deactivate the PIN...). `pingate audit` fails while one is open.
    Conflicts {
        #[arg(long)]
        db: String,
        /// Close this conflict (its id as listed).
        #[arg(long, requires = "note")]
        resolve: Option<i64>,
        /// What was done about it (kept with the conflict).
        #[arg(long)]
        note: Option<String>,
    },
    /// PINs voided by reversals since a time, for the supplier's deactivation: serial, product, amount, currency,
    /// when reversed, gateway, terminal, merchant and why (never a PIN). Voids whose answer was sent whole but never
    /// acknowledged (the terminal may have printed the PIN) are left out unless `--include-unacknowledged`.
    Voided {
        #[arg(long)]
        db: String,
        /// `YYYY-MM-DD` (UTC midnight), `YYYY-MM-DDTHH:MM:SSZ`, or seconds since the epoch.
        #[arg(long)]
        since: String,
        /// CSV with a header line instead of text.
        #[arg(long)]
        csv: bool,
        /// Also list the unacknowledged voids (marked `unacknowledged`): do not deactivate those on a guess.
        #[arg(long)]
        include_unacknowledged: bool,
    },
}

/// `pingate limits`: merchants' limits kept by the PIN server across every gateway (issue 20, §4).
#[derive(Subcommand)]
pub(crate) enum LimitsCommand {
    /// Set a merchant's value per UTC day in a currency (minor units: `--currency` and `--value-per-day`), or its
    /// sales per minute (`--sales-per-minute`, fixed minutes of the PIN server's clock); or remove one (`--remove`
    /// with `--currency`: the value limit in that currency; `--remove` alone: the sales per minute). Gateways with a
    /// `merchant_allowance` in that currency, or a `merchant_sales_allowance`, sell from slices of them.
    Set {
        #[arg(long)]
        db: String,
        #[arg(long)]
        merchant: String,
        /// ISO 4217 numeric.
        #[arg(long, required_unless_present_any = ["sales_per_minute", "remove"])]
        currency: Option<String>,
        #[arg(long, requires = "currency", conflicts_with_all = ["sales_per_minute", "remove"])]
        value_per_day: Option<i64>,
        /// Sales a minute across every gateway (0 to 100000; 0: none).
        #[arg(long, conflicts_with_all = ["currency", "remove"])]
        sales_per_minute: Option<i64>,
        #[arg(long)]
        remove: bool,
    },
    /// Every merchant's limit and what gateways were granted of it today (UTC), or in this minute for sales per
    /// minute.
    Show {
        #[arg(long)]
        db: String,
    },
}

/// Runs one `pingate limits` command.
pub(crate) async fn limits(cmd: LimitsCommand) -> Result<String, String> {
    let db = match &cmd {
        LimitsCommand::Set { db, .. } | LimitsCommand::Show { db } => db.clone(),
    };
    let cipher = PinCipher::without_keys();
    match DbUrl::parse(&db).map_err(|e| e.to_string())? {
        DbUrl::Sqlite(p) => run_limits(SqliteStore::open(&p, cipher).map_err(|e| e.to_string())?, cmd).await,
        DbUrl::Postgres(u) => {
            run_limits(
                PgStore::connect(&u, None, cipher).await.map_err(|e| e.to_string())?,
                cmd,
            )
            .await
        }
    }
}

async fn run_limits(mut inv: impl PinStore, cmd: LimitsCommand) -> Result<String, String> {
    let s = |e: StoreError| e.to_string();
    match cmd {
        LimitsCommand::Set {
            merchant,
            currency,
            value_per_day,
            sales_per_minute,
            remove,
            ..
        } => {
            if merchant.is_empty() || merchant.len() > crate::psp::MAX_MERCHANT_ID {
                return Err(format!("--merchant: 1 to {} characters", crate::psp::MAX_MERCHANT_ID));
            }
            let Some(currency) = currency else {
                // The sales per minute (clap allows no `--currency` only with `--sales-per-minute` or `--remove`).
                let rate = if remove { None } else { sales_per_minute };
                if rate.is_some_and(|v| !(0..=i64::from(crate::psp::MAX_SALES_SLICE)).contains(&v)) {
                    return Err(format!("--sales-per-minute: 0 to {}", crate::psp::MAX_SALES_SLICE));
                }
                inv.set_rate_limit(&merchant, rate).await.map_err(s)?;
                return Ok(match rate {
                    Some(v) => format!("merchant {merchant}: at most {v} sales a minute"),
                    None => format!("merchant {merchant}: no limit of sales per minute"),
                });
            };
            if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_digit()) {
                return Err("--currency: ISO 4217 numeric, 3 digits".into());
            }
            let value = if remove { None } else { value_per_day };
            if !remove && value.is_none() {
                return Err("--value-per-day or --remove with --currency".into());
            }
            if value.is_some_and(|v| !(0..=1_000_000_000_000).contains(&v)) {
                return Err("--value-per-day: 0 to 1000000000000".into());
            }
            inv.set_limit(&merchant, &currency, value).await.map_err(s)?;
            Ok(match value {
                Some(v) => format!("merchant {merchant}: at most {v} a day in {currency}"),
                None => format!("merchant {merchant}: no limit in {currency}"),
            })
        }
        LimitsCommand::Show { .. } => {
            let now = unix_now();
            let rows = inv.limits(now.div_euclid(86_400)).await.map_err(s)?;
            let rates = inv.rate_limits(now.div_euclid(60)).await.map_err(s)?;
            if rows.is_empty() && rates.is_empty() {
                return Ok("no merchant limits".into());
            }
            Ok(rows
                .iter()
                .map(|r| {
                    format!(
                        "{} {}: {} a day, {} granted to gateways today",
                        r.merchant_id, r.currency, r.value_per_day, r.granted_today
                    )
                })
                .chain(rates.iter().map(|r| {
                    format!(
                        "{}: {} sales a minute, {} granted to gateways this minute",
                        r.merchant_id, r.sales_per_minute, r.granted_this_minute
                    )
                }))
                .collect::<Vec<_>>()
                .join("\n"))
        }
    }
}

/// `--since`: `YYYY-MM-DD` (UTC midnight), `YYYY-MM-DDTHH:MM:SSZ`, or seconds since the epoch.
pub(crate) fn parse_since(v: &str) -> Result<i64, String> {
    if let Ok(n) = v.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("--since `{v}`: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or seconds since the epoch");
    let num = |s: &str, len: usize| -> Result<u32, String> {
        if s.len() == len && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (day, clock) = match v.split_once('T') {
        Some((d, c)) => (d, Some(c.strip_suffix('Z').ok_or_else(bad)?)),
        None => (v, None),
    };
    let parts: Vec<&str> = day.split('-').collect();
    let [y, m, d] = parts[..] else { return Err(bad()) };
    let month = time::Month::try_from(num(m, 2)? as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(num(y, 4)? as i32, month, num(d, 2)? as u8).map_err(|_| bad())?;
    let secs = match clock {
        None => 0,
        Some(c) => {
            let parts: Vec<&str> = c.split(':').collect();
            let [h, mi, se] = parts[..] else { return Err(bad()) };
            let t = time::Time::from_hms(num(h, 2)? as u8, num(mi, 2)? as u8, num(se, 2)? as u8).map_err(|_| bad())?;
            t.hour() as i64 * 3600 + t.minute() as i64 * 60 + t.second() as i64
        }
    };
    Ok(date.midnight().assume_utc().unix_timestamp() + secs)
}

/// A time as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(t: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            d.month() as u8,
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => t.to_string(),
    }
}

/// The `pingate pins voided` report (text, or CSV with a header).
pub(crate) fn voided_report(rows: &[crate::store::VoidedRow], csv: bool) -> String {
    fn field(v: &str) -> String {
        if v.contains([',', '"', '\n']) {
            format!("\"{}\"", v.replace('"', "\"\""))
        } else {
            v.to_string()
        }
    }
    if csv {
        let mut out = String::from("serial,product,amount,currency,reversed_at,gateway,terminal_id,merchant_id,reason");
        for r in rows {
            let line = [
                field(&r.serial),
                field(&r.product),
                r.amount.to_string(),
                field(&r.currency),
                rfc3339(r.reversed_at),
                field(&r.gateway),
                field(&r.terminal_id),
                field(&r.merchant_id),
                field(&r.reason),
            ]
            .join(",");
            out.push('\n');
            out.push_str(&line);
        }
        // The command line ends the output with a newline.
        return out;
    }
    if rows.is_empty() {
        return "no voided PINs".into();
    }
    rows.iter()
        .map(|r| {
            format!(
                "{} serial {} {} {} {} reversed by {} terminal {} merchant {} via {}{}",
                rfc3339(r.reversed_at),
                r.serial,
                r.product,
                r.amount,
                r.currency,
                r.reason,
                r.terminal_id,
                r.merchant_id,
                r.gateway,
                if r.reason == "unacknowledged" {
                    " (UNACKNOWLEDGED: the terminal may have printed it; do not deactivate on a guess)"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The PIN keys, as `pingate server` and the `pingate pins` commands that open PINs take them.
#[derive(clap::Args, Clone)]
pub(crate) struct KeyArgs {
    /// File with the PIN encryption keys (`id:64-hex` entries); else $PINGATE_PIN_KEYS or $PINGATE_PIN_KEY_FILE.
    #[arg(long)]
    pub(crate) pin_keys: Option<PathBuf>,
}

/// The PIN key spec: `--pin-keys FILE`, else `$PINGATE_PIN_KEYS`, else the file named by `$PINGATE_PIN_KEY_FILE`.
/// A key file group or others may read is refused.
pub(crate) fn key_spec(keys: &KeyArgs) -> Result<zeroize::Zeroizing<String>, String> {
    let file = keys
        .pin_keys
        .clone()
        .or_else(|| std::env::var_os("PINGATE_PIN_KEY_FILE").map(PathBuf::from));
    match (file, std::env::var("PINGATE_PIN_KEYS")) {
        (Some(f), _) => crate::keyfile::read_to_string(&f).map_err(|e| e.to_string()),
        (None, Ok(spec)) => Ok(zeroize::Zeroizing::new(spec)),
        (None, Err(_)) => Err("PIN keys: give --pin-keys FILE, or set PINGATE_PIN_KEYS or PINGATE_PIN_KEY_FILE".into()),
    }
}

/// Runs one `pingate pins` command, on whichever backend `--db` names.
pub(crate) async fn pins(cmd: PinsCommand) -> Result<String, String> {
    let (db, keys) = match &cmd {
        PinsCommand::Import { db, keys, .. } | PinsCommand::ReturnQuarantined { db, keys, .. } => {
            (db.clone(), Some(key_spec(keys)?))
        }
        PinsCommand::Product { db, .. }
        | PinsCommand::Stock { db }
        | PinsCommand::Leases { db }
        | PinsCommand::ReturnExpired { db, .. }
        | PinsCommand::Quarantine { db, .. }
        | PinsCommand::Conflicts { db, .. }
        | PinsCommand::Voided { db, .. } => (db.clone(), None),
    };
    // Commands that never open a PIN get no key (a database whose upgrade needs the keys waits for a start with
    // them: see schema migration 6).
    let cipher = match keys {
        Some(spec) => PinCipher::from_spec(&spec).map_err(|e| e.to_string())?,
        None => PinCipher::without_keys(),
    };
    match DbUrl::parse(&db).map_err(|e| e.to_string())? {
        DbUrl::Sqlite(p) => run(SqliteStore::open(&p, cipher).map_err(|e| e.to_string())?, cmd).await,
        DbUrl::Postgres(u) => {
            run(
                PgStore::connect(&u, None, cipher).await.map_err(|e| e.to_string())?,
                cmd,
            )
            .await
        }
    }
}

async fn run(mut inv: impl PinStore, cmd: PinsCommand) -> Result<String, String> {
    let s = |e: StoreError| e.to_string();
    match cmd {
        PinsCommand::Product {
            code,
            name,
            supplier,
            currency,
            amounts,
            ..
        } => {
            inv.upsert_product(&Product {
                code: code.clone(),
                name,
                supplier,
                currency,
                denominations: amounts,
            })
            .await
            .map_err(s)?;
            Ok(format!("product {code} saved"))
        }
        PinsCommand::Import { file, .. } => {
            let pins = import_file(&file)?;
            let bar = crate::progress::bar("importing", pins.len() as u64, "PINs");
            let mut progress = |n: usize| bar.set_position(n as u64);
            let n = inv.import_with_progress(&pins, &mut progress).await;
            // Cleared either way: the summary line (or the error) says what happened.
            bar.finish_and_clear();
            let n = n.map_err(|e| match e {
                // Line = position + 1 (the header is line 1).
                StoreError::ImportRow { row, reason } => format!("{}: line {}: {reason}", file.display(), row + 1),
                e => e.to_string(),
            })?;
            Ok(format!("imported {n} PINs from {}", file.display()))
        }
        PinsCommand::Stock { .. } => {
            let mut out = format!("{:<20} {:>12} {:<10} {:>10}\n", "product", "amount", "state", "count");
            for r in inv.stock().await.map_err(s)? {
                out.push_str(&format!(
                    "{:<20} {:>12} {:<10} {:>10}\n",
                    r.product,
                    r.amount,
                    r.state.as_str(),
                    r.count
                ));
            }
            Ok(out.trim_end().to_string())
        }
        PinsCommand::Leases { .. } => {
            let rows = inv.expired_leases(unix_now()).await.map_err(s)?;
            if rows.is_empty() {
                return Ok("no expired reservations".into());
            }
            Ok(rows
                .iter()
                .map(|(g, n)| format!("{g}: {n} reserved PINs past their lease"))
                .collect::<Vec<_>>()
                .join("\n"))
        }
        PinsCommand::ReturnExpired { gateway, .. } => {
            let n = inv.return_expired(&gateway, unix_now()).await.map_err(s)?;
            Ok(format!("returned {n} expired reservations of {gateway} to stock"))
        }
        PinsCommand::ReturnQuarantined { id, .. } => {
            inv.return_quarantined(id).await.map_err(s)?;
            Ok(format!("PIN {id} opens again and is back in stock"))
        }
        PinsCommand::Quarantine { id, .. } => {
            inv.operator_quarantine(id).await.map_err(s)?;
            Ok(format!(
                "PIN {id} is quarantined: out of sale until `pingate pins return-quarantined` puts it back"
            ))
        }
        PinsCommand::Conflicts {
            resolve: Some(id),
            note,
            ..
        } => {
            let note = note.unwrap_or_default();
            if note.trim().is_empty() {
                return Err("--note: say what was done about the conflict".into());
            }
            inv.resolve_conflict(id, &note, unix_now()).await.map_err(s)?;
            Ok(format!("conflict {id} resolved"))
        }
        PinsCommand::Voided {
            since,
            csv,
            include_unacknowledged,
            ..
        } => {
            let since = parse_since(&since)?;
            let rows = inv.voided(since, include_unacknowledged).await.map_err(s)?;
            Ok(voided_report(&rows, csv))
        }
        PinsCommand::Conflicts { resolve: None, .. } => {
            let rows = inv.conflicts().await.map_err(s)?;
            if rows.is_empty() {
                return Ok("no confirm conflicts".into());
            }
            Ok(rows
                .iter()
                .map(|c| {
                    let state = match &c.resolution {
                        None => "OPEN".to_string(),
                        Some(r) => format!("resolved: {r}"),
                    };
                    format!(
                        "{} PIN {} sold by {} to {}/{}/{} (merchant {}) at {}: {}{}; {state}",
                        c.id,
                        c.pin_id,
                        c.gateway,
                        c.terminal_id,
                        c.stan,
                        c.transmission,
                        c.merchant_id,
                        c.at,
                        c.reason,
                        if c.voided { ", voided" } else { "" },
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_day_a_time_or_seconds() {
        assert_eq!(parse_since("1764590400").unwrap(), 1_764_590_400);
        assert_eq!(parse_since("2025-12-01").unwrap(), 1_764_547_200);
        assert_eq!(parse_since("2025-12-01T12:00:00Z").unwrap(), 1_764_590_400);
        for bad in ["2025-13-01", "yesterday", "2025-12-01T12:00", "2025-12-1"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
        assert_eq!(rfc3339(1_764_590_400), "2025-12-01T12:00:00Z");
    }

    #[test]
    fn csv_rows_and_errors() {
        let ok = "product,amount,pin,serial,expiry,receipt\nTOPUP,1000,123456789012,S1,20271231,\"Dial *100*PIN#, then OK\"|Thanks\nTOPUP,1000,9999,S2,,\n";
        let pins = read_csv(ok).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(
            pins[0].receipt,
            vec!["Dial *100*PIN#, then OK".to_string(), "Thanks".to_string()]
        );
        assert_eq!(pins[1].expiry, None);
        let e = read_csv("product,amount,pin,serial,expiry,receipt\nTOPUP,ten,1234,S,,\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: amount `ten` is not a whole number of minor units"
        );
        let e = read_csv("product,amount,pin,serial,expiry,receipt\n\nTOPUP,10,12,S,,\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: pin must be 4 to 40 letters or digits (2 characters given)"
        );
        assert!(!e.to_string().contains("12,"));
        assert_eq!(read_csv("a,b\n").unwrap_err().line, 1);
        // A receipt line that shows the PIN (spaced, dashed or in other case included) would keep it in clear beside
        // its sealed copy: refused, naming the line and the receipt line, never the PIN.
        for (pin, receipt) in [
            ("123456789012", "Thanks|Your PIN: 1234 5678 9012"),
            ("123456789012", "Thanks|PIN=1234-5678-9012#"),
            ("AB12CD34", "Thanks|code ab12cd34"),
        ] {
            let text = format!("product,amount,pin,serial,expiry,receipt\nT,1,9999,S1,,ok\nT,1,{pin},S2,,{receipt}\n");
            let e = read_csv(&text).unwrap_err();
            assert_eq!(
                e.to_string(),
                "line 3: receipt line 2 contains the PIN (receipts are stored in clear: give the PIN its own field only)"
            );
            assert!(!e.to_string().contains(&pin[..4]), "{e}");
        }
        assert!(read_csv("product,amount,pin,serial,expiry,receipt\nT,1,1234,S1,,Call 123 or 4 then 5\n").is_ok());
        assert_eq!(
            read_csv("product,amount,pin,serial,expiry,receipt\nT,1,1234,S,2027,\n")
                .unwrap_err()
                .line,
            2
        );
    }
}
