//! Every violation `pingate audit` claims to detect, each caused on purpose: a real inventory (a SQLite file, and a
//! PostgreSQL database of the test's own) and a real gateway journal, audited clean first (exit 0), then damaged the
//! least way that breaks that one invariant, as someone with write access to the database or the journal would do
//! it (disabling the trigger that refuses the edit where there is one: the edit is first shown refused), and audited
//! again through the `pingate` binary: exit 1, the violation named in the text with the PINs it concerns, and in the
//! CSV exactly the violations expected (no other invariant breaks along).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingate::crypto::PinCipher;
use pingate::gateway::journal::{CachedPin, Journal, JournalOptions, Record, SaleRecord};
use pingate::psp::PinOut;
use pingate::sale::Pin;
use pingate::store::postgres::PgStore;
use pingate::store::sqlite::SqliteStore;
use pingate::store::{Dispensed, NewPin, Op, Outcome, PinStore, SellRequest};

/// The gateway whose journal is audited, and another one.
const GW: &str = "gw1";
const OTHER_GW: &str = "gw2";

/// PINs of the inventory by what was done to them (ids as the store gave them).
#[derive(Clone, Debug)]
struct Pins {
    /// Sold on demand.
    sold: i64,
    /// Sold on demand, then reversed.
    voided: i64,
    /// Reserved to [`GW`], then confirmed: its trail is available, reserved, sold.
    confirmed: i64,
    /// Reserved to [`GW`] and cached in its journal.
    cached: Vec<i64>,
    /// Reserved to [`GW`], sold from its cache, the confirm not yet sent (the journal's `cache_sold`).
    unconfirmed: i64,
    /// Reserved to [`GW`], not (yet) in its journal: a reserve whose answer is on its way.
    in_flight: i64,
    /// Reserved to [`OTHER_GW`].
    other: Dispensed,
    /// Past its expiry date, moved to `expired`.
    expired: i64,
    /// Available.
    available: Vec<i64>,
}

/// Where the inventory is: a SQLite file, or a PostgreSQL database of this test's own.
enum Backend {
    Sqlite(PathBuf),
    Postgres {
        admin: tokio_postgres::Client,
        name: String,
        url: String,
    },
}

/// An inventory and gateway [`GW`]'s journal, in a directory of the test's own.
struct Rig {
    backend: Backend,
    dir: PathBuf,
    journal_key: String,
    pins: Pins,
}

/// A lease's end an hour from now (unix seconds).
fn in_an_hour() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs() as i64 + 3600
}

fn pin(i: usize, expiry: Option<&str>) -> NewPin {
    NewPin {
        product: "TOPUP".into(),
        amount: 1000,
        pin: Pin::new(format!("{:016}", 7_000_000 + i)),
        serial: format!("S{i:06}"),
        expiry: expiry.map(str::to_string),
        receipt: vec![format!("Top-up {i}")],
    }
}

fn sell(stan: u32) -> Op {
    Op::Sell(SellRequest {
        product: "TOPUP".into(),
        amount: 1000,
        sale: common::ctx(GW, stan),
        repeat_since: 0,
    })
}

fn reserve(holder: &str, count: usize) -> Op {
    Op::Reserve {
        holder: holder.into(),
        product: "TOPUP".into(),
        amount: 1000,
        count,
        lease_until: in_an_hour(),
    }
}

