//! Policy files: TOML text -> validated, compiled `AgentPolicy`, or every problem found, each
//! naming the file, the line and the field.
//!
//! All validation happens here, once, at load; the matcher never re-parses a string. This
//! module knows credential names only, never secret values.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde::Deserialize;
use toml::Spanned;

use super::matcher::{
    AgentPolicy, Approval, HostPattern, Inject, PathPattern, PortSpec, Route, Seg, Signing,
};
use super::path::normalize;
use crate::authority::parse_host_port;
use crate::ratelimit::{parse_rate, Rate};

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file is not loaded.
    Error,
    /// The file loads, but something is probably wrong (e.g. a credential the store lacks).
    Warning,
}

/// One problem in a policy file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    /// The policy file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field, e.g. `routes[0].methods[1]` (empty for file-level problems).
    pub field: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
    /// Error or warning.
    pub severity: Severity,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Headers a route may never set: they steer the proxy or the connection, not the upstream API.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    agent: Spanned<String>,
    max_ttl: Option<Spanned<String>>,
    /// Default request rate for every route that sets none, e.g. "120/min".
    rate: Option<Spanned<String>>,
    /// `"session"`: every route's tokens exist only after a human approved the grant.
    approval: Option<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    id: Spanned<String>,
    host: Spanned<String>,
    methods: Spanned<Vec<Spanned<String>>>,
    paths: Spanned<Vec<Spanned<String>>>,
    credential: Option<Spanned<String>>,
    inject: Option<Spanned<RawInject>>,
    insecure_http: Option<Spanned<bool>>,
    max_body: Option<Spanned<RawSize>>,
    rate: Option<Spanned<String>>,
    scan_request: Option<Spanned<bool>>,
    /// Longest wait for the upstream's response head, e.g. "5m" (else `--upstream-timeout`).
    timeout: Option<Spanned<String>>,
    /// Longest silence between body bytes, either way (else `--upstream-idle-timeout`).
    idle_timeout: Option<Spanned<String>>,
    /// The service a signing credential (`aws_sigv4`) signs for: the agent's signature must
    /// name it.
    service: Option<Spanned<String>>,
    /// The region a signing credential signs for: the agent's signature must name it.
    region: Option<Spanned<String>>,
    /// Explicit IAM actions for a role assumed for this route.
    actions: Option<Spanned<Vec<Spanned<String>>>>,
    /// The credential is a connection made per delegating user (the token's `obo`).
    per_user: Option<Spanned<bool>>,
    /// GitHub App permissions for the installation tokens minted for this route.
    permissions: Option<Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
    /// `"session"` or `"request"` (human in the loop).
    approval: Option<Spanned<String>>,
}

/// The longest `timeout` or `idle_timeout` a route may set: past a day a "timeout" is a
/// typo, not a deadline.
const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A size: a number of bytes, or a string like "10MiB", "512KiB", "1GB".
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

/// Parse a size into bytes.
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let t = raw.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{raw:?} is not a size like \"10MiB\" or a number of bytes"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{raw:?} must be a positive size"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    header: Option<Spanned<String>>,
    value: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    basic_user: Option<Spanned<String>>,
}

/// Byte offset -> line number, computed once per file.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Lines { starts }
    }

    fn line(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }
}

/// Collects the diagnostics of one file.
struct Ctx<'a> {
    file: &'a Path,
    lines: Lines,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn error(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let line = Some(self.lines.line(span.start));
        self.diags.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            field: field.into(),
            message: message.into(),
            severity: Severity::Error,
        });
    }
}

