//! Who is calling: turns a request's credentials into a [`Principal`].
//!
//! Authentication runs once per call, as a tonic interceptor in front of every countersign
//! service ([`AuthLayer`]); handlers only ever read the [`Principal`] (and the
//! [`ActingFor`], if any) it left in the request extensions ([`principal`], [`acting_for`]).
//! Nothing a handler does depends on how the identity was established, so real
//! authenticators drop in without touching the handlers.

pub mod chain;
pub mod context;
pub mod credentials;
mod development;
pub mod jwt;
pub mod mtls;
pub mod roles;
pub mod token;

use std::sync::Arc;

use tonic::{Request, Status};

pub use chain::CredentialChain;
pub use context::{ActingFor, AuthContext, acting_for};
pub use credentials::AuthConfigError;
pub use development::{DevelopmentIdentity, GROUPS_HEADER, KIND_HEADER, PRINCIPAL_HEADER};
pub use jwt::{JwtAuthenticator, JwtConfig, PublicKeyFile};
pub use mtls::{IdentityEntry, MtlsAuthenticator, MtlsConfig};
pub use token::{StaticTokenAuthenticator, TokenConfig, TokenEntry, token_hash};

use crate::domain::Principal;

/// Establishes the caller's identity from a request's metadata and connection.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError>;

    /// Everything the credential established: the principal and, when the credential names
    /// one, the human the agent acts for. What [`AuthLayer`] stores for handlers. The
    /// default knows only the principal; authenticators whose credentials can say more
    /// override it.
    fn authenticate_context(&self, request: &Request<()>) -> Result<AuthContext, AuthError> {
        self.authenticate(request).map(AuthContext::from)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no credentials: {0}")]
    Missing(String),
    #[error("invalid credentials: {0}")]
    Invalid(String),
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Status {
        Status::unauthenticated(error.to_string())
    }
}

/// The interceptor that runs the configured [`Authenticator`] on every call.
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<dyn Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<dyn Authenticator>) -> Self {
        AuthLayer { authenticator }
    }
}

impl tonic::service::Interceptor for AuthLayer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let context = self
            .authenticator
            .authenticate_context(&request)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "call refused: unauthenticated");
            })?;
        // Also clears any ActingFor a call without one could otherwise carry.
        context.insert_into(request.extensions_mut());
        Ok(request)
    }
}

/// The authenticated caller of this request.
///
/// UNAUTHENTICATED if the service was (wrongly) mounted without [`AuthLayer`]: a missing
/// identity must never read as "anyone".
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated principal for this call"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    #[test]
    fn the_layer_stores_the_context_and_an_authenticator_without_one_acts_for_nobody() {
        let mut layer = AuthLayer::new(Arc::new(DevelopmentIdentity));
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(PRINCIPAL_HEADER, "deployer".parse().unwrap());
        // Nothing a client sends can end up as an extension, but make sure a stale one
        // would not survive authentication either.
        request.extensions_mut().insert(ActingFor {
            human: "mallory".into(),
            asserted: false,
        });
        let accepted = layer.call(request).unwrap();
        assert_eq!(principal(&accepted).unwrap().id, "deployer");
        assert_eq!(acting_for(&accepted), None);
    }
}
