//! `countersign trial-certs`: a throwaway CA and certificates to try TLS and mTLS in a few
//! minutes, with the configuration that uses them.
//!
//! **For trials only.** The CA's private key is written next to the certificates, so
//! whoever can read the directory can mint any identity; everything is valid for
//! [`VALIDITY_DAYS`] days. Production certificates come from the operator's own PKI (SPIRE,
//! cert-manager, a corporate CA).
//!
//! What is written (keys mode 0600, nothing ever overwritten): `ca.pem`/`ca-key.pem`, a
//! server certificate for `localhost`, `127.0.0.1` and `::1` (`server.pem`/
//! `server-key.pem`), an agent with the SPIFFE ID `spiffe://<trust domain>/agent/<agent>`
//! and a human reviewer with `spiffe://<trust domain>/human/<reviewer>`, each as
//! `<name>.pem`/`<name>-key.pem`. All keys are ECDSA P-256.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::auth::credentials::normalize_groups;

/// How long trial certificates are valid.
pub const VALIDITY_DAYS: i64 = 30;

/// What `trial-certs` was asked for.
#[derive(Debug, Clone)]
pub struct TrialOptions {
    pub dir: PathBuf,
    /// The SPIFFE trust domain of the client identities, e.g. `example.org`.
    pub trust_domain: String,
    /// The agent's name: its principal and the last segment of its SPIFFE ID.
    pub agent: String,
    pub agent_groups: Vec<String>,
    /// The human reviewer's name.
    pub reviewer: String,
    pub reviewer_groups: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "refusing to overwrite {}: remove the old trial files or choose another --dir",
        .0.display()
    )]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What was written, and the configuration that uses it.
#[derive(Debug)]
pub struct TrialCerts {
    pub files: Vec<PathBuf>,
    /// `[tls]` and `[auth.mtls]` for a config file, with a comment on how to call.
    pub config: String,
}

/// One file to write: its name, contents, and whether it is a private key.
struct Output {
    name: String,
    contents: String,
    secret: bool,
}

