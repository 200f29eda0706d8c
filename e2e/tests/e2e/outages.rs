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

#[tokio::test]
async fn an_object_store_outage_outlasting_every_attempt_heals_by_itself() {
    let tb = Testbed::get().await;
    let mut server = PrivateS3::spawn(&tb, "out-s3");
    let s = Scenario::new("out-s3")
        .partitions(2)
        .records(20_000)
        .output("s3://blocksmith/outage")
        .jobs(one_attempt())
        .operator()
        .builders_on(2, &server)
        .start()
        .await;
    s.wait_some_progress().await;
    server.kill();
    // Three failures in a row: 5 + 10 s of backoff at least, past the one attempt.
    wait_outage_retries(&s, 3).await;
    server.start();
    s.wait_committed_then_audit_in(&server.dir("outage"), Duration::from_secs(300))
        .await;
}

#[tokio::test]
async fn a_kafka_outage_outlasting_every_attempt_heals_by_itself() {
    let s = Scenario::new("out-kafka")
        .private_broker()
        .partitions(2)
        .records(20_000)
        .jobs(one_attempt())
        .operator()
        .builders(2)
        .start()
        .await;
    s.wait_some_progress().await;
    s.broker().down();
    wait_outage_retries(&s, 3).await;
    s.broker().up();
    s.wait_committed_then_audit(Duration::from_secs(300)).await;
}
