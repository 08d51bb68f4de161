//! One request, one record: every request that reaches latchkey ends in exactly one audit
//! line, whatever the agent or the upstream does: a socket closed or a stream reset after the
//! credential went out, a download cut halfway, an upstream that times out. Each test asserts
//! what the agent got, what the upstream got and the one line the audit log holds.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use crate::common::*;

/// The audit lines whose path is `path`, once at least `n` of them are there (bounded wait).
fn lines_for(home: &Home, path: &str, n: usize) -> Vec<Value> {
    eventually(Duration::from_secs(10), "the audit line", || {
        let lines: Vec<Value> = home
            .audit()
            .into_iter()
            .filter(|l| l["path"] == path)
            .collect();
        (lines.len() >= n).then_some(lines)
    })
}

/// Wait until the upstream has received a request for `path`, and return what it received.
fn upstream_saw(home: &Home, path: &str) -> Seen {
    eventually(Duration::from_secs(10), "the upstream request", || {
        home.upstream.seen().into_iter().find(|s| s.path == path)
    })
}

/// A raw HTTP/1.1 tunnel to the test API as `bot`, with `request_line` (e.g. `GET /x`)
/// already sent.
fn h1_request(home: &Home, proxy: &Proxy, token: &str, request_line: &str) -> RawTunnel {
    let mut t = home.tunnel(proxy, token);
    t.tls
        .write_all(
            format!(
                "{request_line} HTTP/1.1\r\nHost: {}\r\n\r\n",
                home.api_authority()
            )
            .as_bytes(),
        )
        .unwrap();
    t.tls.flush().unwrap();
    t
}

/// The line a request that carried the credential upstream and was then abandoned leaves.
fn assert_cancelled_after_sending(line: &Value) {
    assert_eq!(line["outcome"], "cancelled", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["agent"], "bot", "{line}");
    assert_eq!(line["route"], "issues-read", "{line}");
    assert_eq!(line["credential"], "github", "{line}");
}

