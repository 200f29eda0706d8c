//! Deterministic test data: N records over P partitions with null and non-null keys,
//! headers (some with null values), explicit timestamps and value sizes from a distribution.
//! Every produced record is remembered as an [`ExpectedRecord`] (offset from the delivery
//! report, digests of the content) so an audit can check blocks against it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use blocksmith_builder::headers::with_raw_header;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sha2::{Digest, Sha256};

/// How big values are.
#[derive(Clone, Copy, Debug)]
pub enum ValueSizes {
    /// Every value this many bytes.
    Fixed(usize),
    /// 0 B to 64 KiB, mostly small (mean ~270 B): 80% < 64 B, 18% < 1 KiB, 1.7% < 4 KiB,
    /// 0.1% 16-64 KiB, with one in a thousand exactly 0 B and one exactly 64 KiB.
    /// (librdkafka's mock broker keeps only 5 MiB or 100,000 message batches per partition, so
    /// test data must stay under that per partition.)
    Mixed,
}

impl std::str::FromStr for ValueSizes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixed" => Ok(ValueSizes::Mixed),
            n => n
                .parse()
                .map(ValueSizes::Fixed)
                .map_err(|_| format!("value sizes: expected `mixed` or a byte count, got {s:?}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct DataSpec {
    pub topic: String,
    pub partitions: i32,
    pub records: u64,
    pub seed: u64,
    pub value_sizes: ValueSizes,
    /// Offset each record's timestamp from this base (ms since epoch).
    pub base_timestamp_ms: i64,
}

impl DataSpec {
    pub fn new(topic: &str, partitions: i32, records: u64) -> Self {
        Self {
            topic: topic.into(),
            partitions,
            records,
            seed: 1,
            value_sizes: ValueSizes::Mixed,
            base_timestamp_ms: 1_700_000_000_000,
        }
    }
}

/// What the broker acknowledged for one record. Digests are sha256 hex (first 16 chars);
/// `None` means the field was null.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedRecord {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub value_len: usize,
    pub headers: String,
}

#[derive(Debug, Default)]
pub struct Produced {
    pub records: Vec<ExpectedRecord>,
    /// partition → (records produced, high watermark after producing)
    pub partitions: BTreeMap<i32, (u64, i64)>,
    pub bytes: u64,
}

impl Produced {
    /// CSV: partition,offset,timestamp,key,value,value_len,headers (`-` for null).
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(
            out,
            "partition,offset,timestamp,key,value,value_len,headers"
        )?;
        for r in &self.records {
            let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{},{},{},{},{},{},{}",
                r.partition,
                r.offset,
                r.timestamp_ms,
                opt(&r.key),
                opt(&r.value),
                r.value_len,
                r.headers
            )?;
        }
        out.flush()
    }

    pub fn total(&self) -> u64 {
        self.records.len() as u64
    }
}

