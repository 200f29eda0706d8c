//! The Helm chart (`charts/blocksmith`), through `e2e/helm.py` (helm-sdkpy, Helm v4's library):
//! lint is clean; it renders the APIService, RBAC and a hardened operator Deployment as
//! configured; it installs for real into `blocksmith-system` (the namespace of the testbed's
//! operator token), where the restricted tokens prove its RBAC is enough and no more; and
//! uninstalling removes everything but the CRDs.
//!
//! Cluster-scoped objects are shared by every test on the testbed's apiserver, so the real
//! install runs with `externalMetrics.enabled=false`: an APIService whose Service has no
//! endpoints makes `external.metrics.k8s.io` unavailable, which stalls discovery (namespace
//! deletion, garbage collection, kubectl) for everyone, and there can be only one
//! `v1beta1.external.metrics.k8s.io`. The APIService is checked in the rendered manifest
//! (`helm.py template`, which never touches the cluster). Only one test installs into
//! `blocksmith-system`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blocksmith_crds::{BlockJob, BlockPipeline};
use blocksmith_e2e::Testbed;
use blocksmith_e2e::helm::{chart_dir, helm, helm_py, helm_retried};
use blocksmith_e2e::scenario::{apply_pipeline, pipeline, wait_for};
use blocksmith_e2e::scenario::{bare_job, lease_patch};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{SelfSubjectAccessReview, SelfSubjectRulesReview};
use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Resource;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Scope;
use serde::Deserialize;
use serde_json::{Value, json};

const RELEASE: &str = "blocksmith";
/// The operator token authenticates as system:serviceaccount:blocksmith-system:blocksmith-operator.
const RELEASE_NS: &str = "blocksmith-system";
/// The builder token authenticates as system:serviceaccount:default:blocksmith-builder.
const BUILDER_NS: &str = "default";

/// The documents of a rendered manifest, as JSON.
fn documents(manifest: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(manifest)
        .map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("manifest is YAML");
            serde_json::to_value(v).expect("manifest document as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, ns: Option<&str>, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| {
        d["kind"] == kind
            && d["metadata"]["name"] == name
            && d["metadata"]["namespace"].as_str() == ns
    })
}

#[track_caller]
fn get<'a>(docs: &'a [Value], kind: &str, ns: Option<&str>, name: &str) -> &'a Value {
    find(docs, kind, ns, name).unwrap_or_else(|| {
        let have: Vec<String> = docs.iter().map(describe).collect();
        panic!("rendered manifest has no {kind} {ns:?}/{name}; it has {have:#?}")
    })
}

