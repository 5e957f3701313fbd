//! Profiles: one proxy, several policies, chosen by who the caller is.
//!
//! A profile is a named stack: its own [`NetworkPolicy`](crate::NetworkPolicy)
//! (lists, mode, rules, limits), its own credentials and its own approval
//! memory, behind the layers every profile shares. Two pieces put a request
//! into one:
//!
//! - [`SelectProfileLayer`] decides who the caller is and puts a
//!   [`ProfileName`] in the request's extensions. The default
//!   [`ProfileSelector`] looks the authenticated [`ProxyUser`] up by name (a
//!   hash lookup), then the client's address in the `sources` ranges
//!   (longest prefix first, one hash lookup per prefix length in use). It
//!   is only a layer: put your own in its place to choose from a header a
//!   trusted gateway sets, or from a JWT.
//! - [`Profiles`] sends each request to its profile's service. A request
//!   without a profile goes to the service for unmatched callers when one is
//!   given; otherwise, and for a name it does not hold, it is refused
//!   (`auth_required`, a 407 over HTTP; fail closed).
//!
//! Nothing one profile does reaches another: approvals, rate-limit buckets
//! and credentials live in each profile's own stack.
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response};
//! use portcullis_middleware::profiles::{ProfileName, ProfileSelector, Profiles, SelectProfileLayer};
//! use portcullis_middleware::{find_blocked, ClientAddr, Protocol, ProxyUser, Reason, Target};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let answer = |name: &'static str| service_fn(move |_: Request<()>| async move {
//!     Ok::<_, portcullis_middleware::BoxError>(Response::new(name))
//! });
//! let router = Profiles::new([("ci", answer("ci")), ("agent", answer("agent"))]);
//! let mut selector = ProfileSelector::new();
//! selector.user("builder", "ci");
//! selector.source("10.1.0.0/16".parse()?, "agent");
//! let service = SelectProfileLayer::new(selector).layer(router);
//!
//! let request = |user: Option<&str>, client: &str| {
//!     let mut request = Request::get("http://example.com/").body(()).unwrap();
//!     request.extensions_mut().insert(Target::parse_authority("example.com:80", None).unwrap());
//!     request.extensions_mut().insert(Protocol::Http);
//!     request.extensions_mut().insert(ClientAddr(client.parse().unwrap()));
//!     if let Some(user) = user {
//!         request.extensions_mut().insert(ProxyUser(user.into()));
//!     }
//!     request
//! };
//! assert_eq!(*service.clone().oneshot(request(Some("builder"), "127.0.0.1:5000")).await?.body(), "ci");
//! assert_eq!(*service.clone().oneshot(request(None, "10.1.2.3:5000")).await?.body(), "agent");
//! let refused = service.oneshot(request(None, "192.0.2.1:5000")).await.unwrap_err();
//! assert_eq!(find_blocked(refused.as_ref()).unwrap().reason, Reason::AuthRequired);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, StatusCode};
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::pattern::IpNetwork;
use crate::request::{ClientAddr, ProxyUser, RequestInfo};
use crate::target::canonical_ip;
use crate::violation_log::RecordLater;

pub use crate::request::ProfileName;

/// The refusal of a request whose `Proxy-Authorization` names no user (an
/// unknown one, a wrong password, or not `Basic user:password`), for the
/// transport that read it to record: `auth_required`, a 407. `attempted`
/// is the username it gave, if any (never the password).
pub fn credential_refused(
    target: crate::Target,
    protocol: crate::Protocol,
    method: &http::Method,
    attempted: Option<&str>,
) -> Blocked {
    auth_required(target, protocol, method).with_rule(Some(match attempted {
        Some(user) => format!(
            "proxy user {:?}: unknown, or a wrong password",
            user.escape_debug().to_string()
        ),
        None => "a Proxy-Authorization that is not Basic user:password".to_owned(),
    }))
}

/// `auth_required`: a 407 asking for the credential of a known user.
fn auth_required(
    target: crate::Target,
    protocol: crate::Protocol,
    method: &http::Method,
) -> Blocked {
    Blocked::new(
        Reason::AuthRequired,
        Source::Profiles,
        target,
        protocol,
        method,
    )
    .with_status(StatusCode::PROXY_AUTHENTICATION_REQUIRED, None)
}

/// Who gets which profile: proxy users by name, then source ranges.
#[derive(Debug, Clone, Default)]
pub struct ProfileSelector {
    users: HashMap<String, Arc<str>>,
    /// One table per (prefix length, family), longest prefix first.
    ranges: Vec<(u8, bool, HashMap<IpAddr, Arc<str>>)>,
}

impl ProfileSelector {
    /// Selects nothing: every caller is unmatched.
    pub fn new() -> ProfileSelector {
        ProfileSelector::default()
    }

    /// The proxy user `user` gets `profile` (a later call for the same
    /// user replaces it).
    pub fn user(&mut self, user: impl Into<String>, profile: &str) -> &mut ProfileSelector {
        self.users.insert(user.into(), Arc::from(profile));
        self
    }

