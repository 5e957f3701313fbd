//! Bodies judged before anything is sent: a git fetch limited mode
//! admitted, a form, multipart or JSON body the request rules must read
//! (its `_method` fields, its JSON-RPC or GraphQL calls), and a body the
//! secret scan must search — each read whole within a bound, its content
//! coding undone, and sent on as it came.

use http::Request;

use portcullis_middleware::request_rules::VerifyBodyMethod;
use portcullis_middleware::{Blocked, BoxError, Reason, RequestInfo, Source};

use crate::body::{self, Body};

/// The largest body the connector reads whole to judge it (a git fetch
/// in limited mode, a form or JSON body that could name another method),
/// after gzip: a negotiation of a very large repository stays well below.
const JUDGED_BODY_MAX_BYTES: usize = 16 << 20;

/// The request as it may go on: a git fetch limited mode admitted
/// ([`VerifyGitFetchBody`](portcullis_middleware::VerifyGitFetchBody)) only
/// once its body is checked, a body the request rules must judge
/// ([`VerifyBodyMethod`]) only once its `_method` fields are; any other
/// request as it is. A would-be refusal of a rule in audit mode is returned
/// beside it, for the response.
pub(super) async fn checked_body(
    request: Request<Body>,
    info: &RequestInfo,
) -> Result<(Request<Body>, Option<Blocked>), BoxError> {
    let extensions = request.extensions();
    let marked = extensions
        .get::<portcullis_middleware::VerifyGitFetchBody>()
        .is_some()
        || extensions.get::<VerifyBodyMethod>().is_some()
        || extensions
            .get::<portcullis_middleware::ScanBody>()
            .is_some();
    if !marked {
        return Ok((request, None));
    }
    // Boxed: the (large) state of reading and judging a body is paid for
    // only by a request that has one to judge.
    Box::pin(judged_body(request, info)).await
}

async fn judged_body(
    request: Request<Body>,
    info: &RequestInfo,
) -> Result<(Request<Body>, Option<Blocked>), BoxError> {
    let request = if request
        .extensions()
        .get::<portcullis_middleware::VerifyGitFetchBody>()
        .is_some()
    {
        verified_git_fetch(request, info).await?
    } else {
        request
    };
    let (request, audited) = match request.extensions().get::<VerifyBodyMethod>().cloned() {
        Some(mark) => verified_body_method(request, &mark).await?,
        None => (request, None),
    };
    match request
        .extensions()
        .get::<portcullis_middleware::ScanBody>()
        .cloned()
    {
        Some(mark) => {
            let (request, found) = scanned_body(request, &mark).await?;
            Ok((request, audited.or(found)))
        }
        None => Ok((request, audited)),
    }
}

/// Reads a body whole (at most the scan's limit, decoded) and scans it for
/// secrets; one that cannot be read so is judged as not inspected. The
/// body is sent on as it came.
async fn scanned_body(
    request: Request<Body>,
    mark: &portcullis_middleware::ScanBody,
) -> Result<(Request<Body>, Option<Blocked>), BoxError> {
    let head = request_head(&request);
    // Known too large before a byte is read: an audit lets it on untouched.
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(length) = declared.filter(|&length| length > mark.limit() as u64) {
        let why = format!("the body is {length} bytes, over {}", size(mark.limit()));
        return Ok((request, mark.unread(&head, &why)?));
    }
    match read_whole_body(request, mark.limit()).await? {
        Ok(whole) => {
            let audited = mark.decide(&head, &whole.plain)?;
            Ok((
                Request::from_parts(whole.parts, body::full(whole.sent)),
                audited,
            ))
        }
        Err(why) => {
            // Only an audit lets an unread body on; it was consumed, so the
            // request cannot be sent whole: refuse it anyway.
            let audited = mark.unread(&head, &why)?;
            match audited {
                Some(blocked) => Err(blocked
                    .with_decision(portcullis_middleware::BlockDecision::Deny)
                    .into()),
                None => Err(format!("the body could not be read: {why}").into()),
            }
        }
    }
}

