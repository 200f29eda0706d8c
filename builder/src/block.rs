//! Streaming Parquet block writer: records in, one deterministic Parquet file out.
//!
//! Records are buffered into Arrow builders and handed to the Parquet writer a batch at a
//! time; the writer ends a row group at `row_group_rows` rows or `row_group_bytes` encoded
//! bytes, so memory is bounded by the row-group size, not by the size of the block.

use std::io::Write;
use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    BinaryBuilder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StructArray};
use arrow_buffer::OffsetBufferBuilder;
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use blocksmith_crds::JobOutputSpec;
use blocksmith_crds::pipeline::Compression;
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression as ParquetCompression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};

use crate::record::RecordRef;

/// Written into the file footer instead of parquet-rs's default, which carries its version.
pub const CREATED_BY: &str = "blocksmith";
/// Level 1, as Arrow's own writers default to: on the benchmark's records it encoded a block
/// in less than half the CPU time of level 3, for 2% more bytes (BENCHMARKS.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
pub const DEFAULT_ROW_GROUP_ROWS: usize = 65_536;
pub const DEFAULT_ROW_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Rows and payload bytes buffered in Arrow builders before they go to the Parquet writer.
const BATCH_ROWS: usize = 4096;
/// (1 MiB, for more overlap of reading and encoding within a block of a few MiB, cost more
/// CPU with 10 KiB records than it saved; BENCHMARKS.md.)
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Arrow batches a writer holds at most: one being filled, one waiting for the encoder
/// thread, one being encoded.
pub const MAX_BATCHES_HELD: usize = 3;

/// Payload bytes at which a batch is handed to the encoder: never more than a row group's
/// worth, or a small row group could not be honoured (the Parquet writer only splits a batch
/// when the row group already holds rows). A batch can overshoot it by one record.
pub fn batch_bytes(row_group_bytes: usize) -> usize {
    BATCH_BYTES.min(row_group_bytes)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOptions {
    pub compression: Compression,
    /// zstd level; ignored by the other codecs. `None` means [`DEFAULT_ZSTD_LEVEL`].
    pub compression_level: Option<i32>,
    pub row_group_rows: usize,
    /// Estimated encoded bytes at which a row group is ended.
    pub row_group_bytes: usize,
}

impl Default for BlockOptions {
    fn default() -> Self {
        Self {
            compression: Compression::Zstd,
            compression_level: Some(DEFAULT_ZSTD_LEVEL),
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
        }
    }
}

impl BlockOptions {
    pub fn from_job(out: &JobOutputSpec) -> Self {
        let compression_level = match out.compression {
            Compression::Zstd => Some(out.compression_level.unwrap_or(DEFAULT_ZSTD_LEVEL)),
            Compression::Snappy | Compression::None => None,
        };
        Self {
            compression: out.compression,
            compression_level,
            row_group_rows: out
                .row_group_size
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .unwrap_or(DEFAULT_ROW_GROUP_ROWS),
            ..Self::default()
        }
    }

    fn writer_properties(&self) -> Result<WriterProperties, BlockError> {
        if self.row_group_rows == 0 || self.row_group_bytes == 0 {
            return Err(BlockError::InvalidOptions(
                "row group limits must be positive".into(),
            ));
        }
        let compression = match self.compression {
            Compression::Zstd => {
                let level = self.compression_level.unwrap_or(DEFAULT_ZSTD_LEVEL);
                let level = ZstdLevel::try_new(level)
                    .map_err(|e| BlockError::InvalidOptions(format!("zstd level {level}: {e}")))?;
                ParquetCompression::ZSTD(level)
            }
            Compression::Snappy => ParquetCompression::SNAPPY,
            Compression::None => ParquetCompression::UNCOMPRESSED,
        };
        let mut props = WriterProperties::builder()
            .set_created_by(CREATED_BY.to_owned())
            .set_compression(compression)
            .set_max_row_group_row_count(Some(self.row_group_rows))
            .set_max_row_group_bytes(Some(self.row_group_bytes));
        for column in payload_columns() {
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_statistics_enabled(column, EnabledStatistics::None);
        }
        Ok(props.build())
    }
}

/// The columns of record and header values (and raw header keys): opaque payloads, rarely
/// repeated, never filtered on. A dictionary only costs hashing every value before the
/// writer gives up on it, and min/max statistics comparing them; both are off for these.
fn payload_columns() -> Vec<ColumnPath> {
    static COLUMNS: LazyLock<Vec<ColumnPath>> = LazyLock::new(|| {
        let parquet = ArrowSchemaConverter::new()
            .convert(&schema())
            .expect("the block schema converts to Parquet");
        parquet
            .columns()
            .iter()
            .map(|c| c.path().clone())
            .filter(|path| {
                matches!(
                    path.parts().last().map(String::as_str),
                    Some("value" | "key_bytes")
                )
            })
            .collect()
    });
    COLUMNS.clone()
}

/// What was written; `bytes` and `sha256` cover exactly the bytes handed to the sink.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub records: i64,
    pub first_offset: Option<i64>,
    pub last_offset: Option<i64>,
    pub min_timestamp_ms: Option<i64>,
    pub max_timestamp_ms: Option<i64>,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("invalid block options: {0}")]
    InvalidOptions(String),
    #[error(
        "record offset {offset} pushed after offset {previous}: records must be in increasing offset order"
    )]
    OutOfOrder { previous: i64, offset: i64 },
    #[error("record from partition {got} pushed into a block of partition {expected}")]
    PartitionMismatch { expected: i32, got: i32 },
    #[error("{context}: {source}")]
    Parquet {
        context: &'static str,
        source: ParquetError,
    },
    #[error("{context}: {source}")]
    Arrow {
        context: &'static str,
        source: ArrowError,
    },
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

