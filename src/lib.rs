//! pingate sells prepaid PINs to point-of-sale terminals.
//!
//! Map of the modules (see `../shared/architecture.md` for the whole picture, and `protocols/` for the wire specs).
//! No module imports one that imports it back, directly or through others (`tests/module_graph.rs` checks it):
//!
//! - [`iso8583`] — protocol core, no I/O: ISO 8583 dialects loaded from `protocols/iso8583/*.toml`, a nom decoder,
//!   a `BytesMut` encoder, the [`iso8583::Message`] value type with masking, and the JSON form.
//! - [`link`] — protocol cores, no I/O: terminal-side length framings and TPDU as tokio-util codecs, the dial-up
//!   `STX data ETX LRC` link, the Hayes modem controller, and software parity for 7-bit lines.
//! - [`sale`] — the PIN sale contract spoken with terminals (`protocols/pin-sale-messages.md`): response codes,
//!   the field 63 TLV that carries the PIN, the keys that match repeats and reversals to sales, and what a sale
//!   bought as its reversal names it (`SaleContent`, shared by the gateway, PSP and the store).
//! - [`psp`] — protocol core, no I/O: the PIN server protocol's messages, limits, its one length-prefix codec and
//!   strict parsing, with a typed error; no dependency on the store. [`psp::client`], the gateway's TLS client, is
//!   its one part that does I/O.
//! - [`mac`] — protocol core, no I/O: terminal MACs (ISO 9797-1 algorithm 3 / X9.19 retail MAC over DES, AES-CMAC
//!   truncated to 8 bytes), MAC keys with their key check values, constant-time verification.
//! - [`crypto`] — PIN encryption at rest (ChaCha20-Poly1305, keys outside the database), for the inventory's rows
//!   and the gateway's journal alike; [`clock`] — the wall clock in seconds since the epoch.
//! - [`store`] — the PIN inventory: the `PinStore` trait with SQLite and PostgreSQL backends, states and their
//!   allowed edges, audit rows, idempotent sales, reversals, group-commit workers.
//! - [`gateway`] — the host connection manager: terminal listeners and serial lines, the controller (the sale, repeat,
//!   reversal and network rules without I/O, and the repeat window), the prefetch cache and its refills, the crash-safe
//!   journal, store-and-forward, the PIN server pool, configuration reload, metrics and the admin socket, and where a
//!   terminal may come from (`gateway::origin`: TLS listeners, client certificates of terminals and NACs, source
//!   networks, callers' numbers), and fraud controls (`gateway::policy`, `gateway::limits`: the reversal window,
//!   reversal rates, limits per terminal and merchant, merchants' allowances from the PIN server). Depends on no part
//!   of the PIN server ([`server`], [`store`]).
//! - [`server`], [`tls`] — the PIN server (mini-redis shaped `run(listener, …, shutdown)`; `server/handler.rs` maps
//!   PSP requests to store operations and store results to answers) and mutual TLS.
//! - [`terminal_keys`] — the terminal key file: each terminal's MAC keys sealed under a key-encrypting key (with
//!   [`crypto`]'s cipher), key ids for re-keying without downtime, KCVs, and `pingate terminals key …`.
//! - [`keyfile`] — key files (PIN keys, journal keys, TLS private keys) read only when their owner alone may.
//! - [`traffic`] — the traffic tools, clients of the gateway: the simulated TCP terminal, scenario files, the dial-up
//!   simulator (modem emulator and dial-up terminal), the load generator with its echo ceiling, CPU time from `/proc`,
//!   capture files (the one piece the gateway uses: it writes them), pcap import and replay; TLS and terminals' MAC
//!   keys for all of them (`traffic::secure`).
//! - [`demo`] — `pingate demo`, and its [`demo::rig`]: certificates, an inventory, a PIN server and gateways in one
//!   process (or a gateway as its own), the one set-up `pingate demo`, the end-to-end tests and the benches share.
//! - [`logging`] — repeated warnings aggregated (`limited!`): one line, then a count per interval, so an outage or
//!   a hostile peer cannot make the log grow with its traffic.
//! - [`metrics`] — Prometheus exposition and the HTTP endpoint for metrics, health and readiness.
//! - [`progress`] — progress bars of the long commands (indicatif), on stderr only when it is a terminal.
//! - [`audit`] — `pingate audit`: the inventory's invariants, gateways' journals reconciled, a day's report.
//! - [`admin`], [`cli`] — the `pingate` command line, thin over the library.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod crypto;
pub mod demo;
pub mod gateway;
pub mod iso8583;
pub mod keyfile;
pub mod link;
pub mod logging;
pub mod mac;
pub mod metrics;
pub mod progress;
pub mod psp;
pub mod sale;
pub mod server;
pub mod store;
pub mod terminal_keys;
pub mod tls;
pub mod traffic;
