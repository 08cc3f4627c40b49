//! `pingate-terminal`: one or many simulated terminals over TCP, speaking the PIN sale contract to a gateway.
//!
//! ```sh
//! pingate-terminal --gateway 127.0.0.1:9000 sale --product GIFT-25 --amount 2500
//! pingate-terminal --gateway 127.0.0.1:9000 --count 8 sale --product TOPUP-EU-10 --amount 1000
//! pingate-terminal --gateway 127.0.0.1:9000 repeat --of 1
//! pingate-terminal --gateway 127.0.0.1:9000 reversal --of 1 --stan 2
//! pingate-terminal --gateway 127.0.0.1:9000 echo
//! pingate-terminal --gateway 127.0.0.1:9000 scenario fixtures/scenarios/contract.toml
//! pingate-terminal --gateway 127.0.0.1:9443 --tls --ca ca.pem --cert DEMO0001.pem --key DEMO0001.key echo
//! pingate-terminal --gateway 127.0.0.1:9000 --mac-key-file terminal-keys.toml --kek-file terminal-kek echo
//! pingate-terminal --serial /dev/ttyUSB0 --baud 9600 --dialect iso87-bcd --tpdu 6000030001 sale --product GIFT-25 --amount 2500
//! ```
//!
//! `--serial` speaks as a terminal wired to a gateway's serial line (no modem): `STX data ETX LRC` with ACK/NAK and a
//! closing EOT, or a length framing (`--line binary2`); `--data-bits 7 --parity even --software-parity` for 7E1 lines
//! on devices that cannot set parity. Dial-up terminals behind a modem: `pingate-dialup`.
//!
//! Each answer is printed as one JSON line (the PIN masked unless `--reveal`). The exit status is 1 when an answer
//! is missing or malformed or carries another code than the scenario expects, 2 on bad arguments.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pingate::iso8583::Dialects;
use pingate::link::framing::Tpdu;
use pingate::traffic::scenario::{result_json, Scenario};
use pingate::traffic::sim::{Identity, TerminalClient, WireArgs};

#[derive(Parser)]
#[command(name = "pingate-terminal", version, about = "Simulated POS terminals over TCP")]
struct Cli {
    /// The gateway's terminal listener.
    #[arg(long, required_unless_present = "serial")]
    gateway: Option<SocketAddr>,
    /// A serial device wired to one of the gateway's serial lines, instead of TCP.
    #[arg(long, conflicts_with = "gateway")]
    serial: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Serial line protocol: stx-etx, or a length framing (binary2, binary2-inclusive, ascii4, bcd2).
    #[arg(long, default_value = "stx-etx")]
    line: String,
    #[arg(long, default_value_t = 8)]
    data_bits: u8,
    /// none, even or odd.
    #[arg(long, default_value = "none")]
    parity: String,
    /// Compute and check the parity bit here (the port runs 8N1).
    #[arg(long)]
    software_parity: bool,
    #[command(flatten)]
    wire: WireArgs,
    /// TLS (`--tls --ca --cert --key`) and MACs (`--mac-key-file --kek-file`) for a secured gateway.
    #[command(flatten)]
    security: pingate::traffic::secure::SecurityArgs,
    /// Terminal id (field 41). With --count, the number at its end counts up: DEMO0001, DEMO0002, ...
    #[arg(long, default_value = "DEMO0001")]
    terminal: String,
    #[arg(long, default_value = pingate::traffic::sim::MERCHANT)]
    merchant: String,
    /// Terminals, each on its own connection, all at once.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Transmission date and time (MMDDhhmmss, field 7); default: now (UTC).
    #[arg(long)]
    transmission: Option<String>,
    /// Time allowed for each answer, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Print PINs in clear.
    #[arg(long)]
    reveal: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Clone)]
