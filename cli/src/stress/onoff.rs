//! `onoff`: rcutorture-style random CPU online/offline while IPIs flow. `usmp run --workload
//! hotplug` is [`hotplug_churn`], the same churn with a fixed seed and a plain report.
//!
//! 1. A sender thread loops until the churn ends, sending `call_single` (sync or async) to a
//!    random CPU of the current online mask, each call with a ledger token (`calls.rs`):
//!    accepted calls must run exactly once (`lost_calls`, `double_runs`), calls refused because
//!    the CPU went offline must never run (`refused_runs`). The ledger is checked as it goes.
//! 2. The controller picks a random CPU and toggles it: `cpu_down` if it is online and not the
//!    last online CPU, `cpu_up` if it is offline (with `slow-boot`, some bring-ups are slowed).
//!    Every try is an attempt; a success is timed (min/avg/max µs per direction). A failure
//!    is judged by `timeouts.rs`: a timeout with every CPU healthy is `hotplug_timeouts`, a
//!    protocol refusal is counted (`hotplug_refusals`), anything else is `hotplug_errors`. Now and then,
//!    with one CPU left, it asks for that CPU to go down: the runtime must refuse
//!    (`last_cpu_offlined` otherwise), and the online mask must never be empty.
//! 3. At the end every offline CPU is brought back (waiting out a limbo), the sender is joined,
//!    and every accepted call must have run (bounded wait).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use usmp::{CpuId, Handle, HotplugError, IpiError};

use super::calls::{Expect, FirstViolation, Ledger, Sink};
use super::host_sched::Window;
use super::timeouts::{self, Failure, Wait};
use super::{Ctx, Scenario, ScenarioError};
use crate::rng::Rng;

/// Bound on bringing CPUs back, on a limbo wait, and on the final drain.
const SETTLE: Duration = Duration::from_secs(10);
/// The seed of `usmp run --workload hotplug`.
const WORKLOAD_SEED: u64 = 0xD1B5_4A32_D192_ED03;
/// An accepted call that has not run after this long is lost.
const LOST_AFTER: Duration = Duration::from_secs(5);
/// The scenario builds a fresh runtime this often (start-up and shutdown are covered too).
const ROUND: Duration = Duration::from_secs(10);

/// One direction of the churn (rcutorture's `n_online_attempts`, `n_online_successes`,
/// `sum_online`, `min_online`, `max_online`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OnOffStats {
    pub attempts: u64,
    pub successes: u64,
    /// Time of the fastest / slowest successful operation, and the mean of the successful ones.
    pub min_us: u64,
    pub avg_us: u64,
    pub max_us: u64,
    #[serde(skip)]
    sum_us: u64,
}

impl OnOffStats {
    fn record(&mut self, took: Option<Duration>) {
        self.attempts += 1;
        let Some(d) = took else { return };
        let us = d.as_micros() as u64;
        self.min_us = if self.successes == 0 {
            us
        } else {
            self.min_us.min(us)
        };
        self.max_us = self.max_us.max(us);
        self.successes += 1;
        self.sum_us += us;
        self.avg_us = self.sum_us / self.successes;
    }
}

/// What a churn did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OnOffReport {
    /// Wall time of the churn phase.
    pub elapsed_ms: u64,
    /// The stop flag ended the run before `duration` did.
    pub interrupted: bool,
    /// `cpu_up` during the churn (not counting the final bring-back).
    pub onlines: OnOffStats,
    /// `cpu_down` during the churn.
    pub offlines: OnOffStats,
    /// The first failed hotplug operation, if any (the churn went on).
    pub first_failure: Option<String>,
    /// CPUs that were offline when the churn ended and were brought back.
    pub brought_back: u64,
    /// Calls sent while churning: accepted (sync and async), refused because the target was
    /// offline, and callbacks that ran.
    pub calls_sync: u64,
    pub calls_async: u64,
    pub calls_offline: u64,
    pub callbacks_run: u64,
}

/// Why the hotplug workload failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugChurnError {
    #[error("hotplug workload: needs at least 2 CPUs, the runtime has {cpus}")]
    TooFewCpus { cpus: usize },
    /// A CPU could not be brought back online at the end.
    #[error("hotplug workload: cannot bring CPU {cpu} back online: {source}")]
    BringBack {
        cpu: CpuId,
        #[source]
        source: HotplugError,
    },
    /// A call failed with something other than `Offline`.
    #[error("hotplug workload: call_single to CPU {cpu}: {source}")]
    Ipi {
        cpu: CpuId,
        #[source]
        source: IpiError,
    },
    #[error("hotplug workload: cannot start the IPI sender thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("hotplug workload: the IPI sender thread panicked")]
    SenderPanicked,
    /// An invariant broke (the first one).
    #[error("hotplug workload: {0}")]
    Violation(String),
}

/// What the sender did.
#[derive(Default)]
struct Sent {
    sync: u64,
    asynchronous: u64,
    offline: u64,
    ran: u64,
}

