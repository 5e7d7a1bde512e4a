//! Bearer JWTs from one issuer, verified against configured public keys.
//!
//! Keys come from PEM files (RSA ≥ 2048 bits, EC P-256, Ed25519; public keys only) and/or a
//! JWKS file. Each key fixes its one algorithm (RSA → RS256, P-256 → ES256, Ed25519 →
//! EdDSA): the token header's `alg` only selects among keys and must equal the key's, so
//! `alg: none`, HS256 keyed with a public key, or RS/ES mix-ups never verify. Symmetric
//! keys are never loaded. `kid` is a hint: a token with a `kid` is tried against the key
//! with that `kid` and against keys configured without one; a token without `kid` against
//! every key of its algorithm.
//!
//! After the signature: `iss` must equal the configured issuer (a single string), the
//! configured audience must be among `aud`, `exp` is required, `exp`/`nbf` are checked with
//! a small leeway for clock skew.
//!
//! # Claims to identity
//!
//! Without an `act` claim the token describes the caller: id from `id_claim` (default
//! `sub`), groups from `groups_claim` (a list of strings or a space-separated string), kind
//! from `kind_claim` (`agent`/`human`, else `default_kind`). An optional `acting_for_claim`
//! (a string) names the human the agent acts for.
//!
//! With an RFC 8693 `act` claim the token is a delegation: its subject is the human and the
//! `act` object is the caller. Then the caller's id, groups and kind are read from inside
//! `act` (same claim names), the top-level id becomes [`ActingFor::human`], and the
//! top-level groups and kind (the human's) are not given to the caller. Earlier actors
//! (`act.act`) are not consulted. Only an agent may act for a human.
//!
//! Every error is one of a few fixed phrases plus configured claim names: nothing from the
//! token itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use tonic::Request;

use super::context::{ActingFor, AuthContext};
use super::credentials::{
    self, AuthConfigError, MAX_CREDENTIAL_BYTES, MAX_ID_BYTES, Source, normalize_groups,
    parse_kind, valid_name,
};
use super::{AuthError, Authenticator};
use crate::domain::{Principal, PrincipalKind};

/// Prefix of `Principal::authenticated_by`, followed by the issuer.
pub const METHOD_PREFIX: &str = "jwt:";
/// Default tolerance for clock skew on `exp` and `nbf`.
pub const DEFAULT_LEEWAY_SECONDS: u64 = 30;
/// Larger leeways turn an expired token back into a valid one; refused.
pub const MAX_LEEWAY_SECONDS: u64 = 300;
/// Most keys one issuer may have (PEM files plus JWKS entries); each token tries at most
/// the keys of its algorithm.
pub const MAX_KEYS: usize = 64;
/// Key files larger than this are not key files.
const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;
/// Smallest RSA modulus accepted.
const MIN_RSA_BITS: usize = 2048;

/// `[auth.jwt]` in the server configuration. Relative paths are resolved against the
/// directory of the configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Exact `iss` the tokens carry.
    pub issuer: String,
    /// This service's name in `aud`.
    pub audience: String,
    /// PEM files with one public key each.
    #[serde(default)]
    pub public_keys: Vec<PublicKeyFile>,
    /// A JWKS document (`{"keys": [...]}`) saved to a file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    #[serde(default = "default_id_claim")]
    pub id_claim: String,
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    #[serde(default = "default_kind_claim")]
    pub kind_claim: String,
    /// The kind when the token has no `kind_claim`. Least privilege by default: an agent
    /// can never review.
    #[serde(default = "default_kind")]
    pub default_kind: PrincipalKind,
    /// A string claim naming the human an agent acts for, for issuers that do not use `act`.
    #[serde(default)]
    pub acting_for_claim: Option<String>,
}

/// One PEM public key; `kid` matches tokens whose header names it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    pub path: PathBuf,
    #[serde(default)]
    pub kid: Option<String>,
}

