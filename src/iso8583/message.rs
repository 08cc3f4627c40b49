//! The message value type: an MTI and fields 2..=128, each held as the field's content (characters for text and
//! numeric fields, raw bytes for binary fields), independent of how a dialect writes it on the wire.

use std::fmt;

use bytes::Bytes;

use super::charset::to_hex;
use super::error::{CodecError, FieldRef};

/// Message type indicator, four ASCII digits such as `0200`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mti(pub(crate) [u8; 4]);

impl Mti {
    pub const SALE: Mti = Mti(*b"0200");
    pub const SALE_RESPONSE: Mti = Mti(*b"0210");
    pub const SALE_REPEAT: Mti = Mti(*b"0201");
    pub const REVERSAL: Mti = Mti(*b"0400");
    pub const REVERSAL_RESPONSE: Mti = Mti(*b"0410");
    pub const REVERSAL_ADVICE: Mti = Mti(*b"0420");
    pub const REVERSAL_ADVICE_REPEAT: Mti = Mti(*b"0421");
    pub const REVERSAL_ADVICE_RESPONSE: Mti = Mti(*b"0430");
    pub const NETWORK: Mti = Mti(*b"0800");
    pub const NETWORK_RESPONSE: Mti = Mti(*b"0810");

    /// An MTI from four ASCII digits.
    pub fn new(digits: [u8; 4]) -> Result<Mti, CodecError> {
        match digits.iter().position(|c| !c.is_ascii_digit()) {
            None => Ok(Mti(digits)),
            Some(i) => Err(CodecError::InvalidValue {
                at: FieldRef::Mti,
                reason: format!("expected 4 digits, found 0x{:02X} at position {i}", digits[i]),
            }),
        }
    }

    /// The four digits.
    pub fn digits(&self) -> [u8; 4] {
        self.0
    }

    /// As text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("MTI digits are ASCII")
    }

    /// The message class digit (2 financial, 4 reversal, 8 network management).
    pub fn class(&self) -> u8 {
        self.0[1] - b'0'
    }

    /// The function digit (0 request, 1 response, 2 advice, 3 advice response).
    pub fn function(&self) -> u8 {
        self.0[2] - b'0'
    }

    /// Whether the last digit marks a repeat (`0201`, `0421`).
    pub fn is_repeat(&self) -> bool {
        self.0[3] == b'1'
    }

    /// Whether this is a request or advice (function digit even), as opposed to a response.
    pub fn is_request(&self) -> bool {
        self.function() % 2 == 0
    }

    /// The MTI of the answer to this request: `0200`/`0201` → `0210`, `0420`/`0421` → `0430`.
    pub fn response(&self) -> Mti {
        let mut d = self.0;
        d[2] = b'0' + (self.function() | 1);
        d[3] = b'0';
        Mti(d)
    }
}

impl std::str::FromStr for Mti {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Mti, CodecError> {
        let b: [u8; 4] = s.as_bytes().try_into().map_err(|_| CodecError::InvalidValue {
            at: FieldRef::Mti,
            reason: format!("expected 4 digits, found {} characters", s.len()),
        })?;
        Mti::new(b)
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mti({})", self.as_str())
    }
}

/// Fields masked by `Debug`, `Display` and masked JSON when no dialect says otherwise: PAN (2, 34 as PAN), track
/// data (35, 36, 45), PIN block (52), ICC data (55), our PIN-bearing private field (63), MACs and security codes
/// (53, 64, 96, 128). Dialect files carry their own list.
pub const DEFAULT_MASK_PAN: u128 = bit(2) | bit(34);
pub const DEFAULT_MASK_FULL: u128 =
    bit(14) | bit(35) | bit(36) | bit(45) | bit(52) | bit(53) | bit(55) | bit(63) | bit(64) | bit(96) | bit(128);

