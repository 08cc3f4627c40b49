//! Errors of the ISO 8583 layer: one enum for the codec (decode, encode, JSON) and one for loading dialects.

use std::fmt;

/// Which part of a message an error is about: the MTI, the bitmap, or a numbered data field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldRef {
    /// The message type indicator.
    Mti,
    /// The primary or secondary bitmap.
    Bitmap,
    /// Data field 2..=128.
    Field(u8),
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldRef::Mti => f.write_str("MTI"),
            FieldRef::Bitmap => f.write_str("bitmap"),
            FieldRef::Field(n) => write!(f, "field {n}"),
        }
    }
}

/// A byte seen where it did not belong, or `None` when the field is sensitive (a byte of a PIN or PAN is never
/// printed, not even in an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found(pub Option<u8>);

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(b) => write!(f, "0x{b:02X}"),
            None => f.write_str("a byte (value hidden: sensitive field)"),
        }
    }
}

/// Everything that can go wrong decoding or encoding a message with a dialect.
///
/// Offsets count bytes from the start of the message as given to the decoder (after any transport header or TPDU).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The message ends before the part it announces: `needed` bytes starting at `offset`, `available` left.
    #[error("{at}: expected {needed} bytes at offset {offset}, only {available} remain")]
    Truncated {
        at: FieldRef,
        offset: usize,
        needed: usize,
        available: usize,
    },

    /// A character outside the field's content class (e.g. a letter in an `n` field).
    #[error("{at}: expected {expected} at offset {offset}, found {found} at offset {bad_offset}")]
    InvalidContent {
        at: FieldRef,
        /// What the field holds, e.g. `12 digits`, `8 printable characters`.
        expected: String,
        /// Where the field's data starts.
        offset: usize,
        /// Where the offending byte is.
        bad_offset: usize,
        found: Found,
    },

    /// A length prefix that is not a number in the prefix's encoding.
    #[error("{at}: length prefix at offset {offset} is not {expected}, found {found}")]
    BadLengthPrefix {
        at: FieldRef,
        offset: usize,
        expected: &'static str,
        found: Found,
    },

    /// A length (from a prefix, or of a value being encoded) outside what the field allows.
    #[error("{at}: length {length} at offset {offset} is out of bounds, the field allows {allowed}")]
    LengthOutOfBounds {
        at: FieldRef,
        offset: usize,
        length: usize,
        allowed: String,
    },

    /// A bit is set in the bitmap (or a value is given) for a field the dialect does not define.
    #[error("{at}: bit set at offset {offset} but the dialect `{dialect}` does not define this field")]
    UndefinedField {
        at: FieldRef,
        offset: usize,
        dialect: String,
    },

    /// Bytes left over after the last field of the message.
    #[error("{count} trailing bytes after the last field, at offset {offset}")]
    TrailingBytes { offset: usize, count: usize },

    /// A value given to the encoder (or in JSON) that the field cannot hold.
    #[error("{at}: {reason}")]
    InvalidValue { at: FieldRef, reason: String },

    /// JSON input that is not of the form `{"mti": "0200", "fields": {"3": "000000", ...}}`.
    #[error("JSON: {0}")]
    Json(String),
}

impl CodecError {
    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<FieldRef> {
        match self {
            CodecError::Truncated { at, .. }
            | CodecError::InvalidContent { at, .. }
            | CodecError::BadLengthPrefix { at, .. }
            | CodecError::LengthOutOfBounds { at, .. }
            | CodecError::UndefinedField { at, .. }
            | CodecError::InvalidValue { at, .. } => Some(*at),
            CodecError::TrailingBytes { .. } | CodecError::Json(_) => None,
        }
    }
}

/// Everything that can be wrong with a dialect file.
#[derive(Debug, thiserror::Error)]
pub enum DialectError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    /// The file is not valid TOML, or has unknown keys or wrong types; `message` names the line and key.
    #[error("{path}: {message}")]
    Toml { path: String, message: String },

    /// A field definition that cannot work, e.g. a BCD-encoded `ans` field or an LL field longer than 99.
    #[error("{path}: field {field}: {reason}")]
    BadField {
        path: String,
        field: String,
        reason: String,
    },

    /// No dialect of that name is known.
    #[error("unknown dialect `{name}`; known: {known}")]
    Unknown { name: String, known: String },
}
