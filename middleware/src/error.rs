//! Refusals as typed errors.
//!
//! A layer refuses by returning a [`BoxError`] whose cause is one of the
//! public types here: [`Blocked`] (a policy refusal, with a [`Reason`] and
//! the [`Source`] that made it), [`BadRequest`] or [`UpstreamError`].
//! [`ProxyErrorRef::find`] walks an error's source chain to the first of
//! them.
//!
//! These types say *what* was refused and why, never how that looks on a
//! wire: each transport of the `portcullis` crate has one rescue function
//! that turns them into a status code, an `x-proxy-error` header and a JSON
//! body, or a SOCKS5 reply code. The table of those answers lives once, in
//! the README ("A refusal").
//!
//! A layer of your own refuses with a reason of its own through
//! [`Reason::Custom`]; see [`Blocked::with_message`].

use std::error::Error as StdError;
use std::fmt;

use crate::protocol::Protocol;
use crate::target::Target;

/// The error type every layer returns.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a request was refused by policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The host is not on the allowlist.
    NotAllowed,
    /// The host is, or resolves to, a local or private address.
    NotAllowedLocal,
    /// The host is on the denylist.
    Denied,
    /// Limited mode does not allow this method (or protocol).
    MethodNotAllowed,
    /// Limited mode needs HTTPS interception to see methods inside CONNECT.
    MitmRequired,
    /// An intercepted tunnel did not start with a TLS ClientHello; it is
    /// closed, never passed on unseen.
    TlsRequired,
    /// The destination is this proxy itself (one of its listeners, or an
    /// upstream proxy that is this proxy): a loop.
    Loop,
    /// An approver answered deny.
    ApprovalDenied,
    /// No answer came from the approver in time.
    ApprovalTimedOut,
    /// The approver failed (crashed, malformed answer, any error).
    ApprovalFailed,
    /// The host has request rules and no `allow` entry matches the request
    /// (or its path cannot be matched safely).
    RuleNotMatched,
    /// A request rule's `deny` entry matches the request.
    RuleDenied,
    /// The host has request rules that name paths, and the request's path
    /// can mean two things to some origin (double encoding, `%u`, an
    /// encoded `/`, a segment ending in `.`, …), so no rule can judge it.
    AmbiguousPath,
    /// A captured connection's first bytes (TLS SNI, HTTP `Host`) named
    /// another host than the one its address maps to.
    HostMismatch,
    /// A credential's placeholder was headed somewhere its secret may not
    /// go (another host, or plain HTTP).
    CredentialMismatch,
    /// The request carries a secret (a token format, or a value the proxy
    /// knows), in its path, query or a header; see [`scan`](crate::scan).
    SecretDetected,
    /// Secret scanning is on and the request's body could not be inspected
    /// (over `[scan] max_body`, or an encoding portcullis cannot undo).
    NotInspected,
    /// The destination's rate limit ([`limits`](crate::limits)) was
    /// reached: a 429 with `Retry-After` over HTTP.
    RateLimited,
    /// The destination's cap on requests in flight and tunnels open at
    /// once was reached: a 429 with `Retry-After: 1` over HTTP.
    ConcurrencyLimited,
    /// The caller is not one a profile is chosen for: an unknown proxy
    /// user, a wrong password, or no credential from an address no
    /// profile's `sources` covers ([`profiles`](crate::profiles)). A 407
    /// over HTTP.
    AuthRequired,
    /// A reason of an integrator's own layer, by name (use lower-case ASCII
    /// letters, digits and `_`, like the built-in names). The transports
    /// answer it like the built-in reasons: a 403 on HTTP with
    /// `x-proxy-error: blocked-by-<name>` (`_` and any other character
    /// outside `a-z0-9` written as `-`) and the usual JSON body; reply 0x02
    /// on SOCKS5.
    Custom(&'static str),
}

