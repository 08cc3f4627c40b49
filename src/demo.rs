//! `pingate demo`: the whole system in one process with no setup — certificates, a SQLite inventory with sample
//! products, a PIN server and a gateway in a temporary folder — driven by simulated terminals, with a short report.
//! The building blocks ([`Inventory`], [`start_server`], [`GatewayFiles`]) also set up the end-to-end tests.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::crypto::PinCipher;
use crate::gateway::config::GatewayConfig;
use crate::gateway::{Gateway, StartOptions};
use crate::iso8583::{Dialect, Dialects};
use crate::link::framing::Framing;
use crate::psp::{Request, Response};
use crate::sale::{Pin, PinReceipt, ResponseCode};
use crate::server::ServerOptions;
use crate::sim::{Identity, SaleSpec, TerminalClient};
use crate::store::handle::{DbUrl, StoreHandle, StoreOptions};
use crate::store::sqlite::SqliteStore;
use crate::store::{NewPin, Product};
use crate::tls::{certs_init, CertsDir, CertsInit, GatewayList};

/// The demo's dialect and framing (the defaults of most NAC-attached terminals).
pub const DIALECT: &str = "iso87-ascii-binbitmap";
pub const FRAMING: Framing = Framing::Binary2;
pub const MERCHANT: &str = "DEMOMERCHANT001";

/// A product of the sample inventory: code, amounts, PINs per amount.
#[derive(Clone, Debug)]
pub struct SampleProduct {
    pub code: &'static str,
    pub name: &'static str,
    pub amounts: Vec<i64>,
    pub pins: usize,
}

/// The demo's products: a hot top-up sold from the prefetch cache, a gift card sold on demand.
pub fn sample_products(pins: usize) -> Vec<SampleProduct> {
    vec![
        SampleProduct {
            code: "TOPUP-EU-10",
            name: "Mobile top-up 10 EUR",
            amounts: vec![1000],
            pins,
        },
        SampleProduct {
            code: "GIFT-25",
            name: "Gift card 25 EUR",
            amounts: vec![2500],
            pins,
        },
    ]
}

/// How the demo gateway sells the sample products: the top-up from the prefetch cache (`low`, `high`), the gift
/// card on demand.
pub fn sample_modes(low: usize, high: usize) -> Vec<ProductMode> {
    vec![
        ProductMode {
            code: "TOPUP-EU-10".into(),
            amount: 1000,
            prefetch: Some((low, high)),
        },
        ProductMode {
            code: "GIFT-25".into(),
            amount: 2500,
            prefetch: None,
        },
    ]
}

/// Certificates and a SQLite inventory in `dir`.
pub struct Inventory {
    pub dir: PathBuf,
    pub certs: CertsDir,
    /// The PIN keys' spec (zeroized when dropped).
    pub pin_keys: zeroize::Zeroizing<String>,
    pub db: PathBuf,
}

fn random_digits(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| char::from(b'0' + x % 10)).collect()
}

