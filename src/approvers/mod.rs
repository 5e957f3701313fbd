//! The approvers the binary offers (`[approval] mode`), and the persisted
//! rules they write.
//!
//! | mode | who answers an allowlist miss |
//! | --- | --- |
//! | `deny` (default) | nobody: the miss is refused (`not_allowed`) |
//! | `prompt` | the person at the terminal ([`prompt`]) |
//! | `command` | a reviewer program ([`command`]) |
//!
//! *Always* answers go to the [`rules`] file, which answers before anyone
//! is asked next time. Only allowlist misses are ever asked about: a
//! denylisted host or a local address never reaches an approver. An
//! integrator passes any `tower::Service<ApprovalRequest>` instead, with
//! `Proxy::builder().approver(..)`.

pub mod command;
pub mod prompt;
pub mod rules;

use portcullis_middleware::ViolationRing;

use crate::config::{ApprovalMode, Config, ConfigError};
use crate::runner::BoxApprover;

/// The approver `config` asks for, and how to name it to a user; `None` for
/// `mode = "deny"`.
pub fn from_config(
    config: &Config,
    origin: &str,
    refusals: &ViolationRing,
) -> Result<Option<(BoxApprover, String)>, ConfigError> {
    let approval = &config.approval;
    Ok(match approval.mode {
        ApprovalMode::Deny => None,
        ApprovalMode::Prompt => Some((
            BoxApprover::new(prompt::PromptApprover::new(config.approval.timeout)),
            "the prompt on this terminal".to_owned(),
        )),
        ApprovalMode::Command => {
            if approval.command.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "approval.command".into(),
                    origin: origin.to_owned(),
                    message: "mode = \"command\" needs the reviewer program, e.g. command = [\"./review.sh\"]".into(),
                });
            }
            if let Err(message) = command::runnable(&approval.command[0]) {
                return Err(ConfigError::Invalid {
                    key: "approval.command".into(),
                    origin: origin.to_owned(),
                    message,
                });
            }
            let settings = command::ReviewerSettings {
                command: approval.command.clone(),
                risk_threshold: approval.risk_threshold,
                max_field_bytes: approval.max_field_bytes,
                max_output_bytes: approval.max_output_bytes,
                context_entries: approval.context_entries,
                pass_env: approval.pass_env.clone(),
            };
            let name = format!("the reviewer {}", approval.command.join(" "));
            Some((
                BoxApprover::new(command::CommandApprover::new(settings, refusals.clone())),
                name,
            ))
        }
    })
}
