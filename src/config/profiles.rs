//! `[profiles.NAME]` and `[[auth.users]]`: one `serve`, a policy per caller.
//!
//! ```toml
//! [[auth.users]]
//! name = "ci"
//! profile = "builds"
//! password = { file = "/run/secrets/ci-proxy" }   # or env = "…", command = [...]
//!
//! [profiles.builds]
//! network.allowed_domains = ["**.crates.io"]
//! [[profiles.builds.rate_limits]]
//! host = "**.crates.io"
//! requests_per_second = 50
//!
//! [profiles.agent]
//! extends = "builds"                 # its lists, rules and limits, and more
//! sources = ["10.42.0.0/16"]         # callers from here that give no user
//! network.mode = "limited"
//! ```
//!
//! A profile is the top-level policy with more added: its `network`
//! lists add to the top-level ones (and to its base's, with `extends`),
//! its `[[rules]]` add blocks (each only narrows), its `[[credentials]]`
//! add secrets, its `[[rate_limits]]` add limits (an entry for a pattern
//! already limited replaces that entry for this profile). Deny always wins,
//! so nothing a profile adds can reach a host its base denies. `mode` and
//! `approval` can only narrow (`limited` under `full`, `deny` under an
//! approver). Each profile has its own stack: its own approvals, rate
//! buckets and credentials.
//!
//! The caller picks nothing: its proxy user's `profile`, else the
//! profile whose `sources` hold its address (the longest prefix), else
//! `auth.unmatched`: `refuse` (the default once profiles exist:
//! `auth_required`, a 407) or `default` (the top-level policy).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use portcullis_middleware::pattern::IpNetwork;
use portcullis_middleware::profiles::ProfileSelector;
use portcullis_middleware::{Mode, Pattern};

use super::{
    ApprovalMode, Config, ConfigError, CredentialConfig, RateLimitConfig, RuleConfig, SourceConfig,
};

/// One `[profiles.NAME]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Another profile this one adds to (else the top-level policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Client address ranges (`10.0.0.0/8`, `fd00::/8`, an address) whose
    /// callers get this profile when they give no known user.
    pub sources: Vec<String>,
    /// The lists and mode it adds.
    pub network: ProfileNetwork,
    /// `[[profiles.NAME.rules]]`: request rule blocks it adds.
    pub rules: Vec<RuleConfig>,
    /// `[[profiles.NAME.credentials]]`: secrets it adds.
    pub credentials: Vec<CredentialConfig>,
    /// `[[profiles.NAME.rate_limits]]`: limits it adds or replaces.
    pub rate_limits: Vec<RateLimitConfig>,
    /// `deny`: never ask an approver for this profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalMode>,
    /// `[profiles.NAME.upstream]`: its own upstream proxy, in place of
    /// the top-level `[upstream]` (its keys; no `url`: the environment's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<super::UpstreamConfig>,
}

/// `[profiles.NAME.network]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileNetwork {
    /// Added to the allowlist.
    pub allowed_domains: Vec<Pattern>,
    /// Added to the denylist.
    pub denied_domains: Vec<Pattern>,
    /// `limited` narrows a `full` base; `full` under a `limited` base is
    /// an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Local and private addresses for allowlisted hosts, for this profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_local_binding: Option<bool>,
}

/// One `[[auth.users]]` entry: a proxy user, its password and its profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The username (1 to 255 bytes, no `:`).
    pub name: String,
    /// Where its password comes from: exactly one of `env`, `file`,
    /// `command` (never inline).
    #[serde(deserialize_with = "password_source")]
    pub password: SourceConfig,
    /// The profile it gets (absent: the top-level policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// `auth.unmatched`: what a caller given no profile gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Refused, `auth_required` (a 407).
    #[default]
    Refuse,
    /// The top-level policy.
    Default,
}

impl Config {
    /// Whether the file defines profiles.
    pub fn has_profiles(&self) -> bool {
        !self.profiles.is_empty()
    }