    /// A caller from `network` that is not a known user gets `profile`;
    /// the longest prefix that covers the address wins.
    pub fn source(&mut self, network: IpNetwork, profile: &str) -> &mut ProfileSelector {
        let v6 = network.address.is_ipv6();
        let at = match self
            .ranges
            .iter()
            .position(|(prefix, family, _)| *prefix == network.prefix && *family == v6)
        {
            Some(at) => at,
            None => {
                self.ranges.push((network.prefix, v6, HashMap::new()));
                self.ranges.sort_by_key(|range| std::cmp::Reverse(range.0));
                self.ranges
                    .iter()
                    .position(|(prefix, family, _)| *prefix == network.prefix && *family == v6)
                    .unwrap_or_default()
            }
        };
        if let Some((_, _, table)) = self.ranges.get_mut(at) {
            table.insert(network.address, Arc::from(profile));
        }
        self
    }

    /// The profile for a caller: its user's, else its address's.
    pub fn select(&self, user: Option<&str>, client: Option<IpAddr>) -> Option<&Arc<str>> {
        if let Some(profile) = user.and_then(|user| self.users.get(user)) {
            return Some(profile);
        }
        let ip = canonical_ip(client?);
        self.ranges
            .iter()
            .filter(|(_, v6, _)| *v6 == ip.is_ipv6())
            .find_map(|(prefix, _, table)| {
                let network = IpNetwork::new(ip, *prefix)?;
                table.get(&network.address)
            })
    }

    /// Whether any user or range is known.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.ranges.is_empty()
    }
}

/// Puts the caller's [`ProfileName`] into each request; see the
/// [module docs](self). A request that already carries one (from a layer
/// of yours further out) keeps it. Clones share the selector, which
/// [`store`](SelectProfileLayer::store) replaces for the next request.
#[derive(Debug, Clone)]
pub struct SelectProfileLayer {
    selector: Arc<ArcSwap<ProfileSelector>>,
}

impl SelectProfileLayer {
    /// Selects with `selector`.
    pub fn new(selector: ProfileSelector) -> SelectProfileLayer {
        SelectProfileLayer {
            selector: Arc::new(ArcSwap::from_pointee(selector)),
        }
    }

    /// Replaces the selector (a reload); requests already given a profile
    /// keep it.
    pub fn store(&self, selector: ProfileSelector) {
        self.selector.store(Arc::new(selector));
    }
}

impl<S> Layer<S> for SelectProfileLayer {
    type Service = SelectProfile<S>;

    fn layer(&self, inner: S) -> SelectProfile<S> {
        SelectProfile {
            inner,
            selector: self.selector.clone(),
        }
    }
}

/// The service [`SelectProfileLayer`] makes.
#[derive(Debug, Clone)]
pub struct SelectProfile<S> {
    inner: S,
    selector: Arc<ArcSwap<ProfileSelector>>,
}

impl<S, B> Service<Request<B>> for SelectProfile<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        let extensions = request.extensions();
        if extensions.get::<ProfileName>().is_none() {
            let user = extensions.get::<ProxyUser>().map(|user| user.0.as_str());
            let client = extensions.get::<ClientAddr>().map(|client| client.0.ip());
            let chosen = self.selector.load().select(user, client).cloned();
            if let Some(name) = chosen {
                request.extensions_mut().insert(ProfileName(name));
            }
        }
        self.inner.call(request)
    }
}

/// Sends each request to its profile's service; see the [module docs](self).
#[derive(Debug)]
pub struct Profiles<S> {
    /// Behind a lock only to be cloned from any thread (a stack need not
    /// be `Sync`); it is held for the clone alone.
    table: Arc<HashMap<Arc<str>, std::sync::Mutex<S>>>,
    unmatched: Option<S>,
    refusals: Option<RecordLater>,
    challenge: bool,
}

impl<S: Clone> Clone for Profiles<S> {
    fn clone(&self) -> Profiles<S> {
        Profiles {
            table: self.table.clone(),
            unmatched: self.unmatched.clone(),
            refusals: self.refusals.clone(),
            challenge: self.challenge,
        }
    }
}

impl<S> Profiles<S> {
    /// A router over these profiles' services; unmatched callers are
    /// refused.
    pub fn new<N: AsRef<str>>(profiles: impl IntoIterator<Item = (N, S)>) -> Profiles<S> {
        Profiles {
            table: Arc::new(
                profiles
                    .into_iter()
                    .map(|(name, service)| {
                        (Arc::from(name.as_ref()), std::sync::Mutex::new(service))
                    })
                    .collect(),
            ),
            unmatched: None,
            refusals: None,
            challenge: false,
        }
    }

    /// Callers given no profile are served by `service` (the proxy's own,
    /// top-level policy) instead of being refused.
    pub fn unmatched(mut self, service: S) -> Profiles<S> {
        self.unmatched = Some(service);
        self
    }

