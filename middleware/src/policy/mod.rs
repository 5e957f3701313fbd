//! Policy data and decisions: plain data and pure functions (no IO, no clock).
//!
//! | pattern | matches |
//! | --- | --- |
//! | `example.com` | exactly that host, any case, trailing dot ignored |
//! | `*.example.com` | every subdomain at any depth, not the apex, not `evilexample.com` |
//! | `**.example.com` | the apex and every subdomain |
//! | `*` | every host; allowlist only, refused in the denylist |
//! | `example.com:8443`, `*.x:443` | the pattern limited to one port |
//! | `10.0.0.0/8`, `127.0.0.1`, `[::1]:3000` | IP literals and CIDR ranges, optionally port-scoped |
//!
//! [`NetworkPolicy::decide`] applies, in order: the denylist (deny wins over
//! everything) → for IP literals and `localhost` names, the local/private
//! address check → the allowlist → a miss (which the policy layer turns into
//! *ask* when an approver is configured, and *not_allowed* otherwise).
//! Local and private addresses (see [`is_local`]) are refused unless
//! `allow_local_binding` is on or an allowlist entry names that exact IP,
//! IP:port or CIDR range; a wildcard never unlocks them.
//!
//! [`PolicyHandle`] holds the live policy; layers load a snapshot per request,
//! so [`PolicyHandle::store`] changes the very next decision.

mod suffix;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use crate::address::{embedded_ipv4, is_local, is_metadata};
pub use crate::pattern::{HostPattern, IpNetwork, MatchKind, Pattern, PatternError, PatternSet};
pub use suffix::is_public_suffix;

use crate::error::Reason;
use crate::target::{Host, Target};

/// Full access, or read-only methods only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every method.
    #[default]
    Full,
    /// Only `GET`, `HEAD` and `OPTIONS`; CONNECT only when intercepted; no SOCKS5.
    Limited,
}

impl Mode {
    /// `full` or `limited`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Limited => "limited",
        }
    }
}

/// Which list a pattern belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    /// `allowed_domains`.
    Allowed,
    /// `denied_domains`.
    Denied,
}

impl List {
    /// The configuration key of the list.
    pub fn key(self) -> &'static str {
        match self {
            List::Allowed => "allowed_domains",
            List::Denied => "denied_domains",
        }
    }
}

/// A pattern that could not be added to a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The pattern did not parse.
    #[error("invalid pattern {pattern:?} in {}: {error}", list.key())]
    Pattern {
        /// The list.
        list: List,
        /// The pattern as written.
        pattern: String,
        /// Why.
        error: PatternError,
    },
    /// `*` in the denylist.
    #[error(
        "`*` is not allowed in denied_domains: to deny everything, leave allowed_domains empty"
    )]
    WildcardDeny,
    /// A Unix socket path that is not absolute.
    #[error("unix socket path {0:?} must be absolute")]
    RelativeSocket(String),
    /// What was to be removed is not there.
    #[error("{what} is not in {list}, so it cannot be removed")]
    NotListed {
        /// The list: `allowed_domains`, `denied_domains`, `[[rules]]` or
        /// `allow_unix_sockets`.
        list: &'static str,
        /// The entry, as given.
        what: String,
    },
}

/// What the policy says about a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, by this rule.
    Allow {
        /// The rule, e.g. `allowed_domains: *.example.com`.
        rule: String,
    },
    /// Refused, finally.
    Deny {
        /// Why.
        reason: Reason,
        /// The rule, e.g. `denied_domains: evil.com`.
        rule: String,
    },
    /// No rule allows it: *ask* with an approver, *not_allowed* without.
    Miss,
}

/// The domain, IP and socket policy: plain data.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    allowed: PatternSet,
    denied: PatternSet,
    allow_local_binding: bool,
    mode: Mode,
    unix_sockets: HashSet<PathBuf>,
    allow_all_unix_sockets: bool,
    /// Stored negated so that the default (git fetch allowed) is `false`.
    refuse_git_fetch: bool,
    /// Per-host request rules (methods and paths).
    request_rules: crate::request_rules::RequestRules,
    /// Secret scanning (off by default).
    scan: crate::scan::ScanPolicy,
    /// Rate limits per destination (none by default).
    rate_limits: crate::limits::RateLimits,
}

impl NetworkPolicy {
    /// A builder; the empty policy refuses everything.
    pub fn builder() -> NetworkPolicyBuilder {
        NetworkPolicyBuilder::default()
    }

    /// A builder that starts from this policy: add to it, or change its
    /// settings, and build a new one.
    pub fn to_builder(&self) -> NetworkPolicyBuilder {
        NetworkPolicyBuilder {
            policy: self.clone(),
        }
    }

