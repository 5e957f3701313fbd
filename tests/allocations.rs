//! Logging that is off costs nothing per request: with no subscriber (every
//! callsite disabled), the access log layer adds no heap allocation to an
//! allowed request through the default stack. Counted, not timed, in a test
//! binary of its own (its global allocator counts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use http::Request;
use portcullis::access_log::AccessLogLayer;
use portcullis::body::Body;
use portcullis_middleware::BoxError;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[path = "../benches/fixtures/stack.rs"]
mod fixtures;
use fixtures::{default_stack as inner, request};

/// Allocations for one allowed request through `service`, after a warm-up,
/// the request itself excluded.
fn allocations<S>(service: S) -> usize
where
    S: Service<Request<Body>, Error = BoxError> + Clone,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        drop(service.clone().oneshot(request()).await);
        let made = request();
        let region = Region::new(GLOBAL);
        let response = service.clone().oneshot(made).await.expect("allowed");
        drop(response);
        region.change().allocations
    })
}

#[test]
fn the_access_log_off_allocates_nothing() {
    let bare = allocations(inner());
    let logged = allocations(AccessLogLayer::new().layer(inner()));
    assert_eq!(
        logged,
        bare,
        "the access log, off, allocated {} times more per request",
        logged.saturating_sub(bare)
    );
}
