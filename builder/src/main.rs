use std::time::Duration;

use blocksmith_builder::lease::LeaseClient;
use blocksmith_builder::metrics::Metrics;
use blocksmith_builder::reader::ReaderConfig;
use blocksmith_builder::runner::BuildSettings;
use blocksmith_builder::store::{OpenStores, UploadSettings};
use blocksmith_builder::worker::{DEFAULT_CONCURRENT_JOBS, Worker};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// blocksmith builder: claims BlockJobs, reads exactly their Kafka offset range, and writes
/// one Parquet block (data, then a create-only manifest) per job to object storage.
///
/// Object-store credentials come from the usual environment variables (AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT, AWS_ALLOW_HTTP; GOOGLE_SERVICE_ACCOUNT_KEY;
/// AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, ...). Kafka credentials too, from the
/// environment only: BLOCKSMITH_KAFKA_SASL_USERNAME, BLOCKSMITH_KAFKA_SASL_PASSWORD,
/// BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID, BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET
/// (with BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, _SCOPE and _EXTENSIONS),
/// BLOCKSMITH_KAFKA_SSL_CA_PEM, BLOCKSMITH_KAFKA_SSL_CERTIFICATE_PEM, BLOCKSMITH_KAFKA_SSL_KEY_PEM.
/// The Kubernetes API is reached in-cluster or through KUBECONFIG.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Namespace whose BlockJobs this builder serves.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Serve only this pipeline's jobs (default: every pipeline in the namespace).
    #[arg(long, env = "BLOCKSMITH_PIPELINE")]
    pipeline: Option<String>,
    /// Unique identity: the lease holder and field manager (default: host-pid-random).
    #[arg(long, env = "BLOCKSMITH_BUILDER_ID")]
    identity: Option<String>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, env = "BLOCKSMITH_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    metrics_addr: std::net::SocketAddr,
    /// Extra librdkafka properties, `key=value` (security.protocol, sasl.username, ...).
    #[arg(
        long = "kafka-property",
        env = "BLOCKSMITH_KAFKA_PROPERTIES",
        value_delimiter = ','
    )]
    kafka_properties: Vec<String>,
    /// Fail the read when Kafka delivers nothing for this many seconds.
    #[arg(long, env = "BLOCKSMITH_KAFKA_IDLE_TIMEOUT", default_value_t = 60)]
    kafka_idle_timeout: u64,
    /// Upload data objects larger than this many bytes in parts.
    #[arg(long, env = "BLOCKSMITH_MULTIPART_THRESHOLD", default_value_t = 16 << 20)]
    multipart_threshold: u64,
    /// Multipart part size in bytes (S3 requires at least 5 MiB).
    #[arg(long, env = "BLOCKSMITH_PART_SIZE", default_value_t = 8 << 20)]
    part_size: usize,
    /// Parts uploaded concurrently.
    #[arg(long, env = "BLOCKSMITH_PARTS_IN_FLIGHT", default_value_t = 4)]
    parts_in_flight: usize,
    /// On SIGTERM, how long the current job may still run before it is released.
    #[arg(long, env = "BLOCKSMITH_GRACE_PERIOD", default_value_t = 25)]
    grace_period: u64,
    /// Jobs this builder builds at once, each claimed, leased and reported on its own: one
    /// job's reading overlaps another's encoding, fsync or upload. Memory per job adds up.
    #[arg(long, env = "BLOCKSMITH_CONCURRENT_JOBS", default_value_t = DEFAULT_CONCURRENT_JOBS, value_parser = clap::value_parser!(u8).range(1..=16))]
    concurrent_jobs: u8,
}

/// Kafka credentials, taken from the environment only (the operator sets them from the
/// pipeline's Secrets): a command line is visible to every process on the node. The OAuth
/// settings that are no secret come from the environment too, as values of their own (a URL
/// or an extension may hold the comma that separates `--kafka-property` values).
const KAFKA_CREDENTIALS: [(&str, &str); 10] = [
    ("BLOCKSMITH_KAFKA_SASL_USERNAME", "sasl.username"),
    ("BLOCKSMITH_KAFKA_SASL_PASSWORD", "sasl.password"),
    (
        "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
        "sasl.oauthbearer.token.endpoint.url",
    ),
    (
        "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
        "sasl.oauthbearer.client.id",
    ),
    (
        "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
        "sasl.oauthbearer.client.secret",
    ),
    (
        "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_SCOPE",
        "sasl.oauthbearer.scope",
    ),
    (
        "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
        "sasl.oauthbearer.extensions",
    ),
    ("BLOCKSMITH_KAFKA_SSL_CA_PEM", "ssl.ca.pem"),
    (
        "BLOCKSMITH_KAFKA_SSL_CERTIFICATE_PEM",
        "ssl.certificate.pem",
    ),
    ("BLOCKSMITH_KAFKA_SSL_KEY_PEM", "ssl.key.pem"),
];

