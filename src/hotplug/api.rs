//! The public hotplug API on [`Handle`]: `cpu_up`, `cpu_down`, the disable count, dynamic
//! states, the refcount and limbo probes, and the checks every operation starts with (step 1
//! of the protocol in `engine.rs`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::handshake::DEAD;
use super::states::{Section, StateId, StepFn, Table};
use super::HotplugError;
use crate::cpu::clock::now_ns;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::mask::CpuId;
use crate::cpu::state::CpuRunState;
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

/// The hotplug lock held by one operation: the CPU hotplug lock for writing (so no
/// `stop_machine` runs meanwhile, `cpu/cpus_lock.rs`), then the table's mutex. Fields drop in
/// order, so the table is released first.
pub(super) struct Guard<'a> {
    table: std::sync::MutexGuard<'a, Table>,
    _cpus: crate::cpu::cpus_lock::WriteGuard<'a>,
}

impl std::ops::Deref for Guard<'_> {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.table
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Table {
        &mut self.table
    }
}

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
        if hp.cpus[cpu].handshake.load(Ordering::Acquire) != DEAD {
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

    /// Fault hook (the kernel's `st->fail`): the next time step `step` runs on `cpu`, in either
    /// direction, it fails instead. Public as `usmp::fault::Faults::fail_step`.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject_step_failure(&self, cpu: CpuId, step: &str) -> Result<(), HotplugError> {
        let t = self.hp_lock();
        self.check_cpu(cpu)?;
        if !t.steps.iter().any(|s| s.name == step) {
            return Err(HotplugError::UnknownState(step.into()));
        }
        *self.shared.hotplug.cpus[cpu].fail.lock_unpoisoned() = Some(step.into());
        Ok(())
    }

    /// Fault hook: the next bring-up of `cpu` sleeps `delay` before its ALIVE step (a slow
    /// AP). Public as `usmp::fault::Faults::set_boot_delay`.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject_boot_delay(
        &self,
        cpu: CpuId,
        delay: Duration,
    ) -> Result<(), HotplugError> {
        self.check_cpu(cpu)?;
        self.shared.faults.set_boot_delay(cpu, delay);
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
                        && self.shared.hotplug.cpus[c.id]
                            .handshake
                            .load(Ordering::Acquire)
                            != DEAD)
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

    /// After a handoff nothing may change this image (its CPU ids belong to the next one).
    pub(super) fn check_not_retired(&self) -> Result<(), HotplugError> {
        if self.shared.retired.load(Ordering::SeqCst) {
            return Err(HotplugError::Retired {
                generation: self.generation(),
            });
        }
        Ok(())
    }

    pub(super) fn hp_lock(&self) -> Guard<'_> {
        let s = &self.shared;
        let cpus = s.cpus_lock.write(s.this_cpu_here());
        Guard {
            table: s.hotplug.lock.lock_unpoisoned(),
            _cpus: cpus,
        }
    }

    pub(super) fn check_cpu(&self, cpu: CpuId) -> Result<(), HotplugError> {
        self.check_not_retired()?;
        if cpu >= self.cpus() {
            return Err(HotplugError::InvalidCpu {
                cpu,
                cpus: self.cpus(),
            });
        }
        Ok(())
    }
}
