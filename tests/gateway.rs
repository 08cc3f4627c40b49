//! The gateway end to end: simulated terminals over real TCP, the gateway, real TLS 1.3 with real certificates to
//! a PIN server on a real SQLite file. Crash tests run the gateway as its own process and kill it with SIGKILL.

mod common;
use common::code;

use common::{count, stock};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingate::demo::rig::{
    free_local_addr, sample_modes, sample_products, start_gateway, start_server, GatewayFiles, GatewayHandle,
    Inventory, ServerHandle,
};
use pingate::gateway::StartOptions;
use pingate::iso8583::Message;
use pingate::psp::client::PspClient;
use pingate::psp::{Request, Response};
use pingate::sale::PinReceipt;
use pingate::traffic::sim::{Identity, SaleSpec};
use tokio::io::AsyncWriteExt;

const PREFETCH: &str = "TOPUP-EU-10";
const ON_DEMAND: &str = "GIFT-25";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-gw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn term(n: usize) -> Identity {
    common::demo_terminal(&format!("DEMO{n:04}"))
}

thread_local! {
    /// The field 7 of a test's sales: the time of its first sale (each test runs on a thread of its own), so that
    /// its repeats name the same key, and the gateway's cache may serve it (a key far from the gateway's clock goes
    /// to the PIN server instead: `clock_skew_secs`).
    static TRANSMISSION: String = pingate::traffic::sim::now_transmission();
}

fn spec(stan: u32, product: &str) -> SaleSpec {
    let transmission = TRANSMISSION.with(|t| t.clone());
    common::demo_sale(
        stan,
        &transmission,
        product,
        if product == PREFETCH { 1000 } else { 2500 },
    )
}

fn receipt(m: &Message) -> Option<PinReceipt> {
    m.get(63).and_then(|b| PinReceipt::from_tlv(b).ok())
}

async fn setup(
    name: &str,
    pins: usize,
    low: usize,
    high: usize,
    extra: (&str, &str),
) -> (Inventory, ServerHandle, GatewayHandle) {
    common::rig(&dir(name), pins, low, high, extra).await
}

/// Waits (polling, bounded) until the gateway's cache holds at least `n` PINs of the prefetch product.
async fn cached_at_least(gw: &GatewayHandle, n: usize) {
    common::cached_at_least(gw, PREFETCH, n).await
}

