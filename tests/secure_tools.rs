//! The traffic tools against secured gateways (issue 20, §6): `pingate-terminal` and `pingate-load` as a user runs
//! them, with a terminal key file (`--mac-key-file`, `--kek-file`) against a listener that requires MACs, and with
//! `--tls --ca --cert --key` against a listener that requires TLS with client certificates; a real PIN server.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use pingate::demo::rig::{past_this_second, sample_modes, sample_products, start_gateway, start_server, Inventory};
use pingate::mac::{MacAlgorithm, MacKey};
use pingate::terminal_keys::{load_kek, TerminalKeyFile};

fn write_keys(dir: &Path, terminals: &[(&str, MacAlgorithm)]) -> (PathBuf, PathBuf) {
    let kek_path = dir.join("terminal-kek");
    pingate::tls::write_new_key(&kek_path).unwrap();
    let kek = load_kek(&kek_path).unwrap();
    let path = dir.join("terminal-keys.toml");
    let mut file = TerminalKeyFile::load_or_new(&path).unwrap();
    for (t, alg) in terminals {
        let key = MacKey::generate(*alg).unwrap();
        file.add(&kek, t, &key, pingate::clock::unix_now(), None).unwrap();
    }
    file.save(&path).unwrap();
    (path, kek_path)
}

async fn tool<S: AsRef<std::ffi::OsStr>>(bin: &str, args: &[S]) -> Output {
    tokio::process::Command::new(bin).args(args).output().await.unwrap()
}

fn code_of(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    let l: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or("{}")).unwrap();
    l["answer"]["fields"]["39"].as_str().unwrap_or("none").to_string()
}

const TERMINAL: &str = env!("CARGO_BIN_EXE_pingate-terminal");
const LOAD: &str = env!("CARGO_BIN_EXE_pingate-load");

/// The answers by code of the load generator's gateway line (`codes 00:39 63:1`).
fn codes(out: &str) -> Vec<String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("gateway "))
        .unwrap_or_else(|| panic!("{out}"));
    line.rsplit("codes ")
        .next()
        .unwrap()
        .split(' ')
        .map(|c| c.split(':').next().unwrap().to_string())
        .collect()
}