pub fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// Digest of a header list: sha256 over the compact JSON
/// `[["<hex key>","<hex value>"|null],...]`.
pub fn headers_digest(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> String {
    let list: Vec<(String, Option<String>)> = headers
        .iter()
        .map(|(k, v)| (hex::encode(k), v.as_ref().map(hex::encode)))
        .collect();
    digest(
        serde_json::to_string(&list)
            .expect("headers serialize")
            .as_bytes(),
    )
}

struct Record {
    partition: i32,
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn make_record(spec: &DataSpec, rng: &mut StdRng, i: u64) -> Record {
    let partition = (i % spec.partitions as u64) as i32;
    let key = (rng.random_range(0..5) != 0)
        .then(|| format!("key-{}", rng.random_range(0..1000)).into_bytes());
    let len = match spec.value_sizes {
        ValueSizes::Fixed(n) => n,
        ValueSizes::Mixed => match rng.random_range(0..1000) {
            0 => 0,
            1 => 64 * 1024,
            2..=801 => rng.random_range(0..64),
            802..=981 => rng.random_range(64..1024),
            982..=998 => rng.random_range(1024..4096),
            _ => rng.random_range(16384..=65536),
        },
    };
    // One record in 50 has a null value (a tombstone); the rest random bytes.
    let value = (i % 50 != 7).then(|| {
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        v
    });
    let mut headers: Vec<_> = (0..rng.random_range(0..3))
        .map(|h| {
            let v = (h != 1).then(|| format!("h{h}-{}", rng.random_range(0..100)).into_bytes());
            (format!("header-{h}").into_bytes(), v)
        })
        .collect();
    // One record in 100 carries a header key that is not UTF-8, as producers outside the
    // Java client can send: every audit then checks it is written exactly.
    if i % 100 == 42 {
        headers.push((b"header-\xff\xfe".to_vec(), Some(b"raw".to_vec())));
    }
    Record {
        partition,
        timestamp_ms: spec.base_timestamp_ms + i as i64,
        key,
        value,
        headers,
    }
}

struct Delivery {
    rows: Mutex<Vec<ExpectedRecord>>,
    errors: Mutex<Vec<String>>,
}

impl rdkafka::ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = Box<ExpectedRecord>;
    fn delivery(&self, result: &DeliveryResult<'_>, mut row: Box<ExpectedRecord>) {
        match result {
            Ok(msg) => {
                row.offset = rdkafka::Message::offset(msg);
                self.rows.lock().unwrap().push(*row);
            }
            Err((e, _)) => self.errors.lock().unwrap().push(e.to_string()),
        }
    }
}

/// Produces `spec.records` records and waits until every one is acknowledged.
pub fn produce(bootstrap: &str, spec: &DataSpec) -> anyhow::Result<Produced> {
    produce_with(bootstrap, &[], spec)
}

/// [`produce`] with more librdkafka properties (security settings).
pub fn produce_with(
    bootstrap: &str,
    properties: &[(String, String)],
    spec: &DataSpec,
) -> anyhow::Result<Produced> {
    let context = Delivery {
        rows: Mutex::default(),
        errors: Mutex::default(),
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", "2000000");
    for (k, v) in properties {
        config.set(k, v);
    }
    let producer: ThreadedProducer<Delivery> = config.create_with_context(context)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut bytes = 0u64;
    for i in 0..spec.records {
        let rec = make_record(spec, &mut rng, i);
        let headers = rec
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |headers, (k, v)| {
                with_raw_header(headers, k, v.as_deref())
            });
        let row = Box::new(ExpectedRecord {
            partition: rec.partition,
            offset: -1,
            timestamp_ms: rec.timestamp_ms,
            key: rec.key.as_deref().map(digest),
            value: rec.value.as_deref().map(digest),
            value_len: rec.value.as_ref().map_or(0, Vec::len),
            headers: headers_digest(&rec.headers),
        });
        bytes += rec.value.as_ref().map_or(0, |v| v.len() as u64)
            + rec.key.as_ref().map_or(0, |k| k.len() as u64);
        let mut record = BaseRecord::with_opaque_to(&spec.topic, row)
            .partition(rec.partition)
            .timestamp(rec.timestamp_ms)
            .headers(headers);
        if let Some(k) = &rec.key {
            record = record.key(k);
        }
        if let Some(v) = &rec.value {
            record = record.payload(v);
        }
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    producer.poll(Duration::from_millis(10));
                    record = r;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let context = producer.context();
    let errors = context.errors.lock().unwrap();
    anyhow::ensure!(
        errors.is_empty(),
        "{} records not delivered: {:?}",
        errors.len(),
        errors.first()
    );
    let mut records = std::mem::take(&mut *context.rows.lock().unwrap());
    records.sort();
    let mut partitions = BTreeMap::new();
    for r in &records {
        let e = partitions.entry(r.partition).or_insert((0u64, 0i64));
        e.0 += 1;
        e.1 = e.1.max(r.offset + 1);
    }
    Ok(Produced {
        records,
        partitions,
        bytes,
    })
}
