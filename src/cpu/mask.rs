//! `CpuMask`: a bitset of logical CPU ids of any width, with the kernel's list format
//! (`%*pbl`: "0-3,7") both ways, and `AtomicCpuMask` for the runtime's possible / present /
//! online / active masks, which CPUs and controllers update concurrently.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A logical CPU id.
pub type CpuId = usize;

const WORD: usize = 64;

/// A set of logical CPUs. Any width; grows when a bit beyond its end is set.
#[derive(Clone, Default)]
pub struct CpuMask {
    words: Vec<u64>,
}

/// Why a cpulist string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// A piece was not a number or a range.
    #[error("bad cpulist element {0:?} (expected N or N-M)")]
    BadElement(String),
    /// A range ran backwards.
    #[error("bad cpulist range {0}-{1}: start is past end")]
    Backwards(usize, usize),
    /// A CPU id is past the limit given to `parse_bounded`.
    #[error("CPU {cpu} is out of range (limit {limit})")]
    OutOfRange {
        /// The CPU id found in the list.
        cpu: usize,
        /// The limit: every id must be below it.
        limit: usize,
    },
    /// The list has more than `MAX_LIST_PARTS` elements.
    #[error("cpulist has more than {limit} elements")]
    TooManyParts {
        /// The most elements a list may have (`MAX_LIST_PARTS`).
        limit: usize,
    },
}

impl CpuMask {
    /// An empty mask.
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs `0..n`.
    pub fn first_n(n: usize) -> Self {
        let mut m = Self::new();
        for c in 0..n {
            m.set(c);
        }
        m
    }

    /// A mask holding one CPU.
    pub fn single(cpu: CpuId) -> Self {
        let mut m = Self::new();
        m.set(cpu);
        m
    }

    /// Adds `cpu`.
    pub fn set(&mut self, cpu: CpuId) {
        let w = cpu / WORD;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (cpu % WORD);
    }

    /// Removes `cpu`.
    pub fn clear(&mut self, cpu: CpuId) {
        if let Some(w) = self.words.get_mut(cpu / WORD) {
            *w &= !(1 << (cpu % WORD));
        }
    }

    /// Whether `cpu` is in the mask.
    pub fn contains(&self, cpu: CpuId) -> bool {
        self.words
            .get(cpu / WORD)
            .is_some_and(|w| w & (1 << (cpu % WORD)) != 0)
    }

    /// Number of CPUs in the mask.
    pub fn weight(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the mask is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The lowest CPU in the mask.
    pub fn first(&self) -> Option<CpuId> {
        self.iter().next()
    }

    /// One past the highest CPU in the mask (0 when empty).
    pub fn end(&self) -> usize {
        self.iter().last().map_or(0, |c| c + 1)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = CpuId> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * WORD + b)
            })
        })
    }

    /// `self & other`.
    pub fn and(&self, other: &CpuMask) -> CpuMask {
        let n = self.words.len().min(other.words.len());
        CpuMask {
            words: (0..n).map(|i| self.words[i] & other.words[i]).collect(),
        }
    }

    /// `self & !other`.
    pub fn and_not(&self, other: &CpuMask) -> CpuMask {
        CpuMask {
            words: (0..self.words.len())
                .map(|i| self.words[i] & !other.words.get(i).copied().unwrap_or(0))
                .collect(),
        }
    }

    /// `self | other`.
    pub fn or(&self, other: &CpuMask) -> CpuMask {
        let n = self.words.len().max(other.words.len());
        let get = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
        CpuMask {
            words: (0..n)
                .map(|i| get(&self.words, i) | get(&other.words, i))
                .collect(),
        }
    }

    /// Parses a cpulist and rejects any CPU id `>= limit`.
    /// The list format for people: as `Display`, but "(none)" for the empty mask, so a
    /// message never reads "lost: " or "remaining  in".
    pub fn to_list_or_none(&self) -> String {
        if self.is_empty() {
            "(none)".into()
        } else {
            self.to_string()
        }
    }

    /// Checks each element against the limit as it is read, so a list of huge ranges is
    /// refused before any of it is applied.
    pub fn parse_bounded(s: &str, limit: usize) -> Result<CpuMask, CpuListError> {
        match limit.checked_sub(1) {
            Some(max_id) => parse_list(s, max_id.min(MAX_LIST_ID)),
            None => match parse_list(s, MAX_LIST_ID)?.first() {
                Some(cpu) => Err(CpuListError::OutOfRange { cpu, limit }),
                None => Ok(CpuMask::new()),
            },
        }
    }
}

