//! The PIN sale contract spoken with terminals (`protocols/pin-sale-messages.md`): response codes with their wire
//! values in one place, the field 63 TLV that carries the PIN to the terminal, the keys that tie repeats and
//! reversals to the sale they refer to, and what a sale bought as its reversal names it. No I/O.

use std::fmt;

use crate::iso8583::Message;

/// Outcomes of a request as the terminal sees them (field 39). The wire values are mapped here and nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    /// `00` — the PIN is in field 63, or the reversal / network request was done.
    Approved,
    /// `12` — MTI, processing code or network code not supported, or a sale whose key was already reversed.
    InvalidTransaction,
    /// `13` — the product exists but not in this amount or currency.
    InvalidAmount,
    /// `21` — "no action taken": a reversal received after the reversal window (`reversal_window_secs`): the sale
    /// stands and its PIN stays sold.
    NoActionTaken,
    /// `15` — field 48 names no product ("no such issuer": the product is the PIN's issuer).
    UnknownProduct,
    /// `25` — no PIN of this product and amount is left ("unable to locate record").
    OutOfStock,
    /// `30` — the message does not decode, or a mandatory field is missing or malformed.
    FormatError,
    /// `58` — unknown terminal, or the terminal may not sell this product.
    NotPermitted,
    /// `61` — "exceeds withdrawal amount limit": the terminal's or merchant's value per day in this currency.
    ExceedsAmountLimit,
    /// `65` — "exceeds withdrawal frequency limit": the terminal's or merchant's sales per minute.
    ExceedsFrequencyLimit,
    /// `63` — security violation: a request on a line that requires MACs whose MAC is missing or wrong, or from a
    /// terminal locked after too many of those.
    SecurityViolation,
    /// `91` — the PIN server could not be reached or did not answer in time ("issuer or switch inoperative").
    ServerUnavailable,
    /// `94` — same terminal, STAN and transmission time as an earlier request, but different content.
    DuplicateMismatch,
    /// `96` — anything else ("system malfunction").
    SystemError,
}

impl ResponseCode {
    pub const ALL: [ResponseCode; 14] = [
        ResponseCode::Approved,
        ResponseCode::InvalidTransaction,
        ResponseCode::InvalidAmount,
        ResponseCode::NoActionTaken,
        ResponseCode::UnknownProduct,
        ResponseCode::OutOfStock,
        ResponseCode::FormatError,
        ResponseCode::NotPermitted,
        ResponseCode::ExceedsAmountLimit,
        ResponseCode::ExceedsFrequencyLimit,
        ResponseCode::SecurityViolation,
        ResponseCode::ServerUnavailable,
        ResponseCode::DuplicateMismatch,
        ResponseCode::SystemError,
    ];

    /// The two characters of field 39.
    pub fn code(self) -> &'static str {
        match self {
            ResponseCode::Approved => "00",
            ResponseCode::InvalidTransaction => "12",
            ResponseCode::InvalidAmount => "13",
            ResponseCode::NoActionTaken => "21",
            ResponseCode::UnknownProduct => "15",
            ResponseCode::OutOfStock => "25",
            ResponseCode::FormatError => "30",
            ResponseCode::NotPermitted => "58",
            ResponseCode::ExceedsAmountLimit => "61",
            ResponseCode::ExceedsFrequencyLimit => "65",
            ResponseCode::SecurityViolation => "63",
            ResponseCode::ServerUnavailable => "91",
            ResponseCode::DuplicateMismatch => "94",
            ResponseCode::SystemError => "96",
        }
    }

    /// The code for a field 39 value, if it is one of ours.
    pub fn from_code(code: &str) -> Option<ResponseCode> {
        ResponseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// What the code means, for people.
    pub fn description(self) -> &'static str {
        match self {
            ResponseCode::Approved => "approved",
            ResponseCode::InvalidTransaction => "invalid transaction",
            ResponseCode::InvalidAmount => "invalid amount or denomination",
            ResponseCode::NoActionTaken => "no action taken (reversal too late)",
            ResponseCode::UnknownProduct => "unknown product",
            ResponseCode::OutOfStock => "out of stock",
            ResponseCode::FormatError => "format error",
            ResponseCode::NotPermitted => "transaction not permitted to terminal",
            ResponseCode::ExceedsAmountLimit => "exceeds amount limit",
            ResponseCode::ExceedsFrequencyLimit => "exceeds frequency limit",
            ResponseCode::SecurityViolation => "security violation",
            ResponseCode::ServerUnavailable => "PIN server unavailable",
            ResponseCode::DuplicateMismatch => "duplicate transmission with different content",
            ResponseCode::SystemError => "system error",
        }
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.description())
    }
}

