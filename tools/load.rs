//! `pingate-load`: the load generator. N terminal connections against a gateway's listener, closed loop (requests
//! in flight per connection) or open loop (a target rate), a product mix, a duration. Reports throughput and latency
//! percentiles from an HDR histogram, answers by response code, a progress bar while it runs (on a terminal);
//! writes a JSON result and an SVG plot of latency and throughput over time. `--echo-ceiling` first runs the same
//! load against a bare echo server of the same framing in this process: the machine's own limit, reported beside
//! the gateway as a ratio.
//! `--cpu NAME=PID` (repeatable) reads each named process's CPU time at the start and the end of the gateway's run
//! and reports it per answered request, beside the load generator's own.
//!
//! ```sh
//! pingate-load run --gateway 127.0.0.1:9000 --connections 50 --in-flight 4 --duration 10 \
//!     --mix TOPUP-EU-10:1000:3 --mix GIFT-25:2500:1 --echo-ceiling --json load.json --svg load.svg \
//!     --cpu gateway=$GATEWAY_PID --cpu server=$SERVER_PID
//! pingate-load run --gateway 127.0.0.1:9443 --tls --ca ca.pem --mac-key-file terminal-keys.toml --kek-file kek
//! pingate-load echo --listen 127.0.0.1:9999
//! ```
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pingate::iso8583::Dialects;
use pingate::link::framing::Framing;
use pingate::traffic::load::{echo_server, run_secured, LoadReport, LoadSecurity, LoadSpec, MixItem, Progress};
use pingate::traffic::procfs::{CpuReading, CpuUse, CpuWatch, ProcessCpu, Watched};
use pingate::traffic::sim::WireArgs;
use serde_json::json;

#[derive(Parser)]
#[command(name = "pingate-load", version, about = "Load generator for pingate gateways")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The gateway's terminal listener.
    #[arg(long)]
    gateway: SocketAddr,
    #[command(flatten)]
    wire: WireArgs,
    /// TLS (`--tls --ca --cert --key`) and MACs (`--mac-key-file --kek-file`: each request MACed with its
    /// terminal's key, each answer's MAC checked, and what that costs per request reported).
    #[command(flatten)]
    security: pingate::traffic::secure::SecurityArgs,
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Requests kept in flight per connection (closed loop).
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Requests per second in all (open loop) instead of --in-flight.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// PRODUCT:AMOUNT[:WEIGHT[:CURRENCY]], repeated for a mix (CURRENCY: ISO 4217 numeric, 978 by default).
    #[arg(long, required = true)]
    mix: Vec<String>,
    /// Terminal ids are PREFIX0001, PREFIX0002, ... (one per connection; they must be registered at the gateway).
    #[arg(long, default_value = "DEMO")]
    terminal_prefix: String,
    #[arg(long, default_value = pingate::traffic::sim::MERCHANT)]
    merchant: String,
    /// Transmission date-time of every sale (MMDDhhmmss); default: each sale's own time, as a terminal's clock
    /// gives it.
    #[arg(long)]
    transmission: Option<String>,
    /// Run the same load against an in-process echo server first: the machine's ceiling, and the ratio.
    #[arg(long)]
    echo_ceiling: bool,
    /// Write the result as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write latency and throughput over time as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
    /// NAME=PID: report the CPU time (user + system, from /proc/PID/stat) process PID spends over the gateway's run,
    /// per answered request, in all and as a share of one core, with this load generator's own; repeat for each
    /// process (a gateway, a PIN server).
    #[arg(long = "cpu", value_name = "NAME=PID")]
    cpu: Vec<Watched>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load a gateway.
    Run(Box<RunArgs>),
    /// Serve a bare echo of a framing (the ceiling a gateway is measured against).
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "binary2")]
        framing: Framing,
    },
}

fn summary(r: &LoadReport) -> serde_json::Value {
    let q = |x: f64| (r.quantile_ms(x) * 1000.0).round() / 1000.0;
    json!({
        "sent": r.sent,
        "answered": r.answered(),
        "approved": r.approved(),
        "codes": r.codes,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "rate_per_s": (r.rate() * 10.0).round() / 10.0,
        "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999), "max": r.max_ms()},
        "mac_us_per_request": (r.mac.signed > 0).then(|| {
            let (sign, verify) = r.mac.per_request_us();
            json!({"sign": sign, "verify": verify, "answers_failed": r.mac.failed})
        }),
        "per_second": r.seconds.iter().enumerate().map(|(i, s)| json!({
            "t": i,
            "answered": s.answered,
            "p50_ms": if s.latency.is_empty() { 0.0 } else { s.latency.value_at_quantile(0.5) as f64 / 1e3 },
            "p99_ms": if s.latency.is_empty() { 0.0 } else { s.latency.value_at_quantile(0.99) as f64 / 1e3 },
        })).collect::<Vec<_>>(),
    })
}

