//! `[profiles.NAME]`: one `serve`, a policy per caller. Two `run
//! --attach` commands under different profiles against one serve, each
//! reaching only its own hosts; approvals that never leak between
//! profiles; one profile's rate limit never slowing another; `extends`
//! that cannot widen a deny; unknown users refused with 407 and recorded;
//! a reload that breaks one profile keeping the old config; and a profile
//! chosen by a layer of an integrator's own. Real clients (curl, python
//! requests), loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A config in `dir`: every `*.test` name answers 127.0.0.1, the
/// violations go to `dir/violations.jsonl`, passwords are files in `dir`
/// (`NAME.pw` holds `pw-NAME`), then `body`.
fn write_config(dir: &Path, names: &[&str], body: &str) -> std::path::PathBuf {
    for name in names {
        std::fs::write(dir.join(format!("{name}.pw")), format!("pw-{name}\n")).unwrap();
    }
    let hosts: Vec<String> = [
        "a.test",
        "b.test",
        "c.test",
        "x.test",
        "session.test",
        "always.test",
    ]
    .iter()
    .map(|host| format!("{host:?} = [\"127.0.0.1\"]"))
    .collect();
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nallow_local_binding = true\n\n[dns]\nhosts = {{ {} }}\n\n[log]\nviolations_file = {:?}\n\n{body}",
            hosts.join(", "),
            dir.join("violations.jsonl")
        ),
    )
    .unwrap();
    config
}

/// `[[auth.users]]` entries: each user's password from `dir/NAME.pw`.
fn users(dir: &Path, users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(name, profile)| {
            format!(
                "[[auth.users]]\nname = {name:?}\nprofile = {profile:?}\npassword = {{ file = {:?} }}\n\n",
                dir.join(format!("{name}.pw"))
            )
        })
        .collect()
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("violations.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The status of GET `url` through `proxy` (a URL, credentials in it).
async fn status(proxy: &str, url: &str) -> String {
    curl_status(&["-x", proxy, url]).await
}

/// `http://user:pw-user@ADDRESS`.
fn as_user(proxy: &str, user: &str) -> String {
    proxy.replacen("http://", &format!("http://{user}:pw-{user}@"), 1)
}

#[tokio::test]
async fn two_runs_under_different_profiles_against_one_serve_reach_only_their_own_hosts() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[profiles.builds]\nnetwork.allowed_domains = [\"a.test\"]\n\n[profiles.agent]\nnetwork.allowed_domains = [\"b.test\"]\n",
        users(dir.path(), &[("ci", "builds"), ("bot", "agent")])
    );
    let config = write_config(dir.path(), &["ci", "bot"], &body);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[log]\n",
        &format!(
            "[log]\naccess_file = {:?}\n",
            dir.path().join("access.jsonl")
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let (mut serve, proxy) = serve_config(&config).await;
    let address = proxy.trim_start_matches("http://").to_owned();
    let script = format!(
        r#"for host in a.test b.test; do curl -s -o /dev/null -w "curl $host %{{http_code}}\n" http://$host:{port}/; done
python3 -c 'import requests
for host in ("a.test", "b.test"):
    print("python", host, requests.get("http://%s:{port}/" % host).status_code)'
git ls-remote http://b.test:{port}/repo.git >/dev/null 2>&1; echo "git $?"
"#
    );
    let run = |profile: &'static str| {
        let mut command = portcullis();
        command
            .args(["run", "--attach", "--config"])
            .arg(&config)
            .args(["--profile", profile, "--http", &address, "--no-socks"])
            .args(["--", "sh", "-c", &script]);
        command
    };
    let (mut builds, mut agent) = (run("builds"), run("agent"));
    let (builds, agent) = tokio::join!(output(&mut builds), output(&mut agent));
    let (_, stderr) = terminate(&mut serve).await;
    assert_eq!(builds.0, Some(0), "{}\n{stderr}", builds.2);
    assert_eq!(
        builds.1,
        "curl a.test 200\ncurl b.test 403\npython a.test 200\npython b.test 403\ngit 128\n",
        "{}\n{stderr}",
        builds.2
    );
    assert_eq!(
        agent.1, "curl a.test 403\ncurl b.test 200\npython a.test 403\npython b.test 200\ngit 0\n",
        "{}\n{stderr}",
        agent.2
    );
    // Each allowed request is recorded with its profile and user.
    let access = std::fs::read_to_string(dir.path().join("access.jsonl")).unwrap();
    let allowed: Vec<(String, String, String)> = access
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .map(|r| {
            let text = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
            (text("profile"), text("user"), text("host"))
        })
        .collect();
    assert!(allowed.len() >= 5, "four, and git's: {access}");
    for (profile, user, host) in &allowed {
        let expected = match profile.as_str() {
            "builds" => ("ci", "a.test"),
            "agent" => ("bot", "b.test"),
            other => panic!("{other}: {access}"),
        };
        assert_eq!((user.as_str(), host.as_str()), expected, "{access}");
    }
    // Each refusal names its profile and user, and says which profile's
    // key would change it. git asks first without its credential: asked
    // for one, not recorded.
    let records = records(dir.path());
    assert_eq!(records.len(), 5, "{records:#?}");
    for record in &records {
        let (user, profile, host) = match record["profile"].as_str() {
            Some("builds") => ("ci", "builds", "b.test"),
            Some("agent") => ("bot", "agent", "a.test"),
            other => panic!("{other:?}: {record}"),
        };
        assert_eq!(record["user"], user, "{record}");
        assert_eq!(record["host"], host, "{record}");
        assert_eq!(record["reason"], "not_allowed", "{record}");
        let message = record["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("(profile {profile})"))
                && message.contains(&format!("profiles.{profile}.network.allowed_domains")),
            "{message}"
        );
    }
}

