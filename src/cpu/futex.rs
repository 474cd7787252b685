//! Futex wait / wake on a 32-bit atomic: the idle sleep and the synchronous caller's sleep.
//! Both calls are raw syscalls, so they are async-signal-safe.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout` (`None`: until woken; callers that
/// pass `None` document why the wait is unbounded). Returns on wake, timeout, signal or a
/// changed value; callers re-check their condition.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // Raw libc: nix has no futex wrapper, and this runs in handler context and on the idle path.
    // SAFETY: `word` is a live, aligned 32-bit atomic for the whole call; FUTEX_WAIT only reads
    // it; `tsp` is null or points at a timespec on this frame (relative timeout).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            tsp,
        )
    };
}

/// Wakes up to `n` threads sleeping on `word`. Async-signal-safe.
pub(crate) fn wake(word: &AtomicU32, n: i32) {
    // Raw libc: nix has no futex wrapper, and this runs on the IPI and hotplug hot paths.
    // SAFETY: FUTEX_WAKE only uses the address as a key; it does not dereference it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
}

/// [`wake`] by address, for a waker whose last access to the word's memory came just before
/// (the owner may free it the moment it sees that access). Async-signal-safe.
pub(crate) fn wake_addr(word: *const u32, n: i32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key (private futex: this process's mm plus
    // the address); it never reads the memory, so a word freed meanwhile is not touched. A
    // reused address at worst wakes an unrelated waiter, and every waiter re-checks.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
}

/// [`wait`], after spinning for up to `spin` while `*word == expected`. Returns at once if
/// the word changed during the spin; callers re-check their condition either way. Not for
/// signal handlers (it reads the clock through the vDSO).
pub(crate) fn spin_then_wait(
    word: &AtomicU32,
    expected: u32,
    spin: Duration,
    timeout: Option<Duration>,
) {
    let start = std::time::Instant::now();
    while start.elapsed() < spin {
        for _ in 0..32 {
            if word.load(std::sync::atomic::Ordering::Acquire) != expected {
                return;
            }
            std::hint::spin_loop();
        }
    }
    let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
    if left == Some(Duration::ZERO) {
        return;
    }
    wait(word, expected, left);
}
