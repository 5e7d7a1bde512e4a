//! Event-log appends with group commit, on real sled directories in a temp dir:
//!
//! - `event_log/append/N`: one `EventLog::append` of N events (one transaction, one flush,
//!   the head witness);
//! - `event_log/witness_record`: the head witness alone, as each batch pays for it (one
//!   `pwrite`; its `fdatasync` runs at most once a second on a thread of its own);
//! - `event_log/witness_record_durably`: the same with an `fdatasync`, what a sync per
//!   batch would cost;
//! - `ledger/record_check/in_flight=K`: CheckAction's recording through the ledger's writer
//!   thread with K callers at once, so the writer batches up to K checks per flush. The
//!   time reported is per check.
//!
//! `cargo bench --bench event_log`. The flush (fsync) dominates: see docs/performance.md
//! for this machine's disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use countersign::bench::{CheckPath, sample_check};
use countersign::ledger::{Ledger, LedgerOptions};
use countersign::policy::PolicySet;
use countersign::store::witness::Witness;
use countersign::store::{EventLog, NewEvent};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

fn event(n: u64) -> NewEvent {
    NewEvent {
        kind: "action.requested".into(),
        time: Utc::now(),
        actor: "bench-agent".into(),
        action_id: Some(uuid::Uuid::now_v7()),
        payload: json!({
            "requester": {"id": "bench-agent", "kind": "agent", "groups": [], "authenticated_by": "development-header"},
            "request": {
                "action": {"type": "deploy.apply", "resource": format!("service-{n}"), "environment": "staging",
                           "parameters": {"image": "registry/web:1.42.0", "replicas": 3},
                           "purpose": "countersign bench: load generated on purpose"},
                "task": {"task_id": "bench", "origin": "criterion", "on_behalf_of": "alice", "labels": {}},
                "idempotency_key": ""
            },
            "action_digest": "0".repeat(64),
        }),
    }
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("event_log/append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for size in [1u64, 16, 256] {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        group.throughput(Throughput::Elements(size));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_batched(
                || (0..size).map(event).collect::<Vec<_>>(),
                |events| log.append(events).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// The head witness alone: what every group commit pays on top of sled's flush and
/// fdatasync (one 64-byte `pwrite` at offset 0 of a preallocated file), and what an
/// `fdatasync` per batch would add.
fn witness(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let witness = Witness::open(dir.path()).unwrap();
    let mut sequence = 0u64;
    c.bench_function("event_log/witness_record", |b| {
        b.iter(|| {
            sequence += 1;
            witness.record(sequence, &[7; 32]).unwrap()
        })
    });
    c.bench_function("event_log/witness_record_durably", |b| {
        b.iter(|| {
            sequence += 1;
            witness.record_durably(sequence, &[7; 32]).unwrap()
        })
    });
}

fn record_checks(c: &mut Criterion) {
    let policies = Arc::new(
        PolicySet::load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
            .unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("ledger/record_check");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    for in_flight in [1u64, 64, 512] {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _) = Ledger::open(dir.path(), LedgerOptions::default()).unwrap();
        let ledger = Arc::new(ledger);
        group.bench_function(
            BenchmarkId::from_parameter(format!("in_flight={in_flight}")),
            |b| {
                b.iter_custom(|checks| {
                    let (ledger, policies) = (ledger.clone(), policies.clone());
                    runtime.block_on(async move {
                        let started = Instant::now();
                        let mut tasks = tokio::task::JoinSet::new();
                        for t in 0..in_flight.min(checks) {
                            let (ledger, policies) = (ledger.clone(), policies.clone());
                            // Task t records checks t, t + in_flight, ...
                            let mine = (checks - t).div_ceil(in_flight);
                            tasks.spawn(async move {
                                for n in 0..mine {
                                    let check = sample_check(
                                        &policies,
                                        CheckPath::Allow,
                                        t + n * in_flight,
                                    )
                                    .unwrap();
                                    ledger.record_check(check).await.unwrap();
                                }
                            });
                        }
                        while let Some(done) = tasks.join_next().await {
                            done.unwrap();
                        }
                        started.elapsed()
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, appends, witness, record_checks);
criterion_main!(benches);
