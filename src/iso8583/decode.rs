//! Decoding with nom streaming parsers: a message that stops early is `Incomplete`, never an error, until the
//! caller says the buffer is the whole message.

use bytes::{Bytes, BytesMut};
use nom::error::{ErrorKind, ParseError};
use nom::{Err as NomErr, IResult, Needed};

use super::charset::{hex_value, EBCDIC_TO_ASCII};
use super::error::{CodecError, FieldRef, Found};
use super::message::{Message, Mti};
use super::spec::{Class, Dialect, Encoding, FieldSpec, HeaderEncoding, Mask, Pad, PrefixEncoding, Var};

/// nom's error slot. Our parsers fail only through [`CodecError`]s they build themselves.
#[derive(Debug)]
pub(crate) struct PErr(pub CodecError);

impl<'a> ParseError<&'a [u8]> for PErr {
    fn from_error_kind(input: &'a [u8], kind: ErrorKind) -> Self {
        PErr(CodecError::Json(format!(
            "internal parser error {kind:?} with {} bytes left",
            input.len()
        )))
    }
    fn append(_: &'a [u8], _: ErrorKind, other: Self) -> Self {
        other
    }
}

type PResult<'a, T> = IResult<&'a [u8], T, PErr>;

fn fail<T>(e: CodecError) -> Result<T, NomErr<PErr>> {
    Err(NomErr::Failure(PErr(e)))
}

/// Where the decoder is, to name offsets and fields in errors.
struct Cursor<'a> {
    whole: &'a [u8],
}

impl Cursor<'_> {
    #[inline]
    fn offset(&self, rest: &[u8]) -> usize {
        self.whole.len() - rest.len()
    }
}

/// Result of the core decoder: a message and the bytes it used, or how many more bytes the part at `at` needs.
enum Step {
    Done(Message, usize),
    Incomplete {
        at: FieldRef,
        offset: usize,
        needed: usize,
        available: usize,
    },
}

impl Dialect {
    /// Decodes one whole message. Strict: trailing bytes are an error, and so is a message cut short.
    pub fn decode(&self, buf: &Bytes) -> Result<Message, CodecError> {
        match self.decode_inner(buf)? {
            Step::Done(m, used) if used == buf.len() => Ok(m),
            Step::Done(_, used) => Err(CodecError::TrailingBytes {
                offset: used,
                count: buf.len() - used,
            }),
            Step::Incomplete {
                at,
                offset,
                needed,
                available,
            } => Err(CodecError::Truncated {
                at,
                offset,
                needed,
                available,
            }),
        }
    }

    /// Decodes a message from the start of a buffer that may hold only part of it (or more than it):
    /// `Ok(None)` means "need more bytes"; otherwise the message and how many bytes it took.
    pub fn decode_streaming(&self, buf: &Bytes) -> Result<Option<(Message, usize)>, CodecError> {
        match self.decode_inner(buf)? {
            Step::Done(m, used) => Ok(Some((m, used))),
            Step::Incomplete { .. } => Ok(None),
        }
    }

    /// The MTI at the start of a message that may not decode as a whole: enough to answer a broken request with a
    /// format error.
    pub fn peek_mti(&self, buf: &[u8]) -> Option<Mti> {
        parse_mti(self.mti, buf).ok().map(|(_, m)| m)
    }