#[tokio::test]
async fn an_approval_given_to_one_profile_is_still_asked_in_the_other() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("calls");
    let reviewer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reviewers/reviewer.sh");
    let body = format!(
        "[approval]\nmode = \"command\"\ncommand = [{:?}, {:?}]\nrules_file = {:?}\ntimeout = 10\n\n{}[profiles.one]\n[profiles.two]\n",
        reviewer,
        count,
        dir.path().join("rules.toml"),
        users(dir.path(), &[("u1", "one"), ("u2", "two")])
    );
    let config = write_config(dir.path(), &["u1", "u2"], &body);
    let (mut serve, proxy) = serve_config(&config).await;
    let calls = || std::fs::read_to_string(&count).map_or(0, |text| text.lines().count());
    let url = |host: &str| format!("http://{host}:{port}/");
    let (one, two) = (as_user(&proxy, "u1"), as_user(&proxy, "u2"));

    // The reviewer answers session.test "allow for the session".
    assert_eq!(status(&one, &url("session.test")).await, "200");
    assert_eq!(status(&one, &url("session.test")).await, "200");
    assert_eq!(calls(), 1, "asked once for profile one's session");
    assert_eq!(status(&two, &url("session.test")).await, "200");
    assert_eq!(calls(), 2, "profile two is asked again");
    let input = std::fs::read_to_string(format!("{}.input", count.display())).unwrap();
    assert!(input.contains(r#""profile":"two""#), "{input}");
    assert_eq!(status(&two, &url("session.test")).await, "200");
    assert_eq!(calls(), 2);

    // "always" is persisted for the profile that was asked, and only it.
    assert_eq!(status(&one, &url("always.test")).await, "200");
    assert_eq!(calls(), 3);
    let rules = std::fs::read_to_string(dir.path().join("rules.toml")).unwrap();
    assert!(rules.contains("profile = \"one\""), "{rules}");
    assert_eq!(status(&one, &url("always.test")).await, "200");
    assert_eq!(calls(), 3, "the persisted rule answers profile one");
    assert_eq!(status(&two, &url("always.test")).await, "200");
    assert_eq!(calls(), 4, "profile one's rule never answers profile two");
    terminate(&mut serve).await;
}

#[tokio::test]
async fn a_saturated_profile_gets_429_while_another_keeps_its_rate() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[profiles.slow]\nnetwork.allowed_domains = [\"a.test\"]\n[[profiles.slow.rate_limits]]\nhost = \"a.test\"\nrequests_per_second = 5\nburst = 5\n\n[profiles.fast]\nnetwork.allowed_domains = [\"a.test\"]\n",
        users(dir.path(), &[("s", "slow"), ("f", "fast")])
    );
    let config = write_config(dir.path(), &["s", "f"], &body);
    let (mut serve, proxy) = serve_config(&config).await;
    // Both profiles at once, four threads each, 150 requests each: a
    // bounded count, whatever the machine's speed.
    let script = format!(
        r#"
import concurrent.futures, json, sys, time, requests
def drive(user):
    session = requests.Session()
    session.proxies = {{"http": "{proxy}".replace("http://", "http://%s:pw-%s@" % (user, user))}}
    codes = []
    def one(_):
        return session.get("http://a.test:{port}/").status_code
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(150)))
    return codes, time.monotonic() - started
