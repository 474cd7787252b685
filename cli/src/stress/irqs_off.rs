//! `irqs-off`: CPUs stuck with irqs masked when a stop comes. The first (maskable) attempt
//! cannot reach them; the retry with the NMI must. Catches `--broken stop-without-retries`.
//!
//! Each round builds a runtime in the round's stop mode, starts irq-masked spinners on 1 to
//! 3 CPUs (at most half, never CPU 0), waits until they have masked, and stops from outside
//! (`send_stop` or `crash_stop`, by the seed). Then:
//! - every CPU is stopped and `failed` is empty (`failed_to_stop`, per CPU);
//! - every masked CPU was stopped by an attempt after the first, the NMI one (`nmi_stops`
//!   counts them; a masked CPU stopped by the maskable attempt is `masked_stopped_early`);
//! - over the run, `nmi_stops` > 0 (checked at the end when a round was run).

use std::time::{Duration, Instant};

use usmp::{CpuId, CpuMask, ParkPolicy};

use super::args::mode_name;
use super::host_sched::Window;
use super::spinners::{check_threads, process_threads, Spinners, STOP_ROUND_CSDS, STOP_ROUND_RING};
use super::{Ctx, Scenario, ScenarioError};

/// The first (maskable) attempt's wait: the masked CPUs never answer it.
const FIRST_WAIT: Duration = Duration::from_millis(20);
/// Each NMI attempt's wait: a bound, generous for an oversubscribed host.
const NMI_WAIT: Duration = Duration::from_millis(300);
/// Spinners must have masked within this.
const MASK_BOUND: Duration = Duration::from_secs(3);
/// Masked CPUs per round, at most.
const MAX_MASKED: usize = 3;

pub struct IrqsOff;

impl Scenario for IrqsOff {
    fn name(&self) -> &'static str {
        "irqs-off"
    }

    fn about(&self) -> &'static str {
        "CPUs spinning with irqs masked when a stop comes; failed_to_stop stays 0, nmi_stops > 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "failed_to_stop",
            "masked_stopped_early",
            "nmi_stops",
            "stops",
            "crash_stops",
            "masked_cpus",
            "threads_first",
            "threads_last",
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
        ctx.set("threads_first", process_threads());
        while ctx.running() {
            let mode = ctx.mode(round);
            round += 1;
            let rt = ctx.build(|b| {
                b.stop_waits(FIRST_WAIT, NMI_WAIT)
                    .event_ring(STOP_ROUND_RING)
                    .csd_pool(STOP_ROUND_CSDS)
                    .stop_mode(mode)
                    .park_policy(ParkPolicy::PowerOff)
            })?;
            let h = rt.handle();
            let n = h.cpus();
            // At most three: each masked CPU is stopped inside its job and strands its thread
            // (see spinners.rs), so more per round would only cost memory.
            let k = 1 + rng.below((n / 2).clamp(1, MAX_MASKED));
            let mut cpus: Vec<CpuId> = Vec::new();
            while cpus.len() < k.min(n - 1) {
                let c = 1 + rng.below(n - 1);
                if !cpus.contains(&c) {
                    cpus.push(c);
                }
            }
            // The first round keeps the user-facing case (a CPU stopped inside a job never
            // leaves) once; later spinners leave with their runtime.
            let (spin, missing) = Spinners::start(&h, &cpus, false, round > 1, MASK_BOUND);
            if !missing.is_empty() {
                // The host did not schedule the jobs in time: not the protocol's fault.
                ctx.count("rounds_skipped", 1);
                spin.release();
                continue;
            }
            ctx.count("masked_cpus", cpus.len() as u64);
            let crash = rng.one_in(2);
            let window = Window::open(&h);
            let t = Instant::now();
            let out = if crash { h.crash_stop() } else { h.send_stop() };
            let took = t.elapsed();
            spin.release();
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    ctx.violation(
                        "failed_to_stop",
                        None,
                        format!("stop refused with no other caller: {e}"),
                    );
                    continue;
                }
            };
            ctx.count(if crash { "crash_stops" } else { "stops" }, 1);
            for c in out.failed.iter() {
                if let Some(numbers) = window.starved_cpu(&h, c) {
                    // The host, not the protocol, kept it from answering.
                    ctx.note(
                        "host_starved",
                        format!(
                            "{}: CPU {c} not stopped, its thread starved by the host: {numbers}",
                            mode_name(mode)
                        ),
                    );
                    continue;
                }
                ctx.violation(
                    "failed_to_stop",
                    Some(c),
                    format!(
                        "{} mode, {}: CPU {c} still online after {} attempt(s) in {:.0} ms (masked: {}; {})",
                        mode_name(mode),
                        if crash { "crash_stop" } else { "send_stop" },
                        out.attempts.len(),
                        took.as_secs_f64() * 1e3,
                        cpus.iter().copied().collect::<CpuMask>(),
                        window.describe(&h, c)
                    ),
                );
            }
            let first_stopped = out
                .attempts
                .first()
                .map(|a| a.targeted.and_not(&a.remaining))
                .unwrap_or_default();
            for &c in &cpus {
                if first_stopped.contains(c) {
                    ctx.violation(
                        "masked_stopped_early",
                        Some(c),
                        "an irq-masked CPU was stopped by the maskable attempt",
                    );
                } else if out.stopped.contains(c) {
                    ctx.count("nmi_stops", 1);
                }
            }
            ctx.iteration();
            drop(rt);
            ctx.unwatch();
            check_threads(ctx, n, 0);
        }
        if round > 0
            && ctx.get("nmi_stops") == 0
            && ctx.get("failed_to_stop") == 0
            && ctx.get("masked_cpus") > 0
        {
            ctx.violation(
                "nmi_stops",
                None,
                "no masked CPU was ever stopped by the NMI attempt",
            );
        }
        Ok(())
    }
}