fn default_leeway() -> u64 {
    DEFAULT_LEEWAY_SECONDS
}
fn default_id_claim() -> String {
    "sub".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_kind_claim() -> String {
    "countersign_kind".into()
}
fn default_kind() -> PrincipalKind {
    PrincipalKind::Agent
}

impl JwtConfig {
    /// A configuration with the defaults and no keys yet.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        JwtConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            public_keys: Vec::new(),
            jwks_file: None,
            leeway_seconds: DEFAULT_LEEWAY_SECONDS,
            id_claim: default_id_claim(),
            groups_claim: default_groups_claim(),
            kind_claim: default_kind_claim(),
            default_kind: default_kind(),
            acting_for_claim: None,
        }
    }
}

/// A public key and the one algorithm it verifies.
struct VerificationKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer JWTs of one issuer; see the module documentation.
pub struct JwtAuthenticator {
    issuer: String,
    keys: Vec<VerificationKey>,
    /// The claim checks, one copy per algorithm: each decode allows exactly its key's.
    validations: Vec<(Algorithm, Validation)>,
    id_claim: String,
    groups_claim: String,
    kind_claim: String,
    default_kind: PrincipalKind,
    acting_for_claim: Option<String>,
    authenticated_by: String,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("issuer", &self.issuer)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Loads the key files (relative paths against `base_dir`) and checks the settings.
    pub fn from_config(config: &JwtConfig, base_dir: &Path) -> Result<Self, AuthConfigError> {
        // decode() uses the process-wide provider; choose the pure-Rust one explicitly so a
        // second jsonwebtoken backend enabled elsewhere in the build cannot make it panic.
        // Err only means one is installed already, which is then used.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        let invalid = |m: String| AuthConfigError::Invalid(format!("auth.jwt: {m}"));
        if config.issuer.trim().is_empty() || config.issuer.len() > MAX_ID_BYTES {
            return Err(invalid(format!("issuer must be 1..{MAX_ID_BYTES} bytes")));
        }
        if config.audience.trim().is_empty() {
            return Err(invalid("audience must not be empty".into()));
        }
        if config.leeway_seconds > MAX_LEEWAY_SECONDS {
            return Err(invalid(format!(
                "leeway_seconds must be at most {MAX_LEEWAY_SECONDS}"
            )));
        }
        for (field, claim) in [
            ("id_claim", Some(&config.id_claim)),
            ("groups_claim", Some(&config.groups_claim)),
            ("kind_claim", Some(&config.kind_claim)),
            ("acting_for_claim", config.acting_for_claim.as_ref()),
        ] {
            if let Some(claim) = claim
                && !valid_name(claim, 64)
            {
                return Err(invalid(format!(
                    "{field} must be 1..64 printable ASCII characters"
                )));
            }
        }
        if config.acting_for_claim.as_deref() == Some("act") {
            return Err(invalid(
                "acting_for_claim: `act` is always read (RFC 8693); name a string claim".into(),
            ));
        }

        let mut keys = Vec::new();
        for file in &config.public_keys {
            let path = base_dir.join(&file.path);
            let (algorithm, key) = load_pem(&path)?;
            keys.push(VerificationKey {
                kid: file.kid.clone(),
                algorithm,
                key,
            });
        }
        if let Some(jwks) = &config.jwks_file {
            keys.extend(load_jwks(&base_dir.join(jwks))?);
        }
        if keys.is_empty() {
            return Err(invalid(
                "configure at least one key (public_keys or jwks_file)".into(),
            ));
        }
        if keys.len() > MAX_KEYS {
            return Err(invalid(format!("at most {MAX_KEYS} keys")));
        }
        let mut kids = HashSet::new();
        for kid in keys.iter().filter_map(|k| k.kid.as_deref()) {
            if !kids.insert(kid) {
                return Err(invalid(format!(
                    "key id `{kid}` is configured twice; key ids must be unique"
                )));
            }
        }

        let validations = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
            .into_iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.leeway = config.leeway_seconds;
                validation.validate_exp = true;
                validation.validate_nbf = true;
                validation.validate_aud = true;
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
                validation.set_issuer(&[config.issuer.as_str()]);
                validation.set_audience(&[config.audience.as_str()]);
                (algorithm, validation)
            })
            .collect();

        Ok(JwtAuthenticator {
            issuer: config.issuer.clone(),
            keys,
            validations,
            id_claim: config.id_claim.clone(),
            groups_claim: config.groups_claim.clone(),
            kind_claim: config.kind_claim.clone(),
            default_kind: config.default_kind,
            acting_for_claim: config.acting_for_claim.clone(),
            authenticated_by: format!("{METHOD_PREFIX}{}", config.issuer),
        })
    }

    /// The principal and, if the token names one, the human it acts for.
    fn request_context(&self, request: &Request<()>) -> Result<AuthContext, AuthError> {
        match credentials::required_credential(request.metadata())? {
            (Source::Bearer, token) => self.verify(token),
            (Source::TokenHeader, _) => Err(AuthError::Invalid(format!(
                "send a JWT as `{}: Bearer <jwt>`",
                credentials::AUTHORIZATION_HEADER
            ))),
        }
    }

    /// Verifies one compact JWT and maps its claims to an [`AuthContext`].
    pub fn verify(&self, token: &str) -> Result<AuthContext, AuthError> {
        if token.len() > MAX_CREDENTIAL_BYTES {
            return Err(invalid(format!(
                "token longer than {MAX_CREDENTIAL_BYTES} bytes"
            )));
        }
        let header = parse_header(token)?;
        let candidates: Vec<&VerificationKey> = self
            .keys
            .iter()
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(wanted), Some(have)) => wanted == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(invalid("unknown key id"));
        }
        let candidates: Vec<&VerificationKey> = candidates
            .into_iter()
            .filter(|k| k.algorithm == header.alg)
            .collect();
        if candidates.is_empty() {
            return Err(invalid("algorithm does not match the key"));
        }
        for key in candidates {
            let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == key.algorithm)
            else {
                return Err(invalid("algorithm does not match the key"));
            };
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.context(&data.claims),
                // Another key of the same algorithm may have signed it.
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(map_error(e.kind())),
            }
        }
        Err(invalid("signature does not verify"))
    }

    fn context(&self, claims: &Map<String, Value>) -> Result<AuthContext, AuthError> {
        // The library accepts an `iss` array containing the issuer; we want exactly one.
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(invalid("wrong issuer"));
        }
        let (caller, acting_for) = match claims.get("act") {
            None => {
                let human = match &self.acting_for_claim {
                    Some(name) => match claims.get(name) {
                        None => None,
                        Some(Value::String(h)) if valid_name(h, MAX_ID_BYTES) => Some(h.clone()),
                        Some(_) => {
                            return Err(invalid(format!(
                                "claim `{name}` must be a principal id (1..{MAX_ID_BYTES} printable ASCII characters)"
                            )));
                        }
                    },
                    None => None,
                };
                (claims, human)
            }
            Some(Value::Object(actor)) => {
                if self
                    .acting_for_claim
                    .as_ref()
                    .is_some_and(|c| claims.contains_key(c))
                {
                    return Err(invalid(
                        "token names the human it acts for twice (`act` and the acting-for claim)",
                    ));
                }
                if actor
                    .get("iss")
                    .is_some_and(|iss| iss.as_str() != Some(self.issuer.as_str()))
                {
                    return Err(invalid("claim `act` names an actor of another issuer"));
                }
                let human = self.id(claims, "")?;
                (actor, Some(human))
            }
            Some(_) => return Err(invalid("claim `act` must be an object")),
        };
        let prefix = if claims.contains_key("act") {
            "act."
        } else {
            ""
        };
        let id = self.id(caller, prefix)?;
        let kind = match caller.get(&self.kind_claim) {
            None => self.default_kind,
            Some(Value::String(k)) => parse_kind(k).ok_or_else(|| {
                invalid(format!(
                    "claim `{prefix}{}` must be `agent` or `human`",
                    self.kind_claim
                ))
            })?,
            Some(_) => {
                return Err(invalid(format!(
                    "claim `{prefix}{}` must be `agent` or `human`",
                    self.kind_claim
                )));
            }
        };
        let what = format!("claim `{prefix}{}`", self.groups_claim);
        let groups = match caller.get(&self.groups_claim) {
            None => Ok(Vec::new()),
            Some(Value::String(list)) => normalize_groups(list.split_whitespace(), &what),
            Some(Value::Array(items)) => {
                let names: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                match names {
                    Some(names) => normalize_groups(names, &what),
                    None => Err(format!(
                        "{what} must be a list of strings or a space-separated string"
                    )),
                }
            }
            Some(_) => Err(format!(
                "{what} must be a list of strings or a space-separated string"
            )),
        }
        .map_err(AuthError::Invalid)?;
        let acting_for = match acting_for {
            None => None,
            Some(_) if kind != PrincipalKind::Agent => {
                return Err(invalid("only an agent may act for a human"));
            }
            Some(human) if human == id => {
                return Err(invalid("a principal cannot act for itself"));
            }
            Some(human) => Some(ActingFor {
                human,
                asserted: false,
            }),
        };
        Ok(AuthContext {
            principal: Principal {
                id,
                kind,
                groups,
                authenticated_by: self.authenticated_by.clone(),
            },
            acting_for,
        })
    }

    fn id(&self, claims: &Map<String, Value>, prefix: &str) -> Result<String, AuthError> {
        match claims.get(&self.id_claim) {
            Some(Value::String(id)) if valid_name(id, MAX_ID_BYTES) => Ok(id.clone()),
            None => Err(invalid(format!(
                "token has no `{prefix}{}` claim",
                self.id_claim
            ))),
            Some(_) => Err(invalid(format!(
                "claim `{prefix}{}` must be a principal id (1..{MAX_ID_BYTES} printable ASCII characters)",
                self.id_claim
            ))),
        }
    }
}

