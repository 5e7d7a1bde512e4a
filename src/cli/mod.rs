//! `countersign review`: the reviewer's command line.
//!
//! Every subcommand is one or two gRPC calls to `ReviewService` through the client that
//! [`client`] builds (the one place that knows how a reviewer proves who they are), and
//! prints what came back either for a person ([`text`]) or for a script ([`render`], one
//! JSON object per line). Failures become one line on stderr and an exit code:
//!
//! - 0: done;
//! - 1: the server understood and refused (permission denied, failed precondition, not
//!   found, invalid argument, already exists): retrying will not help, changing the
//!   request or the reviewer might;
//! - 2: usage, connection and every other error.

mod client;
mod commands;
pub mod render;
pub mod text;
mod watch;

use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Subcommand, ValueEnum};
use tonic::{Code, Status};

use crate::proto;

/// The server a reviewer talks to when nothing else is said: `countersign serve`'s default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// `countersign review <command>`.
#[derive(Args, Debug)]
pub struct ReviewArgs {
    #[command(subcommand)]
    pub command: ReviewCommand,
}

#[derive(Subcommand, Debug)]
pub enum ReviewCommand {
    /// Follow the actions waiting for your review, live, until Ctrl-C.
    Watch(WatchArgs),
    /// Show one action's whole record: what, why, who asked, votes, outcome.
    Show(ShowArgs),
    /// Approve a pending action (the vote binds to the exact action shown).
    Approve(VoteArgs),
    /// Reject a pending action (the vote binds to the exact action shown).
    Reject(VoteArgs),
    /// List actions, newest first.
    List(ListArgs),
}

/// Where the server is, who the reviewer is, and how to print. Shared by every command.
///
/// Who you are: a credential (`--token-file` or `COUNTERSIGN_TOKEN`, or `--client-cert`
/// with `--client-key`), or else `--as` in development identity mode. With a credential,
/// `--as` and `--groups` are not sent: the server takes your identity from the credential.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// countersign server to talk to (https:// for TLS).
    #[arg(long, env = "COUNTERSIGN_SERVER", value_name = "URL", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Who you are, in development identity mode (the server trusts this on loopback only).
    /// Not sent with a credential.
    #[arg(
        long = "as",
        env = "COUNTERSIGN_PRINCIPAL",
        value_name = "PRINCIPAL",
        value_parser = NonEmptyStringValueParser::new()
    )]
    pub principal: Option<String>,
    /// Your groups, comma separated, e.g. `security,sre` (development identity mode).
    #[arg(
        long,
        env = "COUNTERSIGN_GROUPS",
        value_name = "GROUPS",
        value_delimiter = ','
    )]
    pub groups: Vec<String>,
    /// A file holding your bearer token (a JWT or a static API token), sent as
    /// `authorization: Bearer`. Or put the token itself in COUNTERSIGN_TOKEN.
    #[arg(long, env = "COUNTERSIGN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s), PEM, that signed the server's certificate; needed for https://.
    #[arg(long, env = "COUNTERSIGN_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Your client certificate, PEM (mTLS); needs --client-key and https://.
    #[arg(long, env = "COUNTERSIGN_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert, PEM.
    #[arg(long, env = "COUNTERSIGN_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// Print JSON for scripts: one object per line, no decoration.
    #[arg(long)]
    pub json: bool,
    /// How long a single request (or connecting) may take, e.g. `10s`, `1m`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The action's id (a UUID).
    #[arg(value_name = "ACTION_ID")]
    pub id: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct VoteArgs {
    /// The action's id (a UUID).
    #[arg(value_name = "ACTION_ID")]
    pub id: String,
    /// Why: recorded in the log for the auditors.
    #[arg(long, value_name = "TEXT", value_parser = NonEmptyStringValueParser::new())]
    pub reason: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only actions in this status.
    #[arg(long, value_enum)]
    pub status: Option<StatusFilter>,
    /// Only actions of this requester principal id.
    #[arg(long, value_name = "PRINCIPAL")]
    pub requester: Option<String>,
    /// Only actions of this type, e.g. `iam.role.grant`.
    #[arg(long = "type", value_name = "TYPE")]
    pub action_type: Option<String>,
    /// At most this many actions (pages are fetched until then).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The statuses `list --status` accepts, as the server names them.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Pending,
    Allowed,
    Denied,
    Approved,
    Rejected,
    Expired,
    Cancelled,
}

impl StatusFilter {
    fn to_proto(self) -> proto::ActionStatus {
        match self {
            StatusFilter::Pending => proto::ActionStatus::Pending,
            StatusFilter::Allowed => proto::ActionStatus::Allowed,
            StatusFilter::Denied => proto::ActionStatus::Denied,
            StatusFilter::Approved => proto::ActionStatus::Approved,
            StatusFilter::Rejected => proto::ActionStatus::Rejected,
            StatusFilter::Expired => proto::ActionStatus::Expired,
            StatusFilter::Cancelled => proto::ActionStatus::Cancelled,
        }
    }
}