impl Inventory {
    /// Creates certificates (server, and a client certificate per gateway id) and an inventory of random PINs.
    pub fn create(dir: &Path, gateways: &[&str], products: &[SampleProduct]) -> Result<Inventory, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let certs = certs_init(
            &dir.join("certs"),
            &CertsInit {
                gateways: gateways.iter().map(|g| g.to_string()).collect(),
                ..CertsInit::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let pin_keys = crate::keyfile::read_to_string(&certs.pin_keys()).map_err(|e| e.to_string())?;
        let db = dir.join("pins.db");
        let cipher = PinCipher::from_spec(&pin_keys).map_err(|e| e.to_string())?;
        let mut store = SqliteStore::open(&db, cipher).map_err(|e| e.to_string())?;
        let mut serial = 0u64;
        for p in products {
            store
                .upsert_product(&Product {
                    code: p.code.into(),
                    name: p.name.into(),
                    supplier: "Demo Telco".into(),
                    currency: "978".into(),
                    denominations: p.amounts.clone(),
                })
                .map_err(|e| e.to_string())?;
            for &amount in &p.amounts {
                let pins: Vec<NewPin> = (0..p.pins)
                    .map(|_| {
                        serial += 1;
                        NewPin {
                            product: p.code.into(),
                            amount,
                            pin: Pin::new(random_digits(16)),
                            serial: format!("DEMO{serial:010}"),
                            expiry: Some("20281231".into()),
                            receipt: vec![format!("{} - thank you", p.name)],
                        }
                    })
                    .collect();
                store.import(&pins).map_err(|e| e.to_string())?;
            }
        }
        Ok(Inventory {
            dir: dir.to_path_buf(),
            certs,
            pin_keys,
            db,
        })
    }
}

/// A PIN server running in this process.
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops it (graceful drain) and waits.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

/// Starts a PIN server on `bind` (port 0 for any) over the inventory's SQLite file.
pub async fn start_server(inv: &Inventory, bind: SocketAddr) -> Result<ServerHandle, String> {
    start_server_on(inv, &DbUrl::Sqlite(inv.db.clone()), bind).await
}

/// Starts a PIN server on `bind` with the inventory's certificates and keys, over the database `db` (e.g. a
/// PostgreSQL shared by several servers).
pub async fn start_server_on(inv: &Inventory, db: &DbUrl, bind: SocketAddr) -> Result<ServerHandle, String> {
    start_server_with(inv, db, bind, ServerOptions::default()).await
}

/// [`start_server_on`] with server options (limits, a metrics address).
pub async fn start_server_with(
    inv: &Inventory,
    db: &DbUrl,
    bind: SocketAddr,
    opts: ServerOptions,
) -> Result<ServerHandle, String> {
    let gateways = GatewayList::load(&inv.certs.gateways()).map_err(|e| e.to_string())?;
    let tls = crate::tls::server_config(
        &inv.certs.server_cert(),
        &inv.certs.server_key(),
        &inv.certs.server_ca(),
        gateways.clone(),
    )
    .map_err(|e| e.to_string())?;
    let store = StoreHandle::open(db, &inv.pin_keys, &StoreOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(bind).await.map_err(|e| format!("{bind}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        crate::server::run(listener, Arc::new(tls), gateways, store.clone(), opts, async {
            let _ = rx.await;
        })
        .await;
        store.close().await;
    });
    Ok(ServerHandle {
        addr,
        stop: Some(tx),
        task,
    })
}

/// A gateway's configuration file and journal key, written beside the inventory.
pub struct GatewayFiles {
    pub config: PathBuf,
}

/// How the demo gateway serves a product.
#[derive(Clone, Debug)]
pub struct ProductMode {
    pub code: String,
    pub amount: i64,
    /// `None`: on demand; `Some((low, high))`: prefetch.
    pub prefetch: Option<(usize, usize)>,
}

