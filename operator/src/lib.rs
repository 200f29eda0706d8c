//! blocksmith's operator: plans BlockJobs from partition lag, expires leases, retries failed
//! jobs, and commits consumer-group offsets over the contiguous prefix of succeeded jobs.
//!
//! Pure decisions: [`planner`], [`committer`], [`lifecycle`], [`conditions`], [`validate`],
//! [`policy`] (what pipelines may name), [`builder_health`] (why builders cannot run), [`freshness`] (how old the oldest
//! uncommitted record is).
//! I/O: [`reconcile`] (one pass over a pipeline, step by step), [`context`] (what every
//! reconcile shares), [`kafka`] (the cluster's offsets) and [`offsets`] (reading and
//! committing them per pipeline), [`output`] (the blocks a commit needs confirmed), [`jobs`] (the BlockJob queue), [`status`] (status and
//! Events), [`builders`] (builder Deployment + HPA), [`external_metrics`] (queue depth for
//! the HPA), [`leader`] (Lease-based leader election), [`metrics`] (Prometheus, probes),
//! [`crd_schema`] (whether the installed CRDs hold every field the operator writes).

pub mod builder_health;
pub mod builders;
pub mod committer;
pub mod conditions;
pub mod context;
pub mod crd_schema;
pub mod delegated_auth;
pub mod external_metrics;
pub mod freshness;
pub mod jobs;
pub mod kafka;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod offsets;
pub mod output;
pub mod planner;
pub mod policy;
pub mod reconcile;
pub mod status;
pub mod throttle;
pub mod topic_identity;
pub mod validate;

#[cfg(test)]
mod testing;
