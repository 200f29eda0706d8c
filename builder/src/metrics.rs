//! The builder's Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::time::Duration;

pub use blocksmith_runtime::metrics::KindLabels;
use blocksmith_runtime::metrics::{ApiWrites, Families, register, registered};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::runner::BuildError;

/// The builder's metrics, `/healthz` and `/readyz`.
pub type Metrics = blocksmith_runtime::metrics::Metrics<BuilderMetrics>;

/// The builder's own metric families.
pub struct BuilderMetrics {
    claims: Counter,
    claim_conflicts: Counter,
    jobs_succeeded: Counter,
    jobs_failed: Family<KindLabels, Counter>,
    lease_losses: Counter,
    records_written: Counter,
    bytes_written: Counter,
    bytes_read: Counter,
    api_writes: ApiWrites,
    job_seconds: Histogram,
}

impl Families for BuilderMetrics {
    const PREFIX: &'static str = "blocksmith_builder";

    fn register(r: &mut Registry) -> Self {
        BuilderMetrics {
            claims: registered(r, "claims", "Jobs claimed"),
            claim_conflicts: registered(r, "claim_conflicts", "Claims lost to another builder"),
            jobs_succeeded: registered(r, "jobs_succeeded", "Jobs completed"),
            jobs_failed: registered(r, "jobs_failed", "Failed attempts by error kind"),
            lease_losses: registered(r, "lease_losses", "Leases taken away while building"),
            records_written: registered(r, "records_written", "Records written to blocks"),
            bytes_written: registered(r, "block_bytes_written", "Bytes of Parquet written"),
            bytes_read: registered(
                r,
                "kafka_bytes_read",
                "Bytes of keys, values and headers read",
            ),
            api_writes: ApiWrites::registered(r),
            job_seconds: register(
                r,
                "job_duration_seconds",
                "Time from claim to report",
                Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            ),
        }
    }

    fn api_writes(&self) -> &ApiWrites {
        &self.api_writes
    }
}

impl BuilderMetrics {
    pub fn claimed(&self) {
        self.claims.inc();
    }
    pub fn claim_conflict(&self) {
        self.claim_conflicts.inc();
    }
    pub fn lease_lost(&self) {
        self.lease_losses.inc();
    }
    pub fn built(&self, records: i64, bytes: i64, read_bytes: u64) {
        self.jobs_succeeded.inc();
        self.records_written.inc_by(records.max(0) as u64);
        self.bytes_written.inc_by(bytes.max(0) as u64);
        self.bytes_read.inc_by(read_bytes);
    }
    /// A job's outcome was reported `took` after its claim.
    pub fn reported(&self, took: Duration) {
        self.job_seconds.observe(took.as_secs_f64());
    }
    pub fn failed(&self, e: &BuildError) {
        let kind = match e {
            BuildError::Read(_) => "kafka",
            BuildError::Block(_) => "parquet",
            BuildError::Store(_) => "object_store",
            BuildError::RecordTooLarge(_) => "record_too_large",
            BuildError::OtherSource(_) => "other_source",
            BuildError::Io(_) => "io",
            BuildError::Cancelled => "cancelled",
        };
        self.jobs_failed
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }
}
