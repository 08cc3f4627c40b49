//! The PIN server end to end: real certificates, real TLS 1.3 handshakes, real sockets, a real SQLite file.

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pingate::crypto::PinCipher;
use pingate::psp::client::{ClientError, PspClient};
use pingate::psp::{parse_response, ConfirmOutcome, ErrorCode, Request, Response, ResponseFrame, ReverseOutcome};
use pingate::sale::Pin;
use pingate::server::{run, ServerOptions};
use pingate::store::handle::{DbUrl, StoreHandle, StoreOptions};
use pingate::store::sqlite::SqliteStore;
use pingate::store::{NewPin, Product};
use pingate::tls::{
    certs_init_with_ca, client_config, issue_gateway_cert, time_days, time_now, CertsDir, CertsInit, GatewayList,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

struct Fixture {
    dir: PathBuf,
    certs: CertsDir,
    ca: pingate::tls::Ca,
    keys: String,
}

impl Fixture {
    fn new(name: &str, pins: usize) -> Fixture {
        let dir = std::env::temp_dir().join(format!("pingate-server-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (certs, ca) = certs_init_with_ca(
            &dir.join("certs"),
            &CertsInit {
                gateways: vec!["gw1".into(), "gw2".into()],
                ..CertsInit::default()
            },
        )
        .unwrap();
        let keys = std::fs::read_to_string(certs.pin_keys()).unwrap();
        let mut s = SqliteStore::open(&dir.join("pins.db"), PinCipher::from_spec(&keys).unwrap()).unwrap();
        s.upsert_product(&Product {
            code: "TOPUP".into(),
            name: "Top-up 10".into(),
            supplier: "Telco".into(),
            currency: "978".into(),
            denominations: vec![1000],
        })
        .unwrap();
        let new: Vec<NewPin> = (0..pins)
            .map(|i| NewPin {
                product: "TOPUP".into(),
                amount: 1000,
                pin: Pin::new(format!("55{i:010}")),
                serial: format!("S{i:08}"),
                expiry: None,
                receipt: vec!["Dial *100*PIN#".into()],
            })
            .collect();
        s.import(&new).unwrap();
        Fixture { dir, certs, ca, keys }
    }

    fn client_tls(&self, gw: &str) -> Arc<rustls::ClientConfig> {
        Arc::new(
            client_config(
                &self.certs.gateway_cert(gw),
                &self.certs.gateway_key(gw),
                &self.certs.gateway_ca(gw),
            )
            .unwrap(),
        )
    }

    /// Starts a server; returns its address, a trigger to shut it down and the task to await.
    async fn start(&self, opts: ServerOptions) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let gateways = GatewayList::load(&self.certs.gateways()).unwrap();
        let tls = pingate::tls::server_config(
            &self.certs.server_cert(),
            &self.certs.server_key(),
            &self.certs.server_ca(),
            gateways.clone(),
        )
        .unwrap();
        let store = StoreHandle::open(
            &DbUrl::Sqlite(self.dir.join("pins.db")),
            &self.keys,
            &StoreOptions::default(),
        )
        .await
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(listener, Arc::new(tls), gateways, store.clone(), opts, async {
                let _ = rx.await;
            })
            .await;
            store.close().await;
        });
        (addr, tx, task)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn gateway_sells_reserves_confirms_and_reverses_over_mutual_tls() {
    let f = Fixture::new("ops", 300);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let (c, welcome) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    assert_eq!(welcome.gateway, "gw1", "the gateway id comes from the certificate");
    assert_eq!(welcome.catalog[0].code, "TOPUP");
    assert_eq!(welcome.catalog[0].denominations, vec![1000]);

    let Response::Sold { pin: a } = c.call(sell(1)).await.unwrap() else {
        panic!()
    };
    let Response::Sold { pin: again } = c.call(sell(1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(a, again, "a repeated sale returns the same PIN");
    assert!(!format!("{a:?}").contains(a.pin.expose()), "Debug masks the PIN");

    // The same key through another gateway is the same sale (a NAC failing over, a load balancer): its repeat gets
    // the same PIN, never a second one.
    let (c2, _) = PspClient::connect(addr, "127.0.0.1", f.client_tls("gw2"))
        .await
        .unwrap();
    let Response::Sold { pin: other } = c2.call(sell(1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(other, a);

    let Response::Reserved { pins, lease_until } = c
        .call(Request::Reserve {
            product: "TOPUP".into(),
            amount: 1000,
            count: 5,
            lease_secs: 600,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(pins.len(), 5);
    assert!(lease_until > 0);
    // gw2 cannot confirm gw1's PIN.
    assert_eq!(
        code(
            c2.call(Request::Confirm {
                pin_id: pins[0].pin_id,
                terminal: terminal(50),
            })
            .await
        ),
        ErrorCode::NotHolder
    );
    let r = c
        .call(Request::Confirm {
            pin_id: pins[0].pin_id,
            terminal: terminal(50),
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        Response::Confirmed {
            outcome: ConfirmOutcome::Sold
        }
    );
    let r = c
        .call(Request::Confirm {
            pin_id: pins[0].pin_id,
            terminal: terminal(50),
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        Response::Confirmed {
            outcome: ConfirmOutcome::AlreadyConfirmed
        }
    );
    let r = c
        .call(Request::Release {
            pin_ids: pins.iter().map(|p| p.pin_id).collect(),
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        Response::Released {
            refused: vec![pins[0].pin_id]
        }
    );
    let r = c
        .call(Request::Renew {
            pin_ids: vec![pins[1].pin_id],
            lease_secs: 60,
        })
        .await
        .unwrap();
    assert!(
        matches!(r, Response::Renewed { count: 0, .. }),
        "released PINs are no longer ours to renew"
    );

    let rev = |stan: u32| Request::Reverse {
        terminal_id: "TERM0001".into(),
        stan: format!("{stan:06}"),
        transmission: "1128173500".into(),
        content: None,
        reason: Default::default(),
        requested_at: None,
    };
    assert_eq!(
        c.call(rev(1)).await.unwrap(),
        Response::Reversed {
            outcome: ReverseOutcome::Voided,
            pin_id: Some(a.pin_id)
        }
    );
    assert_eq!(
        c.call(rev(1)).await.unwrap(),
        Response::Reversed {
            outcome: ReverseOutcome::AlreadyVoided,
            pin_id: Some(a.pin_id)
        }
    );
    assert_eq!(
        c.call(rev(2)).await.unwrap(),
        Response::Reversed {
            outcome: ReverseOutcome::Remembered,
            pin_id: None
        }
    );
    // By PIN id: only the gateway that sold it.
    let Response::Sold { pin: b } = c.call(sell(4)).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        code(c2.call(Request::ReversePin { pin_id: b.pin_id }).await),
        ErrorCode::NotHolder
    );
    let r = c.call(Request::ReversePin { pin_id: b.pin_id }).await.unwrap();
    assert_eq!(
        r,
        Response::Reversed {
            outcome: ReverseOutcome::Voided,
            pin_id: Some(b.pin_id)
        }
    );
    let r = c.call(Request::ReversePin { pin_id: b.pin_id }).await.unwrap();
    assert_eq!(
        r,
        Response::Reversed {
            outcome: ReverseOutcome::AlreadyVoided,
            pin_id: Some(b.pin_id)
        }
    );
    assert_eq!(code(c.call(sell(2)).await), ErrorCode::AlreadyReversed);
    assert_eq!(
        code(
            c.call(Request::Sell {
                product: "NOPE".into(),
                amount: 1000,
                terminal: terminal(3),
            })
            .await
        ),
        ErrorCode::UnknownProduct
    );
    assert_eq!(
        code(
            c.call(Request::Sell {
                product: "TOPUP".into(),
                amount: 5,
                terminal: terminal(3),
            })
            .await
        ),
        ErrorCode::UnknownDenomination
    );
    // A known key with other content is a mismatch, whatever else is wrong with it.
    let r = c
        .call(Request::Sell {
            product: "TOPUP".into(),
            amount: 2000,
            terminal: terminal(1),
        })
        .await;
    assert_eq!(code(r), ErrorCode::DuplicateMismatch);
    let r = c
        .call(Request::Reserve {
            product: "TOPUP".into(),
            amount: 1000,
            count: 5,
            lease_secs: 10_000_000,
        })
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    assert_eq!(c.call(Request::Ping).await.unwrap(), Response::Pong);

    // Many requests in flight on one connection, answered out of order: every sale gets its own PIN.
    let c = Arc::new(c);
    let calls: Vec<_> = (1000..1200u32)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.call(sell(i)).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in calls {
        let Response::Sold { pin } = t.await.unwrap().unwrap() else {
            panic!()
        };
        ids.push(pin.pin_id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    let Response::Stock { stock } = c.call(Request::Stock).await.unwrap() else {
        panic!()
    };
    let sold: i64 = stock.iter().filter(|s| s.state == "sold").map(|s| s.count).sum();
    assert_eq!(
        sold,
        1 + 200,
        "the confirmed cached PIN, the 200 (the first sale, repeated through gw2, is voided)"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// The error code of a refused request.
fn code(r: Result<Response, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(w)) => w.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn refused(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, name: &str) -> ClientError {
    match PspClient::connect(addr, name, tls).await {
        Ok(_) => panic!("connection should have been refused"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn tls_refuses_missing_foreign_expired_and_unlisted_certificates() {
    let f = Fixture::new("refusals", 5);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pingate::tls::load_certs(&f.certs.ca()).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = || {
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
    };
    // No client certificate.
    refused(addr, Arc::new(builder().with_no_client_auth()), "localhost").await;
    // A certificate from another CA.
    let other = Fixture::new("other-ca", 0);
    let foreign = client_config(
        &other.certs.gateway_cert("gw1"),
        &other.certs.gateway_key("gw1"),
        &f.certs.ca(),
    )
    .unwrap();
    refused(addr, Arc::new(foreign), "localhost").await;
    // Our CA, but expired.
    let write = |name: &str, cert: &rcgen::Certificate, key: &rcgen::KeyPair| {
        let (c, k) = (f.dir.join(format!("{name}.pem")), f.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        write_key(&k, &key.serialize_pem());
        Arc::new(client_config(&c, &k, &f.certs.ca()).unwrap())
    };
    let (cert, key) = issue_gateway_cert(
        &f.ca.cert,
        &f.ca.key,
        "gw1",
        time_now() - time_days(30),
        time_now() - time_days(1),
    )
    .unwrap();
    refused(addr, write("expired", &cert, &key), "localhost").await;
    // Our CA, valid, but not on the gateway list.
    let (cert, key) = issue_gateway_cert(
        &f.ca.cert,
        &f.ca.key,
        "gw9",
        time_now() - time_days(1),
        time_now() + time_days(30),
    )
    .unwrap();
    refused(addr, write("unlisted", &cert, &key), "localhost").await;
    // The gateway checks the server's name.
    let e = refused(addr, f.client_tls("gw1"), "pins.example.com").await;
    assert!(
        e.to_string().contains("certificate") || e.to_string().contains("Name"),
        "{e}"
    );
    // And a proper gateway still gets in.
    assert!(PspClient::connect(addr, "localhost", f.client_tls("gw1")).await.is_ok());
    stop.send(()).unwrap();
    task.await.unwrap();
}

type Raw = Framed<tokio_rustls::client::TlsStream<TcpStream>, LengthDelimitedCodec>;

async fn raw(f: &Fixture, addr: SocketAddr) -> Raw {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(f.client_tls("gw1"))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    Framed::new(tls, LengthDelimitedCodec::builder().length_field_length(4).new_codec())
}

async fn ask(conn: &mut Raw, body: &str) -> Option<ResponseFrame> {
    conn.send(Bytes::from(body.to_string())).await.ok()?;
    let frame = tokio::time::timeout(Duration::from_secs(5), conn.next())
        .await
        .expect("answer in time")?;
    Some(parse_response(&frame.ok()?).unwrap())
}

#[tokio::test]
async fn malformed_requests_get_bad_request_and_oversize_frames_close_the_connection() {
    let f = Fixture::new("malformed", 5);
    let opts = ServerOptions {
        max_frame: 1024,
        ..ServerOptions::default()
    };
    let (addr, stop, task) = f.start(opts).await;

    let mut c = raw(&f, addr).await;
    let r = ask(&mut c, r#"{"id":1,"op":"ping"}"#).await.unwrap();
    assert_eq!(r.error.unwrap().message, "the first request must be hello");
    assert!(c.next().await.is_none(), "closed after a request before hello");

    // A malformed first frame is answered and ends the connection too.
    let mut c = raw(&f, addr).await;
    let r = ask(&mut c, "{not json").await.unwrap();
    assert_eq!(r.error.unwrap().code, ErrorCode::BadRequest);
    assert!(c.next().await.is_none(), "closed after a malformed first frame");

    let mut c = raw(&f, addr).await;
    assert!(ask(&mut c, r#"{"id":1,"op":"hello","version":1}"#)
        .await
        .unwrap()
        .ok
        .is_some());
    let r = ask(&mut c, r#"{"id":2,"op":"ping","colour":"red"}"#).await.unwrap();
    assert_eq!(
        (r.id, r.error.unwrap().message),
        (2, "unknown field `colour`".to_string())
    );
    let r = ask(&mut c, "{not json").await.unwrap();
    assert_eq!(r.id, 0);
    assert_eq!(r.error.unwrap().code, ErrorCode::BadRequest);
    let r = ask(&mut c, r#"{"id":3,"op":"sell","product":"TOPUP","amount":1000,"terminal":{"terminal_id":"","merchant_id":"M","stan":"1","transmission":"1","rrn":""}}"#).await.unwrap();
    assert_eq!(
        r.error.unwrap().message,
        "terminal.terminal_id: 1 to 16 printable characters"
    );
    // A sales allowance of no sale, or of more than a limit can name: refused, named.
    for (body, message) in [
        (
            r#"{"id":3,"op":"sales_allowance","merchant_id":"M","count":0}"#,
            "count: 1 to 100000",
        ),
        (
            r#"{"id":3,"op":"sales_allowance","merchant_id":"M","count":100001}"#,
            "count: 1 to 100000",
        ),
        (
            r#"{"id":3,"op":"sales_allowance","merchant_id":"","count":1}"#,
            "merchant_id: 1 to 32 characters",
        ),
    ] {
        assert_eq!(
            ask(&mut c, body).await.unwrap().error.unwrap().message,
            message,
            "{body}"
        );
    }
    // A merchant without a limit: all of it.
    let r = ask(&mut c, r#"{"id":3,"op":"sales_allowance","merchant_id":"M","count":5}"#)
        .await
        .unwrap();
    assert_eq!(
        r.ok,
        Some(Response::Allowance {
            granted: 5,
            limited: false
        })
    );
    // Still usable after bad requests.
    assert_eq!(
        ask(&mut c, r#"{"id":4,"op":"ping"}"#).await.unwrap().ok,
        Some(Response::Pong)
    );
    // A frame over the cap ends the connection (its boundary cannot be trusted).
    let big = format!(r#"{{"id":5,"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    assert!(ask(&mut c, &big).await.is_none());

    // A client that connects and never handshakes is cut off; others are unaffected meanwhile.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (ok, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    assert_eq!(ok.call(Request::Ping).await.unwrap(), Response::Pong);
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_answers_every_request_in_flight_and_every_acknowledged_sale_is_durable() {
    let f = Fixture::new("drain", 2_000);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let (c, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    let c = Arc::new(c);
    let (tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let calls: Vec<_> = (0..1_000u32)
        .map(|i| {
            let (c, tx) = (c.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(Response::Sold { pin }) = c.call(sell(i)).await {
                    tx.send(pin.pin_id).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    // Shut down while requests are in flight: once the first answers are in.
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 20 {
        acknowledged.push(acks.recv().await.unwrap());
    }
    stop.send(()).unwrap();
    for t in calls {
        t.await.unwrap();
    }
    while let Some(id) = acks.recv().await {
        acknowledged.push(id);
    }
    task.await.unwrap();
    // The server is gone and its store closed: read the file as a restarted server would.
    let s = SqliteStore::open(&f.dir.join("pins.db"), PinCipher::from_spec(&f.keys).unwrap()).unwrap();
    let sold: i64 = s
        .connection()
        .query_row("SELECT COUNT(*) FROM pins WHERE state = 'sold'", [], |r| r.get(0))
        .unwrap();
    assert!(!acknowledged.is_empty());
    assert_eq!(
        sold as usize,
        acknowledged.len(),
        "sold in the database = acknowledged to the gateway"
    );
    // The client knows its connection is gone: a call now fails at once instead of waiting forever.
    let late = tokio::time::timeout(Duration::from_secs(5), c.call(Request::Ping))
        .await
        .expect("no hang");
    assert!(matches!(late, Err(ClientError::Closed)), "{late:?}");
    assert!(c.is_closed());
    for id in acknowledged {
        let st: String = s
            .connection()
            .query_row("SELECT state FROM pins WHERE id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert_eq!(st, "sold");
    }
}

/// A client that opens TCP and never handshakes is cut off after the handshake timeout (virtual time: the test
/// does not wait 10 real seconds).
#[tokio::test(start_paused = true)]
async fn a_silent_client_is_cut_off_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let f = Fixture::new("silent", 1);
    let opts = ServerOptions {
        handshake_timeout: Duration::from_secs(10),
        ..ServerOptions::default()
    };
    let (addr, stop, task) = f.start(opts).await;
    let start = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "the server closes the connection");
    assert!(
        start.elapsed() >= Duration::from_secs(10),
        "not before the timeout: {:?}",
        start.elapsed()
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// An answer far larger than the request cap (a reserve of 1,000 PINs) is delivered, and the connection goes on.
#[tokio::test]
async fn large_answers_are_delivered() {
    let f = Fixture::new("large", 1_200);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let (c, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    let r = c
        .call(Request::Reserve {
            product: "TOPUP".into(),
            amount: 1000,
            count: 1_000,
            lease_secs: 600,
        })
        .await
        .unwrap();
    let Response::Reserved { pins, .. } = r else { panic!() };
    assert_eq!(pins.len(), 1_000);
    assert_eq!(c.call(Request::Ping).await.unwrap(), Response::Pong);
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// The largest `confirm_batch` the protocol allows (every terminal field at its longest, each character one JSON
/// escapes) reaches a server of default limits and is answered confirm by confirm; one confirm more is refused as a
/// whole. A request over the request frame is refused by the client before it is sent, and the connection goes on.
#[tokio::test]
async fn the_largest_confirm_batch_is_answered_and_a_request_over_the_frame_is_not_sent() {
    use pingate::psp::{
        ConfirmItem, PspError, Terminal, MAX_CONFIRM_BATCH, MAX_MERCHANT_ID, MAX_REQUEST_FRAME, MAX_RRN, MAX_STAN,
        MAX_TERMINAL_ID, MAX_TRANSMISSION,
    };
    let f = Fixture::new("largest-batch", 1);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let (c, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    let escaped = |n: usize| "\"".repeat(n);
    let longest = Terminal {
        terminal_id: escaped(MAX_TERMINAL_ID),
        merchant_id: escaped(MAX_MERCHANT_ID),
        stan: escaped(MAX_STAN),
        transmission: escaped(MAX_TRANSMISSION),
        rrn: escaped(MAX_RRN),
    };
    let batch = |n: usize| Request::ConfirmBatch {
        confirms: (0..n)
            .map(|i| ConfirmItem {
                pin_id: i64::MIN + i as i64,
                terminal: longest.clone(),
            })
            .collect(),
    };
    let Response::ConfirmedBatch { results } = c.call(batch(MAX_CONFIRM_BATCH)).await.unwrap() else {
        panic!()
    };
    // No such PIN is held by this gateway: each confirm is refused on its own, none for the batch's size.
    assert_eq!(results.len(), MAX_CONFIRM_BATCH);
    for r in &results {
        assert_eq!(r.error.as_ref().map(|e| e.code), Some(ErrorCode::NotHolder), "{r:?}");
    }
    let e = c.call(batch(MAX_CONFIRM_BATCH + 1)).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Server(ref w) if w.code == ErrorCode::BadRequest && w.message == "confirms: 1 to 256"),
        "{e}"
    );
    let over = Request::Release {
        pin_ids: vec![i64::MIN; MAX_REQUEST_FRAME / 20],
    };
    let e = c.call(over).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Protocol(PspError::FrameTooLarge {
                max: MAX_REQUEST_FRAME,
                ..
            })
        ),
        "{e}"
    );
    assert_eq!(c.call(Request::Ping).await.unwrap(), Response::Pong);
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn confirm_batch_answers_each_confirm_in_order() {
    use pingate::psp::ConfirmItem;
    let f = Fixture::new("confirm-batch", 50);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let (c, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    let (c2, _) = PspClient::connect(addr, "localhost", f.client_tls("gw2"))
        .await
        .unwrap();
    let reserve = Request::Reserve {
        product: "TOPUP".into(),
        amount: 1000,
        count: 3,
        lease_secs: 600,
    };
    let Response::Reserved { pins, .. } = c.call(reserve.clone()).await.unwrap() else {
        panic!()
    };
    let Response::Reserved { pins: theirs, .. } = c2.call(reserve).await.unwrap() else {
        panic!()
    };
    let item = |pin_id, stan| ConfirmItem {
        pin_id,
        terminal: terminal(stan),
    };
    let batch = Request::ConfirmBatch {
        confirms: vec![
            item(pins[0].pin_id, 1),
            item(pins[1].pin_id, 2),
            item(theirs[0].pin_id, 3), // another gateway's PIN
            item(pins[2].pin_id, 1),   // a key already used for another PIN
            item(pins[0].pin_id, 1),   // a repeat
        ],
    };
    let Response::ConfirmedBatch { results } = c.call(batch).await.unwrap() else {
        panic!()
    };
    let got: Vec<_> = results
        .iter()
        .map(|r| (r.outcome, r.error.as_ref().map(|e| e.code)))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(ConfirmOutcome::Sold), None),
            (Some(ConfirmOutcome::Sold), None),
            (None, Some(ErrorCode::NotHolder)),
            // Handed out under a key already sold: voided, and the conflict recorded (never retried forever).
            (Some(ConfirmOutcome::ConflictVoided), None),
            (Some(ConfirmOutcome::AlreadyConfirmed), None),
        ]
    );
    let e = c.call(Request::ConfirmBatch { confirms: vec![] }).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Server(ref w) if w.code == ErrorCode::BadRequest),
        "{e}"
    );
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn pins_past_their_expiry_date_leave_stock_when_the_server_starts() {
    let f = Fixture::new("expiry", 3);
    let mut s = SqliteStore::open(&f.dir.join("pins.db"), PinCipher::from_spec(&f.keys).unwrap()).unwrap();
    let dated = |i: usize, expiry: &str| NewPin {
        product: "TOPUP".into(),
        amount: 1000,
        pin: Pin::new(format!("66{i:010}")),
        serial: format!("E{i:08}"),
        expiry: Some(expiry.into()),
        receipt: vec![],
    };
    s.import(&[dated(0, "20000101"), dated(1, "20000102"), dated(2, "29991231")])
        .unwrap();
    drop(s);
    let (addr, stop, task) = f.start(ServerOptions::default()).await;
    let (c, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    let Response::Stock { stock } = c.call(Request::Stock).await.unwrap() else {
        panic!()
    };
    let count = |state: &str| -> i64 { stock.iter().filter(|s| s.state == state).map(|s| s.count).sum() };
    assert_eq!(count("expired"), 2, "{stock:?}");
    assert_eq!(count("available"), 3 + 1, "{stock:?}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A repeat re-delivers a sold PIN only within the repeat age, only under the key of the terminal that bought it,
/// and each re-delivery is recorded: a receipt's STAN and time, or a capture replayed a day later, gives back
/// nothing (before: the stored PIN, to anyone who sent the old key, forever).
#[tokio::test]
async fn repeats_are_answered_within_the_repeat_age_only_and_each_redelivery_is_recorded() {
    let f = Fixture::new("repeat-age", 20);
    let opts = ServerOptions {
        repeat_age: Duration::from_secs(2),
        ..ServerOptions::default()
    };
    let (addr, stop, task) = f.start(opts).await;
    let (c, _) = PspClient::connect(addr, "localhost", f.client_tls("gw1"))
        .await
        .unwrap();
    let Response::Sold { pin: a } = c.call(sell(1)).await.unwrap() else {
        panic!()
    };
    let Response::Sold { pin: again } = c.call(sell(1)).await.unwrap() else {
        panic!()
    };
    assert_eq!(again, a, "a repeat within the repeat age");
    // Another terminal naming the same STAN and time is another sale: it never gets the first buyer's PIN.
    let Request::Sell {
        product,
        amount,
        mut terminal,
    } = sell(1)
    else {
        panic!()
    };
    terminal.terminal_id = "TERM9999".into();
    let Response::Sold { pin: theirs } = c
        .call(Request::Sell {
            product,
            amount,
            terminal,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_ne!(theirs.pin_id, a.pin_id);
    // Past the repeat age: refused, no PIN.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let e = c.call(sell(1)).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Server(ref w) if w.code == ErrorCode::RepeatExpired),
        "{e}"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
    let db = rusqlite::Connection::open(f.dir.join("pins.db")).unwrap();
    let recorded: Vec<(i64, String, String)> = db
        .prepare("SELECT pin_id, gateway, terminal_id FROM redeliveries")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(recorded, vec![(a.pin_id, "gw1".to_string(), TERMINAL.to_string())]);
}