/// Errors of the sale contract layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaleError {
    /// Field 63 is not a sequence of `tag(2) length(3 digits) value`; `offset` is within the field.
    #[error("field 63: {reason} at offset {offset}")]
    BadTlv { offset: usize, reason: String },
    /// A value does not fit its TLV element (longer than 999, or a character outside printable ASCII).
    #[error("field 63 tag {tag}: {reason}")]
    BadElement { tag: &'static str, reason: String },
    /// The PIN data lacks an element it must have.
    #[error("field 63: missing {tag}")]
    Missing { tag: &'static str },
    /// Field 90 (original data elements) is not 42 digits.
    #[error("field 90: expected 42 digits (MTI, STAN, transmission date-time, acquirer, forwarder)")]
    BadOriginalData,
    /// A field the key needs is absent or malformed.
    #[error("field {field}: {reason}")]
    MissingField { field: u8, reason: &'static str },
}

/// A PIN value. It is cash: `Debug` and `Display` never show it; [`Pin::expose`] is the one way to read it. Its
/// memory is zeroized when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(zeroize::Zeroizing<String>);

impl zeroize::ZeroizeOnDrop for Pin {}

impl Pin {
    pub fn new(value: impl Into<String>) -> Pin {
        Pin(zeroize::Zeroizing::new(value.into()))
    }
    /// The PIN itself: only for putting it into the answer to the terminal that bought it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin([masked, {} chars])", self.0.len())
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[PIN masked, {} chars]", self.0.len())
    }
}

/// What a terminal prints for a sold PIN: field 63 of an approved 0210.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinReceipt {
    pub pin: Pin,
    pub serial: String,
    /// `YYYYMMDD`, absent when the PIN does not expire.
    pub expiry: Option<String>,
    /// Receipt lines in print order.
    pub lines: Vec<String>,
}

/// Field 63 tags.
pub mod tag {
    pub const PIN: &str = "PN";
    pub const SERIAL: &str = "SN";
    pub const EXPIRY: &str = "EX";
    pub const RECEIPT_LINE: &str = "RL";
}

