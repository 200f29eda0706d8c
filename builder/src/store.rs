//! Object storage for blocks: data objects and their create-only manifests, addressed by keys
//! relative to the pipeline's output URL.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blocksmith_crds::domain::{blocks_from_key, manifest_range, partition_folder};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutPayload,
    RetryConfig,
};
use tokio::runtime::Handle;
use url::Url;

use crate::data_writer::{DataWriter, RemoteTarget};
use crate::manifest::Manifest;

/// Files larger than this are uploaded in parts.
const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploaded concurrently: one stream is latency-bound, and memory is bounded by
/// `(PARTS_IN_FLIGHT + 1) * PART_SIZE`.
const PARTS_IN_FLIGHT: usize = 4;

/// How data objects are uploaded. S3 needs parts of at least 5 MiB (all but the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadSettings {
    pub multipart_threshold: u64,
    pub part_size: usize,
    pub parts_in_flight: usize,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            multipart_threshold: MULTIPART_THRESHOLD,
            part_size: PART_SIZE,
            parts_in_flight: PARTS_IN_FLIGHT,
        }
    }
}

const SUPPORTED: &str =
    "s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///absolute/path";

/// Whether `put_manifest` wrote the manifest or found the same block already committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestPut {
    Created,
    AlreadyCommitted,
    /// Found before building: an earlier attempt committed the block; nothing was rewritten.
    FoundCommitted,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported output URL scheme `{scheme}` in `{url}`; supported: {SUPPORTED}")]
    UnsupportedScheme { url: String, scheme: String },

    #[error("invalid output URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("cannot configure object storage for `{url}`: {source}")]
    Config {
        url: String,
        #[source]
        source: object_store::Error,
    },

    #[error(
        "local output directory {} does not exist or is not accessible: {source} \
         (create it, or check that the volume is mounted; then delete the failed jobs to retry \
         them)",
        path.display()
    )]
    LocalRoot {
        path: PathBuf,
        #[source]
        source: object_store::Error,
    },

    #[error("invalid object key `{key}`: {source}")]
    InvalidKey {
        key: String,
        #[source]
        source: object_store::path::Error,
    },

    #[error("writing {}: {source}", path.display())]
    LocalWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{op} {url} failed: {source}{}", hint(op, source))]
    Backend {
        op: &'static str,
        url: String,
        #[source]
        source: object_store::Error,
    },

    #[error(
        "REFUSING TO REPLACE COMMITTED BLOCK {key}: its manifest records sha256 {existing}, \
         but this attempt produced {ours}. Another builder already committed different bytes \
         for this range (a stalled builder, or a job spec that changed under the same key); \
         the committed block was left untouched"
    )]
    ConflictingBlock {
        key: String,
        existing: String,
        ours: String,
    },

    #[error("existing manifest {key} is unreadable ({reason}); refusing to overwrite it")]
    CorruptManifest { key: String, reason: String },

    #[error("manifest {key} was reported as existing but could not be read back; retry")]
    ManifestVanished { key: String },
}

impl StoreError {
    /// True when the store answered that the object, or the bucket, does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::Backend {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }

    /// True when retrying the same operation later may succeed (network trouble, 5xx,
    /// timeouts); false for misconfiguration, missing buckets, auth and precondition failures.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Backend { source, .. } => backend_is_transient(source),
            StoreError::ManifestVanished { .. } => true,
            _ => false,
        }
    }
}

const CREDENTIALS_HINT: &str = " (check the object-storage credentials, e.g. \
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_SERVICE_ACCOUNT_KEY or AZURE_STORAGE_ACCOUNT_KEY, \
    and that they may read and write this bucket; builders read them from their environment \
    (the Secret of spec.output.credentialsSecretRef) when they start, so restart them after \
    fixing it, then delete the failed jobs to retry them)";

fn hint(op: &str, err: &object_store::Error) -> &'static str {
    use object_store::Error as E;
    // Some requests (a list) report a refusal only as a bare status.
    let refused = matches!(err, E::Generic { .. })
        && matches!(http_status(&err.to_string()), Some(401 | 403));
    match err {
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => CREDENTIALS_HINT,
        E::Generic { .. } if refused => CREDENTIALS_HINT,
        E::NotFound { .. } if op != "download" => {
            " (the bucket or container does not exist: create it or fix spec.output.url, then \
             delete the failed jobs to retry them)"
        }
        E::NotImplemented { .. } => {
            " (create-only puts are disabled for this store; for S3-compatible stores unset \
             AWS_CONDITIONAL_PUT or set it to `etag`)"
        }
        _ => "",
    }
}

