//! Pipeline status conditions in the standard shape, derived from what the reconcile found.

use blocksmith_crds::{BlockJob, Reason};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::planner::PartitionPlanError;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const SUSPENDED: &str = "Suspended";

/// Something wrong with a pipeline: a condition reason and a message a user can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

impl Problem {
    /// The spec cannot be acted on; `message` names the field.
    pub fn invalid_spec(message: String) -> Self {
        Self {
            reason: Reason::InvalidSpec,
            message,
        }
    }

    /// A job used up its attempts (`backoffLimit`): its partition's commit waits for the user.
    pub fn job_failed(job: &BlockJob) -> Self {
        let s = &job.spec;
        let last_error = job.status.as_ref().and_then(|s| s.message.as_deref());
        Self {
            reason: Reason::JobFailed,
            message: format!(
                "job {} (partition {}, offsets [{}, {})) failed after {} attempts: {}; the commit of partition {} is held at offset {} until the job is deleted (which retries it)",
                job.name_any(),
                s.partition,
                s.start_offset,
                s.end_offset,
                job.attempt(),
                last_error.unwrap_or_default(),
                s.partition,
                s.start_offset,
            ),
        }
    }

    /// A `Succeeded` job whose block the output does not confirm: its partition's commit
    /// waits.
    pub fn block_unconfirmed(job: &BlockJob, why: &str) -> Self {
        let s = &job.spec;
        Self {
            reason: Reason::BlockUnconfirmed,
            message: format!(
                "job {} (partition {}, offsets [{}, {})) reported Succeeded, but {why}; the commit of partition {} is held at offset {} until the output confirms the block",
                job.name_any(),
                s.partition,
                s.start_offset,
                s.end_offset,
                s.partition,
                s.start_offset,
            ),
        }
    }

    /// Why a partition cannot be planned.
    pub fn partition_unplannable(partition: i32, error: PartitionPlanError) -> Self {
        match error {
            PartitionPlanError::OffsetOutOfRange { committed, low } => {
                Self::offset_out_of_range(partition, committed, low)
            }
            PartitionPlanError::CommittedBeyondLog { committed, high } => {
                Self::committed_beyond_log(partition, committed, high)
            }
        }
    }

    /// The group's committed offset of `partition` is past the end of its log.
    pub fn committed_beyond_log(partition: i32, committed: i64, high: i64) -> Self {
        Self {
            reason: Reason::CommittedBeyondLog,
            message: format!(
                "partition {partition}: committed offset {committed} is past the end of the log (high watermark {high}): the topic was deleted and re-created, or its log truncated (an unclean leader election). Nothing is planned for the partition, and it stays so until its committed offset changes, so that no record of the new log is skipped. Blocks in spec.output.url may hold the old log's records under the same offsets: point spec.output.url at a new location, then reset the group's offset for the partition (kafka-consumer-groups --reset-offsets) to where writing should resume"
            ),
        }
    }

    /// Retention deleted records `[committed, low)` of `partition` before they were written to
    /// a block.
    pub fn offset_out_of_range(partition: i32, committed: i64, low: i64) -> Self {
        Self {
            reason: Reason::OffsetOutOfRange,
            message: format!(
                "partition {partition}: committed offset {committed} is below the low watermark {low}: records [{committed}, {low}) were deleted by retention before they were written to a block. Set spec.kafka.skipMissingData: true to continue from {low}, accepting the loss"
            ),
        }
    }

    /// The builders' HPA could not be applied as asked.
    pub fn autoscaling_unavailable(message: String) -> Self {
        Self {
            reason: Reason::AutoscalingUnavailable,
            message,
        }
    }

    /// A request the Kubernetes API refused for a reason a person must look at; `None` for
    /// what passes by itself: a conflict, a missing object, throttling, an unavailable or
    /// timed-out server. (Kubernetes 1.20 answers some invalid applies with 500.)
    pub fn request_refused(error: &kube::Error) -> Option<Self> {
        let kube::Error::Api(e) = error else {
            return None;
        };
        let needs_a_person =
            (400..600).contains(&e.code) && ![404, 409, 429, 503, 504].contains(&e.code);
        needs_a_person.then(|| Self {
            reason: Reason::KubernetesRequestRefused,
            message: format!(
                "the Kubernetes API answered {} {}: {}",
                e.code, e.reason, e.message
            ),
        })
    }

