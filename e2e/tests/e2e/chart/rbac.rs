//! What the chart's identities may do, as data: requests each makes for real (allowed, or
//! refused with 403), questions put to the authorizer (SelfSubjectAccessReview), and the
//! complete list of what it grants (SelfSubjectRulesReview); each table checked by one loop.

use std::collections::BTreeSet;

use blocksmith_crds::BlockPipeline;
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::authorization::v1::{SelfSubjectAccessReview, SelfSubjectRulesReview};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

use super::{BUILDER_NS, RELEASE_NS};

/// A kubeconfig for one of the testbed's restricted tokens (namespace `default`).
pub fn token_kubeconfig(token_var: &str) -> Value {
    let server = std::env::var("BLOCKSMITH_APISERVER").expect("BLOCKSMITH_APISERVER");
    let ca = std::env::var("BLOCKSMITH_APISERVER_CA").expect("BLOCKSMITH_APISERVER_CA");
    let token = std::env::var(token_var).unwrap_or_else(|_| panic!("{token_var} is not set"));
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tb", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "restricted", "user": {"token": token}}],
        "contexts": [{"name": "restricted", "context": {"cluster": "tb", "user": "restricted", "namespace": "default"}}],
        "current-context": "restricted",
    })
}

/// A client authenticating with one of the testbed's restricted tokens.
pub async fn token_client(token_var: &str) -> kube::Client {
    let kubeconfig: Kubeconfig =
        serde_yaml::from_value(serde_yaml::to_value(token_kubeconfig(token_var)).unwrap())
            .expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    kube::Client::try_from(config).expect("client")
}

// ---------------------------------------------------------------------------------------------
// Requests made for real

const BLOCKSMITH: &str = "/apis/blocksmith.io/v1alpha1";

/// A collection's path: `resource` of `group_version` (`v1` for the core group) in `ns`, or
/// cluster-wide.
fn path(group_version: &str, ns: Option<&str>, resource: &str) -> String {
    let base = match group_version {
        "v1" => "/api/v1".to_string(),
        gv => format!("/apis/{gv}"),
    };
    match ns {
        Some(ns) => format!("{base}/namespaces/{ns}/{resource}"),
        None => format!("{base}/{resource}"),
    }
}

fn blockjobs(ns: &str) -> String {
    format!("{BLOCKSMITH}/namespaces/{ns}/blockjobs")
}

fn blockpipelines(ns: &str) -> String {
    format!("{BLOCKSMITH}/namespaces/{ns}/blockpipelines")
}

/// One request an identity makes, and whether RBAC must let it through.
struct Call {
    what: String,
    allowed: bool,
    method: &'static str,
    path: String,
    body: Option<(&'static str, Value)>,
}

fn may(what: &str, method: &'static str, path: String) -> Call {
    Call {
        what: what.into(),
        allowed: true,
        method,
        path,
        body: None,
    }
}

fn may_not(what: &str, method: &'static str, path: String) -> Call {
    Call {
        allowed: false,
        ..may(what, method, path)
    }
}

impl Call {
    /// A JSON body (create, replace).
    fn json(self, body: impl serde::Serialize) -> Call {
        let body = serde_json::to_value(body).unwrap();
        Call {
            body: Some(("application/json", body)),
            ..self
        }
    }

    fn merge_patch(self, body: Value) -> Call {
        Call {
            body: Some(("application/merge-patch+json", body)),
            ..self
        }
    }

