//! Tests for policy loading, validation and matching.

use std::path::PathBuf;

use http::Method;

use super::*;
use crate::authority::Authority;
use crate::deny::Deny;

const FILE: &str = "policies/t.toml";

fn load(text: &str) -> AgentPolicy {
    AgentPolicy::from_toml(Path::new(FILE), text).unwrap_or_else(|d| {
        let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
        panic!("policy should load:\n{}", lines.join("\n"))
    })
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match AgentPolicy::from_toml(Path::new(FILE), text) {
        Ok(_) => panic!("policy should be refused:\n{text}"),
        Err(d) => d,
    }
}

/// A one-route policy with `extra` lines appended to the route table.
fn route_with(fields: &str) -> String {
    format!("agent = \"a\"\n[[routes]]\n{fields}\n")
}

const BASE: &str = "id = \"r\"\nhost = \"api.example.com\"\nmethods = [\"GET\"]\npaths = [\"/x\"]";

/// Assert the single (or first) diagnostic names this field and contains this text.
fn assert_refused(text: &str, field: &str, needle: &str) {
    let d = errors(text);
    assert!(
        d.iter().any(|d| d.field == field
            && d.message.contains(needle)
            && d.severity == Severity::Error),
        "expected {field}: ...{needle}... in {:#?}",
        d.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

fn auth(s: &str) -> Authority {
    Authority::parse(s, Some(443)).expect("valid authority")
}

fn auth_port(s: &str, port: u16) -> Authority {
    Authority::parse(s, Some(port)).expect("valid authority")
}

fn allowed_route(
    p: &AgentPolicy,
    scheme: Scheme,
    a: &Authority,
    m: Method,
    path: &str,
    grant: Grant<'_>,
) -> Result<String, Deny> {
    p.decide(scheme, a, &m, path, grant)
        .map(|ok| ok.route().id().to_string())
}

// ---------------------------------------------------------------- example and happy path

#[test]
fn example_policy_file_loads() {
    let text = include_str!("../../policies/example.toml");
    let p = load(text);
    assert_eq!(p.agent(), "example-agent");
    assert_eq!(p.routes().len(), 2);
    let gh = p.route("github-issues-read").expect("route exists");
    assert_eq!(gh.credential(), Some("github-readonly"));
    assert!(
        matches!(gh.inject(), Some(Inject::Header { name, prefix, suffix })
        if name.as_str() == "authorization" && prefix == "Bearer " && suffix.is_empty())
    );
    assert!(p.routes()[1]
        .inject()
        .is_some_and(|i| matches!(i, Inject::Query { .. })));
    let a = auth("api.github.com");
    assert!(p
        .decide(
            Scheme::Https,
            &a,
            &Method::GET,
            "/repos/acme/backend/issues/12",
            Grant::ALL
        )
        .is_ok());
}

#[test]
fn full_policy_compiles_every_field() {
    let p = load(
        r#"
agent = "support-bot"
max_ttl = "8h"

[[routes]]
id = "github-issues-read"
host = "API.GitHub.com."
methods = ["GET", "HEAD"]
paths = ["/repos/acme/backend/issues", "/repos/acme/backend/issues/**"]
credential = "github-readonly"
inject = { header = "Authorization", value = "Bearer {secret}!" }

[[routes]]
id = "basic"
host = "*.example.com:8443"
methods = ["POST"]
paths = ["/"]
credential = "svc"
inject = { basic_user = "bot" }
insecure_http = true
"#,
    );
    assert_eq!(p.agent(), "support-bot");
    assert_eq!(p.max_ttl(), Some(std::time::Duration::from_secs(8 * 3600)));
    let r = &p.routes()[0];
    assert_eq!(r.host(), "api.github.com");
    assert_eq!(r.credential_line(), Some(10));
    assert_eq!(r.line(), Some(5));
    assert_eq!(r.methods(), &[Method::GET, Method::HEAD]);
    assert_eq!(r.paths().count(), 2);
    match r.inject() {
        Some(Inject::Header {
            name,
            prefix,
            suffix,
        }) => {
            assert_eq!(name.as_str(), "authorization");
            assert_eq!(prefix, "Bearer ");
            assert_eq!(suffix, "!");
        }
        other => panic!("unexpected inject {other:?}"),
    }
    let b = p.route("basic").expect("route");
    assert_eq!(b.host(), "*.example.com:8443");
    assert!(b.insecure_http());
    assert!(matches!(b.inject(), Some(Inject::BasicUser { user }) if user == "bot"));
    assert!(p.route("nope").is_none());
}

#[test]
fn route_without_credential_loads() {
    let p = load(&route_with(BASE));
    assert!(p.routes()[0].credential().is_none());
    assert!(p.routes()[0].inject().is_none());
    assert!(!p.routes()[0].insecure_http());
}

// ---------------------------------------------------------------- diagnostics shape

#[test]
fn diagnostic_names_file_line_and_field() {
    let text = "agent = \"a\"\n\n[[routes]]\nid = \"r\"\nhost = \"h.com\"\nmethods = [\"GET\", \"get\"]\npaths = [\"/x\"]\n";
    let d = errors(text);
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].to_string(),
        "policies/t.toml:6: routes[0].methods[1]: \"get\" is not an upper-case HTTP method"
    );
}

