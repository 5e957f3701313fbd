//! The person at the controlling terminal answers (`[approval] mode =
//! "prompt"`).
//!
//! Questions are asked on `/dev/tty`, one at a time, on lines of their own
//! (so they stay readable when a child under `run` writes to the same
//! terminal), showing the method, host, port, protocol and client:
//!
//! ```text
//! portcullis: GET api.example.com:443 over https_connect (client 127.0.0.1:50312) is not in the allowlist.
//!   allow [o]nce, for this [s]ession, [a]lways / [d]eny, deny a[l]ways? (a letter, then Enter; deny if no answer within 60s)
//! ```
//!
//! Every string is escaped before it is printed (no terminal escape from the
//! network reaches the terminal). Anything but `o`, `s`, `a`, `l` denies; no
//! answer within the approval timeout denies. Without a terminal every
//! question is denied, and that is said once at start. Under `run`, a child
//! that reads the same terminal may take the answer first: give such
//! commands a reviewer (`mode = "command"`) instead.

use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tower::Service;

use portcullis_middleware::{ApprovalAnswer, ApprovalOutcome, ApprovalRequest, BoxError};

const TERMINAL: &str = "/dev/tty";

/// The terminal approver; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct PromptApprover {
    /// One question at a time.
    turn: Arc<tokio::sync::Mutex<()>>,
    timeout: Duration,
}

impl PromptApprover {
    /// Asks on the controlling terminal. Without one every question is
    /// denied, and this says so now, once. `timeout` is only shown.
    pub fn new(timeout: Duration) -> PromptApprover {
        if let Err(error) = open_terminal() {
            tracing::warn!(%error, "approval mode is prompt, but there is no terminal ({TERMINAL}): every question will be denied; use mode = \"command\" for unattended runs");
        }
        PromptApprover {
            turn: Arc::default(),
            timeout,
        }
    }
}

/// The terminal, opened afresh and non-blocking: reads are cancellable, so
/// nothing is left reading (and taking a child's input) once a question is
/// answered or has timed out. The flag is on this open file only, not on the
/// terminal a child reads.
fn open_terminal() -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(TERMINAL)
}

/// The question as printed: every string escaped.
pub(crate) fn question(request: &ApprovalRequest, timeout: Duration) -> String {
    let escape = |text: &str| text.escape_debug().to_string();
    let client = request
        .client
        .map_or_else(|| "unknown".to_owned(), |c| c.to_string());
    let client = match &request.profile {
        Some(profile) => format!("{client}, profile {}", escape(profile)),
        None => client,
    };
    format!(
        "\r\nportcullis: {} {}:{} over {} (client {}) is not in the allowlist.\r\n  allow [o]nce, for this [s]ession, [a]lways / [d]eny, deny a[l]ways? (a letter, then Enter; deny if no answer within {}s) ",
        escape(&request.method),
        escape(&request.key.host.to_string()),
        request.key.port,
        request.key.protocol,
        escape(&client),
        timeout.as_secs(),
    )
}

fn outcome(line: &str) -> ApprovalOutcome {
    match line.trim().chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('o' | 'y') => ApprovalOutcome::AllowOnce,
        Some('s') => ApprovalOutcome::AllowForSession,
        Some('a') => ApprovalOutcome::AllowAlways,
        Some('l') => ApprovalOutcome::DenyAlways,
        _ => ApprovalOutcome::Deny,
    }
}

async fn ask(request: ApprovalRequest, timeout: Duration) -> Result<ApprovalAnswer, BoxError> {
    let (mut input, mut output) =
        match open_terminal().and_then(|file| Ok((file.try_clone()?, file))) {
            Ok((input, output)) => (
                pipe::Receiver::from_file_unchecked(input)?,
                pipe::Sender::from_file_unchecked(output)?,
            ),
            Err(_) => {
                return Ok(ApprovalAnswer {
                    outcome: ApprovalOutcome::Deny,
                    by: "the prompt (no terminal)".to_owned(),
                    rationale: None,
                })
            }
        };
    let mut buffer = [0u8; 512];
    // Typed before the question: not an answer.
    while let Ok(n) = input.try_read(&mut buffer) {
        if n == 0 {
            break;
        }
    }
    output
        .write_all(question(&request, timeout).as_bytes())
        .await?;
    let mut line = Vec::new();
    while !line.contains(&b'\n') && line.len() < 4096 {
        let n = input.read(&mut buffer).await?;
        if n == 0 {
            return Err("the terminal closed".into());
        }
        line.extend_from_slice(&buffer[..n]);
    }
    let outcome = outcome(&String::from_utf8_lossy(&line));
    let said = match outcome {
        ApprovalOutcome::AllowOnce => "allowed once",
        ApprovalOutcome::AllowForSession => "allowed for this session",
        ApprovalOutcome::AllowAlways => "allowed always",
        ApprovalOutcome::DenyAlways => "denied always",
        _ => "denied",
    };
    output
        .write_all(format!("portcullis: {said}\r\n").as_bytes())
        .await?;
    Ok(ApprovalAnswer {
        outcome,
        by: "the prompt".to_owned(),
        rationale: None,
    })
}

impl Service<ApprovalRequest> for PromptApprover {
    type Response = ApprovalAnswer;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ApprovalAnswer, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ApprovalRequest) -> Self::Future {
        let timeout = self.timeout;
        let turn = self.turn.clone();
        Box::pin(async move {
            let _turn = turn.lock().await;
            ask(request, timeout).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_middleware::{ApprovalKey, Host, Protocol};

    #[test]
    fn network_strings_are_escaped_and_answers_read() {
        let request = ApprovalRequest {
            key: ApprovalKey {
                // The parser never lets this through; the prompt must not
                // trust that.
                host: Host::Name("evil\u{1b}[2J\u{7}.test".into()),
                protocol: Protocol::HttpsConnect,
                port: 443,
            },
            method: "GET\u{1b}]0;title\u{7}".into(),
            client: None,
            profile: None,
        };
        let text = question(&request, Duration::from_secs(60));
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(text.contains("evil\\u{1b}[2J\\u{7}.test"), "{text}");
        assert_eq!(outcome("s\n"), ApprovalOutcome::AllowForSession);
        assert_eq!(outcome(" Always"), ApprovalOutcome::AllowAlways);
        assert_eq!(outcome("l"), ApprovalOutcome::DenyAlways);
        assert_eq!(outcome(""), ApprovalOutcome::Deny);
        assert_eq!(outcome("maybe"), ApprovalOutcome::Deny);
    }
}
