//! PostgreSQL backend: several PIN server processes share one inventory. Picking PINs uses
//! `FOR UPDATE SKIP LOCKED` so concurrent transactions take different rows without waiting; the sale key is locked
//! with a transaction-level advisory lock so a sale, its repeat, its confirm and its reversal are serialised across
//! servers; `synchronous_commit` stays on (an acknowledged sale is durable). Batches share one commit, as on
//! SQLite; within a batch, operations run in the order of their key locks so two batches never deadlock.

use std::collections::HashSet;

use tokio_postgres::{Client, GenericClient, Row, Statement};

use super::{
    Confirmation, Dispensed, NewPin, Op, Outcome, PinRow, PinState, Product, Reversal, SaleContext, SellRequest,
    StockRow, StoreError,
};
use crate::clock::unix_now;
use crate::crypto::{CryptoError, PinCipher, RowAd, Sealed};
use crate::psp::MAX_RESERVE;

const DUPLICATE_PIN: &str = "duplicate PIN value (already loaded, or twice in this file)";

/// Version of the schema this code writes.
pub const SCHEMA_VERSION: i32 = 9;

/// The schema version whose migration seals every PIN again bound to its row ([`reseal_pins`]).
const RESEAL_VERSION: i32 = 6;

const SCHEMA_V1: &str = r#"
CREATE TABLE products (
    code TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    supplier TEXT NOT NULL,
    currency TEXT NOT NULL
);
CREATE TABLE denominations (
    product TEXT NOT NULL REFERENCES products(code),
    amount BIGINT NOT NULL CHECK (amount > 0),
    PRIMARY KEY (product, amount)
);
CREATE TABLE pins (
    id BIGSERIAL PRIMARY KEY,
    product TEXT NOT NULL,
    amount BIGINT NOT NULL,
    serial TEXT NOT NULL UNIQUE,
    fingerprint BYTEA NOT NULL UNIQUE,
    key_id INTEGER NOT NULL,
    nonce BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    expiry TEXT,
    receipt TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('available', 'reserved', 'sold', 'voided', 'expired')),
    holder TEXT,
    lease_until BIGINT,
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
    pin_id BIGINT NOT NULL UNIQUE REFERENCES pins(id),
    merchant_id TEXT NOT NULL,
    rrn TEXT NOT NULL,
    product TEXT NOT NULL,
    amount BIGINT NOT NULL,
    sold_at BIGINT NOT NULL,
    PRIMARY KEY (gateway, terminal_id, stan, transmission)
);
CREATE TABLE reversals (
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission TEXT NOT NULL,
    pin_id BIGINT,
    at BIGINT NOT NULL,
    PRIMARY KEY (gateway, terminal_id, stan, transmission)
);
CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    pin_id BIGINT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    holder TEXT,
    at BIGINT NOT NULL
);
CREATE FUNCTION pingate_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION pingate_refuse('audit is append-only');
CREATE TRIGGER pins_no_delete BEFORE DELETE ON pins
    FOR EACH ROW EXECUTE FUNCTION pingate_refuse('PINs are never deleted');
CREATE FUNCTION pingate_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit (pin_id, from_state, to_state, holder, at)
        VALUES (NEW.id, NULL, NEW.state, NEW.holder, extract(epoch FROM now())::bigint);
    ELSIF NEW.state <> OLD.state THEN
        INSERT INTO audit (pin_id, from_state, to_state, holder, at)
        VALUES (NEW.id, OLD.state, NEW.state, COALESCE(NEW.holder, OLD.holder), extract(epoch FROM now())::bigint);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER pins_audit AFTER INSERT OR UPDATE OF state ON pins FOR EACH ROW EXECUTE FUNCTION pingate_audit();
"#;

/// Version 2: an index of the available PINs that carry an expiry date, so that moving those past their date to
/// `expired` (at every server start and every hour) reads only them; and the batch functions of
/// [`BATCH_FUNCTIONS`].
const SCHEMA_V2: &str = "CREATE INDEX pins_expiring ON pins(expiry) WHERE state = 'available' AND expiry IS NOT NULL";

/// The batch functions, installed (`CREATE OR REPLACE`) by every server when it starts, so that the database runs
/// the bodies this build was written against; first installed with version 2.
///
/// On-demand sales of a whole batch in one statement (one round trip instead of six), see [`sell_many`]. The
/// function locks every sale key (`pingate_lock_keys`), then, each statement with a fresh snapshot taken after the
/// locks: sales already made under these keys, reversals remembered for them, requests for a product or amount not
/// on offer, and one pick per product and amount that marks the PINs sold and records the sales. Requests are
/// numbered from 1 (`o_i`).
///
/// The pick states its product and amount as ranges (`>= x AND <= x`) and orders by all three columns of
/// `pins_available`: with plain equalities PostgreSQL reduces the order to `id`, and while its statistics still
/// say most PINs are available (any fresh import) it walks the primary key past every PIN already sold, a cost
/// that grows with each sale (measured: 18 ms per pick after 38,000 sales, 0.3 ms through the partial index).
const BATCH_FUNCTIONS: &str = r#"
-- The one place the sale keys' lock order is written: by lock number, so batches locking several keys never wait
-- on each other in a circle. Used by the batch functions, by `lock_keys` and by `lock` (one key).
CREATE OR REPLACE FUNCTION pingate_lock_keys(a_keys text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(h)
    FROM (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest(a_keys) AS k ORDER BY 1) AS l;
END $$;
CREATE OR REPLACE FUNCTION pingate_sell_batch(a_keys text[], a_gw text[], a_term text[], a_stan text[], a_trans text[],
    a_merchant text[], a_rrn text[], a_product text[], a_amount bigint[], a_now bigint, a_today text)
RETURNS TABLE (o_i integer, o_kind text, o_id bigint, o_product text, o_amount bigint, o_serial text, o_key_id integer,
    o_nonce bytea, o_ciphertext bytea, o_expiry text, o_receipt text, o_state text, o_sale_product text,
    o_sale_amount bigint, o_sale_merchant text)
LANGUAGE plpgsql
-- Every statement here is a handful of index lookups per request. Without these, a sales table the statistics
-- have not seen yet (any new database, and for minutes under load) is read whole, once per batch.
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    g record;
BEGIN
    PERFORM pingate_lock_keys(a_keys);
    RETURN QUERY
        SELECT r.i::integer, 'existing', p.id, p.product, p.amount, p.serial, p.key_id, p.nonce, p.ciphertext,
               p.expiry, p.receipt, p.state, s.product, s.amount, s.merchant_id
        FROM unnest(a_gw, a_term, a_stan, a_trans) WITH ORDINALITY AS r(g, t, s, x, i)
        JOIN sales s ON s.terminal_id = r.t AND s.stan = r.s AND s.transmission = r.x
        JOIN pins p ON p.id = s.pin_id;
    RETURN QUERY
        SELECT r.i::integer, 'reversed', NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer, NULL::bytea,
               NULL::bytea, NULL, NULL, NULL, NULL, NULL::bigint, NULL
        FROM unnest(a_gw, a_term, a_stan, a_trans) WITH ORDINALITY AS r(g, t, s, x, i)
        JOIN reversals v ON v.terminal_id = r.t AND v.stan = r.s AND v.transmission = r.x;
    RETURN QUERY
        SELECT u.i::integer,
               CASE WHEN EXISTS (SELECT 1 FROM products pr WHERE pr.code = u.p)
                    THEN 'unknown_denomination' ELSE 'unknown_product' END,
               NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer, NULL::bytea,
               NULL::bytea, NULL, NULL, NULL, NULL, NULL::bigint, NULL
        FROM unnest(a_product, a_amount) WITH ORDINALITY AS u(p, a, i)
        WHERE NOT EXISTS (SELECT 1 FROM denominations d WHERE d.product = u.p AND d.amount = u.a);
    FOR g IN
        SELECT r.p, r.a, array_agg(r.i ORDER BY r.i) AS idx
        -- The first request of each key among those whose product and amount are on offer: a refused request
        -- does not take the key from a later one.
        FROM (SELECT DISTINCT ON (u.k) u.*
              FROM unnest(a_keys, a_gw, a_term, a_stan, a_trans, a_product, a_amount)
                   WITH ORDINALITY AS u(k, g, t, s, x, p, a, i)
              WHERE EXISTS (SELECT 1 FROM denominations d WHERE d.product = u.p AND d.amount = u.a)
              ORDER BY u.k, u.i) AS r
        WHERE NOT EXISTS (SELECT 1 FROM sales s
                          WHERE s.terminal_id = r.t AND s.stan = r.s AND s.transmission = r.x)
          AND NOT EXISTS (SELECT 1 FROM reversals v
                          WHERE v.terminal_id = r.t AND v.stan = r.s AND v.transmission = r.x)
        GROUP BY r.p, r.a
    LOOP
        RETURN QUERY
            WITH picked AS (
                SELECT x.id, row_number() OVER (ORDER BY x.id) AS n
                FROM (SELECT id FROM pins
                      WHERE product >= g.p AND product <= g.p AND amount >= g.a AND amount <= g.a
                        AND state = 'available' AND (expiry IS NULL OR expiry >= a_today)
                      ORDER BY product, amount, id LIMIT cardinality(g.idx) FOR UPDATE SKIP LOCKED) AS x
            ), sold AS (
                UPDATE pins SET state = 'sold' FROM picked WHERE pins.id = picked.id
                RETURNING pins.id, pins.product, pins.amount, pins.serial, pins.key_id, pins.nonce, pins.ciphertext,
                          pins.expiry, pins.receipt, g.idx[picked.n] AS i
            ), recorded AS (
                INSERT INTO sales (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product,
                                   amount, sold_at)
                SELECT a_gw[i], a_term[i], a_stan[i], a_trans[i], id, a_merchant[i], lpad(id::text, 12, '0'), product, amount, a_now
                FROM sold
            )
            SELECT sold.i::integer, 'sold', sold.id, sold.product, sold.amount, sold.serial, sold.key_id,
                   sold.nonce, sold.ciphertext, sold.expiry, sold.receipt, 'sold', NULL, NULL::bigint, NULL
            FROM sold;
    END LOOP;
END $$;
-- Confirms of cached sales, a batch in one statement: keys already sold answer as repeats (the same PIN) or
-- mismatches; the others move the holder's reserved PIN to sold and record the sale; a sale whose reversal arrived
-- first is voided at once. Each key and each PIN appears once (the caller sends repeats inside a batch apart).
CREATE OR REPLACE FUNCTION pingate_confirm_batch(a_keys text[], a_gw text[], a_term text[], a_stan text[], a_trans text[],
    a_merchant text[], a_rrn text[], a_holder text[], a_pin bigint[], a_now bigint)
RETURNS TABLE (o_i integer, o_kind text, o_pin bigint)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pingate_lock_keys(a_keys);
    RETURN QUERY
        SELECT r.i::integer, CASE WHEN s.pin_id = r.pin THEN 'already' ELSE 'mismatch' END, s.pin_id
        FROM unnest(a_gw, a_term, a_stan, a_trans, a_pin) WITH ORDINALITY AS r(g, t, s, x, pin, i)
        JOIN sales s ON s.terminal_id = r.t AND s.stan = r.s AND s.transmission = r.x;
    RETURN QUERY
        WITH todo AS (
            SELECT r.*
            FROM unnest(a_gw, a_term, a_stan, a_trans, a_merchant, a_rrn, a_holder, a_pin)
                 WITH ORDINALITY AS r(g, t, s, x, m, rr, h, pin, i)
            WHERE NOT EXISTS (SELECT 1 FROM sales s WHERE s.terminal_id = r.t AND s.stan = r.s
                                                     AND s.transmission = r.x)
        ), sold AS (
            UPDATE pins SET state = 'sold', lease_until = NULL FROM todo
            -- `state || ''`: a plain `state = 'reserved'` lets the planner, on statistics taken while few PINs
            -- were reserved, scan every reserved PIN of every holder per request (measured: 85 ms for 2 confirms
            -- with 60,000 PINs reserved); this way each PIN is found by its id and the state checked after.
            WHERE pins.id = todo.pin AND (pins.state || '') = 'reserved' AND pins.holder = todo.h
            RETURNING todo.i, todo.g, todo.t, todo.s, todo.x, todo.m, todo.rr, pins.id, pins.product, pins.amount
        ), recorded AS (
            INSERT INTO sales (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product, amount,
                               sold_at)
            SELECT g, t, s, x, id, m, lpad(id::text, 12, '0'), product, amount, a_now FROM sold
        )
        SELECT sold.i::integer, CASE WHEN v.stan IS NULL THEN 'sold' ELSE 'voided' END, sold.id
        FROM sold
        LEFT JOIN reversals v
               ON v.terminal_id = sold.t AND v.stan = sold.s AND v.transmission = sold.x;
    -- The statement above cannot change rows it inserted: the reversed ones are voided here.
    UPDATE pins SET state = 'voided'
    FROM unnest(a_gw, a_term, a_stan, a_trans, a_pin) AS r(g, t, s, x, pin)
    JOIN reversals v ON v.terminal_id = r.t AND v.stan = r.s AND v.transmission = r.x
    WHERE pins.id = r.pin AND pins.state = 'sold'
      AND EXISTS (SELECT 1 FROM sales s WHERE s.pin_id = r.pin AND s.terminal_id = r.t
                                           AND s.stan = r.s AND s.transmission = r.x);
    UPDATE reversals v SET pin_id = r.pin
    FROM unnest(a_gw, a_term, a_stan, a_trans, a_pin) AS r(g, t, s, x, pin)
    WHERE v.terminal_id = r.t AND v.stan = r.s AND v.transmission = r.x AND v.pin_id IS NULL
      AND EXISTS (SELECT 1 FROM sales s WHERE s.pin_id = r.pin AND s.terminal_id = r.t
                                           AND s.stan = r.s AND s.transmission = r.x);
END $$;
"#;

/// Version 7: the audit trail, one row per PIN and change, under the name `pingate audit` reads on both backends.
const AUDIT_TRAIL_V7: &str =
    "CREATE OR REPLACE VIEW audit_trail AS SELECT seq, pin_id, from_state, to_state, holder, at FROM audit";

/// The trigger refusing state changes outside [`PinState::can_move_to`] (its function: [`edges_function`]).
const EDGES_TRIGGER: &str =
    "CREATE TRIGGER pins_state_edges BEFORE UPDATE OF state ON pins FOR EACH ROW EXECUTE FUNCTION pingate_edges()";

/// The function refusing state changes outside [`PinState::can_move_to`], generated from it.
fn edges_function() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pingate_edges() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.state <> OLD.state AND NOT ({}) THEN
                 RAISE EXCEPTION 'illegal PIN state change % -> %', OLD.state, NEW.state;
             END IF;
             RETURN NEW;
         END $$;",
        PinState::allowed_edges_sql()
    )
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        // The server's message, not the driver's generic "db error".
        match e.as_db_error() {
            Some(db) => StoreError::Db(format!("{} ({})", db.message(), db.code().code())),
            None => StoreError::Db(e.to_string()),
        }
    }
}

