//! What the benchmarks share: job ranges as their children's command lines carry them, and
//! building a share of them as one builder process does, `--concurrent-jobs` at a time.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use blocksmith_builder::runner::{BuildSettings, build_block};
use blocksmith_crds::BlockJobSpec;

/// One job: `[start, end)` of a partition; `partition:start-end` on a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

impl FromStr for Range {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Range> {
        let (partition, rest) = s.split_once(':').context("expected partition:start-end")?;
        let (start, end) = rest
            .split_once('-')
            .context("expected partition:start-end")?;
        Ok(Range {
            partition: partition.parse()?,
            start: start.parse()?,
            end: end.parse()?,
        })
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}-{}", self.partition, self.start, self.end)
    }
}

/// Share `i` of `n` of the jobs, dealt round-robin as `n` builders claiming from the queue
/// would split them, as a `--ranges` value; `None` for an empty share.
pub fn share(jobs: &[Range], i: usize, n: usize) -> Option<String> {
    let share: Vec<String> = jobs
        .iter()
        .skip(i)
        .step_by(n)
        .map(Range::to_string)
        .collect();
    (!share.is_empty()).then(|| share.join(","))
}

/// The ranges split into jobs of at most `job_records`.
pub fn split_jobs(ranges: &[Range], job_records: i64) -> Vec<Range> {
    let step = job_records.max(1);
    ranges
        .iter()
        .flat_map(|r| {
            (r.start..r.end)
                .step_by(step as usize)
                .map(move |start| Range {
                    partition: r.partition,
                    start,
                    end: (start + step).min(r.end),
                })
        })
        .collect()
}

/// What building a share of the jobs wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct Built {
    pub records: u64,
    /// Key, value and header bytes read.
    pub bytes_in: u64,
    /// Block bytes written.
    pub bytes_out: u64,
}

/// Builds every job with `build_block`, `at_once` at a time as a builder's slots do: each
/// takes the next job when it has finished its last.
pub fn build_ranges(
    jobs: &[Range],
    spec: impl Fn(&Range) -> BlockJobSpec,
    settings: &BuildSettings,
    at_once: u8,
) -> anyhow::Result<Built> {
    let runtime = tokio::runtime::Runtime::new()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let queue = std::sync::Mutex::new(jobs.iter());
    let slot = || async {
        let mut built = Built::default();
        loop {
            let Some(job) = queue.lock().unwrap().next() else {
                return anyhow::Ok(built);
            };
            let spec = spec(job);
            let block = build_block(&spec, settings, cancel.clone())
                .await
                .with_context(|| format!("{}[{}]", spec.topic, job.partition))?;
            built.records += block.output.records as u64;
            built.bytes_in += block.read_bytes;
            built.bytes_out += block.output.bytes as u64;
        }
    };
    let slots = (0..at_once.max(1)).map(|_| slot());
    let mut total = Built::default();
    for slot in runtime.block_on(futures::future::join_all(slots)) {
        let slot = slot?;
        total.records += slot.records;
        total.bytes_in += slot.bytes_in;
        total.bytes_out += slot.bytes_out;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip_split_and_share() {
        let r: Range = "3:10-35".parse().unwrap();
        assert_eq!(r.to_string(), "3:10-35");
        assert!("3:10".parse::<Range>().is_err());
        let jobs = split_jobs(&[r], 10);
        let ends: Vec<(i64, i64)> = jobs.iter().map(|j| (j.start, j.end)).collect();
        assert_eq!(ends, [(10, 20), (20, 30), (30, 35)]);
        assert_eq!(share(&jobs, 1, 2).as_deref(), Some("3:20-30"));
        assert_eq!(share(&jobs, 3, 4), None);
    }
}
