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
use tonic::transport::{Server, ServerTlsConfig};
use tower::Layer as _;

use crate::api::{ActionGateApi, AuditApi, Core, CurrentPolicies, PolicyApi, ReviewApi};
use crate::auth::AuthSettings;
use crate::auth::{
    AuthConfigError, Authenticator, CredentialChain, DevelopmentIdentity, GuardLayer,
    JwtAuthenticator, MtlsAuthenticator, RateLimiter, Roles, StaticTokenAuthenticator,
    start_denial_recorder,
};
use crate::config::ServerConfig;
use crate::error_chain;
use crate::ledger::follower::Progress;
use crate::ledger::{ChainCheck, Ledger, LedgerError, LedgerOptions, ReplayReport};
use crate::policy::{PolicyError, PolicySet};
use crate::proto;
use crate::proto::action_gate_server::ActionGateServer;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::policy_service_server::PolicyServiceServer;
use crate::proto::review_service_server::ReviewServiceServer;
use crate::store::EventLog;
use crate::telemetry::http::StatusFn;
use crate::telemetry::metrics::{Metrics, Sources};
use crate::tls::{self, ClientCertificates, TlsError};

/// How long `stop` waits for the last holders of the ledger (in-flight calls) to let go,
/// and for the ledger to save its last checkpoint and close the log.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// A start-up step run off the async workers (loading policies, opening the ledger)
    /// or the serving task itself did not finish: it panicked or was cancelled.
    #[error("start-up was interrupted: {0}")]
    Interrupted(tokio::task::JoinError),
    /// The serving task panicked or was cancelled while being waited for.
    #[error("start-up was interrupted: the serving task failed: {0}")]
    ServingTask(tokio::task::JoinError),
    /// The reflection service could not be built from the embedded descriptor sets.
    #[error("start-up was interrupted: reflection: {0}")]
    Reflection(tonic_reflection::server::Error),
    /// The process could not install its signal handlers.
    #[error("start-up was interrupted: cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error("telemetry: {0}")]
    Telemetry(#[from] crate::telemetry::export::ExportError),
    #[error(
        "refusing to serve metrics on {0}: /metrics and /status are unauthenticated, so they listen on a loopback address only (127.0.0.1 or [::1]); push metrics with OTLP, or scrape through a local agent"
    )]
    InsecureMetricsListen(SocketAddr),
    #[error("notifications: {0}")]
    Notify(#[from] crate::notify::NotifyError),
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
    metrics_addr: Option<SocketAddr>,
    slack_interactivity_addr: Option<SocketAddr>,
    replay: ReplayReport,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` and `/status` are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where Slack's interactivity requests are served, if they are.
    pub fn slack_interactivity_addr(&self) -> Option<SocketAddr> {
        self.slack_interactivity_addr
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
            Err(e) => Err(ServeError::ServingTask(e)),
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
                return result.unwrap_or_else(|e| Err(ServeError::Interrupted(e)));
            }
            () = signal => {}
        }
        if let Some(shutdown) = shutdown {
            let _ = shutdown.send(());
        }
        self.wait().await
    }
}

/// Checks the settings (before the disk: [`prepare_edge`]), loads the policies, opens the
/// ledger, starts every component, and returns once the gRPC listener accepts calls.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServeError> {
    check_listen(&config)?;
    // Before the event log opens its files; logged once the server is serving.
    let open_files = crate::listener::raise_open_file_limit();
    let Edge {
        authenticator,
        notify,
        tls,
        roles,
    } = prepare_edge(&config)?;
    let policies = load_policies(&config).await?;
    let (ledger, replay) = open_ledger(&config).await?;
    log_replay(&config, &replay);
    log_security(&config, tls.as_ref());
    let (listener, local_addr) = bind(config.listen).await?;

    let ledger = Arc::new(ledger);
    // Ends by itself when the ledger is dropped.
    ledger.start_expiry_timer();
    let ledger_released: Weak<EventLog> = Arc::downgrade(ledger.log());
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let core = Arc::new(Core {
        ledger,
        policies: Arc::new(CurrentPolicies::new(config.policies.clone(), policies)),
        times: config.times,
        max_await: config.max_await,
        reviewer_stall_timeout: config.reviewer_stall_timeout,
        stopping,
        reviewer_streams: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    });

    let (health, health_service) = start_health(&core).await;

    let reflection_v1 = reflection().build_v1().map_err(ServeError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    // Refusals are recorded by a task of their own, which holds the ledger until the last
    // guard is dropped with the router, so a graceful stop records the final summaries.
    let (denials, _recorder) = start_denial_recorder(core.ledger.clone());
    let connection_stats = crate::listener::ConnectionStats::default();
    let notify = notify
        .start(
            &core.ledger,
            roles.clone(),
            denials.clone(),
            core.stopping.clone(),
            &connection_stats,
        )
        .await?;
    let telemetry = start_telemetry(&config, &core, &notify, &connection_stats).await?;
    let metrics_addr = telemetry.metrics_addr;
    let limiter = RateLimiter::new(
        config.rate_limits,
        Some(telemetry.metrics.clone() as Arc<dyn crate::auth::LimitObserver>),
    );
    let guard = GuardLayer::new(authenticator, roles, denials).with_rate_limiter(Arc::new(limiter));
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
    let connections = crate::listener::Connections::default();
    let limits = config.connections;
    let router = builder
        .layer(crate::listener::StreamsLayer::new(connections.clone()))
        .layer(crate::api::too_large::layer(max))
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(guard.layer(action_gate))
        .add_service(guard.layer(review))
        .add_service(guard.layer(audit))
        .add_service(guard.layer(policy));

    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    let incoming = grpc_incoming(GrpcListener {
        config: &config,
        listener,
        local_addr,
        connections,
        connection_stats,
        interactivity: notify.interactivity_addr.is_some(),
        open_files,
    });
    let task = tokio::spawn(async move {
        let served = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_signal.await;
                // Long waits and streams end now, so the graceful drain below finishes.
                stopping_tx.send_replace(true);
            })
            .await;
        drop(health);
        if let Some(provider) = telemetry.meter_provider {
            // Pushes the last metrics; off the async workers, as the SDK blocks.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
        wait_for_release(ledger_released).await?;
        tracing::info!("countersign stopped; event log flushed");
        served.map_err(ServeError::from)
    });

    Ok(RunningServer {
        local_addr,
        metrics_addr,
        slack_interactivity_addr: notify.interactivity_addr,
        replay,
        shutdown: Some(shutdown),
        task,
    })
}

/// What start-up checks before it touches the disk: every file and secret a setting names,
/// since a bad key file is the likeliest start-up error.
struct Edge {
    authenticator: Arc<dyn Authenticator>,
    /// The notification channels, secrets read, not started yet.
    notify: crate::notify::Prepared,
    /// `None`: plaintext HTTP/2 (loopback only, see [`check_listen`]).
    tls: Option<(ServerTlsConfig, ClientCertificates)>,
    roles: Arc<Roles>,
}

/// Builds what authenticates, authorizes and encrypts calls, and prepares the notification
/// channels; nothing here touches the data directory.
fn prepare_edge(config: &ServerConfig) -> Result<Edge, ServeError> {
    // Before anything else touches the disk: a bad key file is the likeliest start-up error.
    let authenticator = authenticator(&config.auth)?;
    // Secrets and the interactivity listener are checked here too, before the disk.
    let notify = crate::notify::prepare(&config.notify, config.tls.as_ref())?;
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
    let roles = Arc::new(
        Roles::new(config.roles.clone())
            .map_err(|problem| ServeError::Auth(AuthConfigError::Invalid(problem.to_string())))?,
    );
    Ok(Edge {
        authenticator,
        notify,
        tls,
        roles,
    })
}

/// Loads and compiles the policy set.
async fn load_policies(config: &ServerConfig) -> Result<PolicySet, ServeError> {
    // Loading compiles every rule on a thread of its own; keep it off the async workers.
    let policy_dir = config.policies.clone();
    let policies = tokio::task::spawn_blocking(move || PolicySet::load_dir(&policy_dir))
        .await
        .map_err(ServeError::Interrupted)??;
    tracing::info!(
        directory = %config.policies.display(),
        version = %policies.version(),
        rules = policies.rule_count(),
        "policies loaded"
    );
    Ok(policies)
}

/// Opens the event log and replays it into the ledger's state, on tokio's blocking pool.
async fn open_ledger(config: &ServerConfig) -> Result<(Ledger, ReplayReport), ServeError> {
    let data_dir = config.data_dir.clone();
    let options = LedgerOptions {
        times: config.times,
        settled_in_memory: config.settled_in_memory,
        checkpoint_every: config.checkpoint_every,
        verify_before_serving: config.verify_before_serving,
    };
    let opened = tokio::task::spawn_blocking(move || Ledger::open(&data_dir, options))
        .await
        .map_err(ServeError::Interrupted)??;
    Ok(opened)
}

/// Says how callers are authenticated and whether TLS is on.
fn log_security(config: &ServerConfig, tls: Option<&(ServerTlsConfig, ClientCertificates)>) {
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
    match (&config.tls, tls) {
        (Some(settings), Some((_, client_certificates))) => tracing::info!(
            cert = %settings.cert.display(),
            client_certificates = client_certificates.as_str(),
            "TLS on"
        ),
        _ => tracing::info!("TLS off: plaintext HTTP/2 on a loopback address"),
    }
}

/// Binds the gRPC listener; with port 0 the address says which port it got.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok((listener, local_addr))
}

/// Every countersign service reported serving; the gate reported not serving, for good,
/// once the ledger refuses writes.
async fn start_health(
    core: &Core,
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
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
    (health, health_service)
}

/// What the gRPC accept loop is built from.
struct GrpcListener<'a> {
    config: &'a ServerConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// Shared with the router's `StreamsLayer`, which counts each connection's streams.
    connections: crate::listener::Connections,
    connection_stats: crate::listener::ConnectionStats,
    /// Whether the Slack interactivity listener runs (its connections count against the
    /// open-file limit too).
    interactivity: bool,
    open_files: crate::listener::OpenFileLimit,
}

/// The connections the gRPC server is handed, and the "serving" log line.
///
/// Our own accept loop (crate::listener): the connection cap, backoff when out of file
/// descriptors, and connections closed when they bring no request or stay idle; tonic's
/// accept loop has none of these and spins at the descriptor limit. tonic runs the TLS
/// handshake on every connection this stream yields (`tls_config` applies to custom
/// incoming streams too; tests/tls.rs checks that a plaintext client gets nowhere).
fn grpc_incoming(
    grpc: GrpcListener<'_>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::listener::Conn>> {
    let GrpcListener {
        config,
        listener,
        local_addr,
        connections,
        connection_stats,
        interactivity,
        open_files,
    } = grpc;
    let limits = config.connections;
    let http_listeners = [config.metrics_listen.is_some(), interactivity]
        .into_iter()
        .filter(|on| *on)
        .count()
        * crate::listener::HTTP_LISTENER_CONNECTIONS;
    open_files.log();
    let cap = crate::listener::connection_cap(limits.max_connections, http_listeners);
    let acceptor = crate::listener::Acceptor::new(
        crate::listener::stats::GRPC,
        listener,
        cap,
        connection_stats,
    );
    let incoming = crate::listener::grpc_incoming(
        acceptor,
        connections,
        crate::listener::Timeouts {
            first_request: limits.first_request_timeout,
            idle: limits.idle_timeout,
        },
    );
    tracing::info!(
        address = %local_addr,
        max_connections = cap,
        first_request_timeout = %humantime::format_duration(limits.first_request_timeout),
        idle_timeout = %humantime::format_duration(limits.idle_timeout),
        "countersign is serving"
    );
    incoming
}

/// What the telemetry of a running server holds on to.
struct Telemetry {
    /// Flushed and shut down when the server stops, so the last metrics are pushed.
    meter_provider: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
    metrics_addr: Option<SocketAddr>,
    /// Also told of calls refused for their rate budget.
    metrics: Arc<Metrics>,
}

/// Metrics (Prometheus on `metrics_listen`, OTLP when configured) and the span exporter.
/// Every task started here ends when the server stops and holds the ledger at most weakly,
/// except the span exporter, which lets go when stopping.
async fn start_telemetry(
    config: &ServerConfig,
    core: &Arc<Core>,
    notify: &crate::notify::Started,
    connections: &crate::listener::ConnectionStats,
) -> Result<Telemetry, ServeError> {
    if let Some(addr) = config.metrics_listen
        && !addr.ip().is_loopback()
    {
        return Err(ServeError::InsecureMetricsListen(addr));
    }
    let export = match &config.otlp {
        Some(otlp) => Some(
            crate::telemetry::export::start(core.ledger.clone(), otlp, core.stopping.clone())?.0,
        ),
        None => None,
    };
    let meter_provider = config
        .otlp
        .as_ref()
        .map(crate::telemetry::export::meter_provider)
        .transpose()?;
    let meter = meter_provider
        .as_ref()
        .map(|p| opentelemetry::metrics::MeterProvider::meter(p, "countersign"));
    let sources = Sources::new(
        &core.ledger,
        core.reviewer_streams.clone(),
        export.clone(),
        connections.clone(),
    );
    let metrics = Metrics::new(sources, meter.as_ref());
    core.ledger.set_observer(metrics.clone());

    let metrics_addr = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            let ledger = Arc::downgrade(&core.ledger);
            let policies = core.policies.clone();
            let sampled = metrics.clone();
            let serving = metrics.clone();
            let exporting = export.clone();
            let notifying = notify.progress.clone();
            let status: StatusFn = Arc::new(move || {
                status_document(
                    &ledger,
                    &policies,
                    &sampled,
                    exporting.as_deref(),
                    &notifying,
                )
            });
            let listener = crate::listener::Acceptor::new(
                crate::listener::stats::METRICS,
                listener,
                crate::listener::HTTP_LISTENER_CONNECTIONS,
                connections.clone(),
            );
            tokio::spawn(crate::telemetry::http::serve(
                listener,
                serving,
                status,
                core.stopping.clone(),
            ));
            tracing::info!(address = %bound, "serving /metrics and /status");
            Some(bound)
        }
    };
    Ok(Telemetry {
        meter_provider,
        metrics_addr,
        metrics,
    })
}

/// `/status`: what an operator checks first.
fn status_document(
    ledger: &Weak<Ledger>,
    policies: &CurrentPolicies,
    metrics: &Metrics,
    export: Option<&Progress>,
    notify: &[(String, Arc<Progress>)],
) -> serde_json::Value {
    let Some(ledger) = ledger.upgrade() else {
        return serde_json::json!({ "serving": false, "stopping": true });
    };
    let sample = metrics.sample();
    let refusal = ledger.write_refusal().map(|e| e.to_string());
    let (known, in_memory) = {
        let actions = ledger.actions();
        (actions.len(), actions.hot_count())
    };
    let verification = match ledger.chain_check() {
        ChainCheck::Running => serde_json::json!({ "state": "running" }),
        ChainCheck::Passed { events } => serde_json::json!({ "state": "passed", "events": events }),
        ChainCheck::Failed { problem } => {
            serde_json::json!({ "state": "failed", "problem": problem })
        }
    };
    serde_json::json!({
        "serving": refusal.is_none(),
        "write_refusal": refusal,
        "log": {
            "head_sequence": ledger.log().last_sequence(),
            "applied_sequence": ledger.actions().applied_sequence(),
            // Of the whole chain since start-up (after it, when started from a checkpoint).
            "verification": verification,
        },
        "policy_version": policies.get().version(),
        "actions": {
            "known": known,
            // The rest are settled and read back from the log when asked for.
            "records_in_memory": in_memory,
        },
        "pending_actions": sample.pending_actions,
        "await_waiters": sample.await_waiters,
        "reviewer_streams": sample.reviewer_streams,
        "span_export": export.map(|export| serde_json::json!({
            "exported_through": export.through(),
            "lag_events": sample.export_lag_events,
            "lag_seconds": sample.export_lag_seconds,
            "consecutive_failures": export.consecutive_failures(),
            "last_error": export.last_error(),
        })),
        "notifications": notify.iter().map(|(channel, progress)| (channel.clone(), serde_json::json!({
            "delivered_through": progress.through(),
            "lag_events": ledger.actions().applied_sequence().saturating_sub(progress.through()),
            "consecutive_failures": progress.consecutive_failures(),
            "last_error": progress.last_error(),
        }))).collect::<serde_json::Map<_, _>>(),
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

/// Reflection describes every service the server offers, so grpcurl and buf need no files.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Waits until the event log is closed: the ledger was dropped, its last checkpoint saved
/// and its writer flushed, so the data directory can be opened again.
async fn wait_for_release(log: Weak<EventLog>) -> Result<(), ServeError> {
    let started = tokio::time::Instant::now();
    while log.strong_count() > 0 {
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
        events_replayed = replay.events_replayed,
        from_checkpoint = ?replay.from_checkpoint,
        actions = replay.actions,
        records_in_memory = replay.records_in_memory,
        head_sequence = replay.verification.head_sequence,
        head_hash = %hex::encode(replay.verification.head_hash),
        open_ms = replay.open_took.as_millis() as u64,
        verify_and_replay_ms = replay.replay_took.as_millis() as u64,
        "event log replayed"
    );
    if replay.from_checkpoint.is_some() && !config.verify_before_serving {
        tracing::info!(
            "the events before the checkpoint are being verified; writes are refused if they fail"
        );
    }
    if let Some(problem) = &replay.integrity_problem {
        tracing::error!(
            problem = %problem,
            first_bad_sequence = ?replay.verification.first_bad_sequence,
            "EVENT LOG FAILED VERIFICATION: countersign refuses new actions until an operator investigates"
        );
    }
}