#[test]
fn all_errors_of_a_file_are_reported_with_their_lines() {
    let text = r#"agent = "-bad"
max_ttl = "soon"
[[routes]]
id = "r 1"
host = "*"
methods = []
paths = ["x"]
[[routes]]
id = "ok"
host = "h.com"
methods = ["GET"]
paths = ["/a//b"]
credential = "bad name"
"#;
    let d = errors(text);
    let got: Vec<(Option<usize>, &str)> = d.iter().map(|d| (d.line, d.field.as_str())).collect();
    for want in [
        (Some(1), "agent"),
        (Some(2), "max_ttl"),
        (Some(4), "routes[0].id"),
        (Some(5), "routes[0].host"),
        (Some(6), "routes[0].methods"),
        (Some(7), "routes[0].paths[0]"),
        (Some(12), "routes[1].paths[0]"),
        (Some(13), "routes[1].credential"),
    ] {
        assert!(got.contains(&want), "missing {want:?} in {got:?}");
    }
    assert_eq!(d.len(), 8, "{got:?}");
}

#[test]
fn toml_syntax_error_has_a_line() {
    let d = errors("agent = \"a\"\n\n[[routes]\nid = 1\n");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].line, Some(3), "{}", d[0]);
    assert!(
        d[0].to_string().starts_with("policies/t.toml:3: "),
        "{}",
        d[0]
    );
}

#[test]
fn unknown_field_is_refused_with_its_line() {
    let d = errors(&route_with(&format!("{BASE}\nmethod = [\"GET\"]")));
    assert_eq!(d.len(), 1);
    assert!(d[0].message.contains("unknown field `method`"), "{}", d[0]);
    assert_eq!(d[0].line, Some(7), "{}", d[0]);
    let top = errors("agent = \"a\"\nagnet = \"b\"\n");
    assert!(
        top[0].message.contains("unknown field `agnet`"),
        "{}",
        top[0]
    );
}

#[test]
fn missing_required_field_is_refused() {
    let d = errors("agent = \"a\"\n[[routes]]\nid = \"r\"\nmethods = [\"GET\"]\npaths = [\"/\"]\n");
    assert!(d[0].message.contains("missing field `host`"), "{}", d[0]);
    let d = errors("");
    assert!(d[0].message.contains("missing field `agent`"), "{}", d[0]);
}

#[test]
fn warning_display_has_prefix() {
    let d = Diagnostic {
        file: PathBuf::from("p.toml"),
        line: None,
        field: String::new(),
        message: "m".into(),
        severity: Severity::Warning,
    };
    assert_eq!(d.to_string(), "warning: p.toml: m");
}

// ---------------------------------------------------------------- one test per rejection

#[test]
fn agent_name_rules() {
    for good in ["a", "A1", "support-bot", "x_y.z-1", &"a".repeat(64)] {
        load(&format!("agent = \"{good}\"\n"));
    }
    for bad in ["", "-a", ".a", "_a", "a b", "a/b", "ä", &"a".repeat(65)] {
        assert_refused(
            &format!("agent = \"{bad}\"\n"),
            "agent",
            "not a valid agent name",
        );
    }
}

#[test]
fn invalid_route_id_is_refused() {
    assert_refused(
        &route_with(&BASE.replace("id = \"r\"", "id = \"a b\"")),
        "routes[0].id",
        "not a valid route id",
    );
    assert_refused(
        &route_with(&BASE.replace("id = \"r\"", "id = \"\"")),
        "routes[0].id",
        "not a valid route id",
    );
}

#[test]
fn duplicate_route_id_is_refused_naming_the_first() {
    let text = format!("agent = \"a\"\n[[routes]]\n{BASE}\n[[routes]]\n{BASE}\n");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].field, "routes[1].id");
    assert_eq!(d[0].line, Some(8));
    assert!(d[0].message.contains("routes[0] (line 3)"), "{}", d[0]);
}

#[test]
fn bad_host_patterns_are_refused() {
    for bad in [
        "api.*.x",
        "*x.com",
        "*",
        "*.",
        "a.*",
        "**.x.com",
        "*.*.x.com",
        "*.10.0.0.1",
        "*.[::1]",
        "a_b.com",
        "user@x.com",
        "x.com:0",
        "x.com:99999",
        "x.com:+1",
        "::1",
        "",
        "a..b",
        "010.0.0.1",
    ] {
        let text = route_with(&BASE.replace("api.example.com", bad));
        assert_refused(&text, "routes[0].host", "");
    }
    for good in [
        "*.x.com",
        "x.com:8443",
        "[::1]:8443",
        "127.0.0.1",
        "*.x.com:1",
    ] {
        load(&route_with(&BASE.replace("api.example.com", good)));
    }
}

#[test]
fn empty_methods_are_refused() {
    assert_refused(
        &route_with(&BASE.replace("[\"GET\"]", "[]")),
        "routes[0].methods",
        "at least one",
    );
}

#[test]
fn lower_case_or_invalid_method_is_refused() {
    for bad in ["get", "Get", "", "G T", "GET\n", "123"] {
        let m = bad.replace('\n', "\\n");
        assert_refused(
            &route_with(&BASE.replace("[\"GET\"]", &format!("[\"{m}\"]"))),
            "routes[0].methods[0]",
            "upper-case HTTP method",
        );
    }
    load(&route_with(
        &BASE.replace("[\"GET\"]", "[\"M-SEARCH\", \"PROPFIND\"]"),
    ));
}

