//! What each channel is sent: Slack Block Kit messages, Teams Adaptive Cards, webhook
//! events. Pure functions of a [`Notification`]; no I/O.
//!
//! Most of what is shown comes from the agent (type, resource, purpose, parameters), so it
//! is treated as hostile: Slack `mrkdwn` is escaped (`&`, `<`, `>`: no `<!channel>` pings,
//! no disguised links), Teams markdown characters are backslash-escaped, and every text
//! is cut to the platform's limits, so a long purpose cannot make the post fail.

use serde_json::{Value, json};

use super::event::{Notification, NotificationKind};
use crate::domain::OnBehalfOfSource;
use crate::workflow::{ActionRecord, ActionStatus, Verdict};

/// Slack's `action_id`s on the buttons, and the modal's `callback_id`.
pub const APPROVE_ACTION: &str = "countersign_approve";
pub const REJECT_ACTION: &str = "countersign_reject";
pub const REVIEW_CALLBACK: &str = "countersign_review";
/// The modal's reason input: `state.values[REASON_BLOCK][REASON_INPUT].value`.
pub const REASON_BLOCK: &str = "reason";
pub const REASON_INPUT: &str = "reason";

/// Slack's limit for a section's text is 3000 characters, a field's 2000, a header's 150.
const SLACK_TEXT: usize = 2900;
const SLACK_FIELD: usize = 1900;
const SLACK_HEADER: usize = 150;
/// Parameters shown inline; the webhook event carries them whole.
const PARAMETERS_SHOWN: usize = 1500;

/// Cuts `text` to at most `max` characters, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Text for Slack `mrkdwn`: the three characters Slack's formatting reacts to, escaped.
pub fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Text for a Teams card's markdown: every character markdown reacts to, escaped.
pub fn teams_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(
            c,
            '\\' | '`'
                | '*'
                | '_'
                | '{'
                | '}'
                | '['
                | ']'
                | '('
                | ')'
                | '#'
                | '+'
                | '-'
                | '.'
                | '!'
                | '<'
                | '>'
                | '|'
                | '~'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn verdict_str(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Approve => "approve",
        Verdict::Reject => "reject",
    }
}

fn on_behalf_of(record: &ActionRecord) -> Option<String> {
    let human = &record.request.task.on_behalf_of;
    if human.is_empty() {
        return None;
    }
    Some(match record.on_behalf_of_source {
        Some(OnBehalfOfSource::Credential) => format!("{human} (from the credential)"),
        Some(OnBehalfOfSource::Asserted) | None => format!("{human} (asserted by the caller)"),
    })
}

fn risk(record: &ActionRecord) -> &'static str {
    record
        .decision
        .as_ref()
        .map_or("unknown", |d| d.risk.as_str())
}

fn approvals_needed(record: &ActionRecord) -> String {
    let groups = record.reviewer_groups();
    let from = if groups.is_empty() {
        "any reviewer".to_string()
    } else {
        groups.join(", ")
    };
    format!(
        "{} of {} from {from}",
        record.approvals(),
        record.approvals_required().max(1)
    )
}

/// `verb` in the past tense and by whom, e.g. "Approved by bob, carol".
fn outcome_line(notification: &Notification) -> String {
    let Some(resolution) = &notification.resolution else {
        return String::new();
    };
    let status = match resolution.status {
        ActionStatus::Approved => "Approved",
        ActionStatus::Rejected => "Rejected",
        ActionStatus::Expired => "Expired without a decision",
        ActionStatus::Cancelled => "Cancelled",
        other => other.as_str(),
    };
    let mut line = if resolution.by.is_empty() {
        status.to_string()
    } else {
        format!("{status} by {}", resolution.by.join(", "))
    };
    if let Some(reason) = &resolution.reason {
        line.push_str(&format!(": {reason}"));
    }
    line
}

