//! A stop never parks a CPU inside the C library (`stop/parkable.rs`): parked there for good, a
//! CPU interrupted inside `malloc` would hold its arena's lock for good, and every later
//! allocation from that arena (the next image's threads, the teardown, the caller's own code)
//! would hang the process. This binary runs alone (its own process) because it sets the
//! process-wide malloc arena limit to one, so every thread shares the arena the jobs use.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

/// Runs the test's copy with the receiver's check off (`Faults::set_park_in_libc`).
const BROKEN_ENV: &str = "USMP_TEST_PARK_IN_LIBC";

use common::{wait_until, PATIENCE};
use usmp::Builder;

/// Jobs on CPUs 1 and 2 allocate and free blocks too big for glibc's per-thread cache, so each
/// call takes the arena lock; main crash-stops them (they park for good: they are in jobs).
/// A thread started before the stop then allocates: it must finish. A round that does not end
/// is the process-wide hang (the test's own thread hangs first, in the stop's allocations),
/// reported by a watchdog thread with a raw write and `_exit` (printing and unwinding would
/// allocate). The stops must also have found CPUs inside the library
/// and sent again (`Attempt::deferred`), or the rounds did not exercise the case.
#[test]
fn a_stop_never_parks_a_cpu_holding_the_malloc_lock() {
    // SAFETY: mallopt only changes the allocator's tuning and is thread-safe (glibc takes the
    // main arena's lock); later arenas are simply not created.
    assert_eq!(unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) }, 1);
    // Set by `the_check_is_what_prevents_the_hang` for the copy of this test it runs.
    let broken = std::env::var_os(BROKEN_ENV).is_some();
    let rounds = 20;
    let progress = Arc::new(AtomicUsize::new(0));
    watchdog(
        progress.clone(),
        if broken { PATIENCE / 2 } else { PATIENCE * 3 },
    );
    let mut deferred = 0u32;
    for round in 0..rounds {
        let rt = Builder::new()
            .cpus(3)
            .log_events(false)
            .pin(false)
            .build()
            .unwrap();
        if broken {
            rt.handle().faults().set_park_in_libc(true);
        }
        let running = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for cpu in 1..3 {
            let running = running.clone();
            jobs.push(
                rt.run_on(cpu, move || {
                    running.fetch_add(1, Ordering::SeqCst);
                    // Unbounded by design: the stop parks this job where it finds it.
                    let mut i = 0usize;
                    loop {
                        let v: Vec<u8> = Vec::with_capacity(1536 + i % 1024);
                        black_box(&v);
                        i += 1;
                    }
                })
                .unwrap(),
            );
        }
        assert!(
            wait_until(PATIENCE, || running.load(Ordering::SeqCst) == 2),
            "round {round}: the jobs did not start"
        );
        // The checker is started before the stop: starting a thread allocates.
        let go = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let checker = {
            let (go, done) = (go.clone(), done.clone());
            std::thread::spawn(move || {
                while !go.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                for i in 0..2000usize {
                    let v: Vec<u8> = Vec::with_capacity(1536 + i % 1024);
                    black_box(&v);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let out = rt.handle().crash_stop().unwrap();
        deferred += out.attempts.iter().map(|a| a.deferred).sum::<u32>();
        go.store(true, Ordering::SeqCst);
        // Unbounded here; the watchdog bounds the round.
        while !done.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        checker.join().unwrap();
        assert!(
            out.failed.is_empty(),
            "round {round}: CPUs {} failed to stop: {out:?}",
            out.failed
        );
        drop(jobs);
        drop(rt);
        progress.fetch_add(1, Ordering::SeqCst);
    }
    assert!(
        deferred > 0,
        "no stop found a CPU inside the C library in {rounds} rounds: the test never reached the case it is for"
    );
    eprintln!("stop_in_libc: {rounds} rounds, {deferred} stop signals sent again");
}

/// Ends the process with a message if `progress` stands still for `bound`. It never
/// allocates after it starts: the hang it reports is one where allocation blocks forever.
fn watchdog(progress: Arc<AtomicUsize>, bound: Duration) {
    std::thread::spawn(move || {
        let mut last = progress.load(Ordering::SeqCst);
        let mut since = Instant::now();
        loop {
            // A timer, not synchronization: the watchdog only looks at a counter.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = progress.load(Ordering::SeqCst);
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > bound {
                let msg =
                    b"stop_in_libc: a round hung: a CPU was parked holding the malloc arena lock\n";
                // SAFETY: write(2) of a static buffer, then _exit: no allocation, no unwinding,
                // neither of which could finish with the arena lock held for good.
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::_exit(1);
                }
            }
        }
    });
}

/// The broken variant: the same test, with the stop receiver parking CPUs inside the C library
/// as it did before `stop/parkable.rs`, must hang and be ended by its watchdog. Run as a child
/// process (the hang takes the whole process); bounded by `PATIENCE` * 6 here.
#[test]
fn the_check_is_what_prevents_the_hang() {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_stop_never_parks_a_cpu_holding_the_malloc_lock",
            "--exact",
            "--nocapture",
        ])
        .env(BROKEN_ENV, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The child's exit, from a thread that blocks on it: no polling.
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(PATIENCE * 6) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) of our own child, which has not been reaped (its waiter is still
            // blocked in wait), so the pid cannot have been reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("the broken variant neither hung into its watchdog nor ended");
        }
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut { stderr }, &mut err).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the broken variant was not caught (stderr: {err})"
    );
    assert!(err.contains("a round hung"), "stderr: {err}");
}
