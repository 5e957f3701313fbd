//! Configuration: figment merges, lowest first, built-in defaults, a TOML
//! file, `PORTCULLIS_*` environment variables, and command-line flags.
//!
//! Environment variables use `__` between table and key:
//! `PORTCULLIS_NETWORK__MODE=limited`, `PORTCULLIS_DNS__TIMEOUT=2`. Every
//! other `PORTCULLIS_*` variable (except `PORTCULLIS_CONFIG`, the config
//! file) is an unknown key and an error. Unknown keys, wrong types and
//! invalid patterns are errors naming the key and where it came from.
//!
//! The `[network]` table uses the codex network proxy's key names, so a
//! codex configuration can be pasted in.

pub mod profiles;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use portcullis_middleware::request_rules::{RequestRules, RuleBlock, RuleEntry};
use portcullis_middleware::{Mode, NetworkPolicy, Pattern};

/// Everything the binary reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[network]`: listeners and policy (codex key names).
    pub network: NetworkConfig,
    /// `[dns]`: name resolution.
    pub dns: DnsConfig,
    /// `[log]`: where refusals are written.
    pub log: LogConfig,
    /// `[mitm]`: the interception CA and the origins' extra CAs.
    pub mitm: MitmConfig,
    /// `[approval]`: who is asked about allowlist misses.
    pub approval: ApprovalConfig,
    /// `[limits]`: sizes and timeouts.
    pub limits: crate::Limits,
    /// `[auth]`: credentials clients must present.
    pub auth: AuthConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[telemetry]`: records and metrics to an OpenTelemetry collector.
    pub telemetry: TelemetryConfig,
    /// `[run]`: how `portcullis run` runs its command.
    pub run: RunConfig,
    /// `[runtime]`: the proxy's worker threads.
    pub runtime: RuntimeConfig,
    /// `[[rules]]`: per-host request rules (methods and paths).
    pub rules: Vec<RuleConfig>,
    /// `[[credentials]]`: secrets added for their hosts.
    pub credentials: Vec<CredentialConfig>,
    /// `[scan]`: secrets in requests (off unless set).
    pub scan: ScanConfig,
    /// `[[rate_limits]]`: requests a second per destination pattern.
    pub rate_limits: Vec<RateLimitConfig>,
    /// `[upstream]`: chaining through an upstream proxy.
    pub upstream: UpstreamConfig,
    /// `[profiles.NAME]`: a policy per caller ([`profiles`]).
    pub profiles: BTreeMap<String, profiles::ProfileConfig>,
}

/// `[upstream]`: how requests are chained through the upstream proxy
/// named in portcullis's own environment (`network.allow_upstream_proxy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The upstream proxy (`http://host:port`), instead of the one named
    /// in portcullis's own environment; no credentials in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Destinations reached directly, as `NO_PROXY` writes them
    /// (`internal.example,10.0.0.0/8`); with `url` only.
    pub no_proxy: String,
    /// The upstream's username (with `password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Where the upstream's password comes from: one of `env`, `file`,
    /// `command` (never inline, never given to `run`'s command).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<SourceConfig>,
    /// `here` (the default): names are resolved and every answer vetted
    /// here, and the upstream is asked for the vetted address; `upstream`:
    /// the upstream resolves names (weaker: a name it resolves to a
    /// private or metadata address is reached).
    pub resolve: crate::upstream::UpstreamResolve,
    /// A PEM file of CA certificates for an `https://` upstream proxy,
    /// trusted beside the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// One `[[rate_limits]]` entry: requests to the hosts `host` covers (the
/// allowlist's patterns; the most specific entry that matches counts) get
/// `requests_per_second` on average and up to `burst` at once (past it,
/// `rate_limited`: 429 with `Retry-After`), and at most `concurrent`
/// requests in flight and tunnels open at once (past it,
/// `concurrency_limited`). One of the two at least.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The hosts, as an allowlist pattern.
    pub host: String,
    /// Requests a second, on average (above 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests in flight and tunnels open at once (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<u32>,
    /// Requests at once after a quiet spell (default: `requests_per_second`
    /// rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// `[scan]`: what a request carries that must not leave (see
/// `portcullis_middleware::scan`): token formats, and the values of the
/// environment variables named in `secret_env`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// `off` (the default), `audit` (recorded, let through) or `deny`
    /// (refused, `secret_detected`).
    pub action: portcullis_middleware::scan::ScanAction,
    /// Environment variables whose values are secrets, looked for raw and
    /// encoded (read from `run`'s or `serve`'s environment).
    pub secret_env: Vec<String>,
    /// Hosts whose requests are not scanned (the allowlist's patterns).
    pub skip_hosts: Vec<Pattern>,
    /// The largest request body inspected, in bytes, after its
    /// `Content-Encoding` is undone (0: 1 MiB). A larger one is refused
    /// (`not_inspected`) under `deny`, recorded under `audit`.
    pub max_body: usize,
    /// What a finding of one detector does (`off`, `audit`, `deny`),
    /// by name (`github_token`, `known:NAME`, `credential:NAME`,
    /// `encoded_hostname`) or prefix ending in `*` (`known:*`).
    pub detectors: std::collections::BTreeMap<String, portcullis_middleware::scan::ScanAction>,
    /// `[[scan.hosts]]`: what scanning does for some hosts.
    pub hosts: Vec<ScanHostConfig>,
}

/// One `[[scan.hosts]]` entry: hosts (the allowlist's patterns) and what
/// scanning does for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanHostConfig {
    /// The host pattern.
    pub host: Pattern,
    /// `off` (not scanned, as `skip_hosts`), `audit` or `deny`.
    pub action: portcullis_middleware::scan::ScanAction,
}

impl ScanConfig {
    /// Whether anything is scanned: `action` or a host's is not `off`.
    pub fn is_on(&self) -> bool {
        use portcullis_middleware::scan::ScanAction;
        self.action != ScanAction::Off || self.hosts.iter().any(|h| h.action != ScanAction::Off)
    }

