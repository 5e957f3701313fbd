//! What installs and runs portcullis outside a checkout: the completion
//! scripts (loaded in each shell and asked to complete), the manual page
//! (rendered with warnings on), the systemd unit (`systemd-analyze verify`),
//! the container image's command (run as the image would, with its
//! environment and default config), the Kubernetes sidecar (rendered by
//! kustomize, and its ConfigMap update followed the way the kubelet makes
//! it).
//!
//! A tool this machine lacks skips its check and says so, unless
//! `PORTCULLIS_PACKAGING_REQUIRED=1` (CI installs bash, zsh, fish, groff and
//! systemd, and sets it; kubectl is used where it is installed).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const BINARY: &str = env!("CARGO_BIN_EXE_portcullis");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap()
}

/// Whether `tool` can run here; when it cannot, the check is skipped with
/// a line saying so, or fails when packaging checks are required.
fn present(tool: &str) -> bool {
    installed(
        tool,
        std::env::var_os("PORTCULLIS_PACKAGING_REQUIRED").is_some(),
    )
}

fn installed(tool: &str, required: bool) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !required,
            "{tool} is not installed and PORTCULLIS_PACKAGING_REQUIRED is set"
        );
        println!("skipped: {tool} is not installed");
    }
    found
}

/// Runs `shell -c script` (60 s at most): exit code and stdout + stderr.
async fn shell(shell: &str, script: &str) -> (Option<i32>, String) {
    let (code, stdout, stderr) = output(
        tokio::process::Command::new(shell)
            .args(["-c", script])
            .env("PORTCULLIS", BINARY)
            .env_remove("PORTCULLIS_CONFIG"),
    )
    .await;
    (code, format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn each_shell_loads_its_completions_and_completes_a_subcommand() {
    if present("bash") {
        // The script registers a function, and that function completes
        // `portcullis se` to `serve`.
        let (code, printed) = shell(
            "bash",
            r#"source <("$PORTCULLIS" completions bash) && complete -p portcullis &&
               COMP_WORDS=(portcullis se); COMP_CWORD=1; COMP_LINE="portcullis se"; COMP_POINT=${#COMP_LINE}
               _portcullis portcullis se portcullis; echo "offered: ${COMPREPLY[*]}""#,
        )
        .await;
        assert_eq!(code, Some(0), "{printed}");
        assert!(printed.contains("-F _portcullis portcullis"), "{printed}");
        assert!(printed.contains("offered: serve"), "{printed}");
    }
    if present("zsh") {
        let (code, printed) = shell(
            "zsh",
            r#"autoload -U compinit && compinit -u -D && source <("$PORTCULLIS" completions zsh) &&
               print "registered: $_comps[portcullis]""#,
        )
        .await;
        assert_eq!(code, Some(0), "{printed}");
        assert!(printed.contains("registered: _portcullis"), "{printed}");
    }
    if present("fish") {
        let (code, printed) = shell(
            "fish",
            r#"$PORTCULLIS completions fish | source; complete --do-complete "portcullis se"; complete --do-complete "portcullis run --mo""#,
        )
        .await;
        assert_eq!(code, Some(0), "{printed}");
        assert!(printed.contains("serve"), "{printed}");
        assert!(printed.contains("--mode"), "{printed}");
    }
    let (code, _, stderr) = output(portcullis().args(["completions", "tcsh"])).await;
    assert_eq!(code, Some(64), "an unknown shell is bad usage: {stderr}");
}

#[tokio::test]
async fn the_manual_page_renders_without_warnings_and_covers_every_subcommand() {
    let (code, page, stderr) = output(portcullis().arg("man")).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        page.starts_with(".ie") || page.contains(".TH portcullis 1"),
        "{page}"
    );
    for section in [
        "PORTCULLIS SERVE",
        "PORTCULLIS RUN",
        "PORTCULLIS CHECK",
        "PORTCULLIS CA",
        "PORTCULLIS COMPLETIONS",
    ] {
        assert!(page.contains(section), "{section} in the page");
    }
    if present("groff") {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("portcullis.1");
        std::fs::write(&file, &page).unwrap();
        // -k: UTF-8 input (as man-db reads it); -ww: every warning; -z: no
        // output, only what groff complains of.
        let (code, printed) = shell(
            "sh",
            &format!("groff -k -man -Tutf8 -ww -z {}", file.display()),
        )
        .await;
        assert_eq!(code, Some(0), "{printed}");
        assert_eq!(printed, "", "groff warns about the page");
        let (_, rendered) = shell(
            "sh",
            &format!("groff -k -man -Tascii {} | col -b", file.display()),
        )
        .await;
        assert!(rendered.contains("--threads"), "{rendered}");
        assert!(rendered.contains("EXIT STATUS"), "{rendered}");
    }
}

#[tokio::test]
async fn the_service_unit_verifies_and_keeps_its_hardening() {
    let unit = read("deploy/portcullis.service");
    for key in [
        "ExecStart=/usr/local/bin/portcullis serve --config /etc/portcullis/portcullis.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=64",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=portcullis",
        "Environment=XDG_DATA_HOME=%S",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
    ] {
        assert!(unit.contains(key), "the unit keeps {key:?}");
    }
    // The command line it runs parses (the file it names is the host's).
    let (code, _, stderr) = output(portcullis().args([
        "serve",
        "--config",
        "/etc/portcullis/portcullis.toml",
        "--help",
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");

    if present("systemd-analyze") {
        // verify checks that the binary exists: point it at this build.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("portcullis.service");
        std::fs::write(&file, unit.replace("/usr/local/bin/portcullis", BINARY)).unwrap();
        let (code, printed) = shell(
            "sh",
            &format!("systemd-analyze verify --man=no {}", file.display()),
        )
        .await;
        assert_eq!(code, Some(0), "{printed}");
        // Lines about other units on this machine are not ours to judge.
        let ours: Vec<&str> = printed
            .lines()
            .filter(|line| line.contains("portcullis.service"))
            .collect();
        assert!(ours.is_empty(), "systemd-analyze says: {printed}");
    }
}

/// The final stage of the Dockerfile: its instructions after the last
/// `FROM`, continuation lines joined.
fn final_stage(dockerfile: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let lines: Vec<String> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    lines[last_from..].to_vec()
}

fn json_array(instruction: &str) -> Vec<String> {
    let (_, array) = instruction.split_once(' ').unwrap();
    serde_json::from_str(array).unwrap()
}

#[tokio::test]
async fn the_image_runs_as_a_user_and_its_command_serves_the_sidecar_config() {
    let dockerfile = read("deploy/Dockerfile");
    let froms = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(froms >= 2, "multi-stage: {froms} FROM lines");
    let stage = final_stage(&dockerfile);
    let find = |word: &str| {
        stage
            .iter()
            .filter(|l| l.starts_with(&format!("{word} ")))
            .cloned()
            .collect::<Vec<_>>()
    };
    let user = find("USER");
    assert_eq!(user.len(), 1, "{stage:?}");
    let uid = user[0].split_whitespace().nth(1).unwrap();
    assert!(
        !uid.starts_with("root") && !uid.starts_with("0"),
        "runs as {uid}"
    );
    assert!(find("VOLUME")[0].contains("/var/lib/portcullis"));
    let entrypoint = json_array(&find("ENTRYPOINT")[0]);
    let cmd = json_array(&find("CMD")[0]);
    assert_eq!(entrypoint, ["/usr/local/bin/portcullis"]);
    let mut environment: Vec<(String, String)> = Vec::new();
    for env in find("ENV") {
        for pair in env.trim_start_matches("ENV ").split_whitespace() {
            let (name, value) = pair.split_once('=').unwrap();
            environment.push((name.to_owned(), value.to_owned()));
        }
    }
    let value = |name: &str| {
        environment
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        value("XDG_DATA_HOME"),
        "/var/lib",
        "the data directory is the volume"
    );
    assert_eq!(
        value("PORTCULLIS_CONFIG"),
        "/etc/portcullis/portcullis.toml"
    );
    assert!(
        dockerfile
            .contains("deploy/kubernetes/portcullis.toml /out/etc/portcullis/portcullis.toml"),
        "the image's default config is the sidecar's"
    );

    // The image's command with the image's environment and config; only
    // the paths are this test's, and the listeners ephemeral.
    let dir = tempfile::tempdir().unwrap();
    let mut command = portcullis();
    command.args(&cmd);
    for (name, value) in &environment {
        command.env(name, value);
    }
    let origin = origin().await;
    command
        .env("XDG_DATA_HOME", dir.path())
        .env(
            "PORTCULLIS_CONFIG",
            repo("deploy/kubernetes/portcullis.toml"),
        )
        .env("PORTCULLIS_NETWORK__PROXY_URL", "http://127.0.0.1:0")
        .env("PORTCULLIS_NETWORK__SOCKS_URL", "socks5://127.0.0.1:0")
        .env("PORTCULLIS_METRICS__LISTEN", "127.0.0.1:0")
        .env(
            "PORTCULLIS_LOG__VIOLATIONS_FILE",
            dir.path().join("violations.jsonl"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let proxy = format!("http://{}", served_http_address(&mut child).await);
    // Not in its allowlist: refused, and said so.
    let status = curl_status(&["-x", &proxy, &format!("http://{}/", origin.addr)]).await;
    assert_eq!(status, "403");
    let (_, stderr) = terminate(&mut child).await;
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(
            parsed.is_ok(),
            "the log is JSON lines for a collector: {line}"
        );
    }
    let violations = std::fs::read_to_string(dir.path().join("violations.jsonl")).unwrap();
    assert!(violations.contains("not_allowed"), "{violations}");
}

#[tokio::test]
async fn the_sidecar_manifest_mounts_the_config_the_image_reads() {
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert!(kustomization.contains("name: portcullis-config"));
    assert!(kustomization.contains("disableNameSuffixHash: true"));
    assert!(deployment.contains("configMap: { name: portcullis-config }"));
    assert!(deployment.contains("mountPath: /etc/portcullis,"));
    assert!(deployment.contains("value: /etc/portcullis/portcullis.toml"));
    assert!(deployment.contains("restartPolicy: Always"));
    assert!(deployment.contains("runAsUser: 65532"));
    assert!(
        !deployment
            .lines()
            .any(|l| l.contains("subPath:") && !l.trim_start().starts_with('#')),
        "a subPath mount never sees a ConfigMap update"
    );
    // The config itself loads (the binary checks every key; the refusal
    // log goes where this test can write).
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .env(
                "PORTCULLIS_LOG__VIOLATIONS_FILE",
                dir.path().join("v.jsonl"),
            )
            .args(["check", "--config"])
            .arg(repo("deploy/kubernetes/portcullis.toml"))
            .args([
                "--resolve",
                "deb.debian.org=192.0.2.1",
                "http://deb.debian.org/",
            ]),
    )
    .await;
    assert!(code == Some(0) || code == Some(1), "{stderr}");
    // kubectl is not a Debian package: rendered where it is installed.
    if installed("kubectl", false) {
        let (code, rendered) = shell(
            "sh",
            &format!("kubectl kustomize {}", repo("deploy/kubernetes").display()),
        )
        .await;
        assert_eq!(code, Some(0), "{rendered}");
        assert!(rendered.contains("kind: ConfigMap"), "{rendered}");
        assert!(rendered.contains("name: portcullis-config\n"), "{rendered}");
        assert!(rendered.contains("kind: Deployment"), "{rendered}");
        assert!(
            rendered.contains("allowed_domains = [\"deb.debian.org\""),
            "the ConfigMap carries portcullis.toml: {rendered}"
        );
    }
}

#[tokio::test]
async fn the_shared_egress_example_serves_several_profiles_from_one_config() {
    let kustomization = read("deploy/kubernetes/shared-egress/kustomization.yaml");
    let egress = read("deploy/kubernetes/shared-egress/egress.yaml");
    assert!(kustomization.contains("name: portcullis-egress-config"));
    assert!(kustomization.contains("name: portcullis-egress-users"));
    assert!(egress.contains("configMap: { name: portcullis-egress-config }"));
    assert!(egress.contains("secret: { secretName: portcullis-egress-users }"));
    assert!(egress.contains("kind: NetworkPolicy"));
    assert!(
        !egress
            .lines()
            .any(|l| l.contains("subPath:") && !l.trim_start().starts_with('#')),
        "a subPath mount never sees an update"
    );
    // Each profile loads and decides as itself.
    let dir = tempfile::tempdir().unwrap();
    let config = repo("deploy/kubernetes/shared-egress/portcullis.toml");
    let check = |profile: &'static str| {
        let mut command = portcullis();
        command
            .env(
                "PORTCULLIS_LOG__VIOLATIONS_FILE",
                dir.path().join("v.jsonl"),
            )
            .args(["check", "--config"])
            .arg(&config)
            .args([
                "--profile",
                profile,
                "--resolve",
                "api.github.com=192.0.2.1",
            ])
            .arg("http://api.github.com/");
        command
    };
    let (code, builds, stderr) = output(&mut check("builds")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(builds.contains("reason: not_allowed\n"), "{builds}");
    assert!(builds.contains("(profile builds)"), "{builds}");
    // The agent's profile allows the host (its address is what is refused).
    let (code, agent, stderr) = output(&mut check("agent")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(agent.contains("reason: not_allowed_local"), "{agent}");
    let (code, _, stderr) = output(&mut check("docs")).await;
    assert_eq!(code, Some(1), "{stderr}");
    if installed("kubectl", false) {
        let (code, rendered) = shell(
            "sh",
            &format!(
                "kubectl kustomize {}",
                repo("deploy/kubernetes/shared-egress").display()
            ),
        )
        .await;
        assert_eq!(code, Some(0), "{rendered}");
        assert!(rendered.contains("kind: Secret"), "{rendered}");
        assert!(rendered.contains("kind: Service"), "{rendered}");
    }
}

/// Makes `dir` look as the kubelet leaves a ConfigMap volume: the data in
/// a timestamped directory, `..data` a symlink to it, and each key a
/// symlink through `..data`. A new version is a new directory and an
/// atomic rename of a new `..data` link over the old one.
fn configmap_version(dir: &Path, version: &str, config: &str) {
    let data = dir.join(format!("..2026_12_03_{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("portcullis.toml"), config).unwrap();
    let link = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &link).unwrap();
    std::fs::rename(&link, dir.join("..data")).unwrap();
    let key = dir.join("portcullis.toml");
    if std::fs::symlink_metadata(&key).is_err() {
        std::os::unix::fs::symlink("..data/portcullis.toml", &key).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_update_by_the_kubelet_s_symlink_swap_reloads_the_policy() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = |allowed: &str| {
        format!("[network]\nallowed_domains = [{allowed}]\nallow_local_binding = true\n")
    };
    configmap_version(dir.path(), "v1", &config(""));
    let (mut child, proxy) = serve_config(&dir.path().join("portcullis.toml")).await;
    let url = format!("http://{}/", origin.addr);
    assert_eq!(curl_status(&["-x", &proxy, &url]).await, "403");

    configmap_version(dir.path(), "v2", &config(&format!("\"{}\"", origin.addr)));
    std::fs::remove_dir_all(dir.path().join("..2026_12_03_v1")).unwrap();
    let mut status = String::new();
    for _ in 0..50 {
        status = curl_status(&["-x", &proxy, &url]).await;
        if status == "200" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, stderr) = terminate(&mut child).await;
    assert_eq!(status, "200", "the swapped-in config applies: {stderr}");
}
