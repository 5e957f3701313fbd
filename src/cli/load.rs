//! Flags and files merged into one configuration, and the builder made
//! from it.

use super::announce_upstream;
use super::args::{ModeArg, Options};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use portcullis_middleware::{Mode, PolicyHandle, ViolationLogLayer, ViolationRing};

use crate::approvers::rules::RulesFile;
use crate::config::{ApprovalMode, Config, ConfigError};
use crate::resolve::{StaticResolver, SystemResolver};
use crate::runner::{Proxy, ProxyBuilder};
use crate::upstream::UpstreamProxies;

/// A configuration merged from every source, with where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The file (or "defaults") for messages.
    pub origin: String,
    /// The config file, if one was named: refusals then name their fix as
    /// a key in it; otherwise as a flag.
    pub file: Option<PathBuf>,
    /// The profile the configuration was flattened to (`--profile`).
    pub profile: Option<String>,
}

impl Options {
    /// Says once, at start, what an `--allow '*'` means.
    pub(super) fn warn_allow_everything(&self) {
        if self.allow.iter().any(|pattern| pattern == "*") {
            tracing::warn!("--allow '*' allows every public destination: the allowlist no longer narrows anything (the denylist, local and metadata addresses still apply)");
        }
        for pattern in &self.allow {
            // `*.com`, `**.co.uk`, `*.github.io`: every domain anyone can
            // register under a public suffix.
            let host = pattern.split(':').next().unwrap_or(pattern);
            let below = host
                .strip_prefix("**.")
                .or_else(|| host.strip_prefix("*."))
                .map(|suffix| suffix.trim_end_matches('.').to_ascii_lowercase());
            if let Some(suffix) = below {
                if portcullis_middleware::policy::is_public_suffix(&suffix) {
                    tracing::warn!(
                        "--allow {pattern:?} allows every domain anyone can register under the public suffix {suffix:?}: the allowlist barely narrows anything; name the domains themselves"
                    );
                }
            }
        }
    }

    /// The config file named by `--config` or `PORTCULLIS_CONFIG`.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// Loads the configuration and applies the flags.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        let origin = match &self.config {
            Some(path) => path.display().to_string(),
            None => "defaults, environment and flags".to_owned(),
        };
        let network = &mut config.network;
        if let Some(http) = self.http {
            network.proxy_url = http;
            // An ephemeral HTTP port with no SOCKS address asked for: SOCKS
            // is ephemeral too, so a second instance does not collide on 8081.
            if http.port() == 0 && self.socks.is_none() {
                network.socks_url = SocketAddr::new(http.ip(), 0);
            }
        }
        if let Some(socks) = self.socks {
            network.socks_url = socks;
        }
        if self.no_socks {
            network.enable_socks5 = false;
        }
        // Flags are parsed here, once, as the file's lists were.
        for (flag, texts, list) in [
            ("--allow", &self.allow, &mut network.allowed_domains),
            ("--deny", &self.deny, &mut network.denied_domains),
        ] {
            for text in texts {
                let pattern = portcullis_middleware::Pattern::parse(text).map_err(|error| {
                    ConfigError::Invalid {
                        key: flag.to_owned(),
                        origin: "the command line".into(),
                        message: format!("{text:?}: {error}"),
                    }
                })?;
                list.push(pattern);
            }
        }
        if let Some(mode) = self.mode {
            network.mode = match mode {
                ModeArg::Full => Mode::Full,
                ModeArg::Limited => Mode::Limited,
            };
        }
        if self.mitm {
            network.mitm = true;
        }
        if self.no_upstream_proxy {
            network.allow_upstream_proxy = false;
        }
        if let Some(reviewer) = &self.reviewer {
            config.approval.command = vec![reviewer.clone()];
            config.approval.mode = ApprovalMode::Command;
        }
        if let Some(mode) = self.approve {
            config.approval.mode = mode;
        }
        if self.allow_local_binding {
            network.allow_local_binding = true;
        }
        for entry in &self.resolve {
            let invalid = |message: String| ConfigError::Invalid {
                key: "--resolve".into(),
                origin: "the command line".into(),
                message,
            };
            let (name, ip) = entry
                .split_once('=')
                .ok_or_else(|| invalid(format!("{entry:?} is not NAME=IP")))?;
            let ip = ip.parse::<IpAddr>().map_err(|_| {
                invalid(format!(
                    "{entry:?}: {ip:?} is not an IP address (NAME=IP, e.g. svc.test=127.0.0.1)"
                ))
            })?;
            portcullis_middleware::Host::parse(name)
                .map_err(|e| invalid(format!("{entry:?}: {name:?} is not a host name: {e}")))?;
            config
                .dns
                .hosts
                .entry(name.to_owned())
                .or_default()
                .push(ip);
        }
        if let Some(file) = &self.violations_log {
            config.log.violations_file = Some(file.clone());
        }
        if let Some(file) = &self.access_log {
            config.log.access_file = Some(file.clone());
        }
        if let Some(threads) = self.threads {
            config.runtime.threads = Some(threads);
        }
        // One profile, or none: the top-level policy as that profile sees
        // it (flags added to the top level reach it too).
        if let Some(name) = &self.profile {
            let mut flattened = config.for_profile(name, &origin)?;
            flattened.auth.users.clear();
            config = flattened;
        } else if self.top_level_only {
            config.profiles.clear();
            config.auth.users.clear();
        }
        Ok(Loaded {
            config,
            origin,
            file: self.config.clone(),
            profile: self.profile.clone(),
        })
    }
}

