//! How many times each fault may happen in one run. Every fault is a step the checker may
//! take at any point while its budget lasts; small budgets keep the state space small.
//!
//! Lease expiry needs no budget: it is always possible for a running job (time is not
//! modelled, so a lease can run out at any step), and the job's attempts bound it.

use derive_setters::Setters;

/// Tests name the budgets they use: `Faults::NONE.job_deletions(2)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Setters)]
pub struct Faults {
    /// A builder process dies and is replaced: what it was doing is gone, its lease stays
    /// until it expires.
    pub builder_crashes: u8,
    /// A user deletes a BlockJob (`kubectl delete bj`, the documented retry).
    pub job_deletions: u8,
    /// Kafka drops the group's committed offset (`offsets.retention.minutes`).
    pub group_offset_losses: u8,
    /// A user changes `spec.jobs.maxRecords` (here from 2 to 3).
    pub max_records_changes: u8,
    /// Something with write access to `blockjobs/status` sets a job `Succeeded` without a
    /// block (a builder's ServiceAccount can patch every job of its namespace).
    pub forged_successes: u8,
    /// A second operator that was leader and no longer is, but has not noticed: it commits
    /// once, from a reading it took earlier.
    pub deposed_leader: bool,
}

impl Faults {
    pub const NONE: Faults = Faults {
        builder_crashes: 0,
        job_deletions: 0,
        group_offset_losses: 0,
        max_records_changes: 0,
        forged_successes: 0,
        deposed_leader: false,
    };
}