    /// The configuration as profile `name` sees it: the top-level policy
    /// with each profile of its `extends` chain added, base first, and no
    /// profiles of its own. `check --profile`, `run --profile` and each
    /// profile's stack under `serve` are built from it. An error names
    /// `profiles.NAME.KEY`.
    pub fn for_profile(&self, name: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            key,
            origin: origin.to_owned(),
            message,
        };
        if !self.profiles.contains_key(name) {
            let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            return Err(invalid(
                format!("profiles.{name}"),
                if known.is_empty() {
                    "no profile is defined: add a [profiles.NAME] table".to_owned()
                } else {
                    format!("no such profile; the profiles are {}", known.join(", "))
                },
            ));
        }
        // The chain, leaf first; a loop or a missing base is an error.
        let mut chain: Vec<(&str, &ProfileConfig)> = Vec::new();
        let mut next = Some(name);
        while let Some(current) = next {
            if chain.iter().any(|(seen, _)| *seen == current) {
                return Err(invalid(
                    format!("profiles.{}.extends", chain.last().map_or(name, |c| c.0)),
                    format!("extends goes round in a loop back to {current:?}"),
                ));
            }
            let profile = self.profiles.get(current).ok_or_else(|| {
                invalid(
                    format!("profiles.{}.extends", chain.last().map_or(name, |c| c.0)),
                    format!("no profile is named {current:?}"),
                )
            })?;
            chain.push((current, profile));
            next = profile.extends.as_deref();
        }
        let mut config = self.clone();
        config.profiles.clear();
        for (profile_name, profile) in chain.into_iter().rev() {
            let key = |rest: &str| format!("profiles.{profile_name}.{rest}");
            let network = &mut config.network;
            network
                .allowed_domains
                .extend(profile.network.allowed_domains.iter().cloned());
            network
                .denied_domains
                .extend(profile.network.denied_domains.iter().cloned());
            match (profile.network.mode, network.mode) {
                (Some(Mode::Full), Mode::Limited) => {
                    return Err(invalid(
                        key("network.mode"),
                        "a profile can only narrow: its base is limited, so it cannot be full"
                            .into(),
                    ))
                }
                (Some(mode), _) => network.mode = mode,
                (None, _) => {}
            }
            if let Some(local) = profile.network.allow_local_binding {
                network.allow_local_binding = local;
            }
            config.rules.extend(profile.rules.iter().cloned());
            for credential in &profile.credentials {
                if config.credentials.iter().any(|c| c.name == credential.name) {
                    return Err(invalid(
                        key("credentials"),
                        format!(
                            "a credential named {:?} is already defined for this profile; give it another name",
                            credential.name
                        ),
                    ));
                }
                config.credentials.push(credential.clone());
            }
            for limit in &profile.rate_limits {
                config.rate_limits.retain(|l| l.host != limit.host);
                config.rate_limits.push(limit.clone());
            }
            if let Some(upstream) = &profile.upstream {
                config.upstream = upstream.clone();
            }
            match profile.approval {
                Some(ApprovalMode::Deny) => config.approval.mode = ApprovalMode::Deny,
                Some(mode) if mode != config.approval.mode => {
                    return Err(invalid(
                        key("approval"),
                        format!(
                            "a profile can only turn asking off (\"deny\"); the approver is [approval] mode = \"{}\" for every profile",
                            format!("{:?}", config.approval.mode).to_lowercase()
                        ),
                    ))
                }
                _ => {}
            }
        }
        // Each profile's own keys are checked where they are written, so
        // an error names the profile.
        config.policy(origin).map_err(|error| match error {
            ConfigError::Invalid {
                key,
                origin,
                message,
            } => ConfigError::Invalid {
                key: format!("profiles.{name} (as built): {key}"),
                origin,
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Every profile, as [`for_profile`](Config::for_profile) builds it,
    /// and the selector of callers: a profile that cannot be built, a user
    /// naming no profile or a bad range is an error naming the key.
    pub fn profiles(
        &self,
        origin: &str,
    ) -> Result<(BTreeMap<String, Config>, ProfileSelector), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            key,
            origin: origin.to_owned(),
            message,
        };
        let mut built = BTreeMap::new();
        let mut selector = ProfileSelector::new();
        let mut seen_ranges: std::collections::HashMap<IpNetwork, &str> = Default::default();
        for (name, profile) in &self.profiles {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    format!("profiles.{name:?}"),
                    "a profile's name is ASCII letters, digits, - and _".into(),
                ));
            }
            built.insert(name.clone(), self.for_profile(name, origin)?);
            for (index, text) in profile.sources.iter().enumerate() {
                let network: IpNetwork = text.parse().map_err(|_| {
                    invalid(
                        format!("profiles.{name}.sources[{index}]"),
                        format!("{text:?} is not an address range (10.0.0.0/8, fd00::/8, or an address)"),
                    )
                })?;
                if let Some(other) = seen_ranges.insert(network, name) {
                    return Err(invalid(
                        format!("profiles.{name}.sources[{index}]"),
                        format!("{network} is already a source of profile {other:?}"),
                    ));
                }
                selector.source(network, name);
            }
        }
        for (index, user) in self.auth.users.iter().enumerate() {
            if let Some(profile) = &user.profile {
                if !self.profiles.contains_key(profile) {
                    return Err(invalid(
                        format!("auth.users[{index}].profile"),
                        format!("no profile is named {profile:?}"),
                    ));
                }
                selector.user(user.name.clone(), profile);
            }
        }
        Ok((built, selector))
    }
}

