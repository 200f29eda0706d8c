//! Builder throughput against a bare rdkafka consume loop, in one run on the same data.
//!
//! The parent starts librdkafka's in-process mock cluster, produces each scenario with the e2e
//! data generator, then re-executes itself once per mode so each mode's peak RSS is its own:
//! `--mode raw` reads every job range with a `BaseConsumer` and only touches the bytes;
//! `--mode builder` calls the builder library's `build_block` for every range, writing Parquet
//! to a `file://` directory. Jobs run one after another, as in one builder worker.
//!
//! The mock broker keeps at most 5 MiB or 100,000 records per partition, so scenarios spread
//! their data over many small partitions (checked: a partition that lost records fails).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use blocksmith_builder::reader::ReaderConfig;
use blocksmith_builder::runner::{BuildSettings, build_block};
use blocksmith_builder::store::UploadSettings;
use blocksmith_crds::pipeline::{BlockFormat, Compression};
use blocksmith_crds::{BlockJobSpec, JobOutputSpec};
use blocksmith_e2e::datagen::{DataSpec, ValueSizes, produce};
use clap::{Parser, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// Per-partition budget, below the mock broker's 5 MiB.
const PARTITION_BYTES: u64 = 3 << 20;
const MB: f64 = 1e6;

#[derive(Parser)]
#[command(about = "Builder (Kafka → Parquet → file://) throughput vs a raw rdkafka consume loop")]
struct Args {
    /// Scenarios: `small` (100 B values) and/or `large` (10 KiB values).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "small,large")]
    sizes: Vec<Size>,
    /// Run one scenario with this value size instead: a byte count or `mixed`.
    #[arg(long, conflicts_with = "sizes")]
    value_size: Option<ValueSizes>,
    /// Records per partition [default: what fits in 3 MiB, at most 50,000].
    #[arg(long)]
    records_per_partition: Option<u64>,
    /// Partitions [default: 48; 96 for `large`].
    #[arg(long)]
    partitions: Option<i32>,
    /// Records per job range [default: a whole partition].
    #[arg(long)]
    job_records: Option<i64>,
    /// zstd level of the blocks [default: the builder's].
    #[arg(long)]
    zstd_level: Option<i32>,
    /// Runs of each mode, alternating; the table shows the median run by wall time.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Where the builder's scratch files and `file://` output go [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,

    // Set by the parent for its children.
    #[arg(long, value_enum, hide = true)]
    mode: Option<Mode>,
    #[arg(long, hide = true)]
    bootstrap: Option<String>,
    #[arg(long, hide = true)]
    topic: Option<String>,
    /// `partition:start-end,...`, each range split into jobs of `--job-records`.
    #[arg(long, hide = true, value_delimiter = ',')]
    ranges: Vec<String>,
    #[arg(long, hide = true)]
    out_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Size {
    Small,
    Large,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Raw,
    Builder,
}

struct Scenario {
    name: String,
    values: ValueSizes,
    partitions: i32,
    records_per_partition: u64,
    job_records: i64,
}

/// One job: `[start, end)` of a partition.
#[derive(Clone, Copy)]
struct Range {
    partition: i32,
    start: i64,
    end: i64,
}

/// What a child measured.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Measured {
    jobs: usize,
    records: u64,
    /// Key, value and header bytes read.
    bytes_in: u64,
    /// Parquet bytes written (builder only).
    bytes_out: u64,
    seconds: f64,
    /// Raw only: parts of `seconds` between each job's first and last record, and in closing
    /// (dropping) the job's consumer.
    stream_seconds: f64,
    close_seconds: f64,
    /// User + system CPU time of the whole process.
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

impl Measured {
    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.seconds
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.mode {
        Some(mode) => child(mode, &args),
        None => parent(&args),
    }
}

fn scenarios(args: &Args) -> Vec<Scenario> {
    let one = |name: &str, values, partitions| {
        let record_bytes = match values {
            ValueSizes::Fixed(n) => n as u64 + 64,
            ValueSizes::Mixed => 512,
        };
        let records_per_partition = args
            .records_per_partition
            .unwrap_or((PARTITION_BYTES / record_bytes).clamp(1, 50_000));
        Scenario {
            name: name.into(),
            values,
            partitions: args.partitions.unwrap_or(partitions),
            records_per_partition,
            job_records: args.job_records.unwrap_or(records_per_partition as i64),
        }
    };
    match args.value_size {
        Some(values) => vec![one("custom", values, 48)],
        None => args
            .sizes
            .iter()
            .map(|size| match size {
                Size::Small => one("small", ValueSizes::Fixed(100), 48),
                Size::Large => one("large", ValueSizes::Fixed(10 << 10), 96),
            })
            .collect(),
    }
}

fn parent(args: &Args) -> anyhow::Result<()> {
    // Kept alive until every child has finished.
    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    let mut rows = Vec::new();
    for sc in scenarios(args) {
        let topic = format!("bench-{}", sc.name);
        cluster.create_topic(&topic, sc.partitions, 1)?;
        let spec = DataSpec {
            value_sizes: sc.values,
            ..DataSpec::new(
                &topic,
                sc.partitions,
                sc.records_per_partition * sc.partitions as u64,
            )
        };
        let started = Instant::now();
        let produced = produce(&bootstrap, &spec)?;
        eprintln!(
            "{}: produced {} records ({:.1} MB of keys and values) in {:.1} s",
            sc.name,
            produced.total(),
            produced.bytes as f64 / MB,
            started.elapsed().as_secs_f64()
        );
        let ranges = log_ranges(&bootstrap, &topic, sc.partitions)?;
        let mut runs = [Vec::new(), Vec::new()];
        for _ in 0..args.repeat.max(1) {
            for (mode, runs) in [Mode::Raw, Mode::Builder].into_iter().zip(&mut runs) {
                runs.push(run_child(mode, &bootstrap, &topic, &ranges, &sc, args)?);
            }
        }
        let [raw, builder] = runs.map(|mut runs| {
            runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
            runs
        });
        let read = |m: &Measured| (m.records, m.bytes_in);
        ensure!(
            raw.iter().chain(&builder).all(|m| read(m) == read(&raw[0])),
            "{}: runs read different data: raw {raw:?}, builder {builder:?}",
            sc.name
        );
        rows.push((sc, raw, builder));
    }
    report(&rows, args);
    Ok(())
}

/// Every partition's whole log, checking that the mock broker dropped nothing.
fn log_ranges(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<Range>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    (0..partitions)
        .map(|partition| {
            let (start, end) =
                consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
            ensure!(
                start == 0,
                "{topic}[{partition}] lost its first {start} records: the mock broker keeps \
                 5 MiB per partition; lower --records-per-partition or raise --partitions"
            );
            Ok(Range {
                partition,
                start,
                end,
            })
        })
        .collect()
}

fn run_child(
    mode: Mode,
    bootstrap: &str,
    topic: &str,
    ranges: &[Range],
    sc: &Scenario,
    args: &Args,
) -> anyhow::Result<Measured> {
    let dir = match &args.dir {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None => tempfile::tempdir()?,
    };
    let ranges: Vec<_> = ranges
        .iter()
        .map(|r| format!("{}:{}-{}", r.partition, r.start, r.end))
        .collect();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--mode")
        .arg(mode.to_possible_value().expect("not skipped").get_name())
        .args(["--bootstrap", bootstrap, "--topic", topic])
        .arg(format!("--ranges={}", ranges.join(",")))
        .arg(format!("--job-records={}", sc.job_records))
        .arg("--out-dir")
        .arg(dir.path());
    if let Some(level) = args.zstd_level {
        cmd.arg(format!("--zstd-level={level}"));
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    ensure!(out.status.success(), "{mode:?} child: {}", out.status);
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout.lines().last().context("child printed nothing")?;
    let measured: Measured = serde_json::from_str(last)?;
    eprintln!(
        "{}: {mode:?} read {} records in {:.2} s",
        sc.name, measured.records, measured.seconds
    );
    Ok(measured)
}

fn child(mode: Mode, args: &Args) -> anyhow::Result<()> {
    let bootstrap = args.bootstrap.as_deref().context("--bootstrap")?;
    let topic = args.topic.as_deref().context("--topic")?;
    let step = args.job_records.context("--job-records")?.max(1);
    let mut jobs = Vec::new();
    for range in &args.ranges {
        let (partition, rest) = range.split_once(':').context("--ranges")?;
        let (start, end) = rest.split_once('-').context("--ranges")?;
        let (partition, end) = (partition.parse()?, end.parse()?);
        jobs.extend(
            (start.parse()?..end)
                .step_by(step as usize)
                .map(|start| Range {
                    partition,
                    start,
                    end: (start + step).min(end),
                }),
        );
    }
    let mut measured = match mode {
        Mode::Raw => consume_raw(bootstrap, topic, &jobs)?,
        Mode::Builder => {
            let out_dir = args.out_dir.as_deref().context("--out-dir")?;
            build_blocks(bootstrap, topic, &jobs, out_dir, args.zstd_level)?
        }
    };
    measured.jobs = jobs.len();
    measured.peak_rss_kib = peak_rss_kib()?;
    measured.cpu_seconds = cpu_seconds()?;
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

fn build_blocks(
    bootstrap: &str,
    topic: &str,
    jobs: &[Range],
    out_dir: &Path,
    zstd_level: Option<i32>,
) -> anyhow::Result<Measured> {
    let blocks = out_dir.join("blocks");
    std::fs::create_dir_all(&blocks)?;
    let settings = BuildSettings {
        reader: ReaderConfig::new(bootstrap),
        work_dir: out_dir.join("work"),
        upload: UploadSettings::default(),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let mut measured = Measured::default();
    let started = Instant::now();
    for job in jobs {
        let spec = BlockJobSpec {
            pipeline: "bench".into(),
            topic: topic.into(),
            partition: job.partition,
            start_offset: job.start,
            end_offset: job.end,
            bootstrap_servers: bootstrap.into(),
            lease_duration_seconds: 60,
            output: JobOutputSpec {
                url: format!("file://{}", blocks.display()),
                format: BlockFormat::Parquet,
                compression: Compression::Zstd,
                compression_level: zstd_level,
                row_group_size: None,
            },
        };
        let built = runtime.block_on(build_block(&spec, &settings, cancel.clone()))?;
        measured.records += built.output.records as u64;
        measured.bytes_in += built.read_bytes;
        measured.bytes_out += built.output.bytes as u64;
    }
    measured.seconds = started.elapsed().as_secs_f64();
    Ok(measured)
}

/// The least a reader of the range must do: one consumer per job, as the builder has.
fn consume_raw(bootstrap: &str, topic: &str, jobs: &[Range]) -> anyhow::Result<Measured> {
    let mut measured = Measured::default();
    let mut checksum = 0u64;
    let mut touch = |bytes: &[u8]| {
        checksum = bytes
            .iter()
            .fold(checksum, |sum, &b| sum.wrapping_add(u64::from(b)));
        bytes.len() as u64
    };
    let started = Instant::now();
    for job in jobs {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "blocksmith-bench")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "error")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, job.partition, Offset::Offset(job.start))?;
        consumer.assign(&assignment)?;
        let mut last_progress = Instant::now();
        let mut first_record = None;
        loop {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(msg)) => {
                    first_record.get_or_insert_with(Instant::now);
                    measured.records += 1;
                    measured.bytes_in += touch(msg.key().unwrap_or_default())
                        + touch(msg.payload().unwrap_or_default());
                    for h in msg.headers().iter().flat_map(|hs| hs.iter()) {
                        measured.bytes_in +=
                            touch(h.key.as_bytes()) + touch(h.value.unwrap_or_default());
                    }
                    if msg.offset() >= job.end - 1 {
                        break;
                    }
                    last_progress = Instant::now();
                }
                Some(Err(e)) => bail!("{topic}[{}]: {e}", job.partition),
                None if last_progress.elapsed() > Duration::from_secs(30) => {
                    bail!("{topic}[{}]: no records for 30 s", job.partition)
                }
                None => {}
            }
        }
        measured.stream_seconds += first_record.map_or(0.0, |t| t.elapsed().as_secs_f64());
        // Closed off the critical path, as the builder's reader does: a consumer with a group
        // id polls for up to 100 ms while closing.
        let closing = Instant::now();
        std::thread::spawn(move || drop(consumer));
        measured.close_seconds += closing.elapsed().as_secs_f64();
    }
    measured.seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    Ok(measured)
}