impl PinReceipt {
    /// Field 63 text: `PN` PIN, `SN` serial, `EX` expiry if any, then one `RL` per receipt line; each element
    /// `tag(2) length(3 ASCII digits) value`.
    pub fn to_tlv(&self) -> Result<String, SaleError> {
        let mut out = String::with_capacity(64);
        let mut put = |tag: &'static str, v: &str| -> Result<(), SaleError> {
            if v.len() > 999 {
                return Err(SaleError::BadElement {
                    tag,
                    reason: format!("{} characters, at most 999", v.len()),
                });
            }
            if let Some(i) = v.bytes().position(|c| !(0x20..=0x7E).contains(&c)) {
                return Err(SaleError::BadElement {
                    tag,
                    reason: format!("non-printable character at position {i}"),
                });
            }
            out.push_str(tag);
            out.push_str(&format!("{:03}", v.len()));
            out.push_str(v);
            Ok(())
        };
        put(tag::PIN, self.pin.expose())?;
        put(tag::SERIAL, &self.serial)?;
        if let Some(e) = &self.expiry {
            put(tag::EXPIRY, e)?;
        }
        for l in &self.lines {
            put(tag::RECEIPT_LINE, l)?;
        }
        if out.len() > 999 {
            return Err(SaleError::BadElement {
                tag: tag::RECEIPT_LINE,
                reason: format!("field 63 would be {} long, at most 999", out.len()),
            });
        }
        Ok(out)
    }

    /// Reads field 63. Unknown tags are skipped (terminals must do the same), so the contract can grow.
    pub fn from_tlv(data: &[u8]) -> Result<PinReceipt, SaleError> {
        let (mut pin, mut serial, mut expiry, mut lines) = (None, None, None, Vec::new());
        let mut i = 0;
        while i < data.len() {
            let head = data.get(i..i + 5).ok_or_else(|| SaleError::BadTlv {
                offset: i,
                reason: format!("element header needs 5 bytes, {} remain", data.len() - i),
            })?;
            if !head[2..].iter().all(u8::is_ascii_digit) {
                return Err(SaleError::BadTlv {
                    offset: i + 2,
                    reason: "length is not 3 digits".into(),
                });
            }
            let len = head[2..].iter().fold(0usize, |a, d| a * 10 + usize::from(d - b'0'));
            let value = data.get(i + 5..i + 5 + len).ok_or_else(|| SaleError::BadTlv {
                offset: i,
                reason: format!("element announces {len} bytes, {} remain", data.len() - i - 5),
            })?;
            let text = std::str::from_utf8(value)
                .map_err(|_| SaleError::BadTlv {
                    offset: i + 5,
                    reason: "value is not text".into(),
                })?
                .to_string();
            match &head[..2] {
                b"PN" => pin = Some(Pin::new(text)),
                b"SN" => serial = Some(text),
                b"EX" => expiry = Some(text),
                b"RL" => lines.push(text),
                _ => {}
            }
            i += 5 + len;
        }
        Ok(PinReceipt {
            pin: pin.ok_or(SaleError::Missing { tag: tag::PIN })?,
            serial: serial.ok_or(SaleError::Missing { tag: tag::SERIAL })?,
            expiry,
            lines,
        })
    }
}

/// What makes two requests "the same sale": terminal id (41), STAN (11) and transmission date-time (7) bound to
/// its year. Field 7 carries no year and the STAN wraps, so a terminal that is reset (STAN back to 000001, clock back
/// to a default date) sends keys it sent before: the year, inferred from field 7 and the time the request was
/// received ([`qualify_transmission`]), makes a key from another year a new sale, never an old one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SaleKey {
    pub terminal_id: String,
    pub stan: String,
    /// `YYYYMMDDhhmmss`: field 7 with the year it was inferred to be in.
    pub transmission: String,
}

/// Length of a year-qualified transmission date-time, `YYYYMMDDhhmmss`.
pub const QUALIFIED_TRANSMISSION_LEN: usize = 14;

/// Field 7 (`MMDDhhmmss`, UTC as ISO 8583 says) bound to a year: of the years around `received` (seconds since the
/// epoch), the one that puts the date nearest to it, so that a repeat just after New Year of a sale made just before
/// still names that sale, and a terminal whose clock is a little ahead across New Year names the new year. A date
/// that is not a date (month 13, 31 April, 29 February outside a leap year, 24:00:00) is refused. An already
/// qualified value (`YYYYMMDDhhmmss`) is checked and kept.
pub fn qualify_transmission(field7: &str, received: i64) -> Result<String, SaleError> {
    let bad = |reason: &'static str| SaleError::MissingField { field: 7, reason };
    if !field7.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("transmission date-time is MMDDhhmmss, digits only"));
    }
    let num = |s: &str| s.parse::<u32>().unwrap_or(u32::MAX);
    let (year, rest) = match field7.len() {
        10 => (None, field7),
        QUALIFIED_TRANSMISSION_LEN => (Some(num(&field7[..4]) as i32), &field7[4..]),
        _ => return Err(bad("transmission date-time is MMDDhhmmss (10 digits)")),
    };
    let (mo, d, h, mi, se) = (
        num(&rest[..2]),
        num(&rest[2..4]),
        num(&rest[4..6]),
        num(&rest[6..8]),
        num(&rest[8..10]),
    );
    if h > 23 || mi > 59 || se > 59 {
        return Err(bad("transmission time is not a time of day"));
    }
    let month = u8::try_from(mo)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or(bad("transmission month is not 01-12"))?;
    let at = |y: i32| -> Option<i64> {
        let date = time::Date::from_calendar_date(y, month, u8::try_from(d).ok()?).ok()?;
        let t = date.with_hms(h as u8, mi as u8, se as u8).ok()?;
        Some(t.assume_utc().unix_timestamp())
    };
    let chosen = match year {
        Some(y) => at(y).map(|_| y),
        None => {
            let now_year = time::OffsetDateTime::from_unix_timestamp(received)
                .map(|t| t.year())
                .unwrap_or(1970);
            [now_year - 1, now_year, now_year + 1]
                .into_iter()
                .filter_map(|y| at(y).map(|t| (y, (t - received).abs())))
                .min_by_key(|(_, dist)| *dist)
                .map(|(y, _)| y)
        }
    };
    let y = chosen.ok_or(bad("transmission date is not a date in any year near now"))?;
    Ok(format!("{y:04}{rest}"))
}

