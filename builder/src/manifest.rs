//! The block manifest: written last, create-only, it is a block's commit point.

use blocksmith_crds::BlockJobSpec;
use blocksmith_crds::domain::{data_name, legacy_data_name};
use blocksmith_crds::pipeline::{BlockFormat, Compression};
use serde::{Deserialize, Serialize};

use crate::block::BlockStats;

/// 2: the manifest names its data object (`data`), whose name carries its digest.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub pipeline: String,
    pub topic: String,
    pub partition: i32,
    /// The Kafka cluster the offsets belong to, when the job recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_cluster_id: Option<String>,
    /// The topic's id (KIP-516) when the job recorded one: a topic deleted and created
    /// again under the same name has other records at the same offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_topic_id: Option<String>,
    /// The job's half-open range `[startOffset, endOffset)`; records may not fill it.
    pub start_offset: i64,
    pub end_offset: i64,
    pub records: i64,
    pub first_offset: Option<i64>,
    pub last_offset: Option<i64>,
    /// Milliseconds since the Unix epoch.
    pub min_timestamp: Option<i64>,
    pub max_timestamp: Option<i64>,
    /// Size and lowercase-hex sha256 of the data object.
    pub bytes: u64,
    pub sha256: String,
    /// The data object's name in the manifest's folder (absent before schema version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    pub format: String,
    pub compression: String,
    pub schema_version: u32,
}

impl Manifest {
    pub fn new(job: &BlockJobSpec, stats: &BlockStats) -> Self {
        let format = match job.output.format {
            BlockFormat::Parquet => "parquet",
        };
        let compression = match job.output.compression {
            Compression::Zstd => "zstd",
            Compression::Snappy => "snappy",
            Compression::None => "none",
        };
        Self {
            pipeline: job.pipeline.clone(),
            topic: job.topic.clone(),
            partition: job.partition,
            kafka_cluster_id: job.kafka_cluster_id.clone(),
            kafka_topic_id: job.kafka_topic_id.clone(),
            start_offset: job.start_offset,
            end_offset: job.end_offset,
            records: stats.records,
            first_offset: stats.first_offset,
            last_offset: stats.last_offset,
            min_timestamp: stats.min_timestamp_ms,
            max_timestamp: stats.max_timestamp_ms,
            bytes: stats.bytes,
            sha256: stats.sha256.clone(),
            data: Some(data_name(job.start_offset, job.end_offset, &stats.sha256)),
            format: format.to_owned(),
            compression: compression.to_owned(),
            schema_version: SCHEMA_VERSION,
        }
    }

    /// The name of the data object this manifest vouches for, in the manifest's folder.
    /// The same manifest naming the data object `name` instead of the one its digest names
    /// (a block uploaded in parts as it was written, under a name drawn before its digest
    /// was known).
    pub fn with_data_name(mut self, name: String) -> Self {
        self.data = Some(name);
        self
    }

    pub fn data_name(&self) -> String {
        self.data
            .clone()
            .unwrap_or_else(|| legacy_data_name(self.start_offset, self.end_offset))
    }

    /// Whether both manifests vouch for one data object (the same bytes, in the same layout).
    pub fn names_the_same_data_as(&self, other: &Manifest) -> bool {
        self.data_name() == other.data_name()
    }

    /// Refuses a block of another Kafka cluster, or of another topic of the same name (deleted
    /// and created again), found under this job's key: the same topic name, partition and
    /// offsets are other records there. Blocks or jobs that recorded no id are taken as the
    /// same.
    pub fn check_source(&self, job: &BlockJobSpec, url: &str) -> Result<(), OtherSource> {
        let differ = |found: &Option<String>, want: &Option<String>, what| match (found, want) {
            (Some(found), Some(want)) if found != want => Err(OtherSource {
                url: url.to_owned(),
                what,
                found: found.clone(),
                job_source: want.clone(),
            }),
            _ => Ok(()),
        };
        differ(
            &self.kafka_cluster_id,
            &job.kafka_cluster_id,
            "Kafka cluster",
        )?;
        differ(&self.kafka_topic_id, &job.kafka_topic_id, "topic id")
    }

    /// Pretty JSON with a trailing newline; field order is fixed, so equal manifests give
    /// equal bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            serde_json::to_vec_pretty(self).expect("a manifest always serializes to JSON");
        out.push(b'\n');
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "{url} holds a block of {what} {found:?}, not of this job's {what} {job_source:?}: the \
     same topic name, partition and offsets of another {what} were written to this output \
     location before. Nothing was overwritten; give this pipeline its own spec.output.url"
)]
pub struct OtherSource {
    url: String,
    /// "Kafka cluster" or "topic id".
    what: &'static str,
    found: String,
    job_source: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocksmith_crds::JobOutputSpec;

