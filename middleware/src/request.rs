//! What a transport puts in a request's extensions for the layers to read.
//!
//! Every ingress path (HTTP/1 absolute-form and CONNECT, HTTPS inside an
//! intercepted tunnel, SOCKS5 TCP and UDP, Unix sockets) produces an
//! `http::Request` carrying a [`Target`], a [`Protocol`] and a
//! [`ClientAddr`]. [`RequestInfo`] reads them back in one call.

use std::fmt;
use std::net::SocketAddr;

use crate::error::BadRequest;
use crate::target::Target;

/// The way a request entered the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Protocol {
    /// A plain HTTP/1 request in absolute form.
    Http,
    /// An HTTP/1 `CONNECT` tunnel (TLS passes through unseen).
    HttpsConnect,
    /// A request inside an intercepted (MITM) HTTPS tunnel.
    HttpsMitm,
    /// A SOCKS5 `CONNECT`.
    Socks5Tcp,
    /// A new destination of a SOCKS5 `UDP ASSOCIATE`.
    Socks5Udp,
    /// A plain HTTP request forwarded to a Unix socket (`x-unix-socket`).
    UnixSocket,
}

impl Protocol {
    /// The name used on the wire, in logs and in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::HttpsConnect => "https_connect",
            Protocol::HttpsMitm => "https_mitm",
            Protocol::Socks5Tcp => "socks5_tcp",
            Protocol::Socks5Udp => "socks5_udp",
            Protocol::UnixSocket => "unix_socket",
        }
    }

    /// Whether the request asks for a byte stream (CONNECT-shaped) rather
    /// than an HTTP exchange forwarded request by request.
    pub fn is_tunnel(self) -> bool {
        matches!(
            self,
            Protocol::HttpsConnect | Protocol::Socks5Tcp | Protocol::Socks5Udp
        )
    }

    /// Whether the request came in over SOCKS5.
    pub fn is_socks(self) -> bool {
        matches!(self, Protocol::Socks5Tcp | Protocol::Socks5Udp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The address of the client connection a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Marks a `CONNECT` whose tunnel the transport will intercept (MITM), so
/// that limited mode can let it through and check each inner request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Intercepted;

/// Marks a request that carries a body (the transport saw one coming), so
/// that limited mode can refuse a read that carries one: bodies are how
/// writes hide in reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HasBody;

/// The destination, protocol and client of a request, read from its
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// The canonical destination.
    pub target: Target,
    /// How the request came in.
    pub protocol: Protocol,
    /// The client's address, when the transport knows it.
    pub client: Option<SocketAddr>,
    /// The request method, as sent.
    pub method: http::Method,
}

impl RequestInfo {
    /// Reads the request model from a request. A request without a `Target`
    /// or `Protocol` is refused (fail closed): it did not come through a
    /// transport that parsed it.
    pub fn from_request<B>(request: &http::Request<B>) -> Result<RequestInfo, BadRequest> {
        let extensions = request.extensions();
        let target = extensions.get::<Target>().cloned().ok_or_else(|| {
            BadRequest::new("the request carries no parsed destination (no Target extension)")
        })?;
        let protocol = extensions
            .get::<Protocol>()
            .copied()
            .ok_or_else(|| BadRequest::new("the request carries no Protocol extension"))?;
        Ok(RequestInfo {
            target,
            protocol,
            client: extensions.get::<ClientAddr>().map(|c| c.0),
            method: request.method().clone(),
        })
    }
}
