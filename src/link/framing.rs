//! Length-prefixed framing of terminal traffic, as tokio-util codecs: a length header (four kinds), optionally a
//! 5-byte TPDU, then the ISO 8583 message. The length header and TPDU belong to the transport: the message codec
//! never sees them. Decoding follows tokio-util's conventions: `Ok(None)` means "need more bytes", and the length is
//! checked against a hard cap before anything is allocated. A zero-length frame is a keep-alive (the connection
//! echoes it).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nom::{Err as NomErr, IResult, Needed};
use serde::Deserialize;
use tokio_util::codec::{Decoder, Encoder};

/// The length headers in use (jPOS channel names in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// 2-byte big-endian length, excluding itself (NACChannel, PostChannel).
    Binary2,
    /// 2-byte big-endian length, including itself (AmexChannel).
    Binary2Inclusive,
    /// 4 ASCII decimal digits, excluding themselves (ASCIIChannel).
    Ascii4,
    /// 2-byte BCD length, excluding itself (BCD/NCC channels).
    Bcd2,
}

impl std::str::FromStr for Framing {
    type Err = String;

    /// The names used in configuration files and on command lines.
    fn from_str(s: &str) -> Result<Framing, String> {
        Ok(match s {
            "binary2" => Framing::Binary2,
            "binary2-inclusive" => Framing::Binary2Inclusive,
            "ascii4" => Framing::Ascii4,
            "bcd2" => Framing::Bcd2,
            _ => {
                return Err(format!(
                    "unknown framing `{s}` (binary2, binary2-inclusive, ascii4, bcd2)"
                ))
            }
        })
    }
}

impl Framing {
    /// The name [`FromStr`](std::str::FromStr) reads.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Binary2 => "binary2",
            Framing::Binary2Inclusive => "binary2-inclusive",
            Framing::Ascii4 => "ascii4",
            Framing::Bcd2 => "bcd2",
        }
    }

    /// Bytes of the header.
    pub fn header_len(self) -> usize {
        match self {
            Framing::Ascii4 => 4,
            _ => 2,
        }
    }

    /// The largest length the header can express.
    pub fn max_len(self) -> usize {
        match self {
            Framing::Binary2 => 0xFFFF,
            Framing::Binary2Inclusive => 0xFFFF - 2,
            Framing::Ascii4 | Framing::Bcd2 => 9_999,
        }
    }
}

/// Errors of the framing layer. After one, the byte stream cannot be trusted: the connection closes.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A header announces more than the configured cap (checked before allocating).
    #[error("frame of {length} bytes announced, the cap is {max}")]
    TooLarge { length: usize, max: usize },
    /// A header byte that is not valid for the framing (e.g. a letter in an ASCII length).
    #[error("length header byte {offset} is 0x{found:02X}, expected {expected}")]
    BadHeader {
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    /// An inclusive length smaller than the header itself.
    #[error("inclusive length {length} is smaller than its own 2 bytes")]
    InclusiveTooSmall { length: usize },
    /// A frame too short to hold the TPDU the line is configured with.
    #[error("frame of {length} bytes cannot hold a 5-byte TPDU")]
    ShortTpdu { length: usize },
    /// A message given to the encoder that the header cannot express.
    #[error("message of {length} bytes does not fit the {framing:?} header (at most {max})")]
    Unencodable {
        length: usize,
        framing: Framing,
        max: usize,
    },
}

/// Transport protocol data unit: `0x60`, destination NII, source NII. Answers go back with the two swapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tpdu {
    pub id: u8,
    pub destination: [u8; 2],
    pub source: [u8; 2],
}

impl std::str::FromStr for Tpdu {
    type Err = String;

    /// 10 hex digits (`6000030001`).
    fn from_str(h: &str) -> Result<Tpdu, String> {
        Tpdu::from_hex(h)
    }
}

impl Tpdu {
    /// A TPDU written as 10 hex digits (`6000030001`).
    pub fn from_hex(h: &str) -> Result<Tpdu, String> {
        let b = crate::iso8583::from_hex(h).map_err(|_| format!("TPDU `{h}` is not hex"))?;
        let b: [u8; 5] = b
            .try_into()
            .map_err(|_| format!("TPDU `{h}`: 5 bytes (10 hex digits)"))?;
        Ok(Tpdu::parse(b))
    }

