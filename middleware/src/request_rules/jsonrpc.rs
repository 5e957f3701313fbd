//! JSON-RPC bodies (MCP's among them): the calls a body makes, and the
//! `jsonrpc` matcher of a rule entry.

use std::fmt;

use super::value::{globs, ValueGlob};
use super::RuleError;

/// MCP's method for calling a tool: its `params.name` is the tool.
pub const MCP_TOOLS_CALL: &str = "tools/call";

/// One JSON-RPC message a body sends, as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMessage {
    /// The `method` (`None`: the message has none that is a string — a
    /// response to the server, or not a call at all).
    pub method: Option<String>,
    /// For `tools/call`, the tool (`params.name`).
    pub tool: Option<String>,
    /// For `tools/call`, the arguments (`params.arguments`).
    pub arguments: Option<serde_json::Value>,
    /// A key differs from `method`, `params`, `name` or `arguments` only in
    /// case (`"Method"`): servers that read keys ignoring case (Go's
    /// `encoding/json`) would see another call than this one, so every
    /// `jsonrpc` deny entry refuses it and no allow entry takes it.
    pub ambiguous: bool,
    /// The GraphQL request it makes, if it is one (a `query`, or a
    /// persisted query's hash).
    pub graphql: Option<super::GraphqlRequest>,
}

/// Whether a method is MCP's `tools/call`, ignoring ASCII case (a server
/// that reads it so must not get an unchecked tool).
fn is_tools_call(method: Option<&str>) -> bool {
    method.is_some_and(|m| m.eq_ignore_ascii_case(MCP_TOOLS_CALL))
}

/// Whether an object has a key that is `key` but for ASCII case.
fn look_alike(object: Option<&serde_json::Value>, keys: &[&str]) -> bool {
    object
        .and_then(serde_json::Value::as_object)
        .is_some_and(|object| {
            object.keys().any(|found| {
                keys.iter()
                    .any(|key| found != key && found.eq_ignore_ascii_case(key))
            })
        })
}

/// The messages of a JSON body — JSON-RPC calls, GraphQL requests: one
/// for an object, one per element of a batch (an array). `None` when the body is not JSON, or is JSON but
/// neither an object nor a non-empty array: it makes no call.
///
/// A leading UTF-8 byte-order mark is skipped (some servers skip it too).
/// A body that is not JSON but a form carrying a GraphQL `query` (as some
/// GraphQL servers accept) is one message with that GraphQL request.
pub fn json_messages(body: &[u8]) -> Option<Vec<JsonMessage>> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        let form = std::str::from_utf8(body).ok()?;
        let graphql = super::graphql_in_url(form)?;
        return Some(vec![JsonMessage {
            method: None,
            tool: None,
            arguments: None,
            ambiguous: false,
            graphql: Some(graphql),
        }]);
    };
    let call = |message: &serde_json::Value| {
        let method = message
            .get("method")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let params = message
            .get("params")
            .filter(|_| is_tools_call(method.as_deref()));
        let ambiguous = look_alike(Some(message), &["method", "params"])
            || look_alike(message.get("params"), &["name", "arguments"]);
        JsonMessage {
            graphql: super::graphql::graphql_of(message),
            ambiguous,
            tool: params
                .and_then(|p| p.get("name"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            arguments: params.and_then(|p| p.get("arguments")).cloned(),
            method,
        }
    };
    match &value {
        serde_json::Value::Object(_) => Some(vec![call(&value)]),
        serde_json::Value::Array(batch) if !batch.is_empty() => {
            Some(batch.iter().map(call).collect())
        }
        _ => None,
    }
}

/// The messages of a body with these headers: an `application/graphql`
/// body is one GraphQL document, as the servers that accept that type
/// read it (express-graphql, graphql-yoga); any other is read by
/// [`json_messages`], whatever its `Content-Type` says. (A multipart
/// GraphQL upload's `operations` part is JSON: give it to
/// [`json_messages`].)
pub fn body_messages(headers: &http::HeaderMap, body: &[u8]) -> Option<Vec<JsonMessage>> {
    let document =
        crate::inspect::media_types(headers).any(|essence| essence == "application/graphql");
    if !document {
        return json_messages(body);
    }
    let graphql = match std::str::from_utf8(body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)) {
        Ok(text) => super::graphql::operations(text),
        Err(_) => super::GraphqlRequest::Unreadable("its document is not UTF-8".into()),
    };
    Some(vec![JsonMessage {
        method: None,
        tool: None,
        arguments: None,
        ambiguous: false,
        graphql: Some(graphql),
    }])
}

