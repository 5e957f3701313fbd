//! `examples/sni_passthrough.rs` — a way in written outside the crate with
//! the registered listener, the any-stream relay and the peek helper —
//! driven by a real TLS client (tokio-rustls): allowed by SNI (the origin's
//! own certificate reaches the client), refused by SNI (a TLS
//! `access_denied` alert, recorded with the way in's protocol), a name that
//! leads back to the passthrough refused as a loop, and shutdown joining
//! it. Then the same listener unit-tested against a `tower_test` mock
//! stack through `Ingress::standalone`, with no proxy at all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

#[path = "../examples/sni_passthrough.rs"]
#[allow(dead_code, unreachable_pub)]
mod sni_passthrough;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis::middleware::{NetworkPolicy, Protocol, Reason, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A TLS client trusting `pem`, asking for `name` at `address`: `GET /`'s
/// answer, or the handshake's error.
async fn fetch(address: SocketAddr, name: &str, pem: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(pem) {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(server, stream))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|error| error.to_string())?;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|error| error.to_string())?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn the_passthrough_allows_refuses_and_loops_by_sni_and_joins_shutdown() {
    let (origin, pem) = https_origin().await;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let proxy = proxy_with(
        NetworkPolicy::builder()
            .allow("secure.test")
            .unwrap()
            .allow_local_binding(true)
            .build(),
        &[("secure.test", loopback)],
        |b| b,
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = tokio::spawn(sni_passthrough::serve(
        listener,
        proxy.handle.ingress(),
        origin.port(),
    ));

    // Allowed by SNI: the origin's own certificate, untouched.
    let answer = fetch(address, "secure.test", &pem).await.unwrap();
    assert!(answer.ends_with("secure hello"), "{answer}");
    // Refused by SNI: an alert the client names, recorded as this way in.
    let error = fetch(address, "other.test", &pem).await.unwrap_err();
    assert!(error.contains("AccessDenied"), "{error}");
    let last = proxy.ring.snapshot().pop().unwrap();
    assert_eq!(last.blocked.reason, Reason::NotAllowed);
    assert_eq!(last.blocked.protocol, Protocol::Custom("sni"));

    // A passthrough whose upstream port is its own: the name leads back to
    // it, and the loop guard knows it because it registered.
    let looping = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let looping_address = looping.local_addr().unwrap();
    let loop_serving = tokio::spawn(sni_passthrough::serve(
        looping,
        proxy.handle.ingress(),
        looping_address.port(),
    ));
    let before = proxy.ring.total();
    let error = fetch(looping_address, "secure.test", &pem)
        .await
        .unwrap_err();
    assert!(error.contains("AccessDenied"), "{error}");
    let refusals = proxy.ring.snapshot();
    assert_eq!(
        proxy.ring.total() - before,
        1,
        "refused once, not relayed round: {refusals:?}"
    );
    assert_eq!(refusals.last().unwrap().blocked.reason, Reason::Loop);

    // Shutdown stops both accept loops and waits for them.
    let cut = proxy.handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(cut, 0);
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("the passthrough stopped with the proxy")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), loop_serving)
        .await
        .expect("the passthrough stopped with the proxy")
        .unwrap();
}

#[tokio::test]
async fn the_passthrough_is_unit_tested_against_a_mock_stack() {
    use portcullis::body::Body;
    use portcullis::kit::{Ingress, Tunnel};
    // An echo server stands in for the origin the stack would dial.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_address = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let (service, mut stack) =
        tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let (ingress, shutdown) = Ingress::standalone(service);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = tokio::spawn(sni_passthrough::serve(listener, ingress, 443));

    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    let hello = sni_passthrough::client_hello("mock.test").unwrap();
    client.write_all(&hello).await.unwrap();
    // The stack is asked exactly what the listener read from the hello.
    let (request, respond) = tokio::time::timeout(Duration::from_secs(10), stack.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        request.extensions().get::<Target>(),
        Some(&Target::parse_authority("mock.test:443", None).unwrap())
    );
    assert_eq!(
        request.extensions().get::<Protocol>(),
        Some(&Protocol::Custom("sni"))
    );
    // Answered as the connector answers: 200 with the dialled stream.
    let upstream = tokio::net::TcpStream::connect(echo_address).await.unwrap();
    let mut response = http::Response::new(Body::default());
    response.extensions_mut().insert(Tunnel::new(upstream));
    respond.send_response(response);
    // The peeked hello went on untouched, and what follows too.
    let mut echoed = vec![0u8; hello.len()];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello);
    client.write_all(b"more").await.unwrap();
    let mut more = [0u8; 4];
    client.read_exact(&mut more).await.unwrap();
    assert_eq!(&more, b"more");
    drop(client);

    assert_eq!(shutdown.shutdown(Duration::from_secs(5)).await, 0);
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("stopped")
        .unwrap();
}

#[tokio::test]
async fn peek_at_least_waits_for_the_bytes_and_consumes_none() {
    use portcullis::kit::peek_at_least;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    // Sent in two parts: the first peek sees too few and must wait.
    client.write_all(b"he").await.unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"llo world").await.unwrap();
        client
    });
    let peeked = peek_at_least(&server, 5, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(peeked, b"hello");
    // Nothing was consumed.
    let mut read = [0u8; 5];
    let mut server = server;
    server.read_exact(&mut read).await.unwrap();
    assert_eq!(&read, b"hello");
    // Too few before the peer closes: UnexpectedEof; before the deadline:
    // TimedOut.
    let mut client = writer.await.unwrap();
    let error = peek_at_least(&server, 100, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    client.shutdown().await.unwrap();
    let error = peek_at_least(&server, 100, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
}

#[tokio::test]
async fn relay_stream_sends_what_was_already_read_first_over_any_stream() {
    use portcullis::body::Body;
    use portcullis::kit::Ingress;
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_address = echo.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((mut stream, _)) = echo.accept().await {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    });
    let (service, _stack) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let (ingress, _shutdown) = Ingress::standalone(service);
    // The client side is not a TCP socket: an in-memory pipe.
    let (mut client, mut inside) = tokio::io::duplex(1024);
    let mut upstream = tokio::net::TcpStream::connect(echo_address).await.unwrap();
    let relaying = tokio::spawn(async move {
        ingress
            .relay_stream(&mut inside, b"first ", &mut upstream)
            .await
    });
    client.write_all(b"second").await.unwrap();
    let mut echoed = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut echoed))
        .await
        .expect("what was already read, then the rest, came back")
        .unwrap();
    assert_eq!(&echoed, b"first second");
    drop(client);
    let (up, down) = tokio::time::timeout(Duration::from_secs(5), relaying)
        .await
        .expect("the relay ended with the client")
        .unwrap();
    assert_eq!((up, down), (12, 12));
}
