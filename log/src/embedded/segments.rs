//! The log's segments: the files it is written in, how one gives way to the
//! next, and which may be deleted.
//!
//! ## Layout
//!
//! ```text
//! <data dir>/log/00000000000000000000.seg   offsets 0 .. 81234
//! <data dir>/log/00000000000000081235.seg   offsets 81235 .. (the active one)
//! ```
//!
//! A segment is named by the offset of its first event (20 digits, so the
//! names sort as the offsets do) and holds whole records (see
//! [`format`](super::format)); offsets go on from one segment to the next
//! without a gap. The writer appends to the last one only (the *active*
//! segment); the others are *sealed*: trimmed to their records when the
//! next began, and never written again.
//!
//! A new segment begins with the commit that would take the active one past
//! [`Rolling::bytes`] (64 MiB by default), or that comes [`Rolling::span`]
//! (an hour of log time) or more after the active segment's first event, so
//! that even a quiet log has segments retention can delete. A single commit
//! larger than a segment still goes whole into one.
//!
//! A data dir of 0.12 or before has the whole log in one file,
//! `<data dir>/events.log`; [`migrate`] renames it to the first segment
//! (it starts at offset 0) the first time the log opens.
//!
//! ## Retention
//!
//! A sealed segment is deleted (oldest first, so the log stays one run of
//! offsets) once both
//!
//! - no checkpoint that a restart may use still needs it: every offset it
//!   holds lies before the position the checkpoints need
//!   ([`Retention::checkpointed`]), and
//! - every event it holds is older, in log time, than the retention
//!   measured back from the log's newest event (the segment after it
//!   begins before that cutoff; log times never go back).
//!
//! Without a checkpoint (none written yet, or checkpoints off) nothing is
//! deleted, and a retention of 0 keeps everything.

use super::format::{decode, framed};
use crate::LogError;
use grabflow_api::Time;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory of the segments, in the data dir.
pub const DIR: &str = "log";

/// The single log file of data dirs from 0.12 and before.
pub const LEGACY: &str = "events.log";

/// When the writer begins a new segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rolling {
    /// A commit that would take the active segment past this many bytes
    /// goes into a new one.
    pub bytes: u64,
    /// A commit this long (log time, ms) or more after the active
    /// segment's first event goes into a new one.
    pub span: Time,
}

impl Default for Rolling {
    /// 64 MiB (a few seconds of a million batched pings a second; a
    /// restart reads a segment at a time), or an hour.
    fn default() -> Self {
        Rolling {
            bytes: 64 << 20,
            span: 3_600_000,
        }
    }
}

/// One segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The offset of its first event (its name).
    pub first: u64,
    /// The file.
    pub path: PathBuf,
}

/// The segments' directory in `data_dir`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

/// The file of the segment beginning at offset `first`, in `log_dir`.
pub fn file(log_dir: &Path, first: u64) -> PathBuf {
    log_dir.join(format!("{first:020}.seg"))
}

/// The data dir a log file (a segment, or a 0.12 `events.log`) is in, for
/// the commands an error message names.
pub fn data_dir_of(path: &Path) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new("."));
    match parent.file_name() {
        Some(name) if name == DIR => parent.parent().unwrap_or(Path::new(".")).to_path_buf(),
        _ => parent.to_path_buf(),
    }
}

/// Moves a 0.12 data dir's `events.log` into place as the first segment
/// (offset 0), durably; `true` if there was one. A data dir holding both
/// that file and segments is refused: which one is the log is for an
/// operator to say.
pub fn migrate(data_dir: &Path) -> Result<bool, LogError> {
    let legacy = data_dir.join(LEGACY);
    if !legacy.exists() {
        return Ok(false);
    }
    let log_dir = dir(data_dir);
    fs::create_dir_all(&log_dir)?;
    if !list(data_dir)?.is_empty() {
        return Err(LogError::Segments {
            path: legacy,
            why: format!(
                "the data dir holds both this 0.12 log and segments in {}",
                log_dir.display()
            ),
        });
    }
    fs::rename(&legacy, file(&log_dir, 0))?;
    sync_dir(&log_dir)?;
    sync_dir(data_dir)?;
    tracing::info!(
        "log: moved {} to {} (the log is kept in segments since 0.13)",
        legacy.display(),
        file(&log_dir, 0).display()
    );
    Ok(true)
}

/// The segments in `data_dir`, by offset (other files there, such as a
/// repair's quarantine, are not segments).
pub fn list(data_dir: &Path) -> Result<Vec<Segment>, LogError> {
    let log_dir = dir(data_dir);
    let entries = match fs::read_dir(&log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            found.push(Segment { first, path });
        }
    }
    found.sort_by_key(|s| s.first);
    Ok(found)
}