    /// Checks `detectors`' names: a built-in format, `known:NAME` (a
    /// `secret_env` variable), `credential:NAME`, `encoded_hostname`, or a
    /// prefix ending in `*`; a typo would silently tune nothing.
    fn check_detectors(&self, origin: &str) -> Result<(), ConfigError> {
        for name in self.detectors.keys() {
            let known = name.ends_with('*')
                || name == "encoded_hostname"
                || name.starts_with("credential:")
                || name
                    .strip_prefix("known:")
                    .is_some_and(|var| self.secret_env.iter().any(|v| v == var))
                || portcullis_middleware::scan::Scanner::format_names().any(|f| f == name);
            if !known {
                let formats: Vec<&str> =
                    portcullis_middleware::scan::Scanner::format_names().collect();
                return Err(ConfigError::Invalid {
                    key: format!("scan.detectors.\"{}\"", name.escape_debug()),
                    origin: origin.to_owned(),
                    message: format!(
                        "no detector is named so: use a token format ({}), known:NAME for a secret_env variable, credential:NAME, encoded_hostname, or a prefix ending in *",
                        formats.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }
}

/// One `[[credentials]]` block: a secret, the hosts it is added for, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Its name, in logs and refusals (never the value).
    pub name: String,
    /// Exact hosts, or one registrable domain (`**.example.com`).
    pub hosts: Vec<String>,
    /// The header set (default `Authorization`).
    #[serde(default = "authorization")]
    pub header: String,
    /// The header's value, holding `{secret}` (or `basic`).
    #[serde(default)]
    pub value: Option<String>,
    /// HTTP Basic with this username and the secret as password (git).
    #[serde(default)]
    pub basic: Option<BasicConfig>,
    /// Where the secret comes from: exactly one of `env`, `file`, `command`.
    pub source: SourceConfig,
    /// The child's variable that gets a placeholder shaped like the secret.
    #[serde(default)]
    pub placeholder_env: Option<String>,
    /// Replace a header the request already has with another value.
    #[serde(default)]
    pub replace: bool,
    /// Also add the secret over plain HTTP.
    #[serde(default)]
    pub allow_plaintext: bool,
}

fn authorization() -> String {
    "Authorization".to_owned()
}

/// `basic = { username = "…" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicConfig {
    /// The Basic username.
    pub username: String,
}

/// `source = { env = "…" }`, `{ file = "…" }` or `{ command = [...] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A variable of portcullis's own environment (removed from the child's).
    #[serde(default)]
    pub env: Option<String>,
    /// A file (`~/` is the home directory); a trailing newline is dropped.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A program and its arguments (no shell), whose stdout is the secret.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

/// One `[[rules]]` block: the requests a host may receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The host pattern (the allowlist's syntax), no broader than one
    /// registrable domain.
    pub host: String,
    /// Requests that may go (at least one entry).
    pub allow: Vec<RuleEntryConfig>,
    /// Requests that may not, whatever `allow` says.
    #[serde(default)]
    pub deny: Vec<RuleEntryConfig>,
    /// `false`: audit mode — what this block would refuse goes through and
    /// is recorded as a would-be refusal (decision `audit`).
    #[serde(default = "enforced")]
    pub enforce: bool,
}

fn enforced() -> bool {
    true
}

/// One `allow` or `deny` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleEntryConfig {
    /// Methods (HTTP tokens); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Path globs (`*` one segment, `**` any); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Query parameters → glob on their decoded values (`*` any run); in
    /// `allow` the parameters let through (`"*"` names the rest), in
    /// `deny` any one matching refuses; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<std::collections::BTreeMap<String, String>>,
    /// Header names → glob on their values; in `allow` required, in
    /// `deny` any one matching refuses; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// JSON-RPC calls in the body (MCP's among them); absent: any body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonrpc: Option<JsonRpcConfig>,
    /// GraphQL requests (a JSON body or a GET's `?query=`); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphql: Option<GraphqlConfig>,
}

/// An entry's `graphql`: what a GraphQL request must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    /// Operation types: `query`, `mutation`, `subscription`; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operations: Option<Vec<String>>,
    /// Operation names (globs; anonymous is the empty name); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// Root fields (globs); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// Persisted-query hashes (SHA-256 hex) the entry trusts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persisted: Vec<String>,
}

/// An entry's `jsonrpc`: what a JSON-RPC call must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct JsonRpcConfig {
    /// JSON-RPC methods (globs: `notifications/*`); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// MCP tools a `tools/call` may name (globs); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
    /// A `tools/call`'s arguments: JSON pointer → glob on the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<std::collections::BTreeMap<String, String>>,
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run the command in its own network namespace, whose only way out is
    /// the proxy (Linux; `--isolate`): `true`, or `"best-effort"` to run
    /// with what the system allows where neither namespaces nor the
    /// Landlock fallback can be had (`--isolate=best-effort`).
    pub isolate: Isolation,
    /// Under `isolate`, the machine's Unix sockets the command may connect
    /// to (`--allow-unix-socket`); others it did not create inside the run
    /// are refused. `"*"` opens every one.
    pub unix_sockets: Vec<PathBuf>,
}

/// `[run] isolate`: `false`, `true`, or `"best-effort"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// The command shares the machine's network (`false`).
    #[default]
    Off,
    /// Isolated: namespaces, else Landlock and seccomp, else refused
    /// (`true`).
    On,
    /// As `On`, but where neither can be had the command runs with what
    /// the system allows, said once (`"best-effort"`).
    BestEffort,
}

impl Isolation {
    /// Whether the command is to be isolated at all.
    pub fn enabled(self) -> bool {
        self != Isolation::Off
    }
}

impl Serialize for Isolation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Isolation::Off => serializer.serialize_bool(false),
            Isolation::On => serializer.serialize_bool(true),
            Isolation::BestEffort => serializer.serialize_str("best-effort"),
        }
    }
}

