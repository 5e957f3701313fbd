//! Resolve once, vet every answer, dial exactly the vetted address.
//!
//! Names are resolved once, with a timeout; a lookup failure, a timeout or
//! an empty answer fails closed. Every answer is checked with
//! [`NetworkPolicy::check_resolved`](portcullis_middleware::NetworkPolicy::check_resolved)
//! (denylist IP rules, local/private ranges) and a single refused answer
//! refuses the whole name, so there is no DNS-rebinding window and no
//! second lookup.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::Duration;

use http::Method;
use tokio::net::TcpStream;

use portcullis_middleware::policy::Decision;
use portcullis_middleware::target::canonical_ip;
use portcullis_middleware::{
    Blocked, BoxError, Host, PolicyHandle, Protocol, Reason, Source, Target, UpstreamError,
    UpstreamErrorKind,
};

use crate::hints::Fixes;
use crate::resolve::Resolve;

/// Resolves, vets and dials.
#[derive(Clone)]
pub(crate) struct Dialer {
    policy: PolicyHandle,
    resolver: Arc<dyn Resolve>,
    resolve_timeout: Duration,
    connect_timeout: Duration,
    own: OwnListeners,
    /// How a refusal made here names its fix.
    fixes: Fixes,
}

/// This proxy's own listeners, and every address that reaches them: a
/// destination among them is a loop. Listeners added later (a way in of
/// an integrator's, [`Ingress::listening_on`](crate::kit::Ingress::listening_on))
/// count while they are registered; clones share them.
#[derive(Debug, Clone)]
pub(crate) struct OwnListeners {
    /// What a dial reads, without a lock: the listeners bound at the start
    /// and those registered since.
    known: Arc<ArcSwap<Known>>,
    /// The listeners bound at the start.
    base: Arc<Known>,
    /// The listeners registered since the start.
    added: Arc<Mutex<Registered>>,
    /// Reads the host's interface addresses now: an address added after
    /// the start (a VPN, DHCP, a container bridge) reaches a listener on
    /// `0.0.0.0` too, so a destination on one of our ports that is not in
    /// `interfaces` is looked up again before it is dialled.
    read_interfaces: fn() -> Vec<IpAddr>,
    /// This proxy's name in `Via` headers sent to upstream proxies; a
    /// request arriving with it has come round a loop.
    token: Arc<str>,
}

/// Listeners registered after the start: the next number, and each
/// listener's number and address.
type Registered = (u64, Vec<(u64, SocketAddr)>);

/// Listeners' ports and the addresses that reach them.
#[derive(Debug, Default, Clone)]
struct Known {
    ports: Vec<u16>,
    /// The listeners' own addresses and the host's interface addresses,
    /// read when the listeners were bound.
    interfaces: Vec<IpAddr>,
}

impl Default for OwnListeners {
    fn default() -> OwnListeners {
        OwnListeners::new(&[])
    }
}

/// A name for one running proxy, random per start: `portcullis-<16 hex digits>`.
fn instance_token() -> Arc<str> {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("portcullis-{random:016x}").into()
}

