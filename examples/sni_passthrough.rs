//! An SNI passthrough written outside the crate with the transport kit: a
//! TLS listener of your own that never terminates TLS. It peeks at the
//! client's ClientHello (`kit::peek_at_least`, nothing consumed), reads
//! the server name from it (rustls's `Acceptor`), asks the running proxy's
//! own stack about `NAME:PORT` (policy, approvals, loop guard, violation
//! log), and relays the untouched stream to the dialled origin
//! (`Ingress::relay_stream`). It registers its listener with the loop
//! guard (`Ingress::listening_on`), so a name that leads back to it is
//! refused as a loop; a refused client gets a TLS `access_denied` alert.
//!
//! Run: `cargo run --example sni_passthrough` (loopback only).

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::kit::{self, Ingress, Tunnel};
use portcullis::middleware::{find_blocked, BoxError, Protocol, Target};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// This way in, by name.
pub const SNI: Protocol = Protocol::Custom("sni");

/// How long a client may take to send its ClientHello.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);

/// A fatal TLS `access_denied` alert (TLS 1.2 record framing, which TLS
/// 1.3 clients read before any key is agreed).
const ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

/// Serves on `listener` until the proxy shuts down, sending each client
/// to the port `upstream_port` of the name it asked for.
pub async fn serve(listener: TcpListener, ingress: Ingress, upstream_port: u16) {
    // The loop guard knows this listener while it serves.
    let _listening = match listener.local_addr() {
        Ok(address) => Some(ingress.listening_on(address)),
        Err(_) => None,
    };
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
            let _open = ingress.open(format!("sni client {client}"));
            if let Err(error) = handle(stream, client, &ingress, upstream_port).await {
                eprintln!("sni client {client}: {error}");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    client: SocketAddr,
    ingress: &Ingress,
    upstream_port: u16,
) -> Result<(), BoxError> {
    let name = server_name(&stream).await?;
    let target = Target::parse_authority(&format!("{name}:{upstream_port}"), None)?;
    let request = kit::RequestModel::new(target, SNI, client).connect()?;
    match ingress.call(request).await {
        Ok(response) => {
            let Some(mut upstream) = response.extensions().get::<Tunnel>().and_then(Tunnel::take)
            else {
                stream.write_all(&ACCESS_DENIED).await?;
                return Ok(());
            };
            // Nothing was consumed: the ClientHello goes on as sent.
            ingress.relay_stream(&mut stream, &[], &mut upstream).await;
        }
        Err(error) => {
            let why = find_blocked(error.as_ref()).map_or_else(
                || error.to_string(),
                |blocked| ingress.refusal_message(blocked),
            );
            eprintln!("refused {name}: {why}");
            stream.write_all(&ACCESS_DENIED).await?;
        }
    }
    Ok(())
}

/// The server name of the ClientHello waiting on `stream`, peeked.
pub async fn server_name(stream: &TcpStream) -> Result<String, BoxError> {
    let header = kit::peek_at_least(stream, 5, HELLO_DEADLINE).await?;
    if header.first() != Some(&0x16) {
        return Err("the client did not start TLS".into());
    }
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let record = kit::peek_at_least(stream, 5 + length, HELLO_DEADLINE).await?;
    let mut acceptor = rustls::server::Acceptor::default();
    acceptor.read_tls(&mut record.as_slice())?;
    let accepted = acceptor
        .accept()
        .map_err(|(error, _)| error)?
        .ok_or("the ClientHello spans more than one record")?;
    accepted
        .client_hello()
        .server_name()
        .map(str::to_owned)
        .ok_or_else(|| "the ClientHello names no server".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    use portcullis::middleware::{NetworkPolicy, PolicyHandle};
    // Only the proxy's policy matters here: a client asking for a name
    // that is not allowed is refused before anything is dialled.
    let policy = NetworkPolicy::builder().allow("allowed.test")?.build();
    let proxy = portcullis::Proxy::builder()
        .policy(PolicyHandle::new(policy))
        .start()
        .await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(serve(listener, proxy.ingress(), 443));
    // A ClientHello for a name the policy does not allow.
    let mut client = TcpStream::connect(address).await?;
    client.write_all(&client_hello("not-allowed.test")?).await?;
    let mut answer = [0u8; 7];
    tokio::io::AsyncReadExt::read_exact(&mut client, &mut answer).await?;
    println!(
        "not-allowed.test: {}",
        if answer == ACCESS_DENIED {
            "access_denied"
        } else {
            "answered"
        }
    );
    println!("{} refusal(s) recorded", proxy.violations().total());
    proxy.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// The first flight of a rustls client for `name`: a ClientHello.
pub fn client_hello(name: &str) -> Result<Vec<u8>, BoxError> {
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut connection = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::try_from(name.to_owned())?,
    )?;
    let mut hello = Vec::new();
    connection.write_tls(&mut hello)?;
    Ok(hello)
}
