//! The real install into `blocksmith-system`: every object of the release exists, the
//! restricted tokens get what the RBAC tables say (see `rbac.rs`), a pipeline runs with the
//! chart's identities, and uninstalling removes everything but the CRDs.

use std::path::PathBuf;
use std::time::Duration;

use blocksmith_crds::BlockPipeline;
use blocksmith_e2e::helm::{ReleaseGuard, chart_dir, helm, helm_retried};
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::discovery::Scope;
use serde_json::{Value, json};

use super::rbac::{builder_rbac, can_i, operator_rbac, token_client, token_kubeconfig, user_rbac};
use super::{BUILDER_NS, RELEASE, RELEASE_NS, describe, documents, get};

/// May the builder identity list BlockJobs in its namespace (granted by the chart)?
async fn builder_lists_jobs(builder: &kube::Client) -> bool {
    can_i(
        builder,
        "list",
        "blocksmith.io",
        "blockjobs",
        Some(BUILDER_NS),
    )
    .await
}

/// May the operator identity list BlockPipelines in the builders' namespace (granted by the
/// chart)?
async fn operator_lists_pipelines(operator: &kube::Client) -> bool {
    can_i(
        operator,
        "list",
        "blocksmith.io",
        "blockpipelines",
        Some(BUILDER_NS),
    )
    .await
}

async fn ensure_namespace(tb: &Testbed, name: &str) {
    let api = Api::<Namespace>::all(tb.client.clone());
    wait_for(
        &format!("namespace {name}"),
        Duration::from_secs(120),
        || async {
            match api.get_opt(name).await.expect("get namespace") {
                Some(ns) if ns.metadata.deletion_timestamp.is_none() => Some(()),
                Some(_) => None, // terminating: wait until it is gone
                None => {
                    let ns: Namespace =
                        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
                    match api.create(&PostParams::default(), &ns).await {
                        Ok(_) => Some(()),
                        Err(kube::Error::Api(e)) if e.code == 409 => None,
                        Err(e) => panic!("create namespace {name}: {e}"),
                    }
                }
            }
        },
    )
    .await
}

/// The live object of a manifest document, if it exists.
async fn live(client: &kube::Client, doc: &Value) -> Option<DynamicObject> {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", doc["apiVersion"].as_str().unwrap()),
    };
    let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().unwrap());
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discover {gvk:?}: {e}"));
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            doc["metadata"]["namespace"]
                .as_str()
                .expect("namespaced object has a namespace"),
            &ar,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    api.get_opt(doc["metadata"]["name"].as_str().unwrap())
        .await
        .unwrap_or_else(|e| panic!("get {}: {e}", describe(doc)))
}

