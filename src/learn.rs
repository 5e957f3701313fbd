//! `run --learn FILE`: the command runs with every public destination
//! allowed (local, private and metadata addresses are still refused, and
//! the denylist still applies), and FILE gets the `[network]` allowlist the
//! command needed: each host with its port, grouped by domain, with how
//! many requests or connections reached it. `run --config FILE` then runs
//! the same command with that allowlist.
//!
//! [`LearnLayer`] sits just outside the connector (an inner layer): it sees
//! only what the policy let through, and keeps a destination once the
//! connector reached it, or notes a name that did not resolve. [`Learned`]
//! is also a violation sink: a local destination that was refused is
//! written as the exact `IP:PORT` entry the next run needs (a cloud
//! metadata address only as a comment: it is never unlocked for you), and
//! `allow_local_binding = true` is kept when the learning run had it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use portcullis_middleware::{Host, Target};

/// Destinations kept; more are counted, not listed.
const MAX_LEARNED: usize = 10_000;

/// What a learning run reached: `host:port` → requests or connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct Learned(Arc<Mutex<Reached>>);

#[derive(Debug, Default)]
struct Reached {
    destinations: BTreeMap<(Vec<String>, u16), u64>,
    dropped: u64,
    /// Refused local destinations: the entry that allows each, and why.
    local: BTreeMap<String, String>,
    /// Cloud metadata addresses the command tried: comments only.
    metadata: BTreeMap<String, u64>,
    /// Names that did not resolve: comments only.
    unresolved: BTreeMap<String, u64>,
    allow_local_binding: bool,
}

impl Learned {
    /// A learning run; `allow_local_binding` as it was given.
    pub(crate) fn new(allow_local_binding: bool) -> Learned {
        let learned = Learned::default();
        learned.reached().allow_local_binding = allow_local_binding;
        learned
    }

    fn reached(&self) -> std::sync::MutexGuard<'_, Reached> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note_unresolved(&self, target: &Target) {
        let mut reached = self.reached();
        if reached.unresolved.len() < MAX_LEARNED {
            *reached.unresolved.entry(target.to_string()).or_insert(0) += 1;
        }
    }

    fn note(&self, target: &Target) {
        let (Target::Host { .. }, Some(port)) = (target, target.port()) else {
            return;
        };
        let host = target.host_string();
        // Grouped by domain: the labels from the right, so a.example.com
        // sits beside b.example.com; addresses after every name.
        let key: Vec<String> = match host.parse::<std::net::IpAddr>() {
            Ok(_) => vec!["~".to_owned(), host],
            Err(_) => host.rsplit('.').map(str::to_owned).collect(),
        };
        let mut reached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = reached.destinations.len() >= MAX_LEARNED;
        match reached.destinations.get_mut(&(key.clone(), port)) {
            Some(count) => *count += 1,
            None if full => reached.dropped += 1,
            None => {
                reached.destinations.insert((key, port), 1);
            }
        }
    }

    /// How many destinations were listed.
    pub(crate) fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .destinations
            .len()
    }

    /// The TOML written to the learn file.
    pub(crate) fn toml(&self, command: &str) -> String {
        let reached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = format!(
            "# Written by `portcullis run --learn` for: {}\n# Every destination the command reached, with how many requests or\n# connections; pass this file back with `portcullis run --config FILE -- ...`.\n",
            command.replace('\n', " ")
        );
        if reached.allow_local_binding {
            text.push_str("# The command ran with --allow-local-binding.\n");
        }
        if reached.dropped > 0 {
            text.push_str(&format!(
                "# {} more destinations were reached and not listed (the list keeps {MAX_LEARNED}).\n",
                reached.dropped
            ));
        }
        text.push_str("[network]\n");
        if reached.allow_local_binding {
            text.push_str("allow_local_binding = true\n");
        }
        text.push_str("allowed_domains = [\n");
        let mut group: Option<String> = None;
        for ((labels, port), count) in &reached.destinations {
            let (host, domain) = if labels.first().map(String::as_str) == Some("~") {
                (
                    labels.get(1).cloned().unwrap_or_default(),
                    "addresses".to_owned(),
                )
            } else {
                let host: Vec<&str> = labels.iter().rev().map(String::as_str).collect();
                let domain: Vec<&str> = labels.iter().take(2).rev().map(String::as_str).collect();
                (host.join("."), domain.join("."))
            };
            if group.as_deref() != Some(domain.as_str()) {
                text.push_str(&format!("  # {domain}\n"));
                group = Some(domain);
            }
            let pattern = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let quoted = format!("{pattern:?},");
            text.push_str(&format!("  {quoted:<44} # {count}\n"));
        }
        if !reached.local.is_empty() {
            text.push_str(
                "  # local addresses (refused while learning: each exact entry allows it)\n",
            );
            for (entry, why) in &reached.local {
                let quoted = format!("{entry:?},");
                text.push_str(&format!("  {quoted:<44} # {}\n", why.replace('\n', " ")));
            }
        }
        text.push_str("]\n");
        if !reached.metadata.is_empty() {
            text.push_str("# Cloud metadata addresses the command tried (not allowed; add one only if you mean it):\n");
            for (entry, count) in &reached.metadata {
                text.push_str(&format!("#   {entry:?}  # {count}\n"));
            }
        }
        if !reached.unresolved.is_empty() {
            text.push_str(
                "# Names that did not resolve (the command could not have reached them):\n",
            );
            for (entry, count) in &reached.unresolved {
                text.push_str(&format!(
                    "#   {:?}  # {count}\n",
                    entry.escape_debug().to_string()
                ));
            }
        }
        text
    }

    /// Fails unless `path` can be written (its folder exists and takes a
    /// new file): checked before the command runs.
    pub(crate) fn check_writable(path: &Path) -> std::io::Result<()> {
        if path.is_dir() {
            return Err(std::io::Error::other("it is a directory"));
        }
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        tempfile::NamedTempFile::new_in(directory).map(drop)
    }

    /// Writes the learn file (whole, by rename, or not at all).
    pub(crate) fn write(&self, path: &Path, command: &str) -> std::io::Result<()> {
        use std::io::Write;
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut file = tempfile::NamedTempFile::new_in(directory)?;
        file.write_all(self.toml(command).as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(path).map(drop).map_err(|error| error.error)
    }
}

