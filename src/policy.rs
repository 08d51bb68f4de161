//! Route policies: parse and validate TOML files once, compile them into a per-agent index,
//! and decide allow/deny for a request. Policy never sees secret values, only credential names.
//!
//! - `path`: request path normalisation (the form that is matched and forwarded).
//! - `parse`: policy files -> validated routes, with diagnostics naming file, line and field.
//! - `matcher`: the compiled per-agent index and `decide`.
//! - `reload`: noticing edits and keeping a broken file's last good version.
//!
//! Policy must not do I/O per request, resolve names, or touch the secret store.

pub mod matcher;
pub mod parse;
pub mod path;
pub mod reload;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use matcher::{AgentPolicy, Allowed, Approval, Grant, Inject, Route, Scheme, Signing};
pub use parse::{Diagnostic, Severity};
pub use path::normalize;

/// Every agent's policy, keyed by agent name.
#[derive(Debug, Default)]
pub struct Policies {
    agents: BTreeMap<Box<str>, Arc<AgentPolicy>>,
}

/// The result of loading a policy directory: what loaded, and what was wrong.
#[derive(Debug)]
pub struct LoadReport {
    /// The policies of every file that loaded without errors.
    pub policies: Policies,
    /// Errors (files left out) and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadReport {
    /// Whether any diagnostic is an error (some file was left out).
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }
}

impl Policies {
    /// No agents: everything is denied.
    pub fn empty() -> Policies {
        Policies::default()
    }

    /// Load every *.toml in dir (non-recursive, sorted). Files that fail are left out and reported.
    ///
    /// A missing directory gives no policies and a warning; any other failure to list the
    /// directory is an `io::Error`. An agent defined in two files is an error and neither file
    /// is loaded, since there is no safe way to choose one.
    pub fn load_dir(dir: &Path) -> Result<LoadReport, std::io::Error> {
        let mut diagnostics = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                diagnostics.push(Diagnostic {
                    file: dir.to_path_buf(),
                    line: None,
                    field: String::new(),
                    message: "the policy directory does not exist; every request is denied"
                        .to_string(),
                    severity: Severity::Warning,
                });
                return Ok(LoadReport {
                    policies: Policies::empty(),
                    diagnostics,
                });
            }
            Err(e) => return Err(e),
        };
        let mut files = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();

        let mut loaded: Vec<AgentPolicy> = Vec::new();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    diagnostics.push(Diagnostic {
                        file,
                        line: None,
                        field: String::new(),
                        message: format!("cannot be read: {e}"),
                        severity: Severity::Error,
                    });
                    continue;
                }
            };
            match AgentPolicy::from_toml(&file, &text) {
                Ok(policy) => loaded.push(policy),
                Err(diags) => diagnostics.extend(diags),
            }
        }

        // SECURITY: two files for one agent would make the effective policy depend on
        // directory order; refuse both.
        let mut by_agent: BTreeMap<Box<str>, Vec<AgentPolicy>> = BTreeMap::new();
        for policy in loaded {
            by_agent
                .entry(policy.agent.clone())
                .or_default()
                .push(policy);
        }
        let mut agents = BTreeMap::new();
        for (agent, mut defs) in by_agent {
            if defs.len() == 1 {
                if let Some(policy) = defs.pop() {
                    agents.insert(agent, Arc::new(policy));
                }
                continue;
            }
            let names: Vec<String> = defs.iter().map(|p| p.file.display().to_string()).collect();
            for policy in &defs {
                diagnostics.push(Diagnostic {
                    file: policy.file.clone(),
                    line: None,
                    field: "agent".to_string(),
                    message: format!(
                        "agent {agent:?} is defined in more than one file ({}); none of them is loaded",
                        names.join(", ")
                    ),
                    severity: Severity::Error,
                });
            }
        }
        Ok(LoadReport {
            policies: Policies { agents },
            diagnostics,
        })
    }

    /// Build from already compiled policies (tests, embedding). Later duplicates replace
    /// earlier ones.
    pub fn from_policies(policies: impl IntoIterator<Item = AgentPolicy>) -> Policies {
        let agents = policies
            .into_iter()
            .map(|p| (p.agent.clone(), Arc::new(p)))
            .collect();
        Policies { agents }
    }

    /// Build from shared compiled policies (hot reload keeps the last good ones). Later
    /// duplicates replace earlier ones.
    pub fn from_shared(policies: impl IntoIterator<Item = Arc<AgentPolicy>>) -> Policies {
        let agents = policies.into_iter().map(|p| (p.agent.clone(), p)).collect();
        Policies { agents }
    }

    /// The policy of this agent.
    pub fn get(&self, agent: &str) -> Option<&Arc<AgentPolicy>> {
        self.agents.get(agent)
    }

    /// Every agent's policy, sorted by agent name.
    pub fn agents(&self) -> impl Iterator<Item = &Arc<AgentPolicy>> {
        self.agents.values()
    }

    /// Warnings for credentials the store does not hold (policy check).
    /// A `per_user` route's credential is made by each user (`latchkey connect NAME --user
    /// U`), so it is not looked for under its bare name.
    pub fn missing_credentials(&self, known: &dyn Fn(&str) -> bool) -> Vec<Diagnostic> {
        self.credential_diagnostics(&|name, route| {
            (!route.per_user() && !known(name)).then(|| {
                (
                    Severity::Warning,
                    format!(
                        "credential {name:?} is not in the secret store; route {} will be \
                         refused until it is set",
                        route.id()
                    ),
                )
            })
        })
    }

    /// One diagnostic per credentialed route that `check` (given the credential's name and
    /// the route) finds something to say about: e.g. a credential whose kind does not fit
    /// the route's inject form, as `policy check` asks each credential kind.
    pub fn credential_diagnostics(&self, check: &CredentialCheck<'_>) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for policy in self.agents.values() {
            for (i, route) in policy.routes.iter().enumerate() {
                let Some(name) = route.credential() else {
                    continue;
                };
                if let Some((severity, message)) = check(name, route) {
                    out.push(Diagnostic {
                        file: policy.file.clone(),
                        line: route.credential_line(),
                        field: format!("routes[{i}].credential"),
                        message,
                        severity,
                    });
                }
            }
        }
        out
    }
}

