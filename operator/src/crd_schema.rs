//! Whether the installed CRDs hold every field this operator writes. Helm never upgrades
//! CRDs, and the API server silently prunes fields an older schema lacks: an operator
//! running against older CRDs would lose the status it writes (the furthest range cut, the
//! topic's identity, a job's transient failures) on every write. So the operator waits,
//! not ready, until the CRDs are at least its own.

use std::collections::BTreeSet;

use blocksmith_crds::{BlockJob, BlockPipeline};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::{Api, CustomResourceExt};

/// A CRD that lacks fields this operator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outdated {
    /// The CRD's name, `blockpipelines.blocksmith.io`.
    pub crd: String,
    /// The missing fields as paths (`status.topic.outputUrl`, `status.partitions[].cutOffset`),
    /// or the version when the CRD does not serve it at all.
    pub missing: Vec<String>,
}

/// How to mend it, for logs.
pub const REMEDY: &str = "apply the CRDs of this release first (Helm installs CRDs but never upgrades them): kubectl apply --server-side --force-conflicts -f charts/blocksmith/crds/";

impl std::fmt::Display for Outdated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 5;
        let shown: Vec<&str> = self
            .missing
            .iter()
            .take(SHOWN)
            .map(String::as_str)
            .collect();
        write!(f, "{} lacks {}", self.crd, shown.join(", "))?;
        if self.missing.len() > SHOWN {
            write!(f, " and {} more", self.missing.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// The fields of `wanted` (this operator's schema) that `installed` does not have, status
/// fields (the ones the operator writes) first. A field under
/// `x-kubernetes-preserve-unknown-fields` is kept by the API server whatever its schema
/// says, so it is not missing.
pub fn missing_fields(wanted: &JSONSchemaProps, installed: &JSONSchemaProps) -> Vec<String> {
    let mut missing = BTreeSet::new();
    walk(wanted, installed, "", &mut missing);
    let (status, other): (Vec<String>, Vec<String>) = missing
        .into_iter()
        .partition(|path| path.starts_with("status"));
    status.into_iter().chain(other).collect()
}

fn walk(
    wanted: &JSONSchemaProps,
    installed: &JSONSchemaProps,
    at: &str,
    missing: &mut BTreeSet<String>,
) {
    if installed.x_kubernetes_preserve_unknown_fields == Some(true) {
        return;
    }
    for (name, want) in wanted.properties.iter().flatten() {
        let path = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}.{name}")
        };
        match installed.properties.as_ref().and_then(|p| p.get(name)) {
            Some(have) => walk(want, have, &path, missing),
            None => {
                missing.insert(path);
            }
        }
    }
    if let (
        Some(JSONSchemaPropsOrArray::Schema(want)),
        Some(JSONSchemaPropsOrArray::Schema(have)),
    ) = (&wanted.items, &installed.items)
    {
        walk(want, have, &format!("{at}[]"), missing);
    }
}

/// The schema a CRD serves for `version`, if it serves that version.
fn schema<'a>(crd: &'a CustomResourceDefinition, version: &str) -> Option<&'a JSONSchemaProps> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version && v.served)
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
}

/// How `installed` falls short of `ours` (the same CRD as this operator generates it).
pub fn compare(
    ours: &CustomResourceDefinition,
    installed: &CustomResourceDefinition,
) -> Option<Outdated> {
    let crd = ours.metadata.name.clone().unwrap_or_default();
    let mut missing = Vec::new();
    for version in &ours.spec.versions {
        let Some(want) = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        else {
            continue;
        };
        match schema(installed, &version.name) {
            Some(have) => missing.extend(missing_fields(want, have)),
            None => missing.push(format!("version {}", version.name)),
        }
    }
    (!missing.is_empty()).then_some(Outdated { crd, missing })
}

