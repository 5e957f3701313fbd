//! portcullis: a local network-policy proxy built as a tower middleware
//! stack.
//!
//! This crate holds the transports (HTTP/1 absolute-form and CONNECT,
//! SOCKS5 TCP and UDP, `x-unix-socket` forwarding), the connector that
//! dials only vetted addresses, the [`config`], the runner ([`Proxy`]) and
//! the binary's [`cli`]. The decision layers, the request model and the
//! policy live in [`portcullis_middleware`], re-exported as [`middleware`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use portcullis::Proxy;
//! use portcullis::middleware::{NetworkPolicy, PolicyHandle};
//! use tower::limit::ConcurrencyLimitLayer;
//!
//! let policy = PolicyHandle::new(NetworkPolicy::builder().allow("**.crates.io")?.build());
//! let proxy = Proxy::builder()
//!     .policy(policy)
//!     .inner_layer(ConcurrencyLimitLayer::new(256))
//!     .start()
//!     .await?;
//! for (name, value) in proxy.child_env() {
//!     println!("export {name}={value}");
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | module | holds |
//! | --- | --- |
//! | `transport/` | the ways in: `http1/` and `socks5/` (each with its own `rescue`, the one place errors become that wire's answers), `mitm/` (HTTPS interception in limited mode, its CA), `unix` (`x-unix-socket`), the shared accept loop, drain and request-model insertion |
//! | `connector/` | the innermost service: resolve once, vet, dial; the pooled upstream client, [`upstream`] chaining, Unix-socket forwarding, the [`resolve`] trait |
//! | [`runner`] | [`Proxy::builder`]: composes the stack once and starts the transports |
//! | [`approvers`] | the terminal prompt, the reviewer program, the persisted rules file |
//! | [`config`], [`cli`], [`env`](mod@env) | the binary: TOML and flags, `serve` / `run` / `check`, the child's proxy variables |
//!
//! HTTPS interception lives in `transport/mitm/` (its CA is public as
//! [`mitm`]); the bundled approvers and the rules file in [`approvers`].

pub mod access_log;
pub mod approvers;
pub mod body;
#[cfg(unix)]
mod capture;
mod child;
pub mod cli;
pub mod config;
mod connector;
pub mod env;
pub mod hints;
#[cfg(unix)]
mod isolate;
pub mod kit;
mod learn;
mod logfmt;
mod memory;
mod metrics;
pub mod records;
pub mod runner;
pub mod secrets;
mod summary;
mod sys;
pub mod telemetry;
mod transport;
mod units;

/// Entry points for `fuzz/` only (built with `--cfg fuzzing`).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    /// Reads a SOCKS5 request as the listener does, then checks fast-socks5
    /// reads the same bytes whole; `Err` says how the two disagreed.
    pub async fn socks5_request(data: &[u8]) -> Result<(), &'static str> {
        crate::transport::socks5::fuzz_request(data).await
    }
}

pub use connector::{resolve, upstream, Connector};

/// HTTPS interception for limited mode: the local CA.
pub mod mitm {
    pub use crate::transport::mitm::{
        CaError, CertificateAuthority, BUNDLE_FILE, CA_CERT_FILE, CA_KEY_FILE,
        DEFAULT_LEAF_CACHE_SIZE,
    };
}
pub use portcullis_middleware as middleware;
pub use runner::{BoxApprover, Profile, Proxy, ProxyBuilder, ProxyHandle, StackLayers, StartError};
pub use transport::{Limits, ProxyService};
