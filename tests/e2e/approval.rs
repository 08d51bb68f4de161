//! Human in the loop: requests held on `approval = "request"` routes until a person decides
//! with `latchkey approvals`, session grants that `token issue` waits for, decisions shared
//! across replicas through a real Redis, the webhook, and every step in the audit chain.
//! The agent is curl through a real proxy; decisions are made with the real binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;
use crate::redis::{clone_state, RedisServer};

/// A route whose every request must be approved, with a small body limit.
fn pay_route(port: u16) -> String {
    format!(
        r#"
[[routes]]
id = "payments"
host = "{API_HOST}:{port}"
methods = ["POST", "GET"]
paths = ["/pay/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
approval = "request"
max_body = "64KiB"
"#
    )
}

/// A home with the standard policy plus the payments route, the secret, a token, a proxy.
fn ready(serve_flags: &[&str]) -> (Home, Proxy, String) {
    let home = Home::new();
    let port = home.https_port();
    home.standard_policy_with(&pay_route(port));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &["--on-behalf-of", "alice", "--task", "pay invoice"]);
    let proxy = home.serve(serve_flags);
    (home, proxy, token)
}

/// `approvals list --json` in `state` (with extra global flags).
fn list_in(home: &Home, state: &std::path::Path, extra: &[&str]) -> Vec<Value> {
    let out = home
        .cmd_in(state)
        .args(extra)
        .args(["approvals", "list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "approvals list: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The approvals still waiting for a decision.
fn waiting(home: &Home) -> Vec<Value> {
    list_in(home, &home.state(), &[])
        .into_iter()
        .filter(|e| e["decision"].is_null())
        .map(|e| e["pending"].clone())
        .collect()
}

/// Wait until exactly `n` approvals wait, and return them.
fn wait_for_waiting(home: &Home, n: usize) -> Vec<Value> {
    eventually(Duration::from_secs(10), "held requests listed", || {
        let w = waiting(home);
        (w.len() == n).then_some(w)
    })
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn approval_lines(home: &Home) -> Vec<Value> {
    home.audit()
        .into_iter()
        .filter(|l| l["kind"] == "approval")
        .collect()
}

fn verify(home: &Home) {
    let out = home.run(&["audit", "verify"]);
    assert!(out.status.success(), "audit verify: {}", stderr(&out));
}

fn post(home: &Home, proxy: &Proxy, token: &str, path: &str, body: &str) -> Curl {
    home.curl(
        proxy,
        token,
        &[
            "-X",
            "POST",
            "-H",
            "authorization: Bearer agent-sent-credential",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ],
        &home.api_url(path),
    )
}

#[test]
fn a_held_request_goes_out_once_when_approved_with_exactly_the_approved_body() {
    let (home, proxy, token) = ready(&[]);
    let body = r#"{"amount":42,"to":"acme"}"#;
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/invoices?id=7", body));
        let held = wait_for_waiting(&home, 1);
        let p = &held[0];
        assert_eq!(p["kind"], "request");
        assert_eq!(p["agent"], "bot");
        assert_eq!(p["on_behalf_of"], "alice");
        assert_eq!(p["task"], "pay invoice");
        let r = &p["request"];
        assert_eq!(r["method"], "POST");
        assert_eq!(r["path"], "/pay/invoices");
        assert_eq!(r["query"], "id=7");
        assert_eq!(r["route"], "payments");
        assert_eq!(r["body_sha256"], sha256_hex(body.as_bytes()));
        assert_eq!(r["body_preview"], body);
        // SECURITY: approvers never see the agent's credential header or its token.
        let shown = p.to_string();
        assert!(!shown.contains("agent-sent-credential"), "{shown}");
        assert!(
            !shown.contains(&token) && !shown.contains(SECRET),
            "{shown}"
        );
        assert!(shown.contains("[redacted]"));
        // Nothing went upstream while it is held.
        assert!(home.upstream.seen().is_empty());
        let id = p["id"].as_str().unwrap();
        let out = home.run(&["approvals", "approve", id, "--as", "carol"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let r = agent.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        // A second decision on the same id is refused: it was decided once.
        let again = home.run(&["approvals", "deny", id, "--as", "dave"]);
        assert!(!again.status.success());
    });
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1, "the approved request went out exactly once");
    assert_eq!(seen[0].body, body.as_bytes());
    assert_eq!(seen[0].query.as_deref(), Some("id=7"));
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    let lines = home.wait_audit(3);
    let steps: Vec<String> = approval_lines(&home)
        .iter()
        .map(|l| l["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(steps, ["approval_requested", "approved"]);
    let approved = approval_lines(&home)[1].clone();
    assert_eq!(approved["approver"], "carol");
    assert_eq!(approved["approved"], "this request");
    assert_eq!(approved["body_sha256"], sha256_hex(body.as_bytes()));
    assert_eq!(approved["decision"], "allow");
    let request = lines
        .iter()
        .find(|l| l["kind"].is_null() && l["route"] == "payments")
        .expect("the request's own line");
    assert_eq!(request["decision"], "allow");
    assert_eq!(request["status"], 200);
    assert_eq!(request["approval_id"], approved["approval_id"]);
    assert_eq!(request["approver"], "carol");
    assert_eq!(request["body_sha256"], sha256_hex(body.as_bytes()));
    verify(&home);
    // `logs tail` shows the decision readably.
    let tail = home.run_ok(&["logs", "tail"]);
    assert!(
        tail.contains("APPROVAL approved bot (obo alice) POST"),
        "{tail}"
    );
    assert!(tail.contains("by=carol"), "{tail}");
    assert!(waiting(&home).is_empty());
}

#[test]
fn a_denied_request_gets_403_approval_denied_and_never_reaches_the_upstream() {
    let (home, proxy, token) = ready(&[]);
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/x", "{}"));
        let held = wait_for_waiting(&home, 1);
        let id = held[0]["id"].as_str().unwrap();
        let out = home.run(&[
            "approvals",
            "deny",
            id,
            "--as",
            "carol",
            "--reason",
            "not this month",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let r = agent.join().unwrap();
        assert_eq!(r.status, 403);
        let v = r.json();
        assert_eq!(v["reason"], "approval_denied");
        assert_eq!(v["detail"], "carol denied this request: not this month");
    });
    assert!(home.upstream.seen().is_empty());
    home.wait_audit(3);
    let lines = approval_lines(&home);
    assert_eq!(lines[1]["reason"], "approval_denied");
    assert_eq!(lines[1]["approver"], "carol");
    assert_eq!(lines[1]["decision"], "deny");
    let request = home
        .audit()
        .into_iter()
        .find(|l| l["kind"].is_null() && l["route"] == "payments")
        .unwrap();
    assert_eq!(request["reason"], "approval_denied");
    assert_eq!(request["decision"], "deny");
    assert_eq!(request["credential"], "github");
    verify(&home);
}

#[test]
fn nobody_deciding_means_403_approval_timeout_after_the_timeout() {
    let (home, proxy, token) = ready(&["--approval-timeout", "1s"]);
    let start = Instant::now();
    let r = post(&home, &proxy, &token, "/pay/x", "{}");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "approval_timeout");
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(home.upstream.seen().is_empty());
    home.wait_audit(3);
    let lines = approval_lines(&home);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["reason"], "approval_timeout");
    assert_eq!(lines[1]["approver"], "timeout");
    // A late decision is refused: nothing is waiting any more.
    let id = lines[1]["approval_id"].as_str().unwrap();
    let late = home.run(&["approvals", "approve", id]);
    assert!(!late.status.success());
    verify(&home);
}

#[test]
fn every_resend_needs_a_new_approval_unless_the_route_was_let_through_for_the_session() {
    let (home, proxy, token) = ready(&[]);
    let approve_next = |extra: &[&str]| -> Value {
        let held = wait_for_waiting(&home, 1);
        let id = held[0]["id"].as_str().unwrap().to_owned();
        let mut args = vec!["approvals", "approve", id.as_str(), "--as", "carol"];
        args.extend_from_slice(extra);
        let out = home.run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        held[0].clone()
    };
    let mut ids = Vec::new();
    std::thread::scope(|s| {
        // The same body twice, then a changed one: three approvals, three digests checked.
        for body in ["{\"a\":1}", "{\"a\":1}", "{\"a\":2}"] {
            let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/x", body));
            let p = approve_next(&[]);
            assert_eq!(p["request"]["body_sha256"], sha256_hex(body.as_bytes()));
            ids.push(p["id"].as_str().unwrap().to_owned());
            assert_eq!(agent.join().unwrap().status, 200);
        }
    });
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each request had its own approval");
    // "This route for this session for 10 minutes".
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/y", "{\"b\":1}"));
        approve_next(&["--for", "10m"]);
        assert_eq!(agent.join().unwrap().status, 200);
    });
    let start = Instant::now();
    let r = post(&home, &proxy, &token, "/pay/z", "{\"b\":2}");
    assert_eq!(r.status, 200, "let through without a hold");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Another session of the same agent is still held.
    let other = home.issue("bot", &[]);
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &other, "/pay/z", "{}"));
        let held = wait_for_waiting(&home, 1);
        let id = held[0]["id"].as_str().unwrap();
        home.run_ok(&["approvals", "deny", id]);
        assert_eq!(agent.join().unwrap().status, 403);
    });
    assert_eq!(home.upstream.seen().len(), 5);
    let lines = home.wait_audit(15);
    let through = lines
        .iter()
        .find(|l| l["path"] == "/pay/z" && l["kind"].is_null() && l["status"] == 200)
        .unwrap();
    assert_eq!(through["approver"], "carol");
    assert_eq!(through["approved"], "route payments for this session");
    verify(&home);
}

