//! The terminal key file: every terminal's MAC keys ([`crate::mac`]), sealed under a key-encrypting key (KEK), and
//! the operator commands on it (`pingate terminals key generate|import|rotate|show-kcv`).
//!
//! The KEK is a key file like the PIN keys and a gateway's journal key (`id:64-hex` entries, made by
//! `pingate certs key FILE`, mode 0600, read through [`crate::keyfile`]); the MAC keys are sealed with the same
//! cipher as PINs ([`crate::crypto::PinCipher`]: ChaCha20-Poly1305 with key ids, so the KEK can rotate too), each
//! bound to its terminal, key id and algorithm (the associated data), so a sealed key moved to another terminal or
//! relabelled does not open. A key is never in clear in the file nor in the gateway's TOML.
//!
//! The file is TOML, one `[[key]]` table per key of a terminal:
//!
//! ```toml
//! version = 1
//!
//! [[key]]
//! terminal = "TERM0001"
//! key_id = 2                  # per terminal, from 1; the highest one signs answers
//! algorithm = "retail-des"    # or "aes-cmac"
//! kcv = "08D7B4"              # key check value, see crate::mac
//! created = 1765000000        # seconds since the epoch
//! kek = 1                     # the KEK's key id it is sealed under
//! sealed = "…"                # nonce and ciphertext, hex
//! # valid_until = 1765259200  # an older key: verifies requests until then (set by `rotate`)
//! ```
//!
//! Several keys per terminal let a terminal be re-keyed without downtime: `rotate` adds a key (the new newest,
//! which signs answers from then on) and gives the keys before it a grace period during which a request MACed with
//! them still verifies, so the terminal can be loaded with its new key at any time in it. Keys whose grace ended are
//! dropped from the file by the next change.
//!
//! Written whole to a new file of mode 0600 then renamed over the old one: a crash leaves the old file or the new
//! one, never half of one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use zeroize::Zeroizing;

use crate::crypto::{PinCipher, Sealed, NONCE_LEN};
use crate::iso8583::{from_hex, to_hex, Dialect, Message};
use crate::keyfile::KeyFileError;
use crate::mac::{MacAlgorithm, MacError, MacKey, MacKeyError};
use crate::sale::Pin;

/// Format version of the file.
pub const VERSION: u32 = 1;

/// How long the keys before a rotation still verify requests, by default: 72 hours.
pub const DEFAULT_GRACE_SECS: u64 = 72 * 3600;

/// Longest terminal id (field 41 is 8 characters in ISO 8583:1987; some networks use up to 16).
pub const MAX_TERMINAL_ID: usize = 16;

/// What can go wrong with the terminal key file. No variant carries a key byte.
#[derive(Debug, thiserror::Error)]
pub enum TerminalKeyError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// The KEK could not be loaded.
    #[error("key-encrypting key: {0}")]
    Kek(String),
    /// A sealed key does not open: the wrong KEK, or the entry was altered.
    #[error("terminal {terminal} key {key_id}: does not open with the key-encrypting key (wrong KEK, or altered)")]
    Open { terminal: String, key_id: u32 },
    /// A sealed key opened to a key whose check value is not the one recorded beside it.
    #[error("terminal {terminal} key {key_id}: its key check value is not the one recorded (altered entry)")]
    KcvMismatch { terminal: String, key_id: u32 },
    #[error("terminal {terminal}: {source}")]
    Key { terminal: String, source: MacKeyError },
    /// An imported key's check value is not the one the operator expected.
    #[error("the key's check value is {found}, not {expected}: not the key meant (nothing was written)")]
    KcvExpected { expected: String, found: String },
    #[error("terminal {terminal} has keys already (key {newest}): `rotate` gives it a new one")]
    HasKeys { terminal: String, newest: u32 },
    #[error("terminal {terminal} has no key: `generate` or `import` gives it its first")]
    NoKeys { terminal: String },
    #[error("terminal {terminal}: a {found} key cannot follow its {was} keys (one algorithm per terminal)")]
    AlgorithmChange {
        terminal: String,
        was: MacAlgorithm,
        found: MacAlgorithm,
    },
    #[error("terminal id `{id}`: 1 to {MAX_TERMINAL_ID} printable ASCII characters")]
    BadTerminal { id: String },
    #[error("{}: terminal {terminal} key {key_id} is listed twice", path.display())]
    Duplicate {
        path: PathBuf,
        terminal: String,
        key_id: u32,
    },
}

/// One key of a terminal as the file holds it (sealed).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub terminal: String,
    pub key_id: u32,
    pub algorithm: MacAlgorithm,
    /// Key check value, 6 hex digits.
    pub kcv: String,
    pub created: i64,
    /// The KEK's key id.
    pub kek: u32,
    /// Nonce then ciphertext and tag, hex.
    pub sealed: String,
    /// Set on the keys before a rotation: requests MACed with it verify until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<i64>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Entry({} key {}, {}, KCV {})",
            self.terminal, self.key_id, self.algorithm, self.kcv
        )
    }
}

impl Entry {
    /// Whether it still verifies requests at `now`.
    pub fn valid_at(&self, now: i64) -> bool {
        self.valid_until.is_none_or(|t| now < t)
    }