fn parameters(record: &ActionRecord) -> Option<String> {
    if record.request.action.parameters.is_empty() {
        return None;
    }
    let text = serde_json::to_string_pretty(&record.request.action.parameters).ok()?;
    Some(truncate(&text, PARAMETERS_SHOWN))
}

/// The Slack message for a notification: a new post for `Pending`, the replacement for
/// `Resolved`. `buttons`: whether Approve/Reject are shown (only with interactivity).
pub fn slack_message(notification: &Notification, buttons: bool) -> Value {
    let record = &notification.record;
    let action = &record.request.action;
    let esc = |text: &str, max: usize| truncate(&slack_escape(text), max);
    let title = match notification.kind {
        NotificationKind::Pending => format!("Approval needed: {}", action.action_type),
        NotificationKind::Resolved => {
            let status = notification
                .resolution
                .as_ref()
                .map_or(record.status, |r| r.status);
            format!("{}: {}", capitalized(status.as_str()), action.action_type)
        }
    };
    let mut fields = vec![
        format!("*Resource*\n{}", esc(&action.resource, SLACK_FIELD)),
        format!("*Environment*\n{}", esc(&action.environment, SLACK_FIELD)),
        format!("*Risk*\n{}", risk(record)),
        format!(
            "*Requester*\n{} ({}, {})",
            esc(&record.requester.id, 300),
            record.requester.kind,
            esc(&record.requester.authenticated_by, 300)
        ),
    ];
    if let Some(human) = on_behalf_of(record) {
        fields.push(format!("*On behalf of*\n{}", esc(&human, 300)));
    }
    fields.push(format!(
        "*Approvals*\n{}",
        esc(&approvals_needed(record), 300)
    ));
    if let Some(expires_at) = record.expires_at {
        fields.push(format!(
            "*Expires*\n<!date^{}^{{date_short_pretty}} {{time}}|{}>",
            expires_at.timestamp(),
            expires_at.to_rfc3339()
        ));
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": truncate(&title, SLACK_HEADER), "emoji": false}}),
    ];
    if notification.kind == NotificationKind::Resolved {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("*{}*", esc(&outcome_line(notification), SLACK_TEXT))}}));
    }
    blocks.push(json!({"type": "section", "fields": fields
        .iter()
        .map(|f| json!({"type": "mrkdwn", "text": f}))
        .collect::<Vec<_>>()}));
    blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
        "text": format!("*Why (the agent's words)*\n{}", esc(&action.purpose, SLACK_TEXT))}}));
    if let Some(decision) = &record.decision {
        let rules: Vec<String> = decision
            .matched_rules
            .iter()
            .map(|r| {
                format!(
                    "• `{}` ({}): {}",
                    slack_escape(&r.name),
                    r.risk,
                    slack_escape(&r.message)
                )
            })
            .collect();
        if !rules.is_empty() {
            blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
                "text": truncate(&format!("*Matched rules*\n{}", rules.join("\n")), SLACK_TEXT)}}));
        }
    }
    if let Some(parameters) = parameters(record) {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("*Parameters*\n```{}```", slack_escape(&parameters).replace("```", "ˋˋˋ"))}}));
    }
    if notification.kind == NotificationKind::Resolved && !record.votes.is_empty() {
        let votes: Vec<String> = record
            .votes
            .iter()
            .map(|v| {
                format!(
                    "• {} voted {}: {}",
                    slack_escape(&v.reviewer.id),
                    verdict_str(v.verdict),
                    slack_escape(&v.reason)
                )
            })
            .collect();
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
            "text": truncate(&format!("*Votes*\n{}", votes.join("\n")), SLACK_TEXT)}}));
    }
    blocks.push(
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(&format!(
        "Action `{}` · digest `{}` · task {}",
        record.id,
        record.action_digest,
        slack_escape(&record.request.task.task_id)
    ), SLACK_FIELD)}]}),
    );
    if buttons
        && notification.kind == NotificationKind::Pending
        && record.status == ActionStatus::Pending
    {
        let value = button_value(record);
        blocks.push(
            json!({"type": "actions", "block_id": "countersign_vote", "elements": [
                {"type": "button", "action_id": APPROVE_ACTION, "style": "primary",
                 "text": {"type": "plain_text", "text": "Approve"}, "value": value},
                {"type": "button", "action_id": REJECT_ACTION, "style": "danger",
                 "text": {"type": "plain_text", "text": "Reject"}, "value": value},
            ]}),
        );
    }
    let text = match notification.kind {
        NotificationKind::Pending => format!(
            "Approval needed: {} on {} ({}), risk {}",
            action.action_type,
            action.resource,
            action.environment,
            risk(record)
        ),
        NotificationKind::Resolved => format!(
            "{} on {}: {}",
            action.action_type,
            action.resource,
            outcome_line(notification)
        ),
    };
    json!({"text": truncate(&slack_escape(&text), SLACK_TEXT), "blocks": blocks})
}

