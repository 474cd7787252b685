//! The one wait primitive: a [`Deadline`] on one clock ([`now_ns`], `CLOCK_MONOTONIC`) and a
//! [`Waiter`] that escalates spin -> yield -> sleep (crossbeam's `Backoff`, then a futex wait
//! or, where nobody futex-wakes the condition, a timed nap). Every wait loop of the runtime is
//! "check the condition, then one `Waiter` step", so its bound, its spin and its wake source are
//! stated once, at its call site: an unbounded wait says `Deadline::forever()` there.
//!
//! Protocol of a futex wait (waiter W on word `x`, waker K):
//! 1. K makes the change W waits for visible through `x` (stores `x`, or stores other state
//!    and then changes `x`), and only then futex-wakes `x`.
//! 2. W loads `x` as `seen`, checks its condition against what it loaded, and if unmet calls
//!    [`Waiter::wait_on`]`(x, seen)`.
//! 3. The kernel sleeps W only if `x` still holds `seen`, atomically with queueing W (its
//!    hash-bucket lock): either K's step-1 change came first (W returns at once, EAGAIN) or
//!    K's wake finds W queued. No lost wake-up, whatever the spin before it; the loom model
//!    `loom_waker_that_stores_then_wakes_is_never_lost` checks it (and, with the order of
//!    step 1 reversed, reports the lost wake-up as a deadlock).
//! 4. W re-checks after every return (a wake, a nap's end, a signal, a changed word or a
//!    spurious return all look alike) and steps again until the condition holds or
//!    [`Wait::TimedOut`].
//!
//! Async-signal-safe throughout: no allocation or lock; the clock is the vDSO's
//! `clock_gettime`, the yield is `sched_yield`, the sleeps are raw `futex` and `nanosleep`.
//! The stop rendezvous waits with it in IPI context.

use std::time::Duration;

use crossbeam_utils::Backoff;

use super::clock::now_ns;
use super::futex::{Futex, FutexWait};

/// A gap longer than this between two looks at the clock by one waiter means the waiter was
/// not running meanwhile ([`Deadline::after_running`]).
const PAUSE_GAP_NS: u64 = 100_000_000;

/// The longest single sleep under a deadline that skips pauses: a waiter must look at the
/// clock well inside [`PAUSE_GAP_NS`], or its own sleep would read as a pause.
const PAUSE_LOOK_NS: u64 = 10_000_000;

/// When a wait gives up, in [`now_ns`] nanoseconds.
///
/// Two kinds. [`Deadline::after`] is plain monotonic time. [`Deadline::after_running`] does
/// not count time its waiter was not running. Why: a process stopped by SIGTSTP (Ctrl-Z),
/// SIGSTOP or a debugger for longer than a call timeout used to fail its calls when continued
/// (`non-responsive CSD lock after 7002 ms` to a healthy CPU): the monotonic clock ran on while
/// every thread, the target's included, was stopped. How: the waiter looks at the clock at
/// least every few milliseconds (a [`Waiter`] under such a deadline naps at most 10 ms), so a
/// gap of more than [`PAUSE_GAP_NS`] between two of its looks means it was stopped (or
/// starved), and the deadline moves by the gap. Chosen over a process-wide "continued" epoch
/// bumped by a SIGCONT handler: that takes a signal the application may own, and a waiter
/// resumed before the handler runs on some thread would still see the deadline passed. A gap
/// only ever makes a wait longer, never shorter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    /// `u64::MAX`: never.
    at: u64,
    /// The last look at the clock (pause-skipping deadlines only).
    last: u64,
    skip_pauses: bool,
    /// Not started: `at` holds the timeout, counted from the first look.
    unstarted: bool,
}

impl Deadline {
    /// Never: the wait ends only when its condition holds. Every caller says why that is
    /// bounded after all (who always wakes it), or that it is unbounded by design.
    pub(crate) const fn forever() -> Self {
        Deadline {
            at: u64::MAX,
            last: 0,
            skip_pauses: false,
            unstarted: false,
        }
    }

    /// At `at` nanoseconds of [`now_ns`].
    pub(crate) const fn at_ns(at: u64) -> Self {
        Deadline {
            at,
            last: 0,
            skip_pauses: false,
            unstarted: false,
        }
    }

