//! The record files (`[log] violations_file`, `access_file`, `format`)
//! written by the binary, checked line by line; OCSF events against the
//! fields the schema requires.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

/// `serve --config FILE`, and its HTTP and SOCKS5 listeners.
async fn serve(config: &Path) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let mut child = portcullis()
        .args(["serve", "--config"])
        .arg(config)
        .args(["--http", "127.0.0.1:0", "--socks", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut http, mut socks) = (None, None);
    while http.is_none() || socks.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("serve printed its listeners in time")
            .unwrap()
            .expect("serve printed its listeners");
        let address = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix('\''))
                .map(|a| a.parse::<SocketAddr>().unwrap())
        };
        http = http.or_else(|| address("export HTTP_PROXY='http://"));
        socks = socks.or_else(|| address("export PORTCULLIS_SOCKS_URL='socks5h://"));
    }
    (child, http.unwrap(), socks.unwrap())
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// What OCSF 1.8.0 requires of our events (ocsf-schema at its v1.8.0
/// release, commit 3dcb905d): `events/base_event.json`'s required
/// attributes; `objects/metadata.json`'s `product` and `version`; a
/// product (an `_entity`) with a `name` or `uid`; HTTP Activity's
/// `at_least_one` of `http_request` / `http_response`, and
/// `http_response.code`; an endpoint with one of its identifying fields;
/// a URL with `url_string` or `path`; and each enum's values (the
/// class's `activity_id`s, `severity_id`, the `security_control`
/// profile's `action_id` and `disposition_id`, `status_id`).
fn check_ocsf(event: &Value) {
    let int = |key: &str| {
        event[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is required (an integer): {event}"))
    };
    for key in [
        "activity_id",
        "category_uid",
        "class_uid",
        "severity_id",
        "time",
        "type_uid",
    ] {
        int(key);
    }
    assert_eq!(int("category_uid"), 4, "Network Activity: {event}");
    let class = int("class_uid");
    let activity = int("activity_id");
    assert_eq!(int("type_uid"), class * 100 + activity, "{event}");
    match class {
        4001 => assert!((0..=7).contains(&activity) || activity == 99, "{event}"),
        4002 => {
            assert!((0..=9).contains(&activity) || activity == 99, "{event}");
            assert!(
                event.get("http_request").is_some() || event.get("http_response").is_some(),
                "HTTP Activity needs http_request or http_response: {event}"
            );
            if let Some(response) = event.get("http_response") {
                assert!(response["code"].is_u64(), "http_response.code: {event}");
            }
            if let Some(url) = event["http_request"].get("url") {
                assert!(
                    url.get("url_string").is_some() || url.get("path").is_some(),
                    "url needs url_string or path: {event}"
                );
            }
        }
        other => panic!("class {other}: {event}"),
    }
    assert!(
        int("time") > 1_600_000_000_000,
        "time in ms since the epoch: {event}"
    );
    let severity = int("severity_id");
    assert!(severity <= 6 || severity == 99, "{event}");
    let metadata = &event["metadata"];
    assert_eq!(metadata["version"], "1.8.0", "{event}");
    let product = &metadata["product"];
    assert!(
        product["name"].is_string() || product["uid"].is_string(),
        "metadata.product needs a name or uid: {event}"
    );
    let action = int("action_id");
    assert!(action <= 4 || action == 99, "{event}");
    let disposition = int("disposition_id");
    assert!(disposition <= 27 || disposition == 99, "{event}");
    let status = int("status_id");
    assert!(status <= 2 || status == 99, "{event}");
    for endpoint in ["src_endpoint", "dst_endpoint"] {
        if let Some(endpoint) = event.get(endpoint) {
            assert!(
                ["ip", "hostname", "name", "uid"]
                    .iter()
                    .any(|key| endpoint.get(*key).is_some()),
                "an endpoint needs one identifying field: {event}"
            );
        }
    }
}

fn find(events: &[Value], what: impl Fn(&Value) -> bool) -> &Value {
    events
        .iter()
        .find(|event| what(event))
        .unwrap_or_else(|| panic!("no such event in {events:#?}"))
}

#[tokio::test]
async fn ocsf_records_every_refusal_and_every_allowed_request() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let violations = dir.path().join("violations.jsonl");
    let access = dir.path().join("access.jsonl");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"{RULED_AND_AUDITED}
[log]
violations_file = {violations:?}
access_file = {access:?}
format = "ocsf"
"#
        ),
    )
    .unwrap();
    let (mut child, http, socks) = serve(&config).await;
    let proxy = format!("http://{http}");
    let socks = socks.to_string();
    let direct = format!("http://127.0.0.1:{port}");
    assert_eq!(
        curl_status(&["-x", &proxy, &format!("{direct}/ok?token=s3cret&page=2")]).await,
        "200"
    );
    assert_eq!(
        curl_status(&[
            "-x",
            &proxy,
            "-X",
            "POST",
            &format!("http://rules.test:{port}/x?key=s3cret")
        ])
        .await,
        "403"
    );
    assert_eq!(
        curl_status(&[
            "-x",
            &proxy,
            "-X",
            "POST",
            &format!("http://audit.test:{port}/y")
        ])
        .await,
        "200",
        "audit mode lets it through"
    );
    assert_eq!(
        curl_status(&["-x", &proxy, "http://blocked.test/"]).await,
        "403"
    );
    assert_eq!(
        curl_status(&["-p", "-x", &proxy, &format!("{direct}/tunnelled")]).await,
        "200"
    );
    assert_eq!(
        curl_status(&["--socks5-hostname", &socks, &format!("{direct}/socks")]).await,
        "200"
    );
    let refused = curl_status(&["--socks5-hostname", &socks, "http://blocked.test/"]).await;
    assert_ne!(refused, "200");
    // SIGTERM: the proxy flushes both files before it exits.
    let (status, _) = terminate(&mut child).await;
    assert!(status.success());

    let refusals = lines(&violations);
    let allowed = lines(&access);
    assert_eq!(refusals.len(), 4, "{refusals:#?}");
    // /ok, /y, and two tunnels (what went through the CONNECT is unseen).
    assert_eq!(allowed.len(), 4, "{allowed:#?}");
    for event in refusals.iter().chain(&allowed) {
        check_ocsf(event);
    }
    let text =
        std::fs::read_to_string(&violations).unwrap() + &std::fs::read_to_string(&access).unwrap();
    assert!(
        !text.contains("s3cret"),
        "query values never reach a record: {text}"
    );

    let rule = find(&refusals, |e| e["status_detail"] == "rule_not_matched");
    assert_eq!(rule["class_uid"], 4002);
    assert_eq!(rule["activity_id"], 6, "Post");
    assert_eq!(rule["action_id"], 2);
    assert_eq!(rule["disposition_id"], 2);
    assert_eq!(rule["firewall_rule"]["type"], "request_rules");
    assert_eq!(
        rule["http_request"]["url"]["url_string"],
        format!("http://rules.test:{port}/x?key=REDACTED")
    );
    assert_eq!(rule["dst_endpoint"]["hostname"], "rules.test");
    assert_eq!(rule["src_endpoint"]["ip"], "127.0.0.1");

    let audit = find(&refusals, |e| e["unmapped"]["decision"] == "audit");
    assert_eq!(audit["action_id"], 1, "allowed");
    assert_eq!(audit["disposition_id"], 15, "detected");
    assert_eq!(audit["http_request"]["url"]["path"], "/y");

    let socks_refusal = find(&refusals, |e| e["unmapped"]["protocol"] == "socks5_tcp");
    assert_eq!(socks_refusal["class_uid"], 4001);
    assert_eq!(socks_refusal["activity_id"], 5, "Refuse");
    assert_eq!(socks_refusal["status_detail"], "not_allowed");
    assert!(socks_refusal.get("http_request").is_none());

    let get = find(&allowed, |e| e["http_request"]["url"]["path"] == "/ok");
    assert_eq!(get["class_uid"], 4002);
    assert_eq!(get["http_response"]["code"], 200);
    assert_eq!(get["http_response"]["length"], "hello /ok".len());
    assert_eq!(
        get["http_request"]["url"]["query_string"],
        "token=REDACTED&page=REDACTED"
    );
    find(&allowed, |e| e["http_request"]["url"]["path"] == "/y");
    let tunnels: Vec<&Value> = allowed.iter().filter(|e| e["class_uid"] == 4001).collect();
    assert_eq!(
        tunnels.len(),
        2,
        "the CONNECT and the SOCKS5 tunnel: {allowed:#?}"
    );
    for tunnel in tunnels {
        assert_eq!(tunnel["activity_id"], 1, "Open");
        assert_eq!(tunnel["dst_endpoint"]["port"], port);
    }
}

