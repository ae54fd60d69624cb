//! Reading a segment back: on open, every whole record in order, a
//! record at a time; for an operator, a report of any damage ([`verify`])
//! and a repair that keeps every whole record ([`repair`]), a segment
//! file at a time.
//!
//! Only a genuinely torn tail of the log's last segment is cut on open:
//! damage with no whole record after it (a crash in the middle of the
//! last write), no longer than one commit's write; in a sealed segment
//! that is damage too. Anything else — a damaged record with whole records
//! after it, or more garbage than a write — stops the open with
//! [`LogError::Damaged`], which names the file, the byte offset and how
//! many records follow, and says to run `grabflow log repair`. A repair
//! re-synchronises on the next whole record after each damaged stretch,
//! keeps every whole record, and moves the damaged bytes into a
//! quarantine file beside the log: nothing is deleted.

use super::format::{self, decode, framed, Record};
use crate::LogError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What [`read_records`] found in a log file.
#[derive(Debug)]
pub struct Scanned {
    /// Every whole record, in order.
    pub records: Vec<Record>,
    /// Where the records end: the next append goes here.
    pub end: u64,
    /// Bytes of a torn tail cut off.
    pub cut: u64,
    /// The last record's last event (decoded even when records before an
    /// offset are skipped): where the log's offsets and clock stand.
    pub last: Option<Record>,
}

/// The longest torn tail taken for one (a commit's write at most); garbage
/// further on means damage, and the log refuses to open.
pub(crate) const MAX_TORN: usize = 64 << 20;

/// The stretches of a log file's bytes, as a scan finds them.
#[derive(Debug, Default)]
struct Layout {
    /// Whole records (framing included), in order.
    records: Vec<Range<usize>>,
    /// Damaged stretches, each up to the next whole record or the end of
    /// the data.
    damaged: Vec<Range<usize>>,
    /// Where the data ends (the zero-filled room starts).
    end: usize,
}

impl Layout {
    /// Scans `bytes`: framed records one after another; where one is not
    /// whole (or `accept` refuses its payload), a damaged stretch up to the
    /// next offset where a whole record is framed.
    fn of(bytes: &[u8], mut accept: impl FnMut(&[u8]) -> bool) -> Layout {
        // The zero-filled room after the records: a record's header is
        // never zero, so the data ends at the last non-zero byte's record.
        let data = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let mut layout = Layout::default();
        let mut pos = 0;
        while pos < data {
            if let Some(payload) = framed(&bytes[pos..]).filter(|p| accept(p)) {
                let next = pos + 8 + payload.len();
                layout.records.push(pos..next);
                pos = next;
                continue;
            }
            let next = (pos + 1..data)
                .find(|&i| framed(&bytes[i..]).is_some())
                .unwrap_or(data);
            layout.damaged.push(pos..next);
            pos = next;
        }
        layout.end = layout
            .records
            .last()
            .map_or(0, |r| r.end)
            .max(layout.damaged.last().map_or(0, |d| d.end));
        layout
    }

    /// The torn tail, if the only damage is one: a stretch at the end, no
    /// longer than a commit's write.
    fn torn_tail(&self) -> Option<&Range<usize>> {
        match self.damaged.as_slice() {
            [d] if d.end == self.end
                && self.records.last().is_none_or(|r| r.end <= d.start)
                && d.len() <= MAX_TORN =>
            {
                Some(d)
            }
            _ => None,
        }
    }

    /// The first damage that is not a torn tail, and the whole records
    /// after it.
    fn damage(&self) -> Option<(usize, usize)> {
        if self.torn_tail().is_some() {
            return None;
        }
        let first = self.damaged.first()?;
        let after = self.records.iter().filter(|r| r.start >= first.end).count();
        Some((first.start, after))
    }
}

/// Reads every whole record of `path` up to its end (the zero-filled room,
/// or the end of the file), cutting a torn tail (with the room after it:
/// the writer adds fresh room). Any other damage is refused with
/// [`LogError::Damaged`], and nothing is cut.
pub fn read_records(path: &Path) -> Result<Scanned, LogError> {
    read_records_from(path, 0)
}

/// [`read_records`], decoding only the records from offset `from` on (a
/// restart from a checkpoint needs no more); the records before are
/// checked by their checksum and head.
pub fn read_records_from(path: &Path, from: u64) -> Result<Scanned, LogError> {
    let mut records = Vec::new();
    let Scan { end, cut, last, .. } = scan(path, from, true, |r| records.push(r))?;
    Ok(Scanned {
        records,
        end,
        cut,
        last,
    })
}

/// What [`scan`] found in one file (a segment of the log).
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Where the records end: the next append goes here.
    pub(crate) end: u64,
    /// Bytes of a torn tail cut off.
    pub(crate) cut: u64,
    /// The last record's last event.
    pub(crate) last: Option<Record>,
    /// The offset of the file's first event (`None`: no records).
    pub(crate) first: Option<u64>,
}

