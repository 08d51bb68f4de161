//! Credential injection and response redaction, the two per-request steps that touch secrets.
//!
//! Measures:
//! - `inject/apply_header`: `inject::apply` on a realistic agent request (15 headers, among
//!   them hop-by-hop ones, a `Connection`-listed one, `Proxy-Authorization`, the agent's own
//!   `Authorization` and an `x-latchkey-*` spoof) for a route that injects
//!   `authorization: Bearer {secret}`: strip, secret store lookup (one `stat` to notice a changed
//!   file), URI rebuild, header build. The `Allowed` comes from a compiled `AgentPolicy`.
//! - `inject/apply_query`: the same for a route that injects the secret as a query parameter
//!   (the agent's query string is rewritten).
//! - `redact/64KiB_no_match`: `RedactBody` passing a 64 KiB response chunk that contains no
//!   credential (the common case) with the needles `apply` produced; reported as throughput.
//!
//! - `redact_latency/sse_event`, `redact_latency/raw_16KiB_chunk`: the latency `RedactBody`
//!   adds to one chunk of a token stream (a ~60-byte SSE event) and of a chunked download.
//! - `redact_latency/held_tail_released_at_deadline`: a chunk ending in the secret's first
//!   bytes with the upstream then silent: how long until the agent has all of it (the
//!   `redact::HOLD` deadline, 5 ms, plus timer granularity).
//! - `redact_gzip/1MiB_decoded_and_scanned`: a body the upstream gzip-compressed despite
//!   `identity`, decoded (`proxy::decode`) and scanned, against the same MiB uncompressed.
//! - `tripwire/1MiB_json_scan`: the exfiltration tripwire's body scan (`tripwire::BodyScan`,
//!   as `LimitedBody` runs it) over 1 MiB of JSON-like text in 16 KiB chunks, with the
//!   needles of 5 stored credentials (every encoding) plus the credential-format prefixes,
//!   nothing found; the text is deliberately full of near misses (`disk-`, `AKIA-like`) that
//!   make the search stop and check. Reported as throughput. Measured: 1.95 ms per MiB
//!   (~510 MiB/s) on the 2-core dev box; budget: at most 2.5 ms per MiB, so the scan of an
//!   agent's upload stays well below the network's cost of carrying it.
//!
//! Budget: `apply` stays under 5 µs (it runs once per forwarded request; the `stat` in the
//! store lookup is most of it). Redaction of a clean chunk runs at memory-scan speed, at least
//! 2 GB/s, so a 100 MiB download through a credentialed route is not bounded by it; a chunk
//! that holds nothing back gains under 2 µs; a held tail waits at most about 6 ms.

use std::hint::black_box;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{Method, Request};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use latchkey::authority::Authority;
use latchkey::inject::{apply, Rewrite};
use latchkey::policy::{AgentPolicy, Grant, Scheme};
use latchkey::redact::RedactBody;
use latchkey::secrets::{Secret, SecretStore};

const POLICY: &str = r#"agent = "bench"

[[routes]]
id = "github-read"
host = "api.github.com"
methods = ["GET"]
paths = ["/repos/*/*/pulls/*/comments"]
credential = "github"
inject = { header = "authorization", value = "Bearer {secret}" }

[[routes]]
id = "search"
host = "api.example.com"
methods = ["GET"]
paths = ["/v1/search"]
credential = "example"
inject = { query = "api_key" }
"#;

const PATH: &str = "/repos/latchkey/latchkey/pulls/42/comments";

/// What a typical HTTP client library sends, plus the things `apply` must strip.
fn agent_request(uri: &str) -> http::request::Parts {
    let (parts, ()) = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header("host", "api.github.com")
        .header(
            "user-agent",
            "claude-code/1.0.0 (linux; x86_64) node/22.3.0",
        )
        .header("accept", "application/vnd.github+json")
        .header("accept-encoding", "gzip, deflate, br")
        .header("accept-language", "en-US,en;q=0.9")
        .header("x-github-api-version", "2022-11-28")
        .header("content-type", "application/json")
        .header("cache-control", "no-cache")
        .header("x-request-id", "5f0c6a2e-8c1d-4c7b-9a8e-1f2d3c4b5a69")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("connection", "keep-alive, x-trace-hop")
        .header("x-trace-hop", "1")
        .header(
            "proxy-authorization",
            "Basic YWdlbnQ6ZXlKaGJHY2lPaUpGWkVSVFFTSjkuLi4=",
        )
        .header("authorization", "Bearer agent-own-credential-1234")
        .header("x-latchkey-route", "spoofed")
        .body(())
        .expect("request")
        .into_parts();
    parts
}

