//! Prometheus metrics (`blocksmith_` prefix, units in names) and the HTTP endpoints
//! `/metrics`, `/healthz`, `/readyz`, with the deadlines `/healthz` judges the operator by.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use blocksmith_crds::Reason;
pub use blocksmith_runtime::metrics::KindLabels;
use blocksmith_runtime::metrics::{ApiWrites, Families, register, registered};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::conditions;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub namespace: String,
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub namespace: String,
    pub pipeline: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub pipeline: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub pipeline: String,
    pub condition: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub namespace: String,
    pub pipeline: String,
    pub reason: String,
}

/// The operator's metrics, `/healthz` and `/readyz`.
pub type Metrics = blocksmith_runtime::metrics::Metrics<OperatorMetrics>;

/// The operator's own metric families.
pub struct OperatorMetrics {
    lag: Family<PartitionLabels, Gauge>,
    committed: Family<PartitionLabels, Gauge>,
    queue_depth: Family<PipelineLabels, Gauge>,
    oldest_uncommitted: Family<PipelineLabels, Gauge>,
    jobs: Family<PhaseLabels, Gauge>,
    commits: Family<PipelineLabels, Counter>,
    conditions: Family<ConditionLabels, Gauge>,
    problems: Family<ReasonLabels, Gauge>,
    leader: Gauge,
    crds_outdated: Gauge,
    reconcile_errors: Family<KindLabels, Counter>,
    kafka_errors: Family<PipelineLabels, Counter>,
    api_writes: ApiWrites,
    reconcile_seconds: Histogram,
    /// The partitions each pipeline reported series for, so that its series can go with it.
    partitions: Mutex<HashMap<PipelineLabels, BTreeSet<i32>>>,
}

/// The job phases the `jobs` family has a series for.
const PHASES: [&str; 4] = ["Pending", "Running", "Succeeded", "Failed"];

/// The pipeline condition types, and the statuses the `pipeline_condition` family has a series
/// for (the operator never sets `Unknown`).
const CONDITIONS: [&str; 4] = [
    conditions::READY,
    conditions::PROGRESSING,
    conditions::DEGRADED,
    conditions::SUSPENDED,
];
const CONDITION_STATUSES: [&str; 2] = ["True", "False"];

impl Families for OperatorMetrics {
    const PREFIX: &'static str = "blocksmith";

    fn register(r: &mut Registry) -> Self {
        OperatorMetrics {
            lag: registered(
                r,
                "partition_lag_records",
                "High watermark minus committed offset",
            ),
            committed: registered(r, "committed_offset", "Committed consumer-group offset"),
            queue_depth: registered(r, "queue_depth_jobs", "Claimable BlockJobs"),
            oldest_uncommitted: registered(
                r,
                "oldest_uncommitted_record_age_seconds",
                "Age of the pipeline's oldest record not yet committed (in a block and its offset committed), since the operator first saw it in the log; 0 when caught up",
            ),
            jobs: registered(r, "jobs", "BlockJobs by phase"),
            commits: registered(r, "commits", "Offset commits"),
            conditions: registered(
                r,
                "pipeline_condition",
                "1 for the status each condition of the pipeline has, 0 for the other (as kube-state-metrics reports conditions)",
            ),
            problems: registered(
                r,
                "pipeline_problems",
                "Problems the pipeline's last reconcile found, by reason (one per failed job for JobFailed)",
            ),
            leader: registered(
                r,
                "leader",
                "1 while this replica holds the leader lease and acts, else 0",
            ),
            crds_outdated: registered(
                r,
                "crds_outdated",
                "1 while the installed CRDs lack fields this operator writes: it waits, not ready, until the CRDs of its release are applied",
            ),
            reconcile_errors: registered(r, "reconcile_errors", "Failed reconciles by error kind"),
            kafka_errors: registered(r, "kafka_errors", "Kafka request failures"),
            api_writes: ApiWrites::registered(r),
            // Fine buckets (×1.5 from 1 ms to ~2 min) so p50/p99 read off them are within 25%.
            reconcile_seconds: register(
                r,
                "reconcile_duration_seconds",
                "Reconcile duration",
                Histogram::new(exponential_buckets(0.001, 1.5, 30)),
            ),
            partitions: Mutex::default(),
        }
    }

