//! Notifications through the real server: local HTTP servers stand in for Slack's Web API,
//! a Teams incoming webhook and a webhook receiver, and record what they are sent; Slack's
//! interactivity requests are sent signed (and mis-signed) to the real endpoint, and the
//! results are checked through the gRPC API.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Caller, channel_to, check, string};
use countersign::config::ServerConfig;
use countersign::notify::config::{
    NotifySettings, SecretSource, SlackRoute, SlackSettings, SlackUser, TeamsSettings,
    WebhookSettings,
};
use countersign::proto::action_gate_client::ActionGateClient;
use countersign::proto::audit_service_client::AuditServiceClient;
use countersign::proto::review_service_client::ReviewServiceClient;
use countersign::proto::{self, ActionStatus, Verdict};
use countersign::server::RunningServer;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use sha2::Sha256;
use tempfile::TempDir;

const SIGNING_SECRET: &str = "slack-signing-secret-for-tests";
const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";
const TEAM: &str = "T0TEAM";

/// One request a stand-in server received.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A local HTTP server that records what it accepts and answers like Slack's Web API
/// (`chat.postMessage`, `chat.update`, `views.open`) or like any webhook receiver. While
/// `down`, it answers 503 and records nothing.
#[derive(Clone, Default)]
struct StandIn {
    received: Arc<Mutex<Vec<Received>>>,
    down: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    next_ts: Arc<AtomicU64>,
}

