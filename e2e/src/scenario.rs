//! Building blocks of e2e scenarios: pipelines, operator and builder processes, waiting,
//! reading committed offsets, acting as a builder through the API, auditing blocks.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blocksmith_crds::domain::LABEL_PIPELINE;
use blocksmith_crds::{BlockJob, BlockPipeline, JobPhase};
use kube::api::{Api, ListParams, Patch, PatchParams};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::Testbed;
use crate::datagen::{DataSpec, Produced, produce};
use crate::process::Proc;

/// A pipeline manifest with test-friendly defaults; `jobs` and `output` merge over them.
pub fn pipeline(
    name: &str,
    topic: &str,
    bootstrap: &str,
    output_url: &str,
    jobs: Value,
) -> BlockPipeline {
    let mut job_settings = json!({
        "maxRecords": 1000, "maxAge": "2s", "maxInFlightPerPartition": 1000,
        "leaseDurationSeconds": 6, "backoffLimit": 3,
    });
    if let (Some(base), Value::Object(over)) = (job_settings.as_object_mut(), jobs) {
        base.extend(over);
    }
    serde_json::from_value(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockPipeline",
        "metadata": { "name": name },
        "spec": {
            "kafka": { "bootstrapServers": bootstrap, "topic": topic },
            "jobs": job_settings,
            "output": { "url": output_url, "compressionLevel": 1 },
        }
    }))
    .expect("pipeline manifest")
}

