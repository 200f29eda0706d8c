//! Leader election with a `coordination.k8s.io/v1` Lease, so several operator replicas can
//! run and exactly one acts. Expiry is judged by how long the lease record has gone
//! unchanged as observed locally (as client-go does), not by comparing clocks.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// What this replica last saw of the lease: its resourceVersion and when it changed.
struct Observation {
    resource_version: Option<String>,
    since: Instant,
}

impl LeaderElector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        let mut seen = Observation {
            resource_version: None,
            since: Instant::now(),
        };
        loop {
            match self.try_acquire(&mut seen).await {
                Ok(true) => {
                    info!(identity = %self.identity, lease = %self.name, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews the lease until a renewal fails for longer than the lease duration or
    /// another holder is seen; then returns. The caller must stop acting at once.
    pub async fn hold(&self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            match self.renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.identity, "lease taken by another replica");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "renewing leader lease");
                    // Stop before the lease can expire for the others: leave a margin.
                    if last_renewal.elapsed() + self.retry_period() >= self.duration {
                        return;
                    }
                }
            }
        }
    }

    fn retry_period(&self) -> Duration {
        self.duration / 3
    }

    fn lease(&self, transitions: i32, acquire: Option<MicroTime>, rv: Option<String>) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: rv,
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration.as_secs() as i32),
                acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    async fn try_acquire(&self, seen: &mut Observation) -> kube::Result<bool> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            return match self
                .api
                .create(&PostParams::default(), &self.lease(0, None, None))
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if current.metadata.resource_version != seen.resource_version {
            seen.resource_version = current.metadata.resource_version.clone();
            seen.since = Instant::now();
        }
        let held_by_me = holder == self.identity;
        let expired = holder.is_empty() || seen.since.elapsed() > self.duration;
        if !held_by_me && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me);
        let acquire = held_by_me.then_some(spec.acquire_time).flatten();
        let lease = self.lease(
            transitions,
            acquire,
            current.metadata.resource_version.clone(),
        );
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Ok(false): someone else holds the lease now.
    async fn renew(&self) -> kube::Result<bool> {
        let current = self.api.get(&self.name).await?;
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let lease = self.lease(
            spec.lease_transitions.unwrap_or(0),
            spec.acquire_time,
            current.metadata.resource_version.clone(),
        );
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
