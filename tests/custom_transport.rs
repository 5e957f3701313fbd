//! A way in written outside the crate (`examples/custom_transport.rs`, a
//! line protocol) through a running proxy's own stack: it is allowed,
//! refused, stopped by the loop guard and recorded like every other way
//! in, and it joins graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

#[path = "../examples/custom_transport.rs"]
#[allow(dead_code, unreachable_pub)]
mod custom_transport;

use std::time::Duration;

use common::*;
use portcullis::middleware::{NetworkPolicy, Protocol, Reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_transport_from_outside_gets_every_decision_and_joins_shutdown() {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let proxy = proxy_with(
        NetworkPolicy::builder().allow("127.0.0.1").unwrap().build(),
        &[],
        |b| b,
    )
    .await;
    let line = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let line_addr = line.local_addr().unwrap();
    let serving = tokio::spawn(custom_transport::serve(line, proxy.handle.ingress()));

    // Allowed: relayed both ways.
    let answer = custom_transport::ask(line_addr, &echo_addr.to_string(), b"ping\n")
        .await
        .unwrap();
    assert_eq!(answer, "OK\nping\n");
    // Refused by the policy, recorded with this way in's own protocol.
    let answer = custom_transport::ask(line_addr, "elsewhere.test:443", b"")
        .await
        .unwrap();
    assert!(answer.starts_with("ERR not_allowed: "), "{answer}");
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::NotAllowed);
    assert_eq!(last.blocked.protocol, Protocol::Custom("line"));
    // The loop guard knows the proxy's listeners.
    let own = proxy.handle.http_addr().to_string();
    let answer = custom_transport::ask(line_addr, &own, b"").await.unwrap();
    assert!(answer.starts_with("ERR loop: "), "{answer}");
    assert_eq!(
        proxy.ring.snapshot().pop().unwrap().blocked.reason,
        Reason::Loop
    );
    assert_eq!(proxy.ring.total(), 2);

    // A tunnel still open at shutdown holds it until the deadline, which
    // names and cuts it.
    let mut open = tokio::net::TcpStream::connect(line_addr).await.unwrap();
    open.write_all(format!("{echo_addr}\n").as_bytes())
        .await
        .unwrap();
    let mut ok = [0u8; 3];
    open.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"OK\n");
    let cut = tokio::time::timeout(
        Duration::from_secs(10),
        proxy.handle.shutdown(Duration::from_millis(300)),
    )
    .await
    .expect("shutdown ends at its deadline");
    assert_eq!(cut, 1, "the open line tunnel was waited for, then cut");
    // The transport's accept loop stopped with the proxy.
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("the accept loop stops at shutdown")
        .unwrap();
}
