//! Reads exactly one offset range `[start, end)` of one Kafka partition. Blocking: run it on a
//! blocking thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use blocksmith_runtime::kafka::{
    ConnectionError, ConnectionErrors, is_auth_failure, is_unrecoverable,
};
use blocksmith_runtime::topic_id::{any_broker, topic_id_from};

use crate::headers::raw_headers;
use crate::record::RecordRef;

/// Bound for single metadata and watermark requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Its `Debug` names the `extra` properties without their values, which may be credentials.
#[derive(Clone)]
pub struct ReaderConfig {
    pub bootstrap_servers: String,
    /// The topic's id (KIP-516) the range was planned in, when known: a topic of the same
    /// name with another id (deleted and created again) is refused before reading.
    pub topic_id: Option<String>,
    /// Extra librdkafka client properties (`security.protocol`, `sasl.*`, `isolation.level`,
    /// ...). They cannot override the settings that make the read exact (no group, no commit,
    /// no offset reset).
    pub extra: Vec<(String, String)>,
    /// Longest single wait for the next record; also how often `cancel` is checked.
    pub poll_timeout: Duration,
    /// Give up when the position has not advanced for this long.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for ReaderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_id", &self.topic_id)
            .field(
                "extra",
                &blocksmith_runtime::kafka::PropertyNames(&self.extra),
            )
            .field("poll_timeout", &self.poll_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl ReaderConfig {
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        ReaderConfig {
            bootstrap_servers: bootstrap_servers.into(),
            topic_id: None,
            extra: Vec::new(),
            poll_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub records: u64,
    /// Bytes of keys, values and headers delivered.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid offset range [{start}, {end})")]
    InvalidRange { start: i64, end: i64 },

    #[error("cannot set up the Kafka consumer: {0}")]
    Client(#[source] Box<KafkaError>),

    #[error(
        "{topic}[{partition}]: start offset {start} is no longer available (log start \
         {}, log end {}); the records were deleted by retention or the range lies outside the log",
        show(*low), show(*high)
    )]
    StartUnavailable {
        topic: String,
        partition: i32,
        start: i64,
        low: Option<i64>,
        high: Option<i64>,
    },

    #[error("cannot reach Kafka at {bootstrap}: {source}{}", suffix(last_error))]
    Unreachable {
        bootstrap: String,
        #[source]
        source: Box<KafkaError>,
        last_error: Option<Box<ConnectionError>>,
    },

    #[error(
        "{topic}[{partition}]: the topic was deleted and created again since the job was \
         planned: its id is {found:?}, the job's {planned:?}. Its offsets count other records; \
         the pipeline reports TopicRecreated with what to do"
    )]
    TopicRecreated {
        topic: String,
        partition: i32,
        planned: String,
        found: String,
    },

    #[error("{topic}[{partition}]: topic or partition does not exist")]
    TopicNotFound { topic: String, partition: i32 },

    #[error("{topic}[{partition}]: {source}; check the Kafka credentials and ACLs")]
    NotAuthorized {
        topic: String,
        partition: i32,
        #[source]
        source: Box<KafkaError>,
    },

    #[error("{topic}[{partition}]: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        #[source]
        source: Box<KafkaError>,
    },

    #[error(
        "{topic}[{partition}]: no progress for {idle:?} at offset {position} while reading up to \
         {end}{}",
        suffix(last_error)
    )]
    Stalled {
        topic: String,
        partition: i32,
        position: i64,
        end: i64,
        idle: Duration,
        last_error: Option<Box<ConnectionError>>,
    },

    #[error("{topic}[{partition}]: read cancelled at offset {position}")]
    Cancelled {
        topic: String,
        partition: i32,
        position: i64,
    },
}

impl ReadError {
    /// An outage (the brokers unreachable, or silent in the middle of the range) rather than
    /// something a person must fix. Connections refused for their credentials are not one.
    pub fn is_transient(&self) -> bool {
        match self {
            ReadError::Unreachable { last_error, .. } | ReadError::Stalled { last_error, .. } => {
                !last_error
                    .as_ref()
                    .is_some_and(|e| is_auth_failure(e.code()))
            }
            _ => false,
        }
    }
}