fn parquet_err(context: &'static str) -> impl FnOnce(ParquetError) -> BlockError {
    move |source| BlockError::Parquet { context, source }
}

/// The block's Arrow schema (the Parquet schema is derived from it and stored alongside).
pub fn schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("partition", DataType::Int32, false),
            Field::new("offset", DataType::Int64, false),
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
            Field::new("key", DataType::Binary, true),
            Field::new("value", DataType::Binary, true),
            Field::new("headers", DataType::List(header_item_field()), false),
        ]))
    });
    SCHEMA.clone()
}

fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Binary, true),
        // A key that is not UTF-8 (which Kafka does not allow, but brokers pass on): `key`
        // holds it with U+FFFD for each invalid sequence, as Java consumers decode it, and
        // `key_bytes` its exact bytes; null for every valid key.
        Field::new("key_bytes", DataType::Binary, true),
    ])
}

fn header_item_field() -> Arc<Field> {
    Arc::new(Field::new_list_field(
        DataType::Struct(header_fields()),
        false,
    ))
}

/// Writes one block. Records must be pushed in increasing offset order, all from one partition.
pub struct BlockWriter<W: Write + Send + 'static> {
    encoder: Encoder<W>,
    columns: Columns,
    /// See [`batch_bytes`].
    batch_bytes: usize,
    partition: Option<i32>,
    stats: BlockStats,
}

