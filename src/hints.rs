//! Refusal messages that name the fix where the reader is: the flag under
//! `run` (or `serve` without a config file), the key and the file under
//! `--config`, the builder method when portcullis is a library (or words
//! of the integrator's own: [`Fixes::custom`]). The middleware
//! writes the key form; [`Fixes::message`] — the one renderer — rewords
//! the built-in refusals (never a message someone wrote:
//! [`Blocked::message_written`]) at the edges: the HTTP answer, the
//! violation log's record
//! ([`ViolationLogLayer::wording`](crate::middleware::ViolationLogLayer::wording)),
//! the `run` summary and `check`. The refusal itself is never changed.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use portcullis_middleware::{Blocked, Host, LocalKind, Reason, Target};

/// Where the person reading a refusal changes what is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fixes {
    /// Config keys (`allowed_domains`, `allow_local_binding`): the words
    /// the middleware writes.
    Keys,
    /// The library's builder methods (`NetworkPolicyBuilder::allow`,
    /// `PolicyHandle::update`, `Mode::Full`): the default of a proxy built
    /// in code ([`ProxyBuilder`](crate::ProxyBuilder)).
    #[default]
    Api,
    /// Words of your own ([`Fixes::custom`]), the builder methods where
    /// they have none.
    Custom(Wording),
    /// Command-line flags (`--allow`, `--allow-local-binding`, `--mitm`).
    Flags,
    /// Keys, in this config file.
    File(PathBuf),
    /// Flags (`run` with `--config FILE`), and this file for what only a
    /// file holds: request rules.
    FlagsWithFile(PathBuf),
    /// A profile's refusals ([`Fixes::for_profile`]): the wording of the
    /// proxy's own, saying which profile refused, with the profile's keys
    /// (`profiles.NAME.network.allowed_domains`) where that names a file.
    Profile(Box<Fixes>, Arc<str>),
}

/// A wording hook for refusals: given a built-in refusal (never a message
/// someone wrote), its message here, or `None` for the library's own
/// ([`Fixes::Api`]). Compared by identity.
#[derive(Clone)]
pub struct Wording(Arc<WordingFn>);

/// What a [`Wording`] calls.
type WordingFn = dyn Fn(&Blocked) -> Option<String> + Send + Sync;

impl std::fmt::Debug for Wording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wording(..)")
    }
}

impl PartialEq for Wording {
    fn eq(&self, other: &Wording) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Wording {}

impl Fixes {
    /// Refusals worded by `wording`: it gets each built-in refusal and
    /// returns its message, or `None` to keep the library's wording. Every
    /// edge uses it — the HTTP answer, the violation log, `subscribe()`'s
    /// copies keep the refusal itself, [`Ingress::http_response`](crate::kit::Ingress::http_response).
    ///
    /// ```
    /// use portcullis::hints::Fixes;
    /// use portcullis::middleware::Reason;
    ///
    /// let fixes = Fixes::custom(|blocked| {
    ///     (blocked.reason == Reason::NotAllowed).then(|| {
    ///         format!("{} is not on the team's list; ask #platform to add it", blocked.target)
    ///     })
    /// });
    /// # let _ = fixes;
    /// ```
    pub fn custom(wording: impl Fn(&Blocked) -> Option<String> + Send + Sync + 'static) -> Fixes {
        Fixes::Custom(Wording(Arc::new(wording)))
    }

    /// This wording, for the refusals of the profile `name`.
    pub fn for_profile(&self, name: &str) -> Fixes {
        Fixes::Profile(Box::new(self.clone()), Arc::from(name))
    }

    /// The message for `blocked` here: the refusal's own, reworded when it
    /// is a built-in refusal whose fix reads differently in this context.
    /// The one renderer: the HTTP body, the violation log line and file,
    /// the `run` summary and `check` all word a refusal with it.
    pub fn message(&self, blocked: &Blocked) -> String {
        self.rephrase(blocked)
            .unwrap_or_else(|| blocked.message.clone())
    }

