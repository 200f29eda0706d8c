//! The builder's loops: watch the pipeline's unfinished jobs, claim the most urgent claimable
//! one, build it while renewing the lease, report the outcome — and report nothing once the
//! lease is lost. A builder runs `concurrent_jobs` such loops ("slots") over one job cache,
//! so that one job's reading overlaps another's encoding, fsync or upload.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blocksmith_crds::BlockJob;
use blocksmith_crds::domain::{
    LABEL_PHASE, LABEL_PIPELINE, is_claimable, lease_expiry, renew_interval,
};
use blocksmith_runtime::Health;
use futures::StreamExt;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::lease::{Claim, Held, LeaseClient, LeaseError};
use crate::metrics::Metrics;
use crate::runner::{BuildError, BuildSettings, build_block};

pub struct Worker {
    pub client: kube::Client,
    pub lease: LeaseClient,
    pub namespace: String,
    /// Serve only this pipeline's jobs; all pipelines of the namespace when `None`.
    pub pipeline: Option<String>,
    pub settings: BuildSettings,
    pub metrics: Metrics,
    /// Cancelled on SIGTERM: stop claiming, finish or release the current job.
    pub shutdown: CancellationToken,
    /// How long a job in progress may still run after shutdown was requested.
    pub grace: Duration,
    /// Jobs built at once, each by a claim loop of its own.
    pub concurrent_jobs: usize,
}

/// Jobs a builder builds at once unless told otherwise (`--concurrent-jobs`).
pub const DEFAULT_CONCURRENT_JOBS: u8 = 2;

/// One claim loop of a builder, and the names of its heartbeats on `/healthz`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    work_loop: &'static str,
    job_lease: &'static str,
}

impl Slot {
    /// Slot 0 keeps the plain names; the others are numbered (`work-loop-1`, ...).
    fn new(index: usize) -> Slot {
        if index == 0 {
            return Slot {
                work_loop: WORK_LOOP_HEARTBEAT,
                job_lease: JOB_LEASE_HEARTBEAT,
            };
        }
        // Made once per slot at start-up, for the life of the process.
        let name = |base: &str| -> &'static str { format!("{base}-{index}").leak() };
        Slot {
            work_loop: name(WORK_LOOP_HEARTBEAT),
            job_lease: name(JOB_LEASE_HEARTBEAT),
        }
    }
}

/// The claim loop's heartbeat on `/healthz`: armed from the first list of jobs until the loop
/// stops, beaten on every pass; disarmed while a claimed job is being built, when
/// [`JOB_LEASE_HEARTBEAT`] stands for the builder instead.
pub const WORK_LOOP_HEARTBEAT: &str = "work-loop";

/// How long a pass of the claim loop may take before `/healthz` calls the builder stuck:
/// 3 minutes.
///
/// A pass waits at most a second for a change, then tries up to 8 jobs with up to two
/// claims each (an apply, and a GET after a conflict), and after a build reports it in up
/// to 5 apply-and-GET rounds: all Kubernetes requests, which the API server answers or
/// times out within 60 s each (its default request timeout). A pass that has not finished
/// after three such timeouts back to back is waiting on a connection that went dead: the
/// client has no read timeout of its own, so only a restart ends that.
pub const WORK_LOOP_DEADLINE: Duration = Duration::from_secs(180);

/// The lease renewals' heartbeat on `/healthz` while a claimed job is built; see
/// [`job_lease_deadline`].
pub const JOB_LEASE_HEARTBEAT: &str = "job-lease";

/// How long `/healthz` allows between renewals of a job's lease: the lease duration plus
/// one renewal interval (40 s for the default 30 s lease).
///
/// Renewals are attempted every third of the lease, and the renewer gives the lease up —
/// cancelling the build and handing the builder back to its claim loop — once the lease
/// has run out without a successful renewal, also when a renewal request hangs. So a
/// running renewer never leaves its heartbeat older than the lease; one interval more means
/// it is not running at all (it panicked, or the process is blocked).
pub fn job_lease_deadline(lease_duration_seconds: i32) -> Duration {
    Duration::from_secs(lease_duration_seconds.max(0) as u64)
        + renew_interval(lease_duration_seconds)
}

