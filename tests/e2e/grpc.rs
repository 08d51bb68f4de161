//! gRPC through latchkey with the real grpcio client and server (PyPI `grpcio`, hand-written
//! generic handlers in `tests/python/grpc_echo.py`): the server on loopback with the test
//! upstream's certificate, the client through latchkey as its HTTPS proxy. Every status must
//! reach the client as the server sent it, on a route that injects a credential (its answers
//! pass through redaction) and on one that does not.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpc_echo.py")
}

/// Routes for the gRPC server on `port`: `cred.Echo` injects the `github` credential as
/// `authorization`, `open.Echo` injects nothing.
fn grpc_routes(port: u16) -> String {
    format!(
        r#"
[[routes]]
id = "grpc-cred"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/cred.Echo/*"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "grpc-open"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/open.Echo/*"]
"#
    )
}

fn run_client(home: &Home, proxy: &Proxy, token: &str, port: u16, service: &str) -> Value {
    let out = Command::new("python3")
        .arg(script())
        .arg("client")
        .arg(format!("{API_HOST}:{port}"))
        .arg(service)
        .env("https_proxy", proxy.url_with(token))
        .env_remove("grpc_proxy")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env("no_proxy", "")
        .env("NO_PROXY", "")
        .env("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", home.latchkey_ca())
        .output()
        .expect("python3 is installed");
    assert!(
        out.status.success(),
        "grpc client failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

#[test]
fn every_grpc_status_reaches_the_client_with_and_without_a_credential() {
    let home = Home::new();
    let server = PyServer::start(&home, "grpc_echo.py", "grpcio");
    home.standard_policy_with(&grpc_routes(server.port));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let pin = format!("{API_HOST}:{}:127.0.0.1", server.port);
    let proxy = home.serve(&["--resolve", &pin]);

    for service in ["cred.Echo", "open.Echo"] {
        let r = run_client(&home, &proxy, &token, server.port, service);
        assert_eq!(r["ok"]["code"], "OK", "{service}: {r}");
        assert_eq!(r["ok"]["body"], "echo:hi", "{service}");
        // Trailers after data pass through.
        assert_eq!(r["ok"]["trailers"]["x-trailer"], "after-data", "{service}");
        // The regression: a trailers-only answer (one HEADERS frame with END_STREAM) used to
        // arrive as headers plus an empty DATA frame on credentialed routes, and the client
        // reported `UNKNOWN: Stream removed` instead of the server's status.
        assert_eq!(r["denied"]["code"], "PERMISSION_DENIED", "{service}: {r}");
        assert_eq!(r["denied"]["details"], "no access to this resource");
        assert_eq!(r["stream_then_fail"]["code"], "FAILED_PRECONDITION");
        assert_eq!(r["stream_then_fail"]["got"], serde_json::json!(["first"]));
        assert_eq!(
            r["server_stream"]["got"],
            serde_json::json!(["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"]),
            "{service}"
        );
        assert_eq!(
            r["bidi"]["got"],
            serde_json::json!(["bidi:a", "bidi:b", "bidi:c"]),
            "{service}"
        );
        assert_eq!(r["deadline"]["code"], "DEADLINE_EXCEEDED", "{service}: {r}");
        assert_eq!(r["cancel"]["code"], "CANCELLED", "{service}: {r}");
        assert_eq!(r["cancel"]["got"], serde_json::json!(["tick-0", "tick-1"]));
    }

    // What the server received: the injected credential on `cred.Echo` only, the agent's own
    // never, and the agent's other metadata untouched.
    let calls = eventually(Duration::from_secs(20), "both Endless calls end", || {
        let calls = server.calls();
        let ended = calls
            .iter()
            .filter(|c| c["method"] == "EndlessEnded")
            .count();
        (ended == 2).then_some(calls)
    });
    for c in calls.iter().filter(|c| c["method"] == "EndlessEnded") {
        assert_eq!(c["cancelled"], true, "the cancellation reached the server");
    }
    let with_md: Vec<&Value> = calls
        .iter()
        .filter(|c| c.get("metadata").is_some())
        .collect();
    assert_eq!(with_md.len(), 14, "{calls:?}");
    let bearer = format!("Bearer {SECRET}");
    for c in &with_md {
        let text = c.to_string();
        assert!(!text.contains(AGENT_OWN), "{text}");
        assert!(!text.contains(&token), "{text}");
        assert_eq!(c["metadata"]["x-case"], "grpc");
    }
    let cred = with_md
        .iter()
        .filter(|c| c["metadata"]["authorization"] == bearer.as_str())
        .count();
    let none = with_md
        .iter()
        .filter(|c| c["metadata"].get("authorization").is_none())
        .count();
    assert_eq!((cred, none), (7, 7), "{with_md:?}");

    // One line per call, each on its route; the cut-short calls say so.
    let lines = eventually(Duration::from_secs(20), "14 gRPC audit lines", || {
        let lines: Vec<Value> = home
            .audit()
            .into_iter()
            .filter(|l| l["method"] == "POST")
            .collect();
        (lines.len() >= 14).then_some(lines)
    });
    assert_eq!(lines.len(), 14, "{lines:?}");
    for l in &lines {
        let path = l["path"].as_str().unwrap();
        let (route, credential) = if path.starts_with("/cred.Echo/") {
            ("grpc-cred", Value::from("github"))
        } else {
            ("grpc-open", Value::Null)
        };
        assert_eq!(l["route"], route, "{l}");
        assert_eq!(l["credential"], credential, "{l}");
        assert_eq!(l["decision"], "allow", "{l}");
        if path.ends_with("/Slow") {
            // The deadline passes for both ends at once: either the client's reset arrives
            // first (`cancelled`) or the server's own DEADLINE_EXCEEDED answer does (`ok`,
            // a complete HTTP exchange carrying a gRPC error).
            assert!(l["outcome"] == "cancelled" || l["outcome"] == "ok", "{l}");
        } else if path.ends_with("/Endless") {
            assert_eq!(l["outcome"], "cancelled", "{l}");
        } else {
            assert_eq!(l["outcome"], "ok", "{l}");
            assert_eq!(l["status"], 200, "{l}");
        }
    }
}
