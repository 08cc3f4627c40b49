//! The PIN inventory: products, denominations and PINs in a real database, moved only along the allowed state
//! edges, every move written with its audit row in the same transaction.
//!
//! ```text
//! available ──reserve──► reserved ──confirm──► sold ──reverse──► voided
//!     │  ▲                  │
//!     │  └────release───────┘      (only the holder releases; an expired lease never frees a PIN by itself)
//!     │                    └──conflict──► voided   (its confirm was refused for good: see `Confirmation::Conflict`)
//!     ├──sell (on demand)──────────► sold
//!     ├──expire────────────────────► expired
//!     └──quarantine────────────────► quarantined   (its row does not decrypt, while its key opens others)
//!                                        │
//!     available ◄──return (operator)─────┘           (once the row is repaired: it must open again)
//! ```
//!
//! A PIN whose row does not decrypt (tampered, or damaged on disk) is taken out of sale the first time a sale or
//! reservation picks it, and the operation goes on with the next PIN: one bad row never blocks its product. It
//! is quarantined only when its key is shown right, by opening other PINs sealed under the same key id; a wrong key
//! (every row of it failing) quarantines nothing and fails the operation, as before.
//!
//! The database enforces the edges too (a trigger refuses any other state change) and a unique index on the
//! sale's PIN makes a double sale impossible even if code is wrong. Backends: [`sqlite::SqliteStore`] (the
//! embedded default); PostgreSQL follows.

pub mod handle;
pub mod pgtls;
pub mod postgres;
pub mod sqlite;

use crate::crypto;
use crate::sale::{Pin, SaleContent};

/// States of a PIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PinState {
    Available,
    Reserved,
    Sold,
    Voided,
    Expired,
    /// Its row does not decrypt while its key opens other rows (tampered or damaged): never sold, kept for the
    /// operator to look into, and returned to stock only by the operator once the row opens again.
    Quarantined,
}

impl PinState {
    pub const ALL: [PinState; 6] = [
        PinState::Available,
        PinState::Reserved,
        PinState::Sold,
        PinState::Voided,
        PinState::Expired,
        PinState::Quarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinState::Available => "available",
            PinState::Reserved => "reserved",
            PinState::Sold => "sold",
            PinState::Voided => "voided",
            PinState::Expired => "expired",
            PinState::Quarantined => "quarantined",
        }
    }

    pub fn parse(s: &str) -> Option<PinState> {
        PinState::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The allowed edges as an SQL condition on `OLD.state` and `NEW.state`, for the database triggers that
    /// refuse any other change (both backends generate theirs from this).
    pub fn allowed_edges_sql() -> String {
        let mut allowed = Vec::new();
        for from in PinState::ALL {
            for to in PinState::ALL {
                if from.can_move_to(to) {
                    allowed.push(format!(
                        "(OLD.state = '{}' AND NEW.state = '{}')",
                        from.as_str(),
                        to.as_str()
                    ));
                }
            }
        }
        allowed.join(" OR ")
    }

    /// The state column's CHECK, every state (both backends write theirs from this; migration 3 added
    /// `quarantined`).
    pub fn check_sql() -> String {
        let states: Vec<String> = PinState::ALL.iter().map(|s| format!("'{}'", s.as_str())).collect();
        format!("CHECK (state IN ({}))", states.join(", "))
    }

    /// The allowed edges, the single source of truth (the database trigger is generated from it).
    pub fn can_move_to(self, to: PinState) -> bool {
        use PinState::*;
        matches!(
            (self, to),
            (Available, Reserved)
                | (Available, Sold)
                | (Available, Expired)
                | (Available, Quarantined)
                | (Quarantined, Available)
                | (Reserved, Sold)
                | (Reserved, Available)
                | (Reserved, Voided)
                | (Sold, Voided)
        )
    }
}

