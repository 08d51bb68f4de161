//! WebSocket through latchkey's MITM: real clients (Python `websockets`, Node `ws` with
//! `https-proxy-agent`) under `latchkey run` against a real `websockets` echo server on
//! loopback; raw tunnels for what a hostile agent or upstream sends; a hyper HTTP/2 client for
//! RFC 8441 extended CONNECT. Each test checks what the agent got, what the upstream got, and
//! the session's one audit line.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn py_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/ws_echo.py")
}

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// A home whose `bot` policy has WebSocket routes on the echo server (`/ws/**` injects the
/// credential, `/open/**` does not, `/postonly` allows only POST) and adversarial ones on the
/// test upstream; the proxy pins the echo server's port.
fn ws_env() -> (Home, PyServer, Proxy) {
    let home = Home::new();
    let ws = PyServer::start(&home, "ws_echo.py", "websockets");
    let port = ws.port;
    let api = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "ws-cred"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/ws/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "ws-open"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/open/**"]

[[routes]]
id = "ws-post-only"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/postonly"]

[[routes]]
id = "ws-hostile"
host = "{API_HOST}:{api}"
methods = ["GET"]
paths = ["/switch", "/ws-bad-accept"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
    ));
    home.set_secret("github", SECRET);
    let pin = format!("{API_HOST}:{port}:127.0.0.1");
    let proxy = home.serve(&["--resolve", &pin]);
    (home, ws, proxy)
}

/// The GET lines of WebSocket sessions on `path` once `n` of them completed.
fn session_lines(home: &Home, path: &str, n: usize) -> Vec<Value> {
    eventually(Duration::from_secs(20), "WebSocket audit lines", || {
        let lines: Vec<Value> = home
            .audit()
            .into_iter()
            // Tunnel-opening CONNECT lines have no path; an HTTP/2 session's line says
            // CONNECT (the method the agent sent) with the session's path.
            .filter(|l| l["path"] == path)
            .collect();
        (lines.len() >= n).then_some(lines)
    })
}

fn assert_session_line(line: &Value, route: &str, min_bytes: u64) {
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["route"], route, "{line}");
    assert!(line["bytes_up"].as_u64().unwrap() >= min_bytes, "{line}");
    assert!(line["bytes_down"].as_u64().unwrap() >= min_bytes, "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0, "{line}");
}

/// The upstream saw our credential on `/ws/**`, none on `/open/**`, never the agent's own.
fn assert_handshakes_clean(ws: &PyServer, n: usize) {
    let hs = ws.calls();
    assert_eq!(hs.len(), n, "{hs:?}");
    for h in &hs {
        let text = h.to_string();
        assert!(!text.contains(AGENT_OWN), "{text}");
        assert!(!text.contains("proxy-authorization"), "{text}");
        let auth = h["headers"]["authorization"].as_str();
        if h["path"].as_str().unwrap().starts_with("/ws/") {
            assert_eq!(auth, Some(format!("Bearer {SECRET}").as_str()), "{text}");
        } else {
            assert_eq!(auth, None, "{text}");
        }
    }
}

#[test]
fn python_websockets_echo_through_run_with_the_credential_injected() {
    let (home, ws, _proxy) = ws_env();
    for path in ["/ws/echo", "/open/echo"] {
        let url = format!("wss://{}{path}", ws.authority());
        let out = home
            .cmd()
            .args(["run", "--agent", "bot", "--", "python3"])
            .arg(py_script())
            .args(["echo", &url, "20", "3000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(r["ok"], true);
        assert_eq!(r["bytes"], 60_000);
    }
    assert_handshakes_clean(&ws, 2);
    let line = &session_lines(&home, "/ws/echo", 1)[0];
    assert_session_line(line, "ws-cred", 60_000);
    assert_eq!(line["credential"], "github");
    let line = &session_lines(&home, "/open/echo", 1)[0];
    assert_session_line(line, "ws-open", 60_000);
    assert_eq!(line["credential"], Value::Null);
}

#[test]
fn node_ws_echo_through_run_with_the_credential_injected() {
    assert!(
        node_dir().join("node_modules/ws").is_dir(),
        "tests/node/node_modules is missing: scripts/test runs `npm ci` there"
    );
    let (home, ws, _proxy) = ws_env();
    for path in ["/ws/node", "/open/node"] {
        let url = format!("wss://{}{path}", ws.authority());
        let out = home
            .cmd()
            .args(["run", "--agent", "bot", "--", "node"])
            .arg(node_dir().join("ws_echo.js"))
            .args([&url, "20", "3000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["code"], 1000, "{r}");
    }
    assert_handshakes_clean(&ws, 2);
    assert_session_line(&session_lines(&home, "/ws/node", 1)[0], "ws-cred", 60_000);
    assert_session_line(&session_lines(&home, "/open/node", 1)[0], "ws-open", 60_000);
}

/// An HTTP/1.1 WebSocket upgrade request for `path`, as raw bytes.
fn upgrade_request(method: &str, path: &str, authority: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[test]
fn an_upgrade_to_a_path_or_method_not_allowed_is_403_and_nothing_reaches_the_upstream() {
    let (home, ws, proxy) = ws_env();
    let token = home.issue("bot", &[]);
    for (method, path, reason) in [
        ("GET", "/elsewhere", "no_route"),
        ("POST", "/ws/echo", "method_not_allowed"),
        ("GET", "/postonly", "method_not_allowed"),
    ] {
        let mut t = RawTunnel::open(
            proxy.addr,
            &ws.authority(),
            &token,
            API_HOST,
            &home.latchkey_ca(),
        )
        .unwrap();
        let r = t
            .exchange(
                upgrade_request(method, path, &ws.authority(), "Content-Length: 0\r\n").as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.head);
        assert_eq!(r.json()["reason"], reason, "{method} {path}");
        let line = &session_lines(&home, path, 1)[0];
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["reason"], reason, "{line}");
        assert_eq!(line["status"], 403, "{line}");
    }
    assert!(ws.calls().is_empty(), "{:?}", ws.calls());
}

/// A session held open by `ws_echo.py hold` with `token`: the child and its stdout, after its
/// first echo went through.
fn hold_session(
    home: &Home,
    ws: &PyServer,
    proxy: &Proxy,
    token: &str,
) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new("python3")
        .arg(py_script())
        .arg("hold")
        .arg(format!("wss://{}/ws/hold", ws.authority()))
        .env("HTTPS_PROXY", proxy.url_with(token))
        .env("NO_PROXY", "")
        .env("no_proxy", "")
        .env("SSL_CERT_FILE", home.latchkey_ca())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "open");
    (child, out)
}

#[test]
fn a_revoked_token_ends_a_live_session() {
    let (home, ws, proxy) = ws_env();
    let out = home
        .cmd()
        .args(["token", "issue", "--agent", "bot"])
        .output()
        .unwrap();
    let token = stdout(&out).trim().to_owned();
    let jti = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (mut child, mut out) = hold_session(&home, &ws, &proxy, &token);
    let revoked_at = Instant::now();
    home.run_ok(&["token", "revoke", &jti]);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("closed"), "{line:?}");
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    child.wait().unwrap();
    let l = &session_lines(&home, "/ws/hold", 1)[0];
    assert_eq!(l["status"], 101, "{l}");
    assert_eq!(l["outcome"], "body_error", "{l}");
    assert_eq!(l["reason"], "token_revoked", "{l}");
    assert_eq!(l["decision"], "allow", "{l}");
    assert!(l["bytes_up"].as_u64().unwrap() > 0, "{l}");
    assert!(l["bytes_down"].as_u64().unwrap() > 0, "{l}");
}

#[test]
fn an_expiring_token_ends_a_live_session() {
    let (home, ws, proxy) = ws_env();
    let token = home.issue("bot", &["--ttl", "4s"]);
    let (mut child, mut out) = hold_session(&home, &ws, &proxy, &token);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("closed"), "{line:?}");
    child.wait().unwrap();
    let l = &session_lines(&home, "/ws/hold", 1)[0];
    assert_eq!(l["outcome"], "body_error", "{l}");
    assert_eq!(l["reason"], "token_expired", "{l}");
}

#[test]
fn an_unasked_switch_or_a_wrong_accept_is_502_and_no_stream_opens() {
    let (home, _ws, proxy) = ws_env();
    let token = home.issue("bot", &[]);
    let api = home.api_authority();
    for (req, path) in [
        // A plain GET answered with a 101 nobody asked for.
        (
            format!("GET /switch HTTP/1.1\r\nHost: {api}\r\n\r\n"),
            "/switch",
        ),
        // A WebSocket upgrade answered with a 101 that has no accept value at all...
        (upgrade_request("GET", "/switch", &api, ""), "/switch"),
        // ...or one for another key.
        (
            upgrade_request("GET", "/ws-bad-accept", &api, ""),
            "/ws-bad-accept",
        ),
    ] {
        let mut t = home.tunnel(&proxy, &token);
        let r = t.exchange(req.as_bytes()).unwrap();
        assert_eq!(r.status, 502, "{req}: {}", r.head);
        assert_eq!(r.json()["reason"], "upstream_protocol", "{req}");
        // The connection is still HTTP: the next request gets an HTTP answer.
        let r = t
            .exchange(
                format!("GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 200, "after {path}");
    }
    let lines = session_lines(&home, "/switch", 2);
    let bad = session_lines(&home, "/ws-bad-accept", 1);
    for l in lines.iter().chain(&bad) {
        assert_eq!(l["status"], 502, "{l}");
        assert_eq!(l["outcome"], "upstream_failed", "{l}");
        assert_eq!(l["reason"], "upstream_protocol", "{l}");
    }
}

#[test]
fn an_h2c_upgrade_is_stripped_and_answered_as_plain_http() {
    let (home, _ws, proxy) = ws_env();
    let token = home.issue("bot", &[]);
    let api = home.api_authority();
    let mut t = home.tunnel(&proxy, &token);
    let req = format!(
        "GET /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    let r = t.exchange(req.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = home.upstream.seen();
    let last = seen.last().unwrap();
    for h in ["upgrade", "connection", "http2-settings"] {
        assert_eq!(last.header(h), None, "{h} reached the upstream: {last:?}");
    }
    // Still HTTP/1.1 on the same connection, not an HTTP/2 stream policy never sees.
    let r = t
        .exchange(
            format!("GET /repos/acme/backend/issues/2 HTTP/1.1\r\nHost: {api}\r\n\r\n").as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/repos/acme/backend/issues/2");
}

/// One masked client frame (RFC 6455 5.2) with `payload` (< 126 bytes).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn an_http2_extended_connect_websocket_is_relayed_as_an_http11_upgrade() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (home, ws, proxy) = ws_env();
    let token = home.issue("bot", &[]);
    let agent = H2Agent::open_to(&home, proxy.addr, &token, ws.port);
    let mut send = agent.send.clone();
    let echoed = agent.rt.block_on(async move {
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://{}/ws/h2", ws.authority()))
            .header("sec-websocket-version", "13")
            .header("authorization", format!("Bearer {AGENT_OWN}"))
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(http_body_util::Empty::new().boxed())
            .unwrap();
        let mut resp = send.send_request(req).await.expect("an answer");
        assert_eq!(resp.status(), 200, "{:?}", resp.headers());
        assert!(resp.headers().get("sec-websocket-accept").is_none());
        let upgraded = hyper::upgrade::on(&mut resp).await.expect("the stream");
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        io.write_all(&client_frame(0x1, b"hello over h2"))
            .await
            .unwrap();
        io.flush().await.unwrap();
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x81, "a final text frame");
        let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
        io.read_exact(&mut payload).await.unwrap();
        io.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
            .await
            .unwrap();
        io.flush().await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "the server's close ends the stream: {read:?}"
        );
        assert_eq!(rest[0], 0x88, "the server's Close frame");
        io.shutdown().await.unwrap();
        (ws, payload)
    });
    let (ws, payload) = echoed;
    assert_eq!(payload, b"hello over h2");
    assert_handshakes_clean(&ws, 1);
    let hs = &ws.calls()[0];
    assert_eq!(hs["path"], "/ws/h2");
    assert_eq!(hs["headers"]["upgrade"], "websocket", "{hs}");
    let l = &session_lines(&home, "/ws/h2", 1)[0];
    assert_eq!(l["method"], "CONNECT", "{l}");
    assert_eq!(l["outcome"], "ok", "{l}");
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["route"], "ws-cred", "{l}");
    assert_eq!(l["decision"], "allow", "{l}");
    assert!(l["bytes_up"].as_u64().unwrap() >= 19, "{l}");
    assert!(l["bytes_down"].as_u64().unwrap() >= 15, "{l}");
    drop(agent);
}

#[test]
fn shutdown_ends_a_live_session_and_still_writes_its_line() {
    let (home, ws, proxy) = ws_env();
    let token = home.issue("bot", &[]);
    let (mut child, mut out) = hold_session(&home, &ws, &proxy, &token);
    let started = Instant::now();
    proxy.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the drain waited on the session"
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("closed"), "{line:?}");
    child.wait().unwrap();
    // Flushed before shutdown returned: no waiting.
    let lines: Vec<Value> = home
        .audit()
        .into_iter()
        .filter(|l| l["path"] == "/ws/hold")
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "body_error", "{}", lines[0]);
    assert_eq!(lines[0]["reason"], "shutting_down", "{}", lines[0]);
}

#[test]
fn a_live_session_keeps_counting_against_the_agents_connection_cap() {
    let home = Home::new();
    let ws = PyServer::start(&home, "ws_echo.py", "websockets");
    let port = ws.port;
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "ws-cred"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/ws/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
    ));
    home.set_secret("github", SECRET);
    let pin = format!("{API_HOST}:{port}:127.0.0.1");
    let proxy = home.serve(&["--resolve", &pin, "--max-connections-per-agent", "1"]);
    let token = home.issue("bot", &[]);
    let (mut child, _out) = hold_session(&home, &ws, &proxy, &token);
    // The session's tunnel connection is gone from hyper's view, but not from the cap's.
    let (_, resp) = raw_connect(
        proxy.addr,
        &home.api_authority(),
        Some(&format!("Bearer {token}")),
    );
    assert_eq!(resp.status, 429, "{}", resp.head);
    // The session ends: its slot comes back.
    child.kill().unwrap();
    child.wait().unwrap();
    eventually(Duration::from_secs(10), "the slot is released", || {
        let (_, resp) = raw_connect(
            proxy.addr,
            &home.api_authority(),
            Some(&format!("Bearer {token}")),
        );
        (resp.status == 200).then_some(())
    });
    let l = &session_lines(&home, "/ws/hold", 1)[0];
    assert_eq!(l["status"], 101, "{l}");
}
