//! Outages that outlast every attempt a job has: they heal by themselves, with no job failed
//! for good and nothing lost or written twice (docs/reliability.md, "Outages").

use std::time::Duration;

use blocksmith_crds::BlockJob;
use blocksmith_e2e::scenario::*;
use serde_json::json;

/// With `backoffLimit: 1` a failure a person must fix fails its job for good at once; an
/// outage must not.
fn one_attempt() -> serde_json::Value {
    json!({"maxRecords": 2000, "backoffLimit": 1})
}

fn outages_in_a_row(job: &BlockJob) -> i32 {
    job.status
        .as_ref()
        .and_then(|s| s.transient_failures)
        .unwrap_or(0)
}

/// Waits until a job has been failed by the outage and retried `times` in a row. Had those
/// failures counted as attempts, the first would have failed the job for good.
async fn wait_outage_retries(s: &Run, times: i32) {
    wait_for(
        "jobs retried through the outage",
        Duration::from_secs(180),
        || async {
            let jobs = s.jobs().await;
            jobs.iter()
                .any(|j| outages_in_a_row(j) >= times)
                .then_some(())
        },
    )
    .await;
}

/// A pipeline writing to an S3 server of its own, so stopping it disturbs no other test;
/// returned once some jobs succeeded, with the server stopped.
async fn run_into_an_s3_outage(
    name: &str,
    partitions: i32,
    records: u64,
    jobs: serde_json::Value,
) -> (PrivateS3, Run) {
    let tb = Testbed::get().await;
    let mut server = PrivateS3::spawn(&tb, name);
    let s = Scenario::new(name)
        .partitions(partitions)
        .records(records)
        .output_on(&server, "outage")
        .jobs(jobs)
        .operator()
        .builders_on(2, &server)
        .await;
    s.wait_some_progress().await;
    server.kill();
    (server, s)
}

#[tokio::test]
async fn an_s3_outage_of_twenty_seconds_is_survived_exactly() {
    let jobs = json!({"maxRecords": 2000, "backoffLimit": 8});
    let (mut server, s) = run_into_an_s3_outage("bld-s3down", 4, 40_000, jobs).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    server.start();
    s.wait_committed_then_audit_in(&server.dir("outage"), Duration::from_secs(400))
        .await;
}

/// Waits until the operator has planned jobs that no builder has taken yet: started after
/// this, builders meet the outage on every job, however fast they would have been.
async fn wait_jobs_planned(s: &Run) {
    wait_for("jobs planned", Duration::from_secs(60), || async {
        (!s.jobs().await.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_object_store_outage_outlasting_every_attempt_heals_by_itself() {
    let tb = Testbed::get().await;
    let mut server = PrivateS3::spawn(&tb, "out-s3");
    let mut s = Scenario::new("out-s3")
        .partitions(2)
        .records(20_000)
        .output_on(&server, "outage")
        .jobs(one_attempt())
        .operator()
        .await;
    wait_jobs_planned(&s).await;
    server.kill();
    s.builders = vec![
        s.spawn_builder_with("b0", server.point()),
        s.spawn_builder_with("b1", server.point()),
    ];
    // Three failures in a row: 5 + 10 s of backoff at least, past the one attempt.
    wait_outage_retries(&s, 3).await;
    server.start();
    s.wait_committed_then_audit_in(&server.dir("outage"), Duration::from_secs(300))
        .await;
}

#[tokio::test]
async fn a_kafka_outage_outlasting_every_attempt_heals_by_itself() {
    let mut s = Scenario::new("out-kafka")
        .private_broker()
        .partitions(2)
        .records(20_000)
        .jobs(one_attempt())
        .operator()
        .await;
    wait_jobs_planned(&s).await;
    s.broker().down();
    s.builders = s.spawn_builders(2);
    wait_outage_retries(&s, 3).await;
    s.broker().up();
    s.wait_committed_then_audit(Duration::from_secs(300)).await;
}
