//! Gateway (base-URL) mode: `http://latchkey/gw/<route-id>/<path>` with the latchkey token as
//! the API key, no proxy, no CA. Real clients (curl, raw sockets, the `openai` npm SDK on
//! Node's built-in fetch, the OpenAI and Anthropic Python SDKs) against the fake
//! OpenAI/Anthropic API of the test upstream; every test asserts what the agent got, what
//! the upstream got and what the audit log holds. The TLS listener (`--listen-tls`) serves
//! both modes with a certificate from latchkey's CA.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// The Anthropic route's credential (the `github` secret, [`SECRET`], is the OpenAI route's).
const ANTHROPIC_SECRET: &str = "anthropic-UPSTREAM-value-5c4b3a";

/// The standard policy plus the gateway routes: `openai` (Bearer injection on the API host),
/// `anthropic` (x-api-key injection on the other host, 4 KiB bodies), `no-credential`, a
/// wildcard route, and an agent `other` with a route of its own.
fn gw_home() -> Home {
    let home = Home::new();
    let port = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "openai"
host = "{API_HOST}:{port}"
methods = ["GET", "POST"]
paths = ["/v1/chat/completions", "/v1/models", "/drip"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "anthropic"
host = "{OTHER_HOST}:{port}"
methods = ["POST"]
paths = ["/v1/messages"]
credential = "anthropic-key"
inject = {{ header = "x-api-key", value = "{{secret}}" }}
max_body = "4KiB"

[[routes]]
id = "no-credential"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/open/**"]

[[routes]]
id = "wild"
host = "*.example.test:{port}"
methods = ["GET"]
paths = ["/wild/**"]
"#
    ));
    home.write_policy(
        "other.toml",
        &format!(
            r#"agent = "other"

[[routes]]
id = "other-route"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/v1/models"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    );
    home.set_secret("github", SECRET);
    home.set_secret("anthropic-key", ANTHROPIC_SECRET);
    home
}

fn gw_ready(serve_flags: &[&str]) -> (Home, Proxy, String) {
    let home = gw_home();
    let token = home.issue("bot", &[]);
    let proxy = home.serve(serve_flags);
    (home, proxy, token)
}

/// One raw HTTP/1.1 request to latchkey's listener: `target` as written (origin or absolute
/// form), `headers` as `Name: value` lines, `body` with its Content-Length.
fn raw(proxy: &Proxy, method: &str, target: &str, headers: &[&str], body: &str) -> RawResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {}\r\n", proxy.addr);
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    raw_proxy(proxy.addr, req.as_bytes()).expect("an answer from latchkey")
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// The audit line whose `path` is `path` (waiting for it: the writer is asynchronous).
fn line_for(home: &Home, path: &str) -> Value {
    eventually(Duration::from_secs(10), "the audit line", || {
        home.audit().into_iter().rev().find(|l| l["path"] == path)
    })
}

/// The token appears nowhere it must not: not in what the upstream got, not in the audit
/// log, not in latchkey's own log.
fn assert_token_kept(home: &Home, proxy: &Proxy, token: &str) {
    for seen in home.upstream.seen() {
        assert!(!seen.everything().contains(token), "upstream got the token");
        assert!(
            !String::from_utf8_lossy(&seen.body).contains(token),
            "upstream got the token in a body"
        );
    }
    let audit = std::fs::read_to_string(home.state().join("audit.jsonl")).unwrap_or_default();
    assert!(!audit.contains(token), "the audit log holds the token");
    assert!(
        !proxy.log().contains(token),
        "latchkey's log holds the token"
    );
}

#[test]
fn a_gateway_request_goes_to_the_route_host_with_the_credential_and_never_the_token() {
    let (home, proxy, token) = gw_ready(&[]);
    for (i, key_header) in [
        bearer(&token),
        format!("x-api-key: {token}"),
        format!("api-key: {token}"),
    ]
    .iter()
    .enumerate()
    {
        let r = raw(
            &proxy,
            "GET",
            &format!("/gw/openai/v1/models?limit={i}&order=asc"),
            &[key_header, "x-custom: kept"],
            "",
        );
        assert_eq!(r.status, 200, "{key_header}: {}{}", r.head, r.text());
        let echoed = r.json();
        assert_eq!(echoed["path"], "/v1/models");
        assert_eq!(echoed["query"], format!("limit={i}&order=asc"));
        let seen = home.upstream.seen().pop().unwrap();
        assert_eq!(seen.path, "/v1/models");
        assert_eq!(
            seen.authority.as_deref(),
            Some(home.api_authority().as_str())
        );
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert_eq!(seen.header("x-custom"), Some("kept"));
        assert_eq!(seen.header("x-api-key"), None, "{key_header}");
        assert_eq!(seen.header("api-key"), None, "{key_header}");
        assert!(r.header("x-latchkey-request-id").is_some());
    }
    let line = line_for(&home, "/v1/models");
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["outcome"], "ok");
    assert_eq!(line["agent"], "bot");
    assert_eq!(line["route"], "openai");
    assert_eq!(line["credential"], "github");
    assert_eq!(line["host"], home.api_authority());
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 200);
    assert_token_kept(&home, &proxy, &token);
}

#[test]
fn the_agents_own_key_never_reaches_upstream_even_on_a_route_without_a_credential() {
    let (home, proxy, token) = gw_ready(&[]);
    let r = raw(
        &proxy,
        "GET",
        "/gw/no-credential/open/thing",
        &[&bearer(&token), &format!("x-api-key: {token}")],
        "",
    );
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = home.upstream.seen().pop().unwrap();
    assert_eq!(seen.path, "/open/thing");
    for name in ["authorization", "x-api-key", "api-key"] {
        assert_eq!(seen.header(name), None, "{name}");
    }
    // The Anthropic route injects x-api-key on the other host: the upstream gets ours only.
    let r = raw(
        &proxy,
        "POST",
        "/gw/anthropic/v1/messages",
        &[
            &format!("x-api-key: {token}"),
            "content-type: application/json",
        ],
        r#"{"model":"m","max_tokens":5,"messages":[]}"#,
    );
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = home.upstream.seen().pop().unwrap();
    assert_eq!(
        seen.authority.as_deref(),
        Some(format!("{OTHER_HOST}:{}", home.https_port()).as_str())
    );
    assert_eq!(seen.header("x-api-key"), Some(ANTHROPIC_SECRET));
    assert_eq!(seen.header("authorization"), None);
    let line = line_for(&home, "/v1/messages");
    assert_eq!(line["route"], "anthropic");
    assert_eq!(line["host"], format!("{OTHER_HOST}:{}", home.https_port()));
    assert_token_kept(&home, &proxy, &token);
}

#[test]
fn token_failures_are_answered_401_with_a_bearer_challenge_as_an_api_would() {
    let (home, proxy, token) = gw_ready(&[]);
    let now = latchkey::auth::unix_now();
    let expired = sign_claims(
        &home,
        &json!({"iss":"latchkey","aud":"latchkey-proxy","sub":"bot","jti":"gw-expired",
            "iat": now - 120, "exp": now - 60}),
    );
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        ("no token".into(), vec![], "token_missing"),
        (
            "not a token".into(),
            vec![bearer("not-a-jwt")],
            "token_invalid",
        ),
        ("expired".into(), vec![bearer(&expired)], "token_expired"),
        (
            "Basic instead of Bearer".into(),
            vec!["Authorization: Basic Zm9vOmJhcg==".into()],
            "token_invalid",
        ),
        (
            "a proxy password is not an API key".into(),
            vec![format!("Proxy-Authorization: Bearer {token}")],
            "token_missing",
        ),
    ];
    for (what, headers, reason) in &cases {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let r = raw(&proxy, "GET", "/gw/openai/v1/models", &headers, "");
        assert_eq!(r.status, 401, "{what}: {}{}", r.head, r.text());
        assert_eq!(r.reason(), *reason, "{what}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
        assert!(r.header("proxy-authenticate").is_none(), "{what}");
    }
    // The expired token was ours: its refusal still names who tried.
    let line = eventually(Duration::from_secs(10), "the expired line", || {
        home.audit()
            .into_iter()
            .find(|l| l["reason"] == "token_expired")
    });
    assert_eq!(line["agent"], "bot");
    assert_eq!(line["session"], "gw-expired");
    assert_eq!(line["status"], 401);
    // Revoked while in use: the next request is 401.
    let r = raw(
        &proxy,
        "GET",
        "/gw/openai/v1/models",
        &[&bearer(&token)],
        "",
    );
    assert_eq!(r.status, 200);
    home.run_ok(&["token", "revoke", "--agent", "bot"]);
    let r = eventually(Duration::from_secs(10), "the revocation", || {
        let r = raw(
            &proxy,
            "GET",
            "/gw/openai/v1/models",
            &[&bearer(&token)],
            "",
        );
        (r.status == 401).then_some(r)
    });
    assert_eq!(r.reason(), "token_revoked");
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("invalid_token"));
    // Only allowed requests reached the upstream, each with our credential.
    let seen = home.upstream.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(s.path, "/v1/models");
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
    }
    assert_token_kept(&home, &proxy, &token);
}

#[test]
fn traversal_and_escapes_cannot_move_a_request_to_another_route() {
    let (home, proxy, token) = gw_ready(&[]);
    let auth = bearer(&token);
    let cases: &[(&str, u16, &str)] = &[
        ("/gw/openai/../anthropic/v1/messages", 400, "bad_path"),
        ("/gw/openai/%2e%2e/anthropic/v1/messages", 400, "bad_path"),
        ("/gw/openai/%2E%2E/%2e%2e/v1/models", 400, "bad_path"),
        ("/gw/openai/v1%2fmodels", 400, "bad_path"),
        ("/gw/openai/v1%5cmodels", 400, "bad_path"),
        ("/gw/../openai/v1/models", 400, "bad_path"),
        ("/gw/./openai/v1/models", 400, "bad_path"),
        ("/gw/%6fpenai/v1/models", 403, "no_route"),
        ("/gw/openai%2f..%2fanthropic/v1/messages", 403, "no_route"),
        ("/gw//v1/models", 400, "bad_request"),
        ("/gw", 400, "bad_request"),
    ];
    for (target, status, reason) in cases {
        let r = raw(&proxy, "POST", target, &[&auth], "{}");
        assert_eq!(r.status, *status, "{target}: {}{}", r.head, r.text());
        assert_eq!(r.reason(), *reason, "{target}");
    }
    // Inside the route, dot segments resolve as usual and the upstream gets the result.
    let r = raw(&proxy, "GET", "/gw/openai/v1/x/../models", &[&auth], "");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = home.upstream.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the in-route request went out: {seen:?}"
    );
    assert_eq!(seen[0].path, "/v1/models");
    let lines = home.wait_audit(cases.len() + 1);
    assert!(lines[..cases.len()]
        .iter()
        .all(|l| l["decision"] == "deny" && l["agent"] == "bot"));
}

#[test]
fn a_route_of_another_agent_an_ungranted_route_and_a_wildcard_route_are_refused() {
    let home = gw_home();
    let narrowed = home.issue("bot", &["--route", "openai"]);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let r = raw(
        &proxy,
        "GET",
        "/gw/other-route/v1/models",
        &[&bearer(&token)],
        "",
    );
    assert_eq!(
        (r.status, r.reason()),
        (403, "no_route".into()),
        "{}",
        r.text()
    );
    assert!(r.text().contains("other-route"), "{}", r.text());
    let r = raw(
        &proxy,
        "POST",
        "/gw/anthropic/v1/messages",
        &[&bearer(&narrowed)],
        "{}",
    );
    assert_eq!(
        (r.status, r.reason()),
        (403, "route_not_granted".into()),
        "{}",
        r.text()
    );
    let r = raw(&proxy, "GET", "/gw/wild/wild/x", &[&bearer(&token)], "");
    assert_eq!((r.status, r.reason()), (403, "no_route".into()));
    assert!(r.text().contains("wildcard"), "{}", r.text());
    // Only the named route decides: issues-read allows GET only, although issues-write (same
    // host and path) allows POST.
    let r = raw(
        &proxy,
        "POST",
        "/gw/issues-read/repos/acme/backend/issues",
        &[&bearer(&token)],
        "{}",
    );
    assert_eq!(
        (r.status, r.reason()),
        (403, "method_not_allowed".into()),
        "{}",
        r.text()
    );
    // A path outside the route is no_route, even if another route of the host has it.
    let r = raw(
        &proxy,
        "GET",
        "/gw/openai/repos/acme/backend/issues",
        &[&bearer(&token)],
        "",
    );
    assert_eq!((r.status, r.reason()), (403, "no_route".into()));
    assert!(home.upstream.seen().is_empty());
    // `policy check` says which routes gateway mode cannot use.
    let out = home.run(&["policy", "check"]);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("wild") && text.contains("gateway"),
        "policy check: {text}"
    );
}

#[test]
fn tokens_in_two_headers_or_in_the_query_are_refused_and_never_logged() {
    let (home, proxy, token) = gw_ready(&[]);
    let other = home.issue("bot", &[]);
    let r = raw(
        &proxy,
        "GET",
        "/gw/openai/v1/models",
        &[&bearer(&token), &format!("x-api-key: {other}")],
        "",
    );
    assert_eq!((r.status, r.reason()), (400, "bad_request".into()));
    // The same token twice is one token.
    let r = raw(
        &proxy,
        "GET",
        "/gw/openai/v1/models",
        &[&bearer(&token), &format!("api-key: {token}")],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // In the query only: not accepted.
    let r = raw(
        &proxy,
        "GET",
        &format!("/gw/openai/v1/models?key={token}"),
        &[],
        "",
    );
    assert_eq!((r.status, r.reason()), (401, "token_missing".into()));
    // In the query next to the header: refused, since it would go upstream.
    let encoded: String = token.replace('.', "%2E");
    for query in [format!("api_key={token}"), format!("k={encoded}")] {
        let r = raw(
            &proxy,
            "GET",
            &format!("/gw/openai/v1/models?{query}"),
            &[&bearer(&token)],
            "",
        );
        assert_eq!(
            (r.status, r.reason()),
            (400, "bad_request".into()),
            "{query}"
        );
        assert!(r.text().contains("query"), "{}", r.text());
    }
    assert_eq!(home.upstream.seen().len(), 1);
    home.wait_audit(5);
    assert_token_kept(&home, &proxy, &token);
    assert_token_kept(&home, &proxy, &other);
}

#[test]
fn absolute_form_and_a_foreign_host_header_cannot_choose_the_upstream() {
    let (home, proxy, token) = gw_ready(&[]);
    // The Host header names another host the agent could reach: ignored, the route decides.
    for host in [
        format!("{OTHER_HOST}:{}", home.https_port()),
        "evil.invalid".to_string(),
    ] {
        let req = format!(
            "GET /gw/openai/v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        let r = raw_proxy(proxy.addr, req.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        let seen = home.upstream.seen().pop().unwrap();
        assert_eq!(
            seen.authority.as_deref(),
            Some(home.api_authority().as_str()),
            "{host}"
        );
    }
    // Absolute form is proxy mode, whatever its path: a gateway path on latchkey's own
    // address is a proxy target like any other, and the API key is no proxy password.
    let target = format!("http://{}/gw/openai/v1/models", proxy.addr);
    let r = raw(&proxy, "GET", &target, &[&bearer(&token)], "");
    assert_eq!((r.status, r.reason()), (407, "token_missing".into()));
    let r = raw(
        &proxy,
        "GET",
        &target,
        &[&format!("Proxy-Authorization: Bearer {token}")],
        "",
    );
    assert_eq!((r.status, r.reason()), (403, "host_not_allowed".into()));
    let target = format!("http://{}/gw/openai/v1/models", home.api_authority());
    let r = raw(
        &proxy,
        "GET",
        &target,
        &[&format!("Proxy-Authorization: Bearer {token}")],
        "",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(home.upstream.seen().len(), 2);
}

#[test]
fn an_upgrade_asked_of_the_gateway_is_stripped_and_never_reaches_the_upstream() {
    // WebSocket is served inside tunnels only; in gateway mode `Upgrade` and `Connection`
    // are hop-by-hop like any other, so the upstream sees a plain GET and answers it.
    let (home, proxy, token) = gw_ready(&[]);
    let r = raw(
        &proxy,
        "GET",
        "/gw/openai/v1/models",
        &[
            &bearer(&token),
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = home
        .upstream
        .seen()
        .pop()
        .expect("the upstream got the GET");
    assert!(seen.header("upgrade").is_none(), "{seen:?}");
    assert!(seen.header("connection").is_none(), "{seen:?}");
    let line = line_for(&home, "/v1/models");
    assert_eq!(line["status"], 200);
    assert_eq!(line["outcome"], "ok");
}

#[test]
fn a_huge_path_and_a_non_gateway_origin_form_request_are_refused() {
    let (home, proxy, token) = gw_ready(&[]);
    let huge = format!("/gw/openai/v1/{}", "a".repeat(70 * 1024));
    let r = raw(&proxy, "GET", &huge, &[&bearer(&token)], "");
    assert!(r.status == 414 || r.status == 431, "{}", r.head);
    let r = raw(&proxy, "GET", "/v1/models", &[&bearer(&token)], "");
    assert_eq!((r.status, r.reason()), (400, "bad_request".into()));
    assert!(r.text().contains("/gw/<route-id>"), "{}", r.text());
    assert!(home.upstream.seen().is_empty());
}

#[test]
fn route_limits_apply_in_gateway_mode() {
    let (home, proxy, token) = gw_ready(&[]);
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(5000));
    let r = raw(
        &proxy,
        "POST",
        "/gw/anthropic/v1/messages",
        &[&bearer(&token)],
        &big,
    );
    assert_eq!((r.status, r.reason()), (413, "body_too_large".into()));
    // The tripwire reads gateway requests too: a stored credential in the body is refused.
    let r = raw(
        &proxy,
        "POST",
        "/gw/anthropic/v1/messages",
        &[&bearer(&token)],
        &format!(r#"{{"leak":"{SECRET}"}}"#),
    );
    assert_eq!((r.status, r.reason()), (403, "secret_in_request".into()));
    assert!(home
        .upstream
        .seen()
        .iter()
        .all(|s| !String::from_utf8_lossy(&s.body).contains(SECRET)));
}

#[test]
fn a_server_sent_event_stream_arrives_as_it_is_produced() {
    let (home, proxy, token) = gw_ready(&[]);
    let mut s = proxy_socket(proxy.addr);
    s.write_all(
        format!(
            "GET /gw/openai/drip HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let (status, head) = read_head(&mut s).unwrap();
    assert_eq!(status, 200, "{head}");
    // The first chunk comes while the upstream is still producing the rest (4 more, 200 ms
    // apart, each stamped with the time it was sent): a buffering gateway would hand
    // everything over after the last one was sent.
    let mut buf = [0u8; 4096];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    let first_received_us = now_us();
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("<0:"),
        "{:?}",
        &buf[..n]
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    let last_sent_us: u128 = rest
        .split("<4:")
        .nth(1)
        .and_then(|t| t.split('>').next())
        .and_then(|us| us.parse().ok())
        .unwrap_or_else(|| panic!("no stamped last chunk in {rest:?}"));
    assert!(
        first_received_us < last_sent_us,
        "the first chunk arrived {} ms after the last was sent",
        (first_received_us - last_sent_us) / 1000
    );
    let line = line_for(&home, "/drip");
    assert_eq!(line["outcome"], "ok");
}

// ---------------------------------------------------------------------------------------------
// Real SDKs
// ---------------------------------------------------------------------------------------------

/// A command with no proxy variables and no provider keys inherited from the test runner.
fn clean(mut c: Command) -> Command {
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
    ] {
        c.env_remove(v);
    }
    c
}

/// Run the `openai` npm SDK (tests/node-gw/openai-chat.mjs) on Node's built-in fetch.
fn node_openai(base_url: &str, api_key: &str, stream: bool, ca: Option<&std::path::Path>) -> Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node-gw");
    let mut c = clean(Command::new("node"));
    c.current_dir(&dir)
        .arg("openai-chat.mjs")
        .env("BASE_URL", base_url)
        .env("API_KEY", api_key)
        .env("STREAM", if stream { "1" } else { "0" });
    if let Some(ca) = ca {
        c.env("NODE_EXTRA_CA_CERTS", ca);
    }
    let out = c
        .output()
        .expect("node is installed and scripts/test ran `npm ci` in tests/node-gw");
    assert!(out.status.success(), "node: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("node output ({e}): {} {}", stdout(&out), stderr(&out)))
}

/// The OpenAI or Anthropic Python SDK, `base_url` pointed at the gateway. Prints one JSON
/// line like the Node script.
const PY_SDK: &str = r#"
import json, os, sys, time
which, stream = sys.argv[1], sys.argv[2] == "1"
ca = os.environ.get("GW_CA")
out = {}
t0 = time.monotonic()
try:
    if which == "openai":
        import openai
        http_client = openai.DefaultHttpxClient(verify=ca) if ca else None
        c = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"],
                          max_retries=0, timeout=20, http_client=http_client)
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            out["events"] = []
            for chunk in c.chat.completions.create(model="fake-model", messages=msgs, stream=True):
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    out["events"].append({"ms": (time.monotonic() - t0) * 1000, "text": text})
        else:
            r = c.chat.completions.create(model="fake-model", messages=msgs)
            out["text"] = r.choices[0].message.content
    else:
        import anthropic
        http_client = anthropic.DefaultHttpxClient(verify=ca) if ca else None
        c = anthropic.Anthropic(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"],
                                max_retries=0, timeout=20, http_client=http_client)
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            out["events"] = []
            with c.messages.stream(model="fake-model", max_tokens=16, messages=msgs) as s:
                for text in s.text_stream:
                    out["events"].append({"ms": (time.monotonic() - t0) * 1000, "text": text})
        else:
            r = c.messages.create(model="fake-model", max_tokens=16, messages=msgs)
            out["text"] = r.content[0].text
except Exception as e:
    out["error"] = {"name": type(e).__name__, "status": getattr(e, "status_code", None), "message": str(e)}
out["total_ms"] = (time.monotonic() - t0) * 1000
print(json.dumps(out))
"#;

fn python_sdk(
    which: &str,
    base_url: &str,
    api_key: &str,
    stream: bool,
    ca: Option<&std::path::Path>,
) -> Value {
    let mut c = clean(Command::new("python3"));
    c.args(["-c", PY_SDK, which, if stream { "1" } else { "0" }])
        .env("BASE_URL", base_url)
        .env("API_KEY", api_key);
    if let Some(ca) = ca {
        c.env("GW_CA", ca);
    }
    let out = c.output().expect("python3");
    assert!(out.status.success(), "python: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("python output ({e}): {} {}", stdout(&out), stderr(&out)))
}

/// A streamed answer arrived event by event: all the words, the first well before the last.
fn assert_streamed(out: &Value) {
    let events = out["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {out}"));
    let text: String = events.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(text, "w0 w1 w2 w3 ", "{out}");
    let first = events[0]["ms"].as_f64().unwrap();
    let last = events[events.len() - 1]["ms"].as_f64().unwrap();
    // Three gaps of LLM_EVENT_GAP between the first and the last word upstream; a buffering
    // gateway would deliver them together. (A client slowed down by a loaded machine may
    // read late and catch up, so only one gap is required here; the raw-socket test above
    // measures the gateway alone.)
    assert!(
        last - first >= LLM_EVENT_GAP.as_millis() as f64,
        "the words came together: {out}"
    );
}

/// What the upstream got for the SDK calls on `path`: the injected credential, never the token.
fn assert_upstream_got_ours(home: &Home, token: &str, path: &str, header: &str, value: &str) {
    let calls: Vec<Seen> = home
        .upstream
        .seen()
        .into_iter()
        .filter(|s| s.path == path)
        .collect();
    assert!(!calls.is_empty(), "the upstream saw no {path}");
    for s in &calls {
        assert_eq!(s.header(header), Some(value), "{path}: {:?}", s.headers);
        assert!(!s.everything().contains(token));
        assert_eq!(s.body_complete, Some(true));
    }
}

#[test]
fn the_openai_npm_sdk_on_node_builtin_fetch_works_through_the_gateway() {
    let (home, proxy, token) = gw_ready(&[]);
    let base = format!("http://{}/gw/openai/v1", proxy.addr);
    let out = node_openai(&base, &token, false, None);
    assert_eq!(out["text"], "hello from the fake API", "{out}");
    assert!(out["node"].as_str().unwrap().starts_with("v"));
    assert!(out["fetch_calls"].as_u64().unwrap() >= 1, "{out}");
    let out = node_openai(&base, &token, true, None);
    assert_streamed(&out);
    assert_upstream_got_ours(
        &home,
        &token,
        "/v1/chat/completions",
        "authorization",
        &format!("Bearer {SECRET}"),
    );
    let lines = home.wait_audit(2);
    for l in &lines {
        assert_eq!(
            (&l["route"], &l["path"], &l["decision"], &l["outcome"]),
            (
                &json!("openai"),
                &json!("/v1/chat/completions"),
                &json!("allow"),
                &json!("ok")
            ),
            "{l}"
        );
        assert_eq!(l["host"], home.api_authority());
        assert_eq!(l["method"], "POST");
    }
    // A wrong key is the SDK's own AuthenticationError (401), not a proxy error.
    let out = node_openai(&base, "not-a-token", false, None);
    assert_eq!(out["error"]["status"], 401, "{out}");
    assert_token_kept(&home, &proxy, &token);
}

#[test]
fn the_openai_and_anthropic_python_sdks_work_through_the_gateway() {
    let (home, proxy, token) = gw_ready(&[]);
    let openai = format!("http://{}/gw/openai/v1", proxy.addr);
    let anthropic = format!("http://{}/gw/anthropic", proxy.addr);
    let out = python_sdk("openai", &openai, &token, false, None);
    assert_eq!(out["text"], "hello from the fake API", "{out}");
    assert_streamed(&python_sdk("openai", &openai, &token, true, None));
    let out = python_sdk("anthropic", &anthropic, &token, false, None);
    assert_eq!(out["text"], "hello from the fake API", "{out}");
    assert_streamed(&python_sdk("anthropic", &anthropic, &token, true, None));
    assert_upstream_got_ours(
        &home,
        &token,
        "/v1/chat/completions",
        "authorization",
        &format!("Bearer {SECRET}"),
    );
    assert_upstream_got_ours(&home, &token, "/v1/messages", "x-api-key", ANTHROPIC_SECRET);
    let lines = home.wait_audit(4);
    let routes: Vec<&str> = lines.iter().map(|l| l["route"].as_str().unwrap()).collect();
    assert_eq!(routes, ["openai", "openai", "anthropic", "anthropic"]);
    assert!(lines
        .iter()
        .all(|l| l["decision"] == "allow" && l["status"] == 200));
    let out = python_sdk("anthropic", &anthropic, "wrong", false, None);
    assert_eq!(out["error"]["name"], "AuthenticationError", "{out}");
    assert_token_kept(&home, &proxy, &token);
}

// ---------------------------------------------------------------------------------------------
// The TLS listener
// ---------------------------------------------------------------------------------------------

fn tls_port(proxy: &Proxy) -> u16 {
    proxy.tls_addr.expect("--listen-tls was given").port()
}

#[test]
fn curl_uses_the_tls_listener_as_an_https_proxy_and_a_client_without_the_ca_fails() {
    let (home, proxy, token) = gw_ready(&["--listen-tls", "127.0.0.1:0"]);
    let port = tls_port(&proxy);
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "",
                "--max-time",
                "20",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
            ])
            .arg("--proxy")
            .arg(format!("https://127.0.0.1:{port}"))
            .arg("--proxy-user")
            .arg(format!("agent:{token}"))
            .arg("--cacert")
            .arg(home.latchkey_ca())
            .args(extra)
            .arg(home.api_url("/repos/acme/backend/issues"))
            .output()
            .unwrap()
    };
    let out = curl(&["--proxy-cacert", home.latchkey_ca().to_str().unwrap()]);
    let text = stdout(&out);
    assert!(text.ends_with("\n200"), "{text} {}", stderr(&out));
    let seen = home.upstream.seen().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    let line = line_for(&home, "/repos/acme/backend/issues");
    assert_eq!(line["decision"], "allow");
    // Without latchkey's CA for the proxy itself, curl refuses the listener's certificate.
    let out = curl(&[]);
    assert_eq!(out.status.code(), Some(60), "{}", stderr(&out));
    assert_eq!(home.upstream.seen().len(), 1);
    // The plain listener still serves alongside it.
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200);
    assert_token_kept(&home, &proxy, &token);
}

#[test]
fn sdks_reach_the_gateway_over_the_tls_listener_when_they_trust_the_ca() {
    let (home, proxy, token) =
        gw_ready(&["--listen-tls", "127.0.0.1:0", "--tls-name", "latchkey.test"]);
    let port = tls_port(&proxy);
    let ca = home.latchkey_ca();
    for host in ["127.0.0.1", "localhost"] {
        let base = format!("https://{host}:{port}/gw/openai/v1");
        let out = python_sdk("openai", &base, &token, false, Some(&ca));
        assert_eq!(out["text"], "hello from the fake API", "{host}: {out}");
    }
    let base = format!("https://localhost:{port}/gw/openai/v1");
    assert_streamed(&node_openai(&base, &token, true, Some(&ca)));
    let out = python_sdk(
        "anthropic",
        &format!("https://127.0.0.1:{port}/gw/anthropic"),
        &token,
        true,
        Some(&ca),
    );
    assert_streamed(&out);
    // A --tls-name is in the certificate too.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("latchkey.test:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(&ca)
        .arg("-H")
        .arg(format!("x-api-key: {token}"))
        .arg(format!("https://latchkey.test:{port}/gw/openai/v1/models"))
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "200", "{}", stderr(&out));
    // A client that does not trust latchkey's CA gets no connection at all.
    let base = format!("https://127.0.0.1:{port}/gw/openai/v1");
    let out = python_sdk("openai", &base, &token, false, None);
    assert_eq!(out["error"]["name"], "APIConnectionError", "{out}");
    let out = node_openai(&base, &token, false, None);
    assert!(
        out["error"]["name"]
            .as_str()
            .unwrap()
            .contains("Connection"),
        "{out}"
    );
    assert_upstream_got_ours(
        &home,
        &token,
        "/v1/chat/completions",
        "authorization",
        &format!("Bearer {SECRET}"),
    );
    let calls = home
        .upstream
        .seen()
        .iter()
        .filter(|s| s.path == "/v1/chat/completions")
        .count();
    assert_eq!(calls, 3, "the untrusting clients sent nothing");
    assert_token_kept(&home, &proxy, &token);
}

#[test]
fn the_tls_listener_refuses_a_tls_name_that_is_no_host_name() {
    let home = gw_home();
    let mut args: Vec<std::ffi::OsString> = vec!["latchkey".into(), "--policies".into()];
    args.push(home.path().join("policies").into());
    args.extend(["--certs".into(), home.path().join("certs").into()]);
    args.extend(["--state-dir".into(), home.state().into()]);
    for a in [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-name",
        "not a name",
    ] {
        args.push(a.into());
    }
    let cfg = latchkey::cli::serve_config_from_args(args).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = match rt.block_on(latchkey::app::run(cfg)) {
        Ok(_) => panic!("a bad --tls-name was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--tls-name"), "{err}");
}