/// Step 1.
fn send_calls(
    h: &Handle,
    mut rng: Rng,
    sink: &dyn Sink,
    done: &AtomicBool,
) -> Result<Sent, (CpuId, IpiError)> {
    let mut ledger = Ledger::new(LOST_AFTER);
    let mut sent = Sent::default();
    let mut n = 0u64;
    while !done.load(Ordering::Relaxed) {
        n += 1;
        if n % 256 == 0 {
            ledger.check(sink, false);
        }
        let Some(cpu) = rng.pick(&h.online_mask()) else {
            std::thread::yield_now();
            continue;
        };
        let wait = rng.one_in(2);
        let tok = Ledger::token();
        let t = tok.clone();
        match h.call_single(cpu, move || t.hit(), wait) {
            Ok(()) => {
                ledger.file(tok, cpu, Expect::Once);
                if wait {
                    sent.sync += 1;
                } else {
                    sent.asynchronous += 1;
                    // Async calls return at once: leave the CPUs and the csd pool some air.
                    std::thread::yield_now();
                }
            }
            Err(IpiError::Offline { .. }) => {
                ledger.file(tok, cpu, Expect::Never);
                sent.offline += 1;
            }
            Err(e) => return Err((cpu, e)),
        }
    }
    let deadline = Instant::now() + SETTLE;
    while !ledger.drained() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    ledger.check(sink, true);
    sent.ran = ledger.ran;
    Ok(sent)
}

/// Steps 1-3 on `h`: churns until `keep_going` (asked between operations, with the report so
/// far) says stop. Violations go to `sink`; errors are failures of the run itself.
fn churn(
    h: &Handle,
    rng: &mut Rng,
    slow_boot: Option<Duration>,
    sink: &dyn Sink,
    keep_going: &mut dyn FnMut(&OnOffReport) -> bool,
) -> Result<OnOffReport, HotplugChurnError> {
    let n = h.cpus();
    if n < 2 {
        return Err(HotplugChurnError::TooFewCpus { cpus: n });
    }
    let done = AtomicBool::new(false);
    let sender_rng = Rng::stream(rng.next(), 1);
    std::thread::scope(|s| {
        let sender = std::thread::Builder::new()
            .name("usmp-onoff-sender".into())
            .spawn_scoped(s, || send_calls(h, sender_rng, sink, &done))
            .map_err(HotplugChurnError::Spawn)?;

        // Step 2.
        let mut rep = OnOffReport::default();
        let start = Instant::now();
        while keep_going(&rep) {
            let online = h.online_mask();
            if online.is_empty() {
                sink.violation("last_cpu_offlined", None, "the online mask is empty".into());
                break;
            }
            if online.weight() == 1 && rng.one_in(16) {
                let last = online.first().unwrap_or(0);
                match h.cpu_down(last) {
                    Err(HotplugError::LastCpu { .. }) => {}
                    Ok(()) => sink.violation(
                        "last_cpu_offlined",
                        Some(last),
                        "cpu_down of the last online CPU succeeded".into(),
                    ),
                    Err(e) => sink.violation(
                        "last_cpu_offlined",
                        Some(last),
                        format!("cpu_down of the last online CPU: {e} (expected LastCpu)"),
                    ),
                }
                continue;
            }
            let cpu = rng.below(n);
            let mut delay = Duration::ZERO;
            let window = Window::open(h);
            let (op, r, stats) = if online.contains(cpu) {
                if online.weight() <= 1 {
                    continue;
                }
                let t = Instant::now();
                let r = h.cpu_down(cpu).map(|()| t.elapsed());
                ("cpu_down", r, &mut rep.offlines)
            } else {
                if let Some(max) = slow_boot.filter(|_| rng.one_in(4)) {
                    let d = Duration::from_micros(rng.next() % (max.as_micros() as u64 + 1));
                    // A CPU in limbo refuses the injection; its bring-up fails anyway.
                    if h.faults().set_boot_delay(cpu, d).is_ok() {
                        delay = d;
                    }
                }
                let t = Instant::now();
                (
                    "cpu_up",
                    h.cpu_up(cpu).map(|()| t.elapsed()),
                    &mut rep.onlines,
                )
            };
            match r {
                Ok(took) => stats.record(Some(took)),
                Err(e) => {
                    stats.record(None);
                    rep.first_failure.get_or_insert_with(|| e.to_string());
                    let excuse = matches!(&e, HotplugError::BootTimeout { timeout_ms, .. }
                        if delay.as_millis() as u64 >= *timeout_ms)
                    .then_some("slow-boot delayed it past the boot timeout");
                    let wait = Wait { h, window: &window };
                    if timeouts::hotplug_failed(sink, wait, op, cpu, &e, excuse) == Failure::Other {
                        sink.violation("hotplug_errors", Some(cpu), format!("{op}({cpu}): {e}"));
                    }
                }
            }
        }
        rep.elapsed_ms = start.elapsed().as_millis() as u64;

        // Step 3.
        let back = bring_all_back(h, &mut rep);
        done.store(true, Ordering::Relaxed);
        let sent = sender
            .join()
            .map_err(|_| HotplugChurnError::SenderPanicked)?;
        back?;
        let sent = sent.map_err(|(cpu, source)| HotplugChurnError::Ipi { cpu, source })?;
        rep.calls_sync = sent.sync;
        rep.calls_async = sent.asynchronous;
        rep.calls_offline = sent.offline;
        rep.callbacks_run = sent.ran;
        Ok(rep)
    })
}

