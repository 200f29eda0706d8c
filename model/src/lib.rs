//! A model of blocksmith's protocol — the operator leader (and a deposed one), builders,
//! BlockJob leases, the object store and the Kafka group's offset — for
//! [stateright](https://docs.rs/stateright) to check exhaustively on a tiny log, against
//! the promises of `docs/reliability.md`. [`Design`] switches between the designs issue 11
//! compares; `tests/scenarios.rs` checks each. See `model/README.md`.

mod action;
mod builder;
mod committer;
mod design;
mod environment;
mod faults;
mod operator;
mod planner;
pub mod promises;
mod protocol;
mod state;

pub use action::Action;
pub use design::{CommitGuard, Design};
pub use faults::Faults;
pub use protocol::Protocol;
pub use state::State;
