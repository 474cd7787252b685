//! The step engine: walk the step table up or down under the hotplug lock; a failed step
//! rolls back the steps already done, in reverse (rollback itself must not fail: errors there
//! are logged, as the kernel WARNs).
//!
//! Protocol of one operation:
//! 1. Take the hotplug mutex; refuse (state unchanged) if disabled, invalid, already there,
//!    the last online CPU, a kexec's reboot CPU, or in limbo.
//! 2. Up: run startups from step 0. PREPARE steps on this thread; `bringup:cpu` spawns the
//!    thread and does the handshake (`handshake.rs`), during which the AP runs the STARTING
//!    steps and goes online in one step; ONLINE steps run on the CPU as jobs; `sched:active`
//!    opens the CPU to jobs. An image's start walks every CPU in two spans, kicking all before
//!    waiting for any (`boot_all` in `api.rs`).
//! 3. Down: run teardowns from the top. `sched:active` closes the job gate, moves queued jobs to
//!    another online CPU and waits for the running one; ONLINE teardowns run on the CPU;
//!    `ap:online` runs `take_cpu_down` under stop_machine (DYING steps, offline, queue flush,
//!    and the thread asked to leave), then the thread reports DEAD and parks (`parking.rs`),
//!    or ends; PREPARE teardowns run here.
//! 4. On failure at step k, undo steps in the other direction back to where the operation
//!    started, and return `StepFailed` naming k.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ap::ApFail;
use super::layer::HotplugLayer;
use super::states::{Kind, Section, StepId, Table};
use super::HotplugError;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::mask::CpuId;

impl HotplugLayer {
    /// Consumes an injected failure for step `k`, if it targets it.
    pub(super) fn injected(&self, t: &Table, cpu: CpuId, k: usize) -> bool {
        let mut f = self.hotplug.cpus[cpu].fail.lock_unpoisoned();
        if *f == Some(t.steps[k].id()) {
            *f = None;
            true
        } else {
            false
        }
    }

    /// Takes an injected failure aimed at a step that runs on the CPU itself.
    pub(super) fn injected_ap(&self, t: &Table, cpu: CpuId, down: bool) -> ApFail {
        let mut f = self.hotplug.cpus[cpu].fail.lock_unpoisoned();
        let hit = match *f {
            Some(StepId::ApOnline) => ApFail::ApOnline,
            Some(StepId::Bringup) if down => ApFail::Bringup,
            Some(id @ StepId::User(_)) => match t.starting().iter().position(|s| s.id() == id) {
                Some(k) => ApFail::Step(k),
                None => return ApFail::None,
            },
            _ => return ApFail::None,
        };
        *f = None;
        hit
    }

    /// The error for step `k` of `t` failing on `cpu`, logged.
    pub(super) fn failed(
        &self,
        cpu: CpuId,
        t: &Table,
        k: usize,
        up: bool,
        reason: String,
    ) -> HotplugError {
        self.failed_step(cpu, t, t.steps[k].id(), up, &reason)
    }

    /// The error for step `step` failing on `cpu`, logged.
    pub(super) fn failed_step(
        &self,
        cpu: CpuId,
        t: &Table,
        step: StepId,
        up: bool,
        reason: &str,
    ) -> HotplugError {
        let step = t.name_of(step);
        tracing::warn!(
            "cpuhp: CPU{cpu} step {step} failed on the way {}: {reason}",
            if up { "up" } else { "down" }
        );
        HotplugError::StepFailed {
            cpu,
            step,
            up,
            reason: reason.to_string(),
        }
    }

    /// Step 2: startups from `from`; on failure, undo down to `from`.
    pub(super) fn walk_up(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        from: usize,
    ) -> Result<(), HotplugError> {
        self.walk_up_span(t, cpu, from, t.steps.len(), from)
    }