/// Seconds since the epoch of a qualified transmission date-time (`YYYYMMDDhhmmss`, UTC); `None` if it is not one.
pub fn transmission_unix(qualified: &str) -> Option<i64> {
    if qualified.len() != QUALIFIED_TRANSMISSION_LEN || !qualified.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| qualified[r].parse::<u8>().ok();
    let y: i32 = qualified[..4].parse().ok()?;
    let month = time::Month::try_from(n(4..6)?).ok()?;
    let date = time::Date::from_calendar_date(y, month, n(6..8)?).ok()?;
    let t = date.with_hms(n(8..10)?, n(10..12)?, n(12..14)?).ok()?;
    Some(t.assume_utc().unix_timestamp())
}

impl SaleKey {
    /// The key of a 0200/0201 (or of any request, for its own identity), received at `received` (seconds since the
    /// epoch, the gateway's clock): field 7 is bound to its year.
    pub fn of(msg: &Message, received: i64) -> Result<SaleKey, SaleError> {
        let get = |n: u8, reason: &'static str| {
            msg.get_str(n)
                .map(str::to_string)
                .ok_or(SaleError::MissingField { field: n, reason })
        };
        let transmission = get(7, "transmission date-time is mandatory")?;
        Ok(SaleKey {
            terminal_id: msg.terminal_id().map(str::to_string).ok_or(SaleError::MissingField {
                field: 41,
                reason: "terminal id is mandatory",
            })?,
            stan: get(11, "STAN is mandatory")?,
            transmission: qualify_transmission(&transmission, received)?,
        })
    }

    /// The key of the sale a 0400/0420 reverses: from field 90 when present, else the reversal's own 11 and 7
    /// (simple terminals resend the original's STAN and date-time); the year as [`SaleKey::of`] binds it.
    pub fn reversed_by(msg: &Message, received: i64) -> Result<SaleKey, SaleError> {
        let own = SaleKey::of(msg, received)?;
        match msg.original_data() {
            None => Ok(own),
            Some(f90) => {
                let o = OriginalData::parse(f90)?;
                Ok(SaleKey {
                    terminal_id: own.terminal_id,
                    stan: o.stan,
                    transmission: qualify_transmission(&o.transmission, received)?,
                })
            }
        }
    }

    /// Seconds since the epoch of the sale's transmission date-time.
    pub fn transmitted_at(&self) -> Option<i64> {
        transmission_unix(&self.transmission)
    }
}

/// Why a sale is reversed: PSP's `reverse` carries it (absent: `terminal`), the gateway journals it, the PIN server
/// stores it with the reversal, and `pingate pins voided` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReversalReason {
    /// The terminal asked (0400/0420): subject to the reversal window.
    #[default]
    Terminal,
    /// The gateway reversed a sale whose answer never reached the terminal in full (not written, a line gone
    /// mid-answer, a receipt that does not fit): nobody can have the PIN.
    Undelivered,
    /// The answer was sent in full but the terminal never acknowledged it (a dial-up line dropped after the last
    /// byte): the terminal may have printed the PIN, so it is kept out of the supplier's deactivation list by default.
    Unacknowledged,
}

