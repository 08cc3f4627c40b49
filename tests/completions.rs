//! Shell completions and manual pages, generated from the command-line definitions by the real binary.

use std::process::Command;

fn pingate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pingate")).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn completions_name_the_commands_and_their_options() {
    for (shell, marker) in [
        ("bash", "_pingate()"),
        ("zsh", "#compdef pingate"),
        ("fish", "complete -c pingate"),
    ] {
        let (ok, text) = pingate(&["completions", shell]);
        assert!(ok, "{shell}: {text}");
        assert!(text.contains(marker), "{shell}: {text}");
        for word in ["gateway", "server", "check-config", "--config"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (ok, text) = pingate(&["completions", "tcsh"]);
    assert!(!ok && text.contains("tcsh"), "{text}");
}

#[test]
fn manual_pages_for_every_command() {
    let dir = std::env::temp_dir().join(format!("pingate-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, text) = pingate(&["man", "--out", dir.to_str().unwrap()]);
    assert!(ok, "{text}");
    for page in [
        "pingate.1",
        "pingate-gateway.1",
        "pingate-gateway-stock.1",
        "pingate-server.1",
    ] {
        let body = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(body.starts_with(".ie") || body.contains(".TH"), "{page}: {body}");
    }
    let main = std::fs::read_to_string(dir.join("pingate.1")).unwrap();
    assert!(main.contains("Sells prepaid PINs"), "{main}");
    let _ = std::fs::remove_dir_all(&dir);
}
