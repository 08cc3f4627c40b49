//! PSP's limits, one set for both sides (`protocols/pin-server-protocol.md`, "Limits"). They are consistent with each
//! other: every request the protocol allows fits [`MAX_REQUEST_FRAME`] with each of its lists at its longest and
//! each of its fields at its longest (tests below), and a `reserve` answer of [`MAX_RESERVE`] PINs fits
//! [`MAX_ANSWER_FRAME`].

/// Most PINs one `reserve` asks for (`count`: 1 to this).
pub const MAX_RESERVE: usize = 1_000;

/// Most confirms one `confirm_batch` carries (1 to this). The gateway's store-and-forward sends its confirms in
/// batches of this size.
pub const MAX_CONFIRM_BATCH: usize = 256;

/// Most sales one `sales_allowance` asks for (`count`: 1 to this), and most sales per minute a merchant's limit
/// names (`pingate limits set --sales-per-minute`; the gateway's `merchant_sales_allowance` has the same bound).
pub const MAX_SALES_SLICE: u32 = 100_000;

/// Most PIN ids one `release` or `renew` names.
pub const MAX_PIN_IDS: usize = 1_000;

/// Longest `terminal.terminal_id`, in printable ASCII characters (as each field below).
pub const MAX_TERMINAL_ID: usize = 16;
/// Longest `terminal.merchant_id`.
pub const MAX_MERCHANT_ID: usize = 32;
/// Longest `terminal.stan`.
pub const MAX_STAN: usize = 12;
/// Longest `terminal.transmission`.
pub const MAX_TRANSMISSION: usize = 20;
/// Longest `terminal.rrn` (the only field that may be empty).
pub const MAX_RRN: usize = 20;

/// Largest request body a gateway sends, and the least a server accepts (its `--max-frame` may only raise it). The
/// largest request is a `confirm_batch` of [`MAX_CONFIRM_BATCH`] with every terminal field at its longest and made
/// of characters JSON escapes: about 81 KB.
pub const MAX_REQUEST_FRAME: usize = 128 * 1024;

/// Largest answer body a server writes and a gateway reads. The largest answer is a `reserve` of [`MAX_RESERVE`]
/// PINs: about 2.0 MB when each PIN is as large as a terminal can take (its field 63 at 999 characters) with a
/// product code of 64 characters, every character one JSON escapes.
pub const MAX_ANSWER_FRAME: usize = 4 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psp::{
        ConfirmItem, PinOut, Request, RequestFrame, Response, ResponseFrame, Terminal, MAX_CONFIRM_BATCH, MAX_RESERVE,
    };
    use crate::sale::{Pin, PinReceipt};

    /// `n` characters that JSON writes as two bytes each (`\"`): the longest a printable field can be on the wire.
    fn escaped(n: usize) -> String {
        "\"".repeat(n)
    }

    fn longest_terminal() -> Terminal {
        Terminal {
            terminal_id: escaped(MAX_TERMINAL_ID),
            merchant_id: escaped(MAX_MERCHANT_ID),
            stan: escaped(MAX_STAN),
            transmission: escaped(MAX_TRANSMISSION),
            rrn: escaped(MAX_RRN),
        }
    }

    fn request_len(request: Request) -> usize {
        serde_json::to_vec(&RequestFrame { id: u64::MAX, request })
            .unwrap()
            .len()
    }

    #[test]
    fn the_largest_requests_allowed_fit_the_request_frame() {
        let t = longest_terminal();
        t.check().expect("the longest terminal is allowed");
        let batch = request_len(Request::ConfirmBatch {
            confirms: vec![
                ConfirmItem {
                    pin_id: i64::MIN,
                    terminal: t.clone(),
                };
                MAX_CONFIRM_BATCH
            ],
        });
        assert!(batch <= MAX_REQUEST_FRAME, "confirm_batch: {batch} bytes");
        // Not so roomy that the cap means nothing: the batch takes more than half of it.
        assert!(batch > MAX_REQUEST_FRAME / 2, "confirm_batch: {batch} bytes");
        let ids = vec![i64::MIN; MAX_PIN_IDS];
        for request in [
            Request::Release { pin_ids: ids.clone() },
            Request::Renew {
                pin_ids: ids,
                lease_secs: u64::MAX,
            },
            Request::Confirm {
                pin_id: i64::MIN,
                terminal: t,
            },
        ] {
            let op = request.op_name();
            let len = request_len(request);
            assert!(len <= MAX_REQUEST_FRAME, "{op}: {len} bytes");
        }
    }

    /// The largest PIN a terminal can take: its field 63 (PIN, serial, expiry and receipt lines, each a TLV element)
    /// at its 999 characters, every character of serial and receipt one that JSON escapes, lines of 40 characters
    /// (the import's longest).
    fn largest_pin() -> PinOut {
        let mut receipt = PinReceipt {
            pin: Pin::new("P".repeat(40)),
            serial: escaped(40),
            expiry: Some("20271231".into()),
            lines: Vec::new(),
        };
        let mut room = 999 - receipt.to_tlv().unwrap().len();
        while room > 5 {
            let line = (room - 5).min(40);
            receipt.lines.push(escaped(line));
            room -= 5 + line;
        }
        assert_eq!(receipt.to_tlv().unwrap().len(), 999 - room);
        PinOut {
            pin_id: i64::MIN,
            product: escaped(64),
            amount: i64::MIN,
            pin: receipt.pin,
            serial: receipt.serial,
            expiry: receipt.expiry,
            receipt: receipt.lines,
        }
    }

    #[test]
    fn the_largest_reserve_answer_fits_the_answer_frame() {
        let answer = ResponseFrame::ok(
            u64::MAX,
            Response::Reserved {
                pins: vec![largest_pin(); MAX_RESERVE],
                lease_until: i64::MIN,
            },
        );
        let len = serde_json::to_vec(&answer).unwrap().len();
        assert!(len <= MAX_ANSWER_FRAME, "reserve: {len} bytes");
        assert!(len > MAX_ANSWER_FRAME / 4, "reserve: {len} bytes");
    }
}
