//! The Debian package (`cargo deb`, `[package.metadata.deb]` in Cargo.toml) without building it: its files exist,
//! the units run what it installs where it installs it, the man pages and completions it ships are those the binary
//! makes today, and its gateway configuration checks clean with the files its postinst makes. `.ci/run` builds the
//! package, installs it with dpkg and runs the installed binary on the installed configuration.
//!
//! `PINGATE_BLESS=1 cargo test --test deb` rewrites the shipped man pages and completions from the binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BINARIES: [&str; 5] = [
    "pingate",
    "pingate-dialup",
    "pingate-terminal",
    "pingate-load",
    "pingate-replay",
];

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn manifest() -> toml::Table {
    std::fs::read_to_string("Cargo.toml").unwrap().parse().unwrap()
}

/// `[package.metadata.deb]`.
fn deb() -> toml::Table {
    manifest()["package"]["metadata"]["deb"].as_table().unwrap().clone()
}

/// (source, destination) of every asset, destinations absolute and a folder's completed with the file name.
fn assets() -> Vec<(String, String)> {
    deb()["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            let (src, dst) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
            let dst = if dst.ends_with('/') {
                format!("/{dst}{}", Path::new(src).file_name().unwrap().to_str().unwrap())
            } else {
                format!("/{dst}")
            };
            (src.to_string(), dst)
        })
        .collect()
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-deb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every absolute path under `prefix` that `text` names, up to a quote, a space or the end of the line.
fn paths_under(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            text[i..]
                .split(|c: char| c.is_whitespace() || "\"',;)`".contains(c))
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn the_package_installs_the_five_binaries_units_configuration_and_docs() {
    let assets = assets();
    let bins: BTreeSet<String> = manifest()["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bins, BINARIES.iter().map(|b| b.to_string()).collect());
    for bin in BINARIES {
        assert!(
            assets
                .iter()
                .any(|(src, dst)| src == &format!("target/release/{bin}") && dst == &format!("/usr/bin/{bin}")),
            "{bin} is not installed in /usr/bin"
        );
    }
    // Every other source is a file of the repository (a glob: at least one file).
    for (src, _) in assets.iter().filter(|(s, _)| !s.starts_with("target/")) {
        match src.strip_suffix("*.1") {
            Some(dir) => assert!(
                std::fs::read_dir(dir)
                    .unwrap()
                    .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "1")),
                "{src}: no page"
            ),
            None => assert!(Path::new(src).is_file(), "asset {src} is missing"),
        }
    }
    let installed: BTreeSet<&str> = assets.iter().map(|(_, d)| d.as_str()).collect();
    // What the units name is what the package installs: binaries, configuration, documentation.
    for unit in ["pingate-gateway.service", "pingate-server.service"] {
        assert!(
            installed.contains(format!("/usr/lib/systemd/system/{unit}").as_str()),
            "{unit}"
        );
        let body = std::fs::read_to_string(format!("deploy/{unit}")).unwrap();
        for line in body
            .lines()
            .filter(|l| l.starts_with("Exec") && !l.starts_with("ExecReload"))
        {
            let program = line.split_once('=').unwrap().1.split_whitespace().next().unwrap();
            assert!(installed.contains(program), "{unit}: {program} is not in the package");
        }
        assert!(
            body.lines().any(|l| l.trim() == "User=pingate"),
            "{unit}: the postinst makes the pingate user"
        );
        let doc = body
            .lines()
            .find_map(|l| l.strip_prefix("Documentation=file://"))
            .unwrap();
        assert!(installed.contains(doc), "{unit}: {doc} is not in the package");
    }
    let gateway_unit = std::fs::read_to_string("deploy/pingate-gateway.service").unwrap();
    assert!(gateway_unit.contains("--config /etc/pingate/gateway.toml"));
    assert!(installed.contains("/etc/pingate/gateway.toml"));
    let deb = deb();
    let conf: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        conf,
        ["/etc/pingate/gateway.toml"],
        "the configuration is a conffile: an upgrade keeps edits"
    );
    // Every file of /etc/pingate the units and the configuration name, other than the configuration itself, is one
    // the postinst makes (by its name, in its folder).
    let postinst = std::fs::read_to_string("deploy/deb/postinst").unwrap();
    let named = [
        gateway_unit,
        std::fs::read_to_string("deploy/pingate-server.service").unwrap(),
        std::fs::read_to_string("deploy/gateway.toml").unwrap(),
    ]
    .iter()
    .flat_map(|t| paths_under(t, "/etc/pingate/"))
    .filter(|p| p != "/etc/pingate/gateway.toml" && !p.ends_with('/'))
    .collect::<BTreeSet<_>>();
    assert!(named.len() >= 8, "{named:?}");
    for p in &named {
        let (dir, file) = p.rsplit_once('/').unwrap();
        assert!(
            postinst.contains(p.as_str()) || (postinst.contains(&format!("{dir}/")) && postinst.contains(file)),
            "{p} is named but the postinst does not make it"
        );
    }
}

