//! Static API tokens for small setups: `authorization: Bearer <token>` (or
//! `x-countersign-token: <token>`) checked against a list of configured entries.
//!
//! The configuration holds only the SHA-256 of each token, so reading the config file does
//! not hand out credentials. A plain SHA-256 (no salt, no stretching) is enough because the
//! tokens must be high-entropy random strings, not passwords: generate one with
//! `openssl rand -base64 32` and configure `token_hash(token)`. A guessable token is not
//! protected by this scheme.
//!
//! A presented token is hashed, then compared in constant time with every entry (no early
//! exit), so neither the position of a match nor a near miss shows in the response time.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::Request;

use super::credentials::{
    self, AuthConfigError, MAX_ID_BYTES, Source, normalize_groups, valid_name,
};
use super::{AuthError, Authenticator};
use crate::domain::{Principal, PrincipalKind};

/// Prefix of `Principal::authenticated_by`, followed by the entry's name (or principal).
pub const METHOD_PREFIX: &str = "token:";

/// Most entries a configuration may hold: every call compares against all of them.
pub const MAX_ENTRIES: usize = 1024;

/// `[auth.tokens]` in the server configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub tokens: Vec<TokenEntry>,
}

/// One accepted token and the principal it stands for.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// A label for logs and `authenticated_by` (e.g. `ci-deployer-2026`); defaults to the
    /// principal. Lets an auditor tell two tokens of one principal apart.
    #[serde(default)]
    pub name: Option<String>,
    /// Lower- or upper-case hex of the SHA-256 of the token (see [`token_hash`]).
    pub sha256: String,
    pub principal: String,
    /// `agent` or `human`.
    pub kind: PrincipalKind,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Never prints the hash: a config dumped into a log must not hand out what a token is
/// checked against.
impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("sha256", &"<redacted>")
            .field("principal", &self.principal)
            .field("kind", &self.kind)
            .field("groups", &self.groups)
            .finish()
    }
}

/// The value to put in `sha256` for `token`: lower-case hex of its SHA-256.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

struct Entry {
    hash: [u8; 32],
    principal: Principal,
}

/// Authenticates static API tokens; see the module documentation.
pub struct StaticTokenAuthenticator {
    entries: Vec<Entry>,
}

