//! The one place that turns "who the reviewer is" into an authenticated `ReviewService`
//! client: the [`Credentials`] sent with every call and the endpoint's TLS.
//!
//! A credential beats development identity: with a bearer token (`--token-file`, or the
//! token itself in `COUNTERSIGN_TOKEN`) or a client certificate (`--client-cert` and
//! `--client-key`, over https://), the `x-countersign-*` identity headers are never sent.
//! A token is never printed, and never sent in the clear to anything but a loopback
//! address. Every file is read once, bounded, and checked here, so a bad one is a usage
//! error (exit 2) naming it rather than a failed handshake.

use std::future::Future;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use crate::auth::credentials::{AUTHORIZATION_HEADER, MAX_CREDENTIAL_BYTES};
use crate::auth::{GROUPS_HEADER, KIND_HEADER, PRINCIPAL_HEADER};
use crate::error_chain;
use crate::tls;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::{CliError, CommonArgs};
use crate::proto::review_service_client::ReviewServiceClient;

pub type ReviewClient = ReviewServiceClient<InterceptedService<Channel, Credentials>>;

/// The environment variable holding a bearer token itself (`--token-file` names a file).
pub const TOKEN_ENV: &str = "COUNTERSIGN_TOKEN";

/// Largest answer accepted. A page of records with large parameters can exceed tonic's
/// 4 MiB default; far beyond this something is wrong and we would rather say so.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 pings while a call is open, so a `watch` on a silently dead connection (a NAT
/// or load balancer that dropped it) notices and reconnects instead of waiting forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity attached to every call.
#[derive(Clone)]
pub enum Credentials {
    /// Development identity: a human named by `x-countersign-*` metadata.
    Development {
        principal: AsciiMetadataValue,
        groups: Option<AsciiMetadataValue>,
    },
    /// `authorization: Bearer <token>`: a JWT or a static API token; the server tells them
    /// apart.
    Bearer(AsciiMetadataValue),
    /// The client certificate alone (mTLS) names the caller: nothing in metadata.
    Certificate,
}

/// Never prints a token: debug output can end up in bug reports.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Development { principal, groups } => f
                .debug_struct("Development")
                .field("principal", principal)
                .field("groups", groups)
                .finish(),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credentials::Certificate => f.write_str("Certificate"),
        }
    }
}