/// Errors of the store layer; each maps to one PIN server protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No PIN of this product and amount is available.
    #[error("out of stock: {product} {amount}")]
    OutOfStock { product: String, amount: i64 },
    /// The product code is not in the catalog.
    #[error("unknown product `{0}`")]
    UnknownProduct(String),
    /// The product is not offered in this amount.
    #[error("product `{product}` has no denomination {amount}")]
    UnknownDenomination { product: String, amount: i64 },
    /// The idempotency key was used before with different content.
    #[error("idempotency key {key} was used with different content")]
    DuplicateMismatch { key: String },
    /// The sale's key was reversed (before the sale arrived, or after it): the sale is refused, and a voided PIN
    /// is never handed out again.
    #[error("sale {key} was reversed")]
    AlreadyReversed { key: String },
    /// A repeat of a sale older than the repeat age (or whose sale was made by another terminal id): the PIN is
    /// never handed out again.
    #[error("sale {key} is older than the repeat age: not handed out again")]
    RepeatExpired { key: String },
    /// A reversal names a sale whose product, amount, currency or merchant differ from its own: not reversed.
    #[error("reversal of {key} does not match its sale ({field} differs)")]
    ReversalMismatch { key: String, field: &'static str },
    /// A terminal's reversal after the reversal window: not reversed, the PIN stays sold.
    #[error("reversal of {key} is after the reversal window: the sale stands")]
    ReversalTooLate { key: String },
    /// The caller does not hold the PIN it names (or the PIN is not reserved).
    #[error("gateway `{holder}` does not hold PIN {pin_id}")]
    NotHolder { holder: String, pin_id: i64 },
    /// A request that cannot be valid (e.g. reserve 0 PINs, a malformed import row).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A PIN of an import is wrong (1-based position in the import); nothing of the import was kept.
    #[error("PIN {row}: {reason}")]
    ImportRow { row: usize, reason: String },
    /// Sealing or opening a PIN failed.
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
    /// The PIN with this id was picked but its row does not open (the serial names the row; the PIN is never
    /// shown). The store quarantines it and goes on when its key is shown right; otherwise this fails the operation.
    #[error("PIN {pin_id}: {reason}")]
    Unreadable { pin_id: i64, reason: crypto::CryptoError },
    /// The database failed (I/O, corruption, a constraint the code should have prevented).
    #[error("database: {0}")]
    Db(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Db(e.to_string())
    }
}

/// A catalog product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    pub code: String,
    pub name: String,
    pub supplier: String,
    /// ISO 4217 numeric code.
    pub currency: String,
    /// Amounts in minor units.
    pub denominations: Vec<i64>,
}

/// A PIN to load into the inventory.
#[derive(Clone, Debug)]
pub struct NewPin {
    pub product: String,
    pub amount: i64,
    pub pin: Pin,
    pub serial: String,
    pub expiry: Option<String>,
    pub receipt: Vec<String>,
}

impl NewPin {
    /// Which receipt line (from 1) shows the PIN, if one does. Receipts are stored and sent in clear, so a line that
    /// carries the PIN would keep it unsealed beside its sealed copy. Letters and digits are compared, case aside: a
    /// PIN spaced or dashed on a receipt is still the PIN.
    pub fn receipt_line_with_pin(&self) -> Option<usize> {
        let plain = |s: &str| -> zeroize::Zeroizing<String> {
            zeroize::Zeroizing::new(
                s.chars()
                    .filter(char::is_ascii_alphanumeric)
                    .map(|c| c.to_ascii_lowercase())
                    .collect(),
            )
        };
        let pin = plain(self.pin.expose());
        if pin.is_empty() {
            return None;
        }
        self.receipt
            .iter()
            .position(|l| plain(l).contains(pin.as_str()))
            .map(|i| i + 1)
    }

    /// The refusal of a PIN whose receipt shows it (see [`NewPin::receipt_line_with_pin`]); never names the PIN.
    pub fn check_receipt(&self) -> Result<(), String> {
        match self.receipt_line_with_pin() {
            Some(n) => Err(format!(
                "receipt line {n} contains the PIN (receipts are stored in clear: give the PIN its own field only)"
            )),
            None => Ok(()),
        }
    }
}

/// Who bought a PIN, and the idempotency key of the sale: terminal, STAN and transmission date-time (bound to its
/// year by the gateway). The gateway is who sold it, not part of the key: a repeat or a reversal finds its sale
/// whichever gateway it comes through (a NAC failing over, a load balancer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaleContext {
    pub gateway: String,
    pub terminal_id: String,
    pub merchant_id: String,
    pub stan: String,
    pub transmission: String,
    pub rrn: String,
}

impl SaleContext {
    /// The idempotency key as text, for errors and logs.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.terminal_id, self.stan, self.transmission)
    }

    /// The key as one unambiguous text (each part length-prefixed: `T/1`+`5` and `T`+`1/5` differ), for maps and
    /// locks. Never compare [`SaleContext::key`] texts: they are for people.
    pub fn key_id(&self) -> String {
        key_id(&self.terminal_id, &self.stan, &self.transmission)
    }
}

/// See [`SaleContext::key_id`].
pub(crate) fn key_id(terminal: &str, stan: &str, transmission: &str) -> String {
    format!(
        "{}:{terminal}{}:{stan}{}:{transmission}",
        terminal.len(),
        stan.len(),
        transmission.len()
    )
}

/// An on-demand sale request.
#[derive(Clone, Debug)]
pub struct SellRequest {
    pub product: String,
    pub amount: i64,
    pub sale: SaleContext,
    /// Seconds since the epoch: a repeat of a sale made before this is refused ([`StoreError::RepeatExpired`]);
    /// one made since gets its PIN again, and the re-delivery is recorded.
    pub repeat_since: i64,
}

/// The retrieval reference a sale is recorded with, as the gateway answers it: the contract's.
pub(crate) use crate::sale::rrn_of_pin;

/// The default repeat age: a day. A repeat of an older sale gets no PIN.
pub const DEFAULT_REPEAT_AGE_SECS: i64 = 86_400;