fn suffix(last_error: &Option<Box<ConnectionError>>) -> String {
    last_error
        .as_ref()
        .map(|e| format!(" (last Kafka error: {e})"))
        .unwrap_or_default()
}

fn show(offset: Option<i64>) -> String {
    offset.map_or_else(|| "unknown".to_owned(), |o| o.to_string())
}

/// Reads `[start, end)` of `topic`/`partition`, handing each record to `on_record` in offset
/// order. Offsets may be missing inside the range (compaction, transaction markers); the read
/// ends when the position reaches `end`, never by counting. An error from `on_record` stops the
/// read and is returned as is; the reader's own errors are converted with `E::from`.
pub fn read_range<E: From<ReadError>>(
    cfg: &ReaderConfig,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    cancel: &AtomicBool,
    mut on_record: impl FnMut(RecordRef<'_>) -> Result<(), E>,
) -> Result<ReadStats, E> {
    if start < 0 || end < start {
        return Err(ReadError::InvalidRange { start, end }.into());
    }
    let mut stats = ReadStats::default();
    if start == end {
        return Ok(stats);
    }
    let at = |position| Partition {
        topic,
        partition,
        position,
    };

    let mut consumer = CloseInBackground(Some(consumer(cfg)?));
    // An assignment to a missing partition would just wait; ask once so it fails clearly.
    check_partition(&consumer, cfg, topic, partition)?;
    assign(&consumer, topic, partition, start)?;
    let mut from_followers = fetches_from_followers(cfg);

    // The offset after the last record (or transaction marker) consumed.
    let mut next = start;
    let mut last_progress = Instant::now();
    while next < end {
        if cancel.load(Ordering::Relaxed) {
            return Err(at(next).cancelled().into());
        }
        match consumer.poll(cfg.poll_timeout) {
            None => {}
            Some(Ok(msg)) => {
                let offset = msg.offset();
                if offset >= end {
                    break;
                }
                // Never hand the same offset over twice, whatever the client does.
                if offset >= next {
                    let record = to_record(&msg);
                    stats.records += 1;
                    stats.bytes += record.size_bytes();
                    on_record(record)?;
                    next = offset + 1;
                    last_progress = Instant::now();
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // Markers and aborted records at the tail advance the position without
                // delivering anything.
                next = next.max(position(&consumer, topic, partition).unwrap_or(next));
                if next >= end {
                    break;
                }
                // EOF means everything below the log end the fetch saw has been delivered, so if
                // that end is at or past `end`, the rest of the range holds nothing to read. The
                // log end is queried with the consumer's isolation level (the last stable offset
                // under read_committed). This relies on jobs being planned below the log end as
                // seen with that isolation level: then the answer cannot run ahead of records
                // still in flight inside the range.
                //
                // The watermark comes from the leader, the end-of-partition from the replica
                // that served the fetch. With fetch-from-follower (`client.rack`) that may be a
                // follower whose high watermark lags the leader's: its end says nothing of the
                // offsets between it and the leader's. The rest of the range is then read from
                // the leader, whose end-of-partition the leader's watermark does settle.
                let leader_high = consumer
                    .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                    .map(|(_, high)| high);
                if let Err(err) = &leader_high {
                    consumer.context().note(err, "querying watermarks");
                }
                match at_end_of_partition(end, leader_high.ok(), from_followers) {
                    AtEnd::RangeDone => break,
                    AtEnd::ReadRestFromLeader => {
                        consumer = CloseInBackground(Some(consumer_of_leader(cfg)?));
                        assign(&consumer, topic, partition, next)?;
                        from_followers = false;
                    }
                    AtEnd::KeepReading => {}
                }
            }
            Some(Err(err)) => {
                if let Some(err) = at(next).classify(&consumer, start, err) {
                    return Err(err.into());
                }
            }
        }
        if let Some(source) = consumer.context().take_unrecoverable() {
            return Err(at(next).kafka(source).into());
        }
        if last_progress.elapsed() >= cfg.idle_timeout {
            let last_error = consumer.context().take_latest().map(Box::new);
            return Err(at(next).stalled(end, cfg.idle_timeout, last_error).into());
        }
    }
    Ok(stats)
}

/// Dropping a consumer that has a group id polls until it is closed, which took up to
/// 100 ms per job in the benchmark; the block does not need to wait for that.
struct CloseInBackground(Option<BaseConsumer<ConnectionErrors>>);

impl std::ops::Deref for CloseInBackground {
    type Target = BaseConsumer<ConnectionErrors>;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("consumer present until drop")
    }
}

impl Drop for CloseInBackground {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            std::thread::spawn(move || drop(consumer));
        }
    }
}

