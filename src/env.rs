//! The environment a child process gets to use the proxy.
//!
//! The list follows the codex network proxy: the usual `*_PROXY` variables
//! in both cases, and the variables npm, yarn, pip, cargo and docker read.
//!
//! A departure from codex: `ALL_PROXY`/`all_proxy` are the **HTTP** URL by
//! default. Python's httpx (inside the OpenAI and Anthropic SDKs) fails on
//! every request, plain HTTP included, when `ALL_PROXY` is a SOCKS URL and the
//! `socksio` package is missing; every common client understands the HTTP
//! URL. The SOCKS5 URL (`socks5h://`: names resolved by the proxy) is
//! exported as `PORTCULLIS_SOCKS_URL`, a name no client reads as a proxy:
//! python's `websockets` (14+) prefers any `*_proxy` variable naming a
//! SOCKS proxy (it reads `socks_proxy` and `SOCKS_PROXY` through
//! `urllib.request.getproxies`) and then fails without `python-socks`,
//! while no other common client reads `socks_proxy` at all. `[network]
//! all_proxy = "socks5h"` puts it in `ALL_PROXY` as codex does, and then in
//! `SOCKS_PROXY`/`socks_proxy` too. `NODE_USE_ENV_PROXY=1`
//! makes node (24 and later) honour the variables in its built-in `fetch`.
//!
//! One departure from codex: `NO_PROXY` is set to the empty string, not to
//! the loopback names, so that a child cannot reach local services around
//! the policy and an inherited `NO_PROXY` cannot open a bypass.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The files a child needs to trust the interception CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The CA certificate alone (`NODE_EXTRA_CA_CERTS` adds it to node's roots).
    pub ca_cert: PathBuf,
    /// The system's roots and the CA (for clients whose variable replaces
    /// their roots).
    pub bundle: PathBuf,
}

/// What the child's proxy variables are made from.
#[derive(Debug, Clone, Copy)]
pub struct ProxyEnv<'a> {
    /// The HTTP listener.
    pub http: SocketAddr,
    /// The SOCKS5 listener, when on.
    pub socks: Option<SocketAddr>,
    /// The interception CA's files, when interception is on.
    pub ca: Option<&'a CaFiles>,
    /// The credential clients must present, when one is required.
    pub credentials: Option<(&'a str, &'a str)>,
    /// Whether `ALL_PROXY` is the SOCKS5 URL (codex's choice) rather than the
    /// HTTP one.
    pub all_proxy_socks: bool,
}

