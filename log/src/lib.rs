//! # grabflow-log — the log
//!
//! Every event grabflow acts on is first made durable here, and the
//! dataflow reads it back from here. One seam, two implementations:
//!
//! - [`embedded`]: fsynced, checksummed segment files in the data
//!   directory (the default: no external service), old ones deleted after
//!   a retention once no checkpoint needs them. Its writer gives each event its offset
//!   and time and hands committed events to the dataflow's feed.
//! - [`kafka`]: production mode. Ingress produces to the input topics
//!   (`acks=all`); each dataflow worker reads its partitions through a
//!   [`KafkaSource`](kafka::KafkaSource); a follower keeps the ledger of a
//!   process that did not write everything itself.
//!
//! Both answer an append through a [`LogHandle`] only once the events are
//! durable, and both keep the same [`Ledger`]: idempotency keys (a retry
//! gets the first answer, another request with the key a 422), the ids the
//! log holds (404s on unknown orders and merchants), and one placement per
//! order. The ledger's rules are written once, in [`ledger`]; each log
//! only says when an append was admitted, made durable, or failed, and what
//! it reads back.
//!
//! ## Layout
//!
//! - [`LogHandle`], [`Append`], [`Appended`], [`LogError`]: the seam.
//! - [`ledger`]: [`Ledger`] (keys and known ids) and [`Known`].
//! - [`keys`]: idempotency keys: each key's first answer and a print of
//!   its request.
//! - [`embedded`]: the file log — `format` (framing and record forms),
//!   `recovery` (reading back, cutting a torn tail), `segments` (the
//!   files, rolling, migration, retention), `writer` (replay, group
//!   commit, ticks), `space` (zero-filled room), `direct` (direct I/O).
//! - [`throttle`]: repeated identical warnings, rate-limited.
//! - [`checkpoints`]: checkpoint files (versioned, checksummed, written
//!   atomically, read back newest first skipping damaged ones).
//! - [`kafka`]: `config` (settings, topics, errors), `producer` (appends),
//!   `source` (the dataflow's partitions, time from the log, ticks),
//!   `follower` (rebuilding the ledger from the input topics).

pub mod checkpoints;
pub mod embedded;
pub mod kafka;
pub mod keys;
pub mod ledger;
pub mod throttle;

pub use ledger::{Known, Ledger};

use grabflow_api::{EventKind, Id, Time};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// The answer to an append: what a retry with the same key gets again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Appended {
    /// One event appended: its id and offset.
    One {
        /// The event's id.
        event_id: Id,
        /// Its position in the log.
        offset: u64,
    },
    /// A batch: how many events it held.
    Batch {
        /// Events appended.
        accepted: usize,
    },
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file could not be read, written or synced.
    #[error("log i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The log is damaged other than by a torn tail: nothing was cut, and
    /// an operator decides (`grabflow log verify`, `grabflow log repair`).
    #[error(
        "{}: the record at byte {offset} is damaged and {following} whole records follow it \
         (not a torn tail), so nothing was cut. See the damage with `grabflow log verify \
         --data-dir {dir}`; `grabflow log repair --data-dir {dir}` keeps every whole record \
         and moves the damaged bytes to a quarantine file beside the log",
        path.display(),
        dir = embedded::segments::data_dir_of(path).display()
    )]
    Damaged {
        /// The log file.
        path: std::path::PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// Whole records after it.
        following: usize,
    },
    /// The log's segments do not follow on (one is missing, or does not
    /// start where the one before ends), or a segment other than the last
    /// ends in a torn record: nothing was cut or deleted.
    #[error(
        "{}: {why}; nothing was cut or deleted. See the log with `grabflow log verify \
         --data-dir {dir}`",
        path.display(),
        dir = embedded::segments::data_dir_of(path).display()
    )]
    Segments {
        /// The segment (or the log's directory) at fault.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The broker did not take the event (or could not be reached).
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaError),
    /// The dataflow is this many events behind the log: retry shortly
    /// (see [`embedded::backlog`]).
    #[error("the dataflow is {0} events behind the log; retry shortly")]
    Behind(u64),
    /// The writer has stopped (shutting down).
    #[error("the log is closed")]
    Closed,
    /// The idempotency key was first used for a different request.
    #[error(transparent)]
    KeyReused(#[from] keys::KeyReused),
    /// An order with this id was placed already.
    #[error("order {0} exists")]
    OrderExists(Id),
}

