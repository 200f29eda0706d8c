//! Exactly-once off the happy path (docs/reliability.md, "Beyond the happy path"): the blocks
//! in the output are the evidence, and nothing a late or stale writer does may change them.

use std::collections::BTreeMap;
use std::time::Duration;

use blocksmith_crds::domain::replacement_name;
use blocksmith_crds::pipeline::TopicIdentity;
use blocksmith_crds::{BlockJob, BlockPipeline, JobPhase};
use blocksmith_e2e::datagen::{DataSpec, ValueSizes};
use blocksmith_e2e::scenario::*;
use blocksmith_operator::jobs::{KafkaIds, desired_job, job_spec};
use blocksmith_operator::planner::PlannedJob;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

/// The established connections to `port`, as `ss` prints them (receive queue first).
fn established_at(port: u16) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn connections_at(port: u16) -> usize {
    established_at(port).len()
}

/// Bytes the S3 server on `port` has been sent but not read: a frozen server's pending
/// requests.
fn unread_bytes_at(port: u16) -> u64 {
    established_at(port)
        .iter()
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
        // The operator reads the output through the front end that is never frozen.
        .output_on(&other, "stale")
        .jobs(json!({"maxRecords": 200, "leaseDurationSeconds": 4}))
        .operator()
        .await;
    // Slow reads (seconds a job) leave time to freeze the object store between a builder's
    // check for an existing manifest and its upload.
    s.broker().set_round_trip_time(Duration::from_millis(500));
    // One job slot: the choreography below freezes one upload in flight, found by the
    // bytes waiting at the front end's port.
    let point = held_up.point();
    let stale = s.spawn_builder_with("stale", move |cmd| {
        point(cmd);
        cmd.env("BLOCKSMITH_CONCURRENT_JOBS", "1");
    });
    let job = wait_for_a_job_on(&s.tb, &s.ns, &s.name, "stale").await;
    // Its check for an existing manifest is its first request to the store, on a connection
    // it keeps for the upload; the read that follows takes seconds.
    wait_for(
        "the stale builder's manifest check",
        Duration::from_secs(30),
        || async { (connections_at(held_up.port) > 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let _fresh = s.spawn_builder_with("fresh", other.point());
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

/// The group's committed offset past the end of the log (the topic deleted and re-created, or
/// its log truncated by an unclean leader election) is reported and waited on, not taken as
/// caught up; nothing of the new log is skipped even once it grows past the old commit; and
/// resetting the group's offset resumes writing from there.
#[tokio::test]
async fn a_commit_past_the_end_of_the_log_waits_for_a_reset_and_skips_nothing() {
    let mut s = Scenario::new("eo-beyond")
        .records(1000)
        .value_size(16)
        .jobs(json!({"maxRecords": 500}))
        .unapplied()
        .await;
    // The group's offset in the old log: 5000, where the new log has 1000 records.
    s.set_committed(BTreeMap::from([(0, 5000)])).await;
    let bp = s.bp.clone();
    s.apply(&bp).await;
    let _op = s.spawn_operator("op");
    let _builders = s.spawn_builders(1);
    let stuck = s.wait(Cond::ready_false("CommittedBeyondLog")).await;
    assert_says(
        &stuck.message,
        &[
            "partition 0",
            "committed offset 5000 is past the end of the log (high watermark 1000)",
            "re-created",
            "spec.output.url",
            "reset the group's offset",
        ],
    );
    s.wait_event("CommittedBeyondLog").await;

    // The new log grows past the old commit: still nothing planned, nothing skipped.
    let more = produce_data(
        &s.tb,
        DataSpec {
            seed: 2,
            value_sizes: ValueSizes::Fixed(16),
            ..DataSpec::new(&s.topic, 1, 5000)
        },
    )
    .await;
    let grown = wait_for(
        "the status showing the grown log",
        Duration::from_secs(30),
        || async {
            let p = s.get().await.status?.partitions.into_iter().next()?;
            (p.high_watermark == 6000).then_some(p)
        },
    )
    .await;
    assert!(grown.committed_beyond_log_since.is_some(), "{grown:?}");
    s.wait(Cond::ready_false("CommittedBeyondLog")).await;
    assert!(s.jobs().await.is_empty(), "nothing planned");
    assert_eq!(s.committed().await, BTreeMap::from([(0, 5000)]));

    // The user resets the group's offset: every record from there is written once.
    s.set_committed(BTreeMap::from([(0, 0)])).await;
    s.produced.records.extend(more.records);
    s.produced
        .partitions
        .insert(0, (6000, more.partitions[&0].1));
    let committed = s.wait_all_committed(Duration::from_secs(180)).await;
    s.wait(Cond::reconciled()).await;
    audit_exact(&s.tb, &s.blocks, &s.produced, &committed);
}

/// Issue 11, scenario 3, second half: a job deleted while its builder still works on it,
/// after `maxRecords` changed. Cut again by the new `maxRecords` (`[0, 600)`, `[600, 1000)`),
/// its range would overlap the block its builder may still write, and reading the output
/// first cannot see a block not written yet. The operator's finalizer keeps the deleted job
/// until a job of exactly its range replaces it; the builder, seeing its job deleted, stops;
/// the range is written once.
#[tokio::test]
async fn a_job_deleted_while_its_builder_works_comes_back_with_exactly_its_range() {
    let s = Scenario::new("eo-keep")
        .private_broker()
        .records(2000)
        .value_size(200)
        .jobs(json!({"maxRecords": 1000, "leaseDurationSeconds": 30}))
        .operator()
        .await;
    s.broker().set_round_trip_time(Duration::from_millis(300));
    let victim = s.spawn_builder("victim");
    let held = freeze_in_a_job(&s.tb, &s.ns, &s.name, &victim, "victim").await;
    let (start, end) = (held.spec.start_offset, held.spec.end_offset);

    let mut smaller = s.bp.clone();
    smaller.spec.jobs.max_records = 600;
    s.apply(&smaller).await;
    wait_for("the new spec observed", Duration::from_secs(30), || async {
        let bp = s.get().await;
        (bp.status?.observed_generation == bp.metadata.generation).then_some(())
    })
    .await;
    let api: Api<BlockJob> = Api::namespaced(s.tb.client.clone(), &s.ns);
    api.delete(&held.name_any(), &DeleteParams::default())
        .await
        .expect("delete the running job");

    let replacement = replacement_name(&held.name_any());
    let back = wait_for(
        "the deleted job back as its replacement",
        Duration::from_secs(60),
        || async {
            let jobs = s.jobs().await;
            let gone = !jobs.iter().any(|j| j.name_any() == held.name_any());
            let back = jobs.into_iter().find(|j| j.name_any() == replacement);
            back.filter(|_| gone)
        },
    )
    .await;
    assert_eq!((back.spec.start_offset, back.spec.end_offset), (start, end));
    assert_eq!(back.attempt(), 1, "a deleted job is the user's retry");
    let overlapping: Vec<(i64, i64)> = s
        .jobs()
        .await
        .iter()
        .map(|j| (j.spec.start_offset, j.spec.end_offset))
        .filter(|&(a, b)| a < end && start < b && (a, b) != (start, end))
        .collect();
    assert!(
        overlapping.is_empty(),
        "ranges cut over the deleted job's: {overlapping:?}"
    );

    // The deleted job's builder goes on, finds its job deleted and stops; another builds
    // the replacement.
    s.broker().set_round_trip_time(Duration::ZERO);
    victim.signal("CONT");
    let _rescuer = s.spawn_builder("rescuer");
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
}

/// Issue 11, scenario 4: a topic deleted and created again under the pipeline's topic name
/// has a new topic id (KIP-516), and its offsets count other records. The librdkafka mock
/// cluster cannot delete a topic, so the test gives what the pipeline recorded (its status's
/// topic, a job planned before) an id that is not the topic's: what the operator and a
/// builder see once the topic they wrote was replaced, however far its new log has grown.
#[tokio::test]
async fn a_topic_deleted_and_created_again_halts_the_pipeline_until_it_moves_to_a_new_output() {
    const OLD_ID: &str = "AAAAAAAAAAAAAAAAAAAAAQ";
    let mut s = Scenario::new("eo-recreated")
        .records(1000)
        .value_size(16)
        .jobs(json!({"maxRecords": 500, "backoffLimit": 1}))
        .operator()
        .builders(1)
        .await;
    s.wait_committed_then_audit(Duration::from_secs(120)).await;
    // The pipeline records the topic's id, as the broker reports it, with its output; its
    // jobs carry it too.
    let live = blocksmith_e2e::kafka::topic_id(&s.tb.kafka_bootstrap, &s.topic);
    let old_output = s.bp.spec.output.url.clone();
    let recorded = wait_for("the topic recorded", Duration::from_secs(30), || async {
        s.get().await.status?.topic
    })
    .await;
    assert_eq!(
        recorded,
        TopicIdentity {
            name: s.topic.clone(),
            id: live.clone(),
            output_url: old_output.clone()
        }
    );
    let done = s.jobs().await;
    assert!(!done.is_empty(), "the finished jobs are kept as history");
    for job in &done {
        assert_eq!(job.spec.kafka_topic_id.as_deref(), Some(live.as_str()));
    }
    // In a real re-creation these jobs would be of the old id and would have to go (the
    // message asks for it): committed already, they go without replacement.
    let job_api: Api<BlockJob> = Api::namespaced(s.tb.client.clone(), &s.ns);
    for job in &done {
        job_api
            .delete(&job.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for("the history gone", Duration::from_secs(30), || async {
        s.jobs().await.is_empty().then_some(())
    })
    .await;

    // The topic is replaced: the blocks and commits so far are of topic OLD_ID, and the
    // new log grows past the old commit. The operator is stopped meanwhile: it writes the
    // whole status, and a reconcile in flight (the history's deletion starts some) would
    // write the live id back over the edit.
    let mut operator = s.operator.take().expect("the scenario's operator");
    operator.proc.terminate(Duration::from_secs(10));
    let pipelines: Api<BlockPipeline> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let old_topic = json!({"status": {"topic": {"id": OLD_ID}}});
    pipelines
        .patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&old_topic))
        .await
        .unwrap();
    s.operator = Some(s.spawn_operator("op"));
    let more = produce_data(
        &s.tb,
        DataSpec {
            seed: 2,
            value_sizes: ValueSizes::Fixed(16),
            ..DataSpec::new(&s.topic, 1, 1000)
        },
    )
    .await;
    let stuck = s.wait(Cond::ready_false("TopicRecreated")).await;
    assert_says(
        &stuck.message,
        &[
            "was deleted and created again",
            &format!("its id is now {live:?}"),
            &format!("of topic id {OLD_ID:?}"),
            "1) reset the consumer group's offsets",
            "then set spec.output.url to a new location",
        ],
    );
    s.wait_event("TopicRecreated").await;

    // A job planned before the topic was replaced: its builder refuses the new topic's
    // records.
    let bp = s.get().await;
    let planned = PlannedJob {
        partition: 0,
        start: 1000,
        end: 1500,
    };
    let ids = KafkaIds {
        cluster: None,
        topic: Some(OLD_ID.into()),
    };
    let old_job = desired_job(&bp, job_spec(&bp, &planned, &ids), JobPhase::Pending);
    job_api.create(&Default::default(), &old_job).await.unwrap();
    let refused = wait_for(
        "the old topic's job failed",
        Duration::from_secs(60),
        || async {
            s.job(&old_job.metadata.name)
                .await
                .filter(|j| j.phase() == JobPhase::Failed)
        },
    )
    .await;
    assert_says(
        &job_message(&refused),
        &["the topic was deleted and created again", &live, OLD_ID],
    );
    // Once the operator's cache has the job, the message asks for its deletion too.
    wait_for(
        "the old job in the message",
        Duration::from_secs(30),
        || async {
            let ready = s.condition("Ready").await?;
            (ready.reason == "TopicRecreated"
                && ready
                    .message
                    .contains("2) delete the 1 job(s) of the old topic"))
            .then_some(())
        },
    )
    .await;
    // Nothing planned, nothing committed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let planned_after: Vec<(i64, i64)> = s
        .jobs()
        .await
        .iter()
        .filter(|j| j.metadata.name != old_job.metadata.name && j.spec.end_offset > 1000)
        .map(|j| (j.spec.start_offset, j.spec.end_offset))
        .collect();
    assert!(planned_after.is_empty(), "{planned_after:?}");
    assert_eq!(s.committed().await, BTreeMap::from([(0, 1000)]));

    // The user does as told: offsets reset, a new output, the old job deleted. Every record
    // of the "new" topic is written there once.
    s.set_committed(BTreeMap::from([(0, 0)])).await;
    let new_blocks = blocks_dir(&s.tb, "eo-recreated-new");
    let mut moved = bp.clone();
    moved.spec.output.url = file_url(&new_blocks);
    moved.status = None;
    moved.metadata.managed_fields = None;
    moved.metadata.resource_version = None;
    s.apply(&moved).await;
    job_api
        .delete(
            old_job.metadata.name.as_ref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    s.produced.records.extend(more.records);
    s.produced
        .partitions
        .insert(0, (2000, more.partitions[&0].1));
    s.wait_committed_then_audit_in(&new_blocks, Duration::from_secs(180))
        .await;
    s.wait(Cond::reconciled()).await;
    let adopted = s.get().await.status.and_then(|st| st.topic);
    assert_eq!(
        adopted,
        Some(TopicIdentity {
            name: s.topic.clone(),
            id: live,
            output_url: file_url(&new_blocks)
        })
    );
}
