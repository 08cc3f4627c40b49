//! Where a terminal's request comes from (issue 20, §2 and §3): the peer's address, the client certificate of a TLS
//! connection (its names: subject CN and DNS SANs), the caller's number of a modem call. The rules that judge a
//! request by its origin are in the controller ([`super::controller::check_origin`]); this module holds the values,
//! the per-terminal bindings from the configuration, and the TLS set-up of terminal listeners.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::tls::TlsError;

/// Where one connection or call comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The peer's address (TCP); `None` on serial lines.
    pub addr: Option<IpAddr>,
    /// The names of the verified client certificate (TLS with a client certificate); `None` without one.
    pub cert: Option<Arc<CertNames>>,
    /// The caller's number the modem reported for this call (caller ID); `None` when it reported none.
    pub caller_id: Option<Box<str>>,
}

impl Origin {
    /// A TCP peer without a certificate.
    pub fn tcp(addr: IpAddr) -> Origin {
        Origin {
            addr: Some(addr),
            ..Origin::default()
        }
    }
}

/// The names a client certificate carries: its subject's common name, then its DNS subject alternative names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertNames(pub Vec<String>);

impl CertNames {
    /// The names of a certificate (DER); empty when it does not parse (it was verified by webpki already, so
    /// this does not happen with certificates rustls accepted).
    pub fn of(cert: &CertificateDer<'_>) -> CertNames {
        use x509_cert::der::Decode;
        let Ok(c) = x509_cert::Certificate::from_der(cert.as_ref()) else {
            return CertNames::default();
        };
        let mut names = Vec::new();
        for rdn in c.tbs_certificate.subject.0.iter() {
            for atv in rdn.0.iter() {
                if atv.oid == x509_cert::der::oid::db::rfc4519::CN {
                    if let Some(s) = directory_string(&atv.value) {
                        names.push(s);
                    }
                }
            }
        }
        for ext in c.tbs_certificate.extensions.iter().flatten() {
            if ext.extn_id != x509_cert::der::oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
                continue;
            }
            if let Ok(san) = x509_cert::ext::pkix::SubjectAltName::from_der(ext.extn_value.as_bytes()) {
                for n in san.0 {
                    if let x509_cert::ext::pkix::name::GeneralName::DnsName(d) = n {
                        names.push(d.as_str().to_string());
                    }
                }
            }
        }
        CertNames(names)
    }
}

fn directory_string(v: &x509_cert::der::Any) -> Option<String> {
    use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
    if let Ok(s) = v.decode_as::<Utf8StringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    v.decode_as::<PrintableStringRef<'_>>()
        .ok()
        .map(|s| s.as_str().to_string())
}

/// What binds one terminal to where it may come from (`allow` and `caller_ids` of its `[[terminal]]` table).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// Source networks (IPv4 and IPv6 CIDRs) its requests may come from over TCP; empty: any.
    pub allow: Vec<IpNet>,
    /// Callers' numbers its calls may come from; empty: any.
    pub caller_ids: Vec<String>,
}

impl Binding {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.caller_ids.is_empty()
    }
}

/// Every terminal's binding, and the network access controllers (a certificate name that may speak for a list of
/// terminal ids: `[[nac]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origins {
    pub bindings: HashMap<String, Binding>,
    /// NAC certificate name → terminal ids it may speak for.
    pub nacs: HashMap<String, HashSet<String>>,
}

impl Origins {
    /// Whether a certificate with `names` may speak for `terminal`: one of its names is the terminal id, or names a
    /// NAC that lists it.
    pub fn cert_speaks_for(&self, names: &CertNames, terminal: &str) -> bool {
        names
            .0
            .iter()
            .any(|n| n == terminal || self.nacs.get(n).is_some_and(|ids| ids.contains(terminal)))
    }
}

/// Whether `addr` is in one of `nets` (an empty list allows every address). IPv4-mapped IPv6 addresses are judged as
/// the IPv4 address they carry.
pub fn allowed(nets: &[IpNet], addr: IpAddr) -> bool {
    if nets.is_empty() {
        return true;
    }
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        a => a,
    };
    nets.iter().any(|n| n.contains(&addr))
}

/// Parses CIDRs (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a single host).
pub fn parse_nets(list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("`{s}` is not an IPv4 or IPv6 network (CIDR such as 10.0.0.0/8) or address"))
        })
        .collect()
}

/// Whether a TLS listener asks for client certificates and whether it needs one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCerts {
    /// Every terminal presents a certificate of the client CA (the default when `client_ca` is set).
    #[default]
    Required,
    /// A certificate, when presented, must chain to the client CA and binds the connection; a connection without one
    /// is served (it proves itself some other way: MACs).
    Optional,
}

/// A listener's TLS (`tls` table in `[[listener]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are asked for and verified against this CA; `None`: none asked for.
    pub client_ca: Option<PathBuf>,
    pub client_certs: ClientCerts,
}

impl ListenerTls {
    /// The rustls server configuration (TLS 1.2 and 1.3: terminals and NACs in the field do not all speak 1.3).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in crate::tls::load_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let v = match self.client_certs {
                    ClientCerts::Required => v,
                    ClientCerts::Optional => v.allow_unauthenticated(),
                };
                builder.with_client_cert_verifier(v.build().map_err(|e| TlsError::Config(e.to_string()))?)
            }
        };
        builder
            .with_single_cert(crate::tls::load_certs(&self.cert)?, crate::tls::load_key(&self.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    /// The acceptor for a listener.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(self.server_config()?)))
    }

    /// Paths made relative to `base` (the configuration's folder).
    pub fn relative_to(mut self, base: &Path) -> ListenerTls {
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        self.cert = rel(self.cert);
        self.key = rel(self.key);
        self.client_ca = self.client_ca.map(rel);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_allow_their_addresses_v4_v6_and_mapped() {
        let nets = parse_nets(&["10.0.0.0/8".into(), "2001:db8::/32".into(), "192.0.2.7".into()]).unwrap();
        for a in ["10.1.2.3", "2001:db8::1", "192.0.2.7", "::ffff:10.9.9.9"] {
            assert!(allowed(&nets, a.parse().unwrap()), "{a}");
        }
        for a in ["11.0.0.1", "2001:db9::1", "192.0.2.8", "127.0.0.1", "::1"] {
            assert!(!allowed(&nets, a.parse().unwrap()), "{a}");
        }
        assert!(allowed(&[], "127.0.0.1".parse().unwrap()));
        assert!(parse_nets(&["10.0.0.0/33".into()]).is_err());
        assert!(parse_nets(&["example.com".into()]).is_err());
    }

    #[test]
    fn a_certificate_speaks_for_its_own_id_or_its_nacs_list() {
        let mut o = Origins::default();
        o.nacs
            .insert("nac-north".into(), ["T1".to_string(), "T2".to_string()].into());
        let nac = CertNames(vec!["nac-north".into()]);
        assert!(o.cert_speaks_for(&nac, "T1"));
        assert!(!o.cert_speaks_for(&nac, "T3"));
        let t3 = CertNames(vec!["T3".into()]);
        assert!(o.cert_speaks_for(&t3, "T3"));
        assert!(!o.cert_speaks_for(&t3, "T1"));
        assert!(!o.cert_speaks_for(&CertNames::default(), "T1"));
    }

    #[test]
    fn names_are_read_from_a_certificate() {
        let mut p = rcgen::CertificateParams::new(vec!["nac-south.example".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "TERM0001");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(
            CertNames::of(cert.der()).0,
            vec!["TERM0001".to_string(), "nac-south.example".to_string()]
        );
    }
}