    fn decode_inner(&self, buf: &Bytes) -> Result<Step, CodecError> {
        let cur = Cursor { whole: buf };
        let mut rest: &[u8] = buf;
        // Where the part being parsed starts, and which part it is, for Incomplete.
        let mut at = FieldRef::Mti;
        let mut start = 0usize;
        macro_rules! run {
            ($e:expr) => {
                match $e {
                    Ok((r, v)) => {
                        rest = r;
                        v
                    }
                    Err(NomErr::Incomplete(n)) => {
                        let missing = match n {
                            Needed::Size(s) => s.get(),
                            Needed::Unknown => 1,
                        };
                        // Parts are contiguous up to the end of the buffer: the part needs all that is left
                        // from its start plus what nom says is missing.
                        let available = buf.len() - start;
                        return Ok(Step::Incomplete { at, offset: start, needed: available + missing, available });
                    }
                    Err(NomErr::Error(PErr(e)) | NomErr::Failure(PErr(e))) => return Err(e),
                }
            };
        }

        let mti = run!(parse_mti(self.mti, rest));
        at = FieldRef::Bitmap;
        start = cur.offset(rest);
        let present = run!(parse_bitmap(self.bitmap, rest, start));

        let mut msg = Message::with_capacity(mti, (present.count_ones() as usize).max(1));
        msg.set_masks(self.mask_pan, self.mask_full);
        let mut scratch = BytesMut::new();
        // Field 1 is the secondary bitmap's presence bit, already consumed.
        let mut bits = present & !1u128;
        while bits != 0 {
            let n = (bits.trailing_zeros() + 1) as u8;
            bits &= bits - 1;
            at = FieldRef::Field(n);
            start = cur.offset(rest);
            let Some(spec) = self.field(n) else {
                return Err(CodecError::UndefinedField {
                    at,
                    offset: start,
                    dialect: self.name.clone(),
                });
            };
            let (units, data) = run!(parse_field(spec, rest, start));
            let data_offset = cur.offset(rest) - data.len();
            let value = field_value(spec, buf, data, data_offset, units, &mut scratch)?;
            msg.push_ordered(n, value);
        }
        Ok(Step::Done(msg, cur.offset(rest)))
    }
}

#[inline]
fn take(n: usize, input: &[u8]) -> PResult<'_, &[u8]> {
    nom::bytes::streaming::take(n)(input)
}

fn parse_mti(enc: HeaderEncoding, input: &[u8]) -> PResult<'_, Mti> {
    let bad = |i: usize, b: u8| {
        fail(CodecError::InvalidContent {
            at: FieldRef::Mti,
            expected: "4 digits".into(),
            offset: 0,
            bad_offset: i,
            found: Found(Some(b)),
        })
    };
    match enc {
        HeaderEncoding::Bcd => {
            let (rest, b) = take(2, input)?;
            let mut d = [0u8; 4];
            for (i, nib) in [b[0] >> 4, b[0] & 0xF, b[1] >> 4, b[1] & 0xF].into_iter().enumerate() {
                if nib > 9 {
                    return bad(i / 2, b[i / 2]);
                }
                d[i] = b'0' + nib;
            }
            Ok((rest, Mti(d)))
        }
        HeaderEncoding::Ebcdic => {
            let (rest, b) = take(4, input)?;
            let mut d = [0u8; 4];
            for i in 0..4 {
                if !(0xF0..=0xF9).contains(&b[i]) {
                    return bad(i, b[i]);
                }
                d[i] = b[i] - 0xC0;
            }
            Ok((rest, Mti(d)))
        }
        _ => {
            let (rest, b) = take(4, input)?;
            if let Some(i) = b.iter().position(|c| !c.is_ascii_digit()) {
                return bad(i, b[i]);
            }
            Ok((rest, Mti([b[0], b[1], b[2], b[3]])))
        }
    }
}

/// Reads 64 bits of bitmap; returns them with bit 0 = the first field of the bitmap.
fn bitmap64(enc: HeaderEncoding, input: &[u8], offset: usize) -> PResult<'_, u64> {
    match enc {
        HeaderEncoding::Hex => {
            let (rest, b) = take(16, input)?;
            let mut v = 0u64;
            for (i, &c) in b.iter().enumerate() {
                let Some(h) = hex_value(c) else {
                    return fail(CodecError::InvalidContent {
                        at: FieldRef::Bitmap,
                        expected: "16 hex digits".into(),
                        offset,
                        bad_offset: offset + i,
                        found: Found(Some(c)),
                    });
                };
                v = v << 4 | u64::from(h);
            }
            Ok((rest, v.reverse_bits()))
        }
        _ => {
            let (rest, b) = take(8, input)?;
            let v = u64::from_be_bytes(b.try_into().expect("took 8"));
            Ok((rest, v.reverse_bits()))
        }
    }
}

