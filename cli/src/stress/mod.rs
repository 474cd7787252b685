//! `usmp stress`: a torture harness in the spirit of rcutorture and locktorture. Each scenario
//! drives the runtime through the races of one seed thread, checks its invariants while it runs
//! and counts what happened; faults come from the library's injector (`usmp::fault`), and
//! `--broken` switches a protocol to a deliberately broken variant that its scenario must catch.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the `Scenario` trait, the registry [`SCENARIOS`], the [`BROKEN`] table, `Ctx` (what a scenario gets), the runner |
//! | `args.rs` | `usmp stress` arguments and their checks (typed errors, exit 2), the replay command |
//! | `check.rs` | `Tally`: counters, violations, progress |
//! | `watchdog.rs` | `Monitor`: hang detection with every CPU's NMI-sampled IP, the trace window |
//! | `faults.rs` | `--faults LIST` -> `usmp::fault::Faults` and the scenario-injected faults |
//! | `host_load.rs` | `--host-load N`: unpinned busy threads beside the runtime for the whole run |
//! | `host_sched.rs` | per-thread host scheduler counters across a wait: host starvation told apart from a bug |
//! | `report.rs` | progress (indicatif or plain lines), the counters table, `--json`, the failure report |
//! | `timeouts.rs` | failed `cpu_up`/`cpu_down`/`stop_machine`: timeouts are violations, protocol refusals are counted apart |
//! | `calls.rs` | the exactly-once ledger for calls a scenario sends (`lost_calls`, `double_runs`, `refused_runs`) |
//! | `spinners.rs` | irq-masked and wedged spinner jobs for the stop scenarios |
//! | `ipi_storm.rs` | `ipi-storm`: every kind of call at once; catches `doorbell-never-rings` |
//! | `late_ipi_offline.rs` | `late-ipi-offline` (seed 002): calls racing `cpu_down`; catches `skip-dying-flush` |
//! | `concurrent_stop.rs` | `concurrent-stop` (seed 001): stop and crash-stop callers at once |
//! | `irqs_off.rs` | `irqs-off`: irq-masked CPUs need the NMI attempt; catches `stop-without-retries` |
//! | `wedged.rs` | `wedged`: a CPU that not even the NMI reaches; the stop stays bounded |
//! | `onoff.rs` | `onoff`: random online/offline while IPIs flow (also `usmp run --workload hotplug`) |
//!
//! # Adding a scenario
//!
//! Write `cli/src/stress/<name>.rs` with a unit struct implementing [`Scenario`], add
//! `mod <name>;` below and one `&<name>::Struct,` line to [`SCENARIOS`]. In `run`, loop
//! `while ctx.running()`, call `ctx.iteration()` once per round, build runtimes with
//! `ctx.build(|b| b...)` (width, trace, seed, faults and `--broken` already applied; the
//! watchdog watches the newest), report with `ctx.count/set/max` and `ctx.violation`, and bound
//! every wait (the watchdog ends a run that stalls for `--hang-timeout`).

mod args;
mod calls;
mod check;
mod faults;
mod host_load;
mod host_sched;
mod report;
mod timeouts;
mod watchdog;

mod spinners;

mod concurrent_stop;
mod ipi_storm;
mod irqs_off;
mod late_ipi_offline;
mod onoff;
mod wedged;

mod bringup_timeout;
mod kexec_cycle;
mod reboot_cpu;
mod stop_during_bringup;
mod stop_machine;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use usmp::fault::Broken;
use usmp::{Builder, Handle, Runtime, StopMode};

pub use args::Args;
pub use faults::FaultSet;
pub use onoff::{hotplug_churn, HotplugChurnError, OnOffReport};

use crate::rng::Rng;
use crate::signals::Signals;
use check::Tally;
use watchdog::Monitor;

/// Every scenario, in the order `all` runs them. One line each.
pub static SCENARIOS: &[&dyn Scenario] = &[
    &ipi_storm::IpiStorm,
    &onoff::OnOff,
    &late_ipi_offline::LateIpiOffline,
    &concurrent_stop::ConcurrentStop,
    &irqs_off::IrqsOff,
    &wedged::Wedged,
    // Scenarios of the second helper go here, one line each.
    &bringup_timeout::BringupTimeout,
    &stop_during_bringup::StopDuringBringup,
    &reboot_cpu::RebootCpu,
    &kexec_cycle::KexecCycle,
    &stop_machine::StopMachine,
];