/// One connection to the shared inventory.
pub struct PgStore {
    client: Client,
    cipher: PinCipher,
    prepared: Prepared,
}

/// The hot statements, prepared once per connection (an unprepared statement costs an extra round trip).
struct Prepared {
    lock_keys: Statement,
    sell_batch: Statement,
    confirm_batch: Statement,
    offer: Statement,
    reserve_pick: Statement,
    reserve_update: Statement,
}

impl Prepared {
    async fn new(c: &Client) -> Result<Prepared, StoreError> {
        let cols = |t: &str| {
            PIN_COLUMNS
                .split(", ")
                .map(|c| format!("{t}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Ok(Prepared {
            lock_keys: c.prepare("SELECT pingate_lock_keys($1::text[])").await?,
            sell_batch: c
                .prepare(
                    "SELECT * FROM pingate_sell_batch($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                                      $6::text[], $7::text[], $8::text[], $9::bigint[], $10, $11)",
                )
                .await?,
            confirm_batch: c
                .prepare(
                    "SELECT * FROM pingate_confirm_batch($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                                         $6::text[], $7::text[], $8::text[], $9::bigint[], $10)",
                )
                .await?,
            // Every product, with each amount it is offered in (none: NULL).
            offer: c
                .prepare("SELECT p.code, d.amount FROM products p LEFT JOIN denominations d ON d.product = p.code")
                .await?,
            // Ranges and the full index order: see BATCH_FUNCTIONS for why.
            reserve_pick: c
                .prepare(
                    "SELECT id FROM pins WHERE product >= $1 AND product <= $1 AND amount >= $2 AND amount <= $2
                     AND state = 'available' AND (expiry IS NULL OR expiry >= $3)
                     ORDER BY product, amount, id LIMIT $4 FOR UPDATE SKIP LOCKED",
                )
                .await?,
            reserve_update: c
                .prepare(&format!(
                    "UPDATE pins SET state = 'reserved', holder = u.h, lease_until = u.l
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, h, l)
                     WHERE pins.id = u.id RETURNING {}",
                    cols("pins")
                ))
                .await?,
        })
    }
}

const PIN_COLUMNS: &str = "id, product, amount, serial, key_id, nonce, ciphertext, expiry, receipt";

impl PgStore {
    /// Connects (URL or key=value string), creating and migrating the schema as needed. `schema` names a
    /// PostgreSQL schema to work in (created if missing): tests use one each; production leaves it `None`.
    pub async fn connect(url: &str, schema: Option<&str>, cipher: PinCipher) -> Result<PgStore, StoreError> {
        // TLS when the URL asks for it (`sslmode=verify-full`, see `pgtls`).
        let mut target = super::pgtls::PgTarget::parse(url)?;
        let config = &mut target.config;
        // Operators see who is connected in pg_stat_activity.
        config.application_name(format!(
            "pingate{}",
            schema.map(|s| format!("/{s}")).unwrap_or_default()
        ));
        if let Some(s) = schema {
            if !s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
                return Err(StoreError::BadRequest(format!(
                    "schema name `{s}`: letters, digits and _ only"
                )));
            }
            config.options(format!("-c search_path={s}"));
        }
        let client = target.connect().await?;
        client.batch_execute("SET synchronous_commit = on").await?;
        let mut client = client;
        if let Some(s) = schema {
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
                .await?;
        }
        migrate(&mut client, &cipher).await?;
        let prepared = Prepared::new(&client).await?;
        Ok(PgStore {
            client,
            cipher,
            prepared,
        })
    }

    /// Refuses when available PINs are sealed under a key this store was not given (naming them when few);
    /// logs reserved ones (see `UNSOLD_KEY_IDS`).
    pub async fn check_keys(&self) -> Result<(), StoreError> {
        check_keys(&self.client, &self.cipher).await
    }
}

/// Migration 5 binds the keys already recorded (`MMDDhhmmss`) to the year they were made in (`table`'s time column
/// `at`), as a gateway binds a new one (see the SQLite store's `qualify_years`).
fn qualify_years(table: &str, at: &str) -> String {
    format!(
        "UPDATE {table} SET transmission = lpad((extract(year FROM to_timestamp({at}) AT TIME ZONE 'UTC')::int
            + CASE WHEN left(transmission, 2) = '12' AND extract(month FROM to_timestamp({at}) AT TIME ZONE 'UTC') = 1
                   THEN -1
                   WHEN left(transmission, 2) = '01' AND extract(month FROM to_timestamp({at}) AT TIME ZONE 'UTC') = 12
                   THEN 1 ELSE 0 END)::text, 4, '0') || transmission
         WHERE transmission ~ '^[0-9]{{10}}$'"
    )
}

/// See [`PgStore::check_keys`].
async fn check_keys(c: &impl GenericClient, cipher: &PinCipher) -> Result<(), StoreError> {
    let rows = c.query(super::UNSOLD_KEY_IDS, &[]).await?;
    let in_use: Vec<(u32, bool, i64)> = rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get(1), r.get(2)))
        .collect();
    let mut missing = Vec::new();
    for (key, n) in super::available_without_key(cipher, &in_use) {
        let ids = if n <= crate::crypto::NAMED_ROWS {
            let rows = c.query(super::AVAILABLE_OF_KEY, &[&(key as i32)]).await?;
            rows.iter().map(|r| r.get::<_, i64>(0)).collect()
        } else {
            Vec::new()
        };
        missing.push((key, n, ids));
    }
    Ok(crate::crypto::CryptoError::check_missing(&missing)?)
}

