//! The secret-scanning layer: refuses (or records, in audit mode) a request
//! that carries a secret, by the live policy's [`ScanPolicy`](crate::scan::ScanPolicy).
//! It sits before the credentials are added, so a secret the proxy injects
//! never trips it.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BlockDecision, Blocked, BoxError, Reason, Source};
use crate::future::MarkedResponse;
use crate::policy::PolicyHandle;
use crate::request::{Interceptable, RequestInfo};
use crate::scan::{Location, ScanAction};
use crate::violation_log::RecordLater;

/// Adds [`ScanSecrets`].
#[derive(Debug, Clone)]
pub struct ScanSecretsLayer {
    policy: PolicyHandle,
    shared: Arc<Shared>,
}

/// What every [`ScanSecrets`] of a layer shares: one `Arc`, so cloning the
/// service (per request, in a boxed stack) stays cheap.
#[derive(Debug, Default)]
struct Shared {
    placeholders: Arc<[String]>,
    credentials: Option<crate::credentials::Credentials>,
    augmented: Mutex<Option<Augmented>>,
    late: Option<RecordLater>,
}

/// The policy's scan with the credentials' secrets added, and what it was
/// built from: the policy's generation and the secrets then.
type Augmented = (
    u64,
    Vec<(String, crate::credentials::Secret)>,
    Arc<crate::scan::ScanPolicy>,
);

impl ScanSecretsLayer {
    /// Reads the scanning settings from `policy` per request.
    pub fn new(policy: PolicyHandle) -> ScanSecretsLayer {
        ScanSecretsLayer {
            policy,
            shared: Arc::new(Shared {
                placeholders: Arc::from(Vec::new()),
                ..Shared::default()
            }),
        }
    }

    /// The layer with `change` made to what its services share (a new
    /// cache of the credentials' secrets).
    fn changed(mut self, change: impl FnOnce(&mut Shared)) -> ScanSecretsLayer {
        let mut shared = Shared {
            placeholders: self.shared.placeholders.clone(),
            credentials: self.shared.credentials.clone(),
            augmented: Mutex::default(),
            late: self.shared.late.clone(),
        };
        change(&mut shared);
        self.shared = Arc::new(shared);
        self
    }

    /// The credentials the stack adds further in: their placeholders are
    /// not secrets, and their secrets (as the store holds them at each
    /// request) are looked for by value (`credential:NAME`).
    pub fn credentials(
        self,
        layer: &crate::credentials::InjectCredentialsLayer,
    ) -> ScanSecretsLayer {
        self.changed(|shared| {
            shared.placeholders = Arc::from(layer.placeholders());
            shared.credentials =
                (!layer.credentials().is_empty()).then(|| layer.credentials().clone());
        })
    }

    /// Where the findings in WebSocket messages are recorded: they are
    /// judged after the `101` went out, so past the violation log's
    /// response ([`ViolationLogLayer::late`](crate::ViolationLogLayer::late)).
    /// Without it they are only traced.
    pub fn recording(self, late: RecordLater) -> ScanSecretsLayer {
        self.changed(|shared| shared.late = Some(late))
    }

    /// Tokens that are not secrets though shaped like them: the
    /// placeholders of the credentials the stack adds further in
    /// ([`InjectCredentialsLayer::placeholders`](crate::credentials::InjectCredentialsLayer::placeholders)).
    pub fn placeholders(self, placeholders: Vec<String>) -> ScanSecretsLayer {
        self.changed(|shared| shared.placeholders = Arc::from(placeholders))
    }
}

impl<S> Layer<S> for ScanSecretsLayer {
    type Service = ScanSecrets<S>;

