//! Every reason a user can see on a BlockPipeline: in its conditions (`kubectl describe bp`,
//! `kubectl wait --for=condition=…`) and in the Events recorded on it. README.md's table of
//! reasons is [`Reason::markdown_table`]; a test keeps the two equal.

use strum::{Display, EnumIter, IntoEnumIterator, IntoStaticStr};

/// A condition or Event reason. The problems (see [`Reason::is_problem`]) set `Ready=False`
/// and `Degraded=True` with that reason and are recorded as Warning Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, IntoStaticStr, Display)]
pub enum Reason {
    // Ready
    Reconciled,
    // Progressing
    Building,
    CaughtUp,
    Suspended,
    // Degraded
    AsExpected,
    // Suspended
    SuspendedBySpec,
    Active,
    // Problems
    InvalidSpec,
    SecretNotFound,
    KafkaUnavailable,
    KafkaAuthenticationFailed,
    TopicNotFound,
    CommitRefused,
    OffsetOutOfRange,
    CommittedBeyondLog,
    TopicRecreated,
    JobFailed,
    BlockUnconfirmed,
    OutputUnreadable,
    AutoscalingUnavailable,
    BuildersUnavailable,
    KubernetesRequestRefused,
    // Events only
    Recovered,
    Resumed,
    SkippedMissingData,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Every reason, in the README's order.
    pub fn all() -> impl Iterator<Item = Reason> {
        Reason::iter()
    }

