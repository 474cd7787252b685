//! IPI latency benchmarks: every usmp figure beside its floor, measured in the same run.
//!
//! Groups (each measures its floor first, then usmp, with the same core placement):
//! - `ipi_busy`: round trip to a target that spins in user space. Floor: raw `tgkill` to a
//!   spinning helper thread, whose handler acks. usmp: `call_single(1, || {}, true)` while CPU 1
//!   runs a spinning job (so the doorbell signal is needed).
//! - `ipi_sleeping_idle`: round trip to a target asleep in the kernel. Floor: raw `tgkill` to a
//!   helper blocked in `pause()`. usmp: `IdlePolicy::SleepOnly`, CPU 1 asleep on its idle futex.
//! - `ipi_polling_idle`: round trip to a target spinning on memory. Floor: cache-line ping-pong.
//!   usmp: `IdlePolicy::PollThenSleep(1 h)`, CPU 1 always polls its queue (no signal).
//! - `irq_mask`: soft `irq_save`/`irq_restore` pair on a CPU vs `pthread_sigmask` block+unblock.
//!
//! Placement: on a machine with at least two allowed cores the bench thread (sender) is pinned
//! to the first core and every target (helper thread, usmp CPU 1) sits on the second. usmp pins
//! CPU 0 to the first core too; where it would compete with the sender for that core (the
//! polling group, where an idle CPU 0 would poll forever) CPU 0 is parked in a job that blocks
//! in the kernel, so it holds no core. The sender is pinned only after the runtime is built
//! (usmp discovers its host cores from the calling thread's affinity) and unpinned at the end
//! of the group.
//!
//! Sleeping targets: each round trip is timed alone, after an untimed settle of
//! `SLEEP_SETTLE`, so the target has gone back to sleep before the next signal or wake; both
//! the floor and usmp get the same settle. Without it a back-to-back send can land while the
//! target is still on its way back to sleep, which measures something else.
//!
//! Polling target: `call_single_polling` sends back to back (like the floor);
//! `call_single_polling_settled` is a diagnostic that leaves an untimed `POLL_SETTLE` gap
//! before each call so CPU 1 is surely back in its poll loop. stderr shows, per group, how CPU
//! 1's calls were delivered (doorbell signals, polls, futex wakes).
//!
//! The raw floors use `SIGRTMIN()+6` so they never clash with usmp's `+2`/`+3`.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use crossbeam_utils::CachePadded;

/// Time a sleeping target gets to go back to sleep between two timed round trips (untimed).
const SLEEP_SETTLE: Duration = Duration::from_micros(30);

/// Untimed gap before each call of the settled polling diagnostic.
const POLL_SETTLE: Duration = Duration::from_micros(3);

/// Acks counted by the raw floor's signal handler.
static ACK: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));

/// The real-time signal the raw floors use (usmp uses `SIGRTMIN()+2` and `+3`).
fn floor_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

/// The floor's handler: one atomic increment (async-signal-safe, touches no errno).
extern "C" fn ack_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    ACK.fetch_add(1, Ordering::Release);
}