/// Runs one `review` command to completion and says how it went.
pub fn run(args: ReviewArgs) -> ExitCode {
    // One thread is plenty for one reviewer, and keeps Ctrl-C handling simple.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(&CliError::Other(format!("cannot start: {e}"))),
    };
    let result = runtime.block_on(async move {
        match args.command {
            ReviewCommand::Watch(args) => watch::run(&args.common).await,
            ReviewCommand::Show(args) => commands::show(&args).await,
            ReviewCommand::Approve(args) => commands::vote(&args, proto::Verdict::Approve).await,
            ReviewCommand::Reject(args) => commands::vote(&args, proto::Verdict::Reject).await,
            ReviewCommand::List(args) => commands::list(&args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// Prints the one line a reviewer reads when something went wrong, and picks the exit code.
fn report(error: &CliError) -> ExitCode {
    // Whoever closed our stdout (`| head`) has what they wanted; nothing left to say.
    if let CliError::Output(e) = error
        && e.kind() == io::ErrorKind::BrokenPipe
    {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(io::stderr(), "countersign: {error}");
    ExitCode::from(error.exit_code())
}

/// Everything that can end a `review` command early.
#[derive(Debug)]
pub enum CliError {
    /// The server answered with a status; its message is written for people.
    Status(Status),
    /// The command line cannot work as given (bad URL, unusable identity).
    Usage(String),
    /// The server could not be reached.
    Connect {
        server: String,
        detail: String,
    },
    /// A request took longer than `--timeout`.
    TimedOut(Duration),
    /// The server answered something this client cannot use safely.
    BadAnswer(String),
    /// Writing to stdout failed.
    Output(io::Error),
    Other(String),
}

impl CliError {
    /// 1 when the server refused the request as asked, 2 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Status(status) if is_refusal(status.code()) => 1,
            _ => 2,
        }
    }
}

/// Codes that mean "the server understood and said no": retrying the same call won't help.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::InvalidArgument
            | Code::AlreadyExists
    )
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Status(status) => {
                let code = code_words(status.code());
                let mut message = one_line(status.message());
                // A failure on our side of the connection (e.g. the server's TLS alert
                // after the handshake) says "transport error"; the cause is in the source.
                let mut cause = std::error::Error::source(status);
                while let Some(error) = cause {
                    let text = one_line(&error.to_string());
                    if !message.contains(&text) {
                        message = format!("{message}: {text}");
                    }
                    cause = error.source();
                }
                if message.is_empty() {
                    write!(f, "{code}")
                } else {
                    write!(f, "{code}: {message}")
                }
            }
            CliError::Usage(message) => write!(f, "{message}"),
            CliError::Connect { server, detail } => {
                write!(f, "cannot reach the server at {server}: {detail}")
            }
            CliError::TimedOut(after) => write!(
                f,
                "deadline exceeded: no answer within {} (raise --timeout?)",
                humantime::format_duration(*after)
            ),
            CliError::BadAnswer(message) => {
                write!(f, "unexpected answer from the server: {message}")
            }
            CliError::Output(e) => write!(f, "cannot write output: {e}"),
            CliError::Other(message) => write!(f, "{message}"),
        }
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Status(status)
    }
}

impl From<io::Error> for CliError {
    fn from(error: io::Error) -> Self {
        CliError::Output(error)
    }
}

/// A gRPC code as lower-case words, the way a person would say it.
fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Server text on one line, with control characters made visible (see [`text::clean`]).
fn one_line(message: &str) -> String {
    text::clean(&message.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A notice on stderr for the person; a failure to write it is not worth failing over.
fn note(text: &str) {
    let _ = io::stderr().write_all(text.as_bytes());
}

/// Writes to stdout, so a closed pipe is an error we handle rather than a panic.
fn print(out: &str) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_exit_1_and_everything_else_exits_2() {
        let refused = CliError::Status(Status::permission_denied("no"));
        assert_eq!(refused.exit_code(), 1);
        assert_eq!(
            CliError::Status(Status::failed_precondition("x")).exit_code(),
            1
        );
        assert_eq!(CliError::Status(Status::unavailable("x")).exit_code(), 2);
        assert_eq!(
            CliError::Status(Status::unauthenticated("x")).exit_code(),
            2
        );
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
    }

    #[test]
    fn a_status_reads_as_code_words_then_the_message_on_one_line() {
        let error = CliError::Status(Status::permission_denied(
            "alice requested this action\nand cannot review it",
        ));
        assert_eq!(
            error.to_string(),
            "permission denied: alice requested this action and cannot review it"
        );
        assert_eq!(
            CliError::Status(Status::unavailable("")).to_string(),
            "unavailable"
        );
    }
}
