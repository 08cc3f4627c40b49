//! Where the MAC sits in an ISO 8583 message, and the bytes it covers.
//!
//! A message carries one MAC, in the last field its bitmap announces: field 64 when only the primary bitmap is
//! present, field 128 when the secondary bitmap is (ISO 8583:1987). Being the last field, its bytes are the last
//! bytes of the message. The MAC covers the message as sent from its MTI through the last byte before the MAC
//! field, the bitmaps included with the MAC's bit set; length headers and the TPDU are not part of it (the
//! functions here are given one message without them). That rule is [`mac_input`], the one place that says it:
//! verifying and signing both go through it, so a dialect or terminal group that MACs another selection changes it
//! there.
//!
//! The MAC field must be defined by the dialect as a fixed binary field of [`MIN_MAC_LEN`] to [`MAC_LEN`] bytes
//! (the shipped dialects: 8 bytes, written raw in `iso87-bcd` and `iso87-ebcdic`, as 16 hex characters in the
//! ASCII ones); a shorter field carries the MAC's leftmost bytes.
//!
//! No error here names a key byte or a byte of a MAC, received or expected.

use bytes::BytesMut;

use super::{MacKey, MAC_LEN, MIN_MAC_LEN};
use crate::iso8583::spec::HeaderEncoding;
use crate::iso8583::{Class, CodecError, Dialect, Encoding, FieldSpec, Message, Var};

/// Why a message's MAC is refused or cannot be made. No variant carries a key or MAC byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// The message has no MAC field (field 64, or 128 when the secondary bitmap is present).
    #[error("the message carries no MAC (field {field} is absent)")]
    Missing { field: u8 },
    /// The MAC field's value is not as long as the dialect's field.
    #[error("field {field}: a MAC of {found} bytes, the field takes {expected}")]
    WrongLength { field: u8, found: usize, expected: usize },
    /// The MAC does not match the message under any of the terminal's keys.
    #[error("the MAC does not match the message")]
    Mismatch,
    /// The terminal has no MAC key.
    #[error("no MAC key for this terminal")]
    NoKey,
    /// The dialect cannot carry a MAC in that field.
    #[error(
        "dialect {dialect}: field {field} is not a fixed binary field of {MIN_MAC_LEN} to {MAC_LEN} bytes, it cannot \
         carry a MAC"
    )]
    Dialect { dialect: String, field: u8 },
    /// The bytes given do not end with the message's MAC field: they are not the message as received.
    #[error("the message's bytes do not end with its MAC field (field {field})")]
    Misplaced { field: u8 },
    /// The bytes given are too short to be a message of the dialect.
    #[error("not an encoded message: {reason}")]
    Malformed { reason: &'static str },
    /// The answer could not be encoded.
    #[error("encoding the answer: {0}")]
    Encode(#[from] CodecError),
}

/// The field that carries a message's MAC: 128 when the secondary bitmap is present (a field above 64 is), else 64.
pub fn mac_field(msg: &Message) -> u8 {
    if msg.present() >> 64 != 0 {
        128
    } else {
        64
    }
}

/// The dialect's definition of MAC field `field`, if it can carry a MAC.
fn mac_spec(dialect: &Dialect, field: u8) -> Result<&FieldSpec, MacError> {
    match dialect.field(field) {
        Some(spec)
            if spec.class == Class::Binary
                && spec.var == Var::Fixed
                && (MIN_MAC_LEN..=MAC_LEN).contains(&spec.length) =>
        {
            Ok(spec)
        }
        _ => Err(MacError::Dialect {
            dialect: dialect.name.clone(),
            field,
        }),
    }
}

/// Bytes of the MTI on the wire.
fn mti_len(dialect: &Dialect) -> usize {
    match dialect.mti {
        HeaderEncoding::Bcd => 2,
        _ => 4,
    }
}

/// Bytes of one bitmap on the wire.
fn bitmap_len(dialect: &Dialect) -> usize {
    match dialect.bitmap {
        HeaderEncoding::Hex => 16,
        _ => 8,
    }
}

/// The bytes a MAC in field `field` covers, out of `raw`, one whole message whose last field is that MAC field:
/// everything from the MTI to the last byte before the MAC field.
pub fn mac_input<'a>(dialect: &Dialect, raw: &'a [u8], field: u8) -> Result<&'a [u8], MacError> {
    let spec = mac_spec(dialect, field)?;
    let wire = spec.data_bytes(spec.length);
    let header = mti_len(dialect) + bitmap_len(dialect) * if field > 64 { 2 } else { 1 };
    if raw.len() < header + wire {
        return Err(MacError::Misplaced { field });
    }
    Ok(&raw[..raw.len() - wire])
}

