//! The rendered manifest (`helm.py template`, which never touches the cluster): the
//! APIService, RBAC and a hardened operator Deployment, as configured.

use blocksmith_e2e::Testbed;
use serde_json::json;

use super::*;

#[tokio::test]
async fn chart_renders_the_apiservice_rbac_and_a_hardened_operator() {
    let tb = Testbed::get().await;
    let docs = render(&tb, &["builders.namespaces={team-a,team-b}"])
        .await
        .expect("render with defaults");

    // Standard labels everywhere; CRDs are never part of the release (so never deleted).
    for d in &docs {
        let labels = &d["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/name"],
            "blocksmith",
            "{}",
            describe(d)
        );
        assert_eq!(
            labels["app.kubernetes.io/instance"],
            RELEASE,
            "{}",
            describe(d)
        );
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "Helm",
            "{}",
            describe(d)
        );
        assert_ne!(d["kind"], "CustomResourceDefinition");
    }

    // The APIService for external metrics, pointing at the operator's TLS listener.
    let api = get(&docs, "APIService", None, "v1beta1.external.metrics.k8s.io");
    assert_eq!(api["apiVersion"], "apiregistration.k8s.io/v1");
    let spec = &api["spec"];
    assert_eq!(spec["group"], "external.metrics.k8s.io");
    assert_eq!(spec["version"], "v1beta1");
    assert_eq!(spec["insecureSkipTLSVerify"], true);
    assert_eq!(spec["groupPriorityMinimum"], 100);
    assert_eq!(spec["versionPriority"], 100);
    assert_eq!(spec["service"]["namespace"], RELEASE_NS);
    assert_eq!(spec["service"]["port"], 443);
    let svc_name = spec["service"]["name"].as_str().unwrap();
    let svc = get(&docs, "Service", Some(RELEASE_NS), svc_name);
    assert_eq!(svc["spec"]["ports"][0]["port"], 443);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "ext-metrics");
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/component"],
        "operator"
    );
    // The HPA controller may read external metrics; the operator may delegate auth.
    let hpa = get(
        &docs,
        "ClusterRoleBinding",
        None,
        "blocksmith-external-metrics-hpa-controller",
    );
    assert_eq!(hpa["subjects"][0]["name"], "horizontal-pod-autoscaler");
    assert_eq!(hpa["subjects"][0]["namespace"], "kube-system");
    let reader = get(
        &docs,
        "ClusterRole",
        None,
        hpa["roleRef"]["name"].as_str().unwrap(),
    );
    assert_eq!(
        strings(&reader["rules"][0]["apiGroups"]),
        ["external.metrics.k8s.io"]
    );
    assert_eq!(
        strings(&reader["rules"][0]["verbs"]),
        ["get", "list", "watch"]
    );
    // Nothing the external-metrics server does not use yet: it authenticates no caller, so
    // it gets no TokenReview/SubjectAccessReview rights and no request-header CA.
    assert!(docs.iter().all(|d| {
        let role = d["roleRef"]["name"].as_str().unwrap_or_default();
        role != "system:auth-delegator" && role != "extension-apiserver-authentication-reader"
    }));

    // Namespace users get blocksmith through Kubernetes' default roles.
    let edit = get(&docs, "ClusterRole", None, "blocksmith-edit");
    let labels = &edit["metadata"]["labels"];
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-admin"],
        "true"
    );
    let view = get(&docs, "ClusterRole", None, "blocksmith-view");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert_eq!(
        strings(&view["rules"][0]["verbs"]),
        ["get", "list", "watch"]
    );

    // The operator Deployment.
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "blocksmith-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let args = strings(&c["args"]);
    assert!(args.contains(&"--metrics-addr=0.0.0.0:8080"), "{args:?}");
    assert!(
        args.contains(&"--lease-name=blocksmith-operator"),
        "{args:?}"
    );
    assert!(!args.contains(&"--no-leader-election"), "{args:?}");
    assert!(args.contains(&"--namespace=team-a,team-b"), "{args:?}");
    // The policy, by default: the chart's image, the builder ServiceAccount, labelled Secrets.
    for policy in [
        "--allowed-builder-images=ghcr.io/blocksmith/blocksmith",
        "--allowed-builder-service-accounts=blocksmith-builder",
        "--secret-label=blocksmith.io/pipeline-secret=true",
    ] {
        assert!(args.contains(&policy), "{policy} not in {args:?}");
    }
    let env = c["env"].as_array().unwrap();
    let field_ref = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("env {name}"))["valueFrom"]["fieldRef"]["fieldPath"]
            .clone()
    };
    assert_eq!(field_ref("POD_NAME"), "metadata.name");
    assert_eq!(field_ref("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    let ports = c["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == 8080)
    );
    assert!(ports.iter().any(|p| p["name"] == "ext-metrics"));
    let metrics = get(&docs, "Service", Some(RELEASE_NS), "blocksmith-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "metrics");

    // Operator RBAC: its role bound in the pipelines' namespaces only; the Lease only in its
    // own namespace.
    get(&docs, "ClusterRole", None, "blocksmith-operator");
    assert!(find(&docs, "ClusterRoleBinding", None, "blocksmith-operator").is_none());
    for ns in ["team-a", "team-b"] {
        let rb = get(&docs, "RoleBinding", Some(ns), "blocksmith-operator");
        assert_eq!(rb["roleRef"]["kind"], "ClusterRole");
        assert_eq!(rb["roleRef"]["name"], "blocksmith-operator");
        assert_eq!(rb["subjects"][0]["namespace"], RELEASE_NS);
    }
    let lease = get(
        &docs,
        "Role",
        Some(RELEASE_NS),
        "blocksmith-operator-leader-election",
    );
    assert_eq!(lease["rules"][1]["resourceNames"][0], "blocksmith-operator");
    get(
        &docs,
        "RoleBinding",
        Some(RELEASE_NS),
        "blocksmith-operator-leader-election",
    );
    get(
        &docs,
        "ServiceAccount",
        Some(RELEASE_NS),
        "blocksmith-operator",
    );

    // Builders: a ServiceAccount and exactly this Role in each listed namespace.
    for ns in ["team-a", "team-b"] {
        get(&docs, "ServiceAccount", Some(ns), "blocksmith-builder");
        let role = get(&docs, "Role", Some(ns), "blocksmith-builder");
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups": ["blocksmith.io"], "resources": ["blockjobs"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["blocksmith.io"], "resources": ["blockjobs/status"], "verbs": ["patch"]},
            ])
        );
        let rb = get(&docs, "RoleBinding", Some(ns), "blocksmith-builder");
        assert_eq!(rb["subjects"][0]["name"], "blocksmith-builder");
        assert_eq!(rb["subjects"][0]["namespace"], ns);
    }

    // externalMetrics.enabled=false: none of the external-metrics objects.
    let docs = render(&tb, &["externalMetrics.enabled=false"])
        .await
        .expect("render without external metrics");
    assert!(docs.iter().all(|d| d["kind"] != "APIService"));
    assert!(find(&docs, "Service", Some(RELEASE_NS), svc_name).is_none());
    assert!(
        find(
            &docs,
            "ClusterRoleBinding",
            None,
            "blocksmith-external-metrics-hpa-controller"
        )
        .is_none()
    );
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let named = |list: &serde_json::Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .any(|item| item["name"] == name)
    };
    assert!(!named(&c["ports"], "ext-metrics"));
    assert!(!named(&c["env"], "BLOCKSMITH_EXTERNAL_METRICS_ADDR"));
    // The default builders.namespaces: `default`.
    get(
        &docs,
        "ServiceAccount",
        Some("default"),
        "blocksmith-builder",
    );

    // The policy opened up: `*` allows any image or ServiceAccount, "" no Secret label.
    let docs = render(
        &tb,
        &["policy.builderImages={*},policy.builderServiceAccounts={*},policy.secretLabel="],
    )
    .await
    .expect("render an open policy");
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    let args = strings(&dep["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--allowed") || a.starts_with("--secret-label")),
        "{args:?}"
    );

    // Turned off, the default roles get nothing of blocksmith.
    let docs = render(&tb, &["rbac.aggregateToDefaultRoles=false"])
        .await
        .expect("render without aggregated roles");
    assert!(find(&docs, "ClusterRole", None, "blocksmith-edit").is_none());
    assert!(find(&docs, "ClusterRole", None, "blocksmith-view").is_none());

    // watchAllNamespaces: cluster-wide, only when asked for.
    let docs = render(&tb, &["watchAllNamespaces=true"])
        .await
        .expect("render cluster-wide");
    let crb = get(&docs, "ClusterRoleBinding", None, "blocksmith-operator");
    assert_eq!(crb["subjects"][0]["namespace"], RELEASE_NS);
    assert!(find(&docs, "RoleBinding", Some("default"), "blocksmith-operator").is_none());
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    let args = strings(&dep["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );
    // Neither namespaces nor all of them: refused, saying what to set.
    let err = render(&tb, &["builders.namespaces=null"])
        .await
        .expect_err("no namespaces to watch must not render");
    assert!(
        err.contains("builders.namespaces is empty") && err.contains("watchAllNamespaces"),
        "{err}"
    );

    // Without leader election only one replica is allowed, and no Lease permissions exist.
    let docs = render(&tb, &["operator.leaderElection=false,operator.replicas=1"])
        .await
        .expect("render single replica");
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    let args = strings(&dep["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(args.contains(&"--no-leader-election"), "{args:?}");
    assert!(
        find(
            &docs,
            "Role",
            Some(RELEASE_NS),
            "blocksmith-operator-leader-election"
        )
        .is_none()
    );
    let err = render(&tb, &["operator.leaderElection=false"])
        .await
        .expect_err("two replicas without leader election must not render");
    assert!(err.contains("requires operator.replicas=1"), "{err}");
}
