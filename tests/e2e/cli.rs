//! The command line as a user meets it: every command on real files in a temp dir, every bad
//! input answered with one clear sentence and a non-zero exit, never a panic or a secret.

use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};

use crate::common::*;

fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_creates_a_private_key_and_is_idempotent() {
    let home = Home::new();
    let first = home.run_ok(&["ca", "init"]);
    assert!(first.contains("created"), "{first}");
    assert_eq!(mode(&home.path().join("certs/ca.key")), 0o600);
    let second = home.run_ok(&["ca", "init"]);
    assert!(second.contains("already exists"));
    let shown = home.run_ok(&["ca", "show"]);
    assert!(shown.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!shown.contains("PRIVATE KEY"));
}

#[test]
fn secrets_are_encrypted_listed_by_name_and_never_printed() {
    let home = Home::new();
    home.set_secret("github", SECRET);
    home.set_secret("slack", "xoxb-another-secret-value");
    let list = home.run_ok(&["secret", "list"]);
    assert!(list.contains("github") && list.contains("slack"), "{list}");
    assert!(!list.contains(SECRET));
    for entry in std::fs::read_dir(home.state()).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(SECRET),
            "{} holds the plaintext secret",
            p.display()
        );
    }
    assert_eq!(mode(&home.state().join("secrets.enc")), 0o600);
    assert_eq!(mode(&home.state().join("master.key")), 0o600);
    home.run_ok(&["secret", "rm", "slack"]);
    let list = home.run_ok(&["secret", "list"]);
    assert!(!list.contains("slack"));
    assert_clean_failure(
        &home.run(&["secret", "rm", "slack"]),
        "no secret named slack",
    );
}