impl Loaded {
    /// A proxy builder for this configuration (listeners from the config).
    pub fn builder(&self) -> Result<Prepared, ConfigError> {
        self.builder_recording(None, None)
    }

    /// The same for `check`, which sends nothing: the credentials' secrets
    /// are not read (no `source.command` runs, no variable or file is
    /// needed); each stands for itself with a marker.
    pub(super) fn builder_without_secrets(&self) -> Result<Prepared, ConfigError> {
        self.build(None, None, false)
    }

    /// The same, also handing every refusal to `tally` (the `run`
    /// summary) and `learned` (`run --learn`).
    pub(super) fn builder_recording(
        &self,
        tally: Option<crate::summary::Tally>,
        learned: Option<crate::learn::Learned>,
    ) -> Result<Prepared, ConfigError> {
        self.build(tally, learned, true)
    }

    fn build(
        &self,
        tally: Option<crate::summary::Tally>,
        learned: Option<crate::learn::Learned>,
        read_secrets: bool,
    ) -> Result<Prepared, ConfigError> {
        let config = &self.config;
        let origin = &self.origin;
        let policy = config.policy(origin)?;
        let hosts = config.dns_hosts(origin)?;
        let resolver = StaticResolver::new(hosts, Arc::new(SystemResolver));
        // Secrets first: their placeholders are masked in every record.
        config.check_credentials(origin)?;
        let secrets = if config.credentials.is_empty() {
            None
        } else {
            Some(crate::secrets::load(
                &config.credentials,
                origin,
                read_secrets,
            )?)
        };
        // Each profile's stack, built from the file as that profile sees it.
        let mut profiles = Vec::new();
        let selector = if config.has_profiles() {
            let (built, selector) = config.profiles(origin)?;
            for (name, profile) in built {
                profile.check_credentials(origin)?;
                let secrets = if profile.credentials.is_empty() {
                    None
                } else {
                    Some(crate::secrets::load(
                        &profile.credentials,
                        origin,
                        read_secrets,
                    )?)
                };
                let policy = profile.policy(origin)?;
                let ask = profile.approval.mode != ApprovalMode::Deny;
                // Its own upstream only where it names one.
                let upstream = if profile.upstream == config.upstream {
                    None
                } else {
                    Some(upstream_of(
                        &profile,
                        origin,
                        read_secrets,
                        &format!(" for profile {name}"),
                    )?)
                };
                profiles.push((name, policy, secrets, ask, upstream));
            }
            Some(selector)
        } else {
            None
        };
        let mut masks = secrets
            .as_ref()
            .map(|loaded| loaded.credentials.masks())
            .unwrap_or_default();
        for (_, _, secrets, _, _) in &profiles {
            if let Some(loaded) = secrets {
                masks.extend(loaded.credentials.masks());
            }
        }
        let ring = ViolationRing::default();
        let mut violations = ViolationLogLayer::new(ring.clone()).masking(masks.clone());
        let cannot_open =
            |key: &str, file: &std::path::Path, error: std::io::Error| ConfigError::Invalid {
                key: key.into(),
                origin: origin.clone(),
                message: format!("cannot open {}: {error}", file.display()),
            };
        let format = config.log.format;
        if let Some(file) = &config.log.violations_file {
            let sink = crate::records::violations_sink(file, format)
                .map_err(|e| cannot_open("log.violations_file", file, e))?;
            violations = violations.with_sink(sink);
        }
        let telemetry =
            crate::secrets::telemetry_settings(&config.telemetry, origin, read_secrets)?;
        let access_file = match &config.log.access_file {
            Some(file) => Some(
                crate::records::AccessFile::open(file, format)
                    .map_err(|e| cannot_open("log.access_file", file, e))?
                    .masking(masks),
            ),
            // Exported allowed requests hide the placeholders too.
            None if telemetry.as_ref().is_some_and(|t| t.export_access) => {
                Some(crate::records::AccessFile::none().masking(masks))
            }
            None => None,
        };
        if let Some(tally) = tally {
            violations = violations.with_sink(tally);
        }
        if let Some(learned) = learned {
            violations = violations.with_sink(learned);
        }
        let socks = if config.network.enable_socks5 {
            Some(config.network.socks_url)
        } else {
            None
        };
        let upstream = upstream_of(config, origin, read_secrets, "")?;
        let fixes = match &self.file {
            Some(file) => crate::hints::Fixes::File(file.clone()),
            None => crate::hints::Fixes::Flags,
        };
        let fixes = match &self.profile {
            Some(name) => fixes.for_profile(name),
            None => fixes,
        };
        let mut builder = Proxy::builder()
            .refusal_fixes(fixes)
            .metrics_addr(config.metrics.listen)
            .metrics_access(
                config.metrics.dangerously_allow_non_loopback,
                crate::secrets::metrics_token(&config.metrics, origin, read_secrets)?,
            )
            .http_addr(config.network.proxy_url)
            .socks_addr(socks)
            .socks_udp(config.network.enable_socks5_udp)
            .dangerously_allow_non_loopback(config.network.dangerously_allow_non_loopback_proxy)
            .force_loopback(config.grants_unix_sockets())
            .policy(PolicyHandle::new(policy))
            .resolver(Arc::new(resolver))
            .resolve_timeout(config.dns.timeout)
            .upstream(upstream)
            .upstream_roots(config.upstream_roots(origin)?)
            .limits(config.limits)
            .all_proxy_socks(config.network.all_proxy == crate::config::AllProxy::Socks5h)
            .leaf_cache_size(config.mitm.leaf_cache_size)
            .violations(violations);
        if let Some((username, password)) = config.auth.credential(origin)? {
            builder = builder.credentials(username, password);
        }
        builder = builder.users(crate::secrets::user_passwords(
            &config.auth,
            origin,
            read_secrets,
        )?);
        if let Some(file) = access_file {
            builder = builder.access_file(file);
        }
        if let Some(telemetry) = telemetry {
            builder = builder.telemetry(telemetry);
        }
        // The variables the upstream's password, the metrics token and the
        // collector's headers are read from are never a child's either.
        let secret_variables: Vec<String> = config
            .upstream
            .password
            .iter()
            .chain(&config.metrics.bearer_token)
            .chain(config.telemetry.otlp_headers.values())
            .filter_map(|source| source.env.clone())
            .collect();
        let secrets = match secrets {
            Some(loaded) => {
                let mut removed = loaded.removed;
                removed.extend(secret_variables);
                builder = builder
                    .inject_credentials(loaded.credentials)
                    .child_variables(loaded.placeholders, removed);
                Some(loaded.store)
            }
            None => {
                if !secret_variables.is_empty() {
                    builder = builder.child_variables(Vec::new(), secret_variables);
                }
                None
            }
        };
        let asks = config.approval.mode != ApprovalMode::Deny;
        let (mut builder, rules, approver) =
            match crate::approvers::from_config(config, origin, &ring)? {
                None => (builder, None, None),
                Some((approver, name)) => {
                    let path = config.rules_file(origin)?;
                    let rules = RulesFile::load(&path).map_err(|e| ConfigError::Invalid {
                        key: "approval.rules_file".into(),
                        origin: origin.clone(),
                        message: e.to_string(),
                    })?;
                    // Flattened to one profile: that profile's persisted rules.
                    let rules = match &self.profile {
                        Some(name) => rules.for_profile(name),
                        None => rules,
                    };
                    let builder = builder
                        .approver(approver, config.approval.timeout)
                        .approval_limits(config.approval.max_pending, config.approval.max_session)
                        .rules(Arc::new(rules.clone()));
                    (builder, Some(rules), Some(name))
                }
            };
        if let Some(selector) = selector {
            builder = builder.profile_selector(selector).unmatched_gets_default(
                config.auth.unmatched == crate::config::profiles::Unmatched::Default,
            );
        }
        for (name, policy, secrets, ask, upstream) in profiles {
            let mut profile =
                crate::runner::Profile::new(PolicyHandle::new(policy)).ask(ask && asks);
            if let Some(upstream) = upstream {
                profile = profile.upstream(upstream);
            }
            if let Some(loaded) = secrets {
                profile = profile.inject_credentials(loaded.credentials);
            }
            if let Some(rules) = &rules {
                profile = profile.rules(Arc::new(rules.for_profile(&name)));
            }
            builder = builder.profile(name, profile);
        }
        Ok(Prepared {
            builder,
            ring,
            rules,
            approver,
            secrets,
        })
    }
}

