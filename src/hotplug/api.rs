//! The public hotplug API behind [`Handle`](crate::Handle): `cpu_up`, `cpu_down`, the disable
//! count, dynamic states, the refcount and limbo probes, and the checks every operation starts
//! with (step 1 of the protocol in `engine.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::layer::HotplugLayer;
use super::states::{Section, StateId, StepFn, Table};
use super::HotplugError;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::mask::CpuId;
use crate::cpu::state::CpuRunState;
use crate::cpu::wait::{Deadline, Policy, Waiter};

/// Brings every present CPU that is not online up when an image starts, `first` first, the way the kernel's
/// parallel bring-up does (`cpuhp_bringup_cpus_parallel`):
///
/// 1. Under one hold of the hotplug lock, each CPU in turn runs its PREPARE steps and is kicked
///    (its thread started) without waiting, so the threads start while the next are spawned.
///    The first error ends the kicking: that CPU is rolled back, later ones are not tried.
/// 2. Each kicked CPU, in the same order, is committed once it reports ALIVE (its boot
///    timeout counted from its kick), so all run their STARTING steps at once.
/// 3. Each committed CPU, in the same order, is waited for until ONLINE and runs its ONLINE
///    steps. A kicked CPU is always finished or rolled back, even after an error, so no thread
///    is left waiting for a commit.
///
/// Returns the first error; every CPU is then online or rolled back to offline.
pub(crate) fn boot_all(h: &Arc<HotplugLayer>, first: CpuId) -> Result<(), HotplugError> {
    let present = h.machine().present().load();
    let order: Vec<CpuId> = std::iter::once(first)
        .chain(present.iter().filter(|&c| c != first))
        .filter(|&c| {
            present.contains(c) && h.machine().cpus()[c].run_state() != CpuRunState::Online
        })
        .collect();
    let t = h.hp_lock("cpu_up")?;
    let b = t.bringup();
    let mut res = Ok(());
    let mut kicked = Vec::with_capacity(order.len());
    for &cpu in &order {
        let kick = h.check_up(cpu).and_then(|()| {
            h.walk_up_span(&t, cpu, 0, b, 0)?;
            h.bringup_kick(&t, cpu, true)
                .inspect_err(|_| h.rollback_down(&t, cpu, b, 0))
        });
        match kick {
            Ok(at) => kicked.push((cpu, at)),
            Err(e) => {
                res = Err(e);
                break;
            }
        }
    }
    let mut committed = Vec::with_capacity(kicked.len());
    for (cpu, at) in kicked {
        match h.bringup_commit(cpu, at) {
            Ok(()) => committed.push(cpu),
            Err(e) => {
                h.rollback_down(&t, cpu, b, 0);
                if res.is_ok() {
                    res = Err(e);
                }
            }
        }
    }
    for cpu in committed {
        let up = match h.bringup_online(&t, cpu) {
            Ok(next) => h.walk_up_span(&t, cpu, next, t.steps.len(), 0),
            Err(e) => {
                h.rollback_down(&t, cpu, b, 0);
                Err(e)
            }
        };
        if res.is_ok() {
            res = up;
        }
    }
    res
}

/// The hotplug lock held by one operation: the CPU hotplug lock for writing (so no
/// `stop_machine` runs meanwhile, `stop/cpus_lock.rs`), then the table's mutex. Fields drop in
/// order, so the table is released first.
pub(super) struct Guard<'a> {
    table: std::sync::MutexGuard<'a, Table>,
    _cpus: crate::stop::cpus_lock::WriteGuard<'a>,
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

impl HotplugLayer {
    /// Implements [`Handle::cpu_up`](crate::Handle::cpu_up).
    pub(crate) fn cpu_up(self: &Arc<Self>, cpu: CpuId) -> Result<(), HotplugError> {
        let t = self.hp_lock("cpu_up")?;
        self.check_up(cpu)?;
        self.walk_up(&t, cpu, 0)
    }

    /// Step 1 of `cpu_up` (under the hotplug lock): may `cpu` start coming up?
    fn check_up(&self, cpu: CpuId) -> Result<(), HotplugError> {
        self.check_cpu(cpu)?;
        let hp = &self.hotplug;
        if hp.disabled.load(Ordering::SeqCst) > 0 {
            return Err(HotplugError::Disabled { cpu });
        }
        if !self.machine().present().contains(cpu) {
            return Err(HotplugError::Parked { cpu });
        }
        match self.machine().cpus()[cpu].run_state() {
            CpuRunState::Online => return Err(HotplugError::AlreadyOnline { cpu }),
            CpuRunState::Parked => return Err(HotplugError::Parked { cpu }),
            _ => {}
        }
        if !self.handshake_dead(cpu) {
            return Err(HotplugError::Limbo { cpu });
        }
        Ok(())
    }

    /// Implements [`Handle::cpu_down`](crate::Handle::cpu_down).
    pub(crate) fn cpu_down(self: &Arc<Self>, cpu: CpuId) -> Result<(), HotplugError> {
        // A kexec's reboot CPU is refused at once, without queueing behind the kexec path that
        // holds the hotplug mutex (and again under it, below).
        if self.hotplug.reboot_cpu.load(Ordering::SeqCst) == cpu {
            return Err(HotplugError::RebootCpu { cpu });
        }
        let t = self.hp_lock("cpu_down")?;
        self.check_cpu(cpu)?;
        let s = self;
        if s.hotplug.reboot_cpu.load(Ordering::SeqCst) == cpu {
            return Err(HotplugError::RebootCpu { cpu });
        }
        if s.hotplug.disabled.load(Ordering::SeqCst) > 0 {
            return Err(HotplugError::Disabled { cpu });
        }
        if s.machine().cpus()[cpu].run_state() != CpuRunState::Online {
            return Err(HotplugError::AlreadyOffline { cpu });
        }
        if s.machine().online().weight() <= 1 {
            return Err(HotplugError::LastCpu { cpu });
        }
        if s.machine().this_cpu_here() == Some(cpu) {
            return Err(HotplugError::SelfDown { cpu });
        }
        self.walk_down(&t, cpu, t.steps.len())
    }

