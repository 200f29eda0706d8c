//! How old the oldest record not yet committed is: the figure a data consumer cares about
//! (how far behind the blocks are), where lag counts records, not time.
//!
//! Record timestamps are the producer's to set (and can be anything), so arrival is measured
//! by the operator itself: each time it sees a partition's log end move, it notes the new end
//! and the time. The record at offset `o` arrived no later than the first note whose end is
//! past `o`, so the age of the oldest uncommitted record is the time since the first note past
//! the committed offset (at most a poll interval short). The status holds that time, not the
//! age, so that a pipeline where nothing changes has nothing to rewrite. Notes are kept in
//! memory: after the operator restarts, ages count from its first poll.

use std::collections::VecDeque;

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

    /// When the record at offset `committed` (the oldest not committed) was first seen, or
    /// `None` when every record seen is committed. Forgets the notes it no longer needs.
    pub fn oldest_uncommitted_arrival(&mut self, committed: i64) -> Option<Timestamp> {
        while self.notes.front().is_some_and(|&(end, _)| end <= committed) {
            self.notes.pop_front();
        }
        self.notes.front().map(|&(_, seen)| seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn the_oldest_uncommitted_record_arrived_at_the_first_sight_past_the_commit() {
        let mut a = Arrivals::default();
        a.observe(100, at(0));
        a.observe(100, at(5)); // nothing new
        a.observe(250, at(10));
        a.observe(400, at(20));
        // Offsets 0..100 were there at 0 s.
        assert_eq!(a.oldest_uncommitted_arrival(0), Some(at(0)));
        assert_eq!(a.oldest_uncommitted_arrival(99), Some(at(0)));
        // 100..250 arrived by 10 s, 250..400 by 20 s.
        assert_eq!(a.oldest_uncommitted_arrival(100), Some(at(10)));
        assert_eq!(a.oldest_uncommitted_arrival(300), Some(at(20)));
        // All committed: nothing is waiting.
        assert_eq!(a.oldest_uncommitted_arrival(400), None);
        // Then more arrives.
        a.observe(450, at(40));
        assert_eq!(a.oldest_uncommitted_arrival(400), Some(at(40)));
    }

    #[test]
    fn the_arrival_stays_put_while_the_log_grows_and_nothing_is_committed() {
        let mut a = Arrivals::default();
        for i in 0..100 {
            a.observe(10 * (i + 1), at(i));
            assert_eq!(a.oldest_uncommitted_arrival(0), Some(at(0)));
        }
    }

    #[test]
    fn a_log_that_goes_back_starts_over() {
        let mut a = Arrivals::default();
        a.observe(1000, at(0));
        a.observe(300, at(50));
        assert_eq!(a.oldest_uncommitted_arrival(0), Some(at(50)));
    }

    #[test]
    fn many_sightings_merge_into_the_earlier_time_and_never_understate() {
        let mut a = Arrivals::default();
        for i in 0..1000 {
            a.observe(10 * (i + 1), at(i));
        }
        assert!(a.notes.len() <= MAX_NOTES);
        // The exact first sight of each offset is i s for offsets [10 i, 10 (i + 1)).
        for (offset, exact) in [(0, 0), (5000, 500), (9000, 900), (9990, 999)] {
            let seen = a.clone().oldest_uncommitted_arrival(offset).unwrap();
            assert!(
                seen <= at(exact),
                "offset {offset}: seen {seen} after {exact} s"
            );
        }
        assert_eq!(a.clone().oldest_uncommitted_arrival(0), Some(at(0)));
    }
}
