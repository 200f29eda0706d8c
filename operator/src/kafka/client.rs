//! The operator's Kafka client: partitions, watermarks and the group's offsets, read and
//! committed without joining the group.

use std::collections::BTreeMap;
use std::time::Duration;

use blocksmith_runtime::kafka::ConnectionErrors;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::error::{KafkaError, classify, unavailable};
use super::settings::KafkaConnection;
use crate::committer::forward_only;
use crate::planner::PartitionOffsets;

/// A topic's partitions as the metadata lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPartitions {
    /// The partitions (all, or the subset asked for), in order.
    pub ids: Vec<i32>,
    /// A broker of that metadata, to send admin requests to.
    pub broker: i32,
}

pub struct KafkaOffsets {
    consumer: BaseConsumer<ConnectionErrors>,
    group: String,
    credentials: String,
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
        let consumer = cfg
            .create_with_context(ConnectionErrors::default())
            .map_err(unavailable)?;
        Ok(Self {
            consumer,
            group: conn.group.clone(),
            credentials: conn.credentials.clone(),
            timeout,
        })
    }

    /// How long a request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Serves the client's queued events: connection errors reach `ConnectionErrors` only
    /// through a poll (and would otherwise pile up in the queue). The consumer has no
    /// assignment, so no message can come.
    fn serve_events(&self, wait: Duration) {
        let mut wait = wait;
        for _ in 0..1000 {
            if self.consumer.poll(wait).is_none() {
                break;
            }
            wait = Duration::ZERO;
        }
    }

    /// A failed request, explained by the last connection error.
    fn failed(&self, e: RdError) -> KafkaError {
        // The connection error that failed the request reaches the queue a moment after the
        // request's own failure: give it up to a second.
        self.serve_events(Duration::ZERO);
        for _ in 0..10 {
            if self.consumer.context().cause().is_some() {
                break;
            }
            self.serve_events(Duration::from_millis(100));
        }
        classify(
            &e,
            self.consumer.context().cause().as_ref(),
            &self.credentials,
        )
    }

    /// The cluster id the brokers report (Kafka ≥ 0.10.1), which tells one cluster from
    /// another whatever the bootstrap addresses.
    pub fn cluster_id(&self) -> Option<String> {
        self.consumer.client().fetch_cluster_id(self.timeout)
    }

    /// The topic's id (KIP-516), where the brokers report one: it tells the topic from one
    /// deleted and created again under its name. `broker` is one [`Self::partitions`] found.
    pub fn topic_id(&self, topic: &str, broker: i32) -> Result<Option<String>, KafkaError> {
        blocksmith_runtime::topic_id::topic_id_from(
            self.consumer.client(),
            topic,
            broker,
            self.timeout,
        )
        .map_err(|e| self.failed(e))
    }

    /// The topic's partitions, or the requested subset after checking it exists, and a broker
    /// of the metadata that told them (to ask the topic's id of).
    pub fn partitions(
        &self,
        topic: &str,
        subset: Option<&[i32]>,
    ) -> Result<TopicPartitions, KafkaError> {
        self.serve_events(Duration::ZERO);
        let md = self
            .consumer
            .fetch_metadata(Some(topic), self.timeout)
            .map_err(|e| self.failed(e))?;
        // The brokers answered: earlier connection errors are history.
        self.consumer.context().clear();
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
        let broker = blocksmith_runtime::topic_id::any_broker(&md)
            .map_err(|_| KafkaError::Unavailable("the metadata names no broker".into()))?;
        let ids = match subset {
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
        }?;
        Ok(TopicPartitions { ids, broker })
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
        let committed = self.committed(topic, partitions)?;
        Ok(partitions
            .iter()
            .map(|p| PartitionOffsets {
                partition: *p,
                low: lows[p],
                high: highs[p],
                committed: committed.get(p).copied(),
            })
            .collect())
    }

    /// The group's committed offset of each partition that has one. A partition whose
    /// offset the broker could not read is an error, not "no offset": planning from none
    /// would commit a start offset over it.
    fn committed(&self, topic: &str, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let mut committed = BTreeMap::new();
        for (p, read) in self.read_committed(topic, partitions)? {
            let offset = read.map_err(|e| {
                KafkaError::Unavailable(format!(
                    "reading the group's committed offset of partition {p} failed: {e}"
                ))
            })?;
            committed.extend(offset.map(|o| (p, o)));
        }
        Ok(committed)
    }

    /// Each partition's committed offset (`None`: the group has none), or why the broker
    /// could not read it.
    fn read_committed(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, Result<Option<i64>, String>>, KafkaError> {
        // The request ignores the offsets in the list.
        let answer = self
            .consumer
            .committed_offsets(
                partition_list(topic, partitions, Offset::Invalid)?,
                self.timeout,
            )
            .map_err(|e| self.failed(e))?;
        Ok(partitions
            .iter()
            .map(|p| {
                let read = match answer.find_partition(topic, *p) {
                    None => Err("the broker did not answer for it".to_string()),
                    Some(e) => e
                        .error()
                        .map_err(|e| e.to_string())
                        .map(|()| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        }),
                };
                (*p, read)
            })
            .collect())
    }

    /// The partitions whose committed offset is not at least its target in `offsets`, as
    /// read back from the broker after a commit.
    fn not_committed(
        &self,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<Vec<i32>, KafkaError> {
        let partitions: Vec<i32> = offsets.keys().copied().collect();
        Ok(self
            .read_committed(topic, &partitions)?
            .into_iter()
            .filter(|(p, read)| !matches!(read, Ok(Some(o)) if o >= &offsets[p]))
            .map(|(p, _)| p)
            .collect())
    }

    fn list_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
        at: Offset,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let res = self
            .consumer
            .offsets_for_times(partition_list(topic, partitions, at)?, self.timeout)
            .map_err(|e| self.failed(e))?;
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

    /// Commits `offsets` (partition → next offset to read) for the group, but never moves a
    /// partition's offset backwards: one the group has already reached, read just before the
    /// commit, is left as it is (another operator committed past it, e.g. the next leader
    /// while this one was being deposed). Returns what was committed.
    ///
    /// `may_commit` is asked right before the commit request is sent; when it says no,
    /// nothing is committed ([`KafkaError::NotLeading`]).
    pub fn commit(
        &self,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
        may_commit: &dyn Fn() -> bool,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let partitions: Vec<i32> = offsets.keys().copied().collect();
        let current = self.committed(topic, &partitions)?;
        let forward = forward_only(offsets, &current);
        for (p, target) in offsets.iter().filter(|(p, _)| !forward.contains_key(p)) {
            tracing::warn!(
                topic,
                partition = p,
                committed = current[p],
                target,
                "not moving a committed offset backwards: the group is already there"
            );
        }
        self.commit_as_is(topic, &forward, may_commit)?;
        Ok(forward)
    }

    /// Commits the group's offsets of `partitions` again, unchanged, so that Kafka counts
    /// its retention of them from now. Returns what was committed.
    pub fn refresh(
        &self,
        topic: &str,
        partitions: &[i32],
        may_commit: &dyn Fn() -> bool,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let current = self.committed(topic, partitions)?;
        self.commit_as_is(topic, &current, may_commit)?;
        Ok(current)
    }

    fn commit_as_is(
        &self,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
        may_commit: &dyn Fn() -> bool,
    ) -> Result<(), KafkaError> {
        if offsets.is_empty() {
            return Ok(());
        }
        if !may_commit() {
            return Err(KafkaError::NotLeading(self.timeout));
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(unavailable)?;
        }
        let result = self.consumer.commit(&tpl, CommitMode::Sync);
        if let Err(e) = &result
            && let Some(
                RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId,
            ) = e.rdkafka_error_code()
        {
            return Err(KafkaError::CommitRefused {
                group: self.group.clone(),
                reason: e.to_string(),
            });
        }
        // The request's result speaks for the whole request (at best for one partition):
        // which partitions took the commit is read back from the broker.
        match (result, self.not_committed(topic, offsets)) {
            (_, Ok(failed)) if failed.is_empty() => Ok(()),
            (Err(e), Ok(failed)) => Err(KafkaError::Unavailable(format!(
                "the offset commit failed for partitions {failed:?}: {e}"
            ))),
            (Ok(()), Ok(failed)) => Err(KafkaError::Unavailable(format!(
                "Kafka accepted the offset commit, but partitions {failed:?} do not have it"
            ))),
            (Err(e), Err(_)) => Err(self.failed(e)),
            (Ok(()), Err(read_back)) => Err(read_back),
        }
    }
}

