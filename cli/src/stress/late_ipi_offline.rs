//! `late-ipi-offline` (seed 002): calls queued to a CPU that is going offline, their doorbells
//! delayed, so they are still in its queue when it dies. The dying step must run them
//! (`flush_smp_call_function_queue` from `smpcfd_dying_cpu`). Catches
//! `--broken skip-dying-flush`.
//!
//! Each round:
//! 1. picks a victim CPU (never CPU 0, so one CPU always stays online);
//! 2. two outside threads and a job on CPU 0 send calls to the victim (mostly async, some
//!    sync) as fast as they can, each with a ledger token; with the default `doorbell-delay`
//!    many sit queued without a doorbell;
//! 3. after a short random spin, `cpu_down(victim)` runs while they send; the senders stop
//!    once it has returned;
//! 4. checked at once, with no waiting (an offline CPU can run nothing any more): every call
//!    accepted for the victim ran exactly once (`lost_calls`, `double_runs`), every refused
//!    call never ran (`refused_runs`), and no callback ran on the victim once it had left the
//!    online mask other than by the dying flush (`runs_on_offline_cpu`): neither after
//!    `cpu_down` returned (the callbacks watch for that) nor through the IPI handler's
//!    "IPI on offline CPU" path (the runtime's `ipi_on_offline`: a late doorbell ran work the
//!    dying step should have flushed). Those warnings are also counted over the run
//!    (`offline_ipi_warnings`, the kernel's WARN);
//! 5. brings the victim back (with `slow-boot`, sometimes slowly).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{this_cpu, CpuId, Handle, HotplugError, IpiError};

use super::calls::{Expect, Ledger, Token};
use super::host_sched::Window;
use super::timeouts::{self, Failure, Wait};
use super::{Ctx, Scenario, ScenarioError};
use crate::rng::Rng;

/// Senders give up after this long even if the victim never goes down.
const SEND_BOUND: Duration = Duration::from_secs(3);
/// Bound on a round's waits (bring-back, an undowned victim's calls).
const SETTLE: Duration = Duration::from_secs(5);
/// A fresh runtime this often.
const RUNTIME_ROUNDS: u64 = 200;

/// What a round shares with its callbacks (atomics only: they run in IPI context).
struct Round {
    victim: CpuId,
    /// `cpu_down(victim)` has returned Ok.
    down: AtomicBool,
    /// Callbacks that ran on the victim after that.
    late_runs: AtomicU32,
}

fn callback(round: &Arc<Round>, tok: &Arc<Token>) -> impl FnOnce() + Send + 'static {
    let (r, t) = (round.clone(), tok.clone());
    move || {
        if this_cpu() == Some(r.victim) && r.down.load(Ordering::Acquire) {
            r.late_runs.fetch_add(1, Ordering::Relaxed);
        }
        t.hit();
    }
}

/// Step 2: sends to the victim until `stop`; returns the tokens and what each must see.
fn send_until(
    h: &Handle,
    round: &Arc<Round>,
    mut rng: Rng,
    stop: &AtomicBool,
) -> Vec<(Arc<Token>, Expect)> {
    let mut filed = Vec::new();
    let t = Instant::now();
    while !stop.load(Ordering::Relaxed) && t.elapsed() < SEND_BOUND {
        let tok = Ledger::token();
        let wait = rng.one_in(8) && !usmp::irqs_disabled();
        let expect = match h.call_single(round.victim, callback(round, &tok), wait) {
            Ok(()) => Expect::Once,
            Err(IpiError::Offline { .. }) => Expect::Never,
            Err(IpiError::Timeout { started: false, .. }) => Expect::Never,
            Err(_) => Expect::AtMostOnce,
        };
        filed.push((tok, expect));
        if expect == Expect::Never {
            // The victim is going away: the race this round is about is over.
            break;
        }
        if filed.len() % 16 == 0 {
            std::thread::yield_now();
        }
    }
    filed
}

pub struct LateIpiOffline;

impl Scenario for LateIpiOffline {
    fn name(&self) -> &'static str {
        "late-ipi-offline"
    }

    fn about(&self) -> &'static str {
        "calls queued to a CPU going offline, doorbells delayed (seed 002); lost_calls, double_runs, runs_on_offline_cpu stay 0; offline_ipi_warnings counted"
    }

    fn counters(&self) -> &'static [&'static str] {
        &[
            "lost_calls",
            "double_runs",
            "refused_runs",
            "runs_on_offline_cpu",
            "hotplug_timeouts",
            "offline_ipi_warnings",
            "calls_accepted",
            "calls_refused",
            "offlines",
            "offline_failures",
        ]
    }

    fn default_faults(&self) -> &'static str {
        "doorbell-delay=1ms,preempt,slow-boot=5ms"
    }

    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError> {
        let mut rng = ctx.rng(0);
        let mut round_no = 0u64;
        while ctx.running() {
            let rt = ctx.build(|b| b)?;
            let h = rt.handle();
            let mut n = 0;
            while n < RUNTIME_ROUNDS && ctx.running() {
                one_round(ctx, &h, &mut rng, round_no)?;
                round_no += 1;
                n += 1;
                ctx.iteration();
            }
            ctx.shutdown_checked(rt);
        }
        Ok(())
    }
}

