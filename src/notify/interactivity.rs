//! Slack's interactivity requests: a reviewer clicks Approve or Reject on a countersign
//! message, states the reason in a modal, and the vote is applied through exactly the
//! path a gRPC `SubmitReview` takes (`Ledger::act` with `ActionCommand::Review`), so the
//! same rules hold: humans only, `[roles] reviewers`, the policy's reviewer groups, no
//! self-approval (requester or on-behalf-of human), distinct reviewers for a quorum, a
//! reason, and the digest the reviewer was shown.
//!
//! Every request is authenticated by Slack's signature (`signature::verify_slack`,
//! timestamps at most 5 minutes old) before its body is even parsed. The Slack user is
//! then mapped to a principal by `[[slack.users]]` (`authenticated_by =
//! slack:<team>/<user>`); an unknown user, a bad signature and a mapped user without the
//! reviewer role are refused, shown in Slack, and recorded as `access.denied` (rpc
//! `slack:interactivity`) through the same [`DenialReporter`] as the gRPC edge. Refusals
//! by the workflow are recorded by it as `review.refused`, and shown under the modal's
//! reason field.
//!
//! The listener is HTTP/1 (hyper), over TLS with the server's `[tls]` certificate when
//! configured; without TLS it listens on loopback only (behind a TLS-terminating proxy).
//! Bodies are bounded ([`MAX_BODY_BYTES`]), headers must arrive within
//! [`HEADER_TIMEOUT`] (the first request's, and each next one's on a kept-alive
//! connection), the TLS handshake within [`crate::tls::HANDSHAKE_TIMEOUT`], connections
//! are capped ([`crate::listener::HTTP_LISTENER_CONNECTIONS`], more are refused at once)
//! and end when the server stops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use uuid::Uuid;

use super::config::{Secret, SlackUser};
use super::message::{
    self, APPROVE_ACTION, REASON_BLOCK, REASON_INPUT, REJECT_ACTION, REVIEW_CALLBACK,
};
use super::signature;
use super::slack::SlackApi;
use crate::auth::Roles;
use crate::auth::denials::{Denial, DenialReporter, DeniedAs};
use crate::domain::{Principal, PrincipalKind};
use crate::ledger::{Ledger, LedgerError};
use crate::listener::Acceptor;
use crate::workflow::{ActionCommand, ActionStatus, Verdict};

/// The path Slack's Request URL must name.
pub const PATH: &str = "/slack/interactivity";
/// The "RPC" refusals here are recorded under.
pub const RPC: &str = "slack:interactivity";
/// Interactivity payloads are a few KiB; anything larger is refused unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole request (body, verification, the vote) must be done within this; Slack itself
/// gives up after 3 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The role check a Slack vote must pass, as a gRPC vote would.
const SUBMIT_REVIEW: &str = "/countersign.v1.ReviewService/SubmitReview";

/// Everything a request needs, shared by every connection.
pub struct Interactivity {
    signing_secret: Secret,
    api: Arc<SlackApi>,
    /// Weak: the listener must not keep the ledger (and its directory) after a stop.
    ledger: Weak<Ledger>,
    users: HashMap<String, SlackUser>,
    team_id: Option<String>,
    roles: Arc<Roles>,
    denials: DenialReporter,
}

/// What the modal carries from the click to the submission.
#[derive(serde::Serialize, serde::Deserialize)]
struct Metadata {
    action_id: Uuid,
    digest: String,
    verdict: Verdict,
}

/// A refusal to show in Slack; recorded when `denied` says how.
struct Refused {
    message: String,
}

impl Interactivity {
    pub fn new(
        signing_secret: Secret,
        api: Arc<SlackApi>,
        ledger: &Arc<Ledger>,
        users: Vec<SlackUser>,
        team_id: Option<String>,
        roles: Arc<Roles>,
        denials: DenialReporter,
    ) -> Interactivity {
        Interactivity {
            signing_secret,
            api,
            ledger: Arc::downgrade(ledger),
            users: users
                .into_iter()
                .map(|u| (u.slack_user_id.clone(), u))
                .collect(),
            team_id,
            roles,
            denials,
        }
    }

    fn deny(&self, status: DeniedAs, peer: IpAddr, principal: Option<Principal>, reason: &str) {
        self.denials.report(Denial {
            status,
            rpc: RPC.to_string(),
            peer: Some(peer),
            principal,
            reason: reason.to_string(),
            at: Utc::now(),
        });
    }

