//! The PIN sale contract end to end on the golden fixtures of every dialect: each request decodes into what the
//! contract says it means, and the answers built from an outcome are byte for byte the golden answers.

use bytes::Bytes;
use pingate::iso8583::{from_hex, Dialect, Dialects, Message};
use pingate::sale::{answer, sale_answer, NetworkCode, PinReceipt, ResponseCode, SaleKey, TerminalRequest};

fn fixture(d: &Dialect, scenario: &str) -> (Message, Vec<u8>) {
    let path = format!(
        "{}/fixtures/iso8583/{}/{scenario}.hex",
        env!("CARGO_MANIFEST_DIR"),
        d.name
    );
    let bytes = from_hex(std::fs::read_to_string(path).unwrap().trim()).unwrap();
    (d.decode(&Bytes::from(bytes.clone())).unwrap(), bytes)
}

/// When the fixtures' requests are received (2026-11-28 17:35:00 UTC): field 7 is bound to this year.
const RECEIVED: i64 = 1_795_887_300;

fn key(stan: &str, transmission: &str) -> SaleKey {
    SaleKey {
        terminal_id: "TERM0001".into(),
        stan: stan.into(),
        transmission: transmission.into(),
    }
}

#[test]
fn every_scenario_in_every_dialect() {
    for (d, _) in Dialects::builtin().iter() {
        let enc = |m: &Message| d.encode(m).unwrap().to_vec();

        let (req, _) = fixture(d, "sale-request-0200");
        let TerminalRequest::Sale(sale) = TerminalRequest::parse(&req, RECEIVED).unwrap() else {
            panic!()
        };
        assert_eq!(sale.key, key("000123", "20261128173500"));
        assert_eq!(
            (sale.product.as_str(), sale.amount, sale.currency.as_str()),
            ("TOPUP-EU-10", 1000, "978")
        );
        assert_eq!(sale.merchant_id, "MERCHANT0000001");
        assert!(!sale.repeat);

        let (approved, golden) = fixture(d, "sale-approved-0210");
        let receipt = PinReceipt::from_tlv(approved.get(63).unwrap()).unwrap();
        let built = sale_answer(&req, "332817000001", Ok(("A1B2C3", &receipt))).unwrap();
        assert_eq!(enc(&built), golden, "{}: approved 0210", d.name);
        let (_, golden) = fixture(d, "sale-out-of-stock-0210");
        let built = sale_answer(&req, "332817000002", Err(ResponseCode::OutOfStock)).unwrap();
        assert_eq!(enc(&built), golden, "{}: out-of-stock 0210", d.name);

        let (rep, _) = fixture(d, "sale-repeat-0201");
        let TerminalRequest::Sale(again) = TerminalRequest::parse(&rep, RECEIVED).unwrap() else {
            panic!()
        };
        assert!(again.repeat);
        assert_eq!(again.key, sale.key, "a repeat names the same sale");

        let (rev, _) = fixture(d, "reversal-request-0400");
        let TerminalRequest::Reversal(r) = TerminalRequest::parse(&rev, RECEIVED).unwrap() else {
            panic!()
        };
        assert_eq!(r.sale, sale.key, "field 90 names the original sale");
        assert!(!r.advice);
        let (_, golden) = fixture(d, "reversal-response-0410");
        assert_eq!(enc(&answer(&rev, ResponseCode::Approved)), golden, "{}: 0410", d.name);

        let (adv, _) = fixture(d, "reversal-advice-0420");
        let TerminalRequest::Reversal(a) = TerminalRequest::parse(&adv, RECEIVED).unwrap() else {
            panic!()
        };
        assert_eq!(
            a.sale, sale.key,
            "without field 90 the advice carries the sale's own STAN and time"
        );
        assert!(a.advice);
        let (_, golden) = fixture(d, "reversal-advice-response-0430");
        assert_eq!(enc(&answer(&adv, ResponseCode::Approved)), golden, "{}: 0430", d.name);

        for (req, resp, code) in [
            ("echo-request-0800", "echo-response-0810", NetworkCode::Echo),
            ("signon-request-0800", "signon-response-0810", NetworkCode::SignOn),
        ] {
            let (m, _) = fixture(d, req);
            assert_eq!(
                TerminalRequest::parse(&m, RECEIVED).unwrap(),
                TerminalRequest::Network(code)
            );
            let (_, golden) = fixture(d, resp);
            assert_eq!(enc(&answer(&m, ResponseCode::Approved)), golden, "{}: {resp}", d.name);
        }
    }
}

#[test]
fn refusals_carry_the_contract_code() {
    let d = Dialects::builtin().get("iso87-ascii").unwrap().clone();
    let (base, _) = fixture(&d, "sale-request-0200");
    type Change = Box<dyn Fn(&mut Message)>;
    let cases: Vec<(&str, Change, ResponseCode)> = vec![
        (
            "other processing code",
            Box::new(|m| {
                m.set(3, "310000");
            }),
            ResponseCode::InvalidTransaction,
        ),
        (
            "no product",
            Box::new(|m| {
                m.remove(48);
            }),
            ResponseCode::FormatError,
        ),
        (
            "bad product code",
            Box::new(|m| {
                m.set(48, "TOP UP");
            }),
            ResponseCode::FormatError,
        ),
        (
            "zero amount",
            Box::new(|m| {
                m.set(4, "000000000000");
            }),
            ResponseCode::InvalidAmount,
        ),
        (
            "no currency",
            Box::new(|m| {
                m.remove(49);
            }),
            ResponseCode::FormatError,
        ),
        (
            "no STAN",
            Box::new(|m| {
                m.remove(11);
            }),
            ResponseCode::FormatError,
        ),
        (
            "no terminal",
            Box::new(|m| {
                m.remove(41);
            }),
            ResponseCode::FormatError,
        ),
        (
            "authorisation MTI",
            Box::new(|m| m.set_mti("0100".parse().unwrap())),
            ResponseCode::InvalidTransaction,
        ),
    ];
    for (what, change, code) in cases {
        let mut m = base.clone();
        change(&mut m);
        let refusal = TerminalRequest::parse(&m, RECEIVED).unwrap_err();
        assert_eq!(refusal.code, code, "{what}: {}", refusal.reason);
        // The refusal is answered in the request's own class, with the code.
        let a = answer(&m, refusal.code);
        assert_eq!(a.response_code(), Some(code.code()));
    }
    let (mut echo, _) = fixture(&d, "echo-request-0800");
    echo.set(70, "999");
    assert_eq!(
        TerminalRequest::parse(&echo, RECEIVED).unwrap_err().code,
        ResponseCode::InvalidTransaction
    );
}