    fn layer(&self, inner: S) -> ScanSecrets<S> {
        ScanSecrets {
            inner,
            policy: self.policy.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Scans each request for secrets; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ScanSecrets<S> {
    inner: S,
    policy: PolicyHandle,
    shared: Arc<Shared>,
}

impl<S> ScanSecrets<S> {
    /// `scan` with each credential's secret as the store holds it now
    /// (`credential:NAME`): built again only when the policy (its
    /// `generation`) or a secret changed, not per request.
    fn with_secrets(
        &self,
        generation: u64,
        scan: &crate::scan::ScanPolicy,
        credentials: &crate::credentials::Credentials,
    ) -> Arc<crate::scan::ScanPolicy> {
        let secrets = credentials.current_secrets();
        let mut cache = self
            .shared
            .augmented
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((built_at, built_from, built)) = cache.as_ref() {
            if *built_at == generation && *built_from == secrets {
                return built.clone();
            }
        }
        let mut augmented = scan.clone();
        for (name, secret) in &secrets {
            let detector = format!("credential:{name}");
            // A detector set to `off` is not looked for at all.
            if scan.detector_action(&detector) != Some(ScanAction::Off) {
                augmented.scanner.known_value(&detector, secret.expose());
            }
        }
        let built = Arc::new(augmented);
        *cache = Some((generation, secrets, built.clone()));
        built
    }
}

impl<S, B, R> Service<Request<B>> for ScanSecrets<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = MarkedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !self.policy.scans() {
            return MarkedResponse::inner(self.inner.call(request));
        }
        // Read before the policy: a cache built under it is never newer.
        let generation = self.policy.generation();
        let policy = self.policy.load();
        let scan = policy.scan();
        if !scan.is_on() {
            return MarkedResponse::inner(self.inner.call(request));
        }
        let info = match RequestInfo::from_request(&request) {
            Ok(info) => info,
            Err(error) => return MarkedResponse::refused(error),
        };
        // The credentials' secrets as they are now (a reload may rotate them).
        let augmented;
        let scan = match &self.shared.credentials {
            Some(credentials) if scan.covers(&info.target) => {
                augmented = self.with_secrets(generation, scan, credentials);
                &*augmented
            }
            _ => scan,
        };
        // The labels a wildcard let the program choose: seen on every way
        // in, tunnels and DNS questions included.
        let chosen = if scan.covers(&info.target) {
            chosen_base(&policy, &info.target)
        } else {
            None
        };
        if let Some((name, base)) = chosen {
            if let Some(finding) = scan
                .scanner
                .scan_host(name, &base, &self.shared.placeholders)
            {
                // The name itself holds the data: records show the fixed
                // domain only.
                let mut shown = info.clone();
                if let crate::target::Target::Host { port, .. } = info.target {
                    shown.target = crate::target::Target::Host {
                        host: crate::target::Host::Name(format!("{{redacted}}.{base}")),
                        port,
                    };
                }
                return self.judged(
                    request,
                    verdict(
                        scan.action_for(&info.target, &finding.detector),
                        &shown,
                        Reason::SecretDetected,
                        &finding.to_string(),
                    ),
                );
            }
        }
        let Some(finding) = scan.finding(&info.target, &request, &self.shared.placeholders) else {
            // A tunnel: its requests are scanned only if it is intercepted.
            if scan.covers(&info.target)
                && (info.method == http::Method::CONNECT || info.protocol.is_tunnel())
                && !info.protocol.is_lookup()
            {
                let offered = info.method == http::Method::CONNECT
                    && (!info.protocol.is_tunnel() || info.protocol.can_intercept())
                    && request.extensions().get::<Interceptable>().is_some();
                if offered {
                    return MarkedResponse::marked(self.inner.call(request), true, None);
                }
                let why = "secret scanning is on and this tunnel cannot be intercepted (no CA, or a way in such as SOCKS5 whose requests cannot be seen); add the host to [scan] skip_hosts to let it through unseen";
                let action = scan.host_action(&info.target);
                return self.judged(request, verdict(action, &info, Reason::NotInspected, why));
            }
            // An upgrade: a WebSocket's messages are judged one by one by
            // the transport; any other protocol cannot be read.
            if scan.covers(&info.target) && crate::inspect::is_upgrade(request.headers()) {
                let protocol = crate::inspect::upgrade_token(request.headers());
                if protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket")) {
                    let frames = ScanFrames {
                        scan: scan.clone(),
                        placeholders: self.shared.placeholders.clone(),
                        info,
                        late: self.shared.late.clone(),
                    };
                    return MarkedResponse::inner(self.inner.call(request)).with_extension(frames);
                }
                let why = format!(
                    "an upgrade to {} cannot be inspected (only WebSocket messages can)",
                    protocol.unwrap_or("several protocols").escape_debug()
                );
                let action = scan.host_action(&info.target);
                return self.judged(request, verdict(action, &info, Reason::NotInspected, &why));
            }
            // The body is read (bounded) and judged by the connector,
            // before anything is sent.
            if scan.covers(&info.target) && crate::inspect::carries_body(&request) {
                request.extensions_mut().insert(ScanBody {
                    scan: scan.clone(),
                    placeholders: self.shared.placeholders.clone(),
                });
            }
            return MarkedResponse::inner(self.inner.call(request));
        };
        let decided = verdict(
            scan.action_for(&info.target, &finding.detector),
            &info,
            Reason::SecretDetected,
            &finding.to_string(),
        );
        self.judged(request, decided)
    }
}