/// What an entry asks of a JSON-RPC call: its `methods` (globs), and for
/// MCP's `tools/call` the `tools` (globs on `params.name`) and `arguments`
/// (JSON pointer into `params.arguments` → glob on the value; a value
/// that is not a string is compared as its JSON text).
///
/// An `allow` entry matches a call whose method matches one of `methods`
/// (if given) and, when the call is `tools/call`, whose tool matches one
/// of `tools` (if given) and whose every named argument exists and
/// matches (if given). A `deny` entry matches a call whose method matches
/// (if given) and, if it names `tools` or `arguments`, that is a
/// `tools/call` of a matching tool with some named argument matching —
/// ignoring ASCII case.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonRpcMatcher {
    pub(super) methods: Option<Vec<ValueGlob>>,
    pub(super) tools: Option<Vec<ValueGlob>>,
    pub(super) arguments: Option<Vec<(String, ValueGlob)>>,
}

impl JsonRpcMatcher {
    /// A matcher of every call, until narrowed.
    pub fn new() -> JsonRpcMatcher {
        JsonRpcMatcher::default()
    }

    /// The JSON-RPC methods it matches (globs: `notifications/*`).
    pub fn methods<I, S>(mut self, methods: I) -> Result<JsonRpcMatcher, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.methods = Some(globs(
            methods,
            "jsonrpc.methods is empty; leave it out to match any method",
        )?);
        Ok(self)
    }

    /// The MCP tools it matches (globs on a `tools/call`'s `params.name`).
    pub fn tools<I, S>(mut self, tools: I) -> Result<JsonRpcMatcher, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.tools = Some(globs(
            tools,
            "jsonrpc.tools is empty; leave it out to match any tool",
        )?);
        Ok(self)
    }

    /// Conditions on a `tools/call`'s arguments: a JSON pointer
    /// (`/path`, `/options/0`) → a glob on the value there.
    pub fn arguments<I, K, V>(mut self, arguments: I) -> Result<JsonRpcMatcher, RuleError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for (pointer, glob) in arguments {
            let pointer = pointer.as_ref();
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return Err(RuleError::Pointer(pointer.to_owned()));
            }
            parsed.push((pointer.to_owned(), ValueGlob::new(glob.as_ref())));
        }
        if parsed.is_empty() {
            return Err(RuleError::Empty(
                "jsonrpc.arguments is empty; leave it out to match any arguments",
            ));
        }
        self.arguments = Some(parsed);
        Ok(self)
    }

    fn method_matches(&self, call: &JsonMessage, fold: bool) -> bool {
        self.methods.as_ref().is_none_or(|globs| {
            call.method
                .as_deref()
                .is_some_and(|method| globs.iter().any(|g| g.matches(method, fold)))
        })
    }

    fn argument(call: &JsonMessage, pointer: &str) -> Option<String> {
        let value = call.arguments.as_ref()?.pointer(pointer)?;
        Some(match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    }

    /// An `allow` entry's test of one call.
    pub(super) fn allows(&self, call: &JsonMessage) -> bool {
        if call.ambiguous || !self.method_matches(call, false) {
            return false;
        }
        if !is_tools_call(call.method.as_deref()) {
            return true;
        }
        let tool_matches = self.tools.as_ref().is_none_or(|globs| {
            call.tool
                .as_deref()
                .is_some_and(|tool| globs.iter().any(|g| g.matches(tool, false)))
        });
        tool_matches
            && self.arguments.as_ref().is_none_or(|conditions| {
                conditions.iter().all(|(pointer, glob)| {
                    Self::argument(call, pointer).is_some_and(|value| glob.matches(&value, false))
                })
            })
    }

    /// A `deny` entry's test of one call.
    pub(super) fn denies(&self, call: &JsonMessage) -> bool {
        if call.ambiguous {
            return true;
        }
        if !self.method_matches(call, true) {
            return false;
        }
        if self.tools.is_none() && self.arguments.is_none() {
            return true;
        }
        is_tools_call(call.method.as_deref())
            && self.tools.as_ref().is_none_or(|globs| {
                call.tool
                    .as_deref()
                    .is_some_and(|tool| globs.iter().any(|g| g.matches(tool, true)))
            })
            && self.arguments.as_ref().is_none_or(|conditions| {
                conditions.iter().any(|(pointer, glob)| {
                    Self::argument(call, pointer).is_some_and(|value| glob.matches(&value, true))
                })
            })
    }
}

