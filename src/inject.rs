//! Fault injection: the switches a torture harness flips to provoke the seeds' races, and the
//! deliberately broken protocol variants that prove its checker can fail (locktorture's
//! `lock_busted`).
//!
//! This file is the bottom half: one `FaultState` per runtime, plain atomics, read by the
//! protocol code at a handful of named points. Every reader first tests
//! `cfg!(feature = "fault-injection")`, so without the feature each hook is a constant `false`
//! or `None` and compiles away. The public half (`usmp::fault::Faults`, only with the feature)
//! lives in `runtime/faults.rs` and is re-exported as `usmp::fault`, because setting a step failure needs the hotplug table.
//!
//! Every hook may run in signal-handler context: atomics and `nanosleep` only.

// Without the feature only the readers are used; the setters and types serve `usmp::fault`.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code))]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::cpu::mask::CpuId;

/// A deliberately broken protocol, for proving that a checker catches it. Never enable one
/// outside a test or `usmp stress --broken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[non_exhaustive]
pub enum Broken {
    /// A dying CPU does not flush its call queue (the bug seed 002 fixed): calls queued just
    /// before it went offline are lost.
    SkipDyingFlush,
    /// `send_stop`/`crash_stop` make one attempt only: no retry and no NMI fallback, so a CPU
    /// with irqs masked escapes the stop.
    StopWithoutRetries,
    /// The bring-up handshake without its compare-and-swaps (seed 003 before the fix): the AP
    /// goes on as soon as it is alive, and the controller's timeout kills it blindly, so a CPU
    /// can end up online after `cpu_up` reported a timeout.
    BringupWithoutCas,
    /// The doorbell is never rung: no signal, no futex wake, no re-ring by a waiting sender.
    DoorbellNeverRings,
    /// A CPU whose job calls `send_stop`/`crash_stop` and is parked by another caller's stop
    /// before it parks itself stays parked for good at teardown (the protocol before it let
    /// such a caller resume into its own call): its thread is left behind.
    StopCallerStranded,
}

impl Broken {
    /// Every variant, in a stable order.
    pub const ALL: [Broken; 5] = [
        Broken::SkipDyingFlush,
        Broken::StopWithoutRetries,
        Broken::BringupWithoutCas,
        Broken::DoorbellNeverRings,
        Broken::StopCallerStranded,
    ];

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// What the injector has done so far (Relaxed counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct FaultCounters {
    /// Doorbells that were delayed before ringing.
    pub doorbells_delayed: u64,
    /// Doorbell signals that were dropped (not sent).
    pub doorbells_dropped: u64,
    /// Times a CPU thread yielded or slept at a serve point.
    pub preemptions: u64,
    /// Bring-ups that were slowed down before their ALIVE step.
    pub boot_delays: u64,
    /// CPU callers of `send_stop`/`crash_stop` that slept at the call's entry.
    pub stop_calls_delayed: u64,
}

/// The runtime's fault switches (all off at build).
pub(crate) struct FaultState {
    rng: AtomicU64,
    broken: AtomicU32,
    doorbell_delay_ns: AtomicU64,
    doorbell_drop_one_in: AtomicU32,
    preempt_one_in: AtomicU32,
    preempt_max_ns: AtomicU64,
    /// One-shot delay before the AP's ALIVE step, per CPU (ns).
    boot_delay_ns: Box<[AtomicU64]>,
    stop_call_delay_ns: AtomicU64,
    park_in_libc: AtomicBool,
    any: AtomicBool,
    delayed: AtomicU64,
    dropped: AtomicU64,
    preempted: AtomicU64,
    boot_delayed: AtomicU64,
    stop_calls_delayed: AtomicU64,
}

const ON: bool = cfg!(feature = "fault-injection");

