//! Long upstream calls: the default response-head deadline fits a non-streaming LLM
//! completion (minutes), a route's own `timeout` and `idle_timeout` are honoured, and a stream
//! that stalls is ended by the idle timeout (`body_error` / `upstream_timeout`) instead of
//! holding its slot forever.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn lines_for(home: &Home, path: &str) -> Vec<Value> {
    eventually(Duration::from_secs(20), "the audit line", || {
        let l: Vec<Value> = home
            .audit()
            .into_iter()
            .filter(|l| l["path"] == path)
            .collect();
        (!l.is_empty()).then_some(l)
    })
}

#[test]
fn a_three_minute_non_streaming_answer_succeeds_with_default_settings() {
    // What a long non-streaming LLM completion looks like: nothing at all for three minutes,
    // then the whole answer. The old 60 s head deadline answered 504.
    let (home, proxy, token) = ready_with(&[]);
    let path = "/delay/180000/completion";
    let c = home.curl(&proxy, &token, &["--max-time", "240"], &home.api_url(path));
    assert_eq!((c.exit, c.status), (0, 200), "{c:?}");
    assert_eq!(c.json()["path"], path);
    let line = &lines_for(&home, path)[0];
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(line["ttfb_ms"].as_f64().unwrap() >= 180_000.0, "{line}");
}

fn stall_routes(home: &Home) {
    let port = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "stall-default"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/stall"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
    ));
}

#[test]
fn a_stalled_stream_is_ended_by_the_idle_timeout() {
    let home = Home::new();
    stall_routes(&home);
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&["--upstream-idle-timeout", "1s"]);
    let started = Instant::now();
    let c = home.curl(&proxy, &token, &[], &home.api_url("/stall"));
    let took = started.elapsed();
    // The agent got the first chunk, then a broken stream, well before the upstream's minute.
    assert!(c.body.starts_with("first chunk"), "{c:?}");
    assert!(!c.body.contains("too late"), "{c:?}");
    assert_ne!(c.exit, 0, "a cut stream is not a complete answer: {c:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let line = &lines_for(&home, "/stall")[0];
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["outcome"], "body_error", "{line}");
    assert_eq!(line["reason"], "upstream_timeout", "{line}");
    assert_eq!(line["bytes_down"], 12, "{line}");
}

#[test]
fn a_routes_own_timeout_and_idle_timeout_are_honoured() {
    let home = Home::new();
    let port = home.https_port();
    // The standard routes already allow /delay/** on the default deadline; these come first,
    // so /delay/2500/short and /stall match them.
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"

[[routes]]
id = "short-head"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/delay/*/short"]
timeout = "1s"

[[routes]]
id = "default-head"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/delay/*/long"]

[[routes]]
id = "short-idle"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/stall"]
idle_timeout = "1s"
"#
        ),
    );
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let c = home.curl(&proxy, &token, &[], &home.api_url("/delay/2500/short"));
    assert_eq!(c.status, 504, "{c:?}");
    assert_eq!(c.json()["reason"], "upstream_timeout");
    let c = home.curl(&proxy, &token, &[], &home.api_url("/delay/2500/long"));
    assert_eq!(c.status, 200, "{c:?}");
    let started = Instant::now();
    let c = home.curl(&proxy, &token, &[], &home.api_url("/stall"));
    assert!(c.body.starts_with("first chunk"), "{c:?}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let short = &lines_for(&home, "/delay/2500/short")[0];
    assert_eq!(short["route"], "short-head", "{short}");
    assert_eq!(short["status"], 504, "{short}");
    assert_eq!(short["reason"], "upstream_timeout", "{short}");
    let long = &lines_for(&home, "/delay/2500/long")[0];
    assert_eq!(long["outcome"], "ok", "{long}");
    let stall = &lines_for(&home, "/stall")[0];
    assert_eq!(stall["route"], "short-idle", "{stall}");
    assert_eq!(stall["outcome"], "body_error", "{stall}");
    assert_eq!(stall["reason"], "upstream_timeout", "{stall}");
}

#[test]
fn an_agent_that_stops_sending_mid_upload_is_ended_by_the_idle_timeout() {
    use std::io::Write;
    let (home, proxy, token) = ready_serving(&["--upstream-idle-timeout", "1s"]);
    let api = home.api_authority();
    let mut t = home.tunnel(&proxy, &token);
    // Announces 1000 bytes, sends 10, then nothing.
    t.tls
        .write_all(
            format!(
                "POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {api}\r\nContent-Length: 1000\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .unwrap();
    t.tls.flush().unwrap();
    let r = t.read().unwrap();
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(r.json()["reason"], "bad_body");
    let line = &lines_for(&home, "/repos/acme/backend/issues")[0];
    assert_eq!(line["reason"], "bad_body", "{line}");
    assert_eq!(line["outcome"], "body_error", "{line}");
    // The upstream saw an aborted upload, never a complete one.
    let seen = eventually(
        Duration::from_secs(10),
        "the upstream sees the abort",
        || {
            let s = home.upstream.seen();
            s.first().and_then(|s| s.body_complete).map(|_| s)
        },
    );
    assert_eq!(seen[0].body_complete, Some(false));
}
