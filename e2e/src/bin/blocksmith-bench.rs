//! Builder throughput against a bare rdkafka consume loop, in one run on the same data.
//!
//! The parent starts librdkafka's in-process mock cluster, produces each scenario with the e2e
//! data generator, then re-executes itself per mode so each process's peak RSS is its own:
//! `--mode raw` reads every job range with a `BaseConsumer` and only touches the bytes;
//! `--mode builder` calls the builder library's `build_block` for every range, writing Parquet
//! to a `file://` directory. Jobs run one after another, as in one builder worker.
//!
//! With `--output s3` both modes write to an S3 server the benchmark starts (the testbed's
//! `s3s-fs`): the builder its blocks, the raw loop each job's key, value and header bytes as
//! they are read, through the builder's own data-object writer (one PUT under the multipart
//! threshold, parts of the same size and concurrency above it). The baseline is then the
//! consume limit plus the upload of the same bytes, with no encoding.
//!
//! For each `--builders` count N, N processes of a mode run at once, each over a disjoint share
//! of the jobs (dealt round-robin, as N builders claiming from the queue would split them), and
//! the run's throughput is all their records over the wall time from the first process's start
//! to the last one's finish.
//!
//! The mock broker keeps at most 5 MiB or 100,000 message batches per partition, so scenarios spread
//! their data over many small partitions (checked: a partition that lost records fails).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use blocksmith_builder::headers::raw_headers;
use blocksmith_builder::reader::ReaderConfig;
use blocksmith_builder::runner::BuildSettings;
use blocksmith_builder::store::{BlockStore, OpenStores, UploadSettings};
use blocksmith_builder::worker::DEFAULT_CONCURRENT_JOBS;
use blocksmith_crds::domain::partition_folder;
use blocksmith_crds::pipeline::{BlockFormat, Compression};
use blocksmith_crds::{BlockJobSpec, JobOutputSpec};
use blocksmith_e2e::bench::{Range, build_ranges, share, split_jobs};
use blocksmith_e2e::datagen::{DataSpec, ValueSizes, produce};
use blocksmith_e2e::host::{
    Load, LoadWatch, cpu_seconds, load_average, peak_rss_kib, round2, unix_seconds,
};
use clap::{Parser, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// Per-partition budget, below the mock broker's 5 MiB.
const PARTITION_BYTES: u64 = 3 << 20;
const MB: f64 = 1e6;

#[derive(Parser)]
#[command(about = "Builder (Kafka → Parquet → file://) throughput vs a raw rdkafka consume loop")]
struct Args {
    /// Scenarios: `small` (100 B values), `large` (10 KiB values), `tiny` (jobs of one 100 B
    /// record: a job's fixed cost, its ms/job).
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
    /// Jobs each builder process builds at once, as the builder's `--concurrent-jobs`
    /// [default: the builder's]. The raw loop always reads one job after another.
    #[arg(long, env = "BLOCKSMITH_CONCURRENT_JOBS")]
    concurrent_jobs: Option<u8>,
    /// zstd level of the blocks [default: the builder's].
    #[arg(long)]
    zstd_level: Option<i32>,
    /// Runs of each mode, alternating; the table shows the median run by wall time.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Where the builder's scratch files and `file://` output go [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Builders working at once: for each count N, N builder processes (and, separately, N raw
    /// consumer processes) run concurrently, each over a disjoint share of the jobs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    builders: Vec<usize>,
    /// Where both modes write: `file` (the builder only; raw only reads) or `s3` (an S3
    /// server started here; raw uploads the bytes it read).
    #[arg(long, value_enum, default_value = "file")]
    output: Output,

    // Set by the parent for its children.
    #[arg(long, value_enum, hide = true)]
    mode: Option<Mode>,
    #[arg(long, hide = true)]
    bootstrap: Option<String>,
    #[arg(long, hide = true)]
    topic: Option<String>,
    /// `partition:start-end,...`, each range split into jobs of `--job-records`.
    #[arg(long, hide = true, value_delimiter = ',')]
    ranges: Vec<Range>,
    #[arg(long, hide = true)]
    out_dir: Option<PathBuf>,
    /// The output URL of both modes when it is not the `file://` directory `--out-dir`.
    #[arg(long, hide = true)]
    out_url: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    File,
    S3,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Size {
    Small,
    Large,
    Tiny,
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
    /// Wall-clock start and end of the jobs, in seconds since the Unix epoch, so the parent can
    /// span concurrent processes.
    #[serde(default)]
    started_unix: f64,
    #[serde(default)]
    finished_unix: f64,
}

/// One run of a mode with N processes at once, summed over the processes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Run {
    processes: usize,
    /// Sums over the processes, except `seconds` (first start to last finish) and
    /// `peak_rss_kib` (the largest process's).
    #[serde(flatten)]
    total: Measured,
    /// Each process's own wall time.
    process_seconds: Vec<f64>,
    /// CPU time of the parent, i.e. the mock broker, during the run.
    broker_cpu_seconds: f64,
    /// CPU time of the S3 server during the run (`--output s3`).
    s3_cpu_seconds: Option<f64>,
    /// 1-minute load average just before the run.
    load_before: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.total.per_second(self.total.records)
    }
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
    let one = |name: &str, values, partitions, job_records: Option<i64>| {
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
            job_records: args
                .job_records
                .or(job_records)
                .unwrap_or(records_per_partition as i64),
        }
    };
    match args.value_size {
        Some(values) => vec![one("custom", values, 48, None)],
        None => args
            .sizes
            .iter()
            .map(|size| match size {
                Size::Small => one("small", ValueSizes::Fixed(100), 48, None),
                Size::Large => one("large", ValueSizes::Fixed(10 << 10), 96, None),
                Size::Tiny => Scenario {
                    records_per_partition: args.records_per_partition.unwrap_or(4),
                    ..one("tiny", ValueSizes::Fixed(100), 48, Some(1))
                },
            })
            .collect(),
    }
}