    fn job() -> BlockJobSpec {
        BlockJobSpec {
            pipeline: "orders".into(),
            topic: "orders.v1".into(),
            partition: 3,
            start_offset: 120_000,
            end_offset: 130_000,
            bootstrap_servers: "kafka:9092".into(),
            kafka_cluster_id: None,
            kafka_topic_id: None,
            lease_duration_seconds: 30,
            output: JobOutputSpec {
                url: "s3://bucket/prefix".into(),
                format: BlockFormat::Parquet,
                compression: Compression::Zstd,
                compression_level: Some(1),
                row_group_size: None,
                max_record_bytes: None,
            },
        }
    }

    fn stats() -> BlockStats {
        BlockStats {
            records: 9_998,
            first_offset: Some(120_000),
            last_offset: Some(129_999),
            min_timestamp_ms: Some(1_700_000_000_000),
            max_timestamp_ms: None,
            bytes: 4_242,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn manifest_json_is_stable_and_round_trips() {
        let m = Manifest::new(&job(), &stats());
        let bytes = m.to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(text.starts_with("{\n  \"pipeline\": \"orders\",\n  \"topic\": \"orders.v1\""));
        for field in [
            "\"startOffset\": 120000",
            "\"endOffset\": 130000",
            "\"firstOffset\": 120000",
            "\"minTimestamp\": 1700000000000",
            "\"maxTimestamp\": null",
            "\"format\": \"parquet\"",
            "\"compression\": \"zstd\"",
            "\"schemaVersion\": 2",
            "\"data\": \"00000000000000120000-00000000000000130000.abababababababab.parquet\"",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
        assert_eq!(Manifest::new(&job(), &stats()).to_bytes(), bytes);
    }

    #[test]
    fn a_manifest_names_its_data_object_and_older_ones_the_plain_name() {
        let m = Manifest::new(&job(), &stats());
        assert_eq!(
            m.data_name(),
            "00000000000000120000-00000000000000130000.abababababababab.parquet"
        );
        let older = Manifest {
            data: None,
            schema_version: 1,
            ..m.clone()
        };
        let read = Manifest::from_bytes(&older.to_bytes()).unwrap();
        assert_eq!(
            read.data_name(),
            "00000000000000120000-00000000000000130000.parquet"
        );
        // Which data object a losing attempt may remove: only one no manifest can name.
        assert!(m.names_the_same_data_as(&Manifest::new(&job(), &stats())));
        assert!(!read.names_the_same_data_as(&m));
        let other_bytes = BlockStats {
            sha256: "cd".repeat(32),
            ..stats()
        };
        assert!(!m.names_the_same_data_as(&Manifest::new(&job(), &other_bytes)));
    }

    #[test]
    fn manifest_rejects_garbage() {
        assert!(Manifest::from_bytes(b"{\"pipeline\": \"x\"}").is_err());
        assert!(Manifest::from_bytes(b"not json").is_err());
    }

    #[test]
    fn a_block_of_another_cluster_is_refused_and_unknown_clusters_pass() {
        let spec = |cluster: Option<&str>| BlockJobSpec {
            kafka_cluster_id: cluster.map(str::to_owned),
            ..job()
        };
        let stats = BlockStats::default();
        let url = "s3://bucket/prefix/x.manifest.json";
        let a = Manifest::new(&spec(Some("A")), &stats);
        assert!(a.check_source(&spec(Some("A")), url).is_ok());
        assert!(a.check_source(&spec(None), url).is_ok());
        assert!(
            Manifest::new(&spec(None), &stats)
                .check_source(&spec(Some("B")), url)
                .is_ok()
        );
        let err = a
            .check_source(&spec(Some("B")), url)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("s3://bucket/prefix/x.manifest.json holds a block of Kafka cluster \"A\", not of this job's Kafka cluster \"B\""),
            "{err}"
        );
        assert!(
            err.contains("give this pipeline its own spec.output.url"),
            "{err}"
        );
    }

    #[test]
    fn a_block_of_a_topic_deleted_and_created_again_is_refused() {
        let spec = |topic_id: Option<&str>| BlockJobSpec {
            kafka_cluster_id: Some("A".into()),
            kafka_topic_id: topic_id.map(str::to_owned),
            ..job()
        };
        let url = "file:///out/x.manifest.json";
        let old = Manifest::new(&spec(Some("old-id")), &BlockStats::default());
        assert!(old.check_source(&spec(Some("old-id")), url).is_ok());
        assert!(old.check_source(&spec(None), url).is_ok());
        let err = old
            .check_source(&spec(Some("new-id")), url)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("file:///out/x.manifest.json holds a block of topic id \"old-id\", not of this job's topic id \"new-id\""),
            "{err}"
        );
        let json = String::from_utf8(old.to_bytes()).unwrap();
        assert!(json.contains("\"kafkaTopicId\": \"old-id\""), "{json}");
    }
}
