//! Adversarial suite: what a hostile (or compromised) agent, a hostile upstream and a broken
//! network can throw at latchkey, with real sockets on loopback. Every test asserts what the
//! agent got (status and `reason`), that the upstream never received a credential it should
//! not have (or nothing at all), and, where the input could wedge the proxy, that the proxy
//! still serves a normal request afterwards.
//!
//! The classes and their references are in SECURITY-NOTES.md; raw bytes go through
//! `RawTunnel` / `raw_proxy` (tests/common) because no well-behaved client can emit them.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine;
use serde_json::{json, Value};

/// One agent (`bot`), its standard routes plus a few adversarial ones, the secret stored, a
/// token, and a running proxy.
struct Env {
    home: Home,
    proxy: Proxy,
    token: String,
}

impl Env {
    /// `api.example.test:PORT`, the authority the standard routes name.
    fn api(&self) -> String {
        self.home.api_authority()
    }

    fn tunnel(&self) -> RawTunnel {
        self.home.tunnel(&self.proxy, &self.token)
    }

    /// A plain GET inside a fresh tunnel, with extra raw header lines.
    fn get(&self, path: &str, extra_headers: &str) -> RawResponse {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{extra_headers}Connection: close\r\n\r\n",
            self.api()
        );
        self.tunnel().exchange(req.as_bytes()).unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.home.upstream.seen()
    }

    /// A normal request (curl) still succeeds and reaches the upstream exactly once more.
    fn still_serves(&self) {
        let before = self.seen().len();
        let r = self.home.curl(
            &self.proxy,
            &self.token,
            &[],
            &self.home.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.status, 200, "the proxy stopped serving: {r:?}");
        assert_eq!(r.json()["headers"]["authorization"][0], "Bearer [REDACTED]");
        let seen = self.seen();
        assert_eq!(seen.len(), before + 1);
        assert_eq!(
            seen[before].header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
    }

    /// Nothing the upstream received carries the agent's token or its own credential.
    fn assert_no_leak(&self) {
        for s in self.seen() {
            let all = s.everything();
            assert!(!all.contains(&self.token), "token reached upstream: {all}");
            assert!(
                !all.contains(AGENT_OWN),
                "agent credential reached upstream: {all}"
            );
        }
    }
}

/// Routes added to the standard policy for these tests.
fn extra_routes(home: &Home) -> String {
    let port = home.https_port();
    format!(
        r#"
[[routes]]
id = "reflect"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/reflect", "/reflect-split"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "xkey"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/xkey"]
credential = "github"
inject = {{ header = "x-api-key", value = "{{secret}}" }}

[[routes]]
id = "default-port"
host = "{API_HOST}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues"]
"#
    )
}

fn env_with(serve_args: &[&str], more_policy: &str) -> Env {
    let home = Home::new();
    home.standard_policy_with(&(extra_routes(&home) + more_policy));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &["--on-behalf-of", "alice"]);
    let proxy = home.serve(serve_args);
    Env { home, proxy, token }
}

fn env() -> Env {
    env_with(&[], "")
}

fn assert_denied(r: &RawResponse, status: u16, reason: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}{}", r.head, r.text());
    assert_eq!(r.reason(), reason, "{what}: {}", r.text());
    let body = r.json();
    assert!(body["request_id"].as_str().is_some(), "{what}: {body}");
    assert!(
        !r.text().contains(SECRET),
        "{what}: the denial names the secret"
    );
}

