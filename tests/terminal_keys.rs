//! `pingate terminals key generate|import|rotate|show-kcv` as an operator runs them: the real binary, a real key
//! file and KEK in a temporary folder, keys on standard input, exit codes.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

fn pingate(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(args)
        .env_remove("PINGATE_TERMINAL_KEYS")
        .env_remove("PINGATE_TERMINAL_KEK")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn refused(out: Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn generate_import_rotate_and_show_kcv_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("pingate-terminals-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (file, kek) = (dir.join("terminal-keys.toml"), dir.join("kek"));
    let (file, kek) = (file.to_str().unwrap(), kek.to_str().unwrap());
    ok(pingate(&["certs", "key", kek], ""));

    // Import: the key on standard input, checked against the KCV the operator was given.
    let iso_key = "0123456789ABCDEF FEDCBA9876543210\n";
    let common = ["--file", file, "--kek", kek, "--terminal", "TERM0001"];
    let e = refused(pingate(
        &[
            &["terminals", "key", "import"][..],
            &common,
            &["--algorithm", "retail-des", "--kcv", "123456"],
        ]
        .concat(),
        iso_key,
    ));
    assert!(
        e.starts_with("error: the key's check value is 08D7B4, not 123456"),
        "{e}"
    );
    let out = ok(pingate(
        &[
            &["terminals", "key", "import"][..],
            &common,
            &["--algorithm", "retail-des", "--kcv", "08D7B4"],
        ]
        .concat(),
        iso_key,
    ));
    assert_eq!(
        out,
        "terminal TERM0001 key 1 (retail-des): KCV 08D7B4 (TDES encryption of a zero block)\n"
    );
    assert_eq!(std::fs::metadata(file).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(file).unwrap();
    assert!(!text.contains("0123456789ABCDEF") && !text.contains("FEDCBA9876543210"));

    // Generate for another terminal: the key is printed only with --reveal.
    let out = ok(pingate(
        &[
            "terminals",
            "key",
            "generate",
            "--file",
            file,
            "--kek",
            kek,
            "--terminal",
            "TERM0002",
            "--algorithm",
            "aes-cmac",
        ],
        "",
    ));
    assert!(out.starts_with("terminal TERM0002 key 1 (aes-cmac): KCV "), "{out}");
    assert!(!out.contains("key: "));
    let e = refused(pingate(
        &[
            "terminals",
            "key",
            "generate",
            "--file",
            file,
            "--kek",
            kek,
            "--terminal",
            "TERM0002",
            "--algorithm",
            "aes-cmac",
        ],
        "",
    ));
    assert_eq!(
        e,
        "error: terminal TERM0002 has keys already (key 1): `rotate` gives it a new one\n"
    );
    let e = refused(pingate(
        &[
            "terminals",
            "key",
            "generate",
            "--file",
            file,
            "--kek",
            kek,
            "--terminal",
            "T3",
            "--algorithm",
            "x9.9",
        ],
        "",
    ));
    assert!(e.contains("unknown MAC algorithm `x9.9`"), "{e}");

    // Rotate: a new key id that signs, the old one verifying for the grace period.
    let out = ok(pingate(
        &[
            &["terminals", "key", "rotate"][..],
            &common,
            &["--grace-hours", "24", "--reveal"],
        ]
        .concat(),
        "",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("terminal TERM0001 key 2 (retail-des): KCV "),
        "{out}"
    );
    assert!(
        lines[1].starts_with("terminal TERM0001 key 1 still verifies requests until "),
        "{out}"
    );
    let new_key = lines[2].strip_prefix("key: ").unwrap();
    assert_eq!(new_key.len(), 32);

    // show-kcv, with the KEK: each key opened and its KCV computed again.
    let out = ok(pingate(
        &["terminals", "key", "show-kcv", "--file", file, "--kek", kek],
        "",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(
        lines[1].starts_with("TERM0001             1  retail-des  08D7B4  verifies until "),
        "{out}"
    );
    assert!(lines[2].starts_with("TERM0001             2  retail-des  ") && lines[2].ends_with("signs answers"));
    assert!(lines[3].starts_with("TERM0002             1  aes-cmac    ") && lines[3].ends_with("signs answers"));
    assert!(lines[4].starts_with("KCV: retail-des: TDES encryption of a zero block"));
    assert!(!out.contains(new_key));
    let out = ok(pingate(
        &["terminals", "key", "show-kcv", "--file", file, "--terminal", "TERM0002"],
        "",
    ));
    assert_eq!(out.lines().count(), 3, "{out}");

    // A key file others may read is refused by every command.
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = refused(pingate(&["terminals", "key", "show-kcv", "--file", file], ""));
    assert!(e.contains("chmod 600"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
