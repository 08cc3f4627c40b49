//! Throughput and latency of the real PIN server (TLS 1.3 + PSP + store) on this machine, for each backend:
//! `ping` (TLS and protocol only: the ceiling measured in the same run), on-demand `sell`, `reserve` of 10, and
//! `cache x10` (reserve 10, then confirm the 10 as sold in one `confirm_batch`: a prefetching gateway's load), and
//! `cache x256` (the same by 256, the batch size a prefetching gateway uses for its confirms: the PIN server's own
//! ceiling for prefetch sales, with no gateway on the machine).
//!
//! `cargo bench --bench pin_server [-- sqlite|postgres] [--op NAME]... [--seconds N] [--connections N]
//! [--in-flight N]` (`--op`: ping, sell, reserve-x10, cache-x10, cache-x256; all by default)
//!
//! `cargo bench --bench pin_server -- direct [--seconds N] [--terminals N]`: the SQLite store alone, called on this thread (no TLS,
//! no protocol, no other thread): CPU time per PIN of a sale (batches of 64) and of a cached PIN (reserve 256,
//! then confirm the 256 in one transaction), each with its disk syncs.
//! PostgreSQL at `$PINGATE_BENCH_PG` (default postgres://postgres@127.0.0.1:5432/test, in a scratch schema).
//!
//! `cargo bench --bench pin_server -- process [--op cache-x256|cache-x10|sell]... [--seconds N] [--runs N]
//! [--connections N] [--in-flight N] [--perf FILE]`: a real `pingate server` process (SQLite, its own file) and this
//! process as its gateways over TLS; the server's CPU time (user + system, from `/proc/PID/stat`) per PIN over each
//! measurement, after a second of warm-up: what a cached PIN (reserved, then confirmed in a `confirm_batch`) or an
//! on-demand sale costs the PIN server as a whole (TLS, protocol, store thread, disk syncs). `--perf FILE` records
//! the server with `perf record --call-graph dwarf` during the first measurement of each operation;
//! `$PINGATE_BENCH_SERVER` runs another build's `pingate` instead of this one's (a before/after on the same harness;
//! the database is made by this build, so the other must open its schema).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingate::crypto::PinCipher;
use pingate::demo::rig::{serve, Inventory};
use pingate::psp::client::PspClient;
use pingate::psp::{ConfirmItem, Request, Response, Terminal};
use pingate::sale::Pin;
use pingate::server::ServerOptions;
use pingate::store::handle::{DbUrl, StoreHandle, StoreOptions};
use pingate::store::postgres::PgStore;
use pingate::store::sqlite::SqliteStore;
use pingate::store::{NewPin, Op, Outcome, Product, SaleContext, SellRequest};
use pingate::tls::{certs_init, client_config, CertsInit};
use pingate::traffic::procfs::CpuReading;

struct Args {
    backends: Vec<String>,
    seconds: u64,
    connections: usize,
    in_flight: usize,
    ops: Vec<&'static str>,
    direct: bool,
    process: bool,
    runs: usize,
    perf: Option<String>,
    terminals: usize,
}

/// The measurements, in the order they run: `--op` takes the name with `-` for the space.
const OPS: [&str; 5] = ["ping", "sell", "reserve x10", "cache x10", "cache x256"];

fn args() -> Args {
    let mut a = Args {
        backends: vec![],
        seconds: 5,
        connections: 8,
        in_flight: 32,
        ops: vec![],
        direct: false,
        process: false,
        runs: 3,
        perf: None,
        terminals: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--seconds" => a.seconds = it.next().unwrap().parse().unwrap(),
            "--connections" => a.connections = it.next().unwrap().parse().unwrap(),
            "--in-flight" => a.in_flight = it.next().unwrap().parse().unwrap(),
            "--op" => {
                let name = it.next().unwrap().replace('-', " ");
                let op = OPS.iter().find(|o| **o == name);
                a.ops
                    .push(op.unwrap_or_else(|| panic!("--op: one of {OPS:?} (with - for the space)")));
            }
            "direct" => a.direct = true,
            "process" => a.process = true,
            "--runs" => a.runs = it.next().unwrap().parse().unwrap(),
            "--perf" => a.perf = it.next(),
            "--terminals" => a.terminals = it.next().unwrap().parse().unwrap(),
            "sqlite" | "postgres" => a.backends.push(x),
            _ => {} // cargo's own flags (--bench)
        }
    }
    if a.backends.is_empty() {
        a.backends = vec!["sqlite".into(), "postgres".into()];
    }
    if a.ops.is_empty() {
        a.ops = if a.process {
            vec!["cache x256", "sell"]
        } else {
            OPS.to_vec()
        };
    }
    a
}