/// The audit line with this reason (bounded wait: the writer is asynchronous).
fn audit_line_with(home: &Home, reason: &str) -> Value {
    for _ in 0..200 {
        if let Some(l) = home.audit().into_iter().find(|l| l["reason"] == reason) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no audit line with reason {reason}: {:?}", home.audit());
}

// ---------------------------------------------------------------------------------------------
// Paths: normalise once, refuse the ambiguous forms, forward exactly what was matched.
// ---------------------------------------------------------------------------------------------

enum Want {
    /// Forwarded; the upstream saw exactly this path.
    Forwarded(&'static str),
    /// A latchkey denial: status and reason.
    Denied(u16, &'static str),
    /// Refused by the HTTP parser before latchkey's handler: this status, no JSON, no audit.
    ParserRefused(u16),
}

#[test]
fn hostile_paths_are_normalised_or_refused_and_only_the_normal_form_is_forwarded() {
    let env = env();
    let long_ok = format!("/repos/acme/backend/issues/{}", "a".repeat(8 * 1024));
    let cases: Vec<(String, Want)> = vec![
        // Traversal out of the allowed prefix lands on a path no route allows.
        (
            "/repos/acme/backend/issues/../../admin".into(),
            Want::Denied(403, "no_route"),
        ),
        (
            "/repos/acme/backend/issues/%2e%2e/%2E%2e/admin".into(),
            Want::Denied(403, "no_route"),
        ),
        (
            "/repos/acme/backend/issues/.%2e/%2E./admin".into(),
            Want::Denied(403, "no_route"),
        ),
        // Traversal above the root.
        ("/../etc/passwd".into(), Want::Denied(400, "bad_path")),
        (
            "/repos/%2e%2e/%2E%2E/%2e%2e/etc/passwd".into(),
            Want::Denied(400, "bad_path"),
        ),
        // Encoded separators: upstreams disagree on them, so they are refused outright.
        (
            "/repos/acme/backend/issues%2f..%2f..%2fadmin".into(),
            Want::Denied(400, "bad_path"),
        ),
        (
            "/repos/acme/backend/issues%2F7".into(),
            Want::Denied(400, "bad_path"),
        ),
        (
            "/repos/acme/backend/issues/%5c..%5Cadmin".into(),
            Want::Denied(400, "bad_path"),
        ),
        // Servlet-style "..;" and NUL truncation.
        (
            "/repos/acme/backend/issues/..;/..;/admin".into(),
            Want::Denied(400, "bad_path"),
        ),
        (
            "/repos/acme/backend/issues/7%00.json".into(),
            Want::Denied(400, "bad_path"),
        ),
        // Invalid escapes.
        (
            "/repos/acme/backend/issues/%zz".into(),
            Want::Denied(400, "bad_path"),
        ),
        (
            "/repos/acme/backend/issues/%4".into(),
            Want::Denied(400, "bad_path"),
        ),
        // Not an absolute path.
        ("*".into(), Want::Denied(400, "bad_path")),
        // A raw backslash is not a legal request-target byte at all.
        (
            "/repos/acme/backend/issues\\..\\..\\admin".into(),
            Want::ParserRefused(400),
        ),
        // Merged slashes, "." segments and encoded unreserved bytes inside the allowed prefix:
        // allowed, and the upstream sees only the normal form.
        (
            "//repos/acme/backend/issues".into(),
            Want::Forwarded("/repos/acme/backend/issues"),
        ),
        (
            "/repos/acme//backend///issues/7".into(),
            Want::Forwarded("/repos/acme/backend/issues/7"),
        ),
        (
            "/repos/./acme/./backend/issues/x/../8".into(),
            Want::Forwarded("/repos/acme/backend/issues/8"),
        ),
        (
            "/%72epos/acme/backend/issues/%37".into(),
            Want::Forwarded("/repos/acme/backend/issues/7"),
        ),
        // The query is never part of the match, whatever it holds.
        (
            "/repos/acme/backend/issues/9?next=/../../admin".into(),
            Want::Forwarded("/repos/acme/backend/issues/9"),
        ),
        // A long but legal path inside the prefix goes through unchanged.
        (long_ok.clone(), Want::Forwarded("")),
    ];
    for (path, want) in &cases {
        let before = env.seen().len();
        let r = env.get(path, "");
        let what = format!("GET {}", &path[..path.len().min(80)]);
        match want {
            Want::Denied(status, reason) => {
                assert_denied(&r, *status, reason, &what);
                assert_eq!(
                    env.seen().len(),
                    before,
                    "{what}: a denied path reached upstream"
                );
            }
            Want::ParserRefused(status) => {
                assert_eq!(r.status, *status, "{what}: {}{}", r.head, r.text());
                assert_eq!(env.seen().len(), before, "{what}: reached upstream");
            }
            Want::Forwarded(expected) => {
                assert_eq!(r.status, 200, "{what}: {}{}", r.head, r.text());
                let seen = env.seen();
                assert_eq!(seen.len(), before + 1, "{what}");
                let expected = if expected.is_empty() {
                    long_ok.as_str()
                } else {
                    expected
                };
                assert_eq!(seen.last().unwrap().path, *expected, "{what}");
                assert_eq!(r.json()["path"], *expected, "{what}");
            }
        }
    }
    let audit = env.home.wait_audit(2);
    assert!(audit
        .iter()
        .any(|l| l["reason"] == "bad_path" && l["status"] == 400));
    env.assert_no_leak();
}

#[test]
fn over_long_request_target_is_refused_and_never_forwarded() {
    let env = env();
    let path = format!("/repos/acme/backend/issues/{}", "a".repeat(70 * 1024));
    let mut t = env.tunnel();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", env.api());
    let r = t.exchange(req.as_bytes()).expect("an answer, not a reset");
    assert_head_refused(&env, &r, "over-long path");
    assert!(env.seen().is_empty());
    env.still_serves();
}

// ---------------------------------------------------------------------------------------------
// Hosts: the tunnel is bound to its CONNECT authority; Host, absolute-form, SNI and h2
// :authority may not switch it.
// ---------------------------------------------------------------------------------------------

#[test]
fn inner_host_naming_another_host_is_403_host_mismatch() {
    let env = env();
    let other = format!("{OTHER_HOST}:{}", env.home.https_port());
    let req = format!(
        "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"
    );
    let r = env.tunnel().exchange(req.as_bytes()).unwrap();
    assert_denied(&r, 403, "host_mismatch", "Host: other");
    assert!(env.seen().is_empty());
    let line = audit_line_with(&env.home, "host_mismatch");
    assert_eq!(line["status"], 403);
    assert_eq!(line["agent"], "bot");
}

#[test]
fn duplicate_host_headers_are_403_host_mismatch() {
    let env = env();
    for (what, hosts) in [
        (
            "same twice",
            format!("Host: {0}\r\nHost: {0}\r\n", env.api()),
        ),
        (
            "ours then other",
            format!(
                "Host: {}\r\nHost: {OTHER_HOST}:{}\r\n",
                env.api(),
                env.home.https_port()
            ),
        ),
    ] {
        let req =
            format!("GET /repos/acme/backend/issues HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
        let r = env.tunnel().exchange(req.as_bytes()).unwrap();
        assert_denied(&r, 403, "host_mismatch", what);
    }
    assert!(env.seen().is_empty());
}

#[test]
fn missing_host_header_inside_the_tunnel_is_403_host_mismatch() {
    let env = env();
    let r = env
        .tunnel()
        .exchange(b"GET /repos/acme/backend/issues HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_denied(&r, 403, "host_mismatch", "no Host");
    assert!(env.seen().is_empty());
}

#[test]
fn host_in_other_case_or_with_a_trailing_dot_is_the_same_host() {
    let env = env();
    let port = env.home.https_port();
    for host in [
        format!("API.Example.TEST:{port}"),
        format!("api.example.test.:{port}"),
        format!("Api.Example.Test.:{port}"),
    ] {
        let req = format!(
            "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let r = env.tunnel().exchange(req.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "Host: {host}: {}{}", r.head, r.text());
    }
    assert_eq!(env.seen().len(), 3);
}

#[test]
fn host_with_or_without_the_explicit_default_port_matches_a_connect_to_443() {
    // Nothing listens on 127.0.0.1:443, so a request that passes the host check ends as
    // 502 upstream_unreachable; one that fails it is 403 host_mismatch.
    let env = env_with(&["--resolve", &format!("{API_HOST}:443:127.0.0.1")], "");
    assert!(std::net::TcpStream::connect("127.0.0.1:443").is_err());
    let cases = [
        (API_HOST.to_string(), 502, "upstream_unreachable"),
        (format!("{API_HOST}:443"), 502, "upstream_unreachable"),
        (
            format!("{}.:443", API_HOST.to_uppercase()),
            502,
            "upstream_unreachable",
        ),
        (format!("{API_HOST}:444"), 403, "host_mismatch"),
    ];
    for (host, status, reason) in cases {
        let mut t = RawTunnel::open(
            env.proxy.addr,
            &format!("{API_HOST}:443"),
            &env.token,
            API_HOST,
            &env.home.latchkey_ca(),
        )
        .unwrap();
        let req = format!(
            "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let r = t.exchange(req.as_bytes()).unwrap();
        assert_denied(&r, status, reason, &format!("Host: {host}"));
    }
}

#[test]
fn absolute_form_inside_the_tunnel_naming_another_host_is_403_host_mismatch() {
    let env = env();
    let port = env.home.https_port();
    for target in [
        format!("https://{OTHER_HOST}:{port}/repos/acme/backend/issues"),
        format!("http://{OTHER_HOST}:{port}/repos/acme/backend/issues"),
        format!("https://{API_HOST}:{}/repos/acme/backend/issues", port + 1),
        format!("https://127.0.0.1:{port}/repos/acme/backend/issues"),
    ] {
        // The Host header names the tunnel's own host: only the request line lies.
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            env.api()
        );
        let r = env.tunnel().exchange(req.as_bytes()).unwrap();
        assert_denied(&r, 403, "host_mismatch", &target);
    }
    assert!(env.seen().is_empty());
    // Absolute-form naming the tunnel's own authority is fine.
    let req = format!(
        "GET https://{}/repos/acme/backend/issues HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        env.api(),
        env.api()
    );
    let r = env.tunnel().exchange(req.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
}

#[test]
fn tls_sni_naming_another_host_fails_the_handshake_and_nothing_reaches_upstream() {
    let env = env();
    let err = RawTunnel::open(
        env.proxy.addr,
        &env.api(),
        &env.token,
        OTHER_HOST,
        &env.home.latchkey_ca(),
    )
    .err()
    .expect("a handshake naming another host than CONNECT must fail");
    assert!(err.contains("TLS handshake failed"), "{err}");
    assert!(env.seen().is_empty());
    let line = audit_line_with(&env.home, "host_mismatch");
    assert!(line["detail"].is_null() || !line.to_string().contains(SECRET));
    env.still_serves();
}

#[test]
fn connect_host_in_other_case_or_with_a_trailing_dot_is_the_same_host() {
    let env = env();
    let port = env.home.https_port();
    for authority in [
        format!("API.EXAMPLE.TEST:{port}"),
        format!("{API_HOST}.:{port}"),
    ] {
        let mut t = RawTunnel::open(
            env.proxy.addr,
            &authority,
            &env.token,
            API_HOST,
            &env.home.latchkey_ca(),
        )
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
        let req = format!(
            "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            env.api()
        );
        let r = t.exchange(req.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "CONNECT {authority}: {}{}", r.head, r.text());
    }
    assert_eq!(env.seen().len(), 2);
}

#[test]
fn connect_to_a_raw_ip_or_to_the_proxy_itself_is_403_host_not_allowed() {
    let env = env();
    let auth = format!("Bearer {}", env.token);
    let own = env.proxy.addr.to_string();
    let admin = env.proxy.admin_addr.map(|a| a.to_string()).unwrap();
    for authority in [
        format!("127.0.0.1:{}", env.home.https_port()),
        format!("[::1]:{}", env.home.https_port()),
        own,
        admin,
        format!("{OTHER_HOST}:{}", env.home.https_port()),
    ] {
        let (_s, r) = raw_connect(env.proxy.addr, &authority, Some(&auth));
        assert_denied(&r, 403, "host_not_allowed", &format!("CONNECT {authority}"));
    }
    assert!(env.seen().is_empty());
    env.still_serves();
}

#[test]
fn connect_without_a_port_or_with_a_garbage_authority_is_400_bad_request() {
    let env = env();
    let auth = format!("Bearer {}", env.token);
    for authority in [
        API_HOST.to_string(),
        format!("{API_HOST}:99999"),
        format!("{API_HOST}:0"),
        format!("{API_HOST}:+443"),
        format!("evil@{API_HOST}:443"),
        "api..example.test:443".to_string(),
        "010.0.0.1:443".to_string(),
        "1.2.3:443".to_string(),
    ] {
        let (_s, r) = raw_connect(env.proxy.addr, &authority, Some(&auth));
        if r.status == 400 && r.body.is_empty() {
            // The HTTP parser itself refused the request line; also fine, nothing went further.
            continue;
        }
        assert_denied(&r, 400, "bad_request", &format!("CONNECT {authority}"));
    }
    assert!(env.seen().is_empty());
    env.still_serves();
}

/// Open a CONNECT tunnel and an HTTP/2 connection in it (hyper client over tokio-rustls).
async fn h2_sender(
    env: &Env,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    let req = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: Bearer {1}\r\n\r\n",
        env.api(),
        env.token
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let cfg = agent_tls_config(&env.home.latchkey_ca(), &[b"h2"]);
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from(API_HOST).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    uri: &str,
    host_header: Option<&str>,
) -> (u16, Value) {
    use http_body_util::BodyExt;
    let mut req = http::Request::get(uri);
    if let Some(h) = host_header {
        req = req.header("host", h);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn h2_authority_naming_another_host_is_403_host_mismatch() {
    let env = env();
    let port = env.home.https_port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut sender = h2_sender(&env).await;
        // :authority names another host on the same h2 connection.
        let (status, body) = h2_send(
            &mut sender,
            &format!("https://{OTHER_HOST}:{port}/repos/acme/backend/issues"),
            None,
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["reason"], "host_mismatch");
        // :authority is ours but a `host` header names another host.
        let (status, body) = h2_send(
            &mut sender,
            &format!("https://{API_HOST}:{port}/repos/acme/backend/issues"),
            Some(&format!("{OTHER_HOST}:{port}")),
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["reason"], "host_mismatch");
        assert!(env.seen().is_empty());
        // The same connection still carries a legitimate stream.
        let (status, body) = h2_send(
            &mut sender,
            &format!("https://{API_HOST}:{port}/repos/acme/backend/issues"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["headers"]["authorization"][0], "Bearer [REDACTED]");
    });
    assert_eq!(env.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Framing and smuggling inside the tunnel: never a second request at the upstream, never a
// desync, and the proxy keeps serving.
// ---------------------------------------------------------------------------------------------

/// A request the policy denies: if it ever reaches the upstream, it was smuggled.
const SMUGGLED: &str = "/admin/smuggled";

fn smuggled_request(env: &Env) -> String {
    format!("GET {SMUGGLED} HTTP/1.1\r\nHost: {}\r\n\r\n", env.api())
}

/// Send raw bytes in a fresh tunnel; collect every response until the tunnel closes or goes
/// quiet. Returns the statuses (with the responses printed, for failure messages).
fn send_framing(env: &Env, bytes: &[u8]) -> Vec<u16> {
    let responses = send_framing_full(env, bytes);
    for r in &responses {
        eprintln!("{}{}", r.head, r.text());
    }
    responses.iter().map(|r| r.status).collect()
}

fn send_framing_full(env: &Env, bytes: &[u8]) -> Vec<RawResponse> {
    let mut t = env.tunnel();
    t.tls
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    t.tls.write_all(bytes).unwrap();
    t.tls.flush().unwrap();
    let mut responses = Vec::new();
    while let Ok(r) = t.read() {
        responses.push(r);
    }
    responses
}

fn assert_not_smuggled(env: &Env, what: &str, max_forwarded: usize) {
    let seen = env.seen();
    assert!(
        seen.iter()
            .all(|s| !s.path.contains("smuggled") && !s.path.contains("admin")),
        "{what}: smuggled request reached upstream: {seen:?}"
    );
    assert!(
        seen.len() <= max_forwarded,
        "{what}: upstream saw {} requests",
        seen.len()
    );
}

#[test]
fn content_length_with_transfer_encoding_never_smuggles_a_second_request() {
    let env = env();
    let api = env.api();
    let smuggled = smuggled_request(&env);
    // CL first, then TE; and TE first, then CL. The body is one empty chunk, followed by a
    // full request that only a CL-reading hop would see as body.
    for (i, (first, second)) in [
        (
            format!("Content-Length: {}", 5 + smuggled.len()),
            "Transfer-Encoding: chunked".to_string(),
        ),
        (
            "Transfer-Encoding: chunked".to_string(),
            format!("Content-Length: {}", 5 + smuggled.len()),
        ),
    ]
    .iter()
    .enumerate()
    {
        let req = format!(
            "POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\n{first}\r\n{second}\r\n\r\n0\r\n\r\n{smuggled}"
        );
        let statuses = send_framing(&env, req.as_bytes());
        // At most the one POST is answered (or the whole thing refused), and the connection is
        // then closed: the trailing bytes are never parsed as a request.
        assert!(
            statuses == [200] || statuses == [400],
            "CL+TE #{i}: responses {statuses:?}"
        );
        assert_not_smuggled(&env, "CL+TE", i + 1);
    }
    env.still_serves();
}

#[test]
fn ambiguous_framing_is_refused_with_400_and_nothing_is_forwarded() {
    let env = env();
    let api = env.api();
    let smuggled = smuggled_request(&env);
    let cases = [
        (
            "two differing Content-Length",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd{smuggled}"),
        ),
        (
            "Content-Length list with differing values",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nContent-Length: 4, 40\r\n\r\nabcd{smuggled}"),
        ),
        (
            "signed Content-Length",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nContent-Length: +4\r\n\r\nabcd{smuggled}"),
        ),
        (
            "negative Content-Length",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nContent-Length: -1\r\n\r\n{smuggled}"),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "Transfer-Encoding: xchunked",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /repos/acme/backend/issues HTTP/1.0\r\nHost: {api}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "bare CR inside a header value",
            format!("GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nX-Note: a\rAuthorization: Bearer {AGENT_OWN}\r\n\r\n"),
        ),
        (
            "obs-fold continuation line",
            format!("GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nX-Note: a\r\n Authorization: Bearer {AGENT_OWN}\r\n\r\n"),
        ),
        (
            "space in a header name",
            format!("GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nTransfer Encoding: chunked\r\n\r\n"),
        ),
        (
            "space before the colon",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nContent-Length : 4\r\n\r\nabcd{smuggled}"),
        ),
    ];
    for (what, req) in &cases {
        let statuses = send_framing(&env, req.as_bytes());
        // hyper's parser answers a bare 400 and closes: no JSON, no audit line.
        assert_eq!(statuses, [400], "{what}");
        assert_not_smuggled(&env, what, 0);
        assert!(env.seen().is_empty(), "{what}: something reached upstream");
    }
    env.still_serves();
}

#[test]
fn bare_lf_line_endings_never_yield_a_second_request() {
    let env = env();
    let api = env.api();
    // Bare LF as the only line ending (accepted by hyper as one request, never two).
    let cases = [(
        "bare LF head",
        format!("GET /repos/acme/backend/issues HTTP/1.1\nHost: {api}\nConnection: close\n\n"),
    )];
    let mut forwarded = 0;
    for (what, req) in &cases {
        let statuses = send_framing(&env, req.as_bytes());
        assert!(
            statuses.is_empty() || statuses == [200] || statuses == [400],
            "{what}: responses {statuses:?}"
        );
        forwarded += statuses.iter().filter(|s| **s == 200).count();
        assert_not_smuggled(&env, what, forwarded);
        assert_eq!(env.seen().len(), forwarded, "{what}");
    }
    env.still_serves();
}

#[test]
fn malformed_chunked_body_is_the_agents_fault_not_the_upstreams() {
    let env = env();
    let api = env.api();
    let smuggled = smuggled_request(&env);
    let cases = [
        (
            "chunk size that is not hex",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            // Go CVE-2025-22871: bare LF after a chunk size.
            "bare LF after a chunk size",
            format!("POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
    ];
    for (what, req) in &cases {
        let responses = send_framing_full(&env, req.as_bytes());
        assert_eq!(responses.len(), 1, "{what}");
        assert_eq!(
            responses[0].status,
            400,
            "{what}: {}{}",
            responses[0].head,
            responses[0].text()
        );
        assert_not_smuggled(&env, what, 2);
    }
    for r in &send_framing_full(&env, cases[0].1.as_bytes()) {
        assert_denied(r, 400, "bad_body", "malformed chunked body");
    }
    // Bodies stream: the head (with the credential) went upstream before the body broke, so
    // each line says allow, and that the body broke, and whose fault it was.
    let posts = eventually(Duration::from_secs(10), "three POST lines", || {
        let posts: Vec<Value> = env
            .home
            .audit()
            .into_iter()
            .filter(|l| l["method"] == "POST")
            .collect();
        (posts.len() >= 3).then_some(posts)
    });
    assert_eq!(posts.len(), 3, "{posts:?}");
    for l in &posts {
        assert_eq!(l["reason"], "bad_body", "{l}");
        assert_eq!(l["outcome"], "body_error", "{l}");
        assert_eq!(l["decision"], "allow", "{l}");
        assert_eq!(l["status"], 400, "{l}");
    }
    // Bodies stream, so each malformed request's head (both cases and the one sent again
    // above) did reach the upstream before its body broke; wait until the upstream has
    // recorded all three heads before counting again.
    eventually(Duration::from_secs(5), "the three heads upstream", || {
        (env.seen().len() > cases.len()).then_some(())
    });
    env.still_serves();
}

#[test]
fn crlf_in_a_header_value_becomes_a_separate_header_that_is_stripped() {
    // Raw CRLF ends the header line: the "injected" Authorization is just another agent header,
    // and it is removed like any other.
    let env = env();
    let r = env.get(
        "/repos/acme/backend/issues",
        &format!("X-Note: a\r\nAuthorization: Bearer {AGENT_OWN}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = env.seen();
    assert_eq!(seen.len(), 1);
    let auth: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].1, format!("Bearer {SECRET}"));
    env.assert_no_leak();
}

#[test]
fn pipelined_second_request_is_checked_on_its_own() {
    let env = env();
    let api = env.api();
    let req = format!(
        "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\n\r\nGET {SMUGGLED} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    );
    let mut t = env.tunnel();
    let first = t.exchange(req.as_bytes()).unwrap();
    assert_eq!(first.status, 200);
    let second = t.read().unwrap();
    assert_denied(&second, 403, "no_route", "pipelined /admin");
    assert_not_smuggled(&env, "pipelined", 1);
}

/// An over-large request head is refused one of two ways, depending on how its bytes arrive:
/// hyper's read buffer fills first (hyper answers 414 or 431 itself, with no body), or the
/// head is parsed and latchkey measures it again (431 `headers_too_large` as JSON). Either
/// way the refusal has its audit line, attributed to the tunnel's token. Never anything else.
fn assert_head_refused(env: &Env, r: &RawResponse, what: &str) {
    if r.text().is_empty() {
        assert!(matches!(r.status, 414 | 431), "{what}: {}", r.head);
    } else {
        assert_denied(r, 431, "headers_too_large", what);
    }
    let line = audit_line_with(&env.home, "headers_too_large");
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["outcome"], "denied", "{line}");
    assert_eq!(line["status"], r.status, "{line}");
    assert_eq!(line["agent"], "bot", "{line}");
}

#[test]
fn a_request_head_hyper_cannot_parse_still_has_its_line() {
    let env = env();
    // Inside a tunnel: attributed to the tunnel's token.
    let mut t = env.tunnel();
    let r = t
        .exchange(b"GET /x HTTP/1.1\r\nBad Header Name: v\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.head);
    let line = audit_line_with(&env.home, "bad_request");
    assert_eq!(line["agent"], "bot", "{line}");
    assert_eq!(line["method"], "-", "{line}");
    assert_eq!(line["status"], 400);
    assert_eq!(line["outcome"], "denied");
    // On the proxy port itself: no token was read, so nobody is named.
    let r = raw_proxy(env.proxy.addr, b"NOT A REQUEST LINE\r\n\r\n").unwrap();
    assert_eq!(r.status, 400, "{}", r.head);
    let lines = eventually(Duration::from_secs(10), "two bad_request lines", || {
        let l: Vec<Value> = env
            .home
            .audit()
            .into_iter()
            .filter(|l| l["reason"] == "bad_request")
            .collect();
        (l.len() >= 2).then_some(l)
    });
    assert!(lines[1]["agent"].is_null(), "{}", lines[1]);
    assert!(env.seen().is_empty());
    env.still_serves();
}

#[test]
fn oversized_header_block_is_refused_and_never_forwarded() {
    let env = env();
    let big = "a".repeat(70 * 1024);
    let req = format!(
        "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {}\r\nX-Big: {big}\r\n\r\n",
        env.api()
    );
    let responses = send_framing_full(&env, req.as_bytes());
    assert_eq!(responses.len(), 1, "oversized header block");
    assert_head_refused(&env, &responses[0], "oversized header block");
    assert!(env.seen().is_empty());
    env.still_serves();
}

#[test]
fn a_huge_number_of_headers_is_refused_and_never_forwarded() {
    let env = env();
    let mut req = format!(
        "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {}\r\n",
        env.api()
    );
    for i in 0..500 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    // Over hyper's own limit of 100 header fields the head is not even parsed: hyper answers
    // a bare 431 and closes; the refusal still has its line.
    let responses = send_framing_full(&env, req.as_bytes());
    assert_eq!(responses.len(), 1, "500 headers");
    assert_eq!(responses[0].text(), "");
    assert_head_refused(&env, &responses[0], "500 headers");
    assert!(env.seen().is_empty());
    env.still_serves();
}

// ---------------------------------------------------------------------------------------------
// Slowloris.
// ---------------------------------------------------------------------------------------------

#[test]
fn slowloris_on_the_proxy_port_and_in_a_tunnel_is_cut_off_while_others_are_served() {
    let env = env();
    // On the proxy port: half a request line, then silence.
    let mut slow = proxy_socket(env.proxy.addr);
    slow.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    slow.write_all(b"CONNECT api.example.te").unwrap();
    // Inside a tunnel: a complete TLS session, then half a request head.
    let mut slow_tunnel = env.tunnel();
    slow_tunnel
        .tls
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    slow_tunnel
        .tls
        .write_all(
            format!(
                "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {}\r\nX-Slow: ",
                env.api()
            )
            .as_bytes(),
        )
        .unwrap();
    slow_tunnel.tls.flush().unwrap();
    let tunnel_thread = std::thread::spawn(move || {
        closed_within(
            &mut slow_tunnel.tls,
            Instant::now(),
            Duration::from_secs(15),
        )
    });
    // Meanwhile, other agents are served normally.
    env.still_serves();
    env.still_serves();
    let proxy_port = closed_within(&mut slow, Instant::now(), Duration::from_secs(15));
    assert!(
        proxy_port.is_some(),
        "a half-sent CONNECT held its connection open for 15 s"
    );
    let tunnel = tunnel_thread.join().unwrap();
    assert!(
        tunnel.is_some(),
        "a half-sent request in a tunnel held it open for 15 s"
    );
    assert_eq!(env.seen().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Credentials: the only credential the upstream sees is ours, exactly once; the token never.
// ---------------------------------------------------------------------------------------------

#[test]
fn agent_authorization_in_any_capitalisation_and_any_number_is_replaced_by_ours() {
    let env = env();
    let r = env.get(
        "/repos/acme/backend/issues",
        &format!(
            "AUTHORIZATION: Bearer {AGENT_OWN}\r\nauthorization: Basic {AGENT_OWN}\r\nAuthorization: token {AGENT_OWN}\r\n"
        ),
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = env.seen();
    let auth: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .collect();
    assert_eq!(auth.len(), 1, "{auth:?}");
    assert_eq!(auth[0].1, format!("Bearer {SECRET}"));
    env.assert_no_leak();
}

#[test]
fn proxy_authorization_sent_inside_the_tunnel_never_reaches_upstream() {
    let env = env();
    use base64::engine::general_purpose::STANDARD;
    let basic = STANDARD.encode(format!("agent:{}", env.token));
    let r = env.get(
        "/repos/acme/backend/issues",
        &format!(
            "Proxy-Authorization: Bearer {}\r\nPROXY-AUTHORIZATION: Basic {basic}\r\nProxy-Connection: keep-alive\r\nX-Latchkey-Agent: admin\r\n",
            env.token
        ),
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = env.seen();
    assert!(seen[0].header("proxy-authorization").is_none());
    assert!(seen[0].header("proxy-connection").is_none());
    assert!(seen[0].header("x-latchkey-agent").is_none());
    assert!(!seen[0].everything().contains(&basic));
    env.assert_no_leak();
}

#[test]
fn injected_custom_header_sent_by_the_agent_in_other_case_and_twice_is_replaced() {
    let env = env();
    let r = env.get(
        "/xkey",
        &format!(
            "x-API-key: {AGENT_OWN}\r\nX-Api-Key: {AGENT_OWN}-2\r\nX-API-KEY: {AGENT_OWN}-3\r\n"
        ),
    );
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = env.seen();
    let keys: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "x-api-key")
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].1, SECRET);
    env.assert_no_leak();
}

#[test]
fn connection_header_cannot_make_the_proxy_drop_the_injected_credential() {
    let env = env();
    let r = env.get(
        "/xkey",
        "Connection: x-api-key, authorization, keep-alive\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(env.seen()[0].header("x-api-key"), Some(SECRET));
}

#[test]
fn agent_query_credential_in_any_encoding_is_dropped_and_ours_added_once() {
    let env = env();
    let query = format!(
        "q=1&api_key={AGENT_OWN}&api%5Fkey={AGENT_OWN}&api%5fkey={AGENT_OWN}&%61pi_key={AGENT_OWN}&api_key&api_key="
    );
    let r = env.get(&format!("/search?{query}"), "");
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = env.seen();
    let q = seen[0].query.clone().unwrap();
    assert!(!q.contains(AGENT_OWN), "{q}");
    let keys: Vec<&str> = q
        .split('&')
        .filter(|p| {
            let k = p.split('=').next().unwrap().to_ascii_lowercase();
            k == "api_key" || k == "api%5fkey" || k == "%61pi_key"
        })
        .collect();
    assert_eq!(keys, [format!("api_key={SECRET}")], "{q}");
    assert!(q.starts_with("q=1&"), "{q}");
    env.assert_no_leak();
}

#[test]
fn agent_query_credential_in_another_case_or_after_a_semicolon_is_dropped() {
    let env = env();
    let query = format!(
        "q=1;API_KEY={AGENT_OWN}&Api_Key={AGENT_OWN};api%5FKEY={AGENT_OWN}&x=a;b&;api_key={AGENT_OWN}"
    );
    let r = env.get(&format!("/search?{query}"), "");
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = env.seen();
    assert_eq!(seen.len(), 1);
    let q = seen[0].query.clone().unwrap();
    assert!(!q.contains(AGENT_OWN), "{q}");
    assert_eq!(q, format!("q=1&x=a;b&api_key={SECRET}"));
    env.assert_no_leak();
    // The tunnel's CONNECT line, then the request's.
    let lines = env.home.wait_audit(2);
    let line = lines
        .iter()
        .find(|l| l["path"] == "/search")
        .expect("the line");
    assert_eq!(line["route"], "query-key", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["path"], "/search", "{line}");
    let raw = std::fs::read_to_string(env.home.state().join("audit.jsonl")).unwrap();
    assert!(!raw.contains(AGENT_OWN) && !raw.contains(SECRET), "{raw}");
}

#[test]
fn basic_user_route_replaces_the_agents_authorization() {
    let env = env();
    let r = env.get(
        "/basic",
        &format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("bot-user:{AGENT_OWN}"))
        ),
    );
    assert_eq!(r.status, 200);
    let seen = env.seen();
    let auth: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .collect();
    assert_eq!(auth.len(), 1);
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("bot-user:{SECRET}"));
    assert_eq!(auth[0].1, format!("Basic {expected}"));
    env.assert_no_leak();
}

#[test]
fn token_is_never_forwarded_on_plain_http_either() {
    let env = env();
    let url = format!("http://plain.example.test:{}/plain/x", env.home.http_port());
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: plain.example.test:{}\r\nProxy-Authorization: Bearer {}\r\nAuthorization: Bearer {AGENT_OWN}\r\nConnection: close\r\n\r\n",
        env.home.http_port(),
        env.token
    );
    let r = raw_proxy(env.proxy.addr, req.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    assert_eq!(env.seen()[0].header("x-api-key"), Some(SECRET));
    assert!(env.seen()[0].header("authorization").is_none());
    env.assert_no_leak();
}

// ---------------------------------------------------------------------------------------------
// Proxy-level requests (no tunnel).
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_requests_to_the_proxy_port_itself_are_refused() {
    let env = env();
    let port = env.home.http_port();
    let auth = format!("Proxy-Authorization: Bearer {}\r\n", env.token);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "origin-form (not a proxy request)",
            format!("GET /plain/x HTTP/1.1\r\nHost: plain.example.test:{port}\r\n{auth}\r\n"),
            400,
            "bad_request",
        ),
        (
            "absolute https:// on the proxy port",
            format!("GET https://{API_HOST}:{}/repos/acme/backend/issues HTTP/1.1\r\nHost: {API_HOST}\r\n{auth}\r\n", env.home.https_port()),
            400,
            "bad_request",
        ),
        (
            "absolute http:// without a token",
            format!("GET http://plain.example.test:{port}/plain/x HTTP/1.1\r\nHost: plain.example.test:{port}\r\n\r\n"),
            407,
            "token_missing",
        ),
        (
            "absolute http:// with a Host naming another host",
            format!("GET http://plain.example.test:{port}/plain/x HTTP/1.1\r\nHost: {OTHER_HOST}\r\n{auth}\r\n"),
            403,
            "host_mismatch",
        ),
        (
            "absolute http:// with userinfo",
            format!("GET http://evil@plain.example.test:{port}/plain/x HTTP/1.1\r\nHost: plain.example.test:{port}\r\n{auth}\r\n"),
            400,
            "bad_request",
        ),
        (
            "absolute http:// to a host in no route",
            format!("GET http://{OTHER_HOST}:{port}/plain/x HTTP/1.1\r\nHost: {OTHER_HOST}:{port}\r\n{auth}\r\n"),
            403,
            "host_not_allowed",
        ),
        (
            "absolute http:// traversal",
            format!("GET http://plain.example.test:{port}/plain/../../etc/passwd HTTP/1.1\r\nHost: plain.example.test:{port}\r\n{auth}\r\n"),
            400,
            "bad_path",
        ),
    ];
    for (what, req, status, reason) in &cases {
        let r = raw_proxy(env.proxy.addr, req.as_bytes()).unwrap();
        assert_denied(&r, *status, reason, what);
    }
    assert!(env.seen().is_empty());
    env.still_serves();
}

#[test]
fn a_token_sent_as_url_userinfo_is_refused_and_never_logged() {
    let env = env();
    let (port, api) = (env.home.http_port(), env.api());
    let token = &env.token;
    // A client told `http://agent:TOKEN@host/` or `CONNECT agent:TOKEN@host:443`: no
    // Proxy-Authorization, the token only in the target.
    let absolute = format!(
        "GET http://agent:{token}@plain.example.test:{port}/plain/x HTTP/1.1\r\nHost: plain.example.test:{port}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_proxy(env.proxy.addr, absolute.as_bytes()).unwrap();
    assert_denied(&r, 400, "bad_request", "absolute form with userinfo");
    assert!(!r.text().contains(token.as_str()), "{}", r.text());
    let (_s, r) = raw_connect(env.proxy.addr, &format!("agent:{token}@{api}"), None);
    assert_denied(&r, 400, "bad_request", "CONNECT with userinfo");
    assert!(!r.text().contains(token.as_str()), "{}", r.text());
    let url_connect =
        format!("CONNECT https://agent:{token}@{api}/ HTTP/1.1\r\nHost: {api}\r\n\r\n");
    let r = raw_proxy(env.proxy.addr, url_connect.as_bytes()).unwrap();
    assert_denied(&r, 400, "bad_request", "CONNECT to a URL with userinfo");
    // Inside a tunnel, in the absolute-form target and in Host.
    let mut t = env.tunnel();
    let inner = format!(
        "GET https://agent:{token}@{api}/repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\n\r\n"
    );
    assert_denied(
        &t.exchange(inner.as_bytes()).unwrap(),
        403,
        "host_mismatch",
        "inner URL",
    );
    let inner =
        format!("GET /repos/acme/backend/issues HTTP/1.1\r\nHost: agent:{token}@{api}\r\n\r\n");
    assert_denied(
        &t.exchange(inner.as_bytes()).unwrap(),
        403,
        "host_mismatch",
        "inner Host",
    );
    drop(t);

    assert!(env.seen().is_empty(), "{:?}", env.seen());
    // Three refusals at the proxy port, the tunnel's CONNECT, two refusals inside it.
    let lines = env.home.wait_audit(6);
    let refused: Vec<&Value> = lines.iter().filter(|l| l["decision"] == "deny").collect();
    assert_eq!(refused.len(), 5, "{lines:?}");
    let hosts: Vec<&str> = refused
        .iter()
        .map(|l| l["host"].as_str().unwrap())
        .collect();
    let plain = format!("plain.example.test:{port}");
    assert_eq!(hosts, [plain.as_str(), &api, &api, &api, &api], "{lines:?}");
    let raw = std::fs::read_to_string(env.home.state().join("audit.jsonl")).unwrap();
    assert!(
        !raw.contains(token.as_str()),
        "the token reached the audit log: {raw}"
    );
    let log = env.proxy.log();
    assert!(log.contains("request"), "{log}");
    assert!(
        !log.contains(token.as_str()),
        "the token reached the log: {log}"
    );
}

#[test]
fn connect_to_a_url_rather_than_host_port_is_400_bad_request() {
    let env = env();
    let api = env.api();
    for target in [
        format!("https://{api}/"),
        format!("https://{api}"),
        format!("http://{api}/x"),
    ] {
        let req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {api}\r\nProxy-Authorization: Bearer {}\r\n\r\n",
            env.token
        );
        let r = raw_proxy(env.proxy.addr, req.as_bytes()).unwrap();
        assert_denied(&r, 400, "bad_request", &format!("CONNECT {target}"));
    }
    assert!(env.seen().is_empty());
    let lines = env.home.wait_audit(3);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["method"], "CONNECT", "{l}");
        assert_eq!(l["host"], api, "{l}");
        assert_eq!(l["reason"], "bad_request", "{l}");
        assert_eq!(l["decision"], "deny", "{l}");
        assert_eq!(l["status"], 400, "{l}");
    }
    env.still_serves();
}

// ---------------------------------------------------------------------------------------------
// Tokens.
// ---------------------------------------------------------------------------------------------

fn b64url(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn claims(now: u64) -> Value {
    json!({"iss":"latchkey","aud":"latchkey-proxy","sub":"bot","jti":"adv-session",
        "iat": now, "exp": now + 600})
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    if val.is_null() {
        v.as_object_mut().unwrap().remove(key);
    } else {
        v[key] = val;
    }
    v
}

#[test]
fn hostile_tokens_are_refused_at_connect_with_407_and_audited() {
    let env = env();
    let home = &env.home;
    let now = latchkey::auth::unix_now();
    let base = claims(now);
    let alg_none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(base.to_string().as_bytes())
    );
    let pub_pem = std::fs::read(home.state().join("signing.pub")).unwrap();
    let hs256_with_public_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &base,
        &jsonwebtoken::EncodingKey::from_secret(&pub_pem),
    )
    .unwrap();
    let other_home = Home::new();
    other_home.standard_policy();
    let foreign = other_home.issue("bot", &[]);
    // A validly signed token whose payload is swapped for one naming another agent.
    let mut parts: Vec<String> = env.token.split('.').map(str::to_string).collect();
    parts[1] = b64url(
        with(base.clone(), "sub", json!("admin"))
            .to_string()
            .as_bytes(),
    );
    let swapped_payload = parts.join(".");
    let over_long = sign_claims(
        home,
        &with(base.clone(), "task", json!("x".repeat(9 * 1024))),
    );
    let basic = |s: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", format!("Bearer {alg_none}"), "token_invalid"),
        (
            "HS256 keyed with the public key",
            format!("Bearer {hs256_with_public_key}"),
            "token_invalid",
        ),
        (
            "signed by another latchkey",
            format!("Bearer {foreign}"),
            "token_invalid",
        ),
        (
            "payload swapped under a valid signature",
            format!("Bearer {swapped_payload}"),
            "token_invalid",
        ),
        (
            "no exp",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "exp", Value::Null))
            ),
            "token_invalid",
        ),
        (
            "nbf in the future",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "nbf", json!(now + 3600)))
            ),
            "token_invalid",
        ),
        (
            "iat in the future",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "iat", json!(now + 3600)))
            ),
            "token_invalid",
        ),
        (
            "wrong aud",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "aud", json!("someone-else")))
            ),
            "token_invalid",
        ),
        (
            "wrong iss",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "iss", json!("evil")))
            ),
            "token_invalid",
        ),
        (
            "no jti",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "jti", Value::Null))
            ),
            "token_invalid",
        ),
        (
            "exp as a string",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "exp", json!("never")))
            ),
            "token_invalid",
        ),
        (
            "over-long (> 8 KiB), validly signed",
            format!("Bearer {over_long}"),
            "token_invalid",
        ),
        (
            "expired",
            format!(
                "Bearer {}",
                sign_claims(home, &with(base.clone(), "exp", json!(now - 60)))
            ),
            "token_expired",
        ),
        (
            "Basic with an empty password",
            basic("agent:"),
            "token_missing",
        ),
        ("Basic without a colon", basic("agent"), "token_invalid"),
        (
            "Basic that is not base64",
            "Basic !!!not-base64!!!".to_string(),
            "token_invalid",
        ),
        (
            "unknown auth scheme",
            format!("Digest username=\"bot\", response=\"{}\"", env.token),
            "token_invalid",
        ),
        ("empty Bearer", "Bearer ".to_string(), "token_missing"),
        (
            "garbage three-part token",
            "Bearer a.b.c".to_string(),
            "token_invalid",
        ),
    ];
    for (what, auth, reason) in &cases {
        let (_s, r) = raw_connect(env.proxy.addr, &env.api(), Some(auth));
        assert_eq!(r.status, 407, "{what}: {}{}", r.head, r.text());
        assert_eq!(r.reason(), *reason, "{what}: {}", r.text());
        assert_eq!(
            r.header("proxy-authenticate").as_deref(),
            Some("Basic realm=\"latchkey\""),
            "{what}"
        );
    }
    // A validly signed token for an agent that has no policy: authenticated, but no host.
    let ghost = sign_claims(home, &with(base.clone(), "sub", json!("ghost")));
    let (_s, r) = raw_connect(env.proxy.addr, &env.api(), Some(&format!("Bearer {ghost}")));
    assert_denied(&r, 403, "host_not_allowed", "agent without a policy");

    let audit = home.wait_audit(cases.len() + 1);
    let reasons: Vec<&str> = audit
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or(""))
        .collect();
    let mut expected: Vec<&str> = cases.iter().map(|c| c.2).collect();
    expected.push("host_not_allowed");
    assert_eq!(reasons, expected);
    assert!(audit
        .iter()
        .all(|l| l["status"] == 407 || l["reason"] == "host_not_allowed"));
    // Still alive (no panic on any of the above) and the real token still works.
    assert!(env.seen().is_empty());
    env.still_serves();
    let raw = std::fs::read_to_string(home.state().join("audit.jsonl")).unwrap();
    assert!(!raw.contains(&env.token) && !raw.contains(&over_long[..64]));
}