fn parse_bitmap(enc: HeaderEncoding, input: &[u8], offset: usize) -> PResult<'_, u128> {
    let (rest, primary) = bitmap64(enc, input, offset)?;
    if primary & 1 == 0 {
        return Ok((rest, u128::from(primary)));
    }
    let (rest, secondary) = bitmap64(enc, rest, offset + (input.len() - rest.len()))?;
    Ok((rest, u128::from(primary) | u128::from(secondary) << 64))
}

/// Reads the prefix (if any) and the data of one field: (length in units, data bytes as on the wire).
#[inline]
fn parse_field<'a>(spec: &FieldSpec, input: &'a [u8], offset: usize) -> PResult<'a, (usize, &'a [u8])> {
    let (rest, units) = if spec.var == Var::Fixed {
        (input, spec.length)
    } else {
        let (rest, p) = take(spec.prefix_bytes(), input)?;
        let units = prefix_value(spec, p, offset).map_err(|e| NomErr::Failure(PErr(e)))?;
        if units > spec.length || (spec.class == Class::SignedAmount && units < 2) {
            return fail(CodecError::LengthOutOfBounds {
                at: FieldRef::Field(spec.number),
                offset,
                length: units,
                allowed: format!(
                    "{}..={}",
                    if spec.class == Class::SignedAmount { 2 } else { 0 },
                    spec.length
                ),
            });
        }
        (rest, units)
    };
    let (rest, data) = take(spec.data_bytes(units), rest)?;
    Ok((rest, (units, data)))
}

fn prefix_value(spec: &FieldSpec, p: &[u8], offset: usize) -> Result<usize, CodecError> {
    let bad = |expected: &'static str, b: u8| CodecError::BadLengthPrefix {
        at: FieldRef::Field(spec.number),
        offset,
        expected,
        found: Found(Some(b)),
    };
    let mut v = 0usize;
    match spec.prefix {
        PrefixEncoding::Ascii => {
            for &c in p {
                if !c.is_ascii_digit() {
                    return Err(bad("ASCII digits", c));
                }
                v = v * 10 + usize::from(c - b'0');
            }
        }
        PrefixEncoding::Ebcdic => {
            for &c in p {
                if !(0xF0..=0xF9).contains(&c) {
                    return Err(bad("EBCDIC digits", c));
                }
                v = v * 10 + usize::from(c - 0xF0);
            }
        }
        PrefixEncoding::Bcd => {
            for &c in p {
                if c >> 4 > 9 || c & 0xF > 9 {
                    return Err(bad("BCD digits", c));
                }
                v = v * 100 + usize::from(c >> 4) * 10 + usize::from(c & 0xF);
            }
        }
        PrefixEncoding::Binary => {
            for &c in p {
                v = v << 8 | usize::from(c);
            }
        }
    }
    Ok(v)
}

