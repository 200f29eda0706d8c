//! Operator scale: P partitions with J live (Pending) BlockJobs each, no builders, on the
//! running testbed. For each scale it measures how fast the operator plans the jobs, then,
//! over a steady window: reconcile latency p50/p99, operator CPU and peak RSS, API requests
//! per second, and what etcd holds. The baseline is the same measurement at a tenth of the
//! partitions, in the same run, plus the time of one LIST of the pipeline's jobs.
//!
//!   e2e/testbed up /tmp/tb && source /tmp/tb/env
//!   cargo build --release -p blocksmith-operator -p blocksmith-e2e --bin blocksmith-operator --bin blocksmith-scale
//!   $CARGO_TARGET_DIR/release/blocksmith-scale
//!
//! The operator logs to `$TMPDIR/blocksmith-scale-<namespace>.log` at `BLOCKSMITH_SCALE_LOG`
//! (a `RUST_LOG` filter; default `warn`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::{BlockJob, BlockPipeline};
use blocksmith_e2e::broker;
use blocksmith_e2e::cluster::pipeline;
use blocksmith_e2e::datagen::{DataSpec, ValueSizes, produce};
use blocksmith_e2e::host::{cpu_seconds, peak_rss_kib};
use blocksmith_e2e::metrics::{counter_sum, http_get, prometheus_samples};
use blocksmith_e2e::procs::free_port;
use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Scales to run, each PARTITIONSxJOBS_PER_PARTITION.
    #[arg(long, value_delimiter = ',', default_value = "100x10,1000x10")]
    scales: Vec<String>,
    /// Records per job (16-byte values).
    #[arg(long, default_value_t = 10)]
    records_per_job: u64,
    /// Steady-state measurement window, seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// The operator binary (default: next to this one).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
}

#[derive(Debug)]
struct Row {
    partitions: i32,
    jobs: i64,
    planning_s: f64,
    planning_writes_per_job: f64,
    reconciles: f64,
    p50_ms: f64,
    p99_ms: f64,
    list_ms: f64,
    cpu_pct: f64,
    rss_mib: f64,
    api_rps: f64,
    blocksmith_rps: f64,
    etcd_jobs: usize,
    etcd_job_bytes: usize,
    etcd_db_mib: f64,
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} not set: source the env of `e2e/testbed up`"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let operator_bin = match &args.operator_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("blocksmith-operator"),
    };
    anyhow::ensure!(
        operator_bin.exists(),
        "{} missing; build it first",
        operator_bin.display()
    );
    let mut rows = Vec::new();
    for scale in &args.scales {
        let (p, j) = scale
            .split_once('x')
            .and_then(|(p, j)| Some((p.parse::<i32>().ok()?, j.parse::<i64>().ok()?)))
            .with_context(|| format!("--scales: {scale:?} is not PARTITIONSxJOBS"))?;
        eprintln!("== {p} partitions x {j} jobs");
        rows.push(run_scale(&client, &args, &operator_bin, p, j).await?);
    }
    report(&rows, &args);
    Ok(())
}

