//! The whole system's throughput end to end, next to the builder alone on the same data in
//! the same run: the ratio is the orchestration tax (issue 13, goal 5).
//!
//! Needs the testbed (`e2e/testbed up`, then `source .../env`): its API server, plus a broker
//! and an S3 server of the benchmark's own, started from this binary's directory
//! (`blocksmith-broker`, and the testbed's `s3s-fs`), so nothing else writes to them.
//!
//! The parent produces the data once (fixed-size values, spread over partitions: the mock
//! broker keeps at most 5 MiB per partition; one job per partition, as large as a partition
//! holds), then for each `--builders` count N, `--repeat` times:
//!
//! - **system**: in a fresh namespace, starts the release operator and N builder processes
//!   with their default settings, waits until all are ready, applies a BlockPipeline writing
//!   to `s3://` of the benchmark's S3 server, and times from the apply (the records were
//!   produced before) to the moment the group's committed offsets cover every record (polled
//!   every 20 ms once every job was seen `Succeeded`, every 250 ms before). Then waits for
//!   the lifecycle to end (the succeeded jobs deleted), reads the processes' API-write
//!   counters, and audits the blocks exactly (`e2e/audit.py`: every record once, with equal
//!   content) — a run that lost or duplicated anything stops the benchmark.
//! - **builder-only**: re-executes itself N times (`--child`), each process calling the
//!   builder library's `build_block` for a disjoint share of the same job ranges (dealt
//!   round-robin) into another prefix of the same S3 server; timed from the first process's
//!   first job to the last one's finish, as `blocksmith-bench` does. Audited the same way.
//!
//! The ratio system / builder-only records/s is what the orchestration costs: planning, the
//! claim and report round trips, watch propagation, the operator's debounce, manifest
//! confirmation and the commit.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use blocksmith_builder::reader::ReaderConfig;
use blocksmith_builder::runner::BuildSettings;
use blocksmith_builder::store::{OpenStores, UploadSettings};
use blocksmith_builder::worker::DEFAULT_CONCURRENT_JOBS;
use blocksmith_crds::domain::{LABEL_PIPELINE, default_consumer_group};
use blocksmith_crds::pipeline::{BlockFormat, Compression};
use blocksmith_crds::{BlockJob, BlockJobSpec, BlockPipeline, JobOutputSpec, JobPhase};
use blocksmith_e2e::Testbed;
use blocksmith_e2e::bench::{Range, build_ranges, share};
use blocksmith_e2e::broker::PrivateBroker;
use blocksmith_e2e::cluster::{apply_pipeline, jobs};
use blocksmith_e2e::datagen::{DataSpec, Produced, ValueSizes};
use blocksmith_e2e::host::{Load, LoadWatch, cpu_seconds, load_average, round2, unix_seconds};
use blocksmith_e2e::kafka::{high_watermarks, produce_data_to, watermarks};
use blocksmith_e2e::metrics::{OPERATOR_JOB_WRITE_KINDS, counter_sum};
use blocksmith_e2e::process::Proc;
use blocksmith_e2e::procs::{PrivateS3, free_port};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::{WatchStreamExt, watcher};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// Per-partition budget, below the mock broker's 5 MiB (as `blocksmith-bench`).
const PARTITION_BYTES: u64 = 3 << 20;
const PIPELINE: &str = "p";

#[derive(Parser)]
#[command(
    about = "Operator + N builders against the testbed, end to end, vs the builder alone on the same jobs"
)]
struct Args {
    /// Builder counts: for each N, a system run with N builder processes and a builder-only
    /// run with N processes.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    builders: Vec<usize>,
    /// Partitions of the topic; one job each.
    #[arg(long, default_value_t = 96)]
    partitions: i32,
    /// Bytes of every value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Records per partition, = the pipeline's `maxRecords` [default: what fits in 3 MiB,
    /// at most 50,000].
    #[arg(long)]
    records_per_partition: Option<u64>,
    /// Runs of each mode and N, alternating; the tables show the median run by wall time.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Give up on a system run after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,

    // Set by the parent for its builder-only children.
    #[arg(long, hide = true)]
    child: bool,
    #[arg(long, hide = true)]
    bootstrap: Option<String>,
    #[arg(long, hide = true)]
    topic: Option<String>,
    #[arg(long, hide = true)]
    cluster_id: Option<String>,
    /// `partition:start-end,...`, one job each.
    #[arg(long, hide = true, value_delimiter = ',')]
    ranges: Vec<Range>,
    #[arg(long, hide = true)]
    out_url: Option<String>,
    /// Jobs a builder-only child builds at once: the builders' `--concurrent-jobs`, which the
    /// system run's builders read from the same variable.
    #[arg(long, hide = true, env = "BLOCKSMITH_CONCURRENT_JOBS", default_value_t = DEFAULT_CONCURRENT_JOBS)]
    concurrent_jobs: u8,
}