/// A PIN handed out (sold, or reserved for a gateway's cache), decrypted for sending. Two are equal when they are
/// the same PIN as handed out, whether or not one is a re-delivery.
#[derive(Clone, Debug)]
pub struct Dispensed {
    pub pin_id: i64,
    pub product: String,
    pub amount: i64,
    pub pin: Pin,
    pub serial: String,
    pub expiry: Option<String>,
    pub receipt: Vec<String>,
    /// Handed out again to a repeat of its sale (recorded in `redeliveries`), not sold now.
    pub redelivered: bool,
}

impl PartialEq for Dispensed {
    fn eq(&self, o: &Dispensed) -> bool {
        (
            self.pin_id,
            &self.product,
            self.amount,
            &self.pin,
            &self.serial,
            &self.expiry,
            &self.receipt,
        ) == (o.pin_id, &o.product, o.amount, &o.pin, &o.serial, &o.expiry, &o.receipt)
    }
}

impl Eq for Dispensed {}

/// A PIN row as either backend reads it: still sealed until [`PinRow::open`] decrypts it for sending.
pub(crate) struct PinRow {
    pub(crate) id: i64,
    pub(crate) product: String,
    pub(crate) amount: i64,
    pub(crate) serial: String,
    pub(crate) sealed: crypto::Sealed,
    pub(crate) expiry: Option<String>,
    /// Receipt lines as a JSON array.
    pub(crate) receipt: String,
}

impl PinRow {
    /// What its seal is bound to.
    pub(crate) fn ad(&self) -> crypto::RowAd<'_> {
        crypto::RowAd {
            id: self.id,
            product: &self.product,
            amount: self.amount,
            serial: &self.serial,
        }
    }

    pub(crate) fn open(&self, cipher: &crypto::PinCipher) -> Result<Dispensed, StoreError> {
        let pin = cipher
            .open_row(&self.sealed, &self.ad())
            .map_err(|reason| StoreError::Unreadable {
                pin_id: self.id,
                reason,
            })?;
        Ok(Dispensed {
            pin_id: self.id,
            product: self.product.clone(),
            amount: self.amount,
            pin,
            serial: self.serial.clone(),
            expiry: self.expiry.clone(),
            receipt: serde_json::from_str(&self.receipt).unwrap_or_default(),
            redelivered: false,
        })
    }
}

/// What a reversal did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reversal {
    /// The sold PIN is now voided.
    Voided { pin_id: i64 },
    /// It was voided by an earlier reversal (reversals are idempotent).
    AlreadyVoided { pin_id: i64 },
    /// No sale with that key yet: remembered, and the late sale will be refused.
    Remembered,
}

/// What a confirm did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// The reserved PIN is now sold.
    Sold,
    /// It was confirmed before with the same key (confirms are idempotent).
    AlreadyConfirmed,
    /// A reversal for this sale arrived first: the PIN was sold and voided at once; it is never sold again.
    Voided,
    /// Refused for good: the sale's key was already sold with another PIN (a key reused outside the gateway's
    /// repeat window, or through another gateway). The gateway handed the PIN out, but no sale can be recorded for
    /// it: the PIN (which this gateway holds: anyone else is `NotHolder`) is voided (`voided`), and a conflict is
    /// recorded (`confirm_conflicts`) that `pingate audit` reports as open until an
    /// operator resolves it (`pingate pins conflicts --resolve ID`). The gateway stops retrying.
    Conflict { voided: bool },
}

