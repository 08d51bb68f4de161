//! The compiled form of one agent's policy and the per-request decision.
//!
//! Everything here runs per request, so nothing re-parses strings and the allow path does not
//! allocate: hosts are looked up in hash maps by `&str`, wildcard hosts by walking the host's
//! dot-suffixes, and paths are matched segment by segment against patterns compiled at load.
//! Policy never sees secret values, only credential names.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

use crate::authority::Authority;
use crate::deny::Deny;

/// The scheme the request will be sent upstream with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// TLS (CONNECT tunnels). Default port 443.
    Https,
    /// Plain HTTP (absolute-form proxy requests). Default port 80.
    Http,
}

impl Scheme {
    /// The port a host pattern without `:port` stands for.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Https => 443,
            Scheme::Http => 80,
        }
    }

    /// Lower-case name, as in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

/// Token narrowing: None = every route of the agent; Some(ids) = only these route ids.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a>(pub Option<&'a [String]>);

impl Grant<'_> {
    /// Every route of the agent.
    pub const ALL: Grant<'static> = Grant(None);

    /// Whether the route with this id is granted.
    pub fn allows(&self, route_id: &str) -> bool {
        match self.0 {
            None => true,
            Some(ids) => ids.iter().any(|id| id == route_id),
        }
    }
}

/// Proof that policy allowed a request; only policy can build it.
#[derive(Debug, Clone)]
pub struct Allowed {
    route: Arc<Route>,
    _proof: (),
}

impl Allowed {
    /// The route that allowed the request (for injection and the audit line).
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }
}

/// How the credential is put on the request.
#[derive(Debug, Clone)]
pub enum Inject {
    /// value = prefix + secret + suffix (template split at the single "{secret}")
    Header {
        /// The header to set (any agent-sent header of this name is replaced).
        name: HeaderName,
        /// Text before the secret, e.g. `"Bearer "`.
        prefix: String,
        /// Text after the secret.
        suffix: String,
    },
    /// The secret becomes the value of this query parameter.
    Query {
        /// The parameter name.
        name: String,
    },
    /// HTTP Basic with this user name and the secret as password.
    BasicUser {
        /// The user name (contains no ':').
        user: String,
    },
}

/// The signing scope a route allows (`service`, `region`, `actions`), for credential kinds
/// that sign requests: the agent's own signature must name this service and region, and a
/// role assumed for the route is scoped down to these actions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signing {
    /// The service the request must be signed for (`s3`, `sqs`...), if the route names one.
    pub service: Option<Box<str>>,
    /// The region the request must be signed for (`eu-west-1`...), if the route names one.
    pub region: Option<Box<str>>,
    /// Explicit IAM actions (`s3:GetObject`...) for a role assumed for this route; empty =
    /// derived from the route's methods.
    pub actions: Box<[Box<str>]>,
}

/// Which port a host pattern applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortSpec {
    /// No `:port` in the pattern: 443 for https, 80 for http.
    Default,
    /// Exactly this port, whatever the scheme.
    Port(u16),
}

impl PortSpec {
    fn matches(self, scheme: Scheme, port: u16) -> bool {
        match self {
            PortSpec::Default => port == scheme.default_port(),
            PortSpec::Port(p) => port == p,
        }
    }
}

/// A compiled host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// This exact normalised host.
    Exact(Box<str>),
    /// Any name with one or more labels in front of this suffix (pattern `*.suffix`).
    Suffix(Box<str>),
}

/// One segment of a compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// Exactly this text (an empty literal stands for a trailing slash).
    Lit(Box<str>),
    /// `*`: exactly one non-empty segment.
    One,
    /// `**`: zero or more segments.
    Any,
}

/// A path pattern compiled to segment matchers.
#[derive(Debug, Clone)]
pub(crate) struct PathPattern {
    pub(crate) text: Box<str>,
    pub(crate) segs: Box<[Seg]>,
}

impl PathPattern {
    /// Match a normalised path.
    pub(crate) fn matches(&self, path: &str) -> bool {
        match path.strip_prefix('/') {
            Some(rest) => match_segs(&self.segs, Some(rest)),
            None => false,
        }
    }
}

