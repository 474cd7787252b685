//! What runs on the CPU itself: the AP half of the handshake, the STARTING steps, the single
//! ONLINE step, the DYING steps inside stop_machine, and the thread's exit.

use std::sync::atomic::Ordering;

use super::handshake::HsState;
use super::layer::HotplugLayer;
use super::states::{Kind, Step, StepId};
use crate::cpu::events::EventKind;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::state::{CpuRunState, CpuState};
use crate::cpu::wait::{Deadline, Policy, Waiter};
use crate::inject::Broken;
use crate::ipi::irq::{irq_restore, irq_save};
use crate::ipi::layer::current;

/// Where an injected failure hits the part of the table that runs on the CPU itself.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ApFail {
    #[default]
    None,
    /// User STARTING step k (startup on the way up, DYING teardown on the way down).
    Step(usize),
    /// `ap:online`: up, after the STARTING steps; down, before the DYING steps.
    ApOnline,
    /// `bringup:cpu` on the way down: after the DYING steps, before going offline.
    Bringup,
}

/// `take_cpu_down`'s code when it ran on a thread that is not a CPU of this runtime.
pub(crate) const NOT_A_CPU: i32 = -1;

impl ApFail {
    /// The error code `take_cpu_down` returns for it through stop_machine (whose functions
    /// return an `i32`, as the kernel's do). [`ApFail::from_code`] is its inverse.
    pub(crate) fn code(self) -> i32 {
        match self {
            ApFail::Step(k) => k as i32,
            ApFail::ApOnline => -2,
            ApFail::Bringup => -3,
            ApFail::None => NOT_A_CPU,
        }
    }

    /// The failure `code` stands for; `None` for a code `take_cpu_down` does not return.
    pub(crate) fn from_code(code: i32) -> Option<ApFail> {
        match code {
            -2 => Some(ApFail::ApOnline),
            -3 => Some(ApFail::Bringup),
            k if k >= 0 => Some(ApFail::Step(k as usize)),
            _ => None,
        }
    }

    /// The step that failed, in a plan whose STARTING steps are `plan.steps`.
    pub(crate) fn step(self, plan: &ApPlan) -> Option<StepId> {
        match self {
            ApFail::Step(k) => plan.steps.get(k).map(Step::id),
            ApFail::ApOnline => Some(StepId::ApOnline),
            ApFail::Bringup => Some(StepId::Bringup),
            ApFail::None => None,
        }
    }
}

/// The STARTING steps the AP runs, and which one an injected failure hits.
#[derive(Default, Clone)]
pub(crate) struct ApPlan {
    pub steps: Vec<Step>,
    pub fail: ApFail,
}

fn startup(step: &Step, cpu: usize) -> super::StepResult {
    match &step.kind {
        Kind::User {
            startup: Some(f), ..
        } => crate::ipi::fatal::run(cpu, "hotplug STARTING step", &step.name, || f(cpu)),
        _ => Ok(()),
    }
}

fn teardown(step: &Step, cpu: usize) -> super::StepResult {
    match &step.kind {
        Kind::User {
            teardown: Some(f), ..
        } => crate::ipi::fatal::run(cpu, "hotplug DYING step", &step.name, || f(cpu)),
        _ => Ok(()),
    }
}