impl<W: Write + Send + 'static> BlockWriter<W> {
    /// A writer that encodes on the caller's thread.
    pub fn new(sink: W, opts: &BlockOptions) -> Result<Self, BlockError> {
        let writer = Self::arrow_writer(sink, opts)?;
        Ok(Self::with(Encoder::Inline(Box::new(writer)), opts))
    }

    /// A writer that hands each batch to a thread of its own, which encodes, compresses and
    /// writes it while the caller gathers the next: reading and encoding overlap. The bytes
    /// are the same as [`Self::new`]'s; at most one batch waits between the two.
    pub fn with_encoder_thread(sink: W, opts: &BlockOptions) -> Result<Self, BlockError> {
        let mut writer = Self::arrow_writer(sink, opts)?;
        let (batches, received) = std::sync::mpsc::sync_channel::<RecordBatch>(1);
        let thread = std::thread::Builder::new()
            .name("block-encoder".into())
            .spawn(move || {
                for batch in received {
                    writer
                        .write(&batch)
                        .map_err(parquet_err("writing record batch"))?;
                }
                Ok(writer)
            })
            .map_err(|source| BlockError::Io {
                context: "starting the encoder thread",
                source,
            })?;
        Ok(Self::with(Encoder::Thread { batches, thread }, opts))
    }

    fn arrow_writer(
        sink: W,
        opts: &BlockOptions,
    ) -> Result<ArrowWriter<HashingWriter<W>>, BlockError> {
        let props = opts.writer_properties()?;
        let sink = HashingWriter {
            inner: sink,
            hasher: Sha256::new(),
            bytes: 0,
        };
        ArrowWriter::try_new(sink, schema(), Some(props))
            .map_err(parquet_err("creating Parquet writer"))
    }

    fn with(encoder: Encoder<W>, opts: &BlockOptions) -> Self {
        Self {
            encoder,
            columns: Columns::default(),
            batch_bytes: batch_bytes(opts.row_group_bytes),
            partition: None,
            stats: BlockStats::default(),
        }
    }

    pub fn push<'r>(&mut self, rec: impl Into<RecordRef<'r>>) -> Result<(), BlockError> {
        let rec = &rec.into();
        if let Some(previous) = self.stats.last_offset
            && rec.offset <= previous
        {
            return Err(BlockError::OutOfOrder {
                previous,
                offset: rec.offset,
            });
        }
        match self.partition {
            Some(expected) if expected != rec.partition => {
                return Err(BlockError::PartitionMismatch {
                    expected,
                    got: rec.partition,
                });
            }
            _ => self.partition = Some(rec.partition),
        }

        self.columns.append(rec);
        let s = &mut self.stats;
        s.records += 1;
        s.first_offset.get_or_insert(rec.offset);
        s.last_offset = Some(rec.offset);
        if let Some(ts) = rec.timestamp_ms {
            s.min_timestamp_ms = Some(s.min_timestamp_ms.map_or(ts, |m| m.min(ts)));
            s.max_timestamp_ms = Some(s.max_timestamp_ms.map_or(ts, |m| m.max(ts)));
        }

        if self.columns.rows >= BATCH_ROWS || self.columns.bytes >= self.batch_bytes {
            self.write_batch()?;
        }
        Ok(())
    }

    /// Writes the footer and returns the sink (not synced to disk: that is the caller's job).
    pub fn finish(mut self) -> Result<(W, BlockStats), BlockError> {
        self.write_batch()?;
        let writer = match self.encoder {
            Encoder::Inline(writer) => *writer,
            Encoder::Thread { batches, thread } => {
                drop(batches);
                join(thread)?
            }
            Encoder::Failed => {
                return Err(BlockError::Io {
                    context: "finishing Parquet file",
                    source: std::io::Error::other("the encoder already failed"),
                });
            }
        };
        // `into_inner` writes the footer itself; calling `finish`/`close` first would write
        // a second, empty footer.
        let mut sink = writer
            .into_inner()
            .map_err(parquet_err("finishing Parquet file"))?;
        sink.flush().map_err(|source| BlockError::Io {
            context: "flushing block sink",
            source,
        })?;
        let mut stats = self.stats;
        stats.bytes = sink.bytes;
        stats.sha256 = hex::encode(sink.hasher.finalize());
        Ok((sink.inner, stats))
    }

    fn write_batch(&mut self) -> Result<(), BlockError> {
        if self.columns.rows == 0 {
            return Ok(());
        }
        let batch = self.columns.finish()?;
        match &mut self.encoder {
            Encoder::Inline(writer) => writer
                .write(&batch)
                .map_err(parquet_err("writing record batch")),
            Encoder::Thread { batches, .. } => {
                if batches.send(batch).is_ok() {
                    return Ok(());
                }
                // The encoder stopped at an error: that error is the one to report.
                let Encoder::Thread { thread, .. } =
                    std::mem::replace(&mut self.encoder, Encoder::Failed)
                else {
                    unreachable!()
                };
                join(thread).map(drop)
            }
            Encoder::Failed => Err(BlockError::Io {
                context: "writing record batch",
                source: std::io::Error::other("the encoder already failed"),
            }),
        }
    }
}

