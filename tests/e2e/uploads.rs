//! A refused upload must reach the agent as its refusal (413 or 403 with the JSON reason),
//! whatever the client: curl over HTTP/1.1 (which sends `Expect: 100-continue`) and HTTP/2,
//! Python requests (writes the whole body before reading), httpx over HTTP/1.1 and HTTP/2.
//! Before, requests saw an SSL EOF, curl over h2 a stream error, httpx over h2 hung, and
//! HTTP/1.1 agents got `100 Continue` before the refusal.

use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn upload_env() -> (Home, Proxy, String, std::path::PathBuf) {
    let home = Home::new();
    let port = home.https_port();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "small-upload"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/upload"]
max_body = "1MiB"
"#
    ));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let file = home.path().join("five-mb.bin");
    std::fs::write(&file, vec![b'z'; 5 * 1024 * 1024]).unwrap();
    (home, proxy, token, file)
}

#[test]
fn a_refused_5mb_upload_reaches_every_client_as_its_refusal() {
    let (home, proxy, token, file) = upload_env();
    let data = format!("@{}", file.display());
    let mut expected_lines = 0;
    for (path, status, reason) in [
        ("/upload", 413, "body_too_large"),
        ("/not-allowed", 403, "no_route"),
    ] {
        let url = home.api_url(path);
        for version in ["--http1.1", "--http2"] {
            let c = home.curl(
                &proxy,
                &token,
                &[version, "-X", "POST", "--data-binary", &data],
                &url,
            );
            assert_eq!(c.status, status, "curl {version} {path}: {c:?}");
            assert_eq!(c.json()["reason"], reason, "curl {version} {path}");
            assert!(
                !c.headers.contains("100 Continue"),
                "curl {version} {path} was told to go on: {}",
                c.headers
            );
            expected_lines += 1;
        }
        let out = Command::new("python3")
            .arg(
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/python/upload_refused.py"),
            )
            .arg(proxy.url_with(&token))
            .arg(home.latchkey_ca())
            .arg(&url)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        for client in ["requests", "httpx_h1", "httpx_h2"] {
            assert_eq!(r[client]["status"], status, "{client} {path}: {r}");
            assert_eq!(r[client]["reason"], reason, "{client} {path}: {r}");
            expected_lines += 1;
        }
        assert_eq!(r["httpx_h2"]["version"], "HTTP/2", "{r}");
    }
    // Nothing reached the upstream.
    assert!(
        home.upstream.seen().is_empty(),
        "{:?}",
        home.upstream.seen()
    );
    let lines = eventually(std::time::Duration::from_secs(20), "every line", || {
        let l: Vec<Value> = home
            .audit()
            .into_iter()
            .filter(|l| l["method"] == "POST")
            .collect();
        (l.len() >= expected_lines).then_some(l)
    });
    assert_eq!(lines.len(), expected_lines, "{lines:?}");
    for l in &lines {
        let (status, reason) = if l["path"] == "/upload" {
            (413, "body_too_large")
        } else {
            (403, "no_route")
        };
        assert_eq!(l["status"], status, "{l}");
        assert_eq!(l["reason"], reason, "{l}");
        assert_eq!(l["decision"], "deny", "{l}");
        assert_eq!(l["outcome"], "denied", "{l}");
        // Nothing of the body went upstream (0 for refusals after policy, null before).
        assert!(l["bytes_up"].as_u64().unwrap_or(0) == 0, "{l}");
    }
}

/// The agent's side of a tunnel is read a chunk at a time while a body streams in
/// (`proxy/readahead.rs`): an upload arrives upstream byte for byte, also when the agent put
/// its TLS ClientHello in the same write as the CONNECT head (hyper has read it by then and
/// hands it back with the stream, to be read first).
#[test]
fn an_upload_through_a_tunnel_arrives_byte_for_byte_with_the_hello_sent_early() {
    use std::io::Write;
    let (home, proxy, token) = ready_with(&[]);
    let authority = format!("{API_HOST}:{}", home.https_port());
    let cfg = agent_tls_config(&home.latchkey_ca(), &[b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from(API_HOST.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut first = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    conn.write_tls(&mut first).unwrap();
    let mut sock = proxy_socket(proxy.addr);
    sock.write_all(&first).unwrap();
    let (status, head) = read_head(&mut sock).unwrap();
    assert_eq!(status, 200, "{head}");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .expect("TLS handshake in the tunnel");
    }
    let mut tls = rustls::StreamOwned::new(conn, sock);

    // Not a repeating pattern: a byte moved, dropped or doubled changes what the upstream got.
    let body: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut request = format!(
        "POST /repos/acme/backend/issues HTTP/1.1\r\nHost: {authority}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    tls.write_all(&request).unwrap();
    tls.flush().unwrap();
    let r = read_response(&mut tls).unwrap();
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let echoed: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echoed["body_len"], body.len());

    let seen = home.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_complete, Some(true));
    assert!(
        seen[0].body == body,
        "the upstream got other bytes than were sent"
    );
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    let lines = home.wait_audit(2);
    let post = lines.iter().find(|l| l["method"] == "POST").unwrap();
    assert_eq!(post["outcome"], "ok", "{post}");
    assert_eq!(post["status"], 200);
    assert_eq!(post["bytes_up"], body.len(), "{post}");
}
