//! `reboot-cpu` (seed 004): `cpu_down` of the reboot CPU racing `kexec` / `crash_kexec`.
//!
//! Each round builds a runtime (power-off parking), picks a reboot CPU R and starts a racer
//! thread that keeps taking R down (and bringing it back when it went), and now and then
//! another CPU, until the kexec returns. Meanwhile the round runs `kexec(Some(R))` or
//! `crash_kexec`, from outside or from a job queued to R (which runs on another CPU if the
//! racer took R down first). Checked after every kexec that handed over:
//! - the image ran on the report's reboot CPU, which is online in the next image, not in its
//!   lost mask, and runs a job there (`reboot_cpu_lost` otherwise);
//! - a kexec called on a CPU reboots on that CPU (an orderly one elsewhere is refused as
//!   `WrongCpu`): the next image must not lose the CPU the kexec ran on (`reboot_cpu_lost`);
//! - once the racer has joined, the retired image refuses to take the reboot CPU down.
//!
//! `kexec_stalls` counts rounds that took `BOOT_TIMEOUT` or more. It found a `cpu_down(R)`
//! that held the hotplug lock while waiting for the job on R, which ran the kexec and waited
//! for that lock; `cpu_down` now gives up at once on such a job (`cpu/cpus_lock.rs` step 4),
//! so it should stay 0. It is counted, not a violation, because a round on a starved host can
//! take that long without any bug.
//!
//! A kexec that failed with a typed error (a shutdown step refused, say) is counted
//! (`kexec_errors`) and undone by the library; a `cpu_down(R)` refused as `RebootCpu` is
//! counted (`downs_refused_busy`).
//!
//! Faults: default `doorbell-delay,preempt` (library faults apply); `slow-boot=D` delays the
//! racer's bring-ups by up to D.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use usmp::{CpuId, Handle, HotplugError, KexecError, KexecOutcome, ParkPolicy};

use super::host_sched::Window;
use super::timeouts::{self, Wait};
use super::{Ctx, Scenario, ScenarioError};
use crate::rng::Rng;

/// Bound on a job (the kexec on R, the probe job in the next image).
const JOB_BOUND: Duration = Duration::from_secs(10);
/// Bounds a `cpu_down` that waits for the job running the kexec on R (and bring-ups).
const BOOT_TIMEOUT: Duration = Duration::from_secs(2);
/// Each crash-stop attempt's wait (a CPU inside a racing cpu_down's stop_machine misses the
/// maskable attempt).
const STOP_WAIT: Duration = Duration::from_millis(50);
/// Largest runtime a round builds.
const MAX_CPUS: usize = 8;

pub struct RebootCpu;

/// What the image function reports: the CPU it ran on.
type Ran = Option<CpuId>;

impl Scenario for RebootCpu {
    fn name(&self) -> &'static str {
        "reboot-cpu"
    }

    fn about(&self) -> &'static str {
        "cpu_down of the reboot CPU racing kexec/crash_kexec; reboot_cpu_lost stays 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "reboot_cpu_lost",
            "hotplug_timeouts",
            "kexecs",
            "crash_kexecs",
            "kexecs_on_a_cpu",
            "reboot_cpu_moved",
            "downs_of_reboot_cpu",
            "downs_refused_busy",
            "kexec_errors",
            "kexec_stalls",
            "round_max_ms",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "doorbell-delay,preempt"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        while ctx.running() {
            let n = ctx.cpus.min(MAX_CPUS);
            let rt = ctx.build(|b| {
                b.cpus(n)
                    .park_policy(ParkPolicy::PowerOff)
                    .boot_timeout(BOOT_TIMEOUT)
                    .stop_waits(STOP_WAIT, STOP_WAIT)
            })?;
            let h = rt.handle();
            let r = rng.below(n);
            let crash = rng.one_in(2);
            let on_r = rng.one_in(2);
            let racer_rng = crate::rng::Rng::stream(rng.next(), 1);
            let done = AtomicBool::new(false);
            let slow = ctx.faults.slow_boot;
            let t0 = std::time::Instant::now();
            let (res, downs, busy) = std::thread::scope(|s| {
                let racer = s.spawn(|| race(ctx, &h, r, racer_rng, slow, &done));
                let res = kexec(&h, r, crash, on_r);
                done.store(true, Ordering::SeqCst);
                let (downs, busy) = racer.join().unwrap_or((0, 0));
                (res, downs, busy)
            });
            let took = t0.elapsed();
            ctx.max("round_max_ms", took.as_millis() as u64);
            if took >= BOOT_TIMEOUT {
                // A cpu_down(R) holding the hotplug lock while it waits for the job on R that
                // runs the kexec: the kexec proceeds only when that wait times out.
                ctx.count("kexec_stalls", 1);
            }
            ctx.count("downs_of_reboot_cpu", downs);
            ctx.count("downs_refused_busy", busy);
            match res {
                Ok((at, out)) => {
                    ctx.count(if crash { "crash_kexecs" } else { "kexecs" }, 1);
                    if at.is_some() {
                        ctx.count("kexecs_on_a_cpu", 1);
                    }
                    check(ctx, &h, r, crash, at, out);
                }
                Err(e) => {
                    ctx.count("kexec_errors", 1);
                    tracing::debug!("reboot-cpu: {e}");
                }
            }
            ctx.iteration();
            ctx.unwatch();
            drop(rt);
        }
        Ok(())
    }
}

