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
//! ([`METHOD_OVERRIDE_HEADERS`](crate::limited_mode::METHOD_OVERRIDE_HEADERS))
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
//! that the transport can intercept ([`Interceptable`])
//! passes, with the [`Intercept`](crate::Intercept) answer on its response,
//! in any mode; one it cannot (SOCKS5, a UDP destination, a way in of your
//! own) is refused `mitm_required`, naming the rules.
//!
//! The layer reads the rules from the live policy
//! ([`NetworkPolicyBuilder::request_rules`](crate::NetworkPolicyBuilder::request_rules)),
//! so a reload changes them with the lists.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use portcullis_middleware::request_rules::{RequestRules, RequestRulesLayer, RuleBlock, RuleEntry};
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
//!     .layer(RequestRulesLayer::new(policy))
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

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BlockDecision, Blocked, BoxError, Reason, Source};
use crate::future::MarkedResponse;
use crate::policy::{Pattern, PatternError, PatternSet, PolicyHandle};
use crate::request::{Interceptable, RequestInfo, UdpAssociation};
use crate::target::Target;

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
    /// An entry names neither methods nor paths, or names an empty list.
    #[error("{0}")]
    Empty(&'static str),
}

/// One segment of a path glob.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: any number of segments, none included.
    Any,
}

/// A glob on the normalised path: `/repos/*/issues/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    segments: Vec<Segment>,
    text: String,
}

impl PathGlob {
    /// Parses a glob: it starts with `/`; `*` is one segment, `**` any
    /// number; `.`, `..`, empty segments and `*` inside a segment are
    /// refused (the path it is matched against never holds them).
    pub fn parse(text: &str) -> Result<PathGlob, RuleError> {
        let bad = |why| RuleError::Path {
            glob: text.to_owned(),
            why,
        };
        let Some(rest) = text.strip_prefix('/') else {
            return Err(bad("it must start with /"));
        };
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for segment in rest.split('/') {
                segments.push(match segment {
                    "" => return Err(bad("it has an empty segment (//, or a trailing /)")),
                    "." | ".." => return Err(bad("it has a . or .. segment")),
                    "*" => Segment::One,
                    "**" => Segment::Any,
                    _ if segment.contains('*') => {
                        return Err(bad("* and ** stand for whole segments only"))
                    }
                    _ if segment.contains(['%', '\\', '?', '#']) => {
                        return Err(bad("write segments decoded, without %, \\, ? or #"))
                    }
                    _ if segment.contains(['{', '}', '[', ']']) => {
                        return Err(bad(
                            "globs have no {a,b} alternatives or [..] classes (they would never match); write one path per alternative",
                        ))
                    }
                    literal => Segment::Literal(literal.to_owned()),
                });
            }
        }
        Ok(PathGlob {
            segments,
            text: text.to_owned(),
        })
    }

    /// Whether the normalised `path` matches, comparing literals exactly or
    /// ignoring ASCII case.
    fn matches(&self, path: &[Cow<'_, str>], ignore_case: bool) -> bool {
        matches(&self.segments, path, ignore_case)
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn matches(glob: &[Segment], path: &[Cow<'_, str>], ignore_case: bool) -> bool {
    match glob.split_first() {
        None => path.is_empty(),
        Some((Segment::Any, rest)) => (0..=path.len()).any(|skip| {
            path.get(skip..)
                .is_some_and(|tail| matches(rest, tail, ignore_case))
        }),
        Some((segment, rest)) => match path.split_first() {
            None => false,
            Some((first, tail)) => {
                let here = match segment {
                    Segment::One => true,
                    Segment::Literal(literal) if ignore_case => literal.eq_ignore_ascii_case(first),
                    Segment::Literal(literal) => literal == first.as_ref(),
                    Segment::Any => false,
                };
                here && matches(rest, tail, ignore_case)
            }
        },
    }
}

/// A request path, normalised for matching: its segments, each with its
/// `;` parameters dropped and then percent-decoded, with `//`, `.` and
/// `..` resolved (`..;` is `..`, as Tomcat, Jetty and Spring read it).
///
/// `Err` names why the path can mean two things to some origin, so no rule
/// can judge it: an encoded `/`, `\`, `;` or NUL, a raw `\`, an escape
/// encoded twice (`%252e`, `%25%32%65`: decoded once, still an escape), an
/// IIS `%u` escape, a `%` not
/// followed by two hex digits, bytes that are not UTF-8 once decoded
/// (overlong `%c0%ae` included), a control character, or a segment ending
/// in `.` or white space (Windows servers drop those).
pub fn normalise_path(path: &str) -> Result<Vec<Cow<'_, str>>, &'static str> {
    if path.contains('\\') {
        return Err("the path holds a \\");
    }
    let mut segments: Vec<Cow<'_, str>> = Vec::new();
    for raw in path.split('/') {
        // Servlet containers read `;…` as the segment's parameters.
        let raw = raw.split_once(';').map_or(raw, |(segment, _)| segment);
        let decoded = if raw.contains('%') {
            let decoded = percent_decode_strict(raw)?;
            if decoded.contains(['/', '\\', ';', '\0']) {
                return Err("the path holds an encoded /, \\, ; or NUL (%2F, %5C, %3B, %00)");
            }
            Cow::Owned(decoded)
        } else {
            Cow::Borrowed(raw)
        };
        if decoded.chars().any(char::is_control) {
            return Err("the path holds a control character");
        }
        match decoded.as_ref() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment if segment.ends_with(|c: char| c == '.' || c.is_whitespace()) => {
                return Err("a segment ends in . or white space (Windows servers drop it)");
            }
            _ => segments.push(decoded),
        }
    }
    Ok(segments)
}

/// Percent-decodes one segment, refusing what origins decode differently.
fn percent_decode_strict(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte != b'%' {
            decoded.push(byte);
            index += 1;
            continue;
        }
        let hex = |at: usize| -> Option<u8> {
            let pair = bytes.get(at..at + 2)?;
            u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()
        };
        let Some(value) = hex(index + 1) else {
            return Err(match bytes.get(index + 1) {
                Some(b'u' | b'U') => "the path holds a %u escape (IIS reads it as UTF-16)",
                _ => "the path holds a % that is not followed by two hex digits",
            });
        };
        decoded.push(value);
        index += 3;
    }
    // Decoded once, an escape left (`%252e` is `%2e`, and so is
    // `%25%32%65`) is what an origin that decodes twice reads again.
    let again = decoded.windows(3).any(|w| {
        w.first() == Some(&b'%')
            && (w
                .get(1..3)
                .is_some_and(|pair| pair.iter().all(u8::is_ascii_hexdigit))
                || matches!(w.get(1), Some(b'u' | b'U')))
    });
    if again {
        return Err("the path is percent-encoded twice (decoded once, it still holds an escape)");
    }
    String::from_utf8(decoded).map_err(|_| {
        "the path decodes to bytes that are not UTF-8 (an overlong or broken sequence)"
    })
}

/// One `allow` or `deny` entry: methods and paths, each optional (absent:
/// any), at least one given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleEntry {
    methods: Option<Vec<Method>>,
    paths: Option<Vec<PathGlob>>,
    /// Matches git's smart-HTTP fetch only (limited mode's preset).
    git_fetch: bool,
}

