//! GraphQL requests (a JSON body, or `?query=` on a GET): the operations a
//! request asks for, and the `graphql` matcher of a rule entry.

use std::collections::HashSet;
use std::fmt;

use graphql_parser::query::{Definition, OperationDefinition, Selection, SelectionSet};

use super::value::{globs, ValueGlob};
use super::RuleError;

/// The operation types, as written in a document.
pub const OPERATION_TYPES: [&str; 3] = ["query", "mutation", "subscription"];

/// One operation of a GraphQL document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphqlOperation {
    /// `query`, `mutation` or `subscription`.
    pub kind: &'static str,
    /// Its name (`None`: anonymous, matched as the empty name).
    pub name: Option<String>,
    /// Its root fields (their names, not aliases), fragments followed.
    pub fields: Vec<String>,
}

/// What one GraphQL request asks for, as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GraphqlRequest {
    /// Every operation of its document (all are judged, whichever
    /// `operationName` picks).
    Operations(Vec<GraphqlOperation>),
    /// A persisted query: a hash (`extensions.persistedQuery.sha256Hash`),
    /// no document.
    Persisted(String),
    /// It names a GraphQL request that cannot be read (why): a document
    /// that does not parse, a fragment that is not defined, a key that is
    /// `query` but for case.
    Unreadable(String),
}

/// The GraphQL request of one JSON message (an element of a batch):
/// `None` when it has neither a `query` nor a persisted-query extension.
pub(super) fn graphql_of(message: &serde_json::Value) -> Option<GraphqlRequest> {
    let object = message.as_object()?;
    let look_alike = object.keys().any(|key| {
        ["query", "operationName", "extensions"]
            .iter()
            .any(|known| key != known && key.eq_ignore_ascii_case(known))
    });
    let query = object.get("query");
    let hash = object
        .get("extensions")
        .and_then(|e| e.get("persistedQuery"))
        .map(|p| p.get("sha256Hash").and_then(serde_json::Value::as_str));
    if query.is_none() && hash.is_none() && !look_alike {
        return None;
    }
    if look_alike {
        return Some(GraphqlRequest::Unreadable(
            "a key is query, operationName or extensions but for case".into(),
        ));
    }
    Some(match (query, hash) {
        (Some(serde_json::Value::String(document)), _) => operations(document),
        (Some(_), _) => GraphqlRequest::Unreadable("its query is not a string".into()),
        (None, Some(Some(hash))) => GraphqlRequest::Persisted(hash.to_ascii_lowercase()),
        (None, _) => GraphqlRequest::Unreadable("its persisted query has no sha256Hash".into()),
    })
}

/// The GraphQL request of a URL's query (a GET): `query`, or a
/// persisted query's `extensions`; `None` when it has neither.
pub fn graphql_in_url(query: &str) -> Option<GraphqlRequest> {
    let mut message = serde_json::Map::new();
    for (name, value) in crate::inspect::query_parameters(query) {
        let known = ["query", "operationName", "extensions"]
            .iter()
            .any(|known| known.eq_ignore_ascii_case(&name));
        if !known {
            continue;
        }
        let value = if name.eq_ignore_ascii_case("extensions") {
            serde_json::from_str(&value).unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::Value::String(value)
        };
        if message.insert(name, value).is_some() {
            // A repeated parameter: servers differ on which one counts.
            return Some(GraphqlRequest::Unreadable(
                "a parameter is given twice".into(),
            ));
        }
    }
    graphql_of(&serde_json::Value::Object(message))
}