impl StandIn {
    async fn start() -> (StandIn, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stand_in = StandIn::default();
        let serving = stand_in.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let serving = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let serving = serving.clone();
                        async move { Ok::<_, std::convert::Infallible>(serving.answer(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (stand_in, addr)
    }

    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        let headers = request.headers().clone();
        let body = request
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let mut response = hyper::Response::new(Full::new(Bytes::from("down")));
            *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            return response;
        }
        let answer = if path.ends_with("/chat.postMessage") {
            let channel = serde_json::from_slice::<Value>(&body).unwrap()["channel"].clone();
            let n = self.next_ts.fetch_add(1, Ordering::SeqCst);
            json!({"ok": true, "channel": channel, "ts": format!("1700000000.{n:06}")})
        } else if path.contains("/chat.") || path.ends_with("/views.open") {
            json!({"ok": true})
        } else {
            json!("accepted")
        };
        self.received.lock().unwrap().push(Received {
            path,
            headers,
            body,
        });
        hyper::Response::new(Full::new(Bytes::from(answer.to_string())))
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what was received; returns it.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        for _ in 0..1000 {
            let received = self.received();
            if done(&received) {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "timed out waiting for {what}; received {:#?}",
            self.received()
        );
    }
}

fn secret_file(dir: &Path, name: &str, value: &str) -> SecretSource {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    SecretSource::File(path)
}

/// Where the stand-ins listen.
struct Endpoints {
    slack: SocketAddr,
    teams: SocketAddr,
    webhook: SocketAddr,
}

fn config(data: &TempDir, at: &Endpoints) -> ServerConfig {
    let mut config = ServerConfig::new(data.path().join("log"), common::shipped_policies());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let user = |id: &str, principal: &str, groups: &[&str]| SlackUser {
        slack_user_id: id.into(),
        principal: principal.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    config.notify = NotifySettings {
        slack: Some(SlackSettings {
            bot_token: secret_file(data.path(), "slack-token", "xoxb-test-token"),
            signing_secret: Some(secret_file(data.path(), "slack-signing", SIGNING_SECRET)),
            api_base: format!("http://{}/api", at.slack),
            default_channel: "C-DEFAULT".into(),
            routes: vec![SlackRoute {
                channel: "C-SRE".into(),
                reviewer_groups: vec!["sre".into()],
                min_risk: None,
            }],
            users: vec![
                user("U-BOB", "bob", &["sre"]),
                user("U-ALICE", "alice", &["sre"]),
                user("U-FIN", "frank", &["finance"]),
                // The requester's own id, as a careless mapping might give it.
                user("U-BOT-OWNER", "deploy-bot", &["sre"]),
            ],
            interactivity_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            team_id: Some(TEAM.into()),
        }),
        teams: Some(TeamsSettings {
            webhook_url: secret_file(
                data.path(),
                "teams-url",
                &format!("http://{}/teams/webhook", at.teams),
            ),
            review_url_template: Some("https://countersign.example.com/review/{action_id}".into()),
        }),
        webhooks: vec![WebhookSettings {
            name: "siem".into(),
            url: format!("http://{}/hook", at.webhook),
            secret: secret_file(data.path(), "webhook-secret", WEBHOOK_SECRET),
        }],
    };
    config
}

struct Harness {
    slack: StandIn,
    teams: StandIn,
    webhook: StandIn,
    endpoints: Endpoints,
    data: TempDir,
    server: Option<RunningServer>,
}

impl Harness {
    async fn start() -> Harness {
        let (slack, slack_addr) = StandIn::start().await;
        let (teams, teams_addr) = StandIn::start().await;
        let (webhook, webhook_addr) = StandIn::start().await;
        let mut harness = Harness {
            slack,
            teams,
            webhook,
            endpoints: Endpoints {
                slack: slack_addr,
                teams: teams_addr,
                webhook: webhook_addr,
            },
            data: tempfile::tempdir().unwrap(),
            server: None,
        };
        harness.restart().await;
        harness
    }

    async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            common::stop_server(server).await;
        }
        let server = common::start_server(config(&self.data, &self.endpoints)).await;
        self.server = Some(server);
    }

    fn server(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    fn set_down(&self, down: bool) {
        for stand_in in [&self.slack, &self.teams, &self.webhook] {
            stand_in.down.store(down, Ordering::SeqCst);
        }
    }

    /// A pending production deploy (one `sre` approval), asked by deploy-bot for alice.
    async fn pending_deploy(&self) -> proto::CheckActionResponse {
        let mut gate = ActionGateClient::with_interceptor(
            channel_to(self.server().local_addr()).await,
            Caller::agent("deploy-bot"),
        );
        let checked = gate
            .check_action(check(
                "deploy.apply",
                "production",
                &[("image", string("registry.example.com/app:1.2.3"))],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checked.status(), ActionStatus::Pending);
        checked
    }

    async fn action(&self, id: &str) -> proto::ActionRecord {
        let mut review = ReviewServiceClient::with_interceptor(
            channel_to(self.server().local_addr()).await,
            Caller::human("auditor", "auditors"),
        );
        review
            .get_action(proto::GetActionRequest {
                action_id: id.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .action
            .unwrap()
    }

    async fn events(&self, action_id: &str) -> Vec<proto::Event> {
        let mut audit = AuditServiceClient::with_interceptor(
            channel_to(self.server().local_addr()).await,
            Caller::human("auditor", "auditors"),
        );
        let mut stream = audit
            .read_events(proto::ReadEventsRequest {
                after_sequence: 0,
                action_id: action_id.to_string(),
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        while let Some(message) = stream.message().await.unwrap() {
            events.extend(message.event);
        }
        events
    }

    /// Posts an interactivity payload as Slack would, signed with `secret` at `timestamp`.
    async fn interact(&self, payload: &Value, secret: &str, timestamp: i64) -> (u16, String) {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish();
        let signature = slack_signature(secret, timestamp, body.as_bytes());
        countersign::tls::install_crypto_provider();
        let response = reqwest::Client::new()
            .post(format!(
                "http://{}/slack/interactivity",
                self.server().slack_interactivity_addr().unwrap()
            ))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", timestamp.to_string())
            .header("x-slack-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn interact_now(&self, payload: &Value) -> (u16, String) {
        self.interact(payload, SIGNING_SECRET, now()).await
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Computed here, independently of the server's code.
fn hmac_hex(secret: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

fn slack_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("v0:{timestamp}:").into_bytes();
    message.extend_from_slice(body);
    format!("v0={}", hmac_hex(secret, &message))
}

fn click(user: &str, action: &str, value: &str) -> Value {
    json!({
        "type": "block_actions",
        "user": {"id": user, "team_id": TEAM},
        "team": {"id": TEAM},
        "trigger_id": format!("trigger-{user}"),
        "container": {"type": "message", "channel_id": "C-SRE", "message_ts": "1700000000.000000"},
        "actions": [{"action_id": action, "block_id": "countersign_vote", "value": value, "type": "button"}],
    })
}

fn submission(user: &str, private_metadata: &str, reason: &str) -> Value {
    json!({
        "type": "view_submission",
        "user": {"id": user, "team_id": TEAM},
        "team": {"id": TEAM},
        "view": {
            "callback_id": "countersign_review",
            "private_metadata": private_metadata,
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}},
        },
    })
}

/// The metadata countersign put in the reason modal it opened for `user`.
fn modal_metadata(slack: &[Received], user: &str) -> String {
    let opened = slack
        .iter()
        .filter(|r| r.path.ends_with("/views.open"))
        .map(Received::json)
        .rfind(|body| body["trigger_id"] == format!("trigger-{user}"))
        .expect("a modal was opened");
    opened["view"]["private_metadata"]
        .as_str()
        .expect("a reason modal")
        .to_string()
}

fn posts(slack: &[Received]) -> Vec<Value> {
    slack
        .iter()
        .filter(|r| r.path.ends_with("/chat.postMessage"))
        .map(Received::json)
        .collect()
}

/// The webhook events received, each checked against its signature headers.
fn verified_webhook_events(received: &[Received]) -> Vec<Value> {
    received
        .iter()
        .map(|r| {
            let header = |name: &str| r.headers.get(name).unwrap().to_str().unwrap().to_string();
            let timestamp = header("x-countersign-timestamp");
            let mut message = format!("{timestamp}.").into_bytes();
            message.extend_from_slice(&r.body);
            assert_eq!(
                header("x-countersign-signature"),
                format!("v1={}", hmac_hex(WEBHOOK_SECRET, &message)),
                "the signature verifies"
            );
            let skew = now() - timestamp.parse::<i64>().unwrap();
            assert!(skew.abs() <= 300, "timestamp {timestamp} is current");
            let event = r.json();
            assert_eq!(header("x-countersign-delivery"), event["delivery_id"]);
            event
        })
        .collect()
}

fn events_of<'a>(events: &'a [Value], kind: &str, id: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == kind && e["action"]["id"] == id)
        .collect()
}

#[tokio::test]
async fn a_pending_action_reaches_slack_teams_and_webhooks_and_its_resolution_updates_them() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();

    // Slack: a message in the channel routed to `sre`, with the context and the buttons.
    let slack = harness
        .slack
        .wait_for("the Slack post", |r| !posts(r).is_empty())
        .await;
    let post = &slack[0];
    assert_eq!(
        post.headers.get("authorization").unwrap(),
        "Bearer xoxb-test-token"
    );
    let message = post.json();
    assert_eq!(message["channel"], "C-SRE");
    let text = message.to_string();
    for needle in [
        "Approval needed: deploy.apply",
        "production",
        "high",
        "deploy-bot (agent, development-header)",
        "alice (asserted by the caller)",
        "sensitive-deploy",
        "integration test",
        "registry.example.com/app:1.2.3",
        &id,
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let buttons = message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("Approve and Reject");
    assert_eq!(
        buttons["elements"][0]["value"],
        format!("{id}|{}", checked.action_digest)
    );

    // Teams: a card with a link to review. Webhook: a signed `action.pending` event.
    let teams = harness
        .teams
        .wait_for("the Teams card", |r| !r.is_empty())
        .await;
    assert_eq!(teams[0].path, "/teams/webhook");
    let card = teams[0].json();
    assert_eq!(
        card["attachments"][0]["content"]["actions"][0]["url"],
        format!("https://countersign.example.com/review/{id}")
    );
    let hooks = harness
        .webhook
        .wait_for("the pending webhook", |r| !r.is_empty())
        .await;
    let events = verified_webhook_events(&hooks);
    assert_eq!(events_of(&events, "action.pending", &id).len(), 1);
    assert_eq!(events[0]["action"]["status"], "pending");

    // Resolved through the gRPC API: the Slack message is updated in place, Teams gets a
    // follow-up card and the webhook an `action.resolved` event.
    let mut review = ReviewServiceClient::with_interceptor(
        channel_to(harness.server().local_addr()).await,
        Caller::human("bob", "sre"),
    );
    review
        .submit_review(proto::SubmitReviewRequest {
            action_id: id.clone(),
            verdict: Verdict::Reject as i32,
            reason: "no rollback plan".into(),
            action_digest: checked.action_digest.clone(),
        })
        .await
        .unwrap();
    let slack = harness
        .slack
        .wait_for("chat.update", |r| {
            r.iter().any(|r| r.path.ends_with("/chat.update"))
        })
        .await;
    let update = slack
        .iter()
        .find(|r| r.path.ends_with("/chat.update"))
        .unwrap()
        .json();
    let posted: Vec<Value> = posts(&slack);
    assert_eq!(
        posted.len(),
        1,
        "the resolution is an update, not a new post"
    );
    assert_eq!(update["channel"], "C-SRE");
    assert_eq!(update["ts"], "1700000000.000000");
    let text = update.to_string();
    assert!(text.contains("Rejected by bob"), "{text}");
    assert!(text.contains("no rollback plan"), "{text}");
    assert!(
        !text.contains("countersign_approve"),
        "no buttons left: {text}"
    );

    let teams = harness
        .teams
        .wait_for("the follow-up card", |r| r.len() == 2)
        .await;
    assert!(teams[1].json().to_string().contains("Rejected by bob"));
    let hooks = harness
        .webhook
        .wait_for("the resolved webhook", |r| r.len() == 2)
        .await;
    let events = verified_webhook_events(&hooks);
    let resolved = events_of(&events, "action.resolved", &id);
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0]["resolution"]["status"], "rejected");
    assert_eq!(resolved[0]["resolution"]["by"], json!(["bob"]));
}

#[tokio::test]
async fn a_signed_click_and_reason_from_a_mapped_reviewer_approves_the_action() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();
    let value = format!("{id}|{}", checked.action_digest);

    let (status, _) = harness
        .interact_now(&click("U-BOB", "countersign_approve", &value))
        .await;
    assert_eq!(status, 200);
    let slack = harness
        .slack
        .wait_for("the reason modal", |r| {
            r.iter().any(|r| r.path.ends_with("/views.open"))
        })
        .await;
    let metadata = modal_metadata(&slack, "U-BOB");

    // A submission without a reason is refused under the field, and nothing is applied.
    let (status, answer) = harness
        .interact_now(&submission("U-BOB", &metadata, "  "))
        .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response_action"], "errors");
    assert_eq!(harness.action(&id).await.status(), ActionStatus::Pending);

    let (status, answer) = harness
        .interact_now(&submission("U-BOB", &metadata, "rollback plan checked"))
        .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response_action"], "update", "{answer}");

    let action = harness.action(&id).await;
    assert_eq!(action.status(), ActionStatus::Approved);
    let vote = &action.votes[0];
    assert_eq!(vote.reviewer_id, "bob");
    assert_eq!(vote.reason, "rollback plan checked");
    // The log says how the reviewer was identified.
    let voted = harness
        .events(&id)
        .await
        .into_iter()
        .find(|e| e.kind == "review.voted")
        .expect("a vote event");
    let voted: Value = serde_json::from_str(&voted.payload_json).unwrap();
    assert_eq!(
        voted["reviewer"]["authenticated_by"],
        format!("slack:{TEAM}/U-BOB")
    );

    // And the message says so.
    let slack = harness
        .slack
        .wait_for("chat.update", |r| {
            r.iter().any(|r| r.path.ends_with("/chat.update"))
        })
        .await;
    let update = slack
        .iter()
        .find(|r| r.path.ends_with("/chat.update"))
        .unwrap();
    assert!(update.json().to_string().contains("Approved by bob"));
}

#[tokio::test]
async fn a_bad_signature_or_a_stale_timestamp_is_refused_and_nothing_is_applied() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();
    let metadata =
        json!({"action_id": id, "digest": checked.action_digest, "verdict": "approve"}).to_string();
    let payload = submission("U-BOB", &metadata, "looks fine");

    let (status, body) = harness.interact(&payload, "not-the-secret", now()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature does not match"), "{body}");
    let (status, body) = harness
        .interact(&payload, SIGNING_SECRET, now() - 10 * 60)
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("timestamp"), "{body}");

    let action = harness.action(&id).await;
    assert_eq!(action.status(), ActionStatus::Pending);
    assert!(action.votes.is_empty());
    // The refusals are on the record.
    let mut denials = Vec::new();
    for _ in 0..500 {
        denials = harness
            .events("")
            .await
            .into_iter()
            .filter(|e| e.kind == "access.denied")
            .collect();
        if !denials.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let payload: Value = serde_json::from_str(&denials[0].payload_json).unwrap();
    assert_eq!(payload["rpc"], "slack:interactivity");
    assert_eq!(payload["status"], "unauthenticated");
}

#[tokio::test]
async fn an_unknown_slack_user_is_refused_and_nothing_is_applied() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();
    let value = format!("{id}|{}", checked.action_digest);

    let (status, _) = harness
        .interact_now(&click("U-MALLORY", "countersign_approve", &value))
        .await;
    assert_eq!(status, 200);
    let slack = harness
        .slack
        .wait_for("the refusal modal", |r| {
            r.iter().any(|r| r.path.ends_with("/views.open"))
        })
        .await;
    let opened = slack
        .iter()
        .find(|r| r.path.ends_with("/views.open"))
        .unwrap()
        .json();
    assert!(opened["view"].get("submit").is_none(), "nothing to submit");
    assert!(opened.to_string().contains("not mapped"), "{opened}");

    // Even with a well-formed submission (metadata from elsewhere), nothing is applied.
    let metadata =
        json!({"action_id": id, "digest": checked.action_digest, "verdict": "approve"}).to_string();
    let (status, answer) = harness
        .interact_now(&submission("U-MALLORY", &metadata, "trust me"))
        .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response_action"], "errors");
    assert!(answer.to_string().contains("not mapped"), "{answer}");
    let action = harness.action(&id).await;
    assert_eq!(action.status(), ActionStatus::Pending);
    assert!(action.votes.is_empty());
}

#[tokio::test]
async fn the_human_the_agent_acts_for_cannot_approve_from_slack() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();
    let value = format!("{id}|{}", checked.action_digest);

    harness
        .interact_now(&click("U-ALICE", "countersign_approve", &value))
        .await;
    let slack = harness
        .slack
        .wait_for("the reason modal", |r| {
            r.iter().any(|r| r.path.ends_with("/views.open"))
        })
        .await;
    let metadata = modal_metadata(&slack, "U-ALICE");
    let (status, answer) = harness
        .interact_now(&submission("U-ALICE", &metadata, "I asked for it"))
        .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response_action"], "errors");
    assert!(
        answer.to_string().contains("on behalf of alice"),
        "{answer}"
    );
    let action = harness.action(&id).await;
    assert_eq!(action.status(), ActionStatus::Pending);
    assert!(action.votes.is_empty());
    // Recorded for the auditors, as a refused gRPC review would be.
    let events = harness.events(&id).await;
    assert!(events.iter().any(|e| e.kind == "review.refused"));
}

#[tokio::test]
async fn the_requester_cannot_approve_its_own_action_from_slack() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();
    let value = format!("{id}|{}", checked.action_digest);
    harness
        .interact_now(&click("U-BOT-OWNER", "countersign_approve", &value))
        .await;
    let slack = harness
        .slack
        .wait_for("the reason modal", |r| {
            r.iter().any(|r| r.path.ends_with("/views.open"))
        })
        .await;
    let metadata = modal_metadata(&slack, "U-BOT-OWNER");
    let (_, answer) = harness
        .interact_now(&submission("U-BOT-OWNER", &metadata, "ship it"))
        .await;
    assert!(
        answer.contains("requested this action and cannot review it"),
        "{answer}"
    );
    let action = harness.action(&id).await;
    assert_eq!(action.status(), ActionStatus::Pending);
    assert!(action.votes.is_empty());
}

