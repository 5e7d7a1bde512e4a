//! Microsoft Teams: an Adaptive Card per pending action, posted to an incoming webhook,
//! with the context and a link to review; a second card when it is resolved (incoming
//! webhooks cannot edit what they posted). The webhook URL is the credential: it comes
//! from a file or an environment variable and is never logged (errors drop the URL).

use super::config::Secret;
use super::delivery::{Channel, DeliveryError};
use super::event::{Notification, NotificationKind};
use super::message;

pub const CURSOR: &str = "notify-teams";

pub struct Teams {
    webhook_url: Secret,
    review_url_template: Option<String>,
    http: reqwest::Client,
}

impl Teams {
    pub fn new(
        webhook_url: Secret,
        review_url_template: Option<String>,
        http: reqwest::Client,
    ) -> Teams {
        Teams {
            webhook_url,
            review_url_template,
            http,
        }
    }
}

impl Channel for Teams {
    fn name(&self) -> &str {
        CURSOR
    }

    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError> {
        let review_url = match (notification.kind, &self.review_url_template) {
            (NotificationKind::Pending, Some(template)) => {
                Some(template.replace("{action_id}", &notification.record.id.to_string()))
            }
            _ => None,
        };
        let card = message::teams_card(notification, review_url.as_deref());
        let response = self
            .http
            .post(self.webhook_url.expose())
            .json_body(&card)?
            .send()
            .await
            .map_err(|e| DeliveryError(super::describe(e)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(DeliveryError(format!(
                "the Teams webhook answered {}",
                response.status()
            )))
        }
    }
}

/// A JSON body without reqwest's `json` feature.
pub(super) trait JsonBody: Sized {
    fn json_body(self, value: &serde_json::Value) -> Result<Self, DeliveryError>;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, value: &serde_json::Value) -> Result<Self, DeliveryError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| DeliveryError(format!("the message does not encode: {e}")))?;
        Ok(self
            .header("content-type", "application/json; charset=utf-8")
            .body(body))
    }
}
