//! What the CRD schema cannot check (or old API servers ignore), checked again by the
//! operator and reported as `InvalidSpec` with the offending field named.

use blocksmith_crds::BlockPipelineSpec;
use blocksmith_crds::domain::parse_duration;
use blocksmith_crds::pipeline::{Compression, SaslMechanism, SaslSpec, SecurityProtocol};

use crate::builders::builder_labels;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("spec.{field}: {problem}")]
pub struct InvalidSpec {
    pub field: &'static str,
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field,
        problem: problem.into(),
    }
}

/// A pipeline's name is a label value on its jobs and builders, which Kubernetes limits to 63
/// characters; a longer one would fail every job create with a 422 the user never sees.
pub fn validate_name(name: &str) -> Result<(), String> {
    const MAX: usize = 63;
    if name.len() > MAX {
        return Err(format!(
            "metadata.name: {} characters, over the {MAX} a label value allows (the name labels \
             the pipeline's jobs and builders): create the pipeline under a shorter name",
            name.len()
        ));
    }
    Ok(())
}

pub fn validate(spec: &BlockPipelineSpec) -> Result<(), InvalidSpec> {
    let k = &spec.kafka;
    if k.bootstrap_servers.trim().is_empty() {
        return Err(invalid(
            "kafka.bootstrapServers",
            "must name at least one host:port",
        ));
    }
    if let Some(bad) = k
        .bootstrap_servers
        .split(',')
        .find(|s| !s.trim().contains(':'))
    {
        return Err(invalid(
            "kafka.bootstrapServers",
            format!("{bad:?} is not host:port"),
        ));
    }
    if k.topic.is_empty()
        || !k
            .topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(invalid(
            "kafka.topic",
            format!("{:?} is not a valid Kafka topic name", k.topic),
        ));
    }
    if let Some(ps) = &k.partitions {
        if ps.is_empty() {
            return Err(invalid(
                "kafka.partitions",
                "when set, must list at least one partition",
            ));
        }
        if let Some(p) = ps.iter().find(|p| **p < 0) {
            return Err(invalid(
                "kafka.partitions",
                format!("partition {p} is negative"),
            ));
        }
    }
    let needs_sasl = matches!(
        k.security_protocol,
        SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
    );
    if needs_sasl != k.sasl.is_some() {
        return Err(invalid(
            "kafka.sasl",
            format!(
                "securityProtocol {} {}",
                k.security_protocol,
                if needs_sasl {
                    "requires spec.kafka.sasl (mechanism and credentials secrets)"
                } else {
                    "does not use spec.kafka.sasl: set securityProtocol to SASL_PLAINTEXT or SASL_SSL, or remove sasl"
                }
            ),
        ));
    }
    if let Some(sasl) = &k.sasl {
        validate_sasl(sasl)?;
    }
    if let Some(tls) = &k.tls {
        let uses_tls = matches!(
            k.security_protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        );
        if tls.certificate_secret_ref.is_some() != tls.key_secret_ref.is_some() {
            return Err(invalid(
                "kafka.tls",
                "a client certificate needs both certificateSecretRef and keySecretRef",
            ));
        }
        if !uses_tls {
            return Err(invalid(
                "kafka.tls",
                format!(
                    "securityProtocol {} does not use TLS: set it to SSL or SASL_SSL, or remove tls",
                    k.security_protocol
                ),
            ));
        }
    }
    let j = &spec.jobs;
    if j.max_records < 1 {
        return Err(invalid("jobs.maxRecords", "must be at least 1"));
    }
    parse_duration(&j.max_age).map_err(|e| invalid("jobs.maxAge", e.to_string()))?;
    if j.max_in_flight_per_partition < 1 {
        return Err(invalid(
            "jobs.maxInFlightPerPartition",
            "must be at least 1",
        ));
    }
    if let Some(max) = j.max_uncommitted_jobs_per_partition
        && max < j.max_in_flight_per_partition
    {
        return Err(invalid(
            "jobs.maxUncommittedJobsPerPartition",
            format!(
                "{max} is below maxInFlightPerPartition ({}): it bounds all jobs not yet \
                 committed, unfinished ones included",
                j.max_in_flight_per_partition
            ),
        ));
    }
    if j.lease_duration_seconds < 3 {
        return Err(invalid("jobs.leaseDurationSeconds", "must be at least 3"));
    }
    if j.backoff_limit < 1 {
        return Err(invalid("jobs.backoffLimit", "must be at least 1"));
    }
    if j.ttl_seconds_after_succeeded < 0 || j.successful_jobs_history_limit < 0 {
        return Err(invalid(
            "jobs",
            "ttlSecondsAfterSucceeded and successfulJobsHistoryLimit must not be negative",
        ));
    }
    let o = &spec.output;
    let scheme = o.url.split("://").next().unwrap_or_default();
    if !o.url.contains("://") || !["s3", "gs", "az", "file"].contains(&scheme) {
        return Err(invalid(
            "output.url",
            format!(
                "{:?}: the scheme must be s3://, gs://, az:// or file://",
                o.url
            ),
        ));
    }
    if o.url
        .split("://")
        .nth(1)
        .is_none_or(|rest| rest.trim_matches('/').is_empty())
    {
        return Err(invalid(
            "output.url",
            format!("{:?} names no bucket or path", o.url),
        ));
    }
    if let Some(level) = o.compression_level {
        if o.compression != Compression::Zstd {
            return Err(invalid(
                "output.compressionLevel",
                "only applies to zstd compression",
            ));
        }
        if !(1..=22).contains(&level) {
            return Err(invalid(
                "output.compressionLevel",
                format!("{level} is outside zstd's 1-22"),
            ));
        }
    }
    if o.row_group_size.is_some_and(|n| n < 1) {
        return Err(invalid("output.rowGroupSize", "must be at least 1"));
    }
    if o.max_record_bytes.is_some_and(|n| n < 1) {
        return Err(invalid("output.maxRecordBytes", "must be at least 1"));
    }
    if let Some(b) = &spec.builders {
        if b.min_replicas < 0 || b.max_replicas < 1 || b.min_replicas > b.max_replicas {
            return Err(invalid(
                "builders",
                format!(
                    "need 0 <= minReplicas ({}) <= maxReplicas ({}), maxReplicas >= 1",
                    b.min_replicas, b.max_replicas
                ),
            ));
        }
        if b.target_queue_depth_per_builder < 1 {
            return Err(invalid(
                "builders.targetQueueDepthPerBuilder",
                "must be at least 1",
            ));
        }
        let own_labels = builder_labels("");
        if let Some(key) = b.pod_labels.keys().find(|k| own_labels.contains_key(*k)) {
            return Err(invalid(
                "builders.podLabels",
                format!("{key:?} is the operator's own label on builder pods; use another key"),
            ));
        }
        if let Some(budget) = &b.pod_disruption_budget
            && budget.max_unavailable.is_some() == budget.min_available.is_some()
        {
            return Err(invalid(
                "builders.podDisruptionBudget",
                "set exactly one of maxUnavailable and minAvailable",
            ));
        }
    }
    Ok(())
}

