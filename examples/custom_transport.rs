//! A way into portcullis written outside the crate, with the public
//! transport kit (`portcullis::kit`): a tiny line protocol. The client
//! sends `host:port` and a newline; the transport answers `OK` and relays
//! bytes both ways, or `ERR <reason>: <message>` and closes. It gets the
//! running proxy's own decisions — policy, loop guard, violation log — and
//! joins its graceful shutdown.
//!
//! Run: `cargo run --example custom_transport` (loopback only).

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::net::SocketAddr;

use portcullis::kit::{self, Ingress, Tunnel};
use portcullis::middleware::{find_blocked, BoxError, Protocol, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// This way in, by name: a byte stream whose methods the stack cannot see.
pub const LINE: Protocol = Protocol::Custom("line");

/// The longest first line read: a host name and a port.
const MAX_LINE: usize = 300;

/// Serves the line protocol on `listener` until the proxy shuts down.
pub async fn serve(listener: TcpListener, ingress: Ingress) {
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            () = ingress.stopping() => break,
        };
        let ingress = ingress.clone();
        tokio::spawn(async move {
            // Shutdown waits for this connection, and names it if cut.
            let _open = ingress.open(format!("line client {client}"));
            if let Err(error) = handle(stream, client, &ingress).await {
                eprintln!("line client {client}: {error}");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    client: SocketAddr,
    ingress: &Ingress,
) -> Result<(), BoxError> {
    let line = read_line(&mut stream).await?;
    // Parsed once, strictly, into the request model; layers read that.
    let target = match Target::parse_authority(line.trim(), None) {
        Ok(target) => target,
        Err(error) => {
            stream
                .write_all(format!("ERR bad_request: {error}\n").as_bytes())
                .await?;
            return Ok(());
        }
    };
    let request = kit::RequestModel::new(target.clone(), LINE, client).connect()?;
    match ingress.call(request).await {
        Ok(response) => {
            // The connector dialled the vetted address once; take it.
            let Some(upstream) = response.extensions().get::<Tunnel>().and_then(Tunnel::take)
            else {
                stream.write_all(b"ERR error: no connection\n").await?;
                return Ok(());
            };
            stream.write_all(b"OK\n").await?;
            ingress.relay(&stream, &upstream).await;
        }
        Err(error) => {
            let answer = match find_blocked(error.as_ref()) {
                Some(blocked) => format!(
                    "ERR {}: {}\n",
                    blocked.reason,
                    ingress.refusal_message(blocked)
                ),
                None => format!("ERR error: {error}\n"),
            };
            stream.write_all(answer.as_bytes()).await?;
        }
    }
    Ok(())
}

/// Reads up to the first newline, byte by byte, so nothing after it is
/// consumed before the relay starts.
async fn read_line(stream: &mut TcpStream) -> Result<String, BoxError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_LINE {
        if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err("the first line is too long".into())
}

/// Sends `host:port`, then `payload`; what came back.
pub async fn ask(line_addr: SocketAddr, target: &str, payload: &[u8]) -> Result<String, BoxError> {
    let mut stream = TcpStream::connect(line_addr).await?;
    stream.write_all(format!("{target}\n").as_bytes()).await?;
    stream.write_all(payload).await?;
    stream.shutdown().await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    use portcullis::middleware::{NetworkPolicy, PolicyHandle};
    // An echo server on loopback stands in for a destination.
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    // Loopback is allowed by its exact address: the echo server, and the
    // proxy's own listener, which the loop guard still refuses.
    let policy = NetworkPolicy::builder().allow("127.0.0.1")?.build();
    let proxy = portcullis::Proxy::builder()
        .policy(PolicyHandle::new(policy))
        .start()
        .await?;
    let line = TcpListener::bind("127.0.0.1:0").await?;
    let line_addr = line.local_addr()?;
    tokio::spawn(serve(line, proxy.ingress()));

    println!(
        "{}",
        ask(line_addr, &echo_addr.to_string(), b"hello\n")
            .await?
            .trim_end()
    );
    println!(
        "{}",
        ask(line_addr, "example.org:443", b"").await?.trim_end()
    );
    println!(
        "{}",
        ask(line_addr, &proxy.http_addr().to_string(), b"")
            .await?
            .trim_end()
    );
    println!("{} refusals recorded", proxy.violations().total());
    proxy.shutdown(std::time::Duration::from_secs(1)).await;
    Ok(())
}