/// Turns a field's wire bytes into its content, checking the content class.
#[inline]
fn field_value(
    spec: &FieldSpec,
    buf: &Bytes,
    data: &[u8],
    offset: usize,
    units: usize,
    scratch: &mut BytesMut,
) -> Result<Bytes, CodecError> {
    let at = FieldRef::Field(spec.number);
    let found = |b: u8| Found(if spec.mask == Mask::None { Some(b) } else { None });
    let invalid = |i: usize, b: u8| CodecError::InvalidContent {
        at,
        expected: spec.class.describe(units),
        offset,
        bad_offset: offset + i,
        found: found(b),
    };
    let check_text = |text: &[u8]| -> Result<(), CodecError> {
        if spec.class == Class::SignedAmount {
            if let Some(&s) = text.first() {
                if s != b'C' && s != b'D' {
                    return Err(invalid(0, s));
                }
            }
            if let Some(i) = text.iter().skip(1).position(|c| !c.is_ascii_digit()) {
                return Err(invalid(i + 1, text[i + 1]));
            }
            return Ok(());
        }
        match text.iter().position(|&c| !spec.class.allows(c)) {
            Some(i) => Err(invalid(i, text[i])),
            None => Ok(()),
        }
    };
    let reserve = |scratch: &mut BytesMut, n: usize| {
        if scratch.capacity() < n {
            // One buffer for every converted field of the message: BCD at most doubles the remaining bytes.
            scratch.reserve((buf.len() * 2).max(n));
        }
    };
    match spec.encoding {
        Encoding::Ascii => {
            check_text(data)?;
            Ok(buf.slice(offset..offset + data.len()))
        }
        Encoding::Binary => Ok(buf.slice(offset..offset + data.len())),
        Encoding::Ebcdic => {
            reserve(scratch, data.len());
            for (i, &e) in data.iter().enumerate() {
                let a = EBCDIC_TO_ASCII[e as usize];
                if a == 0 {
                    return Err(CodecError::InvalidContent {
                        at,
                        expected: format!("{} in EBCDIC", spec.class.describe(units)),
                        offset,
                        bad_offset: offset + i,
                        found: found(e),
                    });
                }
                scratch.extend_from_slice(&[a]);
            }
            let text = scratch.split().freeze();
            check_text(&text)?;
            Ok(text)
        }
        Encoding::Hex => {
            reserve(scratch, units);
            for (i, pair) in data.chunks_exact(2).enumerate() {
                match (hex_value(pair[0]), hex_value(pair[1])) {
                    (Some(h), Some(l)) => scratch.extend_from_slice(&[h << 4 | l]),
                    (h, _) => {
                        let j = if h.is_none() { 0 } else { 1 };
                        return Err(CodecError::InvalidContent {
                            at,
                            expected: format!("{} hex digits", units * 2),
                            offset,
                            bad_offset: offset + i * 2 + j,
                            found: found(pair[j]),
                        });
                    }
                }
            }
            Ok(scratch.split().freeze())
        }
        Encoding::Bcd => {
            reserve(scratch, units);
            let (digits, packed, skip) = if spec.class == Class::SignedAmount {
                let s = data[0];
                if s != b'C' && s != b'D' {
                    return Err(invalid(0, s));
                }
                scratch.extend_from_slice(&[s]);
                (units - 1, &data[1..], 1)
            } else {
                (units, data, 0)
            };
            let odd = digits % 2 == 1;
            let left = matches!(spec.pad, Pad::Left | Pad::LeftF);
            let track = spec.class == Class::Track;
            let nibbles = packed.iter().flat_map(|b| [b >> 4, b & 0xF]);
            for (i, nib) in nibbles.enumerate() {
                let is_pad = odd && ((left && i == 0) || (!left && i == digits));
                let byte_at = skip + i / 2;
                if is_pad {
                    if nib != 0 && nib != 0xF {
                        return Err(CodecError::InvalidContent {
                            at,
                            expected: format!("a 0 or F filler nibble before {}", spec.class.describe(units)),
                            offset,
                            bad_offset: offset + byte_at,
                            found: found(data[byte_at]),
                        });
                    }
                    continue;
                }
                let c = match nib {
                    0..=9 => b'0' + nib,
                    0xD if track => b'=',
                    _ => {
                        return Err(CodecError::InvalidContent {
                            at,
                            expected: format!("{} packed as BCD", spec.class.describe(units)),
                            offset,
                            bad_offset: offset + byte_at,
                            found: found(data[byte_at]),
                        })
                    }
                };
                scratch.extend_from_slice(&[c]);
            }
            Ok(scratch.split().freeze())
        }
    }
}