/// One process's CPU over the run, as `--json` keeps it.
fn process_cpu(p: &ProcessCpu, answered: u64, wall: Duration) -> serde_json::Value {
    json!({
        "name": p.name,
        "pid": p.pid,
        "cpu_s": p.cpu.as_secs_f64(),
        "us_per_answered": p.us_per_request(answered),
        "percent_of_one_core": p.percent_of_one_core(wall),
    })
}

fn print_cpu(p: &ProcessCpu, answered: u64, wall: Duration) {
    let per_request = match p.us_per_request(answered) {
        Some(us) => format!("{us:.1} µs per answered request"),
        None => "no request answered".into(),
    };
    println!(
        "cpu {} (pid {}): {per_request}; {:.3} s in all, {:.1} % of one core",
        p.name,
        p.pid,
        p.cpu.as_secs_f64(),
        p.percent_of_one_core(wall)
    );
}

fn print_line(name: &str, r: &LoadReport) {
    let codes: Vec<String> = r.codes.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    println!(
        "{name}: {:.0}/s ({} answered of {} sent in {:.1} s); latency p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms; codes {}",
        r.rate(),
        r.answered(),
        r.sent,
        r.elapsed.as_secs_f64(),
        r.quantile_ms(0.5),
        r.quantile_ms(0.9),
        r.quantile_ms(0.99),
        r.quantile_ms(0.999),
        r.max_ms(),
        codes.join(" ")
    );
    if r.mac.signed > 0 {
        let (sign, verify) = r.mac.per_request_us();
        println!(
            "{name}: MAC cost per request {:.1} us (sign {sign:.1} us, check the answer {verify:.1} us); {} answers \
             without a good MAC",
            sign + verify,
            r.mac.failed
        );
    }
}

async fn load(
    spec: LoadSpec,
    dialect: Arc<pingate::iso8583::Dialect>,
    security: &LoadSecurity,
    name: &str,
    quiet: bool,
) -> Result<LoadReport, String> {
    let progress = Arc::new(Progress::default());
    let spec = LoadSpec {
        progress: Some(progress.clone()),
        ..spec
    };
    // A bar over the run's duration, with what was sent and answered so far; drawn only on a terminal (indicatif
    // hides it when stderr is a pipe or a file), and not at all with --quiet.
    let ticker = (!quiet).then(|| {
        let bar = pingate::progress::timed(name, spec.duration.as_secs_f64().ceil() as u64);
        let p = progress.clone();
        let task = {
            let bar = bar.clone();
            tokio::spawn(async move {
                let mut last = 0;
                for t in 1.. {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let a = p.answered.load(Ordering::Relaxed);
                    bar.set_position(t);
                    bar.set_message(format!(
                        "sent {} answered {a} approved {} ({}/s)",
                        p.sent.load(Ordering::Relaxed),
                        p.approved.load(Ordering::Relaxed),
                        a - last
                    ));
                    last = a;
                }
            })
        };
        (bar, task)
    });
    let r = run_secured(spec, dialect, security).await;
    if let Some((bar, task)) = ticker {
        task.abort();
        bar.finish_and_clear();
    }
    r
}

