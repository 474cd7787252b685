//! The broadcast floor: `tgkill` to N plain threads and a wait for N acks, the least a
//! signal IPI to N CPUs can cost. Shared by `send_stop` and `stop_machine` (targets asleep in
//! `pause()`) and by `call_many` (asleep, or busy in user code).
//!
//! Every handler bumps one atomic; the sender spins (yielding) until all N have.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static ACKS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn ack(_sig: libc::c_int) {
    ACKS.fetch_add(1, Ordering::Release);
}

/// The floor's signal: clear of usmp's pair (`SIGRTMIN()+2/+3`) and of `ipi.rs`'s single-target
/// floor (`+6`).
fn floor_signal() -> libc::c_int {
    libc::SIGRTMIN() + 8
}

/// Installs the floor's handler (idempotent; `Broadcast::start` calls it).
pub fn install_floor_handler() {
    // SAFETY: a zeroed sigaction with a plain handler that only touches an atomic is valid;
    // the pointers passed are to live locals.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ack as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        assert_eq!(
            libc::sigaction(floor_signal(), &sa, std::ptr::null_mut()),
            0
        );
    }
}

/// What each floor thread does between signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Asleep in `pause()`: the peer of an idle CPU.
    Pause,
    /// Running user code that gives up its core each round (`sched_yield`): the peer of a CPU
    /// in a job that does the same (`yielding_job` in `ipi.rs`). A pure spinner would not do
    /// at 256 threads on 2 cores: the sender would get 1/128 of a core and the figure would be
    /// the scheduler's time slice.
    Busy,
}

/// N threads waiting as `Wait` says, each acking the floor signal once per delivery.
pub struct Broadcast {
    tids: Vec<libc::pid_t>,
    quit: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Broadcast {
    /// N threads asleep in `pause()`.
    pub fn sleepers(n: usize) -> Broadcast {
        Self::start(n, Wait::Pause)
    }

    pub fn start(n: usize, wait: Wait) -> Broadcast {
        install_floor_handler();
        let quit = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = (0..n)
            .map(|i| {
                let (q, tx) = (quit.clone(), tx.clone());
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        // SAFETY: gettid has no preconditions.
                        tx.send((i, unsafe { libc::gettid() })).unwrap();
                        while !q.load(Ordering::Acquire) {
                            match wait {
                                // SAFETY: pause has no preconditions; it returns after a
                                // handler.
                                Wait::Pause => unsafe {
                                    libc::pause();
                                },
                                Wait::Busy => std::thread::yield_now(),
                            }
                        }
                    })
                    .unwrap()
            })
            .collect();
        // By spawn index, so `tids[i]` is `threads[i]`'s.
        let mut tids = vec![0; n];
        for _ in 0..n {
            let (i, tid) = rx.recv().unwrap();
            tids[i] = tid;
        }
        // Let every thread reach its wait (pause(), or its yield loop).
        std::thread::sleep(Duration::from_millis(20));
        Broadcast {
            tids,
            quit,
            threads,
        }
    }

    /// One broadcast: a signal to each thread, then a wait until all N handlers have run.
    pub fn broadcast(&self) -> Duration {
        ACKS.store(0, Ordering::Relaxed);
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        let n = self.tids.len();
        let t0 = Instant::now();
        for &tid in &self.tids {
            // SAFETY: tgkill to a live thread of this process, with a handled signal.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, floor_signal()) };
        }
        while ACKS.load(Ordering::Acquire) < n {
            std::thread::yield_now();
        }
        t0.elapsed()
    }
}

impl Drop for Broadcast {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Release);
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        for (t, &tid) in self.threads.drain(..).zip(&self.tids) {
            while !t.is_finished() {
                // SAFETY: as in `broadcast`.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, floor_signal()) };
                std::thread::sleep(Duration::from_micros(100));
            }
            t.join().unwrap();
        }
    }
}

/// Spawns `n` threads that do nothing and joins them: the least that replacing N CPU
/// threads can cost (the kexec floor).
pub fn spawn_join(n: usize) {
    let t: Vec<_> = (0..n).map(|_| std::thread::spawn(|| {})).collect();
    for t in t {
        t.join().unwrap();
    }
}
