//! `BlockJob`: one half-open offset range of one partition, written as one block.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pipeline::{BlockFormat, Compression};

/// The job's identity is its start; its end is fixed at creation and never re-planned.
/// The whole spec is immutable: the operator never rewrites it and builders may only write
/// status. (No CEL rule: 1.20-era API servers reject `x-kubernetes-validations` in
/// server-side apply, and kubectl's client-side validation rejects it too.)
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "blocksmith.io",
    version = "v1alpha1",
    kind = "BlockJob",
    namespaced,
    shortname = "bj",
    category = "blocksmith",
    status = "BlockJobStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Partition","type":"integer","jsonPath":".spec.partition"}"#,
    printcolumn = r#"{"name":"Start","type":"integer","jsonPath":".spec.startOffset"}"#,
    printcolumn = r#"{"name":"End","type":"integer","jsonPath":".spec.endOffset"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Holder","type":"string","jsonPath":".status.lease.holder"}"#,
    printcolumn = r#"{"name":"Attempt","type":"integer","jsonPath":".status.attempt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BlockJobSpec {
    pub pipeline: String,
    pub topic: String,
    #[schemars(range(min = 0))]
    pub partition: i32,
    /// First offset of the range (inclusive).
    #[schemars(range(min = 0))]
    pub start_offset: i64,
    /// End of the range (exclusive).
    #[schemars(range(min = 1))]
    pub end_offset: i64,
    pub bootstrap_servers: String,
    /// The id of the Kafka cluster whose offsets the range counts, as its brokers reported it
    /// when the job was planned: offsets of another cluster are never committed for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_cluster_id: Option<String>,
    /// The topic's id (KIP-516) when the job was planned, where the brokers report one: a
    /// topic deleted and created again under the same name has another id, and its records
    /// are never written or taken for this job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_topic_id: Option<String>,
    /// Copied from the pipeline: how long a builder's lease lasts without renewal.
    #[schemars(range(min = 3))]
    pub lease_duration_seconds: i32,
    /// Output settings copied from the pipeline when the job was planned, so a retry can
    /// never write different bytes under the same key.
    pub output: JobOutputSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobOutputSpec {
    pub url: String,
    pub format: BlockFormat,
    pub compression: Compression,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_group_size: Option<i64>,
    /// Largest record the block may hold; unset means the builder's default (8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_record_bytes: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum JobPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl JobPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job without status is `Pending` at attempt 1.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockJobStatus {
    #[serde(default)]
    pub phase: JobPhase,
    /// 1-based attempt number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<JobLease>,
    /// Not claimable before this time (retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Set by the builder that reports `Failed`: the failure was an outage (Kafka or the
    /// object store unreachable, timing out or answering 5xx), not something a person must
    /// fix. Such failures are retried without counting against `backoffLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transient: Option<bool>,
    /// Transient failures in a row, counted by the operator as it retries them; their
    /// backoff grows with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transient_failures: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JobOutput>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobLease {
    /// Unique per builder process; also the field manager of its status writes.
    /// Empty when the lease was taken back by the operator.
    pub holder: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<Time>,
    pub lease_duration_seconds: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobOutput {
    /// Object URLs written, data first, manifest last.
    pub objects: Vec<String>,
    pub records: i64,
    pub bytes: i64,
    /// sha256 of the data object.
    pub sha256: String,
}

impl BlockJobStatus {
    pub fn phase(&self) -> JobPhase {
        self.phase
    }
    pub fn attempt(&self) -> i32 {
        self.attempt.unwrap_or(1)
    }
}

impl BlockJob {
    pub fn phase(&self) -> JobPhase {
        self.status.as_ref().map(|s| s.phase()).unwrap_or_default()
    }
    pub fn attempt(&self) -> i32 {
        self.status.as_ref().map(|s| s.attempt()).unwrap_or(1)
    }
    /// Deleted, and kept only by finalizers until they are released.
    pub fn is_terminating(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }
    /// Whether the operator's [`FINALIZER_KEEP_RANGE`](crate::domain::FINALIZER_KEEP_RANGE)
    /// is on the job.
    pub fn keeps_range(&self) -> bool {
        self.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == crate::domain::FINALIZER_KEEP_RANGE))
    }
}
