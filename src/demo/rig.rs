//! The rig: a whole pingate in this process — certificates, a SQLite inventory of sample products, a PIN server and
//! gateways in one folder — set up the same way for `pingate demo`, the end-to-end tests and the benches; and a
//! gateway run as its own process beside it. Its terminals are the simulated ones of [`crate::traffic::sim`], with
//! that module's dialect, framing and merchant.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::crypto::PinCipher;
use crate::gateway::config::GatewayConfig;
use crate::gateway::{Gateway, StartOptions};
use crate::iso8583::{Dialect, Dialects};
use crate::sale::Pin;
use crate::server::ServerOptions;
use crate::store::handle::{DbUrl, StoreHandle, StoreOptions};
use crate::store::sqlite::SqliteStore;
use crate::store::{NewPin, Product};
use crate::tls::{certs_init, CertsDir, CertsInit, GatewayList};
use crate::traffic::sim::{TerminalClient, DIALECT, FRAMING, MERCHANT};

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

    /// The TLS client configuration of gateway `id` (one [`Inventory::create`] issued a certificate for): to speak
    /// PSP to the rig's PIN server as that gateway.
    pub fn gateway_tls(&self, id: &str) -> Result<Arc<rustls::ClientConfig>, String> {
        crate::tls::client_config(
            &self.certs.gateway_cert(id),
            &self.certs.gateway_key(id),
            &self.certs.gateway_ca(id),
        )
        .map(Arc::new)
        .map_err(|e| e.to_string())
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
    let store = StoreHandle::open(db, &inv.pin_keys, &StoreOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    serve(inv, store, bind, opts).await
}

/// Serves `store` (opened by the caller, with options of its own) as a PIN server on `bind`, with the inventory's
/// certificates and gateway list; the store is closed once the server has stopped.
pub async fn serve(
    inv: &Inventory,
    store: StoreHandle,
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

/// How a rig's gateway serves a product.
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
            "[[listener]]\nname = \"tcp\"\nbind = \"{listen}\"\nframing = \"{}\"\ndialect = \"{DIALECT}\"\n{}\n",
            FRAMING.name(),
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
    /// Its configuration file.
    pub config: PathBuf,
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
            config: config.to_path_buf(),
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

    /// Waits (polling, `within` at most) until the cache holds at least `n` PINs of `product`; false if it never
    /// did.
    pub async fn cached_at_least(&self, product: &str, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let stock = self.gateway.stock();
            if stock.cache.iter().any(|l| l.product == product && l.cached >= n) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

/// Writes gateway `id`'s files ([`GatewayFiles::write`], its listener on any free port of 127.0.0.1), starts it in
/// this process with its serial lines, and waits (10 s at most) until it reaches a PIN server.
pub async fn start_gateway(
    inv: &Inventory,
    id: &str,
    servers: &[SocketAddr],
    terminals: usize,
    products: &[ProductMode],
    extra: (&str, &str),
) -> Result<GatewayHandle, String> {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let files = GatewayFiles::write(inv, id, servers, any_port, terminals, products, extra)?;
    let gw = GatewayHandle::start(&files.config, StartOptions::default()).await?;
    if !gw.gateway.upstream().wait_connected(Duration::from_secs(10)).await {
        return Err("the gateway could not connect to the PIN server".into());
    }
    Ok(gw)
}

/// The set-up most end-to-end tests run on: a fresh inventory in `dir` (certificates for gateways `gw1`, `gw2` and
/// the observer `obs`; `pins` PINs of each sample product), its PIN server, and gateway `gw1` with 8 terminals,
/// prefetching the top-up between `low` and `high` and selling the gift card on demand ([`sample_modes`]):
/// connected, and past the second it started in. `extra.0` goes to the `[gateway]` table, `extra.1` to the listener
/// (and may add `[[serial]]` tables after it).
pub async fn start_system(
    dir: &Path,
    pins: usize,
    low: usize,
    high: usize,
    extra: (&str, &str),
) -> Result<(Inventory, ServerHandle, GatewayHandle), String> {
    let _ = std::fs::remove_dir_all(dir);
    let inv = Inventory::create(dir, &["gw1", "gw2", "obs"], &sample_products(pins))?;
    let server = start_server(&inv, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let gw = start_gateway(&inv, "gw1", &[server.addr], 8, &sample_modes(low, high), extra).await?;
    past_this_second().await;
    Ok((inv, server, gw))
}

/// A free TCP port of 127.0.0.1, for a process that must be told its address before it starts (another process may
/// take it in between, which on a test machine does not happen).
pub fn free_local_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a free port of 127.0.0.1: {e}"))
}

/// A gateway run as its own process (`pingate gateway --config FILE`), killed when dropped: a failed assertion must
/// not leave it running.
pub struct GatewayProcess(pub Child);

impl GatewayProcess {
    /// Starts the gateway of `config` with the `pingate` binary at `pingate` (tests and benches have its path as
    /// `env!("CARGO_BIN_EXE_pingate")`), logging at level info, its log (stderr) appended to `log`; `env` is added to
    /// its environment.
    pub fn spawn(pingate: &Path, config: &Path, log: &Path, env: &[(&str, &str)]) -> Result<GatewayProcess, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        Command::new(pingate)
            .args(["gateway", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(GatewayProcess)
            .map_err(|e| format!("{}: {e}", pingate.display()))
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A simulated terminal (the rig's dialect and framing) connected to `addr` once a gateway listens there, trying
/// for 10 s: a gateway process takes a moment to come up.
pub async fn terminal_when_up(addr: SocketAddr) -> Result<TerminalClient, String> {
    let dialect = Arc::new(Dialects::builtin().get(DIALECT).map_err(|e| e.to_string())?.clone());
    for _ in 0..500 {
        if let Ok(t) = TerminalClient::connect(addr, FRAMING, None, dialect.clone()).await {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("no gateway came up at {addr}"))
}