/// Claimable jobs in claim order: partitions with the most claimable jobs (the largest lag)
/// first, then the lowest start offset, so commits can advance.
pub fn claim_order(jobs: &[Arc<BlockJob>], now: Timestamp) -> Vec<Arc<BlockJob>> {
    let claimable: Vec<Arc<BlockJob>> = jobs
        .iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none() && is_claimable(j.status.as_ref(), now))
        .cloned()
        .collect();
    let mut per_partition: HashMap<(String, i32), usize> = HashMap::new();
    for j in &claimable {
        *per_partition
            .entry((j.spec.pipeline.clone(), j.spec.partition))
            .or_default() += 1;
    }
    let mut ordered = claimable;
    ordered.sort_by_key(|j| {
        let depth = per_partition[&(j.spec.pipeline.clone(), j.spec.partition)];
        (
            std::cmp::Reverse(depth),
            j.spec.start_offset,
            j.spec.partition,
        )
    });
    ordered
}

impl Worker {
    pub async fn run(self) -> anyhow::Result<()> {
        let api: Api<BlockJob> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = match &self.pipeline {
            Some(p) => format!("{LABEL_PIPELINE}={p},{LABEL_PHASE}!=Succeeded"),
            None => format!("{LABEL_PIPELINE},{LABEL_PHASE}!=Succeeded"),
        };
        let (store, writer) = reflector::store();
        let (notify, changed) = watch::channel(());
        let watch = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().labels(&selector)),
        )
        .default_backoff()
        .touched_objects()
        .for_each(move |ev| {
            if let Err(e) = ev {
                warn!(error = %e, "watching jobs");
            }
            notify.send_replace(());
            futures::future::ready(())
        });
        let watch = tokio::spawn(watch);
        // Ready once the jobs were listed.
        store.wait_until_ready().await?;
        self.metrics.set_ready();
        info!(identity = %self.lease.identity(), %selector, "builder ready");

        let taken = std::sync::Mutex::new(HashSet::new());
        let slots = (0..self.concurrent_jobs.max(1))
            .map(|i| self.work_loop(Slot::new(i), &store, changed.clone(), &taken));
        futures::future::join_all(slots).await;
        watch.abort();
        info!("builder stopped");
        Ok(())
    }

    async fn work_loop(
        &self,
        slot: Slot,
        store: &Store<BlockJob>,
        mut changed: watch::Receiver<()>,
        taken: &std::sync::Mutex<HashSet<String>>,
    ) {
        let health = self.metrics.health();
        health.arm(slot.work_loop, WORK_LOOP_DEADLINE);
        while !self.shutdown.is_cancelled() {
            health.beat(slot.work_loop);
            changed.mark_unchanged();
            if !self.claim_and_build(slot, store, taken).await {
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = self.shutdown.cancelled() => {}
                }
            }
        }
        health.disarm(slot.work_loop);
    }

    /// Tries to claim one job and builds it. False when there was nothing to claim. `taken`
    /// holds the jobs the other slots are claiming or building: the job cache may still
    /// show them claimable, and trying them would only lose a compare-and-swap.
    async fn claim_and_build(
        &self,
        slot: Slot,
        store: &Store<BlockJob>,
        taken: &std::sync::Mutex<HashSet<String>>,
    ) -> bool {
        let candidates = claim_order(&store.state(), Timestamp::now());
        for candidate in candidates.into_iter().take(8) {
            let name = candidate.name_any();
            if !taken.lock().unwrap().insert(name.clone()) {
                continue;
            }
            let built = self.claim_and_build_one(slot, (*candidate).clone()).await;
            taken.lock().unwrap().remove(&name);
            if built {
                return true;
            }
        }
        false
    }

    /// Claims `job` (once more after a stale read) and builds it; false if it was lost.
    async fn claim_and_build_one(&self, slot: Slot, mut job: BlockJob) -> bool {
        for _ in 0..2 {
            let lease_seconds = job.spec.lease_duration_seconds;
            match self.lease.claim(&self.client, &job, lease_seconds).await {
                Ok(Claim::Claimed(held)) => {
                    self.metrics.claimed();
                    let span = info_span!("job", job = %held.job.name_any(), partition = held.job.spec.partition, attempt = held.attempt);
                    self.build(slot, *held).instrument(span).await;
                    return true;
                }
                Ok(Claim::Stale(fresh)) => job = *fresh,
                Ok(Claim::Lost) => {
                    self.metrics.claim_conflict();
                    break;
                }
                Err(e) => {
                    warn!(job = %job.name_any(), error = %e, "claim failed");
                    break;
                }
            }
        }
        false
    }

    async fn build(&self, slot: Slot, held: Held) {
        info!(
            start = held.job.spec.start_offset,
            end = held.job.spec.end_offset,
            "claimed"
        );
        let started = std::time::Instant::now();
        let health = self.metrics.health();
        health.disarm(slot.work_loop);
        health.arm(
            slot.job_lease,
            job_lease_deadline(held.lease_duration_seconds),
        );
        let cancel = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(held));
        let renewer = tokio::spawn(renew_until_lost(
            self.client.clone(),
            self.lease.clone(),
            held.clone(),
            Renewal {
                cancel: cancel.clone(),
                lost: lost.clone(),
                health: health.clone(),
                slot,
            },
        ));
        let spec = held.lock().await.job.spec.clone();
        let build = build_block(&spec, &self.settings, cancel.clone());
        tokio::pin!(build);
        let result = tokio::select! {
            r = &mut build => r,
            _ = self.shutdown.cancelled() => {
                info!(grace = ?self.grace, "shutdown requested; finishing the current job within the grace period");
                match tokio::time::timeout(self.grace, &mut build).await {
                    Ok(r) => r,
                    Err(_) => {
                        cancel.store(true, Ordering::Relaxed);
                        Err(BuildError::Cancelled)
                    }
                }
            }
        };
        // Stop renewing before the final report so the two never race.
        renewer.abort();
        let _ = renewer.await;
        // The report is part of the claim loop's pass (if a lost lease has not handed the
        // builder back to it already).
        health.disarm(slot.job_lease);
        health.arm(slot.work_loop, WORK_LOOP_DEADLINE);
        let mut held = held.lock().await.clone();
        if lost.load(Ordering::Relaxed) {
            self.metrics.lease_lost();
            if held.job.is_terminating() {
                // The build has stopped: give the deleted job back, so that the operator,
                // which keeps a held job's range taken, lets it go now rather than when the
                // lease runs out.
                info!("the job was deleted; giving it back unfinished");
                if let Err(e) = self.lease.release(&self.client, &mut held).await {
                    warn!(error = %e, "giving back the deleted job failed; it goes when the lease runs out");
                }
                return;
            }
            warn!("lease lost while building; reporting nothing");
            return;
        }
        let report = match result {
            Ok(built) => {
                self.metrics
                    .built(built.output.records, built.output.bytes, built.read_bytes);
                self.lease
                    .complete(&self.client, &mut held, &built.output)
                    .await
            }
            Err(BuildError::Cancelled) => {
                info!("releasing the job unfinished");
                self.lease.release(&self.client, &mut held).await
            }
            Err(e) => {
                self.metrics.failed(&e);
                let transient = e.is_transient();
                error!(error = %e, transient, "job attempt failed");
                self.lease
                    .fail(&self.client, &mut held, &e.to_string(), transient)
                    .await
            }
        };
        match report {
            Ok(()) => {
                let took = started.elapsed();
                self.metrics.reported(took);
                info!(seconds = took.as_secs_f64(), "reported");
            }
            Err(LeaseError::Lost { reason, .. }) => {
                self.metrics.lease_lost();
                warn!(%reason, "report rejected: the lease was taken away");
            }
            Err(e) => {
                error!(error = %e, "reporting the job failed; its lease will expire and it will be retried")
            }
        }
    }
}