    /// The associated data of its seal: what the key is bound to.
    fn ad(terminal: &str, key_id: u32, algorithm: MacAlgorithm) -> String {
        format!("pingate terminal mac key\0{terminal}\0{key_id}\0{algorithm}")
    }

    fn open(&self, kek: &PinCipher) -> Result<MacKey, TerminalKeyError> {
        let refused = || TerminalKeyError::Open {
            terminal: self.terminal.clone(),
            key_id: self.key_id,
        };
        let bytes = from_hex(&self.sealed).map_err(|_| refused())?;
        if bytes.len() <= NONCE_LEN {
            return Err(refused());
        }
        let sealed = Sealed {
            key_id: self.kek,
            nonce: bytes[..NONCE_LEN].try_into().expect("NONCE_LEN bytes"),
            ciphertext: bytes[NONCE_LEN..].to_vec(),
        };
        if !kek.has_key(self.kek) {
            return Err(TerminalKeyError::Kek(format!(
                "terminal {} key {} is sealed under KEK id {}, which is not loaded",
                self.terminal, self.key_id, self.kek
            )));
        }
        let hex = kek
            .open(&sealed, &Entry::ad(&self.terminal, self.key_id, self.algorithm))
            .map_err(|_| refused())?;
        let key = MacKey::from_hex(self.algorithm, hex.expose()).map_err(|_| refused())?;
        if key.kcv_hex() != self.kcv {
            return Err(TerminalKeyError::KcvMismatch {
                terminal: self.terminal.clone(),
                key_id: self.key_id,
            });
        }
        Ok(key)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    version: u32,
    #[serde(default, rename = "key")]
    keys: Vec<Entry>,
}

/// The terminal key file's contents: sealed keys, by terminal then key id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TerminalKeyFile {
    keys: BTreeMap<(String, u32), Entry>,
}

/// Refuses a terminal id that could not be field 41.
pub fn check_terminal_id(id: &str) -> Result<(), TerminalKeyError> {
    if id.is_empty() || id.len() > MAX_TERMINAL_ID || !id.bytes().all(|c| (0x20..=0x7E).contains(&c)) {
        return Err(TerminalKeyError::BadTerminal {
            id: id.escape_debug().to_string(),
        });
    }
    Ok(())
}

impl TerminalKeyFile {
    /// Reads the file (refused when group or others have a permission on it).
    pub fn load(path: &Path) -> Result<TerminalKeyFile, TerminalKeyError> {
        let text = crate::keyfile::read_to_string(path)?;
        TerminalKeyFile::parse(&text, path)
    }

