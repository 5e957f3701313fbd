//! The SOCKS5 request reader (ours, run before fast-socks5's): any input
//! gets a request, a refusal or an I/O error, never a panic, and every
//! request it accepts is read whole, to the byte, by fast-socks5 too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    if let Err(disagreement) = runtime.block_on(portcullis::fuzzing::socks5_request(data)) {
        panic!("{disagreement}");
    }
});
