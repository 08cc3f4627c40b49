//! The PostgreSQL inventory against the real server at 127.0.0.1:5432 (CI starts it; `PINGATE_TEST_PG` overrides
//! the URL). Each test works in a schema of its own and drops it after.

mod common;
use common::*;

use pingate::crypto::PinCipher;
use pingate::sale::Pin;
use pingate::store::handle::{DbUrl, StoreHandle, StoreOptions};
use pingate::store::postgres::{PgStore, SCHEMA_VERSION};
use pingate::store::{
    Confirmation, NewPin, Op, Outcome, PinState, PinStore, Reversal, SaleContext, SellRequest, StoreError,
};

/// A sale through `gateway` by a terminal of that gateway's own: the scenarios here keep their gateways' sales apart
/// by terminal (a key is one sale whichever gateway it comes through).
fn ctx(gateway: &str, stan: u32) -> SaleContext {
    let mut c = common::ctx(gateway, stan);
    c.terminal_id = format!("TERM-{gateway}");
    c
}

fn url() -> String {
    common::pg_test_url()
}

struct Schema {
    name: String,
    keys: String,
}

impl Schema {
    async fn new(test: &str) -> Schema {
        let name = format!("t{}_{test}", std::process::id());
        let s = Schema {
            name,
            keys: PinCipher::generate_spec().unwrap(),
        };
        let admin = s.admin().await;
        admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", s.name))
            .await
            .unwrap();
        s
    }
    async fn admin(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL must run");
        tokio::spawn(conn);
        c
    }
    async fn open(&self) -> PgStore {
        PgStore::connect(&url(), Some(&self.name), PinCipher::from_spec(&self.keys).unwrap())
            .await
            .unwrap()
    }
    async fn stocked(&self, n: usize) -> PgStore {
        let mut s = self.open().await;
        s.upsert_product(&topup(&[1000, 2000])).await.unwrap();
        s.import(&pins(0, n)).await.unwrap();
        s
    }
    async fn drop_it(self) {
        self.admin()
            .await
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .unwrap();
    }
}

fn pins(from: usize, n: usize) -> Vec<NewPin> {
    (from..from + n)
        .map(|i| NewPin {
            product: "TOPUP".into(),
            amount: 1000,
            pin: Pin::new(format!("77{i:012}")),
            serial: format!("S{i:08}"),
            expiry: None,
            receipt: vec![format!("receipt {i}")],
        })
        .collect()
}

fn sell(gateway: &str, stan: u32) -> SellRequest {
    SellRequest {
        product: "TOPUP".into(),
        amount: 1000,
        sale: ctx(gateway, stan),
        repeat_since: 0,
    }
}

async fn count(s: &PgStore, state: PinState) -> i64 {
    s.stock()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.state == state)
        .map(|r| r.count)
        .sum()
}

#[tokio::test]
async fn transitions_idempotency_and_refusals() {
    let schema = Schema::new("transitions").await;
    let mut s = schema.stocked(6).await;
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    let a = s.sell(&sell("gw1", 1)).await.unwrap();
    assert_eq!(s.sell(&sell("gw1", 1)).await.unwrap(), a, "same key, same PIN");
    let mut other = sell("gw1", 1);
    other.amount = 2000;
    assert!(matches!(
        s.sell(&other).await,
        Err(StoreError::DuplicateMismatch { .. })
    ));
    let mut unknown = sell("gw1", 2);
    unknown.product = "NOPE".into();
    assert!(matches!(s.sell(&unknown).await, Err(StoreError::UnknownProduct(_))));

    let results = s
        .apply_batch(&[
            Op::Reserve {
                holder: "gw1".into(),
                product: "TOPUP".into(),
                amount: 1000,
                count: 3,
                lease_until: 2_000_000_000,
            },
            Op::Reserve {
                holder: "gw1".into(),
                product: "TOPUP".into(),
                amount: 1500,
                count: 1,
                lease_until: 1,
            },
        ])
        .await;
    let Ok(Outcome::Reserved(held)) = &results[0] else {
        panic!("{results:?}")
    };
    assert!(matches!(
        results[1],
        Err(StoreError::UnknownDenomination { amount: 1500, .. })
    ));
    assert_eq!(held.len(), 3);
    let confirm = |holder: &str, id: i64, stan: u32| Op::Confirm {
        holder: holder.into(),
        pin_id: id,
        sale: ctx(holder, stan),
    };
    let r = s
        .apply_batch(&[
            confirm("gw2", held[0].pin_id, 5),
            confirm("gw1", held[0].pin_id, 5),
            confirm("gw1", held[0].pin_id, 5),
        ])
        .await;
    assert!(matches!(r[0], Err(StoreError::NotHolder { .. })));
    assert_eq!(r[1].as_ref().unwrap(), &Outcome::Confirmed(Confirmation::Sold));
    assert_eq!(
        r[2].as_ref().unwrap(),
        &Outcome::Confirmed(Confirmation::AlreadyConfirmed)
    );
    let r = s
        .apply_batch(&[Op::Release {
            holder: "gw1".into(),
            pin_ids: vec![held[1].pin_id, held[0].pin_id],
        }])
        .await;
    assert_eq!(
        r[0].as_ref().unwrap(),
        &Outcome::Released {
            refused: vec![held[0].pin_id]
        }
    );

    assert_eq!(
        s.reverse(&ctx("gw1", 5)).await.unwrap(),
        Reversal::Voided { pin_id: held[0].pin_id }
    );
    assert_eq!(
        s.reverse(&ctx("gw1", 5)).await.unwrap(),
        Reversal::AlreadyVoided { pin_id: held[0].pin_id }
    );
    // Reversal before the sale: remembered, the late sale refused.
    assert_eq!(s.reverse(&ctx("gw1", 9)).await.unwrap(), Reversal::Remembered);
    assert!(matches!(
        s.sell(&sell("gw1", 9)).await,
        Err(StoreError::AlreadyReversed { .. })
    ));
    assert_eq!(count(&s, PinState::Voided).await, 1);

    // One batch: sales are applied together; repeats inside the batch get the same PIN, refusals stay per request.
    let mut twin = sell("gw3", 1);
    twin.amount = 2000;
    let mut unknown = sell("gw3", 2);
    unknown.product = "NOPE".into();
    let r = s
        .apply_batch(&[
            Op::Sell(sell("gw3", 1)),
            Op::Sell(sell("gw3", 1)),
            Op::Sell(twin),
            Op::Sell(unknown),
            Op::Sell(sell("gw1", 1)),
            Op::Reverse {
                sale: ctx("gw3", 3),
                content: None,
                policy: Default::default(),
            },
        ])
        .await;
    let (Ok(Outcome::Sold(x)), Ok(Outcome::Sold(y))) = (&r[0], &r[1]) else {
        panic!("{r:?}")
    };
    assert_eq!(x, y);
    assert!(matches!(r[2], Err(StoreError::DuplicateMismatch { .. })));
    assert!(matches!(r[3], Err(StoreError::UnknownProduct(_))));
    assert_eq!(
        r[4].as_ref().unwrap(),
        &Outcome::Sold(a.clone()),
        "a repeat of an earlier batch's sale"
    );
    assert_eq!(r[5].as_ref().unwrap(), &Outcome::Reversed(Reversal::Remembered));

    // The database itself refuses what code must never do.
    let c = s.client();
    let e = c
        .execute("UPDATE pins SET state = 'available' WHERE id = $1", &[&a.pin_id])
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("illegal PIN state change"), "{e:?}");
    let e = c.execute("DELETE FROM audit", &[]).await.unwrap_err();
    assert!(format!("{e:?}").contains("append-only"));
    let e = c
        .execute(
            "INSERT INTO sales VALUES ('gw9', 'T', '1', '1', $1, 'M', 'R', 'TOPUP', 1000, 0)",
            &[&a.pin_id],
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("sales_pin_id_key"), "{e:?}");
    let trail: Vec<(Option<String>, String)> = c
        .query(
            "SELECT from_state, to_state FROM audit WHERE pin_id = $1 ORDER BY seq",
            &[&held[0].pin_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        trail,
        vec![
            (None, "available".to_string()),
            (Some("available".into()), "reserved".into()),
            (Some("reserved".into()), "sold".into()),
            (Some("sold".into()), "voided".into())
        ]
    );
    // Encrypted at rest.
    let rows = c.query("SELECT ciphertext FROM pins", &[]).await.unwrap();
    for r in rows {
        let ct: Vec<u8> = r.get(0);
        assert!(!ct.windows(6).any(|w| w == b"770000"), "a PIN in clear");
    }
    // Import is all or nothing and names the row.
    let mut batch = pins(100, 3);
    batch[2].serial = "S00000001".into();
    let e = s.import(&batch).await.unwrap_err().to_string();
    assert_eq!(e, "PIN 3: duplicate serial `S00000001`");
    let mut batch = pins(200, 3);
    batch[2].pin = batch[0].pin.clone();
    let e = s.import(&batch).await.unwrap_err().to_string();
    assert_eq!(e, "PIN 3: duplicate PIN value (already loaded, or twice in this file)");
    let mut batch = pins(300, 1_500);
    batch[1_200].pin = pins(4, 1)[0].pin.clone(); // loaded before, in another chunk than the first
    let e = s.import(&batch).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "PIN 1201: duplicate PIN value (already loaded, or twice in this file)"
    );
    let mut batch = pins(300, 2);
    batch[1].amount = 1234;
    assert!(s
        .import(&batch)
        .await
        .unwrap_err()
        .to_string()
        .starts_with("PIN 2: product `TOPUP` has no denomination"));
    assert_eq!(
        count(&s, PinState::Available).await,
        2,
        "failed imports left nothing behind"
    );
    assert_eq!(s.import(&pins(300, 2_500)).await.unwrap(), 2_500);
    assert_eq!(count(&s, PinState::Available).await, 2_502);
    drop(s);
    schema.drop_it().await;
}

