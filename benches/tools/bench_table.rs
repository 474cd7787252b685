//! Prints the README's benchmark table from the last `cargo bench` run:
//!
//! ```sh
//! cargo bench                                  # or one bench: cargo bench --bench ipi
//! cargo run --release --example bench-table    # [criterion dir ...], default target/criterion
//! ```
//!
//! Given several criterion directories (copies of `target/criterion` kept after consecutive
//! runs), it prints the table of the last and then each row's ratio in every run.
//!
//! For each row of `benches/common/targets.rs` it reads criterion's
//! `<group>/<id>/new/estimates.json` (the median) and the bench's own
//! `<group>/<id>/usmp-percentiles.json` (p50, p99 of single round trips) for usmp and for the
//! peer or floor, and prints figure, usmp, peer or floor, ratio, target and pass or miss as a
//! markdown table. Ratios are by p50 (criterion's median in parentheses); a throughput row is
//! by criterion's time per call. A row whose bench did not run says so.
//!
//! It is an example, not a binary of the package: it is a development tool that needs the
//! benches' output, it should not be installed with `usmp`, and as an example it is still
//! compiled by `cargo test` and `cargo clippy --all-targets`, so it cannot rot.

#[path = "../common/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;
use targets::{Kind, Target, TARGETS};

/// One figure's numbers, ns.
#[derive(Clone, Copy, Default)]
struct Fig {
    est: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Fig {
    /// The value ratios and bounds use: p50, else criterion's median.
    fn typical(&self) -> Option<f64> {
        self.p50.or(self.est)
    }
}

struct Reader {
    dir: PathBuf,
    newest: Option<SystemTime>,
}

impl Reader {
    fn json(&mut self, path: &Path) -> Option<Value> {
        let text = std::fs::read(path).ok()?;
        if let Ok(t) = std::fs::metadata(path).and_then(|m| m.modified()) {
            self.newest = Some(self.newest.map_or(t, |n| n.max(t)));
        }
        serde_json::from_slice(&text).ok()
    }