    /// Server-side apply; the path names the field manager.
    fn apply_patch(self, body: Value) -> Call {
        Call {
            body: Some(("application/apply-patch+yaml", body)),
            ..self
        }
    }
}

/// Makes each call in order as `client`: the allowed ones must succeed, the others must be
/// refused with 403 Forbidden.
async fn make_calls(client: &kube::Client, calls: Vec<Call>) {
    for call in calls {
        let mut request = http::Request::builder().method(call.method).uri(&call.path);
        let mut body = Vec::new();
        if let Some((content_type, value)) = &call.body {
            request = request.header("Content-Type", *content_type);
            body = serde_json::to_vec(value).unwrap();
        }
        let result = client.request_text(request.body(body).unwrap()).await;
        let what = &call.what;
        match (call.allowed, result) {
            (true, Ok(_)) => {}
            (true, Err(e)) => panic!("{what}: {e}"),
            (false, Err(kube::Error::Api(e))) if e.code == 403 => {}
            (false, Err(e)) => panic!("{what}: expected 403 Forbidden, got {e}"),
            // (not printing the answer: it may be a list of secrets)
            (false, Ok(_)) => panic!("{what}: expected 403 Forbidden, but it was allowed"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Questions to the authorizer

/// Is the client's identity allowed `verb` on `group`/`resource`[/`sub`] in `ns` (cluster-wide
/// without) (SelfSubjectAccessReview)?
pub async fn can_i(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> bool {
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {
            "verb": verb, "group": group, "resource": resource, "subresource": sub,
            "namespace": ns.unwrap_or(""), "name": "",
        }}
    }))
    .unwrap();
    let got = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    got.status.expect("review status").allowed
}

/// `who` must not (verb, group, resource, namespace) any of `denied`, by the authorizer.
async fn assert_cannot(
    client: &kube::Client,
    who: &str,
    denied: &[(&str, &str, &str, Option<&str>)],
) {
    for (verb, group, resource, ns) in denied {
        assert!(
            !can_i(client, verb, group, resource, *ns).await,
            "{who} must not {verb} {group}/{resource} in {ns:?}"
        );
    }
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

/// (group, resource, verbs, resourceName) rules.
type Rules<'a> = &'a [(&'a str, &'a str, &'a [&'a str], &'a str)];

fn atoms(rules: Rules) -> BTreeSet<String> {
    rules
        .iter()
        .flat_map(|(g, r, verbs, n)| verbs.iter().map(move |v| format!("{g}|{r}|{v}|{n}")))
        .collect()
}

/// What every authenticated user may do (system:basic-user).
const SELF_REVIEWS: Rules = &[
    (
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        &["create"],
        "*",
    ),
    (
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        &["create"],
        "*",
    ),
];

const BUILDER_RULES: Rules = &[
    ("blocksmith.io", "blockjobs", &["get", "list", "watch"], "*"),
    ("blocksmith.io", "blockjobs/status", &["patch"], "*"),
];

/// Watched from a cache, applied, deleted; never read by name.
const WATCH_APPLY_DELETE: &[&str] = &["list", "watch", "create", "patch", "delete"];

const OPERATOR_RULES: Rules = &[
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
    ("blocksmith.io", "blockjobs", WATCH_APPLY_DELETE, "*"),
    ("blocksmith.io", "blockjobs/status", &["patch"], "*"),
    ("events.k8s.io", "events", &["create", "patch"], "*"),
    ("", "secrets", &["get"], "*"),
    ("apps", "deployments", WATCH_APPLY_DELETE, "*"),
    (
        "autoscaling",
        "horizontalpodautoscalers",
        WATCH_APPLY_DELETE,
        "*",
    ),
    (
        "policy",
        "poddisruptionbudgets",
        &["create", "patch", "delete"],
        "*",
    ),
    ("", "pods", &["list", "patch"], "*"),
];

const OPERATOR_LEASE_RULES: Rules = &[
    ("coordination.k8s.io", "leases", &["create"], "*"),
    (
        "coordination.k8s.io",
        "leases",
        &["get", "update"],
        "blocksmith-operator",
    ),
];

/// Its own CRDs, read by name to check their schema holds its fields.
const OPERATOR_CRD_RULES: Rules = &[
    (
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        &["get"],
        "blockpipelines.blocksmith.io",
    ),
    (
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        &["get"],
        "blockjobs.blocksmith.io",
    ),
];

fn all_atoms(rules: &[Rules]) -> BTreeSet<String> {
    rules.iter().flat_map(|r| atoms(r)).collect()
}

// ---------------------------------------------------------------------------------------------
// The two identities

/// The builder identity (default/blocksmith-builder): read BlockJobs and patch their status in
/// its namespace, and nothing else.
pub async fn builder_rbac(tb: &Testbed, builder: &kube::Client, other_ns: &str) {
    let name = format!("chart-rbac-{:08x}", rand::random::<u32>());
    let admin_jobs = Api::<blocksmith_crds::BlockJob>::namespaced(tb.client.clone(), BUILDER_NS);
    admin_jobs
        .create(&PostParams::default(), &bare_job(&name))
        .await
        .expect("create job");
    let jobs = blockjobs(BUILDER_NS);
    let job = format!("{jobs}/{name}");
    let pipelines = blockpipelines(BUILDER_NS);
    let lease = json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "status": { "lease": { "holder": "chart-rbac-builder", "leaseDurationSeconds": 30 } }
    });
    let spec = json!({"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob",
                      "spec": {"endOffset": 11}});
    let bp = pipeline("p", "t", "127.0.0.1:9", "file:///tmp/x", json!({}));
    let secrets = path("v1", Some(BUILDER_NS), "secrets");
    let me = "fieldManager=chart-rbac-builder";
    make_calls(
        builder,
        vec![
            may("builder lists jobs", "GET", jobs.clone()),
            may("builder gets a job", "GET", job.clone()),
            may(
                "builder watches jobs",
                "GET",
                format!("{jobs}?watch=true&timeoutSeconds=1&resourceVersion=0"),
            ),
            may(
                "builder applies blockjobs/status",
                "PATCH",
                format!("{job}/status?{me}"),
            )
            .apply_patch(lease),
            may_not("builder patches a job's spec", "PATCH", job.clone())
                .merge_patch(json!({"spec": {"endOffset": 11}})),
            may_not(
                "builder applies a job's spec",
                "PATCH",
                format!("{job}?{me}"),
            )
            .apply_patch(spec),
            may_not("builder creates a job", "POST", jobs.clone())
                .json(bare_job(&format!("{name}-x"))),
            may_not("builder deletes a job", "DELETE", job.clone()),
            may_not("builder lists pipelines", "GET", pipelines.clone()),
            may_not("builder gets a pipeline", "GET", format!("{pipelines}/any")),
            may_not("builder creates a pipeline", "POST", pipelines).json(bp),
            may_not("builder lists secrets", "GET", secrets.clone()),
            may_not("builder gets a secret", "GET", format!("{secrets}/any")),
            may_not(
                "builder lists configmaps",
                "GET",
                path("v1", Some(BUILDER_NS), "configmaps"),
            ),
            may_not(
                "builder lists jobs in a namespace it is not bound in",
                "GET",
                blockjobs(other_ns),
            ),
            may_not(
                "builder lists jobs cluster-wide",
                "GET",
                format!("{BLOCKSMITH}/blockjobs"),
            ),
        ],
    )
    .await;
    let got = admin_jobs.get_status(&name).await.unwrap();
    assert_eq!(lease_holder(&got), Some("chart-rbac-builder"));

    let ns = Some(BUILDER_NS);
    assert_cannot(
        builder,
        "builder",
        &[
            ("update", "blocksmith.io", "blockjobs", ns),
            ("patch", "blocksmith.io", "blockjobs", ns),
            ("update", "blocksmith.io", "blockjobs/status", ns),
            ("create", "", "pods", ns),
            ("create", "", "events", ns),
            ("get", "coordination.k8s.io", "leases", ns),
            ("create", "apps", "deployments", ns),
            ("delete", "", "namespaces", None),
            ("list", "", "nodes", None),
        ],
    )
    .await;

    // Nothing beyond the Role (and what every authenticated user has), in its namespace or
    // in any other.
    assert_eq!(
        granted(builder, BUILDER_NS).await,
        all_atoms(&[BUILDER_RULES, SELF_REVIEWS])
    );
    assert_eq!(granted(builder, other_ns).await, atoms(SELF_REVIEWS));

    admin_jobs
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete job");
}

/// The operator identity (blocksmith-system/blocksmith-operator): everything it needs in a
/// pipelines' namespace `ns`, as real requests, and nothing it does not, there or anywhere
/// else (no cluster-wide grant at all: the chart binds its role in the pipelines'
/// namespaces only).
pub async fn operator_rbac(tb: &Testbed, operator: &kube::Client, ns: &str) {
    // A pipeline and a secret made by the admin, as a user would.
    let bp = pipeline("p", "t", "127.0.0.1:9", "file:///tmp/x", json!({}));
    apply_pipeline(tb, ns, &bp).await;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka-sasl"}, "stringData": {"password": "s3cret"}
    }))
    .unwrap();
    Api::namespaced(tb.client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");

    // BlockPipelines: watched in the namespace (this one among them); its status written.
    let listed = Api::<BlockPipeline>::namespaced(operator.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("operator lists pipelines in its namespace");
    assert!(
        listed
            .items
            .iter()
            .any(|p| p.metadata.namespace.as_deref() == Some(ns))
    );
    let owner = Api::<BlockPipeline>::namespaced(operator.clone(), ns)
        .get("p")
        .await
        .expect("operator gets a pipeline");
    // BlockJobs: created owned by the pipeline (blockOwnerDeletion set).
    let mut j = bare_job("p-p0-00000000000000000000");
    j.metadata.owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    let jobs = blockjobs(ns);
    let job = format!("{jobs}/{}", j.metadata.name.as_deref().unwrap());
    let pipeline = format!("{}/p", blockpipelines(ns));
    let op = "fieldManager=blocksmith-operator";
    let now = jiff::Timestamp::now().to_string();
    // Typed, so that eventTime is written as the API's MicroTime (microseconds).
    let event: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"generateName": "p-"},
        "eventTime": now, "reportingController": "blocksmith.io/operator",
        "reportingInstance": "chart-rbac", "action": "Test", "reason": "RBACCheck", "type": "Normal",
        "regarding": {"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline", "name": "p", "namespace": ns},
        "note": "chart RBAC check"
    }))
    .unwrap();
    let core_event: k8s_openapi::api::core::v1::Event = serde_json::from_value(json!({
        "metadata": {"generateName": "p-"},
        "involvedObject": {"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockPipeline", "name": "p", "namespace": ns},
        "reason": "RBACCheck", "message": "chart RBAC check", "type": "Normal"
    }))
    .unwrap();
    let secrets = path("v1", Some(ns), "secrets");
    let pods = path("v1", Some(ns), "pods");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "blocksmith-operator"},
        "spec": {"holderIdentity": "chart-rbac", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    make_calls(
        operator,
        vec![
            may(
                "operator watches pipelines",
                "GET",
                format!(
                    "{}?watch=true&timeoutSeconds=1&resourceVersion=0",
                    blockpipelines(ns)
                ),
            ),
            may_not(
                "operator lists pipelines cluster-wide",
                "GET",
                format!("{BLOCKSMITH}/blockpipelines"),
            ),
            may(
                "operator patches pipeline status",
                "PATCH",
                format!("{pipeline}/status"),
            )
            .merge_patch(json!({"status": {"queueDepth": 0}})),
            may_not(
                "operator patches a pipeline's spec",
                "PATCH",
                pipeline.clone(),
            )
            .merge_patch(json!({"spec": {"suspend": true}})),
            may_not("operator deletes a pipeline", "DELETE", pipeline),
            may("operator creates a job", "POST", jobs.clone()).json(&j),
            may("operator lists jobs", "GET", jobs.clone()),
            may_not(
                "operator lists jobs cluster-wide",
                "GET",
                format!("{BLOCKSMITH}/blockjobs"),
            ),
            may(
                "operator applies job status",
                "PATCH",
                format!("{job}/status?{op}&force=true"),
            )
            .apply_patch(json!({
                "apiVersion": "blocksmith.io/v1alpha1",
                "kind": "BlockJob",
                "status": { "lease": { "holder": "op", "leaseDurationSeconds": 30 } }
            })),
            may(
                "operator applies job metadata",
                "PATCH",
                format!("{job}?{op}"),
            )
            .apply_patch(
                json!({"apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob",
                       "metadata": {"labels": {"blocksmith.io/phase": "Pending"}}}),
            ),
            may("operator deletes a job", "DELETE", job)
                .json(json!({"propagationPolicy": "Background"})),
            // Events on the pipeline, through events.k8s.io only (what kube-runtime's
            // Recorder writes).
            may(
                "operator creates an events.k8s.io event",
                "POST",
                path("events.k8s.io/v1", Some(ns), "events"),
            )
            .json(event),
            may_not(
                "operator creates a core event",
                "POST",
                path("v1", Some(ns), "events"),
            )
            .json(core_event),
            // Secrets named by a pipeline: get, never list.
            may(
                "operator gets a secret",
                "GET",
                format!("{secrets}/kafka-sasl"),
            ),
            may_not("operator lists secrets", "GET", secrets),
            // Builder Deployments and HPAs.
            may(
                "operator lists deployments",
                "GET",
                path("apps/v1", Some(ns), "deployments"),
            ),
            may(
                "operator lists HPAs",
                "GET",
                path("autoscaling/v1", Some(ns), "horizontalpodautoscalers"),
            ),
            may_not(
                "operator lists deployments cluster-wide",
                "GET",
                path("apps/v1", None, "deployments"),
            ),
            may_not(
                "operator lists deployments in kube-system",
                "GET",
                path("apps/v1", Some("kube-system"), "deployments"),
            ),
            // Leases: only its own, in its own namespace (created and updated below).
            may_not(
                "operator reads another lease",
                "GET",
                path(
                    "coordination.k8s.io/v1",
                    Some(RELEASE_NS),
                    "leases/someone-elses-lease",
                ),
            ),
            may_not(
                "operator creates a lease outside its namespace",
                "POST",
                path("coordination.k8s.io/v1", Some(ns), "leases"),
            )
            .json(&lease),
            // Nothing else.
            may_not(
                "operator lists configmaps",
                "GET",
                path("v1", Some(ns), "configmaps"),
            ),
            may_not(
                "operator reads a configmap in its own namespace",
                "GET",
                path("v1", Some(RELEASE_NS), "configmaps/kube-root-ca.crt"),
            ),
            // Its own CRDs read by name (their schema checked at start), no other.
            may(
                "operator reads its pipelines' CRD",
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/blockpipelines.blocksmith.io".into(),
            ),
            may(
                "operator reads its jobs' CRD",
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/blockjobs.blocksmith.io".into(),
            ),
            may_not(
                "operator lists CRDs",
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions".into(),
            ),
            // Pods: listed and annotated (pod-deletion-cost of busy builders), never deleted.
            may("operator lists pods", "GET", pods.clone()),
            may_not(
                "operator deletes a pod",
                "DELETE",
                format!("{pods}/no-such-pod"),
            ),
        ],
    )
    .await;

    // Its Lease, in its own namespace: created, read and updated.
    let admin_leases = Api::<Lease>::namespaced(tb.client.clone(), RELEASE_NS);
    let _ = admin_leases
        .delete("blocksmith-operator", &DeleteParams::default())
        .await;
    let leases = Api::<Lease>::namespaced(operator.clone(), RELEASE_NS);
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
    admin_leases
        .delete("blocksmith-operator", &DeleteParams::default())
        .await
        .expect("delete lease");

    let rbac = "rbac.authorization.k8s.io";
    assert_cannot(
        operator,
        "operator",
        &[
            ("delete", "", "namespaces", None),
            ("create", "", "namespaces", None),
            ("create", rbac, "clusterroles", None),
            ("create", rbac, "clusterrolebindings", None),
            ("create", rbac, "rolebindings", Some(ns)),
            ("escalate", rbac, "clusterroles", None),
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
        ],
    )
    .await;
    assert_eq!(
        granted(operator, ns).await,
        all_atoms(&[OPERATOR_RULES, SELF_REVIEWS, OPERATOR_CRD_RULES])
    );
    assert_eq!(
        granted(operator, RELEASE_NS).await,
        all_atoms(&[SELF_REVIEWS, OPERATOR_LEASE_RULES, OPERATOR_CRD_RULES])
    );
    assert_eq!(
        granted(operator, "kube-system").await,
        all_atoms(&[SELF_REVIEWS, OPERATOR_CRD_RULES])
    );
}

