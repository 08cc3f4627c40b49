//! The repeat window: the sales of the last `repeat_window_secs` (at most `repeat_max`), by key, each with its
//! outcome once known, so that a repeat (0201) or duplicate 0200 gets the original answer (or waits for it), one with
//! other content gets `94`, and a reversed sale never hands out its PIN again. Beyond the window, a sale stays for as
//! long as a confirm or reversal of it waits for the PIN server. No I/O: the times come in as arguments.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::sale::SaleContent;
use crate::sale::{Pin, PinReceipt, ResponseCode, SaleKey};

/// What a sale came to; kept for repeats while the sale is in the repeat window.
#[derive(Debug)]
pub(super) enum Outcome {
    /// `field63`: the receipt as the 0210 carries it (built once, kept instead of the receipt's parts: the window
    /// holds up to `repeat_max` of these); `None` when the receipt does not fit field 63 (the PIN cannot reach the
    /// terminal: the sale is reversed when answered).
    Approved {
        pin_id: i64,
        field63: Option<Pin>,
    },
    Declined(ResponseCode),
}

impl Outcome {
    /// An approval of the PIN `pin_id` with its receipt.
    pub(super) fn approved(pin_id: i64, receipt: &PinReceipt) -> Outcome {
        Outcome::Approved {
            pin_id,
            // Copied to a buffer of its exact length (the window keeps it as long as the sale), the one it was built
            // in wiped (not shrunk: a reallocation would free the PIN's bytes unwiped).
            field63: receipt.to_tlv().ok().map(|f| {
                let built = zeroize::Zeroizing::new(f);
                Pin::new(built.as_str().to_owned())
            }),
        }
    }
}

/// What identifies a sale's content: a repeat with other content is a `94`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Content {
    pub(super) merchant: String,
    pub(super) product: String,
    pub(super) amount: u64,
    pub(super) currency: String,
}

impl Content {
    pub(super) fn to_sale_content(&self) -> SaleContent {
        SaleContent {
            merchant_id: self.merchant.clone(),
            product: self.product.clone(),
            amount: self.amount as i64,
            currency: self.currency.clone(),
        }
    }
}

/// Woken when an outcome that someone waits for is set (any entry's, in any gateway of the process: a waiter
/// looks again at its own). Duplicates in flight are rare, so one notifier for all costs less than one per entry
/// (the window holds up to `repeat_max` entries).
static SETTLED: Notify = Notify::const_new();

/// A sale of the window: what it bought, and its outcome (`None` while it is in progress; its duplicates wait for it).
/// Kept small (the content shared, the notifier process-wide): the window holds up to `repeat_max` of these.
#[derive(Debug)]
pub(super) struct Entry {
    /// `None` for a reversal of a sale this gateway never saw: it matches any content.
    pub(super) content: Option<Arc<Content>>,
    /// The outcome, and whether a duplicate waits for it.
    state: Mutex<(Option<Arc<Outcome>>, bool)>,
    /// When the sale was received (seconds since the epoch; 0 when not known): the reversal window counts from it.
    pub(super) begun_unix: i64,
}

impl Entry {
    pub(super) fn new(content: Option<Arc<Content>>, outcome: Option<Outcome>) -> Arc<Entry> {
        Entry::begun(content, outcome, 0)
    }

    /// An entry for a sale received at `begun_unix`.
    pub(super) fn begun(content: Option<Arc<Content>>, outcome: Option<Outcome>, begun_unix: i64) -> Arc<Entry> {
        Arc::new(Entry {
            content,
            state: Mutex::new((outcome.map(Arc::new), false)),
            begun_unix,
        })
    }

    pub(super) fn matches(&self, c: &Content) -> bool {
        self.content.as_deref().is_none_or(|mine| mine == c)
    }

    /// The outcome so far (`None` while the sale is in progress).
    pub(super) fn outcome(&self) -> Option<Arc<Outcome>> {
        self.state.lock().expect("not poisoned").0.clone()
    }

