//! `[auth]` for `serve`: every listener asks for the configured credential
//! (HTTP 407 with `Proxy-Authenticate`, SOCKS5 RFC 1929 only), and a reload
//! of the file changes it.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use common::{curl, curl_status, origin, output, portcullis, raw_exchange, terminate};

fn config(password: &str) -> String {
    format!(
        "[network]\nallowed_domains = [\"127.0.0.1\"]\n[auth]\nusername = \"alice\"\npassword = \"{password}\"\n"
    )
}

/// `NAME='VALUE'` from serve's `export` lines.
fn exported(lines: &[String], name: &str) -> String {
    let prefix = format!("export {name}='");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|r| r.strip_suffix('\'')))
        .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
        .to_owned()
}

#[tokio::test]
async fn serve_enforces_auth_on_every_listener_and_reloads_it() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, config("s3cret")).unwrap();
    let mut child = portcullis()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--socks",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.starts_with("export PORTCULLIS_SOCKS_URL="))
    {
        let line = tokio::time::timeout(Duration::from_secs(30), reader.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        lines.push(line);
    }
    // The printed environment carries the credential, so a sourced env works.
    let with_credential = exported(&lines, "HTTP_PROXY");
    assert!(
        with_credential.starts_with("http://alice:s3cret@127.0.0.1:"),
        "{with_credential}"
    );
    let socks_with_credential = exported(&lines, "PORTCULLIS_SOCKS_URL");
    let bare = format!("http://{}", with_credential.rsplit_once('@').unwrap().1);
    let socks_bare = socks_with_credential.rsplit_once('@').unwrap().1.to_owned();
    let url = format!("http://{}/guarded", origin.addr);

    // HTTP absolute-form: 407 with Proxy-Authenticate without it, 200 with it.
    let out = curl(&["-s", "-i", "-x", &bare, &url]).await;
    assert!(out.stdout.starts_with("HTTP/1.1 407"), "{}", out.stdout);
    assert!(
        out.stdout
            .to_ascii_lowercase()
            .contains("proxy-authenticate: basic"),
        "{}",
        out.stdout
    );
    let out = curl(&["-x", &with_credential, &url]).await;
    assert_eq!(out.stdout, "hello /guarded");
    let wrong = format!("http://alice:wrong@{}", bare.trim_start_matches("http://"));
    let out = curl_status(&["-x", &wrong, &url]).await;
    assert_eq!(out, "407", "a wrong password");

    // CONNECT without the credential: 407 before anything is dialled.
    let (_, head) = raw_exchange(
        bare.trim_start_matches("http://").parse().unwrap(),
        &format!(
            "CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            origin.addr, origin.addr
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");

    // SOCKS5: no-auth is refused, username/password accepted.
    let out = curl(&["--socks5-hostname", &socks_bare, &url]).await;
    assert_ne!(
        out.stdout, "hello /guarded",
        "SOCKS5 without the credential"
    );
    let socks_user = socks_with_credential.trim_start_matches("socks5h://");
    let out = curl(&["--socks5-hostname", socks_user, &url]).await;
    assert_eq!(out.stdout, "hello /guarded", "SOCKS5 with the credential");

    // A reload (SIGHUP without a terminal) swaps the credential.
    std::fs::write(&file, config("n3w")).unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let renewed = format!("http://alice:n3w@{}", bare.trim_start_matches("http://"));
    let mut status = String::new();
    for _ in 0..100 {
        let out = curl_status(&["-x", &renewed, &url]).await;
        status = out;
        if status == "200" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "200", "the reloaded credential");
    let out = curl_status(&["-x", &with_credential, &url]).await;
    assert_eq!(out, "407", "the old credential after the reload");
    let (status, _) = terminate(&mut child).await;
    assert!(status.success());
}

#[tokio::test]
async fn a_half_auth_table_is_a_usage_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("half.toml");
    std::fs::write(&file, "[auth]\nusername = \"alice\"\n").unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .args(["serve", "--http", "127.0.0.1:0", "--no-socks", "--config"])
            .arg(&file),
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("auth.password"), "{stderr}");
    assert!(stderr.contains("half.toml"), "{stderr}");
}