#[test]
fn duplicate_method_is_refused() {
    assert_refused(
        &route_with(&BASE.replace("[\"GET\"]", "[\"GET\", \"POST\", \"GET\"]")),
        "routes[0].methods[2]",
        "listed twice",
    );
}

#[test]
fn empty_paths_are_refused() {
    assert_refused(
        &route_with(&BASE.replace("[\"/x\"]", "[]")),
        "routes[0].paths",
        "at least one",
    );
}

#[test]
fn relative_path_is_refused() {
    assert_refused(
        &route_with(&BASE.replace("[\"/x\"]", "[\"x/y\"]")),
        "routes[0].paths[0]",
        "must start with '/'",
    );
}

#[test]
fn segment_mixing_star_and_text_is_refused() {
    for bad in ["/a*", "/a/*b", "/***", "/a/b**"] {
        assert_refused(
            &route_with(&BASE.replace("[\"/x\"]", &format!("[\"{bad}\"]"))),
            "routes[0].paths[0]",
            "mixes '*'",
        );
    }
}

#[test]
fn non_normal_path_is_refused_with_its_normal_form() {
    for (bad, normal) in [
        ("/a//b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/%7euser", "/~user"),
        ("/a%3ab", "/a%3Ab"),
        ("/a/**/../b", "/a/b"),
    ] {
        assert_refused(
            &route_with(&BASE.replace("[\"/x\"]", &format!("[\"{bad}\"]"))),
            "routes[0].paths[0]",
            &format!("write \"{normal}\""),
        );
    }
}

#[test]
fn unsafe_path_pattern_is_refused() {
    for bad in ["/a%2Fb", "/..", "/a\\\\b", "/a/..;/b", "/a b", "/a?b"] {
        assert_refused(
            &route_with(&BASE.replace("[\"/x\"]", &format!("[\"{bad}\"]"))),
            "routes[0].paths[0]",
            "not a safe path",
        );
    }
}

#[test]
fn credential_without_inject_loads_for_kinds_that_sign() {
    // A signing kind (aws_sigv4, hmac) puts itself on the request; whether the stored
    // credential's kind fits a route without `inject` is `Credential::fits`'s question.
    let p = load(&route_with(&format!("{BASE}\ncredential = \"c\"")));
    assert_eq!(p.routes()[0].credential(), Some("c"));
    assert!(p.routes()[0].inject().is_none());
}

#[test]
fn signing_scope_fields_load_and_bad_ones_are_named() {
    let p = load(&route_with(&format!(
        "{BASE}\ncredential = \"aws\"\nservice = \"s3\"\nregion = \"eu-west-1\"\nactions = [\"s3:GetObject\", \"s3:List*\"]"
    )));
    let s = p.routes()[0].signing();
    assert_eq!(s.service.as_deref(), Some("s3"));
    assert_eq!(s.region.as_deref(), Some("eu-west-1"));
    assert_eq!(s.actions.len(), 2);
    assert_refused(
        &route_with(&format!("{BASE}\nservice = \"S3\"")),
        "routes[0].service",
        "not a valid service name",
    );
    assert_refused(
        &route_with(&format!("{BASE}\nregion = \"eu west\"")),
        "routes[0].region",
        "not a valid region name",
    );
    assert_refused(
        &route_with(&format!("{BASE}\nactions = [\"s3:GetObject\"]")),
        "routes[0].actions",
        "needs the route's `service`",
    );
    assert_refused(
        &route_with(&format!(
            "{BASE}\nservice = \"s3\"\nactions = [\"iam:CreateUser\"]"
        )),
        "routes[0].actions[0]",
        "not an action of service",
    );
    assert_refused(
        &route_with(&format!("{BASE}\nservice = \"s3\"\nactions = []")),
        "routes[0].actions",
        "at least one action",
    );
}

#[test]
fn inject_without_credential_is_refused() {
    assert_refused(
        &route_with(&format!("{BASE}\ninject = {{ query = \"k\" }}")),
        "routes[0].inject",
        "needs a `credential`",
    );
}

fn with_inject(inject: &str) -> String {
    route_with(&format!("{BASE}\ncredential = \"c\"\ninject = {inject}"))
}

#[test]
fn reserved_inject_headers_are_refused() {
    for bad in [
        "host",
        "Host",
        "proxy-authorization",
        "Proxy-Foo",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert_refused(
            &with_inject(&format!("{{ header = \"{bad}\", value = \"{{secret}}\" }}")),
            "routes[0].inject.header",
            "cannot be injected",
        );
    }
}

#[test]
fn invalid_inject_header_name_is_refused() {
    for bad in ["", "x y", "x:y", "é"] {
        assert_refused(
            &with_inject(&format!("{{ header = \"{bad}\", value = \"{{secret}}\" }}")),
            "routes[0].inject.header",
            "not a valid header name",
        );
    }
}

#[test]
fn inject_value_needs_exactly_one_secret() {
    for bad in ["Bearer", "{secret}{secret}", "{SECRET}", "{ secret }"] {
        assert_refused(
            &with_inject(&format!("{{ header = \"x-key\", value = \"{bad}\" }}")),
            "routes[0].inject.value",
            "exactly once",
        );
    }
}

