//! Callers' numbers bound to terminal ids, end to end on real pseudo-terminals (issue 20, §3): emulated modems that
//! report caller ID after the first RING (`NMBR = …`), the gateway's modem lines, a real PIN server behind it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingate::demo::rig::GatewayHandle;
use pingate::gateway::serial::LineBoard;
use pingate::iso8583::{Dialect, Dialects, Message};
use pingate::traffic::dialsim::{start_modem, CallScript, DialupTerminal, ModemHandle, ModemOptions};
use pingate::traffic::sim::SaleSpec;

const TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x01];

fn bcd() -> Arc<Dialect> {
    Arc::new(Dialects::builtin().get("iso87-bcd").unwrap().clone())
}

fn line(name: &str, device: &str) -> String {
    format!(
        "\n[[serial]]\nname = \"{name}\"\ndevice = \"{device}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nmodem = true\n\
         guard_time_ms = 60\ncommand_timeout_ms = 1000\nenq_interval_ms = 200\nack_timeout_ms = 500\n\
         frame_timeout_ms = 2000\nidle_timeout_ms = 2000\ndtr_drop_ms = 100\n"
    )
}

fn modem(caller_id: &str) -> ModemHandle {
    start_modem(ModemOptions {
        caller_id: Some(caller_id.into()),
        ..ModemOptions::default()
    })
    .unwrap()
}

async fn ready(gw: &GatewayHandle, lines: &[&str]) {
    let mut rx = gw.gateway.lines();
    let all = |b: &LineBoard| lines.iter().all(|l| b.get(*l).is_some_and(|s| s.state == "ready"));
    tokio::time::timeout(Duration::from_secs(20), async {
        while !all(&rx.borrow_and_update()) {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the modems ready");
}

/// One dial-up sale by `terminal` through `m`: the answer's field 39, and whether it carries a PIN.
async fn call(m: &ModemHandle, terminal: &str, stan: u32) -> (String, bool) {
    let id = common::demo_terminal(terminal);
    let spec = SaleSpec {
        stan,
        transmission: "1129120000".into(),
        product: "GIFT-25".into(),
        amount: 2500,
        currency: "978".into(),
    };
    let req = [&TPDU[..], &bcd().encode(&id.sale(&spec, false)).unwrap()[..]].concat();
    let script = CallScript {
        step_timeout: Duration::from_secs(10),
        ..CallScript::default()
    };
    let out = DialupTerminal::call(m, &req, &script).await.unwrap();
    let data: &Bytes = out.answer.as_ref().expect("an answer");
    let a: Message = bcd().decode(&data.slice(5..)).unwrap();
    (a.get_str(39).unwrap_or("??").to_string(), a.has(63))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_bound_to_callers_numbers_buys_only_from_them() {
    let (home, elsewhere) = (modem("5551234"), modem("5559999"));
    let dir = std::env::temp_dir().join(format!("pingate-dial-cid-{}", std::process::id()));
    // DIAL0001 may call from 5551234 only; the demo's terminals are bound to nothing.
    let extra = format!(
        "{}{}\n[[terminal]]\nid = \"DIAL0001\"\nmerchant = \"{}\"\ncaller_ids = [\"5551234\"]\n",
        line("m1", &home.device),
        line("m2", &elsewhere.device),
        pingate::traffic::sim::MERCHANT
    );
    let (inv, server, gw) = common::rig(&dir, 20, 2, 4, ("", &extra)).await;
    ready(&gw, &["m1", "m2"]).await;

    assert_eq!(call(&home, "DIAL0001", 1).await, ("00".into(), true));
    assert_eq!(call(&elsewhere, "DIAL0001", 2).await, ("63".into(), false));
    // Over TCP it has no caller's number: refused too.
    let mut t = gw.terminal().await.unwrap();
    let spec = common::demo_sale(3, "1129120000", "GIFT-25", 2500);
    let a = t
        .call(&common::demo_terminal("DIAL0001").sale(&spec, false))
        .await
        .unwrap();
    assert_eq!(a.get_str(39), Some("63"));
    // A terminal bound to nothing calls from anywhere.
    assert_eq!(call(&elsewhere, "DEMO0001", 4).await, ("00".into(), true));
    let metrics = gw.gateway.metrics_text();
    assert!(
        metrics.contains("pingate_gateway_origin_refused_total{reason=\"caller_id\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pingate_gateway_origin_refused_total{reason=\"source\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
    server.stop().await;
    drop(inv);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pingate-dialup call` as a user runs it: its emulated modem reports `--caller-id`, its sales are MACed with
/// `--mac-key-file`, on a line that requires MACs, for a terminal bound to one caller's number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialup_tool_reports_a_callers_number_and_macs_its_sales() {
    use pingate::mac::{MacAlgorithm, MacKey};
    use pingate::terminal_keys::{load_kek, TerminalKeyFile};
    let keys_dir = std::env::temp_dir().join(format!("pingate-dial-cid-tool-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&keys_dir);
    std::fs::create_dir_all(&keys_dir).unwrap();
    let (keys, kek_path) = (keys_dir.join("terminal-keys.toml"), keys_dir.join("terminal-kek"));
    pingate::tls::write_new_key(&kek_path).unwrap();
    let mut file = TerminalKeyFile::load_or_new(&keys).unwrap();
    let key = MacKey::generate(MacAlgorithm::RetailDes).unwrap();
    file.add(
        &load_kek(&kek_path).unwrap(),
        "DIAL0001",
        &key,
        pingate::clock::unix_now(),
        None,
    )
    .unwrap();
    file.save(&keys).unwrap();

    let link = keys_dir.join("ttyPOS1");
    let dir = std::env::temp_dir().join(format!("pingate-dial-cid-tool-{}", std::process::id()));
    let extra = format!(
        "{}mac = \"required\"\n\n[[terminal]]\nid = \"DIAL0001\"\nmerchant = \"{}\"\ncaller_ids = [\"5551234\"]\n",
        line("pos1", link.to_str().unwrap()),
        pingate::traffic::sim::MERCHANT
    );
    let gateway = format!(
        "terminal_keys_file = \"{}\"\nterminal_kek_file = \"{}\"\nmac_failures = 1000",
        keys.display(),
        kek_path.display()
    );
    let (inv, server, gw) = common::rig(&dir, 20, 2, 4, (&gateway, &extra)).await;
    let call = |caller: &'static str, stan: &'static str| {
        let (link, keys, kek) = (link.clone(), keys.clone(), kek_path.clone());
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-dialup"))
                .args(["call", "--link", link.to_str().unwrap(), "--guard-ms", "50"])
                .args(["--terminal", "DIAL0001", "--stan", stan, "--caller-id", caller])
                .args([
                    "--mac-key-file",
                    keys.to_str().unwrap(),
                    "--kek-file",
                    kek.to_str().unwrap(),
                ])
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
        }
    };
    let out = call("5551234", "70").await;
    assert_eq!(out.matches("code 00").count(), 1, "{out}");
    let out = call("5559999", "71").await;
    assert_eq!(out.matches("code 63").count(), 1, "{out}");
    gw.stop().await;
    server.stop().await;
    drop(inv);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&keys_dir);
}
