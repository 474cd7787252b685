//! Who runs the stop: the first caller wins; a crash-stop arriving during a plain stop upgrades
//! it; nothing ever downgrades it.
//!
//! Protocol: one word with two bits, only ever set (never cleared within an image):
//! 1. A caller does `fetch_or(IN_PROGRESS | (crash ? CRASH : 0))`.
//! 2. If `IN_PROGRESS` was clear, it is the winner and runs the retry loop.
//! 3. Otherwise it lost; if it asked for a crash and `CRASH` was clear, it has upgraded the
//!    running stop: the winner reads `CRASH` before every attempt, so registers are saved from
//!    then on. A losing caller that is a logical CPU then parks itself; one outside the runtime
//!    gets `StopError::InProgress`.
//!
//! One RMW decides everything, so no interleaving can give two winners, lose an upgrade, or
//! deadlock (nobody waits in this step).

use crate::sync::{AtomicU32, Ordering};

const IN_PROGRESS: u32 = 1;
const CRASH: u32 = 2;

/// What `enter` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entered {
    /// Run the stop.
    Winner,
    /// Someone else runs it; `upgraded`: this call turned it into a crash-stop.
    Loser { upgraded: bool },
}

/// The coordination word.
pub(crate) struct Coord {
    word: AtomicU32,
}

impl Coord {
    pub(crate) fn new() -> Self {
        Coord {
            word: AtomicU32::new(0),
        }
    }

    /// Steps 1-3. Async-signal-safe.
    pub(crate) fn enter(&self, crash: bool) -> Entered {
        let add = IN_PROGRESS | if crash { CRASH } else { 0 };
        let prev = self.word.fetch_or(add, Ordering::AcqRel);
        if prev & IN_PROGRESS == 0 {
            Entered::Winner
        } else {
            Entered::Loser {
                upgraded: crash && prev & CRASH == 0,
            }
        }
    }

    /// Whether the stop is (by now) a crash-stop.
    pub(crate) fn is_crash(&self) -> bool {
        self.word.load(Ordering::Acquire) & CRASH != 0
    }

    /// Whether a stop has started in this image.
    pub(crate) fn in_progress(&self) -> bool {
        self.word.load(Ordering::Acquire) & IN_PROGRESS != 0
    }
}

#[cfg(all(test, loom))]
mod loom_coord {
    use super::*;
    use loom::sync::Arc;

    /// `send_stop` and `crash_stop` at the same instant: exactly one winner, and the stop ends
    /// as a crash whoever won (the crash caller either won or upgraded before it parked).
    #[test]
    fn loom_one_winner_and_crash_wins() {
        loom::model(|| {
            let c = Arc::new(Coord::new());
            let c2 = c.clone();
            let plain = loom::thread::spawn(move || c2.enter(false));
            let crash = c.enter(true);
            let plain = plain.join().unwrap();
            let winners = [plain, crash]
                .iter()
                .filter(|e| **e == Entered::Winner)
                .count();
            assert_eq!(winners, 1);
            assert!(c.is_crash());
            if crash != Entered::Winner {
                assert_eq!(crash, Entered::Loser { upgraded: true });
            }
            assert_eq!(plain == Entered::Winner, crash != Entered::Winner);
        });
    }
}
