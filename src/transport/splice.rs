//! Copying bytes both ways between a client and its upstream, until both
//! sides are done or nothing has moved either way for the idle timeout.
//!
//! Two socket-to-socket tunnels (CONNECT and SOCKS5 `CONNECT`, the common
//! case) go through [`tcp`], which holds nothing while a tunnel is idle: a
//! direction takes a buffer from a small per-thread pool when its socket
//! is readable and gives it back once the bytes are written. Small reads
//! (a request, an answer) are copied: one read, one write. Bulk (a read
//! that fills the buffer) goes socket → pipe → socket with splice(2) on
//! Linux, the bytes never in user space, through a pooled pipe, until the
//! reads are small again. An idle tunnel
//! costs its task and its two sockets, not 2 × 64 KiB, so ten thousand
//! held tunnels do not pin hundreds of megabytes, and memory returns after
//! a burst. Other streams (upgrades, a client behind TLS) use
//! [`bidirectional`] with tokio's copy.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Buffer per direction: large enough that bulk transfers move in few
/// syscalls (tokio's default is 8 KiB).
const BUFFER: usize = 64 * 1024;

/// The buffer a [`tcp`] direction reads into while bytes are in flight.
const TCP_BUFFER: usize = 16 * 1024;
/// Buffers kept for reuse per thread; more are freed.
const POOLED: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this thread's pool, or a new one.
fn take_buffer() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; TCP_BUFFER].into_boxed_slice())
}

/// Gives a buffer back to this thread's pool (or frees it).
fn give_back(buffer: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED {
            pool.push(buffer);
        }
    });
}

/// Copies both ways between two sockets until both are done, an error ends
/// it (a peer closing is normal), or nothing moves for `idle`. A side that
/// ends its sending half has the other side's sending half shut down, as
/// `copy_bidirectional` does; no buffer is held while nothing moves.
pub(crate) async fn tcp(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
) -> Moved {
    let _open = metrics.tunnel();
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        tokio::try_join!(
            pump(client, upstream, start, &last, &up, SPLICES),
            pump(upstream, client, start, &last, &down, SPLICES)
        )
    };
    watch_idle(both, start, &last, idle).await;
    let moved = Moved {
        up: up.into_inner(),
        down: down.into_inner(),
        duration: start.elapsed(),
    };
    metrics.bytes(moved.up, moved.down);
    moved
}

/// What a tunnel carried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moved {
    /// Bytes from the client to the upstream.
    pub(crate) up: u64,
    /// Bytes from the upstream to the client.
    pub(crate) down: u64,
    /// How long the tunnel was open.
    pub(crate) duration: Duration,
}

impl Moved {
    /// The access log's line for a closed tunnel.
    pub(crate) fn log(&self, client: std::net::SocketAddr, target: &portcullis_middleware::Target) {
        tracing::event!(
            target: crate::access_log::ACCESS_TARGET,
            tracing::Level::INFO,
            client.addr = %client,
            dst = %target,
            bytes.up = self.up,
            bytes.down = self.down,
            duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            "tunnel closed"
        );
    }
}