/// The pipeline's existing jobs must read the topic the spec names. A job's range is an
/// offset range of its topic: the committer and the planner would otherwise take another
/// topic's jobs as covering this topic's offsets, committing offsets that were never
/// written and skipping them. So a changed topic stops committing and planning until the
/// spec is changed back or the old topic's jobs are gone. `job_topics` is the topic of each
/// existing job.
pub fn validate_topic_unchanged<'a>(
    pipeline: &str,
    spec: &BlockPipelineSpec,
    job_topics: impl IntoIterator<Item = &'a str>,
) -> Result<(), InvalidSpec> {
    let topic = spec.kafka.topic.as_str();
    let Some((jobs, others)) = others(topic, job_topics) else {
        return Ok(());
    };
    Err(invalid(
        "kafka.topic",
        format!(
            "changed to {topic:?} while {jobs} job(s) of topic {others} exist; one topic's \
             offsets cannot be committed for another, so nothing is committed or planned. Set \
             it back, or create a new pipeline for {topic:?}. {}",
            delete_jobs_to_move(pipeline, &format!("offsets of {others}"))
        ),
    ))
}

/// The same for the Kafka cluster: bootstrap servers may change to other brokers of the same
/// cluster, but a topic of the same name in another cluster has other offsets. `cluster` is
/// the id the brokers report now (`None`: they report none, nothing to check); `job_clusters`
/// the id each existing job recorded (`None` for jobs that recorded none).
pub fn validate_cluster_unchanged<'a>(
    pipeline: &str,
    cluster: Option<&str>,
    job_clusters: impl IntoIterator<Item = Option<&'a str>>,
) -> Result<(), InvalidSpec> {
    let Some(cluster) = cluster else {
        return Ok(());
    };
    let Some((jobs, others)) = others(cluster, job_clusters.into_iter().flatten()) else {
        return Ok(());
    };
    Err(invalid(
        "kafka.bootstrapServers",
        format!(
            "now reaches Kafka cluster {cluster:?} while {jobs} job(s) of cluster {others} \
             exist; one cluster's offsets cannot be committed for another, so nothing is \
             committed or planned. Set it back to a broker of cluster {others}, or create a new \
             pipeline for the other cluster, with its own spec.output.url (block keys name the \
             topic, partition and offsets, not the cluster). {}",
            delete_jobs_to_move(pipeline, &format!("offsets in cluster {others}"))
        ),
    ))
}

