//! Terminal connections over TCP: one listener per configured framing and dialect, one task per connection with
//! its own tracing span, several requests in flight per connection (polled by the connection's own task, answered
//! as they complete), caps on connections (in all and per source address), a deadline for a connection's first frame
//! (idle sockets do not keep slots), an idle timeout, and slow-sender protection (a frame, once started, must be
//! complete within `frame_timeout`).
//!
//! The reading side is a plain loop over [`FrameCodec`] (no I/O in the codec): bytes in, frames out, and the
//! deadline that applies next (frame or idle). Answers go through a writer task; an approved sale whose answer
//! cannot be written is reversed.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::{ListenerConfig, MacPolicy};
use super::origin::{CertNames, Origin};
use super::Gateway;
use crate::iso8583::{Dialect, Message};
use crate::link::framing::{Frame, FrameCodec};
use crate::logging::limited;
use crate::sale::{answer, ResponseCode, SaleKey};
use crate::traffic::capture::{protect_pins, terminal_frame, Capture, CaptureSink, Direction};

/// A terminal request being answered.
type RequestFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Time allowed to write one answer; a terminal that does not read is cut off.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many answers are framed into one write.
const WRITE_BATCH: usize = 32;
/// Time in-flight requests get to finish once shutdown starts.
const DRAIN: Duration = Duration::from_secs(30);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Open connections per source address.
#[derive(Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

struct SourceGuard<'a>(&'a PerSource, IpAddr);

impl Drop for SourceGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().expect("not poisoned");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serves terminals on `listener` until `shutdown` resolves, then stops accepting, lets open connections finish
/// what they have in flight, and returns.
pub async fn run(
    listener: TcpListener,
    cfg: ListenerConfig,
    dialect: Arc<Dialect>,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) {
    let cfg = Arc::new(cfg);
    let capture = cfg.capture.as_ref().and_then(|path| {
        let header = Capture::new(cfg.framing, cfg.tpdu, &cfg.dialect, cfg.capture_pins);
        crate::traffic::capture::open_logged(path, &header, &format!("listener {}", cfg.name))
    });
    let acceptor = match cfg.tls.as_ref().map(|t| t.acceptor()).transpose() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(listener = %cfg.name, error = %e, "TLS cannot be set up; the listener does not serve");
            return;
        }
    };
    let load = gateway.listener_load(&cfg.name);
    if let Ok(addr) = listener.local_addr() {
        load.listening_on(addr);
    }
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let per_source = Arc::new(PerSource::default());
    let stop = CancellationToken::new();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    limited!(warn, "accept failed", listener = %cfg.name, error = %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !super::origin::allowed(&cfg.allow, peer.ip()) {
            gateway.note_closed(&cfg.name, "source_not_allowed");
            limited!(warn, "connection from outside the listener's allow list; closed", listener = %cfg.name, %peer);
            drop(stream);
            continue;
        }
        let accepted = Instant::now();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            gateway.note_closed(&cfg.name, "connection_cap");
            limited!(warn, "connection cap reached; closed", listener = %cfg.name, %peer);
            drop(stream);
            continue;
        };
        {
            let mut m = per_source.0.lock().expect("not poisoned");
            let n = m.entry(peer.ip()).or_insert(0);
            if *n >= cfg.max_per_source {
                gateway.note_closed(&cfg.name, "source_cap");
                limited!(warn, "per-source connection cap reached; closed", listener = %cfg.name, %peer);
                drop(stream);
                continue;
            }
            *n += 1;
        }
        let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        // `terminal` is the first terminal id seen on the connection, `more_terminals` says another one spoke too (a
        // NAC): each is recorded once, since a span keeps every value recorded into it (recording per request made
        // every line of a long-lived connection longer, and its span larger, with every request).
        let span = tracing::info_span!(
            "terminal",
            listener = %cfg.name,
            %peer,
            conn = id,
            terminal = tracing::field::Empty,
            more_terminals = tracing::field::Empty,
            certificate = tracing::field::Empty
        );
        let open = load.opened();
        let (cfg, dialect, gw, stop, ps, capture, acceptor) = (
            cfg.clone(),
            dialect.clone(),
            gateway.clone(),
            stop.clone(),
            per_source.clone(),
            capture.clone(),
            acceptor.clone(),
        );
        conns.spawn(
            async move {
                let _permit = permit;
                let _open = open;
                let _source = SourceGuard(&ps, peer.ip());
                let _ = stream.set_nodelay(true);
                let capture = capture.map(|c| (c, id));
                let mut origin = Origin::tcp(peer.ip());
                let ended = match acceptor {
                    None => {
                        let (rd, wr) = stream.into_split();
                        let origin = Arc::new(origin);
                        connection(rd, wr, origin, accepted, &cfg, dialect, gw, stop, capture).await
                    }
                    Some(acceptor) => {
                        // The handshake is part of the first frame's time: a peer that never finishes it holds its
                        // slot no longer than one that never sends a frame.
                        let by = accepted + cfg.first_frame_timeout;
                        match tokio::time::timeout_at(by, acceptor.accept(stream)).await {
                            Err(_) => {
                                gw.note_closed(&cfg.name, "tls_handshake_timeout");
                                limited!(
                                    info,
                                    "TLS handshake not finished within the first-frame deadline; closing"
                                );
                                Err("TLS handshake timeout".into())
                            }
                            Ok(Err(e)) => {
                                gw.note_closed(&cfg.name, "tls_handshake");
                                limited!(info, "TLS handshake failed; closing", error = %e);
                                Err(format!("TLS handshake: {e}"))
                            }
                            Ok(Ok(tls)) => {
                                origin.cert = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| Arc::new(CertNames::of(c)));
                                if let Some(names) = &origin.cert {
                                    tracing::Span::current().record("certificate", names.0.join(",").as_str());
                                }
                                let (rd, wr) = tokio::io::split(tls);
                                let origin = Arc::new(origin);
                                connection(rd, wr, origin, accepted, &cfg, dialect, gw, stop, capture).await
                            }
                        }
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended");
                }
            }
            .instrument(span),
        );
    }
    stop.cancel();
    let drained = tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        conns.abort_all();
    }
}