impl Authenticator for JwtAuthenticator {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError> {
        self.request_context(request).map(|c| c.principal)
    }

    fn authenticate_context(&self, request: &Request<()>) -> Result<AuthContext, AuthError> {
        self.request_context(request)
    }
}

fn invalid(reason: impl Into<String>) -> AuthError {
    AuthError::Invalid(reason.into())
}

/// The only header fields that matter before the signature is checked.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

/// Reads the header ourselves, so `alg` values the library cannot even name (`none`) get
/// the same answer as any other algorithm we do not accept, and `crit` is refused.
fn parse_header(token: &str) -> Result<TokenHeader, AuthError> {
    #[derive(Deserialize)]
    struct Raw {
        alg: String,
        #[serde(default)]
        kid: Option<String>,
        #[serde(default)]
        crit: Option<Value>,
    }
    let malformed = || invalid("malformed token");
    let encoded = token.split('.').next().ok_or_else(malformed)?;
    let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| malformed())?;
    let raw: Raw = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    if raw.crit.is_some() {
        // RFC 7515 4.1.11: extensions we do not implement must fail verification.
        return Err(invalid("token header has unsupported critical extensions"));
    }
    let alg = match raw.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(invalid("algorithm not allowed (RS256, ES256 or EdDSA)")),
    };
    Ok(TokenHeader { alg, kid: raw.kid })
}

