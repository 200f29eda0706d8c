//! What `/healthz` and `/readyz` report: named heartbeats with deadlines, and a readiness
//! flag.
//!
//! A heartbeat stands for a loop that must keep making progress (a reconcile loop, a lease
//! renewal). While it is *armed* it must be beaten at least once per deadline; while it is
//! disarmed (the loop has legitimately nothing to do, or is not this replica's job) it is not
//! judged. Work that runs for a while as one step (one reconcile) is tracked as an
//! *operation* of its heartbeat instead, with a deadline of its own; while any is in
//! progress the heartbeat is judged by the operations rather than by its beats, and the end
//! of one counts as a beat.
//!
//! [`Heartbeats`] is the pure bookkeeping, with the time passed in; [`Health`] is the shared
//! handle the processes use, which reads the clock.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A heartbeat or operation past its deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    /// The heartbeat's name; for an operation, followed by what the operation is.
    pub name: String,
    /// How long ago the last beat was (or, for an operation, when it started).
    pub since: Duration,
    pub deadline: Duration,
    /// An operation still in progress, rather than a missed beat.
    pub in_progress: bool,
}

impl fmt::Display for Stale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.in_progress {
            "in progress for"
        } else {
            "no progress for"
        };
        write!(
            f,
            "{}: {what} {:.1}s (deadline {:.1}s)",
            self.name,
            self.since.as_secs_f64(),
            self.deadline.as_secs_f64()
        )
    }
}

/// Identifies an operation started with [`Heartbeats::start`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpId {
    name: &'static str,
    id: u64,
}

#[derive(Debug, Default)]
struct Beat {
    armed: Option<Armed>,
    ops: BTreeMap<u64, Op>,
}

#[derive(Debug)]
struct Armed {
    deadline: Duration,
    last: Instant,
}

#[derive(Debug)]
struct Op {
    what: String,
    started: Instant,
    deadline: Duration,
}

/// Named heartbeats with deadlines; every method takes the current time.
#[derive(Debug, Default)]
pub struct Heartbeats {
    beats: BTreeMap<&'static str, Beat>,
    next_op: u64,
}

impl Heartbeats {
    /// Starts judging `name`: from `now` on it must be beaten at least every `deadline`.
    /// Arming an armed heartbeat only changes its deadline (its last beat stays).
    pub fn arm(&mut self, name: &'static str, deadline: Duration, now: Instant) {
        let beat = self.beats.entry(name).or_default();
        match &mut beat.armed {
            Some(armed) => armed.deadline = deadline,
            None => {
                beat.armed = Some(Armed {
                    deadline,
                    last: now,
                })
            }
        }
    }

    /// Stops judging `name` by its beats (operations in progress still are).
    pub fn disarm(&mut self, name: &'static str) {
        if let Some(beat) = self.beats.get_mut(name) {
            beat.armed = None;
            if beat.ops.is_empty() {
                self.beats.remove(name);
            }
        }
    }

    pub fn is_armed(&self, name: &str) -> bool {
        self.beats.get(name).is_some_and(|b| b.armed.is_some())
    }

    /// Records progress of `name`. No effect while it is disarmed: arming starts afresh.
    pub fn beat(&mut self, name: &'static str, now: Instant) {
        if let Some(Beat {
            armed: Some(armed), ..
        }) = self.beats.get_mut(name)
        {
            armed.last = armed.last.max(now);
        }
    }

    /// An operation of `name` (`what`: which one, for the report) that must end within
    /// `deadline`, armed or not.
    pub fn start(
        &mut self,
        name: &'static str,
        what: impl Into<String>,
        deadline: Duration,
        now: Instant,
    ) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.beats.entry(name).or_default().ops.insert(
            id,
            Op {
                what: what.into(),
                started: now,
                deadline,
            },
        );
        OpId { name, id }
    }

    /// Ends an operation; that is a beat of its heartbeat.
    pub fn finish(&mut self, op: OpId, now: Instant) {
        let Some(beat) = self.beats.get_mut(op.name) else {
            return;
        };
        beat.ops.remove(&op.id);
        if beat.armed.is_none() && beat.ops.is_empty() {
            self.beats.remove(op.name);
        } else {
            self.beat(op.name, now);
        }
    }

    /// Operations in progress of `name`.
    pub fn in_progress(&self, name: &str) -> usize {
        self.beats.get(name).map_or(0, |b| b.ops.len())
    }

    /// Everything past its deadline at `now` (strictly: exactly at the deadline is still
    /// fine), heartbeats in name order, operations in start order.
    pub fn check(&self, now: Instant) -> Result<(), Vec<Stale>> {
        let mut stale = Vec::new();
        for (name, beat) in &self.beats {
            for op in beat.ops.values() {
                let since = now.saturating_duration_since(op.started);
                if since > op.deadline {
                    stale.push(Stale {
                        name: format!("{name} {}", op.what),
                        since,
                        deadline: op.deadline,
                        in_progress: true,
                    });
                }
            }
            if let Some(armed) = &beat.armed
                && beat.ops.is_empty()
            {
                let since = now.saturating_duration_since(armed.last);
                if since > armed.deadline {
                    stale.push(Stale {
                        name: (*name).to_string(),
                        since,
                        deadline: armed.deadline,
                        in_progress: false,
                    });
                }
            }
        }
        if stale.is_empty() { Ok(()) } else { Err(stale) }
    }
}

