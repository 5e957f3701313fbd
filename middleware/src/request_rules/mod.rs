//! Request rules: per host, which methods and paths may go through.
//!
//! A [`RequestRules`] holds rule blocks, each for a host pattern (the
//! allowlist's syntax) with `allow` and `deny` entries. An entry matches a
//! request when its methods (if it names any) hold the request's method and
//! one of its paths (if it names any) matches the request's normalised
//! path. Every block whose host pattern matches applies:
//!
//! - a request matching a `deny` entry of any of them is refused,
//!   `rule_denied`;
//! - otherwise it goes on only if each of them has an `allow` entry that
//!   matches; else it is refused, `rule_not_matched`, naming the block.
//!
//! Rules narrow, never widen: the host must still pass the allowlist, and
//! limited mode still applies. A host without rules is untouched.
//!
//! **Methods** are the request's and every method it asks for another way:
//! a method-override header
//! ([`METHOD_OVERRIDE_HEADERS`](crate::inspect::METHOD_OVERRIDE_HEADERS))
//! or a `_method` query parameter. An `allow` entry must hold each of
//! them; a `deny` entry refuses any of them. A protocol upgrade
//! (`Upgrade: websocket`) is judged by its method and path like any
//! request, but only an `allow` entry that names paths lets it through:
//! what follows it is a stream no rule can see (limited mode refuses it).
//!
//! **Limited mode** is a preset of these rules ([`RequestRules::limited`]):
//! the [`LimitedModeLayer`](crate::LimitedModeLayer) decides by it with
//! this module's engine.
//!
//! **Query parameters and headers** (`query`, `headers`: a name and a
//! glob on its values, `*` any run of characters): an `allow` entry's
//! `query` is the parameters it lets through — each one the request sends
//! must be named (`"*"` names the rest) with every value matching — and
//! its `headers` are required, every value matching; a `deny` entry
//! refuses when any named parameter or header has a matching value,
//! ignoring ASCII case. Parameters are compared decoded (`%41` and `+`
//! undone), as the origin reads them.
//!
//! **JSON-RPC and MCP** (`jsonrpc`: [`JsonRpcMatcher`]): an entry that
//! names it matches only a request whose body is JSON-RPC — an object, or
//! a batch whose every call must be allowed and any of which a `deny`
//! entry refuses — by the call's method and, for MCP's `tools/call`, the
//! tool and its arguments. The body is read (bounded) before anything is
//! sent, as for `_method` ([`VerifyBodyMethod`]), whatever its
//! `Content-Type` says.
//!
//! **GraphQL** (`graphql`: [`GraphqlMatcher`]): an entry that names it
//! matches a request carrying a GraphQL document — in a JSON body (each
//! element of a batch in turn) or in a GET's `?query=` — by every
//! operation's type and name and its root fields (fragments followed); a
//! persisted query (a hash, no document) only by its listed hash, and a
//! document that does not parse is refused by every `graphql` deny entry.
//!
//! **Paths** are matched after normalisation: each segment is
//! percent-decoded, empty segments (`//`) and `.` are dropped, `..` removes
//! the segment before it, so `/repos/acme/../x` is `/x` and `/%2e%2e/` is a
//! `..`. A path holding an encoded `/` or `\` (`%2F`, `%5C`) or a raw `\` is
//! refused: origins read those differently. In a glob, `*` is one segment
//! and `**` any number of segments (none included); every other segment is
//! compared as written. `deny` entries compare paths and methods ignoring
//! ASCII case (a case trick never reaches a denied path); `allow` entries
//! compare exactly.
//!
//! **Tunnels.** Rules need the requests: a `CONNECT` to a host with rules
//! that the transport can intercept ([`Interceptable`](crate::Interceptable))
//! passes, with the [`Intercept`](crate::Intercept) answer on its response,
//! in any mode; one it cannot (SOCKS5, a UDP destination, a way in of your
//! own) is refused `mitm_required`, naming the rules.
//!
//! The layer, [`EnforceRulesLayer`](crate::request_rules_layer::EnforceRulesLayer),
//! reads the rules from the live policy
//! ([`NetworkPolicyBuilder::request_rules`](crate::NetworkPolicyBuilder::request_rules)),
//! so a reload changes them with the lists. This module is the data and
//! the decisions, below the policy that holds them.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::request_rules::{RequestRules, RuleBlock, RuleEntry};
//! use portcullis_middleware::EnforceRulesLayer;
//! use portcullis_middleware::{find_blocked, NetworkPolicy, PolicyHandle, Protocol, Reason, Target};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_middleware::BoxError> {
//! let rules = RequestRules::new(vec![RuleBlock::new("api.example.com", "rules[0]")?
//!     .allow(RuleEntry::new().methods(["GET"])?)
//!     .allow(RuleEntry::new().methods(["POST"])?.paths(["/repos/acme/*/issues/**"])?)
//!     .deny(RuleEntry::new().paths(["/user/keys/**"])?)]);
//! let policy = PolicyHandle::new(NetworkPolicy::builder().request_rules(rules).build());
//! let service = ServiceBuilder::new()
//!     .layer(EnforceRulesLayer::new(policy))
//!     .service(service_fn(|_: Request<()>| async { Ok::<_, portcullis_middleware::BoxError>(Response::new(())) }));
//!
//! let mut request = Request::post("http://api.example.com/repos/acme/../../user/keys/1").body(())?;
//! request.extensions_mut().insert(Target::parse_authority("api.example.com:80", None)?);
//! request.extensions_mut().insert(Protocol::Http);
//! let error = service.oneshot(request).await.unwrap_err();
//! assert_eq!(find_blocked(error.as_ref()).map(|b| b.reason), Some(Reason::RuleDenied));
//! # Ok(())
//! # }
//! ```

