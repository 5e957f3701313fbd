//! The views of a field a secret may hide in: percent-decoded, without
//! zero-width characters, base64 runs decoded, JSON strings unescaped; and
//! the encoded forms of a known value.

use std::borrow::Cow;

use base64::Engine;

/// Every form `value` takes once encoded: raw; base64 standard and
/// URL-safe, at each of the three alignments (only the characters the
/// value alone decides, so it is found inside a longer encoded text,
/// padded or not); hex in both cases.
pub(super) fn encodings(value: &[u8]) -> Vec<(Vec<u8>, Option<&'static str>)> {
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
pub(super) fn percent_decode(raw: &[u8]) -> Cow<'_, [u8]> {
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

/// Folded for the eye: default-ignorable characters (zero-width spaces and
/// joiners, U+FEFF, soft hyphens…) dropped, and every other non-ASCII
/// character that stands for an ASCII one replaced by it — by
/// compatibility (NFKC: fullwidth `ｇｈｐ`, mathematical `𝐠𝐡𝐩`) or, failing
/// that, by its confusable prototype (UTS #39: Cyrillic `а`, Greek `ο`).
/// A character with no ASCII stand-in stays; ASCII is never changed, so
/// tokens keep their digits. Text that is all ASCII comes back borrowed.
pub(super) fn fold(text: &[u8]) -> Cow<'_, [u8]> {
    use unicode_normalization::UnicodeNormalization;
    if text.is_ascii() {
        return Cow::Borrowed(text);
    }
    let text = String::from_utf8_lossy(text);
    let mut out = String::with_capacity(text.len());
    let mut buffer = [0u8; 4];
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        let one: &str = c.encode_utf8(&mut buffer);
        let compatible: String = one.nfkc().collect();
        if compatible.is_ascii() {
            out.push_str(&compatible);
            continue;
        }
        let prototype: String = unicode_security::skeleton(one).collect();
        if prototype.is_ascii() {
            // Empty for a default-ignorable character: dropped.
            out.push_str(&prototype);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out.into_bytes())
}

/// The decoded bytes of every run of base64 (standard or URL-safe) of 16
/// characters or more in `text`.
pub(super) fn base64_runs(text: &[u8]) -> Vec<Vec<u8>> {
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
pub(super) fn json_strings(body: &[u8]) -> Vec<String> {
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
pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack.len() >= needle.len()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