/// `rest` holds the remaining segments joined by '/' (`Some("")` is one empty segment, the
/// trailing slash; `None` is no segment at all).
fn match_segs(pat: &[Seg], rest: Option<&str>) -> bool {
    let Some((first, pat_tail)) = pat.split_first() else {
        return rest.is_none();
    };
    match first {
        // Compare bytes in place: most candidates fail on their first differing byte, so no
        // search for the next '/' is needed.
        Seg::Lit(lit) => match rest {
            Some(r) => match r.strip_prefix(&**lit) {
                Some("") => match_segs(pat_tail, None),
                Some(after) => match after.strip_prefix('/') {
                    Some(tail) => match_segs(pat_tail, Some(tail)),
                    None => false,
                },
                None => false,
            },
            None => false,
        },
        Seg::One => match rest {
            Some(r) => {
                let (head, tail) = split_segment(r);
                !head.is_empty() && match_segs(pat_tail, tail)
            }
            None => false,
        },
        Seg::Any => {
            let mut cur = rest;
            loop {
                if match_segs(pat_tail, cur) {
                    return true;
                }
                match cur {
                    Some(r) => cur = split_segment(r).1,
                    None => return false,
                }
            }
        }
    }
}

fn split_segment(r: &str) -> (&str, Option<&str>) {
    match r.split_once('/') {
        Some((head, tail)) => (head, Some(tail)),
        None => (r, None),
    }
}

/// GitHub App permissions of a route: (name, level) pairs sorted by name.
pub type Permissions = Box<[(Box<str>, Box<str>)]>;
/// The human decision a route needs (`approval = ...` in the policy file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Approval {
    /// None: a valid token is enough.
    #[default]
    None,
    /// A token for the route exists only after a person approved the session grant.
    Session,
    /// Each matching request is held until a person approves that exact request.
    Request,
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub(crate) id: Box<str>,
    pub(crate) host_text: Box<str>,
    pub(crate) host: HostPattern,
    pub(crate) port: PortSpec,
    pub(crate) methods: Box<[Method]>,
    pub(crate) paths: Box<[PathPattern]>,
    pub(crate) credential: Option<Box<str>>,
    pub(crate) inject: Option<Inject>,
    pub(crate) insecure_http: bool,
    pub(crate) max_body: Option<u64>,
    pub(crate) rate: Option<crate::ratelimit::Rate>,
    pub(crate) scan_request: bool,
    pub(crate) timeout: Option<std::time::Duration>,
    pub(crate) idle_timeout: Option<std::time::Duration>,
    pub(crate) signing: Signing,
    pub(crate) per_user: bool,
    pub(crate) permissions: Option<Permissions>,
    pub(crate) approval: Approval,
    pub(crate) line: Option<usize>,
    pub(crate) credential_line: Option<usize>,
}

impl Route {
    /// The route id (unique per agent; recorded in the audit log).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The credential name in the secret store, if the route injects one.
    pub fn credential(&self) -> Option<&str> {
        self.credential.as_deref()
    }

    /// How the credential is injected (present exactly when `credential` is).
    pub fn inject(&self) -> Option<&Inject> {
        self.inject.as_ref()
    }

    /// Whether a credential may be injected into plaintext HTTP on this route.
    pub fn insecure_http(&self) -> bool {
        self.insecure_http
    }

    /// The largest request body this route accepts, if it sets one.
    pub fn max_body(&self) -> Option<u64> {
        self.max_body
    }

    /// The request rate limit per agent on this route (its own `rate`, else the agent file's).
    pub fn rate(&self) -> Option<crate::ratelimit::Rate> {
        self.rate
    }

