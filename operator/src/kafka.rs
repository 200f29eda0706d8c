//! The operator's view of Kafka: a topic's partitions, their watermarks, and the pipeline's
//! consumer-group offsets, read and committed without joining the group. Blocking calls with
//! timeouts; callers run them on the blocking pool.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::planner::PartitionOffsets;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka is unavailable: {0}")]
    Unavailable(String),
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error("partitions {missing:?} are not in topic {topic:?} (it has {available})")]
    PartitionsNotFound {
        topic: String,
        missing: Vec<i32>,
        available: usize,
    },
    #[error(
        "Kafka refused the offset commit for group {group:?}: {reason}. The group must belong to this pipeline alone (no other consumers may join it)"
    )]
    CommitRefused { group: String, reason: String },
}

impl KafkaError {
    /// The condition reason users see.
    pub fn reason(&self) -> &'static str {
        match self {
            KafkaError::Unavailable(_) => "KafkaUnavailable",
            KafkaError::TopicNotFound(_) | KafkaError::PartitionsNotFound { .. } => "TopicNotFound",
            KafkaError::CommitRefused { .. } => "CommitRefused",
        }
    }
}

fn unavailable(e: RdError) -> KafkaError {
    KafkaError::Unavailable(e.to_string())
}

/// Connection settings: bootstrap servers plus librdkafka properties (security, SASL, TLS),
/// with secrets already resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaConnection {
    pub bootstrap_servers: String,
    pub group: String,
    pub properties: Vec<(String, String)>,
}

pub struct KafkaOffsets {
    consumer: BaseConsumer,
    group: String,
    timeout: Duration,
}

impl KafkaOffsets {
    pub fn connect(conn: &KafkaConnection, timeout: Duration) -> Result<Self, KafkaError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &conn.bootstrap_servers)
            .set("group.id", &conn.group)
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            .set("socket.timeout.ms", timeout.as_millis().to_string());
        for (k, v) in &conn.properties {
            cfg.set(k, v);
        }
        let consumer = cfg.create().map_err(unavailable)?;
        Ok(Self {
            consumer,
            group: conn.group.clone(),
            timeout,
        })
    }

    /// The topic's partitions, or the requested subset after checking it exists.
    pub fn partitions(&self, topic: &str, subset: Option<&[i32]>) -> Result<Vec<i32>, KafkaError> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(unavailable)?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| KafkaError::TopicNotFound(topic.into()))?;
        match t.error() {
            None => {}
            Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
                return Err(KafkaError::TopicNotFound(topic.into()));
            }
            Some(e) => {
                return Err(KafkaError::Unavailable(format!(
                    "{:?}",
                    RDKafkaErrorCode::from(e)
                )));
            }
        }
        let mut all: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        all.sort_unstable();
        if all.is_empty() {
            return Err(KafkaError::TopicNotFound(topic.into()));
        }
        match subset {
            None => Ok(all),
            Some(wanted) => {
                let missing: Vec<i32> = wanted
                    .iter()
                    .copied()
                    .filter(|p| !all.contains(p))
                    .collect();
                if missing.is_empty() {
                    let mut w = wanted.to_vec();
                    w.sort_unstable();
                    w.dedup();
                    Ok(w)
                } else {
                    Err(KafkaError::PartitionsNotFound {
                        topic: topic.into(),
                        missing,
                        available: all.len(),
                    })
                }
            }
        }
    }

    /// Low and high watermarks and the group's committed offset of each partition, in three
    /// batched requests.
    pub fn offsets(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<PartitionOffsets>, KafkaError> {
        let lows = self.list_offsets(topic, partitions, Offset::Beginning)?;
        let highs = self.list_offsets(topic, partitions, Offset::End)?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(unavailable)?;
        partitions
            .iter()
            .map(|p| {
                let c = committed
                    .find_partition(topic, *p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                Ok(PartitionOffsets {
                    partition: *p,
                    low: lows[p],
                    high: highs[p],
                    committed: c,
                })
            })
            .collect()
    }

    fn list_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
        at: Offset,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, *p, at)
                .map_err(unavailable)?;
        }
        let res = self
            .consumer
            .offsets_for_times(tpl, self.timeout)
            .map_err(unavailable)?;
        partitions
            .iter()
            .map(|p| {
                let e = res.find_partition(topic, *p).ok_or_else(|| {
                    KafkaError::Unavailable(format!("no offset for partition {p}"))
                })?;
                e.error().map_err(unavailable)?;
                match e.offset() {
                    Offset::Offset(o) => Ok((*p, o)),
                    other => Err(KafkaError::Unavailable(format!(
                        "partition {p}: offset {other:?}"
                    ))),
                }
            })
            .collect()
    }

    /// Commits `offsets` (partition → next offset to read) for the group.
    pub fn commit(&self, topic: &str, offsets: &BTreeMap<i32, i64>) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(unavailable)?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| match e.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::RebalanceInProgress
                    | RDKafkaErrorCode::FencedInstanceId,
                ) => KafkaError::CommitRefused {
                    group: self.group.clone(),
                    reason: e.to_string(),
                },
                _ => unavailable(e),
            })?;
        // A sync commit can still fail per partition.
        Ok(())
    }
}
