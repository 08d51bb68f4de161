//! `latchkey run` end to end with real clients: the environment it gives (every CA variable
//! overridden, `NO_PROXY` merged, `NODE_USE_ENV_PROXY`), clients that then work unchanged
//! (Python requests, curl, Node + undici, pip's config) or with the README's manual steps
//! (wget, Java), and `--contain`: a network namespace whose only way out is latchkey, where
//! a client that ignores the proxy (Node 20's built-in fetch, a raw socket, DNS) fails at once
//! and the upstream receives nothing. Real processes, real sockets, loopback only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

fn ready() -> (Home, Proxy) {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let proxy = home.serve(&[]);
    (home, proxy)
}

/// `latchkey run --agent bot [run_args] -- cmd...` with `TMPDIR` inside the home (where
/// `--contain` puts its private socket directory).
fn run_bot(home: &Home, run_args: &[&str], cmd: &[&str]) -> Command {
    let mut c = home.cmd();
    c.args(["run", "--agent", "bot"])
        .args(run_args)
        .arg("--")
        .args(cmd)
        .env("TMPDIR", home.path());
    c
}

fn output(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

fn contained(home: &Home, cmd: &[&str]) -> Output {
    output(run_bot(home, &["--contain"], cmd))
}

/// Assert the upstream saw the injected secret on `path` and the audit log has an allow line
/// for `route` with status 200.
fn assert_injected_and_audited(home: &Home, path: &str, route: &str) {
    let seen = home.upstream.seen();
    let hit = seen
        .iter()
        .find(|s| s.path == path)
        .unwrap_or_else(|| panic!("the upstream never saw {path}: {seen:?}"));
    assert_eq!(
        hit.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert!(hit.header("proxy-authorization").is_none());
    eventually(Duration::from_secs(5), "the allow audit line", || {
        home.audit()
            .into_iter()
            .find(|l| l["route"] == route && l["decision"] == "allow" && l["status"] == 200)
    });
}

fn node_run_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node-run");
    assert!(
        dir.join("node_modules/undici").is_dir(),
        "tests/node-run/node_modules is missing: scripts/test runs `npm ci` there"
    );
    assert!(
        dir.join("node_modules/openai").is_dir(),
        "tests/node-run/node_modules/openai is missing: run `npm ci` in tests/node-run"
    );
    dir
}

// ---------------------------------------------------------------------------------------------
// The environment `run` gives
// ---------------------------------------------------------------------------------------------

/// Every CA variable `run` documents, as `run --help` lists them.
const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "NPM_CONFIG_CAFILE",
    "npm_config_cafile",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
    "CARGO_HTTP_CAINFO",
    "GIT_SSL_CAINFO",
    "HTTPLIB2_CA_CERTS",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "BUNDLE_SSL_CA_CERT",
    "NIX_SSL_CERT_FILE",
];

const PRINT_ENV: &str = "import json, os; print(json.dumps(dict(os.environ)))";

