//! The per-request cost of a credential kind on the hot path: `Credentials::resolve` (the
//! secret store lookup, one `stat` when unchanged, and the built-credential cache) followed by
//! `Credential::apply` (strip, rebuild, inject), as `proxy::request::forward` runs them.
//!
//! - `credential/static`: a stored value.
//! - `credential/oauth2_cached`: an OAuth connection whose access token is cached and fresh
//!   (the common case: one atomic load and a clock read more than `static`).
//! - `credential/oauth2_per_user_cached`: the same through a `per_user` route (the `obo` user's
//!   connection name is built per request).
//!
//! Budget: an `oauth2` cache hit costs at most 1 µs more than `static`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Method, Request};
use http_body_util::BodyExt;
use latchkey::auth::Claims;
use latchkey::authority::Authority;
use latchkey::credential::endpoint::Endpoints;
use latchkey::credential::{serving_kinds, Credentials, Outgoing, Runtime};
use latchkey::inject::Rewrite;
use latchkey::metrics::Metrics;
use latchkey::policy::{AgentPolicy, Grant, Scheme};
use latchkey::secrets::{typed, Secret, SecretStore, Secrets};

const POLICY: &str = r#"agent = "bench"

[[routes]]
id = "static"
host = "api.github.com"
methods = ["GET"]
paths = ["/static/**"]
credential = "github"
inject = { header = "authorization", value = "Bearer {secret}" }

[[routes]]
id = "oauth"
host = "api.github.com"
methods = ["GET"]
paths = ["/oauth/**"]
credential = "acme"
inject = { header = "authorization", value = "Bearer {secret}" }

[[routes]]
id = "mine"
host = "api.github.com"
methods = ["GET"]
paths = ["/mine/**"]
credential = "acme"
per_user = true
inject = { header = "authorization", value = "Bearer {secret}" }
"#;

fn connection_doc(user: Option<&str>) -> String {
    let expires = chrono::Utc::now() + chrono::Duration::hours(1);
    let refresh = chrono::Utc::now() + chrono::Duration::minutes(55);
    let fmt =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    format!(
        "kind = \"oauth2\"\nconnection = \"acme\"\n{}token_url = \"https://auth.example.com/token\"\nclient_id = \"c\"\naccess_token_expires_at = \"{}\"\naccess_token_refresh_at = \"{}\"\n[secret]\nclient_secret = \"cs-0123456789\"\nrefresh_token = \"rt-0123456789abcdef\"\naccess_token = \"at-R4nd0mL00k1ngT0k3nV4lue0123456789ab\"\n",
        user.map(|u| format!("user = \"{u}\"\n")).unwrap_or_default(),
        fmt(expires),
        fmt(refresh)
    )
}

fn agent_request(uri: &str) -> http::request::Parts {
    Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header("host", "api.github.com")
        .header("user-agent", "claude-code/1.0.0")
        .header("accept", "application/json")
        .header("authorization", "Bearer agent-own-credential-1234")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn claims(obo: Option<&str>) -> Claims {
    Claims {
        iss: "latchkey".into(),
        aud: "latchkey-proxy".into(),
        sub: "bench".into(),
        jti: "j".into(),
        iat: 0,
        exp: u64::MAX / 2,
        nbf: None,
        obo: obo.map(str::to_owned),
        task: None,
        routes: None,
        kid: None,
    }
}

fn kinds(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SecretStore::open_with_key(dir.path(), [7u8; 32]).expect("store");
    store
        .set(
            "github",
            Secret::new(b"ghp_R4nd0mL00k1ngT0k3nV4lue0123456789ab".to_vec()),
        )
        .expect("set");
    store
        .set("acme", typed::encode(&connection_doc(None)))
        .expect("set");
    store
        .set(
            "acme.user.alice",
            typed::encode(&connection_doc(Some("alice"))),
        )
        .expect("set");
    let secrets = Arc::new(Secrets::File(Box::new(store)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let runtime = rt.block_on(async {
        Arc::new(Runtime {
            endpoints: Arc::new(Endpoints::new(&[], Duration::from_secs(5)).expect("client")),
            secrets: secrets.clone(),
            redis: None,
            metrics: Arc::new(Metrics::default()),
            wait: Duration::from_secs(5),
        })
    });
    let credentials = Credentials::new(secrets, serving_kinds(runtime, None));
    let policy = AgentPolicy::from_toml(Path::new("bench.toml"), POLICY).expect("policy");
    let github = Authority::parse("api.github.com", Some(443)).expect("authority");
    let anyone = claims(None);
    let alice = claims(Some("alice"));

    let mut group = c.benchmark_group("credential");
    for (name, path, who) in [
        ("static", "/static/repos", &anyone),
        ("oauth2_cached", "/oauth/repos", &anyone),
        ("oauth2_per_user_cached", "/mine/repos", &alice),
    ] {
        let allowed = policy
            .decide(Scheme::Https, &github, &Method::GET, path, Grant(None))
            .expect("allowed");
        let rewrite = Rewrite {
            scheme: Scheme::Https,
            authority: &github,
            path,
            query: None,
            allowed: &allowed,
        };
        let one = || async {
            let mut parts = agent_request(path);
            let credential = credentials
                .resolve(allowed.route(), who)
                .await
                .expect("resolved")
                .expect("credentialed");
            let applied = credential
                .apply(Outgoing {
                    parts: &mut parts,
                    rewrite: &rewrite,
                    body: http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                    claims: who,
                    prepared: credentials.prepared(),
                })
                .await
                .expect("applied");
            (parts, applied.detail)
        };
        // Sanity: our credential replaced the agent's.
        let (parts, _) = rt.block_on(one());
        let sent = parts.headers["authorization"].to_str().unwrap().to_owned();
        assert!(
            sent.starts_with("Bearer ") && !sent.contains("agent-own"),
            "{sent}"
        );
        group.bench_function(name, |b| {
            b.iter_batched(|| (), |()| rt.block_on(one()), BatchSize::SmallInput)
        });
    }
    group.finish();
}

criterion_group!(benches, kinds);
criterion_main!(benches);