#[test]
fn the_approval_queue_per_agent_is_bounded_and_the_excess_refused_at_once() {
    let (home, proxy, token) = ready(&["--approval-queue", "1"]);
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/1", "{}"));
        let held = wait_for_waiting(&home, 1);
        let start = Instant::now();
        let r = post(&home, &proxy, &token, "/pay/2", "{}");
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["reason"], "approval_queue_full");
        assert!(r.headers.to_lowercase().contains("retry-after: 1"));
        assert!(start.elapsed() < Duration::from_secs(5));
        home.run_ok(&["approvals", "deny", held[0]["id"].as_str().unwrap()]);
        assert_eq!(agent.join().unwrap().status, 403);
    });
    // The place is free again.
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/3", "{}"));
        let held = wait_for_waiting(&home, 1);
        home.run_ok(&["approvals", "approve", held[0]["id"].as_str().unwrap()]);
        assert_eq!(agent.join().unwrap().status, 200);
    });
}

#[test]
fn a_body_over_the_routes_limit_is_refused_before_anyone_is_asked() {
    let (home, proxy, token) = ready(&[]);
    let big = "x".repeat(70 * 1024);
    let r = post(&home, &proxy, &token, "/pay/x", &big);
    assert_eq!(r.status, 413);
    assert!(waiting(&home).is_empty());
    assert!(approval_lines(&home).is_empty());
}

