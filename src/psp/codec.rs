//! PSP's one framing, for both sides: a 4-byte big-endian length, then that many bytes of body. Each direction has
//! its own cap (requests: [`MAX_REQUEST_FRAME`], or the server's larger `--max-frame`; answers:
//! [`MAX_ANSWER_FRAME`]), and each side reads with the cap of what it receives and writes with the cap of what it
//! sends. A tokio-util codec: bytes in, frames out, no I/O of its own.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{PspError, MAX_ANSWER_FRAME, MAX_REQUEST_FRAME};

/// Bytes of the length prefix.
const HEAD: usize = 4;

/// The length-prefix codec, with the cap of each direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCodec {
    /// Largest body decoded: a larger announced length is refused from its header.
    max_in: usize,
    /// Largest body encoded: a larger one is refused, and nothing written.
    max_out: usize,
}

impl FrameCodec {
    /// The server's: reads requests up to `max_request` (its `--max-frame`, at least [`MAX_REQUEST_FRAME`]), writes
    /// answers up to [`MAX_ANSWER_FRAME`].
    pub fn server(max_request: usize) -> FrameCodec {
        FrameCodec {
            max_in: max_request,
            max_out: MAX_ANSWER_FRAME,
        }
    }

    /// The gateway's: reads answers up to [`MAX_ANSWER_FRAME`], writes requests up to [`MAX_REQUEST_FRAME`].
    pub fn client() -> FrameCodec {
        FrameCodec {
            max_in: MAX_ANSWER_FRAME,
            max_out: MAX_REQUEST_FRAME,
        }
    }

    /// Whether a body of `len` bytes may be sent, checked before it is queued: refused at the encoder, it would
    /// fail the writer (and so the connection, under every request in flight on it).
    pub fn check_outgoing(&self, len: usize) -> Result<(), PspError> {
        if len > self.max_out {
            return Err(PspError::FrameTooLarge { len, max: self.max_out });
        }
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = PspError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, PspError> {
        let Some(head) = src.get(..HEAD) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
        // Refused from the header alone: no room is made for a body that will not be read.
        if len > self.max_in {
            return Err(PspError::FrameTooLarge { len, max: self.max_in });
        }
        if src.len() < HEAD + len {
            // The rest of a frame within the cap comes in one allocation rather than in doublings.
            src.reserve(HEAD + len - src.len());
            return Ok(None);
        }
        src.advance(HEAD);
        Ok(Some(src.split_to(len)))
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = PspError;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), PspError> {
        self.check_outgoing(body.len())?;
        dst.reserve(HEAD + body.len());
        // Within the cap, so within u32.
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize) -> BytesMut {
        BytesMut::from(&(len as u32).to_be_bytes()[..])
    }

    /// A frame one byte over the cap of what a side reads is refused from its header, with nothing allocated for
    /// it; one at the cap is read.
    fn reads_up_to(mut codec: FrameCodec, cap: usize) {
        let mut over = header(cap + 1);
        let room = over.capacity();
        match codec.decode(&mut over) {
            Err(PspError::FrameTooLarge { len, max }) => assert_eq!((len, max), (cap + 1, cap)),
            other => panic!("{other:?}"),
        }
        assert_eq!(over.capacity(), room, "room was made for a refused frame");
        let mut at = header(cap);
        assert!(codec.decode(&mut at).unwrap().is_none());
        at.extend_from_slice(&vec![b'x'; cap - 1]);
        assert!(codec.decode(&mut at).unwrap().is_none());
        at.put_u8(b'y');
        let body = codec.decode(&mut at).unwrap().expect("a whole frame");
        assert_eq!((body.len(), body.last()), (cap, Some(&b'y')));
        assert!(at.is_empty());
    }

    /// A body one byte over the cap of what a side writes is refused, and nothing is written; one at the cap is.
    fn writes_up_to(mut codec: FrameCodec, cap: usize) {
        let mut out = BytesMut::new();
        match codec.encode(Bytes::from(vec![0; cap + 1]), &mut out) {
            Err(PspError::FrameTooLarge { len, max }) => assert_eq!((len, max), (cap + 1, cap)),
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty());
        assert!(codec.check_outgoing(cap + 1).is_err() && codec.check_outgoing(cap).is_ok());
        codec.encode(Bytes::from(vec![7; cap]), &mut out).unwrap();
        assert_eq!(out.len(), HEAD + cap);
        assert_eq!(&out[..HEAD], &(cap as u32).to_be_bytes());
    }

    #[test]
    fn the_server_reads_requests_and_writes_answers_within_their_caps() {
        reads_up_to(FrameCodec::server(MAX_REQUEST_FRAME), MAX_REQUEST_FRAME);
        reads_up_to(FrameCodec::server(MAX_REQUEST_FRAME * 2), MAX_REQUEST_FRAME * 2);
        writes_up_to(FrameCodec::server(MAX_REQUEST_FRAME), MAX_ANSWER_FRAME);
    }

    #[test]
    fn the_client_reads_answers_and_writes_requests_within_their_caps() {
        reads_up_to(FrameCodec::client(), MAX_ANSWER_FRAME);
        writes_up_to(FrameCodec::client(), MAX_REQUEST_FRAME);
    }

    /// Frames back to back, split anywhere, come out whole and in order; what one side writes the other reads.
    #[test]
    fn frames_written_by_one_side_are_read_by_the_other() {
        let bodies: Vec<Bytes> = ["{}", "", "{\"id\":1,\"op\":\"ping\"}"]
            .into_iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect();
        let mut wire = BytesMut::new();
        for b in &bodies {
            FrameCodec::client().encode(b.clone(), &mut wire).unwrap();
        }
        let mut server = FrameCodec::server(MAX_REQUEST_FRAME);
        let mut buf = BytesMut::new();
        let mut read = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(frame) = server.decode(&mut buf).unwrap() {
                read.push(frame.freeze());
            }
        }
        assert_eq!(read, bodies);
    }
}
