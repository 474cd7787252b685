//! `concurrent-stop` (seed 001): `send_stop` and `crash_stop` from several CPUs and outside
//! threads at once.
//!
//! Each round builds a runtime in the round's stop mode and park policy, puts an irq-masked
//! spinner on one CPU (so the stop needs its NMI attempt and takes a while), and releases 2 to
//! 5 callers together: outside threads and jobs on CPUs, each calling `send_stop` or
//! `crash_stop` by the seed. Then:
//! - exactly one caller wins (gets `Ok`): `winners_max` is the most in any round and must be
//!   1; a round with no winner is a violation too;
//! - every outside call returns within the stop's bound (`hangs`); a CPU caller that loses
//!   parks (its job reports it stopped), within the same bound;
//! - a crash always wins over a plain stop (`crash_lost`): the outcome is a crash when the
//!   winner called `crash_stop`, and also when a `crash_stop` loser reported that it upgraded
//!   the stop, or returned while the winner's first attempt was still waiting;
//! - no CPU is left running (`failed_to_stop`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{CpuId, CpuRunState, Handle, ParkPolicy, StopError, StopOutcome};

use super::args::mode_name;
use super::spinners::{check_threads, process_threads, Spinners, STOP_ROUND_CSDS, STOP_ROUND_RING};
use super::{Ctx, Scenario, ScenarioError};

const FIRST_WAIT: Duration = Duration::from_millis(30);
const NMI_WAIT: Duration = Duration::from_millis(300);
/// Default retries (the library's): one maskable attempt and two NMI attempts.
const ATTEMPTS: u32 = 3;
/// On top of the waits: thread scheduling on an oversubscribed host.
const SLACK: Duration = Duration::from_secs(2);
/// Callers wait for the start flag at most this long.
const START_BOUND: Duration = Duration::from_secs(2);
/// How a job on a CPU that a stop powered off ends (the runtime unwinds it).
const PARKED: &str = "CPU parked";

fn stop_bound() -> Duration {
    FIRST_WAIT + NMI_WAIT * (ATTEMPTS - 1) + SLACK
}

/// One caller's result.
struct Call {
    crash: bool,
    /// `None`: an outside caller; `Some(cpu)`: a job on `cpu`.
    cpu: Option<CpuId>,
    /// `None` for a CPU caller that parked (it lost).
    result: Option<Result<StopOutcome, StopError>>,
    started: Instant,
    returned: Instant,
}

fn wait_go(go: &AtomicBool) {
    let t = Instant::now();
    while !go.load(Ordering::Acquire) && t.elapsed() < START_BOUND {
        std::hint::spin_loop();
    }
}

fn stop(h: &Handle, crash: bool) -> Result<StopOutcome, StopError> {
    if crash {
        h.crash_stop()
    } else {
        h.send_stop()
    }
}

pub struct ConcurrentStop;

