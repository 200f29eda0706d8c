//! The builder's loop: watch the pipeline's unfinished jobs, claim the most urgent claimable
//! one, build it while renewing the lease, report the outcome — and report nothing once the
//! lease is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blocksmith_crds::BlockJob;
use blocksmith_crds::domain::{
    LABEL_PHASE, LABEL_PIPELINE, is_claimable, lease_expiry, renew_interval,
};
use futures::StreamExt;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Mutex, Notify};
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
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
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
            notify.notify_one();
            futures::future::ready(())
        });
        let watch = tokio::spawn(watch);
        store.wait_until_ready().await?;
        self.metrics.set_ready();
        info!(identity = %self.lease.identity(), %selector, "builder ready");

        while !self.shutdown.is_cancelled() {
            if !self.claim_and_build(&store).await {
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = self.shutdown.cancelled() => {}
                }
            }
        }
        watch.abort();
        info!("builder stopped");
        Ok(())
    }

    /// Tries to claim one job and builds it. False when there was nothing to claim.
    async fn claim_and_build(&self, store: &Store<BlockJob>) -> bool {
        let candidates = claim_order(&store.state(), Timestamp::now());
        for candidate in candidates.into_iter().take(8) {
            let mut job = (*candidate).clone();
            for _ in 0..2 {
                let lease_seconds = job.spec.lease_duration_seconds;
                match self.lease.claim(&self.client, &job, lease_seconds).await {
                    Ok(Claim::Claimed(held)) => {
                        self.metrics.claimed();
                        let span = info_span!("job", job = %held.job.name_any(), partition = held.job.spec.partition, attempt = held.attempt);
                        self.build(*held).instrument(span).await;
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
        }
        false
    }

    async fn build(&self, held: Held) {
        info!(
            start = held.job.spec.start_offset,
            end = held.job.spec.end_offset,
            "claimed"
        );
        let started = std::time::Instant::now();
        let cancel = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(held));
        let renewer = tokio::spawn(renew_until_lost(
            self.client.clone(),
            self.lease.clone(),
            held.clone(),
            cancel.clone(),
            lost.clone(),
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
        let mut held = held.lock().await.clone();
        if lost.load(Ordering::Relaxed) {
            self.metrics.lease_lost();
            warn!("lease lost while building; reporting nothing");
            return;
        }
        let report = match result {
            Ok(built) => {
                self.metrics.built(
                    built.output.records,
                    built.output.bytes,
                    built.read_bytes,
                    started.elapsed(),
                );
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
                error!(error = %e, "job attempt failed");
                self.lease
                    .fail(&self.client, &mut held, &e.to_string())
                    .await
            }
        };
        match report {
            Ok(()) => info!(seconds = started.elapsed().as_secs_f64(), "reported"),
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

/// Renews every third of the lease. On a conflict, or when renewals have failed until the
/// lease has run out, marks the lease lost and cancels the build.
async fn renew_until_lost(
    client: kube::Client,
    lease: LeaseClient,
    held: Arc<Mutex<Held>>,
    cancel: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    let every = renew_interval(held.lock().await.lease_duration_seconds);
    loop {
        tokio::time::sleep(every).await;
        let mut h = held.lock().await;
        match lease.renew(&client, &mut h).await {
            Ok(()) => {}
            Err(LeaseError::Lost { reason, .. }) => {
                warn!(%reason, "lease renewal refused");
                lost.store(true, Ordering::Relaxed);
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                warn!(error = %e, "lease renewal failed; retrying");
                if lease_expiry(h.renew_time, h.lease_duration_seconds) <= Timestamp::now() {
                    lost.store(true, Ordering::Relaxed);
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}
