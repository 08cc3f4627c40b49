//! Mutual TLS between gateways and PIN servers: TLS 1.3 only, ring crypto. The server requires a client
//! certificate that chains to its CA **and** is on its gateway list (SHA-256 fingerprint → gateway id): anything
//! else is refused during the handshake. Gateways verify the server's name. `certs init` makes a private CA, a
//! server certificate and gateway certificates for a quick start, the CA's key apart from what each host deploys.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A PEM file holds no certificate or key of the kind expected.
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// The gateway list is malformed.
    #[error("{path}: {what}")]
    GatewayList { path: String, what: String },
    /// A private key file group or others may read, or that cannot be read.
    #[error(transparent)]
    KeyFile(#[from] crate::keyfile::KeyFileError),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_provider::default_provider())
}

/// Certificates from a PEM file (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            what: format!("bad PEM: {e:?}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            what: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

/// A private key from a PEM file, readable by its owner only (see [`crate::keyfile`]).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = crate::keyfile::read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        what: format!("no private key: {e:?}"),
    })
}

/// SHA-256 of a certificate's DER, as lowercase hex: how the gateway list names certificates.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    crate::iso8583::to_hex(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref()).to_lowercase()
}

/// Which client certificate is which gateway: `gateways.toml`, one line per gateway, `ID = "sha256-hex"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayList {
    by_fingerprint: BTreeMap<String, String>,
}

impl GatewayList {
    /// Gateways listed.
    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }

    pub fn load(path: &Path) -> Result<GatewayList, TlsError> {
        let text = String::from_utf8(read(path)?).map_err(|_| TlsError::GatewayList {
            path: path.display().to_string(),
            what: "not UTF-8".into(),
        })?;
        let table: BTreeMap<String, String> = toml::from_str(&text).map_err(|e| TlsError::GatewayList {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
        let mut list = GatewayList::default();
        for (id, fp) in table {
            let fp = fp.to_lowercase();
            if fp.len() != 64 || !fp.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(TlsError::GatewayList {
                    path: path.display().to_string(),
                    what: format!("gateway `{id}`: fingerprint must be 64 hex characters (SHA-256)"),
                });
            }
            list.by_fingerprint.insert(fp, id);
        }
        Ok(list)
    }

    pub fn insert(&mut self, id: &str, fingerprint: &str) {
        self.by_fingerprint.insert(fingerprint.to_lowercase(), id.to_string());
    }

    /// The gateway a certificate belongs to.
    pub fn gateway_of(&self, cert: &CertificateDer<'_>) -> Option<&str> {
        self.by_fingerprint.get(&fingerprint(cert)).map(String::as_str)
    }

    /// The gateway a certificate fingerprint belongs to.
    pub fn gateway_of_fingerprint(&self, fingerprint: &str) -> Option<&str> {
        self.by_fingerprint.get(fingerprint).map(String::as_str)
    }

    /// What changed from `self` to `new`: gateway ids added, ids removed, and ids whose certificate changed.
    pub fn changes(&self, new: &GatewayList) -> GatewayListChanges {
        let ids = |l: &GatewayList| -> BTreeMap<String, Vec<String>> {
            let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (fp, id) in &l.by_fingerprint {
                by_id.entry(id.clone()).or_default().push(fp.clone());
            }
            by_id
        };
        let (old, new) = (ids(self), ids(new));
        GatewayListChanges {
            added: new.keys().filter(|id| !old.contains_key(*id)).cloned().collect(),
            removed: old.keys().filter(|id| !new.contains_key(*id)).cloned().collect(),
            recertified: new
                .iter()
                .filter(|(id, fps)| old.get(*id).is_some_and(|o| o != *fps))
                .map(|(id, _)| id.clone())
                .collect(),
        }
    }

    /// The file form.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# gateway id = SHA-256 fingerprint of its client certificate (DER)\n");
        let by_id: BTreeMap<&String, &String> = self.by_fingerprint.iter().map(|(f, id)| (id, f)).collect();
        for (id, fp) in by_id {
            out.push_str(&format!("\"{id}\" = \"{fp}\"\n"));
        }
        out
    }
}

