//! Zero-filled room ahead of the embedded log's writer.
//!
//! `fdatasync` after an append that grows a file must also write the inode
//! (the new size): on this project's machines that is a second I/O per
//! commit, twice the latency and twice the kernel time of an overwrite. So
//! the log file is kept half a [`CHUNK`] to one and a half chunks longer
//! than its records, the room filled with zeros and synced by a helper thread *before* the writer
//! may use it. Commits then overwrite zeros in place and the file's size
//! never changes under them (what PostgreSQL does to its WAL segments).
//!
//! The writer never writes where the helper may still be writing: it asks for
//! more room while it has half a chunk left, and only if it outruns the helper
//! does it wait for the room in flight (or, with none in flight, grow the
//! file itself, the slow path every commit took before).
//!
//! Room is added per segment and within what the disk can spare: a fill
//! never goes past the segment's roll size (the room of a segment that
//! rolls is trimmed off), nor beyond a [`SHARE`] of the file system's free
//! space (`fstatvfs`), so a small volume gets small fills, and below
//! [`MIN_FILL`] none: commits then grow the file (the slow path), and a
//! full disk fails the commit rather than a fill.
//!
//! A header of zeros (length 0; every record holds at least its form byte)
//! marks the end of the records when the log is read back.

use grabflow_api::lifecycle::{Stop, Thread};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// How much room is added at a time: ~3 s of a million batched pings a
/// second.
pub const CHUNK: u64 = 64 << 20;

/// A fill takes at most this share of the file system's free space
/// (1/`SHARE`).
pub const SHARE: u64 = 4;

/// Fills smaller than this are not worth a helper's write: commits grow
/// the file instead.
pub const MIN_FILL: u64 = 64 << 10;

/// Where the free space a fill may use is read from (injected in tests).
type Free = Box<dyn Fn() -> u64 + Send>;

/// What the helper has made ready.
#[derive(Debug)]
struct Ready {
    /// Bytes of the file that exist and are synced (records, then zeros).
    len: u64,
    /// Whether the helper is filling more.
    filling: bool,
}

/// The writer's side: how far it may write without growing the file.
pub struct Space {
    ready: Arc<(Mutex<Ready>, Condvar)>,
    /// Room requests to the helper: fill from `.0` to `.1`.
    fill: Option<mpsc::Sender<(u64, u64)>>,
    /// Set when the writer is done: the helper stops filling.
    helper: Option<Thread>,
    /// The file is never filled past this (the segment's roll size).
    cap: u64,
    /// The file system's free space, bytes.
    free: Free,
}

impl Space {
    /// Room for the writer of `file`, whose length is `len` (synced), up to
    /// `cap` bytes; starts the helper, which ends when the `Space` is
    /// dropped.
    pub fn new(file: &File, len: u64, cap: u64) -> std::io::Result<Space> {
        let stat = file.try_clone()?;
        Space::with_free(file, len, cap, Box::new(move || free_bytes(&stat)))
    }

    /// [`Space::new`], reading the free space from `free`.
    pub fn with_free(file: &File, len: u64, cap: u64, free: Free) -> std::io::Result<Space> {
        let ready = Arc::new((
            Mutex::new(Ready {
                len,
                filling: false,
            }),
            Condvar::new(),
        ));
        let (fill, requests) = mpsc::channel::<(u64, u64)>();
        let (file, shared) = (file.try_clone()?, Arc::clone(&ready));
        let helper = Thread::spawn("grabflow-log-space", move |stop| {
            // A full disk fails every fill: said once per 10 s.
            let mut failures = crate::throttle::Throttle::new(std::time::Duration::from_secs(10));
            for (from, to) in requests {
                let done = zero_fill(&file, from, to, &stop);
                let (lock, cond) = &*shared;
                let mut r = lock.lock().expect("space lock");
                match done {
                    Ok(true) => r.len = r.len.max(to),
                    Ok(false) => {}
                    Err(e) => {
                        if let Some(held) = failures.admit() {
                            tracing::warn!(
                                similar_since_last = held,
                                "log: could not add room: {e}"
                            );
                        }
                    }
                }
                r.filling = false;
                cond.notify_all();
            }
        })?;
        Ok(Space {
            ready,
            fill: Some(fill),
            helper: Some(helper),
            cap,
            free,
        })
    }