/// The deliberately broken protocol variants: `--broken` name, the library's variant, and the
/// scenario that must catch it.
pub const BROKEN: &[(&str, Broken, &str)] = &[
    (
        "skip-dying-flush",
        Broken::SkipDyingFlush,
        "late-ipi-offline",
    ),
    (
        "stop-without-retries",
        Broken::StopWithoutRetries,
        "irqs-off",
    ),
    (
        "bringup-without-cas",
        Broken::BringupWithoutCas,
        "bringup-timeout",
    ),
    (
        "doorbell-never-rings",
        Broken::DoorbellNeverRings,
        "ipi-storm",
    ),
    (
        "stop-caller-stranded",
        Broken::StopCallerStranded,
        "concurrent-stop",
    ),
];

/// One torture scenario. Implementations are unit structs registered in [`SCENARIOS`].
pub trait Scenario: Sync {
    /// `--scenario` name, kebab-case.
    fn name(&self) -> &'static str;
    /// One line for `--help`: what it does and which invariants it checks.
    fn about(&self) -> &'static str;
    /// Counters shown even when 0, in this order (invariant counters first).
    fn counters(&self) -> &'static [&'static str];
    /// Its fault set when `--faults` is not given, in `--faults` syntax ("none" for none).
    fn default_faults(&self) -> &'static str;
    /// Whether `--mode` matters to it (it runs its stops in each selected mode).
    fn uses_stop_mode(&self) -> bool {
        false
    }
    /// Runs until `ctx.running()` is false; see the module doc. An `Err` is a harness failure
    /// (exit 2), not a violation.
    fn run(&self, ctx: &Ctx) -> Result<(), ScenarioError>;
}

/// A scenario could not do its work at all (not a violated invariant).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot start a runtime: {0}")]
    Build(#[from] usmp::RuntimeError),
    #[error("cannot start a thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// The run's flags every scenario sees.
struct Flags {
    /// Ctrl-C.
    interrupt: Arc<AtomicBool>,
    /// The watchdog fired: wind down now.
    abort: AtomicBool,
}

/// What a scenario gets: the run's settings, its seeded randomness, its counters and the
/// watchdog. Shared by reference with the scenario's own threads.
pub struct Ctx {
    pub name: &'static str,
    /// `--cpus`.
    pub cpus: usize,
    /// `--seed` (each scenario and stream derives its own generator from it).
    pub seed: u64,
    /// The faults in force for this scenario.
    pub faults: FaultSet,
    /// `--broken`, when this scenario is the one that must catch it.
    pub broken: Option<Broken>,
    /// The stop modes `--mode` selected (one or both).
    pub modes: Vec<StopMode>,
    /// How long the scenario runs, or how many iterations.
    limit: Limit,
    tally: Arc<Tally>,
    monitor: Arc<Monitor>,
    flags: Arc<Flags>,
    start: Instant,
}

#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Duration(Duration),
    Iterations(u64),
}

impl Limit {
    /// The fewest iterations a scenario must complete for its pass to mean something: about
    /// one per second of its share (at least 1), or every iteration asked for.
    pub fn min_iterations(&self) -> u64 {
        match *self {
            Limit::Duration(d) => d.as_secs().max(1),
            Limit::Iterations(k) => k,
        }
    }
}

impl Ctx {
    /// Whether to start another iteration: not past the duration or iteration count, not
    /// interrupted, not ended by the watchdog. A `--broken` run ends at its first violation:
    /// the variant is caught, and how fast is the result.
    pub fn running(&self) -> bool {
        if self.aborted() || (self.broken.is_some() && self.tally.violations() > 0) {
            return false;
        }
        match self.limit {
            Limit::Duration(d) => self.start.elapsed() < d,
            Limit::Iterations(k) => self.tally.iterations() < k,
        }
    }

    /// Whether the watchdog or Ctrl-C ended the run (cleanup should be quick).
    pub fn aborted(&self) -> bool {
        self.flags.abort.load(Ordering::Relaxed) || self.flags.interrupt.load(Ordering::Relaxed)
    }

    /// One round done (also progress for the watchdog).
    pub fn iteration(&self) {
        self.tally.iteration();
    }

