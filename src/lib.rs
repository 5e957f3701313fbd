//! portcullis: a local network-policy proxy built as a tower middleware
//! stack.
//!
//! This crate holds the transports (HTTP/1 absolute-form and CONNECT,
//! SOCKS5 TCP and UDP, `x-unix-socket` forwarding), the [`connector`] that
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

pub mod body;
pub mod cli;
pub mod config;
pub mod connector;
pub mod env;
mod http1;
pub mod proxy;
pub mod rescue;
pub mod resolve;
mod socks5;
mod splice;
pub mod upstream;

pub use portcullis_middleware as middleware;
pub use proxy::{Proxy, ProxyBuilder, ProxyHandle, ProxyLayer, ProxyService, StartError};
