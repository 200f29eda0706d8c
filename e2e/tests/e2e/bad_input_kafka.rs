//! What bad input about Kafka gets (DESIGN.md, "What bad input gets"): a condition or an API
//! error naming the field or the reason, in words a user can act on, and nothing lost or
//! skipped: blocks written by real builder processes are audited exactly once, or the
//! commit is shown not to have moved.

use std::collections::BTreeMap;
use std::time::Duration;

use blocksmith_crds::domain::default_consumer_group;
use blocksmith_crds::pipeline::SecurityProtocol;
use blocksmith_crds::{BlockJob, BlockPipeline};
use blocksmith_e2e::datagen::{DataSpec, ValueSizes};
use blocksmith_e2e::scenario::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// `kubectl apply` of a manifest; returns (succeeded, stderr).
fn kubectl_apply(ns: &str, manifest: &Value) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .args(["apply", "-n", ns, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl (on PATH, with KUBECONFIG from the testbed env)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sets `value` at a JSON pointer below `spec`, creating objects on the way.
fn set(manifest: &mut Value, pointer: &str, value: Value) {
    let mut at = &mut manifest["spec"];
    for part in pointer.trim_start_matches('/').split('/') {
        if !at.is_object() {
            *at = json!({});
        }
        at = at
            .as_object_mut()
            .unwrap()
            .entry(part.to_string())
            .or_insert(Value::Null);
    }
    *at = value;
}

fn sasl_refs(secret: &str) -> Value {
    json!({
        "mechanism": "PLAIN",
        "usernameSecretRef": {"name": secret, "key": "username"},
        "passwordSecretRef": {"name": secret, "key": "password"},
    })
}

/// Every rule of `operator/src/validate.rs`, through the real API: what the CRD schema can
/// express is rejected at `kubectl apply` with the field in the error; the rest is accepted
/// and reported by the operator as `InvalidSpec` naming the field, with no job planned and
/// nothing committed. One namespace and one operator for all cases.
#[tokio::test]
async fn invalid_specs_are_rejected_by_the_schema_or_reported_with_the_field() {
    // Real data on a real broker: a pipeline that slipped through would plan and commit.
    let s = Scenario::new("bad-spec")
        .records(100)
        .value_size(16)
        .unapplied()
        .operator()
        .await;
    let (tb, ns) = (&s.tb, &s.ns);
    let base = |name: &str| {
        let mut bp = s.bp.clone();
        bp.metadata.name = Some(name.into());
        let mut v = serde_json::to_value(bp).unwrap();
        v.as_object_mut().unwrap().remove("status");
        v
    };

    // Rejected by the CRD schema at `kubectl apply`: (pointer, value, what the error says).
    let schema_cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "/kafka/bootstrapServers",
            json!(""),
            &["spec.kafka.bootstrapServers", "at least 1 chars long"],
        ),
        (
            "/kafka/topic",
            json!("bad topic"),
            &[
                r#"spec.kafka.topic: Invalid value: "bad topic""#,
                "should match '^[a-zA-Z0-9._-]+$'",
            ],
        ),
        (
            "/kafka/securityProtocol",
            json!("SASL"),
            &[r#"spec.kafka.securityProtocol: Unsupported value: "SASL""#],
        ),
        (
            "/jobs/maxRecords",
            json!(-5),
            &[
                "spec.jobs.maxRecords: Invalid value: -5",
                "should be greater than or equal to 1",
            ],
        ),
        (
            "/jobs/maxRecords",
            json!(0),
            &["spec.jobs.maxRecords: Invalid value: 0"],
        ),
        (
            "/jobs/maxAge",
            json!("5 minutes"),
            &[r#"spec.jobs.maxAge: Invalid value: "5 minutes""#],
        ),
        (
            "/jobs/maxInFlightPerPartition",
            json!(0),
            &["spec.jobs.maxInFlightPerPartition: Invalid value: 0"],
        ),
        (
            "/jobs/leaseDurationSeconds",
            json!(2),
            &[
                "spec.jobs.leaseDurationSeconds: Invalid value: 2",
                "greater than or equal to 3",
            ],
        ),
        (
            "/jobs/backoffLimit",
            json!(0),
            &["spec.jobs.backoffLimit: Invalid value: 0"],
        ),
        (
            "/jobs/ttlSecondsAfterSucceeded",
            json!(-1),
            &["spec.jobs.ttlSecondsAfterSucceeded: Invalid value: -1"],
        ),
        (
            "/jobs/successfulJobsHistoryLimit",
            json!(-1),
            &["spec.jobs.successfulJobsHistoryLimit: Invalid value: -1"],
        ),
        (
            "/output/url",
            json!("ftp://host/blocks"),
            &[r#"spec.output.url: Invalid value: "ftp://host/blocks""#],
        ),
        (
            "/output/compressionLevel",
            json!(30),
            &[
                "spec.output.compressionLevel: Invalid value: 30",
                "less than or equal to 22",
            ],
        ),
        (
            "/output/compression",
            json!("lz4"),
            &[r#"spec.output.compression: Unsupported value: "lz4""#],
        ),
        (
            "/output/rowGroupSize",
            json!(0),
            &["spec.output.rowGroupSize: Invalid value: 0"],
        ),
        (
            "/builders",
            json!({"image": "b", "maxReplicas": 0}),
            &["spec.builders.maxReplicas: Invalid value: 0"],
        ),
        (
            "/builders",
            json!({"image": "b", "minReplicas": -1}),
            &["spec.builders.minReplicas: Invalid value: -1"],
        ),
        (
            "/builders",
            json!({"image": "b", "targetQueueDepthPerBuilder": 0}),
            &["spec.builders.targetQueueDepthPerBuilder: Invalid value: 0"],
        ),
    ];
    let api: Api<BlockPipeline> = Api::namespaced(tb.client.clone(), ns);
    for (i, (pointer, value, wants)) in schema_cases.iter().enumerate() {
        let name = format!("schema-{i}");
        let mut manifest = base(&name);
        set(&mut manifest, pointer, value.clone());
        let (ok, stderr) = kubectl_apply(ns, &manifest);
        assert!(!ok, "{pointer} = {value} was accepted");
        for want in *wants {
            assert!(
                stderr.contains(want),
                "{pointer} = {value}: {want:?} not in {stderr}"
            );
        }
        assert!(
            api.get_opt(&name).await.unwrap().is_none(),
            "{name} not created"
        );
    }

    // Accepted by the schema, reported by the operator: (pointer, value, message start,
    // what else it says).
    let mut operator_cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "/kafka/bootstrapServers",
            json!("  "),
            "spec.kafka.bootstrapServers: ",
            "must name at least one host:port",
        ),
        (
            "/kafka/bootstrapServers",
            json!("broker-without-port"),
            "spec.kafka.bootstrapServers: ",
            r#""broker-without-port" is not host:port"#,
        ),
        (
            "/kafka/partitions",
            json!([]),
            "spec.kafka.partitions: ",
            "must list at least one partition",
        ),
        (
            "/kafka/partitions",
            json!([0, -1]),
            "spec.kafka.partitions: ",
            "partition -1 is negative",
        ),
        (
            "/kafka/securityProtocol",
            json!("SASL_SSL"),
            "spec.kafka.sasl: ",
            "securityProtocol SASL_SSL requires spec.kafka.sasl",
        ),
        (
            "/kafka/sasl",
            sasl_refs("creds"),
            "spec.kafka.sasl: ",
            "securityProtocol PLAINTEXT does not use spec.kafka.sasl",
        ),
        (
            "/jobs/maxAge",
            json!("99999999999999999999s"),
            "spec.jobs.maxAge: ",
            r#"invalid duration "99999999999999999999s""#,
        ),
        (
            "/jobs/maxUncommittedJobsPerPartition",
            json!(3),
            "spec.jobs.maxUncommittedJobsPerPartition: ",
            "3 is below maxInFlightPerPartition (1000)",
        ),
        (
            "/output/url",
            json!("s3:///"),
            "spec.output.url: ",
            "names no bucket or path",
        ),
        (
            "/output/compression",
            json!("snappy"),
            "spec.output.compressionLevel: ",
            "only applies to zstd compression",
        ),
        (
            "/builders",
            json!({"image": "b", "minReplicas": 5, "maxReplicas": 2}),
            "spec.builders: ",
            "minReplicas (5) <= maxReplicas (2)",
        ),
    ];
    let mut names = Vec::new();
    for (i, (pointer, value, _, _)) in operator_cases.iter().enumerate() {
        let name = format!("invalid-{i}");
        let mut manifest = base(&name);
        set(&mut manifest, pointer, value.clone());
        let (ok, stderr) = kubectl_apply(ns, &manifest);
        assert!(ok, "{pointer} = {value} rejected by the schema: {stderr}");
        names.push(name);
    }
    // A name too long for the label values it becomes on jobs and builders.
    let long = "n".repeat(64);
    let (ok, stderr) = kubectl_apply(ns, &base(&long));
    assert!(ok, "a 64-character name rejected: {stderr}");
    names.push(long);
    operator_cases.push((
        "/metadata/name",
        json!("n".repeat(64)),
        "metadata.name: ",
        "64 characters, over the 63 a label value allows",
    ));
    for (name, (pointer, value, start, says)) in names.iter().zip(&operator_cases) {
        let invalid = Cond::ready_false("InvalidSpec");
        let message = wait_condition(tb, ns, name, &invalid).await.message;
        assert!(
            message.starts_with(start) && message.contains(says),
            "{pointer} = {value}: {message:?} should start {start:?} and say {says:?}"
        );
        let d = condition(&get_pipeline(tb, ns, name).await, "Degraded").unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        let note = wait_event(tb, ns, name, "InvalidSpec").await;
        assert!(note.starts_with(start), "{note}");
    }
    // More reconciles: still nothing planned, nothing committed, no builder Deployment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let planned = Api::<BlockJob>::namespaced(tb.client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(planned.items.is_empty(), "invalid pipelines planned jobs");
    for name in &names {
        let group = default_consumer_group(ns, name);
        assert!(
            group_offsets(&tb.kafka_bootstrap, &group, &s.topic, 1)
                .await
                .is_empty(),
            "{name} committed"
        );
    }
    let deployments =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(tb.client.clone(), ns)
            .list(&Default::default())
            .await
            .unwrap();
    assert!(
        deployments.items.is_empty(),
        "no builders for invalid specs"
    );

    // Fixing the spec clears the condition and the pipeline runs.
    let fixed = names
        .iter()
        .zip(&operator_cases)
        .position(|(_, c)| c.0 == "/output/compression")
        .unwrap();
    let name = &names[fixed];
    let mut manifest = base(name);
    set(&mut manifest, "/output/compression", json!("zstd"));
    let (ok, stderr) = kubectl_apply(ns, &manifest);
    assert!(ok, "{stderr}");
    wait_condition(tb, ns, name, &Cond::reconciled()).await;
    wait_for(
        "the fixed pipeline's job",
        Duration::from_secs(30),
        || async { (!jobs(tb, ns, name).await.is_empty()).then_some(()) },
    )
    .await;
    wait_event(tb, ns, name, "Recovered").await;
}

/// A pipeline over a topic that does not exist yet is `TopicNotFound` and plans nothing;
/// once the topic is created and written to, the condition clears and builders write every
/// offset exactly once.
#[tokio::test]
async fn a_missing_topic_is_reported_until_it_is_created_then_everything_is_written() {
    let mut s = Scenario::new("late-topic")
        .missing_topic()
        .jobs(json!({"maxRecords": 1000}))
        .operator()
        .builders(2)
        .await;
    let topic = s.topic.clone();

    let message = s.wait(Cond::ready_false("TopicNotFound")).await.message;
    assert_eq!(
        message,
        format!(
            "topic {topic:?} does not exist: create it, or correct spec.kafka.topic (the operator never creates topics)"
        )
    );
    let note = s.wait_event("TopicNotFound").await;
    assert!(note.contains(&topic), "{note}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.jobs().await.is_empty(), "nothing planned");

    blocksmith_e2e::broker::create_topic(&s.tb.kafka_control, &topic, 2).unwrap();
    s.produced = produce_data(&s.tb, DataSpec::new(&topic, 2, 6000)).await;
    s.wait(Cond::reconciled()).await;
    s.wait_event("Recovered").await;
    s.wait_committed_then_audit(Duration::from_secs(180)).await;
}

/// librdkafka's mock cluster cannot add partitions to an existing topic (no CreatePartitions
/// handler; `rd_kafka_mock_topic_create` answers TOPIC_ALREADY_EXISTS), so the closest real
/// change is the pipeline's partition list growing mid-run. A partition the topic lacks is
/// `TopicNotFound` naming it; extended mid-run, the new partitions are planned from their
/// start and every offset of every partition is written exactly once.
#[tokio::test]
async fn partitions_added_to_the_pipeline_mid_run_are_written_exactly_once() {
    let mut s = Scenario::new("more-parts")
        .partitions(4)
        .records(16_000)
        .value_size(100)
        .jobs(json!({"maxRecords": 500, "maxInFlightPerPartition": 2}))
        .pipeline(|bp| bp.spec.kafka.partitions = Some(vec![0, 1, 7]))
        .operator()
        .await;
    let (tb, topic, mut bp) = (s.tb.clone(), s.topic.clone(), s.bp.clone());
    let message = s.wait(Cond::ready_false("TopicNotFound")).await.message;
    assert_eq!(
        message,
        format!(
            "partitions [7] are not in topic {topic:?} (it has 4): correct spec.kafka.partitions"
        )
    );
    assert!(s.jobs().await.is_empty(), "nothing planned");

    bp.spec.kafka.partitions = Some(vec![0, 1]);
    s.apply(&bp).await;
    let _builders = s.spawn_builders(2);
    // Mid-run: once the first blocks of partitions 0 and 1 are committed.
    wait_for("first commits", Duration::from_secs(60), || async {
        let c = s.committed().await;
        (c.get(&0).is_some_and(|o| *o > 0) && c.get(&1).is_some_and(|o| *o > 0)).then_some(())
    })
    .await;
    let before = s.committed().await;
    assert!(
        !before.contains_key(&2) && !before.contains_key(&3),
        "partitions outside the list untouched: {before:?}"
    );
    bp.spec.kafka.partitions = Some(vec![0, 1, 2, 3]);
    s.apply(&bp).await;
    // And more data to every partition while it runs.
    let more = produce_data(
        &tb,
        DataSpec {
            value_sizes: ValueSizes::Fixed(100),
            seed: 2,
            ..DataSpec::new(&topic, 4, 8_000)
        },
    )
    .await;
    s.produced.records.extend(more.records);
    s.produced.partitions = more.partitions;

    s.wait_committed_then_audit(Duration::from_secs(240)).await;
    let planned = s.jobs().await;
    for p in [2, 3] {
        let first = planned
            .iter()
            .filter(|j| j.spec.partition == p)
            .map(|j| j.spec.start_offset)
            .min();
        // Jobs may be cleaned up after their commit; any left start on a job boundary.
        assert!(first.is_none_or(|s| s % 500 == 0), "{p}: {first:?}");
    }
}

/// A committed offset below the low watermark (retention deleted records never written to a
/// block) stops the pipeline with `OffsetOutOfRange` and does not move the commit; with
/// `skipMissingData` it continues from the low watermark, says so in an Event, and writes
/// every remaining offset exactly once.
#[tokio::test]
async fn a_commit_below_the_low_watermark_stops_until_skipping_is_allowed() {
    // The mock broker keeps 5 MiB per partition: ~10 MiB pushes the low watermark up.
    let mut s = Scenario::new("retention")
        .records(45_000)
        .value_size(200)
        .jobs(json!({"maxRecords": 5000}))
        .unapplied()
        .await;
    let (tb, group, topic) = (s.tb.clone(), s.group.clone(), s.topic.clone());
    let (low, high) = {
        let (b, t) = (tb.kafka_bootstrap.clone(), topic.clone());
        tokio::task::spawn_blocking(move || watermarks(&b, &t, 0))
            .await
            .unwrap()
    };
    assert_eq!(high, s.produced.partitions[&0].1);
    assert!(
        low > 0 && low < high,
        "the broker should have deleted the oldest records: [{low}, {high})"
    );
    s.set_committed(BTreeMap::from([(0, 0)])).await;
    assert_eq!(s.committed().await, BTreeMap::from([(0, 0)]));

    let mut bp = s.bp.clone();
    s.apply(&bp).await;
    let _op = s.spawn_operator("op");
    let _builders = s.spawn_builders(2);
    let message = s.wait(Cond::ready_false("OffsetOutOfRange")).await.message;
    assert_eq!(
        message,
        format!(
            "partition 0: committed offset 0 is below the low watermark {low}: records [0, {low}) were deleted by retention before they were written to a block. Set spec.kafka.skipMissingData: true to continue from {low}, accepting the loss"
        )
    );
    s.wait_event("OffsetOutOfRange").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.jobs().await.is_empty(), "nothing planned");
    assert_eq!(
        s.committed().await,
        BTreeMap::from([(0, 0)]),
        "the commit did not move"
    );

    bp.spec.kafka.skip_missing_data = true;
    s.apply(&bp).await;
    let note = s.wait_event("SkippedMissingData").await;
    assert_eq!(
        note,
        format!(
            "partition 0: offsets [0, {low}) ({low} records) were deleted by retention before they were written to a block; continuing from offset {low} because spec.kafka.skipMissingData is true. Those records are lost"
        )
    );
    let commits = wait_all_committed(
        &tb,
        &group,
        &topic,
        &BTreeMap::from([(0, high)]),
        Duration::from_secs(180),
    )
    .await;
    s.wait(Cond::reconciled()).await;
    // Exactly the records the broker still had: [low, high), each once.
    s.produced.records.retain(|r| r.offset >= low);
    assert_eq!(s.produced.total() as i64, high - low);
    audit_exact(&tb, &s.blocks, &s.produced, &commits);
    let skipped = pipeline_events(&tb, &s.ns, "p")
        .await
        .into_iter()
        .filter(|e| e.1 == "SkippedMissingData")
        .count();
    assert_eq!(skipped, 1, "the skip is reported once");
}

/// The mock broker has no SASL (librdkafka's mock cluster implements no SaslHandshake or
/// SaslAuthenticate), so a wrong password cannot be tested here. What can: a credentials
/// Secret that is missing or lacks a key (the reason names the secret and key), and SASL
/// against a listener that does not do it, which librdkafka reports with the same error
/// code as a rejected password (`__AUTHENTICATION`) and so the same condition. Then a
/// corrected spec recovers and everything is written exactly once.
#[tokio::test]
async fn kafka_credentials_problems_name_the_secret_and_recover_once_fixed() {
    let s = Scenario::new("kafka-creds")
        .partitions(2)
        .records(4000)
        .pipeline(|bp| {
            bp.spec.kafka.security_protocol = SecurityProtocol::SaslPlaintext;
            bp.spec.kafka.sasl = Some(serde_json::from_value(sasl_refs("kafka-creds")).unwrap());
        })
        .operator()
        .await;
    let mut bp = s.bp.clone();

    let message = s.wait(Cond::ready_false("SecretNotFound")).await.message;
    assert_eq!(
        message,
        r#"spec.kafka.sasl.usernameSecretRef: secret "kafka-creds" not found"#
    );

    let secrets: Api<Secret> = Api::namespaced(s.tb.client.clone(), &s.ns);
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka-creds"},
        "data": {"username": "YmxvY2tzbWl0aA=="},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let missing_key = Cond::new("Ready")
        .reason("SecretNotFound")
        .message_contains("passwordSecretRef");
    let message = s.wait(missing_key).await.message;
    assert_eq!(
        message,
        r#"spec.kafka.sasl.passwordSecretRef: secret "kafka-creds" has no key "password""#
    );

    secret
        .data
        .get_or_insert_default()
        .insert("password".into(), ByteString(b"wrong".to_vec()));
    secrets
        .patch(
            "kafka-creds",
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
    let auth_failed =
        Cond::ready_false("KafkaAuthenticationFailed").within(Duration::from_secs(60));
    let message = s.wait(auth_failed).await.message;
    assert_says(
        &message,
        &[
            "authentication to Kafka failed: ",
            "SASL",
            "Check spec.kafka.securityProtocol and spec.kafka.sasl",
            r#"the credentials in secret "kafka-creds" (keys "username", "password")"#,
        ],
    );
    s.wait_event("KafkaAuthenticationFailed").await;
    assert!(s.jobs().await.is_empty(), "nothing planned");
    assert!(s.committed().await.is_empty(), "nothing committed");

    // The fix: this listener is plaintext.
    bp.spec.kafka.security_protocol = SecurityProtocol::Plaintext;
    bp.spec.kafka.sasl = None;
    s.apply(&bp).await;
    let _builders = s.spawn_builders(2);
    s.wait(Cond::reconciled().within(Duration::from_secs(60)))
        .await;
    s.wait_committed_then_audit(Duration::from_secs(180)).await;
}