/// Masks are equal when they hold the same CPUs, whatever their allocated width.
impl PartialEq for CpuMask {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for CpuMask {}

impl FromIterator<CpuId> for CpuMask {
    fn from_iter<I: IntoIterator<Item = CpuId>>(iter: I) -> Self {
        let mut m = CpuMask::new();
        for c in iter {
            m.set(c);
        }
        m
    }
}

/// The kernel's `%*pbl` format: ascending ranges, "0-3,7"; empty prints as "".
impl fmt::Display for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut it = self.iter().peekable();
        let mut first = true;
        while let Some(start) = it.next() {
            let mut end = start;
            while it.peek() == Some(&(end + 1)) {
                end = it.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuMask({self})")
    }
}

/// Serialized as its kernel list string ("0-3,7"; empty is ""), the form the CLI's `--json`
/// output and the reports use.
impl serde::Serialize for CpuMask {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses the kernel's cpulist format ("0-3,7", whitespace around elements allowed, "" = empty).
///
/// Time is linear in the text plus the mask's width: the ranges are collected first (at most
/// `MAX_LIST_PARTS` of them), then applied a word at a time, so a hostile list such as many
/// copies of "0-1048575" costs no more than reading it.
impl FromStr for CpuMask {
    type Err = CpuListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s, MAX_LIST_ID)
    }
}

/// Largest CPU id a cpulist may name: refuses absurd widths instead of allocating gigabytes for
/// "0-999999999999".
const MAX_LIST_ID: usize = (1 << 20) - 1;

/// Most elements a cpulist may have. A canonical list of [`crate::MAX_CPUS`] CPUs has at most
/// half that many; anything longer is not a list a person or this crate wrote.
pub const MAX_LIST_PARTS: usize = 4096;

/// The parser behind `FromStr` and `parse_bounded`: every id must be `<= max_id`.
fn parse_list(s: &str, max_id: usize) -> Result<CpuMask, CpuListError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(CpuMask::new());
    }
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for part in s.split(',') {
        if ranges.len() == MAX_LIST_PARTS {
            return Err(CpuListError::TooManyParts {
                limit: MAX_LIST_PARTS,
            });
        }
        let part = part.trim();
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| CpuListError::BadElement(part.to_string()))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let a = num(part)?;
                (a, a)
            }
        };
        if a > b {
            return Err(CpuListError::Backwards(a, b));
        }
        if b > max_id {
            return Err(CpuListError::OutOfRange {
                cpu: b,
                limit: max_id + 1,
            });
        }
        ranges.push((a, b));
    }
    // Whole words inside a range are counted in a difference array (one increment and one
    // decrement per range), partial words at its ends are set directly: O(parts + words).
    let end = ranges.iter().map(|&(_, b)| b).max().unwrap_or(0);
    let nwords = end / WORD + 1;
    let mut words = vec![0u64; nwords];
    let mut cover = vec![0i32; nwords + 1];
    for &(a, b) in &ranges {
        let (wa, wb) = (a / WORD, b / WORD);
        let lo = u64::MAX << (a % WORD);
        let hi = u64::MAX >> (WORD - 1 - b % WORD);
        if wa == wb {
            words[wa] |= lo & hi;
            continue;
        }
        words[wa] |= lo;
        words[wb] |= hi;
        cover[wa + 1] += 1;
        cover[wb] -= 1;
    }
    let mut depth = 0i32;
    for (w, d) in words.iter_mut().zip(&cover) {
        depth += d;
        if depth > 0 {
            *w = u64::MAX;
        }
    }
    Ok(CpuMask { words })
}

