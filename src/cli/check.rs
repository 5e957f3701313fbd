//! `portcullis check`: what the proxy would decide, without a proxy.

use super::args::CheckArgs;
use super::load::Prepared;
use super::usage_error;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use http::Request;
use portcullis_middleware::policy::Decision;
use portcullis_middleware::{find_blocked, BlockDecision, Intercept, Protocol, Target};

use crate::body::Body;
use crate::transport::model::RequestModel;

use crate::approvers::rules::RulesFile;

/// `check`'s answer for one target.
#[derive(Debug, serde::Serialize)]
pub(super) struct Verdict {
    target: String,
    /// allow, deny, ask, unresolvable (allowed, but the name does not
    /// resolve, so a live request would fail), or error (exit 1).
    decision: &'static str,
    reason: Option<String>,
    rule: Option<String>,
    message: Option<String>,
    /// The vetted addresses a live request would be sent to (directly, or
    /// through an upstream proxy asked for them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<String>,
}

impl Verdict {
    /// The exit code of this verdict alone.
    fn code(&self) -> u8 {
        match self.decision {
            "allow" => CHECK_ALLOW,
            "ask" => CHECK_ASK,
            "unresolvable" => CHECK_UNRESOLVABLE,
            _ => CHECK_DENY,
        }
    }

    fn text(&self) -> String {
        let mut text = format!("{} {}", self.decision, self.target);
        for (name, value) in [
            ("reason", &self.reason),
            ("rule", &self.rule),
            ("message", &self.message),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("\n{name}: {value}"));
            }
        }
        if !self.addresses.is_empty() {
            text.push_str(&format!("\naddresses: {}", self.addresses.join(", ")));
        }
        text
    }
}

/// `check`'s exit codes: every target allowed.
pub(super) const CHECK_ALLOW: u8 = 0;
/// A target is denied.
pub(super) const CHECK_DENY: u8 = 1;
/// A target would be asked (and none is denied).
pub(super) const CHECK_ASK: u8 = 2;
/// A target is allowed but its name does not resolve (and none is denied
/// or asked).
pub(super) const CHECK_UNRESOLVABLE: u8 = 3;

/// Several targets: deny wins, then ask, then unresolvable.
pub(super) fn combined_code(verdicts: &[Verdict]) -> u8 {
    let codes: Vec<u8> = verdicts.iter().map(Verdict::code).collect();
    [CHECK_DENY, CHECK_ASK, CHECK_UNRESOLVABLE]
        .into_iter()
        .find(|code| codes.contains(code))
        .unwrap_or(CHECK_ALLOW)
}

