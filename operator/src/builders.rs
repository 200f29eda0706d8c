//! Builders as a Deployment per pipeline, scaled by a HorizontalPodAutoscaler on the
//! pipeline's queue depth (an External metric served by [`crate::external_metrics`]).
//! Both objects are owned by the pipeline and written with server-side apply.

use std::collections::BTreeMap;

use blocksmith_crds::BlockPipeline;
use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::pipeline::{BuildersSpec, KafkaSpec};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, SecretKeySelector};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::jobs::MANAGER;
use crate::metrics::Metrics;
use crate::policy::DEFAULT_BUILDER_SERVICE_ACCOUNT;

/// The external metric an HPA scales builders on; selected by `pipeline=<name>`.
pub const QUEUE_METRIC: &str = "blocksmith-queue-depth";

/// Which HPA API the cluster serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoscalingApi {
    V2,
    V2beta2,
    Unavailable,
}

impl AutoscalingApi {
    pub async fn discover(client: &kube::Client) -> kube::Result<Self> {
        let groups = client.list_api_groups().await?;
        let versions: Vec<String> = groups
            .groups
            .iter()
            .filter(|g| g.name == "autoscaling")
            .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
            .collect();
        Ok(if versions.iter().any(|v| v == "v2") {
            AutoscalingApi::V2
        } else if versions.iter().any(|v| v == "v2beta2") {
            AutoscalingApi::V2beta2
        } else {
            AutoscalingApi::Unavailable
        })
    }

    /// The HPA resource of the served version.
    pub fn resource(self) -> Option<ApiResource> {
        self.version().map(hpa_resource)
    }

    fn version(self) -> Option<&'static str> {
        match self {
            AutoscalingApi::V2 => Some("v2"),
            AutoscalingApi::V2beta2 => Some("v2beta2"),
            AutoscalingApi::Unavailable => None,
        }
    }
}

/// Where the builder is in blocksmith's image (`images/Dockerfile`), which holds both
/// binaries and starts the operator by default. Custom builder images must keep this path.
pub const BUILDER_COMMAND: &str = "/usr/local/bin/blocksmith-builder";

pub fn deployment_name(pipeline: &str) -> String {
    format!("{pipeline}-builder")
}

/// The pipeline's Kafka security settings for its builders: librdkafka properties as a value,
/// credentials and CA as references to their Secrets (never copied into the Deployment).
/// `builders.env`, added after, can override any of them.
fn kafka_env(k: &KafkaSpec) -> Vec<Value> {
    let from_secret = |name: &str, s: &SecretKeySelector| json!({"name": name, "valueFrom": {"secretKeyRef": {"name": s.name, "key": s.key}}});
    let mut properties = vec![format!(
        "security.protocol={}",
        k.security_protocol.librdkafka_value()
    )];
    let mut secrets = Vec::new();
    if let Some(sasl) = &k.sasl {
        properties.push(format!("sasl.mechanism={}", sasl.mechanism));
        secrets.push(from_secret(
            "BLOCKSMITH_KAFKA_SASL_USERNAME",
            &sasl.username_secret_ref,
        ));
        secrets.push(from_secret(
            "BLOCKSMITH_KAFKA_SASL_PASSWORD",
            &sasl.password_secret_ref,
        ));
    }
    if let Some(ca) = k.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        secrets.push(from_secret("BLOCKSMITH_KAFKA_SSL_CA_PEM", ca));
    }
    let mut env =
        vec![json!({"name": "BLOCKSMITH_KAFKA_PROPERTIES", "value": properties.join(",")})];
    env.extend(secrets);
    env
}