impl<S> ScanSecrets<S> {
    /// The request sent on (with an audit record) or refused, as
    /// `decided`.
    fn judged<B, R>(
        &mut self,
        request: Request<B>,
        decided: Result<Option<Blocked>, BoxError>,
    ) -> MarkedResponse<S::Future>
    where
        S: Service<Request<B>, Response = Response<R>>,
    {
        match decided {
            Ok(audited) => MarkedResponse::marked(self.inner.call(request), false, audited),
            Err(refused) => MarkedResponse::refused(refused),
        }
    }
}

/// The name of `target` and the domain its allowlist entry fixed, when a
/// wildcard let the rest be chosen: `*.example.com` and `**.example.com`
/// fix `example.com`; `*` fixes only the registrable domain.
fn chosen_base<'a>(
    policy: &crate::policy::NetworkPolicy,
    target: &'a crate::target::Target,
) -> Option<(&'a str, String)> {
    use crate::pattern::{HostPattern, MatchKind};
    use crate::target::{Host, Target};
    let Target::Host { host, port } = target else {
        return None;
    };
    let Host::Name(name) = host else {
        return None;
    };
    let (pattern, kind) = policy.allowed().find(host, *port)?;
    let base = match (kind, &pattern.host) {
        (
            MatchKind::Wildcard,
            HostPattern::Subdomains(base) | HostPattern::ApexAndSubdomains(base),
        ) => base.clone(),
        (MatchKind::Any, _) => psl::domain_str(name)?.to_owned(),
        _ => return None,
    };
    Some((name.as_str(), base))
}

/// What `action` makes of a finding (`what`: the detector and the place,
/// or why a body was not inspected): a refusal, or an audit record.
fn verdict(
    action: ScanAction,
    info: &RequestInfo,
    reason: Reason,
    what: &str,
) -> Result<Option<Blocked>, BoxError> {
    let method = info.method.as_str().escape_debug().to_string();
    let blocked = Blocked::new(
        reason,
        Source::Layer("secret_scan"),
        info.target.clone(),
        info.protocol,
        &info.method,
    )
    .with_rule(Some(what.to_owned()));
    let detector_fix;
    let (found, fix) = match reason {
        Reason::NotInspected if what.contains("tunnel") => (
            format!("it could not be inspected: {what}"),
            "or give the proxy a CA its clients trust ([network] mitm = true)",
        ),
        Reason::NotInspected if what.contains("upgrade") || what.contains("WebSocket") => (
            format!("it could not be inspected: {what}"),
            "keep a WebSocket message under [scan] max_body, or add the host to [scan] skip_hosts to let it through unread",
        ),
        Reason::NotInspected => (
            format!("its body could not be inspected ({what})"),
            "send a smaller body (or raise [scan] max_body), or add the host to [scan] skip_hosts",
        ),
        _ => {
            let (detector, _) = crate::scan::finding_parts(what);
            detector_fix = format!(
                "remove it from the request, or, if it is not a secret, set [scan.detectors] \"{}\" = \"audit\" (or \"off\"), or add the host to [scan] skip_hosts",
                detector.escape_debug()
            );
            (
                format!("it carries a secret: {what} (the value is not recorded)"),
                detector_fix.as_str(),
            )
        }
    };
    match action {
        // A detector or host set to `off`: the finding does nothing.
        ScanAction::Off => Ok(None),
        ScanAction::Audit => {
            let message = format!(
                "portcullis let {method} {} through in audit mode; {found}, which [scan] action = \"deny\" refuses",
                info.target
            );
            Ok(Some(
                blocked
                    .with_decision(BlockDecision::Audit)
                    .with_message(message),
            ))
        }
        _ => {
            let message = format!(
                "portcullis refused {method} {}: {found}; {fix}",
                info.target
            );
            Err(blocked
                .with_decision(BlockDecision::Deny)
                .with_message(message)
                .into())
        }
    }
}

