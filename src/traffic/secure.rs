//! What the traffic tools need to talk to a secured gateway (issue 20, §6): TLS to a terminal listener (with a
//! terminal's or a NAC's client certificate), and terminals' MAC keys from a terminal key file to sign requests and
//! check answers. The same flags in every tool ([`SecurityArgs`]).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::iso8583::{Dialect, Message};
use crate::mac::MacError;
use crate::terminal_keys::TerminalKeys;

/// A TLS client for terminal listeners: the gateway's listener certificate checked against `ca` and `server_name`,
/// a client certificate presented when given.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({:?})", self.name)
    }
}

impl ClientTls {
    pub fn load(ca: &Path, client: Option<(&Path, &Path)>, server_name: &str) -> Result<ClientTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(ca).map_err(|e| e.to_string())? {
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    crate::tls::load_certs(cert).map_err(|e| e.to_string())?,
                    crate::tls::load_key(key).map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?,
        };
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| format!("{server_name}: {e}"))?;
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The TLS handshake over a connected socket.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TerminalStream> {
        let tls = self.connector.connect(self.name.clone(), tcp).await?;
        Ok(TerminalStream::Tls(Box::new(tls)))
    }
}

/// A terminal's connection: plain TCP or TLS.
#[derive(Debug)]
pub enum TerminalStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl TerminalStream {
    /// Connects to `addr`, with TLS when `tls` is given; TCP_NODELAY is set.
    pub async fn connect(addr: std::net::SocketAddr, tls: Option<&ClientTls>) -> io::Result<TerminalStream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        match tls {
            None => Ok(TerminalStream::Tcp(s)),
            Some(t) => t.connect(s).await,
        }
    }
}

impl AsyncRead for TerminalStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TerminalStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            TerminalStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TerminalStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TerminalStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            TerminalStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TerminalStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            TerminalStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TerminalStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            TerminalStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Terminals' MAC keys, opened from a terminal key file and its KEK: requests are signed with their terminal's
/// newest key, answers checked with it.
#[derive(Clone, Debug)]
pub struct MacSigner {
    keys: Arc<TerminalKeys>,
}

impl MacSigner {
    pub fn load(key_file: &Path, kek_file: &Path) -> Result<MacSigner, String> {
        let kek = crate::terminal_keys::load_kek(kek_file).map_err(|e| e.to_string())?;
        let file = crate::terminal_keys::TerminalKeyFile::load(key_file).map_err(|e| e.to_string())?;
        let keys = file.open(&kek, crate::clock::unix_now()).map_err(|e| e.to_string())?;
        Ok(MacSigner { keys: Arc::new(keys) })
    }

    pub fn from_keys(keys: TerminalKeys) -> MacSigner {
        MacSigner { keys: Arc::new(keys) }
    }

    /// `msg` encoded and MACed with the key of its terminal (field 41); a terminal without a key is an error.
    pub fn sign(&self, dialect: &Dialect, msg: &Message) -> Result<BytesMut, MacError> {
        let terminal = msg.terminal_id().ok_or(MacError::NoKey)?;
        let key = self.keys.signing_key(terminal).ok_or(MacError::NoKey)?;
        crate::mac::sign_message(dialect, msg, &key.key)
    }

    /// Checks an answer's MAC (`raw` as received) with its terminal's key.
    pub fn verify(&self, dialect: &Dialect, raw: &[u8], answer: &Message) -> Result<(), MacError> {
        let terminal = answer.terminal_id().ok_or(MacError::NoKey)?;
        self.keys
            .verify(dialect, raw, answer, terminal, crate::clock::unix_now())
            .map(|_| ())
    }
}

/// TLS and MACs of one tool run against a secured gateway.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub tls: Option<ClientTls>,
    pub mac: Option<MacSigner>,
}

/// The tools' flags for a secured gateway.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SecurityArgs {
    /// Connect with TLS (the listener's certificate checked against --ca).
    #[arg(long)]
    pub tls: bool,
    /// The CA certificate that issued the listener's certificate (with --tls).
    #[arg(long, requires = "tls")]
    pub ca: Option<PathBuf>,
    /// A client certificate to present (a terminal's or a NAC's, from `pingate certs terminal`).
    #[arg(long, requires_all = ["tls", "key"])]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the listener's certificate must carry.
    #[arg(long, default_value = "localhost", requires = "tls")]
    pub server_name: String,
    /// Sign requests with the terminals' MAC keys from this terminal key file (and check the answers' MACs).
    #[arg(long, requires = "kek_file")]
    pub mac_key_file: Option<PathBuf>,
    /// The key-encrypting key the terminal key file is sealed under.
    #[arg(long, requires = "mac_key_file")]
    pub kek_file: Option<PathBuf>,
}

impl SecurityArgs {
    pub fn client_tls(&self) -> Result<Option<ClientTls>, String> {
        if !self.tls {
            return Ok(None);
        }
        let ca = self
            .ca
            .as_deref()
            .ok_or("--tls needs --ca (the CA of the listener's certificate)")?;
        let client = self.cert.as_deref().zip(self.key.as_deref());
        ClientTls::load(ca, client, &self.server_name).map(Some)
    }

    /// TLS and MACs as the flags say.
    pub fn security(&self) -> Result<Security, String> {
        Ok(Security {
            tls: self.client_tls()?,
            mac: self.mac()?,
        })
    }

    pub fn mac(&self) -> Result<Option<MacSigner>, String> {
        match (&self.mac_key_file, &self.kek_file) {
            (Some(f), Some(k)) => MacSigner::load(f, k).map(Some),
            _ => Ok(None),
        }
    }
}