/// The inventory's history, the same on both backends: sales on demand, a reversal, reservations to two gateways,
/// a confirm, an expired PIN.
async fn history(s: &mut impl PinStore) -> (Pins, Vec<Dispensed>) {
    s.upsert_product(&common::topup(&[1000])).await.unwrap();
    let mut new: Vec<NewPin> = (0..11).map(|i| pin(i, None)).collect();
    new.push(pin(11, Some("20000101")));
    s.import_with_progress(&new, &mut |_| {}).await.unwrap();
    assert_eq!(s.expire("20260101").await.unwrap(), 1);
    let sold = |o: Outcome| match o {
        Outcome::Sold(d) => d.pin_id,
        o => panic!("{o:?}"),
    };
    let reserved = |o: Outcome| match o {
        Outcome::Reserved(d) => d,
        o => panic!("{o:?}"),
    };
    let on_demand = sold(s.apply(sell(1)).await.unwrap());
    let voided = sold(s.apply(sell(2)).await.unwrap());
    assert!(matches!(
        s.apply(Op::Reverse {
            sale: common::ctx(GW, 2),
            content: None,
            policy: Default::default(),
        })
        .await
        .unwrap(),
        Outcome::Reversed(_)
    ));
    let held = reserved(s.apply(reserve(GW, 5)).await.unwrap());
    let other = reserved(s.apply(reserve(OTHER_GW, 1)).await.unwrap()).remove(0);
    assert!(matches!(
        s.apply(Op::Confirm {
            holder: GW.into(),
            pin_id: held[0].pin_id,
            sale: common::ctx(GW, 3),
        })
        .await
        .unwrap(),
        Outcome::Confirmed(_)
    ));
    let stock = s.stock().await.unwrap();
    let available: i64 = stock
        .iter()
        .filter(|r| r.state == pingate::store::PinState::Available)
        .map(|r| r.count)
        .sum();
    assert_eq!(available, 3, "{stock:?}");
    // Ids are given in import order, from 1: the last one imported is the expired one.
    let taken: Vec<i64> = held
        .iter()
        .map(|d| d.pin_id)
        .chain([on_demand, voided, other.pin_id])
        .collect();
    assert!(taken.iter().all(|i| (1..12).contains(i)), "{taken:?}");
    let pins = Pins {
        sold: on_demand,
        voided,
        confirmed: held[0].pin_id,
        cached: vec![held[1].pin_id, held[2].pin_id],
        unconfirmed: held[3].pin_id,
        in_flight: held[4].pin_id,
        other,
        expired: 12,
        available: (1..12).filter(|i| !taken.contains(i)).collect(),
    };
    assert_eq!(pins.available.len(), 3);
    (pins, held)
}

/// The sale a cache sale with STAN `stan` is journaled with.
fn cache_sale(stan: u32) -> SaleRecord {
    let c = common::ctx(GW, stan);
    SaleRecord {
        terminal_id: c.terminal_id,
        merchant_id: c.merchant_id,
        stan: c.stan,
        transmission: c.transmission,
        rrn: c.rrn,
        product: "TOPUP".into(),
        amount: 1000,
        currency: "978".into(),
    }
}

fn cached(d: &Dispensed) -> Record {
    Record::Cached(CachedPin {
        pin: PinOut::from(d.clone()),
        lease_until: in_an_hour(),
    })
}

/// Appends `records` to the journal at `path` (created if missing), as the gateway writes them.
async fn journal(path: &Path, key: &str, records: Vec<Record>) {
    let cipher = Arc::new(PinCipher::from_spec(key).unwrap());
    let (j, _) = Journal::open(path, cipher, JournalOptions::default()).unwrap();
    j.append(records).await.unwrap();
}

