//! The way a request entered the proxy: data, below everything that
//! decides or records by it.

use std::fmt;

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
