//! `call_single_data`: a preallocated pool of csd slots, each holding one IPI callback inline.
//!
//! Why a pool and not a csd on the caller's stack (as the kernel does): a synchronous caller here
//! may give up after a timeout, and the kernel's rule "no csd memory is reused while still
//! linked" then forbids returning from a frame that owns a linked csd. A slot from the pool can
//! outlive the caller, so the caller can return an error. Slots are preallocated, so sending
//! and handling allocate nothing.
//!
//! Slot lifetime protocol (the kernel's `CSD_FLAG_LOCK`, made explicit). A slot has two
//! words: `claim`, which says who owns the closure, and `state`, the completion word a
//! synchronous sender waits on (and its futex word).
//! 1. `alloc` pops a free slot from a tagged Treiber stack (the tag defeats ABA). A free slot's
//!    stack link is its `next` word, the call-queue link: a slot is never in both.
//! 2. The sender writes the closure and sets the claim QUEUED. A synchronous call also sets
//!    `SYNC` in the claim, `refs` to 2 (the queue link and the waiting sender) and its state
//!    QUEUED; an async call has one owner at a time and writes neither, so it touches only the
//!    slot's first line. Publication is the queue push (Release).
//! 3. The handler swaps the claim to RUNNING. If it was QUEUED it moves the closure out and
//!    runs it. An async slot is then the handler's alone: it goes into the handler's private
//!    batch of freed slots (step 6). For a synchronous one it CASes the state QUEUED -> DONE
//!    (Release) and wakes a sleeping waiter: DONE hands the queue's reference to the waiter, so
//!    after that CAS the handler touches nothing of the slot but its `waiter` flag (a stale
//!    read there costs at most a spurious futex wake). The waiter, seeing DONE, owns both
//!    references and frees the slot itself. If the claim was CANCELLED the sender cancelled:
//!    the handler only drops the queue's reference.
//! 4. A waiting sender that times out CASes the claim QUEUED|SYNC -> CANCELLED: it then owns
//!    the closure and drops it itself (never in IPI context); the call never runs. If the claim
//!    is already RUNNING the call has started and cannot be cancelled: the sender CASes the
//!    state QUEUED -> ABANDONED and returns an error that says so; the handler's QUEUED -> DONE
//!    CAS then fails and it drops the queue's reference instead (if the sender finds DONE, the
//!    call finished after all and the sender owns the slot as in step 3).
//! 5. Each side drops its reference of a synchronous slot when done with it; whoever drops the
//!    last one frees the slot (a sender at once; the handler into its batch). So a slot is
//!    never reused while linked or while its closure may still be running.
//! 6. The handler frees the slots of one queue flush as a batch: it links each freed slot in
//!    front of a private chain (it owns them all, so plain stores), and when the flush is done
//!    splices the whole chain onto the free stack with one CAS (Release: everything it did with
//!    the slots before any sender pops one), and subtracts the batch from `in_use` once. So an
//!    async stream costs the shared free-stack line one transfer per flush, not per call. A
//!    freed slot waits in the batch until its flush ends or the batch holds 32 slots.
//!
//! Cache lines (the polling round trip is a handful of line transfers, so they are the cost):
//! a slot is two lines. The first holds what the handler takes over (link, claim, closure);
//! the second the completion word a synchronous sender spins on, which the handler writes
//! once (DONE), the synchronous call's bookkeeping (refs, which the handler also drops on a
//! cancel or an abandon, and waiter) and the event-log ids. Neither the handler's claim nor
//! its reads of the closure pull the line the sender is spinning on, and an async call (steps
//! 2, 3 and 6) touches the second line only for the event log.

use std::cell::UnsafeCell;
use std::mem::{align_of, size_of, MaybeUninit};

use crate::cpu::call_queue::{prefetch_write, Links, EMPTY};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Bytes of closure state a csd holds inline. A closure that captures more does not compile
/// (capture an `Arc` instead).
pub const CSD_INLINE_BYTES: usize = 48;

pub(crate) const FREE: u32 = 0;
pub(crate) const QUEUED: u32 = 1;
pub(crate) const RUNNING: u32 = 2;
pub(crate) const DONE: u32 = 3;
pub(crate) const CANCELLED: u32 = 4;
pub(crate) const ABANDONED: u32 = 5;
/// Claim flag: a synchronous sender waits for this call (step 3 hands it the slot with DONE).
const SYNC: u32 = 0x10;

