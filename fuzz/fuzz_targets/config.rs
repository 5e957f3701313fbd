//! The config loader: any TOML either loads into a policy and listeners or
//! is an error naming a key; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        let origin = "fuzz.toml";
        let _ = config.policy(origin);
        let _ = config.http_addr(origin);
        let _ = config.socks_addr(origin);
        let _ = config.dns_hosts(origin);
        let _ = config.dns_timeout(origin);
        let _ = config.limits(origin);
        let _ = config.approval_timeout(origin);
        let _ = config.shutdown_deadline(origin);
    }
});
