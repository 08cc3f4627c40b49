//! A simulated TCP terminal: builds the contract's requests and speaks them over a framed connection. Used by the
//! demo, the end-to-end tests and the load generator.

use std::net::SocketAddr;
use std::sync::Arc;

use super::secure::{ClientTls, MacSigner, TerminalStream};
use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;

use crate::iso8583::{Dialect, Message, Mti};
use crate::link::framing::{Frame, FrameCodec, Framing, Tpdu};
use crate::sale::{OriginalData, PROCESSING_PIN_PURCHASE};

/// The simulated terminals' dialect and framing unless told otherwise (the defaults of most NAC-attached terminals):
/// the demo's gateway listens with them, and the tools speak them by default.
pub const DIALECT: &str = "iso87-ascii-binbitmap";
pub const FRAMING: Framing = Framing::Binary2;
/// The merchant of the simulated terminals unless told otherwise: the demo's gateway registers its terminals with it.
pub const MERCHANT: &str = "DEMOMERCHANT001";

/// Errors of the simulated terminal.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Framing(#[from] crate::link::framing::FramingError),
    #[error("codec: {0}")]
    Codec(#[from] crate::iso8583::CodecError),
    #[error("connection closed by the gateway")]
    Closed,
    /// A request could not be MACed, or an answer's MAC does not check.
    #[error("MAC: {0}")]
    Mac(#[from] crate::mac::MacError),
}

/// The transmission date and time of now (UTC), as terminals write it in field 7: `MMDDhhmmss`.
pub fn now_transmission() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:02}{:02}{:02}{:02}{:02}",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How terminal messages are carried to a listener, as the tools take it on their command lines.
#[derive(clap::Args, Clone, Debug)]
pub struct WireArgs {
    /// Length framing: binary2, binary2-inclusive, ascii4, bcd2.
    #[arg(long, default_value = "binary2")]
    pub framing: Framing,
    #[arg(long, default_value = DIALECT)]
    pub dialect: String,
    /// TPDU in hex (10 digits) before each message, when the listener expects one.
    #[arg(long)]
    pub tpdu: Option<Tpdu>,
}

/// Who the terminal is.
#[derive(Clone, Debug)]
pub struct Identity {
    pub terminal_id: String,
    pub merchant_id: String,
}

/// A sale's identity and content as the terminal sends it.
#[derive(Clone, Debug)]
pub struct SaleSpec {
    pub stan: u32,
    /// MMDDhhmmss.
    pub transmission: String,
    pub product: String,
    pub amount: u64,
    pub currency: String,
}

impl Identity {
    /// A 0200 (or a 0201 with `repeat`).
    pub fn sale(&self, s: &SaleSpec, repeat: bool) -> Message {
        let mut m = Message::new(if repeat { Mti::SALE_REPEAT } else { Mti::SALE });
        m.set(3, PROCESSING_PIN_PURCHASE)
            .set(4, format!("{:012}", s.amount))
            .set(7, s.transmission.clone())
            .set(11, format!("{:06}", s.stan))
            .set(12, s.transmission[4..].to_string())
            .set(13, s.transmission[..4].to_string())
            .set(41, self.terminal_id.clone())
            .set(42, self.merchant_id.clone())
            .set(48, s.product.clone())
            .set(49, s.currency.clone());
        m
    }

    /// A 0400 (or 0420 with `advice`) reversing sale `s`, with field 90 naming it; `stan` is the reversal's own.
    pub fn reversal(&self, s: &SaleSpec, stan: u32, advice: bool) -> Message {
        let mut m = Message::new(if advice { Mti::REVERSAL_ADVICE } else { Mti::REVERSAL });
        let original = OriginalData {
            mti: "0200".into(),
            stan: format!("{:06}", s.stan),
            transmission: s.transmission.clone(),
            acquirer: "0".into(),
            forwarder: "0".into(),
        };
        m.set(3, PROCESSING_PIN_PURCHASE)
            .set(4, format!("{:012}", s.amount))
            .set(7, s.transmission.clone())
            .set(11, format!("{stan:06}"))
            .set(41, self.terminal_id.clone())
            .set(42, self.merchant_id.clone())
            .set(48, s.product.clone())
            .set(49, s.currency.clone())
            .set(90, original.format());
        m
    }

