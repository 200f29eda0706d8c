//! Produces deterministic test data to the testbed broker and prints what it produced.

use std::path::PathBuf;

use blocksmith_e2e::datagen::{DataSpec, ValueSizes, produce};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Produce N records over P partitions and report counts and high watermarks")]
struct Args {
    #[arg(long, env = "BLOCKSMITH_KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// Broker control address; when given, the topic is created first.
    #[arg(long, env = "BLOCKSMITH_KAFKA_CONTROL")]
    control: Option<String>,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 10_000)]
    records: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `mixed` (0 B to 64 KiB, mostly small) or a fixed size in bytes.
    #[arg(long, default_value = "mixed")]
    value_sizes: ValueSizes,
    /// Write every produced record (offset and content digests) as CSV, for audits.
    #[arg(long)]
    expected: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(control) = &args.control {
        blocksmith_e2e::broker::create_topic(control, &args.topic, args.partitions)?;
    }
    let spec = DataSpec {
        seed: args.seed,
        value_sizes: args.value_sizes,
        ..DataSpec::new(&args.topic, args.partitions, args.records)
    };
    let started = std::time::Instant::now();
    let produced = produce(&args.bootstrap, &spec)?;
    if let Some(path) = &args.expected {
        produced.write_csv(path)?;
    }
    let partitions: Vec<_> = produced
        .partitions
        .iter()
        .map(|(p, (count, high))| serde_json::json!({"partition": p, "records": count, "highWatermark": high}))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "topic": args.topic,
            "records": produced.total(),
            "bytes": produced.bytes,
            "seconds": started.elapsed().as_secs_f64(),
            "partitions": partitions,
        })
    );
    Ok(())
}
