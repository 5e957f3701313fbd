//! Secret scanning: what a request carries that must not leave, found in
//! the request *as the program sent it* — its path, its query and every
//! header (bodies and WebSocket frames are not read yet).
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
//! space), and with zero-width characters removed (U+200B–U+200D, U+2060,
//! U+FEFF), and every run of base64 of 16 characters or more is decoded and
//! searched again (a token inside `Authorization: Basic …`). A finding
//! names the detector and where it was found, never the value.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use http::Request;

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
}

/// The largest body inspected unless [`ScanPolicy::max_body`] says.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

impl PartialEq for ScanPolicy {
    fn eq(&self, other: &ScanPolicy) -> bool {
        self.scanner == other.scanner
            && self.action == other.action
            && self.skip_hosts.patterns() == other.skip_hosts.patterns()
            && self.max_body == other.max_body
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

    /// Whether `target` is scanned at all.
    pub fn covers(&self, target: &crate::target::Target) -> bool {
        if self.action == ScanAction::Off {
            return false;
        }
        match target {
            crate::target::Target::Host { host, port } => {
                self.skip_hosts.find(host, *port).is_none()
            }
            _ => true,
        }
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
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path => f.write_str("the URL path"),
            Location::Query => f.write_str("the query string"),
            Location::Header(name) => write!(f, "the {name} header"),
            Location::Body => f.write_str("the body"),
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

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.detector, self.location)?;
        if let Some(encoding) = self.encoding {
            write!(f, " ({encoding})")?;
        }
        Ok(())
    }
}

/// A token format: a name, and a pattern whose first group (or the whole
/// match) is the token.
struct Format {
    name: &'static str,
    pattern: &'static str,
}

/// The built-in token formats (after gitleaks' rules; see the module docs).
const FORMATS: &[Format] = &[
    Format {
        name: "aws_access_key_id",
        pattern: r"\b((?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16})\b",
    },
    Format {
        name: "github_token",
        pattern: r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36})\b",
    },
    Format {
        name: "github_fine_grained_token",
        pattern: r"\b(github_pat_[A-Za-z0-9_]{82})\b",
    },
    Format {
        name: "gitlab_token",
        pattern: r"\b(glpat-[A-Za-z0-9_\-]{20})\b",
    },
    Format {
        name: "slack_token",
        pattern: r"\b(xox[baprs]-[0-9A-Za-z\-]{10,})\b",
    },
    Format {
        name: "stripe_secret_key",
        pattern: r"\b((?:sk|rk)_live_[0-9A-Za-z]{24,})\b",
    },
    Format {
        name: "anthropic_api_key",
        pattern: r"\b(sk-ant-[A-Za-z0-9_\-]{32,})",
    },
    Format {
        name: "openai_api_key",
        pattern: r"\b(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,})",
    },
    Format {
        name: "google_api_key",
        pattern: r"\b(AIza[0-9A-Za-z_\-]{35})\b",
    },
    Format {
        name: "npm_token",
        pattern: r"\b(npm_[A-Za-z0-9]{36})\b",
    },
    Format {
        name: "pypi_token",
        pattern: r"\b(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,})",
    },
    Format {
        name: "jwt",
        pattern: r"\b(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,})",
    },
    Format {
        name: "private_key",
        pattern: r"(-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----)",
    },
];

/// Documentation examples that have a token's shape and are not secrets.
const EXAMPLES: &[&str] = &["AKIAIOSFODNN7EXAMPLE", "ASIAIOSFODNN7EXAMPLE"];

