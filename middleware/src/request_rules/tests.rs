//! The request rules' unit tests.
use super::*;
use crate::request::Interceptable;
use crate::{find_blocked, EnforceRulesLayer, Intercept, NetworkPolicy, PolicyHandle, Protocol};
use http::Response;
use std::borrow::Cow;
use std::task::Poll;
use tower_test::mock;

fn rules() -> RequestRules {
    RequestRules::new(vec![
        RuleBlock::new("api.github.com", "rules[0]")
            .unwrap()
            .allow(RuleEntry::new().methods(["GET", "HEAD"]).unwrap())
            .allow(
                RuleEntry::new()
                    .methods(["POST", "PATCH"])
                    .unwrap()
                    .paths(["/repos/acme/widgets/issues/**"])
                    .unwrap(),
            )
            .deny(RuleEntry::new().paths(["/user/keys/**"]).unwrap()),
        RuleBlock::new("*.github.com", "rules[1]")
            .unwrap()
            .allow(RuleEntry::new())
            .deny(RuleEntry::new().paths(["/admin/**"]).unwrap()),
    ])
}

fn target(authority: &str) -> Target {
    Target::parse_authority(authority, None).unwrap()
}

fn verdict(method: &str, path: &str) -> RuleVerdict {
    rules().decide(
        &target("api.github.com:443"),
        &Method::from_bytes(method.as_bytes()).unwrap(),
        path,
    )
}

fn reason(method: &str, path: &str) -> Option<Reason> {
    match verdict(method, path) {
        RuleVerdict::Refused(refusal) => Some(refusal.reason),
        _ => None,
    }
}

#[test]
fn parameters_are_dropped_and_ambiguous_spellings_refused() {
    assert_eq!(normalise_path("/a;x=1/b").unwrap(), ["a", "b"]);
    assert_eq!(normalise_path("/a/..;/b").unwrap(), ["b"]);
    assert_eq!(normalise_path("/a/%2e%2e;x/b").unwrap(), ["b"]);
    assert_eq!(normalise_path("/a;").unwrap(), ["a"]);
    assert_eq!(normalise_path("/100%25").unwrap(), ["100%"]);
    for ambiguous in [
        "/%252e%252e/x",
        "/%25%32%65",
        "/%c0%ae%c0%ae/x",
        "/%ff",
        "/%u002e",
        "/%U002E",
        "/a%",
        "/a%zz",
        "/a%3bb",
        "/a.",
        "/a./b",
        "/a%20",
        "/a%09/b",
        "/a%0d%0a",
        "/a%c2%a0",
        "/...",
    ] {
        assert!(normalise_path(ambiguous).is_err(), "{ambiguous}");
    }
}

