//! What `run` says on the way out: each refused destination once, with how
//! many times, why, and the flag that would allow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use portcullis_middleware::{Reason, Violation, ViolationSink};

/// Distinct destinations remembered; refusals past it are counted only.
const MAX_DESTINATIONS: usize = 1000;

/// Counts refusals per destination and reason.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    inner: Arc<Mutex<TallyInner>>,
}

#[derive(Debug, Default)]
struct TallyInner {
    /// (destination, reason) → (count, order of first sight, the fix the
    /// first refusal's message named).
    seen: HashMap<(String, Reason), (u64, usize, Option<String>)>,
    others: u64,
}

impl ViolationSink for Tally {
    fn record(&self, violation: &Violation) {
        let destination = match violation.blocked.target.port() {
            Some(port) => format!("{}:{port}", violation.blocked.target.host_string()),
            None => violation.blocked.target.host_string(),
        };
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let order = inner.seen.len();
        let key = (
            destination.escape_debug().to_string(),
            violation.blocked.reason,
        );
        match inner.seen.get_mut(&key) {
            Some((count, _, _)) => *count += 1,
            None if order < MAX_DESTINATIONS => {
                // The message ends with its fix ("…; allow that address
                // with --allow 10.0.0.5:443, or …"): the exact address is
                // only there.
                let fix = violation
                    .blocked
                    .message
                    .split_once("; ")
                    .map(|(_, fix)| fix.escape_debug().to_string());
                inner.seen.insert(key, (1, order, fix));
            }
            None => inner.others += 1,
        }
    }
}

impl Tally {
    /// The summary lines, in the order destinations were first refused;
    /// empty when nothing was.
    pub(crate) fn lines(&self) -> Vec<String> {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut entries: Vec<_> = inner.seen.iter().collect();
        entries.sort_by_key(|(_, (_, order, _))| *order);
        let mut lines: Vec<String> = entries
            .into_iter()
            .map(|((destination, reason), (count, _, named))| {
                let host = destination
                    .rsplit_once(':')
                    .map_or(destination.as_str(), |(host, _)| host);
                let (why, mut fix) = advice(*reason, host);
                if let (Reason::NotAllowedLocal, Some(named)) = (reason, named) {
                    fix = named.clone();
                }
                format!("portcullis: refused {destination} ×{count} — {why}; {fix}")
            })
            .collect();
        if inner.others > 0 {
            lines.push(format!(
                "portcullis: and {} refusals of further destinations",
                inner.others
            ));
        }
        lines
    }
}

fn advice(reason: Reason, host: &str) -> (&'static str, String) {
    match reason {
        Reason::NotAllowed => ("not in the allowlist", format!("add --allow {host}")),
        Reason::NotAllowedLocal => (
            "a local or private address",
            "allow that exact address (--allow IP) or pass --allow-local-binding".to_owned(),
        ),
        Reason::Denied => ("in the denylist", "remove it from the denylist".to_owned()),
        Reason::MethodNotAllowed => (
            "a write in limited mode",
            "use --mode full to allow writes".to_owned(),
        ),
        Reason::MitmRequired => (
            "HTTPS in limited mode without interception",
            "pass --mitm, or --mode full".to_owned(),
        ),
        Reason::ApprovalDenied | Reason::ApprovalTimedOut | Reason::ApprovalFailed => (
            "not approved",
            format!("add --allow {host} to skip the question"),
        ),
        Reason::Loop => (
            "this proxy itself",
            "point the client at the destination".to_owned(),
        ),
        _ => ("refused", "see the log for why".to_owned()),
    }
}
