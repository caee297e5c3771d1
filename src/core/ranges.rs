//! A compact set of `u64` values stored as sorted, disjoint, non-adjacent
//! half-open ranges.
//!
//! The transfer engine uses [`RangeSet`] wherever it must remember "which
//! chunk numbers": chunks received (the SACK state a receiver reports),
//! chunks acknowledged on the sender, chunks queued for retransmission, and
//! the have-set exchanged when a transfer resumes. Chunk numbers arrive
//! mostly in order, so the set stays a handful of ranges even for millions
//! of values, and every operation is `O(log n)` in the number of ranges.
//!
//! Because ranges are half-open (`start..end` with `end <= u64::MAX`), the
//! value `u64::MAX` itself can never be a member; callers number chunks from
//! zero and never come near it.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};
use std::ops::Range;

/// A set of `u64` values kept as disjoint, non-adjacent, sorted half-open
/// ranges, with the number of covered values maintained incrementally.
///
/// Create one with [`RangeSet::new`] (or `Default`), feed it with
/// [`insert`](RangeSet::insert) / [`remove`](RangeSet::remove), and read it
/// back with [`iter`](RangeSet::iter) (to encode SACK blocks),
/// [`gaps`](RangeSet::gaps) (to find what is still missing) or
/// [`pop_min`](RangeSet::pop_min) (to drain a retransmission queue in order).
/// Empty ranges (`start >= end`) given to any method are no-ops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive); disjoint, and no range ends where the next starts.
    map: BTreeMap<u64, u64>,
    /// Total number of values covered by all ranges.
    covered: u64,
}

impl RangeSet {
    /// Creates an empty set.
    ///
    /// Call this when a transfer (or a queue) starts; then add values with
    /// [`insert`](Self::insert).
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns `true` when the set holds no value at all.
    ///
    /// Use it to tell whether, for example, a retransmission queue has
    /// anything to send before asking for [`pop_min`](Self::pop_min).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Returns the number of disjoint ranges (not values) in the set.
    ///
    /// Use it to size a SACK frame before encoding [`iter`](Self::iter);
    /// for the number of values call [`covered`](Self::covered).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Returns the number of values in the set, in `O(1)`.
    ///
    /// Compare it with the total chunk count to know when a transfer is
    /// complete, or report it as progress.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Returns `true` if `value` is in the set.
    ///
    /// Call it before acting on a single chunk (e.g. to skip a duplicate);
    /// for a whole span use [`contains_range`](Self::contains_range).
    pub fn contains(&self, value: u64) -> bool {
        self.range_containing(value).is_some()
    }

    /// Returns `true` if every value of `r` is in the set (an empty `r` is
    /// trivially covered).
    ///
    /// Use it to check that a span of chunks is already present; if it
    /// returns `false`, [`gaps`](Self::gaps) tells which parts are missing.
    pub fn contains_range(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        self.range_containing(r.start)
            .is_some_and(|have| have.end >= r.end)
    }

    /// Adds every value of `r`, merging with overlapping and adjacent ranges,
    /// and returns how many values were not already present.
    ///
    /// Call it when chunks arrive or are acknowledged; a return of `0` means
    /// `r` was a pure duplicate, which the caller may count as such.
    pub fn insert(&mut self, r: Range<u64>) -> u64 {
        self.insert_with(r, |_| {})
    }

