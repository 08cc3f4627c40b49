//! Dialects as data: the TOML format of `protocols/iso8583/*.toml` and its compiled, validated form.
//!
//! A dialect is the ISO 8583 field layout (content class and length of fields 2..=128) combined with how each
//! class is written on the wire (encoding × length prefix × padding). The three shipped dialects share one layout
//! and differ only in their `[encoding]` table, so a new dialect is usually a copy with a few words changed.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::DialectError;

/// What a field may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Class {
    /// Digits only.
    #[serde(rename = "n")]
    Numeric,
    /// Letters, digits and space (space because fixed `an` fields are space-padded in practice).
    #[serde(rename = "an")]
    AlphaNumeric,
    /// Printable ASCII, 0x20..=0x7E.
    #[serde(rename = "ans")]
    AlphaNumericSpecial,
    /// Track data: digits and the separator `=` (written `D` in BCD).
    #[serde(rename = "z")]
    Track,
    /// Raw bytes. On ASCII lines usually written as hex characters (`encoding = "hex"`).
    #[serde(rename = "b")]
    Binary,
    /// An amount with a sign: `C` (credit) or `D` (debit) followed by digits (ISO `x+n`).
    #[serde(rename = "xn")]
    SignedAmount,
}

impl Class {
    /// Short ISO name, for messages.
    pub fn code(self) -> &'static str {
        match self {
            Class::Numeric => "n",
            Class::AlphaNumeric => "an",
            Class::AlphaNumericSpecial => "ans",
            Class::Track => "z",
            Class::Binary => "b",
            Class::SignedAmount => "xn",
        }
    }

    /// Whether a character (in ASCII, as held in a message value) belongs to the class.
    #[inline]
    pub fn allows(self, c: u8) -> bool {
        match self {
            Class::Numeric => c.is_ascii_digit(),
            Class::AlphaNumeric => c.is_ascii_alphanumeric() || c == b' ',
            Class::AlphaNumericSpecial => (0x20..=0x7E).contains(&c),
            Class::Track => c.is_ascii_digit() || c == b'=' || c == b'D',
            Class::Binary => true,
            Class::SignedAmount => c.is_ascii_digit(),
        }
    }

    /// How a run of `n` units of this class is described in errors.
    pub fn describe(self, n: usize) -> String {
        match self {
            Class::Numeric => format!("{n} digits"),
            Class::AlphaNumeric => format!("{n} letters, digits or spaces"),
            Class::AlphaNumericSpecial => format!("{n} printable characters"),
            Class::Track => format!("{n} track characters (digits, =)"),
            Class::Binary => format!("{n} bytes"),
            Class::SignedAmount => format!("C or D and {} digits", n.saturating_sub(1)),
        }
    }
}

/// How the field's data is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// One ASCII byte per character.
    Ascii,
    /// Packed BCD, two digits per byte (`n`, `z`; for `xn` the sign stays one ASCII byte).
    Bcd,
    /// One EBCDIC (code page 037) byte per character.
    Ebcdic,
    /// Raw bytes (`b` only).
    Binary,
    /// Two ASCII hex characters per byte (`b` only), as ASCII packagers write binary fields.
    Hex,
}

/// How the length prefix of a variable field is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixEncoding {
    /// Decimal digits in ASCII: LL = 2 bytes, LLL = 3, LLLL = 4.
    Ascii,
    /// Decimal digits in packed BCD: LL = 1 byte, LLL and LLLL = 2 bytes.
    Bcd,
    /// An unsigned big-endian integer: LL = 1 byte, LLL and LLLL = 2 bytes.
    Binary,
    /// Decimal digits in EBCDIC: LL = 2 bytes, LLL = 3, LLLL = 4.
    Ebcdic,
}

/// Fixed, or variable with a length prefix of 2, 3 or 4 decimal digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Var {
    #[serde(rename = "fixed")]
    Fixed,
    #[serde(rename = "LL")]
    LL,
    #[serde(rename = "LLL")]
    LLL,
    #[serde(rename = "LLLL")]
    LLLL,
}