impl Reason {
    /// The snake_case name used in logs and JSON bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotAllowed => "not_allowed",
            Reason::NotAllowedLocal => "not_allowed_local",
            Reason::Denied => "denied",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::MitmRequired => "mitm_required",
            Reason::TlsRequired => "tls_required",
            Reason::Loop => "loop",
            Reason::ApprovalDenied => "approval_denied",
            Reason::ApprovalTimedOut => "approval_timed_out",
            Reason::ApprovalFailed => "approval_failed",
            Reason::RuleNotMatched => "rule_not_matched",
            Reason::RuleDenied => "rule_denied",
            Reason::AmbiguousPath => "ambiguous_path",
            Reason::HostMismatch => "host_mismatch",
            Reason::CredentialMismatch => "credential_mismatch",
            Reason::SecretDetected => "secret_detected",
            Reason::NotInspected => "not_inspected",
            Reason::RateLimited => "rate_limited",
            Reason::ConcurrencyLimited => "concurrency_limited",
            Reason::AuthRequired => "auth_required",
            Reason::Custom(name) => name,
        }
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a refusal is final or could have been approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockDecision {
    /// Refused; no approver would be asked.
    Deny,
    /// The policy had no answer and nothing resolved the question.
    Ask,
    /// Not refused: a rule in audit mode would have refused it, and it
    /// went through (recorded, never answered).
    Audit,
}

impl BlockDecision {
    /// `deny` or `ask`.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockDecision::Deny => "deny",
            BlockDecision::Ask => "ask",
            BlockDecision::Audit => "audit",
        }
    }
}

impl serde::Serialize for BlockDecision {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Which part of the proxy made the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// The domain/IP policy layer.
    Policy,
    /// The limited-mode method restriction.
    LimitedMode,
    /// The request rules.
    RequestRules,
    /// The credential guard (a placeholder headed elsewhere).
    Credentials,
    /// The approval wait (an approver's answer, a timeout or a failure).
    Approval,
    /// The connector's check of resolved addresses.
    Connector,
    /// A transport (an intercepted tunnel that did not speak TLS).
    Transport,
    /// The rate limits.
    Limits,
    /// The choice of profile ([`profiles`](crate::profiles)), or a
    /// transport's check of the proxy credential.
    Profiles,
    /// A layer of an integrator's own, by name.
    Layer(&'static str),
}

impl Source {
    /// The snake_case name used in logs and JSON bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Policy => "policy",
            Source::LimitedMode => "limited_mode",
            Source::RequestRules => "request_rules",
            Source::Credentials => "credentials",
            Source::Approval => "approval",
            Source::Connector => "connector",
            Source::Transport => "transport",
            Source::Limits => "limits",
            Source::Profiles => "profiles",
            Source::Layer(name) => name,
        }
    }
}

impl serde::Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A request refused by policy: the one refusal type every layer returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Blocked {
    /// Why.
    pub reason: Reason,
    /// Final, or approvable.
    pub decision: BlockDecision,
    /// Which part of the proxy refused.
    pub source: Source,
    /// The destination refused.
    pub target: Target,
    /// How the request came in.
    pub protocol: Protocol,
    /// The request method.
    pub method: String,
    /// The rule that decided, as written in the configuration, if one did.
    pub rule: Option<String>,
    /// A sentence for the user: what was refused, why, and what to change.
    /// The standard one names the builder/config key to change; an
    /// application words it for its own reader at its edges (portcullis
    /// names a flag under `run`, a key and its file under `--config`),
    /// unless someone wrote it with [`with_message`](Blocked::with_message).
    pub message: String,
    /// The address a name resolved to, when that address is what was
    /// refused (`not_allowed_local` from the connector).
    pub address: Option<std::net::IpAddr>,
    /// The HTTP status a layer of yours wants for this refusal (a 4xx,
    /// e.g. 429), and when to retry; `None`: 403, no `Retry-After`.
    pub status_hint: Option<StatusHint>,
    /// Whether [`message`](Blocked::message) was written by a layer or an
    /// approver rather than made for the reason.
    written: bool,
}

