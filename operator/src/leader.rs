//! Leader election with a `coordination.k8s.io/v1` Lease, so several operator replicas can
//! run and exactly one acts. Expiry is judged by how long the lease record has gone
//! unchanged as observed locally (as client-go does), not by comparing clocks, and by the
//! duration the record itself states.
//!
//! The leader acts only within its [`Leadership`]: two thirds of the lease from the moment
//! its last successful write of the lease was sent. Another replica can take the lease over
//! only after seeing the record unchanged for the whole lease, so the leader has stopped a
//! third of the lease before (the margin for clocks running at different rates).

use std::sync::Arc;
use std::time::{Duration, Instant};

use blocksmith_runtime::Health;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
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
    leadership: Leadership,
}

/// How long this replica may still act as the leader, as far as it can be sure: the lease's
/// acting window from when its last successful acquisition or renewal was sent (the write
/// took effect no earlier). Shared with whatever must stop when leadership does, such as the
/// Kafka commits, which no Kubernetes precondition fences.
#[derive(Clone, Debug)]
pub struct Leadership {
    renewed: Arc<watch::Sender<Option<Instant>>>,
    window: Duration,
}

impl Leadership {
    fn new(window: Duration) -> Self {
        Self {
            renewed: Arc::new(watch::Sender::new(None)),
            window,
        }
    }

    fn renewed(&self, sent: Instant) {
        self.renewed.send_replace(Some(sent));
    }

    /// When this replica must have stopped acting; `None` before it first led.
    pub fn acting_until(&self) -> Option<Instant> {
        self.renewed.borrow().map(|sent| sent + self.window)
    }

    /// Whether this replica surely leads for `work` more (e.g. a commit bounded by it).
    pub fn confirmed_for(&self, work: Duration) -> bool {
        self.acting_until()
            .is_some_and(|until| Instant::now() + work <= until)
    }