/// Bit for field `n` in the field sets used here (bit 0 = field 1).
#[inline]
pub(crate) const fn bit(n: u8) -> u128 {
    1u128 << (n - 1)
}

/// One ISO 8583 message.
///
/// Values are the field's content, not its wire form: `"000000002000"` for an amount whatever the encoding, raw
/// bytes for a binary field. Values decoded from a buffer share it (`Bytes` slices, no copy) where the wire form is
/// the content (ASCII, binary). `Debug` and `Display` mask sensitive fields.
#[derive(Clone)]
pub struct Message {
    mti: Mti,
    present: u128,
    /// Ascending by field number.
    fields: Vec<(u8, Bytes)>,
    mask_pan: u128,
    mask_full: u128,
}

impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.mti == other.mti && self.fields == other.fields
    }
}
impl Eq for Message {}

impl Message {
    /// An empty message of the given type, with the default masking list.
    pub fn new(mti: Mti) -> Message {
        Message::with_capacity(mti, 16)
    }

    pub(crate) fn with_capacity(mti: Mti, n: usize) -> Message {
        Message {
            mti,
            present: 0,
            fields: Vec::with_capacity(n),
            mask_pan: DEFAULT_MASK_PAN,
            mask_full: DEFAULT_MASK_FULL,
        }
    }

    /// Appends a field known to be above every field present (the decoder's path: bitmap order).
    #[inline]
    pub(crate) fn push_ordered(&mut self, n: u8, value: Bytes) {
        debug_assert!(self.fields.last().is_none_or(|(l, _)| *l < n));
        self.present |= bit(n);
        self.fields.push((n, value));
    }

    pub(crate) fn set_masks(&mut self, pan: u128, full: u128) {
        self.mask_pan = pan;
        self.mask_full = full;
    }

    pub fn mti(&self) -> Mti {
        self.mti
    }

    pub fn set_mti(&mut self, mti: Mti) {
        self.mti = mti;
    }

