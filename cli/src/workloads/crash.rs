//! The `crash` workload: a busy runtime "panics" on CPU 1 and crash-stops every other CPU, one
//! of which has irqs soft-masked, so the maskable stop vector cannot reach it and the NMI
//! attempt has to (seeds 000/001, x86's `crash_smp_send_stop`).
//!
//! 1. Traffic: every CPU but CPU 2 (the masked one) runs a job that sends `call_single` (sync)
//!    and `call_single_async` IPIs to the other traffic CPUs, until the panic.
//! 2. CPU 2 runs [`spin_masked`]: `irq_save`, spin until released (bounded), `irq_restore`.
//! 3. After `duration`, the job on CPU 1 calls [`Handle::crash_stop`]. With the default waits,
//!    attempt 1 (stop vector) stops the traffic CPUs within microseconds and leaves CPU 2
//!    remaining for its full 1 s wait; attempt 2 (NMI) stops CPU 2.
//! 4. Back on the calling thread (never in a handler), every crash note's instruction pointer
//!    is resolved to a function name with `backtrace::resolve`.
//!
//! CPUs stopped inside a job stay parked (their threads are left behind by the runtime's
//! shutdown, by design), so nothing here joins their jobs: only CPU 1's job, which keeps
//! running after the stop, is joined, and with a timeout. Calls that were queued to a CPU when
//! it stopped never run; the report counts them (`stranded_calls`), as a kernel drops the IPIs
//! pending on a CPU it stops.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::{
    cpu_relax, irq_restore, irq_save, CpuId, CpuMask, CpuRunState, Handle, RuntimeError, StopError,
    StopOutcome,
};

/// The CPU that panics and runs the crash-stop.
pub const PANIC_CPU: CpuId = 1;
/// The CPU that spins with irqs soft-masked.
pub const MASKED_CPU: CpuId = 2;
/// Spare time beyond the expected stop on every bound (spinner, joins).
const MARGIN: Duration = Duration::from_secs(5);

/// One crash note with its instruction pointer resolved (on the calling thread).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResolvedNote {
    pub cpu: CpuId,
    pub ip: u64,
    pub sp: u64,
    pub fp: u64,
    /// The innermost function at `ip` (demangled, without hash), if any symbol covers it.
    pub symbol: Option<String>,
    /// The functions `symbol` was inlined into, innermost first.
    pub inlined_into: Vec<String>,
    /// `file:line` of `ip`, when debug info has it.
    pub location: Option<String>,
}

/// What the crash workload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CrashReport {
    pub cpus: usize,
    pub panic_cpu: CpuId,
    pub masked_cpu: CpuId,
    /// CPUs that ran IPI traffic jobs (the panic CPU included, until it panicked).
    pub traffic_cpus: CpuMask,
    /// When CPU 1 called `crash_stop`, in ms since the workload started.
    pub panic_at_ms: f64,
    /// IPIs the traffic jobs had sent successfully (approximate at the panic: stopped senders
    /// never report their last round).
    pub calls_sent: u64,
    /// Callbacks that ran.
    pub callbacks_run: u64,
    /// Accepted calls that never ran because their target stopped first (filled in by the
    /// caller after the runtime's shutdown, from its `lost_calls`).
    pub stranded_calls: u64,
    /// The routine's outcome, as `crash_stop` returned it.
    pub outcome: StopOutcome,
    /// Each crash note, symbolized.
    pub notes: Vec<ResolvedNote>,
    /// Every CPU's state after the stop.
    pub states: Vec<(CpuId, CpuRunState)>,
}

