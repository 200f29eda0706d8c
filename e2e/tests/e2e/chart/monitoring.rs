//! The chart's monitoring options, rendered (`helm.py template`, no cluster): the
//! ServiceMonitor, the builders' PodMonitor and metrics Services, the PrometheusRule and the
//! Grafana dashboard, none of them by default. The rules pass `promtool check rules`, and
//! `promtool test rules` proves each alert fires on synthetic series of what it is about, and
//! only then (`prometheus-rule-tests.yaml`); the rules and the dashboard query only metrics
//! the operator and the builders define.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_e2e::Testbed;
use serde_json::{Value, json};

use super::*;

/// The alerts the PrometheusRule has, in its order.
const ALERTS: [&str; 9] = [
    "BlocksmithPipelineLagHigh",
    "BlocksmithPipelineFreshnessHigh",
    "BlocksmithCommitHeld",
    "BlocksmithJobFailed",
    "BlocksmithBuildersUnavailable",
    "BlocksmithPipelineDegraded",
    "BlocksmithNoLeader",
    "BlocksmithOperatorDown",
    "BlocksmithCRDsOutdated",
];

/// Every option on, with the labels `prometheus-rule-tests.yaml` expects on the alerts.
const ALL_ON: &[&str] = &[
    "builders.namespaces={team-a,team-b}",
    "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=prom",
    "builders.podMonitor.enabled=true,builders.podMonitor.labels.release=prom",
    "builders.metricsService.enabled=true",
    "prometheusRule.enabled=true,prometheusRule.labels.release=prom,prometheusRule.alertLabels.team=data",
    "dashboard.enabled=true",
];

/// The labels the operator gives the builder pods it manages (operator/src/builders.rs).
fn builder_pod_labels() -> Value {
    json!({
        "app.kubernetes.io/name": "blocksmith-builder",
        "app.kubernetes.io/managed-by": "blocksmith-operator",
    })
}

fn promtool() -> PathBuf {
    std::env::var_os("BLOCKSMITH_PROMTOOL")
        .map(PathBuf::from)
        .expect("BLOCKSMITH_PROMTOOL is not set: run e2e/scripts/install.sh (which extracts promtool to ~/.cache/blocksmith/bin) and source the testbed's env")
}

/// Runs promtool in `dir`; panics with its output unless it succeeds.
fn run_promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} exited {}:\n{text}",
        out.status
    );
    text
}

/// The names of the series the operator and the builders export (a counter `x` as
/// `x_total`, a histogram as its `_bucket`, `_sum` and `_count`), from their registries.
fn exported_series() -> BTreeSet<String> {
    // A labelled family is encoded once it has a series: give each one.
    let operator = blocksmith_operator::metrics::Metrics::default();
    operator.partition("ns", "p", 0, Some(1), 1);
    operator.queue("ns", "p", 1, &[("Pending", 1)]);
    operator.oldest_uncommitted_age("ns", "p", 1);
    operator.commit("ns", "p");
    operator.pipeline_status("ns", "p", [("Ready", "True")], []);
    operator.reconcile_error("kube");
    operator.kafka_error("ns", "p");
    operator.api_write("job");
    let builder = blocksmith_builder::metrics::Metrics::default();
    builder.failed(&blocksmith_builder::runner::BuildError::Cancelled);
    builder.api_write("claim");
    let texts = [operator.encode(), builder.encode()];
    let mut names = BTreeSet::new();
    for text in &texts {
        for line in text.lines() {
            let Some(family) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = family.split_once(' ').expect("# TYPE name kind");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    for labelled in [
        "blocksmith_pipeline_problems",
        "blocksmith_builder_jobs_failed_total",
    ] {
        assert!(names.contains(labelled), "{names:?}");
    }
    names
}

/// The `blocksmith_…` metric names a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("blocksmith_"))
        .map(String::from)
        .collect()
}

/// Every target expression and variable query of a Grafana dashboard, rows' panels included.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(t["expr"].as_str().expect("target expr").to_string());
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter().map(describe).collect()
}

