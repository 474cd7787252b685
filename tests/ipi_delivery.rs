//! IPI delivery: every accepted call runs exactly once, on the CPU it was sent to, whether the
//! senders are outside the runtime or are logical CPUs themselves; several runtimes coexist.

mod common;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{serial, wait_until, PATIENCE};
use usmp::{Builder, CpuId, Handle, IpiError};

const CPUS: usize = 8;

/// One counter per call id, plus a count of callbacks that ran on the wrong CPU.
struct Ledger {
    hits: Vec<AtomicU8>,
    misrouted: AtomicUsize,
}

impl Ledger {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Ledger {
            hits: (0..n).map(|_| AtomicU8::new(0)).collect(),
            misrouted: AtomicUsize::new(0),
        })
    }

    /// The callback for call `id` aimed at `cpu` (16 bytes of captures + the cpu).
    fn call(self: &Arc<Self>, id: usize, cpu: CpuId) -> impl FnOnce() + Send + 'static {
        let l = self.clone();
        move || {
            l.hits[id].fetch_add(1, Ordering::Relaxed);
            if usmp::this_cpu() != Some(cpu) {
                l.misrouted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asserts every call ran exactly once, on its CPU.
    fn assert_exactly_once(&self) {
        let bad: Vec<(usize, u8)> = self
            .hits
            .iter()
            .enumerate()
            .map(|(i, h)| (i, h.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n != 1)
            .take(10)
            .collect();
        assert!(
            bad.is_empty(),
            "calls not run exactly once (id, runs): {bad:?}"
        );
        assert_eq!(
            self.misrouted.load(Ordering::Relaxed),
            0,
            "callbacks ran on the wrong CPU"
        );
    }
}

/// Sends calls `first..first+n` of the ledger, target `id % CPUS`, every third one async.
/// Returns the errors seen (there must be none).
fn send_range(h: &Handle, ledger: &Arc<Ledger>, first: usize, n: usize) -> Vec<(usize, IpiError)> {
    let mut errs = Vec::new();
    for id in first..first + n {
        let cpu = id % CPUS;
        let r = if id % 3 == 2 {
            h.call_single_async(cpu, ledger.call(id, cpu))
        } else {
            h.call_single(cpu, ledger.call(id, cpu), true)
        };
        if let Err(e) = r {
            errs.push((id, e));
        }
    }
    errs
}

fn drain(h: &Handle) {
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = h.stats();
            s.ipis_handled == s.ipis_sent
        }),
        "async calls did not drain: {:?}",
        h.stats()
    );
}

#[test]
fn exactly_once_from_external_senders() {
    let _g = serial();
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 10_000;
    const TOTAL: usize = SENDERS * PER_SENDER;
    let t0 = Instant::now();
    let rt = Builder::new()
        .cpus(CPUS)
        .call_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let ledger = Ledger::new(TOTAL);
    let errs: Vec<(usize, IpiError)> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..SENDERS)
            .map(|k| {
                let (h, l) = (rt.handle(), ledger.clone());
                s.spawn(move || send_range(&h, &l, k * PER_SENDER, PER_SENDER))
            })
            .collect();
        senders
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    assert!(
        errs.is_empty(),
        "{} calls failed, first: {:?}",
        errs.len(),
        &errs[..errs.len().min(5)]
    );
    drain(&rt);
    ledger.assert_exactly_once();
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0, "{st:?}");
    assert_eq!(st.ipis_sent, TOTAL as u64);
    assert_eq!(st.ipis_handled, TOTAL as u64);
    assert_eq!(st.ipis_cancelled, 0);
    assert_eq!(st.calls_failed, 0);
    assert_eq!(st.calls_completed, TOTAL as u64);
    let per_cpu: u64 = st.per_cpu.iter().map(|c| c.calls_handled).sum();
    assert_eq!(per_cpu, TOTAL as u64);
    for c in &st.per_cpu {
        assert_eq!(
            c.calls_handled,
            (TOTAL / CPUS) as u64,
            "CPU{} handled a wrong share",
            c.cpu
        );
    }
    ledger.assert_exactly_once(); // shutdown ran nothing twice
    eprintln!("external senders: {TOTAL} calls in {:?}", t0.elapsed());
}

