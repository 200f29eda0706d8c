//! The testbed's servers are real: CRDs install, SSA leases conflict, Kafka watermarks and
//! group commits are exact, S3 does put/get/multipart and rejects a wrong secret.

use std::time::Duration;

use blocksmith_crds::{BlockJob, BlockPipeline};
use blocksmith_e2e::Testbed;
use blocksmith_e2e::datagen::{DataSpec, produce};
use blocksmith_e2e::scenario::{bare_job, lease_holder, lease_patch};
use kube::api::{Api, PatchParams, PostParams};
use object_store::{ObjectStore, ObjectStoreExt};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[tokio::test]
async fn crds_are_installed_and_kubectl_lists_them() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("smoke-crds").await;
    Api::<BlockPipeline>::namespaced(tb.client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("list blockpipelines");
    // By the kinds' short names, then by their category.
    for (resources, context) in [("bp,bj", ""), ("blocksmith", "category `blocksmith`: ")] {
        let out = std::process::Command::new("kubectl")
            .args(["get", resources, "-n", &ns])
            .output()
            .expect("kubectl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{context}{stderr}");
    }
}

#[track_caller]
fn assert_conflict(err: &kube::Error) {
    assert!(matches!(err, kube::Error::Api(e) if e.code == 409), "{err}");
}

/// Job `j`'s lease, applied for `holder` with the field manager of `pp`.
async fn claim(jobs: &Api<BlockJob>, pp: &PatchParams, holder: &str) -> kube::Result<BlockJob> {
    jobs.patch_status("j", pp, &lease_patch(holder)).await
}

#[tokio::test]
async fn server_side_apply_fences_lease_holders() {
    let tb = Testbed::get().await;
    let ns = tb.namespace("smoke-ssa").await;
    let jobs = Api::<BlockJob>::namespaced(tb.client.clone(), &ns);
    let job = bare_job("j");
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create job");

    let a = PatchParams::apply("builder-a");
    let b = PatchParams::apply("builder-b");
    claim(&jobs, &a, "builder-a").await.expect("a claims");
    let err = claim(&jobs, &b, "builder-b")
        .await
        .expect_err("b must conflict");
    assert_conflict(&err);
    assert!(
        err.to_string().contains("builder-a"),
        "conflict names the owner: {err}"
    );
    claim(&jobs, &a, "builder-a-renewed")
        .await
        .expect("a renews");
    claim(&jobs, &b.clone().force(), "builder-b")
        .await
        .expect("b forces");
    let err = claim(&jobs, &a, "builder-a-late")
        .await
        .expect_err("a is fenced out");
    assert_conflict(&err);
    let got = jobs.get_status("j").await.unwrap();
    assert_eq!(lease_holder(&got), Some("builder-b"));
}

#[tokio::test]
async fn kafka_watermarks_and_group_commits_are_exact() {
    let tb = Testbed::get().await;
    let topic = tb.topic("smoke-kafka", 3);
    let bootstrap = tb.kafka_bootstrap.clone();
    let t = topic.clone();
    let produced =
        tokio::task::spawn_blocking(move || produce(&bootstrap, &DataSpec::new(&t, 3, 1000)))
            .await
            .unwrap()
            .expect("produce");
    assert_eq!(produced.total(), 1000);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &tb.kafka_bootstrap)
        .set("group.id", "smoke-group")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(10);
    for (p, (count, high)) in &produced.partitions {
        let (low, hw) = consumer.fetch_watermarks(&topic, *p, timeout).unwrap();
        assert_eq!((low, hw), (0, *high), "partition {p}");
        assert_eq!(*count as i64, hw, "partition {p}: one offset per record");
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 1, Offset::Offset(123))
        .unwrap();
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit without joining the group");
    let mut query = TopicPartitionList::new();
    query.add_partition(&topic, 1);
    let committed = consumer.committed_offsets(query, timeout).unwrap();
    assert_eq!(
        committed.find_partition(&topic, 1).unwrap().offset(),
        Offset::Offset(123)
    );
}

fn s3(tb: &Testbed, secret: Option<&str>) -> object_store::aws::AmazonS3 {
    let mut b = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&tb.s3_bucket)
        .with_endpoint(&tb.s3_endpoint)
        .with_allow_http(true);
    if let Some(secret) = secret {
        b = b.with_secret_access_key(secret);
    }
    b.build().expect("s3 client")
}

#[tokio::test]
async fn s3_server_puts_gets_multiparts_and_checks_credentials() {
    use object_store::path::Path;
    let tb = Testbed::get().await;
    let store = s3(&tb, None);
    let prefix = format!("smoke-{:08x}", rand::random::<u32>());

    let small = Path::from(format!("{prefix}/small"));
    store.put(&small, b"hello"[..].into()).await.expect("put");
    let got = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello");

    // Two parts: 5 MiB + 1000 B, the S3 minimum part size for all but the last.
    let big = Path::from(format!("{prefix}/big"));
    let mut upload = store.put_multipart(&big).await.expect("multipart");
    let part1 = vec![7u8; 5 * 1024 * 1024];
    let part2 = vec![9u8; 1000];
    upload.put_part(part1.clone().into()).await.unwrap();
    upload.put_part(part2.clone().into()).await.unwrap();
    upload.complete().await.expect("complete multipart");
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), part1.len() + part2.len());
    assert_eq!(&got[..part1.len()], &part1[..]);

    // Create-only puts: the manifest commit point relies on this.
    let opts = object_store::PutOptions::from(object_store::PutMode::Create);
    let err = store
        .put_opts(&small, b"again"[..].into(), opts)
        .await
        .expect_err("create-only put over an existing object");
    assert!(
        matches!(err, object_store::Error::AlreadyExists { .. }),
        "{err}"
    );

    let wrong = s3(&tb, Some("not-the-secret"));
    let err = wrong
        .get(&small)
        .await
        .expect_err("wrong secret must be rejected");
    assert!(
        err.to_string().contains("SignatureDoesNotMatch") || err.to_string().contains("403"),
        "{err}"
    );
}
