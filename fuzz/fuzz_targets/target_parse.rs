//! The one strict parser: authorities, URIs and SOCKS5 domains. Never
//! panics; whatever it accepts prints back to something it parses to the
//! same target (the host we check is the host we dial).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_middleware::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for parsed in [
        Target::parse_authority(text, None),
        Target::parse_authority(text, Some(443)),
        Target::from_socks_domain(text, 80),
    ] {
        if let Ok(target) = parsed {
            let again = Target::parse_authority(&target.to_string(), None)
                .expect("a parsed target prints as a valid authority");
            assert_eq!(again, target, "round trip of {text:?}");
        }
    }
    if let Ok(uri) = text.parse::<http::Uri>() {
        let _ = Target::from_uri(&uri);
    }
});