#[test]
fn run_overrides_inherited_ca_variables_and_merges_no_proxy() {
    let (home, _proxy) = ready();
    let mut cmd = run_bot(&home, &[], &["python3", "-c", PRINT_ENV]);
    for var in CA_VARS {
        cmd.env(var, "/inherited/elsewhere.pem");
    }
    cmd.env("NO_PROXY", "foo.internal,localhost")
        .env("no_proxy", "bar.internal")
        .env("HTTPS_PROXY", "http://inherited-proxy:3128")
        .env_remove("NODE_USE_ENV_PROXY");
    let out = output(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let env: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let bundle = env["SSL_CERT_FILE"].as_str().unwrap().to_owned();
    assert!(
        bundle.starts_with(home.state().join("ca-bundle-").to_str().unwrap()),
        "{bundle}"
    );
    for var in CA_VARS {
        assert_eq!(env[var], bundle.as_str(), "{var} was not overridden");
    }
    for var in ["NO_PROXY", "no_proxy"] {
        assert_eq!(
            env[var], "localhost,127.0.0.1,::1,foo.internal,bar.internal",
            "{var}"
        );
    }
    assert_eq!(env["NODE_USE_ENV_PROXY"], "1");
    assert!(env["HTTPS_PROXY"]
        .as_str()
        .unwrap()
        .ends_with(&format!("@{}", _proxy.addr)));
    assert!(env["LATCHKEY_SESSION"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // The user is told which inherited entries go around latchkey.
    let err = stderr(&out);
    assert!(
        err.contains("NO_PROXY keeps foo.internal,bar.internal"),
        "{err}"
    );
    // The bundle is gone once the command has exited.
    assert!(!Path::new(&bundle).exists());
}

#[test]
fn run_bundle_holds_latchkey_ca_and_the_system_roots() {
    let (home, _proxy) = ready();
    let out = output(run_bot(&home, &[], &["sh", "-c", "cat \"$SSL_CERT_FILE\""]));
    assert!(out.status.success(), "{}", stderr(&out));
    let bundle = stdout(&out);
    let ca = std::fs::read_to_string(home.latchkey_ca()).unwrap();
    assert!(
        bundle.contains(ca.trim()),
        "latchkey's CA is not in the bundle"
    );
    let system = rustls_native_certs::load_native_certs().certs.len();
    assert!(
        system > 0,
        "this machine has no system roots to check against"
    );
    assert_eq!(
        bundle.matches("-----BEGIN CERTIFICATE-----").count(),
        system + 1
    );
}

#[test]
fn run_python_requests_trusts_latchkey_even_with_an_inherited_bundle() {
    let (home, _proxy) = ready();
    let url = home.api_url("/repos/acme/backend/issues");
    // An inherited REQUESTS_CA_BUNDLE that does not hold latchkey's CA (the upstream's own CA):
    // without the override requests would fail verification.
    let mut cmd = run_bot(
        &home,
        &[],
        &[
            "python3",
            "-c",
            "import sys, requests; r = requests.get(sys.argv[1], timeout=30); print(r.status_code); print(r.text)",
            &url,
        ],
    );
    cmd.env("REQUESTS_CA_BUNDLE", &home.upstream_ca)
        .env("CURL_CA_BUNDLE", &home.upstream_ca);
    let out = output(cmd);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let (status, body) = text.split_once('\n').unwrap();
    assert_eq!(status, "200");
    let echo: Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues", "issues-read");
}

#[test]
fn run_curl_trusts_latchkey_even_with_an_inherited_curl_ca_bundle() {
    let (home, _proxy) = ready();
    let mut cmd = run_bot(
        &home,
        &[],
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            &home.api_url("/repos/acme/backend/issues/7"),
        ],
    );
    cmd.env("CURL_CA_BUNDLE", &home.upstream_ca)
        .env("SSL_CERT_FILE", &home.upstream_ca);
    let out = output(cmd);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let echo: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/7", "issues-read");
}

/// undici's EnvHttpProxyAgent reads HTTPS_PROXY and NO_PROXY; Node trusts latchkey through
/// NODE_EXTRA_CA_CERTS.
const UNDICI_SCRIPT: &str = r#"
const { EnvHttpProxyAgent, fetch } = require('undici');
(async () => {
  const r = await fetch(process.argv[1], { dispatcher: new EnvHttpProxyAgent() });
  console.log(r.status);
  console.log(await r.text());
})().catch((e) => { console.error(e, e.cause); process.exit(3); });
"#;

#[test]
fn run_node_with_undici_env_proxy_agent_trusts_latchkey_through_node_extra_ca_certs() {
    let (home, _proxy) = ready();
    let dir = node_run_dir();
    let url = home.api_url("/repos/acme/backend/issues/8");
    let mut cmd = run_bot(&home, &[], &["node", "-e", UNDICI_SCRIPT, &url]);
    cmd.current_dir(&dir).env_remove("NODE_OPTIONS");
    let out = output(cmd);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let (status, body) = text.split_once('\n').unwrap();
    assert_eq!(status, "200");
    let echo: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/8", "issues-read");
}

#[test]
fn run_pip_reads_latchkey_bundle_from_pip_cert_over_an_inherited_one() {
    let (home, _proxy) = ready();
    let mut cmd = run_bot(
        &home,
        &[],
        &[
            "sh",
            "-c",
            "python3 -m pip config list && echo \"bundle=$SSL_CERT_FILE\"",
        ],
    );
    cmd.env("PIP_CERT", "/inherited/pip.pem");
    let out = output(cmd);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let bundle = text
        .lines()
        .find_map(|l| l.strip_prefix("bundle="))
        .unwrap();
    // pip's own view of its configuration: the environment's `cert` is latchkey's bundle.
    assert!(
        text.lines().any(|l| l == format!(":env:.cert='{bundle}'")),
        "{text}"
    );
    assert!(!text.contains("/inherited/pip.pem"), "{text}");
}

#[test]
fn run_wget_works_with_the_readme_ca_certificate_flag() {
    let (home, _proxy) = ready();
    // Debian's wget is built with GnuTLS, which reads no CA variable: README's manual step is
    // `--ca-certificate`; the proxy comes from https_proxy, set by `run`.
    let url = home.api_url("/repos/acme/backend/issues/9");
    // Without the flag wget does not trust latchkey (exit 5: SSL verification failure).
    let out = output(run_bot(
        &home,
        &[],
        &["wget", "-q", "-O", "-", "--tries=1", "--timeout=30", &url],
    ));
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let out = output(run_bot(
        &home,
        &[],
        &[
            "sh",
            "-c",
            "wget -q -O - --tries=1 --timeout=30 --ca-certificate=\"$SSL_CERT_FILE\" \"$1\"",
            "sh",
            &url,
        ],
    ));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let echo: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/9", "issues-read");
}

#[test]
fn wget_works_outside_run_with_the_readme_steps() {
    let (home, proxy) = ready();
    let token = home.issue("bot", &[]);
    let url = home.api_url("/repos/acme/backend/issues/10");
    let out = Command::new("wget")
        .args(["-q", "-O", "-", "--tries=1", "--timeout=30"])
        .arg(format!("--ca-certificate={}", home.latchkey_ca().display()))
        .arg(&url)
        .env("https_proxy", proxy.url_with(&token))
        .env_remove("HTTPS_PROXY")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .expect("wget is installed (scripts/test installs it)");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let echo: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/10", "issues-read");
}

#[test]
fn java_http_client_works_under_run_with_the_readme_steps() {
    let (home, proxy) = ready();
    let java = Command::new("java").arg("-version").output();
    assert!(
        java.as_ref().is_ok_and(|o| o.status.success()),
        "java is not installed (scripts/test installs default-jdk-headless)"
    );
    // README step 1: a PKCS12 truststore holding latchkey's CA.
    let store = home.path().join("latchkey-trust.p12");
    let out = Command::new("keytool")
        .args(["-importcert", "-noprompt", "-alias", "latchkey", "-file"])
        .arg(home.latchkey_ca())
        .arg("-keystore")
        .arg(&store)
        .args(["-storetype", "PKCS12", "-storepass", "changeit"])
        .output()
        .unwrap();
    assert!(out.status.success(), "keytool: {}", stderr(&out));
    // Step 2: the proxy, the truststore and Basic auth for tunnels as JVM properties; step 3
    // (in LatchkeyGet.java): an Authenticator answering the proxy's 407.
    let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java/LatchkeyGet.java");
    let url = home.api_url("/repos/acme/backend/issues/11");
    let out = output(run_bot(
        &home,
        &[],
        &[
            "java",
            &format!("-Djavax.net.ssl.trustStore={}", store.display()),
            "-Djavax.net.ssl.trustStorePassword=changeit",
            "-Dhttps.proxyHost=127.0.0.1",
            &format!("-Dhttps.proxyPort={}", proxy.addr.port()),
            "-Djdk.http.auth.tunneling.disabledSchemes=",
            program.to_str().unwrap(),
            &url,
        ],
    ));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let (status, body) = text.split_once('\n').unwrap();
    assert_eq!(status, "200", "{text}");
    let echo: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/11", "issues-read");
}

// ---------------------------------------------------------------------------------------------
// run --contain
// ---------------------------------------------------------------------------------------------

#[test]
fn contained_curl_goes_through_latchkey_with_the_secret_injected() {
    let (home, _proxy) = ready();
    let out = contained(
        &home,
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            &home.api_url("/repos/acme/backend/issues/21"),
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let echo: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/21", "issues-read");
}

/// Node's built-in fetch straight at an address (it ignores HTTPS_PROXY on Node 20; with
/// NODE_USE_ENV_PROXY removed it ignores it on every version). Prints JSON: the outcome, the
/// error code and how long it took.
const NODE_DIRECT_FETCH: &str = r#"
const started = Date.now();
fetch(process.argv[1]).then(
  (r) => console.log(JSON.stringify({ ok: true, status: r.status, ms: Date.now() - started })),
  (e) => console.log(JSON.stringify({ ok: false, code: (e.cause && e.cause.code) || String(e), ms: Date.now() - started })),
);
"#;

fn node_direct_fetch(home: &Home, contain: bool) -> Value {
    let url = format!(
        "https://127.0.0.1:{}/repos/acme/backend/issues",
        home.https_port()
    );
    let run_args: &[&str] = if contain { &["--contain"] } else { &[] };
    let out = output(run_bot(
        home,
        run_args,
        &[
            "env",
            "-u",
            "NODE_USE_ENV_PROXY",
            "node",
            "-e",
            NODE_DIRECT_FETCH,
            &url,
        ],
    ));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

#[test]
fn node_builtin_fetch_goes_around_plain_run_but_fails_fast_under_contain() {
    let (home, _proxy) = ready();
    // The bypass this exists for: under plain `run`, fetch connects to the upstream directly
    // (TLS then fails on the upstream's own CA, but the connection was made).
    let plain = node_direct_fetch(&home, false);
    assert_eq!(plain["ok"], false, "{plain}");
    assert!(
        home.upstream.tls_connections.load(Ordering::SeqCst) > 0,
        "plain run: fetch should have reached the upstream directly ({plain})"
    );
    let (home, _proxy) = ready();
    let started = Instant::now();
    let contained = node_direct_fetch(&home, true);
    assert_eq!(contained["ok"], false, "{contained}");
    assert_eq!(contained["code"], "ECONNREFUSED", "{contained}");
    assert!(
        contained["ms"].as_u64().unwrap() < 3000,
        "fetch did not fail fast: {contained}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(home.upstream.tls_connections.load(Ordering::SeqCst), 0);
    assert!(home.upstream.seen().is_empty());
}

/// The `openai` npm SDK (v5, built-in fetch) pointed straight at an OpenAI-style API on the
/// upstream's real address, as an agent that ignores the proxy would be. Retries off, so the
/// time measured is one attempt. Prints JSON: the outcome, the error class and cause, the time.
const OPENAI_DIRECT: &str = r#"
const OpenAI = require('openai');
const client = new OpenAI({ apiKey: 'sk-agent-own', baseURL: process.argv[1], maxRetries: 0, timeout: 20000 });
const started = Date.now();
client.models.list().then(
  () => console.log(JSON.stringify({ ok: true, ms: Date.now() - started })),
  (e) => {
    let c = e.cause; while (c && c.cause && !c.code) c = c.cause;
    console.log(JSON.stringify({ ok: false, error: e.constructor.name, code: c && c.code, ms: Date.now() - started }));
  },
);
"#;

#[test]
fn openai_npm_sdk_on_builtin_fetch_cannot_go_around_latchkey_under_contain() {
    let (home, _proxy) = ready();
    let dir = node_run_dir();
    let base = format!("https://127.0.0.1:{}/v1", home.https_port());
    let mut cmd = run_bot(
        &home,
        &["--contain"],
        &[
            "env",
            "-u",
            "NODE_USE_ENV_PROXY",
            "node",
            "-e",
            OPENAI_DIRECT,
            &base,
        ],
    );
    cmd.current_dir(&dir);
    let out = output(cmd);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"], "APIConnectionError", "{r}");
    assert_eq!(r["code"], "ECONNREFUSED", "{r}");
    assert!(r["ms"].as_u64().unwrap() < 3000, "did not fail fast: {r}");
    assert_eq!(home.upstream.tls_connections.load(Ordering::SeqCst), 0);
    assert!(home.upstream.seen().is_empty());
}

/// Everything but the proxy, from inside: a raw TCP connection to the upstream's real port, a
/// TCP connection and a UDP datagram to an address outside loopback (TEST-NET-1, never
/// routed), an IPv6 connection, and a DNS lookup. Prints one JSON object of outcomes.
const PYTHON_ESCAPES: &str = r#"
import json, socket, sys, time
port = int(sys.argv[1])
out = {}
def attempt(name, f):
    t = time.monotonic()
    try:
        f()
        out[name] = "connected"
    except OSError as e:
        out[name] = type(e).__name__ + ":" + str(e.errno)
    out[name + "_ms"] = int((time.monotonic() - t) * 1000)
attempt("upstream", lambda: socket.create_connection(("127.0.0.1", port), timeout=10).close())
attempt("outside", lambda: socket.create_connection(("192.0.2.1", 443), timeout=10).close())
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("192.0.2.1", 53))
attempt("udp", udp)
attempt("dns", lambda: socket.getaddrinfo("api.example.test", 443))
attempt("ipv6", lambda: socket.create_connection(("2001:db8::1", 443), timeout=10).close())
print(json.dumps(out))
"#;

#[test]
fn contained_raw_sockets_udp_and_dns_fail_and_reach_nothing() {
    let (home, _proxy) = ready();
    let port = home.https_port().to_string();
    let out = contained(&home, &["python3", "-c", PYTHON_ESCAPES, &port]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(r["upstream"], "ConnectionRefusedError:111", "{r}");
    assert_eq!(r["outside"], "OSError:101", "network unreachable: {r}");
    assert_eq!(r["udp"], "OSError:101", "network unreachable: {r}");
    assert!(
        r["dns"].as_str().unwrap().starts_with("gaierror"),
        "DNS must not resolve: {r}"
    );
    // IPv6 (documentation prefix): unreachable, or not supported at all in the namespace.
    assert!(
        ["OSError:101", "OSError:97", "OSError:99"].contains(&r["ipv6"].as_str().unwrap()),
        "{r}"
    );
    for k in ["upstream_ms", "outside_ms", "udp_ms", "dns_ms", "ipv6_ms"] {
        assert!(r[k].as_u64().unwrap() < 3000, "{k} was slow: {r}");
    }
    assert_eq!(home.upstream.tls_connections.load(Ordering::SeqCst), 0);
    assert!(home.upstream.seen().is_empty());
}

#[test]
fn contained_inherited_no_proxy_host_cannot_be_reached_directly() {
    let (home, _proxy) = ready();
    // NO_PROXY names the API: curl goes direct instead of through latchkey, and under
    // --contain there is no direct way (api.example.test does not resolve, 127.0.0.1 is the
    // namespace's own loopback).
    let mut cmd = run_bot(
        &home,
        &["--contain"],
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &format!("{API_HOST}:{}:127.0.0.1", home.https_port()),
            &home.api_url("/repos/acme/backend/issues"),
        ],
    );
    cmd.env("NO_PROXY", API_HOST);
    let out = output(cmd);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: couldn't connect: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("NO_PROXY keeps api.example.test"));
    assert_eq!(home.upstream.tls_connections.load(Ordering::SeqCst), 0);
    assert!(home.upstream.seen().is_empty());
}

#[test]
fn contained_relay_carries_no_authority_of_its_own() {
    let (home, _proxy) = ready();
    // A hostile command reuses the in-namespace relay with a forged token: latchkey refuses it
    // exactly as on its own port (407 at CONNECT), the upstream sees nothing, and the audit
    // log has the refusal.
    let script = r#"forged=$(printf %s "$HTTPS_PROXY" | sed 's/:[^:@]*@/:forged-token@/')
curl -sS -o /dev/null -w '%{http_connect}' --max-time 10 --proxy "$forged" "$1""#;
    let url = home.api_url("/repos/acme/backend/issues");
    let out = contained(&home, &["sh", "-c", script, "sh", &url]);
    assert_eq!(stdout(&out), "407", "{}", stderr(&out));
    assert!(home.upstream.seen().is_empty());
    eventually(
        Duration::from_secs(5),
        "the token_invalid audit line",
        || {
            home.audit()
                .into_iter()
                .find(|l| l["decision"] == "deny" && l["reason"] == "token_invalid")
        },
    );
}

#[test]
fn run_help_says_inherited_variables_are_overridden() {
    let home = Home::new();
    let out = home.run(&["run", "--help"]);
    assert!(out.status.success());
    let help = stdout(&out);
    assert!(
        help.contains("overriding any value it would inherit"),
        "{help}"
    );
    for (var, _) in latchkey::run::CA_BUNDLE_VARS {
        assert!(help.contains(var), "run --help does not list {var}");
    }
    assert!(help.contains("--contain"));
    assert!(help.contains("NO_PROXY and no_proxy are merged"));
}

#[test]
fn contained_command_gets_the_in_namespace_relay_and_the_ca_variables_only() {
    let (home, proxy) = ready();
    let mut cmd = run_bot(&home, &["--contain"], &["python3", "-c", PRINT_ENV]);
    cmd.env("SSL_CERT_FILE", "/inherited.pem")
        .env("HTTPS_PROXY", "http://inherited:3128");
    let out = output(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let env: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let url = env["HTTPS_PROXY"].as_str().unwrap();
    let (userinfo, addr) = url
        .strip_prefix("http://bot:")
        .and_then(|rest| rest.rsplit_once('@'))
        .unwrap_or_else(|| panic!("{url}"));
    assert!(!userinfo.is_empty());
    assert!(addr.starts_with("127.0.0.1:"), "{url}");
    assert_ne!(
        addr,
        proxy.addr.to_string(),
        "the host's listener is not reachable inside"
    );
    for var in [
        "HTTP_PROXY",
        "https_proxy",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        assert_eq!(env[var], url, "{var}");
    }
    for var in CA_VARS {
        assert!(
            env[var].as_str().unwrap().contains("ca-bundle-"),
            "{var} = {}",
            env[var]
        );
    }
    assert_eq!(env["NODE_USE_ENV_PROXY"], "1");
    // The hand-over variable between latchkey's two halves does not reach the command.
    assert!(env.get(latchkey::run::contain::PROXY_AUTH_ENV).is_none());
}

#[test]
fn contained_command_exit_code_passes_through() {
    let (home, _proxy) = ready();
    let out = contained(&home, &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = contained(&home, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
}

#[test]
fn contained_run_forwards_sigterm_to_the_command() {
    let (home, _proxy) = ready();
    let ready_file = home.path().join("child-ready");
    let script = format!(
        "trap 'exit 42' TERM; touch '{}'; while true; do sleep 0.05; done",
        ready_file.display()
    );
    let mut child = run_bot(&home, &["--contain"], &["sh", "-c", &script])
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the contained command starts",
        || ready_file.exists().then_some(()),
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(42));
}

#[test]
fn sigterm_while_the_namespace_is_being_set_up_is_not_reported_as_a_setup_failure() {
    let (home, _proxy) = ready();
    let child = run_bot(
        &home,
        &["--contain"],
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 0.05; done",
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // The relay directory exists once latchkey handles signals; the namespace side may still
    // be starting when SIGTERM arrives.
    eventually(Duration::from_secs(10), "the relay directory", || {
        std::fs::read_dir(home.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("latchkey-contain-")
            })
            .then_some(())
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    // Passed on: the command trapped it (42), or died of it (128 + 15) before its trap was set,
    // or the namespace side did before its handler was (the same 143).
    assert!(
        matches!(out.status.code(), Some(42) | Some(143)),
        "{:?} {err}",
        out.status
    );
    assert!(!err.contains("could not create or set up"), "{err}");
}

#[test]
fn contained_relay_socket_is_owner_only_and_removed_afterwards() {
    let (home, _proxy) = ready();
    let out = contained(
        &home,
        &[
            "sh",
            "-c",
            "stat -c '%a %U %F' \"$TMPDIR\"/latchkey-contain-*/ \"$TMPDIR\"/latchkey-contain-*/proxy.sock",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let me = stdout(&Command::new("id").arg("-un").output().unwrap());
    let me = me.trim();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("700 ") && lines[0].ends_with("directory"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("600 ") && lines[1].ends_with("socket"),
        "{text}"
    );
    // Under an unprivileged user namespace the caller shows as root inside; either way it
    // is the caller's own uid outside.
    assert!(
        lines.iter().all(|l| l.contains(me) || l.contains(" root ")),
        "{text}"
    );
    let left: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("latchkey-contain-")
        })
        .collect();
    assert!(left.is_empty(), "the relay directory was left behind");
}

/// The session's revocation, as `run` records it when the command ends.
fn session_revoked(home: &Home) -> bool {
    std::fs::read_to_string(home.state().join("revocations.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["sessions"].as_object().is_some_and(|m| m.len() == 1))
}

#[test]
fn contain_without_unshare_is_a_clear_error_and_runs_nothing() {
    let (home, _proxy) = ready();
    let bin = home.path().join("no-unshare-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = home.path().join("ran");
    let mut cmd = run_bot(
        &home,
        &["--contain"],
        &["/usr/bin/touch", marker.to_str().unwrap()],
    );
    cmd.env("PATH", &bin);
    let out = output(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--contain needs util-linux `unshare`"),
        "{err}"
    );
    assert!(err.contains("the command was not run"), "{err}");
    assert!(!marker.exists(), "the command ran uncontained");
    assert!(
        session_revoked(&home),
        "the session token outlived the failed run"
    );
}

#[test]
fn contain_fails_clearly_when_the_namespace_cannot_be_made() {
    let (home, _proxy) = ready();
    // A stand-in for util-linux unshare on a kernel that refuses namespaces: it prints what
    // the real one prints and exits 1 without running anything.
    let bin = home.path().join("denying-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("unshare");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = home.path().join("ran");
    let mut cmd = run_bot(
        &home,
        &["--contain"],
        &["/usr/bin/touch", marker.to_str().unwrap()],
    );
    cmd.env(
        "PATH",
        format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
    );
    let out = output(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--contain could not create or set up the network namespace"),
        "{err}"
    );
    assert!(err.contains("the command was not run"), "{err}");
    assert!(!marker.exists(), "the command ran uncontained");
}

#[test]
fn contain_works_for_an_unprivileged_user_through_a_user_namespace() {
    let (home, _proxy) = ready();
    let url = home.api_url("/repos/acme/backend/issues/31");
    // The uid map first (which namespace the command is in), then curl's answer.
    let mut cmd = run_bot(
        &home,
        &["--contain"],
        &[
            "sh",
            "-c",
            "tr -s ' ' < /proc/self/uid_map; curl -sS --max-time 30 \"$1\"",
            "sh",
            &url,
        ],
    );
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        // Hand the home to `nobody` and run latchkey as it: `run` must then use
        // `unshare --user --map-root-user --net`. The binary is copied into the home, since
        // the build directory may sit where `nobody` cannot reach (e.g. under /root).
        let binary = home.path().join("latchkey");
        std::fs::copy(cmd.get_program(), &binary).unwrap();
        let status = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(home.path())
            .status()
            .unwrap();
        assert!(status.success());
        let mut wrapped = Command::new("setpriv");
        wrapped
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&binary)
            .args(cmd.get_args())
            .env("HOME", home.path());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        cmd = wrapped;
    }
    let out = output(cmd);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let (uid_map, body) = text.split_once('\n').unwrap();
    // Inside a user namespace: uid 0 there is the caller's own uid (65534) outside, one id.
    let outside = if as_root {
        "65534".to_owned()
    } else {
        nix::unistd::geteuid().to_string()
    };
    assert_eq!(uid_map.trim(), format!("0 {outside} 1"), "{text}");
    let echo: Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["headers"]["authorization"][0], "Bearer [REDACTED]");
    assert_injected_and_audited(&home, "/repos/acme/backend/issues/31", "issues-read");
}
