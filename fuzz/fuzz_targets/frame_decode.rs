//! Fuzz target: the terminal framings' decoder, every framing with and without TPDU. Never panics, never
//! allocates past its cap.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pingate::link::framing::{FrameCodec, Framing};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    for framing in [Framing::Binary2, Framing::Binary2Inclusive, Framing::Ascii4, Framing::Bcd2] {
        for tpdu in [false, true] {
            let mut codec = FrameCodec::new(framing, tpdu, 1024);
            let mut buf = BytesMut::from(data);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            assert!(buf.capacity() <= data.len().max(1024 + 8) * 2);
        }
    }
});