    /// Progress inside a long round, for the watchdog.
    pub fn heartbeat(&self) {
        self.tally.heartbeat();
    }

    pub fn count(&self, counter: &str, n: u64) {
        self.tally.add(counter, n);
    }

    pub fn set(&self, counter: &str, v: u64) {
        self.tally.set(counter, v);
    }

    pub fn max(&self, counter: &str, v: u64) {
        self.tally.max(counter, v);
    }

    pub fn get(&self, counter: &str) -> u64 {
        self.tally.get(counter)
    }

    /// An invariant broke: counts it in `counter` (and the run's total) and keeps the text of
    /// the first few, with the CPU when there is one. Never from IPI context.
    pub fn violation(&self, counter: &str, cpu: Option<usmp::CpuId>, message: impl Into<String>) {
        self.tally.violation(counter, cpu, message.into());
    }

    /// Something worth reporting that is not a violation (`host_starved`): counted, and the
    /// first few kept with their text.
    pub fn note(&self, counter: &str, message: impl Into<String>) {
        self.tally.note(counter, message.into());
    }

    /// Independent generator `stream` of this scenario's seed.
    pub fn rng(&self, stream: u64) -> Rng {
        Rng::stream(self.seed ^ fnv(self.name), stream)
    }

    /// The stop mode of round `i` (alternating when both are selected).
    pub fn mode(&self, i: u64) -> StopMode {
        self.modes[(i % self.modes.len() as u64) as usize]
    }

    /// Builds a runtime of `--cpus` CPUs that collects its event rings for the failure trace,
    /// with `configure` applied, the run's seed and library faults set, `--broken` switched on,
    /// and the watchdog watching it.
    pub fn build(
        &self,
        configure: impl FnOnce(Builder) -> Builder,
    ) -> Result<Runtime, ScenarioError> {
        let b = Builder::new()
            .cpus(self.cpus)
            .collect_trace(true)
            .name(format!("stress-{}", self.name));
        let rt = configure(b).build()?;
        self.arm(&rt.handle());
        Ok(rt)
    }

    /// Seeds and arms the fault injector of `h` (a next image after kexec) and watches it
    /// (also progress, for the watchdog).
    pub fn arm(&self, h: &Handle) {
        self.faults
            .apply(&h.faults(), self.seed ^ fnv(self.name) ^ h.generation());
        if let Some(b) = self.broken {
            h.faults().set_broken(b, true);
        }
        self.monitor.watch(Some(h.clone()));
        // A runtime built is progress: a hang reported from here on has CPUs to dump (on a
        // loaded host a build alone once outlasted a 30 ms --hang-timeout).
        self.heartbeat();
    }

    /// Stops watching (before a runtime is shut down on purpose).
    pub fn unwatch(&self) {
        self.monitor.watch(None);
    }

    /// Shuts `rt` down (unwatched first) and reports every call it lost: one that neither ran
    /// nor was cancelled by its sender.
    pub fn shutdown_checked(&self, rt: Runtime) {
        self.unwatch();
        let fin = rt.shutdown();
        if fin.lost_calls != 0 {
            self.violation(
                "lost_calls",
                None,
                format!(
                    "{} calls neither ran nor were cancelled at shutdown",
                    fin.lost_calls
                ),
            );
        }
    }
}

/// FNV-1a of a scenario name, so each scenario's generators differ under one seed.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn find(name: &str) -> Option<&'static dyn Scenario> {
    SCENARIOS.iter().copied().find(|s| s.name() == name)
}

/// What one scenario run produced.
pub struct ScenarioResult {
    pub name: &'static str,
    pub iterations: u64,
    pub violations: u64,
    pub counters: Vec<(String, u64)>,
    pub first: Vec<check::Violation>,
    /// The first notes (`host_starved`), not violations.
    pub notes: Vec<String>,
    pub elapsed: Duration,
    /// The replay command for this scenario.
    pub replay: String,
    /// Ended by Ctrl-C.
    pub interrupted: bool,
    /// The watchdog fired and the scenario's thread did not come back: it is left running and
    /// the process must exit.
    pub abandoned: bool,
    /// The fewest iterations that make a pass mean something ([`Limit::min_iterations`]).
    pub min_iterations: u64,
    /// It ran to its end with fewer than `min_iterations` and no violation: the host was too
    /// busy for it, and nothing was checked (exit 3, not a pass).
    pub starved: bool,
}