// ---------------------------------------------------------------------------------------------
// An upstream that echoes the injected secret back (tokenizer's echo-exfiltration class).
// ---------------------------------------------------------------------------------------------

#[test]
fn secret_echoed_by_the_upstream_is_redacted_in_body_and_headers() {
    let env = env();
    let r = env.get("/reflect", "");
    assert_eq!(r.status, 200, "{}", r.head);
    // The upstream did get the secret (that is its job)...
    assert_eq!(
        env.seen()[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    // ...but the agent never sees it.
    assert!(
        !r.text().contains(SECRET),
        "body leaks the secret: {}",
        r.text()
    );
    assert!(
        !r.head.contains(SECRET),
        "headers leak the secret: {}",
        r.head
    );
    assert!(r.text().contains("[REDACTED]"), "{}", r.text());
    assert!(
        r.header("x-debug-auth")
            .unwrap_or_default()
            .contains("[REDACTED]"),
        "{}",
        r.head
    );
}

#[test]
fn secret_echoed_split_across_two_body_chunks_is_redacted() {
    let env = env();
    let r = env.get("/reflect-split", "");
    assert_eq!(r.status, 200, "{}", r.head);
    let half = &SECRET[..SECRET.len() / 2];
    let other_half = &SECRET[SECRET.len() / 2..];
    let body = r.text();
    assert!(
        !body.contains(SECRET),
        "split body leaks the secret: {body}"
    );
    assert!(
        !(body.contains(half) && body.contains(other_half)),
        "{body}"
    );
    assert!(body.contains("[REDACTED]"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// Request trailers: filtered by the head's rules (SECURITY.md, "What an agent may send as a
// trailer"). The echo upstream speaks HTTP/2, so before the filter they arrived verbatim.
// ---------------------------------------------------------------------------------------------

/// The trailer block a hostile agent sends after its body: its own credential, its latchkey
/// token, another `Host`, a spoofed latchkey header, a framing field, and one harmless checksum.
fn hostile_trailers(token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {AGENT_OWN}")),
        ("proxy-authorization", format!("Bearer {token}")),
        ("host", "evil.example.test".into()),
        ("x-latchkey-verdict", "allow".into()),
        ("content-length", "999".into()),
        ("x-checksum", "sha256=abc".into()),
    ]
}

/// The upstream got the POST with our credential in its head and, of the agent's trailers,
/// only the checksum; the audit line is an ordinary `ok`.
fn assert_only_the_harmless_trailer_arrived(env: &Env, path: &str) {
    let seen = env.seen();
    let s = seen
        .iter()
        .find(|s| s.method == "POST" && s.path == path)
        .unwrap_or_else(|| panic!("the upstream never got the POST: {seen:?}"));
    assert_eq!(
        s.trailers,
        vec![("x-checksum".to_string(), "sha256=abc".to_string())],
        "{s:?}"
    );
    assert_eq!(
        s.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert!(!s.everything().contains("evil.example.test"), "{s:?}");
    assert!(!s.everything().contains("x-latchkey-"), "{s:?}");
    env.assert_no_leak();
    let line = eventually(Duration::from_secs(10), "the POST's audit line", || {
        env.home
            .audit()
            .into_iter()
            .find(|l| l["method"] == "POST" && l["path"] == path)
    });
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["route"], "issues-write", "{line}");
    assert_eq!(line["bytes_up"], 5, "{line}");
}

#[test]
fn trailers_of_a_chunked_http1_request_lose_credentials_token_and_host() {
    let env = env();
    let path = "/repos/acme/backend/issues";
    let trailers: String = hostile_trailers(&env.token)
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\
         Trailer: authorization, proxy-authorization, host, x-checksum\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n0\r\n{trailers}\r\n",
        env.api()
    );
    let r = env.tunnel().exchange(req.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    assert_eq!(r.json()["body_len"], 5);
    assert_only_the_harmless_trailer_arrived(&env, path);
}

#[test]
fn trailers_of_an_http2_request_lose_credentials_token_and_host() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    let env = env();
    let path = "/repos/acme/backend/issues";
    let agent = H2Agent::open(&env.home, env.proxy.addr, &env.token);
    let mut trailers = http::HeaderMap::new();
    for (k, v) in hostile_trailers(&env.token) {
        trailers.append(k, v.parse().unwrap());
    }
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post(format!("https://{}{path}", agent.authority))
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let mut send = agent.send.clone();
    let (status, body) = agent.rt.block_on(async move {
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body_len"], 5, "{body}");
    assert_only_the_harmless_trailer_arrived(&env, path);
}

// ---------------------------------------------------------------------------------------------
// The response head: every byte an agent receives on a credentialed route is redacted, the
// status line and header names included; interim responses are never relayed.
// ---------------------------------------------------------------------------------------------

/// A plain-HTTP upstream that puts the credential it was sent (`x-api-key`, or `none`) where
/// header-value and body redaction alone would miss it: in two interim responses (100, 103),
/// in the reason phrase and in a header name; and in a header value and the body. Returns its
/// port and the request heads it read.
fn status_echo_upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let echo = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("x-api-key")
                        .then(|| v.trim().to_owned())
                })
                .unwrap_or_else(|| "none".into());
            seen.lock().unwrap().push(head);
            let body = format!("you sent {echo}");
            let answer = format!(
                "HTTP/1.1 100 Continue\r\nX-Echo: {echo}\r\n\r\n\
                 HTTP/1.1 103 Early Hints\r\nLink: </{echo}>; rel=preload\r\nX-{echo}: 1\r\n\r\n\
                 HTTP/1.1 200 {echo} says hello\r\nX-{echo}-Echo: yes\r\nX-Echo: {echo}\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes());
        }
    });
    (port, heads)
}

