//! Who is calling: turns a request's credentials into a [`Principal`].
//!
//! Authentication runs once per call, as a tonic interceptor in front of every countersign
//! service ([`AuthLayer`]); handlers only ever read the [`Principal`] it left in the request
//! extensions ([`principal`]). Nothing a handler does depends on how the identity was
//! established, so real authenticators drop in without touching the handlers.

pub mod chain;
pub mod context;
pub mod credentials;
mod development;
pub mod jwt;
pub mod roles;
pub mod token;

use std::sync::Arc;

use tonic::{Request, Status};

pub use chain::CredentialChain;
pub use context::{ActingFor, AuthContext, acting_for};
pub use credentials::AuthConfigError;
pub use development::{DevelopmentIdentity, GROUPS_HEADER, KIND_HEADER, PRINCIPAL_HEADER};
pub use jwt::{JwtAuthenticator, JwtConfig, PublicKeyFile};
pub use token::{StaticTokenAuthenticator, TokenConfig, TokenEntry, token_hash};

use crate::domain::Principal;

/// Establishes the caller's identity from a request's metadata and connection.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError>;
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
        let principal = self.authenticator.authenticate(&request).inspect_err(|e| {
            tracing::warn!(error = %e, "call refused: unauthenticated");
        })?;
        request.extensions_mut().insert(principal);
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
