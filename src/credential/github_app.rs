//! The `github_app` kind: installation tokens minted per route, restricted to exactly the
//! repositories the route's paths name and to the permissions its methods need.
//!
//! ```toml
//! kind = "github_app"
//! app_id = "123456"
//! installation_id = "7890123"
//! api_url = "https://api.github.com"     # the default
//! [secret]
//! private_key = "-----BEGIN RSA PRIVATE KEY-----\n..."
//! ```
//!
//! For a route, the scope is: every path must start `/repos/OWNER/REPO` with both segments
//! literal (one owner); the repositories are those REPOs. The permissions are the route's
//! `permissions` table when it has one; otherwise one permission per resource the paths name
//! (`/repos/o/r/issues/**` -> `issues`, `/pulls` -> `pull_requests`, nothing or a wildcard ->
//! `contents`), at `read` when the route allows only GET/HEAD and `write` otherwise. `policy
//! check` refuses a route whose scope cannot be derived ([`Credential::fits`]).
//!
//! latchkey signs a ten-minute RS256 JWT as the app, POSTs
//! `{api_url}/app/installations/{id}/access_tokens` with `repositories` and `permissions`,
//! and caches the token per scope until shortly before its `expires_at`: one mint at a time
//! per scope, a bounded wait for requests.
//!
//! This module must never put the private key, a JWT or an installation token into an error,
//! a log line or an audit detail.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::{header, HeaderValue, Method, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::endpoint::{self, Endpoints};
use super::oauth2::{now_ms, Token};
use super::{Applied, Apply, Credential, Kind, KindError, Outgoing, Runtime};
use crate::deny::Deny;
use crate::inject;
use crate::policy::Route;
use crate::secrets::typed::{TypedDoc, SECRET_TABLE};
use crate::secrets::Secret;

/// The kind's name.
pub const GITHUB_APP: &str = "github_app";
/// Where GitHub's API is unless the document says otherwise.
pub const DEFAULT_API: &str = "https://api.github.com";

/// What one route may do with the app's installation: the body of the token request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scope {
    /// Repository names (without the owner), sorted.
    pub repositories: Vec<String>,
    /// Permission name -> `read` / `write` / `admin`.
    pub permissions: BTreeMap<String, String>,
}

/// The resource a path names after `/repos/OWNER/REPO/`, as a GitHub App permission.
fn permission_of(resource: &str) -> Option<&'static str> {
    Some(match resource {
        "issues" | "labels" | "milestones" | "assignees" => "issues",
        "pulls" => "pull_requests",
        "contents" | "git" | "commits" | "branches" | "tags" | "releases" | "compare"
        | "readme" | "tarball" | "zipball" => "contents",
        "actions" => "actions",
        "check-runs" | "check-suites" => "checks",
        "statuses" => "statuses",
        "deployments" | "environments" => "deployments",
        "hooks" => "repository_hooks",
        "pages" => "pages",
        "projects" => "repository_projects",
        "secrets" => "secrets",
        _ => return None,
    })
}

fn is_literal(segment: &str) -> bool {
    !segment.is_empty() && !segment.contains('*') && !segment.contains('{')
}

