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
//!   parks (its job reports it stopped), within the same bound. Time the host kept the caller
//!   or a CPU thread runnable but off a core (`host_sched.rs`) is not counted: an overrun
//!   that only it explains is `host_starved`, not a violation;
//! - a crash always wins over a plain stop (`crash_lost`): the outcome is a crash when the
//!   winner called `crash_stop`, and also when a `crash_stop` loser reported that it upgraded
//!   the stop, or returned while the winner's first attempt was still waiting;
//! - no CPU is left running (`failed_to_stop`), unless the host kept its thread runnable but off
//!   a core for half the stop's waits or more (`host_starved`, with the numbers);
//! - after the runtime's teardown no CPU stays parked (`cpu_callers_stranded`): a CPU caller
//!   that another caller's stop parked inside its own `send_stop`/`crash_stop`, before it
//!   could park itself, is resumed into that call and leaves (the library's rule; the harness's
//!   callers opt in with `usmp::fault::resume_on_release` only while they wait to call, and the
//!   stop call clears it). A CPU stopped in the job runner before or after the caller's code
//!   is the runtime's documented case (`stopped_outside_caller_code`), its thread stays.
//!   `--broken stop-caller-stranded` turns the library's rule off; this check catches it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicU8;

use usmp::{CpuId, CpuRunState, Handle, ParkPolicy, StopError, StopOutcome};

use super::args::mode_name;
use super::host_sched::Window;
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
/// A CPU caller job's progress: queued, running the caller's code, returned from it.
const QUEUED: u8 = 0;
const IN_CODE: u8 = 1;
const RETURNED: u8 = 2;
/// After the teardown, a released CPU leaves its park within this (its thread must run).
const LEAVE_BOUND: Duration = Duration::from_secs(5);
/// How long a CPU caller's job may take beyond its bound before it counts as hung: time for
/// the host to give back what it took (judged with the window's numbers).
const JOIN_GRACE: Duration = Duration::from_secs(10);

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
    /// The longest time the host kept the caller or a CPU thread runnable but off a core
    /// while it waited (outside callers).
    host: Duration,
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
            "cpu_callers_stranded",
            "stopped_outside_caller_code",
            "host_starved",
            "threads_first",
            "threads_last",
        ]
    }

    fn default_faults(&self) -> &'static str {
        // `stop-call-delay`: half the CPU callers sleep at the entry of their stop call, where
        // another caller's stop catches them (the window of `cpu_callers_stranded`; without
        // it, 0 catches in 660 rounds at 16 CPUs).
        "doorbell-delay,preempt,stop-call-delay"
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
            let mut progress: Vec<(CpuId, Arc<AtomicU8>)> = Vec::new();
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
            let window = Window::open(&h);
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
                                let window = Window::open(h);
                                let started = Instant::now();
                                let r = stop(h, crash);
                                let returned = Instant::now();
                                (crash, r, started, returned, window.max_wait(h))
                            }));
                        }
                        Some(c) => {
                            let hh = h.clone();
                            let at = Arc::new(AtomicU8::new(QUEUED));
                            let at2 = at.clone();
                            let job = h.run_on(c, move || {
                                // Parked while it waits, the job may be resumed at teardown:
                                // it then calls the stop, which the torn-down runtime refuses
                                // (ShutDown), and returns. The stop call clears this.
                                usmp::fault::resume_on_release();
                                at2.store(IN_CODE, Ordering::SeqCst);
                                wait_go(&go2);
                                let started = Instant::now();
                                let r = stop(&hh, crash);
                                at2.store(RETURNED, Ordering::SeqCst);
                                (r, started, Instant::now())
                            });
                            if let Ok(j) = job {
                                jobs.push((crash, c, j));
                                progress.push((c, at));
                            }
                        }
                    }
                }
                go.store(true, Ordering::Release);
                let go_at = Instant::now();
                let mut calls = Vec::new();
                for t in outside {
                    match t.join() {
                        Ok((crash, r, started, returned, host)) => calls.push(Call {
                            crash,
                            cpu: None,
                            result: Some(r),
                            started,
                            returned,
                            host,
                        }),
                        Err(_) => ctx.violation("panics", None, "a stop caller panicked"),
                    }
                }
                let job_bound = stop_bound() + START_BOUND;
                for (crash, c, j) in jobs {
                    let r = j.join_timeout(
                        (go_at + job_bound + JOIN_GRACE).saturating_duration_since(Instant::now()),
                    );
                    let now = Instant::now();
                    // A job that ended (or parked) past its bound: the host's share of the
                    // wait is not counted (the window opened before the go).
                    let took = now.duration_since(go_at);
                    if took > job_bound && !matches!(r, Err(usmp::RuntimeError::JobTimeout { .. }))
                    {
                        let host = window.max_wait(&h);
                        let what = format!(
                            "the stop caller on CPU {c} returned or parked after {:.0} ms (bound {:.0} ms); the host kept a thread runnable but off a core for {:.0} ms of it",
                            took.as_secs_f64() * 1e3,
                            job_bound.as_secs_f64() * 1e3,
                            host.as_secs_f64() * 1e3
                        );
                        if took.saturating_sub(host) <= job_bound {
                            ctx.note("host_starved", what);
                        } else {
                            ctx.violation("hangs", Some(c), what);
                        }
                    }
                    match r {
                        Ok((r, started, returned)) => calls.push(Call {
                            crash,
                            cpu: Some(c),
                            result: Some(r),
                            started,
                            returned,
                            host: Duration::ZERO,
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
                                host: Duration::ZERO,
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
                                host: Duration::ZERO,
                            });
                        }
                        Err(usmp::RuntimeError::JobTimeout { .. }) => ctx.violation(
                            "hangs",
                            Some(c),
                            format!(
                                "a stop caller on CPU {c} neither returned nor parked within {:.1}s (the host kept a thread runnable but off a core for {:.0} ms meanwhile)",
                                (job_bound + JOIN_GRACE).as_secs_f64(),
                                window.max_wait(&h).as_secs_f64() * 1e3
                            ),
                        ),
                        Err(e) => ctx.violation("hangs", Some(c), format!("stop caller job: {e}")),
                    }
                }
                calls
            });
            spin.release();
            judge(ctx, &h, &window, &calls, mode_name(mode));
            ctx.iteration();
            drop(rt);
            ctx.unwatch();
            stranded(ctx, &h, &progress);
            check_threads(ctx, n, ctx.get("stopped_outside_caller_code"));
        }
        Ok(())
    }
}

