//! SQLite backend: one file, WAL, `synchronous=FULL` (an acknowledged sale survives a power cut), write
//! transactions started with `BEGIN IMMEDIATE` so concurrent writers queue instead of failing. Several requests can
//! share one transaction ([`SqliteStore::sell_batch`]): that is how durable sales share a disk sync.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{
    Confirmation, Dispensed, NewPin, Op, Outcome, PinRow, PinState, Product, Reversal, SaleContext, SellRequest,
    StockRow, StoreError, MAX_QUARANTINE_PER_OP,
};
use crate::clock::unix_now;
use crate::crypto::{PinCipher, RowAd, Sealed};
use crate::psp::MAX_RESERVE;

/// One audit row: (from state, to state, holder); `from` is `None` for the row written when the PIN was loaded.
pub type AuditRow = (Option<String>, String, Option<String>);

/// How often import reports progress.
pub const IMPORT_PROGRESS_EVERY: usize = 5_000;

/// Version of the schema this code writes; older files are migrated on open.
pub const SCHEMA_VERSION: i64 = 9;

/// The schema version whose migration seals every PIN again bound to its row ([`reseal_pins`]).
const RESEAL_VERSION: i64 = 6;

const SCHEMA_V1: &str = "
CREATE TABLE products (
    code TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    supplier TEXT NOT NULL,
    currency TEXT NOT NULL
);
CREATE TABLE denominations (
    product TEXT NOT NULL REFERENCES products(code),
    amount INTEGER NOT NULL CHECK (amount > 0),
    PRIMARY KEY (product, amount)
);
CREATE TABLE pins (
    id INTEGER PRIMARY KEY,
    product TEXT NOT NULL,
    amount INTEGER NOT NULL,
    serial TEXT NOT NULL UNIQUE,
    fingerprint BLOB NOT NULL UNIQUE,
    key_id INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    expiry TEXT,
    receipt TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('available', 'reserved', 'sold', 'voided', 'expired')),
    holder TEXT,
    lease_until INTEGER,
    FOREIGN KEY (product, amount) REFERENCES denominations(product, amount)
);
-- Picking the next available PIN stays O(1) however many are sold: the index holds available PINs only.
CREATE INDEX pins_available ON pins(product, amount, id) WHERE state = 'available';
CREATE INDEX pins_reserved ON pins(holder, lease_until) WHERE state = 'reserved';
CREATE TABLE sales (
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission TEXT NOT NULL,
    pin_id INTEGER NOT NULL UNIQUE REFERENCES pins(id),
    merchant_id TEXT NOT NULL,
    rrn TEXT NOT NULL,
    product TEXT NOT NULL,
    amount INTEGER NOT NULL,
    sold_at INTEGER NOT NULL,
    PRIMARY KEY (gateway, terminal_id, stan, transmission)
);
CREATE TABLE reversals (
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission TEXT NOT NULL,
    pin_id INTEGER,
    at INTEGER NOT NULL,
    PRIMARY KEY (gateway, terminal_id, stan, transmission)
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    pin_id INTEGER NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    holder TEXT,
    at INTEGER NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER pins_audit_insert AFTER INSERT ON pins BEGIN
    INSERT INTO audit (pin_id, from_state, to_state, holder, at)
    VALUES (NEW.id, NULL, NEW.state, NEW.holder, CAST(strftime('%s', 'now') AS INTEGER));
END;
CREATE TRIGGER pins_audit_update AFTER UPDATE OF state ON pins WHEN NEW.state <> OLD.state BEGIN
    INSERT INTO audit (pin_id, from_state, to_state, holder, at)
    VALUES (NEW.id, OLD.state, NEW.state, COALESCE(NEW.holder, OLD.holder), CAST(strftime('%s', 'now') AS INTEGER));
END;
CREATE TRIGGER pins_no_delete BEFORE DELETE ON pins BEGIN SELECT RAISE(ABORT, 'PINs are never deleted'); END;
";

/// Migration 4: the sales table again, under its new key (see `migrate`).
const SALES_V4: &str = "
CREATE TABLE sales_v4 (
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission TEXT NOT NULL,
    pin_id INTEGER NOT NULL UNIQUE REFERENCES pins(id),
    merchant_id TEXT NOT NULL,
    rrn TEXT NOT NULL,
    product TEXT NOT NULL,
    amount INTEGER NOT NULL,
    sold_at INTEGER NOT NULL,
    PRIMARY KEY (transmission, stan, terminal_id, gateway)
);
INSERT INTO sales_v4 (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product, amount, sold_at)
    SELECT gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product, amount, sold_at FROM sales;
DROP TABLE sales;
ALTER TABLE sales_v4 RENAME TO sales;
";

/// Migration 5: reversals keyed like the sales (transmission, stan, terminal, gateway: found by the first three,
/// whichever gateway sold), with what a remembered reversal named; then every key bound to its year.
const REVERSALS_V5: &str = "
CREATE TABLE reversals_v5 (
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission TEXT NOT NULL,
    pin_id INTEGER,
    at INTEGER NOT NULL,
    product TEXT,
    amount INTEGER,
    merchant_id TEXT,
    PRIMARY KEY (transmission, stan, terminal_id, gateway)
);
INSERT INTO reversals_v5 (gateway, terminal_id, stan, transmission, pin_id, at)
    SELECT gateway, terminal_id, stan, transmission, pin_id, at FROM reversals;
DROP TABLE reversals;
ALTER TABLE reversals_v5 RENAME TO reversals;
";

/// Migration 5 binds the keys already recorded (`MMDDhhmmss`) to the year they were made in (`table`'s time column
/// `at`), as a gateway binds a new one: the year of the record's time, or the one before or after when the record
/// was written across New Year.
fn qualify_years(table: &str, at: &str) -> String {
    format!(
        "UPDATE {table} SET transmission = printf('%04d', CAST(strftime('%Y', {at}, 'unixepoch') AS INTEGER)
            + CASE WHEN substr(transmission, 1, 2) = '12' AND strftime('%m', {at}, 'unixepoch') = '01' THEN -1
                   WHEN substr(transmission, 1, 2) = '01' AND strftime('%m', {at}, 'unixepoch') = '12' THEN 1
                   ELSE 0 END) || transmission
         WHERE length(transmission) = 10 AND NOT transmission GLOB '*[^0-9]*';"
    )
}

/// Migration 7: the audit trail as records, each naming the PINs it moved (`pins`, a JSON array of ids), so that a
/// batch of state changes writes one record instead of one row per PIN; every row of the old trail becomes a record
/// of its one PIN, under the same `seq`. Each PIN row keeps the `seq` of the record that names its last change
/// (`audit_seq`); a state change that does not name a new record (every path but the batched ones, and any
/// change made by hand) gets a record of its own from the trigger, as every change did before. `audit_trail` is the
/// trail one row per PIN and record, as `pingate audit` reads it (the same view on PostgreSQL).
const AUDIT_V7: &str = "
DROP TRIGGER pins_audit_insert;
DROP TRIGGER pins_audit_update;
ALTER TABLE audit RENAME TO audit_v6;
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    from_state TEXT,
    to_state TEXT NOT NULL,
    holder TEXT,
    at INTEGER NOT NULL,
    pins TEXT NOT NULL
);
INSERT INTO audit (seq, from_state, to_state, holder, at, pins)
    SELECT seq, from_state, to_state, holder, at, json_array(pin_id) FROM audit_v6 ORDER BY seq;
UPDATE sqlite_sequence SET seq = (SELECT MAX(seq) FROM sqlite_sequence WHERE name IN ('audit', 'audit_v6'))
    WHERE name = 'audit';
DROP TABLE audit_v6;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
ALTER TABLE pins ADD COLUMN audit_seq INTEGER;
CREATE TRIGGER pins_audit_insert AFTER INSERT ON pins WHEN NEW.audit_seq IS NULL BEGIN
    INSERT INTO audit (from_state, to_state, holder, at, pins)
    VALUES (NULL, NEW.state, NEW.holder, CAST(strftime('%s', 'now') AS INTEGER), json_array(NEW.id));
END;
CREATE TRIGGER pins_audit_update AFTER UPDATE OF state ON pins
    WHEN NEW.state <> OLD.state AND NEW.audit_seq IS OLD.audit_seq BEGIN
    INSERT INTO audit (from_state, to_state, holder, at, pins)
    VALUES (OLD.state, NEW.state, COALESCE(NEW.holder, OLD.holder), CAST(strftime('%s', 'now') AS INTEGER),
            json_array(NEW.id));