/// The scope of `route`, or why the route's paths do not pin repositories.
pub fn scope_of(route: &Route) -> Result<Scope, String> {
    let mut owner: Option<&str> = None;
    let mut repositories = Vec::new();
    let mut resources = Vec::new();
    for path in route.paths() {
        let mut segs = path.trim_start_matches('/').split('/');
        let (Some("repos"), Some(o), Some(r)) = (segs.next(), segs.next(), segs.next()) else {
            return Err(format!(
                "path {path:?} does not name a repository (/repos/OWNER/REPO/...), so the \
                 installation token cannot be restricted to it"
            ));
        };
        if !is_literal(o) || !is_literal(r) {
            return Err(format!(
                "path {path:?} does not pin one repository: OWNER and REPO must be written out, \
                 not wildcards"
            ));
        }
        match owner {
            Some(prev) if prev != o => {
                return Err(format!(
                    "paths name repositories of two owners ({prev} and {o}); an installation \
                     token covers one"
                ))
            }
            _ => owner = Some(o),
        }
        if !repositories.iter().any(|x| x == r) {
            repositories.push(r.to_owned());
        }
        resources.push((path, segs.next()));
    }
    repositories.sort();
    let permissions = match route.permissions() {
        Some(explicit) => explicit
            .iter()
            .map(|(n, l)| (n.to_string(), l.to_string()))
            .collect(),
        None => {
            let write = route
                .methods()
                .iter()
                .any(|m| *m != Method::GET && *m != Method::HEAD);
            let level = if write { "write" } else { "read" };
            let mut out = BTreeMap::new();
            for (path, resource) in resources {
                let name = match resource {
                    None | Some("") => "contents",
                    Some(r) if r.contains('*') => "contents",
                    Some(r) => permission_of(r).ok_or_else(|| {
                        format!(
                            "path {path:?} names {r:?}, whose GitHub permission latchkey does \
                             not know; give the route `permissions = {{ NAME = \"read\" }}`"
                        )
                    })?,
                };
                out.insert(name.to_owned(), level.to_owned());
            }
            out
        }
    };
    Ok(Scope {
        repositories,
        permissions,
    })
}

/// Builds `github_app` credentials.
pub struct GithubAppKind {
    runtime: Option<Arc<Runtime>>,
}

impl GithubAppKind {
    /// The kind; without a runtime its credentials validate but cannot mint.
    pub fn new(runtime: Option<Arc<Runtime>>) -> GithubAppKind {
        GithubAppKind { runtime }
    }
}

fn invalid(msg: impl Into<String>) -> KindError {
    KindError::Invalid(msg.into())
}

fn id_field(doc: &TypedDoc, key: &str) -> Result<String, KindError> {
    let text = match doc.table.get(key) {
        Some(toml::Value::String(s)) => s.clone(),
        Some(toml::Value::Integer(n)) => n.to_string(),
        Some(_) => return Err(invalid(format!("`{key}` must be a number"))),
        None => return Err(invalid(format!("`{key}` is missing"))),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("`{key}` must be a number")));
    }
    Ok(text)
}

impl Kind for GithubAppKind {
    fn name(&self) -> &'static str {
        GITHUB_APP
    }

    fn build(&self, name: &str, doc: &TypedDoc) -> Result<Arc<dyn Credential>, KindError> {
        let app_id = id_field(doc, "app_id")?;
        let installation_id = id_field(doc, "installation_id")?;
        let api = match doc.table.get("api_url") {
            None => DEFAULT_API.to_owned(),
            Some(toml::Value::String(s)) => s.trim_end_matches('/').to_owned(),
            Some(_) => return Err(invalid("`api_url` must be a string")),
        };
        let mint_url = endpoint::check_url(&format!(
            "{api}/app/installations/{installation_id}/access_tokens"
        ))
        .map_err(|e| invalid(format!("`api_url`: {e}")))?;
        let key = match doc
            .table
            .get(SECRET_TABLE)
            .and_then(|t| t.get("private_key"))
        {
            Some(toml::Value::String(pem)) => {
                EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
                    invalid("`secret.private_key` is not an RSA private key in PEM form")
                })?
            }
            _ => return Err(invalid("`secret.private_key` is missing")),
        };
        Ok(Arc::new(GithubApp {
            name: name.to_owned(),
            app_id,
            installation_id,
            mint_url,
            key,
            runtime: self.runtime.clone(),
            scopes: Default::default(),
        }))
    }
}

/// The cached token of one scope, and the lock that makes its mint single.
#[derive(Default)]
struct Slot {
    current: ArcSwapOption<Token>,
    mint: tokio::sync::Mutex<()>,
    detail: String,
}

/// A route's scope and its token slot, or why the route cannot have one.
type ScopeSlot = Result<(Arc<Scope>, Arc<Slot>), String>;

/// A GitHub App installation, ready to mint per-route tokens.
pub struct GithubApp {
    name: String,
    app_id: String,
    installation_id: String,
    mint_url: Uri,
    key: EncodingKey,
    runtime: Option<Arc<Runtime>>,
    /// Per route (by address, kept alive by the `Arc`): its scope's slot.
    scopes: dashmap::DashMap<usize, (Arc<Route>, ScopeSlot)>,
}

