//! Planning: which BlockJobs to create for one partition, as a pure function of its
//! offsets, its existing jobs and the clock. Deterministic (same inputs, same ranges, so
//! the same job names) and idempotent (planning again with the new jobs created plans
//! nothing).

use std::collections::BTreeMap;
use std::time::Duration;

use blocksmith_crds::domain::{DurationError, parse_duration};
use blocksmith_crds::pipeline::StartOffset;
use blocksmith_crds::{BlockJob, BlockPipelineSpec, JobPhase, PartitionStatus};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The pipeline settings planning depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanPolicy {
    /// Offsets per job; values below 1 are treated as 1.
    pub max_records: i64,
    /// How long a tail shorter than `max_records` may wait before it is cut anyway.
    pub max_age: Duration,
    /// Unfinished (not succeeded) jobs allowed per partition.
    pub max_in_flight: usize,
    /// Jobs not yet below the start (unfinished or succeeded) after which new ranges past
    /// the last job wait; refilling gaps is not bounded by it.
    pub max_uncommitted: usize,
    /// Where to start when the group has no committed offset and there are no jobs.
    pub start_offset: StartOffset,
    /// Restart at the low watermark when the committed offset is below it.
    pub skip_missing_data: bool,
}

impl PlanPolicy {
    /// The policy of a pipeline; fails only on a malformed `maxAge` (→ `InvalidSpec`).
    pub fn from_spec(spec: &BlockPipelineSpec) -> Result<Self, DurationError> {
        Ok(Self {
            max_records: spec.jobs.max_records,
            max_age: parse_duration(&spec.jobs.max_age)?,
            max_in_flight: usize::try_from(spec.jobs.max_in_flight_per_partition).unwrap_or(0),
            max_uncommitted: usize::try_from(
                spec.jobs
                    .max_uncommitted_jobs_per_partition
                    .unwrap_or(spec.jobs.max_in_flight_per_partition.saturating_mul(4)),
            )
            .unwrap_or(0),
            start_offset: spec.kafka.start_offset,
            skip_missing_data: spec.kafka.skip_missing_data,
        })
    }
}

/// What Kafka says about one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: i32,
    /// Low watermark: the first offset still stored.
    pub low: i64,
    /// High watermark: the next offset to be written.
    pub high: i64,
    /// The group's committed offset (the next offset to read); `None` when it has none.
    pub committed: Option<i64>,
}

/// A job to create, covering `[start, end)` of `partition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlannedJob {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// A job of the partition that already exists, in any phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExistingJob {
    pub start: i64,
    pub end: i64,
    pub succeeded: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PartitionPlanError {
    #[error(
        "committed offset {committed} is below the low watermark {low}: retention deleted \
         records that were never written to a block (set kafka.skipMissingData to skip them)"
    )]
    OffsetOutOfRange { committed: i64, low: i64 },
    #[error(
        "committed offset {committed} is past the end of the log (high watermark {high}): the \
         topic was re-created or its log truncated"
    )]
    CommittedBeyondLog { committed: i64, high: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Where the partition's jobs start: the committed offset, or what the operator must
    /// commit first (`commit_start`).
    pub start: i64,
    /// Jobs to create, in offset order.
    pub new_jobs: Vec<PlannedJob>,
    /// `Some(start)` when the group has no usable committed offset: the operator commits
    /// it before creating jobs, so the start survives restarts.
    pub commit_start: Option<i64>,
    /// `Some((committed, low))` when `skip_missing_data` let planning skip offsets
    /// `[committed, low)` that retention deleted before they were written to a block: the
    /// caller tells the user once the new start is committed.
    pub skipped: Option<(i64, i64)>,
    /// Existing and new jobs cover `[start, planned_offset)` without gaps. It is the end
    /// of the last job unless the in-flight limit left a deleted job's gap unfilled.
    pub planned_offset: i64,
    /// When the current unplanned tail was first seen; the caller persists it and passes
    /// it back. `None` when everything up to the high watermark is planned.
    pub tail_since: Option<Timestamp>,
}

