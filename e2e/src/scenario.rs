//! The common opening of an e2e scenario as one builder, and everything a scenario uses
//! (`use blocksmith_e2e::scenario::*`):
//!
//! ```ignore
//! let s = Scenario::new("bld-file")
//!     .partitions(8)
//!     .records(100_000)
//!     .jobs(json!({"maxRecords": 2500}))
//!     .operator()
//!     .builders(3)
//!     .await;
//! s.wait_committed_then_audit(Duration::from_secs(400)).await;
//! ```
//!
//! Awaiting it makes a namespace, a topic (on a broker of the test's own with
//! [`Scenario::private_broker`]), produces the records, applies pipeline `p` writing to a fresh
//! local directory, and spawns the operator and builders asked for, in that order.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use blocksmith_crds::domain::default_consumer_group;
use blocksmith_crds::{BlockJob, BlockPipeline, JobPhase};
use derive_setters::Setters;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde_json::{Value, json};

pub use crate::Testbed;
pub use crate::blocks::*;
use crate::broker::PrivateBroker;
pub use crate::cluster::*;
use crate::datagen::{DataSpec, Produced, ValueSizes};
pub use crate::fake_builder::*;
pub use crate::kafka::*;
pub use crate::metrics::*;
use crate::process::Proc;
pub use crate::procs::*;
pub use crate::wait::*;

type PipelineEdit = Box<dyn FnOnce(&mut BlockPipeline)>;
type CommandEdit = Box<dyn Fn(&mut Command)>;

/// How a scenario starts; see the module documentation.
#[derive(Setters)]
#[setters(generate = false)]
pub struct Scenario {
    test: String,
    /// Partitions of the topic (1 unless said).
    #[setters(generate)]
    partitions: i32,
    /// Records produced over the partitions before the pipeline is applied (none unless said).
    #[setters(generate)]
    records: u64,
    /// Every value of this many bytes (mixed sizes unless said).
    #[setters(generate, strip_option)]
    value_size: Option<usize>,
    /// The topic is named but not created (nor written to).
    #[setters(generate, bool)]
    missing_topic: bool,
    /// A broker of the test's own (named after the namespace), e.g. to slow it down.
    #[setters(generate, bool)]
    private_broker: bool,
    /// The pipeline's name (`p` unless said).
    #[setters(generate, rename = "named", into)]
    name: String,
    /// `spec.jobs` settings merged over [`pipeline`]'s defaults.
    #[setters(generate)]
    jobs: Value,
    /// `spec.output.url` (a fresh local directory unless said).
    #[setters(generate, strip_option, into)]
    output: Option<String>,
    edits: Vec<PipelineEdit>,
    /// The output on a private S3 server: (its settings for Secret `output`, prefix).
    output_on: Option<(Value, String)>,
    /// The pipeline is built but not applied: the test applies [`Run::bp`] when it is ready.
    #[setters(generate, bool)]
    unapplied: bool,
    /// An operator, `op`, watching the namespace.
    #[setters(generate, bool)]
    operator: bool,
    builders: usize,
    builder_edit: Option<CommandEdit>,
    /// The testbed to run on (the shared one unless said), e.g. a private API server's.
    #[setters(generate, strip_option, rename = "on")]
    testbed: Option<Testbed>,
}

/// Awaiting a scenario starts it.
impl IntoFuture for Scenario {
    type Output = Run;
    type IntoFuture = LocalBoxFuture<'static, Run>;

    fn into_future(self) -> Self::IntoFuture {
        self.start().boxed_local()
    }
}

impl Scenario {
    /// `test` names the namespace, the topic and the output directory (each made unique).
    pub fn new(test: &str) -> Scenario {
        Scenario {
            test: test.into(),
            partitions: 1,
            records: 0,
            value_size: None,
            missing_topic: false,
            private_broker: false,
            name: "p".into(),
            jobs: json!({}),
            output: None,
            edits: Vec::new(),
            output_on: None,
            unapplied: false,
            operator: false,
            builders: 0,
            builder_edit: None,
            testbed: None,
        }
    }

    /// Any other change to the pipeline before it is applied.
    pub fn pipeline(mut self, edit: impl FnOnce(&mut BlockPipeline) + 'static) -> Scenario {
        self.edits.push(Box::new(edit));
        self
    }

    /// `n` builders of the pipeline, `b0` to `b{n-1}`.
    pub fn builders(mut self, n: usize) -> Scenario {
        self.builders = n;
        self
    }

