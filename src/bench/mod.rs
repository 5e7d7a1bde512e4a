//! `countersign bench`: measures a running server from the outside, the way agents and
//! reviewers use it, and measures start-up on a large log.
//!
//! - `countersign bench` (load): N HTTP/2 connections, M requests in flight, a mix of
//!   CheckActions that the shipped policies allow, deny or send to review; with
//!   `--baseline`, the health check driven the same way first, and CheckAction's throughput
//!   as a share of it ([`load`]).
//! - `countersign bench review-loop`: many agents waiting in AwaitDecision, reviewers
//!   approving from their StreamPending; the time from sending the approving review to the
//!   waiter's answer ([`review_loop`]).
//! - `countersign bench fill-log` and `countersign bench startup`: a large event log made
//!   through the ledger, and the time `serve` takes to start on it ([`log`]).
//! - `countersign bench refusal-flood`: one human approving its own action over and over;
//!   the events and bytes the log grew by ([`refusal_flood`]).
//!
//! Nothing here is used by the server; it only talks to it (or, for `fill-log` and
//! `startup`, opens the same data directory the server would).

mod identity;
mod load;
mod log;
mod refusal_flood;
mod report;
mod review_loop;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use identity::Identity;
pub use load::{LoadArgs, Mix, Path as CheckPath};
pub use log::{FillLogArgs, StartupArgs, sample_check};
pub use refusal_flood::{RefusalFloodArgs, RefusalFloodReport};
pub use report::{LatencySummary, LoadReport, ReviewLoopReport, RunReport};
pub use review_loop::ReviewLoopArgs;

/// `countersign bench [load flags] | bench <mode>`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchMode {
    /// Agents wait in AwaitDecision while reviewers approve; reports the time from the
    /// approving review to the waiter's answer.
    ReviewLoop(ReviewLoopArgs),
    /// Writes a large event log through the ledger (realistic checks, shipped policies),
    /// for measuring start-up. Never point it at a production data directory.
    FillLog(FillLogArgs),
    /// Starts the server on a data directory, reports the time until it serves, and stops.
    Startup(StartupArgs),
    /// One human approves its own pending action over and over; reports the answers and
    /// the events and bytes the log grew by.
    RefusalFlood(RefusalFloodArgs),
}

/// Where the server is and how to reach it. Shared by the modes that talk to a server.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// The server to drive.
    #[arg(long, value_name = "URL", default_value = crate::cli::DEFAULT_SERVER)]
    pub server: String,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,
    /// A bearer token to send instead of development identity headers (a server with
    /// `[auth]`). Read once; never printed.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Bound on each call (and on connecting).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Why a benchmark could not run (as opposed to calls that failed, which it counts).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the server at {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the benchmark failed: {0}")]
    Failed(String),
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs one benchmark to completion, prints its report, and says how it went.
pub fn run(args: BenchArgs) -> ExitCode {
    let outcome = match args.mode {
        None => load::run(&args.load),
        Some(BenchMode::ReviewLoop(args)) => review_loop::run(&args),
        Some(BenchMode::FillLog(args)) => log::fill(&args),
        Some(BenchMode::Startup(args)) => log::startup(&args),
        Some(BenchMode::RefusalFlood(args)) => refusal_flood::run(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("countersign bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// A multi-threaded client runtime with `threads` workers: the load generator shares the
/// machine with the server, so its size is the caller's choice.
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)
}

/// Prints a report as JSON or as text.
fn print(json: bool, value: &impl serde::Serialize, text: &str) -> Result<(), BenchError> {
    if json {
        let line = serde_json::to_string(value)
            .map_err(|e| BenchError::Failed(format!("cannot encode the report: {e}")))?;
        println!("{line}");
    } else {
        print!("{text}");
    }
    Ok(())
}
