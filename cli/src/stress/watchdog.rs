//! The watchdog and the trace window of one scenario run.
//!
//! The runner's thread calls [`Monitor::tick`] every few tens of milliseconds while the
//! scenario runs on its own thread. A tick:
//! 1. drains the watched runtime's event rings (`Handle::take_trace`) into a window of the last
//!    [`WINDOW`] plus the hang timeout, so a long run keeps a bounded trace that still reaches
//!    back to the start of a stall (CPUs that keep taking IPIs log on through it);
//! 2. once a violation happened and the rings have caught up with it, keeps the second before
//!    it as the failure trace (the first violation only).
//!
//! 3. The hang check runs on a thread of its own ([`Watchdog`]), which takes no lock that the
//!    scenario, the runtime or the trace drain may hold for long: it wakes at the moment the
//!    hang timeout would pass since the last progress (an atomic in the `Tally`), and when no
//!    progress came, it reports a `hangs` violation with every CPU's state, NMI-sampled
//!    instruction pointer and host view (all CPUs sampled at once, each bounded by
//!    [`NMI_SAMPLE`]), and tells the run to end. So a hang is reported within the hang timeout
//!    plus [`NMI_SAMPLE`] and a wake-up of the last progress, however busy the runner is (a
//!    hang checked from the runner's loop was once reported 50 s late).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use usmp::Event;
use usmp::Handle;

use super::check::{mono_ns, Tally};

/// Events older than this plus the hang timeout (before the newest) are dropped from the window.
const WINDOW: Duration = Duration::from_secs(2);
/// The failure trace: this long before the first violation.
const BEFORE: Duration = Duration::from_secs(1);
/// The logger drains the rings every 20 ms; cut the failure trace once this much has passed.
const CATCH_UP: Duration = Duration::from_millis(100);
/// Each CPU's NMI sample waits at most this long.
const NMI_SAMPLE: Duration = Duration::from_millis(100);

/// The trace of the second before the first violation, and the runtime's width.
pub struct FailureTrace {
    pub events: Vec<Event>,
    pub cpus: usize,
}

#[derive(Default)]
struct Inner {
    handle: Option<Handle>,
    window: VecDeque<Event>,
    /// How far back the window reaches: [`WINDOW`] plus the hang timeout.
    keep: Duration,
    cpus: usize,
    failure: Option<FailureTrace>,
}

/// What the watchdog watches: the scenario's current runtime and its recent events.
pub struct Monitor {
    inner: Mutex<Inner>,
    /// The runtime a hang dump shows: the watched one, or after `unwatch` the last one (a
    /// shutdown can hang too). Its own lock, held only to set or clone it.
    dump_target: Mutex<Option<Handle>>,
}