/// One direction: `from` → `to`, until `from` ends (then `to`'s sending
/// half is shut down) or an error. Small reads are copied through a
/// pooled buffer: one read and one write, the fewest system calls for a
/// request or an answer of a few hundred bytes. A read that fills the
/// buffer means a bulk transfer: on Linux the direction then moves bytes
/// socket → pipe → socket with splice(2), never into user space, until a
/// splice comes back short of a buffer's worth (or the kernel refuses
/// splice on these sockets, and it copies from then on).
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    start: Instant,
    last: &AtomicU64,
    moved: &AtomicU64,
    mut splices: bool,
) -> io::Result<()> {
    let mut bulk = false;
    loop {
        from.readable().await?;
        #[cfg(target_os = "linux")]
        if bulk && splices {
            match step::<Pipe>(from, to, start, last, moved).await? {
                Step::Moved(read) => bulk = read >= TCP_BUFFER,
                Step::Ended => return Ok(()),
                Step::NotReady => {}
                Step::Unsupported => splices = false,
            }
            continue;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (&mut splices, bulk);
        match step::<Buffer>(from, to, start, last, moved).await? {
            Step::Moved(read) => bulk = read == TCP_BUFFER,
            Step::Ended => return Ok(()),
            Step::NotReady | Step::Unsupported => {}
        }
    }
}

/// Whether tunnels may splice(2) their bulk transfers: on Linux.
const SPLICES: bool = cfg!(target_os = "linux");

/// What one read and its writes did.
enum Step {
    /// This many bytes were read and written on.
    Moved(usize),
    /// `from` ended; `to`'s sending half is shut down.
    Ended,
    /// `from` was not readable after all.
    NotReady,
    /// The kernel refused splice(2) on these sockets; nothing was read.
    Unsupported,
}

/// Reads once from `from` through carrier `C` and writes all of it to
/// `to`. On an error the carrier (which may hold bytes) is dropped, never
/// pooled.
async fn step<C: Carrier>(
    from: &TcpStream,
    to: &TcpStream,
    start: Instant,
    last: &AtomicU64,
    moved: &AtomicU64,
) -> io::Result<Step> {
    let mut carrier = C::take()?;
    let read = match carrier.fill(from) {
        Ok(0) => {
            carrier.give_back();
            // Our half of `to` is done; the other direction goes on.
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(Step::Ended);
        }
        Ok(read) => read,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
            carrier.give_back();
            return Ok(Step::NotReady);
        }
        #[cfg(target_os = "linux")]
        Err(error) if C::SPLICES && error.raw_os_error() == Some(nix::libc::EINVAL) => {
            carrier.give_back();
            return Ok(Step::Unsupported);
        }
        Err(error) => return Err(error),
    };
    note_moved(start, last);
    let mut done = 0;
    while done < read {
        match carrier.drain(to, done, read) {
            Ok(n) => {
                done += n;
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(error) => return Err(error),
        }
    }
    carrier.give_back();
    Ok(Step::Moved(read))
}

/// A pipe for splice(2): bytes in flight between two sockets.
#[cfg(target_os = "linux")]
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

/// Pipes kept for reuse per thread (two descriptors each); more are closed.
#[cfg(target_os = "linux")]
const POOLED_PIPES: usize = 4;

/// Bytes moved per splice(2): the default pipe capacity. (A 512 KiB pipe,
/// F_SETPIPE_SZ, was measured no faster on loopback bulk and holds eight
/// times the kernel memory.)
#[cfg(target_os = "linux")]
const PIPE_CHUNK: usize = 64 * 1024;

#[cfg(target_os = "linux")]
thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe from this thread's pool, or a new one. Pipes are held only
/// while bytes are in flight, so idle tunnels cost no descriptors.
#[cfg(target_os = "linux")]
fn take_pipe() -> io::Result<Pipe> {
    if let Some(pipe) = PIPES.with(|pool| pool.borrow_mut().pop()) {
        return Ok(pipe);
    }
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC;
    let (read, write) = nix::unistd::pipe2(flags).map_err(io::Error::from)?;
    Ok(Pipe { read, write })
}

/// Gives an empty pipe back to this thread's pool (or closes it).
#[cfg(target_os = "linux")]
fn give_back_pipe(pipe: Pipe) {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED_PIPES {
            pool.push(pipe);
        }
    });
}

/// What holds a direction's bytes between reading and writing: a pooled
/// pipe (splice(2)) or a pooled buffer. Taken when the source is readable,
/// given back once everything read is written.
trait Carrier: Sized {
    /// Whether this carrier splices (and may find splice(2) refused).
    const SPLICES: bool;
    fn take() -> io::Result<Self>;
    fn give_back(self);
    /// Reads what `from` has (0 at its end); `WouldBlock` clears readiness.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize>;
    /// Writes bytes `done..read` of what was filled into `to`.
    fn drain(&mut self, to: &TcpStream, done: usize, read: usize) -> io::Result<usize>;
}

/// A buffer from this thread's pool.
struct Buffer(Box<[u8]>);

impl Carrier for Buffer {
    const SPLICES: bool = false;

    fn take() -> io::Result<Buffer> {
        Ok(Buffer(take_buffer()))
    }

    fn give_back(self) {
        give_back(self.0);
    }

    /// A short read drained the socket: its readiness is cleared then, as
    /// tokio's own `poll_read` does, so the next round waits for the next
    /// bytes instead of asking the kernel once more only to hear
    /// `EWOULDBLOCK` (a system call per message saved). Bytes that arrive
    /// meanwhile raise a new readiness event, which the clearing keeps.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        let mut short = 0;
        let buffer = &mut self.0;
        let read = from.try_io(tokio::io::Interest::READABLE, || {
            let read = nix::unistd::read(from, buffer).map_err(io::Error::from)?;
            if 0 < read && read < buffer.len() {
                short = read;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(read)
        });
        match read {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
            read => read,
        }
    }