impl<'de> Deserialize<'de> for Isolation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Isolation;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or \"best-effort\"")
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Isolation, E> {
                Ok(if value { Isolation::On } else { Isolation::Off })
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Isolation, E> {
                match value {
                    "best-effort" => Ok(Isolation::BestEffort),
                    // From the environment, a bool arrives as text.
                    "true" => Ok(Isolation::On),
                    "false" => Ok(Isolation::Off),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `[runtime]`: how many threads serve the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads (`--threads`); unset: one per core. Fewer bound
    /// what a sidecar takes of a shared machine: one thread serves one
    /// core's worth of traffic (CPU per request measured the same).
    pub threads: Option<std::num::NonZeroUsize>,
}

/// `[telemetry]`: every record and the metrics sent to an OpenTelemetry
/// collector over OTLP ([`crate::telemetry`]); off unless `otlp_endpoint`
/// is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector: `http://host:4317` (gRPC) or `http://host:4318`
    /// (HTTP/protobuf), `https://` for TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` (the default) or `http/protobuf`.
    pub otlp_protocol: crate::telemetry::OtlpProtocol,
    /// Headers every export sends, each from a source (`{ env = "…" }`,
    /// `{ file = "…" }`, `{ command = [...] }`): the collector's
    /// credentials, never written in the file.
    pub otlp_headers: BTreeMap<String, SourceConfig>,
    /// A PEM file of CA certificates for an `https://` collector, trusted
    /// beside the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_ca_file: Option<PathBuf>,
    /// `service.name` of the records and metrics.
    pub service_name: String,
    /// `service.instance.id` (default: `HOST/PID`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_instance_id: Option<String>,
    /// Whether allowed requests are sent too (refusals and audits always
    /// are).
    pub export_access: bool,
    /// At most this many records wait or are being sent; more are dropped
    /// and counted.
    pub queue_size: usize,
    /// Seconds between two sendings of the metrics.
    #[serde(with = "crate::units::positive_seconds")]
    pub metrics_interval: std::time::Duration,
    /// Seconds one export may take before it counts as failed.
    #[serde(with = "crate::units::positive_seconds")]
    pub export_timeout: std::time::Duration,
}

impl Default for TelemetryConfig {
    fn default() -> TelemetryConfig {
        use crate::telemetry as t;
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: t::OtlpProtocol::default(),
            otlp_headers: BTreeMap::new(),
            otlp_ca_file: None,
            service_name: t::DEFAULT_SERVICE_NAME.into(),
            service_instance_id: None,
            export_access: true,
            queue_size: t::DEFAULT_QUEUE_SIZE,
            metrics_interval: t::DEFAULT_METRICS_INTERVAL,
            export_timeout: t::DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

/// `[metrics]`: counters of allowed and refused requests, open connections
/// and tunnels, pending approvals and bytes, as Prometheus text at `GET
/// /metrics` on a loopback listener; off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:PORT` on loopback, e.g. `127.0.0.1:9464` (beyond loopback only
    /// with `dangerously_allow_non_loopback` and a `bearer_token`).
    #[serde(with = "crate::units::any_listen")]
    pub listen: Option<SocketAddr>,
    /// Listen beyond loopback (for a scraper outside the pod or host).
    pub dangerously_allow_non_loopback: bool,
    /// A token every scrape must send (`Authorization: Bearer …`): from a
    /// file, a variable or a command; required beyond loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SourceConfig>,
}

/// `[auth]`: when both are set, every client must present them (HTTP
/// `Proxy-Authorization: Basic`, else 407; SOCKS5 username/password).
/// `run` makes a random pair for each run unless `--no-auth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The username.
    pub username: Option<String>,
    /// The password.
    pub password: Option<String>,
    /// `[[auth.users]]`: more proxy users, each with its password's source
    /// and its profile ([`profiles`]).
    pub users: Vec<profiles::UserConfig>,
    /// What a caller given no profile gets, once profiles exist.
    pub unmatched: profiles::Unmatched,
}

impl AuthConfig {
    /// The credential, checked: both keys or neither, neither empty, and
    /// nothing a `user:password@` proxy URL cannot carry unambiguously.
    pub fn credential(&self, origin: &str) -> Result<Option<(String, String)>, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("auth.{key}"),
            origin: origin.to_owned(),
            message,
        };
        match (&self.username, &self.password) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(invalid(
                "password",
                "is missing: [auth] needs both username and password (or neither)".into(),
            )),
            (None, Some(_)) => Err(invalid(
                "username",
                "is missing: [auth] needs both username and password (or neither)".into(),
            )),
            (Some(username), Some(password)) => {
                if username.is_empty() || username.contains(':') || username.len() > 255 {
                    return Err(invalid(
                        "username",
                        "must be 1 to 255 bytes without ':' (SOCKS5 and Basic auth carry it)"
                            .into(),
                    ));
                }
                if password.is_empty() || password.len() > 255 {
                    return Err(invalid(
                        "password",
                        "must be 1 to 255 bytes (SOCKS5 username/password auth carries it)".into(),
                    ));
                }
                Ok(Some((username.clone(), password.clone())))
            }
        }
    }
}

/// Who answers an allowlist miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    /// Nobody: misses are refused (`not_allowed`).
    #[default]
    Deny,
    /// The person at the controlling terminal (`/dev/tty`).
    Prompt,
    /// A reviewer program (`[approval] command`).
    Command,
}

impl ApprovalMode {
    /// `deny`, `prompt` or `command`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalMode::Deny => "deny",
            ApprovalMode::Prompt => "prompt",
            ApprovalMode::Command => "command",
        }
    }
}

/// `[approval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalConfig {
    /// `deny` (default), `prompt` or `command`.
    pub mode: ApprovalMode,
    /// The reviewer program and its arguments, for `mode = "command"`.
    pub command: Vec<String>,
    /// A reviewer's *allow* counts only below this risk score (0–100).
    pub risk_threshold: u8,
    /// Seconds an approver has to answer; no answer denies.
    #[serde(with = "crate::units::positive_seconds")]
    pub timeout: Duration,
    /// The persisted rules; default `rules.toml` in the data directory.
    pub rules_file: Option<PathBuf>,
    /// Questions that may wait at once; further ones are refused.
    pub max_pending: usize,
    /// Keys remembered for the session.
    pub max_session: usize,
    /// Longest string handed to a reviewer; longer ones are cut and marked.
    pub max_field_bytes: usize,
    /// Largest answer read from a reviewer; a longer one fails closed.
    pub max_output_bytes: usize,
    /// Recent decisions and refusals shown to a reviewer.
    pub context_entries: usize,
    /// Environment variables the reviewer gets (it gets no others).
    pub pass_env: Vec<String>,
}

impl Default for ApprovalConfig {
    fn default() -> ApprovalConfig {
        ApprovalConfig {
            mode: ApprovalMode::Deny,
            command: Vec::new(),
            risk_threshold: 80,
            timeout: portcullis_middleware::approval::DEFAULT_APPROVAL_TIMEOUT,
            rules_file: None,
            max_pending: portcullis_middleware::approval::DEFAULT_MAX_PENDING,
            max_session: portcullis_middleware::approval::DEFAULT_MAX_SESSION,
            max_field_bytes: 2048,
            max_output_bytes: 64 * 1024,
            context_entries: 20,
            pass_env: vec!["PATH".to_owned()],
        }
    }
}

