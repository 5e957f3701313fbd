//! `[[credentials]]`: secrets the proxy adds for their hosts, read from
//! where the configuration says (`env`, `file` or `command`), kept in
//! memory only; and the placeholders a child gets instead.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_middleware::credentials::{
    Credential, CredentialError, Credentials, Injection, StaticSecrets,
};

use crate::config::{ConfigError, CredentialConfig};

/// How long a `source.command` may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Token prefixes kept in a placeholder, so clients that check a token's
/// shape still start (longest first).
const PREFIXES: [&str; 16] = [
    "github_pat_",
    "sk-ant-api03-",
    "sk-proj-",
    "sk-ant-",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "hf_",
    "sk-",
    "AKIA",
    "npm_",
];

/// The credentials of a configuration, their secrets, and what a child
/// gets in their place.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// For the stack.
    pub credentials: Credentials,
    /// Variables the child gets: each `placeholder_env` and its placeholder.
    pub placeholders: Vec<(String, String)>,
    /// Variables the child must not get: each `source.env`.
    pub removed: Vec<String>,
    /// The secrets themselves, for a reload to refresh.
    pub store: Arc<StaticSecrets>,
}

/// Reads every credential's secret and makes its placeholder. `origin`
/// names the file in errors. Without `read` (for `check`, which sends
/// nothing) no secret is read: each is a marker naming the credential.
pub fn load(list: &[CredentialConfig], origin: &str, read: bool) -> Result<Loaded, ConfigError> {
    let secrets = Arc::new(StaticSecrets::default());
    let mut credentials = Vec::with_capacity(list.len());
    let mut placeholders = Vec::new();
    let mut removed = Vec::new();
    for (index, config) in list.iter().enumerate() {
        let key = format!("credentials[{index}]");
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            key: format!("{key}{field}"),
            origin: origin.to_owned(),
            message,
        };
        let injection = match (&config.value, &config.basic) {
            (Some(template), None) => Injection::header(&config.header, template),
            (None, Some(basic)) => Injection::basic(&basic.username),
            _ => {
                return Err(invalid(
                    "",
                    "give either value (a header template with {secret}) or basic = { username = \"…\" }".into(),
                ))
            }
        }
        .map_err(|e: CredentialError| invalid("", e.to_string()))?;
        let secret = if read {
            read_secret(&config.source, &config.name).map_err(|message| {
                ConfigError::Unavailable {
                    key: format!("{key}.source"),
                    origin: origin.to_owned(),
                    message,
                }
            })?
        } else {
            let source = &config.source;
            let sources = [
                source.env.is_some(),
                source.file.is_some(),
                source.command.is_some(),
            ];
            if sources.iter().filter(|given| **given).count() != 1 {
                return Err(ConfigError::Unavailable {
                    key: format!("{key}.source"),
                    origin: origin.to_owned(),
                    message: format!(
                        "credential {:?}: give exactly one of env, file or command",
                        config.name
                    ),
                });
            }
            format!("unread-by-check-{}", config.name)
        };
        let placeholder = placeholder_for(&secret);
        let mut credential = Credential::new(config.name.clone(), injection)
            .placeholder(placeholder.clone())
            .replace(config.replace)
            .allow_plaintext(config.allow_plaintext);
        for (position, host) in config.hosts.iter().enumerate() {
            credential = credential
                .host(host)
                .map_err(|e| invalid(&format!(".hosts[{position}]"), e.to_string()))?;
        }
        secrets.set(&config.name, secret);
        if let Some(name) = &config.source.env {
            removed.push(name.clone());
        }
        if let Some(name) = &config.placeholder_env {
            placeholders.push((name.clone(), placeholder));
        }
        credentials.push(credential);
    }
    Ok(Loaded {
        credentials: Credentials::new(credentials, secrets.clone()),
        placeholders,
        removed,
        store: secrets,
    })
}

