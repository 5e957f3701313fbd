//! Host names as a way out: the labels a wildcard entry lets a program
//! choose (`a9f3…e1.logs.example.com` under `*.example.com`, every label
//! left of the registrable domain under `*`) can carry data to whoever
//! runs that domain's DNS, even through a tunnel never intercepted.
//!
//! Chosen labels look like encoded data when one of them is 32 characters
//! or more of hex, or of letters and digits with at least 4 bits of
//! entropy per character and either at least 15% digits (base32) or upper
//! and lower case together (base64, which host names never need), or when
//! the chosen labels together run past 100 characters.
//! Words, even long ones with a year or a short hash in them
//! (`github-production-release-asset-2e65be`), do not.

/// The part of `name` a program chose: left of `base` (a wildcard
/// pattern's domain), without the dot; `None` when nothing was chosen.
pub(crate) fn chosen<'a>(name: &'a str, base: &str) -> Option<&'a str> {
    let name = name.trim_end_matches('.');
    let rest = name.strip_suffix(base)?.strip_suffix('.')?;
    (!rest.is_empty()).then_some(rest)
}

/// Why the chosen labels look like encoded data, if they do.
pub(crate) fn looks_encoded(chosen: &str) -> Option<String> {
    let total: usize = chosen.split('.').map(str::len).sum();
    if total > 100 {
        return Some(format!("{total} characters of chosen labels"));
    }
    chosen.split('.').find_map(|label| {
        if label.len() < 32 {
            return None;
        }
        let lower = label.to_ascii_lowercase();
        if lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(format!("a label of {} hex digits", label.len()));
        }
        if !lower.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        let digits = lower.bytes().filter(u8::is_ascii_digit).count();
        // Host names are lower case; upper and lower together is base64.
        let mixed = label.bytes().any(|b| b.is_ascii_uppercase())
            && label.bytes().any(|b| b.is_ascii_lowercase());
        let entropy = entropy(label.as_bytes());
        ((mixed || digits * 100 >= label.len() * 15) && entropy >= 4.0).then(|| {
            format!(
                "a label of {} characters that reads as encoded data ({entropy:.1} bits per character)",
                label.len()
            )
        })
    })
}

/// Shannon entropy in bits per byte.
fn entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0usize; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let total = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let p = count as f64 / total;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_labels_are_told_from_words() {
        assert_eq!(chosen("a.b.example.com", "example.com"), Some("a.b"));
        assert_eq!(chosen("example.com", "example.com"), None);
        assert_eq!(chosen("evilexample.com", "example.com"), None);
        for encoded in [
            "6b657973656372657476616c75653132333435363738",
            "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpi2tkmzy",
            "dGhpcyBpcyBhIHNlY3JldCB2YWx1ZSBmcm9tIHRoZSBlbnY",
        ] {
            assert!(looks_encoded(encoded).is_some(), "{encoded}");
        }
        assert!(looks_encoded(&"abcd1.".repeat(25)).is_some(), "long chains");
        for ordinary in [
            "github-production-release-asset-2e65be",
            "objects",
            "my-company-build-artifacts-2024",
            "d111111abcdef8",
            "api.eu-west-1",
            "verylongservicenamewithoutanydigitsinit",
        ] {
            assert_eq!(looks_encoded(ordinary), None, "{ordinary}");
        }
    }
}