fn pins(n: usize) -> Vec<NewPin> {
    (0..n)
        .map(|i| NewPin {
            product: "TOPUP".into(),
            amount: 1000,
            pin: Pin::new(format!("8{i:011}")),
            serial: format!("B{i:09}"),
            expiry: None,
            receipt: vec!["Dial *100*PIN#".into()],
        })
        .collect()
}

fn product() -> Product {
    Product {
        code: "TOPUP".into(),
        name: "Top-up".into(),
        supplier: "Telco".into(),
        currency: "978".into(),
        denominations: vec![1000],
    }
}

struct Stats {
    ok: u64,
    items: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

async fn load(clients: &[Arc<PspClient>], in_flight: usize, secs: u64, op: &'static str) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    // Sale keys are numbered across measurements: a key used again would be a repeat (or, for a confirm of another
    // PIN, a conflict), not a new sale.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = &COUNTER;
    let mut tasks = Vec::new();
    for (ci, c) in clients.iter().enumerate() {
        for t in 0..in_flight {
            let (c, stop) = (c.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut items, mut errors, mut lat) = (0u64, 0u64, 0u64, Vec::with_capacity(100_000));
                // This task's terminal, for the sale with this STAN.
                let terminal = |stan: String, rrn: String| Terminal {
                    terminal_id: format!("T{ci:03}{t:04}"),
                    merchant_id: "MERCHANT0000001".into(),
                    stan,
                    transmission: "1128173500".into(),
                    rrn,
                };
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let req = match op {
                        "ping" => Request::Ping,
                        "sell" => Request::Sell {
                            product: "TOPUP".into(),
                            amount: 1000,
                            terminal: terminal(format!("{n:09}"), format!("{n:012}")),
                        },
                        _ => Request::Reserve {
                            product: "TOPUP".into(),
                            amount: 1000,
                            count: if op == "cache x256" { 256 } else { 10 },
                            lease_secs: 600,
                        },
                    };
                    let start = Instant::now();
                    if op.starts_with("cache") {
                        // The prefetch workload as the server sees it: reserve 10 (or 256), then confirm them as sold
                        // in one confirm_batch. Counted as 10 (or 256) PINs sold.
                        let pins = match c.call(req).await {
                            Ok(Response::Reserved { pins, .. }) if !pins.is_empty() => pins,
                            Ok(_) => break,
                            Err(_) => {
                                errors += 1;
                                break;
                            }
                        };
                        let confirms = pins
                            .iter()
                            .enumerate()
                            .map(|(k, p)| ConfirmItem {
                                pin_id: p.pin_id,
                                terminal: terminal(format!("{n:09}{k:03}"), format!("{n:012}")),
                            })
                            .collect();
                        match c.call(Request::ConfirmBatch { confirms }).await {
                            Ok(Response::ConfirmedBatch { results }) => {
                                ok += 1;
                                items += results.iter().filter(|r| r.error.is_none()).count() as u64;
                            }
                            _ => {
                                errors += 1;
                                break;
                            }
                        }
                        lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        continue;
                    }
                    match c.call(req).await {
                        Ok(Response::Reserved { pins, .. }) if !pins.is_empty() => {
                            ok += 1;
                            items += pins.len() as u64;
                        }
                        Ok(Response::Reserved { .. }) => break, // stock ran out
                        Ok(_) => {
                            ok += 1;
                            items += 1;
                        }
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                    lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                (ok, items, errors, lat)
            }));
        }
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut s = Stats {
        ok: 0,
        items: 0,
        errors: 0,
        latencies_us: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (ok, items, errors, lat) = t.await.unwrap();
        s.ok += ok;
        s.items += items;
        s.errors += errors;
        s.latencies_us.extend(lat);
    }
    s.elapsed = start.elapsed();
    s.latencies_us.sort_unstable();
    s
}

