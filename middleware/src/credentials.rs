//! Secretless credentials: the proxy adds the secret, the program never
//! holds it.
//!
//! A [`Credential`] binds a named secret to hosts (the allowlist's pattern
//! syntax) and says how it is sent: a header from a template
//! ([`Injection::Header`], e.g. `Authorization: Bearer {secret}`) or HTTP
//! Basic with a fixed username ([`Injection::Basic`], for git). The secret
//! itself comes from a [`SecretStore`] (plug a vault in; [`StaticSecrets`]
//! holds them in memory), looked up per request, so a store can rotate.
//!
//! [`InjectCredentialsLayer`] sits innermost, after every decision layer, and for
//! each request:
//!
//! - **guards placeholders**: a request carrying a credential's placeholder
//!   (the stand-in the program holds instead of the secret) in a header or
//!   its URL is refused — `credential_mismatch`, source `credentials`,
//!   naming the credential, never a value — unless its *vetted target* is
//!   one of that credential's hosts and it travels over TLS (or the
//!   credential allows plain text). A placeholder in a body is left alone;
//! - **injects** the secret on a request to one of the credential's hosts
//!   over TLS (an intercepted request; plain HTTP only with
//!   [`allow_plaintext`](Credential::allow_plaintext)): a header holding the
//!   placeholder gets the secret in its place (inside a Basic header too);
//!   a missing header is added; a header holding another value is left
//!   alone unless [`replace`](Credential::replace) says otherwise;
//! - asks the transport to **intercept** a `CONNECT` to a credential's host
//!   when it can ([`Interceptable`]), in any mode, so that its requests can
//!   carry the secret. Other tunnels pass unseen.
//!
//! What it injected is logged at debug level by credential name and place
//! (`header:authorization`), never by value.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::credentials::{Credential, InjectCredentialsLayer, Credentials, Injection, StaticSecrets};
//! use portcullis_middleware::{find_blocked, Protocol, Reason, Target};
//! use std::sync::Arc;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let github = Credential::new("github", Injection::header("authorization", "Bearer {secret}")?)
//!     .host("api.github.com")?
//!     .placeholder("ghp_placeholder000000000000000000000000");
//! let secrets = StaticSecrets::default();
//! secrets.set("github", "ghp_the_real_token");
//! let layer = InjectCredentialsLayer::new(Credentials::new(vec![github], Arc::new(secrets)));
//! let service = ServiceBuilder::new().layer(layer).service(service_fn(|request: Request<()>| async move {
//!     // The origin sees the secret.
//!     assert_eq!(request.headers()["authorization"], "Bearer ghp_the_real_token");
//!     Ok::<_, portcullis_middleware::BoxError>(Response::new(()))
//! }));
//!
//! let mut request = Request::get("https://api.github.com/user")
//!     .header("authorization", "Bearer ghp_placeholder000000000000000000000000")
//!     .body(())?;
//! request.extensions_mut().insert(Target::parse_authority("api.github.com:443", None)?);
//! request.extensions_mut().insert(Protocol::HttpsMitm);
//! service.clone().oneshot(request).await?;
//!
//! // The same placeholder headed anywhere else is refused.
//! let mut elsewhere = Request::get("https://paste.example/")
//!     .header("x-token", "ghp_placeholder000000000000000000000000")
//!     .body(())?;
//! elsewhere.extensions_mut().insert(Target::parse_authority("paste.example:443", None)?);
//! elsewhere.extensions_mut().insert(Protocol::HttpsMitm);
//! let error = service.oneshot(elsewhere).await.unwrap_err();
//! assert_eq!(find_blocked(error.as_ref()).map(|b| b.reason), Some(Reason::CredentialMismatch));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use base64::Engine;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::{Method, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::future::MarkedResponse;
use crate::policy::{Pattern, PatternError, PatternSet};
use crate::request::{Interceptable, RequestInfo};
use crate::target::Target;

/// A secret: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Where secrets come from, by credential name; looked up per request.
pub trait SecretStore: Send + Sync + 'static {
    /// The secret of the credential named `name`, if there is one now.
    fn secret(&self, name: &str) -> Option<Secret>;
}

