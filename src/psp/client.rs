//! The gateway's side of PSP over one mutually authenticated TLS connection: many requests in flight, answers
//! matched by id in whatever order they come. The I/O over the protocol core: frames with [`FrameCodec::client`],
//! bodies with [`parse_response`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::{parse_response, CatalogEntry, FrameCodec, PspError, Request, RequestFrame, Response, WireError, VERSION};

/// Errors of the PSP client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect or TLS handshake failed (refused certificate, wrong server name, network).
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    /// The server name is not a valid DNS name or IP address.
    #[error("server name `{0}` is not a DNS name or IP address")]
    ServerName(String),
    /// The connection closed before the answer came.
    #[error("connection closed")]
    Closed,
    /// The server answered with an error.
    #[error("server error {:?}: {}", .0.code, .0.message)]
    Server(WireError),
    /// The server answered `hello` with something other than a welcome.
    #[error("expected a welcome, got {0}")]
    NotWelcome(String),
    /// A request over the protocol's limits (it was not sent; the connection is untouched).
    #[error("protocol: {0}")]
    Protocol(#[from] PspError),
}

/// Requests waiting for their answers; `None` once the connection is gone (no new request may wait then).
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Response, ClientError>>>>>>;

/// What the server said in its welcome.
#[derive(Clone, Debug)]
pub struct Welcome {
    pub gateway: String,
    pub server: String,
    pub catalog: Vec<CatalogEntry>,
}

/// One connection to a PIN server.
pub struct PspClient {
    out: mpsc::Sender<Bytes>,
    pending: Pending,
    next_id: AtomicU64,
    closed: CancellationToken,
}

impl PspClient {
    /// Connects, handshakes (TLS 1.3, our certificate) and says hello.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(PspClient, Welcome), ClientError> {
        let name =
            ServerName::try_from(server_name.to_string()).map_err(|_| ClientError::ServerName(server_name.into()))?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        tcp.set_nodelay(true)
            .map_err(|source| ClientError::Connect { addr, source })?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut sink, mut stream) = Framed::new(stream, FrameCodec::client()).split();
        let (out, mut rx) = mpsc::channel::<Bytes>(1024);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let p = pending.clone();
        let closed = CancellationToken::new();
        let closing = closed.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Ok(resp) = parse_response(&frame) else { break };
                let waiting = p
                    .lock()
                    .expect("not poisoned")
                    .as_mut()
                    .and_then(|m| m.remove(&resp.id));
                if let Some(tx) = waiting {
                    let _ = tx.send(resp.into_result().map_err(ClientError::Server));
                }
            }
            // Whatever is still waiting will never be answered on this connection, and nothing new may wait.
            let waiting = p.lock().expect("not poisoned").take();
            for (_, tx) in waiting.into_iter().flatten() {
                let _ = tx.send(Err(ClientError::Closed));
            }
            closing.cancel();
        });
        let client = PspClient {
            out,
            pending,
            next_id: AtomicU64::new(1),
            closed,
        };
        match client.call(Request::Hello { version: VERSION }).await {
            Ok(Response::Welcome {
                gateway,
                server,
                catalog,
                ..
            }) => Ok((
                client,
                Welcome {
                    gateway,
                    server,
                    catalog,
                },
            )),
            Ok(other) => Err(ClientError::NotWelcome(format!("{other:?}"))),
            // A server that refused our certificate closes the connection right after the handshake.
            Err(e) => Err(e),
        }
    }

    /// Whether the connection is gone (every later call fails at once with `Closed`).
    pub fn is_closed(&self) -> bool {
        self.pending.lock().expect("not poisoned").is_none()
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Sends one request and waits for its answer.
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_vec(&RequestFrame { id, request }).expect("requests serialise");
        FrameCodec::client().check_outgoing(body.len())?;
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("not poisoned").as_mut() {
            Some(m) => m.insert(id, tx),
            None => return Err(ClientError::Closed),
        };
        if self.out.send(Bytes::from(body)).await.is_err() {
            if let Some(m) = self.pending.lock().expect("not poisoned").as_mut() {
                m.remove(&id);
            }
            return Err(ClientError::Closed);
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }
}
