//! `pingate demo`: the whole system in one process with no setup — certificates, a SQLite inventory with sample
//! products, a PIN server and a gateway in a temporary folder ([`rig`]) — driven by simulated terminals, with a short
//! report.

pub mod rig;

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::psp::{Request, Response};
use crate::sale::{PinReceipt, ResponseCode};
use crate::traffic::secure::MacSigner;
use crate::traffic::sim::{now_transmission, Identity, SaleSpec, TerminalClient, DIALECT, FRAMING, MERCHANT};
use rig::{
    free_local_addr, past_this_second, sample_modes, sample_products, start_gateway, start_server_with, Inventory,
};

/// The demo terminals' MAC keys, sealed under [`TERMINAL_KEK`] (both in the demo's folder).
pub const TERMINAL_KEYS: &str = "terminal-keys.toml";
/// The key-encrypting key of [`TERMINAL_KEYS`].
pub const TERMINAL_KEK: &str = "terminal.kek";

/// A KEK and an AES-CMAC key for each of the demo terminals `DEMO0001`…, written into `dir`; the signer that MACs
/// their requests.
fn terminal_keys(dir: &std::path::Path, terminals: usize) -> Result<MacSigner, String> {
    let kek_path = dir.join(TERMINAL_KEK);
    crate::tls::write_new_key(&kek_path).map_err(|e| e.to_string())?;
    let kek = crate::terminal_keys::load_kek(&kek_path).map_err(|e| e.to_string())?;
    let mut file =
        crate::terminal_keys::TerminalKeyFile::load_or_new(&dir.join(TERMINAL_KEYS)).map_err(|e| e.to_string())?;
    let now = crate::clock::unix_now();
    for t in 1..=terminals {
        let key = crate::mac::MacKey::generate(crate::mac::MacAlgorithm::AesCmac).map_err(|e| e.to_string())?;
        file.add(&kek, &format!("DEMO{t:04}"), &key, now, None)
            .map_err(|e| e.to_string())?;
    }
    file.save(&dir.join(TERMINAL_KEYS)).map_err(|e| e.to_string())?;
    // The keys as the gateway will open them, from the file in memory (not read back from disk).
    let keys = file.open(&kek, now).map_err(|e| e.to_string())?;
    Ok(MacSigner::from_keys(keys))
}

/// Options of `pingate demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub sales: usize,
    pub terminals: usize,
    pub keep_running: bool,
}

/// What the demo measured.
#[derive(Debug, Default)]
pub struct Report {
    pub approved: usize,
    pub declined: Vec<(String, usize)>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub latency_ms: Vec<(String, [f64; 3])>,
    pub repeat_same_pin: bool,
    pub reversal_code: String,
    pub stock_left: Vec<(String, i64, i64)>,
    pub elapsed: Duration,
}

fn percentiles(v: &mut [Duration]) -> [f64; 3] {
    [0.5, 0.95, 0.99].map(|q| crate::traffic::load::quantile_ms(v, q))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "sales approved: {} in {:.2} s",
            self.approved,
            self.elapsed.as_secs_f64()
        )?;
        for (code, n) in &self.declined {
            writeln!(f, "declined {code}: {n}")?;
        }
        let total = (self.cache_hits + self.cache_misses).max(1);
        writeln!(
            f,
            "prefetch cache: {} hits, {} misses ({:.1}% hit rate)",
            self.cache_hits,
            self.cache_misses,
            100.0 * self.cache_hits as f64 / total as f64
        )?;
        for (mode, [p50, p95, p99]) in &self.latency_ms {
            writeln!(f, "latency {mode}: p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms")?;
        }
        writeln!(
            f,
            "repeat (0201) got the same PIN: {}",
            if self.repeat_same_pin { "yes" } else { "NO" }
        )?;
        writeln!(f, "reversal (0400) answered: {}", self.reversal_code)?;
        for (p, amount, n) in &self.stock_left {
            writeln!(f, "stock left at the PIN server: {p} {amount}: {n} available")?;
        }
        Ok(())
    }
}

