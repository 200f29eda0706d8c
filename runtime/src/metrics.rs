//! What the binaries' metrics have in common: the registry `/metrics` encodes, the count of
//! Kubernetes API writes, and the [`Health`] behind `/healthz` and `/readyz`. Each binary
//! brings its own metric families (see [`Families`]).

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Metric, Registry};

use crate::Health;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// A binary's own metric families.
pub trait Families: Send + Sync + 'static {
    /// Prefix of every metric name, e.g. `blocksmith`.
    const PREFIX: &'static str;

    /// Creates the families, [`ApiWrites`] among them, and registers them in `registry`
    /// (`/metrics` lists them in that order).
    fn register(registry: &mut Registry) -> Self;

    fn api_writes(&self) -> &ApiWrites;
}

/// Kubernetes API writes by kind (`api_writes`).
#[derive(Clone, Debug, Default)]
pub struct ApiWrites(Family<KindLabels, Counter>);

impl ApiWrites {
    pub fn registered(registry: &mut Registry) -> Self {
        Self(registered(
            registry,
            "api_writes",
            "Kubernetes API writes by kind",
        ))
    }

    pub fn inc(&self, kind: &str) {
        self.0
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }
}

/// Registers a new `M` as `name` and returns it.
pub fn registered<M: Metric + Clone + Default>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    register(registry, name, help, M::default())
}

/// Registers `metric` as `name` and returns it.
pub fn register<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// A process's metrics and health, shared by clones; dereferences to its own families `F`.
pub struct Metrics<F> {
    inner: Arc<Inner<F>>,
}

struct Inner<F> {
    registry: Registry,
    health: Health,
    families: F,
}

impl<F> Clone for Metrics<F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<F: Families> Default for Metrics<F> {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(F::PREFIX);
        let families = F::register(&mut registry);
        Self {
            inner: Arc::new(Inner {
                registry,
                health: Health::default(),
                families,
            }),
        }
    }
}

impl<F> Deref for Metrics<F> {
    type Target = F;

    fn deref(&self) -> &F {
        &self.inner.families
    }
}

impl<F: Families> Metrics<F> {
    /// The text `/metrics` answers.
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
        self.inner.families.api_writes().inc(kind);
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
    pub async fn serve(self, addr: SocketAddr) -> anyhow::Result<()> {
        let health = self.inner.health.clone();
        crate::serve_probes(addr, move || self.encode(), health).await
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::gauge::Gauge;

    use super::*;

    /// A gauge, the API writes, and a counter, registered in that order.
    struct Test(Gauge, ApiWrites, Counter);

    impl Families for Test {
        const PREFIX: &'static str = "test";

        fn register(r: &mut Registry) -> Self {
            let first = registered(r, "first", "Registered first");
            Test(
                first,
                ApiWrites::registered(r),
                registered(r, "last", "Last"),
            )
        }

        fn api_writes(&self) -> &ApiWrites {
            &self.1
        }
    }

    #[test]
    fn families_and_api_writes_are_encoded_in_registration_order() {
        let metrics = Metrics::<Test>::default();
        metrics.0.set(3);
        metrics.2.inc();
        metrics.api_write("claim");
        metrics.clone().api_write("claim");
        let text = metrics.encode();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "test_first 3",
                r#"test_api_writes_total{kind="claim"} 2"#,
                "test_last_total 1",
            ],
            "{text}"
        );
    }

    #[test]
    fn readiness_is_shared_by_clones() {
        let metrics = Metrics::<Test>::default();
        assert!(!metrics.is_ready());
        metrics.clone().set_ready();
        assert!(metrics.is_ready() && metrics.health().is_ready());
    }
}