/// How a refusal should be answered over HTTP, when not with a plain 403:
/// set by [`Blocked::with_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusHint {
    /// A client-error status (4xx).
    pub status: http::StatusCode,
    /// The `Retry-After` to send, in whole seconds.
    pub retry_after: Option<std::time::Duration>,
}

impl Blocked {
    /// A refusal with the standard message for `reason`.
    pub fn new(
        reason: Reason,
        source: Source,
        target: Target,
        protocol: Protocol,
        method: &http::Method,
    ) -> Blocked {
        let mut message = default_message(reason, &target, method);
        if protocol.is_lookup() {
            // A question names no port: said as what it is.
            if let Some(rest) = message.strip_prefix(&format!("portcullis refused {target}:")) {
                message = format!(
                    "portcullis refused a DNS question for {}:{rest}",
                    target.host_string()
                );
            }
        }
        Blocked {
            reason,
            decision: BlockDecision::Deny,
            source,
            target,
            protocol,
            method: method.as_str().to_owned(),
            rule: None,
            message,
            address: None,
            status_hint: None,
            written: false,
        }
    }

    /// Whether the message was written with
    /// [`with_message`](Blocked::with_message) (by a layer, an approver, the
    /// connector) rather than made for the reason: a renderer keeps a
    /// written message as it is.
    pub fn message_written(&self) -> bool {
        self.written
    }

    /// Answers this refusal over HTTP with `status` (a 4xx; anything else
    /// is ignored and the answer stays 403) and, when given, a
    /// `Retry-After` header: a rate limit is a 429 that says when to come
    /// back. SOCKS5 still replies 0x02.
    ///
    /// ```
    /// use std::time::Duration;
    /// use portcullis_middleware::{Blocked, Protocol, Reason, Source, Target};
    ///
    /// # fn main() -> Result<(), portcullis_middleware::BoxError> {
    /// let target = Target::parse_authority("api.example.com:443", None)?;
    /// let refusal = Blocked::new(Reason::Custom("rate_limited"), Source::Layer("rate_limit"), target, Protocol::HttpsConnect, &http::Method::CONNECT)
    ///     .with_status(http::StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(30)));
    /// assert_eq!(refusal.status_hint.map(|hint| hint.status.as_u16()), Some(429));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_status(
        mut self,
        status: http::StatusCode,
        retry_after: Option<std::time::Duration>,
    ) -> Blocked {
        if status.is_client_error() {
            self.status_hint = Some(StatusHint {
                status,
                retry_after,
            });
        }
        self
    }

    /// Sets the resolved address that was refused.
    pub fn with_address(mut self, address: std::net::IpAddr) -> Blocked {
        self.address = Some(address);
        self
    }

    /// Sets the rule that decided, and mentions it in the message.
    pub fn with_rule(mut self, rule: Option<String>) -> Blocked {
        // Limited mode refusing what hid in a read (a push's start, an
        // override, a body) says that, not "only GET, HEAD and OPTIONS".
        match (&rule, self.reason) {
            (Some(rule), Reason::MethodNotAllowed) if rule.starts_with("limited mode refuses") => {
                self.message = format!(
                    "portcullis refused {} {}: {rule}; use mode = \"full\" to allow it",
                    self.method.escape_debug(),
                    self.target
                );
            }
            // A configured entry is worth naming; the local-address check
            // already explains itself in the message.
            (Some(rule), reason) if reason != Reason::NotAllowedLocal => {
                self.message.push_str(&format!(" (rule: {rule})"));
            }
            _ => {}
        }
        self.rule = rule;
        self
    }

    /// Sets the decision.
    pub fn with_decision(mut self, decision: BlockDecision) -> Blocked {
        self.decision = decision;
        self
    }

    /// Replaces the message: what was refused, why, and what to change.
    ///
    /// A layer of your own refuses with a reason of its own like this:
    ///
    /// ```
    /// use portcullis_middleware::{Blocked, Protocol, Reason, Source, Target};
    ///
    /// # fn main() -> Result<(), portcullis_middleware::BoxError> {
    /// let target = Target::parse_authority("api.example.com:443", None)?;
    /// let refusal = Blocked::new(
    ///     Reason::Custom("team_header"),
    ///     Source::Layer("require_team"),
    ///     target,
    ///     Protocol::HttpsConnect,
    ///     &http::Method::CONNECT,
    /// )
    /// .with_message("portcullis refused api.example.com:443: requests need an x-team header; set it in the client");
    /// assert_eq!(refusal.reason.as_str(), "team_header");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_message(mut self, message: impl Into<String>) -> Blocked {
        self.message = message.into();
        self.written = true;
        self
    }
}

