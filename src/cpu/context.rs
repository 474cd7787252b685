//! "Which CPU am I?" and the soft irq mask.
//!
//! A logical CPU's thread (and every signal handler that interrupts it) finds its CPU through a
//! const-initialised thread-local pointer: no lazy initialisation, no destructor, so reading it
//! is a plain TLS load and safe in a signal handler. Several runtimes can coexist because each
//! thread points at its own runtime's state. The pointer names only this layer's [`Machine`];
//! a layer above that needs its own part keeps its own such pointer, set together with this
//! one (`ipi::layer::set_current`, `stop::layer::set_current`).
//!
//! The soft irq mask (`irq_save`/`irq_restore`, powerpc's lazy masking): masking sets a per-CPU
//! flag; an IPI handler that finds the flag set records "pending" and returns; the outermost
//! `irq_restore` replays what was deferred. Only the CPU's own thread and its handlers touch the
//! flag, so Relaxed atomics plus a compiler fence (the C `atomic_signal_fence`) order it. The
//! replay runs the IPI layer's hook (`Machine::irq_replay`): this layer does not know IPIs.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, Ordering};

use super::events::EventKind;
use super::machine::Machine;
use super::mask::CpuId;
use super::state::CpuState;

thread_local! {
    static CURRENT: Cell<(*const Machine, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Marks the calling thread as logical CPU `cpu` of `machine` (`None` to clear).
///
/// # Safety
/// Until it is cleared, `machine` must stay alive (the CPU thread holds an `Arc` to the
/// runtime that contains it).
pub(crate) unsafe fn set_current(machine: Option<&Machine>, cpu: CpuId) {
    let p = machine.map_or(std::ptr::null(), |m| m as *const Machine);
    CURRENT.with(|c| c.set((p, cpu)));
}

/// The calling thread's machine and CPU, if it is a logical CPU. Async-signal-safe.
#[inline]
pub(crate) fn current() -> Option<(&'static Machine, &'static CpuState)> {
    let (p, cpu) = CURRENT.with(|c| c.get());
    if p.is_null() {
        return None;
    }
    // SAFETY: `set_current`'s contract keeps the machine alive while the pointer is set, and the
    // pointer is cleared before the thread drops its Arc. The 'static lifetime never escapes the
    // thread: callers use it within the current call.
    let machine: &'static Machine = unsafe { &*p };
    Some((machine, &machine.cpus[cpu]))
}

/// The logical CPU the caller runs on, or `None` on a thread outside any runtime.
/// Async-signal-safe.
#[inline]
pub fn this_cpu() -> Option<CpuId> {
    let (p, cpu) = CURRENT.with(|c| c.get());
    (!p.is_null()).then_some(cpu)
}

/// A busy-wait hint (`cpu_relax()`): `PAUSE` on x86, `YIELD` on arm.
#[inline]
pub fn cpu_relax() {
    std::hint::spin_loop();
}

/// The state `irq_save` found, to hand back to `irq_restore` (like the kernel's `flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "pass the flags to irq_restore"]
pub struct IrqFlags {
    was_masked: bool,
}

/// Soft-masks IPIs on the calling CPU and returns the previous state. Nestable. On a thread
/// outside the runtime it does nothing. Async-signal-safe.
#[inline]
pub fn irq_save() -> IrqFlags {
    match current() {
        Some((shared, cpu)) => {
            // A load and a store, not a locked swap (~20 cycles on x86, most of this function):
            // only this thread and its own handlers write the word. A handler that interrupts
            // between the two sees the old value, unmasked, handles its IPI in full and leaves
            // the word as it found it, so the store that follows is still right.
            let was = cpu.irq_depth.load(Ordering::Relaxed) != 0;
            if !was {
                cpu.irq_depth.store(1, Ordering::Relaxed);
            }
            compiler_fence(Ordering::SeqCst);
            if !was && shared.irq_accounting {
                cpu.masked_since
                    .store(super::clock::now_ns(), Ordering::Relaxed);
                cpu.ring.record(EventKind::IrqOff, 0, 0);
            }
            IrqFlags { was_masked: was }
        }
        None => IrqFlags { was_masked: false },
    }
}

/// Restores the state `irq_save` returned; the outermost restore runs the IPIs that arrived
/// while masked. Async-signal-safe as far as the deferred callbacks are.
#[inline]
pub fn irq_restore(flags: IrqFlags) {
    if flags.was_masked {
        return;
    }
    if let Some((shared, cpu)) = current() {
        if shared.irq_accounting {
            let ns =
                super::clock::now_ns().saturating_sub(cpu.masked_since.load(Ordering::Relaxed));
            cpu.stats.masked_ns.fetch_add(ns, Ordering::Relaxed);
            cpu.ring.record(EventKind::IrqOn, ns, 0);
        }
        cpu.irq_depth.store(0, Ordering::Relaxed);
        // The unmask before the pending check: a handler that ran before the unmask set
        // `pending`; one that runs after it sees the unmasked flag and handles the IPI itself.
        compiler_fence(Ordering::SeqCst);
        if cpu.irq_pending.load(Ordering::Relaxed) {
            replay(shared, cpu);
        }
    }
}

/// Unmasks irqs on the calling CPU if something left them masked (a job that panicked between
/// `irq_save` and `irq_restore`, or returned without restoring), replaying what was deferred.
/// Returns whether they were masked. Thread context, between jobs.
pub(crate) fn irq_unmask_after_job() -> bool {
    if irqs_disabled() {
        irq_restore(IrqFlags { was_masked: false });
        true
    } else {
        false
    }
}

/// Whether the calling CPU has irqs soft-masked (false outside the runtime).
#[inline]
pub fn irqs_disabled() -> bool {
    current().is_some_and(|(_, c)| c.irq_depth.load(Ordering::Relaxed) != 0)
}

#[cold]
fn replay(shared: &Machine, cpu: &CpuState) {
    let mut n = 0;
    let safe = !cpu.jobs().in_job_code();
    while cpu.irq_pending.swap(false, Ordering::Relaxed) {
        cpu.irq_depth.store(1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        let Some(ran) = shared.irq_replay(cpu, safe) else {
            // The CPU is now stopped: nothing more runs here.
            cpu.irq_depth.store(0, Ordering::Relaxed);
            return;
        };
        n += ran;
        compiler_fence(Ordering::SeqCst);
        cpu.irq_depth.store(0, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }
    cpu.ring.record(EventKind::IrqReplay, n as u64, 0);
}