mod block;
mod body;
mod call;
mod entry;
mod graphql;
mod jsonrpc;
mod path;
mod value;

use std::fmt;
use std::sync::Arc;

use http::{Method, Request};

use crate::error::{Reason, Source};
use crate::pattern::{Pattern, PatternError, PatternSet};
use crate::target::Target;

pub use block::RuleBlock;
pub use body::{method_overrides_in_form, method_overrides_in_json, BodyForm, VerifyBodyMethod};
pub(crate) use call::{decide_call, limited_preset};
pub use entry::RuleEntry;
pub use graphql::{
    graphql_in_url, GraphqlMatcher, GraphqlOperation, GraphqlRequest, OPERATION_TYPES,
};
pub use jsonrpc::{body_messages, json_messages, JsonMessage, JsonRpcMatcher, MCP_TOOLS_CALL};
pub use path::{normalise_path, PathGlob};
pub use value::{HeaderMatcher, QueryMatcher, ValueGlob};

use entry::Asked;

/// Why a rule could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The host pattern is not valid.
    #[error("{0}")]
    Host(#[from] PatternError),
    /// A method is not an HTTP token.
    #[error("{0:?} is not an HTTP method (a token such as GET or POST)")]
    Method(String),
    /// A path glob is not valid.
    #[error("{glob:?} is not a path glob: {why}")]
    Path {
        /// The glob as written.
        glob: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Not a GraphQL operation type.
    #[error("{0:?} is not a GraphQL operation type (query, mutation or subscription)")]
    Operation(String),
    /// Not a SHA-256 hash in hex.
    #[error("{0:?} is not a persisted query's hash (64 hex digits, SHA-256)")]
    Hash(String),
    /// A JSON pointer does not start with `/`.
    #[error("{0:?} is not a JSON pointer (it starts with /, as in /path or /options/0)")]
    Pointer(String),
    /// A header name is not valid.
    #[error("{0:?} is not a header name")]
    Header(String),
    /// An entry names none of methods, paths, query or headers, or names
    /// an empty list.
    #[error("{0}")]
    Empty(&'static str),
}

/// Rule blocks, looked up by host; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct RequestRules {
    hosts: PatternSet,
    blocks: Arc<[RuleBlock]>,
    /// Blocks that cover every destination (limited mode's preset).
    universal: Vec<usize>,
}

impl PartialEq for RequestRules {
    fn eq(&self, other: &RequestRules) -> bool {
        self.blocks == other.blocks
    }
}

impl Eq for RequestRules {}

/// What the rules say about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    /// No block's host matches: the rules say nothing.
    NoRules,
    /// An `allow` entry matches (and no `deny`) in each block for the host,
    /// as (block, entry) indexes: name them with [`RequestRules::describe`].
    Allowed(Vec<(usize, usize)>),
    /// Refused.
    Refused(Refusal),
    /// A block in audit mode would refuse it (and none enforcing does): it
    /// goes through, recorded with what would have refused it.
    Audited(Refusal),
}

