//! Starvation by the host told apart from a bug: what the host scheduler gave each CPU thread
//! (and the calling thread) across a wait.
//!
//! `/proc/self/task/<tid>/schedstat` holds three numbers per thread: ns run on a core, ns
//! runnable but waiting for one, and timeslices. A [`Window`] reads them for every CPU thread
//! (`Handle::cpu_tid`) and the caller when a wait begins; at its end, a thread whose wait grew
//! by half the window (or half the timeout that expired, if shorter) or more was kept from
//! running by the host, not by the protocol:
//! [`Window::starved`] names it with its numbers, and [`Window::max_wait`] is the time the host
//! took from the threads the wait depended on (what a wall-clock bound may discount). Two
//! things `schedstat` does not show are added: a wait still going on (the kernel adds a wait
//! when it ends), and the hypervisor's steal on the thread's host core (`/proc/stat`): on a
//! VM, a thread current on a stolen vCPU neither runs nor waits in its own numbers.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use usmp::{CpuId, Handle};

/// One thread's `schedstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedStat {
    pub run_ns: u64,
    pub wait_ns: u64,
    pub slices: u64,
}

impl SchedStat {
    /// Parses a `schedstat` line: "run wait slices".
    pub fn parse(s: &str) -> Option<SchedStat> {
        let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
        Some(SchedStat {
            run_ns: it.next()??,
            wait_ns: it.next()??,
            slices: it.next()??,
        })
    }

    /// Thread `tid` of this process, if it still exists.
    pub fn of(tid: i32) -> Option<SchedStat> {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| SchedStat::parse(&s))
    }

    /// The calling thread.
    pub fn this_thread() -> Option<SchedStat> {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| SchedStat::parse(&s))
    }
}

/// The counters of the CPU threads and the caller when a wait began.
pub struct Window {
    start: Instant,
    cpus: Vec<(CpuId, i32, SchedStat)>,
    caller: Option<SchedStat>,
    /// Every thread of the process at the opening: a thread not among them at the end was born
    /// in the window.
    tasks: Vec<i32>,
    /// Each host core's steal at the opening.
    steal: Vec<u64>,
}

/// How long thread `tid` has been runnable but off a core right now, at most `window`: the
/// kernel adds a wait to `schedstat` only once it ends (the thread gets a core), so a thread
/// still waiting, or one the host has never run since its birth, shows none of it there and
/// looked asleep (a bring-up whose AP never ran: "ran 0.0 ms and waited runnable 0.0 ms").
/// Zero unless its state is R and it is not running: the time since it last ran
/// (`se.exec_start` in `/proc/.../sched`, compared with the calling thread's, which is
/// running now, on the same clock), or, never run, since its birth (`stat` field 22, in
/// clock ticks: 10 ms steps, rounded down).
fn ongoing_wait(tid: i32, window: Duration) -> Duration {
    let dir = format!("/proc/self/task/{tid}");
    let stat = std::fs::read_to_string(format!("{dir}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    if rest.first() != Some(&"R") {
        return Duration::ZERO;
    }
    let exec_start = |path: &str| -> Option<f64> {
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("se.exec_start"))
            .and_then(|v| v.trim_start_matches([' ', ':']).trim().parse().ok())
    };
    let waited = match exec_start(&format!("{dir}/sched")) {
        Some(theirs) if theirs > 0.0 => {
            let Some(mine) = exec_start("/proc/thread-self/sched") else {
                return Duration::ZERO;
            };
            Duration::from_secs_f64(((mine - theirs) / 1e3).max(0.0))
        }
        _ => {
            // Never run: runnable since its birth. `starttime` is field 22, `rest[19]`.
            let ticks = |v: Option<&str>| v.and_then(|t| t.parse::<f64>().ok());
            let hz = 100.0; // USER_HZ on Linux
            let (Some(born), Some(up)) = (
                ticks(rest.get(19).copied()),
                std::fs::read_to_string("/proc/uptime")
                    .ok()
                    .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok()),
            ) else {
                return Duration::ZERO;
            };
            Duration::from_secs_f64((up - born / hz - 1.0 / hz).max(0.0))
        }
    };
    waited.min(window)
}