impl Rig {
    async fn new(backend: &str, case: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("pingate-audit-{}-{backend}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let keys = PinCipher::generate_spec().unwrap();
        let cipher = || PinCipher::from_spec(&keys).unwrap();
        let (backend, (pins, held)) = if backend == "sqlite" {
            let path = dir.join("pins.db");
            let mut s = SqliteStore::open(&path, cipher()).unwrap();
            let h = history(&mut s).await;
            (Backend::Sqlite(path), h)
        } else {
            let name = format!("pingate_audit_{case}_{}", std::process::id());
            let (admin, url) = common::fresh_database(&name).await;
            let mut s = PgStore::connect(&url, None, cipher()).await.unwrap();
            let h = history(&mut s).await;
            (Backend::Postgres { admin, name, url }, h)
        };
        let journal_key = PinCipher::generate_spec().unwrap();
        common::write_key(&dir.join("journal.keys"), &journal_key);
        // What gateway GW holds: two PINs cached, one sold from its cache and not yet confirmed.
        journal(
            &dir.join("gw1.journal"),
            &journal_key,
            vec![
                cached(&held[1]),
                cached(&held[2]),
                cached(&held[3]),
                Record::CacheSold {
                    pin_id: held[3].pin_id,
                    sale: cache_sale(4),
                },
            ],
        )
        .await;
        Rig {
            backend,
            dir,
            journal_key,
            pins,
        }
    }

    fn db_arg(&self) -> String {
        match &self.backend {
            Backend::Sqlite(p) => format!("sqlite:{}", p.display()),
            Backend::Postgres { url, .. } => url.clone(),
        }
    }

    /// Runs `pingate audit` on the inventory and GW's journal: its exit code, its text, and the checks of the
    /// violations in its CSV with their details.
    async fn audit(&self) -> (Option<i32>, String, Vec<(String, String)>) {
        let csv = self.dir.join("audit.csv");
        let _ = std::fs::remove_file(&csv);
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args(["audit", "--db", &self.db_arg(), "--journal"])
            .arg(format!(
                "{GW},{},{}",
                self.dir.join("gw1.journal").display(),
                self.dir.join("journal.keys").display()
            ))
            .arg("--csv")
            .arg(&csv)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let violations = std::fs::read_to_string(&csv)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("violation,"))
            .map(|l| {
                let (check, detail) = l.split_once(',').unwrap();
                (
                    check.to_string(),
                    detail.trim_end_matches(",,1").trim_matches('"').to_string(),
                )
            })
            .collect();
        (o.status.code(), text, violations)
    }

    /// Runs SQL on the inventory: `sqlite` on the SQLite file, `pg` on the PostgreSQL database.
    async fn sql(&self, sqlite: &str, pg: &str) -> Result<(), String> {
        match &self.backend {
            Backend::Sqlite(p) => {
                let c = rusqlite::Connection::open(p).unwrap();
                c.execute_batch(sqlite).map_err(|e| e.to_string())
            }
            Backend::Postgres { url, .. } => {
                let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
                let task = tokio::spawn(conn);
                let r = c.batch_execute(pg).await.map_err(|e| match e.as_db_error() {
                    Some(d) => d.message().to_string(),
                    None => e.to_string(),
                });
                drop(c);
                let _ = task.await;
                r
            }
        }
    }

    /// The damage `edit`, refused by the database as it stands (the refusal contains `refusal`), done after
    /// `unguard` (`unguard_pg` on PostgreSQL).
    async fn forced(&self, edit: &str, refusal: &str, unguard: &str, unguard_pg: &str) {
        self.forced_each(edit, edit, refusal, unguard, unguard_pg).await
    }

    /// [`Rig::forced`], the edit written for each backend (`edit` on SQLite, `edit_pg` on PostgreSQL).
    async fn forced_each(&self, edit: &str, edit_pg: &str, refusal: &str, unguard: &str, unguard_pg: &str) {
        let e = self
            .sql(edit, edit_pg)
            .await
            .expect_err("the database refuses the edit");
        assert!(e.to_lowercase().contains(&refusal.to_lowercase()), "{e}");
        // In the same session: PostgreSQL's `session_replication_role` lasts as long as it.
        self.sql(&format!("{unguard}; {edit}"), &format!("{unguard_pg}; {edit_pg}"))
            .await
            .unwrap();
    }