    /// Reads the file, or starts an empty one when there is none.
    pub fn load_or_new(path: &Path) -> Result<TerminalKeyFile, TerminalKeyError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TerminalKeyFile::default()),
            _ => TerminalKeyFile::load(path),
        }
    }

    /// Parses the file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<TerminalKeyFile, TerminalKeyError> {
        let parse = |message: String| TerminalKeyError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let doc: FileDoc = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
        if doc.version != VERSION {
            return Err(parse(format!(
                "version {} (this pingate reads version {VERSION})",
                doc.version
            )));
        }
        let mut keys = BTreeMap::new();
        for e in doc.keys {
            check_terminal_id(&e.terminal)?;
            if e.key_id == 0 {
                return Err(parse(format!("terminal {}: key ids start at 1", e.terminal)));
            }
            if e.kcv.len() != 6 || from_hex(&e.kcv).is_err() {
                return Err(parse(format!(
                    "terminal {} key {}: kcv is 6 hex digits",
                    e.terminal, e.key_id
                )));
            }
            let at = (e.terminal.clone(), e.key_id);
            if keys.contains_key(&at) {
                return Err(TerminalKeyError::Duplicate {
                    path: path.to_path_buf(),
                    terminal: e.terminal,
                    key_id: e.key_id,
                });
            }
            keys.insert(at, e);
        }
        Ok(TerminalKeyFile { keys })
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let doc = FileDoc {
            version: VERSION,
            keys: self.keys.values().cloned().collect(),
        };
        let body = toml::to_string(&doc).expect("the key file serializes");
        format!(
            "# pingate terminal MAC keys, sealed under a key-encrypting key: see `pingate terminals key --help`.\n\
             # Written by pingate; change it with `pingate terminals key generate|import|rotate`.\n{body}"
        )
    }

    /// Writes the file whole: a new file of mode 0600 beside it, synced, then renamed over it.
    pub fn save(&self, path: &Path) -> Result<(), TerminalKeyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| TerminalKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(self.to_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Every entry, by terminal then key id.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.keys.values()
    }

    /// A terminal's entries, oldest first.
    pub fn of(&self, terminal: &str) -> Vec<&Entry> {
        self.keys
            .range((terminal.to_string(), 0)..=(terminal.to_string(), u32::MAX))
            .map(|(_, e)| e)
            .collect()
    }

    /// Seals `key` as terminal `terminal`'s next key (its newest, which signs from now on) under the KEK's current
    /// key. With `grace`, the keys before it verify requests for that many seconds more (those that had an end
    /// keep the earlier one); without, the terminal must have no key yet. Keys whose grace ended at `now` are
    /// dropped. Returns the new key id.
    pub fn add(
        &mut self,
        kek: &PinCipher,
        terminal: &str,
        key: &MacKey,
        now: i64,
        grace: Option<u64>,
    ) -> Result<u32, TerminalKeyError> {
        check_terminal_id(terminal)?;
        let existing = self.of(terminal);
        let newest = existing.last().map(|e| (e.key_id, e.algorithm));
        match (newest, grace) {
            (Some((newest, _)), None) => {
                return Err(TerminalKeyError::HasKeys {
                    terminal: terminal.into(),
                    newest,
                })
            }
            (None, Some(_)) => {
                return Err(TerminalKeyError::NoKeys {
                    terminal: terminal.into(),
                })
            }
            (Some((_, was)), Some(_)) if was != key.algorithm() => {
                return Err(TerminalKeyError::AlgorithmChange {
                    terminal: terminal.into(),
                    was,
                    found: key.algorithm(),
                })
            }
            _ => {}
        }
        let key_id = newest.map_or(1, |(id, _)| id + 1);
        let hex = Zeroizing::new(to_hex(key.expose()));
        let sealed = kek
            .seal(&Pin::new(hex.as_str()), &Entry::ad(terminal, key_id, key.algorithm()))
            .map_err(|e| TerminalKeyError::Kek(e.to_string()))?;
        let mut blob = sealed.nonce.to_vec();
        blob.extend_from_slice(&sealed.ciphertext);
        if let Some(grace) = grace {
            let until = now.saturating_add(grace.min(i64::MAX as u64) as i64);
            for ((t, _), e) in self.keys.iter_mut() {
                if t == terminal {
                    e.valid_until = Some(e.valid_until.map_or(until, |u| u.min(until)));
                }
            }
        }
        self.keys.retain(|_, e| e.valid_at(now));
        self.keys.insert(
            (terminal.to_string(), key_id),
            Entry {
                terminal: terminal.to_string(),
                key_id,
                algorithm: key.algorithm(),
                kcv: key.kcv_hex(),
                created: now,
                kek: sealed.key_id,
                sealed: to_hex(&blob),
                valid_until: None,
            },
        );
        Ok(key_id)
    }

    /// Opens every key still valid at `now` (each checked against its recorded KCV): what a gateway verifies and
    /// signs with.
    pub fn open(&self, kek: &PinCipher, now: i64) -> Result<TerminalKeys, TerminalKeyError> {
        let mut terminals: BTreeMap<String, Vec<LoadedKey>> = BTreeMap::new();
        for e in self.keys.values().filter(|e| e.valid_at(now)) {
            let key = e.open(kek)?;
            terminals.entry(e.terminal.clone()).or_default().push(LoadedKey {
                key_id: e.key_id,
                key,
                valid_until: e.valid_until,
            });
        }
        for keys in terminals.values_mut() {
            keys.sort_by_key(|k| std::cmp::Reverse(k.key_id));
        }
        Ok(TerminalKeys { terminals })
    }
}

/// One opened key of a terminal.
#[derive(Clone, Debug)]
pub struct LoadedKey {
    pub key_id: u32,
    pub key: MacKey,
    pub valid_until: Option<i64>,
}

/// The opened keys of every terminal, newest first: a gateway verifies requests and signs answers with them.
/// Zeroized when dropped (each [`MacKey`] is).
#[derive(Clone, Debug, Default)]
pub struct TerminalKeys {
    terminals: BTreeMap<String, Vec<LoadedKey>>,
}

impl TerminalKeys {
    /// The key that signs answers to `terminal`: its newest.
    pub fn signing_key(&self, terminal: &str) -> Option<&LoadedKey> {
        self.terminals.get(terminal).and_then(|k| k.first())
    }

    /// Every (terminal, key id) held, with its KCV: what a reload compares.
    pub fn ids(&self) -> Vec<(&str, u32, String)> {
        self.terminals
            .iter()
            .flat_map(|(t, keys)| keys.iter().map(move |k| (t.as_str(), k.key_id, k.key.kcv_hex())))
            .collect()
    }

    /// Terminals with a key.
    pub fn terminals(&self) -> impl Iterator<Item = &str> {
        self.terminals.keys().map(String::as_str)
    }

    /// The algorithm of a terminal's keys.
    pub fn algorithm(&self, terminal: &str) -> Option<MacAlgorithm> {
        self.signing_key(terminal).map(|k| k.key.algorithm())
    }

    /// Checks a request's MAC with the keys of `terminal` still valid at `now`, newest first; the key id that
    /// matched. A terminal without a valid key is [`MacError::NoKey`].
    pub fn verify(
        &self,
        dialect: &Dialect,
        raw: &[u8],
        msg: &Message,
        terminal: &str,
        now: i64,
    ) -> Result<u32, MacError> {
        let keys: Vec<&LoadedKey> = self
            .terminals
            .get(terminal)
            .into_iter()
            .flatten()
            .filter(|k| k.valid_until.is_none_or(|t| now < t))
            .collect();
        let i = crate::mac::verify_request_any(dialect, raw, msg, keys.iter().map(|k| &k.key))?;
        Ok(keys[i].key_id)
    }

    /// Adds the MAC of `terminal`'s newest key to an encoded answer ([`crate::mac::sign_answer`]).
    pub fn sign(&self, dialect: &Dialect, answer: &mut BytesMut, terminal: &str) -> Result<(), MacError> {
        let key = self.signing_key(terminal).ok_or(MacError::NoKey)?;
        crate::mac::sign_answer(dialect, answer, &key.key)
    }
}