#[tokio::test]
async fn chart_renders_monitoring_only_when_asked_and_its_alerts_are_proven() {
    let tb = Testbed::get().await;

    // By default: none of it.
    let docs = render(&tb, &["builders.namespaces={team-a,team-b}"])
        .await
        .expect("render with defaults");
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(
            docs.iter().all(|d| d["kind"] != kind),
            "{:#?}",
            kinds(&docs)
        );
    }
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "blocksmith-builder-metrics"),
        "{:#?}",
        kinds(&docs)
    );

    let docs = render(&tb, ALL_ON)
        .await
        .expect("render with monitoring on");
    let monitoring = |d: &Value| d["apiVersion"] == "monitoring.coreos.com/v1";
    assert_eq!(
        docs.iter().filter(|d| monitoring(d)).count(),
        3,
        "{:#?}",
        kinds(&docs)
    );

    // The ServiceMonitor scrapes the operator's metrics Service, keeping pipelines' labels.
    let sm = get(
        &docs,
        "ServiceMonitor",
        Some(RELEASE_NS),
        "blocksmith-operator",
    );
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    let svc = get(&docs, "Service", Some(RELEASE_NS), "blocksmith-metrics");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "Service label {k}");
    }
    assert_eq!(
        sm["spec"]["namespaceSelector"],
        json!({"matchNames": [RELEASE_NS]})
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(svc["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "30s");
    assert_eq!(endpoint["honorLabels"], true);

    // The PodMonitor scrapes the builder pods of the builders' namespaces, by pipeline.
    let pm = get(&docs, "PodMonitor", Some(RELEASE_NS), "blocksmith-builder");
    assert_eq!(pm["metadata"]["labels"]["release"], "prom");
    assert_eq!(pm["spec"]["selector"]["matchLabels"], builder_pod_labels());
    assert_eq!(
        pm["spec"]["namespaceSelector"],
        json!({"matchNames": ["team-a", "team-b"]})
    );
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    let pod_label = format!(
        "__meta_kubernetes_pod_label_{}",
        LABEL_PIPELINE.replace(['.', '/', '-'], "_")
    );
    assert_eq!(
        endpoint["relabelings"][0],
        json!({"sourceLabels": [pod_label], "targetLabel": "pipeline"})
    );

    // A headless Service over the builder pods in each builders' namespace.
    for ns in ["team-a", "team-b"] {
        let svc = get(&docs, "Service", Some(ns), "blocksmith-builder-metrics");
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["selector"], builder_pod_labels());
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}])
        );
    }

    // The PrometheusRule: every alert, labelled, each saying what to look at.
    let rule = get(&docs, "PrometheusRule", Some(RELEASE_NS), "blocksmith");
    assert_eq!(rule["metadata"]["labels"]["release"], "prom");
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(names, ALERTS);
    let exported = exported_series();
    for r in &rules {
        let alert = r["alert"].as_str().unwrap();
        assert_eq!(r["labels"]["team"], "data", "{alert}");
        assert!(r["labels"]["severity"].is_string(), "{alert}");
        assert!(r["annotations"]["summary"].is_string(), "{alert}");
        let description = r["annotations"]["description"].as_str().unwrap();
        assert!(description.contains("`kubectl "), "{alert}: {description}");
        let expr = r["expr"].as_str().unwrap();
        assert!(
            expr.contains("job=\"blocksmith-metrics\""),
            "{alert}: {expr}"
        );
        for name in metric_names(expr) {
            assert!(
                exported.contains(&name),
                "{alert} uses {name}, not exported"
            );
        }
    }
    for (i, alert) in ALERTS.iter().enumerate().take(6) {
        let description = rules[i]["annotations"]["description"].as_str().unwrap();
        assert!(
            description
                .contains("kubectl describe bp -n {{ $labels.namespace }} {{ $labels.pipeline }}"),
            "{alert}: {description}"
        );
    }

    // promtool: the rule file as Prometheus loads it, then the alerts' unit tests (on the
    // rules without their annotations, checked above and by `check rules`).
    let dir = tempfile::tempdir().unwrap();
    let spec = &rule["spec"];
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(spec).unwrap(),
    )
    .unwrap();
    let checked = run_promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let mut bare = spec.clone();
    for g in bare["groups"].as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(
        dir.path().join("blocksmith-rules.yaml"),
        serde_yaml::to_string(&bare).unwrap(),
    )
    .unwrap();
    let tests = blocksmith_e2e::source_dir().join("tests/e2e/chart/prometheus-rule-tests.yaml");
    std::fs::copy(&tests, dir.path().join("tests.yaml")).unwrap();
    let tested = run_promtool(dir.path(), &["test", "rules", "tests.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // And a broken expression does fail both, so the passes above mean something.
    let broken = serde_yaml::to_string(spec).unwrap().replacen(
        "sum by (namespace, pipeline)",
        "sum by (namespace, pipeline",
        1,
    );
    std::fs::write(dir.path().join("broken.yaml"), broken).unwrap();
    let out = Command::new(promtool())
        .args(["check", "rules", "broken.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "promtool passed a broken rule file");

    // The dashboard: the chart's JSON file, for Grafana's sidecar, on exported metrics only.
    let cm = get(&docs, "ConfigMap", Some(RELEASE_NS), "blocksmith-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_text = cm["data"]["blocksmith.json"].as_str().unwrap();
    let dashboard: Value = serde_json::from_str(json_text).expect("the dashboard is JSON");
    let file = std::fs::read_to_string(chart_dir().join("dashboards/blocksmith.json")).unwrap();
    assert_eq!(dashboard, serde_json::from_str::<Value>(&file).unwrap());
    assert_eq!(dashboard["uid"], "blocksmith");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 20, "{queries:?}");
    // Each query is PromQL once Grafana has put in its variables: promtool parses them as
    // recording rules.
    let recorded: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let expr = q
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*")
                .replace("$pipeline", ".*");
            json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .filter(|r| !r["expr"].as_str().unwrap().starts_with("label_values("))
        .collect();
    let rules = json!({"groups": [{"name": "dashboard", "rules": recorded}]});
    std::fs::write(
        dir.path().join("dashboard.yaml"),
        serde_yaml::to_string(&rules).unwrap(),
    )
    .unwrap();
    run_promtool(dir.path(), &["check", "rules", "dashboard.yaml"]);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not exported"
    );
    for needed in [
        "blocksmith_partition_lag_records",
        "blocksmith_oldest_uncommitted_record_age_seconds",
        "blocksmith_leader",
        "blocksmith_pipeline_problems",
        "blocksmith_builder_records_written_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }

    // Other settings: every namespace, the dashboard elsewhere, a custom selector.
    let docs = render(
        &tb,
        &[
            "watchAllNamespaces=true,builders.podMonitor.enabled=true",
            "dashboard.enabled=true,dashboard.namespace=monitoring",
            "prometheusRule.enabled=true,prometheusRule.selector=service=\"bs\"",
        ],
    )
    .await
    .expect("render cluster-wide");
    let pm = get(&docs, "PodMonitor", Some(RELEASE_NS), "blocksmith-builder");
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    get(
        &docs,
        "ConfigMap",
        Some("monitoring"),
        "blocksmith-dashboard",
    );
    let rule = get(&docs, "PrometheusRule", Some(RELEASE_NS), "blocksmith");
    let expr = rule["spec"]["groups"][1]["rules"][1]["expr"]
        .as_str()
        .unwrap();
    assert!(expr.contains("absent(up{service=\"bs\"})"), "{expr}");

    // A ServiceMonitor needs the Service it scrapes.
    let err = render(
        &tb,
        &["metrics.serviceMonitor.enabled=true,metrics.service.enabled=false"],
    )
    .await
    .expect_err("a ServiceMonitor without the metrics Service must not render");
    assert!(err.contains("requires metrics.service.enabled"), "{err}");
}
