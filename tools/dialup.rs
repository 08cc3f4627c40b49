//! `pingate-dialup`: a Hayes modem emulator on a pseudo-terminal, and a dial-up terminal calling through it.
//!
//! - `pingate-dialup modem --link /tmp/ttyPOS1` plays the host's modem on a new pty (the gateway's `[[serial]]`
//!   line names the link). Commands on standard input: `ring` (a call comes in; the phone side prints what the host
//!   sends), `send HEX` (the phone sends bytes), `drop` (drop the carrier), `error`/`ok`/`silent` (how the modem
//!   answers commands from now on), `quit`.
//! - `pingate-dialup call --link /tmp/ttyPOS1 --terminal DEMO0001 --product GIFT-25 --amount 2500 --count 3` waits
//!   for the gateway to initialise the modem, then places calls: ENQ, a framed 0200, ACK of the answer, EOT. Each
//!   answer is printed decoded (the PIN masked unless `--reveal`); the exit status is non-zero if any call did not
//!   get an approved answer.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pingate::iso8583::Dialects;
use pingate::sale::PinReceipt;
use pingate::traffic::dialsim::{
    start_modem, CallScript, CommandReply, DialupTerminal, ModemHandle, ModemOptions, PhoneSignal,
};
use pingate::traffic::sim::{Identity, SaleSpec};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "pingate-dialup",
    version,
    about = "Hayes modem emulator and dial-up terminal on a pseudo-terminal"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct ModemArgs {
    /// A symbolic link to create to the pty's device, for the gateway's configuration.
    #[arg(long)]
    link: Option<PathBuf>,
    /// The result line when a call connects.
    #[arg(long, default_value = "CONNECT 2400/ARQ")]
    connect: String,
    /// The `+++` guard time of the modem, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    guard_ms: u64,
    /// Report this caller's number after the first RING (`NMBR = …`, as a modem with caller ID on does).
    #[arg(long)]
    caller_id: Option<String>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, from the command line
enum Cmd {
    /// Emulate a modem, driven from standard input.
    Modem {
        #[command(flatten)]
        modem: ModemArgs,
        /// Print what the host sends the phone in hex (answers carry PINs: off by default, lengths only).
        #[arg(long)]
        reveal: bool,
    },
    /// Emulate a modem and place dial-up sale calls through it.
    Call {
        #[command(flatten)]
        modem: ModemArgs,
        #[arg(long, default_value = "DEMO0001")]
        terminal: String,
        #[arg(long, default_value = pingate::traffic::sim::MERCHANT)]
        merchant: String,
        #[arg(long, default_value = "GIFT-25")]
        product: String,
        /// Amount in minor units.
        #[arg(long, default_value_t = 2500)]
        amount: u64,
        #[arg(long, default_value = "978")]
        currency: String,
        /// Calls to place, one after the other.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// STAN of the first sale (the next ones count up).
        #[arg(long, default_value_t = 1)]
        stan: u32,
        #[arg(long, default_value = "iso87-bcd")]
        dialect: String,
        /// TPDU in hex before each message (empty for none).
        #[arg(long, default_value = "6000030001")]
        tpdu: String,
        /// Frames sent with a bad LRC before the good one.
        #[arg(long, default_value_t = 0)]
        bad_frames: u32,
        /// Drop the line instead of ACKing the answer (the sale must be reversed by the gateway).
        #[arg(long)]
        no_ack: bool,
        /// Print PINs in clear.
        #[arg(long)]
        reveal: bool,
        /// Seconds to wait for the gateway to initialise the modem.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
        /// Sign sales with the terminal's MAC key from this terminal key file.
        #[arg(long, requires = "kek_file")]
        mac_key_file: Option<PathBuf>,
        /// The key-encrypting key of --mac-key-file.
        #[arg(long, requires = "mac_key_file")]
        kek_file: Option<PathBuf>,
    },
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    pingate::iso8583::from_hex(s).map_err(|i| format!("`{s}`: not hex at character {}", i + 1))
}

fn start(args: &ModemArgs) -> Result<ModemHandle, String> {
    let m = start_modem(ModemOptions {
        connect: args.connect.clone(),
        guard: Duration::from_millis(args.guard_ms),
        caller_id: args.caller_id.clone(),
        ..ModemOptions::default()
    })
    .map_err(|e| format!("cannot create a pty: {e}"))?;
    if let Some(link) = &args.link {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&m.device, link).map_err(|e| format!("{}: {e}", link.display()))?;
        println!("modem on {} (link {})", m.device, link.display());
    } else {
        println!("modem on {}", m.device);
    }
    Ok(m)
}

