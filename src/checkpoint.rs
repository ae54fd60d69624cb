//! Checkpoints of the whole service: the dataflow's operators and its
//! observers (the egress view, the Kafka output sink) as of one log time
//! (gathered by the dataflow, see `grabflow_dataflow::checkpoint`), with,
//! over the embedded log, the log's ledger (idempotency keys and known ids),
//! and where the log (or each input partition) resumes. Over the embedded
//! log they are files in the data dir; with Kafka, records of the
//! cluster's checkpoint topic (`grabflow_log::kafka::checkpoints`), so a
//! dataflow started on a fresh machine resumes from the latest too. (With
//! Kafka the ledger is read back from the topics, not checkpointed.)
//!
//! Taking one: the dataflow hands each checkpoint [`Taken`] (copies of its
//! operators' and observers' states, not yet encoded) to the checkpoint
//! thread ([`writer`]), which encodes them, adds the ledger (appends wait
//! the moment its encoding takes) and writes the file
//! (`grabflow_log::checkpoints`). Dispatch waits only for the copies; a
//! writer that falls behind writes the newest taken and drops the older.
//!
//! Starting from one ([`load`]): the newest checkpoint that reads back whole
//! and decodes is used; the log replays only the events from its position
//! on and reads back into its ledger only those it lacks. A damaged or
//! half-written checkpoint is skipped, loudly, for the one before it (or
//! the whole log): nothing acknowledged is lost either way, since the log
//! holds every event.

use grabflow_api::lifecycle::Thread;
use grabflow_api::{DispatchConfig, Time};
use grabflow_dataflow::checkpoint::{DataflowState, Taken};
use grabflow_dataflow::runtime::Fanout;
pub use grabflow_egress::view::{CheckpointFigures as Figures, SharedFigures};
use grabflow_log::checkpoints::CheckpointStore;
use grabflow_log::embedded::Retention;
use grabflow_log::kafka::{KafkaCheckpoints, KafkaConfig};
use grabflow_log::keys::Print;
use grabflow_log::ledger::Ledger;
use grabflow_log::LedgerSaver;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// One checkpoint file's body.
#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    /// The dataflow's operators, the view and where the log resumes.
    pub dataflow: DataflowState,
    /// The log's ledger, in postcard ([`Ledger`]).
    pub ledger: Vec<u8>,
    /// [`Print::probe`] of the build that wrote it: idempotency prints of
    /// another are not trusted.
    pub print: Print,
}

/// A checkpoint to start from.
pub struct Loaded {
    /// The dataflow's and its observers' state.
    pub dataflow: DataflowState,
    /// The observers' states, in the order of the service's fanout.
    pub observers: Vec<Vec<u8>>,
    /// The log's ledger (embedded log).
    pub ledger: Ledger,
    /// Where the embedded log resumes: the first offset to replay.
    pub from: u64,
}

/// Which log a checkpoint is of, and what it must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Of {
    /// The embedded log: one position, the ledger, the view first.
    Embedded,
    /// Kafka: a position per input partition read.
    Kafka,
}

/// Decodes and checks a checkpoint's body for a start under `cfg`.
fn decode(body: &[u8], cfg: &DispatchConfig, of: Of) -> Result<Loaded, String> {
    let c: Checkpoint = postcard::from_bytes(body).map_err(|e| format!("does not decode: {e}"))?;
    if c.print != Print::probe() {
        return Err("written by a build that prints idempotency keys differently".into());
    }
    let resume = c.dataflow.resume();
    let from = match (of, resume.as_slice()) {
        (Of::Embedded, [(0, from)]) => *from,
        (Of::Kafka, r) if !r.is_empty() => 0,
        (_, other) => return Err(format!("not a checkpoint of this log: {other:?}")),
    };
    let observers = Fanout::parts(&c.dataflow.observer).map_err(|e| format!("observers: {e}"))?;
    if of == Of::Embedded && observers.first().is_none_or(Vec::is_empty) {
        return Err("it holds no state of the egress view".into());
    }
    if of == Of::Embedded {
        grabflow_egress::view::Egress::decodes(&observers[0])
            .map_err(|e| format!("the egress view does not decode: {e}"))?;
    }
    let ledger = match of {
        Of::Embedded => postcard::from_bytes(&c.ledger).map_err(|e| format!("ledger: {e}"))?,
        Of::Kafka => Ledger::default(),
    };
    // Every part decodes (the workers restore them without checking).
    let all = |_: &grabflow_api::Id| true;
    c.dataflow
        .dedup(cfg.dedup_window_ms, all)
        .map_err(|e| e.to_string())?;
    c.dataflow
        .tracker((cfg.rider_ttl_ms, cfg.rider_retention_ms), all)
        .map_err(|e| e.to_string())?;
    c.dataflow
        .dispatcher(cfg.clone())
        .map_err(|e| e.to_string())?;
    Ok(Loaded {
        dataflow: c.dataflow,
        observers,
        ledger,
        from,
    })
}

