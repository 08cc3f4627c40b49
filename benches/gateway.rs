//! Load benchmark: simulated terminals → gateway → PIN server, beside a bare echo server with the same framing
//! measured in the same run (the ceiling). Everything on loopback in this process except where said.
//!
//! `cargo bench --bench gateway [-- SCENARIO…] [--connections N] [--in-flight N] [--seconds N]`
//! Scenarios: `echo`, `prefetch`, `on-demand`, `slow-link` (50 ms each way between gateway and server, a steady
//! 500 sales/s), `idle` (10,000 idle terminal connections to a gateway process; its memory). Default: all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pingate::demo::rig::{
    free_local_addr, past_this_second, sample_modes, sample_products, start_gateway, start_server, terminal_when_up,
    GatewayFiles, GatewayProcess, Inventory,
};
use pingate::iso8583::{Dialect, Dialects};
use pingate::traffic::load::{echo_server, run, LoadReport, LoadSpec};
use pingate::traffic::procfs::rss_kib;
use pingate::traffic::sim::{DIALECT, FRAMING};
use tokio::net::TcpListener;

struct Args {
    scenarios: Vec<String>,
    connections: usize,
    in_flight: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        scenarios: Vec::new(),
        connections: 64,
        in_flight: 4,
        seconds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--connections" => a.connections = it.next().and_then(|v| v.parse().ok()).expect("--connections N"),
            "--in-flight" => a.in_flight = it.next().and_then(|v| v.parse().ok()).expect("--in-flight N"),
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--bench" => {}
            s if !s.starts_with('-') => a.scenarios.push(s.to_string()),
            _ => {}
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios = ["echo", "prefetch", "on-demand", "slow-link", "idle"]
            .map(String::from)
            .to_vec();
    }
    a
}

fn dialect() -> Arc<Dialect> {
    Arc::new(Dialects::builtin().get(DIALECT).unwrap().clone())
}

/// The load's field 7 is now: a key far from the gateway's clock, or of the second it started in, goes to the PIN
/// server (`clock_skew_secs`), so the gateway must have started in an earlier second ([`pingate::demo::rig::past_this_second`]). Runs keep
/// their keys apart by their time.
fn spec(addr: SocketAddr, a: &Args, product: &str, amount: u64) -> LoadSpec {
    LoadSpec {
        addr,
        framing: FRAMING,
        tpdu: None,
        connections: a.connections,
        in_flight: a.in_flight,
        rate: None,
        duration: Duration::from_secs(a.seconds),
        terminal_prefix: "DEMO".into(),
        merchant: pingate::traffic::sim::MERCHANT.into(),
        mix: vec![pingate::traffic::load::MixItem {
            product: product.into(),
            amount,
            weight: 1,
            currency: pingate::traffic::load::DEFAULT_CURRENCY.into(),
        }],
        transmission: None,
        progress: None,
    }
}