/// Everything the agent's socket receives for one absolute-form GET, until latchkey closes it.
fn raw_answer(env: &Env, port: u16, path: &str) -> String {
    let req = format!(
        "GET http://status.example.test:{port}{path} HTTP/1.1\r\nHost: status.example.test:{port}\r\n\
         Proxy-Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
        env.token
    );
    let mut s = proxy_socket(env.proxy.addr);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn secret_echoed_in_the_status_line_a_header_name_or_an_interim_response_never_reaches_the_agent() {
    let (port, heads) = status_echo_upstream();
    let routes = format!(
        r#"
[[routes]]
id = "status-credentialed"
host = "status.example.test:{port}"
methods = ["GET"]
paths = ["/cred/**"]
credential = "github"
inject = {{ header = "x-api-key", value = "{{secret}}" }}
insecure_http = true

[[routes]]
id = "status-open"
host = "status.example.test:{port}"
methods = ["GET"]
paths = ["/open/**"]
"#
    );
    let pin = format!("status.example.test:{port}:127.0.0.1");
    let env = env_with(&["--resolve", &pin], &routes);

    let raw = raw_answer(&env, port, "/cred/x");
    // The upstream got the credential (that is its job)...
    let got = heads.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0]
            .to_ascii_lowercase()
            .contains(&format!("x-api-key: {SECRET}").to_ascii_lowercase()),
        "{}",
        got[0]
    );
    // ...and the agent's bytes hold it nowhere, in no case: not in the status line, a header
    // name or value, an interim response, or the body.
    assert!(
        !raw.to_ascii_lowercase()
            .contains(&SECRET.to_ascii_lowercase()),
        "the agent received the secret: {raw}"
    );
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(!raw.contains("says hello"), "{raw}");
    assert!(
        !raw.contains("HTTP/1.1 10"),
        "an interim response was relayed: {raw}"
    );
    assert!(!raw.to_ascii_lowercase().contains("link:"), "{raw}");
    assert!(raw.contains("\r\nx-echo: [REDACTED]\r\n"), "{raw}");
    assert!(raw.contains("you sent [REDACTED]"), "{raw}");
    let line = eventually(Duration::from_secs(10), "the audit line", || {
        env.home
            .audit()
            .into_iter()
            .find(|l| l["path"] == "/cred/x")
    });
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["route"], "status-credentialed", "{line}");
    assert_eq!(line["credential"], "github", "{line}");

    // Without a credential there is nothing to redact, but the reason phrase is still ours.
    let raw = raw_answer(&env, port, "/open/x");
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(!raw.contains("says hello"), "{raw}");
    assert!(!raw.contains("HTTP/1.1 10"), "{raw}");
    assert!(raw.contains("you sent none"), "{raw}");
    let got = heads.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        !got[1].to_ascii_lowercase().contains("x-api-key"),
        "{}",
        got[1]
    );
    let line = eventually(Duration::from_secs(10), "the audit line", || {
        env.home
            .audit()
            .into_iter()
            .find(|l| l["path"] == "/open/x")
    });
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["route"], "status-open", "{line}");
    assert!(
        !env.proxy.log().contains(SECRET),
        "the secret reached the log"
    );
}

