//! SASL against brokers that require it: real operator and builder processes against the test
//! broker behind its SASL front (`blocksmith-broker --sasl`), with SCRAM, and with OAUTHBEARER
//! tokens from an OIDC token endpoint this test serves on loopback (client-credentials grant,
//! 20-second JWTs, so that a run of a minute needs every client to refresh its token: the
//! front closes a connection when its token expires and refuses an expired one).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blocksmith_crds::BlockPipeline;
use blocksmith_crds::pipeline::SecurityProtocol;
use blocksmith_e2e::broker::PrivateBroker;
use blocksmith_e2e::datagen::{DataSpec, Produced};
use blocksmith_e2e::oidc::{Signer, TokenEndpoint};
use blocksmith_e2e::pki::TestPki;
use blocksmith_e2e::scenario::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;

const SCRAM_PASSWORD: &str = "scram-password-9d2e71c3";
const WRONG_PASSWORD: &str = "wrong-password-5b8a04f6";
const CLIENT_SECRET: &str = "client-secret-3e6f90a2";
const WRONG_CLIENT_SECRET: &str = "wrong-client-secret-71c4d8b5";
const TOKEN_LIFETIME: Duration = Duration::from_secs(20);

fn properties(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn create_secrets(tb: &Testbed, ns: &str, secrets: &[(&str, serde_json::Value)]) {
    let api: Api<Secret> = Api::namespaced(tb.client.clone(), ns);
    for (name, data) in secrets {
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))
                .unwrap();
        api.create(&PostParams::default(), &secret).await.unwrap();
    }
}

fn with_sasl(bp: &mut BlockPipeline, sasl: serde_json::Value) {
    bp.spec.kafka.security_protocol = SecurityProtocol::SaslPlaintext;
    bp.spec.kafka.sasl = Some(serde_json::from_value(sasl).unwrap());
}

