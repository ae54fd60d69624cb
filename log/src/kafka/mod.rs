//! Kafka: the log of production mode.
//!
//! Events live in the input topics of [`Topics`](grabflow_api::topics::Topics),
//! keyed by their entity. [`open`] gives ingress its [`LogHandle`]: a
//! producer that answers once the broker has acked (`acks=all`), over a
//! ledger a follower keeps from the topics (so ids and keys appended by
//! other ingress processes count too).
//!
//! ## Layout
//!
//! - [`config`]: [`KafkaConfig`] (brokers, topic names, every client's
//!   settings), [`ensure_topics`], [`partitions`], [`KafkaError`].
//! - [`producer`]: [`KafkaLog`], ingress's producer.
//! - [`source`]: [`KafkaSource`], one dataflow worker's input partitions.
//! - [`follower`]: [`Follower`], rebuilding the ledger from the topics.
//! - [`checkpoints`]: [`KafkaCheckpoints`], the dataflow's checkpoints in a
//!   compacted topic.

pub mod checkpoints;
pub mod config;
pub mod follower;
pub mod producer;
pub mod source;

pub use checkpoints::KafkaCheckpoints;
pub use config::{
    ensure_topics, from_start, partitions, KafkaConfig, KafkaError, BATCH_HEADER, KEY_HEADER,
};
pub use follower::Follower;
pub use producer::KafkaLog;
pub use source::{Along, KafkaSource, KafkaSources};

use crate::ledger::Ledger;
use crate::LogHandle;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long ingress looks again for an order or merchant its ledger does
/// not know yet (another process may have appended it a moment ago; the
/// follower's fetches wait up to 100 ms for new records).
const SETTLE: Duration = Duration::from_millis(250);

/// Opens the Kafka log for appending: reads the input topics to their ends
/// (within `catch_up`) into a ledger, then makes the producer. The
/// follower goes on reading what other processes append until stopped.
/// The ledger remembers keys and ids for `windows` (log time: the
/// records' timestamps). The producer tells `along` of the ticks it sends
/// along with orders' events (give the same to this process's
/// [`KafkaSources`], if any). Blocking: call it off the async runtime.
pub fn open(
    cfg: &KafkaConfig,
    catch_up: Duration,
    windows: crate::ledger::Windows,
    along: Along,
) -> Result<(LogHandle, Follower), KafkaError> {
    let ledger = Arc::new(Mutex::new(Ledger::new(windows)));
    let follower = Follower::start(cfg, Arc::clone(&ledger))?;
    if !follower.wait_caught_up(catch_up) {
        follower.into_thread().stop();
        return Err(KafkaError::CatchUp(catch_up));
    }
    let producer = KafkaLog::new(cfg, Arc::clone(&ledger), along)?;
    let log = LogHandle::new(Arc::new(producer), ledger).following(SETTLE);
    Ok((log, follower))
}
