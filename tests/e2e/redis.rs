//! Shared session state and rate limits across replicas: two `latchkey serve` processes and a
//! real `redis-server` on loopback ports, driven by curl and Python requests. Each replica has
//! its own state dir (a copy: same signing key and secrets), so what one learns from the
//! other can only have come through Redis. Every wait is a bounded poll.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A `redis-server` on a free loopback port, with no persistence, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(dead_port())
    }

    fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let server = RedisServer {
            child: Some(child),
            port,
        };
        eventually(Duration::from_secs(10), "redis-server answers PING", || {
            server.ping().then_some(())
        });
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One raw RESP command; the first reply line.
    fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn ping(&self) -> bool {
        self.command(&["PING"])
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A copy of `home`'s state dir (signing key, secrets) for a second replica.
pub(crate) fn clone_state(home: &Home, name: &str) -> PathBuf {
    let to = home.path().join(name);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(home.state())
        .arg(&to)
        .status()
        .unwrap();
    assert!(ok.success());
    // Only what both replicas may share: no audit log, no revocations.
    let _ = std::fs::remove_file(to.join("audit.jsonl"));
    let _ = std::fs::remove_file(to.join("revocations.json"));
    to
}

/// `token issue --agent bot`: the JWT and its session id.
fn issue(home: &Home, extra: &[&str]) -> (String, String) {
    let out = home
        .cmd()
        .args(["token", "issue", "--agent", "bot"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "token issue: {}", stderr(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = stderr(&out);
    let jti = err
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("token issue names no session: {err}"))
        .to_owned();
    (token, jti)
}

fn get(home: &Home, proxy: &Proxy, token: &str) -> Curl {
    home.curl(
        proxy,
        token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    )
}

/// Home with the standard policy, the secret, and a second state dir for replica B.
fn home_with_replica_state() -> (Home, PathBuf) {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    // Creates the signing key before the copy, so both replicas verify the same tokens.
    let _ = issue(&home, &[]);
    let b = clone_state(&home, "state-b");
    (home, b)
}

/// The two replicas, both on `redis`.
fn replicas(home: &Home, state_b: &Path, redis: &RedisServer, extra: &[&str]) -> (Proxy, Proxy) {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(extra);
    let a = home.serve(&args);
    let b = home.serve_in(state_b, &args);
    (a, b)
}

fn metrics(proxy: &Proxy) -> String {
    let addr = proxy.admin_addr.expect("the admin listener is on");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// Revocations
// ---------------------------------------------------------------------------------------------

/// One keep-alive tunnel (a `requests.Session`): a first request, then `action`, then the
/// same request until it is refused. Prints the first status, the final status and reason,
/// and the seconds from the action's end to the refusal.
const SESSION_SCRIPT: &str = r#"
import json, subprocess, sys, time, requests
url, action, limit = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
s = requests.Session()
r = s.get(url, timeout=30)
print(r.status_code, flush=True)
done = subprocess.run(action, capture_output=True, text=True)
assert done.returncode == 0, done.stderr
t0 = time.monotonic()
while True:
    r = s.get(url, timeout=30)
    if r.status_code != 200 or time.monotonic() - t0 > limit:
        break
    time.sleep(0.02)
print(r.status_code)
print(r.json().get("reason"))
print("%.3f" % (time.monotonic() - t0))
"#;

fn argv_json(cmd: &Command) -> String {
    let mut argv = vec![cmd.get_program().to_string_lossy().into_owned()];
    argv.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    serde_json::to_string(&argv).unwrap()
}

#[test]
fn a_revoke_is_enforced_on_the_other_replica_within_a_second_even_in_an_open_tunnel() {
    let redis = RedisServer::start();
    let (home, state_b) = home_with_replica_state();
    let (a, b) = replicas(&home, &state_b, &redis, &[]);
    let (token, jti) = issue(&home, &["--redis", &redis.url()]);
    assert_eq!(get(&home, &a, &token).status, 200);
    assert_eq!(get(&home, &b, &token).status, 200);

    // The tunnel is open on B; the revoke goes through the CLI (state dir A) and Redis.
    let mut revoke = home.cmd();
    revoke.args(["token", "revoke", &jti, "--redis", &redis.url()]);
    let out = Command::new("python3")
        .args(["-c", SESSION_SCRIPT])
        .arg(home.api_url("/repos/acme/backend/issues"))
        .arg(argv_json(&revoke))
        .arg("3")
        .env("HTTPS_PROXY", b.url_with(&token))
        .env("NO_PROXY", "")
        .env("REQUESTS_CA_BUNDLE", home.latchkey_ca())
        .output()
        .expect("python3 with requests is installed (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "200");
    assert_eq!(lines[1], "403", "{text} {}", b.log());
    assert_eq!(lines[2], "token_revoked");
    let secs: f64 = lines[3].parse().unwrap();
    assert!(secs < 1.0, "replica B took {secs} s to enforce the revoke");

    // New tunnels on both replicas are refused at CONNECT.
    for proxy in [&a, &b] {
        let r = get(&home, proxy, &token);
        assert_eq!(r.connect_status, 407, "{r:?}");
    }
    // B's refusal is attributed in its own audit log.
    let audit_b = std::fs::read_to_string(state_b.join("audit.jsonl")).unwrap_or_default();
    assert!(
        audit_b.contains("token_revoked") && audit_b.contains(&jti),
        "{audit_b}"
    );
}

#[test]
fn an_agent_wide_revoke_reaches_every_replica() {
    let redis = RedisServer::start();
    let (home, state_b) = home_with_replica_state();
    let (_a, b) = replicas(&home, &state_b, &redis, &[]);
    let (token, _) = issue(&home, &[]);
    assert_eq!(get(&home, &b, &token).status, 200);
    home.run_ok(&["token", "revoke", "--agent", "bot", "--redis", &redis.url()]);
    eventually(
        Duration::from_secs(1),
        "B refuses the agent's token",
        || (get(&home, &b, &token).connect_status == 407).then_some(()),
    );
    let listed = home.run_ok(&["token", "list", "--redis", &redis.url()]);
    assert!(!listed.contains("bot "), "{listed}");
}

#[test]
fn redis_stopped_and_restarted_is_survived() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let (home, state_b) = home_with_replica_state();
    let (a, b) = replicas(&home, &state_b, &redis, &[]);
    let (good, _) = issue(&home, &["--redis", &redis.url()]);
    let (revoked, revoked_jti) = issue(&home, &["--redis", &redis.url()]);
    home.run_ok(&["token", "revoke", &revoked_jti, "--redis", &redis.url()]);
    eventually(
        Duration::from_secs(1),
        "B refuses the revoked token",
        || (get(&home, &b, &revoked).connect_status == 407).then_some(()),
    );

    redis.stop();
    // Known-good tokens keep working, known revocations keep biting.
    for proxy in [&a, &b] {
        assert_eq!(get(&home, proxy, &good).status, 200, "{}", proxy.log());
        assert_eq!(get(&home, proxy, &revoked).connect_status, 407);
    }
    // Issuing with --redis while Redis is down is refused, clearly.
    let out = home.run(&["token", "issue", "--agent", "bot", "--redis", &redis.url()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
    // And the outage shows in the metrics.
    eventually(Duration::from_secs(5), "B reports Redis down", || {
        metrics(&b)
            .contains("latchkey_shared_state_up 0")
            .then_some(())
    });

    // Redis comes back empty (no persistence).
    let redis = RedisServer::start_on(port);
    eventually(Duration::from_secs(5), "B reports Redis up", || {
        metrics(&b)
            .contains("latchkey_shared_state_up 1")
            .then_some(())
    });
    // What the replicas knew was written back, and still bites.
    let key = format!("latchkey:revoked:session:{revoked_jti}");
    eventually(
        Duration::from_secs(5),
        "the revocation is back in Redis",
        || {
            redis
                .command(&["EXISTS", &key])
                .is_some_and(|r| r.starts_with(":1"))
                .then_some(())
        },
    );
    assert_eq!(get(&home, &b, &revoked).connect_status, 407);
    // A new revoke after the restart reaches B (resubscribed or resynced).
    let (later, later_jti) = issue(&home, &["--redis", &redis.url()]);
    assert_eq!(get(&home, &b, &later).status, 200);
    home.run_ok(&["token", "revoke", &later_jti, "--redis", &redis.url()]);
    eventually(Duration::from_secs(1), "B refuses the later revoke", || {
        (get(&home, &b, &later).connect_status == 407).then_some(())
    });
    assert_eq!(get(&home, &a, &good).status, 200);
}

#[test]
fn past_the_grace_period_tokens_newer_than_the_last_sync_get_503_state_unavailable() {
    let mut redis = RedisServer::start();
    let (home, state_b) = home_with_replica_state();
    let (old, _) = issue(&home, &[]);
    // The replicas' first sync must be in a later second than `old`'s iat: a token issued in
    // the very second of the last sync counts as newer than it.
    let issued = latchkey::auth::unix_now();
    eventually(Duration::from_secs(2), "the clock moves on", || {
        (latchkey::auth::unix_now() > issued).then_some(())
    });
    let (_a, b) = replicas(&home, &state_b, &redis, &["--redis-grace", "1s"]);
    assert_eq!(get(&home, &b, &old).status, 200);
    redis.stop();
    // Minted without --redis (the CLI would refuse with it), so no replica could know of a
    // revocation of it: once the grace period is over, B refuses it.
    let clock = latchkey::auth::unix_now();
    eventually(Duration::from_secs(3), "the clock moves on", || {
        (latchkey::auth::unix_now() > clock).then_some(())
    });
    let (fresh, _) = issue(&home, &[]);
    let refused = eventually(Duration::from_secs(10), "B refuses the fresh token", || {
        let r = get(&home, &b, &fresh);
        (r.connect_status == 503).then_some(r)
    });
    assert!(refused.headers.contains("503"), "{refused:?}");
    eventually(Duration::from_secs(5), "the refusal is audited", || {
        let audit = std::fs::read_to_string(state_b.join("audit.jsonl")).unwrap_or_default();
        audit.contains("state_unavailable").then_some(())
    });
    // A token issued before the last sync still works.
    assert_eq!(get(&home, &b, &old).status, 200);
    // The operator is told, in the log and in the metrics.
    eventually(Duration::from_secs(5), "B logs the refusal mode", || {
        b.log()
            .contains("longer than the grace period")
            .then_some(())
    });
    assert!(metrics(&b).contains("latchkey_shared_state_up 0"));
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

fn rate_limited_policy(home: &Home, rate_line: &str) {
    let port = home.https_port();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"
max_ttl = "1h"
{rate_line}

[[routes]]
id = "issues-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    );
}

/// A 429 `rate_limited` whose `Retry-After` is within `max_secs`.
fn assert_rate_limited_within(r: &Curl, max_secs: u64) {
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["reason"], "rate_limited", "{r:?}");
    let retry = r
        .headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("retry-after")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no Retry-After: {r:?}"));
    let secs: u64 = retry.parse().unwrap();
    assert!((1..=max_secs).contains(&secs), "Retry-After {secs}");
}

fn assert_rate_limited(r: &Curl) {
    assert_rate_limited_within(r, 60);
}

#[test]
fn a_rate_of_10_per_minute_holds_across_both_replicas_together() {
    let redis = RedisServer::start();
    let home = Home::new();
    rate_limited_policy(&home, r#"rate = "10/min""#);
    home.set_secret("github", SECRET);
    let _ = issue(&home, &[]);
    let state_b = clone_state(&home, "state-b");
    let (a, b) = replicas(&home, &state_b, &redis, &[]);
    let (token, _) = issue(&home, &[]);
    let mut passed = 0;
    for i in 0..20 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let r = get(&home, proxy, &token);
        if r.status == 200 {
            passed += 1;
        } else {
            assert_rate_limited(&r);
        }
    }
    assert_eq!(passed, 10);
    // The upstream saw exactly the allowed ones.
    let seen = home
        .upstream
        .seen()
        .iter()
        .filter(|s| s.path == "/repos/acme/backend/issues")
        .count();
    assert_eq!(seen, 10);
}

#[test]
fn a_route_rate_overrides_the_agent_default_and_limits_locally_without_redis() {
    let home = Home::new();
    let port = home.https_port();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"
rate = "1/h"

[[routes]]
id = "issues-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
rate = "3/min"

[[routes]]
id = "search"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/search"]
"#
        ),
    );
    home.set_secret("github", SECRET);
    let proxy = home.serve(&[]);
    let (token, _) = issue(&home, &[]);
    let statuses: Vec<u16> = (0..5).map(|_| get(&home, &proxy, &token).status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_rate_limited(&get(&home, &proxy, &token));
    // The other route takes the agent default: one an hour.
    let search = home.api_url("/search");
    assert_eq!(home.curl(&proxy, &token, &[], &search).status, 200);
    let r = home.curl(&proxy, &token, &[], &search);
    assert_rate_limited_within(&r, 3600);
    assert!(
        r.headers.to_ascii_lowercase().contains("retry-after: 3600"),
        "{r:?}"
    );
    let lines = home.wait_audit(8);
    assert!(lines.iter().any(|l| l["reason"] == "rate_limited"));
}

#[test]
fn a_bad_rate_is_refused_naming_file_line_and_field() {
    let home = Home::new();
    rate_limited_policy(&home, r#"rate = "10/fortnight""#);
    let out = home.run(&["policy", "check"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bot.toml:3: rate:"), "{err}");
}
