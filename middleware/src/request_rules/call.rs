//! The one decision of a call by a set of rules: the request-rules layer
//! and limited mode's preset both make it here.

use http::{Method, Request};

use crate::error::{BlockDecision, Blocked, BoxError, Reason, Source};
use crate::request::{Interceptable, RequestInfo, UdpAssociation};

use super::body::body_method_mark;
use super::{Refusal, RequestRules, RuleVerdict};

pub(super) fn refusal_of(info: &RequestInfo, refusal: Refusal) -> Blocked {
    Blocked::new(
        refusal.reason,
        refusal.source,
        info.target.clone(),
        info.protocol,
        &info.method,
    )
    .with_rule(refusal.rule)
}

pub(super) fn audited_of(info: &RequestInfo, refusal: Refusal) -> Blocked {
    let message = format!(
        "portcullis let {} {} through in audit mode; enforced, its request rules would refuse it ({refusal})",
        info.method.as_str().escape_debug(),
        info.target,
    );
    refusal_of(info, refusal)
        .with_decision(BlockDecision::Audit)
        .with_message(message)
}

/// What the engine lets through: whether to ask for interception, and a
/// would-be refusal to record (audit mode).
#[derive(Debug, Default)]
pub(crate) struct Pass {
    pub(crate) intercept: bool,
    pub(crate) audited: Option<Blocked>,
    /// An upgrade let through to a host with rules: WebSocket frames only.
    pub(crate) frames_only: bool,
}

/// The one decision of a call by `rules`, for the request-rules layer and
/// limited mode's preset alike: a tunnel to a covered destination is
/// intercepted when the transport offers it and refused when it cannot be
/// seen; a request is judged by [`RequestRules::decide_request`]. A git
/// fetch let through by its entry is marked for its body to be checked,
/// and a form or JSON body to a host whose rules name methods for its
/// `_method` to be judged ([`VerifyBodyMethod`]).
pub(crate) fn decide_call<B>(
    rules: &RequestRules,
    request: &mut Request<B>,
) -> Result<Pass, BoxError> {
    if rules.is_empty() {
        return Ok(Pass::default());
    }
    let info = RequestInfo::from_request(request)?;
    if info.protocol.is_lookup() {
        // A DNS question opens nothing: the rules judge the connection and
        // the requests that follow (limited mode's preset included).
        return Ok(Pass::default());
    }
    let mut blocks = rules.blocks_for(&info.target);
    if request.extensions().get::<UdpAssociation>().is_some() {
        // Decided datagram by datagram, by destination: only a block
        // covering everything (limited mode) refuses the association.
        blocks.retain(|(_, block)| block.read_only);
    }
    if blocks.is_empty() {
        return Ok(Pass::default());
    }
    let blocked = |refusal: Refusal| refusal_of(&info, refusal);
    if info.method == Method::CONNECT || info.protocol.is_tunnel() {
        let seeable = !info.protocol.is_tunnel() || info.protocol.can_intercept();
        let offered = info.method == Method::CONNECT
            && seeable
            && request.extensions().get::<Interceptable>().is_some();
        if offered {
            return Ok(Pass {
                intercept: true,
                ..Pass::default()
            });
        }
        if blocks.iter().any(|(_, block)| block.read_only) {
            // Limited mode: a CONNECT that could be intercepted needs the
            // CA; any other tunnel's methods are never seen.
            let reason = if seeable && info.method == Method::CONNECT {
                Reason::MitmRequired
            } else {
                Reason::MethodNotAllowed
            };
            return Err(Blocked::new(
                reason,
                Source::LimitedMode,
                info.target.clone(),
                info.protocol,
                &info.method,
            )
            .into());
        }
        let names: Vec<String> = blocks
            .iter()
            .map(|(_, block)| format!("{} ({})", block.name, block.host))
            .collect();
        return Err(blocked(Refusal {
            reason: Reason::MitmRequired,
            source: Source::RequestRules,
            rule: Some(names.join(", ")),
        })
        .with_message(format!(
            "portcullis refused {} {}: it has request rules ({}), which are checked only on requests portcullis can see; reach it over HTTP, or over an HTTPS CONNECT portcullis can intercept",
            info.method.as_str().escape_debug(),
            info.target,
            names.join(", ")
        ))
        .into());
    }
    let mut pass = match rules.decide_request(&info.target, request) {
        RuleVerdict::NoRules => return Ok(Pass::default()),
        RuleVerdict::Allowed(by) => {
            if rules.by_git_fetch(&by) {
                request
                    .extensions_mut()
                    .insert(crate::request::VerifyGitFetchBody);
            }
            Pass::default()
        }
        RuleVerdict::Refused(refusal) => return Err(blocked(refusal).into()),
        RuleVerdict::Audited(refusal) => Pass {
            audited: Some(audited_of(&info, refusal)),
            ..Pass::default()
        },
    };
    pass.frames_only = crate::inspect::is_upgrade(request.headers())
        && blocks.iter().any(|(_, block)| !block.read_only);
    if let Some(mark) = body_method_mark(rules, &blocks, request) {
        request.extensions_mut().insert(mark);
    }
    Ok(pass)
}

/// Limited mode's preset, built once: see [`RequestRules::limited`].
pub(crate) fn limited_preset(git_fetch: bool) -> &'static RequestRules {
    static WITH_GIT_FETCH: std::sync::LazyLock<RequestRules> =
        std::sync::LazyLock::new(|| RequestRules::limited(true));
    static READS_ONLY: std::sync::LazyLock<RequestRules> =
        std::sync::LazyLock::new(|| RequestRules::limited(false));
    if git_fetch {
        &WITH_GIT_FETCH
    } else {
        &READS_ONLY
    }
}
