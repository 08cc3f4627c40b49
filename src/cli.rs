//! The `pingate` command line. Each subcommand parses its arguments and calls the library; exit code 2 and a
//! field-level message on stderr for bad input.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{CommandFactory, Parser, Subcommand};

use crate::admin::{key_spec, KeyArgs, LimitsCommand, PinsCommand};
use crate::iso8583::{from_hex, to_hex, Dialect, Dialects, Message, DEFAULT_DIALECT};

#[derive(Parser)]
#[command(name = "pingate", version, about = "Sells prepaid PINs to point-of-sale terminals")]
struct Cli {
    /// Log format of the long-running commands (server, gateway): `text` for people, `json` (one object per line)
    /// for log collectors.
    #[arg(long, global = true, env = "PINGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log levels, e.g. `info` or `warn,pingate::gateway=debug` (default: `$RUST_LOG`, else the gateway
    /// configuration's `log`, else `info`).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// How the long-running commands log (set once from the command line).
static LOGGING: std::sync::OnceLock<(bool, Option<String>)> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Command {
    /// Check the inventory's invariants, reconcile gateways' journals with it, report a day's sales.
    Audit {
        /// Inventory: sqlite:PATH or postgres://USER@HOST:PORT/DB (opened read-only).
        #[arg(long)]
        db: String,
        /// A gateway journal to reconcile: `ID,PATH,KEYFILE` (its gateway id, the journal, its journal key file);
        /// repeat for each gateway.
        #[arg(long = "journal")]
        journals: Vec<String>,
        /// Report this day's sales and reversals (`YYYY-MM-DD`, UTC).
        #[arg(long)]
        day: Option<String>,
        /// Also write the report as CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
    /// Check a gateway configuration (or a PIN server's gateway list) and print every problem with its location.
    CheckConfig {
        /// The file: a gateway's TOML configuration, or a PIN server's `gateways.toml`.
        file: PathBuf,
    },
    /// Replay a capture file against a gateway (answers compared field by field), or offline against the codec.
    Replay(crate::traffic::replay::ReplayArgs),
    /// Decode, encode and list ISO 8583 dialects.
    Iso {
        #[command(subcommand)]
        command: IsoCommand,
    },
    /// Run the PIN server: the inventory, served to gateways over mutual TLS.
    Server(ServerArgs),
    /// Certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Terminals' MAC keys (`pingate terminals key generate|import|rotate|show-kcv`), and terminals locked for bad
    /// MACs at a running gateway (`status`, `unlock`).
    Terminals {
        #[command(subcommand)]
        command: TerminalsCommand,
    },
    /// Manage the PIN inventory: products, imports, stock, leases.
    Pins {
        #[command(subcommand)]
        command: PinsCommand,
    },
    /// Merchants' limits kept by the PIN server across gateways (`set`, `show`).
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
    /// Run the gateway (`pingate gateway --config gateway.toml`), or ask a running one (`pingate gateway stock`).
    #[command(args_conflicts_with_subcommands = true)]
    Gateway {
        /// Configuration file (see protocols/gateway.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<GatewayCommand>,
    },
    /// Everything in one process with no setup: certificates, a SQLite inventory, a PIN server, a gateway, and
    /// simulated terminals buying PINs; prints a report.
    Demo {
        /// Sales to make.
        #[arg(long, default_value_t = 400)]
        sales: usize,
        /// Simulated terminals (each sells in turn; all at once).
        #[arg(long, default_value_t = 8)]
        terminals: usize,
        /// Folder to work in (default: a new temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the PIN server and gateway running for your own terminal, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// A shell completion script for `pingate`, on standard output (e.g. `pingate completions bash >
    /// /usr/share/bash-completion/completions/pingate`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Manual pages of `pingate` and of each of its commands (`pingate.1`, `pingate-gateway.1`,
    /// `pingate-gateway-stock.1`, …), written into a folder (e.g. /usr/share/man/man1).
    Man {
        /// Folder to write the pages into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Cache levels, confirms and reversals waiting for the server, and server health of a running gateway.
    Stock {
        /// The gateway's admin socket (`admin` in its configuration): a Unix socket path, or IP:port.
        #[arg(long, default_value = "/run/pingate/admin.sock")]
        admin: String,
    },
    /// Serial lines of a running gateway: state, calls, answers delivered, sales reversed, last error.
    Lines {
        /// The gateway's admin socket (`admin` in its configuration): a Unix socket path, or IP:port.
        #[arg(long, default_value = "/run/pingate/admin.sock")]
        admin: String,
    },
}

#[derive(Subcommand)]
enum TerminalsCommand {
    /// Terminals' MAC keys: generate, import, rotate, show key check values.
    Key {
        #[command(subcommand)]
        command: crate::terminal_keys::KeyCommand,
    },
    /// Terminals with bad or missing MACs since a running gateway started, and which of them are locked.
    Status {
        /// The gateway's admin socket (`admin` in its configuration): a Unix socket path, or IP:port.
        #[arg(long, default_value = "/run/pingate/admin.sock")]
        admin: String,
    },
    /// Unlock a terminal that a running gateway locked after too many bad or missing MACs.
    Unlock {
        /// The gateway's admin socket (`admin` in its configuration): a Unix socket path, or IP:port.
        #[arg(long, default_value = "/run/pingate/admin.sock")]
        admin: String,
        /// The terminal id (field 41).
        terminal: String,
    },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Inventory: sqlite:PATH or postgres://USER@HOST:PORT/DB.
    #[arg(long)]
    db: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// Server certificate (PEM, chain).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA that issues gateway certificates (PEM).
    #[arg(long)]
    client_ca: PathBuf,
    /// Gateway list: `id = "sha256 of its certificate"` per line.
    #[arg(long)]
    gateways: PathBuf,
    #[command(flatten)]
    keys: KeyArgs,
    /// Most gateway connections at once (TLS handshake done with a listed certificate); more are closed.
    #[arg(long, default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most connections not authenticated yet (TLS handshake or hello under way); a new one past it closes the
    /// oldest of them. Gateway connections do not count.
    #[arg(long, default_value_t = crate::server::DEFAULT_MAX_UNAUTHENTICATED)]
    max_unauthenticated: usize,
    /// The same from one source address: a new one past it closes the oldest of that address.
    #[arg(long, default_value_t = crate::server::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE)]
    max_unauthenticated_per_source: usize,
    /// Milliseconds a new connection has for its TLS handshake and its hello, together; then it is closed.
    #[arg(long, default_value_t = crate::server::DEFAULT_HANDSHAKE_TIMEOUT_MS)]
    handshake_timeout_ms: u64,
    /// A repeat (0201, or a duplicate 0200) of a sale older than this gets no PIN (`repeat_expired`, 12 to the
    /// terminal): a receipt's STAN and time, or a capture replayed later, gives back nothing. 60 to 2592000 (30 days).
    #[arg(long, default_value_t = crate::store::DEFAULT_REPEAT_AGE_SECS as u64)]
    repeat_age_secs: u64,
    /// A terminal's reversal received more than this many seconds after its sale is refused (21 to the terminal)
    /// and the PIN stays sold (60 to 604800; no window when absent). Gateways' own reversals of answers that did not
    /// reach the terminal are never refused.
    #[arg(long)]
    reversal_window_secs: Option<u64>,
    /// Requests in flight on one connection; more are answered `busy` (1 to 4096; a gateway sends up to 200).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Largest request frame in bytes; a larger one closes the connection (131072, the protocol's largest request
    /// frame, to 16777216).
    #[arg(long, default_value_t = crate::psp::MAX_REQUEST_FRAME)]
    max_frame: usize,
    /// A connection with nothing in flight and no request for this many seconds is closed (30 to 86400; above the
    /// gateways' ping_every_ms).
    #[arg(long, default_value_t = 300)]
    idle_timeout_secs: u64,
    /// Longest lease a gateway may ask for on reserved PINs, in seconds (60 to 604800; at least the gateways'
    /// lease_secs).
    #[arg(long, default_value_t = 86_400)]
    max_lease_secs: u64,
    /// PostgreSQL connections used by this server (each commits batches of requests; on 2 cores, 2 is best; 1 to
    /// 64).
    #[arg(long, default_value_t = 2)]
    pg_connections: usize,
    /// Serve Prometheus metrics, /healthz and /readyz over HTTP here (e.g. 127.0.0.1:9585); off by default.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a private CA, a server certificate, gateway certificates, the gateway list and a PIN key file: the CA
    /// in DIR/ca (its key to keep offline), and one folder per host with only what it deploys (DIR/server,
    /// DIR/gateway-ID).
    Init {
        /// Directory to write into (created; an existing CA is never overwritten).
        dir: PathBuf,
        /// Gateway ids to issue client certificates for.
        #[arg(long = "gateway", default_values_t = vec!["gw1".to_string()])]
        gateways: Vec<String>,
        /// Names (DNS or IP) of the server certificate.
        #[arg(long = "server-name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue a certificate with the CA of a `certs init` folder (its `ca/ca.key` at hand): a terminal's or a NAC's
    /// client certificate (CN = the terminal id, or the NAC's name in `[[nac]]`), or with `--listener` the server
    /// certificate of a gateway's TLS terminal listener. Writes OUT/NAME.pem, OUT/NAME.key (0600) and OUT/ca.pem.
    Terminal {
        /// The `certs init` folder whose CA signs.
        dir: PathBuf,
        /// The certificate's name(s): the first is its CN; all are subject alternative names.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// A TLS listener's server certificate (names: DNS names or IP addresses terminals connect to).
        #[arg(long)]
        listener: bool,
        /// Where to write (default: DIR/terminals).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Write a new encryption key file (`1:64-hex`, mode 0600; never overwrites): e.g. a gateway's journal key.
    Key {
        /// The file to create.
        file: PathBuf,
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

/// Runs the CLI and maps every failure to exit code 2 with its message on stderr (a replay that found differences
/// exits 1).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "pingate", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { out } => {
            return match man_pages(Cli::command(), out) {
                Ok(n) => {
                    println!("{n} manual pages written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }
    let _ = LOGGING.set((cli.log_format == "json", cli.log_level.clone()));
    if let Command::Audit { db, journals, day, csv } = &cli.command {
        return match runtime().and_then(|rt| rt.block_on(audit(db, journals, day.as_deref(), csv.as_deref()))) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::Replay(args) = cli.command {
        return match runtime().and_then(|rt| rt.block_on(crate::traffic::replay::run_cli(args))) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
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

/// Writes the manual page of `cmd` and of each of its subcommands (named `parent-sub`) into `out`; returns how many.
fn man_pages(cmd: clap::Command, out: &std::path::Path) -> Result<usize, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    fn write(cmd: clap::Command, name: String, out: &std::path::Path) -> Result<usize, String> {
        let mut cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
        cmd.build();
        let path = out.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut page)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut n = 1;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            n += write(sub.clone(), format!("{name}-{}", sub.get_name()), out)?;
        }
        Ok(n)
    }
    write(cmd, "pingate".into(), out)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// `pingate audit`: prints the report (and writes the CSV); `Ok(false)` when an invariant is broken.
async fn audit(
    db: &str,
    journals: &[String],
    day: Option<&str>,
    csv: Option<&std::path::Path>,
) -> Result<bool, String> {
    let url = crate::store::handle::DbUrl::parse(db).map_err(|e| e.to_string())?;
    let mut inputs = Vec::new();
    for j in journals {
        let parts: Vec<&str> = j.splitn(3, ',').collect();
        let [id, path, keys] = parts[..] else {
            return Err(format!("--journal `{j}`: ID,PATH,KEYFILE"));
        };
        let keys = crate::keyfile::read_to_string(std::path::Path::new(keys)).map_err(|e| e.to_string())?;
        inputs.push(crate::audit::JournalInput {
            path: path.into(),
            keys: keys.trim().to_string(),
            gateway: id.into(),
        });
    }
    let report = crate::audit::run_with_progress(&url, &inputs, day, false)
        .await
        .map_err(|e| e.to_string())?;
    print!("{}", report.text());
    if let Some(path) = csv {
        std::fs::write(path, report.csv()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report.ok())
}

/// `pingate check-config FILE`: every problem of a gateway configuration (keys, values, files it names, dialects),
/// or of a PIN server's gateway list.
fn check_config(file: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let looks_like_gateway = text.lines().any(|l| l.trim() == "[gateway]");
    if !looks_like_gateway {
        let list = crate::tls::GatewayList::load(file).map_err(|e| format!("{}: {e}", file.display()))?;
        return Ok(format!(
            "{}: a PIN server's gateway list, {} gateways: OK",
            file.display(),
            list.len()
        ));
    }
    let mut problems: Vec<String> = Vec::new();
    let cfg = match crate::gateway::config::GatewayConfig::check(&text, file) {
        Ok(c) => Some(c),
        Err(all) => {
            problems.extend(all.iter().map(|e| e.to_string()));
            None
        }
    };
    let at = |key: &str, what: String| format!("{}: {key}: {what}", file.display());
    // The files it names, read from the text itself (so that they are checked even when other keys are wrong).
    if let Ok(raw) = text.parse::<toml::Table>() {
        // Relative to the file's folder, exactly as the gateway resolves them.
        let base = crate::gateway::config::folder_of(file);
        let path_of = |table: &str, key: &str| {
            raw.get(table)
                .and_then(|t| t.get(key))
                .and_then(|v| v.as_str())
                .map(|p| base.join(p))
        };
        for key in ["cert", "key", "ca"] {
            if let Some(p) = path_of("upstream", key) {
                if let Err(e) = std::fs::metadata(&p) {
                    problems.push(at(&format!("upstream.{key}"), format!("{}: {e}", p.display())));
                } else if key == "key" {
                    // A private key group or others may read refuses the gateway's start.
                    if let Err(e) = crate::keyfile::check(&p) {
                        problems.push(at("upstream.key", e.to_string()));
                    }
                }
            }
        }
        if let Some(dir) = path_of("gateway", "journal").map(|j| crate::gateway::config::folder_of(&j).to_path_buf()) {
            if !dir.is_dir() {
                problems.push(at(
                    "gateway.journal",
                    format!("folder {} does not exist", dir.display()),
                ));
            }
        }
    }
    if let Some(c) = &cfg {
        if c.journal_keys.is_none() && std::env::var_os("PINGATE_JOURNAL_KEYS").is_none() {
            problems.push(at(
                "gateway.journal_keys_file",
                "no key for the journal (give the file, or set PINGATE_JOURNAL_KEYS)".into(),
            ));
        }
        let dialects = match &c.protocols {
            Some(dir) => crate::iso8583::Dialects::load(dir).map_err(|e| at("gateway.protocols", e.to_string())),
            None => Ok(crate::iso8583::Dialects::builtin()),
        };
        match dialects {
            Err(p) => problems.push(p),
            Ok(d) => {
                for (i, l) in c.listeners.iter().enumerate() {
                    if d.get(&l.dialect).is_err() {
                        problems.push(at(
                            &format!("listener[{i}].dialect"),
                            format!("no dialect `{}`", l.dialect),
                        ));
                    }
                }
                for (i, l) in c.serial.iter().enumerate() {
                    if d.get(&l.dialect).is_err() {
                        problems.push(at(
                            &format!("serial[{i}].dialect"),
                            format!("no dialect `{}`", l.dialect),
                        ));
                    }
                }
            }
        }
        if c.listeners.is_empty() && c.serial.is_empty() {
            problems.push(at(
                "listener",
                "no [[listener]] and no [[serial]] line: no terminal can reach it".into(),
            ));
        }
        let mut captures = std::collections::HashSet::new();
        let listeners = c
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("listener[{i}]"), &l.capture));
        let lines = c
            .serial
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("serial[{i}]"), &l.capture));
        for (key, capture) in listeners.chain(lines) {
            if let Some(p) = capture {
                if !captures.insert(p.clone()) {
                    problems.push(at(
                        &format!("{key}.capture"),
                        format!("{} is another listener's or line's capture file too", p.display()),
                    ));
                }
            }
        }
        if c.terminals.terminals.is_empty() {
            problems.push(at(
                "terminal",
                "no [[terminal]]: every request will be refused (58)".into(),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "{} problem{} in {}:\n  {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            file.display(),
            problems.join("\n  ")
        ));
    }
    let c = cfg.expect("checked");
    let warnings: String = c.warnings().iter().map(|w| format!("\nwarning: {w}")).collect();
    Ok(format!(
        "{}: a gateway configuration: {} listeners, {} serial lines, {} terminals, {} products listed: OK{warnings}",
        file.display(),
        c.listeners.len(),
        c.serial.len(),
        c.terminals.terminals.len(),
        c.products.len()
    ))
}

/// Logs of the long-running commands, on stderr: text or JSON (`--log-format`), levels from `--log-level`, else
/// `$RUST_LOG`, else `configured` (the gateway configuration's `log`), else `info`.
fn init_logging(configured: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (json, flag) = LOGGING.get().cloned().unwrap_or((false, None));
    let spec = flag
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty()))
        .or_else(|| configured.map(String::from))
        .unwrap_or_else(|| "info".into());
    let filter: tracing_subscriber::filter::Targets = spec
        .parse()
        .map_err(|e| format!("log levels `{spec}`: {e} (e.g. `info` or `warn,pingate::gateway=debug`)"))?;
    // Colours only for a person at a terminal; logs going to files or other programs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_target(false),
            )
            .try_init()
    };
    Ok(())
}

async fn server(args: ServerArgs) -> Result<String, String> {
    init_logging(None)?;
    let server_opts = crate::server::ServerOptions {
        max_connections: args.max_connections,
        max_unauthenticated: args.max_unauthenticated,
        max_unauthenticated_per_source: args.max_unauthenticated_per_source,
        max_in_flight: args.max_in_flight,
        max_frame: args.max_frame,
        handshake_timeout: std::time::Duration::from_millis(args.handshake_timeout_ms),
        idle_timeout: std::time::Duration::from_secs(args.idle_timeout_secs),
        max_lease: std::time::Duration::from_secs(args.max_lease_secs),
        repeat_age: std::time::Duration::from_secs(args.repeat_age_secs),
        reversal_window: args.reversal_window_secs.map(std::time::Duration::from_secs),
        metrics: args.metrics,
    };
    server_opts.check(args.pg_connections)?;
    let keys = key_spec(&args.keys)?;
    let gateways = crate::tls::GatewayList::load(&args.gateways).map_err(|e| e.to_string())?;
    // One list for the handshakes and the connections, replaced on SIGHUP (from here on: SIGHUP no longer stops
    // the process).
    let gateways = crate::tls::SharedGatewayList::new(gateways);
    let tls = crate::tls::server_config_shared(&args.cert, &args.key, &args.client_ca, gateways.clone())
        .map_err(|e| e.to_string())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    tokio::spawn({
        let (path, gateways) = (args.gateways.clone(), gateways.clone());
        async move {
            while hup.recv().await.is_some() {
                crate::server::reload_gateways(&path, &gateways);
            }
        }
    });
    let url = crate::store::handle::DbUrl::parse(&args.db).map_err(|e| e.to_string())?;
    let opts = crate::store::handle::StoreOptions {
        pg_connections: args.pg_connections,
        ..Default::default()
    };
    let store = crate::store::handle::StoreHandle::open(&url, &keys, &opts)
        .await
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("{}: {e}", args.listen))?;
    crate::server::run(
        listener,
        std::sync::Arc::new(tls),
        gateways,
        store.clone(),
        server_opts,
        shutdown_signal(),
    )
    .await;
    store.close().await;
    // Warnings still being counted are written before the process ends.
    crate::logging::flush();
    Ok("PIN server stopped".into())
}

async fn gateway(config: PathBuf) -> Result<String, String> {
    let cfg = crate::gateway::config::GatewayConfig::load(&config).map_err(|e| e.to_string())?;
    init_logging(cfg.log.as_deref())?;
    let ran = crate::gateway::run(cfg, Some(config), shutdown_signal()).await;
    // Warnings still being counted are written before the process ends.
    crate::logging::flush();
    ran.map_err(|e| e.to_string())?;
    Ok("gateway stopped".into())
}

/// SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
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
        Command::Server(args) => runtime()?.block_on(server(args)),
        Command::Certs {
            command:
                CertsCommand::Terminal {
                    dir,
                    names,
                    listener,
                    out,
                    days,
                },
        } => {
            let kind = if listener {
                crate::tls::Issue::Listener
            } else {
                crate::tls::Issue::Client
            };
            let out = out.unwrap_or_else(|| dir.join("terminals"));
            let pem = crate::tls::issue(&crate::tls::CertsDir { dir }, kind, &names, days, &out)
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "wrote {} and its key (.key), with the CA's certificate in {}",
                pem.display(),
                out.join("ca.pem").display()
            ))
        }
        Command::Certs {
            command: CertsCommand::Key { file },
        } => {
            crate::tls::write_new_key(&file).map_err(|e| e.to_string())?;
            Ok(format!("wrote a new key to {}", file.display()))
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    gateways,
                    server_names,
                    days,
                },
        } => {
            let out = crate::tls::certs_init(
                &dir,
                &crate::tls::CertsInit {
                    server_names,
                    gateways: gateways.clone(),
                    days,
                },
            )
            .map_err(|e| e.to_string())?;
            let mut text = format!(
                "wrote {}:\n  {}: ca.pem ca.key: the CA; ca.key only issues certificates: keep it offline\n  {}: \
                 server.pem server.key ca.pem gateways.toml pin-keys: the PIN server's",
                out.dir.display(),
                out.ca_dir().display(),
                out.server_dir().display()
            );
            for g in &gateways {
                text.push_str(&format!(
                    "\n  {}: gateway.pem gateway.key ca.pem: gateway {g}'s",
                    out.gateway_dir(g).display()
                ));
            }
            Ok(text)
        }
        Command::Pins { command } => runtime()?.block_on(crate::admin::pins(command)),
        Command::Limits { command } => runtime()?.block_on(crate::admin::limits(command)),
        Command::Terminals {
            command: TerminalsCommand::Key { command },
        } => crate::terminal_keys::run(command, &mut std::io::stdin()).map_err(|e| e.to_string()),
        Command::Terminals {
            command: TerminalsCommand::Status { admin },
        } => runtime()?.block_on(crate::gateway::ask_admin(&admin, "terminals")),
        Command::Terminals {
            command: TerminalsCommand::Unlock { admin, terminal },
        } => {
            crate::terminal_keys::check_terminal_id(&terminal).map_err(|e| e.to_string())?;
            let answer = runtime()?.block_on(crate::gateway::ask_admin(&admin, &format!("unlock {terminal}")))?;
            let v: serde_json::Value = serde_json::from_str(&answer).map_err(|_| answer.clone())?;
            match v["unlocked"].as_bool() {
                Some(true) => Ok(format!("terminal {terminal} unlocked")),
                Some(false) => Err(format!("terminal {terminal} is not locked")),
                None => Err(answer),
            }
        }
        Command::Gateway {
            command: Some(GatewayCommand::Stock { admin }),
            ..
        } => runtime()?.block_on(crate::gateway::ask_admin(&admin, "stock")),
        Command::Gateway {
            command: Some(GatewayCommand::Lines { admin }),
            ..
        } => runtime()?.block_on(crate::gateway::ask_admin(&admin, "lines")),
        Command::Gateway {
            config: Some(config),
            command: None,
        } => runtime()?.block_on(gateway(config)),
        Command::Gateway { .. } => Err("give --config FILE to run a gateway, or a subcommand (stock, lines)".into()),
        Command::CheckConfig { file } => check_config(&file),
        Command::Audit { .. } | Command::Completions { .. } | Command::Man { .. } => {
            Err("this command is run by main".into())
        }
        Command::Replay(args) => match runtime()?.block_on(crate::traffic::replay::run_cli(args)) {
            Ok(true) => Ok(String::new()),
            Ok(false) => Err("the replay found differences".into()),
            Err(e) => Err(e),
        },
        Command::Demo {
            sales,
            terminals,
            dir,
            keep_running,
        } => {
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!(
                    "pingate-demo-{}-{}",
                    std::process::id(),
                    crate::clock::unix_now()
                ))
            });
            eprintln!("pingate demo: working in {}", dir.display());
            let report = runtime()?.block_on(crate::demo::run(
                crate::demo::DemoOptions {
                    dir,
                    sales,
                    terminals,
                    keep_running,
                },
                shutdown_signal(),
            ))?;
            Ok(report.to_string().trim_end().to_string())
        }
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