    /// Waits until the sale has an outcome.
    pub(super) async fn wait(&self) -> Arc<Outcome> {
        loop {
            // Registered before looking (and the look and the flag under the lock the setter takes), so that an
            // outcome set in between wakes it.
            let notified = SETTLED.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().expect("not poisoned");
                if let Some(o) = &state.0 {
                    return o.clone();
                }
                state.1 = true;
            }
            notified.await;
        }
    }

    fn put(&self, outcome: Arc<Outcome>, only_if_none: bool) {
        let waited = {
            let mut state = self.state.lock().expect("not poisoned");
            if only_if_none && state.0.is_some() {
                return;
            }
            state.0 = Some(outcome);
            state.1
        };
        if waited {
            SETTLED.notify_waiters();
        }
    }

    /// Sets the outcome unless one was set meanwhile (a reversal that came while the sale was in progress wins).
    pub(super) fn settle(&self, outcome: Arc<Outcome>) {
        self.put(outcome, true);
    }

    /// Sets the outcome, whatever it was.
    pub(super) fn set(&self, outcome: Outcome) {
        self.put(Arc::new(outcome), false);
    }

    /// Replaces the outcome: the sale is being reversed, repeats must not get its PIN.
    pub(super) fn overrule(&self, code: ResponseCode) {
        self.set(Outcome::Declined(code));
    }
}

/// A sale key as the window stores it: its three parts in one allocation, shared by the map and the queue of the
/// window (a `SaleKey` is three strings, and was stored twice).
type PackedKey = Arc<[u8]>;

/// A sale's key, as whatever carries it holds it (a request's key, a journal record, a queued confirm): packed as
/// it is, never copied into a [`SaleKey`] first.
pub(super) trait KeyParts {
    /// Terminal id, STAN, qualified transmission time.
    fn parts(&self) -> (&str, &str, &str);
}

impl KeyParts for SaleKey {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.terminal_id, &self.stan, &self.transmission)
    }
}

/// The parts of `key`, each after its length (so that no two keys pack alike).
fn pack(key: &(impl KeyParts + ?Sized)) -> Vec<u8> {
    let (t, s, x) = key.parts();
    let (t, s, x) = (t.as_bytes(), s.as_bytes(), x.as_bytes());
    let mut v = Vec::with_capacity(4 + t.len() + s.len() + x.len());
    for part in [t, s] {
        v.extend_from_slice(&(part.len() as u16).to_le_bytes());
        v.extend_from_slice(part);
    }
    v.extend_from_slice(x);
    v
}

/// Distinct contents shared by the window's entries: beyond this many, an entry keeps its own copy.
const MAX_SHARED_CONTENTS: usize = 4096;

/// Sales of the repeat window, by key; and, beyond the window, every sale with a confirm or reversal the server
/// has not acknowledged yet (until then the server cannot answer a repeat of it correctly).
pub(super) struct Recent {
    map: HashMap<PackedKey, Arc<Entry>>,
    /// When each entry was begun: the monotonic instant (for the window) and the wall-clock second (for the horizon).
    order: VecDeque<(Instant, i64, PackedKey)>,
    /// Wall-clock second (since the epoch) after which every sale begun here is still remembered: the gateway's
    /// start, then that of the latest sale forgotten (out of the window, or past `max`). A key of this second or
    /// older may have been sold without this gateway remembering it.
    pub(super) horizon: i64,
    /// Held by pending confirms and reversals (with how many hold each).
    held: HashMap<PackedKey, (Arc<Entry>, u32)>,
    /// The contents entries share (a merchant's sales of one product and amount are all alike).
    contents: HashSet<Arc<Content>>,
    window: Duration,
    max: usize,
}

pub(super) enum Begin {
    New(Arc<Entry>),
    Existing(Arc<Entry>),
}