#[test]
fn inject_value_with_control_characters_is_refused() {
    for bad in [
        "Bearer {secret}\\r\\nX-Evil: 1",
        "{secret}\\u0000",
        "é {secret}",
    ] {
        assert_refused(
            &with_inject(&format!("{{ header = \"x-key\", value = \"{bad}\" }}")),
            "routes[0].inject.value",
            "not allowed in a header value",
        );
    }
}

#[test]
fn header_form_needs_both_parts() {
    assert_refused(
        &with_inject("{ header = \"x-key\" }"),
        "routes[0].inject.value",
        "missing",
    );
    assert_refused(
        &with_inject("{ value = \"{secret}\" }"),
        "routes[0].inject.header",
        "missing",
    );
}

#[test]
fn invalid_query_name_is_refused() {
    for bad in ["", "a b", "a&b", "a=b"] {
        assert_refused(
            &with_inject(&format!("{{ query = \"{bad}\" }}")),
            "routes[0].inject.query",
            "not a valid query parameter name",
        );
    }
    load(&with_inject("{ query = \"api_key.v-1~\" }"));
}

#[test]
fn invalid_basic_user_is_refused() {
    for bad in ["", "a:b"] {
        assert_refused(
            &with_inject(&format!("{{ basic_user = \"{bad}\" }}")),
            "routes[0].inject.basic_user",
            "not a valid user name",
        );
    }
}

#[test]
fn two_inject_forms_are_refused() {
    assert_refused(
        &with_inject("{ query = \"k\", basic_user = \"u\" }"),
        "routes[0].inject",
        "exactly one of",
    );
    assert_refused(
        &with_inject("{ header = \"x\", value = \"{secret}\", query = \"k\" }"),
        "routes[0].inject",
        "exactly one of",
    );
    assert_refused(&with_inject("{}"), "routes[0].inject", "exactly one of");
}

#[test]
fn unknown_inject_key_is_refused() {
    let d = errors(&with_inject(
        "{ header = \"x\", value = \"{secret}\", extra = 1 }",
    ));
    assert!(d[0].message.contains("unknown field `extra`"), "{}", d[0]);
}

#[test]
fn bad_max_ttl_is_refused() {
    assert_refused(
        "agent = \"a\"\nmax_ttl = \"8 parsecs\"\n",
        "max_ttl",
        "not a duration",
    );
    assert_refused(
        "agent = \"a\"\nmax_ttl = \"0s\"\n",
        "max_ttl",
        "longer than zero",
    );
    let p = load("agent = \"a\"\nmax_ttl = \"15m\"\n");
    assert_eq!(p.max_ttl(), Some(std::time::Duration::from_secs(900)));
}

#[test]
fn invalid_credential_name_is_refused() {
    assert_refused(
        &route_with(&format!(
            "{BASE}\ncredential = \"a b\"\ninject = {{ query = \"k\" }}"
        )),
        "routes[0].credential",
        "not a valid credential name",
    );
}

// ---------------------------------------------------------------- matching

const MATCHING: &str = r#"
agent = "m"

[[routes]]
id = "exact"
host = "api.example.com"
methods = ["GET"]
paths = ["/v1/items", "/v1/items/*"]

[[routes]]
id = "wild"
host = "*.example.org"
methods = ["GET", "POST"]
paths = ["/**"]

[[routes]]
id = "port"
host = "api.example.com:8443"
methods = ["PUT"]
paths = ["/p/**"]

[[routes]]
id = "slash"
host = "slash.test"
methods = ["GET"]
paths = ["/dir/"]

[[routes]]
id = "cred"
host = "secure.test"
methods = ["GET"]
paths = ["/**"]
credential = "c"
inject = { header = "x-key", value = "{secret}" }

[[routes]]
id = "cred-insecure"
host = "lax.test"
methods = ["GET"]
paths = ["/**"]
credential = "c"
inject = { query = "k" }
insecure_http = true

[[routes]]
id = "nocred"
host = "plain.test"
methods = ["GET"]
paths = ["/**"]

[[routes]]
id = "ip"
host = "[::1]:8080"
methods = ["GET"]
paths = ["/"]

[[routes]]
id = "second-exact"
host = "api.example.com"
methods = ["DELETE", "GET"]
paths = ["/v1/items/*", "/v1/other"]

[[routes]]
id = "late-wild"
host = "*.example.com"
methods = ["PATCH"]
paths = ["/**"]
"#;

/// (scheme, host, port, method, path, route that should allow it).
type MatchCase<'a> = (Scheme, &'a str, u16, Method, &'a str, Option<&'a str>);

