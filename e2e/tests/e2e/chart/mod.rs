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
//!
//! By concern: [`lint`], [`render`] (the manifest, no cluster), [`monitoring`] (the
//! monitoring options rendered, the alerts proven with promtool), [`install`] (the real install
//! and uninstall, and a pipeline run by the chart's identities), [`rbac`] (what the chart's
//! identities may and may not do, as tables).

mod install;
mod lint;
mod monitoring;
mod rbac;
mod render;

use blocksmith_e2e::Testbed;
use blocksmith_e2e::helm::{chart_dir, helm};
use serde::Deserialize;
use serde_json::Value;

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