/// The newest usable checkpoint in `store`, if any (see the module doc).
pub fn load(store: &CheckpointStore, cfg: &DispatchConfig) -> anyhow::Result<Option<Loaded>> {
    Ok(store
        .latest(|body| decode(body, cfg, Of::Embedded))?
        .map(|(_, l)| l))
}

/// The cluster's checkpoints of the dataflow `k` names, and the newest
/// usable one, if any. Blocking.
pub fn load_kafka(
    k: &KafkaConfig,
    cfg: &DispatchConfig,
) -> anyhow::Result<(KafkaCheckpoints, Option<Loaded>)> {
    let (store, latest) = KafkaCheckpoints::open(k, |body| decode(body, cfg, Of::Kafka))?;
    Ok((store, latest.map(|(_, l)| l)))
}

/// Where checkpoints are written.
pub enum Store {
    /// Files in the data dir (embedded log).
    Files(CheckpointStore),
    /// The cluster's checkpoint topic (Kafka).
    Kafka(KafkaCheckpoints),
}

impl Store {
    /// Writes `body` as the checkpoint as of `at`; its size and where.
    fn write(&mut self, at: grabflow_api::Time, body: &[u8]) -> Result<(u64, String), String> {
        match self {
            Store::Files(files) => files
                .write(at, body)
                .map(|w| (w.bytes, w.path.display().to_string()))
                .map_err(|e| e.to_string()),
            Store::Kafka(topic) => topic
                .write(at, body)
                .map(|w| (w.bytes, format!("{} records", w.records)))
                .map_err(|e| e.to_string()),
        }
    }

    /// The times of the checkpoints kept in the data dir (files only).
    fn kept(&self) -> Option<Result<Vec<Time>, String>> {
        match self {
            Store::Files(files) => Some(
                files
                    .list()
                    .map(|kept| kept.into_iter().map(|(t, _)| t).collect())
                    .map_err(|e| e.to_string()),
            ),
            Store::Kafka(_) => None,
        }
    }
}

/// What the checkpoints a restart may use need of the log, told to its
/// [`Retention`]: the lowest resume offset of the checkpoints kept. Not
/// only the newest's: a damaged newest one is skipped for the one before
/// (see [`load`]), which must still find its log. A checkpoint's offset
/// is known once this process wrote or loaded it; while the store keeps
/// one it does not know (written before the start, older than the one
/// loaded), nothing is deleted.
pub struct Needs {
    retention: Arc<Retention>,
    /// Resume offsets by checkpoint time, of those written or loaded.
    known: BTreeMap<Time, u64>,
}

impl Needs {
    /// For `retention`, knowing the loaded checkpoint `(time, offset)`.
    pub fn new(retention: Arc<Retention>, loaded: Option<(Time, u64)>) -> Needs {
        Needs {
            retention,
            known: loaded.into_iter().collect(),
        }
    }

