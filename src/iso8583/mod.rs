//! ISO 8583 codec driven by dialect files (no I/O beyond loading those files).
//!
//! - [`spec`]: the dialect file format and its compiled form ([`Dialect`], [`FieldSpec`]).
//! - [`message`]: the [`Message`] value type with typed accessors and masking.
//! - `decode` / `encode`: nom streaming decoder and `BytesMut` encoder, methods on [`Dialect`].
//! - `json`: the JSON form used by the CLI and the fixtures.
//! - [`Dialects`]: the dialects shipped in `protocols/iso8583/` plus any a user adds there.

mod charset;
mod decode;
mod encode;
pub mod error;
mod json;
pub mod message;
pub mod spec;

use std::path::{Path, PathBuf};

pub use charset::{from_hex, to_hex};
pub use error::{CodecError, DialectError, FieldRef};
pub use message::{Message, Mti};
pub use spec::{Class, Dialect, Encoding, FieldSpec, Mask, Pad, PrefixEncoding, Var};

/// The dialect used when none is named: ASCII fields, binary bitmap.
pub const DEFAULT_DIALECT: &str = "iso87-ascii-binbitmap";

/// The dialect files shipped with pingate, compiled in so that the binary works from any directory. Files of the
/// same name in a protocols directory take precedence.
const BUILTIN: &[(&str, &str)] = &[
    ("iso87-ascii", include_str!("../../protocols/iso8583/iso87-ascii.toml")),
    (
        "iso87-ascii-binbitmap",
        include_str!("../../protocols/iso8583/iso87-ascii-binbitmap.toml"),
    ),
    ("iso87-bcd", include_str!("../../protocols/iso8583/iso87-bcd.toml")),
    (
        "iso87-ebcdic",
        include_str!("../../protocols/iso8583/iso87-ebcdic.toml"),
    ),
];

/// Where a dialect came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Builtin,
    File(PathBuf),
}

/// A set of dialects by name.
#[derive(Clone, Debug, Default)]
pub struct Dialects {
    entries: Vec<(Dialect, Source)>,
}

impl Dialects {
    /// The shipped dialects.
    pub fn builtin() -> Dialects {
        let mut d = Dialects::default();
        for (name, text) in BUILTIN {
            let dialect = Dialect::from_toml(text, &format!("builtin {name}")).expect("shipped dialects are valid");
            d.insert(dialect, Source::Builtin);
        }
        d
    }

    /// The shipped dialects, then every `*.toml` in `dir/iso8583/` (replacing a shipped one of the same name).
    /// A missing directory is not an error; a bad file is.
    pub fn load(protocols_dir: &Path) -> Result<Dialects, DialectError> {
        let mut d = Dialects::builtin();
        let dir = protocols_dir.join("iso8583");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(d);
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|source| DialectError::Io {
                path: shown.clone(),
                source,
            })?;
            let dialect = Dialect::from_toml(&text, &shown)?;
            d.insert(dialect, Source::File(path));
        }
        Ok(d)
    }

    /// Adds or replaces (by name) a dialect.
    pub fn insert(&mut self, dialect: Dialect, source: Source) {
        self.entries.retain(|(d, _)| d.name != dialect.name);
        self.entries.push((dialect, source));
        self.entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    }

    /// The dialect called `name`.
    pub fn get(&self, name: &str) -> Result<&Dialect, DialectError> {
        self.entries
            .iter()
            .map(|(d, _)| d)
            .find(|d| d.name == name)
            .ok_or_else(|| DialectError::Unknown {
                name: name.to_string(),
                known: self
                    .entries
                    .iter()
                    .map(|(d, _)| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every dialect with where it came from, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&Dialect, &Source)> {
        self.entries.iter().map(|(d, s)| (d, s))
    }
}