/// What a builder-only child measured.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Child {
    jobs: usize,
    records: u64,
    bytes_in: u64,
    bytes_out: u64,
    seconds: f64,
    cpu_seconds: f64,
    started_unix: f64,
    finished_unix: f64,
}

/// When the job watch first saw a job, first saw it Running, first saw it Succeeded.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    created: Option<Instant>,
    running: Option<Instant>,
    succeeded: Option<Instant>,
}

/// One run of a mode with N processes.
#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Run {
    mode: &'static str,
    builders: usize,
    records: u64,
    jobs: usize,
    /// Timed window: system, apply → last offset committed; builder-only, first job's start
    /// → last process's finish.
    seconds: f64,
    /// CPU s in the window: the builders (and the operator, for system), summed.
    cpu_seconds: f64,
    operator_cpu_seconds: f64,
    broker_cpu_seconds: f64,
    s3_cpu_seconds: f64,
    /// The testbed cluster's processes ([`cluster_cpu_seconds`]).
    cluster_cpu_seconds: f64,
    /// 1-minute load average just before the run.
    load_before: f64,
    /// Builder-only: each process's own wall time.
    process_seconds: Vec<f64>,
    /// System only, below.
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<SystemDetail>,
}

#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct SystemDetail {
    /// Per job, over the whole lifecycle (until every succeeded job was deleted).
    operator_job_writes_per_job: f64,
    operator_writes_by_kind: BTreeMap<String, f64>,
    builder_writes_per_job: f64,
    pipeline_status_writes: f64,
    claims: f64,
    claim_conflicts: f64,
    /// Seconds after the apply, as the job watch saw it.
    first_job_created: f64,
    last_job_created: f64,
    first_claim: f64,
    last_claim: f64,
    last_succeeded: f64,
    /// Last job seen Succeeded → every offset committed.
    commit_tail: f64,
    /// Builders' own claim → report time (their `job_duration_seconds` histogram), summed.
    builder_job_seconds: f64,
    reconciles: f64,
    reconcile_seconds: f64,
    commits: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.records as f64 / self.seconds
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.child {
        return child(&args);
    }
    tokio::runtime::Runtime::new()?.block_on(parent(&args))
}

fn records_per_partition(args: &Args) -> u64 {
    args.records_per_partition
        .unwrap_or((PARTITION_BYTES / (args.value_size as u64 + 64)).clamp(1, 50_000))
}

/// The benchmark's own servers, and the data on them.
struct Bench {
    tb: Testbed,
    broker: PrivateBroker,
    s3: PrivateS3,
    topic: String,
    produced: Produced,
    ranges: Vec<Range>,
    job_records: i64,
    cluster_id: String,
    tag: String,
    /// The produced records, as `e2e/audit.py` reads them.
    expected_csv: PathBuf,
}

