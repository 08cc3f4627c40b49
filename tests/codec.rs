//! The codec against bytes written out by hand, its errors (exact text, field and offset), masking, streaming,
//! dialect files, and properties over random messages and random bytes.

use bytes::Bytes;
use pingate::iso8583::{
    from_hex, to_hex, Class, CodecError, Dialect, DialectError, Dialects, FieldRef, Message, Mti, Var,
};
use proptest::prelude::*;

fn dialect(name: &str) -> Dialect {
    Dialects::builtin().get(name).unwrap().clone()
}

fn hex(s: &str) -> Vec<u8> {
    from_hex(s).unwrap()
}

/// The reference message of these tests: a track-2 sale with an odd-length LL field and a PIN block.
fn reference() -> Message {
    let mut m = Message::new(Mti::SALE);
    m.set(3, "000000")
        .set(4, "000000002000")
        .set(11, "000123")
        .set(22, "021")
        .set(35, "4111111111111111=2512")
        .set(41, "TERM0001")
        .set(48, "TOPUP")
        .set(52, hex("0123456789ABCDEF"));
    m
}

// Bitmap of fields 3, 4, 11, 22, 35, 41, 48, 52, worked out bit by bit:
// 30 (3, 4) 20 (11) 04 (22) 00 20 (35) 81 (41, 48) 10 (52) 00.
const REF_BITMAP: &str = "3020040020811000";

#[test]
fn bcd_reference_bytes_by_hand() {
    let expected = [
        "0200",                   // MTI, BCD
        REF_BITMAP,               // binary bitmap
        "000000",                 // 3: n6 BCD
        "000000002000",           // 4: n12 BCD
        "000123",                 // 11: n6
        "0021",                   // 22: n3, left-padded with a 0 nibble
        "21",                     // 35: LL prefix, 21 characters, BCD
        "4111111111111111D25120", // 35: '=' as nibble D, right-padded (variable field)
        "5445524D30303031",       // 41: "TERM0001" ASCII
        "0005",                   // 48: LLL prefix, 2 bytes BCD
        "544F505550",             // 48: "TOPUP"
        "0123456789ABCDEF",       // 52: raw
    ]
    .concat();
    let d = dialect("iso87-bcd");
    assert_eq!(to_hex(&d.encode(&reference()).unwrap()), expected);
    assert_eq!(d.decode(&Bytes::from(hex(&expected))).unwrap(), reference());
}

#[test]
fn ascii_reference_bytes_by_hand() {
    let text = |s: &str| to_hex(s.as_bytes());
    let fields = [
        text("000000"),
        text("000000002000"),
        text("000123"),
        text("021"),
        text("21"),
        text("4111111111111111=2512"),
        text("TERM0001"),
        text("005"),
        text("TOPUP"),
        text("0123456789ABCDEF"), // 52: binary as hex characters
    ]
    .concat();
    let hex_bitmap = [text("0200"), text(REF_BITMAP), fields.clone()].concat();
    let bin_bitmap = [text("0200"), REF_BITMAP.to_string(), fields].concat();
    for (name, expected) in [("iso87-ascii", hex_bitmap), ("iso87-ascii-binbitmap", bin_bitmap)] {
        let d = dialect(name);
        assert_eq!(to_hex(&d.encode(&reference()).unwrap()), expected, "{name}");
        assert_eq!(d.decode(&Bytes::from(hex(&expected))).unwrap(), reference(), "{name}");
    }
}

#[test]
fn ebcdic_reference_bytes_by_hand() {
    let mut m = Message::new(Mti::SALE);
    m.set(3, "000000").set(41, "TERM0001");
    // F0F2F0F0 "0200"; bitmap 2000000000800000; "000000"; "TERM0001" in cp037.
    let expected = "F0F2F0F0".to_string() + "2000000000800000" + "F0F0F0F0F0F0" + "E3C5D9D4F0F0F0F1";
    let d = dialect("iso87-ebcdic");
    assert_eq!(to_hex(&d.encode(&m).unwrap()), expected);
    assert_eq!(d.decode(&Bytes::from(hex(&expected))).unwrap(), m);
}

