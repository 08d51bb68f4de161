//! OAuth connections and GitHub App installation tokens, against real servers: an OAuth 2.1
//! authorization server built with Authlib (`tests/oauth_server.py`: PKCE S256 required,
//! refresh tokens rotated, lifetimes, stalls and failures on demand), a GitHub-App-like token
//! endpoint that verifies the app's RS256 JWT with PyJWT (`tests/github_app_server.py`), a real
//! `redis-server` for two replicas. `latchkey connect` is driven as the binary; the browser is
//! played by curl following the redirects to latchkey's loopback listener.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

const CLIENT_ID: &str = "latchkey-test";
const CLIENT_SECRET: &str = "cs-test-client-secret-0001";

/// A Python test server started on a loopback port 0, killed on drop.
struct PyServer {
    child: Child,
    port: u16,
}

impl PyServer {
    fn start(script: &str, args: &[&str]) -> PyServer {
        let mut child = Command::new("python3")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests")
                    .join(script),
            )
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .unwrap_or_else(|| {
                panic!(
                    "{script} did not start: {line:?} (pip install authlib flask 'pyjwt[crypto]')"
                )
            })
            .parse()
            .unwrap();
        PyServer { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn get(&self, path: &str) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "10"])
            .arg(self.url(path))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Authlib authorization server.
struct AuthServer(PyServer);

impl AuthServer {
    fn start(lifetime_secs: u64) -> AuthServer {
        AuthServer(PyServer::start(
            "oauth_server.py",
            &[
                "--client",
                &format!("{CLIENT_ID}:{CLIENT_SECRET}"),
                "--lifetime",
                &lifetime_secs.to_string(),
            ],
        ))
    }

    fn stats(&self) -> Value {
        self.0.get("/stats")
    }

    fn count(&self, grant: &str) -> u64 {
        self.stats()["counts"][grant].as_u64().unwrap_or(0)
    }

    fn control(&self, body: Value) {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "-X", "POST", "-H"])
            .arg("content-type: application/json")
            .arg("--data")
            .arg(body.to_string())
            .arg(self.0.url("/control"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
    }

    /// The user an access token was issued to.
    fn user_of(&self, access_token: &str) -> Option<String> {
        self.stats()["users"][access_token]
            .as_str()
            .map(str::to_owned)
    }
}

/// `latchkey connect NAME` with the authorization code flow against `server`, the browser
/// played by curl: read the printed URL, approve as `approve_as`, follow the redirect to
/// latchkey's loopback listener. Returns latchkey's stdout.
fn connect_code(
    home: &Home,
    server: &AuthServer,
    name: &str,
    user: Option<&str>,
    approve_as: &str,
) -> String {
    connect_with(home, server, name, user, approve_as, true)
}

/// [`connect_code`]; with `full` false, only the name (and user): the endpoints, client and
/// secret must come from the stored connection being remade.
fn connect_with(
    home: &Home,
    server: &AuthServer,
    name: &str,
    user: Option<&str>,
    approve_as: &str,
    full: bool,
) -> String {
    let mut cmd = home.cmd();
    cmd.args(["connect", name, "--no-browser", "--timeout", "30s"]);
    if full {
        cmd.args(["--provider", "generic"])
            .args(["--authorize-url", &server.0.url("/authorize")])
            .args(["--token-url", &server.0.url("/token")])
            .args(["--client-id", CLIENT_ID, "--client-secret-stdin"])
            .args(["--scopes", "repo read:org"]);
    }
    if let Some(u) = user {
        cmd.args(["--user", u]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if full {
        stdin
            .write_all(format!("{CLIENT_SECRET}\n").as_bytes())
            .unwrap();
    }
    drop(stdin);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let url = loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "connect printed no URL: {said}"
        );
        said.push_str(&line);
        if let Some(u) = line.trim().strip_prefix("http://") {
            break format!("http://{u}");
        }
    };
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(!url.contains(CLIENT_SECRET), "{url}");
    // A hostile page racing the real redirect with another state is refused and ignored.
    let listener = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .unwrap()
        .1
        .into_owned();
    let forged = Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("{listener}?code=forged&state=not-ours"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&forged.stdout), "400");
    // The browser: approve, follow the redirect to the loopback listener.
    let page = Command::new("curl")
        .args(["-sS", "-L", "--noproxy", "*", "--max-time", "20"])
        .arg(format!("{url}&approve_as={approve_as}"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&page.stdout).contains("Connected"),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert!(out.status.success(), "connect failed: {said}{rest}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for secret_like in ["at-", "rt-", CLIENT_SECRET] {
        assert!(
            !stdout.contains(secret_like) && !rest.contains(secret_like),
            "{stdout}{rest}"
        );
    }
    stdout
}

