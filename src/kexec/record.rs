//! The crash record handed to the next image (the `/proc/vmcore` ELF notes), and its wire
//! format for exec mode.
//!
//! Frame: `b"USMPCRSH"` | version u32 LE | payload length u64 LE | CRC-32 of the payload u32 LE
//! | payload (JSON). The decoder checks every field before it parses anything, caps the length,
//! and then validates the parsed record (CPU ids in range, masks consistent), so a corrupt,
//! truncated or hostile record is one typed error, never a panic or a wrong report.
//!
//! Decoding is linear in the input: the masks are parsed with a cap on their elements and every
//! id checked as it is read, the notes are checked against one bitset, so the largest payload
//! decodes in milliseconds whatever it holds.

use crate::cpu::mask::CpuMask;
use crate::runtime::builder::MAX_CPUS;
use crate::stop::{CrashNote, ParkPolicy};

const MAGIC: &[u8; 8] = b"USMPCRSH";
/// The record format version this build writes and reads.
pub const RECORD_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 4;
/// Largest payload accepted (a record of 1024 CPUs is a few tens of KiB).
pub const MAX_RECORD: usize = 1 << 20;
/// Largest framed record (header and payload) accepted.
pub const MAX_FRAME: usize = HEADER + MAX_RECORD;

/// What the crashed image leaves for the next one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CrashRecord {
    /// Why it crashed.
    pub reason: String,
    /// The CPU that crashed (ran `crash_kexec`), if it was a logical CPU.
    pub crashing_cpu: Option<usize>,
    /// Logical CPUs of the crashed image.
    pub cpus: usize,
    /// Generation of the crashed image.
    pub generation: u64,
    /// Registers saved by each crash-stopped CPU.
    pub notes: Vec<CrashNote>,
    /// CPUs that failed to stop (cpulist); a subset of `lost`.
    pub failed: String,
    /// CPUs lost to the next image: parked with `spin`, parked where they could not power
    /// off, or failed to stop (cpulist).
    pub lost: String,
    /// The park policy of the crashed image.
    pub park: ParkPolicy,
    /// Wall-clock time of the crash and of the handoff, ns since the Unix epoch.
    pub crashed_at_ns: u64,
    /// Wall-clock time of the handoff, ns since the Unix epoch.
    pub handoff_at_ns: u64,
}

/// Why a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the smallest record.
    #[error("crash record truncated: {got} bytes, need at least {need}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The bytes do not start with the record's magic number: not a crash record.
    #[error("crash record has a bad magic number")]
    BadMagic,
    /// The record was written in a format version this build does not read.
    #[error("crash record version {0} is not supported (this build reads {RECORD_VERSION})")]
    BadVersion(u32),
    /// The payload length in the header differs from the bytes after the header, or is over the
    /// limit.
    #[error("crash record length {len} is invalid (have {have} bytes, limit {MAX_RECORD})")]
    BadLength {
        /// The payload length the header gives.
        len: u64,
        /// Bytes after the header.
        have: usize,
    },
    /// The checksum does not match: the record is corrupt.
    #[error("crash record checksum mismatch")]
    BadChecksum,
    /// The payload could not be decoded.
    #[error("crash record payload is malformed: {0}")]
    Malformed(String),
    /// The payload decoded but its contents contradict each other.
    #[error("crash record is inconsistent: {0}")]
    Invalid(String),
}

