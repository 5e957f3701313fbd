//! The SOCKS5 UDP header parser (fast-socks5's) followed by ours: the
//! destination it yields becomes a canonical target or a clean error, never
//! a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_middleware::Target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        if let Ok((_fragment, address, _payload)) = fast_socks5::parse_udp_request(data).await {
            match address {
                fast_socks5::util::target_addr::TargetAddr::Ip(socket) => {
                    let _ = Target::from_ip(socket.ip(), socket.port());
                }
                fast_socks5::util::target_addr::TargetAddr::Domain(domain, port) => {
                    let _ = Target::from_socks_domain(&domain, port);
                }
            }
        }
    });
});