async fn parent(args: &Args) -> anyhow::Result<()> {
    let mut counts: Vec<usize> = args.builders.iter().map(|&n| n.max(1)).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut load = LoadWatch::start()?;
    let mut tb = Testbed::get().await;
    // blocksmith-operator, -builder and -broker next to this binary (target/release), unless
    // BLOCKSMITH_BIN_DIR names a copy.
    if std::env::var_os("BLOCKSMITH_BIN_DIR").is_none() {
        tb.bin_dir = std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf();
    }
    for bin in [
        "blocksmith-operator",
        "blocksmith-builder",
        "blocksmith-broker",
    ] {
        ensure!(
            tb.bin_dir.join(bin).exists(),
            "{} missing: cargo build --release -p blocksmith-operator -p blocksmith-builder \
             -p blocksmith-e2e --bins",
            tb.bin_dir.join(bin).display()
        );
    }
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let broker = PrivateBroker::spawn(&tb, &format!("sysbench-{tag}"));
    let tb = broker.testbed(&tb);
    let s3 = PrivateS3::spawn(&tb, &format!("sysbench-{tag}-s3"));
    let topic = format!("sysbench-{tag}");
    broker.create_topic(&topic, args.partitions);
    let rpp = records_per_partition(args);
    let spec = DataSpec {
        value_sizes: ValueSizes::Fixed(args.value_size),
        ..DataSpec::new(&topic, args.partitions, rpp * args.partitions as u64)
    };
    let started = Instant::now();
    let produced = produce_data_to(&broker.bootstrap, spec).await;
    eprintln!(
        "produced {} records ({:.1} MB of keys and values) in {:.1} s",
        produced.total(),
        produced.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let mut ranges = Vec::new();
    for partition in 0..args.partitions {
        let (start, end) = watermarks(&broker.bootstrap, &topic, partition);
        ensure!(
            start == 0 && end == rpp as i64,
            "{topic}[{partition}] holds [{start}, {end}), not [0, {rpp}): the mock broker keeps \
             5 MiB per partition; lower --records-per-partition"
        );
        ranges.push(Range {
            partition,
            start,
            end,
        });
    }
    let cluster_id = broker.cluster_id();
    let expected_csv = tb.dir.join(format!("sysbench-{tag}-expected.csv"));
    produced.write_csv(&expected_csv)?;
    let bench = Bench {
        tb,
        broker,
        s3,
        topic,
        produced,
        ranges,
        job_records: rpp as i64,
        cluster_id,
        tag,
        expected_csv,
    };
    let mut runs: Vec<[Vec<Run>; 2]> = counts.iter().map(|_| Default::default()).collect();
    for i in 0..args.repeat.max(1) {
        for (&n, runs) in counts.iter().zip(&mut runs) {
            let system = system_run(&bench, n, args).await?;
            let alone = builder_only_run(&bench, n, i)?;
            for run in [system, alone] {
                load.saw(run.load_before);
                eprintln!(
                    "{} N={n}: {} records, {} jobs in {:.2} s = {:.0} records/s (load {:.1})",
                    run.mode,
                    run.records,
                    run.jobs,
                    run.seconds,
                    run.rate(),
                    run.load_before
                );
                let slot = usize::from(run.mode != "system");
                runs[slot].push(run);
            }
        }
    }
    for modes in &mut runs {
        for runs in modes.iter_mut() {
            runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        }
    }
    report(&bench, &counts, &runs, args, load.finish()?);
    let _ = std::fs::remove_dir_all(&bench.s3.root);
    let _ = std::fs::remove_file(&bench.expected_csv);
    let _ = std::fs::remove_file(
        bench
            .tb
            .dir
            .join(format!("sysbench-{}-broker.json", bench.tag)),
    );
    Ok(())
}

/// The pipeline as a user would write it: only `maxRecords` (one job per partition) and
/// `ttlSecondsAfterSucceeded: 0` (so the whole job lifecycle, delete included, happens in the
/// run and its API writes are counted), everything else default.
fn pipeline_manifest(topic: &str, bootstrap: &str, job_records: i64) -> BlockPipeline {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockPipeline",
        "metadata": { "name": PIPELINE },
        "spec": {
            "kafka": { "bootstrapServers": bootstrap, "topic": topic },
            "jobs": { "maxRecords": job_records, "ttlSecondsAfterSucceeded": 0 },
            "output": { "url": "s3://blocksmith/unset" },
        }
    }))
    .expect("pipeline manifest")
}

/// A process with its metrics port.
struct Served {
    proc: Proc,
    port: u16,
}