/// An append under way: resolves once the events are durable.
pub type Pending<'a> = Pin<Box<dyn Future<Output = Result<Appended, LogError>> + Send + 'a>>;

/// A log that takes appends: the embedded writer or the Kafka producer.
pub trait Append: Send + Sync + 'static {
    /// Appends `events` as one append and answers once every one is
    /// durable. Before appending, the log asks its [`Ledger`] to admit the
    /// append (a repeated key gets its first answer and appends nothing);
    /// after, it tells the ledger what became of it.
    fn append(&self, key: Option<String>, events: Vec<(Id, EventKind)>) -> Pending<'_>;
}

/// Saves a log's ledger for checkpoints (see [`LogHandle::ledger_saver`]).
pub struct LedgerSaver(Arc<Mutex<Ledger>>);

impl LedgerSaver {
    /// The ledger in postcard (with the offset before which it has taken
    /// in every event). Appends wait while it is encoded.
    pub fn save(&self) -> Vec<u8> {
        let ledger = self.0.lock().expect("ledger");
        postcard::to_allocvec(&*ledger).expect("the ledger serializes")
    }
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct LogHandle {
    appender: Arc<dyn Append>,
    ledger: Arc<Mutex<Ledger>>,
    /// How long an id not (yet) in the ledger is looked for again.
    settle: std::time::Duration,
}

impl LogHandle {
    /// A handle appending through `appender`, whose ledger is `ledger`.
    pub fn new(appender: Arc<dyn Append>, ledger: Arc<Mutex<Ledger>>) -> LogHandle {
        LogHandle {
            appender,
            ledger,
            settle: std::time::Duration::ZERO,
        }
    }

    /// The same handle over a log that other processes append to, whose
    /// ledger learns of their appends by following the log, a fetch or two
    /// behind: an id it does not know yet is looked for again for up to
    /// `settle` before it counts as unknown (a rider grabbing an order
    /// another ingress took, the moment its offer arrives, finds it).
    pub fn following(mut self, settle: std::time::Duration) -> LogHandle {
        self.settle = settle;
        self
    }

    /// Whether `known` holds now, or within the handle's settle time.
    async fn settled(&self, known: impl Fn(&Ledger) -> bool) -> bool {
        let deadline = std::time::Instant::now() + self.settle;
        loop {
            if known(&self.ledger.lock().expect("ledger")) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Whether the log holds the placement of `order`, as
    /// [`LogHandle::knows_order`], waiting up to the settle time for it.
    pub async fn finds_order(&self, order: &Id) -> bool {
        self.settled(|l| l.knows_order(order)).await
    }

    /// Whether the log holds the registration of `merchant`, as
    /// [`LogHandle::knows_merchant`], waiting up to the settle time for it.
    pub async fn finds_merchant(&self, merchant: &Id) -> bool {
        self.settled(|l| l.knows_merchant(merchant)).await
    }

    /// What saves the ledger for checkpoints. It holds the ledger alone,
    /// not the log: the log still closes once every handle is dropped.
    pub fn ledger_saver(&self) -> LedgerSaver {
        LedgerSaver(Arc::clone(&self.ledger))
    }

    /// Appends `events` durably (one append) and answers once they are
    /// durable. With an idempotency `key` already used, appends nothing and
    /// returns the first answer (or [`LogError::KeyReused`] for another
    /// request).
    pub async fn append(
        &self,
        key: Option<String>,
        events: Vec<(Id, EventKind)>,
    ) -> Result<Appended, LogError> {
        self.appender.append(key, events).await
    }

    /// Whether the log holds the placement of `order`, mentioned within
    /// the known window.
    pub fn knows_order(&self, order: &Id) -> bool {
        self.ledger.lock().expect("ledger").knows_order(order)
    }

    /// Whether the log holds the registration of `merchant`, mentioned
    /// within the known window.
    pub fn knows_merchant(&self, merchant: &Id) -> bool {
        self.ledger.lock().expect("ledger").knows_merchant(merchant)
    }
}

/// Wall-clock Unix milliseconds: the time a log gives what it appends.
pub fn now_ms() -> Time {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}