    pub fn parse(b: [u8; 5]) -> Tpdu {
        Tpdu {
            id: b[0],
            destination: [b[1], b[2]],
            source: [b[3], b[4]],
        }
    }
    pub fn bytes(&self) -> [u8; 5] {
        [
            self.id,
            self.destination[0],
            self.destination[1],
            self.source[0],
            self.source[1],
        ]
    }
    /// The TPDU of the answer: addresses swapped.
    pub fn reply(&self) -> Tpdu {
        Tpdu {
            id: self.id,
            destination: self.source,
            source: self.destination,
        }
    }
}

/// One frame: the TPDU if the line carries one, and the message (empty for a keep-alive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tpdu: Option<Tpdu>,
    pub message: Bytes,
}

impl Frame {
    pub fn is_keepalive(&self) -> bool {
        self.tpdu.is_none() && self.message.is_empty()
    }
}

/// The codec of one terminal line or listener.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    pub framing: Framing,
    pub tpdu: bool,
    /// Hard cap on a frame's length (TPDU included).
    pub max_frame: usize,
}

impl FrameCodec {
    pub fn new(framing: Framing, tpdu: bool, max_frame: usize) -> FrameCodec {
        FrameCodec {
            framing,
            tpdu,
            max_frame: max_frame.min(framing.max_len()),
        }
    }
}

