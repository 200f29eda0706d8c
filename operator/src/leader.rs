//! Leader election with a `coordination.k8s.io/v1` Lease, so several operator replicas can
//! run and exactly one acts. Expiry is judged by how long the lease record has gone
//! unchanged as observed locally (as client-go does), not by comparing clocks.

use std::time::{Duration, Instant};

use blocksmith_runtime::Health;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// The lease renewals' heartbeat on `/healthz`: armed while this replica leads, beaten on
/// every renewal; see [`LeaderElector::renewal_deadline`].
pub const LEASE_HEARTBEAT: &str = "leader-lease";

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    health: Health,
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
        health: Health,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            health,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease. Calls `standby` after every attempt that
    /// got an answer from the API server and found the lease held by another replica.
    ///
    /// An attempt without an answer within the lease duration is abandoned and retried (on
    /// a new connection: a connection whose server went away can leave a request unanswered
    /// for many minutes).
    pub async fn acquire(&self, mut standby: impl FnMut()) {
        let mut seen = Observation {
            resource_version: None,
            since: Instant::now(),
        };
        loop {
            match tokio::time::timeout(self.duration, self.try_acquire(&mut seen)).await {
                Ok(Ok(true)) => {
                    info!(identity = %self.identity, lease = %self.name, "became leader");
                    return;
                }
                Ok(Ok(false)) => standby(),
                Ok(Err(e)) => warn!(error = %e, "leader election"),
                Err(_) => warn!(
                    timeout = ?self.duration,
                    "leader election: no answer from the API server"
                ),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews the lease until renewals have failed for the lease duration less one retry
    /// period, or another holder is seen; then returns. The caller must stop acting at once.
    ///
    /// A renewal still unanswered when that time is up counts as failed: an unreachable API
    /// server can leave a request unanswered for many minutes, and this replica must not go
    /// on acting after the others may have taken the lease over.
    ///
    /// While it runs, [`LEASE_HEARTBEAT`] is armed and beaten on every renewal.
    pub async fn hold(&self) {
        self.health.arm(LEASE_HEARTBEAT, self.renewal_deadline());
        self.renew_until_lost().await;
        self.health.disarm(LEASE_HEARTBEAT);
    }

    async fn renew_until_lost(&self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            // Stop before the lease can expire for the others: leave a margin.
            let give_up = last_renewal + self.duration - self.retry_period();
            match tokio::time::timeout_at(give_up.into(), self.renew()).await {
                Ok(Ok(true)) => {
                    last_renewal = Instant::now();
                    self.health.beat(LEASE_HEARTBEAT);
                    continue;
                }
                Ok(Ok(false)) => {
                    warn!(identity = %self.identity, "lease taken by another replica");
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "renewing leader lease"),
                Err(_) => warn!("renewing leader lease: no answer from the API server"),
            }
            if last_renewal.elapsed() + self.retry_period() >= self.duration {
                return;
            }
        }
    }

    /// How long `/healthz` allows between renewals while leading: the lease duration plus
    /// one retry period (20 s for the default 15 s lease).
    ///
    /// A renewal is attempted every retry period (a third of the lease), and [`Self::hold`]
    /// returns — the process exits — once none has succeeded for the lease duration less
    /// one retry period, even when the renewal request hangs. So a live `hold` never leaves
    /// its heartbeat older than that; one retry period more means `hold` is not running at
    /// all (its task is blocked).
    pub fn renewal_deadline(&self) -> Duration {
        self.duration + self.retry_period()
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
            let lease = self.lease(0, None, None);
            return written(self.api.create(&PostParams::default(), &lease).await);
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
        self.replace(&lease).await
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
        self.replace(&lease).await
    }

    /// Ok(false): another replica wrote the lease since it was read.
    async fn replace(&self, lease: &Lease) -> kube::Result<bool> {
        written(
            self.api
                .replace(&self.name, &PostParams::default(), lease)
                .await,
        )
    }
}

/// Whether a write of the lease took effect: Ok(false) when another replica's write came
/// first (409 Conflict).
fn written(result: kube::Result<Lease>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use blocksmith_runtime::test_support::frozen_apiserver;

    use super::*;

    #[tokio::test]
    async fn an_unanswered_renewal_ends_leadership_before_the_lease_can_expire() {
        let (client, server) = frozen_apiserver().await;
        let health = Health::default();
        let duration = Duration::from_secs(3);
        let elector = LeaderElector::new(client, "ns", "lease", "me", duration, health.clone());
        assert_eq!(elector.renewal_deadline(), Duration::from_secs(4));
        let started = Instant::now();
        let hold = elector.hold();
        tokio::pin!(hold);
        // Leading: the heartbeat is armed.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut hold)
                .await
                .is_err()
        );
        assert!(health.is_armed(LEASE_HEARTBEAT));
        // The renewal after 1 s never gets an answer; leadership ends 2 s after the last
        // renewal (the acquisition here), a retry period before the lease could expire.
        tokio::time::timeout(Duration::from_secs(10), hold)
            .await
            .expect("hold returns");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < duration,
            "{took:?}"
        );
        assert!(!health.is_armed(LEASE_HEARTBEAT));
        server.abort();
    }

    #[tokio::test]
    async fn a_replica_the_api_server_does_not_answer_is_no_standby() {
        let (client, server) = frozen_apiserver().await;
        let elector = LeaderElector::new(
            client,
            "ns",
            "lease",
            "me",
            Duration::from_secs(1),
            Health::default(),
        );
        let mut standby = 0;
        // Attempts are abandoned after the lease duration and retried; none gets an answer,
        // so `standby` (which makes the replica ready) is never called.
        let waited = tokio::time::timeout(
            Duration::from_millis(2500),
            elector.acquire(|| standby += 1),
        )
        .await;
        assert!(waited.is_err());
        assert_eq!(standby, 0);
        server.abort();
    }
}
