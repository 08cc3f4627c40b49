//! Money safety end to end (issue 18, sections 1 to 4): keys seen again outside the repeat window, reversals that do
//! not match their sale, and one terminal reaching the PIN server through several gateways. Real gateways, real TLS,
//! a real PIN server on a SQLite file (and two on one PostgreSQL).

mod common;
use common::code;

use common::{count, stock};

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pingate::demo::rig::{sample_modes, sample_products, start_gateway, start_server, GatewayHandle, Inventory};
use pingate::iso8583::Message;
use pingate::sale::PinReceipt;
use pingate::store::PinStore;
use pingate::traffic::sim::{Identity, SaleSpec};

const PREFETCH: &str = "TOPUP-EU-10";
const ON_DEMAND: &str = "GIFT-25";

/// A window of one second, so that a test can step past it; the deadline must fit in it.
const SHORT_WINDOW: &str = "repeat_window_secs = 1\nresponse_deadline_ms = 900";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-money-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn term(n: usize) -> Identity {
    common::demo_terminal(&format!("DEMO{n:04}"))
}

fn sale(stan: u32, transmission: &str, product: &str) -> SaleSpec {
    common::demo_sale(
        stan,
        transmission,
        product,
        if product == PREFETCH { 1000 } else { 2500 },
    )
}

fn pin(m: &Message) -> Option<String> {
    m.get(63)
        .and_then(|b| PinReceipt::from_tlv(b).ok())
        .map(|r| r.pin.expose().to_string())
}

async fn cached_at_least(gw: &GatewayHandle, n: usize) {
    common::cached_at_least(gw, PREFETCH, n).await
}

/// Field 7 of now, one second after the gateway's start at least: a key the gateway's cache may serve (it must be
/// newer than the second the gateway started in: `clock_skew_secs`).
async fn fresh_transmission() -> String {
    pingate::demo::rig::past_this_second().await;
    pingate::traffic::sim::now_transmission()
}

