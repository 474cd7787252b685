//! `usmp::fault::Faults`: the public switches of the fault injector (feature
//! `fault-injection`). The state and the hooks the protocols read are in `src/inject.rs`.

use std::time::Duration;

use super::rt::Handle;
use crate::cpu::mask::CpuId;
use crate::hotplug::HotplugError;
use crate::inject::{Broken, FaultCounters};

/// The fault injector of one runtime, from [`Handle::faults`]. Every switch is off at build;
/// a switch stays as set until changed (boot delays and step failures are one-shot).
///
/// ```
/// use usmp::fault::Broken;
/// let rt = usmp::Builder::new().cpus(2).build()?;
/// rt.faults().set_seed(42);
/// rt.faults().set_doorbell_drop(2); // about every other doorbell signal is lost
/// // A synchronous sender re-rings while it waits, so the call still completes.
/// for _ in 0..20 {
///     rt.call_single(1, || {}, true)?;
/// }
/// assert!(!rt.faults().is_broken(Broken::SkipDyingFlush));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Faults<'a> {
    h: &'a Handle,
}

impl Handle {
    /// The fault injector (feature `fault-injection`): delays and drops doorbells, slows
    /// bring-ups, preempts CPU threads, fails hotplug steps and breaks protocols on purpose.
    pub fn faults(&self) -> Faults<'_> {
        Faults { h: self }
    }
}

impl Faults<'_> {
    /// Seeds the injector's random choices (drops, delays, preemption), so a run can be
    /// replayed. Reproducible up to the order in which the threads draw.
    pub fn set_seed(&self, seed: u64) {
        self.h.shared.machine().faults().set_seed(seed);
    }

    /// Every sender waits a random time in `0..=max` between queueing a call and ringing its
    /// doorbell (`Duration::ZERO` turns it off).
    pub fn set_doorbell_delay(&self, max: Duration) {
        self.h.shared.machine().faults().set_doorbell_delay(max);
    }

    /// Drops one in `one_in` doorbell signals (0 turns it off), as if the kernel had lost them.
    /// A synchronous sender re-rings every millisecond while it waits; an asynchronous call to
    /// a CPU busy in a long job waits for its next idle loop.
    pub fn set_doorbell_drop(&self, one_in: u32) {
        self.h.shared.machine().faults().set_doorbell_drop(one_in);
    }

    /// Host-level preemption: at one in `one_in` of their serve points (each idle-loop turn and
    /// each callback), CPU threads yield or sleep up to `max_sleep` (0 turns it off).
    pub fn set_preempt(&self, one_in: u32, max_sleep: Duration) {
        self.h
            .shared
            .machine()
            .faults()
            .set_preempt(one_in, max_sleep);
    }

    /// A CPU whose job calls `send_stop`/`crash_stop` sleeps `delay` at the call's entry, one
    /// call in two (0 turns it off): another caller's stop then catches it inside its own call.
    pub fn set_stop_call_delay(&self, delay: Duration) {
        self.h.shared.machine().faults().set_stop_call_delay(delay);
    }

    /// The next bring-up of `cpu` sleeps `delay` before its ALIVE step: a slow AP (seed 003).
    pub fn set_boot_delay(&self, cpu: CpuId, delay: Duration) -> Result<(), HotplugError> {
        self.h.shared.hotplug().inject_boot_delay(cpu, delay)
    }

    /// The kernel's `st->fail`: the next time hotplug step `step` runs on `cpu`, in either
    /// direction, it fails instead (and is rolled back). See [`Handle::hotplug_steps`].
    pub fn fail_step(&self, cpu: CpuId, step: &str) -> Result<(), HotplugError> {
        self.h.shared.hotplug().inject_step_failure(cpu, step)
    }

    /// Switches protocol variant `b` to its broken form (`true`) or back.
    pub fn set_broken(&self, b: Broken, on: bool) {
        self.h.shared.machine().faults().set_broken(b, on);
    }

    /// A stop parks a CPU wherever it finds it, inside the C library too (the receiver before
    /// `stop/parkable.rs`). Not a `Broken` variant: what it breaks is a process-wide hang (a CPU
    /// parked holding a malloc arena lock), which only a test that runs alone in its process
    /// can observe (`tests/stop_in_libc.rs`), not `usmp stress`.
    pub fn set_park_in_libc(&self, on: bool) {
        self.h.shared.machine().faults().set_park_in_libc(on);
    }

    /// Whether protocol variant `b` is broken now.
    pub fn is_broken(&self, b: Broken) -> bool {
        self.h.shared.machine().faults().is_broken(b)
    }

    /// What the injector has done so far.
    pub fn counters(&self) -> FaultCounters {
        self.h.shared.machine().faults().counters()
    }
}

/// Test harnesses only: the calling job (on a logical CPU) declares that if a stop parks its
/// CPU inside it, the runtime's teardown may resume it when it releases parked CPUs, and
/// that it will then return at once without touching the runtime (its CPU is powered off).
/// Without it such a thread never leaves (by design: see `ParkPolicy`). Cleared when the job
/// ends, and when it calls `send_stop`/`crash_stop`: inside its own stop call the runtime
/// resumes it anyway, and it unwinds the job from there. Returns false (and does nothing) on a
/// thread that is not a logical CPU.
pub fn resume_on_release() -> bool {
    match crate::cpu::context::current() {
        Some((_, st)) => {
            st.jobs().set_resume_on_release(true);
            true
        }
        None => false,
    }
}

/// Blocks (`true`) or unblocks both of its runtime's signals on the calling logical CPU, making
/// it "wedged": not even the NMI reaches it. Returns false (and does nothing) on a thread that
/// is not a logical CPU. Call it from a job; unblock before the job returns if the CPU is to
/// work normally again.
pub fn wedge_this_cpu(block: bool) -> bool {
    crate::ipi::signal::wedge_this_cpu(block)
}