    fn fig(&mut self, group: &str, id: &str) -> Fig {
        if id.is_empty() {
            return Fig::default();
        }
        let d = self.dir.join(group).join(id);
        let est = self
            .json(&d.join("new/estimates.json"))
            .and_then(|v| v["median"]["point_estimate"].as_f64());
        let pct = self.json(&d.join("usmp-percentiles.json"));
        let get = |k: &str| pct.as_ref().and_then(|v| v[k].as_f64());
        Fig {
            est,
            p50: get("p50"),
            p99: get("p99"),
        }
    }
}

fn time(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

fn opt_time(ns: Option<f64>) -> String {
    ns.map_or("—".into(), time)
}

/// "13.19 µs (p50 12.9 µs, p99 20.1 µs)"
fn latency_cell(f: &Fig) -> String {
    match (f.est, f.p50) {
        (None, None) => "not run".into(),
        (Some(est), None) => time(est),
        _ => format!(
            "{} (p50 {}, p99 {})",
            opt_time(f.est),
            opt_time(f.p50),
            opt_time(f.p99)
        ),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn x(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}×"))
}

fn verdict(t: &Target, value: Option<f64>) -> &'static str {
    match (t.max_ratio, value) {
        (None, _) => "—",
        (Some(_), None) => "not run",
        (Some(max), Some(v)) if v <= max => "pass",
        _ => "**miss**",
    }
}

/// The per-CPU slope from 4 to 256 CPUs of `line`, by p50 and by criterion's median, with
/// the p50s at both ends.
fn slope(r: &mut Reader, group: &str, line: &str) -> (Option<f64>, Option<f64>, Fig, Fig) {
    let a = r.fig(group, &format!("{line}/4"));
    let b = r.fig(group, &format!("{line}/256"));
    let s = |x: Option<f64>, y: Option<f64>| Some((y? - x?) / 252.0);
    (s(a.p50, b.p50), s(a.est, b.est), a, b)
}

fn slope_cell(p50: Option<f64>, est: Option<f64>, a: &Fig, b: &Fig) -> String {
    if p50.is_none() && est.is_none() {
        return "not run".into();
    }
    format!(
        "{}/CPU (median {}/CPU; p50 {} at 4, {} at 256)",
        opt_time(p50),
        opt_time(est),
        opt_time(a.p50),
        opt_time(b.p50)
    )
}

fn rate_cell(f: &Fig) -> String {
    match f.est {
        None => "not run".into(),
        Some(ns) => format!("{:.2} M calls/s ({} per call)", 1e3 / ns, time(ns)),
    }
}

/// The row's cells, and the value its verdict judges (a ratio, or ns for `Absolute`).
fn row(r: &mut Reader, t: &Target) -> ([String; 6], Option<f64>) {
    let (usmp, peer, ratio_s, judged) = match t.kind {
        Kind::Latency => {
            let (u, p) = (r.fig(t.group, t.usmp), r.fig(t.group, t.peer));
            let by_p50 = ratio(u.p50, p.p50);
            let by_est = ratio(u.est, p.est);
            (
                latency_cell(&u),
                format!("{}: {}", t.peer_label, latency_cell(&p)),
                format!("{} ({})", x(by_p50), x(by_est)),
                by_p50.or(by_est),
            )
        }
        Kind::Throughput => {
            let (u, p) = (r.fig(t.group, t.usmp), r.fig(t.group, t.peer));
            let by_est = ratio(u.est, p.est);
            (
                rate_cell(&u),
                format!("{}: {}", t.peer_label, rate_cell(&p)),
                x(by_est),
                by_est,
            )
        }
        Kind::Slope => {
            let (up, ue, ua, ub) = slope(r, t.group, t.usmp);
            let (pp, pe, pa, pb) = slope(r, t.group, t.peer);
            let by_p50 = ratio(up, pp);
            (
                slope_cell(up, ue, &ua, &ub),
                format!("{}: {}", t.peer_label, slope_cell(pp, pe, &pa, &pb)),
                format!("{} ({})", x(by_p50), x(ratio(ue, pe))),
                by_p50.or(ratio(ue, pe)),
            )
        }
        Kind::Absolute => {
            let u = r.fig(t.group, t.usmp);
            let p = r.fig(t.group, t.peer);
            let peer = if t.peer.is_empty() {
                "—".into()
            } else {
                format!("{}: {}", t.peer_label, latency_cell(&p))
            };
            (latency_cell(&u), peer, "—".into(), u.typical())
        }
    };
    let cells = [
        t.figure.to_string(),
        usmp,
        peer,
        ratio_s,
        t.target_text.to_string(),
        verdict(t, judged).to_string(),
    ];
    (cells, judged)
}

fn main() {
    let mut dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs.push(default_dir());
    }
    let last = dirs.len() - 1;
    let mut r = Reader {
        dir: dirs[last].clone(),
        newest: None,
    };
    println!(
        "| figure | usmp: criterion median (p50, p99) | peer or floor: median (p50, p99) \
         | ratio by p50 (by median) | target | result |"
    );
    println!("|---|---|---|---|---|---|");
    let mut any = false;
    for t in TARGETS {
        let (cells, _) = row(&mut r, t);
        any |= cells[1] != "not run";
        println!("| {} |", cells.join(" | "));
    }
    match r.newest {
        Some(t) => println!(
            "\nFrom {} (newest file {}).",
            r.dir.display(),
            humantime::format_rfc3339_seconds(t)
        ),
        None => println!("\nNo benchmark output under {}.", r.dir.display()),
    }
    if !any {
        eprintln!("bench-table: nothing to show; run `cargo bench` first");
        std::process::exit(1);
    }
    if dirs.len() > 1 {
        runs_table(&dirs);
    }
}

/// With several criterion directories (copies kept from consecutive runs): each row's judged
/// value per run, and whether every run met the target.
fn runs_table(dirs: &[PathBuf]) {
    let mut readers: Vec<Reader> = dirs
        .iter()
        .map(|d| Reader {
            dir: d.clone(),
            newest: None,
        })
        .collect();
    let runs: Vec<String> = (1..=dirs.len()).map(|i| format!("run {i}")).collect();
    println!(
        "\n| figure | against | {} | target | every run |",
        runs.join(" | ")
    );
    println!("|---|---|{}---|---|", "---|".repeat(dirs.len()));
    for t in TARGETS {
        let vals: Vec<Option<f64>> = readers.iter_mut().map(|r| row(r, t).1).collect();
        let shown: Vec<String> = vals
            .iter()
            .map(|v| match (t.kind, v) {
                (Kind::Absolute, Some(ns)) => time(*ns),
                _ => x(*v),
            })
            .collect();
        let every = match t.max_ratio {
            None => "—",
            Some(max) if vals.iter().all(|v| v.is_some_and(|v| v <= max)) => "pass",
            Some(_) if vals.iter().any(|v| v.is_none()) => "not run",
            Some(_) => "**miss**",
        };
        let against = t.peer_label.split(" (").next().unwrap_or(t.peer_label);
        println!(
            "| {} | {} | {} | {} | {} |",
            t.figure,
            if t.kind == Kind::Absolute {
                "—"
            } else {
                against
            },
            shown.join(" | "),
            t.target_text,
            every
        );
    }
}

/// Criterion's own rule: `CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else this
/// package's `target/criterion`.
fn default_dir() -> PathBuf {
    if let Some(v) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(v);
    }
    if let Some(v) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(v).join("criterion");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
}
