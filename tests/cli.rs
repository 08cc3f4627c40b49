//! The `pingate` commands as a user runs them: the real binary, stdin, stdout, stderr and exit codes.

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
    assert!(pingate::store::crypto::PinCipher::from_spec(&spec).is_ok(), "{spec}");
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
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
    // With them present, the example is fine.
    std::fs::write(d.join("journal.keys"), format!("1:{}", "ab".repeat(32))).unwrap();
    for f in ["certs/gateway-gw1.pem", "certs/gateway-gw1.key", "certs/ca.pem"] {
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
    let o = pingate(&["check-config", certs.join("gateways.toml").to_str().unwrap()], None);
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
    std::fs::write(d.join("journal.keys"), format!("1:{}", "ab".repeat(32))).unwrap();
    for f in ["certs/gateway-gw1.pem", "certs/gateway-gw1.key", "certs/ca.pem"] {
        std::fs::write(d.join(f), "x").unwrap();
    }
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

#[test]
fn the_systemd_units_verify() {
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
            .replace("/usr/local/bin/pingate", env!("CARGO_BIN_EXE_pingate"));
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
