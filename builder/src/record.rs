//! One Kafka record as the builder carries it from the reader to the block writer.

use crate::headers::RawHeader;

/// A record borrowed from the client's message: the reader hands it to the block writer,
/// which copies its bytes once, into the Arrow builders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch, when the broker reported one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Headers in order: key bytes (UTF-8 unless the producer broke the protocol) and a
    /// value that may be null.
    pub headers: Vec<RawHeader<'a>>,
}

impl RecordRef<'_> {
    /// Bytes of the key, the value and the headers (keys and values).
    pub fn size_bytes(&self) -> u64 {
        let len = |b: Option<&[u8]>| b.map_or(0, <[u8]>::len);
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + len(*v)).sum();
        (len(self.key) + len(self.value) + headers) as u64
    }

    pub fn to_owned(&self) -> Record {
        Record {
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect(),
        }
    }
}

/// A record that owns its bytes (tests and test data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Record {
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
                .collect(),
        }
    }

    /// Bytes of the key, the value and the headers (keys and values).
    pub fn size_bytes(&self) -> u64 {
        self.as_ref().size_bytes()
    }
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(record: &'a Record) -> Self {
        record.as_ref()
    }
}

/// Records above this many bytes fail the job unless the pipeline sets
/// `spec.output.maxRecordBytes`.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 8 * 1024 * 1024;

/// A record over the pipeline's record-size limit: the job cannot succeed until the limit is
/// raised, so the message says where the record is and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "record at partition {partition} offset {offset} is {bytes} bytes, over \
     spec.output.maxRecordBytes ({limit}); raise the limit and delete job {job} to retry"
)]
pub struct RecordTooLarge {
    pub job: String,
    pub partition: i32,
    pub offset: i64,
    pub bytes: u64,
    pub limit: u64,
}

/// The record-size limit of a job: its `maxRecordBytes`, or the default when unset.
pub fn record_limit(max_record_bytes: Option<i64>) -> u64 {
    max_record_bytes
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_MAX_RECORD_BYTES)
}

/// Accepts a record of at most `limit` bytes; `job` names the job for the message.
pub fn check_size(record: &RecordRef<'_>, limit: u64, job: &str) -> Result<(), RecordTooLarge> {
    let bytes = record.size_bytes();
    if bytes <= limit {
        return Ok(());
    }
    Err(RecordTooLarge {
        job: job.to_owned(),
        partition: record.partition,
        offset: record.offset,
        bytes,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: usize, value: Option<usize>, headers: &[(&str, Option<usize>)]) -> Record {
        Record {
            partition: 3,
            offset: 1234,
            timestamp_ms: None,
            key: (key > 0).then(|| vec![0; key]),
            value: value.map(|n| vec![1; n]),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|n| vec![2; n])))
                .collect(),
        }
    }

    #[test]
    fn size_counts_key_value_and_headers() {
        assert_eq!(record(0, None, &[]).size_bytes(), 0);
        assert_eq!(
            record(3, Some(10), &[("ab", Some(4)), ("c", None)]).size_bytes(),
            3 + 10 + 2 + 4 + 1
        );
    }

    #[test]
    fn records_up_to_the_limit_pass() {
        let r = record(0, Some(100), &[]);
        assert_eq!(check_size(&r.as_ref(), 100, "j"), Ok(()));
        assert_eq!(check_size(&r.as_ref(), 1000, "j"), Ok(()));
    }

    #[test]
    fn a_record_over_the_limit_names_where_it_is_and_what_to_do() {
        let r = record(1, Some(100), &[]);
        let err = check_size(&r.as_ref(), 100, "orders-p3-00000000000000001000").unwrap_err();
        assert_eq!(
            err,
            RecordTooLarge {
                job: "orders-p3-00000000000000001000".into(),
                partition: 3,
                offset: 1234,
                bytes: 101,
                limit: 100,
            }
        );
        assert_eq!(
            err.to_string(),
            "record at partition 3 offset 1234 is 101 bytes, over spec.output.maxRecordBytes \
             (100); raise the limit and delete job orders-p3-00000000000000001000 to retry"
        );
    }

    #[test]
    fn unset_or_nonsense_limits_fall_back_to_the_default() {
        assert_eq!(record_limit(None), DEFAULT_MAX_RECORD_BYTES);
        assert_eq!(record_limit(Some(0)), DEFAULT_MAX_RECORD_BYTES);
        assert_eq!(record_limit(Some(-5)), DEFAULT_MAX_RECORD_BYTES);
        assert_eq!(record_limit(Some(1)), 1);
    }
}