/// The process's peak resident set size so far.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// The median run of runs sorted by wall time.
fn median(runs: &[Measured]) -> &Measured {
    &runs[runs.len() / 2]
}

fn seconds(runs: &[Measured]) -> Vec<f64> {
    runs.iter()
        .map(|m| (m.seconds * 100.0).round() / 100.0)
        .collect()
}

/// User + system time from `/proc/self/stat` (fields 14 and 15, in USER_HZ = 100 ticks/s).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/self/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("/proc/self/stat")?.parse()?)
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

fn report(rows: &[(Scenario, Vec<Measured>, Vec<Measured>)], args: &Args) {
    let ratio = |raw: &[Measured], builder: &[Measured]| {
        let rate = |runs| median(runs).per_second(median(runs).records);
        rate(builder) / rate(raw)
    };
    println!(
        "MB = 10^6 bytes; in = key + value + header bytes read; out = Parquet bytes written; \
         CPU s = user + system time of the mode's own process (the mock broker runs in the \
         parent); peak RSS = its VmHWM; median of {} runs by wall time\n",
        args.repeat.max(1)
    );
    println!(
        "| scenario | mode | records | jobs | MB in | MB out | wall s | records/s | MB/s in \
         | MB/s out | CPU s | peak RSS MiB |"
    );
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (sc, raw, builder) in rows {
        for (mode, runs) in [("raw", raw), ("builder", builder)] {
            let m = median(runs);
            let out = |v: f64| match mode {
                "raw" => "-".to_owned(),
                _ => format!("{:.1}", v / MB),
            };
            println!(
                "| {} | {mode} | {} | {} | {:.1} | {} | {:.2} | {:.0} | {:.1} | {} | {:.2} | {:.0} |",
                sc.name,
                m.records,
                m.jobs,
                m.bytes_in as f64 / MB,
                out(m.bytes_out as f64),
                m.seconds,
                m.per_second(m.records),
                m.per_second(m.bytes_in) / MB,
                out(m.per_second(m.bytes_out)),
                m.cpu_seconds,
                m.peak_rss_kib as f64 / 1024.0,
            );
        }
    }
    println!();
    for (sc, raw, builder) in rows {
        println!(
            "{}: {:?} values, {} partitions × {} records, jobs of {}; wall s raw {:?}, \
             builder {:?}; builder/raw records/s = {:.2}",
            sc.name,
            sc.values,
            sc.partitions,
            sc.records_per_partition,
            sc.job_records,
            seconds(raw),
            seconds(builder),
            ratio(raw, builder)
        );
        let m = median(raw);
        println!(
            "  raw per job: {:.1} ms first to last record, {:.1} ms closing the consumer, \
             {:.1} ms creating it and waiting for the first record",
            1e3 * m.stream_seconds / m.jobs as f64,
            1e3 * m.close_seconds / m.jobs as f64,
            1e3 * (m.seconds - m.stream_seconds - m.close_seconds) / m.jobs as f64,
        );
    }
    let command: Vec<String> = std::iter::once("target/release/blocksmith-bench".into())
        .chain(std::env::args().skip(1))
        .collect();
    println!(
        "\nReproduce: cargo build --release -p blocksmith-e2e --bin blocksmith-bench && {}",
        command.join(" ")
    );
    let json: Vec<_> = rows
        .iter()
        .map(|(sc, raw, builder)| {
            serde_json::json!({
                "scenario": sc.name,
                "values": format!("{:?}", sc.values),
                "partitions": sc.partitions,
                "recordsPerPartition": sc.records_per_partition,
                "jobRecords": sc.job_records,
                "zstdLevel": args.zstd_level,
                "dir": args.dir,
                "raw": median(raw),
                "builder": median(builder),
                "rawSeconds": seconds(raw),
                "builderSeconds": seconds(builder),
                "builderOverRawRecordsPerSecond": ratio(raw, builder),
            })
        })
        .collect();
    println!("{}", serde_json::json!({ "blocksmithBench": json }));
}