fn injection(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SecretStore::open_with_key(dir.path(), [7u8; 32]).expect("store");
    store
        .set(
            "github",
            Secret::new(b"ghp_R4nd0mL00k1ngT0k3nV4lue0123456789ab".to_vec()),
        )
        .expect("set secret");
    store
        .set(
            "example",
            Secret::new(b"sk-live_9f8e7d6c5b4a3210/+=key".to_vec()),
        )
        .expect("set secret");
    let policy = match AgentPolicy::from_toml(Path::new("bench.toml"), POLICY) {
        Ok(p) => p,
        Err(d) => panic!("bench policy invalid: {}", d[0]),
    };
    let github = Authority::parse("api.github.com", Some(443)).expect("authority");
    let allowed = policy
        .decide(Scheme::Https, &github, &Method::GET, PATH, Grant(None))
        .expect("allowed");
    let example = Authority::parse("api.example.com", Some(443)).expect("authority");
    let allowed_query = policy
        .decide(
            Scheme::Https,
            &example,
            &Method::GET,
            "/v1/search",
            Grant(None),
        )
        .expect("allowed");

    // The proxy looks the credential up (file store: one stat, from memory when unchanged)
    // and hands it to `apply`; both are on the request path, so both are measured.
    let lookup = |name: &str| store.get(name).expect("store readable");
    let github_secret = || lookup(allowed.route().credential().expect("credentialed"));
    let example_secret = || lookup(allowed_query.route().credential().expect("credentialed"));

    // Prebuilt values per route and secret, as the proxy keeps them.
    let prepared = latchkey::inject::PreparedCache::default();

    // Sanity: the agent's credential is gone and ours is there.
    let mut parts = agent_request(PATH);
    let injected = apply(
        &mut parts,
        &Rewrite {
            scheme: Scheme::Https,
            authority: &github,
            path: PATH,
            query: Some("per_page=100&page=2"),
            allowed: &allowed,
        },
        github_secret(),
        &prepared,
    )
    .expect("apply");
    assert_eq!(
        parts.headers["authorization"],
        "Bearer ghp_R4nd0mL00k1ngT0k3nV4lue0123456789ab"
    );
    assert!(parts.headers.get("proxy-authorization").is_none());
    assert!(parts.headers.get("x-trace-hop").is_none());
    let needles = injected.needles.expect("needles for a credentialed route");

    let mut group = c.benchmark_group("inject");
    group.bench_function("apply_header", |b| {
        b.iter_batched(
            || agent_request(PATH),
            |mut parts| {
                let out = apply(
                    &mut parts,
                    &Rewrite {
                        scheme: Scheme::Https,
                        authority: black_box(&github),
                        path: black_box(PATH),
                        query: Some("per_page=100&page=2"),
                        allowed: &allowed,
                    },
                    github_secret(),
                    &prepared,
                );
                (parts, out)
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("apply_query", |b| {
        b.iter_batched(
            || agent_request("/v1/search?q=latchkey&api_key=agent-own&limit=50"),
            |mut parts| {
                let out = apply(
                    &mut parts,
                    &Rewrite {
                        scheme: Scheme::Https,
                        authority: black_box(&example),
                        path: "/v1/search",
                        query: Some("q=latchkey&api_key=agent-own&limit=50"),
                        allowed: &allowed_query,
                    },
                    example_secret(),
                    &prepared,
                );
                (parts, out)
            },
            BatchSize::SmallInput,
        )
    });
    // The per-request parts of `apply` without it: building the request head alone, to read
    // the figures above against.
    group.bench_function("build_request_baseline", |b| {
        b.iter(|| agent_request(black_box(PATH)))
    });
    group.finish();

    // A 64 KiB response chunk of JSON-like text with no credential in it.
    let mut text = Vec::with_capacity(64 * 1024);
    let mut i = 0u64;
    while text.len() < 64 * 1024 {
        text.extend_from_slice(
            format!(
                "{{\"id\":{i},\"user\":{{\"login\":\"user{}\"}},\"body\":\"comment number {i} looks fine\"}},",
                i * 7919 % 1000
            )
            .as_bytes(),
        );
        i += 1;
    }
    text.truncate(64 * 1024);
    let chunk = Bytes::from(text);

    let mut group = c.benchmark_group("redact");
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    let mut body = RedactBody::new(
        Endless(chunk.clone()),
        Arc::clone(&needles),
        Box::new(|| panic!("nothing should be redacted")),
    );
    let mut cx = Context::from_waker(Waker::noop());
    group.bench_function("64KiB_no_match", |b| {
        b.iter(|| match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => black_box(frame.into_data().map(|d| d.len()).ok()),
            _ => panic!("the body ends only when told"),
        })
    });
    group.finish();

    // Added latency per chunk: time from a chunk leaving the inner body to it leaving
    // `RedactBody`, for a token stream (SSE events of ~60 bytes) and a raw chunked download
    // (16 KiB chunks), neither holding anything back.
    let sse =
        Bytes::from_static(b"data: {\"type\":\"content_block_delta\",\"text\":\" hello\"}\n\n");
    let raw = chunk.slice(..16 * 1024);
    let mut group = c.benchmark_group("redact_latency");
    for (name, piece) in [("sse_event", sse), ("raw_16KiB_chunk", raw)] {
        let mut body = RedactBody::new(
            Endless(piece),
            Arc::clone(&needles),
            Box::new(|| panic!("nothing should be redacted")),
        );
        group.bench_function(name, |b| {
            b.iter(|| match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => black_box(frame.into_data().map(|d| d.len()).ok()),
                _ => panic!("the body ends only when told"),
            })
        });
    }
    // A chunk whose tail is the secret's first bytes, with nothing behind it yet: the tail
    // goes out at the deadline (`redact::HOLD`), not with the next chunk.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    group.sample_size(20);
    group.bench_function("held_tail_released_at_deadline", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let head = Bytes::from_static(b"data: {\"text\":\"ghp");
                    let mut body = RedactBody::new(
                        OnceThenPending(Some(head)),
                        Arc::clone(&needles),
                        Box::new(|| {}),
                    );
                    let start = std::time::Instant::now();
                    let first = body.frame().await;
                    let tail = body.frame().await;
                    total += start.elapsed();
                    black_box((first, tail));
                }
                total
            })
        })
    });
    group.finish();

    // A body the upstream gzip-compressed despite `identity`: decoded and scanned, per MiB.
    let mut plain = Vec::with_capacity(1 << 20);
    while plain.len() < 1 << 20 {
        plain.extend_from_slice(&chunk);
    }
    plain.truncate(1 << 20);
    let mut gz = Vec::new();
    rt.block_on(async {
        use tokio::io::AsyncReadExt;
        async_compression::tokio::bufread::GzipEncoder::new(plain.as_slice())
            .read_to_end(&mut gz)
            .await
            .expect("gzip");
    });
    let gz = Bytes::from(gz);
    let mut group = c.benchmark_group("redact_gzip");
    group.throughput(Throughput::Bytes(plain.len() as u64));
    group.sample_size(20);
    group.bench_function("1MiB_decoded_and_scanned", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut headers = http::HeaderMap::new();
                headers.insert("content-encoding", http::HeaderValue::from_static("gzip"));
                let inner = http_body_util::Full::new(gz.clone());
                let decoded =
                    latchkey::proxy::decode::decoded(&mut headers, inner).expect("gzip is decoded");
                let body = RedactBody::new(decoded, Arc::clone(&needles), Box::new(|| {}));
                let out = body.collect().await.expect("clean stream").to_bytes();
                assert_eq!(out.len(), 1 << 20);
            })
        })
    });
    group.bench_function("1MiB_plain_scanned_baseline", |b| {
        let plain = Bytes::from(plain.clone());
        b.iter(|| {
            rt.block_on(async {
                let inner = http_body_util::Full::new(plain.clone());
                let body = RedactBody::new(inner, Arc::clone(&needles), Box::new(|| {}));
                black_box(body.collect().await.expect("clean stream").to_bytes().len())
            })
        })
    });
    group.finish();
}

