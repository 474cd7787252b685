//! The NMI: a second real-time signal whose handler runs even when the CPU has irqs
//! soft-masked. Senders set a reason bit in the target's `nmi_pending` word, then signal it;
//! the handler takes all bits at once.
//!
//! Upper layers (the stop routine) register a hook here instead of this module calling up.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::signal::{self, SavedRegs};
use crate::cpu::events::EventKind;
use crate::cpu::state::CpuState;

use super::layer::{current, IpiLayer};

/// Why an NMI was sent (bits of the pending word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum NmiReason {
    /// Sample the interrupted instruction pointer (`trigger_all_cpu_backtrace`).
    Backtrace = 1,
    /// The stop routine's NMI attempt.
    Stop = 2,
}

/// The stop receiver an upper layer registers. Runs on the CPU's own thread, in IPI or NMI
/// (signal-handler) context, with the interrupted thread's `ucontext` (null when not
/// interrupted by a signal) and whether the interrupted point is safe to leave for good (the
/// idle loop: not in a job, irqs not masked). It finds its own layer's state through its own
/// thread-local. Returns true if the CPU is now stopped: the caller must not run anything more.
pub(crate) type NmiHook = fn(&CpuState, *const libc::c_void, bool) -> bool;

/// Hooks per reason (function pointers stored as usize; 0 = none).
pub(crate) struct NmiHooks {
    stop: AtomicUsize,
}

impl NmiHooks {
    pub(crate) fn new() -> Self {
        Self {
            stop: AtomicUsize::new(0),
        }
    }

    /// Registers the stop receiver (for [`NmiReason::Stop`] and the stop vector).
    pub(crate) fn set_stop(&self, hook: NmiHook) {
        self.stop.store(hook as usize, Ordering::Release);
    }

    /// Calls the stop receiver, if registered. Async-signal-safe.
    pub(crate) fn call_stop(&self, cpu: &CpuState, uc: *const libc::c_void, safe: bool) -> bool {
        let h = self.stop.load(Ordering::Acquire);
        if h == 0 {
            return false;
        }
        // SAFETY: the only values stored are 0 or an `NmiHook` (see `set_stop`).
        let hook: NmiHook = unsafe { std::mem::transmute::<usize, NmiHook>(h) };
        hook(cpu, uc, safe)
    }
}

/// Sets `reason` on `cpu` and signals it (unless an NMI is already pending there).
/// Async-signal-safe. Returns false if the CPU has no thread to signal.
pub(crate) fn send(shared: &IpiLayer, cpu: &CpuState, reason: NmiReason) -> bool {
    let me = shared.ipi_cpu(cpu.id());
    let prev = me.post_nmi(reason as u64);
    if prev != 0 {
        return true; // coalesced with an NMI in flight
    }
    let tid = cpu.identity().tid();
    if tid == 0 || signal::tgkill(tid, shared.signals.nmi).is_err() {
        // Nothing will take the bit: clear it, or every later NMI would think one is in flight.
        me.withdraw_nmi(reason as u64);
        return false;
    }
    true
}

pub(crate) extern "C" fn nmi_handler(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let saved = nix::errno::Errno::last_raw();
    if let Some((shared, cpu)) = current() {
        let me = shared.ipi_cpu(cpu.id());
        me.enter_handler();
        let bits = me.take_nmi();
        cpu.stats().nmis.fetch_add(1, Ordering::Relaxed);
        cpu.ring().record(EventKind::Nmi, bits, 0);
        if bits & NmiReason::Backtrace as u64 != 0 {
            // SAFETY: `uc` is the ucontext the kernel passed to this SA_SIGINFO handler.
            let regs = unsafe { SavedRegs::from_ucontext(uc) };
            me.set_last_ip(regs.ip);
        }
        if bits & NmiReason::Stop as u64 != 0 {
            let safe = !cpu.jobs().in_job_code() && !me.irq().masked();
            shared.nmi_hooks.call_stop(cpu, uc, safe);
        }
        me.leave_handler();
    }
    nix::errno::Errno::set_raw(saved);
}
