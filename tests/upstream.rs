//! Chaining through a real upstream proxy (squid): names are resolved and
//! vetted here, and the upstream is asked for the vetted address, so a
//! name the upstream would resolve to a private address is refused here;
//! `[upstream] resolve = "upstream"` is the opt-in that reaches it. curl
//! through `run`, loopback only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// squid on a free loopback port, answering `private.test` with 127.0.0.1
/// from its own hosts file (the way a corporate proxy's DNS would); killed
/// when dropped.
struct Squid {
    _child: tokio::process::Child,
    url: String,
    log: PathBuf,
    /// The CA of an `https://` squid's certificate (PEM).
    ca: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Squid {
    async fn start() -> Option<Squid> {
        Squid::start_with(None).await
    }

    /// squid requiring `user`'s `password` (its `proxy_auth` ACL, NCSA
    /// passwords) when `auth` is given.
    async fn start_with(auth: Option<(&str, &str)>) -> Option<Squid> {
        Squid::start_full(auth, false).await
    }

    /// squid listening with TLS (`https_port`), its certificate for
    /// 127.0.0.1 issued by a CA of its own.
    async fn start_tls() -> Option<Squid> {
        Squid::start_full(None, true).await
    }

    async fn start_full(auth: Option<(&str, &str)>, tls: bool) -> Option<Squid> {
        if which("squid").is_none() {
            assert!(
                std::env::var_os("PORTCULLIS_SQUID_REQUIRED").is_none(),
                "squid is required here (.ci/run installs it)"
            );
            println!("squid is not installed: skipped");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // squid started as root works as its own user: it must write here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(dir.path().join("hosts"), "127.0.0.1 private.test\n").unwrap();
        let access = match auth {
            Some((user, password)) => {
                let hashed = std::process::Command::new("openssl")
                    .args(["passwd", "-apr1", password])
                    .output()
                    .unwrap();
                let hashed = String::from_utf8(hashed.stdout).unwrap();
                std::fs::write(
                    dir.path().join("passwd"),
                    format!("{user}:{}\n", hashed.trim()),
                )
                .unwrap();
                format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\nacl authed proxy_auth REQUIRED\nhttp_access allow localhost authed\n",
                    path("passwd")
                )
            }
            None => "http_access allow localhost\n".to_owned(),
        };
        let (listen, scheme, ca) = if tls {
            let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test proxy CA");
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&leaf_key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join("proxy.pem"), leaf.pem()).unwrap();
            std::fs::write(dir.path().join("proxy.key"), leaf_key.serialize_pem()).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
            for file in ["proxy.pem", "proxy.key"] {
                std::fs::set_permissions(
                    dir.path().join(file),
                    std::os::unix::fs::PermissionsExt::from_mode(0o644),
                )
                .unwrap();
            }
            (
                format!(
                    "https_port 127.0.0.1:{port} tls-cert={} tls-key={}",
                    path("proxy.pem"),
                    path("proxy.key")
                ),
                "https",
                Some(dir.path().join("ca.pem")),
            )
        } else {
            (format!("http_port 127.0.0.1:{port}"), "http", None)
        };
        std::fs::write(
            dir.path().join("squid.conf"),
            format!(
                "{listen}\n{access}http_access deny all\ncache deny all\ncache_mem 8 MB\npinger_enable off\naccess_log stdio:{}\ncache_log {}\npid_filename {}\ncoredump_dir {}\nhosts_file {}\nshutdown_lifetime 0 seconds\nworkers 1\n",
                path("access.log"),
                path("cache.log"),
                path("squid.pid"),
                dir.path().display(),
                path("hosts"),
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new("squid")
            // A service name of its own: squids started at once would
            // otherwise share (and fight over) their shared-memory names.
            .args(["-N", "-n", &format!("portcullistest{port}"), "-f"])
            .arg(dir.path().join("squid.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "squid did not listen: {}",
                std::fs::read_to_string(dir.path().join("cache.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(Squid {
            _child: child,
            url: format!("{scheme}://127.0.0.1:{port}"),
            log: dir.path().join("access.log"),
            ca,
            _dir: dir,
        })
    }

    /// squid's access log so far (written as each request ends).
    async fn log(&self) -> String {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// `run --config` (a file in `dir` holding `toml`) chained through
/// `squid`, running `script`: its stdout, and its stderr.
async fn chained(dir: &Path, squid: &Squid, toml: &str, script: &str) -> (String, String) {
    let config = dir.join("chained.toml");
    std::fs::write(&config, toml).unwrap();
    let (code, stdout, stderr) = output(
        portcullis()
            .env("HTTP_PROXY", &squid.url)
            .env("HTTPS_PROXY", &squid.url)
            .env(
                "PATH",
                format!("/usr/sbin:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &format!("{script}\ntrue")]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    (stdout, stderr)
}

#[tokio::test]
async fn a_name_the_upstream_resolves_to_a_private_address_is_refused_here() {
    let Some(squid) = Squid::start().await else {
        return;
    };
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"curl -s -o /dev/null -w "plain %{{http_code}}\n" http://private.test:{port}/
curl -s -o /dev/null -w "tunnel %{{http_code}}\n" -p http://private.test:{port}/
"#
    );
    // portcullis knows the name as the upstream does: 127.0.0.1.
    let toml = |resolve: &str| {
        format!(
            "[network]\nallowed_domains = [\"private.test\"]\n[dns]\nhosts = {{ \"private.test\" = [\"127.0.0.1\"] }}\n{resolve}"
        )
    };
    let (stdout, stderr) = chained(dir.path(), &squid, &toml(""), &script).await;
    assert_eq!(stdout, "plain 403\ntunnel 000\n", "{stderr}");
    assert!(
        stderr.contains("local or private address 127.0.0.1"),
        "{stderr}"
    );
    assert!(
        !squid.log().await.contains("private.test"),
        "the upstream was never asked"
    );
    // The opt-in: the upstream resolves, and reaches what it resolves.
    let (stdout, stderr) = chained(
        dir.path(),
        &squid,
        &toml("[upstream]\nresolve = \"upstream\"\n"),
        &script,
    )
    .await;
    assert_eq!(stdout, "plain 200\ntunnel 200\n", "{stderr}");
    assert!(
        stderr.contains("resolve = \"upstream\""),
        "warned: {stderr}"
    );
    let log = squid.log().await;
    assert!(
        log.contains(&format!("CONNECT private.test:{port}")),
        "{log}"
    );
    // An IP literal is vetted here either way.
    let (stdout, _) = chained(
        dir.path(),
        &squid,
        &toml("[upstream]\nresolve = \"upstream\"\n"),
        &format!("curl -s -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{port}/"),
    )
    .await;
    assert_eq!(stdout, "403\n");
}

#[tokio::test]
async fn an_allowed_name_is_asked_of_the_upstream_by_its_vetted_address() {
    let Some(squid) = Squid::start().await else {
        return;
    };
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let toml = "[network]\nallowed_domains = [\"private.test\"]\nallow_local_binding = true\n[dns]\nhosts = { \"private.test\" = [\"127.0.0.1\"] }\n";
    let script = format!(
        r#"curl -s -D - -o /dev/null http://private.test:{port}/ | tr -d '\r' | grep -i '^x-seen-host:'
curl -s -o /dev/null -w "tunnel %{{http_code}}\n" -p http://private.test:{port}/
"#
    );
    let (stdout, stderr) = chained(dir.path(), &squid, toml, &script).await;
    assert_eq!(
        stdout,
        format!("x-seen-host: private.test:{port}\ntunnel 200\n"),
        "the origin sees the name; {stderr}"
    );
    let log = squid.log().await;
    // Plain HTTP too goes through a tunnel to the address: sent to the
    // upstream in absolute form, its Host would be rewritten to it.
    assert_eq!(
        log.matches(&format!("CONNECT 127.0.0.1:{port}")).count(),
        2,
        "the upstream was asked for the vetted address: {log}"
    );
    assert!(!log.contains("private.test"), "{log}");
    // `check` names the address a chained request asks the upstream for.
    let (code, stdout, stderr) = output(
        portcullis()
            .env("HTTP_PROXY", &squid.url)
            .args(["check", "--config"])
            .arg(dir.path().join("chained.toml"))
            .arg(format!("http://private.test:{port}/")),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("addresses: 127.0.0.1:{port}")),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_upstream_s_credentials_come_from_a_file_and_reach_no_child_or_log() {
    let password = "upstr3am-pw-7Qz";
    let Some(squid) = Squid::start_with(Some(("agent", password))).await else {
        return;
    };
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("upstream.pw");
    let toml = |file: &Path| {
        format!(
            "[network]\nallowed_domains = [\"ok.test\"]\nallow_local_binding = true\n[dns]\nhosts = {{ \"ok.test\" = [\"127.0.0.1\"] }}\n[log]\nviolations_file = {:?}\n[upstream]\nurl = {:?}\nusername = \"agent\"\npassword = {{ file = {file:?} }}\n",
            dir.path().join("violations.jsonl"),
            squid.url
        )
    };
    std::fs::write(&secret, format!("{password}\n")).unwrap();
    let script = format!(
        r#"curl -s -o /dev/null -w "plain %{{http_code}}\n" http://ok.test:{port}/
curl -s -o /dev/null -w "tunnel %{{http_code}}\n" -p http://ok.test:{port}/
env | grep -c '{password}' || true
"#
    );
    // `[upstream] url` chains whatever the environment says.
    let config = dir.path().join("chained.toml");
    std::fs::write(&config, toml(&secret)).unwrap();
    let (code, stdout, stderr) = output(
        portcullis()
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "plain 200\ntunnel 200\n0\n", "{stderr}");
    assert!(
        stderr.contains(&format!("chaining through {}", squid.url)),
        "{stderr}"
    );
    assert!(!stderr.contains(password), "{stderr}");
    let log = squid.log().await;
    assert!(log.contains("agent"), "squid saw the user: {log}");

    // A wrong password: squid's 407 is the upstream's refusal, said so.
    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "not-it\n").unwrap();
    std::fs::write(&config, toml(&wrong)).unwrap();
    let (_, stdout, stderr) = output(portcullis().args(["run", "--config"]).arg(&config).args([
        "--",
        "sh",
        "-c",
        &format!("curl -s http://ok.test:{port}/"),
    ]))
    .await;
    assert!(
        stdout.contains("refused the credentials portcullis gave (407)")
            && stdout.contains("[upstream] username and password"),
        "{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("not-it") && !stderr.contains("not-it"));
    let violations =
        std::fs::read_to_string(dir.path().join("violations.jsonl")).unwrap_or_default();
    assert!(!violations.contains(password) && !violations.contains("not-it"));

    // From a variable: the command never inherits it.
    let text = toml(&secret).replace(
        &format!("password = {{ file = {secret:?} }}"),
        "password = { env = \"UPSTREAM_PW\" }",
    );
    std::fs::write(&config, text).unwrap();
    let (code, stdout, stderr) = output(
        portcullis()
            .env("UPSTREAM_PW", password)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "plain 200\ntunnel 200\n0\n", "{stderr}");
}

#[tokio::test]
async fn an_upstream_that_cannot_be_used_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (upstream, key) in [
        ("url = \"socks5://proxy.test:1080\"", "upstream.url"),
        ("ca_file = \"/nonexistent/ca.pem\"", "upstream.ca_file"),
        ("url = \"https://u:pw@proxy.test:3128\"", "upstream.url"),
        ("url = \"http://user:pw@proxy.test:3128\"", "upstream.url"),
        ("url = \"http://proxy.test:3128\"\nusername = \"u\"", "upstream.password"),
        (
            "url = \"http://proxy.test:3128\"\nusername = \"u\"\npassword = { file = \"/nonexistent/pw\" }",
            "upstream.password",
        ),
        ("resolve = \"sometimes\"", "upstream.resolve"),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, format!("[upstream]\n{upstream}\n")).unwrap();
        let (code, _, stderr) = output(
            portcullis()
                .args(["serve", "--config"])
                .arg(&config)
                .args(["--http", "127.0.0.1:0", "--no-socks"]),
        )
        .await;
        assert_eq!(code, Some(64), "{upstream}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(!stderr.contains("pw@"), "{stderr}");
    }
}

/// A profile can chain through an upstream of its own while another goes
/// direct, in one serve.
#[tokio::test]
async fn each_profile_chains_through_its_own_upstream() {
    let Some(squid) = Squid::start().await else {
        return;
    };
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    for user in ["c", "d"] {
        std::fs::write(dir.path().join(user), format!("pw-{user}")).unwrap();
    }
    let config = dir.path().join("profiles.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallowed_domains = [\"ok.test\"]\nallow_local_binding = true\n[dns]\nhosts = {{ \"ok.test\" = [\"127.0.0.1\"] }}\n[[auth.users]]\nname = \"c\"\nprofile = \"chained\"\npassword = {{ file = {:?} }}\n[[auth.users]]\nname = \"d\"\nprofile = \"direct\"\npassword = {{ file = {:?} }}\n[profiles.chained.upstream]\nurl = {:?}\n[profiles.direct]\n",
            dir.path().join("c"),
            dir.path().join("d"),
            squid.url
        ),
    )
    .unwrap();
    // The profile's own upstream; the top level chains nowhere.
    let (mut serve, proxy) = serve_config(&config).await;
    let url = format!("http://ok.test:{port}/");
    for user in ["c", "d"] {
        let with = proxy.replacen("http://", &format!("http://{user}:pw-{user}@"), 1);
        assert_eq!(curl_status(&["-x", &with, &url]).await, "200");
    }
    let (_, stderr) = terminate(&mut serve).await;
    assert!(stderr.contains("for profile chained"), "{stderr}");
    let log = squid.log().await;
    assert_eq!(
        log.matches(&format!("CONNECT 127.0.0.1:{port}")).count(),
        1,
        "only the chained profile's request went through the upstream: {log}"
    );
}

/// An `https://` upstream with a CA of its own: trusted through
/// `[upstream] ca_file`, every request goes through it over TLS (plain
/// HTTP and tunnels alike); without the CA file, nothing goes, and the
/// refusal names the key.
#[tokio::test]
async fn an_https_upstream_is_trusted_through_its_ca_file() {
    let Some(squid) = Squid::start_tls().await else {
        return;
    };
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let ca = squid.ca.clone().unwrap();
    let script = format!(
        r#"curl -s -o /dev/null -w "plain %{{http_code}}\n" http://private.test:{port}/
curl -s -o /dev/null -w "tunnel %{{http_code}}\n" -p http://private.test:{port}/
curl -s -D - -o /dev/null http://private.test:{port}/ | tr -d '\r' | grep -i '^x-proxy-error:'
"#
    );
    let toml = |extra: &str| {
        format!(
            "[network]\nallowed_domains = [\"private.test\"]\nallow_local_binding = true\n[dns]\nhosts = {{ \"private.test\" = [\"127.0.0.1\"] }}\n[upstream]\nurl = \"{}\"\n{extra}",
            squid.url
        )
    };
    let (stdout, stderr) = chained(
        dir.path(),
        &squid,
        &toml(&format!("ca_file = {ca:?}\n")),
        &script,
    )
    .await;
    assert_eq!(stdout, "plain 200\ntunnel 200\n", "{stderr}");
    let log = squid.log().await;
    assert!(
        log.matches(&format!("CONNECT 127.0.0.1:{port}")).count() >= 2,
        "both went through the https upstream (the third plain request reuses the first's pooled tunnel): {log}"
    );
    // Without the CA, the proxy's certificate is not trusted: nothing is
    // sent, and the answer says what to set.
    let connects = |log: String| log.matches("CONNECT").count();
    let before = connects(squid.log().await);
    let (stdout, stderr) = chained(dir.path(), &squid, &toml(""), &script).await;
    assert!(
        stdout.starts_with("plain 502\ntunnel 000\nx-proxy-error: upstream-"),
        "{stdout}{stderr}"
    );
    assert!(stderr.contains("[upstream] ca_file"), "{stderr}");
    assert_eq!(
        connects(squid.log().await),
        before,
        "no request reached squid (only failed handshakes)"
    );
}

/// Real clients under `run`, chained through squid: curl, git (dumb
/// HTTP), pip (a PEP 503 index) and python `requests` all get their
/// files, and squid saw every connection (to the vetted address).
#[tokio::test]
async fn curl_git_pip_and_python_work_through_run_with_chaining_on() {
    let Some(squid) = Squid::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&root).unwrap();
    dumb_git_repo(&root, &work, "through squid").await;
    std::fs::write(root.join("hello.txt"), "plain hello\n").unwrap();
    let wheel = pip_index(&root).await;
    let port = files(root).await.port();
    let clone = dir.path().join("clone");
    let target = dir.path().join("downloaded");
    let script = format!(
        r#"curl -sS http://files.test:{port}/hello.txt
git clone -q http://files.test:{port}/repo.git {clone} && git -C {clone} log --format=%s
python3 -m pip download --no-deps --disable-pip-version-check --no-cache-dir -q --trusted-host files.test --index-url http://files.test:{port}/simple/ -d {target} demo-pkg && ls {target}
python3 -c 'import requests; print(requests.get("http://files.test:{port}/hello.txt").text.strip())'
"#,
        clone = clone.display(),
        target = target.display()
    );
    let toml = "[network]\nallowed_domains = [\"files.test\"]\nallow_local_binding = true\n[dns]\nhosts = { \"files.test\" = [\"127.0.0.1\"] }\n";
    let (stdout, stderr) = chained(dir.path(), &squid, toml, &script).await;
    assert_eq!(
        stdout,
        format!("plain hello\nthrough squid\n{wheel}\nplain hello\n"),
        "{stderr}"
    );
    let log = squid.log().await;
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{port}")),
        "chained: {log}"
    );
    assert!(
        !log.contains("files.test"),
        "the upstream was asked for the address: {log}"
    );
}

/// A reload changes the upstream: another proxy, with credentials read
/// again from their file; from the next connection on, nothing restarts.
/// A password file that cannot be read keeps the old upstream.
#[tokio::test]
async fn a_reload_moves_to_another_upstream_with_its_credentials() {
    let Some(first) = Squid::start().await else {
        return;
    };
    let password = "second-pw-3Kd";
    let Some(second) = Squid::start_with(Some(("agent", password))).await else {
        return;
    };
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("upstream.pw");
    std::fs::write(&secret, format!("{password}\n")).unwrap();
    let base = "[network]\nallowed_domains = [\"ok.test\"]\nallow_local_binding = true\n[dns]\nhosts = { \"ok.test\" = [\"127.0.0.1\"] }\n";
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!("{base}[upstream]\nurl = {:?}\n", first.url),
    )
    .unwrap();
    let (mut child, proxy) = serve_config(&config).await;
    let tunnel = || {
        let proxy = proxy.clone();
        async move { curl_status(&["-p", "-x", &proxy, &format!("http://ok.test:{port}/")]).await }
    };
    assert_eq!(tunnel().await, "200");
    assert!(first.log().await.contains("CONNECT 127.0.0.1"));
    // The second squid, with its credentials from the file.
    std::fs::write(
        &config,
        format!(
            "{base}[upstream]\nurl = {:?}\nusername = \"agent\"\npassword = {{ file = {secret:?} }}\n",
            second.url
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.log().await.contains("CONNECT 127.0.0.1") {
        assert!(
            Instant::now() < deadline,
            "never chained through the second upstream"
        );
        assert_eq!(tunnel().await, "200");
    }
    let through_first = first.log().await.matches("CONNECT").count();
    assert_eq!(tunnel().await, "200");
    assert_eq!(
        first.log().await.matches("CONNECT").count(),
        through_first,
        "the first upstream is no longer used"
    );
    // A password file gone: the reload is refused, the upstream kept.
    let gone = dir.path().join("gone.pw");
    std::fs::write(
        &config,
        format!(
            "{base}[upstream]\nurl = {:?}\nusername = \"agent\"\npassword = {{ file = {gone:?} }}\n# changed\n",
            first.url
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(tunnel().await, "200");
    assert_eq!(
        first.log().await.matches("CONNECT").count(),
        through_first,
        "a reload that cannot read the password changes nothing"
    );
    let (status, stderr) = terminate(&mut child).await;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("upstream.password"), "{stderr}");
    assert!(!stderr.contains(password), "{stderr}");
}
