//! IPI latency benchmarks: every usmp figure beside its floor and the peer a user would pick
//! instead, measured in the same run.
//!
//! Groups (each measures its floor and peers first, then usmp, with the same core placement):
//! - `ipi_busy`: round trip to a target that spins in user space. Floor: raw `tgkill` to a
//!   spinning helper thread, whose handler acks. usmp: `call_single(1, f, true)` while CPU 1
//!   runs a spinning job (so the doorbell signal is needed).
//! - `ipi_sleeping_idle`: round trip to a target asleep in the kernel. Floor: raw `tgkill` to a
//!   helper blocked in `pause()`. Peer: a crossbeam-channel request/reply of boxed closures to a
//!   pinned worker blocked in `recv()`. usmp: `IdlePolicy::SleepOnly`, CPU 1 asleep on its
//!   idle futex.
//! - `ipi_polling_idle`: round trip to a target spinning on memory. Floor: cache-line
//!   ping-pong. Peer: the same crossbeam request/reply, the worker spinning on `try_recv()`
//!   (and the caller spinning on the reply). usmp: `IdlePolicy::PollThenSleep(1 h)`, CPU 1
//!   always polls its queue (no signal).
//! - `ipi_async_throughput`: one-way calls per second to a polling target: `call_single_async`
//!   against crossbeam sends of boxed closures to a spinning worker. One criterion iteration
//!   is one call; the batch ends when the target has run all of them.
//! - `ipi_call_many`: `call_many` to 1, 2, 4, 8 and 16 CPUs of a 16-CPU runtime (default idle
//!   policy, sender not pinned: 16 CPUs share 2 cores), `call_single` to one of them, and
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, the kernel's own IPI to every CPU running
//!   this process, as the reference for "all".
//! - `call_many`: `call_many` to every CPU of an N-CPU runtime (N in 4, 16, 64, 256, sender
//!   outside the runtime and unpinned) beside the floor that does the same work, `tgkill` to N
//!   plain threads and a wait for N acks (`common::floors::Broadcast`, `send_stop`'s floor).
//!   `usmp_idle/N`: `IdlePolicy::SleepOnly`, every CPU asleep on its idle futex, against
//!   `tgkill_pause/N`, N threads in `pause()`. `usmp_busy/N`: every CPU in a job that loops on
//!   `sched_yield` (so every call needs the doorbell signal), against `tgkill_busy/N`, N
//!   threads in the same loop. Calls back to back, as the floor's broadcasts are.
//! - `irq_mask`: soft `irq_save`/`irq_restore` pair on a CPU vs `pthread_sigmask` block+unblock.
//!
//! Every call, usmp's and the peers', runs the same closure: it bumps a counter through a
//! captured `&'static` (8 bytes: usmp stores it inline in its csd, crossbeam boxes it).
//!
//! After criterion measures a latency figure, the same fixture times single round trips into a
//! histogram and writes p50/p99 beside criterion's output (`common/mod.rs`). With
//! `USMP_BENCH_GUARD=1` criterion is skipped and the regression guard runs instead.
//!
//! Placement: on a machine with at least two allowed cores the bench thread (sender) is pinned
//! to the first core and every target (helper thread, usmp CPU 1) sits on the second. usmp pins
//! CPU 0 to the first core too; where it would compete with the sender for that core (the
//! polling groups, where an idle CPU 0 would poll forever) CPU 0 is parked in a job that
//! blocks in the kernel, so it holds no core. The sender is pinned only after the runtime is
//! built (usmp discovers its host cores from the calling thread's affinity) and unpinned when
//! the fixture is dropped.
//!
//! Sleeping targets: each round trip is timed alone, after an untimed settle of
//! `SLEEP_SETTLE`, so the target has gone back to sleep before the next signal or wake; the
//! floor, the peer and usmp get the same settle.
//!
//! Polling target: `call_single_polling` sends back to back (like the floor and the peer);
//! `call_single_polling_settled` is a diagnostic that leaves an untimed `POLL_SETTLE` gap
//! before each call so CPU 1 is surely back in its poll loop. stderr shows, per group, how CPU
//! 1's calls were delivered (doorbell signals, polls, futex wakes).
//!
//! The raw floors use `SIGRTMIN()+6` so they never clash with usmp's `+2`/`+3`.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::floors::{Broadcast, Wait};
use common::{single_trips, write_percentiles, Guard};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use crossbeam_utils::CachePadded;

