//! A panic, the NMI fallback, symbolized registers, and the next image booting with the crash
//! record — the kernel's `panic` -> `__crash_kexec` -> `machine_crash_shutdown` ->
//! `crash_smp_send_stop` (x86: the stop vector, then NMIs for the CPUs that did not stop;
//! `crash_save_cpu` saves each one's registers) -> `machine_kexec`, and the capture kernel
//! reading `/proc/vmcore`'s ELF notes.
//!
//! CPU 2 spins with irqs soft-masked, so the maskable stop vector cannot reach it; CPU 1
//! "panics" and calls `crash_kexec`. Attempt 1 stops the idle CPUs (they power off), waits its
//! first wait, and leaves CPU 2 remaining; the NMI attempt stops CPU 2, whose saved instruction
//! pointer is in `spin_with_irqs_masked`. Stopped inside a job, CPU 2 cannot power off: it is
//! lost to the next image. The next image boots on CPU 1 with the crash record, brings up the
//! powered-off CPUs, and runs `on_each_cpu` on all of them.
//!
//! The checks: the record names CPU 1 as the crashing CPU and has a note for CPU 2 whose
//! instruction pointer resolves to `spin_with_irqs_masked`; nothing failed to stop; the next
//! image's online CPUs are exactly the ones handed over, CPU 2 is lost, and `on_each_cpu`
//! ran once on each online CPU. The example exits 1 otherwise.
//!
//! Run: `cargo run --release --example crash_kexec [-- --stop-wait-ms W]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use usmp::{cpu_relax, irq_restore, irq_save, CrashRecord};

const PANIC_CPU: usize = 1;
const MASKED_CPU: usize = 2;
/// Bound on every wait (the spinner, the panic job).
const BOUND: Duration = Duration::from_secs(10);
/// Callbacks the next image ran.
static NEXT_IMAGE_CALLS: AtomicU64 = AtomicU64::new(0);

/// CPU 2's job: irqs soft-masked, spinning until released (or `BOUND` passes). The NMI lands
/// here, so CPU 2's crash note points into this function.
#[inline(never)]
fn spin_with_irqs_masked(ready: &AtomicBool, release: &AtomicBool) {
    let flags = irq_save();
    ready.store(true, Ordering::SeqCst);
    let end = Instant::now() + BOUND;
    let mut i = 0u32;
    while !release.load(Ordering::Relaxed) {
        cpu_relax();
        i = i.wrapping_add(1);
        if i % 65_536 == 0 && Instant::now() >= end {
            break;
        }
    }
    irq_restore(flags);
}

/// What the next image's entry saw.
struct Booted {
    generation: u64,
    online: usmp::CpuMask,
    record: Option<CrashRecord>,
    each_cpu_ran: u64,
}

fn arg(name: &str, default: u64) -> anyhow::Result<u64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// The functions at a saved instruction pointer, innermost first (the function the code was
/// inlined into last). Reads debug info and allocates: never call it in a handler.
fn frames_at(ip: u64) -> Vec<String> {
    let mut names = Vec::new();
    if ip != 0 {
        // `resolve` takes a return address and looks up `addr - 1`; a saved ip is the
        // interrupted instruction itself (or a function's first byte), so add 1.
        backtrace::resolve((ip as usize + 1) as *mut std::ffi::c_void, |sym| {
            if let Some(name) = sym.name() {
                names.push(format!("{name:#}"));
            }
        });
    }
    names
}

