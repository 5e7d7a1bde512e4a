//! The ledger on real sled directories, without a server.

use std::sync::Arc;

use serde_json::Value;

use super::*;
use crate::bench::{CheckPath, sample_check};
use crate::policy::PolicySet;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn shipped_policies() -> Result<PolicySet, Box<dyn std::error::Error>> {
    Ok(PolicySet::load_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
    )?)
}

/// A parameter nested deeper than the log's JSON reader goes: such an event cannot be read
/// back, so the log must never hold it.
fn unreadable_parameters() -> serde_json::Map<String, Value> {
    let deep = (0..200).fold(Value::from("bottom"), |inner, _| Value::Array(vec![inner]));
    serde_json::Map::from_iter([("deep".to_owned(), deep)])
}

/// An event one caller's request makes that the log cannot store fails that request alone:
/// the other checks decided in the same group commit are recorded and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_log_cannot_store_is_refused_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (ledger, _) = Ledger::open(dir.path(), LedgerOptions::default())?;
    let ledger = Arc::new(ledger);
    let policies = shipped_policies()?;

    for round in 0..20 {
        let mut checks = Vec::new();
        for n in 0..8 {
            let mut check = sample_check(&policies, CheckPath::Allow, round * 8 + n)?;
            if n == 3 {
                check.requested.request.action.parameters = unreadable_parameters();
            }
            checks.push(check);
        }
        // All submitted before any is awaited, so they share batches.
        let answers =
            futures_util::future::join_all(checks.into_iter().map(|c| ledger.record_check(c)))
                .await;
        for (n, answer) in answers.into_iter().enumerate() {
            match (n, answer) {
                (3, Err(LedgerError::Unrecordable(problem))) => {
                    assert!(problem.contains("read back"), "{problem}")
                }
                (3, other) => panic!("the unstorable check was answered {other:?}"),
                (_, answer) => {
                    answer?;
                }
            }
        }
    }
    assert_eq!(ledger.write_refusal().map(|e| e.to_string()), None);
    assert!(ledger.log().verify()?.ok);
    assert_eq!(ledger.log().last_sequence(), 20 * 7 * 2);
    Ok(())
}

/// A settled record read back while the chain is still being verified waits for the
/// verification off the runtime: on a single-threaded runtime, the task that finishes the
/// verification still runs, and the read then succeeds instead of timing out.
#[tokio::test(flavor = "current_thread")]
async fn a_read_waiting_for_the_chain_does_not_block_the_runtime() -> TestResult {
    let dir = tempfile::tempdir()?;
    let options = LedgerOptions {
        settled_in_memory: 0,
        ..LedgerOptions::default()
    };
    let (ledger, _) = Ledger::open(dir.path(), options)?;
    let ledger = Arc::new(ledger);
    let check = sample_check(&shipped_policies()?, CheckPath::Allow, 1)?;
    let id = check.action_id;
    ledger.record_check(check).await?;
    assert!(
        matches!(ledger.actions().lookup(&id), Some(Lookup::Cold(_))),
        "the settled record left memory"
    );

    ledger.chain.set(ChainCheck::Running);
    let reader = tokio::spawn({
        let ledger = ledger.clone();
        async move { ledger.action(&id).await }
    });
    tokio::task::yield_now().await;
    ledger.chain.set(ChainCheck::Passed { events: 2 });
    let record = reader.await??;
    assert_eq!(record.map(|r| r.id), Some(id));
    Ok(())
}
