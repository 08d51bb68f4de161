//! End to end: the real binary, a real HTTPS upstream on loopback, real clients (curl, Python
//! requests, reqwest). Each test asserts what the agent saw, what the upstream received and
//! what the audit log says.

use std::process::Command;

use crate::common::*;
use serde_json::Value;

fn ready() -> (Home, Proxy, String) {
    ready_with(&["--on-behalf-of", "alice", "--task", "triage"])
}

fn now() -> u64 {
    latchkey::auth::unix_now()
}

#[test]
fn curl_gets_the_real_secret_injected_and_its_own_credentials_stripped() {
    let (home, proxy, token) = ready();
    let r = home.curl(
        &proxy,
        &token,
        &["-H", &format!("Authorization: Bearer {AGENT_OWN}")],
        &home.api_url("/repos/acme/backend/issues?state=open"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.connect_status, 200);
    let echo = r.json();
    // The upstream echoes what it received; latchkey redacts the echoed credential.
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert!(!r.body.contains(SECRET));
    assert_eq!(
        home.upstream.seen()[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(
        echo["headers"]["authorization"].as_array().unwrap().len(),
        1
    );
    assert_eq!(echo["query"], "state=open");
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1);
    let everything = seen[0].everything();
    assert!(
        !everything.contains(AGENT_OWN),
        "agent credential reached upstream"
    );
    assert!(!everything.contains(&token), "proxy token reached upstream");
    assert!(seen[0].header("proxy-authorization").is_none());
    // The agent gets a request id, and not the upstream's spoofed one.
    // curl -D prints the CONNECT answer's head first; the request's own head is the last block.
    let final_head = r.headers.trim_end().rsplit("\r\n\r\n").next().unwrap();
    let rid = final_head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-latchkey-request-id:"))
        .collect::<Vec<_>>();
    assert_eq!(rid.len(), 1, "{}", r.headers);
    assert!(!rid[0].contains("spoofed"));

    let audit = home.wait_audit(2);
    let connect = &audit[0];
    assert_eq!(connect["method"], "CONNECT");
    assert_eq!(connect["decision"], "allow");
    let line = &audit[1];
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["agent"], "bot");
    assert_eq!(line["on_behalf_of"], "alice");
    assert_eq!(line["task"], "triage");
    assert_eq!(line["route"], "issues-read");
    assert_eq!(line["credential"], "github");
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/repos/acme/backend/issues");
    assert_eq!(line["host"], format!("{API_HOST}:{}", home.https_port()));
    assert!(line["session"].as_str().unwrap().len() >= 16);
    assert!(line["duration_ms"].as_f64().is_some());
    for field in ["ts", "request_id", "prev_hash", "hash", "reason"] {
        assert!(line.get(field).is_some(), "audit line lacks {field}");
    }
    let raw = std::fs::read_to_string(home.state().join("audit.jsonl")).unwrap();
    assert!(!raw.contains(SECRET) && !raw.contains(&token));
    assert!(!proxy.log().contains(SECRET) && !proxy.log().contains(&token));
}

#[test]
fn python_requests_through_https_proxy_gets_the_secret() {
    let (home, proxy, token) = ready();
    let script = r#"
import os, sys, requests
r = requests.get(sys.argv[1], headers={"Authorization": "Bearer agent-own-credential-1234"}, timeout=30)
print(r.status_code)
print(r.json()["headers"]["authorization"][0])
assert "s3cr3t" not in r.text
s = requests.Session()
for i in range(3):
    r2 = s.post(sys.argv[2], data=b"x" * 100000, timeout=30)
    assert r2.status_code == 200, r2.text
    assert r2.json()["body_len"] == 100000
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(home.api_url("/repos/acme/backend/issues/7"))
        .arg(home.api_url("/repos/acme/backend/issues"))
        .env("HTTPS_PROXY", proxy.url_with(&token))
        .env("NO_PROXY", "")
        .env("REQUESTS_CA_BUNDLE", home.latchkey_ca())
        .output()
        .expect("python3 with requests is installed (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["200", "Bearer [REDACTED]", "ok"]);
    assert!(home
        .upstream
        .seen()
        .iter()
        .all(|s| s.header("authorization") == Some(format!("Bearer {SECRET}").as_str())));
    for s in home.upstream.seen() {
        assert!(!s.everything().contains(AGENT_OWN));
        assert!(!s.everything().contains(&token));
    }
}

#[test]
fn rust_client_through_proxy_with_bearer_proxy_auth() {
    let (home, proxy, token) = ready();
    let ca = std::fs::read(home.latchkey_ca()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .proxy(
                reqwest::Proxy::https(format!("http://{}", proxy.addr))
                    .unwrap()
                    .custom_http_auth(format!("Bearer {token}").parse().unwrap()),
            )
            .build()
            .unwrap();
        for _ in 0..3 {
            let resp = client
                .get(home.api_url("/repos/acme/backend/issues"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["headers"]["authorization"][0], "Bearer [REDACTED]");
        }
    });
}

#[test]
fn path_outside_the_routes_is_403_no_route_with_a_json_body() {
    let (home, proxy, token) = ready();
    let r = home.curl(&proxy, &token, &[], &home.api_url("/repos/acme/secrets"));
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["error"], "denied");
    assert_eq!(body["reason"], "no_route");
    assert!(body["detail"].as_str().unwrap().len() > 10);
    assert!(body["request_id"].as_str().is_some());
    // Wrong method on an allowed path.
    let r = home.curl(
        &proxy,
        &token,
        &["-X", "DELETE"],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "method_not_allowed");
    assert!(
        home.upstream.seen().is_empty(),
        "a denied request reached the upstream"
    );
    let audit = home.wait_audit(4);
    let denies: Vec<&Value> = audit.iter().filter(|l| l["decision"] == "deny").collect();
    assert_eq!(denies.len(), 2);
    assert_eq!(denies[0]["reason"], "no_route");
    assert_eq!(denies[0]["status"], 403);
    assert_eq!(denies[0]["agent"], "bot");
    assert_eq!(denies[0]["outcome"], "denied");
    assert_eq!(denies[1]["reason"], "method_not_allowed");
}

#[test]
fn another_host_is_refused_at_connect_before_any_tls() {
    let (home, proxy, token) = ready();
    let url = format!(
        "https://{OTHER_HOST}:{}/repos/acme/backend/issues",
        home.https_port()
    );
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.connect_status, 403, "{r:?}");
    assert_ne!(r.exit, 0);
    assert!(home.upstream.seen().is_empty());
    let audit = home.wait_audit(1);
    assert_eq!(audit[0]["reason"], "host_not_allowed");
    assert_eq!(audit[0]["method"], "CONNECT");
    assert_eq!(audit[0]["status"], 403);
}

