//! The `pingate` command line. Each subcommand parses its arguments and calls the library; exit code 2 and a
//! field-level message on stderr for bad input.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand};

use crate::iso8583::{from_hex, to_hex, Dialect, Dialects, Message, DEFAULT_DIALECT};

#[derive(Parser)]
#[command(name = "pingate", version, about = "Sells prepaid PINs to point-of-sale terminals")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode, encode and list ISO 8583 dialects.
    Iso {
        #[command(subcommand)]
        command: IsoCommand,
    },
}

#[derive(clap::Args)]
struct DialectArgs {
    /// Dialect name (see `pingate iso dialects`).
    #[arg(long, default_value = DEFAULT_DIALECT)]
    dialect: String,
    /// Directory with user dialects in `iso8583/*.toml` (default: ./protocols, or $PINGATE_PROTOCOLS).
    #[arg(long, env = "PINGATE_PROTOCOLS", default_value = "protocols")]
    protocols: PathBuf,
}

#[derive(Subcommand)]
enum IsoCommand {
    /// Decode a hex message (argument, or stdin with `-` or nothing) and print it as JSON.
    Decode {
        #[command(flatten)]
        dialect: DialectArgs,
        /// Show sensitive fields (PIN data, PAN, track data, MACs) instead of masking them.
        #[arg(long)]
        reveal: bool,
        /// A table with field names instead of JSON.
        #[arg(long)]
        pretty: bool,
        /// The message as hex; `-` or absent reads stdin.
        hex: Option<String>,
    },
    /// Encode a message given as JSON (argument, or stdin) and print it as hex.
    Encode {
        #[command(flatten)]
        dialect: DialectArgs,
        /// `{"mti": "0200", "fields": {"3": "000000", ...}}`; `-` or absent reads stdin.
        json: Option<String>,
    },
    /// List the dialects available.
    Dialects {
        /// Directory with user dialects in `iso8583/*.toml`.
        #[arg(long, env = "PINGATE_PROTOCOLS", default_value = "protocols")]
        protocols: PathBuf,
    },
}

/// Runs the CLI and maps every failure to exit code 2 with its message on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn input(arg: Option<String>) -> Result<String, String> {
    match arg.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("reading stdin: {e}"))?;
            Ok(s)
        }
        Some(s) => Ok(s.to_string()),
    }
}

fn dialect(args: &DialectArgs) -> Result<Dialect, String> {
    let all = Dialects::load(&args.protocols).map_err(|e| e.to_string())?;
    all.get(&args.dialect).cloned().map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<String, String> {
    match cli.command {
        Command::Iso { command } => match command {
            IsoCommand::Decode {
                dialect: args,
                reveal,
                pretty,
                hex,
            } => {
                let d = dialect(&args)?;
                let text = input(hex)?;
                let bytes = from_hex(text.trim()).map_err(|i| format!("input is not hex: bad character at {i}"))?;
                let msg = d.decode(&Bytes::from(bytes)).map_err(|e| e.to_string())?;
                if pretty {
                    Ok(pretty_table(&d, &msg, reveal))
                } else {
                    Ok(d.to_json(&msg, reveal).to_string())
                }
            }
            IsoCommand::Encode { dialect: args, json } => {
                let d = dialect(&args)?;
                let text = input(json)?;
                let value: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("input is not JSON: {e}"))?;
                let msg = d.from_json(&value).map_err(|e| e.to_string())?;
                let out = d.encode(&msg).map_err(|e| e.to_string())?;
                Ok(to_hex(&out))
            }
            IsoCommand::Dialects { protocols } => {
                let all = Dialects::load(&protocols).map_err(|e| e.to_string())?;
                let mut out = String::new();
                for (d, src) in all.iter() {
                    let src = match src {
                        crate::iso8583::Source::Builtin => "builtin".to_string(),
                        crate::iso8583::Source::File(p) => p.display().to_string(),
                    };
                    let default = if d.name == DEFAULT_DIALECT { " (default)" } else { "" };
                    out.push_str(&format!("{}{default}\t{src}\n    {}\n", d.name, d.description));
                }
                Ok(out.trim_end().to_string())
            }
        },
    }
}

fn pretty_table(d: &Dialect, msg: &Message, reveal: bool) -> String {
    let json = d.to_json(msg, reveal);
    let mut out = format!("MTI  {}  ({})\n", msg.mti(), d.name);
    for (n, _) in msg.fields() {
        let name = d.field(n).map(|s| s.name.as_str()).unwrap_or("?");
        let value = json["fields"][n.to_string()].as_str().unwrap_or_default();
        out.push_str(&format!("{n:>4}  {name:<48}  {value}\n"));
    }
    out.trim_end().to_string()
}