#[test]
fn matching_table() {
    let p = load(MATCHING);
    let all = Grant::ALL;
    use Scheme::{Http, Https};
    let cases: &[MatchCase<'_>] = &[
        // exact host, first route in file order wins
        (
            Https,
            "api.example.com",
            443,
            Method::GET,
            "/v1/items",
            Some("exact"),
        ),
        (
            Https,
            "api.example.com",
            443,
            Method::GET,
            "/v1/items/7",
            Some("exact"),
        ),
        (
            Https,
            "api.example.com",
            443,
            Method::DELETE,
            "/v1/items/7",
            Some("second-exact"),
        ),
        (
            Https,
            "api.example.com",
            443,
            Method::GET,
            "/v1/other",
            Some("second-exact"),
        ),
        (
            Https,
            "api.example.com",
            443,
            Method::GET,
            "/v1/items/7/x",
            None,
        ),
        (
            Https,
            "api.example.com",
            443,
            Method::POST,
            "/v1/items",
            None,
        ),
        // `*` needs one non-empty segment; trailing slash is distinct
        (
            Https,
            "api.example.com",
            443,
            Method::GET,
            "/v1/items/",
            None,
        ),
        (
            Https,
            "api.example.com",
            443,
            Method::GET,
            "/v1/items/a/",
            None,
        ),
        // wildcard depth: one or more labels, never the bare suffix
        (Https, "x.example.org", 443, Method::GET, "/", Some("wild")),
        (
            Https,
            "a.b.c.example.org",
            443,
            Method::POST,
            "/q/r",
            Some("wild"),
        ),
        (Https, "example.org", 443, Method::GET, "/", None),
        (Https, "xexample.org", 443, Method::GET, "/", None),
        (Https, "x.example.org.evil", 443, Method::GET, "/", None),
        // an exact host also gets the wildcard routes over its parent domain
        (
            Https,
            "api.example.com",
            443,
            Method::PATCH,
            "/anything",
            Some("late-wild"),
        ),
        (
            Https,
            "other.example.com",
            443,
            Method::GET,
            "/v1/items",
            None,
        ),
        // port defaults per scheme
        (
            Http,
            "api.example.com",
            80,
            Method::GET,
            "/v1/items",
            Some("exact"),
        ),
        (Http, "api.example.com", 443, Method::GET, "/v1/items", None),
        (Https, "api.example.com", 80, Method::GET, "/v1/items", None),
        (
            Https,
            "api.example.com",
            8443,
            Method::GET,
            "/v1/items",
            None,
        ),
        // explicit port, any scheme
        (
            Https,
            "api.example.com",
            8443,
            Method::PUT,
            "/p",
            Some("port"),
        ),
        (
            Http,
            "api.example.com",
            8443,
            Method::PUT,
            "/p/q",
            Some("port"),
        ),
        (Https, "api.example.com", 443, Method::PUT, "/p/q", None),
        // trailing slash literal
        (
            Https,
            "slash.test",
            443,
            Method::GET,
            "/dir/",
            Some("slash"),
        ),
        (Https, "slash.test", 443, Method::GET, "/dir", None),
        // insecure_http rule
        (Https, "secure.test", 443, Method::GET, "/x", Some("cred")),
        (Http, "secure.test", 80, Method::GET, "/x", None),
        (
            Http,
            "lax.test",
            80,
            Method::GET,
            "/x",
            Some("cred-insecure"),
        ),
        (Http, "plain.test", 80, Method::GET, "/x", Some("nocred")),
        // IP literal
        (Https, "[::1]", 8080, Method::GET, "/", Some("ip")),
        (Https, "[0::1]", 8080, Method::GET, "/", Some("ip")),
        (Https, "[::2]", 8080, Method::GET, "/", None),
        // unknown host
        (Https, "other.test", 443, Method::GET, "/", None),
    ];
    for (scheme, host, port, method, path, want) in cases {
        let a = auth_port(host, *port);
        let got = allowed_route(&p, *scheme, &a, method.clone(), path, all);
        assert_eq!(
            got.as_deref().ok(),
            *want,
            "{scheme:?} {method} {host}:{port}{path} -> {got:?}"
        );
    }
}

#[test]
fn unknown_host_is_host_not_allowed() {
    let p = load(MATCHING);
    let err = allowed_route(
        &p,
        Scheme::Https,
        &auth("other.test"),
        Method::GET,
        "/",
        Grant::ALL,
    )
    .expect_err("denied");
    assert!(
        matches!(&err, Deny::HostNotAllowed { agent, host } if agent == "m" && host == "other.test:443")
    );
    assert_eq!(err.code(), "host_not_allowed");
    // wrong port is also a host refusal
    let err = allowed_route(
        &p,
        Scheme::Https,
        &auth_port("slash.test", 8443),
        Method::GET,
        "/dir/",
        Grant::ALL,
    )
    .expect_err("denied");
    assert_eq!(err.code(), "host_not_allowed");
}

#[test]
fn deny_details_explain_why() {
    let p = load(MATCHING);
    // Each refusal is a typed reason with its own code, and its detail names the route.
    let deny = |scheme, a: &str, port, m: Method, path: &str, grant| {
        allowed_route(&p, scheme, &auth_port(a, port), m, path, grant).expect_err("denied")
    };
    let d = deny(
        Scheme::Https,
        "slash.test",
        443,
        Method::GET,
        "/x",
        Grant::ALL,
    );
    assert_eq!(d.code(), "no_route");
    assert_eq!(
        d.to_string(),
        "GET /x matches no route of agent m for slash.test:443"
    );
    let d = deny(
        Scheme::Https,
        "slash.test",
        443,
        Method::POST,
        "/dir/",
        Grant::ALL,
    );
    assert_eq!(d.code(), "method_not_allowed");
    let text = d.to_string();
    assert!(
        text.contains("POST is not allowed for /dir/")
            && text.contains("route slash allows only GET"),
        "{text}"
    );
    let only = vec!["exact".to_string()];
    let d = deny(
        Scheme::Https,
        "x.example.org",
        443,
        Method::GET,
        "/",
        Grant(Some(&only)),
    );
    assert_eq!(d.code(), "route_not_granted");
    assert!(
        d.to_string()
            .contains("route wild matches GET / on x.example.org:443 but is not granted"),
        "{d}"
    );
    let d = deny(
        Scheme::Http,
        "secure.test",
        80,
        Method::GET,
        "/x",
        Grant::ALL,
    );
    assert_eq!(d.code(), "insecure_http_refused");
    assert!(
        d.to_string()
            .contains("route cred injects a credential and insecure_http is not set"),
        "{d}"
    );
}