fn assign(
    consumer: &BaseConsumer<ConnectionErrors>,
    topic: &str,
    partition: i32,
    from: i64,
) -> Result<(), ReadError> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(from))
        .and_then(|()| consumer.assign(&assignment))
        .map_err(|e| ReadError::Client(Box::new(e)))
}

/// What an end-of-partition below the range's end means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AtEnd {
    /// The leader's log reaches the range's end, and the leader served the fetch: the rest
    /// of the range holds nothing to read.
    RangeDone,
    /// The leader's log reaches the range's end, but a follower (its high watermark may lag
    /// the leader's) served the fetch: read the rest from the leader.
    ReadRestFromLeader,
    /// The log does not reach the range's end yet (or its end is unknown).
    KeepReading,
}

fn at_end_of_partition(end: i64, leader_high: Option<i64>, from_followers: bool) -> AtEnd {
    match leader_high {
        Some(high) if high >= end && from_followers => AtEnd::ReadRestFromLeader,
        Some(high) if high >= end => AtEnd::RangeDone,
        _ => AtEnd::KeepReading,
    }
}

/// Whether the consumer may fetch from a follower (KIP-392): librdkafka does once the
/// client names its rack.
fn fetches_from_followers(cfg: &ReaderConfig) -> bool {
    cfg.extra
        .iter()
        .any(|(key, value)| key == "client.rack" && !value.is_empty())
}

/// A consumer of `cfg` that fetches from the leader only.
fn consumer_of_leader(cfg: &ReaderConfig) -> Result<BaseConsumer<ConnectionErrors>, ReadError> {
    let mut cfg = cfg.clone();
    cfg.extra.retain(|(key, _)| key != "client.rack");
    consumer(&cfg)
}

fn consumer(cfg: &ReaderConfig) -> Result<BaseConsumer<ConnectionErrors>, ReadError> {
    let mut config = ClientConfig::new();
    // librdkafka refuses `assign` without a group id even though no group is joined; `extra`
    // may name one that the Kafka ACLs allow.
    config
        .set("client.id", "blocksmith-builder")
        .set("group.id", "blocksmith-builder");
    for (key, value) in &cfg.extra {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .remove("group.instance.id")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "true");
    config
        .create_with_context(ConnectionErrors::default())
        .map_err(|e| ReadError::Client(Box::new(e)))
}

fn check_partition(
    consumer: &BaseConsumer<ConnectionErrors>,
    cfg: &ReaderConfig,
    topic: &str,
    partition: i32,
) -> Result<(), ReadError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT.min(cfg.idle_timeout))
        .map_err(|source| {
            // Client errors (refused connections, TLS or SASL failures) are delivered by `poll`.
            let _ = consumer.poll(Duration::from_millis(100));
            ReadError::Unreachable {
                bootstrap: cfg.bootstrap_servers.clone(),
                source: Box::new(source),
                last_error: consumer.context().take_latest().map(Box::new),
            }
        })?;
    let not_found = || ReadError::TopicNotFound {
        topic: topic.to_owned(),
        partition,
    };
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(not_found)?;
    match found.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Err(not_found()),
        Some(code) => {
            let source = KafkaError::MetadataFetch(code);
            return Err(Partition {
                topic,
                partition,
                position: 0,
            }
            .kafka(source));
        }
    }
    if !found.partitions().iter().any(|p| p.id() == partition) {
        return Err(not_found());
    }
    check_topic_id(consumer, cfg, topic, partition, any_broker(&metadata))
}

