//! Work keeps running while CPUs go up and down — the kernel's CPU hotplug teardown:
//! `sched_cpu_dying` -> `migrate_tasks` (runnable tasks move off the dying CPU) and
//! `smpcfd_dying_cpu` -> `flush_smp_call_function_queue` (queued IPI callbacks run before the
//! CPU goes away; seed 002), with `cpu_up` / `cpu_down` driven as rcutorture's onoff does.
//!
//! A submitter thread queues jobs (`run_on`) and async IPIs (`call_single_async`) on random
//! online CPUs; each job and each callback marks its own slot. Meanwhile the main thread takes
//! random CPUs down and brings them back up. A submission refused because its CPU is offline
//! is retried on another CPU (it was never accepted, so it is not lost); an accepted one must
//! run exactly once even if its CPU goes down before it runs: jobs move to an online CPU, calls
//! are flushed by the dying CPU.
//!
//! The check: every slot was marked exactly once, every job handle joined, and the runtime
//! lost no call. The example exits 1 otherwise.
//!
//! Run: `cargo run --release --example hotplug_migrate [-- --cpus N --jobs J]`

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use usmp::{HotplugError, IpiError, RuntimeError};

/// Bound on every wait (a refused submission's retries, joins, settling, bring-back).
const BOUND: Duration = Duration::from_secs(10);

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

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// What the submitter did.
#[derive(Default)]
struct Submitted {
    refused: u64,
    /// Jobs that ran on another CPU than the one they were queued on.
    moved: u64,
}

fn main() -> anyhow::Result<()> {
    let cpus = arg("--cpus", 4)?;
    let n = arg("--jobs", 10000)?;
    let rt = usmp::Builder::new().cpus(cpus).build()?;
    // Slot i: job i; slot n + i: call i.
    let marks: Arc<Vec<AtomicU32>> = Arc::new((0..2 * n).map(|_| AtomicU32::new(0)).collect());

    let submitter = {
        let (h, marks) = (rt.handle(), marks.clone());
        std::thread::Builder::new()
            .name("submitter".into())
            .spawn(move || -> anyhow::Result<Submitted> {
                let mut s = Submitted::default();
                let mut rng = 0x2545_F491_4F6C_DD1Du64;
                let mut handles = Vec::with_capacity(n);
                for i in 0..n {
                    // A job: a little work, then its mark and where it ran.
                    let deadline = Instant::now() + BOUND;
                    loop {
                        let online = h.online_mask();
                        let k = (xorshift(&mut rng) % online.weight().max(1) as u64) as usize;
                        let cpu = online.iter().nth(k).unwrap_or(0);
                        let m = marks.clone();
                        let job = move || {
                            let t = Instant::now();
                            while t.elapsed() < Duration::from_micros(20) {
                                std::hint::spin_loop();
                            }
                            m[i].fetch_add(1, Ordering::Relaxed);
                            usmp::this_cpu()
                        };
                        match h.run_on(cpu, job) {
                            Ok(j) => {
                                handles.push((cpu, j));
                                break;
                            }
                            Err(RuntimeError::Offline { .. }) if Instant::now() < deadline => {
                                s.refused += 1
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    // A call: its mark, in IPI context (one atomic add).
                    loop {
                        let online = h.online_mask();
                        let k = (xorshift(&mut rng) % online.weight().max(1) as u64) as usize;
                        let cpu = online.iter().nth(k).unwrap_or(0);
                        let m = marks.clone();
                        match h.call_single_async(cpu, move || {
                            m[n + i].fetch_add(1, Ordering::Relaxed);
                        }) {
                            Ok(()) => break,
                            Err(IpiError::Offline { .. }) if Instant::now() < deadline => {
                                s.refused += 1
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                for (queued_on, j) in handles {
                    let ran_on = j.join_timeout(BOUND)?;
                    if ran_on != Some(queued_on) {
                        s.moved += 1;
                    }
                }
                Ok(s)
            })
            .context("cannot start the submitter thread")?
    };

    // The churn: toggle random CPUs until the submitter has joined every job, keeping one
    // online.
    let (mut downs, mut ups, mut rng) = (0u64, 0u64, 0x9E37_79B9u64);
    let churn_err = loop {
        if submitter.is_finished() {
            break None;
        }
        let cpu = (xorshift(&mut rng) % cpus as u64) as usize;
        let r = if rt.is_online(cpu) {
            if rt.online_mask().weight() <= 1 {
                continue;
            }
            rt.cpu_down(cpu).map(|()| downs += 1)
        } else {
            rt.cpu_up(cpu).map(|()| ups += 1)
        };
        match r {
            Ok(()) | Err(HotplugError::AlreadyOnline { .. }) => {}
            Err(e) => break Some(e),
        }
    };
    // Everything back online (a CPU in limbo is waited for first).
    for cpu in 0..cpus {
        let deadline = Instant::now() + BOUND;
        while !rt.is_online(cpu) {
            match rt.cpu_up(cpu) {
                Ok(()) | Err(HotplugError::AlreadyOnline { .. }) => break,
                Err(HotplugError::Limbo { .. } | HotplugError::BootTimeout { .. })
                    if Instant::now() < deadline =>
                {
                    rt.wait_limbo_clear(BOUND);
                }
                Err(e) => bail!("cannot bring CPU {cpu} back: {e}"),
            }
        }
    }
    let s = submitter
        .join()
        .map_err(|_| anyhow::anyhow!("the submitter panicked"))??;
    if let Some(e) = churn_err {
        bail!("FAILED: hotplug operation failed: {e}");
    }

    // Every callback has run and dropped its closure (bounded; a mark still missing after the
    // bound is reported below).
    let deadline = Instant::now() + BOUND;
    let all_marked = || marks.iter().all(|m| m.load(Ordering::Acquire) > 0);
    while (Arc::strong_count(&marks) > 1 || !all_marked()) && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let stats = rt.shutdown();
    let count = |f: &dyn Fn(u32) -> bool, r: std::ops::Range<usize>| {
        r.filter(|&i| f(marks[i].load(Ordering::Acquire))).count()
    };
    let never = count(&|m| m == 0, 0..2 * n);
    let twice = count(&|m| m > 1, 0..2 * n);
    let calls_lost = count(&|m| m == 0, n..2 * n);
    println!(
        "hotplug_migrate: {cpus} CPUs, {downs} cpu_down + {ups} cpu_up while {n} jobs and {n} \
         async calls ran; {} jobs moved off a dying CPU, {} submissions refused and retried; \
         {} never ran ({calls_lost} of them calls), {twice} ran twice, runtime lost {} calls",
        s.moved, s.refused, never, stats.lost_calls
    );
    if never != 0 || twice != 0 || stats.lost_calls != 0 {
        bail!("FAILED: every job and call must run exactly once");
    }
    if downs == 0 {
        bail!("FAILED: no CPU went down, so nothing was checked under hotplug");
    }
    println!("hotplug_migrate: OK");
    Ok(())
}