fn main() -> anyhow::Result<()> {
    let wait = Duration::from_millis(arg("--stop-wait-ms", 100)?);
    let rt = usmp::Builder::new()
        .cpus(4)
        .park_policy(usmp::ParkPolicy::PowerOff)
        // The NMI attempts' wait is a bound, not a delay: on a loaded 2-core host the masked
        // CPU's thread can wait tens of ms to be scheduled, longer than the kernel's 10 ms.
        .stop_waits(wait, Duration::from_millis(100))
        .build()?;

    let (ready, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (r, rl) = (ready.clone(), release.clone());
        // Never joined: the NMI parks CPU 2 inside this job; `release` lets it end at shutdown.
        drop(rt.run_on(MASKED_CPU, move || spin_with_irqs_masked(&r, &rl))?);
    }
    let deadline = Instant::now() + BOUND;
    while !ready.load(Ordering::SeqCst) {
        if Instant::now() >= deadline {
            release.store(true, Ordering::SeqCst);
            bail!("CPU{MASKED_CPU} did not mask its irqs within {BOUND:?}");
        }
        std::thread::yield_now();
    }

    // The panic, on CPU 1. The next image's entry runs as a job on its reboot CPU.
    let h = rt.handle();
    let outcome = rt
        .run_on(PANIC_CPU, move || {
            h.crash_kexec("example: panic on CPU 1", |next, handoff| {
                let online = next.online_mask();
                // `on_each_cpu`: the caller (this job's CPU) runs it too. A static counter, so
                // no callback ever holds the last reference to anything.
                let called = next.on_each_cpu(
                    || {
                        NEXT_IMAGE_CALLS.fetch_add(1, Ordering::Relaxed);
                    },
                    true,
                );
                Booted {
                    generation: next.generation(),
                    online,
                    record: handoff.record.clone(),
                    each_cpu_ran: if called.is_ok() {
                        NEXT_IMAGE_CALLS.load(Ordering::Relaxed)
                    } else {
                        0
                    },
                }
            })
        })?
        .join_timeout(BOUND)?;
    release.store(true, Ordering::SeqCst);
    let k = outcome?;
    let rep = &k.report;
    let b = &k.value;

    println!("== kexec timeline");
    for e in &rep.timeline {
        let who = e.cpu.map_or("-".into(), |c| format!("CPU{c}"));
        println!("{:>9} us  {who:>5}  {}", e.t_us, e.what);
    }
    let rec = b
        .record
        .as_ref()
        .context("FAILED: the next image got no crash record")?;
    println!(
        "== generation {} booted on CPU{} with the crash record of generation {} \
         (reason {:?}, crashing CPU {:?}, failed to stop '{}', lost '{}')",
        b.generation,
        rep.reboot_cpu,
        rec.generation,
        rec.reason,
        rec.crashing_cpu,
        rec.failed,
        rec.lost
    );
    // CPU 2's frames at its saved ip, innermost first (an inlined atomic load, say, then the
    // function it was inlined into).
    let mut masked_frames: Vec<String> = Vec::new();
    for n in &rec.notes {
        // Symbolizing reads debug info and allocates: done here, never in the handler.
        let frames = frames_at(n.regs.ip);
        println!(
            "  CPU{}: ip={:#x} {} sp={:#x} fp={:#x}",
            n.cpu,
            n.regs.ip,
            frames.first().map_or("??", String::as_str),
            n.regs.sp,
            n.regs.fp
        );
        if frames.len() > 1 {
            println!("        inlined into {}", frames[1..].join(" <- "));
        }
        if n.cpu == MASKED_CPU {
            masked_frames = frames;
        }
    }
    let nmi_attempts = rep
        .timeline
        .iter()
        .filter(|e| e.what.contains("(NMI)"))
        .count();
    println!(
        "crash_kexec: next image online {}, lost {}, on_each_cpu ran on {} CPUs, {} NMI \
         attempt(s)",
        b.online, rep.lost, b.each_cpu_ran, nmi_attempts
    );

    if rec.crashing_cpu != Some(PANIC_CPU) {
        bail!(
            "FAILED: the record names {:?} as the crashing CPU",
            rec.crashing_cpu
        );
    }
    if !rec.failed.is_empty() {
        bail!("FAILED: CPUs {} failed to stop", rec.failed);
    }
    if nmi_attempts == 0 {
        bail!("FAILED: the stop never needed the NMI (CPU{MASKED_CPU} was not masked?)");
    }
    if !masked_frames
        .iter()
        .any(|f| f.contains("spin_with_irqs_masked"))
    {
        bail!(
            "FAILED: CPU{MASKED_CPU}'s crash note resolves to {masked_frames:?}, not into \
             spin_with_irqs_masked"
        );
    }
    if b.online != rep.handed_over || !rep.lost.contains(MASKED_CPU) {
        bail!(
            "FAILED: next image online {} but handed over {}, lost {}",
            b.online,
            rep.handed_over,
            rep.lost
        );
    }
    if b.each_cpu_ran != b.online.weight() as u64 {
        bail!(
            "FAILED: on_each_cpu in the next image ran {} times on {} online CPUs",
            b.each_cpu_ran,
            b.online.weight()
        );
    }
    drop(k.next);
    drop(rt);
    println!("crash_kexec: OK");
    Ok(())
}
