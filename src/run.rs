//! `latchkey run`: the environment a wrapped command gets (proxy, CA bundle and `NO_PROXY`
//! variables), starting it, passing signals on, and turning how it ended into an exit code.
//! `run::contain` puts the command in a network namespace whose only way out is latchkey.
//!
//! This module never issues or revokes tokens (cli does, around it) and never logs the proxy
//! URL: it carries the agent's token.

pub mod contain;

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitCode, ExitStatus};

/// Variables that name a CA bundle file, each with the clients that read it. `run` points
/// every one of them at latchkey's bundle, overriding inherited values: a client that kept an
/// inherited bundle would refuse latchkey's certificates (or, worse, be pointed by a hostile
/// environment at a bundle that trusts someone else's interception).
pub const CA_BUNDLE_VARS: &[(&str, &str)] = &[
    (
        "SSL_CERT_FILE",
        "OpenSSL's default: Python ssl/urllib/aiohttp/httpx, Ruby, Go, uv, PHP",
    ),
    ("REQUESTS_CA_BUNDLE", "Python requests, pip, poetry"),
    ("CURL_CA_BUNDLE", "curl, Python requests"),
    (
        "NODE_EXTRA_CA_CERTS",
        "Node.js and Bun (added to their own roots)",
    ),
    (
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "gRPC core: grpcio, Ruby and PHP gRPC",
    ),
    ("NPM_CONFIG_CAFILE", "npm"),
    (
        "npm_config_cafile",
        "npm (the lower-case spelling npm also reads)",
    ),
    ("PIP_CERT", "pip"),
    ("AWS_CA_BUNDLE", "AWS CLI and SDKs"),
    ("DENO_CERT", "Deno"),
    ("CARGO_HTTP_CAINFO", "cargo"),
    ("GIT_SSL_CAINFO", "git"),
    ("HTTPLIB2_CA_CERTS", "httplib2 (google-api-python-client)"),
    ("CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE", "gcloud"),
    ("BUNDLE_SSL_CA_CERT", "Ruby bundler"),
    ("NIX_SSL_CERT_FILE", "OpenSSL, curl and git as built by Nix"),
];

/// Proxy variables, both spellings: curl reads only lower-case `http_proxy`, Python and Node
/// prefer the lower-case ones when both are set, Go reads either.
pub const PROXY_VARS: &[&str] = &[
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "https_proxy",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Hosts every client reaches directly: the machine (or, under `--contain`, the namespace)
/// itself. Listed first in the merged `NO_PROXY`.
const LOOPBACK_NO_PROXY: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// The merged `NO_PROXY`: latchkey's loopback entries, then the inherited entries of
/// `NO_PROXY` and `no_proxy` in order, each once (compared case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoProxy {
    /// The comma-separated value both spellings get.
    pub value: String,
    /// Inherited entries that are not loopback: clients reach these hosts directly, around
    /// latchkey and its audit log (under `--contain` such connections fail).
    pub bypassing: Vec<String>,
}

impl NoProxy {
    /// Merge latchkey's loopback entries with inherited values (`NO_PROXY`, `no_proxy`).
    pub fn merge<'a>(inherited: impl IntoIterator<Item = &'a str>) -> NoProxy {
        let mut entries: Vec<String> = LOOPBACK_NO_PROXY.iter().map(|s| s.to_string()).collect();
        let mut bypassing = Vec::new();
        for value in inherited {
            for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                if entries.iter().any(|e| e.eq_ignore_ascii_case(entry)) {
                    continue;
                }
                entries.push(entry.to_owned());
                bypassing.push(entry.to_owned());
            }
        }
        NoProxy {
            value: entries.join(","),
            bypassing,
        }
    }

    /// The note `run` prints when inherited entries go around latchkey, if any.
    pub fn note(&self, contain: bool) -> Option<String> {
        if self.bypassing.is_empty() {
            return None;
        }
        let what = if self.bypassing.iter().any(|e| e == "*") {
            "NO_PROXY=* sends clients to every host directly".to_owned()
        } else {
            format!(
                "the inherited NO_PROXY keeps {}: clients reach {} directly",
                self.bypassing.join(","),
                if self.bypassing.len() == 1 {
                    "it"
                } else {
                    "them"
                }
            )
        };
        let under_contain = if contain {
            " (under --contain they cannot: such connections fail)"
        } else {
            ""
        };
        Some(format!(
            "latchkey run: note: {what}, around latchkey and its audit log{under_contain}"
        ))
    }
}

