//! `kexec-cycle`: repeated orderly and crash kexec with power-off parking, on one chain of
//! images.
//!
//! Each iteration hands the current image over to the next: `kexec` to a random reboot CPU,
//! or `crash_kexec` from outside or from a job on a random CPU (the crash reboots there). With
//! `ParkPolicy::PowerOff` every CPU must come back: the report's lost mask is empty and every
//! CPU is online in the next image (`cpus_lost`). The image function runs on the reboot CPU
//! (`wrong_cpu` otherwise).
//!
//! Resources are sampled every `SAMPLE_EVERY` cycles: threads (`/proc/self/task`), open fds
//! (`/proc/self/fd`) and RSS (`/proc/self/statm`). The first sample is taken after
//! `WARM_UP` cycles (allocator pools at their steady size); every later sample is checked
//! against it: more than `THREADS_SLACK` extra threads, `FDS_SLACK` extra fds or `RSS_SLACK_KB`
//! more RSS is a violation (`threads_grew`, `fds_grew`, `rss_grew`). First and last samples are
//! the `*_first` / `*_last` counters.
//!
//! Faults: default `preempt`; the library's `doorbell-delay`, `doorbell-drop` and `preempt`
//! apply to every image of the chain. The scenario-injected ones are not used (an image's CPUs
//! are all up before the scenario could slow one).

use std::time::Duration;

use usmp::{CpuId, Handle, KexecError, KexecOutcome, ParkPolicy, Runtime};

use super::{Ctx, Scenario, ScenarioError};

/// Cycles before the first resource sample.
const WARM_UP: u64 = 10;
/// Cycles between samples.
const SAMPLE_EVERY: u64 = 10;
/// Bounds over the first sample. Threads: a retired image's CPU threads exit on their own
/// (not joined from the kexec path), so a few may still be on their way out.
const THREADS_SLACK: u64 = 16;
const FDS_SLACK: u64 = 16;
const RSS_SLACK_KB: u64 = 64 * 1024;
/// Bound on the job that runs a crash_kexec on a CPU.
const JOB_BOUND: Duration = Duration::from_secs(10);
/// A fresh chain is started this often (start-up and shutdown are covered too).
const CHAIN: u64 = 500;

pub struct KexecCycle;

impl Scenario for KexecCycle {
    fn name(&self) -> &'static str {
        "kexec-cycle"
    }

    fn about(&self) -> &'static str {
        "repeated orderly and crash kexec, power-off parking; cpus_lost stays 0, threads/fds/RSS bounded (first and last)"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "cpus_lost",
            "wrong_cpu",
            "threads_grew",
            "fds_grew",
            "rss_grew",
            "kexecs",
            "crash_kexecs",
            "crash_kexecs_on_cpu",
            "kexec_errors",
            "threads_first",
            "threads_last",
            "fds_first",
            "fds_last",
            "rss_kb_first",
            "rss_kb_last",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "preempt"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        let mut first: Option<Sample> = None;
        let mut cycle = 0u64;
        let mut rt = None;
        while ctx.running() {
            let cur = match rt.take() {
                Some(r) => r,
                None => ctx.build(|b| b.park_policy(ParkPolicy::PowerOff))?,
            };
            let h = cur.handle();
            let n = h.cpus();
            let crash = rng.one_in(2);
            let res = if crash {
                let on = rng.one_in(2).then(|| rng.below(n));
                crash_kexec(&h, on).inspect(|_| {
                    ctx.count("crash_kexecs", 1);
                    if on.is_some() {
                        ctx.count("crash_kexecs_on_cpu", 1);
                    }
                })
            } else {
                h.kexec(Some(rng.below(n)), |_, _| usmp::this_cpu())
                    .map_err(|e| e.to_string())
                    .inspect(|_| ctx.count("kexecs", 1))
            };
            cycle += 1;
            match res {
                Ok(out) => {
                    ctx.arm(&out.next.handle());
                    drop(cur);
                    check(ctx, &out);
                    if cycle % CHAIN != 0 {
                        rt = Some(out.next);
                    } else {
                        ctx.unwatch();
                    }
                }
                Err(e) => {
                    ctx.count("kexec_errors", 1);
                    tracing::debug!("kexec-cycle: {e}");
                    ctx.unwatch();
                }
            }
            if cycle >= WARM_UP && cycle % SAMPLE_EVERY == 0 {
                let s = Sample::now();
                let f = *first.get_or_insert(s);
                s.record(ctx, &f);
            }
            ctx.iteration();
        }
        ctx.unwatch();
        drop(rt);
        Ok(())
    }
}