pub(super) async fn check(args: CheckArgs) -> ExitCode {
    let loaded = match args.options.load() {
        Ok(loaded) => loaded,
        Err(error) => return usage_error(&error),
    };
    if loaded.config.has_profiles() {
        let names: Vec<&str> = loaded.config.profiles.keys().map(String::as_str).collect();
        let _ = writeln!(
            std::io::stderr(),
            "portcullis: {} has profiles ({}); answering as the top-level policy (what auth.unmatched = \"default\" gives); --profile NAME answers as one of them",
            loaded.origin,
            names.join(", ")
        );
    }
    let Prepared {
        builder,
        approver,
        rules,
        ..
    } = match loaded.builder_without_secrets() {
        Ok(prepared) => prepared,
        Err(error) => return super::config_error(&error),
    };
    // With interception on, the proxy offers to intercept each CONNECT and
    // the stack decides whether it does (limited mode asks); when it does,
    // what an https:// URL asks is the request inside the tunnel.
    let interception = if loaded.config.intercepts() {
        Interception::Offered
    } else {
        Interception::Unavailable
    };
    let body = match (&args.data, &args.data_file) {
        (Some(data), _) => Some(bytes::Bytes::from(data.clone())),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut data = Vec::new();
            if let Err(error) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut data) {
                return usage_error(&format!("--data-file -: {error}"));
            }
            Some(data.into())
        }
        (None, Some(path)) => match std::fs::read(path) {
            Ok(data) => Some(data.into()),
            Err(error) => return usage_error(&format!("--data-file {}: {error}", path.display())),
        },
        (None, None) => None,
    };
    let mut headers = http::HeaderMap::new();
    for header in &args.headers {
        let parsed = header.split_once(':').and_then(|(name, value)| {
            Some((
                http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                http::HeaderValue::from_str(value.trim()).ok()?,
            ))
        });
        match parsed {
            Some((name, value)) => {
                headers.append(name, value);
            }
            None => {
                return usage_error(&format!(
                    "invalid --header {header:?}: write it as \"Name: value\""
                ))
            }
        }
    }
    let method = args.method.as_deref().or(body.as_ref().map(|_| "POST"));
    let content = Content {
        body: body.clone(),
        headers,
    };
    // Every target is parsed before any is decided: a typo is a usage error.
    let mut requests = Vec::with_capacity(args.targets.len());
    for target in &args.targets {
        match check_request(target, method, &content, interception) {
            Ok(request) => requests.push(request),
            Err(error) => {
                return usage_error(&format!(
                    "invalid target {target:?}: {error} (use a URL or host:port)"
                ))
            }
        }
    }
    // The very policy the builder holds: its patterns compiled once.
    let policy = builder.policy_handle().load();
    let service = builder.decision_service();
    let fixes = builder.fixes().clone();
    let mut verdicts = Vec::with_capacity(requests.len());
    for Probe { first, inside } in requests {
        let model = |request: &Request<Body>| {
            (
                request.extensions().get::<Target>().cloned(),
                request.extensions().get::<Protocol>().copied(),
                (
                    request.method().clone(),
                    request.uri().clone(),
                    request.headers().clone(),
                ),
            )
        };
        let (mut target, mut protocol, mut seen) = model(&first);
        // The decision is the stack's: the CONNECT first, then, when the
        // stack asks to intercept it, the request inside (as the proxy
        // would). The allowlist and the rules file are read again only to
        // name the entry that allowed it.
        let mut decision = crate::transport::call_stack(service.clone(), first).await;
        let intercepted = decision
            .as_ref()
            .is_ok_and(|response| response.extensions().get::<Intercept>().is_some());
        if let (true, Some(inside)) = (intercepted, inside) {
            (target, protocol, seen) = model(&inside);
            decision = crate::transport::call_stack(service.clone(), inside).await;
        }
        let (Some(target), Some(protocol)) = (target, protocol) else {
            return usage_error(&"the target could not be parsed");
        };
        // The request rule that let it through, when its host has rules.
        let (method, uri, headers) = seen;
        let mut asked = Request::new(());
        (*asked.method_mut(), *asked.uri_mut(), *asked.headers_mut()) =
            (method.clone(), uri, headers);
        let rules_say = match &body {
            Some(body) => policy.request_rules().decide_body(&target, &asked, body),
            None => policy.request_rules().decide_request(&target, &asked),
        };
        let rule_entry = match rules_say {
            portcullis_middleware::request_rules::RuleVerdict::Allowed(by)
                if method != http::Method::CONNECT =>
            {
                format!("; {}", policy.request_rules().describe(&by))
            }
            portcullis_middleware::request_rules::RuleVerdict::Audited(refusal) => {
                let why = refusal.rule.unwrap_or_default();
                format!("; audit only: {why} would be refused if enforced")
            }
            _ => String::new(),
        };
        // What secret scanning will not see of an allowed request.
        let unscanned = if policy.scan().is_on() && !policy.scan().covers(&target) {
            "; not scanned for secrets ([scan] skip_hosts)"
        } else {
            ""
        };
        // The rate a live request would count against.
        let limited = policy
            .rate_limits()
            .find(&target)
            .map(|(pattern, rate)| format!("; rate limited: [[rate_limits]] {pattern}: {rate}"))
            .unwrap_or_default();
        let verdict = match decision {
            Ok(response) => Verdict {
                addresses: response
                    .extensions()
                    .get::<crate::connector::VettedAddresses>()
                    .map(|vetted| vetted.0.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                decision: "allow",
                rule: Some(
                    allowing_rule(&policy, rules.as_ref(), &target, protocol)
                        + &rule_entry
                        + unscanned
                        + &limited,
                ),
                target: target.to_string(),
                reason: None,
                message: None,
            },
            Err(error) => match find_blocked(error.as_ref()) {
                Some(blocked) if blocked.decision == BlockDecision::Ask => Verdict {
                    addresses: Vec::new(),
                    target: target.to_string(),
                    decision: "ask",
                    reason: Some(blocked.reason.to_string()),
                    rule: None,
                    message: Some(format!(
                        "no allowlist entry or persisted rule answers; {} would be asked",
                        approver.as_deref().unwrap_or("the approver"),
                    )),
                },
                Some(blocked) => Verdict {
                    addresses: Vec::new(),
                    target: target.to_string(),
                    decision: "deny",
                    reason: Some(blocked.reason.to_string()),
                    rule: Some(blocked.rule.clone().unwrap_or_else(|| "none".into())),
                    message: Some(fixes.message(blocked)),
                },
                None if !unresolvable(error.as_ref()) => Verdict {
                    addresses: Vec::new(),
                    target: target.to_string(),
                    decision: "error",
                    reason: None,
                    rule: None,
                    message: Some(error.to_string()),
                },
                None => Verdict {
                    addresses: Vec::new(),
                    target: target.to_string(),
                    decision: "unresolvable",
                    reason: Some("unresolvable".into()),
                    rule: Some(
                        allowing_rule(&policy, rules.as_ref(), &target, protocol) + unscanned,
                    ),
                    message: Some(format!(
                        "the policy allows it, but a live request would fail: {error}"
                    )),
                },
            },
        };
        verdicts.push(verdict);
    }
    let mut stdout = std::io::stdout().lock();
    for (index, verdict) in verdicts.iter().enumerate() {
        let line = if args.json {
            serde_json::to_string(verdict).unwrap_or_default()
        } else if index + 1 < verdicts.len() {
            format!("{}\n", verdict.text())
        } else {
            verdict.text()
        };
        let _ = writeln!(stdout, "{line}");
    }
    ExitCode::from(combined_code(&verdicts))
}