async fn system_run(bench: &Bench, n: usize, args: &Args) -> anyhow::Result<Run> {
    let tb = &bench.tb;
    let ns = tb.namespace(&format!("sysbench-n{n}")).await;
    let prefix = format!("system-{ns}");
    let mut bp = pipeline_manifest(&bench.topic, &tb.kafka_bootstrap, bench.job_records);
    bench.s3.serve(tb, &ns, &mut bp, &prefix).await;

    // The operator and builders with their defaults (10 s lag poll, 500 ms debounce, 15 s
    // leader lease; builders: 60 s Kafka idle timeout, 16 MiB multipart threshold), each
    // watching this namespace only.
    let port = free_port();
    let mut cmd = tb.command("blocksmith-operator");
    cmd.args(["--namespace", &ns, "--lease-namespace", &ns])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--identity", "op"]);
    let operator = Served {
        proc: tb.spawn(&format!("{ns}-op"), cmd),
        port,
    };
    let builders: Vec<Served> = (0..n)
        .map(|i| {
            let port = free_port();
            let id = format!("b{i}");
            let mut cmd = tb.command("blocksmith-builder");
            cmd.args([
                "--namespace",
                &ns,
                "--pipeline",
                PIPELINE,
                "--identity",
                &id,
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
            bench.s3.point()(&mut cmd);
            Served {
                proc: tb.spawn(&format!("{ns}-{id}"), cmd),
                port,
            }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in std::iter::once(&operator).chain(&builders) {
        while !ready(p.port) {
            ensure!(
                Instant::now() < deadline,
                "{} not ready after 60 s: see {}",
                p.proc.name,
                p.proc.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let seen = watch_jobs(tb, &ns);
    // Let the watch list (nothing yet) before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let builder_pids: Vec<u32> = builders.iter().map(|b| b.proc.pid()).collect();
    let cpu0 = Cpu::read(&operator, &builder_pids, bench)?;
    let before = Scrape::read(&operator, &builders);
    let load_before = load_average()?;

    let applied = Instant::now();
    apply_pipeline(tb, &ns, &bp).await;
    let group = default_consumer_group(&ns, PIPELINE);
    let want = high_watermarks(&bench.produced);
    let (bootstrap, topic) = (tb.kafka_bootstrap.clone(), bench.topic.clone());
    let timeout = Duration::from_secs(args.timeout);
    let (watched, jobs_total) = (seen.clone(), bench.ranges.len());
    let all_succeeded = move || {
        let seen = watched.lock().unwrap();
        seen.len() >= jobs_total && seen.values().all(|s| s.succeeded.is_some())
    };
    let (committed, all_committed) = tokio::task::spawn_blocking(move || {
        poll_committed(
            &bootstrap,
            &group,
            &topic,
            &want,
            applied + timeout,
            all_succeeded,
        )
    })
    .await??;
    let seconds = all_committed.duration_since(applied).as_secs_f64();
    let cpu1 = Cpu::read(&operator, &builder_pids, bench)?;

    // The lifecycle ends with the succeeded jobs deleted; then every write is counted.
    let cleaned = Instant::now() + Duration::from_secs(120);
    while !jobs(tb, &ns, PIPELINE).await.is_empty() {
        ensure!(
            Instant::now() < cleaned,
            "{ns}: jobs not deleted after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = Scrape::read(&operator, &builders);
    let seen: Vec<Seen> = seen.lock().unwrap().values().copied().collect();
    let total = bench.produced.total();
    let blocks = bench.s3.dir(&prefix);
    let (audit, exact) = audit(bench, &blocks, &committed)?;
    ensure!(
        exact && audit["records"].as_u64() == Some(total),
        "{ns}: audit not exact: {audit}"
    );

    drop(builders);
    drop(operator);
    Api::<Namespace>::all(tb.client.clone())
        .delete(&ns, &DeleteParams::default())
        .await?;
    let _ = std::fs::remove_dir_all(&blocks);
    let _ = std::fs::remove_dir_all(tb.dir.join("scratch").join(&ns));

    let jobs_n = seen.len();
    ensure!(
        jobs_n == bench.ranges.len() && seen.iter().all(|s| s.succeeded.is_some()),
        "{ns}: the watch saw {jobs_n} jobs ({} succeeded), expected {}",
        seen.iter().filter(|s| s.succeeded.is_some()).count(),
        bench.ranges.len()
    );
    let since =
        |t: Option<Instant>| t.map_or(f64::NAN, |t| t.duration_since(applied).as_secs_f64());
    let first = |f: fn(&Seen) -> Option<Instant>| since(seen.iter().filter_map(f).min());
    let last = |f: fn(&Seen) -> Option<Instant>| since(seen.iter().filter_map(f).max());
    let d = |k: &str| after.get(k) - before.get(k);
    let per_job = |x: f64| x / jobs_n as f64;
    let last_succeeded = last(|s| s.succeeded);
    let detail = SystemDetail {
        operator_job_writes_per_job: per_job(OPERATOR_JOB_WRITE_KINDS.iter().map(|k| d(k)).sum()),
        operator_writes_by_kind: OPERATOR_JOB_WRITE_KINDS
            .iter()
            .chain(&["pipeline_status"])
            .map(|k| (k.to_string(), d(k)))
            .filter(|(_, v)| *v > 0.0)
            .collect(),
        builder_writes_per_job: per_job(d("builder_writes")),
        pipeline_status_writes: d("pipeline_status"),
        claims: d("claims"),
        claim_conflicts: d("claim_conflicts"),
        first_job_created: first(|s| s.created),
        last_job_created: last(|s| s.created),
        first_claim: first(|s| s.running),
        last_claim: last(|s| s.running),
        last_succeeded,
        commit_tail: seconds - last_succeeded,
        builder_job_seconds: d("job_seconds"),
        reconciles: d("reconciles"),
        reconcile_seconds: d("reconcile_seconds"),
        commits: d("commits"),
    };
    Ok(Run {
        mode: "system",
        builders: n,
        records: total,
        jobs: jobs_n,
        seconds,
        cpu_seconds: cpu1.builders - cpu0.builders + cpu1.operator - cpu0.operator,
        operator_cpu_seconds: cpu1.operator - cpu0.operator,
        broker_cpu_seconds: cpu1.broker - cpu0.broker,
        s3_cpu_seconds: cpu1.s3 - cpu0.s3,
        cluster_cpu_seconds: cpu1.cluster - cpu0.cluster,
        load_before,
        process_seconds: Vec::new(),
        system: Some(detail),
    })
}

/// `/readyz` answers 200.
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut response = String::new();
    write!(stream, "GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.split_whitespace().nth(1) == Some("200")
}

/// Records when the pipeline's jobs are first seen created, Running and Succeeded.
fn watch_jobs(tb: &Testbed, ns: &str) -> Arc<Mutex<HashMap<String, Seen>>> {
    let log: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), ns);
    let seen = log.clone();
    tokio::spawn(async move {
        let cfg = watcher::Config::default().labels(&format!("{LABEL_PIPELINE}={PIPELINE}"));
        let mut events = watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(job) = event else { continue };
            let now = Instant::now();
            let mut seen = seen.lock().unwrap();
            let s = seen.entry(job.name_any()).or_default();
            s.created.get_or_insert(now);
            match job.phase() {
                JobPhase::Running => {
                    s.running.get_or_insert(now);
                }
                JobPhase::Succeeded => {
                    s.succeeded.get_or_insert(now);
                }
                _ => {}
            }
        }
    });
    log
}

/// Polls the group's committed offsets until they are `want`; returns them and when they
/// were first seen so. Every 20 ms once `all_succeeded` (the earliest the last commit can
/// come), every 250 ms before: the broker and this process share the cores with the system
/// measured.
fn poll_committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    want: &BTreeMap<i32, i64>,
    deadline: Instant,
    all_succeeded: impl Fn() -> bool,
) -> anyhow::Result<(BTreeMap<i32, i64>, Instant)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in want.keys() {
        tpl.add_partition(topic, *p);
    }
    loop {
        let got = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))?;
        let now = Instant::now();
        let committed: BTreeMap<i32, i64> = want
            .keys()
            .filter_map(|&p| match got.find_partition(topic, p)?.offset() {
                Offset::Offset(o) => Some((p, o)),
                _ => None,
            })
            .collect();
        if committed == *want {
            return Ok((committed, now));
        }
        ensure!(
            now < deadline,
            "not everything committed in time: {} of {} partitions",
            committed
                .iter()
                .filter(|(p, o)| want.get(p) == Some(o))
                .count(),
            want.len()
        );
        let pause = if all_succeeded() { 20 } else { 250 };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// CPU seconds of the processes, read from `/proc`.
struct Cpu {
    operator: f64,
    builders: f64,
    broker: f64,
    s3: f64,
    cluster: f64,
}

impl Cpu {
    fn read(operator: &Served, builders: &[u32], bench: &Bench) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            operator: cpu_seconds(operator.proc.pid())?,
            builders: builders
                .iter()
                .map(cpu_seconds)
                .sum::<anyhow::Result<f64>>()?,
            broker: cpu_seconds(bench.broker.proc.pid())?,
            s3: cpu_seconds(bench.s3.proc.pid())?,
            cluster: cluster_cpu_seconds(&bench.tb)?,
        })
    }
}

/// CPU seconds of the testbed's cluster: the API server and etcd, which every API write goes
/// through, and the rest of the control plane and the node, which run whatever the load.
fn cluster_cpu_seconds(tb: &Testbed) -> anyhow::Result<f64> {
    const CLUSTER: [&str; 7] = [
        "kube-apiserver",
        "etcd",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "containerd",
        "kube-proxy",
    ];
    let mut total = 0.0;
    for name in CLUSTER {
        let Ok(pid) = std::fs::read_to_string(tb.dir.join("pids").join(name)) else {
            continue;
        };
        total += cpu_seconds(pid.trim())?;
    }
    Ok(total)
}

/// The counters a system run reads from the operator's and builders' `/metrics`.
struct Scrape(HashMap<&'static str, f64>);

impl Scrape {
    fn read(operator: &Served, builders: &[Served]) -> Scrape {
        let op = blocksmith_e2e::metrics::http_get(operator.port, "/metrics");
        let mut m = HashMap::new();
        for kind in OPERATOR_JOB_WRITE_KINDS
            .into_iter()
            .chain(["pipeline_status"])
        {
            let label = format!("kind=\"{kind}\"");
            m.insert(
                kind,
                counter_sum(&op, "blocksmith_api_writes_total", Some(&label)),
            );
        }
        m.insert(
            "reconciles",
            counter_sum(&op, "blocksmith_reconcile_duration_seconds_count", None),
        );
        m.insert(
            "reconcile_seconds",
            counter_sum(&op, "blocksmith_reconcile_duration_seconds_sum", None),
        );
        m.insert(
            "commits",
            counter_sum(&op, "blocksmith_commits_total", None),
        );
        for b in builders {
            let text = blocksmith_e2e::metrics::http_get(b.port, "/metrics");
            for (key, name) in [
                ("builder_writes", "blocksmith_builder_api_writes_total"),
                ("claims", "blocksmith_builder_claims_total"),
                (
                    "claim_conflicts",
                    "blocksmith_builder_claim_conflicts_total",
                ),
                ("job_seconds", "blocksmith_builder_job_duration_seconds_sum"),
            ] {
                *m.entry(key).or_default() += counter_sum(&text, name, None);
            }
        }
        Scrape(m)
    }

    fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }
}

/// Audits the blocks under `blocks` with `e2e/audit.py` (an independent Parquet reader):
/// every produced record below `committed` exactly once with equal content, nothing else.
fn audit(
    bench: &Bench,
    blocks: &std::path::Path,
    committed: &BTreeMap<i32, i64>,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let started = Instant::now();
    let committed: BTreeMap<String, i64> =
        committed.iter().map(|(p, o)| (p.to_string(), *o)).collect();
    let out = Command::new(&bench.tb.python)
        .arg(e2e_dir().join("audit.py"))
        .arg("--blocks")
        .arg(blocks)
        .arg("--expected")
        .arg(&bench.expected_csv)
        .arg("--committed")
        .arg(serde_json::to_string(&committed)?)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "audit.py printed no report: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    eprintln!(
        "audit of {} ({:.1} s): {report}",
        blocks.display(),
        started.elapsed().as_secs_f64()
    );
    Ok((report, out.status.success()))
}