/// A refusal by the rules: why, which part refused (`request_rules`, or
/// `limited_mode` for its preset), and the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `rule_denied` or `rule_not_matched` (`method_not_allowed` for
    /// limited mode's preset).
    pub reason: Reason,
    /// Which part of the proxy refused.
    pub source: Source,
    /// The entry or block that decided, as `rules[0].deny[1] (host): …`
    /// (none for limited mode's preset).
    pub rule: Option<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "{}: {rule}", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

impl RequestRules {
    /// Rules made of `blocks`.
    pub fn new(blocks: Vec<RuleBlock>) -> RequestRules {
        let mut hosts = PatternSet::new();
        let mut universal = Vec::new();
        for (index, block) in blocks.iter().enumerate() {
            if block.read_only {
                universal.push(index);
                // Kept in step with the blocks' indexes; never matched.
                hosts.insert(Pattern {
                    host: crate::pattern::HostPattern::Ip(std::net::IpAddr::V6(
                        std::net::Ipv6Addr::UNSPECIFIED,
                    )),
                    port: Some(0),
                    text: String::new(),
                });
            } else {
                hosts.insert(block.host.clone());
            }
        }
        RequestRules {
            hosts,
            blocks: blocks.into(),
            universal,
        }
    }

    /// Limited mode as rules: one block covering every destination that
    /// lets `GET`, `HEAD` and `OPTIONS` through (and, when `git_fetch`,
    /// git's smart-HTTP fetch), and refuses — `method_not_allowed`, source
    /// `limited_mode` — any other method, a read with a body, a method
    /// override (header or `_method`), a protocol upgrade, the start of a
    /// push, and every tunnel whose requests cannot be seen. The
    /// [`LimitedModeLayer`](crate::LimitedModeLayer) decides by it, through
    /// the same engine as `[[rules]]`.
    pub fn limited(git_fetch: bool) -> RequestRules {
        RequestRules::new(vec![RuleBlock::read_only(git_fetch)])
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The blocks.
    pub fn blocks(&self) -> &[RuleBlock] {
        &self.blocks
    }

    fn blocks_for<'a>(&'a self, target: &Target) -> Vec<(usize, &'a RuleBlock)> {
        let mut indexes = self.universal.clone();
        if let Target::Host { host, port } = target {
            let named = self.hosts.find_all(host, *port);
            indexes.extend(named.into_iter().filter(|i| !self.universal.contains(i)));
        }
        indexes
            .into_iter()
            .filter_map(|index| self.blocks.get(index).map(|block| (index, block)))
            .collect()
    }

    /// Whether any block's host matches `target`.
    pub fn covers(&self, target: &Target) -> bool {
        !self.blocks.is_empty() && !self.blocks_for(target).is_empty()
    }

    /// The verdict for `method` on `path` (as sent, not yet normalised) to
    /// `target`, by method and path alone (no headers: see
    /// [`decide_request`](RequestRules::decide_request)).
    pub fn decide(&self, target: &Target, method: &Method, path: &str) -> RuleVerdict {
        self.verdict(target, &Asked::bare(method, path))
    }

    /// The verdict for `request` to `target`, as the layer decides it: also
    /// each method it asks for through an override header
    /// (`x-http-method-override`, …) or a `_method` parameter — every one
    /// must be allowed, any one can be denied — and, for limited mode's
    /// preset, whatever hides a write in a read. A protocol upgrade
    /// (`Upgrade: websocket`) is allowed only by an entry that names its
    /// paths: what follows it is a stream no rule can see.
    pub fn decide_request<B>(&self, target: &Target, request: &Request<B>) -> RuleVerdict {
        self.verdict(target, &Asked::of(request))
    }

