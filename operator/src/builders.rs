//! Builders as a Deployment per pipeline, scaled by a HorizontalPodAutoscaler on the
//! pipeline's queue depth (an External metric served by [`crate::external_metrics`]).
//! Both objects are owned by the pipeline and written with server-side apply.

use std::collections::BTreeMap;

use blocksmith_crds::BlockPipeline;
use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::pipeline::{BuildersSpec, KafkaSpec};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, SecretKeySelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroupList;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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
    /// The HPA API among the API groups the cluster serves.
    pub fn served(groups: &APIGroupList) -> Self {
        let versions = served_versions(groups, "autoscaling");
        if versions.contains(&"v2") {
            AutoscalingApi::V2
        } else if versions.contains(&"v2beta2") {
            AutoscalingApi::V2beta2
        } else {
            AutoscalingApi::Unavailable
        }
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

/// The PodDisruptionBudget version among the API groups the cluster serves (`v1` from
/// Kubernetes 1.21, `v1beta1` before).
pub fn disruption_budget_version(groups: &APIGroupList) -> Option<&'static str> {
    let versions = served_versions(groups, "policy");
    ["v1", "v1beta1"].into_iter().find(|v| versions.contains(v))
}

fn served_versions<'a>(groups: &'a APIGroupList, group: &str) -> Vec<&'a str> {
    groups
        .groups
        .iter()
        .filter(|g| g.name == group)
        .flat_map(|g| g.versions.iter().map(|v| v.version.as_str()))
        .collect()
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
        for (name, selector) in [
            (
                "BLOCKSMITH_KAFKA_SASL_USERNAME",
                sasl.username_secret_ref.as_ref(),
            ),
            (
                "BLOCKSMITH_KAFKA_SASL_PASSWORD",
                sasl.password_secret_ref.as_ref(),
            ),
        ] {
            secrets.extend(selector.map(|s| from_secret(name, s)));
        }
        if let Some(oauth) = &sasl.oauthbearer {
            // Values of their own (a URL or an extension may hold a comma, which separates
            // BLOCKSMITH_KAFKA_PROPERTIES); the client id and secret from the Secret.
            let value = |name: &str, value: &str| json!({"name": name, "value": value});
            secrets.push(value(
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                &oauth.token_endpoint_url,
            ));
            if let Some(scope) = &oauth.scope {
                secrets.push(value("BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_SCOPE", scope));
            }
            if !oauth.extensions.is_empty() {
                secrets.push(value(
                    "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
                    &crate::kafka::extensions_value(&oauth.extensions),
                ));
            }
            secrets.push(from_secret(
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                &oauth.client_id_secret_ref,
            ));
            secrets.push(from_secret(
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
                &oauth.client_secret_secret_ref,
            ));
        }
    }
    let tls = k.tls.as_ref();
    for (name, selector) in [
        (
            "BLOCKSMITH_KAFKA_SSL_CA_PEM",
            tls.and_then(|t| t.ca_secret_ref.as_ref()),
        ),
        (
            "BLOCKSMITH_KAFKA_SSL_CERTIFICATE_PEM",
            tls.and_then(|t| t.certificate_secret_ref.as_ref()),
        ),
        (
            "BLOCKSMITH_KAFKA_SSL_KEY_PEM",
            tls.and_then(|t| t.key_secret_ref.as_ref()),
        ),
    ] {
        if let Some(selector) = selector {
            secrets.push(from_secret(name, selector));
        }
    }
    let mut env =
        vec![json!({"name": "BLOCKSMITH_KAFKA_PROPERTIES", "value": properties.join(",")})];
    env.extend(secrets);
    env
}

/// Pod template annotation holding a digest of the Secrets builders read: a changed Secret
/// changes the template, so the builders roll and read it again.
pub const SECRETS_DIGEST: &str = "blocksmith.io/secrets-digest";