fn describe(d: &Value) -> String {
    format!(
        "{} {}/{}",
        d["kind"].as_str().unwrap_or("?"),
        d["metadata"]["namespace"].as_str().unwrap_or("-"),
        d["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `helm.py template` with the given `--set` values: the rendered manifest's documents.
async fn render(tb: &Testbed, sets: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart_dir();
    let mut args = vec!["template", RELEASE, chart.to_str().unwrap(), RELEASE_NS];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(tb, &args).await.map(|m| documents(&m))
}

// ---------------------------------------------------------------------------------------------
// lint

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A copy of the chart whose values.yaml is the chart's with `edit` applied (Helm's lint
/// takes no values of its own).
fn chart_copy_with(dir: &Path, edit: impl FnOnce(&mut serde_yaml::Value)) -> PathBuf {
    let copy = dir.join("blocksmith");
    copy_dir(&chart_dir(), &copy);
    let path = copy.join("values.yaml");
    let mut values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut values);
    std::fs::write(&path, serde_yaml::to_string(&values).unwrap()).unwrap();
    copy
}

#[tokio::test]
async fn chart_lint_is_clean() {
    let tb = Testbed::get().await;
    let chart = chart_dir();
    let out = helm(&tb, &["lint", "--strict", chart.to_str().unwrap()])
        .await
        .unwrap_or_else(|e| panic!("lint of the chart with its default values: {e}"));
    assert!(
        !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "{out}"
    );

    // The other branches of the templates: a namespaced install without leader election or
    // external metrics, with builder namespaces.
    let tmp = tempfile::tempdir().unwrap();
    let variant = chart_copy_with(tmp.path(), |v| {
        v["watchNamespace"] = "team-a".into();
        v["operator"]["leaderElection"] = false.into();
        v["operator"]["replicas"] = 1.into();
        v["externalMetrics"]["enabled"] = false.into();
        v["builders"]["namespaces"] = serde_yaml::from_str("[team-a, team-b]").unwrap();
    });
    let out = helm(&tb, &["lint", "--strict", variant.to_str().unwrap()])
        .await
        .unwrap_or_else(|e| panic!("lint with a namespaced, single-replica variant: {e}"));
    assert!(
        !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "{out}"
    );

    // And lint does fail on a broken chart, so "clean" above means something.
    let tmp = tempfile::tempdir().unwrap();
    let broken = chart_copy_with(tmp.path(), |_| {});
    std::fs::write(
        broken.join("templates/broken.yaml"),
        "{{ .Values.no.such.value }}\n",
    )
    .unwrap();
    let err = helm(&tb, &["lint", broken.to_str().unwrap()])
        .await
        .expect_err("lint of a broken template must fail");
    assert!(err.contains("lint failed"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// rendering

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
    let delegator = get(
        &docs,
        "ClusterRoleBinding",
        None,
        "blocksmith-operator-auth-delegator",
    );
    assert_eq!(delegator["roleRef"]["name"], "system:auth-delegator");
    assert_eq!(delegator["subjects"][0]["name"], "blocksmith-operator");
    assert_eq!(delegator["subjects"][0]["namespace"], RELEASE_NS);

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
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );
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

    // Operator RBAC: cluster-wide role and binding; the Lease only in its own namespace.
    get(&docs, "ClusterRole", None, "blocksmith-operator");
    let crb = get(&docs, "ClusterRoleBinding", None, "blocksmith-operator");
    assert_eq!(crb["subjects"][0]["namespace"], RELEASE_NS);
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
            "blocksmith-operator-auth-delegator"
        )
        .is_none()
    );
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
    assert!(
        !c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "ext-metrics")
    );
    assert!(
        !c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "BLOCKSMITH_EXTERNAL_METRICS_ADDR")
    );
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == "blocksmith-builder"));

    // watchNamespace: the operator's role is bound in that namespace only.
    let docs = render(&tb, &["watchNamespace=team-a"])
        .await
        .expect("render namespaced");
    assert!(find(&docs, "ClusterRoleBinding", None, "blocksmith-operator").is_none());
    let rb = get(&docs, "RoleBinding", Some("team-a"), "blocksmith-operator");
    assert_eq!(rb["roleRef"]["kind"], "ClusterRole");
    let dep = get(&docs, "Deployment", Some(RELEASE_NS), "blocksmith-operator");
    let args = strings(&dep["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(args.contains(&"--namespace=team-a"), "{args:?}");

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

// ---------------------------------------------------------------------------------------------
// the real install, RBAC with restricted tokens, uninstall

/// A client authenticating with one of the testbed's restricted tokens.
async fn token_client(token_var: &str) -> kube::Client {
    let server = std::env::var("BLOCKSMITH_APISERVER").expect("BLOCKSMITH_APISERVER");
    let token = std::env::var(token_var).unwrap_or_else(|_| panic!("{token_var} is not set"));
    let kubeconfig: Kubeconfig = serde_yaml::from_value(serde_yaml::to_value(json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tb", "cluster": {"server": server, "certificate-authority": std::env::var("BLOCKSMITH_APISERVER_CA").expect("BLOCKSMITH_APISERVER_CA")}}],
        "users": [{"name": "restricted", "user": {"token": token}}],
        "contexts": [{"name": "restricted", "context": {"cluster": "tb", "user": "restricted"}}],
        "current-context": "restricted",
    })).unwrap())
    .expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    kube::Client::try_from(config).expect("client")
}

/// Is the client's identity allowed `verb` on `group`/`resource`[/`sub`] (SelfSubjectAccessReview)?
async fn can_i(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
    name: Option<&str>,
) -> bool {
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {
            "verb": verb, "group": group, "resource": resource, "subresource": sub,
            "namespace": ns.unwrap_or(""), "name": name.unwrap_or(""),
        }}
    }))
    .unwrap();
    let got = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    got.status.expect("review status").allowed
}