impl Recent {
    /// An empty window of `window` (at most `max` sales) that remembers every sale after `horizon` (seconds since the
    /// epoch: the gateway's start).
    pub(super) fn new(window: Duration, max: usize, horizon: i64) -> Recent {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            horizon,
            held: HashMap::new(),
            contents: HashSet::new(),
            window,
            max,
        }
    }

    pub(super) fn begin(&mut self, key: &SaleKey, content: Content, now: Instant, now_unix: i64) -> Begin {
        // Each entry is looked at once at most: with more sales in progress than `max`, the map stays over it for
        // a while rather than dropping one (or spinning).
        let mut budget = self.order.len();
        while let Some((t, _, _)) = self.order.front() {
            if budget == 0 || now.duration_since(*t) <= self.window && self.map.len() <= self.max {
                break;
            }
            budget -= 1;
            let (t, at, k) = self.order.pop_front().expect("looked at");
            match self.map.get(&k) {
                // A sale still in progress stays (its duplicates must wait for it, not start another).
                Some(e) if e.outcome().is_none() && now.duration_since(t) <= self.window * 2 => {
                    self.order.push_back((now, at, k));
                }
                _ => {
                    self.map.remove(&k);
                    self.horizon = self.horizon.max(at);
                }
            }
        }
        let packed = pack(key);
        if let Some(e) = self.get_packed(&packed) {
            return Begin::Existing(e);
        }
        let content = self.shared(content);
        let e = Entry::begun(Some(content), None, now_unix);
        let packed: PackedKey = packed.into();
        self.map.insert(packed.clone(), e.clone());
        self.order.push_back((now, now_unix, packed));
        Begin::New(e)
    }

    /// `content`, shared with the entries that have the same (while fewer than [`MAX_SHARED_CONTENTS`] are).
    fn shared(&mut self, content: Content) -> Arc<Content> {
        if let Some(c) = self.contents.get(&content) {
            return c.clone();
        }
        let c = Arc::new(content);
        if self.contents.len() < MAX_SHARED_CONTENTS {
            self.contents.insert(c.clone());
        }
        c
    }

    pub(super) fn get(&self, key: &SaleKey) -> Option<Arc<Entry>> {
        self.get_packed(&pack(key))
    }

    fn get_packed(&self, key: &[u8]) -> Option<Arc<Entry>> {
        self.held
            .get(key)
            .map(|(e, _)| e.clone())
            .or_else(|| self.map.get(key).cloned())
    }

    /// A reversal of a sale not remembered here was done by the server: a late sale with its key gets `12` from
    /// memory for as long as the window keeps it.
    pub(super) fn remember_reversed(&mut self, key: &SaleKey, now: Instant, now_unix: i64) {
        let packed = pack(key);
        if self.get_packed(&packed).is_none() {
            let e = Entry::new(None, Some(Outcome::Declined(ResponseCode::InvalidTransaction)));
            let packed: PackedKey = packed.into();
            self.map.insert(packed.clone(), e);
            self.order.push_back((now, now_unix, packed));
        }
    }

    /// Drops `entry` (begun for `key` by a request that turned out not to be the key's sale), unless the key has
    /// another entry by now.
    pub(super) fn forget(&mut self, key: &SaleKey, entry: &Arc<Entry>) {
        let packed = pack(key);
        if self.map.get(&packed[..]).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            self.map.remove(&packed[..]);
        }
    }

    /// Holds the entry of `key` (one made by `absent` when the key has none) until as many [`Recent::unhold`]s.
    pub(super) fn hold(&mut self, key: &(impl KeyParts + ?Sized), absent: impl FnOnce() -> Arc<Entry>) {
        let packed = pack(key);
        if let Some((_, n)) = self.held.get_mut(&packed[..]) {
            *n += 1;
            return;
        }
        let entry = self.map.get(&packed[..]).cloned().unwrap_or_else(absent);
        self.held.insert(packed.into(), (entry, 1));
    }

    pub(super) fn unhold(&mut self, key: &(impl KeyParts + ?Sized)) {
        let packed = pack(key);
        if let Some((_, n)) = self.held.get_mut(&packed[..]) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&packed[..]);
            }
        }
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

    fn content() -> Content {
        Content {
            merchant: "M".into(),
            product: "P".into(),
            amount: 100,
            currency: "978".into(),
        }
    }

    #[test]
    fn more_sales_in_progress_than_the_cap_neither_spin_nor_drop_one() {
        let mut r = Recent::new(Duration::from_secs(900), 2, 0);
        let t = Instant::now();
        for i in 0..5 {
            assert!(matches!(r.begin(&key(i), content(), t, 0), Begin::New(_)));
        }
        // All five still in progress: each is still found (a duplicate waits for it).
        for i in 0..5 {
            assert!(matches!(r.begin(&key(i), content(), t, 0), Begin::Existing(_)));
        }
        // Once answered, the oldest go as new sales come.
        for i in 0..5 {
            r.get(&key(i))
                .unwrap()
                .settle(Arc::new(Outcome::Declined(ResponseCode::OutOfStock)));
        }
        r.begin(&key(99), content(), t, 0);
        assert!(r.map.len() <= 3, "{}", r.map.len());
    }

    /// Keys whose parts split differently never pack alike (a packed key stands for exactly one sale key).
    #[test]
    fn keys_pack_apart_whatever_their_parts() {
        let k = |t: &str, s: &str, x: &str| SaleKey {
            terminal_id: t.into(),
            stan: s.into(),
            transmission: x.into(),
        };
        let keys = [
            k("AB", "C", "20261206120000"),
            k("A", "BC", "20261206120000"),
            k("ABC", "", "20261206120000"),
            k("", "ABC", "20261206120000"),
            k("AB", "C2", "0261206120000"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(pack(a), pack(b), "{a:?} {b:?}");
            }
        }
        let mut r = Recent::new(Duration::from_secs(900), 10, 0);
        let t = Instant::now();
        assert!(matches!(r.begin(&keys[0], content(), t, 0), Begin::New(_)));
        assert!(matches!(r.begin(&keys[1], content(), t, 0), Begin::New(_)));
        assert!(matches!(r.begin(&keys[0], content(), t, 0), Begin::Existing(_)));
        // The two entries share one content.
        let (a, b) = (r.get(&keys[0]).unwrap(), r.get(&keys[1]).unwrap());
        assert!(Arc::ptr_eq(a.content.as_ref().unwrap(), b.content.as_ref().unwrap()));
    }

    /// The window holds up to `repeat_max` (200,000 by default) of these: an entry with its outcome must stay
    /// small (with a watch channel per entry and the receipt's parts, a remembered sale took about 1.4 KB).
    #[test]
    fn an_entry_of_the_window_stays_small() {
        assert!(std::mem::size_of::<Entry>() <= 48, "{}", std::mem::size_of::<Entry>());
        assert!(
            std::mem::size_of::<Outcome>() <= 40,
            "{}",
            std::mem::size_of::<Outcome>()
        );
    }

    /// A duplicate waiting for its sale wakes when the outcome is set, also when it is set between its look and
    /// its wait.
    #[tokio::test]
    async fn a_waiting_duplicate_gets_the_outcome() {
        let e = Entry::new(Some(Arc::new(content())), None);
        let waiter = tokio::spawn({
            let e = e.clone();
            async move { e.wait().await }
        });
        tokio::task::yield_now().await;
        e.settle(Arc::new(Outcome::Declined(ResponseCode::OutOfStock)));
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(*got, Outcome::Declined(ResponseCode::OutOfStock)));
        // Already set: no wait at all.
        assert!(matches!(*e.wait().await, Outcome::Declined(ResponseCode::OutOfStock)));
    }

    /// Measures (does not assert) the memory of a full window: `cargo test --release --lib
    /// window_memory -- --ignored --nocapture`. Sales as the load generator makes them, each approved with a
    /// receipt like the demo's.
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn window_memory() {
        fn rss_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            l.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        const N: usize = 200_000;
        let before = rss_kib();
        let mut r = Recent::new(Duration::from_secs(900), N, 0);
        let t = Instant::now();
        let receipt = PinReceipt {
            pin: Pin::new("1234567890123456"),
            serial: "T00000123456".into(),
            expiry: Some("20301231".into()),
            lines: vec!["Dial *100*PIN#".into()],
        };
        for i in 0..N {
            let key = SaleKey {
                terminal_id: format!("DEMO{:04}", i % 64),
                stan: format!("{:06}", i / 64),
                transmission: "20261206120000".into(),
            };
            let Begin::New(e) = r.begin(&key, content(), t, 0) else {
                panic!("new")
            };
            e.settle(Arc::new(Outcome::approved(i as i64, &receipt)));
        }
        let after = rss_kib();
        println!(
            "window of {N} approved sales: {} KiB, {} bytes per sale",
            after - before,
            (after - before) * 1024 / N as u64
        );
    }

    #[test]
    fn a_reversal_overrules_an_approval_but_not_a_91() {
        let e = Entry::new(Some(Arc::new(content())), None);
        e.overrule(ResponseCode::InvalidTransaction);
        e.settle(Arc::new(Outcome::Declined(ResponseCode::OutOfStock)));
        assert!(matches!(
            e.outcome().as_deref(),
            Some(Outcome::Declined(ResponseCode::InvalidTransaction))
        ));
    }
}
