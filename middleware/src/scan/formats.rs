//! The built-in token formats, and what only looks like one.

/// A token format: a name, and a pattern whose first group (or the whole
/// match) is the token.
pub(super) struct Format {
    pub(super) name: &'static str,
    pub(super) pattern: &'static str,
}

/// The built-in token formats (after gitleaks' rules; see the module docs).
pub(super) const FORMATS: &[Format] = &[
    Format {
        name: "aws_access_key_id",
        pattern: r"(?-u:\b)((?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16})(?-u:\b)",
    },
    Format {
        name: "github_token",
        pattern: r"(?-u:\b)((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36})(?-u:\b)",
    },
    Format {
        name: "github_fine_grained_token",
        pattern: r"(?-u:\b)(github_pat_[A-Za-z0-9_]{82})(?-u:\b)",
    },
    Format {
        name: "gitlab_token",
        pattern: r"(?-u:\b)(glpat-[A-Za-z0-9_\-]{20})(?-u:\b)",
    },
    Format {
        name: "slack_token",
        pattern: r"(?-u:\b)(xox[baprs]-[0-9A-Za-z\-]{10,})(?-u:\b)",
    },
    Format {
        name: "stripe_secret_key",
        pattern: r"(?-u:\b)((?:sk|rk)_live_[0-9A-Za-z]{24,})(?-u:\b)",
    },
    Format {
        name: "anthropic_api_key",
        pattern: r"(?-u:\b)(sk-ant-[A-Za-z0-9_\-]{32,})",
    },
    Format {
        name: "openai_api_key",
        pattern: r"(?-u:\b)(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,})",
    },
    Format {
        name: "google_api_key",
        pattern: r"(?-u:\b)(AIza[0-9A-Za-z_\-]{35})(?-u:\b)",
    },
    Format {
        name: "npm_token",
        pattern: r"(?-u:\b)(npm_[A-Za-z0-9]{36})(?-u:\b)",
    },
    Format {
        name: "pypi_token",
        pattern: r"(?-u:\b)(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,})",
    },
    Format {
        name: "jwt",
        pattern: r"(?-u:\b)(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,})",
    },
    Format {
        name: "private_key",
        pattern: r"(-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----)",
    },
    // Card numbers (Visa, Mastercard, Discover: 16 digits; Amex: 15), in
    // groups or not; kept only when the Luhn check passes.
    Format {
        name: "payment_card",
        pattern: r"(?-u:\b)((?:4[0-9]{3}|5[1-5][0-9]{2}|2[2-7][0-9]{2}|6(?:011|5[0-9]{2}))(?:[ -]?[0-9]{4}){3}|3[47][0-9]{2}[ -]?[0-9]{6}[ -]?[0-9]{5})(?-u:\b)",
    },
    // IBANs, in groups of four or not; kept only when mod 97 is 1.
    Format {
        name: "iban",
        pattern: r"(?-u:\b)([A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)(?-u:\b)",
    },
];

/// A test of a text for where a format could match.
pub(super) type Gate = fn(&[u8]) -> bool;

/// The gate of a format searched only where a cheap test finds a
/// candidate.
pub(super) fn gate(name: &str) -> Option<Gate> {
    match name {
        "payment_card" => Some(digit_run),
        "iban" => Some(country_and_check_digits),
        _ => None,
    }
}

/// Whether any of 8 bytes is an ASCII digit (one test for the word:
/// "has between" from Bit Twiddling Hacks, bytes strictly between `/`
/// and `:`).
fn has_digit(word: u64) -> bool {
    const ONES: u64 = u64::MAX / 255;
    const LOW: u64 = ONES * 127;
    const HIGH: u64 = ONES * 128;
    let (m, n) = (u64::from(b'/'), u64::from(b':'));
    (ONES.wrapping_mul(127 + n).wrapping_sub(word & LOW)
        & !word
        & (word & LOW).wrapping_add(ONES.wrapping_mul(127 - m))
        & HIGH)
        != 0
}

/// The 8-byte pieces of `text` that hold a digit, as ranges (the tail
/// shorter than 8 bytes always).
fn pieces_with_digits(text: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let chunks = text.chunks_exact(8);
    let tail = chunks.remainder().len();
    let whole = text.len() - tail;
    chunks
        .enumerate()
        .filter(|(_, chunk)| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            has_digit(u64::from_le_bytes(word))
        })
        .map(|(index, _)| index * 8..index * 8 + 8)
        .chain((tail > 0).then_some(whole..text.len()))
}

