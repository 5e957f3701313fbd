//! Handing memory back to the system after a burst of connections.
//!
//! glibc's allocator keeps what a burst of ten thousand tunnels freed: the
//! soak test measured 52 MiB resident after the burst against 8 MiB before,
//! and `malloc_trim(0)` brought it back to 10 MiB (mimalloc kept the same
//! 52 MiB and started higher). So when the number of open client
//! connections and tunnels (as shutdown counts them) falls to a quarter of
//! its peak, with at least [`TRIM_AFTER`] closed since the last time, the
//! freed memory is handed back on a blocking thread as soon as the proxy
//! has been quiet for [`QUIET`] (at most [`QUIET_OPENS`] new connections).
//! A proxy under steady or bursty load never trims; one whose burst ended
//! does, once. Other allocators (and other C libraries) are left alone.
//!
//! The quiet period matters: a trim takes the allocator's locks and walks
//! the heap, so every thread that allocates meanwhile waits. Trimming
//! between batches of short connections (the load bench's handshake run,
//! after a long run of GETs had grown the heap) doubled the p99 there.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Connections that must close between two trims.
const TRIM_AFTER: usize = 1024;
/// How long the proxy must stay quiet before a trim.
const QUIET: Duration = Duration::from_millis(250);
/// New connections during [`QUIET`] that still count as quiet.
const QUIET_OPENS: usize = 16;

/// The process's counts: client connections and tunnels, as shutdown
/// counts them.
static TRIMMER: Trimmer = Trimmer::new();

/// Something (a client connection, a tunnel) was opened.
pub(crate) fn opened() {
    TRIMMER.opened();
}

/// Something opened was closed; after a burst, memory is handed back.
pub(crate) fn closed() {
    if TRIMMER.closed() {
        schedule(&TRIMMER, trim);
    }
}

/// Open, peak and closed counts, and whether a trim is waiting.
#[derive(Debug)]
struct Trimmer {
    open: AtomicUsize,
    peak: AtomicUsize,
    closed: AtomicUsize,
    /// Every connection ever opened: how busy the quiet period was.
    opened: AtomicUsize,
    pending: AtomicBool,
}

impl Trimmer {
    const fn new() -> Trimmer {
        Trimmer {
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            pending: AtomicBool::new(false),
        }
    }

    fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
    }

    /// Whether a burst just ended: a trim is worth scheduling.
    fn closed(&self) -> bool {
        let open = self.open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        let closed = self.closed.fetch_add(1, Ordering::Relaxed) + 1;
        if closed >= TRIM_AFTER
            && open <= self.peak.load(Ordering::Relaxed) / 4
            && self
                .closed
                .compare_exchange(closed, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.peak.store(open, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Runs `trim` on a blocking thread once a [`QUIET`] period passes with few
/// connections opened (a timer every [`QUIET`] until then); one at a time.
/// Outside a runtime, nothing.
fn schedule(trimmer: &'static Trimmer, trim: fn()) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if trimmer.pending.swap(true, Ordering::AcqRel) {
        return;
    }
    runtime.spawn(async move {
        let mut before = trimmer.opened.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(QUIET).await;
            let now = trimmer.opened.load(Ordering::Relaxed);
            if now.wrapping_sub(before) <= QUIET_OPENS {
                break;
            }
            before = now;
        }
        let _ = tokio::task::spawn_blocking(trim).await;
        trimmer.pending.store(false, Ordering::Release);
    });
}

/// Returns freed heap memory to the system.
fn trim() {
    let released = crate::sys::trim_heap();
    tracing::debug!(
        released,
        "freed memory handed back after a burst of connections"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    static TRIMS: AtomicUsize = AtomicUsize::new(0);

    fn count() {
        TRIMS.fetch_add(1, Ordering::SeqCst);
    }

    /// Opens `n` connections, then closes them, scheduling a trim whenever
    /// the trimmer says a burst ended.
    fn burst(trimmer: &'static Trimmer, n: usize) {
        for _ in 0..n {
            trimmer.opened();
        }
        for _ in 0..n {
            if trimmer.closed() {
                schedule(trimmer, count);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn trims_once_a_burst_has_ended_and_not_while_busy() {
        static TRIMMER: Trimmer = Trimmer::new();
        // A burst, then quiet: one trim, after the quiet period.
        burst(&TRIMMER, 2 * TRIM_AFTER);
        tokio::task::yield_now().await;
        assert_eq!(
            TRIMS.load(Ordering::SeqCst),
            0,
            "not before the quiet period"
        );
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(TRIMS.load(Ordering::SeqCst), 1, "once the burst ended");

        // Batch after batch of short connections: a trim comes due, but
        // connections keep opening through every quiet period, so it waits.
        let deadline = tokio::time::Instant::now() + QUIET * 8;
        while tokio::time::Instant::now() < deadline {
            burst(&TRIMMER, 100);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(TRIMS.load(Ordering::SeqCst), 1, "no trim while busy");
        // The batches stop: the waiting trim runs.
        tokio::time::sleep(QUIET * 3).await;
        assert_eq!(TRIMS.load(Ordering::SeqCst), 2, "once quiet again");
    }
}