/// A client of the testbed's admin acting as `user` (impersonation: the authorizer judges
/// `user`'s own permissions).
async fn impersonating(user: &str) -> kube::Client {
    let mut config = kube::Config::infer().await.expect("testbed kubeconfig");
    config.auth_info.impersonate = Some(user.into());
    kube::Client::try_from(config).expect("client")
}

/// Binds the ClusterRole `role` to `user` in `ns`.
async fn bind(tb: &Testbed, ns: &str, user: &str, role: &str) {
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(tb.client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create role binding");
}

/// Namespace users, through Kubernetes' default roles (the chart aggregates into them): one
/// bound to `edit` manages pipelines and deletes jobs, one bound to `view` reads; neither
/// writes job or pipeline status, nor creates jobs.
pub async fn user_rbac(tb: &Testbed, ns: &str) {
    bind(tb, ns, "alice", "edit").await;
    bind(tb, ns, "bob", "view").await;
    let alice = impersonating("alice").await;
    let bob = impersonating("bob").await;
    // The aggregation controller adds the chart's rules to `edit`; then the authorizer's
    // cache catches up.
    wait_for(
        "edit aggregates BlockPipelines",
        std::time::Duration::from_secs(30),
        || async {
            can_i(
                &alice,
                "create",
                "blocksmith.io",
                "blockpipelines",
                Some(ns),
            )
            .await
            .then_some(())
        },
    )
    .await;
    wait_for(
        "view aggregates BlockPipelines",
        std::time::Duration::from_secs(30),
        || async {
            can_i(&bob, "list", "blocksmith.io", "blockpipelines", Some(ns))
                .await
                .then_some(())
        },
    )
    .await;

    let admin_jobs = Api::<blocksmith_crds::BlockJob>::namespaced(tb.client.clone(), ns);
    for name in ["user-job-a", "user-job-b"] {
        admin_jobs
            .create(&PostParams::default(), &bare_job(name))
            .await
            .expect("create job");
    }
    let jobs = blockjobs(ns);
    let pipelines = blockpipelines(ns);
    let bp = pipeline("users", "t", "127.0.0.1:9", "file:///tmp/x", json!({}));
    let status = json!({"status": {"queueDepth": 7}});
    let lease = json!({"status": {"lease": {"holder": "alice", "leaseDurationSeconds": 30}}});
    make_calls(
        &bob,
        vec![
            may("view lists pipelines", "GET", pipelines.clone()),
            may("view lists jobs", "GET", jobs.clone()),
            may("view gets a job", "GET", format!("{jobs}/user-job-a")),
            may_not("view creates a pipeline", "POST", pipelines.clone()).json(&bp),
            may_not("view deletes a job", "DELETE", format!("{jobs}/user-job-a")),
        ],
    )
    .await;
    make_calls(
        &alice,
        vec![
            may("edit creates a pipeline", "POST", pipelines.clone()).json(&bp),
            may("edit lists pipelines", "GET", pipelines.clone()),
            may(
                "edit changes a pipeline",
                "PATCH",
                format!("{pipelines}/users"),
            )
            .merge_patch(json!({"spec": {"suspend": true}})),
            may_not(
                "edit writes pipeline status",
                "PATCH",
                format!("{pipelines}/users/status"),
            )
            .merge_patch(status),
            may("edit lists jobs", "GET", jobs.clone()),
            may(
                "edit deletes a job (a retry)",
                "DELETE",
                format!("{jobs}/user-job-a"),
            ),
            may_not("edit creates a job", "POST", jobs.clone()).json(bare_job("user-job-c")),
            may_not(
                "edit changes a job's range",
                "PATCH",
                format!("{jobs}/user-job-b"),
            )
            .merge_patch(json!({"spec": {"endOffset": 11}})),
            may_not(
                "edit writes job status",
                "PATCH",
                format!("{jobs}/user-job-b/status"),
            )
            .merge_patch(lease),
            may(
                "edit deletes a pipeline",
                "DELETE",
                format!("{pipelines}/users"),
            ),
        ],
    )
    .await;
    let _ = admin_jobs
        .delete("user-job-b", &DeleteParams::default())
        .await;
}