    fn drain(&mut self, to: &TcpStream, done: usize, read: usize) -> io::Result<usize> {
        to.try_write(&self.0[done..read])
    }
}

#[cfg(target_os = "linux")]
const SPLICE_FLAGS: nix::fcntl::SpliceFFlags =
    nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK.union(nix::fcntl::SpliceFFlags::SPLICE_F_MOVE);

#[cfg(target_os = "linux")]
impl Carrier for Pipe {
    const SPLICES: bool = true;

    fn take() -> io::Result<Pipe> {
        take_pipe()
    }

    fn give_back(self) {
        give_back_pipe(self);
    }

    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        from.try_io(tokio::io::Interest::READABLE, || {
            nix::fcntl::splice(from, None, &self.write, None, PIPE_CHUNK, SPLICE_FLAGS)
                .map_err(io::Error::from)
        })
    }

    fn drain(&mut self, to: &TcpStream, done: usize, read: usize) -> io::Result<usize> {
        to.try_io(tokio::io::Interest::WRITABLE, || {
            nix::fcntl::splice(&self.read, None, to, None, read - done, SPLICE_FLAGS)
                .map_err(io::Error::from)
        })
    }
}

fn note_moved(start: Instant, last: &AtomicU64) {
    let millis = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last.store(millis, Ordering::Relaxed);
}

/// Drives `copy` until it ends or nothing has moved for `idle` (by `last`,
/// milliseconds after `start`).
async fn watch_idle<F, T>(copy: F, start: Instant, last: &AtomicU64, idle: Duration)
where
    F: std::future::Future<Output = io::Result<T>>,
{
    tokio::pin!(copy);
    loop {
        let moved_at = start + Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            result = &mut copy => {
                if let Err(error) = result {
                    tracing::debug!(%error, "tunnel closed with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(moved_at + idle) => {
                let quiet = Instant::now() - (start + Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    tracing::debug!(idle = ?idle, "tunnel closed: nothing moved for the idle timeout");
                    return;
                }
            }
        }
    }
}

/// Relays an upgraded connection (a `101`, a WebSocket) once both sides
/// have switched: the client's and the upstream's upgrades, spliced with
/// the tunnel idle timeout and counted. `None` when either upgrade failed.
pub(crate) async fn upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    relay: crate::transport::websocket::Relay,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
) -> Option<Moved> {
    use crate::transport::websocket::{FramesOnly, Relay, Sender};
    use crate::transport::websocket_scan::ScannedFrames;
    use hyper_util::rt::TokioIo;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return None;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    Some(match relay {
        Relay::Scanned(judge, deflate) => {
            bidirectional(
                &mut ScannedFrames::new(client, *judge, deflate),
                &mut FramesOnly::new(upstream, Sender::Origin),
                idle,
                metrics,
            )
            .await
        }
        Relay::FramesOnly => {
            bidirectional(
                &mut FramesOnly::new(client, Sender::Client),
                &mut FramesOnly::new(upstream, Sender::Origin),
                idle,
                metrics,
            )
            .await
        }
        Relay::Anything => bidirectional(&mut client, &mut upstream, idle, metrics).await,
    })
}

/// Copies both ways until both sides are done, an error ends it (a peer
/// closing is normal), or nothing moves for `idle`.
pub(crate) async fn bidirectional<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
) -> Moved
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let _open = metrics.tunnel();
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut client = Watched {
        inner: client,
        start,
        last: &last,
        read: &up,
    };
    let mut upstream = Watched {
        inner: upstream,
        start,
        last: &last,
        read: &down,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER);
    watch_idle(copy, start, &last, idle).await;
    let moved = Moved {
        up: up.into_inner(),
        down: down.into_inner(),
        duration: start.elapsed(),
    };
    metrics.bytes(moved.up, moved.down);
    moved
}

/// A stream that notes when bytes last moved through it.
struct Watched<'a, S: ?Sized> {
    inner: &'a mut S,
    start: Instant,
    last: &'a AtomicU64,
    /// Bytes read from this side.
    read: &'a AtomicU64,
}

