//! Key selection structures, one per strategy. Each holds the set of keys that *may* be free; the
//! engine validates a picked key and removes it lazily when it turns out to be blocked, so every
//! operation here is O(1) or O(log n) whatever the pool size, and none allocates once the pool has
//! reached its size.

use crate::config::Strategy;
use rand::Rng;
use rand::rngs::SmallRng;
use std::collections::VecDeque;

const ABSENT: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) enum Selector {
    Random {
        members: Vec<u32>,
        pos: Vec<u32>,
    },
    RoundRobin {
        queue: VecDeque<u32>,
        queued: Vec<bool>,
        present: Vec<bool>,
        len: usize,
    },
    /// Entries ordered by (in flight, last used, key), kept in one sorted deque per in-flight
    /// count (counts from [`TOP_LEVEL`] up share the last deque, still sorted by the whole entry).
    /// The next pick is the front of the lowest non-empty deque. A grant moves a key to the back
    /// of the next deque (its last use is the newest); a report moves it back to where its last
    /// use sorts, which is the back or near it when calls end in about the order they began. So
    /// the usual call touches only the ends of two deques and the key's own entry, whatever the
    /// pool size (a binary heap moved one entry through ~17 levels of a 100,000-key heap, a cache
    /// miss at each of the lower ones). A key that sorts into the middle costs a shift of the
    /// shorter side. No allocation once the deques have reached their sizes.
    LeastUsed {
        levels: Vec<VecDeque<u128>>,
        /// No deque below this index holds an entry.
        lo: usize,
        /// Each key's entry ([`NO_ENTRY`]: not present).
        entry: Vec<u128>,
        len: usize,
    },
    /// Rejection sampling over a uniform member list (exact: a member is kept with probability
    /// weight / `max_weight`, so one or two draws when weights are alike, whatever the pool size),
    /// falling back to a Fenwick tree of the weights after a few rejections (skewed weights).
    Weighted {
        tree: Vec<u64>,
        weights: Vec<u32>,
        total: u64,
        members: Vec<u32>,
        pos: Vec<u32>,
        /// The largest weight inserted since the selector was built (an upper bound).
        max_weight: u32,
        /// Every weight inserted since the selector was built was `max_weight`: a uniform draw
        /// is kept without reading its weight.
        uniform: bool,
    },
}

/// Rejections before a weighted pick walks the Fenwick tree instead.
const WEIGHTED_TRIES: usize = 4;

fn member_insert(members: &mut Vec<u32>, pos: &mut [u32], k: u32) {
    pos[k as usize] = u32::try_from(members.len()).unwrap_or(ABSENT);
    members.push(k);
}

fn member_remove(members: &mut Vec<u32>, pos: &mut [u32], k: u32) {
    let p = pos[k as usize] as usize;
    members.swap_remove(p);
    if let Some(&moved) = members.get(p) {
        pos[moved as usize] = u32::try_from(p).unwrap_or(ABSENT);
    }
    pos[k as usize] = ABSENT;
}

impl Selector {
    pub(crate) fn new(strategy: Strategy, capacity: usize) -> Self {
        let mut s = match strategy {
            Strategy::Random => Selector::Random {
                members: Vec::new(),
                pos: Vec::new(),
            },
            Strategy::RoundRobin => Selector::RoundRobin {
                queue: VecDeque::new(),
                queued: Vec::new(),
                present: Vec::new(),
                len: 0,
            },
            Strategy::LeastUsed => Selector::LeastUsed {
                levels: Vec::new(),
                lo: 0,
                entry: Vec::new(),
                len: 0,
            },
            Strategy::Weighted => Selector::Weighted {
                tree: Vec::new(),
                weights: Vec::new(),
                total: 0,
                members: Vec::new(),
                pos: Vec::new(),
                max_weight: 0,
                uniform: true,
            },
        };
        s.grow(capacity);
        s
    }

