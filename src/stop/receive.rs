//! The receiving side of a stop: save registers if it is a crash, leave the online mask (the
//! acknowledgement the stopping CPU waits for), and park by the runtime's policy.
//!
//! Park policies (`ParkPolicy`):
//! - `Spin`: the CPU stays parked in this image, irqs masked, asleep on its park word
//!   (the spin-table `cpu_park_loop`). The next image cannot use it.
//! - `PowerOff`: the thread ends and its core is free (PSCI `CPU_OFF`). This is only possible
//!   when the stop caught the CPU at a safe point, its idle loop: the handler then returns into
//!   the idle loop, which leaves at once. A CPU stopped inside a job or with irqs masked cannot
//!   leave the interrupted code without running it (unwinding out of a signal handler is not
//!   sound), so it parks as with `Spin` and is reported lost. The exception is a CPU whose job
//!   was inside its own `send_stop`/`crash_stop`: the runtime's teardown resumes it into that
//!   call, which unwinds the job, and its thread leaves (`percpu.rs` step 4).

use crate::cpu::events::EventKind;
use crate::cpu::state::{CpuRunState, CpuState};
use crate::ipi::signal::SavedRegs;

use super::layer::StopLayer;

/// How a stopped CPU parks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ParkPolicy {
    /// Stay parked in this image (lost to the next one).
    Spin,
    /// End the thread so the next image can bring the CPU up (needs a safe point).
    #[default]
    PowerOff,
}

/// The stop receiver (registered as the NMI/vector stop hook, `ipi::nmi::NmiHook`), on `st`'s
/// own thread. Async-signal-safe. `uc`: the interrupted context (null if not interrupted by a
/// signal); `safe`: the interrupted point is the idle loop. Returns true (the CPU is stopped)
/// unless it was not a CPU of a stopping runtime or it declined because it was inside the C
/// library (`parkable.rs`; the stopping CPU sends the stop again).
pub(crate) fn stop_this_cpu(st: &CpuState, uc: *const libc::c_void, safe: bool) -> bool {
    if st.is_stopped() {
        return true;
    }
    let Some(shared) = super::layer::current() else {
        return false;
    };
    let crash = shared.stop.coord.is_crash();
    let here = 0u8;
    // Not at a safe point and inside the C library (parkable.rs step 2): parked here, the CPU
    // could hold a malloc arena or loader lock for good. Decline; the stopping CPU sends again.
    let in_libc = !safe && !shared.machine().faults().parks_in_libc() && {
        // SAFETY: `uc` is null or the live ucontext of the handler we are running in.
        unsafe { super::parkable::holds_foreign_locks(uc) }
    };
    if in_libc {
        shared.stop_cpu(st.id()).defer();
        // SAFETY: as above; a non-null `uc` is this handler's live ucontext.
        let ip = unsafe { SavedRegs::from_ucontext(uc) }.ip;
        st.ring().record(EventKind::StopDeferred, 0, ip);
        return false;
    }
    let regs = if !crash {
        SavedRegs::default()
    } else if uc.is_null() {
        // Taken from the idle loop's poller, not by a signal: there is no interrupted context;
        // record where the CPU was (this function, on the idle loop's stack).
        SavedRegs {
            ip: stop_this_cpu as *const () as u64,
            sp: &here as *const u8 as u64,
            fp: 0,
        }
    } else {
        // SAFETY: a non-null `uc` is the live ucontext of the handler we are running in.
        unsafe { SavedRegs::from_ucontext(uc) }
    };
    park(shared, st, crash, regs, safe, false)
}

/// Records the note, leaves the online mask, and parks or powers off. With `unwind` (a job
/// that called `send_stop`/`crash_stop` and lost), powering off unwinds the job instead of
/// returning into it.
pub(crate) fn park(
    shared: &StopLayer,
    st: &CpuState,
    crash: bool,
    regs: SavedRegs,
    safe: bool,
    unwind: bool,
) -> bool {
    let me = shared.stop_cpu(st.id());
    if me.is_powered_off() {
        // A stop parked this CPU inside its own stop call, the teardown released it, and the
        // call went on to park itself (percpu.rs step 4): it has acknowledged already; leave.
        power_off_now(shared, st, unwind);
        return true;
    }
    if crash {
        me.save_crash_regs(regs);
    }
    let power_off = shared.park == ParkPolicy::PowerOff && safe;
    st.set_run_state(if power_off {
        CpuRunState::PoweredOff
    } else {
        CpuRunState::Parked
    });
    st.ring().record(EventKind::Stopped, crash as u64, regs.ip);
    // The acknowledgement: leaving the online mask (after the note, which it publishes).
    shared.machine().active().clear(st.id());
    shared.machine().online().clear(st.id());
    shared.stop.ack();
    if power_off {
        power_off_now(shared, st, unwind);
        return true;
    }
    // Parked, irqs masked, asleep. Unbounded by design: a parked CPU never runs again in this
    // image; only the runtime's teardown releases it, and only a safe one can then leave: the
    // idle loop, a job that opted in (`fault::resume_on_release`), or the CPU's own stop call
    // interrupted directly (no other handler of ours in between, which could be a callback).
    let in_own_call = me.in_stop_call() && shared.ipi().ipi_cpu(st.id()).handlers_active() <= 1;
    let depth = shared.ipi().ipi_cpu(st.id()).irq().mask_for_park();
    me.wait_for_release(safe || st.jobs().resume_on_release() || in_own_call);
    shared.ipi().ipi_cpu(st.id()).irq().restore_depth(depth);
    st.set_run_state(CpuRunState::PoweredOff);
    power_off_now(shared, st, unwind);
    true
}

fn power_off_now(shared: &StopLayer, st: &CpuState, unwind: bool) {
    shared.stop_cpu(st.id()).set_powered_off();
    st.mark_exit();
    // A restarted idle futex wait must see a changed word and re-check `exit_req`.
    st.idle().reset_running();
    if unwind {
        // Thread context (a job), not a signal handler: unwind the job to the CPU loop, which
        // then exits. The job's handle reports this message. The job's irq flags are never
        // restored, so unmask here for the loop's exit path.
        shared.ipi().ipi_cpu(st.id()).irq().restore_depth(0);
        std::panic::resume_unwind(Box::new("CPU parked: another CPU is stopping the system"));
    }
}
