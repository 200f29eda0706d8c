//! One reconcile of one BlockPipeline, as the steps of a [`Pass`] in the order
//! [`Pass::steps`] lists them: validate the spec, apply the builders, tend the jobs (lease
//! expiry, retries, phase labels), read Kafka, commit over succeeded prefixes, plan new jobs,
//! mark busy builder pods, clean up history, count, and publish the status. The decisions are
//! the pure functions of `planner`, `committer`, `lifecycle` and `conditions`; this module
//! does the I/O around them.

use std::collections::{BTreeMap, HashMap, HashSet, btree_map};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksmith_crds::Reason;
use blocksmith_crds::{BlockJob, BlockPipeline, BlockPipelineStatus, JobPhase};
use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{debug, info, warn};

pub use crate::context::{Caches, Context, Error};

use crate::builder_health::{builder_troubles, troubles_message};
use crate::builders::{self, deployment_name};
use crate::committer::{next_commits, refresh_due};
use crate::conditions::{Observed, Problem};
use crate::jobs::{self, JobStore, KafkaIds};
use crate::kafka::{self, KafkaError};
use crate::lifecycle::{
    Deleted, FinishedJob, JobAction, JobCounts, Reset, Source, finish, held_until, job_action,
    jobs_to_delete, label_due, next_wakeup, on_deletion, pipeline_uid, reset,
};
use crate::metrics::{RECONCILE_HEARTBEAT, reconcile_deadline};
use crate::offsets::KafkaRead;
use crate::output::{self, Evidence, OutputError};
use crate::planner::{
    JobRanges, PlanPolicy, PlannedJob, WrittenBlocks, add_deleted_ranges, job_ranges_where,
    output_reads, plan_pipeline,
};
use crate::policy::secret_references;
use crate::status;
use crate::topic_identity;
use crate::validate::{
    InvalidSpec, validate, validate_cluster_unchanged, validate_name, validate_topic_unchanged,
};

/// How many planned jobs are created at once.
const CONCURRENT_CREATES: usize = 8;

pub async fn reconcile(bp: Arc<BlockPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    // On /healthz while it runs (until dropped): one that outlives its deadline is stuck.
    let _in_progress = ctx.metrics.health().start(
        RECONCILE_HEARTBEAT,
        format!("{}/{}", bp.namespace().unwrap_or_default(), bp.name_any()),
        reconcile_deadline(ctx.kafka_timeout),
    );
    let result = Pass::new(&bp, &ctx).run().await;
    ctx.metrics
        .observe_reconcile(started.elapsed().as_secs_f64());
    debug!(took = ?started.elapsed(), next = ?result, "reconciled");
    result
}

/// What the operator keeps of a pipeline that is gone: its Kafka client, metric series and
/// what it last applied go; its jobs, which garbage collection is deleting, are let go.
pub async fn forget_deleted_pipeline(ctx: &Arc<Context>, namespace: &str, pipeline: &str) {
    let key = format!("{namespace}/{pipeline}");
    ctx.kafka.forget(&key);
    ctx.metrics.forget_pipeline(namespace, pipeline);
    ctx.builders_applied
        .lock()
        .expect("builders lock")
        .remove(&key);
    ctx.arrivals.lock().expect("arrivals lock").remove(&key);
    release_jobs_of_deleted_pipeline(ctx, namespace, pipeline).await;
}

/// How soon a deleted pipeline's job a builder still held is looked at again, besides at its
/// lease's end: the job cache may not yet have had the event that released it.
const HELD_JOB_RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// Lets go of the jobs of a deleted pipeline that garbage collection is deleting: the
/// operator's finalizer keeps a deleted job's range for its pipeline, and there is none left.
/// A pipeline of the same name created since keeps its own jobs' ranges. A job a builder
/// still holds is let go once its lease is over (see [`Deleted::HoldUntil`]): until then a
/// pipeline re-created under the name plans around it.
fn release_jobs_of_deleted_pipeline<'a>(
    ctx: &'a Arc<Context>,
    namespace: &'a str,
    pipeline: &'a str,
) -> BoxFuture<'a, ()> {
    // Boxed: it schedules itself again.
    Box::pin(async move {
        let store = JobStore::new(
            ctx.client.clone(),
            ctx.jobs.clone(),
            namespace,
            pipeline,
            ctx.metrics.clone(),
        );
        // Called on every event of the deleted pipeline's jobs: copies only the few it needs.
        let kept = store.cached_where(|j| j.is_terminating() && j.keeps_range());
        if kept.is_empty() {
            return;
        }
        let pipelines: kube::Api<BlockPipeline> =
            kube::Api::namespaced(ctx.client.clone(), namespace);
        let current = match pipelines.get_opt(pipeline).await {
            Ok(bp) => bp.and_then(|bp| bp.metadata.uid),
            Err(e) => {
                warn!(namespace, pipeline, error = %e, "reading a pipeline whose jobs are being deleted");
                return;
            }
        };
        let now = Timestamp::now();
        let mut look_again: Option<Timestamp> = None;
        for job in kept {
            if current.is_some() && pipeline_uid(&job) == current.as_deref() {
                continue;
            }
            if let Some(until) = held_until(&job, now) {
                look_again = Some(look_again.map_or(until, |t| t.min(until)));
                continue;
            }
            match store.release(&job).await {
                Ok(_) => {
                    info!(namespace, pipeline, job = %job.name_any(), "released a job of a deleted pipeline")
                }
                Err(e) if is_api_error(&e, &[404, 409]) => {}
                Err(e) => {
                    warn!(namespace, pipeline, job = %job.name_any(), error = %e, "releasing a job of a deleted pipeline")
                }
            }
        }
        // A builder that died holding a job sends no event when its lease runs out. And the
        // event that woke this may be newer than the cache read above (a job reported
        // Succeeded still Running there), with no event to follow: look again soon too.
        if let Some(until) = look_again {
            let until = until.min(now + HELD_JOB_RECHECK);
            let wait = Duration::try_from(until.duration_since(now)).unwrap_or_default();
            let (ctx, namespace, pipeline) =
                (ctx.clone(), namespace.to_owned(), pipeline.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(wait + Duration::from_millis(100)).await;
                release_jobs_of_deleted_pipeline(&ctx, &namespace, &pipeline).await;
            });
        }
    })
}

