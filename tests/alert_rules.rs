//! The alert rules an operator deploys (`deploy/prometheus/pingate-rules.yml`): valid, passing their own unit tests
//! under the real `promtool` (Debian package `prometheus`), and naming only metrics that a running gateway and PIN
//! server really expose.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use pingate::demo::rig::{sample_modes, sample_products, start_gateway, start_server_with, Inventory};
use pingate::metrics::get;
use pingate::server::ServerOptions;
use pingate::store::handle::DbUrl;

const RULES: &str = "deploy/prometheus/pingate-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/pingate-rules.test.yml";

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("promtool (Debian package `prometheus`) is needed for this test: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn rules_are_valid_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", RULES]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every metric name (`pingate_…`) in the rules' expressions.
fn names_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES)).unwrap();
    let mut names = BTreeSet::new();
    let mut in_expr = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("expr:") {
            in_expr = true;
        } else if !line.starts_with("          ") || t.starts_with("for:") || t.starts_with("labels:") {
            in_expr = false;
        }
        if !in_expr {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("pingate_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running PIN server and gateway (with metrics endpoints) after a few requests, scraped once each over HTTP:
/// (gateway's text, server's text). `name` keeps each test's inventory apart.
async fn live_scrapes(name: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("pingate-alert-rules-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(20)).unwrap();
    let server_metrics = free_addr();
    let opts = ServerOptions {
        metrics: Some(server_metrics),
        ..ServerOptions::default()
    };
    let server = start_server_with(
        &inv,
        &DbUrl::Sqlite(inv.db.clone()),
        "127.0.0.1:0".parse().unwrap(),
        opts,
    )
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
    // Samples in the labelled families and the histograms: a sale, a refused one, a frame that does not decode.
    let me = common::demo_terminal("DEMO0001");
    let mut t = gw.terminal().await.unwrap();
    let sale = common::demo_sale(1, "1129180000", "GIFT-25", 2500);
    assert_eq!(t.call(&me.sale(&sale, false)).await.unwrap().get_str(39), Some("00"));
    let bad = common::demo_sale(2, "1129180000", "NOPE", 1);
    assert_eq!(t.call(&me.sale(&bad, false)).await.unwrap().get_str(39), Some("15"));
    t.send_raw(bytes::Bytes::from_static(b"0200")).await.unwrap();
    assert_eq!(t.recv().await.unwrap().get_str(39), Some("30"));
    let gateway_text = get(gw_metrics, "/metrics").await.unwrap().1;
    // The server reads its stock in the background: wait until it is there.
    let mut server_text = String::new();
    for _ in 0..200 {
        server_text = get(server_metrics, "/metrics").await.unwrap().1;
        if server_text.contains("pingate_server_stock_pins{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    (gateway_text, server_text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_name_only_metrics_the_binaries_expose() {
    let names = names_in_rules();
    assert!(names.len() >= 10, "{names:?}");
    let (gateway_text, server_text) = live_scrapes("names").await;
    let exposed: BTreeSet<String> = [&gateway_text, &server_text]
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = names.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "rules name metrics no binary exposes: {missing:?}\nexposed: {exposed:?}"
    );
}

/// `promtool check metrics` on `text` (its standard input): whether it passed, and what it said.
fn promtool_check_metrics(text: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (Debian package `prometheus`) is needed for this test: {e}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_live_scrape_of_each_process() {
    // The check itself can fail: a counter without `_total` and a malformed line are findings.
    let (ok, said) = promtool_check_metrics("# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n");
    assert!(!ok, "promtool passed a counter without _total: {said}");
    let (ok, said) = promtool_check_metrics("x_requests{a=\"1} 1\n");
    assert!(!ok, "promtool passed a malformed line: {said}");
    let (gateway_text, server_text) = live_scrapes("promtool").await;
    for (who, text, must_show) in [
        (
            "gateway",
            &gateway_text,
            [
                "pingate_gateway_requests_total{",
                "pingate_gateway_request_duration_seconds_bucket{le=\"+Inf\"}",
                "pingate_gateway_cache_pins{",
            ],
        ),
        (
            "PIN server",
            &server_text,
            [
                "pingate_server_requests_total{",
                "pingate_server_request_duration_seconds_bucket{le=\"+Inf\"}",
                "pingate_server_stock_pins{",
            ],
        ),
    ] {
        for m in must_show {
            assert!(text.contains(m), "the {who}'s scrape has no {m}:\n{text}");
        }
        let (ok, said) = promtool_check_metrics(text);
        assert!(
            ok,
            "promtool check metrics on the {who}'s scrape:\n{said}\n--- scrape:\n{text}"
        );
    }
}