/// How many of `values` differ from `current`, and those values, quoted and deduplicated.
fn others<'a>(current: &str, values: impl IntoIterator<Item = &'a str>) -> Option<(usize, String)> {
    let mut others: Vec<&str> = values.into_iter().filter(|v| *v != current).collect();
    if others.is_empty() {
        return None;
    }
    let count = others.len();
    others.sort_unstable();
    others.dedup();
    let quoted: Vec<String> = others.iter().map(|v| format!("{v:?}")).collect();
    Some((count, quoted.join(", ")))
}

fn delete_jobs_to_move(pipeline: &str, lost: &str) -> String {
    format!(
        "To move this pipeline anyway, delete its jobs (kubectl delete blockjobs -l \
         blocksmith.io/pipeline={pipeline}); {lost} not committed by then are never written"
    )
}

/// The credentials `sasl.mechanism` needs, and none it does not use.
fn validate_sasl(sasl: &SaslSpec) -> Result<(), InvalidSpec> {
    let oauth = sasl.mechanism == SaslMechanism::OAuthBearer;
    let m = sasl.mechanism;
    if oauth {
        for (field, set) in [
            (
                "kafka.sasl.usernameSecretRef",
                sasl.username_secret_ref.is_some(),
            ),
            (
                "kafka.sasl.passwordSecretRef",
                sasl.password_secret_ref.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(
                    field,
                    format!(
                        "mechanism {m} takes no username or password: remove it (the OAuth client is in spec.kafka.sasl.oauthbearer)"
                    ),
                ));
            }
        }
        let Some(o) = &sasl.oauthbearer else {
            return Err(invalid(
                "kafka.sasl.oauthbearer",
                format!(
                    "mechanism {m} requires spec.kafka.sasl.oauthbearer (tokenEndpointUrl, clientIdSecretRef, clientSecretSecretRef)"
                ),
            ));
        };
        match url::Url::parse(&o.token_endpoint_url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {}
            _ => {
                return Err(invalid(
                    "kafka.sasl.oauthbearer.tokenEndpointUrl",
                    format!(
                        "{:?} is not an https:// (or http://) URL",
                        o.token_endpoint_url
                    ),
                ));
            }
        }
        for (field, selector) in [
            (
                "kafka.sasl.oauthbearer.clientIdSecretRef",
                &o.client_id_secret_ref,
            ),
            (
                "kafka.sasl.oauthbearer.clientSecretSecretRef",
                &o.client_secret_secret_ref,
            ),
        ] {
            if selector.name.is_empty() || selector.key.is_empty() {
                return Err(invalid(field, "needs a secret name and key"));
            }
        }
        if let Some(scope) = &o.scope
            && scope.trim().is_empty()
        {
            return Err(invalid(
                "kafka.sasl.oauthbearer.scope",
                "is empty: remove it, or name the scope",
            ));
        }
        // librdkafka reads `key=value,key=value`; KIP-342 keys are letters only, and the
        // key `auth` is reserved.
        for (key, value) in &o.extensions {
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphabetic()) || key == "auth" {
                return Err(invalid(
                    "kafka.sasl.oauthbearer.extensions",
                    format!("{key:?} is not a SASL extension name (letters only, not \"auth\")"),
                ));
            }
            if value.contains([',', '=', '\u{1}']) {
                return Err(invalid(
                    "kafka.sasl.oauthbearer.extensions",
                    format!("the value of {key:?} has a ',', '=' or control character"),
                ));
            }
        }
    } else {
        if sasl.oauthbearer.is_some() {
            return Err(invalid(
                "kafka.sasl.oauthbearer",
                format!(
                    "mechanism {m} does not use it: set mechanism to OAUTHBEARER, or remove oauthbearer"
                ),
            ));
        }
        for (field, set) in [
            (
                "kafka.sasl.usernameSecretRef",
                sasl.username_secret_ref.is_some(),
            ),
            (
                "kafka.sasl.passwordSecretRef",
                sasl.password_secret_ref.is_some(),
            ),
        ] {
            if !set {
                return Err(invalid(field, format!("mechanism {m} requires it")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use blocksmith_crds::domain::LABEL_PIPELINE;
    use blocksmith_crds::pipeline::{BuildersSpec, DisruptionBudgetSpec, TlsSpec};
    use k8s_openapi::api::core::v1::SecretKeySelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;

    fn spec() -> BlockPipelineSpec {
        serde_json::from_value(serde_json::json!({
            "kafka": {"bootstrapServers": "k:9092", "topic": "orders"},
            "output": {"url": "s3://bucket/prefix"}
        }))
        .unwrap()
    }

    fn builders(s: &mut BlockPipelineSpec) -> &mut BuildersSpec {
        s.builders.get_or_insert_with(|| {
            serde_json::from_value(serde_json::json!({"image": "img:1"})).unwrap()
        })
    }

    fn budget(
        max_unavailable: Option<IntOrString>,
        min_available: Option<IntOrString>,
    ) -> DisruptionBudgetSpec {
        DisruptionBudgetSpec {
            max_unavailable,
            min_available,
        }
    }

    fn tls(certificate: Option<(&str, &str)>, key: Option<(&str, &str)>) -> TlsSpec {
        let selector = |(name, key): (&str, &str)| SecretKeySelector {
            name: name.into(),
            key: key.into(),
            ..Default::default()
        };
        TlsSpec {
            ca_secret_ref: None,
            certificate_secret_ref: certificate.map(selector),
            key_secret_ref: key.map(selector),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(validate(&spec()), Ok(()));
        let mut with_builders = spec();
        builders(&mut with_builders).pod_disruption_budget =
            Some(budget(Some(IntOrString::String("25%".into())), None));
        assert_eq!(validate(&with_builders), Ok(()));
        let mut mutual_tls = spec();
        mutual_tls.kafka.security_protocol = SecurityProtocol::Ssl;
        mutual_tls.kafka.tls = Some(tls(Some(("c", "tls.crt")), Some(("c", "tls.key"))));
        assert_eq!(validate(&mutual_tls), Ok(()));
    }

    #[test]
    fn each_rule_names_its_field() {
        type Mutation = fn(&mut BlockPipelineSpec);
        let cases: Vec<(Mutation, &str)> = vec![
            (
                |s| s.kafka.bootstrap_servers = "nohost".into(),
                "kafka.bootstrapServers",
            ),
            (|s| s.kafka.topic = "bad topic".into(), "kafka.topic"),
            (|s| s.kafka.partitions = Some(vec![]), "kafka.partitions"),
            (
                |s| s.kafka.security_protocol = SecurityProtocol::SaslSsl,
                "kafka.sasl",
            ),
            (
                |s| {
                    s.kafka.security_protocol = SecurityProtocol::Ssl;
                    s.kafka.tls = Some(tls(None, Some(("client", "tls.key"))));
                },
                "kafka.tls",
            ),
            (
                |s| {
                    s.kafka.tls = Some(tls(
                        Some(("client", "tls.crt")),
                        Some(("client", "tls.key")),
                    ))
                },
                "kafka.tls",
            ),
            (|s| s.jobs.max_records = 0, "jobs.maxRecords"),
            (|s| s.jobs.max_age = "5 minutes".into(), "jobs.maxAge"),
            (
                |s| s.jobs.max_in_flight_per_partition = 0,
                "jobs.maxInFlightPerPartition",
            ),
            (
                |s| s.jobs.max_uncommitted_jobs_per_partition = Some(3),
                "jobs.maxUncommittedJobsPerPartition",
            ),
            (
                |s| s.jobs.lease_duration_seconds = 1,
                "jobs.leaseDurationSeconds",
            ),
            (|s| s.jobs.backoff_limit = 0, "jobs.backoffLimit"),
            (|s| s.output.url = "ftp://x/y".into(), "output.url"),
            (|s| s.output.url = "s3://".into(), "output.url"),
            (
                |s| s.output.compression_level = Some(30),
                "output.compressionLevel",
            ),
            (
                |s| {
                    s.output.compression = Compression::Snappy;
                    s.output.compression_level = Some(1)
                },
                "output.compressionLevel",
            ),
            (|s| s.output.row_group_size = Some(0), "output.rowGroupSize"),
            (
                |s| s.output.max_record_bytes = Some(0),
                "output.maxRecordBytes",
            ),
            (
                |s| {
                    builders(s)
                        .pod_labels
                        .insert(LABEL_PIPELINE.into(), "other".into());
                },
                "builders.podLabels",
            ),
            (
                |s| builders(s).pod_disruption_budget = Some(budget(None, None)),
                "builders.podDisruptionBudget",
            ),
            (
                |s| {
                    builders(s).pod_disruption_budget =
                        Some(budget(Some(IntOrString::Int(1)), Some(IntOrString::Int(1))))
                },
                "builders.podDisruptionBudget",
            ),
        ];
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = validate(&s).expect_err(field);
            assert_eq!(err.field, field, "{err}");
            assert!(
                err.to_string().starts_with(&format!("spec.{field}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_name_longer_than_a_label_value_is_invalid() {
        assert_eq!(validate_name(&"p".repeat(63)), Ok(()));
        let err = validate_name(&"p".repeat(64)).unwrap_err();
        assert!(
            err.starts_with("metadata.name: 64 characters, over the 63"),
            "{err}"
        );
    }

    #[test]
    fn sasl_messages_use_the_protocol_as_written_in_the_spec() {
        let mut s = spec();
        s.kafka.security_protocol = SecurityProtocol::SaslSsl;
        let err = validate(&s).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.kafka.sasl: securityProtocol SASL_SSL requires spec.kafka.sasl"),
            "{err}"
        );
    }

    #[test]
    fn jobs_of_another_topic_stop_the_pipeline_with_the_way_out() {
        let s = spec();
        assert_eq!(validate_topic_unchanged("p", &s, []), Ok(()));
        assert_eq!(
            validate_topic_unchanged("p", &s, ["orders", "orders"]),
            Ok(())
        );
        let err =
            validate_topic_unchanged("p", &s, ["orders", "payments", "payments"]).unwrap_err();
        assert_eq!(err.field, "kafka.topic");
        let msg = err.to_string();
        assert!(
            msg.starts_with("spec.kafka.topic: changed to \"orders\""),
            "{msg}"
        );
        assert!(msg.contains("2 job(s) of topic \"payments\""), "{msg}");
        assert!(msg.contains("create a new pipeline"), "{msg}");
        assert!(
            msg.contains("kubectl delete blockjobs -l blocksmith.io/pipeline=p)"),
            "{msg}"
        );
    }

    #[test]
    fn jobs_of_another_cluster_stop_the_pipeline_with_the_way_out() {
        let jobs = [Some("c1"), None, Some("c1")];
        assert_eq!(validate_cluster_unchanged("p", Some("c1"), jobs), Ok(()));
        assert_eq!(validate_cluster_unchanged("p", None, jobs), Ok(()));
        assert_eq!(validate_cluster_unchanged("p", Some("c2"), [None]), Ok(()));
        let err = validate_cluster_unchanged("p", Some("c2"), jobs).unwrap_err();
        assert_eq!(err.field, "kafka.bootstrapServers");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "spec.kafka.bootstrapServers: now reaches Kafka cluster \"c2\" while 2 job(s) of cluster \"c1\" exist"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("Set it back to a broker of cluster \"c1\""),
            "{msg}"
        );
        assert!(msg.contains("with its own spec.output.url"), "{msg}");
        assert!(
            msg.contains("kubectl delete blockjobs -l blocksmith.io/pipeline=p)"),
            "{msg}"
        );
    }

    fn sasl(mechanism: &str, extra: serde_json::Value) -> BlockPipelineSpec {
        let mut s = spec();
        s.kafka.security_protocol = SecurityProtocol::SaslSsl;
        let mut sasl = serde_json::json!({"mechanism": mechanism});
        sasl.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s.kafka.sasl = Some(serde_json::from_value(sasl).unwrap());
        s
    }

    #[test]
    fn each_mechanism_takes_its_own_credentials_and_names_the_missing_field() {
        let user = serde_json::json!({"name": "k", "key": "user"});
        let password = serde_json::json!({"name": "k", "key": "password"});
        let oauth = |url: &str| {
            serde_json::json!({
                "tokenEndpointUrl": url,
                "clientIdSecretRef": {"name": "o", "key": "id"},
                "clientSecretSecretRef": {"name": "o", "key": "secret"},
                "scope": "kafka",
                "extensions": {"logicalCluster": "lkc-1", "identityPoolId": "pool-2"},
            })
        };
        let ok = [
            sasl(
                "SCRAM-SHA-512",
                serde_json::json!({"usernameSecretRef": user, "passwordSecretRef": password}),
            ),
            sasl(
                "OAUTHBEARER",
                serde_json::json!({"oauthbearer": oauth("https://sso.example.com/token")}),
            ),
        ];
        for s in ok {
            assert_eq!(validate(&s), Ok(()));
        }
        let mut bad_extension = oauth("https://sso/token");
        bad_extension["extensions"] = serde_json::json!({"auth": "x"});
        let mut comma = oauth("https://sso/token");
        comma["extensions"] = serde_json::json!({"pool": "a,b"});
        let mut empty_scope = oauth("https://sso/token");
        empty_scope["scope"] = serde_json::json!(" ");
        let cases = [
            (
                sasl("PLAIN", serde_json::json!({"passwordSecretRef": password})),
                "kafka.sasl.usernameSecretRef",
            ),
            (
                sasl(
                    "SCRAM-SHA-256",
                    serde_json::json!({"usernameSecretRef": user}),
                ),
                "kafka.sasl.passwordSecretRef",
            ),
            (
                sasl(
                    "PLAIN",
                    serde_json::json!({"usernameSecretRef": user, "passwordSecretRef": password,
                                       "oauthbearer": oauth("https://sso/token")}),
                ),
                "kafka.sasl.oauthbearer",
            ),
            (
                sasl("OAUTHBEARER", serde_json::json!({})),
                "kafka.sasl.oauthbearer",
            ),
            (
                sasl(
                    "OAUTHBEARER",
                    serde_json::json!({"oauthbearer": oauth("https://sso/token"), "usernameSecretRef": user}),
                ),
                "kafka.sasl.usernameSecretRef",
            ),
            (
                sasl(
                    "OAUTHBEARER",
                    serde_json::json!({"oauthbearer": oauth("sso/token")}),
                ),
                "kafka.sasl.oauthbearer.tokenEndpointUrl",
            ),
            (
                sasl(
                    "OAUTHBEARER",
                    serde_json::json!({"oauthbearer": oauth("ftp://sso/token")}),
                ),
                "kafka.sasl.oauthbearer.tokenEndpointUrl",
            ),
            (
                sasl(
                    "OAUTHBEARER",
                    serde_json::json!({"oauthbearer": bad_extension}),
                ),
                "kafka.sasl.oauthbearer.extensions",
            ),
            (
                sasl("OAUTHBEARER", serde_json::json!({"oauthbearer": comma})),
                "kafka.sasl.oauthbearer.extensions",
            ),
            (
                sasl(
                    "OAUTHBEARER",
                    serde_json::json!({"oauthbearer": empty_scope}),
                ),
                "kafka.sasl.oauthbearer.scope",
            ),
        ];
        for (s, field) in cases {
            let err = validate(&s).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    /// Every pipeline in `examples/` is one the schema takes and the operator accepts.
    #[test]
    fn the_example_pipelines_are_valid() {
        use serde::Deserialize;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("pipeline") {
                continue;
            }
            // examples/pipeline.yaml goes through envsubst.
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("${KAFKA_BOOTSTRAP}", "kafka:9092")
                .replace("${OUTPUT_URL}", "s3://bucket/orders");
            // Some files hold a Secret before the pipeline.
            let mut pipelines = 0;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value =
                    serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
                if value["kind"] != "BlockPipeline" {
                    continue;
                }
                let bp: blocksmith_crds::BlockPipeline =
                    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{name}: {e}"));
                validate(&bp.spec).unwrap_or_else(|e| panic!("{name}: {e}"));
                pipelines += 1;
            }
            assert_eq!(pipelines, 1, "{name}");
            checked.push(name);
        }
        assert!(
            checked.iter().any(|n| n == "pipeline-oauthbearer.yaml") && checked.len() >= 7,
            "{checked:?}"
        );
    }
}
