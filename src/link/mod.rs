//! Terminal-side transport cores, no I/O: the length framings and TPDU that TCP terminals and network access
//! controllers put around ISO 8583 messages ([`framing`]), the dial-up `STX data ETX LRC` link ([`dialup`]), the
//! Hayes modem controller ([`modem`]) and software parity for 7-bit lines ([`parity`]).

pub mod dialup;
pub mod framing;
pub mod modem;
pub mod parity;
