//! Pure domain rules shared by the operator and the builder: names, keys, labels, lease maths.

use std::time::Duration;

use jiff::Timestamp;

use crate::job::{BlockJobStatus, JobPhase};

pub const LABEL_PIPELINE: &str = "blocksmith.io/pipeline";
pub const LABEL_PARTITION: &str = "blocksmith.io/partition";
pub const LABEL_PHASE: &str = "blocksmith.io/phase";

/// Width of zero-padded offsets in job names and object keys: every i64 offset fits.
const OFFSET_WIDTH: usize = 20;

/// Deterministic job name: `<pipeline>-p<partition>-<start:020>`.
pub fn job_name(pipeline: &str, partition: i32, start_offset: i64) -> String {
    format!("{pipeline}-p{partition}-{start_offset:0OFFSET_WIDTH$}")
}

/// The operator's finalizer on every job it creates. A job the user deletes before its
/// range is committed stays (terminating) until the operator has created its replacement
/// with exactly the same range: a builder still finishing the deleted job then writes the
/// block the replacement would, under the same manifest key, never one overlapping a range
/// cut anew.
pub const FINALIZER_KEEP_RANGE: &str = "blocksmith.io/keep-range";

/// Name of the job that takes over a deleted job's range: `<job>-r1`, then `-r2`, ... A
/// name apart from [`job_name`], so that the replacement can be created while the deleted
/// job still holds the name (and the range) until it is gone.
pub fn replacement_name(job: &str) -> String {
    let (base, n) = job
        .rsplit_once("-r")
        .and_then(|(base, n)| Some((base, n.parse::<u32>().ok()?)))
        .unwrap_or((job, 0));
    format!("{base}-r{}", n.saturating_add(1))
}

/// Name of a block's data object in its partition's folder. It carries the first hex digits of
/// the object's sha256: an object is only ever written with one content, so no writer (a
/// stale one, another version) can replace the bytes a manifest vouches for, and a retry
/// that writes the same bytes lands on the same object.
pub fn data_name(start: i64, end: i64, sha256: &str) -> String {
    let digest = sha256.get(..DATA_DIGEST_CHARS).unwrap_or(sha256);
    format!("{}.{digest}.parquet", range_stem(start, end))
}

/// Name of a data object uploaded while it was being written (a block over the multipart
/// threshold), before its digest was known: `token` is drawn at random for the attempt, so
/// this name too is only ever written with one content.
pub fn streamed_data_name(start: i64, end: i64, token: u64) -> String {
    format!("{}.{token:016x}.parquet", range_stem(start, end))
}

/// The data object's name of a manifest written before data objects carried their digest.
pub fn legacy_data_name(start: i64, end: i64) -> String {
    format!("{}.parquet", range_stem(start, end))
}

/// Hex digits of the sha256 in a data object's name: enough that two blocks of one range
/// with different bytes never share a name.
const DATA_DIGEST_CHARS: usize = 16;

/// Object key of a block's manifest: written last, create-only; the commit point.
pub fn manifest_key(topic: &str, partition: i32, start: i64, end: i64) -> String {
    format!(
        "{}/{}.json",
        partition_folder(topic, partition),
        range_stem(start, end)
    )
}

