//! Reading the file back on open: every whole record, in order. A torn or
//! corrupt tail (a crash mid-write) is cut at the last whole record, never
//! half-applied; garbage further on than one commit's write means
//! corruption, and the log refuses to open.

use super::format::{decode, Record};
use crate::LogError;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;

/// What [`read_records`] found in a log file.
#[derive(Debug)]
pub struct Scanned {
    /// Every whole record, in order.
    pub records: Vec<Record>,
    /// Where the records end: the next append goes here.
    pub end: u64,
    /// Bytes of a torn tail cut off.
    pub cut: u64,
}

/// The longest torn tail taken for one (a commit's write at most); garbage
/// further on means corruption, and the log refuses to open.
pub(crate) const MAX_TORN: usize = 64 << 20;

/// Reads every whole record of `path` up to its end (a zero header, or the
/// end of the file), cutting a torn tail (with the zero-filled room after
/// it: the writer adds fresh room).
pub fn read_records(path: &Path) -> Result<Scanned, LogError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Scanned {
                records: Vec::new(),
                end: 0,
                cut: 0,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        if bytes[pos..].starts_with(&[0; 8]) && bytes[pos..].iter().all(|&b| b == 0) {
            // The zero-filled room after the last record.
            break;
        }
        let good = (|| {
            let head = bytes.get(pos..pos + 8)?;
            let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
            let payload = bytes.get(pos + 8..pos + 8 + len)?;
            (len > 0 && crc32fast::hash(payload) == crc && decode(payload, &mut records))
                .then_some(8 + len)
        })();
        match good {
            Some(size) => pos += size,
            None => {
                // Only a tail can be torn: anything further on means corruption.
                let torn = bytes
                    .iter()
                    .rposition(|&b| b != 0)
                    .map_or(0, |last| last + 1 - pos);
                if torn > MAX_TORN {
                    return Err(LogError::Corrupt(pos as u64));
                }
                file.set_len(pos as u64)?;
                file.sync_all()?;
                return Ok(Scanned {
                    records,
                    end: pos as u64,
                    cut: torn as u64,
                });
            }
        }
    }
    Ok(Scanned {
        records,
        end: pos as u64,
        cut: 0,
    })
}
