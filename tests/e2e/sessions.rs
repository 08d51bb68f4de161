//! Sessions end to end: `latchkey run` wrapping real clients (curl, Python requests, git),
//! revocation and expiry biting inside a live tunnel, per-task route narrowing, and the
//! operator's view of it all (`logs tail`, `audit verify`). Real processes, real sockets,
//! loopback only; every wait is a bounded poll.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn ready() -> (Home, Proxy) {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let proxy = home.serve(&[]);
    (home, proxy)
}

/// `latchkey run --agent bot [run_args] -- cmd...`, output captured.
fn run_as_bot(home: &Home, run_args: &[&str], cmd: &[&str]) -> Output {
    home.cmd()
        .args(["run", "--agent", "bot"])
        .args(run_args)
        .arg("--")
        .args(cmd)
        // `run` merges an inherited NO_PROXY; these tests expect latchkey's entries alone.
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap()
}

/// `token issue`, returning the JWT (stdout) and the session id (jti, from stderr).
fn issue_with_jti(home: &Home, extra: &[&str]) -> (String, String) {
    let out = home
        .cmd()
        .args(["token", "issue", "--agent", "bot"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "token issue: {}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    let err = stderr(&out);
    let jti = err
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("token issue names no session: {err}"))
        .to_owned();
    (token, jti)
}

/// The JWT inside a proxy URL `http://agent:<JWT>@host:port`.
fn token_in_proxy_url(url: &str) -> String {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{url:?}"));
    let (userinfo, _) = rest.rsplit_once('@').unwrap_or_else(|| panic!("{url:?}"));
    let (_, token) = userinfo
        .split_once(':')
        .unwrap_or_else(|| panic!("{url:?}"));
    token.to_owned()
}

/// The program and arguments of a `Command`, as a JSON array a Python script can run.
fn argv_json(cmd: &Command) -> String {
    let mut argv = vec![cmd.get_program().to_string_lossy().into_owned()];
    argv.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    serde_json::to_string(&argv).unwrap()
}

fn wait_for_audit(home: &Home, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(5), what, || {
        home.audit().into_iter().find(|l| pred(l))
    })
}

// ---------------------------------------------------------------------------------------------
// latchkey run
// ---------------------------------------------------------------------------------------------

