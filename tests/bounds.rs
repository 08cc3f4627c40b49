//! What traffic, an outage or a hostile peer cannot make grow: the gateway's log (its volume and its lines) and
//! its memory per connection under 10,000 requests on one connection and a PIN server outage under load; the PIN
//! server's connection slots under a flood of idle sockets; a terminal listener's connections that never send a
//! frame. Real processes and sockets, real TLS.

mod common;
use common::code;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pingate::demo::rig::{free_local_addr, sample_modes, sample_products, start_server, GatewayFiles, Inventory};

const ON_DEMAND: &str = "GIFT-25";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-bounds-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Lines of `message` in `log`, summaries left out.
fn logged(log: &str, message: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(message) && !l.contains(" more in the last "))
        .count() as u64
}

/// The number `N` of every `(N more in the last …)` summary of `message` in `log`.
fn summarised(log: &str, message: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let at = l.find(" more in the last ")?;
            let open = l[..at].rfind('(')?;
            l[open + 1..at].parse::<u64>().ok()
        })
        .sum()
}

/// 10,000 requests on one terminal connection, then a PIN server outage under load (every on-demand sale fails,
/// each a warning): the gateway's log stays short (one line and one summary per kind of warning and interval, no
/// line longer than a few KB) and the connection's memory does not grow with its request count (its span's
/// fields do not pile up; the process's resident memory is read before and after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_and_an_outage_under_load_keep_the_log_and_memory_bounded() {
    const NOT_ANSWERED: &str = "sale not answered by the PIN server";
    let inv = Inventory::create(&dir("logs"), &["gw1", "obs"], &sample_products(100)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server_addr = server.addr;
    let listen = free_local_addr().unwrap();
    let files = GatewayFiles::write(
        &inv,
        "gw1",
        &[server_addr],
        listen,
        32,
        &sample_modes(5, 10),
        ("response_deadline_ms = 3000", ""),
    )
    .unwrap();
    let log_path = inv.dir.join("gateway.log");
    let gw = common::spawn_gateway(
        &files.config,
        &log_path,
        // One malloc arena: what the tasks of other worker threads touch does not show as this connection's growth.
        &[("MALLOC_ARENA_MAX", "1")],
    );
    let pid = gw.0.id();
    let mut t = common::connect(listen).await;
    let me = common::demo_terminal("DEMO0001");
    let transmission = "1130120000";
    let mut sale = None;
    // Every on-demand sale that fails is a warning, those before the gateway reaches the PIN server too.
    let mut failed = 0u64;
    for stan in 900_000..900_500u32 {
        // A new STAN each time: a repeat of a failed sale would get its answer again.
        let a = t
            .call(&me.sale(&common::demo_sale(stan, transmission, ON_DEMAND, 2500), false))
            .await
            .unwrap();
        if code(&a) == "00" {
            sale = Some(a);
            break;
        }
        failed += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sale.is_some(), "the gateway never reached the PIN server");

    // 10,000 requests on this one connection (echo tests: every one carries the terminal id, none takes a PIN).
    let mut rss = Vec::new();
    for stan in 1..=10_000u32 {
        let a = t.call(&me.network(stan, transmission, "301")).await.unwrap();
        assert_eq!(code(&a), "00");
        if stan == 2_000 || stan == 10_000 {
            rss.push(pingate::traffic::procfs::rss_kib(pid).unwrap());
        }
    }
    let before_outage = std::fs::metadata(&log_path).unwrap().len();

    // The outage, under load: on-demand sales on the long-lived connection and on 16 more (the load generator).
    server.stop().await;
    for stan in 2..=201u32 {
        let a = t
            .call(&me.sale(&common::demo_sale(stan, transmission, ON_DEMAND, 2500), false))
            .await
            .unwrap();
        assert_eq!(code(&a), "91");
        failed += 1;
    }
    let dialect = Arc::new(
        pingate::iso8583::Dialects::builtin()
            .get(pingate::traffic::sim::DIALECT)
            .unwrap()
            .clone(),
    );
    let load = pingate::traffic::load::run(
        pingate::traffic::load::LoadSpec {
            addr: listen,
            framing: pingate::traffic::sim::FRAMING,
            tpdu: None,
            connections: 16,
            in_flight: 4,
            rate: None,
            duration: Duration::from_secs(3),
            terminal_prefix: "DEMO".into(),
            merchant: pingate::traffic::sim::MERCHANT.into(),
            mix: vec![pingate::traffic::load::MixItem::parse("GIFT-25:2500").unwrap()],
            transmission: Some("1130130000".into()),
            progress: None,
        },
        dialect,
    )
    .await
    .unwrap();
    assert_eq!(load.codes.keys().collect::<Vec<_>>(), ["91"], "{:?}", load.codes);
    failed += load.codes["91"];
    assert!(failed > 1_000, "under load: {failed} sales failed");

    // No line carries the connection's history (with the 10,000 requests' terminal ids it was 200 KB).
    let longest = |log: &[u8]| log.split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap_or(0);
    let during = longest(&std::fs::read(&log_path).unwrap());
    assert!(during < 2_048, "a log line of {during} bytes");

    // What was only counted is written when its interval ends (10 s): wait for it, with a generous bound.
    for _ in 0..600 {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if logged(&log, NOT_ANSWERED) + summarised(&log, NOT_ANSWERED) >= failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(gw);

    let log = std::fs::read(&log_path).unwrap();
    let longest = longest(&log);
    let outage_bytes = log.len() as u64 - before_outage;
    let log = String::from_utf8_lossy(&log).into_owned();
    let lines = logged(&log, NOT_ANSWERED);
    let counted = summarised(&log, NOT_ANSWERED);
    eprintln!(
        "log: {} bytes, {outage_bytes} from the outage on, {} lines, longest {longest} bytes; {failed} failed sales: \
         {lines} lines, {counted} counted; RSS after 2,000 and 10,000 requests: {rss:?} KiB",
        log.len(),
        log.lines().count()
    );
    assert!(longest < 2_048, "a log line of {longest} bytes");
    assert!(
        outage_bytes < 64 * 1024,
        "{outage_bytes} bytes of log for {failed} failed sales"
    );
    assert!((1..=4).contains(&lines), "{lines} lines for {failed} failed sales");
    assert_eq!(lines + counted, failed, "every failed sale is logged or counted");
    // The connection does not grow with its requests: 8,000 more cost the process less than 16 bytes each (when
    // its span kept every terminal id recorded, they cost 36: 284 KiB).
    assert!(
        rss[1] < rss[0] + 8_000 * 16 / 1024,
        "resident memory grew from {} to {} KiB over 8,000 requests on one connection",
        rss[0],
        rss[1]
    );
    let _ = std::fs::remove_dir_all(&inv.dir);
}

/// The sum of the samples of `family` in a Prometheus exposition whose labels include `label`.
fn sample_sum(text: &str, family: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Whether the peer closed `s` (end of stream or an error), within `bound`.
async fn closed_within(s: &mut tokio::net::TcpStream, bound: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(bound, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

/// 300 idle TCP sockets from 127.0.0.1 (no TLS handshake, no hello) do not keep a gateway out: a PSP client with a
/// valid certificate from the same address still connects and gets its welcome, with the server's default limits;
/// once in, it is not in the pool of unauthenticated connections, so 300 more do not touch it. Every idle socket is
/// closed (the oldest to make room, the rest at the deadline), and the metrics count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_keep_a_gateway_with_a_valid_certificate_out() {
    use pingate::psp::client::PspClient;
    use pingate::psp::{Request, Response};
    let inv = Inventory::create(&dir("flood"), &["gw1", "obs"], &sample_products(5)).unwrap();
    let metrics = free_local_addr().unwrap();
    let server = pingate::demo::rig::start_server_with(
        &inv,
        &pingate::store::handle::DbUrl::Sqlite(inv.db.clone()),
        "127.0.0.1:0".parse().unwrap(),
        pingate::server::ServerOptions {
            metrics: Some(metrics),
            ..pingate::server::ServerOptions::default()
        },
    )
    .await
    .unwrap();
    let tls = inv.gateway_tls("gw1").unwrap();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // The server takes connections in order: the client's comes after the 300.
    let (client, welcome) = tokio::time::timeout(
        Duration::from_secs(20),
        PspClient::connect(server.addr, "localhost", tls.clone()),
    )
    .await
    .expect("the handshake ends")
    .expect("a gateway with a valid certificate gets in");
    assert_eq!(welcome.gateway, "gw1");
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    assert_eq!(client.call(Request::Ping).await.unwrap(), Response::Pong);
    // A second gateway connection gets in too, after both floods.
    let (second, _) = PspClient::connect(server.addr, "localhost", tls).await.unwrap();
    assert_eq!(second.call(Request::Ping).await.unwrap(), Response::Pong);

    // Every idle socket is closed by the server, eventually (the default deadline is a few seconds).
    let closed =
        futures_util::future::join_all(idle.iter_mut().map(|s| closed_within(s, Duration::from_secs(60)))).await;
    assert_eq!(
        closed.iter().filter(|c| **c).count(),
        600,
        "idle sockets closed by the server"
    );
    assert_eq!(
        client.call(Request::Ping).await.unwrap(),
        Response::Pong,
        "the gateway stays"
    );
    let (_, text) = pingate::metrics::get(metrics, "/metrics").await.unwrap();
    let family = "pingate_server_unauthenticated_closed_total";
    let counted: f64 = ["source_cap", "pool_cap", "deadline"]
        .iter()
        .map(|r| sample_sum(&text, family, &format!("reason=\"{r}\"")))
        .sum();
    eprintln!(
        "closed before authentication: source_cap {}, pool_cap {}, deadline {}",
        sample_sum(&text, family, "reason=\"source_cap\""),
        sample_sum(&text, family, "reason=\"pool_cap\""),
        sample_sum(&text, family, "reason=\"deadline\"")
    );
    assert!(counted >= 600.0, "{counted} counted:\n{text}");
    assert!(sample_sum(&text, family, "reason=\"deadline\"") >= 1.0, "{text}");
    drop((client, second));
    server.stop().await;
    let _ = std::fs::remove_dir_all(&inv.dir);
}

/// A terminal connection that never sends a frame is closed after the listener's first-frame deadline and counted
/// in the metrics; one that sent a frame is past that deadline and stays (its idle timeout applies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_connection_without_a_first_frame_is_closed_and_counted() {
    let (inv, server, gw) = common::rig(
        &dir("first-frame"),
        20,
        2,
        4,
        ("", "first_frame_timeout_ms = 300\nidle_timeout_ms = 600000"),
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut talker = gw.terminal().await.unwrap();
    let me = common::demo_terminal("DEMO0001");
    assert_eq!(
        code(&talker.call(&me.network(1, "1130120000", "301")).await.unwrap()),
        "00"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(30)).await,
        "a silent connection is closed"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        code(&talker.call(&me.network(2, "1130120000", "301")).await.unwrap()),
        "00",
        "a connection that sent a frame stays past the first-frame deadline"
    );
    let text = gw.gateway.metrics_text();
    assert_eq!(
        sample_sum(
            &text,
            "pingate_gateway_terminal_connections_closed_total",
            "reason=\"no_first_frame\""
        ),
        1.0,
        "{text}"
    );
    drop(talker);
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
    let _ = std::fs::remove_dir_all(&inv.dir);
}

/// A client whose TLS handshake is done but that never says hello is closed at the same deadline (the handshake
/// and the hello together), and counted; a gateway that says hello in time is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_closed_at_the_handshake_deadline() {
    use pingate::psp::client::PspClient;
    use pingate::psp::{Request, Response};
    let inv = Inventory::create(&dir("no-hello"), &["gw1", "obs"], &sample_products(5)).unwrap();
    let metrics = free_local_addr().unwrap();
    let server = pingate::demo::rig::start_server_with(
        &inv,
        &pingate::store::handle::DbUrl::Sqlite(inv.db.clone()),
        "127.0.0.1:0".parse().unwrap(),
        pingate::server::ServerOptions {
            metrics: Some(metrics),
            handshake_timeout: Duration::from_millis(500),
            ..pingate::server::ServerOptions::default()
        },
    )
    .await
    .unwrap();
    let tls = inv.gateway_tls("gw1").unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (client, _) = PspClient::connect(server.addr, "localhost", tls).await.unwrap();
    let closed = {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    };
    assert!(closed, "a connection without a hello is closed");
    assert_eq!(client.call(Request::Ping).await.unwrap(), Response::Pong);
    let (_, text) = pingate::metrics::get(metrics, "/metrics").await.unwrap();
    assert_eq!(
        sample_sum(
            &text,
            "pingate_server_unauthenticated_closed_total",
            "reason=\"deadline\""
        ),
        1.0,
        "{text}"
    );
    drop(client);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&inv.dir);
}

