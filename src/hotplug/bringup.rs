//! The controller's side of bring-up and tear-down (`bringup:cpu` and `ap:online`): spawn the
//! thread and run the handshake of `handshake.rs` with it; on the way down, `take_cpu_down`
//! under stop_machine, then wait for the thread to report DEAD and reap it.

use std::sync::Arc;
use std::time::Duration;

use super::ap::{self, ApFail, ApPlan};
use super::handshake::{GiveUp, HsState};
use super::layer::HotplugLayer;
use super::states::{StepId, Table};
use super::HotplugError;
use crate::cpu::clock::now_ns;
use crate::cpu::lock::LockUnpoisoned;
use crate::cpu::mask::CpuId;
use crate::cpu::state::CpuRunState;
use crate::cpu::wait::{Deadline, Policy, Wait, Waiter};
use crate::inject::Broken;

impl HotplugLayer {
    /// `bringup:cpu` (with the STARTING steps and `ap:online`, run by the AP): the kick, then
    /// the rest of the handshake.
    pub(super) fn bringup(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        inject: bool,
    ) -> Result<usize, HotplugError> {
        let kicked_at = self.bringup_kick(t, cpu, inject)?;
        self.bringup_commit(cpu, kicked_at)?;
        self.bringup_online(t, cpu)
    }

    /// The first half of `bringup:cpu` (the kernel's `CPUHP_BP_KICK_AP`): handshake step 1 and
    /// the thread's start, without waiting for it. Returns when the CPU was kicked, which
    /// starts its boot timeout. On an error no thread runs for the CPU: a failed spawn puts it
    /// back to DEAD and offline; `Limbo` (the handshake left DEAD after the caller's check,
    /// which the hotplug lock rules out) leaves the handshake word as it found it.
    pub(super) fn bringup_kick(
        self: &Arc<Self>,
        t: &Table,
        cpu: CpuId,
        inject: bool,
    ) -> Result<u64, HotplugError> {
        let s = self;
        let st = &s.machine().cpus()[cpu];
        let hc = &s.hotplug.cpus[cpu];
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
        self.stop().reset_cpu_for_bringup(cpu);
        if !hc.handshake.kick() {
            return Err(HotplugError::Limbo { cpu });
        }
        // A previous thread has reported DEAD (checked by the caller): wake it or reap it.
        if let Err(source) = super::thread::start(self, cpu) {
            hc.handshake.unkick();
            st.set_run_state(CpuRunState::Offline);
            return Err(HotplugError::Spawn { cpu, source });
        }
        Ok(now_ns())
    }

