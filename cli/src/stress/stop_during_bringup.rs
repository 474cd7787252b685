//! `stop-during-bringup` (seed 000): `send_stop`/`crash_stop` racing CPUs that are coming
//! online, in each `--mode`.
//!
//! A stop ends a runtime, so every round builds a small fresh one (2 to 6 CPUs) in the round's
//! stop mode with short stop waits, takes 1 to n-1 non-boot CPUs down, gives each a boot delay
//! (0..`MAX_BOOT_DELAY`, about the stop's length), brings them up from one thread each, and
//! stops once the first bring-up has begun: `send_stop` or `crash_stop`, from outside or from
//! a job on CPU 0 (which keeps running). Once the bring-ups have returned:
//! - `escaped_cpus_<mode>`: CPUs online (other than the stopping CPU) that the outcome does not
//!   report in `failed`. Deterministic: every one is a violation (`escaped_cpus_deterministic`);
//!   best-effort: counted (the seed's residual race), not a violation.
//! - `failed_<mode>`: CPUs the stop targeted and reported as not stopped (honest, counted).
//!
//! Faults: default `doorbell-delay,preempt` (library faults apply); `slow-boot=D` replaces the
//! boot-delay range with 0..=D.

use std::time::{Duration, Instant};

use usmp::{CpuId, CpuMask, CpuRunState, Handle, HotplugError, StopMode, StopOutcome};

use super::args::mode_name;
use super::host_sched::Window;
use super::timeouts::{self, Wait};
use super::{Ctx, Scenario, ScenarioError};

/// Each attempt's wait: a stop lasts about two of these.
const STOP_WAIT: Duration = Duration::from_millis(5);
/// Boot delays range over 0..this, around the stop's length.
const MAX_BOOT_DELAY: Duration = Duration::from_millis(25);
/// Generous: a bring-up here must not time out, only race the stop.
const BOOT_TIMEOUT: Duration = Duration::from_secs(3);
/// The first bring-up must have begun within this.
const BEGIN_BOUND: Duration = Duration::from_secs(3);
/// Bound on the stop job when CPU 0 stops.
const JOB_BOUND: Duration = Duration::from_secs(5);
/// The largest runtime a round builds.
const MAX_CPUS: usize = 6;

pub struct StopDuringBringup;

