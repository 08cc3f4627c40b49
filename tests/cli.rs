//! The `pingate` commands as a user runs them: the real binary, stdin, stdout, stderr and exit codes.

mod common;

use common::write_key;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn pingate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/iso8583/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `pingate` for at most `secs` seconds (killed then: it did not stop by itself).
fn pingate_briefly(args: &[&str], secs: u64) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), text(&out.stderr))
}

#[test]
fn decode_masks_by_default_and_reveals_on_request() {
    let hex = fixture("iso87-bcd/sale-approved-0210.hex");
    let out = pingate(&["iso", "decode", "--dialect", "iso87-bcd", hex.trim()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mti"], "0210");
    assert_eq!(v["fields"]["39"], "00");
    assert_eq!(v["fields"]["63"], "[masked, 78 bytes]");
    assert!(!text(&out.stdout).contains("1234567890123456"));
    // Field numbers come out in numeric order.
    let keys: Vec<u32> = v["fields"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");

    let out = pingate(
        &["iso", "decode", "--dialect", "iso87-bcd", "--reveal", "-"],
        Some(&hex),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&fixture("iso87-bcd/sale-approved-0210.json")).unwrap();
    assert_eq!(v, expected);
}

#[test]
fn encode_reads_stdin_and_prints_the_golden_hex() {
    let json = fixture("iso87-ascii-binbitmap/sale-request-0200.json");
    // The default dialect is iso87-ascii-binbitmap.
    let out = pingate(&["iso", "encode"], Some(&json));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        fixture("iso87-ascii-binbitmap/sale-request-0200.hex").trim()
    );
}

#[test]
fn errors_go_to_stderr_with_exit_code_2() {
    // Field 4 of the ASCII reference carries a letter.
    let hex = fixture("iso87-ascii/sale-request-0200.hex");
    let mut bytes = pingate::iso8583::from_hex(hex.trim()).unwrap();
    bytes[28] = b'A';
    let bad = pingate::iso8583::to_hex(&bytes);
    let out = pingate(&["iso", "decode", "--dialect", "iso87-ascii", &bad], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr).trim(),
        "error: field 4: expected 12 digits at offset 26, found 0x41 at offset 28"
    );

    let out = pingate(&["iso", "decode", "--dialect", "nope", "00"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown dialect `nope`"),
        "{}",
        text(&out.stderr)
    );

    let out = pingate(&["iso", "encode"], Some(r#"{"mti":"0200","fields":{"4":"12"}}"#));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("field 4: value of length 2"),
        "{}",
        text(&out.stderr)
    );

    let out = pingate(&["iso", "decode", "zz"], None);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn dialects_lists_what_protocols_offers() {
    let out = pingate(&["iso", "dialects"], None);
    assert!(out.status.success());
    let s = text(&out.stdout);
    for name in [
        "iso87-ascii",
        "iso87-ascii-binbitmap (default)",
        "iso87-bcd",
        "iso87-ebcdic",
    ] {
        assert!(s.contains(name), "{name} missing from {s}");
    }
}

#[test]
fn pretty_shows_field_names() {
    let hex = fixture("iso87-ascii/sale-request-0200.hex");
    let out = pingate(
        &["iso", "decode", "--dialect", "iso87-ascii", "--pretty", hex.trim()],
        None,
    );
    let s = text(&out.stdout);
    assert!(
        s.contains("Systems trace audit number (STAN)") && s.contains("000123"),
        "{s}"
    );
}

#[test]
fn demo_runs_with_no_setup_and_reports() {
    let dir = std::env::temp_dir().join(format!("pingate-cli-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = pingate(
        &[
            "demo",
            "--sales",
            "60",
            "--terminals",
            "3",
            "--dir",
            dir.to_str().unwrap(),
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("sales approved: 60"), "{stdout}");
    assert!(stdout.contains("repeat (0201) got the same PIN: yes"), "{stdout}");
    assert!(stdout.contains("reversal (0400) answered: 00"), "{stdout}");
    assert!(stdout.contains("latency prefetch: p50"), "{stdout}");
    assert!(
        stdout.contains("stock left at the PIN server: TOPUP-EU-10 1000:"),
        "{stdout}"
    );
    // The demo never prints a PIN: every PIN it sold is in the journal only sealed, and not in its output.
    assert!(!stdout.contains("PN0"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gateway_without_config_or_command_says_what_to_give() {
    let out = pingate(&["gateway"], None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--config"), "{}", text(&out.stderr));
    let out = pingate(&["gateway", "stock", "--admin", "127.0.0.1:1"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("gateway admin at 127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn certs_key_writes_a_private_key_file_and_never_overwrites_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pingate-cli-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("journal.keys");
    let out = pingate(&["certs", "key", file.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let spec = std::fs::read_to_string(&file).unwrap();
    assert!(pingate::crypto::PinCipher::from_spec(&spec).is_ok(), "{spec}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let again = pingate(&["certs", "key", file.to_str().unwrap()], None);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), spec, "the key is untouched");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_lists_every_problem_with_its_key() {
    let d = std::env::temp_dir().join(format!("pingate-check-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("certs")).unwrap();
    let example = std::fs::read_to_string("protocols/gateway.example.toml").unwrap();
    let cfg = d.join("gateway.toml");
    std::fs::write(&cfg, &example).unwrap();
    // The files it names are missing: each is named.
    let o = pingate(&["check-config", cfg.to_str().unwrap()], None);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for key in [
        "gateway.journal_keys_file",
        "upstream.cert",
        "upstream.key",
        "upstream.ca",
        "gateway.terminal_kek_file",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
    // With them present, the example is fine.
    write_key(&d.join("journal.keys"), &format!("1:{}", "ab".repeat(32)));
    common::write_example_terminal_keys(&d);
    write_key(&d.join("certs/gateway.key"), "x");
    for f in ["certs/gateway.pem", "certs/ca.pem"] {
        std::fs::write(d.join(f), "x").unwrap();
    }
    let o = pingate(&["check-config", cfg.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("1 listeners, 2 serial lines, 2 terminals, 2 products listed: OK"),
        "{}",
        text(&o.stdout)
    );
    // Allowed but unwise: the admin socket and the metrics off loopback (neither authenticates) are warned of.
    assert!(!text(&o.stdout).contains("warning"), "{}", text(&o.stdout));
    let exposed = example
        .replace("admin = \"/run/pingate/admin.sock\"", "admin = \"0.0.0.0:9583\"")
        .replace("# metrics = \"127.0.0.1:9584\"", "metrics = \"[::1]:9584\"");
    std::fs::write(&cfg, exposed).unwrap();
    let o = pingate(&["check-config", cfg.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("warning: gateway.admin: 0.0.0.0:9583 is not on loopback, and the endpoint has no authentication"),
        "{out}"
    );
    assert!(!out.contains("gateway.metrics"), "[::1] is loopback: {out}");
    // Three mistakes at once: all three are reported, each with its key.
    let bad = example
        .replace("response_deadline_ms = 15000", "response_deadline_ms = 5")
        .replace("mode = \"on_demand\"", "mode = \"sometimes\"")
        .replace("data_bits = 7", "data_bits = 9")
        .replace("dialect = \"iso87-ascii\"", "dialect = \"iso87-klingon\"");
    std::fs::write(&cfg, bad).unwrap();
    let o = pingate(&["check-config", cfg.to_str().unwrap()], None);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("3 problems"), "{err}");
    for key in ["gateway.response_deadline_ms", "product[1].mode", "serial[1].data_bits"] {
        assert!(err.contains(key), "{key} in {err}");
    }
    // An unknown key is named with its place in the file.
    std::fs::write(&cfg, example.replace("keep_cache_on_shutdown", "keep_cache_on_shutdwn")).unwrap();
    let o = pingate(&["check-config", cfg.to_str().unwrap()], None);
    assert!(text(&o.stderr).contains("keep_cache_on_shutdwn"));
    // A PIN server's gateway list.
    let certs = d.join("c2");
    let o = pingate(
        &[
            "certs",
            "init",
            certs.to_str().unwrap(),
            "--gateway",
            "gw1",
            "--gateway",
            "gw2",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = pingate(
        &["check-config", certs.join("server/gateways.toml").to_str().unwrap()],
        None,
    );
    assert!(
        text(&o.stdout).contains("gateway list, 2 gateways: OK"),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `pingate check-config gateway.toml` from the configuration's own folder (a bare file name): the relative
/// journal path is the one the gateway itself opens (beside the file), so its folder is found, and a missing one is
/// still named.
#[test]
fn check_config_of_a_bare_file_name_finds_the_journal_folder_as_the_gateway_does() {
    let d = std::env::temp_dir().join(format!("pingate-check-bare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("certs")).unwrap();
    write_key(&d.join("journal.keys"), &format!("1:{}", "ab".repeat(32)));
    for f in ["certs/gateway.pem", "certs/ca.pem"] {
        std::fs::write(d.join(f), "x").unwrap();
    }
    write_key(&d.join("certs/gateway.key"), "x");
    common::write_example_terminal_keys(&d);
    let example = std::fs::read_to_string("protocols/gateway.example.toml").unwrap();
    assert!(example.contains("journal = \"gateway.journal\""));
    std::fs::write(d.join("gateway.toml"), &example).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_pingate"))
            .args(["check-config", "gateway.toml"])
            .current_dir(&d)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("OK"), "{}", text(&o.stdout));
    // The gateway resolves the same path to the same place: a file beside the configuration.
    let cfg = pingate::gateway::config::GatewayConfig::load(&d.join("gateway.toml")).unwrap();
    assert_eq!(cfg.journal, d.join("gateway.journal"));
    // A journal in a folder that is not there is still named.
    std::fs::write(
        d.join("gateway.toml"),
        example.replace("journal = \"gateway.journal\"", "journal = \"state/gateway.journal\""),
    )
    .unwrap();
    let o = run();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("gateway.journal: folder") && err.contains("state does not exist"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// `certs init` keeps the CA's private key apart (`ca/`, to keep offline) from what a host deploys: the server's
/// folder and each gateway's hold that host's own key and certificate, the CA certificate, and nothing else secret.
#[test]
fn certs_init_keeps_the_ca_key_apart_and_gives_each_host_only_its_own_key() {
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("pingate-certs-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let o = pingate(
        &[
            "certs",
            "init",
            d.to_str().unwrap(),
            "--gateway",
            "gw1",
            "--gateway",
            "gw2",
        ],
        None,
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.contains("keep it offline"), "{out}");
    let files = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(d.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let set = |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    assert_eq!(files("."), set(&["ca", "gateway-gw1", "gateway-gw2", "server"]));
    assert_eq!(files("ca"), set(&["ca.key", "ca.pem"]));
    assert_eq!(
        files("server"),
        set(&["ca.pem", "gateways.toml", "pin-keys", "server.key", "server.pem"])
    );
    for gw in ["gateway-gw1", "gateway-gw2"] {
        assert_eq!(files(gw), set(&["ca.pem", "gateway.key", "gateway.pem"]));
    }
    let mode = |p: &str| std::fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("ca"), 0o700);
    for key in [
        "ca/ca.key",
        "server/server.key",
        "server/pin-keys",
        "gateway-gw1/gateway.key",
    ] {
        assert_eq!(mode(key), 0o600, "{key}");
    }
    // Each host's folder: its own private key and no other; the CA certificate as the CA made it.
    let read = |p: &str| std::fs::read_to_string(d.join(p)).unwrap();
    let keys = [
        "ca/ca.key",
        "server/server.key",
        "gateway-gw1/gateway.key",
        "gateway-gw2/gateway.key",
    ]
    .map(read);
    assert!(keys.iter().all(|k| k.contains("PRIVATE KEY")));
    for (host, own) in [("server", 1), ("gateway-gw1", 2), ("gateway-gw2", 3)] {
        assert_eq!(read(&format!("{host}/ca.pem")), read("ca/ca.pem"));
        for name in files(host) {
            let body = read(&format!("{host}/{name}"));
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(
                    body.contains(k.trim()),
                    i == own && name.ends_with(".key"),
                    "{host}/{name}"
                );
            }
        }
    }
    // The paths the library names are these.
    let certs = pingate::tls::CertsDir { dir: d.clone() };
    assert_eq!(certs.server_key(), d.join("server/server.key"));
    assert_eq!(certs.gateway_cert("gw2"), d.join("gateway-gw2/gateway.pem"));
    assert_eq!(certs.gateway_ca("gw2"), d.join("gateway-gw2/ca.pem"));
    assert_eq!(certs.pin_keys(), d.join("server/pin-keys"));
    // Once made, never made again over itself.
    let again = pingate(&["certs", "init", d.to_str().unwrap()], None);
    assert!(!again.status.success() && text(&again.stderr).contains("refusing to overwrite"));
    let _ = std::fs::remove_dir_all(&d);
}

/// A PIN key, journal key or TLS private key file that group or others can read refuses the start of the PIN
/// server, of an import and of the gateway, with a message naming the file and its mode; `pingate check-config`
/// reports the gateway's with their keys.
#[test]
fn key_files_others_can_read_refuse_the_start_and_check_config_names_them() {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("pingate-key-modes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let dir = d.join("certs");
    let o = pingate(&["certs", "init", dir.to_str().unwrap(), "--gateway", "gw1"], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let certs = pingate::tls::CertsDir { dir };
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let refused = |(code, err): (Option<i32>, String), file: &std::path::Path, mode: &str| {
        assert_eq!(code, Some(2), "{err}");
        let expected = format!("{}: mode {mode} lets group or others at this key file", file.display());
        assert!(err.contains(&expected), "{expected} in {err}");
    };
    let (db, path) = (
        format!("sqlite:{}", d.join("pins.db").display()),
        |p: &std::path::Path| p.to_str().unwrap().to_string(),
    );
    let server = || {
        let args = [
            "server".to_string(),
            "--db".into(),
            db.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--cert".into(),
            path(&certs.server_cert()),
            "--key".into(),
            path(&certs.server_key()),
            "--client-ca".into(),
            path(&certs.server_ca()),
            "--gateways".into(),
            path(&certs.gateways()),
            "--pin-keys".into(),
            path(&certs.pin_keys()),
        ];
        pingate_briefly(&args.iter().map(String::as_str).collect::<Vec<_>>(), 10)
    };
    chmod(&certs.pin_keys(), 0o644);
    refused(server(), &certs.pin_keys(), "0644");
    let csv = d.join("pins.csv");
    std::fs::write(&csv, "product,amount,pin,serial,expiry,receipt\n").unwrap();
    let import = [
        "pins",
        "import",
        "--db",
        &db,
        "--pin-keys",
        &path(&certs.pin_keys()),
        &path(&csv),
    ];
    refused(pingate_briefly(&import, 10), &certs.pin_keys(), "0644");
    chmod(&certs.pin_keys(), 0o600);
    chmod(&certs.server_key(), 0o640);
    refused(server(), &certs.server_key(), "0640");
    chmod(&certs.server_key(), 0o600);

    // A gateway: its journal key, then its TLS key.
    let journal_keys = d.join("journal.keys");
    let o = pingate(&["certs", "key", &path(&journal_keys)], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    common::write_example_terminal_keys(&d);
    let example = std::fs::read_to_string("protocols/gateway.example.toml").unwrap();
    let cfg = d.join("gateway.toml");
    std::fs::write(
        &cfg,
        example
            .replace(
                "\"certs/gateway.pem\"",
                &format!("{:?}", path(&certs.gateway_cert("gw1"))),
            )
            .replace(
                "\"certs/gateway.key\"",
                &format!("{:?}", path(&certs.gateway_key("gw1"))),
            )
            .replace("\"certs/ca.pem\"", &format!("{:?}", path(&certs.gateway_ca("gw1"))))
            .replace(
                "\"/run/pingate/admin.sock\"",
                &format!("{:?}", path(&d.join("admin.sock"))),
            ),
    )
    .unwrap();
    let o = pingate(&["check-config", &path(&cfg)], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let gateway = || pingate_briefly(&["gateway", "--config", &path(&cfg)], 10);
    chmod(&journal_keys, 0o644);
    let o = pingate(&["check-config", &path(&cfg)], None);
    refused((o.status.code(), text(&o.stderr)), &journal_keys, "0644");
    assert!(
        text(&o.stderr).contains("gateway.journal_keys_file: "),
        "{}",
        text(&o.stderr)
    );
    refused(gateway(), &journal_keys, "0644");
    chmod(&journal_keys, 0o600);
    chmod(&certs.gateway_key("gw1"), 0o604);
    let o = pingate(&["check-config", &path(&cfg)], None);
    refused((o.status.code(), text(&o.stderr)), &certs.gateway_key("gw1"), "0604");
    assert!(text(&o.stderr).contains("upstream.key: "), "{}", text(&o.stderr));
    refused(gateway(), &certs.gateway_key("gw1"), "0604");
    chmod(&certs.gateway_key("gw1"), 0o600);
    // The terminals' key-encrypting key too.
    let kek = d.join("terminal.kek");
    chmod(&kek, 0o640);
    let o = pingate(&["check-config", &path(&cfg)], None);
    refused((o.status.code(), text(&o.stderr)), &kek, "0640");
    assert!(
        text(&o.stderr).contains("gateway.terminal_kek_file: "),
        "{}",
        text(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_systemd_units_verify() {
    // A core dump would hold PINs and keys in clear: the units allow none.
    for unit in ["pingate-server.service", "pingate-gateway.service"] {
        let text = std::fs::read_to_string(format!("deploy/{unit}")).unwrap();
        assert!(
            text.lines().any(|l| l.trim() == "LimitCORE=0"),
            "{unit}: no LimitCORE=0"
        );
    }
    // systemd-analyze is on the machine image; without it there is nothing to verify the units with.
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze not installed: units not verified");
        return;
    }
    let d = std::env::temp_dir().join(format!("pingate-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for unit in ["pingate-server.service", "pingate-gateway.service"] {
        let text = std::fs::read_to_string(format!("deploy/{unit}"))
            .unwrap()
            .replace("/usr/bin/pingate", env!("CARGO_BIN_EXE_pingate"));
        let path = d.join(unit);
        std::fs::write(&path, text).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let out = format!("{}{}", text_of(&o.stdout), text_of(&o.stderr));
        assert!(o.status.success() && out.trim().is_empty(), "{unit}: {out}");
    }
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The demo's listener requires MACs: `pingate-terminal` with the key file the demo prints buys; the same terminal id
/// without it (as anyone who read a receipt would send) gets 63.
#[test]
fn the_kept_running_demo_requires_macs_and_prints_its_keys() {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("pingate-cli-demo-mac-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(["demo", "--sales", "8", "--terminals", "2", "--keep-running", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let (mut gateway, mut keys) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("gateway terminals: ").nth(1) {
            gateway = rest.split(' ').next().map(str::to_string);
        }
        if let Some(rest) = line.strip_prefix("MAC keys of the terminals (the listener requires MACs): ") {
            keys = Some(rest.split(' ').map(str::to_string).collect::<Vec<_>>());
        }
        if line.starts_with("running until") {
            break;
        }
    }
    let (gateway, keys) = (gateway.expect("gateway address"), keys.expect("key files"));
    let sale = |with_keys: bool, stan: &str| {
        let mut args: Vec<String> = vec![
            "--gateway".into(),
            gateway.clone(),
            "--terminal".into(),
            "DEMO0002".into(),
        ];
        if with_keys {
            args.extend(keys.iter().cloned());
        }
        args.extend(["sale", "--product", "GIFT-25", "--amount", "2500", "--stan", stan].map(String::from));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pingate-terminal"))
            .args(&args)
            .output()
            .unwrap();
        let out = text(&o.stdout);
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or("{}")).unwrap_or_default();
        v["answer"]["fields"]["39"].as_str().unwrap_or("none").to_string()
    };
    let unsigned = sale(false, "900001");
    let signed = sale(true, "900002");
    let _ = demo.kill();
    let _ = demo.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(unsigned, "63");
    assert_eq!(signed, "00");
}

/// Progress bars (indicatif) are for a person at a terminal: with stderr a pipe, as in CI logs, log collectors and
/// these tests, the long commands write no `\r`, no escape sequence and no bar; on a pseudo-terminal the bar is
/// there.
#[test]
fn progress_bars_show_on_a_terminal_only() {
    let d = std::env::temp_dir().join(format!("pingate-cli-progress-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let keys = d.join("pin-keys");
    let db = format!("sqlite:{}", d.join("pins.db").display());
    assert!(pingate(&["certs", "key", keys.to_str().unwrap()], None)
        .status
        .success());
    let o = pingate(
        &[
            "pins",
            "product",
            "--db",
            &db,
            "--code",
            "TOPUP-EU-10",
            "--name",
            "Top-up 10",
            "--supplier",
            "Telco",
            "--currency",
            "978",
            "--amounts",
            "1000",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let import = [
        "pins",
        "import",
        "--db",
        &db,
        "--pin-keys",
        keys.to_str().unwrap(),
        "fixtures/pins/sample-pins.csv",
    ];
    let clean = |o: &Output| {
        let err = text(&o.stderr);
        assert!(
            !err.contains('\r') && !err.contains('\u{1b}') && !err.contains("importing") && !err.contains("auditing"),
            "progress on a pipe: {err:?}"
        );
    };
    let o = pingate(&import, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("imported 20 PINs"), "{}", text(&o.stdout));
    clean(&o);
    let o = pingate(&["audit", "--db", &db], None);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    clean(&o);
    // On a terminal (script(1) gives the command a pseudo-terminal), the audit draws its bar. script is in
    // util-linux, on every Debian machine; elsewhere there is nothing to run it under.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("script(1) not installed: the terminal side is not checked");
        let _ = std::fs::remove_dir_all(&d);
        return;
    }
    let cmd = format!("{} audit --db {db}", env!("CARGO_BIN_EXE_pingate"));
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let tty = text(&o.stdout);
    assert!(o.status.success(), "{tty}");
    assert!(
        tty.contains("auditing") && tty.contains("steps"),
        "no bar on a terminal: {tty:?}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
