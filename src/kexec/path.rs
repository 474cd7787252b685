//! The kexec path.
//!
//! Orderly `kexec` (kernel order, seed 004):
//! 1. Mark kexec in progress (exactly one kexec or crash-kexec proceeds per image).
//! 2. `migrate_to_reboot_cpu`: disable hotplug, pick the reboot CPU (configured, default 0; the
//!    first online CPU if that one is offline) and pin it: from now on `cpu_down` of it is
//!    refused as busy. The rest of the path runs as a job on that CPU.
//! 3. `smp_shutdown_nonboot_cpus`: under the hotplug mutex, every other online CPU goes down
//!    through the real teardown path (so their queued calls and jobs are flushed or moved).
//! 4. Hand over: the old image ends; the next generation boots on the reboot CPU first, then
//!    brings up every CPU that is safely offline.
//!
//! Until step 4 begins, an error undoes every step taken so far (`Undo`, below): CPUs that
//! went down come back up, the reboot CPU is unpinned, hotplug is enabled again and the image
//! may kexec again. From step 4 on the old image is retired for good: every mutating call on
//! it (hotplug, jobs, stop_machine, kexec) fails with a typed `Retired` error, even if the
//! next image then fails to boot.
//!
//! `crash_kexec`: crash-stop everything else (retries, NMI fallback), the CPUs park by the
//! policy, a crash record is written, and the next image brings up exactly the CPUs that
//! powered off; CPUs parked with `spin`, parked where they could not power off, or that failed
//! to stop are lost, and their old threads are never given code of the new image (the new
//! image never starts a thread for their ids).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::record::CrashRecord;
use super::KexecError;
use crate::cpu::mask::{CpuId, CpuMask};
use crate::cpu::state::CpuRunState;
use crate::runtime::rt::{Handle, Runtime};

/// One line of the handoff timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TimelineEntry {
    /// Microseconds since the kexec started.
    pub t_us: u64,
    /// The CPU the step ran on or concerned, if any.
    pub cpu: Option<CpuId>,
    /// What happened.
    pub what: String,
}

/// What the kexec did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KexecReport {
    /// Generation of the next image.
    pub generation: u64,
    /// The reboot CPU the next image started on.
    pub reboot_cpu: CpuId,
    /// CPUs online in the next image once the handoff is done.
    pub handed_over: CpuMask,
    /// CPUs the next image could not use.
    pub lost: CpuMask,
    /// From the start of the kexec to every handed-over CPU online in the next image.
    pub handoff_us: u64,
    /// The steps of the kexec, in order.
    pub timeline: Vec<TimelineEntry>,
    /// The crash record, for `crash_kexec`.
    pub record: Option<CrashRecord>,
}

/// What the next image gets.
#[derive(Debug, Clone)]
pub struct Handoff {
    /// Generation of the next image.
    pub generation: u64,
    /// The CPU the next image starts on.
    pub reboot_cpu: CpuId,
    /// CPUs the old image lost (not present in the next one).
    pub lost: CpuMask,
    /// The crash record, for `crash_kexec`.
    pub record: Option<CrashRecord>,
}

/// The next image, running, and what its entry returned.
#[derive(Debug)]
pub struct KexecOutcome<R> {
    /// The next image's runtime.
    pub next: Runtime,
    /// What the kexec did.
    pub report: KexecReport,
    /// What the next image's entry returned.
    pub value: R,
}

struct Timeline {
    t0: Instant,
    v: Vec<TimelineEntry>,
}

impl Timeline {
    fn add(&mut self, cpu: Option<CpuId>, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(
            "kexec: {}{what}",
            cpu.map(|c| format!("CPU{c}: ")).unwrap_or_default()
        );
        self.v.push(TimelineEntry {
            t_us: self.t0.elapsed().as_micros() as u64,
            cpu,
            what,
        });
    }
}

/// Undoes the steps of a kexec that failed before the handover (dropped while armed).
struct Undo<'a> {
    h: &'a Handle,
    hotplug_disabled: bool,
    reboot_pinned: bool,
    /// CPUs the shutdown took down, brought back up on failure.
    downed: Vec<CpuId>,
    armed: bool,
}

impl<'a> Undo<'a> {
    fn new(h: &'a Handle) -> Self {
        Undo {
            h,
            hotplug_disabled: false,
            reboot_pinned: false,
            downed: Vec::new(),
            armed: true,
        }
    }

