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
}