impl Monitor {
    /// A monitor whose window reaches back to the start of a stall of `hang_timeout`.
    pub fn new(hang_timeout: Duration) -> Monitor {
        Monitor {
            inner: Mutex::new(Inner {
                keep: WINDOW + hang_timeout,
                ..Inner::default()
            }),
            dump_target: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `h` from now on (a scenario that builds a new runtime, or kexecs to a next
    /// image, hands it over); the previous runtime's last events are drained first.
    pub fn watch(&self, h: Option<Handle>) {
        if let Some(h) = &h {
            *self.dump_target.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.clone());
        }
        let mut g = self.lock();
        drain(&mut g);
        if let Some(h) = &h {
            g.cpus = h.cpus();
        }
        g.handle = h;
    }

    pub fn handle(&self) -> Option<Handle> {
        self.lock().handle.clone()
    }

    /// Steps 1 and 2 of the module doc; `final_` cuts the failure trace whatever the time.
    pub fn tick(&self, tally: &Tally, final_: bool) {
        let mut g = self.lock();
        drain(&mut g);
        if g.failure.is_some() {
            return;
        }
        let Some(v) = tally.first_violations().into_iter().next() else {
            return;
        };
        if !final_ && mono_ns() < v.mono_ns + CATCH_UP.as_nanos() as u64 {
            return;
        }
        let from = v.mono_ns.saturating_sub(BEFORE.as_nanos() as u64);
        let events = g
            .window
            .iter()
            .filter(|e| e.ts_ns >= from && e.ts_ns <= v.mono_ns)
            .copied()
            .collect();
        g.failure = Some(FailureTrace {
            events,
            cpus: g.cpus,
        });
    }

    pub fn take_failure(&self) -> Option<FailureTrace> {
        self.lock().failure.take()
    }

    /// The runtime a hang dump shows.
    fn dump_target(&self) -> Option<Handle> {
        self.dump_target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Step 3: the hang check on its own thread. Dropping it stops the thread.
pub struct Watchdog {
    done: Option<crossbeam_channel::Sender<()>>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `tally` for stalls of `hang_timeout`; on one, reports it (dumping
    /// `monitor`'s runtime) and calls `abort`.
    pub fn start(
        monitor: Arc<Monitor>,
        tally: Arc<Tally>,
        hang_timeout: Duration,
        abort: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Watchdog> {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let thread = std::thread::Builder::new()
            .name("usmp-stress-watchdog".into())
            .spawn(move || loop {
                let stalled = tally.stalled_for();
                if stalled >= hang_timeout {
                    report_hang(&monitor, &tally, stalled);
                    f.store(true, Ordering::SeqCst);
                    abort();
                    return;
                }
                // Wake when the timeout would pass if no progress comes meanwhile.
                match rx.recv_timeout(hang_timeout - stalled) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })?;
        Ok(Watchdog {
            done: Some(tx),
            fired,
            thread: Some(thread),
        })
    }

    /// Whether it reported a hang (the run is ending).
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long the report of a hang may take before the process is ended by `SIGALRM`.
const REPORT_BOUND_S: u32 = 10;

/// The hang's first line, written with one `write(2)` from a stack buffer before anything
/// that allocates or locks: a hang can be a lock held for good (session 6's was a CPU parked
/// inside `malloc`), and then the report below never finishes. The alarm ends the process
/// if it does not, so the run reports the hang and ends either way.
fn announce_hang(stalled: Duration) {
    let mut buf = [0u8; 256];
    let n = hang_line(stalled, &mut buf);
    // SAFETY: write(2) of `n` initialized bytes of a stack buffer; alarm(2) only arms a timer.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::alarm(REPORT_BOUND_S);
    }
}

/// Formats the line into `buf` without allocating; returns its length (cut at the buffer's).
fn hang_line(stalled: Duration, buf: &mut [u8]) -> usize {
    use std::io::Write as _;
    let mut c = std::io::Cursor::new(buf);
    let _ = writeln!(
        c,
        "usmp stress: watchdog: no progress for {:.1}s; reporting (if the report cannot finish within {REPORT_BOUND_S} s, e.g. a lock held for good, SIGALRM ends the process)",
        stalled.as_secs_f64()
    );
    c.position() as usize
}

/// A `hangs` violation with the dump of every CPU.
fn report_hang(monitor: &Monitor, tally: &Tally, stalled: Duration) {
    announce_hang(stalled);
    let dump = monitor.dump_target().map_or_else(
        || "no runtime was ever watched".to_string(),
        |h| dump_cpus(&h),
    );
    // The trace is cut at the start of the stall: the window reaches back the hang timeout
    // plus 2 s, even if CPUs went on logging through the stall.
    let began = mono_ns().saturating_sub(stalled.as_nanos() as u64);
    tally.violation_at(
        "hangs",
        None,
        format!(
            "watchdog: no progress for {:.1}s (--hang-timeout), reported {:.1}s after the last progress; {dump}",
            stalled.as_secs_f64(),
            tally.stalled_for().as_secs_f64()
        ),
        began,
    );
    // SAFETY: alarm(0) cancels the timer `announce_hang` armed: the report is complete.
    unsafe { libc::alarm(0) };
}

fn drain(g: &mut Inner) {
    let Some(h) = &g.handle else { return };
    let new = h.take_trace();
    g.window.extend(new);
    let newest = g.window.back().map_or(0, |e| e.ts_ns);
    let keep_from = newest.saturating_sub(g.keep.as_nanos() as u64);
    while g.window.front().is_some_and(|e| e.ts_ns < keep_from) {
        g.window.pop_front();
    }
}

/// Every CPU's run state, online bit, NMI-sampled instruction pointer and host view, on one
/// line. The CPUs are sampled at once, so the dump takes about one [`NMI_SAMPLE`] at most.
pub fn dump_cpus(h: &Handle) -> String {
    let mut s = format!("online {}:", h.online_mask());
    let ips: Vec<String> = std::thread::scope(|sc| {
        let samplers: Vec<_> = (0..h.cpus())
            .map(|cpu| {
                std::thread::Builder::new()
                    .name("usmp-stress-nmi-sample".into())
                    .spawn_scoped(sc, move || match h.nmi_backtrace(cpu, NMI_SAMPLE) {
                        Ok(ip) => format!("{ip:#x}"),
                        Err(usmp::IpiError::Offline { .. }) => "-".into(),
                        Err(e) => format!("? ({e})"),
                    })
            })
            .collect();
        samplers
            .into_iter()
            .map(|t| match t {
                Ok(t) => t.join().unwrap_or_else(|_| "? (sampler panicked)".into()),
                Err(e) => format!("? (no sampler thread: {e})"),
            })
            .collect()
    });
    for (cpu, ip) in ips.iter().enumerate() {
        let state = h
            .cpu_state(cpu)
            .map_or("?".to_string(), |st| format!("{st:?}").to_lowercase());
        let _ = write!(s, " CPU{cpu} {state} ip={ip}{};", host_view(h, cpu));
    }
    s.pop();
    s
}

/// What the host kernel says of a CPU's thread: its scheduler state, the host core it last ran
/// on, and its system call (`/proc/self/task/<tid>/{stat,syscall}`; `?` for a thread that
/// ended meanwhile). It tells a thread the
/// host never ran (R) from one blocked in the kernel (D) or asleep in a futex (S, syscall 202
/// on x86_64), which the NMI sample alone cannot.
fn host_view(h: &Handle, cpu: usize) -> String {
    let Some(tid) = h.cpu_tid(cpu) else {
        // Every CPU shows every field, even one with no thread (offline, or not started).
        return " tid=none host=none@core- syscall=none".into();
    };
    let dir = format!("/proc/self/task/{tid}");
    let stat = std::fs::read_to_string(format!("{dir}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, processor 39.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let state = rest.first().copied().unwrap_or("?");
    let core = rest.get(36).copied().unwrap_or("?");
    let syscall = std::fs::read_to_string(format!("{dir}/syscall")).unwrap_or_default();
    let syscall = syscall.split_whitespace().next().unwrap_or("?");
    format!(" tid={tid} host={state}@core{core} syscall={syscall}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line fits its stack buffer whole and is not the violation's own line.
    #[test]
    fn the_hang_line_is_formatted_without_allocating_and_fits() {
        let mut buf = [0u8; 256];
        let n = hang_line(Duration::from_millis(10_250), &mut buf);
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.starts_with("usmp stress: watchdog: no progress for 10.2s; "),
            "{line}"
        );
        assert!(line.ends_with('\n'), "cut short: {line}");
        assert!(
            !line.contains("hangs at "),
            "would be taken for the violation line"
        );
    }
}
