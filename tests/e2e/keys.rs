//! Signing keys for many replicas: key ids, rotation while serving, and verify-only replicas
//! fed a JWKS or PEM public-key file.

use std::time::Duration;

use crate::common::*;
use base64::Engine;

fn kid_of_token(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap().to_string()
}

#[test]
fn rotation_while_serving_keeps_old_tokens_valid_until_their_key_is_dropped() {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let old = home.issue("bot", &[]);
    let proxy = home.serve(&[]);
    let url = home.api_url("/repos/acme/backend/issues");
    assert_eq!(home.curl(&proxy, &old, &[], &url).status, 200);

    home.run_ok(&["keys", "rotate"]);
    let new = home.issue("bot", &[]);
    assert_ne!(kid_of_token(&old), kid_of_token(&new));
    // The running proxy learns the new key within a second; the old token still works.
    assert!(within(Duration::from_secs(1), || home
        .curl(&proxy, &new, &[], &url)
        .status
        == 200));
    assert_eq!(home.curl(&proxy, &old, &[], &url).status, 200);

    // An agent holding a tunnel opened with the old token: retiring the key must end it too.
    let script = r#"
import sys, time, requests
s = requests.Session()
assert s.get(sys.argv[1], timeout=10).status_code == 200
print("open", flush=True)
sys.stdin.readline()
deadline = time.time() + 3
while time.time() < deadline:
    r = s.get(sys.argv[1], timeout=10)
    if r.status_code == 403:
        print(r.json()["reason"])
        sys.exit(0)
    time.sleep(0.05)
print("still", r.status_code)
"#;
    let mut py = std::process::Command::new("python3")
        .args(["-c", script, &url])
        .env("HTTPS_PROXY", proxy.url_with(&old))
        .env("REQUESTS_CA_BUNDLE", home.latchkey_ca())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "open");

    // Keeping only the newest key retires the old one: its tokens are refused.
    home.run_ok(&["keys", "rotate", "--keep", "1"]);
    std::io::Write::write_all(py.stdin.as_mut().unwrap(), b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "token_revoked",
        "the open tunnel outlived its retired key"
    );
    assert!(py.wait().unwrap().success());
    assert!(within(Duration::from_secs(1), || home
        .curl(&proxy, &old, &[], &url)
        .connect_status
        == 407));
    let newest = home.issue("bot", &[]);
    assert!(within(Duration::from_secs(1), || home
        .curl(&proxy, &newest, &[], &url)
        .status
        == 200));
}

#[test]
fn a_verify_only_replica_accepts_tokens_from_the_issuer_by_jwks_or_pem() {
    let issuer = Home::new();
    issuer.standard_policy();
    issuer.set_secret("github", SECRET);
    let token = issuer.issue("bot", &[]);
    let jwks = issuer.run_ok(&["keys", "show"]);
    let v: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(v["keys"][0]["kid"], kid_of_token(&token));
    assert_eq!(v["keys"][0]["crv"], "Ed25519");
    assert!(!jwks.contains("PRIVATE"));
    let jwks_file = issuer.path().join("exported-jwks.json");
    std::fs::write(&jwks_file, &jwks).unwrap();

    for source in [jwks_file, issuer.state().join("signing.pub")] {
        // The replica runs from the same policies and store but verifies with the file only.
        let source_text = source.display().to_string();
        let replica = issuer.serve(&["--verify-keys", &source_text]);
        let r = issuer.curl(
            &replica,
            &token,
            &[],
            &issuer.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.status, 200, "{source:?}: {r:?}");
        // A token of another latchkey is refused by the replica.
        let stranger = Home::new();
        stranger.standard_policy();
        let foreign = stranger.issue("bot", &[]);
        let r = issuer.curl(
            &replica,
            &foreign,
            &[],
            &issuer.api_url("/repos/acme/backend/issues"),
        );
        assert_eq!(r.connect_status, 407);
    }
}

#[test]
fn a_broken_verify_keys_file_is_a_clear_startup_error() {
    let home = Home::new();
    home.standard_policy();
    let bad = home.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"keys":[{"kty":"RSA","crv":"","x":"","kid":"k"}]}"#,
    )
    .unwrap();
    let out = home.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--verify-keys",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json"), "{err}");
    assert!(!err.contains("panicked"));
}