/// Time a sleeping target gets to go back to sleep between two timed round trips (untimed).
const SLEEP_SETTLE: Duration = Duration::from_micros(30);

/// Untimed gap before each call of the settled polling diagnostic.
const POLL_SETTLE: Duration = Duration::from_micros(3);

/// Samples timed for the percentiles of a figure.
const SAMPLES: usize = 5_000;

/// What one percentile sample is (`common::single_trips`).
#[derive(Clone, Copy)]
enum Sampling {
    /// One round trip: a microsecond path.
    Single,
    /// The mean of 10 back-to-back round trips: a sub-microsecond path, where reading the
    /// clock would otherwise be a third of the figure.
    Batched,
}

impl Sampling {
    fn batch(self) -> u32 {
        match self {
            Sampling::Single => 1,
            Sampling::Batched => 10,
        }
    }
}

/// Capacity of the async peer's channel: usmp's default csd pool for 2 CPUs (256 + 64 * 2).
const ASYNC_CAP: usize = 384;

/// CPU counts of the `call_many` sweep; the runtime has the largest.
const MANY: [usize; 5] = [1, 2, 4, 8, 16];

/// Bumped by every call's closure.
static HITS: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));

/// The closure every figure sends: one relaxed increment through a captured reference.
fn work() -> impl FnOnce() + Clone + Send + 'static {
    let hits: &'static AtomicU64 = &HITS;
    move || {
        hits.fetch_add(1, Ordering::Relaxed);
    }
}

type Job = Box<dyn FnOnce() + Send>;

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

