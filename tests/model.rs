//! A model-based property test of the whole sale path: random sequences of sales, repeats, duplicates, mismatched
//! duplicates, reversals, gateway restarts (clean and kill-9-like) and PIN-server outages against one set of
//! terminals, each answer checked at once against a small model of who holds which PIN, and the inventory checked
//! at the end (every PIN handed out is sold, or voided when its sale was reversed; the audit passes).
//!
//! Real parts: a PIN server on a SQLite file over mutual TLS, a gateway in this process, terminals over TCP. Cases
//! are few (each starts a server and a gateway): `PROPTEST_CASES` / 30, at least 4 (10 in CI).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use pingate::demo::rig::{sample_modes, sample_products, start_server, GatewayFiles, GatewayHandle, Inventory};
use pingate::gateway::StartOptions;
use pingate::iso8583::Message;
use pingate::sale::PinReceipt;
use pingate::traffic::sim::{Identity, TerminalClient};
use proptest::prelude::*;

const PREFETCH: &str = "TOPUP-EU-10";
const ON_DEMAND: &str = "GIFT-25";
const TERMINALS: usize = 3;

#[derive(Clone, Debug)]
enum Step {
    /// A new sale by terminal `.0`, of the prefetch product when `.1`.
    Sale(usize, bool),
    /// A 0201 of the sale numbered (modulo how many there are).
    Repeat(usize),
    /// The same 0200 again.
    Duplicate(usize),
    /// The same key with the other product.
    Mismatch(usize),
    /// A 0400 of the sale.
    Reverse(usize),
    /// The gateway restarts: cleanly, or as if killed.
    Restart {
        crash: bool,
    },
    ServerDown,
    ServerUp,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..TERMINALS, any::<bool>()).prop_map(|(t, p)| Step::Sale(t, p)),
        2 => any::<usize>().prop_map(Step::Repeat),
        2 => any::<usize>().prop_map(Step::Duplicate),
        1 => any::<usize>().prop_map(Step::Mismatch),
        2 => any::<usize>().prop_map(Step::Reverse),
        1 => any::<bool>().prop_map(|crash| Step::Restart { crash }),
        1 => Just(Step::ServerDown),
        1 => Just(Step::ServerUp),
    ]
}

/// What the model knows of one sale key.
#[derive(Debug)]
struct Key {
    terminal: usize,
    stan: u32,
    prefetch: bool,
    /// The PIN (and its id) the terminal was given for this key, if any.
    given: Option<(String, i64)>,
    /// `Some(true)`: reversed (a 0400 answered 00); `None`: maybe (a 0400 answered otherwise).
    reversed: Option<bool>,
}

fn code(m: &Message) -> String {
    m.get_str(39).unwrap_or("??").to_string()
}

/// The PIN of an approved answer, and its id (field 38 is the PIN id: the inventory is small).
fn pin_of(m: &Message) -> (String, i64) {
    let pin = PinReceipt::from_tlv(m.get(63).expect("an approval carries field 63"))
        .unwrap()
        .pin
        .expose()
        .to_string();
    (pin, m.get_str(38).unwrap().parse().unwrap())
}

struct World {
    inv: Inventory,
    config: std::path::PathBuf,
    server: Option<pingate::demo::rig::ServerHandle>,
    server_addr: std::net::SocketAddr,
    gw: Option<GatewayHandle>,
    terminals: Vec<TerminalClient>,
    ids: Vec<Identity>,
    transmission: String,
}

