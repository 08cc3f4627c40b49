//! The controller: the rules of the PIN sale contract (`protocols/pin-sale-messages.md`) for sales, repeats and
//! reversals, without I/O.

use super::journal;
use super::upstream::UpstreamError;
use crate::psp::ErrorCode;
use crate::sale::{rrn_of_pin, ResponseCode, SaleKey};

/// The retrieval reference of a declined request: `9` and 11 digits derived from its key (the same for its repeats),
/// never an approved sale's ([`rrn_of_pin`]).
pub fn rrn_of(key: &SaleKey) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [&key.terminal_id, &key.stan, &key.transmission] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let d = ctx.finish();
    let n = u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"));
    format!("9{:011}", n % 100_000_000_000)
}

/// The response code a PIN server error means to a terminal (the one place this is decided).
pub fn code_for(e: &UpstreamError) -> ResponseCode {
    match e {
        UpstreamError::Unavailable | UpstreamError::Timeout => ResponseCode::ServerUnavailable,
        UpstreamError::Server(w) => match w.code {
            ErrorCode::OutOfStock => ResponseCode::OutOfStock,
            ErrorCode::UnknownProduct => ResponseCode::UnknownProduct,
            ErrorCode::UnknownDenomination => ResponseCode::InvalidAmount,
            ErrorCode::DuplicateMismatch => ResponseCode::DuplicateMismatch,
            ErrorCode::AlreadyReversed => ResponseCode::InvalidTransaction,
            // A repeat older than the repeat age re-delivers nothing: `12`, as for a reversed sale.
            ErrorCode::RepeatExpired => ResponseCode::InvalidTransaction,
            ErrorCode::ReversalMismatch => ResponseCode::InvalidAmount,
            ErrorCode::Busy => ResponseCode::ServerUnavailable,
            ErrorCode::NotHolder | ErrorCode::BadRequest | ErrorCode::Internal => ResponseCode::SystemError,
        },
    }
}

/// The response code for a sale the journal did not take: late (a stalled disk) is "try again", failed is a
/// system error. Beside [`code_for`]: the two places the terminal's code is decided.
pub(super) fn code_for_journal(e: &journal::JournalError) -> ResponseCode {
    match e {
        journal::JournalError::Late => ResponseCode::ServerUnavailable,
        _ => ResponseCode::SystemError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stan: u32) -> SaleKey {
        SaleKey {
            terminal_id: "T1".into(),
            stan: format!("{stan:06}"),
            transmission: "1128120000".into(),
        }
    }

    #[test]
    fn rrn_is_twelve_digits_and_stable_per_key() {
        assert_eq!(rrn_of(&key(1)), rrn_of(&key(1)));
        assert_ne!(rrn_of(&key(1)), rrn_of(&key(2)));
        assert_eq!(rrn_of(&key(1)).len(), 12);
        assert!(rrn_of(&key(1)).bytes().all(|c| c.is_ascii_digit()));
        // A decline's never meets an approval's: the PIN's id.
        assert!(rrn_of(&key(1)).starts_with('9'));
        assert_eq!(rrn_of_pin(42), "000000000042");
    }
}
