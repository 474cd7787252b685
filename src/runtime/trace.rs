//! Chrome / Perfetto trace-event JSON export: one track per logical CPU (plus one for threads
//! outside the runtime) with IPIs sent and handled (joined by flow arrows), doorbells, NMIs,
//! irq-masked spans and state changes. Open the file at ui.perfetto.dev.

use std::io::Write;

use serde_json::{json, Value};

use crate::cpu::events::{Event, EventKind, NO_CPU};
use crate::cpu::state::CpuRunState;

/// Builds the trace JSON for `events` of a runtime with `cpus` CPUs.
pub fn chrome_trace(events: &[Event], cpus: usize) -> Value {
    let mut out = Vec::with_capacity(events.len() + cpus + 1);
    for c in 0..=cpus {
        let name = if c == cpus {
            "outside the runtime".to_string()
        } else {
            format!("CPU {c}")
        };
        out.push(
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": c, "args": {"name": name}}),
        );
        out.push(json!({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": c, "args": {"sort_index": c}}));
    }
    let t0 = events.iter().map(|e| e.ts_ns).min().unwrap_or(0);
    let us = |ns: u64| (ns.saturating_sub(t0)) as f64 / 1000.0;
    for e in events {
        let tid = e.ring;
        let ts = us(e.ts_ns);
        let inst = |name: String, args: Value| json!({"ph": "i", "s": "t", "name": name, "pid": 1, "tid": tid, "ts": ts, "args": args});
        match e.kind {
            EventKind::IpiSend => {
                out.push(inst(format!("IPI -> CPU{}", e.a), json!({"call": e.b})));
                out.push(json!({"ph": "s", "id": e.b, "name": "ipi", "cat": "ipi", "pid": 1, "tid": tid, "ts": ts}));
            }
            EventKind::IpiHandle => {
                let from = if e.a == NO_CPU {
                    "ext".into()
                } else {
                    format!("CPU{}", e.a)
                };
                out.push(inst(format!("IPI from {from}"), json!({"call": e.b})));
                out.push(json!({"ph": "f", "bp": "e", "id": e.b, "name": "ipi", "cat": "ipi", "pid": 1, "tid": tid, "ts": ts}));
            }
            EventKind::Doorbell => out.push(inst(format!("doorbell -> CPU{}", e.a), json!({}))),
            EventKind::IdleWake => out.push(inst(format!("wake CPU{}", e.a), json!({}))),
            EventKind::IrqOn => {
                let dur = e.a as f64 / 1000.0;
                out.push(json!({"ph": "X", "name": "irqs masked", "pid": 1, "tid": tid, "ts": ts - dur, "dur": dur}));
            }
            EventKind::IrqOff => {}
            EventKind::IrqReplay => {
                out.push(inst("replay deferred IPIs".into(), json!({"calls": e.a})))
            }
            EventKind::Nmi => out.push(inst("NMI".into(), json!({"reasons": e.a}))),
            EventKind::CsdTimeout => out.push(inst(
                format!("csd lock timeout (CPU{})", e.a),
                json!({"waited_ns": e.b}),
            )),
            EventKind::OfflineIpi => out.push(inst("IPI on offline CPU".into(), json!({}))),
            EventKind::CpuState => out.push(inst(
                format!("{:?}", CpuRunState::from_u32(e.a as u32)),
                json!({}),
            )),
            EventKind::HotplugStep => out.push(inst(
                format!("hotplug step {}", e.a),
                json!({"up": e.b == 1}),
            )),
            EventKind::StopUpgraded => out.push(inst("stop upgraded to crash".into(), json!({}))),
            EventKind::StopDeferred => out.push(inst(
                "stop deferred (in the C library)".into(),
                json!({"ip": format!("{:#x}", e.b)}),
            )),
            EventKind::Stopped => out.push(inst(
                "stopped".into(),
                json!({"crash": e.a == 1, "ip": format!("{:#x}", e.b)}),
            )),
        }
    }
    json!({"traceEvents": out, "displayTimeUnit": "ns"})
}

/// Writes the trace to `w`.
pub fn write_chrome_trace(events: &[Event], cpus: usize, w: impl Write) -> std::io::Result<()> {
    serde_json::to_writer(w, &chrome_trace(events, cpus)).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_has_a_track_per_cpu_and_flows() {
        let ev = |ring, kind, a, b, ts| Event {
            ts_ns: ts,
            ring,
            kind,
            a,
            b,
        };
        let events = vec![
            ev(2, EventKind::IpiSend, 0, 7, 1000),
            ev(0, EventKind::IpiHandle, 2, 7, 5000),
            ev(0, EventKind::IrqOn, 3000, 0, 9000),
        ];
        let v = chrome_trace(&events, 3);
        let te = v["traceEvents"].as_array().unwrap();
        let names: Vec<_> = te.iter().filter(|e| e["name"] == "thread_name").collect();
        assert_eq!(names.len(), 4);
        assert!(te.iter().any(|e| e["ph"] == "s" && e["id"] == 7));
        assert!(te
            .iter()
            .any(|e| e["ph"] == "f" && e["id"] == 7 && e["tid"] == 0));
        let span = te.iter().find(|e| e["ph"] == "X").unwrap();
        assert_eq!(span["dur"].as_f64().unwrap(), 3.0);
        assert_eq!(span["ts"].as_f64().unwrap(), 5.0);
    }
}
