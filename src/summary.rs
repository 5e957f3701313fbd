//! What `run` tells the person about refusals: one line as each refused
//! destination is first refused, and on the way out each refused
//! destination once, with how many times, why, and the flag that would
//! allow it. Both come from the refusal's own message (already worded for
//! flags under `run`), so the two never disagree.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use portcullis_middleware::{Reason, Violation, ViolationSink};

/// Distinct destinations remembered; refusals past it are counted only.
const MAX_DESTINATIONS: usize = 1000;

/// Counts refusals per destination and reason, and says each new one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    inner: Arc<Mutex<TallyInner>>,
    /// Write a line to stderr when a destination is first refused.
    live: bool,
}

#[derive(Debug, Default)]
struct TallyInner {
    /// (destination, reason) → (count, order of first sight, why and fix).
    seen: HashMap<(String, Reason), (u64, usize, String)>,
    others: u64,
}

/// Control characters shown as escapes, nothing else touched: a line for
/// a person, with no quotes turned into `\"`.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let shown: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            shown
        })
        .collect()
}

/// The refusal's "why; fix", without the "portcullis refused TARGET: "
/// its standard messages start with.
fn why_and_fix(message: &str, destination: &str) -> String {
    let prefix_end = message
        .strip_prefix("portcullis refused ")
        .and_then(|rest| rest.find(&format!("{destination}: ")).map(|at| (rest, at)))
        .map(|(rest, at)| &rest[at + destination.len() + 2..]);
    printable(prefix_end.unwrap_or(message))
}

impl Tally {
    /// A tally that also says each newly refused destination on stderr.
    pub(crate) fn live() -> Tally {
        Tally {
            live: true,
            ..Tally::default()
        }
    }
}

impl ViolationSink for Tally {
    fn record(&self, violation: &Violation) {
        let blocked = &violation.blocked;
        // Audit mode refused nothing: not a refusal to report.
        if blocked.decision == portcullis_middleware::BlockDecision::Audit {
            return;
        }
        let lookup = blocked.protocol.is_lookup();
        let destination = printable(&match blocked.target.port() {
            _ if lookup => format!("{} (DNS)", blocked.target.host_string()),
            Some(port) => format!("{}:{port}", blocked.target.host_string()),
            None => blocked.target.host_string(),
        });
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let order = inner.seen.len();
        let key = (destination.clone(), blocked.reason);
        match inner.seen.get_mut(&key) {
            Some((count, _, _)) => *count += 1,
            None if order < MAX_DESTINATIONS => {
                if lookup {
                    let question = format!(
                        "a DNS question for {}",
                        printable(&blocked.target.host_string())
                    );
                    let said = why_and_fix(&violation.message, &question);
                    if self.live {
                        let _ =
                            writeln!(std::io::stderr(), "portcullis: refused {question} — {said}");
                    }
                    inner.seen.insert(key, (1, order, said));
                    return;
                }
                let said = why_and_fix(&violation.message, &destination);
                if self.live {
                    let _ = writeln!(
                        std::io::stderr(),
                        "portcullis: refused {} {destination} ({}) — {said}",
                        printable(&blocked.method),
                        blocked.protocol
                    );
                }
                inner.seen.insert(key, (1, order, said));
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
            .map(|((destination, _), (count, _, said))| {
                format!("portcullis: refused {destination} ×{count} — {said}")
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_standard_prefix_goes_and_nothing_is_quoted_twice() {
        assert_eq!(
            why_and_fix(
                "portcullis refused a.test:443: the host is not in the allowlist; add --allow a.test",
                "a.test:443"
            ),
            "the host is not in the allowlist; add --allow a.test"
        );
        assert_eq!(
            why_and_fix("portcullis refused [::1]:80: localhost \"x\"", "[::1]:80"),
            "localhost \"x\""
        );
        assert_eq!(why_and_fix("ask the team\n", "a.test:1"), "ask the team\\n");
    }
}