/// Everything a wrapped command is given, but the proxy URL (which differs between a plain
/// and a contained run).
#[derive(Debug, Clone)]
pub struct AgentEnv {
    vars: Vec<(&'static str, OsString)>,
    removed: &'static [&'static str],
}

/// The access key id `latchkey run` gives AWS clients: they sign with placeholder keys and
/// latchkey signs again with the real ones (the `aws_sigv4` credential kind).
pub const AWS_PLACEHOLDER_KEY_ID: &str = "latchkey";
/// The placeholder secret access key (not a secret: every agent gets the same one).
pub const AWS_PLACEHOLDER_SECRET: &str = "latchkey-placeholder-secret-not-a-real-key";

/// The user's AWS session token and profile are removed, so an AWS client signs with the
/// placeholder keys only and never carries a real credential of the user's.
const AWS_REMOVED: &[&str] = &["AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"];

impl AgentEnv {
    /// The CA bundle variables (all pointing at `bundle`), the merged `NO_PROXY`,
    /// `NODE_USE_ENV_PROXY=1`, `LATCHKEY_SESSION` and placeholder AWS keys.
    pub fn new(bundle: &Path, no_proxy: &NoProxy, session: &str) -> AgentEnv {
        let mut vars: Vec<(&'static str, OsString)> = CA_BUNDLE_VARS
            .iter()
            .map(|(name, _)| (*name, bundle.as_os_str().to_owned()))
            .collect();
        for name in ["NO_PROXY", "no_proxy"] {
            vars.push((name, no_proxy.value.clone().into()));
        }
        // Node >= 24.0 (fetch) / 24.5 (http, https) and >= 22.21 read the proxy variables
        // only when this is set; older Node ignores it (see README "Clients").
        vars.push(("NODE_USE_ENV_PROXY", "1".into()));
        vars.push(("LATCHKEY_SESSION", session.into()));
        vars.push(("AWS_ACCESS_KEY_ID", AWS_PLACEHOLDER_KEY_ID.into()));
        vars.push(("AWS_SECRET_ACCESS_KEY", AWS_PLACEHOLDER_SECRET.into()));
        AgentEnv {
            vars,
            removed: AWS_REMOVED,
        }
    }

    /// Set every variable on `cmd`, overriding inherited values, and remove the user's AWS
    /// session token and profile.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        for (name, value) in &self.vars {
            cmd.env(name, value);
        }
        for name in self.removed {
            cmd.env_remove(name);
        }
    }
}

/// Point every proxy variable of `cmd` at `proxy_url` (`http://agent:TOKEN@host:port`).
pub fn apply_proxy(cmd: &mut tokio::process::Command, proxy_url: &str) {
    for var in PROXY_VARS {
        cmd.env(var, proxy_url);
    }
}