#[test]
fn secret_set_refuses_empty_input_and_bad_names() {
    let home = Home::new();
    let out = home
        .cmd()
        .args(["secret", "set", "x"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_clean_failure(&out, "empty");
    let out = home
        .cmd()
        .args(["secret", "set", "bad name/../x"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn secret_set_with_a_kind_checks_the_document_before_storing_it() {
    let home = Home::new();
    let value = "sekrit-value-771";
    // An unknown kind is named, with the kinds that exist; the value is not.
    let out = home.secret_set(
        "pigeon",
        Some("carrier_pigeon"),
        format!("kind = \"carrier_pigeon\"\n[secret]\nkey = \"{value}\"\n").as_bytes(),
    );
    assert_clean_failure(&out, "carrier_pigeon");
    assert!(stderr(&out).contains("static"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(value));
    // A document of another kind than declared.
    let out = home.secret_set("x", Some("oauth2"), b"kind = \"hmac\"\n");
    assert_clean_failure(&out, "--kind");
    // Broken TOML: where, never what.
    let out = home.secret_set(
        "x",
        Some("oauth2"),
        format!("kind = \"oauth2\"\n[secret]\nclient_secret = \"{value}").as_bytes(),
    );
    assert_clean_failure(&out, "not valid TOML (line 3)");
    assert!(!stderr(&out).contains(value));
    // A static value that looks like a typed document could be mistaken for one: refused.
    let out = home.secret_set(
        "x",
        Some("static"),
        format!("#latchkey-credential v1\nkind = \"static\"\n{value}").as_bytes(),
    );
    assert_clean_failure(&out, "--kind");
    assert!(!stderr(&out).contains(value));
    // Nothing was stored by any of them.
    let list = home.run(&["secret", "list"]);
    assert!(list.status.success());
    assert!(stdout(&list).trim().is_empty(), "{}", stdout(&list));
}

#[test]
fn a_wrong_master_key_is_a_clear_error_not_garbage() {
    let home = Home::new();
    home.set_secret("github", SECRET);
    let out = home
        .cmd()
        .args(["secret", "list"])
        .env("LATCHKEY_MASTER_KEY", "11".repeat(32))
        .output()
        .unwrap();
    assert_clean_failure(&out, "master key");
    assert!(!stderr(&out).contains(SECRET));
}

#[test]
fn policy_check_names_file_line_and_field() {
    let home = Home::new();
    home.write_policy(
        "broken.toml",
        "agent = \"broken\"\n\n[[routes]]\nid = \"r\"\nhost = \"api.example.test\"\nmethods = [\"get\"]\npaths = [\"/x\"]\n",
    );
    home.write_policy("syntax.toml", "agent = \"syntax\"\n[[routes]\n");
    let out = home.run(&["policy", "check"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("broken.toml:6"), "{err}");
    assert!(err.contains("methods"), "{err}");
    assert!(err.contains("syntax.toml:2"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn policy_check_warns_about_missing_credentials_but_passes() {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let out = home.run(&["policy", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("not-stored"), "{}", stderr(&out));
}

#[test]
fn policy_explain_prints_the_decision_and_the_route() {
    let home = Home::new();
    home.standard_policy();
    let port = home.https_port();
    let url = format!("https://{API_HOST}:{port}/repos/acme/backend/issues/3");
    let allow = home.run(&["policy", "explain", "--agent", "bot", "GET", &url]);
    assert!(allow.status.success());
    let text = String::from_utf8_lossy(&allow.stdout);
    assert!(
        text.starts_with("allow") && text.contains("issues-read"),
        "{text}"
    );
    let deny = home.run(&["policy", "explain", "--agent", "bot", "DELETE", &url]);
    assert!(!deny.status.success());
    // DELETE on a path a GET route covers: the typed reason, not a generic one.
    assert!(
        String::from_utf8_lossy(&deny.stdout).contains("method_not_allowed"),
        "{}",
        String::from_utf8_lossy(&deny.stdout)
    );
    let bad = format!("https://{API_HOST}:{port}/a/%2e%2e/%2e%2e/x");
    let out = home.run(&["policy", "explain", "--agent", "bot", "GET", &bad]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("bad_path"));
}

#[test]
fn token_issue_prints_only_the_jwt_and_checks_agent_route_and_ttl() {
    let home = Home::new();
    home.standard_policy();
    let tok = home.issue("bot", &["--route", "issues-read", "--ttl", "30m"]);
    assert_eq!(tok.split('.').count(), 3, "{tok}");
    assert!(!tok.contains(' '));
    assert_clean_failure(
        &home.run(&["token", "issue", "--agent", "nobody"]),
        "no policy for agent",
    );
    assert_clean_failure(
        &home.run(&["token", "issue", "--agent", "bot", "--route", "nope"]),
        "has no route",
    );
    assert_clean_failure(
        &home.run(&["token", "issue", "--agent", "bot", "--ttl", "2h"]),
        "max_ttl",
    );
    assert_clean_failure(
        &home.run(&["token", "issue", "--agent", "bot", "--ttl", "soon"]),
        "not a duration",
    );
    assert_eq!(mode(&home.state().join("signing.key")), 0o600);
}

#[test]
fn serve_refuses_to_start_on_a_broken_policy() {
    let home = Home::new();
    home.write_policy("x.toml", "agent = 3\n");
    let out = home.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_clean_failure(&out, "policy");
}

#[test]
fn help_exists_for_every_command() {
    let home = Home::new();
    for cmd in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["secret", "set", "--help"],
        vec!["token", "issue", "--help"],
        vec!["token", "revoke", "--help"],
        vec!["policy", "explain", "--help"],
        vec!["logs", "tail", "--help"],
        vec!["audit", "verify", "--help"],
        vec!["ca", "init", "--help"],
    ] {
        let out = home.run(&cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}

#[test]
fn token_list_shows_live_sessions_without_tokens() {
    let home = Home::new();
    home.standard_policy();
    let t1 = home.issue(
        "bot",
        &["--on-behalf-of", "alice", "--task", "triage issues"],
    );
    let t2 = home.issue("bot", &[]);
    let out = home.run_ok(&["token", "list"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.contains("alice") && out.contains("triage issues"),
        "{out}"
    );
    assert!(!out.contains(&t1) && !out.contains(&t2));
    let jti = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    home.run_ok(&["token", "revoke", &jti]);
    let out = home.run_ok(&["token", "list"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(!out.contains(&jti));
    home.run_ok(&["token", "revoke", "--agent", "bot"]);
    let out = home.run_ok(&["token", "list", "--agent", "bot"]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn global_flags_work_after_the_subcommand_and_from_the_environment() {
    let home = Home::new();
    home.set_secret("github", SECRET);
    let state = home.state();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["secret", "list", "--state-dir"])
        .arg(&state)
        .env_remove("LATCHKEY_MASTER_KEY")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("github"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["secret", "list"])
        .env("LATCHKEY_STATE_DIR", &state)
        .env_remove("LATCHKEY_MASTER_KEY")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("github"));
}
