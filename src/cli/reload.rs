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
    match loaded.config.policy(&loaded.origin) {
        Ok(new) => {
            policy.store(new);
            if let (Some(credentials), Some(auth)) = (credentials, auth) {
                credentials
                    .store(auth.map(|(username, password)| Credentials { username, password }));
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