/// What the database itself refuses, whatever code runs against it (as on SQLite): every state change no edge
/// allows, from a PIN in each state; a second sale of a sold PIN; any change to the audit trail; deleting a PIN.
#[tokio::test]
async fn the_database_refuses_illegal_changes_even_if_code_is_wrong() {
    let schema = Schema::new("guards").await;
    let mut s = schema.stocked(5).await;
    let mut old = pins(10, 1);
    old[0].expiry = Some("20000101".into());
    s.import(&old).await.unwrap();
    // A PIN in each state.
    let sold = s.sell(&sell("gw1", 1)).await.unwrap().pin_id;
    let voided = s.sell(&sell("gw1", 2)).await.unwrap().pin_id;
    assert_eq!(
        s.reverse(&ctx("gw1", 2)).await.unwrap(),
        Reversal::Voided { pin_id: voided }
    );
    let Outcome::Reserved(r) = s
        .apply(Op::Reserve {
            holder: "gw1".into(),
            product: "TOPUP".into(),
            amount: 1000,
            count: 1,
            lease_until: 2_000_000_000,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let reserved = r[0].pin_id;
    assert_eq!(s.expire("20261128").await.unwrap(), 1);
    let quarantined = 4;
    s.operator_quarantine(quarantined).await.unwrap();
    let c = s.client();
    let state_of = |id: i64| async move {
        let st: String = c
            .query_one("SELECT state FROM pins WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        PinState::parse(&st).unwrap()
    };
    let expired: i64 = c
        .query_one("SELECT id FROM pins WHERE state = 'expired'", &[])
        .await
        .unwrap()
        .get(0);
    let available: i64 = c
        .query_one("SELECT MIN(id) FROM pins WHERE state = 'available'", &[])
        .await
        .unwrap()
        .get(0);
    let (mut refused, mut seen) = (0, Vec::new());
    for id in [available, reserved, sold, voided, expired, quarantined] {
        let from = state_of(id).await;
        seen.push(from);
        for to in PinState::ALL {
            if to == from || from.can_move_to(to) {
                continue;
            }
            let e = c
                .execute("UPDATE pins SET state = $2 WHERE id = $1", &[&id, &to.as_str()])
                .await
                .unwrap_err();
            assert!(
                format!("{e:?}").contains("illegal PIN state change"),
                "{from:?} -> {to:?}: {e:?}"
            );
            assert_eq!(state_of(id).await, from);
            refused += 1;
        }
    }
    assert_eq!(seen, PinState::ALL, "a PIN in each state");
    assert_eq!(refused, 6 * 5 - 9, "every edge but the nine allowed");
    // A second sale row for the same PIN (another key) is impossible.
    let e = c
        .execute(
            "INSERT INTO sales VALUES ('gw9', 'T', '1', '1', $1, 'M', 'R', 'TOPUP', 1000, 0)",
            &[&sold],
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("sales_pin_id_key"), "{e:?}");
    let trail = "SELECT COUNT(*) FROM audit";
    let rows: i64 = c.query_one(trail, &[]).await.unwrap().get(0);
    for sql in [
        "DELETE FROM audit",
        "UPDATE audit SET to_state = 'x'",
        "UPDATE audit SET at = 0 WHERE seq = 1",
    ] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        assert!(format!("{e:?}").contains("audit is append-only"), "{sql}: {e:?}");
    }
    assert_eq!(c.query_one(trail, &[]).await.unwrap().get::<_, i64>(0), rows);
    for sql in ["DELETE FROM pins", "DELETE FROM pins WHERE state = 'available'"] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        assert!(format!("{e:?}").contains("PINs are never deleted"), "{sql}: {e:?}");
    }
    assert_eq!(
        c.query_one("SELECT COUNT(*) FROM pins", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        6
    );
    drop(s);
    schema.drop_it().await;
}

#[tokio::test]
async fn a_version_1_database_is_migrated_and_sells() {
    let schema = Schema::new("migrate").await;
    let mut s = schema.stocked(4).await;
    let a = s.sell(&sell("gw1", 1)).await.unwrap();
    undo_migration_7(&s).await;
    undo_migration_6(&s, &schema.keys, &pins(0, 4)).await;
    // What a database written by the first release looks like: PINs sealed with their serial alone (above), sales
    // under their first key, no batch functions,
    // no expiry index, no `quarantined` state (neither in the CHECK nor in the edges function), version 1.
    s.client()
        .batch_execute(
            "DROP TABLE confirm_conflicts; DROP TABLE redeliveries;
             ALTER TABLE reversals DROP CONSTRAINT reversals_pkey,
                 ADD PRIMARY KEY (gateway, terminal_id, stan, transmission),
                 DROP COLUMN product, DROP COLUMN amount, DROP COLUMN merchant_id;
             UPDATE sales SET transmission = substr(transmission, 5) WHERE length(transmission) = 14;
             ALTER TABLE sales DROP CONSTRAINT sales_pkey, ADD PRIMARY KEY (gateway, terminal_id, stan, transmission);
             DROP FUNCTION pingate_sell_batch; DROP FUNCTION pingate_confirm_batch; DROP INDEX pins_expiring;
             ALTER TABLE pins DROP CONSTRAINT pins_state_check, ADD CONSTRAINT pins_state_check
                 CHECK (state IN ('available', 'reserved', 'sold', 'voided', 'expired'));
             CREATE OR REPLACE FUNCTION pingate_edges() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.state <> OLD.state AND NEW.state = 'quarantined' THEN
                     RAISE EXCEPTION 'illegal PIN state change % -> %', OLD.state, NEW.state;
                 END IF;
                 RETURN NEW;
             END $$;
             UPDATE pingate_schema SET version = 1",
        )
        .await
        .unwrap();
    drop(s);
    let mut s = schema.open().await;
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    // Migration 7 made the trail readable as `audit_trail`: the sold PIN's, as it was written.
    let trail: Vec<(Option<String>, String)> = s
        .client()
        .query(
            "SELECT from_state, to_state FROM audit_trail WHERE pin_id = $1 ORDER BY seq",
            &[&a.pin_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        trail,
        [
            (None, "available".to_string()),
            (Some("available".to_string()), "sold".to_string())
        ]
    );
    // Migration 5 bound the keys to the year they were sold in (the sale is this year's).
    let year = time::OffsetDateTime::now_utc().year();
    let recorded: String = s
        .client()
        .query_one("SELECT transmission FROM sales WHERE pin_id = $1", &[&a.pin_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, format!("{year}{}", common::TRANSMISSION));
    // Migration 4 keyed the sales by (transmission, stan, terminal, gateway).
    let key: Vec<String> = s
        .client()
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
             AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'sales'::regclass AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(key, ["transmission", "stan", "terminal_id", "gateway"]);
    // Migration 3 let available PINs become quarantined (the CHECK and the edges function both take it).
    s.client()
        .batch_execute("UPDATE pins SET state = 'quarantined' WHERE id = 3")
        .await
        .unwrap();
    let mut again = sell("gw1", 1);
    again.sale.transmission = recorded.clone();
    assert_eq!(
        s.sell(&again).await.unwrap(),
        a,
        "sales made before the upgrade are kept"
    );
    let b = s.sell(&sell("gw1", 2)).await.unwrap();
    assert_ne!(a.pin_id, b.pin_id);
    // A body left by another build (here: one that sells nothing) is replaced by this build's at the next start.
    s.client()
        .batch_execute(
            "CREATE OR REPLACE FUNCTION pingate_sell_batch(a_keys text[], a_gw text[], a_term text[], a_stan text[],
                 a_trans text[], a_merchant text[], a_rrn text[], a_product text[], a_amount bigint[], a_now bigint,
                 a_today text)
             RETURNS TABLE (o_i integer, o_kind text, o_id bigint, o_product text, o_amount bigint, o_serial text,
                 o_key_id integer, o_nonce bytea, o_ciphertext bytea, o_expiry text, o_receipt text, o_state text,
                 o_sale_product text, o_sale_amount bigint, o_sale_merchant text)
             LANGUAGE sql AS $$ SELECT NULL::integer, NULL, NULL::bigint, NULL, NULL::bigint, NULL, NULL::integer,
                 NULL::bytea, NULL::bytea, NULL, NULL, NULL, NULL, NULL::bigint, NULL WHERE false $$",
        )
        .await
        .unwrap();
    assert!(matches!(
        s.sell(&sell("gw1", 3)).await,
        Err(StoreError::OutOfStock { .. })
    ));
    drop(s);
    let mut s = schema.open().await;
    assert!(s.sell(&sell("gw1", 3)).await.is_ok(), "this build's function is back");
    // A database from a newer pingate is refused, not written to.
    s.client()
        .batch_execute("UPDATE pingate_schema SET version = 99")
        .await
        .unwrap();
    drop(s);
    let e = PgStore::connect(&url(), Some(&schema.name), PinCipher::from_spec(&schema.keys).unwrap())
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("newer than this pingate"), "{e}");
    schema.drop_it().await;
}

/// A PIN's seal is bound to its row (id, product, amount, serial and key id): a row moved by SQL to another amount
/// or product no longer opens, so a sale that picks it quarantines it instead of selling it as what it is not; the
/// repeat of a sale whose row was moved is refused, not answered with the PIN; moved back, it opens again.
#[tokio::test]
async fn a_row_moved_to_another_product_or_amount_no_longer_opens() {
    let schema = Schema::new("moved").await;
    let mut s = schema.stocked(4).await;
    s.upsert_product(&pingate::store::Product {
        code: "GIFT".into(),
        name: "Gift card".into(),
        supplier: "Shop".into(),
        currency: "978".into(),
        denominations: vec![1000],
    })
    .await
    .unwrap();
    s.client()
        .batch_execute("UPDATE pins SET amount = 2000 WHERE id = 1; UPDATE pins SET product = 'GIFT' WHERE id = 2")
        .await
        .unwrap();
    let mut moved = sell("gw1", 1);
    moved.amount = 2000;
    let r = s.sell(&moved).await;
    assert!(matches!(r, Err(StoreError::OutOfStock { amount: 2000, .. })), "{r:?}");
    let mut moved = sell("gw1", 2);
    moved.product = "GIFT".into();
    let r = s.sell(&moved).await;
    assert!(matches!(r, Err(StoreError::OutOfStock { .. })), "{r:?}");
    assert_eq!(count(&s, PinState::Quarantined).await, 2);
    let a = s.sell(&sell("gw1", 3)).await.unwrap();
    assert_eq!(a.pin_id, 3);
    s.client()
        .batch_execute("UPDATE pins SET amount = 2000 WHERE id = 3")
        .await
        .unwrap();
    let r = s.sell(&sell("gw1", 3)).await;
    assert!(
        matches!(r, Err(StoreError::Db(ref m)) if m.contains("does not decrypt")),
        "{r:?}"
    );
    s.client()
        .batch_execute("UPDATE pins SET amount = 1000 WHERE id = 3")
        .await
        .unwrap();
    assert_eq!(s.sell(&sell("gw1", 3)).await.unwrap(), a);
    drop(s);
    schema.drop_it().await;
}

/// Schema version 6 seals every PIN again, bound to its row instead of its serial alone: a database of version 5
/// opened with its keys is migrated (a sold PIN opens again for its repeat, a damaged row is left as it was), and
/// then a row moved to another amount no longer opens. Opened without keys it stays at version 5; opened with a
/// wrong key, the migration is refused and nothing changes.
#[tokio::test]
async fn a_version_5_database_is_sealed_again_bound_to_its_rows() {
    let schema = Schema::new("reseal").await;
    let mut s = schema.stocked(5).await;
    let a = s.sell(&sell("gw1", 1)).await.unwrap();
    undo_migration_7(&s).await;
    undo_migration_6(&s, &schema.keys, &pins(0, 5)).await;
    s.client()
        .batch_execute("UPDATE pins SET ciphertext = '\\x00'::bytea || substr(ciphertext, 2) WHERE id = 5")
        .await
        .unwrap();
    drop(s);
    let keyless = PgStore::connect(&url(), Some(&schema.name), PinCipher::without_keys())
        .await
        .unwrap();
    assert_eq!(keyless.schema_version().await.unwrap(), 5);
    assert_eq!(count(&keyless, PinState::Available).await, 4);
    drop(keyless);
    let wrong = PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap();
    let e = PgStore::connect(&url(), Some(&schema.name), wrong)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("key 1 opens none of the 5 PINs"), "{e}");
    let mut s = schema.open().await;
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(
        s.sell(&sell("gw1", 1)).await.unwrap(),
        a,
        "a sold PIN opens again for its repeat"
    );
    assert_eq!(s.sell(&sell("gw1", 2)).await.unwrap().pin_id, 2);
    s.client()
        .batch_execute("UPDATE pins SET amount = 2000 WHERE id = 3")
        .await
        .unwrap();
    let mut moved = sell("gw1", 3);
    moved.amount = 2000;
    assert!(matches!(s.sell(&moved).await, Err(StoreError::OutOfStock { .. })));
    assert_eq!(s.sell(&sell("gw1", 4)).await.unwrap().pin_id, 4);
    assert!(matches!(
        s.sell(&sell("gw1", 5)).await,
        Err(StoreError::OutOfStock { .. })
    ));
    assert_eq!(
        count(&s, PinState::Quarantined).await,
        2,
        "the moved row and the damaged one"
    );
    drop(s);
    schema.drop_it().await;
}

/// Undoes what migration 7 changed, as a database of version 6 has it: no `audit_trail` view (the trail is the
/// `audit` table, as `pingate audit` then reads it). Checked: the view was there, reading the table's rows.
async fn undo_migration_7(s: &PgStore) {
    undo_migration_8(s).await;
    let (view, table): (i64, i64) = {
        let r = s
            .client()
            .query_one(
                "SELECT (SELECT COUNT(*) FROM audit_trail), (SELECT COUNT(*) FROM audit)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(view > 0 && view == table, "{view} {table}");
    s.client()
        .batch_execute("DROP VIEW audit_trail; UPDATE pingate_schema SET version = 6")
        .await
        .unwrap();
}

/// Undoes what migration 6 changed, as a database of version 5 has it: each PIN sealed with its serial alone as the
/// associated data (`loaded` are the PINs as imported, in id order).
async fn undo_migration_6(s: &PgStore, keys: &str, loaded: &[NewPin]) {
    let cipher = PinCipher::from_spec(keys).unwrap();
    for (i, p) in loaded.iter().enumerate() {
        let sealed = cipher.seal(&p.pin, &p.serial).unwrap();
        let n = s
            .client()
            .execute(
                "UPDATE pins SET nonce = $1, ciphertext = $2 WHERE id = $3 AND serial = $4",
                &[&&sealed.nonce[..], &sealed.ciphertext, &(i as i64 + 1), &p.serial],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    s.client()
        .batch_execute("UPDATE pingate_schema SET version = 5")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_pin_that_does_not_decrypt_sells_nothing_of_its_batch() {
    let schema = Schema::new("wrongkey").await;
    let s = schema.stocked(3).await;
    drop(s);
    // A server started with the wrong PIN key: the sale cannot be delivered, so nothing of its batch is kept.
    let mut wrong = PgStore::connect(
        &url(),
        Some(&schema.name),
        PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap(),
    )
    .await
    .unwrap();
    let r = wrong
        .apply_batch(&[Op::Sell(sell("gw1", 1)), Op::Sell(sell("gw1", 2))])
        .await;
    assert!(
        r.iter()
            .all(|r| matches!(r, Err(StoreError::Db(m)) if m.contains("does not decrypt"))),
        "{r:?}"
    );
    assert_eq!(count(&wrong, PinState::Sold).await, 0, "rolled back");
    assert_eq!(count(&wrong, PinState::Available).await, 3);
    drop(wrong);
    // With the right key the same sale goes through, and the connection was left clean.
    let mut s = schema.open().await;
    assert!(s.sell(&sell("gw1", 1)).await.is_ok());
    drop(s);
    schema.drop_it().await;
}

#[tokio::test]
async fn many_connections_never_share_a_pin() {
    let schema = Schema::new("concurrent").await;
    drop(schema.stocked(1_500).await);
    // Separate sessions, as several PIN server processes would have.
    let mut tasks = Vec::new();
    for t in 0..6 {
        let store = schema.open().await;
        tasks.push(tokio::spawn(async move {
            let mut store = store;
            let gw = format!("gw{t}");
            let mut got = Vec::new();
            for i in 0..50u32 {
                let ops = vec![
                    Op::Sell(sell(&gw, i * 2)),
                    Op::Sell(sell(&gw, i * 2 + 1)),
                    Op::Reserve {
                        holder: gw.clone(),
                        product: "TOPUP".into(),
                        amount: 1000,
                        count: 3,
                        lease_until: 2_000_000_000,
                    },
                ];
                for r in store.apply_batch(&ops).await {
                    match r.unwrap() {
                        Outcome::Sold(d) => got.push(d.pin_id),
                        Outcome::Reserved(v) => got.extend(v.iter().map(|d| d.pin_id)),
                        o => panic!("{o:?}"),
                    }
                }
                // Every repeat of a sale returns the PIN it got the first time.
                if i % 10 == 0 {
                    let again = store
                        .apply_batch(&[Op::Sell(sell(&gw, i * 2))])
                        .await
                        .pop()
                        .unwrap()
                        .unwrap();
                    let Outcome::Sold(d) = again else { panic!() };
                    assert!(got.contains(&d.pin_id));
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(assert_each_pin_once(all, "by concurrent sessions"), 1_500);
    let s = schema.open().await;
    assert_eq!(count(&s, PinState::Sold).await, 600);
    assert_eq!(count(&s, PinState::Reserved).await, 900);
    drop(s);
    schema.drop_it().await;
}

#[tokio::test]
async fn handle_batches_concurrent_callers_for_both_backends() {
    let schema = Schema::new("handle").await;
    drop(schema.stocked(400).await);
    let pg = DbUrl::Postgres(url());
    let opts = StoreOptions {
        pg_schema: Some(schema.name.clone()),
        pg_connections: 4,
        ..StoreOptions::default()
    };
    let dir = std::env::temp_dir().join(format!("pingate-handle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = DbUrl::parse(&format!("sqlite:{}", dir.join("pins.db").display())).unwrap();
    {
        let mut s = pingate::store::sqlite::SqliteStore::open(
            match &sqlite {
                DbUrl::Sqlite(p) => p,
                _ => unreachable!(),
            },
            PinCipher::from_spec(&schema.keys).unwrap(),
        )
        .unwrap();
        s.upsert_product(&topup(&[1000])).unwrap();
        s.import(&pins(0, 400)).unwrap();
    }
    for url in [pg, sqlite] {
        let h = StoreHandle::open(&url, &schema.keys, &opts).await.unwrap();
        let tasks: Vec<_> = (0..400u32)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move { h.call(Op::Sell(sell("gwh", i))).await })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            match t.await.unwrap().unwrap() {
                Outcome::Sold(d) => ids.push(d.pin_id),
                o => panic!("{o:?}"),
            }
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 400, "{url:?}");
        assert!(matches!(
            h.call(Op::Sell(sell("gwh", 9999))).await,
            Err(StoreError::OutOfStock { .. })
        ));
        h.close().await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
    schema.drop_it().await;
}

/// A key dropped from the keyring while unsold PINs still need it: both backends refuse to open, naming the key and
/// how many PINs it sealed; with the key back (beside a new one) they open; once nothing unsold needs it, it may go.
#[tokio::test]
async fn a_store_missing_a_key_that_unsold_pins_need_is_refused_at_open() {
    let schema = Schema::new("keys").await;
    let old = schema.keys.clone();
    let new = PinCipher::generate_spec().unwrap().replacen("1:", "2:", 1);
    let both = format!("{old},{new}");
    let opts = StoreOptions {
        pg_schema: Some(schema.name.clone()),
        ..StoreOptions::default()
    };
    let dir = std::env::temp_dir().join(format!("pingate-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pins.db");
    {
        let mut s = pingate::store::sqlite::SqliteStore::open(&file, PinCipher::from_spec(&old).unwrap()).unwrap();
        s.upsert_product(&topup(&[1000])).unwrap();
        s.import(&pins(0, 3)).unwrap();
    }
    schema.stocked(3).await;
    for url in [DbUrl::Postgres(url()), DbUrl::Sqlite(file.clone())] {
        match StoreHandle::open(&url, &new, &opts).await {
            Err(e) => assert_eq!(
                e.to_string(),
                "available PINs are sealed under keys that are not loaded (key 1: 3 PINs, ids 1 2 3): add those keys \
                 to the PIN keys, or take a damaged row out of sale with `pingate pins quarantine --id N`",
                "{url:?}"
            ),
            Ok(_) => panic!("{url:?}: opened without the key its PINs need"),
        }
        let h = StoreHandle::open(&url, &both, &opts).await.unwrap();
        for i in 0..3 {
            assert!(
                matches!(h.call(Op::Sell(sell("gwk", i))).await, Ok(Outcome::Sold(_))),
                "{url:?}"
            );
        }
        h.close().await;
        // Every PIN under key 1 is sold: the key is no longer needed to serve.
        StoreHandle::open(&url, &new, &opts).await.unwrap().close().await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
    schema.drop_it().await;
}

/// A damaged row whose key id names a key nobody has keeps the server from starting; the refusal names the row, an
/// operator quarantines it on their word, and the server starts and sells the others. The operator's quarantine
/// takes only an available PIN. Both backends.
#[tokio::test]
async fn a_row_naming_an_unknown_key_is_named_at_open_and_an_operator_quarantine_lets_the_server_start() {
    let schema = Schema::new("unknownkey").await;
    let opts = StoreOptions {
        pg_schema: Some(schema.name.clone()),
        ..StoreOptions::default()
    };
    let dir = std::env::temp_dir().join(format!("pingate-unknownkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pins.db");
    let cipher = || PinCipher::from_spec(&schema.keys).unwrap();
    {
        let mut s = pingate::store::sqlite::SqliteStore::open(&file, cipher()).unwrap();
        s.upsert_product(&topup(&[1000])).unwrap();
        s.import(&pins(0, 4)).unwrap();
        s.connection()
            .execute("UPDATE pins SET key_id = 9 WHERE id = 2", [])
            .unwrap();
    }
    drop(schema.stocked(4).await);
    let admin = schema.admin().await;
    admin
        .execute(&format!("UPDATE {}.pins SET key_id = 9 WHERE id = 2", schema.name), &[])
        .await
        .unwrap();
    for url in [DbUrl::Postgres(url()), DbUrl::Sqlite(file.clone())] {
        match StoreHandle::open(&url, &schema.keys, &opts).await {
            Err(e) => assert!(
                e.to_string().contains("(key 9: 1 PIN, id 2)")
                    && e.to_string().contains("`pingate pins quarantine --id N`"),
                "{url:?}: {e}"
            ),
            Ok(_) => panic!("{url:?}: opened with a PIN no key opens"),
        }
        match &url {
            DbUrl::Sqlite(f) => {
                let mut s = pingate::store::sqlite::SqliteStore::open(f, cipher()).unwrap();
                operator_quarantine_takes_only_available_pins(&mut s).await;
            }
            DbUrl::Postgres(_) => operator_quarantine_takes_only_available_pins(&mut schema.open().await).await,
        }
        // A reserved row whose key id is damaged too does not keep the server down: its gateway holds it opened.
        match &url {
            DbUrl::Sqlite(f) => {
                let c = rusqlite::Connection::open(f).unwrap();
                c.execute("UPDATE pins SET key_id = 9 WHERE id = 1 AND state = 'reserved'", [])
                    .unwrap();
            }
            DbUrl::Postgres(_) => {
                let sql = format!(
                    "UPDATE {}.pins SET key_id = 9 WHERE id = 1 AND state = 'reserved'",
                    schema.name
                );
                assert_eq!(admin.execute(&sql, &[]).await.unwrap(), 1);
            }
        }
        let h = StoreHandle::open(&url, &schema.keys, &opts).await.unwrap();
        for i in 0..2 {
            let r = h.call(Op::Sell(sell("gwq", 100 + i))).await;
            assert!(
                matches!(r, Ok(Outcome::Sold(ref d)) if d.pin_id == 3 + i as i64),
                "{url:?}: {r:?}"
            );
        }
        let r = h.call(Op::Sell(sell("gwq", 102))).await;
        assert!(matches!(r, Err(StoreError::OutOfStock { .. })), "{url:?}: {r:?}");
        h.close().await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
    schema.drop_it().await;
}

/// PIN 2 (available, its key unknown) is quarantined; PIN 1 is reserved first and refused, as are PIN 2 again and
/// an unknown id; the audit records the move.
async fn operator_quarantine_takes_only_available_pins(s: &mut impl PinStore) {
    let reserve = Op::Reserve {
        holder: "gwq".into(),
        product: "TOPUP".into(),
        amount: 1000,
        count: 1,
        lease_until: i64::MAX / 2,
    };
    let r = s.apply(reserve).await;
    assert!(
        matches!(r, Ok(Outcome::Reserved(ref p)) if p.len() == 1 && p[0].pin_id == 1),
        "{r:?}"
    );
    s.operator_quarantine(2).await.unwrap();
    for (id, why) in [
        (1, "PIN 1 is reserved by a gateway: it must be released or sold first"),
        (2, "PIN 2 is quarantined, not available"),
        (99, "no PIN with id 99"),
    ] {
        let r = s.operator_quarantine(id).await;
        assert!(r.as_ref().is_err_and(|e| e.to_string().contains(why)), "{id}: {r:?}");
    }
    let stock = s.stock().await.unwrap();
    let quarantined: i64 = stock
        .iter()
        .filter(|r| r.state == PinState::Quarantined)
        .map(|r| r.count)
        .sum();
    assert_eq!(quarantined, 1);
}

#[tokio::test]
async fn workers_reconnect_after_postgresql_drops_their_connection() {
    let schema = Schema::new("reconnect").await;
    drop(schema.stocked(50).await);
    let opts = StoreOptions {
        pg_schema: Some(schema.name.clone()),
        pg_connections: 1,
        ..StoreOptions::default()
    };
    let h = StoreHandle::open(&DbUrl::Postgres(url()), &schema.keys, &opts)
        .await
        .unwrap();
    assert!(matches!(
        h.call(Op::Sell(sell("gwr", 1))).await.unwrap(),
        Outcome::Sold(_)
    ));
    // PostgreSQL ends the worker's session (as a restart or failover would).
    let admin = schema.admin().await;
    let killed: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1) t",
            &[&format!("pingate/{}", schema.name)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // The first request after the loss may fail (that is how the loss shows); from then on, a new connection
    // serves every request.
    let results: Vec<bool> = {
        let mut v = Vec::new();
        for i in 2..12u32 {
            v.push(matches!(h.call(Op::Sell(sell("gwr", i))).await, Ok(Outcome::Sold(_))));
        }
        v
    };
    let first_ok = results
        .iter()
        .position(|ok| *ok)
        .expect("no sale went through after the reconnect");
    assert!(
        first_ok <= 1,
        "{first_ok} requests failed before the reconnect: {results:?}"
    );
    assert!(
        results[first_ok..].iter().all(|ok| *ok),
        "a request failed after the reconnect: {results:?}"
    );
    h.close().await;
    schema.drop_it().await;
}

/// PostgreSQL over TLS: with `sslmode=verify-full` the store connects with TLS and checks the server's certificate
/// against the CA of `sslrootcert` and the host name it dialled; a certificate another CA signed is refused; a URL
/// that asks for TLS without naming a CA is refused before connecting. Plaintext URLs go on working.
#[tokio::test]
async fn tls_connections_check_the_server_certificate() {
    let ca = enable_server_tls().await;
    let schema = Schema::new("tls").await;
    let with = |url: &str, ca: &std::path::Path| {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}sslmode=verify-full&sslrootcert={}", ca.display())
    };
    let cipher = || PinCipher::from_spec(&schema.keys).unwrap();
    // By address (the certificate names 127.0.0.1) and by name (localhost).
    for (i, url) in [url(), url().replace("127.0.0.1", "localhost")].iter().enumerate() {
        let mut s = PgStore::connect(&with(url, &ca), Some(&schema.name), cipher())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let tls: bool = s
            .client()
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(tls, "{url}: the connection is not encrypted");
        s.upsert_product(&topup(&[1000])).await.unwrap();
        s.import(&pins(10 * i, 2)).await.unwrap();
        assert!(s.sell(&sell("gwtls", i as u32)).await.is_ok());
    }
    // The same server, checked against another CA, or one that takes the name of the real one: refused during
    // the handshake.
    let dir = std::env::temp_dir().join(format!("pingate-pg-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, why) in [("another CA", "UnknownIssuer"), (TEST_CA, "BadSignature")] {
        let other = dir.join("other-ca.pem");
        std::fs::write(&other, test_ca(name).0.pem()).unwrap();
        let e = PgStore::connect(&with(&url(), &other), Some(&schema.name), cipher())
            .await
            .err()
            .expect("a server certificate of another CA is refused");
        assert!(
            e.to_string().contains(&format!("invalid peer certificate: {why}")),
            "{e}"
        );
    }
    // TLS asked for, no CA to check the server with: refused, saying what to give.
    if std::env::var_os("PGSSLROOTCERT").is_none() {
        let sep = if url().contains('?') { '&' } else { '?' };
        let e = PgStore::connect(&format!("{}{sep}sslmode=verify-full", url()), None, cipher())
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("sslrootcert=FILE"), "{e}");
    }
    // Plaintext connections are untouched.
    let s = schema.open().await;
    let tls: bool = s
        .client()
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!tls);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    schema.drop_it().await;
}

/// The name of the CA that signs the test PostgreSQL's certificate.
const TEST_CA: &str = "pingate test PostgreSQL CA";

/// A CA for the tests' TLS, named `name` (rcgen's default validity: it never expires for them).
fn test_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    (p.self_signed(&key).unwrap(), key)
}

/// Gives the test PostgreSQL TLS with a certificate of the tests' own for `localhost` and `127.0.0.1`, and returns
/// the file of the CA that signed it. The files have fixed names in the server's data folder and are made once:
/// other tests and other runs share the server (a lock orders concurrent runs), and plaintext connections go on as
/// before (`ssl = on` still accepts them). Writing into the data folder needs root on the server's machine, as CI
/// has: anything else fails here, saying so, rather than skipping the test.
async fn enable_server_tls() -> std::path::PathBuf {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let (admin, conn) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must run");
    tokio::spawn(conn);
    admin.batch_execute("SELECT pg_advisory_lock(7318432)").await.unwrap();
    let show = |name: &'static str| {
        let admin = &admin;
        async move {
            let r = admin.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
            r.get::<_, String>(0)
        }
    };
    let data = std::path::PathBuf::from(show("data_directory").await);
    let (crt, key, ca) = (
        data.join("pingate-test-tls.crt"),
        data.join("pingate-test-tls.key"),
        data.join("pingate-test-tls-ca.pem"),
    );
    let ours = show("ssl").await == "on"
        && show("ssl_cert_file").await.ends_with("pingate-test-tls.crt")
        && show("ssl_key_file").await.ends_with("pingate-test-tls.key")
        && [&crt, &key, &ca].iter().all(|p| p.exists());
    if !ours {
        let owner = std::fs::metadata(&data).unwrap_or_else(|e| {
            panic!(
                "cannot give the test PostgreSQL a TLS certificate: its data folder {}: {e}. The test writes its \
                 certificate there, and so must run as root on the server's machine, as CI does",
                data.display()
            )
        });
        let (ca_cert, ca_key) = test_ca(TEST_CA);
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = p.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
        for (path, text, mode) in [
            (&key, server_key.serialize_pem(), 0o600),
            (&crt, server.pem(), 0o644),
            (&ca, ca_cert.pem(), 0o644),
        ] {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
                .and_then(|_| std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())));
            if let Err(e) = written {
                panic!(
                    "cannot give the test PostgreSQL a TLS certificate: {}: {e}. The test writes its certificate in \
                     the server's data folder, and so must run as root on the server's machine, as CI does",
                    path.display()
                );
            }
        }
        for sql in [
            "ALTER SYSTEM SET ssl_cert_file = 'pingate-test-tls.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'pingate-test-tls.key'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(sql).await.unwrap();
        }
    }
    // The server reads its configuration again on its own time: wait until a TLS connection checks out.
    let check = format!(
        "{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg_base(),
        ca.display()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match pingate::store::pgtls::connect(&check).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() > deadline => panic!(
                "the test PostgreSQL does not take TLS with the tests' certificate ({e}): see its log for why \
                 (the key file {} must belong to its user, mode 0600)",
                key.display()
            ),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    admin.batch_execute("SELECT pg_advisory_unlock(7318432)").await.unwrap();
    ca
}

/// Undoes migration 9 (merchants' sales per minute), as a database of version 8 has it.
async fn undo_migration_9(s: &PgStore) {
    s.client()
        .batch_execute(
            "DROP TABLE merchant_sales_allowances; DROP TABLE merchant_rate_limits;
             UPDATE pingate_schema SET version = 8",
        )
        .await
        .unwrap();
}

/// Undoes migration 8 (the reversals' reason), as a database of version 7 has it.
async fn undo_migration_8(s: &PgStore) {
    undo_migration_9(s).await;
    s.client()
        .batch_execute(
            "ALTER TABLE reversals DROP COLUMN reason; DROP TABLE merchant_limits; DROP TABLE merchant_allowances;
             UPDATE pingate_schema SET version = 7",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_version_7_database_keeps_its_reversals_and_voided_pins_are_listed_with_their_reason() {
    use pingate::sale::ReversalReason::{self, Terminal, Unacknowledged, Undelivered};
    let schema = Schema::new("voided").await;
    let mut s = schema.stocked(6).await;
    for stan in 1..=5 {
        s.sell(&sell("gw1", stan)).await.unwrap();
    }
    s.reverse(&ctx("gw1", 2)).await.unwrap();
    undo_migration_8(&s).await;
    drop(s);
    let mut s = schema.open().await;
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 9);
    s.client()
        .batch_execute("UPDATE sales SET sold_at = sold_at - 3600 WHERE stan = '000001'")
        .await
        .unwrap();
    let rev = |stan: u32, reason: ReversalReason| Op::Reverse {
        sale: ctx("gw1", stan),
        content: None,
        policy: pingate::store::ReversePolicy {
            reason,
            // Asked for a minute ago, forwarded late: judged by when it was asked.
            requested_at: Some(pingate::clock::unix_now() - 60),
            window_secs: Some(600),
        },
    };
    let late = s.apply(rev(1, Terminal)).await.unwrap_err();
    assert!(matches!(late, StoreError::ReversalTooLate { .. }), "{late:?}");
    s.apply(rev(3, Unacknowledged)).await.unwrap();
    s.apply(rev(4, Undelivered)).await.unwrap();
    s.apply(rev(5, Terminal)).await.unwrap();
    assert_eq!(count(&s, PinState::Sold).await, 1);
    let list = s.voided(0, false).await.unwrap();
    assert_eq!(
        list.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>(),
        ["terminal", "undelivered", "terminal"],
        "{list:?}"
    );
    assert!(list
        .iter()
        .all(|r| r.product == "TOPUP" && r.amount == 1000 && r.currency == "978" && r.gateway == "gw1"));
    let all = s.voided(0, true).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all.iter().filter(|r| r.reason == "unacknowledged").count(), 1);
    assert!(s.voided(i64::MAX / 2, true).await.unwrap().is_empty());
    drop(s);
    schema.drop_it().await;
}

/// A merchant's limit on a database shared by several servers: allowances asked at once through two connections
/// (two servers) never add up past it, and `limits` shows what was granted.
#[tokio::test]
async fn allowances_from_several_servers_never_pass_a_merchants_limit() {
    let schema = Schema::new("allowances").await;
    let mut a = schema.open().await;
    let b = schema.open().await;
    a.set_limit("M1", "978", Some(10_000)).await.unwrap();
    let ask = |want: i64| Op::Allowance {
        merchant_id: "M1".into(),
        currency: "978".into(),
        want,
    };
    // Without a limit in a currency: all of it, nothing recorded.
    let free = a
        .apply(Op::Allowance {
            merchant_id: "M1".into(),
            currency: "840".into(),
            want: 5_000,
        })
        .await
        .unwrap();
    assert_eq!(
        free,
        Outcome::Allowance {
            granted: 5_000,
            limited: false
        }
    );
    let mut tasks = Vec::new();
    for store in [a, b] {
        let store = std::sync::Arc::new(tokio::sync::Mutex::new(store));
        for _ in 0..8 {
            let store = store.clone();
            let op = ask(1_500);
            tasks.push(tokio::spawn(async move { store.lock().await.apply(op).await.unwrap() }));
        }
    }
    let mut total = 0;
    for t in tasks {
        let Outcome::Allowance { granted, limited } = t.await.unwrap() else {
            panic!("an allowance")
        };
        assert!(limited);
        total += granted;
    }
    assert_eq!(total, 10_000, "the whole limit, never more");
    let s = schema.open().await;
    let rows = s.limits(pingate::clock::unix_now().div_euclid(86_400)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].value_per_day, rows[0].granted_today), (10_000, 10_000));
    drop(s);
    schema.drop_it().await;
}

/// A database of version 8 gets migration 9 (opened without the PIN keys, as `pingate limits` opens it, too); then
/// sales allowances asked at once through two connections (two servers) never add up past a merchant's sales per
/// minute, all of it is granted again the next minute, and the rows of minutes gone are pruned.
#[tokio::test]
async fn a_version_8_database_is_migrated_and_sales_per_minute_hold_across_servers() {
    let schema = Schema::new("rates").await;
    let mut s = schema.open().await;
    s.set_limit("M1", "978", Some(500)).await.unwrap();
    undo_migration_9(&s).await;
    drop(s);
    let mut keyless = PgStore::connect(&url(), Some(&schema.name), PinCipher::without_keys())
        .await
        .unwrap();
    assert_eq!(keyless.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 9);
    keyless.set_rate_limit("M1", Some(10)).await.unwrap();
    assert_eq!(
        keyless.limits(0).await.unwrap().len(),
        1,
        "the value limit of version 8 kept"
    );
    drop(keyless);
    let (a, b) = (schema.open().await, schema.open().await);
    let minute = pingate::clock::unix_now().div_euclid(60);
    let ask = |minute: i64, want: i64| Op::SalesAllowance {
        merchant_id: "M1".into(),
        minute,
        want,
    };
    let a = std::sync::Arc::new(tokio::sync::Mutex::new(a));
    let b = std::sync::Arc::new(tokio::sync::Mutex::new(b));
    // 16 asks of 3 at once, in two minutes in turn: each minute's grants come to its 10, never more.
    let mut tasks = Vec::new();
    for (i, store) in [&a, &b, &a, &b].into_iter().cycle().take(16).enumerate() {
        let store = store.clone();
        let op = ask(minute + (i as i64 % 2), 3);
        tasks.push(tokio::spawn(async move {
            (i % 2, store.lock().await.apply(op).await.unwrap())
        }));
    }
    let mut total = [0, 0];
    for t in tasks {
        let (m, Outcome::Allowance { granted, limited }) = t.await.unwrap() else {
            panic!("an allowance")
        };
        assert!(limited);
        total[m] += granted;
    }
    assert_eq!(total, [10, 10], "each minute's whole limit, never more");
    let mut a = std::sync::Arc::try_unwrap(a).ok().unwrap().into_inner();
    let rows = a.rate_limits(minute + 1).await.unwrap();
    assert_eq!((rows[0].sales_per_minute, rows[0].granted_this_minute), (10, 10));
    // Two minutes on: all of it again, and the first minute's row pruned (the last minute's is kept for a server
    // whose clock is a little behind).
    assert_eq!(
        a.apply(ask(minute + 2, 4)).await.unwrap(),
        Outcome::Allowance {
            granted: 4,
            limited: true
        }
    );
    let rows: Vec<(i64, i64)> = a
        .client()
        .query(
            "SELECT minute, granted FROM merchant_sales_allowances ORDER BY minute",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(minute + 1, 10), (minute + 2, 4)]);
    // Removed: no limit, the grants gone with it.
    a.set_rate_limit("M1", None).await.unwrap();
    assert!(a.rate_limits(minute + 2).await.unwrap().is_empty());
    assert_eq!(
        a.apply(ask(minute + 2, 4)).await.unwrap(),
        Outcome::Allowance {
            granted: 4,
            limited: false
        }
    );
    drop(a);
    drop(b);
    schema.drop_it().await;
}

/// Run by [`a_private_cluster_serves_when_no_server_answers`], in a process of its own told not to use the local
/// server: the store tests' PostgreSQL is then a cluster that process starts.
#[tokio::test]
#[ignore = "run by a_private_cluster_serves_when_no_server_answers in a process of its own"]
async fn private_cluster_probe() {
    assert!(std::env::var_os("PINGATE_TEST_PG_PRIVATE").is_some());
    let url = url();
    assert!(!url.contains(":5432/"), "{url}");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let keys = PinCipher::generate_spec().unwrap();
    PgStore::connect(&url, Some("probe"), PinCipher::from_spec(&keys).unwrap())
        .await
        .unwrap();
    println!("probe pid {}", std::process::id());
}

/// On a machine with the PostgreSQL package but no server at the test URL, the tests start a throwaway cluster of
/// their own (and it is gone with the process that started it).
#[test]
fn a_private_cluster_serves_when_no_server_answers() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["private_cluster_probe", "--exact", "--ignored", "--nocapture"])
        .env("PINGATE_TEST_PG_PRIVATE", "1")
        .env_remove("PINGATE_TEST_PG")
        .env_remove("PINGATE_TEST_PG_SERVER")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
    let pid: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("probe pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    let dir = std::env::temp_dir().join(format!("pingate-test-pg-{pid}"));
    let mut gone = false;
    for _ in 0..100 {
        if !dir.exists() {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(gone, "the private cluster outlived its test process: {}", dir.display());
}