/// The inventory, whichever database holds it: [`sqlite::SqliteStore`] (embedded, one file) or
/// [`postgres::PgStore`] (shared by several PIN servers). Code written against this trait — the operator commands,
/// the conformance tests — runs on both. The server reaches a store through [`handle::StoreHandle`], whose workers
/// call [`PinStore::apply_batch`].
#[allow(async_fn_in_trait)] // used with static dispatch only
pub trait PinStore {
    /// Applies operations in one transaction (group commit); one result per operation, in order.
    async fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Outcome, StoreError>>;
    /// Adds a product or updates it, with its denominations.
    async fn upsert_product(&mut self, p: &Product) -> Result<(), StoreError>;
    /// Loads PINs, all or nothing; `progress` hears how many are written every few thousand.
    async fn import_with_progress(
        &mut self,
        pins: &[NewPin],
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<usize, StoreError>;
    /// Count of PINs per product, amount and state.
    async fn stock(&self) -> Result<Vec<StockRow>, StoreError>;
    /// The catalog.
    async fn catalog(&self) -> Result<Vec<Product>, StoreError>;
    /// Available PINs whose expiry (`YYYYMMDD`) is before `today` become expired; returns how many.
    async fn expire(&mut self, today: &str) -> Result<u64, StoreError>;
    /// Reservations whose lease ended before `now`, per holder (reported, never freed by themselves).
    async fn expired_leases(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Operator command: `holder`'s expired reservations go back to stock; returns how many.
    async fn return_expired(&mut self, holder: &str, now: i64) -> Result<u64, StoreError>;
    /// Operator command: the quarantined PIN `pin_id`, its row repaired (restored from a backup, say), goes back to
    /// stock; refused unless it is quarantined and its row now opens with this store's keys.
    async fn return_quarantined(&mut self, pin_id: i64) -> Result<(), StoreError>;
    /// Operator command: the available PIN `pin_id` is taken out of sale (quarantined) on the operator's word, with
    /// no key check: for a row the server cannot judge by itself, e.g. one whose key id names a key nobody has, which
    /// keeps the server from starting. Refused unless the PIN is available.
    async fn operator_quarantine(&mut self, pin_id: i64) -> Result<(), StoreError>;

    /// Refused confirms ([`Confirmation::Conflict`]), open ones first.
    async fn conflicts(&self) -> Result<Vec<ConflictRow>, StoreError>;
    /// PINs voided by reversals recorded since `since` ([`LIST_VOIDED`]).
    async fn voided(&self, since: i64, include_unacknowledged: bool) -> Result<Vec<VoidedRow>, StoreError>;
    /// Sets a merchant's value per day in a currency (`None`: removes the limit).
    async fn set_limit(
        &mut self,
        merchant_id: &str,
        currency: &str,
        value_per_day: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Every limit, with what was granted of it on UTC day `day` (`unix / 86400`).
    async fn limits(&self, day: i64) -> Result<Vec<LimitRow>, StoreError>;
    /// Sets a merchant's sales per minute across every gateway (`None`: removes the limit, and its grants).
    async fn set_rate_limit(&mut self, merchant_id: &str, sales_per_minute: Option<i64>) -> Result<(), StoreError>;
    /// Every sales-per-minute limit, with what was granted of it in minute `minute` (`unix / 60`).
    async fn rate_limits(&self, minute: i64) -> Result<Vec<RateRow>, StoreError>;
    /// Operator command: conflict `id` is dealt with (`note` says how); refused unless it is open.
    async fn resolve_conflict(&mut self, id: i64, note: &str, now: i64) -> Result<(), StoreError>;

    /// One operation in its own transaction.
    async fn apply(&mut self, op: Op) -> Result<Outcome, StoreError> {
        self.apply_batch(std::slice::from_ref(&op))
            .await
            .pop()
            .expect("one result per operation")
    }
}

/// Both backends: the keys that unsold PINs need, and whether those PINs are available (a scan of the PIN table,
/// once per start). A missing key refuses the start when available PINs need it (each would fail its sale); when
/// only reserved ones do, it is logged: their gateway holds them opened in its cache and never needs the server to
/// open them again, so one damaged key id on a reserved row does not keep the server down.
pub(crate) const UNSOLD_KEY_IDS: &str = "SELECT key_id, state = 'available', COUNT(*) FROM pins \
     WHERE state IN ('available', 'reserved') GROUP BY key_id, state = 'available' ORDER BY 1, 2";

/// The available PINs sealed under key `$1`, for naming them when the key is missing (start-up failure path only).
pub(crate) const AVAILABLE_OF_KEY: &str = "SELECT id FROM pins WHERE key_id = $1 AND state = 'available' ORDER BY id";

/// Of `(key id, available?, PINs)` as [`UNSOLD_KEY_IDS`] reads them, the keys this cipher lacks that available
/// PINs need, with how many; those that only reserved PINs need are logged.
pub(crate) fn available_without_key(cipher: &crypto::PinCipher, in_use: &[(u32, bool, i64)]) -> Vec<(u32, i64)> {
    let of = |available: bool| -> Vec<(u32, i64)> {
        in_use.iter().filter(|r| r.1 == available).map(|r| (r.0, r.2)).collect()
    };
    for (key, pins) in cipher.missing_keys(&of(false)) {
        tracing::warn!(
            key,
            pins,
            "reserved PINs are sealed under a key that is not loaded: their gateway sells them from its cache, but \
             any released back to stock will not sell until the key is loaded or the row quarantined"
        );
    }
    cipher.missing_keys(&of(true))
}

/// Schema migration 6, both backends: every PIN row sealed again bound to its row ([`crypto::RowAd`]) instead of its
/// serial alone, under the key id it had. What it met, per key id, decides whether the keys it was given are right.
#[derive(Default)]
pub(crate) struct Reseal {
    /// Per loaded key id: rows sealed again; rows that may still be opened (available, reserved, sold) that did not
    /// open, and the first few of their ids.
    keys: std::collections::BTreeMap<u32, (i64, i64, Vec<i64>)>,
    /// Rows left as they were: their key is not loaded, or they do not open and are never opened again (voided,
    /// expired, quarantined).
    left: i64,
}

impl Reseal {
    /// The new seal of `row` (in `state`), or `None` when it is left as it was.
    pub(crate) fn row(&mut self, cipher: &crypto::PinCipher, row: &PinRow, state: &str) -> Option<crypto::Sealed> {
        let key = row.sealed.key_id;
        if !cipher.has_key(key) {
            self.left += 1;
            return None;
        }
        let tally = self.keys.entry(key).or_default();
        match cipher.reseal_row(&row.sealed, &row.ad()) {
            Ok(sealed) => {
                tally.0 += 1;
                Some(sealed)
            }
            Err(_)
                if [PinState::Available, PinState::Reserved, PinState::Sold]
                    .iter()
                    .any(|s| s.as_str() == state) =>
            {
                tally.1 += 1;
                if tally.2.len() < crypto::NAMED_ROWS as usize {
                    tally.2.push(row.id);
                }
                None
            }
            Err(_) => {
                self.left += 1;
                None
            }
        }
    }

    /// Refuses (the migration's transaction is then rolled back whole) when a loaded key opened none of its rows
    /// that may still be opened: the wrong key was given, and every PIN sealed again under it would be lost. Logs
    /// the rows left as they were (damaged ones are quarantined when a sale picks them, as before).
    pub(crate) fn finish(self) -> Result<(), StoreError> {
        if let Some((&id, &(_, pins, _))) = self.keys.iter().find(|(_, t)| t.0 == 0 && t.1 > 0) {
            return Err(crypto::CryptoError::OpensNone { id, pins }.into());
        }
        for (key, (_, pins, ids)) in self.keys.iter().filter(|(_, t)| t.1 > 0) {
            tracing::warn!(key, pins, ids = ?ids, "schema migration 6: PINs that do not open (damaged rows) were left as they were");
        }
        if self.left > 0 {
            tracing::warn!(
                pins = self.left,
                "schema migration 6: PINs under keys that are not loaded, or voided, expired or quarantined ones that \
                 do not open, were left bound to their serial: they no longer open"
            );
        }
        let resealed: i64 = self.keys.values().map(|t| t.0).sum();
        tracing::info!(
            pins = resealed,
            "schema migration 6: PINs sealed again, bound to their rows"
        );
        Ok(())
    }
}

/// Moves an available PIN to quarantined (`$1` its id); changes nothing if it is no longer available.
pub(crate) const QUARANTINE: &str = "UPDATE pins SET state = 'quarantined' WHERE id = $1 AND state = 'available'";

/// Other PINs sealed under the key of a row that did not open, `$1` its key id and `$2` its id: if one of
/// them opens, the key is right and the row is bad (see [`key_is_shown_right`]). Failure path only.
pub(crate) const SAME_KEY_SAMPLE: &str =
    "SELECT id, product, amount, serial, key_id, nonce, ciphertext, expiry, receipt \
     FROM pins WHERE key_id = $1 AND id <> $2 ORDER BY id LIMIT 8";

/// Whether any of `others` (rows sealed under key `key_id`, like PIN `pin_id` that did not open) opens: then that
/// key is the right one, and the row that did not open is itself bad. None to try means not shown (logged: the key
/// is then the suspect).
pub(crate) fn key_is_shown_right(others: &[PinRow], cipher: &crypto::PinCipher, pin_id: i64, key_id: i64) -> bool {
    let shown = others.iter().any(|r| cipher.open_row(&r.sealed, &r.ad()).is_ok());
    if !shown {
        tracing::error!(
            pin_id,
            key_id,
            "PIN does not open, nor do other PINs of its key: wrong key? not quarantined"
        );
    }
    shown
}

/// Checks that `row` (PIN `row.id`, in `state`) may go back from quarantine: it is quarantined, and opens now.
pub(crate) fn check_returnable(
    row: Option<(PinRow, String)>,
    pin_id: i64,
    cipher: &crypto::PinCipher,
) -> Result<(), StoreError> {
    let Some((row, state)) = row else {
        return Err(StoreError::BadRequest(format!("no PIN with id {pin_id}")));
    };
    if state != PinState::Quarantined.as_str() {
        return Err(StoreError::BadRequest(format!(
            "PIN {pin_id} is {state}, not quarantined"
        )));
    }
    row.open(cipher).map(|_| ())
}

/// Refuses an operator's quarantine of a PIN that is missing or not available (`state` as read in the transaction).
pub(crate) fn check_quarantinable(state: Option<String>, pin_id: i64) -> Result<(), StoreError> {
    match state {
        None => Err(StoreError::BadRequest(format!("no PIN with id {pin_id}"))),
        Some(s) if s == PinState::Available.as_str() => Ok(()),
        Some(s) if s == PinState::Reserved.as_str() => Err(StoreError::BadRequest(format!(
            "PIN {pin_id} is reserved by a gateway: it must be released or sold first"
        ))),
        Some(s) => Err(StoreError::BadRequest(format!("PIN {pin_id} is {s}, not available"))),
    }
}

/// Whether a repeat of a recorded sale gets its PIN again (both backends): the same product, amount and merchant
/// (else [`StoreError::DuplicateMismatch`]), not reversed ([`StoreError::AlreadyReversed`]: a voided PIN is never
/// handed out again), and sold at or after `req.repeat_since` ([`StoreError::RepeatExpired`]: a receipt's STAN and
/// time, or a capture replayed a month later, gives back nothing). The key holds the terminal id, so only the
/// terminal that made the sale can name it.
pub(crate) fn check_repeat(
    req: &SellRequest,
    (product, amount, merchant): (&str, i64, &str),
    state: PinState,
    sold_at: i64,
) -> Result<(), StoreError> {
    let key = || req.sale.key();
    if product != req.product || amount != req.amount || merchant != req.sale.merchant_id {
        return Err(StoreError::DuplicateMismatch { key: key() });
    }
    if state == PinState::Voided {
        return Err(StoreError::AlreadyReversed { key: key() });
    }
    if sold_at < req.repeat_since {
        return Err(StoreError::RepeatExpired { key: key() });
    }
    Ok(())
}

/// Logs a refused confirm once, when it is recorded (repeats of that confirm find the record and log nothing).
pub(crate) fn log_conflict(pin_id: i64, gateway: &str, reason: &str, voided: bool) {
    tracing::error!(
        pin_id,
        gateway,
        reason,
        voided,
        "a cached sale cannot be confirmed: conflict recorded for the operator (pingate pins conflicts)"
    );
}

/// Logs a quarantine (the serial names the row; the PIN is never shown).
pub(crate) fn log_quarantined(pin_id: i64, serial: &str) {
    tracing::error!(
        pin_id,
        serial,
        "PIN does not open though its key opens others (tampered or damaged row): quarantined"
    );
}

/// Most rows one operation may quarantine before it gives up (many bad rows at once is a damaged database, not a
/// tampered PIN: the operation then fails, and the operator looks). PostgreSQL runs a batch again whole after each
/// quarantine, so there the cap is per batch; the next batch goes on from where this one stopped.
pub(crate) const MAX_QUARANTINE_PER_OP: usize = 8;

/// Schema version 5, the same on both backends but for the id column's type (`id_column`): what a refused confirm left (see
/// [`Confirmation::Conflict`]), each re-delivery of a sold PIN to a repeat, and what a remembered reversal named.
pub(crate) fn schema_v5_tables(id_column: &str) -> String {
    format!(
        "
CREATE TABLE confirm_conflicts (
    id {id_column},
    pin_id BIGINT NOT NULL,
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission TEXT NOT NULL,
    merchant_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    voided BOOLEAN NOT NULL,
    at BIGINT NOT NULL,
    resolved_at BIGINT,
    resolution TEXT
);
CREATE TABLE redeliveries (
    pin_id BIGINT NOT NULL,
    gateway TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX redeliveries_pin ON redeliveries(pin_id);
"
    )
}

/// Records a refused confirm: `$1` PIN, `$2` gateway, `$3` terminal, `$4` STAN, `$5` transmission, `$6` merchant,
/// `$7` reason, `$8` voided, `$9` time.
pub(crate) const INSERT_CONFLICT: &str = "INSERT INTO confirm_conflicts (pin_id, gateway, terminal_id, stan, \
     transmission, merchant_id, reason, voided, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Voids the PIN of a refused confirm if the gateway (`$2`) still holds it reserved (`$1` its id).
pub(crate) const VOID_RESERVED: &str =
    "UPDATE pins SET state = 'voided', lease_until = NULL WHERE id = $1 AND state = 'reserved' AND holder = $2";

/// Records a re-delivery: `$1` PIN, `$2` gateway, `$3` terminal, `$4` time.
pub(crate) const INSERT_REDELIVERY: &str =
    "INSERT INTO redeliveries (pin_id, gateway, terminal_id, at) VALUES ($1, $2, $3, $4)";

/// Why a reversal is made, when it was asked for, and the server's reversal window (issue 20, §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReversePolicy {
    /// Stored with the reversal (`reversals.reason`); only a `terminal` reversal is held to the window.
    pub reason: crate::sale::ReversalReason,
    /// When the gateway took the terminal's reversal (seconds since the epoch; `None`: now). Never later than now.
    pub requested_at: Option<i64>,
    /// The server's reversal window in seconds (`pingate server --reversal-window-secs`); `None`: none.
    pub window_secs: Option<i64>,
}

impl ReversePolicy {
    /// Whether this reversal of a sale made at `sold_at` comes too late (both backends), judged at `now`: a
    /// terminal's reversal asked for more than the window after the sale.
    pub(crate) fn too_late(&self, sold_at: i64, now: i64) -> bool {
        let Some(window) = self.window_secs else {
            return false;
        };
        let asked = self.requested_at.map_or(now, |t| t.min(now));
        self.reason.is_terminal() && asked.saturating_sub(sold_at) > window
    }

    /// The reason as stored: `NULL` for a terminal's (as in rows written before the column existed).
    pub(crate) fn stored_reason(&self) -> Option<&'static str> {
        (!self.reason.is_terminal()).then(|| self.reason.as_str())
    }
}

/// Both backends' schema 8: merchants' limits across every gateway and server (value per UTC day, by currency), and
/// what was granted of them each day (allowances: gateways sell from them).
pub(crate) const LIMITS_V8: &str = "
CREATE TABLE merchant_limits (
    merchant_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    value_per_day BIGINT NOT NULL CHECK (value_per_day >= 0),
    PRIMARY KEY (merchant_id, currency)
);
CREATE TABLE merchant_allowances (
    merchant_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    day BIGINT NOT NULL,
    granted BIGINT NOT NULL CHECK (granted >= 0),
    PRIMARY KEY (merchant_id, currency, day)
);
";

/// Both backends' schema 9: merchants' sales per minute across every gateway and server, and what was granted of
/// them (sales allowances) by minute. Minutes are fixed windows of the server's clock (`unix / 60`); a merchant's
/// rows of minutes before the last are deleted as its next grant is made, so the table holds at most two rows per
/// merchant.
pub(crate) const RATES_V9: &str = "
CREATE TABLE merchant_rate_limits (
    merchant_id TEXT NOT NULL PRIMARY KEY,
    sales_per_minute BIGINT NOT NULL CHECK (sales_per_minute >= 0)
);
CREATE TABLE merchant_sales_allowances (
    merchant_id TEXT NOT NULL,
    minute BIGINT NOT NULL,
    granted BIGINT NOT NULL CHECK (granted >= 0),
    PRIMARY KEY (merchant_id, minute)
);
";

/// What of a merchant's limit to grant: at most `want`, never past the limit (`None`: no limit, all of it).
pub(crate) fn grant_allowance(limit: Option<i64>, granted_today: i64, want: i64) -> i64 {
    match limit {
        None => want.max(0),
        Some(l) => want.max(0).min((l - granted_today).max(0)),
    }
}

/// A merchant's limit and what was granted of it today, for `pingate limits show`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LimitRow {
    pub merchant_id: String,
    pub currency: String,
    pub value_per_day: i64,
    pub granted_today: i64,
}

/// Both backends: every limit with today's (`$1`) grants.
pub(crate) const LIST_LIMITS: &str = "SELECT l.merchant_id, l.currency, l.value_per_day, COALESCE(a.granted, 0) \
     FROM merchant_limits l LEFT JOIN merchant_allowances a \
     ON a.merchant_id = l.merchant_id AND a.currency = l.currency AND a.day = $1 ORDER BY l.merchant_id, l.currency";

/// A merchant's sales per minute and what was granted of it in the current minute, for `pingate limits show`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RateRow {
    pub merchant_id: String,
    pub sales_per_minute: i64,
    pub granted_this_minute: i64,
}