#[tokio::test]
async fn a_mapped_user_outside_the_policys_reviewer_groups_is_refused() {
    let harness = Harness::start().await;
    let checked = harness.pending_deploy().await;
    let id = checked.action_id.clone();
    let metadata =
        json!({"action_id": id, "digest": checked.action_digest, "verdict": "approve"}).to_string();
    let (_, answer) = harness
        .interact_now(&submission("U-FIN", &metadata, "looks fine"))
        .await;
    assert!(answer.contains("not in a reviewer group"), "{answer}");
    assert_eq!(harness.action(&id).await.status(), ActionStatus::Pending);
}

#[tokio::test]
async fn a_burst_while_every_channel_is_down_arrives_once_they_are_up_even_across_a_restart() {
    let mut harness = Harness::start().await;
    harness.set_down(true);
    let mut ids = Vec::new();
    for _ in 0..5 {
        // Decisions do not wait for channels.
        ids.push(harness.pending_deploy().await.action_id);
    }
    // The channels were tried (and refused) ...
    for stand_in in [&harness.slack, &harness.teams, &harness.webhook] {
        for _ in 0..500 {
            if stand_in.refused.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(stand_in.refused.load(Ordering::SeqCst) > 0);
    }
    // ... and nothing is lost when the server restarts before they come back.
    harness.restart().await;
    harness.set_down(false);

    let hooks = harness
        .webhook
        .wait_for("five pending events", |r| r.len() >= 5)
        .await;
    let events = verified_webhook_events(&hooks);
    for id in &ids {
        assert_eq!(events_of(&events, "action.pending", id).len(), 1, "{id}");
    }
    let slack = harness
        .slack
        .wait_for("five Slack posts", |r| posts(r).len() >= 5)
        .await;
    let posted = posts(&slack)
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>();
    for id in &ids {
        assert_eq!(
            posted.iter().filter(|p| p.contains(id.as_str())).count(),
            1,
            "{id}"
        );
    }
    harness
        .teams
        .wait_for("five Teams cards", |r| r.len() >= 5)
        .await;
}

#[tokio::test]
async fn slack_interactivity_beyond_loopback_needs_tls() {
    let (_, addr) = StandIn::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = config(
        &data,
        &Endpoints {
            slack: addr,
            teams: addr,
            webhook: addr,
        },
    );
    if let Some(slack) = config.notify.slack.as_mut() {
        slack.interactivity_listen = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    }
    let err = common::try_start_server(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("Slack interactivity on 0.0.0.0:0"), "{err}");
    assert!(err.contains("[tls]"), "{err}");
    assert!(
        !data.path().join("log").exists(),
        "refused before touching the disk"
    );
}

#[tokio::test]
async fn with_tls_slack_interactivity_is_served_over_https_with_the_servers_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

    // A throwaway CA and a server certificate for 127.0.0.1, as [tls] would name them.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "notify test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();

    let (slack, addr) = StandIn::start().await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(
        data.path().join("server-key.pem"),
        server_key.serialize_pem(),
    )
    .unwrap();
    let mut config = config(
        &data,
        &Endpoints {
            slack: addr,
            teams: addr,
            webhook: addr,
        },
    );
    config.tls = Some(countersign::config::TlsSettings {
        cert: data.path().join("server.pem"),
        key: data.path().join("server-key.pem"),
    });
    let server = common::start_server(config).await;
    let interactivity = server.slack_interactivity_addr().unwrap();

    let payload = click(
        "U-BOB",
        "countersign_approve",
        &format!("{}|{}", uuid::Uuid::now_v7(), "0".repeat(64)),
    );
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish();
    let signed = |client: reqwest::Client, scheme: &str| {
        client
            .post(format!("{scheme}://{interactivity}/slack/interactivity"))
            .header("x-slack-request-timestamp", now().to_string())
            .header(
                "x-slack-signature",
                slack_signature(SIGNING_SECRET, now(), body.as_bytes()),
            )
            .body(body.clone())
            .send()
    };
    countersign::tls::install_crypto_provider();
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let response = signed(trusting, "https").await.unwrap();
    assert_eq!(response.status(), 200);
    let received = slack
        .wait_for("the modal", |r| {
            r.iter().any(|r| r.path.ends_with("/views.open"))
        })
        .await;
    assert!(received[0].json().to_string().contains("Unknown action"));
    // Plaintext gets nowhere on the TLS listener.
    assert!(signed(reqwest::Client::new(), "http").await.is_err());
    common::stop_server(server).await;
}
