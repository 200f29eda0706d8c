//! Exactly-once off the happy path (docs/reliability.md, "Beyond the happy path"): the blocks
//! in the output are the evidence, and nothing a late or stale writer does may change them.

use std::time::Duration;

use blocksmith_crds::{BlockJob, JobPhase};
use blocksmith_e2e::scenario::*;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Bytes the S3 server on `port` has been sent but not read: a frozen server's pending
/// requests.
fn unread_bytes_at(port: u16) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A builder's upload is held up in front of the object store (a frozen S3 front end with
/// the whole request in its socket) while its lease runs out; another builder, writing other
/// bytes (here another compression, as another builder version would) through another front
/// end over the same storage, builds and commits the same range. When the held-up upload
/// finally lands it must not replace the data the committed manifest vouches for, and the
/// stale builder tidies away what it wrote.
#[tokio::test]
async fn a_stale_builder_finishing_its_upload_never_replaces_a_committed_blocks_data() {
    let tb = Testbed::get().await;
    let held_up = PrivateS3::spawn(&tb, "eo-stale-1");
    let other = PrivateS3::spawn_at(&tb, "eo-stale-2", held_up.root.clone());
    let s = Scenario::new("eo-stale")
        .private_broker()
        .records(600)
        .value_size(100)
        .output("s3://blocksmith/stale")
        .jobs(json!({"maxRecords": 200, "leaseDurationSeconds": 4}))
        .operator()
        .start()
        .await;
    // Slow reads (seconds a job) leave time to freeze the object store between a builder's
    // check for an existing manifest and its upload.
    s.broker().set_round_trip_time(Duration::from_millis(500));
    let through = |server: &PrivateS3| {
        let endpoint = server.endpoint();
        move |cmd: &mut std::process::Command| {
            cmd.env("AWS_ENDPOINT", &endpoint);
        }
    };
    let stale = s.spawn_builder_with("stale", through(&held_up));
    let job = wait_for_a_job_on(&s.tb, &s.ns, &s.name, "stale").await;
    let scratch = s.tb.dir.join("scratch").join(&s.ns).join("stale");
    wait_for(
        "the stale builder reading",
        Duration::from_secs(30),
        || async { (!files(&scratch).is_empty()).then_some(()) },
    )
    .await;
    held_up.proc.signal("STOP");
    // (A block of 200 records of 100 bytes is over 20 KB, and fits the socket's buffers.)
    wait_for(
        "the stale builder's whole upload sent to the frozen front end",
        Duration::from_secs(60),
        || async { (unread_bytes_at(held_up.port) > 20_000).then_some(()) },
    )
    .await;
    stale.signal("STOP");

    // Other bytes for the same range: the job's compression changed under it.
    let name = job.metadata.name.clone().unwrap();
    Api::<BlockJob>::namespaced(s.tb.client.clone(), &s.ns)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"output": {"compression": "snappy"}}})),
        )
        .await
        .expect("patch the job's compression");
    let _fresh = s.spawn_builder_with("fresh", through(&other));
    let committed = wait_for(
        "the job committed by the fresh builder",
        Duration::from_secs(120),
        || async {
            s.job(&job.metadata.name)
                .await
                .filter(|j| j.phase() == JobPhase::Succeeded)
        },
    )
    .await;
    assert_eq!(lease_holder(&committed), Some("fresh"));

    // The held-up upload lands; then the stale builder wakes up, and its attempt ends
    // without a report.
    held_up.proc.signal("CONT");
    wait_for(
        "the held-up upload processed",
        Duration::from_secs(30),
        || async { (unread_bytes_at(held_up.port) == 0).then_some(()) },
    )
    .await;
    stale.signal("CONT");
    wait_for(
        "the stale builder's attempt over",
        Duration::from_secs(60),
        || async {
            let log = stale.log_text();
            (log.contains("lease lost while building") || log.contains("report rejected"))
                .then_some(())
        },
    )
    .await;
    let committed = s.wait_all_committed(Duration::from_secs(300)).await;
    let report = audit_exact(&s.tb, &held_up.dir("stale"), &s.produced, &committed);
    assert!(
        stale
            .log_text()
            .contains("removed this attempt's data object"),
        "{}",
        stale.log_text()
    );
    assert_eq!(report["uncommitted"], 0, "{report}");
}
