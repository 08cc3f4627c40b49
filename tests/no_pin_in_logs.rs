//! No PIN value reaches a log line, at any level, on any path. A PIN server and a gateway run in this process with
//! every log line (TRACE, every crate, text and JSON) kept; traffic goes through sales, repeats, duplicates,
//! reversals, answers that cannot be delivered, malformed frames, a PIN server outage and its return, and dial-up
//! calls with a bad frame and a lost carrier. Then every PIN of the inventory, decrypted from the database, is
//! searched for in the logs, as text and as hex.

mod common;

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use pingate::demo::rig::{sample_modes, sample_products, start_gateway, start_server, Inventory};
use pingate::iso8583::Dialects;
use pingate::traffic::dialsim::{start_modem, CallScript, DialupTerminal, ModemOptions};
use pingate::traffic::scenario::Scenario;
use pingate::traffic::sim::{Identity, SaleSpec};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Sink;

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn id(t: &str) -> Identity {
    common::demo_terminal(t)
}

fn spec(stan: u32, product: &str, amount: u64) -> SaleSpec {
    common::demo_sale(stan, "1129170000", product, amount)
}

/// Every PIN in the inventory, decrypted.
fn all_pins(inv: &Inventory) -> Vec<String> {
    let cipher = pingate::crypto::PinCipher::from_spec(&inv.pin_keys).unwrap();
    let db = rusqlite::Connection::open(&inv.db).unwrap();
    let mut q = db
        .prepare("SELECT serial, key_id, nonce, ciphertext, id, product, amount FROM pins")
        .unwrap();
    let rows = q
        .query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, u32>(1)?),
                (r.get::<_, Vec<u8>>(2)?, r.get::<_, Vec<u8>>(3)?),
                (r.get::<_, i64>(4)?, r.get::<_, String>(5)?, r.get::<_, i64>(6)?),
            ))
        })
        .unwrap();
    rows.map(|r| {
        let ((serial, key_id), (nonce, ciphertext), (id, product, amount)) = r.unwrap();
        let sealed = pingate::crypto::Sealed {
            key_id,
            nonce: nonce.try_into().unwrap(),
            ciphertext,
        };
        let row = pingate::crypto::RowAd {
            id,
            product: &product,
            amount,
            serial: &serial,
        };
        cipher.open_row(&sealed, &row).unwrap().expose().to_string()
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pin_reaches_a_log_line() {
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::TRACE)
        .with(tracing_subscriber::fmt::layer().with_writer(|| Sink).with_ansi(false))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(|| Sink),
        )
        .init();

    let d = std::env::temp_dir().join(format!("pingate-nopin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let inv = Inventory::create(&d, &["gw1", "obs"], &sample_products(40)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server_addr = server.addr;
    let modem = start_modem(ModemOptions::default()).unwrap();
    let serial = format!(
        "\n[[serial]]\nname = \"m1\"\ndevice = \"{}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nmodem = true\n\
         guard_time_ms = 60\ncommand_timeout_ms = 1000\nenq_interval_ms = 200\nack_timeout_ms = 500\n",
        modem.device
    );
    let gw = start_gateway(
        &inv,
        "gw1",
        &[server_addr],
        8,
        &sample_modes(3, 6),
        ("response_deadline_ms = 1500", &serial),
    )
    .await
    .unwrap();

    // The whole contract over TCP.
    let scenario = Scenario::parse(&std::fs::read_to_string("fixtures/scenarios/contract.toml").unwrap()).unwrap();
    let mut t = gw.terminal().await.unwrap();
    let results = scenario
        .run(&mut t, &id("DEMO0006"), "1129170000", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.problem.is_none()), "{results:#?}");

    // Malformed frames: garbage, and a readable MTI with nothing behind it.
    t.send_raw(Bytes::from_static(b"\x00\x01garbage")).await.unwrap();
    t.send_raw(Bytes::from_static(b"0200")).await.unwrap();
    let a = t.recv().await.unwrap();
    assert_eq!(a.get_str(39), Some("30"));

    // An answer that cannot be delivered: the terminal hangs up right after asking.
    let before = gw.gateway.stats.undelivered.load(std::sync::atomic::Ordering::Relaxed);
    let mut t2 = gw.terminal().await.unwrap();
    t2.send(&id("DEMO0002").sale(&spec(1, "GIFT-25", 2500), false))
        .await
        .unwrap();
    drop(t2);
    for _ in 0..300 {
        if gw.gateway.stats.undelivered.load(std::sync::atomic::Ordering::Relaxed) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Dial-up: a bad frame then a sale, and a sale whose carrier drops before the ACK.
    let mut b = gw.gateway.lines();
    tokio::time::timeout(Duration::from_secs(10), async {
        while b.borrow_and_update().get("m1").map(|s| s.state.as_str()) != Some("ready") {
            b.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    let bcd = Dialects::builtin().get("iso87-bcd").unwrap().clone();
    let req = |stan: u32| {
        let m = bcd
            .encode(&id("DEMO0003").sale(&spec(stan, "TOPUP-EU-10", 1000), false))
            .unwrap();
        [&[0x60, 0, 3, 0, 1][..], &m[..]].concat()
    };
    let s1 = CallScript {
        bad_frames: 1,
        ..CallScript::default()
    };
    let o1 = DialupTerminal::call(&modem, &req(1), &s1).await.unwrap();
    assert!(o1.answer.is_some());
    let s2 = CallScript {
        ack_answer: false,
        ..CallScript::default()
    };
    let r = DialupTerminal::call(&modem, &req(2), &s2).await;
    assert!(r.unwrap().answer.is_some());

    // The PIN server goes away and comes back: 91 on demand, cache sales held for confirmation, then confirmed.
    server.stop().await;
    let a = t
        .call(&id("DEMO0004").sale(&spec(1, "GIFT-25", 2500), false))
        .await
        .unwrap();
    assert_eq!(a.get_str(39), Some("91"));
    let a = t
        .call(&id("DEMO0004").sale(&spec(2, "TOPUP-EU-10", 1000), false))
        .await
        .unwrap();
    assert!(matches!(a.get_str(39), Some("00") | Some("91")));
    let server = start_server(&inv, server_addr).await.unwrap();
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(30)).await);
    assert!(gw.gateway.flush(Duration::from_secs(30)).await);
    drop(t);
    gw.stop().await;
    server.stop().await;

    common::audit_ok(&inv).await;
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    assert!(
        logs.lines().count() > 40,
        "the paths were logged: {} lines",
        logs.lines().count()
    );
    for needle in [
        "answer not delivered",
        "carrier lost",
        "frame refused (NAK)",
        "request does not decode",
    ] {
        assert!(logs.contains(needle), "no `{needle}` in the logs");
    }
    let pins = all_pins(&inv);
    assert_eq!(pins.len(), 80);
    for pin in &pins {
        let hex: String = pin.bytes().map(|b| format!("{b:02X}")).collect();
        let hex_lower = hex.to_lowercase();
        assert!(!logs.contains(pin.as_str()), "a PIN in the logs");
        assert!(
            !logs.contains(&hex) && !logs.contains(&hex_lower),
            "a PIN in hex in the logs"
        );
    }
}