/// Host cores to use: (sender core, target core), or `None` on a one-core host.
fn placement() -> (Option<usize>, Option<usize>) {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() >= 2 {
        (Some(cores[0].id), Some(cores[1].id))
    } else {
        (None, None)
    }
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

// ---- fixtures: one per figure; `trip` is one round trip, dropping tears down ----

/// One measured thing: a fixture that can do one round trip.
trait Trip {
    fn trip(&mut self);
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

/// Floor: `tgkill` to a helper that spins in user space (`busy`) or sleeps in `pause()`.
struct Tgkill {
    helper: Option<Helper>,
    busy: bool,
    _pin: PinGuard,
}

impl Tgkill {
    fn new(busy: bool) -> Self {
        let (sender, target) = placement();
        install_floor_handler();
        let pin = PinGuard::new(sender);
        let helper = Helper::spawn(target, move |stop| {
            while !stop.load(Ordering::Acquire) {
                if busy {
                    std::hint::spin_loop();
                } else {
                    // SAFETY: pause has no preconditions; it returns after a handled signal.
                    unsafe { libc::pause() };
                }
            }
        });
        Tgkill {
            helper: Some(helper),
            busy,
            _pin: pin,
        }
    }
}

impl Trip for Tgkill {
    fn trip(&mut self) {
        let tid = self.helper.as_ref().expect("helper").tid;
        raw_round_trip(tid, floor_signal());
    }
}

impl Drop for Tgkill {
    fn drop(&mut self) {
        if let Some(h) = self.helper.take() {
            h.stop(!self.busy);
        }
    }
}

/// Peer: crossbeam-channel request/reply of boxed closures to a pinned worker that blocks in
/// `recv()` (`spin == false`) or spins on `try_recv()`; the caller waits for the reply the
/// same way.
struct Crossbeam {
    req: Option<Sender<Job>>,
    rep: Receiver<()>,
    spin: bool,
    worker: Option<JoinHandle<()>>,
    _pin: PinGuard,
}

impl Crossbeam {
    fn new(spin: bool) -> Self {
        let (sender, target) = placement();
        let pin = PinGuard::new(sender);
        let (req, req_rx) = crossbeam_channel::bounded::<Job>(ASYNC_CAP);
        let (rep_tx, rep) = crossbeam_channel::bounded::<()>(1);
        let worker = std::thread::Builder::new()
            .name("crossbeam-peer".into())
            .spawn(move || {
                pin_helper(target);
                loop {
                    let job = if spin {
                        match req_rx.try_recv() {
                            Ok(job) => job,
                            Err(TryRecvError::Empty) => {
                                std::hint::spin_loop();
                                continue;
                            }
                            Err(TryRecvError::Disconnected) => break,
                        }
                    } else {
                        match req_rx.recv() {
                            Ok(job) => job,
                            Err(_) => break,
                        }
                    };
                    job();
                    if rep_tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn crossbeam worker");
        Crossbeam {
            req: Some(req),
            rep,
            spin,
            worker: Some(worker),
            _pin: pin,
        }
    }

    fn send(&self, job: Job) {
        self.req.as_ref().expect("sender").send(job).expect("send");
    }
}

impl Trip for Crossbeam {
    fn trip(&mut self) {
        self.send(Box::new(work()));
        if self.spin {
            loop {
                match self.rep.try_recv() {
                    Ok(()) => break,
                    Err(TryRecvError::Empty) => std::hint::spin_loop(),
                    Err(TryRecvError::Disconnected) => panic!("worker gone"),
                }
            }
        } else {
            self.rep.recv().expect("reply");
        }
    }
}

impl Drop for Crossbeam {
    fn drop(&mut self) {
        self.req.take();
        if let Some(w) = self.worker.take() {
            w.join().expect("crossbeam worker");
        }
    }
}

/// Floor: one cache line bounced between the sender and a spinning helper. The sender writes
/// an odd n, the helper answers n + 1. Both sides spin with PAUSE, as usmp does.
struct PingPong {
    cell: Arc<CachePadded<AtomicU64>>,
    n: u64,
    helper: Option<Helper>,
    _pin: PinGuard,
}

impl PingPong {
    fn new() -> Self {
        let (sender, target) = placement();
        let pin = PinGuard::new(sender);
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
        PingPong {
            cell,
            n: 1,
            helper: Some(helper),
            _pin: pin,
        }
    }
}

impl Trip for PingPong {
    #[inline]
    fn trip(&mut self) {
        let n = self.n;
        self.cell.store(n, Ordering::Release);
        while self.cell.load(Ordering::Acquire) != n + 1 {
            std::hint::spin_loop();
        }
        self.n += 2;
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        if let Some(h) = self.helper.take() {
            h.stop(false);
        }
    }
}

/// What CPU 1 of a 2-CPU usmp runtime does while the sender calls it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Runs a spinning job: every call needs the doorbell signal.
    Busy,
    /// Idle, `SleepOnly`: every call is a futex wake.
    Sleeping,
    /// Idle, polling for an hour: no call needs a signal. CPU 0 is parked in a blocking job.
    Polling,
}

/// usmp, `call_single(1, work(), true)` to CPU 1 in the state `target` says.
struct Usmp {
    // Declared first so the sender is unpinned before the runtime goes.
    _pin: PinGuard,
    rt: usmp::Runtime,
    stop: Arc<AtomicBool>,
    job: Option<usmp::JobHandle<()>>,
    release: Option<mpsc::Sender<()>>,
}

impl Usmp {
    fn new(target: Target) -> Self {
        let (sender, _) = placement();
        let b = match target {
            Target::Busy => rt_builder(),
            Target::Sleeping => rt_builder().idle(usmp::IdlePolicy::SleepOnly),
            Target::Polling => {
                rt_builder().idle(usmp::IdlePolicy::PollThenSleep(Duration::from_secs(3600)))
            }
        };
        let rt = b.build().expect("build runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let (mut job, mut release) = (None, None);
        match target {
            Target::Busy => {
                let s = stop.clone();
                job = Some(
                    rt.run_on(1, move || {
                        while !s.load(Ordering::Relaxed) {
                            usmp::cpu_relax()
                        }
                    })
                    .expect("run_on"),
                );
            }
            Target::Polling => {
                // CPU 0 shares the sender's core; park it in a job that blocks in the kernel.
                let (tx, rx) = mpsc::channel::<()>();
                job = Some(
                    rt.run_on(0, move || {
                        let _ = rx.recv();
                    })
                    .expect("run_on"),
                );
                release = Some(tx);
            }
            Target::Sleeping => {}
        }
        Usmp {
            _pin: PinGuard::new(sender),
            rt,
            stop,
            job,
            release,
        }
    }
}

impl Trip for Usmp {
    #[inline]
    fn trip(&mut self) {
        self.rt.call_single(1, work(), true).expect("call_single");
    }
}

impl Drop for Usmp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.release.take();
        if let Some(j) = self.job.take() {
            j.join().expect("job");
        }
    }
}

/// Times `iters` round trips one by one, each after an untimed settle of `gap`.
fn timed_settled(iters: u64, gap: Duration, fx: &mut impl Trip) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        common::settle(gap);
        let t = Instant::now();
        fx.trip();
        total += t.elapsed();
    }
    total
}

/// Criterion's measurement of `fx` as `group/id` (back to back, or each trip alone after
/// `gap`), then `SAMPLES` samples for the percentiles.
fn measure(
    g: &mut BenchmarkGroup<'_, WallTime>,
    group: &str,
    id: &str,
    gap: Duration,
    sampling: Sampling,
    fx: &mut impl Trip,
) {
    measure_n(g, group, id, gap, sampling, SAMPLES, fx)
}

/// `measure`, with `samples` percentile samples.
fn measure_n(
    g: &mut BenchmarkGroup<'_, WallTime>,
    group: &str,
    id: &str,
    gap: Duration,
    sampling: Sampling,
    samples: usize,
    fx: &mut impl Trip,
) {
    // Set when criterion runs the figure (not when a command-line filter skips it), so a
    // skipped figure keeps the percentiles that match its last estimates.
    let mut ran = false;
    let run = |b: &mut criterion::Bencher<'_, WallTime>| {
        ran = true;
        if gap.is_zero() {
            b.iter(|| fx.trip())
        } else {
            b.iter_custom(|iters| timed_settled(iters, gap, fx))
        }
    };
    // "call_many/4" is function "call_many", parameter 4 (criterion's directory `call_many/4`).
    match id.split_once('/') {
        Some((f, param)) => g.bench_function(BenchmarkId::new(f, param), run),
        None => g.bench_function(id, run),
    };
    if !ran {
        return;
    }
    let p = single_trips(samples, gap, sampling.batch(), || fx.trip());
    write_percentiles(group, id, &p);
}

