//! API messages as text for a person at a terminal.
//!
//! Everything printed here that came from the server (and so, often, from an agent:
//! purpose, parameters, resource) goes through [`clean`] first, so an agent cannot move
//! the cursor, recolour or reorder what the reviewer reads with escape sequences or
//! bidirectional-override characters.

use std::fmt::Write as _;
use std::io::IsTerminal;

use chrono::{DateTime, SecondsFormat, Utc};

use super::render;
use crate::proto;

/// Width of the label column in an action block.
const LABEL_WIDTH: usize = 14;

/// Hex digits shown of a digest or policy hash: enough to compare by eye.
const SHORT_HASH: usize = 12;

/// Whether to colour. Only ever on a terminal, and never when `NO_COLOR` is set.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    color: bool,
}

impl Style {
    /// Colour only for a person: stdout is a terminal, `NO_COLOR` unset, `TERM` not dumb.
    pub fn for_stdout() -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        Style {
            color: std::io::stdout().is_terminal() && !no_color && !dumb,
        }
    }

    pub fn plain() -> Style {
        Style { color: false }
    }

    fn paint(&self, sgr: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{sgr}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    /// The risk word in capitals; high and critical in red, so they are not skimmed past.
    fn risk(&self, value: i32) -> String {
        let word = render::risk(value).to_uppercase();
        match proto::RiskLevel::try_from(value) {
            Ok(proto::RiskLevel::Critical) => self.paint("1;31", &word),
            Ok(proto::RiskLevel::High) => self.paint("31", &word),
            Ok(proto::RiskLevel::Medium) => self.paint("33", &word),
            _ => word,
        }
    }
}

/// How much of a record to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// What a reviewer needs to decide (`watch`).
    Review,
    /// Everything, including status, times, full hashes and outcome (`show`).
    Full,
}