with concurrent.futures.ThreadPoolExecutor(2) as pool:
    slow, fast = pool.map(drive, ["s", "f"])
print(json.dumps({{"slow": slow, "fast": fast}}))
"#
    );
    let (code, stdout, stderr) = output(
        tokio::process::Command::new("python3")
            .args(["-c", &script])
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy"),
    )
    .await;
    terminate(&mut serve).await;
    assert_eq!(code, Some(0), "{stderr}");
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let counted = |name: &str| {
        let codes = result[name][0].as_array().unwrap();
        let ok = codes.iter().filter(|c| **c == 200).count();
        let limited = codes.iter().filter(|c| **c == 429).count();
        (ok, limited, codes.len(), result[name][1].as_f64().unwrap())
    };
    let (slow_ok, slow_limited, slow_total, slow_secs) = counted("slow");
    let (fast_ok, fast_limited, fast_total, fast_secs) = counted("fast");
    println!(
        "slow profile: {slow_ok} of {slow_total} served in {slow_secs:.2}s ({:.0}/s served, {slow_limited} refused 429); fast profile: {fast_ok} of {fast_total} in {fast_secs:.2}s ({:.0}/s)",
        slow_ok as f64 / slow_secs,
        fast_ok as f64 / fast_secs
    );
    assert_eq!(slow_ok + slow_limited, slow_total, "{result}");
    assert!(slow_limited > 0, "the slow profile was limited: {result}");
    // A token bucket of 5 a second and a burst of 5 lets at most this many
    // through in the time the drive took.
    let allowed = 5.0 + 5.0 * slow_secs + 1.0;
    assert!(slow_ok as f64 <= allowed, "{slow_ok} > {allowed}: {result}");
    assert_eq!(
        (fast_ok, fast_limited),
        (fast_total, 0),
        "the other profile is never limited: {result}"
    );
    let limited: Vec<_> = records(dir.path())
        .into_iter()
        .filter(|r| r["reason"] == "rate_limited")
        .collect();
    assert_eq!(limited.len(), slow_limited);
    assert!(limited
        .iter()
        .all(|r| r["profile"] == "slow" && r["user"] == "s"));
}

