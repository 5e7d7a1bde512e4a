//! HMAC-SHA256 signatures: the ones countersign puts on webhook deliveries, and Slack's
//! `v0` signatures on interactivity requests, which countersign checks.
//!
//! Both sign the timestamp together with the body, so a captured request cannot be
//! replayed later than [`MAX_CLOCK_SKEW`]; comparisons are constant-time (`subtle`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

/// How far a signed timestamp may be from our clock, either way (Slack's recommendation).
pub const MAX_CLOCK_SKEW_SECS: i64 = 5 * 60;
pub const MAX_CLOCK_SKEW: std::time::Duration =
    std::time::Duration::from_secs(MAX_CLOCK_SKEW_SECS as u64);

/// Why a Slack request's signature was not accepted. The messages never quote the secret
/// or the expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request has no {0} header")]
    Missing(&'static str),
    #[error("the timestamp is not a number of seconds")]
    BadTimestamp,
    #[error(
        "the timestamp is {0} s away from this server's clock (at most 300 s are accepted): a replay, or a clock to fix"
    )]
    Stale(i64),
    #[error("the signature does not match the body")]
    Mismatch,
}

fn hmac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The value of `X-Countersign-Signature` for a webhook body sent at `timestamp` (Unix
/// seconds): `v1=` and the hex HMAC-SHA256 of `"<timestamp>.<body>"` under the secret.
pub fn webhook_signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    let mac = hmac(secret, &[timestamp.as_bytes(), b".", body]);
    format!("v1={}", hex::encode(mac))
}

/// Checks Slack's `X-Slack-Signature` (`v0=` and the hex HMAC-SHA256 of
/// `"v0:<timestamp>:<body>"` under the signing secret) and `X-Slack-Request-Timestamp`
/// against `now` (Unix seconds).
pub fn verify_slack(
    signing_secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let timestamp = timestamp.ok_or(SignatureError::Missing("X-Slack-Request-Timestamp"))?;
    let signature = signature.ok_or(SignatureError::Missing("X-Slack-Signature"))?;
    let seconds: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now.saturating_sub(seconds);
    if skew.saturating_abs() > MAX_CLOCK_SKEW_SECS {
        return Err(SignatureError::Stale(skew));
    }
    let given = signature
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Mismatch)?;
    let expected = hmac(signing_secret, &[b"v0:", timestamp.as_bytes(), b":", body]);
    if bool::from(expected.as_slice().ct_eq(&given)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The `X-Slack-Signature` Slack would send; for tests and local tools.
pub fn slack_signature(signing_secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    let mac = hmac(signing_secret, &[b"v0:", timestamp.as_bytes(), b":", body]);
    format!("v0={}", hex::encode(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slacks_documented_example_verifies() {
        // From Slack's "Verifying requests from Slack" guide.
        let secret = b"8f742231b10e8888abcd99yyyzzz85a5";
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let signature = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        let at = 1_531_420_618;
        assert_eq!(slack_signature(secret, at, body), signature);
        assert_eq!(
            verify_slack(secret, Some("1531420618"), Some(signature), body, at + 10),
            Ok(())
        );
    }

    #[test]
    fn a_changed_body_a_wrong_secret_or_an_old_timestamp_is_refused() {
        let body = b"payload=%7B%7D";
        let now = 1_700_000_000;
        let good = slack_signature(b"secret", now, body);
        let ts = now.to_string();
        let verify = |secret: &[u8], body: &[u8], at: i64| {
            verify_slack(secret, Some(&ts), Some(&good), body, at)
        };
        assert_eq!(verify(b"secret", body, now), Ok(()));
        assert_eq!(
            verify(b"secret", b"payload=%7B%22x%22%7D", now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(b"other", body, now), Err(SignatureError::Mismatch));
        assert_eq!(
            verify(b"secret", body, now + 301),
            Err(SignatureError::Stale(301))
        );
        assert_eq!(
            verify(b"secret", body, now - 301),
            Err(SignatureError::Stale(-301))
        );
        assert_eq!(
            verify_slack(b"secret", None, Some(&good), body, now),
            Err(SignatureError::Missing("X-Slack-Request-Timestamp"))
        );
        assert_eq!(
            verify_slack(b"secret", Some(&ts), Some("v0=zz"), body, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_slack(b"secret", Some("soon"), Some(&good), body, now),
            Err(SignatureError::BadTimestamp)
        );
    }

    #[test]
    fn webhook_signatures_cover_the_timestamp_and_the_body() {
        let sig = webhook_signature(b"k", 1_700_000_000, b"{}");
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64, "{sig}");
        assert_ne!(sig, webhook_signature(b"k", 1_700_000_001, b"{}"));
        assert_ne!(sig, webhook_signature(b"k", 1_700_000_000, b"{ }"));
        // Independently computed: printf '1700000000.{}' | openssl dgst -sha256 -hmac k
        assert_eq!(
            sig,
            "v1=c6ef4734033cee2367414a0939385eca0397754aa7a59716da7463a9298b5146"
        );
    }
}
