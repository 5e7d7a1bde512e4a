//! The one place that turns "who the reviewer is" into an authenticated `ReviewService`
//! client. Today that is the development identity headers; mTLS, JWT or token credentials
//! replace [`Credentials`] (and the endpoint's TLS) here without touching any command.

use std::future::Future;
use std::time::Duration;

use crate::auth::{GROUPS_HEADER, KIND_HEADER, PRINCIPAL_HEADER};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::{CliError, CommonArgs};
use crate::proto::review_service_client::ReviewServiceClient;

pub type ReviewClient = ReviewServiceClient<InterceptedService<Channel, Credentials>>;

/// Largest answer accepted. A page of records with large parameters can exceed tonic's
/// 4 MiB default; far beyond this something is wrong and we would rather say so.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 pings while a call is open, so a `watch` on a silently dead connection (a NAT
/// or load balancer that dropped it) notices and reconnects instead of waiting forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity attached to every call.
#[derive(Clone, Debug)]
pub struct Credentials {
    principal: AsciiMetadataValue,
    groups: Option<AsciiMetadataValue>,
}

impl Credentials {
    /// Development identity: a human named by `x-countersign-*` metadata. Values are
    /// checked here so a bad `--as` is a usage error rather than a failed call.
    pub fn development(principal: &str, groups: &[String]) -> Result<Self, CliError> {
        let principal = MetadataValue::try_from(principal.trim()).map_err(|_| {
            CliError::Usage(format!(
                "--as `{principal}` must be visible ASCII (letters, digits and ._-@:/+)"
            ))
        })?;
        let groups: Vec<&str> = groups
            .iter()
            .map(|g| g.trim())
            .filter(|g| !g.is_empty())
            .collect();
        let groups = if groups.is_empty() {
            None
        } else {
            let list = groups.join(",");
            Some(MetadataValue::try_from(list.as_str()).map_err(|_| {
                CliError::Usage(format!(
                    "--groups `{list}` must be visible ASCII (letters, digits and ._-@:/+)"
                ))
            })?)
        };
        Ok(Credentials { principal, groups })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(PRINCIPAL_HEADER, self.principal.clone());
        // Reviewers are people; the server never lets an agent review.
        metadata.insert(KIND_HEADER, MetadataValue::from_static("human"));
        if let Some(groups) = &self.groups {
            metadata.insert(GROUPS_HEADER, groups.clone());
        }
        Ok(request)
    }
}

/// Knows where the server is and who we are; makes connections on demand (`watch`
/// reconnects through it).
pub struct Connector {
    server: String,
    endpoint: Endpoint,
    credentials: Credentials,
    timeout: Duration,
}

impl Connector {
    pub fn new(args: &CommonArgs) -> Result<Self, CliError> {
        let credentials = Credentials::development(&args.principal, &args.groups)?;
        let server = args.server.trim().to_string();
        let endpoint = Endpoint::from_shared(server.clone()).map_err(|e| {
            CliError::Usage(format!(
                "--server `{server}` is not a URL like http://127.0.0.1:50051 ({e})"
            ))
        })?;
        match endpoint.uri().scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(CliError::Usage(format!(
                    "--server `{server}`: TLS is not supported yet; development identity works over http:// on loopback"
                )));
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "--server `{server}` needs a scheme, e.g. http://{server}"
                )));
            }
        }
        let endpoint = endpoint
            .connect_timeout(args.timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        Ok(Connector {
            server,
            endpoint,
            credentials,
            timeout: args.timeout,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// `--timeout`: the bound on connecting and on each unary call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Opens a connection now, so an unreachable server is reported as such.
    pub async fn connect(&self) -> Result<ReviewClient, CliError> {
        let channel = tokio::time::timeout(self.timeout, self.endpoint.connect())
            .await
            .map_err(|_| CliError::Connect {
                server: self.server.clone(),
                detail: format!(
                    "no connection within {}",
                    humantime::format_duration(self.timeout)
                ),
            })?
            .map_err(|e| CliError::Connect {
                server: self.server.clone(),
                detail: error_chain(&e),
            })?;
        Ok(
            ReviewServiceClient::with_interceptor(channel, self.credentials.clone())
                .max_decoding_message_size(MAX_ANSWER_BYTES),
        )
    }

    /// A unary request carrying our deadline, so the server gives up when we do.
    pub fn request<T>(&self, body: T) -> Request<T> {
        let mut request = Request::new(body);
        request.set_timeout(self.timeout);
        request
    }

    /// Runs one unary call, bounded by `--timeout` even if the server never answers.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CliError::Status(status)),
            Err(_) => Err(CliError::TimedOut(self.timeout)),
        }
    }
}

/// An error and its causes on one line: tonic's own message ("transport error") alone
/// does not tell a person that the connection was refused.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(server: &str, principal: &str, groups: &[&str]) -> CommonArgs {
        CommonArgs {
            server: server.to_string(),
            principal: principal.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            json: false,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn every_call_names_a_human_with_its_groups() {
        let mut credentials =
            Credentials::development("bob", &["security".into(), " sre ".into(), "".into()])
                .unwrap();
        let request = credentials.call(Request::new(())).unwrap();
        let metadata = request.metadata();
        assert_eq!(metadata.get(PRINCIPAL_HEADER).unwrap(), "bob");
        assert_eq!(metadata.get(KIND_HEADER).unwrap(), "human");
        assert_eq!(metadata.get(GROUPS_HEADER).unwrap(), "security,sre");
    }

    #[test]
    fn no_groups_sends_no_groups_header() {
        let mut credentials = Credentials::development("bob", &[]).unwrap();
        let request = credentials.call(Request::new(())).unwrap();
        assert!(request.metadata().get(GROUPS_HEADER).is_none());
    }

    #[test]
    fn an_identity_that_cannot_be_sent_is_a_usage_error() {
        let error = Credentials::development("bob\u{7f}", &[]).unwrap_err();
        assert!(matches!(error, CliError::Usage(_)), "{error}");
    }

    #[test]
    fn servers_need_an_http_url() {
        assert!(Connector::new(&args("http://127.0.0.1:50051", "bob", &[])).is_ok());
        for bad in ["127.0.0.1:50051", "https://example.com", "not a url"] {
            let error = Connector::new(&args(bad, "bob", &[])).err().unwrap();
            assert!(matches!(error, CliError::Usage(_)), "{bad}: {error}");
        }
    }
}