enum Encoder<W: Write + Send> {
    Inline(Box<ArrowWriter<HashingWriter<W>>>),
    Thread {
        batches: std::sync::mpsc::SyncSender<RecordBatch>,
        thread: EncoderThread<W>,
    },
    Failed,
}

type EncoderThread<W> = std::thread::JoinHandle<Result<ArrowWriter<HashingWriter<W>>, BlockError>>;

fn join<W: Write + Send>(
    thread: EncoderThread<W>,
) -> Result<ArrowWriter<HashingWriter<W>>, BlockError> {
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Arrow builders for one batch; `finish` empties them for reuse.
#[derive(Default)]
struct Columns {
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: TimestampMillisecondBuilder,
    key: BinaryBuilder,
    value: BinaryBuilder,
    header_counts: Vec<usize>,
    header_keys: StringBuilder,
    header_values: BinaryBuilder,
    header_key_bytes: BinaryBuilder,
    rows: usize,
    /// Variable-length payload buffered, to bound a batch's memory.
    bytes: usize,
}

impl Columns {
    fn append(&mut self, rec: &RecordRef<'_>) {
        self.partition.append_value(rec.partition);
        self.offset.append_value(rec.offset);
        self.timestamp.append_option(rec.timestamp_ms);
        self.key.append_option(rec.key);
        self.value.append_option(rec.value);
        self.header_counts.push(rec.headers.len());
        let mut bytes = rec.key.map_or(0, <[u8]>::len) + rec.value.map_or(0, <[u8]>::len);
        for &(key, value) in &rec.headers {
            match std::str::from_utf8(key) {
                Ok(key) => {
                    self.header_keys.append_value(key);
                    self.header_key_bytes.append_null();
                }
                Err(_) => {
                    self.header_keys.append_value(String::from_utf8_lossy(key));
                    self.header_key_bytes.append_value(key);
                }
            }
            self.header_values.append_option(value);
            bytes += key.len() + value.map_or(0, <[u8]>::len);
        }
        self.rows += 1;
        self.bytes += bytes;
    }

    fn finish(&mut self) -> Result<RecordBatch, BlockError> {
        let header_structs = StructArray::new(
            header_fields(),
            vec![
                Arc::new(self.header_keys.finish()) as ArrayRef,
                Arc::new(self.header_values.finish()),
                Arc::new(self.header_key_bytes.finish()),
            ],
            None,
        );
        let mut offsets = OffsetBufferBuilder::new(self.header_counts.len());
        for &n in &self.header_counts {
            offsets.push_length(n);
        }
        let headers = ListArray::try_new(
            header_item_field(),
            offsets.finish(),
            Arc::new(header_structs),
            None,
        )
        .map_err(|source| BlockError::Arrow {
            context: "building headers column",
            source,
        })?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.value.finish()),
            Arc::new(headers),
        ];
        self.header_counts.clear();
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(schema(), columns).map_err(|source| BlockError::Arrow {
            context: "building record batch",
            source,
        })
    }
}

