//! Resource limits and shutdown under load: connection caps answer 429, body limits answer
//! 413 (announced or streamed), and SIGTERM with requests in flight loses no audit line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn connect_raw(proxy: &Proxy, token: &str, host: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "CONNECT {host} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn per_agent_tunnel_cap_answers_429_and_frees_the_slot_on_close() {
    let (home, proxy, token) = ready_serving(&["--max-connections-per-agent", "2"]);
    let host = format!("{API_HOST}:{}", home.https_port());
    let (a, head_a) = connect_raw(&proxy, &token, &host);
    let (_b, head_b) = connect_raw(&proxy, &token, &host);
    assert!(head_a.starts_with("HTTP/1.1 200"), "{head_a}");
    assert!(head_b.starts_with("HTTP/1.1 200"), "{head_b}");
    let (_c, head_c) = connect_raw(&proxy, &token, &host);
    assert!(head_c.starts_with("HTTP/1.1 429"), "{head_c}");
    assert!(
        head_c.to_ascii_lowercase().contains("retry-after: 1"),
        "{head_c}"
    );
    drop(a);
    // The slot is released when the tunnel closes (bounded wait for the close to land).
    let mut freed = false;
    for _ in 0..40 {
        let (_d, head) = connect_raw(&proxy, &token, &host);
        if head.starts_with("HTTP/1.1 200") {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(freed, "closing a tunnel did not free the agent's slot");
    let audit = home.wait_audit(4);
    assert!(audit.iter().any(|l| l["reason"] == "too_many_connections"
        && l["agent"] == "bot"
        && l["status"] == 429));
}

#[test]
fn global_connection_cap_answers_429() {
    let home = Home::new();
    home.standard_policy();
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&["--max-connections", "1"]);
    let host = format!("{API_HOST}:{}", home.https_port());
    let (_held, head) = connect_raw(&proxy, &token, &host);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_s, head) = connect_raw(&proxy, &token, &host);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
}

fn body_limit_policy(home: &Home) {
    home.write_policy(
        "bot.toml",
        &format!(
            "agent = \"bot\"\n[[routes]]\nid = \"small-uploads\"\nhost = \"{API_HOST}:{}\"\nmethods = [\"POST\"]\npaths = [\"/upload\"]\ncredential = \"github\"\ninject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\nmax_body = \"1KiB\"\n",
            home.https_port()
        ),
    );
}

#[test]
fn a_body_over_the_route_limit_is_413_whether_announced_or_streamed() {
    let home = Home::new();
    body_limit_policy(&home);
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let url = home.api_url("/upload");
    // Announced with Content-Length: refused before anything is sent upstream.
    let big = "x".repeat(2048);
    let r = home.curl(&proxy, &token, &["-X", "POST", "--data-binary", &big], &url);
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.json()["reason"], "body_too_large");
    assert!(home.upstream.seen().is_empty());
    // Streamed (chunked, no length): cut off once it passes the limit.
    let script = format!(
        "head -c 100000 /dev/zero | curl -sS --proxy '{}' --cacert '{}' -H 'Transfer-Encoding: chunked' --data-binary @- '{url}'",
        proxy.url_with(&token),
        home.latchkey_ca().display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["reason"], "body_too_large", "{v}");
    // Within the limit: allowed.
    let r = home.curl(
        &proxy,
        &token,
        &["-X", "POST", "--data-binary", "small"],
        &url,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], 5);
}

#[test]
fn sigterm_under_load_loses_no_acknowledged_audit_line() {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    // SIGTERM is about the process: the real binary.
    let proxy = home.serve_binary(&[]);
    // Eight threads, each on its own keep-alive tunnel, record the request id of every
    // response they receive, until the proxy goes away.
    let script = r#"
import sys, threading, requests, json, time
url, out = sys.argv[1], sys.argv[2]
ids, lock = [], threading.Lock()
stop = time.time() + 20
def worker():
    s = requests.Session()
    while time.time() < stop:
        try:
            r = s.get(url, timeout=5)
        except Exception:
            return
        rid = r.headers.get("x-latchkey-request-id")
        if rid:
            with lock:
                ids.append(rid)
threads = [threading.Thread(target=worker) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
json.dump(ids, open(out, "w"))
"#;
    let ids_file = home.path().join("ids.json");
    let mut py = Command::new("python3")
        .args(["-c", script])
        .arg(home.api_url("/repos/acme/backend/issues"))
        .arg(&ids_file)
        .env("HTTPS_PROXY", proxy.url_with(&token))
        .env("REQUESTS_CA_BUNDLE", home.latchkey_ca())
        .spawn()
        .unwrap();
    // Let load build up (bounded), then SIGTERM in the middle of it.
    for _ in 0..400 {
        if home.audit().len() > 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = proxy.terminate();
    assert!(status.success(), "{status:?}");
    assert!(py.wait().unwrap().success());
    let ids: Vec<String> = serde_json::from_slice(&std::fs::read(&ids_file).unwrap()).unwrap();
    assert!(ids.len() > 50, "too little load: {}", ids.len());
    let audit = home.audit();
    let logged: std::collections::HashSet<&str> = audit
        .iter()
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !logged.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} answered requests have no audit line",
        lost.len()
    );
    let out = home.run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_slow_upstream_blocks_no_other_request() {
    let (home, proxy, token) = ready_serving(&["--upstream-timeout", "3s"]);
    let slow_url = home.api_url("/slow");
    let slow = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--proxy"])
        .arg(proxy.url_with(&token))
        .arg("--cacert")
        .arg(home.latchkey_ca())
        .arg(&slow_url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the slow request waits on its upstream, others are served at once.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let r = home.curl(
            &proxy,
            &token,
            &[],
            &home.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request waited behind the slow one"
        );
    }
    let out = slow.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "504");
}

#[test]
fn redirects_are_passed_to_the_agent_and_never_followed() {
    let (home, proxy, token) = ready_serving(&[]);
    let r = home.curl(&proxy, &token, &[], &home.api_url("/redirect"));
    assert_eq!(r.status, 302, "{r:?}");
    assert!(r.headers.contains(&format!("https://{OTHER_HOST}/collect")));
    // The upstream saw one request; nothing went to the redirect target.
    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/redirect");
}

#[test]
fn the_audit_log_rotates_by_size_and_still_verifies_from_the_cli() {
    let (home, proxy, token) = ready_serving(&["--audit-max-bytes", "4KiB", "--audit-keep", "50"]);
    for _ in 0..15 {
        let r = home.curl(
            &proxy,
            &token,
            &[],
            &home.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.status, 200);
    }
    assert!(proxy.terminate().success());
    let rotated = home.state().join("audit.jsonl.1");
    assert!(rotated.exists(), "no rotation happened");
    let out = home.run(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("30 lines"), "{text}");
    let tail = home.run_ok(&["logs", "tail", "--json"]);
    assert_eq!(tail.lines().count(), 30);
}
