//! The JSON form of a message, used by the CLI and the golden fixtures:
//! `{"mti": "0200", "fields": {"3": "000000", "52": "0123456789ABCDEF"}}` — field numbers as keys, in ascending
//! order; text and numeric fields as their text, binary fields as uppercase hex.

use serde_json::{Map, Value};

use super::charset::{from_hex, to_hex};
use super::error::{CodecError, FieldRef};
use super::message::{Message, Mti};
use super::spec::{Class, Dialect};

impl Dialect {
    /// The message as JSON; sensitive fields masked unless `reveal`.
    pub fn to_json(&self, msg: &Message, reveal: bool) -> Value {
        let mut fields = Map::new();
        for (n, v) in msg.fields() {
            let text = match msg.masked(n) {
                Some(masked) if !reveal => masked,
                _ if self.field(n).is_some_and(|s| s.class == Class::Binary) => to_hex(v),
                _ => String::from_utf8_lossy(v).into_owned(),
            };
            fields.insert(n.to_string(), Value::String(text));
        }
        let mut root = Map::new();
        root.insert("mti".into(), Value::String(msg.mti().to_string()));
        root.insert("fields".into(), Value::Object(fields));
        Value::Object(root)
    }

    /// A message from its JSON form. Values are checked against the dialect when encoded, not here; binary fields
    /// must be hex.
    pub fn from_json(&self, value: &Value) -> Result<Message, CodecError> {
        let root = value
            .as_object()
            .ok_or_else(|| CodecError::Json("expected an object".into()))?;
        if let Some(k) = root.keys().find(|k| *k != "mti" && *k != "fields") {
            return Err(CodecError::Json(format!(
                "unknown key `{k}`; expected `mti` and `fields`"
            )));
        }
        let mti: Mti = root
            .get("mti")
            .and_then(Value::as_str)
            .ok_or_else(|| CodecError::Json("`mti` must be a string of 4 digits".into()))?
            .parse()?;
        let fields = root
            .get("fields")
            .and_then(Value::as_object)
            .ok_or_else(|| CodecError::Json("`fields` must be an object keyed by field number".into()))?;
        let mut msg = Message::new(mti);
        msg.set_masks(self.mask_pan, self.mask_full);
        for (k, v) in fields {
            let n: u8 = match k.parse() {
                Ok(n) if (2..=128).contains(&n) => n,
                _ => {
                    return Err(CodecError::Json(format!(
                        "field key `{k}` is not a field number 2..=128 (the bitmap is derived from the fields)"
                    )))
                }
            };
            let at = FieldRef::Field(n);
            let text = v.as_str().ok_or_else(|| CodecError::InvalidValue {
                at,
                reason: "value must be a JSON string".into(),
            })?;
            let Some(spec) = self.field(n) else {
                return Err(CodecError::UndefinedField {
                    at,
                    offset: 0,
                    dialect: self.name.clone(),
                });
            };
            if spec.class == Class::Binary {
                let bytes = from_hex(text).map_err(|i| CodecError::InvalidValue {
                    at,
                    reason: format!("binary field: expected hex digits, bad character or odd count at position {i}"),
                })?;
                msg.set(n, bytes);
            } else {
                msg.set(n, text.as_bytes().to_vec());
            }
        }
        Ok(msg)
    }
}