impl fmt::Display for JsonRpcMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |globs: &[ValueGlob]| {
            globs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if let Some(methods) = &self.methods {
            parts.push(format!("methods {}", list(methods)));
        }
        if let Some(tools) = &self.tools {
            parts.push(format!("tools {}", list(tools)));
        }
        if let Some(arguments) = &self.arguments {
            let named: Vec<String> = arguments
                .iter()
                .map(|(pointer, glob)| format!("{pointer}={glob}"))
                .collect();
            parts.push(format!("arguments {}", named.join(", ")));
        }
        if parts.is_empty() {
            f.write_str("any call")
        } else {
            f.write_str(&parts.join(" and "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(body: &str) -> JsonMessage {
        json_messages(body.as_bytes()).unwrap().remove(0)
    }

    #[test]
    fn calls_are_read_from_objects_and_batches() {
        let calls = json_messages(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},
                 {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/w/a"}}},
                 {"jsonrpc":"2.0","id":3,"result":{}}]"#,
        )
        .unwrap();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[1].tool.as_deref(), Some("read_file"));
        assert_eq!(calls[2].method, None);
        assert_eq!(json_messages(b"[]"), None);
        assert_eq!(json_messages(b"not json"), None);
        // A byte-order mark does not hide a call.
        let marked = json_messages(b"\xEF\xBB\xBF{\"method\":\"tools/list\"}").unwrap();
        assert_eq!(marked[0].method.as_deref(), Some("tools/list"));
        // A form carrying a GraphQL query is read as one.
        let form = json_messages(b"query=mutation%20%7B%20x%20%7D").unwrap();
        assert!(matches!(
            form[0].graphql,
            Some(crate::request_rules::GraphqlRequest::Operations(ref ops)) if ops[0].kind == "mutation"
        ));
        assert_eq!(json_messages(b"\"text\""), None);
    }

    #[test]
    fn allow_narrows_tools_and_arguments_and_deny_finds_them_ignoring_case() {
        let allow = JsonRpcMatcher::new()
            .methods(["initialize", "notifications/*", "tools/*"])
            .unwrap()
            .tools(["read_*"])
            .unwrap()
            .arguments([("/path", "/w/*")])
            .unwrap();
        let read =
            r#"{"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/w/a"}}}"#;
        assert!(allow.allows(&call(read)));
        assert!(allow.allows(&call(r#"{"method":"notifications/initialized"}"#)));
        assert!(allow.allows(&call(r#"{"method":"tools/list"}"#)));
        assert!(!allow.allows(&call(r#"{"method":"resources/read"}"#)));
        let other_tool =
            r#"{"method":"tools/call","params":{"name":"delete","arguments":{"path":"/w/a"}}}"#;
        assert!(!allow.allows(&call(other_tool)));
        let outside = r#"{"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/passwd"}}}"#;
        assert!(!allow.allows(&call(outside)));
        let missing = r#"{"method":"tools/call","params":{"name":"read_file","arguments":{}}}"#;
        assert!(!allow.allows(&call(missing)));

        let deny = JsonRpcMatcher::new().tools(["delete*"]).unwrap();
        assert!(deny.denies(&call(
            r#"{"method":"TOOLS/CALL","params":{"name":"Delete_All"}}"#
        )));
        assert!(!deny.denies(&call(r#"{"method":"tools/list"}"#)));
        let deny = JsonRpcMatcher::new()
            .arguments([("/cmd", "*rm -rf*")])
            .unwrap();
        assert!(deny.denies(&call(
            r#"{"method":"tools/call","params":{"name":"sh","arguments":{"cmd":"x; RM -RF /"}}}"#
        )));
        assert!(JsonRpcMatcher::new().arguments([("path", "*")]).is_err());

        // A key that only case tells apart reads as another call to some
        // servers: refused by any deny entry, taken by no allow entry.
        let look_alike =
            r#"{"method":"tools/list","METHOD":"tools/call","params":{"name":"delete"}}"#;
        assert!(call(look_alike).ambiguous);
        assert!(deny.denies(&call(look_alike)));
        assert!(!allow.allows(&call(look_alike)));
        let in_params = r#"{"method":"tools/call","params":{"name":"read_file","Name":"delete","arguments":{"path":"/w/a"}}}"#;
        assert!(call(in_params).ambiguous && !allow.allows(&call(in_params)));
        assert!(!call(read).ambiguous);
    }
}