impl Scenario for StopDuringBringup {
    fn name(&self) -> &'static str {
        "stop-during-bringup"
    }

    fn about(&self) -> &'static str {
        "send_stop/crash_stop racing CPUs coming online, per mode; escaped_cpus_deterministic stays 0, best-effort escapes counted"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "escaped_cpus_deterministic",
            "escaped_cpus_best_effort",
            "failed_deterministic",
            "failed_best_effort",
            "rounds_deterministic",
            "rounds_best_effort",
            "stops",
            "crash_stops",
            "stops_from_cpu",
            "racing_ups",
            "ups_failed",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "doorbell-delay,preempt"
    }

    fn uses_stop_mode(&self) -> bool {
        true
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        let mut round = 0u64;
        let max_delay = ctx.faults.slow_boot.unwrap_or(MAX_BOOT_DELAY);
        while ctx.running() {
            let mode = ctx.mode(round);
            round += 1;
            let n = 2 + rng.below(ctx.cpus.min(MAX_CPUS) - 1);
            let rt = ctx.build(|b| {
                b.cpus(n)
                    .stop_mode(mode)
                    .stop_waits(STOP_WAIT, STOP_WAIT)
                    .stop_max_retries(2)
                    .boot_timeout(BOOT_TIMEOUT)
            })?;
            let h = rt.handle();
            // 1 to n-1 of the non-boot CPUs go down, then come up racing the stop.
            let k = 1 + rng.below(n - 1);
            let mut racing: Vec<CpuId> = Vec::new();
            while racing.len() < k {
                let c = 1 + rng.below(n - 1);
                if !racing.contains(&c) {
                    racing.push(c);
                }
            }
            racing.retain(|&c| {
                let window = Window::open(&h);
                match h.cpu_down(c) {
                    Ok(()) => true,
                    Err(e) => {
                        // Before the stop: every CPU is healthy, so a timeout is a violation.
                        let wait = Wait {
                            h: &h,
                            window: &window,
                        };
                        timeouts::hotplug_failed(ctx, wait, "cpu_down", c, &e, None);
                        false
                    }
                }
            });
            for &c in &racing {
                let d = Duration::from_micros(rng.next() % (max_delay.as_micros() as u64 + 1));
                let _ = h.faults().set_boot_delay(c, d);
            }
            let crash = rng.one_in(2);
            let from_cpu = rng.one_in(3);
            let (out, ups) = std::thread::scope(|s| {
                let ups: Vec<_> = racing
                    .iter()
                    .map(|&c| {
                        let h = h.clone();
                        s.spawn(move || (c, h.cpu_up(c)))
                    })
                    .collect();
                // Stop once a bring-up has begun (they take the hotplug lock in turn).
                let t = Instant::now();
                while t.elapsed() < BEGIN_BOUND
                    && !racing
                        .iter()
                        .any(|&c| h.cpu_state(c) != Some(CpuRunState::Offline))
                {
                    std::thread::yield_now();
                }
                let out = stop(&h, crash, from_cpu);
                let ups: Vec<_> = ups.into_iter().filter_map(|u| u.join().ok()).collect();
                (out, ups)
            });
            ctx.count("racing_ups", racing.len() as u64);
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    // A lone stop cannot lose the race: the harness could not run it.
                    ctx.count("stop_refused", 1);
                    tracing::debug!("stop-during-bringup: {e}");
                    ctx.iteration();
                    ctx.unwatch();
                    continue;
                }
            };
            check(ctx, &h, mode, &out, &ups);
            ctx.count(if crash { "crash_stops" } else { "stops" }, 1);
            if from_cpu {
                ctx.count("stops_from_cpu", 1);
            }
            ctx.iteration();
            ctx.unwatch();
            drop(rt);
        }
        Ok(())
    }
}

/// Runs the stop from outside, or from a job on CPU 0.
fn stop(h: &Handle, crash: bool, from_cpu: bool) -> Result<StopOutcome, String> {
    let run = move |h: &Handle| {
        if crash {
            h.crash_stop()
        } else {
            h.send_stop()
        }
    };
    if !from_cpu {
        return run(h).map_err(|e| e.to_string());
    }
    let h2 = h.clone();
    h.run_on(0, move || run(&h2))
        .and_then(|j| j.join_timeout(JOB_BOUND))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn check(
    ctx: &Ctx,
    h: &Handle,
    mode: StopMode,
    out: &StopOutcome,
    ups: &[(CpuId, Result<(), HotplugError>)],
) {
    let m = mode_name(mode).replace('-', "_");
    ctx.count(&format!("rounds_{m}"), 1);
    ctx.count(&format!("failed_{m}"), out.failed.weight() as u64);
    let mut online = h.online_mask();
    if let Some(c) = out.caller {
        online.clear(c);
    }
    let escaped: CpuMask = online.and_not(&out.failed);
    let counter = format!("escaped_cpus_{m}");
    ctx.count(
        "ups_failed",
        ups.iter().filter(|(_, r)| r.is_err()).count() as u64,
    );
    // Excused, so the window is never read: a placeholder.
    let window = Window::open(h);
    for (c, r) in ups {
        if let Err(e) = r {
            // Each bring-up raced a stop, which may park its CPU: not a healthy CPU.
            let wait = Wait { h, window: &window };
            timeouts::hotplug_failed(
                ctx,
                wait,
                "cpu_up",
                *c,
                e,
                Some("a stop raced the bring-up"),
            );
        }
    }
    if mode == StopMode::Deterministic {
        for c in escaped.iter() {
            ctx.violation(
                &counter,
                Some(c),
                format!(
                    "CPU {c} came online during a deterministic {} and escaped it (online {}, failed {}, attempts {})",
                    if out.crash { "crash_stop" } else { "send_stop" },
                    h.online_mask(),
                    out.failed,
                    out.attempts.len()
                ),
            );
        }
    } else {
        ctx.count(&counter, escaped.weight() as u64);
    }
}
