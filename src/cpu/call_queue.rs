//! The per-CPU call queue: a lock-free multi-producer list of csd slot indices (the kernel's
//! `call_single_queue` llist), with one addition: it can be *closed*.
//!
//! Protocol:
//! 1. `push` links a slot in front of `head` with a CAS (AcqRel). If `head` is `CLOSED` the push
//!    fails and the caller owns the slot again: the sender gets an "offline" error.
//! 2. `take_all` (the IPI handler, the idle poller, `irq_restore`) swaps the whole list out,
//!    leaving `EMPTY`, and reverses it into arrival order. It never turns `CLOSED` into `EMPTY`.
//! 3. `close` (the dying CPU's flush, seed 002) swaps in `CLOSED` and returns what was queued.
//!    Because push and close are RMWs on the same word, every push is ordered before the close
//!    (and is in the returned list, so it is run exactly once) or after it (and fails). A sender
//!    that raced with `cpu_down` can therefore never leave a callback behind.
//! 4. `reopen` (bring-up) moves `CLOSED` back to `EMPTY`.
//!
//! Only push and take-all exist, so the list has no ABA problem (no single-node pop).

use crate::sync::{AtomicU32, Ordering};

/// End of list / empty queue.
pub(crate) const EMPTY: u32 = u32::MAX;
/// The queue of a CPU that is offline: pushes fail.
pub(crate) const CLOSED: u32 = u32::MAX - 1;

/// Where a slot keeps its `next` link.
pub(crate) trait Links {
    fn next(&self, idx: u32) -> &AtomicU32;
}

/// The push was refused because the queue is closed (its CPU is offline or dying).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

/// See the module protocol.
pub(crate) struct CallQueue {
    head: AtomicU32,
}

impl CallQueue {
    /// A closed queue (a CPU starts offline).
    pub(crate) fn new_closed() -> Self {
        Self {
            head: AtomicU32::new(CLOSED),
        }
    }

    /// An open, empty queue.
    #[cfg(any(test, loom))]
    pub(crate) fn new_open() -> Self {
        Self {
            head: AtomicU32::new(EMPTY),
        }
    }

    /// Step 1. Returns whether the queue was empty before the push. Async-signal-safe.
    pub(crate) fn push(&self, idx: u32, links: &impl Links) -> Result<bool, Closed> {
        // First guess EMPTY instead of loading `head`: the line is usually in the target CPU's
        // cache, and a load then a CAS would fetch it twice (shared, then exclusive).
        let mut h = EMPTY;
        loop {
            if h == CLOSED {
                return Err(Closed);
            }
            links.next(idx).store(h, Ordering::Relaxed);
            // Release: the slot's contents (closure, state) before the link that publishes it.
            match self
                .head
                .compare_exchange_weak(h, idx, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(h == EMPTY),
                Err(cur) => h = cur,
            }
        }
    }

    /// Step 2. Takes everything queued, oldest first; `EMPTY` if nothing. Async-signal-safe.
    pub(crate) fn take_all(&self, links: &impl Links) -> u32 {
        let mut h = self.head.load(Ordering::Relaxed);
        loop {
            if h == EMPTY || h == CLOSED {
                return EMPTY;
            }
            // The newest slot's link is written next (`reverse`): fetch it during the CAS.
            prefetch_write(links.next(h));
            // Acquire: pairs with the Release of each push, so the slots' contents are visible.
            match self
                .head
                .compare_exchange_weak(h, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return reverse(h, links),
                Err(cur) => h = cur,
            }
        }
    }

    /// Step 3. Closes the queue and returns what was queued, oldest first.
    pub(crate) fn close(&self, links: &impl Links) -> u32 {
        let h = self.head.swap(CLOSED, Ordering::AcqRel);
        if h == EMPTY || h == CLOSED {
            EMPTY
        } else {
            reverse(h, links)
        }
    }

    /// Step 4. Reopens a closed queue; returns false if it was not closed.
    pub(crate) fn reopen(&self) -> bool {
        self.head
            .compare_exchange(CLOSED, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether anything is queued. An RMW read (not a plain load): the idle CPU's last check
    /// before sleeping must be ordered against the sender's push (see `cpu::idle`).
    pub(crate) fn has_work(&self) -> bool {
        let h = self.head.fetch_or(0, Ordering::AcqRel);
        h != EMPTY && h != CLOSED
    }

    /// A cheap, unordered peek for poll loops.
    pub(crate) fn peek(&self) -> bool {
        let h = self.head.load(Ordering::Relaxed);
        h != EMPTY && h != CLOSED
    }

    /// The queue's state, for a diagnostic.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.head.load(Ordering::Acquire) {
            EMPTY => "empty",
            CLOSED => "closed",
            _ => "holds calls",
        }
    }