/// The refusal as data (for JSON bodies and log files): `status`
/// (`"blocked"`), `host`, `port`, `protocol`, `reason`, `decision`,
/// `source`, `method`, `rule`, `message`, and `address` when a name's
/// resolved address was refused.
impl serde::Serialize for Blocked {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut object = serializer.serialize_struct("Blocked", 11)?;
        object.serialize_field("status", "blocked")?;
        object.serialize_field("host", &self.target.host_string())?;
        object.serialize_field("port", &self.target.port())?;
        object.serialize_field("protocol", self.protocol.as_str())?;
        object.serialize_field("reason", &self.reason)?;
        object.serialize_field("decision", &self.decision)?;
        object.serialize_field("source", &self.source)?;
        object.serialize_field("method", &self.method)?;
        object.serialize_field("rule", &self.rule)?;
        object.serialize_field("message", &self.message)?;
        if let Some(address) = &self.address {
            object.serialize_field("address", address)?;
        } else {
            object.skip_field("address")?;
        }
        object.end()
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Blocked {}

/// What kind of local destination a `not_allowed_local` refusal is about,
/// with the exact `host:port` entry that would allow it: the fix differs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalKind {
    /// A cloud metadata address: only an entry naming it exactly unlocks
    /// it.
    Metadata(String),
    /// `localhost`: an allowlist entry naming it allows it.
    Localhost(String),
    /// Any other local or private address: an exact entry, or
    /// `allow_local_binding` with an entry that covers it.
    Address(String),
}

impl LocalKind {
    /// The kind of `target`, with its exact entry (`IP:PORT`, IPv6 in
    /// brackets).
    pub fn of(target: &Target) -> LocalKind {
        let exact = match target {
            Target::Host {
                host: crate::Host::Ip(std::net::IpAddr::V6(v6)),
                port,
            } => format!("[{v6}]:{port}"),
            other => other.to_string(),
        };
        match target {
            Target::Host {
                host: crate::Host::Ip(ip),
                ..
            } if crate::address::is_metadata(*ip) => LocalKind::Metadata(exact),
            Target::Host {
                host: crate::Host::Name(_),
                ..
            } => LocalKind::Localhost(exact),
            _ => LocalKind::Address(exact),
        }
    }
}