// ---- criterion groups ----

fn ipi_busy(c: &mut Criterion) {
    const G: &str = "ipi_busy";
    let mut g = c.benchmark_group(G);
    measure(
        &mut g,
        G,
        "raw_tgkill_busy",
        Duration::ZERO,
        Sampling::Single,
        &mut Tgkill::new(true),
    );
    let mut fx = Usmp::new(Target::Busy);
    measure(
        &mut g,
        G,
        "call_single_busy",
        Duration::ZERO,
        Sampling::Single,
        &mut fx,
    );
    report_paths(G, &fx.rt);
    drop(fx);
    g.finish();
}

fn ipi_sleeping_idle(c: &mut Criterion) {
    const G: &str = "ipi_sleeping_idle";
    let mut g = c.benchmark_group(G);
    measure(
        &mut g,
        G,
        "raw_tgkill_pause",
        SLEEP_SETTLE,
        Sampling::Single,
        &mut Tgkill::new(false),
    );
    measure(
        &mut g,
        G,
        "crossbeam_blocking",
        SLEEP_SETTLE,
        Sampling::Single,
        &mut Crossbeam::new(false),
    );
    let mut fx = Usmp::new(Target::Sleeping);
    measure(
        &mut g,
        G,
        "call_single_sleeping",
        SLEEP_SETTLE,
        Sampling::Single,
        &mut fx,
    );
    report_paths(G, &fx.rt);
    drop(fx);
    g.finish();
}

fn ipi_polling_idle(c: &mut Criterion) {
    const G: &str = "ipi_polling_idle";
    let mut g = c.benchmark_group(G);
    measure(
        &mut g,
        G,
        "cacheline_pingpong",
        Duration::ZERO,
        Sampling::Batched,
        &mut PingPong::new(),
    );
    measure(
        &mut g,
        G,
        "crossbeam_spinning",
        Duration::ZERO,
        Sampling::Batched,
        &mut Crossbeam::new(true),
    );
    let mut fx = Usmp::new(Target::Polling);
    measure(
        &mut g,
        G,
        "call_single_polling",
        Duration::ZERO,
        Sampling::Batched,
        &mut fx,
    );
    report_paths("ipi_polling_idle (back to back)", &fx.rt);
    // Diagnostic: the same call with an untimed gap, so CPU 1 is back in its poll loop before
    // each call. Back to back, a call can land while CPU 1 is still on its way from the
    // previous callback to the poll loop (idle word RUNNING), and then it rings the doorbell
    // signal; the doorbell counts printed above show how often.
    measure(
        &mut g,
        G,
        "call_single_polling_settled",
        POLL_SETTLE,
        Sampling::Batched,
        &mut fx,
    );
    report_paths("ipi_polling_idle (cumulative, with settled)", &fx.rt);
    drop(fx);
    g.finish();
}