impl RuleEntry {
    /// An entry that matches everything until methods or paths narrow it.
    pub fn new() -> RuleEntry {
        RuleEntry::default()
    }

    /// The methods it matches (HTTP tokens, compared as written).
    pub fn methods<I, S>(mut self, methods: I) -> Result<RuleEntry, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for method in methods {
            let method = method.as_ref();
            parsed.push(
                Method::from_bytes(method.as_bytes())
                    .map_err(|_| RuleError::Method(method.to_owned()))?,
            );
        }
        if parsed.is_empty() {
            return Err(RuleError::Empty(
                "methods is empty; leave it out to match any method",
            ));
        }
        self.methods = Some(parsed);
        Ok(self)
    }

    /// The path globs it matches (any of them).
    pub fn paths<I, S>(mut self, paths: I) -> Result<RuleEntry, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let parsed = paths
            .into_iter()
            .map(|glob| PathGlob::parse(glob.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Err(RuleError::Empty(
                "paths is empty; leave it out to match any path",
            ));
        }
        self.paths = Some(parsed);
        Ok(self)
    }

    /// Git's smart-HTTP fetch: `POST <repository>/git-upload-pack` with
    /// git's content type and no query (its body is checked apart: see
    /// [`VerifyGitFetchBody`](crate::VerifyGitFetchBody)).
    fn git_fetch() -> RuleEntry {
        RuleEntry {
            git_fetch: true,
            ..RuleEntry::default()
        }
    }

    /// Whether an `allow` entry takes the request: each method it asks
    /// for (its own and any override) is one of the entry's.
    fn allows(&self, asked: &Asked<'_>, path: &[Cow<'_, str>]) -> bool {
        if self.git_fetch {
            return asked.git_fetch && asked.overrides.is_empty();
        }
        let methods_match = self.methods.as_ref().is_none_or(|methods| {
            methods.contains(asked.method)
                && asked
                    .overrides
                    .iter()
                    .all(|o| o.as_ref().is_some_and(|m| methods.contains(m)))
        });
        methods_match
            && self
                .paths
                .as_ref()
                .is_none_or(|paths| paths.iter().any(|glob| glob.matches(path, false)))
    }

    /// Whether a `deny` entry refuses the request: any method it asks for
    /// is one of the entry's, ignoring case, as are paths.
    fn denies(&self, asked: &Asked<'_>, path: &[Cow<'_, str>]) -> bool {
        if self.git_fetch {
            return asked.git_fetch;
        }
        let same = |m: &Method, asked: &Method| m.as_str().eq_ignore_ascii_case(asked.as_str());
        let methods_match = self.methods.as_ref().is_none_or(|methods| {
            methods.iter().any(|m| {
                same(m, asked.method)
                    || asked
                        .overrides
                        .iter()
                        .flatten()
                        .any(|overridden| same(m, overridden))
            })
        });
        methods_match
            && self
                .paths
                .as_ref()
                .is_none_or(|paths| paths.iter().any(|glob| glob.matches(path, true)))
    }
}

/// What a request asks for, as the rules see it.
#[derive(Debug)]
struct Asked<'a> {
    method: &'a Method,
    /// Methods asked for by an override header or a `_method` parameter
    /// (`None`: not a method).
    overrides: Vec<Option<Method>>,
    path: &'a str,
    /// Something only reads may not carry, named: a body on a read, an
    /// upgrade, an override, the start of a push (limited mode's preset
    /// refuses it, saying which).
    write_in_a_read: Option<&'static str>,
    /// A protocol upgrade: the request becomes a stream no rule can see.
    upgrade: bool,
    /// The upgrade is to WebSocket (`Upgrade: websocket`, that token
    /// alone): the only one a host with rules lets through.
    websocket: bool,
    git_fetch: bool,
}

impl<'a> Asked<'a> {
    /// A request by its method and path alone.
    fn bare(method: &'a Method, path: &'a str) -> Asked<'a> {
        Asked {
            method,
            overrides: Vec::new(),
            path,
            write_in_a_read: None,
            upgrade: false,
            websocket: false,
            git_fetch: false,
        }
    }

    /// Also the methods a body names (`_method` in a form or JSON body).
    fn with_body_overrides(mut self, methods: &[String]) -> Asked<'a> {
        self.overrides.extend(
            methods
                .iter()
                .map(|value| Method::from_bytes(value.trim().as_bytes()).ok()),
        );
        self
    }

    fn of<B>(request: &'a Request<B>) -> Asked<'a> {
        let headers = request.headers();
        let mut overrides: Vec<Option<Method>> = crate::limited_mode::METHOD_OVERRIDE_HEADERS
            .iter()
            .flat_map(|name| headers.get_all(name))
            .map(|value| Method::from_bytes(value.as_bytes().trim_ascii()).ok())
            .collect();
        overrides.extend(
            crate::limited_mode::method_overrides_in_query(request.uri().query())
                .map(|value| Method::from_bytes(value.trim().as_bytes()).ok()),
        );
        let upgrade = headers.contains_key(http::header::UPGRADE);
        let websocket = crate::strip_headers::upgrade_token(headers)
            .is_some_and(|token| token.eq_ignore_ascii_case("websocket"));
        let method = request.method();
        Asked {
            method,
            write_in_a_read: if crate::limited_mode::starts_a_push(request.uri().query()) {
                Some("the start of a git push (service=git-receive-pack)")
            } else if !overrides.is_empty() {
                Some("a method override (an X-HTTP-Method-Override-style header or _method)")
            } else if upgrade {
                Some("a protocol upgrade (a stream no method check can see)")
            } else if crate::limited_mode::is_read_only(method)
                && crate::limited_mode::carries_body(request)
            {
                Some("a body on a read (how writes hide in reads)")
            } else {
                None
            },
            overrides,
            path: request.uri().path(),
            upgrade,
            websocket,
            git_fetch: crate::limited_mode::is_git_fetch(request),
        }
    }
}