/// The bytes of the segments in `data_dir` (their zero-filled room
/// included) and how many there are, for the metrics.
pub fn usage(data_dir: &Path) -> (u64, usize) {
    let segments = list(data_dir).unwrap_or_default();
    let bytes = segments
        .iter()
        .filter_map(|s| fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    (bytes, segments.len())
}

/// Whether `grabflow log repair` quarantined bytes of the segment at
/// `path` (a `<segment>.quarantine-<ms>` file beside it): its records may
/// end before the next segment begins.
pub(crate) fn repaired(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    let prefix = format!("{name}.quarantine-");
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
    })
}

/// The time of the first event of the segment at `path` (`None`: it holds
/// no whole first record).
pub(crate) fn first_time(path: &Path) -> std::io::Result<Option<Time>> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 8];
    if f.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let mut bytes = head.to_vec();
    bytes.resize(8 + len, 0);
    if f.read_exact(&mut bytes[8..]).is_err() {
        return Ok(None);
    }
    let mut out = Vec::new();
    Ok(framed(&bytes)
        .filter(|p| decode(p, &mut out))
        .and_then(|_| out.first().map(|r| r.event.time)))
}

/// Syncs the directory `dir` (a file created, renamed or deleted in it
/// stays so after a crash).
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What the log may delete: shared by the writer, which deletes, and the
/// checkpoints, which say what they still need.
#[derive(Debug, Default)]
pub struct Retention {
    /// Log time a segment's events are kept for, ms (0: forever).
    keep: Time,
    /// The first offset a usable checkpoint still needs (0: none written,
    /// nothing may go).
    needed: AtomicU64,
}

impl Retention {
    /// Segments kept at least `keep` ms of log time (0: forever).
    pub fn new(keep: Time) -> Retention {
        Retention {
            keep,
            needed: AtomicU64::new(0),
        }
    }

    /// The retention, ms of log time (0: forever).
    pub fn keep(&self) -> Time {
        self.keep
    }

    /// Every checkpoint a restart may use resumes at `offset` or later:
    /// the log before it may go once old enough. Never goes back.
    pub fn checkpointed(&self, offset: u64) {
        self.needed.fetch_max(offset, Ordering::AcqRel);
    }

    /// The first offset the checkpoints need (0: nothing may go).
    pub fn needed(&self) -> u64 {
        self.needed.load(Ordering::Acquire)
    }

    /// How many of the oldest segments may go: `firsts` are the
    /// segments' first offsets in order (the active one last), and
    /// `first_time(i)` the time of segment `i`'s first event; `newest` is
    /// the log's newest event time. A segment may go when the segment
    /// after it begins at or before the offset the checkpoints need and
    /// before the cutoff (`newest - keep`), so every event of it is older.
    pub fn expired(
        &self,
        firsts: &[u64],
        mut first_time: impl FnMut(usize) -> Option<Time>,
        newest: Time,
    ) -> usize {
        let needed = self.needed();
        if self.keep == 0 || needed == 0 {
            return 0;
        }
        let Some(cutoff) = newest.checked_sub(self.keep) else {
            return 0;
        };
        (1..firsts.len())
            .take_while(|&next| {
                firsts[next] <= needed && first_time(next).is_some_and(|t| t < cutoff)
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_goes_only_when_no_checkpoint_needs_it_and_it_is_old_enough() {
        let firsts = [0, 100, 200, 300];
        let times = [1_000, 2_000, 3_000, 4_000];
        let expired = |r: &Retention, newest| r.expired(&firsts, |i| Some(times[i]), newest);
        let r = Retention::new(1_000);
        assert_eq!(expired(&r, 10_000), 0, "no checkpoint: nothing goes");
        r.checkpointed(250);
        // Cutoff 3_500: segments 0 and 1 end before 3_000; segment 2's
        // successor begins at 4_000.
        assert_eq!(expired(&r, 4_500), 2);
        // The checkpoint needs offset 250: segment 2 (200..299) stays.
        assert_eq!(expired(&r, 100_000), 2);
        r.checkpointed(300);
        assert_eq!(expired(&r, 100_000), 3, "never the active segment");
        r.checkpointed(10);
        assert_eq!(r.needed(), 300, "what checkpoints need never goes back");
        // Not old enough yet.
        assert_eq!(expired(&r, 2_500), 0);
        assert_eq!(expired(&r, 3_001), 1);
        // A retention of 0 keeps everything.
        let forever = Retention::new(0);
        forever.checkpointed(300);
        assert_eq!(forever.expired(&firsts, |i| Some(times[i]), 100_000), 0);
    }

    #[test]
    fn the_data_dir_of_a_segment_is_the_one_the_commands_take() {
        assert_eq!(
            data_dir_of(Path::new("/d/log/00000000000000000000.seg")),
            PathBuf::from("/d")
        );
        assert_eq!(data_dir_of(Path::new("/d/events.log")), PathBuf::from("/d"));
        assert_eq!(data_dir_of(Path::new("/d/log")), PathBuf::from("/d"));
    }
}
