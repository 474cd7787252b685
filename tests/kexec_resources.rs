//! Resource use across many crash-kexec cycles. Its own test binary, so no other test's
//! threads run in the process while it counts threads and RSS.

use usmp::Builder;

fn proc_status(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 1,000 crash-kexec cycles with 8 CPUs: thread count and RSS stay bounded.
#[test]
fn thousand_crash_kexec_cycles_stay_bounded() {
    let mut rt = Builder::new()
        .cpus(8)
        .log_events(false)
        .pin(false)
        .build()
        .unwrap();
    // Warm up a few cycles so allocator pools reach their steady size.
    for _ in 0..20 {
        rt = rt.crash_kexec("warm-up", |_, _| ()).unwrap().next;
    }
    let (threads0, rss0) = (proc_status("Threads:"), proc_status("VmRSS:"));
    for i in 0..1000 {
        let out = rt.crash_kexec("cycle", |_, _| ()).unwrap();
        assert!(
            out.report.lost.is_empty(),
            "cycle {i}: lost {}",
            out.report.lost
        );
        rt = out.next;
    }
    let (threads1, rss1) = (proc_status("Threads:"), proc_status("VmRSS:"));
    eprintln!(
        "1000 crash-kexec cycles: threads {threads0} -> {threads1}, VmRSS {rss0} kB -> {rss1} kB"
    );
    assert!(
        threads1 <= threads0 + 2,
        "threads grew {threads0} -> {threads1}"
    );
    assert!(rss1 < rss0 + 32 * 1024, "RSS grew {rss0} -> {rss1} kB");
}
