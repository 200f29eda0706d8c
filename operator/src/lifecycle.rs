//! What the operator does to each BlockJob as time passes: expire leases, retry failures,
//! count the queue, and clean up committed history.

use std::collections::BTreeMap;
use std::time::Duration;

pub use blocksmith_crds::domain::is_claimable;
use blocksmith_crds::domain::{lease_expiry, retry_backoff};
use blocksmith_crds::{BlockJob, BlockJobStatus, JobPhase};
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::jobs::phase_label;

/// The operator's next step for one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobAction {
    None,
    /// The job is `Running` but its lease ran out (or it has none): reset it to `Pending`
    /// with this attempt number and backoff, clearing the lease.
    Expire {
        next_attempt: i32,
        not_before: Timestamp,
    },
    /// The job is `Running` but its lease ran out on the last allowed attempt: mark it
    /// `Failed` (with a message saying the lease expired), clearing the lease. From then on
    /// it is [`JobAction::Exhausted`].
    ExpireExhausted,
    /// The job is `Failed` with attempts left: reset it to `Pending` with this attempt
    /// number and backoff.
    Retry {
        next_attempt: i32,
        not_before: Timestamp,
    },
    /// The job is `Failed` by an outage (`status.transient`): reset it to `Pending` at the same
    /// attempt, as failure `in_a_row` of the kind, after a backoff that grows with it.
    RetryTransient {
        in_a_row: i32,
        not_before: Timestamp,
    },
    /// The job is `Failed` with no attempts left: it stays so, holds back its partition's
    /// commit, and the pipeline is `Degraded` until the user deletes the job (their retry).
    Exhausted,
}

/// Decides what to do with a job. A job without status is `Pending`.
pub fn job_action(
    status: Option<&BlockJobStatus>,
    backoff_limit: i32,
    now: Timestamp,
) -> JobAction {
    let Some(status) = status else {
        return JobAction::None;
    };
    let attempt = status.attempt();
    let has_attempts_left = attempt < backoff_limit;
    match status.phase() {
        JobPhase::Pending | JobPhase::Succeeded => JobAction::None,
        JobPhase::Running => match lease_expires_at(status) {
            Some(expiry) if expiry > now => JobAction::None,
            _ if has_attempts_left => JobAction::Expire {
                next_attempt: attempt.saturating_add(1),
                not_before: backoff_until(attempt, now),
            },
            _ => JobAction::ExpireExhausted,
        },
        JobPhase::Failed if status.transient == Some(true) => {
            let in_a_row = status.transient_failures.unwrap_or(0).saturating_add(1);
            JobAction::RetryTransient {
                in_a_row,
                not_before: add(now, transient_backoff(in_a_row)),
            }
        }
        JobPhase::Failed if has_attempts_left => JobAction::Retry {
            next_attempt: attempt.saturating_add(1),
            not_before: backoff_until(attempt, now),
        },
        JobPhase::Failed => JobAction::Exhausted,
    }
}

/// How the operator rewrites a job's status when [`job_action`] expires or retries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reset {
    pub phase: JobPhase,
    pub attempt: i32,
    pub not_before: Option<Timestamp>,
    /// Why, for the job's status and the log.
    pub message: String,
    /// Outages in a row so far; `None` ends a row.
    pub transient_failures: Option<i32>,
}

impl Reset {
    /// `Pending` again at `attempt`, not before `not_before`.
    pub fn pending(
        attempt: i32,
        not_before: Timestamp,
        message: String,
        transient_failures: Option<i32>,
    ) -> Self {
        Reset {
            phase: JobPhase::Pending,
            attempt,
            not_before: Some(not_before),
            message,
            transient_failures,
        }
    }
}