/// Every (group, resource, verb, resourceName) the identity may use in `ns` (cluster-wide
/// grants included), from a SelfSubjectRulesReview.
async fn granted(client: &kube::Client, ns: &str) -> BTreeSet<String> {
    let review: SelfSubjectRulesReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": ns}
    }))
    .unwrap();
    let got = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectRulesReview");
    let status = got.status.expect("rules review status");
    assert!(
        !status.incomplete,
        "rules review incomplete: {:?}",
        status.evaluation_error
    );
    let mut atoms = BTreeSet::new();
    for rule in status.resource_rules {
        let groups = rule.api_groups.unwrap_or_default();
        let resources = rule.resources.unwrap_or_default();
        let names = rule
            .resource_names
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| vec!["*".into()]);
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    for n in &names {
                        atoms.insert(format!("{g}|{r}|{v}|{n}"));
                    }
                }
            }
        }
    }
    atoms
}

fn atoms(rules: &[(&str, &str, &[&str], &str)]) -> BTreeSet<String> {
    rules
        .iter()
        .flat_map(|(g, r, verbs, n)| verbs.iter().map(move |v| format!("{g}|{r}|{v}|{n}")))
        .collect()
}

/// What every authenticated user may do (system:basic-user).
const SELF_REVIEWS: (&str, &str, &[&str], &str) = (
    "authorization.k8s.io",
    "selfsubjectaccessreviews",
    &["create"],
    "*",
);
const SELF_RULES: (&str, &str, &[&str], &str) = (
    "authorization.k8s.io",
    "selfsubjectrulesreviews",
    &["create"],
    "*",
);

const BUILDER_RULES: &[(&str, &str, &[&str], &str)] = &[
    ("blocksmith.io", "blockjobs", &["get", "list", "watch"], "*"),
    ("blocksmith.io", "blockjobs/status", &["patch"], "*"),
    SELF_REVIEWS,
    SELF_RULES,
];

const OPERATOR_RULES: &[(&str, &str, &[&str], &str)] = &[
    (
        "blocksmith.io",
        "blockpipelines",
        &["get", "list", "watch"],
        "*",
    ),
    ("blocksmith.io", "blockpipelines/status", &["patch"], "*"),
    (
        "blocksmith.io",
        "blockpipelines/finalizers",
        &["update"],
        "*",
    ),
    (
        "blocksmith.io",
        "blockjobs",
        &["get", "list", "watch", "create", "patch", "delete"],
        "*",
    ),
    ("blocksmith.io", "blockjobs/status", &["patch"], "*"),
    ("events.k8s.io", "events", &["create", "patch"], "*"),
    ("", "events", &["create", "patch"], "*"),
    ("", "secrets", &["get"], "*"),
    (
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch", "delete"],
        "*",
    ),
    (
        "autoscaling",
        "horizontalpodautoscalers",
        &["get", "list", "watch", "create", "patch", "delete"],
        "*",
    ),
    ("", "pods", &["list", "patch"], "*"),
    SELF_REVIEWS,
    SELF_RULES,
];

const OPERATOR_LEASE_RULES: &[(&str, &str, &[&str], &str)] = &[
    ("coordination.k8s.io", "leases", &["create"], "*"),
    (
        "coordination.k8s.io",
        "leases",
        &["get", "update"],
        "blocksmith-operator",
    ),
];

#[track_caller]
fn assert_forbidden<T>(res: Result<T, kube::Error>, what: &str) {
    match res {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        Err(e) => panic!("{what}: expected 403 Forbidden, got {e}"),
        // (not printing the object: it may be a list of secrets)
        Ok(_) => panic!("{what}: expected 403 Forbidden, but it was allowed"),
    }
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

/// Uninstalls the release when dropped (a failed assertion must not leave it installed).
struct Installed {
    python: PathBuf,
    armed: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(&self.python)
                .arg(helm_py())
                .args(["uninstall", RELEASE, RELEASE_NS])
                .status();
        }
    }
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
        !can_i(
            &builder,
            "list",
            "blocksmith.io",
            "blockjobs",
            Some(BUILDER_NS),
            None
        )
        .await,
        "the builder identity can already list BlockJobs before the chart is installed"
    );
    assert!(
        !can_i(
            &operator,
            "list",
            "blocksmith.io",
            "blockpipelines",
            None,
            None
        )
        .await,
        "the operator identity can already list BlockPipelines before the chart is installed"
    );

    // Install (external metrics off: see the module comment).
    let manifest_file = tempfile::NamedTempFile::new().unwrap();
    let builder_namespaces = format!("builders.namespaces={{{BUILDER_NS},{ns}}}");
    let chart = chart_dir();
    let mut guard = Installed {
        python: tb.python.clone(),
        armed: true,
    };
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
        ("ClusterRoleBinding", None, "blocksmith-operator"),
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
        || async {
            can_i(
                &builder,
                "list",
                "blocksmith.io",
                "blockjobs",
                Some(BUILDER_NS),
                None,
            )
            .await
            .then_some(())
        },
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
                None,
            )
            .await
            .then_some(())
        },
    )
    .await;

    builder_rbac(&tb, &builder, &ns).await;
    operator_rbac(&tb, &operator, &ns).await;
    pipeline_runs_with_the_charts_identities(&tb).await;

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
        (!can_i(
            &builder,
            "list",
            "blocksmith.io",
            "blockjobs",
            Some(BUILDER_NS),
            None,
        )
        .await)
            .then_some(())
    })
    .await;
    assert!(
        !can_i(
            &operator,
            "list",
            "blocksmith.io",
            "blockpipelines",
            None,
            None
        )
        .await
    );
    let _ = Api::<Lease>::namespaced(tb.client.clone(), RELEASE_NS)
        .delete("blocksmith-operator", &DeleteParams::default())
        .await;
}

