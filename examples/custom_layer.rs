//! Inserting layers of your own into the default stack: a per-client
//! concurrency limit next to the connector, and an outer layer that refuses
//! requests without a team header — written as the built-in layers are: a
//! `Layer` + `Service` pair whose future is the crate's `ResponseFuture`
//! (refuse or pass on), the refusal a `Blocked` with a reason of its own
//! (`Reason::Custom`) and its message (`with_message`, which the proxy
//! keeps as written). Its refusals are logged like any other.
//!
//! Run: `cargo run --example custom_layer`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::task::{Context, Poll};

use http::{Request, Response};
use portcullis_middleware::{
    find_blocked, Blocked, BoxError, DefaultStack, NetworkPolicy, PolicyHandle, Protocol, Reason,
    RequestInfo, ResponseFuture, Source, Target, ViolationLogLayer, ViolationRing,
};
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceExt};

/// Refuses any request without an `x-team` header.
#[derive(Clone, Debug, Default)]
struct RequireTeamLayer;

impl<S> Layer<S> for RequireTeamLayer {
    type Service = RequireTeam<S>;

    fn layer(&self, inner: S) -> RequireTeam<S> {
        RequireTeam { inner }
    }
}

/// The service [`RequireTeamLayer`] makes.
#[derive(Clone, Debug)]
struct RequireTeam<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for RequireTeam<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.headers().contains_key("x-team") {
            return ResponseFuture::inner(self.inner.call(request));
        }
        match RequestInfo::from_request(&request) {
            Ok(info) => ResponseFuture::refused(
                Blocked::new(
                    Reason::Custom("no_team"),
                    Source::Layer("require_team"),
                    info.target,
                    info.protocol,
                    &info.method,
                )
                .with_message("this proxy needs an x-team header; send one naming your team"),
            ),
            Err(error) => ResponseFuture::refused(error),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let policy = PolicyHandle::new(NetworkPolicy::builder().allow("*")?.build());
    let ring = ViolationRing::default();
    let network = service_fn(|_: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let stack = DefaultStack::new(policy)
        .violations(ViolationLogLayer::new(ring.clone()))
        .outer(RequireTeamLayer)
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
                find_blocked(error.as_ref()).map_or(error.to_string(), |b| format!(
                    "{} ({})",
                    b.message,
                    b.reason.as_str()
                ))
            ),
        }
    }
    println!("violations recorded: {}", ring.total());
    Ok(())
}
