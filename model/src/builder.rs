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
    if state.builder(builder) != Builder::Idle || job.phase != Phase::Pending {
        return None;
    }
    let claim = Claim {
        name,
        range: job.range,
        attempt: job.attempt,
    };
    let mut next = state.with_builder(builder, Builder::Uploading(claim));
    let running = Phase::Running { holder: builder };
    next.jobs.insert(
        name,
        Job {
            phase: running,
            ..job
        },
    );
    Some(next)
}

pub fn put_data(design: &Design, state: &State, builder: BuilderId) -> Option<State> {
    let Builder::Uploading(claim) = state.builder(builder) else {
        return None;
    };
    let bytes = Bytes { writer: builder };
    let mut next = state.with_builder(builder, Builder::Publishing(claim));
    let key = data_key(design, claim, bytes);
    next.store.data.insert(key, bytes);
    Some(next)
}

pub fn put_manifest(design: &Design, state: &State, builder: BuilderId) -> Option<State> {
    let Builder::Publishing(claim) = state.builder(builder) else {
        return None;
    };
    let ours = Bytes { writer: builder };
    let outcome = match state.store.manifests.get(&claim.range) {
        None => Outcome::Succeeded,
        // An earlier attempt with the same bytes committed the block: it is this block.
        Some(existing) if existing.sha256 == ours => Outcome::Succeeded,
        Some(_) => Outcome::Failed,
    };
    let mut next = state.with_builder(builder, Builder::Reporting(claim, outcome));
    let data = data_key(design, claim, ours);
    next.store
        .manifests
        .entry(claim.range)
        .or_insert(Manifest { data, sha256: ours });
    Some(next)
}

pub fn report(state: &State, builder: BuilderId) -> Option<State> {
    let Builder::Reporting(claim, outcome) = state.builder(builder) else {
        return None;
    };
    let mut next = state.with_builder(builder, Builder::Idle);
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