/// The builder identity (default/blocksmith-builder): read BlockJobs and patch their status in
/// its namespace, and nothing else.
async fn builder_rbac(tb: &Testbed, builder: &kube::Client, other_ns: &str) {
    let name = format!("chart-rbac-{:08x}", rand::random::<u32>());
    let admin_jobs = Api::<BlockJob>::namespaced(tb.client.clone(), BUILDER_NS);
    admin_jobs
        .create(&PostParams::default(), &bare_job(&name))
        .await
        .expect("create job");
    let jobs = Api::<BlockJob>::namespaced(builder.clone(), BUILDER_NS);

    // Allowed, as real requests.
    jobs.list(&ListParams::default())
        .await
        .expect("builder lists jobs");
    jobs.get(&name).await.expect("builder gets a job");
    let _events = jobs
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .expect("builder watches jobs");
    let me = PatchParams::apply("chart-rbac-builder");
    jobs.patch_status(&name, &me, &lease_patch("chart-rbac-builder"))
        .await
        .expect("builder applies blockjobs/status");
    let got = admin_jobs.get_status(&name).await.unwrap();
    assert_eq!(
        got.status.unwrap().lease.unwrap().holder,
        "chart-rbac-builder"
    );

    // Forbidden, as real requests.
    assert_forbidden(
        jobs.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"endOffset": 11}})),
        )
        .await,
        "builder patches a job's spec",
    );
    assert_forbidden(
        jobs.patch(
            &name,
            &me,
            &Patch::Apply(
                json!({"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob",
                                 "spec": {"endOffset": 11}}),
            ),
        )
        .await,
        "builder applies a job's spec",
    );
    assert_forbidden(
        jobs.create(&PostParams::default(), &bare_job(&format!("{name}-x")))
            .await,
        "builder creates a job",
    );
    assert_forbidden(
        jobs.delete(&name, &DeleteParams::default()).await,
        "builder deletes a job",
    );
    let pipelines = Api::<BlockPipeline>::namespaced(builder.clone(), BUILDER_NS);
    assert_forbidden(
        pipelines.list(&ListParams::default()).await,
        "builder lists pipelines",
    );
    assert_forbidden(pipelines.get("any").await, "builder gets a pipeline");
    let bp = pipeline("p", "t", "127.0.0.1:9", "file:///tmp/x", json!({}));
    assert_forbidden(
        pipelines.create(&PostParams::default(), &bp).await,
        "builder creates a pipeline",
    );
    assert_forbidden(
        Api::<Secret>::namespaced(builder.clone(), BUILDER_NS)
            .list(&ListParams::default())
            .await,
        "builder lists secrets",
    );
    assert_forbidden(
        Api::<Secret>::namespaced(builder.clone(), BUILDER_NS)
            .get("any")
            .await,
        "builder gets a secret",
    );
    assert_forbidden(
        Api::<ConfigMap>::namespaced(builder.clone(), BUILDER_NS)
            .list(&ListParams::default())
            .await,
        "builder lists configmaps",
    );
    assert_forbidden(
        Api::<BlockJob>::namespaced(builder.clone(), other_ns)
            .list(&ListParams::default())
            .await,
        "builder lists jobs in a namespace it is not bound in",
    );
    assert_forbidden(
        Api::<BlockJob>::all(builder.clone())
            .list(&ListParams::default())
            .await,
        "builder lists jobs cluster-wide",
    );
    for (verb, group, resource, ns) in [
        ("update", "blocksmith.io", "blockjobs", Some(BUILDER_NS)),
        ("patch", "blocksmith.io", "blockjobs", Some(BUILDER_NS)),
        (
            "update",
            "blocksmith.io",
            "blockjobs/status",
            Some(BUILDER_NS),
        ),
        ("create", "", "pods", Some(BUILDER_NS)),
        ("create", "", "events", Some(BUILDER_NS)),
        ("get", "coordination.k8s.io", "leases", Some(BUILDER_NS)),
        ("create", "apps", "deployments", Some(BUILDER_NS)),
        ("delete", "", "namespaces", None),
        ("list", "", "nodes", None),
    ] {
        assert!(
            !can_i(builder, verb, group, resource, ns, None).await,
            "builder must not {verb} {group}/{resource} in {ns:?}"
        );
    }

    // Nothing beyond the Role (and what every authenticated user has), in its namespace or
    // in any other.
    assert_eq!(granted(builder, BUILDER_NS).await, atoms(BUILDER_RULES));
    assert_eq!(
        granted(builder, other_ns).await,
        atoms(&[SELF_REVIEWS, SELF_RULES])
    );

    admin_jobs
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete job");
}