impl FaultState {
    pub(crate) fn new(cpus: usize) -> Self {
        FaultState {
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            broken: AtomicU32::new(0),
            doorbell_delay_ns: AtomicU64::new(0),
            doorbell_drop_one_in: AtomicU32::new(0),
            preempt_one_in: AtomicU32::new(0),
            preempt_max_ns: AtomicU64::new(0),
            boot_delay_ns: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
            stop_call_delay_ns: AtomicU64::new(0),
            park_in_libc: AtomicBool::new(false),
            any: AtomicBool::new(false),
            delayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            preempted: AtomicU64::new(0),
            boot_delayed: AtomicU64::new(0),
            stop_calls_delayed: AtomicU64::new(0),
        }
    }

    /// Whether any switch was ever set: one Relaxed load on the hot paths.
    #[inline(always)]
    fn armed(&self) -> bool {
        ON && self.any.load(Ordering::Relaxed)
    }

    /// A random u64 (splitmix64 over a shared Weyl sequence): lock-free and async-signal-safe.
    /// Reproducible for a seed up to the order in which threads draw.
    fn next(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn one_in(&self, n: u32) -> bool {
        n != 0 && self.next() % n as u64 == 0
    }

    /// Whether protocol variant `b` is switched to its broken form.
    #[inline(always)]
    pub(crate) fn is_broken(&self, b: Broken) -> bool {
        self.armed() && self.broken.load(Ordering::Relaxed) & b.bit() != 0
    }

    /// Doorbell hook, before the sender rings: waits a random time up to the configured delay.
    #[inline(always)]
    pub(crate) fn doorbell_delay(&self) {
        if !self.armed() {
            return;
        }
        let max = self.doorbell_delay_ns.load(Ordering::Relaxed);
        if max > 0 {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            nap(self.next() % (max + 1));
        }
    }

    /// Doorbell hook, at the signal: true to drop this one (the sender then behaves as if the
    /// kernel had lost it).
    #[inline(always)]
    pub(crate) fn drop_doorbell(&self) -> bool {
        if !self.armed() {
            return false;
        }
        let hit = self.one_in(self.doorbell_drop_one_in.load(Ordering::Relaxed));
        if hit {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Host preemption at a CPU thread's serve point: 1 in N yields or sleeps up to the max.
    #[inline(always)]
    pub(crate) fn preempt_point(&self) {
        if !self.armed() {
            return;
        }
        if self.one_in(self.preempt_one_in.load(Ordering::Relaxed)) {
            self.preempted.fetch_add(1, Ordering::Relaxed);
            let max = self.preempt_max_ns.load(Ordering::Relaxed);
            let r = self.next();
            if max == 0 || r & 1 == 0 {
                std::thread::yield_now();
            } else {
                nap((r >> 1) % (max + 1));
            }
        }
    }

    /// At the entry of a CPU's own `send_stop`/`crash_stop` (thread context, a job): 1 in 2
    /// calls sleep the configured delay, as if the host took the caller off its core there,
    /// so another caller's stop catches it before it parks itself.
    #[inline(always)]
    pub(crate) fn stop_call_delay(&self) {
        if !self.armed() {
            return;
        }
        let ns = self.stop_call_delay_ns.load(Ordering::Relaxed);
        if ns > 0 && self.one_in(2) {
            self.stop_calls_delayed.fetch_add(1, Ordering::Relaxed);
            nap(ns);
        }
    }

    /// The one-shot boot delay of `cpu`'s next bring-up, taken.
    pub(crate) fn take_boot_delay(&self, cpu: CpuId) -> Option<Duration> {
        if !self.armed() {
            return None;
        }
        let ns = self.boot_delay_ns.get(cpu)?.swap(0, Ordering::AcqRel);
        (ns > 0).then(|| {
            self.boot_delayed.fetch_add(1, Ordering::Relaxed);
            Duration::from_nanos(ns)
        })
    }

    // Setters, used by the public `Faults` (feature only).

    fn arm(&self) {
        self.any.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_seed(&self, seed: u64) {
        self.rng.store(seed, Ordering::Relaxed);
    }

    /// The stop receiver's check before `stop/parkable.rs`: park a CPU wherever the stop finds
    /// it, inside the C library too. Async-signal-safe.
    #[inline(always)]
    pub(crate) fn parks_in_libc(&self) -> bool {
        self.armed() && self.park_in_libc.load(Ordering::Relaxed)
    }

    pub(crate) fn set_park_in_libc(&self, on: bool) {
        self.arm();
        self.park_in_libc.store(on, Ordering::Relaxed);
    }

    pub(crate) fn set_broken(&self, b: Broken, on: bool) {
        self.arm();
        if on {
            self.broken.fetch_or(b.bit(), Ordering::Relaxed);
        } else {
            self.broken.fetch_and(!b.bit(), Ordering::Relaxed);
        }
    }

    pub(crate) fn set_doorbell_delay(&self, max: Duration) {
        self.arm();
        self.doorbell_delay_ns.store(
            max.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub(crate) fn set_doorbell_drop(&self, one_in: u32) {
        self.arm();
        self.doorbell_drop_one_in.store(one_in, Ordering::Relaxed);
    }

    pub(crate) fn set_preempt(&self, one_in: u32, max_sleep: Duration) {
        self.arm();
        self.preempt_max_ns.store(
            max_sleep.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        self.preempt_one_in.store(one_in, Ordering::Relaxed);
    }

    pub(crate) fn set_stop_call_delay(&self, delay: Duration) {
        self.arm();
        self.stop_call_delay_ns.store(
            delay.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub(crate) fn set_boot_delay(&self, cpu: CpuId, delay: Duration) {
        self.arm();
        if let Some(w) = self.boot_delay_ns.get(cpu) {
            w.store(
                delay.as_nanos().clamp(1, u64::MAX as u128) as u64,
                Ordering::Release,
            );
        }
    }

    pub(crate) fn counters(&self) -> FaultCounters {
        FaultCounters {
            doorbells_delayed: self.delayed.load(Ordering::Relaxed),
            doorbells_dropped: self.dropped.load(Ordering::Relaxed),
            preemptions: self.preempted.load(Ordering::Relaxed),
            boot_delays: self.boot_delayed.load(Ordering::Relaxed),
            stop_calls_delayed: self.stop_calls_delayed.load(Ordering::Relaxed),
        }
    }
}

/// Sleeps `ns` with nanosleep (async-signal-safe; std's sleep is a nanosleep loop).
fn nap(ns: u64) {
    if ns > 0 {
        std::thread::sleep(Duration::from_nanos(ns));
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_inert_until_armed_and_follow_their_switches() {
        let f = FaultState::new(2);
        assert!(!f.drop_doorbell());
        assert!(!f.is_broken(Broken::SkipDyingFlush));
        assert_eq!(f.take_boot_delay(1), None);
        f.set_doorbell_drop(1);
        assert!(f.drop_doorbell(), "1 in 1 drops every doorbell");
        f.set_broken(Broken::StopWithoutRetries, true);
        assert!(f.is_broken(Broken::StopWithoutRetries));
        assert!(!f.is_broken(Broken::SkipDyingFlush));
        f.set_broken(Broken::StopWithoutRetries, false);
        assert!(!f.is_broken(Broken::StopWithoutRetries));
        f.set_boot_delay(1, Duration::from_millis(3));
        assert_eq!(f.take_boot_delay(1), Some(Duration::from_millis(3)));
        assert_eq!(f.take_boot_delay(1), None, "one-shot");
        assert_eq!(f.counters().doorbells_dropped, 1);
        assert_eq!(f.counters().boot_delays, 1);
    }

    #[test]
    fn a_seed_gives_the_same_drop_pattern() {
        let run = |seed| {
            let f = FaultState::new(1);
            f.set_seed(seed);
            f.set_doorbell_drop(3);
            (0..64).map(|_| f.drop_doorbell()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let hits = run(7).iter().filter(|&&d| d).count();
        assert!((8..=40).contains(&hits), "about 1 in 3 of 64, got {hits}");
    }
}
