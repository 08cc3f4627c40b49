//! MACs end to end: a gateway whose listener requires them (`mac = "required"`), terminals' keys in a real terminal key
//! file sealed under a real KEK, simulated terminals over real TCP, a PIN server over real TLS on a real SQLite file,
//! and the operator's `pingate terminals status|unlock` through the real binary and the admin socket.

mod common;
use common::code;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use pingate::demo::rig::{past_this_second, sample_modes, sample_products, start_gateway, start_server, Inventory};
use pingate::gateway::config::GatewayConfig;
use pingate::iso8583::{Dialect, Message};
use pingate::mac::{sign_message, verify_request, MacAlgorithm, MacError, MacKey};
use pingate::sale::PinReceipt;
use pingate::terminal_keys::{load_kek, TerminalKeyFile};
use pingate::traffic::sim::{now_transmission, Identity, SaleSpec, TerminalClient};

const ON_DEMAND: &str = "GIFT-25";

fn sale(stan: u32) -> SaleSpec {
    common::demo_sale(stan, &now_transmission(), ON_DEMAND, 2500)
}

/// Sends `bytes` as one frame and returns the answer as received, and decoded.
async fn call_raw(t: &mut TerminalClient, d: &Dialect, bytes: Bytes) -> (Bytes, Message) {
    t.send_raw(bytes).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(20), t.recv_frame())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("the connection stays open");
    let msg = d.decode(&frame.message).unwrap();
    (frame.message, msg)
}

fn pingate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pingate")).args(args).output().unwrap();
    let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).into_owned();
    (out.status.success(), text)
}

fn write_keys(dir: &Path, keys: &[(&str, &MacKey)]) -> PathBuf {
    let kek_path = dir.join("terminal-kek");
    if !kek_path.exists() {
        pingate::tls::write_new_key(&kek_path).unwrap();
    }
    let kek = load_kek(&kek_path).unwrap();
    let path = dir.join("terminal-keys.toml");
    let mut file = TerminalKeyFile::load_or_new(&path).unwrap();
    for (terminal, key) in keys {
        let grace = (!file.of(terminal).is_empty()).then_some(3600);
        file.add(&kek, terminal, key, pingate::clock::unix_now(), grace)
            .unwrap();
    }
    file.save(&path).unwrap();
    path
}

