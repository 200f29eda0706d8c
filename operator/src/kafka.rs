//! The operator's view of Kafka: a topic's partitions, their watermarks, and the pipeline's
//! consumer-group offsets, read and committed without joining the group. Blocking calls with
//! timeouts; callers run them on the blocking pool.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use blocksmith_crds::BlockPipeline;
use blocksmith_crds::domain::default_consumer_group;
use blocksmith_crds::pipeline::SecurityProtocol;
use k8s_openapi::api::core::v1::{Secret, SecretKeySelector};
use kube::ResourceExt;
use kube::api::Api;

use crate::conditions::Problem;
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

/// Connection settings with secrets resolved. A missing secret is a problem the user fixes.
pub async fn connection(
    bp: &BlockPipeline,
    client: &kube::Client,
) -> Result<KafkaConnection, Problem> {
    let k = &bp.spec.kafka;
    let ns = bp.namespace().unwrap_or_default();
    let group = k
        .consumer_group
        .clone()
        .unwrap_or_else(|| default_consumer_group(&ns, &bp.name_any()));
    let mut properties = Vec::new();
    let protocol = match k.security_protocol {
        SecurityProtocol::Plaintext => "plaintext",
        SecurityProtocol::Ssl => "ssl",
        SecurityProtocol::SaslPlaintext => "sasl_plaintext",
        SecurityProtocol::SaslSsl => "sasl_ssl",
    };
    properties.push(("security.protocol".to_string(), protocol.to_string()));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    if let Some(sasl) = &k.sasl {
        let mechanism = serde_json::to_value(sasl.mechanism)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        properties.push(("sasl.mechanism".into(), mechanism));
        properties.push((
            "sasl.username".into(),
            secret_value(
                &secrets,
                &sasl.username_secret_ref,
                "spec.kafka.sasl.usernameSecretRef",
            )
            .await?,
        ));
        properties.push((
            "sasl.password".into(),
            secret_value(
                &secrets,
                &sasl.password_secret_ref,
                "spec.kafka.sasl.passwordSecretRef",
            )
            .await?,
        ));
    }
    if let Some(ca) = k.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        properties.push((
            "ssl.ca.pem".into(),
            secret_value(&secrets, ca, "spec.kafka.tls.caSecretRef").await?,
        ));
    }
    Ok(KafkaConnection {
        bootstrap_servers: k.bootstrap_servers.clone(),
        group,
        properties,
    })
}

async fn secret_value(
    secrets: &Api<Secret>,
    sel: &SecretKeySelector,
    field: &str,
) -> Result<String, Problem> {
    let problem = |what: String| Problem {
        reason: "SecretNotFound",
        message: format!("{field}: {what}"),
    };
    let secret = secrets
        .get_opt(&sel.name)
        .await
        .map_err(|e| problem(format!("reading secret {:?}: {e}", sel.name)))?
        .ok_or_else(|| problem(format!("secret {:?} not found", sel.name)))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&sel.key))
        .ok_or_else(|| problem(format!("secret {:?} has no key {:?}", sel.name, sel.key)))?;
    String::from_utf8(bytes.0.clone()).map_err(|_| {
        problem(format!(
            "secret {:?} key {:?} is not UTF-8",
            sel.name, sel.key
        ))
    })
}
