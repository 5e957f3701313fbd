//! The one place where the stack's errors become SOCKS5 reply codes
//! (RFC 1928 §6). The table of answers is the README's ("A refusal").

use fast_socks5::ReplyError;
use portcullis_middleware::{BoxError, ProxyErrorRef, UpstreamErrorKind};

/// The reply for an error: refusals 0x02, bad requests 0x01, connection
/// refused 0x05, host unreachable or unresolved 0x04, network unreachable
/// 0x03, timeouts 0x06, anything else 0x01 (general failure).
pub(crate) fn reply(error: &BoxError) -> ReplyError {
    match ProxyErrorRef::find(error.as_ref()) {
        Some(ProxyErrorRef::Blocked(_)) => ReplyError::ConnectionNotAllowed,
        Some(ProxyErrorRef::BadRequest(_)) => ReplyError::GeneralFailure,
        Some(ProxyErrorRef::Upstream(upstream)) => match upstream.kind {
            UpstreamErrorKind::Refused => ReplyError::ConnectionRefused,
            UpstreamErrorKind::TimedOut => ReplyError::ConnectionTimeout,
            UpstreamErrorKind::NetworkUnreachable => ReplyError::NetworkUnreachable,
            _ => ReplyError::HostUnreachable,
        },
        _ => {
            tracing::warn!(error = %error, "unexpected proxy error on SOCKS5");
            ReplyError::GeneralFailure
        }
    }
}

/// The reply past a resource bound of `[limits]` (the UDP associations a
/// client may hold): general failure, 0x01, as past the connection limit.
pub(crate) fn busy() -> ReplyError {
    ReplyError::GeneralFailure
}

/// The whole reply written past the connection limit, before any of the
/// session is handled by fast-socks5: [`busy`]'s code, no bound address.
pub(crate) fn busy_reply_bytes() -> [u8; 10] {
    [5, busy().as_u8(), 0, 1, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_middleware::{
        BadRequest, Blocked, Protocol, Reason, Source, Target, UpstreamError,
    };

    fn upstream(kind: UpstreamErrorKind) -> BoxError {
        UpstreamError {
            kind,
            target: "x.test:1".into(),
            detail: "d".into(),
        }
        .into()
    }

    #[test]
    fn every_error_has_its_reply_code() {
        let target = Target::parse_authority("x.test:443", None).unwrap();
        let blocked = |reason| -> BoxError {
            Blocked::new(
                reason,
                Source::Policy,
                target.clone(),
                Protocol::Socks5Tcp,
                &http::Method::CONNECT,
            )
            .into()
        };
        let cases: Vec<(BoxError, u8)> = vec![
            (blocked(Reason::NotAllowed), 0x02),
            (blocked(Reason::NotAllowedLocal), 0x02),
            (blocked(Reason::Denied), 0x02),
            (blocked(Reason::MethodNotAllowed), 0x02),
            (blocked(Reason::ApprovalTimedOut), 0x02),
            (blocked(Reason::Custom("mine")), 0x02),
            (BadRequest::new("bad").into(), 0x01),
            (upstream(UpstreamErrorKind::Refused), 0x05),
            (upstream(UpstreamErrorKind::Unreachable), 0x04),
            (upstream(UpstreamErrorKind::Unresolved), 0x04),
            (upstream(UpstreamErrorKind::NetworkUnreachable), 0x03),
            (upstream(UpstreamErrorKind::TimedOut), 0x06),
            ("something else".into(), 0x01),
        ];
        for (error, code) in cases {
            assert_eq!(reply(&error).as_u8(), code, "{error}");
        }
    }
}