/// The range `[start, end)` of the manifest named `file_name` (the last part of a
/// [`manifest_key`]); `None` for any other object.
pub fn manifest_range(file_name: &str) -> Option<(i64, i64)> {
    let (start, end) = file_name.strip_suffix(".json")?.split_once('-')?;
    let offset = |s: &str| {
        (s.len() == OFFSET_WIDTH && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((offset(start)?, offset(end)?))
}

/// A key that sorts just before the keys of every block of the partition starting at or
/// after `start`: where a listing of its manifests from `start` begins.
pub fn blocks_from_key(topic: &str, partition: i32, start: i64) -> String {
    format!(
        "{}/{start:0OFFSET_WIDTH$}",
        partition_folder(topic, partition)
    )
}

/// The folder, relative to the output URL's prefix, that holds a partition's blocks.
pub fn partition_folder(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

fn range_stem(start: i64, end: i64) -> String {
    format!("{start:0OFFSET_WIDTH$}-{end:0OFFSET_WIDTH$}")
}

/// Default consumer group of a pipeline.
pub fn default_consumer_group(namespace: &str, name: &str) -> String {
    format!("blocksmith-{namespace}-{name}")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a number followed by ms, s, m or h (e.g. 30s, 5m)")]
pub struct DurationError(pub String);

/// Parses the `maxAge` duration format (`250ms`, `30s`, `5m`, `1h`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_string());
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(err)?,
        "h" => n.checked_mul(3600).ok_or_else(err)?,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs(secs))
}

/// When a lease renewed at `renew_time` for `duration_seconds` runs out.
/// A renewal near the end of time (a corrupt or hostile `renewTime`) expires at the end of
/// time rather than overflowing.
pub fn lease_expiry(renew_time: Timestamp, duration_seconds: i32) -> Timestamp {
    renew_time
        .checked_add(jiff::SignedDuration::from_secs(i64::from(
            duration_seconds.max(0),
        )))
        .unwrap_or(Timestamp::MAX)
}

/// How often a holder renews: a third of the lease, so two renewals can fail before expiry.
pub fn renew_interval(duration_seconds: i32) -> Duration {
    Duration::from_millis((duration_seconds.max(1) as u64) * 1000 / 3)
}

/// Whether a builder may claim the job now: `Pending` (or no status) and past its backoff.
pub fn is_claimable(status: Option<&BlockJobStatus>, now: Timestamp) -> bool {
    status.is_none_or(|s| {
        s.phase() == JobPhase::Pending && s.not_before.as_ref().is_none_or(|t| t.0 <= now)
    })
}

/// Exponential retry backoff before attempt `next_attempt` (2, 3, ...): 5 s, 10 s, 20 s, ...
/// capped at 5 minutes.
pub fn retry_backoff(next_attempt: i32) -> Duration {
    let exp = (next_attempt - 2).clamp(0, 16) as u32;
    Duration::from_secs(5u64.saturating_mul(1 << exp).min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_is_named_apart_from_every_planned_job_and_counts_up() {
        let planned = job_name("orders-r1", 3, 120);
        let first = replacement_name(&planned);
        assert_eq!(first, "orders-r1-p3-00000000000000000120-r1");
        assert_eq!(
            replacement_name(&first),
            "orders-r1-p3-00000000000000000120-r2"
        );
        assert_ne!(first, job_name("orders-r1", 3, 120));
    }

    #[test]
    fn names_sort_by_offset_and_are_valid_dns_labels() {
        let a = job_name("orders", 3, 120_000);
        assert_eq!(a, "orders-p3-00000000000000120000");
        assert!(job_name("orders", 3, 9) < job_name("orders", 3, 10));
        assert_eq!(job_name("x", 0, i64::MAX).len(), "x-p0-".len() + 20);
    }

    #[test]
    fn keys_have_padded_ranges() {
        assert_eq!(partition_folder("t", 1), "t/1");
        assert_eq!(
            data_name(0, 1000, &"ab".repeat(32)),
            "00000000000000000000-00000000000000001000.abababababababab.parquet"
        );
        assert_eq!(
            legacy_data_name(0, 1000),
            "00000000000000000000-00000000000000001000.parquet"
        );
        assert_eq!(
            manifest_key("t", 1, 0, 1000),
            "t/1/00000000000000000000-00000000000000001000.json"
        );
    }

    #[test]
    fn a_manifest_key_gives_back_its_range_and_no_other_object_does() {
        let key = manifest_key("t", 1, 2000, 4000);
        let name = key.rsplit('/').next().unwrap();
        assert_eq!(manifest_range(name), Some((2000, 4000)));
        let data = data_name(2000, 4000, "abababababababababab");
        for other in [data.as_str(), "2000-4000.json", "x.json", "manifest.json"] {
            assert_eq!(manifest_range(other), None, "{other}");
        }
        let from = blocks_from_key("t", 1, 2000);
        assert!(from < key && from > manifest_key("t", 1, 1999, 2000));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "5", "m", "5d", "-5s", "5 m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(retry_backoff(2), Duration::from_secs(5));
        assert_eq!(retry_backoff(3), Duration::from_secs(10));
        assert_eq!(retry_backoff(100), Duration::from_secs(300));
        assert_eq!(renew_interval(30), Duration::from_secs(10));
        assert_eq!(lease_expiry(Timestamp::MAX, 30), Timestamp::MAX);
    }
}