/// The operator identity (blocksmith-system/blocksmith-operator): everything it needs, as real
/// requests, and nothing cluster-wide it does not.
async fn operator_rbac(tb: &Testbed, operator: &kube::Client, ns: &str) {
    // A pipeline and a secret made by the admin, as a user would.
    let bp = pipeline("p", "t", "127.0.0.1:9", "file:///tmp/x", json!({}));
    apply_pipeline(tb, ns, &bp).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka-sasl"}, "stringData": {"password": "s3cret"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(tb.client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");

    // BlockPipelines: watch cluster-wide, write status only.
    let all_bp = Api::<BlockPipeline>::all(operator.clone());
    let listed = all_bp
        .list(&ListParams::default())
        .await
        .expect("operator lists pipelines cluster-wide");
    assert!(
        listed
            .items
            .iter()
            .any(|p| p.metadata.namespace.as_deref() == Some(ns))
    );
    let _events = all_bp
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .expect("operator watches pipelines");
    let pipelines = Api::<BlockPipeline>::namespaced(operator.clone(), ns);
    let owner = pipelines.get("p").await.expect("operator gets a pipeline");
    pipelines
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"queueDepth": 0}})),
        )
        .await
        .expect("operator patches pipeline status");
    assert_forbidden(
        pipelines
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": true}})),
            )
            .await,
        "operator patches a pipeline's spec",
    );
    assert_forbidden(
        pipelines.delete("p", &DeleteParams::default()).await,
        "operator deletes a pipeline",
    );

    // BlockJobs: create (owned by the pipeline, blockOwnerDeletion set), status, delete.
    let jobs = Api::<BlockJob>::namespaced(operator.clone(), ns);
    let mut j = bare_job("p-p0-00000000000000000000");
    j.metadata.owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    jobs.create(&PostParams::default(), &j)
        .await
        .expect("operator creates a job");
    Api::<BlockJob>::all(operator.clone())
        .list(&ListParams::default())
        .await
        .expect("operator lists jobs cluster-wide");
    jobs.patch_status(
        &j.metadata.name.clone().unwrap(),
        &PatchParams::apply("blocksmith-operator").force(),
        &lease_patch("op"),
    )
    .await
    .expect("operator applies job status");
    jobs.patch(
        j.metadata.name.as_deref().unwrap(),
        &PatchParams::apply("blocksmith-operator"),
        &Patch::Apply(
            json!({"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob",
                             "metadata": {"labels": {"blocksmith.io/phase": "Pending"}}}),
        ),
    )
    .await
    .expect("operator applies job metadata");
    jobs.delete(
        j.metadata.name.as_deref().unwrap(),
        &DeleteParams::background(),
    )
    .await
    .expect("operator deletes a job");

    // Events on the pipeline, both APIs.
    let now = jiff::Timestamp::now().to_string();
    let event: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "p-"},
        "eventTime": now, "reportingController": "blocksmith.io/operator",
        "reportingInstance": "chart-rbac", "action": "Test", "reason": "RBACCheck", "type": "Normal",
        "regarding": {"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline", "name": "p", "namespace": ns},
        "note": "chart RBAC check"
    }))
    .unwrap();
    Api::<Event>::namespaced(operator.clone(), ns)
        .create(&PostParams::default(), &event)
        .await
        .expect("operator creates an events.k8s.io event");
    let core_event: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "p-"},
        "involvedObject": {"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline", "name": "p", "namespace": ns},
        "reason": "RBACCheck", "message": "chart RBAC check", "type": "Normal"
    }))
    .unwrap();
    Api::<CoreEvent>::namespaced(operator.clone(), ns)
        .create(&PostParams::default(), &core_event)
        .await
        .expect("operator creates a core event");

    // Secrets named by a pipeline: get, never list.
    let secrets = Api::<Secret>::namespaced(operator.clone(), ns);
    secrets
        .get("kafka-sasl")
        .await
        .expect("operator gets a secret");
    assert_forbidden(
        secrets.list(&ListParams::default()).await,
        "operator lists secrets",
    );

    // Builder Deployments and HPAs.
    Api::<Deployment>::all(operator.clone())
        .list(&ListParams::default())
        .await
        .expect("operator lists deployments");
    Api::<HorizontalPodAutoscaler>::all(operator.clone())
        .list(&ListParams::default())
        .await
        .expect("operator lists HPAs");

    // Its Lease, in its own namespace only.
    let admin_leases = Api::<Lease>::namespaced(tb.client.clone(), RELEASE_NS);
    let _ = admin_leases
        .delete("blocksmith-operator", &DeleteParams::default())
        .await;
    let leases = Api::<Lease>::namespaced(operator.clone(), RELEASE_NS);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "blocksmith-operator"},
        "spec": {"holderIdentity": "chart-rbac", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("operator creates its lease");
    let mut current = leases
        .get("blocksmith-operator")
        .await
        .expect("operator gets its lease");
    current.spec.as_mut().unwrap().holder_identity = Some("chart-rbac-2".into());
    leases
        .replace("blocksmith-operator", &PostParams::default(), &current)
        .await
        .expect("operator updates its lease");
    assert_forbidden(
        leases.get("someone-elses-lease").await,
        "operator reads another lease",
    );
    assert_forbidden(
        Api::<Lease>::namespaced(operator.clone(), ns)
            .create(&PostParams::default(), &lease)
            .await,
        "operator creates a lease outside its namespace",
    );
    admin_leases
        .delete("blocksmith-operator", &DeleteParams::default())
        .await
        .expect("delete lease");

    // Nothing else: a few real requests, then the authorizer's view.
    assert_forbidden(
        Api::<ConfigMap>::namespaced(operator.clone(), ns)
            .list(&ListParams::default())
            .await,
        "operator lists configmaps",
    );
    assert_forbidden(
        Api::<ConfigMap>::namespaced(operator.clone(), RELEASE_NS)
            .get("kube-root-ca.crt")
            .await,
        "operator reads a configmap in its own namespace",
    );
    // Pods: listed and annotated (pod-deletion-cost of busy builders), never deleted.
    Api::<Pod>::namespaced(operator.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("operator lists pods");
    assert_forbidden(
        Api::<Pod>::namespaced(operator.clone(), ns)
            .delete("no-such-pod", &Default::default())
            .await,
        "operator deletes a pod",
    );
    for (verb, group, resource, namespace) in [
        ("delete", "", "namespaces", None),
        ("create", "", "namespaces", None),
        ("create", "rbac.authorization.k8s.io", "clusterroles", None),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
        ),
        (
            "create",
            "rbac.authorization.k8s.io",
            "rolebindings",
            Some(ns),
        ),
        (
            "escalate",
            "rbac.authorization.k8s.io",
            "clusterroles",
            None,
        ),
        ("impersonate", "", "users", None),
        ("get", "", "configmaps", Some(ns)),
        ("list", "", "secrets", Some(ns)),
        ("watch", "", "secrets", None),
        ("create", "", "secrets", Some(ns)),
        ("create", "", "pods", Some(ns)),
        ("create", "", "serviceaccounts/token", Some(ns)),
        ("update", "blocksmith.io", "blockpipelines", Some(ns)),
        ("delete", "blocksmith.io", "blockpipelines", Some(ns)),
        ("update", "apps", "deployments", Some(ns)),
        ("create", "apiregistration.k8s.io", "apiservices", None),
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
        ),
        ("delete", "coordination.k8s.io", "leases", Some(RELEASE_NS)),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some("kube-system"),
        ),
    ] {
        assert!(
            !can_i(operator, verb, group, resource, namespace, None).await,
            "operator must not {verb} {group}/{resource} in {namespace:?}"
        );
    }
    assert_eq!(granted(operator, ns).await, atoms(OPERATOR_RULES));
    let mut own = atoms(OPERATOR_RULES);
    own.extend(atoms(OPERATOR_LEASE_RULES));
    assert_eq!(granted(operator, RELEASE_NS).await, own);
}

