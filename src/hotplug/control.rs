//! `cpu_up` / `cpu_down`: walk the step table up or down under the hotplug lock; a failed step
//! rolls back the steps already done, in reverse (rollback itself must not fail: errors there
//! are logged, as the kernel WARNs).
//!
//! Protocol of one operation:
//! 1. Take the hotplug mutex; refuse (state unchanged) if disabled, invalid, already there,
//!    the last online CPU, a kexec's reboot CPU, or in limbo.
//! 2. Up: run startups from step 0. PREPARE steps on this thread; `bringup:cpu` spawns the
//!    thread and does the handshake (`sync.rs`), during which the AP runs the STARTING steps and
//!    goes online in one step; ONLINE steps run on the CPU as jobs; `sched:active` opens the
//!    CPU to jobs.
//! 3. Down: run teardowns from the top. `sched:active` closes the job gate, moves queued jobs to
//!    another online CPU and waits for the running one; ONLINE teardowns run on the CPU;
//!    `ap:online` runs `take_cpu_down` under stop_machine (DYING steps, offline, queue flush),
//!    then the thread exits and reports DEAD; PREPARE teardowns run here.
//! 4. On failure at step k, undo steps in the other direction back to where the operation
//!    started, and return `StepFailed` naming k.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::ap::{self, ApFail, ApPlan};
use super::states::{Kind, Section, StateId, StepFn, Table};
use super::sync::{self, GiveUp, DEAD, FAILED, KICKED, ONLINE, PARKED};
use super::HotplugError;
use crate::runtime::clock::now_ns;
use crate::runtime::cpu::CpuRunState;
use crate::runtime::cpumask::CpuId;
use crate::runtime::futex;
use crate::runtime::lock::LockUnpoisoned;
use crate::runtime::rt::Handle;

/// Brings every present CPU online when an image starts, `first` first.
pub(crate) fn boot_all(
    h: &Handle,
    first: CpuId,
) -> Result<(), crate::runtime::error::RuntimeError> {
    use crate::runtime::error::RuntimeError;
    let present = h.present_mask();
    let order = std::iter::once(first)
        .chain(present.iter().filter(|&c| c != first))
        .filter(|&c| present.contains(c));
    for cpu in order {
        h.cpu_up(cpu).map_err(|e| match e {
            HotplugError::BootTimeout { cpu, timeout_ms } => {
                RuntimeError::BootTimeout { cpu, timeout_ms }
            }
            HotplugError::Spawn { cpu, source } => RuntimeError::Spawn { cpu, source },
            other => RuntimeError::BadConfig(other.to_string()),
        })?;
    }
    Ok(())
}

type Guard<'a> = std::sync::MutexGuard<'a, Table>;

impl Handle {
    /// Brings `cpu` online through every hotplug step (`cpu_device_up`). On error every step
    /// done is undone and the CPU is offline — or, after a bring-up timeout, in limbo: its
    /// thread will exit without touching shared state, and it cannot be brought up until then.
    pub fn cpu_up(&self, cpu: CpuId) -> Result<(), HotplugError> {
        let t = self.hp_lock();
        self.check_cpu(cpu)?;
        let hp = &self.shared.hotplug;
        if hp.disabled.load(Ordering::SeqCst) > 0 {
            return Err(HotplugError::Disabled { cpu });
        }
        if !self.shared.present.contains(cpu) {
            return Err(HotplugError::Parked { cpu });
        }
        match self.shared.cpus[cpu].run_state() {
            CpuRunState::Online => return Err(HotplugError::AlreadyOnline { cpu }),
            CpuRunState::Parked => return Err(HotplugError::Parked { cpu }),
            _ => {}
        }
        if hp.cpus[cpu].sync.load(Ordering::Acquire) != DEAD {
            return Err(HotplugError::Limbo { cpu });
        }
        self.walk_up(&t, cpu, 0)
    }

