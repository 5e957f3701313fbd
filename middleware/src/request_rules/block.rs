//! The rules for one host pattern.

use crate::error::{Reason, Source};
use crate::pattern::Pattern;

use super::entry::RuleEntry;
use super::{Refusal, RuleError};

use http::Method;

/// The rules for one host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleBlock {
    pub(super) host: Pattern,
    pub(super) name: String,
    pub(super) allow: Vec<RuleEntry>,
    pub(super) deny: Vec<RuleEntry>,
    pub(super) enforce: bool,
    /// Limited mode's preset: covers every destination, refuses anything
    /// that hides a write in a read, and refuses as limited mode.
    pub(super) read_only: bool,
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
    pub(super) fn read_only(git_fetch: bool) -> RuleBlock {
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
                host: crate::pattern::HostPattern::Any,
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
    pub(super) fn uses_paths(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|e| e.paths.is_some())
    }

    /// Whether an entry of it matches on the query.
    pub(super) fn uses_query(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|e| e.query.is_some())
    }

    /// Whether an entry of it matches on the body's messages (JSON-RPC
    /// calls, GraphQL requests).
    pub(super) fn reads_messages(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|e| e.jsonrpc.is_some() || e.graphql.is_some())
    }

    /// Whether a `graphql` entry of it lists a persisted-query hash.
    pub(super) fn trusts_persisted(&self, hash: &str) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .filter_map(|e| e.graphql.as_ref())
            .any(|g| g.persisted.iter().any(|h| h == hash))
    }

    /// The refusal this block makes.
    pub(super) fn refusal(&self, reason: Reason, rule: impl FnOnce() -> String) -> Refusal {
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
