//! The exactly-once ledger: every call a scenario sends carries a [`Token`] its callback hits;
//! the sender files the token as accepted (must run exactly once), refused (must never run) or
//! unsure (a timed-out call that had started: at most once), and [`Ledger::check`] turns what
//! the tokens saw into `lost_calls`, `double_runs` and `refused_runs` violations while the
//! scenario runs, not only at the end.
//!
//! A callback only does `Token::hit` (two atomic stores, async-signal-safe); it holds an `Arc`
//! of its token, and the ledger holds another until the token is retired, so a callback never
//! frees memory in IPI context.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usmp::CpuId;

use super::Ctx;

/// What a callback records: how often it ran, and where it ran last.
#[derive(Debug, Default)]
pub struct Token {
    runs: AtomicU32,
    cpu: AtomicU32,
}

impl Token {
    /// Runs in IPI context: atomics only.
    pub fn hit(&self) {
        let cpu = usmp::this_cpu().map_or(u32::MAX, |c| c as u32);
        self.cpu.store(cpu, Ordering::Relaxed);
        self.runs.fetch_add(1, Ordering::AcqRel);
    }

    pub fn runs(&self) -> u32 {
        self.runs.load(Ordering::Acquire)
    }

    /// The CPU it ran on last, if it ran on one.
    pub fn ran_on(&self) -> Option<CpuId> {
        let c = self.cpu.load(Ordering::Relaxed);
        (c != u32::MAX && self.runs() > 0).then_some(c as CpuId)
    }
}

/// What the sender knows about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Accepted: runs exactly once.
    Once,
    /// Refused (offline, cancelled by a timeout before it started): never runs.
    Never,
    /// Timed out after it started: at most once.
    AtMostOnce,
}

struct Filed {
    token: Arc<Token>,
    target: CpuId,
    expect: Expect,
    at: Instant,
}

/// The calls of one sender (not shared: each sending thread keeps its own).
pub struct Ledger {
    filed: VecDeque<Filed>,
    /// An accepted call that has not run after this long is lost.
    lost_after: Duration,
    /// A refused or unsure call is watched this long for a (wrong) run, then retired.
    quarantine: Duration,
    /// Calls retired in good order.
    pub settled: u64,
    /// Accepted calls that ran exactly once.
    pub ran: u64,
}

impl Ledger {
    pub fn new(lost_after: Duration) -> Ledger {
        Ledger {
            filed: VecDeque::new(),
            lost_after,
            quarantine: Duration::from_millis(200),
            settled: 0,
            ran: 0,
        }
    }

    pub fn token() -> Arc<Token> {
        Arc::new(Token::default())
    }

    pub fn file(&mut self, token: Arc<Token>, target: CpuId, expect: Expect) {
        self.filed.push_back(Filed {
            token,
            target,
            expect,
            at: Instant::now(),
        });
    }

    /// Whether every accepted call has run (nothing but quarantined refusals is left).
    pub fn drained(&self) -> bool {
        self.filed
            .iter()
            .all(|f| f.expect != Expect::Once || f.token.runs() > 0)
    }

    /// Retires what can be judged now and reports violations to `ctx`. With `final_`, an
    /// accepted call that has not run is lost whatever its age, and every call is retired.
    pub fn check(&mut self, ctx: &dyn Sink, final_: bool) {
        let now = Instant::now();
        let mut keep = VecDeque::with_capacity(self.filed.len());
        while let Some(f) = self.filed.pop_front() {
            let age = now.duration_since(f.at);
            let runs = f.token.runs();
            let young = !final_ && age < self.quarantine;
            let verdict = match f.expect {
                Expect::Once if runs > 1 => Some(("double_runs", format!("ran {runs} times"))),
                Expect::Once if runs == 1 && young => {
                    keep.push_back(f);
                    continue;
                }
                Expect::Once if runs == 1 => {
                    self.ran += 1;
                    None
                }
                Expect::Once if final_ || age >= self.lost_after => Some((
                    "lost_calls",
                    format!(
                        "accepted {:.0} ms ago and never ran",
                        age.as_secs_f64() * 1e3
                    ),
                )),
                Expect::Once => {
                    keep.push_back(f);
                    continue;
                }
                Expect::Never if runs > 0 => {
                    Some(("refused_runs", format!("refused, yet ran {runs} time(s)")))
                }
                Expect::AtMostOnce if runs > 1 => {
                    Some(("double_runs", format!("timed out, then ran {runs} times")))
                }
                _ if young => {
                    keep.push_back(f);
                    continue;
                }
                _ => None,
            };
            match verdict {
                Some((counter, msg)) => ctx.violation(
                    counter,
                    Some(f.token.ran_on().unwrap_or(f.target)),
                    format!("call to CPU {}: {msg}", f.target),
                ),
                None => self.settled += 1,
            }
        }
        self.filed = keep;
    }
}

/// Where violations go: a scenario's [`Ctx`], or for `usmp run` workloads the first one kept
/// as an error.
pub trait Sink: Sync {
    fn violation(&self, counter: &str, cpu: Option<CpuId>, message: String);
    /// Adds `n` to a counter (a workload outside `usmp stress` keeps none).
    fn count(&self, _counter: &str, _n: u64) {}
    /// Something that is not a violation, worth reporting (`Ctx::note`).
    fn note(&self, counter: &str, _message: String) {
        self.count(counter, 1);
    }
}

impl Sink for Ctx {
    fn violation(&self, counter: &str, cpu: Option<CpuId>, message: String) {
        Ctx::violation(self, counter, cpu, message);
    }

    fn count(&self, counter: &str, n: u64) {
        Ctx::count(self, counter, n);
    }

    fn note(&self, counter: &str, message: String) {
        Ctx::note(self, counter, message);
    }
}

/// Keeps the first violation (for a workload outside `usmp stress`).
#[derive(Default)]
pub struct FirstViolation(std::sync::Mutex<Option<String>>);

impl FirstViolation {
    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Sink for FirstViolation {
    fn violation(&self, counter: &str, cpu: Option<CpuId>, message: String) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let on = cpu.map_or(String::new(), |c| format!(" on CPU {c}"));
            *g = Some(format!("{counter}{on}: {message}"));
        }
    }
}