#[tokio::test]
async fn the_default_format_writes_our_own_fields_to_both_files() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let violations = dir.path().join("violations.jsonl");
    let access = dir.path().join("access.jsonl");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallowed_domains = [\"127.0.0.1\"]\nallow_local_binding = true\n\n[log]\nviolations_file = {violations:?}\naccess_file = {access:?}\n"
        ),
    )
    .unwrap();
    let (mut child, http, _) = serve(&config).await;
    let proxy = format!("http://{http}");
    let url = format!("http://{}/page?q=secret", origin.addr);
    assert_eq!(curl_status(&["-x", &proxy, &url]).await, "200");
    assert_eq!(
        curl_status(&["-x", &proxy, "http://blocked.test/a?q=secret"]).await,
        "403"
    );
    let (status, _) = terminate(&mut child).await;
    assert!(status.success());
    let refusals = lines(&violations);
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0]["reason"], "not_allowed");
    assert_eq!(refusals[0]["path"], "/a?q=REDACTED");
    let allowed = lines(&access);
    assert_eq!(allowed.len(), 1, "{allowed:?}");
    assert_eq!(allowed[0]["status"], "allowed");
    assert_eq!(allowed[0]["code"], 200);
    assert_eq!(allowed[0]["path"], "/page?q=REDACTED");
    assert_eq!(allowed[0]["bytes"], "hello /page".len());
    assert_eq!(allowed[0]["protocol"], "http");
}

#[tokio::test]
async fn a_bad_format_or_an_unwritable_access_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, "[log]\nformat = \"xml\"\n").unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .arg("http://a.test/"),
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("log.format") && stderr.contains("portcullis.toml"),
        "{stderr}"
    );
    std::fs::write(
        &config,
        "[log]\naccess_file = \"/nonexistent/dir/access.jsonl\"\n",
    )
    .unwrap();
    let (code, _, stderr) = output(
        portcullis()
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--http", "127.0.0.1:0"]),
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("log.access_file"), "{stderr}");
}
