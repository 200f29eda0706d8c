//! Kubernetes objects of a scenario: pipeline manifests, jobs, Events, the lease on a job.

use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::{BlockJob, BlockPipeline};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::Testbed;

/// A pipeline manifest with test-friendly defaults; `jobs` and `output` merge over them.
pub fn pipeline(
    name: &str,
    topic: &str,
    bootstrap: &str,
    output_url: &str,
    jobs: Value,
) -> BlockPipeline {
    let mut job_settings = json!({
        "maxRecords": 1000, "maxAge": "2s", "maxInFlightPerPartition": 1000,
        "leaseDurationSeconds": 6, "backoffLimit": 3,
    });
    if let (Some(base), Value::Object(over)) = (job_settings.as_object_mut(), jobs) {
        base.extend(over);
    }
    serde_json::from_value(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockPipeline",
        "metadata": { "name": name },
        "spec": {
            "kafka": { "bootstrapServers": bootstrap, "topic": topic },
            "jobs": job_settings,
            "output": { "url": output_url, "compressionLevel": 1 },
        }
    }))
    .expect("pipeline manifest")
}

/// Creates or replaces Secret `name` with `data` (string values).
pub async fn apply_secret(tb: &Testbed, ns: &str, name: &str, data: Value) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": name },
        "stringData": data,
    }))
    .unwrap();
    Api::<Secret>::namespaced(tb.client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("apply secret");
}

pub async fn apply_pipeline(tb: &Testbed, ns: &str, bp: &BlockPipeline) {
    let api: Api<BlockPipeline> = Api::namespaced(tb.client.clone(), ns);
    let name = bp.metadata.name.clone().unwrap();
    api.patch(
        &name,
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(bp),
    )
    .await
    .expect("apply pipeline");
}

pub async fn get_pipeline(tb: &Testbed, ns: &str, name: &str) -> BlockPipeline {
    Api::<BlockPipeline>::namespaced(tb.client.clone(), ns)
        .get(name)
        .await
        .expect("get pipeline")
}

/// The jobs of `pipeline`, by partition and start offset.
pub async fn jobs(tb: &Testbed, ns: &str, pipeline: &str) -> Vec<BlockJob> {
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), ns);
    let mut jobs = api
        .list(&ListParams::default().labels(&format!("{LABEL_PIPELINE}={pipeline}")))
        .await
        .expect("list jobs")
        .items;
    jobs.sort_by_key(|j| (j.spec.partition, j.spec.start_offset));
    jobs
}

/// The job among `jobs` with `job`'s name.
pub fn same_job<'a>(jobs: &'a [BlockJob], job: &BlockJob) -> Option<&'a BlockJob> {
    jobs.iter().find(|j| j.metadata.name == job.metadata.name)
}

/// Who holds a job's lease, if anyone ever did.
pub fn lease_holder(job: &BlockJob) -> Option<&str> {
    Some(job.status.as_ref()?.lease.as_ref()?.holder.as_str())
}

/// Is `job` running under `holder`'s lease?
pub fn running_on(job: &BlockJob, holder: &str) -> bool {
    job.phase() == blocksmith_crds::JobPhase::Running && lease_holder(job) == Some(holder)
}

/// A job's status message (empty without one).
pub fn job_message(j: &BlockJob) -> String {
    j.status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

/// (type, reason, note) of the Events on pipeline `pipeline`.
pub async fn pipeline_events(
    tb: &Testbed,
    ns: &str,
    pipeline: &str,
) -> Vec<(String, String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(tb.client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pipeline))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// A minimal BlockJob, for tests that exercise the API contract without a pipeline.
pub fn bare_job(name: &str) -> BlockJob {
    serde_json::from_value(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "metadata": { "name": name },
        "spec": {
            "pipeline": "p", "topic": "t", "partition": 0, "startOffset": 0, "endOffset": 10,
            "bootstrapServers": "127.0.0.1:9092", "leaseDurationSeconds": 30,
            "output": { "url": "file:///tmp/x", "format": "parquet", "compression": "zstd" }
        }
    }))
    .expect("job manifest")
}

/// A status apply that sets only `lease.holder` (and the lease duration).
pub fn lease_patch(holder: &str) -> Patch<Value> {
    Patch::Apply(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "status": { "lease": { "holder": holder, "leaseDurationSeconds": 30 } }
    }))
}

/// `kubectl ARGS` with `kubeconfig` (the testbed env's `KUBECONFIG` without); whether it
/// succeeded, and its stdout then stderr.
pub fn run_kubectl(kubeconfig: Option<&std::path::Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new("kubectl");
    if let Some(kubeconfig) = kubeconfig {
        cmd.env("KUBECONFIG", kubeconfig);
    }
    let out = cmd.args(args).output().expect("run kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
