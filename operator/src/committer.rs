//! Committing: how far a partition's consumer-group offset may move, given its jobs.

/// A job's range `[start, end)` and whether its block is durable: the same view of a job
/// the planner takes.
pub use crate::planner::ExistingJob as JobProgress;

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::planner::{JobRanges, PartitionOffsets};

/// The commits to make: for each partition with a committed offset, [`next_commit`] where it
/// moves the offset forward.
pub fn next_commits(offsets: &[PartitionOffsets], jobs: &JobRanges) -> BTreeMap<i32, i64> {
    offsets
        .iter()
        .filter_map(|po| {
            let committed = po.committed?;
            let ranges = jobs.get(&po.partition).map_or(&[][..], Vec::as_slice);
            let next = next_commit(committed, ranges);
            (next > committed).then_some((po.partition, next))
        })
        .collect()
}

/// The offset to commit: the end of the contiguous run of succeeded jobs starting at
/// `committed` (Kafka's convention: the committed offset is the next offset to read).
///
/// Jobs may come in any order; jobs entirely below `committed` are history and ignored.
/// A succeeded job that straddles `committed` also counts: its block holds every offset
/// from `committed` to its end, and nothing else could ever be planned there. The result
/// is never below `committed`, so commits never move backwards.
pub fn next_commit(committed: i64, jobs: &[JobProgress]) -> i64 {
    let mut done: Vec<(i64, i64)> = jobs
        .iter()
        .filter(|j| j.succeeded && j.end > committed)
        .map(|j| (j.start, j.end))
        .collect();
    done.sort_unstable();
    let mut cursor = committed;
    for (start, end) in done {
        if start > cursor {
            break;
        }
        cursor = cursor.max(end);
    }
    cursor
}

/// Whether a pipeline whose offsets did not move is due to commit them again: Kafka expires
/// the offsets of a group without members `offsets.retention.minutes` after their last
/// commit, and a pipeline planning from no committed offset would cut new ranges over blocks
/// already written. Never committed (as far as the status knows): due.
pub fn refresh_due(last_commit: Option<Timestamp>, now: Timestamp, every: Duration) -> bool {
    let every = SignedDuration::try_from(every).unwrap_or(SignedDuration::MAX);
    last_commit.is_none_or(|t| now.duration_since(t) >= every)
}

/// The commits of `targets` that move a partition forward from `current` (the group's
/// committed offsets; a partition without one may take any).
pub fn forward_only(
    targets: &BTreeMap<i32, i64>,
    current: &BTreeMap<i32, i64>,
) -> BTreeMap<i32, i64> {
    targets
        .iter()
        .filter(|(p, target)| current.get(*p).is_none_or(|now| *target > now))
        .map(|(p, target)| (*p, *target))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(start: i64, end: i64, succeeded: bool) -> JobProgress {
        JobProgress {
            start,
            end,
            succeeded,
        }
    }

    #[test]
    fn advances_over_contiguous_succeeded_jobs_in_any_order() {
        let jobs = [job(200, 300, true), job(0, 100, true), job(100, 200, true)];
        assert_eq!(next_commit(0, &jobs), 300);
    }

    #[test]
    fn stops_at_the_first_unfinished_job() {
        let jobs = [job(0, 100, true), job(100, 200, false), job(200, 300, true)];
        assert_eq!(next_commit(0, &jobs), 100);
    }

    #[test]
    fn stops_at_a_gap() {
        let jobs = [job(0, 100, true), job(150, 200, true)];
        assert_eq!(next_commit(0, &jobs), 100);
    }

    #[test]
    fn commits_only_partitions_whose_offset_moves() {
        let offsets = |partition, committed| PartitionOffsets {
            partition,
            low: 0,
            high: 1000,
            committed,
        };
        let jobs = JobRanges::from([
            (0, vec![job(0, 100, true)]),
            (1, vec![job(0, 100, false)]),
            (2, vec![job(0, 100, true)]),
        ]);
        let all = [
            offsets(0, Some(0)),
            offsets(1, Some(0)),
            offsets(2, None),
            offsets(3, Some(7)),
        ];
        assert_eq!(next_commits(&all, &jobs), BTreeMap::from([(0, 100)]));
    }

    #[test]
    fn only_forward_commits_are_made() {
        let targets = BTreeMap::from([(0, 100), (1, 100), (2, 100), (3, 100)]);
        let current = BTreeMap::from([(0, 50), (1, 100), (2, 150)]);
        assert_eq!(
            forward_only(&targets, &current),
            BTreeMap::from([(0, 100), (3, 100)])
        );
    }

    #[test]
    fn ignores_history_and_never_moves_backwards() {
        let jobs = [job(0, 100, true), job(100, 200, false)];
        assert_eq!(next_commit(100, &jobs), 100);
        assert_eq!(next_commit(500, &jobs), 500);
        assert_eq!(next_commit(500, &[]), 500);
    }

    #[test]
    fn nothing_starting_at_the_commit_keeps_it() {
        assert_eq!(next_commit(50, &[job(100, 200, true)]), 50);
    }

    #[test]
    fn a_succeeded_job_straddling_the_commit_counts() {
        let jobs = [job(0, 100, true), job(100, 200, true)];
        assert_eq!(next_commit(40, &jobs), 200);
        assert_eq!(next_commit(40, &[job(0, 100, false)]), 40);
    }

    /// A range tiled by jobs of random lengths, and the order they finish in.
    fn tiling() -> impl Strategy<Value = (i64, Vec<JobProgress>, Vec<usize>)> {
        (0i64..1_000, prop::collection::vec(1i64..50, 1..30)).prop_flat_map(|(start, lengths)| {
            let mut jobs = Vec::with_capacity(lengths.len());
            let mut cursor = start;
            for len in lengths {
                jobs.push(job(cursor, cursor + len, false));
                cursor += len;
            }
            let order: Vec<usize> = (0..jobs.len()).collect();
            (Just(start), Just(jobs), Just(order).prop_shuffle())
        })
    }

    proptest! {
        #[test]
        fn commit_follows_the_succeeded_prefix((start, mut jobs, order) in tiling()) {
            let range_end = jobs.last().unwrap().end;
            let mut committed = start;
            for i in order {
                jobs[i].succeeded = true;
                let next = next_commit(committed, &jobs);
                prop_assert!(next >= committed, "commit moved backwards");
                prop_assert!(
                    next == start || jobs.iter().any(|j| j.end == next),
                    "commit {next} is not at a job boundary"
                );
                for j in jobs.iter().filter(|j| j.start < next) {
                    prop_assert!(j.succeeded, "commit {next} passed unfinished job {j:?}");
                }
                // Maximal: the job the commit stops at has not succeeded.
                if let Some(j) = jobs.iter().find(|j| j.start == next) {
                    prop_assert!(!j.succeeded);
                }
                committed = next;
            }
            prop_assert_eq!(committed, range_end);
        }
    }

    #[test]
    fn idle_offsets_are_committed_again_once_the_refresh_interval_has_passed() {
        let t = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        let hour = Duration::from_secs(3600);
        assert!(refresh_due(None, t(0), hour));
        assert!(!refresh_due(Some(t(0)), t(3599), hour));
        assert!(refresh_due(Some(t(0)), t(3600), hour));
        // A commit time ahead of this clock (another replica's skew) waits.
        assert!(!refresh_due(Some(t(60)), t(0), hour));
    }
}