#[tokio::test]
async fn extends_adds_but_never_widens_a_deny() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[profiles.base]\nnetwork.allowed_domains = [\"a.test\"]\nnetwork.denied_domains = [\"x.test\"]\nnetwork.mode = \"limited\"\n\n[profiles.child]\nextends = \"base\"\nnetwork.allowed_domains = [\"b.test\", \"x.test\"]\n",
        users(dir.path(), &[("kid", "child")])
    );
    let config = write_config(dir.path(), &["kid"], &body);
    let check = |url: String| {
        let config = config.clone();
        async move {
            output(portcullis().args(["check", "--config"]).arg(&config).args([
                "--profile",
                "child",
                "--json",
                &url,
            ]))
            .await
        }
    };
    let (_, denied, _) = check(format!("http://x.test:{port}/")).await;
    let denied: serde_json::Value = serde_json::from_str(denied.trim()).unwrap();
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["reason"], "denied", "{denied}");
    for host in ["a.test", "b.test"] {
        let (_, allowed, _) = check(format!("http://{host}:{port}/")).await;
        let allowed: serde_json::Value = serde_json::from_str(allowed.trim()).unwrap();
        assert_eq!(allowed["decision"], "allow", "{host}: {allowed}");
    }
    // Limited mode came from the base too: a POST is refused.
    let (_, post, _) = output(
        portcullis()
            .args(["check", "--config"])
            .arg(&config)
            .args(["--profile", "child", "--json", "--method", "POST"])
            .arg(format!("http://a.test:{port}/")),
    )
    .await;
    assert!(post.contains("method_not_allowed"), "{post}");

    // Live, through the serve, the same.
    let (mut serve, proxy) = serve_config(&config).await;
    let kid = as_user(&proxy, "kid");
    assert_eq!(status(&kid, &format!("http://x.test:{port}/")).await, "403");
    assert_eq!(status(&kid, &format!("http://b.test:{port}/")).await, "200");
    terminate(&mut serve).await;
    assert!(records(dir.path())
        .iter()
        .any(|r| r["reason"] == "denied" && r["profile"] == "child"));

    // Widening the mode is an error naming the key; so is a loop.
    for (extra, key) in [
        ("network.mode = \"full\"\n", "profiles.child.network.mode"),
        ("", "profiles.base.extends"),
    ] {
        let broken = std::fs::read_to_string(&config)
            .unwrap()
            .replacen(
                "[profiles.child]\n",
                &format!("[profiles.child]\n{extra}"),
                1,
            )
            .replacen(
                "network.mode = \"limited\"\n",
                if extra.is_empty() {
                    "network.mode = \"limited\"\nextends = \"child\"\n"
                } else {
                    "network.mode = \"limited\"\n"
                },
                1,
            );
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, broken).unwrap();
        let (code, _, stderr) = output(portcullis().args(["check", "--config"]).arg(&path).args([
            "--profile",
            "child",
            "http://a.test/",
        ]))
        .await;
        assert_eq!(code, Some(64), "{stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

#[tokio::test]
async fn an_unknown_user_is_refused_with_407_and_recorded() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[profiles.only]\nnetwork.allowed_domains = [\"a.test\"]\n",
        users(dir.path(), &[("known", "only")])
    );
    let config = write_config(dir.path(), &["known"], &body);
    let (mut serve, proxy) = serve_config(&config).await;
    let url = format!("http://a.test:{port}/");
    let known = as_user(&proxy, "known");
    assert_eq!(status(&known, &url).await, "200");
    let stranger = proxy.replacen("http://", "http://stranger:s3cr3t-guess@", 1);
    let out = curl(&["-i", "-x", &stranger, &url]).await;
    let (code, headers, body) = parse_response(&out.stdout);
    assert_eq!(code, 407, "{}", out.stdout);
    assert_eq!(headers["proxy-authenticate"], "Basic realm=\"portcullis\"");
    assert!(body.contains("auth_required"), "{body}");
    let wrong = proxy.replacen("http://", "http://known:n0pe-7f3@", 1);
    assert_eq!(status(&wrong, &url).await, "407");
    // No credential, and no profile covers loopback: refused by the
    // router, a 407 too, asking for a credential (not recorded: clients
    // such as git send theirs only when asked).
    let out = curl(&["-i", "-x", &proxy, &url]).await;
    let (code, headers, body) = parse_response(&out.stdout);
    assert_eq!(code, 407, "{}", out.stdout);
    assert_eq!(headers["proxy-authenticate"], "Basic realm=\"portcullis\"");
    assert_eq!(headers["x-proxy-error"], "proxy-auth-required");
    assert!(body.contains("\"reason\":\"auth_required\""), "{body}");
    terminate(&mut serve).await;
    let refused: Vec<_> = records(dir.path())
        .into_iter()
        .filter(|r| r["reason"] == "auth_required")
        .collect();
    let users: Vec<_> = refused.iter().map(|r| r["user"].clone()).collect();
    assert_eq!(
        users,
        [serde_json::json!("stranger"), serde_json::json!("known")],
        "{refused:#?}"
    );
    assert!(refused
        .iter()
        .all(|r| r["host"] == "a.test" && r["status"] == "blocked"));
    let text = std::fs::read_to_string(dir.path().join("violations.jsonl")).unwrap();
    assert!(!text.contains("s3cr3t") && !text.contains("n0pe"), "{text}");

    // `unmatched = "default"`: a caller no profile covers gets the
    // top-level policy instead, and a source range picks a profile.
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[network]\n",
        "[auth]\nunmatched = \"default\"\n\n[network]\nallowed_domains = [\"c.test\"]\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let (mut serve, proxy) = serve_config(&config).await;
    assert_eq!(
        status(&proxy, &format!("http://c.test:{port}/")).await,
        "200"
    );
    assert_eq!(status(&proxy, &url).await, "403");
    terminate(&mut serve).await;
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[profiles.only]\n",
        "[profiles.only]\nsources = [\"127.0.0.0/8\"]\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let (mut serve, proxy) = serve_config(&config).await;
    assert_eq!(
        status(&proxy, &url).await,
        "200",
        "loopback is profile only's"
    );
    terminate(&mut serve).await;
}

