//! A monotonic nanosecond clock that a signal handler may read (`clock_gettime` is
//! async-signal-safe and served by the vDSO, ~20 ns).

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

/// A gap longer than this between two looks at the clock by one waiter means the waiter was
/// not running meanwhile. Waits that use [`Deadline`] look at least every few milliseconds.
pub(crate) const PAUSE_GAP_NS: u64 = 100_000_000;

/// A protocol deadline that does not count time its waiter was not running.
///
/// Why: a process stopped by SIGTSTP (Ctrl-Z), SIGSTOP or a debugger for longer than a call
/// timeout used to fail its calls when continued (`non-responsive CSD lock after 7002 ms` to a
/// healthy CPU): the monotonic clock ran on while every thread, the target's included, was
/// stopped. How: the waiter looks at the clock at least every few milliseconds (spins, yields
/// or naps of 1 ms), so a gap of more than [`PAUSE_GAP_NS`] between two of its looks means it
/// was stopped (or starved), and the deadline moves by the gap. Chosen over a process-wide
/// "continued" epoch bumped by a SIGCONT handler: that takes a signal the application may own,
/// and a waiter resumed before the handler runs on some thread would still see the deadline
/// passed. A gap only ever makes a wait longer, never shorter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: u64,
    last: u64,
}

impl Deadline {
    /// `timeout_ns` from `now`.
    #[inline]
    pub(crate) fn from(now: u64, timeout_ns: u64) -> Self {
        Deadline {
            at: now + timeout_ns,
            last: now,
        }
    }

    /// `timeout_ns` from now.
    #[inline]
    pub(crate) fn after_ns(timeout_ns: u64) -> Self {
        Self::from(now_ns(), timeout_ns)
    }

    /// Takes a look at the clock reading `now`: a gap since the previous look longer than
    /// [`PAUSE_GAP_NS`] moves the deadline by the gap. Returns whether it has passed.
    #[inline]
    pub(crate) fn passed_at(&mut self, now: u64) -> bool {
        let gap = now.saturating_sub(self.last);
        if gap > PAUSE_GAP_NS {
            self.at += gap;
        }
        self.last = now;
        now >= self.at
    }

    /// [`Deadline::passed_at`] with a fresh clock reading.
    #[inline]
    pub(crate) fn passed(&mut self) -> bool {
        self.passed_at(now_ns())
    }

    /// The deadline, in [`now_ns`] nanoseconds (moved by any pause seen so far).
    #[inline]
    pub(crate) fn at(&self) -> u64 {
        self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_moves_the_deadline_and_a_short_look_does_not() {
        let mut d = Deadline::from(0, 1_000_000_000);
        assert!(!d.passed_at(1_000_000));
        assert_eq!(d.at(), 1_000_000_000);
        // Stopped for 7 s: the deadline moves by the gap, and 1 ms later it has not passed.
        assert!(!d.passed_at(7_001_000_000));
        assert!(!d.passed_at(7_002_000_000));
        assert_eq!(d.at(), 8_000_000_000);
        // Looks every 50 ms never move it.
        let mut t = 7_002_000_000;
        while t < 8_000_000_000 {
            t += 50_000_000;
            d.passed_at(t);
        }
        assert_eq!(d.at(), 8_000_000_000);
        assert!(d.passed_at(8_000_000_001));
    }
}
