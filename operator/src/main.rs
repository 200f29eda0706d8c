use std::sync::Arc;
use std::time::Duration;

use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::{BlockJob, BlockPipeline};
use blocksmith_operator::builders::AutoscalingApi;
use blocksmith_operator::external_metrics;
use blocksmith_operator::leader::LeaderElector;
use blocksmith_operator::metrics::{self, Metrics};
use blocksmith_operator::reconcile::{Context, error_policy, reconcile};
use clap::Parser;
use futures::StreamExt;
use kube::runtime::{Controller, WatchStreamExt, controller, reflector, watcher};
use kube::{Api, ResourceExt};
use tracing::{debug, error, info, warn};

/// blocksmith operator: turns BlockPipelines into BlockJobs and commits Kafka offsets once
/// their blocks are durable.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, env = "BLOCKSMITH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Serve external.metrics.k8s.io/v1beta1 (TLS) here, for the builders' HPAs.
    #[arg(long, env = "BLOCKSMITH_EXTERNAL_METRICS_ADDR")]
    external_metrics_addr: Option<std::net::SocketAddr>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "BLOCKSMITH_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Seconds between lag polls of an otherwise quiet pipeline.
    #[arg(long, env = "BLOCKSMITH_POLL_INTERVAL", default_value_t = 10.0)]
    poll_interval: f64,
    /// Timeout of each Kafka request, in seconds.
    #[arg(long, env = "BLOCKSMITH_KAFKA_TIMEOUT", default_value_t = 10.0)]
    kafka_timeout: f64,
    /// Quiet period before a reconcile runs after a change, in milliseconds, so bursts of
    /// job status updates cause one reconcile.
    #[arg(long, env = "BLOCKSMITH_DEBOUNCE_MS", default_value_t = 500)]
    debounce_ms: u64,
    /// Disable leader election (only ever run one replica then).
    #[arg(long, env = "BLOCKSMITH_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(
        long,
        env = "BLOCKSMITH_LEASE_NAME",
        default_value = "blocksmith-operator"
    )]
    lease_name: String,
    /// Leader lease duration in seconds.
    #[arg(long, env = "BLOCKSMITH_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// This replica's identity in the Lease (default: $POD_NAME, else host-pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    blocksmith_runtime::init_logging();
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let metrics = Metrics::default();
    tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    if let Some(addr) = args.external_metrics_addr {
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = external_metrics::serve(addr, client).await {
                error!(error = %e, "external metrics API stopped");
            }
        });
    }
    let autoscaling = AutoscalingApi::discover(&client).await.unwrap_or_else(|e| {
        warn!(error = %e, "discovering autoscaling API versions; assuming none");
        AutoscalingApi::Unavailable
    });
    info!(?autoscaling, "HPA API");

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let elector = (!args.no_leader_election).then(|| {
        LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_duration),
        )
    });
    metrics.set_ready();
    if let Some(e) = &elector {
        info!(identity = %e.identity(), "waiting for leadership");
        tokio::select! {
            _ = e.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
    }

    let (pipelines, jobs) = match &args.namespace {
        Some(ns) => (
            Api::<BlockPipeline>::namespaced(client.clone(), ns),
            Api::<BlockJob>::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // Reconciles read jobs from this cache rather than LISTing them (seconds at 10,000 jobs).
    // The controller's own watch of owned jobs only triggers reconciles and keeps no objects.
    let (job_cache, job_writer) = reflector::store();
    let job_reflector = reflector(
        job_writer,
        watcher(
            jobs.clone(),
            watcher::Config::default().labels(LABEL_PIPELINE),
        )
        .default_backoff()
        // Not needed for decisions, and most of a job's size.
        .modify(|job| job.managed_fields_mut().clear()),
    )
    .for_each(|event| async move {
        if let Err(e) = event {
            warn!(error = %e, "watching BlockJobs");
        }
    });
    tokio::spawn(job_reflector);
    job_cache.wait_until_ready().await?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        job_cache,
        metrics.clone(),
        Duration::from_secs_f64(args.poll_interval),
        Duration::from_secs_f64(args.kafka_timeout),
        autoscaling,
    ));
    let controller = Controller::new(pipelines, watcher::Config::default())
        .owns(jobs, watcher::Config::default().labels(LABEL_PIPELINE))
        .with_config(
            controller::Config::default().debounce(Duration::from_millis(args.debounce_ms)),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // A job event for a pipeline that was just deleted (its jobs are being
                // garbage-collected): nothing to do, nothing wrong.
                Err(controller::Error::ObjectNotFound(obj)) => {
                    debug!(object = %obj, "pipeline gone; ignoring an event of its jobs");
                }
                Err(e) => warn!(error = %e, "reconcile"),
                Ok(_) => {}
            }
        });
    info!("controller started");
    match &elector {
        Some(e) => tokio::select! {
            _ = controller => info!("controller stopped"),
            _ = e.hold() => {
                // Stop writing at once: exit rather than risk a second acting replica.
                error!("lost leadership; exiting");
                std::process::exit(1);
            }
        },
        None => controller.await,
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
