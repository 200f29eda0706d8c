//! One reconcile of one BlockPipeline: validate, look after existing jobs (lease expiry,
//! retries, phase labels), read Kafka offsets, commit over succeeded prefixes, plan new jobs,
//! clean up history, and report status. The decisions are the pure functions of `planner`,
//! `committer` and `lifecycle`; this module does the I/O around them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blocksmith_crds::{BlockJob, BlockPipeline, BlockPipelineStatus, JobPhase, PartitionStatus};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::Store;
use tracing::{info, warn};

use crate::builders::{self, AutoscalingApi};
use crate::committer::next_commit;
use crate::conditions::{Observed, Problem};
use crate::jobs::{self, JobStore, MANAGER};
use crate::kafka::{self, KafkaConnection, KafkaError, KafkaOffsets};
use crate::lifecycle::{
    FinishedJob, JobAction, is_claimable, job_action, jobs_to_delete, next_wakeup,
};
use crate::metrics::{Metrics, RECONCILE_HEARTBEAT, reconcile_deadline};
use crate::planner::{
    ExistingJob, PartitionOffsets, PartitionPlanError, PlanPolicy, plan_partition,
};
use crate::status;
use crate::validate::{validate, validate_cluster_unchanged, validate_topic_unchanged};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
        }
    }
}

pub struct Context {
    pub client: kube::Client,
    /// Every BlockJob the operator watches, kept current by a reflector.
    pub jobs: Store<BlockJob>,
    pub metrics: Metrics,
    pub reporter: Reporter,
    /// How often lag is polled when nothing else wakes the pipeline.
    pub poll_interval: Duration,
    pub kafka_timeout: Duration,
    kafka: Mutex<HashMap<String, (KafkaConnection, Arc<KafkaOffsets>)>>,
    /// Which HPA API the cluster serves (discovered at start-up).
    pub autoscaling: AutoscalingApi,
    /// What was last applied for each pipeline's builders, so unchanged specs cost no writes.
    builders_applied: Mutex<HashMap<String, String>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        jobs: Store<BlockJob>,
        metrics: Metrics,
        poll_interval: Duration,
        kafka_timeout: Duration,
        autoscaling: AutoscalingApi,
    ) -> Self {
        Self {
            client,
            jobs,
            metrics,
            reporter: Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            poll_interval,
            kafka_timeout,
            kafka: Mutex::default(),
            autoscaling,
            builders_applied: Mutex::default(),
        }
    }

    /// One Kafka client per pipeline, replaced when its connection settings change.
    fn kafka_for(&self, key: &str, conn: KafkaConnection) -> Result<Arc<KafkaOffsets>, KafkaError> {
        let mut clients = self.kafka.lock().expect("kafka clients lock");
        if let Some((c, client)) = clients.get(key)
            && *c == conn
        {
            return Ok(client.clone());
        }
        let client = Arc::new(KafkaOffsets::connect(&conn, self.kafka_timeout)?);
        clients.insert(key.to_string(), (conn, client.clone()));
        Ok(client)
    }
}