END;
-- A move that names a record (the batched ones) must name a record of this move: a state change cannot be kept
-- out of the trail by naming a record that does not exist or records another move, nor a PIN be loaded under a
-- record that is not a load. (Whether the record names the PIN is `pingate audit`'s to check: a PIN it does not
-- name has a trail that disagrees with its state.)
CREATE TRIGGER pins_audit_claim BEFORE UPDATE OF state, audit_seq ON pins
    WHEN NEW.audit_seq IS NOT OLD.audit_seq AND NOT EXISTS (
        SELECT 1 FROM audit WHERE seq = NEW.audit_seq AND from_state = OLD.state AND to_state = NEW.state)
BEGIN SELECT RAISE(ABORT, 'a PIN moved under an audit record that does not record the move'); END;
CREATE TRIGGER pins_audit_claim_load BEFORE INSERT ON pins
    WHEN NEW.audit_seq IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM audit WHERE seq = NEW.audit_seq AND from_state IS NULL AND to_state = NEW.state)
BEGIN SELECT RAISE(ABORT, 'a PIN loaded under an audit record that does not record the load'); END;
CREATE VIEW audit_trail AS
    SELECT a.seq AS seq, CAST(j.value AS INTEGER) AS pin_id, a.from_state AS from_state, a.to_state AS to_state,
           a.holder AS holder, a.at AS at
    FROM audit a, json_each(a.pins) j;
";

/// The state CHECK of schema versions 1 and 2 (migration 3 widens it to [`PinState::check_sql`]).
const STATES_V1: &str = "CHECK (state IN ('available', 'reserved', 'sold', 'voided', 'expired'))";

/// The trigger that refuses any state change outside [`PinState::can_move_to`], generated from it.
fn edges_trigger() -> String {
    format!(
        "CREATE TRIGGER pins_state_edges BEFORE UPDATE OF state ON pins WHEN NEW.state <> OLD.state AND NOT ({}) \
         BEGIN SELECT RAISE(ABORT, 'illegal PIN state change'); END;",
        PinState::allowed_edges_sql()
    )
}

/// The inventory in one SQLite file. One `SqliteStore` is one connection; several (threads or processes) may
/// share a file safely.
pub struct SqliteStore {
    conn: Connection,
    cipher: PinCipher,
    /// The file's schema version once opened: below 7 (a file waiting for the PIN keys to be migrated), the
    /// operations that write audit records themselves are refused.
    version: i64,
}

const PIN_COLUMNS: &str = "id, product, amount, serial, key_id, nonce, ciphertext, expiry, receipt";

