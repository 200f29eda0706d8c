//! The faults: steps no blocksmith component takes, each allowed while its budget lasts.

use crate::state::{Builder, BuilderId, CHANGED_MAX_RECORDS, Offset, Phase, State};

pub fn crash_builder(state: &State, builder: BuilderId) -> Option<State> {
    let busy = state.builder(builder) != Builder::Idle;
    (busy && state.faults_left.builder_crashes > 0).then(|| {
        let mut next = state.with_builder(builder, Builder::Idle);
        next.faults_left.builder_crashes -= 1;
        next
    })
}

pub fn delete_job(state: &State, name: Offset) -> Option<State> {
    (state.jobs.contains_key(&name) && state.faults_left.job_deletions > 0).then(|| {
        let mut next = state.clone();
        next.faults_left.job_deletions -= 1;
        next.jobs.remove(&name);
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