    async fn done(self) {
        if let Backend::Postgres { admin, name, .. } = self.backend {
            common::drop_database(&admin, &name).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The damages, one per violation (and one per way where a journal check can break from either side).
#[derive(Clone, Copy, Debug)]
enum Damage {
    SaleDeleted,
    SaleOfAvailablePin,
    SecondSaleOfAPin,
    ReversalDeleted,
    HolderAndLeaseErased,
    LeaseEnded,
    StateChangedWithoutTrail,
    TrailRowDeleted,
    ExpiredPinRevived,
    PinBornSold,
    SoldPinDeleted,
    CachedPinReleasedByServer,
    JournalCachesAnotherGatewaysPin,
    UnconfirmedPinReleasedByServer,
    JournalSellsAnotherGatewaysPin,
}

/// A copy of PIN `from`'s sale, for PIN `to`, under another STAN (a sale key of its own).
fn forged_sale(from: i64, to: i64) -> String {
    format!(
        "DROP TABLE IF EXISTS forged; CREATE TEMP TABLE forged AS SELECT * FROM sales WHERE pin_id = {from}; \
         UPDATE forged SET pin_id = {to}, stan = '999999'; INSERT INTO sales SELECT * FROM forged;"
    )
}

/// Gives PIN `id` back to stock, as the server's `release` does.
fn released(id: i64) -> String {
    format!("UPDATE pins SET state = 'available', holder = NULL, lease_until = NULL WHERE id = {id}")
}

impl Damage {
    /// Does the damage; returns the violations it must cause, each with a PIN id its detail must name.
    async fn apply(self, rig: &Rig) -> Vec<(&'static str, i64)> {
        let p = &rig.pins;
        let both = |s: String| async move { rig.sql(&s, &s).await.unwrap() };
        match self {
            Damage::SaleDeleted => {
                both(format!("DELETE FROM sales WHERE pin_id = {}", p.sold)).await;
                vec![("sold-without-sale", p.sold)]
            }
            Damage::SaleOfAvailablePin => {
                both(forged_sale(p.sold, p.available[0])).await;
                vec![("sale-of-unsold-pin", p.available[0])]
            }
            Damage::SecondSaleOfAPin => {
                // The database refuses a second sale of a PIN (sales.pin_id is unique): the table is copied
                // without its constraints first.
                rig.forced(
                    &forged_sale(p.sold, p.sold),
                    "UNIQUE",
                    "CREATE TABLE sales_copy AS SELECT * FROM sales; DROP TABLE sales; \
                     ALTER TABLE sales_copy RENAME TO sales;",
                    "CREATE TABLE sales_copy AS SELECT * FROM sales; DROP TABLE sales; \
                     ALTER TABLE sales_copy RENAME TO sales;",
                )
                .await;
                vec![("sold-twice", p.sold)]
            }
            Damage::ReversalDeleted => {
                both(format!("DELETE FROM reversals WHERE pin_id = {}", p.voided)).await;
                vec![("voided-without-reversal", p.voided)]
            }
            Damage::HolderAndLeaseErased => {
                both(format!(
                    "UPDATE pins SET holder = NULL WHERE id = {}; UPDATE pins SET lease_until = NULL WHERE id = {}",
                    p.in_flight, p.other.pin_id
                ))
                .await;
                vec![
                    ("reservation-without-holder", p.in_flight),
                    ("reservation-without-holder", p.other.pin_id),
                ]
            }
            Damage::LeaseEnded => {
                both(format!("UPDATE pins SET lease_until = 1 WHERE id = {}", p.in_flight)).await;
                vec![("reservation-expired", p.in_flight)]
            }
            Damage::StateChangedWithoutTrail => {
                // An allowed edge (available to expired), with the trigger that writes the audit row removed.
                rig.sql(
                    &format!(
                        "DROP TRIGGER pins_audit_update; UPDATE pins SET state = 'expired' WHERE id = {}",
                        p.available[0]
                    ),
                    &format!(
                        "ALTER TABLE pins DISABLE TRIGGER pins_audit; \
                         UPDATE pins SET state = 'expired' WHERE id = {}",
                        p.available[0]
                    ),
                )
                .await
                .unwrap();
                vec![("trail-disagrees", p.available[0])]
            }
            Damage::TrailRowDeleted => {
                // The confirmed PIN's `available -> reserved` row taken out of its trail (available, sold). On
                // SQLite that row is the PIN's place in the record of its reservation (which names the other PINs
                // reserved with it, left as they are).
                rig.forced_each(
                    &format!(
                        "UPDATE audit SET pins = (SELECT json_group_array(j.value) FROM json_each(audit.pins) j \
                         WHERE j.value <> {id}) \
                         WHERE to_state = 'reserved' AND EXISTS (SELECT 1 FROM json_each(audit.pins) WHERE value = {id})",
                        id = p.confirmed
                    ),
                    &format!(
                        "DELETE FROM audit WHERE pin_id = {} AND to_state = 'reserved'",
                        p.confirmed
                    ),
                    "audit is append-only",
                    "DROP TRIGGER audit_no_update",
                    "ALTER TABLE audit DISABLE TRIGGER audit_append_only",
                )
                .await;
                vec![("trail-broken", p.confirmed)]
            }
            Damage::ExpiredPinRevived => {
                // Back to stock from expired, which no edge allows: the trail records it faithfully.
                rig.forced(
                    &format!("UPDATE pins SET state = 'available' WHERE id = {}", p.expired),
                    "illegal PIN state change",
                    "DROP TRIGGER pins_state_edges",
                    "ALTER TABLE pins DISABLE TRIGGER pins_state_edges",
                )
                .await;
                vec![("trail-edge-not-allowed", p.expired)]
            }
            Damage::PinBornSold => {
                // A PIN that never was in stock: inserted as sold (a copy of another's row), with a sale of its
                // own. Nothing refuses it; only its trail's first row (loaded as sold) tells. (On SQLite the copy
                // names no audit record of its own, so the trigger records its load.)
                let forge = |extra: &str| {
                    format!(
                        "DROP TABLE IF EXISTS forged_pin; \
                         CREATE TEMP TABLE forged_pin AS SELECT * FROM pins WHERE id = {}; \
                         UPDATE forged_pin SET id = 1000, serial = 'FORGED', fingerprint = nonce, state = 'sold'{extra}; \
                         INSERT INTO pins SELECT * FROM forged_pin; {}",
                        p.available[0],
                        forged_sale(p.sold, 1000)
                    )
                };
                rig.sql(&forge(", audit_seq = NULL"), &forge("")).await.unwrap();
                vec![("trail-edge-not-allowed", 1000)]
            }
            Damage::SoldPinDeleted => {
                // A sold PIN's row taken out, its sale left: the sale names a PIN that is gone, and the trail
                // names a PIN that has no row.
                rig.forced(
                    &format!("DELETE FROM pins WHERE id = {}", p.sold),
                    "PINs are never deleted",
                    // The trigger, and the foreign key from sales (PostgreSQL: every trigger, the foreign key's
                    // included).
                    "PRAGMA foreign_keys = OFF; DROP TRIGGER pins_no_delete",
                    "SET session_replication_role = replica",
                )
                .await;
                vec![("sale-of-unsold-pin", p.sold), ("pin-missing", p.sold)]
            }
            Damage::CachedPinReleasedByServer => {
                // The server has a PIN back in stock that the gateway still sells from its cache.
                both(released(p.cached[0])).await;
                vec![("journal-cache-not-reserved", p.cached[0])]
            }
            Damage::JournalCachesAnotherGatewaysPin => {
                journal(&rig.dir.join("gw1.journal"), &rig.journal_key, vec![cached(&p.other)]).await;
                vec![("journal-cache-not-reserved", p.other.pin_id)]
            }
            Damage::UnconfirmedPinReleasedByServer => {
                // The server has a PIN back in stock that the gateway sold (its confirm still to send).
                both(released(p.unconfirmed)).await;
                vec![("journal-sale-unknown", p.unconfirmed)]
            }
            Damage::JournalSellsAnotherGatewaysPin => {
                journal(
                    &rig.dir.join("gw1.journal"),
                    &rig.journal_key,
                    vec![
                        cached(&p.other),
                        Record::CacheSold {
                            pin_id: p.other.pin_id,
                            sale: cache_sale(5),
                        },
                    ],
                )
                .await;
                vec![("journal-sale-unknown", p.other.pin_id)]
            }
        }
    }
}

/// Whether `text` names PIN `id` (as a whole number).
fn names(text: &str, id: i64) -> bool {
    text.split(|c: char| !c.is_ascii_digit()).any(|t| t == id.to_string())
}

async fn audit_finds(backend: &str, case: &str, damage: Damage) {
    let rig = Rig::new(backend, case).await;
    let (code, text, found) = rig.audit().await;
    assert_eq!(code, Some(0), "undamaged:\n{text}");
    assert!(text.contains("every invariant holds") && found.is_empty(), "{text}");
    assert!(
        text.contains("2 PINs cached, 1 cache sales to confirm"),
        "the journal is read: {text}"
    );

    let expected = damage.apply(&rig).await;
    let (code, text, found) = rig.audit().await;
    assert_eq!(code, Some(1), "{damage:?}:\n{text}");
    for (check, id) in &expected {
        assert!(
            text.contains(&format!("  {check}: ")),
            "{damage:?}: {check} not named:\n{text}"
        );
        assert!(
            found.iter().any(|(c, d)| c == check && names(d, *id)),
            "{damage:?}: {check} does not name PIN {id}: {found:?}"
        );
    }
    let mut want: Vec<&str> = expected.iter().map(|(c, _)| *c).collect();
    want.dedup();
    let got: Vec<&str> = found.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(got, want, "{damage:?}: exactly these violations:\n{text}");
    rig.done().await;
}

/// One test per damage and backend.
macro_rules! damages {
    ($($name:ident => $damage:ident,)*) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::audit_finds("sqlite", stringify!($name), super::Damage::$damage).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::audit_finds("pg", stringify!($name), super::Damage::$damage).await;
                }
            )*
        }
    };
}