/// What goes to the writer: an encoded frame, and the sale to reverse if it cannot be written. The key is boxed:
/// the channel allocates room for a block of these per connection, idle or not (10,000 idle connections).
type Outgoing = (Frame, Option<Box<SaleKey>>);

/// Frame content as a capture records it: TPDU, then the message.
pub(crate) fn captured(frame: &Frame) -> Bytes {
    match frame.tpdu {
        None => frame.message.clone(),
        Some(t) => [&t.bytes()[..], &frame.message[..]].concat().into(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection<R, W>(
    mut rd: R,
    mut wr: W,
    origin: Arc<Origin>,
    accepted: Instant,
    cfg: &ListenerConfig,
    dialect: Arc<Dialect>,
    gw: Arc<Gateway>,
    stop: CancellationToken,
    capture: Option<(CaptureSink, u64)>,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut codec = FrameCodec::new(cfg.framing, cfg.tpdu, cfg.max_frame);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(cfg.max_in_flight * 2);
    let writer_gw = gw.clone();
    let mut enc = codec.clone();
    let (writer_capture, writer_dialect, pins, tpdu) = (capture.clone(), dialect.clone(), cfg.capture_pins, cfg.tpdu);
    let writer = tokio::spawn(
        async move {
            let mut buf = BytesMut::new();
            let mut failed = false;
            // Answers that are ready together (a journal sync releases many at once) go out in one write: one
            // system call on each side instead of one per answer.
            // Allocated by the first answer (`recv_many` reserves room then): an idle connection holds none.
            let mut batch: Vec<Outgoing> = Vec::new();
            while out_rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
                buf.clear();
                let mut sales = Vec::new();
                for (frame, sale) in batch.drain(..) {
                    if let Some((sink, conn)) = &writer_capture {
                        // PINs are masked (or left out) before the frame reaches the file.
                        if let Some(data) = protect_pins(&writer_dialect, &captured(&frame), tpdu, pins) {
                            sink.record(*conn, Direction::Host, data);
                        }
                    }
                    if failed {
                        sales.extend(sale);
                        continue;
                    }
                    let before = buf.len();
                    if let Err(e) = enc.encode(frame, &mut buf) {
                        // This answer is not sent (the terminal times out and reverses); the others still are.
                        limited!(error, "answer cannot be framed", error = %e);
                        buf.truncate(before);
                        if let Some(key) = sale {
                            writer_gw.undelivered(&key).await;
                        }
                        continue;
                    }
                    sales.extend(sale);
                }
                if !failed && !buf.is_empty() {
                    failed = !tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&buf))
                        .await
                        .is_ok_and(|r| r.is_ok());
                }
                if failed {
                    // Some of these may have reached the terminal before the write failed; a terminal that did
                    // get its answer and then sees the sale reversed is the safe side (the PIN is voided, not lost).
                    for key in &sales {
                        writer_gw.undelivered(key).await;
                    }
                }
            }
            let _ = wr.shutdown().await;
        }
        .in_current_span(),
    );

    // Requests in flight, polled by this task (not one spawned task each: their journal syncs and answers wake
    // this one task, once for all that are ready).
    let mut in_flight: FuturesUnordered<RequestFuture> = FuturesUnordered::new();
    // Until its first frame is complete, a connection is given `first_frame_timeout` from its accept.
    let first_frame_by = accepted + cfg.first_frame_timeout;
    let mut framed = false;
    let mut named = Named::default();
    let mut buf = BytesMut::with_capacity(0);
    let mut frame_started: Option<Instant> = None;
    let mut last_activity = Instant::now();
    let result = loop {
        // Every complete frame in the buffer first, while there is room in flight (else they wait in the buffer,
        // and nothing more is read: our backpressure).
        while in_flight.len() < cfg.max_in_flight {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Some((sink, conn)) = &capture {
                        if let Some(data) = terminal_frame(&dialect, captured(&frame), cfg.tpdu, cfg.capture_pins) {
                            sink.record(*conn, Direction::Terminal, data);
                        }
                    }
                    // The frame is complete: whatever follows in the buffer is a new frame, timed from now (also
                    // after waiting for room below, which is our backpressure, not the terminal's slowness).
                    frame_started = None;
                    framed = true;
                    last_activity = Instant::now();
                    if let Some(request) = on_frame(frame, &dialect, cfg.mac, &origin, &gw, &out_tx, &mut named) {
                        in_flight.push(request);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    limited!(warn, "framing error; closing the connection", error = %e);
                    drop(out_tx);
                    let _ = writer.await;
                    return Err(e.to_string());
                }
            }
        }
        let full = in_flight.len() >= cfg.max_in_flight;
        frame_started = match (buf.is_empty() || full, frame_started) {
            // Full: what is in the buffer waits for us, not for the terminal.
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, s) => s,
        };
        let busy = !in_flight.is_empty();
        let deadline = match frame_started {
            Some(t) => t + cfg.frame_timeout,
            None if busy => Instant::now() + cfg.idle_timeout,
            None => last_activity + cfg.idle_timeout,
        };
        let deadline = if framed { deadline } else { deadline.min(first_frame_by) };
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            Some(()) = in_flight.next(), if busy => {}
            r = rd.read_buf(&mut buf), if !full => match r {
                Ok(0) => break Ok(()),
                Ok(_) => last_activity = Instant::now(),
                Err(e) => break Err(e.to_string()),
            },
            _ = tokio::time::sleep_until(deadline) => {
                if !framed && Instant::now() >= first_frame_by {
                    gw.note_closed(&cfg.name, "no_first_frame");
                    limited!(info, "no frame within the first-frame deadline; closing", bytes = buf.len());
                    break Err("no first frame".into());
                }
                if frame_started.is_some() {
                    gw.note_closed(&cfg.name, "slow_sender");
                    limited!(info, "frame not completed in time (slow sender); closing", bytes = buf.len());
                    break Err("slow sender".into());
                }
                if in_flight.is_empty() {
                    tracing::debug!("idle; closing");
                    break Ok(());
                }
            }
        }
    };
    // Let what is in flight be answered, then close.
    while in_flight.next().await.is_some() {}
    drop(out_tx);
    let _ = writer.await;
    result
}

