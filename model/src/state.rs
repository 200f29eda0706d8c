//! The state of the whole system at one instant: the BlockJobs in etcd, the builders, the
//! object store, the Kafka group's offset, a deposed leader, and what faults are left.

use std::collections::BTreeMap;

use crate::faults::Faults;

/// A Kafka offset of the one partition modelled.
pub type Offset = u8;

/// The log: offsets `0..LOG_END`, all produced before the run starts (the high watermark).
/// Retention is not modelled: the low watermark stays 0.
pub const LOG_END: Offset = 4;

/// `spec.jobs.maxRecords` before and after a user changes it.
pub const MAX_RECORDS: Offset = 2;
pub const CHANGED_MAX_RECORDS: Offset = 3;

/// `spec.jobs.backoffLimit`: attempts a job gets before it stays `Failed`.
pub const BACKOFF_LIMIT: u8 = 2;

pub const BUILDERS: usize = 2;

/// Index of a builder in [`State::builders`].
pub type BuilderId = u8;

/// Offsets `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub start: Offset,
    pub end: Offset,
}

impl Range {
    pub fn contains(&self, offset: Offset) -> bool {
        self.start <= offset && offset < self.end
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// A block's bytes, as the builder that wrote them makes them. Builders are taken to be of
/// different versions or output settings, so two builders write different bytes for one
/// range, and one builder always the same bytes (the writer is deterministic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes {
    pub writer: BuilderId,
}

/// The name of a data object: its range, and its digest when names carry one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataKey {
    pub range: Range,
    pub digest: Option<Bytes>,
}

/// A block's manifest: the commit point, put create-only under the block's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Manifest {
    pub data: DataKey,
    pub sha256: Bytes,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ObjectStore {
    pub data: BTreeMap<DataKey, Bytes>,
    /// Keyed by range: the manifest key is `<start>-<end>.json`.
    pub manifests: BTreeMap<Range, Manifest>,
}

impl ObjectStore {
    /// A block's manifest names data of exactly `range`.
    pub fn has_block(&self, range: Range) -> bool {
        self.manifests.contains_key(&range)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Pending,
    Running {
        holder: BuilderId,
    },
    Succeeded,
    /// Out of attempts: holds its partition's commit until a user deletes it.
    Failed,
}

/// A BlockJob. Its name is its start offset (`<pipeline>-p<partition>-<start:020>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Job {
    pub range: Range,
    pub attempt: u8,
    pub phase: Phase,
}

impl Job {
    pub fn new(range: Range) -> Job {
        Job {
            range,
            attempt: 1,
            phase: Phase::Pending,
        }
    }

    /// The job after an attempt ended without a block: the next attempt, or `Failed` when
    /// there is none left.
    pub fn retried(self) -> Job {
        if self.attempt < BACKOFF_LIMIT {
            Job {
                attempt: self.attempt + 1,
                phase: Phase::Pending,
                ..self
            }
        } else {
            Job {
                phase: Phase::Failed,
                ..self
            }
        }
    }
}

/// The job a builder holds, as it read it when it claimed it: its lease is `attempt` of
/// the job named `name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    pub name: Offset,
    pub range: Range,
    pub attempt: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Succeeded,
    Failed,
}

/// Where a builder is in its loop. Reading the range from Kafka is part of claiming: what
/// matters is the order of the writes to the object store and to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Builder {
    Idle,
    /// Next: put the data object.
    Uploading(Claim),
    /// Next: put the manifest, create-only.
    Publishing(Claim),
    /// Next: report to the job, guarded by the lease it holds.
    Reporting(Claim, Outcome),
}

/// The operator that lost the leader lease without noticing, and its one commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeposedLeader {
    /// Has not read yet.
    Reading,
    /// Decided, from what it read, to commit `target`.
    Decided { target: Offset },
    /// Read the group's offset again (`seen`) just before committing.
    Reread {
        target: Offset,
        seen: Option<Offset>,
    },
    /// Committed, was refused, or was never there.
    Gone,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The BlockJobs in etcd, by name.
    pub jobs: BTreeMap<Offset, Job>,
    pub builders: [Builder; BUILDERS],
    pub store: ObjectStore,
    /// The Kafka group's committed offset: the next offset to read.
    pub group_offset: Option<Offset>,
    pub max_records: Offset,
    pub deposed: DeposedLeader,
    /// What faults may still happen.
    pub faults_left: Faults,
    /// History, not system state: the highest offset ever committed, and whether a commit
    /// was ever below it. The invariant needs the past, which no component keeps.
    pub highest_commit: Offset,
    pub commit_moved_backwards: bool,
}

impl State {
    pub fn initial(faults: Faults) -> State {
        State {
            jobs: BTreeMap::new(),
            builders: [Builder::Idle; BUILDERS],
            store: ObjectStore::default(),
            group_offset: None,
            max_records: MAX_RECORDS,
            deposed: if faults.deposed_leader {
                DeposedLeader::Reading
            } else {
                DeposedLeader::Gone
            },
            faults_left: faults,
            highest_commit: 0,
            commit_moved_backwards: false,
        }
    }

    pub fn builder(&self, id: BuilderId) -> Builder {
        self.builders[usize::from(id)]
    }

    /// This state with builder `id` moved on to `to`.
    pub fn with_builder(&self, id: BuilderId, to: Builder) -> State {
        let mut next = self.clone();
        next.builders[usize::from(id)] = to;
        next
    }

    /// Sets the group's offset, remembering whether that moved it below an earlier commit.
    pub fn commit(&mut self, offset: Offset) {
        self.commit_moved_backwards |= offset < self.highest_commit;
        self.highest_commit = self.highest_commit.max(offset);
        self.group_offset = Some(offset);
    }
}
