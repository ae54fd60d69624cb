//! Checkpoint files: written whole or not at all, versioned, checksummed,
//! and read back newest first, skipping (loudly) any that is damaged.
//!
//! A checkpoint is `checkpoints/<log time>.ckpt` in the data directory:
//! `GFCK`, the format version (u32 LE), the body's length (u64 LE), a CRC32
//! of the version, length and body (u32 LE), then the body (whatever the
//! caller encodes, postcard in grabflow). It is written to a temporary
//! file, synced, renamed into place and the directory synced: a crash
//! mid-write leaves the previous checkpoints as they were and at most a
//! temporary file, removed on the next start. The newest [`KEEP`] are kept.

use grabflow_api::Time;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format version written.
pub const VERSION: u32 = 1;
/// Checkpoints kept (the newest; the others are deleted after a write).
pub const KEEP: usize = 3;

/// The bytes of a checkpoint written and synced at a time (see
/// [`CheckpointStore::write`]).
const SLICE: usize = 256 * 1024;
const MAGIC: &[u8; 4] = b"GFCK";
const HEAD: usize = 4 + 4 + 8 + 4;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not a whole checkpoint of this format.
    #[error("{path}: {why}")]
    Damaged {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// A checkpoint written: where, how big, as of which log time.
#[derive(Clone, Debug)]
pub struct Written {
    /// The file.
    pub path: PathBuf,
    /// Its size, bytes.
    pub bytes: u64,
    /// The log time it is as of.
    pub at: Time,
}

/// The checkpoints of one data directory.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CheckpointStore {
    /// The store in `data_dir/checkpoints` (created when first written).
    pub fn new(data_dir: &Path) -> Self {
        CheckpointStore {
            dir: data_dir.join("checkpoints"),
        }
    }

    /// The directory checkpoints are kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `body` as the checkpoint at log time `at`, durably, then
    /// deletes all but the newest [`KEEP`].
    pub fn write(&self, at: Time, body: &[u8]) -> Result<Written, CheckpointError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.dir.join(format!("{at:020}.ckpt"));
        let tmp = self.dir.join(format!("{at:020}.ckpt.tmp"));
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        // In slices, each synced: a log commit waiting behind a device
        // flush waits for one slice, not the whole checkpoint.
        for slice in encode(body).chunks(SLICE) {
            file.write_all(slice).map_err(io(&tmp))?;
            file.sync_data().map_err(io(&tmp))?;
        }
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        for old in self.list()?.into_iter().skip(KEEP) {
            let _ = fs::remove_file(old.1);
        }
        Ok(Written {
            path,
            bytes: (HEAD + body.len()) as u64,
            at,
        })
    }

    /// The checkpoints there are, newest first, by log time (leftover
    /// temporary files are removed).
    pub fn list(&self) -> Result<Vec<(Time, PathBuf)>, CheckpointError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let path = entry.map_err(io(&self.dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".ckpt.tmp") {
                let _ = fs::remove_file(&path);
            } else if let Some(at) = name
                .strip_suffix(".ckpt")
                .and_then(|t| t.parse::<Time>().ok())
            {
                found.push((at, path));
            }
        }
        found.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        Ok(found)
    }

    /// The newest checkpoint that reads back whole and that `decode`
    /// accepts, with its time; every one skipped is logged as an error with
    /// its path and why. `None` when there is none to use.
    pub fn latest<T>(
        &self,
        mut decode: impl FnMut(&[u8]) -> Result<T, String>,
    ) -> Result<Option<(Time, T)>, CheckpointError> {
        for (at, path) in self.list()? {
            match read(&path).and_then(|body| {
                decode(&body).map_err(|why| CheckpointError::Damaged {
                    path: path.clone(),
                    why,
                })
            }) {
                Ok(state) => return Ok(Some((at, state))),
                Err(e) => tracing::error!(
                    "skipping a checkpoint that cannot be used (an older one, or the whole log, is used instead; the file is left for inspection): {e}"
                ),
            }
        }
        Ok(None)
    }
}

/// The file's bytes: head and body.
fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(VERSION, body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn checksum(version: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&version.to_le_bytes());
    h.update(&(body.len() as u64).to_le_bytes());
    h.update(body);
    h.finalize()
}

/// A checkpoint file's body, if the file is whole and of this format.
pub fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let damaged = |why: &str| CheckpointError::Damaged {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if bytes.len() < HEAD || &bytes[..4] != MAGIC {
        return Err(damaged(
            "not a grabflow checkpoint (too short, or no GFCK head)",
        ));
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(damaged(&format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let body = &bytes[HEAD..];
    if body.len() as u64 != len {
        return Err(damaged(&format!(
            "{} body bytes, the head says {len} (a half-written file)",
            body.len()
        )));
    }
    if checksum(version, body) != crc {
        return Err(damaged("the checksum does not match (damaged bytes)"));
    }
    Ok(body.to_vec())
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    OpenOptions::new()
        .read(true)
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (CheckpointStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "grabflow-ckpt-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        (CheckpointStore::new(&dir), dir)
    }

    #[test]
    fn the_newest_whole_checkpoint_is_read_and_a_damaged_one_is_skipped() {
        let (store, dir) = store();
        assert!(store.latest(|b| Ok(b.to_vec())).unwrap().is_none());
        for at in [10, 20, 30, 40] {
            store.write(at, format!("state {at}").as_bytes()).unwrap();
        }
        // Only the newest KEEP are kept.
        let times: Vec<Time> = store.list().unwrap().iter().map(|(t, _)| *t).collect();
        assert_eq!(times, [40, 30, 20]);
        let latest = store.latest(|b| Ok(b.to_vec())).unwrap().unwrap();
        assert_eq!(latest, (40, b"state 40".to_vec()));
        // A flipped byte in the newest: the one before is used.
        let newest = &store.list().unwrap()[0].1;
        let mut bytes = fs::read(newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(newest, bytes).unwrap();
        let latest = store.latest(|b| Ok(b.to_vec())).unwrap().unwrap();
        assert_eq!(latest.0, 30);
        // A half-written one (cut short), and one the caller cannot decode.
        let second = &store.list().unwrap()[1].1;
        let bytes = fs::read(second).unwrap();
        fs::write(second, &bytes[..bytes.len() - 3]).unwrap();
        let latest = store
            .latest(|b| {
                (b != b"state 20")
                    .then(|| b.to_vec())
                    .ok_or("no".to_string())
            })
            .unwrap();
        assert!(latest.is_none(), "{latest:?}");
        // A temporary file left by a crash is removed.
        fs::write(store.dir().join("00000000000000000050.ckpt.tmp"), b"GFCK").unwrap();
        assert_eq!(store.list().unwrap().len(), 3);
        assert!(!store.dir().join("00000000000000000050.ckpt.tmp").exists());
        let _ = fs::remove_dir_all(dir);
    }
}
