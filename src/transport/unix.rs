//! `x-unix-socket` forwarding, the ingress half: a plain HTTP/1 request
//! carrying `x-unix-socket: /abs/path` is decided on the socket path and
//! forwarded over that socket in origin form (the connector dials it).
//!
//! The path is canonicalised before the policy compares it, so a symlink
//! cannot reach a socket the allowlist does not name; a relative path stays
//! relative and is refused by the policy (only absolute paths can be
//! allowed).

use std::path::PathBuf;

use http::HeaderValue;

use portcullis_middleware::{BadRequest, Target};

pub(crate) use portcullis_middleware::strip_headers::X_UNIX_SOCKET;

/// The canonical target named by an `x-unix-socket` header value.
pub(crate) async fn target(value: &HeaderValue) -> Result<Target, BadRequest> {
    let path = value
        .to_str()
        .map_err(|_| BadRequest::new("the x-unix-socket header is not valid UTF-8"))?;
    let path = PathBuf::from(path);
    // A path that does not exist stays as written (and fails to connect if
    // allowed).
    let path = if path.is_absolute() {
        tokio::fs::canonicalize(&path).await.unwrap_or(path)
    } else {
        path
    };
    Ok(Target::Unix(path))
}
