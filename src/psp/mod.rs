//! PSP, the PIN server protocol (`protocols/pin-server-protocol.md`): what gateways and PIN servers say to each
//! other over mutual TLS. Frames are a 4-byte big-endian length and a JSON body; every request carries an id and
//! responses may come back in any order. This module is the protocol core (messages, strict parsing, framing
//! limits); [`client`] is the tokio client a gateway uses.

pub mod client;

use serde::{Deserialize, Serialize};

use crate::sale::Pin;
use crate::store::{Confirmation, Dispensed, Product, Reversal, SaleContent, StockRow, StoreError};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Default cap on one frame's JSON body.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

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
    /// `count` PINs for the gateway's cache, leased for `lease_secs`.
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
    /// Several `confirm`s in one request (at most 1,000), answered one result each, in order.
    ConfirmBatch {
        confirms: Vec<ConfirmItem>,
    },
    /// Unsold cached PINs go back.
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
    },
    /// Reverse the sale of one PIN this gateway sold, by its id.
    ReversePin {
        pin_id: i64,
    },
    /// Extend leases.
    Renew {
        pin_ids: Vec<i64>,
        lease_secs: u64,
    },
    Stock,
    /// The ids of the PINs reserved to this gateway (it releases those its journal does not know).
    Held,
    Ping,
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
            Request::ReversePin { .. } => "reverse_pin",
            Request::Renew { .. } => "renew",
            Request::Stock => "stock",
            Request::Held => "held",
            Request::Ping => "ping",
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
    pub outcome: Option<String>,
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

impl From<Dispensed> for PinOut {
    fn from(d: Dispensed) -> PinOut {
        PinOut {
            pin_id: d.pin_id,
            product: d.product,
            amount: d.amount,
            pin: d.pin,
            serial: d.serial,
            expiry: d.expiry,
            receipt: d.receipt,
        }
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

impl From<Product> for CatalogEntry {
    fn from(p: Product) -> CatalogEntry {
        CatalogEntry {
            code: p.code,
            name: p.name,
            supplier: p.supplier,
            currency: p.currency,
            denominations: p.denominations,
        }
    }
}

/// One stock line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockEntry {
    pub product: String,
    pub amount: i64,
    pub state: String,
    pub count: i64,
}

impl From<StockRow> for StockEntry {
    fn from(r: StockRow) -> StockEntry {
        StockEntry {
            product: r.product,
            amount: r.amount,
            state: r.state.as_str().into(),
            count: r.count,
        }
    }
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
    /// `outcome`: `sold`, `already_confirmed`, or `voided` (a reversal for this sale arrived first).
    Confirmed {
        outcome: String,
    },
    /// One result per confirm of a `confirm_batch`, in order.
    ConfirmedBatch {
        results: Vec<BatchResult>,
    },
    /// Ids that were not held by this gateway, left untouched.
    Released {
        refused: Vec<i64>,
    },
    /// `outcome`: `voided`, `already_voided`, or `remembered` (no sale yet; the late sale will be refused).
    Reversed {
        outcome: String,
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
}

impl Confirmation {
    pub fn as_str(self) -> &'static str {
        match self {
            Confirmation::Sold => "sold",
            Confirmation::AlreadyConfirmed => "already_confirmed",
            Confirmation::Voided => "voided",
            Confirmation::Conflict { voided: true } => "conflict_voided",
            Confirmation::Conflict { voided: false } => "conflict",
        }
    }
}

impl From<Reversal> for Response {
    fn from(r: Reversal) -> Response {
        let (outcome, pin_id) = match r {
            Reversal::Voided { pin_id } => ("voided", Some(pin_id)),
            Reversal::AlreadyVoided { pin_id } => ("already_voided", Some(pin_id)),
            Reversal::Remembered => ("remembered", None),
        };
        Response::Reversed {
            outcome: outcome.into(),
            pin_id,
        }
    }
}

/// Error codes on the wire; mapped from store errors in one place ([`ErrorCode::of`]).
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
    NotHolder,
    BadRequest,
    /// Too many requests in flight on this connection.
    Busy,
    Internal,
}

impl ErrorCode {
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

