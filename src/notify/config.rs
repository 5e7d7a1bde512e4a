//! `[slack]`, `[teams]` and `[[webhooks]]`: where notifications go, and the secrets they
//! need.
//!
//! Secrets (the Slack bot token and signing secret, the Teams webhook URL, which is a
//! credential, and each webhook's signing key) are never in the file: each comes from a
//! file (`*_file`, relative to the config file) or an environment variable (`*_env`),
//! exactly one of the two, read once at start. Only where a secret lives is configured or
//! printed; [`Secret`] has no `Display` and its `Debug` is `<redacted>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::RiskLevel;

/// Slack's Web API, unless `[slack] api_base` says otherwise (tests point it at a local
/// server).
pub const DEFAULT_SLACK_API: &str = "https://slack.com/api";

/// Secret files larger than this are not secrets; refused before they are read.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// All notification channels; empty: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifySettings {
    pub slack: Option<SlackSettings>,
    pub teams: Option<TeamsSettings>,
    pub webhooks: Vec<WebhookSettings>,
}

impl NotifySettings {
    pub fn is_empty(&self) -> bool {
        self.slack.is_none() && self.teams.is_none() && self.webhooks.is_empty()
    }
}

/// Where a secret is read from at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// A secret's value. Not `Display`; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A secret that cannot be read. Names where it was looked for, never what was found.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{what}: cannot read {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {} is larger than 64 KiB; it is not a secret", path.display())]
    TooLarge { what: &'static str, path: PathBuf },
    #[error("{what}: the environment variable {name} is not set (or not UTF-8)")]
    Env { what: &'static str, name: String },
    #[error("{what}: {place} is empty")]
    Empty { what: &'static str, place: String },
}

impl SecretSource {
    /// Reads the secret; surrounding whitespace (a file's trailing newline) is dropped.
    pub fn load(&self, what: &'static str) -> Result<Secret, SecretError> {
        let (value, place) = match self {
            SecretSource::File(path) => {
                let read = |source| SecretError::Read {
                    what,
                    path: path.clone(),
                    source,
                };
                let size = std::fs::metadata(path).map_err(read)?.len();
                if size > MAX_SECRET_FILE_BYTES {
                    return Err(SecretError::TooLarge {
                        what,
                        path: path.clone(),
                    });
                }
                (
                    std::fs::read_to_string(path).map_err(read)?,
                    path.display().to_string(),
                )
            }
            SecretSource::Env(name) => (
                std::env::var(name).map_err(|_| SecretError::Env {
                    what,
                    name: name.clone(),
                })?,
                format!("the environment variable {name}"),
            ),
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(SecretError::Empty { what, place });
        }
        Ok(Secret(value.to_string()))
    }
}

/// `[slack]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackSection {
    /// The bot token (`xoxb-…`) with the `chat:write` scope.
    pub bot_token_file: Option<PathBuf>,
    pub bot_token_env: Option<String>,
    /// The app's signing secret; needed with `interactivity_listen`.
    pub signing_secret_file: Option<PathBuf>,
    pub signing_secret_env: Option<String>,
    /// Default `https://slack.com/api`.
    pub api_base: Option<String>,
    /// Channel id (`C…`) for pending actions no route matches.
    pub default_channel: String,
    #[serde(default)]
    pub routes: Vec<SlackRoute>,
    #[serde(default)]
    pub users: Vec<SlackUser>,
    /// Where Slack's interactivity requests (button clicks, the reason modal) arrive.
    /// Absent: messages carry no buttons. Beyond loopback only with `[tls]`.
    pub interactivity_listen: Option<SocketAddr>,
    /// When set, requests from any other Slack workspace are refused.
    pub team_id: Option<String>,
}

/// `[[slack.routes]]`: the first route that matches a pending action names its channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackRoute {
    pub channel: String,
    /// Matches when one of the action's reviewer groups is listed. Empty: any.
    #[serde(default)]
    pub reviewer_groups: Vec<String>,
    /// Matches actions of at least this risk. Absent: any.
    pub min_risk: Option<RiskLevel>,
}