impl Scenario for ConcurrentStop {
    fn name(&self) -> &'static str {
        "concurrent-stop"
    }

    fn about(&self) -> &'static str {
        "send_stop and crash_stop from CPUs and outside threads at once (seed 001); winners_max 1, hangs 0, crash_lost 0, failed_to_stop 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "winners_max",
            "hangs",
            "crash_lost",
            "failed_to_stop",
            "rounds_crash",
            "rounds_plain",
            "upgrades",
            "cpu_callers_parked",
            "cpu_winners",
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
            let park = if rng.one_in(2) {
                ParkPolicy::Spin
            } else {
                ParkPolicy::PowerOff
            };
            let rt = ctx.build(|b| {
                b.stop_waits(FIRST_WAIT, NMI_WAIT)
                    .event_ring(STOP_ROUND_RING)
                    .csd_pool(STOP_ROUND_CSDS)
                    .stop_max_retries(ATTEMPTS)
                    .stop_mode(mode)
                    .park_policy(park)
            })?;
            let h = rt.handle();
            let n = h.cpus();
            let masked = 1 + rng.below(n - 1);
            let (spin, _) = Spinners::start(&h, &[masked], false, true, Duration::from_secs(2));
            let callers = 2 + rng.below(4);
            let go = Arc::new(AtomicBool::new(false));
            let mut plan = Vec::new();
            for _ in 0..callers {
                let crash = rng.one_in(2);
                // A CPU caller on a CPU other than the masked one, or an outside thread.
                let cpu = (rng.one_in(2) && n > 2).then(|| {
                    let mut c = rng.below(n);
                    if c == masked {
                        c = (c + 1) % n;
                    }
                    c
                });
                plan.push((crash, cpu));
            }
            let calls = std::thread::scope(|s| {
                let mut outside = Vec::new();
                let mut jobs = Vec::new();
                for &(crash, cpu) in &plan {
                    let go2 = go.clone();
                    match cpu {
                        None => {
                            let h = &h;
                            outside.push(s.spawn(move || {
                                wait_go(&go2);
                                let started = Instant::now();
                                let r = stop(h, crash);
                                (crash, r, started, Instant::now())
                            }));
                        }
                        Some(c) => {
                            let hh = h.clone();
                            let job = h.run_on(c, move || {
                                wait_go(&go2);
                                let started = Instant::now();
                                let r = stop(&hh, crash);
                                (r, started, Instant::now())
                            });
                            if let Ok(j) = job {
                                jobs.push((crash, c, j));
                            }
                        }
                    }
                }
                go.store(true, Ordering::Release);
                let mut calls = Vec::new();
                for t in outside {
                    match t.join() {
                        Ok((crash, r, started, returned)) => calls.push(Call {
                            crash,
                            cpu: None,
                            result: Some(r),
                            started,
                            returned,
                        }),
                        Err(_) => ctx.violation("panics", None, "a stop caller panicked"),
                    }
                }
                for (crash, c, j) in jobs {
                    let now = Instant::now();
                    match j.join_timeout(stop_bound() + START_BOUND) {
                        Ok((r, started, returned)) => calls.push(Call {
                            crash,
                            cpu: Some(c),
                            result: Some(r),
                            started,
                            returned,
                        }),
                        // Parked by the winner or by its own losing call (a powered-off CPU
                        // unwinds its job), or stopped before the job started: no result.
                        Err(
                            usmp::RuntimeError::JobStopped { .. }
                            | usmp::RuntimeError::JobLost { .. },
                        ) => {
                            ctx.count("cpu_callers_parked", 1);
                            calls.push(Call {
                                crash,
                                cpu: Some(c),
                                result: None,
                                started: now,
                                returned: now,
                            });
                        }
                        Err(usmp::RuntimeError::JobPanicked { ref message, .. })
                            if message.contains(PARKED) =>
                        {
                            ctx.count("cpu_callers_parked", 1);
                            calls.push(Call {
                                crash,
                                cpu: Some(c),
                                result: None,
                                started: now,
                                returned: now,
                            });
                        }
                        Err(usmp::RuntimeError::JobTimeout { .. }) => ctx.violation(
                            "hangs",
                            Some(c),
                            format!("a stop caller on CPU {c} neither returned nor parked within {:.1}s", (stop_bound() + START_BOUND).as_secs_f64()),
                        ),
                        Err(e) => ctx.violation("hangs", Some(c), format!("stop caller job: {e}")),
                    }
                }
                calls
            });
            spin.release();
            judge(ctx, &calls, mode_name(mode));
            ctx.iteration();
            drop(rt);
            ctx.unwatch();
            // CPUs still parked after the teardown released them, but the (resumable)
            // spinner's: callers stopped inside their job before they could park themselves.
            // Their threads stay behind (the runtime's documented user-facing case), the only
            // ones allowed to.
            let stranded = (0..n)
                .filter(|&c| c != masked && h.cpu_state(c) == Some(CpuRunState::Parked))
                .count();
            ctx.count("cpu_callers_stranded", stranded as u64);
            check_threads(ctx, n, ctx.get("cpu_callers_stranded"));
        }
        Ok(())
    }
}

fn judge(ctx: &Ctx, calls: &[Call], mode: &str) {
    let winners: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c.result, Some(Ok(_))))
        .collect();
    ctx.max("winners_max", winners.len() as u64);
    for c in calls {
        if c.cpu.is_none() && c.returned.duration_since(c.started) > stop_bound() {
            ctx.violation(
                "hangs",
                None,
                format!(
                    "{} from outside returned after {:.0} ms (bound {:.0} ms)",
                    if c.crash { "crash_stop" } else { "send_stop" },
                    c.returned.duration_since(c.started).as_secs_f64() * 1e3,
                    stop_bound().as_secs_f64() * 1e3
                ),
            );
        }
        if let Some(Err(StopError::InProgress { upgraded: true })) = c.result {
            ctx.count("upgrades", 1);
        }
    }
    let w = match winners.as_slice() {
        [w] => *w,
        [] => {
            ctx.violation(
                "winners_max",
                None,
                format!("{mode}: {} callers, no winner", calls.len()),
            );
            return;
        }
        many => {
            let who: Vec<String> = many
                .iter()
                .map(|c| c.cpu.map_or("outside".into(), |c| format!("CPU {c}")))
                .collect();
            ctx.violation(
                "winners_max",
                many.iter().find_map(|c| c.cpu),
                format!("{mode}: {} winners: {}", many.len(), who.join(", ")),
            );
            return;
        }
    };
    let Some(Ok(out)) = &w.result else { return };
    if w.cpu.is_some() {
        ctx.count("cpu_winners", 1);
    }
    ctx.count(
        if out.crash {
            "rounds_crash"
        } else {
            "rounds_plain"
        },
        1,
    );
    for c in out.failed.iter() {
        ctx.violation(
            "failed_to_stop",
            Some(c),
            format!("{mode}: CPU {c} still online after the stop"),
        );
    }
    // A crash caller that entered while the winner's first attempt was still waiting must
    // have turned the stop into a crash-stop.
    let first_attempt_end = w.started + FIRST_WAIT;
    let crash_during = calls.iter().any(|c| {
        c.crash
            && match &c.result {
                Some(Err(StopError::InProgress { upgraded })) => {
                    *upgraded || c.returned < first_attempt_end
                }
                Some(Ok(_)) => true,
                _ => false,
            }
            && c.returned <= w.returned
    });
    if (w.crash || crash_during) && !out.crash {
        ctx.violation(
            "crash_lost",
            w.cpu,
            format!(
                "{mode}: a crash_stop {} but the stop ended as a plain stop",
                if w.crash {
                    "won"
                } else {
                    "came during a send_stop"
                }
            ),
        );
    }
}
