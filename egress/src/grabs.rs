//! A split ingress process's grab calls wait for decisions made in another
//! process: this follows the grabs topic from its end and answers them.

use grabflow_api::lifecycle::Thread;
use grabflow_api::topics::OutputRecord;
use grabflow_api::Output;
use grabflow_http::grab::GrabResults;
use grabflow_log::kafka::{partitions, KafkaConfig, KafkaError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

/// Follows the grabs topic from its end on its own thread (until stopped),
/// resolving the calls waiting in `waiters`.
pub fn follow_grabs(cfg: &KafkaConfig, waiters: Arc<GrabResults>) -> Result<Thread, KafkaError> {
    let topic = cfg.topics().grabs;
    let consumer: BaseConsumer = cfg.consumer(&format!("{}ingress", cfg.prefix)).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(&consumer, &topic)? {
        tpl.add_partition_offset(&topic, p, Offset::End)?;
    }
    consumer.assign(&tpl)?;
    Thread::spawn("grabflow-grabs", move |stop| {
        while !stop.stopped() {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let decided = m.payload().and_then(|v| serde_json::from_slice(v).ok());
            if let Some(OutputRecord {
                output:
                    Output::GrabDecided {
                        attempt, outcome, ..
                    },
                ..
            }) = decided
            {
                waiters.resolve(&attempt, outcome);
            }
        }
    })
    .map_err(KafkaError::Thread)
}
