//! Helpers shared by the integration tests: one terminal, one product, the same sale identity everywhere.
#![allow(dead_code)] // each test crate uses a different part

use pingate::psp::{Request, Terminal};
use pingate::store::{Product, SaleContext};

pub const TERMINAL: &str = "TERM0001";
pub const MERCHANT: &str = "MERCHANT0000001";
pub const TRANSMISSION: &str = "1128173500";

/// The terminal part of a sale key, as a gateway sends it to the PIN server.
pub fn terminal(stan: u32) -> Terminal {
    Terminal {
        terminal_id: TERMINAL.into(),
        merchant_id: MERCHANT.into(),
        stan: format!("{stan:06}"),
        transmission: TRANSMISSION.into(),
        rrn: format!("{stan:012}"),
    }
}

/// An on-demand sale of TOPUP 10.00 over PSP.
pub fn sell(stan: u32) -> Request {
    Request::Sell {
        product: "TOPUP".into(),
        amount: 1000,
        terminal: terminal(stan),
    }
}

/// The same sale identity as the store sees it.
pub fn ctx(gateway: &str, stan: u32) -> SaleContext {
    SaleContext {
        gateway: gateway.into(),
        terminal_id: TERMINAL.into(),
        merchant_id: MERCHANT.into(),
        stan: format!("{stan:06}"),
        transmission: TRANSMISSION.into(),
        rrn: format!("{stan:012}"),
    }
}

/// The TOPUP product in the given amounts.
pub fn topup(amounts: &[i64]) -> Product {
    Product {
        code: "TOPUP".into(),
        name: "Top-up".into(),
        supplier: "Telco".into(),
        currency: "978".into(),
        denominations: amounts.to_vec(),
    }
}
