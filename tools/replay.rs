//! `pingate-replay`: capture files for replay.
//!
//! - `pingate-replay replay CAPTURE --gateway ADDR` (the same as `pingate replay`): sends the captured requests
//!   again and compares each answer with the captured one; `--offline` checks the frames against the codec alone.
//! - `pingate-replay import FILE.pcapng --port 9000 --framing binary2 --dialect iso87-bcd --tpdu -o out.capture`:
//!   reads a pcap or pcapng file (tcpdump, tshark, Wireshark), reassembles the TCP streams of the port, cuts them
//!   into frames and writes a capture file, PIN values masked (`--pins omitted` leaves field 63 out). Answers of a
//!   host that is not pingate keep their place: `--pin-at 62`, `--pin-at 63:PI` or `--pin-at 63@5+16` says where
//!   that host's PINs are and exactly those are masked; without it a field 63 of another layout is masked whole.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pingate::iso8583::Dialects;
use pingate::traffic::capture::PinPolicy;
use pingate::traffic::pcap::{import, ImportOptions};

#[derive(Parser)]
#[command(
    name = "pingate-replay",
    version,
    about = "Replay and import captured terminal traffic"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replay a capture file against a gateway, or offline against the codec.
    Replay(pingate::traffic::replay::ReplayArgs),
    /// Import a pcap or pcapng file into a capture file.
    Import {
        /// The pcap or pcapng file.
        pcap: PathBuf,
        /// The gateway's port in the capture (segments to it are the terminals').
        #[arg(long)]
        port: u16,
        /// binary2, binary2-inclusive, ascii4, bcd2.
        #[arg(long, default_value = "binary2")]
        framing: String,
        /// Frames carry a 5-byte TPDU.
        #[arg(long)]
        tpdu: bool,
        #[arg(long, default_value = "iso87-ascii-binbitmap")]
        dialect: String,
        /// masked (default), omitted (field 63 left out) or clear (test traffic only).
        #[arg(long, default_value = "masked")]
        pins: String,
        /// Where the host puts PINs in its answers, when it is not pingate (repeatable): `FIELD` (the whole
        /// field), `FIELD:TAG` (the value of element TAG, in pingate's field-63 TLV form: a 2-character tag, a
        /// 3-digit length, the value) or `FIELD@OFFSET+LEN` (LEN characters of the field's value from OFFSET,
        /// counted from 0). Exactly those are masked, lengths kept. Without it, a field 63 that is not pingate's
        /// receipt layout is masked whole.
        #[arg(long = "pin-at", value_name = "PLACE")]
        pin_at: Vec<pingate::traffic::capture::PinLocation>,
        #[arg(long, default_value_t = 8192)]
        max_frame: usize,
        /// The capture file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<bool, String> = match cli.cmd {
        Cmd::Replay(args) => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(pingate::traffic::replay::run_cli(args))),
        Cmd::Import {
            pcap,
            port,
            framing,
            tpdu,
            dialect,
            pins,
            pin_at,
            max_frame,
            output,
        } => (|| {
            let framing = framing.parse()?;
            let pins: PinPolicy = serde_json::from_value(serde_json::Value::String(pins.clone()))
                .map_err(|_| format!("--pins `{pins}`: masked, omitted or clear"))?;
            let dialects = Dialects::builtin();
            let d = dialects.get(&dialect).map_err(|e| e.to_string())?;
            let bytes = std::fs::read(&pcap).map_err(|e| format!("{}: {e}", pcap.display()))?;
            let opts = ImportOptions {
                port,
                framing,
                tpdu,
                max_frame,
                pins,
                pin_at,
            };
            let (capture, report) =
                import(&bytes, d, &dialect, &opts).map_err(|e| format!("{}: {e}", pcap.display()))?;
            std::fs::write(&output, capture.to_text()).map_err(|e| format!("{}: {e}", output.display()))?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{} packets, {} TCP segments of port {port}, {} connections: {} frames from terminals, {} from the host -> {}",
                report.packets,
                report.segments,
                report.connections,
                report.frames_from_terminals,
                report.frames_from_host,
                output.display()
            );
            Ok(true)
        })(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pingate-replay: {e}");
            ExitCode::from(2)
        }
    }
}
