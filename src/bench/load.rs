//! The load generator: M calls in flight over N connections for a while, latencies in
//! hdrhistograms, errors by gRPC code. With `--baseline`, the health check is driven the
//! same way first, so CheckAction's cost is read against the cost of a gRPC call itself
//! on the same machine at the same moment.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::identity::{self, Identity};
use super::report::{self, LatencySummary, LoadReport, RunReport};
use super::{BenchError, TargetArgs};
use crate::proto;
use crate::proto::action_gate_client::ActionGateClient;

/// The principal the load's agents call as (development identity): worker `i` is
/// `bench-agent-i`, so one run is many agents, each well within the server's per-principal
/// budget (`[limits.rate]`), as real traffic is. With a token every worker is its one
/// principal, which the budget then limits.
const AGENT: &str = "bench-agent";
/// The human it acts for (development identity asserts it); never a reviewer of these
/// actions. With a token, no human is named: only the credential may say who it acts for.
pub const ON_BEHALF_OF: &str = "bench-requester";

/// `countersign bench`: drive CheckAction (and the health check with `--baseline`).
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Calls in flight at once, spread evenly over the connections.
    #[arg(long, value_name = "M", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub in_flight: u32,
    /// How long to measure (after the warm-up).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring (connections, caches, the server's allocator).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Weights of the paths CheckAction takes with the shipped policies:
    /// `allow` (a staging deploy), `deny` (dropping a production table), `pending`
    /// (rotating a production secret, which waits for security).
    #[arg(long, value_name = "MIX", default_value = "allow=90,deny=5,pending=5", value_parser = Mix::parse)]
    pub mix: Mix,
    /// First drive the health check (a no-op RPC) the same way, and report CheckAction's
    /// throughput as a share of it.
    #[arg(long)]
    pub baseline: bool,
    /// Worker threads of the load generator's runtime (it shares the machine with the
    /// server).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub client_threads: usize,
    /// Give every check an idempotency key of its own, as careful agents do (the server
    /// then also indexes each action by its key).
    #[arg(long)]
    pub idempotency_keys: bool,
}

/// A path through the shipped policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Allow,
    Deny,
    Pending,
}

impl Path {
    const ALL: [Path; 3] = [Path::Allow, Path::Deny, Path::Pending];

    fn name(self) -> &'static str {
        match self {
            Path::Allow => "allow",
            Path::Deny => "deny",
            Path::Pending => "pending",
        }
    }

    fn expected(self) -> proto::ActionStatus {
        match self {
            Path::Allow => proto::ActionStatus::Allowed,
            Path::Deny => proto::ActionStatus::Denied,
            Path::Pending => proto::ActionStatus::Pending,
        }
    }

    /// A request that takes this path with the shipped policies (`policies/`), done for
    /// the human `on_behalf_of` (empty: none named).
    pub fn request(self, resource: &str, on_behalf_of: &str) -> proto::CheckActionRequest {
        let (action_type, environment) = match self {
            // nonproduction-deploy: allow, low risk.
            Path::Allow => ("deploy.apply", "staging"),
            // production-database-drop: deny.
            Path::Deny => ("db.table.drop", "production"),
            // production-secret-change: one security reviewer, 4 h.
            Path::Pending => ("secret.rotate", "production"),
        };
        check_request(action_type, environment, resource, on_behalf_of)
    }
}

/// A CheckAction request with a small, typical body.
pub fn check_request(
    action_type: &str,
    environment: &str,
    resource: &str,
    on_behalf_of: &str,
) -> proto::CheckActionRequest {
    let string = |s: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_string())),
    };
    proto::CheckActionRequest {
        action: Some(proto::Action {
            r#type: action_type.to_string(),
            resource: resource.to_string(),
            environment: environment.to_string(),
            parameters: Some(prost_types::Struct {
                fields: [
                    ("image".to_string(), string("registry/web:1.42.0")),
                    (
                        "replicas".to_string(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(3.0)),
                        },
                    ),
                ]
                .into_iter()
                .collect(),
            }),
            purpose: "countersign bench: load generated on purpose".to_string(),
        }),
        task: Some(proto::Task {
            task_id: "bench".to_string(),
            origin: "countersign-bench".to_string(),
            on_behalf_of: on_behalf_of.to_string(),
            labels: Default::default(),
        }),
        idempotency_key: String::new(),
    }
}

