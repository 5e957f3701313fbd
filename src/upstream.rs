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
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use portcullis_middleware::{BoxError, UpstreamError, UpstreamErrorKind};

/// Longest upstream CONNECT response head read.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

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

/// The `host:port` of a proxy URI.
pub(crate) fn proxy_address(intercept: &Intercept) -> Result<String, BoxError> {
    let uri = intercept.uri();
    let host = uri.host().ok_or("the upstream proxy URL has no host")?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    if uri.scheme_str() != Some("http") {
        return Err(
            format!("upstream proxy {uri}: only http:// upstream proxies are supported").into(),
        );
    }
    Ok(format!("{host}:{port}"))
}

/// Connects to the upstream proxy itself.
pub(crate) async fn connect_proxy(
    intercept: &Intercept,
    timeout: Duration,
) -> Result<TcpStream, BoxError> {
    let address = proxy_address(intercept)?;
    match tokio::time::timeout(timeout, TcpStream::connect(&address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => {
            Err(UpstreamError::from_io(format!("upstream proxy {address}"), &error).into())
        }
        Err(_) => Err(UpstreamError {
            kind: UpstreamErrorKind::TimedOut,
            target: format!("upstream proxy {address}"),
            detail: "connect timed out".into(),
        }
        .into()),
    }
}

/// Opens a tunnel to `authority` (`host:port`) through the upstream proxy.
pub(crate) async fn tunnel(
    intercept: &Intercept,
    authority: &str,
    timeout: Duration,
) -> Result<TcpStream, BoxError> {
    let mut stream = connect_proxy(intercept, timeout).await?;
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = intercept.basic_auth().and_then(|v| v.to_str().ok()) {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut response = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    let read_head = async {
        while !response.ends_with(b"\r\n\r\n") {
            if response.len() >= MAX_RESPONSE_HEAD || stream.read(&mut byte).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad CONNECT response",
                ));
            }
            response.push(byte[0]);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read_head).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(UpstreamError::from_io(authority, &error).into()),
        Err(_) => {
            return Err(UpstreamError {
                kind: UpstreamErrorKind::TimedOut,
                target: authority.to_owned(),
                detail: "the upstream proxy did not answer CONNECT in time".into(),
            }
            .into())
        }
    }
    let status_ok = response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200");
    if !status_ok {
        let line =
            String::from_utf8_lossy(response.split(|b| *b == b'\r').next().unwrap_or_default())
                .into_owned();
        return Err(UpstreamError {
            kind: UpstreamErrorKind::Refused,
            target: authority.to_owned(),
            detail: format!("the upstream proxy answered {}", line.escape_debug()),
        }
        .into());
    }
    Ok(stream)
}