#[test]
fn signed_amounts_and_secondary_bitmap() {
    let mut m = Message::new(Mti::REVERSAL);
    m.set(28, "C00001000")
        .set(90, "020000012311281735000000000000000000000000")
        .set(128, hex("1122334455667788"));
    let d = dialect("iso87-bcd");
    let out = to_hex(&d.encode(&m).unwrap());
    // Bitmap: bit 1 (secondary present) and 28 → 80 00 00 10 ...; secondary: 90 → byte 4 bit 0x40, 128 → last bit.
    assert_eq!(&out[..4], "0400");
    assert_eq!(&out[4..36], "8000001000000000".to_string() + "0000004000000001");
    assert_eq!(&out[36..46], "4300001000", "xn: sign in ASCII, then 8 digits BCD");
    assert_eq!(d.decode(&Bytes::from(hex(&out))).unwrap(), m);
    let a = dialect("iso87-ascii");
    let bytes = a.encode(&m).unwrap();
    assert_eq!(&bytes[4..36], b"80000010000000000000004000000001");
    assert_eq!(&bytes[36..45], b"C00001000");
    assert_eq!(a.decode(&bytes.freeze()).unwrap(), m);
}

#[test]
fn typed_accessors() {
    let mut m = reference();
    m.set(7, "1128173500")
        .set(42, "MERCHANT01     ")
        .set(49, "978")
        .set(39, "00");
    assert_eq!(m.mti(), Mti::SALE);
    assert_eq!(m.amount(), Some(2000));
    assert_eq!(m.stan(), Some(123));
    assert_eq!(m.terminal_id(), Some("TERM0001"));
    assert_eq!(m.merchant_id(), Some("MERCHANT01"));
    assert_eq!(m.currency(), Some("978"));
    assert_eq!(m.transmission_datetime(), Some("1128173500"));
    assert_eq!(m.private_data(), Some("TOPUP"));
    assert_eq!(m.response_code(), Some("00"));
    assert_eq!(m.processing_code(), Some("000000"));
    assert_eq!(m.rrn(), None);
    assert_eq!(Mti::SALE.response(), Mti::SALE_RESPONSE);
    assert_eq!(Mti::SALE_REPEAT.response(), Mti::SALE_RESPONSE);
    assert_eq!(Mti::REVERSAL_ADVICE_REPEAT.response(), Mti::REVERSAL_ADVICE_RESPONSE);
    assert!(Mti::SALE_REPEAT.is_repeat() && Mti::SALE.is_request() && !Mti::SALE_RESPONSE.is_request());
    assert_eq!(m.remove(39).as_deref(), Some(&b"00"[..]));
    assert!(!m.has(39));
    assert!("02x0".parse::<Mti>().is_err());
}