impl<S: ?Sized> Watched<'_, S> {
    fn moved(&self) {
        note_moved(self.start, self.last);
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.moved();
            self.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A tunnel between a client and an origin socket, relayed by [`tcp`]
    /// with `idle`: the client's end, the origin's end, and the relay.
    async fn tunnel(idle: Duration) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Moved>) {
        let (client, client_side) = pair().await;
        let (upstream_side, origin) = pair().await;
        let relay = tokio::spawn(async move {
            tcp(&client_side, &upstream_side, idle, &Metrics::default()).await
        });
        (client, origin, relay)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn both_ways_in_bulk_then_half_closes_carry_every_byte() {
        let (mut client, mut origin, tunnel) = tunnel(Duration::from_secs(30)).await;
        let up = pattern(4 << 20, 1);
        let down = pattern(1 << 20, 7);
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let (mut client_read, mut client_write) = client.split();
        let (mut origin_read, mut origin_write) = origin.split();
        let (received_up, received_down, (), ()) = tokio::join!(
            async {
                let mut all = Vec::new();
                origin_read.read_to_end(&mut all).await.unwrap();
                all
            },
            async {
                let mut all = Vec::new();
                client_read.read_to_end(&mut all).await.unwrap();
                all
            },
            async {
                client_write.write_all(&up_sent).await.unwrap();
                client_write.shutdown().await.unwrap();
            },
            async {
                origin_write.write_all(&down_sent).await.unwrap();
                origin_write.shutdown().await.unwrap();
            },
        );
        assert!(received_up == up, "every byte up, in order");
        assert!(received_down == down, "every byte down, in order");
        // On Linux the bytes went through splice(2): its pipes are pooled on
        // this (the test's only) thread.
        #[cfg(target_os = "linux")]
        assert!(
            PIPES.with(|pool| !pool.borrow().is_empty()),
            "splice(2) was used"
        );
        tokio::time::timeout(Duration::from_secs(10), tunnel)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn small_messages_are_copied_not_spliced() {
        let (mut client, mut origin, tunnel) = tunnel(Duration::from_secs(30)).await;
        for round in 0..100u8 {
            let question = [round; 200];
            client.write_all(&question).await.unwrap();
            let mut asked = [0u8; 200];
            origin.read_exact(&mut asked).await.unwrap();
            assert_eq!(asked, question);
            let answer = [round ^ 0xff; 300];
            origin.write_all(&answer).await.unwrap();
            let mut answered = [0u8; 300];
            client.read_exact(&mut answered).await.unwrap();
            assert_eq!(answered, answer);
        }
        // Every message fitted a buffer: no pipe was ever taken (pipes are
        // pooled on this, the test's only, thread).
        #[cfg(target_os = "linux")]
        assert!(PIPES.with(|pool| pool.borrow().is_empty()), "no splice(2)");
        assert!(POOL.with(|pool| !pool.borrow().is_empty()), "buffers used");
        drop((client, origin));
        let moved = tokio::time::timeout(Duration::from_secs(10), tunnel)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((moved.up, moved.down), (20_000, 30_000));
    }

    #[tokio::test]
    async fn the_buffer_carrier_moves_every_byte_too() {
        // The fallback where splice(2) is refused (and on other systems).
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut origin) = pair().await;
        let copy = tokio::spawn(async move {
            let (last, moved) = (AtomicU64::new(0), AtomicU64::new(0));
            let now = Instant::now();
            pump(&client_side, &upstream_side, now, &last, &moved, false)
                .await
                .unwrap();
            moved.into_inner()
        });
        let sent = pattern(1 << 20, 3);
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        origin.read_to_end(&mut received).await.unwrap();
        assert!(received == sent);
        assert_eq!(copy.await.unwrap(), 1 << 20);
    }

    #[tokio::test]
    async fn a_half_closed_tunnel_still_answers() {
        let (mut client, mut origin, _tunnel) = tunnel(Duration::from_secs(30)).await;
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut asked = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), origin.read_to_end(&mut asked))
            .await
            .expect("the client's end of sending reaches the origin")
            .unwrap();
        assert_eq!(asked, b"question");
        origin.write_all(b"answer").await.unwrap();
        drop(origin);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_closes_at_its_idle_timeout() {
        let (mut client, _origin, tunnel) = tunnel(Duration::from_secs(5)).await;
        client.write_all(b"x").await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), tunnel)
            .await
            .unwrap()
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0, "closed");
    }
}