/// Loads a KEK file (`id:64-hex` entries, as `pingate certs key` writes them).
pub fn load_kek(path: &Path) -> Result<PinCipher, TerminalKeyError> {
    let text = crate::keyfile::read_to_string(path)?;
    PinCipher::from_spec(&text).map_err(|e| TerminalKeyError::Kek(format!("{}: {e}", path.display())))
}

// ---- the operator commands ------------------------------------------------------------------------------------

/// Where the terminal key file and its KEK are.
#[derive(clap::Args, Clone, Debug)]
pub struct KeyFileArgs {
    /// The terminal key file (created by the first `generate` or `import`, mode 0600).
    #[arg(long, env = "PINGATE_TERMINAL_KEYS")]
    pub file: PathBuf,
    /// The key-encrypting key file (`id:64-hex`, e.g. made by `pingate certs key FILE`; mode 0600).
    #[arg(long, env = "PINGATE_TERMINAL_KEK")]
    pub kek: PathBuf,
}

/// `pingate terminals key …`.
#[derive(clap::Subcommand)]
pub enum KeyCommand {
    /// Give a terminal its first MAC key, made at random; prints its key id and KCV.
    Generate {
        #[command(flatten)]
        files: KeyFileArgs,
        /// The terminal id (field 41).
        #[arg(long)]
        terminal: String,
        /// `retail-des` (ISO 9797-1 algorithm 3, X9.19) or `aes-cmac`.
        #[arg(long)]
        algorithm: MacAlgorithm,
        /// Also print the key itself, to load it into the terminal (keep this output to the key ceremony).
        #[arg(long)]
        reveal: bool,
    },
    /// Give a terminal its first MAC key, read as hex from standard input (never from the command line).
    Import {
        #[command(flatten)]
        files: KeyFileArgs,
        /// The terminal id (field 41).
        #[arg(long)]
        terminal: String,
        /// `retail-des` (ISO 9797-1 algorithm 3, X9.19) or `aes-cmac`.
        #[arg(long)]
        algorithm: MacAlgorithm,
        /// The key check value the key must have (6 hex digits); nothing is written otherwise.
        #[arg(long)]
        kcv: Option<String>,
    },
    /// Give a terminal a new key (at random, or from standard input with --import): it signs answers from now on,
    /// and requests MACed with the terminal's older keys still verify during the grace period.
    Rotate {
        #[command(flatten)]
        files: KeyFileArgs,
        /// The terminal id (field 41).
        #[arg(long)]
        terminal: String,
        /// Read the new key as hex from standard input instead of making one.
        #[arg(long)]
        import: bool,
        /// With --import: the key check value the key must have.
        #[arg(long, requires = "import")]
        kcv: Option<String>,
        /// Hours the older keys still verify requests (0 to 8760).
        #[arg(long, default_value_t = DEFAULT_GRACE_SECS / 3600, value_parser = clap::value_parser!(u64).range(0..=8760))]
        grace_hours: u64,
        /// Also print the new key itself, to load it into the terminal.
        #[arg(long)]
        reveal: bool,
    },
    /// Print the key check values of the terminals' keys (of one terminal with --terminal), to compare with what
    /// a terminal shows for the key loaded into it. Needs no KEK; with --kek each key is opened and its KCV computed
    /// again.
    ShowKcv {
        /// The terminal key file.
        #[arg(long, env = "PINGATE_TERMINAL_KEYS")]
        file: PathBuf,
        /// Only this terminal.
        #[arg(long)]
        terminal: Option<String>,
        /// The key-encrypting key file: open each key and check its KCV.
        #[arg(long)]
        kek: Option<PathBuf>,
    },
}

/// Runs `pingate terminals key …`; `stdin` is read for `import` and `rotate --import`. Returns what to print.
pub fn run(command: KeyCommand, stdin: &mut dyn std::io::Read) -> Result<String, TerminalKeyError> {
    let now = crate::clock::unix_now();
    match command {
        KeyCommand::Generate {
            files,
            terminal,
            algorithm,
            reveal,
        } => {
            let key = MacKey::generate(algorithm).map_err(|source| TerminalKeyError::Key {
                terminal: terminal.clone(),
                source,
            })?;
            add(&files, &terminal, &key, now, None, reveal)
        }
        KeyCommand::Import {
            files,
            terminal,
            algorithm,
            kcv,
        } => {
            let key = read_key(stdin, algorithm, &terminal, kcv.as_deref())?;
            add(&files, &terminal, &key, now, None, false)
        }
        KeyCommand::Rotate {
            files,
            terminal,
            import,
            kcv,
            grace_hours,
            reveal,
        } => {
            let file = TerminalKeyFile::load(&files.file)?;
            let Some(newest) = file.of(&terminal).last().map(|e| e.algorithm) else {
                return Err(TerminalKeyError::NoKeys { terminal });
            };
            let key = if import {
                read_key(stdin, newest, &terminal, kcv.as_deref())?
            } else {
                MacKey::generate(newest).map_err(|source| TerminalKeyError::Key {
                    terminal: terminal.clone(),
                    source,
                })?
            };
            add(
                &files,
                &terminal,
                &key,
                now,
                Some(grace_hours * 3600),
                reveal && !import,
            )
        }
        KeyCommand::ShowKcv { file, terminal, kek } => {
            let keys = TerminalKeyFile::load(&file)?;
            let kek = kek.as_deref().map(load_kek).transpose()?;
            show_kcv(&keys, terminal.as_deref(), kek.as_ref(), now)
        }
    }
}

