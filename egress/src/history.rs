//! Closed orders' histories on disk: `history.redb` in the data directory.
//!
//! A closed order stays in the live view for `order_retention` (log time)
//! after it closed; then the view hands it here, and `GET /v1/orders/{id}`
//! answers it from disk until `history_retention` after it closed. After
//! that the order answers 404 `expired` for another `history_retention`
//! (a tombstone of a few bytes), then nothing is left of it (404
//! `not_found`). Every bound is in log time, so a replay decides the same.
//!
//! Writes never wait on the disk in the dataflow's observer: the view
//! queues them ([`History::put`]) and a thread of their own commits
//! whatever has queued in one transaction. Until committed, an order is
//! answered from the queue. A checkpoint first waits for the queue to be on
//! disk ([`History::flush`]), so an order the checkpointed view no longer
//! holds is always on disk. Each order is written whole, keyed by its id:
//! a replay after a restore writes the same record again, never a second
//! copy of its steps.
//!
//! ## Layout
//!
//! - [`History`]: the store (open, put, look up, flush) and its thread.
//! - [`Record`]: what is kept of an order (its close time and its view,
//!   or nothing for a tombstone); [`Lookup`]: what a look-up finds.
//! - Tables: `orders` (id → postcard [`Record`]), `closed` (close time →
//!   ids, to sweep in time order), `meta` (`swept`: the log time up to
//!   which expiry has been applied).

use crate::view::OrderView;
use foldhash::HashMap;
use grabflow_api::{Id, Time};
use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

/// Orders by id: a postcard [`Record`].
const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
/// Order ids by the log time they closed.
const CLOSED: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("closed");
/// `swept`: expiry has been applied up to this log time.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The history file's name in the data directory.
pub const FILE: &str = "history.redb";

/// Errors of the history store.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file could not be opened, read or written.
    #[error("history store {path}: {source}")]
    Store {
        /// The file.
        path: String,
        /// What redb said.
        source: Box<redb::Error>,
    },
    /// A record on disk does not decode (written by another version).
    #[error("history store: a record does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

/// What is kept of one closed order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// When it closed (log time).
    pub closed_at: Time,
    /// The order as the view had it; `None` once expired (a tombstone).
    pub order: Option<OrderView>,
}

/// What a look-up finds.
#[derive(Debug)]
pub enum Lookup {
    /// The order, whole.
    Found(OrderView),
    /// It closed more than the history retention ago.
    Expired,
    /// Nothing is known of it.
    Unknown,
}

/// One piece of work for the store's thread.
enum Job {
    /// Write these records.
    Put(Vec<(Id, Arc<Record>)>),
    /// Apply expiry up to log time `now`.
    Sweep(Time),
    /// Answer once everything before is committed.
    Flush(mpsc::Sender<()>),
}

/// Records queued and not yet committed, by id.
type Pending = Arc<Mutex<HashMap<Id, Arc<Record>>>>;