/// A user's password source; a string is refused with the fix (a
/// password written in the file would be read by everyone who can read
/// the file, and be copied with it).
fn password_source<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SourceConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Source(SourceConfig),
        Inline(#[allow(dead_code)] String),
        Other(#[allow(dead_code)] serde::de::IgnoredAny),
    }
    match Written::deserialize(deserializer)? {
        Written::Source(source) => Ok(source),
        Written::Inline(_) => Err(serde::de::Error::custom(
            "is never written inline: password = { file = \"…\" } (or env = \"VAR\", command = [\"prog\", …])",
        )),
        Written::Other(_) => Err(serde::de::Error::custom(
            "must be a table with one of file, env or command: password = { file = \"…\" }",
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_profile_adds_to_its_base_and_replaces_only_a_limit_of_the_same_pattern() {
        let config = Config::from_toml(
            r#"
[network]
allowed_domains = ["top.test"]
denied_domains = ["bad.test"]
[[rate_limits]]
host = "top.test"
requests_per_second = 1
[[rate_limits]]
host = "kept.test"
requests_per_second = 3
[profiles.base]
network.allowed_domains = ["base.test"]
network.mode = "limited"
[profiles.child]
extends = "base"
network.allowed_domains = ["child.test"]
network.denied_domains = ["worse.test"]
[[profiles.child.rate_limits]]
host = "top.test"
requests_per_second = 9
"#,
        )
        .unwrap();
        let child = config.for_profile("child", "test").unwrap();
        let allowed: Vec<String> = child
            .network
            .allowed_domains
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(allowed, ["top.test", "base.test", "child.test"]);
        assert_eq!(child.network.denied_domains.len(), 2);
        assert_eq!(child.network.mode, Mode::Limited, "inherited");
        let limits: Vec<(String, Option<f64>)> = child
            .rate_limits
            .iter()
            .map(|l| (l.host.clone(), l.requests_per_second))
            .collect();
        assert_eq!(
            limits,
            [
                ("kept.test".to_owned(), Some(3.0)),
                ("top.test".to_owned(), Some(9.0))
            ]
        );
        assert!(child.profiles.is_empty());
        // The base is unchanged by its child.
        let base = config.for_profile("base", "test").unwrap();
        assert_eq!(base.network.allowed_domains.len(), 2);
        assert_eq!(base.rate_limits.len(), 2);
    }
}