/// The racer: `cpu_down(r)` (and `cpu_up(r)` when it went), sometimes another CPU, until done.
/// Returns (downs of r tried, refused as the busy reboot CPU).
fn race(
    ctx: &Ctx,
    h: &Handle,
    r: CpuId,
    mut rng: Rng,
    slow: Option<Duration>,
    done: &AtomicBool,
) -> (u64, u64) {
    let (mut downs, mut busy) = (0, 0);
    while !done.load(Ordering::SeqCst) {
        let cpu = if rng.one_in(4) {
            rng.below(h.cpus())
        } else {
            r
        };
        let mut delay = Duration::ZERO;
        let window = Window::open(h);
        let (op, res) = if h.is_online(cpu) {
            let res = h.cpu_down(cpu);
            if cpu == r {
                downs += 1;
                if matches!(res, Err(HotplugError::RebootCpu { .. })) {
                    busy += 1;
                }
            }
            ("cpu_down", res)
        } else {
            if let Some(max) = slow {
                let d = Duration::from_micros(rng.next() % (max.as_micros() as u64 + 1));
                if h.faults().set_boot_delay(cpu, d).is_ok() {
                    delay = d;
                }
            }
            ("cpu_up", h.cpu_up(cpu))
        };
        if let Err(e) = res {
            // The kexec stops every CPU but R: a hotplug operation it overtakes is not racing
            // healthy CPUs.
            let excuse = if h.stop_in_progress() {
                Some("the kexec was stopping the CPUs")
            } else if matches!(&e, HotplugError::BootTimeout { timeout_ms, .. }
                if delay.as_millis() as u64 >= *timeout_ms)
            {
                Some("slow-boot delayed it past the boot timeout")
            } else {
                None
            };
            let wait = Wait { h, window: &window };
            timeouts::hotplug_failed(ctx, wait, op, cpu, &e, excuse);
        }
        std::thread::yield_now();
    }
    (downs, busy)
}

/// Runs the round's kexec; the image reports the CPU it ran on. Also returns the CPU the kexec
/// was called on (`None` from outside; a job queued to R may have moved if R went down first).
fn kexec(
    h: &Handle,
    r: CpuId,
    crash: bool,
    on_r: bool,
) -> Result<(Option<CpuId>, KexecOutcome<Ran>), String> {
    let go = move |h: &Handle| -> Result<(Option<CpuId>, KexecOutcome<Ran>), KexecError> {
        let image = |_: &Handle, _: &usmp::Handoff| usmp::this_cpu();
        let at = usmp::this_cpu();
        if crash {
            h.crash_kexec("stress: reboot-cpu", image)
        } else {
            h.kexec(Some(r), image)
        }
        .map(|o| (at, o))
    };
    if !on_r {
        return go(h).map_err(|e| e.to_string());
    }
    let h2 = h.clone();
    h.run_on(r, move || go(&h2))
        .and_then(|j| j.join_timeout(JOB_BOUND))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn check(
    ctx: &Ctx,
    old: &Handle,
    r: CpuId,
    crash: bool,
    at: Option<CpuId>,
    out: KexecOutcome<Ran>,
) {
    let next = out.next.handle();
    ctx.arm(&next);
    let rep = &out.report;
    let rb = rep.reboot_cpu;
    let what = if crash { "crash_kexec" } else { "kexec" };
    let lost = |why: String| ctx.violation("reboot_cpu_lost", Some(rb), why);
    if out.value != Some(rb) {
        lost(format!(
            "{what}: the next image ran on {:?}, not on its reboot CPU {rb}",
            out.value
        ));
    }
    if rep.lost.contains(rb) || !next.is_online(rb) {
        lost(format!(
            "{what}: reboot CPU {rb} is lost or offline in the next image (online {}, lost {})",
            next.online_mask(),
            rep.lost
        ));
    } else {
        match next
            .run_on(rb, usmp::this_cpu)
            .and_then(|j| j.join_timeout(JOB_BOUND))
        {
            Ok(Some(c)) if c == rb => {}
            other => lost(format!(
                "{what}: reboot CPU {rb} does not run a job in the next image: {other:?}"
            )),
        }
    }
    if let Some(c) = at.filter(|&c| c != rb) {
        lost(format!(
            "{what} ran on CPU {c}, but the next image rebooted on {rb}"
        ));
    }
    if rb != r {
        // The racer took R down before the kexec pinned it (or a crash ran elsewhere).
        ctx.count("reboot_cpu_moved", 1);
    }
    if old.cpu_down(rb).is_ok() {
        ctx.violation(
            "reboot_cpu_lost",
            Some(rb),
            format!("{what}: the retired image took its reboot CPU {rb} down after the handover"),
        );
    }
    drop(out.next);
}
