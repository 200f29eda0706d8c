//! `BlockPipeline`: one Kafka topic turned into blocks in one object-store location.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, SecretKeySelector, Toleration,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "blocksmith.io",
    version = "v1alpha1",
    kind = "BlockPipeline",
    namespaced,
    shortname = "bp",
    category = "blocksmith",
    status = "BlockPipelineStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Topic","type":"string","jsonPath":".spec.kafka.topic"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.lag"}"#,
    printcolumn = r#"{"name":"Oldest","type":"date","description":"how long the oldest uncommitted record has waited (empty when caught up)","jsonPath":".status.oldestUncommittedTime"}"#,
    printcolumn = r#"{"name":"Queue","type":"integer","jsonPath":".status.queueDepth"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.runningJobs"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failedJobs"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BlockPipelineSpec {
    pub kafka: KafkaSpec,
    #[serde(default)]
    pub jobs: JobsSpec,
    pub output: OutputSpec,
    /// When set, the operator manages a builder Deployment and an HPA for this pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builders: Option<BuildersSpec>,
    /// Stop planning new jobs. Jobs already planned still run and are committed.
    #[serde(default)]
    pub suspend: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Consumer group whose offsets the operator commits. Must belong to this pipeline
    /// alone: Kafka refuses the operator's commits while the group has active members.
    /// Default: `blocksmith-<namespace>-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group: Option<String>,
    /// Partitions to process; default all partitions of the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<i32>>,
    /// Where to start when the group has no committed offset.
    #[serde(default)]
    pub start_offset: StartOffset,
    /// When the committed offset is below the partition's low watermark (retention deleted
    /// data that was never written to a block), restart at the low watermark instead of
    /// stopping with `OffsetOutOfRange`. Data in the gap is lost; off by default.
    #[serde(default)]
    pub skip_missing_data: bool,
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<SaslSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartOffset {
    #[default]
    Earliest,
    Latest,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SaslSpec {
    pub mechanism: SaslMechanism,
    /// The user name, for `PLAIN` and `SCRAM-*` (required with them, not used with
    /// `OAUTHBEARER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeySelector>,
    /// The password, for `PLAIN` and `SCRAM-*` (required with them, not used with
    /// `OAUTHBEARER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeySelector>,
    /// For `OAUTHBEARER` (required with it): an OIDC client-credentials grant against the
    /// identity provider's token endpoint, whose access token (a JWT) the clients send to the
    /// brokers and refresh before it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauthbearer: Option<OAuthBearerSpec>,
}

/// OIDC client credentials (RFC 6749 section 4.4) for SASL `OAUTHBEARER` (KIP-768): what
/// Strimzi's `oauth` listeners, Confluent Cloud and other OIDC-secured brokers ask of clients.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuthBearerSpec {
    /// The identity provider's token endpoint, e.g.
    /// `https://sso.example.com/realms/kafka/protocol/openid-connect/token`.
    #[schemars(length(min = 1))]
    pub token_endpoint_url: String,
    /// The OAuth client id.
    pub client_id_secret_ref: SecretKeySelector,
    /// The OAuth client secret.
    pub client_secret_secret_ref: SecretKeySelector,
    /// The scope to request (space-separated), if the identity provider needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// SASL extensions (KIP-342) sent to the brokers with the token, e.g. Confluent Cloud's
    /// `logicalCluster` and `identityPoolId`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

impl SecurityProtocol {
    /// As written in the spec: `SASL_SSL`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    /// librdkafka's `security.protocol` value: `sasl_ssl`.
    pub const fn librdkafka_value(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SaslMechanism {
    /// As written in the spec, which is also librdkafka's `sasl.mechanism` value: `PLAIN`,
    /// `SCRAM-SHA-256`, ...
    pub const fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// PEM CA bundle used to verify the brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeySelector>,
    /// PEM client certificate (and its chain) for brokers that authenticate clients by
    /// certificate (mTLS); with `keySecretRef`. A Strimzi KafkaUser's Secret has it under
    /// `user.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_secret_ref: Option<SecretKeySelector>,
    /// PEM private key of the client certificate (Strimzi: `user.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeySelector>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobsSpec {
    /// Cut a job at this many offsets.
    #[serde(default = "defaults::max_records")]
    #[schemars(range(min = 1))]
    pub max_records: i64,
    /// Cut a shorter tail job once its oldest unplanned offset has waited this long
    /// (a duration such as `30s`, `5m`, `1h`).
    #[serde(default = "defaults::max_age")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub max_age: String,
    /// Unfinished jobs allowed per partition.
    #[serde(default = "defaults::max_in_flight")]
    #[schemars(range(min = 1))]
    pub max_in_flight_per_partition: i32,
    /// Jobs per partition not yet below the committed offset (unfinished, or succeeded and
    /// waiting for an earlier job before their offsets can be committed). Planning pauses
    /// at this many, so a job that holds the commit (failed, or slow) cannot let succeeded
    /// jobs pile up in etcd at the topic's write rate. Refilling a deleted job's range is
    /// never paused. Unset: 4 × `maxInFlightPerPartition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_uncommitted_jobs_per_partition: Option<i32>,
    /// A builder that has not renewed its lease for this long loses the job.
    #[serde(default = "defaults::lease_duration")]
    #[schemars(range(min = 3))]
    pub lease_duration_seconds: i32,
    /// Attempts before a job stays `Failed` and the pipeline is `Degraded`.
    #[serde(default = "defaults::backoff_limit")]
    #[schemars(range(min = 1))]
    pub backoff_limit: i32,
    /// Delete succeeded, committed jobs this long after they finished.
    #[serde(default = "defaults::ttl_after_succeeded")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_succeeded: i32,
    /// Keep at most this many succeeded, committed jobs per pipeline.
    #[serde(default = "defaults::history_limit")]
    #[schemars(range(min = 0))]
    pub successful_jobs_history_limit: i32,
}

impl Default for JobsSpec {
    fn default() -> Self {
        Self {
            max_records: defaults::max_records(),
            max_age: defaults::max_age(),
            max_in_flight_per_partition: defaults::max_in_flight(),
            max_uncommitted_jobs_per_partition: None,
            lease_duration_seconds: defaults::lease_duration(),
            backoff_limit: defaults::backoff_limit(),
            ttl_seconds_after_succeeded: defaults::ttl_after_succeeded(),
            successful_jobs_history_limit: defaults::history_limit(),
        }
    }
}

mod defaults {
    pub fn max_records() -> i64 {
        100_000
    }
    pub fn max_age() -> String {
        "5m".into()
    }
    pub fn max_in_flight() -> i32 {
        4
    }
    pub fn lease_duration() -> i32 {
        30
    }
    pub fn backoff_limit() -> i32 {
        6
    }
    pub fn ttl_after_succeeded() -> i32 {
        3600
    }
    pub fn history_limit() -> i32 {
        100
    }
    pub fn min_replicas() -> i32 {
        1
    }
    pub fn max_replicas() -> i32 {
        10
    }
    pub fn target_queue_depth() -> i32 {
        2
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Where blocks go: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
    /// or `file:///path`.
    #[schemars(regex(pattern = r"^(s3|gs|az|file)://.+"))]
    pub url: String,
    #[serde(default)]
    pub format: BlockFormat,
    #[serde(default)]
    pub compression: Compression,
    /// zstd level (1-22), default 1. Level 3 gave ~2% fewer bytes for more than twice the
    /// encoding CPU on the benchmark's random values; measure the trade on your own data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 22))]
    pub compression_level: Option<i32>,
    /// Maximum rows per Parquet row group (row groups are also cut at 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub row_group_size: Option<i64>,
    /// Largest record (key + value + headers) a builder writes into a block. A job that
    /// meets a bigger record fails with its partition and offset and writes nothing; raise
    /// the limit and delete the failed job to retry it. Default 8 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_record_bytes: Option<i64>,
    /// Secret whose keys are passed to builders as environment variables
    /// (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectReference>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BlockFormat {
    #[default]
    Parquet,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Compression {
    #[default]
    Zstd,
    Snappy,
    None,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildersSpec {
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default = "defaults::min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    #[serde(default = "defaults::max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// The HPA aims for this many claimable jobs per builder.
    #[serde(default = "defaults::target_queue_depth")]
    #[schemars(range(min = 1))]
    pub target_queue_depth_per_builder: i32,
    /// Keeps voluntary disruptions (node drains) from taking down more builders at once than
    /// this allows. No PodDisruptionBudget when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<DisruptionBudgetSpec>,
    /// Extra labels on builder pods (the operator's own labels cannot be overridden).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations on builder pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets for pulling `image` from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
}

/// A PodDisruptionBudget for the builders: exactly one of the two.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Builders that may be down at once (a number, or a percentage such as `25%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Builders that must stay up (a number, or a percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockPipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["partition"]))]
    pub partitions: Vec<PartitionStatus>,
    /// Total lag over the pipeline's partitions (high watermark − committed offset).
    #[serde(default)]
    pub lag: i64,
    /// Claimable jobs: pending and past their backoff.
    #[serde(default)]
    pub queue_depth: i64,
    #[serde(default)]
    pub running_jobs: i64,
    /// When the operator first saw the pipeline's oldest record not yet committed (written
    /// in a block and its offset committed) in the log; absent when caught up. A time rather
    /// than an age, which would change on every look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_uncommitted_time: Option<Time>,
    /// Jobs that exhausted their retries; each one holds back its partition's commit.
    #[serde(default)]
    pub failed_jobs: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit_time: Option<Time>,
    /// The topic whose records the committed offsets count and the output's blocks hold,
    /// where the brokers report topic ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<TopicIdentity>,
}

/// Which topic of `spec.kafka.topic`'s name a pipeline writes to which output.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicIdentity {
    /// The topic's name (`spec.kafka.topic` when it was recorded).
    pub name: String,
    /// The topic's id (KIP-516), in the base64 form Kafka's tools print.
    pub id: String,
    /// The `spec.output.url` its blocks go to. A topic of another id is written only to
    /// another output: their blocks' keys would be the same.
    pub output_url: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub partition: i32,
    /// Kafka's convention: the next offset to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_offset: Option<i64>,
    /// End of the last planned job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_offset: Option<i64>,
    pub high_watermark: i64,
    pub lag: i64,
    /// When the current unplanned tail (shorter than `maxRecords`) was first seen; a tail
    /// job is cut once it is older than `maxAge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_since: Option<Time>,
    /// When the group's committed offset was first seen past the end of the partition's log
    /// (the topic re-created, or the log truncated). Nothing is planned for the partition
    /// until the committed offset changes, even if the log grows past it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_beyond_log_since: Option<Time>,
    /// End of the furthest range ever planned in the partition. A range planned below it (a
    /// deleted job's gap, a lost committed offset) is first checked against the blocks in
    /// the output, so that none is cut over a block already written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_offset: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are the serde names, so messages spell a value as the user wrote it.
    #[test]
    fn security_enum_names_are_their_spec_spellings() {
        let spelled = |v: serde_json::Value| v.as_str().unwrap().to_string();
        for p in [
            SecurityProtocol::Plaintext,
            SecurityProtocol::Ssl,
            SecurityProtocol::SaslPlaintext,
            SecurityProtocol::SaslSsl,
        ] {
            assert_eq!(p.to_string(), spelled(serde_json::to_value(p).unwrap()));
            assert_eq!(p.librdkafka_value(), p.as_str().to_lowercase());
        }
        for m in [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::OAuthBearer,
        ] {
            assert_eq!(m.to_string(), spelled(serde_json::to_value(m).unwrap()));
        }
    }
}