    /// Sets field `n` (2..=128). Whether the value fits the field is checked when the message is encoded.
    ///
    /// # Panics
    /// If `n` is 0, 1 (the bitmap is derived from the fields) or above 128: a programming error, never input.
    pub fn set(&mut self, n: u8, value: impl Into<Bytes>) -> &mut Message {
        assert!((2..=128).contains(&n), "ISO 8583 data fields are 2..=128, not {n}");
        let value = value.into();
        match self.fields.binary_search_by_key(&n, |(k, _)| *k) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (n, value)),
        }
        self.present |= bit(n);
        self
    }

    /// Removes field `n`, returning its value.
    pub fn remove(&mut self, n: u8) -> Option<Bytes> {
        if !self.has(n) {
            return None;
        }
        self.present &= !bit(n);
        let i = self.fields.binary_search_by_key(&n, |(k, _)| *k).ok()?;
        Some(self.fields.remove(i).1)
    }

    #[inline]
    pub fn has(&self, n: u8) -> bool {
        (1..=128).contains(&n) && self.present & bit(n) != 0
    }

    /// The value of field `n`.
    #[inline]
    pub fn get(&self, n: u8) -> Option<&Bytes> {
        if !self.has(n) {
            return None;
        }
        let i = self.fields.binary_search_by_key(&n, |(k, _)| *k).ok()?;
        Some(&self.fields[i].1)
    }

    /// The value of field `n` as text (text and numeric fields always are).
    pub fn get_str(&self, n: u8) -> Option<&str> {
        self.get(n).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The fields present, ascending.
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (u8, &Bytes)> + '_ {
        self.fields.iter().map(|(n, v)| (*n, v))
    }

    /// The set of fields present (bit 0 = field 1).
    pub fn present(&self) -> u128 {
        self.present
    }

    fn number(&self, n: u8) -> Option<u64> {
        let v = self.get(n)?;
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(v.iter().fold(0u64, |a, d| a * 10 + u64::from(d - b'0')))
    }

    /// Field 3, processing code.
    pub fn processing_code(&self) -> Option<&str> {
        self.get_str(3)
    }
    /// Field 4, transaction amount in minor units.
    pub fn amount(&self) -> Option<u64> {
        self.number(4)
    }
    /// Field 7, transmission date and time `MMDDhhmmss`.
    pub fn transmission_datetime(&self) -> Option<&str> {
        self.get_str(7)
    }
    /// Field 11, systems trace audit number.
    pub fn stan(&self) -> Option<u32> {
        self.number(11).and_then(|v| u32::try_from(v).ok())
    }
    /// Field 12, local transaction time `hhmmss`.
    pub fn local_time(&self) -> Option<&str> {
        self.get_str(12)
    }
    /// Field 13, local transaction date `MMDD`.
    pub fn local_date(&self) -> Option<&str> {
        self.get_str(13)
    }
    /// Field 37, retrieval reference number.
    pub fn rrn(&self) -> Option<&str> {
        self.get_str(37)
    }
    /// Field 38, authorisation identification response.
    pub fn auth_id(&self) -> Option<&str> {
        self.get_str(38)
    }
    /// Field 39, response code.
    pub fn response_code(&self) -> Option<&str> {
        self.get_str(39)
    }
    /// Field 41, card acceptor terminal id, without its space padding.
    pub fn terminal_id(&self) -> Option<&str> {
        self.get_str(41).map(str::trim_end)
    }
    /// Field 42, card acceptor (merchant) id, without its space padding.
    pub fn merchant_id(&self) -> Option<&str> {
        self.get_str(42).map(str::trim_end)
    }
    /// Field 48, additional data (private): the product code in the PIN sale contract.
    pub fn private_data(&self) -> Option<&str> {
        self.get_str(48)
    }
    /// Field 49, transaction currency code.
    pub fn currency(&self) -> Option<&str> {
        self.get_str(49)
    }
    /// Field 70, network management information code.
    pub fn network_code(&self) -> Option<&str> {
        self.get_str(70)
    }
    /// Field 90, original data elements.
    pub fn original_data(&self) -> Option<&str> {
        self.get_str(90)
    }

    /// How field `n` is shown when masked: `None` when it is not sensitive.
    pub fn masked(&self, n: u8) -> Option<String> {
        let v = self.get(n)?;
        if self.mask_full & bit(n) != 0 {
            Some(format!("[masked, {} bytes]", v.len()))
        } else if self.mask_pan & bit(n) != 0 {
            Some(mask_pan(v))
        } else {
            None
        }
    }
}

/// First 6 and last 4 kept when at least 4 characters stay hidden; otherwise all hidden.
pub(crate) fn mask_pan(v: &[u8]) -> String {
    if v.len() >= 14 {
        let mut s = String::with_capacity(v.len());
        s.extend(v[..6].iter().map(|&c| c as char));
        s.extend(std::iter::repeat_n('*', v.len() - 10));
        s.extend(v[v.len() - 4..].iter().map(|&c| c as char));
        s
    } else {
        "*".repeat(v.len())
    }
}

/// Text of an unmasked value for display: itself when printable ASCII, else hex.
fn shown(v: &[u8]) -> String {
    if v.iter().all(|c| (0x20..=0x7E).contains(c)) {
        String::from_utf8_lossy(v).into_owned()
    } else {
        format!("0x{}", to_hex(v))
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        m.entry(&"mti", &self.mti.as_str());
        for (n, v) in &self.fields {
            match self.masked(*n) {
                Some(masked) => m.entry(n, &masked),
                None => m.entry(n, &shown(v)),
            };
        }
        m.finish()
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mti.as_str())?;
        for (n, v) in &self.fields {
            match self.masked(*n) {
                Some(masked) => write!(f, " {n}={masked}")?,
                None => write!(f, " {n}={}", shown(v))?,
            }
        }
        Ok(())
    }
}
