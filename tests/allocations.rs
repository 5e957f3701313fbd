//! Logging that is off costs nothing per request: with no subscriber (every
//! callsite disabled), the access log layer adds no heap allocation to an
//! allowed request through the default stack. Counted, not timed, in a test
//! binary of its own (its global allocator counts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use http::{Request, Response};
use portcullis::access_log::AccessLogLayer;
use portcullis::body::{self, Body};
use portcullis_middleware::{
    BoxError, ClientAddr, DefaultStack, NetworkPolicy, PolicyHandle, Protocol, Target,
};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{service_fn, Layer, Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn request() -> Request<Body> {
    let mut request = Request::get("http://api.example.com/v1/items")
        .header("host", "api.example.com")
        .body(body::empty())
        .unwrap();
    let extensions = request.extensions_mut();
    extensions.insert(Target::parse_authority("api.example.com:80", None).unwrap());
    extensions.insert(Protocol::Http);
    extensions.insert(ClientAddr("127.0.0.1:40000".parse().unwrap()));
    request
}

fn inner() -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone {
    let policy = NetworkPolicy::builder()
        .allow("**.example.com")
        .unwrap()
        .build();
    let network =
        service_fn(|_: Request<Body>| async { Ok::<_, BoxError>(Response::new(body::empty())) });
    DefaultStack::new(PolicyHandle::new(policy)).layer(network)
}

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