/// A key typed or piped in as hex (whitespace ignored), checked for strength and, if given, its KCV.
fn read_key(
    stdin: &mut dyn std::io::Read,
    algorithm: MacAlgorithm,
    terminal: &str,
    expected_kcv: Option<&str>,
) -> Result<MacKey, TerminalKeyError> {
    let mut text = Zeroizing::new(String::new());
    stdin.read_to_string(&mut text).map_err(|source| TerminalKeyError::Io {
        path: PathBuf::from("standard input"),
        source,
    })?;
    let key_error = |source| TerminalKeyError::Key {
        terminal: terminal.to_string(),
        source,
    };
    let key = MacKey::from_hex(algorithm, &text).map_err(key_error)?;
    key.check_strength().map_err(key_error)?;
    if let Some(expected) = expected_kcv {
        let found = key.kcv_hex();
        if !found.eq_ignore_ascii_case(expected.trim()) {
            return Err(TerminalKeyError::KcvExpected {
                expected: expected.trim().to_uppercase(),
                found,
            });
        }
    }
    Ok(key)
}

fn add(
    files: &KeyFileArgs,
    terminal: &str,
    key: &MacKey,
    now: i64,
    grace: Option<u64>,
    reveal: bool,
) -> Result<String, TerminalKeyError> {
    let kek = load_kek(&files.kek)?;
    let mut file = TerminalKeyFile::load_or_new(&files.file)?;
    let key_id = file.add(&kek, terminal, key, now, grace)?;
    // Opened again before anything is written: what is saved is known to open with this KEK.
    file.keys[&(terminal.to_string(), key_id)].open(&kek)?;
    file.save(&files.file)?;
    let mut out = format!(
        "terminal {terminal} key {key_id} ({}): KCV {} ({})",
        key.algorithm(),
        key.kcv_hex(),
        key.algorithm().kcv_method()
    );
    for e in file.of(terminal) {
        if let Some(until) = e.valid_until {
            out.push_str(&format!(
                "\nterminal {terminal} key {} still verifies requests until {} ({until})",
                e.key_id,
                format_time(until)
            ));
        }
    }
    if reveal {
        out.push_str(&format!("\nkey: {}", to_hex(key.expose())));
    }
    Ok(out)
}

fn show_kcv(
    file: &TerminalKeyFile,
    terminal: Option<&str>,
    kek: Option<&PinCipher>,
    now: i64,
) -> Result<String, TerminalKeyError> {
    if let Some(t) = terminal {
        if file.of(t).is_empty() {
            return Err(TerminalKeyError::NoKeys { terminal: t.into() });
        }
    }
    let mut lines = vec!["terminal          key  algorithm   KCV     state".to_string()];
    let mut newest: BTreeMap<&str, u32> = BTreeMap::new();
    for e in file.entries().filter(|e| e.valid_at(now)) {
        newest.insert(&e.terminal, e.key_id);
    }
    for e in file.entries().filter(|e| terminal.is_none_or(|t| e.terminal == t)) {
        if let Some(kek) = kek {
            e.open(kek)?;
        }
        let state = match e.valid_until {
            Some(t) if t <= now => "expired".to_string(),
            _ if newest.get(e.terminal.as_str()) == Some(&e.key_id) => "signs answers".to_string(),
            Some(t) => format!("verifies until {}", format_time(t)),
            None => "verifies".to_string(),
        };
        lines.push(format!(
            "{:<17} {:>4}  {:<11} {:<7} {state}",
            e.terminal, e.key_id, e.algorithm, e.kcv
        ));
    }
    let methods: Vec<String> = MacAlgorithm::ALL
        .iter()
        .filter(|a| file.entries().any(|e| e.algorithm == **a))
        .map(|a| format!("{a}: {}", a.kcv_method()))
        .collect();
    if !methods.is_empty() {
        lines.push(format!("KCV: {}", methods.join("; ")));
    }
    if kek.is_some() {
        lines.push("every key opened with the KEK and its KCV computed again: OK".into());
    }
    Ok(lines.join("\n"))
}