// ---- async one-way throughput ----

/// Waits until `HITS` reaches `until`.
fn wait_hits(until: u64) {
    while HITS.load(Ordering::Acquire) < until {
        std::hint::spin_loop();
    }
}

/// `iters` one-way usmp calls to polling CPU 1; returns when CPU 1 has run them all.
fn usmp_async_batch(fx: &Usmp, iters: u64) -> Duration {
    let until = HITS.load(Ordering::Acquire) + iters;
    let t = Instant::now();
    for _ in 0..iters {
        fx.rt
            .call_single_async(1, work())
            .expect("call_single_async");
    }
    wait_hits(until);
    t.elapsed()
}

/// `iters` boxed closures sent to a spinning crossbeam worker; returns when it has run them.
fn crossbeam_async_batch(fx: &Crossbeam, iters: u64) -> Duration {
    let until = HITS.load(Ordering::Acquire) + iters;
    let t = Instant::now();
    for _ in 0..iters {
        fx.send(Box::new(work()));
    }
    wait_hits(until);
    t.elapsed()
}

/// The async peer: like `Crossbeam::new(true)`, but its worker sends no replies.
fn crossbeam_oneway() -> Crossbeam {
    let (sender, target) = placement();
    let pin = PinGuard::new(sender);
    let (req, req_rx) = crossbeam_channel::bounded::<Job>(ASYNC_CAP);
    let (_rep_tx, rep) = crossbeam_channel::bounded::<()>(1);
    let worker = std::thread::Builder::new()
        .name("crossbeam-oneway".into())
        .spawn(move || {
            pin_helper(target);
            loop {
                match req_rx.try_recv() {
                    Ok(job) => job(),
                    Err(TryRecvError::Empty) => std::hint::spin_loop(),
                    Err(TryRecvError::Disconnected) => break,
                }
            }
        })
        .expect("spawn crossbeam worker");
    Crossbeam {
        req: Some(req),
        rep,
        spin: true,
        worker: Some(worker),
        _pin: pin,
    }
}

fn ipi_async_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("ipi_async_throughput");
    g.throughput(Throughput::Elements(1));
    {
        let fx = crossbeam_oneway();
        g.bench_function("crossbeam_send_spinning", |b| {
            b.iter_custom(|iters| crossbeam_async_batch(&fx, iters))
        });
    }
    {
        let fx = Usmp::new(Target::Polling);
        g.bench_function("call_single_async_polling", |b| {
            b.iter_custom(|iters| usmp_async_batch(&fx, iters))
        });
        report_paths("ipi_async_throughput", &fx.rt);
    }
    g.finish();
}

// ---- call_many by CPU count, membarrier ----

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes no pointers; an unknown or unregistered command is an error
    // return, not undefined behaviour.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        )
    }
}

/// The 16-CPU runtime of the `call_many` sweep (default idle policy, sender not pinned).
fn many_runtime() -> usmp::Runtime {
    usmp::Builder::new()
        .cpus(MANY[MANY.len() - 1])
        .log_events(false)
        .build()
        .expect("build runtime")
}

struct CallMany<'a> {
    rt: &'a usmp::Runtime,
    mask: usmp::CpuMask,
}

impl Trip for CallMany<'_> {
    fn trip(&mut self) {
        self.rt
            .call_many(&self.mask, work(), true)
            .expect("call_many");
    }
}

struct CallOne<'a>(&'a usmp::Runtime);

impl Trip for CallOne<'_> {
    fn trip(&mut self) {
        self.0.call_single(0, work(), true).expect("call_single");
    }
}

struct Membarrier;

impl Trip for Membarrier {
    fn trip(&mut self) {
        let rc = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
        debug_assert_eq!(rc, 0);
    }
}

