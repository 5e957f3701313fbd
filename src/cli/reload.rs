//! Live policy: the config file and the rules file are read again when they
//! change (their modification time or size, checked every second) and, for
//! `serve`, on SIGHUP. A reload that fails keeps the policy in force and says
//! why in one line naming the key and the file; a good one changes the next
//! decision and never cuts an open tunnel. What a reload changes: the lists,
//! the mode, local binding, Unix sockets, git fetch in limited mode, the
//! rules, and (for `serve`) the `[auth]` credential. Listener addresses, DNS answers, interception and the approval
//! mode are read at start only.

use super::args::Options;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use portcullis_middleware::PolicyHandle;

use crate::approvers::rules::RulesFile;
use crate::transport::{Credentials, LiveCredentials};

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: Option<&Path>) -> Stamp {
    let metadata = std::fs::metadata(path?).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Reloads the policy (from `options`, flags applied again) and `rules`
/// whenever their files change, until the process ends. `serving` (for
/// `serve`): the live `[auth]` credential, reloaded with the file, and
/// SIGHUP reloads too. `started`: what this proxy started with that a
/// reload cannot change, but can say about (and the secrets it reads again).
pub(crate) async fn watch(
    options: Options,
    policy: PolicyHandle,
    rules: Option<RulesFile>,
    serving: Option<LiveCredentials>,
    started: Started,
) {
    let hangup = serving.is_some();
    let credentials = serving;
    let config: Option<PathBuf> = options.config_path().map(Path::to_owned);
    let rules_path = rules.as_ref().map(|r| r.path().to_owned());
    let mut seen = (stamp(config.as_deref()), stamp(rules_path.as_deref()));
    let mut signal = if hangup {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    } else {
        None
    };
    loop {
        let forced = tokio::select! {
            () = tokio::time::sleep(POLL) => false,
            Some(()) = async {
                match signal.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = (stamp(config.as_deref()), stamp(rules_path.as_deref()));
        if forced || now.0 != seen.0 {
            reload_policy(&options, &policy, credentials.as_ref(), &started);
        }
        if let (Some(rules), true) = (&rules, forced || now.1 != seen.1) {
            match rules.reload() {
                Ok(()) => tracing::info!(file = %rules.path().display(), "rules reloaded"),
                Err(error) => tracing::warn!("{error}; keeping the rules in force"),
            }
        }
        seen = now;
    }
}

/// What a proxy started with, for its reloads.
pub(crate) struct Started {
    /// Whether it has a CA (a reload cannot add one).
    pub(crate) intercepting: bool,
    /// Its `[[credentials]]` as configured at start.
    pub(crate) credentials: Vec<crate::config::CredentialConfig>,
    /// Their secrets, read again on each reload.
    pub(crate) secrets: Option<std::sync::Arc<portcullis_middleware::credentials::StaticSecrets>>,
    /// Each profile's live policy, and the selector of callers.
    pub(crate) profiles: (
        std::collections::BTreeMap<String, PolicyHandle>,
        Option<portcullis_middleware::profiles::SelectProfileLayer>,
    ),
    /// Its `[telemetry]` (a reload does not change the exporter).
    pub(crate) telemetry: crate::config::TelemetryConfig,
    /// Its upstream proxies: the top level's (when it may chain), and
    /// those of the profiles with one of their own.
    pub(crate) upstreams: crate::runner::Upstreams,
}

/// Each live upstream with what the reloaded file makes of it.
type Replacements = Vec<(
    std::sync::Arc<crate::upstream::UpstreamProxies>,
    crate::upstream::UpstreamProxies,
)>;

/// The upstream proxies of the reloaded file (url, `no_proxy`,
/// credentials read again, CA file, `resolve`), all built before any is
/// stored. What only a restart can change (chaining where the proxy
/// started direct, a profile that starts or stops having its own) is
/// said and left.
fn reload_upstreams(
    loaded: &super::load::Loaded,
    started: &Started,
) -> Result<Replacements, String> {
    let origin = &loaded.origin;
    let config = &loaded.config;
    let mut replacements = Vec::new();
    let (top, profiles) = &started.upstreams;
    let now = super::load::upstream_of(config, origin, true, "").map_err(|e| e.to_string())?;
    match (top, now) {
        (Some(handle), Some(new)) => replacements.push((handle.clone(), new)),
        // Chaining turned off: the same handle, now naming no proxy.
        (Some(handle), None) => replacements.push((
            handle.clone(),
            crate::upstream::UpstreamProxies::fixed("", ""),
        )),
        (None, Some(_)) => tracing::warn!(
            "{origin}: chaining through an upstream proxy now, but this proxy started without one: it takes a restart"
        ),
        (None, None) => {}
    }
    if profiles.is_empty() {
        return Ok(replacements);
    }
    let (built, _) = config.profiles(origin).map_err(|e| e.to_string())?;
    for (name, handle) in profiles {
        let Some(profile) = built.get(name) else {
            continue;
        };
        if profile.upstream == config.upstream {
            tracing::warn!(
                "{origin}: profile {name} no longer has an upstream of its own; it keeps its own until a restart"
            );
            continue;
        }
        let new = super::load::upstream_of(profile, origin, true, &format!(" for profile {name}"))
            .map_err(|e| e.to_string())?;
        replacements.push((
            handle.clone(),
            new.unwrap_or_else(|| crate::upstream::UpstreamProxies::fixed("", "")),
        ));
    }
    Ok(replacements)
}

/// A reloaded profile set: each profile's policy, the selector, the users.
type Profiles = (
    Vec<(String, portcullis_middleware::NetworkPolicy)>,
    portcullis_middleware::profiles::ProfileSelector,
    std::collections::HashMap<String, crate::transport::Secret>,
);

/// The profiles of the reloaded file, all built, or why not: the set of
/// profiles is the one the proxy started with (`None`: it has none).
fn reload_profiles(
    loaded: &super::load::Loaded,
    started: &Started,
) -> Result<Option<Profiles>, String> {
    let origin = &loaded.origin;
    let had: Vec<&String> = started.profiles.0.keys().collect();
    let now: Vec<&String> = loaded.config.profiles.keys().collect();
    if had != now {
        return Err(format!(
            "{origin}: the profiles were {had:?} at start and are {now:?} now; profiles are added or removed only by a restart"
        ));
    }
    if had.is_empty() {
        return Ok(None);
    }
    let (built, selector) = loaded.config.profiles(origin).map_err(|e| e.to_string())?;
    let mut policies = Vec::with_capacity(built.len());
    for (name, config) in built {
        let policy = config.policy(origin).map_err(|e| e.to_string())?;
        policies.push((name, policy));
    }
    let users = crate::secrets::user_passwords(&loaded.config.auth, origin, true)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(name, password)| (name, crate::transport::Secret(password)))
        .collect();
    Ok(Some((policies, selector, users)))
}

fn reload_policy(
    options: &Options,
    policy: &PolicyHandle,
    credentials: Option<&LiveCredentials>,
    started: &Started,
) {
    let loaded = match options.load() {
        Ok(loaded) => loaded,
        Err(error) => {
            tracing::warn!("config not reloaded, keeping the policy in force: {error}");
            return;
        }
    };
    if loaded.config.telemetry != started.telemetry {
        tracing::warn!(
            "{}: [telemetry] changed; the OTLP exporter keeps its settings until portcullis is restarted",
            loaded.origin
        );
    }
    // Both or nothing: a file whose policy or `[auth]` is wrong changes
    // neither.
    let auth = match credentials {
        Some(_) => match loaded.config.auth.credential(&loaded.origin) {
            Ok(auth) => Some(auth),
            Err(error) => {
                tracing::warn!("config not reloaded, keeping the policy in force: {error}");
                return;
            }
        },
        None => None,
    };
    // Every profile is built before any is stored: one that is wrong
    // changes none.
    let profiles = match reload_profiles(&loaded, started) {
        Ok(profiles) => profiles,
        Err(error) => {
            tracing::warn!("config not reloaded, keeping the policy in force: {error}");
            return;
        }
    };
    let upstreams = match reload_upstreams(&loaded, started) {
        Ok(upstreams) => upstreams,
        Err(error) => {
            tracing::warn!("config not reloaded, keeping the policy in force: {error}");
            return;
        }
    };
    match loaded.config.policy(&loaded.origin) {
        Ok(new) => {
            policy.store(new);
            for (handle, new) in upstreams {
                handle.replace(new);
            }
            let users = match &profiles {
                Some((policies, selector, users)) => {
                    for (name, new) in policies.clone() {
                        if let Some(handle) = started.profiles.0.get(&name) {
                            handle.store(new);
                        }
                    }
                    if let Some(layer) = &started.profiles.1 {
                        layer.store(selector.clone());
                    }
                    Some(users.clone())
                }
                None => None,
            };
            if let (Some(credentials), Some(auth)) = (credentials, auth) {
                let main = auth.map(|(username, password)| Credentials { username, password });
                match users {
                    Some(users) => credentials.store_all(main, std::sync::Arc::new(users)),
                    None => credentials.store(main),
                }
            }
            tracing::info!(file = %loaded.origin, "policy reloaded");
            if let Some(secrets) = &started.secrets {
                crate::secrets::refresh(&started.credentials, &loaded.config.credentials, secrets);
            }
            if !started.intercepting && !loaded.config.rules.is_empty() {
                tracing::warn!(
                    file = %loaded.origin,
                    "[[rules]] now name hosts, but this proxy started without interception (no CA): an HTTPS CONNECT to those hosts is refused mitm_required until it is restarted"
                );
            }
        }
        Err(error) => {
            tracing::warn!("config not reloaded, keeping the policy in force: {error}")
        }
    }
}
