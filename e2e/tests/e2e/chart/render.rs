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
    assert_eq!(spec["insecureSkipTLSVerify"], false);
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
    // The external metrics server reviews its callers' tokens and access through the API
    // (system:auth-delegator) and reads the aggregator's client CA from kube-system.
    let delegator = get(
        &docs,
        "ClusterRoleBinding",
        None,
        "blocksmith-external-metrics-auth-delegator",
    );
    assert_eq!(delegator["roleRef"]["name"], "system:auth-delegator");
    assert_eq!(delegator["subjects"][0]["name"], "blocksmith-operator");
    assert_eq!(delegator["subjects"][0]["namespace"], RELEASE_NS);
    let reader = get(
        &docs,
        "RoleBinding",
        Some("kube-system"),
        "blocksmith-external-metrics-auth-reader",
    );
    assert_eq!(
        reader["roleRef"]["name"],
        "extension-apiserver-authentication-reader"
    );
    assert_eq!(reader["subjects"][0]["name"], "blocksmith-operator");

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

/// The API server verifies the external metrics certificate: by default the chart makes a CA
/// and a certificate for the Service's names, gives the CA to the APIService and the
/// certificate to the operator; cert-manager or a Secret of the user's can stand in for it.
#[tokio::test]
async fn the_external_metrics_certificate_is_verified_not_skipped() {
    use base64::Engine;
    let tb = Testbed::get().await;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 text"))
            .unwrap()
    };
    let docs = render(&tb, &[]).await.expect("render with defaults");
    let secret_name = "blocksmith-external-metrics-tls";
    let secret = get(&docs, "Secret", Some(RELEASE_NS), secret_name);
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let api = get(&docs, "APIService", None, "v1beta1.external.metrics.k8s.io");
    assert_eq!(api["spec"]["insecureSkipTLSVerify"], false);
    assert_eq!(
        b64(&api["spec"]["caBundle"]),
        b64(&secret["data"]["ca.crt"])
    );
    // The certificate chains to that CA and names the Service as the API server calls it.
    let dir = tb
        .dir
        .join(format!("chart-cert-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    for key in ["ca.crt", "tls.crt"] {
        std::fs::write(dir.join(key), b64(&secret["data"][key])).unwrap();
    }
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    openssl(&["verify", "-CAfile", "ca.crt", "tls.crt"]);
    let names = openssl(&["x509", "-in", "tls.crt", "-noout", "-ext", "subjectAltName"]);
    let service = format!("blocksmith-external-metrics.{RELEASE_NS}.svc");
    assert!(names.contains(&format!("DNS:{service}")), "{names}");
    // The operator serves it, from the Secret.
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    let pod = &dep["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret_name)
        .expect("the certificate's volume");
    let container = &pod["containers"][0];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the certificate mounted");
    let env = container["env"].as_array().unwrap();
    let dir_var = env
        .iter()
        .find(|e| e["name"] == "BLOCKSMITH_EXTERNAL_METRICS_CERT_DIR")
        .expect("the certificate directory");
    assert_eq!(dir_var["value"], mount["mountPath"]);

    // cert-manager: a Certificate for the same names; its cainjector fills the caBundle.
    let docs = render(
        &tb,
        &[
            "externalMetrics.certificate.source=cert-manager",
            "externalMetrics.certificate.certManager.issuerRef.name=cluster-ca",
            "externalMetrics.certificate.certManager.issuerRef.kind=ClusterIssuer",
        ],
    )
    .await
    .expect("render with cert-manager");
    let certificate = get(
        &docs,
        "Certificate",
        Some(RELEASE_NS),
        "blocksmith-external-metrics",
    );
    assert_eq!(certificate["spec"]["secretName"], secret_name);
    assert!(strings(&certificate["spec"]["dnsNames"]).contains(&service.as_str()));
    assert_eq!(certificate["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    let api = get(&docs, "APIService", None, "v1beta1.external.metrics.k8s.io");
    assert_eq!(
        api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{RELEASE_NS}/blocksmith-external-metrics")
    );
    assert!(api["spec"].get("caBundle").is_none());
    assert!(docs.iter().all(|d| d["kind"] != "Secret"));

    // A Secret of the user's, with its CA.
    let docs = render(
        &tb,
        &[
            "externalMetrics.certificate.source=secret",
            "externalMetrics.certificate.secretName=mine",
            "externalMetrics.certificate.caBundle=PEM",
        ],
    )
    .await
    .expect("render with a Secret");
    let api = get(&docs, "APIService", None, "v1beta1.external.metrics.k8s.io");
    assert_eq!(b64(&api["spec"]["caBundle"]), b"PEM");
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    assert!(
        dep["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "mine")
    );

    // What is missing is named.
    for (sets, expected) in [
        (
            &["externalMetrics.certificate.source=cert-manager"][..],
            "needs externalMetrics.certificate.certManager.issuerRef.name",
        ),
        (
            &["externalMetrics.certificate.source=secret"][..],
            "needs externalMetrics.certificate.secretName and caBundle",
        ),
        (
            &["externalMetrics.certificate.source=vault"][..],
            "use helm, cert-manager or secret",
        ),
    ] {
        let err = render(&tb, sets).await.expect_err(expected);
        assert!(err.contains(expected), "{err}");
    }
}

/// Builders get an HPA only when the chart serves the metric it reads.
#[tokio::test]
async fn builders_get_an_hpa_only_when_the_chart_serves_its_metric() {
    let tb = Testbed::get().await;
    let scaler = |docs: &[Value]| {
        let dep = get(docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
        dep["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "BLOCKSMITH_BUILDER_AUTOSCALER")
            .map(|e| e["value"].as_str().unwrap().to_string())
            .expect("BLOCKSMITH_BUILDER_AUTOSCALER")
    };
    for (sets, expected) in [
        (&[][..], "hpa"),
        (&["externalMetrics.enabled=false"][..], "fixed"),
        (
            &[
                "externalMetrics.enabled=false",
                "builders.autoscaler=external",
            ][..],
            "external",
        ),
    ] {
        let docs = render(&tb, sets).await.expect("render");
        assert_eq!(scaler(&docs), expected, "{sets:?}");
        assert_eq!(
            docs.iter().any(|d| d["kind"] == "APIService"),
            expected == "hpa",
            "{sets:?}"
        );
    }
    let err = render(
        &tb,
        &["externalMetrics.enabled=false", "builders.autoscaler=hpa"],
    )
    .await
    .expect_err("an HPA on a metric nobody serves");
    assert!(err.contains("needs externalMetrics.enabled"), "{err}");
}
