//! The per-request cost of our layers: the default stack (violation log,
//! header stripping, policy, limited mode, approval wait), plus the access
//! log as the bundled binary composes it, around a `service_fn` connector
//! that answers at once. Prints ns per request (criterion) and, before
//! that, heap allocations per request (counted by `stats_alloc`).
//!
//! `cargo bench --bench stack`

#![allow(clippy::expect_used, clippy::print_stdout)]

use std::alloc::System;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use portcullis::access_log::AccessLogLayer;
use portcullis::body::{self, Body};
use portcullis_middleware::BoxError;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[path = "fixtures/stack.rs"]
mod fixtures;
use fixtures::{default_stack, request};

fn stack(
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future: Send> + Clone
{
    tower::ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(body::boxed))
        .layer(AccessLogLayer::new())
        .service(default_stack())
}

fn per_request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let stack = stack();
    // Allocations for one allowed request, the request itself excluded.
    runtime.block_on(async {
        let warm = stack.clone().oneshot(request()).await;
        drop(warm);
        let made = request();
        let region = Region::new(GLOBAL);
        let response = stack.clone().oneshot(made).await.expect("allowed");
        drop(response);
        let stats = region.change();
        println!(
            "default stack + access log (off: no subscriber): {} allocations, {} bytes per allowed request",
            stats.allocations, stats.bytes_allocated
        );
    });
    c.bench_function("default_stack_allowed_request", |b| {
        b.to_async(&runtime).iter(|| {
            let stack = stack.clone();
            async move { black_box(stack.oneshot(request()).await.expect("allowed")) }
        })
    });
}

/// One rule lookup and decision with 100 rule blocks: the host has a block
/// of its own among 99 others, and its request is allowed by the last
/// entry (the path is normalised and every entry tried).
fn rule_lookup(c: &mut Criterion) {
    use portcullis_middleware::request_rules::{RequestRules, RuleBlock, RuleEntry, RuleVerdict};
    let mut blocks = Vec::new();
    for index in 0..100 {
        blocks.push(
            RuleBlock::new(
                &format!("api{index}.example.com"),
                format!("rules[{index}]"),
            )
            .expect("a host")
            .allow(RuleEntry::new().methods(["GET", "HEAD"]).expect("methods"))
            .allow(
                RuleEntry::new()
                    .methods(["POST"])
                    .expect("methods")
                    .paths(["/repos/acme/*/issues/**"])
                    .expect("paths"),
            )
            .deny(RuleEntry::new().paths(["/user/keys/**"]).expect("paths")),
        );
    }
    let rules = RequestRules::new(blocks);
    let target = portcullis_middleware::Target::parse_authority("api57.example.com:443", None)
        .expect("a target");
    let method = http::Method::POST;
    let path = "/repos/acme/widgets/../widgets/issues/12/comments";
    assert!(matches!(
        rules.decide(&target, &method, path),
        RuleVerdict::Allowed(_)
    ));
    c.bench_function("request_rules_decide_100_blocks", |b| {
        b.iter(|| black_box(rules.decide(black_box(&target), &method, black_box(path))))
    });
}

criterion_group!(benches, per_request, rule_lookup);
criterion_main!(benches);
