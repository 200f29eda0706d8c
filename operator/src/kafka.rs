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
use blocksmith_runtime::kafka::{ConnectionError, ConnectionErrors, is_auth_failure};
use k8s_openapi::api::core::v1::{Secret, SecretKeySelector};
use kube::ResourceExt;
use kube::api::Api;

use crate::conditions::Problem;
use crate::planner::PartitionOffsets;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka is unavailable: {0}")]
    Unavailable(String),
    #[error(
        "authentication to Kafka failed: {detail}. Check spec.kafka.securityProtocol and spec.kafka.sasl against the brokers' listener{credentials}"
    )]
    AuthenticationFailed {
        detail: String,
        /// Where the credentials come from, e.g. `, and the credentials in secret "x" (keys
        /// "user", "password")`; empty without SASL.
        credentials: String,
    },
    #[error(
        "topic {0:?} does not exist: create it, or correct spec.kafka.topic (the operator never creates topics)"
    )]
    TopicNotFound(String),
    #[error(
        "partitions {missing:?} are not in topic {topic:?} (it has {available}): correct spec.kafka.partitions"
    )]
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
            KafkaError::AuthenticationFailed { .. } => "KafkaAuthenticationFailed",
            KafkaError::TopicNotFound(_) | KafkaError::PartitionsNotFound { .. } => "TopicNotFound",
            KafkaError::CommitRefused { .. } => "CommitRefused",
        }
    }
}

fn unavailable(e: RdError) -> KafkaError {
    KafkaError::Unavailable(e.to_string())
}

/// What a failed request means, given the last error librdkafka reported for the client's
/// broker connections (`client`). A request that failed only says
/// "timed out"; the connection error says why (connection refused, TLS handshake, SASL
/// authentication), so it goes into the message, and an authentication failure gets its
/// own reason.
pub fn classify(
    request: &RdError,
    client: Option<&ConnectionError>,
    credentials: &str,
) -> KafkaError {
    if let Some(client) = client
        && is_auth_failure(client.code())
    {
        return KafkaError::AuthenticationFailed {
            detail: client.reason.clone(),
            credentials: credentials.to_string(),
        };
    }
    if is_auth_failure(request.rdkafka_error_code()) {
        return KafkaError::AuthenticationFailed {
            detail: request.to_string(),
            credentials: credentials.to_string(),
        };
    }
    match client {
        Some(client) => KafkaError::Unavailable(format!(
            "{request}; last broker connection error: {}",
            client.reason
        )),
        None => KafkaError::Unavailable(request.to_string()),
    }
}

/// Connection settings: bootstrap servers plus librdkafka properties (security, SASL, TLS),
/// with secrets already resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaConnection {
    pub bootstrap_servers: String,
    pub group: String,
    pub properties: Vec<(String, String)>,
    /// Where the SASL credentials come from, for messages (empty without SASL).
    pub credentials: String,
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

    /// The topic's partitions, or the requested subset after checking it exists.
    pub fn partitions(&self, topic: &str, subset: Option<&[i32]>) -> Result<Vec<i32>, KafkaError> {
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
            .map_err(|e| self.failed(e))?;
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
                _ => self.failed(e),
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
    properties.push((
        "security.protocol".to_string(),
        k.security_protocol.librdkafka_value().to_string(),
    ));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut credentials = String::new();
    if let Some(sasl) = &k.sasl {
        credentials = credentials_description(&sasl.username_secret_ref, &sasl.password_secret_ref);
        properties.push(("sasl.mechanism".into(), sasl.mechanism.to_string()));
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
        credentials,
    })
}

/// `, and the credentials in secret "kafka" (keys "username", "password")`, naming both
/// secrets when they differ.
pub fn credentials_description(user: &SecretKeySelector, password: &SecretKeySelector) -> String {
    if user.name == password.name {
        format!(
            ", and the credentials in secret {:?} (keys {:?}, {:?})",
            user.name, user.key, password.key
        )
    } else {
        format!(
            ", and the credentials in secrets {:?} (key {:?}) and {:?} (key {:?})",
            user.name, user.key, password.name, password.key
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(name: &str, key: &str) -> SecretKeySelector {
        SecretKeySelector {
            name: name.into(),
            key: key.into(),
            ..Default::default()
        }
    }

    fn connection_error(code: RDKafkaErrorCode, reason: &str) -> ConnectionError {
        ConnectionError {
            error: RdError::Global(code),
            reason: reason.to_string(),
        }
    }

    fn timed_out() -> RdError {
        RdError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut)
    }

    #[test]
    fn an_authentication_error_names_the_settings_and_the_secret() {
        let creds = credentials_description(
            &selector("kafka-creds", "username"),
            &selector("kafka-creds", "password"),
        );
        let client = connection_error(
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: Authentication failed: Invalid username or password",
        );
        let e = classify(&timed_out(), Some(&client), &creds);
        assert_eq!(e.reason(), "KafkaAuthenticationFailed");
        let message = e.to_string();
        for want in [
            "authentication to Kafka failed",
            "Invalid username or password",
            "spec.kafka.sasl",
            r#"secret "kafka-creds" (keys "username", "password")"#,
        ] {
            assert!(message.contains(want), "{want:?} not in {message:?}");
        }
    }

    #[test]
    fn two_secrets_are_both_named() {
        let creds = credentials_description(&selector("u", "user"), &selector("p", "pass"));
        assert_eq!(
            creds,
            r#", and the credentials in secrets "u" (key "user") and "p" (key "pass")"#
        );
    }

    #[test]
    fn other_failures_are_unavailable_with_the_connection_error() {
        let e = classify(&timed_out(), None, "");
        assert_eq!(e.reason(), "KafkaUnavailable");
        let client = connection_error(
            RDKafkaErrorCode::BrokerTransportFailure,
            "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused",
        );
        let e = classify(&timed_out(), Some(&client), "");
        assert_eq!(e.reason(), "KafkaUnavailable");
        assert!(e.to_string().contains("Connection refused"), "{e}");
        // A request that itself failed authentication.
        let e = classify(
            &RdError::MetadataFetch(RDKafkaErrorCode::SaslAuthenticationFailed),
            None,
            "",
        );
        assert_eq!(e.reason(), "KafkaAuthenticationFailed");
    }

    #[test]
    fn refused_authorization_is_reported_as_an_authentication_failure() {
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
        ] {
            let e = classify(&RdError::MetadataFetch(code), None, "");
            assert_eq!(e.reason(), "KafkaAuthenticationFailed", "{code:?}");
        }
    }

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
        assert_eq!(e.reason(), "KafkaUnavailable");
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
        assert_eq!(e.reason(), "KafkaAuthenticationFailed", "{e}");
        let message = e.to_string();
        assert!(
            message.contains("SASL Handshake not supported by broker")
                && message.contains(r#"secret "kafka-creds""#),
            "{message}"
        );
    }

    #[test]
    fn topic_messages_say_what_to_do() {
        let e = KafkaError::TopicNotFound("orders".into());
        assert!(
            e.to_string()
                .contains("create it, or correct spec.kafka.topic"),
            "{e}"
        );
        let e = KafkaError::PartitionsNotFound {
            topic: "orders".into(),
            missing: vec![7],
            available: 4,
        };
        assert!(
            e.to_string().contains("correct spec.kafka.partitions"),
            "{e}"
        );
    }
}
