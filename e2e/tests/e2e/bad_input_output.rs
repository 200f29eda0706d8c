//! Bad output settings and specs changed under a running pipeline, end to end: each case must
//! end in a condition, job message or Event a user can act on (naming the field, bucket,
//! offset or job), and nothing may be lost or written twice — audited over the blocks real
//! builder processes wrote, with the group's committed offsets.
//!
//! An unknown output scheme (`ftp://`, rejected by the schema) and a URL naming no bucket
//! (`InvalidSpec` on `spec.output.url`, nothing planned or committed) are covered with the
//! other invalid specs in `bad_input_kafka.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blocksmith_builder::reader::ReaderConfig;
use blocksmith_builder::runner::{BuildSettings, build_block};
use blocksmith_builder::store::{OpenStores, UploadSettings};
use blocksmith_crds::domain::{default_consumer_group, job_name, replacement_name};
use blocksmith_crds::{BlockJob, BlockPipeline, JobPhase};
use blocksmith_e2e::broker::PrivateBroker;
use blocksmith_e2e::datagen::{DataSpec, Produced, ValueSizes};
use blocksmith_e2e::process::Proc;
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

/// `bp` with `output` fields merged over its own.
fn with_output(bp: BlockPipeline, output: Value) -> BlockPipeline {
    let mut v = serde_json::to_value(&bp).unwrap();
    if let (Some(o), Value::Object(over)) = (v["spec"]["output"].as_object_mut(), output) {
        for (k, val) in over {
            if val.is_null() {
                o.remove(&k);
            } else {
                o.insert(k, val);
            }
        }
    }
    serde_json::from_value(v).expect("pipeline")
}

/// Both productions into the same topic as one: offsets of the second follow the first.
fn merge(mut a: Produced, b: Produced) -> Produced {
    for (p, (n, high)) in b.partitions {
        let e = a.partitions.entry(p).or_insert((0, 0));
        e.0 += n;
        e.1 = e.1.max(high);
    }
    a.records.extend(b.records);
    a.records.sort();
    a.bytes += b.bytes;
    a
}

fn fixed(topic: &str, partitions: i32, records: u64, size: usize, seed: u64) -> DataSpec {
    DataSpec {
        value_sizes: ValueSizes::Fixed(size),
        seed,
        ..DataSpec::new(topic, partitions, records)
    }
}

/// What a user sees of jobs failed for good: `Degraded/JobFailed` naming `mentions` and the
/// offset the commit is held at, and a Warning `JobFailed` Event naming `event_mentions`.
async fn assert_job_failure_reported(
    tb: &Testbed,
    ns: &str,
    mentions: &str,
    held_at: i64,
    event_mentions: &str,
) {
    let job_failed = Cond::new("Degraded").status("True").reason("JobFailed");
    let degraded = wait_condition(tb, ns, "p", &job_failed).await.message;
    assert!(
        degraded.contains(mentions) && degraded.contains(&format!("held at offset {held_at}")),
        "{degraded}"
    );
    let what = format!("a JobFailed Warning naming {event_mentions:?}");
    wait_event_where(tb, ns, "p", &what, |t, r, n| {
        t == "Warning" && r == "JobFailed" && n.contains(event_mentions)
    })
    .await;
}

/// Failed for good: failed on the last attempt the backoff limit allows.
fn exhausted(j: &BlockJob, backoff_limit: i32) -> bool {
    j.phase() == JobPhase::Failed && j.attempt() == backoff_limit
}

/// Waits until every job of the pipeline (`n` of them) failed on its last attempt.
async fn wait_all_failed(tb: &Testbed, ns: &str, n: usize, backoff_limit: i32) -> Vec<BlockJob> {
    wait_for(
        &format!("{n} jobs Failed"),
        Duration::from_secs(120),
        || async {
            let js = jobs(tb, ns, "p").await;
            (js.len() == n && js.iter().all(|j| exhausted(j, backoff_limit))).then_some(js)
        },
    )
    .await
}

/// The user's retry: delete the failed jobs; the operator re-creates them at attempt 1.
async fn delete_failed(tb: &Testbed, ns: &str) -> Vec<String> {
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), ns);
    let mut deleted = Vec::new();
    for j in jobs(tb, ns, "p").await {
        if j.phase() == JobPhase::Failed {
            let name = j.metadata.name.clone().unwrap();
            api.delete(&name, &DeleteParams::default()).await.unwrap();
            deleted.push(name);
        }
    }
    deleted
}

/// Every manifest under `dir` has the data object it names beside it (the audit checks the
/// sha256 of each data object against its manifest).
fn assert_manifests_have_data(dir: &Path) {
    for f in files(dir) {
        if f.extension().is_some_and(|e| e == "json") {
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(&f)).unwrap()).unwrap();
            let name = manifest["data"]
                .as_str()
                .expect("the manifest names its data");
            let data = dir.join(&f).with_file_name(name);
            assert!(data.exists(), "manifest {} without its data", f.display());
        }
    }
}

/// A builder whose environment holds the keys of `secret`, as the operator's builder
/// Deployment gets them (`envFrom` of `spec.output.credentialsSecretRef`).
async fn spawn_builder_with_secret(tb: &Testbed, ns: &str, id: &str, secret: &str) -> Proc {
    let s = Api::<Secret>::namespaced(tb.client.clone(), ns)
        .get(secret)
        .await
        .expect("secret");
    spawn_builder_with(tb, ns, "p", id, |cmd| {
        for (k, v) in s.data.unwrap_or_default() {
            cmd.env(k, String::from_utf8(v.0).unwrap());
        }
    })
}

fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect()
}

#[tokio::test]
async fn wrong_object_store_credentials_hold_planning_naming_them_and_a_fix_writes_everything_once()
{
    let tb = Testbed::get().await;
    // A private S3 server with the testbed's credentials; the pipeline's Secret has the
    // right access key but a wrong secret key.
    let server = PrivateS3::spawn(&tb, "bio-creds");
    let port = server.port;
    let s = Scenario::new("bio-creds")
        .partitions(2)
        .records(2000)
        .value_size(100)
        .output("s3://blocksmith/creds")
        .jobs(json!({"maxRecords": 500, "backoffLimit": 2}))
        .pipeline(|bp| {
            let secret = json!({"name": "s3"});
            bp.spec.output.credentials_secret_ref = Some(serde_json::from_value(secret).unwrap());
        })
        .unapplied()
        .await;
    let (tb, ns, root) = (&s.tb, &s.ns, &server.root);
    let access_key = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
    let secret_key = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    let creds = |secret: &str| {
        json!({
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT": format!("http://127.0.0.1:{port}"),
            "AWS_ALLOW_HTTP": "true",
        })
    };
    apply_secret(tb, ns, "s3", creds("not-the-secret-key")).await;
    s.apply(&s.bp).await;
    let _op = s.spawn_operator("op");
    let mut builder = spawn_builder_with_secret(tb, ns, "b1", "s3").await;

    // Before planning a new pipeline the operator lists the blocks already in its output,
    // with the pipeline's Secret: refused, so nothing is planned (no job would succeed).
    let unreadable = Cond::new("Degraded")
        .status("True")
        .reason("OutputUnreadable");
    let message = s.wait(unreadable).await.message;
    println!("condition message: {message}");
    assert!(
        message.contains("s3://blocksmith/creds/")
            && message.contains("check the object-storage credentials")
            && message.contains("credentialsSecretRef")
            && message.contains("planning resumes by itself"),
        "{message}"
    );
    let event = s.wait_event("OutputUnreadable").await;
    assert!(
        event.contains("check the object-storage credentials"),
        "{event}"
    );
    assert!(s.jobs().await.is_empty(), "nothing planned");
    assert!(
        files(&root.join("blocksmith")).is_empty(),
        "nothing written"
    );

    // The fix: correct the Secret and restart the builders (they read it at start-up); no
    // job to delete.
    apply_secret(tb, ns, "s3", creds(&secret_key)).await;
    let status = builder.terminate(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}");
    let _builder = spawn_builder_with_secret(tb, ns, "b2", "s3").await;
    s.wait_committed_then_audit_in(&server.dir("creds"), Duration::from_secs(120))
        .await;
    assert!(
        s.jobs()
            .await
            .iter()
            .all(|j| j.phase() == JobPhase::Succeeded && j.attempt() == 1)
    );
    s.wait(Cond::new("Degraded").status("False")).await;
}

/// The file-system twin of a missing bucket. (The testbed's S3 server, s3s-fs, creates a
/// missing bucket on PutObject instead of answering NoSuchBucket as S3 does, so the S3
/// message — `... failed: ... (the bucket or container does not exist: create it or fix
/// spec.output.url, then delete the failed jobs to retry them)` — is checked by the
/// builder's unit tests.)
#[tokio::test]
async fn a_missing_output_location_fails_the_jobs_naming_it_and_creating_it_then_retrying_writes_everything_once()
 {
    let location = Testbed::get()
        .await
        .dir
        .join("blocks")
        .join(format!("not-mounted-{:08x}", rand::random::<u32>()));
    let s = Scenario::new("bio-missing")
        .partitions(2)
        .records(2000)
        .value_size(100)
        .output(file_url(&location))
        .jobs(json!({"maxRecords": 500, "backoffLimit": 2}))
        .operator()
        .builders(1)
        .await;
    let (tb, ns) = (&s.tb, &s.ns);

    let failed = wait_all_failed(tb, ns, 4, 2).await;
    let named = format!("{} does not exist", location.display());
    for j in &failed {
        let m = job_message(j);
        assert!(
            m.contains(&named) && m.contains("create it") && m.contains("delete the failed jobs"),
            "{m}"
        );
    }
    println!("job message: {}", job_message(&failed[0]));
    assert_job_failure_reported(tb, ns, &named, 0, &named).await;
    assert_eq!(
        s.committed().await,
        BTreeMap::from([(0, 0), (1, 0)]),
        "the commit holds at the failed jobs"
    );
    assert!(!location.exists(), "not created behind the user's back");

    // The fix: create it, delete the failed jobs.
    std::fs::create_dir_all(&location).unwrap();
    assert_eq!(delete_failed(tb, ns).await.len(), 4);
    s.wait_committed_then_audit_in(&location, Duration::from_secs(120))
        .await;
}