impl AgentPolicy {
    /// Parse and validate one policy file. On failure, every problem found is returned.
    pub fn from_toml(file: &Path, text: &str) -> Result<AgentPolicy, Vec<Diagnostic>> {
        let mut cx = Ctx {
            file,
            lines: Lines::new(text),
            diags: Vec::new(),
        };
        let raw: RawPolicy = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| cx.lines.line(s.start));
                return Err(vec![Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    field: String::new(),
                    // toml gives an empty message for some invalid bytes (e.g. DEL in a
                    // comment); an operator still needs a reason.
                    message: match e.message().trim_end() {
                        "" => "invalid character or syntax here".to_string(),
                        m => m.to_string(),
                    },
                    severity: Severity::Error,
                }]);
            }
        };

        let agent = raw.agent.get_ref();
        if !is_agent_name(agent) {
            cx.error(
                raw.agent.span(),
                "agent",
                format!(
                    "{agent:?} is not a valid agent name (a letter or digit, then up to 63 \
                     letters, digits, '_', '.' or '-')"
                ),
            );
        }

        let max_ttl =
            raw.max_ttl
                .as_ref()
                .and_then(|t| match humantime::parse_duration(t.get_ref()) {
                    Ok(d) if d > Duration::ZERO => Some(d),
                    Ok(_) => {
                        cx.error(t.span(), "max_ttl", "must be longer than zero");
                        None
                    }
                    Err(e) => {
                        cx.error(
                            t.span(),
                            "max_ttl",
                            format!(
                                "{:?} is not a duration such as \"8h\" or \"15m\": {e}",
                                t.get_ref()
                            ),
                        );
                        None
                    }
                });

        let default_rate = raw
            .rate
            .as_ref()
            .and_then(|r| match parse_rate(r.get_ref()) {
                Ok(rate) => Some(rate),
                Err(e) => {
                    cx.error(r.span(), "rate", e);
                    None
                }
            });

        let default_approval = match &raw.approval {
            None => Approval::None,
            Some(a) => match a.get_ref().as_str() {
                "session" => Approval::Session,
                "none" => Approval::None,
                "request" => {
                    cx.error(
                        a.span(),
                        "approval",
                        "\"request\" is set per route (each held request names one route); \
                         the agent level takes \"session\" or \"none\"",
                    );
                    Approval::None
                }
                other => {
                    cx.error(
                        a.span(),
                        "approval",
                        format!("{other:?} is not an approval kind: use \"session\" or \"none\""),
                    );
                    Approval::None
                }
            },
        };

        let mut routes = Vec::with_capacity(raw.routes.len());
        let mut seen_ids: HashMap<&str, (usize, usize)> = HashMap::new();
        for (i, raw_route) in raw.routes.iter().enumerate() {
            let r = raw_route.get_ref();
            let id = r.id.get_ref().as_str();
            let id_line = cx.lines.line(r.id.span().start);
            if let Some((j, line)) = seen_ids.get(id) {
                cx.error(
                    r.id.span(),
                    format!("routes[{i}].id"),
                    format!("route id {id:?} is already used by routes[{j}] (line {line})"),
                );
            } else {
                seen_ids.insert(id, (i, id_line));
            }
            let line = cx.lines.line(raw_route.span().start);
            if let Some(route) = compile_route(&mut cx, i, line, r, default_rate, default_approval)
            {
                routes.push(Arc::new(route));
            }
        }

        if cx.diags.is_empty() {
            Ok(AgentPolicy::compile(
                file.to_path_buf(),
                agent.as_str().into(),
                max_ttl,
                routes,
            ))
        } else {
            Err(cx.diags)
        }
    }
}