/// A digest of the Secrets a pipeline names (`(name, None)` for one that does not exist), by
/// name and content, so that it changes exactly when one of them does.
pub fn secrets_digest(secrets: &BTreeMap<String, Option<Secret>>) -> String {
    let mut hash = Sha256::new();
    for (name, secret) in secrets {
        hash.update(name.as_bytes());
        hash.update([0]);
        let Some(secret) = secret else {
            hash.update(b"absent\0");
            continue;
        };
        // stringData never comes back from the API server; data holds everything.
        for (key, value) in secret.data.iter().flatten() {
            hash.update((key.len() as u64).to_le_bytes());
            hash.update(key.as_bytes());
            hash.update((value.0.len() as u64).to_le_bytes());
            hash.update(&value.0);
        }
        hash.update([1]);
    }
    hex::encode(&hash.finalize()[..16])
}

/// The builder Deployment, with `minReplicas` replicas when `fixed_replicas` (else they are
/// the autoscaler's). `secrets_digest` is [`secrets_digest`] of the Secrets the pipeline names.
pub fn deployment(
    bp: &BlockPipeline,
    b: &BuildersSpec,
    fixed_replicas: bool,
    secrets_digest: &str,
) -> Deployment {
    let name = bp.name_any();
    let labels = builder_labels(&name);
    let mut pod_labels = b.pod_labels.clone();
    pod_labels.extend(labels.clone());
    let mut pod_annotations = b.pod_annotations.clone();
    pod_annotations.insert(SECRETS_DIGEST.into(), secrets_digest.into());
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
        "selector": {"matchLabels": builder_selector(&name)},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": {
                "serviceAccountName": b.service_account_name.as_deref().unwrap_or(DEFAULT_BUILDER_SERVICE_ACCOUNT),
                "terminationGracePeriodSeconds": 60,
                // The image's own user (images/Dockerfile), so runAsNonRoot holds for images
                // that name their user only by name.
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": BUILDER_UID,
                    "runAsGroup": BUILDER_UID,
                    "fsGroup": BUILDER_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "nodeSelector": b.node_selector,
                "tolerations": b.tolerations,
                "affinity": b.affinity,
                "topologySpreadConstraints": b.topology_spread_constraints,
                "priorityClassName": b.priority_class_name,
                "imagePullSecrets": b.image_pull_secrets,
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
                }],
            },
        },
    });
    if fixed_replicas {
        spec["replicas"] = json!(b.min_replicas);
    }
    drop_empty_fields(&mut spec["template"]["spec"]);
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

/// Removes null and empty fields, so that a pod option left unset is not applied as an owned
/// empty value.
fn drop_empty_fields(pod: &mut Value) {
    if let Some(fields) = pod.as_object_mut() {
        fields.retain(|_, v| match v {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        });
    }
}

/// The labels the operator puts on a pipeline's builders (pods included), which
/// `spec.builders.podLabels` may not override.
pub fn builder_labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "blocksmith-builder".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "blocksmith-operator".to_string(),
        ),
        (LABEL_PIPELINE.to_string(), pipeline.to_string()),
    ])
}

/// The user and group builders run as: the `nonroot` user of blocksmith's image.
pub const BUILDER_UID: i64 = 65532;

/// The PodDisruptionBudget of `version` (`policy/v1` or `v1beta1`) for the pipeline's
/// builders, when `spec.builders.podDisruptionBudget` asks for one.
pub fn disruption_budget(bp: &BlockPipeline, b: &BuildersSpec, version: &str) -> Option<Value> {
    let budget = b.pod_disruption_budget.as_ref()?;
    let name = bp.name_any();
    let mut spec = json!({"selector": {"matchLabels": builder_selector(&name)}});
    if let Some(n) = &budget.max_unavailable {
        spec["maxUnavailable"] = json!(n);
    }
    if let Some(n) = &budget.min_available {
        spec["minAvailable"] = json!(n);
    }
    Some(json!({
        "apiVersion": format!("policy/{version}"),
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": deployment_name(&name),
            "namespace": bp.namespace(),
            "labels": {LABEL_PIPELINE: name},
            "ownerReferences": bp.controller_owner_ref(&()).map(|o| vec![o]),
        },
        "spec": spec,
    }))
}

/// The labels the builder Deployment (and PodDisruptionBudget) select pods by.
fn builder_selector(pipeline: &str) -> Value {
    json!({LABEL_PIPELINE: pipeline, "app.kubernetes.io/name": "blocksmith-builder"})
}