/// The process's health, shared by whatever makes progress and the probe endpoints.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ready: AtomicBool,
    beats: Mutex<Heartbeats>,
}

impl Health {
    /// `/readyz` answers ok from now on.
    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// See [`Heartbeats::arm`].
    pub fn arm(&self, name: &'static str, deadline: Duration) {
        self.beats().arm(name, deadline, Instant::now());
    }

    /// See [`Heartbeats::disarm`].
    pub fn disarm(&self, name: &'static str) {
        self.beats().disarm(name);
    }

    pub fn is_armed(&self, name: &str) -> bool {
        self.beats().is_armed(name)
    }

    /// See [`Heartbeats::beat`].
    pub fn beat(&self, name: &'static str) {
        self.beats().beat(name, Instant::now());
    }

    /// Starts an operation (see [`Heartbeats::start`]) that ends when the guard is dropped —
    /// also when the future holding it is dropped unfinished.
    pub fn start(
        &self,
        name: &'static str,
        what: impl Into<String>,
        deadline: Duration,
    ) -> InProgress {
        let op = self.beats().start(name, what, deadline, Instant::now());
        InProgress {
            health: self.clone(),
            op,
        }
    }

    /// See [`Heartbeats::check`].
    pub fn check(&self, now: Instant) -> Result<(), Vec<Stale>> {
        self.beats().check(now)
    }

