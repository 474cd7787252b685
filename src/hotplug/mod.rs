//! CPU hotplug (placeholder bring-up until the state machine lands).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::runtime::cpu::CpuRunState;
use crate::runtime::error::RuntimeError;
use crate::runtime::rt::Handle;

/// Brings every possible CPU online at `build()`.
pub(crate) fn boot_all(h: &Handle) -> Result<(), RuntimeError> {
    let s = &h.shared;
    for cpu in 0..s.cpus.len() {
        let st = &s.cpus[cpu];
        st.exit_req.store(false, Ordering::SeqCst);
        st.exited.store(false, Ordering::SeqCst);
        st.set_run_state(CpuRunState::Booting);
        crate::runtime::thread::spawn_cpu(
            s,
            cpu,
            Box::new(|s, st| {
                st.queue.reopen();
                *st.job_gate.lock().unwrap_or_else(|e| e.into_inner()) = true;
                s.online.set(st.id);
                s.active.set(st.id);
                st.set_run_state(CpuRunState::Online);
                true
            }),
        )
        .map_err(|source| RuntimeError::Spawn { cpu, source })?;
        let deadline = Instant::now() + s.cfg.boot_timeout;
        while !s.online.contains(cpu) {
            if Instant::now() > deadline {
                return Err(RuntimeError::BootTimeout {
                    cpu,
                    timeout_ms: s.cfg.boot_timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    Ok(())
}