/// librdkafka properties from `--kafka-property`, then the credentials `env` holds. A token
/// endpoint selects librdkafka's OIDC client-credentials grant, which fetches the token and
/// refreshes it before it expires.
fn kafka_properties(
    args: &Args,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut properties = Vec::new();
    for kv in &args.kafka_properties {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--kafka-property {kv:?}: expected key=value"))?;
        properties.push((k.trim().into(), v.trim().into()));
    }
    for (variable, property) in KAFKA_CREDENTIALS {
        if let Some(value) = env(variable) {
            if property == "sasl.oauthbearer.token.endpoint.url" {
                properties.push(("sasl.oauthbearer.method".into(), "oidc".into()));
            }
            properties.push((property.into(), value));
        }
    }
    Ok(properties)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    blocksmith_runtime::init_logging();
    let args = Args::parse();
    let kafka = kafka_properties(&args, |name| std::env::var(name).ok())?;
    let client = kube::Client::try_default().await?;
    let metrics = Metrics::default();
    tokio::spawn(metrics.clone().serve(args.metrics_addr));

    let identity = args.identity.unwrap_or_else(|| {
        format!(
            "builder-{}-{:04x}",
            blocksmith_runtime::identity::host_pid(),
            rand_suffix()
        )
    });
    let mut reader = ReaderConfig::new(String::new());
    reader.idle_timeout = Duration::from_secs(args.kafka_idle_timeout);
    reader.extra = kafka;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        blocksmith_runtime::shutdown_signal().await;
        info!("shutdown requested: no new claims");
        on_signal.cancel();
    });
    Worker {
        client,
        lease: LeaseClient::new(&identity, metrics.clone()),
        namespace: args.namespace,
        pipeline: args.pipeline,
        settings: BuildSettings {
            reader,
            upload: UploadSettings {
                multipart_threshold: args.multipart_threshold,
                part_size: args.part_size,
                parts_in_flight: args.parts_in_flight.max(1),
            },
            stores: OpenStores::default(),
        },
        metrics,
        shutdown,
        concurrent_jobs: args.concurrent_jobs.into(),
        grace: Duration::from_secs(args.grace_period),
    }
    .run()
    .await
}

fn rand_suffix() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id()) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_environment_only() {
        let args = Args::parse_from([
            "blocksmith-builder",
            "--namespace",
            "n",
            "--pipeline",
            "p",
            "--kafka-property",
            "security.protocol=sasl_ssl,sasl.mechanism=PLAIN",
        ]);
        let env = |name: &str| match name {
            "BLOCKSMITH_KAFKA_SASL_USERNAME" => Some("u".to_string()),
            "BLOCKSMITH_KAFKA_SASL_PASSWORD" => Some("secret".to_string()),
            "BLOCKSMITH_KAFKA_SSL_KEY_PEM" => Some("key".to_string()),
            _ => None,
        };
        assert_eq!(
            kafka_properties(&args, env).unwrap(),
            [
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "u"),
                ("sasl.password", "secret"),
                ("ssl.key.pem", "key"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        // An OAuth client: librdkafka's OIDC grant, the comma in the URL kept.
        let oauth = Args::parse_from([
            "blocksmith-builder",
            "--kafka-property",
            "security.protocol=sasl_ssl,sasl.mechanism=OAUTHBEARER",
        ]);
        let env = |name: &str| {
            let value = match name {
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL" => "https://sso/t?a=1,2",
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_ID" => "id",
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET" => "shh",
                "BLOCKSMITH_KAFKA_SASL_OAUTHBEARER_EXTENSIONS" => "a=1,b=2",
                _ => return None,
            };
            Some(value.to_string())
        };
        assert_eq!(
            kafka_properties(&oauth, env).unwrap(),
            [
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", "OAUTHBEARER"),
                ("sasl.oauthbearer.method", "oidc"),
                ("sasl.oauthbearer.token.endpoint.url", "https://sso/t?a=1,2"),
                ("sasl.oauthbearer.client.id", "id"),
                ("sasl.oauthbearer.client.secret", "shh"),
                ("sasl.oauthbearer.extensions", "a=1,b=2"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let bad = Args::parse_from(["blocksmith-builder", "--kafka-property", "novalue"]);
        assert!(kafka_properties(&bad, |_| None).is_err());
        // No flag takes a credential.
        for flag in [
            "--kafka-sasl-password",
            "--kafka-sasl-username",
            "--kafka-ssl-key-pem",
            "--kafka-sasl-oauthbearer-client-secret",
        ] {
            assert!(
                Args::try_parse_from(["blocksmith-builder", flag, "x"]).is_err(),
                "{flag}"
            );
        }
    }
}
