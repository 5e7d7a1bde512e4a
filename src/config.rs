//! Server settings: built-in defaults, overridden by a TOML file, overridden by flags and
//! `COUNTERSIGN_*` environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::auth::AuthSettings;
use crate::auth::rate_limit::RateSection;
use crate::auth::{JwtConfig, MtlsConfig, RateLimits, RolesConfig, TokenConfig};
use crate::listener::ConnectionSettings;
use crate::notify::config::{NotifySettings, SlackSection, TeamsSection, WebhookSection};
use crate::telemetry::LogFormat;
use crate::telemetry::export::ExportSettings;
pub use crate::tls::TlsSettings;
use crate::workflow::DecisionTimes;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_DATA_DIR: &str = "./data";
pub const DEFAULT_POLICIES: &str = "./policies";
/// `service.name` of exported telemetry unless configured (or `OTEL_SERVICE_NAME`).
pub const DEFAULT_SERVICE_NAME: &str = "countersign";
/// How often metrics are pushed over OTLP.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(60);
/// Largest request the server decodes. CheckAction's own field limits add up to well under
/// this; anything larger is RESOURCE_EXHAUSTED before it is parsed.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Concurrent HTTP/2 streams per connection; more wait in the client.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

/// The most settled records `limits.settled_in_memory` may keep in full: about 2.6 GB.
pub const MAX_SETTLED_IN_MEMORY: usize = 1_000_000;

/// The longest one AwaitDecision call waits; clients call again while not final.
pub const DEFAULT_MAX_AWAIT: Duration = Duration::from_secs(60);

/// How long a reviewer stream may leave its buffer full before it is closed.
pub const DEFAULT_REVIEWER_STALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything `serve` needs, fully resolved.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub policies: PathBuf,
    pub log_format: LogFormat,
    pub times: DecisionTimes,
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_await: Duration,
    pub reviewer_stall_timeout: Duration,
    /// The gRPC listener's connection cap, first-request and idle timeouts, keepalive.
    pub connections: ConnectionSettings,
    /// Settled action records kept in full in memory; older ones are read from the log.
    pub settled_in_memory: usize,
    /// Per-principal budgets of the calls that write (`[limits.rate]`).
    pub rate_limits: RateLimits,
    /// Events between checkpoints of the action state; 0: no checkpoints.
    pub checkpoint_every: u64,
    /// Verify the whole event log before serving rather than right after.
    pub verify_before_serving: bool,
    pub auth: AuthSettings,
    pub roles: RolesConfig,
    /// Where the event log is exported as spans (and metrics pushed); `None`: not at all.
    pub otlp: Option<ExportSettings>,
    /// Where `/metrics` and `/status` are served over HTTP; loopback only.
    pub metrics_listen: Option<SocketAddr>,
    /// `None`: plaintext HTTP/2, loopback only.
    pub tls: Option<TlsSettings>,
    /// Slack, Teams and webhooks; none by default.
    pub notify: NotifySettings,
}

impl ServerConfig {
    /// Defaults for a data and policy directory; what tests and embedders start from.
    pub fn new(data_dir: impl Into<PathBuf>, policies: impl Into<PathBuf>) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: data_dir.into(),
            policies: policies.into(),
            log_format: LogFormat::Text,
            times: DecisionTimes::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_await: DEFAULT_MAX_AWAIT,
            reviewer_stall_timeout: DEFAULT_REVIEWER_STALL_TIMEOUT,
            connections: ConnectionSettings::default(),
            settled_in_memory: crate::ledger::DEFAULT_SETTLED_IN_MEMORY,
            rate_limits: RateLimits::default(),
            checkpoint_every: crate::ledger::DEFAULT_CHECKPOINT_EVERY,
            verify_before_serving: false,
            auth: AuthSettings::Development,
            tls: None,
            roles: RolesConfig::default(),
            otlp: None,
            metrics_listen: None,
            notify: NotifySettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
    /// Settings that do not fit together once flags and file are combined.
    #[error("{field}: {problem}")]
    Incomplete {
        field: &'static str,
        problem: String,
    },
}