#[test]
fn debug_and_display_mask_sensitive_fields() {
    let mut m = reference();
    m.set(2, "4111111111111111").set(63, "PN0161234567890123456SN003ABC");
    let d = dialect("iso87-ascii");
    let decoded = d.decode(&d.encode(&m).unwrap().freeze()).unwrap();
    for shown in [
        format!("{m:?}"),
        format!("{m}"),
        format!("{decoded:?}"),
        format!("{decoded}"),
    ] {
        assert!(
            shown.contains("411111******1111"),
            "PAN shows first 6 and last 4: {shown}"
        );
        for secret in [
            "4111111111111111",
            "1234567890123456",
            "2512",
            "0123456789ABCDEF",
            "0x0123",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
        assert!(shown.contains("TERM0001"));
    }
    let masked = d.to_json(&decoded, false).to_string();
    assert!(
        !masked.contains("1234567890123456") && masked.contains("[masked, 29 bytes]"),
        "{masked}"
    );
    let revealed = d.to_json(&decoded, true).to_string();
    assert!(revealed.contains("1234567890123456"));
}

fn ascii_ref() -> (Dialect, Vec<u8>) {
    let d = dialect("iso87-ascii");
    let b = d.encode(&reference()).unwrap().to_vec();
    (d, b)
}

#[test]
fn decode_errors_name_field_offset_and_byte() {
    let (d, good) = ascii_ref();
    // Layout of `good`: MTI 0..4, bitmap 4..20, field 3 20..26, field 4 26..38, 11 38..44, 22 44..47,
    // 35 47..70 (prefix 2 + 21), 41 70..78, 48 78..86 (prefix 3 + 5), 52 86..102.
    let case = |mutate: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        mutate(&mut b);
        d.decode(&Bytes::from(b)).unwrap_err()
    };
    let e = case(&|b| b[28] = b'A');
    assert_eq!(
        e.to_string(),
        "field 4: expected 12 digits at offset 26, found 0x41 at offset 28"
    );
    assert_eq!(e.field(), Some(FieldRef::Field(4)));

    let e = case(&|b| b.truncate(74));
    assert_eq!(e.to_string(), "field 41: expected 8 bytes at offset 70, only 4 remain");

    let e = case(&|b| b.extend_from_slice(b"XY"));
    assert_eq!(e, CodecError::TrailingBytes { offset: 102, count: 2 });

    let e = case(&|b| b[47..49].copy_from_slice(b"38"));
    assert_eq!(
        e.to_string(),
        "field 35: length 38 at offset 47 is out of bounds, the field allows 0..=37"
    );

    let e = case(&|b| b[79] = b'x');
    assert_eq!(
        e.to_string(),
        "field 48: length prefix at offset 78 is not ASCII digits, found 0x78"
    );

    let e = case(&|b| b[5] = b'G');
    assert_eq!(
        e.to_string(),
        "bitmap: expected 16 hex digits at offset 4, found 0x47 at offset 5"
    );

    let e = case(&|b| b[1] = b'/');
    assert_eq!(
        e.to_string(),
        "MTI: expected 4 digits at offset 0, found 0x2F at offset 1"
    );

    // A sensitive field never shows the offending byte.
    let e = case(&|b| b[60] = b'x');
    assert_eq!(
        e.to_string(),
        "field 35: expected 21 track characters (digits, =) at offset 49, found a byte (value hidden: sensitive field) at offset 60"
    );

    let e = d.decode(&Bytes::new()).unwrap_err();
    assert_eq!(e.to_string(), "MTI: expected 4 bytes at offset 0, only 0 remain");
}

#[test]
fn bcd_decode_errors() {
    let d = dialect("iso87-bcd");
    let good = d.encode(&reference()).unwrap().to_vec();
    // MTI 0..2, bitmap 2..10, field 3 10..13, 4 13..19, 11 19..22, 22 22..24, 35 24..36, ...
    let mut b = good.clone();
    b[15] = 0x0A;
    assert_eq!(
        d.decode(&Bytes::from(b)).unwrap_err().to_string(),
        "field 4: expected 12 digits packed as BCD at offset 13, found 0x0A at offset 15"
    );
    let mut b = good.clone();
    b[22] = 0x50; // filler nibble of field 22 must be 0 (or F)
    assert_eq!(
        d.decode(&Bytes::from(b)).unwrap_err().to_string(),
        "field 22: expected a 0 or F filler nibble before 3 digits at offset 22, found 0x50 at offset 22"
    );
    let mut b = good.clone();
    b[24] = 0x4A; // LL prefix nibble A
    assert_eq!(
        d.decode(&Bytes::from(b)).unwrap_err().to_string(),
        "field 35: length prefix at offset 24 is not BCD digits, found 0x4A"
    );
    let mut b = good;
    b[0] = 0x0A;
    assert!(matches!(
        d.decode(&Bytes::from(b)),
        Err(CodecError::InvalidContent { at: FieldRef::Mti, .. })
    ));
}