    /// The wire code of a store error. Internal errors are logged by the server; their text is not sent.
    pub fn of(e: &StoreError) -> ErrorCode {
        match e {
            StoreError::OutOfStock { .. } => ErrorCode::OutOfStock,
            StoreError::UnknownProduct(_) => ErrorCode::UnknownProduct,
            StoreError::UnknownDenomination { .. } => ErrorCode::UnknownDenomination,
            StoreError::DuplicateMismatch { .. } => ErrorCode::DuplicateMismatch,
            StoreError::AlreadyReversed { .. } => ErrorCode::AlreadyReversed,
            StoreError::RepeatExpired { .. } => ErrorCode::RepeatExpired,
            StoreError::ReversalMismatch { .. } => ErrorCode::ReversalMismatch,
            StoreError::NotHolder { .. } => ErrorCode::NotHolder,
            StoreError::BadRequest(_) | StoreError::ImportRow { .. } => ErrorCode::BadRequest,
            StoreError::Crypto(_) | StoreError::Unreadable { .. } | StoreError::Db(_) => ErrorCode::Internal,
        }
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

impl Request {
    /// The fields of this op on the wire (besides `id` and `op`). An exhaustive match: a new op must list its
    /// fields here; a field added to an op but not here is refused, which that op's tests show at once.
    fn wire_fields(&self) -> &'static [&'static str] {
        match self {
            Request::Hello { .. } => &["version"],
            Request::Sell { .. } => &["product", "amount", "terminal"],
            Request::Reserve { .. } => &["product", "amount", "count", "lease_secs"],
            Request::Confirm { .. } => &["pin_id", "terminal"],
            Request::ConfirmBatch { .. } => &["confirms"],
            Request::Release { .. } => &["pin_ids"],
            Request::Renew { .. } => &["pin_ids", "lease_secs"],
            Request::Reverse { .. } => &["terminal_id", "stan", "transmission", "content"],
            Request::ReversePin { .. } => &["pin_id"],
            Request::Stock | Request::Held | Request::Ping => &[],
        }
    }
}

/// Parses one request body strictly. On error: the id if one could be read, and a message naming what is wrong.
///
/// A well-formed request is read in one pass ([`WireRequest`]); anything the one pass does not accept is read
/// again the slow way, which decides whether it is valid and words the error (so both ways accept exactly what the
/// slow one does: `fast_and_slow_parses_agree` checks it).
pub fn parse_request(body: &[u8]) -> Result<RequestFrame, (u64, String)> {
    serde_json::from_slice::<WireRequest>(body)
        .ok()
        .and_then(WireRequest::into_frame)
        .map_or_else(|| parse_request_slow(body), Ok)
}

/// Every field any request may carry, each read only if present (`null` is not absent: it is refused as the
/// field's type refuses it). One pass, no intermediate tree; [`WireRequest::into_frame`] then takes exactly the
/// op's own fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    #[serde(default, deserialize_with = "present")]
    id: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    op: Option<String>,
    #[serde(default, deserialize_with = "present")]
    version: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    product: Option<String>,
    #[serde(default, deserialize_with = "present")]
    amount: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    terminal: Option<Terminal>,
    #[serde(default, deserialize_with = "present")]
    count: Option<usize>,
    #[serde(default, deserialize_with = "present")]
    lease_secs: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pin_id: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    confirms: Option<Vec<ConfirmItem>>,
    #[serde(default, deserialize_with = "present")]
    pin_ids: Option<Vec<i64>>,
    #[serde(default, deserialize_with = "present")]
    terminal_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    stan: Option<String>,
    #[serde(default, deserialize_with = "present")]
    transmission: Option<String>,
    #[serde(default, deserialize_with = "present")]
    content: Option<SaleContent>,
}

fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl WireRequest {
    /// The request, if the op is known and its fields are all there and no other is; `None` otherwise.
    fn into_frame(self) -> Option<RequestFrame> {
        let WireRequest {
            id,
            op,
            version,
            product,
            amount,
            terminal,
            count,
            lease_secs,
            pin_id,
            confirms,
            pin_ids,
            terminal_id,
            stan,
            transmission,
            content,
        } = self;
        let present = [
            version.is_some(),
            product.is_some(),
            amount.is_some(),
            terminal.is_some(),
            count.is_some(),
            lease_secs.is_some(),
            pin_id.is_some(),
            confirms.is_some(),
            pin_ids.is_some(),
            terminal_id.is_some(),
            stan.is_some(),
            transmission.is_some(),
            content.is_some(),
        ]
        .iter()
        .filter(|p| **p)
        .count();
        let request = match op?.as_str() {
            "hello" => Request::Hello { version: version? },
            "sell" => Request::Sell {
                product: product?,
                amount: amount?,
                terminal: terminal?,
            },
            "reserve" => Request::Reserve {
                product: product?,
                amount: amount?,
                count: count?,
                lease_secs: lease_secs?,
            },
            "confirm" => Request::Confirm {
                pin_id: pin_id?,
                terminal: terminal?,
            },
            "confirm_batch" => Request::ConfirmBatch { confirms: confirms? },
            "release" => Request::Release { pin_ids: pin_ids? },
            "reverse" => Request::Reverse {
                terminal_id: terminal_id?,
                stan: stan?,
                transmission: transmission?,
                content,
            },
            "reverse_pin" => Request::ReversePin { pin_id: pin_id? },
            "renew" => Request::Renew {
                pin_ids: pin_ids?,
                lease_secs: lease_secs?,
            },
            "stock" => Request::Stock,
            "held" => Request::Held,
            "ping" => Request::Ping,
            _ => return None,
        };
        // Every field the op takes was there (`?` above): any more is another op's.
        // (`content` of a reverse may be absent.)
        let optional_absent = usize::from(matches!(&request, Request::Reverse { content: None, .. }));
        (present + optional_absent == request.wire_fields().len()).then_some(RequestFrame { id: id?, request })
    }
}