fn backend_is_transient(err: &object_store::Error) -> bool {
    let object_store::Error::Generic { source, .. } = err else {
        // NotFound, PermissionDenied, Unauthenticated, Precondition, AlreadyExists, ...
        return false;
    };
    let mut cause: Option<&(dyn StdError + 'static)> = Some(source.as_ref());
    while let Some(e) = cause {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return matches!(
                io.kind(),
                K::TimedOut
                    | K::Interrupted
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::ConnectionRefused
                    | K::BrokenPipe
                    | K::UnexpectedEof
                    | K::StorageFull
            );
        }
        cause = e.source();
    }
    // A bare status response. object_store's retry error type is private, so the status can
    // only be read from its message; an unrecognisable one is assumed to be a server hiccup.
    match http_status(&source.to_string()) {
        Some(status) => status >= 500 || status == 408 || status == 429,
        None => true,
    }
}

fn http_status(message: &str) -> Option<u16> {
    let rest = &message[message.find("status code: ")? + "status code: ".len()..];
    rest.get(..3)?.parse().ok()
}

/// Remote stores opened for earlier jobs, by output URL and settings: jobs writing to the same
/// output share one client and its connections instead of each opening its own (a TCP, and in
/// production a TLS, handshake per job). Local directories are opened afresh, so that each job
/// checks that its directory is still there. Clones share the stores.
#[derive(Clone, Debug, Default)]
pub struct OpenStores(Arc<Mutex<HashMap<StoreKey, BlockStore>>>);

type StoreKey = (String, Vec<(String, String)>);

/// More distinct outputs than this in one process's life start the cache over.
const MAX_OPEN_STORES: usize = 64;

impl OpenStores {
    /// The store for `url`, as [`BlockStore::from_url`] opens it.
    pub fn open(&self, url: &str) -> Result<BlockStore, StoreError> {
        self.open_with(url, &[])
    }

    /// The store for `url` with `settings`, as [`BlockStore::from_url_with`] opens it.
    pub fn open_with(
        &self,
        url: &str,
        settings: &[(String, String)],
    ) -> Result<BlockStore, StoreError> {
        let key = (url.to_owned(), settings.to_vec());
        if let Some(store) = self.0.lock().unwrap().get(&key) {
            return Ok(store.clone());
        }
        let store = BlockStore::from_url_with(url, settings)?;
        if store.local_root.is_none() {
            let mut open = self.0.lock().unwrap();
            if open.len() >= MAX_OPEN_STORES {
                open.clear();
            }
            open.insert(key, store.clone());
        }
        Ok(store)
    }
}

/// One output location: a bucket (or directory) plus a key prefix.
#[derive(Debug, Clone)]
pub struct BlockStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The output URL without a trailing slash; object URLs are `{base_url}/{key}`.
    base_url: String,
    upload: UploadSettings,
    /// For `file://` output, its directory: data objects are written there directly.
    local_root: Option<PathBuf>,
}