#[test]
fn a_request_carrying_a_stored_credential_is_refused_before_anyone_is_asked() {
    // The exfiltration tripwire runs on the head before the request is held: an approver is
    // never shown, and can never release, a request that carries a stolen credential.
    let (home, proxy, token) = ready(&[]);
    let r = home.curl(
        &proxy,
        &token,
        &[
            "-X",
            "POST",
            "-H",
            &format!("x-note: {SECRET}"),
            "--data-binary",
            "{}",
        ],
        &home.api_url("/pay/x"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["reason"], "secret_in_request");
    assert!(waiting(&home).is_empty());
    assert!(approval_lines(&home).is_empty());
    assert!(home.upstream.seen().is_empty());
    let line = eventually(Duration::from_secs(10), "the refusal's line", || {
        home.audit().into_iter().find(|l| l["path"] == "/pay/x")
    });
    assert_eq!(line["reason"], "secret_in_request");
    assert!(!line.to_string().contains(SECRET));
}

#[test]
fn an_agent_that_goes_away_while_held_leaves_no_entry_and_a_cancelled_line() {
    let (home, proxy, token) = ready(&[]);
    let mut child = std::process::Command::new("curl")
        .args(["-sS", "--noproxy", "", "-o", "/dev/null", "--proxy"])
        .arg(proxy.url_with(&token))
        .arg("--cacert")
        .arg(home.latchkey_ca())
        .args(["-X", "POST", "--data-binary", "{}"])
        .arg(home.api_url("/pay/x"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let held = wait_for_waiting(&home, 1);
    let id = held[0]["id"].as_str().unwrap().to_owned();
    child.kill().unwrap();
    child.wait().unwrap();
    eventually(Duration::from_secs(10), "the held entry disappears", || {
        waiting(&home).is_empty().then_some(())
    });
    let lines = eventually(Duration::from_secs(10), "cancelled lines", || {
        let l = home.audit();
        (l.len() >= 3).then_some(l)
    });
    let cancelled = lines
        .iter()
        .find(|l| l["reason"] == "approval_cancelled")
        .expect("an approval_cancelled line");
    assert_eq!(cancelled["approval_id"], id);
    let request = lines
        .iter()
        .find(|l| l["kind"].is_null() && l["route"] == "payments")
        .unwrap();
    assert_eq!(request["outcome"], "cancelled");
    assert_eq!(request["decision"], "deny");
    // Approving what no longer exists does nothing and says so.
    let late = home.run(&["approvals", "approve", &id]);
    assert!(!late.status.success());
    assert!(home.upstream.seen().is_empty());
    verify(&home);
}

#[test]
fn ids_that_are_not_approval_ids_are_refused() {
    let home = Home::new();
    home.standard_policy();
    for id in ["../signing", "a/b", "", "x y"] {
        let out = home.run(&["approvals", "approve", id]);
        assert!(!out.status.success(), "{id}");
        assert!(
            stderr(&out).contains("no pending approval"),
            "{}",
            stderr(&out)
        );
    }
}

/// A session grant policy: `bot` needs an approved session for every route.
fn session_home() -> Home {
    let home = Home::new();
    let port = home.https_port();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"
max_ttl = "1h"
approval = "session"

[[routes]]
id = "issues-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "issues-write"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/repos/acme/backend/issues"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    );
    home.set_secret("github", SECRET);
    home
}

/// `token issue` in the background; the grant id from its first stderr line.
fn issue_waiting(
    home: &Home,
    extra: &[&str],
) -> (
    std::process::Child,
    String,
    BufReader<std::process::ChildStderr>,
) {
    let mut child = home
        .cmd()
        .args([
            "token",
            "issue",
            "--agent",
            "bot",
            "--on-behalf-of",
            "alice",
            "--ttl",
            "30m",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (line, id) = grant_line(&mut err);
    assert!(line.contains("waiting for approval"), "{line}");
    (child, id, err)
}

/// The first line a command waiting for a grant prints (`approval ID: ...`), and the id.
fn grant_line(err: &mut impl BufRead) -> (String, String) {
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let id = line
        .strip_prefix("approval ")
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no grant id in {line:?}"))
        .to_owned();
    (line, id)
}

/// Wait for `child` to exit: its status and everything it wrote to stdout.
fn finish(child: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status, out)
}

/// What is left to read of a child's stderr.
fn rest_of(err: &mut impl Read) -> String {
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    rest
}

#[test]
fn a_session_token_exists_only_after_a_person_approves_the_grant_narrowed() {
    let home = session_home();
    let proxy = home.serve(&[]);
    let (mut child, id, mut err) = issue_waiting(&home, &[]);
    let held = wait_for_waiting(&home, 1);
    assert_eq!(held[0]["id"], id);
    assert_eq!(held[0]["kind"], "session");
    assert_eq!(held[0]["grant"]["ttl_secs"], 1800);
    // No token yet: the issuer is still waiting.
    assert!(child.try_wait().unwrap().is_none());
    // A narrowing that widens is refused.
    let wide = home.run(&["approvals", "approve", &id, "--ttl", "2h"]);
    assert!(!wide.status.success());
    let out = home.run(&[
        "approvals",
        "approve",
        &id,
        "--routes",
        "issues-read",
        "--ttl",
        "10m",
        "--as",
        "carol",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, token) = finish(&mut child);
    let rest = rest_of(&mut err);
    assert!(status.success(), "{rest}");
    let token = token.trim().to_owned();
    // The token carries only the approved route, for the approved time.
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["routes"], serde_json::json!(["issues-read"]));
    let life = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(life <= 600, "{life}");
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200);
    let w = home.curl(
        &proxy,
        &token,
        &["-X", "POST", "--data-binary", "{}"],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(w.status, 403);
    assert_eq!(w.json()["reason"], "route_not_granted");
    // The proxy wrote the grant's lines: asked, approved by carol with what.
    let lines = eventually(Duration::from_secs(10), "grant lines", || {
        let l = approval_lines(&home);
        (l.len() >= 2).then_some(l)
    });
    assert_eq!(lines[0]["reason"], "approval_requested");
    assert_eq!(lines[0]["method"], "GRANT");
    assert_eq!(lines[1]["reason"], "approved");
    assert_eq!(lines[1]["approver"], "carol");
    assert_eq!(
        lines[1]["approved"],
        "session for routes issues-read for 10m"
    );
    drop(proxy);
    assert_eq!(approval_lines(&home).len(), 2, "each grant line once");
    verify(&home);
}

#[test]
fn a_denied_or_unanswered_grant_issues_no_token() {
    let home = session_home();
    let (mut child, id, mut err) = issue_waiting(&home, &[]);
    home.run_ok(&[
        "approvals",
        "deny",
        &id,
        "--reason",
        "no prod today",
        "--as",
        "carol",
    ]);
    let (status, out) = finish(&mut child);
    let rest = rest_of(&mut err);
    assert!(!status.success());
    assert!(out.trim().is_empty(), "no token on stdout: {out}");
    assert!(rest.contains("denied by carol: no prod today"), "{rest}");
    // Unanswered: gives up after --wait, and says so.
    let start = Instant::now();
    let (mut child, _id, mut err) = issue_waiting(&home, &["--wait", "1s"]);
    let status = child.wait().unwrap();
    let rest = rest_of(&mut err);
    assert!(!status.success());
    assert!(rest.contains("nobody approved"), "{rest}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // A proxy started later still writes the lines of what was decided before it ran.
    let proxy = home.serve(&[]);
    let lines = eventually(Duration::from_secs(10), "grant lines", || {
        let l = approval_lines(&home);
        (l.len() >= 4).then_some(l)
    });
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"approval_denied"), "{reasons:?}");
    assert!(reasons.contains(&"approval_timeout"), "{reasons:?}");
    drop(proxy);
    verify(&home);
}

#[test]
fn a_request_held_by_one_replica_is_released_by_a_decision_taken_on_another_through_redis() {
    let redis = RedisServer::start();
    let home = Home::new();
    let port = home.https_port();
    home.standard_policy_with(&pay_route(port));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let state_b = clone_state(&home, "state-b");
    let url = redis.url();
    let a = home.serve(&["--redis", &url, "--replica-id", "a"]);
    let _b = home.serve_in(&state_b, &["--redis", &url, "--replica-id", "b"]);
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &a, &token, "/pay/x", "{\"v\":1}"));
        // Seen from replica B's side: its state dir holds nothing of it, Redis does.
        let held = eventually(
            Duration::from_secs(10),
            "held on A, listed via Redis",
            || {
                let l: Vec<Value> = list_in(&home, &state_b, &["--redis", &url])
                    .into_iter()
                    .filter(|e| e["decision"].is_null())
                    .collect();
                (l.len() == 1).then_some(l)
            },
        );
        assert_eq!(held[0]["pending"]["replica"], "a");
        let id = held[0]["pending"]["id"].as_str().unwrap();
        let decided = Instant::now();
        let out = home
            .cmd_in(&state_b)
            .args(["--redis", &url, "approvals", "approve", id, "--as", "bob"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let r = agent.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            decided.elapsed() < Duration::from_secs(1),
            "released within a second: {:?}",
            decided.elapsed()
        );
    });
    assert_eq!(home.upstream.seen().len(), 1);
    home.wait_audit(3);
    let lines = approval_lines(&home);
    assert_eq!(lines[1]["approver"], "bob");
    assert_eq!(lines[1]["replica"], "a");
    verify(&home);
}