/// Plans one partition.
///
/// The start is the committed offset. Without one, where jobs or blocks exist (the commit
/// was lost, e.g. expired by Kafka) it is the low watermark moved past the blocks written
/// from there on, so the commit it makes first is never below the lost one; elsewhere the
/// low or high watermark per `start_offset`. Only a committed offset is checked against
/// the low watermark: jobs below it may well have succeeded before retention caught up.
///
/// Existing jobs ending at or before the start are history. From the start, gaps before
/// existing jobs (a job the user deleted to retry it) are refilled in cuts of
/// `max_records` bounded by the next job, so a deleted job comes back with the same range.
/// After the last job, full jobs of `max_records` are cut up to the high watermark, and a
/// shorter tail once it has waited `max_age` since `tail_since`. New jobs never overlap
/// existing ones, and unfinished jobs never exceed `max_in_flight` (gaps are filled
/// first: they hold back the commit). Jobs past the last one are cut only while the jobs
/// from the start number fewer than `max_uncommitted`; refilling a gap only restores a job
/// that was there, and is what lets the commit, and with it cleanup, go on.
///
/// `written` are blocks found in the output (see [`output_reads`]), whatever jobs wrote
/// them. No new range overlaps one: a block without a job of its range comes back as a job
/// of exactly its range (its builder finds the block and reports it), and gaps are cut
/// around them. A block holding the start moves the start to the block's end, committed
/// first: its records are written already; without a committed offset, so do the blocks
/// contiguous from the start.
pub fn plan_partition(
    p: &PartitionOffsets,
    existing: &[ExistingJob],
    written: &[(i64, i64)],
    tail_since: Option<Timestamp>,
    now: Timestamp,
    policy: &PlanPolicy,
) -> Result<PartitionPlan, PartitionPlanError> {
    let mut skipped = None;
    let (start, commit_start) = match p.committed {
        Some(committed) if committed >= p.low => (committed, None),
        Some(committed) if policy.skip_missing_data => {
            skipped = Some((committed, p.low));
            (p.low, Some(p.low))
        }
        Some(committed) => {
            return Err(PartitionPlanError::OffsetOutOfRange {
                committed,
                low: p.low,
            });
        }
        // The commit was lost (e.g. expired by Kafka) if jobs or blocks exist: start at the
        // low watermark, past the blocks written from there on (below).
        None if !existing.is_empty() || !written.is_empty() => (p.low, Some(p.low)),
        None => {
            let start = match policy.start_offset {
                StartOffset::Earliest => p.low,
                StartOffset::Latest => p.high,
            };
            (start, Some(start))
        }
    };

    // Blocks past the high watermark cannot be this log's (a truncated or re-created one).
    let in_log: Vec<(i64, i64)> = written
        .iter()
        .copied()
        .filter(|&(a, b)| a < b && b <= p.high)
        .collect();
    let (start, commit_start) = match start_past_written(start, &in_log, p.committed.is_none()) {
        moved if moved > start => (moved, Some(moved)),
        _ => (start, commit_start),
    };

    let mut live: Vec<&ExistingJob> = existing
        .iter()
        .filter(|j| j.start < j.end && j.end > start)
        .collect();
    live.sort_by_key(|j| (j.start, j.end));
    let unfinished = live.iter().filter(|j| !j.succeeded).count();
    let live_count = live.len();
    let overlaps_a_job = |a: i64, b: i64| existing.iter().any(|j| j.start < b && a < j.end);
    let mut obstacles: Vec<Obstacle> = live
        .iter()
        .map(|j| Obstacle::Job(j.start, j.end))
        .chain(
            in_log
                .iter()
                .filter(|&&(a, b)| a >= start && !overlaps_a_job(a, b))
                .map(|&(a, b)| Obstacle::Block(a, b)),
        )
        .collect();
    obstacles.sort_by_key(|o| o.range());

    let mut cutter = Cutter {
        partition: p.partition,
        max_records: policy.max_records.max(1),
        budget: policy.max_in_flight.saturating_sub(unfinished),
        jobs: Vec::new(),
    };
    // `cursor` is the end of everything planned so far; `hole` the first offset of a gap
    // the budget could not fill.
    let mut cursor = start;
    let mut hole = None;
    for obstacle in obstacles {
        let (from, to) = obstacle.range();
        if from > cursor {
            let reached = cutter.cut(cursor, from);
            if reached < from {
                hole.get_or_insert(reached);
            }
            cursor = reached;
        }
        match obstacle {
            Obstacle::Job(..) => cursor = cursor.max(to),
            // Blocks overlapping each other (written under other cut points) are taken as
            // they chain; the others are left to the history they came from.
            Obstacle::Block(..) if from == cursor => {
                if cutter.take(from, to) {
                    cursor = to;
                } else {
                    hole.get_or_insert(from);
                }
            }
            Obstacle::Block(..) => {}
        }
    }

    let uncommitted = live_count + cutter.jobs.len();
    cutter.budget = cutter
        .budget
        .min(policy.max_uncommitted.saturating_sub(uncommitted));
    let full = (p.high.saturating_sub(cursor)).max(0) / cutter.max_records * cutter.max_records;
    cursor = cutter.cut(cursor, cursor + full);
    let max_age = SignedDuration::try_from(policy.max_age).unwrap_or(SignedDuration::MAX);
    let seen_since = tail_since.unwrap_or(now);
    if p.high > cursor && now.duration_since(seen_since) >= max_age {
        cursor = cutter.cut(cursor, p.high);
    }

    Ok(PartitionPlan {
        start,
        new_jobs: cutter.jobs,
        commit_start,
        skipped,
        planned_offset: hole.unwrap_or(cursor),
        tail_since: (p.high > cursor).then_some(seen_since),
    })
}

/// Each partition's existing job ranges, as [`plan_partition`] and the committer take them.
pub type JobRanges = BTreeMap<i32, Vec<ExistingJob>>;

pub fn job_ranges(jobs: &[BlockJob]) -> JobRanges {
    job_ranges_where(jobs, |j| j.phase() == JobPhase::Succeeded)
}

/// [`job_ranges`], counting as succeeded only the jobs `succeeded` says.
pub fn job_ranges_where(jobs: &[BlockJob], succeeded: impl Fn(&BlockJob) -> bool) -> JobRanges {
    let mut ranges = JobRanges::new();
    for j in jobs {
        ranges
            .entry(j.spec.partition)
            .or_default()
            .push(ExistingJob {
                start: j.spec.start_offset,
                end: j.spec.end_offset,
                succeeded: succeeded(j),
            });
    }
    ranges
}

/// Adds the ranges of deleted jobs still kept by the operator's finalizer, as unfinished
/// jobs, where no live job (their replacement) has the same range: until they are gone
/// their ranges are taken, whether or not the cache shows the replacement yet.
pub fn add_deleted_ranges(ranges: &mut JobRanges, deleted: &[BlockJob]) {
    for j in deleted {
        let jobs = ranges.entry(j.spec.partition).or_default();
        let (start, end) = (j.spec.start_offset, j.spec.end_offset);
        if !jobs.iter().any(|e| e.start == start && e.end == end) {
            jobs.push(ExistingJob {
                start,
                end,
                succeeded: false,
            });
        }
    }
}

/// The plan for every partition of a pipeline, and the status each partition reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelinePlan {
    pub partitions: Vec<PartitionStatus>,
    /// Start offsets to commit before any new job is created (see
    /// [`PartitionPlan::commit_start`]).
    pub initial_commits: BTreeMap<i32, i64>,
    /// `(partition, from, to)`: offsets skipped under `skip_missing_data`; the user is told
    /// once the start is committed.
    pub skipped: Vec<(i32, i64, i64)>,
    /// Empty while the pipeline is suspended.
    pub new_jobs: Vec<PlannedJob>,
    /// Partitions that cannot be planned, and why.
    pub errors: Vec<(i32, PartitionPlanError)>,
    /// Each partition's `cut_offset` before this plan's new jobs (see [`PipelinePlan::hold`]).
    cut_before: BTreeMap<i32, Option<i64>>,
}

impl PipelinePlan {
    /// Plans nothing in `partitions` (e.g. their output could not be read): neither their
    /// new jobs nor their start commits, and their furthest cut stays as it was.
    pub fn hold<V>(&mut self, partitions: &BTreeMap<i32, V>) {
        self.new_jobs
            .retain(|j| !partitions.contains_key(&j.partition));
        self.initial_commits
            .retain(|p, _| !partitions.contains_key(p));
        for status in &mut self.partitions {
            if let (true, Some(cut)) = (
                partitions.contains_key(&status.partition),
                self.cut_before.get(&status.partition),
            ) {
                status.cut_offset = *cut;
            }
        }
    }
}

/// Blocks found in the output, by partition: `(start, end)` of each manifest.
pub type WrittenBlocks = BTreeMap<i32, Vec<(i64, i64)>>;

