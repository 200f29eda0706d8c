//! Operator and builder processes end to end: blocks in object storage, audited with pyarrow
//! against what was produced, under killed builders, races and object-store outages.

use std::time::Duration;

use blocksmith_crds::{BlockJob, JobPhase};
use blocksmith_e2e::process::Proc;
use blocksmith_e2e::scenario::*;
use blocksmith_operator::jobs::phase_label;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::support::StaleStore;

#[tokio::test]
async fn three_builders_write_every_offset_exactly_once_to_files() {
    let s = Scenario::new("bld-file")
        .partitions(8)
        .records(100_000)
        .jobs(json!({"maxRecords": 2500}))
        .operator()
        .builders(3)
        .await;
    s.wait_committed_then_audit(Duration::from_secs(400)).await;
    assert!(
        s.jobs()
            .await
            .iter()
            .all(|j| j.phase() == JobPhase::Succeeded),
        "all jobs succeeded"
    );
}

#[tokio::test]
async fn builders_write_to_s3_including_multipart_blocks() {
    // The mock broker keeps 5 MiB per partition, so blocks are ~4 MiB and cannot reach a
    // second 5 MiB part (s3s-fs, like S3, rejects smaller parts). The builders here take the
    // multipart path for anything over 1 MiB; several parts in flight are covered by the
    // builder's unit tests and the smoke test's two-part upload.
    let prefix = format!("s3-{:08x}", rand::random::<u32>());
    let bucket = Testbed::get().await.s3_bucket;
    let s = Scenario::new("bld-s3")
        .partitions(4)
        .records(8_000)
        .value_size(2048)
        .output(format!("s3://{bucket}/{prefix}"))
        .jobs(json!({"maxRecords": 2000}))
        .operator()
        .builders_with(2, |cmd| {
            cmd.args(["--multipart-threshold", "1048576"]);
        })
        .await;
    // s3s-fs keeps objects as files under its root: audit them there with pyarrow.
    let blocks = s.tb.s3_root.join(&s.tb.s3_bucket).join(&prefix);
    s.wait_committed_then_audit_in(&blocks, Duration::from_secs(400))
        .await;
    let big = s
        .jobs()
        .await
        .iter()
        .filter(|j| {
            j.status
                .as_ref()
                .and_then(|s| s.output.as_ref())
                .is_some_and(|o| o.bytes > 2 << 20)
        })
        .count();
    assert!(big > 0, "some blocks went through multipart upload");
}

#[tokio::test]
async fn a_killed_builder_loses_its_job_to_another_and_nothing_is_lost() {
    // A broker of its own, slowed to a 300 ms round trip while the victim is caught in a
    // job: jobs then take seconds instead of milliseconds.
    let s = Scenario::new("bld-kill")
        .private_broker()
        .partitions(2)
        .records(20_000)
        .value_size(200)
        .jobs(json!({"maxRecords": 1000, "leaseDurationSeconds": 4}))
        .operator()
        .await;
    s.broker().set_round_trip_time(Duration::from_millis(300));
    let mut victim = s.spawn_builder("victim");
    // Frozen while it holds a job, then SIGKILLed: killed mid-job for sure.
    let held = freeze_in_a_job(&s.tb, &s.ns, "p", &victim, "victim").await;
    s.broker().set_round_trip_time(Duration::ZERO);
    victim.kill();
    let _rescuer = s.spawn_builder("rescuer");
    s.wait_committed_then_audit(Duration::from_secs(300)).await;
    let retried = s
        .job(&held.metadata.name)
        .await
        .expect("the job is kept until cleanup");
    assert_eq!(retried.phase(), JobPhase::Succeeded);
    assert!(
        retried.attempt() >= 2,
        "the killed builder's job was retried"
    );
    assert_eq!(
        lease_holder(&retried),
        Some("rescuer"),
        "completed by the other builder"
    );
    // Jobs the victim finished before it was frozen are its own; none after.
    let frozen_at = held
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .unwrap()
        .0;
    for j in s.jobs().await {
        let completed = j.status.as_ref().and_then(|st| st.completion_time.as_ref());
        if completed.is_some_and(|t| t.0 > frozen_at) {
            assert_ne!(
                lease_holder(&j),
                Some("victim"),
                "{:?} completed by the killed builder",
                j.metadata.name
            );
        }
    }
}

