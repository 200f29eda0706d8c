//! Writes a block's data object while it is being encoded, so that a block is written once:
//! - `file://`: into a hidden temporary file in the partition's folder, fsynced, then renamed
//!   to the name that carries its digest;
//! - object stores: in memory up to the multipart threshold, then put under the digest name
//!   in one request; a block that outgrows the threshold becomes a multipart upload whose
//!   parts go out while the rest is encoded, under a name of its own (random hex digits),
//!   since its digest is not known when the upload must be named.
//!
//! Either way a name is only ever written with one content. Runs on a blocking thread: the
//! encoder calls `Write`, uploads are driven on the runtime through its handle.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use blocksmith_crds::domain::{data_name, streamed_data_name};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::runtime::Handle;

use crate::store::{StoreError, UploadSettings};

/// Where an object-store write goes and how it is reported.
#[derive(Clone)]
pub(crate) struct RemoteTarget {
    pub store: Arc<dyn ObjectStore>,
    /// The partition folder's location, and its key for messages.
    pub folder: Path,
    pub folder_key: String,
    pub base_url: String,
    pub upload: UploadSettings,
}

impl RemoteTarget {
    fn err(&self, op: &'static str, name: &str, source: object_store::Error) -> StoreError {
        StoreError::Backend {
            op,
            url: format!("{}/{}/{name}", self.base_url, self.folder_key),
            source,
        }
    }
}

/// The data object of one block, being written. Dropped unfinished, it leaves nothing behind
/// (a multipart upload is aborted, a temporary file removed).
pub struct DataWriter {
    state: State,
    start: i64,
    end: i64,
    /// The first object-store error: `Write` can only report an `io::Error`, and the caller
    /// needs to know an outage (transient) from a bug.
    failure: FailureSlot,
}

enum State {
    Local {
        file: BufWriter<tempfile::NamedTempFile>,
        dir: PathBuf,
        /// Directories created for this folder, to be made durable with the file.
        created: Vec<PathBuf>,
    },
    Buffered {
        target: RemoteTarget,
        handle: Handle,
        buffer: Vec<u8>,
    },
    Streaming {
        target: RemoteTarget,
        handle: Handle,
        name: String,
        upload: Option<WriteMultipart>,
    },
    Done,
}

/// The slot where a [`DataWriter`] keeps its first object-store error.
pub type FailureSlot = Arc<Mutex<Option<StoreError>>>;

impl DataWriter {
    /// A writer for the range's data object in the local directory `dir` (created if missing;
    /// the output's root must exist).
    pub(crate) fn local(
        dir: PathBuf,
        root: &std::path::Path,
        start: i64,
        end: i64,
    ) -> io::Result<Self> {
        let mut created = Vec::new();
        let mut missing = Some(dir.as_path());
        while let Some(d) = missing.filter(|d| *d != root && !d.exists()) {
            created.push(d.to_path_buf());
            missing = d.parent();
        }
        std::fs::create_dir_all(&dir)?;
        let file = tempfile::Builder::new()
            .prefix(".blocksmith-")
            .suffix(".partial")
            .tempfile_in(&dir)?;
        Ok(Self::with(
            State::Local {
                file: BufWriter::with_capacity(1 << 20, file),
                dir,
                created,
            },
            start,
            end,
        ))
    }

    /// A writer for the range's data object in an object store, driven on `handle`.
    pub(crate) fn remote(target: RemoteTarget, handle: Handle, start: i64, end: i64) -> Self {
        let buffer = Vec::with_capacity(1 << 20);
        Self::with(
            State::Buffered {
                target,
                handle,
                buffer,
            },
            start,
            end,
        )
    }

    fn with(state: State, start: i64, end: i64) -> Self {
        Self {
            state,
            start,
            end,
            failure: FailureSlot::default(),
        }
    }

    /// Where this writer keeps the object-store error behind a failed `Write`.
    pub fn failure(&self) -> FailureSlot {
        self.failure.clone()
    }

