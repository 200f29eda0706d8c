//! What several test files share that needs the product crates (dev-dependencies of the
//! tests, not of the harness library).

use blocksmith_crds::{BlockJob, BlockPipeline, JobPhase};
use blocksmith_e2e::scenario::*;
use blocksmith_operator::jobs::{JobStore, KafkaIds, desired_job, job_spec};
use blocksmith_operator::metrics::Metrics;
use blocksmith_operator::planner::PlannedJob;
use kube::api::Api;
use kube::runtime::reflector;
use serde_json::json;

/// The operator's own `JobStore` for pipeline `p` in a fresh namespace, over an empty job
/// cache: as stale as a watch cache gets.
pub struct StaleStore {
    pub tb: Testbed,
    pub store: JobStore,
    pub bp: BlockPipeline,
    pub api: Api<BlockJob>,
    _writer: reflector::store::Writer<BlockJob>,
}

impl StaleStore {
    pub async fn new(test: &str) -> StaleStore {
        let tb = Testbed::get().await;
        let ns = tb.namespace(test).await;
        let (cache, writer) = reflector::store::<BlockJob>();
        let store = JobStore::new(tb.client.clone(), cache, &ns, "p", Metrics::default());
        let mut bp = pipeline("p", "t", &tb.kafka_bootstrap, "file:///unused", json!({}));
        bp.metadata.namespace = Some(ns.clone());
        StaleStore {
            api: Api::namespaced(tb.client.clone(), &ns),
            tb,
            store,
            bp,
            _writer: writer,
        }
    }

    /// The job the operator plans for offsets [0, `end`) of partition 0, as Pending.
    pub fn planned(&self, end: i64) -> BlockJob {
        let range = PlannedJob {
            partition: 0,
            start: 0,
            end,
        };
        desired_job(
            &self.bp,
            job_spec(&self.bp, &range, &KafkaIds::default()),
            JobPhase::Pending,
        )
    }
}
