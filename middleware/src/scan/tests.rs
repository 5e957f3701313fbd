//! The scanner's unit tests.
use super::*;
use base64::Engine;

fn scan(uri: &str, headers: &[(&str, &str)], scanner: &Scanner) -> Option<Finding> {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    scanner.scan_request(&request.body(()).unwrap_or_else(|e| panic!("{e}")))
}

const GITHUB: &str = "ghp_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234";

#[test]
fn token_formats_are_found_in_path_query_and_headers_and_named() {
    let scanner = Scanner::builtin();
    let found = scan(&format!("http://x.test/?t={GITHUB}"), &[], &scanner);
    assert_eq!(
        found.map(|f| (f.detector, f.location)),
        Some(("github_token".into(), Location::Query))
    );
    let found = scan(&format!("http://x.test/a/{GITHUB}/b"), &[], &scanner);
    assert_eq!(found.map(|f| f.location), Some(Location::Path));
    let found = scan(
        "http://x.test/",
        &[("x-key", "AKIAZ7QWERTY2345ABCD")],
        &scanner,
    );
    assert_eq!(
        found.map(|f| (f.detector, f.location)),
        Some(("aws_access_key_id".into(), Location::Header("x-key".into())))
    );
    // Inside Basic credentials: base64 decoded and searched.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("me:{GITHUB}"));
    let found = scan(
        "http://x.test/",
        &[("authorization", &format!("Basic {basic}"))],
        &scanner,
    );
    assert_eq!(found.map(|f| f.encoding), Some(Some("base64")));
    // Split by zero-width characters.
    let split = "ghp_R2d2C3po%E2%80%8BR2d2C3poR2d2C3poR2d2C3po1234";
    assert!(scan(&format!("http://x.test/?t={split}"), &[], &scanner).is_some());
    // Look-alikes: fullwidth, mathematical bold and Cyrillic letters.
    for disguised in [
        "\u{ff47}\u{ff48}\u{ff50}_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234",
        "\u{1d420}\u{1d421}\u{1d429}_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234",
        "ghp_R2d2C3\u{440}oR2d2C3poR2d2C3poR2d2C3po1234",
    ] {
        let field = format!("token {disguised}");
        let found = scanner.scan_field(field.as_bytes(), Location::Body);
        assert_eq!(
            found.map(|f| f.encoding),
            Some(Some("with zero-width or look-alike characters")),
            "{disguised}"
        );
    }
    // Text in other scripts is left alone (and finds nothing).
    assert!(scanner
        .scan_field("привет, κόσμε, 世界".as_bytes(), Location::Body)
        .is_none());
}

#[test]
fn documentation_examples_and_ordinary_text_pass() {
    let scanner = Scanner::builtin();
    for uri in [
        "http://x.test/?key=AKIAIOSFODNN7EXAMPLE",
        "http://x.test/items/8c6f1f0e-6a0f-4b8e-9a39-3b0f3c1d2e4f",
        "http://x.test/?token=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "http://x.test/search?q=AWS_SECRET_ACCESS_KEY+and+GITHUB_TOKEN",
        "http://x.test/img?data=iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg",
    ] {
        assert_eq!(scan(uri, &[("user-agent", "curl/8.5.0")], &scanner), None, "{uri}");
    }
}

#[test]
fn a_known_value_is_found_raw_and_in_every_encoding() {
    let mut scanner = Scanner::none();
    let secret = "s3cr3t-Value/with+chars=";
    assert!(scanner.known_value("API_SECRET", secret));
    assert!(!scanner.known_value("SHORT", "abc"));
    let named = |found: Option<Finding>| found.map(|f| f.detector);
    assert_eq!(
        named(scan(&format!("http://x.test/?v={secret}"), &[], &scanner)),
        Some("known:API_SECRET".into())
    );
    let percent: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
    assert!(scan(&format!("http://x.test/?v={percent}"), &[], &scanner).is_some());
    for prefix in ["", "a", "ab", "abc"] {
        let text = format!("{prefix}{secret}");
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            let encoded = engine.encode(text.as_bytes());
            let found = scan("http://x.test/", &[("x-data", &encoded)], &scanner);
            assert!(found.is_some(), "{prefix:?} {encoded}");
        }
    }
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        scan(&format!("http://x.test/{hex}"), &[], &scanner).map(|f| f.encoding),
        Some(Some("hex"))
    );
    assert_eq!(scan("http://x.test/?v=s3cr3t", &[], &scanner), None);
    // Disguised for the eye: split by zero-width characters, letters
    // swapped for Cyrillic or fullwidth look-alikes, JSON `\u` escapes —
    // each folded back before the value is looked for.
    for disguised in [
        "s3cr3t-\u{200b}Value/with\u{2060}+chars=",
        "s3\u{441}r3t-V\u{430}lue/with+\u{441}h\u{430}rs=",
        "\u{ff53}3cr3t-Value/with+chars\u{ff1d}",
    ] {
        let found = scanner.scan_field(format!("v: {disguised}").as_bytes(), Location::Body);
        assert_eq!(
            found.map(|f| (f.detector, f.encoding)),
            Some((
                "known:API_SECRET".to_owned(),
                Some("with zero-width or look-alike characters")
            )),
            "{disguised}"
        );
    }
    let escaped: String = secret
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let found = scanner.scan_body(format!("{{\"v\":\"{escaped}\"}}").as_bytes(), &[]);
    assert_eq!(found.map(|f| f.encoding), Some(Some("JSON-escaped")));
}