enum Action {
    /// A 0200 PIN sale.
    Sale {
        #[arg(long)]
        product: String,
        /// Amount in minor units.
        #[arg(long)]
        amount: u64,
        #[arg(long, default_value_t = 1)]
        stan: u32,
        #[arg(long, default_value = "978")]
        currency: String,
    },
    /// A 0201 repeat of the sale with STAN `of` (same transmission time).
    Repeat {
        #[arg(long)]
        of: u32,
        #[arg(long)]
        product: String,
        #[arg(long)]
        amount: u64,
    },
    /// A 0400 reversal of the sale with STAN `of`.
    Reversal {
        #[arg(long)]
        of: u32,
        #[arg(long)]
        stan: u32,
        #[arg(long)]
        product: String,
        #[arg(long)]
        amount: u64,
        /// Send a 0420 advice instead of a 0400.
        #[arg(long)]
        advice: bool,
    },
    /// A 0800 echo test.
    Echo {
        #[arg(long, default_value_t = 1)]
        stan: u32,
    },
    /// The steps of a scenario file.
    Scenario { file: std::path::PathBuf },
}

/// `DEMO0001` + 2 → `DEMO0003` (the digits at the end count up, keeping their width).
fn nth_terminal(first: &str, n: usize) -> String {
    let digits = first.chars().rev().take_while(|c| c.is_ascii_digit()).count();
    let (head, tail) = first.split_at(first.len() - digits);
    let start: usize = tail.parse().unwrap_or(0);
    format!("{head}{:0width$}", start + n, width = digits)
}

/// The action as a one-or-more-step scenario.
fn scenario_of(action: &Action) -> Result<Scenario, String> {
    let text = match action {
        Action::Scenario { file } => {
            return std::fs::read_to_string(file)
                .map_err(|e| format!("{}: {e}", file.display()))
                .and_then(|t| Scenario::parse(&t).map_err(|e| format!("{}: {e}", file.display())))
        }
        Action::Sale {
            product,
            amount,
            stan,
            currency,
        } => format!(
            "[[step]]\nsend = \"sale\"\nproduct = {product:?}\namount = {amount}\nstan = {stan}\ncurrency = {currency:?}\n"
        ),
        // A repeat or reversal names its sale; the sale itself is not sent again, only described.
        Action::Repeat { of, product, amount } => {
            format!("[[step]]\nsend = \"repeat\"\nof = {of}\nproduct = {product:?}\namount = {amount}\n")
        }
        Action::Reversal {
            of,
            stan,
            product,
            amount,
            advice,
        } => format!(
            "[[step]]\nsend = \"{}\"\nof = {of}\nstan = {stan}\nproduct = {product:?}\namount = {amount}\n",
            if *advice { "advice" } else { "reversal" }
        ),
        Action::Echo { stan } => format!("[[step]]\nsend = \"echo\"\nstan = {stan}\n"),
    };
    Scenario::parse(&text).map_err(|e| e.to_string())
}