#[tokio::test]
async fn chart_installs_with_least_privilege_rbac_and_uninstalls_all_but_crds() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("chart-rbac").await;
    ensure_namespace(&tb, RELEASE_NS).await;
    // A release left behind by an aborted run would make the install fail.
    let _ = helm(&tb, &["uninstall", RELEASE, RELEASE_NS]).await;
    let builder = token_client("BLOCKSMITH_BUILDER_TOKEN").await;
    let operator = token_client("BLOCKSMITH_OPERATOR_TOKEN").await;
    assert!(
        !builder_lists_jobs(&builder).await,
        "the builder identity can already list BlockJobs before the chart is installed"
    );
    assert!(
        !operator_lists_pipelines(&operator).await,
        "the operator identity can already list BlockPipelines before the chart is installed"
    );

    // Install (external metrics off: see the module comment).
    let manifest_file = tempfile::NamedTempFile::new().unwrap();
    let builder_namespaces = format!("builders.namespaces={{{BUILDER_NS},{ns}}}");
    let chart = chart_dir();
    let mut guard = ReleaseGuard::new(&tb, RELEASE, RELEASE_NS);
    let out = helm_retried(
        &tb,
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            RELEASE_NS,
            "--set",
            "externalMetrics.enabled=false",
            // No operator pods here: they would act on every test's pipelines. The operator
            // as pods is `pods.rs`'s test, in namespaces of its own.
            "--set",
            "operator.replicas=0",
            "--set",
            &builder_namespaces,
            "--manifest-out",
            manifest_file.path().to_str().unwrap(),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("install: {e}"));
    assert!(out.contains("\"status\": \"deployed\""), "{out}");
    let docs = documents(&std::fs::read_to_string(manifest_file.path()).unwrap());

    // The expected objects are in the release, and every object of the release exists.
    let expected: &[(&str, Option<&str>, &str)] = &[
        ("Deployment", Some(RELEASE_NS), "blocksmith-operator"),
        ("ServiceAccount", Some(RELEASE_NS), "blocksmith-operator"),
        ("ServiceAccount", Some(BUILDER_NS), "blocksmith-builder"),
        ("ServiceAccount", Some(&ns), "blocksmith-builder"),
        ("ClusterRole", None, "blocksmith-operator"),
        ("RoleBinding", Some(BUILDER_NS), "blocksmith-operator"),
        ("RoleBinding", Some(&ns), "blocksmith-operator"),
        ("ClusterRole", None, "blocksmith-edit"),
        ("ClusterRole", None, "blocksmith-view"),
        (
            "Role",
            Some(RELEASE_NS),
            "blocksmith-operator-leader-election",
        ),
        (
            "RoleBinding",
            Some(RELEASE_NS),
            "blocksmith-operator-leader-election",
        ),
        ("Role", Some(BUILDER_NS), "blocksmith-builder"),
        ("RoleBinding", Some(BUILDER_NS), "blocksmith-builder"),
        ("Role", Some(&ns), "blocksmith-builder"),
        ("RoleBinding", Some(&ns), "blocksmith-builder"),
        ("Service", Some(RELEASE_NS), "blocksmith-metrics"),
    ];
    for (kind, namespace, name) in expected {
        get(&docs, kind, *namespace, name);
    }
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "APIService" && d["kind"] != "CustomResourceDefinition"),
        "externalMetrics.enabled=false renders no APIService; CRDs are never in the release"
    );
    for doc in &docs {
        assert!(
            live(&tb.client, doc).await.is_some(),
            "{} was not created",
            describe(doc)
        );
    }
    let notes = helm(&tb, &["notes", RELEASE, RELEASE_NS])
        .await
        .expect("notes");
    assert!(
        notes.contains("kubectl get bp,bj"),
        "NOTES.txt tells what to do next: {notes}"
    );

    // RBAC takes effect through the authorizer's cache.
    wait_for(
        "builder RBAC in effect",
        Duration::from_secs(30),
        || async { builder_lists_jobs(&builder).await.then_some(()) },
    )
    .await;
    wait_for(
        "operator RBAC in effect",
        Duration::from_secs(30),
        || async {
            can_i(
                &operator,
                "create",
                "coordination.k8s.io",
                "leases",
                Some(RELEASE_NS),
            )
            .await
            .then_some(())
        },
    )
    .await;

    builder_rbac(&tb, &builder, &ns).await;
    operator_rbac(&tb, &operator, &ns).await;
    user_rbac(&tb, &ns).await;
    pipeline_runs_with_the_charts_identities(&tb, &ns).await;

    // Uninstall: every object of the release goes (pods via garbage collection); CRDs stay.
    helm_retried(&tb, &["uninstall", RELEASE, RELEASE_NS])
        .await
        .unwrap_or_else(|e| panic!("uninstall: {e}"));
    guard.armed = false;
    for doc in &docs {
        wait_for(
            &format!("{} deleted", describe(doc)),
            Duration::from_secs(30),
            || async { live(&tb.client, doc).await.is_none().then_some(()) },
        )
        .await;
    }
    let pods = Api::<Pod>::namespaced(tb.client.clone(), RELEASE_NS);
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    wait_for(
        "operator pods garbage-collected",
        Duration::from_secs(60),
        || async {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .expect("list pods")
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let crds = Api::<CustomResourceDefinition>::all(tb.client.clone());
    for crd in ["blockpipelines.blocksmith.io", "blockjobs.blocksmith.io"] {
        assert!(
            crds.get_opt(crd).await.unwrap().is_some(),
            "CRD {crd} must survive uninstall"
        );
    }
    Api::<BlockPipeline>::namespaced(tb.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("pipelines are still served after uninstall");
    let err = helm(&tb, &["manifest", RELEASE, RELEASE_NS])
        .await
        .expect_err("no release after uninstall");
    assert!(err.contains("not found"), "{err}");
    // And the identities lost their permissions with it.
    wait_for("builder RBAC removed", Duration::from_secs(30), || async {
        (!builder_lists_jobs(&builder).await).then_some(())
    })
    .await;
    assert!(!operator_lists_pipelines(&operator).await);
    let _ = Api::<Lease>::namespaced(tb.client.clone(), RELEASE_NS)
        .delete("blocksmith-operator", &DeleteParams::default())
        .await;
}

/// The builder identity (default/blocksmith-builder): read BlockJobs and patch their status in
/// A kubeconfig file for one of the testbed's restricted tokens.
fn token_kubeconfig_file(tb: &Testbed, token_var: &str) -> PathBuf {
    let path = tb
        .dir
        .join(format!("kubeconfig-{}", token_var.to_lowercase()));
    let config = token_kubeconfig(token_var);
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// The operator and a builder run as the chart's ServiceAccounts (the testbed's restricted
/// tokens) and take a pipeline in `default` all the way to committed offsets: the chart's
/// RBAC is enough for the real job. The same operator watches `other_ns` too (one
/// controller per namespace, with no cluster-wide grant) and finishes a pipeline there, run
/// by a builder with the admin's credentials (the builder token is of `default`).
async fn pipeline_runs_with_the_charts_identities(tb: &Testbed, other_ns: &str) {
    use blocksmith_crds::domain::default_consumer_group;
    use blocksmith_e2e::datagen::{DataSpec, ValueSizes};

    let name = format!("chart-run-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut runs = Vec::new();
    for (ns, records) in [("default", 3000), (other_ns, 2000)] {
        let topic = tb.topic(&format!("chart-run-{records}"), 1);
        let spec = DataSpec {
            value_sizes: ValueSizes::Fixed(100),
            ..DataSpec::new(&topic, 1, records)
        };
        produce_data(tb, spec).await;
        let url = file_url(&blocks_dir(tb, &format!("{name}-{ns}")));
        let bp = pipeline(
            &name,
            &topic,
            &tb.kafka_bootstrap,
            &url,
            json!({"maxRecords": 1000}),
        );
        apply_pipeline(tb, ns, &bp).await;
        runs.push((ns, topic, records as i64));
    }

    let mut op = tb.command("blocksmith-operator");
    op.env(
        "KUBECONFIG",
        token_kubeconfig_file(tb, "BLOCKSMITH_OPERATOR_TOKEN"),
    )
    .args([
        "--namespace",
        &format!("default,{other_ns}"),
        "--no-leader-election",
        "--poll-interval",
        "1",
    ])
    .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]);
    let _op = tb.spawn(&format!("{name}-operator"), op);
    let mut builders = Vec::new();
    for (ns, _, _) in &runs {
        let mut b = tb.command("blocksmith-builder");
        if *ns == "default" {
            b.env(
                "KUBECONFIG",
                token_kubeconfig_file(tb, "BLOCKSMITH_BUILDER_TOKEN"),
            );
        }
        b.args([
            "--namespace",
            ns,
            "--pipeline",
            &name,
            "--identity",
            &format!("{name}-{ns}-b"),
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]);
        builders.push(tb.spawn(&format!("{name}-{ns}-builder"), b));
    }

    for (ns, topic, records) in &runs {
        let group = default_consumer_group(ns, &name);
        wait_for(
            &format!("commit in {ns} by the chart's operator identity"),
            Duration::from_secs(120),
            || async {
                let c = group_offsets(&tb.kafka_bootstrap, &group, topic, 1).await;
                (c.get(&0) == Some(records)).then_some(())
            },
        )
        .await;
        let _ = Api::<BlockPipeline>::namespaced(tb.client.clone(), ns)
            .delete(&name, &Default::default())
            .await;
    }
}