/// Weights of the three paths, e.g. `allow=90,deny=5,pending=5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; 3],
}

impl Mix {
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut weights = [0u32; 3];
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected PATH=WEIGHT, e.g. allow=90"))?;
            let index = Path::ALL
                .iter()
                .position(|p| p.name() == name.trim())
                .ok_or_else(|| format!("`{name}`: the paths are allow, deny and pending"))?;
            weights[index] = weight
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: the weight must be a whole number"))?;
        }
        if weights.iter().map(|w| u64::from(*w)).sum::<u64>() == 0 {
            return Err("at least one path needs a weight above 0".to_string());
        }
        if weights.iter().map(|w| u64::from(*w)).sum::<u64>() > u64::from(u32::MAX) {
            return Err("the weights are too large".to_string());
        }
        Ok(Mix { weights })
    }

    /// The path for a uniformly random `r`.
    pub(super) fn pick(&self, r: u64) -> Path {
        let total: u32 = self.weights.iter().sum();
        let mut at = (r % u64::from(total)) as u32;
        for (path, weight) in Path::ALL.iter().zip(self.weights) {
            if at < weight {
                return *path;
            }
            at -= weight;
        }
        Path::Allow
    }

    fn as_map(&self) -> BTreeMap<String, u32> {
        Path::ALL
            .iter()
            .zip(self.weights)
            .map(|(p, w)| (p.name().to_string(), w))
            .collect()
    }
}

/// splitmix64: a fast, seedable generator; the mix needs no more.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// When a run measures: calls that start before `measure_from` warm up, calls that start
/// at or after `stop_at` are not made.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    stop_at: Instant,
}

impl Window {
    fn new(warmup: Duration, duration: Duration) -> Window {
        let measure_from = Instant::now() + warmup;
        Window {
            measure_from,
            stop_at: measure_from + duration,
        }
    }
}

/// What the workers of one run collect; shared, locked once per call (a few ns next to a
/// call's tens of microseconds).
struct Tally {
    all: Histogram<u64>,
    by_path: [Histogram<u64>; 3],
    ok: u64,
    errors: BTreeMap<String, u64>,
    statuses: BTreeMap<String, u64>,
    unexpected: u64,
    last_answer: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            all: report::histogram(),
            by_path: [
                report::histogram(),
                report::histogram(),
                report::histogram(),
            ],
            ok: 0,
            errors: BTreeMap::new(),
            statuses: BTreeMap::new(),
            unexpected: 0,
            last_answer: None,
        }
    }

    fn record(&mut self, path: Option<Path>, took: Duration, answered: Instant) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        self.all.saturating_record(us);
        if let Some(path) = path {
            self.by_path[path as usize].saturating_record(us);
        }
        self.last_answer = Some(self.last_answer.map_or(answered, |t| t.max(answered)));
    }

    fn error(&mut self, status: &Status) {
        *self
            .errors
            .entry(report::code_name(status.code()).to_string())
            .or_default() += 1;
    }

    fn into_report(self, name: &str, rpc: &str, window: &Window) -> RunReport {
        let seconds = self.last_answer.map_or(0.0, |t| {
            t.saturating_duration_since(window.measure_from)
                .as_secs_f64()
        });
        let requests = self.all.len();
        let latency_by_path = if self.statuses.is_empty() {
            BTreeMap::new()
        } else {
            Path::ALL
                .iter()
                .zip(&self.by_path)
                .filter(|(_, h)| !h.is_empty())
                .map(|(p, h)| (p.name().to_string(), LatencySummary::of(h)))
                .collect()
        };
        RunReport {
            name: name.to_string(),
            rpc: rpc.to_string(),
            requests,
            ok: self.ok,
            errors: self.errors,
            seconds,
            requests_per_second: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            latency: LatencySummary::of(&self.all),
            latency_by_path,
            statuses: self.statuses,
            unexpected_status: self.unexpected,
        }
    }
}