#[test]
fn payment_cards_and_ibans_are_found_only_when_their_checksums_hold() {
    let scanner = Scanner::builtin();
    let found = |text: &str| {
        scanner
            .scan_field(text.as_bytes(), Location::Body)
            .map(|f| f.detector)
    };
    for card in [
        "4539148803436467",
        "4539 1488 0343 6467",
        "4539-1488-0343-6467",
        "3782 822463 10120",
    ] {
        assert_eq!(
            found(&format!("card: {card}")).as_deref(),
            Some("payment_card"),
            "{card}"
        );
    }
    for iban in ["NL91ABNA0417164300", "NL91 ABNA 0417 1643 00"] {
        assert_eq!(
            found(&format!("pay to {iban}")).as_deref(),
            Some("iban"),
            "{iban}"
        );
    }
    // Checksums that fail, published test numbers, and ordinary numbers.
    for benign in [
        "4539148803436468",
        "NL92ABNA0417164300",
        "4111 1111 1111 1111",
        "4242424242424242",
        "3714 496353 98431",
        "DE89 3704 0044 0532 0130 00",
        "order 1796644711774 at 2026-12-07",
        "build 453914880343646 of 12",
        "UUID 6f1c2a9e-3b7d-4c51-9a0e-1d2b3c4d5e6f",
    ] {
        assert_eq!(found(benign), None, "{benign}");
    }
}

#[test]
fn the_card_and_iban_gates_let_every_candidate_through() {
    use formats::gate;
    let card = gate("payment_card").unwrap_or_else(|| panic!("a gate"));
    let iban = gate("iban").unwrap_or_else(|| panic!("a gate"));
    let at = |g: formats::Gate, text: &str| g(text.as_bytes());
    // Runs across the 8-byte pieces, and in the tail.
    for text in [
        "x 4539148803436467 y",
        "4539 1488 0343 6467",
        "3782-822463-10120",
        "abcdefgh12345678 9012345",
        "abcdefg 1234 5678 9012 3",
    ] {
        assert!(at(card, text), "{text}");
    }
    for text in [
        "123456789012",
        "4539  1488 0343 6467",
        "45391488-",
        "no digits",
    ] {
        assert!(!at(card, text), "{text}");
    }
    for text in [
        "NL91ABNA0417164300",
        "pay AB1XY12",
        "xNL91",
        "abcdefNL91",
        "abcdefgNL91xxxxx",
    ] {
        assert!(at(iban, text), "{text}");
    }
    for text in ["N191", "nl91abna", "AB1C2", "A12", "abcdefgNL9 1"] {
        assert!(!at(iban, text), "{text}");
    }
}

#[test]
fn the_gates_never_hide_what_the_patterns_find() {
    // A bounded, seeded walk over texts of digits, separators and letters:
    // wherever a gated pattern matches, its gate must let it be searched.
    let alphabet = b"0123456789012345 -ABNLGBxy";
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let patterns: Vec<(formats::Gate, regex::bytes::Regex)> = ["payment_card", "iban"]
        .iter()
        .map(|name| {
            let format = formats::FORMATS
                .iter()
                .find(|f| f.name == *name)
                .unwrap_or_else(|| panic!("{name}"));
            (
                formats::gate(name).unwrap_or_else(|| panic!("{name}")),
                regex::bytes::Regex::new(format.pattern).unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect();
    let mut matched = 0;
    for _ in 0..20_000 {
        let length = 8 + (next() % 40) as usize;
        let text: Vec<u8> = (0..length)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        for (gate, regex) in &patterns {
            if regex.is_match(&text) {
                matched += 1;
                assert!(gate(&text), "{}", String::from_utf8_lossy(&text));
            }
        }
    }
    assert!(matched > 100, "the walk must reach matches: {matched}");
}