/// `allow` or `deny`, in the map form `domains = { "x" = "allow" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainAction {
    /// Add to the allowlist.
    Allow,
    /// Add to the denylist.
    Deny,
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Whether the proxy runs at all.
    pub enabled: bool,
    /// The HTTP listener, `http://127.0.0.1:3128` (port 0: ephemeral).
    #[serde(with = "crate::units::http_listen")]
    pub proxy_url: SocketAddr,
    /// The SOCKS5 listener, `socks5://127.0.0.1:8081`.
    #[serde(with = "crate::units::socks_listen")]
    pub socks_url: SocketAddr,
    /// Serve SOCKS5.
    pub enable_socks5: bool,
    /// Serve SOCKS5 UDP ASSOCIATE.
    pub enable_socks5_udp: bool,
    /// Chain through the proxy's own `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`.
    pub allow_upstream_proxy: bool,
    /// Allow listeners on non-loopback addresses.
    pub dangerously_allow_non_loopback_proxy: bool,
    /// Allow local/private addresses for allowlisted hosts.
    pub allow_local_binding: bool,
    /// `full` or `limited`.
    pub mode: Mode,
    /// Allowlist patterns, parsed as they are read.
    pub allowed_domains: Vec<Pattern>,
    /// Denylist patterns, parsed as they are read.
    pub denied_domains: Vec<Pattern>,
    /// Map form: pattern → `allow` / `deny`.
    pub domains: BTreeMap<String, DomainAction>,
    /// Unix sockets that `x-unix-socket` may name (absolute paths).
    pub allow_unix_sockets: Vec<String>,
    /// Same as `allow_unix_sockets` (codex spelling).
    pub unix_sockets: Vec<String>,
    /// Allow every Unix socket.
    pub dangerously_allow_all_unix_sockets: bool,
    /// HTTPS interception in limited mode: each request inside a CONNECT
    /// is checked (the client must trust the CA `portcullis ca` prints).
    pub mitm: bool,
    /// In limited mode, let git fetch and clone over smart HTTP
    /// (`POST …/git-upload-pack` is a read); push stays refused.
    pub limited_allow_git_fetch: bool,
    /// `false` puts every `[[rules]]` block in audit mode (as `enforce =
    /// false` in each): what they would refuse goes through, recorded.
    pub enforce_rules: bool,
    /// What the child's `ALL_PROXY` names: `http` (default; every common
    /// client takes it) or `socks5h` (codex's choice).
    pub all_proxy: AllProxy,
}

/// What `ALL_PROXY` names for a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AllProxy {
    /// The HTTP proxy URL.
    #[default]
    Http,
    /// The SOCKS5 URL (names resolved by the proxy).
    Socks5h,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            enabled: true,
            proxy_url: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3128),
            socks_url: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081),
            enable_socks5: true,
            enable_socks5_udp: true,
            allow_upstream_proxy: true,
            dangerously_allow_non_loopback_proxy: false,
            allow_local_binding: false,
            mode: Mode::Full,
            allowed_domains: Vec::new(),
            denied_domains: Vec::new(),
            domains: BTreeMap::new(),
            allow_unix_sockets: Vec::new(),
            unix_sockets: Vec::new(),
            dangerously_allow_all_unix_sockets: false,
            mitm: false,
            limited_allow_git_fetch: true,
            enforce_rules: true,
            all_proxy: AllProxy::Http,
        }
    }
}

/// `[mitm]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MitmConfig {
    /// Where the CA lives; default `$XDG_DATA_HOME/portcullis`, else
    /// `~/.local/share/portcullis`.
    pub ca_dir: Option<PathBuf>,
    /// PEM files of extra CAs to trust for TLS to origins (beside the
    /// system's roots, which honour `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    pub upstream_ca_files: Vec<PathBuf>,
    /// How many hosts' leaf certificates are kept.
    pub leaf_cache_size: usize,
}

impl Default for MitmConfig {
    fn default() -> MitmConfig {
        MitmConfig {
            ca_dir: None,
            upstream_ca_files: Vec::new(),
            leaf_cache_size: crate::mitm::DEFAULT_LEAF_CACHE_SIZE,
        }
    }
}

/// The data directory: `$XDG_DATA_HOME/portcullis`, else
/// `~/.local/share/portcullis`.
pub fn data_dir() -> Option<PathBuf> {
    let nonempty = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    match nonempty("XDG_DATA_HOME") {
        Some(base) => Some(PathBuf::from(base).join("portcullis")),
        None => nonempty("HOME").map(|home| PathBuf::from(home).join(".local/share/portcullis")),
    }
}