    fn api_writes(&self) -> &ApiWrites {
        &self.api_writes
    }
}

impl OperatorMetrics {
    pub fn reconcile_error(&self, kind: &str) {
        self.reconcile_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn observe_reconcile(&self, seconds: f64) {
        self.reconcile_seconds.observe(seconds);
    }

    pub fn kafka_error(&self, ns: &str, pipeline: &str) {
        self.kafka_errors
            .get_or_create(&pipeline_labels(ns, pipeline))
            .inc();
    }

    pub fn commit(&self, ns: &str, pipeline: &str) {
        self.commits
            .get_or_create(&pipeline_labels(ns, pipeline))
            .inc();
    }

    pub fn partition(
        &self,
        ns: &str,
        pipeline: &str,
        partition: i32,
        committed: Option<i64>,
        lag: i64,
    ) {
        let l = PartitionLabels {
            namespace: ns.into(),
            pipeline: pipeline.into(),
            partition: partition.to_string(),
        };
        self.partitions
            .lock()
            .expect("metrics lock")
            .entry(pipeline_labels(ns, pipeline))
            .or_default()
            .insert(partition);
        self.lag.get_or_create(&l).set(lag);
        if let Some(c) = committed {
            self.committed.get_or_create(&l).set(c);
        }
    }

    pub fn oldest_uncommitted_age(&self, ns: &str, pipeline: &str, seconds: i64) {
        self.oldest_uncommitted
            .get_or_create(&pipeline_labels(ns, pipeline))
            .set(seconds);
    }

    pub fn queue(&self, ns: &str, pipeline: &str, depth: i64, by_phase: &[(&str, i64)]) {
        self.queue_depth
            .get_or_create(&pipeline_labels(ns, pipeline))
            .set(depth);
        for (phase, n) in by_phase {
            let l = PhaseLabels {
                namespace: ns.into(),
                pipeline: pipeline.into(),
                phase: (*phase).into(),
            };
            self.jobs.get_or_create(&l).set(*n);
        }
    }

    /// The pipeline's conditions as published, and the problems behind them.
    pub fn pipeline_status<'a>(
        &self,
        ns: &str,
        pipeline: &str,
        conditions: impl IntoIterator<Item = (&'a str, &'a str)>,
        problems: impl IntoIterator<Item = Reason>,
    ) {
        for (condition, status) in conditions {
            for s in CONDITION_STATUSES {
                self.conditions
                    .get_or_create(&condition_labels(ns, pipeline, condition, s))
                    .set(i64::from(s == status));
            }
        }
        let mut counts: HashMap<Reason, i64> = HashMap::new();
        for reason in problems {
            *counts.entry(reason).or_default() += 1;
        }
        for reason in Reason::all().filter(|r| r.is_problem()) {
            self.problems
                .get_or_create(&reason_labels(ns, pipeline, reason))
                .set(counts.get(&reason).copied().unwrap_or(0));
        }
    }

    /// Whether this replica leads (acts) now.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Whether the installed CRDs lack fields this operator writes.
    pub fn set_crds_outdated(&self, outdated: bool) {
        self.crds_outdated.set(i64::from(outdated));
    }

    /// Removes every series of a deleted pipeline.
    pub fn forget_pipeline(&self, ns: &str, pipeline: &str) {
        let labels = pipeline_labels(ns, pipeline);
        let partitions = self
            .partitions
            .lock()
            .expect("metrics lock")
            .remove(&labels)
            .unwrap_or_default();
        for partition in partitions {
            let l = PartitionLabels {
                namespace: ns.into(),
                pipeline: pipeline.into(),
                partition: partition.to_string(),
            };
            self.lag.remove(&l);
            self.committed.remove(&l);
        }
        for phase in PHASES {
            self.jobs.remove(&PhaseLabels {
                namespace: ns.into(),
                pipeline: pipeline.into(),
                phase: phase.into(),
            });
        }
        for condition in CONDITIONS {
            for status in CONDITION_STATUSES {
                self.conditions
                    .remove(&condition_labels(ns, pipeline, condition, status));
            }
        }
        for reason in Reason::all() {
            self.problems.remove(&reason_labels(ns, pipeline, reason));
        }
        self.queue_depth.remove(&labels);
        self.oldest_uncommitted.remove(&labels);
        self.commits.remove(&labels);
        self.kafka_errors.remove(&labels);
    }