/// Why the crash workload failed.
#[derive(Debug, thiserror::Error)]
pub enum CrashError {
    #[error("crash: needs at least 4 CPUs, the runtime has {0}")]
    TooFewCpus(usize),
    #[error("crash: {0}")]
    Job(#[from] RuntimeError),
    #[error("crash: CPU{MASKED_CPU} did not mask its irqs within {}s", MARGIN.as_secs())]
    SpinnerNotReady,
    #[error("crash: crash_stop on CPU{PANIC_CPU}: {0}")]
    Stop(#[from] StopError),
}

struct Traffic {
    sent: AtomicU64,
    ran: AtomicU64,
    quit: AtomicBool,
}

/// Runs the workload on `h` (at least 4 CPUs, all idle): traffic for `duration` (cut short by
/// `stop`), then the panic on CPU 1 and its crash-stop. Returns after the stop; the runtime is
/// left stopped (CPU 1 online, the others parked or powered off).
pub fn crash_demo(
    h: &Handle,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<CrashReport, CrashError> {
    let n = h.cpus();
    if n < 4 {
        return Err(CrashError::TooFewCpus(n));
    }
    let t0 = Instant::now();
    let tr = Arc::new(Traffic {
        sent: AtomicU64::new(0),
        ran: AtomicU64::new(0),
        quit: AtomicBool::new(false),
    });
    let traffic: CpuMask = (0..n).filter(|&c| c != MASKED_CPU).collect();

    // Step 2 first, so CPU 2 is masked before anyone can stop it.
    let release = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let bound = duration + Duration::from_secs(1) + MARGIN;
    {
        let (r, rd) = (release.clone(), ready.clone());
        // Never joined: the NMI parks CPU 2 inside this job.
        drop(h.run_on(MASKED_CPU, move || spin_masked(&r, &rd, bound))?);
    }
    let wait_ready = Instant::now() + MARGIN;
    while !ready.load(Ordering::SeqCst) {
        if Instant::now() >= wait_ready {
            release.store(true, Ordering::SeqCst);
            return Err(CrashError::SpinnerNotReady);
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    // Step 1: traffic on every CPU but 1 (CPU 1's job sends too, then panics) and 2.
    let peers: Vec<CpuId> = traffic.iter().collect();
    for &c in peers.iter().filter(|&&c| c != PANIC_CPU) {
        let (h2, t2, p2) = (h.clone(), tr.clone(), peers.clone());
        // Never joined: the stop parks these CPUs inside their jobs.
        drop(h.run_on(c, move || traffic_job(&h2, &t2, &p2, c, bound))?);
    }

    // Step 3: the panic.
    let (h1, t1, p1) = (h.clone(), tr.clone(), peers.clone());
    // The CLI thread pulls the trigger (at `duration`, or at once on Ctrl-C).
    let go = Arc::new(AtomicBool::new(false));
    let go1 = go.clone();
    let job_bound = t0 + bound;
    let panic_job = h.run_on(PANIC_CPU, move || {
        // Traffic from the panicking CPU too, until its time comes.
        let mut i = 0usize;
        while !go1.load(Ordering::Relaxed) && Instant::now() < job_bound {
            send_one(&h1, &t1, &p1, PANIC_CPU, &mut i);
        }
        let at = t0.elapsed();
        (at, h1.crash_stop())
    })?;
    let deadline = t0 + duration;
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }
    go.store(true, Ordering::SeqCst);
    // CPU 1 keeps running after the stop, so this returns; bounded all the same.
    let join_bound = duration + Duration::from_secs(2) + MARGIN;
    let (panic_at, outcome) = panic_job.join_timeout(join_bound)?;
    let outcome = outcome?;
    tr.quit.store(true, Ordering::SeqCst);
    release.store(true, Ordering::SeqCst);

    // Step 4, on this (ordinary) thread.
    let notes = outcome
        .notes
        .iter()
        .map(|n| resolve_note(n.cpu, n.regs.ip, n.regs.sp, n.regs.fp))
        .collect();
    let states = (0..n)
        .filter_map(|c| h.cpu_state(c).map(|s| (c, s)))
        .collect();
    Ok(CrashReport {
        cpus: n,
        panic_cpu: PANIC_CPU,
        masked_cpu: MASKED_CPU,
        traffic_cpus: traffic,
        panic_at_ms: panic_at.as_secs_f64() * 1e3,
        calls_sent: tr.sent.load(Ordering::Relaxed),
        callbacks_run: tr.ran.load(Ordering::Relaxed),
        stranded_calls: 0,
        outcome,
        notes,
        states,
    })
}

/// CPU 2's job: irqs soft-masked, spinning until released or `bound` passes. The NMI attempt
/// interrupts it here, so its crash note points into this function.
#[inline(never)]
pub fn spin_masked(release: &AtomicBool, ready: &AtomicBool, bound: Duration) {
    let flags = irq_save();
    ready.store(true, Ordering::SeqCst);
    let end = Instant::now() + bound;
    let mut i = 0u32;
    while !release.load(Ordering::Relaxed) {
        cpu_relax();
        i = i.wrapping_add(1);
        // Read the clock rarely, so the interrupted ip is almost always in this loop.
        if i % 65_536 == 0 && Instant::now() >= end {
            break;
        }
    }
    irq_restore(flags);
}

/// A traffic CPU's job: IPIs to its peers until told to quit (or `bound` passes).
#[inline(never)]
fn traffic_job(h: &Handle, tr: &Arc<Traffic>, peers: &[CpuId], me: CpuId, bound: Duration) {
    let end = Instant::now() + bound;
    let mut i = me;
    while !tr.quit.load(Ordering::Relaxed) && Instant::now() < end {
        send_one(h, tr, peers, me, &mut i);
    }
}

/// One IPI to the next peer: three sync calls, then one async. Callbacks only bump an atomic.
fn send_one(h: &Handle, tr: &Arc<Traffic>, peers: &[CpuId], me: CpuId, i: &mut usize) {
    *i += 1;
    let to = peers[*i % peers.len()];
    if to == me {
        return;
    }
    let t = tr.clone();
    let r = if *i % 4 == 0 {
        h.call_single_async(to, move || {
            t.ran.fetch_add(1, Ordering::Relaxed);
        })
    } else {
        h.call_single(
            to,
            move || {
                t.ran.fetch_add(1, Ordering::Relaxed);
            },
            true,
        )
    };
    match r {
        Ok(()) => {
            tr.sent.fetch_add(1, Ordering::Relaxed);
        }
        // The target is stopping (offline) or out of csds: back off a little.
        Err(_) => std::thread::sleep(Duration::from_micros(100)),
    }
}

/// Resolves a saved instruction pointer. Not async-signal-safe (it reads debug info and
/// allocates): call it only from an ordinary thread.
pub fn resolve_note(cpu: CpuId, ip: u64, sp: u64, fp: u64) -> ResolvedNote {
    let mut names = Vec::new();
    let mut location = None;
    if ip != 0 {
        // `resolve` treats its address as a return address and looks up `addr - 1`; a saved
        // ip is the exact interrupted instruction (or a function's first byte), so add 1.
        backtrace::resolve((ip as usize + 1) as *mut c_void, |sym| {
            if let Some(name) = sym.name() {
                names.push(format!("{name:#}"));
            }
            if location.is_none() {
                if let (Some(f), Some(l)) = (sym.filename(), sym.lineno()) {
                    location = Some(format!("{}:{l}", f.display()));
                }
            }
        });
    }
    let mut it = names.into_iter();
    ResolvedNote {
        cpu,
        ip,
        sp,
        fp,
        symbol: it.next(),
        inlined_into: it.collect(),
        location,
    }
}

fn mask_str(m: &CpuMask) -> String {
    if m.is_empty() {
        "(none)".into()
    } else {
        m.to_string()
    }
}

impl CrashReport {
    /// The human-readable timeline and notes the CLI prints.
    pub fn write_summary(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let o = &self.outcome;
        writeln!(
            out,
            "crash: {} CPUs; traffic on CPUs {}; CPU{} spins with irqs masked; CPU{} panics",
            self.cpus, self.traffic_cpus, self.masked_cpu, self.panic_cpu
        )?;
        writeln!(out, "timeline (ms since the workload started):")?;
        writeln!(
            out,
            "  {:>9.3}  CPU{} panics: crash_stop() (after {} IPIs sent, {} callbacks run)",
            self.panic_at_ms, self.panic_cpu, self.calls_sent, self.callbacks_run
        )?;
        let mut t = self.panic_at_ms;
        for a in &o.attempts {
            let means = if a.attempt <= 1 { "stop vector" } else { "NMI" };
            writeln!(
                out,
                "  {t:>9.3}  attempt {} ({means}{}): targeted {}, remaining {}, took {} us",
                a.attempt,
                if a.crash { ", crash" } else { "" },
                mask_str(&a.targeted),
                mask_str(&a.remaining),
                a.took_us
            )?;
            t += a.took_us as f64 / 1e3;
        }
        writeln!(
            out,
            "  {t:>9.3}  done: crash={} stopped {} failed {} caller {}",
            o.crash,
            mask_str(&o.stopped),
            mask_str(&o.failed),
            o.caller.map_or("-".into(), |c| format!("CPU{c}"))
        )?;
        writeln!(out, "crash notes ({}):", self.notes.len())?;
        for n in &self.notes {
            writeln!(
                out,
                "  CPU{}: ip={:#x} {} sp={:#x} fp={:#x}",
                n.cpu,
                n.ip,
                n.symbol.as_deref().unwrap_or("??"),
                n.sp,
                n.fp
            )?;
            if !n.inlined_into.is_empty() {
                writeln!(out, "        inlined into {}", n.inlined_into.join(" <- "))?;
            }
            if let Some(l) = &n.location {
                writeln!(out, "        at {l}")?;
            }
        }
        let states: Vec<String> = self
            .states
            .iter()
            .map(|(c, s)| format!("CPU{c} {}", format!("{s:?}").to_lowercase()))
            .collect();
        writeln!(out, "states after the stop: {}", states.join(", "))?;
        writeln!(
            out,
            "calls stranded on stopped CPUs (accepted, never run): {}",
            self.stranded_calls
        )
    }
}

/// `--workload crash`.
pub struct Crash;

impl super::Workload for Crash {
    fn name(&self) -> &'static str {
        "crash"
    }

    fn about(&self) -> &'static str {
        "CPU 1 panics and crash-stops a busy runtime; CPU 2, irqs masked, needs the NMI attempt"
    }

    fn min_cpus(&self) -> usize {
        4
    }

    fn run(
        &self,
        h: &Handle,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Result<Box<dyn super::Outcome>, super::WorkloadError> {
        Ok(Box::new(crash_demo(h, duration, stop)?))
    }
}

impl super::Outcome for CrashReport {
    fn write_json(&self, out: &mut dyn std::io::Write, json: &super::Json) -> std::io::Result<()> {
        json.write(out, "crash", self)
    }

    /// Calls queued to a CPU when it stopped never run (by design): counted, not an error.
    fn lost_calls(&mut self, n: u64) -> Result<(), super::WorkloadError> {
        self.stranded_calls = n;
        Ok(())
    }

    /// The stop's own summary (timeline, notes, states) in place of the per-CPU table.
    fn write_text(
        &self,
        mut out: &mut dyn std::io::Write,
        _table: &super::Table,
    ) -> std::io::Result<()> {
        self.write_summary(&mut out)
    }
}
