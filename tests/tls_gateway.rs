//! TLS terminals and where terminals may come from, end to end (issue 20, §2 and §3): a gateway whose listener
//! requires TLS with client certificates issued by `pingate certs terminal` (the real binary), terminals and a NAC
//! over real TLS sockets, a PIN server over real TLS on a real SQLite file; source allowlists on real sockets.

mod common;
use common::code;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pingate::demo::rig::{
    past_this_second, sample_modes, sample_products, start_server, GatewayFiles, GatewayHandle, Inventory,
};
use pingate::gateway::StartOptions;
use pingate::iso8583::Message;
use pingate::sale::PinReceipt;
use pingate::traffic::secure::ClientTls;
use pingate::traffic::sim::{now_transmission, SaleSpec, TerminalClient, FRAMING};

const ON_DEMAND: &str = "GIFT-25";

fn sale(stan: u32) -> SaleSpec {
    common::demo_sale(stan, &now_transmission(), ON_DEMAND, 2500)
}

fn pingate(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_pingate")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Issues a certificate with the real binary: `pingate certs terminal DIR --name NAME... [--listener] --out OUT`.
fn issue(certs: &Path, names: &[&str], listener: bool, out: &Path) {
    let mut args = vec!["certs", "terminal", certs.to_str().unwrap()];
    for n in names {
        args.extend(["--name", n]);
    }
    if listener {
        args.push("--listener");
    }
    args.extend(["--out", out.to_str().unwrap()]);
    pingate(&args);
}

/// Gateway `gw1` with 3 terminals, its listener configured by `listener` (and tables after it), DEMO0003 bound to
/// `demo3_allow`.
async fn gateway(inv: &Inventory, server: SocketAddr, listener: &str, demo3_allow: &str) -> GatewayHandle {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let files = GatewayFiles::write(inv, "gw1", &[server], any, 3, &sample_modes(5, 10), ("", listener)).unwrap();
    let text = std::fs::read_to_string(&files.config).unwrap().replace(
        "id = \"DEMO0003\"\n",
        &format!("id = \"DEMO0003\"\nallow = [{demo3_allow}]\n"),
    );
    std::fs::write(&files.config, text).unwrap();
    let gw = GatewayHandle::start(&files.config, StartOptions::default())
        .await
        .unwrap();
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(10)).await);
    past_this_second().await;
    gw
}

/// One sale by `terminal` over a connection with `tls`; the answer, or the error (a refused handshake).
async fn buy(gw: &GatewayHandle, tls: &ClientTls, terminal: &str, stan: u32) -> Result<Message, String> {
    let mut c = TerminalClient::connect_secured(gw.addr, FRAMING, None, gw.dialect.clone(), Some(tls), None)
        .await
        .map_err(|e| e.to_string())?;
    let msg = common::demo_terminal(terminal).sale(&sale(stan), false);
    tokio::time::timeout(Duration::from_secs(20), c.call(&msg))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())
}

