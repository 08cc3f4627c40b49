//! PSP messages as they are on the wire: requests, answers, outcomes and error codes. Values only; what reads them
//! from bytes is [`super::parse_request`] / [`super::parse_response`], what frames them is [`super::FrameCodec`].

use serde::{Deserialize, Serialize};

use super::{PspError, MAX_MERCHANT_ID, MAX_RRN, MAX_STAN, MAX_TERMINAL_ID, MAX_TRANSMISSION};
use crate::sale::{Pin, ReversalReason, SaleContent};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// A request as sent on the wire: `{"id": 7, "op": "sell", …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

/// The sale's identity at the terminal: with the gateway id (from its certificate) it is the idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminal {
    pub terminal_id: String,
    pub merchant_id: String,
    pub stan: String,
    pub transmission: String,
    pub rrn: String,
}

impl Terminal {
    /// Each field printable ASCII of at most its length ([`MAX_TERMINAL_ID`] and the others; only the RRN may be
    /// empty), or the first that is not.
    pub fn check(&self) -> Result<(), PspError> {
        for (field, v, max) in [
            ("terminal_id", &self.terminal_id, MAX_TERMINAL_ID),
            ("merchant_id", &self.merchant_id, MAX_MERCHANT_ID),
            ("stan", &self.stan, MAX_STAN),
            ("transmission", &self.transmission, MAX_TRANSMISSION),
            ("rrn", &self.rrn, MAX_RRN),
        ] {
            if v.is_empty() && field != "rrn" || v.len() > max || !v.bytes().all(|c| (0x20..=0x7E).contains(&c)) {
                return Err(PspError::TerminalField { field, max });
            }
        }
        Ok(())
    }
}

/// Operations. Strict: unknown fields or ops are `bad_request`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Must be first on a connection.
    Hello {
        version: u32,
    },
    /// One PIN on demand.
    Sell {
        product: String,
        amount: i64,
        terminal: Terminal,
    },
    /// `count` PINs (1 to [`MAX_RESERVE`](super::MAX_RESERVE)) for the gateway's cache, leased for `lease_secs`.
    Reserve {
        product: String,
        amount: i64,
        count: usize,
        lease_secs: u64,
    },
    /// A cached PIN was sold.
    Confirm {
        pin_id: i64,
        terminal: Terminal,
    },
    /// Several `confirm`s in one request (1 to [`MAX_CONFIRM_BATCH`](super::MAX_CONFIRM_BATCH)), answered one result each, in order.
    ConfirmBatch {
        confirms: Vec<ConfirmItem>,
    },
    /// Unsold cached PINs go back (at most [`MAX_PIN_IDS`](super::MAX_PIN_IDS)).
    Release {
        pin_ids: Vec<i64>,
    },
    /// Reverse a sale by its key. `content` is what the terminal's reversal named: the server refuses the reversal
    /// (`reversal_mismatch`) when it differs from the sale's. Absent only in reversals journaled by older gateways.
    Reverse {
        terminal_id: String,
        stan: String,
        transmission: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<SaleContent>,
        /// Why (absent: `terminal`, the one reason the reversal window applies to).
        #[serde(default, skip_serializing_if = "ReversalReason::is_terminal")]
        reason: ReversalReason,
        /// When the gateway took the terminal's reversal (seconds since the epoch): the server measures the
        /// reversal window to it (no later than its own clock), so that a reversal forwarded late is judged by when
        /// the terminal sent it. Absent: when the server receives it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_at: Option<i64>,
    },
    /// How the sale with this key stands, changing nothing: a gateway asks before it hands a PIN it remembers to a
    /// repeat, since another gateway may have reversed that sale meanwhile.
    CheckSale {
        terminal: Terminal,
    },
    /// Reverse the sale of one PIN this gateway sold, by its id.
    ReversePin {
        pin_id: i64,
    },
    /// Extend leases (of at most [`MAX_PIN_IDS`](super::MAX_PIN_IDS) PINs).
    Renew {
        pin_ids: Vec<i64>,
        lease_secs: u64,
    },
    Stock,
    /// The ids of the PINs reserved to this gateway (it releases those its journal does not know).
    Held,
    Ping,
    /// A slice (`amount`, minor units) of a merchant's value per day in `currency`, kept across every gateway and
    /// server: the gateway sells from it without asking again until it runs out.
    Allowance {
        merchant_id: String,
        currency: String,
        amount: i64,
    },
    /// A slice (`count` sales) of a merchant's sales per minute, kept across every gateway and server in fixed
    /// minutes of the server's clock: the gateway sells from it without asking again until it runs out or the
    /// minute ends. Answered with `allowance`.
    SalesAllowance {
        merchant_id: String,
        count: u32,
    },
}