/// The host's interface addresses now (empty when they cannot be read).
fn host_interfaces() -> Vec<IpAddr> {
    let mut interfaces = Vec::new();
    if let Ok(found) = nix::ifaddrs::getifaddrs() {
        for interface in found {
            let address = interface.address.as_ref();
            if let Some(v4) = address.and_then(|a| a.as_sockaddr_in()) {
                interfaces.push(IpAddr::V4(v4.ip()));
            }
            if let Some(v6) = address.and_then(|a| a.as_sockaddr_in6()) {
                interfaces.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    interfaces
}

impl OwnListeners {
    /// The listeners bound at `addresses`.
    pub(crate) fn new(addresses: &[SocketAddr]) -> OwnListeners {
        OwnListeners::reading(addresses, host_interfaces)
    }

    /// The same, reading interface addresses with `read_interfaces`.
    fn reading(addresses: &[SocketAddr], read_interfaces: fn() -> Vec<IpAddr>) -> OwnListeners {
        let mut interfaces: Vec<IpAddr> = addresses.iter().map(SocketAddr::ip).collect();
        if !addresses.is_empty() {
            interfaces.extend(read_interfaces());
        }
        let base = Known {
            ports: addresses.iter().map(SocketAddr::port).collect(),
            interfaces,
        };
        OwnListeners {
            known: Arc::new(ArcSwap::from_pointee(base.clone())),
            base: Arc::new(base),
            added: Arc::default(),
            read_interfaces,
            token: instance_token(),
        }
    }

    /// Adds a listener bound at `address`; its number, to
    /// [`forget`](Self::forget) it.
    pub(crate) fn register(&self, address: SocketAddr) -> u64 {
        let mut added = self
            .added
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let number = added.0;
        added.0 += 1;
        added.1.push((number, address));
        self.publish(&added.1);
        number
    }

    /// Removes the listener registered as `number`.
    pub(crate) fn forget(&self, number: u64) {
        let mut added = self
            .added
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        added.1.retain(|(n, _)| *n != number);
        self.publish(&added.1);
    }

    /// Makes the start's listeners and `added` what dials read.
    fn publish(&self, added: &[(u64, SocketAddr)]) {
        let mut known = (*self.base).clone();
        for (_, address) in added {
            if !known.ports.contains(&address.port()) {
                known.ports.push(address.port());
            }
            known.interfaces.push(address.ip());
        }
        // A proxy started with no listener read no interface yet.
        if self.base.ports.is_empty() && !added.is_empty() {
            known.interfaces.extend((self.read_interfaces)());
        }
        self.known.store(Arc::new(known));
    }

    /// The `Via` value this process adds to what it sends to an upstream
    /// proxy (never to an origin).
    pub(crate) fn via(&self) -> String {
        format!("1.1 {}", self.token)
    }

    /// Whether a received `Via` value shows this process: a loop.
    pub(crate) fn seen_in(&self, via: &str) -> bool {
        via.split(',')
            .any(|hop| hop.split_whitespace().nth(1) == Some(&*self.token))
    }

    /// Whether dialling `address` would reach one of our listeners. Only a
    /// destination on one of our ports costs a look at the interfaces.
    pub(crate) fn reaches(&self, address: SocketAddr) -> bool {
        let known = self.known.load();
        if !known.ports.contains(&address.port()) {
            return false;
        }
        let ip = canonical_ip(address.ip());
        ip.is_loopback()
            || ip.is_unspecified()
            || known.interfaces.contains(&ip)
            || (self.read_interfaces)()
                .into_iter()
                .any(|found| canonical_ip(found) == ip)
    }
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("resolve_timeout", &self.resolve_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// What a refusal made here says about the request it refuses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusing<'a> {
    pub(crate) target: &'a Target,
    pub(crate) protocol: Protocol,
    pub(crate) method: &'a Method,
}

impl Refusing<'_> {
    /// This request refused by the connector for `reason`, naming `rule`.
    pub(crate) fn refused(&self, reason: Reason, rule: String) -> Blocked {
        Blocked::new(
            reason,
            Source::Connector,
            self.target.clone(),
            self.protocol,
            self.method,
        )
        .with_rule(Some(rule))
    }
}

impl Dialer {
    /// A dialer checking answers against `policy`.
    pub(crate) fn new(
        policy: PolicyHandle,
        resolver: Arc<dyn Resolve>,
        resolve_timeout: Duration,
        connect_timeout: Duration,
        own: OwnListeners,
        fixes: Fixes,
    ) -> Dialer {
        Dialer {
            policy,
            resolver,
            resolve_timeout,
            connect_timeout,
            own,
            fixes,
        }
    }

    /// This proxy's own listeners.
    pub(crate) fn own(&self) -> &OwnListeners {
        &self.own
    }

    /// Resolves `host` once and returns the vetted socket addresses (never
    /// empty); any answer the policy forbids refuses the whole target.
    pub(crate) async fn resolve_vetted(
        &self,
        host: &Host,
        port: u16,
        request: Refusing<'_>,
    ) -> Result<Vec<SocketAddr>, BoxError> {
        let addresses = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                let lookup = self.resolver.resolve(name);
                match tokio::time::timeout(self.resolve_timeout, lookup).await {
                    Err(_) => {
                        return Err(upstream_error(
                            UpstreamErrorKind::TimedOut,
                            request.target,
                            "the name lookup timed out".into(),
                        ))
                    }
                    Ok(Err(error)) => {
                        return Err(upstream_error(
                            UpstreamErrorKind::Unresolved,
                            request.target,
                            format!("the name did not resolve: {error}"),
                        ))
                    }
                    Ok(Ok(addresses)) if addresses.is_empty() => {
                        return Err(upstream_error(
                            UpstreamErrorKind::Unresolved,
                            request.target,
                            "the name has no addresses".into(),
                        ))
                    }
                    Ok(Ok(addresses)) => addresses,
                }
            }
        };
        let policy = self.policy.load();
        let mut vetted = Vec::with_capacity(addresses.len());
        for address in addresses {
            let address = canonical_ip(address);
            if let Err(Decision::Deny { reason, rule }) = policy.check_resolved(host, address, port)
            {
                let blocked = request.refused(reason, rule);
                // The host is allowed; the address it resolved to is not. The
                // fix names the address, not the host.
                let blocked = match (reason, host) {
                    (Reason::NotAllowedLocal, Host::Name(_)) => {
                        let message = self.fixes.resolved_local(request.target, address, port);
                        blocked.with_message(message).with_address(address)
                    }
                    _ => blocked,
                };
                return Err(blocked.into());
            }
            let vetted_address = SocketAddr::new(address, port);
            if self.own.reaches(vetted_address) {
                return Err(request
                    .refused(
                        Reason::Loop,
                        format!("portcullis's own listener at {vetted_address}"),
                    )
                    .into());
            }
            vetted.push(vetted_address);
        }
        Ok(vetted)
    }

    /// Connects to the first reachable vetted address of `host:port`.
    pub(crate) async fn connect(
        &self,
        host: &Host,
        port: u16,
        request: Refusing<'_>,
    ) -> Result<TcpStream, BoxError> {
        let addresses = self.resolve_vetted(host, port, request).await?;
        let mut last_error = None;
        for address in addresses {
            let error =
                match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await
                {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Ok(Err(error)) => UpstreamError::from_io(request.target, &error),
                    Err(_) => UpstreamError {
                        kind: UpstreamErrorKind::TimedOut,
                        target: request.target.to_string(),
                        detail: format!("connecting to {address} timed out"),
                    },
                };
            last_error = Some(error);
        }
        // `resolve_vetted` never answers with no address, so an error is set.
        Err(last_error.map_or_else(
            || upstream_error(UpstreamErrorKind::Unresolved, request.target, String::new()),
            Into::into,
        ))
    }

    /// The connect timeout.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

fn upstream_error(kind: UpstreamErrorKind, target: &Target, detail: String) -> BoxError {
    UpstreamError {
        kind,
        target: target.to_string(),
        detail,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::ResolveFuture;
    use portcullis_middleware::{find_blocked, NetworkPolicy, ProxyErrorRef, Reason};
    use std::net::IpAddr;

    static ADDED_LATER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// The host's interfaces: 192.0.2.7, and 198.51.100.77 once "added".
    fn changing_interfaces() -> Vec<IpAddr> {
        let mut found = vec!["192.0.2.7".parse().unwrap()];
        if ADDED_LATER.load(std::sync::atomic::Ordering::SeqCst) {
            found.push("198.51.100.77".parse().unwrap());
        }
        found
    }

    #[test]
    fn an_interface_address_added_after_the_start_is_still_us() {
        let own = OwnListeners::reading(&["0.0.0.0:3128".parse().unwrap()], changing_interfaces);
        assert!(own.reaches("192.0.2.7:3128".parse().unwrap()));
        assert!(own.reaches("[::ffff:127.0.0.1]:3128".parse().unwrap()));
        assert!(!own.reaches("198.51.100.77:3128".parse().unwrap()));
        ADDED_LATER.store(true, std::sync::atomic::Ordering::SeqCst);
        // A VPN or DHCP address that appeared after the listeners were bound.
        assert!(own.reaches("198.51.100.77:3128".parse().unwrap()));
        assert!(
            !own.reaches("198.51.100.77:3129".parse().unwrap()),
            "another port"
        );
        assert!(
            !own.reaches("198.51.100.78:3128".parse().unwrap()),
            "another host"
        );
    }

    /// A resolver answering from a fixed table; `slow.test` never answers.
    fn stub(name: &str) -> ResolveFuture {
        let answer: Result<Vec<IpAddr>, std::io::Error> = match name {
            "public.test" => Ok(vec!["192.0.2.10".parse().unwrap()]),
            "two.test" => Ok(vec![
                "198.51.100.1".parse().unwrap(),
                "203.0.113.9".parse().unwrap(),
            ]),
            "private.test" => Ok(vec!["10.0.0.5".parse().unwrap()]),
            "mixed.test" => Ok(vec![
                "192.0.2.10".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            ]),
            "mapped.test" => Ok(vec!["::ffff:169.254.169.254".parse().unwrap()]),
            "empty.test" => Ok(vec![]),
            "slow.test" => {
                return Box::pin(async {
                    std::future::pending::<()>().await;
                    Ok(vec![])
                })
            }
            _ => Err(std::io::Error::other("no such name")),
        };
        Box::pin(async move { answer })
    }

    fn dialer(policy: NetworkPolicy) -> Dialer {
        Dialer::new(
            PolicyHandle::new(policy),
            Arc::new(stub),
            Duration::from_secs(5),
            Duration::from_secs(5),
            OwnListeners::default(),
            Fixes::Keys,
        )
    }

    async fn vet(dialer: &Dialer, authority: &str) -> Result<Vec<SocketAddr>, BoxError> {
        let target = Target::parse_authority(authority, None).unwrap();
        let Target::Host { host, port } = &target else {
            unreachable!()
        };
        let request = Refusing {
            target: &target,
            protocol: Protocol::HttpsConnect,
            method: &Method::CONNECT,
        };
        dialer.resolve_vetted(host, *port, request).await
    }

    fn upstream_kind(error: &BoxError) -> Option<UpstreamErrorKind> {
        match ProxyErrorRef::find(error.as_ref()) {
            Some(ProxyErrorRef::Upstream(upstream)) => Some(upstream.kind),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_branch_of_vetting() {
        // TEST-NET answers are local/private; this policy allows them so the
        // "public" names stand for a real public answer.
        let permissive = NetworkPolicy::builder()
            .allow("192.0.2.0/24")
            .unwrap()
            .allow("198.51.100.0/24")
            .unwrap()
            .allow("203.0.113.0/24")
            .unwrap()
            .build();
        let dialer = dialer(permissive);

        let one = vet(&dialer, "public.test:443").await.unwrap();
        assert_eq!(one, vec!["192.0.2.10:443".parse().unwrap()]);
        let two = vet(&dialer, "two.test:80").await.unwrap();
        assert_eq!(two.len(), 2, "every vetted answer is kept, in order");

        let error = vet(&dialer, "private.test:443").await.unwrap_err();
        let message = &find_blocked(error.as_ref()).unwrap().message;
        assert!(
            message.contains("\"10.0.0.5:443\" to allowed_domains")
                && !message.contains("\"private.test"),
            "the fix names the address the host resolved to: {message}"
        );
        for (authority, reason) in [
            ("private.test:443", Reason::NotAllowedLocal),
            ("mixed.test:443", Reason::NotAllowedLocal),
            ("mapped.test:80", Reason::NotAllowedLocal),
        ] {
            let error = vet(&dialer, authority).await.unwrap_err();
            let blocked = find_blocked(error.as_ref()).expect("a refusal");
            assert_eq!(blocked.reason, reason, "{authority}");
            assert_eq!(blocked.source, Source::Connector, "{authority}");
            assert_eq!(blocked.protocol, Protocol::HttpsConnect);
            assert_eq!(blocked.method, "CONNECT");
        }

        for (authority, kind) in [
            ("unknown.test:443", UpstreamErrorKind::Unresolved),
            ("empty.test:443", UpstreamErrorKind::Unresolved),
            ("slow.test:443", UpstreamErrorKind::TimedOut),
        ] {
            let error = vet(&dialer, authority).await.unwrap_err();
            assert_eq!(upstream_kind(&error), Some(kind), "{authority}: {error}");
        }

        // IP literals are vetted without a lookup, with the same check.
        let error = vet(&dialer, "[::ffff:7f00:1]:80").await.unwrap_err();
        assert_eq!(
            find_blocked(error.as_ref()).unwrap().reason,
            Reason::NotAllowedLocal
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_denylist_applies_to_answers_and_the_policy_is_read_live() {
        let handle = PolicyHandle::new(
            NetworkPolicy::builder()
                .allow_local_binding(true)
                .deny("10.0.0.0/8")
                .unwrap()
                .build(),
        );
        let dialer = Dialer::new(
            handle.clone(),
            Arc::new(stub),
            Duration::from_secs(5),
            Duration::from_secs(5),
            OwnListeners::default(),
            Fixes::Keys,
        );
        let error = vet(&dialer, "private.test:443").await.unwrap_err();
        assert_eq!(find_blocked(error.as_ref()).unwrap().reason, Reason::Denied);
        handle.store(NetworkPolicy::builder().allow_local_binding(true).build());
        assert!(vet(&dialer, "private.test:443").await.is_ok());
    }
}
