//! Issue 20, §4: limits kept by the gateway, end to end over a real socket. A terminal past its sales per minute gets
//! `65`, a merchant past its value per day gets `61`, both with no PIN; the metrics show the refusals and the usage.

mod common;
use common::code;
use common::{count, stock};

use std::path::PathBuf;

const ON_DEMAND: &str = "GIFT-25";

fn dir(name: &str) -> PathBuf {
    common::fresh_dir("limits", name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_and_a_merchant_at_their_limits_get_65_and_61_and_no_pin() {
    // 2 sales a minute per terminal; 75.00 EUR a day for the merchant (three gift cards of 25.00).
    let policy =
        "clock_skew_secs = 0\n[policy]\nterminal_sales_per_minute = 2\nmerchant_value_per_day = { \"978\" = 7500 }";
    let (inv, server, gw) = common::rig(&dir("e2e"), 20, 5, 10, (policy, "")).await;
    let mut t = gw.terminal().await.unwrap();
    let t0 = pingate::traffic::sim::now_transmission();
    let sale = |stan| common::demo_sale(stan, &t0, ON_DEMAND, 2500);
    let one = common::demo_terminal("DEMO0001");
    let two = common::demo_terminal("DEMO0002");
    for stan in [1, 2] {
        assert_eq!(code(&t.call(&one.sale(&sale(stan), false)).await.unwrap()), "00");
    }
    // The terminal's third within the minute: 65, no PIN.
    let third = t.call(&one.sale(&sale(3), false)).await.unwrap();
    assert_eq!(third.mti().as_str(), "0210");
    assert_eq!(code(&third), "65");
    assert!(third.get(63).is_none(), "no PIN");
    // A 0201 with a key the gateway never saw may be a new sale at the server: it counts, and is refused too.
    let sneaky = t.call(&one.sale(&sale(6), true)).await.unwrap();
    assert_eq!(code(&sneaky), "65");
    assert!(sneaky.get(63).is_none(), "no PIN");
    // Its repeat is answered as the sale stands: 65 again, still no PIN.
    let repeat = t.call(&one.sale(&sale(3), true)).await.unwrap();
    assert_eq!(code(&repeat), "65");
    assert!(repeat.get(63).is_none());
    // Another terminal of the merchant: 25.00 more fits the merchant's 75.00, then 61.
    assert_eq!(code(&t.call(&two.sale(&sale(4), false)).await.unwrap()), "00");
    let over = t.call(&two.sale(&sale(5), false)).await.unwrap();
    assert_eq!(code(&over), "61");
    assert!(over.get(63).is_none(), "no PIN");
    // A repeat of an approved sale is not a new sale: its PIN comes back whatever the limits.
    assert_eq!(code(&t.call(&one.sale(&sale(1), true)).await.unwrap()), "00");

    let m = gw.gateway.metrics_text();
    for line in [
        "pingate_gateway_limit_refusals_total{scope=\"terminal\",kind=\"frequency\"} 2",
        "pingate_gateway_limit_refusals_total{scope=\"merchant\",kind=\"amount\"} 1",
        "pingate_gateway_merchant_value_today{merchant=\"DEMOMERCHANT001\",currency=\"978\"} 7500",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
    assert!(gw.gateway.flush(std::time::Duration::from_secs(10)).await);
    gw.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(
        count(&s, ON_DEMAND, "sold"),
        3,
        "three PINs sold, none for the refused sales"
    );
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// The example configuration's limits are read; a bad currency or a zero limit is refused, named by its key.
#[test]
fn limits_in_the_configuration_are_checked() {
    use pingate::gateway::config::GatewayConfig;
    let d = dir("config");
    let (text, path) = common::example_config(&d);
    let c = GatewayConfig::parse(&text, &path).unwrap();
    assert_eq!(c.policy.limits.terminal_sales_per_minute, Some(6));
    assert_eq!(c.policy.limits.merchant_value_per_day.get("978"), Some(&500_000));
    assert_eq!(c.policy.sales_allowance, Some((5, 0)));
    for (from, to, key) in [
        (
            "terminal_sales_per_minute = 6",
            "terminal_sales_per_minute = 0",
            "policy.terminal_sales_per_minute",
        ),
        (
            "merchant_sales_allowance = 5",
            "merchant_sales_allowance = 0",
            "policy.merchant_sales_allowance",
        ),
        (
            "merchant_sales_allowance_margin = 0",
            "merchant_sales_allowance_margin = 100001",
            "policy.merchant_sales_allowance_margin",
        ),
        (
            "merchant_value_per_day = { \"978\" = 500000 }",
            "merchant_value_per_day = { \"EUR\" = 500000 }",
            "policy.merchant_value_per_day.EUR",
        ),
    ] {
        let bad = text.replace(from, to);
        assert_ne!(bad, text, "{from}");
        let e = GatewayConfig::parse(&bad, &path).unwrap_err().to_string();
        assert!(e.contains(key), "{key} in {e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn pingate(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A merchant's limit kept by the PIN server holds across two gateways: each sells from slices the server grants,
/// and once the limit is granted out, every gateway answers 61.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchants_limit_holds_across_two_gateways_sharing_one_server() {
    use pingate::demo::rig::{past_this_second, sample_modes, sample_products, start_gateway, Inventory};
    let d = dir("two-gateways");
    let inv = Inventory::create(&d, &["gw1", "gw2", "obs"], &sample_products(20)).unwrap();
    let db = format!("sqlite:{}", inv.db.display());
    // 75.00 EUR a day for the merchant, whichever gateway its terminals reach.
    let set = pingate(&[
        "limits",
        "set",
        "--db",
        &db,
        "--merchant",
        "DEMOMERCHANT001",
        "--currency",
        "978",
        "--value-per-day",
        "7500",
    ]);
    assert!(set.contains("at most 7500"), "{set}");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let opts = pingate::server::ServerOptions {
        metrics: Some(metrics),
        ..Default::default()
    };
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let url = pingate::store::handle::DbUrl::Sqlite(inv.db.clone());
    let server = pingate::demo::rig::start_server_with(&inv, &url, any, opts)
        .await
        .unwrap();
    // Slices of 50.00: the first gateway's first sale takes 50.00 of the 75.00, the second's the 25.00 left.
    let policy = "clock_skew_secs = 0\n[policy]\nmerchant_allowance = { \"978\" = 5000 }";
    let gw1 = start_gateway(&inv, "gw1", &[server.addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    let gw2 = start_gateway(&inv, "gw2", &[server.addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    past_this_second().await;
    let t0 = pingate::traffic::sim::now_transmission();
    let sale = |stan| common::demo_sale(stan, &t0, ON_DEMAND, 2500);
    let one = common::demo_terminal("DEMO0001");
    let two = common::demo_terminal("DEMO0002");
    let (mut t1, mut t2) = (gw1.terminal().await.unwrap(), gw2.terminal().await.unwrap());
    assert_eq!(code(&t1.call(&one.sale(&sale(1), false)).await.unwrap()), "00");
    assert_eq!(code(&t2.call(&two.sale(&sale(2), false)).await.unwrap()), "00");
    assert_eq!(code(&t1.call(&one.sale(&sale(3), false)).await.unwrap()), "00");
    // 75.00 sold: both gateways refuse the next, with no PIN.
    for (t, who, stan) in [(&mut t2, &two, 4), (&mut t1, &one, 5)] {
        let over = t.call(&who.sale(&sale(stan), false)).await.unwrap();
        assert_eq!(code(&over), "61");
        assert!(over.get(63).is_none());
    }
    let show = pingate(&["limits", "show", "--db", &db]);
    assert!(
        show.contains("DEMOMERCHANT001 978: 7500 a day, 7500 granted to gateways today"),
        "{show}"
    );
    let m = gw2.gateway.metrics_text();
    assert!(
        m.contains("pingate_gateway_limit_refusals_total{scope=\"merchant_all_gateways\",kind=\"amount\"} 1"),
        "{m}"
    );
    // The PIN server's metrics show the limit and what was granted of it (read in the background, a scrape asking
    // for a fresh reading).
    let wanted = "pingate_server_merchant_value_granted_today{merchant=\"DEMOMERCHANT001\",currency=\"978\"} 7500";
    let mut text = String::new();
    for _ in 0..100 {
        text = pingate::metrics::get(metrics, "/metrics").await.unwrap().1;
        if text.contains(wanted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(text.contains(wanted), "{text}");
    assert!(
        text.contains("pingate_server_merchant_value_limit{merchant=\"DEMOMERCHANT001\",currency=\"978\"} 7500"),
        "{text}"
    );
    assert!(gw1.gateway.flush(std::time::Duration::from_secs(10)).await);
    assert!(gw2.gateway.flush(std::time::Duration::from_secs(10)).await);
    gw1.stop().await;
    gw2.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 3, "never more than the limit: 3 x 25.00");
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// Waits, if need be, for the start of the next UTC minute, so that a test of sales per minute has at least
/// `needed` seconds of one minute (the PIN server counts in fixed minutes of its clock).
async fn with_seconds_left_in_the_minute(needed: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_secs() % 60;
    if 60 - into < needed {
        let to_next =
            std::time::Duration::from_secs(60 - into) - std::time::Duration::from_nanos(now.subsec_nanos().into());
        tokio::time::sleep(to_next + std::time::Duration::from_millis(50)).await;
    }
}

/// A merchant's sales per minute kept by the PIN server hold across two gateways: each sells from counts of sales
/// the server grants it, and once the minute's sales are granted out, the next sale gets 65 whichever gateway it
/// reaches. With the server gone, a gateway sells only its margin a minute on its own, then 91.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchants_sales_per_minute_hold_across_two_gateways_and_the_margin_without_the_server() {
    use pingate::demo::rig::{sample_modes, sample_products, start_gateway, start_server, Inventory};
    const CACHED: &str = "TOPUP-EU-10";
    let d = dir("two-gateways-rate");
    let inv = Inventory::create(&d, &["gw1", "gw2", "obs"], &sample_products(20)).unwrap();
    let db = format!("sqlite:{}", inv.db.display());
    let set = pingate(&[
        "limits",
        "set",
        "--db",
        &db,
        "--merchant",
        "DEMOMERCHANT001",
        "--sales-per-minute",
        "3",
    ]);
    assert!(set.contains("at most 3 sales a minute"), "{set}");
    let server = start_server(&inv, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = server.addr;
    // Slices of 2 sales; 1 sale a minute per gateway and merchant when the server cannot be asked.
    let policy = "clock_skew_secs = 0\nresponse_deadline_ms = 3000\n[policy]\nmerchant_sales_allowance = 2\n\
                  merchant_sales_allowance_margin = 1";
    let gw1 = start_gateway(&inv, "gw1", &[addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    let gw2 = start_gateway(&inv, "gw2", &[addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    common::cached_at_least(&gw1, CACHED, 5).await;
    common::cached_at_least(&gw2, CACHED, 5).await;
    // Everything below happens within one minute of the server's clock (the same clock here).
    with_seconds_left_in_the_minute(40).await;
    let t0 = pingate::traffic::sim::now_transmission();
    let sale = |stan| common::demo_sale(stan, &t0, CACHED, 1000);
    let one = common::demo_terminal("DEMO0001");
    let two = common::demo_terminal("DEMO0002");
    let (mut t1, mut t2) = (gw1.terminal().await.unwrap(), gw2.terminal().await.unwrap());
    // gw1 is granted 2 of the 3, gw2 the 1 left.
    assert_eq!(code(&t1.call(&one.sale(&sale(1), false)).await.unwrap()), "00");
    assert_eq!(code(&t2.call(&two.sale(&sale(2), false)).await.unwrap()), "00");
    assert_eq!(code(&t1.call(&one.sale(&sale(3), false)).await.unwrap()), "00");
    // The 4th sale of the minute: 65 with no PIN, at either gateway.
    for (t, who, stan) in [(&mut t2, &two, 4), (&mut t1, &one, 5)] {
        let over = t.call(&who.sale(&sale(stan), false)).await.unwrap();
        assert_eq!(code(&over), "65", "sale {stan}");
        assert!(over.get(63).is_none(), "no PIN");
    }
    let show = pingate(&["limits", "show", "--db", &db]);
    assert!(
        show.contains("DEMOMERCHANT001: 3 sales a minute, 3 granted to gateways this minute"),
        "{show}"
    );
    for gw in [&gw1, &gw2] {
        let m = gw.gateway.metrics_text();
        assert!(
            m.contains("pingate_gateway_limit_refusals_total{scope=\"merchant_all_gateways\",kind=\"frequency\"} 1"),
            "{m}"
        );
    }
    assert!(gw1.gateway.flush(std::time::Duration::from_secs(10)).await);
    assert!(gw2.gateway.flush(std::time::Duration::from_secs(10)).await);
    // The server gone: gw1 sells its margin of 1 from its cache, then 91 (it cannot know the merchant's rate).
    server.stop().await;
    let alone = t1.call(&one.sale(&sale(6), false)).await.unwrap();
    assert_eq!(code(&alone), "00", "within the margin");
    let past = t1.call(&one.sale(&sale(7), false)).await.unwrap();
    assert_eq!(code(&past), "91", "past the margin");
    assert!(past.get(63).is_none(), "no PIN");
    // Back: the sale sold alone is confirmed like any other.
    let server = start_server(&inv, addr).await.unwrap();
    for gw in [&gw1, &gw2] {
        assert!(
            gw.gateway
                .upstream()
                .wait_connected(std::time::Duration::from_secs(30))
                .await
        );
        assert!(gw.gateway.flush(std::time::Duration::from_secs(30)).await);
    }
    gw1.stop().await;
    gw2.stop().await;
    let s = stock(&inv, server.addr).await;
    assert_eq!(count(&s, CACHED, "sold"), 4, "the limit's 3, and the margin's 1");
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// `pingate limits set --sales-per-minute` sets a merchant's sales per minute beside its value limits; `--remove`
/// without `--currency` lifts it (and only it); a value limit needs its currency, and the two kinds are not set at
/// once.
#[test]
fn sales_per_minute_are_set_shown_and_removed_from_the_command_line() {
    use pingate::demo::rig::{sample_products, Inventory};
    let d = dir("rate-cli");
    let inv = Inventory::create(&d, &["gw1"], &sample_products(2)).unwrap();
    let db = format!("sqlite:{}", inv.db.display());
    let set = |extra: &[&str]| {
        let mut args = vec!["limits", "set", "--db", &db, "--merchant", "M1"];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args(&args)
            .output()
            .unwrap()
    };
    assert!(set(&["--sales-per-minute", "30"]).status.success());
    assert!(set(&["--currency", "978", "--value-per-day", "5000"]).status.success());
    let show = pingate(&["limits", "show", "--db", &db]);
    assert!(
        show.contains("M1 978: 5000 a day, 0 granted to gateways today"),
        "{show}"
    );
    assert!(
        show.contains("M1: 30 sales a minute, 0 granted to gateways this minute"),
        "{show}"
    );
    for bad in [
        &["--sales-per-minute", "100001"][..],
        &["--sales-per-minute", "5", "--currency", "978"],
        &["--value-per-day", "5000"],
        &["--currency", "978"],
    ] {
        let o = set(bad);
        assert!(!o.status.success(), "{bad:?} accepted");
    }
    let removed = set(&["--remove"]);
    assert!(removed.status.success());
    assert!(String::from_utf8_lossy(&removed.stdout).contains("no limit of sales per minute"));
    let show = pingate(&["limits", "show", "--db", &db]);
    assert!(!show.contains("sales a minute"), "{show}");
    assert!(show.contains("M1 978: 5000 a day"), "the value limit stays: {show}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The same across two PIN servers sharing one PostgreSQL, each gateway on its own server: the merchant's 3 sales a
/// minute hold across both, the 4th gets 65 wherever it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchants_sales_per_minute_hold_across_two_servers_sharing_postgresql() {
    use pingate::crypto::PinCipher;
    use pingate::demo::rig::{sample_modes, start_gateway, start_server_on, Inventory};
    use pingate::store::handle::DbUrl;
    use pingate::store::postgres::PgStore;
    use pingate::store::{NewPin, Product};
    let dbname = format!("pingate_rate_{}", std::process::id());
    let (admin, url) = common::fresh_database(&dbname).await;
    let inv = Inventory::create(&dir("pg-rate"), &["gw1", "gw2", "obs"], &[]).unwrap();
    {
        let mut pg = PgStore::connect(&url, None, PinCipher::from_spec(&inv.pin_keys).unwrap())
            .await
            .unwrap();
        for (code, amount) in [("TOPUP-EU-10", 1000), (ON_DEMAND, 2500)] {
            pg.upsert_product(&Product {
                code: code.into(),
                name: code.into(),
                supplier: "Telco".into(),
                currency: "978".into(),
                denominations: vec![amount],
            })
            .await
            .unwrap();
            let pins: Vec<NewPin> = (0..20)
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
    let set = pingate(&[
        "limits",
        "set",
        "--db",
        &url,
        "--merchant",
        "DEMOMERCHANT001",
        "--sales-per-minute",
        "3",
    ]);
    assert!(set.contains("at most 3 sales a minute"), "{set}");
    let db = DbUrl::parse(&url).unwrap();
    let a = start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let b = start_server_on(&inv, &db, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Slices of 1: every sale asks its own server.
    let policy = "clock_skew_secs = 0\n[policy]\nmerchant_sales_allowance = 1";
    let gw1 = start_gateway(&inv, "gw1", &[a.addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    let gw2 = start_gateway(&inv, "gw2", &[b.addr], 4, &sample_modes(5, 10), (policy, ""))
        .await
        .unwrap();
    with_seconds_left_in_the_minute(30).await;
    let t0 = pingate::traffic::sim::now_transmission();
    let sale = |stan| common::demo_sale(stan, &t0, ON_DEMAND, 2500);
    let one = common::demo_terminal("DEMO0001");
    let two = common::demo_terminal("DEMO0002");
    let (mut t1, mut t2) = (gw1.terminal().await.unwrap(), gw2.terminal().await.unwrap());
    assert_eq!(code(&t1.call(&one.sale(&sale(1), false)).await.unwrap()), "00");
    assert_eq!(code(&t2.call(&two.sale(&sale(2), false)).await.unwrap()), "00");
    assert_eq!(code(&t2.call(&two.sale(&sale(3), false)).await.unwrap()), "00");
    for (t, who, stan) in [(&mut t1, &one, 4), (&mut t2, &two, 5)] {
        let over = t.call(&who.sale(&sale(stan), false)).await.unwrap();
        assert_eq!(code(&over), "65", "sale {stan}");
        assert!(over.get(63).is_none(), "no PIN");
    }
    let show = pingate(&["limits", "show", "--db", &url]);
    assert!(
        show.contains("DEMOMERCHANT001: 3 sales a minute, 3 granted to gateways this minute"),
        "{show}"
    );
    gw1.stop().await;
    gw2.stop().await;
    let s = stock(&inv, a.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 3, "never more than the limit");
    a.stop().await;
    b.stop().await;
    common::drop_database(&admin, &dbname).await;
}