/// Schema migration 6: every PIN sealed again bound to its row ([`RowAd`]: id, product, amount, serial, key id)
/// instead of its serial alone, so that a row moved to another product or amount no longer opens (see the SQLite
/// store's). Self-contained: a later migration may be numbered before it. Needs the PIN keys: without them, and with
/// PINs to seal, it changes nothing and returns false. Refused (see [`super::Reseal::finish`]) when available PINs
/// need a key that is not loaded, or a loaded key opens none of its PINs. Every row is read and written once, by
/// chunks, inside the migration's transaction (other servers wait for it).
async fn reseal_pins(tx: &impl GenericClient, cipher: &PinCipher) -> Result<bool, StoreError> {
    if tx.query_opt("SELECT 1 FROM pins LIMIT 1", &[]).await?.is_none() {
        return Ok(true);
    }
    if !cipher.has_keys() {
        tracing::info!(
            "schema migration 6 (PINs sealed again, bound to their rows) waits for a start with the PIN keys"
        );
        return Ok(false);
    }
    check_keys(tx, cipher).await?;
    let mut reseal = super::Reseal::default();
    let read = tx
        .prepare(&format!(
            "SELECT {PIN_COLUMNS}, state FROM pins WHERE id > $1 ORDER BY id LIMIT 10000"
        ))
        .await?;
    let write = tx
        .prepare(
            "UPDATE pins SET nonce = u.n, ciphertext = u.c FROM unnest($1::bigint[], $2::bytea[], $3::bytea[]) AS u(id, n, c)
             WHERE pins.id = u.id",
        )
        .await?;
    let mut after = 0i64;
    loop {
        let rows = tx.query(&read, &[&after]).await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        let (mut ids, mut nonces, mut ciphertexts) = (Vec::new(), Vec::new(), Vec::new());
        for r in &rows {
            let row = pin_row(r);
            if let Some(s) = reseal.row(cipher, &row, r.get(9)) {
                ids.push(row.id);
                nonces.push(s.nonce.to_vec());
                ciphertexts.push(s.ciphertext);
            }
        }
        tx.execute(&write, &[&ids, &nonces, &ciphertexts]).await?;
    }
    reseal.finish()?;
    Ok(true)
}