/// A kubeconfig file for one of the testbed's restricted tokens.
fn token_kubeconfig(tb: &Testbed, token_var: &str) -> PathBuf {
    let server = std::env::var("BLOCKSMITH_APISERVER").expect("BLOCKSMITH_APISERVER");
    let token = std::env::var(token_var).unwrap_or_else(|_| panic!("{token_var} is not set"));
    let path = tb
        .dir
        .join(format!("kubeconfig-{}", token_var.to_lowercase()));
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tb", "cluster": {"server": server, "certificate-authority": std::env::var("BLOCKSMITH_APISERVER_CA").expect("BLOCKSMITH_APISERVER_CA")}}],
        "users": [{"name": "restricted", "user": {"token": token}}],
        "contexts": [{"name": "restricted", "context": {"cluster": "tb", "user": "restricted", "namespace": "default"}}],
        "current-context": "restricted",
    });
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// The operator and a builder run as the chart's ServiceAccounts (the testbed's restricted
/// tokens) and take a pipeline in `default` all the way to committed offsets: the chart's
/// RBAC is enough for the real job.
async fn pipeline_runs_with_the_charts_identities(tb: &Testbed) {
    use blocksmith_crds::domain::default_consumer_group;
    use blocksmith_e2e::datagen::{DataSpec, ValueSizes, produce};
    use blocksmith_e2e::scenario::{apply_pipeline, committed_offsets, free_port, pipeline};

    let topic = tb.topic("chart-run", 1);
    let spec = DataSpec {
        value_sizes: ValueSizes::Fixed(100),
        ..DataSpec::new(&topic, 1, 3000)
    };
    let bootstrap = tb.kafka_bootstrap.clone();
    tokio::task::spawn_blocking(move || produce(&bootstrap, &spec))
        .await
        .unwrap()
        .expect("produce");
    let name = format!("chart-run-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let blocks = tb.dir.join("blocks").join(&name);
    std::fs::create_dir_all(&blocks).unwrap();
    let url = format!("file://{}", blocks.display());
    apply_pipeline(
        tb,
        "default",
        &pipeline(
            &name,
            &topic,
            &tb.kafka_bootstrap,
            &url,
            json!({"maxRecords": 1000}),
        ),
    )
    .await;

    let mut op = tb.command("blocksmith-operator");
    op.env(
        "KUBECONFIG",
        token_kubeconfig(tb, "BLOCKSMITH_OPERATOR_TOKEN"),
    )
    .args([
        "--namespace",
        "default",
        "--no-leader-election",
        "--poll-interval",
        "1",
    ])
    .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]);
    let _op = tb.spawn(&format!("{name}-operator"), op);
    let mut b = tb.command("blocksmith-builder");
    b.env(
        "KUBECONFIG",
        token_kubeconfig(tb, "BLOCKSMITH_BUILDER_TOKEN"),
    )
    .args([
        "--namespace",
        "default",
        "--pipeline",
        &name,
        "--identity",
        &format!("{name}-b"),
    ])
    .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
    .arg("--work-dir")
    .arg(tb.dir.join("scratch").join(&name));
    let _b = tb.spawn(&format!("{name}-builder"), b);

    let group = default_consumer_group("default", &name);
    blocksmith_e2e::scenario::wait_for(
        "commit by the chart's identities",
        Duration::from_secs(120),
        || async {
            let (b, g, t) = (tb.kafka_bootstrap.clone(), group.clone(), topic.clone());
            let c = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, 1))
                .await
                .unwrap();
            (c.get(&0) == Some(&3000)).then_some(())
        },
    )
    .await;
    let _ = Api::<blocksmith_crds::BlockPipeline>::namespaced(tb.client.clone(), "default")
        .delete(&name, &Default::default())
        .await;
}
