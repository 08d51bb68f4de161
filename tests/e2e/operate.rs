//! Operating a running proxy: hot policy reload (good and broken edits) and the admin
//! listener's health and metrics.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn ready() -> (Home, Proxy, String) {
    ready_with(&[])
}

fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

fn bot_policy(home: &Home, paths: &str) -> String {
    format!(
        "agent = \"bot\"\n[[routes]]\nid = \"issues-read\"\nhost = \"{API_HOST}:{}\"\nmethods = [\"GET\"]\npaths = [{paths}]\ncredential = \"github\"\ninject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n",
        home.https_port()
    )
}

#[test]
fn a_policy_edit_takes_effect_within_a_second_and_a_broken_edit_keeps_the_last_good() {
    let (home, proxy, token) = ready();
    let url = home.api_url("/new/path");
    assert_eq!(home.curl(&proxy, &token, &[], &url).status, 403);

    home.write_policy("bot.toml", &bot_policy(&home, "\"/new/**\""));
    assert!(
        within(Duration::from_secs(3), || home
            .curl(&proxy, &token, &[], &url)
            .status
            == 200),
        "the edited policy was not in force in time (the proxy polls every 250 ms; the bound \
         also covers curl's own latency on a loaded machine)"
    );

    // A broken edit: the last good policy stays, and the log names file, line and field.
    home.write_policy(
        "bot.toml",
        "agent = \"bot\"\n[[routes]]\nid = \"x\"\nmethods = [\"get\"]\n",
    );
    assert!(within(Duration::from_secs(2), || proxy
        .log()
        .contains("bot.toml:")));
    assert_eq!(home.curl(&proxy, &token, &[], &url).status, 200);

    // Removing the file removes the agent's access.
    std::fs::remove_file(home.path().join("policies/bot.toml")).unwrap();
    assert!(within(Duration::from_secs(1), || {
        home.curl(&proxy, &token, &[], &url).connect_status == 403
    }));
}

#[test]
fn a_new_policy_file_is_picked_up_and_an_open_tunnel_survives_reload() {
    let (home, proxy, token) = ready();
    home.write_policy(
        "helper.toml",
        &format!(
            "agent = \"helper\"\n[[routes]]\nid = \"any\"\nhost = \"{API_HOST}:{}\"\nmethods = [\"GET\"]\npaths = [\"/**\"]\n",
            home.https_port()
        ),
    );
    assert!(within(Duration::from_secs(3), || home
        .run(&["token", "issue", "--agent", "helper"])
        .status
        .success()));
    let helper = home.issue("helper", &[]);
    let mut last = None;
    let ok = within(Duration::from_secs(3), || {
        let r = home.curl(&proxy, &helper, &[], &home.api_url("/x"));
        let done = r.status == 200;
        last = Some(r);
        done
    });
    assert!(
        ok,
        "the new agent was not served: {last:?}\n{}",
        proxy.log()
    );
    // A keep-alive tunnel open across a reload keeps working.
    let script = r#"
import sys, requests, time, pathlib
s = requests.Session()
assert s.get(sys.argv[1], timeout=10).status_code == 200
pathlib.Path(sys.argv[2]).write_text(pathlib.Path(sys.argv[2]).read_text() + "\n# touched\n")
time.sleep(0.6)
assert s.get(sys.argv[1], timeout=10).status_code == 200
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(home.api_url("/repos/acme/backend/issues"))
        .arg(home.path().join("policies/bot.toml"))
        .env("HTTPS_PROXY", proxy.url_with(&token))
        .env("REQUESTS_CA_BUNDLE", home.latchkey_ca())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn healthz_and_metrics_report_requests_latency_certs_and_tunnels() {
    let (home, proxy, token) = ready();
    let admin = proxy.admin_addr.expect("admin listener enabled");
    let (code, body) = get(&format!("http://{admin}/healthz"));
    assert_eq!(code, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    for _ in 0..3 {
        home.curl(
            &proxy,
            &token,
            &[],
            &home.api_url("/repos/acme/backend/issues"),
        );
    }
    home.curl(&proxy, &token, &[], &home.api_url("/nope"));
    let (code, text) = get(&format!("http://{admin}/metrics"));
    assert_eq!(code, 200);
    assert!(
        text.contains(
            "latchkey_requests_total{agent=\"bot\",route=\"issues-read\",decision=\"allow\",outcome=\"ok\",reason=\"\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains("decision=\"deny\",outcome=\"denied\",reason=\"no_route\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("latchkey_upstream_duration_seconds_count 3"),
        "{text}"
    );
    assert!(
        text.contains("latchkey_cert_cache_misses_total 1"),
        "{text}"
    );
    assert!(text.contains("latchkey_cert_cache_hits_total 3"), "{text}");
    assert!(text.contains("latchkey_active_tunnels "), "{text}");
    assert!(!text.contains(SECRET) && !text.contains(&token));
    let (code, _) = get(&format!("http://{admin}/other"));
    assert_eq!(code, 404);
}
