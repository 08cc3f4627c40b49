//! The gateway's journal: every PIN the gateway holds and every sale it has not finished with, in one append-only
//! file, fsync'd in groups (one sync covers every record that arrived while the previous sync ran).
//!
//! File: the magic `PGJ1`, then frames `len: u32 LE | crc32: u32 LE | JSON record`. A crash can leave a torn last
//! frame: it is cut off at recovery and its bytes kept beside the journal (`<name>.tail-<unix time>`), so nothing is
//! dropped silently. PIN values are sealed with the gateway's own key (ChaCha20-Poly1305, the PIN server's format).
//!
//! The writer thread keeps the live state (what recovery would rebuild) with the encoded frame of each live record;
//! when the file has grown well past what is live, it writes the live frames to a new file, syncs it and renames it
//! over the journal (compaction), so the journal stays the size of the cache plus the unfinished work.
//!
//! What each record means, and what recovery does with it:
//! | record | written | left at recovery |
//! |---|---|---|
//! | `cached` | after `reserve`, before the PIN may be sold | in the cache again |
//! | `cache_sold` | before the 0210 with a cached PIN leaves | a confirm to send |
//! | `confirmed` | the server acknowledged the confirm | nothing |
//! | `releasing` | before `release` (the PINs leave the cache first) | a release to send |
//! | `released` | the server acknowledged the release | nothing |
//! | `asked` | before an on-demand `sell` leaves | a reversal to send (the terminal may never have had the PIN) |
//! | `resolved` | the on-demand outcome is known, before the 0210 leaves | nothing |
//! | `reverse` | a reversal to forward (terminal's 0400/0420, or an undelivered sale) | a reversal to send |
//! | `reversed` | the server acknowledged the reversal | nothing |

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::crypto::{PinCipher, Sealed};
use crate::iso8583::{from_hex, to_hex};
use crate::psp::PinOut;
use crate::sale::SaleKey;
use crate::sale::{ReversalReason, SaleContent};

const MAGIC: &[u8; 4] = b"PGJ1";
/// Largest record accepted at recovery: a frame claiming more is torn or corrupt.
const MAX_RECORD: usize = 1 << 20;
/// Most ids in one `releasing` record (and one `release` request: the protocol's cap).
pub const RELEASE_CHUNK: usize = crate::psp::MAX_PIN_IDS;
/// Records written per sync at most (bounds the latency of the first in a group).
const MAX_GROUP: usize = 4096;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal file could not be read, written or synced.
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is not a pingate journal (wrong magic).
    #[error("journal {path}: not a pingate journal (bad magic)")]
    NotAJournal { path: PathBuf },
    /// A record passed its checksum but does not parse, or names a PIN that cannot be opened: written by another
    /// version or with other keys. Nothing is guessed: the gateway does not start.
    #[error("journal {path}: record at byte {offset}: {reason}")]
    BadRecord { path: PathBuf, offset: u64, reason: String },
    /// An earlier write or sync failed; the journal takes no more records (what it holds stays valid).
    #[error("journal is failed: {0}")]
    Failed(String),
    /// The write was not confirmed before the caller's deadline (a stalled disk). It is still queued and will be
    /// written in order: the caller must treat it as maybe written.
    #[error("journal write not confirmed before the response deadline")]
    Late,
}

/// The sale as the terminal identified it, and what it bought.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleRecord {
    pub terminal_id: String,
    pub merchant_id: String,
    pub stan: String,
    pub transmission: String,
    pub rrn: String,
    pub product: String,
    pub amount: i64,
    pub currency: String,
}

impl super::window::KeyParts for SaleRecord {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.terminal_id, &self.stan, &self.transmission)
    }
}

impl super::window::KeyParts for KeyRecord {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.terminal_id, &self.stan, &self.transmission)
    }
}

impl SaleRecord {
    pub fn key(&self) -> SaleKey {
        SaleKey {
            terminal_id: self.terminal_id.clone(),
            stan: self.stan.clone(),
            transmission: self.transmission.clone(),
        }
    }

    /// What the sale bought, as its reversal names it.
    pub fn content(&self) -> SaleContent {
        SaleContent {
            merchant_id: self.merchant_id.clone(),
            product: self.product.clone(),
            amount: self.amount,
            currency: self.currency.clone(),
        }
    }

    pub fn terminal(&self) -> crate::psp::Terminal {
        crate::psp::Terminal {
            terminal_id: self.terminal_id.clone(),
            merchant_id: self.merchant_id.clone(),
            stan: self.stan.clone(),
            transmission: self.transmission.clone(),
            rrn: self.rrn.clone(),
        }
    }
}

/// A sale key as written in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRecord {
    pub terminal_id: String,
    pub stan: String,
    pub transmission: String,
}

impl From<&SaleKey> for KeyRecord {
    fn from(k: &SaleKey) -> KeyRecord {
        KeyRecord {
            terminal_id: k.terminal_id.clone(),
            stan: k.stan.clone(),
            transmission: k.transmission.clone(),
        }
    }
}

impl KeyRecord {
    pub fn key(&self) -> SaleKey {
        SaleKey {
            terminal_id: self.terminal_id.clone(),
            stan: self.stan.clone(),
            transmission: self.transmission.clone(),
        }
    }
}

/// A PIN held in the cache: what the server reserved, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedPin {
    pub pin: PinOut,
    pub lease_until: i64,
}

/// One journal record (see the module table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Cached(CachedPin),
    CacheSold {
        pin_id: i64,
        sale: SaleRecord,
    },
    Confirmed {
        pin_id: i64,
    },
    Releasing {
        pin_ids: Vec<i64>,
    },
    Released {
        pin_ids: Vec<i64>,
    },
    Asked {
        sale: SaleRecord,
    },
    Resolved {
        key: KeyRecord,
    },
    /// `content`: what the reversal named, checked by the server against the sale (absent in records written by
    /// older gateways).
    Reverse {
        key: KeyRecord,
        content: Option<SaleContent>,
        why: Reversing,
    },
    Reversed {
        key: KeyRecord,
    },
}

/// Why a reversal is made and when the terminal asked for it (PSP's `reason` and `requested_at`); absent in
/// records written by older gateways (a terminal's reversal, measured against the window when the server gets it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reversing {
    pub reason: ReversalReason,
    pub requested_at: Option<i64>,
}

/// The on-disk form: the PIN sealed, everything else as is.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
enum Wire {
    Cached {
        pin_id: i64,
        product: String,
        amount: i64,
        serial: String,
        expiry: Option<String>,
        receipt: Vec<String>,
        lease_until: i64,
        key_id: u32,
        nonce: String,
        sealed: String,
    },
    CacheSold {
        pin_id: i64,
        sale: SaleRecord,
    },
    Confirmed {
        pin_id: i64,
    },
    Releasing {
        pin_ids: Vec<i64>,
    },
    Released {
        pin_ids: Vec<i64>,
    },
    Asked {
        sale: SaleRecord,
    },
    Resolved {
        key: KeyRecord,
    },
    Reverse {
        key: KeyRecord,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<SaleContent>,
        #[serde(default)]
        reason: ReversalReason,
        #[serde(default)]
        requested_at: Option<i64>,
    },
    Reversed {
        key: KeyRecord,
    },
}