/// The PodDisruptionBudget resource of policy `version`.
fn disruption_budget_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "policy",
        version,
        "PodDisruptionBudget",
    ))
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

/// Who scales a pipeline's builders (the operator's `--builder-autoscaler`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BuilderScaler {
    /// An HPA on the queue depth the operator serves as an external metric.
    #[default]
    Hpa,
    /// No HPA: `minReplicas` builders, for clusters where nothing serves that metric.
    Fixed,
    /// No HPA, and replicas left alone: for an autoscaler of the cluster's own, such as a
    /// KEDA ScaledObject on the `blocksmith_queue_depth_jobs` metric.
    External,
}

/// The cluster's APIs builders need (which HPA and PodDisruptionBudget versions it serves),
/// and who scales them.
#[derive(Clone, Copy, Debug)]
pub struct BuilderApis {
    pub autoscaling: AutoscalingApi,
    pub disruption_budget: Option<&'static str>,
    pub scaler: BuilderScaler,
}

impl BuilderApis {
    /// The HPA resource builders get, if any.
    pub fn hpa_resource(&self) -> Option<ApiResource> {
        (self.scaler == BuilderScaler::Hpa)
            .then(|| self.autoscaling.resource())
            .flatten()
    }

    /// Whether the operator sets the builders' replicas (to `minReplicas`): when it makes no
    /// HPA, unless another autoscaler owns them.
    pub fn fixed_replicas(&self) -> bool {
        match self.scaler {
            BuilderScaler::Hpa => self.autoscaling == AutoscalingApi::Unavailable,
            BuilderScaler::Fixed => true,
            BuilderScaler::External => false,
        }
    }
}