/// The blocksmith CRDs installed in the cluster that lack fields of this operator's. A CRD
/// that is not installed is outdated too; any other error (e.g. no permission to read CRDs)
/// is returned for the caller to judge.
pub async fn outdated_crds(client: &kube::Client) -> kube::Result<Vec<Outdated>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut outdated = Vec::new();
    for ours in [BlockPipeline::crd(), BlockJob::crd()] {
        let name = ours.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await? {
            Some(installed) => outdated.extend(compare(&ours, &installed)),
            None => outdated.push(Outdated {
                crd: name,
                missing: vec!["the whole CRD (not installed)".into()],
            }),
        }
    }
    Ok(outdated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(value: serde_json::Value) -> JSONSchemaProps {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_same_schema_lacks_nothing() {
        let ours = BlockPipeline::crd();
        assert_eq!(compare(&ours, &ours), None);
        assert_eq!(compare(&BlockJob::crd(), &BlockJob::crd()), None);
    }

    #[test]
    fn fields_missing_at_any_depth_and_in_array_items_are_named_by_path() {
        let wanted = props(json!({"properties": {
            "spec": {"properties": {"a": {"type": "string"}, "b": {"properties": {"c": {}}}}},
            "status": {"properties": {"partitions": {"type": "array", "items": {"properties": {
                "partition": {}, "cutOffset": {}
            }}}}}
        }}));
        let installed = props(json!({"properties": {
            "spec": {"properties": {"a": {"type": "string"}, "b": {}}},
            "status": {"properties": {"partitions": {"type": "array", "items": {"properties": {
                "partition": {}
            }}}}}
        }}));
        assert_eq!(
            missing_fields(&wanted, &installed),
            ["status.partitions[].cutOffset", "spec.b.c"]
        );
    }

    #[test]
    fn a_newer_schema_with_more_fields_is_fine_and_preserved_unknown_fields_keep_anything() {
        let wanted = props(
            json!({"properties": {"spec": {"properties": {"x": {"properties": {"y": {}}}}}}}),
        );
        let newer = props(json!({"properties": {
            "spec": {"properties": {"x": {"properties": {"y": {}, "z": {}}}, "w": {}}}
        }}));
        assert!(missing_fields(&wanted, &newer).is_empty());
        let open =
            props(json!({"properties": {"spec": {"x-kubernetes-preserve-unknown-fields": true}}}));
        assert!(missing_fields(&wanted, &open).is_empty());
    }

    #[test]
    fn a_crd_that_does_not_serve_the_version_lacks_the_version() {
        let ours = BlockJob::crd();
        let mut installed = ours.clone();
        installed.spec.versions[0].name = "v1alpha0".into();
        let outdated = compare(&ours, &installed).unwrap();
        assert_eq!(outdated.crd, "blockjobs.blocksmith.io");
        assert_eq!(outdated.missing, ["version v1alpha1"]);
    }

    #[test]
    fn the_message_names_the_first_fields_and_counts_the_rest() {
        let outdated = Outdated {
            crd: "blockpipelines.blocksmith.io".into(),
            missing: (0..7).map(|i| format!("status.f{i}")).collect(),
        };
        assert_eq!(
            outdated.to_string(),
            "blockpipelines.blocksmith.io lacks status.f0, status.f1, status.f2, status.f3, status.f4 and 2 more"
        );
    }

    #[test]
    fn the_first_released_crds_lack_the_fields_added_since() {
        // The CRDs of 2026-11-26 (the upgrade test's fixture): the pipeline's status had no
        // topic identity; jobs recorded no cluster or topic id.
        let old_pipelines: CustomResourceDefinition = serde_yaml::from_str(include_str!(
            "../../e2e/tests/e2e/fixtures/crds-2026-11-26/blockpipelines.yaml"
        ))
        .unwrap();
        let old_jobs: CustomResourceDefinition = serde_yaml::from_str(include_str!(
            "../../e2e/tests/e2e/fixtures/crds-2026-11-26/blockjobs.yaml"
        ))
        .unwrap();
        let pipelines = compare(&BlockPipeline::crd(), &old_pipelines).unwrap();
        assert!(
            pipelines.missing.contains(&"status.topic".to_string()),
            "{pipelines}"
        );
        assert!(
            pipelines
                .missing
                .contains(&"status.partitions[].cutOffset".to_string()),
            "{pipelines}"
        );
        let jobs = compare(&BlockJob::crd(), &old_jobs).unwrap();
        assert!(
            jobs.missing.contains(&"spec.kafkaTopicId".to_string()),
            "{jobs}"
        );
        assert!(
            jobs.missing.contains(&"status.transient".to_string()),
            "{jobs}"
        );
    }
}
