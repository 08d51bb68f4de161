//! Audit writer's per-line work: encode one `AuditEvent` as canonical JSON, hash it into the
//! chain (SHA-256) and append the finished line to the batch buffer.
//!
//! Budget: a few µs per line (target < 5 µs). One writer task does this for every request,
//! so at 5 µs it sustains ~200k lines/s, far above what the proxy forwards; if it grows
//! past that the queue fills and requests start waiting in `AuditSink::record`.

use chrono::Utc;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use latchkey::audit::{AuditEvent, Chain, Decision, Outcome};

fn typical_event() -> AuditEvent {
    AuditEvent {
        ts: Utc::now(),
        request_id: "01JD8Z3Q4K7XW2M5N9P0R1S2T3".into(),
        agent: Some("claude-code".into()),
        on_behalf_of: Some("alice@example.com".into()),
        session: Some("8f14e45f-ceea-467a-9575-2f5b1e0c1a2b".into()),
        task: Some("fix-ci".into()),
        route: Some("github-api".into()),
        credential: Some("github_pat".into()),
        credential_kind: Some("static".into()),
        credential_detail: None,
        decision: Decision::Allow,
        reason: None,
        replica: None,
        method: "GET".into(),
        host: "api.github.com".into(),
        path: "/repos/latchkey/latchkey/pulls/42/comments".into(),
        status: Some(200),
        duration_ms: 143.217,
        outcome: Some(Outcome::Ok),
        ttfb_ms: Some(41.5),
        bytes_up: Some(0),
        bytes_down: Some(18_211),
        approval: Default::default(),
    }
}

fn encode_and_hash(c: &mut Criterion) {
    let event = typical_event();
    let mut chain = Chain::genesis();
    let mut buf = Vec::with_capacity(64 * 1024);
    c.bench_function("audit_encode_hash_line", |b| {
        b.iter(|| {
            buf.clear();
            chain.append(black_box(&event), &mut buf);
            black_box(buf.len())
        })
    });
}

criterion_group!(benches, encode_and_hash);
criterion_main!(benches);
