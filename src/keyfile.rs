//! Key files: the PIN keys, a gateway's journal key and every TLS private key are read only when their mode keeps
//! them to their owner (no permission bit for group or others). One check for all of them, at start and in
//! `pingate check-config`; what is read is zeroized when dropped.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Group or others have a permission on it: its mode must be 0600 or 0400 (owner only).
    #[error(
        "{}: mode {mode:04o} lets group or others at this key file: it must be readable by its owner only (chmod 600 {})",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    /// It could not be read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Refuses a key file any permission bit of group or others is set on (`mode & 0o077`); the file's own mode counts
/// (a symbolic link is followed).
pub fn check(path: &Path) -> Result<(), KeyFileError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// A key file's bytes, once [`check`] passed.
pub fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    check(path)?;
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// A key file's text, once [`check`] passed.
pub fn read_to_string(path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let bytes = read(path)?;
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(Zeroizing::new(text.to_string())),
        Err(_) => Err(KeyFileError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        }),
    }
}

/// Key material (a key spec read from a key file or the environment): zeroized when dropped, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl zeroize::ZeroizeOnDrop for Secret {}

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(Zeroizing::new(text.into()))
    }
    /// The key material itself: only for building a cipher from it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_others_can_read_is_refused_naming_it_and_its_mode() {
        let dir = std::env::temp_dir().join(format!("pingate-keyfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pin-keys");
        std::fs::write(&path, "1:00").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o644, false),
            (0o602, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match read_to_string(&path) {
                Ok(text) => assert!(ok && *text == "1:00", "{mode:o}"),
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e}");
                    let msg = e.to_string();
                    assert!(
                        msg.starts_with(&format!("{}: mode {mode:04o} ", path.display())),
                        "{msg}"
                    );
                    assert!(!msg.contains("1:00"), "the key is never in the message: {msg}");
                }
            }
        }
        assert!(matches!(check(&dir.join("none")), Err(KeyFileError::Io { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