#[test]
fn grants_decided_anywhere_reach_the_asker_through_redis() {
    let redis = RedisServer::start();
    let home = session_home();
    let url = redis.url();
    let other = clone_state(&home, "state-other");
    let (mut child, id, _err) = issue_waiting(&home, &["--redis", &url]);
    let out = home
        .cmd_in(&other)
        .args(["--redis", &url, "approvals", "approve", &id, "--as", "erin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(child.wait().unwrap().success());
}

/// A one-shot HTTP receiver: the first request's body, and how long it waited.
fn receiver() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<Value>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                line.clear();
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
            if tx.send(serde_json::from_slice(&body).unwrap()).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[test]
fn the_webhook_hears_of_each_pending_approval_without_any_secret() {
    let (addr, rx) = receiver();
    let hook = format!("http://{addr}/hook");
    let (home, proxy, token) = ready(&["--approval-webhook", &hook]);
    std::thread::scope(|s| {
        let agent = s.spawn(|| {
            post(
                &home,
                &proxy,
                &token,
                "/pay/x?card=4111",
                "{\"secret-ish\":1}",
            )
        });
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a webhook POST");
        assert_eq!(v["type"], "approval_pending");
        assert_eq!(v["kind"], "request");
        assert_eq!(v["agent"], "bot");
        assert_eq!(v["route"], "payments");
        assert_eq!(v["path"], "/pay/x");
        assert_eq!(v["body_sha256"], sha256_hex(b"{\"secret-ish\":1}"));
        let id = v["id"].as_str().unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains(&format!("latchkey approvals approve {id}")),
            "{text}"
        );
        let all = v.to_string();
        for never in [
            SECRET,
            token.as_str(),
            "agent-sent-credential",
            "secret-ish",
            "card=4111",
        ] {
            assert!(!all.contains(never), "{never} in {all}");
        }
        home.run_ok(&["approvals", "approve", id]);
        assert_eq!(agent.join().unwrap().status, 200);
    });
}

#[test]
fn a_dead_webhook_never_delays_the_held_requests_own_timeout() {
    // A receiver that accepts and never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/hook", l.local_addr().unwrap());
    let (home, proxy, token) = ready(&["--approval-webhook", &hook, "--approval-timeout", "1s"]);
    let start = Instant::now();
    let r = post(&home, &proxy, &token, "/pay/x", "{}");
    assert_eq!(r.json()["reason"], "approval_timeout");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    drop(l);
}

#[test]
fn editing_who_approved_breaks_the_audit_chain() {
    let (home, proxy, token) = ready(&[]);
    std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/x", "{}"));
        let held = wait_for_waiting(&home, 1);
        home.run_ok(&[
            "approvals",
            "approve",
            held[0]["id"].as_str().unwrap(),
            "--as",
            "carol",
        ]);
        assert_eq!(agent.join().unwrap().status, 200);
    });
    drop(proxy);
    verify(&home);
    let path = home.state().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"approver\":\"carol\"", "\"approver\":\"mallory\""),
    )
    .unwrap();
    let out = home.run(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("was edited"), "{}", stderr(&out));
}