/// Fixed, loggable reasons; the library's own messages are not passed on.
fn map_error(kind: &ErrorKind) -> AuthError {
    invalid(match kind {
        ErrorKind::ExpiredSignature => "token expired".to_string(),
        ErrorKind::ImmatureSignature => "token not yet valid".to_string(),
        ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
        ErrorKind::InvalidAudience => "wrong audience".to_string(),
        ErrorKind::InvalidSignature => "signature does not verify".to_string(),
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key".to_string(),
        // The library only reports names from our fixed list (exp, iss, aud, nbf).
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            c @ ("exp" | "iss" | "aud" | "nbf") => format!("token has no `{c}` claim"),
            _ => "token lacks a required claim".to_string(),
        },
        ErrorKind::InvalidClaimFormat(claim) => match claim.as_str() {
            c @ ("exp" | "nbf") => format!("claim `{c}` must be a number"),
            _ => "token has a malformed claim".to_string(),
        },
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "malformed token".to_string(),
        _ => "token rejected".to_string(),
    })
}

fn read_key_file(path: &Path) -> Result<String, AuthConfigError> {
    let read = |source| AuthConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_KEY_FILE_BYTES {
        return Err(AuthConfigError::file(
            path,
            format!("larger than {MAX_KEY_FILE_BYTES} bytes; not a key file"),
        ));
    }
    std::fs::read_to_string(path).map_err(read)
}

