//! Policy decision and path normalisation, the two policy steps on every proxied request.
//!
//! Measures `AgentPolicy::decide` on a policy of 10, 1 000 and 10 000 routes (the largest over
//! 1 000 hosts, a tenth of them wildcards), for an allowed request and for a denied one, and
//! `policy::normalize` on a clean path (borrowed, no allocation) and a dirty one.
//!
//! Budget: a decision stays well under 1 µs whatever the number of routes (the host index
//! makes it independent of policy size); normalising a clean path is a single scan.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Method;
use latchkey::authority::Authority;
use latchkey::policy::{normalize, AgentPolicy, Grant, Scheme};

/// A policy of `routes` routes spread over `hosts` hosts (every tenth host a wildcard).
fn policy(routes: usize, hosts: usize) -> AgentPolicy {
    let mut text = String::from("agent = \"bench\"\n");
    for i in 0..routes {
        let h = i % hosts;
        let host = if h.is_multiple_of(10) {
            format!("*.w{h}.example.com")
        } else {
            format!("h{h}.example.com")
        };
        text.push_str(&format!(
            "[[routes]]\nid = \"r{i}\"\nhost = \"{host}\"\nmethods = [\"GET\", \"POST\"]\n\
             paths = [\"/api/v{i}/items\", \"/api/v{i}/items/*/comments/**\"]\n\
             credential = \"c{i}\"\n\
             inject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n"
        ));
    }
    match AgentPolicy::from_toml(Path::new("bench.toml"), &text) {
        Ok(p) => p,
        Err(d) => panic!("bench policy invalid: {}", d[0]),
    }
}

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for (routes, hosts) in [(10, 10), (1_000, 100), (10_000, 1_000)] {
        let p = policy(routes, hosts);
        // The last route on its host: the worst case for the per-host candidate list.
        let i = routes - 1;
        let host = format!("h{}.example.com", i % hosts);
        let authority = Authority::parse(&host, Some(443)).expect("valid host");
        let allow_path = format!("/api/v{i}/items/42/comments/7");
        let deny_path = "/api/v0/admin".to_string();
        assert!(p
            .decide(
                Scheme::Https,
                &authority,
                &Method::GET,
                &allow_path,
                Grant(None)
            )
            .is_ok());
        assert!(p
            .decide(
                Scheme::Https,
                &authority,
                &Method::GET,
                &deny_path,
                Grant(None)
            )
            .is_err());
        group.bench_with_input(BenchmarkId::new("allow", routes), &routes, |b, _| {
            b.iter(|| {
                p.decide(
                    Scheme::Https,
                    black_box(&authority),
                    &Method::GET,
                    black_box(&allow_path),
                    Grant(None),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("deny", routes), &routes, |b, _| {
            b.iter(|| {
                p.decide(
                    Scheme::Https,
                    black_box(&authority),
                    &Method::GET,
                    black_box(&deny_path),
                    Grant(None),
                )
            })
        });
        // A wildcard host three labels deep.
        let wild = Authority::parse("a.b.w0.example.com", Some(443)).expect("valid host");
        group.bench_with_input(
            BenchmarkId::new("allow_wildcard", routes),
            &routes,
            |b, _| {
                b.iter(|| {
                    p.decide(
                        Scheme::Https,
                        black_box(&wild),
                        &Method::GET,
                        black_box("/api/v0/items"),
                        Grant(None),
                    )
                })
            },
        );
    }
    group.finish();
}

fn normalisation(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize");
    group.bench_function("clean", |b| {
        b.iter(|| normalize(black_box("/repos/acme/backend/issues/1234/comments")))
    });
    group.bench_function("dirty", |b| {
        b.iter(|| {
            normalize(black_box(
                "//repos/./acme/x/../backend/%69ssues/%7e1234/comments/",
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, decisions, normalisation);
criterion_main!(benches);