impl CrashRecord {
    /// Serializes into the framed wire format.
    pub fn encode(&self) -> Vec<u8> {
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Validates and parses a framed record.
    pub fn decode(b: &[u8]) -> Result<CrashRecord, RecordError> {
        if b.len() < HEADER {
            return Err(RecordError::Truncated {
                got: b.len(),
                need: HEADER,
            });
        }
        if &b[..8] != MAGIC {
            return Err(RecordError::BadMagic);
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != RECORD_VERSION {
            return Err(RecordError::BadVersion(version));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&b[12..20]);
        let len = u64::from_le_bytes(len8);
        let have = b.len() - HEADER;
        if len > MAX_RECORD as u64 || len != have as u64 {
            return Err(RecordError::BadLength { len, have });
        }
        let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        let payload = &b[HEADER..];
        if crc32fast::hash(payload) != crc {
            return Err(RecordError::BadChecksum);
        }
        let r: CrashRecord =
            serde_json::from_slice(payload).map_err(|e| RecordError::Malformed(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    fn validate(&self) -> Result<(), RecordError> {
        let bad = |m: String| Err(RecordError::Invalid(m));
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return bad(format!("cpus = {}", self.cpus));
        }
        if self.generation == u64::MAX {
            return bad("generation is the last one (no next image can follow it)".into());
        }
        if self.crashing_cpu.is_some_and(|c| c >= self.cpus) {
            return bad("crashing CPU out of range".into());
        }
        let mask = |name: &str, m: &str| {
            CpuMask::parse_bounded(m, self.cpus)
                .map_err(|e| RecordError::Invalid(format!("{name}: {e}")))
        };
        let failed = mask("failed", &self.failed)?;
        let lost = mask("lost", &self.lost)?;
        // The crashing CPU ran the handover: the old image cannot have lost it.
        if let Some(c) = self.crashing_cpu.filter(|&c| lost.contains(c)) {
            return bad(format!(
                "crashing CPU {c} is in lost (it ran the handover, so it cannot be lost)"
            ));
        }
        if let Some(cpu) = failed.and_not(&lost).first() {
            return bad(format!(
                "CPU {cpu} failed to stop but is not in lost (failed must be a subset of lost)"
            ));
        }
        let mut noted = CpuMask::new();
        for n in &self.notes {
            if n.cpu >= self.cpus {
                return bad(format!("crash note for CPU {} out of range", n.cpu));
            }
            if noted.contains(n.cpu) {
                return bad(format!("two crash notes for CPU {}", n.cpu));
            }
            noted.set(n.cpu);
        }
        if self.reason.len() > 4096 {
            return bad("reason longer than 4096 bytes".into());
        }
        if self.handoff_at_ns < self.crashed_at_ns {
            return bad("handoff before crash".into());
        }
        Ok(())
    }

    /// The generation that boots from this record (always representable: `validate` refuses
    /// the last one).
    pub fn next_generation(&self) -> u64 {
        self.generation.saturating_add(1)
    }

    /// The `failed` mask, parsed (the record was validated, so this does not fail; an invalid
    /// string gives the empty mask).
    pub fn failed_mask(&self) -> CpuMask {
        CpuMask::parse_bounded(&self.failed, self.cpus).unwrap_or_default()
    }

    /// The `lost` mask, parsed (as [`CrashRecord::failed_mask`]).
    pub fn lost_mask(&self) -> CpuMask {
        CpuMask::parse_bounded(&self.lost, self.cpus).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipi::signal::SavedRegs;
    use proptest::prelude::*;

    fn sample() -> CrashRecord {
        CrashRecord {
            reason: "panic: demo".into(),
            crashing_cpu: Some(1),
            cpus: 4,
            generation: 0,
            notes: vec![CrashNote {
                cpu: 2,
                regs: SavedRegs {
                    ip: 0x1234,
                    sp: 0x7fff_0000,
                    fp: 0,
                },
            }],
            failed: "3".into(),
            lost: "2-3".into(),
            park: ParkPolicy::PowerOff,
            crashed_at_ns: 10,
            handoff_at_ns: 20,
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let r = sample();
        let b = r.encode();
        assert_eq!(CrashRecord::decode(&b).unwrap(), r);
        assert!(matches!(
            CrashRecord::decode(&b[..10]),
            Err(RecordError::Truncated { .. })
        ));
        assert!(matches!(
            CrashRecord::decode(&b[..b.len() - 1]),
            Err(RecordError::BadLength { .. })
        ));
        let mut m = b.clone();
        m[0] ^= 1;
        assert_eq!(CrashRecord::decode(&m), Err(RecordError::BadMagic));
        let mut v = b.clone();
        v[8] = 9;
        assert_eq!(CrashRecord::decode(&v), Err(RecordError::BadVersion(9)));
        let mut c = b.clone();
        let last = c.len() - 2;
        c[last] ^= 0x20;
        assert_eq!(CrashRecord::decode(&c), Err(RecordError::BadChecksum));
        let mut bad = sample();
        bad.lost = "0-9".into();
        assert!(matches!(
            CrashRecord::decode(&bad.encode()),
            Err(RecordError::Invalid(_))
        ));
    }

    /// Frames `payload` with a valid header and CRC, as a hostile writer can.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn invalid(r: &CrashRecord) -> String {
        match CrashRecord::decode(&r.encode()) {
            Err(RecordError::Invalid(m)) => m,
            other => panic!("{r:?} decoded as {other:?}, expected Invalid"),
        }
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let mut r = sample();
        r.lost = "0-4".into();
        assert!(invalid(&r).contains("lost"), "{}", invalid(&r));
        let mut c = sample();
        c.lost = "1-3".into();
        assert!(
            invalid(&c).contains("crashing CPU 1 is in lost"),
            "{}",
            invalid(&c)
        );
        let mut r = sample();
        r.failed = "4".into();
        assert!(invalid(&r).contains("failed"));
        let mut r = sample();
        r.failed = "1,3".into();
        r.lost = "2-3".into();
        assert!(invalid(&r).contains("subset"), "{}", invalid(&r));
        let mut r = sample();
        r.notes.push(r.notes[0]);
        assert!(invalid(&r).contains("two crash notes"), "{}", invalid(&r));
        let mut r = sample();
        r.generation = u64::MAX;
        assert!(invalid(&r).contains("generation"), "{}", invalid(&r));
        // The largest valid generation still has a next one.
        let mut r = sample();
        r.generation = u64::MAX - 1;
        let back = CrashRecord::decode(&r.encode()).unwrap();
        assert_eq!(back.next_generation(), u64::MAX);
        assert_eq!(back.failed_mask().to_string(), "3");
        assert_eq!(back.lost_mask().to_string(), "2-3");
    }

    /// Decode bound for the tests: "a few milliseconds" in release; debug builds are ~20x slower.
    /// Measured in this thread's CPU time ([`Cpu::start`]), not on the wall clock: the old
    /// decoder spent more than 60 s on a hostile record, and a host at load 16 stretched a
    /// 5 ms decode past 50 ms of wall time (a failed `cargo test` with nothing wrong).
    fn decode_bound() -> std::time::Duration {
        std::time::Duration::from_millis(if cfg!(debug_assertions) { 1000 } else { 50 })
    }

    /// This thread's CPU time since `start`: what the decode itself costs, whatever else the
    /// host runs meanwhile.
    struct Cpu(std::time::Duration);

    impl Cpu {
        fn now() -> std::time::Duration {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `t` is a valid timespec on this frame for the call to fill.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID");
            std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        }

        fn start() -> Cpu {
            Cpu(Cpu::now())
        }

        fn elapsed(&self) -> std::time::Duration {
            Cpu::now() - self.0
        }
    }

    /// A payload of about `MAX_RECORD` bytes with a valid CRC whose `lost` mask is `part`
    /// repeated: the old decoder spent ~1.5 ms per widest part (more than 60 s in all).
    fn hostile_mask_record(part: &str, cpus: usize) -> Vec<u8> {
        let json = |n: usize| {
            let mask = vec![part; n].join(",");
            format!(
                r#"{{"reason":"x","crashing_cpu":null,"cpus":{cpus},"generation":0,"notes":[],"failed":"","lost":"{mask}","park":"PowerOff","crashed_at_ns":0,"handoff_at_ns":0}}"#
            )
        };
        let n = (MAX_RECORD - 200) / (part.len() + 1);
        let payload = json(n);
        assert!(payload.len() <= MAX_RECORD);
        frame(payload.as_bytes())
    }

    #[test]
    fn hostile_masks_decode_within_the_time_bound() {
        for (part, cpus) in [
            ("0-1048575", 1024),
            ("0-1023", 1024),
            ("0-1", 2),
            ("0", 1),
            ("  0 - 1023  ", 1024),
        ] {
            let b = hostile_mask_record(part, cpus);
            let t = Cpu::start();
            let r = CrashRecord::decode(&b);
            let took = t.elapsed();
            assert!(
                r.is_err(),
                "{part}: {} parts accepted",
                MAX_RECORD / part.len()
            );
            assert!(took < decode_bound(), "{part}: decode took {took:?}");
            eprintln!(
                "hostile mask {part:?} x{}: refused in {took:?}",
                MAX_RECORD / part.len()
            );
        }
        // At the cap on parts, the mask is accepted, still fast.
        let mask = vec!["0-1023"; crate::cpu::mask::MAX_LIST_PARTS].join(",");
        let mut r = sample();
        r.cpus = 1024;
        // Every CPU lost: none of them can be the crashing CPU.
        r.crashing_cpu = None;
        r.lost = mask;
        r.failed.clear();
        let b = r.encode();
        let t = Cpu::start();
        assert!(CrashRecord::decode(&b).is_ok());
        assert!(t.elapsed() < decode_bound(), "took {:?}", t.elapsed());
        eprintln!("mask at the cap on parts: accepted in {:?}", t.elapsed());
    }

    /// Notes are checked with one bitset: the most notes a payload can hold decode fast.
    #[test]
    fn many_notes_decode_within_the_time_bound() {
        let note = r#"{"cpu":1,"regs":{"ip":0,"sp":0,"fp":0}}"#;
        let n = (MAX_RECORD - 300) / (note.len() + 1);
        let notes = vec![note; n].join(",");
        let payload = format!(
            r#"{{"reason":"x","crashing_cpu":null,"cpus":1024,"generation":0,"notes":[{notes}],"failed":"","lost":"","park":"PowerOff","crashed_at_ns":0,"handoff_at_ns":0}}"#
        );
        let b = frame(payload.as_bytes());
        let t = Cpu::start();
        assert!(matches!(
            CrashRecord::decode(&b),
            Err(RecordError::Invalid(_))
        ));
        assert!(t.elapsed() < decode_bound() * 4, "took {:?}", t.elapsed());
    }

    proptest! {
        // Each case builds up to a few hundred KiB of text: fewer cases than the default.
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any mask text, however its parts are shaped, decodes (or is refused) in bounded time.
        #[test]
        fn any_mask_decodes_within_the_time_bound(
            parts in proptest::collection::vec((0usize..1_100_000, 0usize..1_100_000), 1..64),
            repeat in 1usize..400,
            cpus in 1usize..=1024,
        ) {
            let one: Vec<String> = parts.iter().map(|&(a, b)| format!("{a}-{b}")).collect();
            let one = one.join(",");
            let mask = vec![one.as_str(); repeat].join(",");
            let payload = format!(
                r#"{{"reason":"x","crashing_cpu":null,"cpus":{cpus},"generation":0,"notes":[],"failed":"{mask}","lost":"{mask}","park":"Spin","crashed_at_ns":0,"handoff_at_ns":0}}"#
            );
            prop_assume!(payload.len() <= MAX_RECORD);
            let b = frame(payload.as_bytes());
            let t = Cpu::start();
            let _ = CrashRecord::decode(&b);
            prop_assert!(t.elapsed() < decode_bound(), "took {:?}", t.elapsed());
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = CrashRecord::decode(&bytes);
        }

        #[test]
        fn any_single_corruption_is_rejected(pos in 0usize..400, flip in 1u8..=255) {
            let b = sample().encode();
            let pos = pos % b.len();
            let mut m = b.clone();
            m[pos] ^= flip;
            prop_assert!(CrashRecord::decode(&m).is_err());
        }

        #[test]
        fn valid_headers_with_garbage_payload_are_rejected(payload in proptest::collection::vec(any::<u8>(), 0..128)) {
            prop_assert!(CrashRecord::decode(&frame(&payload)).is_err());
        }
    }
}