    /// Startups from `from` until at least `to` steps are done; on failure, undo down to
    /// `base` (at most `from`), so an operation that walks in spans rolls back as one.
    pub(super) fn walk_up_span(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        from: usize,
        to: usize,
        base: usize,
    ) -> Result<(), HotplugError> {
        let mut done = from;
        while done < to {
            match self.step_up(t, cpu, done, true) {
                Ok(next) => done = next,
                Err(e) => {
                    self.rollback_down(t, cpu, done, base);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Step 3: teardowns from `from` down to step 0; on failure, redo up to `from`.
    pub(super) fn walk_down(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        from: usize,
    ) -> Result<(), HotplugError> {
        self.walk_down_to(t, cpu, from, 0)
    }

    /// Teardowns from `from` down to `to` (`to` steps stay done); on failure, redo up to
    /// `from`, so the CPU is back where it started.
    pub(super) fn walk_down_to(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        from: usize,
        to: usize,
    ) -> Result<(), HotplugError> {
        let mut done = from;
        while done > to {
            match self.step_down(t, cpu, done - 1, true) {
                Ok(left) => done = left,
                Err(e) => {
                    self.rollback_up(t, cpu, done, from);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Teardowns from `done` down to `to` that must not stop halfway (a rollback, or the
    /// kexec shutdown's last section): a failed step is logged and skipped, as the kernel
    /// WARNs. Returns the last failure.
    pub(super) fn teardown_anyway(
        &self,
        t: &Table,
        cpu: CpuId,
        mut done: usize,
        to: usize,
        inject: bool,
    ) -> Result<(), HotplugError> {
        let mut res = Ok(());
        while done > to {
            match self.step_down(t, cpu, done - 1, inject) {
                Ok(left) => done = left,
                Err(e) => {
                    tracing::error!("cpuhp: CPU{cpu} teardown of step {} failed: {e}", done - 1);
                    res = Err(e);
                    done -= 1;
                }
            }
        }
        res
    }

    pub(super) fn rollback_down(&self, t: &Table, cpu: CpuId, done: usize, to: usize) {
        let _ = self.teardown_anyway(t, cpu, done, to, false);
    }

    pub(super) fn rollback_up(self: &Arc<Self>, t: &Table, cpu: CpuId, mut done: usize, to: usize) {
        while done < to {
            match self.step_up(t, cpu, done, false) {
                Ok(next) => done = next,
                Err(e) => {
                    tracing::error!("cpuhp: CPU{cpu} rollback failed: {e}");
                    done += 1;
                }
            }
        }
    }

    /// Runs startup of step `k`; returns how many steps are done afterwards.
    pub(super) fn step_up(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        k: usize,
        inject: bool,
    ) -> Result<usize, HotplugError> {
        let step = &t.steps[k];
        if inject && step.section != Section::Starting && self.injected(t, cpu, k) {
            return Err(self.failed(cpu, t, k, true, "injected failure".into()));
        }
        let s = self;
        let st = &s.machine().cpus()[cpu];
        match &step.kind {
            Kind::SmpcfdPrepare => {
                self.ipi().smpcfd_prepare(cpu);
                Ok(k + 1)
            }
            Kind::Bringup => self.bringup(t, cpu, inject),
            Kind::ApOnline => Ok(k + 1), // done by the AP inside bring-up
            Kind::SchedActive => {
                st.jobs().set_gate(true);
                s.machine().active().set(cpu);
                Ok(k + 1)
            }
            Kind::User { .. } => self
                .run_user(t, k, cpu, true)
                .map(|_| k + 1)
                .map_err(|r| self.failed(cpu, t, k, true, r)),
        }
    }

    /// Runs teardown of step `k`; returns how many steps are still done afterwards.
    pub(super) fn step_down(
        &self,
        t: &Table,
        cpu: CpuId,
        k: usize,
        inject: bool,
    ) -> Result<usize, HotplugError> {
        let step = &t.steps[k];
        if inject && step.section != Section::Starting && self.injected(t, cpu, k) {
            return Err(self.failed(cpu, t, k, false, "injected failure".into()));
        }
        match &step.kind {
            Kind::SchedActive => self
                .deactivate(cpu)
                .map(|_| k)
                .map_err(|r| self.failed(cpu, t, k, false, r)),
            Kind::ApOnline | Kind::Bringup => self.takedown(t, cpu, inject),
            Kind::SmpcfdPrepare => Ok(k),
            Kind::User { .. } if step.section == Section::Starting => self.takedown(t, cpu, inject),
            Kind::User { .. } => self
                .run_user(t, k, cpu, false)
                .map(|_| k)
                .map_err(|r| self.failed(cpu, t, k, false, r)),
        }
    }

    /// Runs a user step's startup or teardown for `cpu` in its section's context.
    pub(super) fn run_user(&self, t: &Table, k: usize, cpu: CpuId, up: bool) -> Result<(), String> {
        let Kind::User {
            startup, teardown, ..
        } = &t.steps[k].kind
        else {
            return Ok(());
        };
        let Some(f) = (if up { startup } else { teardown }).clone() else {
            return Ok(());
        };
        match t.steps[k].section {
            // Thread context: a panic is caught and fails the step, which is rolled back.
            Section::Prepare => catch_step(|| f(cpu)),
            Section::Starting => {
                // In IPI context on the CPU, like the kernel's irqs-off STARTING callbacks.
                let r = Arc::new(std::sync::atomic::AtomicU32::new(0));
                let r2 = r.clone();
                let sent = self.ipi().call_single(
                    cpu,
                    move || {
                        let c = crate::cpu::context::this_cpu().unwrap_or(usize::MAX);
                        let ok = crate::ipi::fatal::run(
                            c,
                            "hotplug STARTING step",
                            "setup_state",
                            || f(c),
                        )
                        .is_ok();
                        r2.store(if ok { 1 } else { 2 }, Ordering::Release);
                    },
                    true,
                );
                if let Err(e) = sent {
                    if matches!(e, crate::ipi::IpiError::Timeout { started: true, .. }) {
                        // The callback still runs and will drop its closure in IPI context:
                        // keep our reference so that drop is never the last (it would free).
                        std::mem::forget(r);
                    }
                    return Err(e.to_string());
                }
                match r.load(Ordering::Acquire) {
                    1 => Ok(()),
                    _ => Err("STARTING callback returned an error".into()),
                }
            }
            // Called from a job on this very CPU (`setup_state` from a job): the step runs
            // here and now, in the same thread context a queued job would have; queued, it
            // would wait behind the caller for the whole boot timeout, fail, and run later.
            Section::Online if self.machine().this_cpu_here() == Some(cpu) => {
                let _acting = self.stop().cpus_lock.delegate();
                catch_step(|| f(cpu))
            }
            Section::Online => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let job = crate::cpu::jobs::Job::new(move || {
                    // The step runs for this operation, which holds the hotplug lock and
                    // waits for it: a stop_machine in the step must not take it again. (A job
                    // runs on a CPU of this runtime, whose stop layer the thread-local names.)
                    let _acting = crate::stop::layer::current().map(|l| l.cpus_lock.delegate());
                    let _ = tx.send(catch_step(|| f(cpu)));
                });
                self.machine()
                    .queue_job_internal(cpu, job)
                    .map_err(|e| e.to_string())?;
                match rx.recv_timeout(self.boot_timeout) {
                    Ok(r) => r,
                    Err(_) => Err("ONLINE callback did not finish within the boot timeout".into()),
                }
            }
        }
    }
}

/// Runs a PREPARE or ONLINE step (thread context): an error or a panic becomes the step's
/// failure reason, so the step is rolled back like any failed one.
fn catch_step(f: impl FnOnce() -> super::StepResult) -> Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(str::to_string),
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<&str>()
                .copied()
                .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("non-string payload")
        )),
    }
}