/// Produces `before` records of 100 bytes, one of 5000 bytes (at offset `before`) and
/// `after` more of 100 bytes to the scenario's one-partition topic.
async fn produce_around_one_big_record(s: &mut Run, before: u64, after: u64) {
    let (tb, topic) = (&s.tb, &s.topic);
    let small = produce_data(tb, fixed(topic, 1, before, 100, 1)).await;
    let big = produce_data(tb, fixed(topic, 1, 1, 5000, 2)).await;
    let rest = produce_data(tb, fixed(topic, 1, after, 100, 3)).await;
    assert_eq!(big.records[0].offset, before as i64);
    s.produced = merge(merge(small, big), rest);
}

/// [`produce_around_one_big_record`], then the pipeline applied with a record limit of 1000
/// bytes (so the job holding the big record fails), and an operator and a builder that `s`
/// keeps running.
async fn run_into_a_big_record(s: &mut Run, before: u64, after: u64) {
    produce_around_one_big_record(s, before, after).await;
    s.apply(&with_record_limit(&s.bp, 1000)).await;
    s.operator = Some(s.spawn_operator("op"));
    s.builders = vec![s.spawn_builder("b")];
}

fn with_record_limit(bp: &BlockPipeline, limit: i64) -> BlockPipeline {
    let mut bp = bp.clone();
    bp.spec.output.max_record_bytes = Some(limit);
    bp
}