fn report(backend: &str, op: &str, s: &Stats) {
    let secs = s.elapsed.as_secs_f64();
    let l = &s.latencies_us;
    println!(
        "{backend:<9} {op:<12} {:>9.0} req/s {:>9.0} PINs/s  p50 {:>6.2} ms  p90 {:>6.2}  p99 {:>6.2}  p99.9 {:>6.2}  max {:>7.2}  errors {}",
        s.ok as f64 / secs,
        if op == "ping" { 0.0 } else { s.items as f64 / secs },
        pct(l, 0.5),
        pct(l, 0.9),
        pct(l, 0.99),
        pct(l, 0.999),
        pct(l, 1.0),
        s.errors
    );
}

/// The SQLite store's own cost per PIN, without the server around it: the lower bound of what each sale costs the
/// PIN server's one store thread.
fn direct(dir: &std::path::Path, secs: u64, terminals: usize) {
    let inv = Inventory::create(dir, &[], &[]).unwrap();
    let mut s = SqliteStore::open(&inv.db, PinCipher::from_spec(&inv.pin_keys).unwrap()).unwrap();
    s.upsert_product(&product()).unwrap();
    let stock = 400_000;
    s.import(&pins(stock)).unwrap();
    let sale = |n: usize| SaleContext {
        gateway: "gw1".into(),
        // As terminals number their requests: each its own STAN counter, the transmission time moving on.
        terminal_id: format!("T{:07}", n % terminals),
        merchant_id: "MERCHANT0000001".into(),
        stan: format!("{:06}", (n / terminals) % 1_000_000),
        transmission: format!("1206{:06}", n / 2_000),
        rrn: format!("{n:012}"),
    };
    println!("SQLite store alone, one thread, {secs} s per line ({stock} PINs, sales of {terminals} terminals)");
    let mut n = 0;
    for what in ["sell x64", "cache x256"] {
        // This thread's CPU time (user + system, in clock ticks of 10 ms: enough over seconds).
        let (start, cpu, mut pins) = (Instant::now(), CpuReading::of_this_thread().unwrap(), 0usize);
        while start.elapsed() < Duration::from_secs(secs) && pins + 512 < stock / 2 {
            if what == "sell x64" {
                let ops: Vec<Op> = (0..64)
                    .map(|_| {
                        n += 1;
                        Op::Sell(SellRequest {
                            product: "TOPUP".into(),
                            amount: 1000,
                            sale: sale(n),
                            repeat_since: 0,
                        })
                    })
                    .collect();
                pins += s.apply_batch(&ops).into_iter().filter(|r| r.is_ok()).count();
            } else {
                let reserved = match s.apply_batch(&[Op::Reserve {
                    holder: "gw1".into(),
                    product: "TOPUP".into(),
                    amount: 1000,
                    count: 256,
                    lease_until: i64::MAX,
                }]) {
                    mut r if matches!(r[0], Ok(Outcome::Reserved(_))) => match r.remove(0) {
                        Ok(Outcome::Reserved(p)) => p,
                        _ => unreachable!(),
                    },
                    r => panic!("reserve: {r:?}"),
                };
                let ops: Vec<Op> = reserved
                    .iter()
                    .map(|p| {
                        n += 1;
                        Op::Confirm {
                            holder: "gw1".into(),
                            pin_id: p.pin_id,
                            sale: sale(n),
                        }
                    })
                    .collect();
                pins += s.apply_batch(&ops).into_iter().filter(|r| r.is_ok()).count();
            }
        }
        let (t, cpu) = (
            start.elapsed(),
            cpu.until(&CpuReading::of_this_thread().unwrap()).unwrap(),
        );
        println!(
            "direct    {what:<12} {:>9.0} PINs/s  {:>6.1} µs per PIN, of which CPU {:>5.1} µs (user+system)",
            pins as f64 / t.as_secs_f64(),
            t.as_secs_f64() * 1e6 / pins as f64,
            cpu.as_secs_f64() * 1e6 / pins as f64
        );
    }
}