    /// `timeout` from now.
    pub(crate) fn after(timeout: Duration) -> Self {
        Self::at_ns(now_ns().saturating_add(nanos(timeout)))
    }

    /// `timeout` of running time from `now`: a pause of the waiter moves it (type doc).
    pub(crate) fn running_from(now: u64, timeout: Duration) -> Self {
        Deadline {
            at: now.saturating_add(nanos(timeout)),
            last: now,
            skip_pauses: true,
            unstarted: false,
        }
    }

    /// [`Deadline::after_running`], counted from the first look at the clock rather than
    /// from now: for a hot path that spins before it looks (a clock read is a noticeable part
    /// of a polling target's round trip).
    pub(crate) const fn running_from_first_look(timeout: Duration) -> Self {
        Deadline {
            at: timeout.as_nanos() as u64,
            last: 0,
            skip_pauses: true,
            unstarted: true,
        }
    }

    /// `timeout` of running time from now (type doc).
    pub(crate) fn after_running(timeout: Duration) -> Self {
        Self::running_from(now_ns(), timeout)
    }

    /// Takes a look at the clock reading `now`; returns whether the deadline has passed. Under
    /// a pause-skipping deadline a gap since the previous look longer than [`PAUSE_GAP_NS`]
    /// moves it by the gap first.
    #[inline]
    pub(crate) fn passed_at(&mut self, now: u64) -> bool {
        if self.unstarted {
            *self = Self::running_from(now, Duration::from_nanos(self.at));
        }
        if self.skip_pauses {
            let gap = now.saturating_sub(self.last);
            if gap > PAUSE_GAP_NS {
                self.at = self.at.saturating_add(gap);
            }
            self.last = now;
        }
        now >= self.at
    }

    /// [`Deadline::passed_at`] with a fresh clock reading.
    #[inline]
    pub(crate) fn passed(&mut self) -> bool {
        !self.is_forever() && self.passed_at(now_ns())
    }

    /// The time left (zero once passed), after a look at the clock; `None` for
    /// [`Deadline::forever`]. For a wait whose sleep is not a futex (a channel's receive).
    pub(crate) fn remaining(&mut self) -> Option<Duration> {
        if self.is_forever() {
            return None;
        }
        let now = now_ns();
        let _ = self.passed_at(now);
        Some(Duration::from_nanos(self.at.saturating_sub(now)))
    }

    /// The deadline in [`now_ns`] nanoseconds (moved by any pause seen so far); `u64::MAX`
    /// for [`Deadline::forever`]. Past the first look for [`Deadline::running_from_first_look`].
    #[inline]
    pub(crate) fn at(&self) -> u64 {
        debug_assert!(!self.unstarted, "a deadline read before its first look");
        self.at
    }