    /// Like [`insert`](Self::insert), and additionally calls `f` once for
    /// each maximal sub-range of `r` that was newly added, in ascending
    /// order. Returns the number of newly added values (the total length of
    /// the pieces passed to `f`).
    ///
    /// Use it when the newly covered values need work of their own, e.g.
    /// writing just the newly acknowledged chunks to a progress callback or
    /// removing them from an in-flight table.
    pub fn insert_with(&mut self, r: Range<u64>, mut f: impl FnMut(Range<u64>)) -> u64 {
        if r.start >= r.end {
            return 0;
        }
        let (start, end) = (r.start, r.end);
        let mut new_start = start;
        let mut new_end = end;
        // Everything below `cursor` inside `r` is known to be covered already.
        let mut cursor = start;
        let mut added: u64 = 0;

        // A range starting at or before `start` that reaches `start` (or
        // touches it) is merged.
        if let Some((&ps, &pe)) = self.map.range(..=start).next_back() {
            if pe >= start {
                if pe >= end {
                    return 0; // fully covered already
                }
                self.map.remove(&ps);
                self.covered = self.covered.saturating_sub(pe - ps);
                new_start = ps;
                cursor = pe;
            }
        }
        // Ranges starting inside (start, end] overlap or touch `r`.
        while let Some((&ns, &ne)) = self.map.range((Excluded(start), Included(end))).next() {
            self.map.remove(&ns);
            self.covered = self.covered.saturating_sub(ne - ns);
            if ns > cursor {
                f(cursor..ns);
                added = added.saturating_add(ns - cursor);
            }
            cursor = cursor.max(ne);
            new_end = new_end.max(ne);
        }
        if cursor < end {
            f(cursor..end);
            added = added.saturating_add(end - cursor);
        }
        self.map.insert(new_start, new_end);
        self.covered = self.covered.saturating_add(new_end - new_start);
        added
    }

    /// Removes every value of `r` (splitting ranges as needed) and returns
    /// how many values were actually removed.
    ///
    /// Call it when chunks leave a queue or must be re-sent; a return of `0`
    /// means none of `r` was present.
    pub fn remove(&mut self, r: Range<u64>) -> u64 {
        if r.start >= r.end {
            return 0;
        }
        let (start, end) = (r.start, r.end);
        let mut removed: u64 = 0;

        // A range starting strictly before `start` may reach into `r`.
        if let Some((&ps, &pe)) = self.map.range(..start).next_back() {
            if pe > start {
                // Keep [ps, start), and [end, pe) if the range outlives `r`.
                self.map.insert(ps, start);
                if pe > end {
                    self.map.insert(end, pe);
                }
                removed = removed.saturating_add(pe.min(end) - start);
            }
        }
        // Ranges starting inside [start, end).
        while let Some((&ns, &ne)) = self.map.range(start..end).next() {
            self.map.remove(&ns);
            if ne > end {
                self.map.insert(end, ne);
            }
            removed = removed.saturating_add(ne.min(end) - ns);
        }
        self.covered = self.covered.saturating_sub(removed);
        removed
    }

    /// Returns the whole stored range that contains `value`, or `None` if
    /// `value` is not in the set.
    ///
    /// Use it to extend a single hit to its run, e.g. to acknowledge a whole
    /// contiguous block at once.
    pub fn range_containing(&self, value: u64) -> Option<Range<u64>> {
        self.map
            .range(..=value)
            .next_back()
            .filter(|&(_, &e)| e > value)
            .map(|(&s, &e)| s..e)
    }

    /// Returns the smallest `v >= value` that is not in the set.
    ///
    /// A receiver calls it with `0` (or its last cumulative point) to get the
    /// cumulative-acknowledgement point; a sender uses it to find the next
    /// chunk to send. `u64::MAX` is never a member, so the result is at most
    /// `u64::MAX`.
    pub fn first_missing_from(&self, value: u64) -> u64 {
        self.range_containing(value).map_or(value, |r| r.end)
    }

    /// Returns the smallest value in the set, or `None` if it is empty.
    ///
    /// Use it to peek at the next item of an ordered queue without removing
    /// it; [`pop_min`](Self::pop_min) takes it out.
    pub fn min(&self) -> Option<u64> {
        self.map.keys().next().copied()
    }

    /// Returns the largest value in the set (not the exclusive end of the
    /// last range), or `None` if it is empty.
    ///
    /// Use it for the "highest received" field of a SACK or to bound a scan.
    pub fn max(&self) -> Option<u64> {
        self.map.values().next_back().map(|&e| e.saturating_sub(1))
    }

    /// Removes and returns the smallest value, or `None` if the set is empty.
    ///
    /// Call it repeatedly to drain a retransmission queue in ascending order;
    /// send the returned chunk, then call again while sending is allowed.
    pub fn pop_min(&mut self) -> Option<u64> {
        let (&s, &e) = self.map.iter().next()?;
        self.map.remove(&s);
        let next = s.saturating_add(1);
        if next < e {
            self.map.insert(next, e);
        }
        self.covered = self.covered.saturating_sub(1);
        Some(s)
    }

