//! The crash record handed to the next image (the `/proc/vmcore` ELF notes), and its wire
//! format for exec mode.
//!
//! Frame: `b"USMPCRSH"` | version u32 LE | payload length u64 LE | CRC-32 of the payload u32 LE
//! | payload (JSON). The decoder checks every field before it parses anything, caps the length,
//! and then validates the parsed record (CPU ids in range, masks consistent), so a corrupt,
//! truncated or hostile record is one typed error, never a panic or a wrong report.

use crate::runtime::builder::MAX_CPUS;
use crate::runtime::cpumask::CpuMask;
use crate::stop::{CrashNote, ParkPolicy};

const MAGIC: &[u8; 8] = b"USMPCRSH";
/// The record format version this build writes and reads.
pub const RECORD_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 4;
/// Largest payload accepted (a record of 1024 CPUs is a few tens of KiB).
pub const MAX_RECORD: usize = 1 << 20;

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
    /// CPUs that failed to stop (cpulist).
    pub failed: String,
    /// CPUs lost to the next image: parked with `spin`, parked where they could not power
    /// off, or failed to stop (cpulist).
    pub lost: String,
    /// The park policy of the crashed image.
    pub park: ParkPolicy,
    /// Wall-clock time of the crash and of the handoff, ns since the Unix epoch.
    pub crashed_at_ns: u64,
    pub handoff_at_ns: u64,
}

/// Why a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("crash record truncated: {got} bytes, need at least {need}")]
    Truncated { got: usize, need: usize },
    #[error("crash record has a bad magic number")]
    BadMagic,
    #[error("crash record version {0} is not supported (this build reads {RECORD_VERSION})")]
    BadVersion(u32),
    #[error("crash record length {len} is invalid (have {have} bytes, limit {MAX_RECORD})")]
    BadLength { len: u64, have: usize },
    #[error("crash record checksum mismatch")]
    BadChecksum,
    #[error("crash record payload is malformed: {0}")]
    Malformed(String),
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
        if self.crashing_cpu.is_some_and(|c| c >= self.cpus) {
            return bad("crashing CPU out of range".into());
        }
        for m in [&self.failed, &self.lost] {
            CpuMask::parse_bounded(m, self.cpus)
                .map_err(|e| RecordError::Invalid(e.to_string()))?;
        }
        if self.notes.iter().any(|n| n.cpu >= self.cpus) {
            return bad("crash note for a CPU out of range".into());
        }
        if self.reason.len() > 4096 {
            return bad("reason longer than 4096 bytes".into());
        }
        if self.handoff_at_ns < self.crashed_at_ns {
            return bad("handoff before crash".into());
        }
        Ok(())
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
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&RECORD_VERSION.to_le_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            b.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            b.extend_from_slice(&payload);
            prop_assert!(CrashRecord::decode(&b).is_err());
        }
    }
}
