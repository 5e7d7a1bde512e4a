//! Client certificates (mTLS): the caller is whoever its verified certificate names.
//!
//! The TLS layer (`crate::tls`) has already verified the certificate chain against the
//! configured `client_ca` before any request arrives; a certificate from another CA never
//! completes the handshake. What is left is to map the certificate to a principal: its
//! subject alternative names (a URI SAN such as the SPIFFE ID
//! `spiffe://example.org/agent/deployer`, or a DNS SAN) are looked up among the configured
//! `[[auth.mtls.identities]]`. The subject's common name is never consulted.
//!
//! Matching is exact: a URI SAN byte for byte, a DNS SAN ignoring ASCII case (DNS names
//! are case-insensitive). A configured `san` with a `:` is a URI SAN, one without is a DNS
//! name; a certificate's URI SAN never matches a DNS entry or the other way round. `*` is
//! refused in the configuration rather than read as a pattern.
//!
//! A certificate whose SANs match no entry is refused naming the SANs it carries (a SAN is
//! not a secret, and it is what the operator needs to add a mapping). One whose SANs match
//! entries of different principals is refused as ambiguous. The principal is recorded as
//! `authenticated_by = mtls:<san>`.
//!
//! There is no revocation list: to revoke a certificate, remove its mapping (or rotate the
//! CA) and restart.

use std::collections::HashMap;
use std::path::PathBuf;

use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use tonic::Request;
use x509_parser::extensions::GeneralName;

use super::credentials::{AuthConfigError, MAX_ID_BYTES, normalize_groups, valid_name};
use super::{AuthError, Authenticator};
use crate::domain::{Principal, PrincipalKind};

/// Prefix of `Principal::authenticated_by`, followed by the SAN that matched.
pub const METHOD_PREFIX: &str = "mtls:";
/// Most identities a configuration may map.
pub const MAX_ENTRIES: usize = 1024;
/// Longest SAN accepted in the configuration (the SPIFFE limit for an ID).
pub const MAX_SAN_BYTES: usize = 2048;
/// A certificate may carry many SANs; an error message names at most this many.
const MAX_SANS_SHOWN: usize = 8;
/// Each SAN named in an error message is cut to this many characters.
const MAX_SAN_SHOWN_CHARS: usize = 256;

/// `[auth.mtls]` in the server configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// PEM bundle of the CAs whose client certificates the TLS layer accepts. Relative to
    /// the configuration file's directory.
    pub client_ca: PathBuf,
    /// Which certificate is which principal.
    #[serde(default)]
    pub identities: Vec<IdentityEntry>,
}

/// One certificate identity and the principal it stands for.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityEntry {
    /// A URI SAN (e.g. a SPIFFE ID) or a DNS SAN, matched exactly.
    pub san: String,
    pub principal: String,
    /// `agent` or `human`.
    pub kind: PrincipalKind,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The two kinds of SAN that can name a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SanKind {
    Uri,
    Dns,
}

/// A SAN as a lookup key: DNS names lower-cased, URIs as they are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct San {
    kind: SanKind,
    value: String,
}

impl San {
    fn uri(value: &str) -> San {
        San {
            kind: SanKind::Uri,
            value: value.to_string(),
        }
    }

    fn dns(value: &str) -> San {
        San {
            kind: SanKind::Dns,
            value: value.to_ascii_lowercase(),
        }
    }
}

/// `URI:…` / `DNS:…` (openssl's notation), with anything unprintable escaped and long
/// values cut: SANs come from the client and end up in logs and status messages.
impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = match self.kind {
            SanKind::Uri => "URI:",
            SanKind::Dns => "DNS:",
        };
        f.write_str(prefix)?;
        for (shown, c) in self.value.chars().enumerate() {
            if shown == MAX_SAN_SHOWN_CHARS {
                return f.write_str("…");
            }
            if c.is_ascii_graphic() {
                f.write_fmt(format_args!("{c}"))?;
            } else {
                f.write_fmt(format_args!("{}", c.escape_default()))?;
            }
        }
        Ok(())
    }
}

/// Maps verified client certificates to principals; see the module documentation.
pub struct MtlsAuthenticator {
    identities: HashMap<San, Principal>,
}

/// Names the mapped identities; certificates are not secrets, but keep it short.
impl std::fmt::Debug for MtlsAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsAuthenticator")
            .field("identities", &self.identities.len())
            .finish()
    }
}