/// Both backends: every sales-per-minute limit with minute `$1`'s grants.
pub(crate) const LIST_RATE_LIMITS: &str = "SELECT l.merchant_id, l.sales_per_minute, COALESCE(a.granted, 0) \
     FROM merchant_rate_limits l LEFT JOIN merchant_sales_allowances a \
     ON a.merchant_id = l.merchant_id AND a.minute = $1 ORDER BY l.merchant_id";

/// A voided PIN as `pingate pins voided` lists it for the supplier's deactivation: no PIN value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VoidedRow {
    pub pin_id: i64,
    pub serial: String,
    pub product: String,
    pub amount: i64,
    /// ISO 4217 numeric, from the product (empty if the product is gone).
    pub currency: String,
    /// When the reversal was recorded (seconds since the epoch).
    pub reversed_at: i64,
    pub gateway: String,
    pub terminal_id: String,
    pub merchant_id: String,
    /// `terminal`, `undelivered` or `unacknowledged` (see [`crate::sale::ReversalReason`]).
    pub reason: String,
}

/// Both backends: PINs voided by a reversal recorded at or after `$1`, oldest first; with `$2` false, those whose
/// answer was sent but never acknowledged (the terminal may have printed them) are left out.
pub(crate) const LIST_VOIDED: &str = "SELECT p.id, p.serial, s.product, s.amount, COALESCE(pr.currency, ''), v.at, \
     s.gateway, s.terminal_id, s.merchant_id, COALESCE(v.reason, 'terminal') \
     FROM reversals v JOIN pins p ON p.id = v.pin_id JOIN sales s ON s.pin_id = v.pin_id \
     LEFT JOIN products pr ON pr.code = s.product \
     WHERE p.state = 'voided' AND v.at >= $1 AND ($2 OR v.reason IS NULL OR v.reason <> 'unacknowledged') \
     ORDER BY v.at, p.id";

