//! Leaf certificate cost: minting a fresh leaf + `ServerConfig` versus a cache hit.
//!
//! Budget guarded: a cache hit (the path taken by every CONNECT after the first to a host)
//! stays around or well under 1 µs; a mint (one ECDSA P-256 signature plus building the
//! rustls config, paid once per host per 12 h) stays under 1 ms.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use latchkey::tls::{CertificateAuthority, LeafCache};

fn leaf_cert(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, _) = CertificateAuthority::load_or_create(dir.path()).expect("CA");
    let leaves = LeafCache::try_new(Arc::new(ca), 10_000).expect("leaf cache");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");

    c.bench_function("leaf_mint", |b| {
        b.iter(|| leaves.mint(std::hint::black_box("api.example.test")))
    });

    // What `block_on` itself costs, to read the cache-hit figure against.
    c.bench_function("block_on_baseline", |b| {
        b.iter(|| rt.block_on(std::hint::black_box(async {})))
    });

    rt.block_on(leaves.server_config("api.example.test"))
        .expect("warm cache");
    c.bench_function("leaf_cache_hit", |b| {
        b.iter(|| rt.block_on(leaves.server_config(std::hint::black_box("api.example.test"))))
    });
}

criterion_group!(benches, leaf_cert);
criterion_main!(benches);
