//! Pattern compilation and matching: lines before the last are patterns
//! (allow, or deny when prefixed with `!`), the last is the target. Never
//! panics, and deny wins: a target matching an accepted deny pattern is
//! never allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_middleware::policy::Decision;
use portcullis_middleware::{NetworkPolicy, Pattern, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.lines().collect();
    let Some(last) = lines.pop() else { return };
    let Ok(target) = Target::parse_authority(last, Some(443)) else {
        return;
    };
    let mut builder = NetworkPolicy::builder().allow_local_binding(lines.len() % 2 == 0);
    let mut denied_exactly = false;
    for line in &lines {
        builder = match line.strip_prefix('!') {
            Some(pattern) => match builder.clone().deny(pattern) {
                Ok(next) => {
                    if let (Ok(parsed), Some(host)) = (Pattern::parse(pattern), target.host_ref()) {
                        denied_exactly |= parsed.text.eq_ignore_ascii_case(&host.to_string())
                            && parsed.port.is_none();
                    }
                    next
                }
                Err(_) => builder,
            },
            None => builder.clone().allow(line).unwrap_or(builder),
        };
    }
    let policy = builder.build();
    let decision = policy.decide(&target);
    if denied_exactly {
        assert!(
            !matches!(decision, Decision::Allow { .. }),
            "deny wins for {target}"
        );
    }
    if let Some(host) = target.host_ref() {
        if let Some(ip) = host.ip() {
            let _ = policy.check_resolved(host, ip, target.port().unwrap_or(443));
        }
    }
});