/// Validate one route; `None` when it had errors (recorded in `cx`).
/// `default_rate` is the agent file's top-level `rate`, which a route's own `rate` overrides.
fn compile_route(
    cx: &mut Ctx<'_>,
    i: usize,
    line: usize,
    r: &RawRoute,
    default_rate: Option<Rate>,
    default_approval: Approval,
) -> Option<Route> {
    let before = cx.diags.len();
    let f = |name: &str| format!("routes[{i}].{name}");

    let id = r.id.get_ref();
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        cx.error(
            r.id.span(),
            f("id"),
            format!("{id:?} is not a valid route id (letters, digits, '_', '.' and '-' only)"),
        );
    }

    let host = match parse_host_pattern(r.host.get_ref()) {
        Ok(h) => Some(h),
        Err(msg) => {
            cx.error(r.host.span(), f("host"), msg);
            None
        }
    };

    let mut methods: Vec<Method> = Vec::new();
    if r.methods.get_ref().is_empty() {
        cx.error(
            r.methods.span(),
            f("methods"),
            "must list at least one method",
        );
    }
    for (k, m) in r.methods.get_ref().iter().enumerate() {
        let text = m.get_ref();
        match parse_method(text) {
            Ok(method) if methods.contains(&method) => cx.error(
                m.span(),
                f(&format!("methods[{k}]")),
                format!("{text:?} is listed twice"),
            ),
            Ok(method) => methods.push(method),
            Err(msg) => cx.error(m.span(), f(&format!("methods[{k}]")), msg),
        }
    }

    let mut paths = Vec::new();
    if r.paths.get_ref().is_empty() {
        cx.error(r.paths.span(), f("paths"), "must list at least one path");
    }
    for (k, p) in r.paths.get_ref().iter().enumerate() {
        match compile_path(p.get_ref()) {
            Ok(pattern) => paths.push(pattern),
            Err(msg) => cx.error(p.span(), f(&format!("paths[{k}]")), msg),
        }
    }

    let credential = r.credential.as_ref().and_then(|c| {
        let name = c.get_ref();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            cx.error(
                c.span(),
                f("credential"),
                format!("{name:?} is not a valid credential name (printable ASCII, no spaces)"),
            );
            None
        } else {
            Some(name.as_str().into())
        }
    });

    let inject = r.inject.as_ref().and_then(|inj| compile_inject(cx, i, inj));

    // A credential without `inject` is one whose kind puts itself on the request (a
    // signature); whether the credential's kind fits the route is asked at `policy check`
    // and again per request (`Credential::fits`).
    if let (None, Some(inj)) = (&r.credential, &r.inject) {
        cx.error(
            inj.span(),
            f("inject"),
            "`inject` needs a `credential` naming the secret to inject",
        );
    }

    let max_body = r.max_body.as_ref().and_then(|m| {
        let parsed = match m.get_ref() {
            RawSize::Bytes(n) if *n > 0 => Ok(*n as u64),
            RawSize::Bytes(_) => Err("must be a positive number of bytes".to_owned()),
            RawSize::Text(t) => parse_size(t),
        };
        match parsed {
            Ok(v) => Some(v),
            Err(e) => {
                cx.error(m.span(), f("max_body"), e);
                None
            }
        }
    });

    let mut duration = |field: &str, raw: &Option<Spanned<String>>| {
        let t = raw.as_ref()?;
        match humantime::parse_duration(t.get_ref()) {
            Ok(d) if d > Duration::ZERO && d <= MAX_ROUTE_TIMEOUT => Some(d),
            Ok(_) => {
                cx.error(
                    t.span(),
                    f(field),
                    "must be longer than zero and at most 24h",
                );
                None
            }
            Err(e) => {
                cx.error(
                    t.span(),
                    f(field),
                    format!(
                        "{:?} is not a duration such as \"5m\" or \"90s\": {e}",
                        t.get_ref()
                    ),
                );
                None
            }
        }
    };
    let timeout = duration("timeout", &r.timeout);
    let idle_timeout = duration("idle_timeout", &r.idle_timeout);

    let rate = match &r.rate {
        Some(text) => match parse_rate(text.get_ref()) {
            Ok(rate) => Some(rate),
            Err(e) => {
                cx.error(text.span(), f("rate"), e);
                None
            }
        },
        None => default_rate,
    };

    let signing = compile_signing(cx, i, r);
    let per_user = r.per_user.as_ref().is_some_and(|b| *b.get_ref());
    if let (Some(b), None) = (&r.per_user, &r.credential) {
        if *b.get_ref() {
            cx.error(
                b.span(),
                f("per_user"),
                "`per_user` needs a `credential` naming the connection users make",
            );
        }
    }
    let permissions = r.permissions.as_ref().and_then(|p| {
        if r.credential.is_none() {
            cx.error(
                p.span(),
                f("permissions"),
                "`permissions` needs a `credential` (a github_app) to mint tokens with",
            );
            return None;
        }
        if p.get_ref().is_empty() {
            cx.error(
                p.span(),
                f("permissions"),
                "must name at least one permission, e.g. { issues = \"read\" }",
            );
            return None;
        }
        let mut out = Vec::new();
        for (name, level) in p.get_ref() {
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !name_ok {
                cx.error(
                    p.span(),
                    f(&format!("permissions.{name}")),
                    format!("{name:?} is not a permission name (lowercase letters, digits, '_')"),
                );
            }
            if !matches!(level.get_ref().as_str(), "read" | "write" | "admin") {
                cx.error(
                    level.span(),
                    f(&format!("permissions.{name}")),
                    format!(
                        "{:?} is not a permission level (read, write or admin)",
                        level.get_ref()
                    ),
                );
            }
            out.push((name.as_str().into(), level.get_ref().as_str().into()));
        }
        Some(out.into_boxed_slice())
    });
    let approval = match &r.approval {
        None => default_approval,
        Some(a) => match a.get_ref().as_str() {
            "none" => Approval::None,
            "session" => Approval::Session,
            "request" => Approval::Request,
            other => {
                cx.error(
                    a.span(),
                    f("approval"),
                    format!(
                        "{other:?} is not an approval kind: use \"session\", \"request\" or \"none\""
                    ),
                );
                Approval::None
            }
        },
    };

    if cx.diags.len() > before {
        return None;
    }
    let (host_text, host, port) = host?;
    Some(Route {
        id: id.as_str().into(),
        host_text,
        host,
        port,
        methods: methods.into_boxed_slice(),
        paths: paths.into_boxed_slice(),
        credential,
        inject,
        insecure_http: r.insecure_http.as_ref().is_some_and(|b| *b.get_ref()),
        max_body,
        rate,
        scan_request: r.scan_request.as_ref().is_none_or(|b| *b.get_ref()),
        timeout,
        idle_timeout,
        signing,
        per_user,
        permissions,
        approval,
        line: Some(line),
        credential_line: r.credential.as_ref().map(|c| cx.lines.line(c.span().start)),
    })
}