/// What a timed-out synchronous sender found (step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The call had not started: it never runs, and its closure is dropped.
    Cancelled,
    /// The call is running and will finish without the sender; the handler frees the slot.
    Abandoned,
    /// The call finished meanwhile: the sender owns the slot, as after DONE.
    Done,
}

struct VTable {
    call: unsafe fn(*mut u8),
    drop: unsafe fn(*mut u8),
    /// The closure's type name, for "IPI on offline CPU" reports.
    name: fn() -> &'static str,
}

struct Holder<F>(F);

impl<F: FnOnce()> Holder<F> {
    const VTABLE: VTable = VTable {
        call: Self::call,
        drop: Self::drop,
        name: std::any::type_name::<F>,
    };

    /// # Safety
    /// `p` points at an initialised `F` that is not used again.
    unsafe fn call(p: *mut u8) {
        // SAFETY: per the contract the value is initialised and ownership moves out here.
        let f = unsafe { (p as *mut F).read() };
        f()
    }

    /// # Safety
    /// As for `call`.
    unsafe fn drop(p: *mut u8) {
        // SAFETY: per the contract the value is initialised and dropped exactly once here.
        unsafe { std::ptr::drop_in_place(p as *mut F) }
    }
}

/// One slot, two cache lines (see the module doc); aligned so no slot shares a line with
/// another.
#[repr(C, align(128))]
pub(crate) struct Csd {
    // First line: what the handler takes over.
    /// Call-queue link while linked; free-stack (or freed-batch) link while free.
    next: AtomicU32,
    /// QUEUED (| SYNC) / RUNNING / CANCELLED: who owns the closure.
    claim: AtomicU32,
    vtable: UnsafeCell<*const VTable>,
    storage: UnsafeCell<MaybeUninit<[u64; CSD_INLINE_BYTES / 8]>>,
    // Second line: completion, and the synchronous sender's own bookkeeping (an async call
    // leaves all of it alone, so its values mean something only while a sync call holds the
    // slot).
    /// QUEUED / DONE / ABANDONED; also the futex word a sync sender sleeps on.
    pub(crate) state: AtomicU32,
    /// 1 while a sync sender is asleep on `state`.
    pub(crate) waiter: AtomicU32,
    refs: AtomicU32,
    /// Sender CPU (or `events::NO_CPU`) and call id, for the event log.
    pub(crate) sender: AtomicU64,
    pub(crate) id: AtomicU64,
}

#[cfg(not(loom))]
const _: () = assert!(
    std::mem::offset_of!(Csd, state) == 64,
    "the csd's completion word must start its second cache line"
);

// SAFETY: vtable/storage are used by one party at a time: the owner before the push (which
// publishes them, Release), the handler after winning the claim, or the sender after
// winning QUEUED->CANCELLED; `name()` only reads the vtable, immutable while a ref is held.
unsafe impl Sync for Csd {}
// SAFETY: the closure stored inline is `Send` (enforced by `arm`).
unsafe impl Send for Csd {}

/// The pool. See the module protocol.
pub(crate) struct CsdPool {
    /// Read by every handler on every slot access.
    slots: Box<[Csd]>,
    /// The free stack and its count, on their own cache line: written by whoever allocates or
    /// frees (on a synchronous round trip: the sender only), so a handler's reads of `slots`
    /// above must not share a line with them.
    free: crossbeam_utils::CachePadded<FreeStack>,
}

struct FreeStack {
    /// (tag << 32) | index of the first free slot.
    head: AtomicU64,
    in_use: AtomicU64,
}

impl Links for CsdPool {
    fn next(&self, idx: u32) -> &AtomicU32 {
        &self.slots[idx as usize].next
    }
}

