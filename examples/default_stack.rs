//! The default stack around a stand-in for the network: no sockets at all.
//!
//! Run: `cargo run --example default_stack`

#![allow(clippy::print_stdout, clippy::print_stderr)]

use http::{Method, Request, Response};
use portcullis_middleware::{
    find_blocked, BoxError, DefaultStack, NetworkPolicy, PolicyHandle, Protocol, Target,
};
use tower::{service_fn, Layer, ServiceExt};

fn request(method: Method, authority: &str, protocol: Protocol) -> Result<Request<()>, BoxError> {
    let uri = if method == Method::CONNECT {
        authority.to_owned()
    } else {
        format!("http://{authority}/")
    };
    let mut request = Request::builder().method(method).uri(uri).body(())?;
    request
        .extensions_mut()
        .insert(Target::parse_authority(authority, None)?);
    request.extensions_mut().insert(protocol);
    Ok(request)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let policy = PolicyHandle::new(
        NetworkPolicy::builder()
            .allow("**.example.com")?
            .allow("crates.io:443")?
            .deny("ads.example.com")?
            .build(),
    );
    // The stand-in for the connector: answers 200 to whatever reaches it.
    let network = service_fn(|request: Request<()>| async move {
        println!("  network saw {} {}", request.method(), request.uri());
        Ok::<_, BoxError>(Response::new(()))
    });
    let stack = DefaultStack::new(policy.clone()).layer(network);

    let cases = [
        (Method::GET, "www.example.com:80", Protocol::Http),
        (Method::CONNECT, "crates.io:443", Protocol::HttpsConnect),
        (Method::CONNECT, "crates.io:22", Protocol::Socks5Tcp),
        (Method::GET, "ads.example.com:80", Protocol::Http),
        (Method::GET, "169.254.169.254:80", Protocol::Http),
        (Method::GET, "0x7f.1:8080", Protocol::Http),
    ];
    for (method, authority, protocol) in cases {
        println!("{method} {authority} ({protocol})");
        match stack
            .clone()
            .oneshot(request(method, authority, protocol)?)
            .await
        {
            Ok(response) => println!("  allowed: {}", response.status()),
            Err(error) => match find_blocked(error.as_ref()) {
                Some(blocked) => println!("  refused: {} — {}", blocked.reason, blocked.message),
                None => println!("  failed: {error}"),
            },
        }
    }
    Ok(())
}
