//! Terminal-side transport cores, no I/O: the length framings and TPDU that TCP terminals and network access
//! controllers put around ISO 8583 messages ([`framing`]). The dial-up STX/ETX link and the modem controller will
//! join them here.

pub mod framing;