    /// Before writing `n` bytes at `at`: whether they fit in the synced room
    /// (an overwrite). If not, the write grows the file, so it must be synced
    /// with its size; waits first if the helper is filling that part.
    pub fn reserve(&self, at: u64, n: u64) -> bool {
        let (lock, cond) = &*self.ready;
        let mut r = lock.lock().expect("space lock");
        while at + n > r.len && r.filling {
            r = cond.wait(r).expect("space lock");
        }
        at + n <= r.len
    }

    /// After writing up to `end`: asks for more room when less than half
    /// of a fill (see [`fill_to`]) is left and none is being filled. So
    /// the room ahead stays within a share of the free space, whatever
    /// has been filled before.
    pub fn wrote(&self, end: u64) {
        let (lock, _) = &*self.ready;
        let mut r = lock.lock().expect("space lock");
        r.len = r.len.max(end);
        let left = r.len - end;
        if !r.filling && left < CHUNK / 2 && r.len < self.cap {
            let from = r.len;
            match fill_to(from, self.cap, (self.free)()) {
                Some(to) if left < (to - from) / 2 => {
                    r.filling = self
                        .fill
                        .as_ref()
                        .is_some_and(|f| f.send((from, to)).is_ok());
                }
                _ => {}
            }
        }
    }
}

impl Drop for Space {
    /// Stops the helper (a half-filled chunk is only zeros past the
    /// records) and waits for it.
    fn drop(&mut self) {
        self.fill.take();
        if let Some(helper) = self.helper.take() {
            // A panic of the helper becomes the writer's, so the process
            // reports it (unless the writer is unwinding already).
            if let Err(p) = helper.stop_and_join() {
                if !std::thread::panicking() {
                    panic!("{p}");
                }
            }
        }
    }
}

/// Where a fill from `from` should end: a [`CHUNK`] on, but not past `cap`
/// nor beyond a [`SHARE`] of `free`; `None` when that is under
/// [`MIN_FILL`].
pub fn fill_to(from: u64, cap: u64, free: u64) -> Option<u64> {
    let to = (from + CHUNK.min(free / SHARE)).min(cap);
    (to >= from + MIN_FILL).then_some(to)
}

/// The free space of `file`'s file system, bytes (for an unprivileged
/// user); 0 if it cannot be read (then nothing is filled).
fn free_bytes(file: &File) -> u64 {
    rustix::fs::fstatvfs(file).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Writes zeros to `file` from `from` to `to`, then syncs data and size;
/// `false` if `stop` was set first.
fn zero_fill(file: &File, from: u64, to: u64, stop: &Stop) -> std::io::Result<bool> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        if stop.stopped() {
            return Ok(false);
        }
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all().map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_filled_ahead_and_only_used_once_synced() {
        let path = std::env::temp_dir().join(format!("grabflow-space-{}", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let space = Space::with_free(&file, 0, u64::MAX, Box::new(|| u64::MAX)).unwrap();
        assert!(
            !space.reserve(0, 10),
            "no room yet: the first write grows the file"
        );
        file.write_all_at(&[7; 10], 0).unwrap();
        space.wrote(10);
        // The next write waits for the chunk in flight, then overwrites.
        assert!(space.reserve(10, 100));
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, 10 + CHUNK);
        file.write_all_at(&[8; 100], 10).unwrap();
        space.wrote(110);
        assert!(space.reserve(110, CHUNK - 110));
        // Half a chunk left: another is asked for, and is there once synced.
        space.wrote(CHUNK / 2 + 20);
        assert!(space.reserve(CHUNK / 2 + 20, CHUNK));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 + 2 * CHUNK);
        drop(space);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..10], &[7; 10]);
        assert_eq!(&bytes[10..110], &[8; 100]);
        assert!(bytes[110..].iter().all(|&b| b == 0), "the room is zeros");
        std::fs::remove_file(&path).unwrap();
    }
}
