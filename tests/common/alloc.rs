//! A counting global allocator for the allocation-free-path tests. A test binary installs it
//! with `#[global_allocator]` and counts, from every thread, either every allocation
//! ([`Counting::EVERYWHERE`]) or the allocations *and frees* made by a thread that has irqs
//! soft-masked, i.e. in IPI context ([`Counting::IN_IPI_CONTEXT`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub struct Counting {
    irq_only: bool,
}

impl Counting {
    pub const EVERYWHERE: Counting = Counting { irq_only: false };
    pub const IN_IPI_CONTEXT: Counting = Counting { irq_only: true };

    #[inline]
    fn note(&self, size: usize, free: bool) {
        if !ARMED.load(Ordering::Relaxed) || (free && !self.irq_only) {
            return;
        }
        // `irqs_disabled` reads a const thread-local: it never allocates itself.
        if !self.irq_only || usmp::irqs_disabled() {
            COUNT.fetch_add(1, Ordering::SeqCst);
            LAST_SIZE.store(size, Ordering::Relaxed);
        }
    }
}

static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU64 = AtomicU64::new(0);
/// Size of the last counted allocation, for whoever debugs a failure.
pub static LAST_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Whether counting is on (a job may wait for it to end before it returns and frees).
pub fn armed() -> bool {
    ARMED.load(Ordering::SeqCst)
}

/// What the installed allocator counted while `f` ran.
pub fn counted_during(f: impl FnOnce()) -> u64 {
    COUNT.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    COUNT.load(Ordering::SeqCst)
}

// SAFETY: every method forwards to `System` unchanged; the counting only touches atomics and
// a const thread-local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        self.note(l.size(), false);
        // SAFETY: forwarded with the caller's contract.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        self.note(l.size(), false);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        self.note(new, false);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        self.note(l.size(), true);
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}
