//! What a transport puts in a request's extensions for the layers to read.
//!
//! Every ingress path (HTTP/1 absolute-form and CONNECT, HTTPS inside an
//! intercepted tunnel, SOCKS5 TCP and UDP, Unix sockets) produces an
//! `http::Request` carrying a [`Target`], a [`Protocol`] and a
//! [`ClientAddr`]. [`RequestInfo`] reads them back in one call.

use std::net::SocketAddr;

use crate::error::BadRequest;
use crate::target::Target;

pub use crate::protocol::Protocol;

/// The proxy user a client authenticated as (HTTP `Proxy-Authorization:
/// Basic`, SOCKS5 username/password), in the extensions of each of its
/// requests: an identity a layer can decide or count by. Absent when the
/// proxy asks for no credential.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyUser(pub String);

/// The profile a request was given ([`profiles`](crate::profiles)), in
/// its extensions: put there by
/// [`SelectProfileLayer`](crate::profiles::SelectProfileLayer) (or a layer
/// of yours), read by [`Profiles`](crate::profiles::Profiles), and named in
/// every record of the request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProfileName(pub std::sync::Arc<str>);

impl std::fmt::Display for ProfileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

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

/// The mark limited mode puts on a git fetch it let through: its body has
/// not been seen yet. The innermost service must read the body and refuse
/// the request unless it is an upload-pack request
/// ([`check_upload_pack_request`](crate::git::check_upload_pack_request))
/// before anything is sent; portcullis's connector does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyGitFetchBody;

/// On a response: the credentials added to its request, by name and
/// place (`header:authorization`), never by value. The binary's access
/// file records them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Injected(pub Vec<(String, String)>);

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
