//! Assembles and runs the gRPC server: listener, TLS, authentication, services, health,
//! reflection, and graceful shutdown.
//!
//! Secure by default: a listener beyond loopback needs TLS (`[tls]`) *and* an
//! authentication method (`[auth]`); development identity, which trusts whatever a caller
//! says, never leaves loopback, with or without TLS. [`start`] refuses anything else
//! before touching the disk, in one line naming what is missing.
//!
//! [`start`] returns once the server is listening, with a [`RunningServer`] that owns the
//! serving task. [`RunningServer::stop`] stops accepting calls, lets in-flight calls
//! finish, and returns only after the ledger has flushed and released the data directory,
//! so the same directory can be opened again at once (restarts in tests, upgrades).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::api::{ActionGateApi, AuditApi, Core, CurrentPolicies, PolicyApi, ReviewApi};
use crate::auth::{
    AuthConfigError, AuthLayer, Authenticator, CredentialChain, DevelopmentIdentity,
    JwtAuthenticator, MtlsAuthenticator, StaticTokenAuthenticator,
};
use crate::config::{AuthSettings, ServerConfig};
use crate::ledger::{Ledger, LedgerError, ReplayReport};
use crate::policy::{PolicyError, PolicySet};
use crate::proto;
use crate::proto::action_gate_server::ActionGateServer;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::policy_service_server::PolicyServiceServer;
use crate::proto::review_service_server::ReviewServiceServer;
use crate::tls::{self, TlsError};

/// How long `stop` waits for the last holders of the ledger (in-flight calls) to let go.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener beyond loopback without what makes it safe; see [`Insecure`].
    #[error("refusing to listen on {addr}: {missing}")]
    InsecureListen { addr: SocketAddr, missing: Insecure },
    #[error("authentication config: {0}")]
    Auth(#[from] AuthConfigError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("invalid policies: {0}")]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("start-up was interrupted: {0}")]
    Startup(String),
    #[error("the ledger was still in use {0:?} after shutdown")]
    LedgerNotReleased(Duration),
}

/// Why a non-loopback listener is refused: what is missing, and what to configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Insecure {
    #[error(
        "development identity mode trusts whatever callers say and there is no TLS; configure [auth] and [tls], or listen on a loopback address (127.0.0.1 or [::1])"
    )]
    DevelopmentWithoutTls,
    #[error(
        "development identity mode trusts whatever callers say, so it stays on a loopback address (127.0.0.1 or [::1]) even with TLS; configure [auth] to listen elsewhere"
    )]
    Development,
    #[error(
        "without TLS, credentials would cross the network in the clear; configure [tls] (cert and key), or listen on a loopback address (127.0.0.1 or [::1])"
    )]
    NoTls,
}

/// Loopback listens as configured; anything else needs TLS and authentication.
pub fn check_listen(config: &ServerConfig) -> Result<(), ServeError> {
    if config.listen.ip().is_loopback() {
        return Ok(());
    }
    let missing = match (&config.auth, config.tls.is_some()) {
        (AuthSettings::Credentials { .. }, true) => return Ok(()),
        (AuthSettings::Credentials { .. }, false) => Insecure::NoTls,
        (AuthSettings::Development, true) => Insecure::Development,
        (AuthSettings::Development, false) => Insecure::DevelopmentWithoutTls,
    };
    Err(ServeError::InsecureListen {
        addr: config.listen,
        missing,
    })
}

/// A server that is accepting calls.
pub struct RunningServer {
    local_addr: SocketAddr,
    replay: ReplayReport,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What start-up found in the event log.
    pub fn replay_report(&self) -> &ReplayReport {
        &self.replay
    }

    /// Stops gracefully and waits until the data directory is released.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.wait().await
    }

    /// Runs until the server ends (after `stop`, or a fatal error).
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ServeError::Startup(format!("the serving task failed: {e}"))),
        }
    }

    /// Stops when `signal` completes.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let shutdown = self.shutdown.take();
        tokio::select! {
            result = &mut self.task => {
                return result.unwrap_or_else(|e| Err(ServeError::Startup(e.to_string())));
            }
            () = signal => {}
        }
        if let Some(shutdown) = shutdown {
            let _ = shutdown.send(());
        }
        self.wait().await
    }
}