// ---------------------------------------------------------------------------------------------
// Network: private destinations, upstream faults.
// ---------------------------------------------------------------------------------------------

fn localhost_route(port: u16) -> String {
    format!(
        r#"
[[routes]]
id = "loopback-by-name"
host = "localhost:{port}"
methods = ["GET"]
paths = ["/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
    )
}

#[test]
fn a_name_resolving_to_loopback_without_a_pin_is_403_upstream_private() {
    let env = {
        let home = Home::new();
        home.standard_policy_with(&localhost_route(home.https_port()));
        home.set_secret("github", SECRET);
        let token = home.issue("bot", &[]);
        let proxy = home.serve(&[]);
        Env { home, proxy, token }
    };
    let url = format!("https://localhost:{}/x", env.home.https_port());
    let r = env.home.curl(&env.proxy, &env.token, &[], &url);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "upstream_private");
    assert!(
        env.seen().is_empty(),
        "the secret went to a loopback address"
    );
}

#[test]
fn a_name_pinned_to_loopback_with_resolve_is_allowed() {
    let home = Home::new();
    home.standard_policy_with(&localhost_route(home.https_port()));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let pin = format!("localhost:{}:127.0.0.1", home.https_port());
    let proxy = home.serve(&["--resolve", &pin]);
    let url = format!("https://localhost:{}/x", home.https_port());
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_eq!(
        home.upstream.seen()[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
}

/// How a fake upstream misbehaves.
#[derive(Clone, Copy)]
enum Fault {
    /// Reads the request, answers a status line that is not HTTP.
    Garbage,
    /// Reads the request, closes without answering.
    CloseBeforeAnswer,
    /// Answers a head announcing 100 bytes, sends 5, closes.
    TruncatedBody,
    /// Reads the request and never answers.
    Silent,
    /// Answers 200 with a head of about this many bytes of padding fields, then a body "ok".
    HeadOf(usize),
}

/// A plain-HTTP fake upstream on 127.0.0.1:0; returns its port.
fn fault_upstream(fault: Fault) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            match fault {
                Fault::Garbage => {
                    let _ = s.write_all(b"HTTP/1.1 garbage\r\nwhat even is this\r\n\r\n");
                }
                Fault::CloseBeforeAnswer => {}
                Fault::TruncatedBody => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort");
                }
                Fault::Silent => held.push(s),
                Fault::HeadOf(bytes) => {
                    let mut head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
                    for i in 0..bytes / 1024 {
                        head.extend_from_slice(format!("X-Pad-{i:04}: ").as_bytes());
                        head.extend_from_slice(&[b'p'; 1010]);
                        head.extend_from_slice(b"\r\n");
                    }
                    head.extend_from_slice(b"\r\nok");
                    let _ = s.write_all(&head);
                }
            }
        }
    });
    port
}