/// 13 digits or more with at most one space or hyphen between any two:
/// where a card number could be (the shortest, Amex, has 15). Eight bytes
/// without a digit end any run, so only the pieces with one are read.
fn digit_run(text: &[u8]) -> bool {
    let mut digits = 0;
    let mut after_separator = false;
    let mut next = 0;
    for piece in pieces_with_digits(text) {
        if piece.start != next {
            digits = 0;
            after_separator = false;
        }
        next = piece.end;
        for &byte in text.get(piece).unwrap_or_default() {
            if byte.is_ascii_digit() {
                digits += 1;
                if digits >= 13 {
                    return true;
                }
                after_separator = false;
            } else if (byte == b' ' || byte == b'-') && digits > 0 && !after_separator {
                after_separator = true;
            } else {
                digits = 0;
                after_separator = false;
            }
        }
    }
    false
}

/// Two capital letters, then two digits: where an IBAN could begin. Only
/// the pieces with a digit are read, from two bytes before each to one
/// after.
fn country_and_check_digits(text: &[u8]) -> bool {
    pieces_with_digits(text).any(|piece| {
        let from = piece.start.saturating_sub(2);
        let to = (piece.end + 1).min(text.len());
        let (mut capitals, mut digits) = (0, 0);
        text.get(from..to).unwrap_or_default().iter().any(|&byte| {
            if byte.is_ascii_uppercase() {
                // A capital after a digit starts a new run.
                capitals = if digits > 0 { 1 } else { capitals + 1 };
                digits = 0;
            } else if byte.is_ascii_digit() && capitals >= 2 {
                digits += 1;
            } else {
                capitals = 0;
                digits = 0;
            }
            digits == 2
        })
    })
}

/// Whether a token of format `name` passes the format's checksum (payment
/// cards: Luhn; IBANs: mod 97); formats without one always do.
pub(super) fn is_valid(name: &str, token: &str) -> bool {
    let compact: String = token.chars().filter(|c| *c != ' ' && *c != '-').collect();
    match name {
        "payment_card" => luhn(&compact),
        "iban" => iban_mod97(&compact),
        _ => true,
    }
}

/// The Luhn check of a string of digits.
fn luhn(digits: &str) -> bool {
    let mut sum = 0u32;
    for (index, c) in digits.chars().rev().enumerate() {
        let Some(mut digit) = c.to_digit(10) else {
            return false;
        };
        if index % 2 == 1 {
            digit *= 2;
            if digit > 9 {
                digit -= 9;
            }
        }
        sum += digit;
    }
    !digits.is_empty() && sum % 10 == 0
}

/// ISO 13616: the first four characters moved to the end, letters as
/// 10–35, the number mod 97 is 1.
fn iban_mod97(iban: &str) -> bool {
    if !(15..=34).contains(&iban.len()) {
        return false;
    }
    let (head, tail) = iban.split_at(4);
    let mut remainder = 0u32;
    for c in tail.chars().chain(head.chars()) {
        let Some(value) = c.to_digit(36) else {
            return false;
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

/// Documentation examples that have a token's shape and are not secrets.
const EXAMPLES: &[&str] = &[
    "AKIAIOSFODNN7EXAMPLE",
    "ASIAIOSFODNN7EXAMPLE",
    // Payment processors' published test cards.
    "4111111111111111",
    "4242424242424242",
    "4012888888881881",
    "5555555555554444",
    "5105105105105100",
    "378282246310005",
    "371449635398431",
    "6011111111111117",
    // The IBANs of standards and documentation.
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "GB29NWBK60161331926819",
];

/// A documentation example or a placeholder: `…EXAMPLE`, or one character
/// repeated after the prefix (`ghp_xxxx…`).
pub(super) fn is_example(token: &str) -> bool {
    let compact: String = token.chars().filter(|c| *c != ' ' && *c != '-').collect();
    if EXAMPLES.contains(&compact.as_str()) || token.ends_with("EXAMPLE") {
        return true;
    }
    let tail = token.rsplit(['_', '-']).next().unwrap_or(token);
    let mut chars = tail.chars();
    match chars.next() {
        Some(first) => tail.len() >= 8 && chars.all(|c| c == first),
        None => false,
    }
}