/// Secrets held in memory, changed in place (a reload sets new ones).
#[derive(Debug, Default)]
pub struct StaticSecrets(RwLock<HashMap<String, Secret>>);

impl StaticSecrets {
    /// Sets (or replaces) the secret of `name`.
    pub fn set(&self, name: &str, secret: impl Into<Arc<str>>) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), Secret::new(secret));
    }
}

impl SecretStore for StaticSecrets {
    fn secret(&self, name: &str) -> Option<Secret> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// Why a credential could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A host pattern is not valid.
    #[error("{0}")]
    Host(#[from] PatternError),
    /// The header name is not a header name.
    #[error("{0:?} is not a header name")]
    Header(String),
    /// The template does not hold `{{secret}}`.
    #[error("the value template {0:?} has no {{secret}} in it")]
    Template(String),
    /// The Basic username is empty or holds a `:`.
    #[error("the Basic username {0:?} must be non-empty and hold no ':'")]
    Username(String),
}

/// How a credential is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Injection {
    /// A header whose value is `template` with `{secret}` replaced.
    Header {
        /// The header.
        name: HeaderName,
        /// Its value, holding `{secret}`.
        template: String,
    },
    /// `Authorization: Basic` of `username:secret` (git over HTTPS).
    Basic {
        /// The username.
        username: String,
    },
}

impl Injection {
    /// A header from a template holding `{secret}`.
    pub fn header(name: &str, template: &str) -> Result<Injection, CredentialError> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CredentialError::Header(name.to_owned()))?;
        if !template.contains("{secret}") {
            return Err(CredentialError::Template(template.to_owned()));
        }
        Ok(Injection::Header {
            name,
            template: template.to_owned(),
        })
    }

    /// HTTP Basic with this username.
    pub fn basic(username: &str) -> Result<Injection, CredentialError> {
        if username.is_empty() || username.contains(':') {
            return Err(CredentialError::Username(username.to_owned()));
        }
        Ok(Injection::Basic {
            username: username.to_owned(),
        })
    }

    /// The header it sets.
    pub fn header_name(&self) -> &HeaderName {
        match self {
            Injection::Header { name, .. } => name,
            Injection::Basic { .. } => &AUTHORIZATION,
        }
    }

    fn render(&self, secret: &str) -> String {
        match self {
            Injection::Header { template, .. } => template.replace("{secret}", secret),
            Injection::Basic { username } => basic(username, secret),
        }
    }
}

fn basic(username: &str, password: &str) -> String {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {encoded}")
}

/// One credential: a named secret, the hosts it is sent to, and how.
#[derive(Debug, Clone)]
pub struct Credential {
    name: String,
    hosts: PatternSet,
    host_texts: Vec<String>,
    injection: Injection,
    placeholder: Option<String>,
    replace: bool,
    allow_plaintext: bool,
}

impl Credential {
    /// A credential named `name` (its secret is looked up by this name),
    /// sent as `injection`, to no host yet.
    pub fn new(name: impl Into<String>, injection: Injection) -> Credential {
        Credential {
            name: name.into(),
            hosts: PatternSet::new(),
            host_texts: Vec::new(),
            injection,
            placeholder: None,
            replace: false,
            allow_plaintext: false,
        }
    }

    /// Adds a host it is sent to (the allowlist's pattern syntax).
    pub fn host(mut self, pattern: &str) -> Result<Credential, CredentialError> {
        self.hosts.insert(Pattern::parse(pattern)?);
        self.host_texts.push(pattern.to_owned());
        Ok(self)
    }

    /// The stand-in the program holds: replaced by the secret on the
    /// credential's hosts, refused anywhere else. (Short ones would match
    /// by chance: the binary makes them as long as the token.)
    pub fn placeholder(mut self, placeholder: impl Into<String>) -> Credential {
        self.placeholder = Some(placeholder.into()).filter(|p| !p.is_empty());
        self
    }