    /// Makes the object durable under its final name, given the digest of everything written,
    /// and returns that name (relative to the partition folder).
    pub fn finish(mut self, sha256: &str) -> Result<String, StoreError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Local { file, dir, created } => {
                let name = data_name(self.start, self.end, sha256);
                let file = file
                    .into_inner()
                    .map_err(|e| local_err(&dir, e.into_error()))?;
                file.as_file().sync_all().map_err(|e| local_err(&dir, e))?;
                let target = dir.join(&name);
                // The name carries the digest: an object already there (a retry of the same
                // block) holds these very bytes, and the rename replaces it atomically.
                file.persist(&target)
                    .map_err(|e| local_err(&target, e.error))?;
                // Any folder made for it must survive a crash too. The rename itself is made
                // durable by the manifest's put into the same folder, which fsyncs it: until
                // then no manifest names the object.
                for d in &created {
                    sync_dir(d).map_err(|e| local_err(d, e))?;
                }
                if let Some(parent) = created.last().and_then(|d| d.parent()) {
                    sync_dir(parent).map_err(|e| local_err(parent, e))?;
                }
                Ok(name)
            }
            State::Buffered {
                target,
                handle,
                buffer,
            } => {
                let name = data_name(self.start, self.end, sha256);
                let location = target.folder.clone().join(name.as_str());
                handle
                    .block_on(target.store.put(&location, PutPayload::from(buffer)))
                    .map_err(|e| target.err("upload", &name, e))?;
                Ok(name)
            }
            State::Streaming {
                target,
                handle,
                name,
                mut upload,
            } => {
                let upload = upload.take().expect("an unfinished upload");
                // `finish` aborts the upload itself when completing fails.
                handle
                    .block_on(upload.finish())
                    .map_err(|e| target.err("upload", &name, e))?;
                Ok(name)
            }
            State::Done => unreachable!("finish consumes the writer"),
        }
    }

    fn fail(&self, err: StoreError) -> io::Error {
        let message = err.to_string();
        self.failure.lock().unwrap().get_or_insert(err);
        io::Error::other(message)
    }

    /// Turns the buffered block into a multipart upload under a name of its own.
    fn start_streaming(&mut self) -> io::Result<()> {
        let State::Buffered {
            target,
            handle,
            buffer,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            unreachable!("only a buffered block starts streaming");
        };
        let name = streamed_data_name(self.start, self.end, rand::random());
        let location = target.folder.clone().join(name.as_str());
        let upload = match handle.block_on(target.store.put_multipart(&location)) {
            Ok(upload) => upload,
            Err(e) => return Err(self.fail(target.err("upload", &name, e))),
        };
        let upload = WriteMultipart::new_with_chunk_size(upload, target.upload.part_size);
        self.state = State::Streaming {
            target,
            handle,
            name,
            upload: Some(upload),
        };
        self.write_all(&buffer)
    }
}

impl Write for DataWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.state {
            State::Local { file, .. } => file.write(buf),
            State::Buffered { target, buffer, .. } => {
                if (buffer.len() + buf.len()) as u64 > target.upload.multipart_threshold {
                    self.start_streaming()?;
                    return self.write(buf);
                }
                buffer.extend_from_slice(buf);
                Ok(buf.len())
            }
            State::Streaming {
                target,
                handle,
                name,
                upload,
            } => {
                let upload = upload.as_mut().expect("an unfinished upload");
                // Bounds the memory held by parts in flight; an upload error shows here.
                if let Err(e) =
                    handle.block_on(upload.wait_for_capacity(target.upload.parts_in_flight))
                {
                    let err = target.err("upload", name, e);
                    return Err(self.fail(err));
                }
                // Parts are sent as tasks on the runtime.
                let _runtime = handle.enter();
                upload.write(buf);
                Ok(buf.len())
            }
            State::Done => Err(io::Error::other("data object already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.state {
            State::Local { file, .. } => file.flush(),
            _ => Ok(()),
        }
    }
}

impl Drop for DataWriter {
    fn drop(&mut self) {
        if let State::Streaming {
            handle,
            upload,
            name,
            ..
        } = &mut self.state
            && let Some(upload) = upload.take()
        {
            let name = name.clone();
            handle.spawn(async move {
                if let Err(error) = upload.abort().await {
                    tracing::warn!(data = %name, %error, "aborting an unfinished multipart upload failed");
                }
            });
        }
    }
}

fn sync_dir(dir: &std::path::Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn local_err(path: &std::path::Path, source: io::Error) -> StoreError {
    StoreError::LocalWrite {
        path: path.to_path_buf(),
        source,
    }
}