impl ReversalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReversalReason::Terminal => "terminal",
            ReversalReason::Undelivered => "undelivered",
            ReversalReason::Unacknowledged => "unacknowledged",
        }
    }

    pub fn parse(s: &str) -> Option<ReversalReason> {
        [
            ReversalReason::Terminal,
            ReversalReason::Undelivered,
            ReversalReason::Unacknowledged,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn is_terminal(&self) -> bool {
        *self == ReversalReason::Terminal
    }
}

/// What a sale bought, as a reversal names it: the PIN server checks it against the sale before reversing. The
/// gateway journals it, PSP's `reverse` carries it, the store compares it: one type, one serde form.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleContent {
    pub merchant_id: String,
    pub product: String,
    pub amount: i64,
    /// ISO 4217 numeric: the product's currency.
    pub currency: String,
}

impl SaleContent {
    /// The first field in which a sale (its product, amount and merchant, and its product's currency) differs
    /// from what a reversal names; `None` when they agree.
    pub(crate) fn differs_from(
        &self,
        product: &str,
        amount: i64,
        merchant: &str,
        currency: Option<&str>,
    ) -> Option<&'static str> {
        if self.product != product {
            Some("product")
        } else if self.amount != amount {
            Some("amount")
        } else if self.merchant_id != merchant {
            Some("merchant")
        } else if currency.is_some_and(|c| c != self.currency) {
            Some("currency")
        } else {
            None
        }
    }
}

/// The retrieval reference (field 37) of an approved sale: its PIN's id, 12 digits. A PIN is sold once (the
/// database makes sure), so no two sales share one, and every repeat of the sale gets its PIN, so its RRN; the PIN
/// server records the same. PIN ids stay under 900,000,000,000: a declined request's RRN starts with 9.
pub fn rrn_of_pin(pin_id: i64) -> String {
    format!("{pin_id:012}")
}

/// Field 90, original data elements: n4 MTI, n6 STAN, n10 transmission date-time, n11 acquirer, n11 forwarder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginalData {
    pub mti: String,
    pub stan: String,
    pub transmission: String,
    pub acquirer: String,
    pub forwarder: String,
}

impl OriginalData {
    pub fn parse(f90: &str) -> Result<OriginalData, SaleError> {
        if f90.len() != 42 || !f90.bytes().all(|c| c.is_ascii_digit()) {
            return Err(SaleError::BadOriginalData);
        }
        Ok(OriginalData {
            mti: f90[..4].into(),
            stan: f90[4..10].into(),
            transmission: f90[10..20].into(),
            acquirer: f90[20..31].into(),
            forwarder: f90[31..].into(),
        })
    }

    /// The 42 digits of field 90.
    pub fn format(&self) -> String {
        format!(
            "{}{}{}{:0>11}{:0>11}",
            self.mti, self.stan, self.transmission, self.acquirer, self.forwarder
        )
    }
}

/// What a terminal asked for, read from its message and checked against the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TerminalRequest {
    /// 0200, or 0201 (`repeat`): buy one PIN.
    Sale(SaleRequest),
    /// 0400/0401 or 0420/0421 (`advice`): reverse the sale `sale`.
    Reversal(ReversalRequest),
    /// 0800: echo, sign-on or sign-off.
    Network(NetworkCode),
}

/// A PIN purchase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaleRequest {
    pub key: SaleKey,
    pub merchant_id: String,
    pub product: String,
    /// Minor units.
    pub amount: u64,
    pub currency: String,
    pub repeat: bool,
}

/// A reversal of an earlier sale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReversalRequest {
    /// The sale being reversed (from field 90 when present).
    pub sale: SaleKey,
    pub merchant_id: String,
    pub product: String,
    pub amount: u64,
    pub currency: String,
    /// 0420/0421 rather than 0400/0401.
    pub advice: bool,
}

/// Field 70 values we serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkCode {
    SignOn,
    SignOff,
    Echo,
}

/// Why a request cannot be served, and what the terminal is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ResponseCode,
    pub reason: String,
}