/// A fixed-width mask whose bits are set and cleared with atomics, for the runtime's global
/// masks. Readers take a snapshot with [`AtomicCpuMask::load`]; a snapshot of more than 64 CPUs
/// is not atomic as a whole (like the kernel's cpumasks), each word is.
pub struct AtomicCpuMask {
    words: Box<[AtomicU64]>,
    width: usize,
}

impl std::fmt::Debug for AtomicCpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AtomicCpuMask").field(&self.load()).finish()
    }
}

impl AtomicCpuMask {
    /// An empty mask able to hold CPUs `0..width`.
    pub fn new(width: usize) -> Self {
        Self {
            words: (0..width.div_ceil(WORD))
                .map(|_| AtomicU64::new(0))
                .collect(),
            width,
        }
    }

    /// Sets `cpu`; returns whether it was already set.
    pub fn set(&self, cpu: CpuId) -> bool {
        debug_assert!(cpu < self.width);
        self.words[cpu / WORD].fetch_or(1 << (cpu % WORD), Ordering::SeqCst) & (1 << (cpu % WORD))
            != 0
    }

    /// Clears `cpu`; returns whether it was set.
    pub fn clear(&self, cpu: CpuId) -> bool {
        debug_assert!(cpu < self.width);
        self.words[cpu / WORD].fetch_and(!(1 << (cpu % WORD)), Ordering::SeqCst)
            & (1 << (cpu % WORD))
            != 0
    }

    /// Whether `cpu` is set (false when out of range).
    pub fn contains(&self, cpu: CpuId) -> bool {
        cpu < self.width && self.words[cpu / WORD].load(Ordering::SeqCst) & (1 << (cpu % WORD)) != 0
    }