    /// Iterates over the stored ranges in ascending order (reversible with
    /// `.rev()` to get the highest ranges first).
    ///
    /// Use it to encode SACK blocks or to persist a resume have-set; each
    /// item is a maximal, non-empty range.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Iterates, in ascending order, over the maximal sub-ranges of `within`
    /// that are not in the set.
    ///
    /// A receiver calls it with `0..total_chunks` to list what it still
    /// needs (NACKs, resume requests); a sender uses it to pick chunks to
    /// (re)send. An empty `within` yields nothing.
    pub fn gaps(&self, within: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let end = within.end;
        let mut cursor = within.start;
        if cursor < end {
            if let Some(r) = self.range_containing(cursor) {
                cursor = r.end;
            }
        }
        let mut inner = if cursor < end {
            self.map.range(cursor..end)
        } else {
            self.map.range(0..0)
        };
        std::iter::from_fn(move || {
            while cursor < end {
                match inner.next() {
                    Some((&s, &e)) => {
                        let from = cursor;
                        cursor = cursor.max(e);
                        if s > from {
                            return Some(from..s);
                        }
                    }
                    None => {
                        let gap = cursor..end;
                        cursor = end;
                        return Some(gap);
                    }
                }
            }
            None
        })
    }

    /// Removes every value.
    ///
    /// Call it when a transfer is restarted from scratch; the set can then be
    /// refilled with [`insert`](Self::insert).
    pub fn clear(&mut self) {
        self.map.clear();
        self.covered = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ranges(s: &RangeSet) -> Vec<Range<u64>> {
        s.iter().collect()
    }

    fn set_of(rs: &[Range<u64>]) -> RangeSet {
        let mut s = RangeSet::new();
        for r in rs {
            s.insert(r.clone());
        }
        s
    }

    #[test]
    fn empty_set_basics() {
        let mut s = RangeSet::new();
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert_eq!(s.covered(), 0);
        assert_eq!(s.min(), None);
        assert_eq!(s.max(), None);
        assert_eq!(s.pop_min(), None);
        assert!(!s.contains(0));
        assert!(s.contains_range(5..5));
        assert!(!s.contains_range(5..6));
        assert_eq!(s.first_missing_from(7), 7);
        assert_eq!(s.gaps(3..9).collect::<Vec<_>>(), vec![3..9]);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 9..3;
        assert_eq!(s.gaps(backwards).count(), 0);
    }

    #[test]
    fn empty_ranges_are_noops() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        assert_eq!(s.insert(5..5), 0);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 30..25;
        assert_eq!(s.insert(backwards.clone()), 0);
        assert_eq!(s.remove(15..15), 0);
        assert_eq!(s.remove(backwards), 0);
        assert_eq!(ranges(&s), vec![10..20]);
        assert_eq!(s.covered(), 10);
    }

    #[test]
    fn merges_adjacent_and_overlapping() {
        let mut s = RangeSet::new();
        assert_eq!(s.insert(10..20), 10);
        assert_eq!(s.insert(20..25), 5); // adjacent after
        assert_eq!(ranges(&s), vec![10..25]);
        assert_eq!(s.insert(5..10), 5); // adjacent before
        assert_eq!(ranges(&s), vec![5..25]);
        assert_eq!(s.insert(30..40), 10);
        assert_eq!(s.insert(50..60), 10);
        assert_eq!(s.len(), 3);
        // Bridges all three with overlaps on both ends.
        assert_eq!(s.insert(20..55), 5 + 10);
        assert_eq!(ranges(&s), vec![5..60]);
        assert_eq!(s.covered(), 55);
        // Fully covered insert adds nothing.
        assert_eq!(s.insert(7..59), 0);
        assert_eq!(s.insert(5..60), 0);
        assert_eq!(s.insert(0..100), 45);
        assert_eq!(ranges(&s), vec![0..100]);
        assert_eq!(s.covered(), 100);
    }

