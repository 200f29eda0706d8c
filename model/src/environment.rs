//! The faults: steps no blocksmith component takes, each allowed while its budget lasts.

use crate::design::Design;
use crate::state::{Builder, BuilderId, CHANGED_MAX_RECORDS, Job, Offset, Phase, State};

pub fn crash_builder(state: &State, builder: BuilderId) -> Option<State> {
    let busy = state.builder(builder) != Builder::Idle;
    (busy && state.faults_left.builder_crashes > 0).then(|| {
        let mut next = state.with_builder(builder, Builder::Idle);
        next.faults_left.builder_crashes -= 1;
        next
    })
}

/// With `keep_deleted_ranges`, a job whose range is not committed comes back at once as a
/// new job of its range: the operator's finalizer keeps the deleted job (and its range
/// taken) until the replacement exists, so no step sees the range free in between. A
/// builder still holding the deleted job holds no lease on the replacement.
pub fn delete_job(design: &Design, state: &State, name: Offset) -> Option<State> {
    let job = *state.jobs.get(&name)?;
    (state.faults_left.job_deletions > 0).then(|| {
        let mut next = state.clone();
        next.faults_left.job_deletions -= 1;
        let committed = state.group_offset.is_some_and(|c| job.range.end <= c);
        if design.keep_deleted_ranges && !committed {
            next.jobs.insert(name, Job::new(job.range));
        } else {
            next.jobs.remove(&name);
        }
        next
    })
}

pub fn lose_group_offset(state: &State) -> Option<State> {
    (state.group_offset.is_some() && state.faults_left.group_offset_losses > 0).then(|| {
        let mut next = state.clone();
        next.faults_left.group_offset_losses -= 1;
        next.group_offset = None;
        next
    })
}

pub fn change_max_records(state: &State) -> Option<State> {
    (state.faults_left.max_records_changes > 0).then(|| {
        let mut next = state.clone();
        next.faults_left.max_records_changes -= 1;
        next.max_records = CHANGED_MAX_RECORDS;
        next
    })
}

pub fn forge_succeeded(state: &State, name: Offset) -> Option<State> {
    let job = state.jobs.get(&name)?;
    (job.phase != Phase::Succeeded && state.faults_left.forged_successes > 0).then(|| {
        let mut next = state.clone();
        next.faults_left.forged_successes -= 1;
        next.jobs.get_mut(&name).expect("looked up above").phase = Phase::Succeeded;
        next
    })
}
