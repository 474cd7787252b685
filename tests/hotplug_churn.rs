//! Hotplug churn with IPIs in flight, and the dying-CPU flush of seed 002.
//!
//! - `churn_with_ipis_flowing`: 1,000 down/up cycles while sender threads fire sync and async
//!   calls at random CPUs; every call's API result is checked against how often it ran.
//! - `dying_flush_runs_a_call_queued_in_the_dying_window`: a call queued while the dying CPU
//!   has irqs masked (its doorbell cannot be taken) runs before `cpu_down` returns.
//! - `dying_flush_skipped_is_caught`: the same with the flush switched off (the bug) fails the
//!   check, so the check is real.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;

use common::{serial, wait_until, PATIENCE};
use usmp::{Builder, IpiError, Runtime, Section};

/// How one call came back from the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Offline,
    /// `Timeout { started: false }`: cancelled, must never run.
    Cancelled,
    /// `Timeout { started: true }`: running when the sender gave up, runs at most once.
    Stuck,
    NoCsd,
}

fn outcome(r: &Result<(), IpiError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(IpiError::Offline { .. }) => Outcome::Offline,
        Err(IpiError::Timeout { started: false, .. }) => Outcome::Cancelled,
        Err(IpiError::Timeout { started: true, .. }) => Outcome::Stuck,
        Err(IpiError::NoCsd { .. }) => Outcome::NoCsd,
        Err(e) => panic!("unexpected IPI error: {e}"),
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

const CPUS: usize = 4;
const CYCLES: usize = 1000;
const SENDERS: usize = 3;
/// Call ids each sender may use (it stops early if it runs out).
const IDS_PER_SENDER: usize = 1 << 20;

/// One sender: mixed sync/async `call_single` to random CPUs until `done`. Call `id` bumps
/// `ran[id]`; returns the API outcome of each id it used, in order from `base`.
fn sender(
    rt: usmp::Handle,
    ran: Arc<Vec<AtomicU8>>,
    base: usize,
    seed: u64,
    done: Arc<AtomicBool>,
) -> Vec<Outcome> {
    let mut rng = seed;
    let mut out = Vec::with_capacity(1 << 16);
    while !done.load(Ordering::Relaxed) && out.len() < IDS_PER_SENDER {
        let id = base + out.len();
        let r = xorshift(&mut rng);
        let cpu = (r % CPUS as u64) as usize;
        let wait = r & 0x100 != 0;
        let c = ran.clone();
        let res = rt.call_single(
            cpu,
            move || {
                c[id].fetch_add(1, Ordering::Relaxed);
            },
            wait,
        );
        out.push(outcome(&res));
        if !wait {
            // Async calls return at once: leave the CPUs (and the csd pool) some air.
            std::thread::yield_now();
        }
    }
    out
}

#[test]
fn churn_with_ipis_flowing() {
    let _g = serial();
    let rt = Builder::new()
        .cpus(CPUS)
        .log_events(false)
        .boot_timeout(Duration::from_secs(5))
        .call_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ran: Arc<Vec<AtomicU8>> = Arc::new(
        (0..SENDERS * IDS_PER_SENDER)
            .map(|_| AtomicU8::new(0))
            .collect(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let senders: Vec<JoinHandle<Vec<Outcome>>> = (0..SENDERS)
        .map(|i| {
            let (h, ran, done) = (rt.handle(), ran.clone(), done.clone());
            std::thread::spawn(move || {
                sender(
                    h,
                    ran,
                    i * IDS_PER_SENDER,
                    0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                    done,
                )
            })
        })
        .collect();

    let t0 = Instant::now();
    for i in 0..CYCLES {
        let cpu = 1 + i % (CPUS - 1);
        rt.cpu_down(cpu)
            .unwrap_or_else(|e| panic!("cycle {i}: cpu_down({cpu}): {e}"));
        assert!(!rt.is_online(cpu), "cycle {i}");
        rt.cpu_up(cpu)
            .unwrap_or_else(|e| panic!("cycle {i}: cpu_up({cpu}): {e}"));
        assert!(rt.is_online(cpu), "cycle {i}");
    }
    let churn = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let outcomes: Vec<Vec<Outcome>> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    assert_eq!(rt.online_mask().to_string(), "0-3");
    assert_eq!(rt.init_mm_refs(), CPUS as u64);

    let fin = rt.shutdown();
    let mut tally = [0u64; 5];
    for (i, outs) in outcomes.iter().enumerate() {
        for (k, &o) in outs.iter().enumerate() {
            let id = i * IDS_PER_SENDER + k;
            let n = ran[id].load(Ordering::SeqCst);
            tally[o as usize] += 1;
            match o {
                Outcome::Ok => assert_eq!(n, 1, "call {id}: Ok but ran {n} times"),
                Outcome::Offline | Outcome::Cancelled | Outcome::NoCsd => {
                    assert_eq!(n, 0, "call {id}: {o:?} but ran {n} times")
                }
                Outcome::Stuck => assert!(n <= 1, "call {id}: {o:?} but ran {n} times"),
            }
        }
    }
    // Ids past the ones used never ran (nothing ran under a wrong id).
    for (i, outs) in outcomes.iter().enumerate() {
        let end = (i + 1) * IDS_PER_SENDER;
        let stray = (i * IDS_PER_SENDER + outs.len()..end)
            .filter(|&id| ran[id].load(Ordering::Relaxed) != 0)
            .count();
        assert_eq!(stray, 0, "sender {i}: calls ran that were never sent");
    }
    assert_eq!(fin.lost_calls, 0, "{fin:?}");
    eprintln!(
        "{CYCLES} cycles in {churn:?}; calls: {} ok, {} offline, {} cancelled, {} stuck, {} no-csd; \
         ipis sent {}, handled {}, cancelled {}",
        tally[0], tally[1], tally[2], tally[3], tally[4], fin.ipis_sent, fin.ipis_handled,
        fin.ipis_cancelled
    );
    assert!(
        tally[0] > 0 && tally[1] > 0,
        "the churn did not race any calls"
    );
}

/// The dying-window rig: a DYING step (the teardown of a STARTING state) that, on CPU 1 and
/// only when armed, holds the dying CPU inside stop_machine (irqs masked) until a helper
/// thread has queued a call to it.
struct DyingWindow {
    armed: AtomicBool,
    in_dying: AtomicBool,
    queued: AtomicBool,
    /// The teardown saw `queued` (false: its spin bound ran out first).
    held: AtomicBool,
    /// Spin-loop iterations that take about `HOLD_BOUND` on this host.
    spin_limit: AtomicU64,
    ran: AtomicU64,
}

const HOLD_BOUND: Duration = Duration::from_secs(2);

/// Spin-loop iterations per `HOLD_BOUND`, measured in thread context (the DYING step runs in
/// IPI context, where it must not read clocks through std).
fn calibrate_spins() -> u64 {
    let n = 1_000_000u64;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::spin_loop();
    }
    let per = t.elapsed().as_nanos().max(1) as u64;
    (HOLD_BOUND.as_nanos() as u64).saturating_mul(n) / per
}

fn dying_window_rig(rt: &Runtime) -> Arc<DyingWindow> {
    let w = Arc::new(DyingWindow {
        armed: AtomicBool::new(false),
        in_dying: AtomicBool::new(false),
        queued: AtomicBool::new(false),
        held: AtomicBool::new(false),
        spin_limit: AtomicU64::new(calibrate_spins()),
        ran: AtomicU64::new(0),
    });
    let w2 = w.clone();
    rt.setup_state(
        "test:dying-window",
        Section::Starting,
        Some(Arc::new(|_| Ok(()))),
        // IPI context: atomics and a bounded spin only.
        Some(Arc::new(move |cpu| {
            if cpu != 1 || !w2.armed.load(Ordering::Acquire) {
                return Ok(());
            }
            w2.in_dying.store(true, Ordering::Release);
            let limit = w2.spin_limit.load(Ordering::Relaxed);
            let mut n = 0u64;
            while !w2.queued.load(Ordering::Acquire) && n < limit {
                std::hint::spin_loop();
                n += 1;
            }
            w2.held
                .store(w2.queued.load(Ordering::Acquire), Ordering::Release);
            Ok(())
        })),
    )
    .unwrap();
    w
}

/// What `cpu_down(1)` left behind when it returned.
#[derive(Debug)]
struct DownResult {
    /// Times the call queued in the dying window had run.
    ran: u64,
    /// Calls found queued on CPU 1 after it had left the online mask (seed 002's "IPI on
    /// offline CPU"): run late by the offline CPU instead of by the dying flush.
    on_offline: u64,
}

/// Takes CPU 1 down while a helper queues one async call to it from inside the dying window.
fn down_with_call_in_dying_window(rt: &Runtime, w: &Arc<DyingWindow>) -> DownResult {
    let offline_before = rt.stats().ipi_on_offline;
    w.armed.store(true, Ordering::Release);
    let (h, w2) = (rt.handle(), w.clone());
    let helper = std::thread::spawn(move || {
        if !wait_until(PATIENCE, || w2.in_dying.load(Ordering::Acquire)) {
            return Err("CPU 1 never entered its DYING step".to_string());
        }
        let w3 = w2.clone();
        // CPU 1 is still in the online mask and its queue is open: the call is accepted, but
        // CPU 1 spins with irqs masked, so the doorbell is only recorded.
        let r = h.call_single_async(1, move || {
            w3.ran.fetch_add(1, Ordering::SeqCst);
        });
        w2.queued.store(true, Ordering::Release);
        r.map_err(|e| format!("call_single_async in the dying window: {e}"))
    });
    let down = rt.cpu_down(1);
    let ran = w.ran.load(Ordering::SeqCst);
    let on_offline = rt.stats().ipi_on_offline - offline_before;
    w.armed.store(false, Ordering::Release);
    let sent = helper.join().unwrap();
    down.unwrap();
    sent.unwrap();
    assert!(
        w.held.load(Ordering::Acquire),
        "the DYING step's spin bound ran out before the call was queued"
    );
    assert!(!rt.is_online(1));
    DownResult { ran, on_offline }
}

/// The seed-002 check: the call ran exactly once before `cpu_down` returned, and it was the
/// dying flush that ran it (not a late doorbell on the already-offline CPU).
fn flushed_by_the_dying_step(d: &DownResult) -> bool {
    d.ran == 1 && d.on_offline == 0
}

fn rt2() -> Runtime {
    Builder::new()
        .cpus(2)
        .log_events(false)
        .boot_timeout(Duration::from_secs(5))
        .call_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[test]
fn dying_flush_runs_a_call_queued_in_the_dying_window() {
    let _g = serial();
    let rt = rt2();
    let w = dying_window_rig(&rt);
    let d = down_with_call_in_dying_window(&rt, &w);
    assert!(
        flushed_by_the_dying_step(&d),
        "a call accepted while CPU 1 was dying was not run by the dying flush: {d:?}"
    );
    rt.cpu_up(1).unwrap();
    assert_eq!(w.ran.load(Ordering::SeqCst), 1, "the call ran twice");
    assert_eq!(rt.init_mm_refs(), 2);
    let fin = rt.shutdown();
    assert_eq!(fin.lost_calls, 0, "{fin:?}");
}

/// The broken variant (the dying CPU skips its flush). The call then either is still stranded
/// in the dead CPU's queue when `cpu_down` returns (the seed's lost call), or was run late by
/// the offline CPU after its doorbell was replayed ("IPI on offline CPU"); the check above
/// must fail either way.
#[test]
fn dying_flush_skipped_is_caught() {
    let _g = serial();
    let rt = rt2();
    let w = dying_window_rig(&rt);
    rt.faults()
        .set_broken(usmp::fault::Broken::SkipDyingFlush, true);
    let d = down_with_call_in_dying_window(&rt, &w);
    rt.faults()
        .set_broken(usmp::fault::Broken::SkipDyingFlush, false);
    eprintln!("skipped dying flush: {d:?}");
    assert!(
        !flushed_by_the_dying_step(&d),
        "the check did not catch the skipped flush: {d:?}"
    );
    assert!(d.ran <= 1, "{d:?}");
    // A stranded call is still linked in CPU 1's queue: bring CPU 1 back and let it drain, so
    // the run ends with nothing lost and nothing run twice.
    rt.cpu_up(1).unwrap();
    wait_until(Duration::from_secs(5), || w.ran.load(Ordering::SeqCst) != 0);
    let fin = rt.shutdown();
    assert_eq!(w.ran.load(Ordering::SeqCst), 1, "{fin:?}");
    assert_eq!(fin.lost_calls, 0, "{fin:?}");
}
