//! A large event log, and the time the server takes to start on it.
//!
//! `fill-log` writes checks through the ledger exactly as CheckAction records them (the
//! request validated from its protobuf form, the shipped policies evaluated, two events
//! per action, group commit), only without gRPC, so a million events take about a minute
//! rather than an afternoon. `startup` then runs [`crate::server::start`], the code behind
//! `countersign serve`, and reports the time until it serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Args;
use serde::Serialize;
use uuid::Uuid;

use super::BenchError;
use super::load::{Mix, Path};
use crate::api::validate;
use crate::config::{self, ServerConfig};
use crate::domain::{OnBehalfOfSource, Principal, PrincipalKind};
use crate::ledger::NewCheck;
use crate::ledger::{Ledger, LedgerOptions, ReplayReport};
use crate::policy::{EvaluationInput, PolicySet};
use crate::workflow::{ActionRequested, DecisionTimes, action_digest, evaluate_check};

/// `countersign bench fill-log`.
#[derive(Args, Debug, Clone)]
pub struct FillLogArgs {
    /// The data directory to fill (created if missing; events are appended to what is there).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Events to append (two per action).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub events: u64,
    /// The policies that decide the checks.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_POLICIES)]
    pub policies: PathBuf,
    /// Paths of the checks, as for the load (`allow=90,deny=5,pending=5`).
    #[arg(long, value_name = "MIX", default_value = "allow=90,deny=5,pending=5", value_parser = Mix::parse)]
    pub mix: Mix,
    /// Checks submitted at once (the writer batches up to 512 of them per flush).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub in_flight: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `countersign bench startup`.
#[derive(Args, Debug, Clone)]
pub struct StartupArgs {
    /// The data directory to start on.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The policy directory.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_POLICIES)]
    pub policies: PathBuf,
    /// Start this many times and report each (the first start reads a cold page cache
    /// only if the caller dropped it).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: u32,
    /// Ignore the log's checkpoints and replay it whole (`event_log.checkpoint_every_events
    /// = 0`): the start-up of a log written before checkpoints, or with them off.
    #[arg(long)]
    pub no_checkpoint: bool,
    /// Verify the whole chain before serving (`event_log.verify_before_serving`).
    #[arg(long)]
    pub verify_before_serving: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct FillReport {
    data_dir: PathBuf,
    events_appended: u64,
    head_sequence: u64,
    seconds: f64,
    events_per_second: f64,
}

#[derive(Debug, Serialize)]
struct StartupReport {
    data_dir: PathBuf,
    events: u64,
    actions: usize,
    /// Seconds from calling `server::start` to serving, one per start.
    seconds_to_serving: Vec<f64>,
    /// Events read to rebuild the state, one per start.
    events_replayed: Vec<u64>,
    /// The last event of the checkpoint each start began from.
    from_checkpoint: Vec<Option<u64>>,
}

/// Appends about `--events` events of realistic checks.
pub fn fill(args: &FillLogArgs) -> Result<(), BenchError> {
    let policies = PolicySet::load_dir(&args.policies)
        .map_err(|e| BenchError::Usage(format!("policies: {e}")))?;
    let (ledger, replay) = Ledger::open(&args.data_dir, LedgerOptions::default())
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    if let Some(problem) = replay.integrity_problem {
        return Err(BenchError::Failed(format!(
            "the log in {} does not verify: {problem}",
            args.data_dir.display()
        )));
    }
    let before = ledger.log().last_sequence();
    let runtime = super::runtime(2)?;
    let ledger = Arc::new(ledger);
    let policies = Arc::new(policies);
    let checks = args.events.div_ceil(2);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let outcome: Result<(), BenchError> = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..args.in_flight.max(1) {
            let (ledger, policies, next, mix) = (
                ledger.clone(),
                policies.clone(),
                next.clone(),
                args.mix.clone(),
            );
            tasks.spawn(async move {
                let mut n = u64::from(t);
                while next.fetch_add(1, Ordering::AcqRel) < checks {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let check = sample_check(&policies, mix.pick(n >> 11), n)?;
                    ledger
                        .record_check(check)
                        .await
                        .map_err(|e| BenchError::Failed(e.to_string()))?;
                }
                Ok::<(), BenchError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| BenchError::Failed(e.to_string()))??;
        }
        Ok(())
    });
    outcome?;
    let head = ledger.log().last_sequence();
    // Dropping the last handle joins the writer and flushes.
    drop(ledger);
    let seconds = started.elapsed().as_secs_f64();
    let report = FillReport {
        data_dir: args.data_dir.clone(),
        events_appended: head - before,
        head_sequence: head,
        seconds,
        events_per_second: (head - before) as f64 / seconds.max(1e-9),
    };
    let text = format!(
        "appended {} events to {} in {:.1}s ({:.0} events/s); the log now holds {}\n",
        report.events_appended,
        report.data_dir.display(),
        report.seconds,
        report.events_per_second,
        report.head_sequence
    );
    super::print(args.json, &report, &text)
}

/// A check as CheckAction builds it from a development-identity agent's request; `n`
/// varies the caller and the resource. Used by `fill-log` and the criterion benches.
pub fn sample_check(policies: &PolicySet, path: Path, n: u64) -> Result<NewCheck, BenchError> {
    let principal = Principal {
        id: format!("bench-agent-{}", n % 16),
        kind: PrincipalKind::Agent,
        groups: Vec::new(),
        authenticated_by: crate::auth::DEVELOPMENT_METHOD.to_string(),
    };
    let resource = format!("service-{}", n % 1000);
    let request =
        validate::check_action_request(path.request(&resource, super::load::ON_BEHALF_OF))
            .map_err(|e| {
                BenchError::Failed(format!("the bench request does not validate: {e:?}"))
            })?;
    let now = Utc::now();
    let decision = policies.evaluate(&EvaluationInput {
        principal: &principal,
        request: &request,
        now,
    });
    let evaluated = evaluate_check(decision, now, &DecisionTimes::default());
    let digest = action_digest(&principal, &request);
    let action_id = Uuid::now_v7();
    Ok(NewCheck {
        action_id,
        time: now,
        requested: ActionRequested {
            requester: principal,
            request,
            action_digest: digest,
            on_behalf_of_source: Some(OnBehalfOfSource::Asserted),
            // As CheckAction records it for a caller that sent no trace context.
            trace_id: Some(crate::telemetry::trace_context::derived_trace_id(
                &action_id,
            )),
            caller_span: None,
        },
        evaluated,
    })
}

/// Starts the server on the data directory (on a loopback port of its own), reports the
/// time to serving, and stops it.
pub fn startup(args: &StartupArgs) -> Result<(), BenchError> {
    // Like `countersign serve`: a multi-threaded runtime with a worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    let mut seconds = Vec::new();
    let mut replays = Vec::new();
    for _ in 0..args.repeat.max(1) {
        let mut config = ServerConfig::new(&args.data_dir, &args.policies);
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        if args.no_checkpoint {
            config.checkpoint_every = 0;
        }
        config.verify_before_serving = args.verify_before_serving;
        let (took, replay) = runtime.block_on(async {
            let started = Instant::now();
            let running = crate::server::start(config)
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))?;
            let took = started.elapsed();
            let replay = running.replay_report().clone();
            if let Some(problem) = &replay.integrity_problem {
                return Err(BenchError::Failed(format!(
                    "the log does not verify: {problem}"
                )));
            }
            running
                .stop()
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))?;
            Ok::<(Duration, ReplayReport), BenchError>((took, replay))
        })?;
        seconds.push(took.as_secs_f64());
        replays.push(replay);
    }
    let last = replays.last();
    let report = StartupReport {
        data_dir: args.data_dir.clone(),
        events: last.map_or(0, |r| r.events),
        actions: last.map_or(0, |r| r.actions),
        seconds_to_serving: seconds,
        events_replayed: replays.iter().map(|r| r.events_replayed).collect(),
        from_checkpoint: replays.iter().map(|r| r.from_checkpoint).collect(),
    };
    let times: Vec<String> = report
        .seconds_to_serving
        .iter()
        .zip(&replays)
        .map(|(s, r)| match r.from_checkpoint {
            Some(covers) => format!(
                "{s:.2}s (checkpoint at event {covers}, {} events after it)",
                r.events_replayed
            ),
            None => format!("{s:.2}s (whole log)"),
        })
        .collect();
    let text = format!(
        "{}: {} events, {} actions; serving after {}\n",
        report.data_dir.display(),
        report.events,
        report.actions,
        times.join(", ")
    );
    super::print(args.json, &report, &text)
}
