//! The SQLite inventory on a real database file: every state transition and refusal, idempotency, reversals before
//! sales, what the database itself refuses, encryption at rest, all-or-nothing import, and concurrent writers.

mod common;
use common::*;

use std::path::PathBuf;

use pingate::crypto::PinCipher;
use pingate::sale::Pin;
use pingate::store::sqlite::{SqliteStore, SCHEMA_VERSION};
use pingate::store::{Confirmation, NewPin, PinState, Reversal, SellRequest, StoreError};

struct TempDb {
    dir: PathBuf,
    keys: String,
}

impl TempDb {
    fn new(name: &str) -> TempDb {
        let dir = std::env::temp_dir().join(format!("pingate-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDb {
            dir,
            keys: PinCipher::generate_spec().unwrap(),
        }
    }
    fn path(&self) -> PathBuf {
        self.dir.join("pins.db")
    }
    fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.path(), PinCipher::from_spec(&self.keys).unwrap()).unwrap()
    }
    /// A store with product TOPUP in 1000 and 2000, and `n` PINs of 1000.
    fn stocked(&self, n: usize) -> SqliteStore {
        let mut s = self.open();
        s.upsert_product(&topup(&[1000, 2000])).unwrap();
        s.import(&pins(0, n, 1000)).unwrap();
        s
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pins(from: usize, n: usize, amount: i64) -> Vec<NewPin> {
    (from..from + n)
        .map(|i| NewPin {
            product: "TOPUP".into(),
            amount,
            pin: Pin::new(format!("9{amount:05}{i:010}")),
            serial: format!("S{amount}-{i:08}"),
            expiry: None,
            receipt: vec![format!("receipt {i}")],
        })
        .collect()
}

fn sell(stan: u32) -> SellRequest {
    SellRequest {
        product: "TOPUP".into(),
        amount: 1000,
        sale: ctx("gw1", stan),
        repeat_since: 0,
    }
}

fn count(s: &SqliteStore, state: PinState) -> i64 {
    s.stock()
        .unwrap()
        .iter()
        .filter(|r| r.state == state)
        .map(|r| r.count)
        .sum()
}

#[test]
fn on_demand_sale_is_idempotent_and_checks_content() {
    let db = TempDb::new("sell");
    let mut s = db.stocked(3);
    let a = s.sell(&sell(1)).unwrap();
    assert_eq!(a.receipt, vec!["receipt 0".to_string()]);
    assert!(a.pin.expose().starts_with("901000"));
    // The same key again: the same PIN, no second PIN taken.
    assert_eq!(s.sell(&sell(1)).unwrap(), a);
    assert_eq!(count(&s, PinState::Sold), 1);
    // Same key, different content.
    let mut other = sell(1);
    other.amount = 2000;
    assert!(matches!(s.sell(&other), Err(StoreError::DuplicateMismatch { .. })));
    let b = s.sell(&sell(2)).unwrap();
    assert_ne!(a.pin_id, b.pin_id);
    let mut unknown = sell(3);
    unknown.product = "NOPE".into();
    assert!(matches!(s.sell(&unknown), Err(StoreError::UnknownProduct(p)) if p == "NOPE"));
    let mut odd = sell(3);
    odd.amount = 1500;
    assert!(matches!(
        s.sell(&odd),
        Err(StoreError::UnknownDenomination { amount: 1500, .. })
    ));
    s.sell(&sell(3)).unwrap();
    assert!(matches!(
        s.sell(&sell(4)),
        Err(StoreError::OutOfStock { amount: 1000, .. })
    ));
    let mut none = sell(5);
    none.amount = 2000;
    assert!(matches!(
        s.sell(&none),
        Err(StoreError::OutOfStock { amount: 2000, .. })
    ));
}

#[test]
fn cache_path_reserve_confirm_release_and_audit_trail() {
    let db = TempDb::new("cache");
    let mut s = db.stocked(10);
    let held = s.reserve("gw1", "TOPUP", 1000, 4, 2_000_000_000).unwrap();
    assert_eq!(held.len(), 4);
    assert_eq!(count(&s, PinState::Reserved), 4);
    // Another gateway cannot confirm or release them.
    assert!(matches!(
        s.confirm("gw2", held[0].pin_id, &ctx("gw2", 1)),
        Err(StoreError::NotHolder { .. })
    ));
    assert_eq!(s.release("gw2", &[held[1].pin_id]).unwrap(), vec![held[1].pin_id]);
    // Confirm, and again (idempotent); the same key on another PIN is a conflict: that PIN was handed out with no
    // sale to record, so it is voided and the conflict kept for the operator (a repeat of it changes nothing).
    assert_eq!(
        s.confirm("gw1", held[0].pin_id, &ctx("gw1", 1)).unwrap(),
        Confirmation::Sold
    );
    assert_eq!(
        s.confirm("gw1", held[0].pin_id, &ctx("gw1", 1)).unwrap(),
        Confirmation::AlreadyConfirmed
    );
    for _ in 0..2 {
        assert_eq!(
            s.confirm("gw1", held[1].pin_id, &ctx("gw1", 1)).unwrap(),
            Confirmation::Conflict { voided: true }
        );
    }
    let conflicts: i64 = s
        .connection()
        .query_row(
            "SELECT COUNT(*) FROM confirm_conflicts WHERE pin_id = ?1",
            [held[1].pin_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(conflicts, 1);
    // Release the rest; a voided or released PIN can no longer be confirmed.
    assert_eq!(
        s.release("gw1", &[held[1].pin_id, held[2].pin_id, held[0].pin_id])
            .unwrap(),
        vec![held[1].pin_id, held[0].pin_id]
    );
    assert!(matches!(
        s.confirm("gw1", held[1].pin_id, &ctx("gw1", 2)),
        Err(StoreError::NotHolder { .. })
    ));
    assert_eq!(
        s.renew("gw1", &[held[3].pin_id, held[0].pin_id], 2_100_000_000)
            .unwrap(),
        1
    );
    // Reverse the confirmed sale: voided, never sold again.
    assert_eq!(
        s.reverse(&ctx("gw1", 1)).unwrap(),
        Reversal::Voided { pin_id: held[0].pin_id }
    );
    assert_eq!(
        s.reverse(&ctx("gw1", 1)).unwrap(),
        Reversal::AlreadyVoided { pin_id: held[0].pin_id }
    );
    let trail = s.audit_of(held[0].pin_id).unwrap();
    let states: Vec<(Option<&str>, &str)> = trail.iter().map(|(f, t, _)| (f.as_deref(), t.as_str())).collect();
    assert_eq!(
        states,
        vec![
            (None, "available"),
            (Some("available"), "reserved"),
            (Some("reserved"), "sold"),
            (Some("sold"), "voided")
        ]
    );
    assert_eq!(trail[1].2.as_deref(), Some("gw1"));
    // Everything sells out without ever handing out the voided PIN.
    let mut sold = Vec::new();
    for stan in 100..200 {
        match s.sell(&sell(stan)) {
            Ok(d) => sold.push(d.pin_id),
            Err(StoreError::OutOfStock { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        sold.len(),
        7,
        "10 PINs, 2 voided (a reversal, a conflict), 1 still reserved"
    );
    for never in [0, 1, 3] {
        assert!(!sold.contains(&held[never].pin_id));
    }
}

#[test]
fn reversal_before_sale_is_remembered_and_the_late_sale_refused() {
    let db = TempDb::new("early-reversal");
    let mut s = db.stocked(3);
    assert_eq!(s.reverse(&ctx("gw1", 7)).unwrap(), Reversal::Remembered);
    assert_eq!(s.reverse(&ctx("gw1", 7)).unwrap(), Reversal::Remembered);
    assert!(matches!(s.sell(&sell(7)), Err(StoreError::AlreadyReversed { .. })));
    assert_eq!(
        count(&s, PinState::Available),
        3,
        "no PIN was taken for the refused sale"
    );
    // A cached PIN confirmed after its reversal: sold and voided at once.
    let held = s.reserve("gw1", "TOPUP", 1000, 1, 2_000_000_000).unwrap();
    assert_eq!(s.reverse(&ctx("gw1", 8)).unwrap(), Reversal::Remembered);
    assert_eq!(
        s.confirm("gw1", held[0].pin_id, &ctx("gw1", 8)).unwrap(),
        Confirmation::Voided
    );
    assert_eq!(count(&s, PinState::Voided), 1);
}

#[test]
fn expired_leases_are_reported_not_freed_until_the_operator_returns_them() {
    let db = TempDb::new("leases");
    let mut s = db.stocked(5);
    s.reserve("gw1", "TOPUP", 1000, 2, 1_000).unwrap();
    s.reserve("gw2", "TOPUP", 1000, 1, 5_000).unwrap();
    assert_eq!(s.expired_leases(2_000).unwrap(), vec![("gw1".to_string(), 2)]);
    assert_eq!(
        count(&s, PinState::Reserved),
        3,
        "an expired lease frees nothing by itself"
    );
    assert_eq!(s.return_expired("gw1", 2_000).unwrap(), 2);
    assert_eq!(count(&s, PinState::Reserved), 1);
    assert_eq!(count(&s, PinState::Available), 4);
}

#[test]
fn expiry_dates() {
    let db = TempDb::new("expiry");
    let mut s = db.stocked(0);
    let mut p = pins(0, 2, 1000);
    p[0].expiry = Some("20000101".into());
    p[1].expiry = Some("99991231".into());
    s.import(&p).unwrap();
    // The expired PIN is never sold, even before `expire` runs.
    let d = s.sell(&sell(1)).unwrap();
    assert_eq!(d.expiry.as_deref(), Some("99991231"));
    assert_eq!(s.expire("20261128").unwrap(), 1);
    assert_eq!(count(&s, PinState::Expired), 1);
}

#[test]
fn the_database_refuses_illegal_changes_even_if_code_is_wrong() {
    let db = TempDb::new("guards");
    let mut s = db.stocked(2);
    let d = s.sell(&sell(1)).unwrap();
    let c = s.connection();
    let err = c
        .execute("UPDATE pins SET state = 'available' WHERE id = ?1", [d.pin_id])
        .unwrap_err();
    assert!(err.to_string().contains("illegal PIN state change"), "{err}");
    let err = c
        .execute("UPDATE pins SET state = 'reserved' WHERE id = ?1", [d.pin_id])
        .unwrap_err();
    assert!(err.to_string().contains("illegal PIN state change"));
    // A second sale row for the same PIN (another key) is impossible.
    let err = c
        .execute(
            "INSERT INTO sales (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product, amount, sold_at)
             VALUES ('gw9', 'T', '1', '1', ?1, 'M', 'R', 'TOPUP', 1000, 0)",
            [d.pin_id],
        )
        .unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
    assert!(c
        .execute("DELETE FROM audit", [])
        .unwrap_err()
        .to_string()
        .contains("append-only"));
    assert!(c
        .execute("UPDATE audit SET to_state = 'x'", [])
        .unwrap_err()
        .to_string()
        .contains("append-only"));
    assert!(c
        .execute("DELETE FROM pins", [])
        .unwrap_err()
        .to_string()
        .contains("never deleted"));
    // A move cannot name an audit record that does not record it (to keep its own record from being written):
    // an unknown one, one of another move, or one with no move at all.
    let available: i64 = c
        .query_row("SELECT id FROM pins WHERE state = 'available'", [], |r| r.get(0))
        .unwrap();
    let newest: i64 = c.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)).unwrap();
    c.execute(
        "INSERT INTO audit (from_state, to_state, holder, at, pins) VALUES ('available', 'sold', NULL, 0, '[]')",
        [],
    )
    .unwrap();
    for (state, seq) in [
        ("expired", newest + 100),
        ("expired", newest + 1),
        ("available", newest + 1),
    ] {
        let err = c
            .execute(
                "UPDATE pins SET state = ?1, audit_seq = ?2 WHERE id = ?3",
                rusqlite::params![state, seq, available],
            )
            .expect_err(&format!("{state} under record {seq}"));
        assert!(
            err.to_string().contains("does not record the move"),
            "{state} {seq}: {err}"
        );
    }
    let err = c
        .execute(
            "INSERT INTO pins (product, amount, serial, fingerprint, key_id, nonce, ciphertext, receipt, state, audit_seq)
             VALUES ('TOPUP', 1000, 'X', X'00', 1, X'00', X'00', '[]', 'available', ?1)",
            [newest + 1],
        )
        .unwrap_err();
    assert!(err.to_string().contains("does not record the load"), "{err}");
    // Named right (the newest record, of this move), it is allowed, and no second record is written.
    c.execute(
        "UPDATE pins SET state = 'sold', audit_seq = ?1 WHERE id = ?2",
        rusqlite::params![newest + 1, available],
    )
    .unwrap();
    let records: i64 = c
        .query_row("SELECT COUNT(*) FROM audit WHERE seq > ?1", [newest], |r| r.get(0))
        .unwrap();
    assert_eq!(records, 1);
}

#[test]
fn pins_are_encrypted_at_rest() {
    let db = TempDb::new("at-rest");
    let s = db.stocked(20);
    drop(s);
    let mut raw = std::fs::read(db.path()).unwrap();
    if let Ok(wal) = std::fs::read(db.dir.join("pins.db-wal")) {
        raw.extend(wal);
    }
    for p in pins(0, 20, 1000) {
        let v = p.pin.expose().as_bytes();
        assert!(
            !raw.windows(v.len()).any(|w| w == v),
            "a PIN value is in the database file in clear"
        );
    }
    // Serial numbers are not secret and are stored as they are (sanity check of the scan above).
    assert!(raw.windows(11).any(|w| w == b"S1000-00000"));
    // Without the key, nothing opens.
    let mut other = SqliteStore::open(
        &db.path(),
        PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap(),
    )
    .unwrap();
    // (and nothing is quarantined: no row of that key opens, so the key is what is wrong, not the rows).
    let r = other.sell(&sell(1));
    assert!(matches!(r, Err(StoreError::Unreadable { pin_id: 1, .. })), "{r:?}");
    assert_eq!(count(&other, PinState::Quarantined), 0);
}

/// A PIN's seal is bound to its row (id, product, amount, serial and key id): a row moved by SQL to another amount
/// or product no longer opens, so a sale that picks it quarantines it instead of selling it as what it is not; the
/// repeat of a sale whose row was moved is refused, not answered with the PIN; moved back, it opens again.
#[test]
fn a_row_moved_to_another_product_or_amount_no_longer_opens() {
    let db = TempDb::new("moved");
    let mut s = db.stocked(4);
    s.upsert_product(&gift()).unwrap();
    s.connection()
        .execute_batch("UPDATE pins SET amount = 2000 WHERE id = 1; UPDATE pins SET product = 'GIFT' WHERE id = 2;")
        .unwrap();
    let mut moved = sell(1);
    moved.amount = 2000;
    let r = s.sell(&moved);
    assert!(matches!(r, Err(StoreError::OutOfStock { amount: 2000, .. })), "{r:?}");
    let mut moved = sell(2);
    moved.product = "GIFT".into();
    let r = s.sell(&moved);
    assert!(matches!(r, Err(StoreError::OutOfStock { .. })), "{r:?}");
    assert_eq!(count(&s, PinState::Quarantined), 2);
    let a = s.sell(&sell(3)).unwrap();
    assert_eq!(a.pin_id, 3);
    s.connection()
        .execute("UPDATE pins SET amount = 2000 WHERE id = 3", [])
        .unwrap();
    let r = s.sell(&sell(3));
    assert!(matches!(r, Err(StoreError::Unreadable { pin_id: 3, .. })), "{r:?}");
    s.connection()
        .execute("UPDATE pins SET amount = 1000 WHERE id = 3", [])
        .unwrap();
    assert_eq!(s.sell(&sell(3)).unwrap(), a);
    // Another row's seal copied onto a row does not open either (here: row 4 given row 3's).
    s.connection()
        .execute_batch(
            "UPDATE pins SET (key_id, nonce, ciphertext) = (SELECT key_id, nonce, ciphertext FROM pins WHERE id = 3)
             WHERE id = 4",
        )
        .unwrap();
    let r = s.sell(&sell(4));
    assert!(matches!(r, Err(StoreError::OutOfStock { .. })), "{r:?}");
    assert_eq!(count(&s, PinState::Quarantined), 3);
}

/// Schema version 6 seals every PIN again, bound to its row instead of its serial alone. A file of version 5 opened
/// with its keys is migrated: each row that opens is sealed again under its own key id, sold ones included (a repeat
/// hands its PIN out again), and a damaged row is left as it was (quarantined when picked, as before); then a row
/// moved to another amount no longer opens. Opened without keys (the operator commands that never open a PIN), the
/// file stays at version 5 and works; opened with a wrong key, the migration is refused and nothing changes.
#[test]
fn a_version_5_file_is_sealed_again_bound_to_its_rows() {
    let db = TempDb::new("reseal");
    let mut s = db.stocked(5);
    let a = s.sell(&sell(1)).unwrap();
    undo_migration_7(s.connection());
    undo_migration_6(s.connection(), &db.keys, &pins(0, 5, 1000));
    // Row 5 is damaged (one byte of its seal changed).
    s.connection()
        .execute(
            "UPDATE pins SET ciphertext = CAST(X'00' || substr(ciphertext, 2) AS BLOB) WHERE id = 5",
            [],
        )
        .unwrap();
    drop(s);
    let version = || -> i64 {
        rusqlite::Connection::open(db.path())
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };
    let keyless = SqliteStore::open(&db.path(), PinCipher::without_keys()).unwrap();
    assert_eq!(keyless.schema_version().unwrap(), 5);
    assert_eq!(count(&keyless, PinState::Available), 4);
    drop(keyless);
    let wrong = PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap();
    let e = SqliteStore::open(&db.path(), wrong).err().expect("refused");
    assert!(e.to_string().contains("key 1 opens none of the 5 PINs"), "{e}");
    assert_eq!(version(), 5, "nothing changed");
    let mut s = db.open();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.sell(&sell(1)).unwrap(), a, "a sold PIN opens again for its repeat");
    assert_eq!(s.sell(&sell(2)).unwrap().pin_id, 2);
    let keys: Vec<i64> = s
        .connection()
        .prepare("SELECT DISTINCT key_id FROM pins")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(keys, [1]);
    s.connection()
        .execute("UPDATE pins SET amount = 2000 WHERE id = 3", [])
        .unwrap();
    let mut moved = sell(3);
    moved.amount = 2000;
    assert!(matches!(s.sell(&moved), Err(StoreError::OutOfStock { .. })));
    assert_eq!(s.sell(&sell(4)).unwrap().pin_id, 4);
    assert!(matches!(s.sell(&sell(5)), Err(StoreError::OutOfStock { .. })));
    assert_eq!(count(&s, PinState::Quarantined), 2, "the moved row and the damaged one");
}

fn gift() -> pingate::store::Product {
    pingate::store::Product {
        code: "GIFT".into(),
        name: "Gift card".into(),
        supplier: "Shop".into(),
        currency: "978".into(),
        denominations: vec![1000],
    }
}

/// Undoes what migration 6 changed, as a file of version 5 has it: each PIN sealed with its serial alone as the
/// associated data (`loaded` are the PINs as imported, in id order).
fn undo_migration_6(c: &rusqlite::Connection, keys: &str, loaded: &[NewPin]) {
    let cipher = PinCipher::from_spec(keys).unwrap();
    for (i, p) in loaded.iter().enumerate() {
        let sealed = cipher.seal(&p.pin, &p.serial).unwrap();
        let n = c
            .execute(
                "UPDATE pins SET nonce = ?1, ciphertext = ?2 WHERE id = ?3 AND serial = ?4",
                rusqlite::params![&sealed.nonce[..], sealed.ciphertext, i as i64 + 1, p.serial],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    c.execute_batch("PRAGMA user_version = 5").unwrap();
}

#[test]
fn import_is_all_or_nothing_and_names_the_row() {
    let db = TempDb::new("import");
    let mut s = db.stocked(5);
    let mut batch = pins(100, 5, 1000);
    batch[3].serial = "S1000-00000002".into(); // already loaded
    let e = s.import(&batch).unwrap_err().to_string();
    assert_eq!(e, "PIN 4: duplicate serial `S1000-00000002`");
    let mut batch = pins(100, 5, 1000);
    batch[4].pin = batch[1].pin.clone();
    assert_eq!(
        s.import(&batch).unwrap_err().to_string(),
        "PIN 5: duplicate PIN value (already loaded, or twice in this file)"
    );
    let mut batch = pins(100, 2, 1000);
    batch[1].amount = 1234;
    assert!(s
        .import(&batch)
        .unwrap_err()
        .to_string()
        .starts_with("PIN 2: product `TOPUP` has no"));
    assert_eq!(count(&s, PinState::Available), 5, "failed imports left nothing behind");
    assert_eq!(s.import(&pins(100, 5, 1000)).unwrap(), 5);
    assert_eq!(count(&s, PinState::Available), 10);
}

#[test]
fn a_batch_shares_one_transaction_and_failures_stay_per_request() {
    let db = TempDb::new("batch");
    let mut s = db.stocked(60);
    let mut reqs: Vec<SellRequest> = (1..=50).map(sell).collect();
    reqs[10].product = "NOPE".into();
    let results = s.sell_batch(&reqs);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 49);
    assert!(matches!(results[10], Err(StoreError::UnknownProduct(_))));
    let ids: std::collections::HashSet<i64> = results.iter().flatten().map(|d| d.pin_id).collect();
    assert_eq!(ids.len(), 49);
}

#[test]
fn concurrent_writers_on_one_file_never_share_a_pin_and_survive_reopen() {
    let db = TempDb::new("concurrent");
    drop(db.stocked(1_200));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = db.path();
            let keys = db.keys.clone();
            std::thread::spawn(move || {
                let mut s = SqliteStore::open(&path, PinCipher::from_spec(&keys).unwrap()).unwrap();
                let mut got = Vec::new();
                for i in 0..100u32 {
                    let mut req = sell(i);
                    req.sale.gateway = format!("gw{t}");
                    // Each writer its own terminal: a key is one sale whichever gateway it comes through.
                    req.sale.terminal_id = format!("TERM000{t}");
                    got.push(s.sell(&req).unwrap().pin_id);
                    got.extend(
                        s.reserve(&format!("gw{t}"), "TOPUP", 1000, 2, 2_000_000_000)
                            .unwrap()
                            .iter()
                            .map(|d| d.pin_id),
                    );
                }
                got
            })
        })
        .collect();
    let mut all: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a PIN was handed out twice");
    assert_eq!(n, 1_200);
    // Reopen: every acknowledged sale is there.
    let s = db.open();
    assert_eq!(count(&s, PinState::Sold), 400);
    assert_eq!(count(&s, PinState::Reserved), 800);
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn a_version_1_file_is_migrated_and_a_newer_one_refused() {
    let db = TempDb::new("migrate");
    let mut s = db.stocked(2);
    let a = s.sell(&sell(1)).unwrap();
    // What a file written by the first release looks like: PINs sealed with their serial alone, sales under their
    // first key, no expiry index, no `quarantined` state, a row of audit trail per PIN and change, version 1.
    undo_migration_7(s.connection());
    undo_migration_6(s.connection(), &db.keys, &pins(0, 2, 1000));
    undo_migration_5(s.connection());
    undo_migration_4(s.connection());
    undo_migration_3(s.connection());
    s.connection()
        .execute_batch("DROP INDEX pins_expiring; PRAGMA user_version = 1;")
        .unwrap();
    drop(s);
    let mut s = db.open();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    // Migration 5 bound the keys to the year they were sold in (the sale is this year's).
    let year = time::OffsetDateTime::now_utc().year();
    let recorded: String = s
        .connection()
        .query_row("SELECT transmission FROM sales WHERE pin_id = ?1", [a.pin_id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(recorded, format!("{year}{}", common::TRANSMISSION));
    // Migration 3 let available PINs become quarantined (the CHECK and the edges trigger both take it).
    s.connection()
        .execute_batch("UPDATE pins SET state = 'quarantined' WHERE id = 2")
        .unwrap();
    let indexes: i64 = s
        .connection()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'pins_expiring'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 1);
    assert_eq!(
        sales_key(s.connection()),
        ["transmission", "stan", "terminal_id", "gateway"]
    );
    let mut again = sell(1);
    again.sale.transmission = recorded;
    assert_eq!(s.sell(&again).unwrap(), a, "sales made before the upgrade are kept");
    s.connection().execute_batch("PRAGMA user_version = 99;").unwrap();
    drop(s);
    let e = SqliteStore::open(&db.path(), PinCipher::from_spec(&db.keys).unwrap())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("newer than this pingate"), "{e}");
}

/// The columns of the sales table's primary key, in order.
fn sales_key(c: &rusqlite::Connection) -> Vec<String> {
    let mut st = c
        .prepare("SELECT name FROM pragma_table_info('sales') WHERE pk > 0 ORDER BY pk")
        .unwrap();
    let names = st.query_map([], |r| r.get(0)).unwrap();
    names.collect::<Result<_, _>>().unwrap()
}

/// Undoes what migration 5 changed, as a file of version 4 has it: no conflicts or re-deliveries, reversals keyed
/// by gateway first, keys without their year.
fn undo_migration_5(c: &rusqlite::Connection) {
    c.execute_batch(
        "BEGIN; DROP TABLE confirm_conflicts; DROP TABLE redeliveries;
         CREATE TABLE reversals_old (gateway TEXT NOT NULL, terminal_id TEXT NOT NULL, stan TEXT NOT NULL,
             transmission TEXT NOT NULL, pin_id INTEGER, at INTEGER NOT NULL,
             PRIMARY KEY (gateway, terminal_id, stan, transmission));
         INSERT INTO reversals_old SELECT gateway, terminal_id, stan, substr(transmission, 5), pin_id, at
             FROM reversals;
         DROP TABLE reversals; ALTER TABLE reversals_old RENAME TO reversals;
         UPDATE sales SET transmission = substr(transmission, 5) WHERE length(transmission) = 14;
         PRAGMA user_version = 4; COMMIT;",
    )
    .unwrap();
}

/// Undoes what migration 4 changed, as a file of versions 1 to 3 has it: sales keyed by (gateway, terminal,
/// stan, transmission). Its rows are kept.
fn undo_migration_4(c: &rusqlite::Connection) {
    let sales: i64 = c.query_row("SELECT COUNT(*) FROM sales", [], |r| r.get(0)).unwrap();
    let sql: String = c
        .query_row("SELECT sql FROM sqlite_schema WHERE name = 'sales'", [], |r| r.get(0))
        .unwrap();
    let old = sql
        .replace(
            "PRIMARY KEY (transmission, stan, terminal_id, gateway)",
            "PRIMARY KEY (gateway, terminal_id, stan, transmission)",
        )
        .replacen("CREATE TABLE \"sales\"", "CREATE TABLE sales_old", 1);
    assert!(
        old.contains("sales_old") && old.contains("PRIMARY KEY (gateway"),
        "{sql}"
    );
    c.execute_batch(&format!(
        "BEGIN; {old}; INSERT INTO sales_old SELECT * FROM sales; DROP TABLE sales; \
         ALTER TABLE sales_old RENAME TO sales; COMMIT;"
    ))
    .unwrap();
    assert_eq!(sales_key(c), ["gateway", "terminal_id", "stan", "transmission"]);
    let after: i64 = c.query_row("SELECT COUNT(*) FROM sales", [], |r| r.get(0)).unwrap();
    assert_eq!(after, sales);
}

/// Undoes what migration 3 changed, as a file of versions 1 and 2 has it: the state CHECK without `quarantined`,
/// the edges trigger without its edge. Checked: a PIN can then not be quarantined.
fn undo_migration_3(c: &rusqlite::Connection) {
    let sql_of = |name: &str| -> String {
        c.query_row("SELECT sql FROM sqlite_schema WHERE name = ?1", [name], |r| r.get(0))
            .unwrap()
    };
    let (table, trigger) = (sql_of("pins"), sql_of("pins_state_edges"));
    let old_table = table.replace(", 'quarantined')", ")");
    let old_trigger = trigger.replace(" OR (OLD.state = 'available' AND NEW.state = 'quarantined')", "");
    assert!(old_table != table && old_trigger != trigger, "{table}\n{trigger}");
    let cookie: i64 = c.query_row("PRAGMA schema_version", [], |r| r.get(0)).unwrap();
    c.execute_batch(&format!(
        "BEGIN; DROP TRIGGER pins_state_edges; {old_trigger}; PRAGMA writable_schema = ON;"
    ))
    .unwrap();
    c.execute("UPDATE sqlite_schema SET sql = ?1 WHERE name = 'pins'", [old_table])
        .unwrap();
    c.execute_batch(&format!(
        "PRAGMA schema_version = {}; PRAGMA writable_schema = OFF; COMMIT;",
        cookie + 1
    ))
    .unwrap();
    // Refused (by the trigger, which runs before the CHECK).
    let e = c
        .execute_batch("UPDATE pins SET state = 'quarantined' WHERE id = (SELECT MAX(id) FROM pins)")
        .unwrap_err();
    assert!(e.to_string().contains("illegal PIN state change"), "{e}");
}

/// Undoes what migration 7 changed, as a file of version 6 has it: the audit trail a row per PIN and change (each
/// record's PINs in the order it names them, records in their order), written by triggers on every change; no
/// `audit_seq` on the PINs (nor the triggers that check it), no `audit_trail` view.
fn undo_migration_7(c: &rusqlite::Connection) {
    undo_migration_8(c);
    c.execute_batch(
        "BEGIN;
         DROP VIEW audit_trail; DROP TRIGGER pins_audit_insert; DROP TRIGGER pins_audit_update;
         DROP TRIGGER pins_audit_claim; DROP TRIGGER pins_audit_claim_load;
         CREATE TABLE audit_old (seq INTEGER PRIMARY KEY AUTOINCREMENT, pin_id INTEGER NOT NULL, from_state TEXT,
             to_state TEXT NOT NULL, holder TEXT, at INTEGER NOT NULL);
         INSERT INTO audit_old (pin_id, from_state, to_state, holder, at)
             SELECT CAST(j.value AS INTEGER), a.from_state, a.to_state, a.holder, a.at
             FROM audit a, json_each(a.pins) j ORDER BY a.seq, j.key;
         DROP TABLE audit; ALTER TABLE audit_old RENAME TO audit;
         CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
         CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
         ALTER TABLE pins DROP COLUMN audit_seq;
         CREATE TRIGGER pins_audit_insert AFTER INSERT ON pins BEGIN
             INSERT INTO audit (pin_id, from_state, to_state, holder, at)
             VALUES (NEW.id, NULL, NEW.state, NEW.holder, CAST(strftime('%s', 'now') AS INTEGER));
         END;
         CREATE TRIGGER pins_audit_update AFTER UPDATE OF state ON pins WHEN NEW.state <> OLD.state BEGIN
             INSERT INTO audit (pin_id, from_state, to_state, holder, at)
             VALUES (NEW.id, OLD.state, NEW.state, COALESCE(NEW.holder, OLD.holder),
                     CAST(strftime('%s', 'now') AS INTEGER));
         END;
         PRAGMA user_version = 6; COMMIT;",
    )
    .unwrap();
}

/// Every PIN's trail, `(PIN, from, to, holder)` in order, read from `table` (`audit_trail`, or a version 6 file's
/// `audit`).
fn trails(c: &rusqlite::Connection, table: &str) -> Vec<(i64, Option<String>, String, Option<String>)> {
    let mut st = c
        .prepare(&format!(
            "SELECT pin_id, from_state, to_state, holder FROM {table} ORDER BY pin_id, seq"
        ))
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn audit_records(c: &rusqlite::Connection) -> i64 {
    c.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0)).unwrap()
}

/// `pingate audit` of the file: every invariant holds.
fn audit_holds(db: &TempDb) {
    let report = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(pingate::audit::run(
            &pingate::store::handle::DbUrl::Sqlite(db.path()),
            &[],
            None,
        ))
        .unwrap();
    assert!(report.ok(), "{}", report.text());
}

/// A file of schema version 6, whose audit trail is a row per PIN and change, is migrated to version 7: every row
/// becomes a record naming its one PIN, in the same order, so every PIN's trail reads the same and the audit holds;
/// then a reservation and a batch of confirms write one record each, after every older one, and a change made by
/// hand still gets a record of its own.
#[test]
fn a_version_6_file_gets_its_audit_trail_as_records() {
    let db = TempDb::new("audit-records");
    let mut s = db.stocked(12);
    // Every kind of change: sold on demand, reversed, reserved, confirmed, confirmed after its reversal (voided),
    // a conflict (voided), released.
    s.sell(&sell(1)).unwrap();
    s.sell(&sell(2)).unwrap();
    s.reverse(&ctx("gw1", 2)).unwrap();
    let held = s.reserve("gw1", "TOPUP", 1000, 5, 2_000_000_000).unwrap();
    assert_eq!(
        s.confirm("gw1", held[0].pin_id, &ctx("gw1", 3)).unwrap(),
        Confirmation::Sold
    );
    assert_eq!(s.reverse(&ctx("gw1", 4)).unwrap(), Reversal::Remembered);
    assert_eq!(
        s.confirm("gw1", held[1].pin_id, &ctx("gw1", 4)).unwrap(),
        Confirmation::Voided
    );
    assert_eq!(
        s.confirm("gw1", held[2].pin_id, &ctx("gw1", 3)).unwrap(),
        Confirmation::Conflict { voided: true }
    );
    s.connection()
        .execute("UPDATE confirm_conflicts SET resolved_at = 1, resolution = 'test'", [])
        .unwrap();
    assert!(s.release("gw1", &[held[3].pin_id]).unwrap().is_empty());
    audit_holds(&db);
    let before = trails(s.connection(), "audit_trail");
    // 12 loaded; 2 sold (1 then voided); 5 reserved, of which 2 confirmed (1 then voided), 1 voided by its
    // conflict, 1 released.
    assert_eq!(before.len(), 12 + 2 + 1 + 5 + 2 + 1 + 1 + 1);

    undo_migration_7(s.connection());
    drop(s);
    let old = rusqlite::Connection::open(db.path()).unwrap();
    assert_eq!(trails(&old, "audit"), before, "the version 6 file has the same trail");
    let rows = audit_records(&old);
    let last_row: i64 = old.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)).unwrap();
    drop(old);
    audit_holds(&db);

    let mut s = db.open();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(trails(s.connection(), "audit_trail"), before);
    assert_eq!(audit_records(s.connection()), rows, "a record per row of the old trail");
    let one_each: i64 = s
        .connection()
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE json_array_length(pins) <> 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(one_each, 0);
    audit_holds(&db);

    // New batches: one record for a reservation of three, one for the three confirms that sell them.
    let held = s.reserve("gw1", "TOPUP", 1000, 3, 2_000_000_000).unwrap();
    assert_eq!(held.len(), 3);
    let ops: Vec<pingate::store::Op> = held
        .iter()
        .enumerate()
        .map(|(i, d)| pingate::store::Op::Confirm {
            holder: "gw1".into(),
            pin_id: d.pin_id,
            sale: ctx("gw1", 10 + i as u32),
        })
        .collect();
    assert!(s
        .apply_batch(&ops)
        .iter()
        .all(|r| matches!(r, Ok(pingate::store::Outcome::Confirmed(Confirmation::Sold)))));
    assert_eq!(audit_records(s.connection()), rows + 2);
    let ids: Vec<i64> = held.iter().map(|d| d.pin_id).collect();
    let newest: Vec<(i64, String, String, String)> = s
        .connection()
        .prepare("SELECT seq, from_state, to_state, pins FROM audit WHERE seq > ?1 ORDER BY seq")
        .unwrap()
        .query_map([last_row], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let list = format!("[{},{},{}]", ids[0], ids[1], ids[2]);
    assert_eq!(newest.len(), 2, "{newest:?}");
    assert_eq!((newest[0].1.as_str(), newest[0].2.as_str()), ("available", "reserved"));
    assert_eq!((newest[1].1.as_str(), newest[1].2.as_str()), ("reserved", "sold"));
    assert!(newest.iter().all(|r| r.3 == list), "{newest:?}");
    for id in &ids {
        let trail: Vec<String> = s.audit_of(*id).unwrap().into_iter().map(|t| t.1).collect();
        // (One of them may be the PIN released above, which had a trail before.)
        assert!(
            trail.ends_with(&["available".into(), "reserved".into(), "sold".into()]),
            "{trail:?}"
        );
    }
    // A change by hand (an allowed edge) gets its own record from the trigger.
    let available: i64 = s
        .connection()
        .query_row("SELECT MIN(id) FROM pins WHERE state = 'available'", [], |r| r.get(0))
        .unwrap();
    s.connection()
        .execute("UPDATE pins SET state = 'expired' WHERE id = ?1", [available])
        .unwrap();
    assert_eq!(audit_records(s.connection()), rows + 3);
    assert_eq!(
        s.audit_of(available).unwrap().last().map(|t| t.1.clone()),
        Some("expired".to_string())
    );
    audit_holds(&db);
}

/// Operations that arrive while a batch is applied join its transaction (the store's worker hands them over before
/// the commit): they see what the batch did, nothing is committed before all of them are applied, and each gets
/// its own result, in order.
#[test]
fn operations_taken_while_a_batch_is_applied_share_its_commit() {
    let db = TempDb::new("late");
    let mut s = db.stocked(5);
    let other = rusqlite::Connection::open(db.path()).unwrap();
    let sold =
        |c: &rusqlite::Connection| -> i64 { c.query_row("SELECT COUNT(*) FROM sales", [], |r| r.get(0)).unwrap() };
    let mut late = vec![vec![
        pingate::store::Op::Sell(sell(1)),
        pingate::store::Op::Sell(sell(2)),
    ]];
    let mut asked = 0;
    let results = s.apply_batch_then(&[pingate::store::Op::Sell(sell(1))], &mut || {
        asked += 1;
        // The batch's sale is not committed yet: another connection does not see it.
        assert_eq!(sold(&other), 0);
        late.pop()
    });
    assert_eq!(asked, 2, "asked until nothing more came");
    assert_eq!(results.len(), 3);
    let pin = |i: usize| match &results[i] {
        Ok(pingate::store::Outcome::Sold(d)) => (d.pin_id, d.redelivered),
        r => panic!("{i}: {r:?}"),
    };
    let first = pin(0);
    assert_eq!(
        pin(1),
        (first.0, true),
        "the repeat saw the sale made before it in the transaction"
    );
    assert_ne!(pin(2).0, first.0);
    assert_eq!(sold(&other), 2, "all committed together");
}

/// Undoes migration 9 (merchants' sales per minute), as a file of version 8 has it.
fn undo_migration_9(c: &rusqlite::Connection) {
    c.execute_batch(
        "DROP TABLE merchant_sales_allowances; DROP TABLE merchant_rate_limits;
         PRAGMA user_version = 8",
    )
    .unwrap();
}

/// Undoes migration 8 (the reversals' reason), as a file of version 7 has it.
fn undo_migration_8(c: &rusqlite::Connection) {
    undo_migration_9(c);
    c.execute_batch(
        "ALTER TABLE reversals DROP COLUMN reason; DROP TABLE merchant_limits; DROP TABLE merchant_allowances;
         PRAGMA user_version = 7",
    )
    .unwrap();
}

/// A reversal with a reason, the time it was asked for and the server's window.
fn reverse_with(
    s: &mut SqliteStore,
    stan: u32,
    reason: pingate::sale::ReversalReason,
    window_secs: Option<i64>,
) -> Result<pingate::store::Outcome, StoreError> {
    s.apply_batch(&[pingate::store::Op::Reverse {
        sale: ctx("gw1", stan),
        content: None,
        policy: pingate::store::ReversePolicy {
            reason,
            requested_at: None,
            window_secs,
        },
    }])
    .pop()
    .unwrap()
}

#[tokio::test]
async fn a_version_7_file_keeps_its_reversals_and_voided_pins_are_listed_with_their_reason() {
    use pingate::sale::ReversalReason::{Terminal, Unacknowledged, Undelivered};
    use pingate::store::PinStore;
    let db = TempDb::new("voided");
    let mut s = db.stocked(6);
    for stan in 1..=5 {
        s.sell(&sell(stan)).unwrap();
    }
    // Reversed by its terminal before the upgrade: no reason stored, a terminal's.
    s.reverse(&ctx("gw1", 2)).unwrap();
    undo_migration_8(s.connection());
    drop(s);
    let mut s = db.open();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 9);
    // Sale 1 was made an hour ago: a terminal's reversal after a 10-minute window is refused, the PIN stays sold.
    s.connection()
        .execute("UPDATE sales SET sold_at = sold_at - 3600 WHERE stan = '000001'", [])
        .unwrap();
    let late = reverse_with(&mut s, 1, Terminal, Some(600)).unwrap_err();
    assert!(matches!(late, StoreError::ReversalTooLate { .. }), "{late:?}");
    // The gateway's own reversals are never too late; a terminal's within the window is done.
    assert!(reverse_with(&mut s, 3, Unacknowledged, Some(600)).is_ok());
    assert!(reverse_with(&mut s, 4, Undelivered, Some(600)).is_ok());
    assert!(reverse_with(&mut s, 5, Terminal, Some(600)).is_ok());
    assert_eq!(count(&s, PinState::Sold), 1);
    assert_eq!(count(&s, PinState::Voided), 4);
    // For deactivation: the unacknowledged one only when asked for, marked; nothing of the PIN itself.
    let list = s.voided(0, false).await.unwrap();
    let reasons: Vec<(String, String)> = list.iter().map(|r| (r.terminal_id.clone(), r.reason.clone())).collect();
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(reasons.iter().all(|(_, r)| r != "unacknowledged"));
    assert_eq!(
        list.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>(),
        ["terminal", "undelivered", "terminal"]
    );
    assert!(list
        .iter()
        .all(|r| r.product == "TOPUP" && r.amount == 1000 && r.serial.starts_with("S1000-")));
    let all = s.voided(0, true).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all.iter().filter(|r| r.reason == "unacknowledged").count(), 1);
    // `--since` after every reversal: none.
    assert!(s.voided(i64::MAX / 2, true).await.unwrap().is_empty());
    drop(s);
    // The command line, on the same file: CSV with a header, no PIN value.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(["pins", "voided", "--db"])
        .arg(format!("sqlite:{}", db.path().display()))
        .args(["--since", "2000-01-01", "--csv", "--include-unacknowledged"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "serial,product,amount,currency,reversed_at,gateway,terminal_id,merchant_id,reason"
    );
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines.iter().any(|l| l.ends_with(",unacknowledged")), "{text}");
    for p in pins(0, 6, 1000) {
        assert!(!text.contains(p.pin.expose()), "a PIN value in the report");
    }
}