fn load_args<'a>(addr: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        "--gateway",
        addr,
        "--connections",
        "2",
        "--rate",
        "40",
        "--duration",
        "1",
        "--mix",
        "GIFT-25:2500",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_simulator_and_the_load_generator_speak_macs() {
    let dir = std::env::temp_dir().join(format!("pingate-secure-tools-mac-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(200)).unwrap();
    let server = start_server(&inv, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let (keys, kek) = write_keys(
        &dir,
        &[
            ("DEMO0001", MacAlgorithm::RetailDes),
            ("DEMO0002", MacAlgorithm::AesCmac),
        ],
    );
    let gw = start_gateway(
        &inv,
        "gw1",
        &[server.addr],
        3,
        &sample_modes(5, 10),
        (
            "terminal_keys_file = \"terminal-keys.toml\"\nterminal_kek_file = \"terminal-kek\"\nmac_failures = 1000",
            "mac = \"required\"",
        ),
    )
    .await
    .unwrap();
    past_this_second().await;
    let addr = gw.addr.to_string();
    let (keys, kek) = (keys.to_str().unwrap(), kek.to_str().unwrap());
    let mac = ["--mac-key-file", keys, "--kek-file", kek];

    // With the key file: approved (the answer's MAC checked by the tool); without: 63.
    let sale = ["sale", "--product", "GIFT-25", "--amount", "2500"];
    let with: Vec<&str> = ["--gateway", &addr].iter().chain(&mac).chain(&sale).copied().collect();
    let o = tool(TERMINAL, &with).await;
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(code_of(&o), "00");
    let without: Vec<&str> = ["--gateway", &addr, "--terminal", "DEMO0002"]
        .iter()
        .chain(&["sale", "--product", "GIFT-25", "--amount", "2500", "--stan", "2"])
        .copied()
        .collect();
    let o = tool(TERMINAL, &without).await;
    assert_eq!(code_of(&o), "63");

    // The load generator: every sale approved, and the MAC's cost per request reported.
    let o = tool(LOAD, &load_args(&addr, &mac)).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(codes(&out), ["00"], "{out}");
    assert!(out.contains("MAC cost per request"), "{out}");
    assert!(out.contains("0 answers without a good MAC"), "{out}");
    // Without keys every request is refused.
    let o = tool(LOAD, &load_args(&addr, &[])).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(codes(&out), ["63"], "{out}");

    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_simulator_and_the_load_generator_speak_tls() {
    let dir = std::env::temp_dir().join(format!("pingate-secure-tools-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(200)).unwrap();
    let server = start_server(&inv, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let certs = pingate::tls::CertsDir {
        dir: inv.certs.dir.clone(),
    };
    let out = dir.join("tls");
    let issue = |kind, names: &[&str]| {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        pingate::tls::issue(&certs, kind, &names, 30, &out).unwrap();
    };
    issue(pingate::tls::Issue::Listener, &["localhost"]);
    issue(pingate::tls::Issue::Client, &["nac-1"]);
    let gw = start_gateway(
        &inv,
        "gw1",
        &[server.addr],
        3,
        &sample_modes(5, 10),
        (
            "",
            "tls = { cert = \"tls/localhost.pem\", key = \"tls/localhost.key\", client_ca = \"certs/ca/ca.pem\" }\n\n\
             [[nac]]\nname = \"nac-1\"\nterminals = [\"DEMO0001\", \"DEMO0002\"]\n",
        ),
    )
    .await
    .unwrap();
    past_this_second().await;
    let addr = gw.addr.to_string();
    let p = |f: &str| out.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("nac-1.pem"), p("nac-1.key"));
    let tls = ["--tls", "--ca", &ca, "--cert", &cert, "--key", &key];

    let args: Vec<&str> = ["--gateway", &addr, "--count", "2"]
        .iter()
        .chain(&tls)
        .chain(&["sale", "--product", "GIFT-25", "--amount", "2500"])
        .copied()
        .collect();
    let o = tool(TERMINAL, &args).await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.matches("\"39\":\"00\"").count(), 2, "{stdout}");
    // Without TLS the tool does not get an answer.
    let o = tool(TERMINAL, &["--gateway", &addr, "--timeout-ms", "3000", "echo"]).await;
    assert!(!o.status.success());

    let o = tool(LOAD, &load_args(&addr, &tls)).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(codes(&out), ["00"], "{out}");
    tokio::time::sleep(Duration::from_millis(100)).await;

    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_replays_against_a_gateway_that_requires_tls_and_macs() {
    let dir = std::env::temp_dir().join(format!("pingate-secure-tools-replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let inv = Inventory::create(&dir, &["gw1"], &sample_products(50)).unwrap();
    let server = start_server(&inv, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    // The golden capture's terminal.
    let (keys, kek) = write_keys(&dir, &[("DEMO0006", MacAlgorithm::AesCmac)]);
    let certs = pingate::tls::CertsDir {
        dir: inv.certs.dir.clone(),
    };
    let out = dir.join("tls");
    for (kind, name) in [
        (pingate::tls::Issue::Listener, "localhost"),
        (pingate::tls::Issue::Client, "DEMO0006"),
    ] {
        pingate::tls::issue(&certs, kind, &[name.to_string()], 30, &out).unwrap();
    }
    let gw = start_gateway(
        &inv,
        "gw1",
        &[server.addr],
        8,
        &sample_modes(5, 10),
        (
            "terminal_keys_file = \"terminal-keys.toml\"\nterminal_kek_file = \"terminal-kek\"\nmac_failures = 1000",
            "mac = \"required\"\n\
             tls = { cert = \"tls/localhost.pem\", key = \"tls/localhost.key\", client_ca = \"certs/ca/ca.pem\" }",
        ),
    )
    .await
    .unwrap();
    past_this_second().await;
    let addr = gw.addr.to_string();
    let p = |f: &str| out.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("DEMO0006.pem"), p("DEMO0006.key"));
    let (keys, kek) = (keys.to_str().unwrap(), kek.to_str().unwrap());
    let replay = |mac: bool| {
        let mut args = vec![
            "replay",
            "fixtures/captures/contract.capture",
            "--gateway",
            &addr,
            "--timeout-ms",
            "5000",
            "--tls",
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
        ];
        if mac {
            args.extend(["--mac-key-file", keys, "--kek-file", kek]);
        }
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let pingate = env!("CARGO_BIN_EXE_pingate");
    // Without the keys every answer is a 63: the replay reports differences.
    let o = tool(pingate, &replay(false)).await;
    assert!(!o.status.success());
    // With them, every answer matches the capture (made without MACs: the answers' MAC fields are not compared).
    let o = tool(pingate, &replay(true)).await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("13 requests replayed: 13 answers match"), "{stdout}");
    gw.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
