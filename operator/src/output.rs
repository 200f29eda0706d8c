//! What a pipeline's output holds, as the committer needs it: a job's range is committed only
//! once the manifest that vouches for it is in the output, whatever the job's status says.
//! Anything that may patch `blockjobs/status` (every builder's ServiceAccount) could otherwise
//! make the operator commit past records no block holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use blocksmith_builder::manifest::Manifest;
use blocksmith_builder::store::{BlockStore, OpenStores, StoreError};
use blocksmith_crds::domain::manifest_key;
use blocksmith_crds::{BlockJob, BlockJobSpec, BlockPipeline};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::planner::WrittenBlocks;

/// What the output says of a job that reported `Succeeded`.
#[derive(Debug, PartialEq)]
pub enum Evidence {
    /// Its manifest is there and vouches for the job's range.
    Confirmed,
    /// No manifest at its key: no block holds the range.
    Missing { url: String },
    /// A manifest is there but describes something else.
    Contradicts { url: String, why: String },
}

/// Why the output could not be consulted.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "spec.output.credentialsSecretRef: secret {0:?} cannot be read ({1}); the operator reads the output's manifests with it before committing and planning"
    )]
    Secret(String, String),
    #[error("the output cannot be read: {0}")]
    Store(#[from] StoreError),
}

/// Whether `manifest` vouches for `job`'s range: the same topic, partition, range, Kafka
/// cluster and topic id (when both recorded one), and no more records than the range has offsets.
pub fn vouches_for(manifest: &Manifest, job: &BlockJobSpec) -> Result<(), String> {
    let range = job.end_offset - job.start_offset;
    let mismatch = |what: &str, found: String, want: String| {
        Err(format!("its {what} is {found}, the job's {want}"))
    };
    if manifest.topic != job.topic || manifest.partition != job.partition {
        return mismatch(
            "topic/partition",
            format!("{}/{}", manifest.topic, manifest.partition),
            format!("{}/{}", job.topic, job.partition),
        );
    }
    if (manifest.start_offset, manifest.end_offset) != (job.start_offset, job.end_offset) {
        return mismatch(
            "range",
            format!("[{}, {})", manifest.start_offset, manifest.end_offset),
            format!("[{}, {})", job.start_offset, job.end_offset),
        );
    }
    if let (Some(found), Some(want)) = (&manifest.kafka_cluster_id, &job.kafka_cluster_id)
        && found != want
    {
        return mismatch("Kafka cluster", format!("{found:?}"), format!("{want:?}"));
    }
    if let (Some(found), Some(want)) = (&manifest.kafka_topic_id, &job.kafka_topic_id)
        && found != want
    {
        return mismatch("topic id", format!("{found:?}"), format!("{want:?}"));
    }
    if !(0..=range).contains(&manifest.records) {
        return Err(format!(
            "it counts {} records in a range of {range} offsets",
            manifest.records
        ));
    }
    Ok(())
}

/// The jobs whose blocks have been confirmed (by uid), so each manifest is read once.
#[derive(Default)]
pub struct Confirmations(Mutex<HashSet<String>>);

impl Confirmations {
    pub fn contains(&self, job: &BlockJob) -> bool {
        let uid = job.metadata.uid.as_deref().unwrap_or_default();
        self.0.lock().expect("confirmations lock").contains(uid)
    }

    pub fn insert(&self, job: &BlockJob) {
        if let Some(uid) = &job.metadata.uid {
            self.0
                .lock()
                .expect("confirmations lock")
                .insert(uid.clone());
        }
    }
}

/// The settings the pipeline's builders get as environment variables: the keys of
/// `spec.output.credentialsSecretRef`.
pub async fn settings(
    client: &kube::Client,
    bp: &BlockPipeline,
) -> Result<Vec<(String, String)>, OutputError> {
    let mut settings = Vec::new();
    if let Some(reference) = &bp.spec.output.credentials_secret_ref {
        let ns = bp.metadata.namespace.clone().unwrap_or_default();
        let secret = Api::<Secret>::namespaced(client.clone(), &ns)
            .get(&reference.name)
            .await
            .map_err(|e| OutputError::Secret(reference.name.clone(), e.to_string()))?;
        for (name, value) in secret.data.unwrap_or_default() {
            if let Ok(value) = String::from_utf8(value.0) {
                settings.push((name, value));
            }
        }
    }
    Ok(settings)
}

