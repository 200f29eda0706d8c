//! A pipeline's Kafka offsets, read and committed off the async runtime (librdkafka's calls
//! block), through one client per pipeline kept across reconciles.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blocksmith_crds::BlockPipeline;

use crate::jobs::KafkaIds;
use crate::kafka::{KafkaConnection, KafkaError, KafkaOffsets};
use crate::leader::Leadership;
use crate::planner::PartitionOffsets;

/// One client per pipeline, replaced when its connection settings change.
pub struct OffsetClients {
    timeout: Duration,
    clients: Mutex<HashMap<String, (KafkaConnection, Arc<KafkaOffsets>)>>,
    fence: Option<Fence>,
}

/// One reading of a pipeline's Kafka cluster, and the client that made it.
pub struct KafkaRead {
    client: Arc<KafkaOffsets>,
    fence: Option<Fence>,
    pub cluster_id: Option<String>,
    pub topic_id: Option<String>,
    pub offsets: Vec<PartitionOffsets>,
}

/// Commits only while this replica surely leads for as long as a commit may take (the Kafka
/// timeout): nothing in Kafka stops a deposed leader's commit from landing after the next
/// leader's and moving the offset backwards.
#[derive(Clone)]
struct Fence {
    leadership: Leadership,
    /// How long to wait for a renewal that leaves a commit time enough.
    patience: Duration,
}

impl OffsetClients {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clients: Mutex::default(),
            fence: None,
        }
    }

    /// Commits only within `leadership` (see [`Fence`]), waiting up to `patience` for a
    /// renewal when the current one leaves too little time.
    pub fn fenced_by(self, leadership: Leadership, patience: Duration) -> Self {
        Self {
            fence: Some(Fence {
                leadership,
                patience,
            }),
            ..self
        }
    }

    /// Drops the client of a deleted pipeline (closing its connections).
    pub fn forget(&self, key: &str) {
        self.clients.lock().expect("clients lock").remove(key);
    }

    /// The cluster and topic ids and the offsets of the pipeline's partitions; `key` names the pipeline.
    pub async fn read(
        &self,
        key: &str,
        conn: KafkaConnection,
        bp: &BlockPipeline,
    ) -> Result<KafkaRead, KafkaError> {
        let client = self.client(key, conn)?;
        let topic = bp.spec.kafka.topic.clone();
        let subset = bp.spec.kafka.partitions.clone();
        let k = client.clone();
        let (cluster_id, topic_id, offsets) = tokio::task::spawn_blocking(move || {
            let partitions = k.partitions(&topic, subset.as_deref())?;
            let topic_id = k.topic_id(&topic, partitions.broker)?;
            Ok::<_, KafkaError>((
                k.cluster_id(),
                topic_id,
                k.offsets(&topic, &partitions.ids)?,
            ))
        })
        .await
        .map_err(|e| KafkaError::Unavailable(e.to_string()))??;
        Ok(KafkaRead {
            client,
            fence: self.fence.clone(),
            cluster_id,
            topic_id,
            offsets,
        })
    }

    fn client(&self, key: &str, conn: KafkaConnection) -> Result<Arc<KafkaOffsets>, KafkaError> {
        let mut clients = self.clients.lock().expect("kafka clients lock");
        if let Some((c, client)) = clients.get(key)
            && *c == conn
        {
            return Ok(client.clone());
        }
        let client = Arc::new(KafkaOffsets::connect(&conn, self.timeout)?);
        clients.insert(key.to_string(), (conn, client.clone()));
        Ok(client)
    }
}

impl KafkaRead {
    /// The cluster and topic ids read, for the jobs planned from this reading.
    pub fn ids(&self) -> KafkaIds {
        KafkaIds {
            cluster: self.cluster_id.clone(),
            topic: self.topic_id.clone(),
        }
    }

    /// Commits those of `offsets` that move the pipeline's consumer group forward (see
    /// [`KafkaOffsets::commit`]); returns what was committed.
    pub async fn commit(
        &self,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let k = self.client.clone();
        let topic = topic.to_string();
        let offsets = offsets.clone();
        let may_commit = self.may_commit().await?;
        tokio::task::spawn_blocking(move || k.commit(&topic, &offsets, &*may_commit))
            .await
            .map_err(|e| KafkaError::Unavailable(e.to_string()))?
    }

    /// Once this replica surely leads for a commit's time (waiting a little for a renewal if
    /// need be), the check to make again right before the commit request is sent.
    async fn may_commit(&self) -> Result<Box<dyn Fn() -> bool + Send>, KafkaError> {
        let work = self.client.timeout();
        let Some(fence) = self.fence.clone() else {
            return Ok(Box::new(|| true));
        };
        if !fence
            .leadership
            .wait_confirmed_for(work, fence.patience)
            .await
        {
            return Err(KafkaError::NotLeading(work));
        }
        Ok(Box::new(move || fence.leadership.confirmed_for(work)))
    }

    /// Commits the partitions' committed offsets again, unchanged (see
    /// [`KafkaOffsets::refresh`]).
    pub async fn refresh(&self, topic: &str) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let k = self.client.clone();
        let topic = topic.to_string();
        let partitions: Vec<i32> = self.committed().into_keys().collect();
        let may_commit = self.may_commit().await?;
        tokio::task::spawn_blocking(move || k.refresh(&topic, &partitions, &*may_commit))
            .await
            .map_err(|e| KafkaError::Unavailable(e.to_string()))?
    }

    /// Takes `offsets`, just committed, as the partitions' committed offsets.
    pub fn set_committed(&mut self, offsets: &BTreeMap<i32, i64>) {
        for po in &mut self.offsets {
            if let Some(n) = offsets.get(&po.partition) {
                po.committed = Some(*n);
            }
        }
    }

    /// Each partition's committed offset, where it has one.
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        self.offsets
            .iter()
            .filter_map(|po| Some((po.partition, po.committed?)))
            .collect()
    }
}