    pub fn builders_unavailable(message: String) -> Self {
        Self {
            reason: Reason::BuildersUnavailable,
            message,
        }
    }
}

/// What one reconcile learned about a pipeline.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The most important problem first.
    pub problems: Vec<Problem>,
    pub suspended: bool,
    pub lag: i64,
    pub unfinished_jobs: i64,
}

/// Problems listed in full in the `Degraded` message; the rest are counted.
const LISTED_PROBLEMS: usize = 5;
/// Characters kept of each listed problem's message (a job's last error can be long): its
/// start, which names the job, and its end, which says what is held and what to do.
const PROBLEM_HEAD_CHARS: usize = 1024;
const PROBLEM_TAIL_CHARS: usize = 1024;

/// `message` with its middle cut out when it is longer than head + tail characters.
fn shortened(message: &str) -> String {
    let chars = message.chars().count();
    if chars <= PROBLEM_HEAD_CHARS + PROBLEM_TAIL_CHARS {
        return message.to_string();
    }
    let head: String = message.chars().take(PROBLEM_HEAD_CHARS).collect();
    let tail: String = message.chars().skip(chars - PROBLEM_TAIL_CHARS).collect();
    format!("{head} … {tail}")
}

/// Every problem's message, bounded: with thousands of failed jobs, each with a long error,
/// the condition must still fit in a status update (etcd's request size).
fn degraded_message(problems: &[Problem]) -> String {
    let mut listed: Vec<String> = problems
        .iter()
        .take(LISTED_PROBLEMS)
        .map(|p| shortened(&p.message))
        .collect();
    if problems.len() > LISTED_PROBLEMS {
        listed.push(format!(
            "and {} more problems",
            problems.len() - LISTED_PROBLEMS
        ));
    }
    listed.join("; ")
}

/// The new condition list. `lastTransitionTime` only moves when a condition's status flips.
pub fn conditions(
    old: &[Condition],
    observed: &Observed,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let first = observed.problems.first();
    let (ready, ready_reason, ready_msg) = match first {
        Some(p) => ("False", p.reason, p.message.clone()),
        None => (
            "True",
            Reason::Reconciled,
            "offsets are read and committed".to_string(),
        ),
    };
    let (degraded, degraded_reason, degraded_msg) = match first {
        Some(p) => ("True", p.reason, degraded_message(&observed.problems)),
        None => ("False", Reason::AsExpected, String::new()),
    };
    let (progressing, progressing_reason, progressing_msg) = if observed.suspended {
        (
            "False",
            Reason::Suspended,
            "planning is suspended".to_string(),
        )
    } else if observed.lag > 0 || observed.unfinished_jobs > 0 {
        (
            "True",
            Reason::Building,
            format!(
                "{} records behind, {} jobs unfinished",
                observed.lag, observed.unfinished_jobs
            ),
        )
    } else {
        (
            "False",
            Reason::CaughtUp,
            "every offset is committed".to_string(),
        )
    };
    let (suspended, suspended_reason) = if observed.suspended {
        ("True", Reason::SuspendedBySpec)
    } else {
        ("False", Reason::Active)
    };
    [
        (READY, ready, ready_reason, ready_msg),
        (
            PROGRESSING,
            progressing,
            progressing_reason,
            progressing_msg,
        ),
        (DEGRADED, degraded, degraded_reason, degraded_msg),
        (SUSPENDED, suspended, suspended_reason, String::new()),
    ]
    .into_iter()
    .map(|(type_, status, reason, message)| {
        let previous = old.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(now),
        };
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    })
    .collect()
}