/// Decodes a terminal's request. When it does not decode, the error is logged and the answer is a format error if
/// the MTI can be read (a request class that expects an answer), else nothing.
pub(super) fn decode_request(dialect: &Dialect, bytes: &Bytes) -> Result<Message, Option<Bytes>> {
    match dialect.decode(bytes) {
        Ok(m) => Ok(m),
        Err(e) => {
            limited!(info, "request does not decode", error = %e);
            let Some(mti) = dialect.peek_mti(bytes) else {
                return Err(None);
            };
            if mti.function() % 2 != 0 || mti.class() > 8 {
                return Err(None);
            }
            // Minimal answer: the response MTI and field 39.
            let req = Message::new(mti);
            let ans = answer(&req, ResponseCode::FormatError);
            Err(dialect.encode(&ans).ok().map(|b| b.freeze()))
        }
    }
}

/// What the connection's span was told about its terminals: each field is recorded at most once.
#[derive(Default)]
enum Named {
    #[default]
    Nobody,
    First(Box<str>),
    Several,
}

impl Named {
    /// Records `terminal` in the current (connection) span if it is the first terminal id, or the first other one.
    fn saw(&mut self, terminal: &str) {
        match self {
            Named::Nobody => {
                tracing::Span::current().record("terminal", terminal);
                *self = Named::First(terminal.into());
            }
            Named::First(first) if **first != *terminal => {
                tracing::Span::current().record("more_terminals", true);
                *self = Named::Several;
            }
            Named::First(_) | Named::Several => {}
        }
    }
}

