//! The IPI signal handler and the queue flush (the kernel's
//! `generic_smp_call_function_single_interrupt` and `flush_smp_call_function_queue`).
//!
//! Everything here runs in signal-handler context or with irqs soft-masked: atomics and
//! preallocated memory only.

use std::sync::atomic::{compiler_fence, Ordering};

use super::signal::{self, Signals};
use super::IpiError;
use crate::cpu::call_queue::{Links, EMPTY};
use crate::cpu::events::EventKind;
use crate::cpu::state::CpuState;

use super::layer::{current, IpiLayer};

/// Installs the IPI and NMI handlers (once per process and signal).
pub(crate) fn install(sigs: &Signals) -> Result<(), IpiError> {
    super::fatal::install_hook();
    let ipi = signal::install(sigs.ipi, ipi_handler, &[])?;
    // The NMI blocks the IPI while it runs: a CPU parked inside the NMI handler has irqs off.
    // All or nothing: if the NMI cannot be ours, the IPI signal goes back to what it was.
    if let Err(e) = signal::install(sigs.nmi, super::nmi::nmi_handler, &[sigs.ipi]) {
        signal::uninstall(sigs.ipi, ipi);
        return Err(e);
    }
    Ok(())
}

/// Whether the IPI signal's handler is still ours. Async-signal-safe.
pub(crate) fn ipi_handler_installed(sigs: &Signals) -> bool {
    signal::is_installed(sigs.ipi, ipi_handler)
}

/// Whether the NMI signal's handler is still ours. Async-signal-safe.
pub(crate) fn nmi_handler_installed(sigs: &Signals) -> bool {
    signal::is_installed(sigs.nmi, super::nmi::nmi_handler)
}

/// The runtime's signals (IPI, then NMI) whose handler is no longer usmp's: another library
/// replaced it after `build()`. For reports after a CPU did not answer (thread context).
pub(crate) fn replaced_signals(shared: &IpiLayer) -> Vec<i32> {
    let s = &shared.signals;
    let mut v = Vec::new();
    if !ipi_handler_installed(s) {
        v.push(s.ipi);
    }
    if !nmi_handler_installed(s) {
        v.push(s.nmi);
    }
    v
}

/// The doorbell's handler. Async-signal-safe.
extern "C" fn ipi_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // A handler leaves errno as it found it: the interrupted code may be about to read it.
    let saved = nix::errno::Errno::last_raw();
    if let Some((shared, cpu)) = current() {
        let me = shared.ipi_cpu(cpu.id());
        me.enter_handler();
        // Clear before draining: a sender that sets it after this sees its request drained or
        // rings again (idle.rs protocol step 2).
        me.take_kick_pending();
        cpu.stats().irqs.fetch_add(1, Ordering::Relaxed);
        if me.irq().masked() {
            me.irq().defer();
            cpu.stats().deferred.fetch_add(1, Ordering::Relaxed);
        } else {
            let safe = !cpu.jobs().in_job_code();
            me.irq().mask_in_handler();
            compiler_fence(Ordering::SeqCst);
            if !take_vectors(shared, cpu, uc, safe) {
                flush_queue(shared, cpu);
            }
            compiler_fence(Ordering::SeqCst);
            me.irq().unmask_in_handler();
        }
        me.leave_handler();
    }
    nix::errno::Errno::set_raw(saved);
}

/// Takes the dedicated vectors (the stop vector) before the call queue. Returns true if the
/// CPU is now stopped, in which case nothing more may run here. `safe`: the interrupted point
/// is the idle loop, which a powered-off CPU may return to and leave for good.
/// Async-signal-safe.
pub(crate) fn take_vectors(
    shared: &IpiLayer,
    cpu: &CpuState,
    uc: *const libc::c_void,
    safe: bool,
) -> bool {
    if cpu.is_stopped() {
        return true;
    }
    let v = shared.ipi_cpu(cpu.id()).take_vectors();
    if v & super::call::VECTOR_STOP != 0 {
        return shared.nmi_hooks.call_stop(cpu, uc, safe);
    }
    false
}

/// The soft irq mask's replay (`irq.rs` step 3): on the calling CPU, irqs masked, take the
/// vectors and then the queue, as the handler does. `None`: the CPU is now stopped.
/// Async-signal-safe as far as the callbacks are.
pub(super) fn replay_deferred(shared: &IpiLayer, cpu: &CpuState, safe: bool) -> Option<usize> {
    if take_vectors(shared, cpu, std::ptr::null(), safe) {
        return None;
    }
    Some(flush_queue(shared, cpu))
}

/// Runs every call queued on `cpu` (the caller is that CPU, irqs masked). A call found on a CPU
/// that is not online is reported as "IPI on offline CPU" (seed 002) and still run exactly once.
/// Returns how many callbacks ran.
pub(crate) fn flush_queue(shared: &IpiLayer, cpu: &CpuState) -> usize {
    let h = cpu.queue().take_all(&shared.pool);
    if h == EMPTY {
        return 0;
    }
    let offline = !shared.machine().online().contains(cpu.id());
    run_list(shared, cpu, h, offline)
}

/// The dying step (`smpcfd_dying_cpu`): close the queue so no sender can add to it, and run
/// everything it held, whether or not its doorbell has arrived. No offline warning: the caller
/// knows the CPU is going away.
pub(crate) fn close_and_flush(shared: &IpiLayer, cpu: &CpuState) -> usize {
    let h = cpu.queue().close(&shared.pool);
    run_list(shared, cpu, h, false)
}

fn run_list(shared: &IpiLayer, cpu: &CpuState, mut h: u32, warn_offline: bool) -> usize {
    let mut n = 0;
    // The slots this flush frees go back to the pool together when it ends (csd.rs step 6).
    let mut freed = shared.pool.batch();
    while h != EMPTY {
        // Read the link first: once the callback is done the slot may be freed and reused.
        let next = shared.pool.next(h).load(Ordering::Relaxed);
        // The ids sit on the slot's second line, which the sender spins on: read them only for
        // the event log, or every polled call pays one more line transfer (csd.rs).
        let (sender, id) = if warn_offline || cpu.ring().is_enabled() {
            let slot = shared.pool.slot(h);
            (
                slot.sender.load(Ordering::Relaxed),
                slot.id.load(Ordering::Relaxed),
            )
        } else {
            (0, 0)
        };
        if warn_offline {
            cpu.offline_name().store(shared.pool.name(h));
            shared.totals.ipi_on_offline.fetch_add(1, Ordering::Relaxed);
            cpu.ring().record(EventKind::OfflineIpi, id, 0);
        }
        shared.machine().faults().preempt_point();
        let g = super::fatal::enter(cpu.id(), "IPI callback", shared.pool.name(h));
        let ran = shared.pool.run(h, &mut freed);
        g.returned();
        if ran {
            n += 1;
            cpu.stats().calls_handled.fetch_add(1, Ordering::Relaxed);
            shared.totals.handled.fetch_add(1, Ordering::Relaxed);
            cpu.ring().record(EventKind::IpiHandle, sender, id);
        }
        h = next;
    }
    n
}