/// The admin socket, as `pingate gateway` serves it.
struct Admin {
    path: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Admin {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Gateway `gw1` with 3 terminals, its listener requiring MACs (3 failures lock a terminal), and its admin socket.
async fn start(inv: &Inventory, server: std::net::SocketAddr) -> (pingate::demo::rig::GatewayHandle, Admin) {
    let gw = start_gateway(
        inv,
        "gw1",
        &[server],
        3,
        &sample_modes(5, 10),
        (
            "terminal_keys_file = \"terminal-keys.toml\"\nterminal_kek_file = \"terminal-kek\"\nmac_failures = 3",
            "mac = \"required\"",
        ),
    )
    .await
    .unwrap();
    past_this_second().await;
    let path = inv.dir.join("admin.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(pingate::gateway::serve_admin(
        listener,
        gw.gateway.clone(),
        stop.clone(),
    ));
    let path = path.to_str().unwrap().to_string();
    (gw, Admin { path, stop, task })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_requires_macs_serves_only_terminals_that_prove_who_they_are() {
    let dir = std::env::temp_dir().join(format!("pingate-mac-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(30)).unwrap();
    let server = start_server(&inv, std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let k1 = MacKey::generate(MacAlgorithm::RetailDes).unwrap();
    let k2 = MacKey::generate(MacAlgorithm::AesCmac).unwrap();
    write_keys(&dir, &[("DEMO0001", &k1), ("DEMO0002", &k2)]);
    let (gw, mut admin) = start(&inv, server.addr).await;
    let admin_path = admin.path.clone();

    let d = gw.dialect.clone();
    let t1 = common::demo_terminal("DEMO0001");
    let mut conn = gw.terminal().await.unwrap();

    // A sale MACed with the terminal's key: a PIN, and an answer MACed with the same key.
    let signed = sign_message(&d, &t1.sale(&sale(1), false), &k1).unwrap().freeze();
    let (raw, answer) = call_raw(&mut conn, &d, signed).await;
    assert_eq!(code(&answer), "00");
    assert!(answer.get(63).and_then(|b| PinReceipt::from_tlv(b).ok()).is_some());
    assert_eq!(verify_request(&d, &raw, &answer, &k1), Ok(()), "the answer's MAC");

    // No MAC: 63, no PIN, and no MAC on the answer.
    let plain = d.encode(&t1.sale(&sale(2), false)).unwrap().freeze();
    let (raw, answer) = call_raw(&mut conn, &d, plain).await;
    assert_eq!(code(&answer), "63");
    assert!(!answer.has(63) && !answer.has(64) && !answer.has(128));
    assert_eq!(
        answer.get_str(37).map(|r| r.len()),
        Some(12),
        "a sale's decline carries its RRN"
    );
    assert_eq!(
        verify_request(&d, &raw, &answer, &k1),
        Err(MacError::Missing { field: 64 })
    );

    // A MAC taken from another message (the amount changed after MACing): 63.
    let good = sign_message(&d, &t1.sale(&sale(3), false), &k1).unwrap().freeze();
    let mac = d.decode(&good).unwrap().get(64).unwrap().clone();
    let mut other = t1.sale(&sale(3), false);
    other.set(4, "000000009900").set(64, mac);
    let (_, answer) = call_raw(&mut conn, &d, d.encode(&other).unwrap().freeze()).await;
    assert_eq!(code(&answer), "63");
    assert!(!answer.has(63));

    // An 0800 tells a stranger nothing: a made-up terminal id and a real one with a wrong MAC get the same answer.
    let stranger = Identity {
        terminal_id: "DEMO0099".into(),
        merchant_id: pingate::traffic::sim::MERCHANT.into(),
    };
    let t2 = common::demo_terminal("DEMO0002");
    let when = now_transmission();
    let wrong_key = MacKey::generate(MacAlgorithm::AesCmac).unwrap();
    let (_, probe_unknown) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &stranger.network(7, &when, "301"), &wrong_key)
            .unwrap()
            .freeze(),
    )
    .await;
    let (_, probe_known) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &t2.network(7, &when, "301"), &wrong_key)
            .unwrap()
            .freeze(),
    )
    .await;
    assert_eq!((code(&probe_unknown), code(&probe_known)), ("63", "63"));
    let fields = |m: &Message| m.fields().map(|(n, _)| n).collect::<Vec<u8>>();
    assert_eq!(fields(&probe_unknown), fields(&probe_known));
    assert_eq!(probe_unknown.mti(), probe_known.mti());
    // The real terminal's 0800 with its own key: 00, MACed in field 128 (field 70 brings the secondary bitmap).
    let (raw, echo) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &t2.network(8, &when, "301"), &k2).unwrap().freeze(),
    )
    .await;
    assert_eq!(code(&echo), "00");
    assert!(echo.has(128) && !echo.has(64));
    assert_eq!(verify_request(&d, &raw, &echo, &k2), Ok(()));

    // A third failure within the window locks DEMO0001: then even a good MAC gets 63.
    let (_, answer) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &t1.sale(&sale(4), false), &k2).unwrap().freeze(),
    )
    .await;
    assert_eq!(code(&answer), "63");
    let (_, answer) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &t1.sale(&sale(5), false), &k1).unwrap().freeze(),
    )
    .await;
    assert_eq!(code(&answer), "63", "locked");
    assert!(!answer.has(63));
    let (ok, status) = pingate(&["terminals", "status", "--admin", &admin_path]);
    assert!(ok, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let of = |t: &str| {
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["terminal"] == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(of("DEMO0001")["failures"], 3);
    assert!(of("DEMO0001")["locked_since"].is_i64());
    assert_eq!(of("DEMO0002")["failures"], 1);
    assert!(of("DEMO0002")["locked_since"].is_null());
    assert!(
        status.as_array().unwrap().iter().all(|s| s["terminal"] != "DEMO0099"),
        "a made-up id is not counted"
    );
    let metrics = gw.gateway.metrics_text();
    assert!(
        metrics.contains("pingate_gateway_mac_refused_total{reason=\"locked\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pingate_gateway_terminals_locked 1"));
    assert!(metrics.contains("code=\"63\""));
    // The status page lists the locked terminal, and neither key (in hex, either case).
    let page = gw.gateway.status_page();
    assert!(page.contains("<b>1</b><span>locked (MAC failures)</span>"), "{page}");
    let row = page
        .split("<td><span>DEMO0001</span></td>")
        .nth(1)
        .expect("DEMO0001 listed");
    let row = row.split("</tr>").next().unwrap();
    assert!(row.contains("<span>3</span>") && row.contains("locked "), "{row}");
    for k in [&k1, &k2] {
        let hex: String = k.expose().iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !page.to_ascii_lowercase().contains(&hex),
            "a MAC key is on the status page"
        );
    }

    // A restart keeps it locked (the locks are written beside the journal).
    drop(conn);
    admin.stop().await;
    gw.stop().await;
    let locks = std::fs::read_to_string(dir.join("gateway-gw1.mac-locks")).unwrap();
    assert!(locks.contains("\"DEMO0001\""), "{locks}");
    let (gw, again) = start(&inv, server.addr).await;
    admin = again;
    let mut conn = gw.terminal().await.unwrap();
    let (_, answer) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &t1.sale(&sale(55), false), &k1).unwrap().freeze(),
    )
    .await;
    assert_eq!(code(&answer), "63", "still locked after a restart");

    // The operator unlocks it: served again.
    assert_eq!(
        pingate(&["terminals", "unlock", "--admin", &admin_path, "DEMO0001"]),
        (true, "terminal DEMO0001 unlocked\n".into())
    );
    let (ok, e) = pingate(&["terminals", "unlock", "--admin", &admin_path, "DEMO0001"]);
    assert!(!ok && e.contains("terminal DEMO0001 is not locked"), "{e}");
    let (_, answer) = call_raw(
        &mut conn,
        &d,
        sign_message(&d, &t1.sale(&sale(6), false), &k1).unwrap().freeze(),
    )
    .await;
    assert_eq!(code(&answer), "00");

    // Re-keyed without downtime: the new key is added to the file and the gateway reloads (SIGHUP); a request MACed
    // with the old key still verifies during the grace period, and answers are MACed with the new key.
    let k1b = MacKey::generate(MacAlgorithm::RetailDes).unwrap();
    write_keys(&dir, &[("DEMO0001", &k1b)]);
    let report = gw.gateway.reload(&GatewayConfig::load(&gw.config).unwrap());
    assert!(
        report.applied.iter().any(|a| a.starts_with("terminal keys: ")),
        "{report:?}"
    );
    for (stan, key) in [(7, &k1), (8, &k1b)] {
        let (raw, answer) = call_raw(
            &mut conn,
            &d,
            sign_message(&d, &t1.sale(&sale(stan), false), key).unwrap().freeze(),
        )
        .await;
        assert_eq!(code(&answer), "00", "stan {stan}");
        assert_eq!(verify_request(&d, &raw, &answer, &k1b), Ok(()));
        assert_eq!(verify_request(&d, &raw, &answer, &k1), Err(MacError::Mismatch));
    }

    drop(conn);
    admin.stop().await;
    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