/// The reset [`job_action`] asks for, if any.
pub fn reset(job: &BlockJob, backoff_limit: i32, now: Timestamp) -> Option<Reset> {
    let status = job.status.as_ref();
    let holder = status
        .and_then(|s| s.lease.as_ref())
        .map(|l| l.holder.as_str())
        .unwrap_or_default();
    let attempt = job.attempt();
    let last_message = status
        .and_then(|s| s.message.as_deref())
        .unwrap_or_default();
    match job_action(status, backoff_limit, now) {
        JobAction::Expire {
            next_attempt,
            not_before,
        } => Some(Reset::pending(
            next_attempt,
            not_before,
            format!("lease of {holder:?} expired on attempt {attempt}; retrying"),
            None,
        )),
        JobAction::ExpireExhausted => Some(Reset {
            phase: JobPhase::Failed,
            attempt,
            not_before: None,
            message: format!("lease of {holder:?} expired on the last attempt ({attempt})"),
            transient_failures: None,
        }),
        JobAction::Retry {
            next_attempt,
            not_before,
        } => Some(Reset::pending(
            next_attempt,
            not_before,
            format!("attempt {attempt} failed: {last_message}; retrying"),
            None,
        )),
        JobAction::RetryTransient {
            in_a_row,
            not_before,
        } => Some(Reset::pending(
            attempt,
            not_before,
            format!(
                "attempt {attempt} failed on an outage ({in_a_row} in a row, not counted against backoffLimit): {last_message}; retrying"
            ),
            Some(in_a_row),
        )),
        JobAction::Exhausted | JobAction::None => None,
    }
}

/// When a running job's lease runs out; `None` when it has no usable lease (no holder or
/// no renew/acquire time), which counts as already expired. A lease is expired from this
/// instant on, so waking at it is enough.
fn lease_expires_at(status: &BlockJobStatus) -> Option<Timestamp> {
    let lease = status.lease.as_ref().filter(|l| !l.holder.is_empty())?;
    let renewed = lease.renew_time.as_ref().or(lease.acquire_time.as_ref())?;
    Some(lease_expiry(renewed.0, lease.lease_duration_seconds))
}

/// Outages are retried for as long as they last: the backoff grows as for attempts, up to a
/// minute, so the job resumes soon after the outage ends.
fn transient_backoff(in_a_row: i32) -> Duration {
    retry_backoff(in_a_row.saturating_add(1)).min(Duration::from_secs(60))
}

fn backoff_until(attempt: i32, now: Timestamp) -> Timestamp {
    add(now, retry_backoff(attempt.saturating_add(1)))
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// Claimable jobs: the metric the builders' HPA scales on.
pub fn queue_depth<'a>(
    statuses: impl IntoIterator<Item = Option<&'a BlockJobStatus>>,
    now: Timestamp,
) -> usize {
    statuses
        .into_iter()
        .filter(|s| is_claimable(*s, now))
        .count()
}

/// A pipeline's jobs counted for its status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Claimable now: the queue depth the builders' HPA scales on.
    pub claimable: i64,
    pub pending: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Failed with no attempts left: waiting for the user.
    pub exhausted: i64,
}

impl JobCounts {
    pub fn of(jobs: &[BlockJob], backoff_limit: i32, now: Timestamp) -> Self {
        let statuses = || jobs.iter().map(|j| j.status.as_ref());
        let phase = |p: JobPhase| jobs.iter().filter(|j| j.phase() == p).count() as i64;
        Self {
            claimable: queue_depth(statuses(), now) as i64,
            pending: phase(JobPhase::Pending),
            running: phase(JobPhase::Running),
            succeeded: phase(JobPhase::Succeeded),
            failed: phase(JobPhase::Failed),
            exhausted: statuses()
                .filter(|s| job_action(*s, backoff_limit, now) == JobAction::Exhausted)
                .count() as i64,
        }
    }

    /// Jobs whose block is not yet durable.
    pub fn unfinished(&self) -> i64 {
        self.pending + self.running + self.failed
    }
}

/// The next time, always after `now`, at which this job needs the operator without any
/// write to it: a running job's lease expiry, or the end of a pending job's backoff (the
/// queue depth changes). When [`job_action`] asks to expire or retry the job, this is the
/// `not_before` of that action, assuming the operator applies it now.
pub fn next_wakeup(
    status: Option<&BlockJobStatus>,
    backoff_limit: i32,
    now: Timestamp,
) -> Option<Timestamp> {
    let status = status?;
    match job_action(Some(status), backoff_limit, now) {
        JobAction::Expire { not_before, .. }
        | JobAction::Retry { not_before, .. }
        | JobAction::RetryTransient { not_before, .. } => {
            return Some(not_before);
        }
        JobAction::ExpireExhausted | JobAction::Exhausted => return None,
        JobAction::None => {}
    }
    match status.phase() {
        JobPhase::Running => lease_expires_at(status),
        JobPhase::Pending => status.not_before.as_ref().map(|t| t.0).filter(|t| *t > now),
        JobPhase::Succeeded | JobPhase::Failed => None,
    }
}

