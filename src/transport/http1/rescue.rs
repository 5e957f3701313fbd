//! The one place where the stack's errors become HTTP answers: a status, an
//! `x-proxy-error` header and a JSON body. The table of answers is the
//! README's ("A refusal"); this function is its only implementation.

use std::borrow::Cow;

use http::{HeaderValue, Response, StatusCode};
use portcullis_middleware::{BoxError, ProxyErrorRef, Reason, UpstreamErrorKind};

use crate::body::{self, Body};
use crate::hints::Fixes;

/// The response header naming why the proxy refused a request.
pub(crate) const X_PROXY_ERROR: &str = "x-proxy-error";

/// Turns an error from the stack into an HTTP response. Every body is one
/// JSON object and a newline; an error that is none of ours is a 502 and a
/// warning in the log, never a silent close.
/// The same refusal as a gRPC client reads one: a trailers-only answer
/// (`200`, `content-type: application/grpc`, `grpc-status` 7
/// PERMISSION_DENIED for a refusal, 3 INVALID_ARGUMENT for a bad request,
/// 14 UNAVAILABLE for an upstream failure) with the message in
/// `grpc-message` (percent-encoded) and the usual `x-proxy-error`.
pub(crate) fn grpc_response(error: &BoxError, fixes: &Fixes) -> Response<Body> {
    let plain = http_response(error, fixes);
    let (code, message) = match ProxyErrorRef::find(error.as_ref()) {
        Some(ProxyErrorRef::Blocked(blocked)) => (7, fixes.message(blocked)),
        Some(ProxyErrorRef::BadRequest(bad)) => (3, bad.message.clone()),
        _ => (14, error.to_string()),
    };
    let mut response = Response::new(crate::body::empty());
    let headers = response.headers_mut();
    if let Some(refusal) = plain.headers().get("x-proxy-error") {
        headers.insert("x-proxy-error", refusal.clone());
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    // gRPC's percent-encoding: printable ASCII but `%` stays as is.
    let encoded: String = message
        .bytes()
        .map(|byte| match byte {
            b' '..=b'~' if byte != b'%' => char::from(byte).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect();
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
    response
}

pub(crate) fn http_response(error: &BoxError, fixes: &Fixes) -> Response<Body> {
    match ProxyErrorRef::find(error.as_ref()) {
        Some(ProxyErrorRef::Blocked(blocked)) => {
            let hint = blocked.status_hint;
            let mut body = serde_json::to_value(blocked).unwrap_or_default();
            if let Some(message) = fixes.rephrase(blocked) {
                body["message"] = message.into();
            }
            let mut response = json_response(
                hint.map_or(StatusCode::FORBIDDEN, |hint| hint.status),
                refusal_header(blocked.reason),
                body,
            );
            if let Some(after) = hint.and_then(|hint| hint.retry_after) {
                response.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(after.as_secs()),
                );
            }
            response
        }
        Some(ProxyErrorRef::BadRequest(bad)) => bad_request(&bad.message),
        Some(ProxyErrorRef::Upstream(upstream)) => {
            let (status, header, kind) = match upstream.kind {
                UpstreamErrorKind::TimedOut => {
                    (StatusCode::GATEWAY_TIMEOUT, "upstream-timeout", "timed_out")
                }
                UpstreamErrorKind::Refused => {
                    (StatusCode::BAD_GATEWAY, "upstream-unreachable", "refused")
                }
                UpstreamErrorKind::Unresolved => (
                    StatusCode::BAD_GATEWAY,
                    "upstream-unreachable",
                    "unresolved",
                ),
                UpstreamErrorKind::NetworkUnreachable => (
                    StatusCode::BAD_GATEWAY,
                    "upstream-unreachable",
                    "network_unreachable",
                ),
                _ => (
                    StatusCode::BAD_GATEWAY,
                    "upstream-unreachable",
                    "unreachable",
                ),
            };
            json_response(
                status,
                header.into(),
                synthetic(
                    "upstream_error",
                    Some(kind),
                    Some(&upstream.target),
                    &upstream.to_string(),
                ),
            )
        }
        _ => {
            tracing::warn!(error = %error, "unexpected proxy error");
            json_response(
                StatusCode::BAD_GATEWAY,
                "proxy-error".into(),
                synthetic(
                    "error",
                    None,
                    None,
                    &format!("portcullis could not complete the request: {error}"),
                ),
            )
        }
    }
}

/// The `x-proxy-error` value of a refusal.
fn refusal_header(reason: Reason) -> Cow<'static, str> {
    Cow::Borrowed(match reason {
        Reason::NotAllowed | Reason::NotAllowedLocal => "blocked-by-allowlist",
        Reason::Denied => "blocked-by-denylist",
        Reason::MethodNotAllowed => "blocked-by-method-policy",
        Reason::MitmRequired | Reason::TlsRequired => "blocked-by-mitm-required",
        Reason::Loop => "blocked-by-loop-guard",
        Reason::RuleNotMatched | Reason::RuleDenied | Reason::AmbiguousPath => {
            "blocked-by-request-rule"
        }
        Reason::CredentialMismatch => "blocked-by-credential-guard",
        Reason::SecretDetected | Reason::NotInspected => "blocked-by-secret-scan",
        Reason::RateLimited | Reason::ConcurrencyLimited => "blocked-by-rate-limit",
        Reason::AuthRequired => "proxy-auth-required",
        Reason::ApprovalDenied | Reason::ApprovalTimedOut | Reason::ApprovalFailed => {
            "blocked-by-policy"
        }
        // An integrator's reason, by its name, in the same `blocked-by-` family.
        other => {
            let name: String = other
                .as_str()
                .chars()
                .map(|c| match c {
                    'a'..='z' | '0'..='9' => c,
                    'A'..='Z' => c.to_ascii_lowercase(),
                    _ => '-',
                })
                .collect();
            return Cow::Owned(format!("blocked-by-{name}"));
        }
    })
}

/// The body of every answer that is not a refusal (400, 405, 407, 431,
/// 502, 503, 504): one shape, `status` (a word), `kind` (the detail, or
/// null), `target` (`host:port`, or null) and `message`.
pub(crate) fn synthetic(
    status: &str,
    kind: Option<&str>,
    target: Option<&str>,
    message: &str,
) -> serde_json::Value {
    serde_json::json!({"status": status, "kind": kind, "target": target, "message": message})
}

/// An answer of the transport's own (a 405 for a nested CONNECT, …).
pub(crate) fn status(status: StatusCode, header: &'static str, message: &str) -> Response<Body> {
    json_response(
        status,
        header.into(),
        synthetic("bad_request", None, None, message),
    )
}

/// The whole 503 written to a client past the connection limit, before
/// any HTTP is read: the same body shape as every other answer.
pub(crate) fn busy_bytes() -> Vec<u8> {
    let mut body = synthetic(
        "busy",
        None,
        None,
        "portcullis is serving as many connections as it allows ([limits] max_connections); try again shortly",
    )
    .to_string();
    body.push('\n');
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n{X_PROXY_ERROR}: proxy-busy\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A 407: this proxy needs the credentials it was started with.
pub(crate) fn authentication_required() -> Response<Body> {
    json_response(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "proxy-auth-required".into(),
        synthetic(
            "auth_required",
            None,
            None,
            "portcullis needs the proxy credentials it was started with: use the proxy URL it printed (http://user:password@host:port)",
        ),
    )
}

/// A 431: the request head is over `[limits] max_header_bytes` or
/// `max_headers`.
pub(crate) fn head_too_large(limits: &crate::Limits) -> Response<Body> {
    json_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "header-too-large".into(),
        synthetic(
            "header_too_large",
            None,
            None,
            &format!(
                "portcullis refused the request: its head is over {} bytes or {} headers ([limits] max_header_bytes, max_headers); send smaller headers or raise the limit",
                limits.max_header_bytes, limits.max_headers
            ),
        ),
    )
}

/// A 502: a layer asked to intercept a tunnel this listener cannot
/// intercept (no `mitm` CA). Never relayed opaquely instead.
pub(crate) fn cannot_intercept() -> Response<Body> {
    json_response(
        StatusCode::BAD_GATEWAY,
        "proxy-error".into(),
        synthetic(
            "error",
            Some("cannot_intercept"),
            None,
            "portcullis was asked to intercept this tunnel but this listener has no interception CA; turn interception on ([mitm] / --mitm) or remove the layer that asks for it",
        ),
    )
}

/// A 400 with a reason.
pub(crate) fn bad_request(message: &str) -> Response<Body> {
    json_response(
        StatusCode::BAD_REQUEST,
        "bad-request".into(),
        synthetic("bad_request", None, None, message),
    )
}

fn json_response(
    status: StatusCode,
    header: Cow<'static, str>,
    body: serde_json::Value,
) -> Response<Body> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    let header = match header {
        Cow::Borrowed(value) => HeaderValue::from_static(value),
        Cow::Owned(value) => {
            HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("blocked"))
        }
    };
    let headers = response.headers_mut();
    headers.insert(X_PROXY_ERROR, header);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // A 407 asks for the credential, as every 407 must.
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        headers.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"portcullis\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use portcullis_middleware::{BadRequest, Blocked, Protocol, Source, Target, UpstreamError};

    fn upstream(kind: UpstreamErrorKind) -> BoxError {
        UpstreamError {
            kind,
            target: "x.test:1".into(),
            detail: "d".into(),
        }
        .into()
    }

    fn blocked(reason: Reason) -> BoxError {
        let target = Target::parse_authority("x.test:443", None).unwrap();
        Blocked::new(
            reason,
            Source::Policy,
            target,
            Protocol::HttpsConnect,
            &http::Method::CONNECT,
        )
        .into()
    }

    #[tokio::test]
    async fn every_error_has_its_answer() {
        let cases: Vec<(BoxError, u16, &str, &str)> = vec![
            (
                blocked(Reason::CredentialMismatch),
                403,
                "blocked-by-credential-guard",
                "blocked",
            ),
            (
                blocked(Reason::NotAllowed),
                403,
                "blocked-by-allowlist",
                "blocked",
            ),
            (
                blocked(Reason::NotAllowedLocal),
                403,
                "blocked-by-allowlist",
                "blocked",
            ),
            (
                blocked(Reason::Denied),
                403,
                "blocked-by-denylist",
                "blocked",
            ),
            (
                blocked(Reason::MethodNotAllowed),
                403,
                "blocked-by-method-policy",
                "blocked",
            ),
            (
                blocked(Reason::MitmRequired),
                403,
                "blocked-by-mitm-required",
                "blocked",
            ),
            (
                blocked(Reason::ApprovalDenied),
                403,
                "blocked-by-policy",
                "blocked",
            ),
            (
                blocked(Reason::ApprovalTimedOut),
                403,
                "blocked-by-policy",
                "blocked",
            ),
            (
                blocked(Reason::ApprovalFailed),
                403,
                "blocked-by-policy",
                "blocked",
            ),
            (
                blocked(Reason::Custom("team_header")),
                403,
                "blocked-by-team-header",
                "blocked",
            ),
            (
                blocked(Reason::Custom("Odd Name\r\n")),
                403,
                "blocked-by-odd-name--",
                "blocked",
            ),
            (
                BadRequest::new("bad").into(),
                400,
                "bad-request",
                "bad_request",
            ),
            (
                upstream(UpstreamErrorKind::Refused),
                502,
                "upstream-unreachable",
                "upstream_error",
            ),
            (
                upstream(UpstreamErrorKind::Unreachable),
                502,
                "upstream-unreachable",
                "upstream_error",
            ),
            (
                upstream(UpstreamErrorKind::Unresolved),
                502,
                "upstream-unreachable",
                "upstream_error",
            ),
            (
                upstream(UpstreamErrorKind::NetworkUnreachable),
                502,
                "upstream-unreachable",
                "upstream_error",
            ),
            (
                upstream(UpstreamErrorKind::TimedOut),
                504,
                "upstream-timeout",
                "upstream_error",
            ),
            ("something else".into(), 502, "proxy-error", "error"),
        ];
        for (error, status, header, body_status) in cases {
            let response = http_response(&error, &Fixes::Keys);
            assert_eq!(response.status().as_u16(), status, "{error}");
            assert_eq!(response.headers()[X_PROXY_ERROR], header, "{error}");
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "application/json"
            );
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(json["status"], body_status, "{error}");
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
            if status == 403 {
                for field in [
                    "host", "port", "protocol", "reason", "decision", "source", "method",
                ] {
                    assert!(!json[field].is_null(), "{field} in {json}");
                }
            } else {
                assert_synthetic_shape(&json);
            }
        }
    }

    /// Every answer that is not a refusal has exactly these keys.
    fn assert_synthetic_shape(json: &serde_json::Value) {
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["kind", "message", "status", "target"], "{json}");
    }

    #[tokio::test]
    async fn a_layer_may_ask_for_another_4xx_and_a_retry_after() {
        let target = Target::parse_authority("x.test:443", None).unwrap();
        let limited = |status| -> BoxError {
            Blocked::new(
                Reason::Custom("rate_limited"),
                Source::Layer("rate_limit"),
                target.clone(),
                Protocol::HttpsConnect,
                &http::Method::CONNECT,
            )
            .with_status(status, Some(std::time::Duration::from_secs(30)))
            .into()
        };
        let response = http_response(&limited(StatusCode::TOO_MANY_REQUESTS), &Fixes::Keys);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "30");
        assert_eq!(response.headers()[X_PROXY_ERROR], "blocked-by-rate-limited");
        let json: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes())
                .unwrap();
        assert_eq!(json["reason"], "rate_limited");
        // Not a client error: the refusal stays a 403.
        let response = http_response(&limited(StatusCode::OK), &Fixes::Keys);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(response.headers().get(http::header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn the_transport_s_own_answers_share_the_shape() {
        for response in [
            authentication_required(),
            bad_request("bad"),
            head_too_large(&crate::Limits::default()),
            status(StatusCode::METHOD_NOT_ALLOWED, "bad-request", "nested"),
        ] {
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            assert_synthetic_shape(&serde_json::from_slice(&bytes).unwrap());
        }
        let busy = String::from_utf8(busy_bytes()).unwrap();
        let (head, body) = busy.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503") && head.contains("x-proxy-error: proxy-busy"));
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert_synthetic_shape(&serde_json::from_str(body).unwrap());
    }
}