damages! {
    sold_without_sale => SaleDeleted,
    sale_of_unsold_pin => SaleOfAvailablePin,
    sold_twice => SecondSaleOfAPin,
    voided_without_reversal => ReversalDeleted,
    reservation_without_holder => HolderAndLeaseErased,
    reservation_expired => LeaseEnded,
    trail_disagrees => StateChangedWithoutTrail,
    trail_broken => TrailRowDeleted,
    trail_edge_not_allowed => ExpiredPinRevived,
    trail_edge_not_allowed_at_load => PinBornSold,
    pin_missing => SoldPinDeleted,
    journal_cache_not_reserved_server_side => CachedPinReleasedByServer,
    journal_cache_not_reserved_journal_side => JournalCachesAnotherGatewaysPin,
    journal_sale_unknown_server_side => UnconfirmedPinReleasedByServer,
    journal_sale_unknown_journal_side => JournalSellsAnotherGatewaysPin,
}

/// A journal damaged inside (a byte changed in a record with records after it) is not audited as if whole: the
/// audit stops with an error naming the journal (exit 2), not a clean report.
#[tokio::test]
async fn a_damaged_journal_is_an_error_not_a_clean_audit() {
    let rig = Rig::new("sqlite", "damaged_journal").await;
    assert_eq!(rig.audit().await.0, Some(0));
    let path = rig.dir.join("gw1.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    // Inside the first record's JSON (after the magic and the frame's length and checksum).
    bytes[4 + 8 + 3] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let (code, text, _) = rig.audit().await;
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("gw1.journal") && text.contains("damaged record"),
        "{text}"
    );
    rig.done().await;
}
