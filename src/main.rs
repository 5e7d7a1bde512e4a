//! The `countersign` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use countersign::auth::credentials::MAX_CREDENTIAL_BYTES;
use countersign::cli::{self, ReviewArgs};
use countersign::config::{self, ConfigFile, Overrides};
use countersign::server;
use countersign::telemetry::{self, LogFormat};
use countersign::tls::trial;

/// mimalloc instead of the system allocator: a CheckAction allocates hundreds of small
/// objects across threads (request, JSON, events, record, answer), and glibc's malloc and
/// free were a fifth of the server's CPU time under load (see docs/decisions/mimalloc-allocator.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "countersign",
    version,
    about = "A human signature on every privileged action an AI agent wants to take."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server on its embedded event log and the policy directory.
    Serve(ServeArgs),
    /// Review pending actions as a human: watch, show, approve, reject, list.
    Review(ReviewArgs),
    /// Read a static API token from stdin and print the SHA-256 to put in
    /// `[[auth.tokens.tokens]] sha256` (generate one with `openssl rand -base64 32`).
    TokenHash,
    /// Operate on a stopped server's event log (accept a known loss of events).
    #[command(subcommand)]
    Log(LogCommand),
    /// Measure a running server (load, baseline, review loop) or start-up on a large log.
    Bench(countersign::bench::BenchArgs),
    /// FOR TRIALS ONLY: write a throwaway CA, a server certificate for localhost and two
    /// client certificates, and print the [tls] and [auth.mtls] config that uses them.
    TrialCerts(TrialCertsArgs),
}

#[derive(Subcommand)]
enum LogCommand {
    /// Accept a loss of events the server refuses to write over ("the log ends at N but
    /// ..."), once no backup holds them: records the acceptance as an event where the loss
    /// is and marks every lost number, so writes continue after them. Stop the server first.
    AcceptLoss(AcceptLossArgs),
}

#[derive(Args)]
struct AcceptLossArgs {
    /// The stopped server's data directory.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// The last lost sequence number: at least the furthest the server's message names.
    #[arg(long, value_name = "SEQ")]
    through: u64,
    /// Why the loss is accepted (recorded in the log), e.g. a ticket reference.
    #[arg(long, value_name = "TEXT")]
    reason: String,
}

#[derive(Args)]
struct TrialCertsArgs {
    /// Directory to write into (created if missing); existing files are never overwritten.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// SPIFFE trust domain of the client certificates' URI SANs.
    #[arg(long, value_name = "DOMAIN", default_value = "example.org")]
    spiffe_trust_domain: String,
    /// The agent: spiffe://DOMAIN/agent/NAME, principal NAME.
    #[arg(long, value_name = "NAME", default_value = "deployer")]
    agent: String,
    /// The agent's groups, comma separated.
    #[arg(
        long,
        value_name = "GROUPS",
        value_delimiter = ',',
        default_value = "deployers"
    )]
    agent_groups: Vec<String>,
    /// The human reviewer: spiffe://DOMAIN/human/NAME, principal NAME.
    #[arg(long, value_name = "NAME", default_value = "alice")]
    reviewer: String,
    /// The reviewer's groups, comma separated (the shipped policies ask `security` for IAM).
    #[arg(
        long,
        value_name = "GROUPS",
        value_delimiter = ',',
        default_value = "security"
    )]
    reviewer_groups: Vec<String>,
}

/// Shortest token `token-hash` accepts. Static tokens are stored as a plain SHA-256, which
/// protects only high-entropy tokens (`openssl rand -base64 32` gives 44 characters).
const MIN_TOKEN_CHARS: usize = 32;
/// Most bytes `token-hash` reads: more than any credential the server accepts, so a
/// longer line is refused below rather than hashed cut short.
const MAX_TOKEN_LINE_BYTES: u64 = 2 * MAX_CREDENTIAL_BYTES as u64;

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Beyond loopback only with TLS and authentication configured.
    #[arg(long, env = "COUNTERSIGN_LISTEN", value_name = "ADDR", help = format!("Address to listen on; beyond loopback only with TLS and [auth] [default: {}]", config::DEFAULT_LISTEN))]
    listen: Option<SocketAddr>,
    /// Directory of the sled event log (created if missing).
    #[arg(long, env = "COUNTERSIGN_DATA_DIR", value_name = "DIR", help = format!("Directory of the sled event log, created if missing [default: {}]", config::DEFAULT_DATA_DIR))]
    data_dir: Option<PathBuf>,
    /// Directory of `*.yaml` policy files.
    #[arg(long, env = "COUNTERSIGN_POLICIES", value_name = "DIR", help = format!("Directory of *.yaml policy files [default: {}]", config::DEFAULT_POLICIES))]
    policies: Option<PathBuf>,
    /// TOML config file for everything else (see countersign.example.toml).
    #[arg(long, env = "COUNTERSIGN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, env = "COUNTERSIGN_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// The server's TLS certificate chain (PEM); replaces `[tls] cert`.
    #[arg(long, env = "COUNTERSIGN_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The server's TLS private key (PEM); replaces `[tls] key`.
    #[arg(long, env = "COUNTERSIGN_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// OTLP/gRPC endpoint to export the event log to as spans, e.g. http://127.0.0.1:4317.
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, when set, wins.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Loopback address to serve /metrics (Prometheus) and /status on, e.g. 127.0.0.1:9464.
    #[arg(long, env = "COUNTERSIGN_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Review(args) => cli::run(args),
        Command::TokenHash => token_hash(),
        Command::Bench(args) => countersign::bench::run(args),
        Command::Log(LogCommand::AcceptLoss(args)) => accept_loss(args),
        Command::TrialCerts(args) => trial_certs(args),
    }
}