    /// The message `blocked` should carry here, if it is a built-in refusal
    /// whose fix reads differently in this context (`None`: its own).
    pub fn rephrase(&self, blocked: &Blocked) -> Option<String> {
        if blocked.message_written() {
            return None;
        }
        match self {
            Fixes::Keys => return None,
            Fixes::Api => return api_wording(blocked),
            Fixes::Custom(wording) => return (wording.0)(blocked).or_else(|| api_wording(blocked)),
            Fixes::FlagsWithFile(file) => {
                return match blocked.reason {
                    Reason::RuleDenied | Reason::RuleNotMatched | Reason::AmbiguousPath => {
                        Fixes::File(file.clone()).rephrase(blocked)
                    }
                    _ => Fixes::Flags.rephrase(blocked),
                };
            }
            Fixes::Profile(inner, name) => {
                let text = inner
                    .rephrase(blocked)
                    .unwrap_or_else(|| blocked.message.clone());
                return Some(in_profile(&text, name, matches!(**inner, Fixes::File(_))));
            }
            Fixes::Flags | Fixes::File(_) => {}
        }
        let target = &blocked.target;
        let host = target.host_string();
        let why_and_fix =
            match (blocked.reason, target) {
                (Reason::NotAllowed, Target::Host { .. }) => match self {
                    Fixes::Flags => format!("the host is not in the allowlist; add --allow {host}"),
                    Fixes::File(file) => format!(
                    "the host is not in allowed_domains; add \"{host}\" to allowed_domains in {}",
                    file.display()
                ),
                    _ => return None,
                },
                (Reason::NotAllowedLocal, Target::Host { .. }) => {
                    match (LocalKind::of(target), self) {
                    (_, Fixes::Keys) => return None,
                    (LocalKind::Metadata(exact), Fixes::Flags) => format!(
                        "it is a cloud metadata address; only --allow {exact} (naming it exactly) unlocks it, --allow-local-binding does not"
                    ),
                    (LocalKind::Metadata(exact), Fixes::File(file)) => format!(
                        "it is a cloud metadata address; only \"{exact}\" in allowed_domains (naming it exactly) unlocks it, allow_local_binding does not, in {}",
                        file.display()
                    ),
                    (LocalKind::Localhost(exact), Fixes::Flags) => format!(
                        "{host} is this machine; allow it with --allow {exact} (or --allow {host})"
                    ),
                    (LocalKind::Localhost(exact), Fixes::File(file)) => format!(
                        "{host} is this machine; add \"{exact}\" (or \"{host}\") to allowed_domains in {}",
                        file.display()
                    ),
                    (LocalKind::Address(exact), Fixes::Flags) => format!(
                        "it is a local or private address; allow that exact address with --allow {exact}, or pass --allow-local-binding with an --allow that covers it"
                    ),
                    (LocalKind::Address(exact), Fixes::File(file)) => format!(
                        "it is a local or private address; add \"{exact}\" to allowed_domains, or set allow_local_binding = true with an allowed_domains entry that covers it, in {}",
                        file.display()
                    ),
                    (_, _) => return None,
                }
                }
                (Reason::Denied, _) => {
                    let rule = blocked.rule.as_deref().unwrap_or("denied_domains");
                    match self {
                    Fixes::Flags => format!(
                        "it matches the denylist ({rule}); drop the --deny that names it (deny wins over --allow)"
                    ),
                    Fixes::File(file) => format!(
                        "it matches the denylist ({rule}); remove that entry from {} (deny wins over any allow)",
                        file.display()
                    ),
                    _ => return None,
                }
                }
                (Reason::MethodNotAllowed, _) => {
                    let method = blocked.method.escape_debug();
                    let fix = match self {
                        // A flag wins over the config and the environment,
                        // wherever limited mode came from.
                        Fixes::Flags => "pass --mode full".to_owned(),
                        Fixes::File(file) => {
                            format!("set mode = \"full\" in [network] in {}", file.display())
                        }
                        _ => return None,
                    };
                    // What limited mode saw, when it was not the method
                    // itself (a push's start, an override, a body, …).
                    let why = match blocked.rule.as_deref() {
                        Some(rule) if rule.starts_with("limited mode refuses") => rule.to_owned(),
                        _ => "limited mode allows only GET, HEAD and OPTIONS (and no SOCKS5)"
                            .to_owned(),
                    };
                    return Some(format!(
                        "portcullis refused {method} {target}: {why}; {fix} to allow it"
                    ));
                }
                (Reason::RuleDenied | Reason::RuleNotMatched | Reason::AmbiguousPath, _) => {
                    let Fixes::File(file) = self else {
                        return None;
                    };
                    let method = blocked.method.escape_debug();
                    let rule = blocked.rule.as_deref().unwrap_or("[[rules]]");
                    let (why, fix) = match blocked.reason {
                        Reason::RuleDenied => (
                            "a deny entry of its request rules matches",
                            "change that entry",
                        ),
                        Reason::AmbiguousPath => (
                            "its path can mean two things to some origin, so its request rules cannot judge it",
                            "send the path plainly encoded (no double encoding, %u, encoded / or ;, or segment ending in . or a space); the rules are",
                        ),
                        _ => (
                            "its request rules allow no such request",
                            "add an allow entry to that block",
                        ),
                    };
                    return Some(format!(
                        "portcullis refused {method} {target}: {why} ({rule}); {fix} in {}",
                        file.display()
                    ));
                }
                (Reason::MitmRequired, _) => {
                    let fix = match self {
                    Fixes::Flags => "pass --mitm (under run the child is given the CA; elsewhere clients must trust the one `portcullis ca` prints), or --mode full".to_owned(),
                    Fixes::File(file) => format!(
                        "set mitm = true in [network] in {} (clients must trust the CA `portcullis ca` prints), or mode = \"full\"",
                        file.display()
                    ),
                    _ => return None,
                };
                    return Some(format!(
                    "portcullis refused CONNECT {target}: limited mode needs HTTPS interception to see methods; {fix}"
                ));
                }
                (
                    Reason::ApprovalDenied | Reason::ApprovalTimedOut | Reason::ApprovalFailed,
                    Target::Host { .. },
                ) => {
                    let (what, detail) = approval_outcome(blocked);
                    match self {
                        Fixes::Flags => {
                            format!("{what}; add --allow {host} if it should be reachable{detail}")
                        }
                        Fixes::File(file) => format!(
                        "{what}; add \"{host}\" to allowed_domains in {} if it should be reachable{detail}",
                        file.display()
                    ),
                        _ => return None,
                    }
                }
                _ => return None,
            };
        if blocked.protocol.is_lookup() {
            return Some(format!(
                "portcullis refused a DNS question for {host}: {why_and_fix}"
            ));
        }
        Some(format!("portcullis refused {target}: {why_and_fix}"))
    }