/// Brings every offline CPU back online, waiting out a limbo first.
fn bring_all_back(h: &Handle, rep: &mut OnOffReport) -> Result<(), HotplugChurnError> {
    for cpu in 0..h.cpus() {
        if h.is_online(cpu) {
            continue;
        }
        let deadline = Instant::now() + SETTLE;
        loop {
            match h.cpu_up(cpu) {
                Ok(()) | Err(HotplugError::AlreadyOnline { .. }) => break,
                Err(HotplugError::Limbo { .. } | HotplugError::BootTimeout { .. })
                    if Instant::now() < deadline =>
                {
                    h.wait_limbo_clear(SETTLE);
                }
                Err(source) => return Err(HotplugChurnError::BringBack { cpu, source }),
            }
        }
        rep.brought_back += 1;
    }
    Ok(())
}

/// `usmp run --workload hotplug`: the churn for `duration` (or until `stop`) with a fixed
/// seed; a violated invariant is an error.
pub fn hotplug_churn(
    h: &Handle,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<OnOffReport, HotplugChurnError> {
    let first = FirstViolation::default();
    let start = Instant::now();
    let mut rng = Rng::new(WORKLOAD_SEED);
    let mut rep = churn(h, &mut rng, None, &first, &mut |_| {
        start.elapsed() < duration && !stop.load(Ordering::Relaxed)
    })?;
    rep.interrupted = stop.load(Ordering::Relaxed);
    match first.take() {
        Some(v) => Err(HotplugChurnError::Violation(v)),
        None => Ok(rep),
    }
}

/// The `onoff` scenario.
pub struct OnOff;

impl Scenario for OnOff {
    fn name(&self) -> &'static str {
        "onoff"
    }

    fn about(&self) -> &'static str {
        "random online/offline while IPIs flow; lost_calls, double_runs, refused_runs, last_cpu_offlined, hotplug_timeouts stay 0"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "lost_calls",
            "double_runs",
            "refused_runs",
            "last_cpu_offlined",
            "hotplug_timeouts",
            "hotplug_errors",
            "hotplug_refusals",
            "online_attempts",
            "online_successes",
            "online_min_us",
            "online_avg_us",
            "online_max_us",
            "offline_attempts",
            "offline_successes",
            "offline_min_us",
            "offline_avg_us",
            "offline_max_us",
            "calls_accepted",
            "calls_refused",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "doorbell-delay,preempt,slow-boot"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        while ctx.running() {
            let rt = ctx.build(|b| b)?;
            let h = rt.handle();
            let round_start = Instant::now();
            let mut first = true;
            // Each hotplug operation is an iteration.
            let rep = churn(&h, &mut rng, ctx.faults.slow_boot, ctx, &mut |_| {
                if !std::mem::take(&mut first) {
                    ctx.iteration();
                }
                ctx.running() && round_start.elapsed() < ROUND
            });
            match rep {
                Ok(r) => {
                    merge(ctx, &r);
                    ctx.count("calls_accepted", r.calls_sync + r.calls_async);
                    ctx.count("calls_refused", r.calls_offline);
                }
                Err(e) => ctx.violation("hotplug_errors", None, e.to_string()),
            }
            ctx.shutdown_checked(rt);
        }
        Ok(())
    }
}

/// Adds one round's churn to the scenario's totals (min/avg/max over every round).
fn merge(ctx: &Ctx, r: &OnOffReport) {
    for (dir, s) in [("online", &r.onlines), ("offline", &r.offlines)] {
        let key = |k: &str| format!("{dir}_{k}");
        let (n0, ok0) = (ctx.get(&key("attempts")), ctx.get(&key("successes")));
        let (min0, avg0) = (ctx.get(&key("min_us")), ctx.get(&key("avg_us")));
        ctx.set(&key("attempts"), n0 + s.attempts);
        ctx.set(&key("successes"), ok0 + s.successes);
        if s.successes > 0 {
            let min = if ok0 == 0 {
                s.min_us
            } else {
                min0.min(s.min_us)
            };
            ctx.set(&key("min_us"), min);
            ctx.max(&key("max_us"), s.max_us);
            ctx.set(
                &key("avg_us"),
                (avg0 * ok0 + s.avg_us * s.successes) / (ok0 + s.successes),
            );
        }
    }
}
