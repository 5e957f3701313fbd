//! Inserting layers of your own into the default stack: a per-client
//! concurrency limit next to the connector, and an outer layer that refuses
//! requests without a team header (its refusals are logged like any other).
//!
//! Run: `cargo run --example custom_layer`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use http::{Request, Response};
use portcullis_middleware::{
    find_blocked, BlockDecision, Blocked, BoxError, DefaultStack, NetworkPolicy, PolicyHandle,
    Protocol, Reason, RequestInfo, Source, Target, ViolationLogLayer, ViolationRing,
};
use tower::filter::FilterLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, ServiceExt};

/// Refuses any request without an `x-team` header, as a typed `Blocked`.
fn require_team(request: Request<()>) -> Result<Request<()>, BoxError> {
    if request.headers().contains_key("x-team") {
        return Ok(request);
    }
    let info = RequestInfo::from_request(&request)?;
    let mut blocked = Blocked::new(
        Reason::NotAllowed,
        Source::Policy,
        info.target,
        info.protocol,
        &info.method,
    )
    .with_decision(BlockDecision::Deny);
    blocked.message = "this proxy needs an x-team header".to_owned();
    Err(blocked.into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let policy = PolicyHandle::new(NetworkPolicy::builder().allow("*")?.build());
    let ring = ViolationRing::default();
    let network = service_fn(|_: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let stack = DefaultStack::new(policy)
        .violations(ViolationLogLayer::new(ring.clone()))
        .outer(FilterLayer::new(require_team))
        .inner(ConcurrencyLimitLayer::new(8))
        .layer(network);

    for team in [Some("build"), None] {
        let mut request = Request::get("http://example.com/").body(())?;
        if let Some(team) = team {
            request.headers_mut().insert("x-team", team.parse()?);
        }
        request
            .extensions_mut()
            .insert(Target::parse_authority("example.com:80", None)?);
        request.extensions_mut().insert(Protocol::Http);
        match stack.clone().oneshot(request).await {
            Ok(response) => println!("team {team:?}: allowed ({})", response.status()),
            Err(error) => println!(
                "team {team:?}: refused: {}",
                find_blocked(error.as_ref()).map_or(error.to_string(), |b| b.message.clone())
            ),
        }
    }
    println!("violations recorded: {}", ring.total());
    Ok(())
}