    /// Queue depth of one pipeline as last reconciled (for the external metrics API).
    pub fn queue_depth(&self, ns: &str, pipeline: &str) -> Option<i64> {
        self.queue_depth
            .get(&pipeline_labels(ns, pipeline))
            .map(|g| g.get())
    }
}

fn pipeline_labels(ns: &str, pipeline: &str) -> PipelineLabels {
    PipelineLabels {
        namespace: ns.into(),
        pipeline: pipeline.into(),
    }
}

fn condition_labels(ns: &str, pipeline: &str, condition: &str, status: &str) -> ConditionLabels {
    ConditionLabels {
        namespace: ns.into(),
        pipeline: pipeline.into(),
        condition: condition.into(),
        status: status.into(),
    }
}

fn reason_labels(ns: &str, pipeline: &str, reason: Reason) -> ReasonLabels {
    ReasonLabels {
        namespace: ns.into(),
        pipeline: pipeline.into(),
        reason: reason.as_str().into(),
    }
}

/// The controller's heartbeat on `/healthz`.
///
/// Armed while some pipeline awaits a requeue (its last reconcile asked for one, or failed:
/// the error policy requeues), so the controller has a timer due within the poll interval;
/// beaten whenever the controller is polled (`main` wraps it) and whenever a reconcile ends.
/// It is beaten on polls rather than only on finished reconciles because the debounce
/// postpones a pipeline's reconcile for as long as its jobs keep changing more often than
/// every debounce period — a busy controller, not a stuck one. Each reconcile in progress
/// is an operation of this heartbeat, judged by [`reconcile_deadline`] instead.
pub const RECONCILE_HEARTBEAT: &str = "reconcile";

/// How long one reconcile may run before `/healthz` calls it stuck: 5 minutes plus 8 Kafka
/// requests that time out.
///
/// A reconcile makes up to 7 Kafka requests one after another (metadata, cluster id, low and
/// high watermarks, committed offsets, a start commit and a commit), each ending within
/// `kafka_timeout` plus up to a second spent explaining a failure. Its Kubernetes requests
/// end within the API server's request timeout (60 s by default) even when the server is
/// overloaded; the 5 minutes cover several of those in a row besides the largest planning
/// round measured (10,000 jobs created in 26 s; reconciles of 10,000 jobs take 0.2 s
/// otherwise). Defaults (10 s Kafka timeout): 388 s.
pub fn reconcile_deadline(kafka_timeout: Duration) -> Duration {
    Duration::from_secs(300) + 8 * (kafka_timeout + Duration::from_secs(1))
}