pub async fn reconcile(bp: Arc<BlockPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    // On /healthz while it runs (until dropped): one that outlives its deadline is stuck.
    let _in_progress = ctx.metrics.health().start(
        RECONCILE_HEARTBEAT,
        format!("{}/{}", bp.namespace().unwrap_or_default(), bp.name_any()),
        reconcile_deadline(ctx.kafka_timeout),
    );
    let result = reconcile_inner(&bp, &ctx).await;
    ctx.metrics
        .observe_reconcile(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(bp: &BlockPipeline, ctx: &Context) -> Result<Action, Error> {
    let ns = bp.namespace().unwrap_or_default();
    let name = bp.name_any();
    let now = Timestamp::now();
    let old = bp.status.clone().unwrap_or_default();
    let mut observed = Observed {
        suspended: bp.spec.suspend,
        ..Default::default()
    };
    let mut status = BlockPipelineStatus {
        observed_generation: bp.metadata.generation,
        last_commit_time: old.last_commit_time.clone(),
        ..Default::default()
    };

    let policy = match validate(&bp.spec)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            PlanPolicy::from_spec(&bp.spec).map_err(|e| format!("spec.jobs.maxAge: {e}"))
        }) {
        Ok(p) => p,
        Err(message) => return invalid_spec(bp, ctx, &old, status, observed, now, message).await,
    };

    if let Some(problem) = reconcile_builders(bp, ctx).await? {
        observed.problems.push(problem);
    }

    let store = JobStore::new(
        ctx.client.clone(),
        ctx.jobs.clone(),
        &ns,
        &name,
        ctx.metrics.clone(),
    );
    let mut wake: Option<Timestamp> = None;
    let mut jobs = Vec::new();
    let listed = store.cached();
    let topics = listed.iter().map(|j| j.spec.topic.as_str());
    if let Err(e) = validate_topic_unchanged(&name, &bp.spec, topics) {
        return invalid_spec(bp, ctx, &old, status, observed, now, e.to_string()).await;
    }
    for job in listed {
        match tend_job(bp, &store, job, now).await? {
            Some(job) => {
                let backoff_limit = bp.spec.jobs.backoff_limit;
                if let Some(t) = next_wakeup(job.status.as_ref(), backoff_limit, now) {
                    wake = Some(wake.map_or(t, |w| w.min(t)));
                }
                if job_action(job.status.as_ref(), backoff_limit, now) == JobAction::Exhausted {
                    observed.problems.push(Problem {
                        reason: "JobFailed",
                        message: format!(
                            "job {} (partition {}, offsets [{}, {})) failed after {} attempts: {}; the commit of partition {} is held at offset {} until the job is deleted (which retries it)",
                            job.name_any(),
                            job.spec.partition,
                            job.spec.start_offset,
                            job.spec.end_offset,
                            job.attempt(),
                            job.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default(),
                            job.spec.partition,
                            job.spec.start_offset,
                        ),
                    });
                }
                jobs.push(job);
            }
            None => wake = Some(now),
        }
    }
    let mut by_partition: BTreeMap<i32, Vec<&BlockJob>> = BTreeMap::new();
    for j in &jobs {
        by_partition.entry(j.spec.partition).or_default().push(j);
    }

    // Kafka: offsets, commits over succeeded prefixes, then planning.
    let mut committed_now: BTreeMap<i32, i64> = BTreeMap::new();
    match kafka::connection(bp, &ctx.client).await {
        Err(p) => observed.problems.insert(0, p),
        Ok(conn) => {
            let key = format!("{ns}/{name}");
            match read_offsets(ctx, &key, conn, bp).await {
                Err(e) => {
                    ctx.metrics.kafka_error(&ns, &name);
                    warn!(namespace = %ns, pipeline = %name, error = %e, "reading Kafka offsets");
                    observed.problems.insert(0, kafka_problem(&e));
                    status.partitions = old.partitions.clone();
                }
                Ok(mut kafka) => {
                    let clusters = jobs.iter().map(|j| j.spec.kafka_cluster_id.as_deref());
                    if let Err(e) =
                        validate_cluster_unchanged(&name, kafka.cluster_id.as_deref(), clusters)
                    {
                        return invalid_spec(bp, ctx, &old, status, observed, now, e.to_string())
                            .await;
                    }
                    let topic = bp.spec.kafka.topic.clone();
                    let mut new_commits = BTreeMap::new();
                    for po in &kafka.offsets {
                        if let Some(c) = po.committed {
                            let next = next_commit(c, &job_ranges(&by_partition, po.partition));
                            if next > c {
                                new_commits.insert(po.partition, next);
                            }
                        }
                    }
                    if !new_commits.is_empty() {
                        match commit(&kafka.client, &topic, new_commits.clone()).await {
                            Ok(()) => {
                                ctx.metrics.commit(&ns, &name);
                                status.last_commit_time = Some(Time(now));
                                for po in &mut kafka.offsets {
                                    if let Some(n) = new_commits.get(&po.partition) {
                                        po.committed = Some(*n);
                                    }
                                }
                                info!(namespace = %ns, pipeline = %name, commits = ?new_commits, "committed offsets");
                            }
                            Err(e) => {
                                ctx.metrics.kafka_error(&ns, &name);
                                observed.problems.insert(0, kafka_problem(&e));
                            }
                        }
                    }
                    let outcome = plan_and_create(
                        bp,
                        ctx,
                        &store,
                        &kafka,
                        &by_partition,
                        &old,
                        policy,
                        now,
                        &mut status,
                        &mut observed,
                    )
                    .await?;
                    if outcome == PlanOutcome::CacheBehind {
                        wake = Some(now);
                    }
                    for po in &kafka.offsets {
                        if let Some(c) = po.committed {
                            committed_now.insert(po.partition, c);
                        }
                    }
                }
            }
        }
    }

    if bp.spec.builders.is_some() {
        let busy: Vec<&str> = jobs
            .iter()
            .filter(|j| j.phase() == JobPhase::Running)
            .filter_map(|j| j.status.as_ref()?.lease.as_ref().map(|l| l.holder.as_str()))
            .collect();
        builders::mark_busy_pods(&ctx.client, bp, &busy, &ctx.metrics).await?;
    }

    // History: succeeded jobs below the commit, past their TTL or beyond the history limit.
    let finished: Vec<FinishedJob> = jobs
        .iter()
        .filter(|j| j.phase() == JobPhase::Succeeded)
        .map(|j| FinishedJob {
            name: j.name_any(),
            partition: j.spec.partition,
            end: j.spec.end_offset,
            completion_time: j
                .status
                .as_ref()
                .and_then(|s| s.completion_time.as_ref())
                .map(|t| t.0),
        })
        .collect();
    let ttl = Duration::from_secs(bp.spec.jobs.ttl_seconds_after_succeeded.max(0) as u64);
    let limit = bp.spec.jobs.successful_jobs_history_limit.max(0) as usize;
    for name in jobs_to_delete(&finished, &committed_now, ttl, limit, now) {
        store.delete(&name).await?;
    }

    // Counts and conditions.
    let claimable = jobs
        .iter()
        .filter(|j| is_claimable(j.status.as_ref(), now))
        .count() as i64;
    let count = |phase: JobPhase| jobs.iter().filter(|j| j.phase() == phase).count() as i64;
    status.queue_depth = claimable;
    status.running_jobs = count(JobPhase::Running);
    status.failed_jobs = jobs
        .iter()
        .filter(|j| {
            job_action(j.status.as_ref(), bp.spec.jobs.backoff_limit, now) == JobAction::Exhausted
        })
        .count() as i64;
    status.lag = status.partitions.iter().map(|p| p.lag).sum();
    observed.lag = status.lag;
    observed.unfinished_jobs = jobs
        .iter()
        .filter(|j| j.phase() != JobPhase::Succeeded)
        .count() as i64;
    ctx.metrics.queue(
        &ns,
        &name,
        claimable,
        &[
            ("Pending", count(JobPhase::Pending)),
            ("Running", status.running_jobs),
            ("Succeeded", count(JobPhase::Succeeded)),
            ("Failed", count(JobPhase::Failed)),
        ],
    );
    for p in &status.partitions {
        ctx.metrics
            .partition(&ns, &name, p.partition, p.committed_offset, p.lag);
    }
    let problems = !observed.problems.is_empty();
    status::publish(bp, ctx, &old, status, &observed, now).await?;

    let poll = if problems {
        ctx.poll_interval.max(Duration::from_secs(5))
    } else {
        ctx.poll_interval
    };
    let until_wake = wake
        .map(|w| w.duration_since(now).try_into().unwrap_or(Duration::ZERO))
        .unwrap_or(poll);
    Ok(Action::requeue(
        until_wake.clamp(Duration::from_millis(200), poll),
    ))
}