/// Takes the values of the variables `names` out of this process's
/// original environment block — what `/proc/PID/environ` shows to any
/// process allowed to read it (root included) — and keeps them readable to
/// this process alone (a heap copy, as `setenv` makes it). Call it before
/// any other thread starts: it changes the environment. Returns how many
/// values it cleared.
///
/// The block is found from `/proc/self/stat` (`env_start`, `env_end`) and
/// rewritten through `/proc/self/mem`: each `NAME=value` of `names` keeps
/// its `NAME=` and has its value overwritten with NUL bytes.
#[cfg(target_os = "linux")]
pub fn scrub_from_environ_block(names: &[String]) -> Result<usize, String> {
    use std::os::unix::fs::FileExt;
    let present: Vec<(&String, std::ffi::OsString)> = names
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|value| (name, value)))
        .collect();
    if present.is_empty() {
        return Ok(0);
    }
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| format!("cannot read /proc/self/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold
    // anything: env_start and env_end are fields 50 and 51.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("cannot parse /proc/self/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> Result<u64, String> {
        fields
            .get(number - 3)
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| format!("/proc/self/stat has no field {number}"))
    };
    let (start, end) = (field(50)?, field(51)?);
    let length = usize::try_from(end.saturating_sub(start)).map_err(|e| e.to_string())?;
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| format!("cannot open /proc/self/mem: {e}"))?;
    let mut block = vec![0u8; length];
    memory
        .read_exact_at(&mut block, start)
        .map_err(|e| format!("cannot read the environment block: {e}"))?;
    // Heap copies first, so the program still reads the values.
    for (name, value) in &present {
        std::env::set_var(name, value);
    }
    let mut cleared = 0;
    let mut offset = 0usize;
    for entry in block.split(|&byte| byte == 0) {
        let entry_length = entry.len();
        if let Some(equals) = entry.iter().position(|&byte| byte == b'=') {
            let name = entry.get(..equals).unwrap_or_default();
            if present.iter().any(|(wanted, _)| wanted.as_bytes() == name) {
                let zeros = vec![0u8; entry_length - equals - 1];
                memory
                    .write_all_at(&zeros, start + (offset + equals + 1) as u64)
                    .map_err(|e| format!("cannot overwrite the environment block: {e}"))?;
                cleared += 1;
            }
        }
        offset += entry_length + 1;
    }
    Ok(cleared)
}

/// On reload: reads each credential's secret again into `store`; one that
/// cannot be read keeps the secret in force, and the log says why. What
/// else changed in `[[credentials]]` (hosts, new credentials) applies after
/// a restart, and the log says that too.
pub fn refresh(started: &[CredentialConfig], now: &[CredentialConfig], store: &StaticSecrets) {
    if started != now {
        tracing::warn!(
            "[[credentials]] changed: their hosts, headers and new credentials apply after a restart; only the secrets of the credentials this proxy started with are read again"
        );
    }
    for credential in now {
        if !started.iter().any(|s| s.name == credential.name) {
            continue;
        }
        match read_secret(&credential.source, &credential.name) {
            Ok(secret) => store.set(&credential.name, secret),
            Err(why) => tracing::warn!("{why}; keeping the secret in force"),
        }
    }
}

/// `[[auth.users]]`: the proxy users and their passwords, read from their
/// sources (`read = false`, for `check`: each stands for itself, nothing
/// is read). Names are checked as `[auth] username` is, and unique.
pub fn user_passwords(
    auth: &crate::config::AuthConfig,
    origin: &str,
    read: bool,
) -> Result<Vec<(String, String)>, ConfigError> {
    let this = auth;
    let mut users: Vec<(String, String)> = Vec::with_capacity(this.users.len());
    for (index, user) in this.users.iter().enumerate() {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("auth.users[{index}].{key}"),
            origin: origin.to_owned(),
            message,
        };
        let name = &user.name;
        if name.is_empty() || name.contains(':') || name.len() > 255 {
            return Err(invalid(
                "name",
                "must be 1 to 255 bytes without ':' (SOCKS5 and Basic auth carry it)".into(),
            ));
        }
        if users.iter().any(|(known, _)| known == name)
            || this.username.as_deref() == Some(name.as_str())
        {
            return Err(invalid(
                "name",
                format!("{name:?} is already a user; each name once"),
            ));
        }
        let password = if read {
            let password = read_secret(&user.password, name).map_err(|message| {
                invalid("password", message.replacen("credential", "user", 1))
            })?;
            if password.len() > 255 {
                return Err(invalid(
                    "password",
                    "must be at most 255 bytes (SOCKS5 username/password auth carries it)".into(),
                ));
            }
            password
        } else {
            let sources = [
                user.password.env.is_some(),
                user.password.file.is_some(),
                user.password.command.is_some(),
            ];
            if sources.iter().filter(|set| **set).count() != 1 {
                return Err(invalid(
                    "password",
                    "give exactly one of env, file or command".into(),
                ));
            }
            format!("{{password of {name}}}")
        };
        users.push((name.clone(), password));
    }
    Ok(users)
}

