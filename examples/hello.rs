//! Four logical CPUs: one IPI to a subset, one ordinary job, then the counters — the kernel's
//! `smp_call_function_many(mask, func, info, wait=1)` (kernel/smp.c) and a task pinned to one
//! CPU (`set_cpus_allowed_ptr`).
//!
//! The check: the synchronous `call_many` returned after its callback ran on all three CPUs,
//! the job ran on the CPU it was sent to, and the runtime lost no call; the example exits 1
//! otherwise.
//!
//! Run: `cargo run --release --example hello`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let rt = usmp::Builder::new().cpus(4).build()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    // Runs on CPUs 1-3 in IPI context: atomics only (see `usmp::ipi`).
    rt.call_many(
        &"1-3".parse()?,
        move || {
            h.fetch_add(1, Ordering::Relaxed);
        },
        true,
    )?;
    // An ordinary job may allocate, block and print.
    let (cpu, msg) = rt
        .run_on(2, || {
            let cpu = usmp::this_cpu();
            (cpu, format!("hello from CPU {cpu:?}"))
        })?
        .join()?;
    let ran = hits.load(Ordering::Relaxed);
    println!("{msg}; call_many ran on {ran} CPUs");
    let stats = rt.shutdown();
    println!(
        "ipis sent {}, handled {}, lost {}",
        stats.ipis_sent, stats.ipis_handled, stats.lost_calls
    );
    if ran != 3 || cpu != Some(2) || stats.lost_calls != 0 {
        anyhow::bail!(
            "FAILED: call_many ran on {ran} of 3 CPUs, the job ran on {cpu:?}, {} calls lost",
            stats.lost_calls
        );
    }
    Ok(())
}
