//! Pure per-key limit logic: an exact sliding-window log and a fixed-period quota.
//!
//! Nothing here reads the clock or sleeps: every method takes `now`, so the logic is tested with
//! made-up instants. The server keeps one [`SlidingWindowLog`] and one [`QuotaCounter`] per key
//! behind a `parking_lot::Mutex` and passes `Instant::now()`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the sliding window decided for one arriving request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The request was admitted and recorded in the window.
    Admitted {
        /// Admissions still possible in the window right now (`u32::MAX` when unlimited).
        remaining: u32,
        /// Time until the oldest admitted request leaves the window, i.e. until `remaining`
        /// grows again (zero when unlimited).
        reset_after: Duration,
    },
    /// The window is full: the request was **not** recorded.
    Limited {
        /// Exact time until enough admitted requests have left the window for one more to be
        /// admitted.
        retry_after: Duration,
    },
}

/// An exact sliding-window log: at most `rate` admitted requests in any `interval`-long window.
///
/// Each admitted request's arrival instant is kept; an entry leaves the window once
/// `entry + interval <= now`. A request is admitted when fewer than `rate` entries remain.
/// Rejected requests are not recorded, so hammering a full window does not extend it.
/// `rate == 0` means unlimited (nothing is recorded).
///
/// Changing `rate` or `interval` between calls is allowed (the server does it at run time): the
/// log is simply judged against the new values.
///
/// ```
/// use std::time::{Duration, Instant};
/// use mock_upstream::window::{Admission, SlidingWindowLog};
///
/// let t0 = Instant::now();
/// let second = Duration::from_secs(1);
/// let mut log = SlidingWindowLog::default();
/// assert!(matches!(log.try_admit(t0, 1, second), Admission::Admitted { remaining: 0, .. }));
/// let later = t0 + Duration::from_millis(300);
/// assert_eq!(
///     log.try_admit(later, 1, second),
///     Admission::Limited { retry_after: Duration::from_millis(700) }
/// );
/// ```
#[derive(Debug, Default, Clone)]
pub struct SlidingWindowLog {
    log: VecDeque<Instant>,
}

impl SlidingWindowLog {
    /// Decides whether a request arriving at `now` is admitted, and records it if so.
    pub fn try_admit(&mut self, now: Instant, rate: u32, interval: Duration) -> Admission {
        if rate == 0 {
            self.log.clear();
            return Admission::Admitted {
                remaining: u32::MAX,
                reset_after: Duration::ZERO,
            };
        }
        self.prune(now, interval);
        let rate = rate as usize;
        if self.log.len() >= rate {
            // The entry at `len - rate` is the one whose departure brings the count below `rate`.
            let blocking = self.log[self.log.len() - rate];
            return Admission::Limited {
                retry_after: (blocking + interval).saturating_duration_since(now),
            };
        }
        self.log.push_back(now);
        Admission::Admitted {
            remaining: u32::try_from(rate - self.log.len()).unwrap_or(u32::MAX),
            reset_after: self.reset_after(now, interval),
        }
    }

    /// Remaining admissions and time until the oldest entry leaves, without recording anything.
    pub fn peek(&mut self, now: Instant, rate: u32, interval: Duration) -> (u32, Duration) {
        if rate == 0 {
            return (u32::MAX, Duration::ZERO);
        }
        self.prune(now, interval);
        let remaining = (rate as usize).saturating_sub(self.log.len());
        (
            u32::try_from(remaining).unwrap_or(u32::MAX),
            self.reset_after(now, interval),
        )
    }

    /// Number of admitted requests currently recorded (entries not yet pruned may be included).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// Whether no admitted request is recorded.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    /// Forgets every admitted request.
    pub fn clear(&mut self) {
        self.log.clear();
    }

    fn prune(&mut self, now: Instant, interval: Duration) {
        while self.log.front().is_some_and(|&t| t + interval <= now) {
            self.log.pop_front();
        }
    }

    fn reset_after(&self, now: Instant, interval: Duration) -> Duration {
        self.log.front().map_or(Duration::ZERO, |&oldest| {
            (oldest + interval).saturating_duration_since(now)
        })
    }
}

/// A per-key quota over fixed periods (e.g. "1,000 calls a day").
///
/// The first use starts a period; the count resets when `period` has passed since that start.
#[derive(Debug, Default, Clone)]
pub struct QuotaCounter {
    period_start: Option<Instant>,
    used: u64,
}

impl QuotaCounter {
    /// Checks the quota at `now`. `Ok(())` means a call may be made (call [`QuotaCounter::consume`]
    /// once it is admitted); `Err(wait)` is the time until the period resets.
    pub fn check(&mut self, now: Instant, quota: u64, period: Duration) -> Result<(), Duration> {
        let start = match self.period_start {
            Some(start) if start + period > now => start,
            _ => {
                self.period_start = Some(now);
                self.used = 0;
                now
            }
        };
        if self.used >= quota {
            return Err((start + period).saturating_duration_since(now));
        }
        Ok(())
    }

    /// Counts one admitted call.
    pub fn consume(&mut self) {
        self.used += 1;
    }