async fn migrate(client: &mut Client, cipher: &PinCipher) -> Result<(), StoreError> {
    {
        let tx = client.transaction().await?;
        // Several servers may start at once: one migrates, the others wait here.
        tx.batch_execute("SELECT pg_advisory_xact_lock(7318431)").await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS pingate_schema (version INTEGER NOT NULL)")
            .await?;
        let version: i32 = tx
            .query_opt("SELECT version FROM pingate_schema", &[])
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError::Db(format!(
                "database schema is version {version}, newer than this pingate ({SCHEMA_VERSION}): upgrade pingate"
            )));
        }
        if version < 1 {
            tx.batch_execute(SCHEMA_V1).await?;
            tx.batch_execute(&edges_function()).await?;
            tx.batch_execute(EDGES_TRIGGER).await?;
            tx.execute("INSERT INTO pingate_schema (version) VALUES (1)", &[])
                .await?;
        }
        if version < 2 {
            tx.batch_execute(SCHEMA_V2).await?;
        }
        if version < 3 {
            // The `quarantined` state: a CHECK that takes it (checking the rows again: each already holds), and
            // the function behind the edges trigger made again from `PinState` with its new edge.
            tx.batch_execute(&format!(
                "ALTER TABLE pins DROP CONSTRAINT pins_state_check, ADD CONSTRAINT pins_state_check {}",
                PinState::check_sql()
            ))
            .await?;
            tx.batch_execute(&edges_function()).await?;
        }
        if version < 4 {
            // Sales keyed by (transmission, stan, terminal, gateway): every lookup gives the whole key, and in this
            // order new sales land at the end of the index instead of one page per terminal (see the SQLite store).
            tx.batch_execute(
                "ALTER TABLE sales DROP CONSTRAINT sales_pkey, ADD PRIMARY KEY (transmission, stan, terminal_id, gateway)",
            )
            .await?;
        }
        if version < 5 {
            // Keys without the gateway, bound to their year (as the SQLite store: see its migration 5); refused
            // confirms, re-deliveries; and the new edge reserved → voided (a refused confirm's PIN).
            tx.batch_execute(
                "ALTER TABLE reversals DROP CONSTRAINT reversals_pkey,
                     ADD PRIMARY KEY (transmission, stan, terminal_id, gateway),
                     ADD COLUMN product TEXT, ADD COLUMN amount BIGINT, ADD COLUMN merchant_id TEXT",
            )
            .await?;
            tx.batch_execute(&super::schema_v5_tables("BIGSERIAL PRIMARY KEY"))
                .await?;
            tx.batch_execute(&qualify_years("sales", "sold_at")).await?;
            tx.batch_execute(&qualify_years("reversals", "at")).await?;
            tx.batch_execute(&edges_function()).await?;
        }
        // Needs the PIN keys: opened without them (operator commands that never open a PIN), the database stays at
        // the version before until a start with the keys. A step added after this one waits with it.
        let resealed = version >= RESEAL_VERSION || reseal_pins(&tx, cipher).await?;
        if resealed && version < 7 {
            // The audit trail as `pingate audit` reads it on both backends (SQLite's version 7 keeps a record per
            // batch; here the trail keeps its layout, a row per PIN and change, and the view is the table).
            tx.batch_execute(AUDIT_TRAIL_V7).await?;
        }
        if resealed && version < 8 {
            // Why each reversal was made (as the SQLite store's migration 8), for `pingate pins voided`.
            tx.batch_execute("ALTER TABLE reversals ADD COLUMN reason TEXT").await?;
            tx.batch_execute(super::LIMITS_V8).await?;
        }
        if resealed && version < 9 {
            // Merchants' sales per minute across every gateway, and their grants by minute (as the SQLite store's).
            tx.batch_execute(super::RATES_V9).await?;
        }
        let reached = if resealed { SCHEMA_VERSION } else { RESEAL_VERSION - 1 };
        tx.batch_execute(BATCH_FUNCTIONS).await?;
        if version < reached {
            tx.execute("UPDATE pingate_schema SET version = $1", &[&reached])
                .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

impl PgStore {
    /// The schema version in the database.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        Ok(self
            .client
            .query_one("SELECT version FROM pingate_schema", &[])
            .await?
            .get(0))
    }

    /// Adds a product or updates it, and adds its denominations.
    pub async fn upsert_product(&mut self, p: &Product) -> Result<(), StoreError> {
        let tx = self.client.transaction().await?;
        tx.execute(
            "INSERT INTO products (code, name, supplier, currency) VALUES ($1, $2, $3, $4)
             ON CONFLICT (code) DO UPDATE SET name = $2, supplier = $3, currency = $4",
            &[&p.code, &p.name, &p.supplier, &p.currency],
        )
        .await?;
        for a in &p.denominations {
            tx.execute(
                "INSERT INTO denominations (product, amount) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&p.code, a],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Loads PINs, all or nothing; an error names the 1-based position of the offending PIN.
    pub async fn import(&mut self, pins: &[NewPin]) -> Result<usize, StoreError> {
        self.import_with_progress(pins, &mut |_| {}).await
    }

    /// [`PgStore::import`], calling `progress` with the number of PINs written so far every few thousand.
    pub async fn import_with_progress(
        &mut self,
        pins: &[NewPin],
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<usize, StoreError> {
        let prints: Vec<Vec<u8>> = pins
            .iter()
            .map(|p| self.cipher.fingerprint(&p.product, &p.pin))
            .collect();
        // Checks that name the row come first (denomination, duplicates within the file, duplicates of what is
        // loaded already); the rows then go in by chunks of 1,000 per statement.
        let tx = self.client.transaction().await?;
        // The duplicate checks look PINs up by index; the statistics do not know of the rows this import adds, and
        // without this PostgreSQL reads the whole table for every chunk (the import slowed down as it went).
        tx.batch_execute("SET LOCAL enable_seqscan = off").await?;
        let (_, offered) = offer(&tx, &self.prepared).await?;
        let mut serials = HashSet::new();
        let mut seen = HashSet::new();
        for (i, (p, fp)) in pins.iter().zip(&prints).enumerate() {
            let row = i + 1;
            p.check_receipt()
                .map_err(|reason| StoreError::ImportRow { row, reason })?;
            if !offered.contains(&(p.product.clone(), p.amount)) {
                return Err(StoreError::ImportRow {
                    row,
                    reason: format!("product `{}` has no denomination {}", p.product, p.amount),
                });
            }
            if !serials.insert(p.serial.as_str()) {
                return Err(StoreError::ImportRow {
                    row,
                    reason: format!("duplicate serial `{}`", p.serial),
                });
            }
            if !seen.insert(fp.as_slice()) {
                return Err(StoreError::ImportRow {
                    row,
                    reason: DUPLICATE_PIN.into(),
                });
            }
        }
        const CHUNK: usize = 1_000;
        // Each PIN is sealed bound to its row, id included: the ids are taken from the table's sequence first, so
        // that each row is written once.
        let ids = tx
            .prepare("SELECT nextval(pg_get_serial_sequence('pins', 'id')) FROM generate_series(1, $1::int)")
            .await?;
        for (c, chunk) in pins.chunks(CHUNK).enumerate() {
            let prints = &prints[c * CHUNK..c * CHUNK + chunk.len()];
            let serial: Vec<&str> = chunk.iter().map(|p| p.serial.as_str()).collect();
            let fingerprint: Vec<&[u8]> = prints.iter().map(|f| f.as_slice()).collect();
            let existing = tx
                .query(
                    "SELECT serial, NULL::bytea FROM pins WHERE serial = ANY($1)
                     UNION ALL SELECT NULL, fingerprint FROM pins WHERE fingerprint = ANY($2)",
                    &[&serial, &fingerprint],
                )
                .await?;
            if let Some(r) = existing.first() {
                let (dup_serial, dup_print): (Option<String>, Option<Vec<u8>>) = (r.get(0), r.get(1));
                let at = chunk
                    .iter()
                    .zip(prints)
                    .position(|(p, f)| Some(&p.serial) == dup_serial.as_ref() || Some(f) == dup_print.as_ref())
                    .unwrap_or(0);
                let reason = match dup_serial {
                    Some(s) => format!("duplicate serial `{s}`"),
                    None => DUPLICATE_PIN.into(),
                };
                return Err(StoreError::ImportRow {
                    row: c * CHUNK + at + 1,
                    reason,
                });
            }
            let mut id: Vec<i64> = tx
                .query(&ids, &[&(chunk.len() as i32)])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            id.sort_unstable();
            let seals = chunk
                .iter()
                .zip(&id)
                .map(|(p, &id)| {
                    let row = RowAd {
                        id,
                        product: &p.product,
                        amount: p.amount,
                        serial: &p.serial,
                    };
                    self.cipher.seal_row(&p.pin, &row)
                })
                .collect::<Result<Vec<Sealed>, _>>()?;
            let product: Vec<&str> = chunk.iter().map(|p| p.product.as_str()).collect();
            let amount: Vec<i64> = chunk.iter().map(|p| p.amount).collect();
            let key_id: Vec<i32> = seals.iter().map(|s| s.key_id as i32).collect();
            let nonce: Vec<&[u8]> = seals.iter().map(|s| &s.nonce[..]).collect();
            let ciphertext: Vec<&[u8]> = seals.iter().map(|s| s.ciphertext.as_slice()).collect();
            let expiry: Vec<Option<&str>> = chunk.iter().map(|p| p.expiry.as_deref()).collect();
            let receipt: Vec<String> = chunk
                .iter()
                .map(|p| serde_json::to_string(&p.receipt).expect("strings serialise"))
                .collect();
            tx.execute(
                "INSERT INTO pins (id, product, amount, serial, fingerprint, key_id, nonce, ciphertext, expiry, receipt,
                                   state)
                 SELECT *, 'available' FROM UNNEST($10::bigint[], $1::text[], $2::bigint[], $3::text[], $4::bytea[],
                                                   $5::int[], $6::bytea[], $7::bytea[], $8::text[], $9::text[])",
                &[&product, &amount, &serial, &fingerprint, &key_id, &nonce, &ciphertext, &expiry, &receipt, &id],
            )
            .await?;
            let done = c * CHUNK + chunk.len();
            if done / super::sqlite::IMPORT_PROGRESS_EVERY
                != (done - chunk.len()) / super::sqlite::IMPORT_PROGRESS_EVERY
            {
                progress(done);
            }
        }
        tx.commit().await?;
        Ok(pins.len())
    }

    /// Applies several operations in one transaction (one commit for all).
    ///
    /// Every refusal an operation can meet (out of stock, not the holder, a mismatched repeat…) is found by
    /// reading before it writes anything, so refusals need no savepoint and never undo the rest of the batch
    /// (savepoints cost round trips, and more than 64 per transaction overflow PostgreSQL's subtransaction cache).
    /// A database error aborts the transaction: then every operation of the batch fails and none is kept.
    ///
    /// All sale keys of the batch are locked first, in one global order, so concurrent batches never deadlock on
    /// them. On-demand sales are applied together: a few statements for the whole batch instead of several each.
    pub async fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Outcome, StoreError>> {
        let mut quarantined = 0;
        loop {
            match self.apply_batch_once(ops).await {
                Ok(results) => return results,
                // The batch was rolled back whole: the PIN is available again. Quarantined (when its key is shown
                // right), the batch runs again and picks the next PIN.
                Err((pin_id, reason)) => {
                    let e = StoreError::Unreadable { pin_id, reason };
                    if quarantined < super::MAX_QUARANTINE_PER_OP {
                        match self.quarantine(pin_id).await {
                            Ok(true) => {
                                quarantined += 1;
                                continue;
                            }
                            Ok(false) => {}
                            Err(q) => tracing::error!(pin_id, error = %q, "quarantine failed"),
                        }
                    }
                    return super::failed_batch(ops.len(), &format!("a PIN of this batch does not decrypt: {e}"));
                }
            }
        }
    }

    /// Takes the available PIN `pin_id`, whose row did not open, out of sale if its key is shown right (another
    /// PIN sealed under the same key id opens); true if it was quarantined. A wrong key quarantines nothing.
    async fn quarantine(&mut self, pin_id: i64) -> Result<bool, StoreError> {
        let tx = self.client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "SELECT key_id, serial FROM pins WHERE id = $1 AND state = 'available' FOR UPDATE",
                &[&pin_id],
            )
            .await?
        else {
            return Ok(false);
        };
        let (key_id, serial): (i32, String) = (row.get(0), row.get(1));
        let others: Vec<PinRow> = tx
            .query(super::SAME_KEY_SAMPLE, &[&key_id, &pin_id])
            .await?
            .iter()
            .map(pin_row)
            .collect();
        if !super::key_is_shown_right(&others, &self.cipher, pin_id, key_id.into()) {
            return Ok(false);
        }
        let n = tx.execute(super::QUARANTINE, &[&pin_id]).await?;
        tx.commit().await?;
        super::log_quarantined(pin_id, &serial);
        Ok(n == 1)
    }

    /// One try at [`PgStore::apply_batch`]; `Err` when a PIN it picked does not open (nothing of it was kept).
    async fn apply_batch_once(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, StoreError>>, (i64, CryptoError)> {
        let now = unix_now();
        let today = super::sqlite::today();
        let (cipher, st) = (&self.cipher, &self.prepared);
        let fail_all = |e: StoreError| match e {
            StoreError::Unreadable { pin_id, reason } => Err((pin_id, reason)),
            e => Ok(super::failed_batch(ops.len(), &e.to_string())),
        };
        if ops.iter().all(|op| matches!(op, Op::Sell(_))) {
            return self.sell_batch(ops, now, &today).await;
        }
        let tx = match self.client.transaction().await {
            Ok(t) => t,
            Err(e) => return fail_all(StoreError::from_pg(&e)),
        };
        let mut keys: Vec<String> = ops.iter().map(lock_key).filter(|k| !k.is_empty()).collect();
        // A reversal by PIN id locks the key of that PIN's sale, with the others (a sale row never changes once
        // written, so reading it before the lock is safe).
        for op in ops {
            if let Op::ReversePin { gateway, pin_id } = op {
                match tx
                    .query_opt(
                        "SELECT gateway, terminal_id, stan, transmission FROM sales WHERE pin_id = $1 AND gateway = $2",
                        &[pin_id, gateway],
                    )
                    .await
                {
                    Ok(Some(r)) => keys.push(super::key_id(r.get(1), r.get(2), r.get(3))),
                    Ok(None) => {}
                    Err(e) => return fail_all(e.into()),
                }
            }
        }
        keys.sort();
        keys.dedup();
        if !keys.is_empty() {
            if let Err(e) = tx.execute(&st.lock_keys, &[&keys]).await {
                return fail_all(e.into());
            }
        }
        let mut results: Vec<Option<Result<Outcome, StoreError>>> = (0..ops.len()).map(|_| None).collect();
        let sells: Vec<(usize, &SellRequest)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                Op::Sell(r) => Some((i, r)),
                _ => None,
            })
            .collect();
        if !sells.is_empty() {
            let reqs: Vec<&SellRequest> = sells.iter().map(|(_, r)| *r).collect();
            match sell_many(&tx, st, cipher, &reqs, now, &today).await {
                Ok(rs) => {
                    // A PIN that does not decrypt was already recorded as sold: nothing of the batch may commit.
                    if let Some(u) = unreadable_of(&rs) {
                        return Err(u);
                    }
                    for ((i, _), r) in sells.iter().zip(rs) {
                        results[*i] = Some(r.map(Outcome::Sold));
                    }
                }
                Err(e) => return fail_all(e),
            }
        }
        let reserves: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, op)| matches!(op, Op::Reserve { .. }))
            .map(|(i, _)| i)
            .collect();
        if !reserves.is_empty() {
            let batch: Vec<&Op> = reserves.iter().map(|&i| &ops[i]).collect();
            match reserve_many(&tx, st, cipher, &batch, &today).await {
                Ok(rs) => {
                    for (i, r) in reserves.iter().zip(rs) {
                        results[*i] = Some(r.map(Outcome::Reserved));
                    }
                }
                Err(e) => return fail_all(e),
            }
        }
        // Confirms in one statement, each key and PIN once; a repeat inside the batch runs after, on its own.
        let (mut seen_keys, mut seen_pins) = (HashSet::new(), HashSet::new());
        let confirms: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, op)| match op {
                Op::Confirm { pin_id, sale, .. } => seen_keys.insert(sale.key_id()) & seen_pins.insert(*pin_id),
                _ => false,
            })
            .map(|(i, _)| i)
            .collect();
        if !confirms.is_empty() {
            let batch: Vec<&Op> = confirms.iter().map(|&i| &ops[i]).collect();
            match confirm_many(&tx, st, &batch, now).await {
                Ok(rs) => {
                    for (i, r) in confirms.iter().zip(rs) {
                        results[*i] = Some(r.map(Outcome::Confirmed));
                    }
                }
                Err(e) => return fail_all(e),
            }
        }
        for (i, op) in ops.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            match apply(&tx, st, cipher, op, now, &today).await {
                Err(StoreError::Db(m)) => return fail_all(StoreError::Db(m)),
                Err(e @ StoreError::Unreadable { .. }) => return fail_all(e),
                Err(StoreError::Crypto(e)) => return fail_all(StoreError::Db(e.to_string())),
                r => results[i] = Some(r),
            }
        }
        if let Err(e) = tx.commit().await {
            return fail_all(StoreError::from_pg(&e));
        }
        Ok(results.into_iter().map(|r| r.expect("every operation ran")).collect())
    }

    /// A batch of on-demand sales only (the common case under load): `BEGIN` and `pingate_sell_batch` go out
    /// together, so the batch costs two round trips, the second being the commit. The transaction is explicit,
    /// not the statement's own, so that a PIN that does not decrypt rolls the whole batch back.
    async fn sell_batch(
        &mut self,
        ops: &[Op],
        now: i64,
        today: &str,
    ) -> Result<Vec<Result<Outcome, StoreError>>, (i64, CryptoError)> {
        let reqs: Vec<&SellRequest> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Sell(r) => Some(r),
                _ => None,
            })
            .collect();
        let (client, st, cipher) = (&self.client, &self.prepared, &self.cipher);
        // Polled in this order, BEGIN is written before the call (tokio-postgres sends on first poll).
        let (begun, sold) = tokio::join!(
            client.batch_execute("BEGIN"),
            sell_many(client, st, cipher, &reqs, now, today)
        );
        let results = match (begun, sold) {
            (Ok(()), Ok(rs)) if unreadable_of(&rs).is_none() => rs,
            (begun, sold) => {
                let _ = client.batch_execute("ROLLBACK").await;
                let msg = match (begun, sold) {
                    (Err(e), _) => StoreError::from_pg(&e).to_string(),
                    (_, Err(StoreError::Unreadable { pin_id, reason })) => return Err((pin_id, reason)),
                    (_, Err(e)) => e.to_string(),
                    (_, Ok(rs)) => return Err(unreadable_of(&rs).expect("an unreadable PIN")),
                };
                return Ok(super::failed_batch(ops.len(), &msg));
            }
        };
        if let Err(e) = client.batch_execute("COMMIT").await {
            return Ok(super::failed_batch(ops.len(), &StoreError::from_pg(&e).to_string()));
        }
        Ok(results.into_iter().map(|r| r.map(Outcome::Sold)).collect())
    }

    async fn apply_one(&mut self, op: Op) -> Result<Outcome, StoreError> {
        self.apply_batch(std::slice::from_ref(&op))
            .await
            .pop()
            .expect("one result")
    }

    pub async fn sell(&mut self, req: &SellRequest) -> Result<Dispensed, StoreError> {
        match self.apply_one(Op::Sell(req.clone())).await? {
            Outcome::Sold(d) => Ok(d),
            o => Err(StoreError::Db(format!("internal: unexpected outcome {o:?}"))),
        }
    }

    pub async fn reverse(&mut self, sale: &SaleContext) -> Result<Reversal, StoreError> {
        self.reverse_checked(sale, None).await
    }

    /// [`PgStore::reverse`], refused ([`StoreError::ReversalMismatch`]) when `content` differs from the sale's.
    pub async fn reverse_checked(
        &mut self,
        sale: &SaleContext,
        content: Option<&crate::sale::SaleContent>,
    ) -> Result<Reversal, StoreError> {
        let op = Op::Reverse {
            sale: sale.clone(),
            content: content.cloned(),
            policy: Default::default(),
        };
        match self.apply_one(op).await? {
            Outcome::Reversed(r) => Ok(r),
            o => Err(StoreError::Db(format!("internal: unexpected outcome {o:?}"))),
        }
    }

    /// Count of PINs per product, amount and state.
    pub async fn stock(&self) -> Result<Vec<StockRow>, StoreError> {
        stock(&self.client).await
    }

    /// The catalog.
    pub async fn catalog(&self) -> Result<Vec<Product>, StoreError> {
        catalog(&self.client).await
    }

    /// Available PINs past their expiry date become expired; returns how many.
    pub async fn expire(&mut self, today: &str) -> Result<u64, StoreError> {
        expire_available(&self.client, today).await
    }

    /// Reservations whose lease ended before `now`, per holder (reported, never freed by themselves).
    pub async fn expired_leases(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT holder, COUNT(*) FROM pins WHERE state = 'reserved' AND lease_until < $1 GROUP BY holder ORDER BY holder",
                &[&now],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Operator command: `holder`'s expired reservations go back to stock. Returns how many.
    pub async fn return_expired(&mut self, holder: &str, now: i64) -> Result<u64, StoreError> {
        Ok(self
            .client
            .execute(
                "UPDATE pins SET state = 'available', holder = NULL, lease_until = NULL
                 WHERE state = 'reserved' AND holder = $1 AND lease_until < $2",
                &[&holder, &now],
            )
            .await?)
    }

    /// Operator command: a quarantined PIN whose row opens again goes back to stock (see [`super::PinStore`]).
    pub async fn return_quarantined(&mut self, pin_id: i64) -> Result<(), StoreError> {
        let tx = self.client.transaction().await?;
        let row = tx
            .query_opt(
                &format!("SELECT {PIN_COLUMNS}, state FROM pins WHERE id = $1 FOR UPDATE"),
                &[&pin_id],
            )
            .await?
            .map(|r| (pin_row(&r), r.get::<_, String>(9)));
        super::check_returnable(row, pin_id, &self.cipher)?;
        tx.execute(
            "UPDATE pins SET state = 'available' WHERE id = $1 AND state = 'quarantined'",
            &[&pin_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Operator command: an available PIN is quarantined on the operator's word (see [`super::PinStore`]).
    pub async fn operator_quarantine(&mut self, pin_id: i64) -> Result<(), StoreError> {
        let tx = self.client.transaction().await?;
        let state = tx
            .query_opt("SELECT state FROM pins WHERE id = $1 FOR UPDATE", &[&pin_id])
            .await?
            .map(|r| r.get::<_, String>(0));
        super::check_quarantinable(state, pin_id)?;
        tx.execute(super::QUARANTINE, &[&pin_id]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Direct access for tests and the audit command.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl StoreError {
    fn from_pg(e: &tokio_postgres::Error) -> StoreError {
        match e.as_db_error() {
            Some(db) => StoreError::Db(format!("{} ({})", db.message(), db.code().code())),
            None => StoreError::Db(e.to_string()),
        }
    }
}

/// The sale key an operation locks, if any ("" sorts first for operations without one).
fn lock_key(op: &Op) -> String {
    match op {
        Op::Sell(r) => r.sale.key_id(),
        Op::Confirm { sale, .. } | Op::Reverse { sale, .. } => sale.key_id(),
        _ => String::new(),
    }
}

async fn lock(tx: &impl GenericClient, sale: &SaleContext) -> Result<(), StoreError> {
    tx.execute("SELECT pingate_lock_keys(ARRAY[$1::text])", &[&sale.key_id()])
        .await?;
    Ok(())
}

fn pin_row(r: &Row) -> PinRow {
    pin_row_at(r, 0)
}

/// The PIN columns ([`PIN_COLUMNS`]) of a row, starting at column `at`.
fn pin_row_at(r: &Row, at: usize) -> PinRow {
    let nonce: Vec<u8> = r.get(at + 5);
    let key_id: i32 = r.get(at + 4);
    PinRow {
        id: r.get(at),
        product: r.get(at + 1),
        amount: r.get(at + 2),
        serial: r.get(at + 3),
        sealed: Sealed {
            key_id: key_id as u32,
            nonce: nonce.try_into().unwrap_or([0; 12]),
            ciphertext: r.get(at + 6),
        },
        expiry: r.get(at + 7),
        receipt: r.get(at + 8),
    }
}

async fn apply(
    tx: &impl GenericClient,
    st: &Prepared,
    cipher: &PinCipher,
    op: &Op,
    now: i64,
    today: &str,
) -> Result<Outcome, StoreError> {
    match op {
        Op::Sell(req) => sell_many(tx, st, cipher, &[req], now, today)
            .await?
            .pop()
            .expect("one result per request")
            .map(Outcome::Sold),
        // apply_batch gives every reservation to reserve_many; one alone takes the same path.
        Op::Reserve { .. } => reserve_many(tx, st, cipher, &[op], today)
            .await?
            .pop()
            .expect("one result per reservation")
            .map(Outcome::Reserved),
        Op::Confirm { holder, pin_id, sale } => {
            lock(tx, sale).await?;
            if let Some(found) = find_sale(tx, sale).await? {
                return if found.pin_id == *pin_id {
                    Ok(Outcome::Confirmed(Confirmation::AlreadyConfirmed))
                } else {
                    conflict(tx, holder, *pin_id, sale, super::CONFLICT_KEY_SOLD, now)
                        .await
                        .map(Outcome::Confirmed)
                };
            }
            let row = tx
                .query_opt(
                    "UPDATE pins SET state = 'sold', lease_until = NULL
                     WHERE id = $1 AND state = 'reserved' AND holder = $2 RETURNING product, amount",
                    &[pin_id, holder],
                )
                .await?;
            let Some(row) = row else {
                return Err(StoreError::NotHolder {
                    holder: holder.clone(),
                    pin_id: *pin_id,
                });
            };
            let (product, amount): (String, i64) = (row.get(0), row.get(1));
            insert_sale(tx, sale, *pin_id, &product, amount, now).await?;
            if reversal_pending(tx, sale).await? {
                void(tx, sale, *pin_id, now).await?;
                Ok(Outcome::Confirmed(Confirmation::Voided))
            } else {
                Ok(Outcome::Confirmed(Confirmation::Sold))
            }
        }
        Op::Release { holder, pin_ids } => {
            // One statement for all (a gateway shutting down returns its whole cache).
            let released: HashSet<i64> = tx
                .query(
                    "UPDATE pins SET state = 'available', holder = NULL, lease_until = NULL
                     WHERE id = ANY($1) AND state = 'reserved' AND holder = $2 RETURNING id",
                    &[pin_ids, holder],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // An id given twice is released once: its repeat is refused, as when released one by one.
            let mut once = HashSet::new();
            let refused = pin_ids
                .iter()
                .copied()
                .filter(|id| !(released.contains(id) && once.insert(*id)))
                .collect();
            Ok(Outcome::Released { refused })
        }
        Op::Renew {
            holder,
            pin_ids,
            lease_until,
        } => {
            let n = tx
                .execute(
                    "UPDATE pins SET lease_until = $3 WHERE id = ANY($1) AND state = 'reserved' AND holder = $2",
                    &[pin_ids, holder, lease_until],
                )
                .await?;
            Ok(Outcome::Renewed(n as usize))
        }
        Op::Reverse { sale, content, policy } => {
            lock(tx, sale).await?;
            let found = find_sale(tx, sale).await?;
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
            Ok(Outcome::Reversed(match found {
                None => {
                    if !reversal_pending(tx, sale).await? {
                        tx.execute(
                            "INSERT INTO reversals (gateway, terminal_id, stan, transmission, pin_id, at, product,
                             amount, merchant_id, reason) VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8, $9)",
                            &[
                                &sale.gateway,
                                &sale.terminal_id,
                                &sale.stan,
                                &sale.transmission,
                                &now,
                                &content.as_ref().map(|c| c.product.as_str()),
                                &content.as_ref().map(|c| c.amount),
                                &content.as_ref().map(|c| c.merchant_id.as_str()),
                                &policy.stored_reason(),
                            ],
                        )
                        .await?;
                    }
                    Reversal::Remembered
                }
                Some(f) if f.state == PinState::Voided => Reversal::AlreadyVoided { pin_id: f.pin_id },
                Some(f) => {
                    void(tx, sale, f.pin_id, now).await?;
                    if let Some(reason) = policy.stored_reason() {
                        tx.execute(
                            "UPDATE reversals SET reason = $4 WHERE transmission = $1 AND stan = $2 AND terminal_id = $3",
                            &[&sale.transmission, &sale.stan, &sale.terminal_id, &reason],
                        )
                        .await?;
                    }
                    Reversal::Voided { pin_id: f.pin_id }
                }
            }))
        }
        Op::ReversePin { gateway, pin_id } => {
            let row = tx
                .query_opt(
                    "SELECT gateway, terminal_id, stan, transmission, merchant_id, rrn FROM sales
                     WHERE pin_id = $1 AND gateway = $2",
                    &[pin_id, gateway],
                )
                .await?;
            let Some(r) = row else {
                return Err(StoreError::NotHolder {
                    holder: gateway.clone(),
                    pin_id: *pin_id,
                });
            };
            let sale = SaleContext {
                gateway: r.get(0),
                terminal_id: r.get(1),
                stan: r.get(2),
                transmission: r.get(3),
                merchant_id: r.get(4),
                rrn: r.get(5),
            };
            let op = Op::Reverse {
                sale,
                content: None,
                policy: Default::default(),
            };
            Box::pin(apply(tx, st, cipher, &op, now, today)).await
        }
        Op::Allowance {
            merchant_id,
            currency,
            want,
        } => {
            let limit: Option<i64> = tx
                .query_opt(
                    "SELECT value_per_day FROM merchant_limits WHERE merchant_id = $1 AND currency = $2",
                    &[merchant_id, currency],
                )
                .await?
                .map(|r| r.get(0));
            let Some(limit) = limit else {
                return Ok(Outcome::Allowance {
                    granted: (*want).max(0),
                    limited: false,
                });
            };
            let day = now.div_euclid(86_400);
            // The day's row, locked: servers sharing the database grant one after another.
            tx.execute(
                "INSERT INTO merchant_allowances (merchant_id, currency, day, granted) VALUES ($1, $2, $3, 0)
                 ON CONFLICT DO NOTHING",
                &[merchant_id, currency, &day],
            )
            .await?;
            let granted_today: i64 = tx
                .query_one(
                    "SELECT granted FROM merchant_allowances WHERE merchant_id = $1 AND currency = $2 AND day = $3
                     FOR UPDATE",
                    &[merchant_id, currency, &day],
                )
                .await?
                .get(0);
            let granted = super::grant_allowance(Some(limit), granted_today, *want);
            tx.execute(
                "UPDATE merchant_allowances SET granted = granted + $4 WHERE merchant_id = $1 AND currency = $2
                 AND day = $3",
                &[merchant_id, currency, &day, &granted],
            )
            .await?;
            Ok(Outcome::Allowance { granted, limited: true })
        }
        Op::SalesAllowance {
            merchant_id,
            minute,
            want,
        } => {
            let limit: Option<i64> = tx
                .query_opt(
                    "SELECT sales_per_minute FROM merchant_rate_limits WHERE merchant_id = $1",
                    &[merchant_id],
                )
                .await?
                .map(|r| r.get(0));
            let Some(limit) = limit else {
                return Ok(Outcome::Allowance {
                    granted: (*want).max(0),
                    limited: false,
                });
            };
            // The minute's row, locked first: servers sharing the database grant one after another, and each takes
            // the row locks in the same order (this minute's, then the older ones it deletes), so none deadlock.
            tx.execute(
                "INSERT INTO merchant_sales_allowances (merchant_id, minute, granted) VALUES ($1, $2, 0)
                 ON CONFLICT DO NOTHING",
                &[merchant_id, minute],
            )
            .await?;
            let granted_now: i64 = tx
                .query_one(
                    "SELECT granted FROM merchant_sales_allowances WHERE merchant_id = $1 AND minute = $2 FOR UPDATE",
                    &[merchant_id, minute],
                )
                .await?
                .get(0);
            // Minutes before the last are done with: the table keeps at most two rows per merchant (the last
            // minute's stays for a server whose clock is a little behind, which would otherwise grant it afresh).
            tx.execute(
                "DELETE FROM merchant_sales_allowances WHERE merchant_id = $1 AND minute < $2",
                &[merchant_id, &(minute - 1)],
            )
            .await?;
            let granted = super::grant_allowance(Some(limit), granted_now, *want);
            tx.execute(
                "UPDATE merchant_sales_allowances SET granted = granted + $3 WHERE merchant_id = $1 AND minute = $2",
                &[merchant_id, minute, &granted],
            )
            .await?;
            Ok(Outcome::Allowance { granted, limited: true })
        }
        Op::Stock => stock(tx).await.map(Outcome::Stock),
        Op::Expire => expire_available(tx, today).await.map(Outcome::Expired),
        Op::Catalog => catalog(tx).await.map(Outcome::Catalog),
        Op::CheckSale { sale } => {
            let found = find_sale(tx, sale).await?.map(|f| f.state);
            let reversed = found.is_none() && reversal_pending(tx, sale).await?;
            Ok(Outcome::SaleState(super::sale_state(found, reversed)))
        }
        Op::Limits { day, minute } => Ok(Outcome::Limits(
            limits(tx, *day).await?,
            rate_limits(tx, *minute).await?,
        )),
        Op::Held { holder } => {
            let rows = tx
                .query(
                    "SELECT id FROM pins WHERE state = 'reserved' AND holder = $1 ORDER BY id",
                    &[holder],
                )
                .await?;
            Ok(Outcome::Held(rows.iter().map(|r| r.get(0)).collect()))
        }
    }
}

/// Every merchant's value limit with what was granted of it on UTC day `day` (the CLI's `limits show`, the metrics).
async fn limits(c: &impl GenericClient, day: i64) -> Result<Vec<super::LimitRow>, StoreError> {
    Ok(c.query(super::LIST_LIMITS, &[&day])
        .await?
        .iter()
        .map(|r| super::LimitRow {
            merchant_id: r.get(0),
            currency: r.get(1),
            value_per_day: r.get(2),
            granted_today: r.get(3),
        })
        .collect())
}

/// Every merchant's sales per minute with what was granted of it in minute `minute`.
async fn rate_limits(c: &impl GenericClient, minute: i64) -> Result<Vec<super::RateRow>, StoreError> {
    Ok(c.query(super::LIST_RATE_LIMITS, &[&minute])
        .await?
        .iter()
        .map(|r| super::RateRow {
            merchant_id: r.get(0),
            sales_per_minute: r.get(1),
            granted_this_minute: r.get(2),
        })
        .collect())
}

/// The sale recorded under a key, whichever gateway made it.
struct FoundSale {
    pin_id: i64,
    state: PinState,
    product: String,
    amount: i64,
    merchant: String,
    /// The currency of the sale's product.
    currency: Option<String>,
    sold_at: i64,
}

async fn find_sale(tx: &impl GenericClient, sale: &SaleContext) -> Result<Option<FoundSale>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT s.pin_id, p.state, s.product, s.amount, s.merchant_id, pr.currency, s.sold_at
             FROM sales s JOIN pins p ON p.id = s.pin_id LEFT JOIN products pr ON pr.code = s.product
             WHERE s.transmission = $1 AND s.stan = $2 AND s.terminal_id = $3",
            &[&sale.transmission, &sale.stan, &sale.terminal_id],
        )
        .await?;
    Ok(row.map(|r| {
        let s: String = r.get(1);
        FoundSale {
            pin_id: r.get(0),
            state: PinState::parse(&s).unwrap_or(PinState::Sold),
            product: r.get(2),
            amount: r.get(3),
            merchant: r.get(4),
            currency: r.get(5),
            sold_at: r.get(6),
        }
    }))
}

async fn reversal_pending(tx: &impl GenericClient, sale: &SaleContext) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM reversals WHERE transmission = $1 AND stan = $2 AND terminal_id = $3",
            &[&sale.transmission, &sale.stan, &sale.terminal_id],
        )
        .await?
        .is_some())
}