/// A succeeded job, as cleanup needs to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedJob {
    pub name: String,
    pub partition: i32,
    pub end: i64,
    /// `None` (no `completionTime`) means unknown age: never deleted by the TTL, but first
    /// to go when over the history limit.
    pub completion_time: Option<Timestamp>,
}

impl FinishedJob {
    /// The job as cleanup sees it, if it succeeded.
    pub fn of(job: &BlockJob) -> Option<Self> {
        let status = job
            .status
            .as_ref()
            .filter(|s| s.phase() == JobPhase::Succeeded)?;
        Some(Self {
            name: job.name_any(),
            partition: job.spec.partition,
            end: job.spec.end_offset,
            completion_time: status.completion_time.as_ref().map(|t| t.0),
        })
    }
}

/// What becomes of a deleted job the operator's finalizer still keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Let it go: its range is committed, or it is not this pipeline's work any more.
    Release,
    /// Create a job of exactly its range first (see [`FINALIZER_KEEP_RANGE`]), then let it
    /// go.
    ///
    /// [`FINALIZER_KEEP_RANGE`]: blocksmith_crds::domain::FINALIZER_KEEP_RANGE
    ///
    /// While a builder's lease on it is live (`held_until`), it is let go only once the
    /// lease is over: the replacement may go too before then (the pipeline being deleted).
    Replace { held_until: Option<Timestamp> },
    /// Not this pipeline's work any more, but a builder holds its lease until then and may
    /// still write its block: keep the range taken (a pipeline re-created under the same
    /// name would otherwise cut ranges over it) and let it go once the lease is over.
    HoldUntil(Timestamp),
}

/// The pipeline a deleted job is judged against.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub pipeline_uid: Option<&'a str>,
    pub topic: &'a str,
    pub kafka_cluster_id: Option<&'a str>,
    pub kafka_topic_id: Option<&'a str>,
}

/// Whether a deleted job's range must come back. Not when its range is committed, nor when
/// it belongs to another pipeline of the same name (deleted and re-created), another topic
/// (by name, or by id: deleted and created again) or another Kafka cluster (the user moved
/// the pipeline and deleted the old jobs, as the `InvalidSpec` message tells them); those
/// are let go once no builder holds them.
pub fn on_deletion(
    job: &BlockJob,
    source: &Source,
    committed: Option<i64>,
    now: Timestamp,
) -> Deleted {
    let other_pipeline = recorded_and_different(pipeline_uid(job), source.pipeline_uid);
    let other_cluster = recorded_and_different(
        job.spec.kafka_cluster_id.as_deref(),
        source.kafka_cluster_id,
    );
    let other_topic_id =
        recorded_and_different(job.spec.kafka_topic_id.as_deref(), source.kafka_topic_id);
    let other_topic = job.spec.topic != source.topic || other_topic_id;
    if committed.is_some_and(|c| job.spec.end_offset <= c) {
        return Deleted::Release;
    }
    let held = held_until(job, now);
    if other_pipeline || other_topic || other_cluster {
        return held.map_or(Deleted::Release, Deleted::HoldUntil);
    }
    Deleted::Replace { held_until: held }
}

/// Whether both sides recorded an id and the ids differ: an id not recorded (a job or
/// pipeline from before ids were kept) is taken as the same.
fn recorded_and_different(a: Option<&str>, b: Option<&str>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a != b)
}

/// When the lease a builder holds on a running `job` runs out, if it has not yet.
pub fn held_until(job: &BlockJob, now: Timestamp) -> Option<Timestamp> {
    job.status
        .as_ref()
        .filter(|s| s.phase() == JobPhase::Running)
        .and_then(lease_expires_at)
        .filter(|&expiry| expiry > now)
}