impl ScenarioResult {
    /// A `--broken` run that ended without catching its variant (exit 4, not a pass).
    pub fn not_caught(&self, broken: bool) -> bool {
        broken && self.violations == 0 && !self.interrupted && !self.starved
    }
}

/// How long a scenario whose watchdog fired gets to return before it is abandoned.
const ABANDON_AFTER: Duration = Duration::from_secs(3);
/// The runner's tick: watchdog, trace drain, progress.
const TICK: Duration = Duration::from_millis(50);

/// Runs `usmp stress`: takes SIGINT (the run winds down and reports) and SIGQUIT (a dump of
/// the running scenario's runtime), then the scenarios. Its exit code is 0, or
/// [`EXIT_VIOLATION`], [`EXIT_STARVED`] or [`EXIT_NOT_CAUGHT`]; bad input and harness failures
/// are errors (exit 2).
pub fn run(a: Args, signals: Signals) -> anyhow::Result<ExitCode> {
    let sig = signals
        .take()
        .map_err(|e| anyhow::anyhow!("cannot start the signal thread: {e}"))?;
    stress(a, sig.stop, sig.quit_target)
}

/// The run itself. `quit_target` is what SIGQUIT dumps: kept pointing at the running
/// scenario's runtime.
fn stress(
    a: Args,
    interrupt: Arc<AtomicBool>,
    quit_target: Arc<Mutex<Option<Handle>>>,
) -> anyhow::Result<ExitCode> {
    let plan = args::plan(a)?;
    let flags = Arc::new(Flags {
        interrupt,
        abort: AtomicBool::new(false),
    });
    let mut progress = report::Progress::new(&plan);
    report::header(&plan);
    let _load = host_load::HostLoad::start(plan.host_load)
        .map_err(|e| anyhow::anyhow!("cannot start the --host-load threads: {e}"))?;
    let mut results = Vec::new();
    let mut failure_trace = None;
    for sc in &plan.scenarios {
        if flags.interrupt.load(Ordering::Relaxed) || flags.abort.load(Ordering::Relaxed) {
            break;
        }
        let monitor = Arc::new(Monitor::new(plan.hang_timeout));
        let (res, err) = run_one(*sc, &plan, &flags, &monitor, &mut progress, &quit_target);
        *quit_target.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if res.violations > 0 && failure_trace.is_none() {
            failure_trace = monitor.take_failure();
        }
        let stop = res.abandoned;
        results.push(res);
        if let Some(e) = err {
            progress.finish();
            report::print(
                &plan,
                &results,
                flags.interrupt.load(Ordering::Relaxed),
                None,
            )?;
            return Err(anyhow::Error::new(e).context(format!("scenario {}", sc.name())));
        }
        if stop {
            break;
        }
    }
    progress.finish();
    let violated = results.iter().any(|r| r.violations > 0);
    let trace_path = match (violated, failure_trace) {
        (true, Some(t)) => Some(report::write_trace(&plan, &t)?),
        _ => None,
    };
    let interrupted = flags.interrupt.load(Ordering::Relaxed);
    report::print(&plan, &results, interrupted, trace_path.as_deref())?;
    if results.iter().any(|r| r.abandoned) {
        // A scenario thread is stuck inside the runtime: do not wait for it on the way out.
        exit_now(EXIT_VIOLATION);
    }
    let code = if violated {
        EXIT_VIOLATION
    } else if results.iter().any(|r| r.starved) {
        EXIT_STARVED
    } else if results.iter().any(|r| r.not_caught(plan.broken.is_some())) {
        EXIT_NOT_CAUGHT
    } else {
        0
    };
    Ok(ExitCode::from(code))
}

/// Exit codes of `usmp stress` besides 0 (every invariant held) and 2 (bad input, a harness
/// failure: `main.rs`). Listed in `--help` and the README.
pub const EXIT_VIOLATION: u8 = 1;
/// A scenario ran fewer than its minimum iterations: the host was too busy, nothing was judged.
pub const EXIT_STARVED: u8 = 3;
/// A `--broken` run ended without catching its variant.
pub const EXIT_NOT_CAUGHT: u8 = 4;

/// Flushes stdout and exits with `code` (a stuck scenario thread is not waited for).
fn exit_now(code: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code.into());
}