#[test]
fn run_waits_for_the_grant_and_starts_the_command_only_once_approved() {
    let home = session_home();
    let proxy = home.serve(&[]);
    let mut child = home
        .cmd()
        .args([
            "run",
            "--agent",
            "bot",
            "--proxy",
            &proxy.addr.to_string(),
            "--",
        ])
        .args(["sh", "-c", "echo started; test -n \"$HTTPS_PROXY\""])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (_, id) = grant_line(&mut err);
    assert!(child.try_wait().unwrap().is_none(), "the command waits");
    home.run_ok(&["approvals", "approve", &id, "--as", "carol"]);
    let (status, out) = finish(&mut child);
    assert!(status.success(), "{out}");
    assert_eq!(out.trim(), "started");
}

#[test]
fn held_requests_a_crashed_run_left_behind_are_forgotten_at_start() {
    let (home, proxy, token) = ready(&["--replica-id", "r1"]);
    // Simulate a crash: the held entry's file stays while the proxy is gone.
    let held_file = std::thread::scope(|s| {
        let agent = s.spawn(|| post(&home, &proxy, &token, "/pay/x", "{}"));
        let held = wait_for_waiting(&home, 1);
        let id = held[0]["id"].as_str().unwrap().to_owned();
        let file = home.state().join("approvals").join(format!("{id}.json"));
        let saved = std::fs::read(&file).unwrap();
        home.run_ok(&["approvals", "deny", &id]);
        assert_eq!(agent.join().unwrap().status, 403);
        std::fs::write(&file, saved).unwrap();
        file
    });
    drop(proxy);
    assert_eq!(waiting(&home).len(), 1, "the leftover looks pending");
    let _proxy = home.serve(&["--replica-id", "r1"]);
    assert!(!held_file.exists());
    assert!(waiting(&home).is_empty());
}