fn refuse(code: ResponseCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

/// The processing code of a PIN purchase.
pub const PROCESSING_PIN_PURCHASE: &str = "000000";

fn product_code(msg: &Message) -> Result<String, Refusal> {
    let p = msg
        .private_data()
        .ok_or_else(|| refuse(ResponseCode::FormatError, "field 48 (product code) is missing"))?;
    if p.is_empty() || p.len() > 20 || !p.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)) {
        return Err(refuse(
            ResponseCode::FormatError,
            "field 48: product code is 1-20 of A-Z a-z 0-9 - _ .",
        ));
    }
    Ok(p.to_string())
}

fn amount_and_currency(msg: &Message) -> Result<(u64, String), Refusal> {
    let amount = msg
        .amount()
        .ok_or_else(|| refuse(ResponseCode::FormatError, "field 4 (amount) is missing"))?;
    if amount == 0 {
        return Err(refuse(ResponseCode::InvalidAmount, "field 4: amount is zero"));
    }
    let currency = msg
        .currency()
        .ok_or_else(|| refuse(ResponseCode::FormatError, "field 49 (currency) is missing"))?;
    Ok((amount, currency.to_string()))
}

fn merchant(msg: &Message) -> Result<String, Refusal> {
    msg.merchant_id()
        .map(str::to_string)
        .ok_or_else(|| refuse(ResponseCode::FormatError, "field 42 (merchant id) is missing"))
}

fn key_error(e: SaleError) -> Refusal {
    refuse(ResponseCode::FormatError, e.to_string())
}

impl TerminalRequest {
    /// Reads a decoded request, received at `received` (seconds since the epoch: the year of field 7 is inferred
    /// from it). A refusal carries the response code the contract gives it.
    pub fn parse(msg: &Message, received: i64) -> Result<TerminalRequest, Refusal> {
        let mti = msg.mti();
        match mti.as_str() {
            "0200" | "0201" => {
                if msg.processing_code() != Some(PROCESSING_PIN_PURCHASE) {
                    return Err(refuse(
                        ResponseCode::InvalidTransaction,
                        "field 3: only 000000 (buy a PIN) is served",
                    ));
                }
                let key = SaleKey::of(msg, received).map_err(key_error)?;
                let (amount, currency) = amount_and_currency(msg)?;
                Ok(TerminalRequest::Sale(SaleRequest {
                    key,
                    merchant_id: merchant(msg)?,
                    product: product_code(msg)?,
                    amount,
                    currency,
                    repeat: mti.is_repeat(),
                }))
            }
            "0400" | "0401" | "0420" | "0421" => {
                let sale = SaleKey::reversed_by(msg, received).map_err(key_error)?;
                let (amount, currency) = amount_and_currency(msg)?;
                Ok(TerminalRequest::Reversal(ReversalRequest {
                    sale,
                    merchant_id: merchant(msg)?,
                    product: product_code(msg)?,
                    amount,
                    currency,
                    advice: mti.function() == 2,
                }))
            }
            "0800" => {
                SaleKey::of(msg, received).map_err(key_error)?;
                match msg.network_code() {
                    Some("001") => Ok(TerminalRequest::Network(NetworkCode::SignOn)),
                    Some("002") => Ok(TerminalRequest::Network(NetworkCode::SignOff)),
                    Some("301") => Ok(TerminalRequest::Network(NetworkCode::Echo)),
                    Some(_) => Err(refuse(
                        ResponseCode::InvalidTransaction,
                        "field 70: 001, 002 or 301 are served",
                    )),
                    None => Err(refuse(ResponseCode::FormatError, "field 70 (network code) is missing")),
                }
            }
            other => Err(refuse(
                ResponseCode::InvalidTransaction,
                format!("MTI {other} is not served"),
            )),
        }
    }
}

/// Fields an answer echoes from its request, per message class (see the contract).
const ECHO_SALE: &[u8] = &[3, 4, 7, 11, 12, 13, 41, 42, 48, 49];
const ECHO_REVERSAL: &[u8] = &[3, 4, 7, 11, 41, 42, 48, 49, 90];
const ECHO_NETWORK: &[u8] = &[7, 11, 41, 42, 70];