/// The strict parse of any body, valid or not: through a JSON tree, so that the id is known for the error answer
/// whatever else is wrong. Public for the fuzz target `psp_request`, which checks that [`parse_request`] agrees.
#[doc(hidden)]
pub fn parse_request_slow(body: &[u8]) -> Result<RequestFrame, (u64, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| (0, format!("not JSON: {e}")))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64).unwrap_or(0);
    // serde's `flatten` cannot deny unknown fields itself: the keys are checked against the op's own ones (taken
    // before the value is consumed, so nothing is copied or serialised again).
    let keys: Vec<String> = value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let frame: RequestFrame = serde_json::from_value(value).map_err(|e| (id, e.to_string()))?;
    let allowed = frame.request.wire_fields();
    if let Some(k) = keys
        .iter()
        .find(|k| *k != "id" && *k != "op" && !allowed.contains(&k.as_str()))
    {
        return Err((id, format!("unknown field `{k}`")));
    }
    Ok(frame)
}

/// Parses one response body.
pub fn parse_response(body: &[u8]) -> Result<ResponseFrame, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_names_are_the_wire_names() {
        for c in [
            ErrorCode::OutOfStock,
            ErrorCode::UnknownProduct,
            ErrorCode::UnknownDenomination,
            ErrorCode::DuplicateMismatch,
            ErrorCode::AlreadyReversed,
            ErrorCode::NotHolder,
            ErrorCode::BadRequest,
            ErrorCode::Busy,
            ErrorCode::Internal,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    /// One request of every op.
    fn every_request() -> Vec<Request> {
        let t = Terminal {
            terminal_id: "T".into(),
            merchant_id: "M".into(),
            stan: "1".into(),
            transmission: "2".into(),
            rrn: "3".into(),
        };
        vec![
            Request::Hello { version: 1 },
            Request::Sell {
                product: "P".into(),
                amount: 1,
                terminal: t.clone(),
            },
            Request::Reserve {
                product: "P".into(),
                amount: 1,
                count: 2,
                lease_secs: 3,
            },
            Request::Confirm {
                pin_id: 1,
                terminal: t.clone(),
            },
            Request::ConfirmBatch {
                confirms: vec![ConfirmItem {
                    pin_id: 1,
                    terminal: t.clone(),
                }],
            },
            Request::Release { pin_ids: vec![1] },
            Request::Reverse {
                terminal_id: "T".into(),
                stan: "1".into(),
                transmission: "2".into(),
                content: Some(SaleContent {
                    merchant_id: "M".into(),
                    product: "P".into(),
                    amount: 1000,
                    currency: "978".into(),
                }),
            },
            // From a journal written by an older gateway: no content.
            Request::Reverse {
                terminal_id: "T".into(),
                stan: "1".into(),
                transmission: "2".into(),
                content: None,
            },
            Request::ReversePin { pin_id: 1 },
            Request::Renew {
                pin_ids: vec![1],
                lease_secs: 2,
            },
            Request::Stock,
            Request::Held,
            Request::Ping,
        ]
    }

    #[test]
    fn every_op_as_serialised_is_accepted_and_each_field_is_needed() {
        let all = every_request();
        for request in all {
            let frame = RequestFrame { id: 5, request };
            let body = serde_json::to_vec(&frame).unwrap();
            assert_eq!(parse_request(&body).unwrap(), frame);
            // The table lists exactly the serialised fields: each one removed makes the request invalid.
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let n = v.as_object().unwrap().len() - 2;
            let optional_absent = usize::from(matches!(frame.request, Request::Reverse { content: None, .. }));
            assert_eq!(n + optional_absent, frame.request.wire_fields().len(), "{frame:?}");
        }
    }

    #[test]
    fn requests_are_strict() {
        let ok = parse_request(br#"{"id":7,"op":"reserve","product":"P","amount":1000,"count":5,"lease_secs":60}"#);
        assert_eq!(
            ok.unwrap(),
            RequestFrame {
                id: 7,
                request: Request::Reserve {
                    product: "P".into(),
                    amount: 1000,
                    count: 5,
                    lease_secs: 60
                }
            }
        );
        let e = parse_request(br#"{"id":8,"op":"ping","extra":1}"#).unwrap_err();
        assert_eq!(e, (8, "unknown field `extra`".to_string()));
        let e = parse_request(br#"{"id":9,"op":"sell","product":"P","amount":1}"#).unwrap_err();
        assert_eq!(e.0, 9);
        assert!(e.1.contains("terminal"), "{}", e.1);
        let e = parse_request(br#"{"id":10,"op":"sell","product":"P","amount":1,"terminal":{"terminal_id":"T","merchant_id":"M","stan":"1","transmission":"2","rrn":"3","x":1}}"#).unwrap_err();
        assert!(e.1.contains("unknown field `x`"), "{}", e.1);
        assert_eq!(parse_request(br#"{"id":11,"op":"steal"}"#).unwrap_err().0, 11);
        assert_eq!(parse_request(b"\xff").unwrap_err().0, 0);
        assert_eq!(parse_request(br#"{"op":"ping"}"#).unwrap_err().0, 0);
    }

    /// The one-pass parse accepts exactly what the strict slow one accepts, with the same result: every op, each
    /// with a field removed, a field of another op added, a field set to null, and a field doubled.
    #[test]
    fn fast_and_slow_parses_agree() {
        let t = serde_json::json!({"terminal_id":"T","merchant_id":"M","stan":"1","transmission":"2","rrn":"3"});
        let extras: Vec<(&str, serde_json::Value)> = vec![
            ("version", 1.into()),
            ("product", "P".into()),
            ("amount", 5.into()),
            ("terminal", t.clone()),
            ("count", 3.into()),
            ("lease_secs", 60.into()),
            ("pin_id", 9.into()),
            ("confirms", serde_json::json!([{"pin_id": 1, "terminal": t}])),
            ("pin_ids", serde_json::json!([1, 2])),
            ("terminal_id", "T".into()),
            ("stan", "1".into()),
            ("transmission", "2".into()),
            (
                "content",
                serde_json::json!({"merchant_id": "M", "product": "P", "amount": 5, "currency": "978"}),
            ),
            ("colour", "red".into()),
        ];
        // Every op, and one that does not exist.
        let ops: Vec<&str> = every_request().iter().map(Request::op_name).chain(["steal"]).collect();
        let own: Vec<_> = extras.iter().filter(|(k, _)| *k != "colour").cloned().collect();
        let mut bodies: Vec<String> = every_request()
            .into_iter()
            .map(|request| serde_json::to_string(&RequestFrame { id: 5, request }).unwrap())
            .collect();
        for &op in &ops {
            // One or two fields of the table, with the op, with or without the id.
            for i in 0..own.len() {
                for j in i..own.len() {
                    for with_id in [true, false] {
                        let mut m = serde_json::Map::new();
                        if with_id {
                            m.insert("id".into(), 4.into());
                        }
                        m.insert("op".into(), op.into());
                        m.insert(own[i].0.into(), own[i].1.clone());
                        m.insert(own[j].0.into(), own[j].1.clone());
                        bodies.push(serde_json::Value::Object(m).to_string());
                    }
                }
            }
        }
        // Each valid request as serialised, then mutated.
        for body in bodies.clone() {
            if parse_request_slow(body.as_bytes()).is_ok() {
                let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&body).unwrap();
                for (k, _) in v.iter() {
                    let mut m = v.clone();
                    m.remove(k);
                    bodies.push(serde_json::Value::Object(m.clone()).to_string());
                    let mut m = v.clone();
                    m.insert(k.clone(), serde_json::Value::Null);
                    bodies.push(serde_json::Value::Object(m).to_string());
                    bodies.push(format!("{},\"{k}\":{}}}", &body[..body.len() - 1], v[k]));
                }
                for (k, x) in &extras {
                    let mut m = v.clone();
                    if m.insert(k.to_string(), x.clone()).is_none() {
                        bodies.push(serde_json::Value::Object(m).to_string());
                    }
                }
            }
        }
        for op in &ops {
            bodies.push(format!(r#"{{"id":3,"op":"{op}"}}"#));
        }
        let mut valid = 0;
        for body in &bodies {
            let slow = parse_request_slow(body.as_bytes());
            valid += slow.is_ok() as usize;
            assert_eq!(parse_request(body.as_bytes()), slow, "{body}");
        }
        assert!(valid > 12 && valid < bodies.len() / 2, "{valid} of {}", bodies.len());
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
}