/// After the teardown released the parked CPUs: every one of them leaves (the spinner and the
/// callers opted in or were inside their own stop call), but one stopped in the job runner
/// outside the caller's code (the runtime's documented case). Waits for them at most
/// `LEAVE_BOUND`; only a CPU still parked then is judged.
fn stranded(ctx: &Ctx, h: &Handle, progress: &[(CpuId, Arc<AtomicU8>)]) {
    let parked = || {
        (0..h.cpus())
            .filter(|&c| h.cpu_state(c) == Some(CpuRunState::Parked))
            .collect::<Vec<_>>()
    };
    let t = Instant::now();
    let mut left = parked();
    while !left.is_empty() && t.elapsed() < LEAVE_BOUND {
        std::thread::yield_now();
        left = parked();
    }
    for c in left {
        let in_code = progress
            .iter()
            .any(|(p, at)| *p == c && at.load(Ordering::SeqCst) == IN_CODE);
        if in_code {
            ctx.violation(
                "cpu_callers_stranded",
                Some(c),
                format!("CPU {c} still parked {:.1}s after the teardown released it: a stop caught its job waiting to call or inside its own stop call, and it did not leave", LEAVE_BOUND.as_secs_f64()),
            );
        } else {
            ctx.count("stopped_outside_caller_code", 1);
        }
    }
}

fn judge(ctx: &Ctx, h: &Handle, window: &Window, calls: &[Call], mode: &str) {
    let winners: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c.result, Some(Ok(_))))
        .collect();
    ctx.max("winners_max", winners.len() as u64);
    for c in calls {
        let took = c.returned.duration_since(c.started);
        if c.cpu.is_none() && took > stop_bound() {
            let what = format!(
                "{} from outside returned after {:.0} ms (bound {:.0} ms); the host kept a thread it waited for runnable but off a core for {:.0} ms of it",
                if c.crash { "crash_stop" } else { "send_stop" },
                took.as_secs_f64() * 1e3,
                stop_bound().as_secs_f64() * 1e3,
                c.host.as_secs_f64() * 1e3
            );
            if took.saturating_sub(c.host) <= stop_bound() {
                ctx.note("host_starved", what);
            } else {
                ctx.violation("hangs", None, what);
            }
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
    // The stop's waits: a CPU thread the host kept off a core for half of them or more could
    // not have answered in time.
    let waits = FIRST_WAIT + NMI_WAIT * (ATTEMPTS - 1);
    for c in out.failed.iter() {
        if let Some(numbers) = window.starved_cpu_within(h, c, waits) {
            ctx.note(
                "host_starved",
                format!("{mode}: CPU {c} not stopped, its thread starved by the host: {numbers}"),
            );
        } else {
            ctx.violation(
                "failed_to_stop",
                Some(c),
                format!(
                    "{mode}: CPU {c} still online after the stop ({})",
                    window.describe(h, c)
                ),
            );
        }
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