impl Request {
    /// The operation's wire name (`sell`, `confirm_batch`, ...), for metrics and logs.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Sell { .. } => "sell",
            Request::Reserve { .. } => "reserve",
            Request::Confirm { .. } => "confirm",
            Request::ConfirmBatch { .. } => "confirm_batch",
            Request::Release { .. } => "release",
            Request::Reverse { .. } => "reverse",
            Request::CheckSale { .. } => "check_sale",
            Request::ReversePin { .. } => "reverse_pin",
            Request::Renew { .. } => "renew",
            Request::Stock => "stock",
            Request::Held => "held",
            Request::Ping => "ping",
            Request::Allowance { .. } => "allowance",
            Request::SalesAllowance { .. } => "sales_allowance",
        }
    }

    /// How many of the op's optional fields ([`wire_fields`](Self::wire_fields)) are absent on the wire.
    pub(super) fn optional_absent(&self) -> usize {
        match self {
            Request::Reverse {
                content,
                reason,
                requested_at,
                ..
            } => {
                usize::from(content.is_none()) + usize::from(reason.is_terminal()) + usize::from(requested_at.is_none())
            }
            _ => 0,
        }
    }

    /// The fields of this op on the wire (besides `id` and `op`). An exhaustive match: a new op must list its
    /// fields here; a field added to an op but not here is refused, which that op's tests show at once.
    pub(super) fn wire_fields(&self) -> &'static [&'static str] {
        match self {
            Request::Hello { .. } => &["version"],
            Request::Sell { .. } => &["product", "amount", "terminal"],
            Request::Reserve { .. } => &["product", "amount", "count", "lease_secs"],
            Request::Confirm { .. } => &["pin_id", "terminal"],
            Request::ConfirmBatch { .. } => &["confirms"],
            Request::Release { .. } => &["pin_ids"],
            Request::Renew { .. } => &["pin_ids", "lease_secs"],
            Request::Reverse { .. } => &[
                "terminal_id",
                "stan",
                "transmission",
                "content",
                "reason",
                "requested_at",
            ],
            Request::CheckSale { .. } => &["terminal"],
            Request::ReversePin { .. } => &["pin_id"],
            Request::Stock | Request::Held | Request::Ping => &[],
            Request::Allowance { .. } => &["merchant_id", "currency", "amount"],
            Request::SalesAllowance { .. } => &["merchant_id", "count"],
        }
    }
}

/// One confirm of a `confirm_batch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmItem {
    pub pin_id: i64,
    pub terminal: Terminal,
}

/// One result of a `confirm_batch`: the confirm's `outcome`, or its error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ConfirmOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// A PIN as sent to a gateway. `Debug` masks the PIN (it is a [`Pin`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinOut {
    pub pin_id: i64,
    pub product: String,
    pub amount: i64,
    #[serde(with = "pin_text")]
    pub pin: Pin,
    pub serial: String,
    pub expiry: Option<String>,
    pub receipt: Vec<String>,
}

mod pin_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::sale::Pin;

    pub fn serialize<S: Serializer>(p: &Pin, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.expose())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pin, D::Error> {
        Ok(Pin::new(String::deserialize(d)?))
    }
}

/// A product in the welcome's catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub code: String,
    pub name: String,
    pub supplier: String,
    pub currency: String,
    pub denominations: Vec<i64>,
}

/// One stock line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockEntry {
    pub product: String,
    pub amount: i64,
    pub state: String,
    pub count: i64,
}