/// `YYYY-MM-DD HH:MM UTC`.
fn format_time(t: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            d.year(),
            d.month() as u8,
            d.day(),
            d.hour(),
            d.minute()
        ),
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::{Dialects, Mti};
    use std::os::unix::fs::PermissionsExt;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("pingate-termkeys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn new_kek(d: &Dir, name: &str) -> PathBuf {
        let p = d.0.join(name);
        crate::tls::write_new_key(&p).unwrap();
        p
    }

    fn files(d: &Dir, kek: &Path) -> KeyFileArgs {
        KeyFileArgs {
            file: d.0.join("terminal-keys.toml"),
            kek: kek.to_path_buf(),
        }
    }

    fn key_cmd(command: KeyCommand, stdin: &str) -> Result<String, TerminalKeyError> {
        run(command, &mut stdin.as_bytes())
    }

    fn generate(files: &KeyFileArgs, terminal: &str, algorithm: MacAlgorithm) -> Result<String, TerminalKeyError> {
        key_cmd(
            KeyCommand::Generate {
                files: files.clone(),
                terminal: terminal.into(),
                algorithm,
                reveal: true,
            },
            "",
        )
    }

    fn revealed(out: &str) -> String {
        out.lines().find_map(|l| l.strip_prefix("key: ")).unwrap().to_string()
    }

    fn sale(terminal: &str) -> Message {
        let mut m = Message::new(Mti::SALE);
        m.set(3, "000000")
            .set(4, "000000001000")
            .set(11, "000001")
            .set(41, terminal.to_string());
        m
    }

    #[test]
    fn generate_then_the_gateway_verifies_and_signs_with_the_key() {
        let d = dir("generate");
        let kek_path = new_kek(&d, "kek");
        let f = files(&d, &kek_path);
        let out = generate(&f, "TERM0001", MacAlgorithm::RetailDes).unwrap();
        assert!(out.starts_with("terminal TERM0001 key 1 (retail-des): KCV "), "{out}");
        let key = MacKey::from_hex(MacAlgorithm::RetailDes, &revealed(&out)).unwrap();
        assert!(out.contains(&key.kcv_hex()));
        // The file: mode 0600, the key nowhere in it in clear, its KCV beside it.
        let meta = std::fs::metadata(&f.file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&f.file).unwrap();
        assert!(!text.to_uppercase().contains(&to_hex(key.expose())));
        assert!(text.contains(&format!("kcv = \"{}\"", key.kcv_hex())), "{text}");
        assert!(!d.0.join("terminal-keys.toml.new").exists());
        // A second generate for the same terminal is refused (rotate is the way), another terminal is fine.
        assert!(matches!(
            generate(&f, "TERM0001", MacAlgorithm::RetailDes),
            Err(TerminalKeyError::HasKeys { newest: 1, .. })
        ));
        generate(&f, "TERM0002", MacAlgorithm::AesCmac).unwrap();
        // What a gateway loads: verifies the terminal's MAC and signs with the same key.
        let kek = load_kek(&kek_path).unwrap();
        let keys = TerminalKeyFile::load(&f.file).unwrap().open(&kek, unix_now()).unwrap();
        assert_eq!(keys.terminals().collect::<Vec<_>>(), ["TERM0001", "TERM0002"]);
        assert_eq!(keys.algorithm("TERM0002"), Some(MacAlgorithm::AesCmac));
        let d87 = Dialects::builtin().get("iso87-bcd").unwrap().clone();
        let raw = crate::mac::sign_message(&d87, &sale("TERM0001"), &key)
            .unwrap()
            .freeze();
        let msg = d87.decode(&raw).unwrap();
        assert_eq!(keys.verify(&d87, &raw, &msg, "TERM0001", unix_now()), Ok(1));
        assert_eq!(
            keys.verify(&d87, &raw, &msg, "TERM0002", unix_now()),
            Err(MacError::Mismatch)
        );
        assert_eq!(
            keys.verify(&d87, &raw, &msg, "TERM0003", unix_now()),
            Err(MacError::NoKey)
        );
        let mut answer = d87.encode(&sale("TERM0001")).unwrap();
        keys.sign(&d87, &mut answer, "TERM0001").unwrap();
        assert_eq!(answer.freeze(), raw);
        // Another KEK opens nothing.
        let other = load_kek(&new_kek(&d, "other-kek")).unwrap();
        assert!(matches!(
            TerminalKeyFile::load(&f.file).unwrap().open(&other, unix_now()),
            Err(TerminalKeyError::Open { .. })
        ));
    }

    fn unix_now() -> i64 {
        crate::clock::unix_now()
    }

    #[test]
    fn import_reads_the_key_from_stdin_and_checks_its_kcv() {
        let d = dir("import");
        let f = files(&d, &new_kek(&d, "kek"));
        let import = |terminal: &str, algorithm, kcv: Option<&str>, stdin: &str| {
            key_cmd(
                KeyCommand::Import {
                    files: f.clone(),
                    terminal: terminal.into(),
                    algorithm,
                    kcv: kcv.map(String::from),
                },
                stdin,
            )
        };
        // ISO 9797-1's example key, whose KCV is 08D7B4; typed with spaces and a newline.
        let hex = "0123456789ABCDEF FEDCBA9876543210\n";
        let e = import("TERM0001", MacAlgorithm::RetailDes, Some("08D7B5"), hex).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the key's check value is 08D7B4, not 08D7B5: not the key meant (nothing was written)"
        );
        assert!(!f.file.exists());
        let out = import("TERM0001", MacAlgorithm::RetailDes, Some("08d7b4"), hex).unwrap();
        assert_eq!(
            out,
            "terminal TERM0001 key 1 (retail-des): KCV 08D7B4 (TDES encryption of a zero block)"
        );
        assert!(!out.contains("0123456789"));
        // Refused: a weak key, equal halves, a wrong length, a bad terminal id; the file is unchanged.
        let before = std::fs::read_to_string(&f.file).unwrap();
        for (terminal, algorithm, stdin) in [
            ("TERM0002", MacAlgorithm::RetailDes, "0101010101010101FEDCBA9876543210"),
            ("TERM0002", MacAlgorithm::RetailDes, "0123456789ABCDEF0123456789ABCDEF"),
            ("TERM0002", MacAlgorithm::AesCmac, "0123456789ABCDEF"),
            ("TERM\n0002", MacAlgorithm::AesCmac, "000102030405060708090A0B0C0D0E0F"),
            ("TERM0001", MacAlgorithm::RetailDes, "1123456789ABCDEFFEDCBA9876543210"),
        ] {
            let e = import(terminal, algorithm, None, stdin).unwrap_err();
            let shown = e.to_string();
            assert!(!shown.contains(&stdin[4..12]), "{shown}");
        }
        assert_eq!(std::fs::read_to_string(&f.file).unwrap(), before);
        let out = import(
            "TERM0002",
            MacAlgorithm::AesCmac,
            None,
            "2b7e151628aed2a6abf7158809cf4f3c",
        )
        .unwrap();
        assert!(out.contains("(aes-cmac): KCV "), "{out}");
        assert!(out.ends_with("(AES-CMAC of a zero block (ANSI X9.24-1:2017))"), "{out}");
    }

    #[test]
    fn rotate_keeps_the_old_key_valid_for_the_grace_period_only() {
        let d = dir("rotate");
        let kek_path = new_kek(&d, "kek");
        let f = files(&d, &kek_path);
        let rotate = |grace_hours, import: Option<&str>| {
            key_cmd(
                KeyCommand::Rotate {
                    files: f.clone(),
                    terminal: "TERM0001".into(),
                    import: import.is_some(),
                    kcv: None,
                    grace_hours,
                    reveal: true,
                },
                import.unwrap_or(""),
            )
        };
        assert!(matches!(
            rotate(72, None),
            Err(TerminalKeyError::KeyFile(KeyFileError::Io { .. }))
        ));
        generate(&f, "TERM0009", MacAlgorithm::AesCmac).unwrap();
        assert!(matches!(rotate(72, None), Err(TerminalKeyError::NoKeys { .. })));
        let first = MacKey::from_hex(
            MacAlgorithm::AesCmac,
            &revealed(&generate(&f, "TERM0001", MacAlgorithm::AesCmac).unwrap()),
        )
        .unwrap();
        let out = rotate(72, None).unwrap();
        assert!(out.starts_with("terminal TERM0001 key 2 (aes-cmac)"), "{out}");
        assert!(out.contains("key 1 still verifies requests until "), "{out}");
        let second = MacKey::from_hex(MacAlgorithm::AesCmac, &revealed(&out)).unwrap();

        let kek = load_kek(&kek_path).unwrap();
        let file = TerminalKeyFile::load(&f.file).unwrap();
        let until = file.of("TERM0001")[0].valid_until.unwrap();
        let now = unix_now();
        assert!((until - now - 72 * 3600).abs() < 60, "{until} {now}");
        let keys = file.open(&kek, now).unwrap();
        assert_eq!(keys.signing_key("TERM0001").unwrap().key_id, 2);
        assert_eq!(keys.signing_key("TERM0001").unwrap().key, second);
        let d87 = Dialects::builtin().get("iso87-ascii").unwrap().clone();
        let by = |key: &MacKey| {
            let raw = crate::mac::sign_message(&d87, &sale("TERM0001"), key).unwrap().freeze();
            let msg = d87.decode(&raw).unwrap();
            (raw, msg)
        };
        let (raw1, msg1) = by(&first);
        let (raw2, msg2) = by(&second);
        assert_eq!(keys.verify(&d87, &raw2, &msg2, "TERM0001", now), Ok(2));
        assert_eq!(keys.verify(&d87, &raw1, &msg1, "TERM0001", now), Ok(1));
        // After the grace period the old key no longer verifies, even in a gateway that loaded it before.
        assert_eq!(
            keys.verify(&d87, &raw1, &msg1, "TERM0001", until),
            Err(MacError::Mismatch)
        );
        assert_eq!(keys.verify(&d87, &raw2, &msg2, "TERM0001", until), Ok(2));
        assert_eq!(
            file.open(&kek, until).unwrap().signing_key("TERM0001").unwrap().key_id,
            2
        );

        // show-kcv: both keys with their state, the KCVs checked with the KEK.
        let shown = key_cmd(
            KeyCommand::ShowKcv {
                file: f.file.clone(),
                terminal: Some("TERM0001".into()),
                kek: Some(kek_path.clone()),
            },
            "",
        )
        .unwrap();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 5, "{shown}");
        assert!(lines[1].starts_with("TERM0001             1  aes-cmac    ") && lines[1].contains("verifies until"));
        assert!(lines[1].contains(&first.kcv_hex()));
        assert!(lines[2].contains(&second.kcv_hex()) && lines[2].ends_with("signs answers"));
        assert!(lines[4].ends_with("OK"));
        assert!(!shown.contains(&to_hex(&first.expose()[..4])));

        // A rotation with no grace: the old keys end now and are dropped by the next change.
        let imported = "000102030405060708090A0B0C0D0E0F";
        let out = rotate(0, Some(imported)).unwrap();
        assert!(out.starts_with("terminal TERM0001 key 3 (aes-cmac)"), "{out}");
        assert!(!out.contains("key: "), "an imported key is not printed back: {out}");
        generate(&f, "TERM0003", MacAlgorithm::RetailDes).unwrap();
        let file = TerminalKeyFile::load(&f.file).unwrap();
        assert_eq!(file.of("TERM0001").iter().map(|e| e.key_id).collect::<Vec<_>>(), [3]);
        let keys = file.open(&kek, unix_now()).unwrap();
        assert_eq!(
            keys.verify(&d87, &raw2, &msg2, "TERM0001", unix_now()),
            Err(MacError::Mismatch)
        );
    }

    #[test]
    fn a_tampered_or_exposed_file_is_refused() {
        let d = dir("tamper");
        let kek_path = new_kek(&d, "kek");
        let f = files(&d, &kek_path);
        generate(&f, "TERM0001", MacAlgorithm::RetailDes).unwrap();
        generate(&f, "TERM0002", MacAlgorithm::RetailDes).unwrap();
        let kek = load_kek(&kek_path).unwrap();
        let text = std::fs::read_to_string(&f.file).unwrap();
        let file = TerminalKeyFile::parse(&text, &f.file).unwrap();
        let e: Vec<Entry> = file.entries().cloned().collect();
        let write = |entries: Vec<Entry>| {
            let mut t = TerminalKeyFile::default();
            for x in entries {
                t.keys.insert((x.terminal.clone(), x.key_id), x);
            }
            t
        };
        // A sealed key moved to another terminal, given another key id or algorithm: does not open.
        let moved = Entry {
            sealed: e[0].sealed.clone(),
            kcv: e[0].kcv.clone(),
            ..e[1].clone()
        };
        assert!(matches!(
            write(vec![moved]).open(&kek, 0),
            Err(TerminalKeyError::Open { .. })
        ));
        let relabelled = Entry {
            key_id: 2,
            ..e[0].clone()
        };
        assert!(matches!(
            write(vec![relabelled]).open(&kek, 0),
            Err(TerminalKeyError::Open { .. })
        ));
        let other_algorithm = Entry {
            algorithm: MacAlgorithm::AesCmac,
            ..e[0].clone()
        };
        assert!(write(vec![other_algorithm]).open(&kek, 0).is_err());
        // A KCV changed beside a good key.
        let kcv = Entry {
            kcv: "000000".into(),
            ..e[0].clone()
        };
        assert!(matches!(
            write(vec![kcv]).open(&kek, 0),
            Err(TerminalKeyError::KcvMismatch { .. })
        ));
        // A flipped ciphertext byte.
        let mut sealed = e[0].sealed.clone().into_bytes();
        sealed[40] = if sealed[40] == b'0' { b'1' } else { b'0' };
        let flipped = Entry {
            sealed: String::from_utf8(sealed).unwrap(),
            ..e[0].clone()
        };
        assert!(write(vec![flipped]).open(&kek, 0).is_err());
        // Listed twice, an unknown key, another version.
        let twice = format!("{text}\n[[key]]\n{}", text.split("[[key]]").nth(1).unwrap());
        assert!(matches!(
            TerminalKeyFile::parse(&twice, &f.file),
            Err(TerminalKeyError::Duplicate { .. })
        ));
        assert!(TerminalKeyFile::parse(&text.replace("kek = ", "kek_id = "), &f.file).is_err());
        assert!(TerminalKeyFile::parse(&text.replace("version = 1", "version = 2"), &f.file).is_err());
        // Group or others may read it: refused, naming the file.
        std::fs::set_permissions(&f.file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TerminalKeyFile::load(&f.file).unwrap_err();
        assert!(
            matches!(e, TerminalKeyError::KeyFile(KeyFileError::Exposed { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
    }

    #[test]
    fn show_kcv_needs_no_kek_and_names_unknown_terminals() {
        let d = dir("show");
        let f = files(&d, &new_kek(&d, "kek"));
        key_cmd(
            KeyCommand::Import {
                files: f.clone(),
                terminal: "TERM0001".into(),
                algorithm: MacAlgorithm::RetailDes,
                kcv: None,
            },
            "0123456789ABCDEFFEDCBA9876543210",
        )
        .unwrap();
        let show = |terminal: Option<&str>| {
            key_cmd(
                KeyCommand::ShowKcv {
                    file: f.file.clone(),
                    terminal: terminal.map(String::from),
                    kek: None,
                },
                "",
            )
        };
        let out = show(None).unwrap();
        assert_eq!(
            out,
            "terminal          key  algorithm   KCV     state\n\
             TERM0001             1  retail-des  08D7B4  signs answers\n\
             KCV: retail-des: TDES encryption of a zero block"
        );
        assert!(matches!(show(Some("TERM0002")), Err(TerminalKeyError::NoKeys { .. })));
        // The wrong KEK is caught.
        let wrong = new_kek(&d, "wrong");
        let e = key_cmd(
            KeyCommand::ShowKcv {
                file: f.file.clone(),
                terminal: None,
                kek: Some(wrong),
            },
            "",
        )
        .unwrap_err();
        assert!(
            matches!(e, TerminalKeyError::Kek(_) | TerminalKeyError::Open { .. }),
            "{e}"
        );
    }
}