/// Plans each partition of `offsets`; `previous` is the partitions' last published status
/// (for their `tail_since` and `cut_offset`); `written` the blocks read from the output for
/// the partitions [`output_reads`] named.
pub fn plan_pipeline(
    offsets: &[PartitionOffsets],
    ranges: &JobRanges,
    written: &WrittenBlocks,
    previous: &[PartitionStatus],
    suspended: bool,
    now: Timestamp,
    policy: &PlanPolicy,
) -> PipelinePlan {
    let mut plan = PipelinePlan::default();
    for po in offsets {
        let existing = ranges.get(&po.partition).map_or(&[][..], Vec::as_slice);
        let old = previous.iter().find(|p| p.partition == po.partition);
        let tail_since = old.and_then(|p| p.tail_since.as_ref()).map(|t| t.0);
        let mut status = PartitionStatus {
            partition: po.partition,
            committed_offset: po.committed,
            planned_offset: existing.iter().map(|j| j.end).max(),
            high_watermark: po.high,
            lag: po.high - po.committed.unwrap_or(po.low),
            tail_since: old.and_then(|p| p.tail_since.clone()),
            committed_beyond_log_since: None,
            cut_offset: old
                .and_then(|p| p.cut_offset)
                .max(existing.iter().map(|j| j.end).max()),
        };
        if let Some(since) = committed_beyond_log_since(po, old, now) {
            let committed = po.committed.unwrap_or_default();
            plan.errors.push((
                po.partition,
                PartitionPlanError::CommittedBeyondLog {
                    committed,
                    high: po.high,
                },
            ));
            status.lag = status.lag.max(0);
            status.tail_since = None;
            status.committed_beyond_log_since = Some(Time(since));
            plan.partitions.push(status);
            continue;
        }
        let blocks = written.get(&po.partition).map_or(&[][..], Vec::as_slice);
        match plan_partition(po, existing, blocks, tail_since, now, policy) {
            Ok(p) => {
                if let Some(start) = p.commit_start {
                    plan.initial_commits.insert(po.partition, start);
                    status.lag = po.high - start;
                }
                if let Some((from, to)) = p.skipped {
                    plan.skipped.push((po.partition, from, to));
                }
                status.planned_offset = Some(p.planned_offset);
                status.tail_since = p.tail_since.map(Time);
                if !suspended {
                    plan.cut_before.insert(po.partition, status.cut_offset);
                    let new_end = p.new_jobs.iter().map(|j| j.end).max();
                    status.cut_offset = status.cut_offset.max(new_end);
                    plan.new_jobs.extend(p.new_jobs);
                }
            }
            Err(e) => plan.errors.push((po.partition, e)),
        }
        plan.partitions.push(status);
    }
    plan
}

/// The partitions whose output must be read before `plan`'s jobs are created, and the
/// offset to read from: those where a new job starts below the furthest range ever cut
/// (`previous` status's `cut_offset`), or where none is known (a new or re-created
/// pipeline). Anything cut there may meet a block already written: a deleted job's, one of
/// a pipeline deleted before, one past a lost committed offset. Cutting past the furthest
/// range needs no read, so steady planning never lists the output. The read starts
/// `max_records` early, to find a block that holds the start.
pub fn output_reads(
    plan: &PipelinePlan,
    previous: &[PartitionStatus],
    max_records: i64,
) -> BTreeMap<i32, i64> {
    let mut reads = BTreeMap::new();
    for job in &plan.new_jobs {
        let cut = previous
            .iter()
            .find(|p| p.partition == job.partition)
            .and_then(|p| p.cut_offset);
        if cut.is_none_or(|cut| job.start < cut) {
            let from = job.start.saturating_sub(max_records.max(1)).max(0);
            reads
                .entry(job.partition)
                .and_modify(|f: &mut i64| *f = (*f).min(from))
                .or_insert(from);
        }
    }
    reads
}

/// Since when the group's committed offset has been past the end of the partition's log, if
/// it is: the topic was deleted and re-created, or the log truncated (an unclean leader
/// election). Planning from it would skip the new log's records below it and take blocks of
/// the old log for the new one's, so the partition waits for a person. It keeps waiting while
/// the committed offset stays what it was (the previous status says so), even once the log
/// grows past it again; it resumes when the offset changes (the user reset it). Kafka answers
/// a new leader's offset requests only once its high watermark has caught up (KIP-207), so a
/// high watermark below the commit is never a passing leader change.
pub fn committed_beyond_log_since(
    po: &PartitionOffsets,
    previous: Option<&PartitionStatus>,
    now: Timestamp,
) -> Option<Timestamp> {
    let committed = po.committed?;
    let waiting = previous.and_then(|p| {
        let since = p.committed_beyond_log_since.as_ref()?.0;
        (p.committed_offset == Some(committed)).then_some(since)
    });
    waiting.or((committed > po.high).then_some(now))
}

struct Cutter {
    partition: i32,
    max_records: i64,
    budget: usize,
    jobs: Vec<PlannedJob>,
}

/// What new cuts must go around.
#[derive(Clone, Copy, Debug)]
enum Obstacle {
    /// A job that exists.
    Job(i64, i64),
    /// A block in the output with no job of its range.
    Block(i64, i64),
}

impl Obstacle {
    fn range(&self) -> (i64, i64) {
        match *self {
            Obstacle::Job(a, b) | Obstacle::Block(a, b) => (a, b),
        }
    }
}

/// `start`, moved past the written blocks that hold it. Without a committed offset, also
/// past the blocks contiguous from it: the commit was lost, and starting below what was
/// committed would move the commit backwards.
fn start_past_written(mut start: i64, written: &[(i64, i64)], commit_lost: bool) -> i64 {
    let holds =
        |start: i64, (a, b): (i64, i64)| (a < start || commit_lost && a == start) && start < b;
    while let Some(&(_, end)) = written.iter().find(|&&block| holds(start, block)) {
        start = end;
    }
    start
}