/// Rows of the report: one scenario's runs, per builder count, raw and builder, each sorted by
/// wall time.
struct Row {
    sc: Scenario,
    counts: Vec<(usize, [Vec<Run>; 2])>,
}

fn parent(args: &Args) -> anyhow::Result<()> {
    let mut counts: Vec<usize> = args.builders.iter().map(|&n| n.max(1)).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut load = LoadWatch::start()?;
    // Kept alive until every child has finished.
    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    let s3 = match args.output {
        Output::S3 => Some(S3Server::start()?),
        Output::File => None,
    };
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
        let jobs = split_jobs(
            &log_ranges(&bootstrap, &topic, sc.partitions)?,
            sc.job_records,
        );
        let mut runs: Vec<[Vec<Run>; 2]> = counts.iter().map(|_| Default::default()).collect();
        for _ in 0..args.repeat.max(1) {
            for (&n, runs) in counts.iter().zip(&mut runs) {
                for (mode, runs) in [Mode::Raw, Mode::Builder].into_iter().zip(runs) {
                    let run =
                        run_group(mode, n, &bootstrap, &topic, &jobs, &sc, args, s3.as_ref())?;
                    load.saw(run.load_before);
                    runs.push(run);
                }
            }
        }
        let runs: Vec<[Vec<Run>; 2]> = runs
            .into_iter()
            .map(|modes| {
                modes.map(|mut runs| {
                    runs.sort_by(|a, b| a.total.seconds.total_cmp(&b.total.seconds));
                    runs
                })
            })
            .collect();
        let read = |r: &Run| (r.total.records, r.total.bytes_in, r.total.jobs);
        let all: Vec<&Run> = runs.iter().flatten().flatten().collect();
        ensure!(
            all.iter().all(|r| read(r) == read(all[0])),
            "{}: runs read different data: {all:?}",
            sc.name
        );
        rows.push(Row {
            sc,
            counts: counts.iter().copied().zip(runs).collect(),
        });
    }
    report(&rows, args, &load.finish()?);
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

