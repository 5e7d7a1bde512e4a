//! Who the benchmark's calls claim to be, and the connections they travel on.

use std::io::Read as _;
use std::path::Path;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::{BenchError, TargetArgs};
use crate::auth::credentials::MAX_CREDENTIAL_BYTES;
use crate::auth::{GROUPS_HEADER, KIND_HEADER, PRINCIPAL_HEADER};
use crate::error_chain;

/// The metadata attached to every call of one simulated client: development identity
/// headers (the server's default mode) or a bearer token. Values are built once, so a call
/// only clones a few reference-counted headers.
#[derive(Clone, Debug)]
pub struct Identity {
    headers: Vec<(&'static str, AsciiMetadataValue)>,
}

impl Identity {
    /// An agent named in development identity headers.
    pub fn agent(principal: &str) -> Result<Identity, BenchError> {
        Self::development(principal, "agent", "")
    }

    /// A human with groups, named in development identity headers.
    pub fn human(principal: &str, groups: &str) -> Result<Identity, BenchError> {
        Self::development(principal, "human", groups)
    }

    fn development(principal: &str, kind: &str, groups: &str) -> Result<Identity, BenchError> {
        let value = |what: &str, v: &str| {
            MetadataValue::try_from(v)
                .map_err(|_| BenchError::Usage(format!("{what} `{v}` must be visible ASCII")))
        };
        let mut headers = vec![
            (PRINCIPAL_HEADER, value("principal", principal)?),
            (KIND_HEADER, value("kind", kind)?),
        ];
        if !groups.is_empty() {
            headers.push((GROUPS_HEADER, value("groups", groups)?));
        }
        Ok(Identity { headers })
    }

    /// A bearer token read from `path` (first line, trimmed).
    pub fn token_file(path: &Path) -> Result<Identity, BenchError> {
        let read = |source| BenchError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(2 * MAX_CREDENTIAL_BYTES as u64)
            .read_to_string(&mut text)
            .map_err(read)?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() || token.len() > MAX_CREDENTIAL_BYTES {
            return Err(BenchError::Usage(format!(
                "{}: expected one token of 1..{MAX_CREDENTIAL_BYTES} bytes on the first line",
                path.display()
            )));
        }
        let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            BenchError::Usage(format!(
                "{}: the token is not visible ASCII",
                path.display()
            ))
        })?;
        Ok(Identity {
            headers: vec![("authorization", value)],
        })
    }

    /// The token in `token_file` when given, otherwise `fallback`.
    pub fn or_token(
        token_file: Option<&Path>,
        fallback: impl FnOnce() -> Result<Identity, BenchError>,
    ) -> Result<Identity, BenchError> {
        match token_file {
            Some(path) => Self::token_file(path),
            None => fallback(),
        }
    }
}

impl Interceptor for Identity {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        for (name, value) in &self.headers {
            metadata.insert(*name, value.clone());
        }
        Ok(request)
    }
}

/// Opens `count` separate HTTP/2 connections (one tonic `Channel` each; clones of a
/// channel share its connection).
pub async fn connect(target: &TargetArgs, count: u32) -> Result<Vec<Channel>, BenchError> {
    let server = target.server.trim().to_string();
    let endpoint = Endpoint::from_shared(server.clone()).map_err(|e| {
        BenchError::Usage(format!(
            "--server `{server}` is not a URL like http://127.0.0.1:50051 ({e})"
        ))
    })?;
    if endpoint.uri().scheme_str() != Some("http") {
        return Err(BenchError::Usage(format!(
            "--server `{server}`: only http:// URLs are supported"
        )));
    }
    let endpoint = endpoint
        .connect_timeout(target.timeout)
        .timeout(target.timeout)
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let channel = endpoint.connect().await.map_err(|e| BenchError::Connect {
            server: server.clone(),
            detail: error_chain(&e),
        })?;
        channels.push(channel);
    }
    Ok(channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_identity_sends_the_three_headers() {
        let mut id = Identity::human("rev-1", "sre").unwrap();
        let request = id.call(Request::new(())).unwrap();
        let m = request.metadata();
        assert_eq!(m.get(PRINCIPAL_HEADER).unwrap(), "rev-1");
        assert_eq!(m.get(KIND_HEADER).unwrap(), "human");
        assert_eq!(m.get(GROUPS_HEADER).unwrap(), "sre");
        let mut agent = Identity::agent("bot").unwrap();
        let request = agent.call(Request::new(())).unwrap();
        assert!(request.metadata().get(GROUPS_HEADER).is_none());
    }

    #[test]
    fn a_token_file_becomes_a_bearer_header_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "secret-token-value\n").unwrap();
        let mut id = Identity::token_file(&path).unwrap();
        let request = id.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer secret-token-value"
        );
        assert!(request.metadata().get(PRINCIPAL_HEADER).is_none());
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            Identity::token_file(&path),
            Err(BenchError::Usage(_))
        ));
    }
}