/// The builder Deployment. Replicas are left to the HPA, except where no HPA API is served.
pub fn deployment(bp: &BlockPipeline, b: &BuildersSpec, autoscaling: AutoscalingApi) -> Deployment {
    let name = bp.name_any();
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "blocksmith-builder".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "blocksmith-operator".to_string(),
        ),
        (LABEL_PIPELINE.to_string(), name.clone()),
    ]);
    let mut env = vec![
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "BLOCKSMITH_BUILDER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "BLOCKSMITH_PIPELINE", "value": name}),
        json!({"name": "BLOCKSMITH_GRACE_PERIOD", "value": "50"}),
    ];
    env.extend(kafka_env(&bp.spec.kafka));
    env.extend(
        b.env
            .iter()
            .map(|e| serde_json::to_value(e).expect("env serializes")),
    );
    let env_from: Vec<Value> = bp
        .spec
        .output
        .credentials_secret_ref
        .iter()
        .map(|s| json!({"secretRef": {"name": s.name}}))
        .collect();
    let mut spec = json!({
        "selector": {"matchLabels": {LABEL_PIPELINE: name, "app.kubernetes.io/name": "blocksmith-builder"}},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "serviceAccountName": b.service_account_name.as_deref().unwrap_or(DEFAULT_BUILDER_SERVICE_ACCOUNT),
                "terminationGracePeriodSeconds": 60,
                "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "builder",
                    "image": b.image,
                    "command": [BUILDER_COMMAND],
                    "env": env,
                    "envFrom": env_from,
                    "resources": b.resources.clone().unwrap_or_default(),
                    "ports": [{"name": "metrics", "containerPort": 8081, "protocol": "TCP"}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "scratch", "mountPath": "/tmp/blocksmith-builder"}],
                }],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
        },
    });
    if autoscaling == AutoscalingApi::Unavailable {
        spec["replicas"] = json!(b.min_replicas);
    }
    let mut d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(&name), "namespace": bp.namespace(), "labels": labels},
        "spec": spec,
    }))
    .expect("deployment manifest");
    d.metadata.owner_references = bp.controller_owner_ref(&()).map(|o| vec![o]);
    d
}

/// The HorizontalPodAutoscaler resource of autoscaling `version`.
fn hpa_resource(version: &str) -> ApiResource {
    let gvk = GroupVersionKind::gvk("autoscaling", version, "HorizontalPodAutoscaler");
    ApiResource::from_gvk(&gvk)
}

/// The HPA: External metric `blocksmith-queue-depth{pipeline=<name>}`, AverageValue target.
pub fn hpa(bp: &BlockPipeline, b: &BuildersSpec, version: &str) -> Value {
    let name = bp.name_any();
    json!({
        "apiVersion": format!("autoscaling/{version}"),
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": deployment_name(&name),
            "namespace": bp.namespace(),
            "labels": {LABEL_PIPELINE: name},
            "ownerReferences": bp.controller_owner_ref(&()).map(|o| vec![o]),
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name(&name)},
            // An HPA cannot go below one replica without the HPAScaleToZero feature gate.
            "minReplicas": b.min_replicas.max(1),
            "maxReplicas": b.max_replicas.max(1),
            "metrics": [{
                "type": "External",
                "external": {
                    "metric": {"name": QUEUE_METRIC, "selector": {"matchLabels": {"pipeline": name}}},
                    "target": {"type": "AverageValue", "averageValue": b.target_queue_depth_per_builder.to_string()},
                },
            }],
        },
    })
}

