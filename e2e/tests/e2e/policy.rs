//! The operator's policy (issue 12): a pipeline may name only the builder images and
//! ServiceAccounts, and only the Secrets (by label), that whoever runs the operator allows.
//! Anything else is `InvalidSpec` naming the field, before any Secret is read for the pipeline
//! or any builder is applied.

use blocksmith_e2e::scenario::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{LocalObjectReference, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const LABEL: &str = "blocksmith.io/pipeline-secret";

fn builders(image: &str, service_account: Option<&str>) -> blocksmith_crds::pipeline::BuildersSpec {
    serde_json::from_value(json!({
        "image": image,
        "serviceAccountName": service_account,
        "minReplicas": 0,
        "maxReplicas": 1,
    }))
    .unwrap()
}

#[tokio::test]
async fn pipelines_outside_the_operators_policy_are_invalid_naming_the_field() {
    let s = Scenario::new("policy")
        .records(1000)
        .pipeline(|bp| bp.spec.builders = Some(builders("evil.example/miner:1", None)))
        .await;
    let label = format!("{LABEL}=true");
    let _op = spawn_operator_with(
        &s.tb,
        &s.ns,
        "op",
        &[
            "--allowed-builder-images",
            "registry.local/blocksmith",
            "--allowed-builder-service-accounts",
            "blocksmith-builder",
            "--secret-label",
            &label,
        ],
    );
    let deployments: Api<Deployment> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let nothing_done = || async {
        assert!(s.jobs().await.is_empty(), "nothing planned");
        let listed = deployments.list(&ListParams::default()).await.unwrap();
        assert!(listed.items.is_empty(), "no builders applied");
    };

    // An image the policy does not allow (a repository sharing the allowed one's prefix is
    // not that repository).
    let message = s.wait(Cond::ready_false("InvalidSpec")).await.message;
    assert!(
        message.starts_with(
            r#"spec.builders.image: "evil.example/miner:1" is not an image the operator's policy allows (allowed: registry.local/blocksmith)"#
        ),
        "{message}"
    );
    let mut bp = s.bp.clone();
    bp.spec.builders = Some(builders("registry.local/blocksmith-other:1", None));
    s.apply(&bp).await;
    s.wait(Cond::ready_false("InvalidSpec").message_contains("blocksmith-other"))
        .await;

    // A ServiceAccount it does not allow.
    bp.spec.builders = Some(builders("registry.local/blocksmith:1", Some("admin")));
    s.apply(&bp).await;
    let message = s
        .wait(Cond::ready_false("InvalidSpec").message_contains("serviceAccountName"))
        .await
        .message;
    assert!(
        message.starts_with(r#"spec.builders.serviceAccountName: "admin" is not a ServiceAccount"#),
        "{message}"
    );

    // A Secret without the label: never read for the pipeline nor handed to its builders.
    let secrets: Api<Secret> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-keys"},
        "stringData": {"AWS_ACCESS_KEY_ID": "someone-elses"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    bp.spec.builders = Some(builders("registry.local/blocksmith@sha256:00", None));
    bp.spec.output.credentials_secret_ref = Some(LocalObjectReference {
        name: "s3-keys".into(),
    });
    s.apply(&bp).await;
    let message = s
        .wait(Cond::ready_false("InvalidSpec").message_contains("credentialsSecretRef"))
        .await
        .message;
    assert!(
        message.starts_with(&format!(
            r#"spec.output.credentialsSecretRef: secret "s3-keys" lacks the label {label}"#
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("kubectl label secret s3-keys {label}")),
        "{message}"
    );
    s.wait_event("InvalidSpec").await;
    nothing_done().await;

    // Labelled by its owner for pipelines: planned, and builders applied.
    secrets
        .patch(
            "s3-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {LABEL: "true"}}})),
        )
        .await
        .unwrap();
    s.wait_jobs(1).await;
    wait_for(
        "the builder Deployment",
        std::time::Duration::from_secs(30),
        || async {
            let listed = deployments.list(&ListParams::default()).await.unwrap();
            (!listed.items.is_empty()).then_some(())
        },
    )
    .await;
}
