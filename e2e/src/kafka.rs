//! Kafka for the scenarios: producing test data, reading and committing a group's offsets,
//! watermarks.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::Testbed;
use crate::datagen::{DataSpec, Produced, produce, produce_with};
use crate::wait::wait_for;

/// Produces `spec` to the testbed's broker (on a blocking thread).
pub async fn produce_data(tb: &Testbed, spec: DataSpec) -> Produced {
    produce_data_to(&tb.kafka_bootstrap, spec).await
}

/// Produces `spec` to the broker at `bootstrap` (on a blocking thread).
pub async fn produce_data_to(bootstrap: &str, spec: DataSpec) -> Produced {
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || produce(&bootstrap, &spec))
        .await
        .unwrap()
        .expect("produce")
}

/// Produces `spec` to the broker at `bootstrap` with more librdkafka `properties`.
pub async fn produce_data_with(
    bootstrap: &str,
    properties: Vec<(String, String)>,
    spec: DataSpec,
) -> Produced {
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || produce_with(&bootstrap, &properties, &spec))
        .await
        .unwrap()
        .expect("produce")
}

/// Partition → offset after its last produced record: what a complete run commits.
pub fn high_watermarks(produced: &Produced) -> BTreeMap<i32, i64> {
    produced
        .partitions
        .iter()
        .map(|(p, (_, high))| (*p, *high))
        .collect()
}

/// A consumer of `group` that never joins it: for reading and committing its offsets.
fn group_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// The group's committed offsets as the broker reports them (partition → offset).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let consumer = group_consumer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .filter_map(|p| match got.find_partition(topic, p)?.offset() {
            Offset::Offset(o) => Some((p, o)),
            _ => None,
        })
        .collect()
}

/// [`committed_offsets`] on a blocking thread.
pub async fn group_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let (b, g, t) = (bootstrap.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, partitions))
        .await
        .unwrap()
}

/// Commits `offsets` (partition → next offset to read) for `group` without joining it, as
/// the operator does: e.g. to give a pipeline a committed offset before it starts.
pub fn commit_offsets(bootstrap: &str, group: &str, topic: &str, offsets: &BTreeMap<i32, i64>) {
    use rdkafka::consumer::CommitMode;
    let consumer = group_consumer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .expect("offset");
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// The topic's id (KIP-516) as the broker reports it.
pub fn topic_id(bootstrap: &str, topic: &str) -> String {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    blocksmith_runtime::topic_id::topic_id(consumer.client(), topic, Duration::from_secs(10))
        .expect("topic id")
        .expect("the broker reports topic ids")
}

/// A partition's low and high watermarks (first offset still stored, next offset written).
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> (i64, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .expect("watermarks")
}

/// Waits until `group` has committed exactly `want` (partition → offset) on `topic`.
pub async fn wait_all_committed(
    tb: &Testbed,
    group: &str,
    topic: &str,
    want: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> BTreeMap<i32, i64> {
    let partitions = want.keys().max().map_or(0, |p| p + 1);
    wait_for(&format!("commits {want:?}"), timeout, || async {
        let c = group_offsets(&tb.kafka_bootstrap, group, topic, partitions).await;
        (c == *want).then_some(c)
    })
    .await
}