/// The output at `url` (a job's: the pipeline's URL may have changed since the job was
/// planned) as the builders see it, with `settings` over the operator's own environment;
/// opened once in `stores` for all the passes that read it with the same settings.
pub fn open(
    stores: &OpenStores,
    url: &str,
    settings: &[(String, String)],
) -> Result<BlockStore, OutputError> {
    Ok(stores.open_with(url, settings)?)
}

/// Manifests read at once by [`evidence_all`]: a read is one round trip to the store.
const CONCURRENT_READS: usize = 16;

/// [`evidence`] for each `(store, job)`, in their order, several read at once.
pub async fn evidence_all(
    reads: &[(&BlockStore, &BlockJobSpec)],
) -> Vec<Result<Evidence, StoreError>> {
    // The reads are made before the stream so that no closure lives across an await (the
    // reconcile future must be `Send` for every lifetime).
    let reads: Vec<_> = reads
        .iter()
        .map(|(store, job)| evidence(store, job))
        .collect();
    futures::stream::iter(reads)
        .buffered(CONCURRENT_READS)
        .collect()
        .await
}

/// What the output holds for each of `jobs`, in their order, read where each job wrote (its
/// own `output.url`: the pipeline's may have changed since it was planned).
pub async fn evidence_of(
    stores: &OpenStores,
    jobs: &[&BlockJob],
    settings: &[(String, String)],
) -> Result<Vec<Result<Evidence, StoreError>>, OutputError> {
    let mut opened: HashMap<&str, BlockStore> = HashMap::new();
    for job in jobs {
        let url = job.spec.output.url.as_str();
        if !opened.contains_key(url) {
            opened.insert(url, open(stores, url, settings)?);
        }
    }
    let reads: Vec<(&BlockStore, &BlockJobSpec)> = jobs
        .iter()
        .map(|j| (&opened[j.spec.output.url.as_str()], &j.spec))
        .collect();
    Ok(evidence_all(&reads).await)
}

/// The blocks the output at `url` holds in each partition of `reads`, from its offset, whose
/// manifests vouch for them as the pipeline's (`spec_of` gives the job spec a range would
/// have): a block of another topic or Kafka cluster under the same keys is not one. An
/// output location that does not exist (a local root, a bucket) holds none.
pub async fn written_blocks(
    stores: &OpenStores,
    url: &str,
    settings: &[(String, String)],
    topic: &str,
    reads: &BTreeMap<i32, i64>,
    spec_of: impl Fn(i32, i64, i64) -> BlockJobSpec,
) -> Result<WrittenBlocks, OutputError> {
    let store = match open(stores, url, settings) {
        Err(OutputError::Store(StoreError::LocalRoot { .. })) => return Ok(WrittenBlocks::new()),
        opened => opened?,
    };
    let mut written = WrittenBlocks::new();
    for (&partition, &from) in reads {
        let listed = match store.manifest_ranges(topic, partition, from).await {
            Err(e) if e.is_not_found() => Vec::new(),
            listed => listed?,
        };
        let specs: Vec<BlockJobSpec> = listed
            .into_iter()
            .map(|(start, end)| spec_of(partition, start, end))
            .collect();
        let reads: Vec<(&BlockStore, &BlockJobSpec)> = specs.iter().map(|s| (&store, s)).collect();
        let mut blocks = Vec::new();
        for (spec, evidence) in specs.iter().zip(evidence_all(&reads).await) {
            if evidence? == Evidence::Confirmed {
                blocks.push((spec.start_offset, spec.end_offset));
            }
        }
        written.insert(partition, blocks);
    }
    Ok(written)
}

