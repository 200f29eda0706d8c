//! The promises of `docs/reliability.md`, as predicates over one state.

use crate::state::{LOG_END, State};

pub const COMMITTED_OFFSETS_ARE_IN_BLOCKS: &str =
    "every offset below the committed offset is in a block";
pub const NO_OFFSET_IN_TWO_BLOCKS: &str = "no offset is in two blocks";
pub const COMMITS_NEVER_MOVE_BACKWARDS: &str = "commits never move backwards";
pub const BLOCK_BYTES_NEVER_CHANGE: &str =
    "a block's bytes never change once a manifest names them";
/// Not a promise: a run that commits everything exists, so the others do not hold merely
/// because nothing happens.
pub const EVERYTHING_COMMITTED: &str = "every offset can be committed";

pub fn committed_offsets_are_in_blocks(state: &State) -> bool {
    let committed = state.group_offset.unwrap_or(0);
    (0..committed).all(|offset| state.store.manifests.keys().any(|r| r.contains(offset)))
}

pub fn no_offset_in_two_blocks(state: &State) -> bool {
    let blocks: Vec<_> = state.store.manifests.keys().collect();
    blocks
        .iter()
        .enumerate()
        .all(|(i, a)| blocks[i + 1..].iter().all(|b| !a.overlaps(b)))
}

pub fn commits_never_move_backwards(state: &State) -> bool {
    !state.commit_moved_backwards
}

pub fn block_bytes_never_change(state: &State) -> bool {
    state
        .store
        .manifests
        .values()
        .all(|m| state.store.data.get(&m.data) == Some(&m.sha256))
}

pub fn everything_committed(state: &State) -> bool {
    state.group_offset == Some(LOG_END)
}