/// What `Policies::credential_diagnostics` asks about each credentialed route: given the
/// credential's name and the route, a finding and how severe it is.
pub type CredentialCheck<'a> = dyn Fn(&str, &Route) -> Option<(Severity, String)> + 'a;
/// What `policy explain` (and the dashboard's explain form) says about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// Whether the request would be allowed.
    pub allowed: bool,
    /// One line: `allow: route R (credential C) for ...`, or `deny: reason: why`.
    pub text: String,
}

/// Which rule decides `method url` for `agent` (no token narrowing). `Err` says what is wrong
/// with the question (unknown agent, not a URL, not a method).
pub fn explain(
    policies: &Policies,
    agent: &str,
    method: &str,
    url: &str,
) -> Result<Explained, String> {
    let policy = policies
        .get(agent)
        .ok_or_else(|| format!("no policy for agent {agent:?}"))?;
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::Https,
        Some("http") => Scheme::Http,
        _ => return Err(format!("{url:?} must start with https:// or http://")),
    };
    let authority = crate::authority::Authority::parse(
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        Some(scheme.default_port()),
    )
    .map_err(|e| e.to_string())?;
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("{method:?} is not an HTTP method"))?;
    let normalized = match path::normalize(uri.path()) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Explained {
                allowed: false,
                text: format!("deny: bad_path: {e}"),
            })
        }
    };
    Ok(
        match policy.decide(scheme, &authority, &method, &normalized, Grant(None)) {
            Ok(allowed) => {
                let route = allowed.route();
                let approval = match route.approval() {
                    Approval::None => "",
                    Approval::Session => ", needs an approved session",
                    Approval::Request => ", each request held for approval",
                };
                Explained {
                    allowed: true,
                    text: format!(
                        "allow: route {} (credential {}{approval}) for {method} {authority}{normalized}",
                        route.id(),
                        route.credential().unwrap_or("none")
                    ),
                }
            }
            Err(deny) => Explained {
                allowed: false,
                text: format!("deny: {}: {deny}", deny.code()),
            },
        },
    )
}

#[cfg(test)]
mod tests;