/// The MAC field's value as written at the end of `raw` (hex characters decoded).
fn trailing_mac(spec: &FieldSpec, raw: &[u8]) -> Option<Vec<u8>> {
    let wire = spec.data_bytes(spec.length);
    let tail = raw.get(raw.len().checked_sub(wire)?..)?;
    match spec.encoding {
        Encoding::Hex => crate::iso8583::from_hex(std::str::from_utf8(tail).ok()?).ok(),
        _ => Some(tail.to_vec()),
    }
}

/// Checks the MAC of a request: `raw` is the message as received (no length header or TPDU), `msg` what it
/// decoded to with `dialect`.
pub fn verify_request(dialect: &Dialect, raw: &[u8], msg: &Message, key: &MacKey) -> Result<(), MacError> {
    verify_request_any(dialect, raw, msg, std::slice::from_ref(key)).map(|_| ())
}

/// Checks the MAC of a request against each of a terminal's keys in turn (the newest first, say, while it is being
/// re-keyed), and says which one matched. No key at all is [`MacError::NoKey`].
pub fn verify_request_any<'k>(
    dialect: &Dialect,
    raw: &[u8],
    msg: &Message,
    keys: impl IntoIterator<Item = &'k MacKey>,
) -> Result<usize, MacError> {
    let field = mac_field(msg);
    let spec = mac_spec(dialect, field)?;
    let Some(received) = msg.get(field) else {
        return Err(MacError::Missing { field });
    };
    if received.len() != spec.length {
        return Err(MacError::WrongLength {
            field,
            found: received.len(),
            expected: spec.length,
        });
    }
    // The MAC field is the message's last: the bytes received must end with it, or they are not this message.
    if trailing_mac(spec, raw).as_deref() != Some(&received[..]) {
        return Err(MacError::Misplaced { field });
    }
    let input = mac_input(dialect, raw, field)?;
    let mut any = false;
    for (i, key) in keys.into_iter().enumerate() {
        any = true;
        if key.verify(input, received) {
            return Ok(i);
        }
    }
    Err(if any { MacError::Mismatch } else { MacError::NoKey })
}

/// Adds the MAC to an encoded answer (one message of `dialect`, without length header or TPDU): field 128 when
/// its secondary bitmap is present, else field 64. The field's bit is set in the bitmap and the MAC appended, or,
/// when the answer has that field already, its bytes are replaced.
pub fn sign_answer(dialect: &Dialect, answer: &mut BytesMut, key: &MacKey) -> Result<(), MacError> {
    let (mti, bitmap) = (mti_len(dialect), bitmap_len(dialect));
    let hex = dialect.bitmap == HeaderEncoding::Hex;
    if answer.len() < mti + bitmap {
        return Err(MacError::Malformed {
            reason: "shorter than its MTI and bitmap",
        });
    }
    let nibble = |c: u8| -> Result<u8, MacError> {
        (c as char).to_digit(16).map(|d| d as u8).ok_or(MacError::Malformed {
            reason: "a bitmap character is not a hex digit",
        })
    };
    let first = if hex { nibble(answer[mti])? << 4 } else { answer[mti] };
    let secondary = first & 0x80 != 0;
    let field = if secondary { 128 } else { 64 };
    let spec = mac_spec(dialect, field)?;
    let wire = spec.data_bytes(spec.length);
    // The last byte (or hex character) of the bitmap that holds the MAC field's bit, its lowest bit.
    let last = mti + bitmap * if secondary { 2 } else { 1 } - 1;
    if answer.len() <= last {
        return Err(MacError::Malformed {
            reason: "shorter than its secondary bitmap",
        });
    }
    let present = if hex {
        let n = nibble(answer[last])?;
        answer[last] = b"0123456789ABCDEF"[(n | 1) as usize];
        n & 1 != 0
    } else {
        let present = answer[last] & 1 != 0;
        answer[last] |= 1;
        present
    };
    if present {
        if answer.len() < last + 1 + wire {
            return Err(MacError::Misplaced { field });
        }
        answer.truncate(answer.len() - wire);
    }
    // The field's room first, so that the MAC's input is taken by the one rule, from the message as it will be sent.
    let at = answer.len();
    answer.resize(at + wire, 0);
    let mac = key.compute(mac_input(dialect, answer, field)?);
    let mac = &mac[..spec.length];
    answer.truncate(at);
    match spec.encoding {
        Encoding::Hex => answer.extend_from_slice(crate::iso8583::to_hex(mac).as_bytes()),
        _ => answer.extend_from_slice(mac),
    }
    Ok(())
}

