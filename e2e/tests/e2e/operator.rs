//! The operator against the real testbed, with the tests acting as builders through the API
//! (server-side apply on `blockjobs/status`, the builders' exact contract).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blocksmith_crds::domain::{job_name, replacement_name};
use blocksmith_crds::{BlockJob, JobPhase};
use blocksmith_e2e::datagen::{DataSpec, ValueSizes};
use blocksmith_e2e::forwarder::CuttableApiserver;
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::support::StaleStore;

/// Pipeline `p` (unless renamed) over `records` records of 16 bytes, and an operator.
fn scenario(test: &str, partitions: i32, records: u64) -> Scenario {
    Scenario::new(test)
        .partitions(partitions)
        .records(records)
        .value_size(16)
        .operator()
}

#[tokio::test]
async fn plans_exactly_the_expected_jobs_and_no_more() {
    let s = scenario("op-plan", 4, 40_000)
        .named("orders")
        .jobs(json!({"maxAge": "1h"}))
        .await;

    let planned = s.wait_jobs(40).await;
    let mut expected = Vec::new();
    for p in 0..4 {
        for start in (0..10_000).step_by(1000) {
            expected.push((job_name("orders", p, start), p, start, start + 1000));
        }
    }
    let got: Vec<_> = planned
        .iter()
        .map(|j| {
            (
                j.metadata.name.clone().unwrap(),
                j.spec.partition,
                j.spec.start_offset,
                j.spec.end_offset,
            )
        })
        .collect();
    assert_eq!(got, expected);

    // Several more reconciles (1 s poll): nothing new, nothing re-created.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = s.jobs().await;
    let uids = |js: &[BlockJob]| {
        js.iter()
            .map(|j| j.metadata.uid.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(uids(&later), uids(&planned));
    let bp = s.get().await;
    assert_eq!(condition(&bp, "Ready").unwrap().status, "True");
    let status = bp.status.expect("status");
    assert_eq!(status.queue_depth, 40);
    assert_eq!(status.lag, 40_000);
}

#[tokio::test]
async fn commits_move_only_over_contiguous_succeeded_prefixes() {
    let s = scenario("op-commit", 2, 10_000).await;
    let mut planned = s.wait_jobs(10).await;

    planned.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let builder = FakeBuilder::new(&s.tb, &s.ns, "fake-builder");
    let mut done: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let mut last = BTreeMap::from([(0, 0i64), (1, 0i64)]);
    for job in &planned {
        builder
            .claim_and_succeed(job)
            .await
            .expect("claim, succeed");
        done.entry(job.spec.partition)
            .or_default()
            .push(job.spec.start_offset);
        // The contiguous prefix from 0 of this partition's finished jobs.
        let starts = &done[&job.spec.partition];
        let mut prefix = 0;
        while starts.contains(&prefix) {
            prefix += 1000;
        }
        let expect = (job.spec.partition, prefix);
        let committed = wait_for(
            &format!("commit {expect:?}"),
            Duration::from_secs(30),
            || async {
                let c = s.committed().await;
                (c.get(&expect.0) == Some(&expect.1)).then_some(c)
            },
        )
        .await;
        for (p, o) in &committed {
            assert!(
                *o >= last[p],
                "partition {p} moved backwards: {} -> {o}",
                last[p]
            );
            assert_eq!(o % 1000, 0, "commits land on job boundaries");
            last.insert(*p, *o);
        }
    }
    assert_eq!(last, BTreeMap::from([(0, 5000), (1, 5000)]));
}

#[tokio::test]
async fn a_success_reported_without_a_block_commits_nothing_and_the_job_is_built_again() {
    // Anything that may patch `blockjobs/status` reports job [0, 1000) Succeeded without
    // writing its block; the next job is built properly.
    let s = scenario("op-forged", 1, 2000).await;
    let planned = s.wait_jobs(2).await;
    let (first, second) = (&planned[0], &planned[1]);
    assert_eq!(first.spec.start_offset, 0);
    let forger = FakeBuilder::new(&s.tb, &s.ns, "forger");
    let claimed = forger.claim(first).await.unwrap();
    forger.report_success(&claimed, 1).await.unwrap();
    let builder = FakeBuilder::new(&s.tb, &s.ns, "builder");
    builder.claim_and_succeed(second).await.unwrap();
    // The operator finds no manifest for [0, 1000): the job goes back to Pending, attempt 2.
    let back = wait_for(
        "the forged job pending again",
        Duration::from_secs(30),
        || async {
            let j = s.job(&first.metadata.name).await?;
            (j.phase() == JobPhase::Pending && j.attempt() == 2).then_some(j)
        },
    )
    .await;
    let message = back.status.as_ref().and_then(|st| st.message.clone());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("no manifest at") && m.contains("building it again")),
        "{message:?}"
    );
    assert_eq!(
        s.committed().await.get(&0).copied().unwrap_or(0),
        0,
        "nothing committed over the forged job"
    );
    // Built for real: the commit moves over both. (The operator may still be writing the
    // job, as a builder's claim can find: then it claims what it reads next.)
    let mut back = back;
    let claimed = loop {
        match builder.claim(&back).await {
            Ok(claimed) => break claimed,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                back = s.job(&back.metadata.name).await.unwrap();
            }
            Err(e) => panic!("claim: {e}"),
        }
    };
    builder.succeed(&claimed, 2).await.unwrap();
    wait_for(
        "the commit over both jobs",
        Duration::from_secs(30),
        || async { (s.committed().await.get(&0) == Some(&2000)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn an_expired_lease_returns_the_job_and_fences_the_old_holder() {
    let s = scenario("op-lease", 1, 1000)
        .jobs(json!({"leaseDurationSeconds": 3}))
        .await;
    let job = s.wait_jobs(1).await.remove(0);
    let stale = FakeBuilder::new(&s.tb, &s.ns, "stale-builder");
    let claimed = stale.claim(&job).await.expect("claim");
    assert_eq!(claimed.phase(), JobPhase::Running);

    // Never renewed: after 3 s the operator takes it back.
    let reset = wait_for(
        "the job back in Pending",
        Duration::from_secs(30),
        || async {
            let j = s.jobs().await.remove(0);
            (j.phase() == JobPhase::Pending && j.attempt() == 2).then_some(j)
        },
    )
    .await;
    let st = reset.status.unwrap();
    assert!(st.not_before.is_some(), "backoff before the retry");
    assert_eq!(st.lease.unwrap().holder, "");

    let err = stale
        .succeed(&claimed, 1)
        .await
        .expect_err("a stale holder's report is rejected");
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 409),
        "{err}"
    );
    let j = s.jobs().await.remove(0);
    assert_eq!(j.phase(), JobPhase::Pending);
}

#[tokio::test]
async fn a_job_failing_past_its_backoff_limit_degrades_and_holds_the_commit_until_deleted() {
    let s = scenario("op-fail", 1, 3000)
        .jobs(json!({"backoffLimit": 2}))
        .await;
    let planned = s.wait_jobs(3).await;
    let b = FakeBuilder::new(&s.tb, &s.ns, "b");

    // Jobs 0 and 2 succeed; job 1 fails twice.
    for j in [&planned[0], &planned[2]] {
        b.claim_and_succeed(j).await.unwrap();
    }
    let bad = &planned[1];
    let c = b.claim(bad).await.unwrap();
    b.report(&c, 1, "Failed", json!({"message": "boom 1"}))
        .await
        .unwrap();
    let retry = wait_for("retry as attempt 2", Duration::from_secs(30), || async {
        let j = s.job(&bad.metadata.name).await?;
        (j.phase() == JobPhase::Pending && j.attempt() == 2).then_some(j)
    })
    .await;
    let c = b.claim(&retry).await.unwrap();
    b.report(&c, 2, "Failed", json!({"message": "boom 2"}))
        .await
        .unwrap();

    let degraded = Cond::new("Degraded").status("True").reason("JobFailed");
    let bp = wait_pipeline(&s.tb, &s.ns, "p", &degraded).await;
    let message = condition(&bp, "Degraded").unwrap().message;
    assert!(
        message.contains("boom 2") && message.contains("held at offset 1000"),
        "{message}"
    );
    assert_eq!(bp.status.as_ref().unwrap().failed_jobs, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = s.committed().await;
    assert_eq!(
        committed.get(&0),
        Some(&1000),
        "commit held at the failed job"
    );
    let j = s.job(&bad.metadata.name).await.unwrap();
    assert_eq!(j.phase(), JobPhase::Failed, "stays Failed");

    // The user's retry: delete it; it comes back fresh with the same range, as its
    // replacement (the operator's finalizer keeps the deleted job until it exists).
    Api::<BlockJob>::namespaced(s.tb.client.clone(), &s.ns)
        .delete(
            bad.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let replacement = Some(replacement_name(&bad.name_any()));
    let fresh = wait_for("the job re-created", Duration::from_secs(30), || async {
        s.job(&replacement).await
    })
    .await;
    assert_eq!(
        (fresh.spec.start_offset, fresh.spec.end_offset),
        (1000, 2000)
    );
    assert_eq!(fresh.attempt(), 1);
    b.claim_and_succeed(&fresh).await.unwrap();
    wait_for(
        "commit past the retried job",
        Duration::from_secs(30),
        || async { (s.committed().await.get(&0) == Some(&3000)).then_some(()) },
    )
    .await;
    s.wait(Cond::new("Degraded").status("False")).await;
}

#[tokio::test]
async fn a_restarted_operator_neither_replans_nor_regresses() {
    let s = Scenario::new("op-restart")
        .partitions(2)
        .records(6000)
        .value_size(16)
        .await;
    let mut op = s.spawn_operator("op-1");
    let planned = s.wait_jobs(6).await;
    let b = FakeBuilder::new(&s.tb, &s.ns, "b");
    for j in &planned[..2] {
        b.claim_and_succeed(j).await.unwrap();
    }
    wait_for("first commit", Duration::from_secs(30), || async {
        (s.committed().await.get(&0) == Some(&2000)).then_some(())
    })
    .await;
    op.proc.kill();
    // Work goes on while the operator is down.
    for j in &planned[2..4] {
        b.claim_and_succeed(j).await.unwrap();
    }
    let before = s.committed().await;
    let _op2 = s.spawn_operator("op-2");
    wait_for("commit after restart", Duration::from_secs(40), || async {
        (s.committed().await.get(&0) == Some(&3000)).then_some(())
    })
    .await;
    let after = s.committed().await;
    for (p, o) in &before {
        assert!(
            after[p] >= *o,
            "partition {p} regressed {o} -> {}",
            after[p]
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = s.jobs().await;
    // Succeeded, committed jobs may be cleaned up later; every remaining job is one planned
    // before the restart, with the same uid.
    for j in &now {
        let orig = same_job(&planned, j).expect("no new job");
        assert_eq!(
            orig.metadata.uid, j.metadata.uid,
            "{:?} re-created",
            j.metadata.name
        );
    }
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_fail_over() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("op-leader").await;
    let mut a = spawn_operator(&tb, &ns, "op-a");
    let mut b = spawn_operator(&tb, &ns, "op-b");
    let leader = wait_for("a leader", Duration::from_secs(30), || async {
        let (la, lb) = (
            a.proc.log_text().contains("became leader"),
            b.proc.log_text().contains("became leader"),
        );
        assert!(!(la && lb), "two leaders");
        match (la, lb) {
            (true, false) => Some('a'),
            (false, true) => Some('b'),
            _ => None,
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (dead, survivor) = if leader == 'a' {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        !survivor.proc.log_text().contains("became leader"),
        "still one leader"
    );
    // What BlocksmithNoLeader sums: 1 from the leader, 0 from the standby.
    assert_eq!(sample(dead.metrics_port, "blocksmith_leader"), Some(1.0));
    assert_eq!(
        sample(survivor.metrics_port, "blocksmith_leader"),
        Some(0.0)
    );
    dead.proc.kill();
    let started = std::time::Instant::now();
    wait_for("failover", Duration::from_secs(30), || async {
        survivor
            .proc
            .log_text()
            .contains("became leader")
            .then_some(())
    })
    .await;
    // Lease is 6 s; the survivor retries every 2 s.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        sample(survivor.metrics_port, "blocksmith_leader"),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_leader_stopped_by_sigterm_hands_the_lease_over_at_once() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("op-release").await;
    let mut a = spawn_operator(&tb, &ns, "op-a");
    wait_for("op-a leads", Duration::from_secs(30), || async {
        a.proc.log_text().contains("became leader").then_some(())
    })
    .await;
    let b = spawn_operator(&tb, &ns, "op-b");
    wait_for("op-b on standby", Duration::from_secs(30), || async {
        b.proc
            .log_text()
            .contains("waiting for leadership")
            .then_some(())
    })
    .await;
    let stopped = Instant::now();
    let exit = a.proc.terminate(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|e| e.success()),
        "op-a exits cleanly: {exit:?}"
    );
    wait_for("op-b leads", Duration::from_secs(30), || async {
        b.proc.log_text().contains("became leader").then_some(())
    })
    .await;
    // Without the release op-b waits out the 6 s lease; with it, one attempt (every 1 s).
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(4), "handover took {took:?}");
    assert!(a.proc.log_text().contains("released the leader lease"));
}

#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_stops_acting_before_another_can_lead() {
    // A broker of its own, slowed to a 300 ms round trip, so that jobs and commits are
    // under way when the leader is cut off.
    let mut s = Scenario::new("op-cut")
        .private_broker()
        .partitions(2)
        .records(20_000)
        .value_size(16)
        .pipeline(|bp| bp.spec.jobs.max_records = 1000)
        .builders(2)
        .await;
    s.broker().set_round_trip_time(Duration::from_millis(300));
    // op-a reaches the API server only through a forwarder the test cuts; op-b directly.
    let (apiserver, via_forwarder) = CuttableApiserver::start(&s.tb, "op-a");
    let mut a = spawn_operator(&via_forwarder, &s.ns, "op-a");
    wait_for("op-a leads", Duration::from_secs(30), || async {
        a.proc.log_text().contains("became leader").then_some(())
    })
    .await;
    let b = s.spawn_operator("op-b");
    // Every reading of the group's offsets, to check they never move back.
    let mut commits = vec![];
    let started = Instant::now();
    while !commits
        .last()
        .is_some_and(|c: &BTreeMap<i32, i64>| c.values().any(|o| *o > 0))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no first commit"
        );
        commits.push(s.committed().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    apiserver.cut();
    let cut_at = Instant::now();
    let (mut a_stopped, mut b_leads) = (None, None);
    while a_stopped.is_none() || b_leads.is_none() {
        assert!(cut_at.elapsed() < Duration::from_secs(60), "no handover");
        if a_stopped.is_none() && !a.proc.is_running() {
            a_stopped = Some(cut_at.elapsed());
        }
        if b_leads.is_none() && b.proc.log_text().contains("became leader") {
            b_leads = Some(cut_at.elapsed());
        }
        commits.push(s.committed().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (a_stopped, b_leads) = (a_stopped.unwrap(), b_leads.unwrap());
    println!("after the cut: op-a stopped at {a_stopped:?}, op-b led at {b_leads:?}");
    // The lease is 6 s: op-a acts for at most 4 s after its last renewal (one every 1 s)
    // and op-b takes over only once it has seen the lease unchanged for 6 s.
    assert!(
        a_stopped < b_leads,
        "op-a stopped at {a_stopped:?}, after op-b led at {b_leads:?}"
    );
    assert!(a_stopped <= Duration::from_secs(5), "{a_stopped:?}");
    assert!(
        a.proc.log_text().contains("lost leadership; exiting"),
        "{}",
        a.proc.log_text()
    );

    s.broker().set_round_trip_time(Duration::ZERO);
    // More records: op-b plans and commits them.
    let more = produce_data(
        &s.tb,
        DataSpec {
            seed: 2,
            value_sizes: ValueSizes::Fixed(16),
            ..DataSpec::new(&s.topic, 2, 20_000)
        },
    )
    .await;
    s.produced.records.extend(more.records);
    s.produced.partitions = more.partitions;
    let committed = s.wait_committed_then_audit(Duration::from_secs(120)).await;
    commits.push(committed);
    for pair in commits.windows(2) {
        for (p, before) in &pair[0] {
            let after = pair[1].get(p).copied().unwrap_or(-1);
            assert!(
                after >= *before,
                "partition {p}'s commit moved back from {before} to {after}"
            );
        }
    }
}

// Invalid specs, missing topics and partitions, retention and credentials: see
// `bad_input_kafka.rs`.

#[tokio::test]
async fn unreachable_kafka_degrades_and_suspend_stops_planning() {
    // Suspended: offsets are read, nothing is planned; resumed: jobs appear.
    let s = scenario("op-suspend", 1, 2000)
        .pipeline(|bp| bp.spec.suspend = true)
        .unapplied()
        .await;

    // Nothing listens on port 1.
    let url = file_url(&s.blocks);
    s.apply(&pipeline("down", "t", "127.0.0.1:1", &url, json!({})))
        .await;
    let degraded = Cond::new("Degraded")
        .status("True")
        .within(Duration::from_secs(60));
    let c = wait_condition(&s.tb, &s.ns, "down", &degraded).await;
    assert_eq!(c.reason, "KafkaUnavailable", "{}", c.message);
    // Not just "timed out": the connection error says where and why.
    assert!(
        c.message.contains("127.0.0.1:1") && c.message.contains("Connection refused"),
        "{}",
        c.message
    );

    let mut bp = s.bp.clone();
    s.apply(&bp).await;
    s.wait(Cond::new("Suspended").status("True")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.jobs().await.is_empty(), "no jobs while suspended");
    assert_eq!(s.get().await.status.unwrap().lag, 2000);
    bp.spec.suspend = false;
    s.apply(&bp).await;
    s.wait_jobs(2).await;
    wait_event(&s.tb, &s.ns, "down", "KafkaUnavailable").await;
    s.wait_event("Resumed").await;
}

/// The operator reads jobs from a watch cache that can lag the API server. Its writes must be
/// safe anyway: a range planned again from a stale cache never changes an existing job, and a
/// label write decided from an old version (or a deleted job) conflicts instead of landing.
/// Exercised here with the operator's own `JobStore` and an empty cache, as stale as it gets.
#[tokio::test]
async fn writes_from_a_stale_job_cache_never_change_or_revive_a_job() {
    use blocksmith_operator::jobs::desired_job;

    let cache = StaleStore::new("stale-cache").await;
    let (store, bp, api) = (&cache.store, &cache.bp, &cache.api);

    let created = store
        .create(&cache.planned(100))
        .await
        .unwrap()
        .expect("created");
    // Re-planned from a cache that has not seen it: same name, a longer range.
    assert!(store.create(&cache.planned(150)).await.unwrap().is_none());
    let name = created.metadata.name.clone().unwrap();
    assert_eq!(api.get(&name).await.unwrap().spec.end_offset, 100);

    // A label write from the current version lands; one from the old version conflicts.
    let running = desired_job(bp, created.spec.clone(), JobPhase::Running);
    let relabelled = store.relabel(&created, &running).await.unwrap();
    let succeeded = desired_job(bp, created.spec.clone(), JobPhase::Succeeded);
    match store.relabel(&created, &succeeded).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409, "{e:?}"),
        other => panic!("a write from a stale version must conflict: {other:?}"),
    }
    // A label write for a job deleted since the cache saw it must not re-create it. (No
    // operator runs here to release its finalizer once deleted: the test does.)
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    let deleted = api.get(&name).await.unwrap();
    assert!(deleted.is_terminating() && deleted.keeps_range());
    store.release(&deleted).await.unwrap();
    wait_for("job gone", Duration::from_secs(30), || async {
        api.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(store.relabel(&relabelled, &succeeded).await.is_err());
    assert!(api.get_opt(&name).await.unwrap().is_none(), "re-created");
}

/// Kafka expires the committed offsets of a group without members `offsets.retention.minutes`
/// after their last commit, and a pipeline planning from no committed offset would cut new
/// ranges over blocks already written. An idle pipeline commits its unchanged offsets again
/// on a schedule (`--offset-refresh-interval`, here 3 s).
#[tokio::test]
async fn an_idle_pipeline_commits_its_unchanged_offsets_again_before_kafka_could_expire_them() {
    let s = Scenario::new("op-refresh")
        .records(1000)
        .value_size(16)
        .jobs(json!({"maxRecords": 1000}))
        .await;
    let op = spawn_operator_with(&s.tb, &s.ns, "op", &["--offset-refresh-interval", "3"]);
    let job = s.wait_jobs(1).await.remove(0);
    FakeBuilder::new(&s.tb, &s.ns, "b")
        .claim_and_succeed(&job)
        .await
        .expect("the job done");
    let committed = s.wait_all_committed(Duration::from_secs(60)).await;

    // Nothing moves from here on, but the commit time does: twice, each after the interval.
    let last_commit = || async { s.get().await.status?.last_commit_time.map(|t| t.0) };
    let first = wait_for("a commit time", Duration::from_secs(30), last_commit).await;
    let mut latest = first;
    for _ in 0..2 {
        latest = wait_for(
            "the unchanged offsets committed again",
            Duration::from_secs(30),
            || async { last_commit().await.filter(|t| *t > latest) },
        )
        .await;
    }
    // (Status times have whole seconds.)
    assert!(
        latest.duration_since(first) >= jiff::SignedDuration::from_secs(5),
        "two refreshes 3 s apart: {first} → {latest}"
    );
    assert_eq!(s.committed().await, committed);
    assert!(
        op.proc
            .log_text()
            .contains("committed unchanged offsets again"),
        "{}",
        op.proc.log_text()
    );
}

/// A builder Deployment, or its HPA alone, deleted behind the operator's back is applied
/// again: the operator watches the Deployments and HPAs it owns instead of trusting what it
/// last applied.
#[tokio::test]
async fn a_deleted_builder_deployment_or_hpa_is_applied_again() {
    let s = scenario("op-deploy", 1, 0)
        .pipeline(|bp| {
            bp.spec.builders = Some(
                serde_json::from_value(json!({
                    "image": "blocksmith-e2e/not-pulled:never",
                    "minReplicas": 0,
                    "maxReplicas": 1,
                }))
                .unwrap(),
            )
        })
        .await;
    let deployments: Api<Deployment> = Api::namespaced(s.tb.client.clone(), &s.ns);
    deleted_then_applied_again(&deployments, "the builder Deployment").await;
    // The testbed's Kubernetes 1.20 serves autoscaling/v2beta2.
    let gvk = GroupVersionKind::gvk("autoscaling", "v2beta2", "HorizontalPodAutoscaler");
    let hpas: Api<DynamicObject> =
        Api::namespaced_with(s.tb.client.clone(), &s.ns, &ApiResource::from_gvk(&gvk));
    deleted_then_applied_again(&hpas, "the builder HPA").await;
}

/// Deletes the one object `api` lists, once there is one, and waits for it to be applied
/// again under the same name.
async fn deleted_then_applied_again<K>(api: &Api<K>, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let one = || async {
        let list = api.list(&ListParams::default()).await.unwrap();
        list.items.into_iter().next()
    };
    let first = wait_for(what, Duration::from_secs(60), one).await;
    api.delete(&first.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let again = wait_for(
        &format!("{what} applied again"),
        Duration::from_secs(60),
        || async { one().await.filter(|o| o.uid() != first.uid()) },
    )
    .await;
    assert_eq!(again.name_any(), first.name_any());
}

/// Builders that cannot run show on the pipeline, with Kubernetes' own reasons, where
/// `kubectl describe bp` shows them: a Deployment that cannot create pods (its ServiceAccount
/// does not exist in the namespace), an HPA that cannot read its metric (the shared testbed
/// serves no external-metrics API), then, with the ServiceAccount made, a pod whose image
/// cannot be pulled.
#[tokio::test]
async fn builders_that_cannot_run_are_reported_on_the_pipeline() {
    let s = scenario("op-health", 1, 0)
        .pipeline(|bp| {
            bp.spec.builders = Some(
                serde_json::from_value(json!({
                    "image": "blocksmith-e2e/not-pulled:never",
                    "minReplicas": 1,
                    "maxReplicas": 1,
                }))
                .unwrap(),
            )
        })
        .await;
    let refused = Cond::ready_false("BuildersUnavailable")
        .message_contains("FailedCreate")
        .within(Duration::from_secs(60));
    let message = s.wait(refused).await.message;
    assert!(
        message.starts_with("builders cannot run: Deployment p-builder: FailedCreate: ")
            && message.contains(r#"serviceaccount "blocksmith-builder" not found"#),
        "{message}"
    );
    let no_metric = Cond::ready_false("BuildersUnavailable")
        .message_contains("ScalingActive=False")
        .within(Duration::from_secs(60));
    let message = s.wait(no_metric).await.message;
    assert!(
        message.contains(
            "HorizontalPodAutoscaler p-builder: ScalingActive=False (FailedGetExternalMetric)"
        ),
        "{message}"
    );
    s.wait(Cond::new("Degraded").reason("BuildersUnavailable"))
        .await;
    s.wait_event("BuildersUnavailable").await;

    let account: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "blocksmith-builder"}})).unwrap();
    Api::namespaced(s.tb.client.clone(), &s.ns)
        .create(&Default::default(), &account)
        .await
        .expect("create the builder ServiceAccount");
    let unpulled = Cond::ready_false("BuildersUnavailable")
        .message_contains("container builder")
        .within(Duration::from_secs(90));
    let message = s.wait(unpulled).await.message;
    assert!(
        (message.contains("ErrImagePull") || message.contains("ImagePullBackOff"))
            && message.contains("not-pulled"),
        "{message}"
    );
}

/// A request the Kubernetes API refuses (here the apply of the builder Deployment, for a
/// memory limit the API cannot parse though the CRD lets it through: Kubernetes 1.20 answers
/// it with a 500, later versions with a 422) shows on the pipeline with the
/// API's answer, not only in the operator's log; the fix clears it.
#[tokio::test]
async fn a_request_the_api_refuses_is_reported_on_the_pipeline() {
    let builders = |memory: &str| {
        serde_json::from_value(json!({
            "image": "blocksmith-e2e/not-pulled:never",
            "minReplicas": 1,
            "maxReplicas": 1,
            "resources": {"limits": {"memory": memory}},
        }))
        .unwrap()
    };
    let s = scenario("op-refused", 1, 0)
        .pipeline(move |bp| bp.spec.builders = Some(builders("lots")))
        .await;
    let message = s
        .wait(Cond::ready_false("KubernetesRequestRefused"))
        .await
        .message;
    assert!(
        message.starts_with("the Kubernetes API answered ")
            && message.contains("Deployment")
            && message.contains("quantities must match"),
        "{message}"
    );
    s.wait_event("KubernetesRequestRefused").await;

    let mut bp = s.bp.clone();
    bp.spec.builders = Some(builders("256Mi"));
    s.apply(&bp).await;
    wait_for("the refusal cleared", Duration::from_secs(30), || async {
        let ready = s.condition("Ready").await?;
        (ready.reason != "KubernetesRequestRefused").then_some(())
    })
    .await;
}

/// A pipeline where nothing changes costs a poll, not writes: its status and its jobs are
/// not rewritten (a write wakes the next reconcile, and every tenant's pipeline would churn
/// the API server and etcd). The records wait unwritten, so their age grows meanwhile.
#[tokio::test]
async fn a_pipeline_where_nothing_changes_is_not_rewritten() {
    let s = scenario("op-idle", 2, 2000).await;
    s.wait_jobs(2).await;
    let versions = || async {
        let bp = s.get().await;
        let jobs: BTreeMap<String, String> = s
            .jobs()
            .await
            .iter()
            .map(|j| (j.name_any(), j.resource_version().unwrap_or_default()))
            .collect();
        (bp.resource_version(), bp.status, jobs)
    };
    wait_for(
        "both jobs counted in the status",
        Duration::from_secs(30),
        || async {
            let status = s.get().await.status?;
            (status.queue_depth == 2).then_some(())
        },
    )
    .await;
    // The passes the jobs' creation and the first status woke.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, status, jobs_before) = versions().await;
    // Five polls of the operator (`--poll-interval 1`).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (after, status_after, jobs_after) = versions().await;
    assert_eq!(
        before, after,
        "the idle pipeline was rewritten: {status:?} -> {status_after:?}"
    );
    assert_eq!(jobs_before, jobs_after, "idle jobs were rewritten");
}

/// How old the oldest uncommitted record is, in the status (when it arrived, which `kubectl
/// get bp` shows as an age) and as a metric: it grows while nothing writes the records, and
/// is gone (0) once all are committed.
#[tokio::test]
async fn the_oldest_uncommitted_record_age_grows_until_it_is_written() {
    let s = scenario("op-oldest", 2, 2000).await;
    let op_port = s.operator.as_ref().unwrap().metrics_port;
    s.wait_jobs(2).await;
    let arrival = wait_for(
        "the oldest uncommitted record 3 s old",
        Duration::from_secs(30),
        || async {
            let arrival = s.get().await.status?.oldest_uncommitted_time?;
            let waited = jiff::Timestamp::now().duration_since(arrival.0).as_secs();
            (waited >= 3).then_some(arrival)
        },
    )
    .await;
    let metric = format!(
        "blocksmith_oldest_uncommitted_record_age_seconds{{namespace=\"{}\",pipeline=\"p\"}}",
        s.ns
    );
    let scraped = http_get(op_port, "/metrics");
    let waited = jiff::Timestamp::now().duration_since(arrival.0).as_secs();
    let value: i64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix(&metric))
        .unwrap_or_else(|| panic!("{metric} not in {scraped}"))
        .trim()
        .parse()
        .unwrap();
    // The metric is as of the last pass (a poll, 1 s, ago at most, plus the throttle); the
    // status's time is in whole seconds.
    assert!(
        (waited - 3..=waited).contains(&value),
        "metric {value} s, status {waited} s"
    );
    assert_eq!(
        s.get()
            .await
            .status
            .and_then(|st| st.oldest_uncommitted_time),
        Some(arrival),
        "the arrival of a record still waiting moved"
    );

    // The conditions, as the alerts read them: progressing, no problem.
    let series = |name: &str, labels: &str| {
        let value = sample(
            op_port,
            &format!(
                "blocksmith_{name}{{namespace=\"{}\",pipeline=\"p\",{labels}}}",
                s.ns
            ),
        );
        value.unwrap_or_else(|| panic!("no {name} {labels} in {}", http_get(op_port, "/metrics")))
    };
    assert_eq!(
        series(
            "pipeline_condition",
            "condition=\"Progressing\",status=\"True\""
        ),
        1.0
    );
    assert_eq!(
        series(
            "pipeline_condition",
            "condition=\"Suspended\",status=\"True\""
        ),
        0.0
    );
    assert_eq!(series("pipeline_problems", "reason=\"JobFailed\""), 0.0);

    let _builders = s.spawn_builders(1);
    s.wait_all_committed(Duration::from_secs(120)).await;
    wait_for("nothing waiting", Duration::from_secs(30), || async {
        let status = s.get().await.status?;
        status.oldest_uncommitted_time.is_none().then_some(())
    })
    .await;
    wait_for(
        "Progressing=False exported",
        Duration::from_secs(30),
        || async {
            let caught_up = "condition=\"Progressing\",status=\"False\"";
            (series("pipeline_condition", caught_up) == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        series("pipeline_condition", "condition=\"Ready\",status=\"True\""),
        1.0
    );
}

/// A Secret the builders read changing (here created, then changed) rolls them: a new pod
/// template, so new pods that read it again. A PodDisruptionBudget follows
/// `spec.builders.podDisruptionBudget`: applied, changed, deleted with the field.
#[tokio::test]
async fn a_changed_secret_rolls_the_builders_and_their_budget_follows_the_spec() {
    use blocksmith_operator::builders::{SECRETS_DIGEST, disruption_budget_version};
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams, PostParams};

    let builders = |budget: serde_json::Value| {
        let mut b = json!({
            "image": "blocksmith-e2e/not-pulled:never",
            "minReplicas": 1,
            "maxReplicas": 1,
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "token", "key": "token"}}}],
        });
        if !budget.is_null() {
            b["podDisruptionBudget"] = budget;
        }
        serde_json::from_value(b).unwrap()
    };
    let s = scenario("op-roll", 1, 0)
        .pipeline(move |bp| bp.spec.builders = Some(builders(json!({"maxUnavailable": 1}))))
        .await;
    let deployments: Api<Deployment> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let digest = || async {
        let d = deployments.get_opt("p-builder").await.ok()??;
        let template = d.spec?.template.metadata?;
        template.annotations?.get(SECRETS_DIGEST).cloned()
    };
    let changed_from = |old: String, what: &'static str| {
        wait_for(what, Duration::from_secs(30), move || {
            let old = old.clone();
            async move { digest().await.filter(|d| *d != old) }
        })
    };
    let absent = wait_for("the builders applied", Duration::from_secs(30), digest).await;

    let secrets: Api<Secret> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let token: Secret = serde_json::from_value(json!({
        "metadata": {"name": "token"}, "stringData": {"token": "one"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &token)
        .await
        .unwrap();
    let created = changed_from(absent.clone(), "the template rolled for the new Secret").await;
    let patch = json!({"stringData": {"token": "two"}});
    secrets
        .patch("token", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let changed = changed_from(
        created.clone(),
        "the template rolled for the changed Secret",
    )
    .await;
    assert_ne!(changed, absent);
    // A label is not content: no roll for it.
    let label = json!({"metadata": {"labels": {"team": "data"}}});
    secrets
        .patch("token", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(digest().await.as_deref(), Some(changed.as_str()));
    // Each roll was a new ReplicaSet of the Deployment: three templates so far.
    let replica_sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(s.tb.client.clone(), &s.ns);
    let selector = "blocksmith.io/pipeline=p,app.kubernetes.io/name=blocksmith-builder";
    wait_for(
        "a ReplicaSet per template",
        Duration::from_secs(30),
        || async {
            let sets = replica_sets
                .list(&ListParams::default().labels(selector))
                .await
                .ok()?;
            (sets.items.len() == 3).then_some(())
        },
    )
    .await;

    // The budget, in whichever policy version the cluster serves.
    let groups = s.tb.client.list_api_groups().await.unwrap();
    let version = disruption_budget_version(&groups).expect("a policy API");
    let gvk = GroupVersionKind::gvk("policy", version, "PodDisruptionBudget");
    let budgets: Api<DynamicObject> =
        Api::namespaced_with(s.tb.client.clone(), &s.ns, &ApiResource::from_gvk(&gvk));
    let budget = budgets.get("p-builder").await.expect("the budget");
    assert_eq!(budget.data["spec"]["maxUnavailable"], 1);
    assert_eq!(
        budget.data["spec"]["selector"]["matchLabels"],
        json!({"blocksmith.io/pipeline": "p", "app.kubernetes.io/name": "blocksmith-builder"})
    );
    let mut bp = s.bp.clone();
    bp.spec.builders = Some(builders(json!({"minAvailable": "50%"})));
    s.apply(&bp).await;
    wait_for("the budget changed", Duration::from_secs(30), || async {
        let b = budgets.get("p-builder").await.ok()?;
        (b.data["spec"]["minAvailable"] == "50%" && b.data["spec"].get("maxUnavailable").is_none())
            .then_some(())
    })
    .await;
    bp.spec.builders = Some(builders(serde_json::Value::Null));
    s.apply(&bp).await;
    wait_for("the budget deleted", Duration::from_secs(30), || async {
        budgets
            .get_opt("p-builder")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(digest().await.is_some(), "the builders stay");
}

/// An HPA only where the operator serves its metric: `--builder-autoscaler fixed` (what the
/// chart sets without its external metrics API) removes the builders' HPA and runs
/// `minReplicas`; `external` leaves replicas to an autoscaler of the cluster's own.
#[tokio::test]
async fn builders_get_no_hpa_unless_the_operator_serves_their_metric() {
    let builders = |revision: &str| {
        serde_json::from_value(json!({
            "image": "blocksmith-e2e/not-pulled:never",
            "minReplicas": 2,
            "maxReplicas": 4,
            "podAnnotations": {"revision": revision},
        }))
        .unwrap()
    };
    let s = Scenario::new("op-scaler")
        .unapplied()
        .pipeline(move |bp| bp.spec.builders = Some(builders("1")))
        .await;
    let gvk = GroupVersionKind::gvk("autoscaling", "v2beta2", "HorizontalPodAutoscaler");
    let hpas: Api<DynamicObject> =
        Api::namespaced_with(s.tb.client.clone(), &s.ns, &ApiResource::from_gvk(&gvk));
    let deployments: Api<Deployment> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let replicas = || async { deployments.get_opt("p-builder").await.ok()??.spec?.replicas };
    s.apply(&s.bp).await;

    let operator = spawn_operator(&s.tb, &s.ns, "op");
    wait_for("the HPA", Duration::from_secs(30), || async {
        hpas.get_opt("p-builder").await.ok()?.map(|_| ())
    })
    .await;
    drop(operator);

    let operator = spawn_operator_with(&s.tb, &s.ns, "op", &["--builder-autoscaler", "fixed"]);
    wait_for("the HPA gone", Duration::from_secs(30), || async {
        hpas.get_opt("p-builder")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    wait_for("minReplicas builders", Duration::from_secs(30), || async {
        (replicas().await? == 2).then_some(())
    })
    .await;
    drop(operator);

    // Another autoscaler's replicas stay, through a re-apply of the builders. The operator
    // first lets go of the field it owned.
    let _operator = spawn_operator_with(&s.tb, &s.ns, "op", &["--builder-autoscaler", "external"]);
    wait_for("replicas let go", Duration::from_secs(30), || async {
        let d = deployments.get_opt("p-builder").await.ok()??;
        let owned = d.metadata.managed_fields?.into_iter().any(|f| {
            f.manager.as_deref() == Some(blocksmith_operator::jobs::MANAGER)
                && f.fields_v1
                    .as_ref()
                    .is_some_and(|v| v.0.to_string().contains("\"f:replicas\""))
        });
        (!owned).then_some(())
    })
    .await;
    let scale = json!({"spec": {"replicas": 3}});
    deployments
        .patch_scale(
            "p-builder",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&scale),
        )
        .await
        .unwrap();
    let mut bp = s.bp.clone();
    bp.spec.builders = Some(builders("2"));
    s.apply(&bp).await;
    wait_for(
        "the builders applied again",
        Duration::from_secs(30),
        || async {
            let d = deployments.get_opt("p-builder").await.ok()??;
            let annotations = d.spec?.template.metadata?.annotations?;
            (annotations.get("revision")? == "2").then_some(())
        },
    )
    .await;
    assert_eq!(replicas().await, Some(3));
    assert!(hpas.get_opt("p-builder").await.unwrap().is_none());
}

/// A steady stream of job events (one builder finishing small jobs back to back, each a claim
/// and a report) must not hold back the operator's reconciles: commits follow the jobs as
/// they finish, not only once they all have. kube-runtime's debounce, which every event
/// restarted, reconciled this pipeline twice in all: once to plan, once at the end.
#[tokio::test]
async fn commits_follow_finished_jobs_while_others_keep_finishing() {
    // A broker of its own with a 50 ms round trip: a job takes a few tenths of a second
    // however many the builder builds at once, so the run lasts long enough to watch.
    let mut s = Scenario::new("op-steady")
        .private_broker()
        .partitions(16)
        .records(3_200)
        .value_size(100)
        .jobs(json!({"maxRecords": 50, "maxInFlightPerPartition": 4}))
        .operator()
        .await;
    s.broker().set_round_trip_time(Duration::from_millis(50));
    s.builders = s.spawn_builders(1);
    let mut committed_early = false;
    let mut most_unfinished = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let committed: i64 = s.committed().await.values().sum();
        if committed == 3_200 {
            break;
        }
        let unfinished = s
            .jobs()
            .await
            .iter()
            .filter(|j| j.phase() != JobPhase::Succeeded)
            .count();
        most_unfinished = most_unfinished.max(unfinished);
        // A quarter of the jobs still to do, and some offsets already committed.
        committed_early |= committed > 0 && unfinished >= 16;
        assert!(Instant::now() < deadline, "not all committed: {committed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most_unfinished >= 48,
        "the jobs were planned together ({most_unfinished})"
    );
    assert!(
        committed_early,
        "nothing was committed while 16 or more jobs were unfinished"
    );
    s.wait_committed_then_audit(Duration::from_secs(60)).await;
}
