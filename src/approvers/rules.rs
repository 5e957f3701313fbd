//! Persisted approval rules: one `[[rule]]` per decision in a TOML file.
//!
//! ```toml
//! [[rule]]
//! host = "api.example.com"      # a host, or *.domain / **.domain (no broader)
//! protocol = "https_connect"    # http, https_connect, https_mitm, socks5_tcp, socks5_udp
//! port = 443
//! decision = "allow"            # allow, deny, or prompt (always ask)
//! justification = "reviewer ./review.sh: the project's API"
//! ```
//!
//! A rule answers only for its host, protocol and port. The file is never
//! rewritten: an *always* answer is appended under an exclusive lock, so
//! two proxies sharing the file lose nothing. A bare `*`, or a wildcard
//! broader than one registrable domain (`*.com`, `**.co.uk`), is refused
//! when the file is loaded and when a rule would be written. Rules sit
//! behind the configured lists: a denylisted host is refused before any
//! rule is read (deny wins).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use portcullis_middleware::policy::is_public_suffix;
use portcullis_middleware::{ApprovalKey, BoxError, Host, Protocol, RuleBook, RuleDecision};

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("portcullis: {path}: {message}")]
pub struct RulesError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, naming the rule.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    host: String,
    protocol: String,
    port: u16,
    decision: String,
    #[serde(default)]
    justification: String,
    /// The profile the rule was answered for; none: the top-level policy.
    #[serde(default)]
    profile: Option<String>,
}

/// How a rule names hosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostRule {
    Exact(Host),
    /// Every subdomain of the name; with `apex`, the name too.
    Below {
        name: String,
        apex: bool,
    },
}

#[derive(Debug, Clone)]
struct Rule {
    decision: Option<RuleDecision>,
    name: String,
}

#[derive(Debug, Default)]
struct Rules {
    exact: HashMap<(Host, Protocol, u16), Rule>,
    below: Vec<(HostRule, Protocol, u16, Rule)>,
}

/// The rules file, loaded and kept live; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct RulesFile {
    path: PathBuf,
    /// Each profile's rules (`None`: the top-level policy's).
    rules: Arc<RwLock<HashMap<Option<String>, Rules>>>,
    /// The profile this view answers and writes for.
    profile: Option<Arc<str>>,
}

fn protocol(name: &str) -> Option<Protocol> {
    Some(match name {
        "http" => Protocol::Http,
        "https_connect" => Protocol::HttpsConnect,
        "https_mitm" => Protocol::HttpsMitm,
        "socks5_tcp" => Protocol::Socks5Tcp,
        "socks5_udp" => Protocol::Socks5Udp,
        _ => return None,
    })
}

fn host_rule(host: &str) -> Result<HostRule, String> {
    let (name, apex) = if let Some(rest) = host.strip_prefix("**.") {
        (rest, true)
    } else if let Some(rest) = host.strip_prefix("*.") {
        (rest, false)
    } else {
        if host.contains('*') {
            return Err(format!(
                "host {host:?}: a wildcard is allowed only as a leading *. or **."
            ));
        }
        return Host::parse(host)
            .map(HostRule::Exact)
            .map_err(|e| format!("host {host:?}: {e}"));
    };
    match Host::parse(name) {
        Ok(Host::Name(name)) if !is_public_suffix(&name) => Ok(HostRule::Below { name, apex }),
        Ok(Host::Name(_)) => Err(format!(
            "host {host:?} is broader than one registrable domain ({name:?} is a public suffix: anyone can register below it); name the domain (*.example.com, *.me.github.io)"
        )),
        Ok(Host::Ip(_)) => Err(format!("host {host:?}: an IP address takes no wildcard")),
        Err(e) => Err(format!("host {host:?}: {e}")),
    }
}

