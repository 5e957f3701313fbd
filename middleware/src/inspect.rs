//! What a request carries that limited mode and the request rules must
//! see, whatever the method says: methods asked for another way (override
//! headers, a `_method` query, form or JSON parameter), the start of a git
//! push, a git fetch, a body on a read, a protocol upgrade. Pure functions
//! of the request: below the rules and the layers that use them.

use http::header::{self, HeaderMap};
use http::{HeaderName, Method, Request};

use crate::request::HasBody;

/// Headers that smuggle a different method past a method check.
pub const METHOD_OVERRIDE_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-method"),
    HeaderName::from_static("x-method"),
    HeaderName::from_static("x-forwarded-method"),
];

/// The query parameter web frameworks (Rails, Laravel, Symfony, Express's
/// method-override) read as the real method.
const METHOD_OVERRIDE_PARAMETER: &str = "_method";

/// The query's parameters, names and values percent-decoded (`+` is a
/// space), as a form would read them.
pub(crate) fn query_parameters(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
}

/// The methods a query asks for with `_method` parameters: the name
/// compared as PHP and the frameworks read it ([`is_method_override_name`]),
/// the value percent-decoded.
pub(crate) fn method_overrides_in_query(query: Option<&str>) -> impl Iterator<Item = String> + '_ {
    query
        .into_iter()
        .flat_map(query_parameters)
        .filter(|(name, _)| is_method_override_name(name))
        .map(|(_, value)| value)
}

/// Whether a parameter name (decoded) is read as `_method` by some
/// framework: ASCII case ignored, leading white space dropped, an array
/// suffix (`_method[]`, `_method[x]`) dropped, and `.`, ` ` and `[` read as
/// `_` (PHP renames `.method` to `_method`).
pub fn is_method_override_name(name: &str) -> bool {
    let name = name.trim_start();
    let name = match name.find('[') {
        // `a[…]…`: PHP makes an array named `a`.
        Some(open) if name.get(open..).is_some_and(|rest| rest.contains(']')) => {
            name.get(..open).unwrap_or(name)
        }
        _ => name,
    };
    let name = name.trim_end();
    name.len() == METHOD_OVERRIDE_PARAMETER.len()
        && name
            .chars()
            .map(|c| match c {
                '.' | ' ' | '[' => '_',
                c => c.to_ascii_lowercase(),
            })
            .eq(METHOD_OVERRIDE_PARAMETER.chars())
}

/// The parameters of an `application/x-www-form-urlencoded` body (the
/// query's syntax), names and values percent-decoded.
pub(crate) fn form_parameters(body: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query_parameters(body)
}

/// Whether the request starts a push: its query asks for
/// `service=git-receive-pack`. The path is not consulted: a push's first
/// request (`…/info/refs?service=git-receive-pack`) has spellings the path
/// alone would miss (`/info/refs/`, `/info/%72efs`, `/info/refs;x`), and no
/// read asks for that service.
pub(crate) fn starts_a_push(query: Option<&str>) -> bool {
    query.is_some_and(|query| {
        query_parameters(query).any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("service")
                && value.trim().eq_ignore_ascii_case(crate::git::RECEIVE_PACK)
        })
    })
}

/// Whether a request carries a body: a [`HasBody`] mark from the
/// transport, or a non-zero `Content-Length`.
pub(crate) fn carries_body<B>(request: &Request<B>) -> bool {
    request.extensions().get::<HasBody>().is_some()
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// Whether limited mode lets this method through.
pub fn is_read_only(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS
}

/// The content type git sends with a smart-HTTP fetch.
const GIT_UPLOAD_PACK_REQUEST: &str = "application/x-git-upload-pack-request";

/// Whether this looks like git's smart-HTTP fetch: `POST
/// <repository>/git-upload-pack` (a repository's path shape, no query)
/// with git's content type. It asks for objects; it changes nothing.
/// (`git-receive-pack`, a push, is not this.) Its body is checked apart:
/// see [`VerifyGitFetchBody`](crate::request::VerifyGitFetchBody).
pub fn is_git_fetch<B>(request: &Request<B>) -> bool {
    request.method() == Method::POST
        && crate::git::is_repository_path(request.uri().path(), "git-upload-pack")
        && request.uri().query().is_none()
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value == GIT_UPLOAD_PACK_REQUEST)
}

/// The tokens of every `Connection` header, trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Whether a request asks for a protocol upgrade (`Connection: upgrade` and
/// an `Upgrade` header).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The media type of each `Content-Type` value (`type/subtype`, lower
/// case, its parameters left out), in order.
pub fn media_types(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers.get_all(header::CONTENT_TYPE).iter().map(|value| {
        let value = String::from_utf8_lossy(value.as_bytes());
        let essence = value.split(';').next().unwrap_or("").trim();
        essence.to_ascii_lowercase()
    })
}

/// The protocol an upgrade asks for: the `Upgrade` header's value when it
/// is one header naming one protocol (`websocket`, `h2c`), trimmed; `None`
/// when there is none, several, or a list.
pub fn upgrade_token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::UPGRADE).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let token = value.to_str().ok()?.trim();
    (!token.is_empty() && !token.contains([',', ' ', '\t'])).then_some(token)
}
