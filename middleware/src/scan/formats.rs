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
];

/// Documentation examples that have a token's shape and are not secrets.
const EXAMPLES: &[&str] = &["AKIAIOSFODNN7EXAMPLE", "ASIAIOSFODNN7EXAMPLE"];

/// A documentation example or a placeholder: `…EXAMPLE`, or one character
/// repeated after the prefix (`ghp_xxxx…`).
pub(super) fn is_example(token: &str) -> bool {
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