/// A confirm refused for good (see [`Confirmation::Conflict`] and the SQLite store's `conflict`).
async fn conflict(
    tx: &impl GenericClient,
    holder: &str,
    pin_id: i64,
    sale: &SaleContext,
    reason: &str,
    now: i64,
) -> Result<Confirmation, StoreError> {
    let earlier = tx
        .query_opt(
            "SELECT voided FROM confirm_conflicts WHERE pin_id = $1 AND gateway = $2 ORDER BY id LIMIT 1",
            &[&pin_id, &holder],
        )
        .await?;
    if let Some(r) = earlier {
        return Ok(Confirmation::Conflict { voided: r.get(0) });
    }
    // Only the PIN's holder can have handed it out: anyone else is refused, and nothing is recorded.
    let voided = tx.execute(super::VOID_RESERVED, &[&pin_id, &holder]).await? == 1;
    if !voided {
        return Err(StoreError::NotHolder {
            holder: holder.to_string(),
            pin_id,
        });
    }
    tx.execute(
        super::INSERT_CONFLICT,
        &[
            &pin_id,
            &holder,
            &sale.terminal_id,
            &sale.stan,
            &sale.transmission,
            &sale.merchant_id,
            &reason,
            &voided,
            &now,
        ],
    )
    .await?;
    super::log_conflict(pin_id, holder, reason, voided);
    Ok(Confirmation::Conflict { voided })
}

