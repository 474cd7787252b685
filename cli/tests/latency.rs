//! `usmp latency`: the JSON has one result per ordered pair of distinct cores and kind, the SVG
//! parses and has one cell per pair and kind, and bad core lists get one line and exit 2.

use std::time::Duration;

#[path = "common/cli.rs"]
mod cli;
use cli::{run_bounded, usmp};

const BOUND: Duration = Duration::from_secs(120);

fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn json_and_svg_have_one_entry_per_pair_and_kind() {
    let n = host_cores();
    let svg = std::env::temp_dir().join(format!("usmp-latency-test-{}.svg", std::process::id()));
    let out = run_bounded(
        usmp()
            .args(["latency", "--samples", "30", "--json", "--svg"])
            .arg(&svg),
        BOUND,
    );
    if n < 2 {
        // One core: the command says it needs two and exits 2 (tested below as well).
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        return;
    }
    assert!(out.status.success(), "stderr: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let cores = v["cores"].as_array().unwrap().len();
    assert_eq!(cores, n);
    let pairs = cores * (cores - 1);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), pairs * 4, "{}", out.stdout);
    for r in results {
        assert_ne!(r["from"], r["to"], "a same-core pair was measured");
        let (p50, p99) = (r["p50_ns"].as_u64().unwrap(), r["p99_ns"].as_u64().unwrap());
        assert!(p50 > 0 && p50 <= p99, "{r}");
        assert_eq!(r["samples"].as_u64(), Some(30));
    }
    let text = std::fs::read_to_string(&svg).expect("the SVG was written");
    let _ = std::fs::remove_file(&svg);
    let doc = roxmltree::Document::parse(&text).expect("the SVG parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    for kind in ["pingpong", "polling", "busy", "sleeping"] {
        let cells = doc
            .descendants()
            .filter(|e| {
                e.attribute("class") == Some("cell") && e.attribute("data-kind") == Some(kind)
            })
            .count();
        assert_eq!(cells, pairs, "{kind}: {cells} cells for {pairs} pairs");
        assert!(
            text.contains(&format!("{kind}: p50 round trip (µs)")),
            "{kind}: no labelled panel"
        );
    }
    assert!(text.contains("µs (log scale)"), "no labelled colour scale");
}

#[test]
fn bad_core_lists_get_one_line_and_exit_2() {
    for args in [
        &["latency", "--cores", "0"][..],
        &["latency", "--cores", "0,4095"][..],
        &["latency", "--cores", "banana"][..],
        &["latency", "--samples", "-1"][..],
    ] {
        let out = run_bounded(usmp().args(args), BOUND);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
    }
}
