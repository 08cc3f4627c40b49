//! PIN values at rest, wherever they rest: the PIN server's inventory rows ([`crate::store`]) and the gateway's
//! journal ([`crate::gateway`]) seal them here, `pingate certs` ([`crate::tls`]) makes key files with
//! [`PinCipher::generate_spec`], and the audit opens journals. It is crate-level, not the store's, so that a gateway
//! depends on no part of the PIN server.
//!
//! Sealed with ChaCha20-Poly1305 under a key that lives outside the database (a file or an environment variable),
//! with the key id stored per row so keys can rotate. A PIN row's seal is bound to the row
//! ([`RowAd`]: its id, product, amount, serial and key id are the associated data), so a ciphertext copied onto
//! another row, or a row moved to another product or amount, does not open. A keyed fingerprint (HMAC-SHA256) of
//! the PIN lets the store reject a duplicate PIN on import without ever decrypting.
//!
//! Key material is zeroized when dropped: the AEAD keys (RustCrypto's ChaCha20-Poly1305, built with `zeroize`),
//! the fingerprint key's HMAC state, the raw keys while they are parsed, and every PIN opened (a [`Pin`]).

use std::collections::HashMap;
use std::fmt;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use hmac::{Hmac, Mac};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::sale::Pin;

/// Bytes of a nonce (96 bits, RFC 8439).
pub const NONCE_LEN: usize = 12;

/// Bytes of the tag after each ciphertext.
const TAG_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Errors of PIN encryption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A key is not 64 hex characters (32 bytes).
    #[error("key {id}: expected 64 hex characters (32 bytes)")]
    BadKey { id: u32 },
    /// A row was sealed under a key id this process was not given.
    #[error("no key with id {id} is loaded (rows sealed under it cannot be opened)")]
    UnknownKey { id: u32 },
    /// Available PINs are sealed under keys this process was not given: they could never be sold, and each would
    /// be refused at its turn. Found when a store is opened to serve.
    #[error(
        "available PINs are sealed under keys that are not loaded ({missing}): add those keys to the PIN keys, or \
         take a damaged row out of sale with `pingate pins quarantine --id N`"
    )]
    KeysMissing { missing: String },
    /// The ciphertext does not open: wrong key, or the row was tampered with.
    #[error("PIN of serial {serial} does not decrypt: wrong key or tampered row")]
    Open { serial: String },
    /// A loaded key opens none of the PINs sealed under it that may still be opened: the wrong key was given.
    /// Found by schema migration 6, which seals every PIN again.
    #[error(
        "key {id} opens none of the {pins} PINs sealed under it (available, reserved or sold): wrong key? Schema \
         migration 6 seals every PIN again and needs the keys that sealed them; a damaged row can be taken out of \
         sale first with `pingate pins quarantine --id N`"
    )]
    OpensNone { id: u32, pins: i64 },
    /// The system random source failed.
    #[error("system random source failed")]
    Random,
    /// Where the keys come from could not be read.
    #[error("PIN keys: {0}")]
    Source(String),
}

impl CryptoError {
    /// Refuses, with [`CryptoError::KeysMissing`], when any key is missing: `(key id, available PINs, their ids)`;
    /// the ids are named when there are at most [`NAMED_ROWS`] (a damaged row or two, not a key left out), so the
    /// operator can quarantine them.
    pub fn check_missing(missing: &[(u32, i64, Vec<i64>)]) -> Result<(), CryptoError> {
        if missing.is_empty() {
            return Ok(());
        }
        let one = |(key, n, ids): &(u32, i64, Vec<i64>)| {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            match ids.len() {
                0 => format!("key {key}: {n} PINs"),
                1 => format!("key {key}: 1 PIN, id {}", ids[0]),
                _ => format!("key {key}: {n} PINs, ids {}", ids.join(" ")),
            }
        };
        Err(CryptoError::KeysMissing {
            missing: missing.iter().map(one).collect::<Vec<_>>().join("; "),
        })
    }
}

/// Most rows of a missing key named one by one in [`CryptoError::KeysMissing`].
pub const NAMED_ROWS: i64 = 8;

/// A sealed PIN as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: u32,
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed(key {}, {} bytes)", self.key_id, self.ciphertext.len())
    }
}

/// What a PIN row's seal is bound to (the associated data since schema version 6): the ciphertext opens only on the
/// row it was sealed for. The key id is bound too (see [`RowAd::bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowAd<'a> {
    pub id: i64,
    pub product: &'a str,
    pub amount: i64,
    pub serial: &'a str,
}