impl BlockStore {
    /// Opens the store for `url`, configured from the usual environment variables
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`). Nothing is contacted yet.
    pub fn from_url(url: &str) -> Result<BlockStore, StoreError> {
        Self::from_url_with(url, &[])
    }

    /// As [`Self::from_url`], with `settings` named like those environment variables (the
    /// keys of a pipeline's `spec.output.credentialsSecretRef`) taking precedence over the
    /// environment. Names the store does not know are ignored, as in the environment.
    pub fn from_url_with(
        url: &str,
        settings: &[(String, String)],
    ) -> Result<BlockStore, StoreError> {
        let parsed = Url::parse(url).map_err(|e| StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let config_err = |source| StoreError::Config {
            url: url.to_owned(),
            source,
        };
        let mut local_root = None;
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "s3" | "s3a" => (
                Arc::new(s3_builder(url, settings)?.build().map_err(config_err)?),
                url_prefix(url, &parsed)?,
            ),
            "gs" => (
                Arc::new(
                    configured(
                        GoogleCloudStorageBuilder::from_env(),
                        settings,
                        |b, k, v| b.with_config(k, v),
                    )
                    .with_url(url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(config_err)?,
                ),
                url_prefix(url, &parsed)?,
            ),
            "az" | "abfs" | "abfss" => (
                Arc::new(
                    configured(MicrosoftAzureBuilder::from_env(), settings, |b, k, v| {
                        b.with_config(k, v)
                    })
                    .with_url(url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(config_err)?,
                ),
                url_prefix(url, &parsed)?,
            ),
            "file" => {
                let root = parsed.to_file_path().map_err(|()| StoreError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "expected file:///absolute/path".to_owned(),
                })?;
                // A missing root is an error rather than created: like a missing bucket, it
                // usually means a volume that is not mounted, and writing there would lose data.
                let local = LocalFileSystem::new_with_prefix(&root)
                    .map_err(|source| StoreError::LocalRoot {
                        path: root.clone(),
                        source,
                    })?
                    // `LocalFileSystem` does not fsync by default; with this, a put returns only
                    // once the file and the directory entries leading to it are on disk.
                    .with_fsync(true);
                local_root = Some(root);
                (Arc::new(local), Path::default())
            }
            scheme => {
                return Err(StoreError::UnsupportedScheme {
                    url: url.to_owned(),
                    scheme: scheme.to_owned(),
                });
            }
        };
        let mut base_url = parsed.clone();
        base_url.set_query(None);
        base_url.set_fragment(None);
        Ok(BlockStore {
            store,
            prefix,
            base_url: base_url.as_str().trim_end_matches('/').to_owned(),
            upload: UploadSettings::default(),
            local_root,
        })
    }

    pub fn with_upload(mut self, upload: UploadSettings) -> Self {
        self.upload = upload;
        self
    }

    /// The full URL of the object at `key`.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{}", self.base_url, key.trim_start_matches('/'))
    }

    /// A writer for the data object of the block `[start, end)` in the partition `folder`
    /// (see [`DataWriter`]); uploads are driven on `handle`.
    pub fn data_writer(
        &self,
        folder: &str,
        start: i64,
        end: i64,
        handle: Handle,
    ) -> Result<DataWriter, StoreError> {
        let location = self.location(folder)?;
        if let Some(root) = &self.local_root {
            let dir = location
                .parts()
                .fold(root.clone(), |dir, part| dir.join(part.as_ref()));
            return DataWriter::local(dir.clone(), root, start, end)
                .map_err(|source| StoreError::LocalWrite { path: dir, source });
        }
        let target = RemoteTarget {
            store: self.store.clone(),
            folder: location,
            folder_key: folder.to_owned(),
            base_url: self.base_url.clone(),
            upload: self.upload,
        };
        Ok(DataWriter::remote(target, handle, start, end))
    }

    /// Commits a block by creating its manifest; never overwrites. If a manifest is already
    /// there, the block counts as committed only when that manifest records the same data
    /// `sha256`.
    pub async fn put_manifest(
        &self,
        key: &str,
        bytes: Vec<u8>,
        data_sha256: &str,
    ) -> Result<ManifestPut, StoreError> {
        let location = self.location(key)?;
        let put = self
            .store
            .put_opts(&location, PutPayload::from(bytes), PutMode::Create.into())
            .await;
        match put {
            Ok(_) => Ok(ManifestPut::Created),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = match self.get(key).await {
                    Ok(existing) => existing,
                    // A racing create that was reported but is not visible yet.
                    Err(StoreError::Backend {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => {
                        return Err(StoreError::ManifestVanished {
                            key: key.to_owned(),
                        });
                    }
                    Err(err) => return Err(err),
                };
                let existing =
                    manifest_sha256(&existing).map_err(|reason| StoreError::CorruptManifest {
                        key: key.to_owned(),
                        reason,
                    })?;
                if existing.eq_ignore_ascii_case(data_sha256) {
                    Ok(ManifestPut::AlreadyCommitted)
                } else {
                    Err(StoreError::ConflictingBlock {
                        key: self.url_of(key),
                        existing,
                        ours: data_sha256.to_owned(),
                    })
                }
            }
            Err(source) => Err(self.backend_err("create manifest", key, source)),
        }
    }

    /// The manifest at `key` if one exists: the block was committed.
    pub async fn existing_manifest(&self, key: &str) -> Result<Option<Manifest>, StoreError> {
        let bytes = match self.get(key).await {
            Ok(bytes) => bytes,
            Err(StoreError::Backend {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Ok(None),
            Err(err) => return Err(err),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::CorruptManifest {
                key: self.url_of(key),
                reason: format!("not a manifest: {e}"),
            })
    }

    /// The ranges of the partition's manifests that start at or after `from`, in offset
    /// order: the blocks written there, whatever jobs wrote them.
    pub async fn manifest_ranges(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        let folder = partition_folder(topic, partition);
        let prefix = self.location(&folder)?;
        let offset = self.location(&blocks_from_key(topic, partition, from))?;
        let listed: Vec<ObjectMeta> = self
            .store
            .list_with_offset(Some(&prefix), &offset)
            .try_collect()
            .await
            .map_err(|source| self.backend_err("list", &folder, source))?;
        let mut ranges: Vec<(i64, i64)> = listed
            .iter()
            .filter_map(|o| manifest_range(o.location.filename()?))
            .filter(|&(start, _)| start >= from)
            .collect();
        ranges.sort_unstable();
        Ok(ranges)
    }

    /// Deletes an object (absent already counts as deleted).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let location = self.location(key)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.backend_err("delete", key, source)),
        }
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let location = self.location(key)?;
        let backend = |source| self.backend_err("download", key, source);
        let result = self.store.get(&location).await.map_err(backend)?;
        result.bytes().await.map_err(backend)
    }

    fn location(&self, key: &str) -> Result<Path, StoreError> {
        let key_path = Path::parse(key).map_err(|source| StoreError::InvalidKey {
            key: key.to_owned(),
            source,
        })?;
        Ok(self.prefix.parts().chain(key_path.parts()).collect())
    }

    fn backend_err(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        StoreError::Backend {
            op,
            url: self.url_of(key),
            source,
        }
    }
}

/// `builder` with each of `settings` it knows applied (`AWS_ACCESS_KEY_ID` as
/// `aws_access_key_id`, the way each builder's `from_env` reads its variables).
fn configured<B, K: std::str::FromStr>(
    builder: B,
    settings: &[(String, String)],
    apply: impl Fn(B, K, &str) -> B,
) -> B {
    settings.iter().fold(builder, |b, (name, value)| {
        match name.to_ascii_lowercase().parse::<K>() {
            Ok(key) => apply(b, key, value),
            Err(_) => b,
        }
    })
}

fn s3_builder(url: &str, settings: &[(String, String)]) -> Result<AmazonS3Builder, StoreError> {
    // from_env reads AWS_ENDPOINT / AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, credentials and region;
    // requests are path-style unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST is set.
    let builder = configured(AmazonS3Builder::from_env(), settings, |b, k, v| {
        b.with_config(k, v)
    })
    .with_url(url)
    .with_retry(retry_config());
    let endpoint = builder
        .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
        .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
    let allow_http = builder
        .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
        // The spellings object_store accepts for true.
        .is_some_and(|v| {
            ["1", "true", "on", "yes", "y"]
                .iter()
                .any(|t| v.eq_ignore_ascii_case(t))
        });
    if let Some(endpoint) = endpoint
        && endpoint.starts_with("http://")
        && !allow_http
    {
        return Err(StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: format!(
                "the S3 endpoint {endpoint} is plain http; set AWS_ALLOW_HTTP=true to allow it"
            ),
        });
    }
    Ok(builder)
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    }
}

fn url_prefix(url: &str, parsed: &Url) -> Result<Path, StoreError> {
    Path::from_url_path(parsed.path()).map_err(|e| StoreError::InvalidUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

fn manifest_sha256(bytes: &[u8]) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    value
        .get("sha256")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "no string field `sha256`".to_owned())
}

#[cfg(test)]
mod tests {
    use blocksmith_crds::domain::{data_name, manifest_key};

    use std::path::Path as FsPath;

    use super::*;

    fn file_url(dir: &FsPath) -> String {
        Url::from_directory_path(dir).unwrap().to_string()
    }

    fn local_store() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::from_url(&file_url(dir.path())).unwrap();
        (dir, store)
    }

    fn in_memory(upload: UploadSettings) -> (Arc<object_store::memory::InMemory>, BlockStore) {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = BlockStore {
            store: memory.clone(),
            prefix: Path::from("out"),
            base_url: "memory://bucket/out".into(),
            upload,
            local_root: None,
        };
        (memory, store)
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    /// Writes `data` as the block `[start, end)` of `folder` in 1000-byte writes, as an encoder
    /// would; returns the data object's name.
    async fn write_block(
        store: &BlockStore,
        folder: &str,
        start: i64,
        end: i64,
        data: &[u8],
    ) -> String {
        let mut writer = store
            .data_writer(folder, start, end, Handle::current())
            .unwrap();
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            for chunk in data.chunks(1000) {
                writer.write_all(chunk).unwrap();
            }
            writer.finish(&sha256_hex(&data)).unwrap()
        })
        .await
        .unwrap()
    }

    fn files_in(dir: &FsPath) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_block_lands_under_its_digest_name_and_nothing_else_stays() {
        let (dir, store) = local_store();
        let data = b"hello blocks".repeat(500);
        let name = write_block(&store, "orders/3", 0, 1000, &data).await;
        assert_eq!(name, data_name(0, 1000, &sha256_hex(&data)));
        let key = format!("orders/3/{name}");
        assert_eq!(store.get(&key).await.unwrap().as_ref(), &data[..]);
        assert_eq!(
            files_in(&dir.path().join("orders/3")),
            std::slice::from_ref(&name)
        );
        assert_eq!(store.url_of(&key), format!("{}{key}", file_url(dir.path())));
        // A retry with the same bytes finds them in place.
        assert_eq!(write_block(&store, "orders/3", 0, 1000, &data).await, name);
        assert_eq!(files_in(&dir.path().join("orders/3")), [name]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unfinished_block_leaves_nothing_behind() {
        let (dir, store) = local_store();
        let mut writer = store.data_writer("t/0", 0, 10, Handle::current()).unwrap();
        std::io::Write::write_all(&mut writer, b"half a block").unwrap();
        drop(writer);
        assert_eq!(files_in(&dir.path().join("t/0")), Vec::<String>::new());

        let (memory, store) = in_memory(UploadSettings {
            multipart_threshold: 100,
            part_size: 64,
            parts_in_flight: 2,
        });
        let writer = store.data_writer("t/0", 0, 10, Handle::current()).unwrap();
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            std::io::Write::write_all(&mut writer, &[7; 1000]).unwrap();
        })
        .await
        .unwrap();
        let listed: Vec<ObjectMeta> = memory.list(None).try_collect().await.unwrap();
        assert!(listed.is_empty(), "{listed:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_block_is_put_whole_under_its_digest_name() {
        let (_memory, store) = in_memory(UploadSettings::default());
        let data = vec![42u8; 5000];
        let name = write_block(&store, "t/0", 0, 10, &data).await;
        assert_eq!(name, data_name(0, 10, &sha256_hex(&data)));
        assert_eq!(
            store.get(&format!("t/0/{name}")).await.unwrap().as_ref(),
            &data[..]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_over_the_threshold_is_uploaded_in_parts_as_it_is_written() {
        let (_memory, store) = in_memory(UploadSettings {
            multipart_threshold: 10_000,
            part_size: 4096,
            parts_in_flight: 2,
        });
        // Not a multiple of the part size, so the last part is short.
        let data: Vec<u8> = (0..50_123u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let name = write_block(&store, "t/0", 0, 10, &data).await;
        // Named before its digest was known: not the digest name, and another attempt gets
        // another name.
        assert_ne!(name, data_name(0, 10, &sha256_hex(&data)));
        assert!(
            name.starts_with("00000000000000000000-00000000000000000010."),
            "{name}"
        );
        let got = store.get(&format!("t/0/{name}")).await.unwrap();
        assert!(
            got.as_ref() == &data[..],
            "the multipart upload corrupted the data"
        );
        assert_ne!(write_block(&store, "t/0", 0, 10, &data).await, name);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_removes_an_object_and_a_missing_one_counts_as_removed() {
        let (dir, store) = local_store();
        let name = write_block(&store, "orders/3", 0, 1, b"x").await;
        let key = format!("orders/3/{name}");
        store.delete(&key).await.unwrap();
        assert!(!dir.path().join(&key).exists());
        store.delete(&key).await.unwrap();
    }

    #[test]
    fn a_refusal_reported_only_as_a_status_still_points_at_the_credentials() {
        let refused = |status: &str| StoreError::Backend {
            op: "list",
            url: "s3://b/p".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: format!("Server returned non-2xx status code: {status}").into(),
            },
        };
        assert!(
            refused("403 Forbidden")
                .to_string()
                .contains("check the object-storage credentials")
        );
        assert!(!refused("500 Internal").to_string().contains("credentials"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn manifest_ranges_lists_the_partitions_blocks_from_an_offset_and_nothing_else() {
        let (_dir, store) = local_store();
        assert_eq!(store.manifest_ranges("t", 1, 0).await.unwrap(), []);
        let put = |key: String| {
            let store = &store;
            async move { store.put_manifest(&key, b"{}".to_vec(), "x").await.unwrap() }
        };
        for (start, end) in [(0, 1000), (1000, 1500), (1500, 3500), (12_000, 13_000)] {
            put(manifest_key("t", 1, start, end)).await;
        }
        put(manifest_key("t", 2, 1000, 2000)).await;
        put(manifest_key("t-other", 1, 1000, 2000)).await;
        write_block(&store, "t/1", 1000, 1500, b"data").await;

        assert_eq!(
            store.manifest_ranges("t", 1, 1000).await.unwrap(),
            [(1000, 1500), (1500, 3500), (12_000, 13_000)]
        );
        assert_eq!(
            store.manifest_ranges("t", 1, 1001).await.unwrap(),
            [(1500, 3500), (12_000, 13_000)]
        );
    }

    #[tokio::test]
    async fn an_existing_manifest_is_found_and_a_missing_one_is_none() {
        let (_dir, store) = local_store();
        let key = "orders/3/00000000000000000000-00000000000000001000.json";
        assert!(store.existing_manifest(key).await.unwrap().is_none());
        let manifest = serde_json::json!({
            "pipeline": "p", "topic": "orders", "partition": 3, "startOffset": 0,
            "endOffset": 1000, "records": 998, "firstOffset": 0, "lastOffset": 999,
            "minTimestamp": null, "maxTimestamp": null, "bytes": 4242, "sha256": "aa11",
            "format": "parquet", "compression": "zstd", "schemaVersion": 1,
        });
        store
            .put_manifest(key, manifest.to_string().into_bytes(), "aa11")
            .await
            .unwrap();
        let found = store.existing_manifest(key).await.unwrap().unwrap();
        assert_eq!(
            (found.records, found.bytes, found.sha256.as_str()),
            (998, 4242, "aa11")
        );

        let garbage = "orders/3/00000000000000001000-00000000000000002000.json";
        store
            .put_manifest(garbage, b"{}".to_vec(), "x")
            .await
            .unwrap();
        let err = store.existing_manifest(garbage).await.unwrap_err();
        assert!(matches!(err, StoreError::CorruptManifest { .. }), "{err}");
    }

    #[tokio::test]
    async fn manifest_is_create_only_and_checks_the_data_hash() {
        let (_dir, store) = local_store();
        let key = "orders/3/00000000000000000000-00000000000000001000.json";
        let manifest = |sha: &str| format!(r#"{{"records":1000,"sha256":"{sha}"}}"#).into_bytes();

        let first = store.put_manifest(key, manifest("aa11"), "aa11").await;
        assert_eq!(first.unwrap(), ManifestPut::Created);

        let again = store.put_manifest(key, manifest("aa11"), "aa11").await;
        assert_eq!(again.unwrap(), ManifestPut::AlreadyCommitted);

        let err = store
            .put_manifest(key, manifest("bb22"), "bb22")
            .await
            .unwrap_err();
        match &err {
            StoreError::ConflictingBlock { existing, ours, .. } => {
                assert_eq!((existing.as_str(), ours.as_str()), ("aa11", "bb22"));
            }
            other => panic!("expected ConflictingBlock, got {other}"),
        }
        assert!(!err.is_transient());
        assert!(err.to_string().contains("REFUSING"), "{err}");
        // The committed manifest is untouched.
        assert_eq!(
            store.get(key).await.unwrap().as_ref(),
            &manifest("aa11")[..]
        );
    }

    #[tokio::test]
    async fn existing_manifest_without_hash_is_not_overwritten() {
        let (_dir, store) = local_store();
        store
            .put_manifest("m.json", b"{}".to_vec(), "x")
            .await
            .unwrap();
        let err = store
            .put_manifest("m.json", b"{}".to_vec(), "x")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::CorruptManifest { .. }), "{err}");
    }

    #[test]
    fn a_remote_store_is_opened_once_and_a_local_one_for_every_job() {
        let stores = OpenStores::default();
        let a = stores.open("s3://bucket/a/").unwrap();
        let again = stores.open("s3://bucket/a/").unwrap();
        assert!(
            Arc::ptr_eq(&a.store, &again.store),
            "one client for one output"
        );
        let b = stores.open("s3://bucket/b/").unwrap();
        assert!(!Arc::ptr_eq(&a.store, &b.store));
        let rotated = [
            ("aws_access_key_id".to_owned(), "id".to_owned()),
            ("aws_secret_access_key".to_owned(), "new".to_owned()),
        ];
        let a_rotated = stores.open_with("s3://bucket/a/", &rotated).unwrap();
        assert!(
            !Arc::ptr_eq(&a.store, &a_rotated.store),
            "other settings (rotated credentials) open another client"
        );

        let dir = tempfile::tempdir().unwrap();
        let url = file_url(dir.path());
        stores.open(&url).unwrap();
        drop(dir);
        assert!(
            matches!(stores.open(&url), Err(StoreError::LocalRoot { .. })),
            "a directory gone since the last job is noticed"
        );
    }

    #[test]
    fn unknown_scheme_names_the_supported_ones() {
        let err = BlockStore::from_url("ftp://host/blocks").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::UnsupportedScheme { .. }));
        for scheme in ["s3://", "gs://", "az://", "file://"] {
            assert!(msg.contains(scheme), "{msg}");
        }
    }

    #[test]
    fn missing_local_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let url = file_url(&dir.path().join("not-mounted"));
        let err = BlockStore::from_url(&url).unwrap_err();
        assert!(matches!(err, StoreError::LocalRoot { .. }), "{err}");
    }

    #[test]
    fn s3_keys_live_under_the_url_prefix() {
        // Building an S3 store contacts nothing.
        let store = BlockStore::from_url("s3://bucket/some/prefix/").unwrap();
        assert_eq!(
            store.location("orders/3/a.parquet").unwrap().as_ref(),
            "some/prefix/orders/3/a.parquet"
        );
        assert_eq!(
            store.url_of("orders/3/a.parquet"),
            "s3://bucket/some/prefix/orders/3/a.parquet"
        );
        assert!(store.location("../escape").is_err());
    }

    #[test]
    fn auth_and_missing_bucket_errors_say_what_to_fix() {
        let source = || -> Box<dyn StdError + Send + Sync> { "403 Forbidden".into() };
        let err = StoreError::Backend {
            op: "upload",
            url: "s3://bucket/p/t/0/a.parquet".into(),
            source: object_store::Error::PermissionDenied {
                path: "p/t/0/a.parquet".into(),
                source: source(),
            },
        };
        let msg = err.to_string();
        assert!(!err.is_transient());
        for want in [
            "upload s3://bucket/p/t/0/a.parquet failed",
            "check the object-storage credentials",
            "spec.output.credentialsSecretRef",
            "restart them",
            "delete the failed jobs",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        // A missing bucket (S3's NoSuchBucket is a 404 on the upload).
        let err = StoreError::Backend {
            op: "upload",
            url: "s3://no-such-bucket/p/t/0/a.parquet".into(),
            source: object_store::Error::NotFound {
                path: "p/t/0/a.parquet".into(),
                source: "NoSuchBucket".into(),
            },
        };
        let msg = err.to_string();
        assert!(!err.is_transient());
        assert!(
            msg.contains("s3://no-such-bucket/")
                && msg.contains("the bucket or container does not exist")
                && msg.contains("delete the failed jobs"),
            "{msg}"
        );
    }

    #[test]
    fn status_codes_are_read_from_backend_messages() {
        assert_eq!(
            http_status("Server returned non-2xx status code: 503 Service Unavailable: x"),
            Some(503)
        );
        assert_eq!(http_status("connection refused"), None);
    }
}
