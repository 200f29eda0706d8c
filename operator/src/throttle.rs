//! Spaces one pipeline's reconciles at least a gap apart, without postponing any for longer.
//!
//! kube-runtime's debounce restarts its wait at every event, so a pipeline whose jobs changed
//! more often than the debounce period (a job finishing every 140 ms) was neither planned nor
//! committed until they stopped (BENCHMARKS.md, "System throughput end to end"). Here the
//! first event after a quiet spell reconciles at once, and a steady stream of events
//! reconciles once per gap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    gap: Duration,
    /// When each pipeline's latest reconcile starts (or started), by namespace and name.
    starts: Mutex<HashMap<(String, String), Instant>>,
}

impl Throttle {
    pub fn new(gap: Duration) -> Self {
        Self {
            gap,
            starts: Mutex::default(),
        }
    }

    /// How long the reconcile of `pipeline` asked for at `now` waits before it starts.
    pub fn wait(&self, pipeline: (String, String), now: Instant) -> Duration {
        let mut starts = self.starts.lock().expect("throttle lock");
        let wait = starts.get(&pipeline).map_or(Duration::ZERO, |&last| {
            next_start(last, self.gap, now) - now
        });
        starts.insert(pipeline, now + wait);
        wait
    }

    /// Drops what is kept of a deleted pipeline.
    pub fn forget(&self, pipeline: &(String, String)) {
        self.starts.lock().expect("throttle lock").remove(pipeline);
    }
}

/// The earliest a reconcile asked for at `now` may start, the last one having started at
/// `last`: at once after a quiet spell, else `gap` after the last.
fn next_start(last: Instant, gap: Duration, now: Instant) -> Instant {
    now.max(last + gap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> (String, String) {
        ("ns".into(), name.into())
    }

    #[test]
    fn a_steady_stream_of_events_reconciles_once_per_gap_and_never_waits_longer() {
        let gap = Duration::from_millis(500);
        let throttle = Throttle::new(gap);
        let t0 = Instant::now();
        assert_eq!(
            throttle.wait(key("a"), t0),
            Duration::ZERO,
            "first: at once"
        );
        // Events every 140 ms: each reconcile starts 500 ms after the one before, however
        // many events came between (the controller merges those that wait).
        assert_eq!(
            throttle.wait(key("a"), t0 + Duration::from_millis(140)),
            Duration::from_millis(360)
        );
        assert_eq!(
            throttle.wait(key("a"), t0 + Duration::from_millis(600)),
            Duration::from_millis(400)
        );
        // Another pipeline is not held back by this one.
        assert_eq!(
            throttle.wait(key("b"), t0 + Duration::from_millis(600)),
            Duration::ZERO
        );
        // After a quiet spell longer than the gap: at once again.
        assert_eq!(
            throttle.wait(key("a"), t0 + Duration::from_secs(5)),
            Duration::ZERO
        );
        throttle.forget(&key("a"));
        assert_eq!(
            throttle.wait(key("a"), t0 + Duration::from_secs(5)),
            Duration::ZERO
        );
    }
}