impl Var {
    /// Number of decimal digits of the prefix (0 for fixed).
    pub fn digits(self) -> usize {
        match self {
            Var::Fixed => 0,
            Var::LL => 2,
            Var::LLL => 3,
            Var::LLLL => 4,
        }
    }
}

/// Where the filler nibble of an odd number of BCD digits goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pad {
    /// `0` before the first digit (`"123"` → `01 23`).
    Left,
    /// `0` after the last digit (`"123"` → `12 30`).
    Right,
    /// `F` before the first digit.
    LeftF,
    /// `F` after the last digit (`"123"` → `12 3F`).
    RightF,
}

/// How a sensitive field is shown by `Debug`, `Display` and masked JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mask {
    /// Shown as is.
    #[default]
    None,
    /// First 6 and last 4 characters kept, the rest `*` (PAN).
    Pan,
    /// Nothing shown but the length.
    Full,
}

/// How the MTI or the bitmap is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderEncoding {
    Ascii,
    Bcd,
    Ebcdic,
    Binary,
    Hex,
}

/// One compiled field definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub number: u8,
    pub name: String,
    pub class: Class,
    pub var: Var,
    /// Exact length for fixed fields, maximum for variable ones; in characters, digits or bytes.
    pub length: usize,
    pub encoding: Encoding,
    pub prefix: PrefixEncoding,
    pub pad: Pad,
    pub mask: Mask,
}

impl FieldSpec {
    /// Bytes on the wire for `units` characters/digits/bytes of data (prefix excluded).
    #[inline]
    pub fn data_bytes(&self, units: usize) -> usize {
        match (self.encoding, self.class) {
            (Encoding::Bcd, Class::SignedAmount) => 1 + units.saturating_sub(1).div_ceil(2),
            (Encoding::Bcd, _) => units.div_ceil(2),
            (Encoding::Hex, _) => units * 2,
            _ => units,
        }
    }

    /// Bytes of the length prefix.
    #[inline]
    pub fn prefix_bytes(&self) -> usize {
        match (self.prefix, self.var) {
            (_, Var::Fixed) => 0,
            (PrefixEncoding::Ascii | PrefixEncoding::Ebcdic, v) => v.digits(),
            (PrefixEncoding::Bcd | PrefixEncoding::Binary, Var::LL) => 1,
            (PrefixEncoding::Bcd | PrefixEncoding::Binary, _) => 2,
        }
    }
}

/// A loaded dialect: how to read and write messages of one message spec.
#[derive(Clone, Debug)]
pub struct Dialect {
    pub name: String,
    pub description: String,
    pub mti: HeaderEncoding,
    pub bitmap: HeaderEncoding,
    /// Indexed by field number; 0 and 1 (MTI and bitmap) are always `None`.
    pub(crate) fields: Vec<Option<FieldSpec>>,
    /// Fields masked as a PAN / in full (bit n = field n).
    pub(crate) mask_pan: u128,
    pub(crate) mask_full: u128,
}

impl Dialect {
    /// The definition of field `n`, if the dialect has one.
    #[inline]
    pub fn field(&self, n: u8) -> Option<&FieldSpec> {
        self.fields.get(n as usize).and_then(Option::as_ref)
    }

    /// All defined fields in ascending order.
    pub fn defined(&self) -> impl Iterator<Item = &FieldSpec> {
        self.fields.iter().flatten()
    }

    /// Parse and validate a dialect from TOML text. `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Dialect, DialectError> {
        let file: DialectFile = toml::from_str(text).map_err(|e| DialectError::Toml {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        file.compile(origin)
    }
}

// ---- the file format -------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DialectFile {
    name: String,
    #[serde(default)]
    description: String,
    mti: HeaderEncoding,
    bitmap: HeaderEncoding,
    encoding: EncodingDefaults,
    fields: BTreeMap<String, FieldFile>,
}