/// A builder builds two jobs at once by default (`--concurrent-jobs 2`), each under a lease
/// of its own: with jobs slowed to seconds, one builder holds two at the same moment, and
/// every record is still written once.
#[tokio::test]
async fn one_builder_builds_two_jobs_at_once_each_under_its_own_lease() {
    let s = Scenario::new("bld-slots")
        .private_broker()
        .partitions(2)
        .records(8_000)
        .value_size(200)
        .jobs(json!({"maxRecords": 1000}))
        .operator()
        .await;
    s.broker().set_round_trip_time(Duration::from_millis(300));
    let _solo = s.spawn_builder("solo");
    let held = wait_for("solo holding two jobs", Duration::from_secs(60), || async {
        let held: Vec<BlockJob> = s
            .jobs()
            .await
            .into_iter()
            .filter(|j| running_on(j, "solo"))
            .collect();
        (held.len() >= 2).then_some(held)
    })
    .await;
    assert_eq!(held.len(), 2, "no more than its two slots");
    s.broker().set_round_trip_time(Duration::ZERO);
    s.wait_committed_then_audit(Duration::from_secs(300)).await;
}

/// The phase label follows `status.phase`, but `Running` only for a job whose builder
/// renewed its lease (one that lasts); a finished job's label and the release of its
/// finalizer come in one write once its range is committed.
#[tokio::test]
async fn a_job_is_labelled_running_once_renewed_and_succeeded_without_its_finalizer_once_committed()
{
    let s = Scenario::new("bld-labels")
        .records(1_000)
        .jobs(json!({"maxRecords": 1000}))
        .operator()
        .await;
    let job = s.wait_jobs(1).await.remove(0);
    let fake = FakeBuilder::new(&s.tb, &s.ns, "fake");
    let lease = |acquired: &str, renewed: &str| {
        json!({"lease": {"holder": "fake", "acquireTime": acquired, "renewTime": renewed,
                         "leaseDurationSeconds": 6}})
    };
    let acquired = now();
    let claimed = fake
        .report(&job, 1, "Running", lease(&acquired, &acquired))
        .await
        .unwrap();
    // A pass that saw the claim (it counts the job running) leaves the label be.
    wait_for(
        "a pass after the claim",
        Duration::from_secs(30),
        || async { (s.get().await.status?.running_jobs == 1).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = s.job(&job.metadata.name).await.unwrap();
    assert_eq!(phase_label(&seen), Some("Pending"));
    // Renewed: labelled `Running`.
    let renewed = now();
    assert_ne!(renewed, acquired);
    fake.report(&claimed, 1, "Running", lease(&acquired, &renewed))
        .await
        .unwrap();
    wait_for("the Running label", Duration::from_secs(30), || async {
        let job = s.job(&job.metadata.name).await?;
        (phase_label(&job) == Some("Running")).then_some(())
    })
    .await;
    // The fake's lease runs out; a builder builds the job again and its range is committed.
    let _b = s.spawn_builder("b");
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
    wait_for(
        "the job labelled Succeeded and released",
        Duration::from_secs(30),
        || async {
            let job = s.job(&job.metadata.name).await?;
            (phase_label(&job) == Some("Succeeded") && !job.keeps_range()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn two_builders_racing_for_fifty_jobs_complete_each_once() {
    let s = Scenario::new("bld-race")
        .records(5_000)
        .value_size(64)
        .jobs(json!({"maxRecords": 100}))
        .operator()
        .await;
    s.wait_jobs(50).await;
    let a = s.spawn_builder("racer-a");
    let b = s.spawn_builder("racer-b");
    s.wait_committed_then_audit(Duration::from_secs(300)).await;
    let count = |p: &Proc, what: &str| p.log_text().matches(what).count();
    let claims = count(&a, "\"claimed\"") + count(&b, "\"claimed\"");
    let reports = count(&a, "\"reported\"") + count(&b, "\"reported\"");
    assert_eq!(claims, 50, "each job claimed exactly once");
    assert_eq!(reports, 50, "each job reported exactly once");
    assert!(
        count(&a, "\"reported\"") > 0 && count(&b, "\"reported\"") > 0,
        "both builders worked"
    );
}

/// A builder claims from a watch cache that can lag. When its claim conflicts because the
/// job was failed and reset meanwhile, it must not take the fresh version while that
/// version's retry backoff runs: chaos seed 13 saw a job failed by an S3 outage retried
/// within a second six times (instead of after 5, 10, 20 … s), using up attempts so that
/// the next backoff stalled its partition for five minutes.
#[tokio::test]
async fn a_claim_from_a_stale_cache_never_takes_a_job_in_its_retry_backoff() {
    use blocksmith_builder::lease::{Claim, LeaseClient};
    use blocksmith_operator::lifecycle::Reset;
    use jiff::{SignedDuration, Timestamp};

    let cache = StaleStore::new("claim-backoff").await;
    let (tb, operator, api) = (&cache.tb, &cache.store, &cache.api);
    let planned = cache.planned(100);
    let stale = operator.create(&planned).await.unwrap().expect("created");
    let lease = LeaseClient::new("b", blocksmith_builder::metrics::Metrics::default());
    // Attempt 1 is claimed and fails; the operator resets it with a backoff. A builder
    // whose cache still holds the first version tries to claim that.
    let reset_with_backoff = |not_before: Timestamp| {
        let name = planned.metadata.name.clone().unwrap();
        async move {
            let current = api.get(&name).await.unwrap();
            let reset = Reset {
                phase: JobPhase::Pending,
                attempt: current.attempt() + 1,
                not_before: Some(not_before),
                message: "attempt failed: object storage down; retrying".into(),
                transient_failures: None,
            };
            operator.reset(&current, &reset).await.unwrap()
        }
    };
    let Claim::Claimed(_) = lease.claim(&tb.client, &stale, 6).await.unwrap() else {
        panic!("the first claim succeeds");
    };
    let in_backoff = reset_with_backoff(Timestamp::now() + SignedDuration::from_secs(60)).await;
    match lease.claim(&tb.client, &stale, 6).await.unwrap() {
        Claim::Lost => {}
        Claim::Stale(_) => panic!("offered the fresh version while its backoff runs"),
        Claim::Claimed(_) => panic!("claimed with a stale resourceVersion"),
    }
    let now = api
        .get(&in_backoff.metadata.name.clone().unwrap())
        .await
        .unwrap();
    assert_eq!(now.phase(), JobPhase::Pending);
    assert_eq!(
        now.resource_version(),
        in_backoff.resource_version(),
        "untouched"
    );

    // Once the backoff is over, the same stale claim is offered the fresh version.
    reset_with_backoff(Timestamp::now() - SignedDuration::from_secs(1)).await;
    let Claim::Stale(fresh) = lease.claim(&tb.client, &stale, 6).await.unwrap() else {
        panic!("a claimable fresh version is offered");
    };
    let Claim::Claimed(held) = lease.claim(&tb.client, &fresh, 6).await.unwrap() else {
        panic!("and claimed");
    };
    assert_eq!(held.attempt, 3);
}

/// A retry of a job whose block was committed (the attempt died before reporting) reports that
/// block and rewrites nothing; a retry of one whose manifest was never written rebuilds the
/// same bytes.
#[tokio::test]
async fn a_retried_job_keeps_a_committed_block_and_rebuilds_an_uncommitted_one_identically() {
    use std::os::unix::fs::MetadataExt;
    let s = Scenario::new("bld-twice")
        .records(3000)
        .jobs(json!({"maxRecords": 3000}))
        .operator()
        .builders(1)
        .await;
    let (tb, builder) = (&s.tb, &s.builders[0]);
    let first = wait_for("first run", Duration::from_secs(120), || async {
        s.jobs()
            .await
            .into_iter()
            .find(|j| j.phase() == JobPhase::Succeeded)
    })
    .await;
    let name = first.metadata.name.clone().unwrap();
    let dir = s.blocks.join(&s.topic).join("0");
    let manifest = dir.join("00000000000000000000-00000000000000003000.json");
    let named: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("manifest")).unwrap();
    let data = dir.join(named["data"].as_str().expect("the manifest names its data"));
    let bytes_first = std::fs::read(&data).expect("block file");
    let inode_first = std::fs::metadata(&data).unwrap().ino();
    let sha_first = first.status.unwrap().output.unwrap().sha256;

    // Reset by hand, as an admin would (or as a lease expiry after a crash between the
    // manifest write and the report does): back to Pending, lease cleared.
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), &s.ns);
    let run_again = |attempt: i32| {
        let (api, name) = (api.clone(), name.clone());
        async move {
            let reset = json!({
                "apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob",
                "status": { "phase": "Pending", "attempt": attempt, "lease": { "holder": "", "leaseDurationSeconds": 6 } }
            });
            api.patch_status(
                &name,
                &PatchParams::apply("e2e-admin").force(),
                &Patch::Apply(reset),
            )
            .await
            .unwrap();
            wait_for(
                &format!("attempt {attempt}"),
                Duration::from_secs(120),
                || async {
                    let j = api.get(&name).await.ok()?;
                    (j.phase() == JobPhase::Succeeded && j.attempt() == attempt).then_some(j)
                },
            )
            .await
        }
    };

    let second = run_again(2).await;
    assert_eq!(second.status.unwrap().output.unwrap().sha256, sha_first);
    assert_eq!(
        std::fs::metadata(&data).unwrap().ino(),
        inode_first,
        "the committed data object was rewritten"
    );
    assert!(
        builder
            .log_text()
            .contains("block already committed by an earlier attempt"),
        "{}",
        builder.log_text()
    );

    // As if the first attempt had died after uploading the data but before the manifest.
    std::fs::remove_file(&manifest).unwrap();
    let third = run_again(3).await;
    assert_eq!(third.status.unwrap().output.unwrap().sha256, sha_first);
    assert_ne!(
        std::fs::metadata(&data).unwrap().ino(),
        inode_first,
        "rebuilt"
    );
    assert_eq!(std::fs::read(&data).unwrap(), bytes_first, "byte-identical");
    assert!(manifest.exists());
}

#[tokio::test]
async fn api_writes_per_job_lifecycle_are_counted() {
    let builder_port = free_port();
    let s = Scenario::new("bld-writes")
        .partitions(2)
        .records(4_000)
        .value_size(100)
        .jobs(json!({"maxRecords": 200, "ttlSecondsAfterSucceeded": 0}))
        .operator()
        .builders_with(1, move |cmd| {
            cmd.args(["--metrics-addr", &format!("127.0.0.1:{builder_port}")]);
        })
        .await;
    let jobs_total = 20.0;
    s.wait_all_committed(Duration::from_secs(300)).await;
    // The whole lifecycle ends with the cleanup deleting every committed job.
    wait_for(
        "cleanup of committed jobs",
        Duration::from_secs(60),
        || async { s.jobs().await.is_empty().then_some(()) },
    )
    .await;
    let op_metrics = http_get(s.operator.as_ref().unwrap().metrics_port, "/metrics");
    let b_metrics = http_get(builder_port, "/metrics");
    let op_writes = |kind: &str| {
        counter_sum(
            &op_metrics,
            "blocksmith_api_writes_total",
            Some(&format!("kind=\"{kind}\"")),
        )
    };
    let op_job_writes = OPERATOR_JOB_WRITE_KINDS.map(op_writes).iter().sum::<f64>();
    let status_writes = counter_sum(
        &op_metrics,
        "blocksmith_api_writes_total",
        Some("kind=\"pipeline_status\""),
    );
    let builder_writes = counter_sum(&b_metrics, "blocksmith_builder_api_writes_total", None);
    println!(
        "API writes per job: operator {:.2} (create, phase labels, delete), builder {:.2} (claim, renewals, report); pipeline status writes for {jobs_total} jobs: {status_writes}; operator writes by kind: {:?}",
        op_job_writes / jobs_total,
        builder_writes / jobs_total,
        OPERATOR_JOB_WRITE_KINDS.map(|k| (k, op_writes(k)))
    );
    // Every job's finalizer goes with a `Succeeded` label write once its range is committed
    // (a job that succeeded before the one ahead of it is labelled first, released after),
    // never in a write of its own before the delete.
    assert_eq!(op_writes("release_job"), 0.0);
    assert!(op_writes("finish_job") >= jobs_total);
    // A `Running` label only for a job whose lease was renewed: each one follows a renewal.
    assert!(
        op_writes("label_job") <= builder_writes - 2.0 * jobs_total,
        "Running labels without renewals"
    );
    // create + Running label + Succeeded label and release + delete
    assert!(
        op_job_writes / jobs_total <= 4.0,
        "operator writes per job: {}",
        op_job_writes / jobs_total
    );
    assert!(
        op_job_writes / jobs_total >= 2.0,
        "the counter counts: {op_metrics}"
    );
    // claim + report, plus a compare-and-swap retry on a label change or a renewal on a slow run
    assert!(
        builder_writes / jobs_total <= 4.0,
        "builder writes per job: {}",
        builder_writes / jobs_total
    );
    assert!(
        builder_writes / jobs_total >= 2.0,
        "the counter counts: {b_metrics}"
    );

    // `job_duration_seconds` is claim → report: each observation is the time the builder
    // logged with its report, so the histogram includes the report write.
    let reported: Vec<f64> = s.builders[0]
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "reported")
        .filter_map(|event| event["seconds"].as_f64())
        .collect();
    assert_eq!(reported.len() as f64, jobs_total, "one report per job");
    let observed = counter_sum(
        &b_metrics,
        "blocksmith_builder_job_duration_seconds_sum",
        None,
    );
    let logged: f64 = reported.iter().sum();
    assert!(
        (observed - logged).abs() < 1e-6,
        "job_duration_seconds sums {observed} s, the reports' logged times {logged} s"
    );
}

#[tokio::test]
async fn sigterm_stops_claiming_and_finishes_or_releases_the_current_job() {
    let s = Scenario::new("bld-term")
        .partitions(2)
        .records(20_000)
        .value_size(200)
        .jobs(json!({"maxRecords": 1000}))
        .operator()
        .await;
    let mut first = s.spawn_builder("first");
    wait_for_a_job_on(&s.tb, &s.ns, "p", "first").await;
    // Grace period is 5 s (spawn_builder): it must exit cleanly well within it.
    let status = first
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let log = first.log_text();
    assert!(log.contains("shutdown requested"), "{log}");
    // Nothing is left held by the stopped builder once it is gone.
    assert!(
        !s.jobs().await.iter().any(|j| running_on(j, "first")),
        "a job still held by the stopped builder"
    );
    let _second = s.spawn_builder("second");
    s.wait_committed_then_audit(Duration::from_secs(300)).await;
}

/// What Prometheus scrapes from the operator and a builder is OpenMetrics, served as such:
/// the content type says so (with `text/plain`, Prometheus's classic parser misreads the
/// counters' TYPE lines and their `_total` samples) and the project's strict OpenMetrics
/// parser accepts every line.
#[tokio::test]
async fn metrics_are_openmetrics_served_with_its_content_type() {
    let builder_port = free_port();
    let s = Scenario::new("bld-openmetrics")
        .partitions(2)
        .records(1_000)
        .value_size(100)
        .jobs(json!({"maxRecords": 250}))
        .operator()
        .builders_with(1, move |cmd| {
            cmd.args(["--metrics-addr", &format!("127.0.0.1:{builder_port}")]);
        })
        .await;
    s.wait_all_committed(Duration::from_secs(120)).await;
    let operator_port = s.operator.as_ref().unwrap().metrics_port;
    for (who, port, family) in [
        ("operator", operator_port, "blocksmith_api_writes"),
        ("builder", builder_port, "blocksmith_builder_api_writes"),
    ] {
        let (head, body) = http_get_with_headers(port, "/metrics");
        assert_eq!(
            header(&head, "content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "{who}: {head}"
        );
        let parsed = parse_openmetrics(&s.tb.python, &body);
        println!("{who}: {parsed}");
        let names: Vec<&str> = parsed["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert!(names.contains(&family), "{who}: {family} not in {names:?}");
    }
}