impl fmt::Display for RuleEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(methods) = &self.methods {
            let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
            parts.push(format!("methods {}", names.join(", ")));
        }
        if let Some(paths) = &self.paths {
            let globs: Vec<&str> = paths.iter().map(|g| g.text.as_str()).collect();
            parts.push(format!("paths {}", globs.join(", ")));
        }
        if self.git_fetch {
            parts.push("git fetch (POST …/git-upload-pack)".to_owned());
        }
        if parts.is_empty() {
            f.write_str("everything")
        } else {
            f.write_str(&parts.join(" and "))
        }
    }
}

/// The rules for one host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleBlock {
    host: Pattern,
    name: String,
    allow: Vec<RuleEntry>,
    deny: Vec<RuleEntry>,
    enforce: bool,
    /// Limited mode's preset: covers every destination, refuses anything
    /// that hides a write in a read, and refuses as limited mode.
    read_only: bool,
}

impl RuleBlock {
    /// A block for `host` (the allowlist's pattern syntax), named `name` in
    /// refusals (the config says `rules[0]`).
    pub fn new(host: &str, name: impl Into<String>) -> Result<RuleBlock, RuleError> {
        Ok(RuleBlock {
            host: Pattern::parse(host)?,
            name: name.into(),
            allow: Vec::new(),
            deny: Vec::new(),
            enforce: true,
            read_only: false,
        })
    }

    /// Limited mode's preset: every destination, `GET`, `HEAD` and
    /// `OPTIONS` only (and git's fetch when `git_fetch`), nothing that
    /// hides a write in a read.
    fn read_only(git_fetch: bool) -> RuleBlock {
        let reads = RuleEntry {
            methods: Some(vec![Method::GET, Method::HEAD, Method::OPTIONS]),
            ..RuleEntry::default()
        };
        let mut allow = vec![reads];
        if git_fetch {
            allow.push(RuleEntry::git_fetch());
        }
        RuleBlock {
            host: Pattern {
                host: crate::policy::HostPattern::Any,
                port: None,
                text: "*".to_owned(),
            },
            name: "mode = \"limited\"".to_owned(),
            allow,
            deny: Vec::new(),
            enforce: true,
            read_only: true,
        }
    }

