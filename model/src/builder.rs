//! A builder's steps, after `builder/src/worker.rs` and `runner.rs`: claim, put the data
//! object, put the manifest create-only, report under the lease.
//!
//! The runner's first look for an existing manifest is left out: it saves work, keeps no
//! promise, and a builder past it behaves as one without it.

use crate::design::Design;
use crate::state::{
    Builder, BuilderId, Bytes, Claim, DataKey, Job, Manifest, Offset, Outcome, Phase, State,
};

pub fn claim(state: &State, builder: BuilderId, name: Offset) -> Option<State> {
    let job = *state.jobs.get(&name)?;
    let idle = state.builders[usize::from(builder)] == Builder::Idle;
    if !idle || job.phase != Phase::Pending {
        return None;
    }
    let mut next = state.clone();
    let running = Phase::Running { holder: builder };
    next.jobs.insert(
        name,
        Job {
            phase: running,
            ..job
        },
    );
    next.builders[usize::from(builder)] = Builder::Uploading(Claim {
        name,
        range: job.range,
        attempt: job.attempt,
    });
    Some(next)
}

pub fn put_data(design: &Design, state: &State, builder: BuilderId) -> Option<State> {
    let Builder::Uploading(claim) = state.builders[usize::from(builder)] else {
        return None;
    };
    let bytes = Bytes { writer: builder };
    let mut next = state.clone();
    next.store
        .data
        .insert(data_key(design, claim, bytes), bytes);
    next.builders[usize::from(builder)] = Builder::Publishing(claim);
    Some(next)
}

pub fn put_manifest(design: &Design, state: &State, builder: BuilderId) -> Option<State> {
    let Builder::Publishing(claim) = state.builders[usize::from(builder)] else {
        return None;
    };
    let ours = Bytes { writer: builder };
    let mut next = state.clone();
    let outcome = match state.store.manifests.get(&claim.range) {
        None => {
            let data = data_key(design, claim, ours);
            let manifest = Manifest { data, sha256: ours };
            next.store.manifests.insert(claim.range, manifest);
            Outcome::Succeeded
        }
        // An earlier attempt with the same bytes committed the block: it is this block.
        Some(existing) if existing.sha256 == ours => Outcome::Succeeded,
        Some(_) => Outcome::Failed,
    };
    next.builders[usize::from(builder)] = Builder::Reporting(claim, outcome);
    Some(next)
}

pub fn report(state: &State, builder: BuilderId) -> Option<State> {
    let Builder::Reporting(claim, outcome) = state.builders[usize::from(builder)] else {
        return None;
    };
    let mut next = state.clone();
    next.builders[usize::from(builder)] = Builder::Idle;
    if let Some(job) = next.jobs.get_mut(&claim.name) {
        let holds_lease = job.range == claim.range
            && job.attempt == claim.attempt
            && job.phase == (Phase::Running { holder: builder });
        if holds_lease {
            *job = match outcome {
                Outcome::Succeeded => Job {
                    phase: Phase::Succeeded,
                    ..*job
                },
                Outcome::Failed => job.retried(),
            };
        }
    }
    Some(next)
}

fn data_key(design: &Design, claim: Claim, bytes: Bytes) -> DataKey {
    DataKey {
        range: claim.range,
        digest: design.content_addressed_data.then_some(bytes),
    }
}