pub fn error_policy(_bp: Arc<BlockPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed");
    ctx.metrics.reconcile_error(error.kind());
    Action::requeue(Duration::from_secs(2))
}

/// Why a pass stops before its last step.
enum Halt {
    /// The spec, or what it now reaches, cannot be acted on: reported as `InvalidSpec` before
    /// any commit or planning; the next change to the pipeline or its jobs looks again.
    InvalidSpec(String),
    /// As `InvalidSpec`, for what can change without the pipeline changing (a Secret's
    /// labels): looked at again after the poll interval.
    InvalidSpecOutside(String),
    Failed(Error),
}

impl From<InvalidSpec> for Halt {
    fn from(e: InvalidSpec) -> Self {
        Halt::InvalidSpec(e.to_string())
    }
}

impl From<kube::Error> for Halt {
    fn from(e: kube::Error) -> Self {
        Halt::Failed(e.into())
    }
}

/// Job writes a pass has in flight at once: one round trip each, and a pass may have a
/// write for every job that finished since the last.
const CONCURRENT_JOB_WRITES: usize = 8;

/// One reconcile of one pipeline: what it acts on and what it has found so far.
struct Pass<'a> {
    bp: &'a BlockPipeline,
    ctx: &'a Context,
    ns: String,
    name: String,
    now: Timestamp,
    store: JobStore,
    /// The status as last published.
    old: BlockPipelineStatus,
    /// The status being built.
    status: BlockPipelineStatus,
    observed: Observed,
    /// The earliest time a job needs the operator again with no write to wake it.
    wake: Option<Timestamp>,
}

impl<'a> Pass<'a> {
    fn new(bp: &'a BlockPipeline, ctx: &'a Context) -> Self {
        let ns = bp.namespace().unwrap_or_default();
        let name = bp.name_any();
        let old = bp.status.clone().unwrap_or_default();
        let status = BlockPipelineStatus {
            observed_generation: bp.metadata.generation,
            last_commit_time: old.last_commit_time.clone(),
            topic: old.topic.clone(),
            ..Default::default()
        };
        Self {
            bp,
            ctx,
            store: JobStore::new(
                ctx.client.clone(),
                ctx.jobs.clone(),
                &ns,
                &name,
                ctx.metrics.clone(),
            ),
            ns,
            name,
            now: Timestamp::now(),
            old,
            status,
            observed: Observed {
                suspended: bp.spec.suspend,
                ..Default::default()
            },
            wake: None,
        }
    }

    async fn run(mut self) -> Result<Action, Error> {
        match self.steps().await {
            Ok(()) => {}
            Err(Halt::InvalidSpec(message)) => {
                self.report_invalid_spec(message).await?;
                return Ok(Action::await_change());
            }
            Err(Halt::InvalidSpecOutside(message)) => {
                self.report_invalid_spec(message).await?;
                return Ok(Action::requeue(requeue_after(
                    None,
                    self.now,
                    self.ctx.poll_interval,
                    true,
                )));
            }
            Err(Halt::Failed(e)) => {
                self.report_refused_request(&e).await;
                return Err(e);
            }
        }
        let has_problems = !self.observed.problems.is_empty();
        self.publish().await?;
        Ok(Action::requeue(requeue_after(
            self.wake,
            self.now,
            self.ctx.poll_interval,
            has_problems,
        )))
    }

    async fn steps(&mut self) -> Result<(), Halt> {
        let policy = self.validate_spec()?;
        let secrets = self.read_named_secrets().await?;
        self.hold_to_operator_policy(&secrets)?;
        self.apply_builders(&secrets).await?;
        let (jobs, deleted) = self.tend_jobs().await?;
        let mut committed = BTreeMap::new();
        if let Some(mut kafka) = self.read_kafka(&jobs).await? {
            self.keep_deleted_ranges(&deleted, &kafka).await?;
            if self.check_topic(&jobs, &kafka) {
                let unconfirmed = self.confirm_blocks(&jobs, &kafka).await?;
                let mut ranges = job_ranges_where(&jobs, |j| {
                    j.phase() == JobPhase::Succeeded && !unconfirmed.contains(&j.name_any())
                });
                add_deleted_ranges(&mut ranges, &deleted);
                self.commit_durable_prefixes(&mut kafka, &ranges).await;
                self.plan(&kafka, &ranges, &policy).await?;
                committed = kafka.committed();
            }
        }
        let jobs = self.finish_succeeded_jobs(jobs, &committed).await?;
        self.mark_busy_builders(&jobs).await?;
        self.clean_up_history(&jobs, &committed).await?;
        self.count(&jobs);
        Ok(())
    }