/// A builder for the configuration, and what the binary keeps beside it.
#[derive(Debug)]
pub struct Prepared {
    /// The proxy, ready to start.
    pub builder: ProxyBuilder,
    /// The violation ring it records into.
    pub ring: ViolationRing,
    /// The persisted rules, when an approver is configured.
    pub rules: Option<RulesFile>,
    /// Who answers allowlist misses, for messages.
    pub approver: Option<String>,
    /// The credentials' secrets, for a reload to read again.
    pub secrets: Option<Arc<portcullis_middleware::credentials::StaticSecrets>>,
}

/// The upstream proxy `config` chains through, if any (`[upstream] url`,
/// else the environment's when `allow_upstream_proxy`), said at start
/// (`whose`: for whom, in that line).
pub(super) fn upstream_of(
    config: &Config,
    origin: &str,
    read_secrets: bool,
    whose: &str,
) -> Result<Option<UpstreamProxies>, ConfigError> {
    let upstream = match &config.upstream.url {
        Some(_) if !config.network.allow_upstream_proxy => None,
        Some(url) => {
            // Shown as written: `upstream_url` refuses one with credentials.
            let shown = url.clone();
            let url = crate::secrets::upstream_url(&config.upstream, url, origin, read_secrets)?;
            tracing::warn!(
                "chaining through {shown} ([upstream] url in {origin}){whose}; --no-upstream-proxy goes direct"
            );
            Some(
                UpstreamProxies::fixed(&url, &config.upstream.no_proxy)
                    .resolving(config.upstream.resolve),
            )
        }
        None => config
            .network
            .allow_upstream_proxy
            .then(|| UpstreamProxies::from_env().resolving(config.upstream.resolve)),
    };
    let upstream = match upstream {
        Some(upstream) => Some(upstream.trusting(config.upstream_proxy_roots(origin)?)),
        None => None,
    };
    if upstream.is_some() && config.upstream.url.is_none() {
        announce_upstream(config.upstream.resolve);
    }
    Ok(upstream)
}
