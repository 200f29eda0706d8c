//! blocksmith's processes and the servers a test runs of its own: operators, builders, a
//! private S3 server; and catching a builder in the middle of a job.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blocksmith_crds::{BlockJob, BlockPipeline};

use crate::Testbed;
use crate::cluster::{jobs, running_on};
use crate::process::Proc;
use crate::wait::wait_for;

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
        "--kafka-timeout",
        "3",
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

/// The builder command line tests use (metrics on a free port unless `--metrics-addr` is
/// added); add flags or env before spawning.
pub fn builder_command(tb: &Testbed, ns: &str, pipeline: &str, id: &str) -> Command {
    let mut cmd = tb.command("blocksmith-builder");
    cmd.env(
        "BLOCKSMITH_METRICS_ADDR",
        format!("127.0.0.1:{}", free_port()),
    )
    .args(["--namespace", ns, "--pipeline", pipeline, "--identity", id])
    .args(["--grace-period", "5", "--kafka-idle-timeout", "20"]);
    cmd
}

pub fn spawn_builder(tb: &Testbed, ns: &str, pipeline: &str, id: &str) -> Proc {
    spawn_builder_with(tb, ns, pipeline, id, |_| {})
}

/// A builder whose command line `edit` changed first (flags, environment).
pub fn spawn_builder_with(
    tb: &Testbed,
    ns: &str,
    pipeline: &str,
    id: &str,
    edit: impl FnOnce(&mut Command),
) -> Proc {
    let mut cmd = builder_command(tb, ns, pipeline, id);
    edit(&mut cmd);
    tb.spawn(&format!("{ns}-{id}"), cmd)
}

/// `n` builders of `pipeline`, `b0` to `b{n-1}`.
pub fn spawn_builders(tb: &Testbed, ns: &str, pipeline: &str, n: usize) -> Vec<Proc> {
    (0..n)
        .map(|i| spawn_builder(tb, ns, pipeline, &format!("b{i}")))
        .collect()
}

/// A private S3 server (s3s-fs) over `root` on `port`, with the testbed's credentials: for
/// tests that stop and start it without disturbing the others.
pub fn spawn_s3(tb: &Testbed, name: &str, root: &Path, port: u16) -> Proc {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let mut cmd = Command::new(var("BLOCKSMITH_S3S_FS"));
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", &var("AWS_ACCESS_KEY_ID")])
        .args(["--secret-key", &var("AWS_SECRET_ACCESS_KEY")])
        .arg(root);
    tb.spawn(name, cmd)
}

/// The Secret [`PrivateS3::serve`] gives a pipeline.
const OUTPUT_SECRET: &str = "output";

/// Makes `bp` write to `prefix` of bucket `blocksmith` of the server `settings` name, with
/// them in Secret `output` of `ns` (applied here).
pub async fn serve_output(
    tb: &Testbed,
    ns: &str,
    bp: &mut BlockPipeline,
    settings: serde_json::Value,
    prefix: &str,
) {
    crate::cluster::apply_secret(tb, ns, OUTPUT_SECRET, settings).await;
    bp.spec.output.url = format!("s3://blocksmith/{prefix}");
    bp.spec.output.credentials_secret_ref =
        Some(serde_json::from_value(serde_json::json!({"name": OUTPUT_SECRET})).unwrap());
}

/// A private S3 server with a bucket `blocksmith`, on a free port, that a test may stop and
/// start again.
pub struct PrivateS3 {
    tb: Testbed,
    name: String,
    pub root: PathBuf,
    pub port: u16,
    pub proc: Proc,
}

impl PrivateS3 {
    /// Served from `root` (created, with the bucket).
    pub fn spawn_at(tb: &Testbed, name: &str, root: PathBuf) -> PrivateS3 {
        std::fs::create_dir_all(root.join("blocksmith")).unwrap();
        let port = free_port();
        PrivateS3 {
            proc: spawn_s3(tb, name, &root, port),
            tb: tb.clone(),
            name: name.into(),
            root,
            port,
        }
    }

    /// Served from a fresh directory of the testbed.
    pub fn spawn(tb: &Testbed, name: &str) -> PrivateS3 {
        let root = tb
            .dir
            .join(format!("s3-{name}-{:08x}", rand::random::<u32>()));
        Self::spawn_at(tb, name, root)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points a builder's command line at this server (e.g. for
    /// [`crate::scenario::Run::spawn_builder_with`]).
    pub fn point(&self) -> impl Fn(&mut Command) + 'static {
        let endpoint = self.endpoint();
        move |cmd| {
            cmd.env("AWS_ENDPOINT", &endpoint);
        }
    }

    /// The settings a pipeline's `spec.output.credentialsSecretRef` gives for this server
    /// (the operator reads the output with them; builders spawned by a test get
    /// [`Self::point`] instead).
    pub fn settings(&self) -> serde_json::Value {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        serde_json::json!({
            "AWS_ENDPOINT": self.endpoint(),
            "AWS_ACCESS_KEY_ID": var("AWS_ACCESS_KEY_ID"),
            "AWS_SECRET_ACCESS_KEY": var("AWS_SECRET_ACCESS_KEY"),
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        })
    }

    /// Makes `bp` write to `prefix` of this server, with its settings in Secret `output` of
    /// `ns` (applied here).
    pub async fn serve(&self, tb: &Testbed, ns: &str, bp: &mut BlockPipeline, prefix: &str) {
        serve_output(tb, ns, bp, self.settings(), prefix).await;
    }

    /// Where the server keeps the objects under `prefix` of bucket `blocksmith`.
    pub fn dir(&self, prefix: &str) -> PathBuf {
        self.root.join("blocksmith").join(prefix)
    }

    /// SIGKILL: an outage.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Back after an outage, on the same port and data.
    pub fn start(&mut self) {
        self.proc = spawn_s3(&self.tb, &self.name, &self.root, self.port);
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
    loop {
        let job = wait_for_a_job_on(tb, ns, pipeline, holder).await;
        builder.signal("STOP");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = jobs(tb, ns, pipeline)
            .await
            .into_iter()
            .find(|j| j.metadata.name == job.metadata.name);
        if let Some(now) = now.filter(|j| running_on(j, holder)) {
            return now;
        }
        builder.signal("CONT");
    }
}

/// Waits up to 60 s for a job of `pipeline` running on `holder`.
pub async fn wait_for_a_job_on(tb: &Testbed, ns: &str, pipeline: &str, holder: &str) -> BlockJob {
    let what = format!("{holder} running a job");
    wait_for(&what, Duration::from_secs(60), || async {
        jobs(tb, ns, pipeline)
            .await
            .into_iter()
            .find(|j| running_on(j, holder))
    })
    .await
}