/// [`Wire`] borrowing from a [`Record`]: the same JSON, written without cloning the record (the journal encodes
/// two records per sale). The field names and tags must stay those of [`Wire`], which reads them back (a test
/// decodes every kind written this way).
#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum WireRef<'a> {
    Cached {
        pin_id: i64,
        product: &'a str,
        amount: i64,
        serial: &'a str,
        expiry: &'a Option<String>,
        receipt: &'a [String],
        lease_until: i64,
        key_id: u32,
        nonce: String,
        sealed: String,
    },
    CacheSold {
        pin_id: i64,
        sale: &'a SaleRecord,
    },
    Confirmed {
        pin_id: i64,
    },
    Releasing {
        pin_ids: &'a [i64],
    },
    Released {
        pin_ids: &'a [i64],
    },
    Asked {
        sale: &'a SaleRecord,
    },
    Resolved {
        key: &'a KeyRecord,
    },
    Reverse {
        key: &'a KeyRecord,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: &'a Option<SaleContent>,
        #[serde(skip_serializing_if = "ReversalReason::is_terminal")]
        reason: ReversalReason,
        #[serde(skip_serializing_if = "Option::is_none")]
        requested_at: Option<i64>,
    },
    Reversed {
        key: &'a KeyRecord,
    },
}

fn cached_wire<'a>(c: &'a CachedPin, cipher: &PinCipher) -> Result<WireRef<'a>, String> {
    let sealed = cipher.seal(&c.pin.pin, &c.pin.serial).map_err(|e| e.to_string())?;
    Ok(WireRef::Cached {
        pin_id: c.pin.pin_id,
        product: &c.pin.product,
        amount: c.pin.amount,
        serial: &c.pin.serial,
        expiry: &c.pin.expiry,
        receipt: &c.pin.receipt,
        lease_until: c.lease_until,
        key_id: sealed.key_id,
        nonce: to_hex(&sealed.nonce),
        sealed: to_hex(&sealed.ciphertext),
    })
}

fn to_wire<'a>(r: &'a Record, cipher: &PinCipher) -> Result<WireRef<'a>, String> {
    Ok(match r {
        Record::Cached(c) => cached_wire(c, cipher)?,
        Record::CacheSold { pin_id, sale } => WireRef::CacheSold { pin_id: *pin_id, sale },
        Record::Confirmed { pin_id } => WireRef::Confirmed { pin_id: *pin_id },
        Record::Releasing { pin_ids } => WireRef::Releasing { pin_ids },
        Record::Released { pin_ids } => WireRef::Released { pin_ids },
        Record::Asked { sale } => WireRef::Asked { sale },
        Record::Resolved { key } => WireRef::Resolved { key },
        Record::Reverse { key, content, why } => WireRef::Reverse {
            key,
            content,
            reason: why.reason,
            requested_at: why.requested_at,
        },
        Record::Reversed { key } => WireRef::Reversed { key },
    })
}

fn from_wire(w: Wire, cipher: &PinCipher) -> Result<Record, String> {
    Ok(match w {
        Wire::Cached {
            pin_id,
            product,
            amount,
            serial,
            expiry,
            receipt,
            lease_until,
            key_id,
            nonce,
            sealed,
        } => {
            let nonce: [u8; 12] = from_hex(&nonce)
                .ok()
                .and_then(|n| n.try_into().ok())
                .ok_or("nonce is not 12 hex bytes")?;
            let ciphertext = from_hex(&sealed).map_err(|at| format!("sealed PIN: bad hex at {at}"))?;
            let pin = cipher
                .open(
                    &Sealed {
                        key_id,
                        nonce,
                        ciphertext,
                    },
                    &serial,
                )
                .map_err(|e| e.to_string())?;
            Record::Cached(CachedPin {
                pin: PinOut {
                    pin_id,
                    product,
                    amount,
                    pin,
                    serial,
                    expiry,
                    receipt,
                },
                lease_until,
            })
        }
        Wire::CacheSold { pin_id, sale } => Record::CacheSold { pin_id, sale },
        Wire::Confirmed { pin_id } => Record::Confirmed { pin_id },
        Wire::Releasing { pin_ids } => Record::Releasing { pin_ids },
        Wire::Released { pin_ids } => Record::Released { pin_ids },
        Wire::Asked { sale } => Record::Asked { sale },
        Wire::Resolved { key } => Record::Resolved { key },
        Wire::Reverse {
            key,
            content,
            reason,
            requested_at,
        } => Record::Reverse {
            key,
            content,
            why: Reversing { reason, requested_at },
        },
        Wire::Reversed { key } => Record::Reversed { key },
    })
}

/// CRC-32 (IEEE) by `crc32fast` (SIMD where the CPU has it): catches torn and flipped bytes, not an adversary.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// A live record's frame, shared with a compaction under way.
type LiveFrame = Arc<[u8]>;

/// What the journal holds that is still live, each with the frame that says so (for compaction).
#[derive(Default)]
struct Live {
    cached: HashMap<i64, LiveFrame>,
    /// A cache sale not yet confirmed: the PIN's `cached` frame and the `cache_sold` frame.
    sold: HashMap<i64, (LiveFrame, LiveFrame)>,
    /// Ids on their way back to the server; their frames are written anew at compaction (naming only these).
    releasing: std::collections::BTreeSet<i64>,
    /// On-demand sales asked for, with what they bought (their reversal names it).
    asked: HashMap<KeyRecord, (SaleContent, LiveFrame)>,
    reverse: HashMap<KeyRecord, (Option<SaleContent>, Reversing, LiveFrame)>,
}

/// What a record changes in the live state: all the writer thread needs of it (the record itself stays with, and is
/// freed by, the task that wrote it).
enum Effect {
    Cached(i64),
    CacheSold(i64),
    Confirmed(i64),
    Releasing(Vec<i64>),
    Released(Vec<i64>),
    Asked(KeyRecord, SaleContent),
    Resolved(KeyRecord),
    Reverse(KeyRecord, Option<SaleContent>, Reversing),
    Reversed(KeyRecord),
}