/// What a button carries back: the action and the digest the reviewer was shown, so the
/// vote is bound to exactly that action.
pub fn button_value(record: &ActionRecord) -> String {
    format!("{}|{}", record.id, record.action_digest)
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The modal that asks a reviewer for the reason of their vote. `metadata` comes back
/// with the submission (Slack keeps it, the user cannot edit it).
pub fn slack_reason_modal(verdict: Verdict, record: &ActionRecord, metadata: &str) -> Value {
    let (title, submit) = match verdict {
        Verdict::Approve => ("Approve action", "Approve"),
        Verdict::Reject => ("Reject action", "Reject"),
    };
    json!({
        "type": "modal",
        "callback_id": REVIEW_CALLBACK,
        "private_metadata": metadata,
        "title": {"type": "plain_text", "text": title},
        "submit": {"type": "plain_text", "text": submit},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": truncate(&format!(
                "*{}* on *{}* ({}), risk {}\nAction `{}`",
                slack_escape(&record.request.action.action_type),
                slack_escape(&record.request.action.resource),
                slack_escape(&record.request.action.environment),
                risk(record),
                record.id
            ), SLACK_TEXT)}},
            {"type": "input", "block_id": REASON_BLOCK, "label": {"type": "plain_text", "text": "Reason (recorded for the auditors)"},
             "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": true, "max_length": 2000}},
        ],
    })
}

/// A modal that only tells the reviewer something (a refusal, a result).
pub fn slack_info_modal(title: &str, text: &str) -> Value {
    json!({
        "type": "modal",
        "title": {"type": "plain_text", "text": truncate(title, 24)},
        "close": {"type": "plain_text", "text": "Close"},
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": truncate(&slack_escape(text), SLACK_TEXT)}}],
    })
}

