//! Secret scanning: what a request carries that must not leave, found in
//! the request *as the program sent it* — its path, its query and every
//! header, its body and the WebSocket messages a client sends.
//!
//! Two kinds of detector:
//!
//! - **Token formats** ([`Scanner::builtin`]): cloud keys, VCS tokens, chat,
//!   payment and LLM API keys, JWTs, PEM private keys — each a pattern for
//!   a prefix and shape that ordinary text does not have. The set follows
//!   the rules of gitleaks (MIT, <https://github.com/gitleaks/gitleaks>),
//!   narrowed to formats with a fixed prefix. Documentation examples
//!   (`AKIAIOSFODNN7EXAMPLE`) and placeholders that say so (`…EXAMPLE`,
//!   all one character) are not secrets.
//! - **Known values** ([`Scanner::known_value`]): a secret the proxy knows
//!   (a configured credential's, an environment variable the user named),
//!   found raw and in every encoding a program would use to hide it —
//!   percent-encoding (matched after decoding), base64 standard and
//!   URL-safe at each of the three alignments, with or without padding,
//!   and hex in either case.
//!
//! Each field is searched as it is, percent-decoded (once, `+` as a
//! space), and folded (both as written and decoded): default-ignorable characters (zero-width spaces and
//! joiners, U+FEFF) removed and look-alikes of ASCII replaced by it (NFKC:
//! fullwidth and mathematical letters; UTS #39 confusables: Cyrillic and
//! Greek letters), and every run of base64 of 16 characters or more is decoded and
//! searched again (a token inside `Authorization: Basic …`). A finding
//! names the detector and where it was found, never the value.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

mod decode;
mod formats;
mod host;

use http::Request;

use decode::{base64_runs, contains, encodings, fold, json_strings, percent_decode};
use formats::{is_example, is_valid, FORMATS};

/// What a finding does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanAction {
    /// Nothing is scanned.
    #[default]
    Off,
    /// Recorded as an audit finding, and let through.
    Audit,
    /// Refused: `secret_detected`.
    Deny,
}

/// The policy's secret scanning: the scanner, what a finding does, and
/// the hosts it is not applied to.
#[derive(Debug, Clone, Default)]
pub struct ScanPolicy {
    /// What looks for secrets.
    pub scanner: Scanner,
    /// What a finding does.
    pub action: ScanAction,
    /// Hosts whose requests are not scanned (the allowlist's patterns).
    pub skip_hosts: crate::pattern::PatternSet,
    /// The largest body inspected (after its `Content-Encoding` is
    /// undone); a larger one is refused (`not_inspected`) under `deny`,
    /// recorded and let through under `audit`. 0: [`DEFAULT_MAX_BODY`].
    pub max_body: usize,
    /// What a finding of one detector does, wherever it is found (the host
    /// still decides whether it is scanned): a detector's name
    /// (`github_token`, `known:NAME`, `credential:NAME`,
    /// `encoded_hostname`) or a prefix ending in `*` (`known:*`); the
    /// exact name first, then the longest prefix.
    pub detectors: Vec<(String, ScanAction)>,
    /// What scanning does for requests to some hosts (the allowlist's
    /// patterns; the most specific pattern that matches): `off` leaves
    /// them unscanned like `skip_hosts`, `audit`/`deny` replace
    /// [`action`](ScanPolicy::action) there — scanning can be on for a
    /// few hosts only.
    pub hosts: crate::pattern::PatternSet,
    /// The action of each of [`hosts`](ScanPolicy::hosts), in its order.
    pub host_actions: Vec<ScanAction>,
}

/// The largest body inspected unless [`ScanPolicy::max_body`] says.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

impl PartialEq for ScanPolicy {
    fn eq(&self, other: &ScanPolicy) -> bool {
        self.scanner == other.scanner
            && self.action == other.action
            && self.skip_hosts.patterns() == other.skip_hosts.patterns()
            && self.max_body == other.max_body
            && self.detectors == other.detectors
            && self.hosts.patterns() == other.hosts.patterns()
            && self.host_actions == other.host_actions
    }
}