/// The e2e crate's folder: cargo's when run by cargo, else the one this was built from.
fn e2e_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// N processes of `build_block` over disjoint shares of the jobs, job `i` to process `i % N`.
fn builder_only_run(bench: &Bench, n: usize, repeat: usize) -> anyhow::Result<Run> {
    let tb = &bench.tb;
    let prefix = format!("builder-only-{}-n{n}-{repeat}", bench.tag);
    let work = tb.dir.join("scratch").join(&prefix);
    let load_before = load_average()?;
    let broker0 = cpu_seconds(bench.broker.proc.pid())?;
    let s30 = cpu_seconds(bench.s3.proc.pid())?;
    let cluster0 = cluster_cpu_seconds(tb)?;
    let mut children = Vec::new();
    for i in 0..n {
        let Some(share) = share(&bench.ranges, i, n) else {
            continue;
        };
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--child")
            .args(["--bootstrap", &tb.kafka_bootstrap, "--topic", &bench.topic])
            .args(["--cluster-id", &bench.cluster_id])
            .arg(format!("--ranges={share}"))
            .arg(format!("--out-url=s3://blocksmith/{prefix}"))
            .env("AWS_ENDPOINT", bench.s3.endpoint());
        children.push(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a builder-only child")?,
        );
    }
    let mut processes = Vec::new();
    for child in children {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "builder-only child: {}", out.status);
        let stdout = String::from_utf8(out.stdout)?;
        let last = stdout.lines().last().context("child printed nothing")?;
        processes.push(serde_json::from_str::<Child>(last)?);
    }
    let broker_cpu_seconds = cpu_seconds(bench.broker.proc.pid())? - broker0;
    let s3_cpu_seconds = cpu_seconds(bench.s3.proc.pid())? - s30;
    let cluster_cpu_seconds = cluster_cpu_seconds(tb)? - cluster0;
    let started = processes
        .iter()
        .map(|m| m.started_unix)
        .fold(f64::MAX, f64::min);
    let finished = processes
        .iter()
        .map(|m| m.finished_unix)
        .fold(0.0, f64::max);
    let records: u64 = processes.iter().map(|m| m.records).sum();
    let blocks = bench.s3.dir(&prefix);
    let (report, exact) = audit(bench, &blocks, &high_watermarks(&bench.produced))?;
    ensure!(
        exact && records == bench.produced.total(),
        "builder-only blocks: {records} records written; audit {report}"
    );
    let _ = std::fs::remove_dir_all(&blocks);
    let _ = std::fs::remove_dir_all(&work);
    Ok(Run {
        mode: "builder-only",
        builders: n,
        records,
        jobs: processes.iter().map(|m| m.jobs).sum(),
        seconds: finished - started,
        cpu_seconds: processes.iter().map(|m| m.cpu_seconds).sum(),
        operator_cpu_seconds: 0.0,
        broker_cpu_seconds,
        s3_cpu_seconds,
        cluster_cpu_seconds,
        load_before,
        process_seconds: processes.iter().map(|m| round2(m.seconds)).collect(),
        system: None,
    })
}