#[tokio::test]
async fn sales_repeats_duplicates_reversals_and_refusals() {
    let (inv, server, gw) = setup("contract", 200, 5, 20, ("", "")).await;
    cached_at_least(&gw, 5).await;
    let mut t = gw.terminal().await.unwrap();
    let me = term(1);

    // Prefetch and on-demand sales.
    let a = t.call(&me.sale(&spec(1, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&a), "00", "{a:?}");
    assert_eq!(a.mti().as_str(), "0210");
    let pin_a = receipt(&a).expect("PIN in field 63");
    let b = t.call(&me.sale(&spec(2, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&b), "00");
    let pin_b = receipt(&b).unwrap();
    assert_ne!(pin_a.pin, pin_b.pin);
    assert_eq!(a.get_str(37).unwrap().len(), 12, "RRN");

    // 0201 repeats and duplicate 0200s get the same PIN and RRN.
    for (s, pin, rrn) in [
        (spec(1, PREFETCH), &pin_a, a.get_str(37)),
        (spec(2, ON_DEMAND), &pin_b, b.get_str(37)),
    ] {
        for repeat in [true, false] {
            let r = t.call(&me.sale(&s, repeat)).await.unwrap();
            assert_eq!(code(&r), "00");
            assert_eq!(receipt(&r).as_ref(), Some(pin), "repeat {repeat}");
            assert_eq!(r.get_str(37), rrn);
        }
    }
    // The same key with other content: 94.
    let mut other = spec(1, PREFETCH);
    other.amount = 2000;
    assert_eq!(code(&t.call(&me.sale(&other, false)).await.unwrap()), "94");

    // Reversal of a cache sale: 00, and its repeat no longer hands out the PIN.
    let r = t.call(&me.reversal(&spec(1, PREFETCH), 101, false)).await.unwrap();
    assert_eq!((r.mti().as_str(), code(&r)), ("0410", "00"));
    assert_eq!(code(&t.call(&me.sale(&spec(1, PREFETCH), true)).await.unwrap()), "12");
    // A reversal advice of an on-demand sale, twice (idempotent).
    for _ in 0..2 {
        let r = t.call(&me.reversal(&spec(2, ON_DEMAND), 102, true)).await.unwrap();
        assert_eq!((r.mti().as_str(), code(&r)), ("0430", "00"));
    }
    // A reversal with another amount than the sale: 13.
    let s3 = spec(3, ON_DEMAND);
    assert_eq!(code(&t.call(&me.sale(&s3, false)).await.unwrap()), "00");
    let mut wrong = s3.clone();
    wrong.amount = 999;
    assert_eq!(code(&t.call(&me.reversal(&wrong, 103, false)).await.unwrap()), "13");
    // A reversal that comes before its sale is remembered; the late sale is refused with 12.
    assert_eq!(
        code(&t.call(&me.reversal(&spec(4, ON_DEMAND), 104, false)).await.unwrap()),
        "00"
    );
    gw.gateway.flush(Duration::from_secs(10)).await;
    assert_eq!(code(&t.call(&me.sale(&spec(4, ON_DEMAND), false)).await.unwrap()), "12");

    // Refusals.
    let stranger = common::demo_terminal("NOBODY01");
    assert_eq!(
        code(&t.call(&stranger.sale(&spec(5, PREFETCH), false)).await.unwrap()),
        "58"
    );
    let wrong_merchant = Identity {
        terminal_id: "DEMO0001".into(),
        merchant_id: "SOMEONEELSE0001".into(),
    };
    assert_eq!(
        code(&t.call(&wrong_merchant.sale(&spec(6, PREFETCH), false)).await.unwrap()),
        "58"
    );
    assert_eq!(code(&t.call(&me.sale(&spec(7, "NOSUCH"), false)).await.unwrap()), "15");
    let mut odd = spec(8, ON_DEMAND);
    odd.amount = 1234;
    assert_eq!(code(&t.call(&me.sale(&odd, false)).await.unwrap()), "13");
    let mut no48 = me.sale(&spec(9, PREFETCH), false);
    no48.remove(48);
    assert_eq!(code(&t.call(&no48).await.unwrap()), "30");
    // Network management.
    let e = t.call(&me.network(10, "1128120000", "301")).await.unwrap();
    assert_eq!((e.mti().as_str(), code(&e)), ("0810", "00"));
    assert_eq!(
        code(&t.call(&stranger.network(11, "1128120000", "001")).await.unwrap()),
        "58"
    );

    // The server's books, once the gateway has forwarded everything: the cache sale was confirmed then voided,
    // the on-demand sale 2 voided, sale 3 sold.
    assert!(gw.gateway.flush(Duration::from_secs(10)).await);
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "voided"), 1);
    assert_eq!(count(&s, ON_DEMAND, "voided"), 1);
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1);
    assert_eq!(count(&s, PREFETCH, "sold"), 0);
    // Clean shutdown gives the cached PINs back.
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "reserved"), 0);
    assert_eq!(count(&s, PREFETCH, "available"), 199);
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// A PIN row spoiled behind the server's back (its serial, the seal's associated data, changed) in each mode: the
/// terminals still get PINs, the spoiled rows are quarantined, never sold, and the audit holds.
#[tokio::test]
async fn a_spoiled_pin_row_is_quarantined_and_terminals_still_get_pins() {
    let (inv, server, gw) = setup("quarantine", 40, 5, 10, ("", "")).await;
    cached_at_least(&gw, 5).await;
    let c = rusqlite::Connection::open(&inv.db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut spoiled = Vec::new();
    for product in [PREFETCH, ON_DEMAND] {
        // The next PIN the server will pick for this product: the lowest available.
        let id: i64 = c
            .query_row(
                "SELECT MIN(id) FROM pins WHERE product = ?1 AND state = 'available'",
                [product],
                |r| r.get(0),
            )
            .unwrap();
        c.execute("UPDATE pins SET serial = serial || 'X' WHERE id = ?1", [id])
            .unwrap();
        spoiled.push(id);
    }
    let mut t = gw.terminal().await.unwrap();
    let me = term(2);
    // More top-ups than the cache holds: refills (or misses) must pick the spoiled one.
    for stan in 1..=20 {
        let a = t.call(&me.sale(&spec(stan, PREFETCH), false)).await.unwrap();
        assert_eq!(code(&a), "00", "top-up {stan}: {a:?}");
    }
    for stan in 21..=23 {
        let a = t.call(&me.sale(&spec(stan, ON_DEMAND), false)).await.unwrap();
        assert_eq!(code(&a), "00", "gift card {stan}: {a:?}");
    }
    assert!(gw.gateway.flush(Duration::from_secs(30)).await);
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "quarantined"), 1);
    assert_eq!(count(&s, ON_DEMAND, "quarantined"), 1);
    assert_eq!(count(&s, PREFETCH, "sold"), 20);
    assert_eq!(count(&s, ON_DEMAND, "sold"), 3);
    for id in &spoiled {
        let (state, sales): (String, i64) = c
            .query_row(
                "SELECT state, (SELECT COUNT(*) FROM sales WHERE pin_id = ?1) FROM pins WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((state.as_str(), sales), ("quarantined", 0), "PIN {id}");
    }
    server.stop().await;
    common::audit_ok(&inv).await;
    // The audit lists them for the operator (not as violations).
    let r = pingate::audit::run(&pingate::store::handle::DbUrl::Sqlite(inv.db.clone()), &[], None)
        .await
        .unwrap();
    assert_eq!(r.quarantined.iter().map(|q| q.0).collect::<Vec<_>>(), spoiled);
    assert!(r
        .text()
        .contains("quarantined PINs (their rows do not decrypt; never sold; see the server's log): 2"));
    assert!(r.csv().contains(&format!("quarantined,{ON_DEMAND},2500,")));
}