impl RowAd<'_> {
    /// The associated data under key `key_id`: a label, then each part at a fixed length or length-prefixed, so no
    /// two rows give the same bytes.
    fn bytes(&self, key_id: u32) -> Vec<u8> {
        const LABEL: &[u8] = b"pingate pin row\0";
        let mut ad = Vec::with_capacity(LABEL.len() + 28 + self.product.len() + self.serial.len());
        ad.extend_from_slice(LABEL);
        ad.extend_from_slice(&self.id.to_be_bytes());
        ad.extend_from_slice(&(self.product.len() as u32).to_be_bytes());
        ad.extend_from_slice(self.product.as_bytes());
        ad.extend_from_slice(&self.amount.to_be_bytes());
        ad.extend_from_slice(&(self.serial.len() as u32).to_be_bytes());
        ad.extend_from_slice(self.serial.as_bytes());
        ad.extend_from_slice(&key_id.to_be_bytes());
        ad
    }
}

/// The keys of this process: one current key to seal with, any number of older ones to open with. Every key is
/// zeroized when the cipher is dropped.
pub struct PinCipher {
    current: u32,
    keys: HashMap<u32, ChaCha20Poly1305>,
    /// HMAC-SHA256 keyed with the fingerprint key, cloned for each fingerprint.
    fingerprint: HmacSha256,
    /// Nonces: a ChaCha12 generator seeded from the system's random source when the keys are loaded (a system
    /// call per seal cost more than the seal; a gateway seals one per PIN it caches).
    nonces: std::sync::Mutex<rand::rngs::StdRng>,
}

/// A generator for nonces, seeded from the system's random source.
fn nonce_source() -> Result<std::sync::Mutex<rand::rngs::StdRng>, CryptoError> {
    use rand::SeedableRng;
    let mut seed = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(&mut seed[..])
        .map_err(|_| CryptoError::Random)?;
    Ok(std::sync::Mutex::new(rand::rngs::StdRng::from_seed(*seed)))
}

impl fmt::Debug for PinCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinCipher(current key {}, {} keys)", self.current, self.keys.len())
    }
}