pub async fn start(config: ServerConfig) -> Result<RunningServer, ServeError> {
    check_listen(&config)?;
    // Before anything else touches the disk: a bad key file is the likeliest start-up error.
    let authenticator = authenticator(&config.auth)?;
    let client_ca = tls::client_ca(&config.auth);
    let tls = match &config.tls {
        Some(settings) => Some(tls::server_config(
            &settings.cert,
            &settings.key,
            client_ca.as_ref(),
        )?),
        None if client_ca.is_some() => {
            return Err(AuthConfigError::Invalid(
                "auth.mtls: client certificates are checked during the TLS handshake: configure [tls]".into(),
            )
            .into());
        }
        None => None,
    };
    // Loading compiles every rule on a thread of its own; keep it off the async workers.
    let policy_dir = config.policies.clone();
    let policies = tokio::task::spawn_blocking(move || PolicySet::load_dir(&policy_dir))
        .await
        .map_err(|e| ServeError::Startup(e.to_string()))??;
    tracing::info!(
        directory = %config.policies.display(),
        version = %policies.version(),
        rules = policies.rule_count(),
        "policies loaded"
    );

    let data_dir = config.data_dir.clone();
    let times = config.times;
    let (ledger, replay) = tokio::task::spawn_blocking(move || Ledger::open(&data_dir, times))
        .await
        .map_err(|e| ServeError::Startup(e.to_string()))??;
    log_replay(&config, &replay);

    match &config.auth {
        AuthSettings::Development => tracing::warn!(
            "DEVELOPMENT IDENTITY MODE: callers name themselves with x-countersign-* metadata; \
             nothing is authenticated. Loopback only; every event records `development-header`."
        ),
        auth @ AuthSettings::Credentials { .. } => tracing::info!(
            methods = %auth.methods().join(","),
            "authentication on; x-countersign-* identity headers are ignored"
        ),
    }
    match (&config.tls, &tls) {
        (Some(settings), Some((_, client_certificates))) => tracing::info!(
            cert = %settings.cert.display(),
            client_certificates = client_certificates.as_str(),
            "TLS on"
        ),
        _ => tracing::info!("TLS off: plaintext HTTP/2 on a loopback address"),
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;

    let ledger = Arc::new(ledger);
    // Ends by itself when the ledger is dropped.
    ledger.start_expiry_timer();
    let ledger_released: Weak<Ledger> = Arc::downgrade(&ledger);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let core = Arc::new(Core {
        ledger,
        policies: Arc::new(CurrentPolicies::new(config.policies.clone(), policies)),
        times: config.times,
        max_await: config.max_await,
        reviewer_stall_timeout: config.reviewer_stall_timeout,
        stopping,
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ReviewServiceServer<ReviewApi>>().await;
    health.set_serving::<AuditServiceServer<AuditApi>>().await;
    health.set_serving::<PolicyServiceServer<PolicyApi>>().await;
    health
        .set_serving::<ActionGateServer<ActionGateApi>>()
        .await;
    // A ledger that refuses writes (log failed verification, or a write failed) still serves
    // reads and audits, but health tells load balancers and orchestrators it will not decide.
    let mut refusing = core.ledger.watch_refusal();
    let gate_health = health.clone();
    tokio::spawn(async move {
        loop {
            if *refusing.borrow_and_update() {
                gate_health
                    .set_not_serving::<ActionGateServer<ActionGateApi>>()
                    .await;
                return;
            }
            if refusing.changed().await.is_err() {
                return;
            }
        }
    });

    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Startup(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Startup(format!("reflection: {e}")))?;

    let auth = AuthLayer::new(authenticator);
    let max = config.max_message_bytes;
    let action_gate =
        ActionGateServer::new(ActionGateApi::new(core.clone())).max_decoding_message_size(max);
    let review =
        ReviewServiceServer::new(ReviewApi::new(core.clone())).max_decoding_message_size(max);
    let audit = AuditServiceServer::new(AuditApi::new(core.clone())).max_decoding_message_size(max);
    let policy =
        PolicyServiceServer::new(PolicyApi::new(core.clone())).max_decoding_message_size(max);
    drop(core);

    let mut builder = Server::builder();
    if let Some((tls_config, _)) = tls {
        builder = builder
            .tls_config(tls_config)
            .map_err(|e| TlsError::Rejected(error_chain(&e)))?;
    }
    let router = builder
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            action_gate,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            review,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            audit,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            policy, auth,
        ));

    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    // Our own listener (bound early, for port 0), so tonic's `tcp_nodelay` does not reach
    // its sockets: set it here. Without it, Nagle's algorithm and delayed ACKs add ~40 ms
    // to small replies, such as a waiter's wake-up. tonic runs the TLS handshake on every
    // connection this stream yields (`tls_config` applies to custom incoming streams too;
    // tests/tls.rs checks that a plaintext client gets nowhere).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tracing::info!(address = %local_addr, "countersign is serving");
    let task = tokio::spawn(async move {
        let served = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_signal.await;
                // Long waits and streams end now, so the graceful drain below finishes.
                stopping_tx.send_replace(true);
            })
            .await;
        drop(health);
        wait_for_release(ledger_released).await?;
        tracing::info!("countersign stopped; event log flushed");
        served.map_err(ServeError::from)
    });

    Ok(RunningServer {
        local_addr,
        replay,
        shutdown: Some(shutdown),
        task,
    })
}

