//! Values the unit tests of several modules build.

use blocksmith_crds::{BlockJob, BlockJobStatus};
use jiff::Timestamp;

/// A job of pipeline `orders` over `[start, end)` of `partition`, named `orders-{partition}-{start}`,
/// without status (`Pending`, attempt 1).
pub fn job(partition: i32, start: i64, end: i64) -> BlockJob {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "metadata": {"name": format!("orders-{partition}-{start}"), "namespace": "ns"},
        "spec": {
            "pipeline": "orders",
            "topic": "orders",
            "partition": partition,
            "startOffset": start,
            "endOffset": end,
            "bootstrapServers": "kafka:9092",
            "leaseDurationSeconds": 30,
            "output": {"url": "s3://bucket/", "format": "parquet", "compression": "zstd"},
        },
    }))
    .expect("a valid BlockJob")
}

/// `job` with `status`.
pub fn job_with(partition: i32, start: i64, end: i64, status: BlockJobStatus) -> BlockJob {
    let mut j = job(partition, start, end);
    j.status = Some(status);
    j
}

/// `secs` seconds after a fixed instant.
pub fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).expect("a valid timestamp")
}

/// Asserts that `text` contains each of `wants`, naming the first missing one.
pub fn assert_mentions(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "{want:?} not in {text:?}");
    }
}