/// The config file's shape. Every field is optional; unknown fields are refused so a typo
/// never silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub policies: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub decisions: DecisionsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub event_log: EventLogSection,
    /// Absent: development identity (loopback only).
    pub auth: Option<AuthSection>,
    /// Absent: plaintext (loopback only).
    pub tls: Option<TlsSection>,
    /// Absent: the defaults of [`RolesConfig`].
    pub roles: Option<RolesConfig>,
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// Pending actions posted to Slack, and reviews from it.
    pub slack: Option<SlackSection>,
    /// Pending actions posted to a Teams incoming webhook.
    pub teams: Option<TeamsSection>,
    /// Signed JSON events for pending and resolved actions.
    #[serde(default)]
    pub webhooks: Vec<WebhookSection>,
}

/// `[event_log]`: checkpoints and start-up verification.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLogSection {
    /// Events between checkpoints of the action state (0: none).
    pub checkpoint_every_events: Option<u64>,
    /// Verify the whole chain before serving (start-up then reads the whole log).
    pub verify_before_serving: Option<bool>,
}

/// Checkpoints closer than this would rewrite the whole state for a handful of events.
pub const MIN_CHECKPOINT_EVERY: u64 = 1_000;

/// `[telemetry]`: OpenTelemetry export. The standard `OTEL_*` variables override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`. Absent: spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported telemetry (default `countersign`).
    pub service_name: Option<String>,
    /// How often metrics are pushed over OTLP (default `60s`; `OTEL_METRIC_EXPORT_INTERVAL`
    /// is not read).
    pub metrics_interval: Option<String>,
    /// Loopback address for `/metrics` (Prometheus) and `/status`, e.g. `127.0.0.1:9464`.
    pub metrics_listen: Option<SocketAddr>,
}

/// `[auth]`: the credential methods. Relative paths are relative to the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub jwt: Option<JwtConfig>,
    pub tokens: Option<TokenConfig>,
    pub mtls: Option<MtlsConfig>,
}

/// `[tls]`: the server's certificate chain and private key, PEM files relative to the
/// config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionsSection {
    /// How long an action may stay pending when its policy sets no `ttl` (e.g. `1h`).
    pub default_pending_ttl: Option<String>,
    /// How long an allowed or approved action may still be started (e.g. `15m`).
    pub approval_validity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_message_bytes: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    /// The longest one AwaitDecision call waits (e.g. `60s`).
    pub max_await: Option<String>,
    /// How long a reviewer stream's client may leave its buffer full (e.g. `3s`).
    pub reviewer_stall_timeout: Option<String>,
    /// Settled action records kept in full in memory (pending ones always are).
    pub settled_in_memory: Option<usize>,
    /// `[limits.rate]`: per-principal budgets of the calls that write.
    #[serde(default)]
    pub rate: RateSection,
    /// Connections the gRPC listener holds at once; more are refused at once.
    pub max_connections: Option<usize>,
    /// From accept to the first request's headers, TLS and HTTP/2 preface included (`10s`).
    pub first_request_timeout: Option<String>,
    /// A connection with no open stream this long is closed (`5m`).
    pub idle_timeout: Option<String>,
    /// HTTP/2 pings that find dead peers (`30s`), and how long an answer may take (`10s`).
    pub keepalive_interval: Option<String>,
    pub keepalive_timeout: Option<String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// Flag and environment values; `None` where the operator gave none.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub policies: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    /// `--tls-cert`: relative to the working directory.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`: relative to the working directory.
    pub tls_key: Option<PathBuf>,
    /// From `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
}

fn duration(path: &Path, field: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(value).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        field,
        problem: format!("`{value}` is not a duration like `30m` or `1h`: {e}"),
    })?;
    if parsed.is_zero() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            problem: "must be longer than zero".into(),
        });
    }
    Ok(parsed)
}