    /// The second part of `bringup:cpu` (the kernel's `CPUHP_BRINGUP_CPU` after a parallel
    /// kick): wait for ALIVE until the boot timeout counted from `kicked_at`, then commit. On
    /// success the AP runs its STARTING steps and goes online on its own.
    pub(super) fn bringup_commit(&self, cpu: CpuId, kicked_at: u64) -> Result<(), HotplugError> {
        let s = self;
        let st = &s.machine().cpus()[cpu];
        let hc = &s.hotplug.cpus[cpu];
        // Wait for ALIVE, bounded by the boot timeout.
        let timeout = s.boot_timeout;
        let mut w = Waiter::new(
            Deadline::at_ns(kicked_at.saturating_add(timeout.as_nanos() as u64)),
            Policy::spin(s.handshake_spin()),
        );
        loop {
            if hc.handshake.state() != HsState::Kicked {
                break;
            }
            if hc.handshake.wait_while(HsState::Kicked, &mut w).timed_out() {
                let verdict = if s.machine().faults().is_broken(Broken::BringupWithoutCas) {
                    hc.handshake.broken_give_up(); // blind: seed 003's bug
                    GiveUp::WillDie
                } else {
                    hc.handshake.give_up()
                };
                match verdict {
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
        }
        // ALIVE: commit at once (the AP cannot go on without it, and we cannot give up now).
        let committed = hc.handshake.commit();
        debug_assert!(
            committed || s.machine().faults().is_broken(Broken::BringupWithoutCas),
            "an AP past KICKED must be ALIVE"
        );
        Ok(())
    }

    /// The last part of `bringup:cpu`: wait for the committed AP's ONLINE report. Returns how
    /// many steps are done.
    pub(super) fn bringup_online(&self, t: &Table, cpu: CpuId) -> Result<usize, HotplugError> {
        let s = self;
        let st = &s.machine().cpus()[cpu];
        let hc = &s.hotplug.cpus[cpu];
        let timeout = s.boot_timeout;
        // After the commit the AP runs only STARTING steps, which must not block; this wait is
        // therefore unbounded by design (forever), with a warning after each nap that ends
        // with the state unchanged.
        let mut w = Waiter::new(
            Deadline::forever(),
            Policy::spin(s.handshake_spin()).nap(Duration::from_millis(10).min(timeout)),
        );
        loop {
            match hc.handshake.state() {
                HsState::Online => {
                    tracing::debug!("smpboot: CPU{cpu} is up");
                    return Ok(t.ap_online() + 1);
                }
                HsState::Parked => {
                    tracing::warn!(
                        "smpboot: CPU{cpu} parked at its ONLINE step: a stop is in progress"
                    );
                    return Err(HotplugError::Parked { cpu });
                }
                HsState::Failed | HsState::Dead => {
                    self.wait_dead(cpu, None);
                    let (step, reason) = hc
                        .ap_failed
                        .lock_unpoisoned()
                        .take()
                        .unwrap_or((StepId::Bringup, "the CPU's thread died"));
                    return Err(self.failed_step(cpu, t, step, true, reason));
                }
                _ if st.is_stopped() => {
                    // A stop caught the AP between its commit and its ONLINE report (the NMI
                    // attempt parks it where it is): it will never report.
                    tracing::warn!("smpboot: CPU{cpu} was stopped while coming online");
                    return Err(HotplugError::Parked { cpu });
                }
                v => {
                    if hc.handshake.wait_while(v, &mut w) == Wait::Slept
                        && hc.handshake.state() == v
                    {
                        tracing::warn!("smpboot: CPU{cpu} still running its STARTING steps");
                    }
                }
            }
        }
    }

    /// Waits until the CPU's thread reports DEAD (bounded if `timeout` is given), then reaps it.
    pub(super) fn wait_dead(&self, cpu: CpuId, timeout: Option<Duration>) -> bool {
        let s = self;
        let hc = &s.hotplug.cpus[cpu];
        // A spin first, as for the other handshake waits: the thread is already on its way
        // (take_cpu_down asked it to leave as the stop ended) and reports DEAD before it parks
        // or unmaps anything, a few microseconds of work. Every move to DEAD wakes a waiter
        // (`Handshake::ap_exit`), but only one (`futex::wake(.., 1)`): the 10 ms nap, kept
        // from before, bounds what a second waiter on the same word would otherwise owe to
        // the first.
        let mut w = Waiter::new(
            timeout.map_or(Deadline::forever(), Deadline::after),
            Policy::spin(s.handshake_spin()).nap(Duration::from_millis(10)),
        );
        loop {
            let v = hc.handshake.state();
            if v == HsState::Dead {
                break;
            }
            if hc.handshake.wait_while(v, &mut w).timed_out() {
                return false;
            }
        }
        // A parked thread stays for the next cpu_up; any other is leaving: reap it.
        if !self.thread_parked(cpu) {
            if let Some(h) = s.machine().cpus()[cpu].identity().take_thread() {
                let _ = h.join();
            }
        }
        true
    }

    /// `ap:online` + STARTING teardowns + `bringup:cpu` teardown: stop_machine(take_cpu_down),
    /// then let the thread exit and wait for DEAD. Returns the bring-up index (steps left done).
    pub(super) fn takedown(
        &self,
        t: &Table,
        cpu: CpuId,
        inject: bool,
    ) -> Result<usize, HotplugError> {
        let s = self;
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
        // The thread parks when it leaves, for the next cpu_up (`thread.rs`). Asked before the
        // stop, because a successful take_cpu_down sends the thread on its way out at once.
        self.keep_thread(cpu);
        let r = self.stop().stop_machine(
            move |c| ap::take_cpu_down(&p2, c),
            &crate::cpu::mask::CpuMask::single(cpu),
        );
        match r {
            Ok(()) => {}
            Err(e) => {
                self.unkeep_thread(cpu);
                // A step of take_cpu_down failed (and was undone): name it.
                if let crate::stop::machine::StopMachineError::Failed { code, .. } = &e {
                    if let Some(step) = ApFail::from_code(*code).and_then(|f| f.step(&plan)) {
                        let why = if fail == ApFail::None {
                            "DYING callback returned an error"
                        } else {
                            "injected failure"
                        };
                        return Err(self.failed_step(cpu, t, step, false, why));
                    }
                }
                return Err(e.into());
            }
        }
        let st = &s.machine().cpus()[cpu];
        // No request_exit: take_cpu_down asked the thread to leave, and an idle loop re-checks
        // its exit before it sleeps, so there is nobody to wake.
        let timeout = s.boot_timeout;
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
}