/// `[dns]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Seconds a lookup may take.
    #[serde(with = "crate::units::lookup_seconds")]
    pub timeout: Duration,
    /// Static answers, like curl's `--resolve`: `{ "name.test" = ["127.0.0.1"] }`.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            timeout: crate::resolve::DEFAULT_TIMEOUT,
            hosts: BTreeMap::new(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Append every refusal to this file as one JSON line.
    pub violations_file: Option<PathBuf>,
    /// Append every allowed request and tunnel opened to this file as one
    /// JSON line (off by default).
    pub access_file: Option<PathBuf>,
    /// How both files are written: `json` (our own fields, the default)
    /// or `ocsf` (OCSF 1.8.0 events); see [`crate::records`].
    pub format: crate::records::RecordFormat,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The named config file does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// figment could not read or type-check the sources.
    #[error("{}", figment_message(.0))]
    Figment(Box<figment::Error>),
    /// A secret could not be read (exit 69: the configuration is fine, its
    /// source is not there).
    #[error("cannot read {key} (from {origin}): {message}")]
    Unavailable {
        /// The dotted key, e.g. `credentials[0].source`.
        key: String,
        /// Where the configuration came from.
        origin: String,
        /// What went wrong (never the value).
        message: String,
    },
    /// A value is well-typed but invalid.
    #[error("invalid {key} (from {origin}): {message}")]
    Invalid {
        /// The dotted key, e.g. `network.allowed_domains[2]`.
        key: String,
        /// Where the configuration came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

fn figment_message(error: &figment::Error) -> String {
    let messages: Vec<String> = error.clone().into_iter().map(|e| one_error(&e)).collect();
    messages.join("; ")
}

/// One figment error as a person reads it: where (the file, or the
/// environment variable), which key, what is wrong, and for an unknown key
/// the closest known one. figment's own text prefixes the profile
/// (`default.`) and nests backticks.
fn one_error(error: &figment::Error) -> String {
    use figment::error::Kind;
    // `rules[0].allow[1]`, as the other messages write array entries.
    let key = error.path.iter().fold(String::new(), |mut key, part| {
        if !key.is_empty() && !part.is_empty() && part.chars().all(|c| c.is_ascii_digit()) {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
        key
    });
    let place = match error.metadata.as_ref() {
        Some(metadata) => match &metadata.source {
            Some(figment::Source::File(path)) => format!("{}: ", path.display()),
            _ if metadata.name.contains("environment") => {
                let name: Vec<String> = error.path.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("environment variable PORTCULLIS_{}: ", name.join("__"))
            }
            _ => String::new(),
        },
        None => String::new(),
    };
    let what = match &error.kind {
        Kind::UnknownField(found, expected) => {
            let parent = key.strip_suffix(found.as_str()).unwrap_or("");
            let closest = expected
                .iter()
                .map(|known| (strsim::jaro_winkler(found, known), known))
                .filter(|(score, _)| *score >= 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            match closest {
                Some((_, known)) => format!("unknown key {key}; did you mean {parent}{known}?"),
                None => format!(
                    "unknown key {key}; the keys{} are: {}",
                    if parent.is_empty() {
                        String::new()
                    } else {
                        format!(" in [{}]", parent.trim_end_matches('.'))
                    },
                    expected.join(", ")
                ),
            }
        }
        Kind::UnknownVariant(found, expected) => {
            format!(
                "{key} cannot be {found:?}; it is one of: {}",
                expected.join(", ")
            )
        }
        Kind::InvalidType(actual, expected) => format!("{key} must be {expected}, not {actual}"),
        Kind::InvalidValue(actual, expected) => format!("{key} must be {expected}, not {actual}"),
        Kind::MissingField(field) => format!("{key}: {field} is missing"),
        other => {
            if key.is_empty() {
                other.to_string()
            } else {
                format!("{key}: {other}")
            }
        }
    };
    format!("{place}{what}")
}

/// The figment every source goes through, lowest first.
pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = file {
        if !file.is_file() {
            return Err(ConfigError::Missing(file.to_owned()));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    // Every key lives in a table (`PORTCULLIS_NETWORK__MODE`): a variable
    // without `__` (`PORTCULLIS_LOG`, `PORTCULLIS_CONFIG`, the ones `run`
    // exports) is not configuration.
    Ok(figment.merge(
        Env::prefixed("PORTCULLIS_")
            .filter(|key| key.as_str().contains("__"))
            .split("__"),
    ))
}

impl Config {
    /// Loads defaults < `file` < `PORTCULLIS_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        figment(file)?
            .extract()
            .map_err(|e| ConfigError::Figment(Box::new(e)))
    }

    /// Parses a TOML string over the defaults (no environment).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Figment(Box::new(e)))
    }

    /// The interception CA's directory: `[mitm] ca_dir`, else the data
    /// directory.
    pub fn ca_dir(&self, origin: &str) -> Result<PathBuf, ConfigError> {
        self.mitm
            .ca_dir
            .clone()
            .or_else(data_dir)
            .ok_or_else(|| ConfigError::Invalid {
                key: "mitm.ca_dir".into(),
                origin: origin.to_owned(),
                message: "neither XDG_DATA_HOME nor HOME is set; set mitm.ca_dir".into(),
            })
    }

    /// The rules file: `[approval] rules_file`, else `rules.toml` in the
    /// data directory.
    pub fn rules_file(&self, origin: &str) -> Result<PathBuf, ConfigError> {
        self.approval
            .rules_file
            .clone()
            .or_else(|| data_dir().map(|dir| dir.join("rules.toml")))
            .ok_or_else(|| ConfigError::Invalid {
                key: "approval.rules_file".into(),
                origin: origin.to_owned(),
                message: "neither XDG_DATA_HOME nor HOME is set; set approval.rules_file".into(),
            })
    }

    /// The certificates of `[upstream] ca_file` (none without one).
    pub fn upstream_proxy_roots(
        &self,
        origin: &str,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        match &self.upstream.ca_file {
            Some(path) => pem_certificates(path).map_err(|message| ConfigError::Invalid {
                key: "upstream.ca_file".into(),
                origin: origin.to_owned(),
                message,
            }),
            None => Ok(Vec::new()),
        }
    }

    /// The certificates of `[mitm] upstream_ca_files`.
    pub fn upstream_roots(
        &self,
        origin: &str,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        let mut roots = Vec::new();
        for path in &self.mitm.upstream_ca_files {
            let invalid = |message: String| ConfigError::Invalid {
                key: "mitm.upstream_ca_files".into(),
                origin: origin.to_owned(),
                message,
            };
            roots.extend(pem_certificates(path).map_err(invalid)?);
        }
        Ok(roots)
    }

    /// The policy the configuration describes; `origin` names the file for
    /// error messages.
    pub fn policy(&self, origin: &str) -> Result<NetworkPolicy, ConfigError> {
        let network = &self.network;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            key,
            origin: origin.to_owned(),
            message,
        };
        let mut builder = NetworkPolicy::builder()
            .limited_allow_git_fetch(network.limited_allow_git_fetch)
            .allow_local_binding(network.allow_local_binding)
            .mode(network.mode)
            .dangerously_allow_all_unix_sockets(network.dangerously_allow_all_unix_sockets);
        // The lists were parsed as they were read; the map form's keys
        // are parsed here.
        let mut allowed: Vec<(String, Pattern)> = network
            .allowed_domains
            .iter()
            .enumerate()
            .map(|(index, pattern)| (format!("network.allowed_domains[{index}]"), pattern.clone()))
            .collect();
        let mut denied: Vec<(String, Pattern)> = network
            .denied_domains
            .iter()
            .enumerate()
            .map(|(index, pattern)| (format!("network.denied_domains[{index}]"), pattern.clone()))
            .collect();
        for (text, action) in &network.domains {
            let key = format!("network.domains.\"{text}\"");
            let pattern =
                Pattern::parse(text).map_err(|e| invalid(key.clone(), format!("{text:?}: {e}")))?;
            match action {
                DomainAction::Allow => allowed.push((key, pattern)),
                DomainAction::Deny => denied.push((key, pattern)),
            }
        }
        for (_, pattern) in allowed {
            builder = builder.allow_pattern(pattern);
        }
        for (key, pattern) in denied {
            builder = builder
                .deny_pattern(pattern)
                .map_err(|e| invalid(key, e.to_string()))?;
        }
        let sockets = network
            .allow_unix_sockets
            .iter()
            .map(|p| ("network.allow_unix_sockets", p))
            .chain(
                network
                    .unix_sockets
                    .iter()
                    .map(|p| ("network.unix_sockets", p)),
            );
        for (key, path) in sockets {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(invalid(
                    key.to_owned(),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            // Compare after resolving symlinks; a socket that does not exist
            // yet is kept as written.
            let canonical = std::fs::canonicalize(&path).unwrap_or(path);
            builder = builder
                .allow_unix_socket(canonical)
                .map_err(|e| invalid(key.to_owned(), e.to_string()))?;
        }
        self.scan.check_detectors(origin)?;
        Ok(builder
            .request_rules(self.request_rules(origin)?)
            .scan(self.scan_policy())
            .rate_limits(self.rate_limits(origin)?)
            .build())
    }

    /// `[[rate_limits]]` as the policy holds them.
    pub fn rate_limits(
        &self,
        origin: &str,
    ) -> Result<portcullis_middleware::limits::RateLimits, ConfigError> {
        use portcullis_middleware::limits::{Limit, LimitError, Rate, RateLimits};
        let mut limits = RateLimits::new();
        for (index, entry) in self.rate_limits.iter().enumerate() {
            let invalid = |field: &str, message: String| ConfigError::Invalid {
                key: format!("rate_limits[{index}].{field}"),
                origin: origin.to_owned(),
                message,
            };
            let limit = match (entry.requests_per_second, entry.concurrent) {
                (None, None) => {
                    return Err(invalid(
                        "requests_per_second",
                        "give requests_per_second, concurrent, or both".into(),
                    ))
                }
                (None, Some(_)) if entry.burst.is_some() => {
                    return Err(invalid("burst", "a burst needs requests_per_second".into()))
                }
                (None, Some(cap)) => {
                    Limit::concurrent(cap).map_err(|e| invalid("concurrent", e.to_string()))?
                }
                (Some(per_second), cap) => {
                    let burst = entry.burst.unwrap_or_else(|| {
                        // Saturating: a rate beyond u32 bursts at u32::MAX.
                        let rounded = per_second.ceil();
                        if rounded >= f64::from(u32::MAX) {
                            u32::MAX
                        } else if rounded >= 1.0 {
                            rounded as u32
                        } else {
                            1
                        }
                    });
                    let rate = Rate::new(per_second, burst).map_err(|e| {
                        let field = if entry.burst == Some(0) {
                            "burst"
                        } else {
                            "requests_per_second"
                        };
                        invalid(field, e.to_string())
                    })?;
                    match cap {
                        Some(cap) => Limit::from(rate)
                            .and_concurrent(cap)
                            .map_err(|e| invalid("concurrent", e.to_string()))?,
                        None => Limit::from(rate),
                    }
                }
            };
            limits = limits.limit(&entry.host, limit).map_err(|e| match e {
                LimitError::Rate(message) => invalid("requests_per_second", message),
                other => invalid("host", other.to_string()),
            })?;
        }
        Ok(limits)
    }

    /// `[scan]` as the policy holds it: the built-in token formats, and the
    /// value of each variable `secret_env` names (one that is not set, or
    /// too short to look for, is said once).
    fn scan_policy(&self) -> portcullis_middleware::scan::ScanPolicy {
        use portcullis_middleware::scan::{ScanAction, ScanPolicy, Scanner, SHORTEST_KNOWN};
        let scan = &self.scan;
        if !scan.is_on() {
            return ScanPolicy::default();
        }
        let detectors: Vec<(String, ScanAction)> = scan
            .detectors
            .iter()
            .map(|(name, action)| (name.clone(), *action))
            .collect();
        let probe = ScanPolicy {
            detectors: detectors.clone(),
            ..ScanPolicy::default()
        };
        // A detector set to `off` is left out of the search.
        let off = |name: &str| probe.detector_action(name) == Some(ScanAction::Off);
        let mut scanner = Scanner::builtin().without_formats(off);
        for name in &scan.secret_env {
            if off(&format!("known:{name}")) {
                continue;
            }
            match std::env::var(name) {
                Ok(value) if scanner.known_value(name, &value) => {}
                Ok(_) => tracing::warn!(
                    "[scan] secret_env names {name}, whose value is shorter than {SHORTEST_KNOWN} bytes: not looked for (it would match ordinary text)"
                ),
                Err(_) => tracing::warn!(
                    "[scan] secret_env names {name}, which is not set here: nothing to look for"
                ),
            }
        }
        let mut skip_hosts = portcullis_middleware::PatternSet::new();
        for pattern in &scan.skip_hosts {
            skip_hosts.insert(pattern.clone());
        }
        let mut hosts = portcullis_middleware::PatternSet::new();
        for entry in &scan.hosts {
            hosts.insert(entry.host.clone());
        }
        ScanPolicy {
            scanner,
            action: scan.action,
            skip_hosts,
            max_body: scan.max_body,
            detectors,
            hosts,
            host_actions: scan.hosts.iter().map(|entry| entry.action).collect(),
        }
    }

    /// Whether the proxy has an interception CA: `mitm` on, request
    /// rules or credentials (whose hosts are intercepted in any mode), or
    /// secret scanning (every tunnel it covers is intercepted to be seen).
    pub fn intercepts(&self) -> bool {
        self.network.mitm
            || !self.rules.is_empty()
            || !self.credentials.is_empty()
            || self.scan.is_on()
            || self
                .profiles
                .values()
                .any(|profile| !profile.rules.is_empty() || !profile.credentials.is_empty())
    }

    /// Whether a secret is held: `[[credentials]]`, at the top or in a
    /// profile.
    pub fn holds_secrets(&self) -> bool {
        !self.credentials.is_empty() || self.profiles.values().any(|p| !p.credentials.is_empty())
    }

    /// Checks `[[credentials]]` without reading a secret: names given and
    /// unique, hosts given and no broader than one registrable domain.
    pub fn check_credentials(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            key,
            origin: origin.to_owned(),
            message,
        };
        let mut names = std::collections::HashSet::new();
        for (index, credential) in self.credentials.iter().enumerate() {
            let key = format!("credentials[{index}]");
            if credential.name.is_empty() || !names.insert(credential.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?}: give each credential a name of its own",
                        credential.name
                    ),
                ));
            }
            if credential.hosts.is_empty() {
                return Err(invalid(
                    format!("{key}.hosts"),
                    "name at least one host the secret is sent to".into(),
                ));
            }
            for (position, host) in credential.hosts.iter().enumerate() {
                let pattern = Pattern::parse(host)
                    .map_err(|e| invalid(format!("{key}.hosts[{position}]"), e.to_string()))?;
                if let Some(why) = too_broad_for_rules(&pattern) {
                    return Err(invalid(
                        format!("{key}.hosts[{position}]"),
                        format!("{host:?} {why}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[[rules]]`, compiled.
    pub fn request_rules(&self, origin: &str) -> Result<RequestRules, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            key,
            origin: origin.to_owned(),
            message,
        };
        let mut blocks = Vec::with_capacity(self.rules.len());
        for (index, rule) in self.rules.iter().enumerate() {
            let name = format!("rules[{index}]");
            let block = RuleBlock::new(&rule.host, name.clone())
                .map_err(|e| invalid(format!("{name}.host"), format!("{:?}: {e}", rule.host)))?;
            if let Some(why) = too_broad_for_rules(block.host()) {
                return Err(invalid(
                    format!("{name}.host"),
                    format!("{:?} {why}", rule.host),
                ));
            }
            if rule.allow.is_empty() {
                return Err(invalid(
                    format!("{name}.allow"),
                    "a host with rules is allowed request by request: give at least one allow entry".into(),
                ));
            }
            let mut block = block;
            for (list, entries) in [("allow", &rule.allow), ("deny", &rule.deny)] {
                for (position, entry) in entries.iter().enumerate() {
                    let key = format!("{name}.{list}[{position}]");
                    let compiled = rule_entry(entry)
                        .map_err(|(field, e)| invalid(format!("{key}{field}"), e))?;
                    block = match list {
                        "allow" => block.allow(compiled),
                        _ => block.deny(compiled),
                    };
                }
            }
            let enforce = rule.enforce && self.network.enforce_rules;
            blocks.push(if enforce { block } else { block.audit() });
        }
        Ok(RequestRules::new(blocks))
    }

    /// Whether any Unix socket permission is granted (forces loopback).
    pub fn grants_unix_sockets(&self) -> bool {
        let network = &self.network;
        network.dangerously_allow_all_unix_sockets
            || !network.allow_unix_sockets.is_empty()
            || !network.unix_sockets.is_empty()
    }

    /// The static DNS answers.
    pub fn dns_hosts(&self, origin: &str) -> Result<HashMap<String, Vec<IpAddr>>, ConfigError> {
        let mut hosts = HashMap::new();
        for (name, addresses) in &self.dns.hosts {
            let key = format!("dns.hosts.\"{name}\"");
            let host =
                portcullis_middleware::Host::parse(name).map_err(|e| ConfigError::Invalid {
                    key: key.clone(),
                    origin: origin.to_owned(),
                    message: e.to_string(),
                })?;
            hosts.insert(host.to_string(), addresses.clone());
        }
        Ok(hosts)
    }
}

/// One `allow`/`deny` entry, compiled; the error names the field.
fn rule_entry(entry: &RuleEntryConfig) -> Result<RuleEntry, (&'static str, String)> {
    if entry.methods.is_none()
        && entry.paths.is_none()
        && entry.query.is_none()
        && entry.headers.is_none()
        && entry.jsonrpc.is_none()
        && entry.graphql.is_none()
    {
        return Err((
            "",
            "an entry names at least one of methods, paths, query, headers, jsonrpc or graphql"
                .into(),
        ));
    }
    let mut compiled = RuleEntry::new();
    if let Some(methods) = &entry.methods {
        compiled = compiled
            .methods(methods)
            .map_err(|e| (".methods", e.to_string()))?;
    }
    if let Some(paths) = &entry.paths {
        compiled = compiled
            .paths(paths)
            .map_err(|e| (".paths", e.to_string()))?;
    }
    if let Some(query) = &entry.query {
        compiled = compiled
            .query(query)
            .map_err(|e| (".query", e.to_string()))?;
    }
    if let Some(headers) = &entry.headers {
        compiled = compiled
            .headers(headers)
            .map_err(|e| (".headers", e.to_string()))?;
    }
    if let Some(jsonrpc) = &entry.jsonrpc {
        use portcullis_middleware::request_rules::JsonRpcMatcher;
        let mut matcher = JsonRpcMatcher::new();
        if let Some(methods) = &jsonrpc.methods {
            matcher = matcher
                .methods(methods)
                .map_err(|e| (".jsonrpc.methods", e.to_string()))?;
        }
        if let Some(tools) = &jsonrpc.tools {
            matcher = matcher
                .tools(tools)
                .map_err(|e| (".jsonrpc.tools", e.to_string()))?;
        }
        if let Some(arguments) = &jsonrpc.arguments {
            matcher = matcher
                .arguments(arguments)
                .map_err(|e| (".jsonrpc.arguments", e.to_string()))?;
        }
        compiled = compiled.jsonrpc(matcher);
    }
    if let Some(graphql) = &entry.graphql {
        use portcullis_middleware::request_rules::GraphqlMatcher;
        let mut matcher = GraphqlMatcher::new()
            .persisted(&graphql.persisted)
            .map_err(|e| (".graphql.persisted", e.to_string()))?;
        if let Some(operations) = &graphql.operations {
            matcher = matcher
                .operations(operations)
                .map_err(|e| (".graphql.operations", e.to_string()))?;
        }
        if let Some(names) = &graphql.names {
            matcher = matcher
                .names(names)
                .map_err(|e| (".graphql.names", e.to_string()))?;
        }
        if let Some(fields) = &graphql.fields {
            matcher = matcher
                .fields(fields)
                .map_err(|e| (".graphql.fields", e.to_string()))?;
        }
        compiled = compiled.graphql(matcher);
    }
    Ok(compiled)
}

/// Why a host pattern is too broad to carry request rules, if it is: rules
/// belong to one registrable domain (or one address or network).
fn too_broad_for_rules(pattern: &Pattern) -> Option<&'static str> {
    use portcullis_middleware::policy::HostPattern;
    match &pattern.host {
        HostPattern::Any => Some("matches every host; rules belong to one domain"),
        HostPattern::Subdomains(name) | HostPattern::ApexAndSubdomains(name)
            if portcullis_middleware::policy::is_public_suffix(name) || !name.contains('.') =>
        {
            Some("spans a public suffix (everyone's domains); rules belong to one registrable domain")
        }
        _ => None,
    }
}

/// The certificates of a PEM file; why not, naming the file, when it
/// cannot be read or holds none.
pub(crate) fn pem_certificates(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = pem::parse_many(&text)
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| rustls::pki_types::CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(toml: &str) -> String {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("p.toml");
        std::fs::write(&path, toml).unwrap_or_else(|e| panic!("{e}"));
        match Config::load(Some(&path)) {
            Ok(_) => panic!("{toml} loaded"),
            Err(error) => error
                .to_string()
                .replace(&path.display().to_string(), "FILE"),
        }
    }

    #[test]
    fn config_errors_name_the_file_and_key_and_suggest_the_closest() {
        assert_eq!(
            load_error("[network]\nallowed_domain = [\"x\"]\n"),
            "FILE: unknown key network.allowed_domain; did you mean network.allowed_domains?"
        );
        assert_eq!(
            load_error("[netwrk]\n"),
            "FILE: unknown key netwrk; did you mean network?"
        );
        assert_eq!(
            load_error("[network]\nallowed_domains = \"x\"\n"),
            "FILE: network.allowed_domains must be a sequence, not string \"x\""
        );
        assert_eq!(
            load_error("[network]\nmode = \"limitd\"\n"),
            "FILE: network.mode cannot be \"limitd\"; it is one of: full, limited"
        );
        let far = load_error("[limits]\nzzz = 1\n");
        assert!(
            far.starts_with(
                "FILE: unknown key limits.zzz; the keys in [limits] are: header_read_timeout,"
            ),
            "{far}"
        );
        assert!(!far.contains("default."), "{far}");
        assert_eq!(
            load_error("[run]\nisolate = \"yes\"\n"),
            "FILE: run.isolate must be true, false or \"best-effort\", not string \"yes\""
        );
    }

    #[test]
    fn run_isolate_is_a_bool_or_best_effort() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("p.toml");
        for (text, wanted) in [
            ("true", Isolation::On),
            ("false", Isolation::Off),
            ("\"best-effort\"", Isolation::BestEffort),
        ] {
            std::fs::write(&path, format!("[run]\nisolate = {text}\n"))
                .unwrap_or_else(|e| panic!("{e}"));
            let config = Config::load(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(config.run.isolate, wanted, "{text}");
            // And back as written.
            let written = toml::to_string(&config.run).unwrap_or_else(|e| panic!("{e}"));
            assert!(written.contains(&format!("isolate = {text}")), "{written}");
        }
    }

    #[test]
    fn values_with_units_are_checked_as_they_are_read_naming_key_and_file() {
        assert_eq!(
            load_error("[limits]\nheader_read_timeout = -1\n"),
            "FILE: limits.header_read_timeout must be a positive number of seconds, not signed int `-1`"
        );
        assert_eq!(
            load_error("[limits]\nmax_header_bytes = 100\n"),
            "FILE: limits.max_header_bytes must be a number of bytes of at least 8192, not unsigned int `100`"
        );
        assert_eq!(
            load_error("[dns]\ntimeout = 301\n"),
            "FILE: dns.timeout must be a number of seconds above 0 and at most 300, not signed int `301`"
        );
        assert_eq!(
            load_error("[approval]\ntimeout = 0\n"),
            "FILE: approval.timeout must be a positive number of seconds, not signed int `0`"
        );
        assert_eq!(
            load_error("[network]\nsocks_url = \"ftp://127.0.0.1:1\"\n"),
            "FILE: network.socks_url must be IP:PORT or socks5|socks5h|http://IP:PORT, not string \"ftp://127.0.0.1:1\""
        );
        // An address beyond loopback parses; whether it may be used is
        // decided with its opt-in and token (tests/cli.rs).
        assert!(load_error("[metrics]\nlisten = \"nowhere\"\n")
            .starts_with("FILE: metrics.listen must be"));
        assert_eq!(
            Config::from_toml("[metrics]\nlisten = \"0.0.0.0:9464\"\n")
                .unwrap()
                .metrics
                .listen,
            Some("0.0.0.0:9464".parse().unwrap())
        );
        let config = Config::from_toml(
            "[network]\nproxy_url = \"localhost:0\"\nsocks_url = \"127.0.0.1:9\"\n[limits]\nshutdown_deadline = 0\nconnect_timeout = 2.5\n",
        )
        .unwrap();
        assert_eq!(config.network.proxy_url, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.network.socks_url, "127.0.0.1:9".parse().unwrap());
        assert_eq!(config.limits.shutdown_deadline, Duration::ZERO);
        assert_eq!(config.limits.connect_timeout, Duration::from_millis(2500));
        assert_eq!(
            config.limits.max_headers,
            crate::Limits::default().max_headers
        );
    }

    #[test]
    fn complete_defaults() {
        let config = Config::default();
        let expected = NetworkConfig {
            enabled: true,
            proxy_url: "127.0.0.1:3128".parse().unwrap(),
            socks_url: "127.0.0.1:8081".parse().unwrap(),
            enable_socks5: true,
            enable_socks5_udp: true,
            allow_upstream_proxy: true,
            dangerously_allow_non_loopback_proxy: false,
            allow_local_binding: false,
            mode: Mode::Full,
            allowed_domains: vec![],
            denied_domains: vec![],
            domains: BTreeMap::new(),
            allow_unix_sockets: vec![],
            unix_sockets: vec![],
            dangerously_allow_all_unix_sockets: false,
            mitm: false,
            limited_allow_git_fetch: true,
            enforce_rules: true,
            all_proxy: AllProxy::Http,
        };
        assert_eq!(config.network, expected);
        assert_eq!(
            config.dns,
            DnsConfig {
                timeout: Duration::from_secs(5),
                hosts: BTreeMap::new()
            }
        );
        assert_eq!(
            config.log,
            LogConfig {
                violations_file: None,
                access_file: None,
                format: crate::records::RecordFormat::Json,
            }
        );
        assert_eq!(Config::from_toml("").unwrap(), config);
    }

    #[test]
    fn codex_keys_and_map_form() {
        let config = Config::from_toml(
            r#"
            [network]
            mode = "limited"
            allowed_domains = ["example.com", "*.github.com"]
            denied_domains = ["evil.example.com"]
            domains = { "pypi.org" = "allow", "ads.test" = "deny" }
            enable_socks5_udp = false
            [dns]
            timeout = 1.5
            hosts = { "svc.test" = ["127.0.0.1"] }
            "#,
        )
        .unwrap();
        let policy = config.policy("test").unwrap();
        assert_eq!(policy.mode(), Mode::Limited);
        assert_eq!(policy.allowed().len(), 3);
        assert_eq!(policy.denied().len(), 2);
        assert_eq!(config.dns.timeout, Duration::from_millis(1500));
        assert_eq!(
            config.dns_hosts("t").unwrap()["svc.test"],
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[network]\nallowed_domainz = [\"x\"]\n").unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("allowed_domainz") && error.contains("bad.toml"),
            "{error}"
        );
        std::fs::write(&path, "[network]\nenable_socks5 = \"yes\"\n").unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("enable_socks5") && error.contains("bad.toml"),
            "{error}"
        );
        let config =
            Config::from_toml("[network]\ndenied_domains = [\"ok.test\", \"*\"]\n").unwrap();
        let error = config.policy("bad.toml").unwrap_err().to_string();
        assert!(
            error.contains("network.denied_domains[1]") && error.contains("bad.toml"),
            "{error}"
        );
        // A list entry is parsed as it is read: the error names its place.
        std::fs::write(
            &path,
            "[network]\nallowed_domains = [\"ok.test\", \"a.*.com\"]\n",
        )
        .unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("bad.toml: network.allowed_domains[1]: \"a.*.com\": a wildcard"),
            "{error}"
        );
        let missing = Config::load(Some(Path::new("/nonexistent/portcullis.toml"))).unwrap_err();
        assert!(missing.to_string().contains("does not exist"));
        let error = Config::from_toml("[network]\nproxy_url = \"http://example.com:80\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("network.proxy_url"), "{error}");
    }
}
