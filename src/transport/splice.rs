//! Copying bytes both ways between a client and its upstream.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction: large enough that bulk transfers move in few
/// syscalls (tokio's default is 8 KiB).
const BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides are done; errors end the splice
/// quietly (a peer closing is normal).
pub(crate) async fn bidirectional<A, B>(client: &mut A, upstream: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if let Err(error) =
        tokio::io::copy_bidirectional_with_sizes(client, upstream, BUFFER, BUFFER).await
    {
        tracing::debug!(%error, "tunnel closed with an error");
    }
}
