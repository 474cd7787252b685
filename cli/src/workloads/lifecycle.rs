//! The `lifecycle` workload (the default of `usmp run`): the whole life of an image in one run,
//! each phase checked, with a timeline.
//!
//! 1. **boot**: the caller's runtime is up; record its online mask and generation.
//! 2. **ipi**: the [`demo`] workload (every kind of IPI, CPU-to-CPU calls, irq-masked
//!    sections; every callback runs exactly once).
//! 3. **hotplug**: [`hotplug_churn`] (CPUs go down and up while IPIs flow; every CPU is back
//!    online at the end, every accepted callback ran once).
//! 4. **stop**: CPU [`MASKED_CPU`] runs [`spin_masked`] (irqs soft-masked), then a job on CPU
//!    [`PANIC_CPU`] "panics" and calls [`Handle::crash_stop`]: attempt 1 (the maskable stop
//!    vector) stops every idle CPU and misses the masked one for the whole first wait
//!    (`Builder::stop_waits`, the CLI's `--stop-wait`); attempt 2 (the NMI) stops it. The
//!    stopped CPUs park by the runtime's policy: those caught idle power off, the masked one
//!    was caught inside a job and can only park (a straggler, lost to the next image).
//! 5. **kexec**: the same job calls [`Handle::crash_kexec`], which sees the CPUs already
//!    stopped (the kernel's `cpus_stopped` guard), writes the crash record and boots the next
//!    generation, which brings up exactly the CPUs that powered off. The next image's entry
//!    checks that it got the record.
//! 6. **next**: calls from this thread to every online CPU of the next generation (sync,
//!    async, `call_many`), each callback counted once, then the next image is shut down and
//!    must have lost no call.
//!
//! Each phase is one method of `Run`, which records it on the timeline; [`lifecycle`] only
//! sequences them. Each phase's check failing is the workload's error. The caller's runtime is
//! left stopped (its CPUs retired by the kexec); the caller shuts it down. Phase 4 runs no IPI
//! traffic of its own: a CPU stopped inside a job cannot power off, so traffic jobs there would
//! turn every CPU into a straggler and leave the next image nothing to bring back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::crash::{resolve_note, spin_masked, ResolvedNote, MASKED_CPU, PANIC_CPU};
use super::demo::{demo, DemoError, DemoReport};
use crate::stress::{hotplug_churn, HotplugChurnError, OnOffReport};
use usmp::{
    CpuId, CpuMask, CpuRunState, Handle, IpiError, KexecError, KexecOutcome, KexecReport,
    ParkPolicy, RuntimeError, RuntimeStats, StopError, StopOutcome,
};

/// Bound on every wait of this workload that has no other bound (spinner ready, joins, the
/// final quiescence wait).
const SETTLE: Duration = Duration::from_secs(10);

/// How long each traffic phase runs.
#[derive(Debug, Clone, Copy)]
pub struct LifecycleConfig {
    /// The `ipi` phase.
    pub ipi: Duration,
    /// The `hotplug` phase.
    pub hotplug: Duration,
    /// The `next` phase (traffic in the next generation).
    pub next: Duration,
}

impl LifecycleConfig {
    /// Splits a total traffic time: 40% IPIs, 40% hotplug churn, 20% in the next generation.
    /// The stop and the kexec add the first stop wait and a few milliseconds.
    pub fn split(total: Duration) -> Self {
        LifecycleConfig {
            ipi: total * 2 / 5,
            hotplug: total * 2 / 5,
            next: total / 5,
        }
    }
}

/// One phase of the run, as the timeline prints it and `--json` carries it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    /// `boot`, `ipi`, `hotplug`, `stop`, `kexec` or `next`.
    pub phase: &'static str,
    /// When the phase started and how long it took, ms since the workload started.
    pub start_ms: f64,
    pub took_ms: f64,
    /// One line saying what the phase showed.
    pub summary: String,
    /// Indented detail lines (stop attempts, crash notes, the kexec timeline).
    #[serde(skip)]
    pub details: Vec<String>,
    /// The phase's own report.
    pub report: serde_json::Value,
}

