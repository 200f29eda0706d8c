//! The whole autoscaling loop on the testbed: the operator serves queue depth through the
//! API aggregator (external.metrics.k8s.io), manages the builder Deployment and HPA, and the
//! real HPA controller scales the Deployment up with the queue and down as it drains.

use std::time::Duration;

use blocksmith_crds::JobPhase;
use blocksmith_e2e::Testbed;
use blocksmith_e2e::datagen::{DataSpec, ValueSizes, produce};
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::json;

const APISERVICE: &str = "v1beta1.external.metrics.k8s.io";

/// Deletes the (cluster-wide) APIService when the test ends, however it ends.
struct ApiServiceGuard;

impl Drop for ApiServiceGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kubectl")
            .args([
                "delete",
                "apiservice",
                APISERVICE,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

fn kubectl(args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn queue_metric(ns: &str, pipeline: &str) -> Option<i64> {
    let raw = kubectl(&[
        "get",
        "--raw",
        &format!(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/blocksmith-queue-depth?labelSelector=pipeline%3D{pipeline}"
        ),
    ]);
    let v: serde_json::Value = serde_json::from_str(&raw).ok()?;
    v["items"][0]["value"].as_str()?.parse().ok()
}

#[tokio::test]
async fn the_hpa_scales_builders_with_the_queue() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("hpa").await;
    let ip =
        std::env::var("BLOCKSMITH_ENDPOINT_IP").expect("BLOCKSMITH_ENDPOINT_IP from the testbed");
    let port = std::net::TcpListener::bind((ip.as_str(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _op = spawn_operator_with(
        &tb,
        &ns,
        "op",
        &["--external-metrics-addr", &format!("{ip}:{port}")],
    );

    // Route the aggregated API to the operator: a selector-less Service, manual Endpoints on
    // the testbed's own interface, and the APIService.
    let apply = |obj: serde_json::Value| {
        let client = tb.client.clone();
        async move {
            let gvk = GroupVersionKind::try_from(
                &obj.get("apiVersion")
                    .zip(obj.get("kind"))
                    .map(|(a, k)| kube::core::TypeMeta {
                        api_version: a.as_str().unwrap().into(),
                        kind: k.as_str().unwrap().into(),
                    })
                    .unwrap(),
            )
            .unwrap();
            let ar = ApiResource::from_gvk(&gvk);
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
                Some(ns) => Api::namespaced_with(client, ns, &ar),
                None => Api::all_with(client, &ar),
            };
            if gvk.kind == "APIService" {
                // The 1.20 aggregator panics on server-side apply ("FieldManager must be
                // installed"): create it the old way.
                let _ = api.delete(&name, &Default::default()).await;
                let obj: DynamicObject = serde_json::from_value(obj).unwrap();
                api.create(&Default::default(), &obj)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
            } else {
                api.patch(
                    &name,
                    &PatchParams::apply("e2e-test").force(),
                    &Patch::Apply(&obj),
                )
                .await
                .unwrap_or_else(|e| panic!("apply {name}: {e}"));
            }
        }
    };
    apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "blocksmith-external-metrics", "namespace": ns},
        "spec": {"ports": [{"port": 443, "targetPort": port, "protocol": "TCP"}]}})).await;
    apply(json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "blocksmith-external-metrics", "namespace": ns},
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"port": port, "protocol": "TCP"}]}]})).await;
    apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "blocksmith-builder", "namespace": ns}})).await;
    let _guard = ApiServiceGuard;
    apply(json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": APISERVICE},
        "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1", "insecureSkipTLSVerify": true,
                 "groupPriorityMinimum": 100, "versionPriority": 100,
                 "service": {"namespace": ns, "name": "blocksmith-external-metrics", "port": 443}}})).await;
    wait_for("APIService available", Duration::from_secs(60), || async {
        let s = kubectl(&[
            "get",
            "apiservice",
            APISERVICE,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
        ]);
        (s.trim() == "True").then_some(())
    })
    .await;

    let topic = tb.topic("hpa", 1);
    let spec = DataSpec {
        value_sizes: ValueSizes::Fixed(64),
        ..DataSpec::new(&topic, 1, 2000)
    };
    let bootstrap = tb.kafka_bootstrap.clone();
    let produced = tokio::task::spawn_blocking(move || produce(&bootstrap, &spec))
        .await
        .unwrap()
        .unwrap();
    let blocks = tb
        .dir
        .join("blocks")
        .join(format!("hpa-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&blocks).unwrap();
    let mut bp = pipeline(
        "p",
        &topic,
        &tb.kafka_bootstrap,
        &format!("file://{}", blocks.display()),
        json!({"maxRecords": 100}),
    );
    bp.spec.builders = Some(
        serde_json::from_value(json!({
            "image": "registry.invalid/blocksmith-builder:test",
            "minReplicas": 1, "maxReplicas": 4, "targetQueueDepthPerBuilder": 2,
        }))
        .unwrap(),
    );
    apply_pipeline(&tb, &ns, &bp).await;

    // 20 claimable jobs → the metric says 20 through the aggregator.
    wait_for("metric = 20", Duration::from_secs(60), || async {
        (queue_metric(&ns, "p") == Some(20)).then_some(())
    })
    .await;

    let deployments: Api<Deployment> = Api::namespaced(tb.client.clone(), &ns);
    let d = deployments
        .get("p-builder")
        .await
        .expect("builder Deployment");
    assert_eq!(
        d.metadata.owner_references.unwrap()[0].kind,
        "BlockPipeline"
    );
    let hpa_ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "autoscaling",
        "v2beta2",
        "HorizontalPodAutoscaler",
    ));
    let hpas: Api<DynamicObject> = Api::namespaced_with(tb.client.clone(), &ns, &hpa_ar);
    let hpa = hpas.get("p-builder").await.expect("builder HPA");
    assert_eq!(
        hpa.data["spec"]["metrics"][0]["external"]["metric"]["name"],
        "blocksmith-queue-depth"
    );

    // The HPA controller scales up to maxReplicas (20 / 2 per builder > 4).
    wait_for("scale-up to 4", Duration::from_secs(120), || async {
        let d = deployments.get("p-builder").await.ok()?;
        (d.spec?.replicas == Some(4)).then_some(())
    })
    .await;

    // Claiming jobs lowers the metric. One claim is made under a builder pod's name (builders
    // in pods use their pod name as identity): that pod is marked costly to delete.
    let pods: Api<Pod> = Api::namespaced(tb.client.clone(), &ns);
    let pod = wait_for("builder pods", Duration::from_secs(60), || async {
        let listed = pods
            .list(&ListParams::default().labels("blocksmith.io/pipeline=p"))
            .await
            .ok()?;
        listed.items.first().and_then(|p| p.metadata.name.clone())
    })
    .await;
    let queued = jobs(&tb, &ns, "p").await;
    FakeBuilder::new(&tb, &ns, &pod)
        .claim(&queued[0])
        .await
        .unwrap();
    let fake = FakeBuilder::new(&tb, &ns, "fake");
    for j in &queued[1..3] {
        fake.claim(j).await.unwrap();
    }
    let cost = |pods: Api<Pod>, pod: String| async move {
        let p = pods.get(&pod).await.ok()?;
        p.metadata
            .annotations
            .unwrap_or_default()
            .get("controller.kubernetes.io/pod-deletion-cost")
            .cloned()
    };
    wait_for("busy pod marked", Duration::from_secs(30), || async {
        (cost(pods.clone(), pod.clone()).await.as_deref() == Some("1000")).then_some(())
    })
    .await;
    wait_for("metric = 17", Duration::from_secs(30), || async {
        (queue_metric(&ns, "p") == Some(17)).then_some(())
    })
    .await;

    // Real builders drain the queue (the fake's 3 jobs come back after their lease); the metric
    // falls to 0 and the HPA scales back down to minReplicas.
    let _b1 = spawn_builder(&tb, &ns, "p", "b1");
    let _b2 = spawn_builder(&tb, &ns, "p", "b2");
    wait_for("queue drained", Duration::from_secs(120), || async {
        let js = jobs(&tb, &ns, "p").await;
        js.iter()
            .all(|j| j.phase() == JobPhase::Succeeded)
            .then_some(())
    })
    .await;
    assert_eq!(queue_metric(&ns, "p"), Some(0));
    wait_for("idle pod unmarked", Duration::from_secs(30), || async {
        cost(pods.clone(), pod.clone())
            .await
            .is_none()
            .then_some(())
    })
    .await;
    wait_for("scale-down to 1", Duration::from_secs(120), || async {
        let h = hpas.get("p-builder").await.ok()?;
        (h.data["status"]["desiredReplicas"].as_i64() == Some(1)).then_some(())
    })
    .await;
    let _ = produced;
}
