//! The exfiltration tripwire (SECURITY.md, "A credential cannot leave through a request"): an
//! agent's request that carries a stored credential's value (raw or encoded, in the target, a
//! header or a streamed body) or a well-known credential format its route does not inject is
//! refused with 403 `secret_in_request`, and the upstream never receives the value. Each test
//! asserts what the agent got, what the upstream got and the audit line.

use std::io::Write;
use std::time::Duration;

use crate::common::*;
use base64::Engine;
use serde_json::Value;

/// Stored, injected by no route: what an agent might find on disk.
const BILLING: &str = "billing-key-ABCDEF-123456";
/// The `payments` route's own credential: not in a well-known format.
const PAYMENTS: &str = "payments-secret-value-77";
/// The `gh` route's credential, in GitHub's format.
const GH_STORED: &str = "ghp_StoredStoredStoredStoredStored000001";
/// Another GitHub-format token, stored nowhere (the agent's own).
const GH_AGENT: &str = "ghp_AgentAgentAgentAgentAgentAgent000002";

struct Env {
    home: Home,
    proxy: Proxy,
    token: String,
}

fn env(serve_flags: &[&str]) -> Env {
    let home = Home::new();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "payments"
host = "{API_HOST}:{port}"
methods = ["GET", "POST"]
paths = ["/pay/**"]
credential = "payments"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "gh"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/gh/**"]
credential = "ghtoken"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "bulk"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/bulk/**"]
credential = "payments"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
scan_request = false
"#,
        port = home.https_port()
    ));
    home.set_secret("github", SECRET);
    home.set_secret("billing", BILLING);
    home.set_secret("payments", PAYMENTS);
    home.set_secret("ghtoken", GH_STORED);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(serve_flags);
    Env { home, proxy, token }
}

impl Env {
    fn url(&self, path: &str) -> String {
        self.home.api_url(path)
    }

    fn curl(&self, extra: &[&str], path: &str) -> Curl {
        self.home
            .curl(&self.proxy, &self.token, extra, &self.url(path))
    }

    /// The completed audit line of the request for `path`.
    fn audit_line(&self, path: &str) -> Value {
        eventually(Duration::from_secs(5), "the audit line", || {
            self.home
                .audit()
                .into_iter()
                .find(|l| l["path"] == path && l["outcome"] != Value::Null)
        })
    }

    /// Nothing the upstream received (heads, trailers, bodies) holds `value`.
    fn assert_upstream_never_got(&self, value: &str) {
        for s in self.home.upstream.seen() {
            assert!(!s.everything().contains(value), "{s:?}");
            assert!(!String::from_utf8_lossy(&s.body).contains(value), "{s:?}");
        }
    }
}

/// A refusal the agent received: 403 `secret_in_request`, naming `names`, never the value.
fn assert_refused(r: &Curl, names: &str, value: &str) {
    assert_eq!(r.status, 403, "{r:?}");
    let v = r.json();
    assert_eq!(v["reason"], "secret_in_request", "{v}");
    assert_eq!(v["error"], "denied");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains(names), "{detail}");
    assert!(!r.body.contains(value), "{}", r.body);
}

#[test]
fn a_stored_credential_in_a_header_the_query_or_base64_is_refused_before_it_goes_up() {
    let e = env(&[]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("user:{BILLING}"));
    let cases: [(&str, Vec<String>); 3] = [
        (
            "/pay/header",
            vec!["-H".into(), format!("x-note: {BILLING}")],
        ),
        ("/pay/query", vec![]),
        (
            "/pay/b64",
            vec!["-H".into(), format!("x-data: Basic {b64}")],
        ),
    ];
    for (path, extra) in &cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let target = if *path == "/pay/query" {
            format!("{path}?k={BILLING}")
        } else {
            path.to_string()
        };
        let r = e.curl(&extra, &target);
        assert_refused(&r, "stored credential billing", BILLING);
        let line = e.audit_line(path);
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["outcome"], "denied", "{line}");
        assert_eq!(line["reason"], "secret_in_request", "{line}");
        assert!(!line.to_string().contains(BILLING));
    }
    assert!(
        e.home
            .upstream
            .seen()
            .iter()
            .all(|s| !s.path.starts_with("/pay/")),
        "{:?}",
        e.home.upstream.seen()
    );
    e.assert_upstream_never_got(BILLING);
    // The operator's log names the credential, never its value.
    assert!(!e.proxy.log().contains(BILLING));
}

#[test]
fn the_routes_own_credential_sent_by_the_agent_is_refused_too() {
    // Decided: the agent should never hold the route's credential; if it does, it leaked,
    // and sending it (even where latchkey would replace it) is refused.
    let e = env(&[]);
    let r = e.curl(
        &["-H", &format!("authorization: Bearer {PAYMENTS}")],
        "/pay/own",
    );
    assert_refused(&r, "stored credential payments", PAYMENTS);
    assert_eq!(e.audit_line("/pay/own")["reason"], "secret_in_request");
    assert!(e.home.upstream.seen().iter().all(|s| s.path != "/pay/own"));
}

/// POST `path` through a raw tunnel with a chunked body whose chunks are `chunks`.
fn post_chunked(e: &Env, path: &str, chunks: &[&[u8]]) -> RawResponse {
    let api = e.home.api_authority();
    let mut tunnel = e.home.tunnel(&e.proxy, &e.token);
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nTransfer-Encoding: chunked\r\n\
         Content-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for c in chunks {
        write!(req, "{:x}\r\n", c.len()).unwrap();
        req.extend_from_slice(c);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    tunnel.exchange(&req).unwrap()
}

#[test]
fn a_stored_credential_split_across_body_chunks_aborts_the_upstream_body() {
    let e = env(&[]);
    let mut first = b"{\"notes\":\"".to_vec();
    first.extend(std::iter::repeat_n(b'x', 3000));
    first.extend_from_slice(b" then ");
    first.extend_from_slice(&BILLING.as_bytes()[..10]);
    let mut second = BILLING.as_bytes()[10..].to_vec();
    second.extend_from_slice(b"\"}");
    let r = post_chunked(&e, "/pay/upload", &[&first, &second]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["reason"], "secret_in_request");
    assert!(r.json()["detail"].as_str().unwrap().contains("billing"));
    let line = e.audit_line("/pay/upload");
    // The head went out (allow); the body was cut off (body_error).
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["outcome"], "body_error", "{line}");
    assert_eq!(line["reason"], "secret_in_request", "{line}");
    // The upstream never got a byte of the value, and never a complete body.
    for s in e
        .home
        .upstream
        .seen()
        .iter()
        .filter(|s| s.path == "/pay/upload")
    {
        let got = eventually(Duration::from_secs(5), "the upstream's body to end", || {
            e.home
                .upstream
                .seen()
                .into_iter()
                .find(|x| x.path == s.path)
                .and_then(|x| x.body_complete.map(|c| (c, x.body)))
        });
        assert!(!got.0, "the upstream took the cut body for a complete one");
        assert!(!got.1.windows(6).any(|w| w == &BILLING.as_bytes()[..6]));
    }
    e.assert_upstream_never_got(BILLING);
}

#[test]
fn a_github_format_token_goes_only_to_a_route_that_injects_github_credentials() {
    let e = env(&[]);
    // To a route whose credential is not GitHub-format: refused.
    let r = e.curl(
        &["-H", &format!("x-token: {GH_AGENT}")],
        "/pay/gh-elsewhere",
    );
    assert_refused(&r, "github credential", GH_AGENT);
    assert_eq!(
        e.audit_line("/pay/gh-elsewhere")["reason"],
        "secret_in_request"
    );
    // In a body to such a route: refused too.
    let r = post_chunked(
        &e,
        "/pay/gh-body",
        &[format!("token={GH_AGENT}").as_bytes()],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    e.assert_upstream_never_got(GH_AGENT);
    // To the route that injects a GitHub token: passes, and its Authorization is replaced.
    let r = e.curl(
        &["-H", &format!("authorization: Bearer {GH_AGENT}")],
        "/gh/repos",
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = e.home.upstream.seen();
    let s = seen.iter().find(|s| s.path == "/gh/repos").unwrap();
    assert_eq!(
        s.header("authorization"),
        Some(format!("Bearer {GH_STORED}").as_str())
    );
    assert!(!s.everything().contains(GH_AGENT));
    assert_eq!(e.audit_line("/gh/repos")["outcome"], "ok");
}

#[test]
fn on_exfiltration_revoke_revokes_the_session_at_once() {
    let e = env(&["--on-exfiltration", "revoke"]);
    let api = e.home.api_authority();
    let mut tunnel = e.home.tunnel(&e.proxy, &e.token);
    let r = tunnel
        .exchange(format!("GET /pay/leak?k={BILLING} HTTP/1.1\r\nHost: {api}\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["reason"], "secret_in_request");
    // The next request in the same tunnel: the session is revoked.
    let r = tunnel
        .exchange(format!("GET /pay/next HTTP/1.1\r\nHost: {api}\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["reason"], "token_revoked");
    // A new tunnel: 407 at CONNECT.
    let r = e.curl(&[], "/pay/again");
    assert_eq!(r.connect_status, 407, "{r:?}");
    assert_eq!(e.audit_line("/pay/leak")["reason"], "secret_in_request");
    assert!(e.home.upstream.seen().is_empty());
    // Counted, by agent and kind.
    let admin = e.proxy.admin_addr.expect("the admin listener is on");
    let metrics = reqwest_get(&format!("http://{admin}/metrics"));
    assert!(
        metrics.contains("latchkey_exfiltration_attempts_total{agent=\"bot\",kind=\"stored\"} 1"),
        "{metrics}"
    );
}

fn reqwest_get(url: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--noproxy", "*", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn scan_request_false_lets_a_body_carrying_a_credential_through() {
    let e = env(&[]);
    let body = format!("{{\"dump\":\"{BILLING}\"}}");
    let r = post_chunked(&e, "/bulk/upload", &[body.as_bytes()]);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = e.home.upstream.seen();
    let s = seen.iter().find(|s| s.path == "/bulk/upload").unwrap();
    assert_eq!(s.body, body.as_bytes());
    assert_eq!(s.body_complete, Some(true));
    assert_eq!(e.audit_line("/bulk/upload")["outcome"], "ok");
}

#[test]
fn a_credential_stored_while_serving_is_caught_once_the_set_is_rebuilt() {
    const LATE: &str = "late-added-secret-0000111";
    let e = env(&[]);
    let r = e.curl(&["-H", &format!("x-note: {LATE}")], "/pay/before");
    assert_eq!(r.status, 200, "{r:?}");
    e.home.set_secret("late", LATE);
    // The reload loop notices the store's change (one stat per tick) and rebuilds the set.
    let r = eventually(
        Duration::from_secs(5),
        "the new credential to be caught",
        || {
            let r = e.curl(&["-H", &format!("x-note: {LATE}")], "/pay/after");
            (r.status == 403).then_some(r)
        },
    );
    assert_refused(&r, "stored credential late", LATE);
}