#[derive(Serialize)]
struct AppClaims<'a> {
    iat: i64,
    exp: i64,
    iss: &'a str,
}

#[derive(Deserialize)]
struct Minted {
    token: Option<String>,
    expires_at: Option<String>,
}

impl GithubApp {
    fn unavailable(&self, why: &str) -> Deny {
        Deny::CredentialUnavailable(format!("{}: {why}", self.name))
    }

    fn slot(&self, route: &Arc<Route>) -> Result<(Arc<Scope>, Arc<Slot>), Deny> {
        let key = Arc::as_ptr(route) as usize;
        if let Some(e) = self.scopes.get(&key) {
            if Arc::ptr_eq(&e.0, route) {
                return e.1.clone().map_err(|why| self.unavailable(&why));
            }
        }
        let built = scope_of(route).map(|scope| {
            let detail = format!(
                "installation={} repositories={} permissions={}",
                self.installation_id,
                scope.repositories.join(","),
                scope
                    .permissions
                    .iter()
                    .map(|(n, l)| format!("{n}:{l}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            (
                Arc::new(scope),
                Arc::new(Slot {
                    detail,
                    ..Default::default()
                }),
            )
        });
        self.scopes.insert(key, (route.clone(), built.clone()));
        built.map_err(|why| self.unavailable(&why))
    }

    async fn mint(&self, endpoints: &Endpoints, scope: &Scope) -> Result<Token, String> {
        let now = now_ms() / 1000;
        let claims = AppClaims {
            // Backdated a minute against clock drift, as GitHub recommends.
            iat: now - 60,
            exp: now + 540,
            iss: &self.app_id,
        };
        let jwt = Zeroizing::new(
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
                .map_err(|_| "the app's JWT cannot be signed".to_owned())?,
        );
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", &*jwt))
            .map_err(|_| "the app's JWT cannot be sent".to_owned())?;
        auth.set_sensitive(true);
        let body = Zeroizing::new(serde_json::to_vec(scope).expect("a scope serialises"));
        let answer = endpoints
            .post(
                &self.mint_url,
                "application/json",
                vec![
                    (header::AUTHORIZATION, auth),
                    (
                        header::ACCEPT,
                        HeaderValue::from_static("application/vnd.github+json"),
                    ),
                    (
                        header::HeaderName::from_static("x-github-api-version"),
                        HeaderValue::from_static("2022-11-28"),
                    ),
                ],
                body,
            )
            .await
            .map_err(|e| {
                tracing::warn!(credential = %self.name, error = %e, "the GitHub API cannot be used");
                match e {
                    endpoint::EndpointError::Timeout(..) => {
                        "the GitHub API did not answer in time".to_owned()
                    }
                    _ => "the GitHub API cannot be reached".to_owned(),
                }
            })?;
        if !answer.status.is_success() {
            return Err(format!(
                "the GitHub API refused the installation token ({})",
                answer.status
            ));
        }
        let mut minted: Minted = serde_json::from_slice(&answer.body)
            .map_err(|_| "the GitHub API answered something that is not a token".to_owned())?;
        let token = minted
            .token
            .take()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| "the GitHub API answered without a token".to_owned())?;
        let expires_at = minted
            .expires_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|d| d.timestamp_millis())
            .ok_or_else(|| "the GitHub API answered without a usable expires_at".to_owned())?;
        let now = now_ms();
        Ok(Token::minted(
            Secret::new(token.into_bytes()),
            now,
            Some((expires_at - now) as f64 / 1000.0),
        ))
    }

    async fn token(&self, slot: &Slot, scope: &Scope) -> Result<Arc<Token>, Deny> {
        let Some(runtime) = &self.runtime else {
            return Err(self.unavailable("this process cannot mint tokens"));
        };
        let work = async {
            let _one = slot.mint.lock().await;
            if let Some(t) = slot.current.load_full() {
                if !t.due(now_ms()) {
                    return Ok(t);
                }
            }
            match self.mint(&runtime.endpoints, scope).await {
                Ok(t) => {
                    let t = Arc::new(t);
                    slot.current.store(Some(t.clone()));
                    runtime
                        .metrics
                        .record_credential_event(&self.name, "refreshed");
                    Ok(t)
                }
                Err(why) => {
                    runtime
                        .metrics
                        .record_credential_event(&self.name, "refresh_failed");
                    tracing::warn!(credential = %self.name, error = %why, "cannot mint an installation token");
                    Err(self.unavailable(&why))
                }
            }
        };
        match tokio::time::timeout(runtime.wait, work).await {
            Ok(r) => r,
            Err(_) => Err(self.unavailable(&format!(
                "the GitHub API did not answer within {}; retry later",
                humantime::format_duration(runtime.wait)
            ))),
        }
    }
}

