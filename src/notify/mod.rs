//! Notifications: pending and resolved actions sent to Slack, Microsoft Teams and signed
//! webhooks, and reviews coming back from Slack.
//!
//! Outbound, every channel is a reader of the event log with its own durable cursor
//! ([`delivery`], a [follower](crate::ledger::follower) like the span exporter): a channel
//! that is down never blocks a decision and loses nothing. What is sent is built by pure
//! functions ([`message`]).
//! Inbound, Slack's interactivity requests ([`interactivity`]) are authenticated by
//! Slack's signature ([`signature`]), mapped to a principal by configuration, and applied
//! through the same workflow rules as the gRPC API.
//!
//! | File | What it is |
//! |---|---|
//! | `config.rs` | `[slack]`, `[teams]`, `[[webhooks]]`; secrets from files or env, never printed |
//! | `event.rs` | which log events are notifications (pure) |
//! | `delivery.rs` | each channel as a follower of the log: batch size, backoff, what a notification is |
//! | `message.rs` | Slack Block Kit, Teams Adaptive Card, webhook JSON (pure) |
//! | `signature.rs` | HMAC-SHA256: webhook signatures, Slack `v0` verification |
//! | `slack.rs` | Slack Web API client, routing, the Slack channel |
//! | `teams.rs` | the Teams channel |
//! | `webhook.rs` | the generic webhook channel |
//! | `interactivity.rs` | the HTTPS endpoint for Slack's button clicks and modal |

pub mod config;
pub mod delivery;
pub mod event;
pub mod interactivity;
pub mod message;
pub mod signature;
pub mod slack;
pub mod teams;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{DenialReporter, Roles};
use crate::ledger::Ledger;
use crate::ledger::follower::Progress;
use crate::tls::TlsError;
use crate::tls::TlsSettings;
use config::{NotifySettings, Secret, SecretError, SlackSettings};

/// One outbound request (connect, send, answer) must be done within this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{0}")]
    Secret(#[from] SecretError),
    #[error(
        "refusing to listen for Slack interactivity on {0}: without TLS, votes and Slack's signatures would cross the network in the clear; configure [tls] (cert and key), or listen on a loopback address (127.0.0.1 or [::1]) behind a TLS-terminating proxy"
    )]
    InsecureListen(SocketAddr),
    #[error("the notification HTTP client cannot be built: {0}")]
    Client(String),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen for Slack interactivity on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("a notification cursor cannot be read: {0}")]
    Cursor(#[from] crate::store::StoreError),
}