/// The one authenticator of this server: development identity without an `[auth]`
/// section, otherwise the credential chain (key files are read here, once; the client CA
/// bundle by `tls::server_config`).
fn authenticator(settings: &AuthSettings) -> Result<Arc<dyn Authenticator>, ServeError> {
    match settings {
        AuthSettings::Development => Ok(Arc::new(DevelopmentIdentity)),
        AuthSettings::Credentials {
            jwt,
            tokens,
            mtls,
            base_dir,
        } => {
            let jwt = jwt
                .as_deref()
                .map(|c| JwtAuthenticator::from_config(c, base_dir))
                .transpose()?;
            let tokens = tokens
                .as_ref()
                .map(StaticTokenAuthenticator::from_config)
                .transpose()?;
            let mtls = mtls
                .as_ref()
                .map(MtlsAuthenticator::from_config)
                .transpose()?;
            // Debug output names issuers, key counts and token names, never keys or hashes.
            tracing::debug!(?jwt, ?tokens, ?mtls, "credential authenticators loaded");
            Ok(Arc::new(CredentialChain::new(jwt, tokens, mtls)?))
        }
    }
}

/// An error and its causes on one line: tonic's own message ("transport error") does not
/// say what rustls refused.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reflection describes every service the server offers, so grpcurl and buf need no files.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Waits until nothing holds the ledger any more, i.e. its writer has flushed and the
/// data directory is closed.
async fn wait_for_release(ledger: Weak<Ledger>) -> Result<(), ServeError> {
    let started = tokio::time::Instant::now();
    while ledger.strong_count() > 0 {
        if started.elapsed() > RELEASE_TIMEOUT {
            return Err(ServeError::LedgerNotReleased(RELEASE_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn log_replay(config: &ServerConfig, replay: &ReplayReport) {
    tracing::info!(
        data_dir = %config.data_dir.display(),
        events = replay.events,
        actions = replay.actions,
        head_sequence = replay.verification.head_sequence,
        head_hash = %hex::encode(replay.verification.head_hash),
        "event log replayed"
    );
    if let Some(problem) = &replay.integrity_problem {
        tracing::error!(
            problem = %problem,
            first_bad_sequence = ?replay.verification.first_bad_sequence,
            "EVENT LOG FAILED VERIFICATION: countersign refuses new actions until an operator investigates"
        );
    }
}