/// Env with one plain-HTTP route `fault.example.test:PORT` to a fake upstream.
fn fault_env(port: u16, serve_extra: &[&str]) -> Env {
    let route = format!(
        r#"
[[routes]]
id = "fault"
host = "fault.example.test:{port}"
methods = ["GET"]
paths = ["/**"]
"#
    );
    let pin = format!("fault.example.test:{port}:127.0.0.1");
    let mut args = vec!["--resolve", pin.as_str()];
    args.extend_from_slice(serve_extra);
    env_with(&args, &route)
}

fn plain_get(env: &Env, port: u16) -> std::io::Result<RawResponse> {
    let req = format!(
        "GET http://fault.example.test:{port}/x HTTP/1.1\r\nHost: fault.example.test:{port}\r\nProxy-Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
        env.token
    );
    raw_proxy(env.proxy.addr, req.as_bytes())
}

#[test]
fn upstream_answering_garbage_is_502_upstream_protocol() {
    let port = fault_upstream(Fault::Garbage);
    let env = fault_env(port, &[]);
    let r = plain_get(&env, port).unwrap();
    assert_denied(&r, 502, "upstream_protocol", "garbage status line");
    assert_eq!(
        audit_line_with(&env.home, "upstream_protocol")["status"],
        502
    );
    env.still_serves();
}

