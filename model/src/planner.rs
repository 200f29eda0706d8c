//! Planning, after `operator/src/planner.rs` `plan_partition`: from the group offset and the
//! live jobs (today), optionally also from the blocks already in the output and from every
//! range cut before (the two halves of the fix for issue 11, scenario 3).
//!
//! Left out: `maxAge` (a tail is cut at once, as if it had waited long enough),
//! `maxInFlightPerPartition`, and retention (the low watermark is 0).

use std::collections::BTreeMap;

use crate::design::Design;
use crate::state::{Job, LOG_END, Manifest, Offset, Range};

/// The planner's output: an offset to commit first (when the group has none), then the
/// jobs to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub commit_start: Option<Offset>,
    pub new_jobs: Vec<Range>,
}

pub fn plan(
    design: &Design,
    group_offset: Option<Offset>,
    jobs: &BTreeMap<Offset, Job>,
    manifests: &BTreeMap<Range, Manifest>,
    max_records: Offset,
) -> Plan {
    let mut taken: Vec<Range> = jobs.values().map(|j| j.range).collect();
    let start = if design.plan_after_written_blocks {
        // Without a committed offset, the low watermark moved past the blocks from there.
        past_written_blocks(group_offset.unwrap_or(0), manifests, group_offset.is_none())
    } else {
        // Without a committed offset, the smallest start of the live jobs, else the low
        // watermark (what the code did before it read the output).
        group_offset.unwrap_or_else(|| taken.iter().map(|r| r.start).min().unwrap_or(0))
    };
    taken.retain(|r| r.end > start);

    let mut new_jobs = Vec::new();
    if design.plan_after_written_blocks {
        // A block no job holds comes back as a job of exactly its range.
        for block in manifests.keys().filter(|r| r.start >= start) {
            if !taken.iter().any(|r| r.overlaps(block)) {
                new_jobs.push(*block);
                taken.push(*block);
            }
        }
    }
    taken.sort();

    let mut cursor = start;
    for range in taken {
        cut(cursor, range.start, max_records, &mut new_jobs);
        cursor = cursor.max(range.end);
    }
    cut(cursor, LOG_END, max_records, &mut new_jobs);
    new_jobs.sort();
    Plan {
        commit_start: group_offset.is_none().then_some(start),
        new_jobs,
    }
}

/// `start`, moved past the blocks that hold it (as `operator/src/planner.rs`
/// `start_past_written`): inside one, or, when the commit was lost, at a block's start.
fn past_written_blocks(
    start: Offset,
    manifests: &BTreeMap<Range, Manifest>,
    commit_lost: bool,
) -> Offset {
    let mut cursor = start;
    while let Some(block) = manifests
        .keys()
        .find(|r| r.contains(cursor) && (commit_lost || r.start < cursor))
    {
        cursor = block.end;
    }
    cursor
}

/// Cuts `[from, to)` into ranges of at most `max_records`.
fn cut(mut from: Offset, to: Offset, max_records: Offset, into: &mut Vec<Range>) {
    while from < to {
        let end = to.min(from + max_records);
        into.push(Range { start: from, end });
        from = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Bytes, DataKey};

    fn range(start: Offset, end: Offset) -> Range {
        Range { start, end }
    }

    /// Plans with pending `jobs` and blocks of `blocks`.
    fn plan_with(
        design: Design,
        group_offset: Option<Offset>,
        jobs: &[Range],
        blocks: &[Range],
        max_records: Offset,
    ) -> Plan {
        let jobs = jobs.iter().map(|r| (r.start, Job::new(*r))).collect();
        let sha256 = Bytes { writer: 0 };
        let manifests = blocks
            .iter()
            .map(|r| {
                let data = DataKey {
                    range: *r,
                    digest: Some(sha256),
                };
                (*r, Manifest { data, sha256 })
            })
            .collect();
        plan(&design, group_offset, &jobs, &manifests, max_records)
    }

    #[test]
    fn cuts_the_log_from_the_group_offset_and_commits_a_missing_start() {
        let plan = plan_with(Design::CURRENT, None, &[], &[], 3);
        assert_eq!(plan.commit_start, Some(0));
        assert_eq!(plan.new_jobs, [range(0, 3), range(3, 4)]);
    }

    #[test]
    fn refills_a_deleted_job_with_its_range_up_to_the_next_job() {
        let plan = plan_with(Design::CURRENT, Some(0), &[range(2, 4)], &[], 2);
        assert_eq!(plan.new_jobs, [range(0, 2)]);
    }

    #[test]
    fn without_the_output_a_block_without_a_job_is_cut_over() {
        let design = Design::FIXED.plan_after_written_blocks(false);
        let plan = plan_with(design, Some(0), &[], &[range(0, 2)], 3);
        assert_eq!(plan.new_jobs, [range(0, 3), range(3, 4)]);
    }

    #[test]
    fn a_block_without_a_job_comes_back_as_a_job_of_its_range() {
        let plan = plan_with(Design::CURRENT, Some(0), &[], &[range(0, 2)], 3);
        assert_eq!(plan.new_jobs, [range(0, 2), range(2, 4)]);
    }

    #[test]
    fn a_lost_commit_starts_after_the_blocks_and_cuts_around_them() {
        let blocks = [range(0, 2), range(3, 4)];
        let plan = plan_with(Design::FIXED, None, &[], &blocks, 3);
        assert_eq!(plan.commit_start, Some(2));
        assert_eq!(plan.new_jobs, [range(2, 3), range(3, 4)]);
    }
}