fn parse(text: &str, path: &Path) -> Result<HashMap<Option<String>, Rules>, RulesError> {
    let error = |message: String| RulesError {
        path: path.to_owned(),
        message,
    };
    let file: File = toml::from_str(text).map_err(|e| error(e.to_string()))?;
    let mut all: HashMap<Option<String>, Rules> = HashMap::new();
    for (index, raw) in file.rule.into_iter().enumerate() {
        let at = |message: String| error(format!("rule {} ({}): {message}", index + 1, raw.host));
        if raw.host == "*" {
            return Err(at("a bare * is never a rule; name the host".into()));
        }
        let host = host_rule(&raw.host).map_err(at)?;
        let protocol = protocol(&raw.protocol).ok_or_else(|| {
            at(format!(
                "protocol {:?} is not one of http, https_connect, https_mitm, socks5_tcp, socks5_udp",
                raw.protocol
            ))
        })?;
        if raw.port == 0 {
            return Err(at("port 0 is not a port".into()));
        }
        let decision = match raw.decision.as_str() {
            "allow" => Some(RuleDecision::Allow),
            "deny" => Some(RuleDecision::Deny),
            "prompt" => None,
            other => {
                return Err(at(format!(
                    "decision {other:?} is not one of allow, deny, prompt"
                )))
            }
        };
        let rules = all.entry(raw.profile.clone()).or_default();
        let rule = Rule {
            decision,
            name: format!(
                "{}: {} {} {}:{}{} ({})",
                path.display(),
                raw.decision,
                raw.protocol,
                raw.host,
                raw.port,
                raw.profile
                    .as_ref()
                    .map(|profile| format!(" for profile {profile:?}"))
                    .unwrap_or_default(),
                raw.justification
            ),
        };
        // A later rule for the same key wins, as a later append should.
        match host {
            HostRule::Exact(host) => {
                rules.exact.insert((host, protocol, raw.port), rule);
            }
            below => rules.below.push((below, protocol, raw.port, rule)),
        }
    }
    Ok(all)
}

impl RulesFile {
    /// Loads `path` (a missing file is an empty one).
    pub fn load(path: &Path) -> Result<RulesFile, RulesError> {
        let file = RulesFile {
            path: path.to_owned(),
            rules: Arc::default(),
            profile: None,
        };
        file.reload()?;
        Ok(file)
    }

    /// The same file as the profile `profile` reads it: only the rules
    /// written for that profile answer, and an *always* answer is written
    /// with `profile = "NAME"`. The top-level view reads only rules
    /// without a profile.
    pub fn for_profile(&self, profile: &str) -> RulesFile {
        RulesFile {
            path: self.path.clone(),
            rules: self.rules.clone(),
            profile: Some(Arc::from(profile)),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again; on an error the rules in force stay.
    pub fn reload(&self) -> Result<(), RulesError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => {
                return Err(RulesError {
                    path: self.path.clone(),
                    message: error.to_string(),
                })
            }
        };
        let rules = parse(&text, &self.path)?;
        *self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rules;
        Ok(())
    }