/// Checks every record of the log file at `path` and hands `each` those
/// from offset `from` on, in order. A torn tail is cut when `tail` (the
/// log's last segment); in any other segment it is damage
/// ([`LogError::Segments`]: a sealed segment was trimmed to its records
/// when the next began). Other damage is refused with
/// [`LogError::Damaged`]; nothing is cut then.
///
/// The file is read a record at a time (see [`stream`]): memory holds one
/// record, not the segment. Only where that finds something other than
/// whole records then zeros is the file read whole, to tell a torn tail
/// from damage.
pub(crate) fn scan(
    path: &Path,
    from: u64,
    tail: bool,
    each: impl FnMut(Record),
) -> Result<Scan, LogError> {
    scan_with(path, from, tail, true, each)
}

/// [`scan`]; the zero-filled room after the records is read through (to
/// check it is zeros) only if `room`: a replay of segments [`scan`] has
/// checked stops where the records end.
pub(crate) fn scan_with(
    path: &Path,
    from: u64,
    tail: bool,
    room: bool,
    mut each: impl FnMut(Record),
) -> Result<Scan, LogError> {
    match stream(path, from, room, &mut each)? {
        Streamed::Whole(scan) => Ok(scan),
        Streamed::Stopped(at) => scan_whole(path, from, tail, at, each),
    }
}

/// How far [`stream`] got.
enum Streamed {
    /// Whole records, then zeros (or nothing) to the end of the file.
    Whole(Scan),
    /// Something else begins at this byte; every whole record before it
    /// was handed over.
    Stopped(usize),
}

/// Reads the file at `path` a record at a time, handing `each` the events
/// from offset `from` on, while it holds whole records; stops at the first
/// header of zeros (and, if `room`, reads on to check that only zeros
/// follow) or at anything that is not a whole record.
fn stream(
    path: &Path,
    from: u64,
    room: bool,
    each: &mut impl FnMut(Record),
) -> Result<Streamed, LogError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Streamed::Whole(Scan::default()))
        }
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata()?.len() as usize;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let (mut pos, mut first) = (0usize, None);
    let (mut record, mut last) = (Vec::new(), Vec::new());
    let mut decoded = Vec::new();
    while pos < len {
        if len - pos < 8 {
            return Ok(Streamed::Stopped(pos));
        }
        record.resize(8, 0);
        r.read_exact(&mut record)?;
        if record.iter().all(|&b| b == 0) {
            if room && !zeros(&mut r, len - pos - 8)? {
                return Ok(Streamed::Stopped(pos));
            }
            break;
        }
        let n = u32::from_le_bytes(record[..4].try_into().expect("4 bytes")) as usize;
        if n == 0 || n > len - pos - 8 {
            return Ok(Streamed::Stopped(pos));
        }
        record.resize(8 + n, 0);
        r.read_exact(&mut record[8..])?;
        let Some(payload) = framed(&record) else {
            return Ok(Streamed::Stopped(pos));
        };
        match format::first_offset(payload) {
            Some(offset) if offset < from => {
                first.get_or_insert(offset);
            }
            _ => {
                if !decode(payload, &mut decoded) {
                    return Ok(Streamed::Stopped(pos));
                }
                for r in decoded.drain(..) {
                    first.get_or_insert(r.event.offset);
                    if r.event.offset >= from {
                        each(r);
                    }
                }
            }
        }
        std::mem::swap(&mut record, &mut last);
        pos += 8 + n;
    }
    let last = framed(&last).and_then(|p| {
        decode(p, &mut decoded);
        decoded.pop()
    });
    Ok(Streamed::Whole(Scan {
        end: pos as u64,
        cut: 0,
        last,
        first,
    }))
}

/// Whether the next `n` bytes of `r` are zeros (read a buffer at a time).
fn zeros(r: &mut impl Read, mut n: usize) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    while n > 0 {
        let k = n.min(buf.len());
        r.read_exact(&mut buf[..k])?;
        if buf[..k].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        n -= k;
    }
    Ok(true)
}