/// A hostile upstream's response head is bounded by hyper's read buffer (about 400 KiB on
/// upstream connections; bodies stream through it): a head of 48 KiB goes through whole, one
/// of 512 KiB is the upstream's broken answer, a 502 said once and audited, and the proxy
/// serves on.
#[test]
fn an_upstream_head_past_the_read_buffer_is_502_upstream_protocol_and_one_below_passes() {
    let port = fault_upstream(Fault::HeadOf(48 * 1024));
    let env = fault_env(port, &[]);
    let r = plain_get(&env, port).unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "ok");
    assert!(
        r.head.contains("x-pad-0046: ppp"),
        "a padding field is missing"
    );

    let port = fault_upstream(Fault::HeadOf(512 * 1024));
    let env = fault_env(port, &[]);
    let r = plain_get(&env, port).unwrap();
    assert_denied(&r, 502, "upstream_protocol", "a 512 KiB response head");
    let line = audit_line_with(&env.home, "upstream_protocol");
    assert_eq!(line["status"], 502);
    assert_eq!(line["decision"], "allow", "the request went out: {line}");
    env.still_serves();
}

#[test]
fn upstream_closing_before_answering_is_502_upstream_protocol() {
    let port = fault_upstream(Fault::CloseBeforeAnswer);
    let env = fault_env(port, &[]);
    let r = plain_get(&env, port).unwrap();
    assert_denied(&r, 502, "upstream_protocol", "closed before answering");
    env.still_serves();
}