    /// One request, start to answer.
    async fn answer(&self, request: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        if request.uri().path() != PATH {
            return plain(
                StatusCode::NOT_FOUND,
                "countersign serves /slack/interactivity here",
            );
        }
        if request.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only POST");
        }
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let timestamp = header("x-slack-request-timestamp");
        let slack_signature = header("x-slack-signature");
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large"),
        };
        if let Err(e) = signature::verify_slack(
            self.signing_secret.expose().as_bytes(),
            timestamp.as_deref(),
            slack_signature.as_deref(),
            &body,
            Utc::now().timestamp(),
        ) {
            let reason = format!("Slack request signature: {e}");
            self.deny(DeniedAs::Unauthenticated, peer, None, &reason);
            return plain(StatusCode::UNAUTHORIZED, &reason);
        }
        let Some(payload) = form_urlencoded::parse(&body)
            .find(|(key, _)| key == "payload")
            .and_then(|(_, value)| serde_json::from_str::<Value>(&value).ok())
        else {
            return plain(
                StatusCode::BAD_REQUEST,
                "expected a form with a JSON `payload`",
            );
        };
        match payload["type"].as_str() {
            Some("block_actions") => {
                self.clicked(&payload, peer).await;
                plain(StatusCode::OK, "")
            }
            Some("view_submission") if payload["view"]["callback_id"] == REVIEW_CALLBACK => {
                let answer = self.submitted(&payload, peer).await;
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(answer.to_string())))
                    .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, ""))
            }
            // Other interactions (a modal closed, someone else's app) need no answer.
            _ => plain(StatusCode::OK, ""),
        }
    }

    /// The principal a Slack user is, if they may review at all.
    fn reviewer(&self, payload: &Value, peer: IpAddr) -> Result<Principal, Refused> {
        let user = payload["user"]["id"].as_str().unwrap_or_default();
        let team = payload["team"]["id"]
            .as_str()
            .or(payload["user"]["team_id"].as_str())
            .unwrap_or_default();
        if let Some(expected) = &self.team_id
            && team != expected
        {
            let message =
                format!("Slack workspace {team} is not the one countersign is configured for");
            self.deny(DeniedAs::Unauthenticated, peer, None, &message);
            return Err(Refused { message });
        }
        let Some(entry) = self.users.get(user) else {
            let message = format!(
                "Slack user {user} (workspace {team}) is not mapped to a countersign reviewer; ask an administrator to add them to [[slack.users]]"
            );
            self.deny(DeniedAs::Unauthenticated, peer, None, &message);
            return Err(Refused { message });
        };
        let principal = Principal {
            id: entry.principal.clone(),
            kind: PrincipalKind::Human,
            groups: entry.groups.clone(),
            authenticated_by: format!("slack:{team}/{user}"),
        };
        if let Err(denied) = self.roles.authorize(SUBMIT_REVIEW, &principal) {
            let message = denied.to_string();
            self.deny(DeniedAs::PermissionDenied, peer, Some(principal), &message);
            return Err(Refused { message });
        }
        Ok(principal)
    }

    /// Approve or Reject was clicked: ask for the reason in a modal (or say why not).
    async fn clicked(&self, payload: &Value, peer: IpAddr) {
        let Some(clicked) = payload["actions"].as_array().and_then(|a| a.first()) else {
            return;
        };
        let verdict = match clicked["action_id"].as_str() {
            Some(APPROVE_ACTION) => Verdict::Approve,
            Some(REJECT_ACTION) => Verdict::Reject,
            _ => return,
        };
        let Some(trigger_id) = payload["trigger_id"].as_str() else {
            return;
        };
        let parsed = clicked["value"]
            .as_str()
            .and_then(|v| v.split_once('|'))
            .and_then(|(id, digest)| Some((id.parse::<Uuid>().ok()?, digest.to_string())));
        let view = match (self.reviewer(payload, peer), parsed) {
            (Err(refused), _) => message::slack_info_modal("Not allowed", &refused.message),
            (Ok(_), None) => message::slack_info_modal(
                "Not a countersign button",
                "The button does not name an action.",
            ),
            (Ok(_), Some((action_id, digest))) => {
                let record = match self.ledger.upgrade() {
                    Some(ledger) => ledger.action(&action_id).await,
                    None => Err(LedgerError::Stopped),
                };
                match record {
                    Err(e) => message::slack_info_modal(
                        "Try again",
                        &format!("countersign cannot read action {action_id} right now: {e}"),
                    ),
                    Ok(None) => message::slack_info_modal(
                        "Unknown action",
                        &format!("countersign has no action {action_id}."),
                    ),
                    Ok(Some(record)) if record.status != ActionStatus::Pending => {
                        message::slack_info_modal(
                            "Already decided",
                            &format!(
                                "Action {action_id} is {}, no longer pending.",
                                record.status.as_str()
                            ),
                        )
                    }
                    Ok(Some(record)) => {
                        let metadata = Metadata {
                            action_id,
                            digest,
                            verdict,
                        };
                        let metadata = serde_json::to_string(&metadata).unwrap_or_default();
                        message::slack_reason_modal(verdict, &record, &metadata)
                    }
                }
            }
        };
        let opened = self
            .api
            .call(
                "views.open",
                &json!({"trigger_id": trigger_id, "view": view}),
            )
            .await;
        if let Err(e) = opened {
            tracing::warn!(error = %e, "the Slack review modal could not be opened");
        }
    }

    /// The reason modal was submitted: apply the vote. The answer either closes the modal
    /// on a confirmation or shows the refusal under the reason field.
    async fn submitted(&self, payload: &Value, peer: IpAddr) -> Value {
        let refuse = |message: &str| json!({"response_action": "errors", "errors": {REASON_BLOCK: message::truncate(message, 1900)}});
        let Some(metadata) = payload["view"]["private_metadata"]
            .as_str()
            .and_then(|m| serde_json::from_str::<Metadata>(m).ok())
        else {
            return refuse("This form does not name a countersign action.");
        };
        let reviewer = match self.reviewer(payload, peer) {
            Ok(reviewer) => reviewer,
            Err(refused) => return refuse(&refused.message),
        };
        let text = payload["view"]["state"]["values"][REASON_BLOCK][REASON_INPUT]["value"]
            .as_str()
            .unwrap_or_default();
        let reason = match crate::api::validate::reason("reason", text) {
            Ok(reason) => reason,
            Err(violation) => return refuse(&format!("The reason {}", violation.problem)),
        };
        let Some(ledger) = self.ledger.upgrade() else {
            return refuse("countersign is shutting down; try again in a moment.");
        };
        let reviewer_id = reviewer.id.clone();
        let command = ActionCommand::Review {
            reviewer,
            verdict: metadata.verdict,
            reason,
            expected_digest: Some(metadata.digest),
            // `reviewer` refused anyone who may not review, as `access.denied`.
            refused_by_role: None,
        };
        let id = metadata.action_id;
        match ledger.act(id, command, Utc::now()).await {
            Ok(record) => {
                tracing::info!(action_id = %id, reviewer = %reviewer_id, verdict = ?metadata.verdict, status = record.status.as_str(), via = "slack", "review recorded");
                let verb = match metadata.verdict {
                    Verdict::Approve => "approval",
                    Verdict::Reject => "rejection",
                };
                let now = match record.status {
                    ActionStatus::Pending => format!(
                        "It still needs {} more approval(s).",
                        record.approvals_remaining()
                    ),
                    status => format!("The action is now {}.", status.as_str()),
                };
                json!({"response_action": "update", "view": message::slack_info_modal(
                    "Recorded",
                    &format!("Your {verb} of action {id} is recorded as {reviewer_id}. {now}"),
                )})
            }
            Err(e) => {
                tracing::warn!(action_id = %id, reviewer = %reviewer_id, error = %e, via = "slack", "review refused");
                match e {
                    LedgerError::Refused(refusal) => refuse(&refusal.to_string()),
                    other => refuse(&other.to_string()),
                }
            }
        }
    }
}

/// Serves until `stopping` becomes true; `tls`: the acceptor when `[tls]` is configured.
/// `listener` caps connections (refusing more at once) and waits out a lack of file
/// descriptors; each connection holds its slot until it ends.
pub async fn serve(
    mut listener: Acceptor,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<Interactivity>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer, slot) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let handler = handler.clone();
        let tls = tls.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let connection = async {
                match tls {
                    None => connection(stream, handler, peer.ip()).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            crate::tls::HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => connection(stream, handler, peer.ip()).await,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "slack interactivity: TLS handshake failed")
                            }
                            Err(_) => {
                                tracing::debug!("slack interactivity: TLS handshake timed out")
                            }
                        }
                    }
                }
            };
            // A stopping server drops its connections, so nothing here outlives it.
            tokio::select! {
                () = connection => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
            drop(slot);
        });
    }
}

async fn connection<I>(io: I, handler: Arc<Interactivity>, peer: IpAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let handler = handler.clone();
        async move {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, handler.answer(request, peer))
                .await
                .unwrap_or_else(|_| {
                    plain(StatusCode::REQUEST_TIMEOUT, "the request took too long")
                });
            Ok::<_, Infallible>(answer)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "slack interactivity: connection ended");
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response
}