/// The Adaptive Card posted to a Teams incoming webhook. Incoming webhooks cannot edit
/// what they posted, so a resolution is a second card.
pub fn teams_card(notification: &Notification, review_url: Option<&str>) -> Value {
    let record = &notification.record;
    let action = &record.request.action;
    let esc = |text: &str, max: usize| truncate(&teams_escape(text), max);
    let title = match notification.kind {
        NotificationKind::Pending => format!("Approval needed: {}", action.action_type),
        NotificationKind::Resolved => {
            format!("{}: {}", action.action_type, outcome_line(notification))
        }
    };
    let mut facts = vec![
        json!({"title": "Resource", "value": esc(&action.resource, 500)}),
        json!({"title": "Environment", "value": esc(&action.environment, 200)}),
        json!({"title": "Risk", "value": risk(record)}),
        json!({"title": "Requester", "value": esc(&format!("{} ({}, {})", record.requester.id, record.requester.kind, record.requester.authenticated_by), 500)}),
    ];
    if let Some(human) = on_behalf_of(record) {
        facts.push(json!({"title": "On behalf of", "value": esc(&human, 300)}));
    }
    facts.push(json!({"title": "Approvals", "value": esc(&approvals_needed(record), 300)}));
    if let Some(expires_at) = record.expires_at {
        facts.push(json!({"title": "Expires", "value": expires_at.to_rfc3339()}));
    }
    facts.push(json!({"title": "Action", "value": record.id.to_string()}));
    let mut body = vec![
        json!({"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": true, "text": esc(&title, 300)}),
        json!({"type": "FactSet", "facts": facts}),
        json!({"type": "TextBlock", "wrap": true, "text": format!("**Why (the agent's words):** {}", esc(&action.purpose, 2000))}),
    ];
    if let Some(decision) = &record.decision {
        for rule in &decision.matched_rules {
            body.push(
                json!({"type": "TextBlock", "wrap": true, "spacing": "Small", "text": format!(
                    "Rule {} ({}): {}", esc(&rule.name, 200), rule.risk, esc(&rule.message, 500)
                )}),
            );
        }
    }
    if let Some(parameters) = parameters(record) {
        body.push(json!({"type": "TextBlock", "wrap": true, "fontType": "Monospace", "text": teams_escape(&parameters)}));
    }
    for vote in &record.votes {
        if notification.kind == NotificationKind::Resolved {
            body.push(
                json!({"type": "TextBlock", "wrap": true, "text": esc(&format!(
                "{} voted {}: {}", vote.reviewer.id, verdict_str(vote.verdict), vote.reason
            ), 1000)}),
            );
        }
    }
    let mut actions = Vec::new();
    if notification.kind == NotificationKind::Pending {
        match review_url {
            Some(url) => {
                actions.push(json!({"type": "Action.OpenUrl", "title": "Review", "url": url}))
            }
            None => body.push(json!({"type": "TextBlock", "wrap": true, "text": format!(
                "Review with: `countersign review show {}`", record.id
            )})),
        }
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": body,
                "actions": actions,
            },
        }],
    })
}