    /// Secret scanning; see [`scan`](crate::scan).
    pub fn scan(&self) -> &crate::scan::ScanPolicy {
        &self.scan
    }

    /// Rate limits per destination; see [`limits`](crate::limits).
    pub fn rate_limits(&self) -> &crate::limits::RateLimits {
        &self.rate_limits
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The per-host request rules (empty unless set).
    pub fn request_rules(&self) -> &crate::request_rules::RequestRules {
        &self.request_rules
    }

    /// Whether limited mode counts git's smart-HTTP fetch
    /// (`POST …/git-upload-pack`) as a read (default: yes).
    pub fn limited_allows_git_fetch(&self) -> bool {
        !self.refuse_git_fetch
    }

    /// Whether local/private addresses are allowed for allowlisted hosts.
    pub fn allow_local_binding(&self) -> bool {
        self.allow_local_binding
    }

    /// The allowlist.
    pub fn allowed(&self) -> &PatternSet {
        &self.allowed
    }

    /// The denylist.
    pub fn denied(&self) -> &PatternSet {
        &self.denied
    }

    /// Decides a target (before any name resolution).
    pub fn decide(&self, target: &Target) -> Decision {
        match target {
            Target::Unix(path) => self.decide_unix(path),
            Target::Host { host, port } => self.decide_host(host, *port),
        }
    }

    /// Decides a DNS question for `host` (protocol `dns`): a name is answered
    /// when a connection to it on some port could be allowed. A denylist
    /// entry refuses it unless the entry is scoped to a port (the other
    /// ports may still be allowed); an allowlist entry on any port allows
    /// it; a local name needs what a connection to it needs. Nothing is
    /// resolved: the connection that follows is decided on its own.
    pub fn decide_lookup(&self, host: &Host) -> Decision {
        let portless_deny = self
            .denied
            .find_all(host, crate::pattern::ANY_PORT)
            .into_iter()
            .filter_map(|index| self.denied.patterns().get(index))
            .find(|pattern| pattern.port.is_none());
        if let Some(pattern) = portless_deny {
            return Decision::Deny {
                reason: Reason::Denied,
                rule: format!("denied_domains: {pattern}"),
            };
        }
        if let Host::Ip(_) = host {
            return Decision::Deny {
                reason: Reason::NotAllowed,
                rule: "a DNS question names a host, not an address".to_owned(),
            };
        }
        if host.is_localhost_name() {
            if let Some(rule) = self.local_unlock(host, crate::pattern::ANY_PORT) {
                return Decision::Allow { rule };
            }
            if !self.allow_local_binding {
                return Decision::Deny {
                    reason: Reason::NotAllowedLocal,
                    rule: "local/private address (allow_local_binding = false)".to_owned(),
                };
            }
        }
        match self.allowed.find(host, crate::pattern::ANY_PORT) {
            Some((pattern, _)) => Decision::Allow {
                rule: format!("allowed_domains: {pattern}"),
            },
            None => Decision::Miss,
        }
    }

    fn decide_unix(&self, path: &std::path::Path) -> Decision {
        if !path.is_absolute() {
            return Decision::Deny {
                reason: Reason::NotAllowed,
                rule: "unix socket paths must be absolute".to_owned(),
            };
        }
        if self.allow_all_unix_sockets {
            return Decision::Allow {
                rule: "dangerously_allow_all_unix_sockets".to_owned(),
            };
        }
        if self.unix_sockets.contains(path) {
            return Decision::Allow {
                rule: format!("allow_unix_sockets: {}", path.display()),
            };
        }
        Decision::Deny {
            reason: Reason::NotAllowed,
            rule: "allow_unix_sockets".to_owned(),
        }
    }

    fn decide_host(&self, host: &Host, port: u16) -> Decision {
        if let Some((pattern, _)) = self.denied.find(host, port) {
            return Decision::Deny {
                reason: Reason::Denied,
                rule: format!("denied_domains: {pattern}"),
            };
        }
        if let Host::Ip(ip) = host {
            if is_metadata(*ip) {
                // Not even allow_local_binding or a range: only the address itself.
                return match self.exact_ip_rule(*ip, port) {
                    Some(rule) => Decision::Allow { rule },
                    None => Decision::Deny {
                        reason: Reason::NotAllowedLocal,
                        rule: format!(
                            "cloud metadata address {ip} (allow it only by naming it exactly)"
                        ),
                    },
                };
            }
        }
        let local = match host {
            Host::Ip(ip) => is_local(*ip),
            Host::Name(_) => host.is_localhost_name(),
        };
        if local {
            if let Some(rule) = self.local_unlock(host, port) {
                return Decision::Allow { rule };
            }
            if !self.allow_local_binding {
                return Decision::Deny {
                    reason: Reason::NotAllowedLocal,
                    rule: "local/private address (allow_local_binding = false)".to_owned(),
                };
            }
        }
        match self.allowed.find(host, port) {
            Some((pattern, _)) => Decision::Allow {
                rule: format!("allowed_domains: {pattern}"),
            },
            None => Decision::Miss,
        }
    }

    /// The allowlist entry that names a local host exactly: the IP, an
    /// IP:port, a CIDR range holding it, or the exact name `localhost`.
    fn local_unlock(&self, host: &Host, port: u16) -> Option<String> {
        let pattern = match host {
            Host::Ip(ip) => self.allowed.find_ip_rule(*ip, port),
            Host::Name(name) => self.allowed.find_exact_name(name, port),
        };
        pattern.map(|p| format!("allowed_domains: {p}"))
    }

    /// An allowlist entry naming exactly this address (not a range).
    fn exact_ip_rule(&self, ip: IpAddr, port: u16) -> Option<String> {
        self.allowed
            .patterns()
            .iter()
            .find(|p| {
                matches!(p.host, HostPattern::Ip(exact) if exact == ip)
                    && p.port.is_none_or(|only| only == port)
            })
            .map(|p| format!("allowed_domains: {p}"))
    }

    /// Checks one resolved address of an allowed host, as the connector does
    /// before dialling: the denylist's IP rules, then the local/private check.
    /// An exact `localhost` allowlist entry unlocks loopback answers for
    /// `localhost` names only.
    pub fn check_resolved(&self, host: &Host, ip: IpAddr, port: u16) -> Result<(), Decision> {
        if let Some(pattern) = self.denied.find_ip_rule(ip, port) {
            return Err(Decision::Deny {
                reason: Reason::Denied,
                rule: format!("denied_domains: {pattern} (resolved address {ip})"),
            });
        }
        if is_metadata(ip) {
            return match self.exact_ip_rule(ip, port) {
                Some(_) => Ok(()),
                None => Err(Decision::Deny {
                    reason: Reason::NotAllowedLocal,
                    rule: format!(
                        "cloud metadata address {ip} (allow it only by naming it exactly)"
                    ),
                }),
            };
        }
        if !is_local(ip)
            || self.allow_local_binding
            || self.allowed.find_ip_rule(ip, port).is_some()
        {
            return Ok(());
        }
        if let Host::Name(name) = host {
            if host.is_localhost_name()
                && ip.is_loopback()
                && self.allowed.find_exact_name(name, port).is_some()
            {
                return Ok(());
            }
        }
        Err(Decision::Deny {
            reason: Reason::NotAllowedLocal,
            rule: format!("local/private address {ip} (allow_local_binding = false)"),
        })
    }
}

/// Builds a [`NetworkPolicy`].
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicyBuilder {
    policy: NetworkPolicy,
}

impl NetworkPolicyBuilder {
    /// Adds an allowlist pattern.
    pub fn allow(mut self, pattern: &str) -> Result<NetworkPolicyBuilder, PolicyError> {
        let parsed = parse_in(List::Allowed, pattern)?;
        self.policy.allowed.insert(parsed);
        Ok(self)
    }