/// A body read whole, within [`JUDGED_BODY_MAX_BYTES`]: as it came (to
/// send on) and with its gzip undone (to judge).
struct WholeBody {
    parts: http::request::Parts,
    sent: bytes::Bytes,
    /// The body decoded: the same bytes as `sent` (shared, not copied)
    /// when it has no `Content-Encoding`.
    plain: bytes::Bytes,
}

/// Reads a body whole (bounded) and undoes gzip, deflate or brotli (the
/// decoded size bounded too); `Err` says why it could
/// not be judged. A client's own failure (a malformed or stalled body)
/// stays its error (a 400).
async fn read_whole_body(
    request: Request<Body>,
    max: usize,
) -> Result<Result<WholeBody, String>, BoxError> {
    use http_body_util::BodyExt;
    let (parts, mut body) = request.into_parts();
    // Sized once by the declared length (within the bound): no regrowth.
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(0);
    let mut bytes = bytes::BytesMut::with_capacity(declared.min(max));
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if bytes.len() + data.len() > max {
                return Ok(Err(format!("the body is over {}", size(max))));
            }
            bytes.extend_from_slice(&data);
        }
    }
    let sent = bytes.freeze();
    let encoding = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .map(|value| value.as_bytes().to_ascii_lowercase());
    let plain = match encoding.as_deref() {
        None | Some(b"identity") => sent.clone(),
        Some(name @ (b"gzip" | b"x-gzip" | b"deflate" | b"br")) => {
            use std::io::Read;
            let mut plain = Vec::new();
            let mut decoder: Box<dyn Read + '_> = match name {
                b"deflate" => Box::new(flate2::read::ZlibDecoder::new(&sent[..])),
                b"br" => Box::new(brotli_decompressor::Decompressor::new(&sent[..], 4096)),
                _ => Box::new(flate2::read::GzDecoder::new(&sent[..])),
            };
            let read = (&mut decoder).take(max as u64 + 1).read_to_end(&mut plain);
            match read {
                Ok(length) if length > max => {
                    return Ok(Err(format!("the body is over {} decoded", size(max))))
                }
                Ok(_) => plain.into(),
                Err(error) => {
                    return Ok(Err(format!(
                        "its {} does not decode: {error}",
                        String::from_utf8_lossy(name)
                    )))
                }
            }
        }
        Some(other) => {
            return Ok(Err(format!(
                "content-encoding {:?} is not one portcullis can undo to judge it",
                String::from_utf8_lossy(other)
            )))
        }
    };
    Ok(Ok(WholeBody { parts, sent, plain }))
}

/// `max` bytes as a person reads them (`16 MiB`, `1 KiB`).
fn size(max: usize) -> String {
    if max >= 1 << 20 && max % (1 << 20) == 0 {
        format!("{} MiB", max >> 20)
    } else if max >= 1 << 10 && max % (1 << 10) == 0 {
        format!("{} KiB", max >> 10)
    } else {
        format!("{max} bytes")
    }
}

/// Reads a git fetch's body whole (bounded), undoes git's gzip, and lets
/// it through only if it is an upload-pack request; otherwise refuses it
/// (`method_not_allowed`) before anything is dialled. The body is sent on
/// as it came.
async fn verified_git_fetch(
    request: Request<Body>,
    info: &RequestInfo,
) -> Result<Request<Body>, BoxError> {
    let refuse = |why: String| not_a_git_fetch(info, why);
    let whole = read_whole_body(request, JUDGED_BODY_MAX_BYTES)
        .await?
        .map_err(refuse)?;
    portcullis_middleware::git::check_upload_pack_request(&whole.plain).map_err(refuse)?;
    Ok(Request::from_parts(whole.parts, body::full(whole.sent)))
}

