//! Job migration, the `sched:active` teardown: a CPU going down leaves the active mask, closes
//! its job gate, hands its queued jobs to other active CPUs and waits for its running job.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cpu::mask::CpuId;
use crate::cpu::wait::{Deadline, Policy, Waiter};

use super::layer::HotplugLayer;

impl HotplugLayer {
    /// `sched:active` teardown: leave the active mask, close the job gate, move queued jobs to
    /// another online CPU, and wait for a running job to finish.
    pub(super) fn deactivate(&self, cpu: CpuId) -> Result<(), String> {
        let s = self;
        let st = &s.machine().cpus()[cpu];
        s.machine().active().clear(cpu);
        st.jobs().set_gate(false);
        let reopen = |why: String| {
            st.jobs().set_gate(true);
            s.machine().active().set(cpu);
            why
        };
        let mut moved = 0;
        while let Some(job) = st.jobs().drain() {
            let mut job = Some(job);
            for to in s.machine().active().load().iter().filter(|&c| c != cpu) {
                let Some(j) = job.take() else { break };
                if let Some(at) = &j.at {
                    at.store(to, Ordering::SeqCst);
                }
                match self.machine().queue_job(to, j) {
                    Ok(()) => break,
                    Err((_, back)) => job = Some(back),
                }
            }
            if let Some(at) = job.as_ref().and_then(|j| j.at.as_ref()) {
                at.store(cpu, Ordering::SeqCst);
            }
            if let Some(back) = job {
                // Nowhere to go: put it back and stay up rather than drop it.
                let _ = self.machine().queue_job_internal(cpu, back);
                return Err(reopen(
                    "no other active CPU would take its queued jobs".into(),
                ));
            }
            moved += 1;
        }
        if moved > 0 {
            tracing::debug!("cpuhp: CPU{cpu}: moved {moved} queued job(s)");
        }
        // A job's end wakes nobody: back off, then nap.
        let mut w = Waiter::new(
            Deadline::after(s.boot_timeout),
            Policy::BACKOFF.nap(Duration::from_micros(100)),
        );
        while st.jobs().holds_job() {
            if s.stop().cpus_lock.cpu_waits(cpu) {
                // It waits for the hotplug lock this operation holds: it cannot finish first.
                return Err(reopen(
                    "its running job waits for the hotplug lock (a stop_machine, hotplug call \
                     or kexec in a job on the CPU going down)"
                        .into(),
                ));
            }
            if w.snooze().timed_out() {
                return Err(reopen(format!(
                    "a job is still running after {:?}",
                    s.boot_timeout
                )));
            }
        }
        Ok(())
    }
}
