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
    /// An indexed binary min-heap ordered by (in flight, last used, key): a grant or a report moves
    /// one entry a few levels, with no allocation (a `BTreeSet` removed and re-inserted, twice per
    /// call).
    LeastUsed {
        heap: Vec<u128>,
        pos: Vec<u32>,
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
                heap: Vec::new(),
                pos: Vec::new(),
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
            Selector::Random { pos, .. } | Selector::LeastUsed { pos, .. } => {
                if pos.len() < n {
                    pos.resize(n, ABSENT);
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
            Selector::RoundRobin { len, .. } => *len,
            Selector::LeastUsed { heap, .. } => heap.len(),
        }
    }

    pub(crate) fn contains(&self, k: u32) -> bool {
        let i = k as usize;
        match self {
            Selector::Random { pos, .. } | Selector::LeastUsed { pos, .. } => {
                pos.get(i).is_some_and(|&p| p != ABSENT)
            }
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
            Selector::LeastUsed { heap, pos } => {
                let at = heap.len();
                heap.push(heap_key(in_flight, last_used, k));
                pos[i] = u32::try_from(at).unwrap_or(ABSENT);
                sift_up(heap, pos, at);
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
            Selector::LeastUsed { heap, pos } => {
                let at = pos[i] as usize;
                pos[i] = ABSENT;
                let last = heap.len() - 1;
                heap.swap(at, last);
                heap.pop();
                if at < last {
                    pos[heap_slot(heap[at])] = u32::try_from(at).unwrap_or(ABSENT);
                    let at = sift_up(heap, pos, at);
                    sift_down(heap, pos, at);
                }
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
            Selector::LeastUsed { heap, .. } => heap.first().map(|&e| heap_slot(e) as u32),
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
    /// dropped lazily) and least used's smallest heap entries ([`Self::least_first`]); nothing
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

    /// Least used: the keys of the `out.len()` smallest heap entries, smallest first (the next
    /// picks while nothing changes), found best-first from the root without changing the heap;
    /// returns how many were written (0 for the other strategies). A hint for reading ahead.
    pub(crate) fn least_first(&self, out: &mut [u32]) -> usize {
        let Selector::LeastUsed { heap, .. } = self else {
            return 0;
        };
        // The frontier: heap positions whose parents were taken (at most one more per entry
        // taken). Linear scans: it holds at most `out.len() + 1` positions.
        let mut frontier = [0usize; 2 * crate::engine::BATCH + 2];
        let mut len = usize::from(!heap.is_empty());
        let mut n = 0;
        while n < out.len() && len > 0 {
            let mut best = 0;
            for i in 1..len {
                if heap[frontier[i]] < heap[frontier[best]] {
                    best = i;
                }
            }
            let at = frontier[best];
            out[n] = heap_slot(heap[at]) as u32;
            n += 1;
            len -= 1;
            frontier[best] = frontier[len];
            for child in [2 * at + 1, 2 * at + 2] {
                if child < heap.len() && len < frontier.len() {
                    frontier[len] = child;
                    len += 1;
                }
            }
        }
        n
    }

    /// Updates a present key's `least_used` ordering.
    pub(crate) fn touch(&mut self, k: u32, in_flight: u32, last_used: u64) {
        if let Selector::LeastUsed { heap, pos } = self
            && let Some(&at) = pos.get(k as usize).filter(|&&p| p != ABSENT)
        {
            let at = at as usize;
            let new = heap_key(in_flight, last_used, k);
            let old = std::mem::replace(&mut heap[at], new);
            if new < old {
                sift_up(heap, pos, at);
            } else {
                sift_down(heap, pos, at);
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

/// A `least_used` heap entry: ordered by fewest in flight, then least recently used, then index.
fn heap_key(in_flight: u32, last_used: u64, k: u32) -> u128 {
    (u128::from(in_flight) << 96) | (u128::from(last_used) << 32) | u128::from(k)
}

fn heap_slot(e: u128) -> usize {
    (e & u128::from(u32::MAX)) as usize
}

/// Moves `heap[at]` up to its place; returns where it ended.
fn sift_up(heap: &mut [u128], pos: &mut [u32], mut at: usize) -> usize {
    let e = heap[at];
    while at > 0 {
        let parent = (at - 1) / 2;
        if heap[parent] <= e {
            break;
        }
        heap[at] = heap[parent];
        pos[heap_slot(heap[at])] = at as u32;
        at = parent;
    }
    heap[at] = e;
    pos[heap_slot(e)] = at as u32;
    at
}

/// Moves `heap[at]` down to its place.
fn sift_down(heap: &mut [u128], pos: &mut [u32], mut at: usize) {
    let e = heap[at];
    let n = heap.len();
    loop {
        let left = 2 * at + 1;
        if left >= n {
            break;
        }
        let right = left + 1;
        let child = if right < n && heap[right] < heap[left] {
            right
        } else {
            left
        };
        if heap[child] >= e {
            break;
        }
        heap[at] = heap[child];
        pos[heap_slot(heap[at])] = at as u32;
        at = child;
    }
    heap[at] = e;
    pos[heap_slot(e)] = at as u32;
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
    fn least_first_lists_the_smallest_heap_entries_in_order() {
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
    fn least_used_heap_matches_an_ordered_set() {
        use std::collections::BTreeSet;
        let mut rng = SmallRng::seed_from_u64(5);
        let mut s = Selector::new(Strategy::LeastUsed, 0);
        let mut model: BTreeSet<(u32, u64, u32)> = BTreeSet::new();
        let mut entry: Vec<Option<(u32, u64)>> = vec![None; 64];
        for step in 0..20_000u64 {
            let k = rng.random_range(0..64u32);
            let (f, l) = (rng.random_range(0..4u32), rng.random_range(0..50u64));
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
