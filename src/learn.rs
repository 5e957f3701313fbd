//! `run --learn FILE`: the command runs with every public destination
//! allowed (local, private and metadata addresses are still refused, and
//! the denylist still applies), and FILE gets the `[network]` allowlist the
//! command needed: each host with its port, grouped by domain, with how
//! many requests or connections reached it. `run --config FILE` then runs
//! the same command with that allowlist.
//!
//! [`LearnLayer`] sits just outside the connector (an inner layer): it sees
//! only what the policy let through, and keeps a destination once the
//! connector reached it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use portcullis_middleware::Target;

/// Destinations kept; more are counted, not listed.
const MAX_LEARNED: usize = 10_000;

/// What a learning run reached: `host:port` → requests or connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct Learned(Arc<Mutex<Reached>>);

#[derive(Debug, Default)]
struct Reached {
    destinations: BTreeMap<(Vec<String>, u16), u64>,
    dropped: u64,
}

impl Learned {
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
        if reached.dropped > 0 {
            text.push_str(&format!(
                "# {} more destinations were reached and not listed (the list keeps {MAX_LEARNED}).\n",
                reached.dropped
            ));
        }
        text.push_str("[network]\nallowed_domains = [\n");
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
        text.push_str("]\n");
        text
    }

    /// Writes the learn file (whole, or not at all).
    pub(crate) fn write(&self, path: &Path, command: &str) -> std::io::Result<()> {
        crate::transport::mitm::write_atomically(path, self.toml(command).as_bytes(), 0o644)
            .map_err(|error| std::io::Error::other(error.to_string()))
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

impl<S, B> Service<Request<B>> for Learn<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
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
            if let (Ok(_), Some(target)) = (&result, target) {
                learned.note(&target);
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