    fn append(&self, block: &str) -> Result<(), BoxError> {
        if let Some(directory) = self.path.parent() {
            std::fs::create_dir_all(directory)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        file.write_all(block.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }
}

impl RuleBook for RulesFile {
    fn lookup(&self, key: &ApprovalKey) -> Option<(RuleDecision, String)> {
        let all = self
            .rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rules = all.get(&self.profile.as_deref().map(str::to_owned))?;
        let rule = rules
            .exact
            .get(&(key.host.clone(), key.protocol, key.port))
            .or_else(|| {
                let Host::Name(name) = &key.host else {
                    return None;
                };
                rules
                    .below
                    .iter()
                    .filter(|(_, protocol, port, _)| *protocol == key.protocol && *port == key.port)
                    .find(|(host, ..)| match host {
                        HostRule::Below { name: domain, apex } => {
                            (*apex && name == domain)
                                || name
                                    .strip_suffix(domain.as_str())
                                    .is_some_and(|rest| rest.ends_with('.'))
                        }
                        HostRule::Exact(_) => false,
                    })
                    .map(|(.., rule)| rule)
            })?;
        rule.decision.map(|decision| (decision, rule.name.clone()))
    }

    fn record(
        &self,
        key: &ApprovalKey,
        decision: RuleDecision,
        justification: &str,
    ) -> Result<(), BoxError> {
        let host = key.host.to_string();
        let decision_name = match decision {
            RuleDecision::Allow => "allow",
            RuleDecision::Deny => "deny",
        };
        let justification: String = justification
            .chars()
            .filter(|c| !c.is_control())
            .take(500)
            .collect();
        let mut block = format!(
            "\n[[rule]]\nhost = {}\nprotocol = {}\nport = {}\ndecision = {}\njustification = {}\n",
            toml_string(&host),
            toml_string(key.protocol.as_str()),
            key.port,
            toml_string(decision_name),
            toml_string(&justification),
        );
        if let Some(profile) = &self.profile {
            block.push_str(&format!("profile = {}\n", toml_string(profile)));
        }
        // What we write must load: check it as the loader would.
        parse(&block, &self.path)?;
        self.append(&block)?;
        self.reload()?;
        Ok(())
    }
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: &str, protocol: Protocol, port: u16) -> ApprovalKey {
        ApprovalKey {
            host: Host::parse(host).unwrap(),
            protocol,
            port,
        }
    }

    #[test]
    fn rules_answer_for_their_host_protocol_and_port_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(
            &path,
            r#"
[[rule]]
host = "api.example.com"
protocol = "https_connect"
port = 443
decision = "allow"
justification = "by hand"

[[rule]]
host = "**.corp.test"
protocol = "http"
port = 80
decision = "deny"
"#,
        )
        .unwrap();
        let rules = RulesFile::load(&path).unwrap();
        let allow = Some(RuleDecision::Allow);
        let deny = Some(RuleDecision::Deny);
        let get = |k: ApprovalKey| rules.lookup(&k).map(|(d, _)| d);
        assert_eq!(
            get(key("api.example.com", Protocol::HttpsConnect, 443)),
            allow
        );
        assert_eq!(
            get(key("api.example.com", Protocol::HttpsConnect, 8443)),
            None
        );
        assert_eq!(get(key("api.example.com", Protocol::Socks5Tcp, 443)), None);
        assert_eq!(get(key("corp.test", Protocol::Http, 80)), deny);
        assert_eq!(get(key("a.b.corp.test", Protocol::Http, 80)), deny);
        assert_eq!(get(key("evilcorp.test", Protocol::Http, 80)), None);

        // Appended, never rewritten; applied at once.
        let before = std::fs::read_to_string(&path).unwrap();
        rules
            .record(
                &key("new.test", Protocol::HttpsConnect, 443),
                RuleDecision::Allow,
                "reviewer: ok\n\"quoted\"",
            )
            .unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.starts_with(&before));
        assert_eq!(get(key("new.test", Protocol::HttpsConnect, 443)), allow);
        assert!(RulesFile::load(&path).is_ok(), "what we wrote loads");
    }

    #[test]
    fn a_profile_reads_and_writes_only_its_own_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        let top = RulesFile::load(&path).unwrap();
        let (ci, agent) = (top.for_profile("ci"), top.for_profile("agent"));
        let wanted = key("pkg.test", Protocol::HttpsConnect, 443);
        ci.record(&wanted, RuleDecision::Allow, "ok").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("profile = \"ci\""), "{text}");
        let (decision, name) = ci.lookup(&wanted).unwrap();
        assert_eq!(decision, RuleDecision::Allow);
        assert!(name.contains("for profile \"ci\""), "{name}");
        assert_eq!(agent.lookup(&wanted), None, "never another profile's");
        assert_eq!(top.lookup(&wanted), None, "nor the top-level policy's");
        let reloaded = RulesFile::load(&path).unwrap();
        assert!(reloaded.for_profile("ci").lookup(&wanted).is_some());
        assert_eq!(reloaded.lookup(&wanted), None);
    }

    #[test]
    fn broad_wildcards_and_junk_are_refused_naming_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        for (host, protocol, decision) in [
            ("*", "http", "allow"),
            ("*.com", "http", "allow"),
            ("**.co.uk", "http", "allow"),
            ("*.github.io", "http", "allow"),
            ("*.s3.amazonaws.com", "https_connect", "allow"),
            ("**.herokuapp.com", "http", "allow"),
            ("*.workers.dev", "http", "allow"),
            ("*.vercel.app", "http", "allow"),
            ("*.ngrok.io", "http", "allow"),
            ("*.me.uk", "http", "allow"),
            ("*.k12.ca.us", "http", "allow"),
            ("a*.example.com", "http", "allow"),
            ("example.com", "ftp", "allow"),
            ("example.com", "http", "maybe"),
        ] {
            std::fs::write(
                &path,
                format!("[[rule]]\nhost = \"{host}\"\nprotocol = \"{protocol}\"\nport = 80\ndecision = \"{decision}\"\n"),
            )
            .unwrap();
            let error = RulesFile::load(&path).unwrap_err();
            assert!(error.to_string().contains("rule 1"), "{host}: {error}");
        }
        std::fs::write(&path, "[[rule]]\nhost = \"*.example.com\"\nprotocol = \"http\"\nport = 80\ndecision = \"prompt\"\n").unwrap();
        let rules = RulesFile::load(&path).unwrap();
        assert_eq!(
            rules.lookup(&key("a.example.com", Protocol::Http, 80)),
            None,
            "prompt: ask"
        );
    }
}