/// Runs the demo (see the module doc). With `keep_running`, leaves everything up until `shutdown` (the command line
/// passes Ctrl-C or SIGTERM).
pub async fn run(opts: DemoOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<Report, String> {
    let started = Instant::now();
    // A fresh start in a folder used before.
    let _ = std::fs::remove_dir_all(opts.dir.join("certs"));
    for f in [
        "pins.db",
        "pins.db-wal",
        "pins.db-shm",
        "gateway-demo-gw.journal",
        "journal-demo-gw.keys",
        TERMINAL_KEYS,
        TERMINAL_KEK,
    ] {
        let _ = std::fs::remove_file(opts.dir.join(f));
    }
    let products = sample_products(opts.sales + 500);
    let inv = Inventory::create(&opts.dir, &["demo-gw"], &products)?;
    // Kept running, both serve their metrics and status pages on loopback, for a look in a browser.
    let server_metrics = if opts.keep_running {
        Some(free_local_addr()?)
    } else {
        None
    };
    let server = start_server_with(
        &inv,
        &crate::store::handle::DbUrl::Sqlite(inv.db.clone()),
        "127.0.0.1:0".parse().expect("address"),
        crate::server::ServerOptions {
            metrics: server_metrics,
            ..crate::server::ServerOptions::default()
        },
    )
    .await?;
    // Every demo terminal has a MAC key (AES-CMAC), and the listener requires MACs: a terminal id read off a receipt
    // buys nothing.
    let signer = terminal_keys(&opts.dir, opts.terminals.max(1))?;
    let gw = start_gateway(
        &inv,
        "demo-gw",
        &[server.addr],
        opts.terminals.max(1),
        &sample_modes(20, 200),
        (
            &format!("terminal_keys_file = \"{TERMINAL_KEYS}\"\nterminal_kek_file = \"{TERMINAL_KEK}\""),
            "mac = \"required\"\nmac_algorithm = \"aes-cmac\"",
        ),
    )
    .await?;
    // Let the first refill land, as a gateway that has been up a moment would have it, and the clock pass the second
    // the gateway started in (a key of that second may have been sold before the start: such sales go to the PIN
    // server, not the cache; see `clock_skew_secs`).
    tokio::time::sleep(Duration::from_millis(300)).await;
    past_this_second().await;

    let sales_per_terminal = opts.sales.div_ceil(opts.terminals.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 1..=opts.terminals.max(1) {
        let mut term =
            TerminalClient::connect_secured(gw.addr, FRAMING, None, gw.dialect.clone(), None, Some(signer.clone()))
                .await
                .map_err(|e| e.to_string())?;
        tasks.spawn(async move {
            let id = Identity {
                terminal_id: format!("DEMO{t:04}"),
                merchant_id: MERCHANT.into(),
            };
            let mut out: Vec<(String, Duration, String, Option<PinReceipt>, SaleSpec)> = Vec::new();
            for i in 0..sales_per_terminal {
                let (product, amount, mode) = if i % 4 == 3 {
                    ("GIFT-25", 2500, "on demand")
                } else {
                    ("TOPUP-EU-10", 1000, "prefetch")
                };
                let spec = SaleSpec {
                    stan: i as u32 + 1,
                    transmission: now_transmission(),
                    product: product.into(),
                    amount,
                    currency: "978".into(),
                };
                let t0 = Instant::now();
                let ans = term.call(&id.sale(&spec, false)).await.map_err(|e| e.to_string())?;
                let code = ans.get_str(39).unwrap_or("??").to_string();
                let receipt = ans.get(63).and_then(|b| PinReceipt::from_tlv(b).ok());
                out.push((mode.into(), t0.elapsed(), code, receipt, spec));
            }
            // The last terminal's first sale is repeated (0201) and its second reversed (0400).
            Ok::<_, String>((term, id, out))
        });
    }
    let mut approved = 0;
    let mut declined: std::collections::BTreeMap<String, usize> = Default::default();
    let mut lat: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
    let mut last = None;
    while let Some(r) = tasks.join_next().await {
        let (term, id, out) = r.map_err(|e| e.to_string())??;
        for (mode, d, code, _, _) in &out {
            if code == ResponseCode::Approved.code() {
                approved += 1;
                lat.entry(mode.clone()).or_default().push(*d);
            } else {
                *declined.entry(code.clone()).or_default() += 1;
            }
        }
        last = Some((term, id, out));
    }
    let elapsed = started.elapsed();
    let (mut term, id, out) = last.ok_or("no terminal ran")?;
    let mut report = Report {
        approved,
        declined: declined.into_iter().collect(),
        elapsed,
        ..Report::default()
    };
    if let Some((_, _, _, Some(first), spec)) = out.first() {
        let again = term.call(&id.sale(spec, true)).await.map_err(|e| e.to_string())?;
        let r = again.get(63).and_then(|b| PinReceipt::from_tlv(b).ok());
        report.repeat_same_pin = r.as_ref() == Some(first);
    }
    if let Some((_, _, _, _, spec)) = out.get(1) {
        let a = term
            .call(&id.reversal(spec, 900_000, false))
            .await
            .map_err(|e| e.to_string())?;
        report.reversal_code = a.get_str(39).unwrap_or("??").to_string();
    }
    for (mode, mut v) in lat {
        report.latency_ms.push((mode, percentiles(&mut v)));
    }
    let stock = gw.gateway.stock();
    for l in &stock.cache {
        report.cache_hits += l.hits;
        report.cache_misses += l.misses;
    }
    if let Ok(Response::Stock { stock }) = gw
        .gateway
        .upstream()
        .call(Request::Stock, Instant::now() + Duration::from_secs(5))
        .await
    {
        for s in stock.into_iter().filter(|s| s.state == "available") {
            report.stock_left.push((s.product, s.amount, s.count));
        }
    }
    if opts.keep_running {
        println!("{report}");
        println!(
            "PIN server: {} · gateway terminals: {} (framing {}, dialect {DIALECT}, terminals DEMO0001.. of merchant {MERCHANT})",
            server.addr,
            gw.addr,
            FRAMING.name()
        );
        println!("gateway configuration: {}", gw.config.display());
        println!(
            "MAC keys of the terminals (the listener requires MACs): --mac-key-file {} --kek-file {}",
            opts.dir.join(TERMINAL_KEYS).display(),
            opts.dir.join(TERMINAL_KEK).display()
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("the gateway's metrics endpoint: {e}"))?;
        let gw_metrics = l.local_addr().map_err(|e| e.to_string())?;
        let stop = tokio_util::sync::CancellationToken::new();
        let source = std::sync::Arc::new(crate::gateway::MetricsSource(gw.gateway.clone()));
        let endpoint = tokio::spawn(crate::metrics::serve(l, source, stop.clone()));
        if let Some(addr) = server_metrics {
            println!("status pages: http://{gw_metrics}/status (gateway) http://{addr}/status (PIN server); metrics on /metrics");
        }
        println!("running until Ctrl-C");
        shutdown.await;
        stop.cancel();
        let _ = endpoint.await;
    }
    gw.stop().await;
    server.stop().await;
    Ok(report)
}