impl GatewayFiles {
    /// Writes `gateway-<id>.toml` (and its journal key) for gateway `id`, talking to `servers`, listening on
    /// `listen`, with terminals `DEMO0001`… of merchant [`MERCHANT`]. `extra.0` is added to the `[gateway]` table,
    /// `extra.1` to the listener.
    pub fn write(
        inv: &Inventory,
        id: &str,
        servers: &[SocketAddr],
        listen: SocketAddr,
        terminals: usize,
        products: &[ProductMode],
        extra: (&str, &str),
    ) -> Result<GatewayFiles, String> {
        let keys = inv.dir.join(format!("journal-{id}.keys"));
        if !keys.exists() {
            crate::tls::write_new_key(&keys).map_err(|e| e.to_string())?;
        }
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# Written by pingate demo: gateway `{id}`. See protocols/gateway.example.toml for every key.\n"
        );
        let _ = writeln!(
            t,
            "[gateway]\njournal = \"gateway-{id}.journal\"\njournal_keys_file = \"journal-{id}.keys\""
        );
        let _ = writeln!(t, "{}", extra.0);
        if !extra.0.contains("clock_skew_secs") {
            // The demo's terminals read the gateway's own clock: none is off, and the cache sells from the start.
            let _ = writeln!(t, "clock_skew_secs = 0");
        }
        let _ = writeln!(t, "[upstream]");
        let list: Vec<String> = servers
            .iter()
            .map(|a| format!("{{ addr = \"{a}\", name = \"localhost\" }}"))
            .collect();
        let _ = writeln!(t, "servers = [{}]", list.join(", "));
        let _ = writeln!(
            t,
            "cert = \"certs/gateway-{id}/gateway.pem\"\nkey = \"certs/gateway-{id}/gateway.key\"\nca = \"certs/gateway-{id}/ca.pem\"\nconnect_timeout_ms = 2000\nbreaker_cooldown_ms = 1000\n"
        );
        let _ = writeln!(
            t,
            "[[listener]]\nname = \"tcp\"\nbind = \"{listen}\"\nframing = \"binary2\"\ndialect = \"{DIALECT}\"\n{}\n",
            extra.1
        );
        for i in 1..=terminals {
            let _ = writeln!(t, "[[terminal]]\nid = \"DEMO{i:04}\"\nmerchant = \"{MERCHANT}\"\n");
        }
        for p in products {
            match p.prefetch {
                Some((low, high)) => {
                    let _ = writeln!(
                        t,
                        "[[product]]\ncode = \"{}\"\namount = {}\nmode = \"prefetch\"\nlow = {low}\nhigh = {high}\n",
                        p.code, p.amount
                    );
                }
                None => {
                    let _ = writeln!(
                        t,
                        "[[product]]\ncode = \"{}\"\namount = {}\nmode = \"on_demand\"\n",
                        p.code, p.amount
                    );
                }
            }
        }
        let config = inv.dir.join(format!("gateway-{id}.toml"));
        std::fs::write(&config, t).map_err(|e| e.to_string())?;
        Ok(GatewayFiles { config })
    }
}

/// A gateway running in this process with its terminal listener.
pub struct GatewayHandle {
    pub gateway: Arc<Gateway>,
    pub addr: SocketAddr,
    pub dialect: Arc<Dialect>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    lines_stop: tokio_util::sync::CancellationToken,
    lines: tokio::task::JoinSet<()>,
}

impl GatewayHandle {
    /// Starts the gateway of `config`, its first listener and its serial lines.
    pub async fn start(config: &Path, opts: StartOptions) -> Result<GatewayHandle, String> {
        let cfg = GatewayConfig::load(config).map_err(|e| e.to_string())?;
        let dialects = match &cfg.protocols {
            Some(dir) => Dialects::load(dir).map_err(|e| e.to_string())?,
            None => Dialects::builtin(),
        };
        let lc = cfg
            .listeners
            .first()
            .cloned()
            .ok_or("the configuration has no listener")?;
        let dialect = Arc::new(dialects.get(&lc.dialect).map_err(|e| e.to_string())?.clone());
        let mut serial = Vec::new();
        for sc in &cfg.serial {
            serial.push((
                sc.clone(),
                Arc::new(dialects.get(&sc.dialect).map_err(|e| e.to_string())?.clone()),
            ));
        }
        let gateway = Gateway::start(cfg, opts).await.map_err(|e| e.to_string())?;
        let lines_stop = tokio_util::sync::CancellationToken::new();
        let mut lines = tokio::task::JoinSet::new();
        for (sc, d) in serial {
            let (gw, stop) = (gateway.clone(), lines_stop.clone());
            lines.spawn(crate::gateway::serial::run_line(sc, d, gw, stop));
        }
        let listener = TcpListener::bind(lc.bind)
            .await
            .map_err(|e| format!("{}: {e}", lc.bind))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = oneshot::channel::<()>();
        let (gw, d) = (gateway.clone(), dialect.clone());
        let task = tokio::spawn(async move {
            crate::gateway::terminal::run(listener, lc, d, gw, async {
                let _ = rx.await;
            })
            .await;
        });
        Ok(GatewayHandle {
            gateway,
            addr,
            dialect,
            stop: Some(tx),
            task,
            lines_stop,
            lines,
        })
    }