impl Credentials {
    /// Development identity. Values are checked here so a bad `--as` is a usage error
    /// rather than a failed call.
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
        Ok(Credentials::Development { principal, groups })
    }

    /// A bearer token as read from a file or the environment (`from` says which, for
    /// errors); surrounding whitespace is dropped. Errors never quote the token.
    pub fn bearer(token: &str, from: &str) -> Result<Self, CliError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(CliError::Usage(format!("{from}: the token is empty")));
        }
        if token.len() > MAX_CREDENTIAL_BYTES {
            return Err(CliError::Usage(format!(
                "{from}: the token is longer than {MAX_CREDENTIAL_BYTES} bytes, which the server never accepts"
            )));
        }
        let not_a_token = || {
            CliError::Usage(format!(
                "{from}: the token must be visible ASCII on one line, without spaces"
            ))
        };
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(not_a_token());
        }
        let mut value =
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| not_a_token())?;
        // Keeps it out of HTTP/2 header compression tables (and of debug output).
        value.set_sensitive(true);
        Ok(Credentials::Bearer(value))
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        match self {
            Credentials::Development { principal, groups } => {
                metadata.insert(PRINCIPAL_HEADER, principal.clone());
                // Reviewers are people; the server never lets an agent review.
                metadata.insert(KIND_HEADER, MetadataValue::from_static("human"));
                if let Some(groups) = groups {
                    metadata.insert(GROUPS_HEADER, groups.clone());
                }
            }
            Credentials::Bearer(value) => {
                metadata.insert(AUTHORIZATION_HEADER, value.clone());
            }
            Credentials::Certificate => {}
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
    /// From the command line, with the token from `COUNTERSIGN_TOKEN` if it is set.
    pub fn new(args: &CommonArgs) -> Result<Self, CliError> {
        let env_token = match std::env::var(TOKEN_ENV) {
            Ok(token) => Some(token),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(CliError::Usage(format!(
                    "{TOKEN_ENV}: the token must be visible ASCII on one line"
                )));
            }
        };
        Self::with_env_token(args, env_token.as_deref())
    }

    /// [`Connector::new`] with the environment's token given: `--token-file` beats it.
    pub fn with_env_token(args: &CommonArgs, env_token: Option<&str>) -> Result<Self, CliError> {
        let server = args.server.trim().to_string();
        let endpoint = Endpoint::from_shared(server.clone()).map_err(|e| {
            CliError::Usage(format!(
                "--server `{server}` is not a URL like http://127.0.0.1:50051 ({e})"
            ))
        })?;
        let https = match endpoint.uri().scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(CliError::Usage(format!(
                    "--server `{server}` needs a scheme, e.g. http://{server} or https://{server}"
                )));
            }
        };
        let client_identity = match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(CliError::Usage(
                    "--client-cert needs --client-key: the private key of that certificate".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(CliError::Usage(
                    "--client-key needs --client-cert: the certificate of that key".into(),
                ));
            }
        };
        let endpoint = if https {
            let ca = args.ca_cert.as_deref().ok_or_else(|| {
                CliError::Usage(format!(
                    "--server `{server}` is https://: give --ca-cert FILE, the CA certificate(s) that signed the server's certificate (for a public CA, the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt)"
                ))
            })?;
            endpoint
                .tls_config(client_tls(ca, client_identity)?)
                .map_err(|e| CliError::Usage(format!("TLS: {}", error_chain(&e))))?
        } else {
            // tonic would silently speak plaintext to an http:// URL whatever TLS it is given.
            if args.ca_cert.is_some() || client_identity.is_some() {
                return Err(CliError::Usage(format!(
                    "--ca-cert, --client-cert and --client-key need an https:// server, not `{server}`"
                )));
            }
            endpoint
        };
        let token = match (&args.token_file, env_token) {
            (Some(path), _) => Some(read_token_file(path).and_then(|token| {
                Credentials::bearer(&token, &format!("--token-file {}", path.display()))
            })?),
            (None, Some(token)) => Some(Credentials::bearer(token, TOKEN_ENV)?),
            (None, None) => None,
        };
        let credentials = match (token, client_identity, &args.principal) {
            (Some(bearer), _, _) => {
                if !https && !is_loopback(&endpoint) {
                    return Err(CliError::Usage(format!(
                        "refusing to send a token in the clear to `{server}`: use https:// (with --ca-cert)"
                    )));
                }
                bearer
            }
            (None, Some(_), _) => Credentials::Certificate,
            (None, None, Some(principal)) => Credentials::development(principal, &args.groups)?,
            (None, None, None) => {
                return Err(CliError::Usage(
                    "say who you are: a credential (--token-file <FILE> or COUNTERSIGN_TOKEN, or --client-cert <FILE> with --client-key <FILE>), or --as <PRINCIPAL> in development identity mode".into(),
                ));
            }
        };
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