fn run_one(
    sc: &'static dyn Scenario,
    plan: &args::Plan,
    flags: &Arc<Flags>,
    monitor: &Arc<Monitor>,
    progress: &mut report::Progress,
    quit_target: &Mutex<Option<Handle>>,
) -> (ScenarioResult, Option<ScenarioError>) {
    let tally = Arc::new(Tally::new(sc.counters()));
    let broken = plan
        .broken
        .filter(|(_, _, owner)| *owner == sc.name())
        .map(|(_, b, _)| b);
    let faults = match &plan.faults {
        Some(f) => f.clone(),
        // Checked when the registry was built (a test parses every default).
        None => FaultSet::parse(sc.default_faults()).unwrap_or_default(),
    };
    let ctx = Ctx {
        name: sc.name(),
        cpus: plan.cpus,
        seed: plan.seed,
        faults: faults.clone(),
        broken,
        modes: plan.modes.clone(),
        limit: plan.limit,
        tally: tally.clone(),
        monitor: monitor.clone(),
        flags: flags.clone(),
        start: Instant::now(),
    };
    let replay = plan.replay(sc, &faults);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name(format!("stress-{}", sc.name()))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sc.run(&ctx)));
            let _ = tx.send(r);
        });
    let mut err = None;
    let mut abandoned = false;
    let dog = spawned.and_then(|_| {
        let f = flags.clone();
        watchdog::Watchdog::start(
            monitor.clone(),
            tally.clone(),
            plan.hang_timeout,
            move || f.abort.store(true, Ordering::SeqCst),
        )
    });
    if let Err(e) = dog.as_ref() {
        err = Some(ScenarioError::Spawn(std::io::Error::new(
            e.kind(),
            e.to_string(),
        )));
        flags.abort.store(true, Ordering::SeqCst);
    }
    if let Ok(dog) = &dog {
        let mut fired: Option<Instant> = None;
        loop {
            match rx.recv_timeout(TICK) {
                Ok(Ok(Ok(()))) => break,
                Ok(Ok(Err(e))) => {
                    err = Some(e);
                    break;
                }
                Ok(Err(p)) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".into());
                    tally.violation("panics", None, format!("the scenario panicked: {msg}"));
                    break;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            monitor.tick(&tally, false);
            *quit_target.lock().unwrap_or_else(|e| e.into_inner()) = monitor.handle();
            progress.update(sc.name(), &tally);
            match fired {
                None if dog.fired() => fired = Some(Instant::now()),
                Some(t) if t.elapsed() > ABANDON_AFTER => {
                    abandoned = true;
                    break;
                }
                _ => {}
            }
        }
    }
    drop(dog);
    monitor.tick(&tally, true);
    progress.done(sc.name(), &tally);
    let interrupted = flags.interrupt.load(Ordering::Relaxed);
    let min_iterations = plan.limit.min_iterations();
    let starved = !interrupted
        && !abandoned
        && err.is_none()
        && tally.violations() == 0
        && tally.iterations() < min_iterations;
    let res = ScenarioResult {
        name: sc.name(),
        iterations: tally.iterations(),
        violations: tally.violations(),
        counters: tally.counters(),
        first: tally.first_violations(),
        notes: tally.notes(),
        elapsed: tally.elapsed(),
        replay,
        interrupted,
        abandoned,
        min_iterations,
        starved,
    };
    (res, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_defaults_parse() {
        let mut names: Vec<_> = SCENARIOS.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        for s in SCENARIOS {
            FaultSet::parse(s.default_faults())
                .unwrap_or_else(|e| panic!("{}: default faults: {e}", s.name()));
        }
        for b in Broken::ALL {
            assert!(
                BROKEN.iter().any(|(_, v, _)| *v == b),
                "{b:?} has no --broken name"
            );
        }
    }

    #[test]
    fn the_minimum_is_one_iteration_a_second_or_every_one_asked_for() {
        assert_eq!(
            Limit::Duration(Duration::from_millis(1500)).min_iterations(),
            1
        );
        assert_eq!(
            Limit::Duration(Duration::from_millis(10)).min_iterations(),
            1
        );
        assert_eq!(
            Limit::Duration(Duration::from_secs(60)).min_iterations(),
            60
        );
        assert_eq!(Limit::Iterations(7).min_iterations(), 7);
    }
}
