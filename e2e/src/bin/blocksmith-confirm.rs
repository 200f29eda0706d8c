//! What confirming a block before its commit costs the operator: the time to read and check
//! one job's manifest (`operator::output::evidence`), in the testbed's S3 server and in a
//! local directory, next to the baseline of the same run: one offset commit to the testbed
//! broker as the operator makes it (re-read, commit, read back).
//!
//!   e2e/testbed up /tmp/tb && source /tmp/tb/env
//!   cargo build --release -p blocksmith-e2e --bin blocksmith-confirm
//!   $CARGO_TARGET_DIR/release/blocksmith-confirm          # --jobs 500

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use blocksmith_builder::store::BlockStore;
use blocksmith_crds::BlockJob;
use blocksmith_e2e::broker;
use blocksmith_e2e::fake_builder::write_manifest;
use blocksmith_operator::kafka::{KafkaConnection, KafkaOffsets};
use blocksmith_operator::output::{Evidence, evidence, evidence_all};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Jobs (manifests) per store.
    #[arg(long, default_value_t = 500)]
    jobs: i64,
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} not set: source the env of `e2e/testbed up`"))
}

fn job(url: &str, topic: &str, start: i64) -> BlockJob {
    serde_json::from_value(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "metadata": {"name": format!("confirm-{start}")},
        "spec": {
            "pipeline": "confirm", "topic": topic, "partition": 0,
            "startOffset": start, "endOffset": start + 1000,
            "bootstrapServers": "unused:9092", "leaseDurationSeconds": 30,
            "output": {"url": url, "format": "parquet", "compression": "zstd"},
        },
    }))
    .expect("a valid BlockJob")
}

/// Milliseconds per job to confirm `jobs` manifests written under `url`: one at a time, and
/// as a reconcile does (`evidence_all`, several at once).
async fn confirm_ms(url: &str, topic: &str, jobs: i64) -> anyhow::Result<(f64, f64)> {
    let all: Vec<BlockJob> = (0..jobs).map(|i| job(url, topic, i * 1000)).collect();
    for j in &all {
        write_manifest(j).await;
    }
    // One store per pass, as a reconcile opens it; the first read pays the connection.
    let store = BlockStore::from_url(url)?;
    let per_job = |started: Instant| started.elapsed().as_secs_f64() * 1000.0 / jobs as f64;
    let started = Instant::now();
    for j in &all {
        anyhow::ensure!(evidence(&store, &j.spec).await? == Evidence::Confirmed);
    }
    let one_at_a_time = per_job(started);
    let reads: Vec<_> = all.iter().map(|j| (&store, &j.spec)).collect();
    let started = Instant::now();
    for found in evidence_all(&reads).await {
        anyhow::ensure!(found? == Evidence::Confirmed);
    }
    Ok((one_at_a_time, per_job(started)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = format!("confirm-{}", std::process::id());
    let s3 = format!("s3://{}/{run}", env("BLOCKSMITH_S3_BUCKET")?);
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir)?;
    let file = format!("file://{}", dir.display());
    let s3_ms = confirm_ms(&s3, &run, args.jobs).await?;
    let file_ms = confirm_ms(&file, &run, args.jobs).await?;
    std::fs::remove_dir_all(&dir)?;

    let bootstrap = env("BLOCKSMITH_KAFKA_BOOTSTRAP")?;
    broker::create_topic(&env("BLOCKSMITH_KAFKA_CONTROL")?, &run, 1)?;
    let kafka = KafkaOffsets::connect(
        &KafkaConnection {
            bootstrap_servers: bootstrap,
            group: run.clone(),
            properties: vec![],
            credentials: String::new(),
        },
        Duration::from_secs(5),
    )?;
    let started = Instant::now();
    for i in 1..=args.jobs {
        kafka.commit(&run, &BTreeMap::from([(0, i)]), &|| true)?;
    }
    let commit_ms = started.elapsed().as_secs_f64() * 1000.0 / args.jobs as f64;

    println!(
        "| {} jobs, per job | one at a time | as a reconcile reads them |",
        args.jobs
    );
    println!("|---|--:|--:|");
    println!(
        "| confirm in S3 (testbed s3s-fs) | {:.2} ms | {:.2} ms |",
        s3_ms.0, s3_ms.1
    );
    println!(
        "| confirm in a local directory | {:.2} ms | {:.2} ms |",
        file_ms.0, file_ms.1
    );
    println!("| baseline: one offset commit (re-read, commit, read back) | {commit_ms:.2} ms | |");
    println!(
        "\nreproduce: e2e/testbed up DIR && source DIR/env && cargo build --release -p blocksmith-e2e --bin blocksmith-confirm && $CARGO_TARGET_DIR/release/blocksmith-confirm --jobs {}",
        args.jobs
    );
    Ok(())
}
