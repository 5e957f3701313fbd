//! Name resolution for the connector: a trait so tests and configs can
//! answer without DNS, the system resolver as default, static answers first.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

/// How long a name lookup may take unless told otherwise (`[dns] timeout`,
/// `ProxyBuilder::resolve_timeout`).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The future of a lookup.
pub type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// Resolves a host name to addresses. Every answer is classified by the
/// connector afterwards; a resolver does not decide anything.
pub trait Resolve: Send + Sync + 'static {
    /// Looks up `name` (canonical, lower-case, no trailing dot).
    fn resolve(&self, name: &str) -> ResolveFuture;
}

impl<F> Resolve for F
where
    F: Fn(&str) -> ResolveFuture + Send + Sync + 'static,
{
    fn resolve(&self, name: &str) -> ResolveFuture {
        self(name)
    }
}

/// The operating system's resolver (`getaddrinfo` on a blocking thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: &str) -> ResolveFuture {
        let name = name.to_owned();
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((name.as_str(), 0)).await?;
            Ok(addresses.map(|a| a.ip()).collect())
        })
    }
}

/// Static answers (like curl's `--resolve`) in front of another resolver.
#[derive(Clone)]
pub struct StaticResolver {
    hosts: Arc<HashMap<String, Vec<IpAddr>>>,
    fallback: Arc<dyn Resolve>,
}

impl fmt::Debug for StaticResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticResolver")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl StaticResolver {
    /// Answers `hosts` from the table and everything else from `fallback`.
    pub fn new(hosts: HashMap<String, Vec<IpAddr>>, fallback: Arc<dyn Resolve>) -> StaticResolver {
        StaticResolver {
            hosts: Arc::new(hosts),
            fallback,
        }
    }
}

impl Resolve for StaticResolver {
    fn resolve(&self, name: &str) -> ResolveFuture {
        match self.hosts.get(name) {
            Some(addresses) => {
                let addresses = addresses.clone();
                Box::pin(async move { Ok(addresses) })
            }
            None => self.fallback.resolve(name),
        }
    }
}