    #[test]
    fn insert_with_reports_new_pieces() {
        let mut s = set_of(&[10..20, 30..40, 45..46]);
        let mut pieces = Vec::new();
        let added = s.insert_with(0..50, |r| pieces.push(r));
        assert_eq!(pieces, vec![0..10, 20..30, 40..45, 46..50]);
        assert_eq!(added, 10 + 10 + 5 + 4);
        assert_eq!(ranges(&s), vec![0..50]);

        let mut pieces = Vec::new();
        assert_eq!(s.insert_with(10..20, |r| pieces.push(r)), 0);
        assert!(pieces.is_empty());

        // Start inside an existing range, end beyond it.
        let mut pieces = Vec::new();
        assert_eq!(s.insert_with(40..55, |r| pieces.push(r)), 5);
        assert_eq!(pieces, vec![50..55]);
        // Touching a range that starts exactly at the new end.
        let mut s = RangeSet::new();
        s.insert(10..20);
        let mut pieces = Vec::new();
        assert_eq!(s.insert_with(5..10, |r| pieces.push(r)), 5);
        assert_eq!(pieces, vec![5..10]);
        assert_eq!(ranges(&s), vec![5..20]);
    }

    #[test]
    fn remove_splits_and_trims() {
        let mut s = RangeSet::new();
        s.insert(0..100);
        assert_eq!(s.remove(40..60), 20);
        assert_eq!(ranges(&s), vec![0..40, 60..100]);
        assert_eq!(s.covered(), 80);
        assert_eq!(s.remove(30..70), 20);
        assert_eq!(ranges(&s), vec![0..30, 70..100]);
        assert_eq!(s.remove(30..70), 0);
        assert_eq!(s.remove(0..1), 1);
        assert_eq!(s.remove(99..200), 1);
        assert_eq!(ranges(&s), vec![1..30, 70..99]);
        assert_eq!(s.remove(0..u64::MAX), 29 + 29);
        assert!(s.is_empty());
        assert_eq!(s.covered(), 0);
    }

    #[test]
    fn gaps_at_edges() {
        let s = set_of(&[10..20, 30..40]);
        let g = |w: Range<u64>| s.gaps(w).collect::<Vec<_>>();
        assert_eq!(g(0..50), vec![0..10, 20..30, 40..50]);
        assert_eq!(g(10..40), vec![20..30]);
        assert_eq!(g(15..35), vec![20..30]);
        assert_eq!(g(10..20), Vec::<Range<u64>>::new());
        assert_eq!(g(12..18), Vec::<Range<u64>>::new());
        assert_eq!(g(0..10), vec![0..10]);
        assert_eq!(g(20..30), vec![20..30]);
        assert_eq!(g(19..31), vec![20..30]);
        assert_eq!(g(40..41), vec![40..41]);
        assert_eq!(g(5..5), Vec::<Range<u64>>::new());
    }