fn default_message(reason: Reason, target: &Target, method: &http::Method) -> String {
    let host = target.host_string();
    match reason {
        Reason::NotAllowed => match target {
            Target::Unix(_) => format!(
                "portcullis refused unix socket {host}: it is not in allow_unix_sockets; add it to the config"
            ),
            Target::Host { .. } => format!(
                "portcullis refused {target}: the host is not in allowed_domains; add \"{host}\" there"
            ),
        },
        Reason::NotAllowedLocal => match LocalKind::of(target) {
            LocalKind::Metadata(exact) => format!(
                "portcullis refused {target}: it is a cloud metadata address; only an allowed_domains entry naming that exact address (\"{exact}\") unlocks it, allow_local_binding does not"
            ),
            LocalKind::Localhost(exact) => format!(
                "portcullis refused {target}: {host} is this machine; add \"{exact}\" (or \"{host}\") to allowed_domains to allow it"
            ),
            LocalKind::Address(exact) => format!(
                "portcullis refused {target}: it is a local or private address; add \"{exact}\" to allowed_domains, or set allow_local_binding = true with an allowed_domains entry that covers it"
            ),
        },
        Reason::Denied => format!(
            "portcullis refused {target}: the host is in denied_domains; remove it from the denylist to allow it"
        ),
        Reason::MethodNotAllowed => format!(
            "portcullis refused {} {target}: limited mode allows only GET, HEAD and OPTIONS (and no SOCKS5); use mode = \"full\" to allow it",
            method.as_str().escape_debug()
        ),
        Reason::MitmRequired => format!(
            "portcullis refused CONNECT {target}: limited mode needs HTTPS interception to see methods; set mitm = true in [network] (clients must trust its CA) or use mode = \"full\""
        ),
        Reason::Loop => format!(
            "portcullis refused {target}: it is this proxy itself, so the request would loop; point the client at the destination, not at the proxy"
        ),
        Reason::TlsRequired => format!(
            "portcullis closed the tunnel to {target}: portcullis intercepts it to see its requests (limited mode, request rules, a credential for the host or secret scanning) and the client sent neither TLS nor HTTP/1; only HTTPS or plain HTTP requests can go through an intercepted tunnel"
        ),
        Reason::HostMismatch => format!(
            "portcullis refused {target}: the connection's TLS SNI or HTTP Host names another host than the one its address maps to; connect to the host you name (by the name, resolved inside the run), and allow that host if it is not"
        ),
        Reason::ApprovalDenied => format!(
            "portcullis refused {target}: the approver denied it; add it to allowed_domains if it should be reachable"
        ),
        Reason::ApprovalTimedOut => format!(
            "portcullis refused {target}: no approval arrived in time; approve it sooner or add it to allowed_domains"
        ),
        Reason::ApprovalFailed => format!(
            "portcullis refused {target}: the approver failed, so the request was denied (fail closed); check the approver, or add the host to allowed_domains"
        ),
        Reason::RuleNotMatched => format!(
            "portcullis refused {} {target}: the host has request rules and none allows this request; add an allow entry to its [[rules]] block",
            method.as_str().escape_debug()
        ),
        Reason::RuleDenied => format!(
            "portcullis refused {} {target}: a deny entry of the host's request rules matches; change its [[rules]] block to allow it",
            method.as_str().escape_debug()
        ),
        Reason::AmbiguousPath => format!(
            "portcullis refused {} {target}: the host has request rules on paths, and this path can mean two things to some origin; send it plainly encoded (no double encoding, %u, encoded / or ;, or segment ending in . or a space)",
            method.as_str().escape_debug()
        ),
        Reason::CredentialMismatch => format!(
            "portcullis refused {} {target}: it carries a credential's placeholder, whose secret is only sent to that credential's hosts over TLS; send it there, or drop it from this request",
            method.as_str().escape_debug()
        ),
        Reason::SecretDetected => format!(
            "portcullis refused {} {target}: it carries what looks like a secret; remove it from the request, or set [scan] action = \"audit\" (or add the host to [scan] skip_hosts) if it is not one",
            method.as_str().escape_debug()
        ),
        Reason::NotInspected => format!(
            "portcullis refused {} {target}: secret scanning is on and its body could not be inspected; send a smaller body (or raise [scan] max_body), or add the host to [scan] skip_hosts",
            method.as_str().escape_debug()
        ),
        Reason::RateLimited => format!(
            "portcullis refused {} {target}: its destination's rate limit was reached; retry after the time Retry-After says, or raise requests_per_second or burst in its [[rate_limits]] entry",
            method.as_str().escape_debug()
        ),
        Reason::ConcurrencyLimited => format!(
            "portcullis refused {} {target}: as many requests and tunnels to its destination are open as its limit allows; retry when one closes, or raise concurrent in its [[rate_limits]] entry",
            method.as_str().escape_debug()
        ),
        Reason::AuthRequired => format!(
            "portcullis refused {} {target}: the caller is not one of its users (unknown user or wrong password), and no profile's sources cover its address; use the proxy URL with the user and password of a [[auth.users]] entry",
            method.as_str().escape_debug()
        ),
        Reason::Custom(name) => format!("portcullis refused {target}: {name}"),
    }
}

/// A request the proxy cannot make sense of: a 400 on HTTP, 0x01 on SOCKS5.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    /// What is wrong with the request, for the user.
    pub message: String,
}