    /// The verdict for `request` with its `body` (content coding undone):
    /// as [`decide_request`](RequestRules::decide_request), and each
    /// JSON-RPC call of the body judged by the `jsonrpc` entries (a batch
    /// call by call: the first refusal, or every entry that allowed).
    pub fn decide_body<B>(
        &self,
        target: &Target,
        request: &Request<B>,
        body: &[u8],
    ) -> RuleVerdict {
        let calls = body_messages(request.headers(), body);
        let Some(calls) = calls.as_deref() else {
            let mut asked = Asked::of(request);
            asked.call = entry::Call::None;
            return self.verdict(target, &asked);
        };
        let mut allowed = Vec::new();
        let mut audited = None;
        for call in calls {
            let mut asked = Asked::of(request);
            asked.call = entry::Call::One(call);
            match self.verdict(target, &asked) {
                RuleVerdict::NoRules => return RuleVerdict::NoRules,
                RuleVerdict::Allowed(by) => {
                    for entry in by {
                        if !allowed.contains(&entry) {
                            allowed.push(entry);
                        }
                    }
                }
                refused @ RuleVerdict::Refused(_) => return refused,
                RuleVerdict::Audited(refusal) => {
                    audited.get_or_insert(refusal);
                }
            }
        }
        match audited {
            Some(refusal) => RuleVerdict::Audited(refusal),
            None => RuleVerdict::Allowed(allowed),
        }
    }

    fn verdict(&self, target: &Target, asked: &Asked<'_>) -> RuleVerdict {
        if self.blocks.is_empty() {
            return RuleVerdict::NoRules;
        }
        let blocks = self.blocks_for(target);
        if blocks.is_empty() {
            return RuleVerdict::NoRules;
        }
        let method = asked.method;
        // An enforcing block's refusal is returned at once; an auditing
        // block's is kept, and reported only if nothing enforcing refuses.
        let mut audited: Option<Refusal> = None;
        for (_, block) in blocks.iter().filter(|(_, block)| block.read_only) {
            if let Some(what) = asked.write_in_a_read {
                // Limited mode says which write hid in the read.
                let refusal = Refusal {
                    rule: Some(format!("limited mode refuses {what}")),
                    ..block.refusal(Reason::RuleNotMatched, String::new)
                };
                if let Some(verdict) = judge(block, refusal, &mut audited) {
                    return verdict;
                }
            }
        }
        let segments = match normalise_path(asked.path) {
            Ok(segments) => segments,
            Err(why) => {
                for (_, block) in blocks.iter().filter(|(_, block)| block.uses_paths()) {
                    let refusal = block.refusal(Reason::AmbiguousPath, || {
                        format!("{} ({}): {why}", block.name, block.host)
                    });
                    if let Some(verdict) = judge(block, refusal, &mut audited) {
                        return verdict;
                    }
                }
                Vec::new()
            }
        };
        for (_, block) in &blocks {
            for (index, entry) in block.deny.iter().enumerate() {
                let trusted = entry.graphql.is_some()
                    && asked
                        .persisted_hash()
                        .is_some_and(|hash| block.trusts_persisted(&hash));
                if entry.denies(asked, &segments, trusted) {
                    let refusal = block.refusal(Reason::RuleDenied, || {
                        format!("{}.deny[{index}] ({}): {entry}", block.name, block.host)
                    });
                    if let Some(verdict) = judge(block, refusal, &mut audited) {
                        return verdict;
                    }
                }
            }
        }
        // Every block that covers the host must allow it: rules narrow.
        let mut allowed_by = Vec::with_capacity(blocks.len());
        for (block_index, block) in &blocks {
            let found = block
                .allow
                .iter()
                // An upgrade (a WebSocket) becomes a stream no rule sees:
                // only an entry that names its paths lets it through.
                .position(|entry| {
                    entry.allows(asked, &segments)
                        && (!asked.upgrade || (asked.websocket && entry.paths.is_some()))
                });
            match found {
                Some(index) => allowed_by.push((*block_index, index)),
                None => {
                    let refusal = block.refusal(Reason::RuleNotMatched, || {
                        let overrides: Vec<String> = asked
                            .overrides
                            .iter()
                            .map(|o| o.as_ref().map_or("(not a method)", Method::as_str))
                            .map(|m| m.escape_debug().to_string())
                            .collect();
                        let overrides = if overrides.is_empty() {
                            String::new()
                        } else {
                            format!(" (overridden as {})", overrides.join(", "))
                        };
                        let upgrade = match (asked.upgrade, asked.websocket) {
                            (true, true) => " (a WebSocket upgrade: allowed only by an entry that names its paths)",
                            (true, false) => " (a protocol upgrade other than Upgrade: websocket, which a host with request rules never lets through)",
                            (false, _) => "",
                        };
                        // The parameters' names (never their values: a
                        // value may be the secret being carried out).
                        let names: Vec<String> = asked
                            .query
                            .into_iter()
                            .flat_map(crate::inspect::query_parameters)
                            .map(|(name, _)| name.escape_debug().to_string())
                            .take(16)
                            .collect();
                        let query = if names.is_empty() || !block.uses_query() {
                            String::new()
                        } else {
                            format!(" with query parameters {}", names.join(", "))
                        };
                        let call = match asked.call {
                            entry::Call::One(call) if call.graphql.is_some() => call
                                .graphql
                                .as_ref()
                                .map(|g| format!(" asking {}", short(&g.to_string())))
                                .unwrap_or_default(),
                            entry::Call::One(call) => format!(
                                " calling {}{}",
                                call.method
                                    .as_deref()
                                    .map_or("(no method)".to_owned(), short),
                                call.tool
                                    .as_deref()
                                    .map(|tool| format!(" (tool {})", short(tool)))
                                    .unwrap_or_default()
                            ),
                            _ if block.reads_messages() => asked
                                .query
                                .and_then(graphql_in_url)
                                .map(|g| format!(" asking {}", short(&g.to_string())))
                                .unwrap_or_default(),
                            _ => String::new(),
                        };
                        format!(
                            "{} ({}): no allow entry matches {}{overrides} /{}{query}{call}{upgrade}",
                            block.name,
                            block.host,
                            method.as_str().escape_debug(),
                            segments.join("/").escape_debug()
                        )
                    });
                    if let Some(verdict) = judge(block, refusal, &mut audited) {
                        return verdict;
                    }
                }
            }
        }
        match audited {
            Some(refusal) => RuleVerdict::Audited(refusal),
            None => RuleVerdict::Allowed(allowed_by),
        }
    }