    /// The route's own deadline for the upstream's response head, if it sets one.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout
    }

    /// The route's own limit on silence between body bytes (either way), if it sets one.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        self.idle_timeout
    }

    /// Whether the agent's request is searched for credentials (the exfiltration tripwire;
    /// `scan_request = false` turns it off, for bulk uploads).
    pub fn scan_request(&self) -> bool {
        self.scan_request
    }

    /// Whether the credential is the delegating user's own connection (`per_user = true`):
    /// resolved from the token's `obo` claim.
    pub fn per_user(&self) -> bool {
        self.per_user
    }

    /// Explicit GitHub App permissions (`permissions = { issues = "read" }`), sorted by
    /// name, when the route gives them.
    pub fn permissions(&self) -> Option<&[(Box<str>, Box<str>)]> {
        self.permissions.as_deref()
    }

    /// What a signing credential kind (`aws_sigv4`) may sign on this route: the service,
    /// region and actions the route names (`service`, `region`, `actions`).
    pub fn signing(&self) -> &Signing {
        &self.signing
    }

    /// Which human decision the route needs: none, an approved session (grant), or each
    /// request approved.
    pub fn approval(&self) -> Approval {
        self.approval
    }

    /// The line of the `credential` field in the policy file (for `policy check` warnings).
    pub fn credential_line(&self) -> Option<usize> {
        self.credential_line
    }

    /// The line where the route's table starts in the policy file.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// The normalised host pattern, e.g. `api.github.com` or `*.example.com:8443`.
    pub fn host(&self) -> &str {
        &self.host_text
    }

    /// The methods the route allows.
    pub fn methods(&self) -> &[Method] {
        &self.methods
    }

    /// The path patterns, as written in the file.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.paths.iter().map(|p| &*p.text)
    }

    fn matches_path(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p.matches(path))
    }

    /// The one upstream a gateway request to this route goes to (`https://` + this), or
    /// `None` for a wildcard host, which names no single host to send to.
    pub fn gateway_authority(&self) -> Option<Authority> {
        match self.host {
            HostPattern::Exact(_) => {
                Authority::parse(&self.host_text, Some(Scheme::Https.default_port())).ok()
            }
            HostPattern::Suffix(_) => None,
        }
    }

    /// SECURITY: a credential never travels in plaintext unless the route opts in.
    fn refuses_plain_http(&self, scheme: Scheme) -> bool {
        scheme == Scheme::Http && self.credential.is_some() && !self.insecure_http
    }
}

/// FNV-1a: host lookups are a few short keys per request, where SipHash's setup dominates.
///
/// SECURITY: hash flooding needs the attacker to insert keys; here only the policy file
/// inserts, requests only look up, so a weak hash cannot be turned into a slow table.
#[derive(Default)]
struct FnvHasher(u64);

impl Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        self.0 = h;
    }
}

/// Route indexes per host key, ascending (file order).
type HostIndex = HashMap<Box<str>, Vec<(PortSpec, u32)>, BuildHasherDefault<FnvHasher>>;

/// One agent's compiled, immutable policy.
#[derive(Debug)]
pub struct AgentPolicy {
    pub(crate) file: PathBuf,
    pub(crate) agent: Box<str>,
    pub(crate) max_ttl: Option<Duration>,
    pub(crate) routes: Vec<Arc<Route>>,
    by_id: HashMap<Box<str>, usize>,
    exact: HostIndex,
    wildcard: HostIndex,
}

impl AgentPolicy {
    /// Build the indexes over routes that are already validated (ids unique).
    pub(crate) fn compile(
        file: PathBuf,
        agent: Box<str>,
        max_ttl: Option<Duration>,
        routes: Vec<Arc<Route>>,
    ) -> AgentPolicy {
        let mut by_id = HashMap::with_capacity(routes.len());
        let mut exact = HostIndex::default();
        let mut wildcard = HostIndex::default();
        for (i, route) in routes.iter().enumerate() {
            by_id.insert(route.id.clone(), i);
            // Route counts are bounded by file size far below u32::MAX; saturate to be total.
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            let (map, key) = match &route.host {
                HostPattern::Exact(h) => (&mut exact, h),
                HostPattern::Suffix(s) => (&mut wildcard, s),
            };
            map.entry(key.clone()).or_default().push((route.port, idx));
        }
        AgentPolicy {
            file,
            agent,
            max_ttl,
            routes,
            by_id,
            exact,
            wildcard,
        }
    }

