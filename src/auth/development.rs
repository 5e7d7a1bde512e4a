//! Development identity: the caller names itself in metadata.
//!
//! This trusts the client completely, so the server allows it only on a loopback listener
//! (see `server`), logs loudly that it is on, and records `development-header` as the way
//! every principal was established, in every event.

use tonic::Request;
use tonic::metadata::MetadataMap;

use super::{AuthError, Authenticator};
use crate::domain::{Principal, PrincipalKind};

pub const PRINCIPAL_HEADER: &str = "x-countersign-principal";
pub const KIND_HEADER: &str = "x-countersign-kind";
pub const GROUPS_HEADER: &str = "x-countersign-groups";

/// Recorded as `Principal::authenticated_by`.
pub const METHOD: &str = "development-header";

const MAX_ID_BYTES: usize = 256;
const MAX_GROUPS: usize = 64;
const MAX_GROUP_BYTES: usize = 128;

#[derive(Debug, Default, Clone, Copy)]
pub struct DevelopmentIdentity;

impl Authenticator for DevelopmentIdentity {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError> {
        from_metadata(request.metadata())
    }
}

fn header<'m>(metadata: &'m MetadataMap, name: &str) -> Result<Option<&'m str>, AuthError> {
    match metadata.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| AuthError::Invalid(format!("{name} must be visible ASCII"))),
    }
}

fn valid_name(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-@:/+".contains(c))
}

fn from_metadata(metadata: &MetadataMap) -> Result<Principal, AuthError> {
    let id = header(metadata, PRINCIPAL_HEADER)?
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            AuthError::Missing(format!(
                "send the {PRINCIPAL_HEADER} metadata header (development identity mode)"
            ))
        })?;
    if id.len() > MAX_ID_BYTES || !valid_name(id) {
        return Err(AuthError::Invalid(format!(
            "{PRINCIPAL_HEADER} must be 1..{MAX_ID_BYTES} characters of [A-Za-z0-9._-@:/+]"
        )));
    }
    let kind = match header(metadata, KIND_HEADER)? {
        // Least privilege: an unnamed kind is a workload, which can never review.
        None | Some("") | Some("agent") => PrincipalKind::Agent,
        Some("human") => PrincipalKind::Human,
        Some(other) => {
            return Err(AuthError::Invalid(format!(
                "{KIND_HEADER} must be `agent` or `human`, not `{other}`"
            )));
        }
    };
    let mut groups = Vec::new();
    if let Some(list) = header(metadata, GROUPS_HEADER)? {
        for group in list.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            if group.len() > MAX_GROUP_BYTES || !valid_name(group) {
                return Err(AuthError::Invalid(format!(
                    "{GROUPS_HEADER}: group `{group}` must be 1..{MAX_GROUP_BYTES} characters of [A-Za-z0-9._-@:/+]"
                )));
            }
            if !groups.iter().any(|g| g == group) {
                groups.push(group.to_string());
            }
        }
        if groups.len() > MAX_GROUPS {
            return Err(AuthError::Invalid(format!(
                "{GROUPS_HEADER}: at most {MAX_GROUPS} groups"
            )));
        }
    }
    groups.sort();
    Ok(Principal {
        id: id.to_string(),
        kind,
        groups,
        authenticated_by: METHOD.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn a_call_without_a_principal_is_unauthenticated() {
        assert!(matches!(
            from_metadata(&metadata(&[])),
            Err(AuthError::Missing(_))
        ));
        assert!(matches!(
            from_metadata(&metadata(&[(PRINCIPAL_HEADER, " ")])),
            Err(AuthError::Missing(_))
        ));
    }

    #[test]
    fn headers_make_a_principal_with_sorted_unique_groups() {
        let p = from_metadata(&metadata(&[
            (PRINCIPAL_HEADER, "alice@example.com"),
            (KIND_HEADER, "human"),
            (GROUPS_HEADER, "sre, security,sre,"),
        ]))
        .unwrap();
        assert_eq!(p.id, "alice@example.com");
        assert_eq!(p.kind, PrincipalKind::Human);
        assert_eq!(p.groups, vec!["security", "sre"]);
        assert_eq!(p.authenticated_by, METHOD);
    }

    #[test]
    fn the_kind_defaults_to_agent_and_unknown_kinds_are_refused() {
        let p = from_metadata(&metadata(&[(PRINCIPAL_HEADER, "deployer")])).unwrap();
        assert_eq!(p.kind, PrincipalKind::Agent);
        let err = from_metadata(&metadata(&[
            (PRINCIPAL_HEADER, "deployer"),
            (KIND_HEADER, "admin"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("`agent` or `human`"), "{err}");
    }

    #[test]
    fn odd_characters_in_ids_and_groups_are_refused() {
        assert!(from_metadata(&metadata(&[(PRINCIPAL_HEADER, "a b")])).is_err());
        assert!(
            from_metadata(&metadata(&[
                (PRINCIPAL_HEADER, "ab"),
                (GROUPS_HEADER, "ok,not ok")
            ]))
            .is_err()
        );
    }
}
