//! The dashboard: in a real browser (headless Chromium driven by Playwright, see
//! `ui_browser.py`), and its security edges over raw HTTP.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// A home with the standard policy plus a route whose requests must be approved.
fn ready() -> (Home, Proxy) {
    let home = Home::new();
    let port = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "payments"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/pay/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
approval = "request"
max_body = "64KiB"
"#
    ));
    home.set_secret("github", SECRET);
    let proxy = home.serve(&[]);
    (home, proxy)
}

/// A token and its session id.
fn issue(home: &Home, extra: &[&str]) -> (String, String) {
    let out = home
        .cmd()
        .args(["token", "issue", "--agent", "bot"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let jti = err
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    (stdout(&out).trim().to_owned(), jti)
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let (home, proxy) = ready();
    let (token, jti) = issue(&home, &["--on-behalf-of", "alice", "--task", "pay invoice"]);
    let (token2, jti2) = issue(&home, &[]);
    let admin = home.run_ok(&["admin", "token"]).trim().to_owned();
    let mode = std::fs::metadata(home.state().join("admin.token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    let out = Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/ui_browser.py"))
        .env("UI", format!("http://{}", proxy.admin_addr.unwrap()))
        .env("ADMIN_TOKEN", &admin)
        .env("PROXY", proxy.addr.to_string())
        .env("CA", home.latchkey_ca())
        .env("API", home.api_url(""))
        .env("TOKEN", &token)
        .env("JTI", &jti)
        .env("TOKEN2", &token2)
        .env("JTI2", &jti2)
        .env("SECRET", SECRET)
        .env("SHOTS", &shots)
        .output()
        .expect("python3 with playwright is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "browser tests failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    for page in [
        "login",
        "tail",
        "approvals",
        "approvals-history",
        "agents",
        "sessions",
    ] {
        assert!(shots.join(format!("{page}.png")).exists(), "{page}.png");
    }
    drop(proxy);
    // The decisions taken in the browser are in the chain, by the name given at sign-in.
    let lines = home.audit();
    let approvals: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["kind"] == "approval").collect();
    let steps: Vec<(&str, &str)> = approvals
        .iter()
        .map(|l| {
            (
                l["reason"].as_str().unwrap(),
                l["approver"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("approval_requested", "-"),
            ("approved", "carol"),
            ("approval_requested", "-"),
            ("approval_denied", "carol"),
        ]
    );
    let log = std::fs::read_to_string(home.state().join("audit.jsonl")).unwrap();
    assert!(!log.contains(&admin) && !log.contains(SECRET) && !log.contains(&token));
    let v = home.run(&["audit", "verify"]);
    assert!(v.status.success(), "{}", stderr(&v));
}

/// One raw HTTP/1.1 exchange with the admin listener.
fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn nothing_under_ui_opens_without_signing_in_and_every_answer_is_locked_down() {
    let (home, proxy) = ready();
    let admin = proxy.admin_addr.unwrap();
    for path in [
        "/ui/approvals",
        "/ui/sessions",
        "/ui/tail",
        "/ui/events",
        "/ui/agents",
    ] {
        let r = raw(
            admin,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        );
        assert!(r.starts_with("HTTP/1.1 303"), "{path}: {r}");
        assert!(r.to_lowercase().contains("location: /ui/login"), "{r}");
    }
    let r = raw(
        admin,
        "POST /ui/sessions/revoke HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\nconnection: close\r\n\r\njti=abc",
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // A forged cookie is no session.
    let r = raw(
        admin,
        "GET /ui/sessions HTTP/1.1\r\nhost: x\r\ncookie: lk_ui=0000\r\nconnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    // Sign-in without the login form's own token (a cross-site sign-in) is refused, even
    // with the right admin token.
    let token = home.run_ok(&["admin", "token"]).trim().to_owned();
    let body = format!("token={token}&name=x");
    let r = raw(
        admin,
        &format!(
            "POST /ui/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(!r.contains("lk_ui="), "{r}");
    let page = raw(
        admin,
        "GET /ui/login HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    let lower = page.to_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'none'"),
        "{page}"
    );
    assert!(lower.contains("x-frame-options: deny"));
    assert!(lower.contains("httponly; samesite=strict"));
    assert!(!page.contains(&token));
    // The static script is served by latchkey itself; the pages load nothing from elsewhere.
    let js = raw(
        admin,
        "GET /ui/static/app.js HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(js.starts_with("HTTP/1.1 200"), "{js}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    assert!(!js.contains("innerHTML"));
}

#[test]
fn the_dashboard_can_have_a_listener_of_its_own_that_serves_nothing_else() {
    let home = Home::new();
    home.standard_policy();
    let port = dead_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let mut cfg = home.config();
    cfg.admin_listen = None;
    cfg.ui_listen = Some(addr);
    let _proxy = Proxy::in_process(cfg);
    let login = eventually(
        Duration::from_secs(10),
        "the dashboard listener answers",
        || {
            std::net::TcpStream::connect(addr).ok().map(|_| {
                raw(
                    addr,
                    "GET /ui/login HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                )
            })
        },
    );
    assert!(login.starts_with("HTTP/1.1 200"), "{login}");
    let metrics = raw(
        addr,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(metrics.starts_with("HTTP/1.1 404"), "{metrics}");
}

/// A signed-in dashboard client over curl (cookie jar in `home`): sign in as `name`.
struct UiClient {
    base: String,
    jar: std::path::PathBuf,
}

impl UiClient {
    fn sign_in(
        home: &Home,
        admin_addr: std::net::SocketAddr,
        state: &std::path::Path,
        name: &str,
    ) -> UiClient {
        let base = format!("http://{admin_addr}");
        let jar = home.path().join(format!("jar-{}", admin_addr.port()));
        let token = home
            .cmd_in(state)
            .args(["admin", "token"])
            .output()
            .unwrap();
        let token = stdout(&token).trim().to_owned();
        let c = UiClient { base, jar };
        let page = c.get("/ui/login");
        let csrf = between(&page, "name=\"login_csrf\" value=\"", "\"");
        let r = c.post(
            "/ui/login",
            &[("login_csrf", &csrf), ("token", &token), ("name", name)],
        );
        assert!(r.contains("303"), "{r}");
        c
    }

    fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--noproxy", "*", "--max-time", "10", "-b"])
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar);
        c
    }

    fn get(&self, path: &str) -> String {
        let out = self
            .curl()
            .arg(format!("{}{path}", self.base))
            .output()
            .unwrap();
        stdout(&out)
    }

    /// POST a form; the status code and the Location.
    fn post(&self, path: &str, form: &[(&str, &str)]) -> String {
        let mut c = self.curl();
        c.args(["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"]);
        c.args(["-H", &format!("origin: {}", self.base)]);
        for (k, v) in form {
            c.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        stdout(&c.arg(format!("{}{path}", self.base)).output().unwrap())
    }
}

fn between(text: &str, start: &str, end: &str) -> String {
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("{start:?} not in {text}"))
        + start.len();
    let len = text[from..].find(end).unwrap();
    text[from..from + len].to_owned()
}

#[test]
fn a_request_held_by_one_replica_is_approved_on_another_replicas_dashboard() {
    let redis = crate::redis::RedisServer::start();
    let (home, _unused) = ready();
    drop(_unused);
    let (token, _) = issue(&home, &[]);
    let state_b = crate::redis::clone_state(&home, "state-b");
    let url = redis.url();
    let a = home.serve(&["--redis", &url, "--replica-id", "a"]);
    let b = home.serve_in(&state_b, &["--redis", &url, "--replica-id", "b"]);
    let ui_b = UiClient::sign_in(&home, b.admin_addr.unwrap(), &state_b, "dana");
    std::thread::scope(|s| {
        let agent = s.spawn(|| {
            home.curl(
                &a,
                &token,
                &["-X", "POST", "--data-binary", "{\"n\":1}"],
                &home.api_url("/pay/x"),
            )
        });
        // B's approvals page lists what A holds (through Redis), with its digest.
        let page = eventually(Duration::from_secs(10), "B's dashboard lists it", || {
            let p = ui_b.get("/ui/approvals");
            p.contains("data-approval=\"r").then_some(p)
        });
        let id = between(&page, "data-approval=\"", "\"");
        let csrf = between(&page, "name=\"csrf\" value=\"", "\"");
        assert!(
            page.contains(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                b"{\"n\":1}"
            )))
        );
        let r = ui_b.post(
            "/ui/approvals/decide",
            &[("csrf", &csrf), ("id", &id), ("action", "approve")],
        );
        assert!(r.starts_with("303") && r.contains("notice="), "{r}");
        let got = agent.join().unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
    });
    assert_eq!(home.upstream.seen().len(), 1);
    drop(a);
    let approved = home
        .audit()
        .into_iter()
        .find(|l| l["reason"] == "approved")
        .expect("A's log has the approval");
    assert_eq!(approved["approver"], "dana");
    assert_eq!(approved["replica"], "a");
}

#[test]
fn a_session_grant_is_approved_narrowed_on_the_dashboard() {
    let home = Home::new();
    let port = home.https_port();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"
max_ttl = "1h"
approval = "session"

[[routes]]
id = "read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues"]

[[routes]]
id = "write"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/repos/acme/backend/issues"]
"#
        ),
    );
    let proxy = home.serve(&[]);
    let ui = UiClient::sign_in(&home, proxy.admin_addr.unwrap(), &home.state(), "erin");
    let child = home
        .cmd()
        .args([
            "token",
            "issue",
            "--agent",
            "bot",
            "--ttl",
            "30m",
            "--task",
            "triage <b>now</b>",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let page = eventually(Duration::from_secs(10), "the grant is listed", || {
        let p = ui.get("/ui/approvals");
        p.contains("data-approval=\"g").then_some(p)
    });
    assert!(page.contains("Session grant"));
    assert!(page.contains("session for every route for 30m"), "{page}");
    // Agent-chosen text is escaped, never markup.
    assert!(page.contains("triage &lt;b&gt;now&lt;"), "{page}");
    assert!(!page.contains("<b>now</b>"));
    let id = between(&page, "data-approval=\"", "\"");
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"");
    // Widening is refused with a message, and nothing is decided.
    let r = ui.post(
        "/ui/approvals/decide",
        &[
            ("csrf", &csrf),
            ("id", &id),
            ("action", "approve"),
            ("routes", "read,admin"),
        ],
    );
    assert!(r.contains("error="), "{r}");
    let r = ui.post(
        "/ui/approvals/decide",
        &[
            ("csrf", &csrf),
            ("id", &id),
            ("action", "approve"),
            ("routes", "read"),
            ("ttl", "5m"),
        ],
    );
    assert!(r.contains("notice="), "{r}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["routes"], serde_json::json!(["read"]));
    assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 300);
    let line = eventually(Duration::from_secs(10), "the grant's approval line", || {
        home.audit().into_iter().find(|l| l["reason"] == "approved")
    });
    assert_eq!(line["approver"], "erin");
    assert_eq!(line["approved"], "session for routes read for 5m");
}
