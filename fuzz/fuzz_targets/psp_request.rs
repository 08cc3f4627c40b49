//! The PIN server's request parser (and the gateway's response parser) on any body: never panics; the one-pass
//! parse accepts exactly what the strict slow one does, with the same request; and an accepted request, written
//! again, parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingate::psp::{parse_request, parse_request_slow, parse_response};

fuzz_target!(|data: &[u8]| {
    let fast = parse_request(data);
    match (&fast, parse_request_slow(data)) {
        (Ok(a), Ok(b)) => assert_eq!(*a, b, "the two parses read different requests"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("the two parses disagree: {a:?} / {b:?}"),
    }
    if let Ok(frame) = fast {
        let again = serde_json::to_vec(&frame).expect("a request serialises");
        assert_eq!(parse_request(&again).expect("a written request parses"), frame);
    }
    let _ = parse_response(data);
});
