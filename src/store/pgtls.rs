//! How the stores and the audit reach PostgreSQL: the URL's connection settings, and TLS when the URL asks for it.
//!
//! `sslmode=verify-full` (and `require` or `verify-ca`, taken the same way: pingate never connects unverified)
//! connects over TLS (rustls) and checks the server's certificate against the CA in the file that `sslrootcert=`
//! names in the URL, else `$PGSSLROOTCERT`, and the host name dialled against the certificate. Without `sslmode`,
//! or with `disable`, `allow` or `prefer`, the connection is plaintext, as before.

use std::sync::Arc;

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// Where and how to connect.
pub struct PgTarget {
    /// The URL's settings, `sslmode` and `sslrootcert` read out of it.
    pub config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

/// Connects to the URL's database (TLS as the URL asks), its connection driven by a task of its own.
pub async fn connect(url: &str) -> Result<Client, StoreError> {
    PgTarget::parse(url)?.connect().await
}

impl PgTarget {
    /// Reads a URL (`postgres://…?sslmode=verify-full&sslrootcert=/path/ca.pem`) or a key=value string.
    pub fn parse(url: &str) -> Result<PgTarget, StoreError> {
        let (rest, mode, root) = split_tls(url)?;
        let config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Db(e.to_string()))?;
        let tls = match mode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => None,
            Some("require" | "verify-ca" | "verify-full") => {
                let root = root
                    .or_else(|| std::env::var("PGSSLROOTCERT").ok().filter(|r| !r.is_empty()))
                    .ok_or_else(|| {
                        StoreError::BadRequest(format!(
                            "sslmode={}: give the CA that signed the PostgreSQL server's certificate, \
                             sslrootcert=FILE in the URL or $PGSSLROOTCERT",
                            mode.as_deref().unwrap_or_default()
                        ))
                    })?;
                Some(MakeRustlsConnect::new(client_config(std::path::Path::new(&root))?))
            }
            Some(other) => {
                return Err(StoreError::BadRequest(format!(
                    "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
                )))
            }
        };
        let mut config = config;
        if tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        Ok(PgTarget { config, tls })
    }

    /// Whether the connection will be TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects; the connection is driven by a task of its own, which logs how it ended if it failed.
    pub async fn connect(&self) -> Result<Client, StoreError> {
        let (client, task) = match &self.tls {
            None => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(refused)?;
                (client, tokio::spawn(conn))
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(refused)?;
                (client, tokio::spawn(conn))
            }
        };
        tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }
}

/// A connection refused, with its causes (the driver's own message alone says only "error performing TLS
/// handshake", not which certificate check failed).
fn refused(e: tokio_postgres::Error) -> StoreError {
    if e.as_db_error().is_some() {
        return e.into();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    StoreError::Db(text)
}

/// TLS 1.2 or 1.3, the server checked against the CA in `root` (and its name, at connect time).
fn client_config(root: &std::path::Path) -> Result<rustls::ClientConfig, StoreError> {
    let bad = |what: String| StoreError::BadRequest(format!("sslrootcert {}: {what}", root.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::load_certs(root).map_err(|e| StoreError::BadRequest(format!("sslrootcert {e}")))? {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The URL without `sslmode` and `sslrootcert`, and their values. URLs (`postgres://…?a=b&c=d`, values
/// percent-encoded) and key=value strings (`host=… sslmode=…`, the two values unquoted) are both read.
fn split_tls(url: &str) -> Result<(String, Option<String>, Option<String>), StoreError> {
    let (mut mode, mut root) = (None, None);
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            mode = Some(value);
            true
        }
        "sslrootcert" => {
            root = Some(value);
            true
        }
        _ => false,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k, percent_decode(v)?) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((rest, mode, root))
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((k, v)) if take(k, v.to_string()) => {}
                _ => kept.push(token),
            }
        }
        Ok((kept.join(" "), mode, root))
    }
}

fn percent_decode(s: &str) -> Result<String, StoreError> {
    let bad = || StoreError::BadRequest(format!("database URL: bad percent-encoding in `{s}`"));
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: Vec<u8> = bytes.by_ref().take(2).collect();
            let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_read_out_of_urls_and_key_value_strings() {
        let (rest, mode, root) =
            split_tls("postgres://u@db:5432/pins?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgres://u@db:5432/pins?application_name=x");
        assert_eq!(
            (mode.as_deref(), root.as_deref()),
            (Some("verify-full"), Some("/etc/ca.pem"))
        );
        let (rest, mode, root) = split_tls("host=db user=u sslmode=require sslrootcert=/ca.pem dbname=p").unwrap();
        assert_eq!(rest, "host=db user=u dbname=p");
        assert_eq!((mode.as_deref(), root.as_deref()), (Some("require"), Some("/ca.pem")));
        assert_eq!(
            split_tls("postgres://u@db/p").unwrap(),
            ("postgres://u@db/p".into(), None, None)
        );
        // Plaintext as before, unless TLS is asked for; an unknown mode is refused.
        assert!(!PgTarget::parse("postgres://u@db/p?sslmode=prefer").unwrap().tls());
        let e = PgTarget::parse("postgres://u@db/p?sslmode=always").err().unwrap();
        assert!(e.to_string().contains("sslmode=always"), "{e}");
        let e = PgTarget::parse("postgres://u@db/p?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
