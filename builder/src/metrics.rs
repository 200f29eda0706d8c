//! The builder's Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::sync::Arc;
use std::time::Duration;

use blocksmith_runtime::Health;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::runner::BuildError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    claims: Counter,
    claim_conflicts: Counter,
    jobs_succeeded: Counter,
    jobs_failed: Family<KindLabels, Counter>,
    lease_losses: Counter,
    records_written: Counter,
    bytes_written: Counter,
    bytes_read: Counter,
    job_seconds: Histogram,
    api_writes: Family<KindLabels, Counter>,
    health: Health,
}

impl Default for Inner {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("blocksmith_builder");
        let m = Inner {
            registry: Registry::default(),
            claims: Counter::default(),
            claim_conflicts: Counter::default(),
            jobs_succeeded: Counter::default(),
            jobs_failed: Family::default(),
            lease_losses: Counter::default(),
            records_written: Counter::default(),
            bytes_written: Counter::default(),
            bytes_read: Counter::default(),
            job_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            api_writes: Family::default(),
            health: Health::default(),
        };
        registry.register("claims", "Jobs claimed", m.claims.clone());
        registry.register(
            "claim_conflicts",
            "Claims lost to another builder",
            m.claim_conflicts.clone(),
        );
        registry.register("jobs_succeeded", "Jobs completed", m.jobs_succeeded.clone());
        registry.register(
            "jobs_failed",
            "Failed attempts by error kind",
            m.jobs_failed.clone(),
        );
        registry.register(
            "lease_losses",
            "Leases taken away while building",
            m.lease_losses.clone(),
        );
        registry.register(
            "records_written",
            "Records written to blocks",
            m.records_written.clone(),
        );
        registry.register(
            "block_bytes_written",
            "Bytes of Parquet written",
            m.bytes_written.clone(),
        );
        registry.register(
            "kafka_bytes_read",
            "Bytes of keys, values and headers read",
            m.bytes_read.clone(),
        );
        registry.register(
            "api_writes",
            "Kubernetes API writes by kind",
            m.api_writes.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Time from claim to report",
            m.job_seconds.clone(),
        );
        Inner { registry, ..m }
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
    pub fn claimed(&self) {
        self.inner.claims.inc();
    }
    pub fn claim_conflict(&self) {
        self.inner.claim_conflicts.inc();
    }
    pub fn lease_lost(&self) {
        self.inner.lease_losses.inc();
    }
    pub fn built(&self, records: i64, bytes: i64, read_bytes: u64, took: Duration) {
        self.inner.jobs_succeeded.inc();
        self.inner.records_written.inc_by(records.max(0) as u64);
        self.inner.bytes_written.inc_by(bytes.max(0) as u64);
        self.inner.bytes_read.inc_by(read_bytes);
        self.inner.job_seconds.observe(took.as_secs_f64());
    }
    pub fn failed(&self, e: &BuildError) {
        let kind = match e {
            BuildError::Read(_) => "kafka",
            BuildError::Block(_) => "parquet",
            BuildError::Store(_) => "object_store",
            BuildError::RecordTooLarge(_) => "record_too_large",
            BuildError::OtherCluster(_) => "other_cluster",
            BuildError::Io(_) => "io",
            BuildError::Cancelled => "cancelled",
        };
        self.inner
            .jobs_failed
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, metrics: Metrics) -> anyhow::Result<()> {
    let m = metrics.clone();
    blocksmith_runtime::serve_probes(addr, move || m.encode(), metrics.inner.health.clone()).await
}