impl SqliteStore {
    /// Opens (creating and migrating as needed) the inventory at `path`.
    pub fn open(path: &Path, cipher: PinCipher) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = SqliteStore {
            conn,
            cipher,
            version: 0,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Db(format!(
                "database schema is version {version}, newer than this pingate ({SCHEMA_VERSION}): upgrade pingate"
            )));
        }
        if version < 1 {
            tx.execute_batch(SCHEMA_V1)?;
            tx.execute_batch(&edges_trigger())?;
        }
        if version < 2 {
            // The available PINs that carry an expiry date, so that moving those past their date to `expired` (at
            // every server start and every hour) reads only them.
            tx.execute_batch(
                "CREATE INDEX pins_expiring ON pins(expiry) WHERE state = 'available' AND expiry IS NOT NULL",
            )?;
        }
        if version < 3 {
            // The `quarantined` state: a new edge (the trigger is made again from `PinState`), and a CHECK that
            // takes the new state. SQLite cannot alter a CHECK; a CHECK that only admits more values does not change
            // what is on disk, so the table's recorded SQL is edited in place (SQLite's documented procedure for
            // such changes: `writable_schema`, then a new schema version), instead of copying every PIN.
            tx.execute_batch(&format!("DROP TRIGGER pins_state_edges; {}", edges_trigger()))?;
            let sql: String = tx.query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'pins'",
                [],
                |r| r.get(0),
            )?;
            let new = sql.replace(STATES_V1, &PinState::check_sql());
            if new == sql {
                return Err(StoreError::Db(
                    "schema migration 3: the pins table's state CHECK is not the one expected".into(),
                ));
            }
            let cookie: i64 = tx.pragma_query_value(None, "schema_version", |r| r.get(0))?;
            tx.pragma_update(None, "writable_schema", true)?;
            tx.execute(
                "UPDATE sqlite_schema SET sql = ?1 WHERE type = 'table' AND name = 'pins'",
                params![new],
            )?;
            tx.pragma_update(None, "schema_version", cookie + 1)?;
            tx.pragma_update(None, "writable_schema", false)?;
        }
        if version < 4 {
            // Sales keyed by (transmission, stan, terminal, gateway) instead of (gateway, terminal, stan,
            // transmission): every lookup gives the whole key, so only the order changes, and in this order new
            // sales land at the end of the index (transmission times move on) instead of one page per terminal:
            // with 5,000 terminals a sale or a confirm costs the store a fifth less. SQLite cannot change a primary
            // key: the table is copied (once, at this start).
            tx.execute_batch(SALES_V4)?;
        }
        if version < 5 {
            // Keys without the gateway, bound to their year; refused confirms, re-deliveries; and the new edge
            // reserved → voided (a refused confirm's PIN).
            tx.execute_batch(REVERSALS_V5)?;
            tx.execute_batch(&super::schema_v5_tables("INTEGER PRIMARY KEY"))?;
            tx.execute_batch(&qualify_years("sales", "sold_at"))?;
            tx.execute_batch(&qualify_years("reversals", "at"))?;
            tx.execute_batch(&format!("DROP TRIGGER pins_state_edges; {}", edges_trigger()))?;
        }
        // Needs the PIN keys: opened without them (operator commands that never open a PIN), the file stays at the
        // version before until a start with the keys. A step added after this one waits with it.
        let resealed = version >= RESEAL_VERSION || reseal_pins(&tx, &self.cipher)?;
        if resealed && version < 7 {
            // The audit trail as records naming their PINs (one per batch), see `AUDIT_V7`.
            tx.execute_batch(AUDIT_V7)?;
        }
        if resealed && version < 8 {
            // Why each reversal was made (`NULL`: the terminal asked; `undelivered`, `unacknowledged`: the
            // gateway's own), for `pingate pins voided`.
            tx.execute_batch("ALTER TABLE reversals ADD COLUMN reason TEXT")?;
            tx.execute_batch(super::LIMITS_V8)?;
        }
        if resealed && version < 9 {
            // Merchants' sales per minute across every gateway, and their grants by minute.
            tx.execute_batch(super::RATES_V9)?;
        }
        let reached = if resealed { SCHEMA_VERSION } else { RESEAL_VERSION - 1 };
        tx.pragma_update(None, "user_version", reached.max(version))?;
        self.version = reached.max(version);
        tx.commit()?;
        Ok(())
    }

    /// Refuses when available PINs are sealed under a key this store was not given (naming them when few);
    /// logs reserved ones (see `UNSOLD_KEY_IDS`).
    pub fn check_keys(&self) -> Result<(), StoreError> {
        check_keys(&self.conn, &self.cipher)
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn immediate(&mut self) -> Result<Transaction<'_>, StoreError> {
        Ok(self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    /// Adds a product or updates its name, supplier and currency, and adds its denominations.
    pub fn upsert_product(&mut self, p: &Product) -> Result<(), StoreError> {
        let tx = self.immediate()?;
        tx.execute(
            "INSERT INTO products (code, name, supplier, currency) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (code) DO UPDATE SET name = ?2, supplier = ?3, currency = ?4",
            params![p.code, p.name, p.supplier, p.currency],
        )?;
        for a in &p.denominations {
            tx.execute(
                "INSERT OR IGNORE INTO denominations (product, amount) VALUES (?1, ?2)",
                params![p.code, a],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The catalog.
    pub fn catalog(&self) -> Result<Vec<Product>, StoreError> {
        catalog(&self.conn)
    }

    /// Loads PINs, all or nothing. An error names the 1-based position of the offending PIN in `pins`.
    pub fn import(&mut self, pins: &[NewPin]) -> Result<usize, StoreError> {
        self.import_with_progress(pins, &mut |_| {})
    }

    /// [`SqliteStore::import`], calling `progress` with the number of PINs written so far every few thousand.
    pub fn import_with_progress(
        &mut self,
        pins: &[NewPin],
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<usize, StoreError> {
        let prints: Vec<Vec<u8>> = pins
            .iter()
            .map(|p| self.cipher.fingerprint(&p.product, &p.pin))
            .collect();
        self.check_version()?;
        let (cipher, tx) = (
            &self.cipher,
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?,
        );
        {
            // Each PIN is sealed bound to its row, id included: the ids are given here (this transaction is the only
            // writer), so that each row is written once.
            let first: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM pins", [], |r| r.get(0))?;
            let now = unix_now();
            let mut denom = tx.prepare_cached("SELECT 1 FROM denominations WHERE product = ?1 AND amount = ?2")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO pins (id, product, amount, serial, fingerprint, key_id, nonce, ciphertext, expiry, receipt,
                                   state, audit_seq)
                 VALUES (?10, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'available', ?11)",
            )?;
            let mut seq = 0;
            for (i, (p, fp)) in pins.iter().zip(&prints).enumerate() {
                let row = i + 1;
                if row % IMPORT_PROGRESS_EVERY == 0 {
                    progress(row);
                }
                // One audit record per thousand PINs loaded, written before them.
                if i % MAX_RESERVE == 0 {
                    let ids: Vec<i64> = (i..pins.len().min(i + MAX_RESERVE)).map(|k| first + k as i64).collect();
                    seq = audit_record(&tx, None, PinState::Available, None, now, &ids)?;
                }
                p.check_receipt()
                    .map_err(|reason| StoreError::ImportRow { row, reason })?;
                if !denom.exists(params![p.product, p.amount])? {
                    return Err(StoreError::ImportRow {
                        row,
                        reason: format!("product `{}` has no denomination {}", p.product, p.amount),
                    });
                }
                let id = first + i as i64;
                let s = cipher.seal_row(
                    &p.pin,
                    &RowAd {
                        id,
                        product: &p.product,
                        amount: p.amount,
                        serial: &p.serial,
                    },
                )?;
                let receipt = serde_json::to_string(&p.receipt).expect("strings serialise");
                let r = insert.execute(params![
                    p.product,
                    p.amount,
                    p.serial,
                    fp,
                    s.key_id,
                    &s.nonce[..],
                    s.ciphertext,
                    p.expiry,
                    receipt,
                    id,
                    seq
                ]);
                if let Err(e) = r {
                    let msg = e.to_string();
                    let what = if msg.contains("pins.serial") {
                        format!("duplicate serial `{}`", p.serial)
                    } else if msg.contains("pins.fingerprint") {
                        "duplicate PIN value (already loaded, or twice in this file)".to_string()
                    } else {
                        msg
                    };
                    return Err(StoreError::ImportRow { row, reason: what });
                }
            }
        }
        tx.commit()?;
        Ok(pins.len())
    }

    /// Applies several operations in one transaction (one disk sync for all of them: group commit), in their
    /// order. Each gets its own result; a refused operation does not undo the others (every refusal is found by
    /// reading, before the operation writes anything: no savepoints). A database error fails every operation and
    /// keeps nothing of the batch, as does a failed commit.
    ///
    /// Consecutive confirms are applied together ([`confirm_group`]): their PINs move to `sold` in one statement,
    /// under one audit record per holder; a reservation moves its PINs in one statement under one record.
    pub fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Outcome, StoreError>> {
        self.apply_batch_then(ops, &mut || None)
    }

    /// [`SqliteStore::apply_batch`], then, in the same transaction, the operations `more` gives (in order, until it
    /// gives `None`): operations that arrived while the batch was applied share its commit instead of waiting for
    /// it and paying one of their own. One result per operation, those of `ops` first; on a database error every
    /// operation taken fails.
    pub fn apply_batch_then(
        &mut self,
        ops: &[Op],
        more: &mut dyn FnMut() -> Option<Vec<Op>>,
    ) -> Vec<Result<Outcome, StoreError>> {
        if let Err(e) = self.check_version() {
            return super::failed_batch(ops.len(), &e.to_string());
        }
        let now = unix_now();
        let today = today();
        let tx = match self.conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(t) => t,
            Err(e) => return super::failed_batch(ops.len(), &e.to_string()),
        };
        let mut results = Vec::with_capacity(ops.len());
        let mut taken = ops.len();
        let mut r = apply_ops(&tx, &self.cipher, ops, now, &today, &mut results);
        while r.is_ok() {
            let Some(late) = more() else { break };
            taken += late.len();
            r = apply_ops(&tx, &self.cipher, &late, now, &today, &mut results);
        }
        if let Err(msg) = r {
            drop(tx);
            return super::failed_batch(taken, &msg);
        }
        if let Err(e) = tx.commit() {
            return super::failed_batch(taken, &e.to_string());
        }
        results
    }

    /// Refuses the operations that write audit records of their own on a file not migrated to this schema yet (see
    /// `migrate`: it waits for a start with the PIN keys).
    fn check_version(&self) -> Result<(), StoreError> {
        if self.version < SCHEMA_VERSION {
            return Err(StoreError::Db(format!(
                "database schema is version {}: open it once with the PIN keys to migrate it to version \
                 {SCHEMA_VERSION}",
                self.version
            )));
        }
        Ok(())
    }

    fn apply_one(&mut self, op: Op) -> Result<Outcome, StoreError> {
        self.apply_batch(std::slice::from_ref(&op))
            .pop()
            .expect("one result per operation")
    }

    /// Sells one PIN on demand. Idempotent on the sale's key.
    pub fn sell(&mut self, req: &SellRequest) -> Result<Dispensed, StoreError> {
        match self.apply_one(Op::Sell(req.clone()))? {
            Outcome::Sold(d) => Ok(d),
            o => Err(unexpected(o)),
        }
    }

    /// Sells several PINs in one transaction.
    pub fn sell_batch(&mut self, reqs: &[SellRequest]) -> Vec<Result<Dispensed, StoreError>> {
        let ops: Vec<Op> = reqs.iter().cloned().map(Op::Sell).collect();
        self.apply_batch(&ops)
            .into_iter()
            .map(|r| match r? {
                Outcome::Sold(d) => Ok(d),
                o => Err(unexpected(o)),
            })
            .collect()
    }

    /// Reserves up to `n` PINs for a gateway's cache, leased until `lease_until` (unix seconds). Fewer (even none)
    /// when stock is short.
    pub fn reserve(
        &mut self,
        holder: &str,
        product: &str,
        amount: i64,
        n: usize,
        lease_until: i64,
    ) -> Result<Vec<Dispensed>, StoreError> {
        let op = Op::Reserve {
            holder: holder.into(),
            product: product.into(),
            amount,
            count: n,
            lease_until,
        };
        match self.apply_one(op)? {
            Outcome::Reserved(v) => Ok(v),
            o => Err(unexpected(o)),
        }
    }

    /// A PIN reserved by `holder` was sold from its cache. Idempotent: confirming the same PIN with the same key
    /// again is fine. If the sale's key was reversed before the confirm arrived, the PIN is sold and voided at once.
    pub fn confirm(&mut self, holder: &str, pin_id: i64, sale: &SaleContext) -> Result<Confirmation, StoreError> {
        match self.apply_one(Op::Confirm {
            holder: holder.into(),
            pin_id,
            sale: sale.clone(),
        })? {
            Outcome::Confirmed(c) => Ok(c),
            o => Err(unexpected(o)),
        }
    }

    /// Returns unsold PINs held by `holder` to stock. Returns the ids that were not reserved by `holder` (already
    /// sold, released before, or someone else's): those are left as they are.
    pub fn release(&mut self, holder: &str, pin_ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        match self.apply_one(Op::Release {
            holder: holder.into(),
            pin_ids: pin_ids.to_vec(),
        })? {
            Outcome::Released { refused } => Ok(refused),
            o => Err(unexpected(o)),
        }
    }

    /// Extends the leases of PINs `holder` holds; returns how many were extended.
    pub fn renew(&mut self, holder: &str, pin_ids: &[i64], lease_until: i64) -> Result<usize, StoreError> {
        match self.apply_one(Op::Renew {
            holder: holder.into(),
            pin_ids: pin_ids.to_vec(),
            lease_until,
        })? {
            Outcome::Renewed(n) => Ok(n),
            o => Err(unexpected(o)),
        }
    }

    /// Reverses the sale with this key: sold → voided. Idempotent; a reversal that arrives before its sale is
    /// remembered and the late sale is refused.
    pub fn reverse(&mut self, sale: &SaleContext) -> Result<Reversal, StoreError> {
        self.reverse_checked(sale, None)
    }

    /// [`SqliteStore::reverse`], refused ([`StoreError::ReversalMismatch`]) when `content` differs from the sale's.
    pub fn reverse_checked(
        &mut self,
        sale: &SaleContext,
        content: Option<&crate::sale::SaleContent>,
    ) -> Result<Reversal, StoreError> {
        match self.apply_one(Op::Reverse {
            sale: sale.clone(),
            content: content.cloned(),
            policy: Default::default(),
        })? {
            Outcome::Reversed(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    /// Available PINs past their expiry date (`YYYYMMDD` before `today`) become expired; returns how many.
    pub fn expire(&mut self, today: &str) -> Result<usize, StoreError> {
        let tx = self.immediate()?;
        let n = expire_available(&tx, today)?;
        tx.commit()?;
        Ok(n)
    }

    /// Reservations whose lease ended before `now`, per holder. They are reported, never freed by themselves: the
    /// holder may have sold them while cut off.
    pub fn expired_leases(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT holder, COUNT(*) FROM pins WHERE state = 'reserved' AND lease_until < ?1 GROUP BY holder ORDER BY holder",
        )?;
        let rows = stmt.query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Operator command, once `holder`'s journal is reconciled (or it holds none): its expired reservations go
    /// back to stock. Returns how many.
    pub fn return_expired(&mut self, holder: &str, now: i64) -> Result<usize, StoreError> {
        let tx = self.immediate()?;
        let n = tx.execute(
            "UPDATE pins SET state = 'available', lease_until = NULL
             WHERE state = 'reserved' AND holder = ?1 AND lease_until < ?2",
            params![holder, now],
        )?;
        tx.execute(
            "UPDATE pins SET holder = NULL WHERE state = 'available' AND holder = ?1",
            params![holder],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Operator command: a quarantined PIN whose row opens again goes back to stock (see [`super::PinStore`]).
    pub fn return_quarantined(&mut self, pin_id: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                &format!("SELECT {PIN_COLUMNS}, state FROM pins WHERE id = ?1"),
                params![pin_id],
                |r| Ok((pin_row(r)?, r.get::<_, String>(9)?)),
            )
            .optional()?;
        super::check_returnable(row, pin_id, &self.cipher)?;
        tx.execute(
            "UPDATE pins SET state = 'available' WHERE id = ?1 AND state = 'quarantined'",
            params![pin_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Operator command: an available PIN is quarantined on the operator's word (see [`super::PinStore`]).
    pub fn operator_quarantine(&mut self, pin_id: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state = tx
            .query_row("SELECT state FROM pins WHERE id = ?1", params![pin_id], |r| r.get(0))
            .optional()?;
        super::check_quarantinable(state, pin_id)?;
        tx.execute(super::QUARANTINE, params![pin_id])?;
        tx.commit()?;
        Ok(())
    }

    /// Count of PINs per product, amount and state.
    pub fn stock(&self) -> Result<Vec<StockRow>, StoreError> {
        stock(&self.conn)
    }

    /// The audit trail of one PIN, oldest first.
    pub fn audit_of(&self, pin_id: i64) -> Result<Vec<AuditRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT from_state, to_state, holder FROM audit_trail WHERE pin_id = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![pin_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Direct access for tests and the audit command (read-only use intended).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// See [`SqliteStore::check_keys`].
fn check_keys(conn: &Connection, cipher: &PinCipher) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(super::UNSOLD_KEY_IDS)?;
    let in_use = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u32, r.get::<_, bool>(1)?, r.get(2)?))
        })?
        .collect::<Result<Vec<(u32, bool, i64)>, _>>()?;
    let mut missing = Vec::new();
    for (key, n) in super::available_without_key(cipher, &in_use) {
        let ids = if n <= crate::crypto::NAMED_ROWS {
            let mut ids = conn.prepare(super::AVAILABLE_OF_KEY)?;
            let ids = ids.query_map(params![key], |r| r.get(0))?;
            ids.collect::<Result<Vec<i64>, _>>()?
        } else {
            Vec::new()
        };
        missing.push((key, n, ids));
    }
    Ok(crate::crypto::CryptoError::check_missing(&missing)?)
}

/// Schema migration 6: every PIN sealed again bound to its row ([`RowAd`]: id, product, amount, serial, key id)
/// instead of its serial alone, so that a row moved to another product or amount no longer opens. Self-contained:
/// a later migration may be numbered before it. Needs the PIN keys: without them, and with PINs to seal, it changes
/// nothing and returns false. Refused (see [`super::Reseal::finish`]) when available PINs need a key that is not
/// loaded, or a loaded key opens none of its PINs.
fn reseal_pins(tx: &Connection, cipher: &PinCipher) -> Result<bool, StoreError> {
    if !tx.prepare("SELECT 1 FROM pins LIMIT 1")?.exists([])? {
        return Ok(true);
    }
    if !cipher.has_keys() {
        tracing::info!(
            "schema migration 6 (PINs sealed again, bound to their rows) waits for a start with the PIN keys"
        );
        return Ok(false);
    }
    check_keys(tx, cipher)?;
    let mut reseal = super::Reseal::default();
    let mut read = tx.prepare(&format!(
        "SELECT {PIN_COLUMNS}, state FROM pins WHERE id > ?1 ORDER BY id LIMIT 10000"
    ))?;
    let mut write = tx.prepare("UPDATE pins SET nonce = ?1, ciphertext = ?2 WHERE id = ?3")?;
    let mut after = 0;
    loop {
        let rows = read
            .query_map(params![after], |r| Ok((pin_row(r)?, r.get::<_, String>(9)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let Some((last, _)) = rows.last() else { break };
        after = last.id;
        for (row, state) in &rows {
            if let Some(s) = reseal.row(cipher, row, state) {
                write.execute(params![&s.nonce[..], s.ciphertext, row.id])?;
            }
        }
    }
    reseal.finish()?;
    Ok(true)
}

/// `YYYYMMDD` of today (UTC), to compare with PIN expiry dates.
pub(crate) fn today() -> String {
    let days = unix_now().div_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}")
}

fn pin_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PinRow> {
    let nonce: Vec<u8> = r.get(5)?;
    Ok(PinRow {
        id: r.get(0)?,
        product: r.get(1)?,
        amount: r.get(2)?,
        serial: r.get(3)?,
        sealed: Sealed {
            key_id: r.get(4)?,
            nonce: nonce.try_into().unwrap_or([0; 12]),
            ciphertext: r.get(6)?,
        },
        expiry: r.get(7)?,
        receipt: r.get(8)?,
    })
}

fn check_denomination(tx: &Connection, product: &str, amount: i64) -> Result<(), StoreError> {
    let known: bool = tx
        .prepare_cached("SELECT 1 FROM products WHERE code = ?1")?
        .exists(params![product])?;
    if !known {
        return Err(StoreError::UnknownProduct(product.to_string()));
    }
    let offered = tx
        .prepare_cached("SELECT 1 FROM denominations WHERE product = ?1 AND amount = ?2")?
        .exists(params![product, amount])?;
    if !offered {
        return Err(StoreError::UnknownDenomination {
            product: product.to_string(),
            amount,
        });
    }
    Ok(())
}

/// Available PINs past their expiry date become expired; returns how many.
fn expire_available(tx: &Connection, today: &str) -> Result<usize, StoreError> {
    Ok(tx
        .prepare_cached(
            "UPDATE pins SET state = 'expired' WHERE state = 'available' AND expiry IS NOT NULL AND expiry < ?1",
        )?
        .execute(params![today])?)
}

/// The sale recorded under a key, whichever gateway made it.
struct FoundSale {
    pin_id: i64,
    state: PinState,
    product: String,
    amount: i64,
    merchant: String,
    sold_at: i64,
    /// The currency of the sale's product.
    currency: Option<String>,
}

/// The PIN sold under this key, its state, and what the sale bought.
fn find_sale(tx: &Connection, sale: &SaleContext) -> Result<Option<FoundSale>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT s.pin_id, p.state, s.product, s.amount, s.merchant_id, s.sold_at, pr.currency
             FROM sales s JOIN pins p ON p.id = s.pin_id LEFT JOIN products pr ON pr.code = s.product
             WHERE s.transmission = ?1 AND s.stan = ?2 AND s.terminal_id = ?3",
        )?
        .query_row(params![sale.transmission, sale.stan, sale.terminal_id], |r| {
            let s: String = r.get(1)?;
            Ok(FoundSale {
                pin_id: r.get(0)?,
                state: PinState::parse(&s).unwrap_or(PinState::Sold),
                product: r.get(2)?,
                amount: r.get(3)?,
                merchant: r.get(4)?,
                sold_at: r.get(5)?,
                currency: r.get(6)?,
            })
        })
        .optional()?)
}

fn reversal_pending(tx: &Connection, sale: &SaleContext) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM reversals WHERE transmission = ?1 AND stan = ?2 AND terminal_id = ?3")?
        .exists(params![sale.transmission, sale.stan, sale.terminal_id])?)
}

/// Records a sale: `?1` gateway, `?2` terminal, `?3` STAN, `?4` transmission, `?5` PIN, `?6` merchant, `?7` RRN,
/// `?8` product, `?9` amount, `?10` time.
const INSERT_SALE: &str = "INSERT INTO sales (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, \
     product, amount, sold_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

fn insert_sale(
    tx: &Connection,
    sale: &SaleContext,
    pin_id: i64,
    product: &str,
    amount: i64,
    now: i64,
) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(INSERT_SALE)?;
    insert_sale_with(&mut st, sale, pin_id, product, amount, now)
}

/// [`insert_sale`] with the statement already at hand (a group of confirms records its sales one after another).
fn insert_sale_with(
    st: &mut rusqlite::Statement<'_>,
    sale: &SaleContext,
    pin_id: i64,
    product: &str,
    amount: i64,
    now: i64,
) -> Result<(), StoreError> {
    st.execute(params![
        sale.gateway,
        sale.terminal_id,
        sale.stan,
        sale.transmission,
        pin_id,
        sale.merchant_id,
        super::rrn_of_pin(pin_id),
        product,
        amount,
        now
    ])?;
    Ok(())
}

fn void(tx: &Connection, sale: &SaleContext, pin_id: i64, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE pins SET state = 'voided' WHERE id = ?1 AND state = 'sold'",
        params![pin_id],
    )?;
    // One reversal row per key, whichever gateway remembered it first.
    let updated = tx
        .prepare_cached("UPDATE reversals SET pin_id = ?4 WHERE transmission = ?1 AND stan = ?2 AND terminal_id = ?3")?
        .execute(params![sale.transmission, sale.stan, sale.terminal_id, pin_id])?;
    if updated == 0 {
        tx.prepare_cached(
            "INSERT INTO reversals (gateway, terminal_id, stan, transmission, pin_id, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            sale.gateway,
            sale.terminal_id,
            sale.stan,
            sale.transmission,
            pin_id,
            now
        ])?;
    }
    Ok(())
}

/// Applies `ops` in order inside the batch's transaction, pushing one result each (see
/// [`SqliteStore::apply_batch`]); `Err` with the message when the batch must fail whole (a database error).
fn apply_ops(
    tx: &Transaction<'_>,
    cipher: &PinCipher,
    ops: &[Op],
    now: i64,
    today: &str,
    results: &mut Vec<Result<Outcome, StoreError>>,
) -> Result<(), String> {
    let mut rest = ops;
    while let Some(op) = rest.first() {
        let confirms = rest.iter().take_while(|o| matches!(o, Op::Confirm { .. })).count();
        let r: Result<Vec<Result<Outcome, StoreError>>, StoreError> = if confirms > 0 {
            let items: Vec<(&str, i64, &SaleContext)> = rest[..confirms]
                .iter()
                .filter_map(|o| match o {
                    Op::Confirm { holder, pin_id, sale } => Some((holder.as_str(), *pin_id, sale)),
                    _ => None,
                })
                .collect();
            rest = &rest[confirms..];
            confirm_group(tx, &items, now).map(|v| v.into_iter().map(|r| r.map(Outcome::Confirmed)).collect())
        } else {
            rest = &rest[1..];
            // A picked PIN that does not open is quarantined (when its key is shown right) and the operation runs
            // again: it picks the next PIN. Nothing was written before it was found.
            let mut quarantined = 0;
            let r = loop {
                match apply(tx, cipher, op, now, today) {
                    Err(StoreError::Unreadable { pin_id, reason }) if quarantined < MAX_QUARANTINE_PER_OP => {
                        match quarantine(tx, cipher, pin_id) {
                            Ok(true) => quarantined += 1,
                            Ok(false) => break Err(StoreError::Unreadable { pin_id, reason }),
                            Err(e) => break Err(e),
                        }
                    }
                    r => break r,
                }
            };
            match r {
                Err(StoreError::Db(msg)) => Err(StoreError::Db(msg)),
                r => Ok(vec![r]),
            }
        };
        // A database error fails the whole batch: SQLite may already have rolled the transaction back by itself
        // (disk full, I/O error), and what follows must not be committed on its own.
        match r {
            Ok(r) => {
                if let Some(msg) = r.iter().find_map(|r| match r {
                    Err(StoreError::Db(msg)) => Some(msg.clone()),
                    _ => None,
                }) {
                    return Err(msg);
                }
                results.extend(r);
            }
            Err(StoreError::Db(msg)) => return Err(msg),
            Err(e) => return Err(e.to_string()),
        }
        if tx.is_autocommit() {
            return Err("transaction rolled back by SQLite".into());
        }
    }
    Ok(())
}

fn sell_one(
    tx: &Connection,
    cipher: &PinCipher,
    req: &SellRequest,
    now: i64,
    today: &str,
) -> Result<Dispensed, StoreError> {
    let sale = &req.sale;
    let earlier = find_sale(tx, sale)?;
    if earlier.is_none() && reversal_pending(tx, sale)? {
        return Err(StoreError::AlreadyReversed { key: sale.key() });
    }
    if let Some(found) = earlier {
        // The same key again: the same PIN, if the request is the same, was not reversed, and is recent enough.
        super::check_repeat(
            req,
            (&found.product, found.amount, &found.merchant),
            found.state,
            found.sold_at,
        )?;
        let row = tx.query_row(
            &format!("SELECT {PIN_COLUMNS} FROM pins WHERE id = ?1"),
            params![found.pin_id],
            pin_row,
        )?;
        let mut d = row.open(cipher)?;
        tx.prepare_cached(super::INSERT_REDELIVERY)?.execute(params![
            found.pin_id,
            sale.gateway,
            sale.terminal_id,
            now
        ])?;
        d.redelivered = true;
        return Ok(d);
    }
    check_denomination(tx, &req.product, req.amount)?;
    // A read, then a write by rowid (see `confirm`: no RETURNING).
    let row = tx
        .prepare_cached(&format!(
            "SELECT {PIN_COLUMNS} FROM pins WHERE product = ?1 AND amount = ?2 AND state = 'available'
             AND (expiry IS NULL OR expiry >= ?3) ORDER BY id LIMIT 1"
        ))?
        .query_row(params![req.product, req.amount, today], pin_row)
        .optional()?;
    let Some(row) = row else {
        return Err(StoreError::OutOfStock {
            product: req.product.clone(),
            amount: req.amount,
        });
    };
    // Opened before anything is written: a row that does not open leaves nothing to undo.
    let d = row.open(cipher)?;
    mark(
        tx,
        row.id,
        PinState::Available,
        "UPDATE pins SET state = 'sold' WHERE id = ?1 AND state = 'available'",
    )?;
    insert_sale(tx, sale, row.id, &req.product, req.amount, now)?;
    Ok(d)
}

/// Runs `update` (one row, by id) on the PIN just read in state `was` in this transaction. It must change exactly
/// that row: anything else means the read and the write disagree, and fails the batch.
fn mark(tx: &Connection, pin_id: i64, was: PinState, update: &str) -> Result<(), StoreError> {
    match tx.prepare_cached(update)?.execute(params![pin_id])? {
        1 => Ok(()),
        n => Err(StoreError::Db(format!(
            "internal: PIN {pin_id} read as {} changed {n} rows",
            was.as_str()
        ))),
    }
}

fn unexpected(o: Outcome) -> StoreError {
    StoreError::Db(format!("internal: unexpected outcome {o:?}"))
}

/// Every merchant's value limit with what was granted of it on UTC day `day` (the CLI's `limits show`, the metrics).
fn limits(conn: &Connection, day: i64) -> Result<Vec<super::LimitRow>, StoreError> {
    let mut st = conn.prepare_cached(super::LIST_LIMITS)?;
    let rows = st.query_map(params![day], |r| {
        Ok(super::LimitRow {
            merchant_id: r.get(0)?,
            currency: r.get(1)?,
            value_per_day: r.get(2)?,
            granted_today: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every merchant's sales per minute with what was granted of it in minute `minute`.
fn rate_limits(conn: &Connection, minute: i64) -> Result<Vec<super::RateRow>, StoreError> {
    let mut st = conn.prepare_cached(super::LIST_RATE_LIMITS)?;
    let rows = st.query_map(params![minute], |r| {
        Ok(super::RateRow {
            merchant_id: r.get(0)?,
            sales_per_minute: r.get(1)?,
            granted_this_minute: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One operation inside the batch's transaction.
fn apply(tx: &Connection, cipher: &PinCipher, op: &Op, now: i64, today: &str) -> Result<Outcome, StoreError> {
    match op {
        Op::Sell(req) => sell_one(tx, cipher, req, now, today).map(Outcome::Sold),
        Op::Reserve {
            holder,
            product,
            amount,
            count,
            lease_until,
        } => reserve(tx, cipher, holder, product, *amount, *count, *lease_until, today, now).map(Outcome::Reserved),
        Op::Confirm { holder, pin_id, sale } => confirm_group(tx, &[(holder, *pin_id, sale)], now)?
            .pop()
            .expect("one result per confirm")
            .map(Outcome::Confirmed),
        Op::Release { holder, pin_ids } => release(tx, holder, pin_ids).map(|refused| Outcome::Released { refused }),
        Op::Renew {
            holder,
            pin_ids,
            lease_until,
        } => renew(tx, holder, pin_ids, *lease_until).map(Outcome::Renewed),
        Op::Reverse { sale, content, policy } => {
            reverse(tx, sale, content.as_ref(), policy, now).map(Outcome::Reversed)
        }
        Op::ReversePin { gateway, pin_id } => {
            let sale = tx
                .prepare_cached(
                    "SELECT gateway, terminal_id, stan, transmission, merchant_id, rrn FROM sales
                     WHERE pin_id = ?1 AND gateway = ?2",
                )?
                .query_row(params![pin_id, gateway], |r| {
                    Ok(SaleContext {
                        gateway: r.get(0)?,
                        terminal_id: r.get(1)?,
                        stan: r.get(2)?,
                        transmission: r.get(3)?,
                        merchant_id: r.get(4)?,
                        rrn: r.get(5)?,
                    })
                })
                .optional()?;
            match sale {
                Some(sale) => reverse(tx, &sale, None, &Default::default(), now).map(Outcome::Reversed),
                None => Err(StoreError::NotHolder {
                    holder: gateway.clone(),
                    pin_id: *pin_id,
                }),
            }
        }
        Op::Allowance {
            merchant_id,
            currency,
            want,
        } => {
            let limit: Option<i64> = tx
                .prepare_cached("SELECT value_per_day FROM merchant_limits WHERE merchant_id = ?1 AND currency = ?2")?
                .query_row(params![merchant_id, currency], |r| r.get(0))
                .optional()?;
            let day = now.div_euclid(86_400);
            let granted_today: i64 = tx
                .prepare_cached(
                    "SELECT granted FROM merchant_allowances WHERE merchant_id = ?1 AND currency = ?2 AND day = ?3",
                )?
                .query_row(params![merchant_id, currency, day], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let granted = super::grant_allowance(limit, granted_today, *want);
            if limit.is_some() && granted > 0 {
                tx.prepare_cached(
                    "INSERT INTO merchant_allowances (merchant_id, currency, day, granted) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (merchant_id, currency, day) DO UPDATE SET granted = granted + excluded.granted",
                )?
                .execute(params![merchant_id, currency, day, granted])?;
            }
            Ok(Outcome::Allowance {
                granted,
                limited: limit.is_some(),
            })
        }
        Op::SalesAllowance {
            merchant_id,
            minute,
            want,
        } => {
            let limit: Option<i64> = tx
                .prepare_cached("SELECT sales_per_minute FROM merchant_rate_limits WHERE merchant_id = ?1")?
                .query_row(params![merchant_id], |r| r.get(0))
                .optional()?;
            let Some(limit) = limit else {
                return Ok(Outcome::Allowance {
                    granted: (*want).max(0),
                    limited: false,
                });
            };
            // Minutes before the last are done with: their rows go, so the table keeps at most two rows per
            // merchant. The last minute's stays for a server whose clock is a little behind (servers sharing a
            // database may disagree by seconds): pruned, it would be granted afresh. (The transaction is
            // IMMEDIATE: grants are made one after another.)
            tx.prepare_cached("DELETE FROM merchant_sales_allowances WHERE merchant_id = ?1 AND minute < ?2 - 1")?
                .execute(params![merchant_id, minute])?;
            let granted_now: i64 = tx
                .prepare_cached("SELECT granted FROM merchant_sales_allowances WHERE merchant_id = ?1 AND minute = ?2")?
                .query_row(params![merchant_id, minute], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let granted = super::grant_allowance(Some(limit), granted_now, *want);
            if granted > 0 {
                tx.prepare_cached(
                    "INSERT INTO merchant_sales_allowances (merchant_id, minute, granted) VALUES (?1, ?2, ?3)
                     ON CONFLICT (merchant_id, minute) DO UPDATE SET granted = granted + excluded.granted",
                )?
                .execute(params![merchant_id, minute, granted])?;
            }
            Ok(Outcome::Allowance { granted, limited: true })
        }
        Op::Stock => stock(tx).map(Outcome::Stock),
        Op::Expire => expire_available(tx, today).map(|n| Outcome::Expired(n as u64)),
        Op::Catalog => catalog(tx).map(Outcome::Catalog),
        Op::CheckSale { sale } => {
            let found = find_sale(tx, sale)?.map(|f| f.state);
            let reversed = found.is_none() && reversal_pending(tx, sale)?;
            Ok(Outcome::SaleState(super::sale_state(found, reversed)))
        }
        Op::Limits { day, minute } => Ok(Outcome::Limits(limits(tx, *day)?, rate_limits(tx, *minute)?)),
        Op::Held { holder } => {
            let mut st =
                tx.prepare_cached("SELECT id FROM pins WHERE state = 'reserved' AND holder = ?1 ORDER BY id")?;
            let ids = st.query_map(params![holder], |r| r.get(0))?;
            Ok(Outcome::Held(ids.collect::<Result<Vec<i64>, _>>()?))
        }
    }
}

/// Writes one audit record: the PINs `pins` (each once) moved from `from` (`None`: loaded) to `to`, held by
/// `holder`; returns its `seq`, which the PIN rows it names take as their `audit_seq` when they move.
fn audit_record(
    tx: &Connection,
    from: Option<PinState>,
    to: PinState,
    holder: Option<&str>,
    at: i64,
    pins: &[i64],
) -> Result<i64, StoreError> {
    let mut list = String::with_capacity(pins.len() * 8 + 2);
    list.push('[');
    for (i, id) in pins.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push_str(&id.to_string());
    }
    list.push(']');
    tx.prepare_cached("INSERT INTO audit (from_state, to_state, holder, at, pins) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![from.map(PinState::as_str), to.as_str(), holder, at, list])?;
    Ok(tx.last_insert_rowid())
}

/// Moves the `n` PINs audit record `seq` names (all read in state `was`) with `update`, whose `?1` is the record's
/// seq; every one of them must move, or the batch fails (the read that chose them and this write disagree).
fn move_recorded(tx: &Connection, seq: i64, n: usize, was: PinState, update: &str) -> Result<(), StoreError> {
    let moved = tx.prepare_cached(update)?.execute(params![seq])?;
    if moved != n {
        return Err(StoreError::Db(format!(
            "internal: {n} PINs read as {} for audit record {seq}, {moved} moved",
            was.as_str()
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn reserve(
    tx: &Connection,
    cipher: &PinCipher,
    holder: &str,
    product: &str,
    amount: i64,
    n: usize,
    lease_until: i64,
    today: &str,
    now: i64,
) -> Result<Vec<Dispensed>, StoreError> {
    if n == 0 || n > MAX_RESERVE {
        return Err(StoreError::BadRequest(format!(
            "reserve 1 to {MAX_RESERVE} PINs, not {n}"
        )));
    }
    check_denomination(tx, product, amount)?;
    // Read and opened first (a row that does not open is found before anything is written), then one audit record
    // and one statement move them all.
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {PIN_COLUMNS} FROM pins WHERE product = ?1 AND amount = ?2 AND state = 'available'
         AND (expiry IS NULL OR expiry >= ?3) ORDER BY id LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![product, amount, today, n as i64], pin_row)?;
    let mut out = Vec::with_capacity(n);
    for r in rows {
        out.push(r?.open(cipher)?);
    }
    if out.is_empty() {
        return Ok(out);
    }
    let ids: Vec<i64> = out.iter().map(|d| d.pin_id).collect();
    let seq = audit_record(
        tx,
        Some(PinState::Available),
        PinState::Reserved,
        Some(holder),
        now,
        &ids,
    )?;
    let moved = tx
        .prepare_cached(
            "UPDATE pins SET state = 'reserved', holder = ?1, lease_until = ?2, audit_seq = ?3
             WHERE id IN (SELECT value FROM json_each((SELECT pins FROM audit WHERE seq = ?3)))
             AND state = 'available'",
        )?
        .execute(params![holder, lease_until, seq])?;
    if moved != ids.len() {
        return Err(StoreError::Db(format!(
            "internal: {} PINs read as available for audit record {seq}, {moved} reserved",
            ids.len()
        )));
    }
    Ok(out)
}

/// A confirm the group sells: its position in the group, and what its sale row records.
struct ToSell<'a> {
    at: usize,
    holder: &'a str,
    pin_id: i64,
    product: String,
    amount: i64,
    sale: &'a SaleContext,
    /// Its key was reversed before it arrived: sold, then voided at once.
    reversed: bool,
}

/// Consecutive confirms of a batch (`(holder, PIN, sale)` each), with the results they would have one after the
/// other: each is decided by reading (the sales of earlier confirms of the group counted as made), refusals and
/// conflicts at once; then the PINs sold move to `sold` in one statement per holder, under one audit record each
/// (`reserved → sold`), and their sales are recorded; last, those whose key was reversed first are voided.
fn confirm_group(
    tx: &Connection,
    items: &[(&str, i64, &SaleContext)],
    now: i64,
) -> Result<Vec<Result<Confirmation, StoreError>>, StoreError> {
    use std::collections::{HashMap, HashSet};
    let mut results: Vec<Option<Result<Confirmation, StoreError>>> = (0..items.len()).map(|_| None).collect();
    let mut sold_now: HashMap<String, i64> = HashMap::new();
    let mut taken: HashSet<i64> = HashSet::new();
    let mut to_sell: Vec<ToSell> = Vec::new();
    let not_holder = |holder: &str, pin_id: i64| StoreError::NotHolder {
        holder: holder.to_string(),
        pin_id,
    };
    // What each confirm needs to know, in one read: the PIN sold under its key (whichever gateway sold it), its PIN
    // if the caller holds it reserved (with the product and amount its sale records), and whether its key was
    // reversed first.
    let mut read = tx.prepare_cached(
        "SELECT s.pin_id, p.product, p.amount,
                EXISTS (SELECT 1 FROM reversals v WHERE v.transmission = ?1 AND v.stan = ?2 AND v.terminal_id = ?3)
         FROM (SELECT 1) LEFT JOIN sales s ON s.transmission = ?1 AND s.stan = ?2 AND s.terminal_id = ?3
         LEFT JOIN pins p ON p.id = ?4 AND p.state = 'reserved' AND p.holder = ?5",
    )?;
    for (at, &(holder, pin_id, sale)) in items.iter().enumerate() {
        let key = sale.key_id();
        let (sold, reserved, reversed) = read.query_row(
            params![sale.transmission, sale.stan, sale.terminal_id, pin_id, holder],
            |r| {
                let product: Option<String> = r.get(1)?;
                let amount: Option<i64> = r.get(2)?;
                Ok((r.get::<_, Option<i64>>(0)?, product.zip(amount), r.get::<_, bool>(3)?))
            },
        )?;
        let sold = sold_now.get(&key).copied().or(sold);
        results[at] = Some(match sold {
            Some(sold) if sold == pin_id => Ok(Confirmation::AlreadyConfirmed),
            // A PIN sold by an earlier confirm of the group is not reserved any more: not the caller's to void.
            Some(_) if taken.contains(&pin_id) => Err(not_holder(holder, pin_id)),
            Some(_) => conflict(tx, holder, pin_id, sale, super::CONFLICT_KEY_SOLD, now),
            None if taken.contains(&pin_id) => Err(not_holder(holder, pin_id)),
            None => match reserved {
                None => Err(not_holder(holder, pin_id)),
                Some((product, amount)) => {
                    sold_now.insert(key, pin_id);
                    taken.insert(pin_id);
                    to_sell.push(ToSell {
                        at,
                        holder,
                        pin_id,
                        product,
                        amount,
                        sale,
                        reversed,
                    });
                    continue;
                }
            },
        });
    }
    // One record and one statement per holder (a batch gathers the confirms of every gateway connected).
    let mut holders: Vec<&str> = to_sell.iter().map(|t| t.holder).collect();
    holders.sort_unstable();
    holders.dedup();
    for holder in holders {
        let ids: Vec<i64> = to_sell
            .iter()
            .filter(|t| t.holder == holder)
            .map(|t| t.pin_id)
            .collect();
        let seq = audit_record(tx, Some(PinState::Reserved), PinState::Sold, Some(holder), now, &ids)?;
        move_recorded(
            tx,
            seq,
            ids.len(),
            PinState::Reserved,
            "UPDATE pins SET state = 'sold', lease_until = NULL, audit_seq = ?1
             WHERE id IN (SELECT value FROM json_each((SELECT pins FROM audit WHERE seq = ?1)))
             AND state = 'reserved'",
        )?;
    }
    let mut insert = tx.prepare_cached(INSERT_SALE)?;
    for t in &to_sell {
        insert_sale_with(&mut insert, t.sale, t.pin_id, &t.product, t.amount, now)?;
    }
    for t in &to_sell {
        results[t.at] = Some(if t.reversed {
            void(tx, t.sale, t.pin_id, now)?;
            Ok(Confirmation::Voided)
        } else {
            Ok(Confirmation::Sold)
        });
    }
    Ok(results.into_iter().map(|r| r.expect("every confirm decided")).collect())
}

/// A confirm refused for good (see [`Confirmation::Conflict`]): the PIN, which `holder` holds, is voided and the
/// conflict recorded for the audit; a gateway that does not hold it is refused ([`StoreError::NotHolder`]). A confirm repeated after this finds the same answer without a second record.
fn conflict(
    tx: &Connection,
    holder: &str,
    pin_id: i64,
    sale: &SaleContext,
    reason: &str,
    now: i64,
) -> Result<Confirmation, StoreError> {
    let earlier: Option<bool> = tx
        .prepare_cached("SELECT voided FROM confirm_conflicts WHERE pin_id = ?1 AND gateway = ?2 ORDER BY id LIMIT 1")?
        .query_row(params![pin_id, holder], |r| r.get(0))
        .optional()?;
    if let Some(voided) = earlier {
        return Ok(Confirmation::Conflict { voided });
    }
    // Only the PIN's holder can have handed it out: anyone else is refused, and nothing is recorded.
    let voided = tx
        .prepare_cached(super::VOID_RESERVED)?
        .execute(params![pin_id, holder])?
        == 1;
    if !voided {
        return Err(StoreError::NotHolder {
            holder: holder.to_string(),
            pin_id,
        });
    }
    tx.prepare_cached(super::INSERT_CONFLICT)?.execute(params![
        pin_id,
        holder,
        sale.terminal_id,
        sale.stan,
        sale.transmission,
        sale.merchant_id,
        reason,
        voided,
        now
    ])?;
    super::log_conflict(pin_id, holder, reason, voided);
    Ok(Confirmation::Conflict { voided })
}

/// Takes the available PIN `pin_id`, whose row did not open, out of sale if its key is shown right (another PIN
/// sealed under the same key id opens); true if it was quarantined. A wrong key quarantines nothing.
fn quarantine(tx: &Connection, cipher: &PinCipher, pin_id: i64) -> Result<bool, StoreError> {
    let Some((key_id, serial)) = tx
        .prepare_cached("SELECT key_id, serial FROM pins WHERE id = ?1 AND state = 'available'")?
        .query_row(params![pin_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .optional()?
    else {
        return Ok(false);
    };
    let others = tx
        .prepare_cached(super::SAME_KEY_SAMPLE)?
        .query_map(params![key_id, pin_id], pin_row)?
        .collect::<Result<Vec<_>, _>>()?;
    if !super::key_is_shown_right(&others, cipher, pin_id, key_id) {
        return Ok(false);
    }
    let n = tx.prepare_cached(super::QUARANTINE)?.execute(params![pin_id])?;
    super::log_quarantined(pin_id, &serial);
    Ok(n == 1)
}

fn release(tx: &Connection, holder: &str, pin_ids: &[i64]) -> Result<Vec<i64>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE pins SET state = 'available', holder = NULL, lease_until = NULL
         WHERE id = ?1 AND state = 'reserved' AND holder = ?2",
    )?;
    let mut refused = Vec::new();
    for id in pin_ids {
        if stmt.execute(params![id, holder])? == 0 {
            refused.push(*id);
        }
    }
    Ok(refused)
}

fn renew(tx: &Connection, holder: &str, pin_ids: &[i64], lease_until: i64) -> Result<usize, StoreError> {
    let mut stmt =
        tx.prepare_cached("UPDATE pins SET lease_until = ?3 WHERE id = ?1 AND state = 'reserved' AND holder = ?2")?;
    // Each PIN once, however often it is named (as PostgreSQL's one statement counts it).
    let ids: std::collections::BTreeSet<i64> = pin_ids.iter().copied().collect();
    let mut n = 0;
    for id in ids {
        n += stmt.execute(params![id, holder, lease_until])?;
    }
    Ok(n)
}

fn reverse(
    tx: &Connection,
    sale: &SaleContext,
    content: Option<&crate::sale::SaleContent>,
    policy: &super::ReversePolicy,
    now: i64,
) -> Result<Reversal, StoreError> {
    let found = find_sale(tx, sale)?;
    if let (Some(f), Some(c)) = (&found, content) {
        if let Some(field) = c.differs_from(&f.product, f.amount, &f.merchant, f.currency.as_deref()) {
            return Err(StoreError::ReversalMismatch { key: sale.key(), field });
        }
    }
    if let Some(f) = &found {
        if f.state == PinState::Sold && policy.too_late(f.sold_at, now) {
            return Err(StoreError::ReversalTooLate { key: sale.key() });
        }
    }
    Ok(match found {
        None => {
            if !reversal_pending(tx, sale)? {
                tx.prepare_cached(
                    "INSERT INTO reversals (gateway, terminal_id, stan, transmission, pin_id, at, product, amount,
                     merchant_id, reason) VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    sale.gateway,
                    sale.terminal_id,
                    sale.stan,
                    sale.transmission,
                    now,
                    content.map(|c| &c.product),
                    content.map(|c| c.amount),
                    content.map(|c| &c.merchant_id),
                    policy.stored_reason(),
                ])?;
            }
            Reversal::Remembered
        }
        Some(f) if f.state == PinState::Voided => Reversal::AlreadyVoided { pin_id: f.pin_id },
        Some(f) => {
            void(tx, sale, f.pin_id, now)?;
            if let Some(reason) = policy.stored_reason() {
                tx.prepare_cached(
                    "UPDATE reversals SET reason = ?4 WHERE transmission = ?1 AND stan = ?2 AND terminal_id = ?3",
                )?
                .execute(params![sale.transmission, sale.stan, sale.terminal_id, reason])?;
            }
            Reversal::Voided { pin_id: f.pin_id }
        }
    })
}

fn stock(conn: &Connection) -> Result<Vec<StockRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT product, amount, state, COUNT(*) FROM pins GROUP BY product, amount, state ORDER BY 1, 2, 3",
    )?;
    let rows = stmt.query_map([], |r| {
        let state: String = r.get(2)?;
        Ok(StockRow {
            product: r.get(0)?,
            amount: r.get(1)?,
            state: PinState::parse(&state).unwrap_or(PinState::Expired),
            count: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn catalog(conn: &Connection) -> Result<Vec<Product>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.code, p.name, p.supplier, p.currency, d.amount FROM products p
         LEFT JOIN denominations d ON d.product = p.code ORDER BY p.code, d.amount",
    )?;
    let mut out: Vec<Product> = Vec::new();
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get::<_, Option<i64>>(4)?,
        ))
    })?;
    for row in rows {
        let (code, name, supplier, currency, amount) = row?;
        if out.last().is_none_or(|p| p.code != code) {
            out.push(Product {
                code,
                name,
                supplier,
                currency,
                denominations: Vec::new(),
            });
        }
        if let Some(a) = amount {
            out.last_mut().expect("pushed").denominations.push(a);
        }
    }
    Ok(out)
}

impl super::PinStore for SqliteStore {
    async fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Outcome, StoreError>> {
        SqliteStore::apply_batch(self, ops)
    }
    async fn upsert_product(&mut self, p: &Product) -> Result<(), StoreError> {
        SqliteStore::upsert_product(self, p)
    }
    async fn import_with_progress(
        &mut self,
        pins: &[NewPin],
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<usize, StoreError> {
        SqliteStore::import_with_progress(self, pins, progress)
    }
    async fn stock(&self) -> Result<Vec<StockRow>, StoreError> {
        SqliteStore::stock(self)
    }
    async fn catalog(&self) -> Result<Vec<Product>, StoreError> {
        SqliteStore::catalog(self)
    }
    async fn expire(&mut self, today: &str) -> Result<u64, StoreError> {
        SqliteStore::expire(self, today).map(|n| n as u64)
    }
    async fn expired_leases(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        SqliteStore::expired_leases(self, now)
    }
    async fn return_expired(&mut self, holder: &str, now: i64) -> Result<u64, StoreError> {
        SqliteStore::return_expired(self, holder, now).map(|n| n as u64)
    }
    async fn return_quarantined(&mut self, pin_id: i64) -> Result<(), StoreError> {
        SqliteStore::return_quarantined(self, pin_id)
    }
    async fn operator_quarantine(&mut self, pin_id: i64) -> Result<(), StoreError> {
        SqliteStore::operator_quarantine(self, pin_id)
    }
    async fn conflicts(&self) -> Result<Vec<super::ConflictRow>, StoreError> {
        let mut st = self.conn.prepare(super::LIST_CONFLICTS)?;
        let rows = st.query_map([], |r| {
            Ok(super::ConflictRow {
                id: r.get(0)?,
                pin_id: r.get(1)?,
                gateway: r.get(2)?,
                terminal_id: r.get(3)?,
                stan: r.get(4)?,
                transmission: r.get(5)?,
                merchant_id: r.get(6)?,
                reason: r.get(7)?,
                voided: r.get(8)?,
                at: r.get(9)?,
                resolution: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    async fn resolve_conflict(&mut self, id: i64, note: &str, now: i64) -> Result<(), StoreError> {
        let n = self.conn.execute(super::RESOLVE_CONFLICT, params![note, now, id])?;
        super::check_resolved(n as u64, id)
    }
    async fn set_limit(
        &mut self,
        merchant_id: &str,
        currency: &str,
        value_per_day: Option<i64>,
    ) -> Result<(), StoreError> {
        match value_per_day {
            Some(v) => self.conn.execute(
                "INSERT INTO merchant_limits (merchant_id, currency, value_per_day) VALUES (?1, ?2, ?3)
                 ON CONFLICT (merchant_id, currency) DO UPDATE SET value_per_day = excluded.value_per_day",
                params![merchant_id, currency, v],
            )?,
            None => self.conn.execute(
                "DELETE FROM merchant_limits WHERE merchant_id = ?1 AND currency = ?2",
                params![merchant_id, currency],
            )?,
        };
        Ok(())
    }
    async fn limits(&self, day: i64) -> Result<Vec<super::LimitRow>, StoreError> {
        limits(&self.conn, day)
    }
    async fn set_rate_limit(&mut self, merchant_id: &str, sales_per_minute: Option<i64>) -> Result<(), StoreError> {
        self.check_version()?;
        let tx = self.conn.transaction()?;
        match sales_per_minute {
            Some(v) => tx.execute(
                "INSERT INTO merchant_rate_limits (merchant_id, sales_per_minute) VALUES (?1, ?2)
                 ON CONFLICT (merchant_id) DO UPDATE SET sales_per_minute = excluded.sales_per_minute",
                params![merchant_id, v],
            )?,
            None => {
                // Its grants go with it: nothing would ever prune them.
                tx.execute(
                    "DELETE FROM merchant_sales_allowances WHERE merchant_id = ?1",
                    params![merchant_id],
                )?;
                tx.execute(
                    "DELETE FROM merchant_rate_limits WHERE merchant_id = ?1",
                    params![merchant_id],
                )?
            }
        };
        tx.commit()?;
        Ok(())
    }
    async fn rate_limits(&self, minute: i64) -> Result<Vec<super::RateRow>, StoreError> {
        self.check_version()?;
        rate_limits(&self.conn, minute)
    }
    async fn voided(&self, since: i64, include_unacknowledged: bool) -> Result<Vec<super::VoidedRow>, StoreError> {
        let mut st = self.conn.prepare(super::LIST_VOIDED)?;
        let rows = st.query_map(params![since, include_unacknowledged], |r| {
            Ok(super::VoidedRow {
                pin_id: r.get(0)?,
                serial: r.get(1)?,
                product: r.get(2)?,
                amount: r.get(3)?,
                currency: r.get(4)?,
                reversed_at: r.get(5)?,
                gateway: r.get(6)?,
                terminal_id: r.get(7)?,
                merchant_id: r.get(8)?,
                reason: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