async fn run_scale(
    client: &kube::Client,
    args: &Args,
    operator_bin: &PathBuf,
    partitions: i32,
    jobs_per_partition: i64,
) -> anyhow::Result<Row> {
    let ns = format!(
        "scale-{partitions}-{:06x}",
        rand::random::<u32>() & 0xff_ffff
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let control = env("BLOCKSMITH_KAFKA_CONTROL")?;
    let bootstrap = env("BLOCKSMITH_KAFKA_BOOTSTRAP")?;
    let topic = ns.clone();
    broker::create_topic(&control, &topic, partitions)?;
    let records = partitions as u64 * jobs_per_partition as u64 * args.records_per_job;
    let spec = DataSpec {
        value_sizes: ValueSizes::Fixed(16),
        ..DataSpec::new(&topic, partitions, records)
    };
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || produce(&b, &spec)).await??;

    let bp = pipeline(
        "scale",
        &topic,
        &bootstrap,
        "file:///tmp/blocksmith-scale-unused",
        json!({
            "maxRecords": args.records_per_job,
            "maxAge": "1h",
            "maxInFlightPerPartition": jobs_per_partition,
        }),
    );
    let pipelines: Api<BlockPipeline> = Api::namespaced(client.clone(), &ns);
    pipelines
        .patch(
            "scale",
            &PatchParams::apply("blocksmith-scale").force(),
            &Patch::Apply(&bp),
        )
        .await?;

    let metrics_port = free_port();
    let mut operator = Operator::spawn(operator_bin, &ns, metrics_port)?;
    let expected = partitions as i64 * jobs_per_partition;

    // Planning: from the operator's start until every job exists (its queue depth says so).
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", metrics_port)).is_err() {
        if !operator.running() || started.elapsed() > Duration::from_secs(30) {
            bail!(
                "operator metrics not served; see {}",
                operator.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writes_before = operator_writes(metrics_port);
    loop {
        let depth = pipelines
            .get_status("scale")
            .await?
            .status
            .map(|s| s.queue_depth)
            .unwrap_or(0);
        if depth == expected {
            break;
        }
        if !operator.running() {
            bail!(
                "operator exited during planning; see {}",
                operator.log.display()
            );
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("{expected} jobs not planned in 30 min (queue depth {depth})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let planning_s = started.elapsed().as_secs_f64();
    let planning_writes = operator_writes(metrics_port) - writes_before;

    // Steady state.
    let apiserver = ApiserverMetrics::scrape(client).await?;
    let operator_before = http_get(metrics_port, "/metrics");
    let cpu_before = cpu_seconds(operator.pid())?;
    let window_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window)).await;
    let window = window_started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(operator.pid())? - cpu_before;
    let operator_after = http_get(metrics_port, "/metrics");
    let apiserver_after = ApiserverMetrics::scrape(client).await?;
    let rss_mib = peak_rss_kib(operator.pid())? as f64 / 1024.0;
    let (reconciles, p50, p99) = reconcile_quantiles(&operator_before, &operator_after);

    let jobs: Api<BlockJob> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels(&format!("{LABEL_PIPELINE}=scale"));
    let mut lists = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let n = jobs.list(&lp).await?.items.len() as i64;
        lists.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(n == expected, "listed {n} jobs, expected {expected}");
    }
    lists.sort_by(f64::total_cmp);
    let (etcd_jobs, etcd_job_bytes) =
        etcd_prefix(&format!("/registry/blocksmith.io/blockjobs/{ns}/"))?;
    let etcd_db_mib = etcd_metric("etcd_mvcc_db_total_size_in_bytes")? / (1 << 20) as f64;

    let row = Row {
        partitions,
        jobs: expected,
        planning_s,
        planning_writes_per_job: planning_writes / expected as f64,
        reconciles,
        p50_ms: p50 * 1e3,
        p99_ms: p99 * 1e3,
        list_ms: lists[1] * 1e3,
        cpu_pct: 100.0 * cpu / window,
        rss_mib,
        api_rps: (apiserver_after.total - apiserver.total) / window,
        blocksmith_rps: (apiserver_after.blocksmith - apiserver.blocksmith) / window,
        etcd_jobs,
        etcd_job_bytes,
        etcd_db_mib,
    };
    // The row is kept whatever the cleanup does.
    eprintln!("{row:?}");
    if let Err(e) = clean_up(client, &ns, &mut operator).await {
        eprintln!(
            "warning: cleaning up {ns}: {e:#}; the next scale may be measured on a loaded API server"
        );
    }
    Ok(row)
}

/// Deletes the scale's pipeline and jobs, then its namespace, with the operator still
/// running: it lets go of the jobs (their finalizer `blocksmith.io/keep-range`) once their
/// pipeline is gone. Stopped first, it would leave the namespace terminating for good, and
/// the namespace controller retrying it would load the API server under the next scale's
/// measurement. The pipeline goes before the namespace, whose deletion would take the
/// operator's leader lease with it.
async fn clean_up(client: &kube::Client, ns: &str, operator: &mut Operator) -> anyhow::Result<()> {
    let pipelines: Api<BlockPipeline> = Api::namespaced(client.clone(), ns);
    let jobs: Api<BlockJob> = Api::namespaced(client.clone(), ns);
    pipelines.delete("scale", &DeleteParams::default()).await?;
    // All at once: the garbage collector deletes a pipeline's jobs ~10 a second. A DELETE of
    // 10,000 jobs can outlast the API server's request timeout; what it left, the collector
    // deletes.
    if let Err(e) = jobs
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
    {
        eprintln!("deleting the jobs (the garbage collector will finish it): {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while !jobs
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .items
        .is_empty()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "jobs of {ns} still there 10 min after their pipeline's deletion"
        );
        anyhow::ensure!(
            operator.running(),
            "the operator exited while the jobs were deleted; see {}",
            operator.log.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    operator.stop();
    Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await?;

    Ok(())
}

struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    /// The operator with its production defaults (10 s poll), watching one namespace.
    fn spawn(bin: &PathBuf, ns: &str, metrics_port: u16) -> anyhow::Result<Operator> {
        let log = std::env::temp_dir().join(format!("blocksmith-scale-{ns}.log"));
        let child = Command::new(bin)
            .args(["--namespace", ns, "--lease-namespace", ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env(
                "RUST_LOG",
                std::env::var("BLOCKSMITH_SCALE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Operator { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn operator_writes(port: u16) -> f64 {
    counter_sum(
        &http_get(port, "/metrics"),
        "blocksmith_api_writes_total",
        None,
    )
}

/// Reconciles in the window and their p50 and p99 (seconds), interpolated within the
/// histogram's ×1.5 buckets from the difference of two scrapes.
fn reconcile_quantiles(before: &str, after: &str) -> (f64, f64, f64) {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        prometheus_samples(text, "blocksmith_reconcile_duration_seconds_bucket")
            .into_iter()
            .filter_map(|(labels, count)| {
                let le = labels.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count))
            })
            .collect()
    };
    let (b, a) = (buckets(before), buckets(after));
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - b.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m),
            )
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    let quantile = |q: f64| {
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, n) in &delta {
            if n >= rank && n > prev.1 {
                if le.is_infinite() {
                    return prev.0;
                }
                return prev.0 + (le - prev.0) * (rank - prev.1) / (n - prev.1);
            }
            prev = (le, n);
        }
        f64::NAN
    };
    (total, quantile(0.5), quantile(0.99))
}

struct ApiserverMetrics {
    total: f64,
    blocksmith: f64,
}

impl ApiserverMetrics {
    async fn scrape(client: &kube::Client) -> anyhow::Result<Self> {
        let text = client
            .request_text(http::Request::get("/metrics").body(Vec::new())?)
            .await?;
        Ok(ApiserverMetrics {
            total: counter_sum(&text, "apiserver_request_total", None),
            blocksmith: counter_sum(
                &text,
                "apiserver_request_total",
                Some("group=\"blocksmith.io\""),
            ),
        })
    }
}

/// Keys and total value bytes under an etcd prefix (the v3 JSON gateway).
fn etcd_prefix(prefix: &str) -> anyhow::Result<(usize, usize)> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("prefix") += 1;
    let body = json!({"key": B64.encode(prefix), "range_end": B64.encode(&end)}).to_string();
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "-d", &body])
        .arg(format!("{}/v3/kv/range", env("BLOCKSMITH_ETCD")?))
        .output()?;
    anyhow::ensure!(out.status.success(), "etcd range request failed");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let kvs = reply["kvs"].as_array().cloned().unwrap_or_default();
    let bytes = kvs
        .iter()
        .filter_map(|kv| B64.decode(kv["value"].as_str()?).ok())
        .map(|v| v.len())
        .sum();
    Ok((kvs.len(), bytes))
}