/// The operations of a document.
pub(super) fn operations(document: &str) -> GraphqlRequest {
    let parsed = match graphql_parser::parse_query::<&str>(document) {
        Ok(parsed) => parsed,
        Err(error) => {
            let first = error.to_string();
            let first = first.lines().nth(1).unwrap_or("it does not parse");
            return GraphqlRequest::Unreadable(format!("its document does not parse: {first}"));
        }
    };
    let fragments: Vec<_> = parsed
        .definitions
        .iter()
        .filter_map(|d| match d {
            Definition::Fragment(fragment) => Some(fragment),
            Definition::Operation(_) => None,
        })
        .collect();
    let mut found = Vec::new();
    for definition in &parsed.definitions {
        let Definition::Operation(operation) = definition else {
            continue;
        };
        let (kind, name, selection) = match operation {
            OperationDefinition::SelectionSet(set) => ("query", None, set),
            OperationDefinition::Query(q) => ("query", q.name, &q.selection_set),
            OperationDefinition::Mutation(m) => ("mutation", m.name, &m.selection_set),
            OperationDefinition::Subscription(s) => ("subscription", s.name, &s.selection_set),
        };
        let mut fields = Vec::new();
        let mut followed = HashSet::new();
        if let Err(why) = root_fields(selection, &fragments, &mut followed, &mut fields) {
            return GraphqlRequest::Unreadable(why);
        }
        found.push(GraphqlOperation {
            kind,
            name: name.map(str::to_owned),
            fields,
        });
    }
    if found.is_empty() {
        return GraphqlRequest::Unreadable("its document has no operation".into());
    }
    GraphqlRequest::Operations(found)
}

/// The fields of a root selection set, through fragment spreads (each
/// followed once) and inline fragments.
fn root_fields<'a>(
    set: &SelectionSet<'a, &'a str>,
    fragments: &[&graphql_parser::query::FragmentDefinition<'a, &'a str>],
    followed: &mut HashSet<&'a str>,
    fields: &mut Vec<String>,
) -> Result<(), String> {
    for item in &set.items {
        match item {
            Selection::Field(field) => {
                if !fields.iter().any(|f| f == field.name) {
                    fields.push(field.name.to_owned());
                }
            }
            Selection::InlineFragment(inline) => {
                root_fields(&inline.selection_set, fragments, followed, fields)?
            }
            Selection::FragmentSpread(spread) => {
                if !followed.insert(spread.fragment_name) {
                    continue;
                }
                let fragment = fragments
                    .iter()
                    .find(|f| f.name == spread.fragment_name)
                    .ok_or_else(|| {
                        format!(
                            "fragment {} is not defined",
                            spread.fragment_name.escape_debug()
                        )
                    })?;
                root_fields(&fragment.selection_set, fragments, followed, fields)?
            }
        }
    }
    Ok(())
}

/// What an entry asks of a GraphQL request: the `operations` types, their
/// `names` (globs; an anonymous operation is the empty name), their root
/// `fields` (globs), and the `persisted` query hashes it trusts.
///
/// An `allow` entry takes a request whose every operation is of one of
/// its types (if given), with a matching name (if given), and whose every
/// root field matches one of its `fields` (if given); a persisted query
/// only when its hash is in `persisted`. A `deny` entry refuses a request
/// with some operation of its types (if given) and names (if given) with
/// some root field matching (if given), ignoring ASCII case. A persisted
/// query whose hash no `graphql` entry of the block lists, and a request
/// that cannot be read, are refused by every `graphql` deny entry and
/// taken by none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphqlMatcher {
    pub(super) operations: Option<Vec<&'static str>>,
    pub(super) names: Option<Vec<ValueGlob>>,
    pub(super) fields: Option<Vec<ValueGlob>>,
    pub(super) persisted: Vec<String>,
}

impl GraphqlMatcher {
    /// A matcher of every readable request, until narrowed.
    pub fn new() -> GraphqlMatcher {
        GraphqlMatcher::default()
    }