/// Refuses a topic whose id is not the one the job was planned in (see
/// [`ReaderConfig::topic_id`]). A broker that reports no id passes.
fn check_topic_id(
    consumer: &BaseConsumer<ConnectionErrors>,
    cfg: &ReaderConfig,
    topic: &str,
    partition: i32,
    broker: Result<i32, KafkaError>,
) -> Result<(), ReadError> {
    let Some(planned) = &cfg.topic_id else {
        return Ok(());
    };
    let timeout = REQUEST_TIMEOUT.min(cfg.idle_timeout);
    match broker.and_then(|broker| topic_id_from(consumer.client(), topic, broker, timeout)) {
        Ok(Some(found)) if found != *planned => Err(ReadError::TopicRecreated {
            topic: topic.to_owned(),
            partition,
            planned: planned.clone(),
            found,
        }),
        Ok(_) => Ok(()),
        Err(source) => Err(ReadError::Unreachable {
            bootstrap: cfg.bootstrap_servers.clone(),
            source: Box::new(source),
            last_error: consumer.context().take_latest().map(Box::new),
        }),
    }
}

/// Where a read stands, for error reports.
struct Partition<'a> {
    topic: &'a str,
    partition: i32,
    position: i64,
}

impl Partition<'_> {
    /// Turns a consumer error into the read's failure, or `None` for the informational errors
    /// librdkafka recovers from by itself (those are only noted for a later stall report).
    fn classify(
        &self,
        consumer: &BaseConsumer<ConnectionErrors>,
        start: i64,
        err: KafkaError,
    ) -> Option<ReadError> {
        let (topic, partition) = (self.topic.to_owned(), self.partition);
        Some(match err.rdkafka_error_code() {
            // With auto.offset.reset=error an unavailable offset surfaces as a failed reset.
            Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
                let watermarks = consumer
                    .fetch_watermarks(self.topic, self.partition, REQUEST_TIMEOUT)
                    .ok();
                ReadError::StartUnavailable {
                    topic,
                    partition,
                    start,
                    low: watermarks.map(|w| w.0),
                    high: watermarks.map(|w| w.1),
                }
            }
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition,
            ) => ReadError::TopicNotFound { topic, partition },
            _ if is_unrecoverable(&err) => self.kafka(err),
            _ => {
                consumer.context().note(&err, "consuming");
                return None;
            }
        })
    }

    fn kafka(&self, err: KafkaError) -> ReadError {
        let (topic, partition) = (self.topic.to_owned(), self.partition);
        let source = Box::new(err);
        if is_auth_failure(source.rdkafka_error_code()) {
            ReadError::NotAuthorized {
                topic,
                partition,
                source,
            }
        } else {
            ReadError::Kafka {
                topic,
                partition,
                source,
            }
        }
    }

    fn stalled(
        &self,
        end: i64,
        idle: Duration,
        last_error: Option<Box<ConnectionError>>,
    ) -> ReadError {
        ReadError::Stalled {
            topic: self.topic.to_owned(),
            partition: self.partition,
            position: self.position,
            end,
            idle,
            last_error,
        }
    }

    fn cancelled(&self) -> ReadError {
        ReadError::Cancelled {
            topic: self.topic.to_owned(),
            partition: self.partition,
            position: self.position,
        }
    }
}

