//! The watchdog and the trace window of one scenario run.
//!
//! The runner's thread calls [`Monitor::tick`] every few tens of milliseconds while the
//! scenario runs on its own thread. A tick:
//! 1. drains the watched runtime's event rings (`Handle::take_trace`) into a window of the last
//!    [`WINDOW`] plus the hang timeout, so a long run keeps a bounded trace that still reaches
//!    back to the start of a stall (CPUs that keep taking IPIs log on through it);
//! 2. once a violation happened and the rings have caught up with it, keeps the second before
//!    it as the failure trace (the first violation only);
//! 3. when the scenario made no progress for `--hang-timeout`, reports a `hangs` violation with
//!    every CPU's state and NMI-sampled instruction pointer (its trace is the second before the
//!    stall began), and tells the runner to end the run.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use usmp::cpu::events::Event;
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
}

impl Monitor {
    /// A monitor whose window reaches back to the start of a stall of `hang_timeout`.
    pub fn new(hang_timeout: Duration) -> Monitor {
        Monitor {
            inner: Mutex::new(Inner {
                keep: WINDOW + hang_timeout,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `h` from now on (a scenario that builds a new runtime, or kexecs to a next
    /// image, hands it over); the previous runtime's last events are drained first.
    pub fn watch(&self, h: Option<Handle>) {
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

    /// Step 3: true (and a `hangs` violation with the dump) when the scenario is stuck.
    pub fn hung(&self, tally: &Tally, hang_timeout: Duration) -> bool {
        let stalled = tally.stalled_for();
        if stalled < hang_timeout {
            return false;
        }
        let dump = self.handle().map_or_else(
            || "no runtime is being watched".to_string(),
            |h| dump_cpus(&h),
        );
        // The trace is cut at the start of the stall: the window reaches back the hang timeout
        // plus 2 s, even if CPUs went on logging through the stall.
        let began = mono_ns().saturating_sub(stalled.as_nanos() as u64);
        tally.violation_at(
            "hangs",
            None,
            format!(
                "watchdog: no progress for {:.1}s (--hang-timeout); {dump}",
                stalled.as_secs_f64()
            ),
            began,
        );
        true
    }
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

/// Every CPU's run state, online bit and NMI-sampled instruction pointer, on one line.
pub fn dump_cpus(h: &Handle) -> String {
    let mut s = format!("online {}:", h.online_mask());
    for cpu in 0..h.cpus() {
        let state = h
            .cpu_state(cpu)
            .map_or("?".to_string(), |st| format!("{st:?}").to_lowercase());
        let ip = match h.nmi_backtrace(cpu, NMI_SAMPLE) {
            Ok(ip) => format!("{ip:#x}"),
            Err(usmp::IpiError::Offline { .. }) => "-".into(),
            Err(e) => format!("? ({e})"),
        };
        let _ = write!(s, " CPU{cpu} {state} ip={ip}{};", host_view(h, cpu));
    }
    s.pop();
    s
}

/// What the host kernel says of a CPU's thread: its scheduler state, the host core it last ran
/// on, and its system call (`/proc/self/task/<tid>/{stat,syscall}`). It tells a thread the
/// host never ran (R) from one blocked in the kernel (D) or asleep in a futex (S, syscall 202
/// on x86_64), which the NMI sample alone cannot.
fn host_view(h: &Handle, cpu: usize) -> String {
    let Some(tid) = h.cpu_tid(cpu) else {
        return String::new();
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