/// The answer to `request`: its response MTI, the echoed fields, and field 39. The caller adds what else the
/// outcome carries ([`sale_answer`] for a sale).
pub fn answer(request: &Message, code: ResponseCode) -> Message {
    let mti = request.mti();
    let echo = match mti.class() {
        2 => ECHO_SALE,
        4 => ECHO_REVERSAL,
        _ => ECHO_NETWORK,
    };
    let mut out = Message::new(mti.response());
    for &n in echo {
        if let Some(v) = request.get(n) {
            out.set(n, v.clone());
        }
    }
    out.set(39, code.code());
    out
}

/// The 0210 of a sale, approved or declined; `rrn` is the gateway's retrieval reference for it.
pub fn sale_answer(
    request: &Message,
    rrn: &str,
    outcome: Result<(&str, &PinReceipt), ResponseCode>,
) -> Result<Message, SaleError> {
    match outcome {
        Ok((auth_id, receipt)) => Ok(approved_answer(request, rrn, auth_id, &receipt.to_tlv()?)),
        Err(code) => {
            let mut m = answer(request, code);
            m.set(37, rrn.to_string());
            Ok(m)
        }
    }
}

/// The approved answer to `request` with field 63 already built ([`PinReceipt::to_tlv`]).
pub fn approved_answer(request: &Message, rrn: &str, auth_id: &str, field63: &str) -> Message {
    let mut m = answer(request, ResponseCode::Approved);
    m.set(37, rrn.to_string())
        .set(38, auth_id.to_string())
        .set(63, field63.to_string());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::Mti;

    fn receipt() -> PinReceipt {
        PinReceipt {
            pin: Pin::new("1234567890123456"),
            serial: "SER0000001".into(),
            expiry: Some("20271231".into()),
            lines: vec!["Dial *100*PIN# to top up".into()],
        }
    }

    #[test]
    fn codes_are_unique_and_two_digits() {
        let mut seen = std::collections::HashSet::new();
        for c in ResponseCode::ALL {
            assert!(seen.insert(c.code()), "{c:?} repeats a code");
            assert_eq!(c.code().len(), 2);
            // Old terminals parse field 39 as a number: codes stay numeric.
            assert!(c.code().bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(ResponseCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ResponseCode::from_code("XX"), None);
    }

    #[test]
    fn tlv_round_trip_and_layout() {
        let r = receipt();
        let t = r.to_tlv().unwrap();
        assert_eq!(
            t,
            "PN0161234567890123456SN010SER0000001EX00820271231RL024Dial *100*PIN# to top up"
        );
        assert_eq!(PinReceipt::from_tlv(t.as_bytes()).unwrap(), r);
    }

    #[test]
    fn tlv_skips_unknown_tags_and_names_bad_offsets() {
        let t = "ZZ003abcPN0041234SN0015";
        let r = PinReceipt::from_tlv(t.as_bytes()).unwrap();
        assert_eq!(r.pin.expose(), "1234");
        assert_eq!(r.serial, "5");
        assert_eq!(
            PinReceipt::from_tlv(b"PN01x").unwrap_err(),
            SaleError::BadTlv {
                offset: 2,
                reason: "length is not 3 digits".into()
            }
        );
        assert!(matches!(
            PinReceipt::from_tlv(b"PN009123"),
            Err(SaleError::BadTlv { offset: 0, .. })
        ));
        assert!(matches!(
            PinReceipt::from_tlv(b"PN"),
            Err(SaleError::BadTlv { offset: 0, .. })
        ));
        assert_eq!(PinReceipt::from_tlv(b"SN0011"), Err(SaleError::Missing { tag: "PN" }));
        let mut long = receipt();
        long.lines = vec!["x".repeat(1000)];
        assert!(matches!(long.to_tlv(), Err(SaleError::BadElement { tag: "RL", .. })));
    }

    #[test]
    fn pin_never_shows_in_debug_or_display() {
        let r = receipt();
        let shown = format!("{r:?} {} {:?}", r.pin, r.pin);
        assert!(!shown.contains("1234567890123456"), "{shown}");
        assert!(!shown.contains("12345"), "{shown}");
    }

    /// 2026-11-28 17:35:00 UTC, when the fixtures' requests are received.
    const NOV_28: i64 = 1_795_887_300;

    #[test]
    fn reversal_keys_come_from_field_90_or_the_reversal_itself() {
        let mut m = Message::new(Mti::REVERSAL);
        m.set(41, "TERM0001").set(11, "000124").set(7, "1128173600");
        assert_eq!(
            SaleKey::reversed_by(&m, NOV_28).unwrap(),
            SaleKey {
                terminal_id: "TERM0001".into(),
                stan: "000124".into(),
                transmission: "20261128173600".into()
            }
        );
        let o = OriginalData {
            mti: "0200".into(),
            stan: "000123".into(),
            transmission: "1128173500".into(),
            acquirer: "0".into(),
            forwarder: "0".into(),
        };
        m.set(90, o.format());
        assert_eq!(o.format().len(), 42);
        assert_eq!(
            SaleKey::reversed_by(&m, NOV_28).unwrap(),
            SaleKey {
                terminal_id: "TERM0001".into(),
                stan: "000123".into(),
                transmission: "20261128173500".into()
            }
        );
        m.set(90, "12");
        assert_eq!(SaleKey::reversed_by(&m, NOV_28), Err(SaleError::BadOriginalData));
        m.remove(41);
        assert!(matches!(
            SaleKey::of(&m, NOV_28),
            Err(SaleError::MissingField { field: 41, .. })
        ));
    }

    fn unix(y: i32, mo: u8, d: u8, h: u8, mi: u8, s: u8) -> i64 {
        time::Date::from_calendar_date(y, time::Month::try_from(mo).unwrap(), d)
            .unwrap()
            .with_hms(h, mi, s)
            .unwrap()
            .assume_utc()
            .unix_timestamp()
    }

    #[test]
    fn field_7_is_bound_to_the_year_nearest_to_its_receipt() {
        assert_eq!(qualify_transmission("1128173500", NOV_28).unwrap(), "20261128173500");
        // A repeat just after New Year of a sale made just before names that sale, in the old year.
        let jan_1 = unix(2027, 1, 1, 0, 0, 30);
        assert_eq!(qualify_transmission("1231235959", jan_1).unwrap(), "20261231235959");
        // A terminal a little ahead across New Year names the new year.
        let dec_31 = unix(2026, 12, 31, 23, 59, 50);
        assert_eq!(qualify_transmission("0101000010", dec_31).unwrap(), "20270101000010");
        // A reset terminal's default date half a year away: the nearest year, never a key of another year.
        assert_eq!(qualify_transmission("0101000000", NOV_28).unwrap(), "20270101000000");
        assert_eq!(qualify_transmission("0601000000", NOV_28).unwrap(), "20260601000000");
        // The same field 7 a year later is another key.
        let a_year_later = unix(2027, 11, 28, 17, 35, 0);
        assert_eq!(
            qualify_transmission("1128173500", a_year_later).unwrap(),
            "20271128173500"
        );
        // 29 February: only in a leap year, the nearest one with that date.
        assert_eq!(
            qualify_transmission("0229120000", unix(2028, 2, 20, 0, 0, 0)).unwrap(),
            "20280229120000"
        );
        assert!(qualify_transmission("0229120000", NOV_28).is_err());
        for bad in [
            "1328173500",
            "0431120000",
            "1128240000",
            "1128236000",
            "11281735",
            "11281735x0",
            "",
        ] {
            assert!(
                matches!(
                    qualify_transmission(bad, NOV_28),
                    Err(SaleError::MissingField { field: 7, .. })
                ),
                "{bad:?} is not a transmission date-time"
            );
        }
        // Already qualified: kept, and read back as its time.
        assert_eq!(qualify_transmission("20261128173500", 0).unwrap(), "20261128173500");
        assert_eq!(transmission_unix("20261128173500"), Some(NOV_28));
        assert_eq!(transmission_unix("1128173500"), None);
    }
}