    /// The operation types: `query`, `mutation`, `subscription`.
    pub fn operations<I, S>(mut self, types: I) -> Result<GraphqlMatcher, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for kind in types {
            let kind = kind.as_ref();
            let known = OPERATION_TYPES
                .iter()
                .find(|known| known.eq_ignore_ascii_case(kind))
                .ok_or_else(|| RuleError::Operation(kind.to_owned()))?;
            parsed.push(*known);
        }
        if parsed.is_empty() {
            return Err(RuleError::Empty(
                "graphql.operations is empty; leave it out to match any type",
            ));
        }
        self.operations = Some(parsed);
        Ok(self)
    }

    /// The operation names (globs).
    pub fn names<I, S>(mut self, names: I) -> Result<GraphqlMatcher, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.names = Some(globs(
            names,
            "graphql.names is empty; leave it out to match any name",
        )?);
        Ok(self)
    }

    /// The root fields (globs).
    pub fn fields<I, S>(mut self, fields: I) -> Result<GraphqlMatcher, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.fields = Some(globs(
            fields,
            "graphql.fields is empty; leave it out to match any field",
        )?);
        Ok(self)
    }

    /// Persisted-query hashes (SHA-256, hex) it trusts.
    pub fn persisted<I, S>(mut self, hashes: I) -> Result<GraphqlMatcher, RuleError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for hash in hashes {
            let hash = hash.as_ref();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RuleError::Hash(hash.to_owned()));
            }
            self.persisted.push(hash.to_ascii_lowercase());
        }
        Ok(self)
    }

    fn operation_matches(&self, operation: &GraphqlOperation, fold: bool) -> bool {
        let name = operation.name.as_deref().unwrap_or_default();
        self.operations
            .as_ref()
            .is_none_or(|types| types.contains(&operation.kind))
            && self
                .names
                .as_ref()
                .is_none_or(|globs| globs.iter().any(|g| g.matches(name, fold)))
    }

    /// An `allow` entry's test.
    pub(super) fn allows(&self, request: &GraphqlRequest) -> bool {
        match request {
            GraphqlRequest::Operations(operations) => operations.iter().all(|operation| {
                self.operation_matches(operation, false)
                    && self.fields.as_ref().is_none_or(|globs| {
                        operation
                            .fields
                            .iter()
                            .all(|field| globs.iter().any(|g| g.matches(field, false)))
                    })
            }),
            GraphqlRequest::Persisted(hash) => self.persisted.contains(hash),
            GraphqlRequest::Unreadable(_) => false,
        }
    }

    /// A `deny` entry's test; `trusted`: the block lists the request's
    /// persisted-query hash.
    pub(super) fn denies(&self, request: &GraphqlRequest, trusted: bool) -> bool {
        match request {
            GraphqlRequest::Operations(operations) => operations.iter().any(|operation| {
                self.operation_matches(operation, true)
                    && self.fields.as_ref().is_none_or(|globs| {
                        operation
                            .fields
                            .iter()
                            .any(|field| globs.iter().any(|g| g.matches(field, true)))
                    })
            }),
            GraphqlRequest::Persisted(hash) => !trusted && !self.persisted.contains(hash),
            GraphqlRequest::Unreadable(_) => true,
        }
    }
}

impl fmt::Display for GraphqlMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |globs: &[ValueGlob]| {
            globs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if let Some(types) = &self.operations {
            parts.push(format!("operations {}", types.join(", ")));
        }
        if let Some(names) = &self.names {
            parts.push(format!("names {}", list(names)));
        }
        if let Some(fields) = &self.fields {
            parts.push(format!("fields {}", list(fields)));
        }
        if !self.persisted.is_empty() {
            parts.push(format!("{} persisted queries", self.persisted.len()));
        }
        if parts.is_empty() {
            f.write_str("any readable request")
        } else {
            f.write_str(&parts.join(" and "))
        }
    }
}

