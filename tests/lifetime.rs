//! Nothing `run` starts outlives it: the command when `run` is killed
//! (even with SIGKILL), what the command left running in the background,
//! the same under `--isolate` (the bridge included), and a directory a
//! killed `run --isolate` left is removed by the next one. Each process is
//! found by a marker in its command line (a sleep of an odd length).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Processes whose command line holds `marker`.
fn with_marker(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(marker)
        {
            found.push(pid);
        }
    }
    found
}

/// The `sleep` processes holding `marker` (not the portcullis processes,
/// whose command lines hold it too).
fn sleeps_with(marker: &str) -> usize {
    with_marker(marker)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "sleep")
        })
        .count()
}

/// Whether every process holding `marker` is gone within `wait`.
async fn all_gone(marker: &str, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = with_marker(marker);
        let mut alive = false;
        for pid in left {
            if !exits_within(pid, Duration::ZERO).await {
                alive = true;
            }
        }
        if !alive {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills everything holding `marker` (a failed test must not leave them).
fn clean_up(marker: &str) {
    for pid in with_marker(marker) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test]
async fn what_the_command_leaves_running_ends_with_run() {
    for (isolate, marker) in [(false, "301.417"), (true, "301.418")] {
        if isolate && !namespaces_available().await {
            continue;
        }
        let mut args = vec!["run"];
        if isolate {
            args.push("--isolate");
        }
        let script = format!("sleep {marker} & echo started");
        args.extend(["--", "sh", "-c", &script]);
        let (code, stdout, stderr) = output(portcullis().args(&args)).await;
        let gone = all_gone(marker, Duration::from_secs(5)).await;
        clean_up(marker);
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout.trim(), "started");
        assert!(gone, "isolate {isolate}: the background sleep outlived run");
    }
}

#[tokio::test]
async fn killing_run_with_sigkill_ends_the_command() {
    for (isolate, marker) in [(false, "302.417"), (true, "302.418")] {
        if isolate && !namespaces_available().await {
            continue;
        }
        let mut args = vec!["run"];
        if isolate {
            args.push("--isolate");
        }
        // Plain run: the command itself (sh execs the sleep) dies with it.
        // Under --isolate the command's PID namespace goes too: a process it
        // started in the background as well.
        let script = format!("sleep {marker} & sleep {marker}");
        let expected = if isolate { 2 } else { 1 };
        if isolate {
            args.extend(["--", "sh", "-c", &script]);
        } else {
            args.extend(["--", "sleep", marker]);
        }
        let mut run = portcullis()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sleeps_with(marker) < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = sleeps_with(marker);
        run.start_kill().unwrap();
        let _ = run.wait().await;
        let gone = all_gone(marker, Duration::from_secs(5)).await;
        let bridge_gone = !isolate || all_gone("__bridge", Duration::from_secs(5)).await;
        clean_up(marker);
        assert!(started >= expected, "isolate {isolate}: the sleeps started");
        assert!(gone, "isolate {isolate}: the command outlived a killed run");
        assert!(bridge_gone, "the bridge outlived a killed run");
    }
}

#[tokio::test]
async fn a_directory_a_killed_isolated_run_left_is_removed_by_the_next() {
    if !namespaces_available().await {
        return;
    }
    // A process that is gone: its pid names no one now.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = std::env::temp_dir().join(format!("portcullis-isolate-test{dead}"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("owner"), dead.to_string()).unwrap();
    std::fs::write(stale.join("http.sock"), "").unwrap();
    // One whose owner lives (this test) stays.
    let live = std::env::temp_dir().join(format!("portcullis-isolate-live{}", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("owner"), std::process::id().to_string()).unwrap();
    let (code, _, stderr) = output(portcullis().args(["run", "--isolate", "--", "true"])).await;
    let stale_left = stale.exists();
    let live_left = live.exists();
    let _ = std::fs::remove_dir_all(&stale);
    let _ = std::fs::remove_dir_all(&live);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stale_left, "the dead run's directory was removed");
    assert!(live_left, "a live run's directory was kept");
}
