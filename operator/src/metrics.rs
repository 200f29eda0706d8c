//! Prometheus metrics (`blocksmith_` prefix, units in names) and the HTTP endpoints
//! `/metrics`, `/healthz`, `/readyz`, with the deadlines `/healthz` judges the operator by.

use std::sync::Arc;
use std::time::Duration;

use blocksmith_runtime::Health;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    lag: Family<PartitionLabels, Gauge>,
    committed: Family<PartitionLabels, Gauge>,
    queue_depth: Family<PipelineLabels, Gauge>,
    jobs: Family<PhaseLabels, Gauge>,
    commits: Family<PipelineLabels, Counter>,
    reconcile_errors: Family<KindLabels, Counter>,
    kafka_errors: Family<PipelineLabels, Counter>,
    api_writes: Family<KindLabels, Counter>,
    reconcile_seconds: Histogram,
    health: Health,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("blocksmith");
        let inner = Inner {
            registry: Registry::default(),
            lag: Family::default(),
            committed: Family::default(),
            queue_depth: Family::default(),
            jobs: Family::default(),
            commits: Family::default(),
            reconcile_errors: Family::default(),
            kafka_errors: Family::default(),
            api_writes: Family::default(),
            // Fine buckets (×1.5 from 1 ms to ~2 min) so p50/p99 read off them are within 25%.
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 1.5, 30)),
            health: Health::default(),
        };
        registry.register(
            "partition_lag_records",
            "High watermark minus committed offset",
            inner.lag.clone(),
        );
        registry.register(
            "committed_offset",
            "Committed consumer-group offset",
            inner.committed.clone(),
        );
        registry.register(
            "queue_depth_jobs",
            "Claimable BlockJobs",
            inner.queue_depth.clone(),
        );
        registry.register("jobs", "BlockJobs by phase", inner.jobs.clone());
        registry.register("commits", "Offset commits", inner.commits.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error kind",
            inner.reconcile_errors.clone(),
        );
        registry.register(
            "kafka_errors",
            "Kafka request failures",
            inner.kafka_errors.clone(),
        );
        registry.register(
            "api_writes",
            "Kubernetes API writes by kind",
            inner.api_writes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            inner.reconcile_seconds.clone(),
        );
        Self {
            inner: Arc::new(Inner { registry, ..inner }),
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("encode metrics");
        out
    }

    /// `/readyz` answers ok from now on.
    pub fn set_ready(&self) {
        self.inner.health.set_ready();
    }

    pub fn is_ready(&self) -> bool {
        self.inner.health.is_ready()
    }

    /// What `/healthz` and `/readyz` report.
    pub fn health(&self) -> &Health {
        &self.inner.health
    }

    pub fn api_write(&self, kind: &str) {
        self.inner
            .api_writes
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn reconcile_error(&self, kind: &str) {
        self.inner
            .reconcile_errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn observe_reconcile(&self, seconds: f64) {
        self.inner.reconcile_seconds.observe(seconds);
    }

    pub fn kafka_error(&self, ns: &str, pipeline: &str) {
        self.inner
            .kafka_errors
            .get_or_create(&pipeline_labels(ns, pipeline))
            .inc();
    }

    pub fn commit(&self, ns: &str, pipeline: &str) {
        self.inner
            .commits
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
        self.inner.lag.get_or_create(&l).set(lag);
        if let Some(c) = committed {
            self.inner.committed.get_or_create(&l).set(c);
        }
    }

    pub fn queue(&self, ns: &str, pipeline: &str, depth: i64, by_phase: &[(&str, i64)]) {
        self.inner
            .queue_depth
            .get_or_create(&pipeline_labels(ns, pipeline))
            .set(depth);
        for (phase, n) in by_phase {
            let l = PhaseLabels {
                namespace: ns.into(),
                pipeline: pipeline.into(),
                phase: (*phase).into(),
            };
            self.inner.jobs.get_or_create(&l).set(*n);
        }
    }

    /// Queue depth of one pipeline as last reconciled (for the external metrics API).
    pub fn queue_depth(&self, ns: &str, pipeline: &str) -> Option<i64> {
        self.inner
            .queue_depth
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

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, metrics: Metrics) -> anyhow::Result<()> {
    let m = metrics.clone();
    blocksmith_runtime::serve_probes(addr, move || m.encode(), metrics.inner.health.clone()).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
