//! Audit per replica: every line names its replica, and `--audit-log -` streams a verifiable
//! chain to standard output for log shippers.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use crate::common::*;

#[test]
fn every_audit_line_names_its_replica() {
    let (home, proxy, token) = ready_serving(&["--replica-id", "replica-a"]);
    let r = home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    assert_eq!(r.status, 200);
    let lines = home.wait_audit(2);
    assert!(
        lines.iter().all(|l| l["replica"] == "replica-a"),
        "{lines:?}"
    );
    drop(proxy);
    // Without the flag, the host name.
    let proxy = home.serve(&[]);
    home.curl(
        &proxy,
        &token,
        &[],
        &home.api_url("/repos/acme/backend/issues"),
    );
    let lines = home.wait_audit(4);
    let default = lines[3]["replica"].as_str().unwrap().to_string();
    assert!(!default.is_empty() && default != "replica-a");
}

#[test]
fn audit_log_dash_streams_a_verifiable_chain_to_stdout() {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let mut child = home
        .cmd()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--upstream-ca",
        ])
        .arg(&home.upstream_ca)
        .args([
            "--resolve",
            &format!("{API_HOST}:{}:127.0.0.1", home.https_port()),
        ])
        .args(["--audit-log", "-", "--replica-id", "shipper"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The listening line goes to stderr: stdout carries audit lines only.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        if let Some(a) = line.trim().strip_prefix("latchkey listening on ") {
            addr = Some(a.to_string());
            break;
        }
        line.clear();
    }
    let addr = addr.expect("serve announced its address on stderr");
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = err.read_to_string(&mut sink);
    });
    for _ in 0..3 {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--proxy"])
            .arg(format!("http://agent:{token}@{addr}"))
            .arg("--cacert")
            .arg(home.latchkey_ca())
            .arg(home.api_url("/repos/acme/backend/issues"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout holds only audit JSON lines"))
        .collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(lines.iter().all(|l| l["replica"] == "shipper"));
    assert!(!stdout.contains(SECRET) && !stdout.contains(&token));
    let shipped = home.path().join("shipped.jsonl");
    std::fs::write(&shipped, &stdout).unwrap();
    let out = home.run(&["audit", "verify", "--audit-log", shipped.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!home.state().join("audit.jsonl").exists());
}