    /// Implements [`Handle::hotplug_disable`](crate::Handle::hotplug_disable).
    pub(crate) fn hotplug_disable(&self) {
        // Inside a hotplug operation (one of its steps) there is no other operation to wait
        // for: the count is an atomic, and the operation that runs already passed its check.
        let _t = self.hp_lock("hotplug_disable").ok();
        self.hotplug.disabled.fetch_add(1, Ordering::SeqCst);
    }

    /// Implements [`Handle::hotplug_enable`](crate::Handle::hotplug_enable).
    pub(crate) fn hotplug_enable(&self) -> Result<(), HotplugError> {
        let _t = self.hp_lock("hotplug_enable").ok();
        let d = &self.hotplug.disabled;
        d.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .map(|_| ())
            .map_err(|_| {
                tracing::warn!("cpuhp: unbalanced hotplug_enable");
                HotplugError::UnbalancedEnable
            })
    }

    /// Implements [`Handle::setup_state`](crate::Handle::setup_state).
    pub(crate) fn setup_state(
        &self,
        name: &str,
        section: Section,
        startup: Option<StepFn>,
        teardown: Option<StepFn>,
    ) -> Result<StateId, HotplugError> {
        let mut t = self.hp_lock("setup_state")?;
        self.check_not_retired()?;
        let (id, at) = t.insert(name, section, startup, teardown);
        let online: Vec<CpuId> = self.machine().online().load().iter().collect();
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

    /// Implements [`Handle::remove_state`](crate::Handle::remove_state).
    pub(crate) fn remove_state(&self, id: StateId) -> Result<(), HotplugError> {
        let mut t = self.hp_lock("remove_state")?;
        self.check_not_retired()?;
        let at = t
            .find(id)
            .ok_or_else(|| HotplugError::UnknownState(format!("{id:?}")))?;
        for cpu in self
            .machine()
            .online()
            .load()
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

    /// Implements [`Handle::hotplug_steps`](crate::Handle::hotplug_steps).
    pub(crate) fn hotplug_steps(&self) -> Result<Vec<String>, HotplugError> {
        Ok(self.hp_lock("hotplug_steps")?.names())
    }

    /// Fault hook (the kernel's `st->fail`): the next time step `step` runs on `cpu`, in either
    /// direction, it fails instead. Public as `usmp::fault::Faults::fail_step`.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject_step_failure(&self, cpu: CpuId, step: &str) -> Result<(), HotplugError> {
        let t = self.hp_lock("fail_step")?;
        self.check_cpu(cpu)?;
        let Some(id) = t.by_name(step) else {
            return Err(HotplugError::UnknownState(step.into()));
        };
        *self.hotplug.cpus[cpu].fail.lock_unpoisoned() = Some(id);
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
        self.machine().faults().set_boot_delay(cpu, delay);
        Ok(())
    }

    /// Implements [`Handle::init_mm_refs`](crate::Handle::init_mm_refs).
    pub(crate) fn init_mm_refs(&self) -> u64 {
        self.hotplug.init_mm.load(Ordering::Acquire)
    }

    /// Implements [`Handle::wait_limbo_clear`](crate::Handle::wait_limbo_clear).
    pub(crate) fn wait_limbo_clear(&self, timeout: Duration) -> bool {
        // A thread leaving limbo wakes nobody: back off, then nap.
        let mut w = Waiter::new(
            Deadline::after(timeout),
            Policy::BACKOFF.nap(Duration::from_millis(1)),
        );
        loop {
            let busy = self.machine().cpus().iter().any(|c| {
                c.run_state() == CpuRunState::Limbo
                    || (c.run_state() == CpuRunState::Offline && !self.handshake_dead(c.id()))
            });
            if !busy {
                return true;
            }
            if w.snooze().timed_out() {
                return false;
            }
        }
    }

    /// After a handoff nothing may change this image (its CPU ids belong to the next one).
    pub(super) fn check_not_retired(&self) -> Result<(), HotplugError> {
        if self.machine().is_retired() {
            return Err(HotplugError::Retired {
                generation: self.machine().generation(),
            });
        }
        Ok(())
    }

    /// Takes the hotplug lock for `op`; refused inside a hotplug operation, which `op` would
    /// wait for (`stop/cpus_lock.rs` step 3).
    pub(super) fn hp_lock(&self, op: &'static str) -> Result<Guard<'_>, HotplugError> {
        let cpus = self
            .stop()
            .cpus_lock
            .write(self.machine().this_cpu_here())
            .map_err(|_| HotplugError::Reentrant { op })?;
        Ok(Guard {
            table: self.hotplug.lock.lock_unpoisoned(),
            _cpus: cpus,
        })
    }

    pub(super) fn check_cpu(&self, cpu: CpuId) -> Result<(), HotplugError> {
        self.check_not_retired()?;
        if cpu >= self.machine().cpus().len() {
            return Err(HotplugError::InvalidCpu {
                cpu,
                cpus: self.machine().cpus().len(),
            });
        }
        // A stopped image stays stopped: a CPU brought up after `crash_stop` would run calls
        // and jobs in an image whose CPUs the stop has parked or powered off for good.
        if self.stop().stop_in_progress() {
            return Err(HotplugError::Stopped { cpu });
        }
        Ok(())
    }
}
