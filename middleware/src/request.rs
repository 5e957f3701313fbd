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

/// The way a request entered the proxy. Layers ask it what they need
/// ([`methods_visible`](Protocol::methods_visible),
/// [`is_tunnel`](Protocol::is_tunnel),
/// [`is_intercepted`](Protocol::is_intercepted)) rather than naming
/// transports, so a transport of your own
/// ([`Custom`](Protocol::Custom)) is judged by what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Protocol {
    /// A plain HTTP/1 request in absolute form.
    Http,
    /// An HTTP/1 `CONNECT` tunnel (TLS passes through unseen, unless
    /// intercepted).
    HttpsConnect,
    /// A request inside an intercepted (MITM) HTTPS tunnel.
    HttpsMitm,
    /// A SOCKS5 `CONNECT`.
    Socks5Tcp,
    /// A new destination of a SOCKS5 `UDP ASSOCIATE`.
    Socks5Udp,
    /// A plain HTTP request forwarded to a Unix socket (`x-unix-socket`).
    UnixSocket,
    /// A TCP connection captured under `run --isolate` (any address, any
    /// port), by the name its address maps to when the program resolved it
    /// through the policy DNS server, else by IP: a byte stream like a
    /// `CONNECT`, which can be intercepted when it carries TLS.
    Transparent,
    /// A DNS question asked under `run --isolate`, as a synthesized request
    /// for the name with port 0 ("any port"): the name is answered only when
    /// a connection to it on some port could be allowed. Nothing is dialled
    /// and no resolver is asked; the connection that follows is decided on
    /// its own.
    Dns,
    /// A way in of your own, by name (lower-case, `snake_case`, as it
    /// should appear in logs): a byte stream to its target, whose methods
    /// the stack cannot see (limited mode refuses it whole).
    Custom(&'static str),
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
            Protocol::Transparent => "transparent",
            Protocol::Dns => "dns",
            Protocol::Custom(name) => name,
        }
    }

    /// Whether the request asks for a byte stream (CONNECT-shaped) rather
    /// than an HTTP exchange forwarded request by request.
    pub fn is_tunnel(self) -> bool {
        matches!(
            self,
            Protocol::HttpsConnect
                | Protocol::Socks5Tcp
                | Protocol::Socks5Udp
                | Protocol::Transparent
                | Protocol::Custom(_)
        )
    }

    /// Whether each HTTP request (its method, path and headers) passes
    /// through the stack, so a method or request rule can be applied.
    pub fn methods_visible(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::HttpsMitm | Protocol::UnixSocket
        )
    }

    /// Whether a tunnel of this kind can be intercepted, so that its
    /// requests become visible (an HTTP `CONNECT`).
    pub fn can_intercept(self) -> bool {
        matches!(self, Protocol::HttpsConnect | Protocol::Transparent)
    }

    /// Whether the request is a name lookup ([`Dns`](Protocol::Dns)): it
    /// names a host but opens nothing, so only the host is decided.
    pub fn is_lookup(self) -> bool {
        self == Protocol::Dns
    }

    /// Whether the request came from inside an intercepted tunnel.
    pub fn is_intercepted(self) -> bool {
        self == Protocol::HttpsMitm
    }
}

/// By name: `"http"`, `"https_connect"`, …, or a custom protocol's name.
impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The proxy user a client authenticated as (HTTP `Proxy-Authorization:
/// Basic`, SOCKS5 username/password), in the extensions of each of its
/// requests: an identity a layer can decide or count by. Absent when the
/// proxy asks for no credential.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyUser(pub String);

/// The address of the client connection a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The transport's offer, on a `CONNECT`: it can intercept this tunnel
/// (terminate its TLS and send each request inside back through the
/// stack) if a layer asks. Without it, a layer that must see methods
/// refuses the tunnel (limited mode: `mitm_required`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interceptable;

/// A layer's answer, in the extensions of the stack's response to an
/// [`Interceptable`] `CONNECT`: intercept this tunnel rather than relay it
/// opaquely. Limited mode asks for it; the transport decides nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Intercept;

/// A layer's answer, in the extensions of the stack's response to a
/// WebSocket upgrade it let through to a host with request rules: once the
/// origin switches protocols, every byte both ways must be a WebSocket
/// frame (masked from the client, unmasked from the origin). The
/// transport closes the connection at the first byte that is not; no rule
/// can judge an arbitrary stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WebSocketFramesOnly;

/// Marks a SOCKS5 `UDP ASSOCIATE` sent through the stack as a synthesized
/// request (protocol `socks5_udp`, method `CONNECT`, the client's address as
/// its [`Target`]). It names no destination: the policy passes it, each
/// datagram is decided on its own later; limited mode refuses it whole
/// (datagrams carry no method), and the connector answers it without
/// dialling anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpAssociation;

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

#[cfg(test)]
mod tests {
    use super::Protocol::{self, *};

    #[test]
    fn layers_ask_capabilities_not_names() {
        // (protocol, tunnel, methods visible, can intercept, intercepted)
        let table: [(Protocol, bool, bool, bool, bool); 9] = [
            (Http, false, true, false, false),
            (HttpsConnect, true, false, true, false),
            (HttpsMitm, false, true, false, true),
            (Socks5Tcp, true, false, false, false),
            (Socks5Udp, true, false, false, false),
            (UnixSocket, false, true, false, false),
            (Transparent, true, false, true, false),
            (Dns, false, false, false, false),
            (Custom("line"), true, false, false, false),
        ];
        for (protocol, tunnel, visible, intercept, intercepted) in table {
            assert_eq!(protocol.is_tunnel(), tunnel, "{protocol}");
            assert_eq!(protocol.methods_visible(), visible, "{protocol}");
            assert_eq!(protocol.can_intercept(), intercept, "{protocol}");
            assert_eq!(protocol.is_intercepted(), intercepted, "{protocol}");
        }
        assert_eq!(Custom("line").as_str(), "line");
        assert_eq!(
            serde_json::to_string(&Custom("line")).ok().as_deref(),
            Some("\"line\"")
        );
        assert_eq!(
            serde_json::to_string(&HttpsConnect).ok().as_deref(),
            Some("\"https_connect\"")
        );
    }
}
