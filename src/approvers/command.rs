//! A reviewer program answers each question (`[approval] mode = "command"`).
//!
//! For every question the program is started afresh, with a clean
//! environment (only the variables `[approval] pass_env` names), and given
//! one JSON object on stdin:
//!
//! ```json
//! {"target": {"host": "api.example.com", "port": 443, "protocol": "https_connect"},
//!  "method": "CONNECT", "client": "127.0.0.1:50312",
//!  "recent": [{"kind": "refusal", "host": "…", "port": 80, "protocol": "http", "reason": "denied", "method": "GET"},
//!             {"kind": "answer", "host": "…", "port": 443, "protocol": "https_connect", "decision": "allow", "scope": "session", "by": "…"}]}
//! ```
//!
//! `recent` holds the last `[approval] context_entries` refusals and answers.
//! Any string longer than `[approval] max_field_bytes` is cut and marked
//! `<truncated omitted_bytes=N/>`. The program answers with one JSON object
//! on stdout:
//!
//! ```json
//! {"decision": "allow", "scope": "session", "risk_score": 12, "rationale": "the project's documentation"}
//! ```
//!
//! `decision` is `allow` or `deny`; `scope` is `once`, `session` or
//! `always`; `risk_score` is 0–100. An *allow* counts only when its risk
//! score is below `[approval] risk_threshold` (80 by default); otherwise it
//! is a deny that says why. A program that cannot be started, exits
//! non-zero, writes more than `[approval] max_output_bytes`, writes
//! something that is not that object, or does not finish within the
//! approval timeout fails closed: the request is refused
//! (`approval_failed` or `approval_timed_out`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Service;

use portcullis_middleware::{
    ApprovalAnswer, ApprovalOutcome, ApprovalRequest, BoxError, ViolationRing,
};

/// What a reviewer is started with and held to.
#[derive(Debug, Clone)]
pub struct ReviewerSettings {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// An allow counts only below this risk score.
    pub risk_threshold: u8,
    /// Longest string handed over.
    pub max_field_bytes: usize,
    /// Largest answer read.
    pub max_output_bytes: usize,
    /// Recent entries shown.
    pub context_entries: usize,
    /// Environment variables passed through.
    pub pass_env: Vec<String>,
}

/// The reviewer-program approver; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct CommandApprover {
    settings: Arc<ReviewerSettings>,
    refusals: ViolationRing,
    answers: Arc<Mutex<VecDeque<Value>>>,
}

impl CommandApprover {
    /// Asks `settings.command`, showing it recent refusals from `refusals`.
    pub fn new(settings: ReviewerSettings, refusals: ViolationRing) -> CommandApprover {
        CommandApprover {
            settings: Arc::new(settings),
            refusals,
            answers: Arc::default(),
        }
    }

    fn name(&self) -> String {
        format!(
            "reviewer {}",
            self.settings.command.first().map_or("", String::as_str)
        )
    }
}

/// Cuts `text` to `max` bytes (on a character boundary) and marks the cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}<truncated omitted_bytes={}/>",
        &text[..end],
        text.len() - end
    )
}

/// Applies [`bounded`] to every string in `value`.
fn bound_strings(value: &mut Value, max: usize) {
    match value {
        Value::String(text) => *text = bounded(text, max),
        Value::Array(items) => items.iter_mut().for_each(|v| bound_strings(v, max)),
        Value::Object(map) => map.values_mut().for_each(|v| bound_strings(v, max)),
        _ => {}
    }
}

/// The reviewer's answer: exactly these four fields, every one required.
/// Anything else (an extra field such as `"override": true`, a missing
/// `rationale`, a second object) is not the documented answer and denies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verdict {
    decision: String,
    scope: String,
    risk_score: u8,
    rationale: String,
}

/// Whether `program` can be run: a path (with a `/`) that is an executable
/// file, or a name found as one on `PATH`. Checked at start, so a typo
/// fails there and not at the first question.
pub(crate) fn runnable(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = std::path::Path::new(program);
        return match std::fs::metadata(path) {
            Err(error) => Err(format!("the reviewer {program:?} cannot be run: {error}")),
            Ok(_) if executable(path) => Ok(()),
            Ok(_) => Err(format!(
                "the reviewer {program:?} is not an executable file (chmod +x it?)"
            )),
        };
    }
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|directory| executable(&directory.join(program)))
    });
    if found {
        Ok(())
    } else {
        Err(format!(
            "the reviewer {program:?} is not an executable on PATH; give its path (./{program})"
        ))
    }
}

/// Reads the reviewer's stdout as the one documented object.
fn parse_verdict(output: &[u8], by: &str) -> Result<Verdict, BoxError> {
    serde_json::from_slice(output).map_err(|e| {
        format!(
            "{by} did not answer with exactly {{\"decision\", \"scope\", \"risk_score\", \"rationale\"}}: {e}"
        )
        .into()
    })
}

impl CommandApprover {
    fn input(&self, request: &ApprovalRequest) -> Value {
        let keep = self.settings.context_entries;
        let mut recent: Vec<Value> = self
            .refusals
            .snapshot()
            .into_iter()
            .rev()
            .take(keep)
            .map(|v| {
                json!({
                    "kind": "refusal",
                    "host": v.blocked.target.host_string(),
                    "port": v.blocked.target.port(),
                    "protocol": v.blocked.protocol.as_str(),
                    "method": v.blocked.method,
                    "reason": v.blocked.reason.as_str(),
                })
            })
            .collect();
        let answers = self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.extend(answers.iter().rev().take(keep).cloned());
        recent.truncate(keep);
        let mut input = json!({
            "target": {
                "host": request.key.host.to_string(),
                "port": request.key.port,
                "protocol": request.key.protocol.as_str(),
            },
            "method": request.method,
            "client": request.client.map(|c| c.to_string()),
            "profile": request.profile.as_deref(),
            "recent": recent,
        });
        bound_strings(&mut input, self.settings.max_field_bytes);
        input
    }

