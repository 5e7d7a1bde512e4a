//! How callers are authenticated: the settings `config` resolves from `[auth]` and the
//! server builds its one [`Authenticator`](super::Authenticator) from.

use std::path::PathBuf;

use super::{JwtConfig, MtlsConfig, TokenConfig};

/// How callers are authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthSettings {
    /// No `[auth]` section: callers name themselves in `x-countersign-*` metadata. Loopback
    /// only; the server logs a loud warning.
    #[default]
    Development,
    /// At least one credential method; identity headers are ignored.
    Credentials {
        /// Boxed: far larger than the other variant.
        jwt: Option<Box<JwtConfig>>,
        tokens: Option<TokenConfig>,
        /// Client certificates; needs `config::ServerConfig::tls`.
        mtls: Option<MtlsConfig>,
        /// Relative key file paths are resolved against this: the config file's directory.
        base_dir: PathBuf,
    },
}

impl AuthSettings {
    /// The names of the configured methods, for logs (`jwt`, `tokens`, `mtls`).
    pub fn methods(&self) -> Vec<&'static str> {
        match self {
            AuthSettings::Development => Vec::new(),
            AuthSettings::Credentials {
                jwt, tokens, mtls, ..
            } => [
                jwt.as_ref().map(|_| "jwt"),
                tokens.as_ref().map(|_| "tokens"),
                mtls.as_ref().map(|_| "mtls"),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }
}
