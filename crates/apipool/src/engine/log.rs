//! A key's (or scope's) completion log: the times its last calls finished, oldest first.
//!
//! A ring buffer whose capacity is a power of two, grown by doubling up to the largest window the
//! key has to answer for (its biggest configured or learned limit), so a key with a limit of 20
//! keeps at most 32 times and a key with no limit keeps none. Appending in time order (the usual
//! case) is one store; a time older than the newest one (reports from threads that read the clock
//! in a different order) is inserted in its place.

/// Engine time (see `Tick` in the engine).
type Tick = u64;

#[derive(Debug, Default)]
pub(super) struct Log {
    /// Length 0 or a power of two.
    buf: Box<[Tick]>,
    head: u32,
    len: u32,
}

impl Log {
    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    /// The `i`-th oldest time kept (`i < len`).
    pub(super) fn get(&self, i: usize) -> Tick {
        debug_assert!(i < self.len());
        self.buf[(self.head as usize + i) & (self.buf.len() - 1)]
    }

    /// The time in the place the next in-order [`Self::push`] writes (0 when nothing is
    /// allocated). Read only to bring that place into the cache ahead of the push.
    pub(super) fn next_place(&self) -> Tick {
        match self.buf.len() {
            0 => 0,
            n => self.buf[(self.head as usize + self.len()) & (n - 1)],
        }
    }

    #[cfg(test)]
    pub(super) fn to_vec(&self) -> Vec<Tick> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn pop_front(&mut self) {
        self.head = ((self.head as usize + 1) & (self.buf.len() - 1)) as u32;
        self.len -= 1;
    }

    /// Records a completion at `t`, keeping the log sorted and at most `cap` long: the result is
    /// the newest `cap` times of the log and `t`. With `cap == 0` (nothing to enforce) the log is
    /// left as it is.
    pub(super) fn push(&mut self, t: Tick, cap: usize) {
        if cap == 0 {
            return;
        }
        let cap = cap.min(u32::MAX as usize >> 1);
        let (len, head, mask) = (
            self.len(),
            self.head as usize,
            self.buf.len().wrapping_sub(1),
        );
        if len > 0 && len <= cap && t >= self.buf[(head + len - 1) & mask] {
            // The usual case: `t` is the newest time.
            let tail = (head + len) & mask;
            if len == cap {
                // Full at its cap: the oldest goes (its place is the tail when the ring is full).
                self.buf[tail] = t;
                self.head = ((head + 1) & mask) as u32;
                return;
            }
            if len < self.buf.len() {
                self.buf[tail] = t;
                self.len += 1;
                return;
            }
        }
        while self.len() > cap {
            self.pop_front();
        }
        if self.len() == cap {
            if t < self.get(0) {
                // Older than every time kept: it would be the one trimmed.
                return;
            }
            self.pop_front();
        }
        if self.len() == self.buf.len() {
            self.grow(cap);
        }
        let mask = self.buf.len() - 1;
        let head = self.head as usize;
        // From the newest backwards, shift later times one place right until `t` fits.
        let mut i = self.len();
        while i > 0 {
            let prev = self.buf[(head + i - 1) & mask];
            if prev <= t {
                break;
            }
            self.buf[(head + i) & mask] = prev;
            i -= 1;
        }
        self.buf[(head + i) & mask] = t;
        self.len += 1;
    }

    /// Forgets every time kept (the buffer stays).
    pub(super) fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// Doubles the buffer (at least 4, at most `cap` rounded up to a power of two).
    fn grow(&mut self, cap: usize) {
        let new_cap = (self.buf.len() * 2).max(4).min(cap.next_power_of_two());
        let mut buf = vec![0; new_cap].into_boxed_slice();
        for (i, slot) in buf.iter_mut().enumerate().take(self.len()) {
            *slot = self.get(i);
        }
        self.buf = buf;
        self.head = 0;
    }
}

/// Buckets in a [`Tally`].
const BUCKETS: usize = 4;

/// A key's completions while its limit is being learned, in one cache line whatever their
/// number: up to [`BUCKETS`] buckets, each the count of completions in it and the latest of their
/// times. A key that learns no limit never needs the times themselves, and one that does needs the
/// times of its learning epoch's calls (how many the upstream took before refusing); a log of each
/// time would grow to hundreds per key in a large pool. A bucket's time stands for every call in
/// it, so each call counts as finishing no earlier than it did: the log [`Self::fill`] rebuilds
/// never lets a window undercount, at worst it paces the first window after learning a little
/// more slowly. Buckets are merged to keep their time spans even (the pair whose merged bucket
/// spans least goes first), so no bucket's time stands for calls much earlier than it.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
pub(super) struct Tally {
    /// What the tally counts from: its key's learning epoch (another start: a new epoch, and
    /// the buckets are stale).
    origin: Tick,
    last: [Tick; BUCKETS],
    count: [u32; BUCKETS],
    len: u32,
}

