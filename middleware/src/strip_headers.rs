//! Removes hop-by-hop and proxy control headers, in both directions.
//!
//! Refuses nothing. On the way in it removes `Connection` and every header
//! it names, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`,
//! `Proxy-Authenticate`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` (kept,
//! with `Connection: upgrade`, when the request is an upgrade and upgrades are
//! proxied — except an offer of `h2c` alone, always declined:
//! [`offers_only_h2c`]), and the proxy's own control headers (`x-unix-socket`). The
//! destination those headers carried is already in the request's
//! extensions. On the way out it removes the same hop-by-hop set from the
//! response, keeping `Upgrade` on a `101 Switching Protocols`.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::StripHeadersLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let service = ServiceBuilder::new()
//!     .layer(StripHeadersLayer::new())
//!     .service(service_fn(|request: Request<()>| async move {
//!         assert!(request.headers().get("proxy-authorization").is_none());
//!         Ok::<_, portcullis_middleware::BoxError>(Response::new(()))
//!     }));
//! let request = Request::get("http://example.com/")
//!     .header("proxy-authorization", "Basic c2VjcmV0")
//!     .body(())?;
//! service.oneshot(request).await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;
use crate::inspect::connection_tokens;

pub use crate::inspect::{is_upgrade, upgrade_token};

/// The proxy's own control header naming a Unix socket.
pub const X_UNIX_SOCKET: HeaderName = HeaderName::from_static("x-unix-socket");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Configures [`StripHeaders`]. Cloning it (and the service, once per
/// connection) shares the configuration; nothing is allocated.
#[derive(Debug, Clone)]
pub struct StripHeadersLayer {
    keep_upgrades: bool,
    control: Arc<[HeaderName]>,
}

impl StripHeadersLayer {
    /// Strips the default set and keeps upgrades.
    pub fn new() -> StripHeadersLayer {
        StripHeadersLayer {
            keep_upgrades: true,
            control: Arc::new([X_UNIX_SOCKET]),
        }
    }

    /// Whether `Upgrade` requests keep their `Upgrade` header (default: yes).
    pub fn keep_upgrades(mut self, keep: bool) -> StripHeadersLayer {
        self.keep_upgrades = keep;
        self
    }

    /// Also removes this request header (a control header of your own).
    pub fn also_strip(mut self, name: HeaderName) -> StripHeadersLayer {
        let mut control = self.control.to_vec();
        control.push(name);
        self.control = control.into();
        self
    }
}

impl Default for StripHeadersLayer {
    fn default() -> StripHeadersLayer {
        StripHeadersLayer::new()
    }
}

impl<S> Layer<S> for StripHeadersLayer {
    type Service = StripHeaders<S>;

    fn layer(&self, inner: S) -> StripHeaders<S> {
        StripHeaders {
            inner,
            layer: self.clone(),
        }
    }
}

/// Removes hop-by-hop and control headers; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct StripHeaders<S> {
    inner: S,
    layer: StripHeadersLayer,
}

impl<S> StripHeaders<S> {
    /// Wraps `inner` with the default configuration.
    pub fn new(inner: S) -> StripHeaders<S> {
        StripHeadersLayer::new().layer(inner)
    }