/// The standard policy plus `oauth-read` (GET /oauth/** with credential `acme`).
fn oauth_policy(home: &Home, extra: &str) {
    let port = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "oauth-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/oauth/**"]
credential = "acme"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
{extra}"#
    ));
}

/// The bearer tokens the upstream received on `/oauth/` paths, in order.
fn upstream_tokens(home: &Home, prefix: &str) -> Vec<String> {
    home.upstream
        .seen()
        .iter()
        .filter(|s| s.path.starts_with(prefix))
        .map(|s| {
            s.header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// `n` GETs of `path` at once through `proxy`: their statuses.
fn fire(home: &Home, proxy: &Proxy, token: &str, path: &str, n: usize) -> Vec<u16> {
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
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let url = home.api_url(path);
        let all = (0..n).map(|_| {
            let client = client.clone();
            let url = url.clone();
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        });
        futures_util::future::join_all(all).await
    })
}

/// An authorization server whose tokens live `lifetime`, and a home with the OAuth policy and
/// alice's `acme` connection (code flow). Also returns a moment after her token was minted: it
/// expires within `lifetime` from then.
fn connected_home(lifetime: Duration) -> (AuthServer, Home, Instant) {
    let server = AuthServer::start(lifetime.as_secs());
    let home = Home::new();
    oauth_policy(&home, "");
    connect_code(&home, &server, "acme", None, "alice");
    (server, home, Instant::now())
}

/// Wait until the access token minted `lifetime` ago can no longer be sent.
fn wait_until_expired(since: Instant, lifetime: Duration) {
    eventually(lifetime * 3, "the access token expires", || {
        (since.elapsed() > lifetime).then_some(())
    });
}

/// Audit lines of requests (not of the CONNECTs that carried them), once there are `n`.
fn wait_requests(home: &Home, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(10),
        "audit lines of the requests",
        || {
            let lines: Vec<Value> = home
                .audit()
                .into_iter()
                .filter(|l| l["method"] != "CONNECT")
                .collect();
            (lines.len() >= n).then_some(lines)
        },
    )
}