    /// A snapshot.
    pub fn load(&self) -> CpuMask {
        CpuMask {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::SeqCst))
                .collect(),
        }
    }

    /// Number of CPUs set.
    pub fn weight(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::SeqCst).count_ones() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn list_format_round_trips() {
        let m: CpuMask = "0-3,7, 9-10".parse().unwrap();
        assert_eq!(m.to_string(), "0-3,7,9-10");
        assert_eq!(m.weight(), 7);
        assert!(m.contains(7) && !m.contains(8));
        assert_eq!("".parse::<CpuMask>().unwrap().to_string(), "");
        assert_eq!(CpuMask::single(200).to_string(), "200");
        assert_eq!(CpuMask::new().to_list_or_none(), "(none)");
        assert_eq!(m.to_list_or_none(), "0-3,7,9-10");
    }

    #[test]
    fn serializes_as_the_list_string() {
        let m: CpuMask = "0-3,7".parse().unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), r#""0-3,7""#);
        assert_eq!(serde_json::to_string(&CpuMask::new()).unwrap(), r#""""#);
    }

    #[test]
    fn bad_lists_are_rejected() {
        assert!(matches!(
            "3-1".parse::<CpuMask>(),
            Err(CpuListError::Backwards(3, 1))
        ));
        assert!(matches!(
            "x".parse::<CpuMask>(),
            Err(CpuListError::BadElement(_))
        ));
        assert!("1,,2".parse::<CpuMask>().is_err());
        assert!(matches!(
            CpuMask::parse_bounded("0-4", 4),
            Err(CpuListError::OutOfRange { cpu: 4, limit: 4 })
        ));
    }

    #[test]
    fn ranges_fill_whole_words_and_edges() {
        for (list, want) in [
            ("0-63", "0-63"),
            ("1-64", "1-64"),
            ("63-64", "63-64"),
            ("5-200,100-300", "5-300"),
            ("0-1048575", "0-1048575"),
            ("60-70,64-127,200", "60-127,200"),
        ] {
            let m: CpuMask = list.parse().unwrap();
            assert_eq!(m.to_string(), want, "{list}");
        }
        let m: CpuMask = "0-1048575".parse().unwrap();
        assert_eq!(m.weight(), 1 << 20);
        assert!(matches!(
            CpuMask::parse_bounded("3-9", 4),
            Err(CpuListError::OutOfRange { cpu: 9, limit: 4 })
        ));
        assert!(matches!(
            CpuMask::parse_bounded("0", 0),
            Err(CpuListError::OutOfRange { cpu: 0, limit: 0 })
        ));
        assert_eq!(CpuMask::parse_bounded(" ", 0), Ok(CpuMask::new()));
    }

    /// Many copies of the widest range used to cost ~1.5 ms each (one `set` per CPU id); now
    /// a list is refused past `MAX_LIST_PARTS` elements and each element costs O(1) plus one
    /// pass over the words at the end.
    #[test]
    fn hostile_lists_parse_in_linear_time_with_a_cap() {
        let at_cap = vec!["0-1048575"; MAX_LIST_PARTS].join(",");
        let t = std::time::Instant::now();
        let m: CpuMask = at_cap.parse().unwrap();
        let took = t.elapsed();
        assert_eq!(m.weight(), 1 << 20);
        let bound = if cfg!(debug_assertions) { 500 } else { 50 };
        assert!(
            took < std::time::Duration::from_millis(bound),
            "{MAX_LIST_PARTS} widest ranges took {took:?}"
        );
        let over = vec!["0-1048575"; MAX_LIST_PARTS + 1].join(",");
        assert_eq!(
            over.parse::<CpuMask>(),
            Err(CpuListError::TooManyParts {
                limit: MAX_LIST_PARTS
            })
        );
        // Bounded parsing refuses the first wide range before applying anything.
        let t = std::time::Instant::now();
        assert!(CpuMask::parse_bounded(&at_cap, 1024).is_err());
        assert!(t.elapsed() < std::time::Duration::from_millis(bound));
    }

    #[test]
    fn set_algebra() {
        let a: CpuMask = "0-5".parse().unwrap();
        let b: CpuMask = "4-9".parse().unwrap();
        assert_eq!(a.and(&b).to_string(), "4-5");
        assert_eq!(a.and_not(&b).to_string(), "0-3");
        assert_eq!(a.or(&b).to_string(), "0-9");
        assert_eq!(b.first(), Some(4));
        assert_eq!(b.end(), 10);
    }

    #[test]
    fn atomic_mask_snapshot() {
        let m = AtomicCpuMask::new(130);
        assert!(!m.set(129));
        assert!(m.set(129));
        m.set(0);
        assert_eq!(m.load().to_string(), "0,129");
        assert!(m.clear(0));
        assert!(!m.contains(0) && m.contains(129) && !m.contains(500));
        assert_eq!(m.weight(), 1);
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(cpus in proptest::collection::btree_set(0usize..300, 0..40)) {
            let m: CpuMask = cpus.iter().copied().collect();
            let back: CpuMask = m.to_string().parse().unwrap();
            prop_assert_eq!(back.iter().collect::<Vec<_>>(), cpus.into_iter().collect::<Vec<_>>());
        }

        /// The word-at-a-time parser agrees with setting every id one by one.
        #[test]
        fn ranges_match_the_naive_union(ranges in proptest::collection::vec((0usize..700, 0usize..200), 0..30)) {
            let list: Vec<String> = ranges.iter().map(|&(a, n)| format!("{a}-{}", a + n)).collect();
            let m: CpuMask = list.join(",").parse().unwrap();
            let mut naive = CpuMask::new();
            for &(a, n) in &ranges {
                for c in a..=a + n {
                    naive.set(c);
                }
            }
            prop_assert_eq!(m, naive);
        }
    }
}