/// One PEM public key: `PUBLIC KEY` (SPKI: RSA, P-256 or Ed25519) or `RSA PUBLIC KEY`.
fn load_pem(path: &Path) -> Result<(Algorithm, DecodingKey), AuthConfigError> {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use rsa::pkcs1::DecodeRsaPublicKey as _;

    let text = read_key_file(path)?;
    if text.contains("PRIVATE KEY") {
        return Err(AuthConfigError::file(
            path,
            "holds a private key; configure only the public key (`openssl pkey -pubout`)",
        ));
    }
    let key = if text.contains("-----BEGIN RSA PUBLIC KEY-----") {
        let key = rsa::RsaPublicKey::from_pkcs1_pem(&text)
            .map_err(|_| AuthConfigError::file(path, "not a valid PKCS#1 RSA public key"))?;
        rsa_key(path, &key)?
    } else if text.contains("-----BEGIN PUBLIC KEY-----") {
        if let Ok(key) = rsa::RsaPublicKey::from_public_key_pem(&text) {
            rsa_key(path, &key)?
        } else if let Ok(key) = p256::PublicKey::from_public_key_pem(&text) {
            let point = key.to_encoded_point(false);
            (Algorithm::ES256, DecodingKey::from_ec_der(point.as_bytes()))
        } else if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(&text) {
            ed_key(path, &key)?
        } else {
            return Err(AuthConfigError::file(
                path,
                "not an RSA, EC P-256 or Ed25519 public key (one PEM block per file)",
            ));
        }
    } else {
        return Err(AuthConfigError::file(
            path,
            "expected a PEM `PUBLIC KEY` block (RSA, EC P-256 or Ed25519)",
        ));
    };
    Ok(key)
}

fn rsa_key(
    path: &Path,
    key: &rsa::RsaPublicKey,
) -> Result<(Algorithm, DecodingKey), AuthConfigError> {
    use rsa::traits::PublicKeyParts as _;
    if key.size() * 8 < MIN_RSA_BITS {
        return Err(AuthConfigError::file(
            path,
            format!("RSA key shorter than {MIN_RSA_BITS} bits"),
        ));
    }
    Ok((
        Algorithm::RS256,
        DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be()),
    ))
}

fn ed_key(
    path: &Path,
    key: &ed25519_dalek::VerifyingKey,
) -> Result<(Algorithm, DecodingKey), AuthConfigError> {
    if key.is_weak() {
        return Err(AuthConfigError::file(path, "Ed25519 key of small order"));
    }
    Ok((Algorithm::EdDSA, DecodingKey::from_ed_der(key.as_bytes())))
}

/// The fields of a JWK we read. Others (`x5c`, `key_ops`, ...) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    d: Option<Value>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

/// The signing keys of a JWKS file. Keys for encryption, symmetric keys and other
/// algorithms are skipped with a warning; a file with none left, or with private key
/// material, is refused.
fn load_jwks(path: &Path) -> Result<Vec<VerificationKey>, AuthConfigError> {
    let text = read_key_file(path)?;
    let jwks: RawJwks = serde_json::from_str(&text).map_err(|e| {
        // serde_json's message names a position and a type, not the content.
        AuthConfigError::file(path, format!("not a JWKS document: {e}"))
    })?;
    let mut keys = Vec::new();
    for (index, jwk) in jwks.keys.iter().enumerate() {
        let label = match &jwk.kid {
            Some(kid) => format!("key {index} (kid `{kid}`)"),
            None => format!("key {index}"),
        };
        if jwk.d.is_some() {
            return Err(AuthConfigError::file(
                path,
                format!("{label} holds private key material; publish only public keys"),
            ));
        }
        if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
            tracing::warn!(file = %path.display(), key = %label, "skipping a JWKS key not for signatures");
            continue;
        }
        let loaded = match jwk.kty.as_str() {
            "RSA" => jwk_rsa(jwk),
            "EC" => jwk_ec(jwk),
            "OKP" => jwk_okp(jwk),
            _ => Err(Skip::Unsupported),
        };
        match loaded {
            Ok((algorithm, key)) => keys.push(VerificationKey {
                kid: jwk.kid.clone(),
                algorithm,
                key,
            }),
            Err(Skip::Unsupported) => {
                tracing::warn!(file = %path.display(), key = %label, "skipping a JWKS key: only RS256, ES256 (P-256) and EdDSA (Ed25519) keys are used");
            }
            Err(Skip::Invalid(reason)) => {
                return Err(AuthConfigError::file(path, format!("{label}: {reason}")));
            }
        }
    }
    if keys.is_empty() {
        return Err(AuthConfigError::file(
            path,
            "no usable signing key (RS256, ES256 on P-256, EdDSA on Ed25519)",
        ));
    }
    Ok(keys)
}