    /// Makes room for key indexes below `n`.
    pub(crate) fn grow(&mut self, n: usize) {
        match self {
            Selector::Random { pos, .. } => {
                if pos.len() < n {
                    pos.resize(n, ABSENT);
                }
            }
            Selector::LeastUsed { entry, .. } => {
                if entry.len() < n {
                    entry.resize(n, NO_ENTRY);
                }
            }
            Selector::RoundRobin {
                queued, present, ..
            } => {
                if present.len() < n {
                    queued.resize(n, false);
                    present.resize(n, false);
                }
            }
            Selector::Weighted {
                tree, weights, pos, ..
            } => {
                if pos.len() < n {
                    pos.resize(n, ABSENT);
                }
                if weights.len() < n {
                    let cap = n.next_power_of_two().max(8);
                    weights.resize(cap, 0);
                    // Rebuild the Fenwick tree for the new size (rare: only when keys are added).
                    *tree = vec![0; cap + 1];
                    for (i, &w) in weights.iter().enumerate() {
                        fenwick_add(tree, i, i64::from(w));
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        match self {
            Selector::Random { members, .. } | Selector::Weighted { members, .. } => members.len(),
            Selector::RoundRobin { len, .. } | Selector::LeastUsed { len, .. } => *len,
        }
    }

    pub(crate) fn contains(&self, k: u32) -> bool {
        let i = k as usize;
        match self {
            Selector::Random { pos, .. } => pos.get(i).is_some_and(|&p| p != ABSENT),
            Selector::LeastUsed { entry, .. } => entry.get(i).is_some_and(|&e| e != NO_ENTRY),
            Selector::RoundRobin { present, .. } => present.get(i).copied().unwrap_or(false),
            Selector::Weighted { weights, .. } => weights.get(i).is_some_and(|&w| w > 0),
        }
    }

    /// Adds key `k` (no effect if present). `in_flight`/`last_used` order `least_used`; `weight`
    /// orders `weighted` (a zero weight counts as 1).
    pub(crate) fn insert(&mut self, k: u32, in_flight: u32, last_used: u64, weight: u32) {
        if self.contains(k) {
            return;
        }
        self.grow(k as usize + 1);
        let i = k as usize;
        match self {
            Selector::Random { members, pos } => member_insert(members, pos, k),
            Selector::RoundRobin {
                queue,
                queued,
                present,
                len,
            } => {
                present[i] = true;
                *len += 1;
                if !queued[i] {
                    queued[i] = true;
                    queue.push_back(k);
                }
            }
            Selector::LeastUsed {
                levels,
                lo,
                entry,
                len,
            } => {
                let e = heap_key(in_flight, last_used, k);
                entry[i] = e;
                *len += 1;
                level_insert(levels, lo, e);
            }
            Selector::Weighted {
                tree,
                weights,
                total,
                members,
                pos,
                max_weight,
                uniform,
            } => {
                let w = weight.max(1);
                weights[i] = w;
                *total += u64::from(w);
                *uniform &= *max_weight == 0 || *max_weight == w;
                *max_weight = (*max_weight).max(w);
                member_insert(members, pos, k);
                fenwick_add(tree, i, i64::from(w));
            }
        }
    }

    pub(crate) fn remove(&mut self, k: u32) {
        if !self.contains(k) {
            return;
        }
        let i = k as usize;
        match self {
            Selector::Random { members, pos } => member_remove(members, pos, k),
            Selector::RoundRobin { present, len, .. } => {
                // Stays in the queue; dropped lazily when it reaches the front.
                present[i] = false;
                *len -= 1;
            }
            Selector::LeastUsed {
                levels, entry, len, ..
            } => {
                let e = std::mem::replace(&mut entry[i], NO_ENTRY);
                *len -= 1;
                level_remove(levels, e);
            }
            Selector::Weighted {
                tree,
                weights,
                total,
                members,
                pos,
                ..
            } => {
                let w = weights[i];
                weights[i] = 0;
                *total -= u64::from(w);
                member_remove(members, pos, k);
                fenwick_add(tree, i, -i64::from(w));
            }
        }
    }

    /// Picks a candidate without removing it (round robin rotates it to the back). Inlined: it
    /// has two callers (a call and the draws ahead), and a call through it costs ~30 instructions
    /// on every acquire.
    #[inline(always)]
    pub(crate) fn pick(&mut self, rng: &mut SmallRng) -> Option<u32> {
        match self {
            Selector::Random { members, pos } => {
                if members.is_empty() {
                    None
                } else {
                    Some(uniform_member(members, pos, rng))
                }
            }
            Selector::RoundRobin {
                queue,
                queued,
                present,
                len,
            } => {
                if *len == 0 {
                    return None;
                }
                while let Some(k) = queue.pop_front() {
                    if present[k as usize] {
                        queue.push_back(k);
                        return Some(k);
                    }
                    queued[k as usize] = false;
                }
                None
            }
            Selector::LeastUsed {
                levels, lo, len, ..
            } => {
                if *len == 0 {
                    return None;
                }
                while levels.get(*lo).is_some_and(VecDeque::is_empty) {
                    *lo += 1;
                }
                levels
                    .get(*lo)
                    .and_then(VecDeque::front)
                    .map(|&e| heap_slot(e) as u32)
            }
            Selector::Weighted {
                tree,
                weights,
                total,
                members,
                pos,
                max_weight,
                uniform,
            } => {
                if *total == 0 {
                    return None;
                }
                if *uniform {
                    // Equal weights: a uniform draw, as `random`.
                    return Some(uniform_member(members, pos, rng));
                }
                let max = *max_weight;
                for _ in 0..WEIGHTED_TRIES {
                    let k = uniform_member(members, pos, rng);
                    let w = weights[k as usize];
                    if w == max || below(rng, u64::from(max)) < u64::from(w) {
                        return Some(k);
                    }
                }
                let target = below(rng, *total);
                Some(fenwick_find(tree, target))
            }
        }
    }

    /// The next picks as far as the strategy knows them without drawing, into `out` (the rest
    /// left as it is): round robin's queue (a key named there may have left the selector: it is
    /// dropped lazily) and least used's smallest entries ([`Self::least_first`]); nothing
    /// for random and weighted. A hint for reading ahead.
    pub(crate) fn next_known(&self, out: &mut [u32]) {
        match self {
            Selector::RoundRobin { queue, .. } => {
                for (o, &k) in out.iter_mut().zip(queue.iter()) {
                    *o = k;
                }
            }
            Selector::LeastUsed { .. } => {
                self.least_first(out);
            }
            Selector::Random { .. } | Selector::Weighted { .. } => {}
        }
    }

    /// Least used: the keys of the `out.len()` smallest entries, smallest first (the next picks
    /// while nothing changes), without changing anything; returns how many were written (0 for
    /// the other strategies). A hint for reading ahead.
    pub(crate) fn least_first(&self, out: &mut [u32]) -> usize {
        let Selector::LeastUsed { levels, lo, .. } = self else {
            return 0;
        };
        let entries = levels.iter().skip(*lo).flatten();
        let mut n = 0;
        for (o, &e) in out.iter_mut().zip(entries) {
            *o = heap_slot(e) as u32;
            n += 1;
        }
        n
    }

    /// Updates a present key's `least_used` ordering.
    pub(crate) fn touch(&mut self, k: u32, in_flight: u32, last_used: u64) {
        if let Selector::LeastUsed {
            levels, lo, entry, ..
        } = self
            && let Some(e) = entry.get_mut(k as usize).filter(|e| **e != NO_ENTRY)
        {
            let new = heap_key(in_flight, last_used, k);
            let old = std::mem::replace(e, new);
            if old != new {
                level_remove(levels, old);
                level_insert(levels, lo, new);
            }
        }
    }
}

/// A uniform draw among `members` (not empty). When every key index is a member (no key left
/// out: the usual case) the draw is the key itself, and the member table is not read (in a large
/// pool, one cache miss fewer).
fn uniform_member(members: &[u32], pos: &[u32], rng: &mut SmallRng) -> u32 {
    let r = below(rng, members.len() as u64);
    if members.len() == pos.len() {
        r as u32
    } else {
        members[r as usize]
    }
}

/// A uniform draw in `0..n` (`n > 0`): Lemire's multiply-shift, one 64-bit draw and no division.
/// Its bias, at most n / 2^64, is far below anything a pool can observe.
fn below(rng: &mut SmallRng, n: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}

/// A `least_used` entry: ordered by fewest in flight, then least recently used, then index.
fn heap_key(in_flight: u32, last_used: u64, k: u32) -> u128 {
    (u128::from(in_flight) << 96) | (u128::from(last_used) << 32) | u128::from(k)
}

fn heap_slot(e: u128) -> usize {
    (e & u128::from(u32::MAX)) as usize
}

/// A key not in the least-used deques.
const NO_ENTRY: u128 = u128::MAX;

/// In-flight counts from this one up share the last deque.
const TOP_LEVEL: usize = 64;

/// The deque of an entry (by its in-flight count).
fn level_of(e: u128) -> usize {
    ((e >> 96) as usize).min(TOP_LEVEL)
}

/// Puts `e` in its deque at its sorted place: the back (the usual case), the front, or found by
/// binary search (the shorter side shifts).
fn level_insert(levels: &mut Vec<VecDeque<u128>>, lo: &mut usize, e: u128) {
    let l = level_of(e);
    if levels.len() <= l {
        levels.resize_with(l + 1, VecDeque::new);
    }
    let q = &mut levels[l];
    match (q.front(), q.back()) {
        (_, None) => q.push_back(e),
        (_, Some(&b)) if b < e => q.push_back(e),
        (Some(&f), _) if e < f => q.push_front(e),
        _ => {
            let at = q.partition_point(|&x| x < e);
            q.insert(at, e);
        }
    }
    *lo = (*lo).min(l);
}

/// Takes `e` out of its deque (it must be there).
fn level_remove(levels: &mut [VecDeque<u128>], e: u128) {
    let Some(q) = levels.get_mut(level_of(e)) else {
        debug_assert!(false, "a least-used entry without its deque");
        return;
    };
    if q.front() == Some(&e) {
        q.pop_front();
    } else if q.back() == Some(&e) {
        q.pop_back();
    } else if let Ok(at) = q.binary_search(&e) {
        q.remove(at);
    } else {
        debug_assert!(false, "a least-used entry missing from its deque");
    }
}

fn fenwick_add(tree: &mut [u64], i: usize, delta: i64) {
    let mut j = i + 1;
    while j < tree.len() {
        tree[j] = tree[j].wrapping_add_signed(delta);
        j += j & j.wrapping_neg();
    }
}

/// The index whose cumulative weight range holds `target` (0 ≤ target < total).
fn fenwick_find(tree: &[u64], mut target: u64) -> u32 {
    let n = tree.len() - 1;
    let mut pos = 0usize;
    let mut step = n.next_power_of_two();
    while step > 0 {
        let next = pos + step;
        if next <= n && tree[next] <= target {
            pos = next;
            target -= tree[next];
        }
        step >>= 1;
    }
    u32::try_from(pos).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn all(strategy: Strategy) -> Selector {
        let mut s = Selector::new(strategy, 0);
        for k in 0..5 {
            s.insert(k, 0, 0, k + 1);
        }
        s
    }

    #[test]
    fn insert_remove_contains_for_every_strategy() {
        let mut rng = SmallRng::seed_from_u64(1);
        for strategy in [
            Strategy::Random,
            Strategy::RoundRobin,
            Strategy::LeastUsed,
            Strategy::Weighted,
        ] {
            let mut s = all(strategy);
            assert_eq!(s.len(), 5);
            s.remove(2);
            s.remove(2);
            assert!(!s.contains(2));
            assert_eq!(s.len(), 4);
            for _ in 0..200 {
                let k = s.pick(&mut rng).unwrap();
                assert_ne!(k, 2, "{strategy:?} picked a removed key");
            }
            s.insert(2, 0, 0, 3);
            s.insert(2, 0, 0, 3);
            assert_eq!(s.len(), 5);
            for k in 0..5 {
                s.remove(k);
            }
            assert_eq!(s.pick(&mut rng), None);
        }
    }

    #[test]
    fn round_robin_cycles_in_order() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut s = all(Strategy::RoundRobin);
        let picks: Vec<u32> = (0..10).map(|_| s.pick(&mut rng).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn weighted_follows_weights() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut s = all(Strategy::Weighted); // weights 1..=5, total 15
        let mut counts = [0u32; 5];
        for _ in 0..150_000 {
            counts[s.pick(&mut rng).unwrap() as usize] += 1;
        }
        for (k, &c) in counts.iter().enumerate() {
            let expected = 150_000.0 * (k as f64 + 1.0) / 15.0;
            assert!(
                (f64::from(c) - expected).abs() < expected * 0.05,
                "key {k}: {c} vs {expected}"
            );
        }
    }

    #[test]
    fn weighted_stays_exact_with_skewed_weights_and_after_the_heaviest_leaves() {
        let mut rng = SmallRng::seed_from_u64(11);
        // 1 : 99 — most uniform draws of the light key are rejected; the tree fallback and the
        // rejection path together still give exactly 1 %.
        let mut s = Selector::new(Strategy::Weighted, 3);
        s.insert(0, 0, 0, 1);
        s.insert(1, 0, 0, 99);
        let light = (0..200_000).filter(|_| s.pick(&mut rng) == Some(0)).count();
        assert!(
            (1_700..2_300).contains(&light),
            "{light} of 200,000, expected 2,000"
        );
        // The heavy key leaves: its weight stays the rejection bound, so picks mostly fall back
        // to the tree; the remaining weights 1 : 3 still hold.
        s.insert(2, 0, 0, 3);
        s.remove(1);
        let mut counts = [0u32; 3];
        for _ in 0..80_000 {
            counts[s.pick(&mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(counts[1], 0, "a removed key is never picked");
        assert!((19_000..21_000).contains(&counts[0]), "{counts:?}");
        assert!((59_000..61_000).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn least_first_lists_the_smallest_entries_in_order() {
        let mut rng = SmallRng::seed_from_u64(5);
        for n in [0u32, 1, 2, 5, 17, 300] {
            let mut s = Selector::new(Strategy::LeastUsed, 0);
            let mut entries = Vec::new();
            for k in 0..n {
                let (in_flight, last_used) =
                    (rng.random_range(0..3u32), rng.random_range(0..1_000u64));
                s.insert(k, in_flight, last_used, 1);
                entries.push(heap_key(in_flight, last_used, k));
            }
            entries.sort_unstable();
            let expected: Vec<u32> = entries
                .iter()
                .take(16)
                .map(|&e| heap_slot(e) as u32)
                .collect();
            let mut out = [u32::MAX; 16];
            let got = s.least_first(&mut out);
            assert_eq!(&out[..got], &expected[..], "{n} keys");
            assert_eq!(
                s.pick(&mut rng),
                expected.first().copied(),
                "the first is the next pick"
            );
        }
        let mut out = [0u32; 4];
        assert_eq!(all(Strategy::Random).least_first(&mut out), 0);
    }

    #[test]
    fn least_used_prefers_fewest_in_flight_then_oldest() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut s = Selector::new(Strategy::LeastUsed, 3);
        s.insert(0, 2, 1, 1);
        s.insert(1, 1, 5, 1);
        s.insert(2, 1, 3, 1);
        assert_eq!(s.pick(&mut rng), Some(2));
        s.touch(2, 2, 9);
        assert_eq!(s.pick(&mut rng), Some(1));
    }

    #[test]
    fn least_used_matches_an_ordered_set() {
        use std::collections::BTreeSet;
        let mut rng = SmallRng::seed_from_u64(5);
        let mut s = Selector::new(Strategy::LeastUsed, 0);
        let mut model: BTreeSet<(u32, u64, u32)> = BTreeSet::new();
        let mut entry: Vec<Option<(u32, u64)>> = vec![None; 64];
        for step in 0..20_000u64 {
            let k = rng.random_range(0..64u32);
            // Now and then a count at or past the shared top deque (TOP_LEVEL).
            let f = if rng.random_range(0..10) == 0 {
                rng.random_range(60..70u32)
            } else {
                rng.random_range(0..4u32)
            };
            let l = rng.random_range(0..50u64);
            match rng.random_range(0..3) {
                0 => {
                    s.insert(k, f, l, 1);
                    if entry[k as usize].is_none() {
                        entry[k as usize] = Some((f, l));
                        model.insert((f, l, k));
                    }
                }
                1 => {
                    s.remove(k);
                    if let Some((f0, l0)) = entry[k as usize].take() {
                        model.remove(&(f0, l0, k));
                    }
                }
                _ => {
                    s.touch(k, f, l);
                    if let Some(e) = entry[k as usize].as_mut() {
                        model.remove(&(e.0, e.1, k));
                        *e = (f, l);
                        model.insert((f, l, k));
                    }
                }
            }
            assert_eq!(s.len(), model.len(), "step {step}");
            assert_eq!(
                s.pick(&mut rng),
                model.first().map(|&(_, _, k)| k),
                "step {step}"
            );
            for k in 0..64 {
                assert_eq!(s.contains(k), entry[k as usize].is_some());
            }
        }
    }
}