#[test]
fn bad_forged_and_expired_tokens_get_407() {
    let (home, proxy, token) = ready();
    let url = home.api_url("/repos/acme/backend/issues");
    let expired = sign_claims(
        &home,
        &serde_json::json!({"iss":"latchkey","aud":"latchkey-proxy","sub":"bot","jti":"old",
            "iat": now() - 3600, "exp": now() - 60}),
    );
    let wrong_aud = sign_claims(
        &home,
        &serde_json::json!({"iss":"latchkey","aud":"someone-else","sub":"bot","jti":"x",
            "iat": now(), "exp": now() + 60}),
    );
    let no_exp = sign_claims(
        &home,
        &serde_json::json!({"iss":"latchkey","aud":"latchkey-proxy","sub":"bot","jti":"x","iat": now()}),
    );
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let other_home = Home::new();
    other_home.standard_policy();
    let foreign = other_home.issue("bot", &[]);
    let cases = [
        ("garbage", "not-a-jwt", "token_invalid"),
        ("tampered", tampered.as_str(), "token_invalid"),
        ("foreign key", foreign.as_str(), "token_invalid"),
        ("wrong aud", wrong_aud.as_str(), "token_invalid"),
        ("no exp", no_exp.as_str(), "token_invalid"),
        ("expired", expired.as_str(), "token_expired"),
    ];
    for (what, tok, _) in &cases {
        let r = home.curl(&proxy, tok, &[], &url);
        assert_eq!(r.connect_status, 407, "{what}: {r:?}");
    }
    // No credentials at all.
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_connect}", "--proxy"])
        .arg(format!("http://{}", proxy.addr))
        .arg("--cacert")
        .arg(home.latchkey_ca())
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "407");
    let audit = home.wait_audit(cases.len() + 1);
    let reasons: Vec<&str> = audit
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = cases.iter().map(|c| c.2).collect();
    expected.push("token_missing");
    assert_eq!(reasons, expected);
    // An expired token signed by us is still attributed; a forged one names nobody.
    let expired_line = audit
        .iter()
        .find(|l| l["reason"] == "token_expired")
        .unwrap();
    assert_eq!(expired_line["agent"], "bot");
    assert_eq!(expired_line["session"], "old");
    assert!(audit
        .iter()
        .filter(|l| l["reason"] == "token_invalid")
        .all(|l| l["agent"].is_null()));
    assert!(home.upstream.seen().is_empty());
}