/// Reports an `InvalidSpec` and ends the reconcile before any commit or planning; the next
/// change to the pipeline or its jobs looks again.
async fn invalid_spec(
    bp: &BlockPipeline,
    ctx: &Context,
    old: &BlockPipelineStatus,
    mut status: BlockPipelineStatus,
    mut observed: Observed,
    now: Timestamp,
    message: String,
) -> Result<Action, Error> {
    warn!(namespace = %bp.namespace().unwrap_or_default(), pipeline = %bp.name_any(), %message, "invalid spec");
    observed.problems.push(Problem {
        reason: "InvalidSpec",
        message,
    });
    status.partitions = old.partitions.clone();
    status::publish(bp, ctx, old, status, &observed, now).await?;
    Ok(Action::await_change())
}

/// Applies the lifecycle decision to one job and keeps its phase label in sync. Returns the
/// job as it now is, or `None` when it changed under us (the next reconcile looks again).
async fn tend_job(
    bp: &BlockPipeline,
    store: &JobStore,
    job: BlockJob,
    now: Timestamp,
) -> Result<Option<BlockJob>, Error> {
    let backoff_limit = bp.spec.jobs.backoff_limit;
    let holder = job
        .status
        .as_ref()
        .and_then(|s| s.lease.as_ref())
        .map(|l| l.holder.clone())
        .unwrap_or_default();
    let last_message = job
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    let reset = match job_action(job.status.as_ref(), backoff_limit, now) {
        JobAction::Expire {
            next_attempt,
            not_before,
        } => Some((
            JobPhase::Pending,
            next_attempt,
            Some(not_before),
            format!(
                "lease of {holder:?} expired on attempt {}; retrying",
                job.attempt()
            ),
        )),
        JobAction::ExpireExhausted => Some((
            JobPhase::Failed,
            job.attempt(),
            None,
            format!(
                "lease of {holder:?} expired on the last attempt ({})",
                job.attempt()
            ),
        )),
        JobAction::Retry {
            next_attempt,
            not_before,
        } => Some((
            JobPhase::Pending,
            next_attempt,
            Some(not_before),
            format!("attempt {} failed: {last_message}; retrying", job.attempt()),
        )),
        JobAction::Exhausted | JobAction::None => None,
    };
    let job = match reset {
        None => job,
        Some((phase, attempt, not_before, message)) => {
            info!(job = %job.name_any(), %phase, attempt, %message, "resetting job");
            match store
                .reset(&job, phase, attempt, not_before, &message)
                .await
            {
                Ok(j) => j,
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let phase = job.phase();
    if jobs::phase_label(&job) != Some(phase.as_str()) {
        let desired = jobs::desired_job(bp, job.spec.clone(), phase);
        match store.relabel(&job, &desired).await {
            Ok(j) => return Ok(Some(j)),
            // Changed or deleted since the cache saw it (or never there: a resourceVersion
            // on an apply never creates).
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 || e.code == 422 => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(job))
}

/// Applies the builder Deployment and HPA when what they should be has changed.
async fn reconcile_builders(bp: &BlockPipeline, ctx: &Context) -> Result<Option<Problem>, Error> {
    let key = format!("{}/{}", bp.namespace().unwrap_or_default(), bp.name_any());
    let desired = serde_json::to_string(&(
        &bp.spec.builders,
        &bp.spec.output.credentials_secret_ref,
        (
            &bp.spec.kafka.security_protocol,
            &bp.spec.kafka.sasl,
            &bp.spec.kafka.tls,
        ),
        bp.metadata.uid.as_deref(),
    ))
    .unwrap_or_default();
    if ctx
        .builders_applied
        .lock()
        .expect("builders lock")
        .get(&key)
        == Some(&desired)
    {
        return Ok(None);
    }
    let problem = builders::reconcile(&ctx.client, bp, ctx.autoscaling, &ctx.metrics).await?;
    ctx.builders_applied
        .lock()
        .expect("builders lock")
        .insert(key, desired);
    Ok(problem.map(|message| Problem {
        reason: "AutoscalingUnavailable",
        message,
    }))
}

/// How many planned jobs are created at once.
const CONCURRENT_CREATES: usize = 8;

#[allow(clippy::too_many_arguments)]
async fn plan_and_create(
    bp: &BlockPipeline,
    ctx: &Context,
    store: &JobStore,
    kafka: &KafkaRead,
    by_partition: &BTreeMap<i32, Vec<&BlockJob>>,
    old: &BlockPipelineStatus,
    policy: PlanPolicy,
    now: Timestamp,
    status: &mut BlockPipelineStatus,
    observed: &mut Observed,
) -> Result<PlanOutcome, Error> {
    let ns = bp.namespace().unwrap_or_default();
    let name = bp.name_any();
    let mut initial_commits = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut new_jobs = Vec::new();
    for po in &kafka.offsets {
        let existing = job_ranges(by_partition, po.partition);
        let old_p = old.partitions.iter().find(|p| p.partition == po.partition);
        let tail_since = old_p.and_then(|p| p.tail_since.as_ref()).map(|t| t.0);
        let mut pstatus = PartitionStatus {
            partition: po.partition,
            committed_offset: po.committed,
            planned_offset: existing.iter().map(|j| j.end).max(),
            high_watermark: po.high,
            lag: po.high - po.committed.unwrap_or(po.low),
            tail_since: old_p.and_then(|p| p.tail_since.clone()),
        };
        match plan_partition(po, &existing, tail_since, now, &policy) {
            Ok(plan) => {
                if let Some(start) = plan.commit_start {
                    initial_commits.insert(po.partition, start);
                    pstatus.lag = po.high - start;
                }
                if let Some((from, to)) = plan.skipped {
                    skipped.push((po.partition, from, to));
                }
                pstatus.planned_offset = Some(plan.planned_offset);
                pstatus.tail_since = plan.tail_since.map(Time);
                if !bp.spec.suspend {
                    new_jobs.extend(plan.new_jobs);
                }
            }
            Err(PartitionPlanError::OffsetOutOfRange { committed, low }) => observed.problems.push(Problem {
                reason: "OffsetOutOfRange",
                message: format!(
                    "partition {}: committed offset {committed} is below the low watermark {low}: records [{committed}, {low}) were deleted by retention before they were written to a block. Set spec.kafka.skipMissingData: true to continue from {low}, accepting the loss",
                    po.partition
                ),
            }),
        }
        status.partitions.push(pstatus);
    }
    if !initial_commits.is_empty() {
        // Without a committed offset the start would move with the watermarks; make it durable
        // before planning from it.
        if let Err(e) = commit(&kafka.client, &bp.spec.kafka.topic, initial_commits.clone()).await {
            observed.problems.insert(0, kafka_problem(&e));
            return Ok(PlanOutcome::Done);
        }
        info!(namespace = %ns, pipeline = %name, start = ?initial_commits, "committed start offsets");
        // The skip is durable now: tell the user once, as the next plan starts at `to`.
        let mut events = Vec::new();
        for (partition, from, to) in skipped {
            warn!(namespace = %ns, pipeline = %name, partition, from, to, "skipped offsets deleted by retention (spec.kafka.skipMissingData)");
            events.push(status::skipped_data_event(partition, from, to));
        }
        status::record(bp, ctx, events).await;
        for p in &mut status.partitions {
            if let Some(o) = initial_commits.get(&p.partition) {
                p.committed_offset = Some(*o);
            }
        }
    }
    if !new_jobs.is_empty() {
        info!(namespace = %ns, pipeline = %name, jobs = new_jobs.len(), "planning jobs");
    }
    // Creates go `CONCURRENT_CREATES` at a time (each is a round trip). One that fails
    // leaves a gap, which the next plan fills.
    for chunk in new_jobs.chunks(CONCURRENT_CREATES) {
        let planned: Vec<BlockJob> = chunk
            .iter()
            .map(|p| {
                let spec = jobs::job_spec(bp, p, kafka.cluster_id.clone());
                jobs::desired_job(bp, spec, JobPhase::Pending)
            })
            .collect();
        let created =
            futures::future::try_join_all(planned.iter().map(|j| store.create(j))).await?;
        let existed = created.iter().filter(|c| c.is_none()).count();
        if existed > 0 {
            // The watch cache is behind what was created before; plan again once it caught up.
            info!(namespace = %ns, pipeline = %name, existed, "jobs exist already; job cache behind, planning again shortly");
            return Ok(PlanOutcome::CacheBehind);
        }
    }
    Ok(PlanOutcome::Done)
}

#[derive(PartialEq)]
enum PlanOutcome {
    Done,
    CacheBehind,
}

/// The ranges of a partition's jobs and whether each is durable: what the planner and the
/// committer decide from.
fn job_ranges(by_partition: &BTreeMap<i32, Vec<&BlockJob>>, partition: i32) -> Vec<ExistingJob> {
    by_partition
        .get(&partition)
        .into_iter()
        .flatten()
        .map(|j| ExistingJob {
            start: j.spec.start_offset,
            end: j.spec.end_offset,
            succeeded: j.phase() == JobPhase::Succeeded,
        })
        .collect()
}

/// One reading of the pipeline's Kafka cluster.
struct KafkaRead {
    client: Arc<KafkaOffsets>,
    cluster_id: Option<String>,
    offsets: Vec<PartitionOffsets>,
}

async fn read_offsets(
    ctx: &Context,
    key: &str,
    conn: KafkaConnection,
    bp: &BlockPipeline,
) -> Result<KafkaRead, KafkaError> {
    let client = ctx.kafka_for(key, conn)?;
    let topic = bp.spec.kafka.topic.clone();
    let subset = bp.spec.kafka.partitions.clone();
    let k = client.clone();
    let (cluster_id, offsets) = tokio::task::spawn_blocking(move || {
        let partitions = k.partitions(&topic, subset.as_deref())?;
        Ok::<_, KafkaError>((k.cluster_id(), k.offsets(&topic, &partitions)?))
    })
    .await
    .map_err(|e| KafkaError::Unavailable(e.to_string()))??;
    Ok(KafkaRead {
        client,
        cluster_id,
        offsets,
    })
}

async fn commit(
    kafka: &Arc<KafkaOffsets>,
    topic: &str,
    offsets: BTreeMap<i32, i64>,
) -> Result<(), KafkaError> {
    let k = kafka.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || k.commit(&topic, &offsets))
        .await
        .map_err(|e| KafkaError::Unavailable(e.to_string()))?
}

fn kafka_problem(e: &KafkaError) -> Problem {
    Problem {
        reason: e.reason(),
        message: e.to_string(),
    }
}

pub fn error_policy(_bp: Arc<BlockPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed");
    ctx.metrics.reconcile_error(error.kind());
    Action::requeue(Duration::from_secs(2))
}