async fn insert_sale(
    tx: &impl GenericClient,
    sale: &SaleContext,
    pin_id: i64,
    product: &str,
    amount: i64,
    now: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO sales (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product, amount, sold_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &sale.gateway,
            &sale.terminal_id,
            &sale.stan,
            &sale.transmission,
            &pin_id,
            &sale.merchant_id,
            &super::rrn_of_pin(pin_id),
            &product,
            &amount,
            &now,
        ],
    )
    .await?;
    Ok(())
}

async fn void(tx: &impl GenericClient, sale: &SaleContext, pin_id: i64, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE pins SET state = 'voided' WHERE id = $1 AND state = 'sold'",
        &[&pin_id],
    )
    .await?;
    // One reversal row per key, whichever gateway remembered it first.
    let updated = tx
        .execute(
            "UPDATE reversals SET pin_id = $4 WHERE transmission = $1 AND stan = $2 AND terminal_id = $3",
            &[&sale.transmission, &sale.stan, &sale.terminal_id, &pin_id],
        )
        .await?;
    if updated == 0 {
        tx.execute(
            "INSERT INTO reversals (gateway, terminal_id, stan, transmission, pin_id, at) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &sale.gateway,
                &sale.terminal_id,
                &sale.stan,
                &sale.transmission,
                &pin_id,
                &now,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Available PINs past their expiry date become expired; returns how many.
async fn expire_available(tx: &impl GenericClient, today: &str) -> Result<u64, StoreError> {
    Ok(tx
        .execute(
            "UPDATE pins SET state = 'expired' WHERE state = 'available' AND expiry IS NOT NULL AND expiry < $1",
            &[&today],
        )
        .await?)
}

async fn stock(tx: &impl GenericClient) -> Result<Vec<StockRow>, StoreError> {
    let rows = tx
        .query(
            "SELECT product, amount, state, COUNT(*) FROM pins GROUP BY product, amount, state ORDER BY 1, 2, 3",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let state: String = r.get(2);
            StockRow {
                product: r.get(0),
                amount: r.get(1),
                state: PinState::parse(&state).unwrap_or(PinState::Expired),
                count: r.get(3),
            }
        })
        .collect())
}

