//! Refusals as typed errors.
//!
//! A layer refuses by returning a [`BoxError`] whose cause is one of the
//! public types here. Each transport has one rescue function that finds the
//! cause with [`ProxyErrorRef::find`] and writes the matching wire answer:
//!
//! | cause | HTTP | SOCKS5 reply |
//! | --- | --- | --- |
//! | [`Blocked`] (any [`Reason`]) | 403, `x-proxy-error: Reason::header_value`, JSON body | 0x02 |
//! | [`BadRequest`] | 400 | 0x01 |
//! | [`UpstreamError`] refused / host unreachable / unresolved / network unreachable / timed out | 502 / 502 / 502 / 502 / 504 | 0x05 / 0x04 / 0x04 / 0x03 / 0x06 |
//!
//! Anything else is a 502 and a warning in the log.

use std::error::Error as StdError;
use std::fmt;

use crate::request::Protocol;
use crate::target::Target;

/// The error type every layer returns.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a request was refused by policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
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
    /// An approver answered deny.
    ApprovalDenied,
    /// No answer came from the approver in time.
    ApprovalTimedOut,
    /// The approver failed (crashed, malformed answer, any error).
    ApprovalFailed,
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
            Reason::ApprovalDenied => "approval_denied",
            Reason::ApprovalTimedOut => "approval_timed_out",
            Reason::ApprovalFailed => "approval_failed",
        }
    }

    /// The value of the `x-proxy-error` response header for this reason.
    pub fn header_value(self) -> &'static str {
        match self {
            Reason::NotAllowed | Reason::NotAllowedLocal => "blocked-by-allowlist",
            Reason::Denied => "blocked-by-denylist",
            Reason::MethodNotAllowed => "blocked-by-method-policy",
            Reason::MitmRequired => "blocked-by-mitm-required",
            Reason::ApprovalDenied | Reason::ApprovalTimedOut | Reason::ApprovalFailed => {
                "blocked-by-policy"
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a refusal is final or could have been approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockDecision {
    /// Refused; no approver would be asked.
    Deny,
    /// The policy had no answer and nothing resolved the question.
    Ask,
}

impl BlockDecision {
    /// `deny` or `ask`.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockDecision::Deny => "deny",
            BlockDecision::Ask => "ask",
        }
    }
}

/// Which part of the proxy made the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Source {
    /// The domain/IP policy layer.
    Policy,
    /// The limited-mode method restriction.
    LimitedMode,
    /// The approval wait (an approver's answer, a timeout or a failure).
    Approval,
    /// The connector's check of resolved addresses.
    Connector,
}

impl Source {
    /// The snake_case name used in logs and JSON bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Policy => "policy",
            Source::LimitedMode => "limited_mode",
            Source::Approval => "approval",
            Source::Connector => "connector",
        }
    }
}

/// A request refused by policy: the one refusal type every layer returns.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub message: String,
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
        let message = default_message(reason, &target, method);
        Blocked {
            reason,
            decision: BlockDecision::Deny,
            source,
            target,
            protocol,
            method: method.as_str().to_owned(),
            rule: None,
            message,
        }
    }

    /// Sets the rule that decided, and mentions it in the message.
    pub fn with_rule(mut self, rule: Option<String>) -> Blocked {
        // A configured entry is worth naming; the local-address check already
        // explains itself in the message.
        if let (Some(rule), false) = (&rule, self.reason == Reason::NotAllowedLocal) {
            self.message.push_str(&format!(" (rule: {rule})"));
        }
        self.rule = rule;
        self
    }

    /// Sets the decision.
    pub fn with_decision(mut self, decision: BlockDecision) -> Blocked {
        self.decision = decision;
        self
    }

    /// The JSON body sent with a 403: `status`, `host`, `port`, `protocol`,
    /// `reason`, `decision`, `source`, `method`, `rule`, `message`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "status": "blocked",
            "host": self.target.host_string(),
            "port": self.target.port(),
            "protocol": self.protocol.as_str(),
            "reason": self.reason.as_str(),
            "decision": self.decision.as_str(),
            "source": self.source.as_str(),
            "method": self.method,
            "rule": self.rule,
            "message": self.message,
        })
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Blocked {}

fn default_message(reason: Reason, target: &Target, method: &http::Method) -> String {
    let host = target.host_string();
    match reason {
        Reason::NotAllowed => match target {
            Target::Unix(_) => format!(
                "portcullis refused unix socket {host}: it is not in allow_unix_sockets; add it to the config"
            ),
            Target::Host { .. } => format!(
                "portcullis refused {target}: the host is not in allowed_domains; add it to the config or approve it"
            ),
        },
        Reason::NotAllowedLocal => format!(
            "portcullis refused {target}: it is a local or private address; allow that exact address (for example --allow {host}) or set allow_local_binding = true"
        ),
        Reason::Denied => format!(
            "portcullis refused {target}: the host is in denied_domains; remove it from the denylist to allow it"
        ),
        Reason::MethodNotAllowed => format!(
            "portcullis refused {} {target}: limited mode allows only GET, HEAD and OPTIONS (and no SOCKS5); use mode = \"full\" to allow it",
            method.as_str().escape_debug()
        ),
        Reason::MitmRequired => format!(
            "portcullis refused CONNECT {target}: limited mode needs HTTPS interception to see methods; enable [network.mitm] or use mode = \"full\""
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
        let json = blocked.to_json();
        assert_eq!(json["reason"], "denied");
        assert_eq!(json["port"], 443);
        assert_eq!(json["protocol"], "https_connect");
        assert_eq!(json["decision"], "deny");
        assert!(json["message"].as_str().unwrap().contains("denied_domains"));
        let other: BoxError = "plain".into();
        assert!(ProxyErrorRef::find(other.as_ref()).is_none());
    }
}
