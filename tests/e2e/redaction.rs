//! Redaction of an echoed credential (SECURITY.md, "The real credential reaches only the
//! upstream"): in the encodings echo endpoints use, in a body the upstream compressed although
//! latchkey asked for `identity`, and in token streams, which must not stall on a chunk tail
//! that merely looks like the start of the secret. Each test asserts what the agent got, what
//! the upstream got (the real credential) and the audit line.

use std::time::Duration;

use crate::common::*;
use base64::Engine;
use serde_json::Value;

struct Env {
    home: Home,
    proxy: Proxy,
    token: String,
}

fn env() -> Env {
    let home = Home::new();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "echo"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/reflect-encoded", "/reflect-compressed", "/drip", "/drip-split"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#,
        port = home.https_port()
    ));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &["--on-behalf-of", "alice"]);
    let proxy = home.serve(&[]);
    Env { home, proxy, token }
}

impl Env {
    fn get(&self, path: &str) -> RawResponse {
        let api = self.home.api_authority();
        let mut tunnel = self.home.tunnel(&self.proxy, &self.token);
        let req = format!("GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n");
        tunnel.exchange(req.as_bytes()).unwrap()
    }

    /// The upstream got the request for `path` with the real credential, and asked for nothing
    /// but `identity`.
    fn assert_upstream_got_the_credential(&self, path: &str) {
        let seen = self.home.upstream.seen();
        let s = seen
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("the upstream never got {path}: {seen:?}"));
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert_eq!(s.header("accept-encoding"), Some("identity"));
    }

    /// The audit line of the request for `path` (bounded wait: the writer is asynchronous).
    fn audit_line(&self, path: &str) -> Value {
        eventually(Duration::from_secs(5), "the audit line", || {
            self.home
                .audit()
                .into_iter()
                .find(|l| l["path"] == path && l["outcome"] != Value::Null)
        })
    }
}

/// Every form in which the body could still carry the secret.
fn encodings_of_the_secret() -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    vec![
        SECRET.to_string(),
        STANDARD.encode(SECRET),
        URL_SAFE_NO_PAD.encode(SECRET),
        hex::encode(SECRET),
        hex::encode_upper(SECRET),
        SECRET.bytes().map(|b| format!("\\u{b:04x}")).collect(),
        SECRET.bytes().map(|b| format!("%{b:02X}")).collect(),
    ]
}

#[test]
fn secret_echoed_in_base64_hex_json_escapes_and_percent_encoding_is_redacted() {
    let env = env();
    let r = env.get("/reflect-encoded");
    assert_eq!(r.status, 200, "{}", r.head);
    let body = r.text();
    for enc in encodings_of_the_secret() {
        assert!(!body.contains(&enc), "body leaks {enc}: {body}");
    }
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 8, "{body}");
    for line in &lines {
        let (name, value) = line.split_once('=').unwrap();
        if name.starts_with("b64url_in_run") {
            // Inside a longer base64 run only the characters the secret shares with its
            // neighbours may remain around the replacement: a handful, not the secret.
            assert!(value.contains("[REDACTED]"), "{line}");
            let decoded_len = value.len() - "[REDACTED]".len();
            assert!(decoded_len < 60, "{line}");
        } else {
            assert_eq!(value, "[REDACTED]", "{line}");
        }
    }
    env.assert_upstream_got_the_credential("/reflect-encoded");
    let line = env.audit_line("/reflect-encoded");
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
}

#[test]
fn secret_echoed_compressed_despite_identity_is_decoded_and_redacted() {
    let env = env();
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let path = format!("/reflect-compressed?enc={coding}");
        let r = env.get(&path);
        assert_eq!(r.status, 200, "{coding}: {}{}", r.head, r.text());
        // The agent gets the decoded body, said so by the missing content-encoding.
        assert_eq!(r.header("content-encoding"), None, "{coding}: {}", r.head);
        let v = r.json();
        assert_eq!(v["you_sent"], "Bearer [REDACTED]", "{coding}");
        assert!(!r.text().contains(SECRET), "{coding}");
    }
    env.assert_upstream_got_the_credential("/reflect-compressed");
    let lines = eventually(Duration::from_secs(5), "four audit lines", || {
        let lines: Vec<Value> = env
            .home
            .audit()
            .into_iter()
            .filter(|l| l["path"] == "/reflect-compressed")
            .collect();
        (lines.len() == 4).then_some(lines)
    });
    for l in lines {
        assert_eq!(l["outcome"], "ok", "{l}");
    }
}

#[test]
fn a_credentialed_response_in_an_encoding_latchkey_cannot_read_is_refused_with_502() {
    let env = env();
    let r = env.get("/reflect-compressed?enc=compress");
    assert_eq!(r.status, 502, "{}{}", r.head, r.text());
    assert_eq!(r.reason(), "upstream_protocol", "{}", r.text());
    assert!(!r.text().contains(SECRET));
    env.assert_upstream_got_the_credential("/reflect-compressed");
    let line = env.audit_line("/reflect-compressed");
    assert_eq!(line["reason"], "upstream_protocol", "{line}");
}

/// A reqwest agent reading a streamed body through the proxy; returns each frame with the
/// moment it arrived (µs since the epoch, the clock the upstream stamps its chunks with).
fn stream_through_proxy(env: &Env, path: &str) -> Vec<(u128, Vec<u8>)> {
    let ca = std::fs::read(env.home.latchkey_ca()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .proxy(
                reqwest::Proxy::https(format!("http://{}", env.proxy.addr))
                    .unwrap()
                    .custom_http_auth(format!("Bearer {}", env.token).parse().unwrap()),
            )
            .build()
            .unwrap();
        let mut resp = client.get(env.home.api_url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut frames = Vec::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            frames.push((now_us(), chunk.to_vec()));
        }
        frames
    })
}

#[test]
fn chunks_ending_in_the_start_of_the_secret_are_not_held_until_the_next_chunk() {
    let env = env();
    let frames = stream_through_proxy(&env, "/drip");
    // When each chunk (`<i:sent_us>` + the secret's first bytes) had fully arrived.
    let mut got = String::new();
    let mut late = Vec::new();
    for (at, bytes) in &frames {
        got.push_str(std::str::from_utf8(bytes).unwrap());
        for i in late.len()..DRIP_CHUNKS {
            let Some(start) = got.find(&format!("<{i}:")) else {
                break;
            };
            let rest = &got[start..];
            let close = rest.find('>').unwrap();
            if !rest[close + 1..].starts_with(&SECRET[..DRIP_TAIL]) {
                break;
            }
            let sent: u128 = rest[i.to_string().len() + 2..close].parse().unwrap();
            late.push(Duration::from_micros((at - sent) as u64));
        }
    }
    assert_eq!(late.len(), DRIP_CHUNKS, "{got}");
    // Before the deadline, every chunk but the last arrived one interval (200 ms) late.
    for (i, l) in late.iter().enumerate() {
        assert!(
            *l < Duration::from_millis(100),
            "chunk {i} arrived {l:?} late: {late:?}"
        );
    }
    env.assert_upstream_got_the_credential("/drip");
    assert_eq!(env.audit_line("/drip")["outcome"], "ok");
}

#[test]
fn a_secret_split_across_chunks_200ms_apart_is_never_delivered_whole() {
    let env = env();
    let frames = stream_through_proxy(&env, "/drip-split");
    let body: String = frames
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(!body.contains(SECRET), "{body}");
    assert_eq!(body, format!("token {}[REDACTED] end", &SECRET[..10]));
    env.assert_upstream_got_the_credential("/drip-split");
    assert_eq!(env.audit_line("/drip-split")["outcome"], "ok");
}
