//! Matchers on a request's query parameters and headers: a name and a
//! glob on its values.

use std::fmt;

use http::header::HeaderName;
use http::HeaderMap;

use super::RuleError;

/// A glob on one value: `*` stands for any run of characters (none
/// included); every other character is itself. `*` alone matches any
/// value, the empty one too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueGlob {
    /// The literal runs between the stars.
    parts: Vec<String>,
    text: String,
}

impl ValueGlob {
    /// A glob as written.
    pub fn new(text: &str) -> ValueGlob {
        ValueGlob {
            parts: text.split('*').map(str::to_owned).collect(),
            text: text.to_owned(),
        }
    }

    /// Whether `value` matches; `fold` compares ignoring ASCII case (as
    /// `deny` entries do).
    pub fn matches(&self, value: &str, fold: bool) -> bool {
        let folded;
        let value = if fold {
            folded = value.to_ascii_lowercase();
            folded.as_str()
        } else {
            value
        };
        let part = |index: usize| -> std::borrow::Cow<'_, str> {
            let part = self.parts.get(index).map_or("", String::as_str);
            if fold {
                part.to_ascii_lowercase().into()
            } else {
                part.into()
            }
        };
        let last = self.parts.len().saturating_sub(1);
        if last == 0 {
            return value == part(0);
        }
        let (first, end) = (part(0), part(last));
        let Some(mut rest) = value.strip_prefix(first.as_ref()) else {
            return false;
        };
        // Each middle run at its leftmost place leaves the most room for
        // the rest: with `*` the only wildcard, that never misses a match.
        for index in 1..last {
            let middle = part(index);
            match rest.find(middle.as_ref()) {
                Some(at) => rest = rest.get(at + middle.len()..).unwrap_or_default(),
                None => return false,
            }
        }
        rest.ends_with(end.as_ref())
    }
}

/// Globs from `items`; `empty` is the error when there are none (an empty
/// list would match nothing: leaving the key out is what matches all).
pub(super) fn globs<I, S>(items: I, empty: &'static str) -> Result<Vec<ValueGlob>, RuleError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let globs: Vec<ValueGlob> = items
        .into_iter()
        .map(|item| ValueGlob::new(item.as_ref()))
        .collect();
    if globs.is_empty() {
        return Err(RuleError::Empty(empty));
    }
    Ok(globs)
}

impl fmt::Display for ValueGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Query parameters by name (decoded, compared as written; `deny` ignores
/// ASCII case), each with a glob on its decoded values. In an `allow`
/// entry the map is the parameters it lets through: each of the request's
/// must be named (`"*"` names any other) with every value matching, and a
/// named one may be absent. In a `deny` entry any named parameter with a
/// matching value refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryMatcher {
    pub(super) params: Vec<(String, ValueGlob)>,
}

impl QueryMatcher {
    pub(super) fn new<I, K, V>(params: I) -> Result<QueryMatcher, RuleError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let params: Vec<(String, ValueGlob)> = params
            .into_iter()
            .map(|(name, glob)| (name.as_ref().to_owned(), ValueGlob::new(glob.as_ref())))
            .collect();
        if params.is_empty() {
            return Err(RuleError::Empty(
                "query is empty; leave it out to match any query",
            ));
        }
        Ok(QueryMatcher { params })
    }

    /// An `allow` entry's test: every parameter sent is let through.
    pub(super) fn allows(&self, query: Option<&str>) -> bool {
        crate::inspect::query_parameters(query.unwrap_or_default()).all(|(name, value)| {
            let glob = self
                .params
                .iter()
                .find(|(named, _)| *named == name)
                .or_else(|| self.params.iter().find(|(named, _)| named == "*"));
            glob.is_some_and(|(_, glob)| glob.matches(&value, false))
        })
    }

    /// A `deny` entry's test: some parameter sent is refused.
    pub(super) fn denies(&self, query: Option<&str>) -> bool {
        crate::inspect::query_parameters(query.unwrap_or_default()).any(|(name, value)| {
            self.params.iter().any(|(named, glob)| {
                (named == "*" || named.eq_ignore_ascii_case(&name)) && glob.matches(&value, true)
            })
        })
    }
}

/// Headers by name, each with a glob on its values. In an `allow` entry
/// each named header must be present and every value of it match; in a
/// `deny` entry any value of a named header that matches refuses. A value
/// that is not text matches only `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatcher {
    pub(super) headers: Vec<(HeaderName, ValueGlob)>,
}

impl HeaderMatcher {
    pub(super) fn new<I, K, V>(headers: I) -> Result<HeaderMatcher, RuleError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for (name, glob) in headers {
            let name = name.as_ref();
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| RuleError::Header(name.to_owned()))?;
            parsed.push((header, ValueGlob::new(glob.as_ref())));
        }
        if parsed.is_empty() {
            return Err(RuleError::Empty(
                "headers is empty; leave it out to match any headers",
            ));
        }
        Ok(HeaderMatcher { headers: parsed })
    }

    fn value_matches(glob: &ValueGlob, value: &http::HeaderValue, fold: bool) -> bool {
        match value.to_str() {
            Ok(text) => glob.matches(text, fold),
            Err(_) => glob.text == "*",
        }
    }

    /// An `allow` entry's test.
    pub(super) fn allows(&self, headers: Option<&HeaderMap>) -> bool {
        let Some(headers) = headers else {
            return false;
        };
        self.headers.iter().all(|(name, glob)| {
            let mut values = headers.get_all(name).iter().peekable();
            values.peek().is_some() && values.all(|v| Self::value_matches(glob, v, false))
        })
    }

    /// A `deny` entry's test.
    pub(super) fn denies(&self, headers: Option<&HeaderMap>) -> bool {
        let Some(headers) = headers else {
            return false;
        };
        self.headers.iter().any(|(name, glob)| {
            headers
                .get_all(name)
                .iter()
                .any(|v| Self::value_matches(glob, v, true))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_is_any_run_and_the_rest_is_literal() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a*c", "ac", true),
            ("a*c", "abcbc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("*.json", "x.json", true),
            ("*.json", "x.jsonp", false),
        ];
        for (glob, value, want) in cases {
            assert_eq!(
                ValueGlob::new(glob).matches(value, false),
                want,
                "{glob} {value}"
            );
        }
        assert!(ValueGlob::new("Bearer *").matches("bearer x", true));
        assert!(!ValueGlob::new("Bearer *").matches("bearer x", false));
    }

    #[test]
    fn allow_lets_named_parameters_through_and_deny_finds_any() {
        let allow = QueryMatcher::new([("q", "*"), ("page", "1*")]).unwrap();
        assert!(allow.allows(None));
        assert!(allow.allows(Some("q=rust&page=12")));
        assert!(!allow.allows(Some("q=rust&leak=AKIA")));
        assert!(!allow.allows(Some("page=2")));
        let open = QueryMatcher::new([("page", "1*"), ("*", "*")]).unwrap();
        assert!(open.allows(Some("anything=1&page=1")));
        let deny = QueryMatcher::new([("access_token", "*")]).unwrap();
        assert!(deny.denies(Some("a=1&Access%5FToken=x")));
        assert!(!deny.denies(Some("a=1")));
    }
}