/// `serve --worker-threads 1` runs one event loop (the set-up for a proxy given one core): a
/// request held for approval and one waiting on a slow upstream must still block nobody, and
/// every request keeps its credential, its answer and its audit line.
#[test]
fn one_worker_thread_serves_everyone_while_one_request_is_held_and_another_is_slow() {
    let (home, proxy, token) = ready(&["--worker-threads", "1"]);
    std::thread::scope(|s| {
        let held = s.spawn(|| post(&home, &proxy, &token, "/pay/x", r#"{"amount":1}"#));
        let waiting_now = wait_for_waiting(&home, 1);
        let slow = s.spawn(|| {
            home.curl(
                &proxy,
                &token,
                &[],
                &home.api_url("/delay/3000/repos/acme/backend/issues"),
            )
        });
        let started = Instant::now();
        let quick: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    home.curl(
                        &proxy,
                        &token,
                        &[],
                        &home.api_url("/repos/acme/backend/issues"),
                    )
                })
            })
            .collect();
        for q in quick {
            let r = q.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "16 quick requests waited on the held or the slow one: {:?}",
            started.elapsed()
        );
        let id = waiting_now[0]["id"].as_str().unwrap();
        let out = home.run(&["approvals", "approve", id, "--as", "carol"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(held.join().unwrap().status, 200);
        assert_eq!(slow.join().unwrap().status, 200);
    });
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 18, "16 quick, the slow one, the approved one");
    assert!(seen
        .iter()
        .all(|r| r.header("authorization") == Some(format!("Bearer {SECRET}").as_str())));
    // 18 tunnels, 18 requests in them, the two approval steps.
    let requests: Vec<Value> = home
        .wait_audit(38)
        .into_iter()
        .filter(|l| l["kind"].is_null() && l["method"] != "CONNECT")
        .collect();
    assert_eq!(requests.len(), 18, "{requests:?}");
    assert!(requests.iter().all(|l| l["status"] == 200), "{requests:?}");
    verify(&home);
}
