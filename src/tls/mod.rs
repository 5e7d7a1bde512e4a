//! TLS for the gRPC edge: the server's certificate and key, the CAs whose client
//! certificates it accepts, and the PEM checks the reviewer CLI shares.
//!
//! The handshake is rustls with the pure-Rust `ring` provider, inside tonic (`tls-ring`):
//! no OpenSSL, no cmake, no system library. Everything is read and checked once, before
//! the server listens: a missing or oversized file, a PEM without a certificate, a key
//! that does not belong to the certificate, a CA bundle with nothing usable in it all stop
//! start-up with one line naming the setting and the file. Nothing here panics on what a
//! file contains.
//!
//! Client certificates: with `[auth.mtls]` the server asks for one in every handshake and
//! verifies it against `client_ca` (chain, validity, client-auth usage). A certificate from
//! any other CA fails the handshake, so no call is ever made on it. The certificate is
//! *required* when mTLS is the only authentication method, and *optional* when bearer
//! credentials (JWT, static tokens) are configured too, so their clients need none; see
//! `auth::chain` for which one names the caller when a request has both.

pub mod trial;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::auth::AuthSettings;

/// The server's certificate and key: PEM files, paths already resolved (file paths against
/// the config file's directory, flag paths against the working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// PEM files larger than this are not certificates or keys; refused before they are read.
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;
/// A client that has not finished its handshake by then is disconnected, so half-open
/// handshakes cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The server warns at start when its certificate expires sooner than this.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A TLS file that cannot be used. `what` names the setting (`tls.cert`, `--ca-cert`, …);
/// no variant ever quotes a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {problem}", path.display())]
    Content {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("TLS: {0}")]
    Rejected(String),
}

/// Whether the server asks clients for a certificate, and what happens without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Not asked for (no `[auth.mtls]`).
    Off,
    /// Asked for and verified if sent; a client without one authenticates otherwise.
    Optional,
    /// Every handshake must present one from a configured CA.
    Required,
}

impl ClientCertificates {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientCertificates::Off => "off",
            ClientCertificates::Optional => "optional",
            ClientCertificates::Required => "required",
        }
    }
}

/// The client CA bundle and whether a certificate is required, for [`server_config`].
#[derive(Debug, Clone)]
pub struct ClientCa {
    pub path: PathBuf,
    pub required: bool,
}

/// Makes ring the process-wide rustls provider, which tonic's acceptor and connector use.
/// Only ring is compiled in, so this is what rustls would pick anyway; saying so keeps a
/// second provider enabled by some future dependency from turning into a panic at the
/// first handshake. `Err` only means one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Reads the server's certificate, key and (for mTLS) client CA bundle, checks them, and
/// returns tonic's TLS configuration with how client certificates are treated.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&ClientCa>,
) -> Result<(ServerTlsConfig, ClientCertificates), TlsError> {
    install_crypto_provider();
    let cert_pem = read_pem("tls.cert", cert)?;
    let key_pem = read_pem("tls.key", key)?;
    let chain = certificates("tls.cert", cert, &cert_pem)?;
    if let Some(warning) = chain.first().and_then(|leaf| expiry_warning(leaf)) {
        tracing::warn!(cert = %cert.display(), "the server certificate {warning}");
    }
    check_key_pair(("tls.cert", cert), ("tls.key", key), chain, &key_pem)?;
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .timeout(HANDSHAKE_TIMEOUT);
    let mut client_certificates = ClientCertificates::Off;
    if let Some(ca) = client_ca {
        let pem = read_pem("auth.mtls.client_ca", &ca.path)?;
        trust_anchors("auth.mtls.client_ca", &ca.path, &pem)?;
        config = config
            .client_ca_root(Certificate::from_pem(pem))
            .client_auth_optional(!ca.required);
        client_certificates = if ca.required {
            ClientCertificates::Required
        } else {
            ClientCertificates::Optional
        };
    }
    Ok((config, client_certificates))
}

/// A rustls server configuration for an HTTP/1.1 listener (Slack interactivity) with the
/// server's certificate and key, checked as for the gRPC edge. No client certificates:
/// those callers authenticate by signature.
pub fn https_server_config(
    cert: &Path,
    key: &Path,
) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
    let cert_pem = read_pem("tls.cert", cert)?;
    let key_pem = read_pem("tls.key", key)?;
    let chain = certificates("tls.cert", cert, &cert_pem)?;
    check_key_pair(
        ("tls.cert", cert),
        ("tls.key", key),
        chain.clone(),
        &key_pem,
    )?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| content("tls.key", key, "no private key in the file"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsError::Rejected(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// A PEM file, bounded in size.
pub fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(read)?;
    if pem.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(content(
            what,
            path,
            format!("larger than {MAX_PEM_FILE_BYTES} bytes; not a PEM certificate or key"),
        ));
    }
    Ok(pem)
}

fn content(what: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Content {
        what,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
pub fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(what, path, format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(content(
            what,
            path,
            "no certificate in the file (expected PEM `-----BEGIN CERTIFICATE-----`)",
        ));
    }
    for (index, der) in chain.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|e| {
            content(
                what,
                path,
                format!(
                    "certificate {} is not a valid X.509 certificate: {e}",
                    index + 1
                ),
            )
        })?;
    }
    Ok(chain)
}

