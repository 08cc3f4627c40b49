//! The status page (`GET /status`) of a gateway and of a PIN server after a few sales, as a browser renders it:
//! headless Chromium (Debian package `chromium`, installed by `.ci/run`) dumps the DOM and takes a screenshot. The
//! page holds none of the PINs sold.
//!
//! `PINGATE_STATUS_SCREENSHOT=docs/status-page.png cargo test --test status_page` keeps the gateway's screenshot
//! there (the README's picture).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingate::demo::rig::{sample_modes, sample_products, start_gateway, start_server_with, Inventory};
use pingate::metrics::get;
use pingate::sale::PinReceipt;
use pingate::server::ServerOptions;
use pingate::store::handle::DbUrl;

/// Chromium, or a clear failure: CI installs it, and a test that skips itself when it is missing proves nothing.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.is_file(),
        "{} not found: install it (`apt-get install -y --no-install-recommends chromium`, as .ci/run does) or set \
         CHROMIUM to a Chromium binary",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `args`; its standard output.
async fn run_chromium(profile: &Path, url: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 90 s")
    .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of an HTML document: tags dropped, entities of the escaper undone, white space collapsed.
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "too short for a PNG: {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR", "no IHDR first");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

async fn screenshot(profile: &Path, url: &str, png: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(png);
    run_chromium(
        profile,
        url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
    )
    .await;
    let bytes = std::fs::read(png).expect("chromium wrote the screenshot");
    assert_eq!(png_size(&bytes), (1280, 900), "screenshot size");
    // A blank 1280×900 PNG compresses to a few KB; a page of tables and colours does not.
    assert!(
        bytes.len() > 30_000,
        "screenshot of {} bytes: nothing drawn?",
        bytes.len()
    );
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pages_render_in_chromium_without_pins() {
    chromium();
    let dir = common::fresh_dir("status", "page");
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(40)).unwrap();
    let server_metrics = pingate::demo::rig::free_local_addr().unwrap();
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
    // Two serial lines: one wired to a pty this test holds (open), one to a device that is not there (down).
    use tokio_serial::SerialPort;
    let (_term, dev) = tokio_serial::SerialStream::pair().unwrap();
    let path = dev.name().unwrap();
    let lines = format!(
        "\n[[serial]]\nname = \"wired1\"\ndevice = \"{path}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nbaud = 9600\n\
         \n[[serial]]\nname = \"gone1\"\ndevice = \"{}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nbaud = 9600\n",
        dir.join("no-such-tty").display()
    );
    let gw = start_gateway(&inv, "gw1", &[server.addr], 8, &sample_modes(3, 6), ("", &lines))
        .await
        .unwrap();
    let mut board = gw.gateway.lines();
    tokio::time::timeout(
        Duration::from_secs(10),
        board.wait_for(|b| {
            b.get("wired1").is_some_and(|l| l.state == "open") && b.get("gone1").is_some_and(|l| l.state == "down")
        }),
    )
    .await
    .expect("one line open, the other down, within 10 s")
    .unwrap();
    assert!(gw.cached_at_least("TOPUP-EU-10", 3, Duration::from_secs(10)).await);
    // Keys sent after the gateway's first second are sure to be new: sold from the cache.
    pingate::demo::rig::past_this_second().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_metrics: SocketAddr = l.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(pingate::metrics::serve(
        l,
        Arc::new(pingate::gateway::MetricsSource(gw.gateway.clone())),
        stop.clone(),
    ));

    // Sales from two terminals: the top-up from the cache, the gift card on demand.
    let mut pins = Vec::new();
    let mut stan = 0;
    // Field 7 of now: the gateway sells a key it is sure is new from its cache.
    let sent = pingate::traffic::sim::now_transmission();
    for (terminal, product, amount) in [
        ("DEMO0001", "TOPUP-EU-10", 1000),
        ("DEMO0001", "GIFT-25", 2500),
        ("DEMO0002", "TOPUP-EU-10", 1000),
        ("DEMO0002", "TOPUP-EU-10", 1000),
        ("DEMO0002", "GIFT-25", 2500),
    ] {
        stan += 1;
        let me = common::demo_terminal(terminal);
        let mut t = gw.terminal().await.unwrap();
        let answer = t
            .call(&me.sale(&common::demo_sale(stan, &sent, product, amount), false))
            .await
            .unwrap();
        assert_eq!(answer.get_str(39), Some("00"));
        let receipt = PinReceipt::from_tlv(answer.get(63).expect("field 63")).unwrap();
        pins.push(receipt.pin.expose().to_string());
    }

    // The server's page shows its stock once it was read after the sales.
    let mut server_page = String::new();
    for _ in 0..300 {
        server_page = get(server_metrics, "/status").await.unwrap().1;
        if text_of(&server_page).contains("GIFT-25 2500 38 0 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, gw_page) = get(gw_metrics, "/status").await.unwrap();
    assert_eq!(code, 200);
    for page in [&gw_page, &server_page] {
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(
            !page.contains("<script") && !page.contains(" src=") && !page.contains("href="),
            "{page}"
        );
        for pin in &pins {
            assert!(!page.contains(pin.as_str()), "a sold PIN is on the page");
        }
    }
    // Nor anything that looks like a key or a MAC from the gateway's files.
    let keys = std::fs::read_to_string(dir.join("journal-gw1.keys")).unwrap();
    for secret in keys.split(|c: char| !c.is_ascii_hexdigit()).filter(|s| s.len() >= 16) {
        assert!(!gw_page.contains(secret), "a journal key is on the page");
    }

    let profile = dir.join("chromium-profile");
    // The gateway's page as rendered.
    let dom = run_chromium(&profile, &format!("http://{gw_metrics}/status"), &["--dump-dom"]).await;
    let text = text_of(&dom);
    for want in [
        "pingate gateway",
        "gateway gw1",
        "yes ready",
        "sales from cache",
        "Listeners",
        "PIN servers",
        "closed",
        "Cache by product and amount",
        "TOPUP-EU-10 1000 prefetch",
        "GIFT-25 2500 on demand",
        "Store and forward",
        "Serial lines",
        "gone1 down",
        "wired1 open",
        "Terminals",
        "DEMO0001",
        "DEMO0002",
        "2 seen since start",
        "0 locked (MAC failures)",
    ] {
        assert!(
            text.contains(want),
            "{want:?} not in the rendered gateway page:\n{text}"
        );
    }
    // DEMO0002 made three requests, the last approved.
    let row = text.split("DEMO0002").nth(1).unwrap_or("");
    assert!(row.contains(" 3 00 "), "DEMO0002's row: {row}");
    // Three sales from the cache, none missed: level, marks (low 3, high 6), hits, misses and hit rate.
    let cache_row = text.split("TOPUP-EU-10 1000 prefetch").nth(1).unwrap_or("");
    assert!(cache_row.contains(" 3 0 100.0 %"), "the cache row: {cache_row}");
    assert!(text.contains("3 sales from cache 2 sales on demand"), "{text}");
    for pin in &pins {
        assert!(!dom.contains(pin.as_str()), "a sold PIN is in the rendered page");
    }

    // The server's page as rendered: stock by product and amount, with days of cover (measuring: the server is new).
    let dom = run_chromium(&profile, &format!("http://{server_metrics}/status"), &["--dump-dom"]).await;
    let text = text_of(&dom);
    for want in [
        "pingate PIN server",
        "Stock by product and amount",
        "GIFT-25 2500 38 0 2",
        "TOPUP-EU-10 1000",
        "days of cover",
        "Days of cover = available PINs ÷ PINs sold per day",
        "measuring",
    ] {
        assert!(text.contains(want), "{want:?} not in the rendered server page:\n{text}");
    }

    // Screenshots of both.
    let shot = dir.join("gateway.png");
    let png = screenshot(&profile, &format!("http://{gw_metrics}/status"), &shot).await;
    screenshot(
        &profile,
        &format!("http://{server_metrics}/status"),
        &dir.join("server.png"),
    )
    .await;
    if let Some(keep) = std::env::var_os("PINGATE_STATUS_SCREENSHOT") {
        std::fs::write(&keep, &png).unwrap();
    }

    stop.cancel();
    gw.stop().await;
    server.stop().await;
}
