//! Who is calling: turns a request's credentials into a [`Principal`].
//!
//! Authentication and authorization run once per call, in the [`Guard`] in front of every
//! countersign service; handlers only ever read the [`Principal`], the [`ActingFor`] (if
//! any) and the [`Grants`] it left in the request extensions ([`principal`],
//! [`acting_for`], [`grants`]). Nothing a handler does depends on how the identity was
//! established, so authenticators drop in without touching the handlers.

pub mod chain;
pub mod context;
pub mod credentials;
pub mod denials;
mod development;
pub mod guard;
pub mod jwt;
pub mod mtls;
pub mod rate_limit;
pub mod roles;
mod settings;
pub mod token;

use tonic::{Request, Status};

pub use chain::CredentialChain;
pub use context::{ActingFor, AuthContext, acting_for};
pub use credentials::AuthConfigError;
pub use denials::{DenialReporter, start_recorder as start_denial_recorder};
pub use development::{
    DevelopmentIdentity, GROUPS_HEADER, KIND_HEADER, METHOD as DEVELOPMENT_METHOD, PRINCIPAL_HEADER,
};
pub use guard::{Guard, GuardLayer, Refuser};
pub use jwt::{JwtAuthenticator, JwtConfig, PublicKeyFile};
pub use mtls::{IdentityEntry, MtlsAuthenticator, MtlsConfig};
pub use rate_limit::{Budget, LimitObserver, Rate, RateLimiter, RateLimits};
pub use roles::{Grants, RoleDenied, RoleRefusal, Roles, RolesConfig, RolesConfigError};
pub use settings::AuthSettings;
pub use token::{StaticTokenAuthenticator, TokenConfig, TokenEntry, token_hash};

use crate::domain::Principal;

/// Establishes the caller's identity from a request's metadata and connection.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, request: &Request<()>) -> Result<Principal, AuthError>;

    /// Everything the credential established: the principal and, when the credential names
    /// one, the human the agent acts for. What [`Guard`] stores for handlers. The
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

/// The authenticated caller of this request.
///
/// UNAUTHENTICATED if the service was (wrongly) mounted without [`Guard`]: a missing
/// identity must never read as "anyone".
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated principal for this call"))
}

/// The roles the caller holds. None at all if the service was (wrongly) mounted without
/// [`Guard`]: a missing grant never reads as a privilege.
pub fn grants<T>(request: &Request<T>) -> Grants {
    request
        .extensions()
        .get::<Grants>()
        .copied()
        .unwrap_or_default()
}

/// Why the caller, admitted to an RPC that refuses on the record it targets
/// ([`roles::refused_on_record`]), may not make this call; `None` when its role allows it.
pub fn role_refusal<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<RoleRefusal>()
        .map(|refusal| refusal.0.clone())
}
