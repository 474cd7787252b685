//! "Which CPU am I?": the thread-local CPU.
//!
//! A logical CPU's thread (and every signal handler that interrupts it) finds its CPU through a
//! const-initialised thread-local pointer: no lazy initialisation, no destructor, so reading it
//! is a plain TLS load and safe in a signal handler. Several runtimes can coexist because each
//! thread points at its own runtime's state. The pointer names only this layer's [`Machine`];
//! a layer above that needs its own part keeps its own such pointer, set together with this
//! one.

use std::cell::Cell;

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