/// Generates everything in memory, then writes it; see the module documentation.
pub fn write(options: &TrialOptions) -> Result<TrialCerts, TrialError> {
    let dir = std::path::absolute(&options.dir)
        .map_err(|e| TrialError::Usage(format!("--dir {}: {e}", options.dir.display())))?;
    let dir_text = dir
        .to_str()
        .filter(|d| !d.chars().any(char::is_control))
        .ok_or_else(|| {
            TrialError::Usage(format!(
                "--dir {}: use a path of printable UTF-8 characters, it is written into a config file",
                dir.display()
            ))
        })?
        .to_string();
    check_trust_domain(&options.trust_domain)?;
    for (flag, name) in [
        ("--agent", &options.agent),
        ("--reviewer", &options.reviewer),
    ] {
        check_name(flag, name)?;
    }
    if options.agent == options.reviewer {
        return Err(TrialError::Usage(
            "--agent and --reviewer must differ: one certificate each".into(),
        ));
    }
    let agent_groups =
        normalize_groups(&options.agent_groups, "--agent-groups").map_err(TrialError::Usage)?;
    let reviewer_groups = normalize_groups(&options.reviewer_groups, "--reviewer-groups")
        .map_err(TrialError::Usage)?;

    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind.
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(VALIDITY_DAYS);
    let dated = |mut params: CertificateParams| {
        params.not_before = not_before;
        params.not_after = not_after;
        params
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = dated(CertificateParams::default());
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        "countersign trial CA (not for production)",
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let leaf = |common_name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate()?;
        let mut params = dated(CertificateParams::default());
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
    };
    let server = leaf(
        "countersign trial server",
        vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let agent_id = format!("spiffe://{}/agent/{}", options.trust_domain, options.agent);
    let agent = leaf(
        &options.agent,
        vec![SanType::URI(agent_id.as_str().try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let reviewer_id = format!(
        "spiffe://{}/human/{}",
        options.trust_domain, options.reviewer
    );
    let reviewer = leaf(
        &options.reviewer,
        vec![SanType::URI(reviewer_id.as_str().try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let mut outputs = vec![
        output("ca.pem", ca_cert.pem(), false),
        output("ca-key.pem", ca_key.serialize_pem(), true),
    ];
    for (name, (cert, key)) in [
        ("server", server),
        (options.agent.as_str(), agent),
        (options.reviewer.as_str(), reviewer),
    ] {
        outputs.push(output(&format!("{name}.pem"), cert, false));
        outputs.push(output(&format!("{name}-key.pem"), key, true));
    }
    let files = write_all(&dir, &outputs)?;

    let path = |name: &str| quoted(&format!("{dir_text}/{name}"));
    let groups = |groups: &[String]| {
        let quoted: Vec<String> = groups.iter().map(|g| quoted(g)).collect();
        format!("[{}]", quoted.join(", "))
    };
    let config = format!(
        r#"# Trial certificates in {dir_text}, valid until {until}.
# FOR TRIALS ONLY: the CA key is in the same directory, and whoever can read it can
# mint any identity. Add this to the countersign config file:

[tls]
cert = {server_cert}
key = {server_key}

[auth.mtls]
client_ca = {ca}

[[auth.mtls.identities]]
san = {agent_san}
principal = {agent_principal}
kind = "agent"
groups = {agent_groups}

[[auth.mtls.identities]]
san = {reviewer_san}
principal = {reviewer_principal}
kind = "human"
groups = {reviewer_groups}

# Then, with `countersign serve --config FILE` running, as the reviewer:
#   countersign review list --server https://127.0.0.1:50051 --ca-cert {dir_text}/ca.pem \
#     --client-cert {dir_text}/{reviewer}.pem --client-key {dir_text}/{reviewer}-key.pem
"#,
        until = not_after.date(),
        server_cert = path("server.pem"),
        server_key = path("server-key.pem"),
        ca = path("ca.pem"),
        agent_san = quoted(&agent_id),
        agent_principal = quoted(&options.agent),
        agent_groups = groups(&agent_groups),
        reviewer_san = quoted(&reviewer_id),
        reviewer_principal = quoted(&options.reviewer),
        reviewer_groups = groups(&reviewer_groups),
        reviewer = options.reviewer,
    );
    Ok(TrialCerts { files, config })
}

fn output(name: &str, contents: String, secret: bool) -> Output {
    Output {
        name: name.to_string(),
        contents,
        secret,
    }
}

/// A TOML basic string.
fn quoted(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}

/// Creates the directory if needed, refuses if any file exists, then writes each file
/// with `create_new` (so a file appearing meanwhile is not overwritten either).
fn write_all(dir: &Path, outputs: &[Output]) -> Result<Vec<PathBuf>, TrialError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TrialError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let paths: Vec<PathBuf> = outputs.iter().map(|o| dir.join(&o.name)).collect();
    if let Some(existing) = paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        return Err(TrialError::Exists(existing.clone()));
    }
    for (path, output) in paths.iter().zip(outputs) {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(
            &mut options,
            if output.secret { 0o600 } else { 0o644 },
        );
        let written = options.open(path).and_then(|mut file| {
            file.write_all(output.contents.as_bytes())?;
            file.sync_all()
        });
        written.map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => TrialError::Exists(path.clone()),
            _ => TrialError::Write {
                path: path.clone(),
                source,
            },
        })?;
    }
    Ok(paths)
}

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-`, `_`.
fn check_trust_domain(domain: &str) -> Result<(), TrialError> {
    let ok = !domain.is_empty()
        && domain.len() <= 255
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(TrialError::Usage(format!(
            "--spiffe-trust-domain `{}`: use lower-case letters, digits, `.`, `-` and `_`, e.g. example.org",
            domain.escape_default()
        )))
    }
}

/// A principal that is also a SPIFFE path segment and a file name.
fn check_name(flag: &str, name: &str) -> Result<(), TrialError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
        && !name.starts_with('.')
        && !["ca", "server"].contains(&name);
    if ok {
        Ok(())
    } else {
        Err(TrialError::Usage(format!(
            "{flag} `{}`: use 1..64 letters, digits, `.`, `-` and `_` (not starting with `.`, not `ca` or `server`)",
            name.escape_default()
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Options for a trial in `dir`; also used by `config`'s test of the printed config.
    pub(crate) fn options(dir: &Path) -> TrialOptions {
        TrialOptions {
            dir: dir.to_path_buf(),
            trust_domain: "example.org".into(),
            agent: "deployer".into(),
            agent_groups: vec!["deployers".into()],
            reviewer: "alice".into(),
            reviewer_groups: vec!["security".into()],
        }
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private_and_nothing_is_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let written = write(&options(dir.path())).unwrap();
        for file in &written.files {
            let mode = file.metadata().unwrap().permissions().mode() & 0o777;
            let name = file.file_name().unwrap().to_string_lossy();
            if name.ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{name}");
            }
        }
        let before = std::fs::read(dir.path().join("ca-key.pem")).unwrap();
        let err = write(&options(dir.path())).unwrap_err();
        assert!(matches!(err, TrialError::Exists(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("ca-key.pem")).unwrap(),
            before
        );
    }

    #[test]
    fn odd_names_and_trust_domains_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = Vec::new();
        for (field, value) in [
            ("trust_domain", "Example.org"),
            ("trust_domain", "example.org/x"),
            ("agent", "../evil"),
            ("agent", "ca"),
            ("reviewer", "has space"),
            ("reviewer", "deployer"),
        ] {
            let mut o = options(dir.path());
            match field {
                "trust_domain" => o.trust_domain = value.into(),
                "agent" => o.agent = value.into(),
                _ => o.reviewer = value.into(),
            }
            bad.push(o);
        }
        let mut o = options(dir.path());
        o.reviewer_groups = vec!["bad group".into()];
        bad.push(o);
        for o in bad {
            let err = write(&o).unwrap_err();
            assert!(matches!(err, TrialError::Usage(_)), "{o:?}: {err}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
