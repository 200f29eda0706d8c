//! Kafka brokers that authenticate their clients, and credentials kept out of sight: real
//! operator and builder processes against a broker that accepts only TLS with a client
//! certificate its CA signed (what Strimzi's `tls` authentication asks).

use std::time::Duration;

use blocksmith_crds::BlockPipeline;
use blocksmith_crds::pipeline::SecurityProtocol;
use blocksmith_e2e::broker::PrivateBroker;
use blocksmith_e2e::datagen::DataSpec;
use blocksmith_e2e::pki::{Identity, TestPki};
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;

/// A SASL password no log, status or Event may hold.
const SASL_PASSWORD: &str = "sasl-password-4f1c9e7a";

fn tls_properties(ca: &str, id: &Identity) -> Vec<(String, String)> {
    [
        ("security.protocol", "ssl"),
        ("ssl.ca.pem", ca),
        ("ssl.certificate.pem", &id.certificate),
        ("ssl.key.pem", &id.key),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// The pipeline's TLS settings: the CA from `kafka-ca`, the client certificate from `user`.
fn with_client_certificate(bp: &mut BlockPipeline, user: &str) {
    bp.spec.kafka.security_protocol = SecurityProtocol::Ssl;
    bp.spec.kafka.tls = Some(
        serde_json::from_value(json!({
            "caSecretRef": {"name": "kafka-ca", "key": "ca.crt"},
            "certificateSecretRef": {"name": user, "key": "user.crt"},
            "keySecretRef": {"name": user, "key": "user.key"},
        }))
        .unwrap(),
    );
}

/// A line from the middle of a PEM block: what a leak of the key would show.
fn pem_body_line(pem: &str) -> String {
    let lines: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    lines[lines.len() / 2].to_string()
}

#[tokio::test]
async fn client_certificates_from_secrets_and_no_credential_in_any_log_status_or_event() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("kafka-mtls").await;
    let pki_dir = tb.dir.join(format!("{ns}-pki"));
    let pki = TestPki::generate(&pki_dir, &["127.0.0.1"]).unwrap();
    let broker = PrivateBroker::spawn_tls(&tb, &ns, &pki_dir);
    let topic = "secure";
    broker.create_topic(topic, 2);
    let produced = produce_data_with(
        &broker.bootstrap,
        tls_properties(&pki.ca, &pki.client),
        DataSpec::new(topic, 2, 2000),
    )
    .await;

    let secrets: Api<Secret> = Api::namespaced(tb.client.clone(), &ns);
    for (name, data) in [
        ("kafka-ca", json!({"ca.crt": pki.ca})),
        (
            "kafka-user",
            json!({"user.crt": pki.client.certificate, "user.key": pki.client.key}),
        ),
        (
            "stranger",
            json!({"user.crt": pki.stranger.certificate, "user.key": pki.stranger.key}),
        ),
        (
            "kafka-sasl",
            json!({"username": "pipeline", "password": SASL_PASSWORD}),
        ),
    ] {
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))
                .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let _operator = spawn_operator(&tb, &ns, "op");

    // With the client certificate the CA signed: every record in a block, exactly once, and
    // every offset committed (read from the status: only TLS clients reach this broker).
    let blocks = blocks_dir(&tb, &ns);
    let mut bp = pipeline(
        "p",
        topic,
        &broker.bootstrap,
        &file_url(&blocks),
        json!({"maxRecords": 500}),
    );
    with_client_certificate(&mut bp, "kafka-user");
    apply_pipeline(&tb, &ns, &bp).await;
    let _builder = spawn_builder_with(&tb, &ns, "p", "b0", |cmd| {
        cmd.env("BLOCKSMITH_KAFKA_PROPERTIES", "security.protocol=ssl")
            .env("BLOCKSMITH_KAFKA_SSL_CA_PEM", &pki.ca)
            .env(
                "BLOCKSMITH_KAFKA_SSL_CERTIFICATE_PEM",
                &pki.client.certificate,
            )
            .env("BLOCKSMITH_KAFKA_SSL_KEY_PEM", &pki.client.key);
    });
    let expected = high_watermarks(&produced);
    let committed = wait_for(
        "every offset committed",
        Duration::from_secs(120),
        || async {
            let status = get_pipeline(&tb, &ns, "p").await.status?;
            let committed: std::collections::BTreeMap<i32, i64> = status
                .partitions
                .iter()
                .filter_map(|p| Some((p.partition, p.committed_offset?)))
                .collect();
            (committed == expected).then_some(committed)
        },
    )
    .await;
    audit_exact(&tb, &blocks, &produced, &committed);

    // A certificate another CA signed: the brokers refuse the connection, and the pipeline
    // says it cannot reach Kafka rather than showing nothing to do.
    let mut stranger = pipeline(
        "stranger",
        topic,
        &broker.bootstrap,
        &file_url(&blocks_dir(&tb, &ns)),
        json!({}),
    );
    with_client_certificate(&mut stranger, "stranger");
    apply_pipeline(&tb, &ns, &stranger).await;
    let refused = wait_condition(
        &tb,
        &ns,
        "stranger",
        &Cond::ready_false("KafkaUnavailable").within(Duration::from_secs(60)),
    )
    .await;
    assert!(refused.message.contains("SSL"), "{}", refused.message);

    // SASL credentials sent to brokers that do not take them fail; the password stays hidden.
    let mut sasl = stranger.clone();
    sasl.metadata.name = Some("sasl".into());
    with_client_certificate(&mut sasl, "kafka-user");
    sasl.spec.kafka.security_protocol = SecurityProtocol::SaslSsl;
    sasl.spec.kafka.sasl = Some(
        serde_json::from_value(json!({
            "mechanism": "PLAIN",
            "usernameSecretRef": {"name": "kafka-sasl", "key": "username"},
            "passwordSecretRef": {"name": "kafka-sasl", "key": "password"},
        }))
        .unwrap(),
    );
    apply_pipeline(&tb, &ns, &sasl).await;
    wait_for(
        "the SASL pipeline failing",
        Duration::from_secs(60),
        || async {
            let bp = get_pipeline(&tb, &ns, "sasl").await;
            let ready = condition(&bp, "Ready")?;
            (ready.status == "False" && ready.reason.starts_with("Kafka")).then_some(())
        },
    )
    .await;

    // No credential anywhere a person or a log collector looks: the processes' logs, the
    // pipelines' and jobs' status, the Events.
    let mut seen = String::new();
    for log in ["op", "b0"] {
        let path = tb.logs_dir().join(format!("{ns}-{log}.log"));
        seen += &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    }
    for kind in ["blockpipelines", "blockjobs", "events"] {
        let out = std::process::Command::new("kubectl")
            .args(["get", kind, "-n", &ns, "-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        seen += &String::from_utf8_lossy(&out.stdout);
    }
    assert!(
        seen.contains("stranger") && seen.len() > 10_000,
        "the texts were read"
    );
    for (what, secret) in [
        ("the SASL password", SASL_PASSWORD.to_string()),
        ("the client key", pem_body_line(&pki.client.key)),
        ("the refused client key", pem_body_line(&pki.stranger.key)),
    ] {
        assert!(
            !seen.contains(&secret),
            "{what} is in a log, a status or an Event"
        );
    }
}