fn one_round(ctx: &Ctx, h: &Handle, rng: &mut Rng, round_no: u64) -> Result<(), ScenarioError> {
    let n = h.cpus();
    let victim = 1 + rng.below(n - 1);
    let round = Arc::new(Round {
        victim,
        down: AtomicBool::new(false),
        late_runs: AtomicU32::new(0),
    });
    let warnings0 = h.stats().ipi_on_offline;
    let stop = Arc::new(AtomicBool::new(false));
    // A CPU-to-CPU sender on CPU 0.
    let job = {
        let (hh, r, s, seed) = (h.clone(), round.clone(), stop.clone(), rng.next());
        h.run_on(0, move || send_until(&hh, &r, Rng::new(seed), &s))
            .ok()
    };
    let (down, mut filed, window) = std::thread::scope(|s| {
        let senders: Vec<_> = (0..2)
            .map(|i| {
                let (r, st, sr) = (&round, &stop, ctx.rng(round_no * 4 + 1 + i));
                s.spawn(move || send_until(h, r, sr, st))
            })
            .collect();
        // Step 3: let some calls queue up first.
        let t = Instant::now();
        let lead = Duration::from_micros(rng.next() % 500);
        while t.elapsed() < lead {
            std::hint::spin_loop();
        }
        let window = Window::open(h);
        let down = h.cpu_down(victim);
        if down.is_ok() {
            round.down.store(true, Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        let mut filed = Vec::new();
        for t in senders {
            match t.join() {
                Ok(f) => filed.extend(f),
                Err(_) => ctx.violation("panics", None, "a sender thread panicked"),
            }
        }
        (down, filed, window)
    });
    stop.store(true, Ordering::Relaxed);
    if let Some(j) = job {
        match j.join_timeout(SETTLE) {
            Ok(f) => filed.extend(f),
            Err(e) => ctx.violation("panics", Some(0), format!("the CPU 0 sender: {e}")),
        }
    }
    match &down {
        Ok(()) => ctx.count("offlines", 1),
        Err(e) => {
            ctx.count("offline_failures", 1);
            let wait = Wait { h, window: &window };
            if timeouts::hotplug_failed(ctx, wait, "cpu_down", victim, e, None) == Failure::Other {
                ctx.violation("hotplug_errors", Some(victim), format!("cpu_down: {e}"));
            }
            // Still online: its calls may still be running; wait for them (bounded).
            let t = Instant::now();
            while t.elapsed() < SETTLE
                && filed
                    .iter()
                    .any(|(tok, e)| *e == Expect::Once && tok.runs() == 0)
            {
                ctx.heartbeat();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    // Step 4.
    let (mut accepted, mut refused) = (0, 0);
    for (tok, expect) in &filed {
        let runs = tok.runs();
        let bad = match expect {
            Expect::Once => {
                accepted += 1;
                match runs {
                    0 => Some((
                        "lost_calls",
                        "accepted, and not run when cpu_down returned".to_string(),
                    )),
                    1 => None,
                    r => Some(("double_runs", format!("ran {r} times"))),
                }
            }
            Expect::Never => {
                refused += 1;
                (runs > 0).then(|| {
                    (
                        "refused_runs",
                        format!("refused as offline, yet ran {runs} time(s)"),
                    )
                })
            }
            Expect::AtMostOnce => {
                (runs > 1).then(|| ("double_runs", format!("timed out, then ran {runs} times")))
            }
        };
        if let Some((counter, msg)) = bad {
            ctx.violation(
                counter,
                Some(victim),
                format!("call to CPU {victim} (going offline): {msg}"),
            );
        }
    }
    ctx.count("calls_accepted", accepted);
    ctx.count("calls_refused", refused);
    let warnings = h.stats().ipi_on_offline - warnings0;
    if warnings > 0 {
        ctx.count("offline_ipi_warnings", warnings);
        ctx.violation(
            "runs_on_offline_cpu",
            Some(victim),
            format!("{warnings} callback(s) run by a late doorbell after CPU {victim} left the online mask (IPI on offline CPU), not by the dying flush"),
        );
    }
    let late = round.late_runs.load(Ordering::Relaxed);
    if late > 0 {
        ctx.violation(
            "runs_on_offline_cpu",
            Some(victim),
            format!("{late} callback(s) ran on CPU {victim} after cpu_down returned"),
        );
    }
    // Step 5.
    if down.is_ok() {
        if let Some(max) = ctx.faults.slow_boot.filter(|_| rng.one_in(4)) {
            let d = Duration::from_micros(rng.next() % (max.as_micros() as u64 + 1));
            let _ = h.faults().set_boot_delay(victim, d);
        }
        bring_back(ctx, h, victim);
    }
    Ok(())
}

fn bring_back(ctx: &Ctx, h: &Handle, cpu: CpuId) {
    let deadline = Instant::now() + SETTLE;
    loop {
        match h.cpu_up(cpu) {
            Ok(()) | Err(HotplugError::AlreadyOnline { .. }) => return,
            Err(HotplugError::Limbo { .. } | HotplugError::BootTimeout { .. })
                if Instant::now() < deadline =>
            {
                h.wait_limbo_clear(SETTLE);
            }
            Err(e) => {
                ctx.violation("bring_up_failures", Some(cpu), format!("cpu_up: {e}"));
                return;
            }
        }
    }
}
