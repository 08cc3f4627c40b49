//! Issue 20, §5: the reversal window end to end, over real sockets. A sale made through one gateway and reversed
//! through another after the PIN server's window gets `21` and its PIN stays sold; one within the window is
//! reversed and listed for the supplier's deactivation; the gateway's metrics show the reversal rates.

mod common;
use common::code;
use common::{count, stock};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pingate::demo::rig::{
    past_this_second, sample_modes, sample_products, start_gateway, start_server_with, Inventory,
};
use pingate::server::ServerOptions;
use pingate::store::handle::DbUrl;
use pingate::store::PinStore;

const ON_DEMAND: &str = "GIFT-25";

fn dir(name: &str) -> PathBuf {
    common::fresh_dir("reversal-policy", name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_after_the_window_gets_21_through_another_gateway_and_the_pin_stays_sold() {
    let d = dir("window");
    let inv = Inventory::create(&d, &["gw1", "gw2", "obs"], &sample_products(20)).unwrap();
    let opts = ServerOptions {
        reversal_window: Some(Duration::from_secs(600)),
        ..ServerOptions::default()
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = start_server_with(&inv, &DbUrl::Sqlite(inv.db.clone()), any, opts)
        .await
        .unwrap();
    // Both gateways hold the same window as the server (a `[policy]` table after the `[gateway]` keys).
    let policy = "clock_skew_secs = 0\n[policy]\nreversal_window_secs = 600";
    let gw1 = start_gateway(&inv, "gw1", &[server.addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    let gw2 = start_gateway(&inv, "gw2", &[server.addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    past_this_second().await;
    let me = common::demo_terminal("DEMO0002");
    let t0 = pingate::traffic::sim::now_transmission();
    let sale = |stan| common::demo_sale(stan, &t0, ON_DEMAND, 2500);
    let mut t1 = gw1.terminal().await.unwrap();
    for stan in [1, 2] {
        let sold = t1.call(&me.sale(&sale(stan), false)).await.unwrap();
        assert_eq!(code(&sold), "00");
    }
    assert!(gw1.gateway.flush(Duration::from_secs(10)).await);

    // Sale 1 was made an hour ago, as far as the PIN server (which keeps every sale's time) knows.
    let db = rusqlite::Connection::open(&inv.db).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let n = db
        .execute(
            "UPDATE sales SET sold_at = sold_at - 3600 WHERE terminal_id = 'DEMO0002' AND stan = '000001'",
            [],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(db);

    // Through gw2, which never saw either sale: the server decides. Sale 1: 21, nothing reversed.
    let mut t2 = gw2.terminal().await.unwrap();
    let late = t2.call(&me.reversal(&sale(1), 3, false)).await.unwrap();
    assert_eq!(late.mti().as_str(), "0410");
    assert_eq!(code(&late), "21");
    // Sale 2, within the window: reversed.
    let ok = t2.call(&me.reversal(&sale(2), 4, false)).await.unwrap();
    assert_eq!(code(&ok), "00");
    assert!(gw2.gateway.flush(Duration::from_secs(10)).await);
    // Through gw2 (which asks the server): a repeat of sale 1 still gets its PIN (it stands); sale 2's gets none.
    let again = t2.call(&me.sale(&sale(1), true)).await.unwrap();
    assert_eq!(code(&again), "00");
    let gone = t2.call(&me.sale(&sale(2), true)).await.unwrap();
    assert_eq!(code(&gone), "12");

    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1);
    assert_eq!(count(&s, ON_DEMAND, "voided"), 1);
    // The gateways' metrics: the late reversal counted at gw2, and the merchant's sales and reversals.
    let m2 = gw2.gateway.metrics_text();
    assert!(m2.contains("pingate_gateway_reversals_too_late_total 1"), "{m2}");
    assert!(
        m2.contains("pingate_gateway_merchant_reversals_total{merchant=\"DEMOMERCHANT001\"} 1"),
        "{m2}"
    );
    assert!(
        m2.contains("pingate_gateway_top_terminal_reversals{terminal=\"DEMO0002\""),
        "{m2}"
    );
    let m1 = gw1.gateway.metrics_text();
    assert!(
        m1.contains("pingate_gateway_merchant_sales_total{merchant=\"DEMOMERCHANT001\"} 2"),
        "{m1}"
    );
    gw1.stop().await;
    gw2.stop().await;
    server.stop().await;

    // The deactivation list: the one voided PIN, by its serial, with its terminal and merchant.
    let store = pingate::store::sqlite::SqliteStore::open(&inv.db, pingate::crypto::PinCipher::without_keys()).unwrap();
    let voided = store.voided(0, false).await.unwrap();
    assert_eq!(voided.len(), 1, "{voided:?}");
    assert_eq!(voided[0].terminal_id, "DEMO0002");
    assert_eq!(voided[0].reason, "terminal");
    assert_eq!(voided[0].product, ON_DEMAND);
    drop(store);
    common::audit_ok(&inv).await;
}

/// The annotated example sets the window; a value out of its range is refused, named by its key.
#[test]
fn the_example_configuration_sets_the_reversal_window_and_its_range_is_checked() {
    use pingate::gateway::config::GatewayConfig;
    let d = dir("config");
    let (text, path) = common::example_config(&d);
    let c = GatewayConfig::parse(&text, &path).unwrap();
    assert_eq!(c.policy.reversal_window, Some(Duration::from_secs(900)));
    let bad = text.replace("reversal_window_secs = 900", "reversal_window_secs = 5");
    assert_ne!(bad, text);
    let e = GatewayConfig::parse(&bad, &path).unwrap_err().to_string();
    assert!(e.contains("policy.reversal_window_secs"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Seen on main: with a reversal window, a gateway that did not know the sale answered `00` to a reversal while the
/// PIN server could not be asked, and the server later refused it as too late: the terminal was told "reversed" of a
/// sale that stands. Now it answers `91` and sends the reversal on; the terminal's repeat gets the server's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_the_server_cannot_judge_now_gets_91_and_its_repeat_the_servers_answer() {
    let d = dir("unjudged");
    let inv = Inventory::create(&d, &["gw1", "gw2", "obs"], &sample_products(20)).unwrap();
    let opts = || ServerOptions {
        reversal_window: Some(Duration::from_secs(600)),
        ..ServerOptions::default()
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let db = DbUrl::Sqlite(inv.db.clone());
    let server = start_server_with(&inv, &db, any, opts()).await.unwrap();
    let addr = server.addr;
    let policy = "clock_skew_secs = 0\nresponse_deadline_ms = 2000\n[policy]\nreversal_window_secs = 600";
    let gw1 = start_gateway(&inv, "gw1", &[addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    let gw2 = start_gateway(&inv, "gw2", &[addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    past_this_second().await;
    let me = common::demo_terminal("DEMO0003");
    let t0 = pingate::traffic::sim::now_transmission();
    let sale = |stan| common::demo_sale(stan, &t0, ON_DEMAND, 2500);
    let mut t1 = gw1.terminal().await.unwrap();
    assert_eq!(code(&t1.call(&me.sale(&sale(1), false)).await.unwrap()), "00");
    assert!(gw1.gateway.flush(Duration::from_secs(10)).await);
    let conn = rusqlite::Connection::open(&inv.db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let n = conn
        .execute(
            "UPDATE sales SET sold_at = sold_at - 3600 WHERE terminal_id = 'DEMO0003' AND stan = '000001'",
            [],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);

    // The server is down: gw2, which never saw the sale, cannot tell whether it is within the window.
    server.stop().await;
    let mut t2 = gw2.terminal().await.unwrap();
    let unjudged = t2.call(&me.reversal(&sale(1), 2, false)).await.unwrap();
    assert_eq!(code(&unjudged), "91", "not an approval the server may refuse");

    // The server is back: the reversal sent on is refused as too late, and the terminal's repeat learns it.
    let server = start_server_with(&inv, &db, addr, opts()).await.unwrap();
    assert!(
        gw2.gateway.flush(Duration::from_secs(20)).await,
        "the reversal was sent on"
    );
    let repeat = t2.call(&me.reversal(&sale(1), 2, false)).await.unwrap();
    assert_eq!(code(&repeat), "21");
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1, "the sale stands");
    assert_eq!(count(&s, ON_DEMAND, "voided"), 0);
    gw1.stop().await;
    gw2.stop().await;
    server.stop().await;
}