fn ipi_call_many(c: &mut Criterion) {
    const G: &str = "ipi_call_many";
    let mut g = c.benchmark_group(G);
    let rt = many_runtime();
    let have_membarrier = membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
    if have_membarrier {
        measure(
            &mut g,
            G,
            "membarrier_private_expedited",
            Duration::ZERO,
            Sampling::Single,
            &mut Membarrier,
        );
    } else {
        eprintln!("[{G}] membarrier(PRIVATE_EXPEDITED) unavailable: no reference row");
    }
    measure(
        &mut g,
        G,
        "call_single",
        Duration::ZERO,
        Sampling::Single,
        &mut CallOne(&rt),
    );
    for n in MANY {
        let id = format!("call_many/{n}");
        let mut fx = CallMany {
            rt: &rt,
            mask: usmp::CpuMask::first_n(n),
        };
        measure(&mut g, G, &id, Duration::ZERO, Sampling::Single, &mut fx);
    }
    g.finish();
    assert_eq!(rt.shutdown().lost_calls, 0);
}

// ---- call_many to N CPUs beside the tgkill broadcast floor ----

/// CPU counts of the `call_many` group.
const BROADCAST: [usize; 4] = [4, 16, 64, 256];

/// Percentile samples at `n` CPUs: about as much time per figure at every N.
fn broadcast_samples(n: usize) -> usize {
    (20_000 / n).clamp(300, 2_000)
}

/// The job of a busy CPU, and the loop of a busy floor thread (`Wait::Busy`): user code that
/// gives up its core every round, so 256 of them on 2 cores leave the sender a turn.
fn yielding_job(stop: Arc<AtomicBool>) -> impl FnOnce() + Send + 'static {
    move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
    }
}

/// usmp: `call_many` to all N CPUs of an N-CPU runtime, from outside it.
struct ManyToAll {
    rt: usmp::Runtime,
    mask: usmp::CpuMask,
    stop: Arc<AtomicBool>,
    jobs: Vec<usmp::JobHandle<()>>,
}

impl ManyToAll {
    fn new(n: usize, wait: Wait) -> Self {
        let b = usmp::Builder::new().cpus(n).log_events(false);
        let b = match wait {
            Wait::Pause => b.idle(usmp::IdlePolicy::SleepOnly),
            Wait::Busy => b,
        };
        let rt = b.build().expect("build runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let jobs = match wait {
            Wait::Pause => Vec::new(),
            Wait::Busy => (0..n)
                .map(|c| rt.run_on(c, yielding_job(stop.clone())).expect("run_on"))
                .collect(),
        };
        ManyToAll {
            mask: rt.online_mask(),
            rt,
            stop,
            jobs,
        }
    }
}

impl Trip for ManyToAll {
    fn trip(&mut self) {
        self.rt
            .call_many(&self.mask, work(), true)
            .expect("call_many");
    }
}

impl Drop for ManyToAll {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for j in self.jobs.drain(..) {
            j.join().expect("job");
        }
    }
}

/// The floor: one `tgkill` broadcast to N threads and the wait for N acks.
struct BroadcastTrip(Broadcast);

impl Trip for BroadcastTrip {
    fn trip(&mut self) {
        self.0.broadcast();
    }
}

/// The `call_many` group's ids: (usmp, floor) for targets waiting as `wait` says.
fn broadcast_ids(wait: Wait, n: usize) -> (String, String) {
    match wait {
        Wait::Pause => (format!("usmp_idle/{n}"), format!("tgkill_pause/{n}")),
        Wait::Busy => (format!("usmp_busy/{n}"), format!("tgkill_busy/{n}")),
    }
}

fn call_many_vs_broadcast(c: &mut Criterion) {
    const G: &str = "call_many";
    let mut g = c.benchmark_group(G);
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for n in BROADCAST {
        for wait in [Wait::Pause, Wait::Busy] {
            let (usmp_id, floor_id) = broadcast_ids(wait, n);
            let k = broadcast_samples(n);
            let z = Duration::ZERO;
            {
                let mut fx = BroadcastTrip(Broadcast::start(n, wait));
                measure_n(&mut g, G, &floor_id, z, Sampling::Single, k, &mut fx);
            }
            let mut fx = ManyToAll::new(n, wait);
            measure_n(&mut g, G, &usmp_id, z, Sampling::Single, k, &mut fx);
            drop(fx);
        }
    }
    g.finish();
}