/// What the `next` phase did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NextReport {
    pub generation: u64,
    pub online: CpuMask,
    pub single_sync: u64,
    pub single_async: u64,
    pub many_sync: u64,
    pub callbacks_expected: u64,
    pub callbacks_run: u64,
    /// Per-CPU `(cpu, state, calls handled)` of the next generation after its shutdown.
    pub per_cpu: Vec<(CpuId, CpuRunState, u64)>,
}

/// What the lifecycle did, one entry per phase run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LifecycleReport {
    pub cpus: usize,
    pub park: ParkPolicy,
    /// How long the stop's first attempt (the maskable stop vector) took, ms: the first wait
    /// (`--stop-wait`), as CPU 2 never answers it. `None` if the stop phase did not run.
    pub first_attempt_ms: Option<f64>,
    pub elapsed_ms: u64,
    /// The stop flag ended the run before its last phase; later phases did not run.
    pub interrupted: bool,
    pub phases: Vec<Phase>,
}

/// Why the lifecycle failed: the phase and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("lifecycle: needs at least {MIN_CPUS} CPUs (CPU{PANIC_CPU} panics, CPU{MASKED_CPU} masks irqs), the runtime has {0}")]
    TooFewCpus(usize),
    #[error("lifecycle: ipi phase: {0}")]
    Ipi(#[from] DemoError),
    #[error("lifecycle: hotplug phase: {0}")]
    Hotplug(#[from] HotplugChurnError),
    #[error("lifecycle: {phase} phase: {source}")]
    Job {
        phase: &'static str,
        #[source]
        source: RuntimeError,
    },
    #[error("lifecycle: stop phase: CPU{MASKED_CPU} did not mask its irqs within {}s", SETTLE.as_secs())]
    SpinnerNotReady,
    #[error("lifecycle: stop phase: {0}")]
    Stop(#[from] StopError),
    #[error("lifecycle: stop phase: {0}")]
    StopCheck(String),
    #[error("lifecycle: kexec phase: {0}")]
    Kexec(#[from] KexecError),
    #[error("lifecycle: kexec phase: {0}")]
    KexecCheck(String),
    #[error("lifecycle: next phase: {op}: {source}")]
    NextIpi {
        op: &'static str,
        #[source]
        source: IpiError,
    },
    #[error("lifecycle: next phase: {0}")]
    NextCheck(String),
}

fn mask_str(m: &CpuMask) -> String {
    if m.is_empty() {
        "(none)".into()
    } else {
        m.to_string()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The kexec the panicking job ran right after its stop.
type KexecResult = Result<KexecOutcome<ImageCheck>, KexecError>;

/// What the panicking job hands back: the stop's outcome and the kexec's.
type PanicResult = Result<(StopOutcome, KexecResult), StopError>;

/// What the next image's entry saw.
#[derive(Debug, Clone, serde::Serialize)]
struct ImageCheck {
    generation: u64,
    online: CpuMask,
    record_from: Option<u64>,
    record_notes: usize,
}

/// The stop phase's report.
#[derive(serde::Serialize)]
struct StopPhase<'a> {
    outcome: &'a StopOutcome,
    notes: &'a [ResolvedNote],
    states: Vec<(CpuId, CpuRunState)>,
}

/// Whether the run goes on to its next phase after a traffic phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Next,
    /// The stop flag ended the phase: the phases after it do not run.
    Interrupted,
}

/// Runs the lifecycle on `h` (at least 4 CPUs, all online and idle, a crash not yet run).
/// Call it from a thread outside the runtime. `stop` (Ctrl-C) ends the current traffic phase
/// early and skips the phases after it; it never leaves a stop half done.
pub fn lifecycle(
    h: &Handle,
    cfg: LifecycleConfig,
    stop: &AtomicBool,
) -> Result<LifecycleReport, LifecycleError> {
    let n = h.cpus();
    if n < MIN_CPUS {
        return Err(LifecycleError::TooFewCpus(n));
    }
    let mut run = Run::new(h, stop);
    run.boot();
    if run.ipi(cfg.ipi)? == Flow::Interrupted || run.hotplug(cfg.hotplug)? == Flow::Interrupted {
        return Ok(run.finish(true));
    }
    let (out, kexec) = run.stop()?;
    let next = run.kexec(&out, kexec)?;
    if stop.load(Ordering::SeqCst) {
        drop(next);
        return Ok(run.finish(true));
    }
    run.next(next, cfg.next)?;
    let interrupted = stop.load(Ordering::SeqCst);
    Ok(run.finish(interrupted))
}

/// One lifecycle in progress: the runtime it started on, the stop flag, and the report with
/// the phases recorded so far (against the workload's start).
struct Run<'a> {
    h: &'a Handle,
    stop: &'a AtomicBool,
    t0: Instant,
    rep: LifecycleReport,
}

impl<'a> Run<'a> {
    fn new(h: &'a Handle, stop: &'a AtomicBool) -> Self {
        Run {
            h,
            stop,
            t0: Instant::now(),
            rep: LifecycleReport {
                cpus: h.cpus(),
                park: h.park_policy(),
                first_attempt_ms: None,
                elapsed_ms: 0,
                interrupted: false,
                phases: Vec::new(),
            },
        }
    }

    /// Records a phase that started at `start` and ends now.
    fn push(
        &mut self,
        phase: &'static str,
        start: Instant,
        summary: String,
        details: Vec<String>,
        report: &impl serde::Serialize,
    ) {
        self.rep.phases.push(Phase {
            phase,
            start_ms: ms(start - self.t0),
            took_ms: ms(start.elapsed()),
            summary,
            details,
            report: serde_json::to_value(report).unwrap_or(serde_json::Value::Null),
        });
    }

    fn finish(mut self, interrupted: bool) -> LifecycleReport {
        self.rep.elapsed_ms = self.t0.elapsed().as_millis() as u64;
        self.rep.interrupted = interrupted;
        self.rep
    }

    /// Phase 1, boot: the online mask and generation the runtime came up with.
    fn boot(&mut self) {
        let (h, t) = (self.h, Instant::now());
        let online = h.online_mask();
        self.push(
            "boot",
            t,
            format!(
                "generation {}: {} CPUs, online {}",
                h.generation(),
                h.cpus(),
                mask_str(&online)
            ),
            Vec::new(),
            &serde_json::json!({ "generation": h.generation(), "online": online.to_string() }),
        );
    }

    /// Phase 2, ipi: the demo workload for `duration`.
    fn ipi(&mut self, duration: Duration) -> Result<Flow, LifecycleError> {
        let t = Instant::now();
        let d: DemoReport = demo(self.h, duration, self.stop)?;
        self.push(
            "ipi",
            t,
            format!(
                "{} call_single, {} async, {} call_many, {} CPU-to-CPU, {} irq-masked sections; \
                 {}/{} callbacks ran once",
                d.single_sync,
                d.single_async,
                d.many_sync,
                d.cpu_to_cpu,
                d.masked_sections,
                d.callbacks_run,
                d.callbacks_expected
            ),
            Vec::new(),
            &d,
        );
        Ok(if d.interrupted {
            Flow::Interrupted
        } else {
            Flow::Next
        })
    }

    /// Phase 3, hotplug: the churn for `duration`, every CPU back online at its end.
    fn hotplug(&mut self, duration: Duration) -> Result<Flow, LifecycleError> {
        let t = Instant::now();
        let o: OnOffReport = hotplug_churn(self.h, duration, self.stop)?;
        self.push(
            "hotplug",
            t,
            format!(
                "{}/{} offlines, {}/{} onlines, {} CPU(s) brought back; {} calls accepted \
                 ({} refused offline), {} callbacks ran",
                o.offlines.successes,
                o.offlines.attempts,
                o.onlines.successes,
                o.onlines.attempts,
                o.brought_back,
                o.calls_sync + o.calls_async,
                o.calls_offline,
                o.callbacks_run
            ),
            o.first_failure
                .iter()
                .map(|f| format!("first failed hotplug operation (the churn went on): {f}"))
                .collect(),
            &o,
        );
        Ok(if o.interrupted || self.stop.load(Ordering::SeqCst) {
            Flow::Interrupted
        } else {
            Flow::Next
        })
    }

    /// Phase 4, stop: the masked spinner first, so it is masked before anyone stops it, then
    /// the panic on CPU [`PANIC_CPU`]. Returns the stop's outcome, checked, and the kexec the
    /// panicking job ran right after it (phase 5 reports it).
    fn stop(&mut self) -> Result<(StopOutcome, KexecResult), LifecycleError> {
        let t = Instant::now();
        let release = start_masked_spinner(self.h)?;
        let (out, kexec) = panic_and_kexec(self.h, &release)?;
        self.record_stop(t, &out);
        check_stop(&out)?;
        Ok((out, kexec))
    }

    /// The stop phase's line, its attempts and crash notes, and the CPUs' states after it.
    fn record_stop(&mut self, t: Instant, out: &StopOutcome) {
        let h = self.h;
        let notes: Vec<ResolvedNote> = out
            .notes
            .iter()
            .map(|n| resolve_note(n.cpu, n.regs.ip, n.regs.sp, n.regs.fp))
            .collect();
        let states: Vec<(CpuId, CpuRunState)> = (0..h.cpus())
            .filter_map(|c| h.cpu_state(c).map(|s| (c, s)))
            .collect();
        self.rep.first_attempt_ms = out.attempts.first().map(|a| a.took_us as f64 / 1e3);
        let in_state = |want: CpuRunState| -> CpuMask {
            states
                .iter()
                .filter(|(_, s)| *s == want)
                .map(|(c, _)| *c)
                .collect()
        };
        let (parked, off) = (
            in_state(CpuRunState::Parked),
            in_state(CpuRunState::PoweredOff),
        );
        let summary = format!(
            "CPU{PANIC_CPU} panics, CPU{MASKED_CPU} spins irq-masked: {} attempt(s), stopped {}, \
             failed {}; policy {:?}: powered off {}, parked {}",
            out.attempts.len(),
            mask_str(&out.stopped),
            mask_str(&out.failed),
            h.park_policy(),
            mask_str(&off),
            mask_str(&parked)
        );
        self.push(
            "stop",
            t,
            summary,
            stop_details(out, &notes),
            &StopPhase {
                outcome: out,
                notes: &notes,
                states: states.clone(),
            },
        );
        // The stop phase's own time ends where the kexec's begins; fix it from the attempts.
        if let Some(p) = self.rep.phases.last_mut() {
            let took: u64 = out.attempts.iter().map(|a| a.took_us).sum();
            p.took_ms = took as f64 / 1e3;
        }
    }

    /// Phase 5, kexec: ran on CPU [`PANIC_CPU`] right after the stop; reported and checked
    /// here. Returns the next image.
    fn kexec(
        &mut self,
        out: &StopOutcome,
        kexec: KexecResult,
    ) -> Result<usmp::Runtime, LifecycleError> {
        let k = kexec?;
        let kr: &KexecReport = &k.report;
        // It started where the stop's attempts ended.
        let kstart_ms = self
            .rep
            .phases
            .last()
            .map_or(0.0, |p| p.start_ms + p.took_ms);
        self.rep.phases.push(Phase {
            phase: "kexec",
            start_ms: kstart_ms,
            took_ms: kr.handoff_us as f64 / 1e3,
            summary: format!(
                "crash-kexec on CPU{} into generation {}: handed over {}, lost {} ({} us)",
                kr.reboot_cpu,
                kr.generation,
                mask_str(&kr.handed_over),
                mask_str(&kr.lost),
                kr.handoff_us
            ),
            details: kexec_details(kr, &k.value),
            report: serde_json::json!({ "report": kr, "image": &k.value }),
        });
        check_kexec(self.h, out, kr, &k.value)?;
        Ok(k.next)
    }

    /// Phase 6, next: traffic in the next generation for `duration`, then its shutdown, which
    /// must lose no call.
    fn next(&mut self, next_rt: usmp::Runtime, duration: Duration) -> Result<(), LifecycleError> {
        let t = Instant::now();
        let traffic = next_traffic(&next_rt, duration, self.stop);
        let fin: RuntimeStats = next_rt.shutdown();
        let mut nr = traffic?;
        nr.per_cpu = fin
            .per_cpu
            .iter()
            .map(|c| (c.cpu, c.state, c.calls_handled))
            .collect();
        if fin.lost_calls != 0 {
            return Err(LifecycleError::NextCheck(format!(
                "{} calls were accepted but neither ran nor were cancelled",
                fin.lost_calls
            )));
        }
        let per_cpu: Vec<String> = nr
            .per_cpu
            .iter()
            .filter(|(c, _, _)| nr.online.contains(*c))
            .map(|(c, _, handled)| format!("CPU{c} {handled}"))
            .collect();
        self.push(
            "next",
            t,
            format!(
                "generation {} on CPUs {}: {} call_single, {} async, {} call_many; {}/{} \
                 callbacks ran once; shut down with 0 calls lost",
                nr.generation,
                mask_str(&nr.online),
                nr.single_sync,
                nr.single_async,
                nr.many_sync,
                nr.callbacks_run,
                nr.callbacks_expected
            ),
            vec![format!("calls handled: {}", per_cpu.join(", "))],
            &nr,
        );
        Ok(())
    }
}

/// Starts [`spin_masked`] on CPU [`MASKED_CPU`] and waits (bounded) until its irqs are masked.
/// Returns the flag that ends the spin.
fn start_masked_spinner(h: &Handle) -> Result<Arc<AtomicBool>, LifecycleError> {
    let release = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    {
        let (r, rd) = (release.clone(), ready.clone());
        // Never joined: the NMI parks CPU 2 inside this job; `release` ends it at shutdown.
        drop(
            h.run_on(MASKED_CPU, move || spin_masked(&r, &rd, SETTLE))
                .map_err(|source| LifecycleError::Job {
                    phase: "stop",
                    source,
                })?,
        );
    }
    let wait_ready = Instant::now() + SETTLE;
    while !ready.load(Ordering::SeqCst) {
        if Instant::now() >= wait_ready {
            release.store(true, Ordering::SeqCst);
            return Err(LifecycleError::SpinnerNotReady);
        }
        std::thread::yield_now();
    }
    Ok(release)
}

/// The panic: a job on CPU [`PANIC_CPU`] crash-stops every other CPU, saving their registers,
/// then crash-kexecs from there into the next generation. Joined (bounded), then the spinner
/// is released.
fn panic_and_kexec(
    h: &Handle,
    release: &AtomicBool,
) -> Result<(StopOutcome, KexecResult), LifecycleError> {
    let h1 = h.clone();
    let panic_job = h
        .run_on(PANIC_CPU, move || -> PanicResult {
            // The panic: stop every other CPU, saving their registers...
            let out = h1.crash_stop()?;
            // 5. ...then crash-kexec from this CPU into the next generation.
            let k = h1.crash_kexec("usmp lifecycle: panic on CPU1", |nh, ho| ImageCheck {
                generation: nh.generation(),
                online: nh.online_mask(),
                record_from: ho.record.as_ref().map(|r| r.generation),
                record_notes: ho.record.as_ref().map_or(0, |r| r.notes.len()),
            });
            Ok((out, k))
        })
        .map_err(|source| LifecycleError::Job {
            phase: "stop",
            source,
        })?;
    // CPU 1 is the caller of both: it keeps running, so this returns; bounded all the same.
    let joined = panic_job.join_timeout(SETTLE);
    release.store(true, Ordering::SeqCst);
    let (out, kexec) = joined.map_err(|source| LifecycleError::Job {
        phase: "stop",
        source,
    })??;
    Ok((out, kexec))
}

/// The stop phase's detail lines: each attempt, then each crash note.
fn stop_details(out: &StopOutcome, notes: &[ResolvedNote]) -> Vec<String> {
    let mut details = Vec::new();
    for a in &out.attempts {
        details.push(format!(
            "attempt {} ({}): targeted {}, remaining {}, took {:.1} ms",
            a.attempt,
            if a.attempt <= 1 { "stop vector" } else { "NMI" },
            mask_str(&a.targeted),
            mask_str(&a.remaining),
            a.took_us as f64 / 1e3
        ));
    }
    for nt in notes {
        // The innermost frame can be an inlined helper (an atomic load): name the function it
        // was inlined into as well.
        let outer = nt
            .inlined_into
            .last()
            .map_or(String::new(), |f| format!(" in {f}"));
        details.push(format!(
            "CPU{} crash note: ip={:#x} {}{outer}",
            nt.cpu,
            nt.ip,
            nt.symbol.as_deref().unwrap_or("??")
        ));
    }
    details
}

/// The kexec phase's detail lines: the kexec's own timeline, then what the next image's entry
/// saw.
fn kexec_details(kr: &KexecReport, img: &ImageCheck) -> Vec<String> {
    let mut kd: Vec<String> = kr
        .timeline
        .iter()
        .map(|e| {
            format!(
                "+{:>7} us {:>5}  {}",
                e.t_us,
                e.cpu.map_or("-".into(), |c| format!("CPU{c}")),
                e.what
            )
        })
        .collect();
    kd.push(format!(
        "next image's entry on CPU{}: generation {}, online {}, crash record from generation \
         {} with {} notes",
        kr.reboot_cpu,
        img.generation,
        mask_str(&img.online),
        img.record_from.map_or("(none)".into(), |g| g.to_string()),
        img.record_notes
    ));
    kd
}

/// The stop's promise: attempt 1 missed the masked CPU, a later (NMI) attempt stopped it, and
/// nothing failed to stop. CPU 2's crash note is there.
fn check_stop(out: &StopOutcome) -> Result<(), LifecycleError> {
    // Every failure names the attempts, so the one line says what the stop did.
    let attempts: Vec<String> = out
        .attempts
        .iter()
        .map(|a| {
            format!(
                "#{} remaining {} after {:.1} ms",
                a.attempt,
                mask_str(&a.remaining),
                a.took_us as f64 / 1e3
            )
        })
        .collect();
    let bad = |m: String| {
        Err(LifecycleError::StopCheck(format!(
            "{m} (attempts: {})",
            attempts.join("; ")
        )))
    };
    if !out.failed.is_empty() {
        return bad(format!("CPUs {} failed to stop", out.failed));
    }
    let Some(first) = out.attempts.first() else {
        return bad("the stop made no attempt".into());
    };
    if !first.remaining.contains(MASKED_CPU) {
        return bad(format!(
            "attempt 1 stopped CPU{MASKED_CPU} although its irqs were masked"
        ));
    }
    if out.attempts.len() < 2 {
        return bad(format!("no NMI attempt for CPU{MASKED_CPU}"));
    }
    if !out.stopped.contains(MASKED_CPU) || !out.notes.iter().any(|n| n.cpu == MASKED_CPU) {
        return bad(format!("CPU{MASKED_CPU} was not stopped with a crash note"));
    }
    Ok(())
}

/// The kexec's promise: the next image booted on the panic CPU with the record, and brought up
/// exactly the CPUs that powered off (plus the reboot CPU); the parked straggler is lost.
fn check_kexec(
    h: &Handle,
    out: &StopOutcome,
    kr: &KexecReport,
    img: &ImageCheck,
) -> Result<(), LifecycleError> {
    let bad = |m: String| Err(LifecycleError::KexecCheck(m));
    if kr.reboot_cpu != PANIC_CPU {
        return bad(format!(
            "rebooted on CPU{}, not CPU{PANIC_CPU}",
            kr.reboot_cpu
        ));
    }
    if img.generation != h.generation() + 1 {
        return bad(format!(
            "next image is generation {}, expected {}",
            img.generation,
            h.generation() + 1
        ));
    }
    if img.record_from != Some(h.generation()) || img.record_notes != out.notes.len() {
        return bad(format!(
            "next image got record {:?} with {} notes, expected generation {} with {}",
            img.record_from,
            img.record_notes,
            h.generation(),
            out.notes.len()
        ));
    }
    let mut expect = CpuMask::new();
    expect.set(PANIC_CPU);
    for c in 0..h.cpus() {
        if h.cpu_state(c) == Some(CpuRunState::PoweredOff) {
            expect.set(c);
        }
    }
    if kr.handed_over != expect || img.online != expect {
        return bad(format!(
            "next image brought up {} (its entry saw {}), expected the reboot CPU and the \
             powered-off CPUs {}",
            kr.handed_over, img.online, expect
        ));
    }
    if !kr.lost.contains(MASKED_CPU) {
        return bad(format!(
            "CPU{MASKED_CPU} was stopped inside a job, yet the next image did not count it lost"
        ));
    }
    Ok(())
}

/// Phase 6: calls from this thread to the next generation's online CPUs, each kind in turn,
/// every callback counted once.
fn next_traffic(
    h: &Handle,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<NextReport, LifecycleError> {
    let online = h.online_mask();
    let cpus: Vec<CpuId> = online.iter().collect();
    let mut r = NextReport {
        generation: h.generation(),
        online: online.clone(),
        ..NextReport::default()
    };
    if cpus.is_empty() {
        return Err(LifecycleError::NextCheck("no CPU online".into()));
    }
    let ran = Arc::new(AtomicU64::new(0));
    let nerr = |op| move |source| LifecycleError::NextIpi { op, source };
    let start = Instant::now();
    let mut i = 0usize;
    // At least one round of each kind, even with a zero duration.
    while i < 3 || (start.elapsed() < duration && !stop.load(Ordering::Relaxed)) {
        let cpu = cpus[i % cpus.len()];
        let c = ran.clone();
        // IPI context: one atomic add.
        let bump = move || {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match i % 3 {
            0 => {
                h.call_single(cpu, bump, true)
                    .map_err(nerr("call_single"))?;
                r.single_sync += 1;
                r.callbacks_expected += 1;
            }
            1 => {
                h.call_single_async(cpu, bump)
                    .map_err(nerr("call_single_async"))?;
                r.single_async += 1;
                r.callbacks_expected += 1;
            }
            _ => {
                h.call_many(&online, bump, true)
                    .map_err(nerr("call_many"))?;
                r.many_sync += 1;
                r.callbacks_expected += online.weight() as u64;
            }
        }
        i += 1;
    }
    // Every closure dropped (so the last reference is ours, freed outside IPI context) and
    // every callback counted.
    let deadline = Instant::now() + SETTLE;
    while Arc::strong_count(&ran) > 1 || ran.load(Ordering::Acquire) < r.callbacks_expected {
        if Instant::now() >= deadline {
            return Err(LifecycleError::NextCheck(format!(
                "callbacks still pending after {}s ({} of {} ran)",
                SETTLE.as_secs(),
                ran.load(Ordering::Acquire),
                r.callbacks_expected
            )));
        }
        std::thread::yield_now();
    }
    r.callbacks_run = ran.load(Ordering::Acquire);
    if r.callbacks_run != r.callbacks_expected {
        return Err(LifecycleError::NextCheck(format!(
            "{} callbacks accepted, {} ran",
            r.callbacks_expected, r.callbacks_run
        )));
    }
    Ok(r)
}

impl LifecycleReport {
    /// The phase-by-phase timeline the CLI prints.
    pub fn write_timeline(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "lifecycle: {} CPUs, park policy {:?}, {} ms{}",
            self.cpus,
            self.park,
            self.elapsed_ms,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )?;
        writeln!(out, "{:>9} {:>9}  phase", "start-ms", "took-ms")?;
        for p in &self.phases {
            writeln!(
                out,
                "{:>9.1} {:>9.1}  {:<8} {}",
                p.start_ms, p.took_ms, p.phase, p.summary
            )?;
            for d in &p.details {
                writeln!(out, "{:>21}{d}", "")?;
            }
        }
        Ok(())
    }
}

/// `--workload lifecycle`, `usmp run`'s default.
pub struct Lifecycle;

/// The fewest CPUs the lifecycle runs on: a boot CPU, CPU [`PANIC_CPU`] that panics, CPU
/// [`MASKED_CPU`] with irqs masked, and a spare.
pub const MIN_CPUS: usize = 4;

impl super::Workload for Lifecycle {
    fn name(&self) -> &'static str {
        "lifecycle"
    }

    fn about(&self) -> &'static str {
        "boot, IPIs, hotplug churn, a crash-stop that needs the NMI, crash-kexec, traffic in the \
         next generation"
    }

    fn min_cpus(&self) -> usize {
        MIN_CPUS
    }

    /// The first wait is 100 ms, not the kernel's 1 s: the masked CPU sits out all of it on
    /// every run. The NMI attempts' wait is a bound, not a delay: the loaded, oversubscribed
    /// default run gets 100 ms for the masked CPU's thread to be scheduled, not the kernel's 10.
    fn stop_waits(&self) -> super::StopWaits {
        super::StopWaits {
            first: Duration::from_millis(100),
            nmi: Duration::from_millis(100),
        }
    }

    /// `duration` is split over the traffic phases ([`LifecycleConfig::split`]).
    fn run(
        &self,
        h: &Handle,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Result<Box<dyn super::Outcome>, super::WorkloadError> {
        Ok(Box::new(lifecycle(
            h,
            LifecycleConfig::split(duration),
            stop,
        )?))
    }
}

impl super::Outcome for LifecycleReport {
    fn write_json(&self, out: &mut dyn std::io::Write, json: &super::Json) -> std::io::Result<()> {
        json.write(out, "lifecycle", self)
    }

    /// The timeline, then the table (of the image that crashed).
    fn write_text(
        &self,
        out: &mut dyn std::io::Write,
        table: &super::Table,
    ) -> std::io::Result<()> {
        self.write_timeline(out)?;
        table.write(out, self.elapsed_ms, self.interrupted)?;
        writeln!(
            out,
            "(the table is generation {}, the image that crashed; the next one is in phase 'next')",
            table.stats.generation
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_runs_and_the_masked_cpu_needs_the_nmi() {
        let rt = usmp::Builder::new()
            .cpus(4)
            .stop_waits(Duration::from_millis(20), Duration::from_millis(100))
            .build()
            .unwrap();
        let cfg = LifecycleConfig::split(Duration::from_millis(60));
        let rep = lifecycle(&rt, cfg, &AtomicBool::new(false)).unwrap();
        let names: Vec<_> = rep.phases.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["boot", "ipi", "hotplug", "stop", "kexec", "next"]);
        assert!(!rep.interrupted);
        // The first attempt waited for the masked CPU until its wait ran out.
        assert!(rep.first_attempt_ms.unwrap() >= 20.0);
        let kexec = &rep.phases[4].report["report"];
        assert_eq!(kexec["generation"], 1);
        assert!(kexec["lost"].as_str().unwrap().contains('2'));
        drop(rt);
    }

    #[test]
    fn too_few_cpus_is_an_error_before_anything_runs() {
        let rt = usmp::Builder::new().cpus(2).build().unwrap();
        let cfg = LifecycleConfig::split(Duration::from_millis(10));
        let e = lifecycle(&rt, cfg, &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(e, LifecycleError::TooFewCpus(2)), "{e}");
    }
}