#[test]
fn the_packaged_configuration_checks_clean_with_what_the_postinst_makes() {
    let d = fresh_dir("config");
    let root = d.to_str().unwrap();
    let pingate = env!("CARGO_BIN_EXE_pingate");
    // What the postinst does, under a folder of the test's instead of / (no user, no ownership).
    let init = d.join("init");
    let o = run(pingate, &["certs", "init", init.to_str().unwrap(), "--gateway", "gw1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let certs = d.join("etc/pingate/certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::create_dir_all(d.join("var/lib/pingate")).unwrap();
    for (from, to) in [
        ("server/server.pem", "server.pem"),
        ("server/ca.pem", "ca.pem"),
        ("server/gateways.toml", "gateways.toml"),
        ("server/server.key", "server.key"),
        ("gateway-gw1/gateway.pem", "gateway.pem"),
        ("gateway-gw1/gateway.key", "gateway.key"),
    ] {
        std::fs::copy(init.join(from), certs.join(to)).unwrap();
    }
    let keys = d.join("etc/pingate/journal.keys");
    let o = run(pingate, &["certs", "key", keys.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg = d.join("etc/pingate/gateway.toml");
    let packaged = std::fs::read_to_string("deploy/gateway.toml").unwrap();
    let here = packaged
        .replace("\"/etc/pingate/", &format!("\"{root}/etc/pingate/"))
        .replace("\"/var/lib/pingate/", &format!("\"{root}/var/lib/pingate/"))
        // The runtime folder is systemd's: a socket path in a folder that exists, for the check.
        .replace("\"/run/pingate/admin.sock\"", &format!("\"{root}/admin.sock\""));
    std::fs::write(&cfg, &here).unwrap();
    let o = run(pingate, &["check-config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("OK"), "{}", text(&o.stdout));
    assert!(!text(&o.stdout).contains("warning"), "{}", text(&o.stdout));
    // The server's gateway list, which its unit reads, checks too.
    let o = run(
        pingate,
        &["check-config", certs.join("gateways.toml").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("1 gateways: OK"), "{}", text(&o.stdout));
    // And without the files the postinst makes, the check names each of them: the test above is not vacuous.
    std::fs::remove_file(certs.join("gateway.key")).unwrap();
    std::fs::remove_file(&keys).unwrap();
    let o = run(pingate, &["check-config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    for key in ["upstream.key", "gateway.journal_keys_file"] {
        assert!(text(&o.stderr).contains(key), "{key}: {}", text(&o.stderr));
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn every_binary_tells_its_version() {
    for bin in BINARIES {
        let path = match bin {
            "pingate" => env!("CARGO_BIN_EXE_pingate"),
            "pingate-dialup" => env!("CARGO_BIN_EXE_pingate-dialup"),
            "pingate-terminal" => env!("CARGO_BIN_EXE_pingate-terminal"),
            "pingate-load" => env!("CARGO_BIN_EXE_pingate-load"),
            _ => env!("CARGO_BIN_EXE_pingate-replay"),
        };
        let o = run(path, &["--version"]);
        assert!(o.status.success(), "{bin}: {}", text(&o.stderr));
        // The package's version is the crate's (cargo deb takes it from Cargo.toml), so what a binary says is what
        // `dpkg -l pingate` says.
        assert_eq!(text(&o.stdout), format!("{bin} {}\n", env!("CARGO_PKG_VERSION")));
    }
}

/// The man pages and completions the package ships (deploy/man, deploy/completions) are what the binary makes now:
/// a changed option shows up in both or the test fails.
#[test]
fn shipped_man_pages_and_completions_are_current() {
    let pingate = env!("CARGO_BIN_EXE_pingate");
    let bless = std::env::var_os("PINGATE_BLESS").is_some();
    let mut stale = Vec::new();
    for (shell, file) in [
        ("bash", "deploy/completions/pingate.bash"),
        ("zsh", "deploy/completions/_pingate"),
        ("fish", "deploy/completions/pingate.fish"),
    ] {
        let o = run(pingate, &["completions", shell]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        if bless {
            std::fs::write(file, &o.stdout).unwrap();
        } else if std::fs::read(file).ok().as_deref() != Some(&o.stdout[..]) {
            stale.push(file.to_string());
        }
    }
    let d = fresh_dir("man");
    let o = run(pingate, &["man", "--out", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let pages = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".1"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (made, shipped) = (pages(&d), pages(Path::new("deploy/man")));
    assert!(made.len() > 20, "{made:?}");
    if bless {
        for old in shipped.difference(&made) {
            std::fs::remove_file(Path::new("deploy/man").join(old)).unwrap();
        }
        std::fs::create_dir_all("deploy/man").unwrap();
        for page in &made {
            std::fs::copy(d.join(page), Path::new("deploy/man").join(page)).unwrap();
        }
    } else {
        for page in made.union(&shipped) {
            let (a, b) = (
                std::fs::read(d.join(page)).ok(),
                std::fs::read(Path::new("deploy/man").join(page)).ok(),
            );
            if a != b {
                stale.push(format!("deploy/man/{page}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
    assert!(
        stale.is_empty(),
        "out of date: {stale:?}; refresh them with `PINGATE_BLESS=1 cargo test --test deb` and commit them"
    );
}
