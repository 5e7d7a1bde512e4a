//! The credential authenticators together: one request, one credential, one verdict.
//!
//! Which credential authenticates a request:
//!
//! 1. A request carrying `authorization: Bearer …` or `x-countersign-token` is
//!    authenticated by that credential, and only by it. A bearer credential shaped like a
//!    JWT goes to the JWT verifier (when configured); any other credential, and everything
//!    in `x-countersign-token`, to the static tokens. A client certificate on the same
//!    connection then only authenticates the transport: it does not name the caller.
//! 2. A request without such a credential is authenticated by its verified client
//!    certificate (mTLS, when configured).
//! 3. Neither: `Missing`.
//!
//! There is no fallback from one method to another on failure, so an error always comes
//! from the method the credential was meant for: a bad token is refused even if the client
//! certificate would have been accepted. A bad credential is `Invalid` with a short reason
//! that never quotes the credential.
//!
//! The development `x-countersign-*` identity headers are never read here: with real
//! authentication on, a client naming itself in metadata changes nothing.

use rustls::pki_types::CertificateDer;
use tonic::Request;

use super::context::AuthContext;
use super::credentials::{self, AuthConfigError, Source, looks_like_jwt};
use super::jwt::JwtAuthenticator;
use super::mtls::MtlsAuthenticator;
use super::token::StaticTokenAuthenticator;
use super::{AuthError, Authenticator};
use crate::domain::Principal;

/// JWTs, static tokens and/or client certificates; see the module documentation.
#[derive(Debug)]
pub struct CredentialChain {
    jwt: Option<JwtAuthenticator>,
    tokens: Option<StaticTokenAuthenticator>,
    mtls: Option<MtlsAuthenticator>,
}

impl CredentialChain {
    /// At least one method must be configured: an empty chain would refuse every call,
    /// which is a configuration mistake, not a policy.
    pub fn new(
        jwt: Option<JwtAuthenticator>,
        tokens: Option<StaticTokenAuthenticator>,
        mtls: Option<MtlsAuthenticator>,
    ) -> Result<Self, AuthConfigError> {
        if jwt.is_none() && tokens.is_none() && mtls.is_none() {
            return Err(AuthConfigError::Invalid(
                "auth: configure at least one authentication method (jwt, tokens or mtls)".into(),
            ));
        }
        Ok(CredentialChain { jwt, tokens, mtls })
    }

    /// The principal and, for a JWT naming one, the human the agent acts for.
    /// `peer_certs`: the verified client certificate chain of the connection, if any.
    fn context(
        &self,
        request: &Request<()>,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<AuthContext, AuthError> {
        let Some((source, credential)) = credentials::credential(request.metadata())? else {
            return match &self.mtls {
                Some(mtls) if peer_certs.is_some_and(|c| !c.is_empty()) => {
                    mtls.verify(peer_certs).map(AuthContext::from)
                }
                _ => Err(self.missing()),
            };
        };
        match (source, &self.jwt, &self.tokens) {
            (Source::Bearer, Some(jwt), _) if looks_like_jwt(credential) => jwt.verify(credential),
            (_, _, Some(tokens)) => tokens.verify(credential).map(AuthContext::from),
            (_, Some(_), None) => Err(AuthError::Invalid(
                "not a JWT, and static tokens are not configured".into(),
            )),
            (_, None, None) => Err(AuthError::Invalid(
                "only client certificates are configured: send no token".into(),
            )),
        }
    }

    /// What to send, naming only the configured methods.
    fn missing(&self) -> AuthError {
        let bearer = self.jwt.is_some() || self.tokens.is_some();
        AuthError::Missing(match (&self.mtls, bearer) {
            (Some(_), true) => format!(
                "present a client certificate, or {}",
                credentials::send_a_credential()
            ),
            (Some(_), false) => "present a client certificate signed by the configured CA".into(),
            (None, _) => credentials::send_a_credential(),
        })
    }
}

impl Authenticator for CredentialChain {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError> {
        self.authenticate_context(request).map(|c| c.principal)
    }

