//! A split ingress process's calls wait for decisions made in another
//! process: this follows the grabs and transitions topics from their ends
//! and answers them (a grab's decision; a pickup's or delivery's transition
//! or rejection).

use grabflow_api::lifecycle::Thread;
use grabflow_api::topics::OutputRecord;
use grabflow_http::waiter::{verdict_of, Waiting};
use grabflow_log::kafka::{partitions, KafkaConfig, KafkaError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

/// Follows the grabs and transitions topics from their ends on its own
/// thread (until stopped), resolving the calls waiting in `waiters`.
pub fn follow_verdicts(cfg: &KafkaConfig, waiters: Arc<Waiting>) -> Result<Thread, KafkaError> {
    let topics = cfg.topics();
    let consumer: BaseConsumer = cfg.consumer(&format!("{}ingress", cfg.prefix)).create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in [&topics.grabs, &topics.transitions] {
        for p in 0..partitions(&consumer, topic)? {
            tpl.add_partition_offset(topic, p, Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    Thread::spawn("grabflow-verdicts", move |stop| {
        while !stop.stopped() {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let record: Option<OutputRecord> =
                m.payload().and_then(|v| serde_json::from_slice(v).ok());
            if let Some(verdict) = record.as_ref().and_then(|r| verdict_of(&r.output)) {
                waiters.resolve([verdict]);
            }
        }
    })
    .map_err(KafkaError::Thread)
}