/// What a new gateway list changes (gateway ids).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayListChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Listed before and after, with another certificate.
    pub recertified: Vec<String>,
}

/// The gateway list in force in a running server, replaced whole when it is read again (SIGHUP): handshakes check
/// the list in force when they happen, and connections may watch for a new one.
#[derive(Clone, Debug)]
pub struct SharedGatewayList(Arc<tokio::sync::watch::Sender<GatewayList>>);

impl SharedGatewayList {
    pub fn new(list: GatewayList) -> SharedGatewayList {
        SharedGatewayList(Arc::new(tokio::sync::watch::Sender::new(list)))
    }

    /// The list in force.
    pub fn current(&self) -> GatewayList {
        self.0.borrow().clone()
    }

    /// The gateway a certificate fingerprint belongs to, in the list in force.
    pub fn gateway_of_fingerprint(&self, fingerprint: &str) -> Option<String> {
        self.0.borrow().gateway_of_fingerprint(fingerprint).map(str::to_string)
    }

    /// Puts `list` in force and returns what it changed.
    pub fn replace(&self, list: GatewayList) -> GatewayListChanges {
        let old = self.0.send_replace(list);
        old.changes(&self.0.borrow())
    }

    /// Sees each list put in force from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<GatewayList> {
        self.0.subscribe()
    }
}

impl From<GatewayList> for SharedGatewayList {
    fn from(list: GatewayList) -> SharedGatewayList {
        SharedGatewayList::new(list)
    }
}

/// Chain check by webpki, then the gateway list in force.
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    gateways: SharedGatewayList,
}

impl fmt::Debug for AllowListVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AllowListVerifier({} gateways)", self.gateways.0.borrow().len())
    }
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.gateways.0.borrow().gateway_of(end_entity).is_none() {
            tracing::warn!(fingerprint = %fingerprint(end_entity), "client certificate not on the gateway list");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// Server side: TLS 1.3 only, client certificate required, chained to `client_ca` and on `gateways`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    gateways: GatewayList,
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_shared(cert, key, client_ca, SharedGatewayList::new(gateways))
}