/// A builder-only child: `build_block` for each range, as one builder builds the jobs it
/// claims (`--concurrent-jobs` at a time).
fn child(args: &Args) -> anyhow::Result<()> {
    let bootstrap = args.bootstrap.as_deref().context("--bootstrap")?;
    let topic = args.topic.as_deref().context("--topic")?;
    let url = args.out_url.as_deref().context("--out-url")?;
    let settings = BuildSettings {
        reader: ReaderConfig::new(bootstrap),
        upload: UploadSettings::default(),
        stores: OpenStores::default(),
    };
    // As the operator plans it, with the pipeline's defaults.
    let spec = |job: &Range| BlockJobSpec {
        pipeline: PIPELINE.into(),
        topic: topic.into(),
        partition: job.partition,
        start_offset: job.start,
        end_offset: job.end,
        bootstrap_servers: bootstrap.into(),
        kafka_cluster_id: args.cluster_id.clone(),
        kafka_topic_id: None,
        lease_duration_seconds: 30,
        output: JobOutputSpec {
            url: url.into(),
            format: BlockFormat::Parquet,
            compression: Compression::Zstd,
            compression_level: None,
            row_group_size: None,
            max_record_bytes: None,
        },
    };
    let started = Instant::now();
    let built = build_ranges(&args.ranges, spec, &settings, args.concurrent_jobs)?;
    let mut measured = Child {
        records: built.records,
        bytes_in: built.bytes_in,
        bytes_out: built.bytes_out,
        seconds: started.elapsed().as_secs_f64(),
        ..Child::default()
    };
    measured.finished_unix = unix_seconds();
    measured.started_unix = measured.finished_unix - measured.seconds;
    measured.jobs = args.ranges.len();
    measured.cpu_seconds = cpu_seconds("self")?;
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

/// The median run of runs sorted by wall time.
fn median(runs: &[Run]) -> &Run {
    &runs[runs.len() / 2]
}

fn seconds(runs: &[Run]) -> Vec<f64> {
    runs.iter().map(|r| round2(r.seconds)).collect()
}

fn report(bench: &Bench, counts: &[usize], runs: &[[Vec<Run>; 2]], args: &Args, load: Load) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let sc = format!(
        "{} records of {} B values over {} partitions, jobs of {} records (one per partition, \
         {} jobs; the mock broker keeps at most 5 MiB per partition)",
        bench.produced.total(),
        args.value_size,
        args.partitions,
        bench.job_records,
        bench.ranges.len()
    );
    println!(
        "{sc}. system: operator + N builder processes with their default settings, pipeline \
         with defaults except maxRecords and ttlSecondsAfterSucceeded: 0 (so the lifecycle's \
         deletes are counted); timed from the pipeline's apply (all records produced before) \
         to the last offset committed, the processes started and ready before. builder-only: \
         N processes calling build_block over disjoint shares of the same job ranges, first \
         job start to last finish. Both write to s3:// of the same s3s-fs server and are \
         audited exactly. Median of {} runs by wall time; system/builder-only = ratio of \
         records/s at the same N (the orchestration tax). CPU s = the N builders' (+ the \
         operator's) user + system time in the window; broker and S3 CPU s are the servers'; \
         cluster CPU s is the testbed's API server, etcd, the rest of the control plane and \
         the node.\n",
        args.repeat.max(1)
    );
    println!(
        "This machine has {cores} cores, shared by the builders, operator, broker, S3 server, \
         API server and etcd (and anything else running). {}\n",
        load.describe()
    );
    println!(
        "| N | mode | records | jobs | wall s | records/s | system/builder-only | CPU s | \
         operator CPU s | broker CPU s | S3 CPU s | cluster CPU s | operator writes/job | \
         builder writes/job |"
    );
    println!("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (n, [system, alone]) in counts.iter().zip(runs) {
        let ratio = median(system).rate() / median(alone).rate();
        for r in [median(system), median(alone)] {
            let (ratio, op_w, b_w) = match &r.system {
                Some(d) => (
                    format!("{ratio:.2}"),
                    format!("{:.2}", d.operator_job_writes_per_job),
                    format!("{:.2}", d.builder_writes_per_job),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "| {n} | {} | {} | {} | {:.2} | {:.0} | {ratio} | {:.2} | {} | {:.2} | {:.2} \
                 | {:.2} | {op_w} | {b_w} |",
                r.mode,
                r.records,
                r.jobs,
                r.seconds,
                r.rate(),
                r.cpu_seconds,
                match r.system {
                    Some(_) => format!("{:.2}", r.operator_cpu_seconds),
                    None => "-".into(),
                },
                r.broker_cpu_seconds,
                r.s3_cpu_seconds,
                r.cluster_cpu_seconds,
            );
        }
    }
    println!(
        "\nWhere the system run's time goes (median run; instants in seconds after the apply, \
         as a watch of the jobs saw them). start = apply → first job claimed; build phase = \
         first claim → last job seen Succeeded; tail = last Succeeded → every offset \
         committed. Per job, in the build phase: system = N × build phase / jobs; claim → \
         report = the builders' own `job_duration_seconds` (build plus the report write); \
         builder-only = the builder-only median's process time / jobs. build-phase ratio = \
         records/s over the build phase alone / builder-only records/s (what is left without \
         the fixed start and tail).\n"
    );
    println!(
        "| N | start s | build phase s | tail s | first / last job created | per job: system \
         ms | claim → report ms | builder-only ms | build-phase ratio | reconciles (their s) \
         | commits | claims (conflicts) |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (n, [system, alone]) in counts.iter().zip(runs) {
        let r = median(system);
        let Some(d) = &r.system else { continue };
        let alone = median(alone);
        let build = d.last_succeeded - d.first_claim;
        let jobs = r.jobs as f64;
        println!(
            "| {n} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | \
             {} ({:.2}) | {} | {} ({}) |",
            d.first_claim,
            build,
            d.commit_tail,
            d.first_job_created,
            d.last_job_created,
            1e3 * *n as f64 * build / jobs,
            1e3 * d.builder_job_seconds / jobs,
            1e3 * alone.process_seconds.iter().sum::<f64>() / alone.jobs as f64,
            r.records as f64 / build / alone.rate(),
            d.reconciles,
            d.reconcile_seconds,
            d.commits,
            d.claims,
            d.claim_conflicts,
        );
    }
    println!();
    for (n, [system, alone]) in counts.iter().zip(runs) {
        let d = median(system).system.as_ref();
        println!(
            "N={n}: wall s system {:?}, builder-only {:?}; median system's operator writes by \
             kind {:?}",
            seconds(system),
            seconds(alone),
            d.map(|d| &d.operator_writes_by_kind),
        );
    }
    let command: Vec<String> = std::iter::once("target/release/blocksmith-system-bench".into())
        .chain(std::env::args().skip(1))
        .collect();
    println!(
        "\nReproduce: (e2e/testbed up DIR; source DIR/env) cargo build --release \
         -p blocksmith-operator -p blocksmith-builder -p blocksmith-e2e --bins && {}",
        command.join(" ")
    );
    let json: Vec<_> = counts
        .iter()
        .zip(runs)
        .map(|(n, [system, alone])| {
            serde_json::json!({
                "builders": n,
                "system": median(system),
                "builderOnly": median(alone),
                "systemSeconds": seconds(system),
                "builderOnlySeconds": seconds(alone),
                "systemOverBuilderOnly": median(system).rate() / median(alone).rate(),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({ "blocksmithSystemBench": {
            "records": bench.produced.total(),
            "valueSize": args.value_size,
            "partitions": args.partitions,
            "jobRecords": bench.job_records,
            "cores": cores,
            "load": load.to_json(),
            "runs": json,
        }})
    );
}
