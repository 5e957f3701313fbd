//! A whole proxy from the library, with a layer of our own in the default
//! stack: real HTTP and SOCKS5 listeners on loopback, one allowed and one
//! refused request, then a graceful shutdown. Loopback only; nothing leaves the machine.
//!
//! Run: `cargo run --example custom_proxy`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use portcullis::body::Body;
use portcullis::middleware::{BoxError, NetworkPolicy, PolicyHandle, Target};
use portcullis::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::util::MapRequestLayer;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // An origin on loopback to talk to.
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = origin.accept().await {
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                .await;
        }
    });

    // Our own layer: counts every request that the policy let through, by destination.
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    // Any tower layer generic over the inner service fits; this one only looks.
    let counting = MapRequestLayer::new(move |request: Request<Body>| {
        let target = request
            .extensions()
            .get::<Target>()
            .map(|t| t.to_string())
            .unwrap_or_default();
        counter.fetch_add(1, Ordering::SeqCst);
        eprintln!("custom layer: {} {target}", request.method());
        request
    });

    let policy = PolicyHandle::new(NetworkPolicy::builder().allow("127.0.0.1")?.build());
    let proxy = Proxy::builder()
        .policy(policy)
        .socks_addr(Some("127.0.0.1:0".parse()?))
        .inner_layer(counting)
        .start()
        .await?;
    println!(
        "HTTP proxy on {}, SOCKS5 on {:?}",
        proxy.http_addr(),
        proxy.socks_addr()
    );

    // Through the HTTP listener, absolute form.
    let mut stream = tokio::net::TcpStream::connect(proxy.http_addr()).await?;
    let request = format!(
        "GET http://{origin_addr}/ HTTP/1.1\r\nHost: {origin_addr}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    println!(
        "HTTP answer: {}",
        response.lines().next().unwrap_or_default()
    );

    // A refused one: not on the allowlist.
    let mut stream = tokio::net::TcpStream::connect(proxy.http_addr()).await?;
    stream
        .write_all(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    println!(
        "refused answer: {}",
        response.lines().next().unwrap_or_default()
    );

    println!(
        "requests the custom layer saw: {}",
        seen.load(Ordering::SeqCst)
    );
    println!("violations recorded: {}", proxy.violations().total());
    proxy.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