/// Hashes and counts every byte that reaches the sink.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
    use arrow_array::{Array, BinaryArray};
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::file::metadata::ParquetMetaData;

    fn write(records: &[Record], opts: &BlockOptions) -> (Vec<u8>, BlockStats) {
        let mut w = BlockWriter::new(Vec::new(), opts).unwrap();
        for r in records {
            w.push(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn read(file: &[u8]) -> (Vec<Record>, ParquetMetaData) {
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(file)).unwrap();
        assert_eq!(builder.schema(), &schema());
        let metadata = builder.metadata().as_ref().clone();
        let mut out = Vec::new();
        for batch in builder.build().unwrap() {
            out.extend(records_of(&batch.unwrap()));
        }
        (out, metadata)
    }

    fn records_of(batch: &RecordBatch) -> Vec<Record> {
        let partition = batch.column(0).as_primitive::<Int32Type>();
        let offset = batch.column(1).as_primitive::<Int64Type>();
        let timestamp = batch.column(2).as_primitive::<TimestampMillisecondType>();
        let key = batch.column(3).as_binary::<i32>();
        let value = batch.column(4).as_binary::<i32>();
        let headers = batch.column(5).as_list::<i32>();
        let opt = |a: &BinaryArray, i: usize| a.is_valid(i).then(|| a.value(i).to_vec());
        (0..batch.num_rows())
            .map(|i| {
                let h = headers.value(i);
                let h = h.as_struct();
                let (hk, hv) = (h.column(0).as_string::<i32>(), h.column(1).as_binary());
                let exact_key = h.column(2).as_binary::<i32>();
                Record {
                    partition: partition.value(i),
                    offset: offset.value(i),
                    timestamp_ms: timestamp.is_valid(i).then(|| timestamp.value(i)),
                    key: opt(key, i),
                    value: opt(value, i),
                    headers: (0..h.len())
                        .map(|j| {
                            let key = opt(exact_key, j)
                                .unwrap_or_else(|| hk.value(j).as_bytes().to_vec());
                            (key, opt(hv, j))
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Deterministic, incompressible bytes (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn simple(partition: i32, offsets: impl IntoIterator<Item = i64>) -> Vec<Record> {
        offsets
            .into_iter()
            .map(|o| Record {
                partition,
                offset: o,
                timestamp_ms: Some(1_700_000_000_000 + o),
                key: Some(format!("k{}", o % 7).into_bytes()),
                value: Some(format!("value {o}").into_bytes()),
                headers: vec![],
            })
            .collect()
    }

    fn mixed() -> Vec<Record> {
        vec![
            Record {
                partition: 3,
                offset: 10,
                timestamp_ms: Some(1_700_000_000_500),
                key: Some(b"k".to_vec()),
                value: Some(b"v".to_vec()),
                headers: vec![],
            },
            Record {
                partition: 3,
                offset: 12, // a gap, as after compaction
                timestamp_ms: None,
                key: None,
                value: None,
                headers: vec![(b"trace".to_vec(), Some(b"abc".to_vec()))],
            },
            Record {
                partition: 3,
                offset: 13,
                timestamp_ms: Some(1_700_000_000_100),
                key: Some(vec![]),
                value: Some(noise(1, 64 * 1024)),
                headers: vec![
                    (b"a".to_vec(), None),
                    (b"a".to_vec(), Some(vec![])),
                    ("ü".as_bytes().to_vec(), Some(vec![0, 255])),
                    (b"not \xff utf-8".to_vec(), Some(b"v".to_vec())),
                    ("\u{fffd}".as_bytes().to_vec(), None),
                ],
            },
            Record {
                partition: 3,
                offset: 14,
                timestamp_ms: Some(1_700_000_000_900),
                key: Some(vec![0; 3]),
                value: None,
                headers: vec![],
            },
        ]
    }

    #[test]
    fn round_trip_preserves_every_field() {
        let records = mixed();
        let (file, _) = write(&records, &BlockOptions::default());
        let (back, meta) = read(&file);
        assert_eq!(back, records);
        assert_eq!(meta.file_metadata().created_by(), Some(CREATED_BY));
    }

    #[test]
    fn stats_describe_records_and_bytes() {
        let (file, stats) = write(&mixed(), &BlockOptions::default());
        assert_eq!(stats.records, 4);
        assert_eq!(stats.first_offset, Some(10));
        assert_eq!(stats.last_offset, Some(14));
        assert_eq!(stats.min_timestamp_ms, Some(1_700_000_000_100));
        assert_eq!(stats.max_timestamp_ms, Some(1_700_000_000_900));
        assert_eq!(stats.bytes, file.len() as u64);
        assert_eq!(stats.sha256, hex::encode(Sha256::digest(&file)));
        assert_eq!(stats.sha256.len(), 64);
        assert!(
            stats
                .sha256
                .chars()
                .all(|c| matches!(c, '0'..='9' | 'a'..='f'))
        );
    }

    #[test]
    fn payload_columns_have_neither_dictionary_nor_statistics() {
        let paths: Vec<String> = payload_columns().iter().map(ColumnPath::string).collect();
        assert_eq!(paths.len(), 3, "{paths:?}");
        assert!(paths.contains(&"value".to_owned()), "{paths:?}");
        let (file, _) = write(&mixed(), &BlockOptions::default());
        let (_, meta) = read(&file);
        for column in meta.row_group(0).columns() {
            let path = column.column_path().string();
            let payload = paths.contains(&path);
            let dictionary = column.dictionary_page_offset().is_some();
            assert_eq!(dictionary, !payload, "dictionary of {path}");
            assert_eq!(
                column.statistics().is_some(),
                !payload,
                "statistics of {path}"
            );
        }
    }

    #[test]
    fn the_encoder_thread_writes_the_same_bytes() {
        let opts = BlockOptions {
            row_group_rows: 7000,
            ..BlockOptions::default()
        };
        // Several batches and row groups.
        let records = simple(3, 0..20_000);
        let (inline, inline_stats) = write(&records, &opts);
        let mut w = BlockWriter::with_encoder_thread(Vec::new(), &opts).unwrap();
        for r in &records {
            w.push(r).unwrap();
        }
        let (threaded, threaded_stats) = w.finish().unwrap();
        assert_eq!(threaded_stats, inline_stats);
        assert!(threaded == inline, "the encoder thread changed the bytes");
    }

    #[test]
    fn output_is_deterministic() {
        let mut records = mixed();
        records.extend(simple(3, 100..5_000));
        let opts = BlockOptions {
            row_group_rows: 1_000,
            ..BlockOptions::default()
        };
        let (a, sa) = write(&records, &opts);
        let (b, sb) = write(&records, &opts);
        assert!(a == b, "two writes of the same records differ");
        assert_eq!(sa, sb);
    }

    #[test]
    fn row_groups_are_cut_by_rows() {
        let opts = BlockOptions {
            row_group_rows: 100,
            ..BlockOptions::default()
        };
        let (file, _) = write(&simple(0, 0..1_000), &opts);
        let (back, meta) = read(&file);
        assert_eq!(back, simple(0, 0..1_000));
        assert_eq!(meta.num_row_groups(), 10);
        assert!(meta.row_groups().iter().all(|rg| rg.num_rows() == 100));
    }

    #[test]
    fn row_groups_are_cut_by_bytes() {
        let records: Vec<Record> = (0..100)
            .map(|o| Record {
                value: Some(noise(o as u64, 64 * 1024)),
                ..simple(0, [o]).remove(0)
            })
            .collect();
        let opts = BlockOptions {
            compression: Compression::None,
            row_group_bytes: 256 * 1024,
            ..BlockOptions::default()
        };
        let (file, _) = write(&records, &opts);
        let (back, meta) = read(&file);
        assert_eq!(back, records);
        assert!(
            meta.num_row_groups() >= 20,
            "{} row groups",
            meta.num_row_groups()
        );
        for rg in meta.row_groups() {
            // At most one record past the limit.
            assert!(rg.total_byte_size() < 256 * 1024 + 80 * 1024, "{rg:?}");
        }
    }

    #[test]
    fn every_compression_is_readable() {
        let mut records = mixed();
        records.extend(simple(3, 20..2_000));
        let opts = |compression, compression_level| BlockOptions {
            compression,
            compression_level,
            ..BlockOptions::default()
        };
        let mut sizes = Vec::new();
        for (opts, codec) in [
            (
                opts(Compression::Zstd, Some(1)),
                ParquetCompression::ZSTD(ZstdLevel::try_new(1).unwrap()),
            ),
            (
                opts(Compression::Zstd, None),
                ParquetCompression::ZSTD(ZstdLevel::default()),
            ),
            (opts(Compression::Snappy, None), ParquetCompression::SNAPPY),
            (
                opts(Compression::None, None),
                ParquetCompression::UNCOMPRESSED,
            ),
        ] {
            let (file, _) = write(&records, &opts);
            let (back, meta) = read(&file);
            assert_eq!(back, records, "{opts:?}");
            // The level is not recorded in the file; compare the codec only.
            let written = meta.row_group(0).column(1).compression();
            assert_eq!(
                std::mem::discriminant(&written),
                std::mem::discriminant(&codec)
            );
            sizes.push(file.len());
        }
        assert!(sizes[0] < sizes[3] && sizes[2] < sizes[3], "{sizes:?}");
    }

    #[test]
    fn empty_block_is_valid_parquet() {
        let (file, stats) = write(&[], &BlockOptions::default());
        let (back, meta) = read(&file);
        assert!(back.is_empty());
        assert_eq!(meta.file_metadata().num_rows(), 0);
        assert_eq!(
            stats,
            BlockStats {
                bytes: file.len() as u64,
                sha256: hex::encode(Sha256::digest(&file)),
                ..BlockStats::default()
            }
        );
    }

    #[test]
    fn rejects_out_of_order_and_foreign_records() {
        let mut w = BlockWriter::new(Vec::new(), &BlockOptions::default()).unwrap();
        let recs = simple(1, [5, 5, 4]);
        w.push(&recs[0]).unwrap();
        let err = w.push(&recs[1]).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::OutOfOrder {
                    previous: 5,
                    offset: 5
                }
            ),
            "{err}"
        );
        assert!(matches!(
            w.push(&recs[2]),
            Err(BlockError::OutOfOrder { .. })
        ));
        let err = w.push(&simple(2, [6])[0]).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::PartitionMismatch {
                    expected: 1,
                    got: 2
                }
            ),
            "{err}"
        );
        // The rejected records left no trace.
        let (file, stats) = w.finish().unwrap();
        assert_eq!(stats.records, 1);
        assert_eq!(read(&file).0, simple(1, [5]));
    }

    #[test]
    fn rejects_invalid_options() {
        let bad = [
            BlockOptions {
                compression_level: Some(99),
                ..BlockOptions::default()
            },
            BlockOptions {
                row_group_rows: 0,
                ..BlockOptions::default()
            },
        ];
        for opts in bad {
            assert!(matches!(
                BlockWriter::new(Vec::new(), &opts),
                Err(BlockError::InvalidOptions(_))
            ));
        }
    }

    #[test]
    fn options_from_job() {
        use blocksmith_crds::pipeline::BlockFormat;
        let mut out = JobOutputSpec {
            url: "file:///tmp/x".into(),
            format: BlockFormat::Parquet,
            compression: Compression::Zstd,
            compression_level: None,
            row_group_size: None,
            max_record_bytes: None,
        };
        assert_eq!(BlockOptions::from_job(&out), BlockOptions::default());
        out.compression_level = Some(1);
        out.row_group_size = Some(1_000);
        let opts = BlockOptions::from_job(&out);
        assert_eq!(
            (opts.compression_level, opts.row_group_rows),
            (Some(1), 1_000)
        );
        out.compression = Compression::Snappy;
        assert_eq!(BlockOptions::from_job(&out).compression_level, None);
    }
}
