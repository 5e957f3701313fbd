//! Soak: bursts of concurrent CONNECT tunnels through the `portcullis`
//! binary, each held open and used, then closed. Ignored by default (it
//! takes a minute and thousands of file descriptors):
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture
//! SOAK_TUNNELS=10000 SOAK_BURSTS=5 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `SOAK_TUNNELS` (default 4,000) needs about twice as many open files in
//! this process and in the proxy: 10,000 needs a hard limit above 21,000,
//! which the test sets itself when run as root (else it holds as many
//! tunnels as the hard limit allows and says so). It checks that every
//! burst opens without an error, that descriptors return to the baseline,
//! and that resident memory after each burst is within 32 MiB of it.
//! Loopback only; every loop is bounded in count and time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::*;

/// Descriptors the proxy may keep after a burst: the splice(2) pipes it
/// pools (4 per runtime worker thread, one per core, two descriptors each:
/// a constant, not a per-tunnel cost) and two spare.
fn fds_slack() -> usize {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    2 + 4 * 2 * workers
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The proxy's resident memory (KiB) and open descriptors.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

async fn echo_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn open_tunnel(proxy: SocketAddr, origin: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let authority = origin.to_string();
    stream
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before the answer".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(String::from_utf8_lossy(&head).into_owned());
    }
    let payload = [7u8; 1024];
    stream
        .write_all(&payload)
        .await
        .map_err(|e| e.to_string())?;
    let mut back = [0u8; 1024];
    stream
        .read_exact(&mut back)
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with --ignored (see the module docs)"]
async fn bursts_of_held_tunnels_leave_no_descriptors_behind() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let wanted = env_number("SOAK_TUNNELS", 4000);
    // This process holds both ends' sockets (the clients and the echo
    // origin's): two descriptors a tunnel, as the proxy does. Root may
    // raise the hard limit; anyone may raise the soft one to it.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let needed = (wanted as u64) * 2 + 1000;
    if needed > hard && setrlimit(Resource::RLIMIT_NOFILE, needed, needed).is_ok() {
        println!("open-file limit raised to {needed}");
    } else {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let tunnels = wanted.min(usize::try_from(hard / 2).unwrap_or(usize::MAX) - 500);
    let bursts = env_number("SOAK_BURSTS", 3).min(20);

    let origin = echo_origin().await;
    let mut child = portcullis()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--no-socks",
            "--allow",
            "127.0.0.1",
        ])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let proxy = served_http_address(&mut child).await;
    let pid = child.id().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_start, fds_start) = usage(pid);
    println!("tunnels per burst: {tunnels}, bursts: {bursts}");
    println!("baseline: RSS {rss_start} KiB, {fds_start} fds");

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut afterwards = Vec::new();
    for burst in 1..=bursts {
        assert!(Instant::now() < deadline, "the soak is bounded in time");
        let started = Instant::now();
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let mut opening = Vec::with_capacity(tunnels);
        for _ in 0..tunnels {
            let permit = semaphore.clone().acquire_owned().await.unwrap();
            opening.push(tokio::spawn(async move {
                let tunnel = open_tunnel(proxy, origin).await;
                drop(permit);
                tunnel
            }));
        }
        let mut held = Vec::with_capacity(tunnels);
        let mut errors = Vec::new();
        for task in opening {
            match task.await.unwrap() {
                Ok(stream) => held.push(stream),
                Err(error) => errors.push(error),
            }
        }
        let (rss_peak, fds_peak) = usage(pid);
        assert!(
            errors.is_empty(),
            "burst {burst}: {} errors, first: {:?}",
            errors.len(),
            errors.first()
        );
        drop(held);
        // Descriptors return within seconds of the clients closing.
        let mut fds_after = usize::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            fds_after = usage(pid).1;
            if fds_after <= fds_start + fds_slack() {
                break;
            }
        }
        // Memory is handed back just after the burst ends (src/memory.rs).
        let mut rss_after = usage(pid).0;
        for _ in 0..30 {
            if rss_after <= rss_start + 16 * 1024 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            rss_after = usage(pid).0;
        }
        println!(
            "burst {burst}: {tunnels} tunnels in {:?}; peak RSS {rss_peak} KiB ({:.1} KiB/tunnel), {fds_peak} fds; after: RSS {rss_after} KiB, {fds_after} fds",
            started.elapsed(),
            (rss_peak.saturating_sub(rss_start)) as f64 / tunnels as f64,
        );
        assert!(
            fds_after <= fds_start + fds_slack(),
            "burst {burst}: {fds_after} fds left (baseline {fds_start})"
        );
        afterwards.push(rss_after);
    }
    if let Some(pause) = std::env::var("SOAK_PAUSE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        println!("pausing {pause} s: proxy pid {pid}");
        tokio::time::sleep(Duration::from_secs(pause)).await;
        println!("after the pause: RSS {} KiB", usage(pid).0);
    }
    let _ = child.kill().await;
    println!("RSS after each burst (KiB): {afterwards:?}");
    // Memory comes back: after each burst the proxy is within 32 MiB of its
    // baseline (the allocator keeps some), and bursts do not ratchet.
    for (burst, rss_after) in afterwards.iter().enumerate() {
        assert!(
            *rss_after <= rss_start + 32 * 1024,
            "burst {}: RSS {rss_after} KiB after, baseline {rss_start} KiB",
            burst + 1
        );
    }
}
