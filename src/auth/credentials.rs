//! What the credential authenticators (JWT, static tokens, their chain) share: reading a
//! credential from metadata, the rules for names that come out of a credential, and the
//! error a bad configuration produces.
//!
//! Nothing here ever puts a credential into an error message: every [`AuthError`] built in
//! this module and its users is safe to log and to send back to the caller.

use std::path::{Path, PathBuf};

use tonic::metadata::MetadataMap;

use super::AuthError;
use crate::domain::PrincipalKind;

/// The standard header: `authorization: Bearer <credential>`.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// An alternative header for static tokens, for clients that reserve `authorization`.
pub const TOKEN_HEADER: &str = "x-countersign-token";

/// Longest credential accepted from metadata. A JWT with a few dozen groups fits easily;
/// anything longer is refused before it is decoded or hashed.
pub const MAX_CREDENTIAL_BYTES: usize = 8 * 1024;
/// Longest principal id a credential may name.
pub const MAX_ID_BYTES: usize = 256;
/// Most groups a credential may carry.
pub const MAX_GROUPS: usize = 64;
/// Longest group name.
pub const MAX_GROUP_BYTES: usize = 128;

/// A configuration the authenticators cannot start with. Names the file or the field and
/// the problem; never quotes a key, a token or a hash.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl AuthConfigError {
    pub(crate) fn file(path: &Path, reason: impl Into<String>) -> Self {
        AuthConfigError::File {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Where a credential came from. Decides which authenticator may look at it: a static
/// token never goes to the JWT verifier through `x-countersign-token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Bearer,
    TokenHeader,
}

/// The one credential a request carries, if any.
///
/// Two credentials (both headers, or a repeated header) are refused rather than picking
/// one: a proxy and a client disagreeing about who calls must not be settled silently.
pub(crate) fn credential(metadata: &MetadataMap) -> Result<Option<(Source, &str)>, AuthError> {
    let bearer = single(metadata, AUTHORIZATION_HEADER)?
        .map(|value| {
            let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
            if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
                Ok(rest.trim())
            } else {
                Err(AuthError::Invalid(format!(
                    "{AUTHORIZATION_HEADER} must be `Bearer <token>`"
                )))
            }
        })
        .transpose()?;
    let token = single(metadata, TOKEN_HEADER)?.filter(|t| !t.is_empty());
    let found = match (bearer, token) {
        (Some(_), Some(_)) => {
            return Err(AuthError::Invalid(format!(
                "send one credential: both {AUTHORIZATION_HEADER} and {TOKEN_HEADER} are set"
            )));
        }
        (Some(b), None) => Some((Source::Bearer, b)),
        (None, Some(t)) => Some((Source::TokenHeader, t)),
        (None, None) => None,
    };
    if let Some((_, value)) = found
        && value.len() > MAX_CREDENTIAL_BYTES
    {
        return Err(AuthError::Invalid(format!(
            "credential longer than {MAX_CREDENTIAL_BYTES} bytes"
        )));
    }
    Ok(found)
}

/// The credential, or `Missing` naming the headers to send.
pub(crate) fn required_credential(metadata: &MetadataMap) -> Result<(Source, &str), AuthError> {
    credential(metadata)?.ok_or_else(|| AuthError::Missing(send_a_credential()))
}

/// What a caller without a credential is told to send.
pub(crate) fn send_a_credential() -> String {
    format!("send `{AUTHORIZATION_HEADER}: Bearer <token>` (or {TOKEN_HEADER} for a static token)")
}

fn single<'m>(metadata: &'m MetadataMap, name: &str) -> Result<Option<&'m str>, AuthError> {
    let mut values = metadata.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::Invalid(format!("{name} sent more than once")));
    }
    first
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| AuthError::Invalid(format!("{name} must be visible ASCII")))
}

/// Whether a bearer credential has the shape of a compact JWS: three dot-separated
/// base64url parts, the first two non-empty. Only routes the credential; proves nothing.
pub(crate) fn looks_like_jwt(credential: &str) -> bool {
    let parts: Vec<&str> = credential.split('.').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && !parts[1].is_empty()
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Principal ids and group names end up in events, logs and reviewers' terminals, so they
/// are printable ASCII without spaces: no control characters, no bidi tricks.
pub(crate) fn valid_name(value: &str, max_bytes: usize) -> bool {
    !value.is_empty() && value.len() <= max_bytes && value.bytes().all(|b| b.is_ascii_graphic())
}

/// Sorted, de-duplicated, within the limits; `what` names the source in errors.
pub(crate) fn normalize_groups<I, S>(groups: I, what: &str) -> Result<Vec<String>, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out: Vec<String> = Vec::new();
    for group in groups {
        let group = group.as_ref();
        if !valid_name(group, MAX_GROUP_BYTES) {
            return Err(format!(
                "{what}: every group must be 1..{MAX_GROUP_BYTES} printable ASCII characters without spaces"
            ));
        }
        if !out.iter().any(|g| g == group) {
            if out.len() == MAX_GROUPS {
                return Err(format!("{what}: at most {MAX_GROUPS} groups"));
            }
            out.push(group.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// `agent` or `human`, as written in configuration files and tokens.
pub(crate) fn parse_kind(value: &str) -> Option<PrincipalKind> {
    match value {
        "agent" => Some(PrincipalKind::Agent),
        "human" => Some(PrincipalKind::Human),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn no_credential_is_none_and_required_makes_it_missing() {
        assert_eq!(credential(&metadata(&[])), Ok(None));
        assert!(matches!(
            required_credential(&metadata(&[])),
            Err(AuthError::Missing(_))
        ));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_refused() {
        assert_eq!(
            credential(&metadata(&[("authorization", "bearer abc")])),
            Ok(Some((Source::Bearer, "abc")))
        );
        for bad in ["Basic abc", "Bearer", "Bearer   ", "abc"] {
            let m = metadata(&[("authorization", bad)]);
            let err = credential(&m).unwrap_err();
            assert!(matches!(err, AuthError::Invalid(_)), "{bad}: {err}");
            assert!(!err.to_string().contains("abc"), "{err}");
        }
    }

    #[test]
    fn two_credentials_are_refused() {
        assert!(
            credential(&metadata(&[
                ("authorization", "Bearer a"),
                ("x-countersign-token", "b")
            ]))
            .is_err()
        );
        assert!(
            credential(&metadata(&[
                ("authorization", "Bearer a"),
                ("authorization", "Bearer b")
            ]))
            .is_err()
        );
    }

    #[test]
    fn jwt_shape_is_three_base64url_parts() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("eyJh.eyJz"));
        assert!(!looks_like_jwt("a+b/c==.x.y"));
        assert!(!looks_like_jwt("..x"));
    }

    #[test]
    fn groups_are_sorted_unique_and_bounded() {
        assert_eq!(
            normalize_groups(["sre", "dev", "sre"], "g").unwrap(),
            vec!["dev", "sre"]
        );
        assert!(normalize_groups(["has space"], "g").is_err());
        let many: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect();
        assert!(normalize_groups(&many, "g").is_err());
        assert!(normalize_groups(&many[..MAX_GROUPS], "g").is_ok());
    }
}
