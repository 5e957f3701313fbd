//! Forwarding to an allowlisted Unix socket: the request goes over the
//! socket in origin form (HTTP/1), with `Host: localhost` when it had none.

use std::path::PathBuf;

use http::{Request, Response, Uri};
use hyper_util::rt::TokioIo;

use portcullis_middleware::{BadRequest, BoxError, UpstreamError};

use crate::body::{self, Body};

/// Forwards `request` over the socket at `path`.
pub(crate) async fn forward(
    mut request: Request<Body>,
    path: PathBuf,
) -> Result<Response<Body>, BoxError> {
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|error| UpstreamError::from_io(format!("unix:{}", path.display()), &error))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "unix socket connection ended");
        }
    });
    let origin: Uri = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| BadRequest::new("invalid request path"))?;
    *request.uri_mut() = origin;
    if !request.headers().contains_key(http::header::HOST) {
        request.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
    }
    let response = sender.send_request(request).await?;
    Ok(response.map(body::boxed))
}