    /// Waits up to `patience` for a renewal that makes [`Self::confirmed_for`] `work` true.
    pub async fn wait_confirmed_for(&self, work: Duration, patience: Duration) -> bool {
        let mut renewals = self.renewed.subscribe();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if self.confirmed_for(work) {
                return true;
            }
            match tokio::time::timeout_at(deadline, renewals.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }
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
            leadership: Leadership::new(acting_window(duration)),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// This replica's leadership, for those that must stop acting with it.
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// How often the leader renews the lease and a standby tries to acquire it.
    pub fn renew_period(&self) -> Duration {
        self.duration / 6
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
            let sent = Instant::now();
            match tokio::time::timeout(self.duration, self.try_acquire(&mut seen)).await {
                Ok(Ok(true)) => {
                    self.leadership.renewed(sent);
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
            tokio::time::sleep(self.renew_period()).await;
        }
    }

    /// Renews the lease until the acting window of the last successful acquisition or
    /// renewal runs out, or another holder is seen; then returns. The caller must stop acting
    /// at once. The window counts from the acquisition, not from when this is first called.
    ///
    /// A renewal still unanswered when the window ends counts as failed: an unreachable API
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
        loop {
            let Some(until) = self.leadership.acting_until() else {
                return;
            };
            let next = (Instant::now() + self.renew_period()).min(until);
            tokio::time::sleep_until(next.into()).await;
            if Instant::now() >= until {
                warn!(identity = %self.identity, "no lease renewal succeeded in time");
                return;
            }
            let sent = Instant::now();
            match tokio::time::timeout_at(until.into(), self.renew()).await {
                Ok(Ok(true)) => {
                    self.leadership.renewed(sent);
                    self.health.beat(LEASE_HEARTBEAT);
                }
                Ok(Ok(false)) => {
                    warn!(identity = %self.identity, "lease taken by another replica");
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "renewing leader lease"),
                Err(_) => warn!("renewing leader lease: no answer from the API server"),
            }
        }
    }

    /// How long `/healthz` allows between renewals while leading: the lease duration plus
    /// one renew period (17.5 s for the default 15 s lease).
    ///
    /// A renewal is attempted every renew period (a sixth of the lease), and [`Self::hold`]
    /// returns — the process exits — once none has succeeded for the acting window (two
    /// thirds of the lease), even when the renewal request hangs. So a live `hold` never
    /// leaves its heartbeat older than that; the lease and a renew period means `hold` is not
    /// running at all (its task is blocked).
    pub fn renewal_deadline(&self) -> Duration {
        self.duration + self.renew_period()
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
        let expired = lease_expired(
            &holder,
            seen.since.elapsed(),
            spec.lease_duration_seconds,
            self.duration,
        );
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

    /// Gives the lease up, for a replica that has stopped acting (on SIGTERM), so that a
    /// standby takes over at its next attempt instead of waiting the lease out. Best effort:
    /// bounded by a renew period, and the lease expires anyway.
    pub async fn release(&self) {
        let released = tokio::time::timeout(
            self.renew_period(),
            self.rewrite_own(|spec| spec.holder_identity = None),
        )
        .await;
        match released {
            Ok(Ok(true)) => info!(identity = %self.identity, "released the leader lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(error = %e, "releasing the leader lease"),
            Err(_) => warn!("releasing the leader lease: no answer from the API server"),
        }
    }

    /// Ok(false): someone else holds the lease now.
    async fn renew(&self) -> kube::Result<bool> {
        self.rewrite_own(|_| {}).await
    }

    /// Writes the lease again as this replica's, renewed now and changed by `edit`, if this
    /// replica still holds it. Ok(false): someone else holds it, or wrote it since it was read.
    async fn rewrite_own(&self, edit: impl FnOnce(&mut LeaseSpec)) -> kube::Result<bool> {
        let current = self.api.get(&self.name).await?;
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let mut lease = self.lease(
            spec.lease_transitions.unwrap_or(0),
            spec.acquire_time,
            current.metadata.resource_version.clone(),
        );
        if let Some(spec) = lease.spec.as_mut() {
            edit(spec);
        }
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

/// The part of a lease its holder acts in: the rest is the margin before others may take
/// it over.
pub fn acting_window(lease: Duration) -> Duration {
    lease * 2 / 3
}

/// Whether a lease held by `holder`, unchanged for `unchanged_for` as seen here, may be taken
/// over: judged by the duration the record states (its holder's), not this replica's own
/// setting, which may differ during a rollout that changes it.
fn lease_expired(
    holder: &str,
    unchanged_for: Duration,
    record_seconds: Option<i32>,
    own: Duration,
) -> bool {
    let duration = record_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(own, Duration::from_secs);
    holder.is_empty() || unchanged_for > duration
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
        assert_eq!(elector.renewal_deadline(), Duration::from_millis(3500));
        let started = Instant::now();
        elector.leadership.renewed(started);
        let hold = elector.hold();
        tokio::pin!(hold);
        // Leading: the heartbeat is armed.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut hold)
                .await
                .is_err()
        );
        assert!(health.is_armed(LEASE_HEARTBEAT));
        // The renewals never get an answer; leadership ends 2 s (the acting window) after
        // the last renewal (the acquisition here), a third of the lease before it could
        // expire.
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
    async fn leadership_counts_from_the_acquisition_not_from_when_holding_starts() {
        // Acquired 1.5 s ago (e.g. the caches took that long to sync): with a 3 s lease the
        // acting window ends 0.5 s from now, however late `hold` starts.
        let (client, server) = frozen_apiserver().await;
        let duration = Duration::from_secs(3);
        let elector = LeaderElector::new(client, "ns", "lease", "me", duration, Health::default());
        let started = Instant::now();
        elector
            .leadership
            .renewed(started - Duration::from_millis(1500));
        assert!(!elector.leadership().confirmed_for(Duration::from_secs(1)));
        assert!(
            elector
                .leadership()
                .confirmed_for(Duration::from_millis(300))
        );
        tokio::time::timeout(Duration::from_secs(10), elector.hold())
            .await
            .expect("hold returns");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(900), "{took:?}");
        assert!(!elector.leadership().confirmed_for(Duration::ZERO));
        server.abort();
    }

    #[tokio::test]
    async fn work_waits_for_a_renewal_that_leaves_it_time_to_finish() {
        let leadership = Leadership::new(Duration::from_secs(2));
        let work = Duration::from_secs(1);
        assert!(
            !leadership.wait_confirmed_for(work, Duration::ZERO).await,
            "never led"
        );
        leadership.renewed(Instant::now() - Duration::from_millis(1500));
        assert!(!leadership.confirmed_for(work));
        let renewer = leadership.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            renewer.renewed(Instant::now());
        });
        assert!(
            leadership
                .wait_confirmed_for(work, Duration::from_secs(5))
                .await
        );
        // No renewal comes: refused once the patience runs out.
        leadership.renewed(Instant::now() - Duration::from_millis(1500));
        let started = Instant::now();
        assert!(
            !leadership
                .wait_confirmed_for(work, Duration::from_millis(200))
                .await
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn a_lease_is_judged_by_the_duration_its_record_states() {
        let own = Duration::from_secs(3);
        let unchanged = Duration::from_secs(10);
        assert!(lease_expired("a", unchanged, Some(5), own));
        assert!(
            !lease_expired("a", unchanged, Some(60), own),
            "the holder's longer lease counts, not this replica's"
        );
        assert!(lease_expired("a", unchanged, None, own));
        assert!(!lease_expired("a", Duration::from_secs(2), None, own));
        assert!(
            lease_expired("", Duration::ZERO, Some(60), own),
            "no holder"
        );
        assert!(
            lease_expired("a", unchanged, Some(-1), own),
            "a nonsense duration falls back to this replica's"
        );
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