/// Waits until the host has sent commands and then been quiet for a while: the modem is initialised.
async fn host_ready(m: &ModemHandle, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    let mut quiet_since = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        let n = m.commands().len();
        if n != seen {
            seen = n;
            quiet_since = tokio::time::Instant::now();
        } else if n > 0 && quiet_since.elapsed() >= Duration::from_millis(500) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn modem(args: ModemArgs, reveal: bool) -> Result<(), String> {
    let m = start(&args)?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut phone: Option<pingate::traffic::dialsim::Phone> = None;
    let mut shown = 0;
    loop {
        let signal = async {
            match &mut phone {
                Some(p) => p.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            line = stdin.next_line() => {
                let Ok(Some(line)) = line else { return Ok(()) };
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("ring") => phone = Some(m.dial()),
                    Some("send") => match (&phone, unhex(words.next().unwrap_or(""))) {
                        (Some(p), Ok(b)) => p.send(&b),
                        (None, _) => println!("no call: `ring` first"),
                        (_, Err(e)) => println!("{e}"),
                    },
                    Some("drop") => m.drop_carrier(),
                    Some("error") => m.set_replies(CommandReply::Error),
                    Some("ok") => m.set_replies(CommandReply::Ok),
                    Some("silent") => m.set_replies(CommandReply::Silent),
                    Some("quit") => return Ok(()),
                    Some(other) => println!("unknown command `{other}`: ring, send HEX, drop, error, ok, silent, quit"),
                    None => {}
                }
            }
            s = signal => match s {
                Some(PhoneSignal::Connected(c)) => println!("phone: {c}"),
                Some(PhoneSignal::Data(b)) if reveal => println!("phone <- {}", pingate::iso8583::to_hex(&b)),
                Some(PhoneSignal::Data(b)) => println!("phone <- {} bytes (--reveal shows them)", b.len()),
                Some(PhoneSignal::Hangup) | None => { println!("phone: hung up"); phone = None; }
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let cmds = m.commands();
        for c in &cmds[shown..] {
            println!("host: {c}");
        }
        shown = cmds.len();
    }
}

#[allow(clippy::too_many_arguments)]
async fn call(
    args: ModemArgs,
    id: Identity,
    spec: SaleSpec,
    count: u32,
    dialect: String,
    tpdu: String,
    script: CallScript,
    reveal: bool,
    wait: Duration,
    mac: Option<pingate::traffic::secure::MacSigner>,
) -> Result<bool, String> {
    let dialects = Dialects::builtin();
    let d = dialects.get(&dialect).map_err(|e| e.to_string())?;
    let tpdu = unhex(&tpdu)?;
    if !tpdu.is_empty() && tpdu.len() != 5 {
        return Err("--tpdu must be 5 bytes (10 hex digits) or empty".into());
    }
    let m = start(&args)?;
    if !host_ready(&m, wait).await {
        return Err(format!(
            "the host did not initialise the modem within {}s",
            wait.as_secs()
        ));
    }
    let mut all_ok = true;
    for i in 0..count {
        let spec = SaleSpec {
            stan: spec.stan + i,
            ..spec.clone()
        };
        let msg = match &mac {
            Some(m) => m.sign(d, &id.sale(&spec, false)).map_err(|e| e.to_string())?,
            None => d.encode(&id.sale(&spec, false)).map_err(|e| e.to_string())?,
        };
        let request = [&tpdu[..], &msg[..]].concat();
        let started = std::time::Instant::now();
        match DialupTerminal::call(&m, &request, &script).await {
            Err(e) => {
                all_ok = false;
                println!("call {}: {e}", i + 1);
            }
            Ok(out) => {
                let took = started.elapsed().as_millis();
                let Some(answer) = out.answer else {
                    all_ok = false;
                    println!(
                        "call {}: no answer (NAKs {}, host EOT {}) in {took} ms",
                        i + 1,
                        out.naks,
                        out.host_eot
                    );
                    continue;
                };
                let body = answer.slice(tpdu.len().min(answer.len())..);
                match d.decode(&body) {
                    Err(e) => {
                        all_ok = false;
                        println!("call {}: the answer does not decode: {e}", i + 1);
                    }
                    Ok(a) => {
                        let code = a.get_str(39).unwrap_or("??").to_string();
                        let pin = a.get(63).and_then(|f| PinReceipt::from_tlv(f).ok()).map(|r| {
                            let pin = if reveal {
                                r.pin.expose().to_string()
                            } else {
                                format!("{:?}", r.pin)
                            };
                            format!(" serial {} PIN {pin}", r.serial)
                        });
                        println!(
                            "call {}: {} {} code {code}{} ({}, NAKs {}, {took} ms)",
                            i + 1,
                            out.connect.unwrap_or_default(),
                            a.mti(),
                            pin.unwrap_or_default(),
                            if script.ack_answer {
                                "ACKed"
                            } else {
                                "line dropped before ACK"
                            },
                            out.naks
                        );
                        all_ok &= code == "00";
                    }
                }
            }
        }
    }
    if let Some(link) = &args.link {
        let _ = std::fs::remove_file(link);
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pingate-dialup: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Modem { modem: m, reveal } => modem(m, reveal).await.map(|_| true),
            Cmd::Call {
                modem: m,
                terminal,
                merchant,
                product,
                amount,
                currency,
                count,
                stan,
                dialect,
                tpdu,
                bad_frames,
                no_ack,
                reveal,
                wait_secs,
                mac_key_file,
                kek_file,
            } => {
                let mac = match (mac_key_file, kek_file) {
                    (Some(f), Some(k)) => match pingate::traffic::secure::MacSigner::load(&f, &k) {
                        Ok(m) => Some(m),
                        Err(e) => return Err(e),
                    },
                    _ => None,
                };
                let id = Identity {
                    terminal_id: terminal,
                    merchant_id: merchant,
                };
                let spec = SaleSpec {
                    stan,
                    transmission: "1129120000".into(),
                    product,
                    amount,
                    currency,
                };
                let script = CallScript {
                    bad_frames,
                    ack_answer: !no_ack,
                    ..CallScript::default()
                };
                call(
                    m,
                    id,
                    spec,
                    count,
                    dialect,
                    tpdu,
                    script,
                    reveal,
                    Duration::from_secs(wait_secs),
                    mac,
                )
                .await
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pingate-dialup: {e}");
            ExitCode::FAILURE
        }
    }
}