/// What the renewer shares with the build.
struct Renewal {
    /// Set to stop the build.
    cancel: Arc<AtomicBool>,
    /// Set when the lease is lost: report nothing.
    lost: Arc<AtomicBool>,
    health: Health,
    slot: Slot,
}

impl Renewal {
    /// Marks the lease lost, cancels the build and hands the builder back to its claim loop
    /// (whose deadline now covers the build's return).
    fn lose(&self) {
        self.lost.store(true, Ordering::Relaxed);
        self.cancel.store(true, Ordering::Relaxed);
        self.health.disarm(self.slot.job_lease);
        self.health.arm(self.slot.work_loop, WORK_LOOP_DEADLINE);
    }
}

/// Renews every third of the lease, beating [`JOB_LEASE_HEARTBEAT`] on each renewal. On a
/// conflict, or when renewals have failed until the lease has run out, marks the lease lost
/// and cancels the build. A renewal still unanswered when the lease runs out has failed: an
/// unreachable API server can leave a request unanswered for many minutes, and by then
/// the operator has taken the job back.
async fn renew_until_lost(
    client: kube::Client,
    lease: LeaseClient,
    held: Arc<Mutex<Held>>,
    renewal: Renewal,
) {
    let every = renew_interval(held.lock().await.lease_duration_seconds);
    loop {
        tokio::time::sleep(every).await;
        let mut h = held.lock().await;
        // (Already so when the claim itself took longer than the lease.)
        let Ok(left) = Duration::try_from(
            lease_expiry(h.renew_time, h.lease_duration_seconds).duration_since(Timestamp::now()),
        ) else {
            warn!("the lease ran out before it could be renewed");
            renewal.lose();
            return;
        };
        match tokio::time::timeout(left, lease.renew(&client, &mut h)).await {
            Ok(Ok(())) => renewal.health.beat(renewal.slot.job_lease),
            Ok(Err(LeaseError::Lost { reason, .. })) => {
                warn!(%reason, "lease renewal refused");
                renewal.lose();
                return;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "lease renewal failed; retrying");
                if lease_expiry(h.renew_time, h.lease_duration_seconds) <= Timestamp::now() {
                    renewal.lose();
                    return;
                }
            }
            Err(_) => {
                warn!("lease renewal unanswered until the lease ran out");
                renewal.lose();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use blocksmith_crds::pipeline::{BlockFormat, Compression};
    use blocksmith_crds::{BlockJobSpec, JobOutputSpec};

    use blocksmith_runtime::test_support::frozen_apiserver;

    use super::*;

    fn held(lease_duration_seconds: i32) -> Held {
        let mut job = BlockJob::new(
            "orders-0-0",
            BlockJobSpec {
                pipeline: "orders".into(),
                topic: "orders".into(),
                partition: 0,
                start_offset: 0,
                end_offset: 10,
                bootstrap_servers: "kafka:9092".into(),
                kafka_cluster_id: None,
                kafka_topic_id: None,
                lease_duration_seconds,
                output: JobOutputSpec {
                    url: "file:///tmp/blocks".into(),
                    format: BlockFormat::Parquet,
                    compression: Compression::Zstd,
                    compression_level: None,
                    row_group_size: None,
                    max_record_bytes: None,
                },
            },
        );
        job.metadata.namespace = Some("ns".into());
        let now = Timestamp::now();
        Held {
            job,
            attempt: 1,
            acquire_time: now,
            renew_time: now,
            start_time: now,
            lease_duration_seconds,
            message: String::new(),
        }
    }

    #[tokio::test]
    async fn a_renewal_without_an_answer_gives_the_lease_up_when_it_runs_out() {
        let (client, server) = frozen_apiserver().await;
        let metrics = Metrics::default();
        let health = metrics.health().clone();
        health.arm(JOB_LEASE_HEARTBEAT, job_lease_deadline(3));
        let renewal = Renewal {
            cancel: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(AtomicBool::new(false)),
            health: health.clone(),
            slot: Slot::new(0),
        };
        let (cancel, lost) = (renewal.cancel.clone(), renewal.lost.clone());
        let started = std::time::Instant::now();
        // Renews after 1 s; that renewal hangs; the lease runs out 3 s after the claim.
        tokio::time::timeout(
            Duration::from_secs(20),
            renew_until_lost(
                client,
                LeaseClient::new("builder-1", metrics.clone()),
                Arc::new(Mutex::new(held(3))),
                renewal,
            ),
        )
        .await
        .expect("the renewer gives up");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
            "{took:?}"
        );
        assert!(lost.load(Ordering::Relaxed) && cancel.load(Ordering::Relaxed));
        // One renewal, which hung (failing ones would have been retried every second).
        assert!(
            metrics
                .encode()
                .contains("api_writes_total{kind=\"status\"} 1\n"),
            "{}",
            metrics.encode()
        );
        // Back to the claim loop's deadline.
        assert!(!health.is_armed(JOB_LEASE_HEARTBEAT));
        assert!(health.is_armed(WORK_LOOP_HEARTBEAT));
        server.abort();
    }

    #[tokio::test]
    async fn a_lease_that_ran_out_during_the_claim_is_given_up_without_a_renewal() {
        let (client, server) = frozen_apiserver().await;
        let metrics = Metrics::default();
        let mut expired = held(3);
        expired.renew_time = Timestamp::now() - jiff::SignedDuration::from_secs(60);
        let renewal = Renewal {
            cancel: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(AtomicBool::new(false)),
            health: metrics.health().clone(),
            slot: Slot::new(0),
        };
        let lost = renewal.lost.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            renew_until_lost(
                client,
                LeaseClient::new("builder-1", metrics.clone()),
                Arc::new(Mutex::new(expired)),
                renewal,
            ),
        )
        .await
        .expect("the renewer gives up");
        assert!(lost.load(Ordering::Relaxed));
        // Nothing was sent.
        assert!(
            !metrics
                .encode()
                .contains("api_writes_total{kind=\"status\"}")
        );
        server.abort();
    }

    #[test]
    fn the_job_lease_deadline_is_the_lease_plus_one_renewal_interval() {
        assert_eq!(job_lease_deadline(30), Duration::from_secs(40));
        assert_eq!(job_lease_deadline(3), Duration::from_secs(4));
        assert_eq!(job_lease_deadline(-1), Duration::from_millis(333));
    }
}
