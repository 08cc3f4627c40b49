//! Golden fixtures, byte-exact both ways: `fixtures/iso8583/<dialect>/<scenario>.hex` is what our encoder makes of
//! the `.json` beside it, and decoding the hex gives back exactly that JSON.
//!
//! `fixtures/iso8583/interop/<dialect>--<scenario>.*` were produced by another implementation (pyiso8583, see
//! `tools/interop/`): they are never regenerated here. Our own fixtures are regenerated with `PINGATE_BLESS=1`
//! after a deliberate change, and the diff is reviewed like code.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use pingate::iso8583::{from_hex, to_hex, Dialects};

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/iso8583")
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

/// Checks one pair; returns a description of the mismatch, if any.
fn check(dialects: &Dialects, dialect_name: &str, json_path: &Path, bless: bool) -> Option<String> {
    let d = dialects.get(dialect_name).unwrap();
    let hex_path = json_path.with_extension("hex");
    let json_text = std::fs::read_to_string(json_path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&json_text).unwrap();
    let msg = match d.from_json(&json) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: from_json: {e}", json_path.display())),
    };
    let encoded = match d.encode(&msg) {
        Ok(b) => to_hex(&b),
        Err(e) => return Some(format!("{}: encode: {e}", json_path.display())),
    };
    if bless {
        std::fs::write(&hex_path, format!("{encoded}\n")).unwrap();
    }
    let golden = std::fs::read_to_string(&hex_path).unwrap_or_else(|e| panic!("{}: {e}", hex_path.display()));
    let golden_bytes = from_hex(golden.trim()).unwrap();
    if encoded != to_hex(&golden_bytes) {
        return Some(format!(
            "{}: encoding differs\n ours:   {encoded}\n golden: {}",
            hex_path.display(),
            golden.trim()
        ));
    }
    let decoded = match d.decode(&Bytes::from(golden_bytes)) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: decode: {e}", hex_path.display())),
    };
    if d.to_json(&decoded, true) != json {
        return Some(format!(
            "{}: decoded JSON differs: {}",
            hex_path.display(),
            d.to_json(&decoded, true)
        ));
    }
    if decoded != msg {
        return Some(format!(
            "{}: decoded message differs from the JSON's",
            hex_path.display()
        ));
    }
    None
}

#[test]
fn golden_fixtures_of_every_shipped_dialect() {
    let bless = std::env::var_os("PINGATE_BLESS").is_some();
    let mut failures = Vec::new();
    let mut count = 0;
    let mut scenarios: Option<Vec<String>> = None;
    let dialects = Dialects::builtin();
    for (d, _) in dialects.iter() {
        let files = json_files(&fixtures_root().join(&d.name));
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into())
            .collect();
        // Every dialect carries every scenario of the sale contract.
        match &scenarios {
            None => scenarios = Some(names),
            Some(s) => assert_eq!(s, &names, "{} has a different set of scenarios", d.name),
        }
        for f in files {
            count += 1;
            failures.extend(check(&dialects, &d.name, &f, bless));
        }
    }
    assert!(count >= 40, "only {count} fixtures found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn interop_fixtures_from_another_implementation() {
    let dialects = Dialects::builtin();
    let dir = fixtures_root().join("interop");
    let mut failures = Vec::new();
    let files = json_files(&dir);
    assert!(files.len() >= 9, "interop fixtures missing in {}", dir.display());
    for f in files {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let (dialect, _) = stem
            .split_once("--")
            .expect("interop fixtures are named <dialect>--<scenario>");
        failures.extend(check(&dialects, dialect, &f, false));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