fn connections(home: &Home) -> Vec<Value> {
    home.run_ok(&["connections", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn code_flow_with_pkce_connects_and_requests_carry_the_access_token() {
    let server = AuthServer::start(3600);
    let home = Home::new();
    oauth_policy(&home, "");
    let out = connect_code(&home, &server, "acme", None, "alice");
    assert!(out.contains("connected acme"), "{out}");
    let stats = server.stats();
    assert_eq!(stats["pkce_checked"], 1, "{stats}");
    assert_eq!(stats["counts"]["authorization_code"], 1);
    let issued = stats["issued"][0].as_str().unwrap().to_owned();

    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    let r = home.curl(
        &proxy,
        &token,
        &["-H", "authorization: Bearer agent-own"],
        &home.api_url("/oauth/me"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // The upstream got the access token of the connection, not the agent's header; the agent
    // saw it redacted.
    assert_eq!(upstream_tokens(&home, "/oauth/"), [issued.as_str()]);
    assert!(!r.body.contains(&issued));
    // The cached token: no refresh for a token with an hour left.
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/again"));
    assert_eq!(r.status, 200);
    assert_eq!(server.count("refresh_token"), 0);
    let lines = wait_requests(&home, 2);
    assert_eq!(lines[0]["credential_kind"], "oauth2", "{:?}", lines[0]);
    assert_eq!(lines[0]["credential"], "acme");
    // An agent that somehow holds the connection's access token cannot send it anywhere:
    // the tripwire knows every secret value of the stored connection.
    let r = home.curl(
        &proxy,
        &token,
        &["-H", &format!("x-smuggle: {issued}")],
        &home.api_url("/oauth/smuggle"),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "secret_in_request");
    assert!(!r.body.contains(&issued));
    // connections list: name, provider, scopes, expiry, health, and no token anywhere.
    let listed = home.run_ok(&["connections", "list"]);
    assert!(
        listed.contains("acme") && listed.contains("generic") && listed.contains("repo read:org"),
        "{listed}"
    );
    assert!(!listed.contains("at-") && !listed.contains("rt-") && !listed.contains(CLIENT_SECRET));
    let rows = connections(&home);
    assert_eq!(rows[0]["health"], "ok");
    assert!(rows[0]["expires_at"].as_str().is_some());
    assert!(!proxy.log().contains(&issued));
}

#[test]
fn a_refused_authorisation_stores_nothing_and_says_why() {
    let server = AuthServer::start(3600);
    let home = Home::new();
    let mut child = home
        .cmd()
        .args(["connect", "acme", "--provider", "generic", "--no-browser"])
        .args(["--authorize-url", &server.0.url("/authorize")])
        .args(["--token-url", &server.0.url("/token")])
        .args(["--client-id", CLIENT_ID, "--timeout", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no URL printed");
        if let Some(u) = line.trim().strip_prefix("http://") {
            break format!("http://{u}");
        }
    };
    let page = Command::new("curl")
        .args(["-sS", "-L", "--noproxy", "*", "--max-time", "20"])
        .arg(format!("{url}&deny=1"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&page.stdout).contains("not made"));
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert!(!out.status.success());
    assert!(rest.contains("access_denied"), "{rest}");
    assert_eq!(server.count("authorization_code"), 0);
    assert!(connections(&home).is_empty());
}

#[test]
fn device_flow_connects_a_headless_host() {
    let server = AuthServer::start(3600);
    let home = Home::new();
    let mut child = home
        .cmd()
        .args(["connect", "acme", "--device", "--no-browser"])
        .args(["--token-url", &server.0.url("/token")])
        .args(["--device-url", &server.0.url("/device/code")])
        .args([
            "--client-id",
            CLIENT_ID,
            "--client-secret-stdin",
            "--timeout",
            "60s",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{CLIENT_SECRET}\n").as_bytes())
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let code = loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        if n == 0 {
            let _ = child.wait();
            panic!("no user code printed");
        }
        if let Some((_, c)) = line.trim().split_once("enter the code: ") {
            assert!(line.contains(&server.0.url("/device")), "{line}");
            break c.to_owned();
        }
    };
    // Polling goes on (authorization_pending) until the user approves on another device.
    eventually(
        Duration::from_secs(10),
        "latchkey polls the token endpoint",
        || (server.count("urn:ietf:params:oauth:grant-type:device_code") >= 1).then_some(()),
    );
    let ok = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-X", "POST"])
        .args(["-d", &format!("user_code={code}"), "-d", "user=bob"])
        .arg(server.0.url("/device/approve"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "approved");
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert!(out.status.success(), "{rest}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("connected acme"));
    let stats = server.stats();
    let issued = stats["issued"][0].as_str().unwrap();
    assert_eq!(server.user_of(issued).as_deref(), Some("bob"));
    oauth_policy(&home, "");
    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    assert_eq!(
        home.curl(&proxy, &token, &[], &home.api_url("/oauth/x"))
            .status,
        200
    );
    assert_eq!(upstream_tokens(&home, "/oauth/"), [issued.to_owned()]);
}

#[test]
fn two_hundred_requests_around_an_expiry_cause_exactly_one_refresh() {
    let lifetime = Duration::from_secs(3);
    let (server, home, connected) = connected_home(lifetime);
    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    // The refreshed token lives an hour, so however long the burst takes on a loaded machine
    // no second refresh falls due inside it.
    server.control(json!({"lifetime": 3600}));
    wait_until_expired(connected, lifetime);
    let statuses = fire(&home, &proxy, &token, "/oauth/burst", 200);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(server.count("refresh_token"), 1);
    let stats = server.stats();
    let fresh = stats["issued"][1].as_str().unwrap();
    let seen = upstream_tokens(&home, "/oauth/burst");
    assert_eq!(seen.len(), 200);
    assert!(
        seen.iter().all(|t| t == fresh),
        "every request carried the refreshed token"
    );
}

#[test]
fn a_rotated_refresh_token_survives_a_restart() {
    let lifetime = Duration::from_secs(2);
    let (server, home, connected) = connected_home(lifetime);
    let first_rt = server.stats()["live_refresh"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    wait_until_expired(connected, lifetime);
    let refreshed = Instant::now();
    assert_eq!(
        home.curl(&proxy, &token, &[], &home.api_url("/oauth/1"))
            .status,
        200
    );
    assert_eq!(server.count("refresh_token"), 1);
    // Rotation: the first refresh token is dead, a new one is live.
    let live = server.stats()["live_refresh"].clone();
    assert_eq!(live.as_array().unwrap().len(), 1);
    assert_ne!(live[0], first_rt.as_str());
    proxy.shutdown();
    // A new process reads the rotated refresh token from the store: its refresh succeeds
    // (the old token would get invalid_grant).
    let proxy = home.serve(&[]);
    wait_until_expired(refreshed, lifetime);
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/2"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(server.count("refresh_token"), 2);
    let tokens = upstream_tokens(&home, "/oauth/");
    let issued = server.stats()["issued"].clone();
    assert_eq!(
        tokens,
        [issued[1].as_str().unwrap(), issued[2].as_str().unwrap()]
    );
}

#[test]
fn invalid_grant_breaks_the_connection_until_it_is_made_again() {
    let lifetime = Duration::from_secs(2);
    let (server, home, connected) = connected_home(lifetime);
    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    server.control(json!({"revoke_refresh": true}));
    wait_until_expired(connected, lifetime);
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/x"));
    assert_eq!(r.status, 403, "{}", r.body);
    let body = r.json();
    assert_eq!(body["reason"], "connection_missing");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("latchkey connect acme"),
        "{body}"
    );
    assert!(body["detail"].as_str().unwrap().contains("invalid_grant"));
    // Broken stays broken without asking the provider again.
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/y"));
    assert_eq!(r.json()["reason"], "connection_missing");
    assert_eq!(server.count("refresh_token"), 1);
    assert!(upstream_tokens(&home, "/oauth/").is_empty());
    // One warn line, a metric, the health in the list.
    let log = proxy.log();
    assert_eq!(log.matches("invalid_grant").count(), 1, "{log}");
    assert!(log.contains("WARN"));
    let metrics = Command::new("curl")
        .args(["-sS", "--noproxy", "*"])
        .arg(format!("http://{}/metrics", proxy.admin_addr.unwrap()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&metrics.stdout)
        .contains("latchkey_credential_events_total{credential=\"acme\",event=\"broken\"} 1"));
    assert!(connections(&home)[0]["health"]
        .as_str()
        .unwrap()
        .starts_with("broken"));
    let lines = wait_requests(&home, 2);
    assert_eq!(lines[0]["reason"], "connection_missing");
    // Reconnecting with nothing but the name (endpoints, client id and client secret come
    // from the stored connection) makes it work again.
    connect_with(&home, &server, "acme", None, "alice", false);
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/z"));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_stalled_token_endpoint_is_answered_503_in_bounded_time() {
    let lifetime = Duration::from_secs(2);
    let (server, home, connected) = connected_home(lifetime);
    let proxy = home.serve(&["--credential-wait", "2s"]);
    let token = home.issue("bot", &[]);
    server.control(json!({"slow": 30}));
    wait_until_expired(connected, lifetime);
    let started = Instant::now();
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/x"));
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    let body = r.json();
    assert_eq!(body["reason"], "credential_unavailable");
    assert_eq!(body["error"], "unavailable");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("did not answer within 2s"),
        "{body}"
    );
    // A second request joins the same stalled refresh: still one call to the endpoint.
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/y"));
    assert_eq!(r.status, 503);
    assert_eq!(server.count("refresh_token"), 1);
    assert!(upstream_tokens(&home, "/oauth/").is_empty());
}

#[test]
fn a_broken_token_endpoint_is_503_naming_the_cause() {
    let lifetime = Duration::from_secs(2);
    let (server, home, connected) = connected_home(lifetime);
    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    server.control(json!({"broken": true}));
    wait_until_expired(connected, lifetime);
    let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/x"));
    assert_eq!(r.status, 503);
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("acme") && detail.contains("500"),
        "{detail}"
    );
    // The provider comes back: after the short back-off the next request refreshes.
    server.control(json!({"broken": false}));
    let ok = eventually(
        Duration::from_secs(10),
        "the refresh succeeds again",
        || {
            let r = home.curl(&proxy, &token, &[], &home.api_url("/oauth/y"));
            (r.status == 200).then_some(r)
        },
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn two_replicas_with_redis_refresh_once_between_them() {
    let redis = crate::redis::RedisServer::start();
    let lifetime = Duration::from_secs(3);
    let (server, home, connected) = connected_home(lifetime);
    let token = home.issue("bot", &[]);
    // Two replicas sharing one secret store (as they would share OpenBao), each with its own
    // audit log; the refresh lock is in Redis.
    let audit_b = home.path().join("audit-b.jsonl");
    let a = home.serve(&["--redis", &redis.url(), "--replica-id", "a"]);
    let b = home.serve(&[
        "--redis",
        &redis.url(),
        "--replica-id",
        "b",
        "--audit-log",
        audit_b.to_str().unwrap(),
    ]);
    server.control(json!({"lifetime": 3600}));
    wait_until_expired(connected, lifetime);
    let (sa, sb) = std::thread::scope(|s| {
        let ha = s.spawn(|| fire(&home, &a, &token, "/oauth/a", 100));
        let hb = s.spawn(|| fire(&home, &b, &token, "/oauth/b", 100));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert!(
        sa.iter().chain(&sb).all(|s| *s == 200),
        "{sa:?} {sb:?}\nA: {}\nB: {}",
        a.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n"),
        b.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        server.count("refresh_token"),
        1,
        "one refresh between the two replicas"
    );
    // One replica refreshed; the other waited on the Redis lock and took the new token from
    // the shared store (through its refresh job: `adopted`, or by rebuilding the credential
    // from the changed store when its requests came after the write).
    let events = |p: &Proxy, event: &str| {
        let m = Command::new("curl")
            .args(["-sS", "--noproxy", "*"])
            .arg(format!("http://{}/metrics", p.admin_addr.unwrap()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&m.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "latchkey_credential_events_total{{credential=\"acme\",event=\"{event}\"}} "
                ))
                .map(|v| v.parse::<u64>().unwrap())
            })
            .unwrap_or(0)
    };
    let mut refreshed = [events(&a, "refreshed"), events(&b, "refreshed")];
    let adopted = [events(&a, "adopted"), events(&b, "adopted")];
    refreshed.sort();
    assert_eq!(refreshed, [0, 1], "adopted: {adopted:?}");
    assert!(adopted.iter().all(|n| *n <= 1), "{adopted:?}");
    let fresh = server.stats()["issued"][1].as_str().unwrap().to_owned();
    assert!(upstream_tokens(&home, "/oauth/")
        .iter()
        .all(|t| *t == fresh));
}

#[test]
fn two_users_have_separate_connections_on_one_per_user_route() {
    let server = AuthServer::start(3600);
    let home = Home::new();
    let port = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "mine"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/mine/**"]
credential = "acme"
per_user = true
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
    ));
    connect_code(&home, &server, "acme", Some("alice"), "alice");
    // The operator's own connection of the name is the template a user's connection takes
    // its endpoints and client from: bob gives nothing but his name.
    connect_code(&home, &server, "acme", None, "operator");
    connect_with(&home, &server, "acme", Some("bob"), "bob", false);
    let check = home.run(&["policy", "check"]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        !stderr(&check).contains("\"acme\" is not in the secret store"),
        "{}",
        stderr(&check)
    );
    let proxy = home.serve(&[]);
    let alice = home.issue("bot", &["--on-behalf-of", "alice"]);
    let bob = home.issue("bot", &["--on-behalf-of", "bob"]);
    let carol = home.issue("bot", &["--on-behalf-of", "carol"]);
    let nobody = home.issue("bot", &[]);
    assert_eq!(
        home.curl(&proxy, &alice, &[], &home.api_url("/mine/a"))
            .status,
        200
    );
    assert_eq!(
        home.curl(&proxy, &bob, &[], &home.api_url("/mine/b"))
            .status,
        200
    );
    let seen = upstream_tokens(&home, "/mine/");
    assert_eq!(server.user_of(&seen[0]).as_deref(), Some("alice"));
    assert_eq!(server.user_of(&seen[1]).as_deref(), Some("bob"));
    let r = home.curl(&proxy, &carol, &[], &home.api_url("/mine/c"));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "connection_missing");
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("latchkey connect acme --user carol"));
    let r = home.curl(&proxy, &nobody, &[], &home.api_url("/mine/d"));
    assert_eq!(r.status, 403);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("acts for no user"));
    let lines = wait_requests(&home, 4);
    assert_eq!(
        lines[0]["credential_detail"], "user=alice",
        "{:?}",
        lines[0]
    );
    assert_eq!(lines[1]["credential_detail"], "user=bob");
    assert_eq!(lines[2]["reason"], "connection_missing");
    let rows = connections(&home);
    let users: Vec<&str> = rows.iter().filter_map(|r| r["user"].as_str()).collect();
    assert_eq!(users, ["alice", "bob"]);
}

#[test]
fn client_credentials_mints_and_caches_a_token() {
    let server = AuthServer::start(3600);
    let home = Home::new();
    oauth_policy(&home, "");
    let doc = format!(
        "kind = \"oauth2_client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nscopes = [\"read\"]\n[secret]\nclient_secret = \"{CLIENT_SECRET}\"\n",
        server.0.url("/token")
    );
    let mut child = home
        .cmd()
        .args([
            "secret",
            "set",
            "acme",
            "--kind",
            "oauth2_client_credentials",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(doc.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    for path in ["/oauth/1", "/oauth/2", "/oauth/3"] {
        assert_eq!(
            home.curl(&proxy, &token, &[], &home.api_url(path)).status,
            200
        );
    }
    assert_eq!(server.count("client_credentials"), 1);
    let issued = server.stats()["issued"][0].as_str().unwrap().to_owned();
    assert!(upstream_tokens(&home, "/oauth/")
        .iter()
        .all(|t| *t == issued));
    assert_eq!(
        wait_requests(&home, 3)[0]["credential_kind"],
        "oauth2_client_credentials"
    );
}

#[test]
fn github_app_tokens_are_scoped_to_each_routes_repositories_and_methods() {
    let home = Home::new();
    let key_file = home.path().join("app-key.pem");
    let app = PyServer::start(
        "github_app_server.py",
        &[
            "--app-id",
            "4242",
            "--private-key-out",
            key_file.to_str().unwrap(),
        ],
    );
    let key = std::fs::read_to_string(&key_file).unwrap();
    let doc = format!(
        "kind = \"github_app\"\napp_id = 4242\ninstallation_id = \"99\"\napi_url = \"{}\"\n[secret]\nprivate_key = '''\n{key}'''\n",
        app.url("")
    );
    home.set_typed("app", "github_app", &doc);
    let port = home.https_port();
    let routes = |extra: &str| {
        format!(
            r#"
[[routes]]
id = "app-issues"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues", "/repos/acme/backend/issues/**"]
credential = "app"
inject = {{ header = "authorization", value = "token {{secret}}" }}

[[routes]]
id = "app-pulls"
host = "{API_HOST}:{port}"
methods = ["GET", "POST"]
paths = ["/repos/acme/web/pulls", "/repos/acme/docs/pulls"]
credential = "app"
inject = {{ header = "authorization", value = "token {{secret}}" }}

[[routes]]
id = "app-explicit"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/repos/acme/backend/labels"]
credential = "app"
permissions = {{ issues = "read", metadata = "read" }}
inject = {{ header = "authorization", value = "token {{secret}}" }}
{extra}"#
        )
    };
    // The agent file holds only app routes (the standard one has routes the app cannot scope).
    home.write_policy(
        "bot.toml",
        &format!("agent = \"bot\"\nmax_ttl = \"1h\"\n{}", routes("")),
    );
    let check = home.run(&["policy", "check"]);
    assert!(check.status.success(), "{}", stderr(&check));
    let proxy = home.serve(&[]);
    let token = home.issue("bot", &[]);
    let get =
        |path: &str, extra: &[&str]| home.curl(&proxy, &token, extra, &home.api_url(path)).status;
    assert_eq!(get("/repos/acme/backend/issues", &[]), 200);
    assert_eq!(get("/repos/acme/backend/issues/7", &[]), 200);
    assert_eq!(
        get("/repos/acme/web/pulls", &["-X", "POST", "-d", "{}"]),
        200
    );
    assert_eq!(
        get("/repos/acme/backend/labels", &["-X", "POST", "-d", "{}"]),
        200
    );
    let asked = app.get("/requests");
    let asked = asked.as_array().unwrap();
    assert_eq!(
        asked.len(),
        3,
        "one mint per route, cached after: {asked:?}"
    );
    assert!(asked.iter().all(|a| a["installation"] == "99"));
    assert_eq!(asked[0]["repositories"], json!(["backend"]));
    assert_eq!(asked[0]["permissions"], json!({"issues": "read"}));
    assert_eq!(asked[1]["repositories"], json!(["docs", "web"]));
    assert_eq!(asked[1]["permissions"], json!({"pull_requests": "write"}));
    assert_eq!(asked[2]["repositories"], json!(["backend"]));
    assert_eq!(
        asked[2]["permissions"],
        json!({"issues": "read", "metadata": "read"})
    );
    // Each route's requests carried its own token.
    let seen: Vec<(String, String)> = home
        .upstream
        .seen()
        .iter()
        .map(|s| {
            (
                s.path.clone(),
                s.header("authorization").unwrap_or("").to_owned(),
            )
        })
        .collect();
    let token_of = |i: usize| format!("token {}", asked[i]["token"].as_str().unwrap());
    assert_eq!(seen[0].1, token_of(0));
    assert_eq!(seen[1].1, token_of(0));
    assert_eq!(seen[2].1, token_of(1));
    assert_eq!(seen[3].1, token_of(2));
    let lines = wait_requests(&home, 4);
    assert_eq!(lines[0]["credential_kind"], "github_app");
    assert_eq!(
        lines[2]["credential_detail"],
        "installation=99 repositories=docs,web permissions=pull_requests:write"
    );
    // A route whose paths do not pin repositories is refused by policy check.
    home.write_policy(
        "bot.toml",
        &format!(
            "agent = \"bot\"\nmax_ttl = \"1h\"\n{}",
            routes(&format!(
                r#"
[[routes]]
id = "app-everything"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/**"]
credential = "app"
inject = {{ header = "authorization", value = "token {{secret}}" }}
"#
            ))
        ),
    );
    let check = home.run(&["policy", "check"]);
    assert!(!check.status.success());
    let err = stderr(&check);
    assert!(
        err.contains("app-everything") && err.contains("does not pin"),
        "{err}"
    );
    assert!(!err.contains("BEGIN RSA"));
}