impl CsdPool {
    pub(crate) fn new(n: usize) -> Self {
        let n = n.clamp(1, (u32::MAX - 2) as usize);
        let slots: Box<[Csd]> = (0..n)
            .map(|i| Csd {
                next: AtomicU32::new(if i + 1 < n { i as u32 + 1 } else { EMPTY }),
                state: AtomicU32::new(FREE),
                waiter: AtomicU32::new(0),
                refs: AtomicU32::new(0),
                claim: AtomicU32::new(FREE),
                sender: AtomicU64::new(0),
                id: AtomicU64::new(0),
                vtable: UnsafeCell::new(std::ptr::null()),
                storage: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Self {
            slots,
            free: crossbeam_utils::CachePadded::new(FreeStack {
                head: AtomicU64::new(0),
                in_use: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots currently allocated (linked, running or awaited).
    pub(crate) fn in_use(&self) -> u64 {
        self.free.in_use.load(Ordering::Relaxed)
    }

    pub(crate) fn slot(&self, idx: u32) -> &Csd {
        &self.slots[idx as usize]
    }

    /// Step 1. Async-signal-safe.
    pub(crate) fn alloc(&self) -> Option<u32> {
        let mut cur = self.free.head.load(Ordering::Acquire);
        loop {
            let idx = cur as u32;
            if idx == EMPTY {
                return None;
            }
            // Racy if another thread pops this slot meanwhile (and queues it, rewriting the
            // link): then the head's tag has moved on and the CAS below fails. The caller
            // writes this line next (`arm`): fetch it for writing, not shared then again.
            let link = &self.slots[idx as usize].next;
            prefetch_write(link);
            let next = link.load(Ordering::Relaxed);
            let tag = (cur >> 32).wrapping_add(1);
            match self.free.head.compare_exchange_weak(
                cur,
                (tag << 32) | next as u64,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // The next alloc most likely pops `next`: start fetching its line now.
                    if next != EMPTY {
                        prefetch_write(&self.slots[next as usize].next);
                    }
                    self.free.in_use.fetch_add(1, Ordering::Relaxed);
                    return Some(idx);
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Frees one slot the caller owns (a sender: steps 3 to 5).
    fn free(&self, idx: u32) {
        self.free.in_use.fetch_sub(1, Ordering::Relaxed);
        self.splice(idx, idx);
    }

    /// Pushes the chain `first ..= last`, linked through `next` and owned by the caller, onto
    /// the free stack with one CAS (step 6). Async-signal-safe.
    fn splice(&self, first: u32, last: u32) {
        let tail = &self.slots[last as usize].next;
        let mut cur = self.free.head.load(Ordering::Relaxed);
        loop {
            tail.store(cur as u32, Ordering::Relaxed);
            let tag = (cur >> 32).wrapping_add(1);
            // Release: the chain's links, and everything done with its slots, before a popper
            // (Acquire) can take one.
            match self.free.head.compare_exchange_weak(
                cur,
                (tag << 32) | first as u64,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(c) => cur = c,
            }
        }
    }

    /// An empty batch of slots freed by a handler (step 6); dropping it returns them.
    pub(crate) fn batch(&self) -> FreedBatch<'_> {
        FreedBatch {
            pool: self,
            first: EMPTY,
            last: EMPTY,
            n: 0,
        }
    }

    /// Step 2. Stores `f` in slot `idx`, which the caller owns (fresh from `alloc`).
    pub(crate) fn arm<F: FnOnce() + Send + 'static>(&self, idx: u32, f: F, sync: bool) {
        const {
            assert!(
                size_of::<F>() <= CSD_INLINE_BYTES && align_of::<F>() <= 8,
                "IPI closure too large for a csd: capture an Arc or a &'static instead"
            )
        };
        let s = &self.slots[idx as usize];
        // SAFETY: the caller owns the slot (step 1): no other thread touches vtable/storage
        // until the push publishes it. F fits (checked above).
        unsafe {
            (s.storage.get() as *mut F).write(f);
            *s.vtable.get() = &Holder::<F>::VTABLE;
        }
        if sync {
            s.waiter.store(0, Ordering::Relaxed);
            s.refs.store(2, Ordering::Relaxed);
            s.state.store(QUEUED, Ordering::Relaxed);
            s.claim.store(QUEUED | SYNC, Ordering::Relaxed);
        } else {
            // Nothing on the second line (step 2).
            s.claim.store(QUEUED, Ordering::Relaxed);
        }
    }

    /// Undoes `arm` on a slot that was never published (the push failed): drops the closure in
    /// the caller's context and frees the slot.
    pub(crate) fn disarm_unpublished(&self, idx: u32) {
        let s = &self.slots[idx as usize];
        // SAFETY: the push failed, so the caller still owns the slot exclusively.
        unsafe { ((**s.vtable.get()).drop)(s.storage.get() as *mut u8) };
        self.free(idx);
    }

    /// The queued callback's type name. Only for a slot the caller holds a reference to.
    pub(crate) fn name(&self, idx: u32) -> &'static str {
        let s = &self.slots[idx as usize];
        // SAFETY: the vtable pointer was written before the slot was published and is not
        // changed until the slot is freed, which the caller's reference prevents.
        unsafe { ((**s.vtable.get()).name)() }
    }

    /// Step 3, on the handling CPU. Runs the callback unless cancelled; returns whether it ran.
    /// A slot the handler ends up owning goes into `freed` (step 6). Async-signal-safe as far
    /// as the callback itself is.
    pub(crate) fn run(&self, idx: u32, freed: &mut FreedBatch<'_>) -> bool {
        let s = &self.slots[idx as usize];
        // An RMW, so exactly one of this and the sender's cancel CAS wins.
        let claim = s.claim.swap(RUNNING, Ordering::AcqRel);
        if claim & !SYNC != QUEUED {
            // CANCELLED: the sender dropped the closure and its reference.
            self.put_into(idx, freed);
            return false;
        }
        // SAFETY: winning the claim gives this thread exclusive use of the closure, published
        // by the sender before the push (see the `Sync` impl).
        unsafe { ((**s.vtable.get()).call)(s.storage.get() as *mut u8) };
        if claim & SYNC == 0 {
            // Async: the queue's link was the only owner, and that is us now.
            freed.push(idx);
            return true;
        }
        // The callback's effects before DONE (Release); SeqCst so that this RMW and the
        // `waiter` load below cannot both miss the waiter's SeqCst store-then-load. Success
        // hands the queue's reference to the waiter (step 3).
        if s.state
            .compare_exchange(QUEUED, DONE, Ordering::SeqCst, Ordering::Acquire)
            .is_ok()
        {
            // The waiter may already have freed (even reused) the slot: a stale 1 here only
            // wakes a futex waiter spuriously, and every waiter re-checks its word.
            #[cfg(not(loom))]
            if s.waiter.load(Ordering::SeqCst) != 0 {
                crate::cpu::futex::wake(&s.state, 1);
            }
        } else {
            // ABANDONED: the sender gave up and dropped its reference (step 4).
            self.put_into(idx, freed);
        }
        true
    }

    /// Step 3, by the synchronous sender that saw DONE: it owns both references now.
    pub(crate) fn complete(&self, idx: u32) {
        self.free.in_use.fetch_sub(1, Ordering::Relaxed);
        self.splice(idx, idx);
    }

    /// Step 4 in full, by a synchronous sender that timed out: cancel the call if it has not
    /// started, else abandon it, else (it finished meanwhile) take the slot back. In every
    /// case the sender is done with the slot afterwards.
    pub(crate) fn give_up(&self, idx: u32) -> GiveUp {
        if self.cancel(idx) {
            self.put(idx);
            return GiveUp::Cancelled;
        }
        let s = &self.slots[idx as usize];
        match s
            .state
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                self.put(idx);
                GiveUp::Abandoned
            }
            Err(_) => {
                // DONE: the only other state a queued, uncancelled sync slot can reach.
                self.complete(idx);
                GiveUp::Done
            }
        }
    }

    /// Step 4, by a waiting sender that gave up. Returns true if the call was cancelled before
    /// it started (the closure is dropped here), false if it is already running or done.
    fn cancel(&self, idx: u32) -> bool {
        let s = &self.slots[idx as usize];
        if s.claim
            .compare_exchange(
                QUEUED | SYNC,
                CANCELLED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            // SAFETY: winning QUEUED -> CANCELLED gives the sender back exclusive use of the
            // closure; the handler will see CANCELLED and not touch it.
            unsafe { ((**s.vtable.get()).drop)(s.storage.get() as *mut u8) };
            true
        } else {
            false
        }
    }

    /// Step 5, by a sender: drops its reference to a synchronous slot; the last one frees it.
    fn put(&self, idx: u32) {
        if self.slots[idx as usize].refs.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.free(idx);
        }
    }

    /// Step 5, by the handler: as `put`, but the last reference frees into its batch.
    /// Async-signal-safe.
    fn put_into(&self, idx: u32, freed: &mut FreedBatch<'_>) {
        if self.slots[idx as usize].refs.fetch_sub(1, Ordering::AcqRel) == 1 {
            freed.push(idx);
        }
    }
}

/// Most slots a handler holds freed before it splices them back (step 6): a long flush returns
/// slots as it goes, so senders waiting for the pool are not held up until it ends.
const BATCH_MAX: u64 = 32;

/// Slots a handler has freed during one queue flush, linked privately until it drops the
/// batch or holds `BATCH_MAX` of them (step 6). Async-signal-safe: no allocation, one CAS per
/// splice.
pub(crate) struct FreedBatch<'a> {
    pool: &'a CsdPool,
    first: u32,
    last: u32,
    n: u64,
}

impl FreedBatch<'_> {
    /// Adds a slot the handler owns outright (no queue link, no other reference).
    fn push(&mut self, idx: u32) {
        // Only this handler knows of the slot now: a Relaxed link, published by the splice.
        self.pool.slots[idx as usize]
            .next
            .store(self.first, Ordering::Relaxed);
        if self.first == EMPTY {
            self.last = idx;
        }
        self.first = idx;
        self.n += 1;
        if self.n == BATCH_MAX {
            self.splice();
        }
    }

    /// Returns the held slots (at least one) to the free stack.
    fn splice(&mut self) {
        self.pool.free.in_use.fetch_sub(self.n, Ordering::Relaxed);
        self.pool.splice(self.first, self.last);
        self.first = EMPTY;
        self.last = EMPTY;
        self.n = 0;
    }
}

impl Drop for FreedBatch<'_> {
    fn drop(&mut self) {
        if self.n != 0 {
            self.splice();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Pops every free slot; they must be distinct.
    fn drain(p: &CsdPool) -> Vec<u32> {
        let mut v: Vec<u32> = std::iter::from_fn(|| p.alloc()).collect();
        v.sort_unstable();
        let n = v.len();
        v.dedup();
        assert_eq!(v.len(), n, "a slot was on the free stack twice");
        v
    }

    #[test]
    fn run_then_release_frees_the_slot() {
        let p = CsdPool::new(2);
        let hits = Arc::new(AtomicUsize::new(0));
        let a = p.alloc().unwrap();
        let h = hits.clone();
        p.arm(
            a,
            move || {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
            true,
        );
        assert!(p.run(a, &mut p.batch()));
        assert_eq!(p.slot(a).state.load(Ordering::Acquire), DONE);
        assert_eq!(p.in_use(), 1, "DONE hands the slot to the waiter");
        p.complete(a);
        assert_eq!(p.in_use(), 0);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn cancelled_call_never_runs_and_drops_its_closure_once() {
        let p = CsdPool::new(1);
        let token = Arc::new(());
        let a = p.alloc().unwrap();
        let t = token.clone();
        p.arm(a, move || drop(t), true);
        assert!(p.cancel(a));
        assert_eq!(
            Arc::strong_count(&token),
            1,
            "closure dropped by the canceller"
        );
        p.put(a); // sender's reference
        assert!(!p.run(a, &mut p.batch()), "a cancelled call must not run");
        assert_eq!(p.in_use(), 0);
        assert!(p.alloc().is_some());
    }

    #[test]
    fn exhaustion_is_reported() {
        let p = CsdPool::new(2);
        let (a, b) = (p.alloc().unwrap(), p.alloc().unwrap());
        assert!(p.alloc().is_none());
        p.arm(a, || {}, false);
        p.disarm_unpublished(a);
        assert_eq!(p.alloc(), Some(a));
        let _ = b;
    }

    /// Step 6: async slots freed by a flush come back, each exactly once, when the batch is
    /// dropped, and not before.
    #[test]
    fn a_flush_returns_its_async_slots_in_one_batch() {
        let p = CsdPool::new(4);
        let hits = Arc::new(AtomicUsize::new(0));
        let slots: Vec<u32> = (0..3).map(|_| p.alloc().unwrap()).collect();
        for &i in &slots {
            let h = hits.clone();
            p.arm(
                i,
                move || {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                },
                false,
            );
        }
        {
            let mut freed = p.batch();
            for &i in &slots {
                assert!(p.run(i, &mut freed));
            }
            assert_eq!(p.in_use(), 3, "held by the batch until it is dropped");
            let last = p.alloc().expect("the never-used slot");
            assert!(p.alloc().is_none());
            p.arm(last, || {}, false);
            p.disarm_unpublished(last);
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(p.in_use(), 0);
        assert_eq!(drain(&p), [0, 1, 2, 3]);
    }
}

#[cfg(all(test, loom))]
mod loom_csd {
    use super::*;
    use loom::sync::Arc;

    /// A sender's timeout racing the handler: the waiter either sees DONE and frees the slot
    /// itself, or gives up (cancel, abandon, or finds DONE after all). The call runs at most
    /// once, the sender's verdict matches what happened, and the slot is freed exactly once
    /// (by the handler after a cancel or an abandon, by the sender after DONE).
    #[test]
    fn loom_cancel_races_run() {
        loom::model(|| {
            let p = Arc::new(CsdPool::new(1));
            let ran = Arc::new(AtomicU32::new(0));
            let idx = p.alloc().unwrap();
            let r = ran.clone();
            p.arm(
                idx,
                move || {
                    r.fetch_add(1, Ordering::SeqCst);
                },
                true,
            );
            let p2 = p.clone();
            let handler = loom::thread::spawn(move || p2.run(idx, &mut p2.batch()));
            let verdict = if p.slot(idx).state.load(Ordering::Acquire) == DONE {
                p.complete(idx);
                GiveUp::Done
            } else {
                p.give_up(idx)
            };
            let did_run = handler.join().unwrap();
            assert_eq!(did_run, verdict != GiveUp::Cancelled);
            assert_eq!(ran.load(Ordering::SeqCst), did_run as u32);
            assert_eq!(p.in_use(), 0);
            assert!(p.alloc().is_some());
        });
    }

    /// An async call: the handler frees the slot after running it.
    #[test]
    fn loom_async_run_frees() {
        loom::model(|| {
            let p = Arc::new(CsdPool::new(1));
            let idx = p.alloc().unwrap();
            p.arm(idx, || {}, false);
            let p2 = p.clone();
            let handler = loom::thread::spawn(move || p2.run(idx, &mut p2.batch()));
            assert!(handler.join().unwrap());
            assert_eq!(p.in_use(), 0);
            assert!(p.alloc().is_some());
        });
    }

    /// Step 6 against a sender using the free stack at the same time: the handler runs two
    /// async calls and splices both slots back in one CAS while the sender pops the third
    /// slot, and frees it again. Afterwards every slot is free exactly once: none lost by the
    /// splice, none handed out twice, and each call ran once.
    #[test]
    fn loom_batch_splice_races_alloc_and_free() {
        loom::model(|| {
            let p = Arc::new(CsdPool::new(3));
            let ran = Arc::new(AtomicU32::new(0));
            let (a, b) = (p.alloc().unwrap(), p.alloc().unwrap());
            for i in [a, b] {
                let r = ran.clone();
                p.arm(
                    i,
                    move || {
                        r.fetch_add(1, Ordering::Relaxed);
                    },
                    false,
                );
            }
            let p2 = p.clone();
            let handler = loom::thread::spawn(move || {
                let mut freed = p2.batch();
                p2.run(a, &mut freed) && p2.run(b, &mut freed)
            });
            // The sender: takes whatever is free (the third slot, or one just spliced back)
            // and returns it unpublished, as a failed push does.
            if let Some(c) = p.alloc() {
                assert!((c != a && c != b) || ran.load(Ordering::Relaxed) == 2);
                p.arm(c, || {}, false);
                p.disarm_unpublished(c);
            }
            assert!(handler.join().unwrap());
            assert_eq!(ran.load(Ordering::Relaxed), 2);
            assert_eq!(p.in_use(), 0);
            let mut got = [p.alloc(), p.alloc(), p.alloc()].map(|x| x.expect("a slot was lost"));
            got.sort_unstable();
            assert_eq!(got, [0, 1, 2], "a slot was handed out twice");
            assert!(p.alloc().is_none(), "a slot is on the free stack twice");
        });
    }
}