impl Tally {
    /// Counts a completion at `t` in the epoch that started at `origin`.
    pub(super) fn push(&mut self, t: Tick, origin: Tick) {
        if self.origin != origin {
            *self = Self {
                origin,
                ..Self::default()
            };
        }
        let n = self.len as usize;
        if n > 0 && t <= self.last[n - 1] {
            // Not after the newest bucket's time: that time covers it.
            self.count[n - 1] = self.count[n - 1].saturating_add(1);
            return;
        }
        if n < BUCKETS {
            self.last[n] = t;
            self.count[n] = 1;
            self.len += 1;
            return;
        }
        // Full: merge the adjacent pair whose merged bucket spans least, counting `t` as a
        // bucket of its own after the newest (merging that pair extends the newest to `t`).
        let start = |i: usize| if i == 0 { origin } else { self.last[i - 1] };
        let (mut best, mut best_span) = (BUCKETS - 1, t.saturating_sub(start(BUCKETS - 1)));
        for i in 0..BUCKETS - 1 {
            let span = self.last[i + 1].saturating_sub(start(i));
            if span < best_span {
                (best, best_span) = (i, span);
            }
        }
        if best == BUCKETS - 1 {
            self.last[best] = t;
            self.count[best] = self.count[best].saturating_add(1);
            return;
        }
        self.count[best + 1] = self.count[best + 1].saturating_add(self.count[best]);
        self.last.copy_within(best + 1.., best);
        self.count.copy_within(best + 1.., best);
        self.last[BUCKETS - 1] = t;
        self.count[BUCKETS - 1] = 1;
    }

    /// Rebuilds `log` as the newest `cap` completions of the epoch that started at `origin`
    /// (each at its bucket's time); nothing when the tally counted another epoch.
    pub(super) fn fill(&self, log: &mut Log, origin: Tick, cap: usize) {
        log.clear();
        if self.origin != origin || cap == 0 {
            return;
        }
        // From the newest bucket back, how many of each the newest `cap` take.
        let mut take = [0usize; BUCKETS];
        let mut left = cap;
        for i in (0..self.len as usize).rev() {
            take[i] = left.min(self.count[i] as usize);
            left -= take[i];
        }
        for (&t, &n) in self.last.iter().zip(&take) {
            for _ in 0..n {
                log.push(t, cap);
            }
        }
    }

    /// Its first line's first word: read only to bring the tally into the cache ahead.
    pub(super) fn peek(&self) -> Tick {
        self.origin
    }