async fn run_cmd(a: RunArgs) -> Result<bool, String> {
    let (framing, tpdu) = (a.wire.framing, a.wire.tpdu);
    let dialect = Arc::new(
        Dialects::builtin()
            .get(&a.wire.dialect)
            .map_err(|e| e.to_string())?
            .clone(),
    );
    let mix = a.mix.iter().map(|m| MixItem::parse(m)).collect::<Result<Vec<_>, _>>()?;
    if !(a.duration.is_finite() && a.duration > 0.0 && a.duration <= 86_400.0) {
        return Err("--duration: seconds, more than 0 and at most 86400".into());
    }
    if a.rate.is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= 10_000_000.0)) {
        return Err("--rate: requests per second, more than 0 and at most 10000000".into());
    }
    if a.connections == 0 || a.in_flight == 0 {
        return Err("--connections and --in-flight must be at least 1".into());
    }
    // Every process to watch is there before any load is sent.
    for w in &a.cpu {
        CpuReading::of_process(w.pid).map_err(|e| format!("--cpu {}={}: {e}", w.name, w.pid))?;
    }
    let spec = LoadSpec {
        addr: a.gateway,
        framing,
        tpdu,
        connections: a.connections,
        in_flight: a.in_flight,
        rate: a.rate,
        duration: Duration::from_secs_f64(a.duration),
        terminal_prefix: a.terminal_prefix.clone(),
        merchant: a.merchant.clone(),
        mix,
        transmission: a.transmission.clone(),
        progress: None,
    };
    let security = LoadSecurity {
        tls: a.security.client_tls()?,
        mac: a.security.mac()?,
    };
    let echo = if a.echo_ceiling {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(echo_server(l, framing, async {
            let _ = rx.await;
        }));
        // The echo server speaks no TLS; with MACs it echoes each signed request, whose MAC then checks as an
        // answer's would: the ceiling includes the MAC's cost.
        let plain = LoadSecurity {
            tls: None,
            mac: security.mac.clone(),
        };
        let r = load(
            LoadSpec { addr, ..spec.clone() },
            dialect.clone(),
            &plain,
            "echo",
            a.quiet,
        )
        .await?;
        let _ = tx.send(());
        print_line("echo ceiling", &r);
        Some(r)
    } else {
        None
    };
    let watch = if a.cpu.is_empty() {
        None
    } else {
        Some(CpuWatch::start(&a.cpu).map_err(|e| format!("--cpu {e}"))?)
    };
    let r = load(spec.clone(), dialect, &security, "gateway", a.quiet).await?;
    let cpu: Option<CpuUse> = watch
        .map(|w| w.finish().map_err(|e| format!("--cpu {e}")))
        .transpose()?;
    print_line(&format!("gateway {}", a.gateway), &r);
    if let Some(c) = &cpu {
        for p in c.watched.iter().chain([&c.this_process]) {
            print_cpu(p, r.answered(), c.wall);
        }
    }
    let ratio = echo.as_ref().map(|e| r.rate() / e.rate().max(1e-9));
    if let Some(x) = ratio {
        println!("gateway / echo ceiling: {:.1} %", x * 100.0);
    }
    if let Some(path) = &a.json {
        let mut j = json!({
            "tool": "pingate-load",
            "started_utc": time::OffsetDateTime::now_utc().unix_timestamp(),
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "os": std::env::consts::OS,
                "arch": std::env::consts::ARCH,
            },
            "spec": {
                "gateway": a.gateway.to_string(),
                "framing": framing.name(),
                "dialect": a.wire.dialect,
                "connections": a.connections,
                "in_flight": a.in_flight,
                "rate": a.rate,
                "duration_s": a.duration,
                "mix": a.mix,
                "transmission": spec.transmission,
            },
            "gateway": summary(&r),
            "echo_ceiling": echo.as_ref().map(summary),
            "ratio_to_echo": ratio,
        });
        if let Some(c) = &cpu {
            j["cpu"] = json!({
                "wall_s": c.wall.as_secs_f64(),
                "processes": c.watched.iter().map(|p| process_cpu(p, r.answered(), c.wall)).collect::<Vec<_>>(),
                "load_generator": process_cpu(&c.this_process, r.answered(), c.wall),
            });
        }
        std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        let title = format!(
            "pingate-load: {} connections, {:.0}/s, p99 {:.2} ms",
            a.connections,
            r.rate(),
            r.quantile_ms(0.99)
        );
        let svg = pingate::traffic::plot::load_svg(&title, &r).map_err(|e| e.to_string())?;
        std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Every request must have been answered.
    Ok(r.answered() == r.sent)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pingate-load: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Run(a) => run_cmd(*a).await,
            Cmd::Echo { listen, framing: f } => {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| format!("{listen}: {e}"))?;
                println!("echoing {f:?} frames on {listen}");
                echo_server(l, f, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await;
                Ok(true)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("pingate-load: some requests were not answered");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pingate-load: {e}");
            ExitCode::from(2)
        }
    }
}
