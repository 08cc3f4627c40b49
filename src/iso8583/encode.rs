//! Encoding into `BytesMut`: every value is checked against its field definition first, so what we send is always
//! something we would accept.

use bytes::{BufMut, BytesMut};

use super::charset::{push_hex, ASCII_TO_EBCDIC};
use super::error::{CodecError, FieldRef};
use super::message::Message;
use super::spec::{Class, Dialect, Encoding, FieldSpec, HeaderEncoding, Pad, PrefixEncoding, Var};

impl Dialect {
    /// Encodes a message into a new buffer.
    pub fn encode(&self, msg: &Message) -> Result<BytesMut, CodecError> {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint(msg));
        self.encode_into(msg, &mut out)?;
        Ok(out)
    }

    fn encoded_len_hint(&self, msg: &Message) -> usize {
        20 + msg.fields().map(|(_, v)| v.len() * 2 + 4).sum::<usize>()
    }

    /// Appends the encoded message to `out`. On error `out` is left as it was.
    pub fn encode_into(&self, msg: &Message, out: &mut BytesMut) -> Result<(), CodecError> {
        let start = out.len();
        let r = self.encode_fields(msg, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn encode_fields(&self, msg: &Message, out: &mut BytesMut) -> Result<(), CodecError> {
        let mti = msg.mti().digits();
        match self.mti {
            HeaderEncoding::Bcd => out.put_slice(&[
                (mti[0] - b'0') << 4 | (mti[1] - b'0'),
                (mti[2] - b'0') << 4 | (mti[3] - b'0'),
            ]),
            HeaderEncoding::Ebcdic => out.put_slice(&mti.map(|d| ASCII_TO_EBCDIC[d as usize])),
            _ => out.put_slice(&mti),
        }

        let mut present = msg.present() & !1;
        if present >> 64 != 0 {
            present |= 1;
        }
        let primary = (present as u64).reverse_bits();
        let secondary = ((present >> 64) as u64).reverse_bits();
        let words: &[u64] = if present & 1 != 0 {
            &[primary, secondary]
        } else {
            &[primary]
        };
        for w in words {
            match self.bitmap {
                HeaderEncoding::Hex => push_hex(out, &w.to_be_bytes()),
                _ => out.put_u64(*w),
            }
        }

        for (n, value) in msg.fields() {
            let at = FieldRef::Field(n);
            let Some(spec) = self.field(n) else {
                return Err(CodecError::UndefinedField {
                    at,
                    offset: out.len(),
                    dialect: self.name.clone(),
                });
            };
            encode_field(spec, value, out)?;
        }
        Ok(())
    }
}

fn invalid(spec: &FieldSpec, reason: String) -> CodecError {
    CodecError::InvalidValue {
        at: FieldRef::Field(spec.number),
        reason,
    }
}

/// Checks a value against its field and writes prefix and data.
#[inline]
fn encode_field(spec: &FieldSpec, v: &[u8], out: &mut BytesMut) -> Result<(), CodecError> {
    let units = v.len();
    let fits = match spec.var {
        Var::Fixed => units == spec.length,
        _ => units <= spec.length,
    };
    if !fits || (spec.class == Class::SignedAmount && units < 2) {
        let allowed = match spec.var {
            Var::Fixed => format!("exactly {}", spec.length),
            _ => format!("at most {}", spec.length),
        };
        return Err(invalid(
            spec,
            format!(
                "value of length {units}, the field takes {allowed} ({})",
                spec.class.code()
            ),
        ));
    }
    check_class(spec, v)?;

    if spec.var != Var::Fixed {
        put_prefix(spec, units, out);
    }
    match spec.encoding {
        Encoding::Ascii | Encoding::Binary => out.put_slice(v),
        Encoding::Ebcdic => out.extend(v.iter().map(|&c| ASCII_TO_EBCDIC[c as usize])),
        Encoding::Hex => push_hex(out, v),
        Encoding::Bcd => {
            let digits = if spec.class == Class::SignedAmount {
                out.put_u8(v[0]);
                &v[1..]
            } else {
                v
            };
            put_bcd(digits, spec.pad, out);
        }
    }
    Ok(())
}

fn check_class(spec: &FieldSpec, v: &[u8]) -> Result<(), CodecError> {
    let bad = |i: usize| {
        // The character itself is not named: a value being encoded may be a PIN.
        invalid(
            spec,
            format!(
                "character at position {i} is not allowed in a field of class {}",
                spec.class.code()
            ),
        )
    };
    if spec.class == Class::SignedAmount {
        if v[0] != b'C' && v[0] != b'D' {
            return Err(invalid(spec, "an xn amount starts with C or D".into()));
        }
        return match v[1..].iter().position(|c| !c.is_ascii_digit()) {
            Some(i) => Err(bad(i + 1)),
            None => Ok(()),
        };
    }
    match v.iter().position(|&c| !spec.class.allows(c)) {
        Some(i) => Err(bad(i)),
        None => Ok(()),
    }
}

fn put_prefix(spec: &FieldSpec, units: usize, out: &mut BytesMut) {
    let digits = spec.var.digits();
    match spec.prefix {
        PrefixEncoding::Ascii | PrefixEncoding::Ebcdic => {
            let zero = if spec.prefix == PrefixEncoding::Ascii {
                b'0'
            } else {
                0xF0
            };
            for i in (0..digits).rev() {
                out.put_u8(zero + (units / 10usize.pow(i as u32) % 10) as u8);
            }
        }
        PrefixEncoding::Bcd => {
            let b = ((units / 1000 % 10) << 12) | ((units / 100 % 10) << 8) | ((units / 10 % 10) << 4) | (units % 10);
            if spec.var == Var::LL {
                out.put_u8(b as u8);
            } else {
                out.put_u16(b as u16);
            }
        }
        PrefixEncoding::Binary => {
            if spec.var == Var::LL {
                out.put_u8(units as u8);
            } else {
                out.put_u16(units as u16);
            }
        }
    }
}

#[inline]
fn nibble(c: u8) -> u8 {
    match c {
        b'=' | b'D' => 0xD,
        _ => c - b'0',
    }
}

/// Packs digits (already checked) two to a byte, with the filler nibble where the padding says.
fn put_bcd(digits: &[u8], pad: Pad, out: &mut BytesMut) {
    let filler = match pad {
        Pad::Left | Pad::Right => 0,
        Pad::LeftF | Pad::RightF => 0xF,
    };
    let mut rest = digits;
    if digits.len() % 2 == 1 && matches!(pad, Pad::Left | Pad::LeftF) {
        out.put_u8(filler << 4 | nibble(digits[0]));
        rest = &digits[1..];
    }
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        out.put_u8(nibble(p[0]) << 4 | nibble(p[1]));
    }
    if let [last] = pairs.remainder() {
        out.put_u8(nibble(*last) << 4 | filler);
    }
}