/// Applies the pipeline's builder Deployment, HPA and PodDisruptionBudget (or removes what
/// the spec no longer asks for). Returns a problem message when no HPA API is served.
pub async fn reconcile(
    client: &kube::Client,
    bp: &BlockPipeline,
    apis: BuilderApis,
    secrets_digest: &str,
    metrics: &Metrics,
) -> kube::Result<Option<String>> {
    let ns = bp.namespace().unwrap_or_default();
    let name = deployment_name(&bp.name_any());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let dynamic = |resource: ApiResource| {
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource)
    };
    let hpas = apis.autoscaling.resource().map(dynamic);
    let budgets = apis
        .disruption_budget
        .map(|v| (v, dynamic(disruption_budget_resource(v))));
    let params = PatchParams::apply(MANAGER).force();
    let delete = async |api: Option<&Api<DynamicObject>>| -> kube::Result<()> {
        let Some(api) = api else { return Ok(()) };
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {
                metrics.api_write("delete_builders");
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    };
    let Some(b) = &bp.spec.builders else {
        match deployments.delete(&name, &Default::default()).await {
            Ok(_) => metrics.api_write("delete_builders"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        delete(hpas.as_ref()).await?;
        delete(budgets.as_ref().map(|(_, api)| api)).await?;
        return Ok(None);
    };
    metrics.api_write("apply_builders");
    deployments
        .patch(
            &name,
            &params,
            &Patch::Apply(deployment(bp, b, apis.fixed_replicas(), secrets_digest)),
        )
        .await?;
    if let Some((version, api)) = &budgets {
        match disruption_budget(bp, b, version) {
            Some(budget) => {
                metrics.api_write("apply_builders");
                api.patch(&name, &params, &Patch::Apply(budget)).await?;
            }
            None => delete(Some(api)).await?,
        }
    }
    if apis.scaler != BuilderScaler::Hpa {
        delete(hpas.as_ref()).await?;
        return Ok(None);
    }
    match (apis.autoscaling.version(), &hpas) {
        (Some(version), Some(api)) => {
            metrics.api_write("apply_builders");
            api.patch(&name, &params, &Patch::Apply(hpa(bp, b, version)))
                .await?;
            Ok(None)
        }
        _ => Ok(Some(format!(
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
            "tls": {
                "caSecretRef": {"name": "kafka-ca", "key": "ca.pem"},
                "certificateSecretRef": {"name": "kafka-user", "key": "user.crt"},
                "keySecretRef": {"name": "kafka-user", "key": "user.key"},
            },
        }))
        .unwrap();
        let b = p.spec.builders.clone().unwrap();
        let d = serde_json::to_value(deployment(&p, &b, false, "d")).unwrap();
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
        assert_eq!(
            var("BLOCKSMITH_KAFKA_SSL_CERTIFICATE_PEM")["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka-user", "key": "user.crt"})
        );
        assert_eq!(
            var("BLOCKSMITH_KAFKA_SSL_KEY_PEM")["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka-user", "key": "user.key"})
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
    fn builders_get_the_oauth_client_by_reference_and_its_settings_as_values() {
        let kafka: KafkaSpec = serde_json::from_value(json!({
            "bootstrapServers": "k:9093", "topic": "orders", "securityProtocol": "SASL_SSL",
            "sasl": {
                "mechanism": "OAUTHBEARER",
                "oauthbearer": {
                    "tokenEndpointUrl": "https://sso/token?a=1,2",
                    "clientIdSecretRef": {"name": "oauth", "key": "id"},
                    "clientSecretSecretRef": {"name": "oauth", "key": "secret"},
                    "scope": "kafka openid",
                    "extensions": {"logicalCluster": "lkc-1", "identityPoolId": "pool-2"},
                },
            },
        }))
        .unwrap();
        let from_secret =
            |name: &str, key: &str| json!({"secretKeyRef": {"name": name, "key": key}});
        assert_eq!(
            kafka_env(&kafka),
            vec![
                json!({"name": "BLOCKSMITH_KAFKA_PROPERTIES", "value": "security.protocol=sasl_ssl,sasl.mechanism=OAUTHBEARER"}),
                json!({"name": "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "value": "https://sso/token?a=1,2"}),
                json!({"name": "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_SCOPE", "value": "kafka openid"}),
                json!({"name": "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_EXTENSIONS", "value": "identityPoolId=pool-2,logicalCluster=lkc-1"}),
                json!({"name": "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "valueFrom": from_secret("oauth", "id")}),
                json!({"name": "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "valueFrom": from_secret("oauth", "secret")}),
            ]
        );
    }

    #[test]
    fn deployment_leaves_replicas_to_the_hpa_unless_none_is_served() {
        let p = bp(json!({"image": "img:1", "minReplicas": 2, "maxReplicas": 5}));
        let b = p.spec.builders.clone().unwrap();
        let d = deployment(&p, &b, false, "d");
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

        let fixed = deployment(&p, &b, true, "d");
        assert_eq!(fixed.spec.unwrap().replicas, Some(2));
    }

    #[test]
    fn builder_pods_take_the_pipelines_scheduling_options_and_keep_their_own_labels() {
        let p = bp(json!({
            "image": "img:1",
            "nodeSelector": {"pool": "builders"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "blocks", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"blocksmith.io/pipeline": "orders"}}}],
            "priorityClassName": "batch-low",
            "imagePullSecrets": [{"name": "registry"}],
            "podLabels": {"team": "data"},
            "podAnnotations": {"example.com/owner": "data"},
        }));
        let b = p.spec.builders.clone().unwrap();
        let d = serde_json::to_value(deployment(&p, &b, false, "abc")).unwrap();
        let template = &d["spec"]["template"];
        let pod = &template["spec"];
        assert_eq!(pod["nodeSelector"], json!({"pool": "builders"}));
        assert_eq!(pod["tolerations"][0]["key"], "dedicated");
        assert_eq!(
            pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchExpressions"][0]["key"],
            "zone"
        );
        assert_eq!(pod["topologySpreadConstraints"][0]["topologyKey"], "zone");
        assert_eq!(pod["priorityClassName"], "batch-low");
        assert_eq!(pod["imagePullSecrets"], json!([{"name": "registry"}]));
        // A builder writes its block straight to the output: no local volume.
        assert_eq!(pod.get("volumes"), None);
        assert_eq!(pod["securityContext"]["runAsUser"], BUILDER_UID);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let labels = &template["metadata"]["labels"];
        assert_eq!(labels["team"], "data");
        assert_eq!(labels[LABEL_PIPELINE], "orders");
        assert_eq!(labels["app.kubernetes.io/name"], "blocksmith-builder");
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["example.com/owner"], "data");
        assert_eq!(annotations[SECRETS_DIGEST], "abc");

        // Unset options are left out, not applied as empty values the operator would own.
        let plain = bp(json!({"image": "img:1"}));
        let b = plain.spec.builders.clone().unwrap();
        let d = serde_json::to_value(deployment(&plain, &b, false, "abc")).unwrap();
        let pod = d["spec"]["template"]["spec"].as_object().unwrap();
        for unset in [
            "nodeSelector",
            "tolerations",
            "affinity",
            "topologySpreadConstraints",
            "priorityClassName",
            "imagePullSecrets",
        ] {
            assert!(!pod.contains_key(unset), "{unset} in {pod:?}");
        }
    }

    #[test]
    fn a_disruption_budget_only_when_asked_for_selecting_the_builders() {
        let none = bp(json!({"image": "img:1"}));
        assert_eq!(
            disruption_budget(&none, none.spec.builders.as_ref().unwrap(), "v1"),
            None
        );
        let p = bp(json!({"image": "img:1", "podDisruptionBudget": {"maxUnavailable": "25%"}}));
        let b = p.spec.builders.as_ref().unwrap();
        let pdb = disruption_budget(&p, b, "v1beta1").unwrap();
        assert_eq!(pdb["apiVersion"], "policy/v1beta1");
        assert_eq!(pdb["metadata"]["name"], "orders-builder");
        assert_eq!(pdb["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(pdb["spec"]["maxUnavailable"], "25%");
        assert!(pdb["spec"].get("minAvailable").is_none());
        let d = serde_json::to_value(deployment(&p, b, false, "")).unwrap();
        assert_eq!(
            pdb["spec"]["selector"], d["spec"]["selector"],
            "the budget counts exactly the Deployment's pods"
        );
    }

    #[test]
    fn the_secrets_digest_changes_exactly_when_a_named_secret_does() {
        let secret = |data: serde_json::Value| -> Option<Secret> {
            Some(serde_json::from_value(json!({"metadata": {"name": "s"}, "data": data})).unwrap())
        };
        let digest = |entries: Vec<(&str, Option<Secret>)>| {
            secrets_digest(
                &entries
                    .into_iter()
                    .map(|(n, s)| (n.to_string(), s))
                    .collect(),
            )
        };
        let base = digest(vec![("kafka", secret(json!({"password": "YQ=="})))]);
        assert_eq!(
            base,
            digest(vec![("kafka", secret(json!({"password": "YQ=="})))])
        );
        for changed in [
            digest(vec![("kafka", secret(json!({"password": "Yg=="})))]),
            digest(vec![("kafka", secret(json!({"passwor": "ZGE="})))]),
            digest(vec![("kafka", None)]),
            digest(vec![("other", secret(json!({"password": "YQ=="})))]),
            digest(vec![
                ("kafka", secret(json!({"password": "YQ=="}))),
                ("s3", None),
            ]),
        ] {
            assert_ne!(base, changed);
        }
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
    fn builders_get_an_hpa_only_when_it_scales_them() {
        let apis = |autoscaling, scaler| BuilderApis {
            autoscaling,
            disruption_budget: None,
            scaler,
        };
        let hpa = apis(AutoscalingApi::V2, BuilderScaler::Hpa);
        assert!(hpa.hpa_resource().is_some() && !hpa.fixed_replicas());
        let unserved = apis(AutoscalingApi::Unavailable, BuilderScaler::Hpa);
        assert!(unserved.hpa_resource().is_none() && unserved.fixed_replicas());
        let fixed = apis(AutoscalingApi::V2, BuilderScaler::Fixed);
        assert!(fixed.hpa_resource().is_none() && fixed.fixed_replicas());
        let external = apis(AutoscalingApi::V2, BuilderScaler::External);
        assert!(external.hpa_resource().is_none() && !external.fixed_replicas());
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