/// Slack, with its secrets read.
struct ReadySlack {
    settings: SlackSettings,
    api: Arc<slack::SlackApi>,
    signing_secret: Option<Secret>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Channels checked and their secrets read, before the server touches the disk: a
/// missing secret is a start-up error naming where it was looked for.
pub struct Prepared {
    slack: Option<ReadySlack>,
    teams: Option<teams::Teams>,
    webhooks: Vec<webhook::Webhook>,
}

/// What the running channels report.
#[derive(Default)]
pub struct Started {
    /// Where Slack's interactivity requests are served, if they are.
    pub interactivity_addr: Option<SocketAddr>,
    /// Each channel's progress, by cursor name.
    pub progress: Vec<(String, Arc<Progress>)>,
}

/// Checks the settings and reads every secret; nothing is started yet.
pub fn prepare(
    settings: &NotifySettings,
    tls: Option<&TlsSettings>,
) -> Result<Prepared, NotifyError> {
    if let Some(addr) = settings.slack.as_ref().and_then(|s| s.interactivity_listen)
        && !addr.ip().is_loopback()
        && tls.is_none()
    {
        return Err(NotifyError::InsecureListen(addr));
    }
    if settings.is_empty() {
        return Ok(Prepared {
            slack: None,
            teams: None,
            webhooks: Vec::new(),
        });
    }
    let http = http_client()?;
    let slack = match &settings.slack {
        None => None,
        Some(s) => {
            let token = s.bot_token.load("slack.bot_token")?;
            let signing_secret = s
                .signing_secret
                .as_ref()
                .map(|source| source.load("slack.signing_secret"))
                .transpose()?;
            let tls = match (s.interactivity_listen, tls) {
                (Some(_), Some(tls)) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::https_server_config(&tls.cert, &tls.key)?,
                )),
                _ => None,
            };
            Some(ReadySlack {
                api: Arc::new(slack::SlackApi::new(
                    s.api_base.clone(),
                    token,
                    http.clone(),
                )),
                settings: s.clone(),
                signing_secret,
                tls,
            })
        }
    };
    let teams = settings
        .teams
        .as_ref()
        .map(|t| -> Result<teams::Teams, NotifyError> {
            Ok(teams::Teams::new(
                t.webhook_url.load("teams.webhook_url")?,
                t.review_url_template.clone(),
                http.clone(),
            ))
        })
        .transpose()?;
    let webhooks = settings
        .webhooks
        .iter()
        .map(|w| -> Result<webhook::Webhook, NotifyError> {
            Ok(webhook::Webhook::new(
                &w.name,
                w.url.clone(),
                w.secret.load("webhooks.secret")?,
                http.clone(),
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        slack,
        teams,
        webhooks,
    })
}

impl Prepared {
    /// Starts a delivery task per channel and the interactivity listener. Every task ends
    /// when `stopping` becomes true and lets go of the ledger.
    pub async fn start(
        self,
        ledger: &Arc<Ledger>,
        roles: Arc<Roles>,
        denials: DenialReporter,
        stopping: watch::Receiver<bool>,
        connections: &crate::listener::ConnectionStats,
    ) -> Result<Started, NotifyError> {
        let mut started = Started::default();
        if let Some(slack) = self.slack {
            let settings = slack.settings;
            if let (Some(addr), Some(secret)) =
                (settings.interactivity_listen, slack.signing_secret)
            {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| NotifyError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| NotifyError::Bind { addr, source })?;
                let handler = Arc::new(interactivity::Interactivity::new(
                    secret,
                    slack.api.clone(),
                    ledger,
                    settings.users.clone(),
                    settings.team_id.clone(),
                    roles,
                    denials,
                ));
                tracing::info!(address = %bound, tls = slack.tls.is_some(), path = interactivity::PATH, "serving Slack interactivity");
                let listener = crate::listener::Acceptor::new(
                    crate::listener::stats::SLACK,
                    listener,
                    crate::listener::HTTP_LISTENER_CONNECTIONS,
                    connections.clone(),
                );
                tokio::spawn(interactivity::serve(
                    listener,
                    slack.tls,
                    handler,
                    stopping.clone(),
                ));
                started.interactivity_addr = Some(bound);
            }
            let channel = slack::Slack::new(
                slack.api,
                ledger.clone(),
                settings.routes,
                settings.default_channel,
                started.interactivity_addr.is_some(),
            );
            started.progress.push((
                slack::CURSOR.to_string(),
                delivery::start(channel, ledger.clone(), stopping.clone())?,
            ));
        }
        if let Some(teams) = self.teams {
            started.progress.push((
                teams::CURSOR.to_string(),
                delivery::start(teams, ledger.clone(), stopping.clone())?,
            ));
        }
        for webhook in self.webhooks {
            let name = delivery::Channel::name(&webhook).to_string();
            started.progress.push((
                name,
                delivery::start(webhook, ledger.clone(), stopping.clone())?,
            ));
        }
        Ok(started)
    }
}

/// One client for every channel: rustls with ring (installed as the process provider)
/// and the platform's trust store, timeouts, and no redirects (a redirect is a
/// misconfiguration to fix, not a place to send signed events).
fn http_client() -> Result<reqwest::Client, NotifyError> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("countersign/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| NotifyError::Client(describe(e)))
}

/// An HTTP error and its causes on one line, without the URL (a Teams webhook URL is a
/// credential).
pub(crate) fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