    /// Whether a header that already holds another value is replaced
    /// (default: left alone).
    pub fn replace(mut self, replace: bool) -> Credential {
        self.replace = replace;
        self
    }

    /// Whether the secret may be sent over plain HTTP (default: TLS only).
    pub fn allow_plaintext(mut self, allow: bool) -> Credential {
        self.allow_plaintext = allow;
        self
    }

    /// Its placeholder, if it has one.
    pub fn placeholder_text(&self) -> Option<&str> {
        self.placeholder.as_deref()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its host patterns, as written.
    pub fn hosts(&self) -> &[String] {
        &self.host_texts
    }

    /// Whether `target` is one of its hosts.
    pub fn covers(&self, target: &Target) -> bool {
        match target {
            Target::Host { host, port } => !self.hosts.find_all(host, *port).is_empty(),
            Target::Unix(_) => false,
        }
    }
}

/// The credentials a [`InjectCredentialsLayer`] applies, and their secrets.
#[derive(Clone)]
pub struct Credentials {
    list: Arc<[Credential]>,
    store: Arc<dyn SecretStore>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("list", &self.list)
            .finish_non_exhaustive()
    }
}

impl Default for Credentials {
    fn default() -> Credentials {
        Credentials::new(Vec::new(), Arc::new(StaticSecrets::default()))
    }
}

impl Credentials {
    /// `list`, with secrets from `store`.
    pub fn new(list: Vec<Credential>, store: Arc<dyn SecretStore>) -> Credentials {
        Credentials {
            list: list.into(),
            store,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The credentials.
    pub fn list(&self) -> &[Credential] {
        &self.list
    }

    /// Each credential's name and its secret now (the store's, which a
    /// reload may change): what a secret scan looks for by value.
    pub fn current_secrets(&self) -> Vec<(String, Secret)> {
        self.list
            .iter()
            .filter_map(|credential| {
                self.store
                    .secret(&credential.name)
                    .map(|secret| (credential.name.clone(), secret))
            })
            .collect()
    }

    /// Each placeholder and its stand-in in records, `{credential:NAME}`:
    /// for [`ViolationLogLayer::masking`](crate::ViolationLogLayer::masking).
    pub fn masks(&self) -> Vec<(String, String)> {
        self.list
            .iter()
            .filter_map(|credential| {
                let placeholder = credential.placeholder.clone()?;
                Some((placeholder, format!("{{credential:{}}}", credential.name)))
            })
            .collect()
    }
}

pub use crate::request::Injected;

/// Adds [`InjectCredentials`]; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct InjectCredentialsLayer {
    credentials: Credentials,
}

impl InjectCredentialsLayer {
    /// Applies `credentials`.
    pub fn new(credentials: Credentials) -> InjectCredentialsLayer {
        InjectCredentialsLayer { credentials }
    }

    /// The credentials this layer adds.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The placeholders a program holds in place of the secrets: tokens
    /// shaped like the real ones, which no scan should take for secrets.
    pub fn placeholders(&self) -> Vec<String> {
        self.credentials
            .masks()
            .into_iter()
            .map(|(placeholder, _)| placeholder)
            .collect()
    }
}

impl<S> Layer<S> for InjectCredentialsLayer {
    type Service = InjectCredentials<S>;

    fn layer(&self, inner: S) -> InjectCredentials<S> {
        InjectCredentials {
            inner,
            credentials: self.credentials.clone(),
        }
    }
}

/// Guards placeholders and injects secrets; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct InjectCredentials<S> {
    inner: S,
    credentials: Credentials,
}

/// Where a placeholder was found (never its value).
fn carries(request: &Request<impl Sized>, placeholder: &str) -> Option<String> {
    if request.uri().to_string().contains(placeholder) {
        return Some("url".to_owned());
    }
    let needle = placeholder.as_bytes();
    if needle.is_empty() {
        return None;
    }
    for (name, value) in request.headers() {
        // Bytes, not text: a header with other bytes in it hides nothing.
        let raw = value.as_bytes();
        let inside = raw.windows(needle.len()).any(|window| window == needle);
        let in_basic = value
            .to_str()
            .ok()
            .and_then(decoded_basic)
            .is_some_and(|decoded| decoded.contains(placeholder));
        if inside || in_basic {
            return Some(format!("header:{name}"));
        }
    }
    None
}