/// A refused confirm as `confirm_conflicts` keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictRow {
    pub id: i64,
    pub pin_id: i64,
    pub gateway: String,
    pub terminal_id: String,
    pub stan: String,
    pub transmission: String,
    pub merchant_id: String,
    pub reason: String,
    pub voided: bool,
    pub at: i64,
    /// What the operator did about it; `None` while it is open.
    pub resolution: Option<String>,
}

/// Both backends: every conflict, open ones first.
pub(crate) const LIST_CONFLICTS: &str = "SELECT id, pin_id, gateway, terminal_id, stan, transmission, merchant_id, \
     reason, voided, at, resolution FROM confirm_conflicts ORDER BY resolved_at IS NOT NULL, id";

/// Both backends: closes conflict `$3` with note `$1` at `$2`, if it is open.
pub(crate) const RESOLVE_CONFLICT: &str =
    "UPDATE confirm_conflicts SET resolution = $1, resolved_at = $2 WHERE id = $3 AND resolved_at IS NULL";

/// Refuses to resolve a conflict that is not open (`changed` rows were closed).
pub(crate) fn check_resolved(changed: u64, id: i64) -> Result<(), StoreError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::BadRequest(format!("no open conflict with id {id}")))
    }
}

/// Why a confirm was refused for good, as `confirm_conflicts.reason` says it.
pub(crate) const CONFLICT_KEY_SOLD: &str = "key already sold with another PIN";

