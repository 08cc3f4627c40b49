//! Fuzz target: capture files (text) and pcap/pcapng import. Neither panics; a capture that parses writes text that
//! parses again to the same frames.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pingate::traffic::capture::{Capture, PinPolicy};
use pingate::iso8583::Dialects;
use pingate::link::framing::Framing;
use pingate::traffic::pcap::{import, ImportOptions};

fn dialects() -> &'static Dialects {
    static D: OnceLock<Dialects> = OnceLock::new();
    D.get_or_init(Dialects::builtin)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Capture::parse(text) {
            let again = Capture::parse(&c.to_text()).expect("written text parses");
            assert_eq!(again.records.len(), c.records.len());
            for (a, b) in again.records.iter().zip(&c.records) {
                assert_eq!((&a.data, a.dir, a.conn), (&b.data, b.dir, b.conn));
            }
        }
    }
    let d = dialects().get("iso87-ascii-binbitmap").expect("builtin");
    for (framing, tpdu) in [(Framing::Binary2, false), (Framing::Bcd2, true)] {
        let opts = ImportOptions {
            port: 9000,
            framing,
            tpdu,
            max_frame: 4096,
            pins: PinPolicy::Masked,
            pin_at: Vec::new(),
        };
        let _ = import(data, d, "iso87-ascii-binbitmap", &opts);
    }
});