/// The `user:password` of a `Basic` header.
fn decoded_basic(value: &str) -> Option<String> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// What to set the credential's header to, if anything.
fn header_value(
    credential: &Credential,
    secret: &str,
    current: Option<&HeaderValue>,
) -> Option<String> {
    let Some(current) = current else {
        return Some(credential.injection.render(secret));
    };
    let text = current.to_str().ok();
    if let (Some(placeholder), Some(text)) = (&credential.placeholder, text) {
        if text.contains(placeholder.as_str()) {
            return Some(text.replace(placeholder.as_str(), secret));
        }
        if let Some(decoded) = decoded_basic(text).filter(|d| d.contains(placeholder.as_str())) {
            let (user, password) = decoded.split_once(':').unwrap_or((decoded.as_str(), ""));
            return Some(basic(user, &password.replace(placeholder.as_str(), secret)));
        }
    }
    credential
        .replace
        .then(|| credential.injection.render(secret))
}

impl<S, B, R> Service<Request<B>> for InjectCredentials<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = MarkedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.credentials.is_empty() {
            return MarkedResponse::inner(self.inner.call(request));
        }
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(bad) => return MarkedResponse::refused(bad),
        };
        let covering = || {
            self.credentials
                .list
                .iter()
                .filter(|credential| credential.covers(&info.target))
        };
        let tls = info.protocol.is_intercepted();
        for credential in self.credentials.list.iter() {
            let Some(placeholder) = &credential.placeholder else {
                continue;
            };
            let Some(place) = carries(&request, placeholder) else {
                continue;
            };
            let here = credential.covers(&info.target) && (tls || credential.allow_plaintext);
            if !here {
                let why = if credential.covers(&info.target) {
                    "over plain HTTP (allow_plaintext is off)".to_owned()
                } else {
                    format!(
                        "to a host that is not one of its hosts ({})",
                        credential.host_texts.join(", ")
                    )
                };
                let message = format!(
                    "portcullis refused {} {}: it carries the placeholder of credential {:?} ({place}) {why}; the secret is only sent to its hosts over TLS: send the request there over HTTPS, or add this host to the credential's hosts if it should get the secret",
                    info.method.as_str().escape_debug(),
                    info.target,
                    credential.name,
                );
                return MarkedResponse::refused(
                    Blocked::new(
                        Reason::CredentialMismatch,
                        Source::Credentials,
                        info.target.clone(),
                        info.protocol,
                        &info.method,
                    )
                    .with_rule(Some(format!("credentials {:?}", credential.name)))
                    .with_message(message),
                );
            }
        }
        if info.method == Method::CONNECT || info.protocol.is_tunnel() {
            // A credential's host is intercepted when it can be, so its
            // requests can carry the secret.
            let intercept = info.method == Method::CONNECT
                && request.extensions().get::<Interceptable>().is_some()
                && covering().next().is_some();
            return MarkedResponse::marked(self.inner.call(request), intercept, None);
        }
        let mut injected = Injected::default();
        for credential in self.credentials.list.iter() {
            if !credential.covers(&info.target) || !(tls || credential.allow_plaintext) {
                continue;
            }
            let Some(secret) = self.credentials.store.secret(&credential.name) else {
                tracing::warn!(credential = %credential.name, "no secret for this credential: the request goes without it");
                continue;
            };
            let name = credential.injection.header_name().clone();
            let current = request.headers().get(&name);
            let Some(value) = header_value(credential, secret.expose(), current) else {
                continue;
            };
            match HeaderValue::from_str(&value) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    request.headers_mut().insert(name.clone(), value);
                    let place = format!("header:{name}");
                    tracing::debug!(credential = %credential.name, place = %place, target = %info.target, "credential injected");
                    injected.0.push((credential.name.clone(), place));
                }
                Err(_) => {
                    tracing::warn!(credential = %credential.name, "the secret cannot be sent in a header (a control character): the request goes without it");
                }
            }
        }
        let future = MarkedResponse::marked(self.inner.call(request), false, None);
        if injected.0.is_empty() {
            future
        } else {
            future.injected(injected)
        }
    }
}

