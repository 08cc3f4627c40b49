//! Property tests of the terminal framings: whatever the framing, TPDU or not, and however the bytes are cut up by
//! the network, the frames come out as they went in; random bytes never panic.

use bytes::{Bytes, BytesMut};
use pingate::link::framing::{Frame, FrameCodec, Framing, Tpdu};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn framing() -> impl Strategy<Value = Framing> {
    prop::sample::select(vec![
        Framing::Binary2,
        Framing::Binary2Inclusive,
        Framing::Ascii4,
        Framing::Bcd2,
    ])
}

proptest! {
    #[test]
    fn frames_survive_any_chunking(
        framing in framing(),
        tpdu in any::<bool>(),
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..8),
        cuts in proptest::collection::vec(1usize..64, 1..50),
        addr in any::<[u8; 4]>(),
    ) {
        let mut codec = FrameCodec::new(framing, tpdu, 4096);
        let t = tpdu.then_some(Tpdu { id: 0x60, destination: [addr[0], addr[1]], source: [addr[2], addr[3]] });
        let frames: Vec<Frame> = messages.into_iter().map(|m| Frame { tpdu: t, message: Bytes::from(m) }).collect();
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f.clone(), &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(framing in framing(), tpdu in any::<bool>(), bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut codec = FrameCodec::new(framing, tpdu, 256);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }
}
