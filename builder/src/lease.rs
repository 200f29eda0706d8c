//! The builder's side of the lease protocol, all server-side apply on `blockjobs/status`
//! under a field manager unique to this builder process.
//!
//! Every write is a compare-and-swap: a forced apply carrying the `resourceVersion` of the
//! job as this builder last saw it. When the job changed in between (a 409), the builder
//! reads it again and retries only if it still holds the lease (same holder, same attempt,
//! still `Running`); otherwise the lease is lost and nothing is written. So once the
//! operator has taken a lease back, or another builder has claimed the job, this builder
//! can no longer renew it or report on it: renewal and completion are fenced.
//!
//! (A plain non-forced apply is not enough: a retried job carries fields such as
//! `message`, `completionTime` and `output` owned by whoever wrote them last, and a
//! non-forced apply would conflict on those even while the lease is valid.)

use blocksmith_crds::domain::is_claimable;
use blocksmith_crds::{BlockJob, JobOutput, JobPhase};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::metrics::Metrics;

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
    Claimed(Box<Held>),
    /// Someone else changed the job first and it is no longer claimable.
    Lost,
    /// The job changed (e.g. a label update) but is still claimable now: retry with this
    /// version. (Not when it went back to `Pending` with a backoff still running.)
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
    /// The status message while running (kept on every renewal).
    pub message: String,
}

#[derive(Clone)]
pub struct LeaseClient {
    identity: String,
    metrics: Metrics,
}

impl LeaseClient {
    pub fn new(identity: &str, metrics: Metrics) -> Self {
        Self {
            identity: identity.into(),
            metrics,
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
            message: format!("attempt {} claimed by {}", job.attempt(), self.identity),
        };
        let mut patch = self.body(&held, JobPhase::Running, json!({}));
        patch["metadata"] = json!({ "resourceVersion": job.resource_version() });
        let api = self.api(client, job);
        let params = PatchParams::apply(&self.identity).force();
        self.metrics.api_write("claim");
        match api
            .patch_status(&job.name_any(), &params, &Patch::Apply(patch))
            .await
        {
            Ok(updated) => Ok(Claim::Claimed(Box::new(Held {
                job: updated,
                ..held
            }))),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match api.get_opt(&job.name_any()).await? {
                    Some(fresh) if is_claimable(fresh.status.as_ref(), Timestamp::now()) => {
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
        let previous = held.renew_time;
        held.renew_time = Timestamp::now();
        let body = self.body(held, JobPhase::Running, json!({}));
        let result = self.send(client, held, body).await;
        if result.is_err() {
            held.renew_time = previous;
        }
        result?;
        // Deleted while the operator's finalizer keeps it for its replacement: stop, as
        // for a job already gone.
        if held.job.is_terminating() {
            return Err(LeaseError::Lost {
                job: held.job.name_any(),
                reason: "the job was deleted".into(),
            });
        }
        Ok(())
    }

    pub async fn complete(
        &self,
        client: &kube::Client,
        held: &mut Held,
        output: &JobOutput,
    ) -> Result<(), LeaseError> {
        let extra = json!({
            "completionTime": Time(Timestamp::now()),
            "output": output,
            "message": format!("block of {} records written", output.records),
        });
        let body = self.body(held, JobPhase::Succeeded, extra);
        self.send(client, held, body).await
    }

    /// Reports the attempt `Failed`; `transient` when the cause was an outage (see
    /// `BlockJobStatus::transient`).
    pub async fn fail(
        &self,
        client: &kube::Client,
        held: &mut Held,
        message: &str,
        transient: bool,
    ) -> Result<(), LeaseError> {
        let extra = json!({
            "completionTime": Time(Timestamp::now()),
            "message": message,
            "transient": transient,
        });
        let body = self.body(held, JobPhase::Failed, extra);
        self.send(client, held, body).await
    }

    /// Gives a job back unfinished (shutdown): `Pending` again, no holder, same attempt.
    pub async fn release(&self, client: &kube::Client, held: &mut Held) -> Result<(), LeaseError> {
        let mut body = self.body(
            held,
            JobPhase::Pending,
            json!({ "message": "released by a builder shutting down" }),
        );
        body["status"]["lease"]["holder"] = json!("");
        self.send(client, held, body).await
    }

    /// Compare-and-swap write of `body`, retried on a changed `resourceVersion` while the
    /// job is still ours.
    async fn send(
        &self,
        client: &kube::Client,
        held: &mut Held,
        mut body: Value,
    ) -> Result<(), LeaseError> {
        let api = self.api(client, &held.job);
        let name = held.job.name_any();
        let params = PatchParams::apply(&self.identity).force();
        for _ in 0..5 {
            body["metadata"] = json!({ "resourceVersion": held.job.resource_version() });
            self.metrics.api_write("status");
            match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
                Ok(updated) => {
                    held.job = updated;
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let fresh = api.get_opt(&name).await?.ok_or_else(|| LeaseError::Lost {
                        job: name.clone(),
                        reason: "the job was deleted".into(),
                    })?;
                    if let Some(reason) = self.not_ours(&fresh, held) {
                        return Err(LeaseError::Lost { job: name, reason });
                    }
                    held.job = fresh;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    return Err(LeaseError::Lost {
                        job: name,
                        reason: "the job was deleted".into(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Lost {
            job: name,
            reason: "the job kept changing under us".into(),
        })
    }

    /// Why `job` (as just read) is no longer held by this builder, if it is not.
    fn not_ours(&self, job: &BlockJob, held: &Held) -> Option<String> {
        let status = job.status.clone().unwrap_or_default();
        let holder = status
            .lease
            .as_ref()
            .map(|l| l.holder.clone())
            .unwrap_or_default();
        if holder != self.identity {
            return Some(format!("the lease is now held by {holder:?}"));
        }
        if status.phase != JobPhase::Running || status.attempt() != held.attempt {
            return Some(format!(
                "the job is now {} at attempt {}",
                status.phase,
                status.attempt()
            ));
        }
        None
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
            "message": held.message,
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
