//! The model: blocksmith's protocol under one design and one set of faults.

use stateright::{Model, Property};

use crate::action::Action;
use crate::design::Design;
use crate::faults::Faults;
use crate::promises::{
    BLOCK_BYTES_NEVER_CHANGE, COMMITS_NEVER_MOVE_BACKWARDS, COMMITTED_OFFSETS_ARE_IN_BLOCKS,
    EVERYTHING_COMMITTED, NO_OFFSET_IN_TWO_BLOCKS, block_bytes_never_change,
    commits_never_move_backwards, committed_offsets_are_in_blocks, everything_committed,
    no_offset_in_two_blocks,
};
use crate::state::{BUILDERS, BuilderId, State};
use crate::{builder, environment, operator};

#[derive(Clone, Copy, Debug)]
pub struct Protocol {
    pub design: Design,
    pub faults: Faults,
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State::initial(self.faults)]
    }

    /// Every step that may apply; `next_state` turns down those that do not.
    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        let names: Vec<_> = state.jobs.keys().copied().collect();
        let builders = (0..BUILDERS).map(|b| b as BuilderId);

        actions.extend([Action::Plan, Action::Commit]);
        actions.extend(names.iter().map(|&n| Action::CleanUp(n)));
        actions.extend(names.iter().map(|&n| Action::ExpireLease(n)));
        for b in builders.clone() {
            actions.extend(names.iter().map(|&n| Action::Claim(b, n)));
            actions.extend([
                Action::PutData(b),
                Action::PutManifest(b),
                Action::Report(b),
            ]);
        }
        actions.extend([
            Action::DeposedRead,
            Action::DeposedReread,
            Action::DeposedCommit,
        ]);
        actions.extend(builders.map(Action::CrashBuilder));
        actions.extend(names.iter().map(|&n| Action::DeleteJob(n)));
        actions.extend([Action::LoseGroupOffset, Action::ChangeMaxRecords]);
        actions.extend(names.iter().map(|&n| Action::ForgeSucceeded(n)));
    }

    fn next_state(&self, state: &State, action: Action) -> Option<State> {
        let design = &self.design;
        match action {
            Action::Plan => operator::plan_jobs(design, state),
            Action::Commit => operator::commit(design, state),
            Action::CleanUp(name) => operator::clean_up(state, name),
            Action::ExpireLease(name) => operator::expire_lease(state, name),
            Action::Claim(b, name) => builder::claim(state, b, name),
            Action::PutData(b) => builder::put_data(design, state, b),
            Action::PutManifest(b) => builder::put_manifest(design, state, b),
            Action::Report(b) => builder::report(state, b),
            Action::DeposedRead => operator::deposed_read(design, state),
            Action::DeposedReread => operator::deposed_reread(design, state),
            Action::DeposedCommit => operator::deposed_commit(design, state),
            Action::CrashBuilder(b) => environment::crash_builder(state, b),
            Action::DeleteJob(name) => environment::delete_job(design, state, name),
            Action::LoseGroupOffset => environment::lose_group_offset(state),
            Action::ChangeMaxRecords => environment::change_max_records(state),
            Action::ForgeSucceeded(name) => environment::forge_succeeded(state, name),
        }
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(COMMITTED_OFFSETS_ARE_IN_BLOCKS, |_, s| {
                committed_offsets_are_in_blocks(s)
            }),
            Property::always(NO_OFFSET_IN_TWO_BLOCKS, |_, s| no_offset_in_two_blocks(s)),
            Property::always(COMMITS_NEVER_MOVE_BACKWARDS, |_, s| {
                commits_never_move_backwards(s)
            }),
            Property::always(BLOCK_BYTES_NEVER_CHANGE, |_, s| block_bytes_never_change(s)),
            Property::sometimes(EVERYTHING_COMMITTED, |_, s| everything_committed(s)),
        ]
    }
}