    /// Adds a denylist pattern (`*` is refused).
    pub fn deny(mut self, pattern: &str) -> Result<NetworkPolicyBuilder, PolicyError> {
        let parsed = parse_in(List::Denied, pattern)?;
        if parsed.is_any() {
            return Err(PolicyError::WildcardDeny);
        }
        self.policy.denied.insert(parsed);
        Ok(self)
    }

    /// Adds an allowlist pattern already parsed (from a typed configuration).
    pub fn allow_pattern(mut self, pattern: Pattern) -> NetworkPolicyBuilder {
        self.policy.allowed.insert(pattern);
        self
    }

    /// Adds a denylist pattern already parsed (`*` is refused).
    pub fn deny_pattern(mut self, pattern: Pattern) -> Result<NetworkPolicyBuilder, PolicyError> {
        if pattern.is_any() {
            return Err(PolicyError::WildcardDeny);
        }
        self.policy.denied.insert(pattern);
        Ok(self)
    }

    /// Adds several allowlist patterns.
    pub fn allow_all<'a>(
        mut self,
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> Result<NetworkPolicyBuilder, PolicyError> {
        for pattern in patterns {
            self = self.allow(pattern)?;
        }
        Ok(self)
    }

    /// Allows local/private addresses for allowlisted hosts.
    pub fn allow_local_binding(mut self, allow: bool) -> NetworkPolicyBuilder {
        self.policy.allow_local_binding = allow;
        self
    }