/// `service`, `region` and `actions` of a route: lower-case names, and actions of the form
/// `service:Action` for the route's own service.
fn compile_signing(cx: &mut Ctx<'_>, i: usize, r: &RawRoute) -> Signing {
    let f = |name: &str| format!("routes[{i}].{name}");
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let mut signing = Signing::default();
    for (field, raw, slot) in [
        ("service", &r.service, &mut signing.service),
        ("region", &r.region, &mut signing.region),
    ] {
        if let Some(v) = raw {
            if name_ok(v.get_ref()) {
                *slot = Some(v.get_ref().as_str().into());
            } else {
                cx.error(
                    v.span(),
                    f(field),
                    format!(
                        "{:?} is not a valid {field} name (lower-case letters, digits and '-')",
                        v.get_ref()
                    ),
                );
            }
        }
    }
    if let Some(actions) = &r.actions {
        let Some(service) = &r.service else {
            cx.error(
                actions.span(),
                f("actions"),
                "`actions` needs the route's `service` (the actions are that service's)",
            );
            return signing;
        };
        let mut out = Vec::new();
        for (k, a) in actions.get_ref().iter().enumerate() {
            let text = a.get_ref();
            let ok = text.split_once(':').is_some_and(|(svc, action)| {
                svc == service.get_ref()
                    && !action.is_empty()
                    && action
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'*')
            });
            if ok {
                out.push(text.as_str().into());
            } else {
                cx.error(
                    a.span(),
                    f(&format!("actions[{k}]")),
                    format!(
                        "{text:?} is not an action of service {:?} (write \"{}:ActionName\")",
                        service.get_ref(),
                        service.get_ref()
                    ),
                );
            }
        }
        if out.is_empty() && actions.get_ref().is_empty() {
            cx.error(
                actions.span(),
                f("actions"),
                "must list at least one action",
            );
        }
        signing.actions = out.into_boxed_slice();
    }
    signing
}