/// What `store` holds for `job`.
pub async fn evidence(store: &BlockStore, job: &BlockJobSpec) -> Result<Evidence, StoreError> {
    let key = manifest_key(&job.topic, job.partition, job.start_offset, job.end_offset);
    let url = store.url_of(&key);
    Ok(match store.existing_manifest(&key).await {
        Ok(Some(manifest)) => match vouches_for(&manifest, job) {
            Ok(()) => Evidence::Confirmed,
            Err(why) => Evidence::Contradicts { url, why },
        },
        Ok(None) => Evidence::Missing { url },
        Err(StoreError::CorruptManifest { reason, .. }) => {
            Evidence::Contradicts { url, why: reason }
        }
        Err(e) => return Err(e),
    })
}

#[cfg(test)]
mod tests {
    use blocksmith_builder::block::BlockStats;

    use super::*;
    use crate::testing::job;

    fn job_spec(partition: i32, start: i64, end: i64, cluster: Option<&str>) -> BlockJobSpec {
        let mut spec = job(partition, start, end).spec;
        spec.kafka_cluster_id = cluster.map(str::to_owned);
        spec
    }

    fn manifest_of(job: &BlockJobSpec) -> Manifest {
        let written = BlockStats {
            records: job.end_offset - job.start_offset,
            first_offset: Some(job.start_offset),
            last_offset: Some(job.end_offset - 1),
            ..BlockStats::default()
        };
        Manifest::new(job, &written)
    }

    #[test]
    fn a_manifest_vouches_only_for_its_own_range_topic_and_cluster() {
        let job = job_spec(3, 100, 200, Some("cluster-a"));
        assert_eq!(vouches_for(&manifest_of(&job), &job), Ok(()));
        let other = |edit: fn(&mut Manifest)| {
            let mut m = manifest_of(&job);
            edit(&mut m);
            vouches_for(&m, &job).unwrap_err()
        };
        assert!(other(|m| m.end_offset = 150).contains("range is [100, 150)"));
        assert!(other(|m| m.partition = 4).contains("topic/partition"));
        assert!(other(|m| m.topic = "x".into()).contains("topic/partition"));
        assert!(other(|m| m.kafka_cluster_id = Some("b".into())).contains("Kafka cluster"));
        assert!(other(|m| m.records = 101).contains("101 records in a range of 100"));
        let mut unrecorded = manifest_of(&job);
        unrecorded.kafka_cluster_id = None;
        assert_eq!(
            vouches_for(&unrecorded, &job),
            Ok(()),
            "a block that recorded no cluster is taken as the same"
        );
    }

    #[tokio::test]
    async fn each_job_is_confirmed_where_it_wrote_not_where_the_pipeline_writes_now() {
        // The pipeline's output.url changed between the two jobs.
        let root = std::env::temp_dir().join(format!("bs-outputs-{}", std::process::id()));
        let (old, new) = (root.join("old"), root.join("new"));
        let at = |dir: &std::path::Path, start: i64| {
            let mut j = job(0, start, start + 10);
            j.spec.output.url = format!("file://{}", dir.display());
            j
        };
        let (first, second) = (at(&old, 0), at(&new, 10));
        for (dir, j) in [(&old, &first), (&new, &second)] {
            let key = manifest_key(&j.spec.topic, 0, j.spec.start_offset, j.spec.end_offset);
            let path = dir.join(&key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, manifest_of(&j.spec).to_bytes()).unwrap();
        }
        let found = evidence_of(&OpenStores::default(), &[&first, &second], &[])
            .await
            .unwrap();
        assert_eq!(found.len(), 2);
        for f in found {
            assert_eq!(f.unwrap(), Evidence::Confirmed);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn evidence_reads_the_manifest_at_the_jobs_key() {
        let dir = std::env::temp_dir().join(format!("bs-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = BlockStore::from_url(&format!("file://{}", dir.display())).unwrap();
        let job = job_spec(0, 0, 10, None);
        assert!(matches!(
            evidence(&store, &job).await.unwrap(),
            Evidence::Missing { .. }
        ));
        let key = manifest_key(&job.topic, 0, 0, 10);
        let path = dir.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, manifest_of(&job).to_bytes()).unwrap();
        assert_eq!(evidence(&store, &job).await.unwrap(), Evidence::Confirmed);
        std::fs::write(&path, b"{}").unwrap();
        assert!(matches!(
            evidence(&store, &job).await.unwrap(),
            Evidence::Contradicts { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
