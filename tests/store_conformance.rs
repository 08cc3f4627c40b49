//! One scenario, written once against the `PinStore` trait, run on both backends: whatever the database, the
//! inventory behaves the same. Also key rotation (PINs sealed under an old key still open after a new key is added,
//! new ones are sealed under it), leases (renewals, expired ones reported and returned) and successful reversals.

mod common;

use pingate::crypto::PinCipher;
use pingate::sale::{Pin, SaleContent};
use pingate::store::postgres::PgStore;
use pingate::store::sqlite::SqliteStore;
use pingate::store::{
    Confirmation, NewPin, Op, Outcome, PinState, PinStore, Product, Reversal, SaleContext, SellRequest, StoreError,
};

fn pins(from: usize, n: usize, expiry: Option<&str>) -> Vec<NewPin> {
    (from..from + n)
        .map(|i| NewPin {
            product: "GIFT".into(),
            amount: 2500,
            pin: Pin::new(format!("GIFT{i:08}")),
            serial: format!("G{i:07}"),
            expiry: expiry.map(str::to_string),
            receipt: vec![format!("Gift card {i}")],
        })
        .collect()
}

/// A sale through gateway `gw`, of a terminal of that gateway's own (a key is one sale whichever gateway it comes
/// through: the scenarios below keep their gateways' sales apart by terminal).
fn ctx(gw: &str, stan: u32) -> SaleContext {
    SaleContext {
        gateway: gw.into(),
        terminal_id: format!("T1-{gw}"),
        merchant_id: "M1".into(),
        stan: format!("{stan:06}"),
        transmission: "0101000000".into(),
        rrn: "R".into(),
    }
}

fn sell(gw: &str, stan: u32) -> Op {
    Op::Sell(SellRequest {
        product: "GIFT".into(),
        amount: 2500,
        sale: ctx(gw, stan),
        repeat_since: 0,
    })
}

async fn count(s: &impl PinStore, state: PinState) -> i64 {
    s.stock()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.state == state)
        .map(|r| r.count)
        .sum()
}

/// The product the scenarios sell: a gift card of 25.00.
fn gift() -> Product {
    Product {
        code: "GIFT".into(),
        name: "Gift card".into(),
        supplier: "Shop".into(),
        currency: "840".into(),
        denominations: vec![2500],
    }
}