fn crash_kexec(h: &Handle, on: Option<CpuId>) -> Result<KexecOutcome<Option<CpuId>>, String> {
    let go = |h: &Handle| -> Result<KexecOutcome<Option<CpuId>>, KexecError> {
        h.crash_kexec("stress: kexec-cycle", |_, _| usmp::this_cpu())
    };
    let Some(cpu) = on else {
        return go(h).map_err(|e| e.to_string());
    };
    let h2 = h.clone();
    h.run_on(cpu, move || go(&h2))
        .and_then(|j| j.join_timeout(JOB_BOUND))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn check(ctx: &Ctx, out: &KexecOutcome<Option<CpuId>>) {
    let rep = &out.report;
    let next: &Runtime = &out.next;
    let n = next.cpus();
    let online = next.online_mask();
    if !rep.lost.is_empty() || online.weight() != n {
        let missing: usmp::CpuMask = (0..n).filter(|&c| !online.contains(c)).collect();
        ctx.violation(
            "cpus_lost",
            missing.first().or(rep.lost.first()),
            format!(
                "generation {}: lost {} and offline {} with power-off parking ({})",
                rep.generation,
                rep.lost.to_list_or_none(),
                missing.to_list_or_none(),
                if rep.record.is_some() {
                    "crash_kexec"
                } else {
                    "kexec"
                }
            ),
        );
    }
    if out.value != Some(rep.reboot_cpu) {
        ctx.violation(
            "wrong_cpu",
            Some(rep.reboot_cpu),
            format!(
                "generation {}: the image ran on {:?}, not on its reboot CPU {}",
                rep.generation, out.value, rep.reboot_cpu
            ),
        );
    }
}

/// One resource sample of this process.
#[derive(Clone, Copy)]
struct Sample {
    threads: u64,
    fds: u64,
    rss_kb: u64,
}

impl Sample {
    fn now() -> Sample {
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count() as u64);
        let page_kb = 4; // statm counts pages; 4 KiB on every host this runs on
        let rss_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0u64);
        Sample {
            threads: count("/proc/self/task"),
            fds: count("/proc/self/fd"),
            rss_kb: rss_pages * page_kb,
        }
    }

    /// Sets the first/last counters and checks the bounds against `first`.
    fn record(&self, ctx: &Ctx, first: &Sample) {
        ctx.set("threads_first", first.threads);
        ctx.set("fds_first", first.fds);
        ctx.set("rss_kb_first", first.rss_kb);
        ctx.set("threads_last", self.threads);
        ctx.set("fds_last", self.fds);
        ctx.set("rss_kb_last", self.rss_kb);
        let checks = [
            (
                "threads_grew",
                self.threads,
                first.threads,
                THREADS_SLACK,
                "",
            ),
            ("fds_grew", self.fds, first.fds, FDS_SLACK, ""),
            ("rss_grew", self.rss_kb, first.rss_kb, RSS_SLACK_KB, " kB"),
        ];
        for (counter, now, was, slack, unit) in checks {
            // Reported once: a leak keeps growing, and the first line says all.
            if now > was + slack && ctx.get(counter) == 0 {
                ctx.violation(
                    counter,
                    None,
                    format!(
                        "{now}{unit} now, {was}{unit} at the first sample (bound +{slack}{unit})"
                    ),
                );
            }
        }
    }
}