    /// A terminal connected to this gateway.
    pub async fn terminal(&self) -> Result<TerminalClient, String> {
        TerminalClient::connect(self.addr, FRAMING, None, self.dialect.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// Clean shutdown: terminals drained, cached PINs released, queued work flushed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
        self.lines_stop.cancel();
        while self.lines.join_next().await.is_some() {}
        self.gateway.shutdown(Duration::from_secs(10)).await;
    }

    /// Stops serving without releasing or flushing anything (a crash, as far as the journal is concerned).
    pub async fn crash(mut self) {
        self.gateway.abandon();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
        let _ = self.task.await;
        self.lines.abort_all();
        while self.lines.join_next().await.is_some() {}
    }
}

/// Waits until the wall clock is in its next second. A sale whose field 7 is of the second a gateway started in (or
/// older) goes to the PIN server, not the cache (`clock_skew_secs`): the demo, the benches and the tests that expect
/// cache sales begin past it.
pub async fn past_this_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_nanos(
        u64::from(1_000_000_000 - now.subsec_nanos()) + 1_000_000,
    ))
    .await;
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
    [0.5, 0.95, 0.99].map(|q| crate::load::quantile_ms(v, q))
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

/// Runs the demo (see the module doc). With `keep_running`, leaves everything up until Ctrl-C or SIGTERM.
pub async fn run(opts: DemoOptions) -> Result<Report, String> {
    let started = Instant::now();
    // A fresh start in a folder used before.
    let _ = std::fs::remove_dir_all(opts.dir.join("certs"));
    for f in [
        "pins.db",
        "pins.db-wal",
        "pins.db-shm",
        "gateway-demo-gw.journal",
        "journal-demo-gw.keys",
    ] {
        let _ = std::fs::remove_file(opts.dir.join(f));
    }
    let products = sample_products(opts.sales + 500);
    let inv = Inventory::create(&opts.dir, &["demo-gw"], &products)?;
    let server = start_server(&inv, "127.0.0.1:0".parse().expect("address")).await?;
    let modes = sample_modes(20, 200);
    let files = GatewayFiles::write(
        &inv,
        "demo-gw",
        &[server.addr],
        "127.0.0.1:0".parse().expect("address"),
        opts.terminals.max(1),
        &modes,
        ("", ""),
    )?;
    let gw = GatewayHandle::start(&files.config, StartOptions::default()).await?;
    if !gw.gateway.upstream().wait_connected(Duration::from_secs(10)).await {
        return Err("the gateway could not connect to the PIN server".into());
    }
    // Let the first refill land, as a gateway that has been up a moment would have it, and the clock pass the second
    // the gateway started in (a key of that second may have been sold before the start: such sales go to the PIN
    // server, not the cache; see `clock_skew_secs`).
    tokio::time::sleep(Duration::from_millis(300)).await;
    past_this_second().await;

    let sales_per_terminal = opts.sales.div_ceil(opts.terminals.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 1..=opts.terminals.max(1) {
        let mut term = gw.terminal().await?;
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
                    transmission: crate::sim::now_transmission(),
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
            "PIN server: {} · gateway terminals: {} (framing binary2, dialect {DIALECT}, terminals DEMO0001.. of merchant {MERCHANT})",
            server.addr, gw.addr
        );
        println!("gateway configuration: {}", files.config.display());
        println!("running until Ctrl-C");
        crate::cli::shutdown_signal().await;
    }
    gw.stop().await;
    server.stop().await;
    Ok(report)
}