fn irq_mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("irq_mask");

    // For scale: block + unblock one RT signal on the bench thread.
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
    // A few nanoseconds: too short to time one by one, so no percentiles.
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

// ---- regression guard ----

/// p50 of 1000 samples on a fresh fixture.
fn p50_of<F: Trip>(make: impl Fn() -> F, sampling: Sampling, gap: Duration) -> f64 {
    let mut fx = make();
    // A short untimed warm-up, so the first trips' page faults and wake-ups do not count.
    for _ in 0..100 {
        common::settle(gap);
        fx.trip();
    }
    single_trips(1_000, gap, sampling.batch(), || fx.trip()).p50 as f64
}

/// Median time per call of a one-way batch, in ns.
fn per_call_of<F>(make: impl Fn() -> F, batch: impl Fn(&F, u64) -> Duration) -> f64 {
    let fx = make();
    batch(&fx, 2_000);
    let mut v: Vec<f64> = (0..15)
        .map(|_| batch(&fx, 2_000).as_nanos() as f64 / 2_000.0)
        .collect();
    common::median(&mut v)
}

/// One round-trip guard row: usmp's fixture against its peer's, p50 per round, alternating.
fn guard_trip<U: Trip, P: Trip>(
    gd: &mut Guard,
    key: &str,
    usmp: impl Fn() -> U,
    peer: impl Fn() -> P,
    sampling: Sampling,
    gap: Duration,
) {
    let (r, u, p) = common::alternating(
        GUARD_ROUNDS,
        || p50_of(&usmp, sampling, gap),
        || p50_of(&peer, sampling, gap),
    );
    gd.check(key, r, &format!("p50 {u:.0} ns vs {p:.0} ns"));
}

const GUARD_ROUNDS: usize = 5;

fn guard() -> ! {
    install_floor_handler();
    let mut gd = Guard::default();
    let z = Duration::ZERO;
    let (single, batched) = (Sampling::Single, Sampling::Batched);
    let g = &mut gd;
    guard_trip(
        g,
        "busy_vs_tgkill",
        || Usmp::new(Target::Busy),
        || Tgkill::new(true),
        single,
        z,
    );
    let sleeping = || Usmp::new(Target::Sleeping);
    guard_trip(
        g,
        "sleeping_vs_tgkill",
        sleeping,
        || Tgkill::new(false),
        single,
        SLEEP_SETTLE,
    );
    guard_trip(
        g,
        "sleeping_vs_crossbeam",
        sleeping,
        || Crossbeam::new(false),
        single,
        SLEEP_SETTLE,
    );
    let polling = || Usmp::new(Target::Polling);
    guard_trip(g, "polling_vs_pingpong", polling, PingPong::new, batched, z);
    guard_trip(
        g,
        "polling_vs_crossbeam",
        polling,
        || Crossbeam::new(true),
        batched,
        z,
    );
    // call_many at 16 CPUs, idle and busy: a few seconds; the larger N are left to `cargo bench`.
    for (key, wait) in [
        ("call_many_idle_16", Wait::Pause),
        ("call_many_busy_16", Wait::Busy),
    ] {
        guard_trip(
            g,
            key,
            || ManyToAll::new(16, wait),
            || BroadcastTrip(Broadcast::start(16, wait)),
            single,
            z,
        );
    }
    let (r, u, p) = common::alternating(
        GUARD_ROUNDS,
        || per_call_of(|| Usmp::new(Target::Polling), usmp_async_batch),
        || per_call_of(crossbeam_oneway, crossbeam_async_batch),
    );
    gd.check(
        "async_vs_crossbeam",
        r,
        &format!("{u:.0} ns vs {p:.0} ns per call"),
    );
    gd.finish("ipi")
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40)
        .configure_from_args()
}

fn main() {
    if common::guard_mode() {
        guard();
    }
    let mut c = config();
    ipi_busy(&mut c);
    ipi_sleeping_idle(&mut c);
    ipi_polling_idle(&mut c);
    ipi_async_throughput(&mut c);
    ipi_call_many(&mut c);
    call_many_vs_broadcast(&mut c);
    irq_mask(&mut c);
    c.final_summary();
}
