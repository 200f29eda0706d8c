//! The operator's steps: the leader's, each a whole reconcile step acting on what is there
//! now, and the deposed leader's, which acts on what it read earlier.

use crate::committer::next_commit;
use crate::design::{CommitGuard, Design};
use crate::planner::plan;
use crate::state::{DeposedLeader, Job, Offset, Phase, State};

pub fn plan_jobs(design: &Design, state: &State) -> Option<State> {
    let plan = plan(
        design,
        state.group_offset,
        &state.jobs,
        &state.store.manifests,
        state.max_records,
    );
    if plan.commit_start.is_none() && plan.new_jobs.is_empty() {
        return None;
    }
    let mut next = state.clone();
    if let Some(start) = plan.commit_start {
        next.commit(start);
    }
    for range in plan.new_jobs {
        // Create-only: a job of that name that exists stays as it is.
        next.jobs.entry(range.start).or_insert(Job::new(range));
    }
    Some(next)
}

/// The leader's own commit: its re-read and its commit see the same offset, since the
/// deposed leader is the only other committer and acts in its own steps.
pub fn commit(design: &Design, state: &State) -> Option<State> {
    let committed = state.group_offset?;
    let target = next_commit(design, committed, &state.jobs, &state.store);
    (target > committed).then(|| {
        let mut next = state.clone();
        next.commit(target);
        next
    })
}

pub fn clean_up(state: &State, name: Offset) -> Option<State> {
    let job = state.jobs.get(&name)?;
    let committed = state.group_offset?;
    (job.phase == Phase::Succeeded && job.range.end <= committed).then(|| {
        let mut next = state.clone();
        next.jobs.remove(&name);
        next
    })
}

pub fn expire_lease(state: &State, name: Offset) -> Option<State> {
    let job = *state.jobs.get(&name)?;
    matches!(job.phase, Phase::Running { .. }).then(|| {
        let mut next = state.clone();
        next.jobs.insert(name, job.retried());
        next
    })
}

pub fn deposed_read(design: &Design, state: &State) -> Option<State> {
    if state.deposed != DeposedLeader::Reading {
        return None;
    }
    let committed = state.group_offset?;
    let target = next_commit(design, committed, &state.jobs, &state.store);
    (target > committed).then(|| State {
        deposed: DeposedLeader::Decided { target },
        ..state.clone()
    })
}

pub fn deposed_reread(design: &Design, state: &State) -> Option<State> {
    let DeposedLeader::Decided { target } = state.deposed else {
        return None;
    };
    (design.commit_guard == CommitGuard::RereadForward).then(|| State {
        deposed: DeposedLeader::Reread {
            target,
            seen: state.group_offset,
        },
        ..state.clone()
    })
}

pub fn deposed_commit(design: &Design, state: &State) -> Option<State> {
    let target = match (design.commit_guard, state.deposed) {
        (CommitGuard::Blind, DeposedLeader::Decided { target }) => Some(target),
        (CommitGuard::RereadForward, DeposedLeader::Reread { target, seen }) => {
            seen.is_none_or(|seen| target > seen).then_some(target)
        }
        // Refused: the commit carries a lease this operator no longer holds.
        (CommitGuard::LeaseFenced, DeposedLeader::Decided { .. }) => None,
        _ => return None,
    };
    let mut next = state.clone();
    next.deposed = DeposedLeader::Gone;
    if let Some(target) = target {
        next.commit(target);
    }
    Some(next)
}