/// Successful answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    Welcome {
        version: u32,
        gateway: String,
        server: String,
        catalog: Vec<CatalogEntry>,
    },
    Sold {
        pin: PinOut,
    },
    Reserved {
        pins: Vec<PinOut>,
        lease_until: i64,
    },
    Confirmed {
        outcome: ConfirmOutcome,
    },
    /// One result per confirm of a `confirm_batch`, in order.
    ConfirmedBatch {
        results: Vec<BatchResult>,
    },
    /// Ids that were not held by this gateway, left untouched.
    Released {
        refused: Vec<i64>,
    },
    /// `pin_id`: the PIN of the sale reversed; none when the reversal was only remembered.
    Reversed {
        outcome: ReverseOutcome,
        pin_id: Option<i64>,
    },
    Renewed {
        count: usize,
        lease_until: i64,
    },
    Stock {
        stock: Vec<StockEntry>,
    },
    Held {
        pin_ids: Vec<i64>,
    },
    Pong,
    /// How a `check_sale`'s sale stands.
    SaleState {
        state: SaleState,
    },
    /// What of an `allowance` (value) or a `sales_allowance` (sales) was granted (0 when the merchant's limit is
    /// reached); `limited`: the merchant has such a limit (in that currency, for value; without one, all of it is
    /// granted and nothing recorded).
    Allowance {
        granted: i64,
        limited: bool,
    },
}

/// What a `confirm` did, as the server recorded it. The gateway acts on it: a conflict is counted and shown to the
/// operator, a voided PIN logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmOutcome {
    /// The reserved PIN is now sold.
    Sold,
    /// It was confirmed before with the same key (confirms are idempotent).
    AlreadyConfirmed,
    /// A reversal for this sale arrived first: the PIN was sold and voided at once.
    Voided,
    /// Refused for good: the key was already sold with another PIN. This PIN is voided and a conflict recorded for
    /// the operator; the gateway does not retry it.
    ConflictVoided,
    /// Refused for good as [`ConfirmOutcome::ConflictVoided`], the conflict recorded with its PIN left unvoided.
    Conflict,
}

impl ConfirmOutcome {
    /// The outcome as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmOutcome::Sold => "sold",
            ConfirmOutcome::AlreadyConfirmed => "already_confirmed",
            ConfirmOutcome::Voided => "voided",
            ConfirmOutcome::ConflictVoided => "conflict_voided",
            ConfirmOutcome::Conflict => "conflict",
        }
    }
}

/// How a sale stands at the server (`check_sale`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleState {
    /// Recorded and not reversed: its PIN may be handed to the terminal's repeat again.
    Sold,
    /// Reversed (the PIN voided), or a reversal of the key is remembered before its sale: no PIN for it, ever.
    Reversed,
    /// No sale and no reversal with this key is recorded (a cache sale whose confirm is still on its way).
    Unknown,
}

/// What a `reverse` or `reverse_pin` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseOutcome {
    /// The sold PIN is now voided.
    Voided,
    /// It was voided by an earlier reversal (reversals are idempotent).
    AlreadyVoided,
    /// No sale with that key yet: remembered, and the late sale will be refused.
    Remembered,
}

/// Error codes on the wire (the server maps store errors to them in one place, `server::handler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    OutOfStock,
    UnknownProduct,
    UnknownDenomination,
    DuplicateMismatch,
    AlreadyReversed,
    /// A repeat of a sale older than the server's repeat age: no PIN.
    RepeatExpired,
    /// A reversal whose product, amount, currency or merchant differ from its sale's: not reversed.
    ReversalMismatch,
    /// A terminal's reversal received after the server's reversal window: not reversed, the PIN stays sold.
    ReversalTooLate,
    NotHolder,
    BadRequest,
    /// Too many requests in flight on this connection.
    Busy,
    Internal,
}

impl ErrorCode {
    /// Every code (the PIN server's metrics count requests by it).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::OutOfStock,
        ErrorCode::UnknownProduct,
        ErrorCode::UnknownDenomination,
        ErrorCode::DuplicateMismatch,
        ErrorCode::AlreadyReversed,
        ErrorCode::RepeatExpired,
        ErrorCode::ReversalMismatch,
        ErrorCode::ReversalTooLate,
        ErrorCode::NotHolder,
        ErrorCode::BadRequest,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ];

    /// The code as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::OutOfStock => "out_of_stock",
            ErrorCode::UnknownProduct => "unknown_product",
            ErrorCode::UnknownDenomination => "unknown_denomination",
            ErrorCode::DuplicateMismatch => "duplicate_mismatch",
            ErrorCode::AlreadyReversed => "already_reversed",
            ErrorCode::RepeatExpired => "repeat_expired",
            ErrorCode::ReversalMismatch => "reversal_mismatch",
            ErrorCode::ReversalTooLate => "reversal_too_late",
            ErrorCode::NotHolder => "not_holder",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether retrying the same request may succeed (the server was busy or its store failed); any other error
    /// is a refusal that retrying cannot change.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::Internal)
    }
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