    fn beats(&self) -> MutexGuard<'_, Heartbeats> {
        // The bookkeeping stays consistent whatever panicked while holding the lock.
        self.inner
            .beats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An operation in progress; dropping it ends the operation.
#[must_use = "the operation ends when this is dropped"]
#[derive(Debug)]
pub struct InProgress {
    health: Health,
    op: OpId,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.health.beats().finish(self.op, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn names(r: Result<(), Vec<Stale>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    /// A fresh set of heartbeats with `name` armed at the returned instant.
    fn armed(name: &'static str, deadline: Duration) -> (Instant, Heartbeats) {
        let t0 = Instant::now();
        let mut h = Heartbeats::default();
        h.arm(name, deadline, t0);
        (t0, h)
    }

    #[test]
    fn nothing_armed_is_healthy() {
        let t0 = Instant::now();
        let mut h = Heartbeats::default();
        assert_eq!(h.check(t0 + 1000 * S), Ok(()));
        // Beats of a heartbeat that was never armed are ignored, not remembered.
        h.beat("loop", t0);
        assert!(!h.is_armed("loop"));
        assert_eq!(h.check(t0 + 1000 * S), Ok(()));
    }

    #[test]
    fn an_armed_heartbeat_is_stale_only_strictly_past_its_deadline() {
        let (t0, h) = armed("loop", 10 * S);
        assert_eq!(h.check(t0), Ok(()));
        assert_eq!(h.check(t0 + 10 * S), Ok(()));
        let stale = h.check(t0 + 10 * S + Duration::from_millis(1)).unwrap_err();
        assert_eq!(
            stale,
            [Stale {
                name: "loop".into(),
                since: 10 * S + Duration::from_millis(1),
                deadline: 10 * S,
                in_progress: false,
            }]
        );
        assert_eq!(
            stale[0].to_string(),
            "loop: no progress for 10.0s (deadline 10.0s)"
        );
    }

    #[test]
    fn a_beat_restarts_the_deadline() {
        let (t0, mut h) = armed("loop", 10 * S);
        h.beat("loop", t0 + 8 * S);
        assert_eq!(h.check(t0 + 18 * S), Ok(()));
        assert_eq!(names(h.check(t0 + 19 * S)), ["loop"]);
        // Recovers with the next beat.
        h.beat("loop", t0 + 19 * S);
        assert_eq!(h.check(t0 + 20 * S), Ok(()));
        // A beat with an older timestamp (a racing thread) never moves the last beat back.
        h.beat("loop", t0);
        assert_eq!(h.check(t0 + 29 * S), Ok(()));
    }

    #[test]
    fn disarmed_time_does_not_count_and_rearming_starts_afresh() {
        let (t0, mut h) = armed("lease", 10 * S);
        h.disarm("lease");
        assert!(!h.is_armed("lease"));
        assert_eq!(h.check(t0 + 100 * S), Ok(()));
        h.arm("lease", 10 * S, t0 + 100 * S);
        assert_eq!(h.check(t0 + 110 * S), Ok(()));
        assert_eq!(names(h.check(t0 + 111 * S)), ["lease"]);
    }

    #[test]
    fn arming_an_armed_heartbeat_keeps_its_last_beat() {
        let (t0, mut h) = armed("loop", 10 * S);
        h.arm("loop", 20 * S, t0 + 15 * S);
        assert_eq!(h.check(t0 + 20 * S), Ok(()));
        assert_eq!(names(h.check(t0 + 21 * S)), ["loop"]);
        // Disarming an unknown heartbeat is harmless.
        h.disarm("other");
    }

    #[test]
    fn heartbeats_are_judged_independently() {
        let (t0, mut h) = armed("b", 10 * S);
        h.arm("a", 30 * S, t0);
        assert_eq!(names(h.check(t0 + 11 * S)), ["b"]);
        assert_eq!(names(h.check(t0 + 31 * S)), ["a", "b"]);
        h.beat("b", t0 + 30 * S);
        assert_eq!(names(h.check(t0 + 31 * S)), ["a"]);
    }

    #[test]
    fn an_operation_is_stale_past_its_own_deadline_armed_or_not() {
        let t0 = Instant::now();
        let mut h = Heartbeats::default();
        let op = h.start("reconcile", "ns/p", 60 * S, t0);
        assert_eq!(h.in_progress("reconcile"), 1);
        assert_eq!(h.check(t0 + 60 * S), Ok(()));
        let stale = h.check(t0 + 61 * S).unwrap_err();
        assert_eq!(stale[0].name, "reconcile ns/p");
        assert!(stale[0].in_progress);
        assert_eq!(
            stale[0].to_string(),
            "reconcile ns/p: in progress for 61.0s (deadline 60.0s)"
        );
        h.finish(op, t0 + 62 * S);
        assert_eq!(h.in_progress("reconcile"), 0);
        assert_eq!(h.check(t0 + 1000 * S), Ok(()));
    }

    #[test]
    fn while_operations_run_the_beats_are_not_judged_and_an_end_is_a_beat() {
        let (t0, mut h) = armed("reconcile", 10 * S);
        let long = h.start("reconcile", "ns/long", 100 * S, t0 + 5 * S);
        // No beat for 50 s, but a reconcile is in progress within its deadline.
        assert_eq!(h.check(t0 + 50 * S), Ok(()));
        let short = h.start("reconcile", "ns/short", 100 * S, t0 + 50 * S);
        h.finish(short, t0 + 51 * S);
        h.finish(long, t0 + 60 * S);
        // The end of the last one restarted the clock.
        assert_eq!(h.check(t0 + 70 * S), Ok(()));
        assert_eq!(names(h.check(t0 + 71 * S)), ["reconcile"]);
    }

    #[test]
    fn stuck_operations_are_reported_in_start_order() {
        let (t0, mut h) = armed("reconcile", 10 * S);
        h.start("reconcile", "ns/b", 10 * S, t0);
        h.start("reconcile", "ns/a", 10 * S, t0 + S);
        let ok = h.start("reconcile", "ns/c", 100 * S, t0);
        assert_eq!(
            names(h.check(t0 + 20 * S)),
            ["reconcile ns/b", "reconcile ns/a"]
        );
        h.finish(ok, t0 + 20 * S);
        assert_eq!(h.in_progress("reconcile"), 2);
    }

    #[test]
    fn an_operation_of_a_disarmed_heartbeat_leaves_nothing_behind() {
        let t0 = Instant::now();
        let mut h = Heartbeats::default();
        let op = h.start("build", "job", 10 * S, t0);
        h.finish(op, t0 + S);
        assert!(h.beats.is_empty());
        // Finishing twice (or after a disarm) is harmless.
        h.finish(op, t0 + 2 * S);
        assert_eq!(h.check(t0 + 1000 * S), Ok(()));
    }

    #[test]
    fn the_shared_handle_ends_an_operation_when_its_guard_drops() {
        let health = Health::default();
        assert!(!health.is_ready());
        health.set_ready();
        assert!(health.is_ready());
        let guard = health.start("reconcile", "ns/p", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(names(health.check(Instant::now())), ["reconcile ns/p"]);
        drop(guard);
        assert_eq!(health.check(Instant::now()), Ok(()));
        health.arm("loop", 60 * S);
        assert!(health.is_armed("loop"));
        health.beat("loop");
        assert_eq!(health.check(Instant::now()), Ok(()));
        health.disarm("loop");
        assert_eq!(health.check(Instant::now() + 1000 * S), Ok(()));
    }
}