    /// Takes `cpu` offline through every hotplug step in reverse (`cpu_device_down`). Queued
    /// calls run before it goes (none is lost or run twice); queued jobs move to another online
    /// CPU; a job running there finishes first (bounded by the boot timeout).
    pub fn cpu_down(&self, cpu: CpuId) -> Result<(), HotplugError> {
        // A kexec's reboot CPU is refused at once, without queueing behind the kexec path that
        // holds the hotplug mutex (and again under it, below).
        if self.shared.hotplug.reboot_cpu.load(Ordering::SeqCst) == cpu {
            return Err(HotplugError::RebootCpu { cpu });
        }
        let t = self.hp_lock();
        self.check_cpu(cpu)?;
        let s = &self.shared;
        if s.hotplug.reboot_cpu.load(Ordering::SeqCst) == cpu {
            return Err(HotplugError::RebootCpu { cpu });
        }
        if s.hotplug.disabled.load(Ordering::SeqCst) > 0 {
            return Err(HotplugError::Disabled { cpu });
        }
        if s.cpus[cpu].run_state() != CpuRunState::Online {
            return Err(HotplugError::AlreadyOffline { cpu });
        }
        if s.online.weight() <= 1 {
            return Err(HotplugError::LastCpu { cpu });
        }
        if s.this_cpu_here() == Some(cpu) {
            return Err(HotplugError::SelfDown { cpu });
        }
        self.walk_down(&t, cpu, t.steps.len())
    }