/// [`server_config`] checking each handshake against the list in force in `gateways` (which may be replaced).
pub fn server_config_shared(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    gateways: SharedGatewayList,
) -> Result<rustls::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)?), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(AllowListVerifier { inner, gateways });
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// Gateway side: TLS 1.3 only, the server checked against `server_ca` (and its name at connect time), our
/// certificate presented.
pub fn client_config(cert: &Path, key: &Path, server_ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(server_ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// What `certs init` wrote: the CA in `ca/` (its key to keep offline: it only issues certificates), and one
/// folder per host with only what that host deploys — its own certificate and key and the CA certificate (the
/// server's also the gateway list and the PIN keys):
///
/// ```text
/// DIR/ca/ca.pem ca.key
/// DIR/server/server.pem server.key ca.pem gateways.toml pin-keys
/// DIR/gateway-ID/gateway.pem gateway.key ca.pem
/// ```
#[derive(Clone, Debug)]
pub struct CertsDir {
    pub dir: PathBuf,
}

impl CertsDir {
    /// The CA's folder: its certificate and private key.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
    /// The CA certificate (each host folder has a copy).
    pub fn ca(&self) -> PathBuf {
        self.ca_dir().join("ca.pem")
    }
    /// The CA's private key: keep it offline.
    pub fn ca_key(&self) -> PathBuf {
        self.ca_dir().join("ca.key")
    }
    /// What the PIN server deploys.
    pub fn server_dir(&self) -> PathBuf {
        self.dir.join("server")
    }
    /// The CA certificate the server checks gateways with.
    pub fn server_ca(&self) -> PathBuf {
        self.server_dir().join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.server_dir().join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.server_dir().join("server.key")
    }
    pub fn gateways(&self) -> PathBuf {
        self.server_dir().join("gateways.toml")
    }
    pub fn pin_keys(&self) -> PathBuf {
        self.server_dir().join("pin-keys")
    }
    /// What gateway `id` deploys.
    pub fn gateway_dir(&self, id: &str) -> PathBuf {
        self.dir.join(format!("gateway-{id}"))
    }
    pub fn gateway_cert(&self, id: &str) -> PathBuf {
        self.gateway_dir(id).join("gateway.pem")
    }
    pub fn gateway_key(&self, id: &str) -> PathBuf {
        self.gateway_dir(id).join("gateway.key")
    }
    /// The CA certificate gateway `id` checks servers with.
    pub fn gateway_ca(&self, id: &str) -> PathBuf {
        self.gateway_dir(id).join("ca.pem")
    }
}

fn write_secret(path: &Path, data: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)
}

/// Writes a new encryption key spec (`1:64-hex`) to `path`, readable by its owner only. Never overwrites: a key
/// file replaced is every PIN sealed under it lost.
pub fn write_new_key(path: &Path) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let spec = zeroize::Zeroizing::new(
        crate::crypto::PinCipher::generate_spec().map_err(|e| TlsError::Generate(e.to_string()))?,
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(spec.as_bytes()).map_err(io)
}

fn write_public(path: &Path, data: &str) -> Result<(), TlsError> {
    std::fs::write(path, data).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Options of `certs init`.
#[derive(Clone, Debug)]
pub struct CertsInit {
    /// Names (DNS or IP) the server certificate is valid for.
    pub server_names: Vec<String>,
    /// Gateway ids to issue client certificates for.
    pub gateways: Vec<String>,
    /// Validity in days.
    pub days: i64,
}

impl Default for CertsInit {
    fn default() -> CertsInit {
        CertsInit {
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            gateways: vec!["gw1".into()],
            days: 825,
        }
    }
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// The private CA, kept in memory by whoever created it (tests issue more certificates with it).
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

/// Creates a private CA, a server certificate, one client certificate per gateway, the gateway list and a PIN
/// encryption key file in `dir`, laid out as [`CertsDir`] says: the CA's key in `ca/` (mode 0700), apart from the
/// host folders. Private keys are written mode 0600. An existing CA is never overwritten.
pub fn certs_init(dir: &Path, opts: &CertsInit) -> Result<CertsDir, TlsError> {
    certs_init_with_ca(dir, opts).map(|(d, _)| d)
}

/// [`certs_init`], also returning the CA.
pub fn certs_init_with_ca(dir: &Path, opts: &CertsInit) -> Result<(CertsDir, Ca), TlsError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    use std::os::unix::fs::DirBuilderExt;
    let out = CertsDir { dir: dir.to_path_buf() };
    // A CA made by this command, or by one before the CA had its own folder.
    for ca in [out.ca(), dir.join("ca.pem")] {
        if ca.exists() {
            return Err(TlsError::Generate(format!(
                "{} exists: refusing to overwrite a CA",
                ca.display()
            )));
        }
    }
    let folders = [out.server_dir()]
        .into_iter()
        .chain(opts.gateways.iter().map(|id| out.gateway_dir(id)));
    for (folder, mode) in [(out.ca_dir(), 0o700)].into_iter().chain(folders.map(|f| (f, 0o755))) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&folder)
            .map_err(|source| TlsError::Io {
                path: folder.display().to_string(),
                source,
            })?;
    }
    let now = time_now();
    let until = now + time_days(opts.days);

    let ca = ca_params(now, until)?;
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;
    write_public(&out.ca(), &ca_cert.pem())?;
    write_secret(&out.ca_key(), &zeroize::Zeroizing::new(ca_key.serialize_pem()))?;
    write_public(&out.server_ca(), &ca_cert.pem())?;

    let mut server = CertificateParams::new(opts.server_names.clone()).map_err(gen_err)?;
    server.distinguished_name.push(DnType::CommonName, "pingate PIN server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now;
    server.not_after = until;
    let server_key = KeyPair::generate().map_err(gen_err)?;
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).map_err(gen_err)?;
    write_public(&out.server_cert(), &server_cert.pem())?;
    write_secret(&out.server_key(), &zeroize::Zeroizing::new(server_key.serialize_pem()))?;

    let mut list = GatewayList::default();
    for id in &opts.gateways {
        let (cert, key) = issue_gateway_cert(&ca_cert, &ca_key, id, now, until)?;
        write_public(&out.gateway_cert(id), &cert.pem())?;
        write_secret(&out.gateway_key(id), &zeroize::Zeroizing::new(key.serialize_pem()))?;
        write_public(&out.gateway_ca(id), &ca_cert.pem())?;
        list.insert(id, &fingerprint(cert.der()));
    }
    write_public(&out.gateways(), &list.to_toml())?;
    let mut keys = zeroize::Zeroizing::new(
        crate::crypto::PinCipher::generate_spec().map_err(|e| TlsError::Generate(e.to_string()))?,
    );
    keys.push('\n');
    write_secret(&out.pin_keys(), &keys)?;
    Ok((
        out,
        Ca {
            cert: ca_cert,
            key: ca_key,
        },
    ))
}

