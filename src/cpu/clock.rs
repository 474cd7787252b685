//! A monotonic nanosecond clock that a signal handler may read (`clock_gettime` is
//! async-signal-safe and served by the vDSO, ~20 ns): the one clock of every wait deadline
//! (`wait.rs`) and of the event rings.

/// Nanoseconds on `CLOCK_MONOTONIC`. Callable from signal-handler context.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // Raw libc: handler context and hot paths; nix's `clock_gettime` adds a Result to unwrap.
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux, so the
    // call cannot fail and leaves `ts` filled in.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