#[tokio::test]
async fn several_requests_in_flight_on_one_connection_are_all_answered() {
    let (inv, server, gw) = setup("pipelined", 500, 50, 200, ("", "")).await;
    let mut t = gw.terminal().await.unwrap();
    let me = term(2);
    for i in 1..=40u32 {
        let p = if i % 2 == 0 { PREFETCH } else { ON_DEMAND };
        t.send(&me.sale(&spec(i, p), false)).await.unwrap();
    }
    let mut stans = HashSet::new();
    let mut pins = HashSet::new();
    for _ in 0..40 {
        let a = t.recv().await.unwrap();
        assert_eq!(code(&a), "00");
        stans.insert(a.get_str(11).unwrap().to_string());
        pins.insert(receipt(&a).unwrap().pin.expose().to_string());
    }
    assert_eq!(stans.len(), 40);
    assert_eq!(pins.len(), 40, "no PIN twice");
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn server_down_gets_91_cache_keeps_selling_and_nothing_is_lost() {
    let (inv, server, gw) = setup("server-down", 300, 10, 10, ("response_deadline_ms = 1500", "")).await;
    cached_at_least(&gw, 10).await;
    let addr = server.addr;
    server.stop().await;
    let mut t = gw.terminal().await.unwrap();
    let me = term(3);
    // On demand: the server is gone, the terminal hears 91 (well within its own timeout).
    let a = t.call(&me.sale(&spec(1, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&a), "91");
    // From the cache: sales go on without the server; the confirms wait.
    let mut sold = Vec::new();
    for i in 2..8 {
        let a = t.call(&me.sale(&spec(i, PREFETCH), false)).await.unwrap();
        assert_eq!(code(&a), "00");
        sold.push(receipt(&a).unwrap());
    }
    assert_eq!(gw.gateway.stock().pending_confirms, 6);
    // The server comes back on the same address: confirms and the reversal of sale 1 go through.
    let server = start_server(&inv, addr).await.unwrap();
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(30)).await);
    assert!(
        gw.gateway.flush(Duration::from_secs(30)).await,
        "{:?}",
        gw.gateway.stock()
    );
    let a = t.call(&me.sale(&spec(20, ON_DEMAND), false)).await.unwrap();
    assert_eq!(code(&a), "00");
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "sold"), 6);
    assert_eq!(count(&s, PREFETCH, "reserved"), 0);
    assert_eq!(count(&s, PREFETCH, "available"), 294);
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1);
    assert_eq!(count(&s, ON_DEMAND, "available"), 299);
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn server_restarted_mid_load_every_approved_pin_is_sold_once() {
    let (inv, server, gw) = setup("restart", 2000, 20, 100, ("response_deadline_ms = 2000", "")).await;
    let addr = server.addr;
    let gw = Arc::new(gw);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 1..=4usize {
        let mut t = gw.terminal().await.unwrap();
        tasks.spawn(async move {
            let me = term(n);
            let mut out = Vec::new();
            for i in 1..=150u32 {
                let p = if i % 3 == 0 { ON_DEMAND } else { PREFETCH };
                let a = t.call(&me.sale(&spec(i, p), false)).await.unwrap();
                out.push((p, code(&a).to_string(), receipt(&a)));
            }
            out
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await;
    let server = start_server(&inv, addr).await.unwrap();
    let mut approved: HashMap<&str, usize> = HashMap::new();
    let mut pins = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        for (p, c, r) in r.unwrap() {
            assert!(c == "00" || c == "91", "{c}");
            if c == "00" {
                *approved.entry(p).or_default() += 1;
                assert!(pins.insert(r.unwrap().pin.expose().to_string()), "a PIN sold twice");
            }
        }
    }
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(30)).await);
    assert!(gw.gateway.flush(Duration::from_secs(30)).await);
    let gw = Arc::try_unwrap(gw).ok().expect("one owner");
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    for p in [PREFETCH, ON_DEMAND] {
        let a = approved.get(p).copied().unwrap_or(0) as i64;
        assert_eq!(
            count(&s, p, "sold"),
            a,
            "{p}: every approved PIN is sold at the server, once"
        );
        assert_eq!(count(&s, p, "reserved"), 0, "{p}");
        assert_eq!(
            count(&s, p, "available") + count(&s, p, "sold") + count(&s, p, "voided"),
            2000,
            "{p}: every PIN accounted for"
        );
    }
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn malformed_truncated_oversize_and_garbage_frames_do_not_disturb_other_terminals() {
    let (inv, server, gw) = setup("garbage", 200, 5, 20, ("", "frame_timeout_ms = 300\nmax_frame = 1024")).await;
    let me = term(4);
    let mut good = gw.terminal().await.unwrap();
    // A readable MTI with a broken rest: a 0210 with 30, and the connection stays usable.
    let mut t = gw.terminal().await.unwrap();
    t.send_raw(Bytes::from_static(b"0200\xff\xff")).await.unwrap();
    let a = t.recv().await.unwrap();
    assert_eq!((a.mti().as_str(), code(&a)), ("0210", "30"));
    assert_eq!(code(&t.call(&me.sale(&spec(1, PREFETCH), false)).await.unwrap()), "00");
    // No MTI at all: nothing to answer in ISO 8583; the connection stays usable.
    t.send_raw(Bytes::from_static(b"\x00\x01garbage")).await.unwrap();
    assert_eq!(code(&t.call(&me.network(2, "1128120000", "301")).await.unwrap()), "00");
    // A keep-alive (empty frame) is echoed.
    t.send_raw(Bytes::new()).await.unwrap();
    let f = t.recv_frame().await.unwrap().unwrap();
    assert!(f.message.is_empty());
    // Oversize: the length header announces more than the cap; the connection is closed.
    let mut big = gw.terminal().await.unwrap();
    big.stream_mut().write_all(&[0xFF, 0xF0]).await.unwrap();
    assert!(big.recv_frame().await.map(|f| f.is_none()).unwrap_or(true));
    // Truncated: a frame that never completes is cut off after the frame deadline.
    let mut slow = gw.terminal().await.unwrap();
    slow.stream_mut().write_all(&[0x00, 0x40, b'0', b'2']).await.unwrap();
    assert!(slow.recv_frame().await.map(|f| f.is_none()).unwrap_or(true));
    // The well-behaved terminal never noticed.
    assert_eq!(
        code(&good.call(&me.sale(&spec(3, ON_DEMAND), false)).await.unwrap()),
        "00"
    );
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn a_thousand_concurrent_terminal_connections() {
    let (inv, server, gw) = setup("thousand", 2000, 100, 1000, ("", "")).await;
    let gw = Arc::new(gw);
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(gw.terminal().await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut t) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let me = term(1 + i % 8);
            let s = spec(1000 + i as u32, if i % 2 == 0 { PREFETCH } else { ON_DEMAND });
            let a = t.call(&me.sale(&s, false)).await.unwrap();
            (code(&a).to_string(), receipt(&a).map(|r| r.pin.expose().to_string()))
        });
    }
    let mut pins = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        let (c, p) = r.unwrap();
        assert_eq!(c, "00");
        assert!(pins.insert(p.unwrap()));
    }
    assert_eq!(pins.len(), 1000);
    let gw = Arc::try_unwrap(gw).ok().expect("one owner");
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

// ---- crash: the gateway as its own process, killed with SIGKILL ----

