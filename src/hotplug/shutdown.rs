//! The kexec path's shutdown of every non-boot CPU (`smp_shutdown_nonboot_cpus`): the same
//! step engine as `cpu_down`, with the `ap:online` teardown of all CPUs in one stop_machine.

use std::sync::Arc;

use super::ap::{self, ApFail, ApPlan};
use super::HotplugError;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::cpu::state::CpuRunState;

use super::layer::HotplugLayer;

impl HotplugLayer {
    /// The kexec path's `cpu_down` of every non-boot CPU (`smp_shutdown_nonboot_cpus`): under
    /// the hotplug mutex, ignoring the disable count that `migrate_to_reboot_cpu` raised (only
    /// this path may). The same steps as `cpu_down`, but the `ap:online` teardown of all the
    /// CPUs happens in ONE stop_machine (each runs its own `take_cpu_down`), instead of one
    /// stop_machine round per CPU. A CPU whose ONLINE or DYING teardown fails is rolled back
    /// and reported; the others still go down.
    pub(crate) fn cpu_down_many_for_kexec(
        self: &Arc<Self>,
        cpus: &[CpuId],
    ) -> Vec<(CpuId, Result<(), HotplugError>)> {
        let Ok(t) = self.hp_lock("kexec shutdown") else {
            let op = "kexec shutdown";
            return cpus
                .iter()
                .map(|&c| (c, Err(HotplugError::Reentrant { op })))
                .collect();
        };
        let s = self;
        let top = t.steps.len();
        let apo = t.ap_online();
        let mut out = Vec::new();
        let mut going = Vec::new();
        // ONLINE-section teardowns (sched:active first), per CPU, as `walk_down` does.
        for &cpu in cpus {
            if s.machine().cpus()[cpu].run_state() != CpuRunState::Online {
                out.push((cpu, Err(HotplugError::AlreadyOffline { cpu })));
                continue;
            }
            match self.walk_down_to(&t, cpu, top, apo + 1) {
                Err(e) => out.push((cpu, Err(e))),
                Ok(()) => going.push(cpu),
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
        let mask: CpuMask = going.iter().copied().collect();
        let r = self
            .stop()
            .stop_machine(move |c| ap::take_cpu_down(&p2, c), &mask);
        going.retain(|&cpu| {
            if !s.machine().online().contains(cpu) {
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
        // Each going CPU's take_cpu_down asked its thread to leave (no request_exit needed).
        let timeout = s.boot_timeout;
        for &cpu in &going {
            let st = &s.machine().cpus()[cpu];
            if !self.wait_dead(cpu, Some(timeout)) {
                st.set_run_state(CpuRunState::Limbo);
                let timeout_ms = timeout.as_millis() as u64;
                out.push((cpu, Err(HotplugError::TeardownTimeout { cpu, timeout_ms })));
                continue;
            }
            st.set_run_state(CpuRunState::Offline);
            // PREPARE teardowns (the kernel's DEAD section), on this thread. The CPU is gone
            // already, so a failing step cannot bring it back: log it and go on.
            out.push((cpu, self.teardown_anyway(&t, cpu, t.bringup(), 0, true)));
        }
        out.sort_by_key(|(c, _)| *c);
        out
    }
}
