//! PSP, the PIN server protocol (`protocols/pin-server-protocol.md`): what gateways and PIN servers say to each
//! other over mutual TLS. Frames are a 4-byte big-endian length and a JSON body; every request carries an id and
//! answers may come back in any order.
//!
//! A protocol core, no I/O (bytes in, messages out): the messages (`messages.rs`), the limits both sides keep
//! (`limits.rs`), the one length-prefix codec both sides frame with ([`FrameCodec`]), strict parsing
//! ([`parse_request`], [`parse_response`]) and its typed error ([`PspError`]). It knows nothing of the PIN
//! server's store: the server maps requests to store operations and store results to answers (`server::handler`).
//! [`client`], the gateway's tokio TLS client over this core, is the one part that does I/O.

pub mod client;
mod codec;
mod limits;
mod messages;
mod parse;

pub use codec::FrameCodec;
pub use limits::{
    MAX_ANSWER_FRAME, MAX_CONFIRM_BATCH, MAX_MERCHANT_ID, MAX_PIN_IDS, MAX_REQUEST_FRAME, MAX_RESERVE, MAX_RRN,
    MAX_SALES_SLICE, MAX_STAN, MAX_TERMINAL_ID, MAX_TRANSMISSION,
};
pub use messages::{
    BatchResult, CatalogEntry, ConfirmItem, ConfirmOutcome, ErrorCode, PinOut, Request, RequestFrame, Response,
    ResponseFrame, ReverseOutcome, SaleState, StockEntry, Terminal, WireError, VERSION,
};
#[doc(hidden)]
pub use parse::parse_request_slow;
pub use parse::{parse_request, parse_response};

/// What the protocol core refuses: frames (the codec), bodies (the parsers) and field values.
#[derive(Debug, thiserror::Error)]
pub enum PspError {
    /// A frame longer than the cap of its direction ([`MAX_REQUEST_FRAME`] or the server's `--max-frame`,
    /// [`MAX_ANSWER_FRAME`]). Read: refused from its 4-byte header, before any room is made for its body, and the
    /// connection ends (its frame boundaries can no longer be trusted). Written: refused, nothing written.
    #[error("frame of {len} bytes is over the cap of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// The byte stream under the codec failed, or ended inside a frame.
    #[error("stream: {0}")]
    Stream(#[from] std::io::Error),
    /// A request body that is not a valid request: not JSON, an unknown op, a field missing, mistyped, null,
    /// unknown or another op's. `id` is the request's when it could be read, else 0; `message` names the field and
    /// is the text of the `bad_request` answer.
    #[error("{message}")]
    BadRequest { id: u64, message: String },
    /// A `terminal` field that is empty (only the RRN may be), longer than its limit, or not printable ASCII.
    #[error("terminal.{field}: 1 to {max} printable characters")]
    TerminalField { field: &'static str, max: usize },
    /// An answer body that is not a valid answer.
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

impl PspError {
    /// The id an error answer to this refusal carries: the request's when it could be read, else 0.
    pub fn request_id(&self) -> u64 {
        match self {
            PspError::BadRequest { id, .. } => *id,
            _ => 0,
        }
    }
}