pub async fn apply_pipeline(tb: &Testbed, ns: &str, bp: &BlockPipeline) {
    let api: Api<BlockPipeline> = Api::namespaced(tb.client.clone(), ns);
    let name = bp.metadata.name.clone().unwrap();
    api.patch(
        &name,
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(bp),
    )
    .await
    .expect("apply pipeline");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An operator process watching one namespace, with its leader lease in that namespace.
pub struct Operator {
    pub proc: Proc,
    pub metrics_port: u16,
}

pub fn spawn_operator(tb: &Testbed, ns: &str, name: &str) -> Operator {
    spawn_operator_with(tb, ns, name, &[])
}

pub fn spawn_operator_with(tb: &Testbed, ns: &str, name: &str, extra: &[&str]) -> Operator {
    let metrics_port = free_port();
    let mut cmd = tb.command("blocksmith-operator");
    cmd.args([
        "--namespace",
        ns,
        "--lease-namespace",
        ns,
        "--poll-interval",
        "1",
        "--lease-duration",
        "6",
    ])
    .args([
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--identity",
        name,
    ])
    .args(["--debounce-ms", "200"])
    .args(extra);
    Operator {
        proc: tb.spawn(&format!("{ns}-{name}"), cmd),
        metrics_port,
    }
}

/// A private S3 server (s3s-fs) over `root` on `port`, with the testbed's credentials: for
/// tests that stop and start it without disturbing the others.
pub fn spawn_s3(tb: &Testbed, name: &str, root: &Path, port: u16) -> Proc {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let mut cmd = std::process::Command::new(var("BLOCKSMITH_S3S_FS"));
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", &var("AWS_ACCESS_KEY_ID")])
        .args(["--secret-key", &var("AWS_SECRET_ACCESS_KEY")])
        .arg(root);
    tb.spawn(name, cmd)
}

/// The builder command line tests use (metrics on a free port unless `--metrics-addr` is
/// added); add flags or env before spawning.
pub fn builder_command(tb: &Testbed, ns: &str, pipeline: &str, id: &str) -> std::process::Command {
    let mut cmd = tb.command("blocksmith-builder");
    cmd.env(
        "BLOCKSMITH_METRICS_ADDR",
        format!("127.0.0.1:{}", free_port()),
    )
    .args(["--namespace", ns, "--pipeline", pipeline, "--identity", id])
    .args(["--grace-period", "5", "--kafka-idle-timeout", "20"])
    .arg("--work-dir")
    .arg(tb.dir.join("scratch").join(ns).join(id));
    cmd
}

pub fn spawn_builder(tb: &Testbed, ns: &str, pipeline: &str, id: &str) -> Proc {
    tb.spawn(&format!("{ns}-{id}"), builder_command(tb, ns, pipeline, id))
}

/// `n` builders of `pipeline`, `b0` to `b{n-1}`.
pub fn spawn_builders(tb: &Testbed, ns: &str, pipeline: &str, n: usize) -> Vec<Proc> {
    (0..n)
        .map(|i| spawn_builder(tb, ns, pipeline, &format!("b{i}")))
        .collect()
}

/// A fresh local output directory (the builder does not create a missing file:// root, as
/// it would not create a missing bucket: it usually means a volume is not mounted).
pub fn blocks_dir(tb: &Testbed, test: &str) -> PathBuf {
    let dir = tb
        .dir
        .join("blocks")
        .join(format!("{test}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Produces `spec` to the testbed's broker (on a blocking thread).
pub async fn produce_data(tb: &Testbed, spec: DataSpec) -> Produced {
    produce_data_to(&tb.kafka_bootstrap, spec).await
}

/// Produces `spec` to the broker at `bootstrap` (on a blocking thread).
pub async fn produce_data_to(bootstrap: &str, spec: DataSpec) -> Produced {
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || produce(&bootstrap, &spec))
        .await
        .unwrap()
        .expect("produce")
}

/// Partition → offset after its last produced record: what a complete run commits.
pub fn high_watermarks(produced: &Produced) -> BTreeMap<i32, i64> {
    produced
        .partitions
        .iter()
        .map(|(p, (_, high))| (*p, *high))
        .collect()
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Freezes `builder` (SIGSTOP) while it holds a running job of `pipeline`, and returns that
/// job once in-flight requests have landed and it is still running on `builder`. Jobs must
/// take seconds (see [`crate::broker::PrivateBroker::set_round_trip_time`]) for this to be
/// quick.
pub async fn freeze_in_a_job(
    tb: &Testbed,
    ns: &str,
    pipeline: &str,
    builder: &Proc,
    holder: &str,
) -> BlockJob {
    let holds = |j: &BlockJob| {
        j.phase() == JobPhase::Running
            && j.status
                .as_ref()
                .and_then(|s| s.lease.as_ref())
                .is_some_and(|l| l.holder == holder)
    };
    loop {
        let what = format!("{holder} running a job");
        let job = wait_for(&what, Duration::from_secs(60), || async {
            jobs(tb, ns, pipeline).await.into_iter().find(holds)
        })
        .await;
        builder.signal("STOP");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = jobs(tb, ns, pipeline)
            .await
            .into_iter()
            .find(|j| j.metadata.name == job.metadata.name);
        if let Some(now) = now.filter(holds) {
            return now;
        }
        builder.signal("CONT");
    }
}

pub async fn jobs(tb: &Testbed, ns: &str, pipeline: &str) -> Vec<BlockJob> {
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), ns);
    let mut jobs = api
        .list(&ListParams::default().labels(&format!("{LABEL_PIPELINE}={pipeline}")))
        .await
        .expect("list jobs")
        .items;
    jobs.sort_by_key(|j| (j.spec.partition, j.spec.start_offset));
    jobs
}

pub async fn get_pipeline(tb: &Testbed, ns: &str, name: &str) -> BlockPipeline {
    Api::<BlockPipeline>::namespaced(tb.client.clone(), ns)
        .get(name)
        .await
        .expect("get pipeline")
}

/// The status and reason of a pipeline condition.
pub fn condition(bp: &BlockPipeline, type_: &str) -> Option<(String, String, String)> {
    bp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until pipeline `name`'s condition `type_` has `status` and `reason`; returns its
/// message.
pub async fn wait_condition(
    tb: &Testbed,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
    timeout: Duration,
) -> String {
    let mut last = None;
    let found = tokio::time::timeout(timeout, async {
        loop {
            let c = condition(&get_pipeline(tb, ns, name).await, type_);
            if let Some((s, r, m)) = &c
                && s == status
                && r == reason
            {
                return m.clone();
            }
            last = c;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!("{ns}/{name}: no {type_}={status}/{reason} within {timeout:?}; last: {last:?}")
    })
}

/// (type, reason, note) of the Events on pipeline `pipeline`.
pub async fn pipeline_events(
    tb: &Testbed,
    ns: &str,
    pipeline: &str,
) -> Vec<(String, String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(tb.client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pipeline))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits up to 30 s for an Event on `pipeline` with `reason`; returns its note.
pub async fn wait_event(tb: &Testbed, ns: &str, pipeline: &str, reason: &str) -> String {
    let what = format!("a {reason} Event");
    wait_event_where(tb, ns, pipeline, &what, |_, r, _| r == reason)
        .await
        .2
}

/// Waits for an Event on `pipeline` (type, reason, note) that `matches`: the operator posts
/// Events after the status they go with, so they can trail a condition a test waited for.
pub async fn wait_event_where(
    tb: &Testbed,
    ns: &str,
    pipeline: &str,
    what: &str,
    matches: impl Fn(&str, &str, &str) -> bool,
) -> (String, String, String) {
    wait_for(
        &format!("{what} on {pipeline}"),
        Duration::from_secs(30),
        || async {
            pipeline_events(tb, ns, pipeline)
                .await
                .into_iter()
                .find(|(t, r, n)| matches(t, r, n))
        },
    )
    .await
}

/// A consumer of `group` that never joins it: for reading and committing its offsets.
fn group_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// The group's committed offsets as the broker reports them (partition → offset).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let consumer = group_consumer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .filter_map(|p| match got.find_partition(topic, p)?.offset() {
            Offset::Offset(o) => Some((p, o)),
            _ => None,
        })
        .collect()
}

/// [`committed_offsets`] on a blocking thread.
pub async fn group_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let (b, g, t) = (bootstrap.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, partitions))
        .await
        .unwrap()
}

