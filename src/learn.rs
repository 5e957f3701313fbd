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
//!
//! With interception (`run --learn FILE --mitm`), the learning run
//! intercepts every HTTPS `CONNECT` (the child trusts the CA, as under
//! `--mitm`), and FILE also gets a `[[rules]]` block per host that was
//! reached over HTTP: for each method, the path prefixes it was used on —
//! the first two segments of the normalised path, then `/**` when the path
//! went deeper; past 16 prefixes for one method, the first segment only,
//! and past 16 of those, `/**`. The rules narrow the next run to what this
//! one did; widen them by hand where the command will need more.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use std::collections::BTreeSet;

use portcullis_middleware::request_rules::{normalise_path, PathGlob};
use portcullis_middleware::{Host, Intercept, Interceptable, Protocol, Target};

/// Destinations kept; more are counted, not listed.
const MAX_LEARNED: usize = 10_000;

/// Path prefixes kept per host and method before they are shortened.
const MAX_PREFIXES: usize = 16;

/// Segments a learned path prefix keeps.
const PREFIX_DEPTH: usize = 2;

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
    /// Under interception: host → method → (requests, path prefixes).
    requests: Option<Requests>,
}

/// Host → method → (requests, path prefixes).
type Requests = BTreeMap<String, BTreeMap<String, (u64, BTreeSet<String>)>>;

impl Learned {
    /// A learning run; `allow_local_binding` as it was given.
    pub(crate) fn new(allow_local_binding: bool) -> Learned {
        let learned = Learned::default();
        learned.reached().allow_local_binding = allow_local_binding;
        learned
    }

    /// Also learns request rules: every `CONNECT` that can be intercepted
    /// is, and each request's method and path prefix is kept per host.
    pub(crate) fn with_requests(self) -> Learned {
        self.reached().requests = Some(BTreeMap::new());
        self
    }

    pub(crate) fn learns_requests(&self) -> bool {
        self.reached().requests.is_some()
    }

    /// Under interception, how many hosts got request rules.
    pub(crate) fn ruled_hosts(&self) -> Option<usize> {
        self.reached().requests.as_ref().map(BTreeMap::len)
    }