    /// Whether any entry names paths (only then does a path that cannot
    /// be normalised matter).
    fn uses_paths(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|e| e.paths.is_some())
    }

    /// The refusal this block makes.
    fn refusal(&self, reason: Reason, rule: impl FnOnce() -> String) -> Refusal {
        if self.read_only {
            Refusal {
                reason: Reason::MethodNotAllowed,
                source: Source::LimitedMode,
                rule: None,
            }
        } else {
            Refusal {
                reason,
                source: Source::RequestRules,
                rule: Some(rule()),
            }
        }
    }

    /// Audit mode (`enforce = false`): a request this block would refuse
    /// goes through, and the would-be refusal is recorded (decision
    /// `audit`), so rules can be tried on real traffic first.
    pub fn audit(mut self) -> RuleBlock {
        self.enforce = false;
        self
    }

    /// Adds an `allow` entry.
    pub fn allow(mut self, entry: RuleEntry) -> RuleBlock {
        self.allow.push(entry);
        self
    }

    /// Adds a `deny` entry.
    pub fn deny(mut self, entry: RuleEntry) -> RuleBlock {
        self.deny.push(entry);
        self
    }

    /// The host pattern.
    pub fn host(&self) -> &Pattern {
        &self.host
    }

    /// The block's name, as refusals cite it.
    pub fn name(&self) -> &str {
        &self.name
    }
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
                    host: crate::policy::HostPattern::Ip(std::net::IpAddr::V6(
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
                if entry.denies(asked, &segments) {
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
                        format!(
                            "{} ({}): no allow entry matches {}{overrides} /{}{upgrade}",
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

/// Configures [`RequestRulesService`].
#[derive(Debug, Clone)]
pub struct RequestRulesLayer {
    policy: PolicyHandle,
}

impl RequestRulesLayer {
    /// Reads the rules from `policy` per request.
    pub fn new(policy: PolicyHandle) -> RequestRulesLayer {
        RequestRulesLayer { policy }
    }
}

impl<S> Layer<S> for RequestRulesLayer {
    type Service = RequestRulesService<S>;

    fn layer(&self, inner: S) -> RequestRulesService<S> {
        RequestRulesService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Decides each request by the request rules; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct RequestRulesService<S> {
    inner: S,
    policy: PolicyHandle,
}

impl<S, B, R> Service<Request<B>> for RequestRulesService<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = MarkedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let policy = self.policy.load();
        match decide_call(policy.request_rules(), Some(&policy), &mut request) {
            Ok(pass) => {
                MarkedResponse::marked(self.inner.call(request), pass.intercept, pass.audited)
                    .frames_only(pass.frames_only)
            }
            Err(error) => MarkedResponse::refused(error),
        }
    }
}

/// How a request body names fields, when frameworks read a `_method`
/// field from it as the real method (Rails and Symfony from forms, Laravel
/// from forms and JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyForm {
    /// `application/x-www-form-urlencoded`.
    UrlEncoded,
    /// `multipart/form-data` (the boundary is in the `Content-Type`).
    Multipart,
    /// `application/json` or any `…+json`.
    Json,
}

impl BodyForm {
    /// The form of a body with these headers: judged on every
    /// `Content-Type` value by its media type, ignoring case and
    /// parameters; `None` when none is a form or JSON.
    pub fn of(headers: &http::HeaderMap) -> Option<BodyForm> {
        headers
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .filter_map(|value| {
                let value = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
                let essence = value.split(';').next().unwrap_or("").trim().to_owned();
                match essence.as_str() {
                    "application/x-www-form-urlencoded" => Some(BodyForm::UrlEncoded),
                    "multipart/form-data" => Some(BodyForm::Multipart),
                    "application/json" => Some(BodyForm::Json),
                    other if other.starts_with("application/") && other.ends_with("+json") => {
                        Some(BodyForm::Json)
                    }
                    _ => None,
                }
            })
            .next()
    }
}

/// The methods an `application/x-www-form-urlencoded` body asks for with a
/// `_method` field (the name read as PHP and the frameworks read it).
pub fn method_overrides_in_form(body: &[u8]) -> Vec<String> {
    let body = String::from_utf8_lossy(body);
    crate::limited_mode::form_parameters(&body)
        .filter(|(name, _)| crate::limited_mode::is_method_override_name(name))
        .map(|(_, value)| value)
        .collect()
}

/// The methods a JSON body asks for with a top-level `_method` key (each
/// one, when the key is repeated; each string of an array; a value that is
/// not a string as a non-method, which no `allow` entry holds). A body that
/// is not a JSON object names none: no framework reads a field from it.
pub fn method_overrides_in_json(body: &[u8]) -> Vec<String> {
    struct Overrides(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Overrides {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Overrides;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Overrides, A::Error> {
                    let mut found = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        let value: serde_json::Value = map.next_value()?;
                        if !crate::limited_mode::is_method_override_name(&key) {
                            continue;
                        }
                        match value {
                            serde_json::Value::String(method) => found.push(method),
                            serde_json::Value::Array(items) => {
                                found.extend(items.into_iter().map(|item| match item {
                                    serde_json::Value::String(method) => method,
                                    _ => String::new(),
                                }))
                            }
                            _ => found.push(String::new()),
                        }
                    }
                    Ok(Overrides(found))
                }
            }
            deserializer.deserialize_map(Visitor)
        }
    }
    serde_json::from_slice::<Overrides>(body)
        .map(|overrides| overrides.0)
        .unwrap_or_default()
}

/// The mark the request-rules layer puts on a request it let through to a
/// host whose rules name methods, when the request carries a form,
/// multipart or JSON body ([`BodyForm`]): frameworks read a `_method` field
/// there as the real method, so the body has not been judged yet. The
/// innermost service must read the body (bounded), find the methods it
/// names ([`method_overrides_in_form`], [`method_overrides_in_json`], the
/// `_method` parts of a multipart body) and [`decide`](VerifyBodyMethod::decide)
/// before anything is sent, and [`refuse_unread`](VerifyBodyMethod::refuse_unread)
/// a body it cannot read within its bound; portcullis's connector does.
#[derive(Debug, Clone)]
pub struct VerifyBodyMethod {
    policy: Arc<crate::policy::NetworkPolicy>,
    form: BodyForm,
}

impl VerifyBodyMethod {
    /// How the body names its fields.
    pub fn form(&self) -> &BodyForm {
        &self.form
    }

    /// The request judged again with the methods its body names: `Err`
    /// with the refusal, `Ok(Some(_))` with a would-be refusal to record
    /// (audit mode), `Ok(None)` to let it go on.
    pub fn decide<B>(
        &self,
        request: &Request<B>,
        body_methods: &[String],
    ) -> Result<Option<Blocked>, BoxError> {
        let info = RequestInfo::from_request(request)?;
        let asked = Asked::of(request).with_body_overrides(body_methods);
        match self.policy.request_rules().verdict(&info.target, &asked) {
            RuleVerdict::NoRules | RuleVerdict::Allowed(_) => Ok(None),
            RuleVerdict::Refused(refusal) => Err(refusal_of(&info, refusal).into()),
            RuleVerdict::Audited(refusal) => Ok(Some(audited_of(&info, refusal))),
        }
    }

    /// The refusal of a request whose body could not be judged (`why`: over
    /// the bound, or not readable as its `Content-Type` says).
    pub fn refuse_unread<B>(&self, request: &Request<B>, why: &str) -> BoxError {
        let info = match RequestInfo::from_request(request) {
            Ok(info) => info,
            Err(error) => return error.into(),
        };
        let names: Vec<String> = self
            .policy
            .request_rules()
            .blocks_for(&info.target)
            .iter()
            .filter(|(_, block)| !block.read_only)
            .map(|(_, block)| format!("{} ({})", block.name, block.host))
            .collect();
        let message = format!(
            "portcullis refused {} {}: its request rules ({}) name methods, and a form or JSON body can name another one (_method), but this body could not be judged: {why}; send a body of at most 16 MiB that parses as its Content-Type says",
            info.method.as_str().escape_debug(),
            info.target,
            names.join(", ")
        );
        refusal_of(
            &info,
            Refusal {
                reason: Reason::RuleNotMatched,
                source: Source::RequestRules,
                rule: Some(format!(
                    "{}: its body could name another method (_method) and {why}",
                    names.join(", ")
                )),
            },
        )
        // Written: the fix is the body's, not a rules entry's.
        .with_message(message)
        .into()
    }
}

/// Whether a request the rules let through must have its body judged:
/// it carries a form or JSON body and some block covering it names methods.
fn body_method_mark<B>(
    policy: &Arc<crate::policy::NetworkPolicy>,
    blocks: &[(usize, &RuleBlock)],
    request: &Request<B>,
) -> Option<VerifyBodyMethod> {
    let names_methods = blocks.iter().any(|(_, block)| {
        !block.read_only
            && block
                .allow
                .iter()
                .chain(&block.deny)
                .any(|entry| entry.methods.is_some())
    });
    if !names_methods || !crate::limited_mode::carries_body(request) {
        return None;
    }
    Some(VerifyBodyMethod {
        policy: Arc::clone(policy),
        form: BodyForm::of(request.headers())?,
    })
}

fn refusal_of(info: &RequestInfo, refusal: Refusal) -> Blocked {
    Blocked::new(
        refusal.reason,
        refusal.source,
        info.target.clone(),
        info.protocol,
        &info.method,
    )
    .with_rule(refusal.rule)
}

fn audited_of(info: &RequestInfo, refusal: Refusal) -> Blocked {
    let message = format!(
        "portcullis let {} {} through in audit mode; enforced, its request rules would refuse it ({refusal})",
        info.method.as_str().escape_debug(),
        info.target,
    );
    refusal_of(info, refusal)
        .with_decision(BlockDecision::Audit)
        .with_message(message)
}

/// What the engine lets through: whether to ask for interception, and a
/// would-be refusal to record (audit mode).
#[derive(Debug, Default)]
pub(crate) struct Pass {
    pub(crate) intercept: bool,
    pub(crate) audited: Option<Blocked>,
    /// An upgrade let through to a host with rules: WebSocket frames only.
    pub(crate) frames_only: bool,
}

/// The one decision of a call by `rules`, for the request-rules layer and
/// limited mode's preset alike: a tunnel to a covered destination is
/// intercepted when the transport offers it and refused when it cannot be
/// seen; a request is judged by [`RequestRules::decide_request`]. A git
/// fetch let through by its entry is marked for its body to be checked.
pub(crate) fn decide_call<B>(
    rules: &RequestRules,
    policy: Option<&Arc<crate::policy::NetworkPolicy>>,
    request: &mut Request<B>,
) -> Result<Pass, BoxError> {
    if rules.is_empty() {
        return Ok(Pass::default());
    }
    let info = RequestInfo::from_request(request)?;
    if info.protocol.is_lookup() {
        // A DNS question opens nothing: the rules judge the connection and
        // the requests that follow (limited mode's preset included).
        return Ok(Pass::default());
    }
    let mut blocks = rules.blocks_for(&info.target);
    if request.extensions().get::<UdpAssociation>().is_some() {
        // Decided datagram by datagram, by destination: only a block
        // covering everything (limited mode) refuses the association.
        blocks.retain(|(_, block)| block.read_only);
    }
    if blocks.is_empty() {
        return Ok(Pass::default());
    }
    let blocked = |refusal: Refusal| refusal_of(&info, refusal);
    if info.method == Method::CONNECT || info.protocol.is_tunnel() {
        let seeable = !info.protocol.is_tunnel() || info.protocol.can_intercept();
        let offered = info.method == Method::CONNECT
            && seeable
            && request.extensions().get::<Interceptable>().is_some();
        if offered {
            return Ok(Pass {
                intercept: true,
                ..Pass::default()
            });
        }
        if blocks.iter().any(|(_, block)| block.read_only) {
            // Limited mode: a CONNECT that could be intercepted needs the
            // CA; any other tunnel's methods are never seen.
            let reason = if seeable && info.method == Method::CONNECT {
                Reason::MitmRequired
            } else {
                Reason::MethodNotAllowed
            };
            return Err(Blocked::new(
                reason,
                Source::LimitedMode,
                info.target.clone(),
                info.protocol,
                &info.method,
            )
            .into());
        }
        let names: Vec<String> = blocks
            .iter()
            .map(|(_, block)| format!("{} ({})", block.name, block.host))
            .collect();
        return Err(blocked(Refusal {
            reason: Reason::MitmRequired,
            source: Source::RequestRules,
            rule: Some(names.join(", ")),
        })
        .with_message(format!(
            "portcullis refused {} {}: it has request rules ({}), which are checked only on requests portcullis can see; reach it over HTTP, or over an HTTPS CONNECT portcullis can intercept",
            info.method.as_str().escape_debug(),
            info.target,
            names.join(", ")
        ))
        .into());
    }
    let mut pass = match rules.decide_request(&info.target, request) {
        RuleVerdict::NoRules => return Ok(Pass::default()),
        RuleVerdict::Allowed(by) => {
            if rules.by_git_fetch(&by) {
                request
                    .extensions_mut()
                    .insert(crate::limited_mode::VerifyGitFetchBody);
            }
            Pass::default()
        }
        RuleVerdict::Refused(refusal) => return Err(blocked(refusal).into()),
        RuleVerdict::Audited(refusal) => Pass {
            audited: Some(audited_of(&info, refusal)),
            ..Pass::default()
        },
    };
    pass.frames_only = crate::strip_headers::is_upgrade(request.headers())
        && blocks.iter().any(|(_, block)| !block.read_only);
    if let Some(mark) = policy.and_then(|policy| body_method_mark(policy, &blocks, request)) {
        request.extensions_mut().insert(mark);
    }
    Ok(pass)
}

/// Limited mode's preset, built once: see [`RequestRules::limited`].
pub(crate) fn limited_preset(git_fetch: bool) -> &'static RequestRules {
    static WITH_GIT_FETCH: std::sync::LazyLock<RequestRules> =
        std::sync::LazyLock::new(|| RequestRules::limited(true));
    static READS_ONLY: std::sync::LazyLock<RequestRules> =
        std::sync::LazyLock::new(|| RequestRules::limited(false));
    if git_fetch {
        &WITH_GIT_FETCH
    } else {
        &READS_ONLY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{find_blocked, Intercept, NetworkPolicy, Protocol};
    use tower_test::mock;

    fn rules() -> RequestRules {
        RequestRules::new(vec![
            RuleBlock::new("api.github.com", "rules[0]")
                .unwrap()
                .allow(RuleEntry::new().methods(["GET", "HEAD"]).unwrap())
                .allow(
                    RuleEntry::new()
                        .methods(["POST", "PATCH"])
                        .unwrap()
                        .paths(["/repos/acme/widgets/issues/**"])
                        .unwrap(),
                )
                .deny(RuleEntry::new().paths(["/user/keys/**"]).unwrap()),
            RuleBlock::new("*.github.com", "rules[1]")
                .unwrap()
                .allow(RuleEntry::new())
                .deny(RuleEntry::new().paths(["/admin/**"]).unwrap()),
        ])
    }

    fn target(authority: &str) -> Target {
        Target::parse_authority(authority, None).unwrap()
    }

    fn verdict(method: &str, path: &str) -> RuleVerdict {
        rules().decide(
            &target("api.github.com:443"),
            &Method::from_bytes(method.as_bytes()).unwrap(),
            path,
        )
    }

    fn reason(method: &str, path: &str) -> Option<Reason> {
        match verdict(method, path) {
            RuleVerdict::Refused(refusal) => Some(refusal.reason),
            _ => None,
        }
    }

    #[test]
    fn parameters_are_dropped_and_ambiguous_spellings_refused() {
        assert_eq!(normalise_path("/a;x=1/b").unwrap(), ["a", "b"]);
        assert_eq!(normalise_path("/a/..;/b").unwrap(), ["b"]);
        assert_eq!(normalise_path("/a/%2e%2e;x/b").unwrap(), ["b"]);
        assert_eq!(normalise_path("/a;").unwrap(), ["a"]);
        assert_eq!(normalise_path("/100%25").unwrap(), ["100%"]);
        for ambiguous in [
            "/%252e%252e/x",
            "/%25%32%65",
            "/%c0%ae%c0%ae/x",
            "/%ff",
            "/%u002e",
            "/%U002E",
            "/a%",
            "/a%zz",
            "/a%3bb",
            "/a.",
            "/a./b",
            "/a%20",
            "/a%09/b",
            "/a%0d%0a",
            "/a%c2%a0",
            "/...",
        ] {
            assert!(normalise_path(ambiguous).is_err(), "{ambiguous}");
        }
    }

    #[test]
    fn override_fields_are_read_as_the_frameworks_read_them() {
        use crate::limited_mode::is_method_override_name;
        for name in [
            "_method",
            "_METHOD",
            ".method",
            " _method",
            "_method[]",
            "_method[0]",
            "[method",
            "_method ",
        ] {
            assert!(is_method_override_name(name), "{name:?}");
        }
        for name in ["method", "x_method", "_methods", "_method[", "__method"] {
            assert!(!is_method_override_name(name), "{name}");
        }
        assert_eq!(
            method_overrides_in_form(b"a=1&_method=DELETE&.method=PUT"),
            ["DELETE", "PUT"]
        );
        assert_eq!(method_overrides_in_form(b"_method=PATCH+ME"), ["PATCH ME"]);
        assert_eq!(
            method_overrides_in_json(br#"{"_method":"POST","x":{"_method":"no"},"_method":"DELETE","_method[]":["PUT"]}"#),
            ["POST", "DELETE", "PUT"]
        );
        assert_eq!(method_overrides_in_json(br#"{"_method": 7}"#), [""]);
        assert!(method_overrides_in_json(b"[1, 2]").is_empty());
        assert!(method_overrides_in_json(b"not json").is_empty());
        let form = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::CONTENT_TYPE, value.parse().unwrap());
            BodyForm::of(&headers)
        };
        assert_eq!(
            form("Application/X-WWW-Form-Urlencoded; charset=utf-8"),
            Some(BodyForm::UrlEncoded)
        );
        assert_eq!(
            form("multipart/form-data; boundary=x"),
            Some(BodyForm::Multipart)
        );
        assert_eq!(form("application/vnd.api+json"), Some(BodyForm::Json));
        assert_eq!(form("text/plain"), None);
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        assert_eq!(normalise_path("/a//b/./c/../d").unwrap(), ["a", "b", "d"]);
        assert_eq!(normalise_path("/%2e%2e/x/%2E/y").unwrap(), ["x", "y"]);
        assert_eq!(normalise_path("/../../x").unwrap(), ["x"]);
        assert!(normalise_path("/a%2Fb").is_err());
        assert!(normalise_path("/a%5cb").is_err());
        assert!(normalise_path("/a\\b").is_err());
        assert!(normalise_path("/a%00").is_err());
        assert_eq!(normalise_path("/caf%C3%A9").unwrap(), ["café"]);
    }

    #[test]
    fn globs() {
        let glob = PathGlob::parse("/repos/*/issues/**").unwrap();
        fn path(p: &str) -> Vec<Cow<'_, str>> {
            normalise_path(p).unwrap()
        }
        assert!(glob.matches(&path("/repos/acme/issues"), false));
        assert!(glob.matches(&path("/repos/acme/issues/1/comments"), false));
        assert!(!glob.matches(&path("/repos/acme/pulls/1"), false));
        assert!(!glob.matches(&path("/repos/issues"), false));
        assert!(!glob.matches(&path("/Repos/acme/issues"), false));
        assert!(glob.matches(&path("/Repos/acme/issues"), true));
        assert!(PathGlob::parse("/").unwrap().matches(&path("/"), false));
        for bad in [
            "repos", "/a//b", "/a/", "/a*", "/../x", "/a%2Fb", "/a?b", "/{a,b}", "/[b", "/a]",
        ] {
            assert!(PathGlob::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_wins_then_allow_then_not_matched() {
        assert_eq!(reason("GET", "/repos/acme/widgets"), None);
        assert_eq!(
            reason("POST", "/repos/acme/widgets/issues/3/comments"),
            None
        );
        assert_eq!(
            reason("POST", "/repos/acme/other/issues"),
            Some(Reason::RuleNotMatched)
        );
        assert_eq!(
            reason("DELETE", "/repos/acme/widgets"),
            Some(Reason::RuleNotMatched)
        );
        // Deny wins over an allow, through every trick on the path.
        for path in [
            "/user/keys/1",
            "/repos/acme/../../user/keys/1",
            "/%2e%2e/user/keys",
            "//user//keys/",
            "/USER/Keys/1",
            "/user/%6beys/1",
        ] {
            assert_eq!(reason("GET", path), Some(Reason::RuleDenied), "{path}");
        }
        // An encoded separator is never matched against anything.
        assert_eq!(reason("GET", "/user%2Fkeys/1"), Some(Reason::AmbiguousPath));
        // A less specific block's deny applies too: rules narrow.
        assert_eq!(reason("GET", "/admin/x"), Some(Reason::RuleDenied));
        // Methods: allow compares exactly, deny ignores case.
        assert_eq!(reason("get", "/repos"), Some(Reason::RuleNotMatched));
        match verdict("POST", "/repos/acme/widgets/issues") {
            RuleVerdict::Allowed(by) => {
                let rule = rules().describe(&by);
                assert!(rule.starts_with("rules[0].allow[1]"), "{rule}")
            }
            other => panic!("{other:?}"),
        }
        match verdict("GET", "/user/keys") {
            RuleVerdict::Refused(Refusal {
                rule: Some(rule), ..
            }) => {
                assert_eq!(
                    rule,
                    "rules[0].deny[0] (api.github.com): paths /user/keys/**"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            rules().decide(&target("example.com:443"), &Method::DELETE, "/"),
            RuleVerdict::NoRules
        );
    }

    #[test]
    fn an_auditing_block_lets_through_what_it_would_refuse_unless_another_enforces() {
        let audit = |host: &str, name: &str| {
            RuleBlock::new(host, name)
                .unwrap()
                .allow(RuleEntry::new().methods(["GET"]).unwrap())
                .deny(RuleEntry::new().paths(["/admin/**"]).unwrap())
                .audit()
        };
        let alone = RequestRules::new(vec![audit("x.test", "rules[0]")]);
        let x = target("x.test:443");
        assert!(matches!(
            alone.decide(&x, &Method::GET, "/admin/a"),
            RuleVerdict::Audited(Refusal {
                reason: Reason::RuleDenied,
                ..
            })
        ));
        assert!(matches!(
            alone.decide(&x, &Method::POST, "/a"),
            RuleVerdict::Audited(Refusal {
                reason: Reason::RuleNotMatched,
                ..
            })
        ));
        assert!(matches!(
            alone.decide(&x, &Method::GET, "/a"),
            RuleVerdict::Allowed(_)
        ));
        // An enforcing block for the same host still refuses.
        let both = RequestRules::new(vec![
            audit("x.test", "rules[0]"),
            RuleBlock::new("x.test", "rules[1]")
                .unwrap()
                .allow(RuleEntry::new().methods(["GET"]).unwrap()),
        ]);
        assert!(matches!(
            both.decide(&x, &Method::POST, "/a"),
            RuleVerdict::Refused(Refusal { reason: Reason::RuleNotMatched, rule: Some(rule), .. }) if rule.starts_with("rules[1]")
        ));
        assert!(matches!(
            both.decide(&x, &Method::GET, "/admin/a"),
            RuleVerdict::Audited(Refusal {
                reason: Reason::RuleDenied,
                ..
            })
        ));
    }

    fn request(method: &str, uri: &str, protocol: Protocol, authority: &str) -> Request<()> {
        let mut request = Request::builder().method(method).uri(uri).body(()).unwrap();
        request.extensions_mut().insert(target(authority));
        request.extensions_mut().insert(protocol);
        request
    }

    async fn outcome(request: Request<()>) -> Result<bool, Reason> {
        let policy = PolicyHandle::new(NetworkPolicy::builder().request_rules(rules()).build());
        let (mut service, mut mock) =
            mock::spawn_layer::<Request<()>, Response<()>, _>(RequestRulesLayer::new(policy));
        mock.allow(1);
        assert!(service.poll_ready().is_ready());
        let response = service.call(request);
        match mock.poll_request() {
            Poll::Ready(Some((_, send))) => {
                send.send_response(Response::new(()));
                let response = response.await.unwrap();
                Ok(response.extensions().get::<Intercept>().is_some())
            }
            _ => Err(find_blocked(response.await.unwrap_err().as_ref())
                .unwrap()
                .reason),
        }
    }

    #[tokio::test]
    async fn the_layer_decides_requests_and_asks_to_intercept_ruled_tunnels() {
        use Protocol::*;
        let url = "https://api.github.com/user/keys";
        assert_eq!(
            outcome(request("GET", url, HttpsMitm, "api.github.com:443")).await,
            Err(Reason::RuleDenied)
        );
        assert_eq!(
            outcome(request(
                "GET",
                "http://api.github.com/x",
                Http,
                "api.github.com:80"
            ))
            .await,
            Ok(false)
        );
        // A ruled host's CONNECT: intercepted when offered, refused when not.
        let mut offered = request(
            "CONNECT",
            "api.github.com:443",
            HttpsConnect,
            "api.github.com:443",
        );
        offered.extensions_mut().insert(Interceptable);
        assert_eq!(outcome(offered).await, Ok(true));
        assert_eq!(
            outcome(request(
                "CONNECT",
                "api.github.com:443",
                HttpsConnect,
                "api.github.com:443"
            ))
            .await,
            Err(Reason::MitmRequired)
        );
        assert_eq!(
            outcome(request(
                "CONNECT",
                "api.github.com:443",
                Socks5Tcp,
                "api.github.com:443"
            ))
            .await,
            Err(Reason::MitmRequired)
        );
        // A DNS question for a ruled host is answered: the rules judge what
        // follows. A captured connection is intercepted like a CONNECT.
        assert_eq!(
            outcome(request(
                "CONNECT",
                "api.github.com:0",
                Dns,
                "api.github.com:443"
            ))
            .await,
            Ok(false)
        );
        let mut captured = request(
            "CONNECT",
            "api.github.com:443",
            Transparent,
            "api.github.com:443",
        );
        captured.extensions_mut().insert(Interceptable);
        assert_eq!(outcome(captured).await, Ok(true));
        // A host without rules: untouched, never intercepted.
        let mut other = request(
            "CONNECT",
            "example.com:443",
            HttpsConnect,
            "example.com:443",
        );
        other.extensions_mut().insert(Interceptable);
        assert_eq!(outcome(other).await, Ok(false));
    }

    fn with_headers(mut request: Request<()>, headers: &[(&'static str, &str)]) -> Request<()> {
        for (name, value) in headers {
            request
                .headers_mut()
                .append(*name, http::HeaderValue::from_str(value).unwrap());
        }
        request
    }

    #[tokio::test]
    async fn method_overrides_and_upgrades_cannot_slip_past_rules() {
        use Protocol::*;
        let get = |uri: &str, headers: &[(&'static str, &str)]| {
            with_headers(
                request("GET", uri, HttpsMitm, "api.github.com:443"),
                headers,
            )
        };
        let repo = "https://api.github.com/repos/acme/x";
        assert_eq!(outcome(get(repo, &[])).await, Ok(false));
        assert_eq!(
            outcome(get(repo, &[("x-http-method-override", "DELETE")])).await,
            Err(Reason::RuleNotMatched),
            "every method asked for must be allowed"
        );
        assert_eq!(
            outcome(get(repo, &[("x-http-method-override", "HEAD")])).await,
            Ok(false),
            "an override to an allowed method is one"
        );
        assert_eq!(
            outcome(get(&format!("{repo}?_method=PUT"), &[])).await,
            Err(Reason::RuleNotMatched)
        );
        assert_eq!(
            outcome(get(repo, &[("upgrade", "websocket")])).await,
            Err(Reason::RuleNotMatched),
            "an upgrade becomes a stream no rule sees"
        );
        // An upgrade passes only an allow entry that names its paths, and a
        // deny entry still refuses it.
        let ws = RequestRules::new(vec![RuleBlock::new("api.test", "rules[0]")
            .unwrap()
            .allow(RuleEntry::new().methods(["GET"]).unwrap())
            .allow(
                RuleEntry::new()
                    .methods(["GET"])
                    .unwrap()
                    .paths(["/ws/**"])
                    .unwrap(),
            )
            .deny(RuleEntry::new().paths(["/ws/admin/**"]).unwrap())]);
        let upgrade = |path: &str| {
            Request::get(format!("https://api.test{path}"))
                .header("upgrade", "websocket")
                .body(())
                .unwrap()
        };
        let api = target("api.test:443");
        assert!(matches!(
            ws.decide_request(&api, &upgrade("/ws/chat")),
            RuleVerdict::Allowed(_)
        ));
        assert!(matches!(
            ws.decide_request(&api, &upgrade("/other")),
            RuleVerdict::Refused(Refusal {
                reason: Reason::RuleNotMatched,
                ..
            })
        ));
        assert!(matches!(
            ws.decide_request(&api, &upgrade("/ws/admin/x")),
            RuleVerdict::Refused(Refusal {
                reason: Reason::RuleDenied,
                ..
            })
        ));
        // A deny entry catches an overridden method, any case.
        let rules = RequestRules::new(vec![RuleBlock::new("api.test", "rules[0]")
            .unwrap()
            .allow(RuleEntry::new())
            .deny(RuleEntry::new().methods(["DELETE"]).unwrap())]);
        let target = target("api.test:443");
        let overridden = with_headers(
            request(
                "POST",
                "https://api.test/a?_method=delete",
                HttpsMitm,
                "api.test:443",
            ),
            &[],
        );
        assert!(matches!(
            rules.decide_request(&target, &overridden),
            RuleVerdict::Refused(Refusal {
                reason: Reason::RuleDenied,
                ..
            })
        ));
        // Without globs, a path that cannot be normalised is no reason to refuse.
        let encoded = request("GET", "https://api.test/a%2Fb", HttpsMitm, "api.test:443");
        assert!(matches!(
            rules.decide_request(&target, &encoded),
            RuleVerdict::Allowed(_)
        ));
    }

    #[test]
    fn limited_mode_is_a_preset_of_the_rules() {
        use Protocol::*;
        let limited = RequestRules::limited(true);
        let decide = |request: Request<()>| {
            let target = request.extensions().get::<Target>().cloned().unwrap();
            limited.decide_request(&target, &request)
        };
        let refused_as_limited_mode = |verdict: RuleVerdict| {
            matches!(
                verdict,
                RuleVerdict::Refused(Refusal {
                    reason: Reason::MethodNotAllowed,
                    source: Source::LimitedMode,
                    ..
                })
            )
        };
        let get = request("GET", "http://any.test/a%2Fb", Http, "any.test:80");
        assert!(
            matches!(decide(get), RuleVerdict::Allowed(_)),
            "every host, any path"
        );
        let mut socket = request("GET", "/v1/x", UnixSocket, "any.test:80");
        socket
            .extensions_mut()
            .insert(Target::unix("/run/app.sock").unwrap());
        assert!(
            matches!(decide(socket), RuleVerdict::Allowed(_)),
            "and sockets"
        );
        assert!(refused_as_limited_mode(decide(request(
            "POST",
            "http://any.test/",
            Http,
            "any.test:80"
        ))));
        let overridden = with_headers(
            request("GET", "http://any.test/", Http, "any.test:80"),
            &[("x-http-method-override", "GET")],
        );
        let verdict = decide(overridden);
        assert!(
            refused_as_limited_mode(verdict.clone()),
            "any override, even to a read"
        );
        // Saying what hid in the read, not "only GET, HEAD and OPTIONS".
        assert!(
            matches!(&verdict, RuleVerdict::Refused(Refusal { rule: Some(rule), .. }) if rule.contains("a method override")),
            "{verdict:?}"
        );
        let fetch = || {
            with_headers(
                request(
                    "POST",
                    "https://git.test/acme/x.git/git-upload-pack",
                    HttpsMitm,
                    "git.test:443",
                ),
                &[("content-type", "application/x-git-upload-pack-request")],
            )
        };
        match decide(fetch()) {
            RuleVerdict::Allowed(by) => assert!(limited.by_git_fetch(&by)),
            other => panic!("{other:?}"),
        }
        let without_git = RequestRules::limited(false);
        let target = target("git.test:443");
        assert!(refused_as_limited_mode(
            without_git.decide_request(&target, &fetch())
        ));
    }
}
