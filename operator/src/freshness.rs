//! How old the oldest record not yet committed is: the figure a data consumer cares about
//! (how far behind the blocks are), where lag counts records, not time.
//!
//! Record timestamps are the producer's to set (and can be anything), so arrival is measured
//! by the operator itself: each time it sees a partition's log end move, it notes the new end
//! and the time. The record at offset `o` arrived no later than the first note whose end is
//! past `o`, so the age of the oldest uncommitted record is the time since the first note past
//! the committed offset (at most a poll interval short). Notes are kept in memory: after the
//! operator restarts, ages count from its first poll.

use std::collections::VecDeque;
use std::time::Duration;

use jiff::Timestamp;

/// Notes kept per partition; beyond this, neighbouring notes merge into the earlier time,
/// which can only overstate an age.
const MAX_NOTES: usize = 64;

/// When the log of one partition was seen to end where: (end offset, first seen), ascending.
#[derive(Clone, Debug, Default)]
pub struct Arrivals {
    notes: VecDeque<(i64, Timestamp)>,
}

impl Arrivals {
    /// The log was seen to end at `high` at `now`.
    pub fn observe(&mut self, high: i64, now: Timestamp) {
        match self.notes.back() {
            Some(&(end, _)) if high <= end => {
                if high < end {
                    // The log went back (re-created or truncated): its arrivals start over.
                    self.notes.clear();
                    self.notes.push_back((high, now));
                }
            }
            _ => self.notes.push_back((high, now)),
        }
        if self.notes.len() > MAX_NOTES {
            let (_, earlier) = self.notes.remove(1).expect("over the maximum");
            self.notes[1].1 = earlier;
        }
    }

    /// The age at `now` of the record at offset `committed` (the oldest not committed), or
    /// zero when every record seen is committed. Forgets the notes it no longer needs.
    pub fn oldest_uncommitted_age(&mut self, committed: i64, now: Timestamp) -> Duration {
        while self.notes.front().is_some_and(|&(end, _)| end <= committed) {
            self.notes.pop_front();
        }
        self.notes.front().map_or(Duration::ZERO, |&(_, seen)| {
            Duration::try_from(now.duration_since(seen)).unwrap_or(Duration::ZERO)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn the_oldest_uncommitted_record_is_as_old_as_the_first_sight_past_the_commit() {
        let mut a = Arrivals::default();
        a.observe(100, at(0));
        a.observe(100, at(5)); // nothing new
        a.observe(250, at(10));
        a.observe(400, at(20));
        // Offsets 0..100 were there at 0 s.
        assert_eq!(a.oldest_uncommitted_age(0, at(30)), Duration::from_secs(30));
        assert_eq!(
            a.oldest_uncommitted_age(99, at(30)),
            Duration::from_secs(30)
        );
        // 100..250 arrived by 10 s, 250..400 by 20 s.
        assert_eq!(
            a.oldest_uncommitted_age(100, at(30)),
            Duration::from_secs(20)
        );
        assert_eq!(
            a.oldest_uncommitted_age(300, at(30)),
            Duration::from_secs(10)
        );
        // All committed: nothing is waiting.
        assert_eq!(a.oldest_uncommitted_age(400, at(30)), Duration::ZERO);
        // Then more arrives.
        a.observe(450, at(40));
        assert_eq!(
            a.oldest_uncommitted_age(400, at(45)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_log_that_goes_back_starts_over() {
        let mut a = Arrivals::default();
        a.observe(1000, at(0));
        a.observe(300, at(50));
        assert_eq!(a.oldest_uncommitted_age(0, at(60)), Duration::from_secs(10));
    }

    #[test]
    fn many_sightings_merge_into_the_earlier_time_and_never_understate() {
        let mut a = Arrivals::default();
        for i in 0..1000 {
            a.observe(10 * (i + 1), at(i));
        }
        assert!(a.notes.len() <= MAX_NOTES);
        // The exact first sight of each offset is i s for offsets [10 i, 10 (i + 1)).
        for (offset, exact) in [(0, 999), (5000, 499), (9000, 99), (9990, 0)] {
            let age = a.clone().oldest_uncommitted_age(offset, at(999)).as_secs();
            assert!(age >= exact, "offset {offset}: {age} < {exact}");
        }
        assert_eq!(
            a.clone().oldest_uncommitted_age(0, at(999)),
            Duration::from_secs(999)
        );
    }
}