async fn admin_stock(admin: SocketAddr) -> serde_json::Value {
    let text = pingate::gateway::ask_admin(&admin.to_string(), "stock").await.unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn gateway_kill_9_with_a_full_cache_and_unconfirmed_sales_loses_nothing() {
    let inv = Inventory::create(&dir("kill9"), &["gw1", "obs"], &sample_products(100)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server_addr = server.addr;
    let listen = free_local_addr().unwrap();
    let admin = free_local_addr().unwrap();
    let files = GatewayFiles::write(
        &inv,
        "gw1",
        &[server_addr],
        listen,
        2,
        &sample_modes(30, 30),
        (&format!("admin = \"{admin}\""), ""),
    )
    .unwrap();
    let log = inv.dir.join("gateway.log");
    let gw = common::spawn_gateway(&files.config, &log, &[]);
    let mut t = common::connect(listen).await;
    let me = term(1);
    // Wait for a full cache.
    for _ in 0..500 {
        if admin_stock(admin).await["cache"][0]["cached"].as_u64() == Some(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(admin_stock(admin).await["cache"][0]["cached"].as_u64(), Some(30));
    // (Sales of the second the gateway started in go to the server: see `clock_skew_secs`.)
    pingate::demo::rig::past_this_second().await;
    // One on-demand sale while the server is up.
    assert_eq!(code(&t.call(&me.sale(&spec(1, ON_DEMAND), false)).await.unwrap()), "00");
    // The server goes away; ten sales from the cache, whose confirms cannot be sent.
    server.stop().await;
    let mut sold = HashSet::new();
    for i in 2..12 {
        let a = t.call(&me.sale(&spec(i, PREFETCH), false)).await.unwrap();
        assert_eq!(code(&a), "00");
        sold.insert(receipt(&a).unwrap().pin.expose().to_string());
    }
    assert_eq!(admin_stock(admin).await["pending_confirms"].as_u64(), Some(10));
    // The operator's view, through the command line.
    let out = Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(["gateway", "stock", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["pending_confirms"].as_u64(), Some(10));
    assert_eq!(shown["cache"][0]["product"], PREFETCH);
    // kill -9.
    drop(gw);
    drop(t);
    let server = start_server(&inv, server_addr).await.unwrap();
    let gw = common::spawn_gateway(&files.config, &log, &[]);
    let mut t = common::connect(listen).await;
    // A repeat of a sale made before the crash gets the same PIN (from the journal).
    let r = t.call(&me.sale(&spec(5, PREFETCH), true)).await.unwrap();
    assert_eq!(code(&r), "00");
    assert!(sold.contains(receipt(&r).unwrap().pin.expose()));
    // Every unconfirmed sale gets confirmed, and what the server says the gateway holds is what its cache holds.
    let mut settled = false;
    for _ in 0..500 {
        let g = admin_stock(admin).await;
        let s = stock(&inv, server.addr).await;
        let cached = g["cache"][0]["cached"].as_i64().unwrap();
        if g["pending_confirms"].as_u64() == Some(0)
            && count(&s, PREFETCH, "sold") == 10
            && count(&s, PREFETCH, "reserved") == cached
        {
            assert_eq!(
                count(&s, PREFETCH, "available") + cached + 10,
                100,
                "every PIN accounted for"
            );
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        settled,
        "{:?} {:?}",
        admin_stock(admin).await,
        stock(&inv, server.addr).await
    );
    // More sales from the recovered cache never repeat a PIN.
    for i in 20..30 {
        let a = t.call(&me.sale(&spec(i, PREFETCH), false)).await.unwrap();
        assert_eq!(code(&a), "00");
        assert!(
            sold.insert(receipt(&a).unwrap().pin.expose().to_string()),
            "a PIN sold twice"
        );
    }
    // SIGTERM: a clean shutdown confirms what is pending and gives the cache back.
    let pid = gw.0.id();
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let mut gw = gw;
    for _ in 0..1000 {
        if gw.0.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gw.0.try_wait().unwrap().is_some(), "gateway did not stop on SIGTERM");
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "sold"), 20);
    assert_eq!(count(&s, PREFETCH, "reserved"), 0);
    assert_eq!(count(&s, PREFETCH, "available"), 80);
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1);
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[test]
fn the_example_configuration_loads_and_mistakes_are_named() {
    use pingate::gateway::cache::Mode;
    use pingate::gateway::config::{ConfigError, GatewayConfig};
    let d = dir("config");
    let (text, path) = common::example_config(&d);
    let c = GatewayConfig::parse(&text, &path).unwrap();
    assert_eq!(c.journal, d.join("gateway.journal"));
    // The example requires MACs on its listener and its modem line, with the terminals' keys from the key file.
    assert!(c.listeners[0].mac.required() && c.serial[0].mac.required());
    let keys = c.terminal_keys.as_ref().expect("terminal keys");
    assert!(keys.keys.signing_key("TERM0001").is_some() && keys.keys.signing_key("TERM0002").is_some());
    // The journal key it read is never in its Debug form.
    assert!(c.journal_keys.is_some() && !format!("{c:?}").contains(&"ab".repeat(32)));
    assert_eq!(c.response_deadline, Duration::from_secs(15));
    assert_eq!(c.listeners.len(), 1);
    assert!(c.listeners[0].tpdu);
    assert!(c
        .terminals
        .permits("TERM0002", Some("MERCHANT0000001"), Some("TOPUP-EU-10")));
    assert!(!c
        .terminals
        .permits("TERM0002", Some("MERCHANT0000001"), Some("GIFT-25")));
    assert!(!c.terminals.permits("TERM0001", Some("OTHER"), None));
    assert_eq!(c.products[0].mode, Mode::Prefetch { low: 50, high: 2000 });
    assert_eq!(c.serial.len(), 2);
    let modem = c.serial[0].modem.as_ref().expect("a modem line");
    assert_eq!(modem.init, ["ATZ", "ATE0V1Q0", "AT&C1&D2", "ATS0=0"]);
    let pingate::gateway::config::LineLink::StxEtx(link) = &c.serial[0].link else {
        panic!("stx-etx")
    };
    assert!(
        link.send_enq && link.inter_char.is_some(),
        "modem lines ENQ; 8-bit lines are binary"
    );
    let pingate::gateway::config::LineLink::StxEtx(direct) = &c.serial[1].link else {
        panic!("stx-etx")
    };
    assert!(c.serial[1].modem.is_none() && !direct.send_enq && direct.inter_char.is_none());
    assert_eq!(c.serial[1].data_bits, 7);

    let typo = text.replace("keep_cache_on_shutdown", "keep_cache_on_shutdwn");
    let e = GatewayConfig::parse(&typo, &path).unwrap_err();
    assert!(
        matches!(e, ConfigError::Parse { .. }) && e.to_string().contains("keep_cache_on_shutdwn"),
        "{e}"
    );
    let bad = text.replace("mode = \"on_demand\"", "mode = \"sometimes\"");
    let e = GatewayConfig::parse(&bad, &path).unwrap_err();
    assert!(e.to_string().contains("product[1].mode"), "{e}");
    let bad = text.replace("low = 50", "low = 5000");
    assert!(GatewayConfig::parse(&bad, &path)
        .unwrap_err()
        .to_string()
        .contains("product[0]"));
    for (from, to, named) in [
        ("data_bits = 7", "data_bits = 6", "serial[1].data_bits"),
        ("link = \"stx-etx\"", "link = \"smoke-signals\"", "serial[0].link"),
        ("answer = \"host\"", "answer = \"maybe\"", "serial[0].answer"),
        (
            "software_parity = false",
            "software_parity = true",
            "serial[0].software_parity",
        ),
        ("name = \"counter-1\"", "name = \"modem-1\"", "serial[1].name"),
        ("max_naks = 3", "max_naks = 0", "serial[0]"),
        (
            "ack_timeout_ms = 1000",
            "ack_timeout_ms = 0",
            "serial[0].ack_timeout_ms",
        ),
        ("answer = \"host\"", "answer = \"auto\"", "serial[0].answer"),
        (
            "parity = \"even\"",
            "parity = \"even\"\nlink = \"binary2\"",
            "serial[1].link",
        ),
        (
            "parity = \"even\"",
            "parity = \"even\"\nbinary = true",
            "serial[1].binary",
        ),
    ] {
        let bad = text.replace(from, to);
        assert_ne!(bad, text, "{from}");
        let e = GatewayConfig::parse(&bad, &path).unwrap_err().to_string();
        assert!(e.contains(named), "{from} -> {e}");
    }
    let bad = text.replace("response_deadline_ms = 15000", "response_deadline_ms = 5");
    assert!(GatewayConfig::parse(&bad, &path)
        .unwrap_err()
        .to_string()
        .contains("gateway.response_deadline_ms"));
}

#[tokio::test]
async fn a_late_repeat_of_an_unconfirmed_cache_sale_gets_the_same_pin_never_a_second_one() {
    // A short repeat window (two seconds, so the deadline too): the gateway forgets answered sales once it is over,
    // except those the server does not know yet (confirm pending).
    let (inv, server, gw) = setup(
        "late-repeat",
        100,
        5,
        5,
        ("repeat_window_secs = 2\nresponse_deadline_ms = 2000", ""),
    )
    .await;
    cached_at_least(&gw, 5).await;
    let addr = server.addr;
    server.stop().await;
    let mut t = gw.terminal().await.unwrap();
    let me = term(5);
    let a = t.call(&me.sale(&spec(1, PREFETCH), false)).await.unwrap();
    assert_eq!(code(&a), "00");
    let pin = receipt(&a).unwrap();
    // Other sales push the first out of the window.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // (A key of now: one as old as the forgotten sale's could have been sold before, and would go to the server.)
    let now = common::demo_sale(2, &pingate::traffic::sim::now_transmission(), PREFETCH, 1000);
    assert_eq!(code(&t.call(&me.sale(&now, false)).await.unwrap()), "00");
    for repeat in [true, false] {
        let r = t.call(&me.sale(&spec(1, PREFETCH), repeat)).await.unwrap();
        assert_eq!(code(&r), "00");
        assert_eq!(receipt(&r).as_ref(), Some(&pin), "repeat {repeat}: the same PIN");
    }
    // Once confirmed, the server answers a late 0201 itself: still the same PIN.
    let server = start_server(&inv, addr).await.unwrap();
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(30)).await);
    assert!(gw.gateway.flush(Duration::from_secs(30)).await);
    let r = t.call(&me.sale(&spec(1, PREFETCH), true)).await.unwrap();
    assert_eq!(code(&r), "00");
    assert_eq!(receipt(&r).as_ref(), Some(&pin));
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "sold"), 2);
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// Stocks the PostgreSQL database `url` as the sample products stock SQLite: the prefetch and on-demand products,
/// `n` PINs of each, sealed with the inventory's PIN keys.
async fn stock_postgresql(inv: &Inventory, url: &str, n: usize) {
    use pingate::crypto::PinCipher;
    use pingate::store::postgres::PgStore;
    use pingate::store::{NewPin, Product};
    let mut pg = PgStore::connect(url, None, PinCipher::from_spec(&inv.pin_keys).unwrap())
        .await
        .unwrap();
    for (code, amount) in [(PREFETCH, 1000), (ON_DEMAND, 2500)] {
        pg.upsert_product(&Product {
            code: code.into(),
            name: code.into(),
            supplier: "Telco".into(),
            currency: "978".into(),
            denominations: vec![amount],
        })
        .await
        .unwrap();
        let pins: Vec<NewPin> = (0..n)
            .map(|i| NewPin {
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
}

// ---- several gateways, several PIN servers on one PostgreSQL ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_two_servers_one_postgresql_with_failover_sell_each_pin_once() {
    use pingate::store::handle::DbUrl;

    let dbname = format!("pingate_gw_{}", std::process::id());
    let (admin, url) = common::fresh_database(&dbname).await;

    // Certificates for two gateways (and the observer); the inventory in PostgreSQL.
    let inv = Inventory::create(&dir("pg-two"), &["gw1", "gw2", "obs"], &[]).unwrap();
    stock_postgresql(&inv, &url, 600).await;
    let db = DbUrl::parse(&url).unwrap();
    let a = pingate::demo::rig::start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let b = pingate::demo::rig::start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (addr_a, addr_b) = (a.addr, b.addr);
    let mut gateways = Vec::new();
    for (id, servers) in [("gw1", [addr_a, addr_b]), ("gw2", [addr_b, addr_a])] {
        let gw = start_gateway(
            &inv,
            id,
            &servers,
            4,
            &sample_modes(10, 40),
            ("response_deadline_ms = 5000", ""),
        )
        .await
        .unwrap();
        gateways.push(Arc::new(gw));
    }
    let run = |gw: Arc<GatewayHandle>, n: usize, from: u32| async move {
        let mut t = gw.terminal().await.unwrap();
        let me = term(n);
        let mut out = Vec::new();
        for i in from..from + 60 {
            let p = if i % 2 == 0 { PREFETCH } else { ON_DEMAND };
            let a = t.call(&me.sale(&spec(i, p), false)).await.unwrap();
            out.push((code(&a).to_string(), receipt(&a).map(|r| r.pin.expose().to_string())));
        }
        out
    };
    let mut pins = HashSet::new();
    let mut approved = 0;
    let mut collect = |out: Vec<(String, Option<String>)>| {
        for (c, p) in out {
            assert!(c == "00" || c == "91", "{c}");
            if c == "00" {
                approved += 1;
                assert!(pins.insert(p.unwrap()), "a PIN sold twice");
            }
        }
    };
    // Both gateways sell through both servers at once.
    let mut tasks = tokio::task::JoinSet::new();
    for (g, gw) in gateways.iter().enumerate() {
        for n in 1..=2 {
            tasks.spawn(run(gw.clone(), n + 2 * g, 1));
        }
    }
    while let Some(r) = tasks.join_next().await {
        collect(r.unwrap());
    }
    // Server A goes away: both gateways go on through B.
    a.stop().await;
    let mut tasks = tokio::task::JoinSet::new();
    for (g, gw) in gateways.iter().enumerate() {
        tasks.spawn(run(gw.clone(), 1 + 2 * g, 1000));
    }
    let mut after = 0;
    while let Some(r) = tasks.join_next().await {
        let out = r.unwrap();
        after += out.iter().filter(|(c, _)| c == "00").count();
        collect(out);
    }
    assert!(
        after >= 100,
        "failover: {after} of 120 sales approved with one server gone"
    );
    for gw in &gateways {
        assert!(gw.gateway.flush(Duration::from_secs(30)).await);
    }
    for gw in gateways {
        Arc::try_unwrap(gw).ok().expect("one owner").stop().await;
    }
    // The shared inventory: every approved PIN sold once, nothing left reserved.
    let s = stock(&inv, addr_b).await;
    let sold = count(&s, PREFETCH, "sold") + count(&s, ON_DEMAND, "sold");
    assert_eq!(sold, approved as i64);
    assert_eq!(count(&s, PREFETCH, "reserved"), 0);
    for p in [PREFETCH, ON_DEMAND] {
        assert_eq!(
            count(&s, p, "available") + count(&s, p, "sold") + count(&s, p, "voided"),
            600,
            "{p}"
        );
    }
    b.stop().await;
    let db = pingate::store::handle::DbUrl::Postgres(url.clone());
    common::audit_url_ok(&db).await;
    // The audit's checks find what they look for on PostgreSQL too: a forged trail row (sold back to available,
    // which no edge allows), written behind the server's back.
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.batch_execute(
        "INSERT INTO audit (pin_id, from_state, to_state, holder, at) \
         SELECT id, 'sold', 'available', NULL, 0 FROM pins WHERE state = 'sold' LIMIT 1",
    )
    .await
    .unwrap();
    let r = pingate::audit::run(&db, &[], None).await.unwrap();
    let checks: Vec<&str> = r.violations.iter().map(|v| v.check).collect();
    for want in ["trail-disagrees", "trail-edge-not-allowed"] {
        assert!(checks.contains(&want), "{want}: {}", r.text());
    }
    drop(c);
    common::drop_database(&admin, &dbname).await;
}

/// A TCP relay that can be switched into a black hole: bytes are read and dropped both ways (a server that hangs
/// without closing anything).
async fn relay(target: SocketAddr, hole: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w) in [(ri, wo), (ro, wi)] {
                let hole = hole.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !hole.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_hung_server_costs_a_terminal_the_deadline_then_nothing_and_no_pin_is_lost() {
    use std::sync::atomic::Ordering;
    let inv = Inventory::create(&dir("hung"), &["gw1", "obs"], &sample_products(100)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let hole = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via = relay(server.addr, hole.clone()).await;
    let gw = start_gateway(
        &inv,
        "gw1",
        &[via],
        2,
        &sample_modes(5, 5),
        ("response_deadline_ms = 1000", ""),
    )
    .await
    .unwrap();
    let mut t = gw.terminal().await.unwrap();
    let me = term(1);
    assert_eq!(code(&t.call(&me.sale(&spec(1, ON_DEMAND), false)).await.unwrap()), "00");
    hole.store(true, Ordering::SeqCst);
    // Each on-demand sale is answered 91: by the response deadline (the server answers nothing through the black
    // hole), and after a few at once, the circuit open. The test's timeout only guards against a hang (an answer
    // that never comes): how fast the answers come is the machine's, not the check.
    for i in 2..7 {
        let a = tokio::time::timeout(Duration::from_secs(60), t.call(&me.sale(&spec(i, ON_DEMAND), false)))
            .await
            .expect("answered (the deadline, or the open circuit), not left hanging")
            .unwrap();
        assert_eq!(code(&a), "91");
    }
    assert!(gw.gateway.upstream().health()[0].circuit_open);
    hole.store(false, Ordering::SeqCst);
    // The hung connections are dropped by their pings/timeouts and replaced; the queued reversals go through.
    assert!(
        gw.gateway.flush(Duration::from_secs(60)).await,
        "{:?}",
        gw.gateway.stock()
    );
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1);
    assert_eq!(
        count(&s, ON_DEMAND, "available"),
        99,
        "the unanswered sales sold nothing (or were voided)"
    );
    assert_eq!(count(&s, PREFETCH, "reserved"), 0);
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn keep_cache_on_shutdown_keeps_the_pins_for_the_next_start() {
    let (inv, server, gw) = setup("keep", 100, 8, 8, ("keep_cache_on_shutdown = true", "")).await;
    cached_at_least(&gw, 8).await;
    let config = inv.dir.join("gateway-gw1.toml");
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "reserved"), 8, "kept, not released");
    let gw = GatewayHandle::start(&config, StartOptions::default()).await.unwrap();
    assert_eq!(gw.gateway.stock().cache[0].cached, 8, "the same PINs, from the journal");
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(10)).await);
    let mut t = gw.terminal().await.unwrap();
    assert_eq!(
        code(&t.call(&term(1).sale(&spec(1, PREFETCH), false)).await.unwrap()),
        "00"
    );
    assert!(gw.gateway.flush(Duration::from_secs(10)).await);
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "sold"), 1);
    // 7 kept again, plus the refill after the sale if it landed before the stop.
    let reserved = count(&s, PREFETCH, "reserved");
    assert!(reserved == 7 || reserved == 8, "{reserved}");
    assert_eq!(count(&s, PREFETCH, "available") + reserved + 1, 100);
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn reservations_the_journal_never_saw_are_released_at_start() {
    let inv = Inventory::create(&dir("reconcile"), &["gw1", "obs"], &sample_products(100)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    stray_reservations_are_released_at_start(&inv, &server).await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// The same on PostgreSQL: the server answers which PINs it holds for the gateway from there.
#[tokio::test]
async fn reservations_the_journal_never_saw_are_released_at_start_on_postgresql() {
    let dbname = format!("pingate_gw_reconcile_{}", std::process::id());
    let (admin, url) = common::fresh_database(&dbname).await;
    let inv = Inventory::create(&dir("reconcile-pg"), &["gw1", "obs"], &[]).unwrap();
    stock_postgresql(&inv, &url, 100).await;
    let db = pingate::store::handle::DbUrl::parse(&url).unwrap();
    let server = pingate::demo::rig::start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    stray_reservations_are_released_at_start(&inv, &server).await;
    server.stop().await;
    common::audit_url_ok(&db).await;
    common::drop_database(&admin, &dbname).await;
}

/// Seven PINs reserved for gw1 behind its journal's back (a reserve whose answer never reached it); gw1 starts with
/// a cache of 5: once it has settled, the server holds for it exactly its cache, the seven back in stock.
async fn stray_reservations_are_released_at_start(inv: &Inventory, server: &ServerHandle) {
    // A reserve whose answer never reached the journal (cut off, or a crash right after): made here directly
    // with the gateway's own certificate.
    let tls = inv.gateway_tls("gw1").unwrap();
    let (c, _) = PspClient::connect(server.addr, "localhost", tls).await.unwrap();
    let Response::Reserved { pins: lost, .. } = c
        .call(Request::Reserve {
            product: PREFETCH.into(),
            amount: 1000,
            count: 7,
            lease_secs: 600,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(lost.len(), 7);
    let files = GatewayFiles::write(
        inv,
        "gw1",
        &[server.addr],
        "127.0.0.1:0".parse().unwrap(),
        1,
        &sample_modes(5, 5),
        ("", ""),
    )
    .unwrap();
    let gw = GatewayHandle::start(&files.config, StartOptions::default())
        .await
        .unwrap();
    cached_at_least(&gw, 5).await;
    assert!(gw.gateway.flush(Duration::from_secs(10)).await);
    // What the server says the gateway holds is exactly its cache: the 7 strays went back.
    let s = stock(inv, server.addr).await;
    assert_eq!(count(&s, PREFETCH, "reserved"), 5);
    assert_eq!(count(&s, PREFETCH, "available"), 95);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_terminal_connection_is_closed() {
    let (inv, server, gw) = setup("idle", 50, 5, 5, ("", "idle_timeout_ms = 1000")).await;
    let mut idle = gw.terminal().await.unwrap();
    // Nothing sent: closed after the idle timeout (the test's own timeout bounds the wait).
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.recv_frame())
        .await
        .expect("closed in time");
    assert!(matches!(closed, Ok(None) | Err(_)));
    // Other terminals are served meanwhile.
    let mut other = gw.terminal().await.unwrap();
    assert_eq!(
        code(&other.call(&term(1).sale(&spec(1, ON_DEMAND), false)).await.unwrap()),
        "00"
    );
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test]
async fn a_reload_applies_the_registry_and_watermarks_and_names_what_needs_a_restart() {
    let (inv, server, gw) = setup("reload", 200, 5, 10, ("", "")).await;
    cached_at_least(&gw, 5).await;
    let mut t = gw.terminal().await.unwrap();
    let newcomer = common::demo_terminal("NEWTERM1");
    assert_eq!(
        code(&t.call(&newcomer.sale(&spec(1, ON_DEMAND), false)).await.unwrap()),
        "58"
    );
    // The file changes: a new terminal, new watermarks, and a listener setting (which needs a restart).
    let path = inv.dir.join("gateway-gw1.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("low = 5\nhigh = 10", "low = 20\nhigh = 40").replace(
        "[[terminal]]\nid = \"DEMO0001\"",
        "[[terminal]]\nid = \"NEWTERM1\"\nmerchant = \"DEMOMERCHANT001\"\n\n[[terminal]]\nid = \"DEMO0001\"",
    ) + "";
    let text = text.replacen(
        "dialect = \"iso87-ascii-binbitmap\"",
        "dialect = \"iso87-ascii-binbitmap\"\nmax_frame = 2048",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let new = pingate::gateway::config::GatewayConfig::load(&path).unwrap();
    let r = gw.gateway.reload(&new);
    assert_eq!(r.applied.len(), 2, "{r:?}");
    assert!(
        r.applied[0].starts_with("terminal registry: 9 terminals (1 added"),
        "{r:?}"
    );
    assert!(r.applied[1].contains("modes and watermarks"), "{r:?}");
    assert_eq!(r.needs_restart, ["listener"]);
    assert_eq!(
        code(&t.call(&newcomer.sale(&spec(2, ON_DEMAND), false)).await.unwrap()),
        "00"
    );
    let level = gw
        .gateway
        .stock()
        .cache
        .into_iter()
        .find(|l| l.product == PREFETCH)
        .unwrap();
    assert_eq!((level.low, level.high), (20, 40));
    cached_at_least(&gw, 20).await;
    // Prefetch turned off: the cached PINs go back to the server.
    let off = std::fs::read_to_string(&path)
        .unwrap()
        .replace("mode = \"prefetch\"\nlow = 20\nhigh = 40", "mode = \"on_demand\"");
    std::fs::write(&path, off).unwrap();
    let r = gw
        .gateway
        .reload(&pingate::gateway::config::GatewayConfig::load(&path).unwrap());
    assert_eq!(r.applied.len(), 1, "{r:?}");
    assert!(gw.gateway.stock().cache.iter().all(|l| l.product != PREFETCH));
    let mut back = false;
    for _ in 0..300 {
        let s = stock(&inv, server.addr).await;
        if count(&s, PREFETCH, "reserved") == 0 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the cached PINs were released");
    assert_eq!(
        code(&t.call(&term(1).sale(&spec(3, PREFETCH), false)).await.unwrap()),
        "00"
    );
    drop(t);
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// SIGHUP with a configuration that has a problem: nothing of it is applied (not even its valid parts, here a new
/// terminal), the gateway goes on as before, and the log names the key and what is wrong with it.
#[tokio::test]
async fn sighup_with_a_broken_configuration_changes_nothing_and_says_why() {
    let inv = Inventory::create(&dir("sighup-broken"), &["gw1", "obs"], &sample_products(50)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let listen = free_local_addr().unwrap();
    let files = GatewayFiles::write(&inv, "gw1", &[server.addr], listen, 2, &sample_modes(3, 6), ("", "")).unwrap();
    let log = inv.dir.join("gateway.log");
    let gw = common::spawn_gateway(&files.config, &log, &[]);
    let mut t = common::connect(listen).await;
    // Once it reaches its PIN server, a listed terminal buys.
    let mut bought = false;
    for stan in 100..400 {
        if code(&t.call(&term(1).sale(&spec(stan, ON_DEMAND), false)).await.unwrap()) == "00" {
            bought = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bought, "the gateway never sold");
    let newcomer = common::demo_terminal("NEWTERM3");
    let text = std::fs::read_to_string(&files.config).unwrap();
    let broken = format!("{text}\n[[terminal]]\nid = \"NEWTERM3\"\nmerchant = \"DEMOMERCHANT001\"\n")
        .replace("[gateway]\n", "[gateway]\nresponse_deadline_ms = 5\n");
    std::fs::write(&files.config, broken).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &gw.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut logged = String::new();
    for _ in 0..500 {
        logged = std::fs::read_to_string(&log).unwrap();
        if logged.contains("SIGHUP") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        logged.contains("SIGHUP: the configuration has a problem; nothing changed")
            && logged.contains("gateway.response_deadline_ms: must be 100 to 120000"),
        "{logged}"
    );
    assert!(!logged.contains("SIGHUP: applied"), "{logged}");
    // The terminal it would have added is still refused; the others still buy.
    assert_eq!(
        code(&t.call(&newcomer.sale(&spec(1, ON_DEMAND), false)).await.unwrap()),
        "58"
    );
    assert_eq!(
        code(&t.call(&term(1).sale(&spec(2, ON_DEMAND), false)).await.unwrap()),
        "00"
    );
    drop(t);
    drop(gw);
    server.stop().await;
}

#[tokio::test]
async fn sighup_reloads_a_running_gateway_process() {
    let inv = Inventory::create(&dir("sighup"), &["gw1", "obs"], &sample_products(50)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let listen = free_local_addr().unwrap();
    let files = GatewayFiles::write(&inv, "gw1", &[server.addr], listen, 2, &sample_modes(3, 6), ("", "")).unwrap();
    let log = inv.dir.join("gateway.log");
    let gw = common::spawn_gateway(&files.config, &log, &[]);
    let mut t = common::connect(listen).await;
    let newcomer = common::demo_terminal("NEWTERM2");
    assert_eq!(
        code(&t.call(&newcomer.sale(&spec(1, ON_DEMAND), false)).await.unwrap()),
        "58"
    );
    let text = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(
        &files.config,
        format!("{text}\n[[terminal]]\nid = \"NEWTERM2\"\nmerchant = \"DEMOMERCHANT001\"\n"),
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &gw.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut approved = false;
    for stan in 2..200 {
        if code(&t.call(&newcomer.sale(&spec(stan, ON_DEMAND), false)).await.unwrap()) == "00" {
            approved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(approved, "the new terminal was admitted after SIGHUP");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("SIGHUP: applied") && logged.contains("terminal registry"),
        "{logged}"
    );
    drop(t);
    drop(gw);
    server.stop().await;
}