/// Whether a decision failed only because the name does not resolve (or
/// its lookup timed out).
pub(super) fn unresolvable(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        portcullis_middleware::ProxyErrorRef::find(error),
        Some(portcullis_middleware::ProxyErrorRef::Upstream(upstream))
            if matches!(
                upstream.kind,
                portcullis_middleware::UpstreamErrorKind::Unresolved
                    | portcullis_middleware::UpstreamErrorKind::TimedOut
            )
    )
}

/// The entry that let `target` through: an allowlist entry, else the
/// persisted rule (named with its file).
pub(super) fn allowing_rule(
    policy: &portcullis_middleware::NetworkPolicy,
    rules: Option<&RulesFile>,
    target: &Target,
    protocol: Protocol,
) -> String {
    if let Decision::Allow { rule } = policy.decide(target) {
        return rule;
    }
    if let (Some(rules), Target::Host { host, port }) = (rules, target) {
        let key = portcullis_middleware::ApprovalKey {
            host: host.clone(),
            protocol,
            port: *port,
        };
        if let Some((portcullis_middleware::RuleDecision::Allow, name)) =
            portcullis_middleware::RuleBook::lookup(rules, &key)
        {
            return name;
        }
    }
    "none named (allowed without a list entry)".to_owned()
}

/// What `check` sends through the stack for one target, as a live client
/// and the proxy would: the first request (an absolute-form request for an
/// `http://` URL, with `method`, GET by default; a `CONNECT` for
/// `host:port` or an `https://` URL, offered for interception when the
/// proxy can intercept), and for an `https://` URL the proxy can
/// intercept, the request inside the tunnel (protocol `https_mitm`), sent
/// only if the stack asks to intercept.
pub(super) struct Probe {
    first: Request<Body>,
    inside: Option<Request<Body>>,
}

/// Whether the proxy checked can intercept HTTPS (it has a CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Interception {
    /// Each `CONNECT` is offered for interception; the stack decides.
    Offered,
    /// No CA: tunnels stay opaque.
    Unavailable,
}

/// What `check` sends beside the method: `--data`/`--data-file` and
/// `--header`.
#[derive(Debug, Default)]
pub(super) struct Content {
    pub(super) body: Option<bytes::Bytes>,
    pub(super) headers: http::HeaderMap,
}

pub(super) fn check_request(
    target: &str,
    method: Option<&str>,
    content: &Content,
    interception: Interception,
) -> Result<Probe, String> {
    let can_intercept = interception == Interception::Offered;
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let (uri, parsed) = if target.contains("://") {
        let uri: http::Uri = target
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let parsed = Target::from_uri(&uri).map_err(|e| e.to_string())?;
        (Some(uri), parsed)
    } else {
        let parsed = Target::parse_authority(target, None).map_err(|e| e.to_string())?;
        (None, parsed)
    };
    let request = |uri: http::Uri, protocol: Protocol| -> Result<Request<Body>, String> {
        let method = http::Method::from_bytes(method.unwrap_or("GET").as_bytes())
            .map_err(|e| e.to_string())?;
        let body = match &content.body {
            Some(data) => crate::body::full(data.clone()),
            None => crate::body::empty(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .map_err(|e| e.to_string())?;
        *request.headers_mut() = content.headers.clone();
        if let Some(data) = &content.body {
            request
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, data.len().into());
        }
        RequestModel::new(parsed.clone(), protocol, client).apply(&mut request);
        Ok(request)
    };
    let inside = match uri {
        Some(uri) if uri.scheme_str() == Some("http") => {
            return Ok(Probe {
                first: request(uri, Protocol::Http)?,
                inside: None,
            })
        }
        Some(uri) if can_intercept => Some(request(uri, Protocol::HttpsMitm)?),
        _ if method.is_some_and(|m| m != "CONNECT") => return Err(
            "this target is a CONNECT tunnel whose methods are not seen; --method is for http:// URLs (and https:// ones when the proxy intercepts)"
                .into(),
        ),
        _ => None,
    };
    let model = RequestModel::new(parsed.clone(), Protocol::HttpsConnect, client);
    let model = if can_intercept {
        model.mark(portcullis_middleware::Interceptable)
    } else {
        model
    };
    Ok(Probe {
        first: model.connect().map_err(|e| e.to_string())?,
        inside,
    })
}