    /// The agent name.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The file the policy was loaded from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The cap on token lifetimes, if the policy sets one.
    pub fn max_ttl(&self) -> Option<Duration> {
        self.max_ttl
    }

    /// All routes in file order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route with this id.
    pub fn route(&self, id: &str) -> Option<&Arc<Route>> {
        self.by_id.get(id).and_then(|&i| self.routes.get(i))
    }

    /// The candidate lists for a host: its exact entry, then one per wildcard suffix.
    fn candidates<'a>(
        &'a self,
        authority: &'a Authority,
    ) -> impl Iterator<Item = &'a [(PortSpec, u32)]> + 'a {
        let host = authority.host();
        let exact = self.exact.get(host).map(Vec::as_slice);
        // SECURITY: wildcards name DNS suffixes; an IP literal never matches one.
        let walk_suffixes = authority.ip().is_none() && !self.wildcard.is_empty();
        let wild = host
            .match_indices('.')
            .take_while(move |_| walk_suffixes)
            .filter_map(move |(i, _)| self.wildcard.get(&host[i + 1..]).map(Vec::as_slice));
        exact.into_iter().chain(wild)
    }

    fn route_at(&self, idx: u32) -> Option<&Arc<Route>> {
        self.routes.get(usize::try_from(idx).ok()?)
    }

    /// CONNECT-level check: does any granted route name this host:port for this scheme?
    ///
    /// The plaintext-credential rule is not applied here so that `decide` can explain it.
    pub fn allows_host(&self, scheme: Scheme, authority: &Authority, grant: Grant<'_>) -> bool {
        let port = authority.port();
        self.candidates(authority).any(|list| {
            list.iter().any(|&(ps, idx)| {
                ps.matches(scheme, port) && self.route_at(idx).is_some_and(|r| grant.allows(&r.id))
            })
        })
    }

    /// Full decision; `path` must already be normalised. First matching route in file order wins.
    pub fn decide(
        &self,
        scheme: Scheme,
        authority: &Authority,
        method: &Method,
        path: &str,
        grant: Grant<'_>,
    ) -> Result<Allowed, Deny> {
        let port = authority.port();
        let mut best: Option<u32> = None;
        for list in self.candidates(authority) {
            for &(ps, idx) in list {
                if best.is_some_and(|b| idx >= b) {
                    break;
                }
                let Some(route) = self.route_at(idx) else {
                    continue;
                };
                if ps.matches(scheme, port)
                    && grant.allows(&route.id)
                    && !route.refuses_plain_http(scheme)
                    && route.methods.contains(method)
                    && route.matches_path(path)
                {
                    best = Some(idx);
                    break;
                }
            }
        }
        match best.and_then(|i| self.route_at(i)) {
            Some(route) => Ok(Allowed {
                route: Arc::clone(route),
                _proof: (),
            }),
            None => Err(self.explain_denial(scheme, authority, method, path, grant)),
        }
    }

    /// Gateway mode: the decision of the one route the request named (`/gw/<id>/...`), never
    /// of another route on the same host. `path` must already be normalised; `authority` is
    /// the route's own ([`Route::gateway_authority`]), for the denial texts.
    pub fn decide_route(
        &self,
        route: &Arc<Route>,
        authority: &Authority,
        method: &Method,
        path: &str,
        grant: Grant<'_>,
    ) -> Result<Allowed, Deny> {
        if !grant.allows(&route.id) {
            return Err(Deny::RouteNotGranted {
                route: route.id.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                authority: authority.to_string(),
            });
        }
        if !route.matches_path(path) {
            return Err(Deny::NoRoute {
                agent: self.agent.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                authority: authority.to_string(),
            });
        }
        if !route.methods.contains(method) {
            let allowed: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
            return Err(Deny::MethodNotAllowed {
                route: route.id.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                authority: authority.to_string(),
                allowed: allowed.join(", "),
            });
        }
        Ok(Allowed {
            route: Arc::clone(route),
            _proof: (),
        })
    }

    /// The deny path: find the most helpful reason. May allocate.
    fn explain_denial(
        &self,
        scheme: Scheme,
        authority: &Authority,
        method: &Method,
        path: &str,
        grant: Grant<'_>,
    ) -> Deny {
        let port = authority.port();
        let mut indexes: Vec<u32> = self
            .candidates(authority)
            .flat_map(|list| list.iter())
            .filter(|(ps, _)| ps.matches(scheme, port))
            .map(|&(_, idx)| idx)
            .collect();
        if indexes.is_empty() {
            return Deny::HostNotAllowed {
                agent: self.agent.to_string(),
                host: authority.to_string(),
            };
        }
        // File order, so each explanation names the route that would have decided.
        indexes.sort_unstable();
        let host_routes: Vec<&Arc<Route>> =
            indexes.iter().filter_map(|&i| self.route_at(i)).collect();
        let full = |r: &&Arc<Route>| r.methods.contains(method) && r.matches_path(path);
        if let Some(r) = host_routes.iter().find(|r| full(r) && !grant.allows(&r.id)) {
            return Deny::RouteNotGranted {
                route: r.id.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                authority: authority.to_string(),
            };
        }
        if let Some(r) = host_routes
            .iter()
            .find(|r| full(r) && r.refuses_plain_http(scheme))
        {
            return Deny::InsecureHttpRefused {
                route: r.id.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                authority: authority.to_string(),
            };
        }
        if let Some(r) = host_routes.iter().find(|r| r.matches_path(path)) {
            let allowed: Vec<&str> = r.methods.iter().map(Method::as_str).collect();
            return Deny::MethodNotAllowed {
                route: r.id.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                authority: authority.to_string(),
                allowed: allowed.join(", "),
            };
        }
        Deny::NoRoute {
            agent: self.agent.to_string(),
            method: method.clone(),
            path: path.to_owned(),
            authority: authority.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(text: &str) -> PathPattern {
        let segs = text[1..]
            .split('/')
            .map(|s| match s {
                "*" => Seg::One,
                "**" => Seg::Any,
                lit => Seg::Lit(lit.into()),
            })
            .collect();
        PathPattern {
            text: text.into(),
            segs,
        }
    }

    #[test]
    fn path_pattern_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("/a", "/a", true),
            ("/a", "/a/", false),
            ("/a", "/b", false),
            ("/a", "/a/b", false),
            ("/a/", "/a/", true),
            ("/a/", "/a", false),
            ("/", "/", true),
            ("/", "/a", false),
            ("/*", "/a", true),
            ("/*", "/", false),
            ("/a/*", "/a/b", true),
            ("/a/*", "/a/", false),
            ("/a/*", "/a", false),
            ("/a/*", "/a/b/c", false),
            ("/a/*/c", "/a/b/c", true),
            ("/a/*/c", "/a/b/d", false),
            ("/a/**", "/a", true),
            ("/a/**", "/a/", true),
            ("/a/**", "/a/b", true),
            ("/a/**", "/a/b/c/d", true),
            ("/a/**", "/ab", false),
            ("/a/**", "/b/a", false),
            ("/**", "/", true),
            ("/**", "/anything/at/all/", true),
            ("/a/**/z", "/a/z", true),
            ("/a/**/z", "/a/b/c/z", true),
            ("/a/**/z", "/a/b/c/z/x", false),
            ("/a/**/*/z", "/a/z", false),
            ("/a/**/*/z", "/a/b/z", true),
            ("/**/x/**", "/q/x/r", true),
            ("/**/x/**", "/q/y/r", false),
            ("/a", "a", false),
        ];
        for (p, path, want) in cases {
            assert_eq!(pat(p).matches(path), *want, "{p} vs {path}");
        }
    }

    #[test]
    fn grant_narrows_by_id() {
        let ids = vec!["a".to_string()];
        assert!(Grant(Some(&ids)).allows("a"));
        assert!(!Grant(Some(&ids)).allows("b"));
        assert!(Grant::ALL.allows("b"));
        assert!(!Grant(Some(&[])).allows("a"));
    }
}