async fn catalog(tx: &impl GenericClient) -> Result<Vec<Product>, StoreError> {
    let rows = tx
        .query(
            "SELECT p.code, p.name, p.supplier, p.currency, d.amount FROM products p
             LEFT JOIN denominations d ON d.product = p.code ORDER BY p.code, d.amount",
            &[],
        )
        .await?;
    let mut out: Vec<Product> = Vec::new();
    for r in &rows {
        let code: String = r.get(0);
        if out.last().is_none_or(|p| p.code != code) {
            out.push(Product {
                code,
                name: r.get(1),
                supplier: r.get(2),
                currency: r.get(3),
                denominations: Vec::new(),
            });
        }
        if let Some(a) = r.get::<_, Option<i64>>(4) {
            out.last_mut().expect("pushed").denominations.push(a);
        }
    }
    Ok(out)
}

/// On-demand sales of one batch in one statement (`pingate_sell_batch`, see [`BATCH_FUNCTIONS`]): the database locks
/// the keys, finds earlier sales and reversals, picks and records; this decides each request's answer from what it
/// returns.
async fn sell_many(
    tx: &impl GenericClient,
    st: &Prepared,
    cipher: &PinCipher,
    reqs: &[&SellRequest],
    now: i64,
    today: &str,
) -> Result<Vec<Result<Dispensed, StoreError>>, StoreError> {
    use std::collections::HashMap;
    let col = |f: fn(&SellRequest) -> &str| reqs.iter().map(|r| f(r)).collect::<Vec<&str>>();
    let keys: Vec<String> = reqs.iter().map(|r| r.sale.key_id()).collect();
    let amounts: Vec<i64> = reqs.iter().map(|r| r.amount).collect();
    let rows = tx
        .query(
            &st.sell_batch,
            &[
                &keys,
                &col(|r| &r.sale.gateway),
                &col(|r| &r.sale.terminal_id),
                &col(|r| &r.sale.stan),
                &col(|r| &r.sale.transmission),
                &col(|r| &r.sale.merchant_id),
                &col(|r| &r.sale.rrn),
                &col(|r| &r.product),
                &amounts,
                &now,
                &today,
            ],
        )
        .await?;

    // What the database found for each request.
    #[derive(Default)]
    struct Found {
        /// An earlier sale under this key: (its product, amount, merchant), its PIN, and whether it was reversed.
        existing: Option<(String, i64, String, PinRow, bool)>,
        reversed: bool,
        unknown_product: bool,
        unknown_denomination: bool,
        sold: Option<PinRow>,
    }
    let mut found: Vec<Found> = (0..reqs.len()).map(|_| Found::default()).collect();
    for r in &rows {
        let f = &mut found[request_of(r, reqs.len(), "pingate_sell_batch")?];
        match r.get::<_, &str>(1) {
            "existing" => {
                let voided = r.get::<_, &str>(11) == PinState::Voided.as_str();
                f.existing = Some((r.get(12), r.get(13), r.get(14), pin_row_at(r, 2), voided));
            }
            "reversed" => f.reversed = true,
            "unknown_product" => f.unknown_product = true,
            "unknown_denomination" => f.unknown_denomination = true,
            "sold" => f.sold = Some(pin_row_at(r, 2)),
            other => {
                return Err(StoreError::Db(format!(
                    "internal: pingate_sell_batch answered `{other}`"
                )))
            }
        }
    }

    // When the repeats among them were sold (a read only when there are repeats).
    let repeated: Vec<i64> = found
        .iter()
        .filter_map(|f| f.existing.as_ref().map(|e| e.3.id))
        .collect();
    let sold_at: HashMap<i64, i64> = if repeated.is_empty() {
        HashMap::new()
    } else {
        tx.query("SELECT pin_id, sold_at FROM sales WHERE pin_id = ANY($1)", &[&repeated])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let mut redelivered: Vec<(i64, &str, &str)> = Vec::new();

    // A key repeated inside the batch follows its first request (the one the database picked for).
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut out: Vec<Result<Dispensed, StoreError>> = Vec::with_capacity(reqs.len());
    for (i, (r, f)) in reqs.iter().zip(found).enumerate() {
        let shown = || r.sale.key();
        // The first request of a key that is not refused for its product or amount (as the database decided).
        let earlier = if f.unknown_product || f.unknown_denomination {
            i
        } else {
            *first.entry(keys[i].as_str()).or_insert(i)
        };
        out.push(if let Some((product, amount, merchant, pin, voided)) = f.existing {
            let state = if voided { PinState::Voided } else { PinState::Sold };
            let at = sold_at.get(&pin.id).copied().unwrap_or(0);
            match super::check_repeat(r, (&product, amount, &merchant), state, at) {
                Err(e) => Err(e),
                Ok(()) => pin.open(cipher).map(|mut d| {
                    redelivered.push((d.pin_id, r.sale.gateway.as_str(), r.sale.terminal_id.as_str()));
                    d.redelivered = true;
                    d
                }),
            }
        } else if f.reversed {
            Err(StoreError::AlreadyReversed { key: shown() })
        } else if f.unknown_product {
            Err(StoreError::UnknownProduct(r.product.clone()))
        } else if f.unknown_denomination {
            Err(StoreError::UnknownDenomination {
                product: r.product.clone(),
                amount: r.amount,
            })
        } else if earlier < i {
            let e = reqs[earlier];
            if e.product != r.product || e.amount != r.amount || e.sale.merchant_id != r.sale.merchant_id {
                Err(StoreError::DuplicateMismatch { key: shown() })
            } else {
                match &out[earlier] {
                    Ok(d) => Ok(Dispensed {
                        redelivered: true,
                        ..d.clone()
                    }),
                    Err(_) => Err(StoreError::OutOfStock {
                        product: r.product.clone(),
                        amount: r.amount,
                    }),
                }
            }
        } else {
            match f.sold {
                Some(pin) => pin.open(cipher),
                None => Err(StoreError::OutOfStock {
                    product: r.product.clone(),
                    amount: r.amount,
                }),
            }
        });
    }
    if !redelivered.is_empty() {
        let pins: Vec<i64> = redelivered.iter().map(|r| r.0).collect();
        let gateways: Vec<&str> = redelivered.iter().map(|r| r.1).collect();
        let terminals: Vec<&str> = redelivered.iter().map(|r| r.2).collect();
        tx.execute(
            "INSERT INTO redeliveries (pin_id, gateway, terminal_id, at)
             SELECT p, g, t, $4 FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS u(p, g, t)",
            &[&pins, &gateways, &terminals, &now],
        )
        .await?;
    }
    Ok(out)
}

/// The first PIN of a batch's sales that did not open, if any: the batch must then be rolled back whole.
fn unreadable_of(rs: &[Result<Dispensed, StoreError>]) -> Option<(i64, CryptoError)> {
    rs.iter().find_map(|r| match r {
        Err(StoreError::Unreadable { pin_id, reason }) => Some((*pin_id, reason.clone())),
        _ => None,
    })
}

/// The request (from 0) a row of a batch function answers: its first column, `o_i`, numbers requests from 1.
fn request_of(r: &Row, n: usize, function: &str) -> Result<usize, StoreError> {
    let i: i32 = r.get(0);
    usize::try_from(i - 1)
        .ok()
        .filter(|&i| i < n)
        .ok_or_else(|| StoreError::Db(format!("internal: {function} answered request {i}")))
}

/// Confirms of one batch in one statement (`pingate_confirm_batch`); every key and PIN appears once.
async fn confirm_many(
    tx: &impl GenericClient,
    st: &Prepared,
    ops: &[&Op],
    now: i64,
) -> Result<Vec<Result<Confirmation, StoreError>>, StoreError> {
    let items: Vec<(&str, i64, &SaleContext)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Confirm { holder, pin_id, sale } => Some((holder.as_str(), *pin_id, sale)),
            _ => None,
        })
        .collect();
    let col = |f: fn(&SaleContext) -> &str| items.iter().map(|(_, _, s)| f(s)).collect::<Vec<&str>>();
    let keys: Vec<String> = items.iter().map(|(_, _, s)| s.key_id()).collect();
    let holders: Vec<&str> = items.iter().map(|(h, _, _)| *h).collect();
    let pins: Vec<i64> = items.iter().map(|(_, p, _)| *p).collect();
    let rows = tx
        .query(
            &st.confirm_batch,
            &[
                &keys,
                &col(|s| &s.gateway),
                &col(|s| &s.terminal_id),
                &col(|s| &s.stan),
                &col(|s| &s.transmission),
                &col(|s| &s.merchant_id),
                &col(|s| &s.rrn),
                &holders,
                &pins,
                &now,
            ],
        )
        .await?;
    let mut out: Vec<Option<Result<Confirmation, StoreError>>> = (0..items.len()).map(|_| None).collect();
    for r in &rows {
        let i = request_of(r, items.len(), "pingate_confirm_batch")?;
        let sale = items[i].2;
        out[i] = Some(match r.get::<_, &str>(1) {
            "already" => Ok(Confirmation::AlreadyConfirmed),
            "mismatch" => conflict(tx, items[i].0, items[i].1, sale, super::CONFLICT_KEY_SOLD, now).await,
            "sold" => Ok(Confirmation::Sold),
            "voided" => Ok(Confirmation::Voided),
            other => {
                return Err(StoreError::Db(format!(
                    "internal: pingate_confirm_batch answered `{other}`"
                )))
            }
        });
    }
    let mut results = Vec::with_capacity(items.len());
    for (r, (holder, pin_id, _)) in out.into_iter().zip(&items) {
        results.push(match r {
            Some(r) => r,
            // Neither sold before nor moved now: the PIN is not this holder's reserved one.
            None => Err(StoreError::NotHolder {
                holder: holder.to_string(),
                pin_id: *pin_id,
            }),
        });
    }
    Ok(results)
}

