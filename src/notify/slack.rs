//! Slack: the Web API client, routing, and the channel that posts a message per pending
//! action and updates it when the action is resolved.
//!
//! To update a message, the channel keeps its (channel id, `ts`) per action as a reader
//! note in the store ([`crate::store::EventLog::save_note`]), beside its cursor and outside
//! the hash chain: it is delivery state, not evidence, and a lost note only means the
//! resolution is posted as a new message instead of an update. The note is saved before
//! the cursor moves and removed once the resolution is delivered.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::{Secret, SlackRoute};
use super::delivery::{Channel, DeliveryError};
use super::event::{Notification, NotificationKind};
use super::message;
use super::teams::JsonBody as _;
use crate::domain::RiskLevel;
use crate::ledger::Ledger;

pub const CURSOR: &str = "notify-slack";

/// The reader name of the notes this channel keeps.
const NOTES: &str = "notify-slack";

/// A Web API call that failed; never names the token.
#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    #[error("Slack {method}: {problem}")]
    Transport {
        method: &'static str,
        problem: String,
    },
    #[error("Slack {method} answered HTTP {status}")]
    Status { method: &'static str, status: u16 },
    #[error("Slack {method} refused: {error}")]
    Refused { method: &'static str, error: String },
}

/// Slack's Web API, as this bot.
pub struct SlackApi {
    base: String,
    token: Secret,
    http: reqwest::Client,
}

impl SlackApi {
    pub fn new(base: String, token: Secret, http: reqwest::Client) -> SlackApi {
        SlackApi { base, token, http }
    }

    /// Calls `method` with a JSON body; the answer when Slack says `ok`.
    pub async fn call(&self, method: &'static str, body: &Value) -> Result<Value, SlackError> {
        let transport = |problem: String| SlackError::Transport { method, problem };
        let response = self
            .http
            .post(format!("{}/{method}", self.base))
            .bearer_auth(self.token.expose())
            .json_body(body)
            .map_err(|e| transport(e.0))?
            .send()
            .await
            .map_err(|e| transport(super::describe(e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(SlackError::Status {
                method,
                status: status.as_u16(),
            });
        }
        let answer: Value = response
            .json_bytes()
            .await
            .map_err(|e| transport(format!("the answer is not JSON: {e}")))?;
        if answer["ok"] == json!(true) {
            Ok(answer)
        } else {
            Err(SlackError::Refused {
                method,
                error: answer["error"]
                    .as_str()
                    .unwrap_or("no error given")
                    .to_string(),
            })
        }
    }
}

/// Reads a JSON body without reqwest's `json` feature.
trait JsonBytes {
    async fn json_bytes(self) -> Result<Value, String>;
}

impl JsonBytes for reqwest::Response {
    async fn json_bytes(self) -> Result<Value, String> {
        let bytes = self.bytes().await.map_err(super::describe)?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
}

/// The channel a pending action is posted to: the first route that matches, else the
/// default. Pure.
pub fn route<'a>(
    routes: &'a [SlackRoute],
    default_channel: &'a str,
    reviewer_groups: &[String],
    risk: RiskLevel,
) -> &'a str {
    routes
        .iter()
        .find(|r| {
            let groups = r.reviewer_groups.is_empty()
                || r.reviewer_groups
                    .iter()
                    .any(|g| reviewer_groups.contains(g));
            let risky = r.min_risk.is_none_or(|min| risk >= min);
            groups && risky
        })
        .map_or(default_channel, |r| r.channel.as_str())
}

/// Where an action's message is, so it can be updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    pub channel: String,
    pub ts: String,
}

pub struct Slack {
    api: Arc<SlackApi>,
    ledger: Arc<Ledger>,
    routes: Vec<SlackRoute>,
    default_channel: String,
    /// Whether messages carry Approve/Reject (interactivity is configured).
    buttons: bool,
}

impl Slack {
    pub fn new(
        api: Arc<SlackApi>,
        ledger: Arc<Ledger>,
        routes: Vec<SlackRoute>,
        default_channel: String,
        buttons: bool,
    ) -> Slack {
        Slack {
            api,
            ledger,
            routes,
            default_channel,
            buttons,
        }
    }

    fn channel_for(&self, notification: &Notification) -> String {
        let record = &notification.record;
        let risk = record
            .decision
            .as_ref()
            .map_or(RiskLevel::Critical, |d| d.risk);
        route(
            &self.routes,
            &self.default_channel,
            record.reviewer_groups(),
            risk,
        )
        .to_string()
    }

    async fn note(&self, key: String, value: Option<Vec<u8>>) -> Result<(), DeliveryError> {
        let log = self.ledger.log().clone();
        tokio::task::spawn_blocking(move || log.save_note(NOTES, &key, value.as_deref()))
            .await
            .map_err(|e| DeliveryError(e.to_string()))?
            .map_err(|e| DeliveryError(format!("the message's place cannot be saved: {e}")))
    }

    async fn posted(&self, key: String) -> Option<Posted> {
        let log = self.ledger.log().clone();
        let note = tokio::task::spawn_blocking(move || log.note(NOTES, &key))
            .await
            .ok()?
            .ok()??;
        serde_json::from_slice(&note).ok()
    }

    async fn post(&self, channel: &str, message: &Value) -> Result<Posted, DeliveryError> {
        let mut body = message.clone();
        body["channel"] = json!(channel);
        body["unfurl_links"] = json!(false);
        let answer = self
            .api
            .call("chat.postMessage", &body)
            .await
            .map_err(|e| DeliveryError(e.to_string()))?;
        match (answer["channel"].as_str(), answer["ts"].as_str()) {
            (Some(channel), Some(ts)) => Ok(Posted {
                channel: channel.to_string(),
                ts: ts.to_string(),
            }),
            _ => Err(DeliveryError(
                "Slack chat.postMessage answered without channel and ts".into(),
            )),
        }
    }
}

impl Channel for Slack {
    fn name(&self) -> &str {
        CURSOR
    }

    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError> {
        let key = notification.record.id.to_string();
        let message = message::slack_message(notification, self.buttons);
        match notification.kind {
            NotificationKind::Pending => {
                let posted = self.post(&self.channel_for(notification), &message).await?;
                let note = serde_json::to_vec(&posted).map_err(|e| DeliveryError(e.to_string()))?;
                self.note(key, Some(note)).await
            }
            NotificationKind::Resolved => {
                match self.posted(key.clone()).await {
                    Some(posted) => {
                        let mut body = message.clone();
                        body["channel"] = json!(posted.channel);
                        body["ts"] = json!(posted.ts);
                        match self.api.call("chat.update", &body).await {
                            Ok(_) => {}
                            // The message was deleted (or the bot left): say it anew.
                            Err(SlackError::Refused { error, .. })
                                if matches!(
                                    error.as_str(),
                                    "message_not_found"
                                        | "channel_not_found"
                                        | "cant_update_message"
                                ) =>
                            {
                                self.post(&self.channel_for(notification), &message).await?;
                            }
                            Err(e) => return Err(DeliveryError(e.to_string())),
                        }
                    }
                    None => {
                        self.post(&self.channel_for(notification), &message).await?;
                    }
                }
                self.note(key, None).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_route_wins_and_the_default_catches_the_rest() {
        let routes = vec![
            SlackRoute {
                channel: "C-SEC-CRIT".into(),
                reviewer_groups: vec!["security".into()],
                min_risk: Some(RiskLevel::Critical),
            },
            SlackRoute {
                channel: "C-SEC".into(),
                reviewer_groups: vec!["security".into()],
                min_risk: None,
            },
            SlackRoute {
                channel: "C-HIGH".into(),
                reviewer_groups: vec![],
                min_risk: Some(RiskLevel::High),
            },
        ];
        let groups = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let r = |g: &[&str], risk| route(&routes, "C-DEFAULT", &groups(g), risk).to_string();
        assert_eq!(r(&["security"], RiskLevel::Critical), "C-SEC-CRIT");
        assert_eq!(r(&["sre", "security"], RiskLevel::Low), "C-SEC");
        assert_eq!(r(&["sre"], RiskLevel::High), "C-HIGH");
        assert_eq!(r(&["sre"], RiskLevel::Medium), "C-DEFAULT");
        assert_eq!(r(&[], RiskLevel::Low), "C-DEFAULT");
    }
}