#[test]
fn proxy_answers_407_with_proxy_authenticate_header() {
    let (home, proxy, _token) = ready();
    let out = Command::new("curl")
        .args(["-sS", "-i", "--proxytunnel", "--proxy"])
        .arg(format!("http://{}", proxy.addr))
        .args(["-o", "/dev/null", "-D", "-"])
        .arg(home.api_url("/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.contains("407"), "{text}");
    assert!(
        text.contains("proxy-authenticate: basic realm=\"latchkey\""),
        "{text}"
    );
}

#[test]
fn host_header_that_differs_from_connect_is_403_host_mismatch() {
    let (home, proxy, token) = ready();
    let r = home.curl(
        &proxy,
        &token,
        &["-H", &format!("Host: {OTHER_HOST}:{}", home.https_port())],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "host_mismatch");
    assert!(home.upstream.seen().is_empty());
}

#[test]
fn traversal_is_normalised_or_refused() {
    let (home, proxy, token) = ready();
    // Climbs out of the allowed prefix: normalised to /repos/acme/admin -> no route.
    let r = home.curl(
        &proxy,
        &token,
        &["--path-as-is"],
        &home.api_url("/repos/acme/backend/issues/../../admin"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "no_route");
    // Climbs above the root.
    let r = home.curl(
        &proxy,
        &token,
        &["--path-as-is"],
        &home.api_url("/../../etc/passwd"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["reason"], "bad_path");
    // Encoded slash.
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues%2F..%2F..%2Fadmin"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["reason"], "bad_path");
    // Dot segments inside the allowed prefix are resolved, and the upstream sees the clean form.
    let r = home.curl(
        &proxy,
        &token,
        &["--path-as-is"],
        &home.api_url("/repos/acme//backend/./issues/%37"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/repos/acme/backend/issues/7");
    assert_eq!(home.upstream.seen().len(), 1);
}

#[test]
fn query_and_basic_injection_forms() {
    let (home, proxy, token) = ready();
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/search?q=x&api_key=agent-own-credential-1234"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["query"], "q=x&api_key=[REDACTED]");
    let q = home.upstream.seen()[0].query.clone().unwrap();
    assert!(q.contains(SECRET), "{q}");
    assert!(q.starts_with("q=x&api_key="), "{q}");
    assert!(!q.contains(AGENT_OWN));
    assert_eq!(q.matches("api_key=").count(), 1);
    let r = home.curl(&proxy, &token, &[], &home.api_url("/basic"));
    assert_eq!(r.status, 200);
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("bot-user:{SECRET}"));
    assert_eq!(r.json()["headers"]["authorization"][0], "Basic [REDACTED]");
    assert_eq!(
        home.upstream.seen()[1].header("authorization"),
        Some(format!("Basic {expected}").as_str())
    );
}

#[test]
fn missing_secret_is_503_and_a_secret_set_while_serving_is_used_next_request() {
    let (home, proxy, token) = ready();
    let r = home.curl(&proxy, &token, &[], &home.api_url("/missing"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["reason"], "secret_unavailable");
    assert!(home.upstream.seen().is_empty());
    home.set_secret("not-stored", "fresh-value-42");
    let r = home.curl(&proxy, &token, &[], &home.api_url("/missing"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-api-key"][0], "[REDACTED]");
    assert_eq!(
        home.upstream.seen()[0].header("x-api-key"),
        Some("fresh-value-42")
    );
    // Rotation: a new value replaces the old on the very next request.
    home.set_secret("github", "rotated-value-43");
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        home.upstream.seen()[1].header("authorization"),
        Some("Bearer rotated-value-43")
    );
}

#[test]
fn dead_upstream_is_502_upstream_unreachable() {
    let home = Home::new();
    let port = dead_port();
    home.write_policy(
        "bot.toml",
        &format!(
            "agent = \"bot\"\n[[routes]]\nid = \"dead\"\nhost = \"dead.example.test:{port}\"\nmethods = [\"GET\"]\npaths = [\"/**\"]\n"
        ),
    );
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&["--resolve", &format!("dead.example.test:{port}:127.0.0.1")]);
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &format!("https://dead.example.test:{port}/x"),
    );
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.json()["reason"], "upstream_unreachable");
    assert_eq!(r.json()["error"], "upstream_failed");
    let audit = home.wait_audit(2);
    assert_eq!(audit[1]["reason"], "upstream_unreachable");
    assert_eq!(audit[1]["status"], 502);
    // Connecting failed, so nothing went out: deny, and whose fault it was.
    assert_eq!(audit[1]["decision"], "deny");
    assert_eq!(audit[1]["outcome"], "upstream_failed");
}

#[test]
fn upstream_with_an_untrusted_certificate_is_502_upstream_tls() {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    // Started without --upstream-ca: the upstream's test CA is not trusted.
    let proxy = home.serve_exactly(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--resolve",
        &format!("{API_HOST}:{}:127.0.0.1", home.https_port()),
    ]);
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.json()["reason"], "upstream_tls");
    // The secret was never sent: TLS failed before any request bytes, and the line says so.
    assert!(home.upstream.seen().is_empty());
    let line = home.wait_audit(2).pop().unwrap();
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["outcome"], "upstream_failed");
}

#[test]
fn plain_http_absolute_form_injects_only_with_insecure_http_opt_in() {
    let (home, proxy, token) = ready();
    let url = format!("http://plain.example.test:{}/plain/x?y=1", home.http_port());
    let out = Command::new("curl")
        .args(["-sS", "--proxy"])
        .arg(proxy.url_with(&token))
        .arg(&url)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["headers"]["x-api-key"][0], "[REDACTED]");
    assert_eq!(home.upstream.seen()[0].header("x-api-key"), Some(SECRET));
    assert!(v["headers"].get("proxy-authorization").is_none());
    let url = format!("http://nocreds.example.test:{}/x", home.http_port());
    let out = Command::new("curl")
        .args(["-sS", "--proxy"])
        .arg(proxy.url_with(&token))
        .arg(&url)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reason"], "insecure_http_refused");
    assert!(
        v["detail"].as_str().unwrap().contains("insecure_http"),
        "{v}"
    );
    assert_eq!(home.upstream.seen().len(), 1);
}