fn closed_total(gw: &GatewayHandle, reason: &str) -> u64 {
    let text = gw.gateway.metrics_text();
    text.lines()
        .filter(|l| l.starts_with("pingate_gateway_terminal_connections_closed_total{") && l.contains(reason))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_terminals_and_nacs_buy_only_for_the_ids_their_certificates_speak_for() {
    let dir = std::env::temp_dir().join(format!("pingate-tls-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(30)).unwrap();
    let server = start_server(&inv, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let certs = inv.certs.dir.clone();
    let (listener_dir, terminals) = (dir.join("listener"), dir.join("terminals"));
    issue(&certs, &["localhost", "127.0.0.1"], true, &listener_dir);
    issue(&certs, &["DEMO0001"], false, &terminals);
    issue(&certs, &["nac-north"], false, &terminals);
    // The same terminal id from another CA.
    pingate::tls::certs_init(&dir.join("other"), &pingate::tls::CertsInit::default()).unwrap();
    issue(&dir.join("other"), &["DEMO0001"], false, &dir.join("other-terminals"));

    let gw = gateway(
        &inv,
        server.addr,
        "tls = { cert = \"listener/localhost.pem\", key = \"listener/localhost.key\", client_ca = \"certs/ca/ca.pem\" }\n\
         allow = [\"127.0.0.0/8\", \"::1\"]\nfirst_frame_timeout_ms = 2000\n\n\
         [[nac]]\nname = \"nac-north\"\nterminals = [\"DEMO0002\", \"DEMO0003\"]\n",
        "\"10.0.0.0/8\"",
    )
    .await;
    let ca = listener_dir.join("ca.pem");
    let client = |dir: &Path, name: &str| {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        ClientTls::load(&ca, Some((&cert, &key)), "localhost").unwrap()
    };
    let t1 = client(&terminals, "DEMO0001");
    let nac = client(&terminals, "nac-north");

    // A terminal with its own certificate buys.
    let a = buy(&gw, &t1, "DEMO0001", 1).await.unwrap();
    assert_eq!(code(&a), "00");
    assert!(a.get(63).and_then(|b| PinReceipt::from_tlv(b).ok()).is_some());
    // Its certificate does not speak for another terminal: 63, no PIN.
    let a = buy(&gw, &t1, "DEMO0002", 2).await.unwrap();
    assert_eq!(code(&a), "63");
    assert!(!a.has(63));
    // A NAC buys for the ids on its list, and gets 63 for another.
    let a = buy(&gw, &nac, "DEMO0002", 3).await.unwrap();
    assert_eq!(code(&a), "00");
    assert!(a.has(63));
    let a = buy(&gw, &nac, "DEMO0001", 4).await.unwrap();
    assert_eq!(code(&a), "63");
    assert!(!a.has(63));
    // DEMO0003 is on the NAC's list but bound to 10.0.0.0/8: from 127.0.0.1, 63.
    let a = buy(&gw, &nac, "DEMO0003", 5).await.unwrap();
    assert_eq!(code(&a), "63");
    assert!(!a.has(63));

    // Without a certificate, with one of another CA, or in clear: the handshake fails, nothing is sold.
    let before = closed_total(&gw, "reason=\"tls_handshake\"");
    let anonymous = ClientTls::load(&ca, None, "localhost").unwrap();
    assert!(buy(&gw, &anonymous, "DEMO0001", 6).await.is_err());
    let stranger = client(&dir.join("other-terminals"), "DEMO0001");
    assert!(buy(&gw, &stranger, "DEMO0001", 7).await.is_err());
    let mut clear = gw.terminal().await.unwrap();
    let plain = common::demo_terminal("DEMO0001").sale(&sale(8), false);
    assert!(tokio::time::timeout(Duration::from_secs(10), clear.call(&plain))
        .await
        .unwrap()
        .is_err());
    // A listener that names a CA other than the one that issued its certificate is refused by the client too.
    let wrong_ca = dir.join("other").join("ca").join("ca.pem");
    let (cert, key) = (terminals.join("DEMO0001.pem"), terminals.join("DEMO0001.key"));
    let doubting = ClientTls::load(&wrong_ca, Some((&cert, &key)), "localhost").unwrap();
    assert!(buy(&gw, &doubting, "DEMO0001", 9).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(closed_total(&gw, "reason=\"tls_handshake\"") >= before + 3);
    let metrics = gw.gateway.metrics_text();
    assert!(
        metrics.contains("pingate_gateway_origin_refused_total{reason=\"certificate\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pingate_gateway_origin_refused_total{reason=\"source\"} 1"),
        "{metrics}"
    );

    // A handshake never started counts against the first-frame deadline.
    let idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut idle = idle;
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut idle, &mut b),
    )
    .await
    .expect("closed by the gateway");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(closed_total(&gw, "reason=\"tls_handshake_timeout\""), 1);

    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_closes_connections_from_outside_its_allow_list_at_accept() {
    let dir = std::env::temp_dir().join(format!("pingate-allow-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(10)).unwrap();
    let server = start_server(&inv, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    // 127.0.0.1 is not in the list: closed at accept, counted.
    let gw = gateway(
        &inv,
        server.addr,
        "allow = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n",
        "\"127.0.0.1\"",
    )
    .await;
    let mut c = gw.terminal().await.unwrap();
    let msg = common::demo_terminal("DEMO0001").sale(&sale(1), false);
    assert!(tokio::time::timeout(Duration::from_secs(10), c.call(&msg))
        .await
        .unwrap()
        .is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(closed_total(&gw, "reason=\"source_not_allowed\""), 1);
    gw.stop().await;

    // In the list: served; and DEMO0003, bound to 127.0.0.1, buys from there.
    let gw = gateway(&inv, server.addr, "allow = [\"127.0.0.0/8\"]\n", "\"127.0.0.1\"").await;
    let mut c = gw.terminal().await.unwrap();
    let a = c
        .call(&common::demo_terminal("DEMO0003").sale(&sale(2), false))
        .await
        .unwrap();
    assert_eq!(code(&a), "00");
    assert_eq!(closed_total(&gw, "reason=\"source_not_allowed\""), 0);
    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