/// Reads a form, multipart or JSON body whole (bounded) and judges the
/// request again with the methods its `_method` fields name; a body that
/// cannot be read within the bound, or does not parse as its multipart
/// `Content-Type` says, is refused (it could hide one). The body is sent on
/// as it came.
async fn verified_body_method(
    request: Request<Body>,
    mark: &VerifyBodyMethod,
) -> Result<(Request<Body>, Option<Blocked>), BoxError> {
    use portcullis_middleware::request_rules::{
        method_overrides_in_form, method_overrides_in_json, BodyForm,
    };
    let head = request_head(&request);
    let mut whole = match read_whole_body(request, JUDGED_BODY_MAX_BYTES).await? {
        Ok(whole) => whole,
        Err(why) => return Err(mark.refuse_unread(&head, &why)),
    };
    let methods = match mark.form() {
        BodyForm::UrlEncoded => method_overrides_in_form(&whole.plain),
        BodyForm::Json => method_overrides_in_json(&whole.plain),
        _ => {
            // The multipart reader takes the body: copied only when its
            // calls are judged after.
            let plain = if mark.reads_calls() {
                whole.plain.clone()
            } else {
                std::mem::take(&mut whole.plain)
            };
            match multipart_fields(&whole.parts.headers, plain).await {
                Ok(Multipart {
                    methods,
                    operations,
                }) => {
                    // A GraphQL upload (the multipart request spec): its
                    // calls are the `operations` part's JSON, judged in
                    // place of the body.
                    match <[bytes::Bytes; 1]>::try_from(operations) {
                        Ok([operations]) => whole.plain = operations,
                        Err(operations) if operations.is_empty() => {}
                        Err(_) => {
                            let why = "it has more than one operations part (servers differ on which one counts)";
                            return Err(mark.refuse_unread(&head, why));
                        }
                    }
                    methods
                }
                Err(why) => return Err(mark.refuse_unread(&head, &why)),
            }
        }
    };
    let audited = if mark.reads_calls() {
        mark.decide_body(&head, &methods, &whole.plain)?
    } else {
        mark.decide(&head, &methods)?
    };
    Ok((
        Request::from_parts(whole.parts, body::full(whole.sent)),
        audited,
    ))
}

/// The request without its body, for deciding on its head again.
fn request_head(request: &Request<Body>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = request.method().clone();
    *head.uri_mut() = request.uri().clone();
    *head.headers_mut() = request.headers().clone();
    *head.extensions_mut() = request.extensions().clone();
    head
}

/// What the rules read in a multipart body.
struct Multipart {
    /// The values of its `_method` parts.
    methods: Vec<String>,
    /// Its `operations` parts (a GraphQL upload's request).
    operations: Vec<bytes::Bytes>,
}

/// The `_method` and `operations` parts of a multipart body.
async fn multipart_fields(
    headers: &http::HeaderMap,
    body: bytes::Bytes,
) -> Result<Multipart, String> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type)
        .map_err(|error| format!("its multipart Content-Type has no usable boundary: {error}"))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut found = Multipart {
        methods: Vec::new(),
        operations: Vec::new(),
    };
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => return Ok(found),
            Err(error) => return Err(format!("it does not parse as multipart: {error}")),
        };
        let method = field
            .name()
            .is_some_and(portcullis_middleware::limited_mode::is_method_override_name);
        // Servers look the part up by its exact name.
        let operations = field.name() == Some("operations");
        let bytes = field
            .bytes()
            .await
            .map_err(|error| format!("it does not parse as multipart: {error}"))?;
        if method {
            found
                .methods
                .push(String::from_utf8_lossy(&bytes).into_owned());
        }
        if operations {
            found.operations.push(bytes);
        }
    }
}

fn not_a_git_fetch(info: &RequestInfo, why: String) -> BoxError {
    Box::new(
        Blocked::new(
            Reason::MethodNotAllowed,
            Source::LimitedMode,
            info.target.clone(),
            info.protocol,
            &info.method,
        )
        .with_rule(Some(format!("limited mode: not a git fetch ({why})"))),
    )
}
