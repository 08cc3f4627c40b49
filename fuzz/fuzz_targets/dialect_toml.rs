//! Dialect file loader: any text gives a dialect or a `DialectError`, never a panic; a loaded dialect decodes
//! its own encodings of an empty message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingate::iso8583::{Dialect, Message, Mti};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = Dialect::from_toml(text, "fuzz.toml") {
        let m = Message::new(Mti::SALE);
        let b = d.encode(&m).unwrap();
        assert_eq!(d.decode(&b.freeze()).unwrap(), m);
    }
});