enum Skip {
    /// A key type or algorithm we do not use: skipped.
    Unsupported,
    /// A key of a type we use but with broken parameters: the file is refused.
    Invalid(&'static str),
}

fn b64_field(value: &Option<String>, name: &'static str) -> Result<Vec<u8>, Skip> {
    let value = value.as_deref().ok_or(Skip::Invalid(name))?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| Skip::Invalid(name))
}

fn alg_is(jwk: &RawJwk, allowed: &[&str]) -> Result<(), Skip> {
    match jwk.alg.as_deref() {
        None => Ok(()),
        Some(alg) if allowed.contains(&alg) => Ok(()),
        Some(_) => Err(Skip::Unsupported),
    }
}

fn jwk_rsa(jwk: &RawJwk) -> Result<(Algorithm, DecodingKey), Skip> {
    use rsa::traits::PublicKeyParts as _;
    alg_is(jwk, &["RS256"])?;
    let n = b64_field(&jwk.n, "`n` must be base64url")?;
    let e = b64_field(&jwk.e, "`e` must be base64url")?;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&n),
        rsa::BigUint::from_bytes_be(&e),
    )
    .map_err(|_| Skip::Invalid("not a valid RSA public key"))?;
    if key.size() * 8 < MIN_RSA_BITS {
        return Err(Skip::Invalid("RSA key shorter than 2048 bits"));
    }
    Ok((
        Algorithm::RS256,
        DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be()),
    ))
}

fn jwk_ec(jwk: &RawJwk) -> Result<(Algorithm, DecodingKey), Skip> {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    if jwk.crv.as_deref() != Some("P-256") {
        return Err(Skip::Unsupported);
    }
    alg_is(jwk, &["ES256"])?;
    let x = b64_field(&jwk.x, "`x` must be base64url")?;
    let y = b64_field(&jwk.y, "`y` must be base64url")?;
    if x.len() != 32 || y.len() != 32 {
        return Err(Skip::Invalid("P-256 coordinates must be 32 bytes"));
    }
    let point = p256::EncodedPoint::from_affine_coordinates(
        p256::FieldBytes::from_slice(&x),
        p256::FieldBytes::from_slice(&y),
        false,
    );
    let key = p256::PublicKey::from_sec1_bytes(point.as_bytes())
        .map_err(|_| Skip::Invalid("not a point on P-256"))?;
    Ok((
        Algorithm::ES256,
        DecodingKey::from_ec_der(key.to_encoded_point(false).as_bytes()),
    ))
}

fn jwk_okp(jwk: &RawJwk) -> Result<(Algorithm, DecodingKey), Skip> {
    if jwk.crv.as_deref() != Some("Ed25519") {
        return Err(Skip::Unsupported);
    }
    alg_is(jwk, &["EdDSA", "Ed25519"])?;
    let x = b64_field(&jwk.x, "`x` must be base64url")?;
    let bytes: [u8; 32] = x
        .try_into()
        .map_err(|_| Skip::Invalid("Ed25519 `x` must be 32 bytes"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| Skip::Invalid("not a valid Ed25519 public key"))?;
    if key.is_weak() {
        return Err(Skip::Invalid("Ed25519 key of small order"));
    }
    Ok((Algorithm::EdDSA, DecodingKey::from_ed_der(key.as_bytes())))
}

#[cfg(test)]
pub(crate) mod tests;