fn line(name: &str, r: LoadReport) {
    let codes: Vec<String> = r.codes.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    println!(
        "{name:<34} {:>9.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} sent; {})",
        r.rate(),
        r.quantile_ms(0.5),
        r.quantile_ms(0.99),
        r.sent,
        codes.join(" ")
    );
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-bench-gw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Waits (30 s at most) until the cache holds `n` top-ups; says so when it did not.
async fn wait_cached(gw: &pingate::demo::rig::GatewayHandle, n: usize) {
    if !gw.cached_at_least("TOPUP-EU-10", n, Duration::from_secs(30)).await {
        eprintln!("cache did not reach {n}: {:?}", gw.gateway.stock().cache);
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        println!(
            "{} connections, {} in flight each (closed loop), {} s per line, framing binary2, dialect {DIALECT}",
            a.connections, a.in_flight, a.seconds
        );
        let d = dialect();
        if a.scenarios.iter().any(|s| s == "echo") {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(echo_server(l, FRAMING, std::future::pending::<()>()));
            let r = run(spec(addr, &a, "TOPUP-EU-10", 1000), d.clone()).await.unwrap();
            line("echo server (ceiling)", r);
        }
        let need = |s: &str| a.scenarios.iter().any(|x| x == s);
        if need("prefetch") || need("on-demand") {
            let pins = 120_000 * a.seconds as usize;
            let inv = Inventory::create(&workdir("load"), &["gw1"], &sample_products(pins)).unwrap();
            let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
            let gw = start_gateway(
                &inv,
                "gw1",
                &[server.addr],
                a.connections,
                &sample_modes(50_000, 200_000),
                ("", "max_in_flight = 64"),
            )
            .await
            .unwrap();
            if need("prefetch") {
                wait_cached(&gw, 50_000).await;
                past_this_second().await;
                let r = run(spec(gw.addr, &a, "TOPUP-EU-10", 1000), d.clone()).await.unwrap();
                let stock = gw.gateway.stock();
                line("prefetch (journal fsync'd)", r);
                println!(
                    "  cache hits {} misses {}; confirms still queued {}",
                    stock.cache[0].hits, stock.cache[0].misses, stock.pending_confirms
                );
                gw.gateway.flush(Duration::from_secs(120)).await;
            }
            if need("on-demand") {
                let r = run(spec(gw.addr, &a, "GIFT-25", 2500), d.clone()).await.unwrap();
                line("on demand (SQLite server)", r);
            }
            gw.stop().await;
            server.stop().await;
        }
        if need("slow-link") {
            let inv = Inventory::create(&workdir("slow"), &["gw1"], &sample_products(20_000)).unwrap();
            let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let proxy = l.local_addr().unwrap();
            tokio::spawn(pingate::traffic::load::delay_proxy(
                l,
                server.addr,
                Duration::from_millis(50),
            ));
            let gw = start_gateway(
                &inv,
                "gw1",
                &[proxy],
                a.connections,
                &sample_modes(200, 5_000),
                ("", ""),
            )
            .await
            .unwrap();
            wait_cached(&gw, 200).await;
            past_this_second().await;
            let mut s = spec(gw.addr, &a, "TOPUP-EU-10", 1000);
            s.rate = Some(500.0);
            s.duration = Duration::from_secs(a.seconds.max(10));
            let r = run(s, d.clone()).await.unwrap();
            let stock = gw.gateway.stock();
            let (h, m) = (stock.cache[0].hits, stock.cache[0].misses);
            line("slow link, 500/s open loop", r);
            println!(
                "  cache hit rate {:.2}% ({h} hits, {m} misses)",
                100.0 * h as f64 / (h + m).max(1) as f64
            );
            gw.stop().await;
            server.stop().await;
        }
        if need("idle") {
            idle().await;
        }
    });
}

/// 10,000 idle terminal connections to a gateway running as its own process: its resident memory before and after.
async fn idle() {
    let inv = Inventory::create(&workdir("idle"), &["gw1"], &sample_products(100)).unwrap();
    let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let listen = free_local_addr().unwrap();
    let files = GatewayFiles::write(
        &inv,
        "gw1",
        &[server.addr],
        listen,
        1,
        &sample_modes(10, 10),
        // Idle connections are what is measured: kept past the first-frame deadline.
        ("", "max_per_source = 20000\nfirst_frame_timeout_ms = 600000"),
    )
    .unwrap();
    let gateway = GatewayProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_pingate")),
        &files.config,
        &inv.dir.join("gateway.log"),
        &[],
    )
    .unwrap();
    let pid = gateway.id();
    let mut t = terminal_when_up(listen).await.expect("gateway up");
    let id = pingate::traffic::sim::Identity {
        terminal_id: "DEMO0001".into(),
        merchant_id: pingate::traffic::sim::MERCHANT.into(),
    };
    let _ = t.call(&id.network(1, "1128000005", "301")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid).unwrap_or(0);
    let mut conns = Vec::new();
    for _ in 0..10_000 {
        match tokio::net::TcpStream::connect(listen).await {
            Ok(s) => conns.push(s),
            Err(e) => {
                eprintln!("connect: {e}");
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Still served with all of them open.
    let ok = t.call(&id.network(2, "1128000005", "301")).await.is_ok();
    let after = rss_kib(pid).unwrap_or(0);
    println!(
        "idle connections: {} open; gateway RSS {:.1} MiB before, {:.1} MiB after ({:.1} KiB per connection); still answering: {ok}",
        conns.len(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / conns.len().max(1) as f64
    );
    drop(conns);
    drop(gateway);
    server.stop().await;
}