    /// The kexec path's `cpu_down` of every non-boot CPU (`smp_shutdown_nonboot_cpus`): under
    /// the hotplug mutex, ignoring the disable count that `migrate_to_reboot_cpu` raised (only
    /// this path may). The same steps as `cpu_down`, but the `ap:online` teardown of all the
    /// CPUs happens in ONE stop_machine (each runs its own `take_cpu_down`), instead of one
    /// stop_machine round per CPU. A CPU whose ONLINE or DYING teardown fails is rolled back
    /// and reported; the others still go down.
    pub(crate) fn cpu_down_many_for_kexec(
        &self,
        cpus: &[CpuId],
    ) -> Vec<(CpuId, Result<(), HotplugError>)> {
        let t = self.hp_lock();
        let s = &self.shared;
        let top = t.steps.len();
        let apo = t.ap_online();
        let mut out = Vec::new();
        let mut going = Vec::new();
        // ONLINE-section teardowns (sched:active first), per CPU, as `walk_down` does.
        for &cpu in cpus {
            if s.cpus[cpu].run_state() != CpuRunState::Online {
                out.push((cpu, Err(HotplugError::AlreadyOffline { cpu })));
                continue;
            }
            let mut done = top;
            let mut failed = None;
            while done > apo + 1 {
                match self.step_down(&t, cpu, done - 1, true) {
                    Ok(left) => done = left,
                    Err(e) => {
                        self.rollback_up(&t, cpu, done, top);
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => out.push((cpu, Err(e))),
                None => going.push(cpu),
            }
        }
        if going.is_empty() {
            return out;
        }
        // One stop_machine: every going CPU runs its DYING steps, goes offline, flushes.
        let plan = Arc::new(ApPlan {
            steps: t.starting(),
            fail: ApFail::None,
        });
        let p2 = plan.clone();
        let mask: crate::CpuMask = going.iter().copied().collect();
        let r = self.stop_machine(move |c| ap::take_cpu_down(&p2, c), &mask);
        going.retain(|&cpu| {
            if !s.online.contains(cpu) {
                return true;
            }
            // Its take_cpu_down failed (or never ran) and it stayed up: restore its ONLINE steps.
            self.rollback_up(&t, cpu, apo + 1, top);
            let e = match &r {
                Err(e) => HotplugError::StopMachine(e.clone()),
                Ok(()) => self.failed(cpu, &t, apo, false, "DYING teardown failed".into()),
            };
            out.push((cpu, Err(e)));
            false
        });
        for &cpu in &going {
            s.cpus[cpu].request_exit();
        }
        let timeout = s.cfg.boot_timeout;
        for &cpu in &going {
            let st = &s.cpus[cpu];
            if !self.wait_dead(cpu, Some(timeout)) {
                st.set_run_state(CpuRunState::Limbo);
                let timeout_ms = timeout.as_millis() as u64;
                out.push((cpu, Err(HotplugError::TeardownTimeout { cpu, timeout_ms })));
                continue;
            }
            st.set_run_state(CpuRunState::Offline);
            // PREPARE teardowns (the kernel's DEAD section), on this thread.
            let mut done = t.bringup();
            let mut res = Ok(());
            while done > 0 {
                match self.step_down(&t, cpu, done - 1, true) {
                    Ok(left) => done = left,
                    Err(e) => {
                        tracing::error!("kexec: CPU{cpu}: {e}");
                        res = Err(e);
                        done -= 1;
                    }
                }
            }
            out.push((cpu, res));
        }
        out.sort_by_key(|(c, _)| *c);
        out
    }

    /// `cpu_hotplug_disable`: while the count is non-zero, `cpu_up`/`cpu_down` fail with
    /// `Disabled`. Waits for an operation in progress to finish.
    pub fn hotplug_disable(&self) {
        let _t = self.hp_lock();
        self.shared.hotplug.disabled.fetch_add(1, Ordering::SeqCst);
    }

    /// `cpu_hotplug_enable`. An enable without a matching disable is reported and ignored (the
    /// count never underflows).
    pub fn hotplug_enable(&self) -> Result<(), HotplugError> {
        let _t = self.hp_lock();
        let d = &self.shared.hotplug.disabled;
        d.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .map(|_| ())
            .map_err(|_| {
                tracing::warn!("cpuhp: unbalanced hotplug_enable");
                HotplugError::UnbalancedEnable
            })
    }

    /// Adds a named step to the table and runs `startup` on every online CPU in its section's
    /// context (`cpuhp_setup_state`). If it fails on one CPU it is undone on the others and
    /// not added.
    pub fn setup_state(
        &self,
        name: &str,
        section: Section,
        startup: Option<StepFn>,
        teardown: Option<StepFn>,
    ) -> Result<StateId, HotplugError> {
        let mut t = self.hp_lock();
        self.check_not_retired()?;
        let (id, at) = t.insert(name, section, startup, teardown);
        let online: Vec<CpuId> = self.online_mask().iter().collect();
        for (n, &cpu) in online.iter().enumerate() {
            if let Err(reason) = self.run_user(&t, at, cpu, true) {
                for &undo in online[..n].iter().rev() {
                    if let Err(e) = self.run_user(&t, at, undo, false) {
                        tracing::error!("cpuhp: undo of {name} on CPU{undo} failed: {e}");
                    }
                }
                t.steps.remove(at);
                return Err(HotplugError::SetupFailed {
                    name: name.into(),
                    cpu,
                    reason,
                });
            }
        }
        Ok(id)
    }

    /// Runs the state's teardown on every online CPU and removes it (`cpuhp_remove_state`).
    pub fn remove_state(&self, id: StateId) -> Result<(), HotplugError> {
        let mut t = self.hp_lock();
        self.check_not_retired()?;
        let at = t
            .find(id)
            .ok_or_else(|| HotplugError::UnknownState(format!("{id:?}")))?;
        for cpu in self
            .online_mask()
            .iter()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if let Err(e) = self.run_user(&t, at, cpu, false) {
                tracing::error!(
                    "cpuhp: teardown of {} on CPU{cpu} failed: {e}",
                    t.steps[at].name
                );
            }
        }
        t.steps.remove(at);
        Ok(())
    }

    /// The step names, in order (OFFLINE -> ONLINE).
    pub fn hotplug_steps(&self) -> Vec<String> {
        self.hp_lock().names()
    }

    /// Test hook (the kernel's `st->fail`): the next time step `step` runs on `cpu`, in either
    /// direction, it fails instead.
    pub fn hotplug_fail_step(&self, cpu: CpuId, step: &str) -> Result<(), HotplugError> {
        let t = self.hp_lock();
        self.check_cpu(cpu)?;
        if !t.steps.iter().any(|s| s.name == step) {
            return Err(HotplugError::UnknownState(step.into()));
        }
        *self.shared.hotplug.cpus[cpu].fail.lock_unpoisoned() = Some(step.into());
        Ok(())
    }

    /// Test hook: the next bring-up of `cpu` sleeps `delay` before its ALIVE step (a slow AP).
    pub fn hotplug_boot_delay(&self, cpu: CpuId, delay: Duration) -> Result<(), HotplugError> {
        self.check_cpu(cpu)?;
        self.shared.hotplug.cpus[cpu]
            .boot_delay_ns
            .store(delay.as_nanos() as u64, Ordering::Release);
        Ok(())
    }

    /// The `init_mm.mm_count` stand-in: references held by committed CPU threads. Equals the
    /// number of CPU threads past their handshake; never leaked, never dropped twice.
    pub fn init_mm_refs(&self) -> u64 {
        self.shared.hotplug.init_mm.load(Ordering::Acquire)
    }

    /// Waits until no CPU is in limbo (every timed-out AP has reported dead), up to `timeout`.
    pub fn wait_limbo_clear(&self, timeout: Duration) -> bool {
        let deadline = now_ns() + timeout.as_nanos() as u64;
        loop {
            let busy = self.shared.cpus.iter().any(|c| {
                c.run_state() == CpuRunState::Limbo
                    || (c.run_state() == CpuRunState::Offline
                        && self.shared.hotplug.cpus[c.id].sync.load(Ordering::Acquire) != DEAD)
            });
            if !busy {
                return true;
            }
            if now_ns() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Broken-variant switch for tests: when set, a dying CPU does not flush its call queue
    /// (the bug seed 002 fixed). Never set it outside a test that proves a check catches it.
    #[doc(hidden)]
    pub fn debug_skip_dying_flush(&self, on: bool) {
        self.shared
            .hotplug
            .skip_dying_flush
            .store(on, Ordering::Relaxed);
    }

    /// After a handoff nothing may change this image (its CPU ids belong to the next one).
    fn check_not_retired(&self) -> Result<(), HotplugError> {
        if self.shared.retired.load(Ordering::SeqCst) {
            return Err(HotplugError::Retired {
                generation: self.generation(),
            });
        }
        Ok(())
    }

    fn hp_lock(&self) -> Guard<'_> {
        self.shared.hotplug.lock.lock_unpoisoned()
    }

    fn check_cpu(&self, cpu: CpuId) -> Result<(), HotplugError> {
        self.check_not_retired()?;
        if cpu >= self.cpus() {
            return Err(HotplugError::InvalidCpu {
                cpu,
                cpus: self.cpus(),
            });
        }
        Ok(())
    }

    /// Consumes an injected failure for step `k`, if it targets it.
    fn injected(&self, t: &Table, cpu: CpuId, k: usize) -> bool {
        let mut f = self.shared.hotplug.cpus[cpu].fail.lock_unpoisoned();
        if f.as_deref() == Some(t.steps[k].name.as_str()) {
            *f = None;
            true
        } else {
            false
        }
    }

    /// Takes an injected failure aimed at a step that runs on the CPU itself.
    fn injected_ap(&self, t: &Table, cpu: CpuId, down: bool) -> ApFail {
        let mut f = self.shared.hotplug.cpus[cpu].fail.lock_unpoisoned();
        let Some(name) = f.as_deref() else {
            return ApFail::None;
        };
        let hit = if name == "ap:online" {
            ApFail::ApOnline
        } else if name == "bringup:cpu" && down {
            ApFail::Bringup
        } else if let Some(k) = t.starting().iter().position(|s| s.name == name) {
            ApFail::Step(k)
        } else {
            return ApFail::None;
        };
        *f = None;
        hit
    }

    fn failed(&self, cpu: CpuId, t: &Table, k: usize, up: bool, reason: String) -> HotplugError {
        tracing::warn!(
            "cpuhp: CPU{cpu} step {} failed on the way {}: {reason}",
            t.steps[k].name,
            if up { "up" } else { "down" }
        );
        HotplugError::StepFailed {
            cpu,
            step: t.steps[k].name.clone(),
            up,
            reason,
        }
    }

    /// Step 2: startups from `from`; on failure, undo down to `from`.
    fn walk_up(&self, t: &Table, cpu: CpuId, from: usize) -> Result<(), HotplugError> {
        let mut done = from;
        while done < t.steps.len() {
            match self.step_up(t, cpu, done, true) {
                Ok(next) => done = next,
                Err(e) => {
                    self.rollback_down(t, cpu, done, from);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Step 3: teardowns from the top; on failure, redo up to `from`.
    fn walk_down(&self, t: &Table, cpu: CpuId, from: usize) -> Result<(), HotplugError> {
        let mut done = from;
        while done > 0 {
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

    fn rollback_down(&self, t: &Table, cpu: CpuId, mut done: usize, to: usize) {
        while done > to {
            match self.step_down(t, cpu, done - 1, false) {
                Ok(left) => done = left,
                Err(e) => {
                    tracing::error!("cpuhp: CPU{cpu} rollback failed: {e}");
                    done -= 1;
                }
            }
        }
    }

    fn rollback_up(&self, t: &Table, cpu: CpuId, mut done: usize, to: usize) {
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
    fn step_up(
        &self,
        t: &Table,
        cpu: CpuId,
        k: usize,
        inject: bool,
    ) -> Result<usize, HotplugError> {
        let step = &t.steps[k];
        if inject && step.section != Section::Starting && self.injected(t, cpu, k) {
            return Err(self.failed(cpu, t, k, true, "injected failure".into()));
        }
        let s = &self.shared;
        let st = &s.cpus[cpu];
        match &step.kind {
            Kind::SmpcfdPrepare => {
                st.kick_pending.store(false, Ordering::Release);
                st.nmi_pending.store(0, Ordering::Release);
                Ok(k + 1)
            }
            Kind::Bringup => self.bringup(t, cpu, inject),
            Kind::ApOnline => Ok(k + 1), // done by the AP inside bring-up
            Kind::SchedActive => {
                *st.job_gate.lock_unpoisoned() = true;
                s.active.set(cpu);
                Ok(k + 1)
            }
            Kind::User { .. } => self
                .run_user(t, k, cpu, true)
                .map(|_| k + 1)
                .map_err(|r| self.failed(cpu, t, k, true, r)),
        }
    }

    /// Runs teardown of step `k`; returns how many steps are still done afterwards.
    fn step_down(
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
    fn run_user(&self, t: &Table, k: usize, cpu: CpuId, up: bool) -> Result<(), String> {
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
                let sent = self.call_single(
                    cpu,
                    move || {
                        let c = crate::this_cpu().unwrap_or(usize::MAX);
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
                    if matches!(e, crate::IpiError::Timeout { started: true, .. }) {
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
            Section::Online => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let job = crate::runtime::cpu::Job::new(move || {
                    let _ = tx.send(catch_step(|| f(cpu)));
                });
                self.queue_job_internal(cpu, job)
                    .map_err(|e| e.to_string())?;
                match rx.recv_timeout(self.shared.cfg.boot_timeout) {
                    Ok(r) => r,
                    Err(_) => Err("ONLINE callback did not finish within the boot timeout".into()),
                }
            }
        }
    }

    /// `bringup:cpu` (with the STARTING steps and `ap:online`, run by the AP).
    fn bringup(&self, t: &Table, cpu: CpuId, inject: bool) -> Result<usize, HotplugError> {
        let s = &self.shared;
        let st = &s.cpus[cpu];
        let hc = &s.hotplug.cpus[cpu];
        // A previous thread has reported DEAD (checked by the caller): reap it.
        if let Some(old) = st.thread.lock_unpoisoned().take() {
            let _ = old.join();
        }
        let fail = if inject {
            self.injected_ap(t, cpu, false)
        } else {
            ApFail::None
        };
        *hc.plan.lock_unpoisoned() = Some(ApPlan {
            steps: t.starting(),
            fail,
        });
        *hc.ap_failed.lock_unpoisoned() = None;
        st.exit_req.store(false, Ordering::SeqCst);
        // A CPU powered off by a stop can come back (best-effort mode): start it clean.
        st.powered_off.store(false, Ordering::SeqCst);
        st.crash_saved.store(false, Ordering::SeqCst);
        st.park_word.store(0, Ordering::SeqCst);
        st.ipi_vectors.store(0, Ordering::SeqCst);
        st.running_job.store(false, Ordering::SeqCst);
        st.in_job.store(false, Ordering::SeqCst);
        st.idle
            .store(crate::runtime::idle::RUNNING, Ordering::SeqCst);
        st.set_run_state(CpuRunState::Booting);
        if !sync::kick(&hc.sync) {
            return Err(HotplugError::Limbo { cpu });
        }
        if let Err(source) = crate::runtime::thread::spawn_cpu(s, cpu) {
            hc.sync.store(DEAD, Ordering::Release);
            st.set_run_state(CpuRunState::Offline);
            return Err(HotplugError::Spawn { cpu, source });
        }
        // Wait for ALIVE, bounded by the boot timeout.
        let timeout = s.cfg.boot_timeout;
        let deadline = now_ns() + timeout.as_nanos() as u64;
        loop {
            if hc.sync.load(Ordering::Acquire) != KICKED {
                break;
            }
            let now = now_ns();
            if now >= deadline {
                match sync::give_up(&hc.sync) {
                    GiveUp::WillDie => {
                        st.set_run_state(CpuRunState::Limbo);
                        tracing::warn!(
                            "smpboot: CPU{cpu} failed to come online within {timeout:?}; it will die on its own"
                        );
                        return Err(HotplugError::BootTimeout {
                            cpu,
                            timeout_ms: timeout.as_millis() as u64,
                        });
                    }
                    GiveUp::Alive => break,
                }
            }
            futex::wait(&hc.sync, KICKED, Some(Duration::from_nanos(deadline - now)));
        }
        // ALIVE: commit at once (the AP cannot go on without it, and we cannot give up now).
        let committed = sync::commit(&hc.sync);
        debug_assert!(committed, "an AP past KICKED must be ALIVE");
        futex::wake(&hc.sync, 1);
        // After the commit the AP runs only STARTING steps, which must not block; this wait is
        // therefore unbounded by design, with a warning each boot timeout.
        loop {
            match hc.sync.load(Ordering::Acquire) {
                ONLINE => {
                    tracing::debug!("smpboot: CPU{cpu} is up");
                    return Ok(t.ap_online() + 1);
                }
                PARKED => {
                    tracing::warn!(
                        "smpboot: CPU{cpu} parked at its ONLINE step: a stop is in progress"
                    );
                    return Err(HotplugError::Parked { cpu });
                }
                FAILED | DEAD => {
                    self.wait_dead(cpu, None);
                    let (step, reason) = hc
                        .ap_failed
                        .lock_unpoisoned()
                        .take()
                        .unwrap_or_else(|| ("bringup:cpu".into(), "AP died".into()));
                    tracing::warn!("cpuhp: CPU{cpu} STARTING step {step} failed: {reason}");
                    return Err(HotplugError::StepFailed {
                        cpu,
                        step,
                        up: true,
                        reason,
                    });
                }
                _ if st.is_stopped() => {
                    // A stop caught the AP between its commit and its ONLINE report (the NMI
                    // attempt parks it where it is): it will never report.
                    tracing::warn!("smpboot: CPU{cpu} was stopped while coming online");
                    return Err(HotplugError::Parked { cpu });
                }
                v => {
                    futex::wait(&hc.sync, v, Some(Duration::from_millis(10).min(timeout)));
                    if hc.sync.load(Ordering::Acquire) == v {
                        tracing::warn!("smpboot: CPU{cpu} still running its STARTING steps");
                    }
                }
            }
        }
    }

    /// Waits until the CPU's thread reports DEAD (bounded if `timeout` is given), then reaps it.
    fn wait_dead(&self, cpu: CpuId, timeout: Option<Duration>) -> bool {
        let s = &self.shared;
        let hc = &s.hotplug.cpus[cpu];
        let deadline = timeout.map(|d| now_ns() + d.as_nanos() as u64);
        loop {
            let v = hc.sync.load(Ordering::Acquire);
            if v == DEAD {
                break;
            }
            let nap = match deadline {
                Some(d) => {
                    let now = now_ns();
                    if now >= d {
                        return false;
                    }
                    Duration::from_nanos(d - now).min(Duration::from_millis(10))
                }
                None => Duration::from_millis(10),
            };
            futex::wait(&hc.sync, v, Some(nap));
        }
        if let Some(h) = s.cpus[cpu].thread.lock_unpoisoned().take() {
            let _ = h.join();
        }
        true
    }

    /// `ap:online` + STARTING teardowns + `bringup:cpu` teardown: stop_machine(take_cpu_down),
    /// then let the thread exit and wait for DEAD. Returns the bring-up index (steps left done).
    fn takedown(&self, t: &Table, cpu: CpuId, inject: bool) -> Result<usize, HotplugError> {
        let s = &self.shared;
        let fail = if inject {
            self.injected_ap(t, cpu, true)
        } else {
            ApFail::None
        };
        let plan = Arc::new(ApPlan {
            steps: t.starting(),
            fail,
        });
        let p2 = plan.clone();
        let r = self.stop_machine(
            move |c| ap::take_cpu_down(&p2, c),
            &crate::CpuMask::single(cpu),
        );
        match r {
            Ok(()) => {}
            Err(crate::stop::machine::StopMachineError::Failed { code, .. })
                if code >= -3 && code != -1 =>
            {
                let name = match code {
                    -2 => "ap:online".to_string(),
                    -3 => "bringup:cpu".to_string(),
                    k => plan.steps[k as usize].name.clone(),
                };
                let k = t.steps.iter().position(|x| x.name == name).unwrap_or(0);
                let why = if fail == ApFail::None {
                    "DYING callback returned an error"
                } else {
                    "injected failure"
                };
                return Err(self.failed(cpu, t, k, false, why.into()));
            }
            Err(e) => return Err(e.into()),
        }
        let st = &s.cpus[cpu];
        st.request_exit();
        let timeout = s.cfg.boot_timeout;
        if !self.wait_dead(cpu, Some(timeout)) {
            st.set_run_state(CpuRunState::Limbo);
            return Err(HotplugError::TeardownTimeout {
                cpu,
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        st.set_run_state(CpuRunState::Offline);
        Ok(t.bringup())
    }

    /// `sched:active` teardown: leave the active mask, close the job gate, move queued jobs to
    /// another online CPU, and wait for a running job to finish.
    fn deactivate(&self, cpu: CpuId) -> Result<(), String> {
        let s = &self.shared;
        let st = &s.cpus[cpu];
        s.active.clear(cpu);
        *st.job_gate.lock_unpoisoned() = false;
        let reopen = |why: String| {
            *st.job_gate.lock_unpoisoned() = true;
            s.active.set(cpu);
            why
        };
        let mut moved = 0;
        while let Ok(job) = st.job_rx.try_recv() {
            st.jobs_queued.fetch_sub(1, Ordering::AcqRel);
            let mut job = Some(job);
            for to in s.active.load().iter().filter(|&c| c != cpu) {
                let Some(j) = job.take() else { break };
                if let Some(at) = &j.at {
                    at.store(to, Ordering::SeqCst);
                }
                match self.queue_job(to, j) {
                    Ok(()) => break,
                    Err((_, back)) => job = Some(back),
                }
            }
            if let Some(at) = job.as_ref().and_then(|j| j.at.as_ref()) {
                at.store(cpu, Ordering::SeqCst);
            }
            if let Some(back) = job {
                // Nowhere to go: put it back and stay up rather than drop it.
                let _ = self.queue_job_internal(cpu, back);
                return Err(reopen(
                    "no other active CPU would take its queued jobs".into(),
                ));
            }
            moved += 1;
        }
        if moved > 0 {
            tracing::debug!("cpuhp: CPU{cpu}: moved {moved} queued job(s)");
        }
        let deadline = now_ns() + s.cfg.boot_timeout.as_nanos() as u64;
        while st.in_job.load(Ordering::SeqCst) {
            if now_ns() >= deadline {
                return Err(reopen(format!(
                    "a job is still running after {:?}",
                    s.cfg.boot_timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
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