    fn remember(&self, request: &ApprovalRequest, verdict: &Verdict, by: &str) {
        let mut answers = self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        answers.push_back(json!({
            "kind": "answer",
            "host": request.key.host.to_string(),
            "port": request.key.port,
            "protocol": request.key.protocol.as_str(),
            "decision": verdict.decision,
            "scope": verdict.scope,
            "by": by,
        }));
        while answers.len() > self.settings.context_entries.max(1) {
            answers.pop_front();
        }
    }

    async fn review(self, request: ApprovalRequest) -> Result<ApprovalAnswer, BoxError> {
        let by = self.name();
        let Some((program, arguments)) = self.settings.command.split_first() else {
            return Err("[approval] command is empty; name the reviewer program".into());
        };
        let mut child = tokio::process::Command::new(program);
        child
            .args(arguments)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // The approval layer's timeout drops this future: the reviewer goes with it.
            .kill_on_drop(true);
        for name in &self.settings.pass_env {
            if let Some(value) = std::env::var_os(name) {
                child.env(name, value);
            }
        }
        let mut child = child
            .spawn()
            .map_err(|e| format!("{by} could not be started: {e}"))?;
        let mut input = self.input(&request).to_string();
        input.push('\n');
        if let Some(mut stdin) = child.stdin.take() {
            // A reviewer that does not read its input still gets to answer.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        let mut output = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let limit = self.settings.max_output_bytes as u64;
            stdout
                .take(limit + 1)
                .read_to_end(&mut output)
                .await
                .map_err(|e| format!("{by}: reading its answer failed: {e}"))?;
            if output.len() as u64 > limit {
                return Err(format!("{by} wrote more than {limit} bytes").into());
            }
        }
        let status = child.wait().await?;
        if !status.success() {
            return Err(format!("{by} exited with {status}").into());
        }
        let verdict = parse_verdict(&output, &by)?;
        if verdict.risk_score > 100 {
            return Err(format!(
                "{by} gave a risk score of {}, above 100",
                verdict.risk_score
            )
            .into());
        }
        let rationale = bounded(
            &verdict.rationale.replace(|c: char| c.is_control(), " "),
            self.settings.max_field_bytes,
        );
        let threshold = self.settings.risk_threshold;
        let outcome = match (verdict.decision.as_str(), verdict.scope.as_str()) {
            ("allow", _) if verdict.risk_score >= threshold => ApprovalOutcome::Deny,
            ("allow", "once") => ApprovalOutcome::AllowOnce,
            ("allow", "session") => ApprovalOutcome::AllowForSession,
            ("allow", "always") => ApprovalOutcome::AllowAlways,
            ("deny", "always") => ApprovalOutcome::DenyAlways,
            ("deny", "once" | "session") => ApprovalOutcome::Deny,
            (decision, scope) => {
                return Err(format!(
                    "{by} answered decision {decision:?} with scope {scope:?}; expected allow/deny and once/session/always"
                )
                .into())
            }
        };
        let rationale = if verdict.decision == "allow" && !outcome.allows() {
            format!(
                "risk score {} is not below the threshold {threshold}: {rationale}",
                verdict.risk_score
            )
        } else {
            format!("risk score {}: {rationale}", verdict.risk_score)
        };
        self.remember(&request, &verdict, &by);
        Ok(ApprovalAnswer {
            outcome,
            by,
            rationale: Some(rationale),
        })
    }
}

impl Service<ApprovalRequest> for CommandApprover {
    type Response = ApprovalAnswer;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ApprovalAnswer, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ApprovalRequest) -> Self::Future {
        Box::pin(self.clone().review(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_answer_is_read() {
        let good =
            br#"{"decision": "allow", "scope": "once", "risk_score": 5, "rationale": "docs"}"#;
        assert!(parse_verdict(good, "r").is_ok());
        for bad in [
            // An extra field, even a harmless-looking one.
            r#"{"decision": "allow", "scope": "once", "risk_score": 5, "rationale": "x", "override": true}"#,
            // No rationale.
            r#"{"decision": "allow", "scope": "once", "risk_score": 5}"#,
            // No risk score.
            r#"{"decision": "allow", "scope": "once", "rationale": "x"}"#,
            // A field twice.
            r#"{"decision": "deny", "decision": "allow", "scope": "once", "risk_score": 5, "rationale": "x"}"#,
            // Two objects.
            r#"{"decision": "allow", "scope": "once", "risk_score": 5, "rationale": "x"} {}"#,
            // A wrong type.
            r#"{"decision": "allow", "scope": "once", "risk_score": "5", "rationale": "x"}"#,
        ] {
            let error = parse_verdict(bad.as_bytes(), "./review.sh").unwrap_err();
            assert!(
                error.to_string().contains("./review.sh did not answer"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn long_strings_are_cut_and_marked() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("abcdefghij", 4), "abcd<truncated omitted_bytes=6/>");
        // Never inside a character.
        assert_eq!(bounded("ééé", 3), "é<truncated omitted_bytes=4/>");
        let mut value = json!({"a": ["xxxxxxxx", {"b": "yy"}], "n": 5});
        bound_strings(&mut value, 3);
        assert_eq!(
            value,
            json!({"a": ["xxx<truncated omitted_bytes=5/>", {"b": "yy"}], "n": 5})
        );
    }
}
