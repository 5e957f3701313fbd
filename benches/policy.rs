//! Policy matching cost against the number of patterns.
//!
//! `cargo bench --bench policy` prints, for 10, 1 000 and 100 000 patterns,
//! the time for a batch of 1 000 decisions and the decisions per second
//! ("thrpt"), and the time to build a policy of 1 000 and 100 000 patterns
//! (exact hosts, wildcards, `**` with ports and CIDR ranges). The matcher is a reversed-label trie and per-prefix hash maps,
//! so the 100 000-pattern time should stay within a small factor of the
//! 10-pattern time.

#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis_middleware::{NetworkPolicy, Target};

const BATCH: usize = 1_000;

fn policy(patterns: usize) -> NetworkPolicy {
    let mut builder = NetworkPolicy::builder();
    for index in 0..patterns {
        let pattern = match index % 4 {
            0 => format!("host{index}.example{}.com", index % 97),
            1 => format!("*.svc{index}.internal{}.net", index % 13),
            2 => format!("**.team{index}.org:443"),
            _ => format!("10.{}.{}.0/24", (index / 256) % 256, index % 256),
        };
        builder = builder.allow(&pattern).expect("valid pattern");
    }
    for index in 0..patterns / 10 {
        builder = builder
            .deny(&format!("blocked{index}.example.com"))
            .expect("valid pattern");
    }
    builder.build()
}

fn targets(patterns: usize) -> Vec<Target> {
    (0..BATCH)
        .map(|i| {
            let index = (i * 7919) % patterns.max(1);
            let authority = match i % 5 {
                0 => format!("host{index}.example{}.com:443", index % 97),
                1 => format!("api.v2.svc{index}.internal{}.net:443", index % 13),
                2 => format!("team{index}.org:443"),
                3 => format!("miss{i}.nowhere.example:443"),
                _ => format!("deep.a.b.c.d.e.f.unknown{i}.io:80"),
            };
            Target::parse_authority(&authority, None).expect("valid target")
        })
        .collect()
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_decide");
    group.throughput(Throughput::Elements(BATCH as u64));
    for patterns in [10usize, 1_000, 100_000] {
        let policy = policy(patterns);
        let targets = targets(patterns);
        group.bench_with_input(BenchmarkId::from_parameter(patterns), &patterns, |b, _| {
            b.iter(|| {
                for target in &targets {
                    black_box(policy.decide(black_box(target)));
                }
            })
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let inputs = [
        "Example.COM:443",
        "0x7f.1:80",
        "[::ffff:10.0.0.1]:22",
        "a.b.c.d.example.org:8443",
    ];
    c.bench_function("target_parse_authority", |b| {
        b.iter(|| {
            for input in inputs {
                let _ = black_box(Target::parse_authority(black_box(input), None));
            }
        })
    });
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_build");
    group.sample_size(10);
    for patterns in [1_000usize, 100_000] {
        group.bench_with_input(BenchmarkId::from_parameter(patterns), &patterns, |b, &n| {
            b.iter(|| black_box(policy(n)))
        });
    }
    group.finish();
}

criterion_group!(benches, decide, parse, build);
criterion_main!(benches);
