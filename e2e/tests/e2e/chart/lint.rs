//! `helm lint`: clean for the chart's default values and its other branches, and failing on
//! a broken chart.

use std::path::{Path, PathBuf};

use blocksmith_e2e::Testbed;
use blocksmith_e2e::helm::{chart_dir, helm};

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

/// `helm lint --strict` of `chart` passes with neither a warning nor an error.
async fn assert_lint_clean(tb: &Testbed, chart: &Path, what: &str) {
    let out = helm(tb, &["lint", "--strict", chart.to_str().unwrap()])
        .await
        .unwrap_or_else(|e| panic!("lint of {what}: {e}"));
    assert!(
        !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "{out}"
    );
}

#[tokio::test]
async fn chart_lint_is_clean() {
    let tb = Testbed::get().await;
    let chart = chart_dir();
    assert_lint_clean(&tb, &chart, "the chart with its default values").await;

    // The other branches of the templates: a cluster-wide install without leader election
    // or external metrics, with every monitoring option.
    let tmp = tempfile::tempdir().unwrap();
    let variant = chart_copy_with(tmp.path(), |v| {
        v["watchAllNamespaces"] = true.into();
        v["operator"]["leaderElection"] = false.into();
        v["operator"]["replicas"] = 1.into();
        v["externalMetrics"]["enabled"] = false.into();
        v["builders"]["namespaces"] = serde_yaml::from_str("[team-a, team-b]").unwrap();
        v["metrics"]["serviceMonitor"]["enabled"] = true.into();
        v["builders"]["podMonitor"]["enabled"] = true.into();
        v["builders"]["metricsService"]["enabled"] = true.into();
        v["prometheusRule"]["enabled"] = true.into();
        v["dashboard"]["enabled"] = true.into();
    });
    assert_lint_clean(&tb, &variant, "a cluster-wide, single-replica variant").await;

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
