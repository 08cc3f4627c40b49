//! Helpers shared by the integration tests: one terminal, one product, the same sale identity everywhere; and the
//! rig (`pingate::demo::rig`, which the demo and the benches set up with too) as the tests use it, failing loudly.
#![allow(dead_code)] // each test crate uses a different part

use pingate::psp::{Request, Terminal};
use pingate::store::{Product, SaleContext};

pub const TERMINAL: &str = "TERM0001";
pub const MERCHANT: &str = "MERCHANT0000001";
pub const TRANSMISSION: &str = "1128173500";

/// The terminal part of a sale key, as a gateway sends it to the PIN server.
pub fn terminal(stan: u32) -> Terminal {
    Terminal {
        terminal_id: TERMINAL.into(),
        merchant_id: MERCHANT.into(),
        stan: format!("{stan:06}"),
        transmission: TRANSMISSION.into(),
        rrn: format!("{stan:012}"),
    }
}

/// An on-demand sale of TOPUP 10.00 over PSP.
pub fn sell(stan: u32) -> Request {
    Request::Sell {
        product: "TOPUP".into(),
        amount: 1000,
        terminal: terminal(stan),
    }
}

/// The same sale identity as the store sees it.
pub fn ctx(gateway: &str, stan: u32) -> SaleContext {
    SaleContext {
        gateway: gateway.into(),
        terminal_id: TERMINAL.into(),
        merchant_id: MERCHANT.into(),
        stan: format!("{stan:06}"),
        transmission: TRANSMISSION.into(),
        rrn: format!("{stan:012}"),
    }
}

/// The TOPUP product in the given amounts.
pub fn topup(amounts: &[i64]) -> Product {
    Product {
        code: "TOPUP".into(),
        name: "Top-up".into(),
        supplier: "Telco".into(),
        currency: "978".into(),
        denominations: amounts.to_vec(),
    }
}

/// Writes a key file as an operator must: readable by its owner only (a key file others can read is refused).
/// `protocols/gateway.example.toml` ready to parse in `dir` (created): the journal key and the terminal MAC keys it
/// names written beside it. Returns the example's text and the path it stands for (`dir/gateway.toml`, not written).
#[allow(dead_code)]
pub fn example_config(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    write_key(&dir.join("journal.keys"), &format!("1:{}", "ab".repeat(32)));
    write_example_terminal_keys(dir);
    let text = std::fs::read_to_string("protocols/gateway.example.toml").unwrap();
    (text, dir.join("gateway.toml"))
}

/// The terminal MAC keys `protocols/gateway.example.toml` names, written into `dir` (its `terminal.kek` and
/// `terminal-keys.toml`): a retail-DES key for TERM0001 (a dial-up terminal), an AES-CMAC key for TERM0002.
#[allow(dead_code)]
pub fn write_example_terminal_keys(dir: &std::path::Path) {
    use pingate::mac::{MacAlgorithm, MacKey};
    use pingate::terminal_keys::{load_kek, TerminalKeyFile};
    let kek_path = dir.join("terminal.kek");
    pingate::tls::write_new_key(&kek_path).unwrap();
    let kek = load_kek(&kek_path).unwrap();
    let path = dir.join("terminal-keys.toml");
    let mut file = TerminalKeyFile::load_or_new(&path).unwrap();
    for (terminal, algorithm) in [
        ("TERM0001", MacAlgorithm::RetailDes),
        ("TERM0002", MacAlgorithm::AesCmac),
    ] {
        let key = MacKey::generate(algorithm).unwrap();
        file.add(&kek, terminal, &key, pingate::clock::unix_now(), None)
            .unwrap();
    }
    file.save(&path).unwrap();
}

