use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::{BlockJob, BlockPipeline};
use blocksmith_operator::builders::{
    AutoscalingApi, BuilderApis, BuilderScaler, disruption_budget_version,
};
use blocksmith_operator::crd_schema;
use blocksmith_operator::external_metrics;
use blocksmith_operator::leader::{LeaderElector, Leadership};
use blocksmith_operator::metrics::{self, Metrics, RECONCILE_HEARTBEAT};
use blocksmith_operator::policy::{Policy, parse_label};
use blocksmith_operator::reconcile::{
    Caches, Context, error_policy, forget_deleted_pipeline, reconcile,
};
use blocksmith_operator::throttle::Throttle;
use blocksmith_runtime::shutdown_signal;
use clap::{CommandFactory, Parser};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{Lookup, ObjectRef};
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
    /// The external metrics API's serving certificate: a directory with `tls.crt` and
    /// `tls.key` (a mounted `kubernetes.io/tls` Secret), read again every minute. Default: a
    /// self-signed certificate, which only an APIService with `insecureSkipTLSVerify` accepts.
    #[arg(long, env = "BLOCKSMITH_EXTERNAL_METRICS_CERT_DIR")]
    external_metrics_cert_dir: Option<std::path::PathBuf>,
    /// Who scales builders: `hpa` (an HPA on the queue depth this operator serves with
    /// --external-metrics-addr), `fixed` (minReplicas, no HPA), `external` (no HPA, replicas
    /// left to an autoscaler of your own, e.g. KEDA on blocksmith_queue_depth_jobs).
    #[arg(
        long,
        env = "BLOCKSMITH_BUILDER_AUTOSCALER",
        value_enum,
        default_value_t = BuilderScaler::Hpa
    )]
    builder_autoscaler: BuilderScaler,
    /// Watch only these namespaces (repeat the flag, or separate them by commas; default:
    /// all namespaces). Each gets a controller of its own, so the operator needs permissions
    /// in these namespaces only.
    #[arg(
        long = "namespace",
        env = "BLOCKSMITH_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Images pipelines may run builders with (comma-separated): an image, a repository (any
    /// tag or digest of it), a prefix ending in `/`, `:` or `@`, or `*`. Default: any.
    #[arg(long, env = "BLOCKSMITH_ALLOWED_BUILDER_IMAGES", value_delimiter = ',')]
    allowed_builder_images: Vec<String>,
    /// ServiceAccounts builder pods may run as (comma-separated). Default: any.
    #[arg(
        long,
        env = "BLOCKSMITH_ALLOWED_BUILDER_SERVICE_ACCOUNTS",
        value_delimiter = ','
    )]
    allowed_builder_service_accounts: Vec<String>,
    /// `key=value`: a label every Secret a pipeline names must carry. Default: none needed.
    #[arg(long, env = "BLOCKSMITH_SECRET_LABEL", value_parser = parse_label)]
    secret_label: Option<(String, String)>,
    /// Seconds between lag polls of an otherwise quiet pipeline.
    #[arg(long, env = "BLOCKSMITH_POLL_INTERVAL", default_value_t = 10.0, value_parser = seconds)]
    poll_interval: f64,
    /// Seconds between commits of an idle pipeline's unchanged offsets, which keep Kafka
    /// from expiring them (`offsets.retention.minutes`: 7 days by default, one before Kafka
    /// 2.0).
    #[arg(
        long,
        env = "BLOCKSMITH_OFFSET_REFRESH_INTERVAL",
        default_value_t = 3600.0,
        value_parser = seconds
    )]
    offset_refresh_interval: f64,
    /// Timeout of each Kafka request, in seconds. With leader election, at most half the
    /// lease: a commit must end while the leader is sure it still leads.
    #[arg(long, env = "BLOCKSMITH_KAFKA_TIMEOUT", default_value_t = 5.0, value_parser = seconds)]
    kafka_timeout: f64,
    /// Least time between two reconciles of one pipeline, in milliseconds: a burst of job
    /// status updates causes one reconcile, a steady stream one per this period.
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
    /// Leader lease duration in seconds (at least 3). The leader renews it every sixth and
    /// stops acting when two thirds have passed without a renewal.
    #[arg(long, env = "BLOCKSMITH_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// This replica's identity in the Lease (default: $POD_NAME, else host-pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