/// `countersign trial-certs`: the files, then the config snippet on stdout.
fn trial_certs(args: TrialCertsArgs) -> ExitCode {
    let options = trial::TrialOptions {
        dir: args.dir,
        trust_domain: args.spiffe_trust_domain,
        agent: args.agent,
        agent_groups: args.agent_groups,
        reviewer: args.reviewer,
        reviewer_groups: args.reviewer_groups,
    };
    match trial::write(&options) {
        Ok(written) => {
            for file in &written.files {
                eprintln!("wrote {}", file.display());
            }
            print!("{}", written.config);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// mimalloc asks for transparent huge pages on the memory it reserves, so every thread's
/// first small allocation faulted in a whole 2 MiB page: an idle server held 65 MB instead
/// of 20 MB, and 10,000 waiters with 100 reviewer streams held over 200 MB. CheckAction's
/// CPU per call did not change beyond noise. Failing only keeps the kernel's default.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// `countersign token-hash`: one line from stdin, trimmed; the hash on stdout. The token is
/// never echoed, not even in an error.
fn token_hash() -> ExitCode {
    use std::io::{BufRead as _, Read as _};
    let mut line = String::new();
    // A token is one short line; do not buffer whatever else might be piped in.
    let mut stdin = std::io::stdin().lock().take(MAX_TOKEN_LINE_BYTES);
    if let Err(e) = stdin.read_line(&mut line) {
        return fail(&format!("cannot read the token from stdin: {e}"));
    }
    let token = line.trim();
    if token.is_empty() {
        return fail(
            &"no token on stdin; pipe one in, e.g. `openssl rand -base64 32 | tee token | countersign token-hash`",
        );
    }
    let chars = token.chars().count();
    if chars < MIN_TOKEN_CHARS {
        return fail(&format!(
            "the token has {chars} characters; use a random token of at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -base64 32`)"
        ));
    }
    if token.len() > MAX_CREDENTIAL_BYTES {
        return fail(&format!(
            "the token is longer than {MAX_CREDENTIAL_BYTES} bytes, which the server never accepts"
        ));
    }
    println!("{}", countersign::auth::token_hash(token));
    ExitCode::SUCCESS
}

fn serve(args: ServeArgs) -> ExitCode {
    let file = match &args.config {
        None => None,
        Some(path) => match ConfigFile::load(path) {
            Ok(file) => Some((path.as_path(), file)),
            Err(e) => return fail(&e),
        },
    };
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        policies: args.policies,
        log_format: args.log_format,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        // The signal-specific variable wins over the general one, as the OTLP spec says.
        otlp_endpoint: std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .or(args.otlp_endpoint),
        metrics_listen: args.metrics_listen,
    };
    let config = match config::resolve(file, overrides) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    let result = runtime.block_on(async {
        // Inside the runtime: the OTLP exporter's channel lives on it.
        let rpc_tracer = config
            .otlp
            .as_ref()
            .map(telemetry::rpc_tracer_provider)
            .transpose()?;
        telemetry::init_logging(
            config.log_format,
            rpc_tracer
                .as_ref()
                .map(|p| opentelemetry::trace::TracerProvider::tracer(p, "countersign")),
        );
        let signal = shutdown_signal().map_err(server::ServeError::Signals)?;
        let served = async { server::start(config).await?.run_until(signal).await }.await;
        if let Some(provider) = rpc_tracer {
            // Sends the last RPC spans; the SDK blocks, so off the async workers.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `countersign log accept-loss`: the acceptance, recorded, and what it did on stdout.
fn accept_loss(args: AcceptLossArgs) -> ExitCode {
    // Recorded as the acceptance's actor: the account that ran the command.
    let operator = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    match countersign::ledger::loss::accept_loss(
        &args.data_dir,
        args.through,
        &args.reason,
        &operator,
    ) {
        Ok(accepted) => {
            println!(
                "accepted the loss of events {} to {} in {} (recorded as event {}); it showed: {}",
                accepted.lost_from,
                accepted.lost_through,
                args.data_dir.display(),
                accepted.lost_from,
                accepted.evidence
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// One line on stderr a person can act on, and a failing exit code.
fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("countersign: {error}");
    ExitCode::from(2)
}

/// Resolves on Ctrl-C or SIGTERM. Handlers are registered when this is called, not when
/// the future is first polled, so a signal sent right after start-up is never missed.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("shutdown requested");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown requested");
        })
    }
}