#[test]
fn exactly_once_from_cpu_senders() {
    let _g = serial();
    // CPUs 0-3 send (from jobs) to all 8 CPUs, themselves included (a self-call runs locally);
    // they receive each other's calls while they send, so a CPU blocked in a synchronous
    // call must still serve the IPIs aimed at it.
    const SENDER_CPUS: usize = 4;
    const PER_SENDER: usize = 5_000;
    const TOTAL: usize = SENDER_CPUS * PER_SENDER;
    let t0 = Instant::now();
    let rt = Builder::new()
        .cpus(CPUS)
        .call_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let ledger = Ledger::new(TOTAL);
    let jobs: Vec<_> = (0..SENDER_CPUS)
        .map(|k| {
            let (h, l) = (rt.handle(), ledger.clone());
            rt.run_on(k, move || {
                assert_eq!(usmp::this_cpu(), Some(k));
                let errs = send_range(&h, &l, k * PER_SENDER, PER_SENDER);
                errs.into_iter()
                    .map(|(i, e)| format!("#{i}: {e}"))
                    .collect::<Vec<_>>()
            })
            .unwrap()
        })
        .collect();
    for (k, j) in jobs.into_iter().enumerate() {
        let errs = j.join_timeout(Duration::from_secs(60)).expect("sender job");
        assert!(
            errs.is_empty(),
            "CPU{k}: {} calls failed, first: {:?}",
            errs.len(),
            &errs[..errs.len().min(5)]
        );
    }
    drain(&rt);
    ledger.assert_exactly_once();
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0, "{st:?}");
    assert_eq!(st.calls_failed, 0);
    assert_eq!(st.ipis_handled, TOTAL as u64);
    // Each sender CPU sent 7/8 of its calls to other CPUs (the rest ran locally).
    for c in &st.per_cpu[..SENDER_CPUS] {
        assert_eq!(
            c.calls_sent,
            (PER_SENDER - PER_SENDER / CPUS) as u64,
            "CPU{}",
            c.cpu
        );
    }
    eprintln!("CPU senders: {TOTAL} calls in {:?}", t0.elapsed());
}

/// What one sender of the shutdown race saw.
struct RaceReport {
    accepted: usize,
    refused: bool,
    errs: Vec<String>,
}

/// Sends calls `first..first+n` (every third async) until one is refused with `Offline`.
/// `accepted[id]` records which calls were accepted; `going` counts senders whose first call
/// was accepted.
fn send_until_refused(
    h: &Handle,
    l: &Arc<Ledger>,
    accepted: &[AtomicU8],
    going: &AtomicUsize,
    first: usize,
    n: usize,
) -> RaceReport {
    let mut rep = RaceReport {
        accepted: 0,
        refused: false,
        errs: Vec::new(),
    };
    for (id, acc) in accepted.iter().enumerate().skip(first).take(n) {
        let cpu = id % CPUS;
        let r = if id % 3 == 2 {
            h.call_single_async(cpu, l.call(id, cpu))
        } else {
            h.call_single(cpu, l.call(id, cpu), true)
        };
        match r {
            Ok(()) => {
                acc.store(1, Ordering::SeqCst);
                rep.accepted += 1;
                if rep.accepted == 1 {
                    going.fetch_add(1, Ordering::SeqCst);
                }
            }
            // Refused, never run: the CPU went offline, or (issue 19) the runtime shut down.
            Err(IpiError::Offline { .. } | IpiError::ShutDown) => {
                rep.refused = true;
                break;
            }
            Err(e) => rep.errs.push(format!("#{id}: {e}")),
        }
    }
    rep
}

#[test]
fn exactly_once_or_offline_across_shutdown() {
    let _g = serial();
    // Senders outside the runtime and on CPUs keep sending while the runtime shuts down: each
    // call is either accepted and run exactly once (by the IPI or by the dying CPU's flush) or
    // refused with Offline (or ShutDown, once the shutdown has begun) and never run.
    const EXT: usize = 3;
    const ON_CPU: usize = 2;
    const PER_SENDER: usize = 50_000;
    const TOTAL: usize = (EXT + ON_CPU) * PER_SENDER;
    let rt = Builder::new()
        .cpus(CPUS)
        .call_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let ledger = Ledger::new(TOTAL);
    let accepted: Arc<Vec<AtomicU8>> = Arc::new((0..TOTAL).map(|_| AtomicU8::new(0)).collect());
    let going = Arc::new(AtomicUsize::new(0));
    let jobs: Vec<_> = (0..ON_CPU)
        .map(|k| {
            let (h, l, a, g) = (rt.handle(), ledger.clone(), accepted.clone(), going.clone());
            rt.run_on(k, move || {
                send_until_refused(&h, &l, &a, &g, (EXT + k) * PER_SENDER, PER_SENDER)
            })
            .unwrap()
        })
        .collect();
    let (st, ext) = std::thread::scope(|s| {
        let senders: Vec<_> = (0..EXT)
            .map(|k| {
                let (h, l, a, g) = (rt.handle(), ledger.clone(), accepted.clone(), going.clone());
                s.spawn(move || send_until_refused(&h, &l, &a, &g, k * PER_SENDER, PER_SENDER))
            })
            .collect();
        // Shut down once every sender has had a call accepted: all of them are in the race.
        let all_going = wait_until(PATIENCE, || going.load(Ordering::SeqCst) == EXT + ON_CPU);
        let st = rt.shutdown();
        let ext: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            all_going,
            "only {} of {} senders had a call accepted before the shutdown",
            going.load(Ordering::SeqCst),
            EXT + ON_CPU
        );
        (st, ext)
    });
    let mut results = ext;
    for j in jobs {
        results.push(j.join_timeout(Duration::from_secs(10)).expect("sender job"));
    }
    for (k, r) in results.iter().enumerate() {
        assert!(
            r.errs.is_empty(),
            "sender {k}: unexpected errors {:?}",
            &r.errs[..r.errs.len().min(5)]
        );
        assert!(
            r.refused,
            "sender {k} ran out of calls before the shutdown: no race"
        );
    }
    assert!(results.iter().map(|r| r.accepted).sum::<usize>() > 0);
    for id in 0..TOTAL {
        let (a, h) = (
            accepted[id].load(Ordering::SeqCst),
            ledger.hits[id].load(Ordering::SeqCst),
        );
        assert_eq!(h, a, "call #{id}: accepted={a} but ran {h} times");
    }
    assert_eq!(ledger.misrouted.load(Ordering::Relaxed), 0);
    assert_eq!(st.lost_calls, 0, "{st:?}");
    let n_acc: u64 = accepted
        .iter()
        .map(|a| a.load(Ordering::SeqCst) as u64)
        .sum();
    // Self-calls from the CPU senders run locally and count as handled, not as queued IPIs,
    // so compare what ran with what was accepted rather than with ipis_sent.
    assert_eq!(st.ipis_handled, n_acc, "{st:?}");
    eprintln!(
        "shutdown race: {n_acc} calls accepted, offline_ipis {}",
        st.offline_ipis
    );
}