    /// Calls counted in the current period.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Starts afresh.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn admitted(a: Admission) -> bool {
        matches!(a, Admission::Admitted { .. })
    }

    #[test]
    fn admits_rate_then_limits_with_exact_retry_after() {
        let t0 = Instant::now();
        let mut log = SlidingWindowLog::default();
        for i in 0..5u32 {
            let a = log.try_admit(t0 + ms(u64::from(i) * 10), 5, SEC);
            assert_eq!(
                a,
                Admission::Admitted {
                    remaining: 4 - i,
                    reset_after: SEC - ms(u64::from(i) * 10),
                }
            );
        }
        // At t0+100ms the oldest (t0) leaves at t0+1s: 900 ms to wait.
        assert_eq!(
            log.try_admit(t0 + ms(100), 5, SEC),
            Admission::Limited {
                retry_after: ms(900)
            }
        );
        // Rejections are not recorded.
        assert_eq!(log.len(), 5);
        // Exactly when the oldest leaves, one slot opens; the next one 10 ms later.
        assert!(admitted(log.try_admit(t0 + SEC, 5, SEC)));
        assert_eq!(
            log.try_admit(t0 + SEC, 5, SEC),
            Admission::Limited {
                retry_after: ms(10)
            }
        );
        assert!(admitted(log.try_admit(t0 + SEC + ms(10), 5, SEC)));
    }

    #[test]
    fn one_nanosecond_before_the_edge_is_still_limited() {
        let t0 = Instant::now();
        let mut log = SlidingWindowLog::default();
        assert!(admitted(log.try_admit(t0, 1, SEC)));
        let almost = t0 + SEC - Duration::from_nanos(1);
        assert_eq!(
            log.try_admit(almost, 1, SEC),
            Admission::Limited {
                retry_after: Duration::from_nanos(1)
            }
        );
        assert!(admitted(log.try_admit(t0 + SEC, 1, SEC)));
    }

    #[test]
    fn rate_zero_is_unlimited_and_records_nothing() {
        let t0 = Instant::now();
        let mut log = SlidingWindowLog::default();
        for _ in 0..10_000 {
            assert_eq!(
                log.try_admit(t0, 0, SEC),
                Admission::Admitted {
                    remaining: u32::MAX,
                    reset_after: Duration::ZERO
                }
            );
        }
        assert!(log.is_empty());
    }

    #[test]
    fn shrinking_the_rate_waits_for_enough_departures() {
        let t0 = Instant::now();
        let mut log = SlidingWindowLog::default();
        for i in 0..4 {
            assert!(admitted(log.try_admit(t0 + ms(i * 100), 4, SEC)));
        }
        // Rate drops to 2 at t0+500ms: entries at 0,100,200,300 ms; three must leave for one
        // more to fit, the third of them (200 ms) leaves at 1.2 s.
        assert_eq!(
            log.try_admit(t0 + ms(500), 2, SEC),
            Admission::Limited {
                retry_after: ms(700)
            }
        );
        assert!(!admitted(log.try_admit(t0 + ms(1199), 2, SEC)));
        assert!(admitted(log.try_admit(t0 + ms(1200), 2, SEC)));
    }

    #[test]
    fn peek_does_not_record() {
        let t0 = Instant::now();
        let mut log = SlidingWindowLog::default();
        assert_eq!(log.peek(t0, 3, SEC), (3, Duration::ZERO));
        assert!(admitted(log.try_admit(t0, 3, SEC)));
        assert_eq!(log.peek(t0 + ms(250), 3, SEC), (2, ms(750)));
        assert_eq!(log.len(), 1);
        assert_eq!(log.peek(t0 + SEC, 3, SEC), (3, Duration::ZERO));
    }

    #[test]
    fn quota_counts_admitted_calls_and_resets_each_period() {
        let t0 = Instant::now();
        let day = Duration::from_secs(86_400);
        let mut q = QuotaCounter::default();
        for _ in 0..3 {
            assert_eq!(q.check(t0, 3, day), Ok(()));
            q.consume();
        }
        assert_eq!(q.check(t0 + SEC, 3, day), Err(day - SEC));
        assert_eq!(q.used(), 3);
        assert_eq!(q.check(t0 + day, 3, day), Ok(()));
        assert_eq!(q.used(), 0);
    }

    proptest! {
        /// For random arrival patterns, rates and intervals: no interval-long window ever holds
        /// more than `rate` admissions, every rejection happens only when the trailing window is
        /// full, and the reported retry_after is exactly when the next request would pass.
        #[test]
        fn window_is_exact(
            rate in 1u32..8,
            interval_ms in 1u64..500,
            gaps in proptest::collection::vec(0u64..200, 1..200),
        ) {
            let t0 = Instant::now();
            let interval = ms(interval_ms);
            let mut log = SlidingWindowLog::default();
            let mut admitted_at: Vec<Instant> = Vec::new();
            let mut now = t0;
            for gap in gaps {
                now += ms(gap);
                let in_trailing = admitted_at.iter().filter(|&&t| t + interval > now).count();
                match log.try_admit(now, rate, interval) {
                    Admission::Admitted { remaining, .. } => {
                        prop_assert!(in_trailing < rate as usize);
                        admitted_at.push(now);
                        prop_assert_eq!(remaining as usize, rate as usize - in_trailing - 1);
                    }
                    Admission::Limited { retry_after } => {
                        prop_assert_eq!(in_trailing, rate as usize);
                        prop_assert!(retry_after > Duration::ZERO);
                        let mut probe = log.clone();
                        let just_before = now + retry_after - Duration::from_nanos(1);
                        prop_assert!(!admitted(probe.try_admit(just_before, rate, interval)));
                        prop_assert!(admitted(probe.try_admit(now + retry_after, rate, interval)));
                    }
                }
            }
            // Any window [s, s + interval) holds at most `rate`: check the windows starting at
            // each admission (the densest ones).
            for (i, &s) in admitted_at.iter().enumerate() {
                let n = admitted_at[i..].iter().take_while(|&&t| t < s + interval).count();
                prop_assert!(n <= rate as usize);
            }
        }
    }
}