#[tokio::test]
async fn a_record_over_max_record_bytes_fails_its_job_writes_nothing_and_a_raised_limit_writes_it_once()
 {
    let mut s = Scenario::new("bio-big")
        .jobs(json!({"maxRecords": 1000, "backoffLimit": 2}))
        .unapplied()
        .await;
    let tb = s.tb.clone();
    run_into_a_big_record(&mut s, 1500, 1499).await;
    let bp = |limit| with_record_limit(&s.bp, limit);
    let (ns, blocks) = (&s.ns, &s.blocks);

    let bad = job_name("p", 0, 1000);
    let failed = wait_for("the job Failed", Duration::from_secs(120), || async {
        s.jobs()
            .await
            .into_iter()
            .find(|j| j.metadata.name.as_deref() == Some(&bad) && exhausted(j, 2))
    })
    .await;
    let m = job_message(&failed);
    let expected = format!(
        "record at partition 0 offset 1500 is {} bytes, over spec.output.maxRecordBytes \
         (1000); raise the limit and delete job {bad} to retry",
        failed_record_bytes(&m)
    );
    assert!(m.contains(&expected), "{m}");
    assert!(failed_record_bytes(&m) >= 5000, "{m}");
    assert_job_failure_reported(&tb, ns, &expected, 1000, "maxRecordBytes").await;
    // The jobs around it succeed; the commit holds at the failed job's start.
    wait_for("the other jobs", Duration::from_secs(60), || async {
        let js = s.jobs().await;
        (js.iter()
            .filter(|j| j.phase() == JobPhase::Succeeded)
            .count()
            == 2)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.committed().await, BTreeMap::from([(0, 1000)]));
    // No partial block: nothing at all for the failed range.
    let written = files(blocks);
    assert_eq!(
        written.len(),
        4,
        "two blocks, data and manifest: {written:?}"
    );
    assert!(
        !written
            .iter()
            .any(|f| f.to_string_lossy().contains("00000000000000001000-")),
        "{written:?}"
    );

    // Raise the limit, delete the job: re-created (as its replacement) under the new limit,
    // written once.
    s.apply(&bp(8192)).await;
    wait_observed(&s).await;
    assert_eq!(delete_failed(&tb, ns).await, vec![bad.clone()]);
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
    let retried = s.job(&Some(replacement_name(&bad))).await.unwrap();
    assert_eq!(
        (retried.spec.start_offset, retried.spec.end_offset),
        (1000, 2000)
    );
    assert_eq!(retried.spec.output.max_record_bytes, Some(8192));
    assert_eq!(retried.attempt(), 1);
}

/// A job failed for good holds the commit, and the jobs after it succeed and wait for it.
/// While records keep arriving, planning stops at `maxUncommittedJobsPerPartition` jobs
/// instead of piling succeeded jobs up in etcd at the topic's write rate; the retried job
/// then lets everything through, each offset once.
#[tokio::test]
async fn jobs_held_behind_a_failed_one_stop_at_their_bound_while_records_keep_arriving() {
    let mut s = Scenario::new("bio-bound")
        .jobs(json!({
            "maxRecords": 100,
            "maxInFlightPerPartition": 2,
            "maxUncommittedJobsPerPartition": 4,
            "backoffLimit": 1,
        }))
        .unapplied()
        .await;
    let (tb, topic) = (s.tb.clone(), s.topic.clone());
    // Offset 150 is over the record limit, so job [100, 200) fails for good.
    run_into_a_big_record(&mut s, 150, 49).await;
    let bp = |limit| with_record_limit(&s.bp, limit);
    let bad = job_name("p", 0, 100);
    wait_for("the job Failed", Duration::from_secs(120), || async {
        s.jobs()
            .await
            .into_iter()
            .find(|j| j.metadata.name.as_deref() == Some(&bad) && exhausted(j, 1))
    })
    .await;

    let uncommitted = |js: Vec<BlockJob>| -> Vec<BlockJob> {
        js.into_iter()
            .filter(|j| j.spec.start_offset >= 100)
            .collect()
    };
    for seed in 4..14 {
        let more = produce_data(&tb, fixed(&topic, 1, 100, 100, seed)).await;
        s.produced = merge(std::mem::take(&mut s.produced), more);
        let live = uncommitted(s.jobs().await);
        assert!(live.len() <= 4, "{} jobs not committed", live.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let held = wait_for(
        "planning stopped at the bound",
        Duration::from_secs(60),
        || async {
            let live = uncommitted(s.jobs().await);
            let succeeded = live
                .iter()
                .filter(|j| j.phase() == JobPhase::Succeeded)
                .count();
            (live.len() == 4 && succeeded == 3).then_some(live)
        },
    )
    .await;
    let mut ranges: Vec<_> = held
        .iter()
        .map(|j| (j.spec.start_offset, j.spec.end_offset))
        .collect();
    ranges.sort_unstable();
    assert_eq!(ranges, [(100, 200), (200, 300), (300, 400), (400, 500)]);
    // Once the operator has seen every record (it looks every 5 s while a job has failed),
    // it still plans nothing past the bound.
    let partition = wait_for(
        "the status showing every record",
        Duration::from_secs(30),
        || async {
            let partition = s.get().await.status?.partitions.into_iter().next()?;
            (partition.high_watermark == 1200).then_some(partition)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(uncommitted(s.jobs().await).len(), 4);
    assert_eq!(partition.planned_offset, Some(500));
    assert_eq!(s.committed().await, BTreeMap::from([(0, 100)]));

    s.apply(&bp(8192)).await;
    wait_observed(&s).await;
    assert_eq!(delete_failed(&tb, &s.ns).await, vec![bad]);
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
}

/// Waits until the operator has seen the pipeline's current spec.
async fn wait_observed(s: &Run) {
    wait_for("the new spec observed", Duration::from_secs(30), || async {
        let bp = s.get().await;
        (bp.status?.observed_generation == bp.metadata.generation).then_some(())
    })
    .await;
}

/// The size a `record ... is N bytes` message reports.
fn failed_record_bytes(message: &str) -> u64 {
    message
        .split(" is ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {message:?}"))
}

#[tokio::test]
async fn deleting_a_pipeline_mid_run_collects_its_jobs_and_leaves_builders_idle_and_blocks_whole() {
    // A broker of its own, slowed to a 300 ms round trip while b0 is caught in a job: jobs
    // then take seconds instead of milliseconds.
    let mut s = Scenario::new("bio-delete")
        .private_broker()
        .partitions(4)
        .records(8_000)
        .value_size(200)
        .jobs(json!({"maxRecords": 1000, "leaseDurationSeconds": 120}))
        .operator()
        .await;
    s.broker().set_round_trip_time(Duration::from_millis(300));
    s.builders = s.spawn_builders(2);
    // The pipeline is deleted under b0's job in progress, after b1 built and committed some.
    freeze_in_a_job(&s.tb, &s.ns, "p", &s.builders[0], "b0").await;
    s.broker().set_round_trip_time(Duration::ZERO);
    wait_for("a first commit", Duration::from_secs(90), || async {
        s.committed().await.values().any(|&o| o > 0).then_some(())
    })
    .await;
    let Run {
        tb,
        ns,
        topic,
        group,
        blocks,
        produced,
        operator,
        mut builders,
        ..
    } = s;
    let mut op = operator.unwrap();
    let op_log_at = op.proc.log_text().len();
    let logs_at: Vec<usize> = builders.iter().map(|b| b.log_text().len()).collect();

    // What `kubectl delete bp p` does: background deletion; the garbage collector of
    // kube-controller-manager deletes the jobs it owns.
    Api::<BlockPipeline>::namespaced(tb.client.clone(), &ns)
        .delete("p", &DeleteParams::background())
        .await
        .expect("delete pipeline");
    // b0, frozen with its leases live, may still write its blocks: its jobs (one per slot
    // that held one) stay, their ranges kept from any pipeline re-created under the name,
    // while the others go.
    wait_for(
        "the jobs but b0's garbage-collected",
        Duration::from_secs(60),
        || async {
            let left = jobs(&tb, &ns, "p").await;
            (!left.is_empty()
                && left
                    .iter()
                    .all(|j| j.is_terminating() && lease_holder(j) == Some("b0")))
            .then_some(())
        },
    )
    .await;
    builders[0].signal("CONT");
    // b0 notices at its next renewals, stops and gives the jobs back; then they go too.
    wait_for(
        "the jobs garbage-collected",
        Duration::from_secs(60),
        || async { jobs(&tb, &ns, "p").await.is_empty().then_some(()) },
    )
    .await;
    // The operator forgets it: no metric series of it is left.
    let series = format!("namespace=\"{ns}\",pipeline=\"p\"");
    wait_for(
        "the pipeline's metric series removed",
        Duration::from_secs(30),
        || async { (!http_get(op.metrics_port, "/metrics").contains(&series)).then_some(()) },
    )
    .await;
    let group_at = group_offsets(&tb.kafka_bootstrap, &group, &topic, 4).await;

    // The builders idle: running, no errors, and quiet.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let quiet_from: Vec<usize> = builders.iter().map(|b| b.log_text().len()).collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (i, b) in builders.iter_mut().enumerate() {
        assert!(b.is_running(), "builder {i} exited");
        let log = b.log_text();
        let after = &log[logs_at[i]..];
        assert!(error_lines(after).is_empty(), "{:?}", error_lines(after));
        let idle = &log[quiet_from[i]..];
        assert!(
            idle.lines().count() <= 2,
            "builder {i} keeps logging while idle:\n{idle}"
        );
    }
    let b0 = builders[0].log_text()[logs_at[0]..].to_string();
    // Unfrozen, b0 either notices the deletion at its renewal and gives the job back, or
    // finishes its block first (whole, under its manifest): the audit below checks both.
    assert!(
        b0.contains("the job was deleted") || b0.contains("\"reported\""),
        "b0 gave its deleted job back or finished it:\n{b0}"
    );
    // The operator keeps running and writes nothing for the gone pipeline: no new commits.
    assert!(op.proc.is_running(), "operator exited");
    let op_after = op.proc.log_text()[op_log_at..].to_string();
    assert!(error_lines(&op_after).is_empty(), "{op_after}");
    assert!(
        !op_after.contains("not found in local store"),
        "events of the deleted pipeline's jobs are not reconcile errors:\n{op_after}"
    );
    assert_eq!(
        group_offsets(&tb.kafka_bootstrap, &group, &topic, 4).await,
        group_at
    );
    assert!(
        jobs(&tb, &ns, "p").await.is_empty(),
        "nothing re-created the jobs"
    );
    // SIGTERM ends them cleanly.
    for b in &mut builders {
        let status = b.terminate(Duration::from_secs(15)).expect("exits");
        assert!(status.success(), "{status:?}");
    }

    // Whatever was written is whole: every manifest has its data with the same sha256, no
    // offset twice, and the committed prefix complete.
    assert_manifests_have_data(&blocks);
    let (report, exact) = audit_produced(&tb, &blocks, &produced, Some(&group_at));
    println!("audit after deletion: {report} (committed {group_at:?})");
    assert!(exact, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert!(group_at.values().any(|&o| o > 0), "{group_at:?}");
}

#[tokio::test]
async fn changing_max_records_compression_and_url_mid_run_applies_to_new_jobs_only() {
    let mut s = Scenario::new("bio-change")
        .partitions(2)
        .records(20_000)
        .value_size(100)
        .jobs(json!({"maxRecords": 500}))
        .unapplied()
        .await;
    let (tb, blocks) = (s.tb.clone(), s.blocks.clone());
    std::fs::create_dir_all(blocks.join("a")).unwrap();
    std::fs::create_dir_all(blocks.join("b")).unwrap();
    let url_a = file_url(&blocks.join("a"));
    let url_b = file_url(&blocks.join("b"));
    let mut before = s.bp.clone();
    before.spec.output.url = url_a.clone();
    s.apply(&before).await;
    let _op = s.spawn_operator("op");
    let _builder = s.spawn_builder("b");
    let planned = wait_for(
        "40 jobs planned, the run under way",
        Duration::from_secs(60),
        || async {
            let js = s.jobs().await;
            (js.len() == 40 && js.iter().any(|j| j.phase() == JobPhase::Succeeded)).then_some(js)
        },
    )
    .await;
    assert!(
        planned.iter().any(|j| j.phase() != JobPhase::Succeeded),
        "changed while jobs are still to run"
    );

    let after = with_output(
        pipeline(
            "p",
            &s.topic,
            &tb.kafka_bootstrap,
            &url_b,
            json!({"maxRecords": 1500}),
        ),
        json!({"compression": "snappy", "compressionLevel": null}),
    );
    s.apply(&after).await;
    wait_observed(&s).await;
    let second = produce_data(&tb, fixed(&s.topic, 2, 6000, 100, 2)).await;
    s.produced = merge(std::mem::take(&mut s.produced), second);
    let c = s.wait_all_committed(Duration::from_secs(180)).await;
    assert_eq!(c, BTreeMap::from([(0, 13_000), (1, 13_000)]));

    let all = s.jobs().await;
    for j in &planned {
        let now = same_job(&all, j).expect("planned job kept");
        assert_eq!(now.spec, j.spec, "a planned job keeps its range and output");
        assert_eq!(now.spec.end_offset - now.spec.start_offset, 500);
        assert_eq!(now.spec.output.url, url_a);
    }
    let new: Vec<_> = all
        .iter()
        .filter(|j| j.spec.start_offset >= 10_000)
        .map(|j| {
            (
                j.spec.partition,
                j.spec.start_offset,
                j.spec.end_offset,
                j.spec.output.url.clone(),
                j.spec.output.compression,
            )
        })
        .collect();
    let snappy = blocksmith_crds::pipeline::Compression::Snappy;
    let want: Vec<_> = (0..2)
        .flat_map(|p| {
            [(10_000, 11_500), (11_500, 13_000)]
                .map(|(s, e)| (p, s, e, url_b.clone(), snappy))
                .to_vec()
        })
        .collect();
    assert_eq!(new, want, "new jobs use the new size and output");
    assert_eq!(all.len(), 44);
    // Every offset exactly once over both locations.
    audit_exact(&tb, &blocks, &s.produced, &c);
    assert_eq!(files(&blocks.join("a")).len(), 80);
    assert_eq!(files(&blocks.join("b")).len(), 8);
}

/// Where a pipeline reads and writes: `spec.kafka` (through `tb`'s broker), the data produced
/// there, and `spec.output.url`.
struct Source {
    tb: Testbed,
    topic: String,
    data: Produced,
    blocks: PathBuf,
}

impl Source {
    fn pipeline(&self) -> BlockPipeline {
        let url = format!("file://{}", self.blocks.display());
        pipeline(
            "p",
            &self.topic,
            &self.tb.kafka_bootstrap,
            &url,
            json!({"maxRecords": 1000}),
        )
    }

    async fn committed(&self, group: &str) -> BTreeMap<i32, i64> {
        group_offsets(&self.tb.kafka_bootstrap, group, &self.topic, 1).await
    }

    async fn wait_committed_then_audit(&self, group: &str, timeout: Duration) {
        let blocks = self.blocks.join(&self.topic);
        wait_committed_then_audit(&self.tb, group, &self.topic, &blocks, &self.data, timeout).await;
    }
}

/// Pipeline `p` reads `old` (3,000 records, one partition, 3 jobs), then `spec.kafka.{field}`
/// changes to read `new`, whose offsets are other records: it must be `InvalidSpec` with
/// `old_jobs` in the message, commit nothing to either while the old jobs exist, commit the
/// old work once set back, and move to `new` once the old jobs are deleted as the message
/// says; every block audited.
async fn a_source_change_mid_run_commits_no_jobs_of_the_old_source_for_the_new(
    ns: &str,
    field: &str,
    old: &Source,
    new: &Source,
    old_jobs: &str,
) {
    let tb = &old.tb;
    let group = default_consumer_group(ns, "p");
    apply_pipeline(tb, ns, &old.pipeline()).await;
    let _op = spawn_operator(tb, ns, "op");
    wait_jobs(tb, ns, "p", 3).await;
    let invalid_spec = Cond::new("Ready").reason("InvalidSpec");
    let invalid = || async { wait_condition(tb, ns, "p", &invalid_spec).await.message };

    // Changed while the old source's jobs are still to run.
    apply_pipeline(tb, ns, &new.pipeline()).await;
    let message = invalid().await;
    assert!(
        message.starts_with(&format!("spec.kafka.{field}: "))
            && message.contains(old_jobs)
            && message.contains("create a new pipeline"),
        "{message}"
    );
    let named = format!("spec.kafka.{field}");
    wait_event_where(tb, ns, "p", "an InvalidSpec Warning", |t, r, n| {
        t == "Warning" && r == "InvalidSpec" && n.contains(&named)
    })
    .await;
    // The builder still builds the old jobs (they name their topic and brokers), but nothing
    // is committed to either source while the spec says otherwise.
    let _builder = spawn_builder(tb, ns, "p", "b");
    wait_for("old jobs built", Duration::from_secs(120), || async {
        jobs(tb, ns, "p")
            .await
            .iter()
            .all(|j| j.phase() == JobPhase::Succeeded)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        new.committed(&group).await.is_empty(),
        "nothing committed for the new source"
    );
    assert_eq!(old.committed(&group).await, BTreeMap::from([(0, 0)]));
    assert_eq!(jobs(tb, ns, "p").await.len(), 3, "nothing planned");

    // Set back: the old source's work is committed, exactly once.
    apply_pipeline(tb, ns, &old.pipeline()).await;
    old.wait_committed_then_audit(&group, Duration::from_secs(60))
        .await;

    // Moving the pipeline on purpose: change it, delete the old jobs as the message says;
    // the new source is then written from its start, exactly once.
    apply_pipeline(tb, ns, &new.pipeline()).await;
    invalid().await;
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), ns);
    api.delete_collection(
        &DeleteParams::default(),
        &kube::api::ListParams::default().labels("blocksmith.io/pipeline=p"),
    )
    .await
    .unwrap();
    new.wait_committed_then_audit(&group, Duration::from_secs(120))
        .await;
    assert!(jobs(tb, ns, "p").await.iter().all(|j| {
        j.spec.topic == new.topic && j.spec.bootstrap_servers == new.tb.kafka_bootstrap
    }));
    let started = Instant::now();
    wait_condition(tb, ns, "p", &Cond::new("Ready").status("True")).await;
    println!("ready {:?} after the last commit", started.elapsed());
}

#[tokio::test]
async fn changing_the_topic_mid_run_is_invalid_and_never_commits_one_topics_jobs_to_another() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("bio-topic").await;
    let blocks = blocks_dir(&tb, "topic");
    let mut sources = Vec::new();
    for (name, records, seed) in [("bio-topic-old", 3000, 1), ("bio-topic-new", 2000, 2)] {
        let topic = tb.topic(name, 1);
        let data = produce_data(&tb, fixed(&topic, 1, records, 100, seed)).await;
        sources.push(Source {
            tb: tb.clone(),
            topic,
            data,
            blocks: blocks.clone(),
        });
    }
    let old_jobs = format!("3 job(s) of topic {:?}", sources[0].topic);
    a_source_change_mid_run_commits_no_jobs_of_the_old_source_for_the_new(
        &ns,
        "topic",
        &sources[0],
        &sources[1],
        &old_jobs,
    )
    .await;
}

/// Bootstrap servers may change to other brokers of the same cluster; a topic of the same
/// name in another cluster is another topic. Each cluster here is a broker of its own.
#[tokio::test]
async fn changing_the_brokers_to_another_cluster_mid_run_is_invalid_and_never_mixes_their_offsets()
{
    let shared = Testbed::get().await;
    let ns = shared.namespace("bio-cluster").await;
    let mut brokers = Vec::new();
    let mut sources = Vec::new();
    for (name, records, seed) in [("a", 3000, 1), ("b", 2000, 2)] {
        let broker = PrivateBroker::spawn(&shared, &format!("{ns}-{name}"));
        let tb = broker.testbed(&shared);
        broker.create_topic("orders", 1);
        let data = produce_data(&tb, fixed("orders", 1, records, 100, seed)).await;
        let blocks = blocks_dir(&tb, &format!("cluster-{name}"));
        sources.push(Source {
            tb,
            topic: "orders".into(),
            data,
            blocks,
        });
        brokers.push(broker);
    }
    let (a, b) = (&sources[0], &sources[1]);
    let (id_a, id_b) = (brokers[0].cluster_id(), brokers[1].cluster_id());
    assert_ne!(id_a, id_b, "the two brokers are two clusters");
    let old_jobs = format!("3 job(s) of cluster {id_a:?}");
    a_source_change_mid_run_commits_no_jobs_of_the_old_source_for_the_new(
        &ns,
        "bootstrapServers",
        a,
        b,
        &old_jobs,
    )
    .await;
    let ids: Vec<Option<String>> = jobs(&b.tb, &ns, "p")
        .await
        .into_iter()
        .map(|j| j.spec.kafka_cluster_id)
        .collect();
    assert!(ids.iter().all(|id| id.as_ref() == Some(&id_b)), "{ids:?}");

    // A pipeline reading cluster b but writing where cluster a's blocks are: its builder
    // refuses to take a's blocks for b's, and overwrites nothing.
    let mut q = b.pipeline();
    q.metadata.name = Some("q".into());
    q.spec.output.url = format!("file://{}", a.blocks.display());
    q.spec.jobs.backoff_limit = 1;
    apply_pipeline(&b.tb, &ns, &q).await;
    let _op = spawn_operator(&b.tb, &ns, "op-q");
    let _builder = spawn_builder(&b.tb, &ns, "q", "qb");
    let message = wait_for("q's first job failed", Duration::from_secs(60), || async {
        jobs(&b.tb, &ns, "q")
            .await
            .into_iter()
            .find(|j| j.spec.start_offset == 0 && j.phase() == JobPhase::Failed)
            .map(|j| job_message(&j))
    })
    .await;
    assert!(
        message.contains(&format!(
            "holds a block of Kafka cluster {id_a:?}, not of this job's Kafka cluster {id_b:?}"
        )) && message.contains("give this pipeline its own spec.output.url"),
        "{message}"
    );
    assert!(
        group_offsets(
            &b.tb.kafka_bootstrap,
            &default_consumer_group(&ns, "q"),
            "orders",
            1
        )
        .await
        .values()
        .all(|&o| o == 0),
        "q committed nothing"
    );
    audit_exact(
        &a.tb,
        &a.blocks.join("orders"),
        &a.data,
        &high_watermarks(&a.data),
    );
}

/// Issue 11, scenario 3: a pipeline deleted while a builder still writes one of its jobs, and
/// re-created over the same output with another `maxRecords`. The operator let the deleted
/// job go at once, so the new pipeline cut `[0, 1500)` and `[1500, 3000)` over the range the
/// old builder then wrote, `[1000, 2000)`: 1,000 offsets in two blocks. A job a builder
/// holds now keeps its range until the lease is over; then the output read finds its block.
#[tokio::test]
async fn a_pipeline_recreated_while_a_builder_still_writes_its_job_writes_each_offset_once() {
    let s = Scenario::new("bio-held")
        .records(3000)
        .value_size(16)
        .jobs(json!({"maxRecords": 1000}))
        .operator()
        .await;
    let jobs = s.wait_jobs(3).await;
    let held = jobs
        .into_iter()
        .find(|j| j.spec.start_offset == 1000)
        .expect("the job [1000, 2000)");
    // The old pipeline's builder claims [1000, 2000) and keeps its lease (6 s) renewed.
    let ghost = FakeBuilder::new(&s.tb, &s.ns, "ghost");
    let claimed = ghost.claim(&held).await.expect("claim");
    let renewing = Arc::new(AtomicBool::new(true));
    let renewer = {
        let (renewing, ghost) = (renewing.clone(), FakeBuilder::new(&s.tb, &s.ns, "ghost"));
        tokio::spawn(async move {
            let mut job = claimed;
            while renewing.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(renewed) = ghost
                    .report(&job, job.attempt(), "Running", json!({}))
                    .await
                {
                    job = renewed;
                }
            }
        })
    };

    Api::<BlockPipeline>::namespaced(s.tb.client.clone(), &s.ns)
        .delete("p", &DeleteParams::background())
        .await
        .expect("delete pipeline");
    wait_for(
        "the other jobs garbage-collected",
        Duration::from_secs(60),
        || async {
            let left = s.jobs().await;
            left.iter()
                .all(|j| j.metadata.uid == held.metadata.uid)
                .then_some(())
        },
    )
    .await;
    let mut again = s.bp.clone();
    again.metadata.uid = None;
    again.metadata.resource_version = None;
    again.spec.jobs.max_records = 1500;
    s.apply(&again).await;

    // While the old builder holds its job, the new pipeline plans around its range.
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        for j in s.jobs().await {
            let (start, end) = (j.spec.start_offset, j.spec.end_offset);
            if j.metadata.uid != held.metadata.uid {
                assert!(
                    end <= 1000 || start >= 2000,
                    "[{start}, {end}) cut over [1000, 2000)"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // It writes its block, and its lease runs out.
    let settings = BuildSettings {
        reader: ReaderConfig::new(held.spec.bootstrap_servers.clone()),
        upload: UploadSettings::default(),
        stores: OpenStores::default(),
    };
    build_block(&held.spec, &settings, Arc::new(AtomicBool::new(false)))
        .await
        .expect("the old builder's block");
    renewing.store(false, Ordering::Relaxed);
    renewer.await.unwrap();

    let _builders = s.spawn_builders(1);
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
}

/// Waits until the jobs starting at `starts` have all succeeded.
async fn wait_succeeded(s: &Run, starts: &[i64]) {
    wait_for(
        &format!("jobs at {starts:?} Succeeded"),
        Duration::from_secs(120),
        || async {
            let jobs = s.jobs().await;
            starts
                .iter()
                .all(|start| {
                    jobs.iter()
                        .any(|j| j.spec.start_offset == *start && j.phase() == JobPhase::Succeeded)
                })
                .then_some(())
        },
    )
    .await;
}

/// Issue 11, scenario 3: the user deletes the tail job after it wrote its block (the commit
/// held behind a failed job) and after more records arrived. Planning again from the group
/// offset alone cut `[1000, 2000)` over the block `[1000, 1300)`: offsets 1000–1299 in two
/// blocks. The operator reads the output and plans the block's range again, as it was.
#[tokio::test]
async fn a_deleted_tail_job_whose_block_was_written_comes_back_with_its_range() {
    let mut s = Scenario::new("bio-tail")
        .jobs(json!({"maxRecords": 1000, "maxAge": "1s", "backoffLimit": 1}))
        .unapplied()
        .await;
    let (tb, topic) = (s.tb.clone(), s.topic.clone());
    // Offset 500 is over the record limit: job [0, 1000) fails and holds the commit at 0.
    run_into_a_big_record(&mut s, 500, 799).await;
    let bp = |limit| with_record_limit(&s.bp, limit);
    wait_succeeded(&s, &[1000]).await;
    let tail = s
        .jobs()
        .await
        .into_iter()
        .find(|j| j.spec.start_offset == 1000);
    assert_eq!(
        tail.map(|j| j.spec.end_offset),
        Some(1300),
        "a tail cut by maxAge"
    );

    // Suspended, so that nothing is planned between the new records and the deletion.
    let mut suspended = bp(1000);
    suspended.spec.suspend = true;
    s.apply(&suspended).await;
    wait_observed(&s).await;
    let more = produce_data(&tb, fixed(&topic, 1, 2000, 100, 4)).await;
    s.produced = merge(std::mem::take(&mut s.produced), more);
    let jobs: Api<BlockJob> = Api::namespaced(tb.client.clone(), &s.ns);
    jobs.delete(&job_name("p", 0, 1000), &DeleteParams::default())
        .await
        .expect("delete the tail job");
    s.apply(&bp(1000)).await;

    let mut ranges = wait_for(
        "jobs up to the new high watermark Succeeded",
        Duration::from_secs(120),
        || async {
            let jobs = s.jobs().await;
            let built = jobs.iter().filter(|j| j.spec.start_offset >= 1000);
            let all_done = built.clone().all(|j| j.phase() == JobPhase::Succeeded);
            let end = built.map(|j| j.spec.end_offset).max();
            (all_done && end == Some(3300)).then(|| {
                jobs.iter()
                    .map(|j| (j.spec.start_offset, j.spec.end_offset))
                    .collect::<Vec<_>>()
            })
        },
    )
    .await;
    ranges.sort_unstable();
    assert_eq!(
        ranges,
        [(0, 1000), (1000, 1300), (1300, 2300), (2300, 3300)]
    );

    s.apply(&bp(8192)).await;
    wait_observed(&s).await;
    assert_eq!(delete_failed(&tb, &s.ns).await, vec![job_name("p", 0, 0)]);
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
}

/// Issue 11, scenario 3: a pipeline deleted while its commit was held, re-created over the
/// same output with another `maxRecords`. From the group offset alone it cut `[0, 1500)` and
/// `[1500, 3000)` over the blocks `[1000, 2000)` and `[2000, 3000)`. The operator reads the
/// output first: the blocks come back as jobs of their own ranges.
#[tokio::test]
async fn a_pipeline_recreated_over_its_output_with_another_max_records_writes_each_offset_once() {
    let mut s = Scenario::new("bio-again")
        .jobs(json!({"maxRecords": 1000, "backoffLimit": 1}))
        .unapplied()
        .await;
    let tb = s.tb.clone();
    run_into_a_big_record(&mut s, 500, 2499).await;
    wait_succeeded(&s, &[1000, 2000]).await;

    Api::<BlockPipeline>::namespaced(tb.client.clone(), &s.ns)
        .delete("p", &DeleteParams::background())
        .await
        .expect("delete pipeline");
    wait_for(
        "the jobs garbage-collected",
        Duration::from_secs(60),
        || async { s.jobs().await.is_empty().then_some(()) },
    )
    .await;
    assert_eq!(s.committed().await, BTreeMap::from([(0, 0)]));

    let mut again = with_record_limit(&s.bp, 8192);
    again.spec.jobs.max_records = 1500;
    s.apply(&again).await;
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
}