impl Eq for ScanPolicy {}

impl ScanPolicy {
    /// The largest body inspected.
    pub fn body_limit(&self) -> usize {
        if self.max_body == 0 {
            DEFAULT_MAX_BODY
        } else {
            self.max_body
        }
    }

    /// Whether anything is scanned: [`action`](ScanPolicy::action) or
    /// some host's is not `off`.
    pub fn is_on(&self) -> bool {
        self.action != ScanAction::Off || self.host_actions.iter().any(|a| *a != ScanAction::Off)
    }

    /// What scanning does for requests to `target`: `off` for a
    /// `skip_hosts` host, else the most specific of
    /// [`hosts`](ScanPolicy::hosts) that matches, else
    /// [`action`](ScanPolicy::action).
    pub fn host_action(&self, target: &crate::target::Target) -> ScanAction {
        let crate::target::Target::Host { host, port } = target else {
            return self.action;
        };
        if self.skip_hosts.find(host, *port).is_some() {
            return ScanAction::Off;
        }
        let Some((found, _)) = self.hosts.find(host, *port) else {
            return self.action;
        };
        self.hosts
            .patterns()
            .iter()
            .position(|pattern| std::ptr::eq(pattern, found))
            .and_then(|index| self.host_actions.get(index).copied())
            .unwrap_or(self.action)
    }

    /// What a finding of `detector` in a request to `target` does: `off`
    /// where the host is not scanned, else the detector's own action if
    /// [`detectors`](ScanPolicy::detectors) names it, else the host's.
    pub fn action_for(&self, target: &crate::target::Target, detector: &str) -> ScanAction {
        let host = self.host_action(target);
        if host == ScanAction::Off {
            return ScanAction::Off;
        }
        self.detector_action(detector).unwrap_or(host)
    }

    /// The action [`detectors`](ScanPolicy::detectors) sets for
    /// `detector`, if any: its exact name first, then the longest prefix.
    pub fn detector_action(&self, detector: &str) -> Option<ScanAction> {
        if let Some((_, action)) = self.detectors.iter().find(|(name, _)| name == detector) {
            return Some(*action);
        }
        self.detectors
            .iter()
            .filter_map(|(name, action)| {
                let prefix = name.strip_suffix('*')?;
                detector
                    .starts_with(prefix)
                    .then_some((prefix.len(), *action))
            })
            .max_by_key(|(length, _)| *length)
            .map(|(_, action)| action)
    }

    /// Whether `target` is scanned at all.
    pub fn covers(&self, target: &crate::target::Target) -> bool {
        self.host_action(target) != ScanAction::Off
    }

    /// The finding in `request` for `target`, when scanning is on and the
    /// host is not skipped. `not_secrets` are tokens shaped like secrets
    /// that are not (a credential's placeholder).
    pub fn finding<B>(
        &self,
        target: &crate::target::Target,
        request: &Request<B>,
        not_secrets: &[String],
    ) -> Option<Finding> {
        if !self.covers(target) {
            return None;
        }
        self.scanner.scan_request_except(request, not_secrets)
    }
}

/// Where in a request a secret was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The URL path.
    Path,
    /// The query string.
    Query,
    /// A header, by name.
    Header(String),
    /// The body.
    Body,
    /// The host name's labels a program chose.
    Host,
    /// A WebSocket message the client sent (its fragments joined, its
    /// compression undone).
    Message,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path => f.write_str("the URL path"),
            Location::Query => f.write_str("the query string"),
            Location::Header(name) => write!(f, "the {name} header"),
            Location::Body => f.write_str("the body"),
            Location::Host => f.write_str("the host name"),
            Location::Message => f.write_str("a WebSocket message"),
        }
    }
}