impl Credential for GithubApp {
    fn kind(&self) -> &'static str {
        GITHUB_APP
    }

    fn fits(&self, route: &Route) -> Result<(), String> {
        if route.inject().is_none() {
            return Err("a github_app credential needs an `inject` form on the route".into());
        }
        scope_of(route).map(|_| ())
    }

    fn apply<'a>(&'a self, out: Outgoing<'a>) -> Apply<'a> {
        let (scope, slot) = match self.slot(out.rewrite.allowed.route()) {
            Ok(s) => s,
            Err(deny) => return Apply::ready(Err(deny)),
        };
        let put_on = move |out: Outgoing<'_>, token: &Token, slot: &Slot| {
            inject::apply(
                out.parts,
                out.rewrite,
                Some(token.value.clone()),
                out.prepared,
            )
            .map(|injected| Applied {
                body: out.body,
                needles: injected.needles,
                detail: Some(slot.detail.clone()),
            })
        };
        let now = now_ms();
        if let Some(token) = &*slot.current.load() {
            if !token.due(now) {
                return Apply::ready(put_on(out, token, &slot));
            }
        }
        Apply::pending(async move {
            let token = self.token(&slot, &scope).await?;
            put_on(out, &token, &slot)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::AgentPolicy;

    fn route(fields: &str) -> Arc<Route> {
        let text = format!(
            "agent = \"a\"\n[[routes]]\nid = \"r\"\nhost = \"api.github.com\"\n{fields}\ncredential = \"app\"\ninject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n"
        );
        let p = AgentPolicy::from_toml(std::path::Path::new("a.toml"), &text).unwrap();
        p.routes()[0].clone()
    }

    #[test]
    fn scope_is_the_repositories_the_paths_name_and_permissions_from_methods() {
        let r = route(
            "methods = [\"GET\"]\npaths = [\"/repos/acme/backend/issues\", \"/repos/acme/backend/issues/**\", \"/repos/acme/web/pulls/*\"]",
        );
        let s = scope_of(&r).unwrap();
        assert_eq!(s.repositories, ["backend", "web"]);
        assert_eq!(
            s.permissions.into_iter().collect::<Vec<_>>(),
            [
                ("issues".to_owned(), "read".to_owned()),
                ("pull_requests".to_owned(), "read".to_owned())
            ]
        );
        let w = route("methods = [\"GET\", \"POST\"]\npaths = [\"/repos/acme/backend/**\"]");
        let s = scope_of(&w).unwrap();
        assert_eq!(s.repositories, ["backend"]);
        assert_eq!(s.permissions["contents"], "write");
    }

    #[test]
    fn explicit_permissions_win() {
        let r = route(
            "methods = [\"POST\"]\npaths = [\"/repos/acme/backend/issues\"]\npermissions = { issues = \"read\", metadata = \"read\" }",
        );
        let s = scope_of(&r).unwrap();
        assert_eq!(s.permissions.len(), 2);
        assert_eq!(s.permissions["issues"], "read");
    }

    #[test]
    fn routes_that_do_not_pin_repositories_are_refused() {
        for paths in [
            "[\"/repos/acme/*/issues\"]",
            "[\"/repos/acme/**\"]",
            "[\"/repos/*/backend\"]",
            "[\"/user/repos\"]",
            "[\"/**\"]",
            "[\"/repos/acme/a\", \"/repos/other/b\"]",
            "[\"/repos/acme/a/frobnicate\"]",
        ] {
            let r = route(&format!("methods = [\"GET\"]\npaths = {paths}"));
            assert!(scope_of(&r).is_err(), "{paths}");
        }
    }
}
