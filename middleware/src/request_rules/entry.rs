//! One `allow` or `deny` entry, and what a request asks for as the
//! entries see it.

use std::borrow::Cow;
use std::fmt;

use http::{Method, Request};

use super::graphql::{graphql_in_url, GraphqlMatcher};
use super::jsonrpc::{JsonMessage, JsonRpcMatcher};
use super::path::PathGlob;
use super::value::{HeaderMatcher, QueryMatcher};
use super::RuleError;

/// One `allow` or `deny` entry: methods, paths, query parameters and
/// headers, each optional (absent: any), at least one given; a request
/// matches when it matches each that is given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleEntry {
    pub(super) methods: Option<Vec<Method>>,
    pub(super) paths: Option<Vec<PathGlob>>,
    pub(super) query: Option<QueryMatcher>,
    pub(super) headers: Option<HeaderMatcher>,
    pub(super) jsonrpc: Option<JsonRpcMatcher>,
    pub(super) graphql: Option<GraphqlMatcher>,
    /// Matches git's smart-HTTP fetch only (limited mode's preset).
    pub(super) git_fetch: bool,
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

    /// The query parameters it matches, each a name and a glob on its
    /// decoded values (`*` any run of characters). In an `allow` entry
    /// these are the parameters it lets through: every parameter the
    /// request sends must be named (`"*"` names any other) and each value
    /// match, and a named one may be absent. In a `deny` entry any named
    /// parameter whose value matches refuses (names and values compared
    /// ignoring ASCII case).
    pub fn query<I, K, V>(mut self, params: I) -> Result<RuleEntry, RuleError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        self.query = Some(QueryMatcher::new(params)?);
        Ok(self)
    }

    /// The headers it matches, each a name and a glob on its values. In an
    /// `allow` entry each named header must be sent, every value of it
    /// matching; in a `deny` entry any value of a named header that
    /// matches refuses (ignoring ASCII case).
    pub fn headers<I, K, V>(mut self, headers: I) -> Result<RuleEntry, RuleError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        self.headers = Some(HeaderMatcher::new(headers)?);
        Ok(self)
    }

    /// The JSON-RPC calls (MCP's among them) it matches: a request matches
    /// only when its body is JSON-RPC and the call does (see
    /// [`JsonRpcMatcher`]); a batch is judged call by call, each one
    /// needing an `allow` entry and any one refused by a `deny` entry.
    pub fn jsonrpc(mut self, matcher: JsonRpcMatcher) -> RuleEntry {
        self.jsonrpc = Some(matcher);
        self
    }

    /// The GraphQL requests it matches (see [`GraphqlMatcher`]): a request
    /// matches only when it carries a GraphQL document (a JSON body, or a
    /// GET's `?query=`) that does; a batch is judged element by element.
    pub fn graphql(mut self, matcher: GraphqlMatcher) -> RuleEntry {
        self.graphql = Some(matcher);
        self
    }

    /// Git's smart-HTTP fetch: `POST <repository>/git-upload-pack` with
    /// git's content type and no query (its body is checked apart: see
    /// [`VerifyGitFetchBody`](crate::VerifyGitFetchBody)).
    pub(super) fn git_fetch() -> RuleEntry {
        RuleEntry {
            git_fetch: true,
            ..RuleEntry::default()
        }
    }

    /// Whether an `allow` entry takes the request: each method it asks
    /// for (its own and any override) is one of the entry's.
    pub(super) fn allows(&self, asked: &Asked<'_>, path: &[Cow<'_, str>]) -> bool {
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
            && self.query.as_ref().is_none_or(|q| q.allows(asked.query))
            && self
                .headers
                .as_ref()
                .is_none_or(|h| h.allows(asked.headers))
            && self.jsonrpc.as_ref().is_none_or(|m| match asked.call {
                // Judged again once the body is read (the body's mark).
                Call::Unread => true,
                Call::None => false,
                Call::One(call) => m.allows(call),
            })
            && self.graphql.as_ref().is_none_or(|m| {
                let url = || asked.query.and_then(graphql_in_url);
                match asked.call {
                    // The body is judged again once read; the URL now.
                    Call::Unread => url().is_none_or(|g| m.allows(&g)),
                    Call::None => url().is_some_and(|g| m.allows(&g)),
                    Call::One(message) => match (message.graphql.as_ref(), url()) {
                        (None, None) => false,
                        (body, url) => {
                            body.is_none_or(|g| m.allows(g)) && url.is_none_or(|g| m.allows(&g))
                        }
                    },
                }
            })
    }

    /// Whether a `deny` entry refuses the request: any method it asks for
    /// is one of the entry's, ignoring case, as are paths.
    /// `trusted`: the block lists the request's persisted-query hash.
    pub(super) fn denies(&self, asked: &Asked<'_>, path: &[Cow<'_, str>], trusted: bool) -> bool {
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
            && self.query.as_ref().is_none_or(|q| q.denies(asked.query))
            && self
                .headers
                .as_ref()
                .is_none_or(|h| h.denies(asked.headers))
            && self.jsonrpc.as_ref().is_none_or(|m| match asked.call {
                Call::Unread | Call::None => false,
                Call::One(call) => m.denies(call),
            })
            && self.graphql.as_ref().is_none_or(|m| {
                let in_url = asked
                    .query
                    .and_then(graphql_in_url)
                    .is_some_and(|g| m.denies(&g, trusted));
                match asked.call {
                    Call::Unread | Call::None => in_url,
                    Call::One(message) => {
                        in_url
                            || message
                                .graphql
                                .as_ref()
                                .is_some_and(|g| m.denies(g, trusted))
                    }
                }
            })
    }
}