/// `[upstream] url` with the upstream's credentials in it (read from
/// their source; `read = false`, for `check`: a stand-in), checked: an
/// `http://` URL with a host and no credentials of its own.
pub fn upstream_url(
    upstream: &crate::config::UpstreamConfig,
    url: &str,
    origin: &str,
    read: bool,
) -> Result<String, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: format!("upstream.{key}"),
        origin: origin.to_owned(),
        message,
    };
    // Never printed with what may be a password in it.
    let shown = crate::upstream::without_credentials(url);
    let parsed: http::Uri = url
        .parse()
        .map_err(|e| invalid("url", format!("{shown:?} is not a URL: {e}")))?;
    let scheme = match parsed.scheme_str() {
        Some(scheme @ ("http" | "https")) if parsed.host().is_some() => scheme,
        _ => {
            return Err(invalid(
                "url",
                format!("{shown:?}: write http://host:port or https://host:port"),
            ))
        }
    };
    let authority = parsed.authority().map(|a| a.as_str()).unwrap_or_default();
    if authority.contains('@') {
        return Err(invalid(
            "url",
            "holds credentials: give username and password = { file = \"…\" } instead".into(),
        ));
    }
    let password = match (&upstream.username, &upstream.password) {
        (None, None) => return Ok(format!("{scheme}://{authority}")),
        (Some(_), None) => return Err(invalid("password", "is missing (username is set)".into())),
        (None, Some(_)) => return Err(invalid("username", "is missing (password is set)".into())),
        (Some(_), Some(source)) if read => read_secret(source, "upstream")
            .map_err(|message| invalid("password", message.replacen("credential", "the", 1)))?,
        (Some(_), Some(_)) => "{upstream password}".to_owned(),
    };
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(byte).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect()
    };
    let username = upstream.username.as_deref().unwrap_or_default();
    Ok(format!(
        "{scheme}://{}:{}@{authority}",
        encode(username),
        encode(&password)
    ))
}

/// `[metrics] bearer_token`, read from its source (`read = false`, for
/// `check`: a stand-in), and checked against `listen`: required beyond
/// loopback, which needs `dangerously_allow_non_loopback`.
pub fn metrics_token(
    metrics: &crate::config::MetricsConfig,
    origin: &str,
    read: bool,
) -> Result<Option<String>, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: format!("metrics.{key}"),
        origin: origin.to_owned(),
        message,
    };
    let token = match &metrics.bearer_token {
        Some(source) if read => Some(read_secret(source, "metrics").map_err(|message| {
            invalid("bearer_token", message.replacen("credential", "the", 1))
        })?),
        Some(_) => Some("{metrics token}".to_owned()),
        None => None,
    };
    if let Some(address) = metrics.listen {
        crate::metrics::check_address(
            address,
            metrics.dangerously_allow_non_loopback,
            token.is_some(),
        )
        .map_err(|message| invalid("listen", message))?;
    }
    Ok(token)
}

/// `[telemetry]` as the exporter's settings (`None` without an
/// `otlp_endpoint`), its headers read from their sources (`read = false`,
/// for `check`: stand-ins) and its CA file loaded; every error names the
/// key.
pub fn telemetry_settings(
    telemetry: &crate::config::TelemetryConfig,
    origin: &str,
    read: bool,
) -> Result<Option<crate::telemetry::TelemetrySettings>, ConfigError> {
    let Some(endpoint) = &telemetry.otlp_endpoint else {
        return Ok(None);
    };
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: format!("telemetry.{key}"),
        origin: origin.to_owned(),
        message,
    };
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        invalid(
            "otlp_endpoint",
            format!("{endpoint:?} is not a URL ({e}): write http://HOST:PORT or https://HOST:PORT"),
        )
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(invalid(
            "otlp_endpoint",
            format!("{endpoint:?}: write http://HOST:PORT or https://HOST:PORT"),
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(invalid(
            "otlp_endpoint",
            format!("{endpoint:?}: give the collector's base URL; /v1/logs and /v1/metrics are added for http/protobuf"),
        ));
    }
    if telemetry.queue_size == 0 {
        return Err(invalid("queue_size", "must be at least 1".into()));
    }
    if telemetry.service_name.trim().is_empty() {
        return Err(invalid("service_name", "must not be empty".into()));
    }
    let mut headers = http::HeaderMap::new();
    for (name, source) in &telemetry.otlp_headers {
        let Ok(key) = http::HeaderName::from_bytes(name.as_bytes()) else {
            return Err(invalid(
                "otlp_headers",
                format!("{name:?} is not a header name"),
            ));
        };
        let value = if read {
            read_secret(source, name).map_err(|message| {
                invalid(
                    &format!("otlp_headers.{name}"),
                    message.replacen("credential", "header", 1),
                )
            })?
        } else {
            format!("{{{name} header}}")
        };
        // Visible ASCII only: what both the gRPC metadata and HTTP take.
        let Ok(value) = http::HeaderValue::from_str(&value) else {
            return Err(invalid(
                &format!("otlp_headers.{name}"),
                "its value is not a valid header value (a newline or control character?)".into(),
            ));
        };
        headers.append(key, value);
    }
    let ca_certificates = match &telemetry.otlp_ca_file {
        Some(path) => crate::config::pem_certificates(&expand_home(path))
            .map_err(|message| invalid("otlp_ca_file", message))?,
        None => Vec::new(),
    };
    let mut settings = crate::telemetry::TelemetrySettings::new(endpoint.clone());
    settings.protocol = telemetry.otlp_protocol;
    settings.headers = headers;
    settings.ca_certificates = ca_certificates;
    settings.service_name = telemetry.service_name.clone();
    if let Some(id) = &telemetry.service_instance_id {
        settings.service_instance_id = id.clone();
    }
    settings.export_access = telemetry.export_access;
    settings.queue_size = telemetry.queue_size;
    settings.metrics_interval = telemetry.metrics_interval;
    settings.export_timeout = telemetry.export_timeout;
    Ok(Some(settings))
}

