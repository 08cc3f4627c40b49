//! Dial-up terminals end to end on real pseudo-terminals: an emulated Hayes modem on one side of each pty, the
//! gateway's serial line on the other, a real PIN server behind it over mutual TLS on a real SQLite file.
//!
//! The emulator's guard times and the line's timers are short here; waits are bounded, and every wait is for an
//! event (a line state, a byte), never a sleep standing in for one.

mod common;

use common::{count, stock};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingate::demo::rig::{GatewayHandle, Inventory, ServerHandle};
use pingate::gateway::serial::{LineBoard, LineStatus};
use pingate::iso8583::{Dialect, Dialects, Message};
use pingate::sale::PinReceipt;
use pingate::traffic::dialsim::{start_modem, CallScript, CommandReply, DialupTerminal, ModemHandle, ModemOptions};
use pingate::traffic::sim::SaleSpec;

const ON_DEMAND: &str = "GIFT-25";
const PREFETCH: &str = "TOPUP-EU-10";
const TPDU: [u8; 5] = [0x60, 0x00, 0x03, 0x00, 0x01];

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-dial-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn bcd() -> Arc<Dialect> {
    Arc::new(Dialects::builtin().get("iso87-bcd").unwrap().clone())
}

/// A `[[serial]]` table for a modem line on `device`, with short timers; `extra` adds keys.
fn line(name: &str, device: &str, extra: &str) -> String {
    format!(
        "\n[[serial]]\nname = \"{name}\"\ndevice = \"{device}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nmodem = true\n\
         guard_time_ms = 60\ncommand_timeout_ms = 1000\nenq_interval_ms = 200\nack_timeout_ms = 500\n\
         frame_timeout_ms = 2000\nidle_timeout_ms = 2000\ndtr_drop_ms = 100\n{extra}\n"
    )
}

struct Rig {
    inv: Inventory,
    server: ServerHandle,
    gw: GatewayHandle,
}

async fn rig(name: &str, lines: &str) -> Rig {
    // The serial tables go after the listener's keys (the listener table ends where they start).
    let (inv, server, gw) = common::rig(&dir(name), 50, 2, 4, ("", lines)).await;
    Rig { inv, server, gw }
}

/// Waits (bounded) until `pred` holds for the board.
async fn board_until(gw: &GatewayHandle, what: &str, pred: impl Fn(&LineBoard) -> bool) -> LineBoard {
    let mut rx = gw.gateway.lines();
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            {
                let b = rx.borrow_and_update();
                if pred(&b) {
                    return b.clone();
                }
            }
            if rx.changed().await.is_err() {
                panic!("the gateway went away");
            }
        }
    })
    .await;
    match r {
        Ok(b) => b,
        Err(_) => panic!(
            "timed out waiting for {what}: {:?}",
            gw.gateway.lines().borrow().clone()
        ),
    }
}

fn state<'a>(b: &'a LineBoard, line: &str) -> Option<&'a LineStatus> {
    b.get(line)
}

fn ready(b: &LineBoard, line: &str) -> bool {
    state(b, line).is_some_and(|s| s.state == "ready")
}

/// A framed request: TPDU and a 0200 in the BCD dialect.
fn sale_request(terminal: usize, stan: u32, product: &str) -> Vec<u8> {
    let id = common::demo_terminal(&format!("DEMO{terminal:04}"));
    let spec = SaleSpec {
        stan,
        transmission: "1129120000".into(),
        product: product.into(),
        amount: if product == PREFETCH { 1000 } else { 2500 },
        currency: "978".into(),
    };
    let msg = bcd().encode(&id.sale(&spec, false)).unwrap();
    [&TPDU[..], &msg[..]].concat()
}

/// The answer's TPDU must be the request's with addresses swapped; returns the decoded message.
fn decode_answer(data: &Bytes) -> Message {
    assert_eq!(&data[..5], &[0x60, 0x00, 0x01, 0x00, 0x03], "TPDU addresses swapped");
    bcd().decode(&data.slice(5..)).unwrap()
}

