//! The `pingate` binary as an operator runs it: certs init, product, CSV import, stock, then real server processes
//! — killed with SIGKILL mid-load and restarted (nothing acknowledged is lost), stopped with SIGTERM (drains), and
//! two of them sharing one PostgreSQL inventory (no PIN handed out twice).

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use pingate::psp::client::PspClient;
use pingate::psp::{Request, Response};
use pingate::tls::{client_config, CertsDir};

/// The count in `pingate pins stock` output for TOPUP 1000 in `state`.
fn stock_count(out: &str, state: &str) -> i64 {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|t| t.len() == 4 && t[0] == "TOPUP" && t[1] == "1000" && t[2] == state)
        .map(|t| t[3].parse().unwrap())
        .unwrap_or(0)
}

fn pingate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pingate")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, out, err) = pingate(args);
    assert!(success, "pingate {args:?} failed: {err}");
    out
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str, db: &str, pins: usize) -> (Dir, CertsDir) {
    let dir = std::env::temp_dir().join(format!("pingate-proc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let certs = dir.join("certs");
    let out = ok(&[
        "certs",
        "init",
        certs.to_str().unwrap(),
        "--gateway",
        "gw1",
        "--gateway",
        "gw2",
    ]);
    assert!(out.contains("gateway gw2's"), "{out}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(certs.join("server/server.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "private keys are not readable by others");
    let (again, _, err) = pingate(&["certs", "init", certs.to_str().unwrap()]);
    assert!(!again && err.contains("refusing to overwrite"), "{err}");
    ok(&[
        "pins",
        "product",
        "--db",
        db,
        "--code",
        "TOPUP",
        "--name",
        "Top-up",
        "--supplier",
        "Telco",
        "--currency",
        "978",
        "--amounts",
        "1000,2000",
    ]);
    let mut csv = String::from("product,amount,pin,serial,expiry,receipt\n");
    for i in 0..pins {
        csv.push_str(&format!(
            "TOPUP,1000,{:012},SER{i:07},20991231,Dial *100*PIN#|Thank you\n",
            700_000_000_000u64 + i as u64
        ));
    }
    let file = dir.join("pins.csv");
    std::fs::write(&file, &csv).unwrap();
    let keys = certs.join("server/pin-keys");
    let import = |file: &Path| {
        pingate(&[
            "pins",
            "import",
            "--db",
            db,
            "--pin-keys",
            keys.to_str().unwrap(),
            file.to_str().unwrap(),
        ])
    };
    let (success, out, err) = import(&file);
    assert!(success, "{err}");
    assert!(out.contains(&format!("imported {pins} PINs")), "{out}");
    // A second import of a file with one bad row is rejected whole, naming the line; the stock is unchanged.
    let mut bad = String::from("product,amount,pin,serial,expiry,receipt\n");
    bad.push_str("TOPUP,1000,123412341234,NEW0001,,\n");
    bad.push_str(&format!("TOPUP,1000,999912341234,SER{:07},,\n", 0));
    std::fs::write(dir.join("bad.csv"), bad).unwrap();
    let (success, _, err) = import(&dir.join("bad.csv"));
    assert!(!success);
    assert!(err.contains("line 3: duplicate serial `SER0000000`"), "{err}");
    let stock = ok(&["pins", "stock", "--db", db]);
    assert_eq!(stock_count(&stock, "available"), pins as i64, "{stock}");
    (Dir(dir), CertsDir { dir: certs })
}

/// A server process, killed if the test ends early (a failed assertion must not leave it running).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pingate [global...] server` on a free port over `db`, with the certificates and keys of `certs`.
fn server_command(db: &str, certs: &CertsDir, global: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pingate"));
    c.args(global)
        .args(["server", "--db", db, "--listen", "127.0.0.1:0"])
        .args([
            "--cert",
            certs.server_cert().to_str().unwrap(),
            "--key",
            certs.server_key().to_str().unwrap(),
        ])
        .args([
            "--client-ca",
            certs.server_ca().to_str().unwrap(),
            "--gateways",
            certs.gateways().to_str().unwrap(),
        ])
        .args(["--pin-keys", certs.pin_keys().to_str().unwrap()]);
    c
}

/// Starts `pingate server` on a free port and returns it with its address (read from its log).
fn start_server(db: &str, certs: &CertsDir) -> (Server, SocketAddr) {
    let (server, addr, _) = start_server_logged(db, certs);
    (server, addr)
}

/// [`start_server`], with the server's log as it grows.
fn start_server_logged(db: &str, certs: &CertsDir) -> (Server, SocketAddr, Arc<std::sync::Mutex<String>>) {
    let mut child = server_command(db, certs, &[])
        .args(["--pg-connections", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!("server exited before listening"),
        };
        if let Some(i) = line.find("addr=Some(") {
            let rest = &line[i + "addr=Some(".len()..];
            break rest[..rest.find(')').unwrap()].parse().unwrap();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut log = keep.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (Server(child), addr, log)
}

fn tls(certs: &CertsDir, gw: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(client_config(&certs.gateway_cert(gw), &certs.gateway_key(gw), &certs.gateway_ca(gw)).unwrap())
}

fn signal(server: &Server, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &server.0.id().to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_server_killed_mid_load_loses_no_acknowledged_sale() {
    let dir_name = format!(
        "{}/pingate-proc-{}-kill/pins.db",
        std::env::temp_dir().display(),
        std::process::id()
    );
    let db = format!("sqlite:{dir_name}");
    let (_dir, certs) = setup("kill", &db, 3_000);
    let (mut server, addr) = start_server(&db, &certs);
    let (client, w) = PspClient::connect(addr, "localhost", tls(&certs, "gw1")).await.unwrap();
    assert_eq!(w.gateway, "gw1");
    let client = Arc::new(client);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let load: Vec<_> = (0..16u32)
        .map(|t| {
            let (c, tx) = (client.clone(), tx.clone());
            tokio::spawn(async move {
                for i in 0..1_000u32 {
                    let stan = t * 1_000 + i;
                    match c.call(sell(stan)).await {
                        Ok(Response::Sold { pin }) => tx.send((stan, pin.pin_id)).unwrap(),
                        _ => return,
                    }
                }
            })
        })
        .collect();
    drop(tx);
    // Let some sales through, then kill -9 while requests are in flight.
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 500 {
        acknowledged.push(rx.recv().await.unwrap());
    }
    signal(&server, "-KILL");
    server.0.wait().unwrap();
    for t in load {
        let _ = t.await;
    }
    while let Ok(a) = rx.try_recv() {
        acknowledged.push(a);
    }

    let (mut server, addr) = start_server(&db, &certs);
    let (client, _) = PspClient::connect(addr, "localhost", tls(&certs, "gw1")).await.unwrap();
    // Every acknowledged sale survived: repeating it returns the same PIN, and takes no new one.
    for (stan, pin_id) in &acknowledged {
        let Response::Sold { pin } = client.call(sell(*stan)).await.unwrap() else {
            panic!()
        };
        assert_eq!(pin.pin_id, *pin_id, "sale {stan} came back with another PIN");
    }
    let Response::Stock { stock } = client.call(Request::Stock).await.unwrap() else {
        panic!()
    };
    let sold: i64 = stock.iter().filter(|s| s.state == "sold").map(|s| s.count).sum();
    let available: i64 = stock.iter().filter(|s| s.state == "available").map(|s| s.count).sum();
    assert!(
        sold as usize >= acknowledged.len(),
        "{sold} sold < {} acknowledged",
        acknowledged.len()
    );
    assert_eq!(sold + available, 3_000, "every PIN is accounted for");

    // SIGTERM: the server drains and exits cleanly.
    signal(&server, "-TERM");
    let status = tokio::task::spawn_blocking(move || server.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_share_one_postgresql_inventory_without_duplicates() {
    let dbname = format!("pingate_proc_{}", std::process::id());
    let (admin, db) = fresh_database(&dbname).await;
    let (_dir, certs) = setup("pg", &db, 2_400);
    let (mut a, addr_a) = start_server(&db, &certs);
    let (mut b, addr_b) = start_server(&db, &certs);
    let mut tasks = Vec::new();
    for (i, (addr, gw)) in [(addr_a, "gw1"), (addr_b, "gw2"), (addr_a, "gw2"), (addr_b, "gw1")]
        .into_iter()
        .enumerate()
    {
        let (c, _) = PspClient::connect(addr, "localhost", tls(&certs, gw)).await.unwrap();
        let c = Arc::new(c);
        for t in 0..4u32 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for j in 0..50u32 {
                    // Distinct keys per client (the key includes the gateway; two clients share each gateway).
                    let stan = (i as u32) * 100_000 + t * 1_000 + j;
                    let Response::Sold { pin } = c.call(sell(stan)).await.unwrap() else {
                        panic!()
                    };
                    got.push(pin.pin_id);
                    let Response::Reserved { pins, .. } = c
                        .call(Request::Reserve {
                            product: "TOPUP".into(),
                            amount: 1000,
                            count: 2,
                            lease_secs: 600,
                        })
                        .await
                        .unwrap()
                    else {
                        panic!()
                    };
                    got.extend(pins.iter().map(|p| p.pin_id));
                }
                got
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(assert_each_pin_once(all, "across two servers"), 16 * 50 * 3);
    signal(&a, "-TERM");
    signal(&b, "-TERM");
    assert!(a.0.wait().unwrap().success() && b.0.wait().unwrap().success());
    let stock = ok(&["pins", "stock", "--db", &db]);
    assert_eq!(
        (stock_count(&stock, "sold"), stock_count(&stock, "reserved")),
        (800, 1600),
        "{stock}"
    );
    drop_database(&admin, &dbname).await;
}

#[test]
fn logs_as_json_lines_and_log_levels_are_checked() {
    let d = std::env::temp_dir().join(format!("pingate-json-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let db = format!("sqlite:{}", d.join("pins.db").display());
    let (_dir, certs) = setup("json-log", &db, 10);
    let mut child = server_command(&db, &certs, &["--log-format", "json", "--log-level", "debug"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut found = None;
    for line in lines.by_ref().take(50) {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        if v["fields"]["addr"].is_string() {
            found = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let v = found.expect("the listening line");
    assert_eq!(v["level"], "INFO");
    // A level specification that does not parse is refused with what was wrong.
    let o = Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args([
            "--log-level",
            "pingate=loud",
            "server",
            "--db",
            &db,
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--cert",
            "x",
            "--key",
            "x",
            "--client-ca",
            "x",
            "--gateways",
            "x",
            "--pin-keys",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("log levels `pingate=loud`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `pingate pins quarantine` takes an available PIN out of sale, and refuses one that is not available;
/// `pingate pins return-quarantined`: a quarantined PIN whose row opens goes back to stock; one that is not
/// quarantined, or whose row still does not open, is refused with the reason and a failing exit status.
/// `pingate pins leases` lists per gateway the reservations past their lease, and `pingate pins return-expired`
/// returns that gateway's alone to stock. On SQLite and on PostgreSQL.
#[test]
fn an_operator_quarantines_a_pin_and_returns_a_repaired_one_to_stock() {
    let d = std::env::temp_dir().join(format!("pingate-return-q-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("pins.db");
    let db = format!("sqlite:{}", path.display());
    operator_commands("return-q", &db, &|sql| {
        rusqlite::Connection::open(&path).unwrap().execute_batch(sql).unwrap()
    });
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_quarantines_a_pin_and_returns_a_repaired_one_to_stock_on_postgresql() {
    let dbname = format!("pingate_proc_q_{}", std::process::id());
    let (admin, db) = fresh_database(&dbname).await;
    let (c, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let handle = tokio::runtime::Handle::current();
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        operator_commands("return-q-pg", &db2, &|sql| {
            handle.block_on(c.batch_execute(sql)).unwrap()
        })
    })
    .await
    .unwrap();
    drop_database(&admin, &dbname).await;
}

/// The operator commands of [`an_operator_quarantines_a_pin_and_returns_a_repaired_one_to_stock`] on `db`, whose
/// rows `sql` changes behind pingate's back.
fn operator_commands(name: &str, db: &str, sql: &dyn Fn(&str)) {
    let (_dir, certs) = setup(name, db, 5);
    let keys = certs.pin_keys();
    // PIN 1 is quarantined by the operator (and opens); PIN 2 was quarantined by the server and is still damaged
    // (its serial, the seal's associated data, changed).
    let out = ok(&["pins", "quarantine", "--db", db, "--id", "1"]);
    assert!(out.contains("PIN 1 is quarantined"), "{out}");
    let (success, _, err) = pingate(&["pins", "quarantine", "--db", db, "--id", "1"]);
    assert!(!success && err.contains("PIN 1 is quarantined, not available"), "{err}");
    sql("UPDATE pins SET state = 'quarantined' WHERE id = 2;
         UPDATE pins SET serial = serial || 'X' WHERE id = 2;");
    let back = |id: &str| {
        pingate(&[
            "pins",
            "return-quarantined",
            "--db",
            db,
            "--pin-keys",
            keys.to_str().unwrap(),
            "--id",
            id,
        ])
    };
    let (success, out, err) = back("1");
    assert!(success, "{err}");
    assert!(out.contains("PIN 1 opens again and is back in stock"), "{out}");
    let (success, _, err) = back("1");
    assert!(!success && err.contains("PIN 1 is available, not quarantined"), "{err}");
    let (success, _, err) = back("2");
    assert!(!success && err.contains("does not decrypt"), "{err}");
    let stock = ok(&["pins", "stock", "--db", db]);
    assert_eq!(stock_count(&stock, "available"), 4, "{stock}");
    assert_eq!(stock_count(&stock, "quarantined"), 1, "{stock}");

    // Leases: PINs 3 and 4 reserved by gw1 with their lease long over, PIN 5 by gw2 with its lease to come.
    assert_eq!(ok(&["pins", "leases", "--db", db]), "no expired reservations\n");
    sql(
        "UPDATE pins SET state = 'reserved', holder = 'gw1', lease_until = 1 WHERE id IN (3, 4);
         UPDATE pins SET state = 'reserved', holder = 'gw2', lease_until = 4000000000 WHERE id = 5;",
    );
    assert_eq!(
        ok(&["pins", "leases", "--db", db]),
        "gw1: 2 reserved PINs past their lease\n"
    );
    let stock = ok(&["pins", "stock", "--db", db]);
    assert_eq!(
        stock_count(&stock, "reserved"),
        3,
        "an expired lease frees nothing by itself: {stock}"
    );
    let out = ok(&["pins", "return-expired", "--db", db, "--gateway", "gw2"]);
    assert!(out.contains("returned 0 expired reservations of gw2 to stock"), "{out}");
    let out = ok(&["pins", "return-expired", "--db", db, "--gateway", "gw1"]);
    assert!(out.contains("returned 2 expired reservations of gw1 to stock"), "{out}");
    assert_eq!(ok(&["pins", "leases", "--db", db]), "no expired reservations\n");
    let stock = ok(&["pins", "stock", "--db", db]);
    assert_eq!(stock_count(&stock, "reserved"), 1, "gw2's lease runs: {stock}");
    assert_eq!(stock_count(&stock, "available"), 3, "{stock}");
}

/// Every limit of the PIN server given on its command line has a range; out of it, the server does not start and
/// says which flag and what range (before it opens anything).
#[test]
fn server_limits_out_of_range_are_refused_with_the_flag_and_its_range() {
    for (flag, value, want) in [
        ("--max-connections", "0", "--max-connections: must be 1 to 100000"),
        ("--max-in-flight", "0", "--max-in-flight: must be 1 to 4096"),
        ("--max-in-flight", "4097", "--max-in-flight: must be 1 to 4096"),
        ("--max-frame", "65536", "--max-frame: must be 131072 to 16777216"),
        ("--idle-timeout-secs", "0", "--idle-timeout-secs: must be 30 to 86400"),
        (
            "--handshake-timeout-ms",
            "99",
            "--handshake-timeout-ms: must be 100 to 600000",
        ),
        (
            "--max-unauthenticated-per-source",
            "0",
            "--max-unauthenticated-per-source: must be 1 to 100000",
        ),
        ("--repeat-age-secs", "59", "--repeat-age-secs: must be 60 to 2592000"),
        ("--max-lease-secs", "59", "--max-lease-secs: must be 60 to 604800"),
        ("--pg-connections", "0", "--pg-connections: must be 1 to 64"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args([
                "server",
                "--db",
                "sqlite:/nonexistent/pins.db",
                "--listen",
                "127.0.0.1:0",
            ])
            .args([
                "--cert",
                "x",
                "--key",
                "x",
                "--client-ca",
                "x",
                "--gateways",
                "x",
                "--pin-keys",
                "x",
            ])
            .args([flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
}

/// Waits (bounded) until the server's log holds `what`, and returns the log.
async fn logged(log: &std::sync::Mutex<String>, what: &str) -> String {
    for _ in 0..500 {
        if log.lock().unwrap().contains(what) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = log.lock().unwrap().clone();
    assert!(text.contains(what), "`{what}` not in the log:\n{text}");
    text
}

/// SIGHUP makes the server read its gateway list again: a gateway whose line is gone is refused at its next
/// handshake and its open connection is closed, the others are untouched; a list that does not load changes
/// nothing and the log says why; a line added back admits the gateway again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_gateway_list_revoking_a_removed_gateway() {
    let d = std::env::temp_dir().join(format!("pingate-hup-list-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let db = format!("sqlite:{}", d.join("pins.db").display());
    let (_dir, certs) = setup("hup-list", &db, 10);
    let (server, addr, log) = start_server_logged(&db, &certs);
    let connect = |gw: &'static str| {
        let tls = tls(&certs, gw);
        async move { PspClient::connect(addr, "localhost", tls).await }
    };
    let (gw1, _) = connect("gw1").await.unwrap();
    let (gw2, w) = connect("gw2").await.unwrap();
    assert_eq!(w.gateway, "gw2");
    assert!(matches!(gw2.call(Request::Ping).await, Ok(Response::Pong)));

    // gw2 is revoked: its line goes, then SIGHUP.
    let list = std::fs::read_to_string(certs.gateways()).unwrap();
    let without_gw2: String = list
        .lines()
        .filter(|l| !l.starts_with("\"gw2\""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_gw2, list);
    std::fs::write(certs.gateways(), &without_gw2).unwrap();
    signal(&server, "-HUP");
    let text = logged(&log, "SIGHUP: gateway list reloaded").await;
    assert!(text.contains("removed=gw2"), "{text}");
    // Its open connection is closed, its next handshake refused; gw1 goes on, old connection and new.
    tokio::time::timeout(std::time::Duration::from_secs(10), gw2.closed())
        .await
        .expect("the revoked gateway's connection was closed");
    assert!(gw2.call(Request::Ping).await.is_err());
    assert!(connect("gw2").await.is_err(), "a revoked gateway is refused");
    assert!(matches!(gw1.call(Request::Ping).await, Ok(Response::Pong)));
    let (again, w) = connect("gw1").await.unwrap();
    assert_eq!(w.gateway, "gw1");
    drop(again);
    logged(&log, "removed from the gateway list").await;

    // A broken list: nothing changes (gw1 still admitted, gw2 still refused), and the log says why.
    std::fs::write(certs.gateways(), "\"gw1\" = \"not a fingerprint\"\n").unwrap();
    signal(&server, "-HUP");
    let text = logged(&log, "SIGHUP: the gateway list has a problem; nothing changed").await;
    assert!(text.contains("fingerprint must be 64 hex characters"), "{text}");
    assert!(connect("gw1").await.is_ok(), "the previous list is still in force");
    assert!(connect("gw2").await.is_err());
    assert!(matches!(gw1.call(Request::Ping).await, Ok(Response::Pong)));

    // gw2's line back: admitted again.
    std::fs::write(certs.gateways(), &list).unwrap();
    signal(&server, "-HUP");
    logged(&log, "added=gw2").await;
    let (_, w) = connect("gw2").await.unwrap();
    assert_eq!(w.gateway, "gw2");
    let _ = std::fs::remove_dir_all(&d);
}