impl BadRequest {
    /// A bad request with this explanation.
    pub fn new(message: impl Into<String>) -> BadRequest {
        BadRequest {
            message: message.into(),
        }
    }
}

/// How dialling the upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UpstreamErrorKind {
    /// The upstream refused the connection (or reset it).
    Refused,
    /// The upstream host could not be reached.
    Unreachable,
    /// The network the upstream is on could not be reached.
    NetworkUnreachable,
    /// Connecting (or resolving) took too long.
    TimedOut,
    /// The name did not resolve.
    Unresolved,
}

/// Dialling or talking to the upstream failed.
#[derive(Debug, thiserror::Error)]
#[error("portcullis could not reach {target}: {detail}")]
pub struct UpstreamError {
    /// What kind of failure.
    pub kind: UpstreamErrorKind,
    /// The destination.
    pub target: String,
    /// The underlying error, as text.
    pub detail: String,
}

impl UpstreamError {
    /// An upstream error, classifying an I/O error.
    pub fn from_io(target: impl fmt::Display, error: &std::io::Error) -> UpstreamError {
        use std::io::ErrorKind as K;
        let kind = match error.kind() {
            K::ConnectionRefused | K::ConnectionReset | K::ConnectionAborted => {
                UpstreamErrorKind::Refused
            }
            K::TimedOut => UpstreamErrorKind::TimedOut,
            K::NetworkUnreachable => UpstreamErrorKind::NetworkUnreachable,
            _ => UpstreamErrorKind::Unreachable,
        };
        UpstreamError {
            kind,
            target: target.to_string(),
            detail: error.to_string(),
        }
    }
}

/// The proxy's refusals and failures, gathered for matching.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ProxyErrorRef<'a> {
    /// Refused by policy.
    Blocked(&'a Blocked),
    /// Malformed request.
    BadRequest(&'a BadRequest),
    /// Upstream failure.
    Upstream(&'a UpstreamError),
}

impl<'a> ProxyErrorRef<'a> {
    /// Walks an error's source chain and returns the first proxy error in it.
    pub fn find(error: &'a (dyn StdError + 'static)) -> Option<ProxyErrorRef<'a>> {
        let mut current: Option<&'a (dyn StdError + 'static)> = Some(error);
        while let Some(error) = current {
            if let Some(blocked) = error.downcast_ref::<Blocked>() {
                return Some(ProxyErrorRef::Blocked(blocked));
            }
            if let Some(bad) = error.downcast_ref::<BadRequest>() {
                return Some(ProxyErrorRef::BadRequest(bad));
            }
            if let Some(upstream) = error.downcast_ref::<UpstreamError>() {
                return Some(ProxyErrorRef::Upstream(upstream));
            }
            current = error.source();
        }
        None
    }
}

/// Finds a [`Blocked`] anywhere in an error's source chain.
pub fn find_blocked<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a Blocked> {
    match ProxyErrorRef::find(error) {
        Some(ProxyErrorRef::Blocked(blocked)) => Some(blocked),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Host;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] BoxError);

    #[test]
    fn finds_blocked_through_a_chain() {
        let target = Target::host(Host::Name("example.com".into()), 443);
        let blocked = Blocked::new(
            Reason::Denied,
            Source::Policy,
            target,
            Protocol::HttpsConnect,
            &http::Method::CONNECT,
        );
        let error: BoxError = Box::new(Wrapper(Box::new(blocked.clone())));
        assert_eq!(find_blocked(error.as_ref()), Some(&blocked));
        let json = serde_json::to_value(&blocked).unwrap();
        assert_eq!(json["reason"], "denied");
        assert_eq!(json["port"], 443);
        assert_eq!(json["protocol"], "https_connect");
        assert_eq!(json["decision"], "deny");
        assert!(json["message"].as_str().unwrap().contains("denied_domains"));
        let other: BoxError = "plain".into();
        assert!(ProxyErrorRef::find(other.as_ref()).is_none());
    }
}