/// A response as sent on the wire: `{"id": 7, "ok": {...}}` or `{"id": 7, "error": {...}}`. `id` is 0 when the
/// request was too malformed to have one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFrame {
    pub id: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ok: Option<Response>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<WireError>,
}

impl ResponseFrame {
    pub fn ok(id: u64, r: Response) -> ResponseFrame {
        ResponseFrame {
            id,
            ok: Some(r),
            error: None,
        }
    }
    pub fn err(id: u64, code: ErrorCode, message: impl Into<String>) -> ResponseFrame {
        ResponseFrame {
            id,
            ok: None,
            error: Some(WireError {
                code,
                message: message.into(),
            }),
        }
    }
    /// The answer as a `Result`.
    pub fn into_result(self) -> Result<Response, WireError> {
        match (self.ok, self.error) {
            (Some(r), None) => Ok(r),
            (_, Some(e)) => Err(e),
            (None, None) => Err(WireError {
                code: ErrorCode::Internal,
                message: "response with neither ok nor error".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_names_are_the_wire_names() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[test]
    fn pins_travel_in_clear_but_never_show_in_debug() {
        let p = PinOut {
            pin_id: 1,
            product: "P".into(),
            amount: 1,
            pin: Pin::new("5556667778"),
            serial: "S".into(),
            expiry: None,
            receipt: vec![],
        };
        let json = serde_json::to_string(&ResponseFrame::ok(3, Response::Sold { pin: p.clone() })).unwrap();
        assert!(json.contains("\"pin\":\"5556667778\""), "{json}");
        let back: ResponseFrame = serde_json::from_str(&json).unwrap();
        assert_eq!(back.clone().into_result().unwrap(), Response::Sold { pin: p });
        assert!(!format!("{back:?}").contains("5556667778"));
    }

    /// The outcomes are written with the strings older gateways and servers compare; an unknown one is refused.
    #[test]
    fn outcomes_are_the_wire_strings() {
        for (o, wire) in [
            (ConfirmOutcome::Sold, "sold"),
            (ConfirmOutcome::AlreadyConfirmed, "already_confirmed"),
            (ConfirmOutcome::Voided, "voided"),
            (ConfirmOutcome::ConflictVoided, "conflict_voided"),
            (ConfirmOutcome::Conflict, "conflict"),
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), wire);
            assert_eq!(o.as_str(), wire);
            assert_eq!(serde_json::from_value::<ConfirmOutcome>(wire.into()).unwrap(), o);
        }
        for (o, wire) in [
            (ReverseOutcome::Voided, "voided"),
            (ReverseOutcome::AlreadyVoided, "already_voided"),
            (ReverseOutcome::Remembered, "remembered"),
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), wire);
        }
        assert!(serde_json::from_str::<ConfirmOutcome>(r#""sold_twice""#).is_err());
        let batch = r#"{"id":4,"ok":{"op":"confirmed_batch","results":[{"outcome":"voided"},{"error":{"code":"not_holder","message":"m"}}]}}"#;
        let frame: ResponseFrame = serde_json::from_str(batch).unwrap();
        assert_eq!(serde_json::to_string(&frame).unwrap(), batch);
    }

    #[test]
    fn terminal_fields_are_checked_against_their_lengths() {
        let t = Terminal {
            terminal_id: "T".repeat(MAX_TERMINAL_ID),
            merchant_id: "M".repeat(MAX_MERCHANT_ID),
            stan: "1".repeat(MAX_STAN),
            transmission: "2".repeat(MAX_TRANSMISSION),
            rrn: String::new(),
        };
        assert!(t.check().is_ok());
        let refused = |f: fn(&mut Terminal)| {
            let mut t = t.clone();
            f(&mut t);
            t.check().unwrap_err().to_string()
        };
        assert_eq!(
            refused(|t| t.terminal_id.push('T')),
            "terminal.terminal_id: 1 to 16 printable characters"
        );
        assert_eq!(
            refused(|t| t.stan.clear()),
            "terminal.stan: 1 to 12 printable characters"
        );
        assert_eq!(
            refused(|t| t.rrn = "3".repeat(21)),
            "terminal.rrn: 1 to 20 printable characters"
        );
        assert_eq!(
            refused(|t| t.merchant_id = "M\u{e9}".into()),
            "terminal.merchant_id: 1 to 32 printable characters"
        );
    }
}