/// A secret the proxy knows, and the forms it takes once encoded.
#[derive(Clone)]
struct Known {
    name: String,
    /// (form, encoding) — the raw value first.
    forms: Vec<(Vec<u8>, Option<&'static str>)>,
}

/// The token formats compiled: one set to find which match, and each
/// pattern by name to find where.
type Formats = (regex::RegexSet, Vec<(&'static str, regex::Regex)>);

/// Finds secrets in requests; see the [module docs](self). Cheap to clone.
#[derive(Clone, Default)]
pub struct Scanner {
    formats: Option<Arc<Formats>>,
    known: Arc<Vec<Known>>,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("formats", &self.formats.as_ref().map_or(0, |f| f.1.len()))
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
        self.formats.is_some() == other.formats.is_some()
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
                regex::Regex::new(format.pattern)
                    .ok()
                    .map(|regex| (format.name, regex))
            })
            .collect::<Vec<_>>();
        let set = regex::RegexSet::new(built.iter().map(|(_, regex)| regex.as_str()));
        Scanner {
            formats: set.ok().map(|set| Arc::new((set, built))),
            known: Arc::default(),
        }
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
        let mut known = (*self.known).clone();
        known.push(Known {
            name: format!("known:{name}"),
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

    /// The first secret in a request body (its `Content-Encoding` already
    /// undone): as a field, and, when it is JSON or NDJSON, in every string
    /// it holds with its escapes (`\u0067`) undone.
    pub fn scan_body(&self, body: &[u8], not_secrets: &[String]) -> Option<Finding> {
        if let Some(found) = self.scan_field_except(body, Location::Body, not_secrets) {
            return Some(found);
        }
        let strings = json_strings(body);
        if strings.is_empty() {
            return None;
        }
        self.scan_field_except(strings.join("\n").as_bytes(), Location::Body, not_secrets)
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
                Some("with zero-width characters"),
            ));
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
        let (set, formats) = self.formats.as_deref()?;
        let text = String::from_utf8_lossy(text);
        for index in set.matches(&text).iter() {
            let (name, regex) = formats.get(index)?;
            let real = regex.captures_iter(&text).any(|captures| {
                let token = captures
                    .get(1)
                    .or_else(|| captures.get(0))
                    .map_or("", |m| m.as_str());
                !is_example(token) && !not_secrets.iter().any(|other| other == token)
            });
            if real {
                return Some(((*name).to_owned(), None));
            }
        }
        None
    }
}

/// A documentation example or a placeholder: `…EXAMPLE`, or one character
/// repeated after the prefix (`ghp_xxxx…`).
fn is_example(token: &str) -> bool {
    if EXAMPLES.contains(&token) || token.ends_with("EXAMPLE") {
        return true;
    }
    let tail = token.rsplit(['_', '-']).next().unwrap_or(token);
    let mut chars = tail.chars();
    match chars.next() {
        Some(first) => tail.len() >= 8 && chars.all(|c| c == first),
        None => false,
    }
}

/// Every form `value` takes once encoded: raw; base64 standard and
/// URL-safe, at each of the three alignments (only the characters the
/// value alone decides, so it is found inside a longer encoded text,
/// padded or not); hex in both cases.
fn encodings(value: &[u8]) -> Vec<(Vec<u8>, Option<&'static str>)> {
    let mut forms = vec![(value.to_vec(), None)];
    for offset in 0..3usize {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(value);
        let encoded = base64::engine::general_purpose::STANDARD.encode(&padded);
        // The groups holding a prefix byte, and the last partial group,
        // depend on bytes other than the value's.
        let start = offset.div_ceil(3) * 4;
        let end = (padded.len() / 3) * 4;
        if let Some(core) = encoded.get(start..end).filter(|core| core.len() >= 8) {
            let url: String = core
                .chars()
                .map(|c| match c {
                    '+' => '-',
                    '/' => '_',
                    c => c,
                })
                .collect();
            forms.push((core.as_bytes().to_vec(), Some("base64")));
            if url != core {
                forms.push((url.into_bytes(), Some("base64url")));
            }
        }
    }
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    forms.push((hex.to_ascii_uppercase().into_bytes(), Some("hex")));
    forms.push((hex.into_bytes(), Some("hex")));
    forms.dedup();
    forms
}

/// Percent-decoded once (`+` as a space); invalid escapes kept as written.
fn percent_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let escaped = raw
            .get(index + 1..index + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (raw[index], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                index += 1;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// Without zero-width characters (U+200B–U+200D, U+2060, U+FEFF), which
/// split a token for the eye and for a pattern.
fn fold(text: &[u8]) -> Cow<'_, [u8]> {
    const ZERO_WIDTH: [&[u8]; 5] = [
        "\u{200B}".as_bytes(),
        "\u{200C}".as_bytes(),
        "\u{200D}".as_bytes(),
        "\u{2060}".as_bytes(),
        "\u{FEFF}".as_bytes(),
    ];
    if !ZERO_WIDTH.iter().any(|mark| contains(text, mark)) {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len());
    let mut index = 0;
    'outer: while index < text.len() {
        for mark in ZERO_WIDTH {
            if text.get(index..index + mark.len()) == Some(mark) {
                index += mark.len();
                continue 'outer;
            }
        }
        out.push(text[index]);
        index += 1;
    }
    Cow::Owned(out)
}

/// The decoded bytes of every run of base64 (standard or URL-safe) of 16
/// characters or more in `text`.
fn base64_runs(text: &[u8]) -> Vec<Vec<u8>> {
    use base64::alphabet;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    // A run cut out of text: unpadded, its last bits not canonical.
    const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
    const URL_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_');
    let mut found = Vec::new();
    let mut start = None;
    for (index, &byte) in text.iter().chain(std::iter::once(&b' ')).enumerate() {
        match (is_b64(byte), start) {
            (true, None) => start = Some(index),
            (false, Some(from)) => {
                start = None;
                let run = text.get(from..index).unwrap_or_default();
                if run.len() < 16 {
                    continue;
                }
                let url = run.iter().any(|&b| b == b'-' || b == b'_');
                // One character past a whole group encodes no byte.
                let whole = if run.len() % 4 == 1 {
                    run.get(..run.len() - 1).unwrap_or_default()
                } else {
                    run
                };
                let engine = if url { &URL_LENIENT } else { &STANDARD_LENIENT };
                if let Ok(decoded) = engine.decode(whole) {
                    found.push(decoded);
                }
            }
            _ => {}
        }
    }
    found
}

/// Every string (keys too) of a JSON document, or of each line of NDJSON,
/// unescaped; empty when the body is neither.
fn json_strings(body: &[u8]) -> Vec<String> {
    fn collect(value: &serde_json::Value, into: &mut Vec<String>) {
        match value {
            serde_json::Value::String(text) => into.push(text.clone()),
            serde_json::Value::Array(items) => items.iter().for_each(|item| collect(item, into)),
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    into.push(key.clone());
                    collect(item, into);
                }
            }
            _ => {}
        }
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{' | b'[' | b'"')) {
        return Vec::new();
    }
    let mut strings = Vec::new();
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => collect(&value, &mut strings),
        Err(_) => {
            for line in body.split(|&b| b == b'\n') {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) {
                    collect(&value, &mut strings);
                }
            }
        }
    }
    strings
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack.len() >= needle.len()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(uri: &str, headers: &[(&str, &str)], scanner: &Scanner) -> Option<Finding> {
        let mut request = Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        scanner.scan_request(&request.body(()).unwrap_or_else(|e| panic!("{e}")))
    }

    const GITHUB: &str = "ghp_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234";

    #[test]
    fn token_formats_are_found_in_path_query_and_headers_and_named() {
        let scanner = Scanner::builtin();
        let found = scan(&format!("http://x.test/?t={GITHUB}"), &[], &scanner);
        assert_eq!(
            found.map(|f| (f.detector, f.location)),
            Some(("github_token".into(), Location::Query))
        );
        let found = scan(&format!("http://x.test/a/{GITHUB}/b"), &[], &scanner);
        assert_eq!(found.map(|f| f.location), Some(Location::Path));
        let found = scan(
            "http://x.test/",
            &[("x-key", "AKIAZ7QWERTY2345ABCD")],
            &scanner,
        );
        assert_eq!(
            found.map(|f| (f.detector, f.location)),
            Some(("aws_access_key_id".into(), Location::Header("x-key".into())))
        );
        // Inside Basic credentials: base64 decoded and searched.
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("me:{GITHUB}"));
        let found = scan(
            "http://x.test/",
            &[("authorization", &format!("Basic {basic}"))],
            &scanner,
        );
        assert_eq!(found.map(|f| f.encoding), Some(Some("base64")));
        // Split by zero-width characters.
        let split = "ghp_R2d2C3po%E2%80%8BR2d2C3poR2d2C3poR2d2C3po1234";
        assert!(scan(&format!("http://x.test/?t={split}"), &[], &scanner).is_some());
    }

    #[test]
    fn documentation_examples_and_ordinary_text_pass() {
        let scanner = Scanner::builtin();
        for uri in [
            "http://x.test/?key=AKIAIOSFODNN7EXAMPLE",
            "http://x.test/items/8c6f1f0e-6a0f-4b8e-9a39-3b0f3c1d2e4f",
            "http://x.test/?token=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "http://x.test/search?q=AWS_SECRET_ACCESS_KEY+and+GITHUB_TOKEN",
            "http://x.test/img?data=iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg",
        ] {
            assert_eq!(scan(uri, &[("user-agent", "curl/8.5.0")], &scanner), None, "{uri}");
        }
    }

    #[test]
    fn a_known_value_is_found_raw_and_in_every_encoding() {
        let mut scanner = Scanner::none();
        let secret = "s3cr3t-Value/with+chars=";
        assert!(scanner.known_value("API_SECRET", secret));
        assert!(!scanner.known_value("SHORT", "abc"));
        let named = |found: Option<Finding>| found.map(|f| f.detector);
        assert_eq!(
            named(scan(&format!("http://x.test/?v={secret}"), &[], &scanner)),
            Some("known:API_SECRET".into())
        );
        let percent: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
        assert!(scan(&format!("http://x.test/?v={percent}"), &[], &scanner).is_some());
        for prefix in ["", "a", "ab", "abc"] {
            let text = format!("{prefix}{secret}");
            for engine in [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                let encoded = engine.encode(text.as_bytes());
                let found = scan("http://x.test/", &[("x-data", &encoded)], &scanner);
                assert!(found.is_some(), "{prefix:?} {encoded}");
            }
        }
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            scan(&format!("http://x.test/{hex}"), &[], &scanner).map(|f| f.encoding),
            Some(Some("hex"))
        );
        assert_eq!(scan("http://x.test/?v=s3cr3t", &[], &scanner), None);
    }
}