    fn validate_spec(&self) -> Result<PlanPolicy, Halt> {
        validate_name(&self.name).map_err(Halt::InvalidSpec)?;
        validate(&self.bp.spec)?;
        PlanPolicy::from_spec(&self.bp.spec)
            .map_err(|e| Halt::InvalidSpec(format!("spec.jobs.maxAge: {e}")))
    }

    /// The Secrets the pipeline names (`None` for one that does not exist), read once a pass
    /// for the policy's label check and for the digest that rolls the builders when one
    /// changes; none when neither needs them.
    async fn read_named_secrets(&self) -> Result<BTreeMap<String, Option<Secret>>, kube::Error> {
        let mut read = BTreeMap::new();
        if self.ctx.policy.secret_label.is_none() && self.bp.spec.builders.is_none() {
            return Ok(read);
        }
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        for (_, name) in secret_references(&self.bp.spec) {
            if let btree_map::Entry::Vacant(entry) = read.entry(name) {
                let secret = secrets.get_opt(entry.key()).await?;
                entry.insert(secret);
            }
        }
        Ok(read)
    }

    /// Holds the pipeline to the operator's [`crate::policy::Policy`]: its builders' image and
    /// ServiceAccount, and the label of every Secret it names, before anything uses a Secret
    /// for it or applies its builders.
    fn hold_to_operator_policy(
        &self,
        secrets: &BTreeMap<String, Option<Secret>>,
    ) -> Result<(), Halt> {
        let policy = &self.ctx.policy;
        policy
            .check_builders(&self.bp.spec)
            .map_err(Halt::InvalidSpec)?;
        if policy.secret_label.is_none() {
            return Ok(());
        }
        for (field, name) in secret_references(&self.bp.spec) {
            // A missing Secret is reported where it is used (SecretNotFound).
            if let Some(Some(secret)) = secrets.get(&name) {
                policy
                    .check_secret(secret, &field)
                    .map_err(Halt::InvalidSpecOutside)?;
            }
        }
        Ok(())
    }

    /// Applies the builder Deployment, HPA and PodDisruptionBudget when what they should be
    /// has changed, a Secret they read included.
    async fn apply_builders(
        &mut self,
        secrets: &BTreeMap<String, Option<Secret>>,
    ) -> Result<(), kube::Error> {
        let bp = self.bp;
        let key = self.key();
        let secrets_digest = builders::secrets_digest(secrets);
        let desired = serde_json::to_string(&(
            &bp.spec.builders,
            &bp.spec.output.credentials_secret_ref,
            (
                &bp.spec.kafka.security_protocol,
                &bp.spec.kafka.sasl,
                &bp.spec.kafka.tls,
            ),
            bp.metadata.uid.as_deref(),
            &secrets_digest,
        ))
        .unwrap_or_default();
        let applied = &self.ctx.builders_applied;
        let name = deployment_name(&self.name);
        let deployment = ObjectRef::new(&name).within(&self.ns);
        let autoscaler_missing = matches!(self.cached_autoscaler(&name), Some(None));
        let deleted = bp.spec.builders.is_some()
            && (self.ctx.builders.get(&deployment).is_none() || autoscaler_missing);
        if !deleted && applied.lock().expect("builders lock").get(&key) == Some(&desired) {
            return Ok(());
        }
        let ctx = self.ctx;
        if let Some(message) = builders::reconcile(
            &ctx.client,
            bp,
            ctx.builder_apis,
            &secrets_digest,
            &ctx.metrics,
        )
        .await?
        {
            self.observed
                .problems
                .push(Problem::autoscaling_unavailable(message));
        }
        applied.lock().expect("builders lock").insert(key, desired);
        Ok(())
    }

    /// Brings each job up to date (see [`Pass::tend_job`]) and notes when the jobs need the
    /// operator next and which of them wait for the user. Returns the jobs as they now are,
    /// without those that changed under us, and apart from them the deleted jobs the
    /// operator's finalizer still keeps (see [`Pass::keep_deleted_ranges`]).
    async fn tend_jobs(&mut self) -> Result<(Vec<BlockJob>, Vec<BlockJob>), Halt> {
        let (deleted, listed): (Vec<BlockJob>, Vec<BlockJob>) = self
            .store
            .cached()
            .into_iter()
            .partition(BlockJob::is_terminating);
        let deleted = deleted.into_iter().filter(BlockJob::keeps_range).collect();
        let topics = listed.iter().map(|j| j.spec.topic.as_str());
        validate_topic_unchanged(&self.name, &self.bp.spec, topics)?;
        let backoff_limit = self.bp.spec.jobs.backoff_limit;
        let mut jobs = Vec::with_capacity(listed.len());
        for job in listed {
            let Some(job) = self.tend_job(job).await? else {
                self.wake_at(self.now);
                continue;
            };
            if let Some(t) = next_wakeup(job.status.as_ref(), backoff_limit, self.now) {
                self.wake_at(t);
            }
            if job_action(job.status.as_ref(), backoff_limit, self.now) == JobAction::Exhausted {
                self.observed.problems.push(Problem::job_failed(&job));
            }
            jobs.push(job);
        }
        Ok((jobs, deleted))
    }