/// The JSON body of a generic webhook delivery. Documented in README.md ("Webhooks").
pub fn webhook_event(notification: &Notification) -> Value {
    let record = &notification.record;
    let action = &record.request.action;
    let decision = record.decision.as_ref();
    json!({
        "type": notification.kind.event_type(),
        "delivery_id": notification.delivery_id(),
        "sequence": notification.sequence,
        "occurred_at": notification.at.to_rfc3339(),
        "action": {
            "id": record.id.to_string(),
            "status": record.status.as_str(),
            "type": action.action_type,
            "resource": action.resource,
            "environment": action.environment,
            "purpose": action.purpose,
            "parameters": action.parameters,
            "risk": risk(record),
            "requester": {
                "id": record.requester.id,
                "kind": record.requester.kind.as_str(),
                "authenticated_by": record.requester.authenticated_by,
            },
            "on_behalf_of": record.request.task.on_behalf_of,
            "on_behalf_of_source": record.on_behalf_of_source,
            "task_id": record.request.task.task_id,
            "origin": record.request.task.origin,
            "matched_rules": decision.map(|d| d.matched_rules.iter().map(|r| json!({
                "name": r.name, "message": r.message, "risk": r.risk.as_str(), "effect": r.effect.as_str(),
            })).collect::<Vec<_>>()).unwrap_or_default(),
            "reviewer_groups": record.reviewer_groups(),
            "approvals_required": record.approvals_required(),
            "approvals": record.approvals(),
            "action_digest": record.action_digest,
            "created_at": record.created_at.to_rfc3339(),
            "expires_at": record.expires_at.map(|t| t.to_rfc3339()),
            "decided_at": record.decided_at.map(|t| t.to_rfc3339()),
            "valid_until": record.valid_until.map(|t| t.to_rfc3339()),
            "votes": record.votes.iter().map(|v| json!({
                "reviewer": v.reviewer.id,
                "verdict": verdict_str(v.verdict),
                "reason": v.reason,
                "at": v.time.to_rfc3339(),
            })).collect::<Vec<_>>(),
        },
        "resolution": notification.resolution.as_ref().map(|r| json!({
            "status": r.status.as_str(),
            "by": r.by,
            "reason": r.reason,
        })),
    })
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone as _, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::domain::{
        ActionRequest, ActionSpec, Effect, Principal, PrincipalKind, RiskLevel, TaskContext,
    };
    use crate::notify::event::Resolution;
    use crate::policy::{Decision, MatchedRule};
    use crate::workflow::Vote;

    fn record(status: ActionStatus) -> ActionRecord {
        let at = Utc.timestamp_opt(1_800_000_000, 0).single().unwrap();
        let mut parameters = serde_json::Map::new();
        parameters.insert("role".into(), json!("admin"));
        ActionRecord {
            id: Uuid::now_v7(),
            requester: Principal {
                id: "iam-bot".into(),
                kind: PrincipalKind::Agent,
                groups: vec![],
                authenticated_by: "token:ci".into(),
            },
            request: ActionRequest {
                action: ActionSpec {
                    action_type: "iam.role.grant".into(),
                    resource: "projects/acme".into(),
                    environment: "production".into(),
                    parameters,
                    purpose: "<!channel> click <https://evil.example|here> & more".into(),
                },
                task: TaskContext {
                    task_id: "T-1".into(),
                    on_behalf_of: "alice".into(),
                    ..TaskContext::default()
                },
                idempotency_key: String::new(),
            },
            action_digest: "d".repeat(64),
            on_behalf_of_source: Some(OnBehalfOfSource::Credential),
            trace_id: None,
            caller_span: None,
            status,
            decision: Some(Decision {
                effect: Effect::RequireApproval,
                risk: RiskLevel::Critical,
                approvals_required: 2,
                reviewer_groups: vec!["security".into()],
                ttl_seconds: None,
                matched_rules: vec![MatchedRule {
                    name: "prod-admin-grant".into(),
                    message: "Admin grants in production need two security reviewers.".into(),
                    effect: Effect::RequireApproval,
                    risk: RiskLevel::Critical,
                }],
                errors: vec![],
                defaulted: false,
                policy_version: "v1".into(),
            }),
            votes: vec![],
            outcome: None,
            created_at: at,
            expires_at: Some(at + chrono::Duration::hours(1)),
            decided_at: None,
            valid_until: None,
            first_sequence: 1,
            last_sequence: 2,
        }
    }

    fn pending() -> Notification {
        Notification {
            kind: NotificationKind::Pending,
            sequence: 2,
            at: Utc::now(),
            record: record(ActionStatus::Pending),
            resolution: None,
        }
    }

    fn approved() -> Notification {
        let mut record = record(ActionStatus::Approved);
        for reviewer in ["bob", "carol"] {
            record.votes.push(Vote {
                reviewer: Principal {
                    id: reviewer.into(),
                    kind: PrincipalKind::Human,
                    groups: vec!["security".into()],
                    authenticated_by: "slack:T1/U1".into(),
                },
                verdict: Verdict::Approve,
                reason: format!("{reviewer} checked"),
                time: Utc::now(),
                sequence: 3,
            });
        }
        Notification {
            kind: NotificationKind::Resolved,
            sequence: 5,
            at: Utc::now(),
            record,
            resolution: Some(Resolution {
                status: ActionStatus::Approved,
                by: vec!["bob".into(), "carol".into()],
                reason: None,
            }),
        }
    }

    #[test]
    fn a_pending_slack_message_has_the_full_context_and_buttons_bound_to_the_digest() {
        let notification = pending();
        let message = slack_message(&notification, true);
        let text = message.to_string();
        for needle in [
            "Approval needed: iam.role.grant",
            "projects/acme",
            "production",
            "critical",
            "iam-bot (agent, token:ci)",
            "alice (from the credential)",
            "0 of 2 from security",
            "prod-admin-grant",
            "Admin grants in production",
            "\\\"role\\\": \\\"admin\\\"",
            "<!date^1800003600^",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let actions = message["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "actions")
            .expect("buttons");
        let value = button_value(&notification.record);
        assert_eq!(actions["elements"][0]["action_id"], APPROVE_ACTION);
        assert_eq!(actions["elements"][0]["value"], value.as_str());
        assert_eq!(actions["elements"][1]["action_id"], REJECT_ACTION);
        assert!(value.ends_with(&"d".repeat(64)));
        // Without interactivity there is nothing to click.
        let plain = slack_message(&notification, false).to_string();
        assert!(!plain.contains(APPROVE_ACTION));
    }

    #[test]
    fn agent_text_cannot_ping_a_channel_or_disguise_a_link() {
        let text = slack_message(&pending(), true).to_string();
        assert!(!text.contains("<!channel>"), "{text}");
        assert!(!text.contains("<https://evil"), "{text}");
        assert!(text.contains("&lt;!channel&gt;"), "{text}");
        let card = teams_card(&pending(), None).to_string();
        assert!(!card.contains("<https://evil.example|here>"), "{card}");
        assert_eq!(teams_escape("[x](y)"), "\\[x\\]\\(y\\)");
    }

    #[test]
    fn a_resolved_slack_message_says_who_decided_and_why_without_buttons() {
        let message = slack_message(&approved(), true);
        let text = message.to_string();
        assert!(text.contains("Approved by bob, carol"), "{text}");
        assert!(text.contains("bob voted approve: bob checked"), "{text}");
        assert!(!text.contains(APPROVE_ACTION), "{text}");
        assert!(
            message["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .starts_with("Approved: ")
        );
    }

    #[test]
    fn long_text_is_cut_to_slacks_limits() {
        let mut notification = pending();
        notification.record.request.action.purpose = "x".repeat(10_000);
        let message = slack_message(&notification, true);
        for block in message["blocks"].as_array().unwrap() {
            if let Some(text) = block["text"]["text"].as_str() {
                assert!(text.chars().count() <= 3000, "{}", text.len());
            }
        }
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn the_teams_card_links_to_the_review_or_names_the_cli() {
        let card = teams_card(&pending(), Some("https://cs.example.com/review/1"));
        let content = &card["attachments"][0]["content"];
        assert_eq!(content["type"], "AdaptiveCard");
        assert_eq!(content["actions"][0]["type"], "Action.OpenUrl");
        assert_eq!(
            content["actions"][0]["url"],
            "https://cs.example.com/review/1"
        );
        let text = content.to_string();
        assert!(text.contains("On behalf of"), "{text}");
        assert!(text.contains("prod\\\\-admin\\\\-grant"), "{text}");
        let without = teams_card(&pending(), None).to_string();
        assert!(without.contains("countersign review show"), "{without}");
        let resolved = teams_card(&approved(), None).to_string();
        assert!(resolved.contains("Approved by bob, carol"), "{resolved}");
    }

    #[test]
    fn the_webhook_event_carries_the_action_and_its_resolution() {
        let event = webhook_event(&approved());
        assert_eq!(event["type"], "action.resolved");
        assert_eq!(event["sequence"], 5);
        let id = event["action"]["id"].as_str().unwrap();
        assert_eq!(event["delivery_id"], format!("{id}/5"));
        assert_eq!(event["action"]["risk"], "critical");
        assert_eq!(event["action"]["on_behalf_of"], "alice");
        assert_eq!(event["action"]["on_behalf_of_source"], "credential");
        assert_eq!(
            event["action"]["matched_rules"][0]["name"],
            "prod-admin-grant"
        );
        assert_eq!(event["action"]["votes"][1]["reviewer"], "carol");
        assert_eq!(event["resolution"]["status"], "approved");
        assert_eq!(event["resolution"]["by"], json!(["bob", "carol"]));
        let pending = webhook_event(&pending());
        assert_eq!(pending["type"], "action.pending");
        assert_eq!(pending["resolution"], Value::Null);
        assert_eq!(pending["action"]["parameters"]["role"], "admin");
    }
}
