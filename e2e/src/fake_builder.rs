//! Acting as a builder through the API, exactly as builders do: SSA on `blockjobs/status`.

use blocksmith_builder::block::BlockStats;
use blocksmith_builder::manifest::Manifest;
use blocksmith_builder::store::BlockStore;
use blocksmith_crds::domain::manifest_key;
use blocksmith_crds::{BlockJob, JobPhase};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::Testbed;
use crate::cluster::lease_holder;

pub struct FakeBuilder {
    pub api: Api<BlockJob>,
    pub manager: String,
}

impl FakeBuilder {
    pub fn new(tb: &Testbed, ns: &str, manager: &str) -> Self {
        Self {
            api: Api::namespaced(tb.client.clone(), ns),
            manager: manager.into(),
        }
    }

    fn body(&self, phase: &str, attempt: i32, renew: &str, extra: Value) -> Value {
        let mut status = json!({
            "phase": phase,
            "attempt": attempt,
            "startTime": "2026-01-01T00:00:00Z",
            "lease": {
                "holder": self.manager, "acquireTime": "2026-01-01T00:00:00Z",
                "renewTime": renew, "leaseDurationSeconds": 6,
            },
        });
        if let (Some(s), Value::Object(e)) = (status.as_object_mut(), extra) {
            s.extend(e);
        }
        json!({ "apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob", "status": status })
    }

    async fn apply(&self, name: &str, body: Value) -> kube::Result<BlockJob> {
        self.api
            .patch_status(
                name,
                &PatchParams::apply(&self.manager).force(),
                &Patch::Apply(body),
            )
            .await
    }

    pub async fn claim(&self, job: &BlockJob) -> kube::Result<BlockJob> {
        let mut body = self.body("Running", job.attempt(), &now(), json!({}));
        body["metadata"] = json!({ "resourceVersion": job.metadata.resource_version });
        self.apply(job.metadata.name.as_deref().unwrap(), body)
            .await
    }

    /// A compare-and-swap report, as builders make it: forced apply guarded by the
    /// resourceVersion of `job`; on a changed job, retried only while the lease is still ours.
    pub async fn report(
        &self,
        job: &BlockJob,
        attempt: i32,
        phase: &str,
        extra: Value,
    ) -> kube::Result<BlockJob> {
        let name = job.metadata.name.clone().unwrap();
        let mut rv = job.metadata.resource_version.clone();
        loop {
            let mut body = self.body(phase, attempt, &now(), extra.clone());
            body["metadata"] = json!({ "resourceVersion": rv });
            match self.apply(&name, body).await {
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let fresh = self.api.get(&name).await?;
                    let ours = lease_holder(&fresh) == Some(self.manager.as_str())
                        && fresh.phase() == JobPhase::Running
                        && fresh.attempt() == attempt;
                    if !ours {
                        return Err(kube::Error::Api(e));
                    }
                    rv = fresh.metadata.resource_version;
                }
                other => return other,
            }
        }
    }

    /// Writes the job's manifest into its output, as a builder's block would end (without the
    /// data: tests of the operator audit no records), and reports the job Succeeded.
    pub async fn succeed(&self, job: &BlockJob, attempt: i32) -> kube::Result<BlockJob> {
        write_manifest(job).await;
        self.report_success(job, attempt).await
    }

    /// Reports the job Succeeded without writing anything: a status forged by anyone who may
    /// patch `blockjobs/status`.
    pub async fn report_success(&self, job: &BlockJob, attempt: i32) -> kube::Result<BlockJob> {
        let extra = json!({
            "completionTime": now(),
            "output": { "objects": [], "records": job.spec.end_offset - job.spec.start_offset, "bytes": 0, "sha256": "" }
        });
        self.report(job, attempt, "Succeeded", extra).await
    }

    /// Claims `job` and reports it Succeeded on its first attempt.
    pub async fn claim_and_succeed(&self, job: &BlockJob) -> kube::Result<BlockJob> {
        let claimed = self.claim(job).await?;
        self.succeed(&claimed, 1).await
    }
}

/// The manifest a builder writes last for `job`, in the job's output.
pub async fn write_manifest(job: &BlockJob) {
    let s = &job.spec;
    let written = BlockStats {
        records: s.end_offset - s.start_offset,
        first_offset: Some(s.start_offset),
        last_offset: Some(s.end_offset - 1),
        ..BlockStats::default()
    };
    let manifest = Manifest::new(s, &written);
    let store = BlockStore::from_url(&s.output.url).expect("the job's output");
    let key = manifest_key(&s.topic, s.partition, s.start_offset, s.end_offset);
    store
        .put_manifest(&key, manifest.to_bytes(), "")
        .await
        .expect("write the manifest");
}

pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap()
        .to_string()
}
