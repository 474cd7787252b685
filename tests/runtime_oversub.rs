//! An oversubscribed runtime: 64 logical CPUs on a 2-core host boot, take IPIs from outside
//! and from each other, and shut down cleanly, all within bounded time.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{serial, wait_until};
use usmp::{Builder, CpuMask, CpuRunState};

const CPUS: usize = 64;

fn snapshot(h: &[AtomicUsize]) -> Vec<usize> {
    h.iter().map(|a| a.load(Ordering::SeqCst)).collect()
}

#[test]
fn sixty_four_cpus_on_two_cores() {
    let _g = serial();
    let t0 = Instant::now();
    let rt = Builder::new()
        .cpus(CPUS)
        .call_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let boot = t0.elapsed();
    assert_eq!(rt.online_mask().weight(), CPUS);
    assert_eq!(rt.online_mask(), CpuMask::first_n(CPUS));
    assert!(boot < Duration::from_secs(30), "boot took {boot:?}");

    let hits: Arc<Vec<AtomicUsize>> = Arc::new((0..CPUS).map(|_| AtomicUsize::new(0)).collect());
    let bump = {
        let h = hits.clone();
        move || {
            h[usmp::this_cpu().unwrap()].fetch_add(1, Ordering::SeqCst);
        }
    };
    // call_many to all, from outside the runtime: more than one batch's worth of targets.
    rt.call_many(&CpuMask::first_n(CPUS), bump.clone(), true)
        .unwrap();
    assert_eq!(snapshot(&hits), vec![1; CPUS]);
    // call_single to each.
    for cpu in 0..CPUS {
        rt.call_single(cpu, bump.clone(), true).unwrap();
    }
    assert_eq!(snapshot(&hits), vec![2; CPUS]);
    // From a CPU: everyone but the sender.
    let (h, b) = (rt.handle(), bump.clone());
    rt.run_on(37, move || h.call_all_but_self(b, true))
        .unwrap()
        .join_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let mut want = vec![3; CPUS];
    want[37] = 2;
    assert_eq!(snapshot(&hits), want);
    // Async to all, then drain.
    rt.call_many(&CpuMask::first_n(CPUS), bump, false).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        let s = rt.stats();
        s.ipis_handled == s.ipis_sent
    }));
    want.iter_mut().for_each(|w| *w += 1);
    assert_eq!(snapshot(&hits), want);

    let t1 = Instant::now();
    let st = rt.shutdown();
    let down = t1.elapsed();
    assert!(down < Duration::from_secs(30), "shutdown took {down:?}");
    assert_eq!(st.lost_calls, 0, "{st:?}");
    assert_eq!(st.calls_failed, 0);
    assert_eq!(st.ipis_handled, (4 * CPUS - 1) as u64);
    let not_off: Vec<_> = st
        .per_cpu
        .iter()
        .filter(|c| c.state != CpuRunState::Offline)
        .map(|c| (c.cpu, c.state))
        .collect();
    assert!(
        not_off.is_empty(),
        "CPUs not offline after shutdown: {not_off:?}"
    );
    eprintln!(
        "64 CPUs: boot {boot:?}, shutdown {down:?}, total {:?}",
        t0.elapsed()
    );
}

#[test]
fn oversubscribed_cpus_call_each_other() {
    let _g = serial();
    // 16 CPUs per host core, each sending synchronous calls to its neighbour while taking
    // calls from the other: a CPU blocked in a call must still serve its own queue.
    const N: usize = 32;
    const ROUNDS: usize = 200;
    let rt = Builder::new()
        .cpus(N)
        .call_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let hits: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    let jobs: Vec<_> = (0..N)
        .map(|cpu| {
            let (h, hits) = (rt.handle(), hits.clone());
            rt.run_on(cpu, move || {
                let mut failed = 0;
                for _ in 0..ROUNDS {
                    let hh = hits.clone();
                    let r = h.call_single(
                        (cpu + 1) % N,
                        move || {
                            hh[usmp::this_cpu().unwrap()].fetch_add(1, Ordering::SeqCst);
                        },
                        true,
                    );
                    failed += r.is_err() as usize;
                }
                failed
            })
            .unwrap()
        })
        .collect();
    for (cpu, j) in jobs.into_iter().enumerate() {
        assert_eq!(
            j.join_timeout(Duration::from_secs(30)).unwrap(),
            0,
            "CPU{cpu} had failed calls"
        );
    }
    assert_eq!(snapshot(&hits), vec![ROUNDS; N]);
    let st = rt.shutdown();
    assert_eq!(st.lost_calls, 0);
    assert!(st.per_cpu.iter().all(|c| c.state == CpuRunState::Offline));
}