    /// The handover has begun: nothing may be undone any more.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let s = &self.h.shared;
        if self.reboot_pinned {
            s.hotplug().pin_reboot_cpu(None);
        }
        if self.hotplug_disabled {
            let _ = self.h.hotplug_enable();
        }
        for &cpu in &self.downed {
            if let Err(e) = self.h.cpu_up(cpu) {
                tracing::error!("kexec: undo: could not bring CPU{cpu} back up: {e}");
            }
        }
        // A crash kexec's stop cannot be undone; its powered-off CPUs may now tear down.
        s.stop().release_teardown();
        s.end_kexec();
        tracing::info!("kexec: failed before the handover; every step undone");
    }
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Handle {
    /// Orderly kexec to `image`, which runs as a job on the next image's reboot CPU and gets
    /// the next runtime's handle. `reboot_cpu`: `None` for CPU 0 (or the first online CPU).
    /// This image ends: all its CPUs are offline afterwards.
    pub fn kexec<R, F>(
        &self,
        reboot_cpu: Option<CpuId>,
        image: F,
    ) -> Result<KexecOutcome<R>, KexecError>
    where
        F: FnOnce(&Handle, &Handoff) -> R + Send + 'static,
        R: Send + 'static,
    {
        let s = &self.shared;
        let mut tl = Timeline {
            t0: Instant::now(),
            v: Vec::new(),
        };
        // Step 1.
        self.kexec_check_not_retired()?;
        if !s.begin_kexec() {
            return Err(KexecError::InProgress);
        }
        let mut undo = Undo::new(self);
        tl.add(s.machine().this_cpu_here(), "kexec in progress");
        // Step 2.
        self.hotplug_disable();
        undo.hotplug_disabled = true;
        let want = reboot_cpu.unwrap_or(0);
        let reboot = if self.is_online(want) {
            want
        } else {
            self.online_mask().first().ok_or(KexecError::NoCpu)?
        };
        if let Some(me) = s.machine().this_cpu_here().filter(|&c| c != reboot) {
            return Err(KexecError::WrongCpu { caller: me, reboot });
        }
        s.hotplug().pin_reboot_cpu(Some(reboot));
        undo.reboot_pinned = true;
        tl.add(
            Some(reboot),
            "migrate_to_reboot_cpu (hotplug disabled, reboot CPU pinned)",
        );
        // Step 3, on the reboot CPU (inline if the caller already runs there).
        let downs = if s.machine().this_cpu_here() == Some(reboot) {
            self.shutdown_nonboot(reboot)
        } else {
            let h = self.clone();
            self.run_on(reboot, move || h.shutdown_nonboot(reboot))
                .map_err(KexecError::Boot)?
                .join()
                .map_err(KexecError::Boot)?
        };
        let mut failed = None;
        for (cpu, r) in downs {
            match r {
                Ok(()) => {
                    undo.downed.push(cpu);
                    tl.add(Some(cpu), "cpu_down: offline (queue flushed, jobs moved)");
                }
                Err(source) => {
                    failed.get_or_insert(KexecError::Shutdown { cpu, source });
                }
            }
        }
        if let Some(e) = failed {
            return Err(e); // `undo` brings the CPUs that went down back up
        }
        tl.add(Some(reboot), "machine_kexec: handing over");
        undo.disarm();
        self.handover(tl, reboot, CpuMask::new(), None, image)
    }

    /// Crash-stops every other CPU, records the crash, and hands over to `image` in a new
    /// generation that brings up exactly the CPUs that powered off (`__crash_kexec`).
    pub fn crash_kexec<R, F>(&self, reason: &str, image: F) -> Result<KexecOutcome<R>, KexecError>
    where
        F: FnOnce(&Handle, &Handoff) -> R + Send + 'static,
        R: Send + 'static,
    {
        let s = &self.shared;
        let mut tl = Timeline {
            t0: Instant::now(),
            v: Vec::new(),
        };
        let me = s.machine().this_cpu_here();
        self.kexec_check_not_retired()?;
        if !s.begin_kexec() {
            // Exactly one proceeds. A losing caller that is a CPU gets stopped by the winner.
            return Err(KexecError::InProgress);
        }
        // A stop that happened cannot be undone; only the in-progress mark can.
        let mut undo = Undo::new(self);
        // The CPUs the stop powers off keep their threads until the next image is online
        // (`handover`, or `undo` on failure): their teardown would compete with its bring-up.
        self.shared.stop().hold_teardown();
        let crashed_at_ns = wall_ns();
        tl.add(me, format!("crash: {reason}"));
        let out = match self.shared.stop().stop_outcome_so_far() {
            Some(out) => {
                tl.add(me, "CPUs already stopped by the panic: not stopping again");
                out
            }
            None => self.crash_stop()?,
        };
        for a in &out.attempts {
            tl.add(
                None,
                format!(
                    "stop attempt {} ({}) targeted {} remaining {} in {} us",
                    a.attempt,
                    if a.attempt == 1 { "IPI" } else { "NMI" },
                    a.targeted.to_list_or_none(),
                    a.remaining.to_list_or_none(),
                    a.took_us
                ),
            );
        }
        // Lost: CPUs still online (failed to stop) and CPUs parked instead of powered off.
        let mut lost = out.failed.clone();
        for c in 0..self.cpus() {
            if Some(c) != me && s.machine().cpus()[c].run_state() == CpuRunState::Parked {
                lost.set(c);
            }
        }
        // The crashing CPU reboots; a crash from outside the runtime reboots on the lowest CPU
        // that is not lost (none, if every CPU parked with `spin`).
        let reboot = match me {
            Some(c) => c,
            None => (0..self.cpus())
                .find(|c| !lost.contains(*c))
                .ok_or(KexecError::NoCpu)?,
        };
        tl.add(
            Some(reboot),
            format!(
                "CPUs stopped: {}; lost: {}",
                out.stopped.to_list_or_none(),
                lost.to_list_or_none()
            ),
        );
        let record = CrashRecord {
            reason: reason.to_string(),
            crashing_cpu: me,
            cpus: self.cpus(),
            generation: self.generation(),
            notes: out.notes.clone(),
            failed: out.failed.to_string(),
            lost: lost.to_string(),
            park: s.config().park,
            crashed_at_ns,
            handoff_at_ns: wall_ns(),
        };
        tl.add(
            Some(reboot),
            "machine_crash_kexec: handing over with the crash record",
        );
        undo.disarm();
        self.handover(tl, reboot, lost, Some(record), image)
    }

    /// `smp_shutdown_nonboot_cpus`, on the reboot CPU: under the hotplug mutex, with the
    /// disable count lifted for this path only, every other online CPU goes down.
    fn shutdown_nonboot(
        &self,
        reboot: CpuId,
    ) -> Vec<(CpuId, Result<(), crate::hotplug::HotplugError>)> {
        let others: Vec<CpuId> = self.online_mask().iter().filter(|&c| c != reboot).collect();
        self.shared.hotplug().cpu_down_many_for_kexec(&others)
    }

    fn kexec_check_not_retired(&self) -> Result<(), KexecError> {
        self.shared.usable()?;
        if self.shared.machine().is_retired() {
            return Err(KexecError::Retired {
                generation: self.generation(),
            });
        }
        Ok(())
    }

    fn handover<R, F>(
        &self,
        mut tl: Timeline,
        reboot: CpuId,
        lost: CpuMask,
        record: Option<CrashRecord>,
        image: F,
    ) -> Result<KexecOutcome<R>, KexecError>
    where
        F: FnOnce(&Handle, &Handoff) -> R + Send + 'static,
        R: Send + 'static,
    {
        let s = &self.shared;
        {
            // Under the CPU hotplug lock, as every change of the online mask is: a
            // stop_machine either ran before this on the CPUs it counted, or comes after it
            // and finds the image retired. (Without it a stop_machine sized its rendezvous for
            // CPUs cleared here, and timed out or ran its function nowhere.) Inside a hotplug
            // operation, which holds it already, there is nothing to wait for.
            let _cpus = s.stop().cpus_lock.write(s.machine().this_cpu_here()).ok();
            s.machine().retire();
            // The old image ends: whatever is still online leaves (the reboot CPU's thread
            // exits once the job running this path returns; nothing is joined from here).
            for c in s.machine().online().load().iter() {
                s.machine().active().clear(c);
                s.machine().online().clear(c);
                s.machine().request_exit(c);
            }
            // Threads parked on CPUs that an earlier cpu_down took offline end too: no CPU of
            // a retired image comes back.
            s.hotplug().end_parked_threads();
        }
        tl.add(Some(reboot), "old image retired");
        let generation = s.config().generation + 1;
        let mut cfg = s.config().clone();
        cfg.generation = generation;
        let next = Runtime::start_image(cfg, reboot, &lost);
        // The old image's powered-off CPUs (held by `crash_kexec`) tear down from here on.
        s.stop().release_teardown();
        let next = next?;
        tl.add(
            Some(reboot),
            format!("generation {generation} booted on the reboot CPU"),
        );
        let handed_over = next.online_mask();
        tl.add(
            None,
            format!(
                "CPUs online in generation {generation}: {}",
                handed_over.to_list_or_none()
            ),
        );
        let handoff_us = tl.t0.elapsed().as_micros() as u64;
        let handoff = Handoff {
            generation,
            reboot_cpu: reboot,
            lost: lost.clone(),
            record: record.clone(),
        };
        let h2 = next.handle();
        let value = next
            .run_on(reboot, move || image(&h2, &handoff))
            .and_then(|j| j.join())?;
        Ok(KexecOutcome {
            next,
            report: KexecReport {
                generation,
                reboot_cpu: reboot,
                handed_over,
                lost,
                handoff_us,
                timeline: tl.v,
                record,
            },
            value,
        })
    }
}