/// The block describing one action, ending with a newline.
pub fn action_block(
    record: &proto::ActionRecord,
    now: DateTime<Utc>,
    style: Style,
    detail: Detail,
) -> String {
    let full = detail == Detail::Full;
    let mut out = String::new();
    let id = or_unknown(&record.action_id);
    let _ = writeln!(out, "{}", style.bold(&format!("── action {id} ──")));
    let mut block = Block::default();
    let status_word = render::status(record.status).to_uppercase();
    let pending = record.status == proto::ActionStatus::Pending as i32;
    // A watch shows pending actions; say so when one (replayed on resume) no longer is.
    if full || !pending {
        block.field("status", &style.bold(&status_word));
    }

    let action = record.action.clone().unwrap_or_default();
    block.text("type", &action.r#type);
    block.text("resource", &action.resource);
    block.text("environment", &action.environment);
    block.field("risk", &style.risk(record.risk));
    block.text("purpose", &action.purpose);
    let parameters = action.parameters.as_ref().map(render::structure);
    block.field(
        "parameters",
        &parameters.map_or_else(|| "(none)".to_string(), |p| clean(&p.to_string())),
    );

    if record.matched_rules.is_empty() {
        block.field(
            "rules",
            if record.defaulted {
                "(no rule matched; the policy default decided)"
            } else {
                "(none)"
            },
        );
    }
    for (i, rule) in record.matched_rules.iter().enumerate() {
        let label = if i == 0 { "rules" } else { "" };
        let name = or_unknown(&rule.name);
        let line = if rule.message.is_empty() {
            name
        } else {
            format!("{name}: {}", clean_lines(&rule.message).join(" "))
        };
        block.field(label, &line);
    }
    for (i, error) in record.rule_errors.iter().enumerate() {
        let label = if i == 0 { "rule errors" } else { "" };
        block.field(
            label,
            &format!(
                "{} failed: {}",
                or_unknown(&error.rule),
                clean_lines(&error.message).join(" ")
            ),
        );
    }

    let requester = record.requester.clone().unwrap_or_default();
    block.field(
        "requester",
        &format!(
            "{} ({})",
            or_unknown(&requester.id),
            render::principal_kind(requester.kind)
        ),
    );
    let task = record.task.clone().unwrap_or_default();
    let on_behalf_of = match record.on_behalf_of_source() {
        proto::OnBehalfOfSource::Asserted => format!(
            "{} (asserted by the requester, not verified)",
            clean(&task.on_behalf_of)
        ),
        _ => or_none(&task.on_behalf_of),
    };
    block.field("on behalf of", &on_behalf_of);
    let task_line = match (task.task_id.is_empty(), task.origin.is_empty()) {
        (true, true) => "(none)".to_string(),
        (false, true) => clean(&task.task_id),
        (true, false) => format!("(no id) from {}", clean(&task.origin)),
        (false, false) => format!("{} from {}", clean(&task.task_id), clean(&task.origin)),
    };
    block.field("task", &task_line);
    if !task.labels.is_empty() {
        let labels: Vec<String> = task
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", clean(k), clean(v)))
            .collect();
        block.field("labels", &labels.join(", "));
    }
    let policy = if full {
        or_unknown(&record.policy_version)
    } else {
        short_hash(&record.policy_version)
    };
    block.field("policy", &policy);

    if full {
        block.field("created", &when(record.created_at.as_ref(), now));
    }
    let expired = record.status == proto::ActionStatus::Expired as i32;
    if record.expires_at.is_some() && (pending || expired || !full) {
        block.field("expires", &when(record.expires_at.as_ref(), now));
    }
    if full && record.decided_at.is_some() {
        block.field("decided", &when(record.decided_at.as_ref(), now));
    }
    if full && record.valid_until.is_some() {
        block.field("valid until", &when(record.valid_until.as_ref(), now));
    }

    if record.approvals_required > 0 || !record.votes.is_empty() {
        block.field("approvals", &approvals(record, pending));
    }
    if record.votes.is_empty() {
        if record.approvals_required > 0 {
            block.field("votes", "(none yet)");
        }
    } else {
        for (i, vote) in record.votes.iter().enumerate() {
            block.field(if i == 0 { "votes" } else { "" }, &vote_text(vote, now));
        }
    }

    if full {
        if let Some(outcome) = &record.outcome {
            let mut line = format!(
                "{} {}",
                render::outcome(outcome.outcome),
                when(outcome.time.as_ref(), now)
            );
            if !outcome.details.is_empty() {
                let _ = write!(line, ": {}", clean_lines(&outcome.details).join(" "));
            }
            block.field("outcome", &line);
        }
        if !record.trace_id.is_empty() {
            block.text("trace", &record.trace_id);
        }
        if !record.idempotency_key.is_empty() {
            block.text("idempotency", &record.idempotency_key);
        }
        block.field("digest", &or_unknown(&record.action_digest));
    } else {
        block.field("digest", &short_hash(&record.action_digest));
    }
    out.push_str(&block.0);
    out
}

/// `1 of 2 approvals, 1 still needed from security`.
fn approvals(record: &proto::ActionRecord, pending: bool) -> String {
    let remaining = render::approvals_remaining(record);
    let given = record.approvals_required.saturating_sub(remaining);
    let mut line = format!("{given} of {}", record.approvals_required);
    if pending && remaining > 0 {
        let _ = write!(line, ", {remaining} still needed");
        if record.reviewer_groups.is_empty() {
            line.push_str(" from any human reviewer");
        } else {
            let groups: Vec<String> = record.reviewer_groups.iter().map(|g| clean(g)).collect();
            let _ = write!(line, " from {}", groups.join(" or "));
        }
    }
    line
}

/// `bob approved 2026-05-01T12:03:04Z (2m ago): looks right`.
fn vote_text(vote: &proto::Vote, now: DateTime<Utc>) -> String {
    let mut line = format!(
        "{} {} {}",
        or_unknown(&vote.reviewer_id),
        verdict_past(vote.verdict),
        when(vote.time.as_ref(), now)
    );
    if !vote.reason.is_empty() {
        let _ = write!(line, ": {}", clean_lines(&vote.reason).join(" "));
    }
    line
}

fn verdict_past(verdict: i32) -> String {
    match proto::Verdict::try_from(verdict) {
        Ok(proto::Verdict::Approve) => "approved".to_string(),
        Ok(proto::Verdict::Reject) => "rejected".to_string(),
        _ => format!("voted {}", render::verdict(verdict)),
    }
}

/// One line for a vote seen live.
pub fn vote_line(added: &proto::VoteAdded, style: Style) -> String {
    let mut line = format!("{:<10}{}  ", "vote", or_unknown(&added.action_id));
    match &added.vote {
        Some(vote) => {
            let _ = write!(
                line,
                "{} {}",
                or_unknown(&vote.reviewer_id),
                verdict_past(vote.verdict)
            );
            if !vote.reason.is_empty() {
                let _ = write!(line, ": {}", clean_lines(&vote.reason).join(" "));
            }
            if vote.verdict == proto::Verdict::Approve as i32 {
                let remaining = match added.approvals_remaining {
                    0 => "quorum reached".to_string(),
                    1 => "1 more approval needed".to_string(),
                    n => format!("{n} more approvals needed"),
                };
                let _ = write!(line, "  [{}]", style.bold(&remaining));
            }
        }
        None => line.push_str("(vote details missing)"),
    }
    line.push('\n');
    line
}

/// One line for an action that stopped pending, with what it was if we know.
pub fn resolved_line(
    resolved: &proto::ActionResolved,
    known: Option<&proto::ActionRecord>,
    style: Style,
) -> String {
    let status = render::status(resolved.status).to_uppercase();
    let mut line = format!(
        "{}{}  ",
        style.bold(&format!("{status:<10}")),
        or_unknown(&resolved.action_id)
    );
    match known.and_then(|r| r.action.as_ref()) {
        Some(action) => {
            let _ = write!(
                line,
                "{} on {} in {}",
                clean(&action.r#type),
                clean(&action.resource),
                clean(&action.environment)
            );
        }
        None => line.push_str("(no longer pending)"),
    }
    if !resolved.decided_by.is_empty() {
        let by: Vec<String> = resolved.decided_by.iter().map(|who| clean(who)).collect();
        let _ = write!(line, "  by {}", by.join(", "));
    }
    if !resolved.reason.is_empty() {
        let _ = write!(line, ": {}", clean(&resolved.reason));
    }
    line.push('\n');
    line
}

/// The line between the snapshot and live changes.
pub fn snapshot_line(pending: u32) -> String {
    format!("— {pending} pending; watching for more —\n")
}

/// The end of what a resumed stream had missed.
pub fn caught_up_line(pending: usize) -> String {
    format!("— caught up; {pending} pending; watching for more —\n")
}

/// What a reviewer is about to vote on (printed to stderr before the vote is sent).
pub fn review_summary(verb: &str, record: &proto::ActionRecord) -> String {
    let action = record.action.clone().unwrap_or_default();
    let mut block = Block::default();
    block.text("type", &action.r#type);
    block.text("resource", &action.resource);
    block.text("environment", &action.environment);
    block.field("risk", &render::risk(record.risk).to_uppercase());
    block.field("digest", &short_hash(&record.action_digest));
    format!(
        "{verb} action {}\n{}",
        or_unknown(&record.action_id),
        block.0
    )
}

/// The action's state after a vote.
pub fn review_result(record: &proto::ActionRecord, style: Style) -> String {
    let status = render::status(record.status).to_uppercase();
    let remaining = render::approvals_remaining(record);
    let detail = match proto::ActionStatus::try_from(record.status) {
        Ok(proto::ActionStatus::Pending) => match remaining {
            1 => "vote recorded; 1 more approval needed".to_string(),
            n => format!("vote recorded; {n} more approvals needed"),
        },
        Ok(proto::ActionStatus::Approved) => approvals(record, false) + " approvals",
        _ => String::new(),
    };
    let line = format!(
        "{}{}  {detail}",
        style.bold(&format!("{status:<10}")),
        or_unknown(&record.action_id)
    );
    format!("{}\n", line.trim_end())
}

/// One aligned line per action, under a header.
pub fn list_table(records: &[proto::ActionRecord], style: Style) -> String {
    let header = [
        "ID",
        "STATUS",
        "RISK",
        "TYPE",
        "RESOURCE",
        "REQUESTER",
        "CREATED",
    ];
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            let action = r.action.clone().unwrap_or_default();
            [
                or_unknown(&r.action_id),
                render::status(r.status).to_uppercase(),
                render::risk(r.risk).to_uppercase(),
                or_unknown(&action.r#type),
                or_none(&action.resource),
                or_unknown(&r.requester.clone().unwrap_or_default().id),
                render::time(r.created_at.as_ref()).map_or_else(
                    || "(unknown)".to_string(),
                    |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
                ),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>| -> String {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let pad = width.saturating_sub(cell.chars().count());
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            }
        }
        line.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", style.bold(&line(header.to_vec())));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Labelled lines with a fixed label column; continuation lines line up under the value.
#[derive(Default)]
struct Block(String);

impl Block {
    /// A value already made safe (cleaned or built by us).
    fn field(&mut self, label: &str, value: &str) {
        let _ = writeln!(self.0, "  {label:<LABEL_WIDTH$}{value}");
    }

    /// Free text from the server: cleaned, one output line per input line.
    fn text(&mut self, label: &str, value: &str) {
        if value.is_empty() {
            self.field(label, "(none)");
            return;
        }
        for (i, line) in clean_lines(value).iter().enumerate() {
            self.field(if i == 0 { label } else { "" }, line);
        }
    }
}

/// Server text made safe to print: control characters (escape sequences, carriage
/// returns, newlines) and invisible or direction-changing format characters are shown as
/// escapes instead of acting on the terminal.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else if is_invisible_format(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Multi-line server text as cleaned lines.
fn clean_lines(text: &str) -> Vec<String> {
    text.lines().map(clean).collect()
}

/// Zero-width and bidirectional formatting characters ("Trojan Source" reordering).
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}'
    )
}

fn or_unknown(text: &str) -> String {
    if text.is_empty() {
        "(unknown)".to_string()
    } else {
        clean(text)
    }
}

fn or_none(text: &str) -> String {
    if text.is_empty() {
        "(none)".to_string()
    } else {
        clean(text)
    }
}

/// `sha256:0123456789ab` from a full hash; short enough to compare by eye.
pub fn short_hash(hash: &str) -> String {
    if hash.is_empty() {
        return "(unknown)".to_string();
    }
    let (prefix, hex) = hash.split_once(':').unwrap_or(("", hash));
    let short: String = hex.chars().take(SHORT_HASH).collect();
    if prefix.is_empty() {
        clean(&short)
    } else {
        clean(&format!("{prefix}:{short}"))
    }
}

/// `in 29m (2026-05-01T12:30:00Z)`, or `(unknown)` for a missing or broken timestamp.
fn when(timestamp: Option<&prost_types::Timestamp>, now: DateTime<Utc>) -> String {
    match render::time(timestamp) {
        Some(time) => format!(
            "{} ({})",
            relative(now, time),
            time.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        None => "(unknown)".to_string(),
    }
}

/// `in 29m`, `3h 5m ago`: rounded down to the two largest units.
pub fn relative(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let seconds = (then - now).num_seconds();
    if seconds == 0 {
        return "now".to_string();
    }
    let span = seconds.unsigned_abs();
    let (days, hours, minutes) = (span / 86_400, span % 86_400 / 3_600, span % 3_600 / 60);
    let text = if span < 60 {
        format!("{span}s")
    } else if span < 3_600 {
        format!("{minutes}m")
    } else if span < 86_400 {
        if minutes == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h {minutes}m")
        }
    } else if hours == 0 {
        format!("{days}d")
    } else {
        format!("{days}d {hours}h")
    };
    if seconds >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn at(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let later = |s: i64| now + TimeDelta::seconds(s);
        assert_eq!(relative(now, later(29 * 60 + 59)), "in 29m");
        assert_eq!(relative(now, later(45)), "in 45s");
        assert_eq!(relative(now, later(3 * 3600 + 5 * 60)), "in 3h 5m");
        assert_eq!(relative(now, later(2 * 86_400)), "in 2d");
        assert_eq!(relative(now, later(-120)), "2m ago");
        assert_eq!(relative(now, now), "now");
    }

    #[test]
    fn escape_sequences_and_bidi_overrides_cannot_reach_the_terminal() {
        assert_eq!(clean("ok\x1b[2Jgone"), "ok\\u{1b}[2Jgone");
        assert_eq!(clean("a\rb"), "a\\rb");
        assert_eq!(clean("evil\u{202E}txt"), "evil\\u{202e}txt");
        assert_eq!(clean("grüße"), "grüße");
    }

    #[test]
    fn a_record_with_nothing_in_it_still_renders() {
        let record = proto::ActionRecord {
            status: 42,
            risk: 9,
            votes: vec![proto::Vote {
                verdict: 5,
                ..Default::default()
            }],
            ..Default::default()
        };
        let now = Utc::now();
        let block = action_block(&record, now, Style::plain(), Detail::Full);
        assert!(block.contains("UNKNOWN(42)"), "{block}");
        assert!(block.contains("UNKNOWN(9)"), "{block}");
        assert!(block.contains("voted unknown(5)"), "{block}");
        action_block(&record, now, Style::plain(), Detail::Review);
    }

    #[test]
    fn a_pending_block_shows_what_a_reviewer_needs() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let record = proto::ActionRecord {
            action_id: "0196".into(),
            status: proto::ActionStatus::Pending as i32,
            risk: proto::RiskLevel::Critical as i32,
            action: Some(proto::Action {
                r#type: "iam.role.grant".into(),
                resource: "projects/acme".into(),
                environment: "production".into(),
                parameters: None,
                purpose: "line one\nline two".into(),
            }),
            matched_rules: vec![proto::MatchedRule {
                name: "iam-admin-grant".into(),
                message: "Two security reviewers must agree.".into(),
                ..Default::default()
            }],
            approvals_required: 2,
            reviewer_groups: vec!["security".into()],
            expires_at: Some(at(1_700_000_000 + 29 * 60 + 30)),
            policy_version: "sha256:0123456789abcdef".into(),
            action_digest: "fedcba9876543210fedc".into(),
            ..Default::default()
        };
        let block = action_block(&record, now, Style::plain(), Detail::Review);
        for expected in [
            "iam.role.grant",
            "CRITICAL",
            "iam-admin-grant: Two security reviewers must agree.",
            "in 29m",
            "0 of 2, 2 still needed from security",
            "sha256:0123456789ab\n",
            "fedcba987654\n",
            "line one\n                line two\n",
        ] {
            assert!(block.contains(expected), "{expected:?} missing in\n{block}");
        }
        assert!(!block.contains('\x1b'));
    }

    #[test]
    fn list_columns_line_up() {
        let record = |id: &str, kind: &str| proto::ActionRecord {
            action_id: id.into(),
            action: Some(proto::Action {
                r#type: kind.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = list_table(
            &[record("a", "iam.role.grant"), record("bb", "x.y")],
            Style::plain(),
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let column = |line: &str| line.find("UNSPECIFIED").or_else(|| line.find("STATUS"));
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]));
    }
}