impl Args {
    /// What clap cannot check: the flags' relations.
    fn check(&self) -> Result<(), String> {
        if self.no_leader_election {
            return Ok(());
        }
        if self.lease_duration < 3 {
            return Err(format!(
                "--lease-duration {} is under 3 seconds",
                self.lease_duration
            ));
        }
        let half_lease = self.lease_duration as f64 / 2.0;
        if self.kafka_timeout > half_lease {
            return Err(format!(
                "--kafka-timeout {} is over half of --lease-duration {}: a commit must end while the leader is sure it still leads; lower the timeout or lengthen the lease",
                self.kafka_timeout, self.lease_duration
            ));
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    blocksmith_runtime::init_logging();
    let args = Args::parse();
    if let Err(e) = args.check() {
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit();
    }
    let client = kube::Client::try_default().await?;
    let metrics = Metrics::default();
    let health = metrics.health().clone();
    tokio::spawn(metrics.clone().serve(args.metrics_addr));
    if let Some(addr) = args.external_metrics_addr {
        let depths = external_metrics::QueueDepths::watch(&client, &args.namespaces);
        let certificate_dir = args.external_metrics_cert_dir.clone();
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = external_metrics::serve(addr, client, depths, certificate_dir).await {
                error!(error = %e, "external metrics API stopped");
            }
        });
    }
    let builder_apis = match client.list_api_groups().await {
        Ok(groups) => BuilderApis {
            autoscaling: AutoscalingApi::served(&groups),
            disruption_budget: disruption_budget_version(&groups),
            scaler: args.builder_autoscaler,
        },
        Err(e) => {
            warn!(error = %e, "discovering API versions; assuming no HPA or PodDisruptionBudget API");
            BuilderApis {
                autoscaling: AutoscalingApi::Unavailable,
                disruption_budget: None,
                scaler: args.builder_autoscaler,
            }
        }
    };
    info!(?builder_apis, "builder APIs");
    tokio::select! {
        _ = wait_for_current_crds(&client, &metrics) => {}
        _ = shutdown_signal() => return Ok(()),
    }

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(blocksmith_runtime::identity::host_pid);
    let elector = (!args.no_leader_election).then(|| {
        LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_duration),
            health.clone(),
        )
    });
    if let Some(e) = &elector {
        info!(identity = %e.identity(), "waiting for leadership");
        tokio::select! {
            // A standby is ready once it gets answers from the API server: readiness does
            // not depend on leadership (as with controller-runtime), so rollouts proceed
            // while one replica leads. The leader is ready once its caches synced (below).
            _ = e.acquire(|| health.set_ready()) => {}
            _ = shutdown_signal() => return Ok(()),
        }
    }
    metrics.set_leader(true);

    let settings = Settings {
        client: client.clone(),
        metrics: metrics.clone(),
        poll_interval: Duration::from_secs_f64(args.poll_interval),
        offset_refresh: Duration::from_secs_f64(args.offset_refresh_interval),
        kafka_timeout: Duration::from_secs_f64(args.kafka_timeout),
        debounce: Duration::from_millis(args.debounce_ms),
        builder_apis,
        fence: elector
            .as_ref()
            .map(|e| (e.leadership(), 2 * e.renew_period())),
        policy: Policy {
            builder_images: args.allowed_builder_images.clone(),
            builder_service_accounts: args.allowed_builder_service_accounts.clone(),
            secret_label: args.secret_label.clone(),
        },
        requeues: Arc::default(),
    };
    // One controller per watched namespace (a watch of several namespaces would need
    // cluster-wide permissions), or one for all.
    let namespaces: Vec<Option<&str>> = if args.namespaces.is_empty() {
        vec![None]
    } else {
        args.namespaces.iter().map(|ns| Some(ns.as_str())).collect()
    };
    let mut controllers = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        controllers.push(settings.controller(ns).await?);
    }
    // Ready (if not already as a standby) now that the jobs' caches have synced. Not waiting
    // for the controller's own cache of pipelines (`controller.store()`): kube-runtime 5.0's
    // `Store::wait_until_ready` wakes only the last of several waiters, and the controller
    // waits on that store itself before its first reconcile — a second waiter could leave
    // it unwoken.
    info!("job caches synced; ready");
    health.set_ready();
    let controller = futures::future::join_all(controllers);
    // Every poll of the controllers is a beat of their heartbeat (see RECONCILE_HEARTBEAT).
    let mut controller = std::pin::pin!(controller);
    let controller = futures::future::poll_fn(move |cx| {
        health.beat(RECONCILE_HEARTBEAT);
        controller.as_mut().poll(cx).map(|_| ())
    });
    info!("controller started");
    match &elector {
        Some(e) => tokio::select! {
            _ = controller => {
                info!("controller stopped");
                metrics.set_leader(false);
                // Nothing acts any more: let a standby take over without waiting the lease out.
                e.release().await;
            }
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

/// How often an operator waiting for current CRDs looks again.
const CRD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Waits until the installed CRDs hold every field this operator writes
/// ([`crd_schema`]). Until then it neither leads nor reports ready: a rollout of a new
/// operator before its CRDs stalls, with this in its log, while the old one keeps leading.
async fn wait_for_current_crds(client: &kube::Client, metrics: &Metrics) {
    let mut reported: Option<String> = None;
    loop {
        match crd_schema::outdated_crds(client).await {
            Ok(outdated) if outdated.is_empty() => {
                if reported.is_some() {
                    info!("the CRDs hold this operator's fields now; going on");
                }
                metrics.set_crds_outdated(false);
                return;
            }
            Ok(outdated) => {
                metrics.set_crds_outdated(true);
                let text = outdated
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                if reported.as_ref() != Some(&text) {
                    error!(
                        outdated = %text,
                        remedy = crd_schema::REMEDY,
                        "the installed CRDs are older than this operator (the API server would drop fields it writes); waiting for them, not ready"
                    );
                    reported = Some(text);
                }
            }
            Err(kube::Error::Api(e)) if e.code == 403 => {
                warn!(
                    error = %e.message,
                    "no permission to read the CRDs (get customresourcedefinitions); going on without checking that they hold this operator's fields"
                );
                return;
            }
            Err(e) => warn!(error = %e, "reading the CRDs to check their schema; trying again"),
        }
        tokio::time::sleep(CRD_CHECK_INTERVAL).await;
    }
}

/// What every namespace's controller shares.
struct Settings {
    client: kube::Client,
    metrics: Metrics,
    poll_interval: Duration,
    offset_refresh: Duration,
    kafka_timeout: Duration,
    debounce: Duration,
    builder_apis: BuilderApis,
    /// The leadership Kafka commits are fenced by, and the patience of that fence.
    fence: Option<(Leadership, Duration)>,
    policy: Policy,
    requeues: Arc<Mutex<Requeues>>,
}

impl Settings {
    /// The controller of the pipelines in `namespace` (all namespaces without), once its
    /// caches have synced: a future that runs it until shutdown.
    async fn controller(
        &self,
        namespace: Option<&str>,
    ) -> anyhow::Result<futures::future::BoxFuture<'static, ()>> {
        let client = &self.client;
        let (pipelines, jobs, deployments) = match namespace {
            Some(ns) => (
                Api::<BlockPipeline>::namespaced(client.clone(), ns),
                Api::<BlockJob>::namespaced(client.clone(), ns),
                Api::<Deployment>::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
        // Reconciles read jobs from this cache rather than LISTing them (seconds at 10,000
        // jobs). The controller's own watch of owned jobs only triggers reconciles and keeps
        // no objects.
        let job_cache = spawn_cache(jobs.clone(), (), "BlockJobs");
        let builder_cache = spawn_cache(deployments.clone(), (), "builder Deployments");
        // A builder HPA deleted behind the operator's back is applied again, like a
        // Deployment.
        let autoscalers = self.builder_apis.hpa_resource().map(|resource| {
            let api: Api<DynamicObject> = match namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            (
                api.clone(),
                resource.clone(),
                spawn_cache(api, resource, "builder HPAs"),
            )
        });
        job_cache.wait_until_ready().await?;
        builder_cache.wait_until_ready().await?;
        if let Some((_, _, cache)) = &autoscalers {
            cache.wait_until_ready().await?;
        }
        let ctx = Context::new(
            client.clone(),
            Caches {
                jobs: job_cache,
                builders: builder_cache,
                autoscalers: autoscalers.as_ref().map(|(_, _, cache)| cache.clone()),
            },
            self.metrics.clone(),
            self.poll_interval,
            self.offset_refresh,
            self.kafka_timeout,
            self.builder_apis,
        )
        .with_policy(self.policy.clone());
        // Kafka knows nothing of the lease: commits stop with leadership.
        let ctx = Arc::new(match &self.fence {
            Some((leadership, patience)) => ctx.fenced_by(leadership.clone(), *patience),
            None => ctx,
        });
        let controller = Controller::new(pipelines, watcher::Config::default())
            .owns(jobs, watcher::Config::default().labels(LABEL_PIPELINE))
            // A deleted builder Deployment wakes its pipeline, which applies it again.
            .owns(
                deployments,
                watcher::Config::default().labels(LABEL_PIPELINE),
            )
            .shutdown_on_signal();
        let controller = match autoscalers {
            Some((api, resource, _)) => controller.owns_with(
                api,
                resource,
                watcher::Config::default().labels(LABEL_PIPELINE),
            ),
            None => controller,
        };
        let idle_deadline = metrics::controller_idle_deadline(self.poll_interval, self.debounce);
        let requeues = self.requeues.clone();
        let beats = self.metrics.health().clone();
        let for_gone = ctx.clone();
        // Not kube-runtime's debounce, which a steady stream of job events postpones forever.
        let throttle = Arc::new(Throttle::new(self.debounce));
        let forget_throttle = throttle.clone();
        let spaced = move |bp: Arc<BlockPipeline>, ctx: Arc<Context>| {
            let wait = throttle.wait(
                (
                    ResourceExt::namespace(&*bp).unwrap_or_default(),
                    bp.name_any(),
                ),
                Instant::now(),
            );
            async move {
                tokio::time::sleep(wait).await;
                reconcile(bp, ctx).await
            }
        };
        Ok(controller
            .run(spaced, error_policy, ctx)
            .for_each(move |res| {
                let mut pending = requeues.lock().expect("requeues lock");
                pending.observe(&res);
                if pending.any() {
                    beats.arm(RECONCILE_HEARTBEAT, idle_deadline);
                } else {
                    beats.disarm(RECONCILE_HEARTBEAT);
                }
                drop(pending);
                let gone_ctx = for_gone.clone();
                let forget_throttle = forget_throttle.clone();
                async move {
                    match res {
                        // The pipeline's deletion, or an event of its jobs, which garbage
                        // collection is deleting: what the operator keeps of it goes.
                        Err(controller::Error::ObjectNotFound(obj)) => {
                            debug!(object = %obj, "pipeline gone; forgetting it and releasing its jobs");
                            let ns = obj.namespace.clone().unwrap_or_default();
                            forget_throttle.forget(&(ns.clone(), obj.name.clone()));
                            forget_deleted_pipeline(&gone_ctx, &ns, &obj.name).await;
                        }
                        Err(e) => warn!(error = %e, "reconcile"),
                        Ok(_) => {}
                    }
                }
            })
            .boxed())
    }
}

/// The pipelines the controller will reconcile again without any change: those whose last
/// reconcile asked for a requeue or failed (the error policy requeues). While there are any,
/// the controller has a timer due within the poll interval, so it must keep running.
#[derive(Default)]
struct Requeues(HashSet<(Option<String>, String)>);

impl Requeues {
    fn observe<E1, E2>(
        &mut self,
        result: &Result<(ObjectRef<BlockPipeline>, Action), controller::Error<E1, E2>>,
    ) {
        match result {
            Ok((obj, action)) if *action == Action::await_change() => self.forget(obj),
            Ok((obj, _)) => self.expect(obj),
            Err(controller::Error::ReconcilerFailed(_, obj)) => self.expect(obj),
            // A pipeline deleted meanwhile: its pending requeue found it gone.
            Err(controller::Error::ObjectNotFound(obj)) => self.forget(obj),
            Err(_) => {}
        }
    }

    fn any(&self) -> bool {
        !self.0.is_empty()
    }

    fn expect<K: Lookup + ?Sized>(&mut self, obj: &ObjectRef<K>) {
        self.0.insert((obj.namespace.clone(), obj.name.clone()));
    }

    fn forget<K: Lookup + ?Sized>(&mut self, obj: &ObjectRef<K>) {
        self.0.remove(&(obj.namespace.clone(), obj.name.clone()));
    }
}

/// A cache of the objects of `api` that belong to a pipeline, kept current in the background.
fn spawn_cache<K>(api: Api<K>, dyntype: K::DynamicType, what: &'static str) -> reflector::Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync,
    K: serde::de::DeserializeOwned + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::new(dyntype);
    let cache = writer.as_reader();
    let updates = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(LABEL_PIPELINE))
            .default_backoff()
            // Not needed for decisions, and most of an object's size.
            .modify(|object| object.managed_fields_mut().clear()),
    )
    .for_each(move |event| async move {
        if let Err(e) = event {
            warn!(error = %e, "watching {what}");
        }
    });
    tokio::spawn(updates);
    cache
}

/// A duration flag in seconds: a number of at least 0.2 (anything shorter would spin).
fn seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.2 => Ok(s),
        Ok(_) => Err(format!("{value} seconds: use at least 0.2")),
        Err(e) => Err(format!("{value:?} is not a number of seconds: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::DynamicObject;

    use super::*;

    type Event = Result<
        (ObjectRef<BlockPipeline>, Action),
        controller::Error<std::fmt::Error, std::fmt::Error>,
    >;

    fn pipeline(name: &str) -> ObjectRef<BlockPipeline> {
        ObjectRef::new(name).within("ns")
    }

    fn erased(name: &str) -> Box<ObjectRef<DynamicObject>> {
        Box::new(pipeline(name).erase())
    }

    #[test]
    fn duration_flags_below_a_fifth_of_a_second_are_refused_at_startup() {
        let parse = |flag: &str, value: &str| {
            Args::try_parse_from(["blocksmith-operator", &format!("{flag}={value}")]).map(|_| ())
        };
        for flag in [
            "--poll-interval",
            "--kafka-timeout",
            "--offset-refresh-interval",
        ] {
            assert!(parse(flag, "0.2").is_ok(), "{flag}");
            for bad in ["0.1", "0", "-1", "NaN", "inf", "ten"] {
                let err = parse(flag, bad).unwrap_err().to_string();
                assert!(
                    err.contains(flag) && err.contains(bad),
                    "{flag} {bad}: {err}"
                );
            }
        }
    }

    #[test]
    fn a_kafka_timeout_over_half_the_lease_is_refused_at_startup() {
        let check = |flags: &[&str]| {
            let args = ["blocksmith-operator"].iter().chain(flags);
            Args::try_parse_from(args).unwrap().check()
        };
        assert_eq!(check(&[]), Ok(()), "the defaults fit");
        assert_eq!(check(&["--lease-duration=6", "--kafka-timeout=3"]), Ok(()));
        let e = check(&["--lease-duration=6", "--kafka-timeout=3.5"]).unwrap_err();
        assert!(
            e.contains("--kafka-timeout 3.5") && e.contains("--lease-duration 6"),
            "{e}"
        );
        assert!(check(&["--lease-duration=2", "--kafka-timeout=1"]).is_err());
        assert_eq!(
            check(&["--no-leader-election", "--kafka-timeout=30"]),
            Ok(()),
            "no lease, no bound"
        );
    }

    #[test]
    fn requeues_follow_what_each_pipeline_last_asked_for() {
        let mut r = Requeues::default();
        assert!(!r.any());
        let requeue: Event = Ok((pipeline("a"), Action::requeue(Duration::from_secs(10))));
        r.observe(&requeue);
        assert!(r.any());
        // An invalid spec waits for a change: nothing is due for it.
        let parked: Event = Ok((pipeline("a"), Action::await_change()));
        r.observe(&parked);
        assert!(!r.any());
        // A failed reconcile is requeued by the error policy.
        let failed: Event = Err(controller::Error::ReconcilerFailed(
            std::fmt::Error,
            erased("b"),
        ));
        r.observe(&failed);
        assert!(r.any());
        // Queue errors (a watch failing) change nothing.
        let queue: Event = Err(controller::Error::QueueError(std::fmt::Error));
        r.observe(&queue);
        assert!(r.any());
        // A deleted pipeline's requeue finds it gone.
        let gone: Event = Err(controller::Error::ObjectNotFound(erased("b")));
        r.observe(&gone);
        assert!(!r.any());
        // The same name in another namespace is another pipeline.
        r.observe(&requeue);
        let other: Event = Err(controller::Error::ObjectNotFound(Box::new(
            ObjectRef::<BlockPipeline>::new("a").within("other").erase(),
        )));
        r.observe(&other);
        assert!(r.any());
    }
}