/// An `s3s-fs` server on loopback with a bucket `blocksmith`, stopped on drop.
struct S3Server {
    child: std::process::Child,
    root: tempfile::TempDir,
    endpoint: String,
}

impl S3Server {
    const KEY_ID: &str = "blocksmith-bench";
    const SECRET: &str = "blocksmith-bench-secret";

    /// From `BLOCKSMITH_S3S_FS` (the testbed's env) or where `e2e/scripts/install.sh` puts it.
    fn start() -> anyhow::Result<S3Server> {
        let bin = std::env::var_os("BLOCKSMITH_S3S_FS")
            .map(PathBuf::from)
            .or_else(|| {
                let home = std::env::var_os("HOME")?;
                Some(PathBuf::from(home).join(".cache/blocksmith/bin/s3s-fs"))
            })
            .filter(|bin| bin.exists())
            .context("no s3s-fs: set BLOCKSMITH_S3S_FS or run e2e/scripts/install.sh")?;
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join("blocksmith"))?;
        let port = blocksmith_e2e::procs::free_port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", Self::KEY_ID, "--secret-key", Self::SECRET])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "s3s-fs did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(S3Server {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }

    fn point(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", Self::KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", Self::SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `n` processes of `mode` at once, job `i` going to process `i % n`.
#[allow(clippy::too_many_arguments)]
fn run_group(
    mode: Mode,
    n: usize,
    bootstrap: &str,
    topic: &str,
    jobs: &[Range],
    sc: &Scenario,
    args: &Args,
    s3: Option<&S3Server>,
) -> anyhow::Result<Run> {
    // In the S3 server: a prefix of its own per run, removed after it.
    let prefix = format!("{}-{mode:?}-{n}-{:08x}", sc.name, rand::random::<u32>());
    // One output location for all builders of the run, as they would share a bucket.
    let dir = match &args.dir {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None => tempfile::tempdir()?,
    };
    let load_before = load_average()?;
    let broker_cpu = cpu_seconds("self")?;
    let mut children = Vec::new();
    for i in 0..n {
        let Some(share) = share(jobs, i, n) else {
            continue;
        };
        let mut cmd = Command::new(std::env::current_exe()?);
        // As the image sets it (images/Dockerfile): both modes, unless the caller set it.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            cmd.env("MALLOC_ARENA_MAX", "2");
        }
        cmd.arg("--mode")
            .arg(mode.to_possible_value().expect("not skipped").get_name())
            .args(["--bootstrap", bootstrap, "--topic", topic])
            .arg(format!("--ranges={share}"))
            .arg(format!("--job-records={}", sc.job_records))
            .arg("--out-dir")
            .arg(dir.path());
        if let Some(level) = args.zstd_level {
            cmd.arg(format!("--zstd-level={level}"));
        }
        if let Some(jobs) = args.concurrent_jobs {
            cmd.arg(format!("--concurrent-jobs={jobs}"));
        }
        if let Some(s3) = s3 {
            s3.point(&mut cmd);
            cmd.arg(format!("--out-url=s3://blocksmith/{prefix}"));
        }
        children.push(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {mode:?} child"))?,
        );
    }
    let s3_cpu = s3.map(|s3| cpu_seconds(s3.child.id())).transpose()?;
    let mut processes = Vec::new();
    for child in children {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "{mode:?} child: {}", out.status);
        let stdout = String::from_utf8(out.stdout)?;
        let last = stdout.lines().last().context("child printed nothing")?;
        processes.push(serde_json::from_str::<Measured>(last)?);
    }
    let broker_cpu_seconds = cpu_seconds("self")? - broker_cpu;
    let s3_cpu_seconds = match (s3, s3_cpu) {
        (Some(s3), Some(before)) => {
            let used = cpu_seconds(s3.child.id())? - before;
            std::fs::remove_dir_all(s3.root.path().join("blocksmith").join(&prefix))?;
            Some(used)
        }
        _ => None,
    };
    let started = processes
        .iter()
        .map(|m| m.started_unix)
        .fold(f64::MAX, f64::min);
    let finished = processes
        .iter()
        .map(|m| m.finished_unix)
        .fold(0.0, f64::max);
    let total = Measured {
        jobs: processes.iter().map(|m| m.jobs).sum(),
        records: processes.iter().map(|m| m.records).sum(),
        bytes_in: processes.iter().map(|m| m.bytes_in).sum(),
        bytes_out: processes.iter().map(|m| m.bytes_out).sum(),
        seconds: finished - started,
        stream_seconds: processes.iter().map(|m| m.stream_seconds).sum(),
        close_seconds: processes.iter().map(|m| m.close_seconds).sum(),
        cpu_seconds: processes.iter().map(|m| m.cpu_seconds).sum(),
        peak_rss_kib: processes.iter().map(|m| m.peak_rss_kib).max().unwrap_or(0),
        started_unix: started,
        finished_unix: finished,
    };
    eprintln!(
        "{}: {n} × {mode:?} read {} records in {:.2} s (load {load_before:.1})",
        sc.name, total.records, total.seconds
    );
    Ok(Run {
        processes: processes.len(),
        process_seconds: processes.iter().map(|m| round2(m.seconds)).collect(),
        total,
        broker_cpu_seconds,
        s3_cpu_seconds,
        load_before,
    })
}

fn child(mode: Mode, args: &Args) -> anyhow::Result<()> {
    let bootstrap = args.bootstrap.as_deref().context("--bootstrap")?;
    let topic = args.topic.as_deref().context("--topic")?;
    let step = args.job_records.context("--job-records")?.max(1);
    let jobs = split_jobs(&args.ranges, step);
    let out_dir = args.out_dir.as_deref().context("--out-dir")?;
    let out_url = match &args.out_url {
        Some(url) => url.clone(),
        None => {
            let blocks = out_dir.join("blocks");
            std::fs::create_dir_all(&blocks)?;
            format!("file://{}", blocks.display())
        }
    };
    let mut measured = match mode {
        Mode::Raw => {
            let upload = args.out_url.as_deref();
            consume_raw(bootstrap, topic, &jobs, upload)?
        }
        Mode::Builder => {
            let at_once = args.concurrent_jobs.unwrap_or(DEFAULT_CONCURRENT_JOBS);
            build_blocks(bootstrap, topic, &jobs, &out_url, args.zstd_level, at_once)?
        }
    };
    // `seconds` runs from the first job's start to the last one's end.
    measured.finished_unix = unix_seconds();
    measured.started_unix = measured.finished_unix - measured.seconds;
    measured.jobs = jobs.len();
    measured.peak_rss_kib = peak_rss_kib("self")?;
    measured.cpu_seconds = cpu_seconds("self")?;
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

/// Every job through the builder library, `at_once` at a time as the builder's slots.
fn build_blocks(
    bootstrap: &str,
    topic: &str,
    jobs: &[Range],
    out_url: &str,
    zstd_level: Option<i32>,
    at_once: u8,
) -> anyhow::Result<Measured> {
    let settings = BuildSettings {
        reader: ReaderConfig::new(bootstrap),
        upload: UploadSettings::default(),
        stores: OpenStores::default(),
    };
    let spec = |job: &Range| BlockJobSpec {
        pipeline: "bench".into(),
        topic: topic.into(),
        partition: job.partition,
        start_offset: job.start,
        end_offset: job.end,
        bootstrap_servers: bootstrap.into(),
        kafka_cluster_id: None,
        kafka_topic_id: None,
        lease_duration_seconds: 60,
        output: JobOutputSpec {
            url: out_url.to_owned(),
            format: BlockFormat::Parquet,
            compression: Compression::Zstd,
            compression_level: zstd_level,
            row_group_size: None,
            max_record_bytes: None,
        },
    };
    let started = Instant::now();
    let built = build_ranges(jobs, spec, &settings, at_once)?;
    Ok(Measured {
        records: built.records,
        bytes_in: built.bytes_in,
        bytes_out: built.bytes_out,
        seconds: started.elapsed().as_secs_f64(),
        ..Measured::default()
    })
}

/// The least a reader of the range must do: one consumer per job, as the builder has. With
/// `upload`, an output URL, each job's bytes also go to a data object there as they are read,
/// through the builder's own writer (its upload settings, no encoding).
fn consume_raw(
    bootstrap: &str,
    topic: &str,
    jobs: &[Range],
    upload: Option<&str>,
) -> anyhow::Result<Measured> {
    let runtime = tokio::runtime::Runtime::new()?;
    let store = upload.map(BlockStore::from_url).transpose()?;
    let mut measured = Measured::default();
    let mut checksum = 0u64;
    let started = Instant::now();
    for (index, job) in jobs.iter().enumerate() {
        let mut sink = store
            .as_ref()
            .map(|store| {
                let folder = partition_folder(topic, job.partition);
                store.data_writer(&folder, job.start, job.end, runtime.handle().clone())
            })
            .transpose()?;
        let mut touch = |bytes: &[u8]| -> anyhow::Result<u64> {
            match &mut sink {
                Some(sink) => sink.write_all(bytes)?,
                None => {
                    checksum = bytes
                        .iter()
                        .fold(checksum, |sum, &b| sum.wrapping_add(u64::from(b)))
                }
            }
            Ok(bytes.len() as u64)
        };
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
                    measured.bytes_in += touch(msg.key().unwrap_or_default())?
                        + touch(msg.payload().unwrap_or_default())?;
                    for (key, value) in raw_headers(&msg) {
                        measured.bytes_in += touch(key)? + touch(value.unwrap_or_default())?;
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
        if let Some(sink) = sink {
            // Any 64 hex digits: the object's name only has to be the job's own.
            sink.finish(&format!("{index:064x}"))?;
        }
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

/// The median run of runs sorted by wall time.
fn median(runs: &[Run]) -> &Run {
    &runs[runs.len() / 2]
}

fn seconds(runs: &[Run]) -> Vec<f64> {
    runs.iter().map(|r| round2(r.total.seconds)).collect()
}

fn report(rows: &[Row], args: &Args, load: &Load) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let base = rows.first().map_or(1, |row| row.counts[0].0);
    println!(
        "MB = 10^6 bytes; in = key + value + header bytes read; out = Parquet bytes written. \
         N processes of a mode run at once over disjoint shares of the jobs; wall s = first \
         start to last finish; records/s and MB/s = all N processes' totals over that wall \
         time. ms/job = N × wall time / jobs, the time one process spends per job. CPU s = \
         user + system time summed over the N processes; broker CPU s = the parent's (the \
         mock broker's) during the run, S3 CPU s the S3 server's; peak RSS = the largest \
         process's VmHWM. Output: {}. \
         ×N={base} = records/s over the same mode's with N = {base}; builder/raw = builder \
         records/s over raw records/s at the same N. Median of {} runs by wall time.\n",
        match args.output {
            Output::File => "file:// on disk, fsynced (raw writes nothing)",
            Output::S3 => "s3:// of a local s3s-fs (raw uploads the bytes it read, as is)",
        },
        args.repeat.max(1)
    );
    println!(
        "This machine has {cores} cores, shared by the N processes and the mock broker (and \
         anything else running): CPU-bound work cannot scale beyond ~{cores}× here, and \
         N > {cores} adds no CPU; a mode that waits (fsync, fetch latency) can gain more by \
         overlapping its waits. {}\n",
        load.describe()
    );
    println!(
        "| scenario | N | mode | records | jobs | MB in | MB out | wall s | records/s | MB/s in \
         | MB/s out | ms/job | ×N={base} | builder/raw | CPU s | broker CPU s | S3 CPU s \
         | peak RSS MiB |"
    );
    println!("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for row in rows {
        let base = &row.counts[0].1;
        for (n, modes) in &row.counts {
            for (i, (mode, runs)) in ["raw", "builder"].into_iter().zip(modes).enumerate() {
                let r = median(runs);
                let m = &r.total;
                let out = |v: f64| match mode {
                    "raw" => "-".to_owned(),
                    _ => format!("{:.1}", v / MB),
                };
                let vs_raw = match mode {
                    "raw" => "-".to_owned(),
                    _ => format!("{:.2}", r.rate() / median(&modes[0]).rate()),
                };
                let s3_cpu = r
                    .s3_cpu_seconds
                    .map_or("-".to_owned(), |s| format!("{s:.2}"));
                println!(
                    "| {} | {n} | {mode} | {} | {} | {:.1} | {} | {:.2} | {:.0} | {:.1} | {} \
                     | {:.1} | {:.2} | {vs_raw} | {:.2} | {:.2} | {s3_cpu} | {:.0} |",
                    row.sc.name,
                    m.records,
                    m.jobs,
                    m.bytes_in as f64 / MB,
                    out(m.bytes_out as f64),
                    m.seconds,
                    r.rate(),
                    m.per_second(m.bytes_in) / MB,
                    out(m.per_second(m.bytes_out)),
                    1e3 * m.seconds * r.processes as f64 / m.jobs as f64,
                    r.rate() / median(&base[i]).rate(),
                    m.cpu_seconds,
                    r.broker_cpu_seconds,
                    m.peak_rss_kib as f64 / 1024.0,
                );
            }
        }
    }
    println!();
    for Row { sc, counts } in rows {
        println!(
            "{}: {:?} values, {} partitions × {} records, jobs of {}",
            sc.name, sc.values, sc.partitions, sc.records_per_partition, sc.job_records,
        );
        for (n, [raw, builder]) in counts {
            let m = &median(raw).total;
            println!(
                "  N={n}: wall s raw {:?}, builder {:?}; median's per-process s raw {:?}, \
                 builder {:?}; raw per job: {:.1} ms first to last record, {:.1} ms closing the \
                 consumer, {:.1} ms creating it and waiting for the first record",
                seconds(raw),
                seconds(builder),
                median(raw).process_seconds,
                median(builder).process_seconds,
                1e3 * m.stream_seconds / m.jobs as f64,
                1e3 * m.close_seconds / m.jobs as f64,
                // Per process: its wall time minus streaming and closing.
                1e3 * (median(raw).process_seconds.iter().sum::<f64>()
                    - m.stream_seconds
                    - m.close_seconds)
                    / m.jobs as f64,
            );
        }
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
        .map(|Row { sc, counts }| {
            let counts: Vec<_> = counts
                .iter()
                .map(|(n, [raw, builder])| {
                    serde_json::json!({
                        "builders": n,
                        "raw": median(raw),
                        "builder": median(builder),
                        "rawSeconds": seconds(raw),
                        "builderSeconds": seconds(builder),
                        "builderOverRawRecordsPerSecond":
                            median(builder).rate() / median(raw).rate(),
                    })
                })
                .collect();
            serde_json::json!({
                "scenario": sc.name,
                "values": format!("{:?}", sc.values),
                "partitions": sc.partitions,
                "recordsPerPartition": sc.records_per_partition,
                "jobRecords": sc.job_records,
                "zstdLevel": args.zstd_level,
                "dir": args.dir,
                "output": format!("{:?}", args.output),
                "cores": cores,
                "load": load.to_json(),
                "runs": counts,
            })
        })
        .collect();
    println!("{}", serde_json::json!({ "blocksmithBench": json }));
}