impl MtlsAuthenticator {
    /// Checks every entry: a valid SAN (no `*`), principal and groups; no SAN twice. Errors
    /// name the entry. The CA bundle is the TLS layer's to load (`crate::tls`).
    pub fn from_config(config: &MtlsConfig) -> Result<Self, AuthConfigError> {
        if config.identities.is_empty() {
            return Err(AuthConfigError::Invalid(
                "auth.mtls: map at least one certificate SAN to a principal ([[auth.mtls.identities]])".into(),
            ));
        }
        if config.identities.len() > MAX_ENTRIES {
            return Err(AuthConfigError::Invalid(format!(
                "auth.mtls: at most {MAX_ENTRIES} identities"
            )));
        }
        let mut identities: HashMap<San, Principal> = HashMap::new();
        for (index, entry) in config.identities.iter().enumerate() {
            let what = format!("auth.mtls.identities[{index}]");
            let san = configured_san(&entry.san)
                .map_err(|problem| AuthConfigError::Invalid(format!("{what}: san {problem}")))?;
            let what = format!("{what} (`{}`)", entry.san);
            if !valid_name(&entry.principal, MAX_ID_BYTES) {
                return Err(AuthConfigError::Invalid(format!(
                    "{what}: principal must be 1..{MAX_ID_BYTES} printable ASCII characters without spaces"
                )));
            }
            let groups =
                normalize_groups(&entry.groups, &what).map_err(AuthConfigError::Invalid)?;
            let principal = Principal {
                id: entry.principal.clone(),
                kind: entry.kind,
                groups,
                authenticated_by: format!("{METHOD_PREFIX}{}", san.value),
            };
            if identities.insert(san, principal).is_some() {
                return Err(AuthConfigError::Invalid(format!(
                    "{what}: the same SAN is mapped twice"
                )));
            }
        }
        Ok(MtlsAuthenticator { identities })
    }

    /// The principal of a verified client certificate chain (leaf first, as TLS presents
    /// it). `Missing` without a certificate.
    pub fn verify(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Principal, AuthError> {
        let Some(leaf) = peer_certs.and_then(<[_]>::first) else {
            return Err(AuthError::Missing(
                "present a client certificate signed by the configured CA".into(),
            ));
        };
        let sans = certificate_sans(leaf)?;
        if sans.is_empty() {
            return Err(AuthError::Invalid(
                "the client certificate has no URI or DNS subject alternative name".into(),
            ));
        }
        let mut found: Option<(&San, &Principal)> = None;
        for san in &sans {
            let Some(principal) = self.identities.get(san) else {
                continue;
            };
            match found {
                None => found = Some((san, principal)),
                Some((_, first)) if same_caller(first, principal) => {}
                Some((first_san, first)) => {
                    return Err(AuthError::Invalid(format!(
                        "the client certificate is ambiguous: {first_san} is mapped to {}, {san} to {}",
                        first.id, principal.id
                    )));
                }
            }
        }
        match found {
            Some((_, principal)) => Ok(principal.clone()),
            None => Err(AuthError::Invalid(format!(
                "no principal is mapped to the client certificate's SANs: {}",
                list(&sans)
            ))),
        }
    }
}

impl Authenticator for MtlsAuthenticator {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError> {
        self.verify(request.peer_certs().as_deref().map(Vec::as_slice))
    }
}

/// Two entries for one caller (e.g. a URI and a DNS SAN of the same workload) are not
/// ambiguous; how it authenticated may differ.
fn same_caller(a: &Principal, b: &Principal) -> bool {
    a.id == b.id && a.kind == b.kind && a.groups == b.groups
}

/// A `san` from the configuration as a lookup key, or what is wrong with it.
fn configured_san(value: &str) -> Result<San, String> {
    if !valid_name(value, MAX_SAN_BYTES) {
        return Err(format!(
            "must be 1..{MAX_SAN_BYTES} printable ASCII characters without spaces"
        ));
    }
    if value.contains('*') {
        return Err("is matched exactly; `*` is not a pattern, name the SAN itself".into());
    }
    match value.split_once(':') {
        Some((scheme, rest)) => {
            let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if !scheme_ok || rest.is_empty() {
                return Err(
                    "with a `:` is a URI SAN and needs a scheme, e.g. spiffe://example.org/agent/deployer"
                        .into(),
                );
            }
            Ok(San::uri(value))
        }
        None => {
            let labels_ok = value.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
            if !labels_ok || value.len() > 253 {
                return Err(
                    "without a `:` is a DNS SAN and must be a host name, e.g. deployer.example.org"
                        .into(),
                );
            }
            Ok(San::dns(value))
        }
    }
}

/// The URI and DNS SANs of a DER certificate, in the certificate's order.
fn certificate_sans(der: &[u8]) -> Result<Vec<San>, AuthError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| AuthError::Invalid("the client certificate cannot be parsed".into()))?;
    let extension = certificate.subject_alternative_name().map_err(|_| {
        AuthError::Invalid("the client certificate's subjectAltName cannot be parsed".into())
    })?;
    let Some(extension) = extension else {
        return Ok(Vec::new());
    };
    Ok(extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(San::uri(uri)),
            GeneralName::DNSName(dns) => Some(San::dns(dns)),
            _ => None,
        })
        .collect())
}

