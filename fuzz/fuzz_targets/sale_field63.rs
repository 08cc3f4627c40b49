//! Field 63 (PIN data TLV) parser: never panics; what parses re-encodes to text that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingate::sale::PinReceipt;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = PinReceipt::from_tlv(data) {
        if let Ok(t) = r.to_tlv() {
            assert_eq!(PinReceipt::from_tlv(t.as_bytes()).unwrap(), r);
        }
    }
});