/// Applies the pipeline's builder Deployment and HPA (or removes them when `spec.builders`
/// is unset). Returns a problem message when no HPA API is served.
pub async fn reconcile(
    client: &kube::Client,
    bp: &BlockPipeline,
    autoscaling: AutoscalingApi,
    metrics: &Metrics,
) -> kube::Result<Option<String>> {
    let ns = bp.namespace().unwrap_or_default();
    let name = deployment_name(&bp.name_any());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let hpa_api = |version: &str| {
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &hpa_resource(version))
    };
    let params = PatchParams::apply(MANAGER).force();
    let Some(b) = &bp.spec.builders else {
        for result in [
            deployments
                .delete(&name, &Default::default())
                .await
                .map(|_| ()),
            match autoscaling.version() {
                Some(v) => hpa_api(v)
                    .delete(&name, &Default::default())
                    .await
                    .map(|_| ()),
                None => Ok(()),
            },
        ] {
            match result {
                Ok(()) => metrics.api_write("delete_builders"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(None);
    };
    metrics.api_write("apply_builders");
    deployments
        .patch(
            &name,
            &params,
            &Patch::Apply(deployment(bp, b, autoscaling)),
        )
        .await?;
    match autoscaling.version() {
        Some(version) => {
            metrics.api_write("apply_builders");
            hpa_api(version)
                .patch(&name, &params, &Patch::Apply(hpa(bp, b, version)))
                .await?;
            Ok(None)
        }
        None => Ok(Some(format!(
            "the cluster serves neither autoscaling/v2 nor autoscaling/v2beta2: builders run at minReplicas ({})",
            b.min_replicas
        ))),
    }
}

/// Pods with a higher cost are removed last when a ReplicaSet scales down.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Deletion cost of a builder pod holding a job (idle pods have the default, 0).
const BUSY_COST: &str = "1000";

/// The pods whose deletion cost must change: `(pod, Some(cost))` to mark a busy pod,
/// `(pod, None)` to clear an idle one. Builder pods hold leases under their pod name.
pub fn deletion_cost_changes(
    pods: &[(String, Option<String>)],
    busy: &[&str],
) -> Vec<(String, Option<&'static str>)> {
    pods.iter()
        .filter_map(|(pod, cost)| {
            let want = busy.contains(&pod.as_str()).then_some(BUSY_COST);
            (cost.as_deref() != want).then(|| (pod.clone(), want))
        })
        .collect()
}

/// Marks the pipeline's busy builder pods (holding a running job) so scale-down prefers idle
/// ones. Writes only where a pod's mark is wrong. Returns the pods as listed.
pub async fn mark_busy_pods(
    client: &kube::Client,
    bp: &BlockPipeline,
    busy: &[&str],
    metrics: &Metrics,
) -> kube::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &bp.namespace().unwrap_or_default());
    let selector = format!(
        "{LABEL_PIPELINE}={},app.kubernetes.io/name=blocksmith-builder",
        bp.name_any()
    );
    let listed = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    let current: Vec<(String, Option<String>)> = listed
        .items
        .iter()
        .map(|p| (p.name_any(), p.annotations().get(DELETION_COST).cloned()))
        .collect();
    for (pod, cost) in deletion_cost_changes(&current, busy) {
        let patch = json!({"metadata": {"annotations": {DELETION_COST: cost}}});
        metrics.api_write("pod_deletion_cost");
        match pods
            .patch(&pod, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(listed.items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(builders: serde_json::Value) -> BlockPipeline {
        let mut bp: BlockPipeline = serde_json::from_value(json!({
            "apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline",
            "metadata": {"name": "orders", "namespace": "data", "uid": "u-1"},
            "spec": {
                "kafka": {"bootstrapServers": "k:9092", "topic": "orders"},
                "output": {"url": "s3://b/p", "credentialsSecretRef": {"name": "s3"}},
                "builders": builders,
            }
        }))
        .unwrap();
        bp.metadata.uid = Some("u-1".into());
        bp
    }

    #[test]
    fn builders_get_the_kafka_security_settings_with_credentials_by_reference() {
        let mut p = bp(json!({"image": "img:1"}));
        p.spec.kafka = serde_json::from_value(json!({
            "bootstrapServers": "k:9093", "topic": "orders", "securityProtocol": "SASL_SSL",
            "sasl": {
                "mechanism": "SCRAM-SHA-512",
                "usernameSecretRef": {"name": "kafka", "key": "user"},
                "passwordSecretRef": {"name": "kafka", "key": "pass"},
            },
            "tls": {"caSecretRef": {"name": "kafka-ca", "key": "ca.pem"}},
        }))
        .unwrap();
        let b = p.spec.builders.clone().unwrap();
        let d = serde_json::to_value(deployment(&p, &b, AutoscalingApi::V2)).unwrap();
        let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
        let var = |name: &str| {
            env.as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("{name} missing from {env}"))
        };
        assert_eq!(
            var("BLOCKSMITH_KAFKA_PROPERTIES")["value"],
            "security.protocol=sasl_ssl,sasl.mechanism=SCRAM-SHA-512"
        );
        assert_eq!(
            var("BLOCKSMITH_KAFKA_SASL_USERNAME")["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka", "key": "user"})
        );
        assert_eq!(
            var("BLOCKSMITH_KAFKA_SASL_PASSWORD")["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka", "key": "pass"})
        );
        assert_eq!(
            var("BLOCKSMITH_KAFKA_SSL_CA_PEM")["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka-ca", "key": "ca.pem"})
        );
        // A plaintext pipeline gets only the protocol.
        let plain = bp(json!({"image": "img:1"}));
        let env = kafka_env(&plain.spec.kafka);
        assert_eq!(
            env,
            vec![
                json!({"name": "BLOCKSMITH_KAFKA_PROPERTIES", "value": "security.protocol=plaintext"})
            ]
        );
    }

    #[test]
    fn deployment_leaves_replicas_to_the_hpa_unless_none_is_served() {
        let p = bp(json!({"image": "img:1", "minReplicas": 2, "maxReplicas": 5}));
        let b = p.spec.builders.clone().unwrap();
        let d = deployment(&p, &b, AutoscalingApi::V2beta2);
        let spec = d.spec.clone().unwrap();
        assert_eq!(spec.replicas, None);
        assert_eq!(d.metadata.name.as_deref(), Some("orders-builder"));
        assert_eq!(d.metadata.owner_references.unwrap()[0].uid, "u-1");
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        assert_eq!(c.command, Some(vec![BUILDER_COMMAND.to_string()]));
        let env: Vec<_> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
        assert!(
            env.contains(&"BLOCKSMITH_PIPELINE".to_string())
                && env.contains(&"BLOCKSMITH_BUILDER_ID".to_string())
        );
        assert_eq!(
            c.env_from.clone().unwrap()[0]
                .secret_ref
                .as_ref()
                .unwrap()
                .name,
            "s3"
        );
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );

        let fixed = deployment(&p, &b, AutoscalingApi::Unavailable);
        assert_eq!(fixed.spec.unwrap().replicas, Some(2));
    }

    #[test]
    fn hpa_targets_the_queue_depth_per_builder() {
        let p = bp(
            json!({"image": "img:1", "minReplicas": 0, "maxReplicas": 5, "targetQueueDepthPerBuilder": 3}),
        );
        let h = hpa(&p, p.spec.builders.as_ref().unwrap(), "v2beta2");
        assert_eq!(h["apiVersion"], "autoscaling/v2beta2");
        assert_eq!(h["spec"]["minReplicas"], 1, "an HPA cannot scale to zero");
        assert_eq!(h["spec"]["maxReplicas"], 5);
        let m = &h["spec"]["metrics"][0]["external"];
        assert_eq!(m["metric"]["name"], QUEUE_METRIC);
        assert_eq!(m["metric"]["selector"]["matchLabels"]["pipeline"], "orders");
        assert_eq!(
            m["target"],
            json!({"type": "AverageValue", "averageValue": "3"})
        );
        assert_eq!(h["spec"]["scaleTargetRef"]["name"], "orders-builder");
    }

    #[test]
    fn only_wrong_deletion_costs_change() {
        let pods = vec![
            ("busy-marked".to_string(), Some("1000".to_string())),
            ("busy-unmarked".to_string(), None),
            ("idle-marked".to_string(), Some("1000".to_string())),
            ("idle".to_string(), None),
        ];
        let changes = deletion_cost_changes(&pods, &["busy-marked", "busy-unmarked"]);
        assert_eq!(
            changes,
            vec![
                ("busy-unmarked".to_string(), Some("1000")),
                ("idle-marked".to_string(), None)
            ]
        );
    }
}
