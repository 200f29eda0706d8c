//! Whether a pipeline's builders can run, from what Kubernetes says of their Deployment, its
//! pods and its HPA: the reasons a person would otherwise find only with `kubectl describe`
//! on objects they may not know exist.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::DynamicObject;

/// Container waiting reasons that need a person (the others pass by themselves).
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Why the builders cannot run or scale, one line per cause (empty when nothing is wrong).
pub fn builder_troubles(
    deployment: Option<&Deployment>,
    pods: &[Pod],
    hpa: Option<&DynamicObject>,
) -> Vec<String> {
    let mut troubles = Vec::new();
    if let Some(d) = deployment {
        let conditions = d.status.iter().flat_map(|s| s.conditions.iter().flatten());
        for c in conditions {
            let failed = (c.type_ == "ReplicaFailure" && c.status == "True")
                || (c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
            if failed {
                troubles.push(format!(
                    "Deployment {}: {}: {}",
                    d.name_any(),
                    c.reason.as_deref().unwrap_or(&c.type_),
                    c.message.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let Some(status) = &pod.status else { continue };
        let unschedulable = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(c) = unschedulable {
            troubles.push(format!(
                "pod {}: Unschedulable: {}",
                pod.name_any(),
                c.message.as_deref().unwrap_or_default()
            ));
        }
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for c in containers {
            let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
            let Some(w) = waiting.filter(|w| STUCK.contains(&w.reason.as_deref().unwrap_or("")))
            else {
                continue;
            };
            troubles.push(format!(
                "pod {} container {}: {}: {}",
                pod.name_any(),
                c.name,
                w.reason.as_deref().unwrap_or_default(),
                w.message.as_deref().unwrap_or_default()
            ));
        }
    }
    if let Some(h) = hpa {
        let conditions = h.data["status"]["conditions"].as_array();
        for c in conditions.into_iter().flatten() {
            let type_ = c["type"].as_str().unwrap_or_default();
            if matches!(type_, "ScalingActive" | "AbleToScale") && c["status"] == "False" {
                troubles.push(format!(
                    "HorizontalPodAutoscaler {}: {type_}=False ({}): {}",
                    h.name_any(),
                    c["reason"].as_str().unwrap_or_default(),
                    c["message"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    troubles
}

/// The condition message for `troubles`: the first few, and how many more.
pub fn troubles_message(troubles: &[String]) -> Option<String> {
    const SHOWN: usize = 3;
    let (first, rest) = troubles.split_at(troubles.len().min(SHOWN));
    if first.is_empty() {
        return None;
    }
    let mut message = format!("builders cannot run: {}", first.join("; "));
    if !rest.is_empty() {
        message.push_str(&format!("; and {} more", rest.len()));
    }
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": status})).unwrap()
    }

    #[test]
    fn a_healthy_deployment_pods_and_hpa_have_no_troubles() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "orders-builder"},
            "status": {"availableReplicas": 1, "conditions": [
                {"type": "Available", "status": "True"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ]}
        }))
        .unwrap();
        let running = pod(
            "b-1",
            json!({"containerStatuses": [{"name": "builder", "ready": true, "restartCount": 0,
                "image": "i", "imageID": "", "state": {"running": {}}}]}),
        );
        let pulling = pod(
            "b-2",
            json!({"containerStatuses": [{"name": "builder", "ready": false, "restartCount": 0,
                "image": "i", "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        let hpa: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "orders-builder"},
            "status": {"conditions": [{"type": "ScalingActive", "status": "True"}]}
        }))
        .unwrap();
        assert!(builder_troubles(Some(&d), &[running, pulling], Some(&hpa)).is_empty());
        assert_eq!(troubles_message(&[]), None);
    }

    #[test]
    fn each_stuck_object_is_named_with_kubernetes_reason() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "orders-builder"},
            "status": {"conditions": [{"type": "ReplicaFailure", "status": "True",
                "reason": "FailedCreate",
                "message": "pods \"orders-builder-x\" is forbidden: error looking up service account data/nope: serviceaccount \"nope\" not found"}]}
        }))
        .unwrap();
        let pull = pod(
            "b-1",
            json!({"containerStatuses": [{"name": "builder", "ready": false, "restartCount": 0,
                "image": "i", "imageID": "", "state": {"waiting": {"reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"evil:1\""}}}]}),
        );
        let pending = pod(
            "b-2",
            json!({"conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient memory."}]}),
        );
        let hpa: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "orders-builder"},
            "status": {"conditions": [{"type": "ScalingActive", "status": "False",
                "reason": "FailedGetExternalMetric", "message": "unable to get external metric"}]}
        }))
        .unwrap();
        let troubles = builder_troubles(Some(&d), &[pull, pending], Some(&hpa));
        assert_eq!(
            troubles,
            [
                "Deployment orders-builder: FailedCreate: pods \"orders-builder-x\" is forbidden: error looking up service account data/nope: serviceaccount \"nope\" not found",
                "pod b-1 container builder: ImagePullBackOff: Back-off pulling image \"evil:1\"",
                "pod b-2: Unschedulable: 0/1 nodes are available: 1 Insufficient memory.",
                "HorizontalPodAutoscaler orders-builder: ScalingActive=False (FailedGetExternalMetric): unable to get external metric",
            ]
        );
        let message = troubles_message(&troubles).unwrap();
        assert!(
            message.starts_with("builders cannot run: Deployment orders-builder: FailedCreate")
        );
        assert!(message.ends_with("; and 1 more"), "{message}");
    }
}