    #[test]
    fn u64_max_edges() {
        let mut s = RangeSet::new();
        assert_eq!(s.insert(u64::MAX - 3..u64::MAX), 3);
        assert!(s.contains(u64::MAX - 1));
        assert!(!s.contains(u64::MAX));
        assert_eq!(s.max(), Some(u64::MAX - 1));
        assert_eq!(s.first_missing_from(u64::MAX - 3), u64::MAX);
        assert_eq!(s.first_missing_from(u64::MAX), u64::MAX);
        assert_eq!(
            s.gaps(u64::MAX - 5..u64::MAX).collect::<Vec<_>>(),
            vec![u64::MAX - 5..u64::MAX - 3]
        );
        assert_eq!(s.insert(0..u64::MAX), u64::MAX - 3);
        assert_eq!(s.covered(), u64::MAX);
        assert_eq!(ranges(&s), vec![0..u64::MAX]);
        assert_eq!(s.gaps(0..u64::MAX).count(), 0);
        assert_eq!(s.pop_min(), Some(0));
        assert_eq!(s.covered(), u64::MAX - 1);
        assert_eq!(s.remove(u64::MAX - 1..u64::MAX), 1);
        assert_eq!(ranges(&s), vec![1..u64::MAX - 1]);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.covered(), 0);
    }

    #[test]
    fn point_queries_and_pop_min() {
        let mut s = set_of(&[3..5, 8..9]);
        assert_eq!(s.range_containing(4), Some(3..5));
        assert_eq!(s.range_containing(5), None);
        assert_eq!(s.first_missing_from(3), 5);
        assert!(s.contains_range(3..5));
        assert!(!s.contains_range(3..6));
        assert_eq!(s.min(), Some(3));
        assert_eq!(s.max(), Some(8));
        assert_eq!(s.iter().rev().collect::<Vec<_>>(), vec![8..9, 3..5]);
        let popped: Vec<u64> = std::iter::from_fn(|| s.pop_min()).collect();
        assert_eq!(popped, vec![3, 4, 8]);
        assert!(s.is_empty());
        assert_eq!(s.covered(), 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        InsertWith(u64, u64),
        Remove(u64, u64),
        PopMin,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..200, 0u64..200).prop_map(|(a, b)| Op::Insert(a, b)),
            3 => (0u64..200, 0u64..200).prop_map(|(a, b)| Op::InsertWith(a, b)),
            3 => (0u64..200, 0u64..200).prop_map(|(a, b)| Op::Remove(a, b)),
            1 => Just(Op::PopMin),
        ]
    }

    fn check_against(s: &RangeSet, oracle: &BTreeSet<u64>) {
        for v in 0..210 {
            assert_eq!(s.contains(v), oracle.contains(&v), "contains({v})");
            let expect = (v..).find(|x| !oracle.contains(x)).unwrap_or(u64::MAX);
            assert_eq!(s.first_missing_from(v), expect, "first_missing_from({v})");
        }
        assert_eq!(s.covered(), oracle.len() as u64);
        assert_eq!(s.is_empty(), oracle.is_empty());
        assert_eq!(s.min(), oracle.iter().next().copied());
        assert_eq!(s.max(), oracle.iter().next_back().copied());
        let rs = ranges(s);
        assert_eq!(rs.len(), s.len());
        let mut sum = 0;
        for (i, r) in rs.iter().enumerate() {
            assert!(r.start < r.end, "empty range stored: {r:?}");
            sum += r.end - r.start;
            if i > 0 {
                assert!(rs[i - 1].end < r.start, "not disjoint/non-adjacent: {rs:?}");
            }
        }
        assert_eq!(sum, s.covered());
        // gaps() over several windows against the oracle.
        for w in [0..210, 0..1, 5..150, 100..101, 199..210] {
            let from_set: Vec<u64> = s.gaps(w.clone()).flatten().collect();
            let from_oracle: Vec<u64> = w.clone().filter(|v| !oracle.contains(v)).collect();
            assert_eq!(from_set, from_oracle, "gaps({w:?})");
            let gs: Vec<_> = s.gaps(w.clone()).collect();
            for pair in gs.windows(2) {
                assert!(pair[0].end < pair[1].start, "gaps not maximal: {gs:?}");
            }
            assert!(gs.iter().all(|g| g.start < g.end));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn matches_btreeset_oracle(ops in proptest::collection::vec(op(), 1..60)) {
            let mut s = RangeSet::new();
            let mut oracle = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(a, b) => {
                        let expect = (a..b).filter(|v| oracle.insert(*v)).count() as u64;
                        prop_assert_eq!(s.insert(a..b), expect);
                    }
                    Op::InsertWith(a, b) => {
                        let newly: Vec<u64> = (a..b).filter(|v| !oracle.contains(v)).collect();
                        oracle.extend(a..b);
                        let mut pieces = Vec::new();
                        let added = s.insert_with(a..b, |r| pieces.push(r));
                        prop_assert_eq!(added, newly.len() as u64);
                        for p in pieces.windows(2) {
                            prop_assert!(p[0].end < p[1].start, "pieces not maximal/ascending");
                        }
                        prop_assert!(pieces.iter().all(|p| p.start < p.end));
                        let flat: Vec<u64> = pieces.into_iter().flatten().collect();
                        prop_assert_eq!(flat, newly);
                    }
                    Op::Remove(a, b) => {
                        let expect = (a..b).filter(|v| oracle.remove(v)).count() as u64;
                        prop_assert_eq!(s.remove(a..b), expect);
                    }
                    Op::PopMin => {
                        let expect = oracle.iter().next().copied();
                        if let Some(v) = expect {
                            oracle.remove(&v);
                        }
                        prop_assert_eq!(s.pop_min(), expect);
                    }
                }
                check_against(&s, &oracle);
            }
        }
    }
}