/// Most PINs one `reserve` hands out.
pub const MAX_RESERVE: usize = 1_000;

/// One operation on the inventory. `holder`/`gateway` always come from the authenticated connection, never from
/// what a client wrote.
#[derive(Clone, Debug)]
pub enum Op {
    Sell(SellRequest),
    Reserve {
        holder: String,
        product: String,
        amount: i64,
        count: usize,
        lease_until: i64,
    },
    Confirm {
        holder: String,
        pin_id: i64,
        sale: SaleContext,
    },
    Release {
        holder: String,
        pin_ids: Vec<i64>,
    },
    Renew {
        holder: String,
        pin_ids: Vec<i64>,
        lease_until: i64,
    },
    /// Reverse the sale with this key; `content` (absent only in reversals journaled by older gateways) must match
    /// the sale's, or it is [`StoreError::ReversalMismatch`].
    Reverse {
        sale: SaleContext,
        content: Option<SaleContent>,
        policy: ReversePolicy,
    },
    /// Reverse the sale of one PIN, by id; only the gateway that sold it may.
    ReversePin {
        gateway: String,
        pin_id: i64,
    },
    Stock,
    Catalog,
    /// How the sale with this key stands ([`SaleState`]), changing nothing.
    CheckSale {
        sale: SaleContext,
    },
    /// Every merchant's limits with what was granted of them on UTC day `day` and in minute `minute` (the metrics).
    Limits {
        day: i64,
        minute: i64,
    },
    /// The ids of the PINs reserved to `holder` (for a gateway to reconcile its journal at start).
    Held {
        holder: String,
    },
    /// Available PINs whose expiry date (`YYYYMMDD`) is before the batch's day become expired.
    Expire,
    /// A slice of a merchant's value per day in a currency for a gateway to sell from ([`grant_allowance`]).
    Allowance {
        merchant_id: String,
        currency: String,
        want: i64,
    },
    /// A slice (`want` sales) of a merchant's sales per minute for a gateway to sell from ([`grant_allowance`]).
    /// `minute` (`unix / 60`) is the server's, set by the handler from its clock, never by the gateway.
    SalesAllowance {
        merchant_id: String,
        minute: i64,
        want: i64,
    },
}