/// The secret, from its one source; the error says why not (never the
/// value).
pub(crate) fn read_secret(
    source: &crate::config::SourceConfig,
    name: &str,
) -> Result<String, String> {
    let secret = match (&source.env, &source.file, &source.command) {
        (Some(variable), None, None) => std::env::var(variable).map_err(|_| {
            format!("credential {name:?}: the variable {variable} is not set (or not UTF-8) in portcullis's environment")
        })?,
        (None, Some(file), None) => {
            let path = expand_home(file);
            std::fs::read_to_string(&path)
                .map_err(|e| format!("credential {name:?}: cannot read {}: {e}", path.display()))?
        }
        (None, None, Some(command)) => run(command, name)?,
        _ => {
            return Err(format!(
                "credential {name:?}: give exactly one of env, file or command"
            ))
        }
    };
    let secret = secret.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(format!("credential {name:?}: the secret is empty"));
    }
    Ok(secret)
}

fn expand_home(path: &std::path::Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_owned(),
    }
}

/// Runs `command` (no shell) for its stdout, within [`COMMAND_TIMEOUT`].
fn run(command: &[String], name: &str) -> Result<String, String> {
    let Some((program, arguments)) = command.split_first() else {
        return Err(format!("credential {name:?}: source.command is empty"));
    };
    let mut child = std::process::Command::new(program)
        .args(arguments)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("credential {name:?}: cannot run {program}: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => {
                return Err(format!("credential {name:?}: {program} failed ({status})"))
            }
            Ok(None) if started.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "credential {name:?}: {program} did not finish within {}s",
                    COMMAND_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("credential {name:?}: {program}: {e}")),
        }
    }
    let mut output = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_string(&mut output)
            .map_err(|e| format!("credential {name:?}: {program}'s output: {e}"))?;
    }
    Ok(output)
}

/// 128 random bits as hex, from the operating system's randomness (through
/// the standard library's hasher keys).
pub(crate) fn random_secret() -> String {
    use std::hash::BuildHasher;
    let half = || std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{:016x}{:016x}", half(), half())
}

/// A per-start stand-in shaped like `secret`: its known prefix kept, the
/// rest random letters and digits, as long as the secret (at least 32).
pub fn placeholder_for(secret: &str) -> String {
    let prefix = PREFIXES
        .iter()
        .find(|prefix| secret.starts_with(*prefix))
        .copied()
        .unwrap_or("");
    let length = secret.chars().count().max(32);
    let mut placeholder = prefix.to_owned();
    while placeholder.len() < length {
        placeholder.push_str(&random_secret());
    }
    placeholder.truncate(length);
    if placeholder == secret {
        // Not in this universe; still, never hand out the secret.
        placeholder.replace_range(prefix.len().., &"0".repeat(length - prefix.len()));
    }
    placeholder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_keep_the_shape_and_never_the_secret() {
        let secret = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        let placeholder = placeholder_for(secret);
        assert!(placeholder.starts_with("ghp_"), "{placeholder}");
        assert_eq!(placeholder.len(), secret.len());
        assert_ne!(placeholder, secret);
        assert_ne!(placeholder_for(secret), placeholder, "per start");
        assert_eq!(placeholder_for("short").len(), 32);
        assert!(placeholder_for("sk-proj-abc").starts_with("sk-proj-"));
    }
}