/// Steps past a one-second repeat window, and makes the gateway forget what it held (a new sale does).
async fn past_the_window(gw: &GatewayHandle, t: &mut pingate::traffic::sim::TerminalClient, me: &Identity, stan: u32) {
    assert!(gw.gateway.flush(Duration::from_secs(10)).await, "confirms acknowledged");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let now = pingate::traffic::sim::now_transmission();
    let a = t.call(&me.sale(&sale(stan, &now, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&a), "00");
}

/// Seen on a gateway from main: a second 0200 with a key sold from the cache got a second cached PIN once the
/// repeat window had passed, its confirm was refused and retried forever, and that PIN was never billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sold_before_the_window_gets_its_own_pin_again_never_a_second_one() {
    let (inv, server, gw) = common::rig(&dir("stale-key"), 100, 5, 10, (SHORT_WINDOW, "")).await;
    cached_at_least(&gw, 5).await;
    let mut t = gw.terminal().await.unwrap();
    let me = term(1);
    let t0 = fresh_transmission().await;
    let first = t.call(&me.sale(&sale(1, &t0, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&first), "00");
    assert_eq!(
        gw.gateway.stats.sales_from_cache.load(Ordering::Relaxed),
        1,
        "a cache sale"
    );
    let p = pin(&first).unwrap();
    past_the_window(&gw, &mut t, &me, 2).await;

    // The same 0200 again (a terminal that repeats as 0200, or a reset one): the sale it names, not a new one.
    let again = t.call(&me.sale(&sale(1, &t0, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&again), "00");
    assert_eq!(pin(&again).unwrap(), p, "the PIN the key bought, never a second one");
    assert_eq!(again.get_str(37), first.get_str(37), "the same RRN");
    // The same key with other content: 94, whichever mode the product is in.
    let other = t.call(&me.sale(&sale(1, &t0, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&other), "94");
    assert!(pin(&other).is_none());
    assert!(gw.gateway.stats.unsure_keys.load(Ordering::Relaxed) >= 1);

    assert!(
        gw.gateway.flush(Duration::from_secs(10)).await,
        "nothing retried forever"
    );
    assert_eq!(gw.gateway.stats.confirm_conflicts.load(Ordering::Relaxed), 0);
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "sold"), 1, "one sale, one PIN");
    assert_eq!(count(&s, PREFETCH, "reserved"), 0);
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// Seen on a gateway from main: once a sale had left the gateway's window, a 0400 naming another product and
/// amount still voided it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_beyond_the_window_must_match_its_sale() {
    let (inv, server, gw) = common::rig(&dir("reversal-match"), 100, 5, 10, (SHORT_WINDOW, "")).await;
    let mut t = gw.terminal().await.unwrap();
    let me = term(2);
    let t0 = pingate::traffic::sim::now_transmission();
    let sold = t.call(&me.sale(&sale(7, &t0, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&sold), "00");
    past_the_window(&gw, &mut t, &me, 8).await;

    // Another product and amount under the sale's key: 13, and the sale stands.
    let wrong = t.call(&me.reversal(&sale(7, &t0, PREFETCH), 9, false)).await.unwrap();
    assert_eq!(wrong.mti().as_str(), "0410");
    assert_eq!(code(&wrong), "13");
    let mut wrong_merchant = me.reversal(&sale(7, &t0, ON_DEMAND), 10, false);
    wrong_merchant.set(42, "MERCHANT0000002");
    // (The registry refuses a merchant that is not the terminal's: 58 before the server is asked.)
    assert_eq!(code(&t.call(&wrong_merchant).await.unwrap()), "58");
    let s = stock(&inv, server.addr).await;
    assert_eq!(
        count(&s, ON_DEMAND, "voided"),
        0,
        "a reversal of another sale voids nothing"
    );

    // The reversal that matches: 00, voided; a repeat of the sale then gets no PIN.
    let right = t.call(&me.reversal(&sale(7, &t0, ON_DEMAND), 11, false)).await.unwrap();
    assert_eq!(code(&right), "00");
    let repeat = t.call(&me.sale(&sale(7, &t0, ON_DEMAND), true)).await.unwrap();
    assert_eq!(code(&repeat), "12");
    assert!(pin(&repeat).is_none());
    assert_eq!(gw.gateway.stats.reversal_mismatches.load(Ordering::Relaxed), 1);
    assert!(gw.gateway.flush(Duration::from_secs(10)).await);
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "voided"), 1);
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// Two gateways in front of the same terminals (a NAC failing over): `servers[i]` is the PIN server gateway `gw{i+1}`
/// asks first.
async fn two_gateways(inv: &Inventory, servers: [std::net::SocketAddr; 2]) -> [GatewayHandle; 2] {
    let mut out = Vec::new();
    for (i, id) in ["gw1", "gw2"].into_iter().enumerate() {
        let order = [servers[i], servers[1 - i]];
        let gw = start_gateway(inv, id, &order, 4, &sample_modes(5, 10), ("", ""))
            .await
            .unwrap();
        out.push(gw);
    }
    let [a, b]: [GatewayHandle; 2] = out.try_into().ok().unwrap();
    [a, b]
}

/// Repeats and reversals find their sale whichever gateway they come through; a duplicate 0200 that a second
/// gateway serves from its cache ends in a conflict the server records and the audit reports, never in a confirm
/// retried forever. `observer` reads the shared inventory.
async fn one_terminal_through_two_gateways(
    inv: &Inventory,
    gws: [GatewayHandle; 2],
    observer: std::net::SocketAddr,
    db: &pingate::store::handle::DbUrl,
) {
    let [gw1, gw2] = gws;
    cached_at_least(&gw1, 5).await;
    cached_at_least(&gw2, 5).await;
    let (mut t1, mut t2) = (gw1.terminal().await.unwrap(), gw2.terminal().await.unwrap());
    let me = term(3);
    let t0 = fresh_transmission().await;

    // A cache sale through gw1, confirmed; its repeat through gw2 gets the same PIN (before: a second PIN).
    let first = t1.call(&me.sale(&sale(1, &t0, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&first), "00");
    assert!(gw1.gateway.flush(Duration::from_secs(10)).await);
    let repeat = t2.call(&me.sale(&sale(1, &t0, PREFETCH), true)).await.unwrap();
    assert_eq!(code(&repeat), "00");
    assert_eq!(pin(&repeat), pin(&first), "the same PIN through the other gateway");
    // Its reversal through gw2 voids it (before: a reversal that never touched the sale).
    let reversed = t2.call(&me.reversal(&sale(1, &t0, PREFETCH), 2, false)).await.unwrap();
    assert_eq!(code(&reversed), "00");
    assert!(gw2.gateway.flush(Duration::from_secs(10)).await);
    let s = stock(inv, observer).await;
    assert_eq!(count(&s, PREFETCH, "voided"), 1, "the sale made through gw1 is voided");
    let again = t2.call(&me.sale(&sale(1, &t0, PREFETCH), true)).await.unwrap();
    assert_eq!(code(&again), "12", "a reversed sale is never handed out again");
    // Nor by gw1, which still remembers the sale approved in its repeat window (before: the voided PIN again).
    let again = t1.call(&me.sale(&sale(1, &t0, PREFETCH), true)).await.unwrap();
    assert_eq!(
        code(&again),
        "12",
        "gw1 asks the server before it re-delivers from its window"
    );
    assert_eq!(pin(&again), None);

    // The same for an on-demand sale through gw1, reversed through gw2: a repeat, or a duplicate 0200, through gw1
    // gets 12, and keeps getting it.
    let od = t1.call(&me.sale(&sale(5, &t0, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&od), "00");
    let reversed = t2.call(&me.reversal(&sale(5, &t0, ON_DEMAND), 6, false)).await.unwrap();
    assert_eq!(code(&reversed), "00");
    assert!(gw2.gateway.flush(Duration::from_secs(10)).await);
    for repeat in [true, false, true] {
        let again = t1.call(&me.sale(&sale(5, &t0, ON_DEMAND), repeat)).await.unwrap();
        assert_eq!((code(&again), pin(&again)), ("12", None), "repeat: {repeat}");
    }

    // An on-demand sale through gw1 and a duplicate 0200 of it through gw2: the same PIN, from the server.
    let od = t1.call(&me.sale(&sale(3, &t0, ON_DEMAND), false)).await.unwrap();
    let dup = t2.call(&me.sale(&sale(3, &t0, ON_DEMAND), false)).await.unwrap();
    assert_eq!((code(&od), pin(&od)), (code(&dup), pin(&dup)));

    // A duplicate 0200 of a cache sale through gw2, whose cache may serve its fresh key: the confirm cannot be
    // recorded (the key is sold), so that PIN is voided and the conflict recorded; gw2 stops retrying.
    let sold = t1.call(&me.sale(&sale(4, &t0, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&sold), "00");
    assert!(gw1.gateway.flush(Duration::from_secs(10)).await);
    let dup = t2.call(&me.sale(&sale(4, &t0, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&dup), "00");
    assert!(
        gw2.gateway.flush(Duration::from_secs(10)).await,
        "a refused confirm is not retried forever"
    );
    assert_eq!(gw2.gateway.stats.confirm_conflicts.load(Ordering::Relaxed), 1);
    gw1.stop().await;
    gw2.stop().await;
    let report = pingate::audit::run(db, &[], None).await.unwrap();
    assert!(!report.ok(), "an open conflict fails the audit");
    let text = report.text();
    assert!(text.contains("confirm-conflict-open"), "{text}");
    assert_eq!(report.violations.len(), 1, "{text}");
    // The operator deals with it and says so: the audit passes again.
    let conflicts = match db {
        pingate::store::handle::DbUrl::Sqlite(p) => {
            let cipher = pingate::crypto::PinCipher::from_spec(&inv.pin_keys).unwrap();
            let mut s = pingate::store::sqlite::SqliteStore::open(p, cipher).unwrap();
            let c = s.conflicts().await.unwrap();
            s.resolve_conflict(c[0].id, "billed to the merchant", 1).await.unwrap();
            assert!(s.resolve_conflict(c[0].id, "again", 2).await.is_err(), "only open ones");
            c
        }
        pingate::store::handle::DbUrl::Postgres(u) => {
            let cipher = pingate::crypto::PinCipher::from_spec(&inv.pin_keys).unwrap();
            let mut s = pingate::store::postgres::PgStore::connect(u, None, cipher)
                .await
                .unwrap();
            let c = s.conflicts().await.unwrap();
            s.resolve_conflict(c[0].id, "billed to the merchant", 1).await.unwrap();
            c
        }
    };
    assert_eq!(conflicts.len(), 1);
    assert!(conflicts[0].voided && conflicts[0].gateway == "gw2" && conflicts[0].terminal_id == "DEMO0003");
    let report = pingate::audit::run(db, &[], None).await.unwrap();
    assert!(report.ok(), "{}", report.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_terminal_through_two_gateways_on_one_server() {
    let inv = Inventory::create(&dir("two-gw"), &["gw1", "gw2", "obs"], &sample_products(100)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gws = two_gateways(&inv, [server.addr, server.addr]).await;
    let db = pingate::store::handle::DbUrl::Sqlite(inv.db.clone());
    one_terminal_through_two_gateways(&inv, gws, server.addr, &db).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_terminal_through_two_gateways_and_two_servers_on_postgresql() {
    use pingate::crypto::PinCipher;
    use pingate::store::handle::DbUrl;
    use pingate::store::postgres::PgStore;

    let dbname = format!("pingate_money_{}", std::process::id());
    let (admin, url) = common::fresh_database(&dbname).await;
    let inv = Inventory::create(&dir("two-gw-pg"), &["gw1", "gw2", "obs"], &[]).unwrap();
    let mut pg = PgStore::connect(&url, None, PinCipher::from_spec(&inv.pin_keys).unwrap())
        .await
        .unwrap();
    for (code, amount) in [(PREFETCH, 1000), (ON_DEMAND, 2500)] {
        pg.upsert_product(&pingate::store::Product {
            code: code.into(),
            name: code.into(),
            supplier: "Telco".into(),
            currency: "978".into(),
            denominations: vec![amount],
        })
        .await
        .unwrap();
        let pins: Vec<pingate::store::NewPin> = (0..100)
            .map(|i| pingate::store::NewPin {
                product: code.into(),
                amount,
                pin: pingate::sale::Pin::new(format!("{amount}{i:012}")),
                serial: format!("{code}-{i:06}"),
                expiry: None,
                receipt: vec![],
            })
            .collect();
        pg.import_with_progress(&pins, &mut |_| {}).await.unwrap();
    }
    drop(pg);
    let db = DbUrl::parse(&url).unwrap();
    let a = pingate::demo::rig::start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let b = pingate::demo::rig::start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let gws = two_gateways(&inv, [a.addr, b.addr]).await;
    one_terminal_through_two_gateways(&inv, gws, b.addr, &db).await;
    a.stop().await;
    b.stop().await;
    common::drop_database(&admin, &dbname).await;
}