    /// A layer with the default configuration.
    pub fn layer() -> StripHeadersLayer {
        StripHeadersLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for StripHeaders<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let mut upgrade = is_upgrade(request.headers());
        if upgrade && offers_only_h2c(request.headers()) {
            request.headers_mut().remove(HTTP2_SETTINGS);
            upgrade = false;
        }
        let upgrade = upgrade && self.layer.keep_upgrades;
        strip_hop_by_hop(request.headers_mut(), upgrade);
        for name in self.layer.control.iter() {
            request.headers_mut().remove(name);
        }
        ResponseFuture {
            future: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Strips hop-by-hop headers from the inner service's response.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().future.poll(cx).map(|result| match result {
            Ok(mut response) => {
                let upgrade = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                strip_hop_by_hop(response.headers_mut(), upgrade);
                Ok(response)
            }
            Err(error) => Err(error.into()),
        })
    }
}

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Whether the `Upgrade` headers offer nothing but `h2c` (HTTP/2 over
/// cleartext, RFC 7540 §3.2, which libcurl offers on every `http://`
/// request when HTTP/2 is on: cargo, `curl --http2`). The offer is
/// declined by removing it, as a server that does not speak h2c ignores
/// it: the request goes on as HTTP/1.1 and every request after it stays
/// visible to the policy, limited mode and secret scanning, none of which
/// could read an h2c connection once switched.
pub fn offers_only_h2c(headers: &HeaderMap) -> bool {
    let mut tokens = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or(",").split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .peekable();
    tokens.peek().is_some() && tokens.all(|token| token.eq_ignore_ascii_case("h2c"))
}

/// Removes hop-by-hop headers; with `keep_upgrade`, leaves `Upgrade` and
/// sets `Connection: upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // The common case, no hop-by-hop header at all, answered in one pass
    // over the names (each compared, none hashed); a Connection header is
    // one of them, so no listed name is missed.
    if !headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name))
    {
        return;
    }
    // The names present that go: the fixed set, and those the Connection
    // header lists (compared as header names compare, without case). Only
    // those are removed: one hashed removal each, not one per name that
    // could be there.
    let listed: Vec<&str> = connection_tokens(headers).collect();
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            HOP_BY_HOP.contains(name)
                || (!(keep_upgrade && *name == header::UPGRADE)
                    && listed
                        .iter()
                        .any(|token| token.eq_ignore_ascii_case(name.as_str())))
        })
        .cloned()
        .collect();
    for name in &doomed {
        headers.remove(name);
    }
    if keep_upgrade && headers.contains_key(header::UPGRADE) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_test::mock;

    /// The plain statement of what stripping does (every listed and fixed
    /// name removed by name), to hold the one that removes only what is
    /// present to the same answers.
    fn strip_by_name(headers: &mut HeaderMap, keep_upgrade: bool) {
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .filter(|name| !(keep_upgrade && name == header::UPGRADE))
            .collect();
        for name in listed.iter().chain(HOP_BY_HOP.iter()) {
            headers.remove(name);
        }
        if keep_upgrade && headers.contains_key(header::UPGRADE) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            headers.remove(header::UPGRADE);
        }
    }

    #[test]
    fn stripping_removes_what_removing_every_name_would() {
        let names = [
            "accept",
            "x-secret",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "x-other",
            "proxy-authorization",
            "transfer-encoding",
            "host",
        ];
        let connections = [
            None,
            Some("keep-alive"),
            Some("Keep-Alive, X-Secret"),
            Some("close"),
            Some("upgrade"),
            Some("UPGRADE, x-other ,, "),
            Some("x secret, host"),
        ];
        let mut cases = 0;
        for connection in connections {
            // Every subset of the first names, and all of them.
            for mask in 0u32..(1 << 6) {
                for keep_upgrade in [false, true] {
                    let mut headers = HeaderMap::new();
                    for (i, name) in names.iter().enumerate() {
                        if i >= 6 || mask & (1 << i) != 0 {
                            headers.append(
                                HeaderName::from_static(name),
                                HeaderValue::from_static("v"),
                            );
                        }
                    }
                    if let Some(value) = connection {
                        headers.append(header::CONNECTION, HeaderValue::from_static(value));
                        headers.append(header::CONNECTION, HeaderValue::from_static("x-other"));
                    }
                    let mut expected = headers.clone();
                    strip_by_name(&mut expected, keep_upgrade);
                    strip_hop_by_hop(&mut headers, keep_upgrade);
                    assert_eq!(headers, expected, "{connection:?} {mask:b} {keep_upgrade}");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 7 * 64 * 2);
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get("http://example.com/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[tokio::test]
    async fn removes_exactly_the_hop_by_hop_set() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(StripHeadersLayer::new());
        handle.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-unix-socket", "/tmp/s"),
            ("accept", "*/*"),
            ("user-agent", "t"),
        ]));
        let (seen, send) = handle.next_request().await.unwrap();
        let mut names: Vec<&str> = seen.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "user-agent"]);
        let upstream = Response::builder()
            .header("connection", "close, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "1")
            .header("content-type", "text/plain")
            .body(())
            .unwrap();
        send.send_response(upstream);
        let response = response.await.unwrap();
        let names: Vec<&str> = response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[tokio::test]
    async fn keeps_a_proxied_upgrade() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(StripHeadersLayer::new());
        handle.allow(1);
        assert!(service.poll_ready().is_ready());
        let _response = service.call(request(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]));
        let expected = request(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        let (seen, _send) = handle.next_request().await.unwrap();
        assert_eq!(seen.headers(), expected.headers());
    }

    #[tokio::test]
    async fn declines_an_offer_of_h2c_alone() {
        for (upgrade, declined) in [
            ("h2c", true),
            ("H2C", true),
            ("h2c, h2c", true),
            ("h2c, websocket", false),
            ("websocket", false),
        ] {
            let (mut service, mut handle) =
                mock::spawn_layer::<Request<()>, Response<()>, _>(StripHeadersLayer::new());
            handle.allow(1);
            assert!(service.poll_ready().is_ready());
            let _response = service.call(request(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
                ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
                ("accept", "*/*"),
            ]));
            let (seen, _send) = handle.next_request().await.unwrap();
            assert_eq!(!is_upgrade(seen.headers()), declined, "{upgrade}");
            assert_eq!(
                seen.headers().get("upgrade").is_none(),
                declined,
                "{upgrade}"
            );
            assert!(seen.headers().get("http2-settings").is_none(), "{upgrade}");
            assert!(seen.headers().get("accept").is_some());
        }
    }

    #[tokio::test]
    async fn backpressure_and_errors_pass_through() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(StripHeadersLayer::new());
        handle.allow(0);
        assert!(service.poll_ready().is_pending());
        handle.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request(&[]));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error("upstream broke");
        assert_eq!(response.await.unwrap_err().to_string(), "upstream broke");
    }
}