/// One `sales_allowance` of `want` sales for `merchant` in `minute`: (granted, limited).
fn ask_sales(s: &mut SqliteStore, merchant: &str, minute: i64, want: i64) -> (i64, bool) {
    match s
        .apply_batch(&[pingate::store::Op::SalesAllowance {
            merchant_id: merchant.into(),
            minute,
            want,
        }])
        .pop()
        .unwrap()
    {
        Ok(pingate::store::Outcome::Allowance { granted, limited }) => (granted, limited),
        r => panic!("{r:?}"),
    }
}

fn sales_allowance_rows(s: &SqliteStore) -> Vec<(String, i64, i64)> {
    let mut st = s
        .connection()
        .prepare("SELECT merchant_id, minute, granted FROM merchant_sales_allowances ORDER BY merchant_id, minute")
        .unwrap();
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// A file of version 8 gets migration 9 (opened by an operator command, without the PIN keys, too); then a merchant's
/// sales per minute, asked for by two servers on the one file, are never granted past the limit within a minute,
/// all of it again the next minute, and the rows of minutes gone are pruned.
#[tokio::test]
async fn a_version_8_file_is_migrated_and_sales_per_minute_are_never_granted_past_the_limit() {
    use pingate::store::PinStore;
    let db = TempDb::new("rates");
    let s = db.stocked(1);
    s.connection()
        .execute(
            "INSERT INTO merchant_limits (merchant_id, currency, value_per_day) VALUES ('M1', '978', 500)",
            [],
        )
        .unwrap();
    undo_migration_9(s.connection());
    drop(s);
    // `pingate limits` opens the file without the PIN keys: the step to 9 needs none.
    let mut keyless = SqliteStore::open(&db.path(), PinCipher::without_keys()).unwrap();
    assert_eq!(keyless.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 9);
    keyless.set_rate_limit("M1", Some(5)).await.unwrap();
    assert_eq!(
        keyless.limits(0).await.unwrap().len(),
        1,
        "the value limit of version 8 kept"
    );
    drop(keyless);
    // Two servers on one file.
    let (mut a, mut b) = (db.open(), db.open());
    let minute = pingate::clock::unix_now().div_euclid(60);
    // A merchant without the limit: all of it, nothing recorded.
    assert_eq!(ask_sales(&mut a, "M2", minute, 7), (7, false));
    assert_eq!(ask_sales(&mut a, "M1", minute, 2), (2, true));
    assert_eq!(ask_sales(&mut b, "M1", minute, 2), (2, true));
    assert_eq!(
        ask_sales(&mut a, "M1", minute, 2),
        (1, true),
        "only what is left of the 5"
    );
    assert_eq!(ask_sales(&mut b, "M1", minute, 2), (0, true));
    assert_eq!(ask_sales(&mut a, "M1", minute, 1), (0, true));
    let rates = a.rate_limits(minute).await.unwrap();
    assert_eq!(
        rates,
        vec![pingate::store::RateRow {
            merchant_id: "M1".into(),
            sales_per_minute: 5,
            granted_this_minute: 5
        }]
    );
    // The next minute: all of it again. A server whose clock is still in the minute before finds it granted out
    // (its row is kept for that); once a third minute starts, the first one's row is pruned.
    assert_eq!(ask_sales(&mut b, "M1", minute + 1, 4), (4, true));
    assert_eq!(ask_sales(&mut a, "M1", minute, 1), (0, true));
    assert_eq!(ask_sales(&mut a, "M1", minute + 1, 4), (1, true));
    assert_eq!(
        sales_allowance_rows(&a),
        vec![("M1".to_string(), minute, 5), ("M1".to_string(), minute + 1, 5)]
    );
    assert_eq!(a.rate_limits(minute + 2).await.unwrap()[0].granted_this_minute, 0);
    assert_eq!(ask_sales(&mut b, "M1", minute + 2, 2), (2, true));
    assert_eq!(
        sales_allowance_rows(&a),
        vec![("M1".to_string(), minute + 1, 5), ("M1".to_string(), minute + 2, 2)]
    );
    // A lower limit holds at once; removed, the merchant's grants go with it.
    a.set_rate_limit("M1", Some(0)).await.unwrap();
    assert_eq!(ask_sales(&mut b, "M1", minute + 2, 1), (0, true));
    assert_eq!(ask_sales(&mut b, "M1", minute + 3, 1), (0, true));
    a.set_rate_limit("M1", None).await.unwrap();
    assert!(a.rate_limits(minute + 2).await.unwrap().is_empty());
    assert!(sales_allowance_rows(&a).is_empty());
    assert_eq!(ask_sales(&mut b, "M1", minute + 2, 3), (3, false));
}