/// `a, b, c and 4 more`.
fn list(sans: &[San]) -> String {
    let mut shown: Vec<String> = sans
        .iter()
        .take(MAX_SANS_SHOWN)
        .map(ToString::to_string)
        .collect();
    if sans.len() > MAX_SANS_SHOWN {
        shown.push(format!("and {} more", sans.len() - MAX_SANS_SHOWN));
    }
    shown.join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA-signed client certificate with these SANs (`URI:`/`DNS:` prefixes), as DER.
    pub(crate) fn certificate(sans: &[&str]) -> CertificateDer<'static> {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.split_once(':') {
                Some(("URI", v)) => rcgen::SanType::URI(v.try_into().unwrap()),
                Some(("DNS", v)) => rcgen::SanType::DnsName(v.try_into().unwrap()),
                _ => panic!("URI: or DNS: {san}"),
            })
            .collect();
        // The common name says "alice"; it must never count.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        params.signed_by(&key, &issuer).unwrap().into()
    }

    fn entry(san: &str, principal: &str, kind: PrincipalKind, groups: &[&str]) -> IdentityEntry {
        IdentityEntry {
            san: san.into(),
            principal: principal.into(),
            kind,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub(crate) fn config() -> MtlsConfig {
        MtlsConfig {
            client_ca: "ca.pem".into(),
            identities: vec![
                entry(
                    "spiffe://example.org/agent/deployer",
                    "deployer",
                    PrincipalKind::Agent,
                    &["deployers"],
                ),
                entry(
                    "Alice.Reviewers.example.org",
                    "alice",
                    PrincipalKind::Human,
                    &["sre", "security"],
                ),
                entry(
                    "spiffe://example.org/human/alice",
                    "alice",
                    PrincipalKind::Human,
                    &["security", "sre"],
                ),
                entry(
                    "spiffe://example.org/agent/other",
                    "other",
                    PrincipalKind::Agent,
                    &[],
                ),
            ],
        }
    }

    fn verify(sans: &[&str]) -> Result<Principal, AuthError> {
        let auth = MtlsAuthenticator::from_config(&config()).unwrap();
        auth.verify(Some(&[certificate(sans)]))
    }

    #[test]
    fn a_uri_san_maps_to_its_principal() {
        let p = verify(&["URI:spiffe://example.org/agent/deployer"]).unwrap();
        assert_eq!(p.id, "deployer");
        assert_eq!(p.kind, PrincipalKind::Agent);
        assert_eq!(p.groups, vec!["deployers"]);
        assert_eq!(
            p.authenticated_by,
            "mtls:spiffe://example.org/agent/deployer"
        );
    }

    #[test]
    fn a_dns_san_maps_ignoring_case_and_the_common_name_never_counts() {
        let p = verify(&["DNS:alice.REVIEWERS.example.org"]).unwrap();
        assert_eq!(p.id, "alice");
        assert_eq!(p.kind, PrincipalKind::Human);
        assert_eq!(p.authenticated_by, "mtls:alice.reviewers.example.org");
        // The certificate's CN is "alice", but without a mapped SAN it is nobody.
        let err = verify(&["DNS:unknown.example.org"]).unwrap_err();
        assert!(matches!(err, AuthError::Invalid(_)), "{err}");
    }

    #[test]
    fn uri_sans_are_exact_and_never_match_dns_entries() {
        for sans in [
            &["URI:spiffe://example.org/agent/deployer/"][..],
            &["URI:SPIFFE://example.org/agent/deployer"],
            &["URI:alice.reviewers.example.org"],
            &["DNS:spiffe"],
        ] {
            let err = verify(sans).unwrap_err();
            assert!(matches!(err, AuthError::Invalid(_)), "{sans:?}: {err}");
        }
    }

    #[test]
    fn an_unmapped_certificate_is_refused_naming_its_sans() {
        let err = verify(&[
            "URI:spiffe://example.org/agent/stranger",
            "DNS:stranger.example.org",
        ])
        .unwrap_err();
        assert_eq!(
            err,
            AuthError::Invalid(
                "no principal is mapped to the client certificate's SANs: \
                 URI:spiffe://example.org/agent/stranger, DNS:stranger.example.org"
                    .into()
            )
        );
    }

    #[test]
    fn many_or_odd_sans_are_named_briefly_and_escaped() {
        let many: Vec<String> = (0..20)
            .map(|i| format!("DNS:host{i}.example.org"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let message = verify(&many).unwrap_err().to_string();
        assert!(message.contains("host7.example.org"), "{message}");
        assert!(!message.contains("host8.example.org"), "{message}");
        assert!(message.ends_with("and 12 more"), "{message}");

        let odd = San::uri("spiffe://x/\u{1b}[31m\u{202e}");
        assert_eq!(odd.to_string(), "URI:spiffe://x/\\u{1b}[31m\\u{202e}");
        let long = San::uri(&"a".repeat(1000)).to_string();
        assert!(long.chars().count() < 300, "{long}");
    }

    #[test]
    fn sans_of_different_principals_are_ambiguous_and_of_one_principal_are_not() {
        let err = verify(&[
            "URI:spiffe://example.org/agent/deployer",
            "URI:spiffe://example.org/agent/other",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
        assert!(err.to_string().contains("deployer"), "{err}");
        assert!(err.to_string().contains("other"), "{err}");

        let p = verify(&[
            "URI:spiffe://example.org/human/alice",
            "DNS:alice.reviewers.example.org",
        ])
        .unwrap();
        assert_eq!(p.id, "alice");
        assert_eq!(p.authenticated_by, "mtls:spiffe://example.org/human/alice");
    }

    #[test]
    fn no_certificate_is_missing_and_no_usable_san_is_invalid() {
        let auth = MtlsAuthenticator::from_config(&config()).unwrap();
        assert!(matches!(auth.verify(None), Err(AuthError::Missing(_))));
        assert!(matches!(auth.verify(Some(&[])), Err(AuthError::Missing(_))));
        let err = auth.verify(Some(&[certificate(&[])])).unwrap_err();
        assert!(err.to_string().contains("no URI or DNS"), "{err}");
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(matches!(
            auth.verify(Some(&[garbage])),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn bad_entries_are_refused_naming_the_entry() {
        for (san, principal, groups, expected) in [
            (
                "spiffe://example.org/agent/*",
                "p",
                &[][..],
                "not a pattern",
            ),
            ("*.example.org", "p", &[], "not a pattern"),
            ("has space", "p", &[], "printable ASCII"),
            ("://nothing", "p", &[], "needs a scheme"),
            ("spiffe:", "p", &[], "needs a scheme"),
            ("bad..dns", "p", &[], "DNS SAN"),
            ("ok.example.org", "", &[], "principal"),
            ("ok.example.org", "p", &["has space"], "group"),
        ] {
            let mut c = config();
            c.identities[1] = entry(san, principal, PrincipalKind::Human, groups);
            let err = MtlsAuthenticator::from_config(&c).unwrap_err().to_string();
            assert!(err.contains("auth.mtls.identities[1]"), "{san}: {err}");
            assert!(err.contains(expected), "{san}: {err}");
        }
    }

    #[test]
    fn duplicate_sans_and_empty_mappings_are_refused() {
        let mut c = config();
        // The same DNS name in another case is the same SAN.
        c.identities[0] = entry(
            "alice.reviewers.EXAMPLE.org",
            "bob",
            PrincipalKind::Human,
            &[],
        );
        let err = MtlsAuthenticator::from_config(&c).unwrap_err().to_string();
        assert!(err.contains("mapped twice"), "{err}");
        let mut c = config();
        c.identities.clear();
        assert!(MtlsAuthenticator::from_config(&c).is_err());
    }

    #[test]
    fn the_config_reads_from_toml_and_refuses_unknown_fields() {
        let parsed: MtlsConfig = toml::from_str(
            r#"
            client_ca = "ca.pem"
            [[identities]]
            san = "spiffe://example.org/agent/deployer"
            principal = "deployer"
            kind = "agent"
            groups = ["deployers"]
            "#,
        )
        .unwrap();
        assert!(MtlsAuthenticator::from_config(&parsed).is_ok());
        for bad in [
            "client_ca = \"ca.pem\"\n[[identities]]\nsan = \"a.b\"\nprincipal = \"p\"\nkind = \"agent\"\npattern = \"*\"",
            "client_ca = \"ca.pem\"\n[[identities]]\nsan = \"a.b\"\nprincipal = \"p\"\nkind = \"root\"",
            "client_cas = \"ca.pem\"",
        ] {
            assert!(toml::from_str::<MtlsConfig>(bad).is_err(), "{bad}");
        }
    }
}