/// The directory relative paths in the config file are resolved against.
fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Resolves defaults ← file ← overrides.
pub fn resolve(
    file: Option<(&Path, ConfigFile)>,
    overrides: Overrides,
) -> Result<ServerConfig, ConfigError> {
    let mut config = ServerConfig::new(DEFAULT_DATA_DIR, DEFAULT_POLICIES);
    let mut tls_cert = None;
    let mut tls_key = None;
    // The config file naming [auth.mtls], for the error if TLS ends up missing.
    let mut mtls_in = None;
    if let Some((path, file)) = file {
        config.listen = file.listen.unwrap_or(config.listen);
        config.data_dir = file.data_dir.unwrap_or(config.data_dir);
        config.policies = file.policies.unwrap_or(config.policies);
        config.log_format = file.log_format.unwrap_or(config.log_format);
        if let Some(v) = &file.decisions.default_pending_ttl {
            config.times.default_pending_ttl = duration(path, "decisions.default_pending_ttl", v)?;
        }
        if let Some(v) = &file.decisions.approval_validity {
            config.times.approval_validity = duration(path, "decisions.approval_validity", v)?;
        }
        if let Some(v) = file.limits.max_message_bytes {
            if !(4096..=16 * 1024 * 1024).contains(&v) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "limits.max_message_bytes",
                    problem: "must be between 4096 and 16777216".into(),
                });
            }
            config.max_message_bytes = v;
        }
        if let Some(v) = &file.limits.reviewer_stall_timeout {
            config.reviewer_stall_timeout = duration(path, "limits.reviewer_stall_timeout", v)?;
        }
        if let Some(v) = &file.limits.max_await {
            config.max_await = duration(path, "limits.max_await", v)?;
        }
        if let Some(v) = file.limits.max_concurrent_streams {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "limits.max_concurrent_streams",
                    problem: "must be at least 1".into(),
                });
            }
            config.max_concurrent_streams = v;
        }
        if let Some(v) = file.limits.max_connections {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "limits.max_connections",
                    problem: "must be at least 1".into(),
                });
            }
            config.connections.max_connections = v;
        }
        if let Some(v) = &file.limits.first_request_timeout {
            config.connections.first_request_timeout =
                duration(path, "limits.first_request_timeout", v)?;
        }
        if let Some(v) = &file.limits.idle_timeout {
            config.connections.idle_timeout = duration(path, "limits.idle_timeout", v)?;
        }
        if let Some(v) = &file.limits.keepalive_interval {
            config.connections.keepalive_interval = duration(path, "limits.keepalive_interval", v)?;
        }
        if let Some(v) = &file.limits.keepalive_timeout {
            config.connections.keepalive_timeout = duration(path, "limits.keepalive_timeout", v)?;
        }
        if let Some(v) = file.limits.settled_in_memory {
            if v > MAX_SETTLED_IN_MEMORY {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "limits.settled_in_memory",
                    problem: format!("must be at most {MAX_SETTLED_IN_MEMORY} (about 2.6 KB each)"),
                });
            }
            config.settled_in_memory = v;
        }
        config.rate_limits =
            file.limits
                .rate
                .resolve()
                .map_err(|(field, problem)| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    problem,
                })?;
        if let Some(v) = file.event_log.checkpoint_every_events {
            if v != 0 && v < MIN_CHECKPOINT_EVERY {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "event_log.checkpoint_every_events",
                    problem: format!(
                        "must be 0 (no checkpoints) or at least {MIN_CHECKPOINT_EVERY}: each \
                         checkpoint rewrites the whole action state"
                    ),
                });
            }
            config.checkpoint_every = v;
        }
        if let Some(v) = file.event_log.verify_before_serving {
            config.verify_before_serving = v;
        }
        let telemetry = file.telemetry;
        if let Some(name) = &telemetry.service_name
            && name.trim().is_empty()
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                field: "telemetry.service_name",
                problem: "must not be empty".into(),
            });
        }
        let metrics_interval = match &telemetry.metrics_interval {
            Some(v) => duration(path, "telemetry.metrics_interval", v)?,
            None => DEFAULT_METRICS_INTERVAL,
        };
        config.metrics_listen = telemetry.metrics_listen;
        if let Some(endpoint) = telemetry.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
            config.otlp = Some(ExportSettings {
                endpoint: endpoint.trim().to_string(),
                service_name: telemetry
                    .service_name
                    .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string()),
                metrics_interval,
            });
        }
        if let Some(roles) = file.roles {
            roles.validate().map_err(|problem| ConfigError::Invalid {
                path: path.to_path_buf(),
                field: "roles",
                problem: problem.to_string(),
            })?;
            config.roles = roles;
        }
        if let Some(auth) = file.auth {
            if auth.jwt.is_none() && auth.tokens.is_none() && auth.mtls.is_none() {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "auth",
                    problem: "configure [auth.jwt], [auth.tokens] and/or [auth.mtls], or remove [auth] to use development identity (loopback only)".into(),
                });
            }
            if auth.mtls.is_some() {
                mtls_in = Some(path);
            }
            config.auth = AuthSettings::Credentials {
                jwt: auth.jwt.map(Box::new),
                tokens: auth.tokens,
                mtls: auth.mtls,
                base_dir: config_dir(path),
            };
        }
        config.notify = crate::notify::config::resolve(
            file.slack,
            file.teams,
            file.webhooks,
            &config_dir(path),
        )
        .map_err(|problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: "notifications",
            problem: problem.to_string(),
        })?;
        if let Some(tls) = file.tls {
            tls_cert = Some(config_dir(path).join(tls.cert));
            tls_key = Some(config_dir(path).join(tls.key));
        }
    }
    config.listen = overrides.listen.unwrap_or(config.listen);
    config.data_dir = overrides.data_dir.unwrap_or(config.data_dir);
    config.policies = overrides.policies.unwrap_or(config.policies);
    config.log_format = overrides.log_format.unwrap_or(config.log_format);
    config.tls = match (
        overrides.tls_cert.or(tls_cert),
        overrides.tls_key.or(tls_key),
    ) {
        (Some(cert), Some(key)) => Some(TlsSettings { cert, key }),
        (None, None) => None,
        (Some(_), None) => return Err(incomplete_tls("a certificate but no key")),
        (None, Some(_)) => return Err(incomplete_tls("a key but no certificate")),
    };
    if let Some(path) = mtls_in
        && config.tls.is_none()
    {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            field: "auth.mtls",
            problem: "client certificates are checked during the TLS handshake: configure [tls] cert and key (or --tls-cert and --tls-key)".into(),
        });
    }
    config.metrics_listen = overrides.metrics_listen.or(config.metrics_listen);
    if let Some(endpoint) = overrides.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
        let (service_name, metrics_interval) = config.otlp.take().map_or_else(
            || (DEFAULT_SERVICE_NAME.to_string(), DEFAULT_METRICS_INTERVAL),
            |o| (o.service_name, o.metrics_interval),
        );
        config.otlp = Some(ExportSettings {
            endpoint: endpoint.trim().to_string(),
            service_name,
            metrics_interval,
        });
    }
    Ok(config)
}