#[test]
fn a_100_mib_download_streams_with_bounded_memory() {
    // Peak memory is a property of the process: the real binary.
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve_binary(&[]);
    let size = 100 * 1024 * 1024u64;
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "--proxy",
        ])
        .arg(proxy.url_with(&token))
        .arg("--cacert")
        .arg(home.latchkey_ca())
        .arg(home.api_url(&format!("/big?bytes={size}")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("200 {size}"));
    let hwm_kib = peak_rss_kib(proxy.pid());
    // Buffering the body would need > 100 MiB; streaming needs a few buffers.
    assert!(
        hwm_kib < 64 * 1024,
        "peak RSS {hwm_kib} KiB while streaming 100 MiB"
    );
}

#[test]
fn sigterm_flushes_every_audit_line() {
    let (home, proxy, token) = ready();
    let mut answered = 0;
    for _ in 0..20 {
        let r = home.curl(
            &proxy,
            &token,
            &[],
            &home.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.status, 200);
        answered += 2; // CONNECT + request
    }
    let status = proxy.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(home.audit().len(), answered);
    let out = home.run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn upstream_connections_are_pooled_across_agent_connections() {
    let (home, proxy, token) = ready();
    for _ in 0..5 {
        let r = home.curl(
            &proxy,
            &token,
            &[],
            &home.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.status, 200);
    }
    // Five separate curl processes (five tunnels), one upstream TLS connection.
    let conns = home
        .upstream
        .tls_connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(conns, 1, "upstream connections were not reused");
}

#[test]
fn a_100_mib_upload_streams_with_bounded_memory() {
    // Peak memory is a property of the process: the real binary.
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve_binary(&[]);
    let size = 100 * 1024 * 1024u64;
    let script = format!(
        "head -c {size} /dev/zero | curl -sS --proxy '{}' --cacert '{}' -X POST -H 'content-type: application/octet-stream' --data-binary @- '{}'",
        proxy.url_with(&token),
        home.latchkey_ca().display(),
        home.api_url("/repos/acme/backend/issues")
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["body_len"], size);
    let hwm_kib = peak_rss_kib(proxy.pid());
    assert!(
        hwm_kib < 64 * 1024,
        "peak RSS {hwm_kib} KiB while uploading 100 MiB"
    );
}

#[test]
fn curl_http10_is_served_in_the_tunnel() {
    // curl --http1.0 offers only ALPN `http/1.0`; latchkey used to refuse the handshake.
    let (home, proxy, token) = ready_with(&[]);
    let c = home.curl(
        &proxy,
        &token,
        &[
            "--http1.0",
            "-H",
            &format!("Authorization: Bearer {AGENT_OWN}"),
        ],
        &home.api_url("/repos/acme/backend/issues/10"),
    );
    assert_eq!((c.exit, c.status), (0, 200), "{c:?}");
    assert!(c.headers.contains("HTTP/1.0 200"), "{}", c.headers);
    assert_eq!(c.json()["path"], "/repos/acme/backend/issues/10");
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert!(!seen[0].everything().contains(AGENT_OWN));
    let lines = home.wait_audit(2);
    let line = lines.iter().find(|l| l["method"] == "GET").unwrap();
    assert_eq!(line["outcome"], "ok");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "issues-read");
}