fn position(consumer: &BaseConsumer<ConnectionErrors>, topic: &str, partition: i32) -> Option<i64> {
    match consumer
        .position()
        .ok()?
        .find_partition(topic, partition)?
        .offset()
    {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

fn to_record<'a>(msg: &'a BorrowedMessage<'_>) -> RecordRef<'a> {
    RecordRef {
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis(),
        key: msg.key(),
        value: msg.payload(),
        headers: raw_headers(msg).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use rdkafka::message::OwnedHeaders;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};

    use super::*;
    use crate::headers::with_raw_header;
    use crate::record::Record;

    const TOPIC: &str = "orders";

    #[derive(Debug)]
    enum TestError {
        Read(ReadError),
        Handler(i64),
    }

    impl From<ReadError> for TestError {
        fn from(err: ReadError) -> Self {
            TestError::Read(err)
        }
    }

    /// What the test producer writes at `offset` (the partition starts empty, so the i-th
    /// record sent lands at offset i).
    fn expected(offset: i64) -> Record {
        let mut headers = vec![(b"seq".to_vec(), Some(offset.to_be_bytes().to_vec()))];
        if offset % 3 == 0 {
            headers.push((b"null".to_vec(), None));
        }
        if offset % 5 == 0 {
            headers.push((b"not utf-8 \xff".to_vec(), Some(b"v".to_vec())));
        }
        Record {
            partition: 0,
            offset,
            timestamp_ms: Some(1_700_000_000_000 + offset * 1000),
            key: (offset % 10 != 0).then(|| format!("key-{offset}").into_bytes()),
            value: (offset % 7 != 0).then(|| format!("value-{offset}").repeat(3).into_bytes()),
            headers,
        }
    }

    fn producer(cluster: &MockCluster<'_, DefaultProducerContext>) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap()
    }

    fn produce(producer: &BaseProducer, records: impl IntoIterator<Item = Record>) {
        for r in records {
            let headers = r
                .headers
                .iter()
                .fold(OwnedHeaders::new(), |headers, (k, v)| {
                    with_raw_header(headers, k, v.as_deref())
                });
            let mut rec = BaseRecord::<[u8], [u8]>::to(TOPIC)
                .partition(r.partition)
                .timestamp(r.timestamp_ms.unwrap())
                .headers(headers);
            if let Some(key) = &r.key {
                rec = rec.key(key);
            }
            if let Some(value) = &r.value {
                rec = rec.payload(value);
            }
            producer.send(rec).map_err(|(e, _)| e).unwrap();
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// A one-broker mock cluster whose partition 0 holds offsets 0..count.
    fn cluster_with(count: i64) -> MockCluster<'static, DefaultProducerContext> {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        produce(&producer(&cluster), (0..count).map(expected));
        cluster
    }

    fn config(cluster: &MockCluster<'_, DefaultProducerContext>) -> ReaderConfig {
        ReaderConfig {
            poll_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(10),
            ..ReaderConfig::new(cluster.bootstrap_servers())
        }
    }

    /// [`config`] that gives up after `secs` without records.
    fn config_idle(cluster: &MockCluster<'_, DefaultProducerContext>, secs: u64) -> ReaderConfig {
        ReaderConfig {
            idle_timeout: Duration::from_secs(secs),
            ..config(cluster)
        }
    }

    fn read(
        cfg: &ReaderConfig,
        start: i64,
        end: i64,
    ) -> (Vec<Record>, Result<ReadStats, TestError>) {
        let mut got = Vec::new();
        let cancel = AtomicBool::new(false);
        let result = read_range(cfg, TOPIC, 0, start, end, &cancel, |r| {
            got.push(r.to_owned());
            Ok::<_, TestError>(())
        });
        (got, result)
    }

    /// Issue 11, scenario 6: with fetch-from-follower (`client.rack`) the follower serves the
    /// range, whatever high watermark it reports (here 40, the leader's is 100), and the read
    /// is exact. (librdkafka's mock follower returns the records past its watermark with it,
    /// so it never reports an end-of-partition below the leader's: the case the reader must
    /// not trust is covered by `only_a_leaders_end_of_partition_is_settled_by_its_watermark`.)
    #[test]
    fn a_lagging_followers_end_of_partition_never_ends_the_read_early() {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic(TOPIC, 1, 3).unwrap();
        cluster.partition_leader(TOPIC, 0, Some(1)).unwrap();
        cluster.broker_rack(2, "follower-rack").unwrap();
        cluster.partition_follower(TOPIC, 0, 2).unwrap();
        // Two batches: the follower serves the first, then reports its end at 40.
        let producer = producer(&cluster);
        produce(&producer, (0..40).map(expected));
        produce(&producer, (40..100).map(expected));
        cluster
            .follower_watermarks(TOPIC, 0, None, Some(40))
            .unwrap();
        let mut cfg = config(&cluster);
        cfg.extra
            .push(("client.rack".into(), "follower-rack".into()));

        let (got, result) = read(&cfg, 0, 100);

        result.expect("the read finishes");
        let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn only_a_leaders_end_of_partition_is_settled_by_its_watermark() {
        assert_eq!(at_end_of_partition(100, Some(100), false), AtEnd::RangeDone);
        assert_eq!(
            at_end_of_partition(100, Some(120), true),
            AtEnd::ReadRestFromLeader
        );
        assert_eq!(
            at_end_of_partition(100, Some(99), false),
            AtEnd::KeepReading
        );
        assert_eq!(at_end_of_partition(100, None, true), AtEnd::KeepReading);

        let mut cfg = ReaderConfig::new("kafka:9092");
        assert!(!fetches_from_followers(&cfg));
        cfg.extra.push(("client.rack".into(), String::new()));
        assert!(
            !fetches_from_followers(&cfg),
            "an empty rack fetches from leaders"
        );
        cfg.extra.push(("client.rack".into(), "eu-west-1a".into()));
        assert!(fetches_from_followers(&cfg));
    }

    #[test]
    fn reads_exactly_the_requested_range() {
        let cluster = cluster_with(250);
        let (got, result) = read(&config(&cluster), 100, 200);

        let want: Vec<Record> = (100..200).map(expected).collect();
        assert_eq!(got, want);
        let stats = result.unwrap();
        assert_eq!(stats.records, 100);
        assert_eq!(
            stats.bytes,
            want.iter().map(Record::size_bytes).sum::<u64>()
        );
    }

    #[test]
    fn reads_the_tail_up_to_the_high_watermark() {
        let cluster = cluster_with(250);
        let started = Instant::now();
        let (got, result) = read(&config(&cluster), 200, 250);

        assert_eq!(got, (200..250).map(expected).collect::<Vec<_>>());
        assert_eq!(result.unwrap().records, 50);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn empty_range_reads_nothing() {
        let cfg = ReaderConfig::new("127.0.0.1:1");
        let (got, result) = read(&cfg, 7, 7);
        assert!(got.is_empty());
        assert_eq!(result.unwrap(), ReadStats::default());
        assert!(matches!(
            read(&cfg, 8, 7).1,
            Err(TestError::Read(ReadError::InvalidRange { .. }))
        ));
    }

    #[test]
    fn range_past_the_log_end_stalls_instead_of_ending_early() {
        let cluster = cluster_with(50);
        let cfg = config_idle(&cluster, 1);
        let (got, result) = read(&cfg, 40, 60);

        assert_eq!(got.len(), 10);
        match result {
            Err(TestError::Read(err @ ReadError::Stalled { position, end, .. })) => {
                assert_eq!((position, end), (50, 60));
                assert!(err.is_transient(), "a stalled read is an outage: {err}");
            }
            other => panic!("expected Stalled, got {other:?}"),
        }
    }

    #[test]
    fn start_below_the_log_start_is_a_clear_error() {
        // The mock broker keeps about 5 MiB per partition and drops the oldest batches beyond
        // that, which moves the log start the way retention does.
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let producer = producer(&cluster);
        let big = |offset| Record {
            value: Some(vec![b'x'; 512 * 1024]),
            ..expected(offset)
        };
        for offset in 0..16 {
            produce(&producer, [big(offset)]);
        }
        let cfg = config(&cluster);
        let (got, result) = read(&cfg, 0, 16);

        assert!(got.is_empty());
        let err = match result {
            Err(TestError::Read(err @ ReadError::StartUnavailable { .. })) => err,
            other => panic!("expected StartUnavailable, got {other:?}"),
        };
        assert!(
            !err.is_transient(),
            "deleted records never come back: {err}"
        );
        let ReadError::StartUnavailable { low, high, .. } = &err else {
            unreachable!()
        };
        assert!(low.unwrap() > 0, "{err}");
        assert_eq!(*high, Some(16));
        let msg = err.to_string();
        for part in ["orders[0]", "start offset 0", "log start"] {
            assert!(msg.contains(part), "{msg}");
        }
    }

    #[test]
    fn handler_error_stops_the_read() {
        let cluster = cluster_with(250);
        let cancel = AtomicBool::new(false);
        let mut seen = 0;
        let result = read_range(&config(&cluster), TOPIC, 0, 100, 200, &cancel, |r| {
            seen += 1;
            if r.offset == 150 {
                Err(TestError::Handler(r.offset))
            } else {
                Ok(())
            }
        });
        assert!(matches!(result, Err(TestError::Handler(150))));
        assert_eq!(seen, 51);
    }

    #[test]
    fn cancel_stops_a_waiting_read() {
        let cluster = cluster_with(50);
        let cfg = config_idle(&cluster, 60);
        let cancel = Arc::new(AtomicBool::new(false));
        let canceller = {
            let cancel = Arc::clone(&cancel);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                cancel.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let mut got = 0;
        // Waits for offsets that do not exist yet until cancelled.
        let result = read_range(&cfg, TOPIC, 0, 0, 100, &cancel, |_| {
            got += 1;
            Ok::<_, TestError>(())
        });
        canceller.join().unwrap();

        assert_eq!(got, 50);
        assert!(matches!(
            result,
            Err(TestError::Read(ReadError::Cancelled { position: 50, .. }))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_topic_is_reported() {
        let cluster = cluster_with(1);
        let cfg = config_idle(&cluster, 3);
        let cancel = AtomicBool::new(false);
        let result = read_range(&cfg, "no-such-topic", 0, 0, 10, &cancel, |_| {
            Ok::<_, TestError>(())
        });
        match result {
            Err(TestError::Read(err @ ReadError::TopicNotFound { .. })) => {
                assert!(err.to_string().starts_with("no-such-topic[0]"), "{err}");
                assert!(!err.is_transient(), "a person must fix it: {err}");
            }
            other => panic!("expected TopicNotFound, got {other:?}"),
        }
    }

    #[test]
    fn a_topic_of_another_id_is_refused_and_its_own_id_read() {
        let cluster = cluster_with(10);
        let admin = producer(&cluster);
        let own =
            blocksmith_runtime::topic_id::topic_id(admin.client(), TOPIC, Duration::from_secs(10))
                .unwrap()
                .expect("the mock cluster reports topic ids");
        let with_id = |id: &str| ReaderConfig {
            topic_id: Some(id.to_owned()),
            ..config(&cluster)
        };
        assert_eq!(read(&with_id(&own), 0, 10).0.len(), 10);
        match read(&with_id("AAAAAAAAAAAAAAAAAAAAAQ"), 0, 10) {
            (records, Err(TestError::Read(err @ ReadError::TopicRecreated { .. }))) => {
                assert!(records.is_empty());
                assert!(!err.is_transient(), "a person must act: {err}");
                let msg = err.to_string();
                assert!(msg.contains("deleted and created again"), "{msg}");
                assert!(msg.contains(&own), "{msg}");
            }
            other => panic!("expected TopicRecreated, got {other:?}"),
        }
    }

    #[test]
    fn unreachable_kafka_is_reported() {
        let cfg = ReaderConfig {
            idle_timeout: Duration::from_secs(2),
            ..ReaderConfig::new("127.0.0.1:1")
        };
        let err = match read(&cfg, 0, 10).1 {
            Err(TestError::Read(err @ ReadError::Unreachable { .. })) => err,
            other => panic!("expected Unreachable, got {other:?}"),
        };
        let msg = err.to_string();
        assert!(
            err.is_transient(),
            "refused connections are an outage: {msg}"
        );
        assert!(
            msg.contains("127.0.0.1:1") && msg.contains("Connection refused"),
            "{msg}"
        );
    }

    #[test]
    fn refused_credentials_are_no_outage() {
        // SASL against a plaintext listener fails the handshake the way a wrong password does.
        let cluster = cluster_with(10);
        let cfg = ReaderConfig {
            idle_timeout: Duration::from_secs(3),
            extra: [
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "u"),
                ("sasl.password", "p"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
            ..config(&cluster)
        };
        let err = match read(&cfg, 0, 10).1 {
            Err(TestError::Read(err)) => err,
            other => panic!("expected a read error, got {other:?}"),
        };
        assert!(!err.is_transient(), "{err:?}");
    }
}