impl PinCipher {
    /// Keys as `id:hex` entries separated by commas or whitespace, e.g. `1:00ff…,2:a1b2…`. The highest id seals new
    /// PINs. The fingerprint key is derived from the lowest id, so fingerprints stay stable across rotations (a
    /// rotation adds keys; it never removes the first one while rows use it).
    pub fn from_spec(spec: &str) -> Result<PinCipher, CryptoError> {
        let mut raw: Vec<(u32, Zeroizing<Vec<u8>>)> = Vec::new();
        for entry in spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
        {
            let (id, hex) = entry
                .split_once(':')
                .ok_or_else(|| CryptoError::Source("each key is written `id:64-hex-characters`".into()))?;
            let id: u32 = id
                .parse()
                .map_err(|_| CryptoError::Source(format!("key id `{id}` is not a number")))?;
            let bytes = Zeroizing::new(crate::iso8583::from_hex(hex).map_err(|_| CryptoError::BadKey { id })?);
            if bytes.len() != 32 {
                return Err(CryptoError::BadKey { id });
            }
            raw.push((id, bytes));
        }
        let Some(current) = raw.iter().map(|(id, _)| *id).max() else {
            return Err(CryptoError::Source("no key given".into()));
        };
        let first = raw.iter().min_by_key(|(id, _)| *id).expect("not empty");
        // The fingerprint key is a separate key derived from the first data key (HMAC with a fixed label).
        let mut derive = HmacSha256::new_from_slice(&first.1).map_err(|_| CryptoError::BadKey { id: first.0 })?;
        derive.update(b"pingate pin fingerprint v1");
        let derived = derive.finalize().into_bytes();
        let fingerprint = HmacSha256::new_from_slice(&derived).map_err(|_| CryptoError::BadKey { id: first.0 })?;
        let mut keys = HashMap::new();
        for (id, bytes) in raw {
            let k = ChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| CryptoError::BadKey { id })?;
            keys.insert(id, k);
        }
        Ok(PinCipher {
            current,
            keys,
            fingerprint,
            nonces: nonce_source()?,
        })
    }

    /// No key at all: for the operator commands that never open or seal a PIN (stock, products, leases). Sealing
    /// fails and no row opens; a store opened with it never runs a migration that needs the keys.
    pub fn without_keys() -> PinCipher {
        let mut k = Zeroizing::new([0u8; 32]);
        let _ = SystemRandom::new().fill(&mut k[..]);
        PinCipher {
            current: 0,
            keys: HashMap::new(),
            fingerprint: HmacSha256::new_from_slice(&k[..]).expect("HMAC takes any key length"),
            nonces: nonce_source().unwrap_or_else(|_| {
                // No random source at all: this cipher never seals (it has no key), so any seed will do.
                std::sync::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::from_seed([0; 32]))
            }),
        }
    }

    /// Whether any key is loaded (see [`PinCipher::without_keys`]).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Keys from `$PINGATE_PIN_KEYS`, else from the file named by `$PINGATE_PIN_KEY_FILE`.
    pub fn from_env() -> Result<PinCipher, CryptoError> {
        if let Ok(spec) = std::env::var("PINGATE_PIN_KEYS") {
            return PinCipher::from_spec(&spec);
        }
        let path = std::env::var("PINGATE_PIN_KEY_FILE")
            .map_err(|_| CryptoError::Source("set PINGATE_PIN_KEYS or PINGATE_PIN_KEY_FILE".into()))?;
        let text = crate::keyfile::read_to_string(std::path::Path::new(&path))
            .map_err(|e| CryptoError::Source(e.to_string()))?;
        PinCipher::from_spec(&text)
    }

    /// A new random key spec (`1:<64 hex>`), for `certs init`, demos and tests.
    pub fn generate_spec() -> Result<String, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        SystemRandom::new().fill(&mut k[..]).map_err(|_| CryptoError::Random)?;
        let hex = Zeroizing::new(crate::iso8583::to_hex(&k[..]));
        Ok(format!("1:{}", hex.as_str()))
    }

    /// Those of `(key id, unsold PINs)` that name a key this cipher does not hold.
    pub fn missing_keys(&self, in_use: &[(u32, i64)]) -> Vec<(u32, i64)> {
        in_use
            .iter()
            .copied()
            .filter(|(id, _)| !self.keys.contains_key(id))
            .collect()
    }

    /// The id new PINs are sealed under.
    pub fn current_key(&self) -> u32 {
        self.current
    }

    /// Whether key `id` is loaded.
    pub fn has_key(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    /// Seals `pin` for the row `row` under the current key.
    pub fn seal_row(&self, pin: &Pin, row: &RowAd<'_>) -> Result<Sealed, CryptoError> {
        self.seal_with(self.current, pin, &row.bytes(self.current))
    }

    /// Opens the PIN sealed for the row `row`; any other row's seal, or this row's moved, does not open.
    pub fn open_row(&self, sealed: &Sealed, row: &RowAd<'_>) -> Result<Pin, CryptoError> {
        self.open_with(sealed, &row.bytes(sealed.key_id), row.serial)
    }

    /// Seals `pin` under the current key, bound to `serial` alone: the gateway's journal (and PIN rows before schema
    /// version 6).
    pub fn seal(&self, pin: &Pin, serial: &str) -> Result<Sealed, CryptoError> {
        self.seal_with(self.current, pin, serial.as_bytes())
    }

    /// Opens what [`PinCipher::seal`] sealed for `serial`.
    pub fn open(&self, sealed: &Sealed, serial: &str) -> Result<Pin, CryptoError> {
        self.open_with(sealed, serial.as_bytes(), serial)
    }

    /// A row's seal of schema version 5 and before (bound to its serial) sealed again bound to the row, under the
    /// same key id and a new nonce: schema migration 6. The PIN never leaves this function.
    pub fn reseal_row(&self, sealed: &Sealed, row: &RowAd<'_>) -> Result<Sealed, CryptoError> {
        let pin = self.open(sealed, row.serial)?;
        self.seal_with(sealed.key_id, &pin, &row.bytes(sealed.key_id))
    }

    /// ChaCha20-Poly1305 (RFC 8439): the ciphertext, then the 16-byte tag.
    fn seal_with(&self, key_id: u32, pin: &Pin, ad: &[u8]) -> Result<Sealed, CryptoError> {
        let key = self.keys.get(&key_id).ok_or(CryptoError::UnknownKey { id: key_id })?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::Rng::fill_bytes(&mut *self.nonces.lock().map_err(|_| CryptoError::Random)?, &mut nonce);
        // Room for the tag from the start: the buffer is never moved while it holds the PIN in clear.
        let mut data = Vec::with_capacity(pin.expose().len() + TAG_LEN);
        data.extend_from_slice(pin.expose().as_bytes());
        let tag = match key.encrypt_inout_detached(&Nonce::from(nonce), ad, data.as_mut_slice().into()) {
            Ok(tag) => tag,
            Err(_) => {
                data.zeroize();
                return Err(CryptoError::Random);
            }
        };
        data.extend_from_slice(&tag);
        Ok(Sealed {
            key_id,
            nonce,
            ciphertext: data,
        })
    }

    fn open_with(&self, sealed: &Sealed, ad: &[u8], serial: &str) -> Result<Pin, CryptoError> {
        let key = self
            .keys
            .get(&sealed.key_id)
            .ok_or(CryptoError::UnknownKey { id: sealed.key_id })?;
        let refused = || CryptoError::Open {
            serial: serial.to_string(),
        };
        let at = sealed.ciphertext.len().checked_sub(TAG_LEN).ok_or_else(refused)?;
        let (body, tag) = sealed.ciphertext.split_at(at);
        let tag = Tag::try_from(tag).map_err(|_| refused())?;
        // The tag is checked before anything is decrypted: on a refusal the buffer never held the PIN.
        let mut data = body.to_vec();
        key.decrypt_inout_detached(&Nonce::from(sealed.nonce), ad, data.as_mut_slice().into(), &tag)
            .map_err(|_| refused())?;
        match String::from_utf8(data) {
            Ok(text) => Ok(Pin::new(text)),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(refused())
            }
        }
    }

    /// Keyed fingerprint of a PIN value: equal PINs of a product give equal fingerprints; nobody without the key
    /// can test a guess against it.
    pub fn fingerprint(&self, product: &str, pin: &Pin) -> Vec<u8> {
        let mut mac = self.fingerprint.clone();
        mac.update(product.as_bytes());
        mac.update(&[0]);
        mac.update(pin.expose().as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nonces come from a generator seeded per cipher: never the same twice, in one cipher or across two loaded
    /// with the same keys (two gateways, or one restarted, sealing under one key).
    #[test]
    fn nonces_never_repeat_within_or_across_ciphers() {
        let spec = PinCipher::generate_spec().unwrap();
        let (a, b) = (
            PinCipher::from_spec(&spec).unwrap(),
            PinCipher::from_spec(&spec).unwrap(),
        );
        let pin = Pin::new("1234567890123456");
        let mut seen = std::collections::HashSet::new();
        for c in [&a, &b] {
            for _ in 0..1000 {
                let s = c.seal(&pin, "SER1").unwrap();
                assert!(seen.insert(s.nonce), "a nonce came twice");
                assert_eq!(c.open(&s, "SER1").unwrap().expose(), pin.expose());
            }
        }
    }

    #[test]
    fn seal_open_rotate_and_tamper() {
        let k1 = PinCipher::generate_spec().unwrap();
        let old = PinCipher::from_spec(&k1).unwrap();
        let sealed = old.seal(&Pin::new("123456789012"), "SER1").unwrap();
        assert_eq!(old.open(&sealed, "SER1").unwrap().expose(), "123456789012");
        assert!(!sealed.ciphertext.windows(12).any(|w| w == b"123456789012"));
        // Another serial (a row swap) does not open.
        assert_eq!(
            old.open(&sealed, "SER2"),
            Err(CryptoError::Open { serial: "SER2".into() })
        );
        // Rotation: key 2 seals, key 1 still opens old rows, fingerprints are stable.
        let k2 = PinCipher::generate_spec().unwrap().replacen("1:", "2:", 1);
        let both = PinCipher::from_spec(&format!("{k1},{k2}")).unwrap();
        assert_eq!(both.current_key(), 2);
        assert_eq!(both.open(&sealed, "SER1").unwrap().expose(), "123456789012");
        assert_eq!(both.seal(&Pin::new("1"), "S").unwrap().key_id, 2);
        assert_eq!(
            both.fingerprint("P", &Pin::new("1")),
            old.fingerprint("P", &Pin::new("1"))
        );
        assert_ne!(
            old.fingerprint("P", &Pin::new("1")),
            old.fingerprint("Q", &Pin::new("1"))
        );
        let only2 = PinCipher::from_spec(&k2).unwrap();
        assert_eq!(only2.open(&sealed, "SER1"), Err(CryptoError::UnknownKey { id: 1 }));
        assert!(matches!(
            PinCipher::from_spec("1:abcd"),
            Err(CryptoError::BadKey { id: 1 })
        ));
        assert!(format!("{sealed:?} {both:?}").len() < 80);
    }

    /// What was sealed and fingerprinted before keys were zeroized (ring's ChaCha20-Poly1305 and HMAC-SHA256)
    /// still opens and compares equal: the same algorithms, byte for byte.
    #[test]
    fn seals_and_fingerprints_are_those_of_ring() {
        use ring::aead::{Aad, LessSafeKey, Nonce as RingNonce, UnboundKey, CHACHA20_POLY1305};
        let spec = PinCipher::generate_spec().unwrap();
        let raw = crate::iso8583::from_hex(&spec[2..]).unwrap();
        let c = PinCipher::from_spec(&spec).unwrap();
        let ring_key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &raw).unwrap());
        let nonce = [7u8; NONCE_LEN];
        let mut data = b"123456789012".to_vec();
        ring_key
            .seal_in_place_append_tag(RingNonce::assume_unique_for_key(nonce), Aad::from(b"SER1"), &mut data)
            .unwrap();
        let sealed = Sealed {
            key_id: 1,
            nonce,
            ciphertext: data,
        };
        assert_eq!(c.open(&sealed, "SER1").unwrap().expose(), "123456789012");
        let mine = c.seal(&Pin::new("123456789012"), "SER1").unwrap();
        let mut back = mine.ciphertext.clone();
        let plain = ring_key
            .open_in_place(
                RingNonce::assume_unique_for_key(mine.nonce),
                Aad::from(b"SER1"),
                &mut back,
            )
            .unwrap();
        assert_eq!(plain, b"123456789012");
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw),
            b"pingate pin fingerprint v1",
        );
        let expected = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            b"TOPUP\x00123456789012",
        );
        assert_eq!(c.fingerprint("TOPUP", &Pin::new("123456789012")), expected.as_ref());
        // A short or altered ciphertext is refused, never a panic.
        for bad in [vec![], vec![0; 15], mine.ciphertext[1..].to_vec()] {
            let s = Sealed {
                ciphertext: bad,
                ..mine.clone()
            };
            assert!(matches!(c.open(&s, "SER1"), Err(CryptoError::Open { .. })));
        }
    }

    /// Keys and PINs held in memory are zeroized when dropped (the types say so; the crates do it).
    #[test]
    fn keys_and_pins_are_zeroized_on_drop() {
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroized_on_drop::<ChaCha20Poly1305>();
        zeroized_on_drop::<Pin>();
        zeroized_on_drop::<crate::keyfile::Secret>();
        zeroized_on_drop::<Zeroizing<Vec<u8>>>();
    }

    #[test]
    fn a_row_seal_opens_on_its_own_row_only() {
        let k1 = PinCipher::generate_spec().unwrap();
        let k2 = PinCipher::generate_spec().unwrap().replacen("1:", "2:", 1);
        let c = PinCipher::from_spec(&format!("{k1},{k2}")).unwrap();
        let pin = Pin::new("123456789012");
        let row = RowAd {
            id: 7,
            product: "TOPUP",
            amount: 1000,
            serial: "SER1",
        };
        let sealed = c.seal_row(&pin, &row).unwrap();
        assert_eq!(sealed.key_id, 2);
        assert_eq!(c.open_row(&sealed, &row).unwrap(), pin);
        let others = [
            RowAd { id: 8, ..row },
            RowAd { product: "GIFT", ..row },
            RowAd { amount: 2000, ..row },
            RowAd { serial: "SER2", ..row },
            // Lengths are part of the data: moving a character from the product to the serial is another row.
            RowAd {
                product: "TOPU",
                serial: "PSER1",
                ..row
            },
        ];
        for other in others {
            assert!(
                matches!(c.open_row(&sealed, &other), Err(CryptoError::Open { .. })),
                "{other:?}"
            );
        }
        // The key id is bound: the same ciphertext under another loaded key id does not open.
        let relabelled = Sealed {
            key_id: 1,
            ..sealed.clone()
        };
        assert!(c.open_row(&relabelled, &row).is_err());
        // A seal bound to the serial alone (schema 4, the journal) opens with the serial, not as a row, and is
        // sealed again bound to the row under its own key id.
        let old = PinCipher::from_spec(&k1).unwrap().seal(&pin, "SER1").unwrap();
        assert!(c.open_row(&old, &row).is_err());
        let again = c.reseal_row(&old, &row).unwrap();
        assert_eq!((again.key_id, c.open_row(&again, &row).unwrap()), (1, pin));
        assert_ne!(again.nonce, old.nonce);
        let none = PinCipher::without_keys();
        assert!(!none.has_keys() && none.seal_row(&Pin::new("1234"), &row).is_err());
    }
}