/// Checks that the key file holds a private key rustls can use, and that it belongs to
/// the first certificate of `chain`. Never quotes the key.
pub fn check_key_pair(
    (cert_what, cert_path): (&'static str, &Path),
    (key_what, key_path): (&'static str, &Path),
    chain: Vec<CertificateDer<'static>>,
    key_pem: &[u8],
) -> Result<(), TlsError> {
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        content(
            key_what,
            key_path,
            "no private key in the file (expected PEM: PKCS#8 `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
        )
    })?;
    match rustls::sign::CertifiedKey::from_der(chain, key, &provider()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(content(
            key_what,
            key_path,
            format!(
                "is not the key of the certificate in {cert_what} {}",
                cert_path.display()
            ),
        )),
        Err(e) => Err(content(key_what, key_path, format!("unusable key: {e}"))),
    }
}

/// Checks that every certificate of a CA bundle can serve as a trust anchor; returns how
/// many there are. tonic would silently skip the ones it cannot use.
pub fn trust_anchors(what: &'static str, path: &Path, pem: &[u8]) -> Result<usize, TlsError> {
    let certs = certificates(what, path, pem)?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if ignored > 0 {
        return Err(content(
            what,
            path,
            format!("{ignored} certificate(s) cannot be used as a CA"),
        ));
    }
    Ok(added)
}

/// "expired …", "is not valid before …" or "expires in …" when that is soon.
fn expiry_warning(leaf: &CertificateDer<'_>) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let validity = certificate.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        return Some(format!("is not valid before {}", validity.not_before));
    }
    match validity.time_to_expiration() {
        None => Some(format!(
            "expired on {}; clients will refuse it",
            validity.not_after
        )),
        Some(left) if left < EXPIRY_WARNING => Some(format!(
            "expires on {} (in {} days)",
            validity.not_after,
            left.whole_days()
        )),
        Some(_) => None,
    }
}

/// The configured client CA, when client certificates are on. Relative paths are relative
/// to the config file, like every other path under `[auth]`.
pub fn client_ca(auth: &AuthSettings) -> Option<ClientCa> {
    match auth {
        AuthSettings::Credentials {
            jwt,
            tokens,
            mtls: Some(mtls),
            base_dir,
        } => Some(ClientCa {
            path: base_dir.join(&mtls.client_ca),
            required: jwt.is_none() && tokens.is_none(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    fn self_signed(san: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![san.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_matching_certificate_and_key_load() {
        let files = Files::new();
        let (cert, key) = self_signed("localhost");
        let cert = files.write("server.pem", cert.as_bytes());
        let key = files.write("server-key.pem", key.as_bytes());
        let (_, client) = server_config(&cert, &key, None).unwrap();
        assert_eq!(client, ClientCertificates::Off);
        let ca = ClientCa {
            path: cert.clone(),
            required: true,
        };
        let (_, client) = server_config(&cert, &key, Some(&ca)).unwrap();
        assert_eq!(client, ClientCertificates::Required);
    }

    #[test]
    fn missing_empty_swapped_and_mismatched_files_are_refused_naming_the_setting_and_file() {
        let files = Files::new();
        let (cert, key) = self_signed("localhost");
        let (_, other_key) = self_signed("localhost");
        let cert_path = files.write("server.pem", cert.as_bytes());
        let key_path = files.write("server-key.pem", key.as_bytes());
        let other_key = files.write("other-key.pem", other_key.as_bytes());
        let empty = files.write("empty.pem", b"");
        let garbage = files.write("garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64!\n");
        let bad_der = files.write(
            "bad-der.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let huge = files.write("huge.pem", &vec![b'a'; MAX_PEM_FILE_BYTES as usize + 1]);
        let missing = files.dir.path().join("missing.pem");
        for (cert, key, expected) in [
            (&missing, &key_path, "cannot read tls.cert"),
            (&cert_path, &missing, "cannot read tls.key"),
            (&empty, &key_path, "no certificate in the file"),
            (&garbage, &key_path, "not valid PEM"),
            (&bad_der, &key_path, "not a valid X.509 certificate"),
            (&huge, &key_path, "larger than"),
            (&key_path, &cert_path, "no certificate in the file"),
            (&cert_path, &cert_path, "no private key in the file"),
            (&cert_path, &other_key, "is not the key of the certificate"),
        ] {
            let err = server_config(cert, key, None).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(err.contains(".pem"), "names the file: {err}");
            assert!(!err.contains("PRIVATE KEY-----"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn a_client_ca_bundle_must_hold_usable_certificates() {
        let files = Files::new();
        let (cert, key) = self_signed("localhost");
        let cert = files.write("server.pem", cert.as_bytes());
        let key_path = files.write("server-key.pem", key.as_bytes());
        let ca = ClientCa {
            path: key_path.clone(),
            required: false,
        };
        let err = server_config(&cert, &key_path, Some(&ca)).unwrap_err();
        assert!(err.to_string().starts_with("auth.mtls.client_ca "), "{err}");
    }

    #[test]
    fn an_expired_certificate_is_noticed() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = params.self_signed(&key).unwrap();
        let warning = expiry_warning(expired.der()).unwrap();
        assert!(warning.starts_with("expired on"), "{warning}");
        let (fresh, _) = self_signed("localhost");
        let fresh = CertificateDer::from_pem_slice(fresh.as_bytes()).unwrap();
        assert_eq!(expiry_warning(&fresh), None);
    }
}
