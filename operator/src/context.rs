//! What every reconcile shares: the clients, the job cache, metrics and settings.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use blocksmith_builder::store::OpenStores;
use blocksmith_crds::BlockJob;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::DynamicObject;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::Store;

use crate::builders::BuilderApis;
use crate::freshness::Arrivals;
use crate::jobs::MANAGER;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::offsets::OffsetClients;
use crate::output::Confirmations;
use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
        }
    }
}

/// The caches reconciles read instead of the API server.
pub struct Caches {
    pub jobs: Store<BlockJob>,
    pub builders: Store<Deployment>,
    /// The builders' HPAs, where the cluster serves an HPA API.
    pub autoscalers: Option<Store<DynamicObject>>,
}

pub struct Context {
    pub client: kube::Client,
    /// Every BlockJob the operator watches, kept current by a reflector.
    pub jobs: Store<BlockJob>,
    /// The builder Deployments, kept current by a reflector: one deleted behind the
    /// operator's back is applied again.
    pub builders: Store<Deployment>,
    /// The builders' HPAs, kept current by a reflector where the cluster serves an HPA API.
    pub autoscalers: Option<Store<DynamicObject>>,
    pub metrics: Metrics,
    pub reporter: Reporter,
    /// How often lag is polled when nothing else wakes the pipeline.
    pub poll_interval: Duration,
    /// How often an idle pipeline's committed offsets are committed again, so that Kafka
    /// does not expire them (`offsets.retention.minutes`).
    pub offset_refresh: Duration,
    pub kafka_timeout: Duration,
    pub kafka: OffsetClients,
    /// Which HPA and PodDisruptionBudget APIs the cluster serves (discovered at start-up).
    pub builder_apis: BuilderApis,
    /// What was last applied for each pipeline's builders, so unchanged specs cost no writes.
    pub builders_applied: Mutex<HashMap<String, String>>,
    /// Succeeded jobs whose manifests the output has confirmed.
    pub confirmed_blocks: Confirmations,
    /// The outputs read to confirm blocks, kept open between passes.
    pub output_stores: OpenStores,
    /// What pipelines may name (images, ServiceAccounts, Secrets).
    pub policy: Policy,
    /// When each pipeline partition's records were first seen, by `namespace/pipeline`.
    pub arrivals: Mutex<HashMap<String, HashMap<i32, Arrivals>>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        caches: Caches,
        metrics: Metrics,
        poll_interval: Duration,
        offset_refresh: Duration,
        kafka_timeout: Duration,
        builder_apis: BuilderApis,
    ) -> Self {
        Self {
            client,
            jobs: caches.jobs,
            builders: caches.builders,
            autoscalers: caches.autoscalers,
            metrics,
            reporter: Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            poll_interval,
            offset_refresh,
            kafka_timeout,
            kafka: OffsetClients::new(kafka_timeout),
            builder_apis,
            builders_applied: Mutex::default(),
            confirmed_blocks: Confirmations::default(),
            output_stores: OpenStores::default(),
            policy: Policy::default(),
            arrivals: Mutex::default(),
        }
    }

    /// Holds pipelines to `policy`.
    pub fn with_policy(self, policy: Policy) -> Self {
        Self { policy, ..self }
    }

    /// Commits only within `leadership` (see [`OffsetClients::fenced_by`]).
    pub fn fenced_by(self, leadership: Leadership, patience: Duration) -> Self {
        Self {
            kafka: self.kafka.fenced_by(leadership, patience),
            ..self
        }
    }
}