    /// Whether limited mode lets git fetch and clone over smart HTTP
    /// (`POST …/git-upload-pack`, a read; default: yes). `git-receive-pack`
    /// (push) is never let through.
    pub fn limited_allow_git_fetch(mut self, allow: bool) -> NetworkPolicyBuilder {
        self.policy.refuse_git_fetch = !allow;
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> NetworkPolicyBuilder {
        self.policy.mode = mode;
        self
    }

    /// Sets the per-host request rules; see
    /// [`request_rules`](crate::request_rules).
    pub fn request_rules(
        mut self,
        rules: crate::request_rules::RequestRules,
    ) -> NetworkPolicyBuilder {
        self.policy.request_rules = rules;
        self
    }

    /// Sets secret scanning; see [`scan`](crate::scan).
    pub fn scan(mut self, scan: crate::scan::ScanPolicy) -> NetworkPolicyBuilder {
        self.policy.scan = scan;
        self
    }

    /// Sets the rate limits per destination; see [`limits`](crate::limits).
    pub fn rate_limits(mut self, limits: crate::limits::RateLimits) -> NetworkPolicyBuilder {
        self.policy.rate_limits = limits;
        self
    }

    /// Allows one Unix socket, by absolute (already canonical) path.
    pub fn allow_unix_socket(
        mut self,
        path: impl Into<PathBuf>,
    ) -> Result<NetworkPolicyBuilder, PolicyError> {
        let path = path.into();
        if !path.is_absolute() {
            return Err(PolicyError::RelativeSocket(path.display().to_string()));
        }
        self.policy.unix_sockets.insert(path);
        Ok(self)
    }

    /// Removes an allowlist pattern (as written or in any spelling that
    /// parses to it: `Example.COM` removes `example.com`); every other
    /// setting stays. `NotListed` when it is not there.
    pub fn remove_allowed(mut self, pattern: &str) -> Result<NetworkPolicyBuilder, PolicyError> {
        let parsed = parse_in(List::Allowed, pattern)?;
        self.policy.allowed =
            without(&self.policy.allowed, &parsed).ok_or_else(|| PolicyError::NotListed {
                list: List::Allowed.key(),
                what: pattern.to_owned(),
            })?;
        Ok(self)
    }

    /// Removes a denylist pattern; `NotListed` when it is not there.
    pub fn remove_denied(mut self, pattern: &str) -> Result<NetworkPolicyBuilder, PolicyError> {
        let parsed = parse_in(List::Denied, pattern)?;
        self.policy.denied =
            without(&self.policy.denied, &parsed).ok_or_else(|| PolicyError::NotListed {
                list: List::Denied.key(),
                what: pattern.to_owned(),
            })?;
        Ok(self)
    }

    /// Adds a request-rules block, or replaces the block of the same
    /// [`name`](crate::request_rules::RuleBlock::name) where there is one
    /// (in its place: order decides nothing, but refusals list blocks in
    /// it). The other blocks and settings stay.
    pub fn rules_block(mut self, block: crate::request_rules::RuleBlock) -> NetworkPolicyBuilder {
        let mut blocks = self.policy.request_rules.blocks().to_vec();
        match blocks.iter_mut().find(|b| b.name() == block.name()) {
            Some(same) => *same = block,
            None => blocks.push(block),
        }
        self.policy.request_rules = crate::request_rules::RequestRules::new(blocks);
        self
    }

    /// Removes the request-rules block named `name`; `NotListed` when
    /// there is none.
    pub fn remove_rules_block(mut self, name: &str) -> Result<NetworkPolicyBuilder, PolicyError> {
        let blocks = self.policy.request_rules.blocks();
        if !blocks.iter().any(|b| b.name() == name) {
            return Err(PolicyError::NotListed {
                list: "[[rules]]",
                what: name.to_owned(),
            });
        }
        let kept = blocks
            .iter()
            .filter(|b| b.name() != name)
            .cloned()
            .collect();
        self.policy.request_rules = crate::request_rules::RequestRules::new(kept);
        Ok(self)
    }

    /// Removes one allowed Unix socket; `NotListed` when it is not there.
    pub fn remove_unix_socket(
        mut self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<NetworkPolicyBuilder, PolicyError> {
        let path = path.as_ref();
        if !self.policy.unix_sockets.remove(path) {
            return Err(PolicyError::NotListed {
                list: "allow_unix_sockets",
                what: path.display().to_string(),
            });
        }
        Ok(self)
    }

    /// Allows every Unix socket.
    pub fn dangerously_allow_all_unix_sockets(mut self, allow: bool) -> NetworkPolicyBuilder {
        self.policy.allow_all_unix_sockets = allow;
        self
    }

    /// The policy.
    pub fn build(self) -> NetworkPolicy {
        self.policy
    }
}

/// `set` without `pattern` (rebuilt: removal is rare); `None` when it is
/// not there.
fn without(set: &PatternSet, pattern: &Pattern) -> Option<PatternSet> {
    // What it matches, not how it was written.
    let same = |other: &&Pattern| other.host == pattern.host && other.port == pattern.port;
    if !set.patterns().iter().any(|other| same(&other)) {
        return None;
    }
    let mut kept = PatternSet::new();
    for other in set.patterns().iter().filter(|other| !same(other)) {
        kept.insert(other.clone());
    }
    Some(kept)
}

fn parse_in(list: List, pattern: &str) -> Result<Pattern, PolicyError> {
    Pattern::parse(pattern).map_err(|error| PolicyError::Pattern {
        list,
        pattern: pattern.to_owned(),
        error,
    })
}

/// The live policy: cheap to clone, swapped atomically, read per request.
///
/// Every [`store`](PolicyHandle::store) bumps a [`generation`](PolicyHandle::generation)
/// number, so whoever caches a decision (the SOCKS5 UDP relay does, per
/// destination) can tell that it may be stale.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    current: ArcSwap<NetworkPolicy>,
    generation: AtomicU64,
    /// Whether the policy scans anything ([`PolicyHandle::scans`]).
    scanning: AtomicBool,
    /// Whether the policy has rate limits ([`PolicyHandle::limits_rates`]).
    limiting: AtomicBool,
    /// Serialises [`PolicyHandle::update`]s, so none is lost to another.
    writing: std::sync::Mutex<()>,
}

impl PolicyHandle {
    /// A handle holding `policy`.
    pub fn new(policy: NetworkPolicy) -> PolicyHandle {
        PolicyHandle {
            shared: Arc::new(Shared {
                scanning: AtomicBool::new(policy.scan.is_on()),
                limiting: AtomicBool::new(!policy.rate_limits.is_empty()),
                current: ArcSwap::from_pointee(policy),
                generation: AtomicU64::new(0),
                writing: std::sync::Mutex::new(()),
            }),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<NetworkPolicy> {
        self.shared.current.load_full()
    }

    /// Replaces the policy; the next request sees the new one.
    pub fn store(&self, policy: NetworkPolicy) {
        let _writing = self
            .shared
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.replace(policy);
    }

    fn replace(&self, policy: NetworkPolicy) {
        // Raised before a policy that scans is seen, lowered only after
        // one that does not is: `scans` is never false for a policy that
        // scans.
        let scans = policy.scan.is_on();
        let limits = !policy.rate_limits.is_empty();
        for (flag, on) in [
            (&self.shared.scanning, scans),
            (&self.shared.limiting, limits),
        ] {
            if on {
                flag.store(true, Ordering::SeqCst);
            }
        }
        self.shared.current.store(Arc::new(policy));
        for (flag, on) in [
            (&self.shared.scanning, scans),
            (&self.shared.limiting, limits),
        ] {
            if !on {
                flag.store(false, Ordering::SeqCst);
            }
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the current policy scans anything
    /// ([`ScanPolicy::is_on`](crate::scan::ScanPolicy::is_on)), without
    /// loading it: one atomic read, for a layer that has nothing to do
    /// otherwise. While a policy is being stored it may say `true` for one
    /// that no longer scans (load it to be sure), never `false` for one
    /// that does.
    pub fn scans(&self) -> bool {
        self.shared.scanning.load(Ordering::SeqCst)
    }

    /// Whether the current policy has rate limits
    /// ([`NetworkPolicy::rate_limits`]), without loading it: as
    /// [`scans`](PolicyHandle::scans), never `false` for one that has.
    pub fn limits_rates(&self) -> bool {
        self.shared.limiting.load(Ordering::SeqCst)
    }

    /// Changes the live policy from what it is now: `change` gets a builder
    /// of the current policy and returns the new one. Updates from several
    /// threads apply one after the other (none is lost); an error leaves
    /// the policy as it was.
    ///
    /// ```
    /// use portcullis_middleware::{NetworkPolicy, PolicyHandle, Target};
    /// use portcullis_middleware::policy::Decision;
    ///
    /// # fn main() -> Result<(), portcullis_middleware::policy::PolicyError> {
    /// let handle = PolicyHandle::new(NetworkPolicy::builder().allow("a.example.com")?.build());
    /// handle.update(|policy| policy.allow("b.example.com"))?;
    /// let b = Target::parse_authority("b.example.com:443", None).unwrap();
    /// assert!(matches!(handle.load().decide(&b), Decision::Allow { .. }));
    /// # Ok(())
    /// # }
    /// ```
    pub fn update<E>(
        &self,
        change: impl FnOnce(NetworkPolicyBuilder) -> Result<NetworkPolicyBuilder, E>,
    ) -> Result<(), E> {
        let _writing = self
            .shared
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = change(self.load().to_builder())?;
        self.replace(changed.build());
        Ok(())
    }

    /// How many times the policy was replaced. Read it *before* deciding:
    /// a decision cached under generation `g` is stale once this differs
    /// from `g`.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// A read-only view of [`generation`](PolicyHandle::generation), for
    /// code that caches decisions but must not read or change the policy
    /// itself (a transport: the SOCKS5 UDP relay).
    pub fn generation_counter(&self) -> PolicyGeneration {
        PolicyGeneration {
            shared: self.shared.clone(),
        }
    }
}

/// How many times a [`PolicyHandle`]'s policy was replaced, and nothing
/// else about it: see [`PolicyHandle::generation_counter`].
#[derive(Debug, Clone)]
pub struct PolicyGeneration {
    shared: Arc<Shared>,
}

impl PolicyGeneration {
    /// The generation now; read it *before* deciding.
    pub fn get(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }
}

impl Default for PolicyHandle {
    fn default() -> PolicyHandle {
        PolicyHandle::new(NetworkPolicy::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy with every setting away from its default.
    fn everything() -> NetworkPolicy {
        use crate::request_rules::{RequestRules, RuleBlock, RuleEntry};
        let block = RuleBlock::new("api.example.com", "api")
            .unwrap_or_else(|e| panic!("{e}"))
            .allow(
                RuleEntry::new()
                    .methods(["GET"])
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        NetworkPolicy::builder()
            .allow_all([
                "a.example.com",
                "*.b.example.com",
                "10.0.0.0/8",
                "api.example.com",
            ])
            .and_then(|b| b.deny("evil.example.com"))
            .and_then(|b| b.allow_unix_socket("/run/x.sock"))
            .unwrap_or_else(|e| panic!("{e}"))
            .allow_local_binding(true)
            .limited_allow_git_fetch(false)
            .mode(Mode::Limited)
            .dangerously_allow_all_unix_sockets(true)
            .request_rules(RequestRules::new(vec![block]))
            .scan(crate::scan::ScanPolicy {
                scanner: crate::scan::Scanner::builtin(),
                action: crate::scan::ScanAction::Audit,
                skip_hosts: crate::pattern::PatternSet::new(),
                max_body: 4096,
                detectors: vec![("jwt".to_owned(), crate::scan::ScanAction::Off)],
                hosts: {
                    let mut hosts = crate::pattern::PatternSet::new();
                    hosts.insert(
                        crate::pattern::Pattern::parse("**.internal.example")
                            .unwrap_or_else(|e| panic!("{e}")),
                    );
                    hosts
                },
                host_actions: vec![crate::scan::ScanAction::Deny],
            })
            .rate_limits(
                crate::limits::RateLimits::new()
                    .limit(
                        "**.example.com",
                        crate::limits::Rate::new(5.0, 10).unwrap_or_else(|e| panic!("{e}")),
                    )
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .build()
    }

    /// Every field, named: a field added to `NetworkPolicy` breaks this
    /// until it is compared here too.
    fn assert_same(a: &NetworkPolicy, b: &NetworkPolicy) {
        let NetworkPolicy {
            allowed,
            denied,
            allow_local_binding,
            mode,
            unix_sockets,
            allow_all_unix_sockets,
            refuse_git_fetch,
            request_rules,
            scan,
            rate_limits,
        } = a;
        assert_eq!(allowed.patterns(), b.allowed.patterns());
        assert_eq!(denied.patterns(), b.denied.patterns());
        assert_eq!(*allow_local_binding, b.allow_local_binding);
        assert_eq!(*mode, b.mode);
        assert_eq!(*unix_sockets, b.unix_sockets);
        assert_eq!(*allow_all_unix_sockets, b.allow_all_unix_sockets);
        assert_eq!(*refuse_git_fetch, b.refuse_git_fetch);
        assert_eq!(*request_rules, b.request_rules);
        assert_eq!(*scan, b.scan);
        assert_eq!(*rate_limits, b.rate_limits);
    }

    #[test]
    fn to_builder_then_build_is_the_identity_on_every_field() {
        let policy = everything();
        assert_same(&policy, &policy.to_builder().build());
        assert_same(
            &NetworkPolicy::default(),
            &NetworkPolicy::default().to_builder().build(),
        );
    }

    #[test]
    fn entries_are_removed_and_every_other_setting_stays() {
        let handle = PolicyHandle::new(everything());
        handle
            .update(|policy| {
                policy
                    .remove_allowed("A.Example.COM")?
                    .remove_denied("evil.example.com")?
                    .remove_rules_block("api")?
                    .remove_unix_socket("/run/x.sock")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let now = handle.load();
        assert_eq!(now.mode(), Mode::Limited);
        assert!(now.allow_local_binding());
        assert!(!now.limited_allows_git_fetch());
        assert!(now.allow_all_unix_sockets);
        assert!(now.request_rules().is_empty());
        assert!(now.denied().is_empty());
        let allowed: Vec<String> = now
            .allowed()
            .patterns()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            allowed,
            ["*.b.example.com", "10.0.0.0/8", "api.example.com"]
        );
        assert!(matches!(
            now.decide(&target("a.example.com:443")),
            Decision::Miss
        ));
        assert!(matches!(
            now.decide(&target("x.b.example.com:443")),
            Decision::Allow { .. }
        ));
        // What is not there cannot be removed, and the policy stays.
        let before = handle.generation();
        let error = handle
            .update(|policy| policy.remove_allowed("nowhere.example.com"))
            .err();
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("nowhere.example.com is not in allowed_domains, so it cannot be removed")
        );
        assert_eq!(handle.generation(), before);
        assert!(handle
            .update(|policy| policy.remove_rules_block("api"))
            .is_err());
    }

    #[test]
    fn a_rules_block_is_added_or_replaced_by_name() {
        use crate::request_rules::{RuleBlock, RuleEntry};
        let handle = PolicyHandle::new(everything());
        let writes = RuleBlock::new("api.example.com", "api")
            .unwrap_or_else(|e| panic!("{e}"))
            .allow(
                RuleEntry::new()
                    .methods(["POST"])
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        let other = RuleBlock::new("other.example.com", "other").unwrap_or_else(|e| panic!("{e}"));
        handle
            .update(|policy| Ok::<_, PolicyError>(policy.rules_block(writes).rules_block(other)))
            .unwrap_or_else(|e| panic!("{e}"));
        let now = handle.load();
        let names: Vec<&str> = now
            .request_rules()
            .blocks()
            .iter()
            .map(|b| b.name())
            .collect();
        assert_eq!(names, ["api", "other"]);
        let post =
            now.request_rules()
                .decide(&target("api.example.com:443"), &http::Method::POST, "/");
        assert!(
            matches!(post, crate::request_rules::RuleVerdict::Allowed { .. }),
            "{post:?}"
        );
        assert_eq!(now.mode(), Mode::Limited);
    }

    fn target(authority: &str) -> Target {
        Target::parse_authority(authority, None).unwrap()
    }

    #[test]
    fn updates_from_many_threads_are_all_kept_and_a_failed_one_changes_nothing() {
        let handle = PolicyHandle::default();
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let handle = handle.clone();
                std::thread::spawn(move || {
                    for m in 0..20 {
                        handle
                            .update(|policy| policy.allow(&format!("h{n}-{m}.test")))
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for n in 0..8 {
            for m in 0..20 {
                let decision = handle.load().decide(&target(&format!("h{n}-{m}.test:443")));
                assert!(matches!(decision, Decision::Allow { .. }), "h{n}-{m}");
            }
        }
        assert_eq!(handle.generation(), 160);
        let error = handle.update(|policy| policy.deny("*")).unwrap_err();
        assert_eq!(error, PolicyError::WildcardDeny);
        assert_eq!(handle.generation(), 160, "a failed update stores nothing");
    }

    fn policy(allow: &[&str], deny: &[&str]) -> NetworkPolicyBuilder {
        let mut builder = NetworkPolicy::builder();
        for a in allow {
            builder = builder.allow(a).unwrap();
        }
        for d in deny {
            builder = builder.deny(d).unwrap();
        }
        builder
    }

    fn reason(decision: Decision) -> Option<Reason> {
        match decision {
            Decision::Deny { reason, .. } => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn decision_order() {
        let p = policy(
            &["*", "127.0.0.1:3000", "10.0.0.0/8", "localhost"],
            &["evil.com", "*.evil.org", "8.8.8.8"],
        )
        .build();
        assert_eq!(
            reason(p.decide(&target("evil.com:443"))),
            Some(Reason::Denied)
        );
        assert_eq!(
            reason(p.decide(&target("a.evil.org:443"))),
            Some(Reason::Denied)
        );
        assert_eq!(
            p.decide(&target("evil.org:443")),
            Decision::Allow {
                rule: "allowed_domains: *".into()
            }
        );
        assert_eq!(
            reason(p.decide(&target("8.8.8.8:53"))),
            Some(Reason::Denied)
        );
        assert!(matches!(
            p.decide(&target("1.1.1.1:53")),
            Decision::Allow { .. }
        ));
        // A wildcard never unlocks a local address; an exact IP, IP:port or CIDR does.
        assert_eq!(
            reason(p.decide(&target("127.0.0.1:80"))),
            Some(Reason::NotAllowedLocal)
        );
        assert_eq!(
            reason(p.decide(&target("169.254.169.254:80"))),
            Some(Reason::NotAllowedLocal)
        );
        assert_eq!(
            reason(p.decide(&target("0x7f.1:80"))),
            Some(Reason::NotAllowedLocal)
        );
        assert!(matches!(
            p.decide(&target("127.0.0.1:3000")),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            p.decide(&target("10.1.2.3:22")),
            Decision::Allow { .. }
        ));
        assert_eq!(
            reason(p.decide(&target("[::ffff:192.168.0.1]:80"))),
            Some(Reason::NotAllowedLocal)
        );
        assert!(matches!(
            p.decide(&target("localhost:80")),
            Decision::Allow { .. }
        ));
        assert_eq!(
            reason(p.decide(&target("foo.localhost:80"))),
            Some(Reason::NotAllowedLocal)
        );
    }

    #[test]
    fn misses_and_local_binding() {
        let p = policy(&["example.com"], &[]).build();
        assert_eq!(p.decide(&target("other.com:80")), Decision::Miss);
        assert_eq!(
            reason(p.decide(&target("127.0.0.1:80"))),
            Some(Reason::NotAllowedLocal)
        );
        let p = policy(&["example.com"], &[])
            .allow_local_binding(true)
            .build();
        assert_eq!(p.decide(&target("127.0.0.1:80")), Decision::Miss);
        let p = policy(&["*"], &[]).allow_local_binding(true).build();
        assert!(matches!(
            p.decide(&target("127.0.0.1:80")),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn resolved_addresses() {
        let p = policy(
            &["example.com", "localhost", "10.1.0.0/16"],
            &["9.9.9.0/24"],
        )
        .build();
        let name = Host::Name("example.com".into());
        assert!(p
            .check_resolved(&name, "93.184.216.34".parse().unwrap(), 443)
            .is_ok());
        assert!(matches!(
            p.check_resolved(&name, "9.9.9.9".parse().unwrap(), 443),
            Err(Decision::Deny {
                reason: Reason::Denied,
                ..
            })
        ));
        assert!(matches!(
            p.check_resolved(&name, "127.0.0.1".parse().unwrap(), 443),
            Err(Decision::Deny {
                reason: Reason::NotAllowedLocal,
                ..
            })
        ));
        assert!(p
            .check_resolved(&name, "10.1.2.3".parse().unwrap(), 443)
            .is_ok());
        let localhost = Host::Name("localhost".into());
        assert!(p
            .check_resolved(&localhost, "127.0.0.1".parse().unwrap(), 80)
            .is_ok());
        assert!(p
            .check_resolved(&localhost, "192.168.0.1".parse().unwrap(), 80)
            .is_err());
    }

    #[test]
    fn wildcard_deny_refused_and_errors_name_the_key() {
        assert_eq!(
            NetworkPolicy::builder().deny("*").unwrap_err(),
            PolicyError::WildcardDeny
        );
        let error = NetworkPolicy::builder().allow("a.*.com").unwrap_err();
        assert!(error.to_string().contains("allowed_domains"), "{error}");
    }

    #[test]
    fn unix_sockets() {
        let p = NetworkPolicy::builder()
            .allow_unix_socket("/tmp/a.sock")
            .unwrap()
            .build();
        assert!(matches!(
            p.decide(&Target::Unix("/tmp/a.sock".into())),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            p.decide(&Target::Unix("/tmp/b.sock".into())),
            Decision::Deny { .. }
        ));
        assert!(NetworkPolicy::builder()
            .allow_unix_socket("rel.sock")
            .is_err());
        let p = NetworkPolicy::builder()
            .dangerously_allow_all_unix_sockets(true)
            .build();
        assert!(matches!(
            p.decide(&Target::Unix("/x".into())),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn handle_swaps_live() {
        let handle = PolicyHandle::new(policy(&[], &[]).build());
        assert_eq!(
            handle.load().decide(&target("example.com:80")),
            Decision::Miss
        );
        let before = handle.generation();
        handle.clone().store(policy(&["example.com"], &[]).build());
        assert_eq!(
            handle.generation(),
            before + 1,
            "clones share the generation"
        );
        assert!(matches!(
            handle.load().decide(&target("example.com:80")),
            Decision::Allow { .. }
        ));
    }
}
