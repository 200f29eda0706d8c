//! Upgrading blocksmith over the pipelines of an older release, on a private API server whose
//! CRDs start as the first release installed them (`fixtures/crds-2026-11-26`, created by
//! field manager `helm` as `helm install` does). docs/production.md's order is CRDs first;
//! an operator started before them must wait rather than run against a schema that drops
//! the fields it writes.

use std::path::PathBuf;
use std::time::Duration;

use blocksmith_crds::{BlockJob, BlockPipeline, JobPhase};
use blocksmith_e2e::apiserver::{CrdInstall, PrivateApiserver};
use blocksmith_e2e::scenario::*;
use blocksmith_operator::jobs::{KafkaIds, desired_job, job_spec};
use blocksmith_operator::planner::PlannedJob;
use kube::api::{Api, PostParams};

fn old_crds() -> PathBuf {
    blocksmith_e2e::source_dir().join("tests/e2e/fixtures/crds-2026-11-26")
}

/// `kubectl ARGS` against the private API server.
fn kubectl(tb: &Testbed, args: &[&str]) -> (bool, String) {
    run_kubectl(tb.kubeconfig.as_deref(), args)
}

#[tokio::test]
async fn an_operator_waits_for_its_crds_and_then_carries_on_the_old_releases_pipelines() {
    let shared = Testbed::get().await;
    let tag = format!("upgrade-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (_apiserver, private) =
        PrivateApiserver::start_with_crds(&shared, &tag, &old_crds(), CrdInstall::CreateAsHelm)
            .await;
    // A pipeline applied under the old schema, and a job its old operator had planned: no
    // cluster or topic id (the old job spec had neither), no finalizer.
    let s = Scenario::new("upgrade")
        .on(private)
        .partitions(2)
        .records(4000)
        .jobs(serde_json::json!({"maxRecords": 500}))
        .await;
    let bp = s.get().await;
    let old_job = desired_job(
        &bp,
        job_spec(
            &bp,
            &PlannedJob {
                partition: 0,
                start: 0,
                end: 500,
            },
            &KafkaIds::default(),
        ),
        JobPhase::Pending,
    );
    let jobs: Api<BlockJob> = Api::namespaced(s.tb.client.clone(), &s.ns);
    jobs.create(&PostParams::default(), &old_job)
        .await
        .expect("the old operator's job");

    // The new operator against the old CRDs: it says what is missing and what to do, is not
    // ready, and writes nothing.
    let operator = s.spawn_operator("op");
    let log = wait_for(
        "the operator to report outdated CRDs",
        Duration::from_secs(60),
        || {
            let text = operator.proc.log_text();
            async move { text.contains("older than this operator").then_some(text) }
        },
    )
    .await;
    assert_says(
        &log,
        &[
            "blockpipelines.blocksmith.io lacks",
            "status.partitions[].cutOffset",
            "blockjobs.blocksmith.io lacks",
            "spec.kafkaTopicId",
            "kubectl apply --server-side --force-conflicts -f charts/blocksmith/crds/",
        ],
    );
    assert_eq!(
        sample(operator.metrics_port, "blocksmith_crds_outdated"),
        Some(1.0)
    );
    let (head, _) = http_get_with_headers(operator.metrics_port, "/readyz");
    assert!(head.contains(" 503 "), "not ready while waiting: {head}");
    let builders = s.spawn_builders(2);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(s.get().await.status.is_none(), "no status written");
    assert_eq!(s.jobs().await.len(), 1, "nothing planned");
    assert!(s.committed().await.is_empty(), "nothing committed");

    // The documented upgrade: a plain server-side apply conflicts with Helm's ownership...
    let crds = blocksmith_e2e::source_dir().join("../charts/blocksmith/crds");
    let crds = crds.to_str().expect("path");
    let (ok, text) = kubectl(&s.tb, &["apply", "--server-side", "-f", crds]);
    assert!(!ok && text.contains("conflict"), "{text}");
    // ...which --force-conflicts takes over, as docs/production.md says.
    let (ok, text) = kubectl(
        &s.tb,
        &["apply", "--server-side", "--force-conflicts", "-f", crds],
    );
    assert!(ok, "{text}");

    // The operator goes on by itself: the old job built, the rest planned and built, every
    // record written once, and the fields the old schema lacked kept.
    s.wait_committed_then_audit(Duration::from_secs(180)).await;
    let log = operator.proc.log_text();
    assert!(log.contains("hold this operator's fields now"), "{log}");
    assert_eq!(
        sample(operator.metrics_port, "blocksmith_crds_outdated"),
        Some(0.0)
    );
    let bp: BlockPipeline = s.get().await;
    let status = bp.status.expect("status");
    assert!(status.topic.is_some(), "status.topic kept: {status:?}");
    assert!(
        status.partitions.iter().all(|p| p.cut_offset.is_some()),
        "cutOffset kept: {:?}",
        status.partitions
    );
    let jobs = s.jobs().await;
    assert!(
        jobs.iter()
            .filter(|j| j.metadata.name != old_job.metadata.name)
            .all(|j| j.spec.kafka_cluster_id.is_some()),
        "new jobs keep their cluster id"
    );
    drop(builders);
}