#[tokio::test]
async fn a_reload_that_breaks_one_profile_keeps_the_old_config() {
    let origin = origin().await;
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[profiles.one]\nnetwork.allowed_domains = [\"a.test\"]\n\n[profiles.two]\nnetwork.allowed_domains = [\"b.test\"]\n",
        users(dir.path(), &[("u1", "one"), ("u2", "two")])
    );
    let config = write_config(dir.path(), &["u1", "u2"], &body);
    let (mut serve, proxy) = serve_config(&config).await;
    let (one, two) = (as_user(&proxy, "u1"), as_user(&proxy, "u2"));
    let a = format!("http://a.test:{port}/");
    let c = format!("http://c.test:{port}/");
    assert_eq!(status(&one, &a).await, "200");
    // Profile two gets c.test, but profile one a bad pattern: nothing
    // changes, for either.
    let original = std::fs::read_to_string(&config).unwrap();
    let broken = original
        .replacen("[\"b.test\"]", "[\"b.test\", \"c.test\"]", 1)
        .replacen("[\"a.test\"]", "[\"a.test\", \"bad..name\"]", 1);
    std::fs::write(&config, &broken).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        status(&two, &c).await,
        "403",
        "the broken file changed nothing"
    );
    assert_eq!(status(&one, &a).await, "200");
    // Fixed: both change (the reload is checked every second).
    let fixed = broken.replacen(", \"bad..name\"", "", 1);
    std::fs::write(&config, fixed).unwrap();
    let started = Instant::now();
    while status(&two, &c).await != "200" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, stderr) = terminate(&mut serve).await;
    assert!(
        stderr.contains("config not reloaded")
            && stderr.contains("profiles.one.network.allowed_domains[1]"),
        "{stderr}"
    );
}

