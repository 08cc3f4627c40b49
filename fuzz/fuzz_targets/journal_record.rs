//! The gateway journal's decoder, as recovery and `pingate audit` read it, on any bytes: one record's JSON, and a
//! whole journal (the input as it is, and cut into frames with right checksums so that the records are reached).
//! Never panics; a record that decodes encodes and decodes to itself; a journal whose every frame holds a record
//! reads as those records, no tail.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pingate::gateway::journal::{decode, decode_record, encode_record};
use pingate::crypto::PinCipher;

fn cipher() -> &'static PinCipher {
    static C: OnceLock<PinCipher> = OnceLock::new();
    C.get_or_init(|| PinCipher::from_spec(&format!("1:{}", "42".repeat(32))).expect("a key"))
}

/// CRC-32 (IEEE), as the journal's frames carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fuzz_target!(|data: &[u8]| {
    let cipher = cipher();
    if let Ok(r) = decode_record(data, cipher) {
        let again = encode_record(&r, cipher).expect("a decoded record encodes");
        assert_eq!(decode_record(&again, cipher).expect("an encoded record decodes"), r);
    }
    let _ = decode(data, cipher);
    // Each line a frame's payload (far under the journal's cap on a record).
    let mut file = b"PGJ1".to_vec();
    let mut whole = true;
    let mut last = 0;
    for payload in data.split(|b| *b == b'\n') {
        whole &= decode_record(payload, cipher).is_ok();
        file.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32(payload).to_le_bytes());
        file.extend_from_slice(payload);
        last = 8 + payload.len();
    }
    match decode(&file, cipher) {
        Ok((records, torn)) => {
            assert!(whole, "a frame whose record does not decode was read");
            assert_eq!((records.len(), torn), (data.split(|b| *b == b'\n').count(), 0));
        }
        Err(_) => assert!(!whole, "a journal of whole records is refused"),
    }
    // Cut somewhere in its last frame: a torn tail.
    let _ = decode(&file[..file.len() - 1 - data.len() % last], cipher);
});