/// Whether `given` is `expected`, compared without an early exit, so the
/// time taken does not tell how much of a guess was right (passwords,
/// tokens).
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(index).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{find_blocked, Intercept, Protocol};
    use tower_test::mock;

    const PLACEHOLDER: &str = "ghp_PLACEHOLDERplaceholderPLACEHOLDER0000";

    fn credentials() -> Credentials {
        let secrets = StaticSecrets::default();
        secrets.set("github", "ghp_REAL");
        secrets.set("git", "gho_REAL");
        Credentials::new(
            vec![
                Credential::new(
                    "github",
                    Injection::header("authorization", "Bearer {secret}").unwrap(),
                )
                .host("api.github.test")
                .unwrap()
                .placeholder(PLACEHOLDER),
                Credential::new("git", Injection::basic("x-access-token").unwrap())
                    .host("github.test")
                    .unwrap()
                    .placeholder("gho_PLACEHOLDERplaceholder0000000000000000"),
            ],
            Arc::new(secrets),
        )
    }

    fn request(
        method: &str,
        uri: &str,
        protocol: Protocol,
        headers: &[(&str, &str)],
    ) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(()).unwrap();
        let target = match request.uri().authority() {
            Some(authority) => Target::parse_authority(authority.as_str(), Some(443)).unwrap(),
            None => Target::parse_authority(uri, None).unwrap(),
        };
        request.extensions_mut().insert(target);
        request.extensions_mut().insert(protocol);
        request
    }

    /// The headers the origin got, or the refusal.
    async fn outcome(request: Request<()>) -> Result<(http::HeaderMap, bool), Reason> {
        let (mut service, mut handle) = mock::spawn_layer::<Request<()>, Response<()>, _>(
            InjectCredentialsLayer::new(credentials()),
        );
        handle.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request);
        match handle.poll_request() {
            Poll::Ready(Some((seen, send))) => {
                send.send_response(Response::new(()));
                let response = response.await.unwrap();
                Ok((
                    seen.headers().clone(),
                    response.extensions().get::<Intercept>().is_some(),
                ))
            }
            _ => Err(find_blocked(response.await.unwrap_err().as_ref())
                .unwrap()
                .reason),
        }
    }

    fn bearer(placeholder: &str) -> String {
        format!("Bearer {placeholder}")
    }

    #[tokio::test]
    async fn the_secret_replaces_the_placeholder_on_its_hosts_over_tls_only() {
        use Protocol::*;
        let api = "https://api.github.test/user";
        let (headers, _) = outcome(request(
            "GET",
            api,
            HttpsMitm,
            &[("authorization", &bearer(PLACEHOLDER))],
        ))
        .await
        .unwrap();
        assert_eq!(headers["authorization"], "Bearer ghp_REAL");
        assert!(headers["authorization"].is_sensitive());
        let (headers, _) = outcome(request("GET", api, HttpsMitm, &[])).await.unwrap();
        assert_eq!(
            headers["authorization"], "Bearer ghp_REAL",
            "added when absent"
        );
        let (headers, _) = outcome(request(
            "GET",
            api,
            HttpsMitm,
            &[("authorization", "Bearer mine")],
        ))
        .await
        .unwrap();
        assert_eq!(
            headers["authorization"], "Bearer mine",
            "another value is left alone"
        );
        assert_eq!(
            outcome(request(
                "GET",
                "http://api.github.test/user",
                Http,
                &[("authorization", &bearer(PLACEHOLDER))]
            ))
            .await
            .unwrap_err(),
            Reason::CredentialMismatch,
            "never over plain HTTP"
        );
        let (headers, _) = outcome(request("GET", "http://api.github.test/user", Http, &[]))
            .await
            .unwrap();
        assert!(
            headers.get("authorization").is_none(),
            "nothing added over plain HTTP"
        );
    }

    #[tokio::test]
    async fn a_placeholder_headed_anywhere_else_is_refused() {
        use Protocol::*;
        for (uri, headers) in [
            ("https://paste.test/", vec![("x-token", PLACEHOLDER)]),
            (
                "https://paste.test/?t=ghp_PLACEHOLDERplaceholderPLACEHOLDER0000",
                vec![],
            ),
            ("https://github.test/", vec![("authorization", PLACEHOLDER)]),
        ] {
            let with: Vec<(&str, &str)> = headers;
            assert_eq!(
                outcome(request("POST", uri, HttpsMitm, &with))
                    .await
                    .unwrap_err(),
                Reason::CredentialMismatch,
                "{uri}"
            );
        }
        // On a tunnel's own request too (where it can be seen at all).
        assert_eq!(
            outcome(request(
                "CONNECT",
                "paste.test:443",
                HttpsConnect,
                &[("x-token", PLACEHOLDER)]
            ))
            .await
            .unwrap_err(),
            Reason::CredentialMismatch
        );
        // Beside bytes that are not text, too.
        let mut opaque = request("GET", "https://paste.test/", HttpsMitm, &[]);
        let mut raw = b"\xff ".to_vec();
        raw.extend_from_slice(PLACEHOLDER.as_bytes());
        opaque
            .headers_mut()
            .insert("x-blob", HeaderValue::from_bytes(&raw).unwrap());
        assert_eq!(
            outcome(opaque).await.unwrap_err(),
            Reason::CredentialMismatch
        );
        // Hidden in a Basic header, too.
        let hidden = basic("me", PLACEHOLDER);
        assert_eq!(
            outcome(request(
                "GET",
                "https://paste.test/",
                HttpsMitm,
                &[("authorization", &hidden)]
            ))
            .await
            .unwrap_err(),
            Reason::CredentialMismatch
        );
        // A request without placeholders to another host is untouched.
        let (headers, _) = outcome(request("GET", "https://paste.test/", HttpsMitm, &[]))
            .await
            .unwrap();
        assert!(headers.get("authorization").is_none());
    }

    #[tokio::test]
    async fn basic_for_git_swaps_the_password_and_keeps_the_user() {
        let sent = basic(
            "x-access-token",
            "gho_PLACEHOLDERplaceholder0000000000000000",
        );
        let (headers, _) = outcome(request(
            "GET",
            "https://github.test/acme/x.git/info/refs?service=git-upload-pack",
            Protocol::HttpsMitm,
            &[("authorization", &sent)],
        ))
        .await
        .unwrap();
        assert_eq!(
            headers["authorization"],
            basic("x-access-token", "gho_REAL").as_str()
        );
        let (headers, _) = outcome(request(
            "GET",
            "https://github.test/",
            Protocol::HttpsMitm,
            &[],
        ))
        .await
        .unwrap();
        assert_eq!(
            headers["authorization"],
            basic("x-access-token", "gho_REAL").as_str()
        );
    }

    #[tokio::test]
    async fn a_credential_host_is_intercepted_when_it_can_be() {
        let mut offered = request(
            "CONNECT",
            "api.github.test:443",
            Protocol::HttpsConnect,
            &[],
        );
        offered.extensions_mut().insert(Interceptable);
        assert!(outcome(offered).await.unwrap().1);
        let mut other = request("CONNECT", "paste.test:443", Protocol::HttpsConnect, &[]);
        other.extensions_mut().insert(Interceptable);
        assert!(!outcome(other).await.unwrap().1);
    }

    #[test]
    fn bad_credentials_are_refused_and_secrets_never_print() {
        assert!(Injection::header("bad header", "{secret}").is_err());
        assert!(Injection::header("authorization", "Bearer").is_err());
        assert!(Injection::basic("a:b").is_err());
        assert!(Credential::new("x", Injection::basic("u").unwrap())
            .host("a..b")
            .is_err());
        assert_eq!(format!("{:?}", Secret::new("s3cret")), "Secret(…)");
        assert!(!format!("{:?}", credentials()).contains("REAL"));
    }
}
