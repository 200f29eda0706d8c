//! blocksmith as its users run it: the chart installed with Helm on the testbed's node, every
//! blocksmith process a pod of the image `images/build` makes, reaching the apiserver through
//! the `kubernetes` Service with its mounted token, Kafka and S3 at the node's address.
//!
//! One test owns the cluster-wide `v1beta1.external.metrics.k8s.io` APIService; its operator
//! watches only the test's own namespace, so the other tests' pipelines are not its business.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocksmith_crds::domain::default_consumer_group;
use blocksmith_crds::{BlockJob, JobPhase};
use blocksmith_e2e::Testbed;
use blocksmith_e2e::broker::PrivateBroker;
use blocksmith_e2e::datagen::{DataSpec, ValueSizes};
use blocksmith_e2e::helm::{ReleaseGuard, chart_dir, helm_retried};
use blocksmith_e2e::scenario::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const RELEASE: &str = "bsm";
const APISERVICE: &str = "v1beta1.external.metrics.k8s.io";
/// The image `images/build` makes, which the chart names by default.
const IMAGE: &str = "ghcr.io/blocksmith/blocksmith:0.1.0";
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/instance=bsm,app.kubernetes.io/component=operator";

fn kubectl(args: &[&str]) -> (bool, String) {
    run_kubectl(None, args)
}

/// A cluster-wide PriorityClass, deleted when dropped.
struct PriorityClassGuard(String);

impl PriorityClassGuard {
    async fn create(tb: &Testbed, name: &str, value: i32) -> Self {
        let class: k8s_openapi::api::scheduling::v1::PriorityClass =
            serde_json::from_value(json!({"metadata": {"name": name}, "value": value})).unwrap();
        Api::<k8s_openapi::api::scheduling::v1::PriorityClass>::all(tb.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create the PriorityClass");
        PriorityClassGuard(name.into())
    }
}

impl Drop for PriorityClassGuard {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "priorityclass", &self.0, "--ignore-not-found"]);
    }
}

/// Deletes the cluster-wide APIService when dropped (declared before the release's guard, so
/// after the uninstall).
struct ApiServiceCleanup;

impl Drop for ApiServiceCleanup {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "apiservice", APISERVICE, "--ignore-not-found"]);
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

async fn ready_pods(api: &Api<Pod>, selector: &str) -> Vec<Pod> {
    api.list(&ListParams::default().labels(selector))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
                .collect()
        })
        .unwrap_or_default()
}