    #[cfg(test)]
    pub(super) fn buckets(&self) -> Vec<(Tick, u32)> {
        (0..self.len as usize)
            .map(|i| (self.last[i], self.count[i]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};
    use std::collections::VecDeque;

    /// The engine's previous log (a sorted `VecDeque`), as the model the ring must match.
    fn model_push(log: &mut VecDeque<Tick>, t: Tick, cap: usize) {
        if cap == 0 {
            return;
        }
        let pos = log.iter().rposition(|&x| x <= t).map_or(0, |p| p + 1);
        log.insert(pos, t);
        while log.len() > cap {
            log.pop_front();
        }
    }

    #[test]
    fn appends_in_order_and_keeps_the_newest_cap() {
        let mut log = Log::default();
        for t in 1..=10 {
            log.push(t, 3);
        }
        assert_eq!(log.to_vec(), vec![8, 9, 10]);
        assert_eq!(log.capacity(), 4, "grown to the cap rounded up, no further");
    }

    #[test]
    fn cap_zero_leaves_the_log_alone() {
        let mut log = Log::default();
        log.push(5, 0);
        assert_eq!(log.len(), 0);
        assert_eq!(log.capacity(), 0, "no limit: nothing allocated");
        log.push(5, 2);
        log.push(6, 0);
        assert_eq!(log.to_vec(), vec![5]);
    }

    #[test]
    fn capacity_edges() {
        // cap 1: always the newest.
        let mut log = Log::default();
        log.push(3, 1);
        log.push(7, 1);
        assert_eq!(log.to_vec(), vec![7]);
        log.push(5, 1);
        assert_eq!(
            log.to_vec(),
            vec![7],
            "an older time than all kept is dropped"
        );
        // Exactly full, then one more wraps the ring.
        let mut log = Log::default();
        for t in [10, 20, 30, 40] {
            log.push(t, 4);
        }
        assert_eq!((log.len(), log.capacity()), (4, 4));
        log.push(50, 4);
        assert_eq!(log.to_vec(), vec![20, 30, 40, 50]);
        // Out of order into a wrapped ring.
        log.push(35, 4);
        assert_eq!(log.to_vec(), vec![30, 35, 40, 50]);
        log.push(29, 4);
        assert_eq!(log.to_vec(), vec![30, 35, 40, 50]);
        log.push(30, 4);
        assert_eq!(log.to_vec(), vec![30, 35, 40, 50]);
        // A smaller cap trims the oldest on the next push; a larger one grows again.
        log.push(60, 2);
        assert_eq!(log.to_vec(), vec![50, 60]);
        for t in 61..=70 {
            log.push(t, 16);
        }
        assert_eq!(log.len(), 12);
        assert_eq!(log.capacity(), 16);
        assert_eq!(log.get(0), 50);
        assert_eq!(log.get(11), 70);
    }

    #[test]
    fn matches_the_sorted_deque_model_on_random_pushes() {
        let mut rng = SmallRng::seed_from_u64(9);
        for round in 0..200 {
            let mut log = Log::default();
            let mut model = VecDeque::new();
            let mut now: Tick = 1_000;
            for _ in 0..300 {
                // Mostly forward in time, sometimes a little back (reports read the clock before
                // taking the lock); the cap changes now and then (a limit is learned or set).
                now += rng.random_range(0..20);
                let t = now.saturating_sub(
                    rng.random_range(0..30) * u64::from(rng.random_range(0..4) == 0),
                );
                let cap = match round % 4 {
                    0 => 1,
                    1 => 7,
                    2 => 32,
                    _ => rng.random_range(0..12),
                };
                log.push(t, cap);
                model_push(&mut model, t, cap);
                assert_eq!(log.to_vec(), Vec::from(model.clone()), "round {round}");
                assert!(
                    log.capacity() <= 32,
                    "never more than the largest cap needs"
                );
            }
        }
    }

    /// The newest `cap` of `times` (sorted), as the log would keep them.
    fn newest(times: &[Tick], cap: usize) -> Vec<Tick> {
        let mut v = times.to_vec();
        v.sort_unstable();
        v[v.len().saturating_sub(cap)..].to_vec()
    }

    fn filled(tally: &Tally, origin: Tick, cap: usize) -> Vec<Tick> {
        let mut log = Log::default();
        log.push(1, 8); // stale content: fill replaces it
        tally.fill(&mut log, origin, cap);
        log.to_vec()
    }

    #[test]
    fn tally_is_one_cache_line_and_exact_for_few_distinct_times() {
        assert_eq!(size_of::<Tally>(), 64);
        let mut tally = Tally::default();
        for t in [10, 10, 20, 30, 30, 30, 40] {
            tally.push(t, 5);
        }
        assert_eq!(tally.buckets(), vec![(10, 2), (20, 1), (30, 3), (40, 1)]);
        assert_eq!(filled(&tally, 5, 100), vec![10, 10, 20, 30, 30, 30, 40]);
        assert_eq!(filled(&tally, 5, 3), vec![30, 30, 40], "the newest `cap`");
        assert_eq!(filled(&tally, 5, 0), Vec::<Tick>::new());
        // Another epoch: the buckets are stale, for `fill` and for the next push.
        assert_eq!(filled(&tally, 6, 100), Vec::<Tick>::new());
        tally.push(50, 6);
        assert_eq!(tally.buckets(), vec![(50, 1)]);
    }

    #[test]
    fn tally_never_counts_a_call_as_finishing_earlier_than_it_did() {
        let mut rng = SmallRng::seed_from_u64(3);
        for round in 0..300 {
            let origin: Tick = 1_000;
            let mut tally = Tally::default();
            let mut times = Vec::new();
            let mut now = origin;
            let n = rng.random_range(1..400);
            for _ in 0..n {
                // Steady, bursty or quiet spells, now and then a little back in time.
                now += match round % 3 {
                    0 => 10,
                    1 => rng.random_range(0..3) * 50,
                    _ => rng.random_range(0..100),
                };
                let t = now.saturating_sub(
                    rng.random_range(0..30) * u64::from(rng.random_range(0..5) == 0),
                );
                tally.push(t, origin);
                times.push(t);
            }
            for cap in [1, 5, 20, n, n + 10] {
                let real = newest(&times, cap);
                let got = filled(&tally, origin, cap);
                assert_eq!(got.len(), real.len(), "round {round}, cap {cap}");
                for (g, r) in got.iter().zip(&real) {
                    assert!(g >= r, "round {round}, cap {cap}: {got:?} vs {real:?}");
                    assert!(*g <= now, "no later than the last completion");
                }
            }
        }
    }

    #[test]
    fn tally_buckets_keep_even_spans_on_a_steady_stream() {
        // 1,000 calls, one every 10 ticks: each bucket stands for about a quarter of the stream,
        // so no call is counted much later than it finished.
        let mut tally = Tally::default();
        let times: Vec<Tick> = (1..=1_000).map(|i| i * 10).collect();
        for &t in &times {
            tally.push(t, 0);
        }
        let got = filled(&tally, 0, 1_000);
        let worst = got.iter().zip(&times).map(|(g, r)| g - r).max().unwrap();
        assert!(
            worst <= 10_000 / 2,
            "worst lag {worst} of a 10,000-tick stream"
        );
        // Every bucket but the newest (just opened) stands for a good share of the stream.
        let counts: Vec<u32> = tally.buckets().iter().map(|b| b.1).collect();
        assert!(
            counts[..counts.len() - 1].iter().all(|&c| c >= 100),
            "no bucket starved: {counts:?}"
        );
    }
}