/// A `pingate server` process, killed when dropped.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server's CPU time per PIN as a separate process: see the module's documentation.
async fn process(a: &Args, dir: &std::path::Path) {
    use std::io::BufRead;
    let certs = certs_init(&dir.join("certs"), &CertsInit::default()).unwrap();
    let path = dir.join("pins.db");
    // Enough stock for every measurement at above the rates seen (about 30,000 PINs/s).
    let stock = 40_000 * (a.seconds as usize + 1) * a.runs * a.ops.len() + 100_000;
    let db = format!("sqlite:{}", path.display());
    let s = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
    // `$PINGATE_BENCH_SERVER`: another build's binary (the same harness measures a build before a change). The
    // inventory is made by the binary measured, through its command line (its schema).
    let binary = std::env::var("PINGATE_BENCH_SERVER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pingate").into());
    let mut csv = String::from("product,amount,pin,serial,expiry,receipt\n");
    for p in pins(stock) {
        csv.push_str(&format!(
            "{},{},{},{},,{}\n",
            p.product,
            p.amount,
            p.pin.expose(),
            p.serial,
            p.receipt[0]
        ));
    }
    std::fs::write(dir.join("pins.csv"), csv).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(&binary).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "pingate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&[
        "pins",
        "product",
        "--db",
        &db,
        "--code",
        "TOPUP",
        "--name",
        "Top-up",
        "--supplier",
        "Telco",
    ]
    .into_iter()
    .chain(["--currency", "978", "--amounts", "1000"])
    .collect::<Vec<_>>());
    cli(&[
        "pins",
        "import",
        "--db",
        &db,
        "--pin-keys",
        &s(certs.pin_keys()),
        &s(dir.join("pins.csv")),
    ]);
    let _ = std::fs::remove_file(dir.join("pins.csv"));
    let mut child = std::process::Command::new(&binary)
        .args(["server", "--db", &db, "--listen", "127.0.0.1:0"])
        .args(["--cert", &s(certs.server_cert()), "--key", &s(certs.server_key())])
        .args(["--client-ca", &s(certs.server_ca()), "--gateways", &s(certs.gateways())])
        .args(["--pin-keys", &s(certs.pin_keys())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let server = ServerProcess(child);
    let pid = server.0.id();
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(i) = line.find("addr=Some(") {
            let rest = &line[i + "addr=Some(".len()..];
            break rest[..rest.find(')').unwrap()].parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    let ctls = Arc::new(
        client_config(
            &certs.gateway_cert("gw1"),
            &certs.gateway_key("gw1"),
            &certs.gateway_ca("gw1"),
        )
        .unwrap(),
    );
    let mut clients = Vec::new();
    for _ in 0..a.connections {
        clients.push(Arc::new(
            PspClient::connect(addr, "localhost", ctls.clone()).await.unwrap().0,
        ));
    }
    println!(
        "pingate server as a process (pid {pid}, SQLite, {stock} PINs): {} connections x {} in flight, {} s per run",
        a.connections, a.in_flight, a.seconds
    );
    for &op in &a.ops {
        // Warm-up: connections, statement caches, the database's first pages.
        load(&clients, a.in_flight, 1, op).await;
        for run in 0..a.runs {
            let perf = match (&a.perf, run) {
                (Some(file), 0) => Some(
                    std::process::Command::new("perf")
                        .args([
                            "record",
                            "-F",
                            "999",
                            "--call-graph",
                            "dwarf,16384",
                            "-p",
                            &pid.to_string(),
                            "-o",
                        ])
                        .arg(format!("{file}.{}", op.replace(' ', "-")))
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap(),
                ),
                _ => None,
            };
            let cpu = CpuReading::of_process(pid).unwrap();
            let s = load(&clients, a.in_flight, a.seconds, op).await;
            let cpu = cpu.until(&CpuReading::of_process(pid).unwrap()).unwrap();
            if let Some(mut p) = perf {
                let _ = std::process::Command::new("kill")
                    .args(["-INT", &p.id().to_string()])
                    .status();
                let _ = p.wait();
            }
            let secs = s.elapsed.as_secs_f64();
            println!(
                "process   {op:<12} {:>9.0} PINs/s  server CPU {:>5.1} µs per PIN ({:>4.0}% of a core)  p50 {:>6.2} ms  p99 {:>6.2}  errors {}",
                s.items as f64 / secs,
                cpu.as_secs_f64() * 1e6 / s.items.max(1) as f64,
                cpu.as_secs_f64() * 100.0 / secs,
                pct(&s.latencies_us, 0.5),
                pct(&s.latencies_us, 0.99),
                s.errors
            );
        }
    }
    drop(clients);
    drop(server);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("pingate-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if a.process {
        process(&a, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if a.direct {
        direct(&dir, a.seconds, a.terminals);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let inv = Inventory::create(&dir, &["gw1"], &[]).unwrap();
    let keys = &inv.pin_keys;
    let ctls = inv.gateway_tls("gw1").unwrap();
    println!(
        "PIN server benchmark: {} connections x {} in flight, {} s per measurement, {} cores",
        a.connections,
        a.in_flight,
        a.seconds,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    for backend in &a.backends {
        let stock = match (backend.as_str(), a.ops.len()) {
            ("sqlite", 1) => 400_000, // one measurement: enough for it alone, and a shorter import
            ("sqlite", _) => 600_000,
            _ => 400_000,
        };
        let schema = format!("bench{}", std::process::id());
        let pg = std::env::var("PINGATE_BENCH_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let t = Instant::now();
        let (url, opts) = if backend == "sqlite" {
            let path = inv.db.clone();
            let mut s = SqliteStore::open(&path, PinCipher::from_spec(keys).unwrap()).unwrap();
            s.upsert_product(&product()).unwrap();
            s.import(&pins(stock)).unwrap();
            (DbUrl::Sqlite(path), StoreOptions::default())
        } else {
            let mut s = PgStore::connect(&pg, Some(&schema), PinCipher::from_spec(keys).unwrap())
                .await
                .unwrap();
            s.upsert_product(&product()).await.unwrap();
            s.import(&pins(stock)).await.unwrap();
            let pg_connections = std::env::var("PINGATE_BENCH_PG_CONNECTIONS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(StoreOptions::default().pg_connections);
            (
                DbUrl::Postgres(pg.clone()),
                StoreOptions {
                    pg_schema: Some(schema.clone()),
                    pg_connections,
                    ..StoreOptions::default()
                },
            )
        };
        println!(
            "{backend:<9} import       {:>9.0} PINs/s ({stock} PINs, encrypted, one transaction)",
            stock as f64 / t.elapsed().as_secs_f64()
        );
        let store = StoreHandle::open(&url, keys, &opts).await.unwrap();
        let server = serve(&inv, store, "127.0.0.1:0".parse().unwrap(), ServerOptions::default())
            .await
            .unwrap();
        let addr = server.addr;
        let mut clients = Vec::new();
        for _ in 0..a.connections {
            clients.push(Arc::new(
                PspClient::connect(addr, "localhost", ctls.clone()).await.unwrap().0,
            ));
        }
        for &op in &a.ops {
            let s = load(&clients, a.in_flight, a.seconds, op).await;
            report(backend, op, &s);
        }
        drop(clients);
        server.stop().await;
        if backend == "postgres" {
            let (c, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