/// A running proxy notices the file store changed under it (another process's `secret set`
/// and `secret rm`): a rotated value is injected from the next request on, and a removed one
/// is never sent again: the agent gets 503 `secret_unavailable`, the upstream nothing, and the
/// audit line says why. (The store is looked at once a millisecond, not per request.)
#[test]
fn a_secret_rotated_or_removed_while_serving_is_used_or_refused_on_the_next_request() {
    let (home, proxy, token) = ready();
    let url = home.api_url("/repos/acme/backend/issues");
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.status, 200, "{}", r.body);

    home.set_secret("github", "rotated-value-5555");
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].header("authorization"),
        Some("Bearer rotated-value-5555")
    );

    home.run_ok(&["secret", "rm", "github"]);
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["reason"], "secret_unavailable");
    assert_eq!(home.upstream.seen().len(), 2, "nothing went upstream");
    let lines = home.wait_audit(6);
    let last = lines
        .iter()
        .rev()
        .find(|l| l["method"] == "GET")
        .expect("the refused request's line");
    assert_eq!(last["decision"], "deny");
    assert_eq!(last["reason"], "secret_unavailable");
    assert_eq!(last["status"], 503);
    let raw = std::fs::read_to_string(home.state().join("audit.jsonl")).unwrap();
    assert!(!raw.contains("rotated-value-5555") && !raw.contains(SECRET));
}
