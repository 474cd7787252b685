//! The event log: a preallocated, lock-free ring of fixed-size events per logical CPU (plus one
//! for threads outside the runtime), writable from signal-handler context.
//!
//! Protocol (per ring):
//! 1. A writer reserves a position with `head.fetch_add(1)`: writers never wait for each other,
//!    so a handler that interrupts a writer on the same thread simply takes the next position.
//! 2. It invalidates the slot (`seq = 0`), writes the fields, then publishes `seq = pos + 1`
//!    with Release.
//! 3. The reader (the logger thread) reads positions `tail..head`; a slot is valid only if `seq`
//!    reads `pos + 1` before and after copying the fields (a seqlock), otherwise it was
//!    overwritten (counted as dropped) or is still being written (retried on the next drain).
//!
//! When the ring is full the oldest events are overwritten: the log never blocks a CPU.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::clock::now_ns;

/// What happened. The logger turns each kind into a kernel-style message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u16)]
pub enum EventKind {
    /// A call was queued: `a` = target CPU, `b` = call id.
    IpiSend = 1,
    /// A call ran: `a` = sender CPU (or `NO_CPU`), `b` = call id.
    IpiHandle,
    /// The doorbell signal was rung: `a` = target CPU.
    Doorbell,
    /// A sleeping idle CPU was woken by futex: `a` = target CPU.
    IdleWake,
    /// Irqs soft-masked (outermost `irq_save`).
    IrqOff,
    /// Irqs unmasked again (outermost `irq_restore`); `a` = masked ns.
    IrqOn,
    /// IPIs deferred while masked were replayed: `a` = calls run.
    IrqReplay,
    /// An NMI arrived: `a` = reason bits.
    Nmi,
    /// A synchronous call gave up: `a` = target CPU, `b` = ns waited.
    CsdTimeout,
    /// A call was found on a CPU after it went offline: `a` = call id (the callback's name is
    /// in the CPU's `offline_name`).
    OfflineIpi,
    /// A CPU changed state: `a` = `CpuRunState` code.
    CpuState,
    /// A hotplug step ran: `a` = step index, `b` = 1 up / 0 down.
    HotplugStep,
    /// A CPU acknowledged a stop and parked: `a` = 1 if crash (registers saved), `b` = ip.
    Stopped,
    /// A crash-stop arrived while a plain stop ran and upgraded it (logged by the loser, which
    /// may be in IPI context and so cannot print).
    StopUpgraded,
    /// A stop signal found the CPU inside the C library and was declined, to be sent again
    /// (`stop/parkable.rs`): `b` = the interrupted ip.
    StopDeferred,
}

impl EventKind {
    fn from_u16(v: u16) -> Option<Self> {
        use EventKind::*;
        Some(match v {
            1 => IpiSend,
            2 => IpiHandle,
            3 => Doorbell,
            4 => IdleWake,
            5 => IrqOff,
            6 => IrqOn,
            7 => IrqReplay,
            8 => Nmi,
            9 => CsdTimeout,
            10 => OfflineIpi,
            11 => CpuState,
            12 => HotplugStep,
            13 => Stopped,
            14 => StopUpgraded,
            15 => StopDeferred,
            _ => return None,
        })
    }
}

/// "No CPU": the event came from a thread outside the runtime.
pub const NO_CPU: u64 = u64::MAX;

/// One decoded event.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Event {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    /// The ring it was written to: a CPU id, or the CPU count for "outside the runtime".
    pub ring: u32,
    /// What happened.
    pub kind: EventKind,
    /// First argument (see [`EventKind`]).
    pub a: u64,
    /// Second argument (see [`EventKind`]).
    pub b: u64,
}

struct Slot {
    seq: AtomicU64,
    ts: AtomicU64,
    kind: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

/// One ring. See the module protocol.
pub struct EventRing {
    /// Whether anything reads this ring (a logger or a trace); if not, `record` is a no-op,
    /// so the IPI path does not pay for two clock reads nobody looks at.
    enabled: bool,
    slots: Box<[Slot]>,
    head: AtomicU64,
    tail: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for EventRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRing")
            .field("enabled", &self.enabled)
            .field("capacity", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl EventRing {
    /// A ring of `cap` events (rounded up to a power of two, at least 16).
    #[cfg(test)]
    pub fn new(cap: usize) -> Self {
        Self::with_enabled(cap, true)
    }

    /// A ring that records only if `enabled`.
    pub fn with_enabled(cap: usize, enabled: bool) -> Self {
        let cap = if enabled {
            cap.max(16).next_power_of_two()
        } else {
            1
        };
        Self {
            enabled,
            slots: (0..cap)
                .map(|_| Slot {
                    seq: AtomicU64::new(0),
                    ts: AtomicU64::new(0),
                    kind: AtomicU64::new(0),
                    a: AtomicU64::new(0),
                    b: AtomicU64::new(0),
                })
                .collect(),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether `record` records anything (so a caller can skip gathering its arguments).
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Records an event. Lock-free, allocation-free: callable from signal-handler context.
    #[inline]
    pub fn record(&self, kind: EventKind, a: u64, b: u64) {
        if !self.enabled {
            return;
        }
        let pos = self.head.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[(pos as usize) & (self.slots.len() - 1)];
        slot.seq.store(0, Ordering::Relaxed);
        // Invalidation before the fields: a reader that sees new fields also sees seq != pos+1.
        fence(Ordering::Release);
        slot.ts.store(now_ns(), Ordering::Relaxed);
        slot.kind.store(kind as u64, Ordering::Relaxed);
        slot.a.store(a, Ordering::Relaxed);
        slot.b.store(b, Ordering::Relaxed);
        slot.seq.store(pos + 1, Ordering::Release);
    }

    /// Moves every complete event into `out`; returns how many were overwritten unread so far.
    /// Called only by the logger (one reader per ring).
    pub fn drain(&self, ring: u32, out: &mut Vec<Event>) -> u64 {
        let head = self.head.load(Ordering::Acquire);
        let mut tail = self.tail.load(Ordering::Relaxed);
        let cap = self.slots.len() as u64;
        if head.saturating_sub(tail) > cap {
            self.dropped.fetch_add(head - tail - cap, Ordering::Relaxed);
            tail = head - cap;
        }
        while tail < head {
            let slot = &self.slots[(tail & (cap - 1)) as usize];
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 < tail + 1 {
                break; // reserved but not yet published: pick it up next time
            }
            let ev = (
                slot.ts.load(Ordering::Relaxed),
                slot.kind.load(Ordering::Relaxed),
                slot.a.load(Ordering::Relaxed),
                slot.b.load(Ordering::Relaxed),
            );
            fence(Ordering::Acquire);
            let s2 = slot.seq.load(Ordering::Relaxed);
            if s1 == tail + 1 && s2 == s1 {
                if let Some(kind) = EventKind::from_u16(ev.1 as u16) {
                    out.push(Event {
                        ts_ns: ev.0,
                        ring,
                        kind,
                        a: ev.2,
                        b: ev.3,
                    });
                }
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            tail += 1;
        }
        self.tail.store(tail, Ordering::Relaxed);
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_and_counts_overwrites() {
        let r = EventRing::new(16);
        for i in 0..10 {
            r.record(EventKind::IpiSend, i, 0);
        }
        let mut out = Vec::new();
        assert_eq!(r.drain(0, &mut out), 0);
        assert_eq!(
            out.iter().map(|e| e.a).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        for i in 0..40 {
            r.record(EventKind::IpiHandle, i, 0);
        }
        out.clear();
        let dropped = r.drain(0, &mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(dropped, 24);
        assert_eq!(out[0].a, 24);
    }
}