/// The mark [`ScanSecrets`] puts on a request with a body it could not
/// see: the innermost service must read the body (at most
/// [`limit`](ScanBody::limit) bytes once its `Content-Encoding` is undone)
/// and [`decide`](ScanBody::decide) before anything is sent, or
/// [`unread`](ScanBody::unread) a body it could not read so; portcullis's
/// connector does.
#[derive(Debug, Clone)]
pub struct ScanBody {
    scan: crate::scan::ScanPolicy,
    placeholders: Arc<[String]>,
}

impl ScanBody {
    /// The most bytes to read, decoded.
    pub fn limit(&self) -> usize {
        self.scan.body_limit()
    }

    /// The request judged by its body (decoded): `Err` with the refusal,
    /// `Ok(Some(_))` with an audit record, `Ok(None)` to let it go on.
    pub fn decide<B>(
        &self,
        request: &Request<B>,
        body: &[u8],
    ) -> Result<Option<Blocked>, BoxError> {
        let info = RequestInfo::from_request(request)?;
        match self.scan.scanner.scan_body(body, &self.placeholders) {
            Some(finding) => verdict(
                self.scan.action_for(&info.target, &finding.detector),
                &info,
                Reason::SecretDetected,
                &finding.to_string(),
            ),
            None => Ok(None),
        }
    }

    /// A body that could not be read within the limit or decoded (`why`):
    /// refused (`not_inspected`) under `deny`, recorded under `audit`.
    pub fn unread<B>(&self, request: &Request<B>, why: &str) -> Result<Option<Blocked>, BoxError> {
        let info = RequestInfo::from_request(request)?;
        verdict(
            self.scan.host_action(&info.target),
            &info,
            Reason::NotInspected,
            why,
        )
    }
}

/// The mark [`ScanSecrets`] puts on the response to a WebSocket upgrade it
/// covers: after the `101`, the transport holds each message the client
/// sends (its fragments joined, within [`limit`](ScanFrames::limit);
/// permessage-deflate undone) until [`judge`](ScanFrames::judge) lets it
/// go, and closes the connection when it refuses. Each finding is
/// recorded (through [`ScanSecretsLayer::recording`]) as it is decided.
#[derive(Debug, Clone)]
pub struct ScanFrames {
    scan: crate::scan::ScanPolicy,
    placeholders: Arc<[String]>,
    info: RequestInfo,
    late: Option<RecordLater>,
}

impl ScanFrames {
    /// Judges the messages of `info`'s connection by `scan` (a transport
    /// of your own, or a test); [`ScanSecrets`] builds it for the stack.
    pub fn new(scan: crate::scan::ScanPolicy, info: RequestInfo) -> ScanFrames {
        ScanFrames {
            scan,
            placeholders: Arc::from(Vec::new()),
            info,
            late: None,
        }
    }

    /// Records its findings through `late`.
    pub fn recording(mut self, late: RecordLater) -> ScanFrames {
        self.late = Some(late);
        self
    }

    /// The most bytes of one message held and inspected.
    pub fn limit(&self) -> usize {
        self.scan.body_limit()
    }

    /// One message (or control frame's payload) the client sent, decoded:
    /// `Err` to close the connection (the refusal recorded), `Ok` to send
    /// it on (an audit finding recorded).
    pub fn judge(&self, message: &[u8]) -> Result<(), BoxError> {
        match self
            .scan
            .scanner
            .scan_content(message, Location::Message, &self.placeholders)
        {
            Some(finding) => self.decided(verdict(
                self.scan.action_for(&self.info.target, &finding.detector),
                &self.info,
                Reason::SecretDetected,
                &finding.to_string(),
            )),
            None => Ok(()),
        }
    }

    /// A message that could not be inspected (`why`: too large, an
    /// extension the proxy cannot undo): refused (`not_inspected`) under
    /// `deny`, recorded and let on under `audit`.
    pub fn unread(&self, why: &str) -> Result<(), BoxError> {
        let why = format!("a WebSocket message {why}");
        self.decided(verdict(
            self.scan.host_action(&self.info.target),
            &self.info,
            Reason::NotInspected,
            &why,
        ))
    }

    fn decided(&self, verdict: Result<Option<Blocked>, BoxError>) -> Result<(), BoxError> {
        let blocked = match &verdict {
            Ok(Some(audited)) => Some(audited),
            Err(refused) => crate::error::find_blocked(refused.as_ref()),
            Ok(None) => None,
        };
        if let Some(blocked) = blocked {
            match &self.late {
                Some(late) => late.record(self.info.client, blocked),
                None => tracing::warn!("{}", blocked.message),
            }
        }
        verdict.map(|_| ())
    }
}