/// The condition of `type_` in a list, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {

    #[test]
    fn refusals_a_person_must_see_are_problems_and_passing_ones_are_not() {
        let api = |code: u16, reason: &str| {
            kube::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "status": "Failure", "message": "m", "reason": reason, "code": code,
                }))
                .unwrap(),
            )
        };
        for (code, reason) in [(403, "Forbidden"), (422, "Invalid"), (500, "InternalError")] {
            let p = Problem::request_refused(&api(code, reason)).expect("a problem");
            assert_eq!(p.reason, Reason::KubernetesRequestRefused);
            assert_eq!(
                p.message,
                format!("the Kubernetes API answered {code} {reason}: m")
            );
        }
        for (code, reason) in [
            (404, "NotFound"),
            (409, "Conflict"),
            (429, "TooManyRequests"),
            (503, "ServiceUnavailable"),
            (504, "Timeout"),
        ] {
            assert_eq!(Problem::request_refused(&api(code, reason)), None, "{code}");
        }
    }

    use super::*;
    use blocksmith_crds::{BlockJobStatus, JobPhase};

    #[test]
    fn the_degraded_message_lists_a_few_problems_and_counts_the_rest() {
        let problem = |i: usize| Problem {
            reason: Reason::JobFailed,
            message: format!("job {i}: {}; held at offset {i}", "é".repeat(10_000)),
        };
        let many: Vec<Problem> = (0..1000).map(problem).collect();
        let message = degraded_message(&many);
        let chars = message.chars().count();
        assert!(chars < 11 * 1024, "{chars} characters");
        assert!(message.starts_with("job 0: éé"), "{message}");
        assert!(message.contains("; job 4: "), "{message}");
        assert!(message.contains("éé … éé"), "the middle is cut: {message}");
        assert!(
            message.contains("; held at offset 4; "),
            "the end is kept: {message}"
        );
        assert!(!message.contains("job 5: "), "{message}");
        assert!(message.ends_with("; and 995 more problems"), "{message}");

        let few = [problem(0), Problem::invalid_spec("spec.x: y".into())];
        assert_eq!(
            degraded_message(&few[1..]),
            "spec.x: y",
            "short messages are kept whole"
        );
    }

    #[test]
    fn problems_name_what_happened_and_what_to_do() {
        let failed = BlockJobStatus {
            phase: JobPhase::Failed,
            attempt: Some(3),
            message: Some("access denied".into()),
            ..Default::default()
        };
        let cases: [(Problem, Reason, &[&str]); 3] = [
            (
                Problem::partition_unplannable(
                    1,
                    PartitionPlanError::CommittedBeyondLog {
                        committed: 5000,
                        high: 300,
                    },
                ),
                Reason::CommittedBeyondLog,
                &[
                    "partition 1",
                    "committed offset 5000 is past the end of the log (high watermark 300)",
                    "re-created",
                    "truncated",
                    "until its committed offset changes",
                    "spec.output.url",
                    "reset the group's offset",
                ],
            ),
            (
                Problem::job_failed(&crate::testing::job_with(3, 1000, 2000, failed)),
                Reason::JobFailed,
                &[
                    "job orders-3-1000",
                    "partition 3, offsets [1000, 2000)",
                    "after 3 attempts: access denied",
                    "held at offset 1000",
                    "until the job is deleted",
                ],
            ),
            (
                Problem::offset_out_of_range(2, 100, 2600),
                Reason::OffsetOutOfRange,
                &[
                    "partition 2",
                    "committed offset 100 is below the low watermark 2600",
                    "records [100, 2600)",
                    "spec.kafka.skipMissingData: true",
                ],
            ),
        ];
        for (problem, reason, mentions) in cases {
            assert_eq!(problem.reason, reason);
            crate::testing::assert_mentions(&problem.message, mentions);
        }
    }

    #[test]
    fn healthy_then_degraded_keeps_and_moves_transition_times() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let healthy = conditions(&[], &Observed::default(), Some(1), t0);
        assert_eq!(find(&healthy, READY).unwrap().status, "True");
        assert_eq!(find(&healthy, DEGRADED).unwrap().status, "False");
        let again = conditions(&healthy, &Observed::default(), Some(1), t1);
        assert_eq!(again, healthy, "nothing changed, nothing moves");

        let bad = Observed {
            problems: vec![Problem {
                reason: Reason::TopicNotFound,
                message: "topic \"x\" does not exist".into(),
            }],
            ..Default::default()
        };
        let degraded = conditions(&healthy, &bad, Some(1), t1);
        let d = find(&degraded, DEGRADED).unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "TopicNotFound")
        );
        assert_eq!(d.last_transition_time, Time(t1));
        assert_eq!(find(&degraded, READY).unwrap().reason, "TopicNotFound");
        assert_eq!(
            find(&degraded, SUSPENDED).unwrap().last_transition_time,
            Time(t0)
        );
    }
}