fn etcd_metric(name: &str) -> anyhow::Result<f64> {
    let out = Command::new("curl")
        .arg("-sf")
        .arg(format!("{}/metrics", env("BLOCKSMITH_ETCD")?))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    prometheus_samples(&text, name)
        .first()
        .map(|(_, v)| *v)
        .with_context(|| format!("etcd metric {name} missing"))
}

fn report(rows: &[Row], args: &Args) {
    println!(
        "\n| partitions | live jobs | planning | operator writes/job | reconciles in {}s | reconcile p50 | p99 | one LIST of the jobs | operator CPU | peak RSS | API req/s (all / blocksmith.io) | etcd: jobs, bytes | etcd db |",
        args.window
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} s ({:.0} jobs/s) | {:.2} | {:.0} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1}% | {:.0} MiB | {:.1} / {:.1} | {} , {:.1} MiB ({:.0} B/job) | {:.0} MiB |",
            r.partitions,
            r.jobs,
            r.planning_s,
            r.jobs as f64 / r.planning_s,
            r.planning_writes_per_job,
            r.reconciles,
            r.p50_ms,
            r.p99_ms,
            r.list_ms,
            r.cpu_pct,
            r.rss_mib,
            r.api_rps,
            r.blocksmith_rps,
            r.etcd_jobs,
            r.etcd_job_bytes as f64 / (1 << 20) as f64,
            r.etcd_job_bytes as f64 / r.etcd_jobs.max(1) as f64,
            r.etcd_db_mib,
        );
    }
    let per = |f: fn(&Row) -> f64| {
        rows.last()
            .zip(rows.first())
            .map_or(f64::NAN, |(l, f0)| f(l) / f(f0))
    };
    if rows.len() > 1 {
        println!(
            "\nlargest vs smallest scale: jobs x{:.0}, reconcile p50 x{:.1}, CPU x{:.1}, RSS x{:.1}",
            per(|r| r.jobs as f64),
            per(|r| r.p50_ms),
            per(|r| r.cpu_pct),
            per(|r| r.rss_mib),
        );
    }
    println!(
        "\nreproduce: e2e/testbed up DIR && source DIR/env && cargo build --release -p blocksmith-operator -p blocksmith-e2e --bin blocksmith-operator --bin blocksmith-scale && $CARGO_TARGET_DIR/release/blocksmith-scale --scales {} --records-per-job {} --window {}",
        args.scales.join(","),
        args.records_per_job,
        args.window
    );
}
