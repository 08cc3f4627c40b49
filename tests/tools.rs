//! The traffic tools as a user runs them: the binaries in `tools/` against a real gateway and PIN server.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use pingate::demo::rig::{GatewayHandle, Inventory, ServerHandle};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pingate-tools-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn rig(name: &str) -> (Inventory, ServerHandle, GatewayHandle) {
    rig_full(name, 1000, "", "").await
}

/// A rig whose listener table gets `listener_extra` (e.g. a capture file).
async fn rig_with(name: &str, listener_extra: &str) -> (Inventory, ServerHandle, GatewayHandle) {
    rig_full(name, 1000, "", listener_extra).await
}

/// `pins` per product; `gateway_extra` goes to the `[gateway]` table, `listener_extra` to the listener.
async fn rig_full(
    name: &str,
    pins: usize,
    gateway_extra: &str,
    listener_extra: &str,
) -> (Inventory, ServerHandle, GatewayHandle) {
    common::rig(&dir(name), pins, 5, 10, (gateway_extra, listener_extra)).await
}

async fn terminal(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-terminal"))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_simulator_against_a_real_gateway() {
    let (inv, server, gw) = rig("terminal").await;
    let addr = gw.addr.to_string();

    // One sale: one JSON line, approved, the PIN masked.
    let o = terminal(&["--gateway", &addr, "sale", "--product", "GIFT-25", "--amount", "2500"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = lines(&o);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["answer"]["mti"], "0210");
    assert_eq!(l[0]["answer"]["fields"]["39"], "00");
    let f63 = l[0]["answer"]["fields"]["63"].as_str().unwrap();
    assert!(f63.starts_with("[masked"), "PIN masked: {f63}");

    // --reveal shows it.
    let o = terminal(&[
        "--gateway",
        &addr,
        "--reveal",
        "--terminal",
        "DEMO0002",
        "sale",
        "--product",
        "GIFT-25",
        "--amount",
        "2500",
    ])
    .await;
    let l = lines(&o);
    let f63 = l[0]["answer"]["fields"]["63"].as_str().unwrap();
    assert!(f63.starts_with("PN"), "{f63}");
    assert!(!f63.contains('*'), "{f63}");

    // Many terminals at once.
    let o = terminal(&[
        "--gateway",
        &addr,
        "--terminal",
        "DEMO0003",
        "--count",
        "3",
        "sale",
        "--product",
        "TOPUP-EU-10",
        "--amount",
        "1000",
    ])
    .await;
    assert!(o.status.success());
    let mut ids: Vec<String> = lines(&o)
        .iter()
        .map(|l| l["terminal"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["DEMO0003", "DEMO0004", "DEMO0005"]);

    // The contract's scenario: every step gets the code it expects.
    let o = terminal(&[
        "--gateway",
        &addr,
        "--terminal",
        "DEMO0006",
        "scenario",
        "fixtures/scenarios/contract.toml",
    ])
    .await;
    let l = lines(&o);
    assert!(o.status.success(), "{l:#?}");
    assert_eq!(l.len(), 13);
    assert!(l.iter().all(|x| x["ok"] == true));

    // A step whose answer differs from what it expects fails the run (exit 1) and says why.
    let f = dir("scenario-bad");
    std::fs::create_dir_all(&f).unwrap();
    let bad = f.join("bad.toml");
    std::fs::write(
        &bad,
        "[[step]]\nsend = \"sale\"\nproduct = \"GIFT-25\"\namount = 2500\nexpect = \"25\"\n",
    )
    .unwrap();
    let o = terminal(&[
        "--gateway",
        &addr,
        "--terminal",
        "DEMO0007",
        "scenario",
        bad.to_str().unwrap(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(lines(&o)[0]["problem"], "response code \"00\", expected \"25\"");

    // An answer that never comes: exit 1, named. (A listener that accepts and says nothing.)
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let o = terminal(&["--gateway", &silent_addr, "--timeout-ms", "300", "echo"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(lines(&o)[0]["problem"]
        .as_str()
        .unwrap()
        .contains("no answer within 300 ms"));
    hold.abort();

    // Bad arguments: exit 2.
    let o = terminal(&["--gateway", &addr, "--framing", "smoke", "echo"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown framing `smoke`"));
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_counts_match_the_pin_server() {
    let (inv, server, gw) = rig("load").await;
    let d = dir("load-out");
    std::fs::create_dir_all(&d).unwrap();
    let (json, svg) = (d.join("load.json"), d.join("load.svg"));
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-load"))
        .args([
            "run",
            "--gateway",
            &gw.addr.to_string(),
            "--connections",
            "4",
            "--rate",
            "200",
            "--duration",
            "2",
        ])
        .args([
            "--mix",
            "TOPUP-EU-10:1000:3",
            "--mix",
            "GIFT-25:2500:1",
            "--echo-ceiling",
            "--quiet",
        ])
        .args(["--json", json.to_str().unwrap(), "--svg", svg.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("echo ceiling:") && stdout.contains("gateway / echo ceiling:"),
        "{stdout}"
    );
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let g = &j["gateway"];
    // Counts, not speed (how many requests a slow machine gets through in 2 s is its own): the open loop never
    // sends ahead of its schedule (200/s for 2 s), every request sent is answered, and some were approved.
    let approved = g["approved"].as_u64().unwrap();
    let sent = g["sent"].as_u64().unwrap();
    assert!(sent > 0 && sent <= 400, "at most 400 requests at 200/s for 2 s: {g}");
    assert_eq!(g["answered"], g["sent"]);
    assert!(approved > 0 && approved <= sent, "{g}");
    let codes: u64 = g["codes"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(codes, sent, "each answer counted under its code: {g}");
    for p in ["p50", "p90", "p99", "p99.9", "max"] {
        assert!(g["latency_ms"][p].as_f64().unwrap() > 0.0, "{p}");
    }
    let echo = &j["echo_ceiling"];
    assert!(
        echo["answered"].as_u64().unwrap() > 0 && echo["answered"] == echo["sent"],
        "{echo}"
    );
    assert!(j["ratio_to_echo"].as_f64().unwrap() > 0.0);
    assert!(!g["per_second"].as_array().unwrap().is_empty());
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("polyline"));
    // Every approved answer is one PIN sold at the server, no more, no less (cache sales once confirmed).
    assert!(gw.gateway.flush(Duration::from_secs(10)).await);
    let s = common::stock(&inv, server.addr).await;
    let sold = common::count(&s, "TOPUP-EU-10", "sold") + common::count(&s, "GIFT-25", "sold");
    assert_eq!(sold as u64, approved);
    // The mix: three top-ups for each gift card.
    let topups = common::count(&s, "TOPUP-EU-10", "sold");
    assert!(topups as u64 > approved / 2, "{topups} of {approved}");
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}

/// `pingate-load run …` with `args` after `run`.
async fn load_tool(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-load"))
        .arg("run")
        .args(args)
        .output()
        .await
        .unwrap()
}

/// `--cpu NAME=PID`: the CPU an echo server (its own process) and the load generator spent over the run, per answered
/// request, in all and as a share of one core; printed, and kept by `--json`. Plausible, not fast: each positive, the
/// three views of a process agreeing, and no process above every core of the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_the_cpu_of_the_processes_it_is_given() {
    let listen = pingate::demo::rig::free_local_addr().unwrap();
    let mut echo = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-load"))
        .args(["echo", "--listen", &listen.to_string()])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let echo_pid = echo.id().unwrap();
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let d = dir("load-cpu");
    std::fs::create_dir_all(&d).unwrap();
    let json = d.join("load.json");
    let cpu = format!("echo={echo_pid}");
    let o = load_tool(&[
        "--gateway",
        &listen.to_string(),
        "--connections",
        "2",
        "--in-flight",
        "4",
        "--duration",
        "1",
        "--mix",
        "TOPUP-EU-10:1000",
        "--quiet",
        "--cpu",
        &cpu,
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains(&format!("cpu echo (pid {echo_pid}): ")) && stdout.contains("cpu pingate-load (pid "),
        "{stdout}"
    );
    assert!(stdout.contains(" µs per answered request; "), "{stdout}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let answered = j["gateway"]["answered"].as_f64().unwrap();
    assert!(answered > 0.0, "{j}");
    let cpu = &j["cpu"];
    let wall = cpu["wall_s"].as_f64().unwrap();
    assert!(wall >= 1.0, "the measured run lasts the run's duration: {cpu}");
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    let processes = cpu["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 1, "{cpu}");
    assert_eq!(processes[0]["name"], "echo");
    assert_eq!(processes[0]["pid"], echo_pid);
    assert_eq!(cpu["load_generator"]["pid"], load_generator_pid(&stdout));
    for p in [&processes[0], &cpu["load_generator"]] {
        let cpu_s = p["cpu_s"].as_f64().unwrap();
        let per_request = p["us_per_answered"].as_f64().unwrap();
        let percent = p["percent_of_one_core"].as_f64().unwrap();
        assert!(cpu_s > 0.0 && per_request > 0.0 && percent > 0.0, "{p}");
        assert!(percent <= 100.0 * cores * 1.05, "{p}");
        assert!(
            (per_request * answered / 1e6 - cpu_s).abs() < 1e-6 * cpu_s.max(1.0),
            "{p}"
        );
        assert!((percent / 100.0 * wall - cpu_s).abs() < 1e-6 * cpu_s.max(1.0), "{p}");
    }
    // Without --cpu, neither the lines nor the key.
    let o = load_tool(&[
        "--gateway",
        &listen.to_string(),
        "--duration",
        "0.2",
        "--mix",
        "TOPUP-EU-10:1000",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("cpu "));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(j.get("cpu").is_none(), "{j}");
    let _ = echo.kill().await;
}

/// The load generator's pid as its `cpu pingate-load (pid N)` line prints it.
fn load_generator_pid(stdout: &str) -> u64 {
    let at = stdout.find("cpu pingate-load (pid ").unwrap() + "cpu pingate-load (pid ".len();
    stdout[at..].split(')').next().unwrap().parse().unwrap()
}

/// A process that cannot be read, or a `--cpu` that is not NAME=PID, stops the run before any load is sent (exit 2).
#[tokio::test]
async fn the_load_generator_refuses_a_cpu_process_it_cannot_read() {
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    // Nothing needs to listen: the process is read before any connection is made.
    let o = load_tool(&[
        "--gateway",
        "127.0.0.1:9",
        "--duration",
        "30",
        "--mix",
        "TOPUP-EU-10:1000",
        "--cpu",
        &format!("gone={pid}"),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("--cpu gone={pid}: /proc/{pid}/stat")),
        "{stderr}"
    );
    for bad in ["gateway", "gateway=12x", "=12"] {
        let o = load_tool(&["--gateway", "127.0.0.1:9", "--mix", "TOPUP-EU-10:1000", "--cpu", bad]).await;
        assert_eq!(o.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("--cpu"), "{bad}");
    }
}

async fn pingate(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate"))
        .args(args)
        .output()
        .await
        .unwrap()
}

const GOLDEN: &str = "fixtures/captures/contract.capture";

/// `pingate replay FILE --gateway ADDR` must find every answer matching; returns what it printed.
async fn replay_matches(file: &str, gateway: std::net::SocketAddr) -> String {
    let o = pingate(&["replay", file, "--gateway", &gateway.to_string()]).await;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{file}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(" 0 differences, 0 missing"), "{file}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_then_replay_against_a_fresh_gateway() {
    // A gateway that captures its terminal traffic; the contract's scenario runs through it.
    let d = dir("capture-out");
    std::fs::create_dir_all(&d).unwrap();
    let cap = d.join("contract.capture");
    let (inv, server, gw) = rig_with("capture", &format!("capture = \"{}\"", cap.display())).await;
    let addr = gw.addr.to_string();
    let o = terminal(&[
        "--gateway",
        &addr,
        "--terminal",
        "DEMO0006",
        "--transmission",
        "1129120000",
        "--reveal",
        "scenario",
        "fixtures/scenarios/contract.toml",
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
    let text = std::fs::read_to_string(&cap).unwrap();
    let capture = pingate::traffic::capture::Capture::parse(&text).unwrap();
    assert_eq!(capture.records.len(), 26, "13 requests and 13 answers");
    // No PIN the terminal printed reaches the capture file, in any form.
    for l in lines(&o) {
        if let Some(f63) = l["answer"]["fields"]["63"].as_str() {
            let r = pingate::sale::PinReceipt::from_tlv(f63.as_bytes()).unwrap();
            let pin = r.pin.expose();
            let pin_hex: String = pin.bytes().map(|b| format!("{b:02X}")).collect();
            assert!(!text.contains(pin) && !text.contains(&pin_hex), "a PIN in the capture");
        }
    }
    if std::env::var_os("PINGATE_BLESS").is_some() {
        std::fs::write(GOLDEN, &text).unwrap();
    }

    // The golden capture, and this one, each replayed against a fresh gateway and PIN server: every answer matches.
    // (Against the same gateway twice, the second pass would differ, rightly: its sale with STAN 5 was reversed.)
    for (i, file) in [cap.to_str().unwrap(), GOLDEN].into_iter().enumerate() {
        let (inv, server, gw) = rig(&format!("replay-{i}")).await;
        let out = replay_matches(file, gw.addr).await;
        assert!(out.contains("13 requests replayed: 13 answers match"), "{out}");
        gw.stop().await;
        server.stop().await;
        common::audit_ok(&inv).await;
    }
    let (_inv2, server2, gw2) = rig("replay-changed").await;
    let addr2 = gw2.addr.to_string();

    // A deliberately changed answer is found and named.
    let golden = pingate::traffic::capture::Capture::load(std::path::Path::new(GOLDEN)).unwrap();
    let bcd = pingate::iso8583::Dialects::builtin()
        .get(&golden.dialect)
        .unwrap()
        .clone();
    let mut changed = golden.clone();
    let host = changed
        .records
        .iter_mut()
        .find(|r| r.dir == pingate::traffic::capture::Direction::Host && bcd.decode(&r.data).unwrap().get(63).is_some())
        .unwrap();
    let mut m = bcd.decode(&host.data).unwrap();
    m.set(39, "05");
    host.data = bcd.encode(&m).unwrap().freeze();
    let bad = d.join("changed.capture");
    std::fs::write(&bad, changed.to_text()).unwrap();
    let o = pingate(&["replay", bad.to_str().unwrap(), "--gateway", &addr2]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("field 39: captured \"05\", replayed \"00\""), "{out}");
    assert!(out.contains("1 differences"), "{out}");
    gw2.stop().await;
    server2.stop().await;

    // Offline, against the codec alone: every golden frame decodes and re-encodes byte for byte; a broken one is named.
    let o = pingate(&["replay", GOLDEN, "--offline"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("26 frames: 26 decode"));
    // The first request cut short by five bytes.
    let broken: String = text
        .lines()
        .map(|l| l.to_string())
        .scan(false, |done, l| {
            Some(if !*done && l.contains(" T ") {
                *done = true;
                l[..l.len() - 10].to_string()
            } else {
                l
            })
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&bad, broken).unwrap();
    let o = pingate(&["replay", bad.to_str().unwrap(), "--offline"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("line 3: does not decode") && out.contains("25 decode"),
        "{out}"
    );
}

async fn replay_tool(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pingate-replay"))
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tshark_captures_import_and_replay_against_a_real_gateway() {
    let d = dir("pcap");
    std::fs::create_dir_all(&d).unwrap();
    let mut captures = Vec::new();
    for f in ["contract.pcapng", "contract.pcap"] {
        let out = d.join(format!("{f}.capture"));
        let o = replay_tool(&[
            "import",
            &format!("fixtures/pcap/{f}"),
            "--port",
            "32785",
            "-o",
            out.to_str().unwrap(),
        ])
        .await;
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{f}: {stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout.contains("1 connections: 13 frames from terminals, 13 from the host"),
            "{stdout}"
        );
        assert!(
            o.stderr.is_empty(),
            "no warnings: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        captures.push(pingate::traffic::capture::Capture::load(&out).unwrap());
    }
    // Both formats give the same frames, and the answers' PINs are masked.
    let frames =
        |c: &pingate::traffic::capture::Capture| c.records.iter().map(|r| (r.dir, r.data.clone())).collect::<Vec<_>>();
    assert_eq!(frames(&captures[0]), frames(&captures[1]));
    let dialect = pingate::iso8583::Dialects::builtin()
        .get("iso87-ascii-binbitmap")
        .unwrap()
        .clone();
    let mut masked = 0;
    for r in &captures[0].records {
        if let Some(f63) = dialect.decode(&r.data).unwrap().get(63) {
            let receipt = pingate::sale::PinReceipt::from_tlv(f63).unwrap();
            assert!(receipt.pin.expose().chars().all(|c| c == '*'));
            masked += 1;
        }
    }
    assert_eq!(masked, 4, "four answers carried a PIN");
    // The imported capture replays against a fresh gateway and PIN server with every answer matching.
    let (inv, server, gw) = rig("pcap-replay").await;
    let file = d.join("contract.pcapng.capture");
    let o = replay_tool(&["replay", file.to_str().unwrap(), "--gateway", &gw.addr.to_string()]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("13 requests replayed: 13 answers match"), "{out}");
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
    // A file that is not a capture is named.
    let o = replay_tool(&[
        "import",
        "Cargo.toml",
        "--port",
        "1",
        "-o",
        d.join("x").to_str().unwrap(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a pcap or pcapng file"));
}

/// The demo's framing and dialect, for raw requests.
async fn client(gw: &GatewayHandle) -> pingate::traffic::sim::TerminalClient {
    gw.terminal().await.unwrap()
}

fn identity(t: &str) -> pingate::traffic::sim::Identity {
    common::demo_terminal(t)
}

fn sale(stan: u32, product: &str, amount: u64) -> pingate::traffic::sim::SaleSpec {
    common::demo_sale(stan, "1129150000", product, amount)
}

/// A short response deadline: a gateway without its server answers 91 sooner.
const FAST_DEADLINE: &str = "response_deadline_ms = 1000";

/// Golden captures of the error answers: each made against a gateway in the condition that causes it, and replayed
/// against a fresh one in the same condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_captures_of_the_error_answers() {
    let bless = std::env::var_os("PINGATE_BLESS").is_some();
    let d = dir("error-captures");
    std::fs::create_dir_all(&d).unwrap();
    let cap = |name: &str| d.join(format!("{name}.capture"));
    let listener = |name: &str| format!("capture = \"{}\"", cap(name).display());

    // 58, 30, 12: a normal gateway.
    let (_i, server, gw) = rig_with("errors", &listener("errors")).await;
    let mut t = client(&gw).await;
    // A frame with no readable MTI: ISO 8583 has no answer for it, and the replay must find none either.
    t.send_raw(bytes::Bytes::from_static(b"zz")).await.unwrap();
    let a = t
        .call(&identity("NOSUCH01").sale(&sale(1, "GIFT-25", 2500), false))
        .await
        .unwrap();
    assert_eq!(a.get_str(39), Some("58"));
    let mut no_product = identity("DEMO0001").sale(&sale(2, "GIFT-25", 2500), false);
    no_product.remove(48);
    assert_eq!(t.call(&no_product).await.unwrap().get_str(39), Some("30"));
    let a = t
        .call(&identity("DEMO0001").network(3, "1129150000", "999"))
        .await
        .unwrap();
    assert_eq!(a.get_str(39), Some("12"));
    drop(t);
    gw.stop().await;
    server.stop().await;

    // 25: nothing in stock.
    let (_i, server, gw) = rig_full("stockless", 0, "", &listener("out-of-stock")).await;
    let mut t = client(&gw).await;
    for (stan, p, amount) in [(1, "GIFT-25", 2500), (2, "TOPUP-EU-10", 1000)] {
        let a = t
            .call(&identity("DEMO0002").sale(&sale(stan, p, amount), false))
            .await
            .unwrap();
        assert_eq!(a.get_str(39), Some("25"), "{p}");
    }
    drop(t);
    gw.stop().await;
    server.stop().await;

    // 91: the PIN server is down (an on-demand sale; a cached one would still be sold).
    let (_i, server, gw) = rig_full("serverless", 1000, FAST_DEADLINE, &listener("server-down")).await;
    server.stop().await;
    let mut t = client(&gw).await;
    let a = t
        .call(&identity("DEMO0003").sale(&sale(1, "GIFT-25", 2500), false))
        .await
        .unwrap();
    assert_eq!(a.get_str(39), Some("91"));
    drop(t);
    // Without its server a clean stop would wait to release the cached PINs: stop as after a crash instead.
    gw.crash().await;

    for name in ["errors", "out-of-stock", "server-down"] {
        let text = std::fs::read_to_string(cap(name)).unwrap();
        if bless {
            std::fs::write(format!("fixtures/captures/{name}.capture"), text).unwrap();
        }
    }
    // Replays of the golden captures, each against a fresh gateway in its condition.
    for (name, kind) in [("errors", 0), ("out-of-stock", 1), ("server-down", 2)] {
        let (_i, server, gw) = match kind {
            1 => rig_full(&format!("replay-{name}"), 0, "", "").await,
            2 => rig_full(&format!("replay-{name}"), 1000, FAST_DEADLINE, "").await,
            _ => rig(&format!("replay-{name}")).await,
        };
        let server = if kind == 2 {
            server.stop().await;
            None
        } else {
            Some(server)
        };
        replay_matches(&format!("fixtures/captures/{name}.capture"), gw.addr).await;
        match server {
            Some(s) => {
                gw.stop().await;
                s.stop().await;
            }
            None => gw.crash().await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_simulator_on_a_serial_line() {
    // Two linked pseudo-terminals with paths (socat): the gateway's serial line on one, the simulator on the other.
    let d = dir("serial-ptys");
    std::fs::create_dir_all(&d).unwrap();
    let (a, b) = (d.join("ttyGW"), d.join("ttyPOS"));
    let mut socat = tokio::process::Command::new("socat")
        .arg(format!("PTY,raw,echo=0,link={}", a.display()))
        .arg(format!("PTY,raw,echo=0,link={}", b.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("socat (.ci/run installs it)");
    for _ in 0..500 {
        if a.exists() && b.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a.exists() && b.exists(), "socat made its ptys");
    let gw_extra = "";
    let line = format!(
        "\n[[serial]]\nname = \"pos\"\ndevice = \"{}\"\ndialect = \"iso87-bcd\"\ntpdu = true\nbaud = 9600\n",
        a.display()
    );
    let (inv, server, gw) = rig_full("serial", 1000, gw_extra, &line).await;
    let o = terminal(&[
        "--serial",
        b.to_str().unwrap(),
        "--dialect",
        "iso87-bcd",
        "--tpdu",
        "6000030001",
        "--terminal",
        "DEMO0004",
        "sale",
        "--product",
        "GIFT-25",
        "--amount",
        "2500",
    ])
    .await;
    let l = lines(&o);
    assert!(o.status.success(), "{l:?} {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(l[0]["answer"]["fields"]["39"], "00");
    let s = common::stock(&inv, server.addr).await;
    assert_eq!(common::count(&s, "GIFT-25", "sold"), 1);
    gw.stop().await;
    server.stop().await;
    let _ = socat.kill().await;
}

/// A terminal prefix that makes ids of the wrong length for field 41 is refused before anything is sent, saying why
/// (it used to send nothing and print 0/s).
#[tokio::test]
async fn the_load_generator_refuses_terminal_ids_field_41_cannot_carry() {
    let listen = pingate::demo::rig::free_local_addr().unwrap();
    let addr = listen.to_string();
    let o = load_tool(&[
        "--gateway",
        &addr,
        "--terminal-prefix",
        "G1",
        "--mix",
        "GIFT-25:2500",
        "--duration",
        "1",
    ])
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains("`G10001` (6 characters)") && text.contains("field 41"),
        "{text}"
    );
}

/// `pingate-replay import FIXTURE --port 32785 ARGS… -o OUT`: the capture, and what it printed on stderr.
async fn import_pcap(
    fixture: &str,
    out: &std::path::Path,
    args: &[&str],
) -> (pingate::traffic::capture::Capture, String) {
    let mut all = vec!["import", fixture, "--port", "32785", "-o", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = replay_tool(&all).await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{fixture} {args:?}: {stdout}{stderr}");
    assert!(
        stdout.contains("1 connections: 13 frames from terminals, 13 from the host"),
        "{fixture} {args:?}: {stdout}{stderr}"
    );
    (pingate::traffic::capture::Capture::load(out).unwrap(), stderr)
}

/// Linux cooked v1 (on the loopback device, as `tcpdump -i any` records it) and v2, BSD loopback, raw IP, and
/// Ethernet with two VLAN tags carrying IPv6 with extension headers (written by scapy and editcap:
/// tools/interop/make_pcap_fixtures.py) import to the very frames of the tshark capture they were made from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_of_other_link_layers_import_to_the_same_frames() {
    let d = dir("pcap-links");
    std::fs::create_dir_all(&d).unwrap();
    let frames = |c: &pingate::traffic::capture::Capture| {
        c.records
            .iter()
            .map(|r| (r.conn, r.dir, r.data.clone()))
            .collect::<Vec<_>>()
    };
    let (reference, _) = import_pcap("fixtures/pcap/contract.pcapng", &d.join("ref"), &[]).await;
    for f in [
        "contract-sll.pcap",
        "contract-null.pcap",
        "contract-raw.pcap",
        "contract-sll2.pcap",
        "contract-vlan-ipv6.pcapng",
    ] {
        let (c, stderr) = import_pcap(&format!("fixtures/pcap/{f}"), &d.join(f), &[]).await;
        assert!(stderr.is_empty(), "{f}: no warnings: {stderr}");
        assert_eq!(frames(&c), frames(&reference), "{f}");
        // The same times, to the microsecond (scapy keeps time stamps as decimals and rounds when it writes).
        for (a, b) in c.records.iter().zip(&reference.records) {
            assert!(
                a.at.abs_diff(b.at) <= Duration::from_micros(1),
                "{f}: {:?} {:?}",
                a.at,
                b.at
            );
        }
    }
}

/// The made-up PINs in fixtures/pcap/foreign-host.pcapng (tools/interop/make_pcap_fixtures.py).
const FOREIGN_PINS: [&str; 4] = [
    "7301846259017734",
    "7301846259028845",
    "7301846259039956",
    "7301846259040067",
];

/// A capture in front of a host that is not pingate: its answers carry the PIN in field 63 in a layout of its own
/// (tags 01 PIN, 02 serial, 03 a receipt line that prints the PIN). Every answer is kept, with its length; no PIN
/// reaches the file, in text or in hex; `--pin-at` masks exactly the PIN; the import replays against a gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_hosts_capture_keeps_its_answers_with_only_the_pins_masked() {
    let d = dir("pcap-foreign");
    std::fs::create_dir_all(&d).unwrap();
    const F: &str = "fixtures/pcap/foreign-host.pcapng";
    let raw = std::fs::read(F).unwrap();
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02X}")).collect::<String>();
    for pin in FOREIGN_PINS {
        assert!(
            raw.windows(16).any(|w| w == pin.as_bytes()),
            "the fixture carries {pin}"
        );
    }
    let dialect = pingate::iso8583::Dialects::builtin()
        .get("iso87-ascii-binbitmap")
        .unwrap()
        .clone();
    let (clear, _) = import_pcap(F, &d.join("clear"), &["--pins", "clear"]).await;
    let no_pin = |name: &str| {
        let text = std::fs::read_to_string(d.join(name)).unwrap();
        for pin in FOREIGN_PINS {
            assert!(
                !text.contains(pin) && !text.contains(&hex(pin)),
                "{name}: {pin} in the file"
            );
        }
    };
    // Same frames as the clear import but for field 63; same lengths; field 63 (where present) all `*`.
    let same_but_63 = |c: &pingate::traffic::capture::Capture, check63: &dyn Fn(&[u8], &[u8])| {
        assert_eq!(c.records.len(), clear.records.len());
        let mut with63 = 0;
        for (got, was) in c.records.iter().zip(&clear.records) {
            assert_eq!((got.dir, got.data.len()), (was.dir, was.data.len()), "lengths kept");
            let (mut a, mut b) = (dialect.decode(&got.data).unwrap(), dialect.decode(&was.data).unwrap());
            if let (Some(x), Some(y)) = (a.remove(63), b.remove(63)) {
                assert_eq!(x.len(), y.len());
                check63(&x, &y);
                with63 += 1;
            }
            let fields =
                |m: &pingate::iso8583::Message| (m.mti(), m.fields().map(|(n, v)| (n, v.clone())).collect::<Vec<_>>());
            assert_eq!(fields(&a), fields(&b), "every other field as captured");
        }
        assert_eq!(with63, 4, "four answers carried a PIN");
    };

    // No --pin-at: field 63 is not pingate's receipt layout, so it is masked whole; one warning with the count.
    let (c, stderr) = import_pcap(F, &d.join("default"), &[]).await;
    assert_eq!(
        stderr.trim(),
        "warning: field 63 is not pingate's receipt layout: 4 answers (first: answer 2, connection 1 at 0.000961 s); \
         masked whole, its length kept (give --pin-at to mask only the PIN)"
    );
    same_but_63(&c, &|x, _| assert!(x.iter().all(|&b| b == b'*')));
    no_pin("default");

    // --pin-at 63:01 (the tag) and 63@5+16 (the same bytes by offset): exactly the PIN, wherever field 63 prints it.
    let exact = |x: &[u8], y: &[u8]| {
        let pin = &y[5..21];
        let mut want = y.to_vec();
        for i in 0..=want.len() - 16 {
            if &want[i..i + 16] == pin {
                want[i..i + 16].fill(b'*');
            }
        }
        assert_eq!(x, &want[..], "{}", String::from_utf8_lossy(x));
        assert!(String::from_utf8_lossy(x).contains("02014DEMO"), "the serial is kept");
    };
    for (name, place) in [("tag", "63:01"), ("offset", "63@5+16")] {
        let (c, stderr) = import_pcap(F, &d.join(name), &["--pin-at", place]).await;
        assert!(stderr.is_empty(), "{place}: {stderr}");
        same_but_63(&c, &exact);
        no_pin(name);
    }
    // The whole field; and a tag the host does not have: that field masked whole, the reason named once.
    let (c, stderr) = import_pcap(F, &d.join("whole"), &["--pin-at", "63"]).await;
    assert!(stderr.is_empty(), "{stderr}");
    same_but_63(&c, &|x, _| assert!(x.iter().all(|&b| b == b'*')));
    let (c, stderr) = import_pcap(F, &d.join("missing"), &["--pin-at", "63:PN"]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--pin-at 63:PN: field 63 has no element PN in pingate's TLV form: 4 answers"),
        "{stderr}"
    );
    same_but_63(&c, &|x, _| assert!(x.iter().all(|&b| b == b'*')));
    no_pin("missing");
    // A place that is not one is refused with the reason.
    for bad in ["63x", "63:ABC", "1", "63@5", "63@5+0"] {
        let o = replay_tool(&[
            "import",
            F,
            "--port",
            "32785",
            "--pin-at",
            bad,
            "-o",
            d.join("x").to_str().unwrap(),
        ])
        .await;
        assert_eq!(o.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("--pin-at"), "{bad}");
    }

    // The imported capture replays against a fresh gateway and PIN server: field 63 is compared for presence.
    let (inv, server, gw) = rig("pcap-foreign-replay").await;
    let o = replay_tool(&[
        "replay",
        d.join("default").to_str().unwrap(),
        "--gateway",
        &gw.addr.to_string(),
    ])
    .await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("13 requests replayed: 13 answers match"), "{out}");
    gw.stop().await;
    server.stop().await;
    common::audit_ok(&inv).await;
}