/// One chunk, then nothing for ever (an upstream that paused mid-stream).
struct OnceThenPending(Option<Bytes>);

impl Body for OnceThenPending {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// A response body that yields the same chunk forever (a clone of `Bytes`, no copy).
struct Endless(Bytes);

impl Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(Some(Ok(Frame::data(self.0.clone()))))
    }
}

/// 1 MiB of JSON-like agent text (keys, prose, numbers, ids with `sk-`/`gh`-like fragments
/// that are not credentials) scanned in 16 KiB chunks with 5 stored credentials' needles.
fn tripwire_scan(c: &mut Criterion) {
    use latchkey::tripwire::{BodyScan, Tripwire};
    use zeroize::Zeroizing;
    let stored = [
        ("github", "s3cr3t-UPSTREAM-value-9f8e7d"),
        (
            "openai",
            "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0fGh",
        ),
        ("billing", "billing-key-ABCDEF-123456"),
        ("slack", "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOp"),
        ("aws", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ];
    let tripwire = Arc::new(Tripwire::new(
        stored
            .iter()
            .map(|(n, v)| (Arc::from(*n), Zeroizing::new(v.as_bytes().to_vec())))
            .collect(),
    ));
    let mut text = Vec::with_capacity(1 << 20);
    let mut i = 0u64;
    while text.len() < 1 << 20 {
        text.extend_from_slice(
            format!(
                "{{\"id\":\"task-{i}\",\"title\":\"Fix the disk-usage report for sk-ins and ghost users\",\
                 \"body\":\"Steps: run the job, check AKIA-like ids are masked, compare {i} rows.\",\
                 \"score\":{}.{}}},\n",
                i * 7 % 1000,
                i % 97
            )
            .as_bytes(),
        );
        i += 1;
    }
    text.truncate(1 << 20);
    let chunks: Vec<Bytes> = text.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
    let mut group = c.benchmark_group("tripwire");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("1MiB_json_scan", |b| {
        b.iter(|| {
            let mut scan = BodyScan::new(tripwire.clone(), None);
            let mut out = 0;
            for chunk in &chunks {
                out += scan.push(chunk.clone()).expect("no credential").len();
            }
            out += scan.finish().expect("no credential").len();
            black_box(out)
        })
    });
    group.finish();
}

criterion_group!(benches, injection, tripwire_scan);
criterion_main!(benches);
