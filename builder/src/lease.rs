//! The builder's side of the lease protocol, all server-side apply on `blockjobs/status`
//! under a field manager unique to this builder process.
//!
//! Every apply carries the full set of fields this manager owns (phase, attempt, startTime,
//! lease), so once the operator or another builder has taken any of them with a forced
//! apply, the next apply here conflicts (409) instead of silently writing: renewal and
//! completion are fenced.

use blocksmith_crds::{BlockJob, JobOutput, JobPhase};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another manager owns the job's lease fields now; this builder must stop and report
    /// nothing.
    #[error("lease on {job} lost: {reason}")]
    Lost { job: String, reason: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

pub enum Claim {
    Claimed(Held),
    /// Someone else changed the job first and it is no longer claimable.
    Lost,
    /// The job changed (e.g. a label update) but is still claimable: read it again and retry.
    Stale(Box<BlockJob>),
}

/// A job this builder holds, with the values it last applied.
#[derive(Clone, Debug)]
pub struct Held {
    pub job: BlockJob,
    pub attempt: i32,
    pub acquire_time: Timestamp,
    pub renew_time: Timestamp,
    pub start_time: Timestamp,
    pub lease_duration_seconds: i32,
}

#[derive(Clone)]
pub struct LeaseClient {
    identity: String,
}

impl LeaseClient {
    pub fn new(identity: &str) -> Self {
        Self {
            identity: identity.into(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn api(&self, client: &kube::Client, job: &BlockJob) -> Api<BlockJob> {
        Api::namespaced(client.clone(), &job.namespace().unwrap_or_default())
    }

    /// Compare-and-swap claim: a forced apply guarded by the resourceVersion that was read.
    pub async fn claim(
        &self,
        client: &kube::Client,
        job: &BlockJob,
        lease_duration_seconds: i32,
    ) -> Result<Claim, LeaseError> {
        let now = Timestamp::now();
        let held = Held {
            job: job.clone(),
            attempt: job.attempt(),
            acquire_time: now,
            renew_time: now,
            start_time: now,
            lease_duration_seconds,
        };
        let mut patch = self.body(&held, JobPhase::Running, json!({}));
        patch["metadata"] = json!({ "resourceVersion": job.resource_version() });
        let api = self.api(client, job);
        let params = PatchParams::apply(&self.identity).force();
        match api
            .patch_status(&job.name_any(), &params, &Patch::Apply(patch))
            .await
        {
            Ok(updated) => Ok(Claim::Claimed(Held {
                job: updated,
                ..held
            })),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match api.get_opt(&job.name_any()).await? {
                    Some(fresh) if fresh.phase() == JobPhase::Pending => {
                        Ok(Claim::Stale(Box::new(fresh)))
                    }
                    _ => Ok(Claim::Lost),
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Claim::Lost),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn renew(&self, client: &kube::Client, held: &mut Held) -> Result<(), LeaseError> {
        let mut next = held.clone();
        next.renew_time = Timestamp::now();
        self.apply(client, &next, JobPhase::Running, json!({}))
            .await?;
        *held = next;
        Ok(())
    }

    pub async fn complete(
        &self,
        client: &kube::Client,
        held: &Held,
        output: &JobOutput,
    ) -> Result<(), LeaseError> {
        let extra = json!({ "completionTime": Time(Timestamp::now()), "output": output });
        self.apply(client, held, JobPhase::Succeeded, extra).await
    }

    pub async fn fail(
        &self,
        client: &kube::Client,
        held: &Held,
        message: &str,
    ) -> Result<(), LeaseError> {
        let extra = json!({ "completionTime": Time(Timestamp::now()), "message": message });
        self.apply(client, held, JobPhase::Failed, extra).await
    }

    /// Gives a job back unfinished (shutdown): `Pending` again, no holder, same attempt.
    pub async fn release(&self, client: &kube::Client, held: &Held) -> Result<(), LeaseError> {
        let mut body = self.body(
            held,
            JobPhase::Pending,
            json!({ "message": "released by a builder shutting down" }),
        );
        body["status"]["lease"]["holder"] = json!("");
        self.send(client, held, body).await
    }

    async fn apply(
        &self,
        client: &kube::Client,
        held: &Held,
        phase: JobPhase,
        extra: Value,
    ) -> Result<(), LeaseError> {
        let body = self.body(held, phase, extra);
        self.send(client, held, body).await
    }

    async fn send(
        &self,
        client: &kube::Client,
        held: &Held,
        body: Value,
    ) -> Result<(), LeaseError> {
        let params = PatchParams::apply(&self.identity);
        match self
            .api(client, &held.job)
            .patch_status(&held.job.name_any(), &params, &Patch::Apply(body))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Err(LeaseError::Lost {
                job: held.job.name_any(),
                reason: e.message,
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn body(&self, held: &Held, phase: JobPhase, extra: Value) -> Value {
        let mut status = json!({
            "phase": phase,
            "attempt": held.attempt,
            "startTime": Time(held.start_time),
            "lease": {
                "holder": self.identity,
                "acquireTime": Time(held.acquire_time),
                "renewTime": Time(held.renew_time),
                "leaseDurationSeconds": held.lease_duration_seconds,
            },
        });
        if let (Some(s), Value::Object(extra)) = (status.as_object_mut(), extra) {
            s.extend(extra);
        }
        json!({
            "apiVersion": "blocksmith.io/v1alpha1",
            "kind": "BlockJob",
            "status": status,
        })
    }
}
