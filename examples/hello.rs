//! Four logical CPUs: one IPI to a subset, one ordinary job, then the counters.
//! Run with `cargo run --release --example hello`.

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
    let cpu = rt
        .run_on(2, || format!("hello from CPU {:?}", usmp::this_cpu()))?
        .join()?;
    println!(
        "{cpu}; call_many ran on {} CPUs",
        hits.load(Ordering::Relaxed)
    );
    let stats = rt.shutdown();
    println!(
        "ipis sent {}, handled {}, lost {}",
        stats.ipis_sent, stats.ipis_handled, stats.lost_calls
    );
    Ok(())
}