/// How each content class is written unless a field says otherwise.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncodingDefaults {
    n: Encoding,
    an: Encoding,
    ans: Encoding,
    z: Encoding,
    b: Encoding,
    xn: Encoding,
    prefix: PrefixEncoding,
    /// BCD filler position for fixed fields with an odd number of digits.
    pad_fixed: Pad,
    /// BCD filler position for variable fields with an odd number of digits.
    pad_variable: Pad,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldFile {
    name: String,
    class: Class,
    length: usize,
    #[serde(default = "fixed")]
    var: Var,
    encoding: Option<Encoding>,
    prefix: Option<PrefixEncoding>,
    pad: Option<Pad>,
    #[serde(default)]
    mask: Mask,
}

fn fixed() -> Var {
    Var::Fixed
}

impl DialectFile {
    fn compile(self, origin: &str) -> Result<Dialect, DialectError> {
        let bad = |field: &str, reason: String| DialectError::BadField {
            path: origin.to_string(),
            field: field.to_string(),
            reason,
        };
        if !matches!(
            self.mti,
            HeaderEncoding::Ascii | HeaderEncoding::Bcd | HeaderEncoding::Ebcdic
        ) {
            return Err(bad("mti", "the MTI is written as ascii, bcd or ebcdic".into()));
        }
        if !matches!(self.bitmap, HeaderEncoding::Binary | HeaderEncoding::Hex) {
            return Err(bad("bitmap", "the bitmap is written as binary or hex".into()));
        }
        let mut fields: Vec<Option<FieldSpec>> = vec![None; 129];
        let (mut mask_pan, mut mask_full) = (0u128, 0u128);
        for (key, f) in self.fields {
            let number: u8 = match key.parse() {
                Ok(n) if (2..=128).contains(&n) => n,
                _ => {
                    return Err(bad(
                        &key,
                        "field numbers run from 2 to 128 (1 is the secondary bitmap)".into(),
                    ))
                }
            };
            let d = &self.encoding;
            let encoding = f.encoding.unwrap_or(match f.class {
                Class::Numeric => d.n,
                Class::AlphaNumeric => d.an,
                Class::AlphaNumericSpecial => d.ans,
                Class::Track => d.z,
                Class::Binary => d.b,
                Class::SignedAmount => d.xn,
            });
            let allowed = match f.class {
                Class::Numeric | Class::Track | Class::SignedAmount => {
                    matches!(encoding, Encoding::Ascii | Encoding::Bcd | Encoding::Ebcdic)
                }
                Class::AlphaNumeric | Class::AlphaNumericSpecial => {
                    matches!(encoding, Encoding::Ascii | Encoding::Ebcdic)
                }
                Class::Binary => matches!(encoding, Encoding::Binary | Encoding::Hex),
            };
            if !allowed {
                return Err(bad(
                    &key,
                    format!("class {} cannot be written as {encoding:?}", f.class.code()),
                ));
            }
            let limit = match f.var {
                Var::Fixed => 65_535,
                Var::LL => 99,
                Var::LLL => 999,
                Var::LLLL => 9_999,
            };
            if f.length == 0 || f.length > limit {
                return Err(bad(
                    &key,
                    format!("length {} is outside 1..={limit} for {:?}", f.length, f.var),
                ));
            }
            if f.class == Class::SignedAmount && f.length < 2 {
                return Err(bad(&key, "an xn amount needs a sign and at least one digit".into()));
            }
            let pad = f.pad.unwrap_or(if f.var == Var::Fixed {
                d.pad_fixed
            } else {
                d.pad_variable
            });
            match f.mask {
                Mask::None => {}
                Mask::Pan => mask_pan |= 1u128 << (number - 1),
                Mask::Full => mask_full |= 1u128 << (number - 1),
            }
            fields[number as usize] = Some(FieldSpec {
                number,
                name: f.name,
                class: f.class,
                var: f.var,
                length: f.length,
                encoding,
                prefix: f.prefix.unwrap_or(d.prefix),
                pad,
                mask: f.mask,
            });
        }
        Ok(Dialect {
            name: self.name,
            description: self.description,
            mti: self.mti,
            bitmap: self.bitmap,
            fields,
            mask_pan,
            mask_full,
        })
    }
}