/// Encodes `msg` with `dialect` and adds its MAC ([`sign_answer`]).
pub fn sign_message(dialect: &Dialect, msg: &Message, key: &MacKey) -> Result<BytesMut, MacError> {
    let mut out = dialect.encode(msg)?;
    sign_answer(dialect, &mut out, key)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::iso8583::{from_hex, to_hex, Dialects, Mti};
    use crate::mac::MacAlgorithm;

    fn dialect(name: &str) -> Dialect {
        Dialects::builtin().get(name).unwrap().clone()
    }

    fn sale() -> Message {
        let mut m = Message::new(Mti::SALE);
        m.set(3, "000000")
            .set(4, "000000001000")
            .set(11, "000123")
            .set(41, "TERM0001")
            .set(42, "MERCHANT0000001")
            .set(48, "TOPUP-EU-10")
            .set(49, "978");
        m
    }

    const DIALECTS: [&str; 4] = ["iso87-ascii", "iso87-ascii-binbitmap", "iso87-bcd", "iso87-ebcdic"];

    /// Messages carrying a MAC placed and computed by Python (`tools/interop/make_mac_fixtures.py`) around messages
    /// encoded by pyiso8583: each verifies, and signing the same message without its MAC gives the same bytes.
    #[test]
    fn interop_messages_verify_and_sign_to_the_same_bytes() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
        let text = std::fs::read_to_string(format!("{root}/mac/interop-macs.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = doc["messages"].as_array().unwrap();
        assert_eq!(cases.len(), 24);
        let mut fields = std::collections::BTreeSet::new();
        for c in cases {
            let (name, scenario) = (c["dialect"].as_str().unwrap(), c["scenario"].as_str().unwrap());
            let d = dialect(name);
            let algorithm: MacAlgorithm = c["algorithm"].as_str().unwrap().parse().unwrap();
            let key = MacKey::from_hex(algorithm, c["key"].as_str().unwrap()).unwrap();
            let raw = Bytes::from(from_hex(c["hex"].as_str().unwrap()).unwrap());
            let msg = d.decode(&raw).unwrap();
            let field = c["field"].as_u64().unwrap() as u8;
            assert_eq!(mac_field(&msg), field, "{name} {scenario}");
            fields.insert(field);
            verify_request(&d, &raw, &msg, &key).unwrap_or_else(|e| panic!("{name} {scenario} {algorithm}: {e}"));
            // Signed from the message without a MAC (pyiso8583's bytes), and from the message with a stale one.
            let plain = std::fs::read_to_string(format!("{root}/iso8583/interop/{name}--{scenario}.hex")).unwrap();
            let mut answer = BytesMut::from(&from_hex(plain.trim()).unwrap()[..]);
            sign_answer(&d, &mut answer, &key).unwrap();
            assert_eq!(to_hex(&answer), to_hex(&raw), "{name} {scenario} {algorithm}");
            sign_answer(&d, &mut answer, &key).unwrap();
            assert_eq!(to_hex(&answer), to_hex(&raw), "signed twice: {name} {scenario}");
            let mut stale = msg.clone();
            stale.set(field, vec![0u8; 8]);
            assert_eq!(to_hex(&sign_message(&d, &stale, &key).unwrap()), to_hex(&raw));
        }
        assert_eq!(fields, [64, 128].into());
    }

    #[test]
    fn a_signed_message_verifies_in_every_dialect_and_any_tampered_byte_is_refused() {
        for name in DIALECTS {
            let d = dialect(name);
            for algorithm in MacAlgorithm::ALL {
                let key = MacKey::generate(algorithm).unwrap();
                let raw = sign_message(&d, &sale(), &key).unwrap().freeze();
                let msg = d.decode(&raw).unwrap();
                assert!(msg.has(64) && !msg.has(128), "{name}");
                assert_eq!(verify_request(&d, &raw, &msg, &key), Ok(()), "{name} {algorithm}");
                // Every byte, MTI and bitmap included, is covered: a change is refused, or does not decode.
                for i in 0..raw.len() {
                    for flip in [0x01u8, 0x10] {
                        let mut bad = raw.to_vec();
                        bad[i] ^= flip;
                        let bad = Bytes::from(bad);
                        if let Ok(m) = d.decode(&bad) {
                            let r = verify_request(&d, &bad, &m, &key);
                            assert!(r.is_err(), "{name} {algorithm}: byte {i} ^ {flip:#04x} accepted");
                        }
                    }
                }
                // The decoded message with another MAC value, against the same bytes: not the bytes received.
                let mut other = msg.clone();
                other.set(64, vec![0u8; 8]);
                assert_eq!(
                    verify_request(&d, &raw, &other, &key),
                    Err(MacError::Misplaced { field: 64 })
                );
                // Another key of the same algorithm.
                let stranger = MacKey::generate(algorithm).unwrap();
                assert_eq!(verify_request(&d, &raw, &msg, &stranger), Err(MacError::Mismatch));
            }
        }
    }

    #[test]
    fn a_missing_mac_and_the_field_128_case() {
        let d = dialect("iso87-bcd");
        let key = MacKey::generate(MacAlgorithm::AesCmac).unwrap();
        // No field 64.
        let raw = d.encode(&sale()).unwrap().freeze();
        let msg = d.decode(&raw).unwrap();
        assert_eq!(
            verify_request(&d, &raw, &msg, &key),
            Err(MacError::Missing { field: 64 })
        );
        // A field above 64 (the secondary bitmap): the MAC is field 128, and a MAC in field 64 is not one.
        let mut with_90 = sale();
        with_90.set_mti(Mti::REVERSAL);
        with_90.set(90, "020000012311281735000000000000000000000000");
        let raw = sign_message(&d, &with_90, &key).unwrap().freeze();
        let msg = d.decode(&raw).unwrap();
        assert!(msg.has(128) && !msg.has(64));
        assert_eq!(verify_request(&d, &raw, &msg, &key), Ok(()));
        let mut in_64 = with_90.clone();
        in_64.set(64, key.compute(b"anything").to_vec());
        let raw = d.encode(&in_64).unwrap().freeze();
        let msg = d.decode(&raw).unwrap();
        assert_eq!(
            verify_request(&d, &raw, &msg, &key),
            Err(MacError::Missing { field: 128 })
        );
        // Field 64 is part of what the MAC in 128 covers.
        let raw = sign_message(&d, &in_64, &key).unwrap();
        let mut bad = raw.to_vec();
        let at = bad.len() - 8 - 42 / 2 - 1; // field 64's last byte: before field 90's 21 BCD bytes and 128
        bad[at] ^= 1;
        let bad = Bytes::from(bad);
        let msg = d.decode(&bad).unwrap();
        assert_eq!(verify_request(&d, &bad, &msg, &key), Err(MacError::Mismatch));
    }

    #[test]
    fn keys_in_turn_lengths_and_dialects() {
        let d = dialect("iso87-ascii");
        let old = MacKey::generate(MacAlgorithm::RetailDes).unwrap();
        let new = MacKey::generate(MacAlgorithm::RetailDes).unwrap();
        let raw = sign_message(&d, &sale(), &old).unwrap().freeze();
        let msg = d.decode(&raw).unwrap();
        assert_eq!(verify_request_any(&d, &raw, &msg, [&new, &old]), Ok(1));
        assert_eq!(verify_request_any(&d, &raw, &msg, [&new]), Err(MacError::Mismatch));
        assert_eq!(verify_request_any(&d, &raw, &msg, []), Err(MacError::NoKey));

        // A value that is not the field's length (a message built by hand).
        let mut short = msg.clone();
        short.set(64, vec![1u8; 5]);
        assert_eq!(
            verify_request(&d, &raw, &short, &old),
            Err(MacError::WrongLength {
                field: 64,
                found: 5,
                expected: 8
            })
        );

        // A dialect whose field 64 carries the leftmost 4 bytes: 8 hex characters on the wire.
        let text = include_str!("../../protocols/iso8583/iso87-ascii.toml").replace(
            "64 = { name = \"Message authentication code (MAC)\", class = \"b\", length = 8",
            "64 = { name = \"Message authentication code (MAC)\", class = \"b\", length = 4",
        );
        let four = Dialect::from_toml(&text, "four").unwrap();
        let raw4 = sign_message(&four, &sale(), &old).unwrap().freeze();
        let msg4 = four.decode(&raw4).unwrap();
        assert_eq!(msg4.get(64).unwrap().len(), 4);
        assert_eq!(raw4.len() + 8, raw.len());
        assert_eq!(verify_request(&four, &raw4, &msg4, &old), Ok(()));
        assert_eq!(msg4.get(64).unwrap()[..], msg.get(64).unwrap()[..4]);

        // A dialect whose field 64 is text cannot carry a MAC.
        let text = include_str!("../../protocols/iso8583/iso87-ascii.toml").replace(
            "64 = { name = \"Message authentication code (MAC)\", class = \"b\", length = 8",
            "64 = { name = \"Message authentication code (MAC)\", class = \"ans\", length = 8",
        );
        let text_mac = Dialect::from_toml(&text, "text").unwrap();
        let e = verify_request(&text_mac, &raw, &msg, &old).unwrap_err();
        assert_eq!(
            e,
            MacError::Dialect {
                dialect: "iso87-ascii".into(),
                field: 64
            }
        );
        let mut answer = d.encode(&sale()).unwrap();
        assert!(sign_answer(&text_mac, &mut answer, &old).is_err());
        assert!(matches!(
            sign_answer(&d, &mut BytesMut::from(&b"0210"[..]), &old),
            Err(MacError::Malformed { .. })
        ));
        assert!(matches!(
            mac_input(&d, &raw[..20], 64),
            Err(MacError::Misplaced { field: 64 })
        ));
    }

    /// What an error says names fields and lengths, never a byte of the key or of a MAC.
    #[test]
    fn errors_name_no_key_or_mac_byte() {
        let d = dialect("iso87-ascii-binbitmap");
        let key = MacKey::generate(MacAlgorithm::AesCmac).unwrap();
        let stranger = MacKey::generate(MacAlgorithm::AesCmac).unwrap();
        let raw = sign_message(&d, &sale(), &key).unwrap().freeze();
        let msg = d.decode(&raw).unwrap();
        let e = verify_request(&d, &raw, &msg, &stranger).unwrap_err();
        let mut shown = vec![e.to_string(), format!("{e:?}")];
        for e in [
            MacError::Missing { field: 64 },
            MacError::WrongLength {
                field: 64,
                found: 5,
                expected: 8,
            },
            MacError::NoKey,
            MacError::Misplaced { field: 128 },
        ] {
            shown.push(e.to_string());
        }
        let secrets = [
            to_hex(&key.expose()[..4]),
            to_hex(&stranger.expose()[..4]),
            to_hex(&msg.get(64).unwrap()[..4]),
            to_hex(&stranger.compute(mac_input(&d, &raw, 64).unwrap())[..4]),
        ];
        for s in &shown {
            for secret in &secrets {
                assert!(!s.contains(secret.as_str()), "{s}");
            }
        }
        assert_eq!(shown[0], "the MAC does not match the message");
    }
}