#[test]
fn upstream_cutting_the_body_short_closes_the_agents_connection() {
    let port = fault_upstream(Fault::TruncatedBody);
    let env = fault_env(port, &[]);
    // The head was already relayed (200, length 100); the agent must see the body end early
    // (an error), never a complete-looking response.
    match plain_get(&env, port) {
        Ok(r) => panic!(
            "a truncated upstream body looked complete to the agent: {} {:?}",
            r.head,
            r.text()
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
    }
    env.still_serves();
}

/// A TLS upstream that takes connections and never answers the handshake, hit by more agents
/// at once than latchkey sets up connections per host (`proxy/dials.rs`, 4): every agent gets
/// its 504 within the response timeout (none waits behind another's stuck handshake for
/// longer than the dial wait), nothing reaches an upstream, each request is audited as an
/// upstream timeout, and the proxy serves on.
#[test]
fn a_tls_upstream_that_never_answers_the_handshake_holds_no_agent_past_its_timeout() {
    const AGENTS: usize = 6;
    let port = fault_upstream(Fault::Silent);
    let env = fault_env(port, &["--upstream-timeout", "1s"]);
    let authority = format!("fault.example.test:{port}");
    let seen_before = env.seen().len();
    let start = Instant::now();
    let agents: Vec<_> = (0..AGENTS)
        .map(|_| {
            let mut t = RawTunnel::open(
                env.proxy.addr,
                &authority,
                &env.token,
                "fault.example.test",
                &env.home.latchkey_ca(),
            )
            .unwrap();
            let req = format!("GET /x HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
            std::thread::spawn(move || t.exchange(req.as_bytes()).unwrap())
        })
        .collect();
    for agent in agents {
        let r = agent.join().unwrap();
        assert_denied(
            &r,
            504,
            "upstream_timeout",
            "TLS upstream silent in its handshake",
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{AGENTS} agents took {:?}",
        start.elapsed()
    );
    let timeouts = env
        .home
        .wait_audit(AGENTS * 2)
        .into_iter()
        .filter(|l| l["method"] == "GET" && l["reason"] == "upstream_timeout")
        .count();
    assert_eq!(timeouts, AGENTS);
    assert_eq!(
        env.seen().len(),
        seen_before,
        "nothing reached the test upstream"
    );
    env.still_serves();
}

#[test]
fn upstream_that_never_answers_is_504_upstream_timeout() {
    let port = fault_upstream(Fault::Silent);
    let env = fault_env(port, &["--upstream-timeout", "1s"]);
    let start = Instant::now();
    let r = plain_get(&env, port).unwrap();
    assert_denied(&r, 504, "upstream_timeout", "silent upstream");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    env.still_serves();
}

#[test]
fn refused_upstream_is_502_upstream_unreachable_and_the_proxy_keeps_serving() {
    let port = dead_port();
    let env = fault_env(port, &[]);
    let r = plain_get(&env, port).unwrap();
    assert_denied(&r, 502, "upstream_unreachable", "connection refused");
    env.still_serves();
}

#[test]
fn upstream_certificate_for_another_name_is_502_upstream_tls_and_no_secret_is_sent() {
    // The test upstream's certificate covers api/other.example.test, localhost and
    // 127.0.0.1: not wrongname.example.test.
    let env = {
        let home = Home::new();
        home.standard_policy_with(&format!(
            r#"
[[routes]]
id = "wrong-name"
host = "wrongname.example.test:{}"
methods = ["GET"]
paths = ["/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#,
            home.https_port()
        ));
        home.set_secret("github", SECRET);
        let token = home.issue("bot", &[]);
        let pin = format!("wrongname.example.test:{}:127.0.0.1", home.https_port());
        let proxy = home.serve(&["--resolve", &pin]);
        Env { home, proxy, token }
    };
    let url = format!("https://wrongname.example.test:{}/x", env.home.https_port());
    let r = env.home.curl(&env.proxy, &env.token, &[], &url);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.json()["reason"], "upstream_tls");
    assert!(
        env.seen().is_empty(),
        "a request (and the secret) went over unverified TLS"
    );
    env.still_serves();
}

#[test]
fn an_upstream_switching_protocols_on_an_http2_agent_is_502_and_the_connection_lives_on() {
    let home = Home::new();
    // An HTTP/1.1-only upstream (HTTP/2 has no 101) on a port of its own.
    let (proxy, token, port) = serve_h1_only(&home, &["/switch", "/repos/acme/backend/issues"]);

    let agent = H2Agent::open_to(&home, proxy.addr, &token, port);
    let (status, body) = agent
        .get("/switch")
        .expect("an answer, not a broken connection");
    assert_eq!(status, 502, "{body:?}");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["reason"], "upstream_protocol", "{body}");
    assert_eq!(body["error"], "upstream_failed", "{body}");
    // The same HTTP/2 connection still carries the next request.
    let (status, body) = agent
        .get("/repos/acme/backend/issues")
        .expect("connection alive");
    assert_eq!(status, 200, "{body:?}");

    let seen = home.upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/switch", "/repos/acme/backend/issues"]);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    let lines = home.wait_audit(3);
    let line = lines
        .iter()
        .find(|l| l["path"] == "/switch")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["reason"], "upstream_protocol", "{line}");
    assert_eq!(line["outcome"], "upstream_failed", "{line}");
    // The request, with its credential, did go out.
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["route"], "h1-only", "{line}");
}

// ---------------------------------------------------------------------------------------------
// Limits.
// ---------------------------------------------------------------------------------------------

#[test]
fn body_announced_larger_than_max_body_is_413_before_anything_reaches_upstream() {
    let home = Home::new();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "small-upload"
host = "{API_HOST}:{}"
methods = ["POST"]
paths = ["/upload"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
max_body = 1024
"#,
        home.https_port()
    ));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let env = Env { home, proxy, token };
    // Announce 1 MiB but send nothing: the answer must come from the header alone.
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: 1048576\r\n\r\n",
        env.api()
    );
    let r = env.tunnel().exchange(req.as_bytes()).unwrap();
    assert_denied(&r, 413, "body_too_large", "1 MiB announced, 1 KiB allowed");
    assert!(env.seen().is_empty());
    // A body within the limit passes.
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789",
        env.api()
    );
    let r = env.tunnel().exchange(req.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
}