/// How the sale with a key stands ([`Op::CheckSale`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaleState {
    /// Recorded, its PIN not voided.
    Sold,
    /// Its PIN voided, or a reversal of the key remembered before any sale.
    Reversed,
    /// Neither a sale nor a reversal with the key is recorded.
    Unknown,
}

/// [`SaleState`] from what a backend found: the key's sale and its PIN's state, and whether a reversal of the key
/// is recorded (both backends).
pub(crate) fn sale_state(found: Option<PinState>, reversal_recorded: bool) -> SaleState {
    match found {
        Some(PinState::Voided) => SaleState::Reversed,
        Some(_) => SaleState::Sold,
        None if reversal_recorded => SaleState::Reversed,
        None => SaleState::Unknown,
    }
}

/// The result of an [`Op`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sold(Dispensed),
    Reserved(Vec<Dispensed>),
    Confirmed(Confirmation),
    /// Ids that were not reserved by the caller and were left alone.
    Released {
        refused: Vec<i64>,
    },
    Renewed(usize),
    Reversed(Reversal),
    Stock(Vec<StockRow>),
    Catalog(Vec<Product>),
    Held(Vec<i64>),
    SaleState(SaleState),
    Limits(Vec<LimitRow>, Vec<RateRow>),
    /// How many PINs expired.
    Expired(u64),
    /// Value granted (at most what was asked); `limited`: the merchant has a limit in that currency.
    Allowance {
        granted: i64,
        limited: bool,
    },
}

/// The answer to every operation of a batch that failed as a whole (a database error: nothing of it was kept).
pub(crate) fn failed_batch(n: usize, msg: &str) -> Vec<Result<Outcome, StoreError>> {
    (0..n).map(|_| Err(StoreError::Db(msg.to_string()))).collect()
}

/// Count of PINs of one product, amount and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockRow {
    pub product: String,
    pub amount: i64,
    pub state: PinState,
    pub count: i64,
}