    /// Records this router's own refusals there (the services behind it
    /// record theirs).
    pub fn recording(mut self, refusals: RecordLater) -> Profiles<S> {
        self.refusals = Some(refusals);
        self
    }

    /// Whether callers can name themselves (the proxy has users): then a
    /// request that names no user and gets no profile is only asked for a
    /// credential (the 407), not recorded — a client that sends its
    /// credential only when asked (git) would otherwise leave a refusal
    /// on the record at every start. One that names a user and still gets
    /// no profile is recorded either way.
    pub fn challenge_unnamed(mut self, challenge: bool) -> Profiles<S> {
        self.challenge = challenge;
        self
    }

    /// The profiles' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.table.keys().map(|name| &**name)
    }
}

impl<S, B, R> Service<Request<B>> for Profiles<S>
where
    S: Service<Request<B>, Response = R> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = R;
    type Error = BoxError;
    type Future = futures_lite::Either<
        futures_lite::MapErr<Oneshot<S, Request<B>>, BoxError>,
        std::future::Ready<Result<R, BoxError>>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call readies the service it picks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let chosen = match request.extensions().get::<ProfileName>() {
            Some(ProfileName(name)) => self.table.get(name).map(|service| {
                service
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            }),
            None => self.unmatched.clone(),
        };
        if let Some(service) = chosen {
            return futures_lite::Either::Left(futures_lite::map_err(service.oneshot(request)));
        }
        let refusal: BoxError = match RequestInfo::from_request(&request) {
            Ok(info) => {
                let mut blocked = auth_required(info.target, info.protocol, &info.method);
                if let Some(ProfileName(name)) = request.extensions().get::<ProfileName>() {
                    blocked = blocked.with_rule(Some(format!("profile {name:?} is not served")));
                }
                let user = request.extensions().get::<ProxyUser>();
                let asked = self.challenge && user.is_none();
                match &self.refusals {
                    Some(refusals) if !asked => {
                        refusals.record_as(info.client, user, None, &blocked);
                    }
                    _ => tracing::debug!(client = ?info.client, "asked for a proxy credential"),
                }
                blocked.into()
            }
            Err(error) => error.into(),
        };
        futures_lite::Either::Right(std::future::ready(Err(refusal)))
    }
}

/// The two futures [`Profiles`] answers with, without a dependency.
mod futures_lite {
    use std::future::Future;
    use std::marker::PhantomData;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use pin_project_lite::pin_project;

    use crate::error::BoxError;

    pin_project! {
        /// One future or the other.
        #[project = EitherProj]
        #[derive(Debug)]
        pub enum Either<L, R> {
            /// The chosen profile's answer.
            Left { #[pin] future: L },
            /// A refusal.
            Right { #[pin] future: R },
        }
    }

    #[allow(non_snake_case)]
    impl<L, R> Either<L, R> {
        pub(super) fn Left(future: L) -> Either<L, R> {
            Either::Left { future }
        }
        pub(super) fn Right(future: R) -> Either<L, R> {
            Either::Right { future }
        }
    }

    impl<L, R, T> Future for Either<L, R>
    where
        L: Future<Output = T>,
        R: Future<Output = T>,
    {
        type Output = T;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
            match self.project() {
                EitherProj::Left { future } => future.poll(cx),
                EitherProj::Right { future } => future.poll(cx),
            }
        }
    }

    pin_project! {
        /// A future whose error is boxed.
        #[derive(Debug)]
        pub struct MapErr<F, E> {
            #[pin]
            future: F,
            _error: PhantomData<E>,
        }
    }

    pub(super) fn map_err<F>(future: F) -> MapErr<F, BoxError> {
        MapErr {
            future,
            _error: PhantomData,
        }
    }

    impl<F, T, E> Future for MapErr<F, BoxError>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<T, BoxError>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.project()
                .future
                .poll(cx)
                .map(|r| r.map_err(Into::into))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn network(text: &str) -> IpNetwork {
        text.parse().unwrap()
    }

    #[test]
    fn users_win_then_the_longest_range() {
        let mut selector = ProfileSelector::new();
        selector
            .user("ci", "ci")
            .source(network("10.0.0.0/8"), "wide")
            .source(network("10.1.0.0/16"), "narrow")
            .source(network("fd00::/8"), "six");
        let pick = |user, ip: &str| {
            selector
                .select(user, Some(ip.parse().unwrap()))
                .map(|p| p.to_string())
        };
        assert_eq!(pick(Some("ci"), "10.1.2.3").as_deref(), Some("ci"));
        assert_eq!(
            pick(Some("stranger"), "10.1.2.3").as_deref(),
            Some("narrow")
        );
        assert_eq!(pick(None, "10.2.0.1").as_deref(), Some("wide"));
        assert_eq!(pick(None, "::ffff:10.1.0.9").as_deref(), Some("narrow"));
        assert_eq!(pick(None, "fd12::1").as_deref(), Some("six"));
        assert_eq!(pick(None, "192.0.2.1"), None);
        assert_eq!(selector.select(None, None), None);
    }
}
