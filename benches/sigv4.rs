//! Re-signing AWS requests (the `aws_sigv4` credential kind) and HMAC signing.
//!
//! Measures:
//! - `sigv4/resign_header`: one S3 GET as boto3 sends it (placeholder signature, 8 headers),
//!   through what the kind does per request: read the agent's signature, rebuild the target
//!   without it, and sign again with `aws-sigv4` (canonical request, signing key derivation,
//!   HMAC chain). The `Allowed` comes from a compiled `AgentPolicy`.
//! - `sigv4/resign_presigned`: the same for a presigned URL (query signing).
//! - `sigv4/chunks_1MiB`: `ChunkSigner` re-signing 1 MiB of `aws-chunked` upload in 64 KiB
//!   chunks (parse, SHA-256 of each chunk, one HMAC per chunk, copy out); as throughput.

use std::hint::black_box;
use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::BodyExt;
use latchkey::authority::Authority;
use latchkey::credential::sigv4::chunked::{self, ChunkKey, ChunkSigner};
use latchkey::credential::sigv4::{resign, AgentSignature, Keys};
use latchkey::inject::Rewrite;
use latchkey::policy::{AgentPolicy, Grant, Scheme};
use zeroize::Zeroizing;

const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn policy() -> AgentPolicy {
    AgentPolicy::from_toml(
        Path::new("bench.toml"),
        "agent = \"b\"\n[[routes]]\nid = \"s3\"\nhost = \"data.s3.us-east-1.amazonaws.com\"\nmethods = [\"GET\", \"PUT\"]\npaths = [\"/**\"]\ncredential = \"aws\"\nservice = \"s3\"\nregion = \"us-east-1\"\n",
    )
    .expect("bench policy loads")
}

fn agent_get(query: bool) -> http::request::Parts {
    let mut b = http::Request::get(if query {
        format!("/reports/2024/q1.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=latchkey%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature={ZEROS}")
    } else {
        "/reports/2024/q1.csv".to_owned()
    })
    .header("user-agent", "Boto3/1.43.11 md/Botocore#1.43.11 ua/2.1 os/linux")
    .header("accept-encoding", "identity")
    .header("amz-sdk-invocation-id", "4c1f3f0e-5b1e-4d4a-9a51-1f0c0f2e8c11")
    .header("amz-sdk-request", "attempt=1")
    .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD");
    if !query {
        b = b
            .header("x-amz-date", "20240101T000000Z")
            .header("authorization", format!("AWS4-HMAC-SHA256 Credential=latchkey/20240101/us-east-1/s3/aws4_request, SignedHeaders=amz-sdk-invocation-id;amz-sdk-request;host;x-amz-content-sha256;x-amz-date, Signature={ZEROS}"));
    }
    b.body(()).unwrap().into_parts().0
}

fn empty() -> latchkey::credential::Body {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn bench_resign(c: &mut Criterion) {
    let policy = policy();
    let authority = Authority::parse("data.s3.us-east-1.amazonaws.com", Some(443)).unwrap();
    let keys = Keys::new(
        "AKIAREALKEYEXAMPLE00",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        Some("session-token-example"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("sigv4");
    for (name, query) in [("resign_header", false), ("resign_presigned", true)] {
        let template = agent_get(query);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut parts = agent_get(query);
                let path = template.uri.path().to_owned();
                let q = parts.uri.query().map(str::to_owned);
                let allowed = policy
                    .decide(Scheme::Https, &authority, &parts.method, &path, Grant::ALL)
                    .unwrap();
                let rewrite = Rewrite {
                    scheme: Scheme::Https,
                    authority: &authority,
                    path: &path,
                    query: q.as_deref(),
                    allowed: &allowed,
                };
                let agent = AgentSignature::read(&parts).unwrap();
                let body = rt
                    .block_on(resign(
                        &mut parts,
                        &rewrite,
                        empty(),
                        &agent,
                        &keys,
                        SystemTime::now(),
                    ))
                    .unwrap();
                black_box((parts, body));
            })
        });
    }
    let key = ChunkKey {
        key: Zeroizing::new(vec![7; 32]),
        date_time: "20240101T000000Z".into(),
        scope: "20240101/us-east-1/s3/aws4_request".into(),
    };
    let data = vec![b'x'; 1 << 20];
    let encoded = Bytes::from(chunked::encode(&data, 64 << 10, &key, ZEROS));
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("chunks_1MiB", |b| {
        b.iter(|| {
            let chunks: Vec<Bytes> = encoded
                .chunks(16 << 10)
                .map(Bytes::copy_from_slice)
                .collect();
            let stream = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, latchkey::credential::BoxError>(http_body::Frame::data(c))),
            );
            let body = http_body_util::StreamBody::new(stream).boxed_unsync();
            let key = ChunkKey {
                key: key.key.clone(),
                date_time: key.date_time.clone(),
                scope: key.scope.clone(),
            };
            let signer = ChunkSigner::new(body, key, ZEROS.into(), data.len() as u64);
            let out = rt.block_on(signer.collect()).unwrap().to_bytes();
            assert_eq!(out.len(), encoded.len());
            black_box(out);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_resign);
criterion_main!(benches);