fn install_floor_handler() {
    // SAFETY: an all-zero `sigaction` is a valid starting value (empty mask, no flags).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = ack_handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `sa.sa_mask` is a valid, owned sigset_t.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is fully initialised, its handler only does an atomic increment (which is
    // async-signal-safe), and the signal number is a valid RT signal not used by usmp.
    let rc = unsafe { libc::sigaction(floor_signal(), &sa, std::ptr::null_mut()) };
    assert_eq!(
        rc,
        0,
        "sigaction failed: {}",
        std::io::Error::last_os_error()
    );
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn tgkill(tid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: tgkill has no memory preconditions; `tid` is a live thread of this process (its
    // helper is joined only after the last signal) and `sig` has a handler installed.
    let rc = unsafe { libc::tgkill(libc::getpid(), tid, sig) };
    debug_assert_eq!(rc, 0);
}

/// Host cores to use: (sender core, target core), or `None` on a one-core host.
fn placement() -> Option<(usize, usize)> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    (cores.len() >= 2).then(|| (cores[0].id, cores[1].id))
}

fn pin_helper(core: Option<usize>) {
    if let Some(id) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Pins the calling thread to one core until dropped, then restores its previous mask.
struct PinGuard(Option<libc::cpu_set_t>);

impl PinGuard {
    fn new(core: Option<usize>) -> Self {
        let Some(core) = core else {
            return PinGuard(None);
        };
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `old` is a valid, writable cpu_set_t of the size passed; pid 0 is this thread.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) };
        if rc != 0 {
            return PinGuard(None);
        }
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            return PinGuard(None);
        }
        PinGuard(Some(old))
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: `old` is the mask sched_getaffinity returned for this thread; pid 0 is
            // this thread.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

/// A helper thread with a stop flag; `stop` sets the flag, pokes the thread until it has
/// finished, and joins it.
struct Helper {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    tid: libc::pid_t,
    handle: Option<JoinHandle<()>>,
}

impl Helper {
    /// Spawns `body(stop)` on `core`; returns once the thread is running.
    fn spawn(core: Option<usize>, body: impl FnOnce(&AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let (s, d, t) = (stop.clone(), done.clone(), tid.clone());
        let handle = std::thread::Builder::new()
            .name("ipi-floor".into())
            .spawn(move || {
                pin_helper(core);
                t.store(gettid(), Ordering::Release);
                body(&s);
                d.store(true, Ordering::Release);
            })
            .expect("spawn helper");
        while tid.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        let tid = tid.load(Ordering::Acquire);
        Helper {
            stop,
            done,
            tid,
            handle: Some(handle),
        }
    }

    /// Stops the helper; `poke` signals it in case it is blocked (as in `pause`).
    fn stop(mut self, poke: bool) {
        self.stop.store(true, Ordering::Release);
        while !self.done.load(Ordering::Acquire) {
            if poke {
                tgkill(self.tid, floor_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(h) = self.handle.take() {
            h.join().expect("helper panicked");
        }
    }
}

/// One raw round trip: signal `tid`, spin until its handler acked.
#[inline]
fn raw_round_trip(tid: libc::pid_t, sig: libc::c_int) {
    let before = ACK.load(Ordering::Acquire);
    tgkill(tid, sig);
    while ACK.load(Ordering::Acquire) == before {
        std::hint::spin_loop();
    }
}

/// Spins (untimed) for `d`, keeping the sender hot while the target goes back to sleep.
fn settle(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Times `n` single round trips one by one (each after an untimed `gap`) and prints their
/// percentiles to stderr. Criterion reports statistics of per-sample means; this shows the
/// distribution of single round trips (a bimodal path, such as an occasional doorbell signal on
/// the polling path, shows up here). Includes one `Instant` pair (a few tens of ns) per trip.
fn profile(label: &str, n: usize, gap: Duration, mut round_trip: impl FnMut()) {
    let mut v: Vec<u64> = Vec::with_capacity(n);
    for _ in 0..n {
        settle(gap);
        let t = Instant::now();
        round_trip();
        v.push(t.elapsed().as_nanos() as u64);
    }
    v.sort_unstable();
    let q = |f: f64| v[((v.len() - 1) as f64 * f) as usize];
    eprintln!(
        "[profile] {label}: n={n} min {} p10 {} p50 {} p90 {} p99 {} ns",
        v[0],
        q(0.10),
        q(0.50),
        q(0.90),
        q(0.99)
    );
}

fn rt_builder() -> usmp::Builder {
    usmp::Builder::new().cpus(2).log_events(false)
}

/// Prints how the usmp calls of a group were delivered (doorbell signals, polls, futex wakes)
/// to stderr, so a reader can check that the path measured is the one meant.
fn report_paths(group: &str, rt: &usmp::Runtime) {
    let st = rt.stats();
    let c1 = &st.per_cpu[1];
    eprintln!(
        "[{group}] usmp CPU 1: calls handled {}, doorbells {}, irqs {}, polled {}, idle wakes {}",
        c1.calls_handled, c1.doorbells, c1.irqs, c1.polled, c1.idle_wakes
    );
}

fn call_once(rt: &usmp::Runtime) {
    rt.call_single(1, || {}, true).expect("call_single");
}

fn ipi_busy(c: &mut Criterion) {
    let place = placement();
    let (sender, target) = (place.map(|p| p.0), place.map(|p| p.1));
    install_floor_handler();
    let mut g = c.benchmark_group("ipi_busy");

    // Floor: the helper spins in user space; the kernel must interrupt it to run the handler.
    {
        let _pin = PinGuard::new(sender);
        let helper = Helper::spawn(target, |stop| {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let (tid, sig) = (helper.tid, floor_signal());
        g.bench_function("raw_tgkill_busy", |b| b.iter(|| raw_round_trip(tid, sig)));
        profile("raw_tgkill_busy", 5000, Duration::ZERO, || {
            raw_round_trip(tid, sig)
        });
        helper.stop(false);
    }

    // usmp: CPU 1 runs a spinning job, so each call needs the doorbell signal.
    {
        let rt = rt_builder().build().expect("build runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let spinner = rt
            .run_on(1, move || {
                while !s.load(Ordering::Relaxed) {
                    usmp::cpu_relax()
                }
            })
            .expect("run_on");
        let _pin = PinGuard::new(sender);
        g.bench_function("call_single_busy", |b| b.iter(|| call_once(&rt)));
        profile("call_single_busy", 5000, Duration::ZERO, || call_once(&rt));
        stop.store(true, Ordering::Relaxed);
        spinner.join().expect("spinner");
        report_paths("ipi_busy", &rt);
    }
    g.finish();
}

/// Times `iters` round trips one by one, each after an untimed settle of `gap`.
fn timed_settled(iters: u64, gap: Duration, mut round_trip: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        settle(gap);
        let t = Instant::now();
        round_trip();
        total += t.elapsed();
    }
    total
}

fn ipi_sleeping_idle(c: &mut Criterion) {
    let place = placement();
    let (sender, target) = (place.map(|p| p.0), place.map(|p| p.1));
    install_floor_handler();
    let mut g = c.benchmark_group("ipi_sleeping_idle");

    // Floor: the helper sleeps in pause(); the signal wakes it and runs the handler.
    {
        let _pin = PinGuard::new(sender);
        let helper = Helper::spawn(target, |stop| {
            while !stop.load(Ordering::Acquire) {
                // SAFETY: pause has no preconditions; it returns after a handled signal.
                unsafe { libc::pause() };
            }
        });
        let (tid, sig) = (helper.tid, floor_signal());
        g.bench_function("raw_tgkill_pause", |b| {
            b.iter_custom(|iters| timed_settled(iters, SLEEP_SETTLE, || raw_round_trip(tid, sig)))
        });
        profile("raw_tgkill_pause", 5000, SLEEP_SETTLE, || {
            raw_round_trip(tid, sig)
        });
        helper.stop(true);
    }

    // usmp: CPU 1 sleeps on its idle futex at once; each call is a futex wake.
    {
        let rt = rt_builder()
            .idle(usmp::IdlePolicy::SleepOnly)
            .build()
            .expect("build runtime");
        let _pin = PinGuard::new(sender);
        g.bench_function("call_single_sleeping", |b| {
            b.iter_custom(|iters| timed_settled(iters, SLEEP_SETTLE, || call_once(&rt)))
        });
        profile("call_single_sleeping", 5000, SLEEP_SETTLE, || {
            call_once(&rt)
        });
        report_paths("ipi_sleeping_idle", &rt);
    }
    g.finish();
}

fn ipi_polling_idle(c: &mut Criterion) {
    let place = placement();
    let (sender, target) = (place.map(|p| p.0), place.map(|p| p.1));
    let mut g = c.benchmark_group("ipi_polling_idle");

    // Floor: one cache line bounced between the sender and a spinning helper. The sender
    // writes an odd n, the helper answers n + 1. Both sides spin with PAUSE, as usmp does.
    {
        let _pin = PinGuard::new(sender);
        let cell = Arc::new(CachePadded::new(AtomicU64::new(0)));
        let hc = cell.clone();
        let helper = Helper::spawn(target, move |stop| loop {
            let v = hc.load(Ordering::Acquire);
            if v & 1 == 1 {
                hc.store(v + 1, Ordering::Release);
            } else if stop.load(Ordering::Relaxed) {
                break;
            }
            std::hint::spin_loop();
        });
        g.bench_function("cacheline_pingpong", |b| {
            b.iter_custom(|iters| {
                let mut n = cell.load(Ordering::Acquire) + 1;
                let t = Instant::now();
                for _ in 0..iters {
                    cell.store(n, Ordering::Release);
                    while cell.load(Ordering::Acquire) != n + 1 {
                        std::hint::spin_loop();
                    }
                    n += 2;
                }
                t.elapsed()
            })
        });
        let mut n = cell.load(Ordering::Acquire) + 1;
        profile("cacheline_pingpong", 20000, Duration::ZERO, || {
            cell.store(n, Ordering::Release);
            while cell.load(Ordering::Acquire) != n + 1 {
                std::hint::spin_loop();
            }
            n += 2;
        });
        helper.stop(false);
    }

    // usmp: both CPUs would poll forever. CPU 0 shares the sender's core, so it is parked in
    // a job that blocks in the kernel (it holds no core); CPU 1 polls its queue, so no call
    // needs a signal or a wake.
    {
        let rt = rt_builder()
            .idle(usmp::IdlePolicy::PollThenSleep(Duration::from_secs(3600)))
            .build()
            .expect("build runtime");
        let (tx, rx) = mpsc::channel::<()>();
        let parked = rt
            .run_on(0, move || {
                let _ = rx.recv();
            })
            .expect("run_on");
        let _pin = PinGuard::new(sender);
        g.bench_function("call_single_polling", |b| b.iter(|| call_once(&rt)));
        profile("call_single_polling", 20000, Duration::ZERO, || {
            call_once(&rt)
        });
        report_paths("ipi_polling_idle (back to back)", &rt);
        // Diagnostic: the same call with an untimed gap, so CPU 1 is back in its poll loop
        // before each call. Back to back, a call can land while CPU 1 is still on its way from
        // the previous callback to the poll loop (idle word RUNNING), and then it rings the
        // doorbell signal; the doorbell counts printed above show how often.
        g.bench_function("call_single_polling_settled", |b| {
            b.iter_custom(|iters| timed_settled(iters, POLL_SETTLE, || call_once(&rt)))
        });
        profile("call_single_polling_settled", 20000, POLL_SETTLE, || {
            call_once(&rt)
        });
        tx.send(()).expect("release CPU 0");
        parked.join().expect("parked job");
        report_paths("ipi_polling_idle (cumulative, with settled)", &rt);
    }
    g.finish();
}

fn irq_mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("irq_mask");

    // Floor: block + unblock one RT signal on the bench thread.
    {
        // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, owned sigset_t and the signal number is valid.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, floor_signal());
        }
        g.bench_function("pthread_sigmask_pair", |b| {
            b.iter(|| {
                // SAFETY: `set` is a valid sigset_t; a null old-set pointer is allowed. Blocking
                // and unblocking a signal this thread never receives changes nothing else.
                unsafe {
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                }
            })
        });
    }

    // usmp: the soft mask pair, timed inside a job on CPU 0 (it only works on a CPU thread).
    {
        let rt = rt_builder().build().expect("build runtime");
        g.bench_function("irq_save_restore", |b| {
            b.iter_custom(|iters| {
                rt.run_on(0, move || {
                    let t = Instant::now();
                    for _ in 0..iters {
                        let f = usmp::irq_save();
                        black_box(&f);
                        usmp::irq_restore(f);
                    }
                    t.elapsed()
                })
                .expect("run_on")
                .join()
                .expect("join")
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40)
}

criterion_group! {
    name = benches;
    config = config();
    targets = ipi_busy, ipi_sleeping_idle, ipi_polling_idle, irq_mask
}
criterion_main!(benches);