/// Names the principals, never the hashes: debug output ends up in logs.
impl std::fmt::Debug for StaticTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokenAuthenticator")
            .field(
                "entries",
                &self
                    .entries
                    .iter()
                    .map(|e| e.principal.authenticated_by.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl StaticTokenAuthenticator {
    /// Checks every entry: a 64-hex-character hash, a valid principal and groups, names and
    /// hashes unique. Errors name the entry, never the hash.
    pub fn from_config(config: &TokenConfig) -> Result<Self, AuthConfigError> {
        if config.tokens.is_empty() {
            return Err(AuthConfigError::Invalid(
                "auth.tokens: configure at least one token".into(),
            ));
        }
        if config.tokens.len() > MAX_ENTRIES {
            return Err(AuthConfigError::Invalid(format!(
                "auth.tokens: at most {MAX_ENTRIES} tokens"
            )));
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(config.tokens.len());
        for (index, entry) in config.tokens.iter().enumerate() {
            let what = format!("auth.tokens[{index}]");
            if !valid_name(&entry.principal, MAX_ID_BYTES) {
                return Err(AuthConfigError::Invalid(format!(
                    "{what}: principal must be 1..{MAX_ID_BYTES} printable ASCII characters without spaces"
                )));
            }
            let name = entry.name.as_deref().unwrap_or(&entry.principal);
            if !valid_name(name, MAX_ID_BYTES) {
                return Err(AuthConfigError::Invalid(format!(
                    "{what}: name must be 1..{MAX_ID_BYTES} printable ASCII characters without spaces"
                )));
            }
            let what = format!("{what} (`{name}`)");
            let hash = parse_hash(&entry.sha256).ok_or_else(|| {
                AuthConfigError::Invalid(format!(
                    "{what}: sha256 must be 64 hex characters (the SHA-256 of the token, not the token)"
                ))
            })?;
            let groups =
                normalize_groups(&entry.groups, &what).map_err(AuthConfigError::Invalid)?;
            let authenticated_by = format!("{METHOD_PREFIX}{name}");
            if entries.iter().any(|e| e.hash == hash) {
                return Err(AuthConfigError::Invalid(format!(
                    "{what}: the same token hash is configured twice"
                )));
            }
            if entries
                .iter()
                .any(|e| e.principal.authenticated_by == authenticated_by)
            {
                return Err(AuthConfigError::Invalid(format!(
                    "{what}: two tokens named `{name}`; give each a distinct `name`"
                )));
            }
            entries.push(Entry {
                hash,
                principal: Principal {
                    id: entry.principal.clone(),
                    kind: entry.kind,
                    groups,
                    authenticated_by,
                },
            });
        }
        Ok(StaticTokenAuthenticator { entries })
    }

    /// The principal of `token`, or `Invalid("unknown token")`.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, entry) in self.entries.iter().enumerate() {
            let matches = entry.hash.ct_eq(&presented);
            // At most MAX_ENTRIES entries, so the index fits.
            index.conditional_assign(&(i as u32), matches);
            found |= matches;
        }
        if bool::from(found)
            && let Some(entry) = self.entries.get(index as usize)
        {
            return Ok(entry.principal.clone());
        }
        Err(AuthError::Invalid("unknown token".into()))
    }
}

impl Authenticator for StaticTokenAuthenticator {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError> {
        let (_source, token): (Source, &str) =
            credentials::required_credential(request.metadata())?;
        self.verify(token)
    }
}

fn parse_hash(value: &str) -> Option<[u8; 32]> {
    let mut hash = [0u8; 32];
    if value.len() != 64 {
        return None;
    }
    hex::decode_to_slice(value, &mut hash).ok()?;
    Some(hash)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_token_entry_never_prints_its_hash() {
        let entry = TokenEntry {
            name: Some("ci".into()),
            sha256: token_hash("a-very-long-and-random-token-value-0123456789"),
            principal: "pipeline".into(),
            kind: PrincipalKind::Agent,
            groups: vec![],
        };
        let printed = format!("{entry:?}");
        assert!(!printed.contains(&entry.sha256), "{printed}");
        assert!(printed.contains("pipeline"));
    }
    use super::*;
    use crate::auth::credentials::TOKEN_HEADER;
    use crate::auth::development::PRINCIPAL_HEADER;

    const DEPLOYER_TOKEN: &str = "q3Zt1b7k2YvYJmD0Jp1m3cG1yTt8wq0mX6m0rK4oH1s=";
    const ALICE_TOKEN: &str = "Vh2Jx9Wc0a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7=";

    fn config() -> TokenConfig {
        TokenConfig {
            tokens: vec![
                TokenEntry {
                    name: Some("ci-deployer".into()),
                    sha256: token_hash(DEPLOYER_TOKEN),
                    principal: "deployer".into(),
                    kind: PrincipalKind::Agent,
                    groups: vec![],
                },
                TokenEntry {
                    name: None,
                    sha256: token_hash(ALICE_TOKEN).to_uppercase(),
                    principal: "alice@example.com".into(),
                    kind: PrincipalKind::Human,
                    groups: vec!["sre".into(), "reviewers".into()],
                },
            ],
        }
    }

    fn request(pairs: &[(&'static str, &str)]) -> Request<()> {
        let mut request = Request::new(());
        for (k, v) in pairs {
            request.metadata_mut().insert(*k, v.parse().unwrap());
        }
        request
    }

    #[test]
    fn token_hash_is_lowercase_hex_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_configured_token_authenticates_its_principal() {
        let auth = StaticTokenAuthenticator::from_config(&config()).unwrap();
        let p = auth
            .authenticate(&request(&[(
                "authorization",
                &format!("Bearer {DEPLOYER_TOKEN}"),
            )]))
            .unwrap();
        assert_eq!(p.id, "deployer");
        assert_eq!(p.kind, PrincipalKind::Agent);
        assert_eq!(p.authenticated_by, "token:ci-deployer");

        let p = auth
            .authenticate(&request(&[(TOKEN_HEADER, ALICE_TOKEN)]))
            .unwrap();
        assert_eq!(p.id, "alice@example.com");
        assert_eq!(p.kind, PrincipalKind::Human);
        assert_eq!(p.groups, vec!["reviewers", "sre"]);
        assert_eq!(p.authenticated_by, "token:alice@example.com");
    }

    #[test]
    fn an_unknown_token_is_invalid_and_not_echoed() {
        let auth = StaticTokenAuthenticator::from_config(&config()).unwrap();
        let guess = "Zm9yZ2VkLXRva2VuLXRoYXQtaXMtbm90LWNvbmZpZ3VyZWQ=";
        let err = auth
            .authenticate(&request(&[("authorization", &format!("Bearer {guess}"))]))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("unknown token".into()));
        assert!(!err.to_string().contains(guess));
        // A configured hash presented as the token is just another unknown token.
        let hash = token_hash(DEPLOYER_TOKEN);
        assert!(auth.verify(&hash).is_err());
    }

    #[test]
    fn debug_output_shows_no_hashes() {
        let auth = StaticTokenAuthenticator::from_config(&config()).unwrap();
        let debug = format!("{auth:?}");
        assert!(debug.contains("token:ci-deployer"), "{debug}");
        assert!(
            !debug.contains(&token_hash(DEPLOYER_TOKEN)[..16]),
            "{debug}"
        );
    }

    #[test]
    fn no_token_is_missing() {
        let auth = StaticTokenAuthenticator::from_config(&config()).unwrap();
        assert!(matches!(
            auth.authenticate(&request(&[])),
            Err(AuthError::Missing(_))
        ));
    }

    #[test]
    fn a_forged_identity_header_next_to_a_token_changes_nothing() {
        let auth = StaticTokenAuthenticator::from_config(&config()).unwrap();
        let p = auth
            .authenticate(&request(&[
                ("authorization", &format!("Bearer {DEPLOYER_TOKEN}")),
                (PRINCIPAL_HEADER, "alice@example.com"),
                ("x-countersign-kind", "human"),
            ]))
            .unwrap();
        assert_eq!(p.id, "deployer");
        assert_eq!(p.kind, PrincipalKind::Agent);
    }

    #[test]
    fn a_malformed_hash_in_the_config_is_refused_without_quoting_it() {
        for bad in [
            DEPLOYER_TOKEN.to_string(),
            "abc".into(),
            format!("{}0", token_hash("x")),
            format!("{}zz", &token_hash("x")[..62]),
        ] {
            let mut c = config();
            c.tokens[0].sha256 = bad.clone();
            let err = StaticTokenAuthenticator::from_config(&c).unwrap_err();
            let message = err.to_string();
            assert!(message.contains("64 hex characters"), "{message}");
            assert!(message.contains("ci-deployer"), "{message}");
            assert!(!message.contains(&bad), "{message}");
        }
    }

    #[test]
    fn duplicate_hashes_names_and_empty_configs_are_refused() {
        let mut c = config();
        c.tokens[1].sha256 = c.tokens[0].sha256.clone();
        assert!(StaticTokenAuthenticator::from_config(&c).is_err());
        let mut c = config();
        c.tokens[1].name = Some("ci-deployer".into());
        assert!(StaticTokenAuthenticator::from_config(&c).is_err());
        assert!(StaticTokenAuthenticator::from_config(&TokenConfig::default()).is_err());
    }

    #[test]
    fn the_config_reads_from_toml_and_refuses_unknown_fields() {
        let parsed: TokenConfig = toml::from_str(&format!(
            r#"
            [[tokens]]
            name = "ci-deployer"
            sha256 = "{}"
            principal = "deployer"
            kind = "agent"
            "#,
            token_hash(DEPLOYER_TOKEN)
        ))
        .unwrap();
        assert!(StaticTokenAuthenticator::from_config(&parsed).is_ok());
        let unknown = toml::from_str::<TokenConfig>(
            r#"
            [[tokens]]
            token = "plaintext"
            sha256 = "00"
            principal = "deployer"
            kind = "agent"
            "#,
        );
        assert!(unknown.is_err());
    }
}