/// Refused local destinations become the exact entries the next run needs.
impl portcullis_middleware::ViolationSink for Learned {
    fn record(&self, violation: &portcullis_middleware::Violation) {
        let blocked = &violation.blocked;
        if blocked.reason != portcullis_middleware::Reason::NotAllowedLocal {
            return;
        }
        let Target::Host { host, port } = &blocked.target else {
            return;
        };
        let address = match (host, blocked.address) {
            (Host::Ip(ip), _) => Some(*ip),
            (Host::Name(_), resolved) => resolved,
        };
        let mut reached = self.reached();
        if reached.local.len() >= MAX_LEARNED {
            return;
        }
        match address {
            Some(ip) if portcullis_middleware::policy::is_metadata(ip) => {
                let entry = Target::host(Host::Ip(ip), *port).to_string();
                *reached.metadata.entry(entry).or_insert(0) += 1;
            }
            Some(ip) => {
                let entry = exact_entry(ip, *port);
                let why = match host {
                    Host::Name(name) => format!("{name} resolved to it"),
                    Host::Ip(_) => "refused as local".to_owned(),
                };
                let reasons = reached.local.entry(entry).or_default();
                if !reasons.split("; ").any(|known| known == why) {
                    if !reasons.is_empty() {
                        reasons.push_str("; ");
                    }
                    reasons.push_str(&why);
                }
                // The name itself must be allowed too.
                if let Host::Name(_) = host {
                    drop(reached);
                    self.note(&blocked.target);
                }
            }
            // `localhost`: the name is the entry.
            None => {
                reached
                    .local
                    .entry(blocked.target.to_string())
                    .or_insert_with(|| "this machine".to_owned());
            }
        }
    }
}

/// `IP:PORT` as an allowlist entry (IPv6 in brackets).
fn exact_entry(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
    }
}

impl Learned {}

/// Records what the connector reached; see the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct LearnLayer(pub(crate) Learned);

impl<S> Layer<S> for LearnLayer {
    type Service = Learn<S>;

    fn layer(&self, inner: S) -> Learn<S> {
        Learn {
            inner,
            learned: self.0.clone(),
        }
    }
}

/// The service [`LearnLayer`] makes.
#[derive(Debug, Clone)]
pub(crate) struct Learn<S> {
    inner: S,
    learned: Learned,
}

/// Whether the connector failed because the name does not resolve.
fn unresolved<E: AsRef<dyn std::error::Error + Send + Sync>>(error: &E) -> bool {
    matches!(
        portcullis_middleware::ProxyErrorRef::find(error.as_ref()),
        Some(portcullis_middleware::ProxyErrorRef::Upstream(upstream))
            if upstream.kind == portcullis_middleware::UpstreamErrorKind::Unresolved
    )
}

impl<S, B> Service<Request<B>> for Learn<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: AsRef<dyn std::error::Error + Send + Sync> + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let target = request.extensions().get::<Target>().cloned();
        let learned = self.learned.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            match (&result, target) {
                (Ok(_), Some(target)) => learned.note(&target),
                (Err(error), Some(target)) if unresolved(error) => learned.note_unresolved(&target),
                _ => {}
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_file_groups_hosts_by_domain_and_counts_them() {
        let learned = Learned::default();
        for authority in [
            "static.crates.io:443",
            "index.crates.io:443",
            "index.crates.io:443",
            "github.com:443",
            "[::1]:8080",
        ] {
            learned.note(&Target::parse_authority(authority, None).unwrap());
        }
        let toml = learned.toml("cargo build");
        assert!(
            toml.contains("# crates.io\n  \"index.crates.io:443\","),
            "{toml}"
        );
        assert!(toml.contains("\"static.crates.io:443\","), "{toml}");
        assert!(toml.contains("# 2\n"), "counted: {toml}");
        assert!(toml.contains("# addresses\n  \"[::1]:8080\","), "{toml}");
        let parsed: toml::Value = toml::from_str(&toml).unwrap();
        let allowed = parsed["network"]["allowed_domains"].as_array().unwrap();
        assert_eq!(allowed.len(), 4);
    }
}