#[test]
fn grant_narrows_routes() {
    let p = load(MATCHING);
    let a = auth("api.example.com");
    let only_second = vec!["second-exact".to_string()];
    // the first matching route is not granted, so the next one in file order decides
    assert_eq!(
        allowed_route(
            &p,
            Scheme::Https,
            &a,
            Method::GET,
            "/v1/items/7",
            Grant(Some(&only_second))
        )
        .ok()
        .as_deref(),
        Some("second-exact")
    );
    assert_eq!(
        allowed_route(
            &p,
            Scheme::Https,
            &a,
            Method::GET,
            "/v1/items/7",
            Grant::ALL
        )
        .ok()
        .as_deref(),
        Some("exact")
    );
    let only_exact = vec!["exact".to_string()];
    assert!(allowed_route(
        &p,
        Scheme::Https,
        &a,
        Method::POST,
        "/z",
        Grant(Some(&only_exact))
    )
    .is_err());
    let none: Vec<String> = Vec::new();
    assert!(allowed_route(
        &p,
        Scheme::Https,
        &a,
        Method::GET,
        "/v1/items",
        Grant(Some(&none))
    )
    .is_err());
}

#[test]
fn allows_host_respects_port_scheme_and_grant() {
    let p = load(MATCHING);
    let all = Grant::ALL;
    assert!(p.allows_host(Scheme::Https, &auth("api.example.com"), all));
    assert!(p.allows_host(Scheme::Https, &auth("deep.a.example.org"), all));
    assert!(!p.allows_host(Scheme::Https, &auth("example.org"), all));
    assert!(!p.allows_host(Scheme::Https, &auth_port("slash.test", 80), all));
    assert!(p.allows_host(Scheme::Http, &auth_port("slash.test", 80), all));
    assert!(p.allows_host(Scheme::Https, &auth_port("api.example.com", 8443), all));
    assert!(!p.allows_host(Scheme::Https, &auth("nowhere.test"), all));
    let only = vec!["slash".to_string()];
    assert!(!p.allows_host(Scheme::Https, &auth("api.example.com"), Grant(Some(&only))));
    assert!(p.allows_host(Scheme::Https, &auth("slash.test"), Grant(Some(&only))));
}

#[test]
fn wildcard_never_matches_ip_literals() {
    // Refused at load (a numeric last label must be a full IPv4 address) ...
    assert_refused(
        &route_with(&BASE.replace("api.example.com", "*.0.1")),
        "routes[0].host",
        "IPv4",
    );
    // ... and the index never walks the suffixes of an IP literal.
    let p = load(&route_with(
        &BASE.replace("api.example.com", "*.example.com"),
    ));
    assert!(!p.allows_host(Scheme::Https, &auth("10.0.0.1"), Grant::ALL));
}

#[test]
fn decision_is_on_normalised_path_only() {
    let p = load(MATCHING);
    let a = auth("api.example.com");
    let raw = "/v1//x/../items/%37";
    let path = normalize(raw).expect("safe");
    assert_eq!(path, "/v1/items/7");
    assert!(p
        .decide(Scheme::Https, &a, &Method::GET, &path, Grant::ALL)
        .is_ok());
}

#[test]
fn ten_thousand_routes_over_a_thousand_hosts_load_and_decide() {
    let mut text = String::from("agent = \"big\"\n");
    for i in 0..10_000usize {
        let host = i % 1000;
        let host = if host.is_multiple_of(10) {
            format!("*.w{host}.example.com")
        } else {
            format!("h{host}.example.com")
        };
        text.push_str(&format!(
            "[[routes]]\nid = \"r{i}\"\nhost = \"{host}\"\nmethods = [\"GET\"]\npaths = [\"/v{i}/*\", \"/x/{i}/**\"]\ncredential = \"c{i}\"\ninject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n"
        ));
    }
    let start = std::time::Instant::now();
    let p = load(&text);
    assert_eq!(p.routes().len(), 10_000);
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    // credential line of the last route: 8 lines per route after line 1
    assert_eq!(
        p.route("r9999").and_then(|r| r.credential_line()),
        Some(1 + 9999 * 7 + 6)
    );
    for i in [1usize, 999, 5_001, 9_999, 7_777] {
        let host = i % 1000;
        let a = auth(&format!("h{host}.example.com"));
        let got = allowed_route(
            &p,
            Scheme::Https,
            &a,
            Method::GET,
            &format!("/v{i}/q"),
            Grant::ALL,
        );
        assert_eq!(got.ok(), Some(format!("r{i}")));
        // a path of another route on another host is denied
        let other = (i + 1) % 10_000;
        assert!(allowed_route(
            &p,
            Scheme::Https,
            &a,
            Method::GET,
            &format!("/v{other}/q"),
            Grant::ALL
        )
        .is_err());
    }
    let a = auth("deep.sub.w420.example.com");
    let got = allowed_route(&p, Scheme::Https, &a, Method::GET, "/x/9420", Grant::ALL);
    assert_eq!(got.ok().as_deref(), Some("r9420"));
    assert!(matches!(
        allowed_route(
            &p,
            Scheme::Https,
            &auth("w420.example.com"),
            Method::GET,
            "/x/420",
            Grant::ALL
        ),
        Err(Deny::HostNotAllowed { .. })
    ));
}

