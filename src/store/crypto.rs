//! PIN values at rest: sealed with ChaCha20-Poly1305 under a key that lives outside the database (a file or an
//! environment variable), with the key id stored per row so keys can rotate. The serial number is the associated
//! data, so a ciphertext copied onto another row does not open. A keyed fingerprint (HMAC-SHA256) of the PIN lets
//! the store reject a duplicate PIN on import without ever decrypting.

use std::collections::HashMap;
use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::sale::Pin;

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

/// The keys of this process: one current key to seal with, any number of older ones to open with.
pub struct PinCipher {
    current: u32,
    keys: HashMap<u32, LessSafeKey>,
    fingerprint: hmac::Key,
    rng: SystemRandom,
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
        let mut raw: Vec<(u32, Vec<u8>)> = Vec::new();
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
            let bytes = crate::iso8583::from_hex(hex).map_err(|_| CryptoError::BadKey { id })?;
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
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &first.1),
            b"pingate pin fingerprint v1",
        );
        let fingerprint = hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref());
        let mut keys = HashMap::new();
        for (id, bytes) in raw {
            let k = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| CryptoError::BadKey { id })?;
            keys.insert(id, LessSafeKey::new(k));
        }
        Ok(PinCipher {
            current,
            keys,
            fingerprint,
            rng: SystemRandom::new(),
        })
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
        let mut k = [0u8; 32];
        SystemRandom::new().fill(&mut k).map_err(|_| CryptoError::Random)?;
        Ok(format!("1:{}", crate::iso8583::to_hex(&k)))
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

    pub fn seal(&self, pin: &Pin, serial: &str) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let key = &self.keys[&self.current];
        let mut data = pin.expose().as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(serial.as_bytes()),
            &mut data,
        )
        .map_err(|_| CryptoError::Random)?;
        Ok(Sealed {
            key_id: self.current,
            nonce,
            ciphertext: data,
        })
    }

    pub fn open(&self, sealed: &Sealed, serial: &str) -> Result<Pin, CryptoError> {
        let key = self
            .keys
            .get(&sealed.key_id)
            .ok_or(CryptoError::UnknownKey { id: sealed.key_id })?;
        let mut data = sealed.ciphertext.clone();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(sealed.nonce),
                Aad::from(serial.as_bytes()),
                &mut data,
            )
            .map_err(|_| CryptoError::Open {
                serial: serial.to_string(),
            })?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| CryptoError::Open {
            serial: serial.to_string(),
        })?;
        Ok(Pin::new(text))
    }

    /// Keyed fingerprint of a PIN value: equal PINs of a product give equal fingerprints; nobody without the key
    /// can test a guess against it.
    pub fn fingerprint(&self, product: &str, pin: &Pin) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.fingerprint);
        ctx.update(product.as_bytes());
        ctx.update(&[0]);
        ctx.update(pin.expose().as_bytes());
        ctx.sign().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