#[test]
fn an_http1_agent_that_closes_its_socket_after_the_upstream_got_the_request_leaves_one_cancelled_line(
) {
    let (home, proxy, token) = ready_with(&[]);
    let path = "/delay/5000/h1-close";
    let t = h1_request(&home, &proxy, &token, &format!("GET {path}"));
    let seen = upstream_saw(&home, path);
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    drop(t);
    let lines = lines_for(&home, path, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_cancelled_after_sending(&lines[0]);
    // Nothing was answered: no status, no first byte, nothing delivered.
    assert!(lines[0]["status"].is_null(), "{}", lines[0]);
    assert!(lines[0]["ttfb_ms"].is_null(), "{}", lines[0]);
    assert_eq!(lines[0]["bytes_down"], 0);
    // Well before the upstream would have answered.
    assert!(lines[0]["duration_ms"].as_f64().unwrap() < 5000.0);
    // Still exactly one once the upstream's answer would have arrived: nothing completes twice.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines_for(&home, path, 1).len(), 1);
    assert!(!proxy.log().contains(SECRET), "the secret reached the log");
}

#[test]
fn an_http2_agent_that_resets_its_stream_after_the_upstream_got_the_request_leaves_one_cancelled_line(
) {
    let (home, proxy, token) = ready_with(&[]);
    let agent = H2Agent::open(&home, proxy.addr, &token);
    let path = "/delay/5000/h2-reset";
    let mut send = agent.send.clone();
    let req = agent_request(&agent.authority, path);
    let pending = agent
        .rt
        .spawn(async move { send.send_request(req).await.map(|_| ()) });
    let seen = upstream_saw(&home, path);
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    // Dropping the response future resets the stream (RST_STREAM CANCEL); the connection
    // itself stays open and usable.
    pending.abort();
    let lines = lines_for(&home, path, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_cancelled_after_sending(&lines[0]);
    assert!(lines[0]["status"].is_null(), "{}", lines[0]);
    // The same connection still serves the next request, which gets its own line.
    let mut send = agent.send.clone();
    let req = agent_request(&agent.authority, "/repos/acme/backend/issues/7");
    let status = agent
        .rt
        .block_on(async move { send.send_request(req).await.unwrap().status() });
    assert_eq!(status, 200);
    let next = lines_for(&home, "/repos/acme/backend/issues/7", 1);
    assert_eq!(next[0]["outcome"], "ok");
    assert_eq!(lines_for(&home, path, 1).len(), 1);

    fn agent_request(authority: &str, path: &str) -> http::Request<AgentBody> {
        http::Request::builder()
            .uri(format!("https://{authority}{path}"))
            .body(Empty::new().boxed())
            .unwrap()
    }
}

#[test]
fn a_download_cut_halfway_is_one_cancelled_line_with_the_bytes_delivered() {
    let (home, proxy, token) = ready_with(&[]);
    let total: u64 = 64 << 20;
    let path = "/big";
    let mut t = h1_request(&home, &proxy, &token, &format!("GET {path}?bytes={total}"));
    // Read the head and about 2 MiB of the body, then go away.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 2 << 20 {
        let n = t.tls.read(&mut buf).unwrap();
        assert!(n > 0, "the download ended early");
        got += n;
    }
    drop(t);
    let lines = lines_for(&home, path, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(l["outcome"], "cancelled", "{l}");
    assert_eq!(l["decision"], "allow");
    assert_eq!(l["status"], 200);
    assert!(l["ttfb_ms"].as_f64().unwrap() <= l["duration_ms"].as_f64().unwrap());
    let down = l["bytes_down"].as_u64().unwrap();
    // At least what the agent read (minus the head), never the whole body.
    assert!(
        down as usize >= got - 4096,
        "bytes_down {down} < read {got}"
    );
    assert!(down < total, "bytes_down {down} is the whole body");
}

#[test]
fn a_complete_exchange_records_ok_with_its_byte_counts() {
    let (home, proxy, token) = ready_with(&[]);
    let body = "x".repeat(12_345);
    let r = home.curl(
        &proxy,
        &token,
        &["-X", "POST", "--data-binary", &body],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r2 = home.curl(&proxy, &token, &[], &home.api_url("/big?bytes=100000"));
    assert_eq!(r2.status, 200);
    let post = lines_for(&home, "/repos/acme/backend/issues", 1);
    let l = &post[0];
    assert_eq!(l["outcome"], "ok", "{l}");
    assert_eq!(l["decision"], "allow");
    assert_eq!(l["bytes_up"], 12_345);
    // The credential by name and kind, never by value.
    assert_eq!(l["credential"], "github");
    assert_eq!(l["credential_kind"], "static", "{l}");
    assert!(l.get("credential_detail").is_none(), "{l}");
    assert!(!l.to_string().contains(SECRET));
    // The echo's JSON answer, exactly as the agent received it.
    assert_eq!(l["bytes_down"].as_u64().unwrap() as usize, r.body.len());
    let big = lines_for(&home, "/big", 1);
    assert_eq!(big[0]["bytes_down"], 100_000);
    assert_eq!(big[0]["bytes_up"], 0);
    // A refusal is one line too, with the JSON the agent got as its bytes.
    let denied = home.curl(&proxy, &token, &[], &home.api_url("/admin"));
    assert_eq!(denied.status, 403);
    let d = lines_for(&home, "/admin", 1);
    assert_eq!(d[0]["outcome"], "denied");
    assert_eq!(d[0]["decision"], "deny");
    assert_eq!(d[0]["reason"], "no_route");
    // No credential went on a refused request: no kind either.
    assert!(d[0].get("credential_kind").is_none(), "{}", d[0]);
    assert_eq!(
        d[0]["bytes_down"].as_u64().unwrap() as usize,
        denied.body.len()
    );
    assert!(home.run(&["audit", "verify"]).status.success());
}

#[test]
fn an_upstream_that_times_out_after_the_credential_went_out_is_allow_and_upstream_failed() {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    // The typed config, as `serve --upstream-timeout 1s` would build it.
    let mut cfg = home.config();
    cfg.limits.upstream_timeout = Duration::from_secs(1);
    let proxy = Proxy::in_process(cfg);
    let path = "/delay/4000/timeout";
    let r = home.curl(&proxy, &token, &[], &home.api_url(path));
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.json()["reason"], "upstream_timeout");
    assert_eq!(r.json()["error"], "upstream_failed");
    let seen = upstream_saw(&home, path);
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    let l = &lines_for(&home, path, 1)[0];
    assert_eq!(l["decision"], "allow", "{l}");
    assert_eq!(l["outcome"], "upstream_failed");
    assert_eq!(l["reason"], "upstream_timeout");
    assert_eq!(l["status"], 504);
    assert_eq!(l["credential"], "github");
}

#[test]
fn thousands_of_requests_cancelled_at_random_moments_leave_exactly_one_line_each() {
    let (home, proxy, token) = ready_with(&[]);
    let agent = H2Agent::open(&home, proxy.addr, &token);
    const N: usize = 2000;
    let send = agent.send.clone();
    let authority = agent.authority.clone();
    // One complete request first, so the upstream connection exists.
    let warm = http::Request::builder()
        .uri(format!("https://{authority}/delay/0/warm"))
        .body(Empty::<Bytes>::new().boxed())
        .unwrap();
    let mut first = send.clone();
    assert_eq!(
        agent
            .rt
            .block_on(async move { first.send_request(warm).await.unwrap().status() }),
        200
    );
    agent.rt.block_on(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::with_capacity(N);
        for i in 0..N {
            // Upstream latency 0-99 ms, cancellation after 2-201 ms: some finish, some are
            // cancelled before latchkey forwards them, many while the upstream is answering
            // (the spread is wide so that a loaded machine still shows every case).
            let delay = (i * 7) % 100;
            let cancel_after = Duration::from_millis(2 + ((i * 13) % 200) as u64);
            let mut send = send.clone();
            let permit = limit.clone().acquire_owned().await.unwrap();
            let req = http::Request::builder()
                .uri(format!("https://{authority}/delay/{delay}/soak-{i}"))
                .body(Empty::<Bytes>::new().boxed())
                .unwrap();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(cancel_after, async {
                    let resp = send.send_request(req).await?;
                    resp.into_body().collect().await.map(|_| ())
                })
                .await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let seen: Vec<String> = home
        .upstream
        .seen()
        .into_iter()
        .map(|s| s.path)
        .filter(|p| p.contains("/soak-"))
        .collect();
    assert!(
        seen.len() >= 100,
        "too few reached the upstream: {}",
        seen.len()
    );
    // Every request that reached the upstream has exactly one line, and it says allow.
    let lines = eventually(
        Duration::from_secs(20),
        "a line per upstream request",
        || {
            let lines: Vec<Value> = home
                .audit()
                .into_iter()
                .filter(|l| l["path"].as_str().is_some_and(|p| p.contains("/soak-")))
                .collect();
            let have: std::collections::HashSet<&str> =
                lines.iter().filter_map(|l| l["path"].as_str()).collect();
            seen.iter()
                .all(|p| have.contains(p.as_str()))
                .then_some(lines)
        },
    );
    let mut per_path = std::collections::HashMap::new();
    for l in &lines {
        *per_path
            .entry(l["path"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert!(
        per_path.values().all(|&n| n == 1),
        "a request has two lines"
    );
    assert!(lines.len() <= N);
    for p in &seen {
        let l = lines.iter().find(|l| l["path"] == p.as_str()).unwrap();
        assert_eq!(l["decision"], "allow", "{l}");
        assert!(l["outcome"] == "ok" || l["outcome"] == "cancelled", "{l}");
    }
    let cancelled = lines.iter().filter(|l| l["outcome"] == "cancelled").count();
    let cancelled_after_sending = lines
        .iter()
        .filter(|l| l["outcome"] == "cancelled" && l["decision"] == "allow")
        .count();
    eprintln!(
        "soak: {N} requests, {} reached the upstream, {} lines, {cancelled} cancelled \
         ({cancelled_after_sending} after the credential went out)",
        seen.len(),
        lines.len()
    );
    assert!(
        cancelled_after_sending > 0,
        "no request was cancelled after sending"
    );
    assert!(home.run(&["audit", "verify"]).status.success());
    // The tunnel's own line: opened, and ended well.
    let connect = home
        .audit()
        .into_iter()
        .find(|l| l["method"] == "CONNECT")
        .unwrap();
    assert_eq!(connect["outcome"], "ok", "{connect}");
    assert_eq!(connect["decision"], "allow");
    assert_eq!(connect["status"], 200);
    // The metrics count the same events as the log.
    let metrics = admin_get(proxy.admin_addr.unwrap(), "/metrics");
    let counted: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("latchkey_requests_total{agent=\"bot\",route=\"issues-read\"")
                && l.contains("outcome=\"cancelled\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let logged = lines
        .iter()
        .filter(|l| l["outcome"] == "cancelled" && l["route"] == "issues-read")
        .count() as u64;
    assert_eq!(counted, logged, "{metrics}");
}

/// A GET on the admin listener.
fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn logs_tail_and_audit_verify_read_a_log_with_lines_from_before_the_new_fields() {
    let home = Home::new();
    let state = home.state();
    std::fs::create_dir_all(&state).unwrap();
    // A line as an earlier latchkey wrote it (no outcome, ttfb or byte counts), chained.
    let old = serde_json::json!({
        "ts": "2026-11-22T18:00:00.123Z", "request_id": "old-1", "agent": "bot",
        "on_behalf_of": null, "session": "s", "task": null, "route": "issues-read",
        "credential": "github", "decision": "allow", "reason": null, "replica": "r",
        "method": "GET", "host": "api.example.test:443", "path": "/old", "status": 200,
        "duration_ms": 2.5, "prev_hash": "0".repeat(64),
    });
    let canonical = serde_json::to_string(&old).unwrap();
    let hash = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update("0".repeat(64));
        h.update(b"\n");
        // serde_json's map keeps keys sorted, as the chain's canonical form wants.
        h.update(canonical.as_bytes());
        hex::encode(h.finalize())
    };
    let mut line = old.clone();
    line["hash"] = hash.into();
    write_log(&state.join("audit.jsonl"), &format!("{line}\n"));
    // Then a proxy appends new lines to the same chain.
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200);
    lines_for(&home, "/repos/acme/backend/issues", 1);
    // A clean shutdown flushes: the CONNECT and the request.
    assert_eq!(proxy.shutdown(), 2);
    let verify = home.run(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let tail = home.run_ok(&["logs", "tail"]);
    let rows: Vec<&str> = tail.lines().collect();
    assert!(
        rows[0].contains("/old") && !rows[0].contains("outcome="),
        "{tail}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("/repos/acme/backend/issues") && r.contains("outcome=ok")),
        "{tail}"
    );
}

fn write_log(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}
