//! Builds one block: read the job's exact range from Kafka and encode it as Parquet straight
//! into its data object (bounded memory; see [`crate::data_writer`]), then put the manifest,
//! which names it, create-only — the commit point. Knows nothing about leases; the
//! worker decides what to report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blocksmith_crds::domain::{job_name, manifest_key, partition_folder};
use blocksmith_crds::{BlockJobSpec, JobOutput};
use tracing::{info, warn};

use crate::block::{BlockError, BlockOptions, BlockWriter};
use crate::manifest::{Manifest, OtherSource};
use crate::reader::{ReadError, ReaderConfig, read_range};
use crate::record::{RecordTooLarge, check_size, record_limit};
use crate::store::{BlockStore, ManifestPut, OpenStores, StoreError, UploadSettings};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reading from Kafka: {0}")]
    Read(#[from] ReadError),
    #[error("writing Parquet: {0}")]
    Block(#[from] BlockError),
    #[error("object storage: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    RecordTooLarge(#[from] RecordTooLarge),
    #[error(transparent)]
    OtherSource(#[from] OtherSource),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

impl BuildError {
    /// An outage of Kafka or the object store rather than something a person must fix:
    /// retried without counting against the job's `backoffLimit`.
    pub fn is_transient(&self) -> bool {
        match self {
            BuildError::Read(e) => e.is_transient(),
            BuildError::Store(e) => e.is_transient(),
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Client properties for Kafka (security, SASL); the bootstrap servers come from the job.
    pub reader: ReaderConfig,
    pub upload: UploadSettings,
    /// The outputs earlier jobs wrote to, kept open for the next jobs.
    pub stores: OpenStores,
}

/// What a successful build wrote.
#[derive(Clone, Debug)]
pub struct Built {
    pub output: JobOutput,
    pub manifest: ManifestPut,
    pub read_bytes: u64,
}

pub async fn build_block(
    job: &BlockJobSpec,
    settings: &BuildSettings,
    cancel: Arc<AtomicBool>,
) -> Result<Built, BuildError> {
    let store = settings
        .stores
        .open(&job.output.url)?
        .with_upload(settings.upload);
    let folder = partition_folder(&job.topic, job.partition);
    let manifest_at = manifest_key(&job.topic, job.partition, job.start_offset, job.end_offset);

    // An earlier attempt may have committed the block and died before reporting. Report that
    // block rather than build another that would only be thrown away.
    if let Some(m) = store.existing_manifest(&manifest_at).await? {
        m.check_source(job, &store.url_of(&manifest_at))?;
        info!(
            topic = %job.topic, partition = job.partition, start = job.start_offset, end = job.end_offset,
            records = m.records, "block already committed by an earlier attempt; reporting it"
        );
        return Ok(Built {
            output: JobOutput {
                objects: vec![
                    store.url_of(&format!("{folder}/{}", m.data_name())),
                    store.url_of(&manifest_at),
                ],
                records: m.records,
                bytes: m.bytes as i64,
                sha256: m.sha256,
            },
            manifest: ManifestPut::FoundCommitted,
            read_bytes: 0,
        });
    }

    let data_writer = store.data_writer(
        &folder,
        job.start_offset,
        job.end_offset,
        tokio::runtime::Handle::current(),
    )?;
    let failure = data_writer.failure();
    let built = {
        let mut reader = settings.reader.clone();
        reader.bootstrap_servers = job.bootstrap_servers.clone();
        reader.topic_id = job.kafka_topic_id.clone();
        let opts = BlockOptions::from_job(&job.output);
        let limit = record_limit(job.output.max_record_bytes);
        let name = job_name(&job.pipeline, job.partition, job.start_offset);
        let job = job.clone();
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || -> Result<_, BuildError> {
            let mut writer = BlockWriter::with_encoder_thread(data_writer, &opts)?;
            let read = read_range::<BuildError>(
                &reader,
                &job.topic,
                job.partition,
                job.start_offset,
                job.end_offset,
                &cancel,
                // Checked before the record is buffered: an oversize record fails the job
                // before anything is uploaded, so no partial block is ever written.
                |rec| {
                    check_size(&rec, limit, &name)?;
                    writer.push(rec).map_err(BuildError::from)
                },
            )?;
            if cancel.load(Ordering::Relaxed) {
                return Err(BuildError::Cancelled);
            }
            let (data_writer, stats) = writer.finish()?;
            let data_name = data_writer.finish(&stats.sha256)?;
            Ok((stats, read, data_name))
        })
        .await
        .map_err(|e| BuildError::Io(std::io::Error::other(e)))?
    };
    // An object-store error behind a failed write is the error to report: it may be an outage.
    let (stats, read, data_name) = match built {
        Err(_) if failure.lock().unwrap().is_some() => {
            return Err(failure.lock().unwrap().take().unwrap().into());
        }
        built => built?,
    };
    let manifest = Manifest::new(job, &stats).with_data_name(data_name);
    let data = format!("{folder}/{}", manifest.data_name());
    if cancel.load(Ordering::Relaxed) {
        discard_if_superseded(&store, &manifest_at, &data, &manifest).await;
        return Err(BuildError::Cancelled);
    }
    let put = store
        .put_manifest(&manifest_at, manifest.to_bytes(), &stats.sha256)
        .await;
    let mut data = data;
    if !matches!(put, Ok(ManifestPut::Created)) {
        let committed = discard_if_superseded(&store, &manifest_at, &data, &manifest).await;
        // The same bytes committed by another attempt under its own name (a block uploaded
        // in parts is named at random): that object is the block's.
        if let (Ok(ManifestPut::AlreadyCommitted), Some(committed)) = (&put, committed) {
            committed.check_source(job, &store.url_of(&manifest_at))?;
            data = format!("{folder}/{}", committed.data_name());
        }
    }
    let put = put?;
    info!(
        topic = %job.topic, partition = job.partition, start = job.start_offset, end = job.end_offset,
        records = stats.records, bytes = stats.bytes, manifest = ?put, "block written"
    );
    Ok(Built {
        output: JobOutput {
            objects: vec![store.url_of(&data), store.url_of(&manifest_at)],
            records: stats.records,
            bytes: stats.bytes as i64,
            sha256: stats.sha256,
        },
        manifest: put,
        read_bytes: read.bytes,
    })
}

/// Removes the data object this attempt uploaded (`ours`, at `ours_key`) once the block's
/// manifest, written by
/// another attempt, names a different one: nothing can ever vouch for it then. Without a
/// manifest it stays, since a builder that wrote the same bytes may be about to commit it.
/// Best effort: a data object no manifest names is not part of the output. Returns the
/// committed manifest when it names another object.
async fn discard_if_superseded(
    store: &BlockStore,
    manifest_at: &str,
    ours_key: &str,
    ours: &Manifest,
) -> Option<Manifest> {
    match store.existing_manifest(manifest_at).await {
        Ok(Some(committed)) if !committed.names_the_same_data_as(ours) => {
            match store.delete(ours_key).await {
                Ok(()) => info!(
                    data = %store.url_of(ours_key), committed = %committed.data_name(),
                    "the block was committed by another attempt with other bytes; removed this attempt's data object"
                ),
                Err(err) => warn!(
                    data = %store.url_of(ours_key), error = %err,
                    "removing this attempt's superseded data object failed; it is not part of the output"
                ),
            }
            Some(committed)
        }
        Ok(_) => None,
        Err(err) => {
            warn!(
                manifest = %store.url_of(manifest_at), error = %err,
                "could not read the block's manifest to tidy this attempt's data object"
            );
            None
        }
    }
}