fn compile_inject(cx: &mut Ctx<'_>, i: usize, inj: &Spanned<RawInject>) -> Option<Inject> {
    let raw = inj.get_ref();
    let f = |name: &str| format!("routes[{i}].inject.{name}");
    let forms = usize::from(raw.header.is_some() || raw.value.is_some())
        + usize::from(raw.query.is_some())
        + usize::from(raw.basic_user.is_some());
    if forms != 1 {
        cx.error(
            inj.span(),
            format!("routes[{i}].inject"),
            "must be exactly one of { header = ..., value = ... }, { query = ... } or \
             { basic_user = ... }",
        );
        return None;
    }
    if let Some(q) = &raw.query {
        let name = q.get_ref();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'~' | b'-'))
        {
            cx.error(
                q.span(),
                f("query"),
                format!("{name:?} is not a valid query parameter name (letters, digits, '_', '.', '~', '-')"),
            );
            return None;
        }
        return Some(Inject::Query { name: name.clone() });
    }
    if let Some(u) = &raw.basic_user {
        let user = u.get_ref();
        if user.is_empty() || user.contains(':') || user.bytes().any(|b| b.is_ascii_control()) {
            cx.error(
                u.span(),
                f("basic_user"),
                format!(
                    "{user:?} is not a valid user name (non-empty, no ':' or control characters)"
                ),
            );
            return None;
        }
        return Some(Inject::BasicUser { user: user.clone() });
    }
    let (Some(h), Some(v)) = (&raw.header, &raw.value) else {
        let (span, field) = match &raw.header {
            Some(h) => (h.span(), "value"),
            None => (inj.span(), "header"),
        };
        cx.error(
            span,
            f(field),
            format!("the header form needs both `header` and `value`; `{field}` is missing"),
        );
        return None;
    };
    let name = match parse_header_name(h.get_ref()) {
        Ok(n) => Some(n),
        Err(msg) => {
            cx.error(h.span(), f("header"), msg);
            None
        }
    };
    let template = v.get_ref();
    let split = match template.split_once("{secret}") {
        Some((prefix, suffix)) if !suffix.contains("{secret}") => {
            if is_header_text(prefix) && is_header_text(suffix) {
                Some((prefix.to_string(), suffix.to_string()))
            } else {
                cx.error(
                    v.span(),
                    f("value"),
                    "contains characters not allowed in a header value (only printable ASCII, \
                     space and tab)",
                );
                None
            }
        }
        _ => {
            cx.error(
                v.span(),
                f("value"),
                format!("{template:?} must contain \"{{secret}}\" exactly once"),
            );
            None
        }
    };
    let (name, (prefix, suffix)) = (name?, split?);
    Some(Inject::Header {
        name,
        prefix,
        suffix,
    })
}

fn is_header_text(s: &str) -> bool {
    s.bytes()
        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
}

/// Whether `lower` (a lower-case header name) is one no credential may set: `host`, the
/// hop-by-hop headers and every `proxy-*` header. Shared by routes' `inject` and the `hmac`
/// kind's signature headers.
pub fn is_reserved_header(lower: &str) -> bool {
    FORBIDDEN_HEADERS.contains(&lower) || lower.starts_with("proxy-")
}