    /// The checkpoint at `at` resumes at `from`; `kept` are the times of
    /// the checkpoints the store keeps now.
    fn wrote(&mut self, at: Time, from: u64, kept: &[Time]) {
        self.known.insert(at, from);
        self.known.retain(|t, _| kept.contains(t));
        if kept.iter().all(|t| self.known.contains_key(t)) {
            if let Some(&lowest) = self.known.values().min() {
                self.retention.checkpointed(lowest);
            }
        }
    }
}

/// The checkpoint thread: writes each checkpoint taken from `rx`, with the
/// log's `ledger` if it has one, into `store`, until `rx` closes (the
/// dataflow ended, after its last checkpoint) or it is stopped; tells
/// `needs` (the embedded log's retention) what the checkpoints kept need.
/// `before` runs ahead of each write; an error skips the checkpoint.
///
/// It runs at a lower priority (nice 10, this thread only): encoding and
/// writing are background work, and on a machine whose cores dispatch
/// keeps busy they wait for a free moment instead of taking one from the
/// dataflow or the HTTP threads (the service bench's order → offer p99
/// with a checkpoint every 250 ms doubled without it).
pub fn writer(
    mut store: Store,
    ledger: Option<LedgerSaver>,
    rx: mpsc::Receiver<Taken>,
    figures: SharedFigures,
    mut needs: Option<Needs>,
    before: impl Fn() -> Result<(), String> + Send + 'static,
) -> std::io::Result<Thread> {
    Thread::spawn("grabflow-checkpoint", move |stop| {
        // On Linux a nice value is per thread: the others keep theirs.
        if let Err(e) = rustix::process::setpriority_process(None, 10) {
            tracing::debug!("the checkpoint thread keeps its priority: {e}");
        }
        while let Some(taken) = next(&rx, &stop) {
            let started = Instant::now();
            // What the state leaves to others is where it goes (the view's
            // history on disk, the decisions acked by Kafka) before the
            // checkpoint that leaves it out; if it cannot be, no checkpoint.
            if let Err(e) = before() {
                figures.lock().expect("figures").failed_total += 1;
                tracing::error!(at = taken.at, "no checkpoint written: {e}");
                continue;
            }
            let state = taken.encode();
            let at = state.at;
            let from = state.resume().first().map(|&(_, offset)| offset);
            let body = Checkpoint {
                dataflow: state,
                ledger: ledger.as_ref().map(LedgerSaver::save).unwrap_or_default(),
                print: Print::probe(),
            };
            let written = postcard::to_allocvec(&body)
                .map_err(|e| e.to_string())
                .and_then(|bytes| store.write(at, &bytes));
            let mut f = figures.lock().expect("figures");
            match written {
                Ok((bytes, place)) => {
                    f.last_at = at;
                    f.last_bytes = bytes;
                    f.last_write_ms = started.elapsed().as_millis() as u64;
                    f.written = Some(Instant::now());
                    f.written_total += 1;
                    tracing::debug!(at, bytes, place, "checkpoint written");
                    drop(f);
                    if let (Some(needs), Some(from), Some(kept)) =
                        (needs.as_mut(), from, store.kept())
                    {
                        match kept {
                            Ok(kept) => needs.wrote(at, from, &kept),
                            Err(e) => tracing::warn!("listing the checkpoints: {e}"),
                        }
                    }
                }
                Err(e) => {
                    f.failed_total += 1;
                    tracing::error!(
                        at,
                        "writing a checkpoint failed (the next one is tried at its time): {e}"
                    );
                }
            }
        }
    })
}

/// The next checkpoint to write: the newest taken (a writer behind, on a
/// slow disk, skips those the newest supersedes); none once `rx` closes,
/// or once stopped and the dataflow's last one has not come within 15 s.
fn next(rx: &mpsc::Receiver<Taken>, stop: &grabflow_api::lifecycle::Stop) -> Option<Taken> {
    let taken = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(taken) => break taken,
            Err(mpsc::RecvTimeoutError::Timeout) if !stop.stopped() => continue,
            // Stopped: the dataflow's last checkpoint may still come.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break rx.recv_timeout(Duration::from_secs(15)).ok()?
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    };
    Some(rx.try_iter().last().unwrap_or(taken))
}