/// The private CA's certificate parameters: the same subject and key make the same issuer, so that a CA read back
/// from `ca/ca.key` issues certificates that chain to the `ca.pem` written at `certs init`.
fn ca_params(from: time::OffsetDateTime, until: time::OffsetDateTime) -> Result<rcgen::CertificateParams, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "pingate private CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = from;
    ca.not_after = until;
    Ok(ca)
}

/// The CA of a `certs init` folder, read back from its key (`DIR/ca/ca.key`), to issue more certificates.
pub fn load_ca(certs: &CertsDir) -> Result<Ca, TlsError> {
    let pem = crate::keyfile::read_to_string(&certs.ca_key())?;
    let key = rcgen::KeyPair::from_pem(&pem).map_err(gen_err)?;
    let now = time_now();
    let cert = ca_params(now, now + time_days(3650))?
        .self_signed(&key)
        .map_err(gen_err)?;
    Ok(Ca { cert, key })
}

/// What `certs terminal` issues: a client certificate for terminals and NACs, or a server certificate for a
/// gateway's terminal listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Issue {
    /// A terminal's (its CN is its terminal id) or a NAC's (its CN is the NAC's name in `[[nac]]`).
    Client,
    /// A terminal listener's (TLS server), valid for the names given (DNS or IP).
    Listener,
}

/// Issues a certificate signed by the CA of `certs` (its key must be at hand): `names[0]` is the subject's CN, and
/// every name is a subject alternative name. Writes `OUT/NAME.pem` and `OUT/NAME.key` (mode 0600) and `OUT/ca.pem`;
/// never overwrites a key.
pub fn issue(certs: &CertsDir, kind: Issue, names: &[String], days: i64, out: &Path) -> Result<PathBuf, TlsError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let Some(first) = names.first() else {
        return Err(TlsError::Generate("at least one name is needed".into()));
    };
    if !first
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(TlsError::Generate(format!(
            "`{first}`: names of issued certificates are letters, digits, `-`, `_` and `.`"
        )));
    }
    let ca = load_ca(certs)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let (pem_path, key_path) = (out.join(format!("{first}.pem")), out.join(format!("{first}.key")));
    if key_path.exists() {
        return Err(TlsError::Generate(format!(
            "{} exists: refusing to overwrite a key",
            key_path.display()
        )));
    }
    let mut p = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
    p.distinguished_name.push(DnType::CommonName, first.as_str());
    p.extended_key_usages = vec![match kind {
        Issue::Client => ExtendedKeyUsagePurpose::ClientAuth,
        Issue::Listener => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    let now = time_now();
    p.not_before = now;
    p.not_after = now + time_days(days);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key).map_err(gen_err)?;
    write_secret(&key_path, &zeroize::Zeroizing::new(key.serialize_pem()))?;
    write_public(&pem_path, &cert.pem())?;
    write_public(
        &out.join("ca.pem"),
        &std::fs::read_to_string(certs.ca()).map_err(|source| TlsError::Io {
            path: certs.ca().display().to_string(),
            source,
        })?,
    )?;
    Ok(pem_path)
}

/// A client certificate for gateway `id`, signed by the CA, valid from `from` to `until`.
pub fn issue_gateway_cert(
    ca_cert: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    id: &str,
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("pingate gateway {id}"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = from;
    p.not_after = until;
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, ca_cert, ca_key).map_err(gen_err)?;
    Ok((cert, key))
}

/// Now, as the certificate library wants it.
pub fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A number of days, as the certificate library wants it.
pub fn time_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}