/// An integrator's own selection: the profile from a header a trusted
/// gateway sets, in place of the built-in selector.
#[tokio::test]
async fn a_layer_of_your_own_can_choose_the_profile() {
    use portcullis::middleware::profiles::ProfileName;
    use portcullis::middleware::{NetworkPolicy, PolicyHandle};
    use portcullis::{Profile, Proxy};

    let origin = origin().await;
    let port = origin.addr.port();
    let profile = |host: &str| {
        Profile::new(PolicyHandle::new(
            NetworkPolicy::builder()
                .allow(host)
                .unwrap()
                .allow_local_binding(true)
                .build(),
        ))
    };
    let from_header = tower::layer::layer_fn(|inner| {
        tower::util::MapRequest::new(
            inner,
            |mut request: http::Request<portcullis::body::Body>| {
                let chosen = request
                    .headers()
                    .get("x-team")
                    .and_then(|v| v.to_str().ok())
                    .map(|team| ProfileName(team.into()));
                if let Some(name) = chosen {
                    request.extensions_mut().insert(name);
                }
                request
            },
        )
    });
    let proxy = Proxy::builder()
        .resolver(std::sync::Arc::new(
            portcullis::resolve::StaticResolver::new(
                [
                    ("a.test".to_owned(), vec!["127.0.0.1".parse().unwrap()]),
                    ("b.test".to_owned(), vec!["127.0.0.1".parse().unwrap()]),
                ]
                .into_iter()
                .collect(),
                std::sync::Arc::new(portcullis::resolve::SystemResolver),
            ),
        ))
        .profile("red", profile("a.test"))
        .profile("blue", profile("b.test"))
        .profile_layer(from_header)
        .metrics_addr(Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await
        .unwrap();
    let mut refusals = proxy.subscribe();
    let address = format!("http://{}", proxy.http_addr());
    let get = |team: &'static str, host: &'static str| {
        let address = address.clone();
        async move {
            curl_status(&[
                "-x",
                &address,
                "-H",
                &format!("x-team: {team}"),
                &format!("http://{host}:{port}/"),
            ])
            .await
        }
    };
    assert_eq!(get("red", "a.test").await, "200");
    assert_eq!(get("red", "b.test").await, "403");
    assert_eq!(get("blue", "b.test").await, "200");
    assert_eq!(get("green", "b.test").await, "407", "no such profile");
    assert_eq!(
        curl_status(&["-x", &address, &format!("http://a.test:{port}/")]).await,
        "407",
        "no profile chosen"
    );
    let reasons: Vec<String> = proxy
        .violations()
        .snapshot()
        .iter()
        .map(|v| {
            format!(
                "{}:{}",
                v.blocked.reason,
                v.profile.as_deref().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        reasons,
        ["not_allowed:red", "auth_required:-", "auth_required:-"]
    );
    let event = refusals.try_recv().unwrap();
    assert_eq!(event.profile.as_deref(), Some("red"));
    let metrics = curl(&[&format!("http://{}/metrics", proxy.metrics_addr().unwrap())]).await;
    for line in [
        r#"portcullis_profile_requests_allowed_total{profile="red",protocol="http"} 1"#,
        r#"portcullis_profile_requests_allowed_total{profile="blue",protocol="http"} 1"#,
        r#"portcullis_profile_requests_refused_total{profile="red",reason="not_allowed"} 1"#,
        r#"portcullis_requests_refused_total{reason="auth_required"} 2"#,
    ] {
        assert!(metrics.stdout.contains(line), "{line}\n{}", metrics.stdout);
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_profile_config_that_cannot_work_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret").unwrap();
    let user = |name: &str, profile: &str| {
        format!("[[auth.users]]\nname = {name:?}\nprofile = {profile:?}\npassword = {{ file = {pw:?} }}\n")
    };
    let cases = [
        (
            "[[auth.users]]\nname = \"x\"\nprofile = \"p\"\npassword = \"inline\"\n[profiles.p]\n"
                .to_owned(),
            "auth.users[0].password: is never written inline",
        ),
        (
            format!("{}[profiles.p]\n", user("x", "nope")),
            "auth.users[0].profile",
        ),
        (
            format!("{}{}[profiles.p]\n", user("x", "p"), user("x", "p")),
            "auth.users[1].name",
        ),
        (
            "[profiles.p]\nsources = [\"10.0.0.0/33\"]\n".to_owned(),
            "profiles.p.sources[0]",
        ),
        (
            "[profiles.p]\nsources = [\"10.0.0.0/8\"]\n[profiles.q]\nsources = [\"10.0.0.0/8\"]\n"
                .to_owned(),
            "profiles.q.sources[0]",
        ),
        (
            "[profiles.p]\nextends = \"nowhere\"\n".to_owned(),
            "profiles.p.extends",
        ),
        (
            "[approval]\nmode = \"deny\"\n[profiles.p]\napproval = \"prompt\"\n".to_owned(),
            "profiles.p.approval",
        ),
    ];
    for (text, key) in cases {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, &text).unwrap();
        let (code, _, stderr) =
            output(portcullis().args(["serve", "--config"]).arg(&config).args([
                "--http",
                "127.0.0.1:0",
                "--no-socks",
            ]))
            .await;
        assert_eq!(code, Some(64), "{text}\n{stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(!stderr.contains("secret"), "{stderr}");
    }
}
