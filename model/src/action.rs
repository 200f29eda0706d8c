//! Every step the checker may take, by who takes it.

use crate::state::{BuilderId, Offset};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The leader plans and creates jobs (committing the start first when the group has no
    /// offset).
    Plan,
    /// The leader commits over the jobs it counts as done.
    Commit,
    /// The leader deletes a succeeded job below the committed offset.
    CleanUp(Offset),
    /// The lease of a running job runs out and the leader takes the job back.
    ExpireLease(Offset),

    /// A builder claims a pending job (a compare-and-swap on its status) and reads its range.
    Claim(BuilderId, Offset),
    /// A builder puts its data object, unconditionally.
    PutData(BuilderId),
    /// A builder puts its manifest, create-only.
    PutManifest(BuilderId),
    /// A builder reports to its job; only the holder of the current attempt is heard.
    Report(BuilderId),

    /// The deposed leader reads the group offset and the jobs and decides a commit.
    DeposedRead,
    /// The deposed leader reads the group offset again before committing.
    DeposedReread,
    /// The deposed leader commits what it decided.
    DeposedCommit,

    CrashBuilder(BuilderId),
    DeleteJob(Offset),
    LoseGroupOffset,
    ChangeMaxRecords,
    ForgeSucceeded(Offset),
}
