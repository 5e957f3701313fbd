//! Paths: normalisation (what a path means to the strictest origin) and
//! the globs rules match it with.

use std::borrow::Cow;
use std::fmt;

use super::RuleError;

/// One segment of a path glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: any number of segments, none included.
    Any,
}

/// A glob on the normalised path: `/repos/*/issues/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    pub(super) segments: Vec<Segment>,
    pub(super) text: String,
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
    pub(super) fn matches(&self, path: &[Cow<'_, str>], ignore_case: bool) -> bool {
        matches(&self.segments, path, ignore_case)
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

pub(super) fn matches(glob: &[Segment], path: &[Cow<'_, str>], ignore_case: bool) -> bool {
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
pub(super) fn percent_decode_strict(text: &str) -> Result<String, &'static str> {
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