impl Effect {
    fn of(r: &Record) -> Effect {
        match r {
            Record::Cached(c) => Effect::Cached(c.pin.pin_id),
            Record::CacheSold { pin_id, .. } => Effect::CacheSold(*pin_id),
            Record::Confirmed { pin_id } => Effect::Confirmed(*pin_id),
            Record::Releasing { pin_ids } => Effect::Releasing(pin_ids.clone()),
            Record::Released { pin_ids } => Effect::Released(pin_ids.clone()),
            Record::Asked { sale } => Effect::Asked(KeyRecord::from(&sale.key()), sale.content()),
            Record::Resolved { key } => Effect::Resolved(key.clone()),
            Record::Reverse { key, content, why } => Effect::Reverse(key.clone(), content.clone(), *why),
            Record::Reversed { key } => Effect::Reversed(key.clone()),
        }
    }
}

impl Live {
    fn apply(&mut self, e: Effect, frame: LiveFrame) {
        match e {
            Effect::Cached(pin_id) => {
                // Reserved again: whatever release of this id was pending is over (the server gave it back to us).
                self.releasing.remove(&pin_id);
                self.cached.insert(pin_id, frame);
            }
            Effect::CacheSold(pin_id) => {
                if let Some(c) = self.cached.remove(&pin_id) {
                    self.sold.insert(pin_id, (c, frame));
                }
            }
            Effect::Confirmed(pin_id) => {
                self.sold.remove(&pin_id);
            }
            Effect::Releasing(pin_ids) => {
                for id in pin_ids {
                    self.cached.remove(&id);
                    self.releasing.insert(id);
                }
            }
            Effect::Released(pin_ids) => {
                for id in pin_ids {
                    self.releasing.remove(&id);
                }
            }
            Effect::Asked(key, content) => {
                self.asked.insert(key, (content, frame));
            }
            Effect::Resolved(key) => {
                self.asked.remove(&key);
            }
            Effect::Reverse(key, content, why) => {
                self.reverse.insert(key, (content, why, frame));
            }
            Effect::Reversed(key) => {
                self.reverse.remove(&key);
            }
        }
    }

    /// The frames that rebuild this state, each once.
    fn frames(&self) -> Vec<LiveFrame> {
        let mut out: Vec<LiveFrame> = Vec::new();
        out.extend(self.cached.values().cloned());
        for (c, s) in self.sold.values() {
            out.push(c.clone());
            out.push(s.clone());
        }
        // Releases still pending, named anew (an old frame may name ids released or reserved again since).
        let ids: Vec<i64> = self.releasing.iter().copied().collect();
        for chunk in ids.chunks(RELEASE_CHUNK) {
            let w = Wire::Releasing {
                pin_ids: chunk.to_vec(),
            };
            out.push(frame(&serde_json::to_vec(&w).expect("serialisable")).into());
        }
        out.extend(self.asked.values().map(|(_, f)| f.clone()));
        out.extend(self.reverse.values().map(|(_, _, f)| f.clone()));
        out
    }

    fn live_bytes(&self) -> u64 {
        self.frames().iter().map(|f| f.len() as u64).sum()
    }
}

/// What a journal holds and owes, read without writing anything (`pingate audit`; the gateway may be running).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holdings {
    /// Ids of PINs cached, unsold.
    pub cached: Vec<i64>,
    /// Ids of PINs sold from the cache and not yet confirmed to the server.
    pub unconfirmed: Vec<i64>,
    /// Ids of PINs on their way back to the server.
    pub releasing: Vec<i64>,
    /// Reversals (and on-demand sales of unknown outcome, which are reversed) not yet acknowledged.
    pub reverse: usize,
}

/// Reads the journal at `path` without writing to it: what it holds and owes.
pub fn inspect(path: &Path, cipher: &PinCipher) -> Result<Holdings, JournalError> {
    let (records, _) = read_records_as(path, cipher, false)?;
    let mut live = Live::default();
    for (r, f) in records {
        live.apply(Effect::of(&r), f.into());
    }
    let mut h = Holdings {
        cached: live.cached.keys().copied().collect(),
        unconfirmed: live.sold.keys().copied().collect(),
        releasing: live.releasing.iter().copied().collect(),
        reverse: live.asked.len() + live.reverse.len(),
    };
    h.cached.sort_unstable();
    h.unconfirmed.sort_unstable();
    Ok(h)
}

/// What the journal says the gateway holds and owes, after a restart.
#[derive(Debug, Default)]
pub struct Recovered {
    /// PINs in the cache, unsold.
    pub cached: Vec<CachedPin>,
    /// Cache sales the server has not acknowledged: confirm them. The PIN is there to answer a repeat.
    pub unconfirmed: Vec<(CachedPin, SaleRecord)>,
    /// PINs on their way back to the server: release them.
    pub releasing: Vec<i64>,
    /// On-demand sales asked for with no known outcome, and reversals not yet acknowledged: reverse them all.
    pub reverse: Vec<(KeyRecord, Option<SaleContent>, Reversing)>,
    /// Bytes of a torn last record that were cut off (and kept beside the journal).
    pub torn_bytes: u64,
}

/// Records with their frames (encoded, PINs sealed, by the caller: the writer thread only writes), or why they
/// could not be encoded.
struct Append {
    encoded: Result<Vec<(Effect, LiveFrame)>, String>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

thread_local! {
    /// Where a task's records are serialised before each is copied, at its exact size, into the frame the writer
    /// keeps (one allocation per record; a record holds no PIN in clear, only sealed).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One record's frame: length, CRC, then the JSON of `w`.
fn encode_frame(w: &WireRef<'_>) -> Result<LiveFrame, String> {
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(&[0; 8]);
        serde_json::to_writer(&mut *buf, w).map_err(|e| e.to_string())?;
        let len = buf.len() - 8;
        let frame = if len > MAX_RECORD {
            // Recovery would take it for a torn tail: never write one.
            Err(format!("record of {len} bytes, the cap is {MAX_RECORD}"))
        } else {
            let crc = crc32(&buf[8..]);
            buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
            Ok(LiveFrame::from(&buf[..]))
        };
        if buf.capacity() > 1 << 16 {
            // A large release record: not kept for every later record.
            *buf = Vec::new();
        }
        frame
    })
}

fn encode<'a>(
    records: impl IntoIterator<Item = Result<(Effect, WireRef<'a>), String>>,
) -> Result<Vec<(Effect, LiveFrame)>, String> {
    records
        .into_iter()
        .map(|r| {
            let (e, w) = r?;
            Ok((e, encode_frame(&w)?))
        })
        .collect()
}

fn encode_records(records: &[Record], cipher: &PinCipher) -> Result<Vec<(Effect, LiveFrame)>, String> {
    encode(records.iter().map(|r| Ok((Effect::of(r), to_wire(r, cipher)?))))
}

/// Tuning of the journal.
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// Compact when the file is larger than this and more than four times what is live.
    pub compact_above: u64,
    /// Sync to disk (`fdatasync`) before acknowledging. Only tests of other parts turn this off.
    pub sync: bool,
    /// Least time from one sync to the next while records keep coming (group commit); zero syncs as soon as the
    /// previous sync is done.
    pub group: std::time::Duration,
}