#[test]
fn run_gives_plain_curl_the_proxy_and_ca_so_the_secret_is_injected() {
    let (home, proxy) = ready();
    // curl with no proxy or CA flags of its own; the address comes from <state>/proxy.addr.
    let out = run_as_bot(
        &home,
        &[],
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            &home.api_url("/repos/acme/backend/issues"),
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let echo: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert!(home
        .upstream
        .seen()
        .iter()
        .any(|s| s.header("authorization") == Some(format!("Bearer {SECRET}").as_str())));
    assert_eq!(
        std::fs::read_to_string(home.state().join("proxy.addr"))
            .unwrap()
            .trim(),
        proxy.addr.to_string()
    );
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/repos/acme/backend/issues");
    assert!(seen[0].header("proxy-authorization").is_none());
    let audit = home.wait_audit(2);
    assert_eq!(audit[1]["agent"], "bot");
    assert_eq!(audit[1]["decision"], "allow");
    assert_eq!(audit[1]["route"], "issues-read");
    assert_eq!(audit[1]["status"], 200);
}

#[test]
fn run_with_an_explicit_proxy_address_ignores_the_recorded_one() {
    let (home, proxy) = ready();
    // The recorded address now points at nothing: only --proxy can make this work.
    std::fs::write(
        home.state().join("proxy.addr"),
        format!("127.0.0.1:{}\n", dead_port()),
    )
    .unwrap();
    for given in [proxy.addr.to_string(), format!("http://{}/", proxy.addr)] {
        let out = run_as_bot(
            &home,
            &["--proxy", &given],
            &[
                "curl",
                "-sS",
                "--max-time",
                "30",
                &home.api_url("/repos/acme/backend/issues/3"),
            ],
        );
        assert!(
            out.status.success(),
            "--proxy {given}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let echo: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
        assert!(home
            .upstream
            .seen()
            .iter()
            .any(|s| s.header("authorization") == Some(format!("Bearer {SECRET}").as_str())));
        assert_eq!(echo["path"], "/repos/acme/backend/issues/3");
    }
    assert_eq!(home.upstream.seen().len(), 2);
}

#[test]
fn run_passes_the_childs_exit_code_through() {
    let (home, _proxy) = ready();
    let out = run_as_bot(&home, &[], &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = run_as_bot(&home, &[], &["sh", "-c", "exit 0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn run_without_a_running_proxy_fails_with_a_clear_message() {
    let home = Home::new();
    home.standard_policy();
    let out = run_as_bot(&home, &[], &["sh", "-c", "echo child ran"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no running latchkey found"), "{err}");
    assert!(err.contains("--proxy"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(&out).is_empty(), "the child ran: {}", stdout(&out));
}

#[test]
fn run_with_a_missing_command_fails_clearly_and_still_revokes_the_token() {
    let (home, _proxy) = ready();
    let out = run_as_bot(&home, &[], &["no-such-command-latchkey-test"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot start no-such-command-latchkey-test"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let sessions = std::fs::read_to_string(home.state().join("sessions.jsonl")).unwrap();
    let jti = serde_json::from_str::<Value>(sessions.lines().last().unwrap()).unwrap()["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    let revocations: Value = serde_json::from_str(
        &std::fs::read_to_string(home.state().join("revocations.json")).unwrap(),
    )
    .unwrap();
    assert!(
        revocations["sessions"].get(&jti).is_some(),
        "session {jti} not revoked: {revocations}"
    );
    // The per-session CA bundle is cleaned up.
    let leftovers: Vec<_> = std::fs::read_dir(home.state())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ca-bundle-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn run_revokes_the_childs_token_when_the_child_exits() {
    let (home, proxy) = ready();
    let saved = home.path().join("proxy-url.txt");
    let script = format!(
        "printf %s \"$HTTPS_PROXY\" > '{}' && curl -sS -o /dev/null -w '%{{http_code}}' --max-time 30 '{}'",
        saved.display(),
        home.api_url("/repos/acme/backend/issues")
    );
    let out = run_as_bot(&home, &[], &["sh", "-c", &script]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "200", "the token worked while the child ran");
    let token = token_in_proxy_url(&std::fs::read_to_string(&saved).unwrap());
    // The proxy re-reads revocations every 250 ms: within one second the token is dead.
    let url = home.api_url("/repos/acme/backend/issues");
    let r = eventually(Duration::from_secs(1), "CONNECT refused after exit", || {
        let r = home.curl(&proxy, &token, &[], &url);
        (r.connect_status != 200).then_some(r)
    });
    assert_eq!(r.connect_status, 407, "{r:?}");
    assert_ne!(r.exit, 0);
    let line = wait_for_audit(&home, "a CONNECT deny", |l| {
        l["method"] == "CONNECT" && l["decision"] == "deny"
    });
    assert_eq!(line["reason"], "token_revoked");
    assert_eq!(line["status"], 407);
    // Requests that slipped in before the proxy's next revocation reload (at most 250 ms)
    // were still allowed; nothing was allowed once the refusal began.
    let audit = home.audit();
    let first_refusal = audit
        .iter()
        .position(|l| l["reason"] == "token_revoked")
        .unwrap();
    assert!(audit[first_refusal..]
        .iter()
        .all(|l| l["decision"] == "deny"));
}

#[test]
fn run_sets_proxy_and_ca_variables_and_the_bundle_holds_latchkeys_ca() {
    let (home, proxy) = ready();
    let bundle_copy = home.path().join("bundle-copy.pem");
    let out = run_as_bot(
        &home,
        &[],
        &[
            "sh",
            "-c",
            &format!(
                "env && cat \"$SSL_CERT_FILE\" > '{}'",
                bundle_copy.display()
            ),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let env: std::collections::HashMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).collect();
    let proxy_url = env["HTTPS_PROXY"];
    assert!(
        proxy_url.starts_with("http://bot:") && proxy_url.ends_with(&format!("@{}", proxy.addr)),
        "HTTPS_PROXY = {proxy_url}"
    );
    for var in ["HTTP_PROXY", "https_proxy", "http_proxy"] {
        assert_eq!(env.get(var), Some(&proxy_url), "{var}");
    }
    for var in ["NO_PROXY", "no_proxy"] {
        assert_eq!(env.get(var), Some(&"localhost,127.0.0.1,::1"), "{var}");
    }
    let bundle = env["SSL_CERT_FILE"];
    assert!(!bundle.is_empty());
    for var in [
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ] {
        assert_eq!(env.get(var), Some(&bundle), "{var}");
    }
    let ca = std::fs::read_to_string(home.latchkey_ca()).unwrap();
    let copy = std::fs::read_to_string(&bundle_copy).unwrap();
    assert!(
        copy.contains(ca.trim()),
        "the CA bundle lacks latchkey's CA"
    );
    assert!(
        !copy.contains("PRIVATE KEY"),
        "the CA bundle holds a private key"
    );
    // The token is JWT-shaped and the env names the same session the audit log will.
    let token = token_in_proxy_url(proxy_url);
    assert_eq!(token.split('.').count(), 3, "{token}");
    assert!(
        !text.contains(SECRET),
        "the child's environment holds the secret"
    );
}

#[test]
fn run_lets_python_requests_work_with_no_other_setup() {
    let (home, _proxy) = ready();
    let script = r#"
import sys, requests
r = requests.get(sys.argv[1], timeout=30)
print(r.status_code)
print(r.json()["headers"]["authorization"][0])
"#;
    let url = home.api_url("/repos/acme/backend/issues/42");
    let out = run_as_bot(&home, &[], &["python3", "-c", script, &url]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        ["200", "Bearer [REDACTED]"]
    );
    assert!(home
        .upstream
        .seen()
        .iter()
        .any(|s| s.header("authorization") == Some(format!("Bearer {SECRET}").as_str())));
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/repos/acme/backend/issues/42");
}

#[test]
fn run_lets_git_ls_remote_list_refs_over_https_with_the_secret_injected() {
    let git = Command::new("git").arg("--version").output();
    assert!(
        git.as_ref().is_ok_and(|o| o.status.success()),
        "git is not installed: this test drives the real git client (install the `git` package; scripts/test should install it)"
    );
    let home = Home::new();
    let port = home.https_port();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"

[[routes]]
id = "git-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/acme/repo.git/info/refs"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    );
    home.set_secret("github", SECRET);
    let _proxy = home.serve(&[]);
    let git_home = home.path().join("git-home");
    std::fs::create_dir_all(&git_home).unwrap();
    let repo = format!("https://{API_HOST}:{port}/acme/repo.git");
    let out = home
        .cmd()
        .args(["run", "--agent", "bot", "--", "git", "ls-remote", &repo])
        .env("HOME", &git_home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{GIT_HEAD}\tHEAD\n{GIT_HEAD}\trefs/heads/main\n")
    );
    let seen = home.upstream.seen();
    let refs: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == "/acme/repo.git/info/refs")
        .collect();
    assert!(!refs.is_empty(), "{seen:?}");
    for s in &refs {
        assert_eq!(s.query.as_deref(), Some("service=git-upload-pack"));
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert!(s.header("proxy-authorization").is_none());
    }
    let audit = home.wait_audit(2);
    assert!(
        audit
            .iter()
            .any(|l| l["route"] == "git-read" && l["decision"] == "allow" && l["status"] == 200),
        "{audit:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Revocation and expiry inside a live tunnel
// ---------------------------------------------------------------------------------------------

/// One `requests.Session` (one keep-alive tunnel): a first request, then `action` (an argv,
/// may be empty), then the same request repeated until it is not 200 or `limit_s` passes.
/// Prints the first status, the last status and the last JSON `reason`.
const SESSION_SCRIPT: &str = r#"
import json, subprocess, sys, time, requests
url, action, limit = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
s = requests.Session()
r = s.get(url, timeout=30)
print(r.status_code, flush=True)
if action:
    done = subprocess.run(action, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
deadline = time.monotonic() + limit
while True:
    r = s.get(url, timeout=30)
    if r.status_code != 200 or time.monotonic() > deadline:
        break
    time.sleep(0.025)
print(r.status_code)
print(r.json().get("reason"))
print(r.json().get("detail"))
"#;

fn python_session(
    home: &Home,
    proxy: &Proxy,
    token: &str,
    action: &str,
    limit_s: f64,
) -> Vec<String> {
    let out = Command::new("python3")
        .args(["-c", SESSION_SCRIPT])
        .arg(home.api_url("/repos/acme/backend/issues"))
        .arg(action)
        .arg(limit_s.to_string())
        .env("HTTPS_PROXY", proxy.url_with(token))
        .env("NO_PROXY", "")
        .env("REQUESTS_CA_BUNDLE", home.latchkey_ca())
        .output()
        .expect("python3 with requests is installed (scripts/test installs it)");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    stdout(&out).lines().map(str::to_owned).collect()
}

fn revoke_cmd(home: &Home, args: &[&str]) -> String {
    let mut cmd = home.cmd();
    cmd.args(["token", "revoke"]).args(args);
    argv_json(&cmd)
}

/// The audit lines of one session, once the last one (a deny with `reason`) is written.
fn session_lines(home: &Home, jti: &str, reason: &str) -> Vec<Value> {
    eventually(
        Duration::from_secs(5),
        "the deny reaches the audit log",
        || {
            let lines: Vec<Value> = home
                .audit()
                .into_iter()
                .filter(|l| l["session"] == jti)
                .collect();
            lines.iter().any(|l| l["reason"] == reason).then_some(lines)
        },
    )
}

fn assert_one_tunnel_then_denied(lines: &[Value], reason: &str) {
    let connects = lines.iter().filter(|l| l["method"] == "CONNECT").count();
    assert_eq!(
        connects, 1,
        "the session used more than one tunnel: {lines:?}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["method"], "GET");
    assert_eq!(last["decision"], "deny");
    assert_eq!(last["reason"], reason);
    assert_eq!(last["status"], 403);
    assert!(lines
        .iter()
        .any(|l| l["method"] == "GET" && l["decision"] == "allow" && l["status"] == 200));
}

#[test]
fn revoking_a_session_bites_inside_an_open_tunnel() {
    let (home, proxy) = ready();
    let (token, jti) = issue_with_jti(&home, &[]);
    let out = python_session(&home, &proxy, &token, &revoke_cmd(&home, &[&jti]), 1.5);
    assert_eq!(out[0], "200");
    assert_eq!(out[1], "403", "{out:?}");
    assert_eq!(out[2], "token_revoked");
    assert!(out[3].contains("revoked"), "{out:?}");
    assert_one_tunnel_then_denied(
        &session_lines(&home, &jti, "token_revoked"),
        "token_revoked",
    );
}

#[test]
fn revoking_an_agent_bites_inside_an_open_tunnel() {
    let (home, proxy) = ready();
    let (token, jti) = issue_with_jti(&home, &[]);
    let out = python_session(
        &home,
        &proxy,
        &token,
        &revoke_cmd(&home, &["--agent", "bot"]),
        1.5,
    );
    assert_eq!(out[0], "200");
    assert_eq!(out[1], "403", "{out:?}");
    assert_eq!(out[2], "token_revoked");
    assert_one_tunnel_then_denied(
        &session_lines(&home, &jti, "token_revoked"),
        "token_revoked",
    );
    // A token issued after the agent-wide revocation works. Its iat must be later than the
    // cutoff second, so wait (bounded) for the clock to move past it.
    let cutoff = latchkey::auth::unix_now();
    eventually(Duration::from_secs(2), "the clock moves on", || {
        (latchkey::auth::unix_now() > cutoff).then_some(())
    });
    let fresh = home.issue("bot", &[]);
    let r = home.curl(
        &proxy,
        &fresh,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn revocations_survive_a_proxy_restart() {
    let (home, proxy) = ready();
    let (token, jti) = issue_with_jti(&home, &[]);
    let url = home.api_url("/repos/acme/backend/issues");
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.status, 200, "{r:?}");
    home.run_ok(&["token", "revoke", &jti]);
    let status = proxy.terminate();
    assert!(status.success(), "serve exited with {status:?}");
    let proxy = home.serve(&[]);
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.connect_status, 407, "{r:?}");
    assert_ne!(r.exit, 0);
    let line = wait_for_audit(&home, "the CONNECT deny after restart", |l| {
        l["method"] == "CONNECT" && l["decision"] == "deny"
    });
    assert_eq!(line["reason"], "token_revoked");
    assert_eq!(line["status"], 407);
    assert_eq!(home.upstream.seen().len(), 1);
}

#[test]
fn a_connect_refused_for_a_revoked_token_names_its_agent_and_session_in_the_audit_log() {
    let (home, proxy) = ready();
    let (token, jti) = issue_with_jti(&home, &["--on-behalf-of", "alice", "--task", "triage"]);
    home.run_ok(&["token", "revoke", &jti]);
    // The revocation was written before this proxy started: no reload to wait for.
    let proxy = {
        drop(proxy);
        home.serve(&[])
    };
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.connect_status, 407, "{r:?}");
    let line = wait_for_audit(&home, "the CONNECT deny", |l| {
        l["method"] == "CONNECT" && l["decision"] == "deny"
    });
    assert_eq!(line["reason"], "token_revoked");
    // The signature checked out, so the proxy knows whose session this is: the operator
    // needs exactly this line to see who keeps using a revoked session.
    assert_eq!(line["agent"], "bot", "{line}");
    assert_eq!(line["session"], jti.as_str(), "{line}");
    assert_eq!(line["on_behalf_of"], "alice", "{line}");
    assert_eq!(line["task"], "triage", "{line}");
}

#[test]
fn an_expiring_token_is_refused_inside_the_tunnel_and_then_at_connect() {
    let (home, proxy) = ready();
    let (token, jti) = issue_with_jti(&home, &["--ttl", "2s"]);
    // exp = iat + 2 s, enforced with at most one second of leeway: dead within ~4 s.
    let out = python_session(&home, &proxy, &token, "[]", 6.0);
    assert_eq!(out[0], "200");
    assert_eq!(out[1], "403", "{out:?}");
    assert_eq!(out[2], "token_expired");
    assert!(out[3].contains("expired"), "{out:?}");
    assert_one_tunnel_then_denied(
        &session_lines(&home, &jti, "token_expired"),
        "token_expired",
    );
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.connect_status, 407, "{r:?}");
    let line = wait_for_audit(&home, "the CONNECT deny", |l| {
        l["method"] == "CONNECT" && l["decision"] == "deny"
    });
    assert_eq!(line["reason"], "token_expired");
    assert_eq!(line["status"], 407);
}

// ---------------------------------------------------------------------------------------------
// Per-task narrowing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_token_narrowed_to_one_route_cannot_use_the_agents_other_routes() {
    let (home, proxy) = ready();
    let (token, jti) = issue_with_jti(&home, &["--route", "issues-read"]);
    let url = home.api_url("/repos/acme/backend/issues");
    let r = home.curl(&proxy, &token, &[], &url);
    assert_eq!(r.status, 200, "{r:?}");
    // HTTP/1.1 for the denied POST: over h2, curl sometimes loses an early denial of a
    // request with a body (see denied_posts_over_http2_always_reach_curl_as_a_json_403).
    let r = home.curl(
        &proxy,
        &token,
        &["--http1.1", "-X", "POST", "-d", "title=x"],
        &url,
    );
    assert_eq!(r.status, 403, "{r:?}");
    let body = r.json();
    assert_eq!(body["error"], "denied");
    assert_eq!(body["reason"], "route_not_granted");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("issues-write") && detail.contains("not granted"),
        "{detail}"
    );
    assert_eq!(
        home.upstream.seen().len(),
        1,
        "the POST reached the upstream"
    );
    let line = wait_for_audit(&home, "the POST deny", |l| {
        l["method"] == "POST" && l["decision"] == "deny"
    });
    assert_eq!(line["reason"], "route_not_granted");
    assert_eq!(line["status"], 403);
    assert_eq!(line["session"], jti.as_str());
    assert_eq!(line["path"], "/repos/acme/backend/issues");
    // The same agent with an unnarrowed token may POST.
    let full = home.issue("bot", &[]);
    let r = home.curl(&proxy, &full, &["-X", "POST", "-d", "title=x"], &url);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn denied_posts_over_http2_always_reach_curl_as_a_json_403() {
    let (home, proxy) = ready();
    let token = home.issue("bot", &[]);
    let url = home.api_url("/repos/acme/secrets");
    // Fails in roughly one try in six to ten, so twenty tries almost always show it.
    for i in 0..20 {
        let r = home.curl(
            &proxy,
            &token,
            &["--http2", "-X", "POST", "-d", "title=x"],
            &url,
        );
        assert_eq!(r.status, 403, "try {i}: {r:?}");
        assert_eq!(r.json()["reason"], "no_route", "try {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's view
// ---------------------------------------------------------------------------------------------

/// Two agents, bot (standard policy) and other, and the proxy serving both.
fn ready_with_two_agents() -> (Home, Proxy) {
    let home = Home::new();
    home.standard_policy();
    let port = home.https_port();
    home.write_policy(
        "other.toml",
        &format!(
            r#"agent = "other"

[[routes]]
id = "other-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/frontend/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    );
    home.set_secret("github", SECRET);
    let proxy = home.serve(&[]);
    (home, proxy)
}

#[test]
fn logs_tail_prints_one_readable_line_per_request_and_filters() {
    let (home, proxy) = ready_with_two_agents();
    let bot = home.issue("bot", &["--on-behalf-of", "alice"]);
    let other = home.issue("other", &[]);
    let tokens = [bot.clone(), other.clone()];
    // Each curl is one CONNECT line plus one request line.
    let r = home.curl(
        &proxy,
        &other,
        &[],
        &home.api_url("/repos/acme/frontend/pulls"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = home.curl(
        &proxy,
        &bot,
        &[],
        &home.api_url("/repos/acme/backend/issues?state=open"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = home.curl(&proxy, &bot, &[], &home.api_url("/repos/acme/secrets"));
    assert_eq!(r.status, 403, "{r:?}");
    let n = home.wait_audit(6).len();
    assert_eq!(n, 6);
    let port = home.https_port();
    let host = format!("{API_HOST}:{port}");

    let all = home.run_ok(&["logs", "tail"]);
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), n, "{all}");
    let allow_bot = lines
        .iter()
        .find(|l| l.contains("/repos/acme/backend/issues"))
        .unwrap_or_else(|| panic!("{all}"));
    for part in [
        "ALLOW",
        "bot",
        "(obo alice)",
        &format!("GET {host}/repos/acme/backend/issues 200"),
        "route=issues-read",
        "cred=github",
        "reason=-",
    ] {
        assert!(allow_bot.contains(part), "{part:?} not in {allow_bot}");
    }
    assert!(!allow_bot.contains("state=open"), "the query is logged");
    let deny_bot = lines
        .iter()
        .find(|l| l.contains("/repos/acme/secrets"))
        .unwrap_or_else(|| panic!("{all}"));
    for part in [
        "DENY",
        "bot",
        &format!("GET {host}/repos/acme/secrets 403"),
        "route=-",
        "reason=no_route",
    ] {
        assert!(deny_bot.contains(part), "{part:?} not in {deny_bot}");
    }
    assert!(
        !all.contains('\x1b'),
        "colour codes when stdout is not a terminal"
    );

    let other = home.run_ok(&["logs", "tail", "--agent", "other"]);
    let other_lines: Vec<&str> = other.lines().collect();
    assert_eq!(other_lines.len(), 2, "{other}");
    assert!(other_lines.iter().all(|l| l.contains(" other ")), "{other}");
    assert!(other_lines[1].contains("route=other-read"), "{other}");
    assert!(!other.contains(" bot "), "{other}");

    let denies = home.run_ok(&["logs", "tail", "--decision", "deny"]);
    let deny_lines: Vec<&str> = denies.lines().collect();
    assert_eq!(deny_lines.len(), 1, "{denies}");
    assert!(deny_lines[0].contains("reason=no_route"), "{denies}");

    let json = home.run_ok(&[
        "logs",
        "tail",
        "--agent",
        "bot",
        "--decision",
        "deny",
        "--json",
    ]);
    let parsed: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(parsed.len(), 1, "{json}");
    assert_eq!(parsed[0]["decision"], "deny");
    assert_eq!(parsed[0]["agent"], "bot");
    assert_eq!(parsed[0]["reason"], "no_route");
    assert_eq!(parsed[0]["path"], "/repos/acme/secrets");
    let allows = home.run_ok(&["logs", "tail", "--decision", "allow", "--json"]);
    let allows: Vec<Value> = allows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(allows.len(), n - 1);
    assert!(allows.iter().all(|l| l["decision"] == "allow"));

    for out in [&all, &other, &denies, &json] {
        assert!(!out.contains(SECRET), "a secret in logs tail output");
        for t in &tokens {
            assert!(!out.contains(t.as_str()), "a token in logs tail output");
        }
    }
}

/// `audit verify --audit-log FILE`.
fn verify(home: &Home, file: &Path) -> Output {
    home.cmd()
        .args(["audit", "verify", "--audit-log"])
        .arg(file)
        .output()
        .unwrap()
}

fn assert_verify_fails(home: &Home, file: &Path, what: &str, needle: &str) {
    let out = verify(home, file);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("failed verification"), "{what}: {err}");
    assert!(err.contains(needle), "{what}: {needle:?} not in {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(stdout(&out).is_empty(), "{what}: {}", stdout(&out));
}

/// The hash a line must carry: sha256(prev_hash + "\n" + the line without `hash`, compact,
/// keys sorted), as the contract describes.
fn chain_hash(line: &serde_json::Map<String, Value>) -> String {
    use sha2::{Digest, Sha256};
    let mut keys: Vec<&String> = line.keys().filter(|k| k.as_str() != "hash").collect();
    keys.sort();
    let fields: Vec<String> = keys
        .iter()
        .map(|k| format!("{}:{}", Value::String(k.to_string()), line[k.as_str()]))
        .collect();
    let canonical = format!("{{{}}}", fields.join(","));
    let mut h = Sha256::new();
    h.update(line["prev_hash"].as_str().unwrap().as_bytes());
    h.update(b"\n");
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

#[test]
fn audit_verify_accepts_the_real_log_and_names_the_line_of_each_tampering() {
    let (home, proxy) = ready();
    let token = home.issue("bot", &[]);
    for path in [
        "/repos/acme/backend/issues",
        "/repos/acme/secrets",
        "/repos/acme/backend/issues/1",
    ] {
        home.curl(&proxy, &token, &[], &home.api_url(path));
    }
    let audit = home.wait_audit(6);
    let n = audit.len();
    let log = home.state().join("audit.jsonl");
    let out = home.run(&["audit", "verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("OK: {n} lines, chain intact ({})\n", log.display())
    );

    let original = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = original.lines().take(n).collect();
    let write = |name: &str, ls: &[String]| {
        let p = home.path().join(name);
        std::fs::write(&p, ls.join("\n") + "\n").unwrap();
        p
    };
    let owned: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    // The untouched copy verifies.
    let copy = write("copy.jsonl", &owned);
    let out = verify(&home, &copy);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("OK: {n} lines")));

    // Edit one field of line 2.
    let mut edited = owned.clone();
    let mut v: Value = serde_json::from_str(&edited[1]).unwrap();
    v["status"] = Value::from(v["status"].as_u64().unwrap() + 1);
    edited[1] = v.to_string();
    let p = write("edited.jsonl", &edited);
    assert_verify_fails(&home, &p, "edited", "line 2 was edited");

    // Drop line 2.
    let mut dropped = owned.clone();
    dropped.remove(1);
    let p = write("dropped.jsonl", &dropped);
    assert_verify_fails(&home, &p, "dropped", "line 2 does not follow line 1");

    // Swap lines 2 and 3.
    let mut swapped = owned.clone();
    swapped.swap(1, 2);
    let p = write("swapped.jsonl", &swapped);
    assert_verify_fails(&home, &p, "swapped", "line 2 does not follow line 1");

    // Insert a forged line after line 1, correctly chained onto it and carrying a correct
    // hash of its own: the forgery itself verifies, the real line after it does not.
    let first: Value = serde_json::from_str(&owned[0]).unwrap();
    let mut forged = first.as_object().unwrap().clone();
    forged.insert("prev_hash".into(), first["hash"].clone());
    forged.insert("request_id".into(), Value::from("f".repeat(32)));
    forged.insert("agent".into(), Value::from("mallory"));
    let hash = chain_hash(&forged);
    forged.insert("hash".into(), Value::from(hash));
    let mut inserted = owned.clone();
    inserted.insert(1, Value::Object(forged).to_string());
    let p = write("inserted.jsonl", &inserted);
    assert_verify_fails(&home, &p, "inserted", "line 3 does not follow line 2");

    // Our own hash computation agrees with latchkey's: the real log's first line checks.
    let first = first.as_object().unwrap();
    assert_eq!(first["hash"].as_str().unwrap(), chain_hash(first));
    // The live log was not touched by any of this.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), original);
}

#[test]
fn token_revoke_with_neither_a_session_nor_an_agent_fails_clearly() {
    let home = Home::new();
    home.standard_policy();
    let out = home.run(&["token", "revoke"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("JTI") && err.contains("--agent NAME"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(&out).is_empty());
    assert!(
        !home.state().join("revocations.json").exists(),
        "a failed revoke wrote a revocation list"
    );
}

#[test]
fn token_revoke_with_no_arguments_names_both_ways_to_revoke() {
    let home = Home::new();
    let out = home.run(&["token", "revoke"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--agent"), "{err}");
}

#[test]
fn run_forwards_sigterm_to_the_child_and_passes_its_exit_code() {
    let home = Home::new();
    home.standard_policy();
    let proxy = home.serve(&[]);
    let ready = home.path().join("child-ready");
    let script = format!(
        "trap 'exit 42' TERM; touch '{}'; while true; do sleep 0.05; done",
        ready.display()
    );
    let mut child = home
        .cmd()
        .args(["run", "--agent", "bot", "--proxy"])
        .arg(proxy.addr.to_string())
        .args(["--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let mut started = false;
    for _ in 0..200 {
        if ready.exists() {
            started = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(started, "the child never started");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(42));
}
