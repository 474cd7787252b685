//! Futex wait / wake on a 32-bit atomic: the sleep under every [`Waiter`] and the wake-ups
//! that end it. Both calls are raw syscalls, so they are async-signal-safe. Each result is
//! read and `debug_assert!`ed to be one the call may return (parking_lot_core's
//! `thread_parker/linux.rs` does the same): anything else (EFAULT, EINVAL, ENOSYS) is a bug in
//! the word's address or the call.
//!
//! [`Waiter`]: super::wait::Waiter

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// How one futex wait returned. Callers re-check their condition whatever it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FutexWait {
    /// Woken by a [`wake`] (or spuriously: the kernel does not tell them apart).
    Woken,
    /// The word did not hold `expected` (EAGAIN): it changed before the sleep.
    Changed,
    /// The timeout passed (ETIMEDOUT).
    TimedOut,
    /// A signal handler ran (EINTR).
    Interrupted,
}

/// A word a [`Waiter`](super::wait::Waiter) can sleep on: the real one (`AtomicU32`) or, in a
/// loom model, one that models the kernel. (Wakers call [`wake`] directly.)
pub(crate) trait Futex {
    /// Sleeps while the word holds `expected`, for at most `timeout` (`None`: until woken;
    /// callers that pass `None` document why the wait is unbounded). Async-signal-safe.
    fn futex_wait(&self, expected: u32, timeout: Option<Duration>) -> FutexWait;
}

impl Futex for AtomicU32 {
    #[inline]
    fn futex_wait(&self, expected: u32, timeout: Option<Duration>) -> FutexWait {
        wait(self, expected, timeout)
    }
}

/// Sleeps while `*word == expected`, for at most `timeout` (`None`: until woken; callers that
/// pass `None` document why the wait is unbounded). Returns on wake, timeout, signal or a
/// changed value; callers re-check their condition. Async-signal-safe.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> FutexWait {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // Raw libc: nix has no futex wrapper, and this runs in handler context and on the idle path.
    // SAFETY: `word` is a live, aligned 32-bit atomic for the whole call; FUTEX_WAIT only reads
    // it; `tsp` is null or points at a timespec on this frame (relative timeout).
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            tsp,
        )
    };
    if r == 0 {
        return FutexWait::Woken;
    }
    debug_assert_eq!(r, -1, "futex wait returned {r}");
    // errno is thread-local, and reading it allocates nothing.
    let e = std::io::Error::last_os_error().raw_os_error();
    debug_assert!(
        matches!(e, Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR)),
        "futex wait failed: errno {e:?}"
    );
    match e {
        Some(libc::EAGAIN) => FutexWait::Changed,
        Some(libc::ETIMEDOUT) => FutexWait::TimedOut,
        Some(libc::EINTR) => FutexWait::Interrupted,
        // Release builds: as a spurious return; every caller re-checks.
        _ => FutexWait::Woken,
    }
}

/// Wakes up to `n` threads sleeping on `word`; returns how many it woke. Async-signal-safe.
pub(crate) fn wake(word: &AtomicU32, n: i32) -> usize {
    wake_addr(word.as_ptr(), n)
}

/// [`wake`] by address, for a waker whose last access to the word's memory came just before
/// (the owner may free it the moment it sees that access). Async-signal-safe.
pub(crate) fn wake_addr(word: *const u32, n: i32) -> usize {
    // Raw libc: nix has no futex wrapper, and this runs on the IPI and hotplug hot paths.
    // SAFETY: FUTEX_WAKE only uses the address as a key (private futex: this process's mm plus
    // the address); it never reads the memory, so a word freed meanwhile is not touched. A
    // reused address at worst wakes an unrelated waiter, and every waiter re-checks.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
    // A private FUTEX_WAKE fails only on a misaligned address or a bad op (EINVAL): a bug.
    debug_assert!(r >= 0, "futex wake failed: errno {:?}", {
        std::io::Error::last_os_error().raw_os_error()
    });
    r.max(0) as usize
}