impl fmt::Display for GraphqlRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GraphqlRequest::Operations(operations) => {
                let named: Vec<String> = operations
                    .iter()
                    .map(|op| {
                        let name = op.name.as_deref().unwrap_or("(anonymous)");
                        let fields: Vec<String> = op
                            .fields
                            .iter()
                            .take(8)
                            .map(|f| f.escape_debug().to_string())
                            .collect();
                        format!(
                            "{} {} {{{}}}",
                            op.kind,
                            name.escape_debug(),
                            fields.join(", ")
                        )
                    })
                    .collect();
                write!(f, "GraphQL {}", named.join("; "))
            }
            GraphqlRequest::Persisted(hash) => {
                write!(
                    f,
                    "GraphQL persisted query {}",
                    hash.get(..12).unwrap_or(hash)
                )
            }
            GraphqlRequest::Unreadable(why) => write!(f, "a GraphQL request that {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &str) -> GraphqlRequest {
        graphql_of(&serde_json::from_str(body).unwrap()).unwrap()
    }

    #[test]
    fn operations_are_read_with_their_root_fields_through_fragments() {
        let found = request(
            r#"{"query":"query Q { viewer { login } ...F ... on Query { repo: repository(name: \"x\") { id } } } fragment F on Query { search(q: \"a\") { n } viewer { id } } mutation M { deleteRepo(id: 1) { ok } }","operationName":"Q"}"#,
        );
        let GraphqlRequest::Operations(ops) = found else {
            panic!("{found:?}")
        };
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].kind, "query");
        assert_eq!(ops[0].fields, ["viewer", "search", "repository"]);
        assert_eq!(
            (ops[1].kind, ops[1].name.as_deref()),
            ("mutation", Some("M"))
        );
        assert!(matches!(
            request(r#"{"query":"{ a ...Missing }"}"#),
            GraphqlRequest::Unreadable(_)
        ));
        assert!(matches!(
            request(r#"{"query":"{ a "}"#),
            GraphqlRequest::Unreadable(_)
        ));
        assert!(matches!(
            request(r#"{"query":"{ a }","Query":"mutation { b }"}"#),
            GraphqlRequest::Unreadable(_)
        ));
        let hash = "a".repeat(64);
        assert_eq!(
            request(&format!(
                r#"{{"extensions":{{"persistedQuery":{{"version":1,"sha256Hash":"{hash}"}}}}}}"#
            )),
            GraphqlRequest::Persisted(hash)
        );
        assert_eq!(graphql_of(&serde_json::json!({"jsonrpc": "2.0"})), None);
        // Recursion is bounded by the parser: an error, never a crash.
        let deep = format!("{{\"query\":\"{}\"}}", "{ a".repeat(5000));
        assert!(matches!(request(&deep), GraphqlRequest::Unreadable(_)));
    }

    #[test]
    fn allow_needs_every_operation_and_field_and_deny_any() {
        let reads = GraphqlMatcher::new()
            .operations(["query"])
            .unwrap()
            .fields(["viewer", "search"])
            .unwrap();
        assert!(reads.allows(&request(r#"{"query":"{ viewer { id } }"}"#)));
        assert!(!reads.allows(&request(r#"{"query":"{ viewer { id } secret }"}"#)));
        assert!(!reads.allows(&request(r#"{"query":"mutation { viewer }"}"#)));
        assert!(!reads.allows(&request(
            r#"{"query":"query A { viewer } mutation B { viewer }","operationName":"A"}"#
        )));
        let no_mutations = GraphqlMatcher::new().operations(["mutation"]).unwrap();
        assert!(no_mutations.denies(
            &request(r#"{"query":"query A { viewer } mutation B { x }","operationName":"A"}"#),
            false
        ));
        assert!(!no_mutations.denies(&request(r#"{"query":"{ viewer }"}"#), false));
        let hash = "b".repeat(64);
        let persisted = request(&format!(
            r#"{{"extensions":{{"persistedQuery":{{"sha256Hash":"{hash}"}}}}}}"#
        ));
        assert!(no_mutations.denies(&persisted, false) && !reads.allows(&persisted));
        assert!(!no_mutations.denies(&persisted, true));
        let trusted = reads.clone().persisted([hash.to_uppercase()]).unwrap();
        assert!(trusted.allows(&persisted));
        assert!(GraphqlMatcher::new().operations(["fetch"]).is_err());
        assert!(GraphqlMatcher::new().persisted(["abc"]).is_err());
    }

    #[test]
    fn a_get_query_is_read_from_the_url() {
        let found = graphql_in_url("query=%7B%20viewer%20%7D&operationName=").unwrap();
        assert!(
            matches!(found, GraphqlRequest::Operations(ref ops) if ops[0].fields == ["viewer"])
        );
        assert!(matches!(
            graphql_in_url("query=%7Ba%7D&query=mutation%7Bb%7D"),
            Some(GraphqlRequest::Unreadable(_))
        ));
        assert_eq!(graphql_in_url("page=1"), None);
    }
}