/// [`scan`], reading the file whole (where [`stream`] stopped at byte
/// `handed`: the records before it were handed to `each` already).
fn scan_whole(
    path: &Path,
    from: u64,
    tail: bool,
    handed: usize,
    mut each: impl FnMut(Record),
) -> Result<Scan, LogError> {
    let Some((file, bytes)) = read(path, tail)? else {
        return Ok(Scan::default());
    };
    let mut first = None;
    let mut decoded = Vec::new();
    let base = bytes.as_ptr() as usize;
    let layout = Layout::of(&bytes, |payload| {
        let head = format::first_offset(payload);
        // Where the record begins (its framing precedes the payload).
        let at = payload.as_ptr() as usize - base - 8;
        let whole = match head {
            Some(offset) if offset < from => true,
            _ => {
                let whole = decode(payload, &mut decoded);
                // Forms before 0.7 are decoded whole: skip what comes
                // before `from`.
                for r in decoded.drain(..) {
                    first.get_or_insert(r.event.offset);
                    if r.event.offset >= from && at >= handed {
                        each(r);
                    }
                }
                whole
            }
        };
        if whole {
            if let Some(offset) = head {
                first.get_or_insert(offset);
            }
        }
        whole
    });
    if let Some((offset, following)) = layout.damage() {
        return Err(LogError::Damaged {
            path: path.to_path_buf(),
            offset: offset as u64,
            following,
        });
    }
    // The last record, decoded again (unless it just was).
    let last = layout.records.last().and_then(|r| {
        let mut out = Vec::new();
        framed(&bytes[r.clone()]).filter(|p| decode(p, &mut out))?;
        out.pop()
    });
    match layout.torn_tail() {
        Some(torn) if !tail => Err(LogError::Segments {
            path: path.to_path_buf(),
            why: format!(
                "{} bytes at byte {} are not a whole record, and later segments follow",
                torn.len(),
                torn.start
            ),
        }),
        Some(torn) => {
            file.set_len(torn.start as u64)?;
            file.sync_all()?;
            Ok(Scan {
                end: torn.start as u64,
                cut: torn.len() as u64,
                last,
                first,
            })
        }
        None => Ok(Scan {
            end: layout.end as u64,
            cut: 0,
            last,
            first,
        }),
    }
}

/// The bytes of the log at `path`, and the file (opened for writing if
/// `write`); `None` if there is no log.
fn read(path: &Path, write: bool) -> Result<Option<(File, Vec<u8>)>, LogError> {
    let mut file = match OpenOptions::new().read(true).write(write).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(Some((file, bytes)))
}

/// What [`verify`] found in a log file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Whole records (appends).
    pub records: usize,
    /// The events they hold.
    pub events: usize,
    /// Damaged stretches `(byte offset, length)`, a torn tail included.
    pub damaged: Vec<(u64, u64)>,
    /// Whether the only damage is a torn tail (which opening cuts).
    pub torn_tail: bool,
    /// Whole records after the first damage.
    pub after_damage: usize,
}

impl Report {
    /// Whether opening the log would refuse it.
    pub fn refused(&self) -> bool {
        !self.damaged.is_empty() && !self.torn_tail
    }
}

/// Reads the log at `path` and reports what it holds and any damage;
/// changes nothing.
pub fn verify(path: &Path) -> Result<Report, LogError> {
    let Some((_, bytes)) = read(path, false)? else {
        return Ok(Report::default());
    };
    let (report, _) = survey(&bytes);
    Ok(report)
}

/// A scan of `bytes` as a [`Report`], with its layout.
fn survey(bytes: &[u8]) -> (Report, Layout) {
    let mut events = Vec::new();
    let layout = Layout::of(bytes, |payload| decode(payload, &mut events));
    let report = Report {
        records: layout.records.len(),
        events: events.len(),
        damaged: layout
            .damaged
            .iter()
            .map(|d| (d.start as u64, d.len() as u64))
            .collect(),
        torn_tail: layout.torn_tail().is_some(),
        after_damage: layout.damage().map_or(0, |(_, after)| after),
    };
    (report, layout)
}

/// What [`repair`] did.
#[derive(Debug)]
pub struct Repaired {
    /// The log as it was found.
    pub report: Report,
    /// Where the damaged bytes went (none if there was no damage).
    pub quarantine: Option<PathBuf>,
}

/// Rewrites the log at `path` with every whole record it holds, in order
/// (also those after damage), and moves each damaged stretch into
/// `<path>.quarantine-<unix ms>` (the bytes, one after another) with an
/// index `<that>.txt` of their offsets and lengths. The new log replaces
/// the old one only once written and synced.
pub fn repair(path: &Path) -> Result<Repaired, LogError> {
    let Some((_, bytes)) = read(path, false)? else {
        return Ok(Repaired {
            report: Report::default(),
            quarantine: None,
        });
    };
    let (report, layout) = survey(&bytes);
    if layout.damaged.is_empty() {
        return Ok(Repaired {
            report,
            quarantine: None,
        });
    }
    let quarantine = PathBuf::from(format!("{}.quarantine-{}", path.display(), crate::now_ms()));
    let mut q = File::create(&quarantine)?;
    let mut index = String::from("# offset length (bytes of the damaged log, in order)\n");
    for d in &layout.damaged {
        q.write_all(&bytes[d.clone()])?;
        index.push_str(&format!("{} {}\n", d.start, d.len()));
    }
    q.sync_all()?;
    std::fs::write(format!("{}.txt", quarantine.display()), index)?;
    let fresh = PathBuf::from(format!("{}.repair", path.display()));
    let mut out = File::create(&fresh)?;
    for r in &layout.records {
        out.write_all(&bytes[r.clone()])?;
    }
    out.sync_all()?;
    std::fs::rename(&fresh, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(Repaired {
        report,
        quarantine: Some(quarantine),
    })
}