/// The AP's boot hook (runs first on the new thread). False: the thread must exit.
pub(crate) fn ap_boot(shared: &HotplugLayer, st: &CpuState) -> bool {
    let hc = &shared.hotplug.cpus[st.id()];
    if let Some(delay) = shared.machine().faults().take_boot_delay(st.id()) {
        std::thread::sleep(delay); // fault injection: a slow AP
    }
    if shared
        .machine()
        .faults()
        .is_broken(Broken::BringupWithoutCas)
    {
        // Seed 003 before the fix: the AP announces itself with a plain store, whatever the
        // controller decided, and goes on without waiting for a commit.
        hc.handshake.broken_ap_alive();
    } else {
        // Handshake step 2. On failure the controller gave up: touch nothing, just exit.
        if !hc.handshake.ap_alive() {
            return false;
        }
        // Step 5: wait for the controller's commit. Unbounded by design: a controller that
        // sees ALIVE commits (handshake.rs step 3; in a parallel boot once it has kicked every
        // CPU, `hotplug::boot_all`), and it cannot give up on an ALIVE AP.
        let mut w = Waiter::new(Deadline::forever(), Policy::spin(shared.handshake_spin()));
        while !hc.handshake.ap_committed() {
            let _ = hc.handshake.wait_while(HsState::Alive, &mut w);
        }
    }
    // Committed: only now does the AP touch shared state (seed 003's mm_count).
    shared.hotplug.init_mm.fetch_add(1, Ordering::AcqRel);
    hc.has_ref.store(true, Ordering::Release);
    shared.ipi().reset_cpu_irq_state(st.id());
    let plan = hc.plan.lock_unpoisoned().take().unwrap_or_default();
    let fl = irq_save();
    let n = plan.steps.len();
    for k in 0..=n {
        // k == n is ap:online itself, which can only fail by injection.
        let r = if plan.fail == ApFail::Step(k) || (k == n && plan.fail == ApFail::ApOnline) {
            Err("injected failure")
        } else if k == n {
            Ok(())
        } else {
            startup(&plan.steps[k], st.id())
        };
        if let Err(reason) = r {
            let failed = plan.steps.get(k).map_or(StepId::ApOnline, Step::id);
            for done in plan.steps[..k].iter().rev() {
                if let Err(e) = teardown(done, st.id()) {
                    tracing::error!(
                        "cpuhp: CPU{} rollback of {} failed: {e}",
                        st.id(),
                        done.name
                    );
                }
            }
            *hc.ap_failed.lock_unpoisoned() = Some((failed, reason));
            irq_restore(fl);
            hc.handshake.ap_report(HsState::Failed);
            return false;
        }
        st.ring().record(EventKind::HotplugStep, k as u64, 1);
    }
    // ap:online, one step: open the queue, join the online mask, tell the controller.
    st.queue().reopen();
    shared.machine().online().set(st.id());
    // Deterministic stop (seed 000): the online bit is set (SeqCst) before the flag is read
    // (SeqCst), and a stop sets the flag before it reads the online mask, so either the stop
    // targets this CPU or this CPU sees the flag and parks itself.
    if shared.stop().must_park_coming_online() {
        // Leave the online mask before telling the controller, so that nobody who hears
        // "parked" can still see this CPU online. Parked before taking `ap_failed`'s lock: a
        // stop signal sent while this CPU was online may still arrive, and it must find the
        // CPU stopped (it returns at once) rather than park it for good holding the lock, which
        // the controller takes next.
        shared.machine().online().clear(st.id());
        st.set_run_state(CpuRunState::Parked);
        *hc.ap_failed.lock_unpoisoned() = Some((
            StepId::ApOnline,
            "a stop is in progress: parked instead of going online",
        ));
        hc.handshake.ap_report(HsState::Parked);
        let crash = shared.stop().stop_is_crash();
        let regs = crate::ipi::signal::SavedRegs::default();
        // Thread context, not in a job: a safe point, so power-off returns here and we exit.
        crate::stop::receive::park(shared.stop(), st, crash, regs, true, false);
        irq_restore(fl);
        return false;
    }
    st.set_run_state(CpuRunState::Online);
    hc.handshake.ap_report(HsState::Online);
    irq_restore(fl);
    true
}

/// The thread's exit hook, its very last act: drop the init_mm reference, report DEAD.
pub(crate) fn ap_exit(shared: &HotplugLayer, st: &CpuState) {
    let hc = &shared.hotplug.cpus[st.id()];
    if hc.has_ref.swap(false, Ordering::AcqRel) {
        shared.hotplug.init_mm.fetch_sub(1, Ordering::AcqRel);
    }
    if matches!(
        st.run_state(),
        CpuRunState::Limbo | CpuRunState::Booting | CpuRunState::Online
    ) {
        st.set_run_state(CpuRunState::Offline);
    }
    hc.handshake.ap_exit();
}

/// `take_cpu_down`: runs on the dying CPU inside stop_machine (IPI context). DYING steps in
/// reverse, then offline and the queue flush (seed 002), then the thread is asked to leave its
/// idle loop. On a failed DYING step the steps already torn down are started again, the CPU
/// stays online, and the error code is the index of the failed step in `plan.steps`.
pub(crate) fn take_cpu_down(plan: &ApPlan, cpu: usize) -> Result<(), i32> {
    let Some((shared, st)) = current() else {
        return Err(NOT_A_CPU);
    };
    if plan.fail == ApFail::ApOnline {
        return Err(plan.fail.code());
    }
    for k in (0..plan.steps.len()).rev() {
        let r = if plan.fail == ApFail::Step(k) {
            Err("injected failure")
        } else {
            teardown(&plan.steps[k], cpu)
        };
        if r.is_err() {
            for again in &plan.steps[k + 1..] {
                let _ = startup(again, cpu);
            }
            return Err(ApFail::Step(k).code());
        }
        st.ring().record(EventKind::HotplugStep, k as u64, 0);
    }
    if plan.fail == ApFail::Bringup {
        for again in &plan.steps {
            let _ = startup(again, cpu);
        }
        return Err(plan.fail.code());
    }
    // ap:online teardown: __cpu_disable, then smpcfd_dying_cpu.
    shared.machine().online().clear(cpu);
    shared.machine().active().clear(cpu);
    st.set_run_state(CpuRunState::Dying);
    if !shared.machine().faults().is_broken(Broken::SkipDyingFlush) {
        crate::ipi::handler::close_and_flush(shared, st);
    }
    // Offline: leave the idle loop as soon as the stop ends, as the kernel's dying CPU goes
    // from its stopper to the idle loop and reports itself dead (`cpuhp_report_idle_dead`).
    // Asking here, not from the controller after the stop, saves the thread a sleep and a
    // second wake-up between the stop and its DEAD report.
    st.mark_exit();
    Ok(())
}