/// Commits `offsets` (partition → next offset to read) for `group` without joining it, as
/// the operator does: e.g. to give a pipeline a committed offset before it starts.
pub fn commit_offsets(bootstrap: &str, group: &str, topic: &str, offsets: &BTreeMap<i32, i64>) {
    use rdkafka::consumer::CommitMode;
    let consumer = group_consumer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .expect("offset");
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// A partition's low and high watermarks (first offset still stored, next offset written).
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> (i64, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .expect("watermarks")
}

/// Waits until `group` has committed exactly `want` (partition → offset) on `topic`.
pub async fn wait_all_committed(
    tb: &Testbed,
    group: &str,
    topic: &str,
    want: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> BTreeMap<i32, i64> {
    let partitions = want.keys().max().map_or(0, |p| p + 1);
    wait_for(&format!("commits {want:?}"), timeout, || async {
        let c = group_offsets(&tb.kafka_bootstrap, group, topic, partitions).await;
        (c == *want).then_some(c)
    })
    .await
}

/// Waits until `group` committed everything `produced` (its high watermarks), then audits
/// the blocks under `blocks` exactly; returns the commits.
pub async fn wait_committed_then_audit(
    tb: &Testbed,
    group: &str,
    topic: &str,
    blocks: &Path,
    produced: &Produced,
    timeout: Duration,
) -> BTreeMap<i32, i64> {
    let committed = wait_all_committed(tb, group, topic, &high_watermarks(produced), timeout).await;
    audit_exact(tb, blocks, produced, &committed);
    committed
}

/// Audits the blocks under `blocks` against `produced`: every record below `committed`
/// exactly once with equal content, nothing else; panics with the report otherwise.
pub fn audit_exact(
    tb: &Testbed,
    blocks: &Path,
    produced: &Produced,
    committed: &BTreeMap<i32, i64>,
) -> Value {
    let csv = tb
        .dir
        .join(format!("expected-{:08x}.csv", rand::random::<u32>()));
    produced.write_csv(&csv).expect("write expected csv");
    let (report, exact) = audit(tb, blocks, &csv, Some(committed));
    println!("audit: {report}");
    assert!(exact, "audit not exact: {report}");
    assert_eq!(
        report["expected"].as_u64(),
        Some(produced.total()),
        "{report}"
    );
    assert_eq!(
        report["records"].as_u64(),
        Some(produced.total()),
        "{report}"
    );
    report
}

/// Acting as a builder through the API, exactly as builders do: SSA on `blockjobs/status`.
pub struct FakeBuilder {
    pub api: Api<BlockJob>,
    pub manager: String,
}

impl FakeBuilder {
    pub fn new(tb: &Testbed, ns: &str, manager: &str) -> Self {
        Self {
            api: Api::namespaced(tb.client.clone(), ns),
            manager: manager.into(),
        }
    }

    fn body(&self, phase: &str, attempt: i32, renew: &str, extra: Value) -> Value {
        let mut status = json!({
            "phase": phase,
            "attempt": attempt,
            "startTime": "2026-01-01T00:00:00Z",
            "lease": {
                "holder": self.manager, "acquireTime": "2026-01-01T00:00:00Z",
                "renewTime": renew, "leaseDurationSeconds": 6,
            },
        });
        if let (Some(s), Value::Object(e)) = (status.as_object_mut(), extra) {
            s.extend(e);
        }
        json!({ "apiVersion": "blocksmith.io/v1alpha1", "kind": "BlockJob", "status": status })
    }

    pub async fn claim(&self, job: &BlockJob) -> kube::Result<BlockJob> {
        let mut body = self.body("Running", job.attempt(), &now(), json!({}));
        body["metadata"] = json!({ "resourceVersion": job.metadata.resource_version });
        let name = job.metadata.name.clone().unwrap();
        self.api
            .patch_status(
                &name,
                &PatchParams::apply(&self.manager).force(),
                &Patch::Apply(body),
            )
            .await
    }

    /// A compare-and-swap report, as builders make it: forced apply guarded by the
    /// resourceVersion of `job`; on a changed job, retried only while the lease is still ours.
    pub async fn report(
        &self,
        job: &BlockJob,
        attempt: i32,
        phase: &str,
        extra: Value,
    ) -> kube::Result<BlockJob> {
        let name = job.metadata.name.clone().unwrap();
        let mut rv = job.metadata.resource_version.clone();
        loop {
            let mut body = self.body(phase, attempt, &now(), extra.clone());
            body["metadata"] = json!({ "resourceVersion": rv });
            match self
                .api
                .patch_status(
                    &name,
                    &PatchParams::apply(&self.manager).force(),
                    &Patch::Apply(body),
                )
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let fresh = self.api.get(&name).await?;
                    let st = fresh.status.clone().unwrap_or_default();
                    let ours = st.lease.as_ref().is_some_and(|l| l.holder == self.manager)
                        && st.phase == blocksmith_crds::JobPhase::Running
                        && st.attempt() == attempt;
                    if !ours {
                        return Err(kube::Error::Api(e));
                    }
                    rv = fresh.metadata.resource_version;
                }
                other => return other,
            }
        }
    }

    pub async fn succeed(&self, job: &BlockJob, attempt: i32) -> kube::Result<BlockJob> {
        let extra = json!({
            "completionTime": now(),
            "output": { "objects": [], "records": job.spec.end_offset - job.spec.start_offset, "bytes": 0, "sha256": "" }
        });
        self.report(job, attempt, "Succeeded", extra).await
    }
}

pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap()
        .to_string()
}

/// Runs `e2e/audit.py` over a directory of blocks; returns its JSON report and whether the
/// audit was exact.
pub fn audit(
    tb: &Testbed,
    blocks: &Path,
    expected_csv: &Path,
    committed: Option<&BTreeMap<i32, i64>>,
) -> (Value, bool) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("audit.py");
    let mut cmd = std::process::Command::new(&tb.python);
    cmd.arg(script)
        .arg("--blocks")
        .arg(blocks)
        .arg("--expected")
        .arg(expected_csv);
    if let Some(c) = committed {
        let map: BTreeMap<String, i64> = c.iter().map(|(p, o)| (p.to_string(), *o)).collect();
        cmd.arg("--committed")
            .arg(serde_json::to_string(&map).unwrap());
    }
    let out = cmd.output().expect("run audit.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "audit.py printed no report: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.success())
}

/// A plain HTTP GET on loopback (metrics endpoints); returns the body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// `(labels, value)` of every sample of `name` in a Prometheus text exposition.
pub fn prometheus_samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| Some((labels, value.parse().ok()?)))?
        })
        .collect()
}

/// Sum of a Prometheus counter family in a text exposition, optionally only the samples
/// whose labels contain `label` (e.g. `kind="create_job"`).
pub fn counter_sum(exposition: &str, name: &str, label: Option<&str>) -> f64 {
    prometheus_samples(exposition, name)
        .iter()
        .filter(|(labels, _)| label.is_none_or(|want| labels.contains(want)))
        .map(|(_, v)| v)
        .sum()
}

/// A minimal BlockJob, for tests that exercise the API contract without a pipeline.
pub fn bare_job(name: &str) -> BlockJob {
    serde_json::from_value(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "metadata": { "name": name },
        "spec": {
            "pipeline": "p", "topic": "t", "partition": 0, "startOffset": 0, "endOffset": 10,
            "bootstrapServers": "127.0.0.1:9092", "leaseDurationSeconds": 30,
            "output": { "url": "file:///tmp/x", "format": "parquet", "compression": "zstd" }
        }
    }))
    .expect("job manifest")
}

/// A status apply that sets only `lease.holder` (and the lease duration).
pub fn lease_patch(holder: &str) -> Patch<Value> {
    Patch::Apply(json!({
        "apiVersion": "blocksmith.io/v1alpha1",
        "kind": "BlockJob",
        "status": { "lease": { "holder": holder, "leaseDurationSeconds": 30 } }
    }))
}