/// The products known, and the (product, amount) pairs on offer, in one read.
async fn offer(
    tx: &impl GenericClient,
    st: &Prepared,
) -> Result<(HashSet<String>, HashSet<(String, i64)>), StoreError> {
    let (mut products, mut offered) = (HashSet::new(), HashSet::new());
    for r in tx.query(&st.offer, &[]).await? {
        let code: String = r.get(0);
        if let Some(amount) = r.get::<_, Option<i64>>(1) {
            offered.insert((code.clone(), amount));
        }
        products.insert(code);
    }
    Ok((products, offered))
}

/// Reservations of one batch: one pick per product and amount for all of them, then one update that gives each
/// PIN its holder and lease. Competing servers skip each other's locked rows once per batch, not once per request.
async fn reserve_many(
    tx: &impl GenericClient,
    st: &Prepared,
    cipher: &PinCipher,
    ops: &[&Op],
    today: &str,
) -> Result<Vec<Result<Vec<Dispensed>, StoreError>>, StoreError> {
    use std::collections::HashMap;
    let (products, offered) = offer(tx, st).await?;
    let mut out: Vec<Option<Result<Vec<Dispensed>, StoreError>>> = (0..ops.len()).map(|_| None).collect();
    let mut groups: HashMap<(String, i64), Vec<usize>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Reserve {
            product, amount, count, ..
        } = op
        else {
            unreachable!("only reserves are passed")
        };
        if *count == 0 || *count > MAX_RESERVE {
            out[i] = Some(Err(StoreError::BadRequest(format!(
                "reserve 1 to {MAX_RESERVE} PINs, not {count}"
            ))));
        } else if !products.contains(product) {
            out[i] = Some(Err(StoreError::UnknownProduct(product.clone())));
        } else if !offered.contains(&(product.clone(), *amount)) {
            out[i] = Some(Err(StoreError::UnknownDenomination {
                product: product.clone(),
                amount: *amount,
            }));
        } else {
            groups.entry((product.clone(), *amount)).or_default().push(i);
        }
    }
    for ((product, amount), who) in groups {
        let total: i64 = who
            .iter()
            .map(|&i| match ops[i] {
                Op::Reserve { count, .. } => *count as i64,
                _ => 0,
            })
            .sum();
        let mut ids: Vec<i64> = tx
            .query(&st.reserve_pick, &[&product, &amount, &today, &total])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ids.reverse();
        let (mut pin_ids, mut holders, mut leases, mut owner) = (Vec::new(), Vec::new(), Vec::new(), HashMap::new());
        for &i in &who {
            let Op::Reserve {
                holder,
                count,
                lease_until,
                ..
            } = ops[i]
            else {
                unreachable!()
            };
            for _ in 0..*count {
                let Some(id) = ids.pop() else { break };
                pin_ids.push(id);
                holders.push(holder.as_str());
                leases.push(*lease_until);
                owner.insert(id, i);
            }
            out[i] = Some(Ok(Vec::new()));
        }
        let rows = tx.query(&st.reserve_update, &[&pin_ids, &holders, &leases]).await?;
        for r in &rows {
            let pin = pin_row(r);
            let i = owner[&pin.id];
            if let Some(Ok(v)) = out[i].as_mut() {
                v.push(pin.open(cipher)?);
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|r| {
            let mut r = r.expect("every reserve decided");
            if let Ok(v) = r.as_mut() {
                v.sort_by_key(|d| d.pin_id);
            }
            r
        })
        .collect())
}

impl super::PinStore for PgStore {
    async fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Outcome, StoreError>> {
        PgStore::apply_batch(self, ops).await
    }
    async fn upsert_product(&mut self, p: &Product) -> Result<(), StoreError> {
        PgStore::upsert_product(self, p).await
    }
    async fn import_with_progress(
        &mut self,
        pins: &[NewPin],
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<usize, StoreError> {
        PgStore::import_with_progress(self, pins, progress).await
    }
    async fn stock(&self) -> Result<Vec<StockRow>, StoreError> {
        PgStore::stock(self).await
    }
    async fn catalog(&self) -> Result<Vec<Product>, StoreError> {
        PgStore::catalog(self).await
    }
    async fn expire(&mut self, today: &str) -> Result<u64, StoreError> {
        PgStore::expire(self, today).await
    }
    async fn expired_leases(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        PgStore::expired_leases(self, now).await
    }
    async fn return_expired(&mut self, holder: &str, now: i64) -> Result<u64, StoreError> {
        PgStore::return_expired(self, holder, now).await
    }
    async fn return_quarantined(&mut self, pin_id: i64) -> Result<(), StoreError> {
        PgStore::return_quarantined(self, pin_id).await
    }
    async fn operator_quarantine(&mut self, pin_id: i64) -> Result<(), StoreError> {
        PgStore::operator_quarantine(self, pin_id).await
    }
    async fn conflicts(&self) -> Result<Vec<super::ConflictRow>, StoreError> {
        let rows = self.client.query(super::LIST_CONFLICTS, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| super::ConflictRow {
                id: r.get(0),
                pin_id: r.get(1),
                gateway: r.get(2),
                terminal_id: r.get(3),
                stan: r.get(4),
                transmission: r.get(5),
                merchant_id: r.get(6),
                reason: r.get(7),
                voided: r.get(8),
                at: r.get(9),
                resolution: r.get(10),
            })
            .collect())
    }
    async fn resolve_conflict(&mut self, id: i64, note: &str, now: i64) -> Result<(), StoreError> {
        let n = self
            .client
            .execute(super::RESOLVE_CONFLICT, &[&note, &now, &id])
            .await?;
        super::check_resolved(n, id)
    }
    async fn set_limit(
        &mut self,
        merchant_id: &str,
        currency: &str,
        value_per_day: Option<i64>,
    ) -> Result<(), StoreError> {
        match value_per_day {
            Some(v) => {
                self.client
                    .execute(
                        "INSERT INTO merchant_limits (merchant_id, currency, value_per_day) VALUES ($1, $2, $3)
                         ON CONFLICT (merchant_id, currency) DO UPDATE SET value_per_day = excluded.value_per_day",
                        &[&merchant_id, &currency, &v],
                    )
                    .await?
            }
            None => {
                self.client
                    .execute(
                        "DELETE FROM merchant_limits WHERE merchant_id = $1 AND currency = $2",
                        &[&merchant_id, &currency],
                    )
                    .await?
            }
        };
        Ok(())
    }
    async fn limits(&self, day: i64) -> Result<Vec<super::LimitRow>, StoreError> {
        limits(&self.client, day).await
    }
    async fn set_rate_limit(&mut self, merchant_id: &str, sales_per_minute: Option<i64>) -> Result<(), StoreError> {
        let tx = self.client.transaction().await?;
        match sales_per_minute {
            Some(v) => {
                tx.execute(
                    "INSERT INTO merchant_rate_limits (merchant_id, sales_per_minute) VALUES ($1, $2)
                     ON CONFLICT (merchant_id) DO UPDATE SET sales_per_minute = excluded.sales_per_minute",
                    &[&merchant_id, &v],
                )
                .await?;
            }
            None => {
                // Its grants go with it: nothing would ever prune them.
                tx.execute(
                    "DELETE FROM merchant_sales_allowances WHERE merchant_id = $1",
                    &[&merchant_id],
                )
                .await?;
                tx.execute(
                    "DELETE FROM merchant_rate_limits WHERE merchant_id = $1",
                    &[&merchant_id],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
    async fn rate_limits(&self, minute: i64) -> Result<Vec<super::RateRow>, StoreError> {
        rate_limits(&self.client, minute).await
    }
    async fn voided(&self, since: i64, include_unacknowledged: bool) -> Result<Vec<super::VoidedRow>, StoreError> {
        let rows = self
            .client
            .query(super::LIST_VOIDED, &[&since, &include_unacknowledged])
            .await?;
        Ok(rows
            .iter()
            .map(|r| super::VoidedRow {
                pin_id: r.get(0),
                serial: r.get(1),
                product: r.get(2),
                amount: r.get(3),
                currency: r.get(4),
                reversed_at: r.get(5),
                gateway: r.get(6),
                terminal_id: r.get(7),
                merchant_id: r.get(8),
                reason: r.get(9),
            })
            .collect())
    }
}
