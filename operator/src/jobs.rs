//! The work queue in etcd: BlockJob objects of one pipeline, read from the operator's watch
//! cache and written under its own field manager.
//!
//! The cache may lag the API server. Every write is therefore safe against a stale read:
//! jobs are created, never applied over (a re-planned range that already exists is a 409,
//! not a changed range), and updates carry the `resourceVersion` they were decided from.

use std::collections::BTreeMap;

use blocksmith_crds::domain::{
    FINALIZER_KEEP_RANGE, LABEL_PARTITION, LABEL_PHASE, LABEL_PIPELINE, job_name, replacement_name,
};
use blocksmith_crds::{BlockJob, BlockJobSpec, BlockPipeline, JobOutputSpec, JobPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::lifecycle::Reset;
use crate::metrics::Metrics;
use crate::planner::PlannedJob;

pub const MANAGER: &str = "blocksmith-operator";
/// Status writes use their own field manager: API servers before 1.22 key managedFields by
/// manager and operation only (not subresource), so sharing one manager between object and
/// status applies would drop the operator's ownership of status fields on every object
/// apply — and with it the fencing of builders whose lease was taken back.
pub const STATUS_MANAGER: &str = "blocksmith-operator-status";

pub struct JobStore {
    api: Api<BlockJob>,
    cache: Store<BlockJob>,
    namespace: String,
    pipeline: String,
    metrics: Metrics,
}

impl JobStore {
    pub fn new(
        client: kube::Client,
        cache: Store<BlockJob>,
        namespace: &str,
        pipeline: &str,
        metrics: Metrics,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            cache,
            namespace: namespace.into(),
            pipeline: pipeline.into(),
            metrics,
        }
    }

    /// The pipeline's jobs as the watch cache has them (no API request: a LIST of 10,000
    /// jobs takes seconds).
    pub fn cached(&self) -> Vec<BlockJob> {
        self.cached_where(|_| true)
    }

    /// The cached jobs of the pipeline that `keep` keeps; only those are copied.
    pub fn cached_where(&self, keep: impl Fn(&BlockJob) -> bool) -> Vec<BlockJob> {
        self.cache
            .state()
            .iter()
            .filter(|j| {
                j.metadata.namespace.as_deref() == Some(self.namespace.as_str())
                    && j.labels().get(LABEL_PIPELINE) == Some(&self.pipeline)
                    && keep(j)
            })
            .map(|j| BlockJob::clone(j))
            .collect()
    }

    /// Creates a planned job, with the finalizer that keeps its range if it is deleted
    /// before its range is committed. `Ok(None)` when it already exists: the cache had not
    /// seen it yet, and the existing job (whatever its range) stays as it is.
    pub async fn create(&self, job: &BlockJob) -> kube::Result<Option<BlockJob>> {
        self.metrics.api_write("create_job");
        let pp = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        let mut job = job.clone();
        job.metadata.finalizers = Some(vec![FINALIZER_KEEP_RANGE.into()]);
        match self.api.create(&pp, &job).await {
            Ok(j) => Ok(Some(j)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets a job's labels (its phase label) if it is still the version `job` was read at.
    pub async fn relabel(&self, job: &BlockJob, desired: &BlockJob) -> kube::Result<BlockJob> {
        self.metrics.api_write("label_job");
        let patch = json!({
            "apiVersion": "blocksmith.io/v1alpha1",
            "kind": "BlockJob",
            "metadata": {
                "resourceVersion": job.resource_version(),
                "labels": desired.metadata.labels,
                "ownerReferences": desired.metadata.owner_references,
            },
            "spec": desired.spec,
        });
        self.apply(&job.name_any(), MANAGER, patch, false).await
    }

    /// Takes a job back from its builder as `reset` says: `Pending` again at an attempt after
    /// a backoff, or `Failed` for good. The forced apply takes the lease fields from the builder's field
    /// manager, so the builder's next renewal or report conflicts; `resourceVersion` makes it
    /// a compare-and-swap against what the decision was based on.
    pub async fn reset(&self, job: &BlockJob, reset: &Reset) -> kube::Result<BlockJob> {
        let lease_seconds = job
            .status
            .as_ref()
            .and_then(|s| s.lease.as_ref())
            .map_or(0, |l| l.lease_duration_seconds);
        let mut status = json!({
            "phase": reset.phase,
            "attempt": reset.attempt,
            "message": reset.message,
            "lease": { "holder": "", "leaseDurationSeconds": lease_seconds },
        });
        if let Some(t) = reset.not_before {
            status["notBefore"] = json!(Time(t));
        }
        // Left out, it is removed: this manager owned it.
        if let Some(n) = reset.transient_failures {
            status["transientFailures"] = json!(n);
        }
        let patch = json!({
            "apiVersion": "blocksmith.io/v1alpha1",
            "kind": "BlockJob",
            "metadata": { "resourceVersion": job.resource_version() },
            "status": status,
        });
        self.metrics.api_write("reset_job");
        self.apply(&job.name_any(), STATUS_MANAGER, patch, true)
            .await
    }

    /// A forced server-side apply as `manager`, of the status subresource when `status`.
    async fn apply(
        &self,
        name: &str,
        manager: &str,
        patch: serde_json::Value,
        status: bool,
    ) -> kube::Result<BlockJob> {
        let params = PatchParams::apply(manager).force();
        let patch = Patch::Apply(patch);
        if status {
            self.api.patch_status(name, &params, &patch).await
        } else {
            self.api.patch(name, &params, &patch).await
        }
    }

    /// Creates the job that takes over the range of `deleted`, a job being deleted: the same
    /// range, in the pipeline's current output settings, from attempt 1. `Ok(())` when it
    /// exists already (a pass before this one created it).
    pub async fn replace(&self, bp: &BlockPipeline, deleted: &BlockJob) -> kube::Result<()> {
        let range = PlannedJob {
            partition: deleted.spec.partition,
            start: deleted.spec.start_offset,
            end: deleted.spec.end_offset,
        };
        let spec = job_spec(bp, &range, &KafkaIds::of(&deleted.spec));
        let mut job = desired_job(bp, spec, JobPhase::Pending);
        job.metadata.name = Some(replacement_name(&deleted.name_any()));
        self.create(&job).await.map(|_| ())
    }

    /// Removes the operator's finalizer from `job`, if it is still the version read.
    pub async fn release(&self, job: &BlockJob) -> kube::Result<BlockJob> {
        let patch = json!({
            "metadata": {
                "resourceVersion": job.resource_version(),
                "finalizers": kept_finalizers(job),
            },
        });
        self.metrics.api_write("release_job");
        self.api
            .patch(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
    }

    /// Labels a `Succeeded` job so, and releases its finalizer when `release` (its range is
    /// committed): one write, if it is still the version read (see [`crate::lifecycle::finish`]).
    pub async fn finish(&self, job: &BlockJob, release: bool) -> kube::Result<BlockJob> {
        let mut metadata = json!({
            "resourceVersion": job.resource_version(),
            "labels": BTreeMap::from([(LABEL_PHASE, JobPhase::Succeeded.as_str())]),
        });
        if release {
            metadata["finalizers"] = json!(kept_finalizers(job));
        }
        self.metrics.api_write("finish_job");
        self.api
            .patch(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": metadata })),
            )
            .await
    }

    /// Deletes `job` if it is still the object and version read: a job re-created under the
    /// same name, or changed since, is left to the next pass. Its finalizer is released
    /// first: only jobs whose range is committed are deleted this way.
    pub async fn delete(&self, job: &BlockJob) -> kube::Result<()> {
        let job = if job.keeps_range() {
            match self.release(job).await {
                Ok(released) => released,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
                Err(e) => return Err(e),
            }
        } else {
            job.clone()
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: job.uid(),
                resource_version: job.resource_version(),
            }),
            ..DeleteParams::background()
        };
        self.metrics.api_write("delete_job");
        match self.api.delete(&job.name_any(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The job object the operator wants for a planned range. `phase` only sets the label that
/// lets `kubectl` and builders select jobs by phase server-side; the truth is `status.phase`.
pub fn desired_job(bp: &BlockPipeline, spec: BlockJobSpec, phase: JobPhase) -> BlockJob {
    let name = job_name(&spec.pipeline, spec.partition, spec.start_offset);
    let mut job = BlockJob::new(&name, spec);
    job.metadata.namespace = bp.namespace();
    job.metadata.labels = Some(BTreeMap::from([
        (LABEL_PIPELINE.to_string(), bp.name_any()),
        (LABEL_PARTITION.to_string(), job.spec.partition.to_string()),
        (LABEL_PHASE.to_string(), phase.to_string()),
    ]));
    job.metadata.owner_references = bp.controller_owner_ref(&()).map(|o| vec![o]);
    job
}

/// The Kafka cluster and topic whose offsets a job counts, as the brokers report them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaIds {
    pub cluster: Option<String>,
    pub topic: Option<String>,
}

impl KafkaIds {
    pub fn of(job: &BlockJobSpec) -> Self {
        Self {
            cluster: job.kafka_cluster_id.clone(),
            topic: job.kafka_topic_id.clone(),
        }
    }
}

/// The immutable spec of a newly planned job: the range, the cluster and topic it counts
/// offsets of, and the pipeline's output settings as they are now.
pub fn job_spec(bp: &BlockPipeline, planned: &PlannedJob, ids: &KafkaIds) -> BlockJobSpec {
    let o = &bp.spec.output;
    BlockJobSpec {
        pipeline: bp.name_any(),
        topic: bp.spec.kafka.topic.clone(),
        partition: planned.partition,
        start_offset: planned.start,
        end_offset: planned.end,
        bootstrap_servers: bp.spec.kafka.bootstrap_servers.clone(),
        kafka_cluster_id: ids.cluster.clone(),
        kafka_topic_id: ids.topic.clone(),
        lease_duration_seconds: bp.spec.jobs.lease_duration_seconds,
        output: JobOutputSpec {
            url: o.url.clone(),
            format: o.format,
            compression: o.compression,
            compression_level: o.compression_level,
            row_group_size: o.row_group_size,
            max_record_bytes: o.max_record_bytes,
        },
    }
}

/// The job's finalizers but the operator's.
fn kept_finalizers(job: &BlockJob) -> Vec<&String> {
    job.finalizers()
        .iter()
        .filter(|f| *f != FINALIZER_KEEP_RANGE)
        .collect()
}

/// The phase label currently on a job, if any.
pub fn phase_label(job: &BlockJob) -> Option<&str> {
    job.meta()
        .labels
        .as_ref()?
        .get(LABEL_PHASE)
        .map(String::as_str)
}