/// The history store: redb, and the thread that writes it.
pub struct History {
    db: Arc<Database>,
    /// How long after it closed an order is answered whole, ms.
    retention: Time,
    /// Queued for the writer thread.
    pending: Pending,
    /// To the writer thread (dropped on close: the thread ends).
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The writer thread, joined on close.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl History {
    /// Opens (or creates) `history.redb` in `dir`, keeping orders whole
    /// for `retention` ms after they closed, and starts its writer thread.
    pub fn open(dir: &Path, retention: Time) -> Result<History, HistoryError> {
        let path = dir.join(FILE);
        let err = |e: redb::Error| HistoryError::Store {
            path: path.display().to_string(),
            source: Box::new(e),
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        // The tables exist from the start: readers never find them missing.
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(ORDERS).map_err(|e| err(e.into()))?;
        txn.open_multimap_table(CLOSED).map_err(|e| err(e.into()))?;
        txn.open_table(META).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        let db = Arc::new(db);
        let pending = Pending::default();
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: Arc::clone(&db),
            retention,
            pending: Arc::clone(&pending),
            path: path.display().to_string(),
            retry: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("grabflow-history".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| err(redb::StorageError::Io(e).into()))?;
        Ok(History {
            db,
            retention,
            pending,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// How long after it closed an order is answered whole, ms.
    pub fn retention(&self) -> Time {
        self.retention
    }

    /// Queues `orders` (id, close time, view) to be written; answered from
    /// the queue until they are.
    pub fn put(&self, orders: Vec<(Id, Time, OrderView)>) {
        if orders.is_empty() {
            return;
        }
        let records: Vec<(Id, Arc<Record>)> = orders
            .into_iter()
            .map(|(id, closed_at, order)| {
                let record = Record {
                    closed_at,
                    order: Some(order),
                };
                (id, Arc::new(record))
            })
            .collect();
        {
            let mut pending = self.pending.lock().expect("pending");
            for (id, r) in &records {
                pending.insert(id.clone(), Arc::clone(r));
            }
        }
        self.send(Job::Put(records));
    }

    /// Asks for expiry to be applied on disk up to log time `now`.
    pub fn sweep(&self, now: Time) {
        self.send(Job::Sweep(now));
    }

    /// Waits until everything queued so far is on disk (or has failed and
    /// is logged).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Flush(tx));
        let _ = rx.recv();
    }

    /// Stops the writer thread once it has written what is queued.
    pub fn close(&self) {
        drop(self.jobs.lock().expect("jobs").take());
        if let Some(t) = self.thread.lock().expect("thread").take() {
            let _ = t.join();
        }
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &*self.jobs.lock().expect("jobs") {
            let _ = tx.send(job);
        }
    }

    /// Order `id` at log time `now`: whole within the retention, expired
    /// (a tombstone) for another retention, then unknown.
    pub fn lookup(&self, id: &Id, now: Time) -> Result<Lookup, HistoryError> {
        let queued = self.pending.lock().expect("pending").get(id).cloned();
        let record = match queued {
            Some(r) => Some((*r).clone()),
            None => self.read(id)?,
        };
        let Some(record) = record else {
            return Ok(Lookup::Unknown);
        };
        let age = now.saturating_sub(record.closed_at);
        Ok(match record.order {
            _ if age >= 2 * self.retention => Lookup::Unknown,
            Some(order) if age < self.retention => Lookup::Found(order),
            _ => Lookup::Expired,
        })
    }

    fn read(&self, id: &Id) -> Result<Option<Record>, HistoryError> {
        let err = |e: redb::Error| HistoryError::Store {
            path: FILE.into(),
            source: Box::new(e),
        };
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(ORDERS).map_err(|e| err(e.into()))?;
        let Some(bytes) = table.get(id.as_str()).map_err(|e| err(e.into()))? else {
            return Ok(None);
        };
        Ok(Some(postcard::from_bytes(bytes.value())?))
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    retention: Time,
    pending: Pending,
    /// The file, for messages.
    path: String,
    /// Records whose commit failed: written with the next one.
    retry: Vec<(Id, Arc<Record>)>,
}

impl Writer {
    /// Commits what comes, each time everything queued in one transaction,
    /// until the sender is dropped.
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut puts = std::mem::take(&mut self.retry);
            let mut sweep = None;
            let mut flushes = Vec::new();
            for job in std::iter::once(first).chain(jobs.try_iter()) {
                match job {
                    Job::Put(records) => puts.extend(records),
                    Job::Sweep(now) => sweep = sweep.max(Some(now)),
                    Job::Flush(done) => flushes.push(done),
                }
            }
            match self.commit(&puts, sweep) {
                Ok(()) => {
                    let mut pending = self.pending.lock().expect("pending");
                    for (id, r) in &puts {
                        if pending.get(id).is_some_and(|p| Arc::ptr_eq(p, r)) {
                            pending.remove(id);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(
                        path = %self.path,
                        queued = puts.len(),
                        "history store: commit failed (kept in memory, retried): {e}"
                    );
                    self.retry = puts;
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// Writes `puts` and applies expiry up to `sweep`, in one transaction.
    // redb's own error, on the writer thread only: logged, never carried.
    #[allow(clippy::result_large_err)]
    fn commit(&self, puts: &[(Id, Arc<Record>)], sweep: Option<Time>) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut orders = txn.open_table(ORDERS)?;
            let mut closed = txn.open_multimap_table(CLOSED)?;
            let mut meta = txn.open_table(META)?;
            let swept = meta.get("swept")?.map_or(0, |v| v.value());
            for (id, r) in puts {
                if r.closed_at + 2 * self.retention <= swept {
                    continue;
                }
                // Written again by a replay after expiry passed it: only
                // the tombstone.
                let record;
                let r: &Record = if r.closed_at + self.retention <= swept {
                    record = Record {
                        closed_at: r.closed_at,
                        order: None,
                    };
                    &record
                } else {
                    r
                };
                let bytes = postcard::to_allocvec(r).expect("records serialize");
                orders.insert(id.as_str(), bytes.as_slice())?;
                closed.insert(r.closed_at, id.as_str())?;
            }
            if let Some(now) = sweep.filter(|now| *now > swept) {
                self.expire(&mut orders, &mut closed, swept, now)?;
                meta.insert("swept", now)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies expiry from log time `from` to `now`: orders closed a
    /// retention ago become tombstones, tombstones two retentions old go.
    #[allow(clippy::result_large_err)]
    fn expire(
        &self,
        orders: &mut redb::Table<&str, &[u8]>,
        closed: &mut redb::MultimapTable<u64, &str>,
        from: Time,
        now: Time,
    ) -> Result<(), redb::Error> {
        let ids_closed = |closed: &redb::MultimapTable<u64, &str>, range: std::ops::Range<u64>| {
            let mut out = Vec::new();
            for entry in closed.range(range)? {
                let (at, ids) = entry?;
                for id in ids {
                    out.push((at.value(), id?.value().to_string()));
                }
            }
            Ok::<_, redb::Error>(out)
        };
        // Closed at or before `now - retention`: a tombstone.
        let lo = from.saturating_sub(self.retention);
        let hi = now.saturating_sub(self.retention) + 1;
        if lo < hi {
            for (at, id) in ids_closed(closed, lo..hi)? {
                let current = match orders.get(id.as_str())? {
                    Some(bytes) => postcard::from_bytes::<Record>(bytes.value()).ok(),
                    None => None,
                };
                if current.is_some_and(|r| r.closed_at == at && r.order.is_some()) {
                    let tomb = Record {
                        closed_at: at,
                        order: None,
                    };
                    let bytes = postcard::to_allocvec(&tomb).expect("records serialize");
                    orders.insert(id.as_str(), bytes.as_slice())?;
                }
            }
        }
        // Closed at or before `now - 2 × retention`: gone.
        let hi = now.saturating_sub(2 * self.retention) + 1;
        let gone = ids_closed(closed, 0..hi)?;
        for (at, id) in &gone {
            let current = match orders.get(id.as_str())? {
                Some(bytes) => postcard::from_bytes::<Record>(bytes.value()).ok(),
                None => None,
            };
            if current.is_some_and(|r| r.closed_at == *at) {
                orders.remove(id.as_str())?;
            }
        }
        for at in gone
            .iter()
            .map(|(at, _)| *at)
            .collect::<std::collections::BTreeSet<_>>()
        {
            closed.remove_all(at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grabflow_api::OrderState;

    fn order(merchant: &str) -> OrderView {
        OrderView {
            state: OrderState::Closed,
            rider: None,
            merchant: Id::new(merchant).unwrap(),
            history: Vec::new(),
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("grabflow-history-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_order_is_whole_then_expired_then_unknown_and_survives_a_reopen() {
        let dir = temp_dir("expiry");
        let id = Id::new("O1").unwrap();
        {
            let h = History::open(&dir, 1_000).unwrap();
            h.put(vec![(id.clone(), 10_000, order("M1"))]);
            // Answered from the queue or the disk alike.
            assert!(matches!(h.lookup(&id, 10_500).unwrap(), Lookup::Found(_)));
            h.flush();
            assert!(matches!(h.lookup(&id, 10_999).unwrap(), Lookup::Found(_)));
            assert!(matches!(h.lookup(&id, 11_000).unwrap(), Lookup::Expired));
            h.sweep(11_000);
            h.flush();
            assert!(matches!(h.lookup(&id, 11_000).unwrap(), Lookup::Expired));
            // Written again by a replay: still a tombstone.
            h.put(vec![(id.clone(), 10_000, order("M1"))]);
            h.flush();
            assert!(h.read(&id).unwrap().unwrap().order.is_none());
        }
        let h = History::open(&dir, 1_000).unwrap();
        assert!(matches!(h.lookup(&id, 11_500).unwrap(), Lookup::Expired));
        assert!(matches!(
            h.lookup(&Id::new("O2").unwrap(), 11_500).unwrap(),
            Lookup::Unknown
        ));
        h.sweep(12_000);
        h.flush();
        assert!(h.read(&id).unwrap().is_none(), "the tombstone has gone");
        assert!(matches!(h.lookup(&id, 12_000).unwrap(), Lookup::Unknown));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
