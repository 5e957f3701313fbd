//! Chaining to an upstream proxy taken from the proxy's own environment
//! (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`), when
//! `allow_upstream_proxy = true`.
//!
//! Through an upstream proxy, portcullis still decides every request on the
//! name and on IP literals, but the upstream resolves names and dials: the
//! resolved-address check is the upstream's to make.

use std::fmt;
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::ServiceExt;

use super::{Dialer, OwnListeners};
use portcullis_middleware::{
    BadRequest, BoxError, ProxyErrorRef, Target, UpstreamError, UpstreamErrorKind,
};

/// The upstream proxies to chain to.
pub struct UpstreamProxies {
    matcher: Matcher,
}

impl fmt::Debug for UpstreamProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamProxies").finish_non_exhaustive()
    }
}

impl UpstreamProxies {
    /// Reads the proxy variables of this process's environment.
    pub fn from_env() -> UpstreamProxies {
        UpstreamProxies {
            matcher: Matcher::from_env(),
        }
    }

    /// Uses one HTTP proxy for everything but `no_proxy` (comma-separated).
    pub fn fixed(proxy: &str, no_proxy: &str) -> UpstreamProxies {
        UpstreamProxies {
            matcher: Matcher::builder()
                .all(proxy.to_owned())
                .no(no_proxy.to_owned())
                .build(),
        }
    }

    /// The upstream proxy for this destination, if any.
    pub fn for_uri(&self, uri: &Uri) -> Option<Intercept> {
        self.matcher.intercept(uri)
    }
}

/// The `host:port` of a proxy URI; only `http://` proxies are supported.
/// The upstream proxy's URL without its credentials, for messages.
pub(crate) fn display(intercept: &Intercept) -> String {
    let uri = intercept.uri();
    format!(
        "{}://{}:{}",
        uri.scheme_str().unwrap_or("http"),
        uri.host().unwrap_or(""),
        uri.port_u16().unwrap_or(80)
    )
}

fn proxy_address(intercept: &Intercept) -> Result<String, BoxError> {
    let uri = intercept.uri();
    if uri.scheme_str() != Some("http") {
        return Err(
            format!("upstream proxy {uri}: only http:// upstream proxies are supported").into(),
        );
    }
    let host = uri.host().ok_or("the upstream proxy URL has no host")?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}

/// Connects to the upstream proxy itself.
pub(crate) async fn connect_proxy(
    intercept: &Intercept,
    dialer: &Dialer,
) -> Result<TcpStream, BoxError> {
    let address = proxy_address(intercept)?;
    Ok(connect_address(&address, dialer.connect_timeout(), dialer.own()).await?)
}

async fn connect_address(
    address: &str,
    timeout: Duration,
    own: &OwnListeners,
) -> Result<TcpStream, UpstreamError> {
    let what = || format!("upstream proxy {address}");
    // The proxy's own environment may name the proxy itself: never chain
    // into ourselves.
    if let Ok(resolved) = tokio::net::lookup_host(address).await {
        let resolved: Vec<_> = resolved.collect();
        if resolved.iter().any(|a| own.reaches(*a)) {
            return Err(UpstreamError {
                kind: UpstreamErrorKind::Refused,
                target: what(),
                detail: "the upstream proxy is this proxy itself (HTTP_PROXY/HTTPS_PROXY/ALL_PROXY in its environment name it); not chaining into a loop".into(),
            });
        }
    }
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(UpstreamError::from_io(what(), &error)),
        Err(_) => Err(UpstreamError {
            kind: UpstreamErrorKind::TimedOut,
            target: what(),
            detail: "connect timed out".into(),
        }),
    }
}

/// Opens a tunnel to `target` through the upstream proxy with hyper-util's
/// CONNECT client (which reads a bounded reply: 8 KiB, 100 headers).
pub(crate) async fn tunnel(
    intercept: &Intercept,
    target: &Target,
    dialer: &Dialer,
    came_through: &[http::HeaderValue],
) -> Result<TcpStream, BoxError> {
    let timeout = dialer.connect_timeout();
    let address = proxy_address(intercept)?;
    let own = dialer.own().clone();
    let via = dialer.own().via();
    let connect = tower::service_fn(move |_: Uri| {
        let address = address.clone();
        let own = own.clone();
        async move {
            connect_address(&address, timeout, &own)
                .await
                .map(TokioIo::new)
        }
    });
    // Earlier hops first, then us: a loop back through us is seen.
    let mut hops: Vec<String> = came_through
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    hops.push(via);
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(&hops.join(", ")) {
        headers.insert(http::header::VIA, value);
    }
    let mut connector = Tunnel::new(intercept.uri().clone(), connect).with_headers(headers);
    if let Some(auth) = intercept.basic_auth() {
        connector = connector.with_auth(auth.clone());
    }
    let destination: Uri = format!("https://{target}/")
        .parse()
        .map_err(|e| BadRequest::new(format!("cannot tunnel to {target}: {e}")))?;
    let upstream_error = |kind, detail: String| -> BoxError {
        UpstreamError {
            kind,
            target: target.to_string(),
            detail,
        }
        .into()
    };
    let error = match tokio::time::timeout(timeout, connector.oneshot(destination)).await {
        Ok(Ok(io)) => return Ok(io.into_inner()),
        Ok(Err(error)) => error,
        Err(_) => {
            return Err(upstream_error(
                UpstreamErrorKind::TimedOut,
                "the upstream proxy did not answer CONNECT in time".into(),
            ))
        }
    };
    // hyper-util's error type is not nameable: classify by its cause.
    let error: BoxError = error.into();
    if let Some(ProxyErrorRef::Upstream(dial)) = ProxyErrorRef::find(error.as_ref()) {
        return Err(upstream_error(dial.kind, dial.detail.clone()));
    }
    let mut cause = std::error::Error::source(error.as_ref());
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return Err(UpstreamError::from_io(target, io).into());
        }
        cause = current.source();
    }
    // A refusal (any status but 200, 407 included) or a malformed answer.
    Err(upstream_error(
        UpstreamErrorKind::Refused,
        format!(
            "the upstream proxy {} did not open the tunnel ({error}); that answer is the upstream's, not portcullis's policy (--no-upstream-proxy stops chaining)",
            display(intercept)
        ),
    ))
}