impl Default for JournalOptions {
    fn default() -> JournalOptions {
        JournalOptions {
            compact_above: 64 << 20,
            sync: true,
            group: std::time::Duration::ZERO,
        }
    }
}

/// Handle to the journal's writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::UnboundedSender<Append>,
    /// Set by the writer when a write failed (it takes no more records from then on).
    broken: Arc<std::sync::atomic::AtomicBool>,
    path: Arc<PathBuf>,
    cipher: Arc<PinCipher>,
}

impl Journal {
    /// Whether the writer thread is still taking records (it stops for good after a write it cannot make).
    pub fn is_writing(&self) -> bool {
        !self.tx.is_closed() && !self.broken.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({})", self.path.display())
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Records read back, each with its frame.
type Framed = Vec<(Record, Vec<u8>)>;

/// Reads a journal: the records, and how many bytes followed the last valid one (a torn tail, cut off).
fn read_records(path: &Path, cipher: &PinCipher) -> Result<(Framed, u64), JournalError> {
    read_records_as(path, cipher, true)
}

/// [`read_records`]; a torn tail is kept aside only when `aside` (never by a reader that must not write).
fn read_records_as(path: &Path, cipher: &PinCipher, aside: bool) -> Result<(Framed, u64), JournalError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io(path))?;
    if data.len() < MAGIC.len() {
        // A crash while creating the file: nothing was ever acknowledged from it.
        return Ok((Vec::new(), data.len() as u64));
    }
    let (records, at) = parse(path, &data, cipher)?;
    let torn = (data.len() - at) as u64;
    if torn > 0 && aside {
        let aside = path.with_extension(format!("tail-{}", crate::clock::unix_now()));
        std::fs::write(&aside, &data[at..]).map_err(io(&aside))?;
    }
    Ok((records, torn))
}

/// A journal's bytes read as recovery reads them, without I/O: its records, and how many bytes of a torn tail
/// follow them (the fuzz target `journal_record` feeds it anything).
pub fn decode(data: &[u8], cipher: &PinCipher) -> Result<(Vec<Record>, u64), JournalError> {
    let (records, at) = parse(Path::new("(bytes)"), data, cipher)?;
    Ok((records.into_iter().map(|(r, _)| r).collect(), (data.len() - at) as u64))
}

/// One record from a frame's payload (its JSON), the PIN of a `cached` record opened with `cipher`.
pub fn decode_record(payload: &[u8], cipher: &PinCipher) -> Result<Record, String> {
    let wire: Wire = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    from_wire(wire, cipher)
}

/// One record as a frame's payload, the PIN of a `cached` record sealed with `cipher` ([`decode_record`]'s
/// inverse).
pub fn encode_record(r: &Record, cipher: &PinCipher) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&to_wire(r, cipher)?).map_err(|e| e.to_string())
}

/// The records in a journal's bytes, each with its frame, and where the last valid one ends (a torn tail may
/// follow). Damage with valid records after it is an error, not a tail.
fn parse(path: &Path, data: &[u8], cipher: &PinCipher) -> Result<(Framed, usize), JournalError> {
    if data.len() < MAGIC.len() {
        return Ok((Vec::new(), 0));
    }
    if &data[..4] != MAGIC {
        return Err(JournalError::NotAJournal { path: path.into() });
    }
    let mut at = 4usize;
    let mut records = Vec::new();
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || data.len() - at - 8 < len {
            break;
        }
        let payload = &data[at + 8..at + 8 + len];
        if crc32(payload) != crc {
            break;
        }
        let bad = |reason: String| JournalError::BadRecord {
            path: path.into(),
            offset: at as u64,
            reason,
        };
        let record = decode_record(payload, cipher).map_err(bad)?;
        records.push((record, data[at..at + 8 + len].to_vec()));
        at += 8 + len;
    }
    if at < data.len() && valid_frame_after(data, at + 1) {
        // Not a torn last write: damage inside the journal, with records after it. Nothing is guessed.
        return Err(JournalError::BadRecord {
            path: path.into(),
            offset: at as u64,
            reason: "damaged record with valid records after it (not a torn tail); restore the file or \
                     reconcile this gateway by hand"
                .into(),
        });
    }
    Ok((records, at))
}