impl Cutter {
    /// Plans exactly `[from, to)` if the in-flight budget allows; returns whether it did.
    fn take(&mut self, from: i64, to: i64) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.jobs.push(PlannedJob {
            partition: self.partition,
            start: from,
            end: to,
        });
        self.budget -= 1;
        true
    }

    /// Cuts `[from, to)` into jobs of at most `max_records` while the in-flight budget
    /// lasts; returns how far it got.
    fn cut(&mut self, mut from: i64, to: i64) -> i64 {
        while from < to && self.budget > 0 {
            let end = to.min(from.saturating_add(self.max_records));
            self.jobs.push(PlannedJob {
                partition: self.partition,
                start: from,
                end,
            });
            self.budget -= 1;
            from = end;
        }
        from
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::committer::{JobProgress, next_commit};
    use crate::testing::t;
    use proptest::prelude::*;

    fn policy(max_records: i64, max_in_flight: usize) -> PlanPolicy {
        PlanPolicy {
            max_records,
            max_age: Duration::from_secs(60),
            max_in_flight,
            max_uncommitted: usize::MAX,
            start_offset: StartOffset::Earliest,
            skip_missing_data: false,
        }
    }

    fn offsets(low: i64, high: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets {
            partition: 3,
            low,
            high,
            committed,
        }
    }

    /// Plans at `t(0)` with no tail seen yet; the plan must succeed.
    fn plan_fresh(p: &PartitionOffsets, jobs: &[ExistingJob], pol: &PlanPolicy) -> PartitionPlan {
        plan_partition(p, jobs, &[], None, t(0), pol).unwrap()
    }

    fn ranges(plan: &PartitionPlan) -> Vec<(i64, i64)> {
        plan.new_jobs.iter().map(|j| (j.start, j.end)).collect()
    }

    fn existing(jobs: &[(i64, i64, bool)]) -> Vec<ExistingJob> {
        jobs.iter()
            .map(|&(start, end, succeeded)| ExistingJob {
                start,
                end,
                succeeded,
            })
            .collect()
    }

    #[test]
    fn ten_thousand_offsets_make_ten_jobs_of_a_thousand() {
        let plan = plan_fresh(&offsets(0, 10_000, Some(0)), &[], &policy(1000, 100));
        let expected: Vec<_> = (0..10).map(|i| (i * 1000, (i + 1) * 1000)).collect();
        assert_eq!(ranges(&plan), expected);
        assert!(plan.new_jobs.iter().all(|j| j.partition == 3));
        assert_eq!(plan.planned_offset, 10_000);
        assert_eq!(plan.commit_start, None);
        assert_eq!(plan.tail_since, None);
    }

    #[test]
    fn tail_is_cut_once_it_is_older_than_max_age() {
        let p = offsets(0, 2500, Some(0));
        let pol = policy(1000, 100);
        let first = plan_fresh(&p, &[], &pol);
        assert_eq!(ranges(&first), [(0, 1000), (1000, 2000)]);
        assert_eq!(first.tail_since, Some(t(0)));
        assert_eq!(first.planned_offset, 2000);

        let done = existing(&[(0, 1000, false), (1000, 2000, false)]);
        let p = offsets(0, 2700, Some(0));
        let early = plan_partition(&p, &done, &[], first.tail_since, t(59), &pol).unwrap();
        assert!(early.new_jobs.is_empty());
        assert_eq!(early.tail_since, Some(t(0)), "kept while the tail remains");

        let due = plan_partition(&p, &done, &[], first.tail_since, t(60), &pol).unwrap();
        assert_eq!(ranges(&due), [(2000, 2700)]);
        assert_eq!(due.tail_since, None);
        assert_eq!(due.planned_offset, 2700);
    }

    #[test]
    fn zero_max_age_cuts_the_tail_at_once() {
        let pol = PlanPolicy {
            max_age: Duration::ZERO,
            ..policy(1000, 100)
        };
        let plan = plan_fresh(&offsets(0, 1500, Some(0)), &[], &pol);
        assert_eq!(ranges(&plan), [(0, 1000), (1000, 1500)]);
        assert_eq!(plan.tail_since, None);
    }

    #[test]
    fn without_commit_starts_at_earliest_or_latest() {
        let p = offsets(100, 5000, None);
        let earliest = plan_fresh(&p, &[], &policy(1000, 100));
        assert_eq!(earliest.commit_start, Some(100));
        assert_eq!(earliest.new_jobs[0].start, 100);

        let pol = PlanPolicy {
            start_offset: StartOffset::Latest,
            ..policy(1000, 100)
        };
        let latest = plan_fresh(&p, &[], &pol);
        assert_eq!(latest.commit_start, Some(5000));
        assert_eq!(latest.start, 5000);
        assert!(latest.new_jobs.is_empty());
        assert_eq!(latest.planned_offset, 5000);
        assert_eq!(latest.tail_since, None);
    }

    #[test]
    fn without_commit_existing_jobs_start_at_the_low_watermark_whatever_start_offset_says() {
        let jobs = existing(&[(3000, 4000, true), (2000, 3000, true)]);
        let latest = PlanPolicy {
            start_offset: StartOffset::Latest,
            ..policy(1000, 100)
        };
        let plan = plan_fresh(&offsets(2500, 5000, None), &jobs, &latest);
        assert_eq!(plan.commit_start, Some(2500));
        assert_eq!(ranges(&plan), [(4000, 5000)]);
    }

    #[test]
    fn committed_below_low_watermark_is_out_of_range() {
        let p = offsets(500, 5000, Some(100));
        assert_eq!(
            plan_partition(&p, &[], &[], None, t(0), &policy(1000, 100)),
            Err(PartitionPlanError::OffsetOutOfRange {
                committed: 100,
                low: 500
            })
        );

        let pol = PlanPolicy {
            skip_missing_data: true,
            ..policy(1000, 100)
        };
        let plan = plan_fresh(&p, &[], &pol);
        assert_eq!(plan.commit_start, Some(500));
        assert_eq!(
            plan.skipped,
            Some((100, 500)),
            "the skipped range is reported"
        );
        assert_eq!(plan.new_jobs[0].start, 500);

        // Once the new start is committed, nothing more is skipped (reported once).
        let after = plan_fresh(&offsets(500, 5000, Some(500)), &[], &pol);
        assert_eq!((after.commit_start, after.skipped), (None, None));
        // Without a committed offset, starting at a watermark skips nothing.
        let fresh = plan_fresh(&offsets(500, 5000, None), &[], &pol);
        assert_eq!(fresh.skipped, None);
    }

    #[test]
    fn deleted_job_is_recreated_with_the_same_range() {
        let pol = policy(1000, 100);
        let p = offsets(0, 4200, Some(0));
        let first = plan_fresh(&p, &[], &pol);
        let mut jobs: Vec<ExistingJob> = first
            .new_jobs
            .iter()
            .map(|j| ExistingJob {
                start: j.start,
                end: j.end,
                succeeded: false,
            })
            .collect();
        let deleted = jobs.remove(1);

        let again = plan_partition(&p, &jobs, &[], first.tail_since, t(1), &pol).unwrap();
        assert_eq!(ranges(&again), [(deleted.start, deleted.end)]);
        assert_eq!(again.planned_offset, first.planned_offset);
    }

    #[test]
    fn gap_refill_is_bounded_by_the_next_job() {
        // The deleted job was cut with a larger max_records than today's.
        let jobs = existing(&[(0, 1000, true), (2500, 3000, false)]);
        let plan = plan_fresh(&offsets(0, 3000, Some(1000)), &jobs, &policy(1000, 100));
        assert_eq!(ranges(&plan), [(1000, 2000), (2000, 2500)]);
        assert_eq!(plan.planned_offset, 3000);
    }

    #[test]
    fn in_flight_limit_counts_existing_unfinished_jobs() {
        let jobs = existing(&[(0, 1000, true), (1000, 2000, false), (2000, 3000, false)]);
        let p = offsets(0, 10_000, Some(0));
        let plan = plan_fresh(&p, &jobs, &policy(1000, 3));
        assert_eq!(ranges(&plan), [(3000, 4000)]);
        assert_eq!(plan.planned_offset, 4000);
        assert_eq!(plan.tail_since, Some(t(0)), "unplanned data is waiting");

        let full = plan_fresh(&p, &jobs, &policy(1000, 2));
        assert!(full.new_jobs.is_empty());
    }

    #[test]
    fn succeeded_jobs_held_behind_an_unfinished_one_pause_planning_at_the_bound() {
        // [1000, 2000) failed; the three after it succeeded and wait for it.
        let jobs = existing(&[
            (0, 1000, true),
            (1000, 2000, false),
            (2000, 3000, true),
            (3000, 4000, true),
            (4000, 5000, true),
        ]);
        let p = offsets(0, 100_000, Some(1000));
        let bounded = |max_uncommitted| PlanPolicy {
            max_uncommitted,
            ..policy(1000, 4)
        };
        assert_eq!(
            ranges(&plan_fresh(&p, &jobs, &bounded(6))),
            [(5000, 6000), (6000, 7000)]
        );
        let held = plan_fresh(&p, &jobs, &bounded(4));
        assert!(held.new_jobs.is_empty(), "{held:?}");
        assert_eq!(held.planned_offset, 5000);
        assert_eq!(held.tail_since, Some(t(0)), "unplanned data is waiting");
    }

    #[test]
    fn a_deleted_job_is_refilled_at_the_bound() {
        let jobs = existing(&[(0, 1000, true), (2000, 3000, true), (3000, 4000, true)]);
        let plan = plan_fresh(
            &offsets(0, 100_000, Some(1000)),
            &jobs,
            &PlanPolicy {
                max_uncommitted: 2,
                ..policy(1000, 4)
            },
        );
        assert_eq!(ranges(&plan), [(1000, 2000)]);
    }

    #[test]
    fn unfilled_gap_bounds_the_planned_offset() {
        let jobs = existing(&[(1000, 2000, false), (3000, 4000, false)]);
        let plan = plan_fresh(&offsets(0, 4000, Some(0)), &jobs, &policy(500, 3));
        assert_eq!(ranges(&plan), [(0, 500)]);
        assert_eq!(plan.planned_offset, 500);
    }

    #[test]
    fn history_is_ignored() {
        let jobs = existing(&[(0, 1000, true), (1000, 2000, false)]);
        let plan = plan_fresh(&offsets(0, 3000, Some(2000)), &jobs, &policy(1000, 1));
        assert_eq!(ranges(&plan), [(2000, 3000)]);
    }

    #[test]
    fn overlapping_existing_jobs_never_get_overlapped() {
        let jobs = existing(&[(500, 1500, false), (1000, 1200, false), (1800, 2600, true)]);
        let plan = plan_fresh(&offsets(0, 4000, Some(800)), &jobs, &policy(1000, 100));
        assert_eq!(ranges(&plan), [(1500, 1800), (2600, 3600)]);
        assert_eq!(plan.tail_since, Some(t(0)));
    }

    // --- property test: a partition's life over several planning rounds ---

    #[derive(Clone, Debug)]
    struct Round {
        produced: i64,
        retention: i64,
        elapsed_secs: u64,
        max_records: i64,
        succeed: u64,
        delete: u64,
        clean_up: u64,
        lose_commit: bool,
    }

    fn round() -> impl Strategy<Value = Round> {
        (
            0i64..120,
            prop_oneof![4 => Just(0i64), 1 => 0i64..40],
            0u64..120,
            prop_oneof![3 => Just(None), 1 => (1i64..40).prop_map(Some)],
            any::<u64>(),
            prop_oneof![3 => Just(0u64), 1 => any::<u64>()],
            any::<u64>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(
                |(
                    produced,
                    retention,
                    elapsed_secs,
                    max_records,
                    succeed,
                    delete,
                    clean_up,
                    lose_commit,
                )| Round {
                    produced,
                    retention,
                    elapsed_secs,
                    max_records: max_records.unwrap_or(0),
                    succeed,
                    delete,
                    clean_up,
                    lose_commit,
                },
            )
    }

    fn bit(mask: u64, i: usize) -> bool {
        (mask >> (i % 64)) & 1 == 1
    }

    /// The end of a round, after the builds and deletions: the committer advances, cleanup
    /// removes some committed jobs, the commit may be lost; Kafka and the clock move on, and
    /// the spec may change.
    fn end_round(
        r: &Round,
        p: &mut PartitionOffsets,
        jobs: &mut Vec<ExistingJob>,
        now: &mut Timestamp,
        pol: &mut PlanPolicy,
    ) {
        let progress: Vec<JobProgress> = jobs
            .iter()
            .map(|j| JobProgress {
                start: j.start,
                end: j.end,
                succeeded: j.succeeded,
            })
            .collect();
        let committed = next_commit(p.committed.unwrap(), &progress);
        p.committed = Some(committed);
        let mut i = 0;
        jobs.retain(|j| {
            i += 1;
            j.end > committed || !bit(r.clean_up, i)
        });
        if r.lose_commit {
            p.committed = None;
        }
        p.high += r.produced;
        p.low = (p.low + r.retention).min(p.high);
        *now += Duration::from_secs(r.elapsed_secs);
        if r.max_records > 0 {
            pol.max_records = r.max_records;
        }
    }

    /// Checks one plan against its inputs.
    fn check_plan(
        p: &PartitionOffsets,
        jobs: &[ExistingJob],
        tail_since: Option<Timestamp>,
        now: Timestamp,
        pol: &PlanPolicy,
        plan: &PartitionPlan,
    ) -> Result<(), TestCaseError> {
        let start = plan.start;
        match p.committed {
            Some(c) if c >= p.low => {
                prop_assert_eq!((start, plan.commit_start, plan.skipped), (c, None, None))
            }
            Some(c) => prop_assert_eq!(
                (start, plan.commit_start, plan.skipped),
                (p.low, Some(p.low), Some((c, p.low)))
            ),
            None => prop_assert_eq!((plan.commit_start, plan.skipped), (Some(start), None)),
        }

        let live: Vec<ExistingJob> = jobs.iter().copied().filter(|j| j.end > start).collect();
        let unfinished = live.iter().filter(|j| !j.succeeded).count();
        for j in &plan.new_jobs {
            prop_assert!(
                j.start < j.end && j.end - j.start <= pol.max_records,
                "{j:?}"
            );
            prop_assert!(
                j.start >= start && j.end <= p.high,
                "{j:?} outside [{start}, {})",
                p.high
            );
        }
        prop_assert!(
            plan.new_jobs.windows(2).all(|w| w[0].start < w[1].start),
            "not in order"
        );

        // No overlaps (so no duplicates) and no gaps up to planned_offset.
        let mut all: Vec<(i64, i64)> = live.iter().map(|j| (j.start, j.end)).collect();
        all.extend(plan.new_jobs.iter().map(|j| (j.start, j.end)));
        all.sort_unstable();
        prop_assert!(
            all.windows(2).all(|w| w[0].1 <= w[1].0),
            "overlap in {all:?}"
        );
        let mut covered = start;
        for &(s, e) in &all {
            if s > covered {
                break;
            }
            covered = covered.max(e);
        }
        prop_assert_eq!(covered, plan.planned_offset, "coverage of {:?}", all);
        let frontier = all.iter().map(|j| j.1).max().unwrap_or(start).max(start);

        prop_assert!(plan.new_jobs.len() <= pol.max_in_flight.saturating_sub(unfinished));
        let last_end = live.iter().map(|j| j.end).max().unwrap_or(start).max(start);
        let (past_last, gaps): (Vec<&PlannedJob>, Vec<&PlannedJob>) =
            plan.new_jobs.iter().partition(|j| j.start >= last_end);
        prop_assert!(
            past_last.len() <= pol.max_uncommitted.saturating_sub(live.len() + gaps.len()),
            "{} jobs past the last with {} live and {} refilled",
            past_last.len(),
            live.len(),
            gaps.len()
        );

        // Tail bookkeeping.
        if p.high > frontier {
            prop_assert_eq!(plan.tail_since, Some(tail_since.unwrap_or(now)));
        } else {
            prop_assert_eq!(plan.tail_since, None);
        }

        // Liveness: with in-flight room left, everything due is planned.
        if unfinished + plan.new_jobs.len() < pol.max_in_flight
            && live.len() + plan.new_jobs.len() < pol.max_uncommitted
        {
            prop_assert_eq!(plan.planned_offset, frontier, "unfilled gap");
            prop_assert!(
                p.high - frontier < pol.max_records,
                "full job left unplanned"
            );
            if let Some(since) = plan.tail_since {
                prop_assert!(
                    now.duration_since(since) < SignedDuration::try_from(pol.max_age).unwrap()
                );
            }
        }

        // Idempotent.
        let mut with_new = jobs.to_vec();
        with_new.extend(plan.new_jobs.iter().map(|j| ExistingJob {
            start: j.start,
            end: j.end,
            succeeded: false,
        }));
        let again = plan_partition(p, &with_new, &[], plan.tail_since, now, pol).unwrap();
        prop_assert!(again.new_jobs.is_empty(), "replanned {:?}", again.new_jobs);
        prop_assert_eq!(again.planned_offset, plan.planned_offset);
        prop_assert_eq!(again.tail_since, plan.tail_since);

        // Deterministic, whatever the order jobs are listed in.
        let reversed: Vec<ExistingJob> = jobs.iter().rev().copied().collect();
        prop_assert_eq!(
            &plan_partition(p, &reversed, &[], tail_since, now, pol).unwrap(),
            plan
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn planning_rounds_tile_the_partition(
            low in 0i64..50,
            span in 0i64..200,
            committed in prop::option::of(0i64..250),
            latest in any::<bool>(),
            skip_missing_data in any::<bool>(),
            max_in_flight in 1usize..6,
            max_uncommitted in 1usize..12,
            max_records in 1i64..40,
            max_age_secs in 0u64..120,
            rounds in prop::collection::vec(round(), 1..12),
        ) {
            let mut p = PartitionOffsets { partition: 0, low, high: low + span, committed };
            let mut pol = PlanPolicy {
                max_records,
                max_age: Duration::from_secs(max_age_secs),
                max_in_flight,
                max_uncommitted,
                start_offset: if latest { StartOffset::Latest } else { StartOffset::Earliest },
                skip_missing_data,
            };
            let mut jobs: Vec<ExistingJob> = Vec::new();
            let mut tail_since = None;
            let mut now = t(0);

            for r in rounds {
                let plan = match plan_partition(&p, &jobs, &[], tail_since, now, &pol) {
                    Ok(plan) => plan,
                    Err(e) => {
                        let c = p.committed.unwrap();
                        prop_assert!(c < p.low && !pol.skip_missing_data);
                        prop_assert_eq!(e, PartitionPlanError::OffsetOutOfRange { committed: c, low: p.low });
                        break;
                    }
                };
                check_plan(&p, &jobs, tail_since, now, &pol, &plan)?;

                // The operator applies the plan.
                if let Some(c) = plan.commit_start {
                    p.committed = Some(c);
                }
                jobs.extend(plan.new_jobs.iter().map(|j| ExistingJob { start: j.start, end: j.end, succeeded: false }));
                tail_since = plan.tail_since;

                // Builders finish some jobs; the user deletes some unfinished ones.
                jobs.sort_by_key(|j| j.start);
                for (i, j) in jobs.iter_mut().enumerate() {
                    j.succeeded |= bit(r.succeed, i);
                }
                let mut i = 0;
                jobs.retain(|j| { i += 1; j.succeeded || !bit(r.delete, i) });

                end_round(&r, &mut p, &mut jobs, &mut now, &mut pol);
            }
        }
    }

    /// Issue 11, scenario 3: jobs deleted in any phase (a succeeded tail job too), a
    /// changing `maxRecords`, lost commits and retention; blocks stay in the output. Planning
    /// with the output's blocks never cuts a range over one: no offset is in two blocks.
    #[test]
    fn planning_around_written_blocks_never_puts_an_offset_in_two_blocks() {
        let overlap = |a: (i64, i64), b: (i64, i64)| a.0 < b.1 && b.0 < a.1;
        let config = ProptestConfig::with_cases(512);
        proptest!(config, |(rounds in prop::collection::vec(round(), 1..12), max_records in 1i64..40)| {
            let mut p = PartitionOffsets { partition: 0, low: 0, high: 0, committed: None };
            let mut pol = PlanPolicy { skip_missing_data: true, ..policy(max_records, 4) };
            let mut jobs: Vec<ExistingJob> = Vec::new();
            let mut blocks: Vec<(i64, i64)> = Vec::new();
            let mut tail_since = None;
            let mut now = t(0);
            for r in rounds {
                let plan = plan_partition(&p, &jobs, &blocks, tail_since, now, &pol).unwrap();
                for j in &plan.new_jobs {
                    let range = (j.start, j.end);
                    prop_assert!(
                        blocks.iter().all(|&b| b == range || !overlap(b, range)),
                        "{range:?} cut over one of the blocks {blocks:?}; jobs {jobs:?}, {p:?}"
                    );
                    prop_assert!(jobs.iter().all(|e| !overlap((e.start, e.end), range)));
                }
                if let Some(c) = plan.commit_start {
                    p.committed = Some(c);
                }
                jobs.extend(plan.new_jobs.iter().map(|j| ExistingJob { start: j.start, end: j.end, succeeded: false }));
                tail_since = plan.tail_since;

                // Builders finish some jobs (a block already there is reported, not written
                // again); the user deletes some jobs, whatever their phase.
                jobs.sort_by_key(|j| j.start);
                for (i, j) in jobs.iter_mut().enumerate() {
                    if bit(r.succeed, i) && !j.succeeded {
                        j.succeeded = true;
                        if !blocks.contains(&(j.start, j.end)) {
                            blocks.push((j.start, j.end));
                        }
                    }
                }
                let mut i = 0;
                jobs.retain(|_| { i += 1; !bit(r.delete, i) });
                for (i, a) in blocks.iter().enumerate() {
                    for b in &blocks[i + 1..] {
                        prop_assert!(!overlap(*a, *b), "blocks {a:?} and {b:?} overlap");
                    }
                }

                end_round(&r, &mut p, &mut jobs, &mut now, &mut pol);
            }
        });
    }

    #[test]
    fn a_deleted_tail_job_whose_block_was_written_comes_back_with_its_range() {
        // [1000, 1300) was cut short by maxAge, built, then deleted; 2700 more arrived.
        let p = offsets(0, 4000, Some(1000));
        let plan = plan_partition(&p, &[], &[(1000, 1300)], None, t(0), &policy(1000, 10)).unwrap();
        assert_eq!(ranges(&plan), [(1000, 1300), (1300, 2300), (2300, 3300)]);
        let without = plan_fresh(&p, &[], &policy(1000, 10));
        assert_eq!(
            ranges(&without)[0],
            (1000, 2000),
            "the overlap the blocks prevent"
        );
    }

    #[test]
    fn a_block_holding_the_start_moves_it_to_the_blocks_end_committed_first() {
        // The commit was lost; retention's low watermark falls inside a written block.
        let written = [(1000, 2000), (2000, 3000), (3500, 4000)];
        let p = offsets(1500, 5000, Some(1500));
        let plan = plan_partition(&p, &[], &written, None, t(0), &policy(1000, 10)).unwrap();
        assert_eq!((plan.start, plan.commit_start), (2000, Some(2000)));
        assert_eq!(
            ranges(&plan),
            [(2000, 3000), (3000, 3500), (3500, 4000), (4000, 5000)]
        );

        // Without a committed offset the start also moves past the blocks contiguous from
        // it, so the commit it makes first is not below the one that was lost.
        let lost = offsets(1500, 5000, None);
        let plan = plan_partition(&lost, &[], &written, None, t(0), &policy(1000, 10)).unwrap();
        assert_eq!((plan.start, plan.commit_start), (3000, Some(3000)));
        assert_eq!(ranges(&plan), [(3000, 3500), (3500, 4000), (4000, 5000)]);
    }

    #[test]
    fn blocks_of_jobs_that_exist_and_blocks_below_the_start_change_nothing() {
        let jobs = existing(&[(1000, 2000, true), (2000, 3000, false)]);
        let written = [(0, 1000), (1000, 2000)];
        let p = offsets(0, 3000, Some(1000));
        let plan = plan_partition(&p, &jobs, &written, None, t(0), &policy(1000, 10)).unwrap();
        assert_eq!(plan, plan_fresh(&p, &jobs, &policy(1000, 10)));
    }

    #[test]
    fn the_output_is_read_only_where_a_range_is_cut_below_the_furthest_cut() {
        let status = |partition, cut_offset| PartitionStatus {
            partition,
            cut_offset,
            ..Default::default()
        };
        let plan = PipelinePlan {
            new_jobs: vec![
                PlannedJob {
                    partition: 0,
                    start: 5000,
                    end: 6000,
                },
                PlannedJob {
                    partition: 1,
                    start: 2000,
                    end: 3000,
                },
                PlannedJob {
                    partition: 1,
                    start: 3000,
                    end: 3500,
                },
                PlannedJob {
                    partition: 2,
                    start: 0,
                    end: 1000,
                },
            ],
            ..Default::default()
        };
        // Partition 0 cuts past its furthest cut, 1 refills below it, 2 has none recorded.
        let previous = [status(0, Some(5000)), status(1, Some(3500))];
        assert_eq!(
            output_reads(&plan, &previous, 1000),
            BTreeMap::from([(1, 1000), (2, 0)])
        );
    }

    #[test]
    fn a_commit_past_the_end_of_the_log_waits_until_the_offset_is_reset() {
        let at = |high: i64, committed: i64| PartitionOffsets {
            partition: 0,
            low: 0,
            high,
            committed: Some(committed),
        };
        let plan = |po: PartitionOffsets, previous: &[PartitionStatus], now| {
            plan_pipeline(
                &[po],
                &JobRanges::new(),
                &WrittenBlocks::new(),
                previous,
                false,
                now,
                &policy(100, 4),
            )
        };
        // The topic re-created: 300 records where 5000 were committed.
        let first = plan(at(300, 5000), &[], t(0));
        assert_eq!(
            first.errors,
            [(
                0,
                PartitionPlanError::CommittedBeyondLog {
                    committed: 5000,
                    high: 300
                }
            )]
        );
        assert!(first.new_jobs.is_empty() && first.initial_commits.is_empty());
        let status = &first.partitions[0];
        assert_eq!(status.committed_beyond_log_since, Some(Time(t(0))));
        assert_eq!(status.lag, 0);

        // The new log grows past the old commit: still waiting, since the first sighting.
        let grown = plan(at(6000, 5000), &first.partitions, t(60));
        assert_eq!(grown.errors.len(), 1);
        assert!(grown.new_jobs.is_empty());
        assert_eq!(
            grown.partitions[0].committed_beyond_log_since,
            Some(Time(t(0)))
        );

        // The user resets the group's offset: planning resumes from it.
        let reset = plan(at(6000, 0), &grown.partitions, t(120));
        assert!(reset.errors.is_empty());
        assert_eq!(reset.partitions[0].committed_beyond_log_since, None);
        assert_eq!(reset.new_jobs.len(), 4);
        assert_eq!((reset.new_jobs[0].start, reset.new_jobs[0].end), (0, 100));

        // A commit at the end of the log is no problem.
        assert!(plan(at(300, 300), &[], t(0)).errors.is_empty());
    }

    #[test]
    fn pipeline_plan_reports_each_partition_and_what_to_commit_first() {
        let offsets = [
            PartitionOffsets {
                partition: 0,
                low: 0,
                high: 250,
                committed: None,
            },
            PartitionOffsets {
                partition: 1,
                low: 500,
                high: 900,
                committed: Some(100),
            },
            PartitionOffsets {
                partition: 2,
                low: 0,
                high: 230,
                committed: Some(100),
            },
        ];
        let ranges = JobRanges::from([(2, existing(&[(100, 200, true)]))]);
        let previous = [PartitionStatus {
            partition: 2,
            high_watermark: 220,
            tail_since: Some(Time(t(-30))),
            ..Default::default()
        }];
        let plan = plan_pipeline(
            &offsets,
            &ranges,
            &WrittenBlocks::new(),
            &previous,
            false,
            t(0),
            &policy(100, 4),
        );

        assert_eq!(plan.initial_commits, BTreeMap::from([(0, 0)]));
        assert_eq!(
            plan.errors,
            [(
                1,
                PartitionPlanError::OffsetOutOfRange {
                    committed: 100,
                    low: 500
                }
            )]
        );
        let planned: Vec<_> = plan
            .new_jobs
            .iter()
            .map(|j| (j.partition, j.start, j.end))
            .collect();
        assert_eq!(planned, [(0, 0, 100), (0, 100, 200)]);
        let p = |n: i32| plan.partitions.iter().find(|p| p.partition == n).unwrap();
        assert_eq!(plan.partitions.len(), 3);
        assert_eq!((p(0).lag, p(0).planned_offset), (250, Some(200)));
        assert_eq!(
            p(0).tail_since,
            Some(Time(t(0))),
            "tail 200..250 first seen now"
        );
        assert_eq!((p(1).lag, p(1).planned_offset), (800, None));
        assert_eq!((p(2).lag, p(2).planned_offset), (130, Some(200)));
        assert_eq!(
            p(2).tail_since,
            Some(Time(t(-30))),
            "the tail keeps its age"
        );

        let suspended = plan_pipeline(
            &offsets,
            &ranges,
            &WrittenBlocks::new(),
            &previous,
            true,
            t(0),
            &policy(100, 4),
        );
        assert!(suspended.new_jobs.is_empty());
        let mut nothing_cut = plan.partitions.clone();
        assert_eq!(nothing_cut[0].cut_offset.take(), Some(200));
        assert_eq!(suspended.partitions, nothing_cut);
        assert_eq!(suspended.initial_commits, plan.initial_commits);
    }

    #[test]
    fn a_deleted_jobs_range_stays_taken_once_whether_or_not_its_replacement_is_seen() {
        let deleted = [crate::testing::job(0, 1000, 2000)];
        let mut ranges = job_ranges(&[crate::testing::job(0, 0, 1000)]);
        add_deleted_ranges(&mut ranges, &deleted);
        assert_eq!(
            ranges[&0],
            existing(&[(0, 1000, false), (1000, 2000, false)])
        );
        let mut with_replacement = job_ranges(&[crate::testing::job(0, 1000, 2000)]);
        add_deleted_ranges(&mut with_replacement, &deleted);
        assert_eq!(with_replacement[&0], existing(&[(1000, 2000, false)]));
    }

    #[test]
    fn a_held_partition_plans_nothing_and_keeps_its_furthest_cut() {
        let offsets = [
            PartitionOffsets {
                partition: 0,
                low: 0,
                high: 3000,
                committed: Some(0),
            },
            PartitionOffsets {
                partition: 1,
                low: 0,
                high: 3000,
                committed: Some(0),
            },
        ];
        let ranges = job_ranges(&[crate::testing::job(0, 0, 1000)]);
        let mut plan = plan_pipeline(
            &offsets,
            &ranges,
            &WrittenBlocks::new(),
            &[],
            false,
            t(0),
            &policy(1000, 8),
        );
        assert_eq!(plan.partitions[0].cut_offset, Some(3000));
        plan.hold(&BTreeMap::from([(0, 0i64)]));
        assert!(plan.new_jobs.iter().all(|j| j.partition == 1));
        assert_eq!(
            plan.partitions[0].cut_offset,
            Some(1000),
            "the existing job's end"
        );
        assert_eq!(plan.partitions[1].cut_offset, Some(3000));
    }

    #[test]
    fn job_ranges_group_jobs_by_partition() {
        use blocksmith_crds::BlockJobStatus;
        let done = BlockJobStatus {
            phase: JobPhase::Succeeded,
            ..Default::default()
        };
        let jobs = [
            crate::testing::job(1, 0, 10),
            crate::testing::job_with(0, 5, 9, done),
            crate::testing::job(1, 10, 20),
        ];
        let ranges = job_ranges(&jobs);
        assert_eq!(ranges[&0], existing(&[(5, 9, true)]));
        assert_eq!(ranges[&1], existing(&[(0, 10, false), (10, 20, false)]));
    }
}