    /// Whether an [`Allowed`](RuleVerdict::Allowed) verdict let a git
    /// fetch through by its git entry (its body must then be checked).
    fn by_git_fetch(&self, allowed_by: &[(usize, usize)]) -> bool {
        allowed_by.iter().any(|&(block, entry)| {
            self.blocks
                .get(block)
                .and_then(|block| block.allow.get(entry))
                .is_some_and(|entry| entry.git_fetch)
        })
    }

    /// Names the entries of an [`Allowed`](RuleVerdict::Allowed) verdict:
    /// `rules[0].allow[1] (api.example.com): methods POST and paths /x/**`.
    pub fn describe(&self, allowed_by: &[(usize, usize)]) -> String {
        let names: Vec<String> = allowed_by
            .iter()
            .filter_map(|&(block, entry)| {
                let block = self.blocks.get(block)?;
                let entry_rule = block.allow.get(entry)?;
                Some(format!(
                    "{}.allow[{entry}] ({}): {entry_rule}",
                    block.name, block.host
                ))
            })
            .collect();
        names.join("; ")
    }
}

/// A name from a body, for a message: escaped, at most 64 characters.
fn short(name: &str) -> String {
    let escaped: String = name.escape_debug().take(64).collect();
    if escaped.chars().count() < name.escape_debug().count() {
        format!("{escaped}…")
    } else {
        escaped
    }
}

/// An enforcing block's refusal, to return at once; an auditing block's is
/// kept (the first) and `None` returned.
fn judge(
    block: &RuleBlock,
    refusal: Refusal,
    audited: &mut Option<Refusal>,
) -> Option<RuleVerdict> {
    if block.enforce {
        Some(RuleVerdict::Refused(refusal))
    } else {
        audited.get_or_insert(refusal);
        None
    }
}

#[cfg(test)]
mod tests;