impl World {
    async fn new(case: u64) -> World {
        let dir = std::env::temp_dir().join(format!("pingate-model-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let inv = Inventory::create(&dir, &["gw1", "obs"], &sample_products(200)).unwrap();
        let server = start_server(&inv, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let files = GatewayFiles::write(
            &inv,
            "gw1",
            &[server.addr],
            "127.0.0.1:0".parse().unwrap(),
            TERMINALS,
            &sample_modes(5, 10),
            (
                "response_deadline_ms = 1500\nrepeat_window_secs = 2\nforward_retry_max_ms = 500",
                "",
            ),
        )
        .unwrap();
        let mut w = World {
            inv,
            config: files.config,
            server_addr: server.addr,
            server: Some(server),
            gw: None,
            terminals: Vec::new(),
            ids: (1..=TERMINALS)
                .map(|n| common::demo_terminal(&format!("DEMO{n:04}")))
                .collect(),
            transmission: String::new(),
        };
        w.start_gateway().await;
        pingate::demo::rig::past_this_second().await;
        w.transmission = pingate::traffic::sim::now_transmission();
        w
    }

    async fn start_gateway(&mut self) {
        let gw = GatewayHandle::start(&self.config, StartOptions::default())
            .await
            .unwrap();
        if self.server.is_some() {
            assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(10)).await);
        }
        self.terminals.clear();
        for _ in 0..TERMINALS {
            self.terminals.push(gw.terminal().await.unwrap());
        }
        self.gw = Some(gw);
    }

    async fn call(&mut self, terminal: usize, m: &Message) -> Message {
        tokio::time::timeout(Duration::from_secs(20), self.terminals[terminal].call(m))
            .await
            .expect("answered within the deadline")
            .unwrap()
    }
}

async fn run_case(case: u64, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut w = World::new(case).await;
    let mut keys: Vec<Key> = Vec::new();
    // Every PIN handed out, and the key it went to: never two keys.
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut next_stan = [0u32; TERMINALS];
    let spec = |w: &World, k: &Key, prefetch: bool| {
        common::demo_sale(
            k.stan,
            &w.transmission,
            if prefetch { PREFETCH } else { ON_DEMAND },
            if prefetch { 1000 } else { 2500 },
        )
    };
    for (i, s) in steps.into_iter().enumerate() {
        let at = format!("step {i}: {s:?}");
        match s {
            Step::Sale(t, prefetch) => {
                next_stan[t] += 1;
                keys.push(Key {
                    terminal: t,
                    stan: next_stan[t],
                    prefetch,
                    given: None,
                    reversed: Some(false),
                });
                let k = keys.len() - 1;
                let m = w.ids[t].sale(&spec(&w, &keys[k], prefetch), false);
                let a = w.call(t, &m).await;
                if code(&a) == "00" {
                    let p = pin_of(&a);
                    prop_assert!(owner.insert(p.0.clone(), k).is_none(), "{at}: a PIN handed out twice");
                    // The RRN is the PIN's id: unique per sale.
                    let rrn = format!("{:012}", p.1);
                    prop_assert_eq!(a.get_str(37), Some(rrn.as_str()), "{}", at);
                    keys[k].given = Some(p);
                }
            }
            Step::Repeat(n) | Step::Duplicate(n) if !keys.is_empty() => {
                let k = n % keys.len();
                let repeat = matches!(s, Step::Repeat(_));
                let (t, prefetch) = (keys[k].terminal, keys[k].prefetch);
                let m = w.ids[t].sale(&spec(&w, &keys[k], prefetch), repeat);
                let a = w.call(t, &m).await;
                if code(&a) == "00" {
                    prop_assert!(keys[k].reversed != Some(true), "{at}: a reversed sale handed out again");
                    let p = pin_of(&a);
                    match &keys[k].given {
                        Some(given) => prop_assert_eq!(&p, given, "{}: a repeat got another PIN", at),
                        None => {
                            // A sale that was declined (nothing handed out) may still sell once, to its repeat.
                            prop_assert!(owner.insert(p.0.clone(), k).is_none(), "{at}: a PIN handed out twice");
                            keys[k].given = Some(p);
                        }
                    }
                } else {
                    prop_assert!(a.get(63).is_none(), "{at}: a PIN in a decline");
                    // A terminal repeats a sale when it did not get its answer; a repeat the server did not answer
                    // is reversed like any unanswered sale (the PIN may never have reached the terminal).
                    if keys[k].reversed == Some(false) {
                        keys[k].reversed = None;
                    }
                }
            }
            Step::Mismatch(n) if !keys.is_empty() => {
                let k = n % keys.len();
                let (t, prefetch) = (keys[k].terminal, keys[k].prefetch);
                let m = w.ids[t].sale(&spec(&w, &keys[k], !prefetch), false);
                let a = w.call(t, &m).await;
                prop_assert!(code(&a) != "00", "{at}: the same key with other content sold");
                prop_assert!(a.get(63).is_none());
            }
            Step::Reverse(n) if !keys.is_empty() => {
                let k = n % keys.len();
                let (t, prefetch) = (keys[k].terminal, keys[k].prefetch);
                let m = w.ids[t].reversal(&spec(&w, &keys[k], prefetch), 900_000 + i as u32, false);
                let a = w.call(t, &m).await;
                prop_assert!(code(&a) != "13", "{at}: a matching reversal refused");
                keys[k].reversed = if code(&a) == "00" { Some(true) } else { None };
            }
            Step::Restart { crash } => {
                let gw = w.gw.take().unwrap();
                if crash {
                    gw.crash().await;
                } else {
                    gw.stop().await;
                }
                w.start_gateway().await;
            }
            Step::ServerDown => {
                if let Some(s) = w.server.take() {
                    s.stop().await;
                }
            }
            Step::ServerUp if w.server.is_none() => {
                w.server = Some(start_server(&w.inv, w.server_addr).await.unwrap());
            }
            _ => {}
        }
    }
    // The end: the server back, everything forwarded, the gateway stopped.
    if w.server.is_none() {
        w.server = Some(start_server(&w.inv, w.server_addr).await.unwrap());
    }
    let gw = w.gw.take().unwrap();
    assert!(gw.gateway.upstream().wait_connected(Duration::from_secs(10)).await);
    prop_assert!(
        gw.gateway.flush(Duration::from_secs(30)).await,
        "store-and-forward drained"
    );
    gw.stop().await;
    w.server.take().unwrap().stop().await;
    // Every PIN handed out: sold, or voided when its sale was reversed (either when it may have been).
    let db = rusqlite::Connection::open(&w.inv.db).unwrap();
    for k in &keys {
        let Some((_, id)) = &k.given else { continue };
        let state: String = db
            .query_row("SELECT state FROM pins WHERE id = ?1", [id], |r| r.get(0))
            .unwrap();
        match k.reversed {
            Some(false) => prop_assert_eq!(state.as_str(), "sold", "PIN {} of {:?}", id, k),
            Some(true) => prop_assert_eq!(state.as_str(), "voided", "PIN {} of {:?}", id, k),
            None => prop_assert!(state == "sold" || state == "voided", "PIN {id} of {k:?}: {state}"),
        }
    }
    let reserved: i64 = db
        .query_row("SELECT COUNT(*) FROM pins WHERE state = 'reserved'", [], |r| r.get(0))
        .unwrap();
    prop_assert_eq!(reserved, 0, "a clean stop gives the cache back");
    let report = pingate::audit::run(&pingate::store::handle::DbUrl::Sqlite(w.inv.db.clone()), &[], None)
        .await
        .unwrap();
    prop_assert!(report.ok(), "{}", report.text());
    Ok(())
}

fn cases() -> u32 {
    let all: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    (all / 30).max(4)
}

/// A runner of our own rather than `proptest!`, whose cases `PROPTEST_CASES` would set (each case here starts a
/// server and a gateway: a tenth of the codec's count would still take minutes).
#[test]
fn the_sale_path_never_hands_a_pin_to_two_keys_nor_loses_one() {
    let config = ProptestConfig {
        cases: cases(),
        max_shrink_iters: 20,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let case = std::sync::atomic::AtomicU64::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(step(), 5..24), |steps| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(n, steps))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
