//! The one ingress step: what a transport parsed about a request, put into
//! the request's extensions the same way on every way in (HTTP/1, the
//! intercepted tunnel, SOCKS5 TCP and UDP, Unix sockets, `check`, and a
//! transport of your own through [`kit`](crate::kit)).

use std::net::SocketAddr;

use http::{Extensions, Request};
use portcullis_middleware::{BoxError, ClientAddr, HasBody, Protocol, ProxyUser, Target};

use crate::body::Body;

/// The request model a transport builds: the destination it parsed, the
/// protocol, the client, the proxy user it authenticated, and the marks
/// only the transport can know ([`CameRound`](portcullis_middleware::CameRound),
/// [`NotTls`](portcullis_middleware::NotTls),
/// [`Interceptable`](portcullis_middleware::Interceptable),
/// [`UdpAssociation`](portcullis_middleware::UdpAssociation), [`HasBody`]).
/// Every layer reads these, never the `Host` header.
#[derive(Debug)]
pub struct RequestModel {
    target: Target,
    protocol: Protocol,
    client: SocketAddr,
    marks: Extensions,
}

impl RequestModel {
    /// The model of a request from `client` to `target` over `protocol`.
    pub fn new(target: Target, protocol: Protocol, client: SocketAddr) -> RequestModel {
        RequestModel {
            target,
            protocol,
            client,
            marks: Extensions::new(),
        }
    }

    /// The proxy user the client authenticated as, if it did.
    pub fn user(self, user: Option<ProxyUser>) -> RequestModel {
        match user {
            Some(user) => self.mark(user),
            None => self,
        }
    }

    /// Marks the request as carrying a body (limited mode refuses a read
    /// that carries one).
    pub fn has_body(self, has_body: bool) -> RequestModel {
        if has_body {
            self.mark(HasBody)
        } else {
            self
        }
    }

    /// Adds a mark a layer reads from the request's extensions.
    pub fn mark<T: Clone + Send + Sync + 'static>(mut self, mark: T) -> RequestModel {
        self.marks.insert(mark);
        self
    }

    /// The destination.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Puts the model into a request the transport parsed.
    pub fn apply<B>(self, request: &mut Request<B>) {
        let extensions = request.extensions_mut();
        extensions.insert(self.target);
        extensions.insert(self.protocol);
        extensions.insert(ClientAddr(self.client));
        extensions.extend(self.marks);
    }

    /// A `CONNECT host:port` request with an empty body and the model in
    /// its extensions: what SOCKS5 (TCP, the association and each UDP
    /// destination), a refused intercepted tunnel, `check`, and a
    /// byte-stream transport of your own send through the stack.
    pub fn connect(self) -> Result<Request<Body>, BoxError> {
        let mut request = Request::connect(self.target.to_string()).body(crate::body::empty())?;
        self.apply(&mut request);
        Ok(request)
    }
}
