//! The traffic tools: what talks to a gateway as terminals do, and what records, imports and replays that traffic.
//! They are clients of the gateway and depend on the protocol cores alone (`iso8583`, `link`, `sale`), never on the
//! gateway or the PIN server: so the gateway can write [`capture`] files, the one tool it uses, without an import
//! cycle (`tests/module_graph.rs` checks there is none).
//!
//! - [`sim`] — a simulated TCP terminal: the contract's requests, framed; the defaults the tools and the demo share
//!   (dialect, framing, merchant).
//! - [`scenario`] — scenario files for the terminal simulator: messages to send, codes to expect.
//! - [`dialsim`] — a Hayes modem emulator on a pseudo-terminal and a dial-up terminal that calls through it.
//! - [`load`] — the load generator (terminal connections, closed or open loop), its echo-server ceiling, and a
//!   delaying TCP proxy.
//! - [`procfs`] — CPU time and resident memory of processes from `/proc`: what a request costs each of them.
//! - [`capture`] — capture files of terminal traffic (text, one frame per line), written by the gateway and read by
//!   the replay.
//! - [`pcap`] — import of pcap and pcapng files: TCP streams of a port reassembled and cut into frames.
//! - [`plot`] — the load generator's SVG plot of latency and throughput over time (plotters).
//! - [`secure`] — TLS to terminal listeners and terminals' MAC keys for the tools (`--tls`, `--mac-key-file`).
//! - [`replay`] — replays a capture against a gateway (answers compared field by field) or the codec alone.

pub mod capture;
pub mod dialsim;
pub mod load;
pub mod pcap;
pub mod plot;
pub mod procfs;
pub mod replay;
pub mod scenario;
pub mod secure;
pub mod sim;