/// `[[slack.users]]`: who a Slack user is to countersign. Unlisted users cannot review.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackUser {
    /// Slack's member id (`U…`), not the display name, which users can change.
    pub slack_user_id: String,
    pub principal: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `[teams]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamsSection {
    /// The incoming webhook's URL: it is the credential, so it comes from a file or env.
    pub webhook_url_file: Option<PathBuf>,
    pub webhook_url_env: Option<String>,
    /// The card's review link; `{action_id}` is replaced. Absent: the card shows the
    /// reviewer CLI command instead.
    pub review_url_template: Option<String>,
}

/// `[[webhooks]]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// Names the delivery cursor (`notify-webhook:<name>`) and the logs.
    pub name: String,
    pub url: String,
    /// The HMAC key deliveries are signed with.
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackSettings {
    pub bot_token: SecretSource,
    pub signing_secret: Option<SecretSource>,
    pub api_base: String,
    pub default_channel: String,
    pub routes: Vec<SlackRoute>,
    pub users: Vec<SlackUser>,
    pub interactivity_listen: Option<SocketAddr>,
    pub team_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamsSettings {
    pub webhook_url: SecretSource,
    pub review_url_template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub name: String,
    pub url: String,
    pub secret: SecretSource,
}

/// Why the notification sections cannot be used; each message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyConfigError {
    #[error("{field}_env: must name a variable")]
    EmptyEnvName { field: &'static str },
    #[error("give {field}_file or {field}_env, not both")]
    TwoSources { field: &'static str },
    #[error("{field}_file or {field}_env is required")]
    NoSource { field: &'static str },
    #[error("{field}: `{url}` is not an http(s) URL")]
    NotHttpUrl { field: &'static str, url: String },
    #[error(
        "slack.interactivity_listen: requests are authenticated by Slack's signature: set slack.signing_secret_file or slack.signing_secret_env"
    )]
    InteractivityWithoutSigningSecret,
    #[error("slack.default_channel: must name a channel id")]
    NoDefaultChannel,
    #[error("slack.users: slack_user_id and principal must not be empty")]
    EmptySlackUser,
    /// A `slack.users` entry's groups break the rules for group names.
    #[error("{0}")]
    SlackUserGroups(String),
    #[error("slack.users: {0} is listed twice")]
    SlackUserTwice(String),
    #[error("webhooks.name: `{0}` must be 1 to 64 letters, digits, `-`, `_` or `.`")]
    WebhookName(String),
    #[error("webhooks.name: `{0}` is used twice")]
    WebhookNameTwice(String),
}

/// Exactly one of a file and an environment variable.
fn source(
    field: &'static str,
    file: Option<PathBuf>,
    env: Option<String>,
    dir: &Path,
) -> Result<Option<SecretSource>, NotifyConfigError> {
    match (file, env) {
        (Some(file), None) => Ok(Some(SecretSource::File(dir.join(file)))),
        (None, Some(env)) if !env.trim().is_empty() => Ok(Some(SecretSource::Env(env))),
        (None, Some(_)) => Err(NotifyConfigError::EmptyEnvName { field }),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(NotifyConfigError::TwoSources { field }),
    }
}

fn required(
    field: &'static str,
    file: Option<PathBuf>,
    env: Option<String>,
    dir: &Path,
) -> Result<SecretSource, NotifyConfigError> {
    source(field, file, env, dir)?.ok_or(NotifyConfigError::NoSource { field })
}

fn http_url(field: &'static str, url: &str) -> Result<String, NotifyConfigError> {
    let url = url.trim().trim_end_matches('/');
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(url.to_string())
    } else {
        Err(NotifyConfigError::NotHttpUrl {
            field,
            url: url.to_string(),
        })
    }
}

/// Resolves the sections of a config file in `dir`; the error names the field.
pub fn resolve(
    slack: Option<SlackSection>,
    teams: Option<TeamsSection>,
    webhooks: Vec<WebhookSection>,
    dir: &Path,
) -> Result<NotifySettings, NotifyConfigError> {
    let slack = slack
        .map(|s| -> Result<SlackSettings, NotifyConfigError> {
            let signing_secret = source(
                "slack.signing_secret",
                s.signing_secret_file,
                s.signing_secret_env,
                dir,
            )?;
            if s.interactivity_listen.is_some() && signing_secret.is_none() {
                return Err(NotifyConfigError::InteractivityWithoutSigningSecret);
            }
            if s.default_channel.trim().is_empty() {
                return Err(NotifyConfigError::NoDefaultChannel);
            }
            let mut seen = std::collections::HashSet::new();
            for user in &s.users {
                if user.slack_user_id.trim().is_empty() || user.principal.trim().is_empty() {
                    return Err(NotifyConfigError::EmptySlackUser);
                }
                crate::auth::credentials::normalize_groups(&user.groups, "slack.users.groups")
                    .map_err(NotifyConfigError::SlackUserGroups)?;
                if !seen.insert(user.slack_user_id.as_str()) {
                    return Err(NotifyConfigError::SlackUserTwice(
                        user.slack_user_id.clone(),
                    ));
                }
            }
            Ok(SlackSettings {
                bot_token: required("slack.bot_token", s.bot_token_file, s.bot_token_env, dir)?,
                signing_secret,
                api_base: http_url(
                    "slack.api_base",
                    s.api_base.as_deref().unwrap_or(DEFAULT_SLACK_API),
                )?,
                default_channel: s.default_channel,
                routes: s.routes,
                users: s.users,
                interactivity_listen: s.interactivity_listen,
                team_id: s.team_id,
            })
        })
        .transpose()?;
    let teams = teams
        .map(|t| -> Result<TeamsSettings, NotifyConfigError> {
            Ok(TeamsSettings {
                webhook_url: required(
                    "teams.webhook_url",
                    t.webhook_url_file,
                    t.webhook_url_env,
                    dir,
                )?,
                review_url_template: t.review_url_template,
            })
        })
        .transpose()?;
    let mut names = std::collections::HashSet::new();
    let webhooks = webhooks
        .into_iter()
        .map(|w| -> Result<WebhookSettings, NotifyConfigError> {
            let valid_name = !w.name.is_empty()
                && w.name.len() <= 64
                && w.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid_name {
                return Err(NotifyConfigError::WebhookName(w.name));
            }
            if !names.insert(w.name.clone()) {
                return Err(NotifyConfigError::WebhookNameTwice(w.name));
            }
            Ok(WebhookSettings {
                url: http_url("webhooks.url", &w.url)?,
                secret: required("webhooks.secret", w.secret_file, w.secret_env, dir)?,
                name: w.name,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NotifySettings {
        slack,
        teams,
        webhooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        slack: Option<SlackSection>,
        teams: Option<TeamsSection>,
        #[serde(default)]
        webhooks: Vec<WebhookSection>,
    }

    /// The file's text resolved; the error is what an operator would read, whether TOML
    /// or [`resolve`] refused it.
    fn parse(text: &str) -> Result<NotifySettings, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        resolve(file.slack, file.teams, file.webhooks, Path::new("/etc/cs"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn secrets_come_from_exactly_one_of_a_file_and_a_variable() {
        let ok = parse(
            "[[webhooks]]\nname = \"siem\"\nurl = \"https://siem.example.com/hook/\"\nsecret_file = \"hook.key\"",
        )
        .unwrap();
        assert_eq!(
            ok.webhooks[0].secret,
            SecretSource::File("/etc/cs/hook.key".into())
        );
        assert_eq!(ok.webhooks[0].url, "https://siem.example.com/hook");
        let both = parse(
            "[[webhooks]]\nname = \"a\"\nurl = \"https://x\"\nsecret_file = \"k\"\nsecret_env = \"K\"",
        )
        .unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let none = parse("[[webhooks]]\nname = \"a\"\nurl = \"https://x\"").unwrap_err();
        assert!(
            none.contains("webhooks.secret_file or webhooks.secret_env"),
            "{none}"
        );
        assert!(
            parse("[[webhooks]]\nname = \"a\"\nurl = \"https://x\"\nsecret = \"inline\"").is_err()
        );
    }

    #[test]
    fn interactivity_needs_the_signing_secret_and_users_are_listed_once() {
        let base = "[slack]\nbot_token_env = \"SLACK_BOT_TOKEN\"\ndefault_channel = \"C1\"\n";
        let err = parse(&format!("{base}interactivity_listen = \"127.0.0.1:3000\"")).unwrap_err();
        assert!(err.contains("signing_secret"), "{err}");
        let twice = format!(
            "{base}[[slack.users]]\nslack_user_id = \"U1\"\nprincipal = \"bob\"\n[[slack.users]]\nslack_user_id = \"U1\"\nprincipal = \"eve\""
        );
        assert!(parse(&twice).unwrap_err().contains("twice"));
        let slack = parse(base).unwrap().slack.unwrap();
        assert_eq!(slack.api_base, DEFAULT_SLACK_API);
        assert_eq!(slack.bot_token, SecretSource::Env("SLACK_BOT_TOKEN".into()));
    }

    #[test]
    fn secrets_are_trimmed_and_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "xoxb-very-secret\n").unwrap();
        let secret = SecretSource::File(path).load("slack.bot_token").unwrap();
        assert_eq!(secret.expose(), "xoxb-very-secret");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = SecretSource::File(empty).load("x").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