/// How long the controller may go unpolled, with no reconcile in progress, while some
/// pipeline awaits a requeue: three of the longest requeue periods, plus 30 s.
///
/// A pipeline waiting for its requeue is due again within the poll interval (at least 5 s
/// when it reports a problem) plus the debounce, and the due timer wakes the controller.
/// Defaults (10 s poll interval, 500 ms debounce): 61.5 s.
pub fn controller_idle_deadline(poll_interval: Duration, debounce: Duration) -> Duration {
    3 * (poll_interval.max(Duration::from_secs(5)) + debounce) + Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_pipelines_series_go_with_it_and_no_others() {
        let metrics = Metrics::default();
        let before = metrics.encode();
        for pipeline in ["gone", "kept"] {
            let m = &metrics;
            m.partition("ns", pipeline, 0, Some(5), 1);
            m.partition("ns", pipeline, 3, None, 2);
            m.queue("ns", pipeline, 1, &[("Pending", 1), ("Failed", 0)]);
            m.commit("ns", pipeline);
            m.kafka_error("ns", pipeline);
            m.oldest_uncommitted_age("ns", pipeline, 7);
            m.pipeline_status(
                "ns",
                pipeline,
                [("Ready", "False"), ("Degraded", "True")],
                [Reason::JobFailed],
            );
        }
        let kept_series = metrics.encode().matches("pipeline=\"kept\"").count();
        metrics.forget_pipeline("ns", "gone");
        let text = metrics.encode();
        assert!(!before.contains("pipeline="));
        assert!(!text.contains("pipeline=\"gone\""), "{text}");
        assert_eq!(text.matches("pipeline=\"kept\"").count(), kept_series);
        assert_eq!(
            kept_series,
            9 + 4 + 15,
            "lag 2, committed 1, queue 1, jobs 2, commits, errors, oldest; 2 conditions × \
             2 statuses; a series for each of the 15 problem reasons"
        );
    }

    #[test]
    fn conditions_and_problems_are_reported_as_the_pipeline_has_them() {
        let metrics = Metrics::default();
        let series = |metrics: &Metrics, name: &str, labels: &str| {
            let line = format!("blocksmith_{name}{{namespace=\"ns\",pipeline=\"p\",{labels}}} ");
            let text = metrics.encode();
            text.lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("no {line} in {text}"))
                .to_string()
        };
        let degraded = [("Ready", "False"), ("Degraded", "True")];
        let problems = [
            Reason::JobFailed,
            Reason::BuildersUnavailable,
            Reason::JobFailed,
        ];
        metrics.pipeline_status("ns", "p", degraded, problems);
        let condition = |c: &str, s: &str| {
            series(
                &metrics,
                "pipeline_condition",
                &format!("condition=\"{c}\",status=\"{s}\""),
            )
        };
        let problem = |r: &str| series(&metrics, "pipeline_problems", &format!("reason=\"{r}\""));
        assert_eq!(condition("Ready", "False"), "1");
        assert_eq!(condition("Ready", "True"), "0");
        assert_eq!(condition("Degraded", "True"), "1");
        assert_eq!(problem("JobFailed"), "2");
        assert_eq!(problem("BuildersUnavailable"), "1");
        assert_eq!(problem("KafkaUnavailable"), "0");

        // Recovered: every series stays, with the new values.
        let healthy = [("Ready", "True"), ("Degraded", "False")];
        metrics.pipeline_status("ns", "p", healthy, []);
        assert_eq!(condition("Ready", "True"), "1");
        assert_eq!(condition("Ready", "False"), "0");
        assert_eq!(condition("Degraded", "True"), "0");
        assert_eq!(problem("JobFailed"), "0");
        assert_eq!(problem("BuildersUnavailable"), "0");
    }

    #[test]
    fn the_leader_gauge_follows_leadership_and_starts_at_zero() {
        let metrics = Metrics::default();
        let leader = |m: &Metrics| {
            m.encode()
                .lines()
                .find_map(|l| l.strip_prefix("blocksmith_leader "))
                .map(str::to_string)
        };
        assert_eq!(leader(&metrics).as_deref(), Some("0"), "a standby");
        metrics.set_leader(true);
        assert_eq!(leader(&metrics).as_deref(), Some("1"));
        metrics.set_leader(false);
        assert_eq!(leader(&metrics).as_deref(), Some("0"));
    }

    #[test]
    fn deadlines_with_the_default_settings() {
        assert_eq!(
            reconcile_deadline(Duration::from_secs(10)),
            Duration::from_secs(388)
        );
        assert_eq!(
            controller_idle_deadline(Duration::from_secs(10), Duration::from_millis(500)),
            Duration::from_millis(61_500)
        );
        // A short poll interval still allows for the 5 s requeue of a pipeline with problems.
        assert_eq!(
            controller_idle_deadline(Duration::from_secs(1), Duration::ZERO),
            Duration::from_secs(45)
        );
    }
}