    /// Where the reason appears.
    pub fn appears_in(self) -> &'static str {
        match self {
            Reason::Reconciled => "`Ready=True`",
            Reason::Building => "`Progressing=True`",
            Reason::CaughtUp => "`Progressing=False`",
            Reason::Suspended => "`Progressing=False`; Normal Event",
            Reason::AsExpected => "`Degraded=False`",
            Reason::SuspendedBySpec => "`Suspended=True`",
            Reason::Active => "`Suspended=False`",
            r if r.is_problem() => "`Ready=False`, `Degraded=True`; Warning Event",
            Reason::SkippedMissingData => "Warning Event",
            _ => "Normal Event",
        }
    }

    /// A problem a person may have to act on.
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            Reason::InvalidSpec
                | Reason::SecretNotFound
                | Reason::KafkaUnavailable
                | Reason::KafkaAuthenticationFailed
                | Reason::TopicNotFound
                | Reason::CommitRefused
                | Reason::OffsetOutOfRange
                | Reason::CommittedBeyondLog
                | Reason::TopicRecreated
                | Reason::JobFailed
                | Reason::BlockUnconfirmed
                | Reason::OutputUnreadable
                | Reason::AutoscalingUnavailable
                | Reason::BuildersUnavailable
                | Reason::KubernetesRequestRefused
        )
    }

    /// What it means, and for a problem what to do; the condition's message has the details.
    pub fn meaning(self) -> &'static str {
        match self {
            Reason::Reconciled => "offsets are read and committed",
            Reason::Building => "records are behind or jobs unfinished; the message counts both",
            Reason::CaughtUp => "every offset is committed",
            Reason::Suspended => {
                "`spec.suspend` is true: nothing new is planned, running jobs finish"
            }
            Reason::AsExpected => "no problem",
            Reason::SuspendedBySpec => "`spec.suspend` is true",
            Reason::Active => "`spec.suspend` is false",
            Reason::InvalidSpec => {
                "the spec cannot be acted on (the message names the field), or `kafka.topic` or \
                 the cluster changed while jobs exist; nothing is committed or planned until it \
                 is fixed"
            }
            Reason::SecretNotFound => {
                "a Secret or key the spec references is missing or unreadable; create it"
            }
            Reason::KafkaUnavailable => {
                "the brokers cannot be reached or did not answer in time; the message says why"
            }
            Reason::KafkaAuthenticationFailed => {
                "the brokers refused the credentials or TLS settings; check \
                 `spec.kafka.securityProtocol`, `sasl` and the Secret"
            }
            Reason::TopicNotFound => {
                "`spec.kafka.topic` or one of `spec.kafka.partitions` does not exist; create it or \
                 correct the spec"
            }
            Reason::CommitRefused => {
                "Kafka refused the offset commit; the consumer group must belong to this \
                 pipeline alone"
            }
            Reason::OffsetOutOfRange => {
                "retention deleted records before they were written to a block; the partition \
                 waits for the user (`spec.kafka.skipMissingData: true` accepts the loss)"
            }
            Reason::CommittedBeyondLog => {
                "the group's committed offset is past the end of the partition's log (topic \
                 re-created or log truncated); the partition waits until the offset is reset, \
                 best with a new `spec.output.url`"
            }
            Reason::TopicRecreated => {
                "`spec.kafka.topic` was deleted and created again (its topic id changed): its \
                 offsets count other records. Nothing is planned or committed until \
                 `spec.output.url` names a new output, after the group's offsets are reset for \
                 the new topic"
            }
            Reason::JobFailed => {
                "a job used up `spec.jobs.backoffLimit` attempts; its partition's commit waits \
                 until the job is deleted (which retries it)"
            }
            Reason::BlockUnconfirmed => {
                "a job reported `Succeeded`, but the output could not be read, or holds a \
                 manifest under its key that describes something else; its partition's commit \
                 waits. (A job whose manifest is missing is built again.)"
            }
            Reason::OutputUnreadable => {
                "the output could not be listed to plan a range below ones planned before (a \
                 deleted job, a lost committed offset, a re-created pipeline); nothing is \
                 planned there until it can be, so no range is cut over a block already written"
            }
            Reason::AutoscalingUnavailable => {
                "the cluster serves no HorizontalPodAutoscaler API blocksmith can use \
                 (`autoscaling/v2` or `v2beta2`); builders run at `minReplicas`"
            }
            Reason::BuildersUnavailable => {
                "the builder pods cannot run or scale: their Deployment cannot create them (a \
                 missing ServiceAccount, a quota), their containers wait (`ImagePullBackOff`, \
                 `CrashLoopBackOff`, a missing Secret), they cannot be scheduled, or the HPA \
                 cannot read its metric; the message names the object and Kubernetes' reason"
            }
            Reason::KubernetesRequestRefused => {
                "the Kubernetes API refused a request the operator made for the pipeline (403: \
                 the operator's permissions; 422: a value the API rejects, e.g. in \
                 `spec.builders`); the message is the API's answer; retried with backoff"
            }
            Reason::Recovered => "the pipeline is healthy again",
            Reason::Resumed => "`spec.suspend` went back to false; planning resumed",
            Reason::SkippedMissingData => {
                "`spec.kafka.skipMissingData` let a partition continue past records retention \
                 deleted; those records are lost"
            }
        }
    }

    /// The README's table of reasons.
    pub fn markdown_table() -> String {
        let mut table = String::from("| reason | where | meaning |\n| --- | --- | --- |\n");
        for r in Reason::all() {
            table.push_str(&format!(
                "| `{}` | {} | {} |\n",
                r.as_str(),
                r.appears_in(),
                r.meaning()
            ));
        }
        table
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_variants() {
        assert_eq!(Reason::all().count(), 25);
        assert_eq!(Reason::JobFailed.as_str(), "JobFailed");
        assert_eq!(Reason::InvalidSpec.to_string(), "InvalidSpec");
        let problems: Vec<&str> = Reason::all()
            .filter(|r| r.is_problem())
            .map(Reason::as_str)
            .collect();
        assert_eq!(problems.len(), 15, "{problems:?}");
    }

    #[test]
    fn the_readme_lists_every_reason() {
        const BEGIN: &str = "<!-- reasons: generated from crds/src/reason.rs, do not edit -->\n";
        const END: &str = "<!-- reasons: end -->";
        let readme = std::fs::read_to_string(
            std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
                .join("../README.md"),
        )
        .expect("README.md");
        let start = readme
            .find(BEGIN)
            .expect("README.md has the reasons marker")
            + BEGIN.len();
        let end = readme[start..]
            .find(END)
            .expect("README.md has the end marker")
            + start;
        let expected = Reason::markdown_table();
        assert!(
            readme[start..end] == expected,
            "README.md's table of reasons is stale; replace it with:\n{expected}"
        );
    }
}