/// Whether a whole frame with a valid checksum starts anywhere at or after `from`.
fn valid_frame_after(data: &[u8], from: usize) -> bool {
    (from..data.len().saturating_sub(8)).any(|i| {
        let len = u32::from_le_bytes(data[i..i + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[i + 4..i + 8].try_into().expect("4 bytes"));
        len > 0 && len <= MAX_RECORD && data.len() - i - 8 >= len && crc32(&data[i + 8..i + 8 + len]) == crc
    })
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Writes `frames` as a fresh journal at `path` (through a temporary file and a rename), and opens it for append.
fn rewrite(path: &Path, frames: &[LiveFrame]) -> std::io::Result<File> {
    let tmp = path.with_extension("compact");
    {
        let mut f = File::create(&tmp)?;
        let mut buf = Vec::with_capacity(4 + frames.iter().map(|f| f.len()).sum::<usize>());
        buf.extend_from_slice(MAGIC);
        for fr in frames {
            buf.extend_from_slice(fr);
        }
        f.write_all(&buf)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)?;
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

/// A compaction under way beside the writer: a thread writes what was live (and syncs it) to a temporary file
/// while the writer goes on appending to the journal itself, keeping a copy of what it appends since (`tail`).
/// When the thread is done, the writer adds the tail to the new file, syncs it and renames it over the journal.
/// Until that rename the journal is whole and current, so a crash at any point loses nothing; and sales no longer
/// wait while tens of megabytes of live records are rewritten (that stalled every sale for 50-90 ms).
struct Compaction {
    thread: std::thread::JoinHandle<std::io::Result<File>>,
    tmp: PathBuf,
    /// Bytes of the snapshot (magic included).
    snapshot: u64,
    tail: Vec<u8>,
}

impl Compaction {
    /// `frames` are shared with the writer's live set, not copied: the writer hands them over in a millisecond or
    /// two and the thread does the rest.
    fn start(path: &Path, frames: Vec<LiveFrame>) -> Compaction {
        // Not `rewrite`'s name: a journal opened again while this one closes compacts through that one.
        let tmp = path.with_extension("compacting");
        let snapshot = 4 + frames.iter().map(|f| f.len() as u64).sum::<u64>();
        let at = tmp.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(snapshot as usize);
            buf.extend_from_slice(MAGIC);
            for fr in &frames {
                buf.extend_from_slice(fr);
            }
            drop(frames);
            let mut f = File::create(&at)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            Ok(f)
        });
        Compaction {
            thread,
            tmp,
            snapshot,
            tail: Vec::new(),
        }
    }

    /// Waits for the thread and removes what it wrote.
    fn abandon(self) {
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.tmp);
    }

    /// Switches the journal at `path` to the compacted file: its size, and the file to append to.
    fn finish(self, path: &Path) -> std::io::Result<(File, u64)> {
        let written = self
            .thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("compaction thread panicked")));
        let done = written.and_then(|mut f| {
            f.write_all(&self.tail)?;
            f.sync_all()?;
            std::fs::rename(&self.tmp, path)?;
            sync_dir(path)?;
            let mut f = OpenOptions::new().read(true).write(true).open(path)?;
            f.seek(SeekFrom::End(0))?;
            Ok((f, self.snapshot + self.tail.len() as u64))
        });
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path`, recovers what it holds, compacts it, and starts the writer thread.
    pub fn open(
        path: &Path,
        cipher: Arc<PinCipher>,
        opts: JournalOptions,
    ) -> Result<(Journal, Recovered), JournalError> {
        let (records, torn_bytes) = if path.exists() {
            read_records(path, &cipher)?
        } else {
            (Vec::new(), 0)
        };
        let mut live = Live::default();
        let mut pins: HashMap<i64, CachedPin> = HashMap::new();
        let mut sales: HashMap<i64, SaleRecord> = HashMap::new();
        for (r, f) in records {
            match &r {
                Record::Cached(c) => {
                    pins.insert(c.pin.pin_id, c.clone());
                }
                Record::CacheSold { pin_id, sale } => {
                    sales.insert(*pin_id, sale.clone());
                }
                _ => {}
            }
            live.apply(Effect::of(&r), f.into());
        }
        let mut recovered = Recovered {
            torn_bytes,
            ..Recovered::default()
        };
        for id in live.cached.keys() {
            recovered.cached.push(pins[id].clone());
        }
        for id in live.sold.keys() {
            recovered.unconfirmed.push((pins[id].clone(), sales[id].clone()));
        }
        recovered.releasing.extend(live.releasing.iter().copied());
        // An on-demand sale with no known outcome is reversed; so is every reversal not yet acknowledged. The
        // `asked` frames stay live until the reversal is acknowledged: they are turned into `reverse` frames here.
        let mut reverse: Vec<(KeyRecord, Option<SaleContent>, Reversing)> = live
            .reverse
            .iter()
            .map(|(k, (c, why, _))| (k.clone(), c.clone(), *why))
            .collect();
        let asked: Vec<KeyRecord> = live.asked.keys().cloned().collect();
        for k in asked {
            let (content, _) = live.asked.remove(&k).expect("listed");
            if !live.reverse.contains_key(&k) {
                // The gateway's own reversal of a sale whose answer it never had to give.
                let why = Reversing {
                    reason: ReversalReason::Undelivered,
                    requested_at: None,
                };
                let w = Wire::Reverse {
                    key: k.clone(),
                    content: Some(content.clone()),
                    reason: why.reason,
                    requested_at: None,
                };
                let payload = serde_json::to_vec(&w).expect("serialisable");
                live.reverse
                    .insert(k.clone(), (Some(content.clone()), why, frame(&payload).into()));
                reverse.push((k, Some(content), why));
            }
        }
        recovered.reverse = reverse;
        recovered.cached.sort_by_key(|c| c.pin.pin_id);
        recovered.unconfirmed.sort_by_key(|(c, _)| c.pin.pin_id);
        recovered.releasing.sort_unstable();

        let file = rewrite(path, &live.frames()).map_err(io(path))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let p = path.to_path_buf();
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let b = broken.clone();
        std::thread::Builder::new()
            .name("pingate-journal".into())
            .spawn(move || writer(p, file, live, opts, rx, b))
            .map_err(io(path))?;
        Ok((
            Journal {
                tx,
                broken,
                path: Arc::new(path.to_path_buf()),
                cipher,
            },
            recovered,
        ))
    }

    /// Appends records and waits until they are on disk.
    pub async fn append(&self, records: Vec<Record>) -> Result<(), JournalError> {
        self.queue(records).await
    }

    /// Queues the records for writing now, and gives what waits for them to be durable: appends queued one after
    /// another are written in that order, and share syncs, while their caller waits once for all of them.
    pub fn queue(&self, records: Vec<Record>) -> impl std::future::Future<Output = Result<(), JournalError>> {
        let sent = self.send(records);
        Self::durable(sent)
    }

    /// [`Journal::queue`] for PINs just reserved: `cached` records written from the PINs as they are (no record
    /// built, no PIN copied).
    pub fn queue_cached(&self, pins: &[CachedPin]) -> impl std::future::Future<Output = Result<(), JournalError>> {
        let encoded = encode(
            pins.iter()
                .map(|c| Ok((Effect::Cached(c.pin.pin_id), cached_wire(c, &self.cipher)?))),
        );
        Self::durable(self.send_encoded(encoded))
    }

    /// Waits for records already sent to the writer (sending is done by the caller, at once, which keeps the order).
    async fn durable(sent: Result<oneshot::Receiver<Result<(), String>>, JournalError>) -> Result<(), JournalError> {
        sent?
            .await
            .map_err(|_| JournalError::Failed("writer stopped".into()))?
            .map_err(JournalError::Failed)
    }

    fn send(&self, records: Vec<Record>) -> Result<oneshot::Receiver<Result<(), String>>, JournalError> {
        self.send_encoded(encode_records(&records, &self.cipher))
    }

    fn send_encoded(
        &self,
        encoded: Result<Vec<(Effect, LiveFrame)>, String>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, JournalError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Append {
                encoded,
                done: Some(done),
            })
            .map_err(|_| JournalError::Failed("writer stopped".into()))?;
        Ok(rx)
    }

    /// [`Journal::append`], giving up waiting at `deadline` ([`JournalError::Late`]; at once if it has passed).
    /// The records are queued either way.
    pub async fn append_by(&self, records: &[Record], deadline: tokio::time::Instant) -> Result<(), JournalError> {
        self.wait_by(self.send_encoded(encode_records(records, &self.cipher))?, deadline)
            .await
    }

    /// [`Journal::append_by`] of one `cache_sold` record, written from the sale as it is (not cloned into a record).
    pub async fn append_cache_sold_by(
        &self,
        pin_id: i64,
        sale: &SaleRecord,
        deadline: tokio::time::Instant,
    ) -> Result<(), JournalError> {
        let encoded = encode([Ok((Effect::CacheSold(pin_id), WireRef::CacheSold { pin_id, sale }))]);
        self.wait_by(self.send_encoded(encoded)?, deadline).await
    }

    async fn wait_by(
        &self,
        rx: oneshot::Receiver<Result<(), String>>,
        deadline: tokio::time::Instant,
    ) -> Result<(), JournalError> {
        if tokio::time::Instant::now() >= deadline {
            return Err(JournalError::Late);
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(JournalError::Late),
            Ok(r) => r
                .map_err(|_| JournalError::Failed("writer stopped".into()))?
                .map_err(JournalError::Failed),
        }
    }

    /// Appends records without waiting: they go to disk with the next group, in order with every other append.
    /// For acknowledgements whose loss only means doing an idempotent step again after a crash.
    pub fn append_lazy(&self, records: Vec<Record>) {
        let _ = self.tx.send(Append {
            encoded: encode_records(&records, &self.cipher),
            done: None,
        });
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn writer(
    path: PathBuf,
    mut file: File,
    mut live: Live,
    opts: JournalOptions,
    mut rx: mpsc::UnboundedReceiver<Append>,
    broken: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut failed: Option<String> = None;
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut next_check = opts.compact_above.max(size + size / 2);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut compacting: Option<Compaction> = None;
    let mut last_sync = std::time::Instant::now();
    loop {
        // While a compaction runs, look at it every millisecond between records (it is switched to as soon as it
        // is done); otherwise sleep until the next record.
        let first = if compacting.is_some() {
            match rx.try_recv() {
                Ok(a) => Some(a),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.blocking_recv() {
                Some(a) => Some(a),
                None => break,
            }
        };
        if compacting.as_ref().is_some_and(|c| c.thread.is_finished()) {
            let c = compacting.take().expect("looked at");
            match c.finish(&path) {
                Ok((f, new_size)) => {
                    tracing::debug!(journal = %path.display(), from = size, to = new_size, "journal compacted");
                    file = f;
                    size = new_size;
                }
                Err(e) => {
                    // The journal itself is still whole (the rename is what switches): keep appending to it.
                    tracing::warn!(journal = %path.display(), error = %e, "journal compaction failed");
                }
            }
            next_check = opts.compact_above.max(size + size / 2);
        }
        let Some(first) = first else {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        };
        // Group commit: under load, syncs are spaced by `group` and each takes everything queued meanwhile
        // (a sync's cost is mostly per call: 45 µs of CPU on the 2-core machine whatever it carries). A record
        // after a quiet spell is written at once.
        let since = last_sync.elapsed();
        if since < opts.group {
            std::thread::sleep(opts.group - since);
        }
        let mut group = vec![first];
        let count = |a: &Append| a.encoded.as_ref().map_or(0, Vec::len);
        let mut n = count(&group[0]);
        while n < MAX_GROUP {
            match rx.try_recv() {
                Ok(a) => {
                    n += count(&a);
                    group.push(a);
                }
                Err(_) => break,
            }
        }
        if let Some(why) = &failed {
            for a in group {
                if let Some(d) = a.done {
                    let _ = d.send(Err(why.clone()));
                }
            }
            continue;
        }
        buf.clear();
        let mut results: Vec<Result<(), String>> = Vec::with_capacity(group.len());
        let mut applied = Vec::new();
        let mut dones = Vec::with_capacity(group.len());
        for a in group {
            match a.encoded {
                Ok(encoded) => {
                    for (r, f) in encoded {
                        buf.extend_from_slice(&f);
                        applied.push((r, f));
                    }
                    results.push(Ok(()));
                }
                // A record that cannot be encoded (sealing failed, too large) fails its own append only.
                Err(e) => results.push(Err(e)),
            }
            dones.push(a.done);
        }
        let written = file
            .write_all(&buf)
            .and_then(|()| if opts.sync { file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            let why = format!("write {}: {e}", path.display());
            tracing::error!(journal = %path.display(), error = %e, "journal write failed; no more records are taken");
            failed = Some(why.clone());
            broken.store(true, std::sync::atomic::Ordering::Relaxed);
            for d in dones.into_iter().flatten() {
                let _ = d.send(Err(why.clone()));
            }
            continue;
        }
        last_sync = std::time::Instant::now();
        size += buf.len() as u64;
        if let Some(c) = &mut compacting {
            c.tail.extend_from_slice(&buf);
        }
        for (e, f) in applied {
            live.apply(e, f);
        }
        for (d, r) in dones.into_iter().zip(results) {
            if let Some(d) = d {
                let _ = d.send(r);
            }
        }
        // Measuring what is live walks every live record: done only when the file has grown by half since the
        // last look (amortised O(1) per record), not on every group.
        if compacting.is_none() && size > next_check {
            let live_bytes = live.live_bytes();
            if live_bytes * 4 < size {
                compacting = Some(Compaction::start(&path, live.frames()));
            } else {
                next_check = opts.compact_above.max(size + size / 2);
            }
        }
    }
    // Closing: a compaction under way is dropped, not switched to (the journal is whole, and the next open
    // compacts it): a journal opened again at once must not have this one renamed over it.
    if let Some(c) = compacting {
        c.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sale::Pin;

    fn cipher() -> Arc<PinCipher> {
        Arc::new(PinCipher::from_spec(&format!("1:{}", "ab".repeat(32))).unwrap())
    }

    fn pin(id: i64) -> CachedPin {
        CachedPin {
            pin: PinOut {
                pin_id: id,
                product: "TOPUP".into(),
                amount: 1000,
                pin: Pin::new(format!("98765432{id:08}")),
                serial: format!("S{id}"),
                expiry: None,
                receipt: vec!["line".into()],
            },
            lease_until: 1_900_000_000,
        }
    }

    fn sale(stan: &str) -> SaleRecord {
        SaleRecord {
            terminal_id: "T1".into(),
            merchant_id: "M1".into(),
            stan: stan.into(),
            transmission: "1128120000".into(),
            rrn: "000000000001".into(),
            product: "TOPUP".into(),
            amount: 1000,
            currency: "978".into(),
        }
    }

    fn key(stan: &str) -> KeyRecord {
        KeyRecord::from(&sale(stan).key())
    }

    #[test]
    fn crc_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[tokio::test]
    async fn recovery_rebuilds_exactly_what_is_live() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert!(r.cached.is_empty() && r.reverse.is_empty());
        j.append((1..=5).map(|i| Record::Cached(pin(i))).collect())
            .await
            .unwrap();
        j.append(vec![Record::CacheSold {
            pin_id: 1,
            sale: sale("000001"),
        }])
        .await
        .unwrap();
        j.append(vec![Record::CacheSold {
            pin_id: 2,
            sale: sale("000002"),
        }])
        .await
        .unwrap();
        j.append(vec![Record::Confirmed { pin_id: 2 }]).await.unwrap();
        j.append(vec![Record::Releasing { pin_ids: vec![4, 5] }]).await.unwrap();
        j.append(vec![Record::Released { pin_ids: vec![5] }]).await.unwrap();
        j.append(vec![Record::Asked { sale: sale("000010") }]).await.unwrap();
        j.append(vec![Record::Asked { sale: sale("000011") }]).await.unwrap();
        j.append(vec![Record::Resolved { key: key("000011") }]).await.unwrap();
        j.append(vec![Record::Reverse {
            key: key("000020"),
            content: None,
            why: Reversing::default(),
        }])
        .await
        .unwrap();
        j.append(vec![Record::Reverse {
            key: key("000021"),
            content: None,
            why: Reversing::default(),
        }])
        .await
        .unwrap();
        j.append(vec![Record::Reversed { key: key("000021") }]).await.unwrap();
        drop(j);
        // The writer thread ends when the last handle goes; the data was synced before each append returned.
        let (j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.cached.iter().map(|c| c.pin.pin_id).collect::<Vec<_>>(), vec![3]);
        assert_eq!(r.cached[0], pin(3), "the PIN comes back whole");
        assert_eq!(r.unconfirmed.len(), 1);
        assert_eq!(r.unconfirmed[0].0.pin.pin_id, 1);
        assert_eq!(r.unconfirmed[0].1, sale("000001"));
        assert_eq!(r.releasing, vec![4]);
        let mut rev = r.reverse.clone();
        rev.sort_by(|a, b| a.0.stan.cmp(&b.0.stan));
        // The reversal made of an unanswered `asked` names what that sale bought, for the server to check.
        assert_eq!(
            rev,
            vec![
                (
                    key("000010"),
                    Some(sale("000010").content()),
                    Reversing {
                        reason: ReversalReason::Undelivered,
                        requested_at: None
                    }
                ),
                (key("000020"), None, Reversing::default())
            ]
        );
        // Acknowledging the reversal that recovery made of the unanswered `asked` retires it.
        j.append(vec![Record::Reversed { key: key("000010") }]).await.unwrap();
        drop(j);
        let (_j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.reverse, vec![(key("000020"), None, Reversing::default())]);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_kept_aside_and_nothing_acknowledged_is_lost() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        j.append(vec![Record::Cached(pin(7))]).await.unwrap();
        drop(j);
        // Half of a frame, as a kill during a write leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']).unwrap();
        drop(f);
        let (_j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.torn_bytes, 9);
        assert_eq!(r.cached, vec![pin(7)]);
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tail-"))
            .collect();
        assert_eq!(aside.len(), 1);
    }

    #[tokio::test]
    async fn a_flipped_byte_stops_recovery_there() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        j.append(vec![Record::Cached(pin(1))]).await.unwrap();
        j.append(vec![Record::Cached(pin(2))]).await.unwrap();
        drop(j);
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 3;
        data[last] ^= 0x40;
        std::fs::write(&path, data).unwrap();
        let (_j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.cached.len(), 1);
        assert!(r.torn_bytes > 0);
    }

    #[tokio::test]
    async fn damage_with_valid_records_after_it_is_refused_not_cut() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        j.append(vec![Record::Cached(pin(1))]).await.unwrap();
        j.append(vec![Record::CacheSold {
            pin_id: 1,
            sale: sale("000001"),
        }])
        .await
        .unwrap();
        drop(j);
        let mut data = std::fs::read(&path).unwrap();
        data[20] ^= 0x01; // inside the first record; the `cache_sold` after it is whole
        std::fs::write(&path, &data).unwrap();
        let e = Journal::open(&path, cipher(), JournalOptions::default()).unwrap_err();
        assert!(matches!(e, JournalError::BadRecord { offset: 4, .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), data, "the file is left as it was");
    }

    #[tokio::test]
    async fn a_release_is_forgotten_once_acknowledged_or_reserved_again_also_across_compaction() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        j.append((1..=4).map(|i| Record::Cached(pin(i))).collect())
            .await
            .unwrap();
        j.append(vec![Record::Releasing {
            pin_ids: vec![1, 2, 3, 4],
        }])
        .await
        .unwrap();
        j.append(vec![Record::Released { pin_ids: vec![1] }]).await.unwrap();
        drop(j);
        // Recovery compacts: the pending release must name 2, 3 and 4 only.
        let (j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.releasing, vec![2, 3, 4]);
        // PIN 1 reserved again by a refill, then PIN 2 too (its release was done but the ack was lost).
        j.append(vec![Record::Cached(pin(1)), Record::Cached(pin(2))])
            .await
            .unwrap();
        drop(j);
        let (_j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.releasing, vec![3, 4]);
        assert_eq!(r.cached.iter().map(|c| c.pin.pin_id).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_write_past_its_deadline_is_late_but_still_lands_in_order() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        let past = tokio::time::Instant::now() - std::time::Duration::from_secs(1);
        let e = j.append_by(&[Record::Cached(pin(9))], past).await.unwrap_err();
        assert!(matches!(e, JournalError::Late), "{e}");
        j.append(vec![Record::Cached(pin(10))]).await.unwrap();
        drop(j);
        let (_j, r) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        assert_eq!(r.cached.iter().map(|c| c.pin.pin_id).collect::<Vec<_>>(), vec![9, 10]);
    }

    #[tokio::test]
    async fn a_record_over_the_cap_is_refused_at_write() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        let e = j
            .append(vec![Record::Releasing {
                pin_ids: (0..200_000).collect(),
            }])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cap"), "{e}");
        j.append(vec![Record::Cached(pin(1))]).await.unwrap();
    }

    #[test]
    fn wrong_keys_and_foreign_files_are_refused_not_guessed() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
            j.append(vec![Record::Cached(pin(1))]).await.unwrap();
        });
        let other = Arc::new(PinCipher::from_spec(&format!("1:{}", "cd".repeat(32))).unwrap());
        let e = Journal::open(&path, other, JournalOptions::default()).unwrap_err();
        assert!(matches!(e, JournalError::BadRecord { offset: 4, .. }), "{e}");
        assert!(!e.to_string().contains("9876543200000001"));
        let foreign = dir.join("x.journal");
        std::fs::write(&foreign, b"hello world").unwrap();
        assert!(matches!(
            Journal::open(&foreign, cipher(), JournalOptions::default()),
            Err(JournalError::NotAJournal { .. })
        ));
    }

    /// Group commit: while records keep coming, syncs are spaced by `group` (a record queued just after a sync waits
    /// for the next one); after a quiet spell longer than `group`, a record is written at once.
    #[tokio::test]
    async fn group_commit_spaces_syncs_under_load_and_not_after_a_quiet_spell() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let group = std::time::Duration::from_millis(400);
        let opts = JournalOptions {
            group,
            ..JournalOptions::default()
        };
        let (j, _) = Journal::open(&path, cipher(), opts).unwrap();
        tokio::time::sleep(group + std::time::Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        j.append(vec![Record::Cached(pin(1))]).await.unwrap();
        assert!(t.elapsed() < group / 2, "after a quiet spell: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        j.append(vec![Record::Cached(pin(2))]).await.unwrap();
        assert!(t.elapsed() >= group * 3 / 4, "right after a sync: {:?}", t.elapsed());
        // Queued together within one interval: one sync takes them all.
        let t = std::time::Instant::now();
        let (a, b) = tokio::join!(
            j.append(vec![Record::Cached(pin(3))]),
            j.append(vec![Record::Cached(pin(4))])
        );
        a.unwrap();
        b.unwrap();
        assert!(t.elapsed() < group * 2, "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn compaction_keeps_only_what_is_live() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let opts = JournalOptions {
            compact_above: 16 << 10,
            sync: false,
            ..JournalOptions::default()
        };
        let (j, _) = Journal::open(&path, cipher(), opts.clone()).unwrap();
        for i in 0..400 {
            j.append(vec![Record::Cached(pin(i))]).await.unwrap();
            j.append(vec![Record::CacheSold {
                pin_id: i,
                sale: sale(&format!("{i:06}")),
            }])
            .await
            .unwrap();
            if i != 123 {
                j.append(vec![Record::Confirmed { pin_id: i }]).await.unwrap();
            }
        }
        j.append(vec![Record::Cached(pin(1000))]).await.unwrap();
        // Compaction runs beside the writer: the journal is switched to the compacted file once it is written.
        let mut size = std::fs::metadata(&path).unwrap().len();
        for _ in 0..500 {
            if size < 16 << 10 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            size = std::fs::metadata(&path).unwrap().len();
        }
        assert!(size < 16 << 10, "compacted to {size} bytes");
        drop(j);
        let (_j, r) = Journal::open(&path, cipher(), opts).unwrap();
        assert_eq!(r.cached, vec![pin(1000)]);
        assert_eq!(r.unconfirmed.len(), 1);
        assert_eq!(r.unconfirmed[0].0.pin.pin_id, 123);
    }

    /// Records appended while a compaction is written beside the writer are in the compacted journal too: every
    /// sale acknowledged before, during and after compactions is recovered (with syncs, as in production).
    #[tokio::test]
    async fn records_appended_during_a_compaction_are_kept() {
        let dir = tempdir();
        let path = dir.join("gw.journal");
        let opts = JournalOptions {
            compact_above: 32 << 10,
            sync: true,
            ..JournalOptions::default()
        };
        let (j, _) = Journal::open(&path, cipher(), opts.clone()).unwrap();
        let mut compacted = 0;
        let mut last = std::fs::metadata(&path).unwrap().len();
        for i in 0..600 {
            // Cached and sold, never confirmed: every one of them stays live.
            j.append(vec![Record::Cached(pin(i))]).await.unwrap();
            j.append(vec![Record::CacheSold {
                pin_id: i,
                sale: sale(&format!("{i:06}")),
            }])
            .await
            .unwrap();
            // Confirmed ones to compact away.
            for k in 0..4 {
                let id = 10_000 + i * 4 + k;
                j.append(vec![Record::Cached(pin(id))]).await.unwrap();
                j.append(vec![
                    Record::CacheSold {
                        pin_id: id,
                        sale: sale(&format!("{:06}", id % 1_000_000)),
                    },
                    Record::Confirmed { pin_id: id },
                ])
                .await
                .unwrap();
            }
            let now = std::fs::metadata(&path).unwrap().len();
            if now < last {
                compacted += 1;
            }
            last = now;
        }
        assert!(compacted > 0, "no compaction happened");
        drop(j);
        // The writer thread ends after the drop: wait for the file to settle.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (_j, r) = Journal::open(&path, cipher(), opts).unwrap();
        let mut ids: Vec<i64> = r.unconfirmed.iter().map(|(c, _)| c.pin.pin_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..600).collect::<Vec<i64>>());
        assert!(r.cached.is_empty());
    }

    /// The pure decoder (what the fuzz target `journal_record` drives) reads a journal's bytes as recovery does:
    /// each record, a torn tail counted, damage before valid records refused; each record encodes and decodes again.
    #[tokio::test]
    async fn decode_reads_the_bytes_as_recovery_does() {
        let path = tempdir().join("gw.journal");
        let records = vec![
            Record::Cached(pin(1)),
            Record::CacheSold {
                pin_id: 1,
                sale: sale("000001"),
            },
            Record::Reverse {
                key: key("000002"),
                content: None,
                why: Reversing::default(),
            },
        ];
        let (j, _) = Journal::open(&path, cipher(), JournalOptions::default()).unwrap();
        j.append(records.clone()).await.unwrap();
        drop(j);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode(&bytes, &cipher()).unwrap(), (records.clone(), 0));
        assert_eq!(decode(&bytes[..bytes.len() - 3], &cipher()).unwrap().0, records[..2]);
        assert_eq!(decode(b"PG", &cipher()).unwrap(), (vec![], 2));
        let mut damaged = bytes.clone();
        damaged[4 + 8 + 3] ^= 1;
        assert!(matches!(
            decode(&damaged, &cipher()),
            Err(JournalError::BadRecord { offset: 4, .. })
        ));
        for r in &records {
            let payload = encode_record(r, &cipher()).unwrap();
            assert_eq!(&decode_record(&payload, &cipher()).unwrap(), r);
        }
    }

    /// Records are written borrowed ([`WireRef`]) and read back owned ([`Wire`]): every kind, with every optional
    /// part present and absent, must come back equal (a renamed field or tag in one of the two fails here).
    #[test]
    fn every_record_kind_reads_back_as_written() {
        let content = Some(SaleContent {
            merchant_id: "M1".into(),
            product: "P".into(),
            amount: 1000,
            currency: "978".into(),
        });
        let mut no_expiry = pin(7);
        no_expiry.pin.expiry = None;
        no_expiry.pin.receipt = vec![];
        let records = vec![
            Record::Cached(pin(1)),
            Record::Cached(no_expiry),
            Record::CacheSold {
                pin_id: 1,
                sale: sale("000001"),
            },
            Record::Confirmed { pin_id: 1 },
            Record::Releasing { pin_ids: vec![2, 3] },
            Record::Released { pin_ids: vec![2] },
            Record::Asked { sale: sale("000004") },
            Record::Resolved { key: key("000004") },
            Record::Reverse {
                key: key("000005"),
                content: None,
                why: Reversing::default(),
            },
            Record::Reverse {
                key: key("000006"),
                content,
                why: Reversing {
                    reason: ReversalReason::Unacknowledged,
                    requested_at: Some(1_700_000_000),
                },
            },
            Record::Reversed { key: key("000006") },
        ];
        for r in &records {
            let payload = encode_record(r, &cipher()).unwrap();
            assert_eq!(&decode_record(&payload, &cipher()).unwrap(), r);
        }
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "pingate-journal-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
