//! `review show`, `review approve` / `reject` and `review list`: a call or two each.

use chrono::Utc;

use super::client::{Connector, ReviewClient};
use super::text::{self, Detail, Style};
use super::{CliError, ListArgs, ShowArgs, VoteArgs, note, print, render};
use crate::proto;

/// Largest page asked for: whole records can be large, so several small pages beat one
/// huge answer.
const MAX_PAGE: u32 = 100;

pub async fn show(args: &ShowArgs) -> Result<(), CliError> {
    let connector = Connector::new(&args.common)?;
    let mut client = connector.connect().await?;
    let record = get_action(&connector, &mut client, &args.id).await?;
    if args.common.json {
        print(&format!("{}\n", render::action_record(&record)))
    } else {
        print(&text::action_block(
            &record,
            Utc::now(),
            Style::for_stdout(),
            Detail::Full,
        ))
    }
}

/// Reads the action, shows the reviewer what they are voting on, then votes on exactly
/// that: the digest just shown goes with the vote, so if the action were not the one
/// shown the server refuses instead of recording the vote.
pub async fn vote(args: &VoteArgs, verdict: proto::Verdict) -> Result<(), CliError> {
    let connector = Connector::new(&args.common)?;
    let mut client = connector.connect().await?;
    let record = get_action(&connector, &mut client, &args.id).await?;
    if record.action_digest.is_empty() {
        // Without a digest the server would record the vote unchecked; refuse to vote blind.
        return Err(CliError::BadAnswer(format!(
            "action {} came without an action digest; not voting on an action that cannot be pinned",
            args.id
        )));
    }
    let verb = match verdict {
        proto::Verdict::Reject => "Rejecting",
        _ => "Approving",
    };
    note(&text::review_summary(verb, &record));

    let request = connector.request(proto::SubmitReviewRequest {
        action_id: args.id.clone(),
        verdict: verdict as i32,
        reason: args.reason.clone(),
        action_digest: record.action_digest.clone(),
    });
    let response = connector.call(client.submit_review(request)).await?;
    let record = response.action.ok_or_else(|| {
        CliError::BadAnswer("the vote was accepted but no action record came back".into())
    })?;
    if args.common.json {
        print(&format!("{}\n", render::action_record(&record)))
    } else {
        print(&text::review_result(&record, Style::for_stdout()))
    }
}

/// Pages through `ListActions` until `--limit` actions or the end.
pub async fn list(args: &ListArgs) -> Result<(), CliError> {
    let connector = Connector::new(&args.common)?;
    let mut client = connector.connect().await?;
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let mut records: Vec<proto::ActionRecord> = Vec::new();
    let mut page_token = String::new();
    loop {
        let wanted = u32::try_from(limit.saturating_sub(records.len())).unwrap_or(MAX_PAGE);
        let request = connector.request(proto::ListActionsRequest {
            status: args
                .status
                .map_or(proto::ActionStatus::Unspecified, |s| s.to_proto())
                as i32,
            requester_id: args.requester.clone().unwrap_or_default(),
            action_type: args.action_type.clone().unwrap_or_default(),
            page_size: wanted.min(MAX_PAGE),
            page_token: page_token.clone(),
        });
        let page = connector.call(client.list_actions(request)).await?;
        let got = page.actions.len();
        records.extend(page.actions);
        if records.len() >= limit || page.next_page_token.is_empty() {
            break;
        }
        // A server handing out the same token again, or empty pages, would loop forever.
        if got == 0 || page.next_page_token == page_token {
            return Err(CliError::BadAnswer(
                "ListActions returned a page token that makes no progress".into(),
            ));
        }
        page_token = page.next_page_token;
    }
    records.truncate(limit);

    if args.common.json {
        let mut out = String::new();
        for record in &records {
            out.push_str(&render::action_record(record).to_string());
            out.push('\n');
        }
        print(&out)
    } else if records.is_empty() {
        note("no actions match\n");
        Ok(())
    } else {
        print(&text::list_table(&records, Style::for_stdout()))
    }
}

async fn get_action(
    connector: &Connector,
    client: &mut ReviewClient,
    id: &str,
) -> Result<proto::ActionRecord, CliError> {
    let request = connector.request(proto::GetActionRequest {
        action_id: id.to_string(),
    });
    let response = connector.call(client.get_action(request)).await?;
    response
        .action
        .ok_or_else(|| CliError::BadAnswer(format!("GetAction for {id} returned no record")))
}
