//! Issue 8, item 3: IPI callbacks that interrupt a busy CPU run on the CPU's own alternate
//! signal stack (64 KiB by default), not on std's few-KiB overflow stack. Its own binary: a
//! failure here is a SIGSEGV that takes the process down.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::serial;
use usmp::{Builder, RuntimeError, DEFAULT_SIGNAL_STACK};

/// Touches `N` bytes of stack so the compiler cannot shrink the frame, and returns a checksum.
#[inline(never)]
fn use_stack<const N: usize>(seed: u8) -> u64 {
    let mut buf = [0u8; N];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8);
    }
    let buf = std::hint::black_box(&buf);
    buf.iter().map(|&b| b as u64).sum()
}

/// Sends a callback using `N` bytes of stack to CPU 1 while it spins in a job, so the callback
/// runs in the signal handler, and returns the checksum it computed.
fn deep_callback_on_busy_cpu<const N: usize>(rt: &usmp::Runtime) -> u64 {
    let (ctl, job) = common::start_busy_spinner(rt, 1);
    let irqs_before = rt.stats().per_cpu[1].irqs;
    let out = Arc::new(AtomicU64::new(0));
    let o2 = out.clone();
    rt.call_single(
        1,
        move || o2.store(use_stack::<N>(7), Ordering::Relaxed),
        true,
    )
    .unwrap();
    ctl.release.store(true, Ordering::Release);
    assert!(job.join().unwrap(), "the job was never released");
    assert!(
        rt.stats().per_cpu[1].irqs > irqs_before,
        "the callback did not run from the signal handler"
    );
    out.load(Ordering::Relaxed)
}

#[test]
fn a_callback_using_48_kib_of_stack_runs_in_the_signal_handler() {
    let _g = serial();
    let rt = Builder::new().cpus(2).log_events(false).build().unwrap();
    // 6 KiB crashed the old runtime (std's alternate stack); 48 KiB fits the 64 KiB default.
    assert_eq!(deep_callback_on_busy_cpu::<6144>(&rt), use_stack::<6144>(7));
    assert_eq!(
        deep_callback_on_busy_cpu::<49152>(&rt),
        use_stack::<49152>(7)
    );
}

#[test]
fn the_signal_stack_size_is_configurable() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(2)
        .signal_stack(512 * 1024)
        .log_events(false)
        .build()
        .unwrap();
    assert_eq!(
        deep_callback_on_busy_cpu::<{ 384 * 1024 }>(&rt),
        use_stack::<{ 384 * 1024 }>(7)
    );
    assert_eq!(DEFAULT_SIGNAL_STACK, 64 * 1024);
}

#[test]
fn an_unusable_signal_stack_size_is_a_config_error() {
    for bad in [0, 4096, 1 << 40] {
        match Builder::new().cpus(1).signal_stack(bad).build() {
            Err(RuntimeError::BadConfig(m)) => assert!(m.contains("signal_stack"), "{m}"),
            Err(e) => panic!("signal_stack({bad}): wrong error {e}"),
            Ok(_) => panic!("signal_stack({bad}) was accepted"),
        }
    }
}