/// `countersign bench`: builds the runtime, runs, prints.
pub fn run(args: &LoadArgs) -> Result<(), BenchError> {
    let runtime = super::runtime(args.client_threads)?;
    let report = runtime.block_on(drive(args))?;
    super::print(args.target.json, &report, &report.text())
}

/// Runs the baseline (if asked) and then CheckAction; returns the report.
pub async fn drive(args: &LoadArgs) -> Result<LoadReport, BenchError> {
    let identity = (0..args.in_flight)
        .map(|i| {
            Identity::or_token(args.target.token_file.as_deref(), || {
                Identity::agent(&format!("{AGENT}-{i}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let channels = identity::connect(&args.target, args.target.connections).await?;

    let baseline = if args.baseline {
        Some(run_health(args, &channels, &identity).await?)
    } else {
        None
    };
    let check_action = run_check_action(args, &channels, &identity).await?;
    let ratio_to_baseline = baseline
        .as_ref()
        .filter(|b| b.requests_per_second > 0.0)
        .map(|b| check_action.requests_per_second / b.requests_per_second);
    Ok(LoadReport {
        server: args.target.server.clone(),
        connections: args.target.connections,
        in_flight: args.in_flight,
        warmup_seconds: args.warmup.as_secs_f64(),
        duration_seconds: args.duration.as_secs_f64(),
        mix: args.mix.as_map(),
        baseline,
        check_action,
        ratio_to_baseline,
    })
}

/// Starts `in_flight` workers, worker `i` on connection `i % connections`; each calls
/// its driver back to back until the window closes.
async fn spawn_workers<D: Driver>(
    args: &LoadArgs,
    channels: &[Channel],
    identity: &[Identity],
    tally: &Arc<Mutex<Tally>>,
    window: Window,
    make: impl Fn(InterceptedService<Channel, Identity>) -> D,
) -> Result<(), BenchError> {
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..args.in_flight as usize {
        let channel = channels[i % channels.len()].clone();
        let mut driver = make(InterceptedService::new(
            channel,
            identity[i % identity.len()].clone(),
        ));
        let tally = tally.clone();
        let mut rng = Rng(i as u64 ^ 0x5EED);
        workers.spawn(async move {
            loop {
                let started = Instant::now();
                if started >= window.stop_at {
                    return;
                }
                let outcome = driver.call(rng.next()).await;
                let answered = Instant::now();
                if started < window.measure_from {
                    continue;
                }
                let mut tally = tally.lock();
                match outcome {
                    Ok((path, status)) => {
                        tally.ok += 1;
                        tally.record(path, answered - started, answered);
                        if let Some((name, expected)) = status {
                            *tally.statuses.entry(name.to_string()).or_default() += 1;
                            tally.unexpected += u64::from(!expected);
                        }
                    }
                    Err((path, status)) => {
                        tally.error(&status);
                        tally.record(path, answered - started, answered);
                    }
                }
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.map_err(|e| BenchError::Failed(format!("a load worker failed: {e}")))?;
    }
    Ok(())
}

/// The path a call took and, for CheckAction, the status name and whether it was the
/// expected one.
type CallOk = (Option<Path>, Option<(&'static str, bool)>);
type CallErr = (Option<Path>, Status);

/// One benchmarked RPC on one worker's client; `r` is a random number to choose with.
trait Driver: Send + 'static {
    fn call(&mut self, r: u64) -> impl Future<Output = Result<CallOk, CallErr>> + Send;
}

type Gate = ActionGateClient<InterceptedService<Channel, Identity>>;

/// The baseline: `grpc.health.v1.Health/Check` of the whole server, a no-op.
struct HealthDriver(HealthClient<InterceptedService<Channel, Identity>>);

impl Driver for HealthDriver {
    async fn call(&mut self, _r: u64) -> Result<CallOk, CallErr> {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match self.0.check(request).await {
            Ok(_) => Ok((None, None)),
            Err(status) => Err((None, status)),
        }
    }
}

/// CheckAction with a request of the path the mix picks.
struct CheckDriver {
    client: Gate,
    mix: Arc<Mix>,
    /// Built once per path and cloned per call, as a client with a fixed action would.
    requests: Arc<[proto::CheckActionRequest; 3]>,
    /// A fresh idempotency key per call.
    keyed: bool,
}

impl Driver for CheckDriver {
    async fn call(&mut self, r: u64) -> Result<CallOk, CallErr> {
        let path = self.mix.pick(r);
        let mut request = self.requests[path as usize].clone();
        if self.keyed {
            request.idempotency_key = uuid::Uuid::now_v7().to_string();
        }
        match self.client.check_action(request).await {
            Ok(response) => {
                let status = response.into_inner().status();
                Ok((
                    Some(path),
                    Some((status.as_str_name(), status == path.expected())),
                ))
            }
            Err(status) => Err((Some(path), status)),
        }
    }
}

async fn run_health(
    args: &LoadArgs,
    channels: &[Channel],
    identity: &[Identity],
) -> Result<RunReport, BenchError> {
    let tally = Arc::new(Mutex::new(Tally::new()));
    let window = Window::new(args.warmup, args.duration);
    spawn_workers(args, channels, identity, &tally, window, |service| {
        HealthDriver(HealthClient::new(service))
    })
    .await?;
    let tally = take(tally)?;
    Ok(tally.into_report("baseline", "grpc.health.v1.Health/Check", &window))
}

async fn run_check_action(
    args: &LoadArgs,
    channels: &[Channel],
    identity: &[Identity],
) -> Result<RunReport, BenchError> {
    let tally = Arc::new(Mutex::new(Tally::new()));
    let window = Window::new(args.warmup, args.duration);
    let mix = Arc::new(args.mix.clone());
    let on_behalf_of = on_behalf_of(args.target.token_file.is_some());
    let requests = Arc::new(Path::ALL.map(|p| p.request("web-frontend", on_behalf_of)));
    spawn_workers(args, channels, identity, &tally, window, |service| {
        CheckDriver {
            client: ActionGateClient::new(service),
            mix: mix.clone(),
            requests: requests.clone(),
            keyed: args.idempotency_keys,
        }
    })
    .await?;
    let tally = take(tally)?;
    Ok(tally.into_report(
        "check_action",
        "countersign.v1.ActionGate/CheckAction",
        &window,
    ))
}

/// The human the requests name: development identity asserts one; a credential's own
/// claim is the only source with a token.
pub fn on_behalf_of(with_token: bool) -> &'static str {
    if with_token { "" } else { ON_BEHALF_OF }
}

/// The tally once every worker has ended.
fn take(tally: Arc<Mutex<Tally>>) -> Result<Tally, BenchError> {
    Arc::try_unwrap(tally)
        .map(Mutex::into_inner)
        .map_err(|_| BenchError::Failed("a load worker outlived its run".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_names_weights_per_path() {
        let mix = Mix::parse("allow=90, deny=5,pending=5").unwrap();
        assert_eq!(mix.weights, [90, 5, 5]);
        let only = Mix::parse("pending=1").unwrap();
        assert!((0..100).all(|r| only.pick(r) == Path::Pending));
        assert!(Mix::parse("allow=0").is_err());
        assert!(Mix::parse("maybe=3").is_err());
        assert!(Mix::parse("allow").is_err());
        assert!(Mix::parse("allow=-1").is_err());
    }

    #[test]
    fn picks_follow_the_weights() {
        let mix = Mix::parse("allow=90,deny=5,pending=5").unwrap();
        let mut rng = Rng(1);
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            counts[mix.pick(rng.next()) as usize] += 1;
        }
        assert!(
            counts[0] > 8_500 && counts[1] > 300 && counts[2] > 300,
            "{counts:?}"
        );
    }
}