    /// `n` builders whose command line `edit` changed (flags, environment).
    pub fn builders_with(mut self, n: usize, edit: impl Fn(&mut Command) + 'static) -> Scenario {
        self.builders = n;
        self.builder_edit = Some(Box::new(edit));
        self
    }

    /// The pipeline writes to `prefix` of `s3`, with the server's settings in its
    /// `credentialsSecretRef` (as the operator and a Deployment's builders read them).
    pub fn output_on(mut self, s3: &PrivateS3, prefix: &str) -> Scenario {
        self.output_on = Some((s3.settings(), prefix.to_string()));
        self
    }

    /// `n` builders whose object store is `s3` (a [`PrivateS3`]).
    pub fn builders_on(self, n: usize, s3: &PrivateS3) -> Scenario {
        self.builders_with(n, s3.point())
    }

    async fn start(self) -> Run {
        let shared = match self.testbed {
            Some(tb) => tb,
            None => Testbed::get().await,
        };
        let ns = shared.namespace(&self.test).await;
        let broker = self
            .private_broker
            .then(|| PrivateBroker::spawn(&shared, &ns));
        let tb = broker
            .as_ref()
            .map_or(shared.clone(), |b| b.testbed(&shared));
        let topic = if !self.missing_topic {
            tb.topic(&self.test, self.partitions)
        } else {
            format!("{}-{:08x}", self.test, rand::random::<u32>())
        };
        let produced = if self.records > 0 {
            let mut spec = DataSpec::new(&topic, self.partitions, self.records);
            if let Some(size) = self.value_size {
                spec.value_sizes = ValueSizes::Fixed(size);
            }
            produce_data(&tb, spec).await
        } else {
            Produced::default()
        };
        let blocks = blocks_dir(&tb, &self.test);
        let url = self.output.unwrap_or_else(|| file_url(&blocks));
        let mut bp = pipeline(&self.name, &topic, &tb.kafka_bootstrap, &url, self.jobs);
        if let Some((settings, prefix)) = self.output_on {
            serve_output(&tb, &ns, &mut bp, settings, &prefix).await;
        }
        for edit in self.edits {
            edit(&mut bp);
        }
        if !self.unapplied {
            apply_pipeline(&tb, &ns, &bp).await;
        }
        let mut run = Run {
            shown_on_failure: ShowOnFailure { ns: ns.clone() },
            group: default_consumer_group(&ns, &self.name),
            partitions: self.partitions,
            tb,
            ns,
            topic,
            name: self.name,
            produced,
            blocks,
            bp,
            operator: None,
            builders: Vec::new(),
            broker,
        };
        if self.operator {
            run.operator = Some(run.spawn_operator("op"));
        }
        let edit = self.builder_edit.unwrap_or_else(|| Box::new(|_| {}));
        run.builders = (0..self.builders)
            .map(|i| run.spawn_builder_with(&format!("b{i}"), &edit))
            .collect();
        run
    }
}

/// A started scenario: where its pipeline reads and writes, and its processes (killed when
/// it is dropped).
pub struct Run {
    /// First, so that it shows the jobs before the processes are killed.
    pub shown_on_failure: ShowOnFailure,
    pub tb: Testbed,
    pub ns: String,
    pub topic: String,
    pub partitions: i32,
    /// The pipeline's name.
    pub name: String,
    /// Its consumer group.
    pub group: String,
    pub produced: Produced,
    /// The fresh local output directory (the pipeline's unless [`Scenario::output`] said).
    pub blocks: PathBuf,
    /// The pipeline as applied (or to apply, with [`Scenario::unapplied`]).
    pub bp: BlockPipeline,
    pub operator: Option<Operator>,
    pub builders: Vec<Proc>,
    pub broker: Option<PrivateBroker>,
}

impl Run {
    /// The private broker ([`Scenario::private_broker`]).
    pub fn broker(&self) -> &PrivateBroker {
        self.broker
            .as_ref()
            .expect("a scenario with a private broker")
    }

    pub fn spawn_operator(&self, identity: &str) -> Operator {
        spawn_operator(&self.tb, &self.ns, identity)
    }

    pub fn spawn_builder(&self, id: &str) -> Proc {
        spawn_builder(&self.tb, &self.ns, &self.name, id)
    }

    /// `n` builders, `b0` to `b{n-1}`.
    pub fn spawn_builders(&self, n: usize) -> Vec<Proc> {
        spawn_builders(&self.tb, &self.ns, &self.name, n)
    }