/// `partitions` of `topic`, each at `at`.
fn partition_list(
    topic: &str,
    partitions: &[i32],
    at: Offset,
) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, at)
            .map_err(unavailable)?;
    }
    Ok(tpl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::settings::credentials_description;
    use crate::kafka::settings::tests::selector;
    use blocksmith_crds::Reason;

    fn conn(bootstrap: &str, properties: &[(&str, &str)]) -> KafkaConnection {
        KafkaConnection {
            bootstrap_servers: bootstrap.into(),
            group: "g".into(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            credentials: credentials_description(
                &selector("kafka-creds", "username"),
                &selector("kafka-creds", "password"),
            ),
        }
    }

    #[test]
    fn an_unreachable_broker_is_reported_with_the_connection_error() {
        let k = KafkaOffsets::connect(&conn("127.0.0.1:1", &[]), Duration::from_secs(3)).unwrap();
        let e = k.partitions("t", None).unwrap_err();
        assert_eq!(e.reason(), Reason::KafkaUnavailable);
        let message = e.to_string();
        assert!(
            message.contains("127.0.0.1:1") && message.contains("Connection refused"),
            "{message}"
        );
    }

    #[test]
    fn sasl_against_a_broker_without_it_is_an_authentication_failure() {
        // librdkafka's mock cluster has no SASL: the handshake fails with the error code a
        // rejected password gets (`__AUTHENTICATION`).
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let k = KafkaOffsets::connect(
            &conn(
                &cluster.bootstrap_servers(),
                &[
                    ("security.protocol", "sasl_plaintext"),
                    ("sasl.mechanism", "PLAIN"),
                    ("sasl.username", "u"),
                    ("sasl.password", "p"),
                ],
            ),
            Duration::from_secs(3),
        )
        .unwrap();
        let e = k.partitions("t", None).unwrap_err();
        assert_eq!(e.reason(), Reason::KafkaAuthenticationFailed, "{e}");
        let message = e.to_string();
        assert!(
            message.contains("SASL Handshake not supported by broker")
                && message.contains(r#"secret "kafka-creds""#),
            "{message}"
        );
    }

    fn mock_with_topic(
        partitions: i32,
    ) -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        KafkaOffsets,
    ) {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("t", partitions, 1).unwrap();
        let k = KafkaOffsets::connect(
            &conn(&cluster.bootstrap_servers(), &[]),
            Duration::from_secs(5),
        )
        .unwrap();
        (cluster, k)
    }

    #[test]
    fn a_partition_the_commit_failed_for_fails_the_commit() {
        // Partition 7 does not exist: the broker refuses it and accepts partition 0.
        let (_cluster, k) = mock_with_topic(1);
        let e = k
            .commit_as_is("t", &BTreeMap::from([(0, 10), (7, 10)]), &|| true)
            .unwrap_err();
        let message = e.to_string();
        assert!(message.contains("partitions [7]"), "{message}");
        assert_eq!(k.committed("t", &[0]).unwrap(), BTreeMap::from([(0, 10)]));
    }

    #[test]
    fn a_partition_whose_committed_offset_cannot_be_read_is_an_error_not_no_offset() {
        let (_cluster, k) = mock_with_topic(1);
        k.commit_as_is("t", &BTreeMap::from([(0, 10)]), &|| true)
            .unwrap();
        let e = k.committed("t", &[0, 7]).unwrap_err();
        assert!(e.to_string().contains("partition 7"), "{e}");
        assert_eq!(k.committed("t", &[0]).unwrap(), BTreeMap::from([(0, 10)]));
    }

    #[test]
    fn a_commit_never_moves_the_group_offset_backwards() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let k = KafkaOffsets::connect(
            &conn(&cluster.bootstrap_servers(), &[]),
            Duration::from_secs(5),
        )
        .unwrap();
        let committed = |k: &KafkaOffsets| k.committed("t", &[0, 1]).unwrap();
        let done = k
            .commit("t", &BTreeMap::from([(0, 100), (1, 10)]), &|| true)
            .unwrap();
        assert_eq!(done, BTreeMap::from([(0, 100), (1, 10)]));
        // A deposed leader's commit from an older reading: partition 0 stays at 100.
        let stale = k
            .commit("t", &BTreeMap::from([(0, 50), (1, 20)]), &|| true)
            .unwrap();
        assert_eq!(stale, BTreeMap::from([(1, 20)]));
        assert_eq!(committed(&k), BTreeMap::from([(0, 100), (1, 20)]));
        assert!(
            k.commit("t", &BTreeMap::from([(0, 100)]), &|| true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn no_commit_or_refresh_is_sent_once_the_fence_says_no() {
        let (_cluster, k) = mock_with_topic(1);
        k.commit("t", &BTreeMap::from([(0, 10)]), &|| true).unwrap();
        let e = k
            .commit("t", &BTreeMap::from([(0, 20)]), &|| false)
            .unwrap_err();
        assert!(matches!(e, KafkaError::NotLeading(_)), "{e}");
        assert!(e.to_string().contains("leader lease"), "says why: {e}");
        assert!(matches!(
            k.refresh("t", &[0], &|| false),
            Err(KafkaError::NotLeading(_))
        ));
        assert_eq!(k.committed("t", &[0]).unwrap(), BTreeMap::from([(0, 10)]));
    }
}