/// The threads of this process now.
/// Thread `tid`'s name (`comm`), empty if it is gone.
fn comm(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A CPU thread's name without its CPU number (`usmp-cpu` of `usmp-cpu11`).
fn cpu_comm_prefix(tid: i32) -> String {
    comm(tid)
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string()
}

fn tasks() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One thread's share of a window.
struct Share {
    /// `None`: the waiting thread, or a thread born in the window.
    cpu: Option<CpuId>,
    /// 0 for the waiting thread.
    tid: i32,
    who: String,
    run: Duration,
    wait: Duration,
    /// Time the hypervisor took the host core the thread last ran on away from this VM
    /// (steal), at most the window: a thread current on a stolen core neither runs nor waits
    /// in its own numbers.
    stolen: Duration,
}

impl Share {
    /// The time the host kept this thread off a core: runnable waits and its core's steal.
    fn lost(&self) -> Duration {
        self.wait + self.stolen
    }

    fn numbers(&self) -> String {
        let mut s = format!(
            "ran {:.1} ms, waited runnable {:.1} ms",
            self.run.as_secs_f64() * 1e3,
            self.wait.as_secs_f64() * 1e3
        );
        if !self.stolen.is_zero() {
            let _ = write!(
                s,
                ", its host core stolen by the hypervisor {:.0} ms",
                self.stolen.as_secs_f64() * 1e3
            );
        }
        s
    }
}

/// Steal time of each host core so far, in clock ticks (`/proc/stat`, the 8th value).
fn steal_ticks() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .nth(8)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// The host core thread `tid` (0: the calling thread) last ran on (`stat` field 39).
fn core_of(tid: i32) -> Option<usize> {
    let path = if tid == 0 {
        "/proc/thread-self/stat".to_string()
    } else {
        format!("/proc/self/task/{tid}/stat")
    };
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(36)?.parse().ok()
}

impl Window {
    /// Opens a window on `h`'s CPU threads and the calling thread.
    pub fn open(h: &Handle) -> Window {
        let mut cpus: Vec<(CpuId, i32, SchedStat)> = (0..h.cpus())
            .filter_map(|c| {
                let tid = h.cpu_tid(c)?;
                Some((c, tid, SchedStat::of(tid)?))
            })
            .collect();
        // An offline CPU's thread is kept, parked, with no tid published (nothing may signal
        // it), and a `cpu_up` wakes that same thread: found by its name, or the host's delay
        // in running it after the wake-up went unseen ("CPU11 had no thread left to read").
        if let Some(&(_, tid, _)) = cpus.first() {
            let prefix = cpu_comm_prefix(tid);
            let named: Vec<(i32, String)> = tasks().into_iter().map(|t| (t, comm(t))).collect();
            for c in (0..h.cpus()).filter(|&c| h.cpu_tid(c).is_none()) {
                let want = format!("{prefix}{c}");
                if let Some(&(t, _)) = named.iter().find(|(_, n)| *n == want) {
                    if let Some(st) = SchedStat::of(t) {
                        cpus.push((c, t, st));
                    }
                }
            }
        }
        Window {
            start: Instant::now(),
            cpus,
            caller: SchedStat::this_thread(),
            tasks: tasks(),
            steal: steal_ticks(),
        }
    }

    /// Every thread's run and wait since the window opened: each CPU thread of the opening
    /// (read by its tid, so a thread on its way out, its CPU's tid already cleared, still
    /// counts), each CPU thread started meanwhile (counted from its birth), any other thread
    /// born in the window (a CPU thread the host has not yet run records no tid: a bring-up
    /// that timed out before its AP ever ran looked like an AP asleep), and the caller (call
    /// from the opening thread).
    fn shares(&self, h: &Handle) -> Vec<Share> {
        let window = self.start.elapsed();
        let steal_now = steal_ticks();
        let stolen = |tid: i32| -> Duration {
            let Some(core) = core_of(tid) else {
                return Duration::ZERO;
            };
            let (Some(a), Some(b)) = (self.steal.get(core), steal_now.get(core)) else {
                return Duration::ZERO;
            };
            // Clock ticks of 10 ms (USER_HZ).
            (Duration::from_millis(10) * b.saturating_sub(*a) as u32).min(window)
        };
        let mut v = Vec::new();
        let mut share = |c: CpuId, tid: i32, before: SchedStat| {
            if let Some(now) = SchedStat::of(tid) {
                v.push(Share {
                    cpu: Some(c),
                    tid,
                    who: format!("CPU{c} tid={tid}"),
                    run: Duration::from_nanos(now.run_ns.saturating_sub(before.run_ns)),
                    wait: Duration::from_nanos(now.wait_ns.saturating_sub(before.wait_ns))
                        + ongoing_wait(tid, window),
                    stolen: stolen(tid),
                });
            }
        };
        for &(c, tid, before) in &self.cpus {
            share(c, tid, before);
        }
        for c in 0..h.cpus() {
            match h.cpu_tid(c) {
                Some(tid) if !self.cpus.iter().any(|&(_, t, _)| t == tid) => {
                    share(c, tid, SchedStat::default())
                }
                _ => {}
            }
        }
        // Only threads named as this runtime's CPU threads are (their comm without the CPU
        // number): a process may hold unrelated threads (a test binary runs other tests in
        // parallel), whose waits say nothing about this wait.
        let cpu_names: Vec<String> = v.iter().map(|t| cpu_comm_prefix(t.tid)).collect();
        for tid in tasks() {
            let known = self.tasks.contains(&tid) || v.iter().any(|t| t.tid == tid);
            if known || !cpu_names.contains(&cpu_comm_prefix(tid)) {
                continue;
            }
            if let Some(now) = SchedStat::of(tid) {
                let comm = comm(tid);
                v.push(Share {
                    cpu: None,
                    tid,
                    who: format!("thread {comm} tid={tid} (born in the window, no CPU's tid yet)"),
                    run: Duration::from_nanos(now.run_ns),
                    wait: Duration::from_nanos(now.wait_ns) + ongoing_wait(tid, window),
                    stolen: stolen(tid),
                });
            }
        }
        if let (Some(b), Some(now)) = (self.caller, SchedStat::this_thread()) {
            v.push(Share {
                cpu: None,
                tid: 0,
                who: "the waiting thread".into(),
                run: Duration::from_nanos(now.run_ns.saturating_sub(b.run_ns)),
                wait: Duration::from_nanos(now.wait_ns.saturating_sub(b.wait_ns)),
                stolen: stolen(0),
            });
        }
        v
    }

    /// The threads the host kept runnable but off a core for half the window or more, or half
    /// of `bound` (the timeout that expired) if that is shorter, with their numbers; `None`
    /// if none was.
    pub fn starved(&self, h: &Handle, bound: Option<Duration>) -> Option<String> {
        self.starved_of(h, bound, |_| true)
    }

    /// Whether CPU `cpu`'s thread was starved so (with the numbers).
    pub fn starved_cpu(&self, h: &Handle, cpu: CpuId) -> Option<String> {
        self.starved_of(h, None, |c| c == Some(cpu))
    }

    /// Whether CPU `cpu`'s thread was kept runnable but off a core for half of `bound` (the
    /// wait that expired) or more, when the window is longer than that wait.
    pub fn starved_cpu_within(&self, h: &Handle, cpu: CpuId, bound: Duration) -> Option<String> {
        self.starved_of(h, Some(bound), |c| c == Some(cpu))
    }

    fn starved_of(
        &self,
        h: &Handle,
        bound: Option<Duration>,
        pick: impl Fn(Option<CpuId>) -> bool,
    ) -> Option<String> {
        let window = self.start.elapsed();
        let limit = bound.map_or(window, |b| b.min(window));
        let mut s = String::new();
        for t in self.shares(h).into_iter().filter(|t| pick(t.cpu)) {
            if t.lost() * 2 >= limit && !t.lost().is_zero() {
                let _ = write!(
                    s,
                    "{}{} {}",
                    if s.is_empty() { "" } else { "; " },
                    t.who,
                    t.numbers()
                );
            }
        }
        (!s.is_empty()).then(|| {
            format!(
                "{s} of a {:.1} ms window (load average {})",
                window.as_secs_f64() * 1e3,
                load_average()
            )
        })
    }

    /// What the host gave CPU `cpu`'s thread (and the caller) in the window, for a violation's
    /// message: not starved, or gone before it could be read.
    pub fn describe(&self, h: &Handle, cpu: CpuId) -> String {
        let window = self.start.elapsed();
        let shares = self.shares(h);
        let mut s = format!("in the {:.1} ms window", window.as_secs_f64() * 1e3);
        let mut any = false;
        for t in shares
            .iter()
            .filter(|t| t.cpu == Some(cpu) || t.cpu.is_none())
        {
            any |= t.cpu.is_some();
            let _ = write!(s, ", {} {}", t.who, t.numbers());
        }
        if !any {
            let _ = write!(s, ", CPU{cpu} had no thread left to read");
        }
        s
    }

    /// The longest any of the threads waited runnable in the window: time the host, not the
    /// protocol, took from a wait that needs all of them.
    pub fn max_wait(&self, h: &Handle) -> Duration {
        self.shares(h)
            .iter()
            .map(Share::lost)
            .max()
            .unwrap_or_default()
    }
}

/// The host's 1-minute load average (`/proc/loadavg`), or "?".
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_parses_and_this_thread_runs() {
        assert_eq!(
            SchedStat::parse("399122968 1574759502 1016\n"),
            Some(SchedStat {
                run_ns: 399_122_968,
                wait_ns: 1_574_759_502,
                slices: 1016
            })
        );
        assert_eq!(SchedStat::parse("1 2"), None);
        let a = SchedStat::this_thread().expect("schedstat of this thread");
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(5) {
            std::hint::spin_loop();
        }
        let b = SchedStat::this_thread().unwrap();
        assert!(b.run_ns > a.run_ns, "{a:?} -> {b:?}");
    }
}