fn incomplete_tls(what: &str) -> ConfigError {
    ConfigError::Incomplete {
        field: "tls",
        problem: format!("{what}: give both ([tls] cert and key, or --tls-cert and --tls-key)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let file: ConfigFile = toml::from_str(
            r#"
            listen = "127.0.0.1:6000"
            data_dir = "/var/lib/countersign"
            [decisions]
            default_pending_ttl = "2h"
            "#,
        )
        .unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Default::default()
        };
        let config = resolve(Some((Path::new("c.toml"), file)), overrides).unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/countersign"));
        assert_eq!(config.policies, PathBuf::from(DEFAULT_POLICIES));
        assert_eq!(config.times.default_pending_ttl, Duration::from_secs(7200));
    }

    fn resolved(text: &str) -> Result<ServerConfig, ConfigError> {
        let file: ConfigFile = toml::from_str(text).unwrap();
        resolve(Some((Path::new("c.toml"), file)), Overrides::default())
    }

    #[test]
    fn checkpoints_are_at_least_a_thousand_events_apart_or_off() {
        let defaults = resolved("").unwrap();
        assert_eq!(
            defaults.checkpoint_every,
            crate::ledger::DEFAULT_CHECKPOINT_EVERY
        );
        assert!(!defaults.verify_before_serving);
        let off =
            resolved("[event_log]\ncheckpoint_every_events = 0\nverify_before_serving = true")
                .unwrap();
        assert_eq!(off.checkpoint_every, 0);
        assert!(off.verify_before_serving);
        let err = resolved("[event_log]\ncheckpoint_every_events = 999").unwrap_err();
        assert!(
            err.to_string()
                .contains("event_log.checkpoint_every_events"),
            "{err}"
        );
        assert!(toml::from_str::<ConfigFile>("[event_log]\ncheckpoints = 5").is_err());
    }

    #[test]
    fn write_budgets_default_on_and_are_set_or_turned_off_in_limits_rate() {
        assert_eq!(resolved("").unwrap().rate_limits, RateLimits::default());
        let set = resolved(
            "[limits.rate]\nreview_per_second = 5\nreview_burst = 10\ngate_per_second = 0",
        )
        .unwrap()
        .rate_limits;
        assert_eq!((set.review.per_second, set.review.burst), (5.0, 10));
        assert_eq!(set.gate.per_second, 0.0);
        assert_eq!(set.admin, RateLimits::default().admin);
        let err = resolved("[limits.rate]\nadmin_burst = 0").unwrap_err();
        assert!(err.to_string().contains("limits.rate.admin_burst"), "{err}");
        assert!(toml::from_str::<ConfigFile>("[limits.rate]\nreviews_per_second = 5").is_err());
    }

    #[test]
    fn settled_records_in_memory_are_bounded() {
        assert_eq!(
            resolved("").unwrap().settled_in_memory,
            crate::ledger::DEFAULT_SETTLED_IN_MEMORY
        );
        assert_eq!(
            resolved("[limits]\nsettled_in_memory = 0")
                .unwrap()
                .settled_in_memory,
            0
        );
        let err = resolved("[limits]\nsettled_in_memory = 1000001").unwrap_err();
        assert!(
            err.to_string().contains("limits.settled_in_memory"),
            "{err}"
        );
        assert!(toml::from_str::<ConfigFile>("[limits]\nsettled_in_memory = -1").is_err());
    }

    #[test]
    fn connection_limits_and_timeouts_are_read_from_limits() {
        assert_eq!(
            resolved("").unwrap().connections,
            ConnectionSettings::default()
        );
        let config = resolved(
            "[limits]\nmax_connections = 500\nfirst_request_timeout = \"2s\"\n\
             idle_timeout = \"1m\"\nkeepalive_interval = \"20s\"\nkeepalive_timeout = \"5s\"",
        )
        .unwrap();
        assert_eq!(
            config.connections,
            ConnectionSettings {
                max_connections: 500,
                first_request_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(60),
                keepalive_interval: Duration::from_secs(20),
                keepalive_timeout: Duration::from_secs(5),
            }
        );
        let err = resolved("[limits]\nmax_connections = 0").unwrap_err();
        assert!(err.to_string().contains("limits.max_connections"), "{err}");
        let err = resolved("[limits]\nidle_timeout = \"0s\"").unwrap_err();
        assert!(err.to_string().contains("limits.idle_timeout"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused() {
        assert!(toml::from_str::<ConfigFile>("listne = \"127.0.0.1:1\"").is_err());
        let file: ConfigFile = toml::from_str("[decisions]\napproval_validity = \"soon\"").unwrap();
        let err = resolve(Some((Path::new("c.toml"), file)), Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("decisions.approval_validity"),
            "{err}"
        );
    }

    #[test]
    fn without_an_auth_section_it_is_development_identity() {
        let file: ConfigFile = toml::from_str("listen = \"127.0.0.1:6000\"").unwrap();
        let config = resolve(Some((Path::new("c.toml"), file)), Overrides::default()).unwrap();
        assert_eq!(config.auth, AuthSettings::Development);
        let config = resolve(None, Overrides::default()).unwrap();
        assert_eq!(config.auth, AuthSettings::Development);
    }

    #[test]
    fn the_auth_section_parses_jwt_and_tokens_relative_to_the_config_file() {
        let file: ConfigFile = toml::from_str(
            r#"
            [auth.jwt]
            issuer = "https://idp.example.com"
            audience = "countersign"
            public_keys = [{ path = "keys/idp.pem", kid = "2026" }]
            acting_for_claim = "on_behalf_of"

            [[auth.tokens.tokens]]
            name = "ci"
            sha256 = "8e1f0bd7a1c1b5f2a9e7c3d4b6a8f0e2c4d6b8a0f2e4c6d8b0a2f4e6c8d0b2a4"
            principal = "pipeline"
            kind = "agent"
            groups = ["deployers"]
            "#,
        )
        .unwrap();
        let config = resolve(
            Some((Path::new("/etc/countersign/c.toml"), file)),
            Overrides::default(),
        )
        .unwrap();
        let AuthSettings::Credentials {
            jwt,
            tokens,
            base_dir,
            ..
        } = &config.auth
        else {
            panic!("expected credentials, got {:?}", config.auth);
        };
        assert_eq!(base_dir, Path::new("/etc/countersign"));
        let jwt = jwt.as_ref().unwrap();
        assert_eq!(jwt.issuer, "https://idp.example.com");
        assert_eq!(jwt.public_keys[0].path, PathBuf::from("keys/idp.pem"));
        assert_eq!(jwt.public_keys[0].kid.as_deref(), Some("2026"));
        assert_eq!(jwt.id_claim, "sub");
        assert_eq!(jwt.acting_for_claim.as_deref(), Some("on_behalf_of"));
        let tokens = tokens.as_ref().unwrap();
        assert_eq!(tokens.tokens[0].principal, "pipeline");
        assert_eq!(config.auth.methods(), vec!["jwt", "tokens"]);
        // A bare file name is relative to the current directory.
        assert_eq!(config_dir(Path::new("c.toml")), PathBuf::from("."));
    }

    #[test]
    fn unknown_auth_keys_and_an_empty_auth_section_are_refused() {
        for text in [
            "[auth]\nmtls = true",
            "[auth.mtls]\nclient_ca = \"ca.pem\"\nidentity = []",
            "[tls]\ncert = \"c.pem\"",
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"",
            "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\naudiance = \"a\"",
            "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\npublic_keys = [{ path = \"k.pem\", kind = \"x\" }]",
            "[[auth.tokens.tokens]]\nsha256 = \"00\"\nprincipal = \"p\"\nkind = \"agent\"\ntoken = \"secret\"",
            "[[auth.tokens.tokens]]\nsha256 = \"00\"\nprincipal = \"p\"\nkind = \"admin\"",
        ] {
            let err = toml::from_str::<ConfigFile>(text).unwrap_err();
            assert!(!err.to_string().is_empty(), "{text}");
        }
        let file: ConfigFile = toml::from_str("[auth]").unwrap();
        let err = resolve(Some((Path::new("c.toml"), file)), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("auth:"), "{err}");
        assert!(err.to_string().contains("[auth.jwt]"), "{err}");
    }

    #[test]
    fn tls_paths_in_the_file_are_relative_to_it_and_flags_replace_them() {
        let file = || -> ConfigFile {
            toml::from_str("[tls]\ncert = \"tls/server.pem\"\nkey = \"/keys/server-key.pem\"")
                .unwrap()
        };
        let path = Path::new("/etc/countersign/c.toml");
        let config = resolve(Some((path, file())), Overrides::default()).unwrap();
        assert_eq!(
            config.tls,
            Some(TlsSettings {
                cert: PathBuf::from("/etc/countersign/tls/server.pem"),
                key: PathBuf::from("/keys/server-key.pem"),
            })
        );
        let overrides = Overrides {
            tls_cert: Some("renewed.pem".into()),
            ..Default::default()
        };
        let tls = resolve(Some((path, file())), overrides)
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(tls.cert, PathBuf::from("renewed.pem"));
        assert_eq!(tls.key, PathBuf::from("/keys/server-key.pem"));
        assert_eq!(resolve(None, Overrides::default()).unwrap().tls, None);
    }

    #[test]
    fn a_certificate_without_a_key_is_refused() {
        for overrides in [
            Overrides {
                tls_cert: Some("server.pem".into()),
                ..Default::default()
            },
            Overrides {
                tls_key: Some("server-key.pem".into()),
                ..Default::default()
            },
        ] {
            let err = resolve(None, overrides).unwrap_err().to_string();
            assert!(err.starts_with("tls: a "), "{err}");
            assert!(err.contains("--tls-cert and --tls-key"), "{err}");
        }
    }

    #[test]
    fn client_certificates_need_tls() {
        let text = r#"
            [auth.mtls]
            client_ca = "ca.pem"
            [[auth.mtls.identities]]
            san = "spiffe://example.org/agent/deployer"
            principal = "deployer"
            kind = "agent"
            "#;
        let path = Path::new("/etc/countersign/c.toml");
        let file: ConfigFile = toml::from_str(text).unwrap();
        let err = resolve(Some((path, file)), Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("auth.mtls: client certificates"),
            "{err}"
        );
        assert!(err.to_string().contains("[tls]"), "{err}");

        let file: ConfigFile = toml::from_str(text).unwrap();
        let overrides = Overrides {
            tls_cert: Some("server.pem".into()),
            tls_key: Some("server-key.pem".into()),
            ..Default::default()
        };
        let config = resolve(Some((path, file)), overrides).unwrap();
        assert_eq!(config.auth.methods(), vec!["mtls"]);
        let AuthSettings::Credentials { mtls, base_dir, .. } = &config.auth else {
            panic!("expected credentials, got {:?}", config.auth);
        };
        assert_eq!(mtls.as_ref().unwrap().client_ca, PathBuf::from("ca.pem"));
        assert_eq!(base_dir, Path::new("/etc/countersign"));
    }

    #[test]
    fn roles_are_read_and_bad_group_names_refused() {
        let file: ConfigFile =
            toml::from_str("[roles]\nreviewers = [\"sre\"]\nauditors = [\"soc2\"]").unwrap();
        let config = resolve(Some((Path::new("c.toml"), file)), Overrides::default()).unwrap();
        assert_eq!(config.roles.reviewers, vec!["sre"]);
        assert_eq!(config.roles.auditors, vec!["soc2"]);
        // Unset keys keep their defaults.
        assert_eq!(config.roles.admins, vec!["admins"]);
        let file: ConfigFile = toml::from_str("[roles]\nadmins = [\"on call\"]").unwrap();
        let err = resolve(Some((Path::new("c.toml"), file)), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("roles.admins"), "{err}");
        assert!(toml::from_str::<ConfigFile>("[roles]\nauditor = [\"x\"]").is_err());
    }

    #[test]
    fn the_example_notification_blocks_parse_once_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("countersign.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("# [slack]").unwrap();
        let end = start + text[start..].find("\n\n").unwrap();
        let block: String = text[start..end]
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .unwrap_or(line.trim_start_matches('#'))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file: ConfigFile = toml::from_str(&block).unwrap();
        let config = resolve(Some((&path, file)), Overrides::default()).unwrap();
        let slack = config.notify.slack.expect("slack");
        assert_eq!(slack.users[0].principal, "bob");
        assert_eq!(slack.routes[0].channel, "C0123SECURITY");
        assert!(slack.signing_secret.is_some());
        assert!(config.notify.teams.is_some());
        assert_eq!(config.notify.webhooks[0].name, "siem");
        // And the example as shipped has no channel configured.
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let config = resolve(Some((&path, file)), Overrides::default()).unwrap();
        assert!(config.notify.is_empty());
    }

    #[test]
    fn the_example_config_parses_with_and_without_its_tls_and_auth_sections_commented_out() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("countersign.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let config = resolve(Some((&path, file)), Overrides::default()).unwrap();
        assert_eq!(config.auth, AuthSettings::Development);
        assert_eq!(config.tls, None);
        assert_eq!(config.roles, RolesConfig::default());

        // Uncomment the [tls] block (up to the blank line after it) and the [auth] block
        // (to the end) one level: "# x" becomes "x", "# # x" stays a comment.
        let uncomment = |block: &str| -> String {
            block
                .lines()
                .map(|line| {
                    line.strip_prefix("# ")
                        .unwrap_or(line.trim_start_matches('#'))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let tls = text.find("# [tls]").unwrap();
        let tls_end = tls + text[tls..].find("\n\n").unwrap();
        let auth = text.find("# [auth.jwt]").unwrap();
        assert!(tls_end < auth);
        let text = format!(
            "{}{}{}{}\n",
            &text[..tls],
            uncomment(&text[tls..tls_end]),
            &text[tls_end..auth],
            uncomment(&text[auth..])
        );
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let config = resolve(Some((&path, file)), Overrides::default()).unwrap();
        assert_eq!(config.auth.methods(), vec!["jwt", "tokens", "mtls"]);
        let tls = config.tls.expect("tls");
        assert_eq!(
            tls.cert,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/server.pem")
        );
        let AuthSettings::Credentials {
            mtls: Some(mtls), ..
        } = &config.auth
        else {
            panic!("mtls expected: {:?}", config.auth);
        };
        let authenticator = crate::auth::MtlsAuthenticator::from_config(mtls);
        assert!(authenticator.is_ok(), "{authenticator:?}");
    }

    #[test]
    fn the_printed_config_loads_and_every_file_passes_the_server_checks() {
        let dir = tempfile::tempdir().unwrap();
        let trial = dir.path().join("trial \"certs\"");
        let written = crate::tls::trial::write(&crate::tls::trial::tests::options(&trial)).unwrap();
        assert_eq!(written.files.len(), 8);

        let config_path = dir.path().join("countersign.toml");
        let file: ConfigFile = toml::from_str(&written.config).unwrap();
        let config = resolve(Some((&config_path, file)), Overrides::default()).unwrap();
        assert_eq!(config.auth.methods(), vec!["mtls"]);
        let tls = config.tls.clone().unwrap();
        let ca = crate::tls::client_ca(&config.auth).unwrap();
        assert!(ca.required);
        crate::tls::server_config(&tls.cert, &tls.key, Some(&ca)).unwrap();
        let AuthSettings::Credentials {
            mtls: Some(mtls), ..
        } = &config.auth
        else {
            panic!("mtls expected: {:?}", config.auth);
        };
        crate::auth::MtlsAuthenticator::from_config(mtls).unwrap();

        // The agent's certificate maps to the agent, and its key belongs to it.
        let agent_pem = std::fs::read(trial.join("deployer.pem")).unwrap();
        let chain = crate::tls::certificates("agent", &trial, &agent_pem).unwrap();
        let key_pem = std::fs::read(trial.join("deployer-key.pem")).unwrap();
        crate::tls::check_key_pair(("c", &trial), ("k", &trial), chain.clone(), &key_pem).unwrap();
        let principal = crate::auth::MtlsAuthenticator::from_config(mtls)
            .unwrap()
            .verify(Some(&chain))
            .unwrap();
        assert_eq!(principal.id, "deployer");
        assert_eq!(
            principal.authenticated_by,
            "mtls:spiffe://example.org/agent/deployer"
        );
    }
}
