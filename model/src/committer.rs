//! How far the group's offset may move, after `operator/src/committer.rs` `next_commit`:
//! to the end of the contiguous run of succeeded jobs from it, counting a job on its
//! status alone (today) or only once its block is in the output (scenario 8's fix).

use std::collections::BTreeMap;

use crate::design::Design;
use crate::state::{Job, ObjectStore, Offset, Phase};

pub fn next_commit(
    design: &Design,
    committed: Offset,
    jobs: &BTreeMap<Offset, Job>,
    store: &ObjectStore,
) -> Offset {
    let mut done: Vec<_> = jobs
        .values()
        .filter(|j| j.phase == Phase::Succeeded && j.range.end > committed)
        .filter(|j| !design.commit_only_confirmed_blocks || store.has_block(j.range))
        .map(|j| j.range)
        .collect();
    done.sort();
    let mut cursor = committed;
    for range in done {
        if range.start > cursor {
            break;
        }
        cursor = cursor.max(range.end);
    }
    cursor
}
