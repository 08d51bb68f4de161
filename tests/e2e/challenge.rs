//! Clients that send proxy credentials only after a 407 challenge (git through libcurl with
//! `CURLAUTH_ANY`, Java): each connection starts with a request without credentials. Its line
//! says `outcome: challenged` (still `decision: deny`, `reason: token_missing`, status 407),
//! and `logs tail --decision deny` leaves such lines out unless `--challenges` is given, so
//! real refusals are not buried.

use serde_json::Value;

use crate::common::*;

#[test]
fn git_clone_through_run_records_its_407_challenges_as_challenges() {
    let home = Home::new();
    let port = home.https_port();
    home.write_policy(
        "bot.toml",
        &format!(
            r#"agent = "bot"

[[routes]]
id = "git-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/acme/empty.git/info/refs"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    );
    home.set_secret("github", SECRET);
    let proxy = home.serve(&[]);
    let git_home = home.path().join("git-home");
    std::fs::create_dir_all(&git_home).unwrap();
    let dest = home.path().join("clone");
    let repo = format!("https://{API_HOST}:{port}/acme/empty.git");
    let out = home
        .cmd()
        .args(["run", "--agent", "bot", "--", "git", "clone", &repo])
        .arg(&dest)
        .env("HOME", &git_home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(dest.join(".git").is_dir());
    let seen = home.upstream.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
    }

    // A real refusal next to the challenges: a wrong token.
    let c = home.curl(
        &proxy,
        "not-a-token",
        &[],
        &home.api_url("/acme/empty.git/info/refs"),
    );
    assert_eq!(c.connect_status, 407, "{c:?}");

    let audit = eventually(std::time::Duration::from_secs(20), "the lines", || {
        let a = home.audit();
        a.iter()
            .any(|l| l["reason"] == "token_invalid")
            .then_some(a)
    });
    let challenges: Vec<&Value> = audit
        .iter()
        .filter(|l| l["outcome"] == "challenged")
        .collect();
    assert!(
        !challenges.is_empty(),
        "git sends credentials only after a 407: {audit:?}"
    );
    for l in &challenges {
        assert_eq!(l["method"], "CONNECT", "{l}");
        assert_eq!(l["status"], 407, "{l}");
        assert_eq!(l["decision"], "deny", "{l}");
        assert_eq!(l["reason"], "token_missing", "{l}");
    }
    // Each challenge was followed by the same connection's authenticated CONNECT.
    let opened = audit
        .iter()
        .filter(|l| l["method"] == "CONNECT" && l["decision"] == "allow")
        .count();
    assert!(opened >= challenges.len(), "{audit:?}");
    assert!(audit
        .iter()
        .any(|l| l["route"] == "git-read" && l["decision"] == "allow" && l["status"] == 200));
    let refusal = audit
        .iter()
        .find(|l| l["reason"] == "token_invalid")
        .unwrap();
    assert_eq!(refusal["outcome"], "denied", "{refusal}");

    // `logs tail --decision deny`: the refusal, not the challenges.
    let denies = home.run_ok(&["logs", "tail", "--decision", "deny", "--json"]);
    let denies: Vec<Value> = denies
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(denies.len(), 1, "{denies:?}");
    assert_eq!(denies[0]["reason"], "token_invalid");
    let all = home.run_ok(&[
        "logs",
        "tail",
        "--decision",
        "deny",
        "--challenges",
        "--json",
    ]);
    assert_eq!(all.lines().count(), challenges.len() + 1, "{all}");
    // The human view marks them as challenges, not refusals.
    let human = home.run_ok(&["logs", "tail"]);
    assert_eq!(
        human.lines().filter(|l| l.contains("AUTH?")).count(),
        challenges.len(),
        "{human}"
    );
    // The chain holds.
    home.run_ok(&["audit", "verify"]);
}
