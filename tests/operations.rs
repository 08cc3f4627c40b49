//! Operations: metrics, health and readiness of the gateway and the PIN server.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingate::demo::rig::{
    sample_modes, sample_products, start_gateway, start_server, start_server_with, GatewayFiles, Inventory,
};
use pingate::metrics::get;
use pingate::server::ServerOptions;
use pingate::store::handle::DbUrl;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-ops-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The value of one sample line (`name{labels} value`) in an exposition.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_of_gateway_and_server() {
    let inv = Inventory::create(&dir("metrics"), &["gw1", "obs"], &sample_products(50)).unwrap();
    let server_metrics = free_addr();
    let opts = ServerOptions {
        metrics: Some(server_metrics),
        ..ServerOptions::default()
    };
    let db = DbUrl::Sqlite(inv.db.clone());
    let server = start_server_with(&inv, &db, "127.0.0.1:0".parse().unwrap(), opts.clone())
        .await
        .unwrap();
    let gw = start_gateway(&inv, "gw1", &[server.addr], 8, &sample_modes(3, 6), ("", ""))
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_metrics = l.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(pingate::metrics::serve(
        l,
        Arc::new(pingate::gateway::MetricsSource(gw.gateway.clone())),
        stop.clone(),
    ));

    let me = common::demo_terminal("DEMO0001");
    let mut t = gw.terminal().await.unwrap();
    for stan in 1..=3 {
        let s = common::demo_sale(stan, "1129180000", "GIFT-25", 2500);
        assert_eq!(t.call(&me.sale(&s, false)).await.unwrap().get_str(39), Some("00"));
    }
    let bad = common::demo_sale(9, "1129180000", "NOPE", 1);
    assert_eq!(t.call(&me.sale(&bad, false)).await.unwrap().get_str(39), Some("15"));

    // A frame that does not decode is counted too (answered 30).
    t.send_raw(bytes::Bytes::from_static(b"0200")).await.unwrap();
    assert_eq!(t.recv().await.unwrap().get_str(39), Some("30"));

    // The gateway.
    let (code, text) = get(gw_metrics, "/metrics").await.unwrap();
    assert_eq!(
        sample(&text, "pingate_gateway_requests_total{mti=\"unreadable\",code=\"30\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(code, 200);
    assert_eq!(
        sample(&text, "pingate_gateway_requests_total{mti=\"0200\",code=\"00\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pingate_gateway_requests_total{mti=\"0200\",code=\"15\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pingate_gateway_request_duration_seconds_count"),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, "pingate_gateway_sales_total{source=\"on_demand\"}"),
        Some(3.0)
    );
    assert!(sample(
        &text,
        "pingate_gateway_cache_pins{product=\"TOPUP-EU-10\",amount=\"1000\"}"
    )
    .is_some());
    assert_eq!(
        sample(&text, "pingate_gateway_server_connections{").map(|v| v > 0.0),
        Some(true),
        "{text}"
    );
    assert!(text.contains("# TYPE pingate_gateway_request_duration_seconds histogram"));
    assert_eq!(get(gw_metrics, "/healthz").await.unwrap().0, 200);
    assert_eq!(get(gw_metrics, "/readyz").await.unwrap(), (200, "ready\n".into()));
    assert_eq!(get(gw_metrics, "/nope").await.unwrap().0, 404);

    // The server: requests by operation, stock by state (read in the background), ready once it was read.
    let mut text = String::new();
    for _ in 0..200 {
        text = get(server_metrics, "/metrics").await.unwrap().1;
        if text.contains("pingate_server_stock_pins{product=\"GIFT-25\",amount=\"2500\",state=\"sold\"} 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sample(&text, "pingate_server_requests_total{op=\"sell\",result=\"ok\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "pingate_server_stock_pins{product=\"GIFT-25\",amount=\"2500\",state=\"sold\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert!(sample(&text, "pingate_server_connections").unwrap() >= 1.0);
    assert_eq!(get(server_metrics, "/readyz").await.unwrap().0, 200);

    // Without its PIN server the gateway is alive but not ready.
    server.stop().await;
    let mut ready = 200;
    for _ in 0..300 {
        ready = get(gw_metrics, "/readyz").await.unwrap().0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ready, 503);
    assert_eq!(get(gw_metrics, "/healthz").await.unwrap().0, 200);
    stop.cancel();
    gw.crash().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reconciles_a_day_and_names_every_broken_invariant() {
    let (inv, server, gw) = common::rig(&dir("audit"), 40, 3, 6, ("", "")).await;
    let scenario = pingate::traffic::scenario::Scenario::parse(
        &std::fs::read_to_string("fixtures/scenarios/contract.toml").unwrap(),
    )
    .unwrap();
    let mut t = gw.terminal().await.unwrap();
    let me = common::demo_terminal("DEMO0005");
    let results = scenario
        .run(&mut t, &me, "1129190000", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.problem.is_none()));
    assert!(gw.gateway.flush(Duration::from_secs(10)).await);

    // While the gateway runs: its journal (cache) agrees with the server, the day's sales are reported.
    let today = {
        let t = time::OffsetDateTime::now_utc();
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    };
    let journal = inv.dir.join("gateway-gw1.journal");
    let keys = inv.dir.join("journal-gw1.keys");
    let csv = inv.dir.join("audit.csv");
    let run = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args(args)
            .output()
            .unwrap()
    };
    let db_arg = format!("sqlite:{}", inv.db.display());
    let o = run(vec![
        "audit".into(),
        "--db".into(),
        db_arg.clone(),
        "--day".into(),
        today.clone(),
        "--journal".into(),
        format!("gw1,{},{}", journal.display(), keys.display()),
        "--csv".into(),
        csv.display().to_string(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("every invariant holds"), "{out}");
    // The scenario sold a top-up and a gift card (reversed later): two sales on the day, one reversal.
    assert!(
        out.contains("DEMO0005 GIFT-25 2500: 1 sales, 2500 in all, 1 reversed since"),
        "{out}"
    );
    assert!(
        out.contains("DEMO0005 TOPUP-EU-10 1000: 1 sales, 1000 in all, 0 reversed since"),
        "{out}"
    );
    assert!(out.contains("total: 2 sales, 1 reversed since, 1 standing"), "{out}");
    assert!(out.contains("reversals on") && out.contains("DEMO0005: 1"), "{out}");
    assert!(
        out.contains("gateway gw1") && out.contains("cache sales to confirm"),
        "{out}"
    );
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert!(csv_text.starts_with("section,a,b,c,value\n") && csv_text.contains("sales,DEMO0005,GIFT-25,2500,1"));
    drop(t);
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;

    // Broken on purpose, behind the server's back: each break is named, and the audit exits non-zero.
    let c = rusqlite::Connection::open(&inv.db).unwrap();
    let free: i64 = c
        .query_row("SELECT id FROM pins WHERE state = 'available' LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    c.execute(
        "INSERT INTO sales (gateway, terminal_id, stan, transmission, pin_id, merchant_id, rrn, product, amount, sold_at)
         SELECT 'gw9', 'X', '000001', '1129190000', id, 'M', 'R', product, amount, 0 FROM pins WHERE id = ?1",
        [free],
    )
    .unwrap();
    let other: i64 = c
        .query_row(
            "SELECT id FROM pins WHERE state = 'available' AND id <> ?1 LIMIT 1",
            [free],
            |r| r.get(0),
        )
        .unwrap();
    c.execute(
        "UPDATE pins SET state = 'reserved', holder = 'gw9', lease_until = 1 WHERE id = ?1",
        [other],
    )
    .unwrap();
    // A forged trail record: a sold PIN "back to available", which no edge allows.
    let sold: i64 = c
        .query_row("SELECT id FROM pins WHERE state = 'sold' LIMIT 1", [], |r| r.get(0))
        .unwrap();
    c.execute(
        "INSERT INTO audit (from_state, to_state, holder, at, pins) VALUES ('sold', 'available', NULL, 0, json_array(?1))",
        [sold],
    )
    .unwrap();
    let o = run(vec!["audit".into(), "--db".into(), db_arg]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    for check in ["trail-disagrees", "trail-edge-not-allowed", "sold-without-sale"] {
        assert!(out.contains(check) == (check != "sold-without-sale"), "{check}: {out}");
    }
    assert!(
        out.contains(&format!(
            "sale-of-unsold-pin: a sale of a PIN that is neither sold nor voided: {free} (available)"
        )),
        "{out}"
    );
    assert!(
        out.contains("reservation-expired") && out.contains(&format!("{other} held by gw9")),
        "{out}"
    );
}

/// The admin socket as a Unix socket (`admin = "./admin.sock"`, beside the configuration): made mode 0600, `pingate
/// gateway stock` and `lines` answer through it (the command line takes the path for `--admin`), and the file goes
/// at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_is_a_unix_socket_of_mode_0600_and_the_commands_work_through_it() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let inv = Inventory::create(&dir("admin-unix"), &["gw1", "obs"], &sample_products(20)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let files = GatewayFiles::write(
        &inv,
        "gw1",
        &[server.addr],
        "127.0.0.1:0".parse().unwrap(),
        2,
        &sample_modes(3, 6),
        ("admin = \"./admin.sock\"", ""),
    )
    .unwrap();
    let cfg = pingate::gateway::config::GatewayConfig::load(&files.config).unwrap();
    let socket = inv.dir.join("admin.sock");
    assert_eq!(
        cfg.admin,
        Some(pingate::gateway::admin::AdminAddr::Unix(inv.dir.join("./admin.sock")))
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gw = tokio::spawn(pingate::gateway::run(cfg, None, async {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let meta = std::fs::symlink_metadata(&socket).expect("the admin socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "only the gateway's user may ask"
    );
    let path = socket.to_str().unwrap().to_string();
    let stock: serde_json::Value =
        serde_json::from_str(&pingate::gateway::ask_admin(&path, "stock").await.unwrap()).unwrap();
    assert!(stock["cache"].is_array(), "{stock}");
    // Through the command line, as an operator asks.
    for command in ["stock", "lines"] {
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args(["gateway", command, "--admin", &path])
            .output()
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{command}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command}: {e}: {out}"));
        assert!(
            if command == "stock" {
                v["cache"].is_array()
            } else {
                v.is_object()
            },
            "{command}: {v}"
        );
    }
    stop.send(()).unwrap();
    gw.await.unwrap().unwrap();
    assert!(!socket.exists(), "the socket file goes with the gateway");
    let e = pingate::gateway::ask_admin(&path, "stock").await.unwrap_err();
    assert!(e.contains(&format!("gateway admin at {path}")), "{e}");
    server.stop().await;
}