pub fn write_key(path: &std::path::Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// The PostgreSQL server the tests use, without a database name: `PINGATE_TEST_PG_SERVER` if set; else the one at
/// 127.0.0.1:5432 when it answers; else a private throwaway cluster of this test process ([`private_cluster`]).
pub fn pg_base() -> String {
    static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        if let Ok(url) = std::env::var("PINGATE_TEST_PG_SERVER") {
            return url;
        }
        let local: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let private = std::env::var_os("PINGATE_TEST_PG_PRIVATE").is_some();
        if !private && std::net::TcpStream::connect_timeout(&local, std::time::Duration::from_secs(1)).is_ok() {
            return "postgres://postgres@127.0.0.1:5432".into();
        }
        private_cluster()
    })
    .clone()
}

/// The URL of the `test` database the store tests use (`PINGATE_TEST_PG` overrides): on [`pg_base`].
pub fn pg_test_url() -> String {
    std::env::var("PINGATE_TEST_PG").unwrap_or_else(|_| format!("{}/test", pg_base()))
}

/// A PostgreSQL cluster of this test process, for a machine with the PostgreSQL package but no server running:
/// `initdb` and `postgres` from the package, in a temporary folder, on a free port, with a `test` database; a watcher
/// stops it and removes the folder when this process is gone. (As root, as in CI, the cluster runs as the package's
/// `postgres` user: PostgreSQL refuses to run as root.)
pub fn private_cluster() -> String {
    use std::process::{Command, Stdio};
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .max()
        .expect("no PostgreSQL server at 127.0.0.1:5432 and no /usr/lib/postgresql/*/bin/initdb to start one: apt-get install postgresql");
    let root = nix_is_root();
    let dir = std::env::temp_dir().join(format!("pingate-test-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let as_owner = |program: &std::path::Path| {
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    };
    if root {
        let ok = Command::new("chown").args(["postgres:"]).arg(&dir).status().unwrap();
        assert!(ok.success(), "chown postgres {}", dir.display());
    }
    let data = dir.join("data");
    let out = as_owner(&bin.join("initdb"))
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The server runs under a shell that watches this process and stops the server (and removes the folder) when
    // it is gone: the tests have no teardown of their own.
    let script = format!(
        "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off >'{dir}/log' 2>&1 & P=$!; \
         while [ -d /proc/{me} ] && kill -0 $P 2>/dev/null; do sleep 1; done; kill $P 2>/dev/null; wait $P; \
         rm -rf '{dir}'",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        me = std::process::id(),
    );
    let sh = std::path::Path::new("/bin/sh");
    // Not waited for: it outlives this process on purpose, to stop the server after it.
    #[allow(clippy::zombie_processes)]
    as_owner(sh)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut up = false;
    for _ in 0..300 {
        // Accepting connections is not yet accepting queries: `createdb` below retries until it is.
        if std::net::TcpStream::connect(addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        up,
        "the private PostgreSQL did not start: {}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    let mut created = false;
    for _ in 0..100 {
        let out = Command::new(bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "test"])
            .output()
            .unwrap();
        if out.status.success() {
            created = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(created, "createdb test on the private PostgreSQL failed");
    format!("postgres://postgres@127.0.0.1:{port}")
}

/// Whether this process runs as root (its effective uid, from /proc).
fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A PostgreSQL database of the test's own, created empty (dropped first if a failed run left it behind): a client
/// on the `postgres` database to drop it with ([`drop_database`]), and the new database's URL.
pub async fn fresh_database(name: &str) -> (tokio_postgres::Client, String) {
    let (admin, conn) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    (admin, format!("{}/{name}", pg_base()))
}

pub async fn drop_database(admin: &tokio_postgres::Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A fresh folder for one test: `pingate-{suite}-{pid}-{name}` under the temporary folder, emptied first.
pub fn fresh_dir(suite: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// An answer's response code (field 39), `??` when it has none.
pub fn code(m: &pingate::iso8583::Message) -> &str {
    m.get_str(39).unwrap_or("??")
}

/// Asserts no PIN id is in `ids` twice (`what` says where they came from); returns how many there are.
pub fn assert_each_pin_once(mut ids: Vec<i64>, what: &str) -> usize {
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a PIN was handed out twice {what}");
    n
}

/// Server-side counts by (product, state), asked over PSP with gateway `obs`'s certificate.
pub async fn stock(
    inv: &pingate::demo::rig::Inventory,
    server: std::net::SocketAddr,
) -> std::collections::HashMap<(String, String), i64> {
    use pingate::psp::client::PspClient;
    use pingate::psp::Response;
    let (c, _) = PspClient::connect(server, "localhost", inv.gateway_tls("obs").unwrap())
        .await
        .unwrap();
    let Response::Stock { stock } = c.call(Request::Stock).await.unwrap() else {
        panic!("stock")
    };
    stock.into_iter().map(|s| ((s.product, s.state), s.count)).collect()
}

/// One count of [`stock`]'s answer.
pub fn count(s: &std::collections::HashMap<(String, String), i64>, product: &str, state: &str) -> i64 {
    s.get(&(product.to_string(), state.to_string())).copied().unwrap_or(0)
}

/// `pingate audit` of an inventory (SQLite): every invariant must hold.
pub async fn audit_ok(inv: &pingate::demo::rig::Inventory) {
    audit_url_ok(&pingate::store::handle::DbUrl::Sqlite(inv.db.clone())).await
}

/// `pingate audit` of any inventory: every invariant must hold.
pub async fn audit_url_ok(db: &pingate::store::handle::DbUrl) {
    let r = pingate::audit::run(db, &[], None).await.unwrap();
    assert!(r.ok(), "audit:\n{}", r.text());
}

/// [`pingate::demo::rig::start_system`]: a PIN server and gateway `gw1` on a fresh inventory in `dir`.
pub async fn rig(
    dir: &std::path::Path,
    pins: usize,
    low: usize,
    high: usize,
    extra: (&str, &str),
) -> (
    pingate::demo::rig::Inventory,
    pingate::demo::rig::ServerHandle,
    pingate::demo::rig::GatewayHandle,
) {
    pingate::demo::rig::start_system(dir, pins, low, high, extra)
        .await
        .unwrap()
}

/// Waits (polling, 5 s at most) until the gateway's cache holds at least `n` PINs of `product`.
pub async fn cached_at_least(gw: &pingate::demo::rig::GatewayHandle, product: &str, n: usize) {
    assert!(
        gw.cached_at_least(product, n, std::time::Duration::from_secs(5)).await,
        "cache never reached {n}: {:?}",
        gw.gateway.stock()
    );
}

/// `pingate gateway` as its own process at log level info, its log (stderr) appended to `log`, `env` added to its
/// environment; killed when dropped.
pub fn spawn_gateway(
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> pingate::demo::rig::GatewayProcess {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_pingate"));
    pingate::demo::rig::GatewayProcess::spawn(binary, config, log, env).unwrap()
}

/// A terminal connected to the gateway listening at `addr`, once it is up.
pub async fn connect(addr: std::net::SocketAddr) -> pingate::traffic::sim::TerminalClient {
    pingate::demo::rig::terminal_when_up(addr).await.unwrap()
}

/// Demo terminal `id` (registered by the demo set-up, merchant [`pingate::traffic::sim::MERCHANT`]).
pub fn demo_terminal(id: &str) -> pingate::traffic::sim::Identity {
    pingate::traffic::sim::Identity {
        terminal_id: id.into(),
        merchant_id: pingate::traffic::sim::MERCHANT.into(),
    }
}

/// A sale of `product` at `amount` (EUR), STAN `stan`, sent at `transmission` (MMDDhhmmss).
pub fn demo_sale(stan: u32, transmission: &str, product: &str, amount: u64) -> pingate::traffic::sim::SaleSpec {
    pingate::traffic::sim::SaleSpec {
        stan,
        transmission: transmission.into(),
        product: product.into(),
        amount,
        currency: "978".into(),
    }
}
