//! `wedged`: a CPU with irqs masked and its NMI blocked too (`nmi-block`): no attempt can stop
//! it. The stop must say so (`failed_to_stop` lists it) and return within its bound.
//!
//! Each round builds a runtime in the round's stop mode, wedges one CPU (a job that blocks
//! both signals with `usmp::fault::wedge_this_cpu` and spins with irqs masked; without the
//! `nmi-block` fault the CPU is only irq-masked, and must then be stopped), spins irq-masked
//! on another now and then, and stops from outside. Then:
//! - every stop call returns within `first wait + NMI waits + slack` of time its threads could
//!   run (`overruns`): the time the host kept the stopper or a CPU thread runnable but off a
//!   core (`host_sched.rs`) is not counted, and an overrun that only it explains is
//!   `host_starved`, not a violation;
//! - `failed` is exactly the wedged CPU (`failed_to_stop` counts it; any other CPU there is
//!   `escaped_cpus`, unless the host kept its thread runnable but off a core for half the
//!   stop's waits or more: `host_starved`), and every other CPU was stopped.

use std::time::{Duration, Instant};

use usmp::CpuId;

use super::args::mode_name;
use super::host_sched::Window;
use super::spinners::{check_threads, process_threads, Spinners, STOP_ROUND_CSDS, STOP_ROUND_RING};
use super::{Ctx, Scenario, ScenarioError};

const FIRST_WAIT: Duration = Duration::from_millis(20);
const NMI_WAIT: Duration = Duration::from_millis(100);
const ATTEMPTS: u32 = 3;
const SLACK: Duration = Duration::from_secs(1);
const MASK_BOUND: Duration = Duration::from_secs(3);

pub struct Wedged;

impl Scenario for Wedged {
    fn name(&self) -> &'static str {
        "wedged"
    }

    fn about(&self) -> &'static str {
        "a CPU with irqs masked and its NMI blocked; failed_to_stop reported, overruns and escaped_cpus stay 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "overruns",
            "escaped_cpus",
            "failed_to_stop",
            "stops",
            "nmi_stops",
            "max_stop_ms",
            "host_starved",
            "threads_first",
            "threads_last",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "nmi-block,preempt"
    }

    fn uses_stop_mode(&self) -> bool {
        true
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        let mut round = 0u64;
        ctx.set("threads_first", process_threads());
        let bound = FIRST_WAIT + NMI_WAIT * (ATTEMPTS - 1) + SLACK;
        while ctx.running() {
            let mode = ctx.mode(round);
            round += 1;
            let rt = ctx.build(|b| {
                b.stop_waits(FIRST_WAIT, NMI_WAIT)
                    .event_ring(STOP_ROUND_RING)
                    .csd_pool(STOP_ROUND_CSDS)
                    .stop_max_retries(ATTEMPTS)
                    .stop_mode(mode)
            })?;
            let h = rt.handle();
            let n = h.cpus();
            let wedged: CpuId = 1 + rng.below(n - 1);
            let (wedge, missing) =
                Spinners::start(&h, &[wedged], ctx.faults.nmi_block, true, MASK_BOUND);
            // Sometimes a second CPU is only irq-masked: the NMI must still get it.
            let other = (n > 2 && rng.one_in(2)).then(|| {
                let c = 1 + rng.below(n - 1);
                if c == wedged {
                    1 + (c % (n - 1))
                } else {
                    c
                }
            });
            let masked = other.map(|c| Spinners::start(&h, &[c], false, true, MASK_BOUND));
            if !missing.is_empty() || masked.as_ref().is_some_and(|(_, m)| !m.is_empty()) {
                ctx.count("rounds_skipped", 1);
                wedge.release();
                if let Some((m, _)) = masked {
                    m.release();
                }
                continue;
            }
            let window = Window::open(&h);
            let t = Instant::now();
            let out = if rng.one_in(2) {
                h.crash_stop()
            } else {
                h.send_stop()
            };
            let took = t.elapsed();
            // What the host took from the stopper and the CPU threads meanwhile.
            let host = window.max_wait(&h);
            wedge.release();
            if let Some((m, _)) = masked {
                m.release();
            }
            ctx.max("max_stop_ms", took.as_millis() as u64);
            // The bound counts only the time the threads could run: a stop the host kept
            // off its cores overran because of the host, not the protocol.
            if took > bound {
                let what = format!(
                    "{}: the stop returned after {:.0} ms (bound {:.0} ms); the host kept a thread it waited for runnable but off a core for {:.0} ms of it",
                    mode_name(mode),
                    took.as_secs_f64() * 1e3,
                    bound.as_secs_f64() * 1e3,
                    host.as_secs_f64() * 1e3
                );
                if took.saturating_sub(host) <= bound {
                    ctx.note("host_starved", what);
                } else {
                    ctx.violation("overruns", None, what);
                }
            }
            match out {
                Ok(out) => {
                    ctx.count("stops", 1);
                    let expect_failed = ctx.faults.nmi_block;
                    for c in out.failed.iter() {
                        if c == wedged && expect_failed {
                            ctx.count("failed_to_stop", 1);
                        } else if let Some(numbers) =
                            window.starved_cpu_within(&h, c, bound - SLACK)
                        {
                            ctx.note(
                                "host_starved",
                                format!("{}: CPU {c} not stopped, its thread starved by the host: {numbers}", mode_name(mode)),
                            );
                        } else {
                            ctx.violation(
                                "escaped_cpus",
                                Some(c),
                                format!(
                                    "{}: CPU {c} still online after the stop (wedged: CPU {wedged}; {})",
                                    mode_name(mode),
                                    window.describe(&h, c)
                                ),
                            );
                        }
                    }
                    if let Some(c) = other {
                        if out.stopped.contains(c) {
                            ctx.count("nmi_stops", 1);
                        }
                    }
                }
                Err(e) => ctx.violation(
                    "escaped_cpus",
                    None,
                    format!("stop refused with no other caller: {e}"),
                ),
            }
            ctx.iteration();
            drop(rt);
            ctx.unwatch();
            check_threads(ctx, n, 0);
        }
        Ok(())
    }
}