/// The variables, in a stable order; with a CA, the CA bundle variables too.
pub fn proxy_env(settings: &ProxyEnv<'_>) -> Vec<(String, String)> {
    let ProxyEnv {
        http,
        socks,
        ca,
        credentials,
        all_proxy_socks,
    } = *settings;
    // Credentials go in the URLs' userinfo (percent-encoded), where curl,
    // git, pip, requests, httpx, npm and cargo read them.
    let userinfo = credentials
        .map(|(user, password)| format!("{}:{}@", encode(user), encode(password)))
        .unwrap_or_default();
    let http_url = format!("http://{userinfo}{http}");
    let socks_url = socks.map(|socks| format!("socks5h://{userinfo}{socks}"));
    let all_url = match (&socks_url, all_proxy_socks) {
        (Some(socks_url), true) => socks_url.clone(),
        _ => http_url.clone(),
    };
    let mut env = Vec::new();
    let mut set = |name: &str, value: &str| env.push((name.to_owned(), value.to_owned()));
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        set(name, &http_url);
    }
    set("ALL_PROXY", &all_url);
    set("all_proxy", &all_url);
    if let Some(socks_url) = &socks_url {
        set("PORTCULLIS_SOCKS_URL", socks_url);
        if all_proxy_socks {
            set("SOCKS_PROXY", socks_url);
            set("socks_proxy", socks_url);
        }
    }
    set("NODE_USE_ENV_PROXY", "1");
    set("NO_PROXY", "");
    set("no_proxy", "");
    for name in [
        "npm_config_proxy",
        "npm_config_https_proxy",
        "NPM_CONFIG_PROXY",
        "NPM_CONFIG_HTTPS_PROXY",
        "YARN_HTTP_PROXY",
        "YARN_HTTPS_PROXY",
        "PIP_PROXY",
        "CARGO_HTTP_PROXY",
        "BUNDLE_HTTP_PROXY",
        "BUNDLE_HTTPS_PROXY",
        "DOCKER_HTTP_PROXY",
        "DOCKER_HTTPS_PROXY",
    ] {
        set(name, &http_url);
    }
    if let Some(ca) = ca {
        let bundle = ca.bundle.display().to_string();
        for name in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "PIP_CERT",
            "CARGO_HTTP_CAINFO",
        ] {
            set(name, &bundle);
        }
        set("NODE_EXTRA_CA_CERTS", &ca.ca_cert.display().to_string());
    }
    env
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(byte))
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The variables as `export NAME='VALUE'` lines for a POSIX shell.
pub fn export_lines(env: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in env {
        out.push_str(&format!(
            "export {name}='{}'\n",
            value.replace('\'', "'\\''")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socks_on_and_off() {
        let http: SocketAddr = "127.0.0.1:3128".parse().unwrap();
        let socks: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let get = |env: &[(String, String)], name: &str| {
            env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        let base = ProxyEnv {
            http,
            socks: Some(socks),
            ca: None,
            credentials: None,
            all_proxy_socks: false,
        };
        let with = proxy_env(&base);
        assert_eq!(
            get(&with, "ALL_PROXY").as_deref(),
            Some("http://127.0.0.1:3128"),
            "ALL_PROXY is the HTTP URL, which httpx takes without socksio"
        );
        assert_eq!(
            get(&with, "PORTCULLIS_SOCKS_URL").as_deref(),
            Some("socks5h://127.0.0.1:8081")
        );
        // No `*_proxy` names SOCKS by default: websockets would pick it.
        assert!(with.iter().all(
            |(name, value)| !(name.to_ascii_lowercase().ends_with("_proxy")
                && value.starts_with("socks"))
        ));
        assert_eq!(get(&with, "NODE_USE_ENV_PROXY").as_deref(), Some("1"));
        let codex = proxy_env(&ProxyEnv {
            all_proxy_socks: true,
            ..base
        });
        assert_eq!(
            get(&codex, "all_proxy").as_deref(),
            Some("socks5h://127.0.0.1:8081")
        );
        assert_eq!(
            get(&codex, "socks_proxy").as_deref(),
            Some("socks5h://127.0.0.1:8081")
        );
        assert_eq!(
            get(&with, "https_proxy").as_deref(),
            Some("http://127.0.0.1:3128")
        );
        assert_eq!(get(&with, "NO_PROXY").as_deref(), Some(""));
        let without = proxy_env(&ProxyEnv {
            socks: None,
            ..base
        });
        assert_eq!(
            get(&without, "all_proxy").as_deref(),
            Some("http://127.0.0.1:3128")
        );
        assert!(export_lines(&without).starts_with("export HTTP_PROXY='http://127.0.0.1:3128'\n"));
        assert!(get(&without, "SSL_CERT_FILE").is_none());
        let ca = CaFiles {
            ca_cert: "/ca/ca.pem".into(),
            bundle: "/ca/bundle.pem".into(),
        };
        let intercepting = proxy_env(&ProxyEnv {
            ca: Some(&ca),
            ..base
        });
        for name in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "PIP_CERT",
            "CARGO_HTTP_CAINFO",
        ] {
            assert_eq!(
                get(&intercepting, name).as_deref(),
                Some("/ca/bundle.pem"),
                "{name}"
            );
        }
        assert_eq!(
            get(&intercepting, "NODE_EXTRA_CA_CERTS").as_deref(),
            Some("/ca/ca.pem")
        );
    }
}