    /// Whether this is [`Deadline::forever`].
    #[inline]
    pub(crate) fn is_forever(&self) -> bool {
        self.at == u64::MAX
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How a [`Waiter`] escalates before it sleeps, and how long one sleep may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Busy-wait this long first, looking at the condition after every spin hint (the IPI
    /// round trip is a few microseconds; batching hints would add to it).
    spin_ns: u64,
    /// Yield the core every 64 hints of that spin: a waiter that may hold a core the thread
    /// it waits for needs (more logical CPUs than host cores).
    spin_yields: bool,
    /// Then crossbeam's `Backoff::snooze` until it completes: growing spin batches, then a few
    /// `sched_yield`s. For waits whose other side is usually quick but has no spin window of
    /// its own measured.
    backoff: bool,
    /// The longest single sleep; `u64::MAX`: until woken (futex) or the deadline.
    nap_ns: u64,
}

impl Policy {
    /// Sleep at once: the other side takes long (a thread's exit), or the waiter must not
    /// hold a core others need.
    pub(crate) const SLEEP: Policy = Policy {
        spin_ns: 0,
        spin_yields: false,
        backoff: false,
        nap_ns: u64::MAX,
    };

    /// crossbeam's `Backoff` (spin batches, then yields), then sleep.
    pub(crate) const BACKOFF: Policy = Policy {
        backoff: true,
        ..Policy::SLEEP
    };

    /// Spin for `d`, then sleep. A zero `d` is [`Policy::SLEEP`].
    pub(crate) const fn spin(d: Duration) -> Policy {
        Policy {
            spin_ns: d.as_nanos() as u64,
            ..Policy::SLEEP
        }
    }

    /// This policy, yielding the core every 64 hints of its spin.
    pub(crate) const fn yielding(self) -> Policy {
        Policy {
            spin_yields: true,
            ..self
        }
    }

    /// This policy, sleeping at most `d` at a time: for a waiter with duties between sleeps
    /// (re-ringing a doorbell), or whose condition has no futex word or no sure wake-up.
    pub(crate) const fn nap(self, d: Duration) -> Policy {
        Policy {
            nap_ns: d.as_nanos() as u64,
            ..self
        }
    }
}

/// What one [`Waiter`] step did. In every case the caller re-checks its condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a wait step may have timed out"]
pub(crate) enum Wait {
    /// Spun or yielded.
    Spun,
    /// Slept, and is back: woken, the nap ended, a signal, or the word had changed.
    Slept,
    /// The deadline has passed (it did not sleep).
    TimedOut,
}

impl Wait {
    /// Whether the deadline has passed.
    #[inline]
    pub(crate) fn timed_out(self) -> bool {
        self == Wait::TimedOut
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Spin,
    Backoff,
    Sleep,
}

/// One wait: its deadline, its policy and how far it has escalated. Cheap to make; make a
/// fresh one where a wait starts over (a new state to wait out gets a new spin).
/// Async-signal-safe.
#[derive(Debug)]
pub(crate) struct Waiter {
    deadline: Deadline,
    policy: Policy,
    phase: Phase,
    hints: u32,
    /// End of the spin window; 0 until the first look at the clock, 64 hints in (a polling
    /// target answers before that, and two clock reads were a tenth of its round trip).
    spin_until: u64,
    backoff: Backoff,
}

impl Waiter {
    pub(crate) fn new(deadline: Deadline, policy: Policy) -> Self {
        let phase = if policy.spin_ns > 0 {
            Phase::Spin
        } else if policy.backoff {
            Phase::Backoff
        } else {
            Phase::Sleep
        };
        Waiter {
            deadline,
            policy,
            phase,
            hints: 0,
            spin_until: 0,
            backoff: Backoff::new(),
        }
    }

    /// The wait's deadline (a pause-skipping one is moved by the waiter's looks).
    pub(crate) fn deadline(&mut self) -> &mut Deadline {
        &mut self.deadline
    }

    /// The longest single sleep from now on (`None`: until woken or the deadline): for a
    /// waiter whose next duty moves (a re-ring schedule).
    pub(crate) fn set_nap(&mut self, nap: Option<Duration>) {
        self.policy.nap_ns = nap.map_or(u64::MAX, nanos);
    }

    /// One step of the spin phases: true if it spun or yielded (re-check, then step again);
    /// false once they are over, or the deadline passed in them: the next step sleeps.
    #[inline]
    pub(crate) fn spin(&mut self) -> bool {
        match self.phase {
            Phase::Spin => {
                std::hint::spin_loop();
                self.hints = self.hints.wrapping_add(1);
                if self.hints % 64 != 0 {
                    return true;
                }
                if self.policy.spin_yields {
                    // With nothing else runnable this returns at once and the spin goes on.
                    std::thread::yield_now();
                }
                let now = now_ns();
                if self.spin_until == 0 {
                    self.spin_until = now.saturating_add(self.policy.spin_ns);
                }
                if self.deadline.passed_at(now) || now >= self.spin_until {
                    self.phase = if self.policy.backoff {
                        Phase::Backoff
                    } else {
                        Phase::Sleep
                    };
                }
                true
            }
            Phase::Backoff => {
                if self.backoff.is_completed() || self.deadline.passed() {
                    self.phase = Phase::Sleep;
                    return false;
                }
                self.backoff.snooze();
                true
            }
            Phase::Sleep => false,
        }
    }

    /// How long the next sleep may last, or `None` if the deadline has passed.
    fn sleep_for(&mut self) -> Option<Option<Duration>> {
        if self.deadline.is_forever() {
            return Some(
                (self.policy.nap_ns != u64::MAX).then(|| Duration::from_nanos(self.policy.nap_ns)),
            );
        }
        let now = now_ns();
        if self.deadline.passed_at(now) {
            return None;
        }
        let mut t = (self.deadline.at() - now).min(self.policy.nap_ns);
        if self.deadline.skip_pauses {
            t = t.min(PAUSE_LOOK_NS);
        }
        Some(Some(Duration::from_nanos(t)))
    }

    /// Step 2 of the protocol: spin while the policy spins, then sleep on `word` while it
    /// holds `seen`, until woken, the nap's end or the deadline. Async-signal-safe.
    #[inline]
    pub(crate) fn wait_on<F: Futex + ?Sized>(&mut self, word: &F, seen: u32) -> Wait {
        if self.spin() {
            return Wait::Spun;
        }
        self.sleep_on(word, seen)
    }

    /// [`Waiter::wait_on`] past the spin phases: sleeps now. Async-signal-safe.
    pub(crate) fn sleep_on<F: Futex + ?Sized>(&mut self, word: &F, seen: u32) -> Wait {
        self.phase = Phase::Sleep;
        match self.sleep_for() {
            None => Wait::TimedOut,
            Some(t) => {
                // Every outcome means "re-check" (protocol step 4); the futex checked its own.
                let _: FutexWait = word.futex_wait(seen, t);
                Wait::Slept
            }
        }
    }

    /// For a condition with no futex word (nobody wakes it): spin while the policy spins,
    /// then nap for the policy's nap (or to the deadline). Async-signal-safe.
    pub(crate) fn snooze(&mut self) -> Wait {
        debug_assert!(
            self.policy.nap_ns != u64::MAX,
            "a wait with no futex word needs a bounded nap"
        );
        if self.spin() {
            return Wait::Spun;
        }
        self.phase = Phase::Sleep;
        match self.sleep_for() {
            None => Wait::TimedOut,
            Some(t) => {
                // nanosleep: async-signal-safe (std's sleep is a nanosleep loop, no allocation).
                std::thread::sleep(t.unwrap_or(Duration::from_millis(1)));
                Wait::Slept
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_gap_moves_a_running_deadline_and_a_short_look_does_not() {
        let mut d = Deadline::running_from(0, Duration::from_secs(1));
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
            let _ = d.passed_at(t);
        }
        assert_eq!(d.at(), 8_000_000_000);
        assert!(d.passed_at(8_000_000_001));
    }

    #[test]
    fn a_lazy_deadline_starts_at_its_first_look() {
        let mut d = Deadline::running_from_first_look(Duration::from_millis(50));
        assert!(!d.passed_at(5_000_000_000));
        assert_eq!(d.at(), 5_050_000_000);
        assert!(d.passed_at(5_050_000_000));
    }

    #[test]
    fn a_plain_deadline_ignores_gaps_and_forever_never_passes() {
        let mut d = Deadline::at_ns(1_000_000_000);
        assert!(!d.passed_at(1));
        assert!(d.passed_at(7_000_000_000));
        let mut f = Deadline::forever();
        assert!(!f.passed());
        assert!(!f.passed_at(u64::MAX - 1));
    }

    /// A word nobody changes: every policy ends in `TimedOut` at the deadline, not before.
    #[test]
    fn deadline_expiry_times_out() {
        let word = AtomicU32::new(0);
        for policy in [
            Policy::SLEEP,
            Policy::BACKOFF,
            Policy::spin(Duration::from_micros(50)).yielding(),
            Policy::SLEEP.nap(Duration::from_micros(300)),
        ] {
            let start = now_ns();
            let mut w = Waiter::new(Deadline::after(Duration::from_millis(5)), policy);
            while !w.wait_on(&word, 0).timed_out() {}
            assert!(now_ns() - start >= 5_000_000, "{policy:?} gave up early");
            let start = now_ns();
            let mut w = Waiter::new(
                Deadline::after_running(Duration::from_millis(5)),
                policy.nap(Duration::from_micros(300)),
            );
            while !w.snooze().timed_out() {}
            assert!(
                now_ns() - start >= 5_000_000,
                "{policy:?} snooze gave up early"
            );
        }
    }

    /// Whether thread `tid` of this process is asleep (state `S`), from its `/proc` stat.
    fn asleep(tid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The state follows the parenthesised command name, which may hold spaces.
        stat.rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('S')
    }

    /// A waiter asleep on the futex (seen in `/proc`, not assumed after a sleep) is ended by
    /// another thread's store and wake, long before its 20 s deadline.
    #[test]
    fn a_wake_ends_a_futex_wait_early() {
        let word = Arc::new(AtomicU32::new(0));
        let tid = Arc::new(AtomicI32::new(0));
        let (w2, t2) = (word.clone(), tid.clone());
        let waiter = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            t2.store(unsafe { libc::gettid() }, Ordering::Release);
            let start = now_ns();
            let mut w = Waiter::new(Deadline::after(Duration::from_secs(20)), Policy::SLEEP);
            let mut slept = 0;
            while w2.load(Ordering::Acquire) == 0 {
                match w.wait_on(&*w2, 0) {
                    Wait::TimedOut => panic!("not woken within 20 s"),
                    Wait::Slept => slept += 1,
                    Wait::Spun => {}
                }
            }
            (slept, now_ns() - start)
        });
        let mut bound = Deadline::after(Duration::from_secs(10));
        loop {
            let t = tid.load(Ordering::Acquire);
            if t != 0 && asleep(t) {
                break;
            }
            assert!(!bound.passed(), "the waiter never went to sleep");
            std::thread::yield_now();
        }
        word.store(1, Ordering::Release);
        crate::cpu::futex::wake(&word, 1);
        let (slept, took) = waiter.join().unwrap();
        assert!(slept >= 1);
        assert!(took < 10_000_000_000, "woken only after {took} ns");
    }

    /// The raw futex outcomes the waiter relies on.
    #[test]
    fn futex_outcomes() {
        let word = AtomicU32::new(1);
        assert_eq!(word.futex_wait(0, None), FutexWait::Changed);
        assert_eq!(
            word.futex_wait(1, Some(Duration::from_micros(100))),
            FutexWait::TimedOut
        );
        assert_eq!(crate::cpu::futex::wake(&word, 1), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_wait {
    //! The futex modelled as the kernel implements it: the value check and the queueing are
    //! one step under the hash bucket's lock, and a wake wakes whoever is queued then.
    use super::*;
    use crate::sync::{AtomicU32, Condvar, Mutex, Ordering};
    use loom::sync::Arc;

    struct ModelFutex {
        word: AtomicU32,
        bucket: Mutex<()>,
        queue: Condvar,
    }

    impl Futex for ModelFutex {
        /// The model ignores `timeout`: the models wait forever, so a lost wake-up is a
        /// deadlock loom reports.
        fn futex_wait(&self, expected: u32, _timeout: Option<Duration>) -> FutexWait {
            let g = self.bucket.lock().unwrap();
            if self.word.load(Ordering::SeqCst) != expected {
                return FutexWait::Changed;
            }
            drop(self.queue.wait(g).unwrap());
            FutexWait::Woken
        }
    }

    impl ModelFutex {
        fn futex_wake(&self) {
            let _g = self.bucket.lock().unwrap();
            self.queue.notify_all();
        }
    }

    /// `store_first: false` reverses step 1 (wake, then store): loom then reports a deadlock
    /// (the waiter asleep on the old value, nobody left to wake it). It aborts the process
    /// rather than panic, so that variant is not a `should_panic` test; run it by hand.
    fn model(store_first: bool) {
        loom::model(move || {
            let f = Arc::new(ModelFutex {
                word: AtomicU32::new(0),
                bucket: Mutex::new(()),
                queue: Condvar::new(),
            });
            let f2 = f.clone();
            let waker = loom::thread::spawn(move || {
                if store_first {
                    f2.word.store(1, Ordering::Release);
                    f2.futex_wake();
                } else {
                    f2.futex_wake();
                    f2.word.store(1, Ordering::Release);
                }
            });
            // Steps 2-4; `Policy::SLEEP`, as a spin is only a delay before the same sleep.
            let mut w = Waiter::new(Deadline::forever(), Policy::SLEEP);
            loop {
                let seen = f.word.load(Ordering::Acquire);
                if seen == 1 {
                    break;
                }
                assert!(!w.wait_on(&*f, seen).timed_out());
            }
            waker.join().unwrap();
        });
    }

    /// Step 1 as written: the waiter always ends.
    #[test]
    fn loom_waker_that_stores_then_wakes_is_never_lost() {
        model(true);
    }
}