fn pin_of(m: &Message) -> String {
    let r = PinReceipt::from_tlv(m.get(63).expect("field 63")).unwrap();
    r.pin.expose().to_string()
}

fn script() -> CallScript {
    CallScript {
        step_timeout: Duration::from_secs(10),
        ..CallScript::default()
    }
}

async fn modem() -> ModemHandle {
    start_modem(ModemOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialup_sale_end_to_end() {
    let m = modem().await;
    let capture = dir("sale-capture").with_extension("capture");
    let rig = rig(
        "sale",
        &line("m1", &m.device, &format!("capture = \"{}\"", capture.display())),
    )
    .await;
    board_until(&rig.gw, "the modem ready", |b| ready(b, "m1")).await;
    let cmds = m.commands();
    assert_eq!(
        cmds[..4],
        ["ATZ", "ATE0V1Q0", "AT&C1&D2", "ATS0=0"],
        "init string, each answered OK"
    );

    let out = DialupTerminal::call(&m, &sale_request(1, 1, ON_DEMAND), &script())
        .await
        .unwrap();
    assert_eq!(out.connect.as_deref(), Some("CONNECT 2400/ARQ"));
    assert_eq!(out.naks, 0);
    let answer = decode_answer(out.answer.as_ref().expect("an answer"));
    assert_eq!(answer.mti().to_string(), "0210");
    assert_eq!(answer.get_str(39), Some("00"));
    assert!(!pin_of(&answer).is_empty());
    assert!(out.hung_up, "the host hangs up after EOT");
    let b = board_until(&rig.gw, "the line re-armed", |b| {
        ready(b, "m1") && b["m1"].delivered == 1
    })
    .await;
    assert_eq!(b["m1"].calls, 1);
    assert_eq!(b["m1"].speed, Some(2400));
    assert_eq!(b["m1"].reversed, 0);
    let cmds = m.commands();
    assert!(
        cmds.contains(&"ATA".to_string()),
        "the host answered the RING: {cmds:?}"
    );
    let ath = cmds
        .iter()
        .position(|c| c == "ATH0")
        .expect("hung up with ATH0 (no DTR on a pty)");
    assert_eq!(cmds[ath + 1], "ATZ", "then re-initialised: {cmds:?}");
    let s = stock(&rig.inv, rig.server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 1);
    // The operator's view of the line, over the admin socket.
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = admin.local_addr().unwrap().to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(pingate::gateway::serve_admin(
        admin,
        rig.gw.gateway.clone(),
        stop.clone(),
    ));
    let lines: serde_json::Value =
        serde_json::from_str(&pingate::gateway::ask_admin(&addr, "lines").await.unwrap()).unwrap();
    assert_eq!(lines["m1"]["state"], "ready");
    assert_eq!(lines["m1"]["delivered"], 1);
    assert_eq!(lines["m1"]["speed"], 2400);
    stop.cancel();

    // A second call on the same line works the same way.
    let out2 = DialupTerminal::call(&m, &sale_request(1, 2, ON_DEMAND), &script())
        .await
        .unwrap();
    assert_eq!(decode_answer(out2.answer.as_ref().unwrap()).get_str(39), Some("00"));
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;

    // The line captured both calls: each request and its answer, without the link's framing, as a TCP
    // listener's capture has them (so `pingate replay` can send them again); the PINs masked.
    let text = std::fs::read_to_string(&capture).unwrap();
    let cap = pingate::traffic::capture::Capture::parse(&text).unwrap();
    assert_eq!(cap.other.get("serial").map(String::as_str), Some("m1"), "{text}");
    assert_eq!(cap.other.get("link").map(String::as_str), Some("stx-etx"), "{text}");
    assert!(cap.tpdu);
    let seen: Vec<(u64, pingate::traffic::capture::Direction)> = cap.records.iter().map(|r| (r.conn, r.dir)).collect();
    use pingate::traffic::capture::Direction::{Host, Terminal};
    assert_eq!(seen, [(1, Terminal), (1, Host), (2, Terminal), (2, Host)], "{text}");
    assert_eq!(&cap.records[0].data[..], &sale_request(1, 1, ON_DEMAND)[..]);
    for (record, call) in [(&cap.records[1], &out), (&cap.records[3], &out2)] {
        let captured = decode_answer(&record.data);
        assert_eq!(captured.get_str(39), Some("00"));
        assert_eq!(
            captured.get_str(11),
            decode_answer(call.answer.as_ref().unwrap()).get_str(11)
        );
        let masked = pin_of(&captured);
        assert!(
            !masked.is_empty() && masked.chars().all(|c| c == '*'),
            "masked: {masked}"
        );
        let pin = pin_of(&decode_answer(call.answer.as_ref().unwrap()));
        assert!(
            !text.contains(&pin) && !text.contains(&pingate::iso8583::to_hex(pin.as_bytes())),
            "PIN in capture"
        );
    }
    let _ = std::fs::remove_file(&capture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_lrc_is_nakked_and_the_good_retry_sells() {
    let m = modem().await;
    let rig = rig("nak", &line("m1", &m.device, "")).await;
    board_until(&rig.gw, "the modem ready", |b| ready(b, "m1")).await;
    let s = CallScript {
        bad_frames: 1,
        ..script()
    };
    let out = DialupTerminal::call(&m, &sale_request(2, 10, PREFETCH), &s)
        .await
        .unwrap();
    assert_eq!(out.naks, 1);
    assert!(!out.host_eot);
    assert_eq!(decode_answer(out.answer.as_ref().unwrap()).get_str(39), Some("00"));
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bad_frames_get_eot_and_a_hang_up() {
    let m = modem().await;
    let rig = rig("eot", &line("m1", &m.device, "")).await;
    board_until(&rig.gw, "the modem ready", |b| ready(b, "m1")).await;
    let s = CallScript {
        bad_frames: 3,
        ..script()
    };
    let out = DialupTerminal::call(&m, &sale_request(3, 20, ON_DEMAND), &s)
        .await
        .unwrap();
    assert_eq!(out.naks, 2, "two NAKs, then EOT instead of the third");
    assert!(out.host_eot);
    assert!(out.answer.is_none());
    assert!(out.hung_up, "the host hung up");
    board_until(&rig.gw, "the line re-armed", |b| ready(b, "m1")).await;
    assert!(m.commands().contains(&"ATH0".to_string()));
    let s = stock(&rig.inv, rig.server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 0, "nothing was sold");
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_lost_before_the_ack_reverses_the_sale() {
    let m = modem().await;
    let rig = rig("carrier", &line("m1", &m.device, "")).await;
    board_until(&rig.gw, "the modem ready", |b| ready(b, "m1")).await;
    let s = CallScript {
        ack_answer: false,
        ..script()
    };
    // The terminal gets the PIN but drops the line before its ACK: the modem tells the host NO CARRIER.
    let out = DialupTerminal::call(&m, &sale_request(4, 30, ON_DEMAND), &s)
        .await
        .unwrap();
    let lost_pin = pin_of(&decode_answer(out.answer.as_ref().unwrap()));
    board_until(&rig.gw, "the sale reversed", |b| b["m1"].reversed == 1).await;
    // The reversal reaches the server: the PIN is voided, never sold again.
    let mut voided = false;
    for _ in 0..200 {
        let s = stock(&rig.inv, rig.server.addr).await;
        if count(&s, ON_DEMAND, "voided") == 1 {
            assert_eq!(count(&s, ON_DEMAND, "sold"), 0);
            voided = true;
            break;
        }
        rig.gw.gateway.flush(Duration::from_millis(200)).await;
    }
    assert!(voided, "the undelivered sale was reversed at the server");
    // The answer went out whole and only the ACK was lost: the terminal may have printed the PIN. The void is marked
    // `unacknowledged` and kept out of the supplier's deactivation list unless asked for.
    {
        use pingate::store::PinStore;
        let store =
            pingate::store::sqlite::SqliteStore::open(&rig.inv.db, pingate::crypto::PinCipher::without_keys()).unwrap();
        assert!(
            store.voided(0, false).await.unwrap().is_empty(),
            "not deactivated on a guess"
        );
        let all = store.voided(0, true).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].reason, "unacknowledged");
        assert_eq!(all[0].terminal_id, "DEMO0004");
    }
    board_until(&rig.gw, "the line re-armed", |b| ready(b, "m1")).await;
    let out = DialupTerminal::call(&m, &sale_request(4, 31, ON_DEMAND), &script())
        .await
        .unwrap();
    let next_pin = pin_of(&decode_answer(out.answer.as_ref().unwrap()));
    assert_ne!(next_pin, lost_pin, "the reversed PIN is not handed out again");
    let s = stock(&rig.inv, rig.server.addr).await;
    assert_eq!((count(&s, ON_DEMAND, "sold"), count(&s, ON_DEMAND, "voided")), (1, 1));
    // The terminal, which never completed the exchange, reverses the sale on its next call: answered 00, and the
    // PIN stays voided.
    let id = common::demo_terminal("DEMO0004");
    let spec = common::demo_sale(30, "1129120000", ON_DEMAND, 2500);
    let rev = [&TPDU[..], &bcd().encode(&id.reversal(&spec, 32, false)).unwrap()[..]].concat();
    let out = DialupTerminal::call(&m, &rev, &script()).await.unwrap();
    let a = decode_answer(out.answer.as_ref().unwrap());
    assert_eq!((a.mti().to_string().as_str(), a.get_str(39)), ("0410", Some("00")));
    let s = stock(&rig.inv, rig.server.addr).await;
    assert_eq!((count(&s, ON_DEMAND, "sold"), count(&s, ON_DEMAND, "voided")), (1, 1));
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modem_answering_error_to_init_is_reported_and_retried() {
    let m = start_modem(ModemOptions {
        replies: CommandReply::Error,
        ..ModemOptions::default()
    })
    .unwrap();
    let rig = rig(
        "error",
        &line("m1", &m.device, "init_attempts = 2\nmodem_retry_secs = 1"),
    )
    .await;
    let b = board_until(&rig.gw, "the modem reported", |b| {
        state(b, "m1").is_some_and(|s| s.state == "not answering")
    })
    .await;
    assert_eq!(b["m1"].last_error.as_deref(), Some("init `ATZ`: ERROR"));
    assert!(m.commands().iter().filter(|c| *c == "ATZ").count() >= 2, "tried twice");
    // TCP terminals are not affected.
    let id = common::demo_terminal("DEMO0001");
    let mut t = rig.gw.terminal().await.unwrap();
    let spec = common::demo_sale(40, "1129120000", ON_DEMAND, 2500);
    assert_eq!(t.call(&id.sale(&spec, false)).await.unwrap().get_str(39), Some("00"));
    // Fixed: the line comes up on the next try.
    m.set_replies(CommandReply::Ok);
    board_until(&rig.gw, "the modem ready after the fix", |b| ready(b, "m1")).await;
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_lines_at_once_one_removed() {
    let mut modems = Vec::new();
    let mut lines = String::new();
    for i in 0..8 {
        let m = modem().await;
        lines.push_str(&line(&format!("m{i}"), &m.device, ""));
        modems.push(m);
    }
    let rig = rig("eight", &lines).await;
    board_until(&rig.gw, "eight modems ready", |b| {
        (0..8).all(|i| ready(b, &format!("m{i}")))
    })
    .await;
    modems[3].remove();
    let b = board_until(&rig.gw, "line m3 down", |b| {
        state(b, "m3").is_some_and(|s| s.state == "down" || s.last_error.is_some())
    })
    .await;
    assert!(
        b["m3"].last_error.is_some(),
        "the removed line is reported: {:?}",
        b["m3"]
    );
    let calls = modems.iter().enumerate().filter(|(i, _)| *i != 3).map(|(i, m)| {
        let m = m.clone();
        async move {
            let req = sale_request(i + 1, 50 + i as u32, if i % 2 == 0 { ON_DEMAND } else { PREFETCH });
            DialupTerminal::call(&m, &req, &script()).await
        }
    });
    let outs = futures_util::future::join_all(calls).await;
    let mut pins = Vec::new();
    for out in outs {
        let out = out.unwrap();
        let a = decode_answer(out.answer.as_ref().unwrap());
        assert_eq!(a.get_str(39), Some("00"));
        pins.push(pin_of(&a));
    }
    pins.sort();
    pins.dedup();
    assert_eq!(pins.len(), 7, "seven sales on seven lines, seven different PINs");
    let b = rig.gw.gateway.lines().borrow().clone();
    assert!(b["m3"].state != "ready" && b["m3"].state != "online", "{:?}", b["m3"]);
    assert!(b["m3"].opens >= 1);
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialup_tool_calls_through_a_real_gateway() {
    let d = dir("tool-link");
    std::fs::create_dir_all(&d).unwrap();
    let link = d.join("ttyPOS1");
    // The gateway starts first: its line is down (no device yet) and retried until the tool creates the link.
    let rig = rig("tool", &line("pos1", link.to_str().unwrap(), "")).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-dialup"))
        .args([
            "call",
            "--link",
            link.to_str().unwrap(),
            "--guard-ms",
            "50",
            "--count",
            "2",
        ])
        .args([
            "--terminal",
            "DEMO0005",
            "--product",
            ON_DEMAND,
            "--amount",
            "2500",
            "--stan",
            "70",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("code 00").count(), 2, "{stdout}");
    assert!(
        stdout.contains("PIN Pin([masked"),
        "PINs masked without --reveal: {stdout}"
    );
    let s = stock(&rig.inv, rig.server.addr).await;
    assert_eq!(count(&s, ON_DEMAND, "sold"), 2);
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_7e1_line_with_software_parity_and_a_text_dialect() {
    use pingate::link::parity::Parity;
    let m = start_modem(ModemOptions {
        parity: Parity::Even,
        ..ModemOptions::default()
    })
    .unwrap();
    // A pty forces 8N1: the gateway adds and strips the parity bit itself.
    let cfg = line(
        "m7",
        &m.device,
        "data_bits = 7\nparity = \"even\"\nsoftware_parity = true",
    )
    .replace("iso87-bcd", "iso87-ascii")
    .replace("tpdu = true", "tpdu = false");
    let rig = rig("7e1", &cfg).await;
    board_until(&rig.gw, "the modem ready", |b| ready(b, "m7")).await;
    let ascii = Dialects::builtin().get("iso87-ascii").unwrap().clone();
    let id = common::demo_terminal("DEMO0006");
    let spec = common::demo_sale(80, "1129120000", ON_DEMAND, 2500);
    let req = ascii.encode(&id.sale(&spec, false)).unwrap();
    let script = CallScript {
        parity: Parity::Even,
        ..script()
    };
    let out = DialupTerminal::call(&m, &req, &script).await.unwrap();
    let answer = ascii.decode(out.answer.as_ref().unwrap()).unwrap();
    assert_eq!(answer.get_str(39), Some("00"));
    // Every byte the gateway sent on the line carried even parity.
    let host: Vec<u8> = m
        .transcript()
        .iter()
        .filter(|c| c.dir == pingate::traffic::dialsim::Dir::Host)
        .flat_map(|c| c.bytes.to_vec())
        .collect();
    assert!(host.iter().any(|b| b & 0x80 != 0), "some bytes need the parity bit set");
    assert!(
        host.iter().all(|b| b.count_ones() % 2 == 0),
        "even parity on every byte"
    );
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directly_wired_terminal_with_length_framing() {
    use pingate::link::framing::{Frame, FrameCodec, Framing, Tpdu};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::{Decoder, Encoder};
    // No modem: the test holds the pty's other side and is the terminal.
    let (mut term, dev) = tokio_serial::SerialStream::pair().unwrap();
    use tokio_serial::SerialPort;
    let path = dev.name().unwrap();
    let capture = dir("direct-capture").with_extension("capture");
    let cfg = format!(
        "\n[[serial]]\nname = \"d1\"\ndevice = \"{path}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nlink = \"binary2\"\nbaud = 9600\n\
         capture = \"{}\"\ncapture_pins = \"omitted\"\n",
        capture.display()
    );
    let rig = rig("direct", &cfg).await;
    board_until(&rig.gw, "the line open", |b| {
        state(b, "d1").is_some_and(|s| s.state == "open")
    })
    .await;
    let mut codec = FrameCodec::new(Framing::Binary2, true, 4096);
    let mut buf = bytes::BytesMut::new();
    let req = sale_request(7, 90, PREFETCH);
    codec
        .encode(
            Frame {
                tpdu: Some(Tpdu::parse(req[..5].try_into().unwrap())),
                message: Bytes::copy_from_slice(&req[5..]),
            },
            &mut buf,
        )
        .unwrap();
    term.write_all(&buf).await.unwrap();
    let mut rbuf = bytes::BytesMut::new();
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(f) = codec.decode(&mut rbuf).unwrap() {
                return f;
            }
            term.read_buf(&mut rbuf).await.unwrap();
        }
    })
    .await
    .expect("an answer");
    assert_eq!(frame.tpdu.unwrap().bytes(), [0x60, 0x00, 0x01, 0x00, 0x03]);
    let answer = bcd().decode(&frame.message).unwrap();
    assert_eq!(answer.get_str(39), Some("00"));
    drop(dev);
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
    // Captured as the line frames it, the answer without its field 63 (`capture_pins = "omitted"`).
    let cap = pingate::traffic::capture::Capture::load(&capture).unwrap();
    assert_eq!((cap.framing, cap.other["link"].as_str()), (Framing::Binary2, "binary2"));
    assert_eq!(cap.records.len(), 2);
    assert_eq!(&cap.records[0].data[..], &req[..]);
    let captured = decode_answer(&cap.records[1].data);
    assert_eq!((captured.get_str(39), captured.get(63)), (Some("00"), None));
    let _ = std::fs::remove_file(&capture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directly_wired_stx_etx_terminal_runs_the_whole_contract() {
    use pingate::link::parity::Parity;
    use pingate::traffic::dialsim::{LineClient, LineMode, LineTerminal};
    use pingate::traffic::scenario::Scenario;
    use tokio_serial::SerialPort;
    let (term, dev) = tokio_serial::SerialStream::pair().unwrap();
    let path = dev.name().unwrap();
    let cfg = format!(
        "\n[[serial]]\nname = \"w1\"\ndevice = \"{path}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nbaud = 9600\n"
    );
    let rig = rig("wired", &cfg).await;
    board_until(&rig.gw, "the line open", |b| {
        state(b, "w1").is_some_and(|s| s.state == "open")
    })
    .await;
    let mut client = LineClient {
        line: LineTerminal::new(
            term,
            LineMode::StxEtx {
                quiet: Duration::from_millis(100),
            },
            Parity::None,
            Duration::from_secs(10),
        ),
        dialect: bcd(),
        tpdu: Some(pingate::link::framing::Tpdu::parse(TPDU)),
        mac: None,
    };
    let scenario = Scenario::parse(&std::fs::read_to_string("fixtures/scenarios/contract.toml").unwrap()).unwrap();
    let id = common::demo_terminal("DEMO0007");
    let results = scenario
        .run(&mut client, &id, "1129160000", Duration::from_secs(10))
        .await
        .unwrap();
    for r in &results {
        assert!(r.problem.is_none(), "step {}: {:?}", r.step, r.problem);
    }
    assert_eq!(results.len(), 13);
    client.line.end().await;
    let b = board_until(&rig.gw, "every answer acknowledged", |b| b["w1"].delivered == 13).await;
    assert_eq!(b["w1"].reversed, 0);
    drop(dev);
    rig.gw.stop().await;
    rig.server.stop().await;
    common::audit_ok(&rig.inv).await;
}
