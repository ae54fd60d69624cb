//! Checkpoints of the whole service over the embedded log: the dataflow's
//! operators and the egress view as of one log time (gathered by the
//! dataflow, see `grabflow_dataflow::checkpoint`), with the log's ledger
//! (idempotency keys and known ids) and where the log resumes.
//!
//! Taking one: the dataflow hands each whole [`DataflowState`] to the
//! checkpoint thread ([`writer`]), which adds the ledger (appends wait the
//! few milliseconds its encoding takes) and writes the file
//! (`grabflow_log::checkpoints`). Dispatch does not wait for the file.
//!
//! Starting from one ([`load`]): the newest checkpoint that reads back whole
//! and decodes is used; the log replays only the events from its position
//! on and reads back into its ledger only those it lacks. A damaged or
//! half-written checkpoint is skipped, loudly, for the one before it (or
//! the whole log): nothing acknowledged is lost either way, since the log
//! holds every event.

use grabflow_api::lifecycle::Thread;
use grabflow_api::{DispatchConfig, Time};
use grabflow_dataflow::checkpoint::DataflowState;
pub use grabflow_egress::view::{CheckpointFigures as Figures, SharedFigures};
use grabflow_log::checkpoints::{CheckpointStore, Written};
use grabflow_log::embedded::Retention;
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
    /// The dataflow's and the view's state.
    pub dataflow: DataflowState,
    /// The log's ledger.
    pub ledger: Ledger,
    /// Where the log resumes: the first offset to replay.
    pub from: u64,
}

/// Decodes and checks a checkpoint's body for a start under `cfg`.
fn decode(body: &[u8], cfg: &DispatchConfig) -> Result<Loaded, String> {
    let c: Checkpoint = postcard::from_bytes(body).map_err(|e| format!("does not decode: {e}"))?;
    if c.print != Print::probe() {
        return Err("written by a build that prints idempotency keys differently".into());
    }
    let from = match c.dataflow.resume().as_slice() {
        [(0, from)] => *from,
        other => return Err(format!("not a checkpoint of the embedded log: {other:?}")),
    };
    if c.dataflow.observer.is_empty() {
        return Err("it holds no state of the egress view".into());
    }
    let ledger = postcard::from_bytes(&c.ledger).map_err(|e| format!("ledger: {e}"))?;
    // Every part decodes (the workers restore them without checking).
    let all = |_: &grabflow_api::Id| true;
    c.dataflow
        .dedup(cfg.dedup_window_ms, all)
        .map_err(|e| e.to_string())?;
    c.dataflow
        .tracker(cfg.rider_ttl_ms, all)
        .map_err(|e| e.to_string())?;
    c.dataflow
        .dispatcher(cfg.clone())
        .map_err(|e| e.to_string())?;
    Ok(Loaded {
        dataflow: c.dataflow,
        ledger,
        from,
    })
}

/// The newest usable checkpoint in `store`, if any (see the module doc).
pub fn load(store: &CheckpointStore, cfg: &DispatchConfig) -> anyhow::Result<Option<Loaded>> {
    Ok(store.latest(|body| decode(body, cfg))?.map(|(_, l)| l))
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

/// The checkpoint thread: writes each state from `rx` with the log's `ledger`
/// into `store`, until `rx` closes (the dataflow ended, after its last
/// checkpoint) or it is stopped; tells `needs` (the log's retention) what
/// the checkpoints kept need.
pub fn writer(
    store: CheckpointStore,
    ledger: LedgerSaver,
    rx: mpsc::Receiver<DataflowState>,
    figures: SharedFigures,
    mut needs: Option<Needs>,
) -> std::io::Result<Thread> {
    Thread::spawn("grabflow-checkpoint", move |stop| loop {
        let state = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(state) => state,
            Err(mpsc::RecvTimeoutError::Timeout) if !stop.stopped() => continue,
            // Stopped: the dataflow's last checkpoint may still come.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                match rx.recv_timeout(Duration::from_secs(15)) {
                    Ok(state) => state,
                    Err(_) => return,
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let started = Instant::now();
        let at = state.at;
        let from = state.resume().first().map(|&(_, offset)| offset);
        let body = Checkpoint {
            dataflow: state,
            ledger: ledger.save(),
            print: Print::probe(),
        };
        let written = postcard::to_allocvec(&body)
            .map_err(|e| e.to_string())
            .and_then(|bytes| store.write(at, &bytes).map_err(|e| e.to_string()));
        let mut f = figures.lock().expect("figures");
        match written {
            Ok(Written { bytes, path, .. }) => {
                f.last_at = at;
                f.last_bytes = bytes;
                f.last_write_ms = started.elapsed().as_millis() as u64;
                f.written = Some(Instant::now());
                f.written_total += 1;
                tracing::debug!(at, bytes, path = %path.display(), "checkpoint written");
                drop(f);
                if let (Some(needs), Some(from)) = (needs.as_mut(), from) {
                    match store.list() {
                        Ok(kept) => {
                            let kept: Vec<Time> = kept.into_iter().map(|(t, _)| t).collect();
                            needs.wrote(at, from, &kept);
                        }
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
    })
}