/// Why a wrapped command could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command could not be started (not found, not executable).
    #[error("cannot start {program}")]
    Spawn {
        /// The program, as given.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the command or installing the signal handlers failed.
    #[error("cannot wait for {program}")]
    Wait {
        /// The program, as given.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--contain` could not build or enter the network namespace.
    #[error(transparent)]
    Contain(#[from] contain::ContainError),
}

/// Start `command` with `env` and the proxy at `proxy_url`, wait for it while passing signals on.
pub async fn run_plain(
    command: &[OsString],
    env: &AgentEnv,
    proxy_url: &str,
) -> Result<ExitStatus, RunError> {
    let program = command[0].to_string_lossy().into_owned();
    let wait_err = |program: &str| {
        let program = program.to_owned();
        move |source| RunError::Wait { program, source }
    };
    let signals = SignalForwarder::install().map_err(wait_err(&program))?;
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    env.apply(&mut cmd);
    apply_proxy(&mut cmd, proxy_url);
    let child = cmd.spawn().map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    signals.wait(child).await.map_err(wait_err(&program))
}

/// Passes SIGTERM, SIGHUP and SIGQUIT sent to latchkey on to the child; survives SIGINT, which a
/// terminal already sends to the whole foreground group. Installed *before* the child is
/// spawned: a signal that arrives once the child runs must reach it, never kill latchkey
/// with its default action and leave the child behind.
pub struct SignalForwarder {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl SignalForwarder {
    /// Take over the four signals for this process.
    pub fn install() -> std::io::Result<SignalForwarder> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(SignalForwarder {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Wait for `child`, passing the signals on.
    pub async fn wait(mut self, mut child: tokio::process::Child) -> std::io::Result<ExitStatus> {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        loop {
            let sig = tokio::select! {
                status = child.wait() => return status,
                _ = self.term.recv() => Signal::SIGTERM,
                _ = self.hup.recv() => Signal::SIGHUP,
                _ = self.quit.recv() => Signal::SIGQUIT,
                _ = self.int.recv() => continue,
            };
            if let Some(pid) = pid {
                let _ = kill(pid, sig);
            }
        }
    }
}

/// The exit code that reports `status`: the command's own code, 128 + the signal that killed
/// it (as shells report it), else 1.
pub fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// System roots plus latchkey's CA, as one PEM bundle for tools that take a single file. The
/// system roots are there because most of the variables above *replace* a client's trust
/// store: a bundle of latchkey's CA alone would break every host latchkey does not intercept
/// (`NO_PROXY` hosts, package mirrors reached directly).
pub fn ca_bundle(latchkey_ca: &str) -> String {
    let mut out = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        out.push_str(&crate::tls::pem::encode_certificate(&cert));
    }
    out.push_str(latchkey_ca);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_keeps_inherited_entries_after_loopback_once_each() {
        let merged = NoProxy::merge(["foo.internal, LOCALHOST,,.corp", "foo.internal,bar"]);
        assert_eq!(
            merged.value,
            "localhost,127.0.0.1,::1,foo.internal,.corp,bar"
        );
        assert_eq!(merged.bypassing, ["foo.internal", ".corp", "bar"]);
    }

    #[test]
    fn no_proxy_note_names_the_bypassing_entries_and_the_wildcard() {
        assert_eq!(NoProxy::merge(["localhost"]).note(false), None);
        let note = NoProxy::merge(["a.internal"]).note(false).unwrap();
        assert!(
            note.contains("keeps a.internal: clients reach it directly"),
            "{note}"
        );
        assert!(!note.contains("--contain"), "{note}");
        let note = NoProxy::merge(["a,*"]).note(true).unwrap();
        assert!(
            note.contains("NO_PROXY=* sends clients to every host directly"),
            "{note}"
        );
        assert!(note.contains("under --contain they cannot"), "{note}");
    }

    #[test]
    fn no_proxy_without_inherited_entries_is_loopback_only() {
        let merged = NoProxy::merge([]);
        assert_eq!(merged.value, "localhost,127.0.0.1,::1");
        assert!(merged.bypassing.is_empty());
    }

    #[test]
    fn agent_env_overrides_every_ca_variable_and_sets_node_proxy_opt_in() {
        let env = AgentEnv::new(Path::new("/b.pem"), &NoProxy::merge(["x.internal"]), "jti1");
        for (name, _) in CA_BUNDLE_VARS {
            assert!(
                env.vars.iter().any(|(n, v)| n == name && v == "/b.pem"),
                "{name}"
            );
        }
        assert!(env
            .vars
            .iter()
            .any(|(n, v)| *n == "NODE_USE_ENV_PROXY" && v == "1"));
        assert!(env
            .vars
            .iter()
            .any(|(n, v)| *n == "no_proxy" && v == "localhost,127.0.0.1,::1,x.internal"));
    }
}