/// The behaviour every backend must have.
async fn scenario(s: &mut impl PinStore) {
    s.upsert_product(&gift()).await.unwrap();
    // A receipt that shows its PIN (stored in clear) refuses the import, naming the PIN by position, never by value.
    let mut shown = pins(90_000, 2, None);
    shown[1].receipt = vec![format!("your PIN: {}", shown[1].pin.expose())];
    let e = s
        .import_with_progress(&shown, &mut |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "PIN 2: receipt line 1 contains the PIN (receipts are stored in clear: give the PIN its own field only)"
    );
    let mut seen = Vec::new();
    let mut progress = |n: usize| seen.push(n);
    assert_eq!(
        s.import_with_progress(&pins(0, 10_000, None), &mut progress)
            .await
            .unwrap(),
        10_000
    );
    assert_eq!(seen, vec![5_000, 10_000], "import reports progress");
    s.import_with_progress(&pins(20_000, 2, Some("20000101")), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(s.catalog().await.unwrap()[0].denominations, vec![2500]);

    let Outcome::Sold(a) = s.apply(sell("g", 1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(s.apply(sell("g", 1)).await.unwrap(), Outcome::Sold(a.clone()));
    let Outcome::Reserved(held) = s
        .apply(Op::Reserve {
            holder: "g".into(),
            product: "GIFT".into(),
            amount: 2500,
            count: 3,
            lease_until: 100,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(held.len(), 3);
    assert!(held.iter().all(|d| d.pin_id != a.pin_id));
    let confirm = Op::Confirm {
        holder: "g".into(),
        pin_id: held[0].pin_id,
        sale: ctx("g", 2),
    };
    assert_eq!(
        s.apply(confirm.clone()).await.unwrap(),
        Outcome::Confirmed(Confirmation::Sold)
    );
    assert_eq!(
        s.apply(confirm).await.unwrap(),
        Outcome::Confirmed(Confirmation::AlreadyConfirmed)
    );
    assert_eq!(
        s.apply(Op::Release {
            holder: "g".into(),
            pin_ids: vec![held[1].pin_id]
        })
        .await
        .unwrap(),
        Outcome::Released { refused: vec![] }
    );
    assert_eq!(
        s.apply(Op::Reverse {
            sale: ctx("g", 2),
            content: None,
            policy: Default::default()
        })
        .await
        .unwrap(),
        Outcome::Reversed(Reversal::Voided { pin_id: held[0].pin_id })
    );
    assert_eq!(
        s.apply(Op::Reverse {
            sale: ctx("g", 3),
            content: None,
            policy: Default::default()
        })
        .await
        .unwrap(),
        Outcome::Reversed(Reversal::Remembered)
    );
    assert!(matches!(
        s.apply(sell("g", 3)).await,
        Err(StoreError::AlreadyReversed { .. })
    ));
    assert!(matches!(
        s.apply(Op::ReversePin {
            gateway: "other".into(),
            pin_id: a.pin_id
        })
        .await,
        Err(StoreError::NotHolder { .. })
    ));
    // A repeat of a reversed sale never gets the voided PIN back.
    let Outcome::Sold(_) = s.apply(sell("g", 20)).await.unwrap() else {
        panic!()
    };
    s.apply(Op::Reverse {
        sale: ctx("g", 20),
        content: None,
        policy: Default::default(),
    })
    .await
    .unwrap();
    assert!(matches!(
        s.apply(sell("g", 20)).await,
        Err(StoreError::AlreadyReversed { .. })
    ));
    // Keys whose parts would run together as text stay different sales, in one batch or in two.
    let odd = |terminal: &str, stan: &str| {
        let mut c = ctx("g", 0);
        c.terminal_id = terminal.into();
        c.stan = stan.into();
        Op::Sell(SellRequest {
            product: "GIFT".into(),
            amount: 2500,
            sale: c,
            repeat_since: 0,
        })
    };
    let r = s.apply_batch(&[odd("T/1", "5"), odd("T", "1/5")]).await;
    let (Ok(Outcome::Sold(x)), Ok(Outcome::Sold(y))) = (&r[0], &r[1]) else {
        panic!("{r:?}")
    };
    assert_ne!(x.pin_id, y.pin_id, "two sales, two PINs");
    let Outcome::Sold(again) = s.apply(odd("T", "1/5")).await.unwrap() else {
        panic!()
    };
    assert_eq!(again.pin_id, y.pin_id);

    // The expired PINs are never sold, and `expire` moves them.
    assert_eq!(s.expire("20261128").await.unwrap(), 2);
    assert_eq!(count(s, PinState::Expired).await, 2);
    assert_eq!(s.expired_leases(1_000).await.unwrap(), vec![("g".to_string(), 1)]);
    assert_eq!(s.return_expired("g", 1_000).await.unwrap(), 1);
    assert_eq!(count(s, PinState::Sold).await, 1 + 2);
    assert_eq!(count(s, PinState::Voided).await, 2);
    assert_eq!(count(s, PinState::Available).await, 10_000 - 5);

    // A batch of sales alone (PostgreSQL's one-statement path) answers each request as it would answer it alone.
    s.upsert_product(&Product {
        code: "TINY".into(),
        name: "Two PINs".into(),
        supplier: "Shop".into(),
        currency: "840".into(),
        denominations: vec![100],
    })
    .await
    .unwrap();
    let mut two = pins(40_000, 2, None);
    for p in &mut two {
        (p.product, p.amount) = ("TINY".into(), 100);
    }
    s.import_with_progress(&two, &mut |_| {}).await.unwrap();
    let Outcome::Sold(earlier) = s.apply(sell("b", 1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        s.apply(Op::Reverse {
            sale: ctx("b", 9),
            content: None,
            policy: Default::default()
        })
        .await
        .unwrap(),
        Outcome::Reversed(Reversal::Remembered)
    );
    let with = |stan: u32, product: &str, amount: i64, merchant: &str| {
        let mut sale = ctx("b", stan);
        sale.merchant_id = merchant.into();
        Op::Sell(SellRequest {
            product: product.into(),
            amount,
            sale,
            repeat_since: 0,
        })
    };
    let tiny = |stan: u32| with(stan, "TINY", 100, "M1");
    let r = s
        .apply_batch(&[
            sell("b", 1),
            tiny(10),
            tiny(10),
            with(10, "GIFT", 2500, "M1"),
            tiny(11),
            tiny(12),
            tiny(12),
            sell("b", 9),
            with(13, "NOPE", 100, "M1"),
            with(14, "GIFT", 777, "M1"),
            with(1, "GIFT", 2500, "M2"),
        ])
        .await;
    assert_eq!(
        r[0].as_ref().ok(),
        Some(&Outcome::Sold(earlier)),
        "a repeat of an earlier sale"
    );
    let (Ok(Outcome::Sold(x)), Ok(Outcome::Sold(y)), Ok(Outcome::Sold(z))) = (&r[1], &r[2], &r[4]) else {
        panic!("{r:?}")
    };
    assert_eq!(x, y, "a repeat inside the batch gets the same PIN");
    assert_ne!(x.pin_id, z.pin_id);
    assert!(matches!(r[3], Err(StoreError::DuplicateMismatch { .. })), "{r:?}");
    assert!(matches!(r[5], Err(StoreError::OutOfStock { .. })), "{r:?}");
    assert!(matches!(r[6], Err(StoreError::OutOfStock { .. })), "{r:?}");
    assert!(matches!(r[7], Err(StoreError::AlreadyReversed { .. })), "{r:?}");
    assert!(matches!(r[8], Err(StoreError::UnknownProduct(_))), "{r:?}");
    assert!(matches!(r[9], Err(StoreError::UnknownDenomination { .. })), "{r:?}");
    assert!(matches!(r[10], Err(StoreError::DuplicateMismatch { .. })), "{r:?}");
    assert_eq!(count(s, PinState::Sold).await, 1 + 2 + 1 + 2);
    // A key whose first request is refused for its product still sells to its next one.
    let r = s
        .apply_batch(&[with(20, "NOPE", 100, "M1"), with(20, "GIFT", 2500, "M1")])
        .await;
    assert!(matches!(r[0], Err(StoreError::UnknownProduct(_))), "{r:?}");
    assert!(matches!(r[1], Ok(Outcome::Sold(_))), "{r:?}");

    // A batch of confirms (PostgreSQL's one-statement path) answers each as it would answer it alone.
    let Outcome::Reserved(h) = s
        .apply(Op::Reserve {
            holder: "c".into(),
            product: "GIFT".into(),
            amount: 2500,
            count: 4,
            lease_until: 4_000_000_000,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let confirm = |pin_id: i64, stan: u32| Op::Confirm {
        holder: "c".into(),
        pin_id,
        sale: ctx("c", stan),
    };
    assert_eq!(
        s.apply(confirm(h[0].pin_id, 1)).await.unwrap(),
        Outcome::Confirmed(Confirmation::Sold)
    );
    assert_eq!(
        s.apply(Op::Reverse {
            sale: ctx("c", 4),
            content: None,
            policy: Default::default()
        })
        .await
        .unwrap(),
        Outcome::Reversed(Reversal::Remembered)
    );
    let r = s
        .apply_batch(&[
            confirm(h[0].pin_id, 1),
            confirm(h[1].pin_id, 1),
            confirm(h[1].pin_id, 2),
            confirm(h[2].pin_id, 4),
            confirm(h[1].pin_id, 2),
            Op::Confirm {
                holder: "other".into(),
                pin_id: h[3].pin_id,
                sale: ctx("c", 5),
            },
            confirm(a.pin_id, 6),
        ])
        .await;
    let ok = |c: Confirmation| Some(Outcome::Confirmed(c));
    assert_eq!(r[0].as_ref().ok().cloned(), ok(Confirmation::AlreadyConfirmed), "{r:?}");
    // A key already sold with another PIN: the holder handed out a PIN no sale can be recorded for. It is voided
    // and the conflict recorded (the audit shows it); the PIN is then no longer anyone's to confirm.
    assert_eq!(
        r[1].as_ref().ok().cloned(),
        ok(Confirmation::Conflict { voided: true }),
        "{r:?}"
    );
    assert!(matches!(r[2], Err(StoreError::NotHolder { .. })), "{r:?}");
    assert_eq!(r[3].as_ref().ok().cloned(), ok(Confirmation::Voided), "{r:?}");
    assert!(matches!(r[4], Err(StoreError::NotHolder { .. })), "{r:?}");
    assert!(matches!(r[5], Err(StoreError::NotHolder { .. })), "{r:?}");
    assert!(matches!(r[6], Err(StoreError::NotHolder { .. })), "{r:?}");
    assert_eq!(
        s.apply(Op::Reverse {
            sale: ctx("c", 4),
            content: None,
            policy: Default::default()
        })
        .await
        .unwrap(),
        Outcome::Reversed(Reversal::AlreadyVoided { pin_id: h[2].pin_id }),
        "the sale a remembered reversal met is voided"
    );
    // h[0] sold; h[1] voided by its conflict; h[2] voided by the remembered reversal.
    assert_eq!(count(s, PinState::Sold).await, 1 + 2 + 1 + 2 + 1 + 1);
    assert_eq!(
        count(s, PinState::Reserved).await,
        1,
        "the PIN another holder asked for is still held"
    );
    // Release: the holder's reserved PIN goes back once (its repeat, a sold PIN and an unknown id are refused).
    assert_eq!(
        s.apply(Op::Release {
            holder: "c".into(),
            pin_ids: vec![h[3].pin_id, h[3].pin_id, h[2].pin_id, 99_999_999],
        })
        .await
        .unwrap(),
        Outcome::Released {
            refused: vec![h[3].pin_id, h[2].pin_id, 99_999_999]
        }
    );
    assert_eq!(count(s, PinState::Reserved).await, 0);

    // A product known but offered in no amount: the amount is what is unknown, on both backends.
    s.upsert_product(&Product {
        code: "SOON".into(),
        name: "Not on sale yet".into(),
        supplier: "Shop".into(),
        currency: "840".into(),
        denominations: vec![],
    })
    .await
    .unwrap();
    let soon = with(30, "SOON", 100, "M1");
    assert!(
        matches!(s.apply(soon).await, Err(StoreError::UnknownDenomination { .. })),
        "sell"
    );
    let r = s
        .apply(Op::Reserve {
            holder: "c".into(),
            product: "SOON".into(),
            amount: 100,
            count: 1,
            lease_until: 4_000_000_000,
        })
        .await;
    assert!(matches!(r, Err(StoreError::UnknownDenomination { .. })), "{r:?}");
}

/// A fresh SQLite inventory in a directory of this test run, with new PIN keys: (directory, key spec, store).
fn sqlite(prefix: &str) -> (std::path::PathBuf, String, SqliteStore) {
    let dir = std::env::temp_dir().join(format!("pingate-{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keys = PinCipher::generate_spec().unwrap();
    let s = SqliteStore::open(&dir.join("pins.db"), PinCipher::from_spec(&keys).unwrap()).unwrap();
    (dir, keys, s)
}

#[tokio::test]
async fn sqlite_conforms() {
    let (dir, keys, mut s) = sqlite("conf");
    scenario(&mut s).await;

    // Rotation: add key 2; old PINs still open, new ones are sealed under key 2.
    drop(s);
    let mut s = SqliteStore::open(
        &dir.join("pins.db"),
        PinCipher::from_spec(&rotated_keys(&keys)).unwrap(),
    )
    .unwrap();
    after_rotation(&mut s).await;
    let key_ids: Vec<(i64, i64)> = s
        .connection()
        .prepare(KEY_IDS_SQL)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        key_ids,
        vec![(1, 1), (2, 0)],
        "the old PINs under key 1, the new ones under key 2"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The test PostgreSQL (`PINGATE_TEST_PG`, else the local server) and a schema of this test run.
fn pg(prefix: &str) -> (String, String) {
    let url = common::pg_test_url();
    (url, format!("{prefix}{}", std::process::id()))
}

#[tokio::test]
async fn postgres_conforms() {
    let (url, schema) = pg("conf");
    let keys = PinCipher::generate_spec().unwrap();
    let mut s = PgStore::connect(&url, Some(&schema), PinCipher::from_spec(&keys).unwrap())
        .await
        .unwrap();
    scenario(&mut s).await;

    // Rotation, as on SQLite.
    drop(s);
    let mut s = PgStore::connect(&url, Some(&schema), PinCipher::from_spec(&rotated_keys(&keys)).unwrap())
        .await
        .unwrap();
    after_rotation(&mut s).await;
    let key_ids: Vec<(i32, i32)> = s
        .client()
        .query(KEY_IDS_SQL, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        key_ids,
        vec![(1, 1), (2, 0)],
        "the old PINs under key 1, the new ones under key 2"
    );
    s.client()
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// `keys` (key 1) with a new key 2 added: key 2 is the current one, key 1 still opens.
fn rotated_keys(keys: &str) -> String {
    let k2 = PinCipher::generate_spec().unwrap().replacen("1:", "2:", 1);
    format!("{keys},{k2}")
}

/// The key ids the PINs of product ROT (0) and the others (1) are sealed under.
const KEY_IDS_SQL: &str =
    "SELECT DISTINCT key_id, CASE WHEN product = 'ROT' THEN 0 ELSE 1 END AS old FROM pins ORDER BY 1, 2";

/// After [`scenario`], opened with [`rotated_keys`]: a PIN sealed under key 1 still sells; PINs imported now (product
/// ROT) are sealed under key 2 and sell too, and a repeat of each sale gets its PIN again.
async fn after_rotation(s: &mut impl PinStore) {
    let Outcome::Sold(old) = s.apply(sell("g", 10)).await.unwrap() else {
        panic!()
    };
    assert!(old.pin.expose().starts_with("GIFT"));
    s.upsert_product(&Product {
        code: "ROT".into(),
        name: "Sealed under key 2".into(),
        supplier: "Shop".into(),
        currency: "840".into(),
        denominations: vec![300],
    })
    .await
    .unwrap();
    let mut new = pins(30_000, 2, None);
    for p in &mut new {
        (p.product, p.amount) = ("ROT".into(), 300);
    }
    s.import_with_progress(&new, &mut |_| {}).await.unwrap();
    let rot = |stan: u32| {
        Op::Sell(SellRequest {
            product: "ROT".into(),
            amount: 300,
            sale: ctx("r", stan),
            repeat_since: 0,
        })
    };
    let Outcome::Sold(n) = s.apply(rot(1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(n.pin.expose(), "GIFT00030000");
    assert_eq!(s.apply(rot(1)).await.unwrap(), Outcome::Sold(n));
    assert_eq!(s.apply(sell("g", 10)).await.unwrap(), Outcome::Sold(old));
}

/// Stocks GIFT 2500 with 20 PINs (ids 1 to 20) and spoils the rows of PINs 1, 3 and 7: their serial (the
/// associated data of the seal) no longer matches, so they do not open, while every other row of their key does.
const SPOILED: [i64; 3] = [1, 3, 7];
const SPOIL_SQL: &str = "UPDATE pins SET serial = serial || 'X' WHERE id IN (1, 3, 7)";

async fn stock_twenty(s: &mut impl PinStore) {
    s.upsert_product(&gift()).await.unwrap();
    s.import_with_progress(&pins(0, 20, None), &mut |_| {}).await.unwrap();
}

/// After [`SPOIL_SQL`]: each spoiled PIN is quarantined the first time a sale or reservation picks it, and that
/// operation goes on with the next PIN; nothing else of its batch is affected.
async fn spoiled_rows_are_quarantined(s: &mut impl PinStore) {
    let Outcome::Sold(d) = s.apply(sell("g", 1)).await.unwrap() else {
        panic!("a sale")
    };
    assert_eq!(d.pin_id, 2, "PIN 1 does not open: the sale takes the next one");
    assert_eq!(d.pin.expose(), "GIFT00000001");
    assert_eq!(count(s, PinState::Quarantined).await, 1);
    let reserve = Op::Reserve {
        holder: "g".into(),
        product: "GIFT".into(),
        amount: 2500,
        count: 3,
        lease_until: i64::MAX / 2,
    };
    let Outcome::Reserved(got) = s.apply(reserve).await.unwrap() else {
        panic!("a reservation")
    };
    assert_eq!(got.iter().map(|d| d.pin_id).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(count(s, PinState::Quarantined).await, 2);
    // A batch of two sales meets PIN 7: both still sell, neither gets it.
    let r = s.apply_batch(&[sell("g", 2), sell("g", 3)]).await;
    let ids: Vec<i64> = r
        .iter()
        .map(|r| match r {
            Ok(Outcome::Sold(d)) => d.pin_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![8, 9]);
    assert_eq!(count(s, PinState::Quarantined).await, 3);
    // A repeat of a sale gets its PIN again, not a quarantined one.
    let Outcome::Sold(again) = s.apply(sell("g", 1)).await.unwrap() else {
        panic!("a repeat")
    };
    assert_eq!(again.pin_id, 2);
    assert_eq!(count(s, PinState::Sold).await, 3);
    assert_eq!(count(s, PinState::Reserved).await, 3);
    assert_eq!(count(s, PinState::Available).await, 20 - 3 - 3 - 3);
}

/// Repairs the row of spoiled PIN 1 (as restoring it from a backup would); 3 and 7 stay spoiled.
const REPAIR_SQL: &str = "UPDATE pins SET serial = substr(serial, 1, length(serial) - 1) WHERE id = 1";

/// After [`REPAIR_SQL`]: the operator returns PIN 1 to stock; a row still spoiled, or a PIN not quarantined, is
/// refused and stays as it was.
async fn a_repaired_row_goes_back_to_stock(s: &mut impl PinStore) {
    let available = count(s, PinState::Available).await;
    s.return_quarantined(1).await.unwrap();
    let r = s.return_quarantined(3).await;
    assert!(matches!(r, Err(StoreError::Unreadable { pin_id: 3, .. })), "{r:?}");
    let r = s.return_quarantined(2).await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.to_string().contains("PIN 2 is sold, not quarantined")),
        "{r:?}"
    );
    let r = s.return_quarantined(999).await;
    assert!(
        r.as_ref().is_err_and(|e| e.to_string().contains("no PIN with id 999")),
        "{r:?}"
    );
    assert_eq!(count(s, PinState::Quarantined).await, 2);
    assert_eq!(count(s, PinState::Available).await, available + 1);
    // And it sells again: it is the lowest available id.
    let Outcome::Sold(d) = s.apply(sell("g", 20)).await.unwrap() else {
        panic!("a sale")
    };
    assert_eq!((d.pin_id, d.pin.expose()), (1, "GIFT00000000"));
}

/// With a wrong key (same key id, other bytes) no row opens: nothing is quarantined and the sale fails, as
/// before quarantine existed; the right key then sells.
async fn a_wrong_key_quarantines_nothing(wrong: &mut impl PinStore) {
    let before = count(wrong, PinState::Available).await;
    let quarantined = count(wrong, PinState::Quarantined).await;
    let r = wrong.apply(sell("g", 50)).await;
    assert!(
        r.as_ref().is_err_and(|e| e.to_string().contains("does not decrypt")),
        "{r:?}"
    );
    assert_eq!(count(wrong, PinState::Quarantined).await, quarantined, "none more");
    assert_eq!(count(wrong, PinState::Available).await, before);
}

#[tokio::test]
async fn sqlite_quarantines_a_row_that_does_not_open() {
    let (dir, _, mut s) = sqlite("quarantine");
    stock_twenty(&mut s).await;
    s.connection().execute_batch(SPOIL_SQL).unwrap();
    spoiled_rows_are_quarantined(&mut s).await;
    // Audited like every other move.
    let audited: Vec<i64> = s
        .connection()
        .prepare(
            "SELECT pin_id FROM audit_trail WHERE from_state = 'available' AND to_state = 'quarantined' ORDER BY 1",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(audited, SPOILED);
    // The state machine refuses a quarantined PIN going anywhere but back to stock.
    let e = s
        .connection()
        .execute_batch("UPDATE pins SET state = 'sold' WHERE id = 1")
        .unwrap_err();
    assert!(e.to_string().contains("illegal PIN state change"), "{e}");
    s.connection().execute_batch(REPAIR_SQL).unwrap();
    a_repaired_row_goes_back_to_stock(&mut s).await;
    drop(s);
    let wrong = PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap();
    let mut w = SqliteStore::open(&dir.join("pins.db"), wrong).unwrap();
    a_wrong_key_quarantines_nothing(&mut w).await;
    drop(w);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn postgres_quarantines_a_row_that_does_not_open() {
    let (url, schema) = pg("quar");
    let keys = PinCipher::generate_spec().unwrap();
    let mut s = PgStore::connect(&url, Some(&schema), PinCipher::from_spec(&keys).unwrap())
        .await
        .unwrap();
    stock_twenty(&mut s).await;
    s.client().batch_execute(SPOIL_SQL).await.unwrap();
    spoiled_rows_are_quarantined(&mut s).await;
    let audited: Vec<i64> = s
        .client()
        .query(
            "SELECT pin_id FROM audit_trail WHERE from_state = 'available' AND to_state = 'quarantined' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audited, SPOILED);
    let e = s
        .client()
        .batch_execute("UPDATE pins SET state = 'sold' WHERE id = 1")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("illegal PIN state change"), "{e:?}");
    s.client().batch_execute(REPAIR_SQL).await.unwrap();
    a_repaired_row_goes_back_to_stock(&mut s).await;
    let wrong = PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap();
    let mut w = PgStore::connect(&url, Some(&schema), wrong).await.unwrap();
    a_wrong_key_quarantines_nothing(&mut w).await;
    s.client()
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// What a reversal of a `ctx(gw, _)` sale of GIFT 2500 names, `amount` aside.
fn gift_content(amount: i64) -> SaleContent {
    SaleContent {
        merchant_id: "M1".into(),
        product: "GIFT".into(),
        amount,
        currency: "840".into(),
    }
}

fn reserve(holder: &str, count: usize, lease_until: i64) -> Op {
    Op::Reserve {
        holder: holder.into(),
        product: "GIFT".into(),
        amount: 2500,
        count,
        lease_until,
    }
}

async fn held(s: &mut impl PinStore, holder: &str) -> Vec<i64> {
    match s.apply(Op::Held { holder: holder.into() }).await.unwrap() {
        Outcome::Held(ids) => ids,
        o => panic!("{o:?}"),
    }
}

/// Leases: a renewal extends only the holder's own reservations (another gateway's, a released PIN and an unknown
/// id are not counted); an expired lease is reported per holder (`pins leases`) and freed only by the operator
/// (`pins return-expired`), which takes that holder's expired ones alone, never a renewed one. Reversals that
/// succeed: a sold PIN voided once (a reversal naming other content refused first, the PIN still sold), then
/// `AlreadyVoided`, and the sale's repeat refused; a cache sale reversed by its PIN's id by the gateway that sold it
/// only.
async fn leases_and_reversals(s: &mut impl PinStore) {
    stock_twenty(s).await;
    let Outcome::Reserved(g) = s.apply(reserve("g", 3, 100)).await.unwrap() else {
        panic!()
    };
    let Outcome::Reserved(h) = s.apply(reserve("h", 2, 100)).await.unwrap() else {
        panic!()
    };
    let (g, h): (Vec<i64>, Vec<i64>) = (
        g.iter().map(|d| d.pin_id).collect(),
        h.iter().map(|d| d.pin_id).collect(),
    );
    assert_eq!(held(s, "g").await, g);
    assert_eq!(held(s, "h").await, h);
    // h releases one; then h cannot renew g's, and g cannot renew h's nor the released one.
    assert_eq!(
        s.apply(Op::Release {
            holder: "h".into(),
            pin_ids: vec![h[1]]
        })
        .await
        .unwrap(),
        Outcome::Released { refused: vec![] }
    );
    let renew = |holder: &str, pin_ids: Vec<i64>| Op::Renew {
        holder: holder.into(),
        pin_ids,
        lease_until: 5_000,
    };
    assert_eq!(
        s.apply(renew("h", g.clone())).await.unwrap(),
        Outcome::Renewed(0),
        "another holder's"
    );
    assert_eq!(
        // (g[1] named twice: renewed, and counted, once.)
        s.apply(renew("g", vec![g[0], g[1], g[1], h[0], h[1], 99_999_999]))
            .await
            .unwrap(),
        Outcome::Renewed(2),
        "the holder's own reservations only"
    );
    // Between the old lease and the new one: g's unrenewed PIN and h's are past their lease.
    assert_eq!(
        s.expired_leases(1_000).await.unwrap(),
        vec![("g".to_string(), 1), ("h".to_string(), 1)]
    );
    assert_eq!(
        count(s, PinState::Reserved).await,
        4,
        "an expired lease frees nothing by itself"
    );
    assert_eq!(s.return_expired("g", 1_000).await.unwrap(), 1);
    assert_eq!(held(s, "g").await, &g[..2], "the renewed ones stay held");
    assert_eq!(held(s, "h").await, &h[..1], "another holder's expired ones stay");
    assert_eq!(s.return_expired("g", 1_000).await.unwrap(), 0, "nothing more of g's");
    assert_eq!(s.expired_leases(1_000).await.unwrap(), vec![("h".to_string(), 1)]);
    assert_eq!(
        s.expired_leases(6_000).await.unwrap(),
        vec![("g".to_string(), 2), ("h".to_string(), 1)]
    );
    assert_eq!(s.return_expired("h", 1_000).await.unwrap(), 1);
    assert_eq!(s.expired_leases(1_000).await.unwrap(), vec![]);
    assert_eq!(count(s, PinState::Reserved).await, 2);
    assert_eq!(count(s, PinState::Available).await, 18);
    // A returned PIN sells again: it is the lowest available id.
    let Outcome::Sold(a) = s.apply(sell("g", 1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(a.pin_id, g[2].min(h[0]));

    // A successful reversal, with the sale's content.
    let reverse = |amount: i64| Op::Reverse {
        sale: ctx("g", 1),
        content: Some(gift_content(amount)),
        policy: Default::default(),
    };
    let r = s.apply(reverse(777)).await;
    assert!(
        matches!(r, Err(StoreError::ReversalMismatch { field: "amount", .. })),
        "{r:?}"
    );
    assert_eq!(count(s, PinState::Voided).await, 0, "a refused reversal voids nothing");
    assert_eq!(
        s.apply(reverse(2500)).await.unwrap(),
        Outcome::Reversed(Reversal::Voided { pin_id: a.pin_id })
    );
    assert_eq!(
        s.apply(reverse(2500)).await.unwrap(),
        Outcome::Reversed(Reversal::AlreadyVoided { pin_id: a.pin_id })
    );
    assert!(matches!(
        s.apply(sell("g", 1)).await,
        Err(StoreError::AlreadyReversed { .. })
    ));
    assert_eq!(count(s, PinState::Voided).await, 1);
    // A cache sale reversed by its PIN's id: only by the gateway that sold it.
    assert_eq!(
        s.apply(Op::Confirm {
            holder: "g".into(),
            pin_id: g[0],
            sale: ctx("g", 2)
        })
        .await
        .unwrap(),
        Outcome::Confirmed(Confirmation::Sold)
    );
    let by_pin = |gateway: &str| Op::ReversePin {
        gateway: gateway.into(),
        pin_id: g[0],
    };
    assert!(matches!(s.apply(by_pin("h")).await, Err(StoreError::NotHolder { .. })));
    assert_eq!(
        s.apply(by_pin("g")).await.unwrap(),
        Outcome::Reversed(Reversal::Voided { pin_id: g[0] })
    );
    assert_eq!(
        s.apply(by_pin("g")).await.unwrap(),
        Outcome::Reversed(Reversal::AlreadyVoided { pin_id: g[0] })
    );
    assert!(matches!(
        s.apply(sell("g", 2)).await,
        Err(StoreError::AlreadyReversed { .. })
    ));
    assert_eq!(count(s, PinState::Voided).await, 2);
    assert_eq!(count(s, PinState::Sold).await, 0);
}

#[tokio::test]
async fn sqlite_leases_and_reversals() {
    let (dir, _, mut s) = sqlite("leases");
    leases_and_reversals(&mut s).await;
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn postgres_leases_and_reversals() {
    let (url, schema) = pg("leases");
    let mut s = PgStore::connect(
        &url,
        Some(&schema),
        PinCipher::from_spec(&PinCipher::generate_spec().unwrap()).unwrap(),
    )
    .await
    .unwrap();
    leases_and_reversals(&mut s).await;
    s.client()
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
