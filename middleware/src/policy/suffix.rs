//! Whether a name is a public suffix: a name under which anyone can
//! register their own domain, judged by the Public Suffix List (the `psl`
//! crate embeds it, private section included: `github.io`,
//! `s3.amazonaws.com`, `workers.dev`, `vercel.app`, `ngrok.io` …). A
//! wildcard below such a name covers other people's domains, so the places
//! that judge breadth (persisted approval rules, credential hosts) refuse it.

/// Whether `name` (lower-case, no trailing dot) is a public suffix: `com`,
/// `co.uk`, `me.uk`, `k12.ca.us`, `github.io`, `herokuapp.com` … A
/// single label that is not on the list (`internal`, `localhost`) counts
/// too: the list's default rule makes every top-level label a suffix.
///
/// ```
/// use portcullis_middleware::policy::is_public_suffix;
/// assert!(is_public_suffix("github.io"));
/// assert!(is_public_suffix("co.uk"));
/// assert!(!is_public_suffix("example.github.io"));
/// assert!(!is_public_suffix("example.com"));
/// ```
pub fn is_public_suffix(name: &str) -> bool {
    match psl::suffix(name.as_bytes()) {
        Some(suffix) => suffix.as_bytes() == name.as_bytes(),
        // The list has no answer (an empty or malformed name): on the safe
        // side, it is as broad as a suffix.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::is_public_suffix;

    #[test]
    fn the_private_section_counts() {
        for suffix in [
            "com",
            "co.uk",
            "me.uk",
            "k12.ca.us",
            "github.io",
            "s3.amazonaws.com",
            "herokuapp.com",
            "workers.dev",
            "vercel.app",
            "ngrok.io",
            "internal",
            "x.ck",
        ] {
            assert!(is_public_suffix(suffix), "{suffix}");
        }
        for domain in [
            "example.com",
            "example.co.uk",
            "me.github.io",
            "bucket.s3.amazonaws.com",
            "app.internal",
        ] {
            assert!(!is_public_suffix(domain), "{domain}");
        }
    }
}
