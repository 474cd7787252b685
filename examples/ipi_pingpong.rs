//! IPI round trips between two CPUs — the kernel's `smp_call_function_single(cpu, func, info,
//! wait=1)` (kernel/smp.c: queue the csd on the target's `call_single_queue`, send the IPI
//! unless the target is polling with `TIF_POLLING_NRFLAG`, spin in `csd_lock_wait`), measured
//! for three kinds of target:
//!
//! - **busy**: the target runs a job that spins (the IPI is a real-time signal that interrupts
//!   it);
//! - **sleeping**: the target is idle asleep on its futex (`IdlePolicy::SleepOnly`: the IPI is a
//!   futex wake, no signal);
//! - **polling**: the target is idle polling its queue (`IdlePolicy::PollThenSleep` with a long
//!   window: no signal and no wake, the kernel's polling idle).
//!
//! CPU 0 runs a job that sends `call_single(1, .., wait = true)` again and again and times each
//! one. Next to them, in the same run, the floor: two plain threads bouncing a cache line.
//!
//! The check: every synchronous call returned only after its callback ran (the callback count
//! equals the calls made, after each call), and every call succeeded. The example exits 1
//! otherwise.
//!
//! Run: `cargo run --release --example ipi_pingpong [-- --rounds R]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use usmp::IdlePolicy;

/// Bound on every wait (the spinning target starting, the sender job).
const BOUND: Duration = Duration::from_secs(10);

/// Callbacks run on the target (static, so no callback owns the last reference to anything).
static PONGS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Busy,
    Sleeping,
    Polling,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Busy => "busy",
            Target::Sleeping => "sleeping",
            Target::Polling => "polling",
        }
    }
}

fn arg(name: &str, default: usize) -> anyhow::Result<usize> {
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

/// p50 and p99 in microseconds.
fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let p = |q: usize| v[(v.len() - 1) * q / 100].as_secs_f64() * 1e6;
    (p(50), p(99))
}

/// Round trips CPU 0 -> CPU 1 on a fresh two-CPU runtime.
fn measure(target: Target, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let idle = match target {
        Target::Sleeping => IdlePolicy::SleepOnly,
        Target::Polling => IdlePolicy::PollThenSleep(Duration::from_millis(100)),
        Target::Busy => IdlePolicy::default(),
    };
    let rt = usmp::Builder::new().cpus(2).idle(idle).build()?;
    let quit = Arc::new(AtomicBool::new(false));
    let spinner = if target == Target::Busy {
        let (q, spinning) = (quit.clone(), Arc::new(AtomicBool::new(false)));
        let s = spinning.clone();
        let j = rt.run_on(1, move || {
            s.store(true, Ordering::SeqCst);
            let end = Instant::now() + BOUND;
            while !q.load(Ordering::Relaxed) && Instant::now() < end {
                std::hint::spin_loop();
            }
        })?;
        // Ping only once the target is in its job, not while it wakes up for it.
        let deadline = Instant::now() + BOUND;
        while !spinning.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                quit.store(true, Ordering::SeqCst);
                bail!("the busy target did not start within {BOUND:?}");
            }
            std::thread::yield_now();
        }
        Some(j)
    } else {
        None
    };
    PONGS.store(0, Ordering::SeqCst);
    let h = rt.handle();
    let sender = rt.run_on(0, move || -> anyhow::Result<Vec<Duration>> {
        let mut lat = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let t = Instant::now();
            h.call_single(
                1,
                || {
                    PONGS.fetch_add(1, Ordering::Relaxed);
                },
                true,
            )?;
            lat.push(t.elapsed());
            let pongs = PONGS.load(Ordering::Relaxed);
            if pongs != i as u64 + 1 {
                bail!(
                    "FAILED: call {} returned with {pongs} callbacks run (wait=true must mean \
                     the callback ran)",
                    i + 1
                );
            }
        }
        Ok(lat)
    })?;
    let lat = sender.join_timeout(BOUND * 3);
    quit.store(true, Ordering::SeqCst);
    if let Some(j) = spinner {
        j.join_timeout(BOUND)?;
    }
    rt.shutdown();
    lat?
}

/// The floor: two plain threads bounce a cache line `rounds` times.
fn cache_line_floor(rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let ball = Arc::new(AtomicU64::new(0));
    let b = ball.clone();
    let n = rounds as u64;
    let echo = std::thread::spawn(move || {
        let end = Instant::now() + BOUND;
        let mut next = 1;
        while next < 2 * n && Instant::now() < end {
            if b.load(Ordering::Acquire) == next {
                b.store(next + 1, Ordering::Release);
                next += 2;
            }
            std::hint::spin_loop();
        }
    });
    let mut lat = Vec::with_capacity(rounds);
    let end = Instant::now() + BOUND;
    for i in 0..n {
        let t = Instant::now();
        ball.store(2 * i + 1, Ordering::Release);
        while ball.load(Ordering::Acquire) != 2 * i + 2 {
            if Instant::now() >= end {
                bail!("the echo thread stopped answering");
            }
            std::hint::spin_loop();
        }
        lat.push(t.elapsed());
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?;
    Ok(lat)
}

fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 2000)?.max(1);
    let (f50, f99) = percentiles(cache_line_floor(rounds)?);
    println!("ipi_pingpong: cache-line floor  p50 {f50:>7.2} us  p99 {f99:>7.2} us");
    for t in [Target::Busy, Target::Sleeping, Target::Polling] {
        let (p50, p99) = percentiles(measure(t, rounds)?);
        println!(
            "ipi_pingpong: {:<8} target   p50 {p50:>7.2} us  p99 {p99:>7.2} us  ({:.0}x the \
             floor, {rounds} round trips)",
            t.name(),
            p50 / f50.max(0.001)
        );
    }
    println!("ipi_pingpong: OK");
    Ok(())
}
