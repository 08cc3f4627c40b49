//! The metrics endpoint's HTTP (hyper): keep-alive, HEAD, limits, status codes and a clean stop, spoken to over a
//! real socket with bytes written here (not by the server's own HTTP code).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Fixed {
    ready: bool,
}

impl pingate::metrics::Source for Fixed {
    fn metrics(&self) -> String {
        "# TYPE x_up gauge\nx_up 1\n".into()
    }
    fn ready(&self) -> Result<(), String> {
        if self.ready {
            Ok(())
        } else {
            Err("no PIN server connected".into())
        }
    }
    fn status(&self) -> String {
        "<!DOCTYPE html><title>s</title>".into()
    }
}

async fn endpoint(ready: bool) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(pingate::metrics::serve(l, Arc::new(Fixed { ready }), stop.clone()));
    (addr, stop, task)
}

/// One response read off `s`: status, headers (lower-case names), body (`head`: none follows, whatever the
/// Content-Length says).
async fn response(s: &mut TcpStream, head: bool) -> (u16, Vec<(String, String)>, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed within a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let text = String::from_utf8(buf).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("content-length");
    let mut body = vec![0u8; if head { 0 } else { len }];
    s.read_exact(&mut body).await.unwrap();
    (status, headers, String::from_utf8(body).unwrap())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Whether the server closed `s` (EOF) within 5 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn two_requests_on_one_connection() {
    let (addr, _stop, _) = endpoint(true).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (code, h, body) = response(&mut s, false).await;
    assert_eq!(code, 200);
    assert!(
        header(&h, "content-type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{h:?}"
    );
    assert!(body.contains("x_up 1"), "{body}");
    // The same connection answers again.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(response(&mut s, false).await.2, "ok\n");
    // Pipelined: both answered, in order.
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(response(&mut s, false).await.2, "ready\n");
    let (code, h, body) = response(&mut s, false).await;
    assert_eq!(
        (code, header(&h, "content-type")),
        (200, Some("text/html; charset=utf-8"))
    );
    assert!(body.starts_with("<!DOCTYPE html>"));
}

#[tokio::test]
async fn head_has_the_length_of_get_and_no_body() {
    let (addr, _stop, _) = endpoint(true).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (code, h, _) = response(&mut s, true).await;
    assert_eq!(code, 200);
    assert_eq!(header(&h, "content-length"), Some("25"), "{h:?}");
    // Had a body followed, this would read its bytes instead of the next answer's status line.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(response(&mut s, false).await.0, 200);
}

#[tokio::test]
async fn not_found_not_allowed_and_not_ready() {
    let (addr, _stop, _) = endpoint(false).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (code, _, body) = response(&mut s, false).await;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics") && body.contains("/status"), "{body}");
    s.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let (code, h, _) = response(&mut s, false).await;
    assert_eq!((code, header(&h, "allow")), (405, Some("GET, HEAD")));
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(response(&mut s, false).await.2, "not ready: no PIN server connected\n");
    assert_eq!(pingate::metrics::get(addr, "/readyz").await.unwrap().0, 503);
    // A GET with a body: refused (none is read).
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(response(&mut s, false).await.0, 413);
}

#[tokio::test]
async fn a_too_large_request_head_is_refused_and_the_connection_closed() {
    let (addr, _stop, _) = endpoint(true).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    // The server may answer and close before it has read all of it: a failed write is fine.
    let _ = s.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Garbage is refused too, and the endpoint still serves.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x16\x03\x01 not http\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    assert_eq!(
        pingate::metrics::get(addr, "/healthz").await.unwrap(),
        (200, "ok\n".into())
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let (addr, _stop, _) = endpoint(true).await;
    // 16 keep-alive connections, each answered once (so each holds its slot).
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert_eq!(response(&mut s, false).await.0, 200);
        held.push(s);
    }
    let mut over = TcpStream::connect(addr).await.unwrap();
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty(),
        "answered over the cap: {}",
        String::from_utf8_lossy(&answer)
    );
    // One closed: its slot is free again.
    drop(held.pop());
    let mut answered = false;
    for _ in 0..50 {
        if let Ok((200, _)) = pingate::metrics::get(addr, "/healthz").await {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered, "no slot freed by a closed connection");
}

#[tokio::test]
async fn a_silent_connection_loses_its_slot_after_10_s() {
    let (addr, _stop, _) = endpoint(true).await;
    // One that never sends a request, and one idle after its first answer (keep-alive).
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(response(&mut idle, false).await.0, 200);
    let start = std::time::Instant::now();
    for s in [&mut silent, &mut idle] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "still open after 20 s");
    }
    let waited = start.elapsed();
    assert!(waited >= Duration::from_secs(8), "closed too early: {waited:?}");
}

#[tokio::test]
async fn stop_closes_idle_connections_and_ends_the_server() {
    let (addr, stop, task) = endpoint(true).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(response(&mut s, false).await.0, 200);
    stop.cancel();
    // The idle keep-alive connection is closed at once, and the server returns.
    assert!(closed(&mut s).await, "the idle connection was not closed");
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("serve returns after stop")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting after stop");
}