/// Trust `ca` for the server; present the client certificate, if any. Both checked first.
fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTlsConfig, CliError> {
    let usage = |e: tls::TlsError| CliError::Usage(e.to_string());
    tls::install_crypto_provider();
    let ca_pem = tls::read_pem("--ca-cert", ca).map_err(usage)?;
    tls::trust_anchors("--ca-cert", ca, &ca_pem).map_err(usage)?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .timeout(tls::HANDSHAKE_TIMEOUT);
    if let Some((cert, key)) = identity {
        let cert_pem = tls::read_pem("--client-cert", cert).map_err(usage)?;
        let key_pem = tls::read_pem("--client-key", key).map_err(usage)?;
        let chain = tls::certificates("--client-cert", cert, &cert_pem).map_err(usage)?;
        tls::check_key_pair(
            ("--client-cert", cert),
            ("--client-key", key),
            chain,
            &key_pem,
        )
        .map_err(usage)?;
        config = config.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(config)
}

/// The token file's contents, bounded: more than any credential the server accepts is
/// refused rather than read whole. Errors name the file, never its contents.
fn read_token_file(path: &Path) -> Result<String, CliError> {
    let unreadable = |e: std::io::Error| {
        CliError::Usage(format!("cannot read --token-file {}: {e}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let limit = 2 * MAX_CREDENTIAL_BYTES as u64;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > limit {
        return Err(CliError::Usage(format!(
            "--token-file {}: longer than {limit} bytes; not a token",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        CliError::Usage(format!(
            "--token-file {}: the token must be visible ASCII on one line",
            path.display()
        ))
    })
}

/// Whether the endpoint is this machine: the only place a token may go without TLS.
fn is_loopback(endpoint: &Endpoint) -> bool {
    let Some(host) = endpoint.uri().host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(server: &str, principal: &str, groups: &[&str]) -> CommonArgs {
        CommonArgs {
            server: server.to_string(),
            principal: Some(principal.to_string()).filter(|p| !p.is_empty()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            token_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            json: false,
            timeout: Duration::from_secs(1),
        }
    }

    const TOKEN: &str = "q3Vb8mZ1xR7tK2wN5pL0sD4fG6hJ9cA1eY8uI3oT5nM=";

    /// A CA, and a client certificate and key it signed, as files.
    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::default();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["alice.example.org".into()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            for (name, pem) in [
                ("ca.pem", ca_cert.pem()),
                ("alice.pem", cert.pem()),
                ("alice-key.pem", key.serialize_pem()),
                ("other-key.pem", other_key.serialize_pem()),
            ] {
                std::fs::write(dir.path().join(name), pem).unwrap();
            }
            Pki { dir }
        }

        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }

        fn mtls_args(&self) -> CommonArgs {
            let mut a = args("https://127.0.0.1:50051", "", &[]);
            a.ca_cert = Some(self.path("ca.pem"));
            a.client_cert = Some(self.path("alice.pem"));
            a.client_key = Some(self.path("alice-key.pem"));
            a
        }
    }

    fn usage_error(args: &CommonArgs, env_token: Option<&str>) -> String {
        match Connector::with_env_token(args, env_token) {
            Ok(_) => panic!("expected a usage error: {args:?}"),
            Err(error @ CliError::Usage(_)) => {
                assert_eq!(error.exit_code(), 2);
                error.to_string()
            }
            Err(other) => panic!("expected a usage error, got {other}"),
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
    fn servers_need_an_http_or_https_url() {
        assert!(
            Connector::with_env_token(&args("http://127.0.0.1:50051", "bob", &[]), None).is_ok()
        );
        for bad in ["127.0.0.1:50051", "not a url", "ftp://127.0.0.1:50051"] {
            let message = usage_error(&args(bad, "bob", &[]), None);
            assert!(message.contains(bad), "{bad}: {message}");
        }
        let message = usage_error(&args("https://example.com", "bob", &[]), None);
        assert!(message.contains("--ca-cert"), "{message}");
    }

    #[test]
    fn a_token_replaces_the_development_headers_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, format!("  {TOKEN}\n")).unwrap();
        let mut a = args("http://127.0.0.1:50051", "bob", &["security"]);
        a.token_file = Some(file);
        // The file beats the environment.
        let connector =
            Connector::with_env_token(&a, Some("ignored-env-token-0123456789")).unwrap();
        let request = connector
            .credentials
            .clone()
            .call(Request::new(()))
            .unwrap();
        let metadata = request.metadata();
        assert_eq!(
            metadata.get(AUTHORIZATION_HEADER).unwrap(),
            &format!("Bearer {TOKEN}")
        );
        assert!(metadata.get(AUTHORIZATION_HEADER).unwrap().is_sensitive());
        assert!(metadata.get(PRINCIPAL_HEADER).is_none());
        assert!(metadata.get(GROUPS_HEADER).is_none());
        assert!(metadata.get(KIND_HEADER).is_none());
        assert_eq!(format!("{:?}", connector.credentials), "Bearer(<redacted>)");

        let from_env =
            Connector::with_env_token(&args("http://localhost:1", "", &[]), Some(TOKEN)).unwrap();
        assert!(matches!(from_env.credentials, Credentials::Bearer(_)));
    }

    #[test]
    fn unusable_tokens_are_usage_errors_that_never_quote_them() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(String, Vec<u8>)> = vec![
            ("empty".into(), b" \n".to_vec()),
            ("two lines".into(), format!("{TOKEN}\n{TOKEN}").into_bytes()),
            ("a space".into(), format!("{TOKEN} {TOKEN}").into_bytes()),
            ("not ascii".into(), format!("{TOKEN}é").into_bytes()),
            ("binary".into(), vec![0xff, 0xfe, b'a']),
            ("too long".into(), vec![b'a'; 3 * MAX_CREDENTIAL_BYTES]),
            ("long".into(), vec![b'a'; MAX_CREDENTIAL_BYTES + 1]),
        ];
        for (what, contents) in cases {
            let file = dir.path().join("token");
            std::fs::write(&file, &contents).unwrap();
            let mut a = args("http://127.0.0.1:50051", "", &[]);
            a.token_file = Some(file);
            let message = usage_error(&a, None);
            assert!(message.starts_with("--token-file "), "{what}: {message}");
            assert!(!message.contains(TOKEN), "{what}: {message}");
        }
        let mut a = args("http://127.0.0.1:50051", "", &[]);
        a.token_file = Some(dir.path().join("missing"));
        assert!(usage_error(&a, None).starts_with("cannot read --token-file"));
        let message = usage_error(&args("http://127.0.0.1:1", "", &[]), Some("   "));
        assert_eq!(message, "COUNTERSIGN_TOKEN: the token is empty");
    }

    #[test]
    fn a_token_never_goes_in_the_clear_beyond_loopback() {
        for local in ["http://127.0.0.1:1", "http://[::1]:1", "http://LOCALHOST:1"] {
            assert!(
                Connector::with_env_token(&args(local, "", &[]), Some(TOKEN)).is_ok(),
                "{local}"
            );
        }
        let message = usage_error(
            &args("http://countersign.example.com:443", "", &[]),
            Some(TOKEN),
        );
        assert!(
            message.contains("refusing to send a token in the clear"),
            "{message}"
        );
        assert!(!message.contains(TOKEN), "{message}");
    }

    #[test]
    fn without_a_credential_or_a_principal_the_reviewer_is_told_what_to_give() {
        let message = usage_error(&args("http://127.0.0.1:1", "", &[]), None);
        assert!(message.contains("--as <PRINCIPAL>"), "{message}");
        assert!(message.contains("--token-file"), "{message}");
        assert!(message.contains("--client-cert"), "{message}");
    }

    #[test]
    fn a_client_certificate_alone_sends_no_identity_headers() {
        let pki = Pki::new();
        let mut a = pki.mtls_args();
        a.principal = Some("mallory".into());
        let connector = Connector::with_env_token(&a, None).unwrap();
        assert!(matches!(connector.credentials, Credentials::Certificate));
        let request = connector
            .credentials
            .clone()
            .call(Request::new(()))
            .unwrap();
        assert!(request.metadata().is_empty());
        // With a token too, the token names the caller.
        let connector = Connector::with_env_token(&a, Some(TOKEN)).unwrap();
        assert!(matches!(connector.credentials, Credentials::Bearer(_)));
    }

    #[test]
    fn tls_flags_are_checked_before_connecting() {
        let pki = Pki::new();
        let mut no_key = pki.mtls_args();
        no_key.client_key = None;
        assert!(usage_error(&no_key, None).starts_with("--client-cert needs --client-key"));
        let mut no_cert = pki.mtls_args();
        no_cert.client_cert = None;
        assert!(usage_error(&no_cert, None).starts_with("--client-key needs --client-cert"));

        let mut plaintext = pki.mtls_args();
        plaintext.server = "http://127.0.0.1:50051".into();
        assert!(usage_error(&plaintext, None).contains("need an https:// server"));

        let mut wrong_key = pki.mtls_args();
        wrong_key.client_key = Some(pki.path("other-key.pem"));
        let message = usage_error(&wrong_key, None);
        assert!(message.starts_with("--client-key "), "{message}");
        assert!(
            message.contains("is not the key of the certificate"),
            "{message}"
        );

        let mut key_as_ca = pki.mtls_args();
        key_as_ca.ca_cert = Some(pki.path("alice-key.pem"));
        let message = usage_error(&key_as_ca, None);
        assert!(message.starts_with("--ca-cert "), "{message}");
        assert!(!message.contains("PRIVATE KEY-----"), "{message}");

        let mut missing = pki.mtls_args();
        missing.client_cert = Some(pki.path("missing.pem"));
        assert!(usage_error(&missing, None).starts_with("cannot read --client-cert"));

        // Server TLS only (no client certificate) with development identity is fine.
        let mut server_only = pki.mtls_args();
        server_only.client_cert = None;
        server_only.client_key = None;
        server_only.principal = Some("bob".into());
        let connector = Connector::with_env_token(&server_only, None).unwrap();
        assert!(matches!(
            connector.credentials,
            Credentials::Development { .. }
        ));
    }
}
