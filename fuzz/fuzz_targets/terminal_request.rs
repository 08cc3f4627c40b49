//! A terminal's request end to end through the contract, without I/O: decode (the gateway's default dialect),
//! read it as a sale, reversal or network request, build the answer the gateway would send, and encode it. Never
//! panics, and every answer encodes and decodes again.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pingate::iso8583::Dialects;
use pingate::sale::{answer, sale_answer, ResponseCode, TerminalRequest};

static DIALECTS: std::sync::OnceLock<Dialects> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let d = DIALECTS
        .get_or_init(Dialects::builtin)
        .get("iso87-ascii-binbitmap")
        .unwrap();
    let Ok(msg) = d.decode(&Bytes::copy_from_slice(data)) else {
        // What the listener does with an undecodable frame: peek at the MTI.
        let _ = d.peek_mti(data);
        return;
    };
    // Received 2026-11-28 17:35:00 UTC: field 7 is bound to that year.
    let reply = match TerminalRequest::parse(&msg, 1_795_887_300) {
        Err(refusal) => answer(&msg, refusal.code),
        Ok(TerminalRequest::Sale(s)) => {
            let rrn = pingate::gateway::rrn_of(&s.key);
            sale_answer(&msg, &rrn, Err(ResponseCode::OutOfStock)).unwrap()
        }
        Ok(_) => answer(&msg, ResponseCode::Approved),
    };
    // Echoed fields came from a decoded message: the answer must encode (the gateway logs and drops otherwise).
    if let Ok(bytes) = d.encode(&reply) {
        d.decode(&bytes.freeze()).expect("an encoded answer decodes");
    }
});