/// What was found: by which detector, where. Never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The detector (`github_token`, `known:AWS_SECRET_ACCESS_KEY`).
    pub detector: String,
    /// Where it was found.
    pub location: Location,
    /// How it was written there when not as is (`base64`, `hex`,
    /// `percent-encoded`).
    pub encoding: Option<&'static str>,
}

/// The detector and the place of a finding, read back from the rule a
/// refusal or audit carries (a [`Finding`] written out:
/// `DETECTOR in PLACE (ENCODING)`), for records and metrics.
pub fn finding_parts(rule: &str) -> (&str, &str) {
    rule.split_once(" in ").unwrap_or((rule, ""))
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.detector, self.location)?;
        if let Some(encoding) = self.encoding {
            write!(f, " ({encoding})")?;
        }
        Ok(())
    }
}

/// A secret the proxy knows, and the forms it takes once encoded.
#[derive(Clone)]
struct Known {
    name: String,
    /// (form, encoding) — the raw value first.
    forms: Vec<(Vec<u8>, Option<&'static str>)>,
}

/// The token formats compiled, matched on bytes (no view is validated as
/// UTF-8 first): one set for the formats searched everywhere, to find
/// which match, beside each pattern by name to find where; and the gated
/// formats (payment cards, IBANs), each searched only where its gate finds
/// a candidate. Their patterns have no fixed prefix: in the set they
/// would turn off its literal prefilter and make every byte cost a walk
/// of the automaton (a 1 KiB JSON body's scan cost 25% more).
struct Formats {
    set: regex::bytes::RegexSet,
    each: Vec<(&'static str, regex::bytes::Regex)>,
    gated: Vec<(&'static str, regex::bytes::Regex, formats::Gate)>,
}

impl Formats {
    /// `compiled` in order, split into the set and the gated; `None` when
    /// empty.
    fn of(compiled: Vec<(&'static str, regex::bytes::Regex)>) -> Option<Arc<Formats>> {
        if compiled.is_empty() {
            return None;
        }
        let mut each = Vec::new();
        let mut gated = Vec::new();
        for (name, regex) in compiled {
            match formats::gate(name) {
                Some(gate) => gated.push((name, regex, gate)),
                None => each.push((name, regex)),
            }
        }
        let set = regex::bytes::RegexSet::new(each.iter().map(|(_, regex)| regex.as_str())).ok()?;
        Some(Arc::new(Formats { set, each, gated }))
    }

    /// Every format, by name and pattern, in order.
    fn all(&self) -> impl Iterator<Item = (&'static str, &regex::bytes::Regex)> {
        self.each
            .iter()
            .map(|(name, regex)| (*name, regex))
            .chain(self.gated.iter().map(|(name, regex, _)| (*name, regex)))
    }
}

/// Finds secrets in requests; see the [module docs](self). Cheap to clone.
#[derive(Clone, Default)]
pub struct Scanner {
    formats: Option<Arc<Formats>>,
    known: Arc<Vec<Known>>,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field(
                "formats",
                &self.formats.as_ref().map_or(0, |f| f.all().count()),
            )
            .field(
                "known",
                &self
                    .known
                    .iter()
                    .map(|k| k.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PartialEq for Scanner {
    fn eq(&self, other: &Scanner) -> bool {
        let names = |scanner: &Scanner| {
            scanner
                .formats
                .iter()
                .flat_map(|formats| formats.all().map(|(name, _)| name))
                .collect::<Vec<_>>()
        };
        names(self) == names(other)
            && self.known.len() == other.known.len()
            && self
                .known
                .iter()
                .zip(other.known.iter())
                .all(|(a, b)| a.name == b.name && a.forms == b.forms)
    }
}

impl Eq for Scanner {}

/// The shortest secret looked for by value: shorter ones would match
/// ordinary text.
pub const SHORTEST_KNOWN: usize = 8;

impl Scanner {
    /// A scanner with the built-in token formats and no known value.
    pub fn builtin() -> Scanner {
        let built = FORMATS
            .iter()
            .filter_map(|format| {
                regex::bytes::Regex::new(format.pattern)
                    .ok()
                    .map(|regex| (format.name, regex))
            })
            .collect::<Vec<_>>();
        Scanner {
            formats: Formats::of(built),
            known: Arc::default(),
        }
    }

    /// The same without the token formats `off` names (`true`: left out).
    pub fn without_formats(&self, off: impl Fn(&str) -> bool) -> Scanner {
        let kept: Vec<(&'static str, regex::bytes::Regex)> = self
            .formats
            .iter()
            .flat_map(|formats| formats.all())
            .filter(|(name, _)| !off(name))
            .map(|(name, regex)| (name, regex.clone()))
            .collect();
        Scanner {
            formats: Formats::of(kept),
            known: self.known.clone(),
        }
    }

    /// The names of the built-in token formats.
    pub fn format_names() -> impl Iterator<Item = &'static str> {
        FORMATS.iter().map(|format| format.name)
    }

    /// A scanner with no detector: finds nothing.
    pub fn none() -> Scanner {
        Scanner::default()
    }

    /// Also looks for `value` (named `name` in findings: `known:NAME`) raw
    /// and encoded. A value shorter than [`SHORTEST_KNOWN`] bytes is
    /// ignored (`false`): it would match ordinary text.
    pub fn known_value(&mut self, name: &str, value: &str) -> bool {
        if value.len() < SHORTEST_KNOWN {
            return false;
        }
        let name = if name.starts_with("credential:") {
            name.to_owned()
        } else {
            format!("known:{name}")
        };
        let mut known = (*self.known).clone();
        known.push(Known {
            name,
            forms: encodings(value.as_bytes()),
        });
        self.known = Arc::new(known);
        true
    }

    /// Whether this scanner looks for anything.
    pub fn is_empty(&self) -> bool {
        self.formats.is_none() && self.known.is_empty()
    }

    /// The first secret in `request`'s path, query or headers.
    pub fn scan_request<B>(&self, request: &Request<B>) -> Option<Finding> {
        self.scan_request_except(request, &[])
    }

    /// The same, taking none of `not_secrets` (tokens shaped like secrets
    /// that are not: a credential's placeholder) for one.
    pub fn scan_request_except<B>(
        &self,
        request: &Request<B>,
        not_secrets: &[String],
    ) -> Option<Finding> {
        if self.is_empty() {
            return None;
        }
        let uri = request.uri();
        if let Some(found) =
            self.scan_field_except(uri.path().as_bytes(), Location::Path, not_secrets)
        {
            return Some(found);
        }
        if let Some(query) = uri.query() {
            if let Some(found) =
                self.scan_field_except(query.as_bytes(), Location::Query, not_secrets)
            {
                return Some(found);
            }
        }
        request.headers().iter().find_map(|(name, value)| {
            self.scan_field_except(
                value.as_bytes(),
                Location::Header(name.as_str().to_owned()),
                not_secrets,
            )
        })
    }

    /// A secret, or data encoded, in the labels of `name` a program chose
    /// left of `base`: known values and token formats in the labels
    /// joined, then the shape of the labels (32+ characters of hex, or of
    /// high-entropy base32 or base64, or 100+ characters in all).
    pub fn scan_host(&self, name: &str, base: &str, not_secrets: &[String]) -> Option<Finding> {
        let chosen = host::chosen(name, base)?;
        let joined: String = chosen.split('.').collect();
        if let Some(found) = self.scan_field_except(joined.as_bytes(), Location::Host, not_secrets)
        {
            return Some(found);
        }
        host::looks_encoded(chosen).map(|why| Finding {
            detector: format!("encoded_hostname ({why})"),
            location: Location::Host,
            encoding: None,
        })
    }

    /// The first secret in a request body (its `Content-Encoding` already
    /// undone): as a field, and, when it is JSON or NDJSON, in every string
    /// it holds with its escapes (`\u0067`) undone.
    pub fn scan_body(&self, body: &[u8], not_secrets: &[String]) -> Option<Finding> {
        self.scan_content(body, Location::Body, not_secrets)
    }

    /// The first secret in content (a body, a WebSocket message) found at
    /// `location`, as [`scan_body`](Self::scan_body) searches.
    pub fn scan_content(
        &self,
        body: &[u8],
        location: Location,
        not_secrets: &[String],
    ) -> Option<Finding> {
        if let Some(found) = self.scan_field_except(body, location.clone(), not_secrets) {
            return Some(found);
        }
        let strings = json_strings(body);
        if strings.is_empty() {
            return None;
        }
        self.scan_field_except(strings.join("\n").as_bytes(), location, not_secrets)
            .map(|found| Finding {
                encoding: found.encoding.or(Some("JSON-escaped")),
                ..found
            })
    }

    /// The first secret in one field, in any of the views the module docs
    /// list.
    pub fn scan_field(&self, raw: &[u8], location: Location) -> Option<Finding> {
        self.scan_field_except(raw, location, &[])
    }

    fn scan_field_except(
        &self,
        raw: &[u8],
        location: Location,
        not_secrets: &[String],
    ) -> Option<Finding> {
        let decoded = percent_decode(raw);
        let folded = fold(&decoded);
        let mut views: Vec<(Cow<'_, [u8]>, Option<&'static str>)> =
            vec![(Cow::Borrowed(raw), None)];
        if decoded.as_ref() != raw {
            views.push((Cow::Owned(decoded.to_vec()), Some("percent-encoded")));
        }
        if folded.as_ref() != decoded.as_ref() {
            views.push((
                Cow::Owned(folded.to_vec()),
                Some("with zero-width or look-alike characters"),
            ));
        }
        // Folded as written too: `+` is a plus sign outside a form.
        if decoded.as_ref() != raw {
            if let Cow::Owned(folded) = fold(raw) {
                views.push((
                    Cow::Owned(folded),
                    Some("with zero-width or look-alike characters"),
                ));
            }
        }
        let mut inner = Vec::new();
        for (view, _) in &views {
            for decoded in base64_runs(view) {
                inner.push((Cow::Owned(decoded), Some("base64")));
            }
        }
        views.extend(inner);
        views.iter().find_map(|(view, encoding)| {
            self.find_in(view, not_secrets)
                .map(|(detector, form_encoding)| Finding {
                    detector,
                    location: location.clone(),
                    encoding: form_encoding.or(*encoding),
                })
        })
    }

    /// The first detector that matches `text`, and the encoding a known
    /// value was found in.
    fn find_in(
        &self,
        text: &[u8],
        not_secrets: &[String],
    ) -> Option<(String, Option<&'static str>)> {
        for known in self.known.iter() {
            for (form, encoding) in &known.forms {
                if contains(text, form) {
                    return Some((known.name.clone(), *encoding));
                }
            }
        }
        let formats = self.formats.as_deref()?;
        let real = |name: &str, regex: &regex::bytes::Regex| {
            regex.captures_iter(text).any(|captures| {
                let token = captures
                    .get(1)
                    .or_else(|| captures.get(0))
                    .map_or(&b""[..], |m| m.as_bytes());
                // The patterns match ASCII only.
                let token = std::str::from_utf8(token).unwrap_or_default();
                !is_example(token)
                    && is_valid(name, token)
                    && !not_secrets.iter().any(|other| other == token)
            })
        };
        // In order: the set's formats that matched, then the gated ones
        // whose gate lets them be searched.
        let matched = formats.set.matches(text);
        let each = matched
            .iter()
            .filter_map(|index| formats.each.get(index))
            .map(|(name, regex)| (*name, regex));
        let gated = formats
            .gated
            .iter()
            .filter(|(_, _, gate)| gate(text))
            .map(|(name, regex, _)| (*name, regex));
        each.chain(gated)
            .find(|(name, regex)| real(name, regex))
            .map(|(name, _)| (name.to_owned(), None))
    }
}

#[cfg(test)]
mod tests;