#[test]
fn undefined_field_is_an_error_both_ways() {
    let small = Dialect::from_toml(
        r#"
        name = "tiny"
        mti = "ascii"
        bitmap = "hex"
        [encoding]
        n = "ascii"
        an = "ascii"
        ans = "ascii"
        z = "ascii"
        b = "hex"
        xn = "ascii"
        prefix = "ascii"
        pad_fixed = "left"
        pad_variable = "left"
        [fields]
        3 = { name = "Processing code", class = "n", length = 6 }
        "#,
        "tiny.toml",
    )
    .unwrap();
    let (_, good) = ascii_ref();
    let e = small.decode(&Bytes::from(good)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field 4: bit set at offset 26 but the dialect `tiny` does not define this field"
    );
    let e = small.encode(&reference()).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::UndefinedField {
                at: FieldRef::Field(4),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn encode_errors() {
    let d = dialect("iso87-ascii");
    let mut m = reference();
    m.set(4, "2000");
    assert_eq!(
        d.encode(&m).unwrap_err().to_string(),
        "field 4: value of length 4, the field takes exactly 12 (n)"
    );
    m.set(4, "00000000200A");
    assert_eq!(
        d.encode(&m).unwrap_err().to_string(),
        "field 4: character at position 11 is not allowed in a field of class n"
    );
    let mut m = reference();
    m.set(2, "4".repeat(20));
    assert_eq!(
        d.encode(&m).unwrap_err().to_string(),
        "field 2: value of length 20, the field takes at most 19 (n)"
    );
    let mut m = reference();
    m.set(28, "X00001000");
    assert!(d.encode(&m).unwrap_err().to_string().contains("starts with C or D"));
    // A failed encode leaves the buffer as it was.
    let mut out = bytes::BytesMut::from(&b"keep"[..]);
    assert!(d.encode_into(&m, &mut out).is_err());
    assert_eq!(&out[..], b"keep");
}

#[test]
fn json_errors() {
    let d = dialect("iso87-ascii");
    let bad = |s: &str| d.from_json(&serde_json::from_str(s).unwrap()).unwrap_err().to_string();
    assert_eq!(
        bad(r#"{"mti":"0200","fields":{"1":"x"}}"#),
        "JSON: field key `1` is not a field number 2..=128 (the bitmap is derived from the fields)"
    );
    assert_eq!(
        bad(r#"{"mti":"02","fields":{}}"#),
        "MTI: expected 4 digits, found 2 characters"
    );
    assert_eq!(
        bad(r#"{"mti":"0200","fields":{"52":"XYZ"}}"#),
        "field 52: binary field: expected hex digits, bad character or odd count at position 0"
    );
    assert_eq!(
        bad(r#"{"mti":"0200","fields":{"4":4}}"#),
        "field 4: value must be a JSON string"
    );
    assert_eq!(
        bad(r#"{"mti":"0200","field":{}}"#),
        "JSON: unknown key `field`; expected `mti` and `fields`"
    );
}

#[test]
fn streaming_decode_needs_more_bytes_until_the_message_is_whole() {
    for (name, _) in Dialects::builtin().iter().map(|(d, s)| (d.name.clone(), s.clone())) {
        let d = dialect(&name);
        let good = d.encode(&reference()).unwrap();
        for cut in 0..good.len() {
            let part = Bytes::copy_from_slice(&good[..cut]);
            assert_eq!(
                d.decode_streaming(&part).unwrap(),
                None,
                "{name}: prefix of {cut} bytes"
            );
            assert!(
                matches!(d.decode(&part), Err(CodecError::Truncated { .. })),
                "{name}: {cut}"
            );
        }
        let mut more = good.to_vec();
        more.extend_from_slice(b"next message");
        let (m, used) = d.decode_streaming(&Bytes::from(more)).unwrap().unwrap();
        assert_eq!((m, used), (reference(), good.len()), "{name}");
    }
}

#[test]
fn decoded_values_share_the_input_buffer() {
    let (d, good) = ascii_ref();
    let buf = Bytes::from(good);
    let m = d.decode(&buf).unwrap();
    let v = m.get(41).unwrap();
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    assert!(
        range.contains(&(v.as_ptr() as usize)),
        "field 41 should be a slice of the input, not a copy"
    );
}

#[test]
fn dialect_file_errors_name_the_problem() {
    let base = |fields: &str, extra: &str| {
        format!(
            "name = \"x\"\nmti = \"ascii\"\nbitmap = \"hex\"\n{extra}\n[encoding]\nn = \"bcd\"\nan = \"ascii\"\nans = \"ascii\"\nz = \"bcd\"\nb = \"binary\"\nxn = \"bcd\"\nprefix = \"bcd\"\npad_fixed = \"left\"\npad_variable = \"right\"\n[fields]\n{fields}\n"
        )
    };
    let err = |text: String| Dialect::from_toml(&text, "x.toml").unwrap_err();
    assert!(matches!(
        err(base("3 = { name = \"a\", class = \"n\", length = 6, colour = 1 }", "")),
        DialectError::Toml { .. }
    ));
    assert!(
        err(base("3 = { name = \"a\", class = \"n\", length = 6, colour = 1 }", ""))
            .to_string()
            .contains("colour")
    );
    assert!(err(base("", "oops = 1")).to_string().contains("oops"));
    let e = err(base(
        "48 = { name = \"a\", class = \"ans\", var = \"LLL\", length = 999, encoding = \"bcd\" }",
        "",
    ));
    assert_eq!(e.to_string(), "x.toml: field 48: class ans cannot be written as Bcd");
    let e = err(base(
        "2 = { name = \"a\", class = \"n\", var = \"LL\", length = 100 }",
        "",
    ));
    assert_eq!(e.to_string(), "x.toml: field 2: length 100 is outside 1..=99 for LL");
    let e = err(base("1 = { name = \"a\", class = \"b\", length = 8 }", ""));
    assert!(e
        .to_string()
        .starts_with("x.toml: field 1: field numbers run from 2 to 128"));
    let ok = Dialect::from_toml(
        &base("2 = { name = \"a\", class = \"n\", var = \"LL\", length = 19 }", ""),
        "x",
    )
    .unwrap();
    let f = ok.field(2).unwrap();
    assert_eq!((f.class, f.var, f.length), (Class::Numeric, Var::LL, 19));
}

#[test]
fn user_dialects_are_loaded_from_a_directory_without_recompiling() {
    let dir = std::env::temp_dir().join(format!("pingate-dialects-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("iso8583")).unwrap();
    // A copy of iso87-ascii that writes lengths in binary instead: a new dialect from data alone.
    let text = include_str!("../protocols/iso8583/iso87-ascii.toml")
        .replace("name = \"iso87-ascii\"", "name = \"my-binary-lengths\"")
        .replace("prefix = \"ascii\"", "prefix = \"binary\"");
    std::fs::write(dir.join("iso8583/mine.toml"), text).unwrap();
    let all = Dialects::load(&dir).unwrap();
    let d = all.get("my-binary-lengths").unwrap();
    let out = d.encode(&reference()).unwrap();
    assert_eq!(
        &out[46..48],
        [b'1', 21],
        "field 22 then field 35's one-byte binary length (21)"
    );
    assert_eq!(d.decode(&out.freeze()).unwrap(), reference());
    assert!(all.get("iso87-bcd").is_ok());
    std::fs::write(dir.join("iso8583/broken.toml"), "name = 3").unwrap();
    assert!(Dialects::load(&dir).unwrap_err().to_string().contains("broken.toml"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(all.get("nope"), Err(DialectError::Unknown { .. })));
}

#[test]
fn shipped_dialects_share_one_layout() {
    let all = Dialects::builtin();
    let names: Vec<String> = all.iter().map(|(d, _)| d.name.clone()).collect();
    assert!(names.len() >= 4);
    let first = all.get(&names[0]).unwrap();
    for name in &names[1..] {
        let d = all.get(name).unwrap();
        for n in 2..=128u8 {
            let (a, b) = (first.field(n).unwrap(), d.field(n).unwrap());
            assert_eq!(
                (a.class, a.var, a.length, a.mask),
                (b.class, b.var, b.length, b.mask),
                "{name} field {n}"
            );
        }
    }
}

// ---- properties ------------------------------------------------------------------------------------------------

/// A valid value for a field: the right class, a length the field allows (long fields capped to keep runs fast).
fn value_for(class: Class, var: Var, length: usize) -> BoxedStrategy<Vec<u8>> {
    let lens = if var == Var::Fixed {
        length..=length
    } else {
        0..=length.min(40)
    };
    let chars: Vec<u8> = match class {
        Class::Numeric => b"0123456789".to_vec(),
        Class::AlphaNumeric => b"ABCXYZabz0189 ".to_vec(),
        Class::AlphaNumericSpecial => (0x20u8..=0x7E).collect(),
        Class::Track => b"0123456789=".to_vec(),
        Class::Binary => return proptest::collection::vec(any::<u8>(), lens).boxed(),
        Class::SignedAmount => {
            return (
                prop::sample::select(vec![b'C', b'D']),
                proptest::collection::vec(prop::sample::select(b"0123456789".to_vec()), length - 1),
            )
                .prop_map(|(s, mut d)| {
                    d.insert(0, s);
                    d
                })
                .boxed()
        }
    };
    proptest::collection::vec(prop::sample::select(chars), lens).boxed()
}

fn message_for(d: &Dialect) -> impl Strategy<Value = Message> {
    let specs: Vec<_> = d.defined().map(|s| (s.number, s.class, s.var, s.length)).collect();
    let per_field: Vec<_> = specs
        .into_iter()
        .map(|(n, c, v, l)| proptest::option::weighted(0.15, value_for(c, v, l)).prop_map(move |o| (n, o)))
        .collect();
    (
        prop::sample::select(vec!["0200", "0210", "0400", "0420", "0800", "0810"]),
        per_field,
    )
        .prop_map(|(mti, fields)| {
            let mut m = Message::new(mti.parse().unwrap());
            for (n, v) in fields {
                if let Some(v) = v {
                    m.set(n, v);
                }
            }
            m
        })
}

fn roundtrip(name: &str) -> impl Fn(Message) -> Result<(), TestCaseError> {
    let d = dialect(name);
    move |m: Message| {
        let bytes = d.encode(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = d
            .decode(&bytes.freeze())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, m);
        Ok(())
    }
}

// As many cases as proptest's default configuration says: 256, or `PROPTEST_CASES` (CI sets it).
proptest! {

    #[test]
    fn roundtrip_iso87_ascii(m in message_for(&dialect("iso87-ascii"))) { roundtrip("iso87-ascii")(m)?; }

    #[test]
    fn roundtrip_iso87_ascii_binbitmap(m in message_for(&dialect("iso87-ascii-binbitmap"))) { roundtrip("iso87-ascii-binbitmap")(m)?; }

    #[test]
    fn roundtrip_iso87_bcd(m in message_for(&dialect("iso87-bcd"))) { roundtrip("iso87-bcd")(m)?; }

    #[test]
    fn roundtrip_iso87_ebcdic(m in message_for(&dialect("iso87-ebcdic"))) { roundtrip("iso87-ebcdic")(m)?; }

    /// Random bytes never panic, in any dialect, whole or streaming.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let buf = Bytes::from(bytes);
        for (d, _) in Dialects::builtin().iter() {
            let _ = d.decode(&buf);
            let _ = d.decode_streaming(&buf);
        }
    }

    /// Valid messages with a few bytes changed reach deep into the decoder: still no panic, and anything that
    /// decodes re-encodes.
    #[test]
    fn mutated_messages_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        for (d, _) in Dialects::builtin().iter() {
            let mut b = d.encode(&reference()).unwrap().to_vec();
            for (i, v) in &edits {
                let at = i.index(b.len());
                b[at] = *v;
            }
            if let Ok(m) = d.decode(&Bytes::from(b)) {
                prop_assert!(d.encode(&m).is_ok());
            }
        }
    }
}
