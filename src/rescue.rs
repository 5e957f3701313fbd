//! The one place per transport where errors become wire answers.

use http::{HeaderValue, Response, StatusCode};
use portcullis_middleware::{BoxError, ProxyErrorRef, UpstreamErrorKind};

use crate::body::{self, Body};

/// The response header naming why the proxy refused a request.
pub const X_PROXY_ERROR: &str = "x-proxy-error";

/// Turns an error from the stack into an HTTP response:
///
/// | error | status | `x-proxy-error` |
/// | --- | --- | --- |
/// | `Blocked` | 403 | `blocked-by-allowlist`, `blocked-by-denylist`, `blocked-by-method-policy`, `blocked-by-mitm-required`, `blocked-by-policy` |
/// | `BadRequest` | 400 | `bad-request` |
/// | `UpstreamError` refused / unreachable / unresolved | 502 | `upstream-unreachable` |
/// | `UpstreamError` timed out | 504 | `upstream-timeout` |
/// | anything else | 502 | `proxy-error` (and a warning in the log) |
///
/// Every body is one JSON object and a newline.
pub fn http_response(error: &BoxError) -> Response<Body> {
    match ProxyErrorRef::find(error.as_ref()) {
        Some(ProxyErrorRef::Blocked(blocked)) => json_response(
            StatusCode::FORBIDDEN,
            blocked.reason.header_value(),
            blocked.to_json(),
        ),
        Some(ProxyErrorRef::BadRequest(bad)) => bad_request(&bad.message),
        Some(ProxyErrorRef::Upstream(upstream)) => {
            let (status, header) = match upstream.kind {
                UpstreamErrorKind::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "upstream-timeout"),
                _ => (StatusCode::BAD_GATEWAY, "upstream-unreachable"),
            };
            let kind = match upstream.kind {
                UpstreamErrorKind::Refused => "refused",
                UpstreamErrorKind::TimedOut => "timed_out",
                UpstreamErrorKind::Unresolved => "unresolved",
                UpstreamErrorKind::NetworkUnreachable => "network_unreachable",
                _ => "unreachable",
            };
            json_response(
                status,
                header,
                serde_json::json!({"status": "upstream_error", "kind": kind, "target": upstream.target, "message": upstream.to_string()}),
            )
        }
        _ => {
            tracing::warn!(error = %error, "unexpected proxy error");
            json_response(
                StatusCode::BAD_GATEWAY,
                "proxy-error",
                serde_json::json!({"status": "error", "message": format!("portcullis could not complete the request: {error}")}),
            )
        }
    }
}

/// A 400 with a reason.
pub fn bad_request(message: &str) -> Response<Body> {
    json_response(
        StatusCode::BAD_REQUEST,
        "bad-request",
        serde_json::json!({"status": "bad_request", "message": message}),
    )
}

fn json_response(
    status: StatusCode,
    header: &'static str,
    body: serde_json::Value,
) -> Response<Body> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(X_PROXY_ERROR, HeaderValue::from_static(header));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The SOCKS5 reply code for an error: refusals 0x02, bad requests 0x01,
/// connection refused 0x05, host unreachable or unresolved 0x04, network
/// unreachable 0x03, timeouts 0x06, anything else 0x01.
pub fn socks5_reply_code(error: &BoxError) -> u8 {
    match ProxyErrorRef::find(error.as_ref()) {
        Some(ProxyErrorRef::Blocked(_)) => 0x02,
        Some(ProxyErrorRef::BadRequest(_)) => 0x01,
        Some(ProxyErrorRef::Upstream(upstream)) => match upstream.kind {
            UpstreamErrorKind::Refused => 0x05,
            UpstreamErrorKind::TimedOut => 0x06,
            UpstreamErrorKind::NetworkUnreachable => 0x03,
            _ => 0x04,
        },
        _ => 0x01,
    }
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
    fn wire_answers() {
        let target = Target::parse_authority("x.test:443", None).unwrap();
        let blocked: BoxError = Blocked::new(
            Reason::Denied,
            Source::Policy,
            target,
            Protocol::Socks5Tcp,
            &http::Method::CONNECT,
        )
        .into();
        let cases: Vec<(BoxError, u16, &str, u8)> = vec![
            (blocked, 403, "blocked-by-denylist", 0x02),
            (BadRequest::new("bad").into(), 400, "bad-request", 0x01),
            (
                upstream(UpstreamErrorKind::Refused),
                502,
                "upstream-unreachable",
                0x05,
            ),
            (
                upstream(UpstreamErrorKind::Unreachable),
                502,
                "upstream-unreachable",
                0x04,
            ),
            (
                upstream(UpstreamErrorKind::Unresolved),
                502,
                "upstream-unreachable",
                0x04,
            ),
            (
                upstream(UpstreamErrorKind::NetworkUnreachable),
                502,
                "upstream-unreachable",
                0x03,
            ),
            (
                upstream(UpstreamErrorKind::TimedOut),
                504,
                "upstream-timeout",
                0x06,
            ),
            ("something else".into(), 502, "proxy-error", 0x01),
        ];
        for (error, status, header, reply) in cases {
            let response = http_response(&error);
            assert_eq!(response.status().as_u16(), status, "{error}");
            assert_eq!(response.headers()[X_PROXY_ERROR], header, "{error}");
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "application/json"
            );
            assert_eq!(socks5_reply_code(&error), reply, "{error}");
        }
    }
}
