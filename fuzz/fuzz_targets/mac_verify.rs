//! The MAC path a listener that requires MACs runs on every request, without I/O: a frame in any shipped dialect (the
//! first byte picks it) decoded, its MAC checked under a DES and an AES key (`pingate::mac::verify_request`), and an
//! answer signed in place (`sign_answer`) from the same bytes. Never panics; whatever decoded and was signed decodes
//! again and verifies under the key that signed it.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pingate::iso8583::Dialects;
use pingate::mac::{sign_answer, verify_request, MacAlgorithm, MacKey};

static DIALECTS: std::sync::OnceLock<Dialects> = std::sync::OnceLock::new();
static KEYS: std::sync::OnceLock<[MacKey; 2]> = std::sync::OnceLock::new();

const NAMES: [&str; 4] = ["iso87-ascii", "iso87-ascii-binbitmap", "iso87-bcd", "iso87-ebcdic"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, frame)) = data.split_first() else {
        return;
    };
    let d = DIALECTS
        .get_or_init(Dialects::builtin)
        .get(NAMES[pick as usize % NAMES.len()])
        .unwrap();
    let keys = KEYS.get_or_init(|| {
        [
            MacKey::from_hex(MacAlgorithm::RetailDes, "0123456789ABCDEFFEDCBA9876543210").unwrap(),
            MacKey::from_hex(MacAlgorithm::AesCmac, "2B7E151628AED2A6ABF7158809CF4F3C").unwrap(),
        ]
    });
    let key = &keys[(pick as usize / NAMES.len()) % 2];
    let raw = Bytes::copy_from_slice(frame);
    let decoded = d.decode(&raw).ok();
    if let Some(msg) = &decoded {
        let _ = verify_request(d, &raw, msg, key);
    }
    let mut answer = BytesMut::from(frame);
    if sign_answer(d, &mut answer, key).is_ok() && decoded.is_some() {
        let signed = answer.freeze();
        let msg = d.decode(&signed).expect("a message signed in place still decodes");
        verify_request(d, &signed, &msg, key).expect("what was signed verifies");
    }
});