/// Who holds the operator pods' leader Lease.
async fn operator_leader(tb: &Testbed, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(tb.client.clone(), ns)
        .get_opt("bsm-blocksmith-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// A finalizer of the test's own on every builder pod: a deleted pod stays (Terminating) with
/// its last status until the test has read how its container ended. (Reading the exit from a
/// watch instead races the kubelet's final delete and the watch's own restarts.)
const KEEP_FOR_EXIT: &str = "e2e.blocksmith.dev/keep-for-exit-code";

/// Every builder pod seen. Each one gets [`KEEP_FOR_EXIT`] as it appears.
type BuilderPods = Arc<Mutex<BTreeSet<String>>>;

fn watch_builder_pods(tb: &Testbed, ns: &str) -> BuilderPods {
    let log: BuilderPods = Arc::default();
    let api: Api<Pod> = Api::namespaced(tb.client.clone(), ns);
    let seen = log.clone();
    tokio::spawn(async move {
        let cfg = watcher::Config::default().labels("app.kubernetes.io/name=blocksmith-builder");
        let mut pods = watcher(api.clone(), cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = pods.next().await {
            // An error ends nothing: the watcher starts again (after a backoff).
            let Ok(pod) = event else { continue };
            let name = pod.name_any();
            let kept = pod.finalizers().iter().any(|f| f == KEEP_FOR_EXIT);
            // (No finalizer can be added to a pod already being deleted.)
            if !kept && pod.metadata.deletion_timestamp.is_none() {
                let mut finalizers = pod.finalizers().to_vec();
                finalizers.push(KEEP_FOR_EXIT.to_string());
                let patch = json!({"metadata": {"finalizers": finalizers}});
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
            seen.lock().unwrap().insert(name);
        }
    });
    log
}

/// Takes [`KEEP_FOR_EXIT`] off every pod of the namespace when dropped, so that the namespace
/// can go however the test ends.
struct ReleaseBuilderPods(String);

impl Drop for ReleaseBuilderPods {
    fn drop(&mut self) {
        let (_, names) = kubectl(&["get", "pods", "-n", &self.0, "-o", "name"]);
        for pod in names.lines().filter(|l| l.starts_with("pod/")) {
            let _ = kubectl(&[
                "patch",
                "-n",
                &self.0,
                pod,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
    }
}

/// How a pod's container ended: `Some(code)` once it has ended, `Some(None)` if it never
/// started, `None` while it runs.
fn container_end(pod: &Pod) -> Option<Option<i32>> {
    let container = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first());
    let Some(container) = container else {
        return Some(None);
    };
    match container.state.as_ref().and_then(|s| s.terminated.as_ref()) {
        Some(t) => Some(Some(t.exit_code)),
        // Never started: no exit to wait for.
        None if container.container_id.is_none() => Some(None),
        // Running, or between states on its way out: wait for the exit.
        None => None,
    }
}

/// The host pid of a pod's first container (pods are processes of this machine).
async fn container_pid(pods: &Api<Pod>, pod: &str) -> u32 {
    let p = pods.get(pod).await.expect("get pod");
    let id = p
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|cs| cs.into_iter().next())
        .and_then(|c| c.container_id)
        .expect("container id");
    let id = id.trim_start_matches("containerd://");
    let sock = std::env::var("BLOCKSMITH_CONTAINERD_SOCK").expect("BLOCKSMITH_CONTAINERD_SOCK");
    let out = std::process::Command::new("ctr")
        .args(["--address", &sock, "-n", "k8s.io", "tasks", "ls"])
        .output()
        .expect("ctr tasks ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no task for container {id}"))
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn holder(job: &BlockJob) -> Option<String> {
    lease_holder(job).map(str::to_owned)
}

/// Prints the HPA, the pipeline's queue depth and the builder pods every 10 s until aborted:
/// shown if the test fails while waiting for the scale-up.
fn log_scaling(ns: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            let ns = ns.clone();
            // (kubectl blocks; the test's runtime has one thread.)
            let state = tokio::task::spawn_blocking(move || {
                kubectl(&["get", "hpa,bp,pods", "-n", &ns, "-o", "wide"]).1
            });
            println!("[{:?}]\n{}", started.elapsed(), state.await.unwrap());
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    })
}

/// The builder pods, or `None` if the list failed (for polling).
async fn builder_pods(pods: &Api<Pod>) -> Option<Vec<Pod>> {
    let selector = "app.kubernetes.io/name=blocksmith-builder";
    let listed = pods.list(&ListParams::default().labels(selector)).await;
    Some(listed.ok()?.items)
}

#[tokio::test]
async fn the_chart_runs_blocksmith_as_pods_that_scale_fail_over_and_write_every_record_once() {
    let tb = Testbed::get().await;
    let release_ns = tb.namespace("bsm-system").await;
    let ns = tb.namespace("pods").await;
    let pods: Api<Pod> = Api::namespaced(tb.client.clone(), &ns);
    let operator_pods: Api<Pod> = Api::namespaced(tb.client.clone(), &release_ns);

    // A broker of its own on the node address, slowed once the data is in so that a job
    // takes seconds: long enough for the queue to drive the HPA, and to catch a builder in a
    // job.
    let broker = PrivateBroker::spawn_on_node(&tb, "pods");
    let topic = "pods";
    broker.create_topic(topic, 4);
    let spec = DataSpec {
        value_sizes: ValueSizes::Fixed(100),
        ..DataSpec::new(topic, 4, 8000)
    };
    let produced = produce_data_to(&broker.bootstrap, spec).await;
    // Slow enough while the HPA scales up that one builder cannot drain the queue first (a
    // CI run once saw it drained before the fourth pod was Ready); faster from then on.
    broker.set_round_trip_time(Duration::from_millis(1000));

    // Labelled for pipelines, as the chart's policy requires.
    let s3: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3", "labels": {"blocksmith.io/pipeline-secret": "true"}},
        "stringData": {
            "AWS_ENDPOINT": tb.s3_endpoint,
            "AWS_ACCESS_KEY_ID": std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
            "AWS_SECRET_ACCESS_KEY": std::env::var("AWS_SECRET_ACCESS_KEY").unwrap(),
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        },
    }))
    .unwrap();
    Api::<Secret>::namespaced(tb.client.clone(), &ns)
        .create(&PostParams::default(), &s3)
        .await
        .expect("create the S3 secret");

    // helm install, with the chart's defaults but for the namespaces.
    let _ = kubectl(&["delete", "apiservice", APISERVICE, "--ignore-not-found"]);
    // Uninstalled, then its cluster-wide APIService deleted, however the test ends.
    let _apiservice = ApiServiceCleanup;
    let _release = ReleaseGuard::new(&tb, RELEASE, &release_ns);
    let chart = chart_dir();
    let builder_namespaces = format!("builders.namespaces={{{ns}}}");
    helm_retried(
        &tb,
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            &release_ns,
            "--set",
            &builder_namespaces,
            "--set",
            "operator.pollInterval=1",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("helm install: {e}"));

    // Two operator pods of the image, Ready (caches synced); exactly one leads.
    let operators = wait_for(
        "2 operator pods Ready",
        Duration::from_secs(120),
        || async {
            let ready = ready_pods(&operator_pods, OPERATOR_SELECTOR).await;
            (ready.len() == 2).then_some(ready)
        },
    )
    .await;
    for p in &operators {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0].image.as_deref(), Some(IMAGE));
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("blocksmith-operator")
        );
    }
    let names = pod_names(&operators);
    let leader = wait_for("a leader", Duration::from_secs(60), || async {
        operator_leader(&tb, &release_ns)
            .await
            .filter(|h| names.contains(h))
    })
    .await;
    wait_for(
        "the external metrics API available",
        Duration::from_secs(120),
        || async {
            let (_, s) = kubectl(&[
                "get",
                "apiservice",
                APISERVICE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
            ]);
            (s.trim() == "True").then_some(())
        },
    )
    .await;

    // The API server verified the operator's certificate (the APIService is Available), and
    // answers through it go to whom RBAC allows.
    let raw =
        format!("/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/blocksmith-queue-depth");
    let (ok, answer) = kubectl(&["get", "--raw", &raw]);
    assert!(ok && answer.contains("ExternalMetricValueList"), "{answer}");
    let (ok, refused) = kubectl(&["get", "--raw", &raw, "--as=blocksmith-e2e-nobody"]);
    assert!(!ok && refused.contains("forbidden"), "{refused}");
    // Straight to an operator pod, past the API server, the operator judges for itself: no
    // credentials, 401; a token whose user may not read, 403; the admin's token, the answer.
    let pod_ip = operators[0]
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .clone()
        .unwrap();
    let direct = |token: Option<&str>| {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"]);
        if let Some(token) = token {
            curl.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let out = curl
            .arg(format!("https://{pod_ip}:6443{raw}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or_default();
        (code.to_string(), body.to_string())
    };
    assert_eq!(direct(None).0, "401");
    assert_eq!(direct(Some("not-a-token")).0, "401");
    let builder_token = std::env::var("BLOCKSMITH_BUILDER_TOKEN").unwrap();
    let (code, body) = direct(Some(&builder_token));
    assert_eq!(code, "403", "{body}");
    let refusal: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        refusal["message"].as_str().unwrap().starts_with(
            "\"system:serviceaccount:default:blocksmith-builder\" may not list external metric"
        ),
        "{body}"
    );
    let (_, admin_token) = kubectl(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.users[0].user.token}",
    ]);
    let (code, body) = direct(Some(admin_token.trim()));
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("ExternalMetricValueList"), "{body}");

    // A pipeline with builders: the operator's Deployment and HPA run them as pods.
    let _release_pods = ReleaseBuilderPods(ns.clone());
    let builder_pod_log = watch_builder_pods(&tb, &ns);
    let mut bp = pipeline(
        "orders",
        topic,
        &broker.bootstrap,
        &format!("s3://{}/{ns}", tb.s3_bucket),
        json!({"maxRecords": 200, "leaseDurationSeconds": 10}),
    );
    bp.spec.output.credentials_secret_ref =
        Some(serde_json::from_value(json!({"name": "s3"})).unwrap());
    // With the pod options a platform team sets, which the real node must honour: pinned to
    // the node by its hostname label, tolerating a taint, a PriorityClass, a disruption
    // budget.
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(tb.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .remove(0)
        .name_any();
    let _priority = PriorityClassGuard::create(&tb, &format!("{ns}-builders"), 1000).await;
    bp.spec.builders = Some(
        serde_json::from_value(json!({
            "image": IMAGE, "minReplicas": 1, "maxReplicas": 4, "targetQueueDepthPerBuilder": 2,
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "blocksmith.io/dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": format!("{ns}-builders"),
            "podLabels": {"team": "data"},
            "podAnnotations": {"example.com/owner": "data"},
            "podDisruptionBudget": {"maxUnavailable": 1},
        }))
        .unwrap(),
    );
    apply_pipeline(&tb, &ns, &bp).await;

    // The HPA scales the builders up with the queue: four pods, Ready, under the builder
    // ServiceAccount.
    let scaling_log = log_scaling(ns.clone());
    let builders = wait_for("4 builder pods Ready", Duration::from_secs(180), || async {
        let ready = ready_pods(&pods, "app.kubernetes.io/name=blocksmith-builder").await;
        (ready.len() == 4).then_some(ready)
    })
    .await;
    scaling_log.abort();
    broker.set_round_trip_time(Duration::from_millis(300));
    for p in &builders {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("blocksmith-builder")
        );
        assert_eq!(spec.containers[0].image.as_deref(), Some(IMAGE));
        assert_eq!(spec.node_name.as_deref(), Some(node.as_str()));
        assert_eq!(spec.priority, Some(1000), "the PriorityClass resolved");
        assert!(
            spec.tolerations
                .iter()
                .flatten()
                .any(|t| t.key.as_deref() == Some("blocksmith.io/dedicated"))
        );
        let security = spec.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_user, Some(65532));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(p.labels().get("team").map(String::as_str), Some("data"));
        assert_eq!(
            p.annotations().get("example.com/owner").map(String::as_str),
            Some("data")
        );
    }
    // The disruption budget counts the builders (its controller sees all four).
    let groups = tb.client.list_api_groups().await.unwrap();
    let version = blocksmith_operator::builders::disruption_budget_version(&groups).unwrap();
    let budgets: Api<kube::api::DynamicObject> = Api::namespaced_with(
        tb.client.clone(),
        &ns,
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "policy",
            version,
            "PodDisruptionBudget",
        )),
    );
    wait_for(
        "the builders' disruption budget counting 4 pods",
        Duration::from_secs(60),
        || async {
            let b = budgets.get_opt("orders-builder").await.ok()??;
            (b.data["status"]["expectedPods"] == 4).then_some(())
        },
    )
    .await;
    let mut builder_names = pod_names(&builders);
    // Busy builders are marked costly to delete, so that scaling down takes idle ones first.
    wait_for(
        "a busy builder pod marked",
        Duration::from_secs(60),
        || async {
            builder_pods(&pods)
                .await?
                .iter()
                .any(|p| p.annotations().get(DELETION_COST).map(String::as_str) == Some("1000"))
                .then_some(())
        },
    )
    .await;

    // A busy builder pod dies (frozen in its job, then deleted with a 1 s grace period: it
    // never answers): another builder takes the job over once its lease expires.
    let (victim, job) = loop {
        let running = jobs(&tb, &ns, "orders").await.into_iter().find(|j| {
            j.phase() == JobPhase::Running && holder(j).is_some_and(|h| builder_names.contains(&h))
        });
        let Some(job) = running else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let victim = holder(&job).unwrap();
        let pid = container_pid(&pods, &victim).await;
        signal(pid, "STOP");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let still = jobs(&tb, &ns, "orders")
            .await
            .into_iter()
            .find(|j| j.metadata.name == job.metadata.name)
            .filter(|j| j.phase() == JobPhase::Running && holder(j).as_deref() == Some(&victim));
        if still.is_some() {
            break (victim, job);
        }
        signal(pid, "CONT");
    };
    let (ok, out) = kubectl(&[
        "delete",
        "pod",
        "-n",
        &ns,
        &victim,
        "--grace-period=1",
        "--wait=false",
    ]);
    assert!(ok, "kubectl delete pod {victim}: {out}");
    let taken_over = wait_for(
        "the dead builder's job done by another",
        Duration::from_secs(120),
        || async {
            jobs(&tb, &ns, "orders")
                .await
                .into_iter()
                .find(|j| j.metadata.name == job.metadata.name)
                .filter(|j| j.phase() == JobPhase::Succeeded)
        },
    )
    .await;
    let new_holder = holder(&taken_over).unwrap();
    assert_ne!(
        new_holder, victim,
        "the job was finished by another builder"
    );

    // The leader pod is deleted: the standby takes over within the lease, and planning and
    // commits go on.
    let deleted_at = Instant::now();
    // (Not waiting for the pod to be gone: the node's kubelet sometimes keeps a pod whose
    // process exited by itself for a minute more, which is not what is measured here.)
    let (ok, out) = kubectl(&["delete", "pod", "-n", &release_ns, &leader, "--wait=false"]);
    assert!(ok, "kubectl delete pod {leader}: {out}");
    // (The standby, or the pod the Deployment starts in the leader's place.)
    let new_leader = wait_for("a new leader", Duration::from_secs(60), || async {
        operator_leader(&tb, &release_ns)
            .await
            .filter(|h| *h != leader)
    })
    .await;
    let handover = deleted_at.elapsed();
    println!("leadership moved from {leader} to {new_leader} in {handover:?}");
    // The deleted leader releases the lease once its controller has stopped (SIGTERM); the
    // standby takes it at its next attempt (every 2.5 s). Had the release failed, the standby
    // would wait out the chart's 15 s lease from its own sight of the last renewal (renewed
    // every 2.5 s): at least 12.5 s.
    assert!(
        handover < Duration::from_secs(10),
        "handover took {handover:?}"
    );

    // Everything is committed; the blocks hold every record exactly once.
    let group = default_consumer_group(&ns, "orders");
    let committed = wait_all_committed(
        &broker.testbed(&tb),
        &group,
        topic,
        &high_watermarks(&produced),
        Duration::from_secs(300),
    )
    .await;
    audit_exact(
        &tb,
        &tb.s3_root.join(&tb.s3_bucket).join(&ns),
        &produced,
        &committed,
    );
    let all_jobs = jobs(&tb, &ns, "orders").await;
    for j in &all_jobs {
        builder_names.extend(
            pods.get_opt(&holder(j).unwrap())
                .await
                .ok()
                .flatten()
                .and_then(|p| p.metadata.name),
        );
    }
    let seen = builder_pod_log.lock().unwrap().clone();
    for j in &all_jobs {
        let h = holder(j).unwrap();
        assert!(
            builder_names.contains(&h) || seen.contains(&h),
            "job {:?} was held by {h}, not a builder pod",
            j.metadata.name
        );
    }

    // The queue is empty: the HPA scales the builders back down to one. Each pod removed gets
    // SIGTERM and exits on its own within its grace period (exit 0, not killed).
    let scaled = wait_for(
        "scaled down to 1 builder pod, every removed one ended",
        Duration::from_secs(240),
        || async {
            let all = builder_pods(&pods).await?;
            let (gone, live): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|p| p.metadata.deletion_timestamp.is_some());
            let ends: Option<BTreeMap<String, Option<i32>>> = gone
                .iter()
                .map(|p| Some((p.name_any(), container_end(p)?)))
                .collect();
            // What the kubelet reported of each, for a failure to explain itself.
            let statuses: BTreeMap<String, serde_json::Value> = gone
                .iter()
                .map(|p| {
                    let status = p.status.as_ref();
                    let containers = status.and_then(|s| s.container_statuses.as_ref());
                    (p.name_any(), json!({"phase": status.and_then(|s| s.phase.as_ref()), "containers": containers}))
                })
                .collect();
            (live.len() == 1).then_some((ends?, statuses))
        },
    )
    .await;
    let (scaled, statuses) = scaled;
    println!(
        "builder pods at the end: {scaled:?}; seen: {:?}",
        builder_pod_log.lock().unwrap()
    );
    let exits: BTreeMap<_, _> = scaled
        .into_iter()
        .filter_map(|(name, end)| Some((name, end?)))
        .collect();
    let scaled_down: BTreeMap<_, _> = exits.iter().filter(|(name, _)| **name != victim).collect();
    // (A pod removed before its container started, e.g. the dead builder's replacement,
    // leaves no exit code.)
    assert!(
        !scaled_down.is_empty(),
        "builder pods were scaled down: {exits:?}; their statuses: {statuses:#?}"
    );
    assert!(
        scaled_down.values().all(|code| **code == 0),
        "every scaled-down builder exited by itself: {exits:?}"
    );

    // The chart's liveness probe on a real kubelet: a standby operator pod, frozen, stops
    // answering /healthz and is killed and started again (after three failed probes and its
    // termination grace period).
    let standby = wait_for(
        "a Ready standby operator pod",
        Duration::from_secs(60),
        || async {
            let ready = ready_pods(&operator_pods, OPERATOR_SELECTOR).await;
            let leader = operator_leader(&tb, &release_ns).await?;
            ready
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .find(|n| *n != leader)
        },
    )
    .await;
    signal(container_pid(&operator_pods, &standby).await, "STOP");
    wait_for(
        "the frozen operator pod restarted by its liveness probe",
        Duration::from_secs(180),
        || async {
            let p = operator_pods.get(&standby).await.ok()?;
            let status = p
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .clone();
            (status.restart_count >= 1 && is_ready(&p)).then_some(())
        },
    )
    .await;

    // The node kept every pod's traffic on this machine throughout.
    let dir = tb.dir.to_str().unwrap().to_string();
    let check = std::process::Command::new(blocksmith_e2e::source_dir().join("testbed"))
        .args(["check-isolation", &dir])
        .status()
        .expect("testbed check-isolation");
    assert!(check.success(), "e2e/testbed check-isolation failed");

    let _ = Api::<Deployment>::namespaced(tb.client.clone(), &ns)
        .delete("orders-builder", &DeleteParams::default())
        .await;
}