/// Parses a header with nom: `Incomplete` while bytes are missing, never an error for that.
fn header(framing: Framing, input: &[u8]) -> IResult<&[u8], Result<usize, FramingError>> {
    let (rest, h) = nom::bytes::streaming::take(framing.header_len())(input)?;
    let bad = |offset: usize, expected| {
        Err(FramingError::BadHeader {
            offset,
            found: h[offset],
            expected,
        })
    };
    let len = match framing {
        Framing::Binary2 => usize::from(u16::from_be_bytes([h[0], h[1]])),
        Framing::Binary2Inclusive => {
            let l = usize::from(u16::from_be_bytes([h[0], h[1]]));
            // Zero is a keep-alive in every framing; otherwise the length counts its own 2 bytes.
            match l {
                0 => 0,
                1 => return Ok((rest, Err(FramingError::InclusiveTooSmall { length: l }))),
                _ => l - 2,
            }
        }
        Framing::Ascii4 => {
            let mut v = 0;
            for (i, &c) in h.iter().enumerate() {
                if !c.is_ascii_digit() {
                    return Ok((rest, bad(i, "an ASCII digit")));
                }
                v = v * 10 + usize::from(c - b'0');
            }
            v
        }
        Framing::Bcd2 => {
            let mut v = 0;
            for (i, &c) in h.iter().enumerate() {
                if c >> 4 > 9 || c & 0xF > 9 {
                    return Ok((rest, bad(i, "two BCD digits")));
                }
                v = v * 100 + usize::from(c >> 4) * 10 + usize::from(c & 0xF);
            }
            v
        }
    };
    Ok((rest, Ok(len)))
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FramingError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FramingError> {
        let len = match header(self.framing, src) {
            Err(NomErr::Incomplete(Needed::Size(_) | Needed::Unknown)) => return Ok(None),
            Err(_) => unreachable!("the header parser only fails as Incomplete"),
            Ok((_, r)) => r?,
        };
        if len > self.max_frame {
            return Err(FramingError::TooLarge {
                length: len,
                max: self.max_frame,
            });
        }
        let total = self.framing.header_len() + len;
        if src.len() < total {
            // Room for the rest of this frame only (the cap above bounds it).
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(self.framing.header_len());
        let mut body = src.split_to(len).freeze();
        if len == 0 {
            return Ok(Some(Frame {
                tpdu: None,
                message: body,
            }));
        }
        let tpdu = if self.tpdu {
            if len < 5 {
                return Err(FramingError::ShortTpdu { length: len });
            }
            let t = Tpdu::parse(body[..5].try_into().expect("5 bytes"));
            body.advance(5);
            Some(t)
        } else {
            None
        };
        Ok(Some(Frame { tpdu, message: body }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FramingError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FramingError> {
        let len = frame.message.len() + if frame.tpdu.is_some() { 5 } else { 0 };
        let max = self.framing.max_len();
        if len > max {
            return Err(FramingError::Unencodable {
                length: len,
                framing: self.framing,
                max,
            });
        }
        dst.reserve(self.framing.header_len() + len);
        match self.framing {
            Framing::Binary2 => dst.put_u16(len as u16),
            Framing::Binary2Inclusive => dst.put_u16(if len == 0 { 0 } else { len as u16 + 2 }),
            Framing::Ascii4 => dst.put_slice(format!("{len:04}").as_bytes()),
            Framing::Bcd2 => {
                let d = |n: usize| (n % 10) as u8;
                dst.put_u8(d(len / 1000) << 4 | d(len / 100));
                dst.put_u8(d(len / 10) << 4 | d(len));
            }
        }
        if let Some(t) = frame.tpdu {
            dst.put_slice(&t.bytes());
        }
        dst.put_slice(&frame.message);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TPDU: Tpdu = Tpdu {
        id: 0x60,
        destination: [0x00, 0x03],
        source: [0x00, 0x01],
    };

    fn msg26() -> Bytes {
        Bytes::from((0..26u8).collect::<Vec<_>>())
    }

    /// The header examples of `../shared/reference/terminal-side.md`: a 26-byte message behind a TPDU (31 bytes).
    #[test]
    fn headers_as_the_reference_writes_them() {
        for (framing, header) in [
            (Framing::Binary2, &[0x00, 0x1f][..]),
            (Framing::Bcd2, &[0x00, 0x31][..]),
            (Framing::Ascii4, &b"0031"[..]),
            (Framing::Binary2Inclusive, &[0x00, 0x21][..]),
        ] {
            let mut c = FrameCodec::new(framing, true, 4096);
            let mut out = BytesMut::new();
            c.encode(
                Frame {
                    tpdu: Some(TPDU),
                    message: msg26(),
                },
                &mut out,
            )
            .unwrap();
            assert_eq!(&out[..header.len()], header, "{framing:?}");
            assert_eq!(&out[header.len()..header.len() + 5], &[0x60, 0x00, 0x03, 0x00, 0x01]);
            let f = c.decode(&mut out).unwrap().unwrap();
            assert_eq!(
                f,
                Frame {
                    tpdu: Some(TPDU),
                    message: msg26()
                }
            );
            assert!(out.is_empty());
        }
        assert_eq!(TPDU.reply().bytes(), [0x60, 0x00, 0x01, 0x00, 0x03]);
    }

    #[test]
    fn partial_input_needs_more_bytes_and_keepalives_are_frames() {
        let mut c = FrameCodec::new(Framing::Ascii4, false, 4096);
        let mut out = BytesMut::new();
        c.encode(
            Frame {
                tpdu: None,
                message: msg26(),
            },
            &mut out,
        )
        .unwrap();
        c.encode(
            Frame {
                tpdu: None,
                message: Bytes::new(),
            },
            &mut out,
        )
        .unwrap();
        let whole = out.clone();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.put_u8(*b);
            while let Some(f) = c.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(got[1].is_keepalive());
        assert_eq!(got[0].message, msg26());
    }

    #[test]
    fn bad_headers_and_the_cap() {
        let mut c = FrameCodec::new(Framing::Ascii4, false, 100);
        let e = c.decode(&mut BytesMut::from(&b"00x1abc"[..])).unwrap_err();
        assert_eq!(e.to_string(), "length header byte 2 is 0x78, expected an ASCII digit");
        // The cap is checked on the header alone: nothing is allocated for a huge announcement.
        let mut huge = BytesMut::from(&b"9999"[..]);
        let e = c.decode(&mut huge).unwrap_err();
        assert_eq!(e.to_string(), "frame of 9999 bytes announced, the cap is 100");
        assert!(huge.capacity() < 100);
        let mut c = FrameCodec::new(Framing::Bcd2, false, 100);
        assert!(matches!(
            c.decode(&mut BytesMut::from(&[0x0A, 0x00][..])),
            Err(FramingError::BadHeader { offset: 0, .. })
        ));
        let mut c = FrameCodec::new(Framing::Binary2, true, 100);
        assert!(matches!(
            c.decode(&mut BytesMut::from(&[0x00, 0x03, 1, 2, 3][..])),
            Err(FramingError::ShortTpdu { length: 3 })
        ));
        let mut c = FrameCodec::new(Framing::Binary2Inclusive, false, 100);
        assert!(matches!(
            c.decode(&mut BytesMut::from(&[0x00, 0x01][..])),
            Err(FramingError::InclusiveTooSmall { .. })
        ));
        let mut c = FrameCodec::new(Framing::Ascii4, false, 100_000);
        let e = c
            .encode(
                Frame {
                    tpdu: None,
                    message: Bytes::from(vec![0; 10_000]),
                },
                &mut BytesMut::new(),
            )
            .unwrap_err();
        assert!(matches!(
            e,
            FramingError::Unencodable {
                length: 10_000,
                max: 9_999,
                ..
            }
        ));
    }
}