/// Every offset of `expected` committed, read from the pipeline's status (only SASL clients
/// reach this broker).
async fn wait_committed(
    tb: &Testbed,
    ns: &str,
    name: &str,
    expected: &BTreeMap<i32, i64>,
) -> BTreeMap<i32, i64> {
    wait_for(
        "every offset committed",
        Duration::from_secs(120),
        || async {
            let status = get_pipeline(tb, ns, name).await.status?;
            let committed: BTreeMap<i32, i64> = status
                .partitions
                .iter()
                .filter_map(|p| Some((p.partition, p.committed_offset?)))
                .collect();
            (committed == *expected).then_some(committed)
        },
    )
    .await
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

/// The processes' logs, the pipelines' and jobs' status and the Events of `ns`, as one text.
fn everything_shown(tb: &Testbed, ns: &str, logs: &[&str]) -> String {
    let mut seen = String::new();
    for log in logs {
        let path = tb.logs_dir().join(format!("{ns}-{log}.log"));
        seen += &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    }
    for kind in ["blockpipelines", "blockjobs", "events"] {
        let out = std::process::Command::new("kubectl")
            .args(["get", kind, "-n", ns, "-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        seen += &String::from_utf8_lossy(&out.stdout);
    }
    seen
}

/// The pipeline's `Ready=False` condition once its reason is `KafkaAuthenticationFailed`.
async fn authentication_failed(tb: &Testbed, ns: &str, name: &str) -> String {
    wait_condition(
        tb,
        ns,
        name,
        &Cond::ready_false("KafkaAuthenticationFailed").within(Duration::from_secs(60)),
    )
    .await
    .message
}

#[tokio::test]
async fn scram_pipeline_commits_every_offset_and_a_wrong_password_is_an_authentication_failure() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("kafka-scram").await;
    let config = json!({"users": {"pipeline": SCRAM_PASSWORD}});
    let broker = PrivateBroker::spawn_sasl(&tb, &ns, &config, None);
    let topic = "scram";
    broker.create_topic(topic, 2);
    let scram = |mechanism: &str, password: &str| {
        properties(&[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", mechanism),
            ("sasl.username", "pipeline"),
            ("sasl.password", password),
        ])
    };
    let produced = produce_data_with(
        &broker.bootstrap,
        scram("SCRAM-SHA-256", SCRAM_PASSWORD),
        DataSpec::new(topic, 2, 3000),
    )
    .await;

    // SASL_SSL: the same front behind TLS (with the client certificate its CA signed), and
    // each mechanism with users: a client reads the topic's metadata through it.
    let pki_dir = tb.dir.join(format!("{ns}-pki"));
    let pki = TestPki::generate(&pki_dir, &["127.0.0.1"]).unwrap();
    let ssl_broker = PrivateBroker::spawn_sasl(&tb, &format!("{ns}-ssl"), &config, Some(&pki_dir));
    ssl_broker.create_topic("over-tls", 1);
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let mut props = scram(mechanism, SCRAM_PASSWORD);
        props[0].1 = "sasl_ssl".into();
        props.extend(properties(&[
            ("ssl.ca.pem", &pki.ca),
            ("ssl.certificate.pem", &pki.client.certificate),
            ("ssl.key.pem", &pki.client.key),
        ]));
        let sent = produce_data_with(
            &ssl_broker.bootstrap,
            props,
            DataSpec::new("over-tls", 1, 10),
        )
        .await;
        assert_eq!(sent.total(), 10, "{mechanism} over SASL_SSL");
    }

    create_secrets(
        &tb,
        &ns,
        &[
            (
                "kafka-user",
                json!({"username": "pipeline", "password": SCRAM_PASSWORD}),
            ),
            (
                "wrong",
                json!({"username": "pipeline", "password": WRONG_PASSWORD}),
            ),
        ],
    )
    .await;
    let _operator = spawn_operator(&tb, &ns, "op");
    let blocks = blocks_dir(&tb, &ns);
    let mut bp = pipeline(
        "p",
        topic,
        &broker.bootstrap,
        &file_url(&blocks),
        json!({"maxRecords": 500}),
    );
    with_sasl(
        &mut bp,
        json!({
            "mechanism": "SCRAM-SHA-512",
            "usernameSecretRef": {"name": "kafka-user", "key": "username"},
            "passwordSecretRef": {"name": "kafka-user", "key": "password"},
        }),
    );
    apply_pipeline(&tb, &ns, &bp).await;
    let _builder = spawn_builder_with(&tb, &ns, "p", "b0", |cmd| {
        cmd.env(
            "BLOCKSMITH_KAFKA_PROPERTIES",
            "security.protocol=sasl_plaintext,sasl.mechanism=SCRAM-SHA-512",
        )
        .env("BLOCKSMITH_KAFKA_SASL_USERNAME", "pipeline")
        .env("BLOCKSMITH_KAFKA_SASL_PASSWORD", SCRAM_PASSWORD);
    });
    let committed = wait_committed(&tb, &ns, "p", &high_watermarks(&produced)).await;
    audit_exact(&tb, &blocks, &produced, &committed);

    // A wrong password: the brokers refuse it (SASL_AUTHENTICATION_FAILED), and the pipeline
    // says so, naming the fields and the Secret to check.
    let mut wrong = pipeline(
        "wrong",
        topic,
        &broker.bootstrap,
        &file_url(&blocks_dir(&tb, &ns)),
        json!({}),
    );
    with_sasl(
        &mut wrong,
        json!({
            "mechanism": "SCRAM-SHA-256",
            "usernameSecretRef": {"name": "wrong", "key": "username"},
            "passwordSecretRef": {"name": "wrong", "key": "password"},
        }),
    );
    apply_pipeline(&tb, &ns, &wrong).await;
    let message = authentication_failed(&tb, &ns, "wrong").await;
    for expected in ["spec.kafka.sasl", r#"secret "wrong""#, "SCRAM-SHA-256"] {
        assert!(message.contains(expected), "{expected:?} not in {message}");
    }

    let seen = everything_shown(&tb, &ns, &["op", "b0"]);
    assert!(seen.contains("KafkaAuthenticationFailed") && seen.len() > 10_000);
    for (what, secret) in [
        ("the SCRAM password", SCRAM_PASSWORD),
        ("the wrong password", WRONG_PASSWORD),
    ] {
        assert!(
            !seen.contains(secret),
            "{what} is in a log, a status or an Event"
        );
    }
}

#[tokio::test]
async fn oauthbearer_pipeline_refreshes_its_tokens_and_commits_every_offset() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("kafka-oauth").await;
    let signer = Signer::generate("https://sso.blocksmith.test/realms/kafka", "kafka-brokers");
    let endpoint =
        TokenEndpoint::spawn(signer.clone(), "blocksmith", CLIENT_SECRET, TOKEN_LIFETIME).await;
    let config = json!({
        "users": {"admin": SCRAM_PASSWORD},
        "oauthbearer": signer.verification(),
    });
    let broker = PrivateBroker::spawn_sasl(&tb, &ns, &config, None);
    let topic = "oauth";
    broker.create_topic(topic, 2);
    // The test's own producer authenticates with a password, so that every token issued is
    // one of the pipeline's.
    let producer = properties(&[
        ("security.protocol", "sasl_plaintext"),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", "admin"),
        ("sasl.password", SCRAM_PASSWORD),
    ]);
    let batch = |seed: u64| DataSpec {
        seed,
        ..DataSpec::new(topic, 2, 1000)
    };
    let mut produced = produce_data_with(&broker.bootstrap, producer.clone(), batch(1)).await;

    create_secrets(
        &tb,
        &ns,
        &[
            (
                "oauth-client",
                json!({"client-id": "blocksmith", "client-secret": CLIENT_SECRET}),
            ),
            (
                "wrong-client",
                json!({"client-id": "blocksmith", "client-secret": WRONG_CLIENT_SECRET}),
            ),
        ],
    )
    .await;
    let _operator = spawn_operator(&tb, &ns, "op");
    let oauth = |secret: &str| {
        json!({
            "mechanism": "OAUTHBEARER",
            "oauthbearer": {
                "tokenEndpointUrl": endpoint.url,
                "clientIdSecretRef": {"name": secret, "key": "client-id"},
                "clientSecretSecretRef": {"name": secret, "key": "client-secret"},
                "scope": "kafka",
                "extensions": {"logicalCluster": "lkc-test"},
            },
        })
    };
    let blocks = blocks_dir(&tb, &ns);
    let mut bp = pipeline(
        "p",
        topic,
        &broker.bootstrap,
        &file_url(&blocks),
        json!({"maxRecords": 250}),
    );
    with_sasl(&mut bp, oauth("oauth-client"));
    let start = Instant::now();
    apply_pipeline(&tb, &ns, &bp).await;
    let url = endpoint.url.clone();
    let _builder = spawn_builder_with(&tb, &ns, "p", "b0", |cmd| {
        cmd.env(
            "BLOCKSMITH_KAFKA_PROPERTIES",
            "security.protocol=sasl_plaintext,sasl.mechanism=OAUTHBEARER",
        )
        .env("BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", &url)
        .env("BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_SCOPE", "kafka")
        .env(
            "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
            "logicalCluster=lkc-test",
        )
        .env("BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "blocksmith")
        .env(
            "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
            CLIENT_SECRET,
        );
    });
    let mut committed = wait_committed(&tb, &ns, "p", &high_watermarks(&produced)).await;

    // Two more batches, each after the tokens of the one before have expired: the clients'
    // connections were closed at expiry, and only refreshed tokens get them back.
    for (seed, at) in [(2, 25), (3, 50)] {
        tokio::time::sleep(
            (start + Duration::from_secs(at)).saturating_duration_since(Instant::now()),
        )
        .await;
        let more = produce_data_with(&broker.bootstrap, producer.clone(), batch(seed)).await;
        produced = merge(produced, more);
        committed = wait_committed(&tb, &ns, "p", &high_watermarks(&produced)).await;
    }
    assert!(start.elapsed() >= Duration::from_secs(50));
    audit_exact(&tb, &blocks, &produced, &committed);
    let issued = endpoint.issued();
    let first = issued.first().expect("tokens issued").0;
    let late = issued
        .iter()
        .filter(|(at, _)| at.duration_since(first) > TOKEN_LIFETIME)
        .count();
    assert!(
        issued.len() >= 4 && late >= 2,
        "{} tokens issued, {late} of them after the first had expired",
        issued.len()
    );
    let broker_log =
        std::fs::read_to_string(tb.logs_dir().join(format!("{ns}-broker.log"))).unwrap();
    assert!(
        broker_log.contains("token expired: connection closed"),
        "the front closed no connection at its token's expiry"
    );

    // A wrong client secret: the token endpoint refuses it, so no token reaches the brokers,
    // and the pipeline says authentication failed, naming the OAuth client's fields.
    let refused_before = endpoint.refused();
    let mut wrong = pipeline(
        "wrong",
        topic,
        &broker.bootstrap,
        &file_url(&blocks_dir(&tb, &ns)),
        json!({}),
    );
    with_sasl(&mut wrong, oauth("wrong-client"));
    apply_pipeline(&tb, &ns, &wrong).await;
    let message = authentication_failed(&tb, &ns, "wrong").await;
    for expected in [
        "spec.kafka.sasl.oauthbearer",
        r#"secret "wrong-client""#,
        &endpoint.url,
    ] {
        assert!(message.contains(expected), "{expected:?} not in {message}");
    }
    assert!(endpoint.refused() > refused_before);

    // No credential anywhere a person or a log collector looks: neither client secret nor
    // any token issued.
    let seen = everything_shown(&tb, &ns, &["op", "b0"]);
    assert!(seen.contains("KafkaAuthenticationFailed") && seen.len() > 10_000);
    assert!(!seen.contains(CLIENT_SECRET), "the client secret is shown");
    assert!(
        !seen.contains(WRONG_CLIENT_SECRET),
        "the wrong client secret is shown"
    );
    for (_, token) in endpoint.issued() {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!seen.contains(signature), "a token is shown");
    }
}