fn on_frame(
    frame: Frame,
    dialect: &Arc<Dialect>,
    mac: MacPolicy,
    origin: &Arc<Origin>,
    gw: &Arc<Gateway>,
    out: &mpsc::Sender<Outgoing>,
    named: &mut Named,
) -> Option<RequestFuture> {
    let reply_tpdu = frame.tpdu.map(|t| t.reply());
    if frame.message.is_empty() {
        // Keep-alive: echoed as it came.
        let _ = out.try_send((
            Frame {
                tpdu: reply_tpdu,
                message: Bytes::new(),
            },
            None,
        ));
        return None;
    }
    let received = Instant::now();
    let msg = match decode_request(dialect, &frame.message) {
        Ok(m) => m,
        Err(answer) => {
            gw.note_unreadable(answer.is_some());
            if let Some(bytes) = answer {
                let _ = out.try_send((
                    Frame {
                        tpdu: reply_tpdu,
                        message: bytes,
                    },
                    None,
                ));
            }
            return None;
        }
    };
    if let Some(t) = msg.terminal_id() {
        named.saw(t);
    }
    let (gw, dialect, out, origin) = (gw.clone(), dialect.clone(), out.clone(), origin.clone());
    let raw = frame.message;
    Some(Box::pin(
        async move {
            let reply = gw.handle_from(&dialect, &raw, &msg, mac, &origin, received).await;
            let bytes = match gw.encode_reply(&dialect, &reply) {
                Ok(b) => b,
                Err(e) => {
                    limited!(error, "answer does not encode", error = %e);
                    if let Some(k) = &reply.reverse_if_undelivered {
                        gw.undelivered(k).await;
                    }
                    return;
                }
            };
            let sale = reply.reverse_if_undelivered.clone().map(Box::new);
            if let Err(mpsc::error::SendError((_, Some(key)))) = out
                .send((
                    Frame {
                        tpdu: reply_tpdu,
                        message: bytes,
                    },
                    sale,
                ))
                .await
            {
                gw.undelivered(&key).await;
            }
        }
        .in_current_span(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's answer channel holds a block of these from the start, idle or not: 10,000 idle terminals
    /// must fit in 100 MiB (`cargo bench --bench gateway -- idle`). With the sale key unboxed each was 112 bytes, and
    /// with a batch buffer allocated up front an idle connection took 10.6 KiB (5.0 KiB now).
    #[test]
    fn an_answer_in_the_writer_channel_stays_small() {
        assert!(
            std::mem::size_of::<Outgoing>() <= 64,
            "{} bytes",
            std::mem::size_of::<Outgoing>()
        );
    }
}
