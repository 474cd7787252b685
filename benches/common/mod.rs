//! Shared by every bench: percentiles of single round trips beside criterion's output, and the
//! regression guard.
//!
//! Percentiles: criterion reports statistics of per-sample means, so a bimodal path (an
//! occasional doorbell signal on the polling path) hides in them. After criterion's
//! measurement of a latency figure, the bench times `n` single round trips one by one into an
//! `hdrhistogram` and writes p50/p90/p99 to
//! `<criterion home>/<group>/<id>/usmp-percentiles.json`, beside criterion's
//! `new/estimates.json`; the `bench-table` example reads both. A sub-microsecond path is
//! sampled in batches of a few trips (see `single_trips`).
//!
//! Guard: with `USMP_BENCH_GUARD=1` a bench skips criterion and runs each usmp figure and its
//! peer in alternating short rounds (so both see the same machine mode), divides usmp's best
//! round by the peer's median round (`alternating`), and exits non-zero if one is worse than twice its target
//! (`targets.rs`; a row that misses its target today is held to twice its worst recorded
//! ratio instead, see `targets::GUARD_OVERRIDES`). Twice, so that noise on a shared machine
//! cannot fail it, but a path that became several times slower does.

#![allow(dead_code)] // each bench binary uses only some of these helpers

pub mod floors;
pub mod targets;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Single-trip statistics, nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct Percentiles {
    pub n: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        Percentiles {
            n: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            mean: h.mean(),
        }
    }

    pub fn from_durations(v: &[Duration]) -> Self {
        let mut h = histogram();
        for d in v {
            record(&mut h, d.as_nanos() as u64);
        }
        Self::from_histogram(&h)
    }
}

/// A histogram from 1 ns to 100 s with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(1));
}

/// Spins (untimed) for `d`: keeps the sender hot while a target settles.
pub fn settle(d: Duration) {
    if d.is_zero() {
        return;
    }
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Times `n` samples, each after an untimed `gap`, into a histogram. A sample is one round
/// trip, or for a sub-microsecond path (`batch > 1`) the mean of `batch` back-to-back round
/// trips, so that the ~25 ns of reading the clock twice does not swamp a ~60 ns trip (a rare
/// slow trip, such as a doorbell signal among polls, still shows in p99).
pub fn single_trips(
    n: usize,
    gap: Duration,
    batch: u32,
    mut round_trip: impl FnMut(),
) -> Percentiles {
    let mut h = histogram();
    for _ in 0..n {
        settle(gap);
        let t = Instant::now();
        for _ in 0..batch {
            round_trip();
        }
        record(&mut h, (t.elapsed() / batch).as_nanos() as u64);
    }
    Percentiles::from_histogram(&h)
}

/// Where criterion writes (its own rule: `CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`,
/// else this package's `target/criterion`).
pub fn criterion_home() -> PathBuf {
    if let Some(v) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(v);
    }
    if let Some(v) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(v).join("criterion");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
}

/// Writes `p` for criterion's `(group, id)` and prints it to stderr. `id` may contain `/`
/// (`usmp/4`), as criterion's own directories do.
/// Writes nothing for an empty `p` (a figure that a filter skipped).
pub fn write_percentiles(group: &str, id: &str, p: &Percentiles) {
    if p.n == 0 {
        return;
    }
    eprintln!(
        "[percentiles] {group}/{id}: n={} min {} p50 {} p90 {} p99 {} max {} ns",
        p.n, p.min, p.p50, p.p90, p.p99, p.max
    );
    let dir = criterion_home().join(group).join(id);
    let json = serde_json::json!({
        "group": group,
        "id": id,
        "unit": "ns",
        "n": p.n,
        "min": p.min,
        "p50": p.p50,
        "p90": p.p90,
        "p99": p.p99,
        "max": p.max,
        "mean": p.mean,
    });
    let res = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            dir.join("usmp-percentiles.json"),
            serde_json::to_vec_pretty(&json).expect("json"),
        )
    });
    if let Err(e) = res {
        eprintln!("[percentiles] cannot write {}: {e}", dir.display());
    }
}

/// True when the bench runs as the CI regression guard instead of under criterion.
pub fn guard_mode() -> bool {
    std::env::var_os("USMP_BENCH_GUARD").is_some_and(|v| v != "0")
}

/// Collects the guard's verdicts and exits non-zero on any failure.
#[derive(Default)]
pub struct Guard {
    failed: Vec<String>,
}

impl Guard {
    /// Checks a same-run ratio (for an `Absolute` row: a value in ns) against the guard
    /// limit of row `key` (`targets::guard_limit`).
    pub fn check(&mut self, key: &str, value: f64, detail: &str) {
        let t = targets::target(key);
        let Some(limit) = targets::guard_limit(t) else {
            println!("guard {key}: {value:.2} ({detail}), no target");
            return;
        };
        let ok = value <= limit;
        let (v, l) = if t.kind == targets::Kind::Absolute {
            (format!("{:.0} ns", value), format!("{limit:.0} ns"))
        } else {
            (format!("{value:.2}x"), format!("{limit:.2}x"))
        };
        println!(
            "guard {key}: {v} ({detail}); target {}, fails above {l}: {}",
            t.target_text,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            self.failed.push(format!("{key} {v} > {l}"));
        }
    }

    /// Prints the outcome and exits: 0 when every check passed, 1 otherwise.
    pub fn finish(self, bench: &str) -> ! {
        if self.failed.is_empty() {
            println!("guard {bench}: all ratios within twice their targets");
            std::process::exit(0);
        }
        eprintln!(
            "guard {bench}: FAILED: {} (more than twice the target)",
            self.failed.join(", ")
        );
        std::process::exit(1);
    }
}

/// Runs `rounds` alternating rounds of a usmp measurement and its peer's (each returns a
/// typical value, a p50 in ns) and returns usmp's best round over the peer's median round,
/// with both sides' median values. Load on a shared machine only ever adds time: usmp's best
/// round is the one least disturbed, and the peer's median is not thrown off by one disturbed
/// round either way; a real regression raises every usmp round, the best one included.
pub fn alternating(
    rounds: usize,
    mut usmp: impl FnMut() -> f64,
    mut peer: impl FnMut() -> f64,
) -> (f64, f64, f64) {
    let (mut us, mut ps) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ps.push(peer());
        us.push(usmp());
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("  rounds: usmp {} | peer {}", show(&us), show(&ps));
    let best = us.iter().copied().fold(f64::INFINITY, f64::min);
    let (mu, mp) = (median(&mut us), median(&mut ps));
    (best / mp.max(1e-9), mu, mp)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let k = v.len();
    if k == 0 {
        return f64::NAN;
    }
    if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2.0
    }
}