    fn authenticate_context(&self, request: &Request<()>) -> Result<AuthContext, AuthError> {
        let peer_certs = request.peer_certs();
        self.context(request, peer_certs.as_deref().map(Vec::as_slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::development::{GROUPS_HEADER, KIND_HEADER, PRINCIPAL_HEADER};
    use crate::auth::jwt::tests::{Issuer, claims};
    use crate::auth::token::{TokenConfig, TokenEntry, token_hash};
    use crate::domain::PrincipalKind;

    const TOKEN: &str = "k8Jq2m5Zp0Xw7Rt4Yb1Nc6Vd3Lf9Gh2Sa5Qe8Wu0Io=";

    fn tokens() -> StaticTokenAuthenticator {
        StaticTokenAuthenticator::from_config(&TokenConfig {
            tokens: vec![TokenEntry {
                name: Some("ci".into()),
                sha256: token_hash(TOKEN),
                principal: "pipeline".into(),
                kind: PrincipalKind::Agent,
                groups: vec![],
            }],
        })
        .unwrap()
    }

    fn request(pairs: &[(&'static str, &str)]) -> Request<()> {
        let mut request = Request::new(());
        for (k, v) in pairs {
            request.metadata_mut().insert(*k, v.parse().unwrap());
        }
        request
    }

    fn chain(issuer: &Issuer) -> CredentialChain {
        CredentialChain::new(Some(issuer.authenticator()), Some(tokens()), None).unwrap()
    }

    #[test]
    fn a_jwt_goes_to_the_jwt_verifier_and_other_tokens_to_the_token_list() {
        let issuer = Issuer::ed25519();
        let chain = chain(&issuer);
        let jwt = issuer.sign(&claims("deployer"));
        let p = chain
            .authenticate(&request(&[("authorization", &format!("Bearer {jwt}"))]))
            .unwrap();
        assert_eq!(p.id, "deployer");
        assert!(p.authenticated_by.starts_with("jwt:"));
        let p = chain
            .authenticate(&request(&[("authorization", &format!("Bearer {TOKEN}"))]))
            .unwrap();
        assert_eq!(p.id, "pipeline");
        assert_eq!(p.authenticated_by, "token:ci");
    }

    #[test]
    fn no_credentials_are_missing() {
        let issuer = Issuer::ed25519();
        let err = chain(&issuer).authenticate(&request(&[])).unwrap_err();
        assert!(matches!(err, AuthError::Missing(_)), "{err}");
        // Identity headers alone are not credentials.
        let err = chain(&issuer)
            .authenticate(&request(&[(PRINCIPAL_HEADER, "alice@example.com")]))
            .unwrap_err();
        assert!(matches!(err, AuthError::Missing(_)), "{err}");
    }

    #[test]
    fn a_forged_identity_header_next_to_a_valid_token_changes_nothing() {
        let issuer = Issuer::ed25519();
        let chain = chain(&issuer);
        let jwt = issuer.sign(&claims("deployer"));
        for credential in [jwt.as_str(), TOKEN] {
            let p = chain
                .authenticate(&request(&[
                    ("authorization", &format!("Bearer {credential}")),
                    (PRINCIPAL_HEADER, "alice@example.com"),
                    (KIND_HEADER, "human"),
                    (GROUPS_HEADER, "admins,reviewers"),
                ]))
                .unwrap();
            assert_ne!(p.id, "alice@example.com");
            assert_eq!(p.kind, PrincipalKind::Agent);
            assert!(!p.in_group("admins"));
        }
    }

    #[test]
    fn a_bad_credential_is_invalid_with_a_reason_that_does_not_quote_it() {
        let issuer = Issuer::ed25519();
        let chain = chain(&issuer);
        let other = Issuer::ed25519();
        let forged = other.sign(&claims("deployer"));
        let unknown = "bm90LWEtY29uZmlndXJlZC10b2tlbi1hdC1hbGwtISE=";
        for (credential, reason) in [
            (forged.as_str(), "signature does not verify"),
            (unknown, "unknown token"),
        ] {
            let err = chain
                .authenticate(&request(&[(
                    "authorization",
                    &format!("Bearer {credential}"),
                )]))
                .unwrap_err();
            assert_eq!(err, AuthError::Invalid(reason.into()));
            for part in credential.split('.') {
                assert!(!err.to_string().contains(part), "{err}");
            }
        }
    }

    #[test]
    fn the_token_header_never_reaches_the_jwt_verifier() {
        let issuer = Issuer::ed25519();
        let jwt = issuer.sign(&claims("deployer"));
        let err = chain(&issuer)
            .authenticate(&request(&[("x-countersign-token", &jwt)]))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("unknown token".into()));
    }

    #[test]
    fn without_static_tokens_a_non_jwt_is_refused_and_an_empty_chain_is_a_config_error() {
        let issuer = Issuer::ed25519();
        let chain = CredentialChain::new(Some(issuer.authenticator()), None, None).unwrap();
        let err = chain
            .authenticate(&request(&[("authorization", &format!("Bearer {TOKEN}"))]))
            .unwrap_err();
        assert!(matches!(err, AuthError::Invalid(_)), "{err}");
        assert!(CredentialChain::new(None, None, None).is_err());
    }

    #[test]
    fn the_chain_passes_acting_for_through() {
        let issuer = Issuer::ed25519();
        let mut c = claims("alice@example.com");
        c["act"] = serde_json::json!({"sub": "deployer"});
        let jwt = issuer.sign(&c);
        let context = chain(&issuer)
            .authenticate_context(&request(&[("authorization", &format!("Bearer {jwt}"))]))
            .unwrap();
        assert_eq!(context.principal.id, "deployer");
        assert_eq!(
            context.acting_for.map(|a| a.human),
            Some("alice@example.com".into())
        );
    }

    fn mtls() -> MtlsAuthenticator {
        MtlsAuthenticator::from_config(&crate::auth::mtls::tests::config()).unwrap()
    }

    fn deployer_certificate() -> Vec<CertificateDer<'static>> {
        vec![crate::auth::mtls::tests::certificate(&[
            "URI:spiffe://example.org/agent/deployer",
        ])]
    }

    #[test]
    fn without_a_credential_the_client_certificate_names_the_caller_and_headers_change_nothing() {
        let chain = CredentialChain::new(None, Some(tokens()), Some(mtls())).unwrap();
        let certs = deployer_certificate();
        let forged = request(&[
            (PRINCIPAL_HEADER, "alice@example.com"),
            (KIND_HEADER, "human"),
            (GROUPS_HEADER, "security"),
        ]);
        let context = chain.context(&forged, Some(&certs)).unwrap();
        assert_eq!(context.principal.id, "deployer");
        assert_eq!(context.principal.kind, PrincipalKind::Agent);
        assert_eq!(
            context.principal.authenticated_by,
            "mtls:spiffe://example.org/agent/deployer"
        );
    }

    #[test]
    fn a_credential_beats_the_client_certificate_and_a_bad_one_never_falls_back_to_it() {
        let chain = CredentialChain::new(None, Some(tokens()), Some(mtls())).unwrap();
        let certs = deployer_certificate();
        let with_token = request(&[("authorization", &format!("Bearer {TOKEN}"))]);
        let p = chain.context(&with_token, Some(&certs)).unwrap().principal;
        assert_eq!(p.id, "pipeline");
        assert_eq!(p.authenticated_by, "token:ci");
        let bad_token = request(&[("x-countersign-token", "not-a-configured-token")]);
        let err = chain.context(&bad_token, Some(&certs)).unwrap_err();
        assert_eq!(err, AuthError::Invalid("unknown token".into()));
    }

    #[test]
    fn with_only_client_certificates_a_token_is_refused_and_no_certificate_is_missing() {
        let chain = CredentialChain::new(None, None, Some(mtls())).unwrap();
        let certs = deployer_certificate();
        let err = chain
            .context(
                &request(&[("authorization", &format!("Bearer {TOKEN}"))]),
                Some(&certs),
            )
            .unwrap_err();
        assert!(matches!(err, AuthError::Invalid(_)), "{err}");
        assert!(!err.to_string().contains(TOKEN), "{err}");
        let err = chain.context(&request(&[]), None).unwrap_err();
        assert_eq!(
            err,
            AuthError::Missing("present a client certificate signed by the configured CA".into())
        );
        let both = CredentialChain::new(None, Some(tokens()), Some(mtls())).unwrap();
        let err = both.context(&request(&[]), Some(&[])).unwrap_err();
        assert!(matches!(err, AuthError::Missing(_)), "{err}");
        assert!(err.to_string().contains("client certificate"), "{err}");
        assert!(err.to_string().contains("Bearer"), "{err}");
    }
}