/// The JSON-RPC call a request makes, as far as it is known.
#[derive(Debug, Clone, Copy)]
pub(super) enum Call<'a> {
    /// The body is not read yet: an `allow` entry's `jsonrpc` passes for
    /// now, a `deny` entry's does not; the body's mark judges it again.
    Unread,
    /// No call: no body, or one that is not JSON-RPC.
    None,
    /// One call (of a batch, each judged in turn).
    One(&'a JsonMessage),
}

/// What a request asks for, as the rules see it.
#[derive(Debug)]
pub(super) struct Asked<'a> {
    pub(super) method: &'a Method,
    /// Methods asked for by an override header or a `_method` parameter
    /// (`None`: not a method).
    pub(super) overrides: Vec<Option<Method>>,
    pub(super) path: &'a str,
    /// The query as sent (`None`: none, or not known: `check` by path).
    pub(super) query: Option<&'a str>,
    /// The headers (`None`: not known, `check` by method and path).
    pub(super) headers: Option<&'a http::HeaderMap>,
    /// The JSON-RPC call of its body.
    pub(super) call: Call<'a>,
    /// Something only reads may not carry, named: a body on a read, an
    /// upgrade, an override, the start of a push (limited mode's preset
    /// refuses it, saying which).
    pub(super) write_in_a_read: Option<&'static str>,
    /// A protocol upgrade: the request becomes a stream no rule can see.
    pub(super) upgrade: bool,
    /// The upgrade is to WebSocket (`Upgrade: websocket`, that token
    /// alone): the only one a host with rules lets through.
    pub(super) websocket: bool,
    pub(super) git_fetch: bool,
}

impl<'a> Asked<'a> {
    /// The persisted-query hash it sends (body first, then URL), if any.
    pub(super) fn persisted_hash(&self) -> Option<String> {
        use super::graphql::GraphqlRequest;
        let in_body = match self.call {
            Call::One(message) => match &message.graphql {
                Some(GraphqlRequest::Persisted(hash)) => Some(hash.clone()),
                _ => None,
            },
            _ => None,
        };
        in_body.or_else(|| match self.query.and_then(graphql_in_url) {
            Some(GraphqlRequest::Persisted(hash)) => Some(hash),
            _ => None,
        })
    }

    /// A request by its method and path alone.
    pub(super) fn bare(method: &'a Method, path: &'a str) -> Asked<'a> {
        Asked {
            method,
            overrides: Vec::new(),
            path,
            query: None,
            headers: None,
            call: Call::None,
            write_in_a_read: None,
            upgrade: false,
            websocket: false,
            git_fetch: false,
        }
    }

    /// Also the methods a body names (`_method` in a form or JSON body).
    pub(super) fn with_body_overrides(mut self, methods: &[String]) -> Asked<'a> {
        self.overrides.extend(
            methods
                .iter()
                .map(|value| Method::from_bytes(value.trim().as_bytes()).ok()),
        );
        self
    }

    pub(super) fn of<B>(request: &'a Request<B>) -> Asked<'a> {
        let headers = request.headers();
        let mut overrides: Vec<Option<Method>> = crate::inspect::METHOD_OVERRIDE_HEADERS
            .iter()
            .flat_map(|name| headers.get_all(name))
            .map(|value| Method::from_bytes(value.as_bytes().trim_ascii()).ok())
            .collect();
        overrides.extend(
            crate::inspect::method_overrides_in_query(request.uri().query())
                .map(|value| Method::from_bytes(value.trim().as_bytes()).ok()),
        );
        let upgrade = headers.contains_key(http::header::UPGRADE);
        let websocket = crate::inspect::upgrade_token(headers)
            .is_some_and(|token| token.eq_ignore_ascii_case("websocket"));
        let method = request.method();
        Asked {
            method,
            write_in_a_read: if crate::inspect::starts_a_push(request.uri().query()) {
                Some("the start of a git push (service=git-receive-pack)")
            } else if !overrides.is_empty() {
                Some("a method override (an X-HTTP-Method-Override-style header or _method)")
            } else if upgrade {
                Some("a protocol upgrade (a stream no method check can see)")
            } else if crate::inspect::is_read_only(method) && crate::inspect::carries_body(request)
            {
                Some("a body on a read (how writes hide in reads)")
            } else {
                None
            },
            overrides,
            path: request.uri().path(),
            query: request.uri().query(),
            headers: Some(headers),
            call: if crate::inspect::carries_body(request) {
                Call::Unread
            } else {
                Call::None
            },
            upgrade,
            websocket,
            git_fetch: crate::inspect::is_git_fetch(request),
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
        if let Some(query) = &self.query {
            let params: Vec<String> = query
                .params
                .iter()
                .map(|(name, glob)| format!("{}={glob}", name.escape_debug()))
                .collect();
            parts.push(format!("query {}", params.join(", ")));
        }
        if let Some(headers) = &self.headers {
            let named: Vec<String> = headers
                .headers
                .iter()
                .map(|(name, glob)| format!("{name}: {glob}"))
                .collect();
            parts.push(format!("headers {}", named.join(", ")));
        }
        if let Some(jsonrpc) = &self.jsonrpc {
            parts.push(format!("jsonrpc {jsonrpc}"));
        }
        if let Some(graphql) = &self.graphql {
            parts.push(format!("graphql {graphql}"));
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