#[test]
fn call_many_runs_once_per_target() {
    let _g = serial();
    let rt = Builder::new().cpus(CPUS).build().unwrap();
    let hits: Arc<Vec<AtomicUsize>> = Arc::new((0..CPUS).map(|_| AtomicUsize::new(0)).collect());
    let bump = {
        let h = hits.clone();
        move || {
            h[usmp::this_cpu().unwrap()].fetch_add(1, Ordering::Relaxed);
        }
    };
    let snapshot = |h: &Arc<Vec<AtomicUsize>>| {
        h.iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    // From outside: every CPU in the mask, none other.
    rt.call_many(&"1-3,6".parse().unwrap(), bump.clone(), true)
        .unwrap();
    assert_eq!(snapshot(&hits), [0, 1, 1, 1, 0, 0, 1, 0]);
    // From CPU 2: call_all_but_self skips CPU 2; on_each_cpu includes it.
    let (h, b) = (rt.handle(), bump.clone());
    rt.run_on(2, move || h.call_all_but_self(b, true))
        .unwrap()
        .join_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(snapshot(&hits), [1, 2, 1, 2, 1, 1, 2, 1]);
    let (h, b) = (rt.handle(), bump.clone());
    rt.run_on(2, move || h.on_each_cpu(b, true))
        .unwrap()
        .join_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(snapshot(&hits), [2, 3, 2, 3, 2, 2, 3, 2]);
    // Async call_many: drained later, still once each.
    rt.call_many(&usmp::CpuMask::first_n(CPUS), bump, false)
        .unwrap();
    drain(&rt);
    assert_eq!(snapshot(&hits), [3, 4, 3, 4, 3, 3, 4, 3]);
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0);
    assert_eq!(st.calls_failed, 0);
}

#[test]
fn two_runtimes_coexist() {
    let _g = serial();
    // Default signals for both: one handler per process serves both runtimes.
    let a = Builder::new().cpus(2).name("rt-a").build().unwrap();
    let b = Builder::new().cpus(3).name("rt-b").build().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let record = |seen: &Arc<AtomicUsize>, tag: usize| {
        let s = seen.clone();
        move || {
            s.fetch_add(
                tag * 100 + usmp::this_cpu().map_or(99, |c| c),
                Ordering::SeqCst,
            );
        }
    };
    a.call_single(1, record(&seen, 1), true).unwrap();
    assert_eq!(seen.swap(0, Ordering::SeqCst), 101);
    b.call_single(2, record(&seen, 2), true).unwrap();
    assert_eq!(seen.swap(0, Ordering::SeqCst), 202);
    b.call_many(&"0-2".parse().unwrap(), record(&seen, 2), true)
        .unwrap();
    assert_eq!(seen.swap(0, Ordering::SeqCst), 3 * 200 + 1 + 2); // tag 2 on CPUs 0, 1, 2
                                                                 // A CPU of one runtime calls into the other (it is an outside thread there).
    let (hb, r) = (b.handle(), record(&seen, 2));
    a.run_on(1, move || hb.call_single(1, r, true))
        .unwrap()
        .join_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(seen.swap(0, Ordering::SeqCst), 201);
    let (ha, r) = (a.handle(), record(&seen, 1));
    b.run_on(2, move || ha.call_single(0, r, true))
        .unwrap()
        .join_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(seen.swap(0, Ordering::SeqCst), 100);
    // Each runtime counts only its own calls.
    assert_eq!(a.stats().ipis_sent, 2);
    assert_eq!(b.stats().ipis_sent, 5);
    // Shutting one down leaves the other working.
    let sa = a.shutdown();
    assert_eq!(sa.lost_calls, 0);
    b.call_single(1, record(&seen, 2), true).unwrap();
    assert_eq!(seen.swap(0, Ordering::SeqCst), 201);
    let sb = b.shutdown();
    assert_eq!(sb.lost_calls, 0);
    assert_eq!(sb.ipis_handled, 6);
}