fn parse_header_name(text: &str) -> Result<HeaderName, String> {
    let lower = text.to_ascii_lowercase();
    let name = HeaderName::from_bytes(lower.as_bytes())
        .map_err(|_| format!("{text:?} is not a valid header name"))?;
    // SECURITY: a route must not be able to redirect the request (host), speak to the proxy
    // (proxy-*), or change framing / connection handling (hop-by-hop headers).
    if is_reserved_header(name.as_str()) {
        return Err(format!(
            "{text:?} cannot be injected (host, proxy-* and hop-by-hop headers are reserved)"
        ));
    }
    Ok(name)
}

fn parse_method(text: &str) -> Result<Method, String> {
    const TCHAR_SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    let ok = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || TCHAR_SYMBOLS.contains(&b))
        && text.bytes().any(|b| b.is_ascii_uppercase());
    if !ok {
        return Err(format!("{text:?} is not an upper-case HTTP method"));
    }
    Method::from_bytes(text.as_bytes())
        .map_err(|_| format!("{text:?} is not an upper-case HTTP method"))
}

fn is_agent_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `host`, `*.suffix`, either with an optional `:port`. Returns the display text too.
fn parse_host_pattern(text: &str) -> Result<(Box<str>, HostPattern, PortSpec), String> {
    let (wild, rest) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if rest.contains('*') {
        return Err(format!(
            "{text:?}: '*' is only allowed as the whole first label, as in \"*.example.com\""
        ));
    }
    let (host, port) = parse_host_port(rest).map_err(|e| format!("{text:?}: {e}"))?;
    let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    if wild && is_ip {
        return Err(format!(
            "{text:?}: a wildcard cannot apply to an IP address"
        ));
    }
    let port_spec = port.map_or(PortSpec::Default, PortSpec::Port);
    let display = match (wild, port) {
        (true, Some(p)) => format!("*.{host}:{p}"),
        (true, None) => format!("*.{host}"),
        (false, Some(p)) => format!("{host}:{p}"),
        (false, None) => host.to_string(),
    };
    let pattern = if wild {
        HostPattern::Suffix(host)
    } else {
        HostPattern::Exact(host)
    };
    Ok((display.into_boxed_str(), pattern, port_spec))
}

/// Compile a path pattern; literal parts must already be in normal form.
fn compile_path(text: &str) -> Result<PathPattern, String> {
    let Some(rest) = text.strip_prefix('/') else {
        return Err(format!("{text:?} must start with '/'"));
    };
    let mut segs = Vec::new();
    for seg in rest.split('/') {
        segs.push(match seg {
            "*" => Seg::One,
            "**" => Seg::Any,
            s if s.contains('*') => {
                return Err(format!(
                    "{text:?}: segment {s:?} mixes '*' with other text; use \"*\" or \"**\" as a whole segment"
                ))
            }
            s => Seg::Lit(s.into()),
        });
    }
    match normalize(text) {
        Err(e) => Err(format!("{text:?} is not a safe path: {e}")),
        Ok(n) if n != text => Err(format!(
            "{text:?} is not in normal form; write {:?}",
            n.as_ref()
        )),
        Ok(_) => Ok(PathPattern {
            text: text.into(),
            segs: segs.into_boxed_slice(),
        }),
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use std::path::Path;

    /// Found by `scripts/fuzz` (policy_parse): a DEL byte in a comment gave an empty message.
    #[test]
    fn a_del_byte_in_a_comment_gets_a_message() {
        let diags = crate::policy::AgentPolicy::from_toml(
            Path::new("policies/x.toml"),
            "agent = \"a\"\n# \u{7f}\n",
        )
        .unwrap_err();
        assert!(diags.iter().all(|d| !d.message.is_empty()), "{diags:?}");
        assert_eq!(diags[0].line, Some(2));
    }
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("42").unwrap(), 42);
        for bad in [
            "",
            "0",
            "MiB",
            "10 parsecs",
            "-5",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