/// One terminal on a serial line.
async fn run_serial(
    cli: &Cli,
    path: &std::path::Path,
    scenario: Scenario,
    dialect: Arc<pingate::iso8583::Dialect>,
    tpdu: Option<Tpdu>,
) -> Result<bool, String> {
    use pingate::link::parity::Parity;
    use pingate::traffic::dialsim::{LineClient, LineMode, LineTerminal};
    use tokio_serial::SerialPortBuilderExt;
    if cli.count != 1 {
        return Err("--serial is one terminal: --count must be 1".into());
    }
    let parity: Parity = serde_json::from_value(serde_json::Value::String(cli.parity.clone()))
        .map_err(|_| format!("--parity `{}`: none, even or odd", cli.parity))?;
    let (bits, hw_parity) = match (cli.software_parity, cli.data_bits, parity) {
        (true, _, _) => (tokio_serial::DataBits::Eight, tokio_serial::Parity::None),
        (false, 7, p) => (
            tokio_serial::DataBits::Seven,
            match p {
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::None => tokio_serial::Parity::None,
            },
        ),
        (false, 8, Parity::None) => (tokio_serial::DataBits::Eight, tokio_serial::Parity::None),
        _ => return Err("--data-bits 7 or 8 (parity with 8 bits: not supported)".into()),
    };
    let port = tokio_serial::new(path.to_string_lossy(), cli.baud)
        .data_bits(bits)
        .parity(hw_parity)
        .open_native_async()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = if cli.line == "stx-etx" {
        LineMode::StxEtx {
            quiet: Duration::from_millis(100),
        }
    } else {
        LineMode::Framed(cli.line.parse().map_err(|e| format!("--line: {e}, or stx-etx"))?)
    };
    let soft = if cli.software_parity { parity } else { Parity::None };
    let timeout = Duration::from_millis(cli.timeout_ms);
    let mut client = LineClient {
        line: LineTerminal::new(port, mode, soft, timeout),
        dialect: dialect.clone(),
        tpdu,
        mac: cli.security.mac()?,
    };
    let id = Identity {
        terminal_id: cli.terminal.clone(),
        merchant_id: cli.merchant.clone(),
    };
    let transmission = cli
        .transmission
        .clone()
        .unwrap_or_else(pingate::traffic::sim::now_transmission);
    let results = scenario
        .run(&mut client, &id, &transmission, timeout)
        .await
        .map_err(|e| e.to_string())?;
    client.line.end().await;
    let mut ok = true;
    for r in &results {
        ok &= r.problem.is_none();
        println!("{}", result_json(r, &id.terminal_id, &dialect, cli.reveal));
    }
    Ok(ok)
}

async fn run(cli: Cli) -> Result<bool, String> {
    let (framing, tpdu) = (cli.wire.framing, cli.wire.tpdu);
    let dialect = Arc::new(
        Dialects::builtin()
            .get(&cli.wire.dialect)
            .map_err(|e| e.to_string())?
            .clone(),
    );
    let scenario = scenario_of(&cli.action)?;
    if let Some(path) = cli.serial.clone() {
        return run_serial(&cli, &path, scenario, dialect, tpdu).await;
    }
    let gateway = cli.gateway.ok_or("--gateway or --serial")?;
    let transmission = cli
        .transmission
        .clone()
        .unwrap_or_else(pingate::traffic::sim::now_transmission);
    let timeout = Duration::from_millis(cli.timeout_ms);
    let tls = cli.security.client_tls()?.map(Arc::new);
    let mac = cli.security.mac()?;
    let mut tasks = Vec::new();
    for n in 0..cli.count {
        let id = Identity {
            terminal_id: nth_terminal(&cli.terminal, n),
            merchant_id: cli.merchant.clone(),
        };
        let (scenario, dialect, transmission) = (scenario.clone(), dialect.clone(), transmission.clone());
        let (addr, reveal, tls, mac) = (gateway, cli.reveal, tls.clone(), mac.clone());
        tasks.push(tokio::spawn(async move {
            let connected =
                TerminalClient::connect_secured(addr, framing, tpdu, dialect.clone(), tls.as_deref(), mac).await;
            let mut client = match connected {
                Ok(c) => c,
                Err(e) => {
                    println!("{}", serde_json::json!({"terminal": id.terminal_id, "ok": false, "problem": format!("connect {addr}: {e}")}));
                    return false;
                }
            };
            match scenario.run(&mut client, &id, &transmission, timeout).await {
                Err(e) => {
                    println!("{}", serde_json::json!({"terminal": id.terminal_id, "ok": false, "problem": e.to_string()}));
                    false
                }
                Ok(results) => {
                    let mut ok = true;
                    for r in &results {
                        ok &= r.problem.is_none();
                        println!("{}", result_json(r, &id.terminal_id, &dialect, reveal));
                    }
                    ok
                }
            }
        }));
    }
    let mut all = true;
    for t in tasks {
        all &= t.await.unwrap_or(false);
    }
    Ok(all)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pingate-terminal: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pingate-terminal: {e}");
            ExitCode::from(2)
        }
    }
}