    /// Whether the queue is closed.
    #[cfg(any(test, loom))]
    pub(crate) fn is_closed(&self) -> bool {
        self.head.load(Ordering::Acquire) == CLOSED
    }
}

/// Asks the CPU to start fetching `p`'s cache line for writing, without waiting for it (a
/// hint: it reads and writes no memory). The call path uses it to overlap two line transfers
/// that would otherwise be back to back: a locked instruction waits for every earlier store's
/// line, so the sender's closure write and its push CAS, and the CPU's take CAS and its write
/// to the slot, each cost two transfers in a row.
#[inline(always)]
pub(crate) fn prefetch_write<T>(p: &T) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: PREFETCHW is a hint: it cannot fault and changes no memory; `p` is a valid
    // reference anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_ET0 }>(
            p as *const T as *const i8,
        )
    };
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = p;
}

/// Reverses a taken LIFO chain in place into arrival order. The caller owns the chain.
fn reverse(mut h: u32, links: &impl Links) -> u32 {
    let mut prev = EMPTY;
    while h != EMPTY {
        let next = links.next(h).load(Ordering::Relaxed);
        links.next(h).store(prev, Ordering::Relaxed);
        prev = h;
        h = next;
    }
    prev
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct Arr(Vec<AtomicU32>);
    impl Links for Arr {
        fn next(&self, idx: u32) -> &AtomicU32 {
            &self.0[idx as usize]
        }
    }

    fn collect(mut h: u32, l: &Arr) -> Vec<u32> {
        let mut v = vec![];
        while h != EMPTY {
            v.push(h);
            h = l.next(h).load(Ordering::Relaxed);
        }
        v
    }

    #[test]
    fn fifo_close_and_reopen() {
        let l = Arr((0..8).map(|_| AtomicU32::new(EMPTY)).collect());
        let q = CallQueue::new_open();
        assert_eq!(q.push(3, &l), Ok(true));
        assert_eq!(q.push(5, &l), Ok(false));
        assert!(q.has_work());
        assert_eq!(collect(q.take_all(&l), &l), vec![3, 5]);
        assert!(!q.has_work());
        q.push(1, &l).unwrap();
        assert_eq!(collect(q.close(&l), &l), vec![1]);
        assert_eq!(q.push(2, &l), Err(Closed));
        assert_eq!(q.take_all(&l), EMPTY);
        assert!(q.is_closed());
        assert!(q.reopen());
        assert_eq!(q.push(2, &l), Ok(true));
    }
}

#[cfg(all(test, loom))]
mod loom_queue {
    use super::*;
    use loom::sync::Arc;

    struct Arr(Vec<AtomicU32>);
    impl Links for Arr {
        fn next(&self, idx: u32) -> &AtomicU32 {
            &self.0[idx as usize]
        }
    }

    /// Seed 002: the dying CPU's flush (close) racing two senders. Every push either fails or
    /// is in exactly one of the drained lists; nothing is left behind in a closed queue.
    #[test]
    fn loom_dying_flush_races_senders() {
        loom::model(|| {
            let l = Arc::new(Arr((0..2).map(|_| AtomicU32::new(EMPTY)).collect()));
            let q = Arc::new(CallQueue::new_open());
            let senders: Vec<_> = (0..2u32)
                .map(|i| {
                    let (l, q) = (l.clone(), q.clone());
                    loom::thread::spawn(move || q.push(i, &*l).is_ok())
                })
                .collect();
            // The CPU: one ordinary drain (a late doorbell), then the dying flush.
            let mut seen = vec![];
            for h in [q.take_all(&*l), q.close(&*l)] {
                let mut h = h;
                while h != EMPTY {
                    seen.push(h);
                    h = l.next(h).load(Ordering::Relaxed);
                }
            }
            let ok: Vec<bool> = senders.into_iter().map(|t| t.join().unwrap()).collect();
            for i in 0..2u32 {
                let n = seen.iter().filter(|&&s| s == i).count();
                assert_eq!(
                    n, ok[i as usize] as usize,
                    "slot {i}: accepted={} ran {n} times",
                    ok[i as usize]
                );
            }
            assert!(q.is_closed());
        });
    }
}
