//! Generic webhooks: each pending and resolved action POSTed as a JSON event
//! ([`super::message::webhook_event`]), signed so the receiver can tell it came from
//! countersign and is recent.
//!
//! Headers of every delivery:
//! - `X-Countersign-Timestamp`: Unix seconds at sending (new for every attempt);
//! - `X-Countersign-Signature`: `v1=` + hex HMAC-SHA256 of `"<timestamp>.<body>"` under
//!   the webhook's secret ([`super::signature::webhook_signature`]);
//! - `X-Countersign-Delivery`: `<action id>/<log sequence>`, the same on every retry and
//!   after a restart: receivers drop repeats by it.
//!
//! Any 2xx accepts the delivery; anything else is retried with backoff.

use super::config::Secret;
use super::delivery::{Channel, DeliveryError};
use super::event::Notification;
use super::{message, signature};

pub const TIMESTAMP_HEADER: &str = "x-countersign-timestamp";
pub const SIGNATURE_HEADER: &str = "x-countersign-signature";
pub const DELIVERY_HEADER: &str = "x-countersign-delivery";
pub const EVENT_HEADER: &str = "x-countersign-event";

pub struct Webhook {
    /// `notify-webhook:<name>`.
    cursor: String,
    url: String,
    secret: Secret,
    http: reqwest::Client,
}

impl Webhook {
    pub fn new(name: &str, url: String, secret: Secret, http: reqwest::Client) -> Webhook {
        Webhook {
            cursor: format!("notify-webhook:{name}"),
            url,
            secret,
            http,
        }
    }
}

impl Channel for Webhook {
    fn name(&self) -> &str {
        &self.cursor
    }

    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError> {
        let body = serde_json::to_vec(&message::webhook_event(notification))
            .map_err(|e| DeliveryError(format!("the event does not encode: {e}")))?;
        let timestamp = chrono::Utc::now().timestamp();
        let signature =
            signature::webhook_signature(self.secret.expose().as_bytes(), timestamp, &body);
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .header(DELIVERY_HEADER, notification.delivery_id())
            .header(EVENT_HEADER, notification.kind.event_type())
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError(super::describe(e)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(DeliveryError(format!(
                "the receiver answered {}",
                response.status()
            )))
        }
    }
}