    /// A 0800 with network code `code` (`301` echo, `001` sign-on, `002` sign-off).
    pub fn network(&self, stan: u32, transmission: &str, code: &str) -> Message {
        let mut m = Message::new(Mti::NETWORK);
        m.set(7, transmission.to_string())
            .set(11, format!("{stan:06}"))
            .set(41, self.terminal_id.clone())
            .set(42, self.merchant_id.clone())
            .set(70, code.to_string());
        m
    }
}

/// One terminal connection.
pub struct TerminalClient {
    framed: Framed<TerminalStream, FrameCodec>,
    dialect: Arc<Dialect>,
    tpdu: Option<Tpdu>,
    /// Requests are MACed with their terminal's key, and answers that carry a MAC are checked.
    mac: Option<MacSigner>,
}

impl TerminalClient {
    /// Connects with the listener's framing; `tpdu` is sent with every message when the line carries one.
    pub async fn connect(
        addr: SocketAddr,
        framing: Framing,
        tpdu: Option<Tpdu>,
        dialect: Arc<Dialect>,
    ) -> Result<TerminalClient, SimError> {
        TerminalClient::connect_secured(addr, framing, tpdu, dialect, None, None).await
    }

    /// [`TerminalClient::connect`] over TLS when `tls` is given, MACing requests when `mac` is.
    pub async fn connect_secured(
        addr: SocketAddr,
        framing: Framing,
        tpdu: Option<Tpdu>,
        dialect: Arc<Dialect>,
        tls: Option<&ClientTls>,
        mac: Option<MacSigner>,
    ) -> Result<TerminalClient, SimError> {
        let s = TerminalStream::connect(addr, tls).await?;
        Ok(TerminalClient {
            framed: Framed::new(s, FrameCodec::new(framing, tpdu.is_some(), 0xFFFF)),
            dialect,
            tpdu,
            mac,
        })
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), SimError> {
        let body = match &self.mac {
            Some(m) => m.sign(&self.dialect, msg)?.freeze(),
            None => self.dialect.encode(msg)?.freeze(),
        };
        self.send_raw(body).await
    }

    /// Sends any bytes as one frame (for malformed-message tests).
    pub async fn send_raw(&mut self, body: bytes::Bytes) -> Result<(), SimError> {
        self.framed
            .send(Frame {
                tpdu: self.tpdu,
                message: body,
            })
            .await?;
        Ok(())
    }

    /// The next frame from the gateway (`None` when it closed the connection).
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>, SimError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(r) => Ok(Some(r?)),
        }
    }

    /// The next message from the gateway.
    pub async fn recv(&mut self) -> Result<Message, SimError> {
        loop {
            let f = self.recv_frame().await?.ok_or(SimError::Closed)?;
            if f.message.is_empty() {
                continue;
            }
            let msg = self.dialect.decode(&f.message)?;
            if let Some(m) = &self.mac {
                // A refusal (63) carries no MAC; an answer that carries one must check.
                if msg.has(64) || msg.has(128) {
                    m.verify(&self.dialect, &f.message, &msg)?;
                }
            }
            return Ok(msg);
        }
    }

    /// Sends and waits for the answer: the next message with the request's STAN (a late answer to an earlier
    /// request that timed out is passed over).
    pub async fn call(&mut self, msg: &Message) -> Result<Message, SimError> {
        self.send(msg).await?;
        let stan = msg.get_str(11).map(String::from);
        loop {
            let a = self.recv().await?;
            if stan.is_none() || a.get_str(11).map(String::from) == stan {
                return Ok(a);
            }
        }
    }

    /// The raw stream, for tests that write byte by byte.
    pub fn stream_mut(&mut self) -> &mut TerminalStream {
        self.framed.get_mut()
    }
}