// ---------------------------------------------------------------- directory loading

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write test file");
}

#[test]
fn load_dir_loads_good_files_and_reports_bad_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.toml", &route_with(BASE));
    write(dir.path(), "b.toml", "agent = \"b\"\nmax_ttl = \"x\"\n");
    write(dir.path(), "c.toml", "agent = \"c\"\n");
    write(dir.path(), "notes.txt", "agent = = broken");
    std::fs::create_dir(dir.path().join("sub.toml")).expect("mkdir");
    let report = Policies::load_dir(dir.path()).expect("readable");
    assert!(report.has_errors());
    assert_eq!(report.diagnostics.len(), 1, "{:?}", report.diagnostics);
    assert!(report.diagnostics[0].file.ends_with("b.toml"));
    let names: Vec<&str> = report.policies.agents().map(|p| p.agent()).collect();
    assert_eq!(names, ["a", "c"]);
    assert!(report.policies.get("a").is_some());
    assert!(report.policies.get("b").is_none());
}

#[test]
fn same_agent_in_two_files_is_an_error_naming_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "one.toml", "agent = \"dup\"\n");
    write(dir.path(), "two.toml", "agent = \"dup\"\n");
    write(dir.path(), "three.toml", "agent = \"other\"\n");
    let report = Policies::load_dir(dir.path()).expect("readable");
    assert!(report.has_errors());
    assert_eq!(report.diagnostics.len(), 2);
    for d in &report.diagnostics {
        assert!(
            d.message.contains("one.toml") && d.message.contains("two.toml"),
            "{d}"
        );
    }
    assert!(report.policies.get("dup").is_none());
    assert!(report.policies.get("other").is_some());
}

#[test]
fn missing_dir_is_empty_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = Policies::load_dir(&dir.path().join("absent")).expect("not an io error");
    assert!(!report.has_errors());
    assert_eq!(report.diagnostics.len(), 1);
    assert_eq!(report.diagnostics[0].severity, Severity::Warning);
    assert_eq!(report.policies.agents().count(), 0);
    assert!(Policies::empty().get("x").is_none());
}

#[test]
fn missing_credentials_are_warnings_with_lines() {
    let text = format!(
        "agent = \"a\"\n[[routes]]\n{BASE}\ncredential = \"gone\"\ninject = {{ query = \"k\" }}\n"
    );
    let policies = Policies::from_policies([load(&text)]);
    let known = |name: &str| name == "present";
    let d = policies.missing_credentials(&known);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].severity, Severity::Warning);
    assert_eq!(d[0].line, Some(7));
    assert_eq!(d[0].field, "routes[0].credential");
    assert!(d[0]
        .to_string()
        .starts_with("warning: policies/t.toml:7: routes[0].credential: "));
    assert!(policies.missing_credentials(&|_| true).is_empty());
}

#[test]
fn route_rate_overrides_the_agent_default() {
    let p = load(&format!(
        "agent = \"a\"\nrate = \"100/h\"\n[[routes]]\n{BASE}\nrate = \"10/min\"\n\
         [[routes]]\nid = \"s\"\nhost = \"api.example.com\"\nmethods = [\"GET\"]\npaths = [\"/y\"]\n"
    ));
    let own = p.route("r").unwrap().rate().unwrap();
    assert_eq!((own.count, own.period.as_secs()), (10, 60));
    let default = p.route("s").unwrap().rate().unwrap();
    assert_eq!((default.count, default.period.as_secs()), (100, 3600));
    assert!(load(&route_with(BASE)).routes()[0].rate().is_none());
}

#[test]
fn bad_route_rate_is_refused_with_its_field() {
    assert_refused(
        &route_with(&format!("{BASE}\nrate = \"10/fortnight\"")),
        "routes[0].rate",
        "is not a rate",
    );
    assert_refused(
        &route_with(&format!("{BASE}\nrate = \"0/s\"")),
        "routes[0].rate",
        "at least 1",
    );
}

#[test]
fn bad_agent_default_rate_is_refused_with_its_line() {
    let d = errors(&format!(
        "agent = \"a\"\nrate = \"fast\"\n[[routes]]\n{BASE}\n"
    ));
    assert!(
        d.iter()
            .any(|d| d.field == "rate" && d.line == Some(2) && d.message.contains("not a rate")),
        "{d:?}"
    );
}