/// The uid of the pipeline that owns `job` (its controller owner reference).
pub fn pipeline_uid(job: &BlockJob) -> Option<&str> {
    job.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The phase label a job should be given now, if it needs one (the truth is
/// `status.phase`; the label lets `kubectl` and the builders' watch select by phase). Not
/// `Succeeded`: that label comes with the finalizer's release ([`finish`]). Not `Running`
/// before the builder has renewed its lease once: a job that lasts is labelled within a
/// renewal interval, and a short one costs no label write, nor its builder's report a
/// compare-and-swap conflict with that write.
pub fn label_due(job: &BlockJob) -> Option<JobPhase> {
    let phase = job.phase();
    let labelled = phase_label(job) == Some(phase.as_str());
    let renewed = || {
        let lease = job.status.as_ref().and_then(|s| s.lease.as_ref());
        lease.is_some_and(|l| {
            l.renew_time.as_ref().map(|t| t.0) > l.acquire_time.as_ref().map(|t| t.0)
        })
    };
    match phase {
        _ if labelled => None,
        JobPhase::Succeeded => None,
        JobPhase::Running if !renewed() => None,
        _ => Some(phase),
    }
}

/// The one write that finishes a `Succeeded` job's metadata: the `Succeeded` phase label
/// (which takes the job out of the builders' watch) and, once its range is committed, the
/// release of its [`FINALIZER_KEEP_RANGE`](blocksmith_crds::domain::FINALIZER_KEEP_RANGE)
/// (a committed range is never given back, see [`on_deletion`]), so that deleting it later
/// is one write. A job usually succeeds and is committed in the same pass: one write then
/// does both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    pub release: bool,
}

/// Whether `job` needs a [`Finish`] write, with its partition's `committed` offset.
pub fn finish(job: &BlockJob, committed: Option<i64>) -> Option<Finish> {
    if job.phase() != JobPhase::Succeeded {
        return None;
    }
    let labelled = phase_label(job) == Some(JobPhase::Succeeded.as_str());
    let release = job.keeps_range() && committed.is_some_and(|c| job.spec.end_offset <= c);
    (!labelled || release).then_some(Finish { release })
}

/// Names of succeeded jobs to delete, sorted. Only jobs whose whole range is committed
/// (`end <= committed` of their partition) are eligible: the others still hold back or
/// explain the commit. Eligible jobs are deleted once `ttl` has passed since they
/// completed, and beyond the newest `history_limit` (by completion time, then end).
pub fn jobs_to_delete(
    succeeded: &[FinishedJob],
    committed: &BTreeMap<i32, i64>,
    ttl: Duration,
    history_limit: usize,
    now: Timestamp,
) -> Vec<String> {
    let ttl = SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX);
    let (mut expired, mut kept): (Vec<&FinishedJob>, Vec<&FinishedJob>) = succeeded
        .iter()
        .filter(|j| committed.get(&j.partition).is_some_and(|c| j.end <= *c))
        .partition(|j| {
            j.completion_time
                .is_some_and(|t| now.duration_since(t) >= ttl)
        });
    // Newest first; name last so the result never depends on input order.
    kept.sort_by(|a, b| {
        (b.completion_time, b.end, &b.name).cmp(&(a.completion_time, a.end, &a.name))
    });
    expired.extend(kept.into_iter().skip(history_limit));
    let mut names: Vec<String> = expired.into_iter().map(|j| j.name.clone()).collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t;
    use blocksmith_crds::JobLease;
    use blocksmith_crds::domain::LABEL_PHASE;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn status(phase: JobPhase, attempt: i32) -> BlockJobStatus {
        BlockJobStatus {
            phase,
            attempt: Some(attempt),
            ..Default::default()
        }
    }

    fn running(attempt: i32, renewed: i64, duration: i32) -> BlockJobStatus {
        BlockJobStatus {
            lease: Some(JobLease {
                holder: "builder-0".into(),
                acquire_time: Some(Time(t(0))),
                renew_time: Some(Time(t(renewed))),
                lease_duration_seconds: duration,
            }),
            ..status(JobPhase::Running, attempt)
        }
    }

    fn pending_until(not_before: i64) -> BlockJobStatus {
        BlockJobStatus {
            not_before: Some(Time(t(not_before))),
            ..status(JobPhase::Pending, 2)
        }
    }

    #[test]
    fn a_job_is_labelled_running_only_once_its_lease_was_renewed() {
        let labelled = |mut job: BlockJob, label: &str| {
            job.metadata.labels = Some([(LABEL_PHASE.to_string(), label.to_string())].into());
            job
        };
        let job = |status: BlockJobStatus| crate::testing::job_with(0, 0, 10, status);
        // Claimed: acquired and renewed at the same instant.
        let claimed = job(running(1, 0, 30));
        assert_eq!(label_due(&labelled(claimed.clone(), "Pending")), None);
        let renewed = job(running(1, 10, 30));
        assert_eq!(
            label_due(&labelled(renewed.clone(), "Pending")),
            Some(JobPhase::Running)
        );
        assert_eq!(label_due(&labelled(renewed, "Running")), None);
        // Back to `Pending` or `Failed` (a reset): labelled so at once.
        let reset = job(pending_until(20));
        assert_eq!(
            label_due(&labelled(reset.clone(), "Running")),
            Some(JobPhase::Pending)
        );
        assert_eq!(label_due(&labelled(reset, "Pending")), None);
        let failed = job(status(JobPhase::Failed, 3));
        assert_eq!(
            label_due(&labelled(failed.clone(), "Running")),
            Some(JobPhase::Failed)
        );
        assert_eq!(
            label_due(&failed),
            Some(JobPhase::Failed),
            "no label at all"
        );
        // `Succeeded` is [`finish`]'s.
        let succeeded = job(status(JobPhase::Succeeded, 1));
        assert_eq!(label_due(&labelled(succeeded, "Running")), None);
    }

    #[test]
    fn a_succeeded_job_is_labelled_and_released_in_one_write_once_committed() {
        use blocksmith_crds::domain::FINALIZER_KEEP_RANGE;
        let job = |phase: JobPhase, label: &str, finalizer: bool| {
            let mut job = crate::testing::job_with(0, 1000, 2000, status(phase, 1));
            job.metadata.labels = Some([(LABEL_PHASE.to_string(), label.to_string())].into());
            if finalizer {
                job.metadata.finalizers = Some(vec![FINALIZER_KEEP_RANGE.into()]);
            }
            job
        };
        let succeeded = job(JobPhase::Succeeded, "Running", true);
        assert_eq!(finish(&succeeded, None), Some(Finish { release: false }));
        assert_eq!(
            finish(&succeeded, Some(1999)),
            Some(Finish { release: false })
        );
        assert_eq!(
            finish(&succeeded, Some(2000)),
            Some(Finish { release: true })
        );
        // Labelled already: only the release is left, once committed.
        let labelled = job(JobPhase::Succeeded, "Succeeded", true);
        assert_eq!(finish(&labelled, Some(1000)), None);
        assert_eq!(
            finish(&labelled, Some(2500)),
            Some(Finish { release: true })
        );
        let finished = job(JobPhase::Succeeded, "Succeeded", false);
        assert_eq!(finish(&finished, Some(2500)), None);
        // Not succeeded: labelled as it goes (`tend_job`), never released here.
        for phase in [JobPhase::Pending, JobPhase::Running, JobPhase::Failed] {
            assert_eq!(finish(&job(phase, "Pending", true), Some(2500)), None);
        }
    }

    #[test]
    fn a_deleted_job_comes_back_unless_committed_or_of_another_source() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut job = crate::testing::job(0, 1000, 2000);
        job.spec.topic = "orders".into();
        job.spec.kafka_cluster_id = Some("c1".into());
        job.spec.kafka_topic_id = Some("t1".into());
        job.metadata.owner_references = Some(vec![OwnerReference {
            uid: "u1".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        let source = Source {
            pipeline_uid: Some("u1"),
            topic: "orders",
            kafka_cluster_id: Some("c1"),
            kafka_topic_id: Some("t1"),
        };
        assert_eq!(
            on_deletion(&job, &source, Some(1000), t(0)),
            Deleted::Replace { held_until: None }
        );
        assert_eq!(
            on_deletion(&job, &source, None, t(0)),
            Deleted::Replace { held_until: None }
        );
        assert_eq!(
            on_deletion(&job, &source, Some(2000), t(0)),
            Deleted::Release
        );
        let moved = [
            Source {
                pipeline_uid: Some("u2"),
                ..source
            },
            Source {
                topic: "payments",
                ..source
            },
            Source {
                kafka_cluster_id: Some("c2"),
                ..source
            },
            // The topic deleted and created again.
            Source {
                kafka_topic_id: Some("t2"),
                ..source
            },
        ];
        for other in moved {
            assert_eq!(
                on_deletion(&job, &other, Some(1000), t(0)),
                Deleted::Release
            );
        }

        // A builder still holds it (renewed at 100, 30 s): another pipeline's job keeps its
        // range until the lease is over; this pipeline's comes back at once.
        job.status = Some(running(1, 100, 30));
        let other = Source {
            pipeline_uid: Some("u2"),
            ..source
        };
        assert_eq!(
            on_deletion(&job, &other, Some(1000), t(110)),
            Deleted::HoldUntil(t(130))
        );
        assert_eq!(
            on_deletion(&job, &other, Some(1000), t(130)),
            Deleted::Release
        );
        assert_eq!(
            on_deletion(&job, &source, Some(1000), t(110)),
            Deleted::Replace {
                held_until: Some(t(130))
            }
        );
        assert_eq!(
            on_deletion(&job, &other, Some(2000), t(110)),
            Deleted::Release
        );
    }

    #[test]
    fn pending_and_succeeded_jobs_need_nothing() {
        assert_eq!(job_action(None, 3, t(0)), JobAction::None);
        for phase in [JobPhase::Pending, JobPhase::Succeeded] {
            assert_eq!(
                job_action(Some(&status(phase, 9)), 3, t(0)),
                JobAction::None
            );
        }
    }

    #[test]
    fn live_lease_needs_nothing_expired_is_requeued_or_on_the_last_attempt_fails() {
        let requeued = JobAction::Expire {
            next_attempt: 2,
            not_before: t(130) + retry_backoff(2),
        };
        // (attempt, now, action) for a lease renewed at 100 s for 30 s.
        for (attempt, now, expected) in [
            (1, 129, JobAction::None),
            (1, 130, requeued),
            (3, 200, JobAction::ExpireExhausted),
        ] {
            let s = running(attempt, 100, 30);
            assert_eq!(
                job_action(Some(&s), 3, t(now)),
                expected,
                "{attempt} at {now}"
            );
        }
    }

    #[test]
    fn lease_without_renewal_expires_from_its_acquire_time() {
        let mut s = running(1, 0, 30);
        s.lease.as_mut().unwrap().renew_time = None;
        assert_eq!(job_action(Some(&s), 3, t(29)), JobAction::None);
        assert!(matches!(
            job_action(Some(&s), 3, t(30)),
            JobAction::Expire { .. }
        ));
    }

    #[test]
    fn running_without_lease_info_expires_at_once() {
        let bare = status(JobPhase::Running, 1);
        let mut released = running(1, 100, 30);
        released.lease.as_mut().unwrap().holder.clear();
        for s in [bare, released] {
            assert_eq!(
                job_action(Some(&s), 3, t(100)),
                JobAction::Expire {
                    next_attempt: 2,
                    not_before: t(100) + retry_backoff(2)
                }
            );
        }
    }

    #[test]
    fn failed_job_is_retried_until_the_backoff_limit() {
        let failed = |attempt| status(JobPhase::Failed, attempt);
        assert_eq!(
            job_action(Some(&failed(2)), 3, t(0)),
            JobAction::Retry {
                next_attempt: 3,
                not_before: t(0) + retry_backoff(3)
            }
        );
        assert_eq!(job_action(Some(&failed(3)), 3, t(0)), JobAction::Exhausted);
        assert_eq!(job_action(Some(&failed(4)), 3, t(0)), JobAction::Exhausted);
    }

    #[test]
    fn only_pending_jobs_past_their_backoff_are_claimable() {
        assert!(is_claimable(None, t(0)));
        assert!(is_claimable(Some(&BlockJobStatus::default()), t(0)));
        assert!(is_claimable(Some(&pending_until(10)), t(10)));
        assert!(!is_claimable(Some(&pending_until(10)), t(9)));
        for phase in [JobPhase::Running, JobPhase::Succeeded, JobPhase::Failed] {
            assert!(!is_claimable(Some(&status(phase, 1)), t(0)));
        }
    }

    #[test]
    fn queue_depth_counts_claimable_jobs() {
        let jobs = [
            None,
            Some(pending_until(10)),
            Some(pending_until(100)),
            Some(running(1, 0, 30)),
            Some(status(JobPhase::Failed, 6)),
        ];
        assert_eq!(queue_depth(jobs.iter().map(Option::as_ref), t(50)), 2);
    }

    #[test]
    fn wakes_up_for_lease_expiry_and_backoff() {
        assert_eq!(next_wakeup(None, 3, t(0)), None);
        assert_eq!(
            next_wakeup(Some(&running(1, 100, 30)), 3, t(110)),
            Some(t(130))
        );
        // Expired now: wake when the requeued job becomes claimable.
        assert_eq!(
            next_wakeup(Some(&running(1, 100, 30)), 3, t(130)),
            Some(t(130) + retry_backoff(2))
        );
        assert_eq!(next_wakeup(Some(&running(3, 100, 30)), 3, t(130)), None);
        assert_eq!(next_wakeup(Some(&pending_until(10)), 3, t(5)), Some(t(10)));
        assert_eq!(next_wakeup(Some(&pending_until(10)), 3, t(10)), None);
        assert_eq!(
            next_wakeup(Some(&status(JobPhase::Failed, 1)), 3, t(0)),
            Some(t(0) + retry_backoff(2))
        );
        assert_eq!(
            next_wakeup(Some(&status(JobPhase::Failed, 3)), 3, t(0)),
            None
        );
        assert_eq!(
            next_wakeup(Some(&status(JobPhase::Succeeded, 1)), 3, t(0)),
            None
        );
    }

    fn finished(name: &str, partition: i32, end: i64, completed: Option<i64>) -> FinishedJob {
        FinishedJob {
            name: name.into(),
            partition,
            end,
            completion_time: completed.map(t),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn deletes_committed_jobs_after_the_ttl() {
        let jobs = [
            finished("old", 0, 100, Some(0)),
            finished("young", 0, 200, Some(3000)),
            finished("unknown-age", 0, 300, None),
        ];
        let committed = BTreeMap::from([(0, 300)]);
        assert_eq!(
            jobs_to_delete(&jobs, &committed, HOUR, 100, t(3600)),
            ["old"]
        );
        assert_eq!(
            jobs_to_delete(&jobs, &committed, Duration::ZERO, 100, t(3600)),
            ["old", "young"]
        );
    }

    #[test]
    fn keeps_jobs_not_yet_committed() {
        let committed = BTreeMap::from([(0, 150)]);
        let jobs = [
            finished("committed", 0, 100, Some(0)),
            finished("ahead", 0, 200, Some(0)),
            finished("unknown-partition", 1, 100, Some(0)),
        ];
        for now in [7200, 0] {
            let deleted = jobs_to_delete(&jobs, &committed, HOUR, 0, t(now));
            assert_eq!(deleted, ["committed"], "at {now}");
        }
    }

    #[test]
    fn history_limit_keeps_the_newest() {
        let jobs = [
            finished("p0-a", 0, 100, Some(10)),
            finished("p0-b", 0, 200, Some(30)),
            finished("p1-a", 1, 100, Some(20)),
            finished("p1-b", 1, 200, Some(20)),
            finished("no-time", 1, 300, None),
        ];
        let committed = BTreeMap::from([(0, 200), (1, 300)]);
        // Newest: p0-b (30), then p1-b (20, end 200), then p1-a (20, end 100), ...
        assert_eq!(
            jobs_to_delete(&jobs, &committed, HOUR, 2, t(100)),
            ["no-time", "p0-a", "p1-a"]
        );
        assert_eq!(
            jobs_to_delete(&jobs, &committed, HOUR, 10, t(100)),
            [] as [&str; 0]
        );
        assert_eq!(jobs_to_delete(&jobs, &committed, HOUR, 0, t(100)).len(), 5);
    }

    fn job(status: BlockJobStatus) -> BlockJob {
        crate::testing::job_with(0, 0, 100, status)
    }

    #[test]
    fn reset_says_why_for_each_action() {
        let failed = BlockJobStatus {
            message: Some("bucket missing".into()),
            ..status(JobPhase::Failed, 1)
        };
        let r = reset(&job(failed), 3, t(0)).unwrap();
        assert_eq!((r.phase, r.attempt), (JobPhase::Pending, 2));
        assert_eq!(r.not_before, Some(t(0) + retry_backoff(2)));
        assert_eq!(r.message, "attempt 1 failed: bucket missing; retrying");

        let r = reset(&job(running(2, 0, 30)), 3, t(30)).unwrap();
        assert_eq!((r.phase, r.attempt), (JobPhase::Pending, 3));
        assert_eq!(r.not_before, Some(t(30) + retry_backoff(3)));
        assert_eq!(
            r.message,
            "lease of \"builder-0\" expired on attempt 2; retrying"
        );

        let r = reset(&job(running(3, 0, 30)), 3, t(30)).unwrap();
        assert_eq!(
            (r.phase, r.attempt, r.not_before),
            (JobPhase::Failed, 3, None)
        );
        assert_eq!(
            r.message,
            "lease of \"builder-0\" expired on the last attempt (3)"
        );

        for quiet in [
            running(1, 0, 30),
            status(JobPhase::Failed, 3),
            status(JobPhase::Succeeded, 1),
            pending_until(10),
        ] {
            assert_eq!(reset(&job(quiet), 3, t(29)), None);
        }
    }

    #[test]
    fn counts_by_phase_queue_and_exhaustion() {
        let jobs = [
            crate::testing::job(0, 0, 100),
            job(pending_until(10)),
            job(running(1, 0, 30)),
            job(status(JobPhase::Succeeded, 1)),
            job(status(JobPhase::Failed, 1)),
            job(status(JobPhase::Failed, 3)),
        ];
        let counts = JobCounts::of(&jobs, 3, t(5));
        assert_eq!(
            counts,
            JobCounts {
                claimable: 1,
                pending: 2,
                running: 1,
                succeeded: 1,
                failed: 2,
                exhausted: 1,
            }
        );
        assert_eq!(counts.unfinished(), 5);
        assert_eq!(JobCounts::of(&jobs, 3, t(10)).claimable, 2);
    }

    fn failed_by_outage(attempt: i32, in_a_row: Option<i32>) -> BlockJobStatus {
        BlockJobStatus {
            transient: Some(true),
            transient_failures: in_a_row,
            message: Some("S3 unreachable".into()),
            ..status(JobPhase::Failed, attempt)
        }
    }

    #[test]
    fn outages_are_retried_at_the_same_attempt_past_the_backoff_limit() {
        // The last of 3 attempts: a failure a person must fix would exhaust the job here.
        let s = failed_by_outage(3, None);
        assert_eq!(
            job_action(Some(&s), 3, t(0)),
            JobAction::RetryTransient {
                in_a_row: 1,
                not_before: t(5)
            }
        );
        let r = reset(&job(s), 3, t(0)).unwrap();
        assert_eq!(
            (r.phase, r.attempt, r.transient_failures),
            (JobPhase::Pending, 3, Some(1))
        );
        assert_eq!(
            r.message,
            "attempt 3 failed on an outage (1 in a row, not counted against backoffLimit): S3 unreachable; retrying"
        );

        let backoff =
            |so_far: i32| match job_action(Some(&failed_by_outage(3, Some(so_far))), 3, t(0)) {
                JobAction::RetryTransient { not_before, .. } => {
                    not_before.duration_since(t(0)).as_secs()
                }
                other => panic!("expected RetryTransient, got {other:?}"),
            };
        let backoffs: Vec<i64> = (0..8).map(backoff).collect();
        assert_eq!(
            backoffs,
            [5, 10, 20, 40, 60, 60, 60, 60],
            "grows to a minute"
        );
        assert_eq!(
            next_wakeup(Some(&failed_by_outage(1, Some(2))), 3, t(0)),
            Some(t(20))
        );
    }

    #[test]
    fn a_failure_a_person_must_fix_counts_and_ends_the_row_of_outages() {
        let s = BlockJobStatus {
            transient: Some(false),
            transient_failures: Some(4),
            ..status(JobPhase::Failed, 1)
        };
        let r = reset(&job(s), 3, t(0)).unwrap();
        assert_eq!((r.attempt, r.transient_failures), (2, None));
        let last = BlockJobStatus {
            transient: Some(false),
            ..status(JobPhase::Failed, 3)
        };
        assert_eq!(job_action(Some(&last), 3, t(0)), JobAction::Exhausted);
    }
}