    /// The message for a name that resolved to a local or private address:
    /// the fix names the address, not the host (which is already allowed).
    pub(crate) fn resolved_local(&self, target: &Target, address: IpAddr, port: u16) -> String {
        let exact = exact(&Host::Ip(address), port);
        let fix = match self {
            Fixes::Keys => {
                format!("add \"{exact}\" to allowed_domains, or set allow_local_binding = true")
            }
            Fixes::Api | Fixes::Custom(_) => format!(
                "allow that address (NetworkPolicyBuilder::allow(\"{exact}\")), or allow_local_binding(true)"
            ),
            Fixes::Flags | Fixes::FlagsWithFile(_) => {
                format!("allow that address with --allow {exact}, or pass --allow-local-binding")
            }
            Fixes::Profile(inner, name) => {
                let text = inner.resolved_local(target, address, port);
                return in_profile(&text, name, matches!(**inner, Fixes::File(_)));
            }
            Fixes::File(file) => format!(
                "add \"{exact}\" to allowed_domains, or set allow_local_binding = true, in {}",
                file.display()
            ),
        };
        format!(
            "portcullis refused {target}: it resolves to the local or private address {address}; {fix}"
        )
    }
}

/// A refusal's text as the profile `name`'s: which profile refused, and,
/// where it names keys of a file (`keys`), the profile's own.
fn in_profile(text: &str, name: &str, keys: bool) -> String {
    let mut text = text.replacen(
        "portcullis refused ",
        &format!("portcullis (profile {name}) refused "),
        1,
    );
    if keys {
        for key in ["allowed_domains", "allow_local_binding"] {
            text = text.replace(
                &format!(" {key}"),
                &format!(" profiles.{name}.network.{key}"),
            );
            text = text.replace(
                &format!("\"{key}"),
                &format!("\"profiles.{name}.network.{key}"),
            );
        }
        text = text.replace("in [network]", &format!("in [profiles.{name}.network]"));
    }
    text
}

/// What an approval refusal says happened, and what decided it
/// (` (denied by …)`), as every wording puts it.
fn approval_outcome(blocked: &Blocked) -> (&'static str, String) {
    let what = match blocked.reason {
        Reason::ApprovalDenied => "the approver denied it",
        Reason::ApprovalTimedOut => "no approval arrived in time",
        _ => "the approver failed, so the request was denied (fail closed)",
    };
    let detail = blocked
        .rule
        .as_deref()
        .map(|rule| format!(" ({rule})"))
        .unwrap_or_default();
    (what, detail)
}

/// A built-in refusal worded by the library's API: the builder method
/// that changes it (`None`: the middleware's words hold as they are).
fn api_wording(blocked: &Blocked) -> Option<String> {
    let target = &blocked.target;
    let host = target.host_string();
    let on_running = "(PolicyHandle::update on a running proxy)";
    let why_and_fix = match (blocked.reason, target) {
        (Reason::NotAllowed, Target::Host { .. }) => format!(
            "the host is not in the allowlist; allow it with NetworkPolicyBuilder::allow(\"{host}\") {on_running}"
        ),
        (Reason::NotAllowedLocal, Target::Host { .. }) => match LocalKind::of(target) {
            LocalKind::Metadata(exact) => format!(
                "it is a cloud metadata address; only NetworkPolicyBuilder::allow(\"{exact}\") (naming it exactly) unlocks it, allow_local_binding(true) does not"
            ),
            LocalKind::Localhost(exact) => format!(
                "{host} is this machine; allow it with NetworkPolicyBuilder::allow(\"{exact}\") {on_running}"
            ),
            LocalKind::Address(exact) => format!(
                "it is a local or private address; allow that exact address with NetworkPolicyBuilder::allow(\"{exact}\"), or allow_local_binding(true) with an allow that covers it"
            ),
            _ => return None,
        },
        (Reason::Denied, _) => {
            let rule = blocked.rule.as_deref().unwrap_or("the denylist");
            let pattern = rule.strip_prefix("denied_domains: ").unwrap_or(rule);
            format!(
                "it matches the denylist ({rule}); remove it with NetworkPolicyBuilder::remove_denied(\"{pattern}\") {on_running} (deny wins over any allow)"
            )
        }
        (Reason::MethodNotAllowed, _) => {
            let method = blocked.method.escape_debug();
            let why = match blocked.rule.as_deref() {
                Some(rule) if rule.starts_with("limited mode refuses") => rule.to_owned(),
                _ => "limited mode allows only GET, HEAD and OPTIONS (and no SOCKS5)".to_owned(),
            };
            return Some(format!(
                "portcullis refused {method} {target}: {why}; NetworkPolicyBuilder::mode(Mode::Full) allows it"
            ));
        }
        (Reason::RuleDenied | Reason::RuleNotMatched | Reason::AmbiguousPath, _) => {
            let method = blocked.method.escape_debug();
            let rule = blocked.rule.as_deref().unwrap_or("its rules");
            let (why, fix) = match blocked.reason {
                Reason::RuleDenied => (
                    "a deny entry of its request rules matches",
                    "change that RuleBlock (NetworkPolicyBuilder::rules_block replaces it by name)",
                ),
                Reason::AmbiguousPath => (
                    "its path can mean two things to some origin, so its request rules cannot judge it",
                    "send the path plainly encoded (no double encoding, %u, encoded / or ;, or segment ending in . or a space)",
                ),
                _ => (
                    "its request rules allow no such request",
                    "add a RuleEntry to that RuleBlock (NetworkPolicyBuilder::rules_block replaces it by name)",
                ),
            };
            return Some(format!(
                "portcullis refused {method} {target}: {why} ({rule}); {fix}"
            ));
        }
        (Reason::MitmRequired, _) => {
            return Some(format!(
                "portcullis refused CONNECT {target}: limited mode needs HTTPS interception to see methods; give the proxy a CA clients trust (ProxyBuilder::mitm), or NetworkPolicyBuilder::mode(Mode::Full)"
            ));
        }
        (
            Reason::ApprovalDenied | Reason::ApprovalTimedOut | Reason::ApprovalFailed,
            Target::Host { .. },
        ) => {
            let (what, detail) = approval_outcome(blocked);
            format!(
                "{what}; allow it with NetworkPolicyBuilder::allow(\"{host}\") {on_running} if it should be reachable{detail}"
            )
        }
        _ => return None,
    };
    if blocked.protocol.is_lookup() {
        return Some(format!(
            "portcullis refused a DNS question for {host}: {why_and_fix}"
        ));
    }
    Some(format!("portcullis refused {target}: {why_and_fix}"))
}

/// `IP:PORT` as a pattern (IPv6 bracketed).
fn exact(host: &Host, port: u16) -> String {
    match host {
        Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        other => format!("{other}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portcullis_middleware::{Protocol, Source};

    fn refusal(reason: Reason, authority: &str) -> Blocked {
        Blocked::new(
            reason,
            Source::Policy,
            Target::parse_authority(authority, None).unwrap(),
            Protocol::HttpsConnect,
            &http::Method::CONNECT,
        )
    }

    #[test]
    fn each_context_names_its_own_fix() {
        let miss = refusal(Reason::NotAllowed, "index.crates.io:443");
        assert_eq!(Fixes::Keys.rephrase(&miss), None);
        assert_eq!(
            Fixes::Flags.rephrase(&miss).unwrap(),
            "portcullis refused index.crates.io:443: the host is not in the allowlist; add --allow index.crates.io"
        );
        let file = Fixes::File("/etc/p.toml".into());
        assert!(file
            .rephrase(&miss)
            .unwrap()
            .ends_with("add \"index.crates.io\" to allowed_domains in /etc/p.toml"));
        let local = refusal(Reason::NotAllowedLocal, "[::1]:8080");
        assert!(Fixes::Flags
            .rephrase(&local)
            .unwrap()
            .contains("--allow [::1]:8080, or pass --allow-local-binding"));
        // Metadata: only the exact entry; allow_local_binding never unlocks it.
        let metadata = refusal(Reason::NotAllowedLocal, "169.254.169.254:80");
        for fixes in [Fixes::Flags, Fixes::File("/etc/p.toml".into())] {
            let message = fixes.rephrase(&metadata).unwrap();
            assert!(message.contains("169.254.169.254:80"), "{message}");
            assert!(message.contains("does not"), "{message}");
        }
        assert!(
            metadata.message.contains("allow_local_binding does not"),
            "{}",
            metadata.message
        );
        let localhost = refusal(Reason::NotAllowedLocal, "localhost:8080");
        let message = Fixes::Flags.rephrase(&localhost).unwrap();
        assert!(
            message.contains("--allow localhost:8080") && !message.contains("address"),
            "{message}"
        );
        let limited = refusal(Reason::MitmRequired, "x.test:443");
        assert!(Fixes::Flags
            .rephrase(&limited)
            .unwrap()
            .contains("pass --mitm"));
        assert!(!Fixes::Flags.rephrase(&miss).unwrap().contains("approve"));
    }

    #[test]
    fn a_message_someone_wrote_is_kept() {
        let custom = refusal(Reason::NotAllowed, "x.test:443").with_message("ask the team");
        assert_eq!(Fixes::Flags.rephrase(&custom), None);
    }
}