    /// Deleted jobs whose range is not committed come back as jobs of exactly their range
    /// before the finalizer lets them go, so that a builder still finishing one writes the
    /// block its replacement would, never one overlapping new cut points. The replacement
    /// is created before the release: any cache that no longer shows the deleted job shows
    /// its replacement, so the range is never seen free.
    async fn keep_deleted_ranges(
        &mut self,
        deleted: &[BlockJob],
        kafka: &KafkaRead,
    ) -> Result<(), kube::Error> {
        let committed = kafka.committed();
        let source = Source {
            pipeline_uid: self.bp.metadata.uid.as_deref(),
            topic: &self.bp.spec.kafka.topic,
            kafka_cluster_id: kafka.cluster_id.as_deref(),
            kafka_topic_id: kafka.topic_id.as_deref(),
        };
        for job in deleted {
            let committed = committed.get(&job.spec.partition).copied();
            match on_deletion(job, &source, committed, self.now) {
                Deleted::Replace { held_until } => {
                    info!(namespace = %self.ns, pipeline = %self.name, job = %job.name_any(), start = job.spec.start_offset, end = job.spec.end_offset, "a deleted job comes back with its range");
                    self.store.replace(self.bp, job).await?;
                    if let Some(until) = held_until {
                        self.wake_at(until);
                        continue;
                    }
                }
                Deleted::HoldUntil(until) => {
                    info!(namespace = %self.ns, pipeline = %self.name, job = %job.name_any(), start = job.spec.start_offset, end = job.spec.end_offset, %until, "a deleted job keeps its range while a builder holds it");
                    self.wake_at(until);
                    continue;
                }
                Deleted::Release => {}
            }
            match self.store.release(job).await {
                Ok(_) => {}
                Err(e) if is_api_error(&e, &[404, 409]) => self.wake_at(self.now),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records which topic the pipeline writes (see [`topic_identity::check`]). Returns
    /// false, with the `TopicRecreated` problem, when the topic was deleted and created again
    /// and nothing may be planned or committed.
    fn check_topic(&mut self, jobs: &[BlockJob], kafka: &KafkaRead) -> bool {
        let recorded = topic_identity::Recorded {
            status: self.old.topic.as_ref(),
            jobs: jobs
                .iter()
                .filter(|j| j.spec.topic == self.bp.spec.kafka.topic)
                .map(|j| (j.spec.kafka_topic_id.as_deref(), j.spec.output.url.as_str()))
                .collect(),
        };
        let spec = &self.bp.spec;
        let checked = topic_identity::check(
            &recorded,
            kafka.topic_id.as_deref(),
            &spec.kafka.topic,
            &spec.output.url,
        );
        self.status.topic = checked.identity;
        let Some(message) = checked.recreated else {
            return true;
        };
        warn!(namespace = %self.ns, pipeline = %self.name, problem = %message, "topic re-created");
        // The cause of whatever else fails (a job of the old topic): named first.
        self.observed.problems.insert(
            0,
            Problem {
                reason: Reason::TopicRecreated,
                message,
            },
        );
        self.status.partitions = self.old.partitions.clone();
        false
    }

    /// Applies the job's lifecycle [`reset`] and keeps its phase label in sync. Returns the
    /// job as it now is, or `None` when it changed under us (the next reconcile looks again).
    async fn tend_job(&self, job: BlockJob) -> Result<Option<BlockJob>, kube::Error> {
        let job = match reset(&job, self.bp.spec.jobs.backoff_limit, self.now) {
            None => job,
            Some(r) => {
                info!(job = %job.name_any(), phase = %r.phase, attempt = r.attempt, message = %r.message, "resetting job");
                match self.store.reset(&job, &r).await {
                    Ok(j) => j,
                    Err(e) if is_api_error(&e, &[409, 404]) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
        };
        let Some(phase) = label_due(&job) else {
            return Ok(Some(job));
        };
        let desired = jobs::desired_job(self.bp, job.spec.clone(), phase);
        match self.store.relabel(&job, &desired).await {
            Ok(j) => Ok(Some(j)),
            // Changed or deleted since the cache saw it (or never there: a resourceVersion
            // on an apply never creates).
            Err(e) if is_api_error(&e, &[409, 404, 422]) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Labels the `Succeeded` jobs so, releasing the finalizers of those whose range is
    /// `committed` in the same write ([`finish`]); a few writes at a time. Returns the jobs
    /// as they now are.
    async fn finish_succeeded_jobs(
        &mut self,
        jobs: Vec<BlockJob>,
        committed: &BTreeMap<i32, i64>,
    ) -> Result<Vec<BlockJob>, kube::Error> {
        let store = &self.store;
        // Each job as it now is, and whether it changed under us (the next pass looks again).
        let finished: Vec<kube::Result<(Option<BlockJob>, bool)>> = stream::iter(jobs)
            .map(|job| async move {
                let Some(f) = finish(&job, committed.get(&job.spec.partition).copied()) else {
                    return Ok((Some(job), false));
                };
                match store.finish(&job, f.release).await {
                    Ok(j) => Ok((Some(j), false)),
                    Err(e) if is_api_error(&e, &[409]) => Ok((Some(job), true)),
                    Err(e) if is_api_error(&e, &[404]) => Ok((None, true)),
                    Err(e) => Err(e),
                }
            })
            .buffered(CONCURRENT_JOB_WRITES)
            .collect()
            .await;
        let mut jobs = Vec::with_capacity(finished.len());
        for result in finished {
            let (job, changed) = result?;
            jobs.extend(job);
            if changed {
                self.wake_at(self.now);
            }
        }
        Ok(jobs)
    }

    /// Reads the pipeline's offsets. A failure to reach Kafka is a problem of the pipeline,
    /// not of the reconcile: the status keeps the partitions last read.
    async fn read_kafka(&mut self, jobs: &[BlockJob]) -> Result<Option<KafkaRead>, Halt> {
        let conn = match kafka::connection(self.bp, &self.ctx.client).await {
            Ok(conn) => conn,
            Err(problem) => {
                self.observed.problems.insert(0, problem);
                return Ok(None);
            }
        };
        let kafka = match self.ctx.kafka.read(&self.key(), conn, self.bp).await {
            Ok(kafka) => kafka,
            Err(e) => {
                warn!(namespace = %self.ns, pipeline = %self.name, error = %e, "reading Kafka offsets");
                self.kafka_failed(&e);
                self.status.partitions = self.old.partitions.clone();
                return Ok(None);
            }
        };
        let clusters = jobs.iter().map(|j| j.spec.kafka_cluster_id.as_deref());
        validate_cluster_unchanged(&self.name, kafka.cluster_id.as_deref(), clusters)?;
        Ok(Some(kafka))
    }

    /// Checks the output for the block of every `Succeeded` job not yet committed, once per
    /// job: a commit moves only over blocks the output confirms. A job without its manifest
    /// is built again; one the output contradicts, or that cannot be checked, holds its
    /// partition's commit. Returns the names of the `Succeeded` jobs not to count as such.
    async fn confirm_blocks(
        &mut self,
        jobs: &[BlockJob],
        kafka: &KafkaRead,
    ) -> Result<HashSet<String>, Halt> {
        let committed = kafka.committed();
        let ctx = self.ctx;
        let confirmations = &ctx.confirmed_blocks;
        let to_check = |j: &BlockJob| {
            j.phase() == JobPhase::Succeeded
                && committed
                    .get(&j.spec.partition)
                    .is_none_or(|c| j.spec.end_offset > *c)
                && !confirmations.contains(j)
        };
        let mut held = HashSet::new();
        if !jobs.iter().any(to_check) {
            return Ok(held);
        }
        let checked: Vec<&BlockJob> = jobs.iter().filter(|j| to_check(j)).collect();
        let read = async {
            let settings = output::settings(&ctx.client, self.bp).await?;
            output::evidence_of(&ctx.output_stores, &checked, &settings).await
        };
        let found = match read.await {
            Ok(found) => found,
            Err(e) => {
                held.extend(checked.iter().map(|j| j.name_any()));
                self.observed.problems.push(Problem {
                    reason: Reason::BlockUnconfirmed,
                    message: format!("succeeded jobs' blocks cannot be confirmed: {e}"),
                });
                return Ok(held);
            }
        };
        for (job, evidence) in checked.into_iter().zip(found) {
            if !matches!(evidence, Ok(Evidence::Confirmed)) {
                held.insert(job.name_any());
            }
            match evidence {
                Ok(Evidence::Confirmed) => confirmations.insert(job),
                Ok(Evidence::Missing { url }) => {
                    warn!(namespace = %self.ns, pipeline = %self.name, job = %job.name_any(), %url, "a job reported Succeeded without its block's manifest; building it again");
                    let reset = Reset::pending(
                        job.attempt() + 1,
                        self.now,
                        format!(
                            "reported Succeeded, but there is no manifest at {url}: building it again"
                        ),
                        None,
                    );
                    self.store.reset(job, &reset).await?;
                }
                Ok(Evidence::Contradicts { url, why }) => {
                    let why = format!("the manifest at {url} does not vouch for it: {why}");
                    self.observed
                        .problems
                        .push(Problem::block_unconfirmed(job, &why));
                }
                Err(e) => {
                    let why = format!("its manifest cannot be read: {e}");
                    self.observed
                        .problems
                        .push(Problem::block_unconfirmed(job, &why));
                }
            }
        }
        Ok(held)
    }

    /// Moves each partition's committed offset over the succeeded jobs that start at it.
    async fn commit_durable_prefixes(&mut self, kafka: &mut KafkaRead, ranges: &JobRanges) {
        let commits = next_commits(&kafka.offsets, ranges);
        if commits.is_empty() {
            self.refresh_idle_offsets(kafka).await;
            return;
        }
        match kafka.commit(&self.bp.spec.kafka.topic, &commits).await {
            Ok(committed) if committed.is_empty() => {}
            Ok(committed) => {
                self.ctx.metrics.commit(&self.ns, &self.name);
                self.status.last_commit_time = Some(Time(self.now));
                kafka.set_committed(&committed);
                info!(namespace = %self.ns, pipeline = %self.name, commits = ?committed, "committed offsets");
            }
            Err(e) => self.kafka_failed(&e),
        }
    }

    /// Commits offsets that have not moved for [`Context::offset_refresh`] again, so that
    /// Kafka's retention of an idle group's offsets never runs out.
    async fn refresh_idle_offsets(&mut self, kafka: &KafkaRead) {
        let last = self.status.last_commit_time.as_ref().map(|t| t.0);
        if kafka.committed().is_empty() || !refresh_due(last, self.now, self.ctx.offset_refresh) {
            return;
        }
        match kafka.refresh(&self.bp.spec.kafka.topic).await {
            Ok(refreshed) => {
                self.ctx.metrics.commit(&self.ns, &self.name);
                self.status.last_commit_time = Some(Time(self.now));
                info!(namespace = %self.ns, pipeline = %self.name, commits = ?refreshed, "committed unchanged offsets again, so that Kafka does not expire them");
            }
            Err(e) => self.kafka_failed(&e),
        }
    }

    /// Plans every partition and creates the new jobs, committing start offsets first where
    /// a partition has none to start from.
    async fn plan(
        &mut self,
        kafka: &KafkaRead,
        ranges: &JobRanges,
        policy: &PlanPolicy,
    ) -> Result<(), Halt> {
        let plan_over = |written: &WrittenBlocks| {
            plan_pipeline(
                &kafka.offsets,
                ranges,
                written,
                &self.old.partitions,
                self.bp.spec.suspend,
                self.now,
                policy,
            )
        };
        let mut plan = plan_over(&WrittenBlocks::new());
        let reads = output_reads(&plan, &self.old.partitions, policy.max_records);
        if !reads.is_empty() {
            match self.read_written_blocks(&reads, &kafka.ids()).await {
                Ok(written) => plan = plan_over(&written),
                Err(e) => {
                    plan.hold(&reads);
                    let partitions: Vec<&i32> = reads.keys().collect();
                    self.observed.problems.push(Problem {
                        reason: Reason::OutputUnreadable,
                        message: format!(
                            "before planning partitions {partitions:?} the operator lists the blocks already in the output (a re-created pipeline, a deleted job or a lost commit would otherwise write records twice), and it cannot: {e}. Nothing is planned there until it can; planning resumes by itself once the output can be read"
                        ),
                    });
                }
            }
        }
        for (partition, error) in plan.errors {
            self.observed
                .problems
                .push(Problem::partition_unplannable(partition, error));
        }
        self.status.partitions = plan.partitions;
        let starts = &plan.initial_commits;
        if !starts.is_empty()
            && !self
                .commit_start_offsets(kafka, starts, &plan.skipped)
                .await
        {
            return Ok(());
        }
        self.create_jobs(&plan.new_jobs, &kafka.ids()).await?;
        Ok(())
    }

    /// The blocks the pipeline's output holds in each partition of `reads`, from its offset.
    async fn read_written_blocks(
        &self,
        reads: &BTreeMap<i32, i64>,
        ids: &KafkaIds,
    ) -> Result<WrittenBlocks, OutputError> {
        let settings = output::settings(&self.ctx.client, self.bp).await?;
        let spec_of = |partition, start, end| {
            let range = PlannedJob {
                partition,
                start,
                end,
            };
            jobs::job_spec(self.bp, &range, ids)
        };
        let (url, topic) = (&self.bp.spec.output.url, &self.bp.spec.kafka.topic);
        let stores = &self.ctx.output_stores;
        let written = output::written_blocks(stores, url, &settings, topic, reads, spec_of).await?;
        for (partition, blocks) in written.iter().filter(|(_, b)| !b.is_empty()) {
            info!(namespace = %self.ns, pipeline = %self.name, partition, blocks = blocks.len(), "planning around blocks already in the output");
        }
        Ok(written)
    }

    /// Without a committed offset a partition's start would move with the watermarks: makes
    /// it durable before planning from it. Returns whether it did.
    async fn commit_start_offsets(
        &mut self,
        kafka: &KafkaRead,
        starts: &BTreeMap<i32, i64>,
        skipped: &[(i32, i64, i64)],
    ) -> bool {
        match kafka.commit(&self.bp.spec.kafka.topic, starts).await {
            Err(e) => {
                self.kafka_failed(&e);
                return false;
            }
            // Someone else committed meanwhile: this plan is stale; plan again at once.
            Ok(committed) if committed != *starts => {
                self.wake_at(self.now);
                return false;
            }
            Ok(_) => {}
        }
        self.status.last_commit_time = Some(Time(self.now));
        info!(namespace = %self.ns, pipeline = %self.name, start = ?starts, "committed start offsets");
        // The skip is durable now: tell the user once, as the next plan starts at `to`.
        let mut events = Vec::new();
        for &(partition, from, to) in skipped {
            warn!(namespace = %self.ns, pipeline = %self.name, partition, from, to, "skipped offsets deleted by retention (spec.kafka.skipMissingData)");
            events.push(status::skipped_data_event(partition, from, to));
        }
        status::record(self.bp, self.ctx, events).await;
        for p in &mut self.status.partitions {
            if let Some(o) = starts.get(&p.partition) {
                p.committed_offset = Some(*o);
            }
        }
        true
    }

    /// Creates jobs `CONCURRENT_CREATES` at a time (each is a round trip). One that fails
    /// leaves a gap, which the next plan fills.
    async fn create_jobs(
        &mut self,
        new_jobs: &[PlannedJob],
        ids: &KafkaIds,
    ) -> Result<(), kube::Error> {
        if !new_jobs.is_empty() {
            info!(namespace = %self.ns, pipeline = %self.name, jobs = new_jobs.len(), "planning jobs");
        }
        for chunk in new_jobs.chunks(CONCURRENT_CREATES) {
            let planned: Vec<BlockJob> = chunk
                .iter()
                .map(|p| {
                    let spec = jobs::job_spec(self.bp, p, ids);
                    jobs::desired_job(self.bp, spec, JobPhase::Pending)
                })
                .collect();
            let created =
                futures::future::try_join_all(planned.iter().map(|j| self.store.create(j))).await?;
            let existed = created.iter().filter(|c| c.is_none()).count();
            if existed > 0 {
                // The watch cache is behind what was created before; plan again once it caught up.
                info!(namespace = %self.ns, pipeline = %self.name, existed, "jobs exist already; job cache behind, planning again shortly");
                self.wake_at(self.now);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Marks the pods of builders holding a lease, so scale-down takes idle pods first.
    async fn mark_busy_builders(&mut self, jobs: &[BlockJob]) -> Result<(), kube::Error> {
        if self.bp.spec.builders.is_none() {
            return Ok(());
        }
        let busy: Vec<&str> = jobs
            .iter()
            .filter(|j| j.phase() == JobPhase::Running)
            .filter_map(|j| j.status.as_ref()?.lease.as_ref().map(|l| l.holder.as_str()))
            .collect();
        let pods =
            builders::mark_busy_pods(&self.ctx.client, self.bp, &busy, &self.ctx.metrics).await?;
        self.check_builders(&pods);
        Ok(())
    }

    /// The builder HPA `name` as the cache holds it, or `None` where no HPA is watched (the
    /// cluster serves no HPA API).
    fn cached_autoscaler(&self, name: &str) -> Option<Option<Arc<DynamicObject>>> {
        match (&self.ctx.autoscalers, self.ctx.builder_apis.hpa_resource()) {
            (Some(cache), Some(resource)) => {
                Some(cache.get(&ObjectRef::new_with(name, resource).within(&self.ns)))
            }
            _ => None,
        }
    }

    /// Reports why the builders cannot run or scale, from their Deployment and HPA (cached)
    /// and their `pods`.
    fn check_builders(&mut self, pods: &[Pod]) {
        let name = deployment_name(&self.name);
        let deployment = self
            .ctx
            .builders
            .get(&ObjectRef::new(&name).within(&self.ns));
        let hpa = self.cached_autoscaler(&name).flatten();
        let troubles = builder_troubles(deployment.as_deref(), pods, hpa.as_deref());
        if let Some(message) = troubles_message(&troubles) {
            self.observed
                .problems
                .push(Problem::builders_unavailable(message));
        }
    }

    /// Deletes succeeded jobs below the commit, past their TTL or beyond the history limit.
    async fn clean_up_history(
        &self,
        jobs: &[BlockJob],
        committed: &BTreeMap<i32, i64>,
    ) -> Result<(), kube::Error> {
        let spec = &self.bp.spec.jobs;
        let finished: Vec<FinishedJob> = jobs.iter().filter_map(FinishedJob::of).collect();
        let ttl = Duration::from_secs(spec.ttl_seconds_after_succeeded.max(0) as u64);
        let limit = spec.successful_jobs_history_limit.max(0) as usize;
        let by_name: HashMap<String, &BlockJob> = jobs.iter().map(|j| (j.name_any(), j)).collect();
        let mut deletes = Vec::new();
        for name in jobs_to_delete(&finished, committed, ttl, limit, self.now) {
            if let Some(job) = by_name.get(&name) {
                deletes.push(self.store.delete(job));
            }
        }
        stream::iter(deletes)
            .buffer_unordered(CONCURRENT_JOB_WRITES)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// The queue, job and lag figures of the status and the metrics.
    fn count(&mut self, jobs: &[BlockJob]) {
        let counts = JobCounts::of(jobs, self.bp.spec.jobs.backoff_limit, self.now);
        self.status.queue_depth = counts.claimable;
        self.status.running_jobs = counts.running;
        self.status.failed_jobs = counts.exhausted;
        self.status.lag = self.status.partitions.iter().map(|p| p.lag).sum();
        self.observed.lag = self.status.lag;
        self.observed.unfinished_jobs = counts.unfinished();
        let (ns, name) = (&self.ns, &self.name);
        self.ctx.metrics.queue(
            ns,
            name,
            counts.claimable,
            &[
                ("Pending", counts.pending),
                ("Running", counts.running),
                ("Succeeded", counts.succeeded),
                ("Failed", counts.failed),
            ],
        );
        for p in &self.status.partitions {
            self.ctx
                .metrics
                .partition(ns, name, p.partition, p.committed_offset, p.lag);
        }
        let arrival = self.oldest_uncommitted_arrival();
        let age = arrival.map_or(0, |t| self.now.duration_since(t).as_secs().max(0));
        // Whole seconds, as the API keeps it: a fraction would make every status look new.
        self.status.oldest_uncommitted_time = arrival
            .and_then(|t| Timestamp::from_second(t.as_second()).ok())
            .map(Time);
        self.ctx.metrics.oldest_uncommitted_age(ns, name, age);
    }

    /// When the oldest uncommitted record of any partition arrived (see
    /// [`crate::freshness`]), from the log ends and commits of this pass.
    fn oldest_uncommitted_arrival(&self) -> Option<Timestamp> {
        let mut arrivals = self.ctx.arrivals.lock().expect("arrivals lock");
        let partitions = arrivals.entry(self.key()).or_default();
        let mut oldest: Option<Timestamp> = None;
        for p in &self.status.partitions {
            let a = partitions.entry(p.partition).or_default();
            a.observe(p.high_watermark, self.now);
            if let Some(seen) = p
                .committed_offset
                .and_then(|committed| a.oldest_uncommitted_arrival(committed))
            {
                oldest = Some(oldest.map_or(seen, |o| o.min(seen)));
            }
        }
        oldest
    }

    async fn publish(&mut self) -> Result<(), Error> {
        let status = std::mem::take(&mut self.status);
        status::publish(
            self.bp,
            self.ctx,
            &self.old,
            status,
            &self.observed,
            self.now,
        )
        .await
    }

    async fn report_invalid_spec(&mut self, message: String) -> Result<(), Error> {
        warn!(namespace = %self.ns, pipeline = %self.name, problem = %message, "invalid spec");
        self.observed.problems.push(Problem::invalid_spec(message));
        self.status.partitions = self.old.partitions.clone();
        self.publish().await
    }

    /// Shows a request the API refused on the pipeline (a condition and a Warning Event), where
    /// it would otherwise reach only the log. The pass still fails and is retried.
    async fn report_refused_request(&mut self, error: &Error) {
        let Error::Kube(e) = error;
        let Some(problem) = Problem::request_refused(e) else {
            return;
        };
        self.observed.problems.insert(0, problem);
        self.status.partitions = self.old.partitions.clone();
        if let Err(e) = self.publish().await {
            warn!(namespace = %self.ns, pipeline = %self.name, error = %e, "reporting a refused request");
        }
    }

    fn kafka_failed(&mut self, e: &KafkaError) {
        if let KafkaError::NotLeading(_) = e {
            // This replica is about to stop acting; the pipeline has no problem.
            warn!(namespace = %self.ns, pipeline = %self.name, "{e}");
            return;
        }
        self.ctx.metrics.kafka_error(&self.ns, &self.name);
        self.observed.problems.insert(0, kafka_problem(e));
    }

    fn wake_at(&mut self, t: Timestamp) {
        self.wake = Some(self.wake.map_or(t, |w| w.min(t)));
    }

    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

/// When to look at the pipeline again: when a job next needs the operator (`wake`), else
/// after the poll interval (at least 5 s while the pipeline has problems); never sooner
/// than 200 ms.
fn requeue_after(
    wake: Option<Timestamp>,
    now: Timestamp,
    poll_interval: Duration,
    has_problems: bool,
) -> Duration {
    let poll = if has_problems {
        poll_interval.max(Duration::from_secs(5))
    } else {
        poll_interval
    };
    let until_wake = wake
        .map(|w| w.duration_since(now).try_into().unwrap_or(Duration::ZERO))
        .unwrap_or(poll);
    until_wake.min(poll).max(Duration::from_millis(200))
}

fn is_api_error(e: &kube::Error, codes: &[u16]) -> bool {
    matches!(e, kube::Error::Api(s) if codes.contains(&s.code))
}

fn kafka_problem(e: &KafkaError) -> Problem {
    Problem {
        reason: e.reason(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t;

    #[test]
    fn requeues_at_the_next_wakeup_within_the_poll_interval() {
        let poll = Duration::from_secs(10);
        let secs = Duration::from_secs;
        assert_eq!(requeue_after(Some(t(3)), t(0), poll, false), secs(3));
        assert_eq!(requeue_after(Some(t(60)), t(0), poll, false), poll);
        assert_eq!(requeue_after(None, t(0), poll, false), poll);
        assert_eq!(
            requeue_after(Some(t(0)), t(0), poll, false),
            Duration::from_millis(200),
            "never a busy loop"
        );
        let short = Duration::from_millis(100);
        assert_eq!(
            requeue_after(None, t(0), short, false),
            Duration::from_millis(200),
            "a poll interval under the floor is no panic"
        );
    }

    #[test]
    fn problems_slow_polling_to_five_seconds_but_not_wakeups() {
        let second = Duration::from_secs(1);
        assert_eq!(
            requeue_after(None, t(0), second, true),
            Duration::from_secs(5)
        );
        assert_eq!(requeue_after(None, t(0), second, false), second);
        assert_eq!(
            requeue_after(Some(t(2)), t(0), second, true),
            Duration::from_secs(2)
        );
        assert_eq!(
            requeue_after(None, t(0), Duration::from_secs(30), true),
            Duration::from_secs(30)
        );
    }
}