/// The example configuration gives its listener a first-frame deadline of 5 s; one under 100 ms is refused, named.
#[test]
fn the_first_frame_deadline_is_configured_per_listener_and_checked() {
    use pingate::gateway::config::GatewayConfig;
    let d = dir("config");
    let (text, path) = common::example_config(&d);
    let c = GatewayConfig::parse(&text, &path).unwrap();
    assert_eq!(c.listeners[0].first_frame_timeout, Duration::from_secs(5));
    let bad = text.replace("first_frame_timeout_ms = 5000", "first_frame_timeout_ms = 0");
    assert_ne!(bad, text);
    let e = GatewayConfig::parse(&bad, &path).unwrap_err().to_string();
    assert!(e.contains("listener[0].first_frame_timeout_ms"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The PIN server's slot and deadline flags are on its command line, and a value that would shut every connection
/// out is refused, naming it.
#[test]
fn the_server_flags_for_slots_and_the_handshake_deadline_are_checked() {
    let help = Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(["server", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--max-connections",
        "--max-unauthenticated ",
        "--max-unauthenticated-per-source",
        "--handshake-timeout-ms",
    ] {
        assert!(help.contains(flag), "{flag} in:\n{help}");
    }
    for (flag, value) in [
        ("--max-unauthenticated", "0"),
        ("--max-unauthenticated-per-source", "0"),
        ("--handshake-timeout-ms", "10"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args(["server", "--db", "sqlite:x", "--cert", "x", "--key", "x"])
            .args(["--client-ca", "x", "--gateways", "x", "--pin-keys", "x", flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
