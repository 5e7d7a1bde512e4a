//! What a credential says beyond who is calling: the human an agent acts for.
//!
//! An authenticator that knows more than the [`Principal`] returns an [`AuthContext`] from
//! `Authenticator::authenticate_context` (overridden by `JwtAuthenticator` and
//! `CredentialChain`). The edge guard (`auth::guard`) stores it with [`AuthContext::insert_into`], which puts the
//! [`Principal`] and, when there is one, the [`ActingFor`] into the request extensions;
//! handlers read them with `auth::principal` and [`acting_for`]. Both are set by the
//! guard only, before the handler runs, so a client can never supply either.

use tonic::Request;

use crate::domain::Principal;

/// The human an agent acts for, as established for this call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActingFor {
    /// The human's principal id, in the same namespace as [`Principal::id`].
    pub human: String,
    /// `false`: the credential's issuer vouched for it (e.g. a JWT's `act` claim).
    /// `true`: only the agent says so (e.g. `on_behalf_of` in a request body from an agent
    /// the configuration trusts to assert it); events must record it as asserted.
    pub asserted: bool,
}

/// Everything authentication established for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    pub principal: Principal,
    pub acting_for: Option<ActingFor>,
}

impl From<Principal> for AuthContext {
    fn from(principal: Principal) -> Self {
        AuthContext {
            principal,
            acting_for: None,
        }
    }
}

impl AuthContext {
    /// Stores the principal and the acting-for human where handlers find them. Removes any
    /// [`ActingFor`] already present, so a call without one can never inherit one.
    pub fn insert_into(self, extensions: &mut tonic::Extensions) {
        extensions.insert(self.principal);
        match self.acting_for {
            Some(acting_for) => {
                extensions.insert(acting_for);
            }
            None => {
                extensions.remove::<ActingFor>();
            }
        }
    }
}

/// The human the calling agent acts for, if its credential said so.
pub fn acting_for<T>(request: &Request<T>) -> Option<ActingFor> {
    request.extensions().get::<ActingFor>().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PrincipalKind;

    fn agent() -> Principal {
        Principal {
            id: "deployer".into(),
            kind: PrincipalKind::Agent,
            groups: vec![],
            authenticated_by: "jwt:https://idp.example.com".into(),
        }
    }

    #[test]
    fn the_context_lands_in_the_extensions_handlers_read() {
        let mut request = Request::new(());
        AuthContext {
            principal: agent(),
            acting_for: Some(ActingFor {
                human: "alice@example.com".into(),
                asserted: false,
            }),
        }
        .insert_into(request.extensions_mut());
        assert_eq!(request.extensions().get::<Principal>(), Some(&agent()));
        assert_eq!(
            acting_for(&request).map(|a| a.human),
            Some("alice@example.com".to_string())
        );
    }

    #[test]
    fn a_context_without_acting_for_clears_a_stale_one() {
        let mut request = Request::new(());
        request.extensions_mut().insert(ActingFor {
            human: "mallory".into(),
            asserted: false,
        });
        AuthContext::from(agent()).insert_into(request.extensions_mut());
        assert_eq!(acting_for(&request), None);
    }
}