    pub fn spawn_builder_with(&self, id: &str, edit: impl FnOnce(&mut Command)) -> Proc {
        spawn_builder_with(&self.tb, &self.ns, &self.name, id, edit)
    }

    pub async fn apply(&self, bp: &BlockPipeline) {
        apply_pipeline(&self.tb, &self.ns, bp).await
    }

    /// The pipeline as the API server has it now.
    pub async fn get(&self) -> BlockPipeline {
        get_pipeline(&self.tb, &self.ns, &self.name).await
    }

    /// The pipeline's condition `type_` now.
    pub async fn condition(&self, type_: &str) -> Option<Condition> {
        condition(&self.get().await, type_)
    }

    pub async fn jobs(&self) -> Vec<BlockJob> {
        jobs(&self.tb, &self.ns, &self.name).await
    }

    /// The job named `name`, if it exists.
    pub async fn job(&self, name: &Option<String>) -> Option<BlockJob> {
        self.jobs()
            .await
            .into_iter()
            .find(|j| j.metadata.name == *name)
    }

    /// Waits (up to two minutes) until some job has succeeded.
    pub async fn wait_some_progress(&self) {
        wait_for("some progress", Duration::from_secs(120), || async {
            self.jobs()
                .await
                .iter()
                .any(|j| j.phase() == JobPhase::Succeeded)
                .then_some(())
        })
        .await;
    }

    pub async fn wait_jobs(&self, n: usize) -> Vec<BlockJob> {
        wait_jobs(&self.tb, &self.ns, &self.name, n).await
    }

    /// Waits for the pipeline's condition to match `cond`; returns it.
    pub async fn wait(&self, cond: Cond) -> Condition {
        wait_condition(&self.tb, &self.ns, &self.name, &cond).await
    }

    pub async fn wait_event(&self, reason: &str) -> String {
        wait_event(&self.tb, &self.ns, &self.name, reason).await
    }

    /// The group's committed offsets over the topic's partitions.
    pub async fn committed(&self) -> BTreeMap<i32, i64> {
        group_offsets(
            &self.tb.kafka_bootstrap,
            &self.group,
            &self.topic,
            self.partitions,
        )
        .await
    }

    /// Waits until everything produced is committed; returns the commits.
    pub async fn wait_all_committed(&self, timeout: Duration) -> BTreeMap<i32, i64> {
        let want = high_watermarks(&self.produced);
        wait_all_committed(&self.tb, &self.group, &self.topic, &want, timeout).await
    }

    /// Commits `offsets` for the pipeline's group by hand, as a user resetting them with
    /// `kafka-consumer-groups --reset-offsets` would.
    pub async fn set_committed(&self, offsets: BTreeMap<i32, i64>) {
        let (b, g, t) = (
            self.tb.kafka_bootstrap.clone(),
            self.group.clone(),
            self.topic.clone(),
        );
        tokio::task::spawn_blocking(move || commit_offsets(&b, &g, &t, &offsets))
            .await
            .unwrap();
    }

    /// Waits until everything produced is committed, then audits [`Run::blocks`] exactly.
    pub async fn wait_committed_then_audit(&self, timeout: Duration) -> BTreeMap<i32, i64> {
        self.wait_committed_then_audit_in(&self.blocks, timeout)
            .await
    }

    /// [`Run::wait_committed_then_audit`] of the blocks under `blocks`.
    pub async fn wait_committed_then_audit_in(
        &self,
        blocks: &std::path::Path,
        timeout: Duration,
    ) -> BTreeMap<i32, i64> {
        wait_committed_then_audit(
            &self.tb,
            &self.group,
            &self.topic,
            blocks,
            &self.produced,
            timeout,
        )
        .await
    }
}

/// Shows, when a test fails, the jobs and the pipeline as they stand (what `kubectl get
/// bp,bj` shows a user): the test's message says what it waited for, this how far things got.
pub struct ShowOnFailure {
    ns: String,
}

impl Drop for ShowOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let shown = Command::new("kubectl")
            .args(["get", "blockpipelines,blockjobs", "-n", &self.ns])
            // A test may fail because the API server hangs: then so would this, forever.
            .arg("--request-timeout=10s")
            .output();
        let Ok(out) = shown else { return };
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("{}: `kubectl get bp,bj` as the test failed:", self.ns);
        for line in lines.iter().take(40) {
            eprintln!("  {line}");
        }
        if lines.len() > 40 {
            eprintln!("  ... {} more", lines.len() - 40);
        }
    }
}