#[test]
fn scan_request_defaults_to_on_and_can_be_turned_off() {
    assert!(load(&route_with(BASE)).routes()[0].scan_request());
    let p = load(&route_with(&format!("{BASE}\nscan_request = false")));
    assert!(!p.routes()[0].scan_request());
}

#[test]
fn scan_request_that_is_not_a_boolean_is_refused() {
    // A type error is serde's: it names the line of the field.
    let d = errors(&route_with(&format!("{BASE}\nscan_request = \"no\"")));
    assert!(
        d.iter().any(|d| d.line == Some(7)
            && d.message.contains("expected a boolean")
            && d.severity == Severity::Error),
        "{:#?}",
        d.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

#[test]
fn route_timeouts_are_typed_at_load() {
    let p = load(&route_with(&format!(
        "{BASE}\ntimeout = \"5m\"\nidle_timeout = \"90s\""
    )));
    let r = &p.routes()[0];
    assert_eq!(r.timeout(), Some(std::time::Duration::from_secs(300)));
    assert_eq!(r.idle_timeout(), Some(std::time::Duration::from_secs(90)));
    let none = load(&route_with(BASE));
    assert_eq!(none.routes()[0].timeout(), None);
    assert_eq!(none.routes()[0].idle_timeout(), None);
}

#[test]
fn bad_route_timeouts_are_refused_with_their_field() {
    for (field, value, needle) in [
        ("timeout", "\"forever\"", "not a duration"),
        ("timeout", "\"0s\"", "longer than zero"),
        ("timeout", "\"3d\"", "at most 24h"),
        ("idle_timeout", "\"5 minutes please\"", "not a duration"),
        ("idle_timeout", "\"0ms\"", "longer than zero"),
    ] {
        assert_refused(
            &route_with(&format!("{BASE}\n{field} = {value}")),
            &format!("routes[0].{field}"),
            needle,
        );
    }
}

const CREDENTIALED: &str =
    "credential = \"github\"\ninject = { header = \"authorization\", value = \"Bearer {secret}\" }";

#[test]
fn per_user_and_permissions_load_and_default_off() {
    let p = load(&route_with(&format!("{BASE}\n{CREDENTIALED}")));
    assert!(!p.routes()[0].per_user());
    assert!(p.routes()[0].permissions().is_none());
    let p = load(&route_with(&format!(
        "{BASE}\n{CREDENTIALED}\nper_user = true\npermissions = {{ issues = \"read\", contents = \"write\" }}"
    )));
    assert!(p.routes()[0].per_user());
    let perms: Vec<(&str, &str)> = p.routes()[0]
        .permissions()
        .unwrap()
        .iter()
        .map(|(n, l)| (&**n, &**l))
        .collect();
    assert_eq!(perms, [("contents", "write"), ("issues", "read")]);
}

#[test]
fn per_user_and_permissions_without_a_credential_or_with_bad_levels_are_refused() {
    assert_refused(
        &route_with(&format!("{BASE}\nper_user = true")),
        "routes[0].per_user",
        "needs a `credential`",
    );
    assert_refused(
        &route_with(&format!("{BASE}\npermissions = {{ issues = \"read\" }}")),
        "routes[0].permissions",
        "needs a `credential`",
    );
    assert_refused(
        &route_with(&format!(
            "{BASE}\n{CREDENTIALED}\npermissions = {{ issues = \"everything\" }}"
        )),
        "routes[0].permissions.issues",
        "read, write or admin",
    );
    assert_refused(
        &route_with(&format!("{BASE}\n{CREDENTIALED}\npermissions = {{}}")),
        "routes[0].permissions",
        "at least one",
    );
    assert_refused(
        &route_with(&format!(
            "{BASE}\n{CREDENTIALED}\npermissions = {{ \"Issues!\" = \"read\" }}"
        )),
        "routes[0].permissions.Issues!",
        "not a permission name",
    );
}

#[test]
fn approval_is_none_by_default_and_set_per_route_or_agent() {
    let p = load(&route_with(BASE));
    assert_eq!(p.routes()[0].approval(), Approval::None);
    let p = load(&route_with(&format!("{BASE}\napproval = \"request\"")));
    assert_eq!(p.routes()[0].approval(), Approval::Request);
    let text = format!(
        "agent = \"a\"\napproval = \"session\"\n[[routes]]\n{BASE}\n[[routes]]\n{}\napproval = \"request\"\n[[routes]]\n{}\napproval = \"none\"\n",
        BASE.replace("\"r\"", "\"r2\""),
        BASE.replace("\"r\"", "\"r3\"")
    );
    let p = load(&text);
    let kinds: Vec<Approval> = p.routes().iter().map(|r| r.approval()).collect();
    assert_eq!(
        kinds,
        [Approval::Session, Approval::Request, Approval::None]
    );
}

#[test]
fn an_unknown_approval_kind_is_refused_naming_the_field() {
    assert_refused(
        &route_with(&format!("{BASE}\napproval = \"always\"")),
        "routes[0].approval",
        "is not an approval kind",
    );
    assert_refused(
        &format!("agent = \"a\"\napproval = \"request\"\n[[routes]]\n{BASE}\n"),
        "approval",
        "set per route",
    );
    assert_refused(
        &format!("agent = \"a\"\napproval = \"maybe\"\n[[routes]]\n{BASE}\n"),
        "approval",
        "is not an approval kind",
    );
}