#[test]
fn override_fields_are_read_as_the_frameworks_read_them() {
    use crate::inspect::is_method_override_name;
    for name in [
        "_method",
        "_METHOD",
        ".method",
        " _method",
        "_method[]",
        "_method[0]",
        "[method",
        "_method ",
    ] {
        assert!(is_method_override_name(name), "{name:?}");
    }
    for name in ["method", "x_method", "_methods", "_method[", "__method"] {
        assert!(!is_method_override_name(name), "{name}");
    }
    assert_eq!(
        method_overrides_in_form(b"a=1&_method=DELETE&.method=PUT"),
        ["DELETE", "PUT"]
    );
    assert_eq!(method_overrides_in_form(b"_method=PATCH+ME"), ["PATCH ME"]);
    assert_eq!(
        method_overrides_in_json(
            br#"{"_method":"POST","x":{"_method":"no"},"_method":"DELETE","_method[]":["PUT"]}"#
        ),
        ["POST", "DELETE", "PUT"]
    );
    assert_eq!(method_overrides_in_json(br#"{"_method": 7}"#), [""]);
    assert!(method_overrides_in_json(b"[1, 2]").is_empty());
    assert!(method_overrides_in_json(b"not json").is_empty());
    let form = |value: &str| {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, value.parse().unwrap());
        BodyForm::of(&headers)
    };
    assert_eq!(
        form("Application/X-WWW-Form-Urlencoded; charset=utf-8"),
        Some(BodyForm::UrlEncoded)
    );
    assert_eq!(
        form("multipart/form-data; boundary=x"),
        Some(BodyForm::Multipart)
    );
    assert_eq!(form("application/vnd.api+json"), Some(BodyForm::Json));
    assert_eq!(form("text/plain"), None);
}

#[test]
fn paths_are_normalised_before_matching() {
    assert_eq!(normalise_path("/a//b/./c/../d").unwrap(), ["a", "b", "d"]);
    assert_eq!(normalise_path("/%2e%2e/x/%2E/y").unwrap(), ["x", "y"]);
    assert_eq!(normalise_path("/../../x").unwrap(), ["x"]);
    assert!(normalise_path("/a%2Fb").is_err());
    assert!(normalise_path("/a%5cb").is_err());
    assert!(normalise_path("/a\\b").is_err());
    assert!(normalise_path("/a%00").is_err());
    assert_eq!(normalise_path("/caf%C3%A9").unwrap(), ["café"]);
}

#[test]
fn globs() {
    let glob = PathGlob::parse("/repos/*/issues/**").unwrap();
    fn path(p: &str) -> Vec<Cow<'_, str>> {
        normalise_path(p).unwrap()
    }
    assert!(glob.matches(&path("/repos/acme/issues"), false));
    assert!(glob.matches(&path("/repos/acme/issues/1/comments"), false));
    assert!(!glob.matches(&path("/repos/acme/pulls/1"), false));
    assert!(!glob.matches(&path("/repos/issues"), false));
    assert!(!glob.matches(&path("/Repos/acme/issues"), false));
    assert!(glob.matches(&path("/Repos/acme/issues"), true));
    assert!(PathGlob::parse("/").unwrap().matches(&path("/"), false));
    for bad in [
        "repos", "/a//b", "/a/", "/a*", "/../x", "/a%2Fb", "/a?b", "/{a,b}", "/[b", "/a]",
    ] {
        assert!(PathGlob::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn deny_wins_then_allow_then_not_matched() {
    assert_eq!(reason("GET", "/repos/acme/widgets"), None);
    assert_eq!(
        reason("POST", "/repos/acme/widgets/issues/3/comments"),
        None
    );
    assert_eq!(
        reason("POST", "/repos/acme/other/issues"),
        Some(Reason::RuleNotMatched)
    );
    assert_eq!(
        reason("DELETE", "/repos/acme/widgets"),
        Some(Reason::RuleNotMatched)
    );
    // Deny wins over an allow, through every trick on the path.
    for path in [
        "/user/keys/1",
        "/repos/acme/../../user/keys/1",
        "/%2e%2e/user/keys",
        "//user//keys/",
        "/USER/Keys/1",
        "/user/%6beys/1",
    ] {
        assert_eq!(reason("GET", path), Some(Reason::RuleDenied), "{path}");
    }
    // An encoded separator is never matched against anything.
    assert_eq!(reason("GET", "/user%2Fkeys/1"), Some(Reason::AmbiguousPath));
    // A less specific block's deny applies too: rules narrow.
    assert_eq!(reason("GET", "/admin/x"), Some(Reason::RuleDenied));
    // Methods: allow compares exactly, deny ignores case.
    assert_eq!(reason("get", "/repos"), Some(Reason::RuleNotMatched));
    match verdict("POST", "/repos/acme/widgets/issues") {
        RuleVerdict::Allowed(by) => {
            let rule = rules().describe(&by);
            assert!(rule.starts_with("rules[0].allow[1]"), "{rule}")
        }
        other => panic!("{other:?}"),
    }
    match verdict("GET", "/user/keys") {
        RuleVerdict::Refused(Refusal {
            rule: Some(rule), ..
        }) => {
            assert_eq!(
                rule,
                "rules[0].deny[0] (api.github.com): paths /user/keys/**"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rules().decide(&target("example.com:443"), &Method::DELETE, "/"),
        RuleVerdict::NoRules
    );
}

#[test]
fn an_auditing_block_lets_through_what_it_would_refuse_unless_another_enforces() {
    let audit = |host: &str, name: &str| {
        RuleBlock::new(host, name)
            .unwrap()
            .allow(RuleEntry::new().methods(["GET"]).unwrap())
            .deny(RuleEntry::new().paths(["/admin/**"]).unwrap())
            .audit()
    };
    let alone = RequestRules::new(vec![audit("x.test", "rules[0]")]);
    let x = target("x.test:443");
    assert!(matches!(
        alone.decide(&x, &Method::GET, "/admin/a"),
        RuleVerdict::Audited(Refusal {
            reason: Reason::RuleDenied,
            ..
        })
    ));
    assert!(matches!(
        alone.decide(&x, &Method::POST, "/a"),
        RuleVerdict::Audited(Refusal {
            reason: Reason::RuleNotMatched,
            ..
        })
    ));
    assert!(matches!(
        alone.decide(&x, &Method::GET, "/a"),
        RuleVerdict::Allowed(_)
    ));
    // An enforcing block for the same host still refuses.
    let both = RequestRules::new(vec![
        audit("x.test", "rules[0]"),
        RuleBlock::new("x.test", "rules[1]")
            .unwrap()
            .allow(RuleEntry::new().methods(["GET"]).unwrap()),
    ]);
    assert!(matches!(
        both.decide(&x, &Method::POST, "/a"),
        RuleVerdict::Refused(Refusal { reason: Reason::RuleNotMatched, rule: Some(rule), .. }) if rule.starts_with("rules[1]")
    ));
    assert!(matches!(
        both.decide(&x, &Method::GET, "/admin/a"),
        RuleVerdict::Audited(Refusal {
            reason: Reason::RuleDenied,
            ..
        })
    ));
}

fn request(method: &str, uri: &str, protocol: Protocol, authority: &str) -> Request<()> {
    let mut request = Request::builder().method(method).uri(uri).body(()).unwrap();
    request.extensions_mut().insert(target(authority));
    request.extensions_mut().insert(protocol);
    request
}

async fn outcome(request: Request<()>) -> Result<bool, Reason> {
    let policy = PolicyHandle::new(NetworkPolicy::builder().request_rules(rules()).build());
    let (mut service, mut mock) =
        mock::spawn_layer::<Request<()>, Response<()>, _>(EnforceRulesLayer::new(policy));
    mock.allow(1);
    assert!(service.poll_ready().is_ready());
    let response = service.call(request);
    match mock.poll_request() {
        Poll::Ready(Some((_, send))) => {
            send.send_response(Response::new(()));
            let response = response.await.unwrap();
            Ok(response.extensions().get::<Intercept>().is_some())
        }
        _ => Err(find_blocked(response.await.unwrap_err().as_ref())
            .unwrap()
            .reason),
    }
}

#[tokio::test]
async fn the_layer_decides_requests_and_asks_to_intercept_ruled_tunnels() {
    use Protocol::*;
    let url = "https://api.github.com/user/keys";
    assert_eq!(
        outcome(request("GET", url, HttpsMitm, "api.github.com:443")).await,
        Err(Reason::RuleDenied)
    );
    assert_eq!(
        outcome(request(
            "GET",
            "http://api.github.com/x",
            Http,
            "api.github.com:80"
        ))
        .await,
        Ok(false)
    );
    // A ruled host's CONNECT: intercepted when offered, refused when not.
    let mut offered = request(
        "CONNECT",
        "api.github.com:443",
        HttpsConnect,
        "api.github.com:443",
    );
    offered.extensions_mut().insert(Interceptable);
    assert_eq!(outcome(offered).await, Ok(true));
    assert_eq!(
        outcome(request(
            "CONNECT",
            "api.github.com:443",
            HttpsConnect,
            "api.github.com:443"
        ))
        .await,
        Err(Reason::MitmRequired)
    );
    assert_eq!(
        outcome(request(
            "CONNECT",
            "api.github.com:443",
            Socks5Tcp,
            "api.github.com:443"
        ))
        .await,
        Err(Reason::MitmRequired)
    );
    // A DNS question for a ruled host is answered: the rules judge what
    // follows. A captured connection is intercepted like a CONNECT.
    assert_eq!(
        outcome(request(
            "CONNECT",
            "api.github.com:0",
            Dns,
            "api.github.com:443"
        ))
        .await,
        Ok(false)
    );
    let mut captured = request(
        "CONNECT",
        "api.github.com:443",
        Transparent,
        "api.github.com:443",
    );
    captured.extensions_mut().insert(Interceptable);
    assert_eq!(outcome(captured).await, Ok(true));
    // A host without rules: untouched, never intercepted.
    let mut other = request(
        "CONNECT",
        "example.com:443",
        HttpsConnect,
        "example.com:443",
    );
    other.extensions_mut().insert(Interceptable);
    assert_eq!(outcome(other).await, Ok(false));
}

fn with_headers(mut request: Request<()>, headers: &[(&'static str, &str)]) -> Request<()> {
    for (name, value) in headers {
        request
            .headers_mut()
            .append(*name, http::HeaderValue::from_str(value).unwrap());
    }
    request
}

#[tokio::test]
async fn method_overrides_and_upgrades_cannot_slip_past_rules() {
    use Protocol::*;
    let get = |uri: &str, headers: &[(&'static str, &str)]| {
        with_headers(
            request("GET", uri, HttpsMitm, "api.github.com:443"),
            headers,
        )
    };
    let repo = "https://api.github.com/repos/acme/x";
    assert_eq!(outcome(get(repo, &[])).await, Ok(false));
    assert_eq!(
        outcome(get(repo, &[("x-http-method-override", "DELETE")])).await,
        Err(Reason::RuleNotMatched),
        "every method asked for must be allowed"
    );
    assert_eq!(
        outcome(get(repo, &[("x-http-method-override", "HEAD")])).await,
        Ok(false),
        "an override to an allowed method is one"
    );
    assert_eq!(
        outcome(get(&format!("{repo}?_method=PUT"), &[])).await,
        Err(Reason::RuleNotMatched)
    );
    assert_eq!(
        outcome(get(repo, &[("upgrade", "websocket")])).await,
        Err(Reason::RuleNotMatched),
        "an upgrade becomes a stream no rule sees"
    );
    // An upgrade passes only an allow entry that names its paths, and a
    // deny entry still refuses it.
    let ws = RequestRules::new(vec![RuleBlock::new("api.test", "rules[0]")
        .unwrap()
        .allow(RuleEntry::new().methods(["GET"]).unwrap())
        .allow(
            RuleEntry::new()
                .methods(["GET"])
                .unwrap()
                .paths(["/ws/**"])
                .unwrap(),
        )
        .deny(RuleEntry::new().paths(["/ws/admin/**"]).unwrap())]);
    let upgrade = |path: &str| {
        Request::get(format!("https://api.test{path}"))
            .header("upgrade", "websocket")
            .body(())
            .unwrap()
    };
    let api = target("api.test:443");
    assert!(matches!(
        ws.decide_request(&api, &upgrade("/ws/chat")),
        RuleVerdict::Allowed(_)
    ));
    assert!(matches!(
        ws.decide_request(&api, &upgrade("/other")),
        RuleVerdict::Refused(Refusal {
            reason: Reason::RuleNotMatched,
            ..
        })
    ));
    assert!(matches!(
        ws.decide_request(&api, &upgrade("/ws/admin/x")),
        RuleVerdict::Refused(Refusal {
            reason: Reason::RuleDenied,
            ..
        })
    ));
    // A deny entry catches an overridden method, any case.
    let rules = RequestRules::new(vec![RuleBlock::new("api.test", "rules[0]")
        .unwrap()
        .allow(RuleEntry::new())
        .deny(RuleEntry::new().methods(["DELETE"]).unwrap())]);
    let target = target("api.test:443");
    let overridden = with_headers(
        request(
            "POST",
            "https://api.test/a?_method=delete",
            HttpsMitm,
            "api.test:443",
        ),
        &[],
    );
    assert!(matches!(
        rules.decide_request(&target, &overridden),
        RuleVerdict::Refused(Refusal {
            reason: Reason::RuleDenied,
            ..
        })
    ));
    // Without globs, a path that cannot be normalised is no reason to refuse.
    let encoded = request("GET", "https://api.test/a%2Fb", HttpsMitm, "api.test:443");
    assert!(matches!(
        rules.decide_request(&target, &encoded),
        RuleVerdict::Allowed(_)
    ));
}

#[test]
fn limited_mode_is_a_preset_of_the_rules() {
    use Protocol::*;
    let limited = RequestRules::limited(true);
    let decide = |request: Request<()>| {
        let target = request.extensions().get::<Target>().cloned().unwrap();
        limited.decide_request(&target, &request)
    };
    let refused_as_limited_mode = |verdict: RuleVerdict| {
        matches!(
            verdict,
            RuleVerdict::Refused(Refusal {
                reason: Reason::MethodNotAllowed,
                source: Source::LimitedMode,
                ..
            })
        )
    };
    let get = request("GET", "http://any.test/a%2Fb", Http, "any.test:80");
    assert!(
        matches!(decide(get), RuleVerdict::Allowed(_)),
        "every host, any path"
    );
    let mut socket = request("GET", "/v1/x", UnixSocket, "any.test:80");
    socket
        .extensions_mut()
        .insert(Target::unix("/run/app.sock").unwrap());
    assert!(
        matches!(decide(socket), RuleVerdict::Allowed(_)),
        "and sockets"
    );
    assert!(refused_as_limited_mode(decide(request(
        "POST",
        "http://any.test/",
        Http,
        "any.test:80"
    ))));
    let overridden = with_headers(
        request("GET", "http://any.test/", Http, "any.test:80"),
        &[("x-http-method-override", "GET")],
    );
    let verdict = decide(overridden);
    assert!(
        refused_as_limited_mode(verdict.clone()),
        "any override, even to a read"
    );
    // Saying what hid in the read, not "only GET, HEAD and OPTIONS".
    assert!(
        matches!(&verdict, RuleVerdict::Refused(Refusal { rule: Some(rule), .. }) if rule.contains("a method override")),
        "{verdict:?}"
    );
    let fetch = || {
        with_headers(
            request(
                "POST",
                "https://git.test/acme/x.git/git-upload-pack",
                HttpsMitm,
                "git.test:443",
            ),
            &[("content-type", "application/x-git-upload-pack-request")],
        )
    };
    match decide(fetch()) {
        RuleVerdict::Allowed(by) => assert!(limited.by_git_fetch(&by)),
        other => panic!("{other:?}"),
    }
    let without_git = RequestRules::limited(false);
    let target = target("git.test:443");
    assert!(refused_as_limited_mode(
        without_git.decide_request(&target, &fetch())
    ));
}