    fn note_request(&self, target: &Target, method: &http::Method, path: &str) {
        let Target::Host { .. } = target else {
            return;
        };
        let prefix = path_prefix(path, PREFIX_DEPTH);
        let mut reached = self.reached();
        let Some(requests) = reached.requests.as_mut() else {
            return;
        };
        let host = target.host_string();
        if !requests.contains_key(&host) && requests.len() >= MAX_LEARNED {
            return;
        }
        let methods = requests.entry(host).or_default();
        let (count, prefixes) = methods.entry(method.as_str().to_owned()).or_default();
        *count += 1;
        // Already covered by a prefix shortened before: nothing to add.
        if !prefixes.contains("/**") && !prefixes.contains(&shorten(&prefix)) {
            prefixes.insert(prefix);
        }
        if prefixes.len() > MAX_PREFIXES {
            let shorter: BTreeSet<String> = prefixes.iter().map(|prefix| shorten(prefix)).collect();
            *prefixes = if shorter.len() > MAX_PREFIXES {
                BTreeSet::from(["/**".to_owned()])
            } else {
                shorter
            };
        }
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

    /// The local addresses listed as well (refused while learning; each
    /// entry written allows it next time).
    pub(crate) fn local_len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .local
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
        if let Some(requests) = &reached.requests {
            for (host, methods) in requests {
                text.push_str(&format!(
                    "\n[[rules]]\nhost = {}\nallow = [\n",
                    toml_string(host)
                ));
                for (method, (count, prefixes)) in methods {
                    let paths: Vec<String> = prefixes.iter().map(|p| toml_string(p)).collect();
                    text.push_str(&format!(
                        "  {{ methods = [{}], paths = [{}] }},  # {count}\n",
                        toml_string(method),
                        paths.join(", ")
                    ));
                }
                text.push_str("]\n");
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

/// A string as TOML writes it (quoted and escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The glob a learned path becomes: its first `depth` normalised segments,
/// then `/**` when it went deeper (or a segment cannot be written in a
/// glob); `/` for the root.
fn path_prefix(path: &str, depth: usize) -> String {
    let Ok(segments) = normalise_path(path) else {
        return "/**".to_owned();
    };
    let mut prefix = String::new();
    for (index, segment) in segments.iter().enumerate() {
        let longer = format!("{prefix}/{segment}");
        if index >= depth || PathGlob::parse(&longer).is_err() {
            return format!("{prefix}/**");
        }
        prefix = longer;
    }
    if prefix.is_empty() {
        "/".to_owned()
    } else {
        prefix
    }
}

/// A learned prefix one segment shorter: `/a/b/**` and `/a/b` become
/// `/a/**`; `/a`, `/a/**` and `/` become `/**`.
fn shorten(prefix: &str) -> String {
    let first = prefix
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    let deeper = prefix.trim_start_matches('/').contains('/');
    if first.is_empty() || first == "**" || !deeper {
        "/**".to_owned()
    } else {
        format!("/{first}/**")
    }
}

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

impl<S, B, R: Send + 'static> Service<Request<B>> for Learn<S>
where
    S: Service<Request<B>, Response = http::Response<R>>,
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
        // A DNS question is not a destination: the connection after it is.
        let lookup = request
            .extensions()
            .get::<Protocol>()
            .is_some_and(|protocol| protocol.is_lookup());
        let target = request
            .extensions()
            .get::<Target>()
            .cloned()
            .filter(|_| !lookup);
        let learned = self.learned.clone();
        // Learning requests: ask for every CONNECT the transport offers
        // to intercept, and keep each request seen as HTTP.
        let requests = learned.learns_requests();
        let intercept = requests
            && request.method() == http::Method::CONNECT
            && request.extensions().get::<Interceptable>().is_some();
        let seen = (requests
            && request.method() != http::Method::CONNECT
            && request
                .extensions()
                .get::<Protocol>()
                .is_some_and(|protocol| protocol.methods_visible()))
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut result = future.await;
            if let (Ok(response), true) = (&mut result, intercept) {
                response.extensions_mut().insert(Intercept);
            }
            if let (Ok(_), Some(target), Some((method, path))) = (&result, &target, seen) {
                learned.note_request(target, &method, &path);
            }
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
        assert!(
            parsed.get("rules").is_none(),
            "no rules without interception"
        );
    }

    #[test]
    fn learned_paths_become_prefixes_that_shorten_past_the_limit() {
        assert_eq!(path_prefix("/", 2), "/");
        assert_eq!(path_prefix("/simple", 2), "/simple");
        assert_eq!(path_prefix("/a/b", 2), "/a/b");
        assert_eq!(path_prefix("/a/b/c", 2), "/a/b/**");
        assert_eq!(path_prefix("/a/../b//c/./d", 2), "/b/c/**", "normalised");
        assert_eq!(
            path_prefix("/a%2Ab/c", 2),
            "/**",
            "a * cannot be written in a glob"
        );
        assert_eq!(path_prefix("/a/%2F", 2), "/**", "an encoded /");
        let learned = Learned::default().with_requests();
        let host = Target::parse_authority("api.test:443", None).unwrap();
        let get = http::Method::GET;
        for index in 0..MAX_PREFIXES {
            learned.note_request(&host, &get, &format!("/repos/r{index}/x"));
        }
        learned.note_request(&host, &http::Method::POST, "/issues/1/comments");
        let rules = |learned: &Learned| -> toml::Value {
            let text = learned.toml("t");
            toml::from_str::<toml::Value>(&text).unwrap()["rules"].clone()
        };
        let entries = rules(&learned)[0]["allow"].as_array().unwrap().clone();
        assert_eq!(entries[0]["paths"].as_array().unwrap().len(), MAX_PREFIXES);
        assert_eq!(entries[1]["paths"][0].as_str(), Some("/issues/1/**"));
        learned.note_request(&host, &get, "/repos/one-more/x");
        let entries = rules(&learned)[0]["allow"].as_array().unwrap().clone();
        assert_eq!(entries[0]["paths"].as_array().unwrap().len(), 1);
        assert_eq!(entries[0]["paths"][0].as_str(), Some("/repos/**"));
        for index in 0..=MAX_PREFIXES {
            learned.note_request(&host, &get, &format!("/top{index}/x/y"));
        }
        let entries = rules(&learned)[0]["allow"].as_array().unwrap().clone();
        assert_eq!(entries[0]["paths"][0].as_str(), Some("/**"));
        assert_eq!(entries[0]["methods"][0].as_str(), Some("GET"));
    }
}
