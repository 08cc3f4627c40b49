//! Strict parsing of PSP bodies: bytes in, messages (or a [`PspError`] naming what is wrong) out.

use serde::Deserialize;

use super::{ConfirmItem, PspError, Request, RequestFrame, ResponseFrame, Terminal};
use crate::sale::{ReversalReason, SaleContent};

/// Parses one request body strictly. On error, [`PspError::BadRequest`]: the id if one could be read, and a message
/// naming what is wrong.
///
/// A well-formed request is read in one pass ([`WireRequest`]); anything the one pass does not accept is read
/// again the slow way, which decides whether it is valid and words the error (so both ways accept exactly what the
/// slow one does: `fast_and_slow_parses_agree` checks it).
pub fn parse_request(body: &[u8]) -> Result<RequestFrame, PspError> {
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
    #[serde(default, deserialize_with = "present")]
    reason: Option<ReversalReason>,
    #[serde(default, deserialize_with = "present")]
    requested_at: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    merchant_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    currency: Option<String>,
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
            reason,
            requested_at,
            merchant_id,
            currency,
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
            reason.is_some(),
            requested_at.is_some(),
            merchant_id.is_some(),
            currency.is_some(),
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
                reason: reason.unwrap_or_default(),
                requested_at,
            },
            "reverse_pin" => Request::ReversePin { pin_id: pin_id? },
            "renew" => Request::Renew {
                pin_ids: pin_ids?,
                lease_secs: lease_secs?,
            },
            "stock" => Request::Stock,
            "check_sale" => Request::CheckSale { terminal: terminal? },
            "held" => Request::Held,
            "ping" => Request::Ping,
            "allowance" => Request::Allowance {
                merchant_id: merchant_id?,
                currency: currency?,
                amount: amount?,
            },
            // A count past `u32` is left to the slow parse, which refuses it with its message.
            "sales_allowance" => Request::SalesAllowance {
                merchant_id: merchant_id?,
                count: u32::try_from(count?).ok()?,
            },
            _ => return None,
        };
        // Every field the op takes was there (`?` above): any more is another op's.
        // (`content`, `reason` and `requested_at` of a reverse may be absent; an explicit `terminal` is left to the slow parse.)
        let optional_absent = request.optional_absent();
        (present + optional_absent == request.wire_fields().len()).then_some(RequestFrame { id: id?, request })
    }
}

/// The strict parse of any body, valid or not: through a JSON tree, so that the id is known for the error answer
/// whatever else is wrong. Public for the fuzz target `psp_request`, which checks that [`parse_request`] agrees.
#[doc(hidden)]
pub fn parse_request_slow(body: &[u8]) -> Result<RequestFrame, PspError> {
    let bad = |id: u64, message: String| PspError::BadRequest { id, message };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(0, format!("not JSON: {e}")))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64).unwrap_or(0);
    // serde's `flatten` cannot deny unknown fields itself: the keys are checked against the op's own ones (taken
    // before the value is consumed, so nothing is copied or serialised again).
    let keys: Vec<String> = value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let frame: RequestFrame = serde_json::from_value(value).map_err(|e| bad(id, e.to_string()))?;
    let allowed = frame.request.wire_fields();
    if let Some(k) = keys
        .iter()
        .find(|k| *k != "id" && *k != "op" && !allowed.contains(&k.as_str()))
    {
        return Err(bad(id, format!("unknown field `{k}`")));
    }
    Ok(frame)
}

/// Parses one answer body.
pub fn parse_response(body: &[u8]) -> Result<ResponseFrame, PspError> {
    serde_json::from_slice(body).map_err(|e| PspError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parse's result with its refusal as the id and message the `bad_request` answer carries; any other error
    /// fails the test (a parse refuses a body in one way only).
    fn refusal(r: Result<RequestFrame, PspError>) -> Result<RequestFrame, (u64, String)> {
        r.map_err(|e| match e {
            PspError::BadRequest { id, message } => (id, message),
            other => panic!("not a bad request: {other:?}"),
        })
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
                reason: ReversalReason::Terminal,
                requested_at: Some(1_700_000_000),
            },
            // From a journal written by an older gateway: no content.
            Request::Reverse {
                terminal_id: "T".into(),
                stan: "1".into(),
                transmission: "2".into(),
                content: None,
                reason: ReversalReason::Terminal,
                requested_at: None,
            },
            // The gateway's own reversal of an answer sent but never acknowledged.
            Request::Reverse {
                terminal_id: "T".into(),
                stan: "1".into(),
                transmission: "2".into(),
                content: None,
                reason: ReversalReason::Unacknowledged,
                requested_at: Some(1_700_000_000),
            },
            Request::ReversePin { pin_id: 1 },
            Request::CheckSale { terminal: t.clone() },
            Request::Allowance {
                merchant_id: "M".into(),
                currency: "978".into(),
                amount: 10_000,
            },
            Request::SalesAllowance {
                merchant_id: "M".into(),
                count: 5,
            },
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
            let optional_absent = frame.request.optional_absent();
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
        let e = refusal(parse_request(br#"{"id":8,"op":"ping","extra":1}"#));
        assert_eq!(e, Err((8, "unknown field `extra`".to_string())));
        let (id, message) = refusal(parse_request(br#"{"id":9,"op":"sell","product":"P","amount":1}"#)).unwrap_err();
        assert_eq!(id, 9);
        assert!(message.contains("terminal"), "{message}");
        let (_, message) = refusal(parse_request(br#"{"id":10,"op":"sell","product":"P","amount":1,"terminal":{"terminal_id":"T","merchant_id":"M","stan":"1","transmission":"2","rrn":"3","x":1}}"#)).unwrap_err();
        assert!(message.contains("unknown field `x`"), "{message}");
        assert_eq!(refusal(parse_request(br#"{"id":11,"op":"steal"}"#)).unwrap_err().0, 11);
        assert_eq!(refusal(parse_request(b"\xff")).unwrap_err().0, 0);
        assert_eq!(refusal(parse_request(br#"{"op":"ping"}"#)).unwrap_err().0, 0);
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
            ("merchant_id", "M".into()),
            ("currency", "978".into()),
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
            let slow = refusal(parse_request_slow(body.as_bytes()));
            valid += slow.is_ok() as usize;
            assert_eq!(refusal(parse_request(body.as_bytes())), slow, "{body}");
        }
        assert!(valid > 12 && valid < bodies.len() / 2, "{valid} of {}", bodies.len());
    }
}
