//! Wall-clock abstraction so that token expiry and login throttling can be tested without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> OffsetDateTime;

    /// The current time as unix milliseconds (the unit stored in the database).
    fn now_ms(&self) -> i64 {
        unix_ms(self.now())
    }
}

/// Converts a timestamp to unix milliseconds.
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Formats unix milliseconds as RFC 3339 (the format of every `*_at` field in responses).
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug)]
pub struct FakeClock {
    base: OffsetDateTime,
    offset_ms: AtomicI64,
}

impl FakeClock {
    /// A fake clock starting at the current real time.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: OffsetDateTime::now_utc(),
            offset_ms: AtomicI64::new(0),
        })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> OffsetDateTime {
        self.base + time::Duration::milliseconds(self.offset_ms.load(Ordering::SeqCst))
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_advances_only_when_told() {
        let c = FakeClock::new();
        let t0 = c.now_ms();
        assert_eq!(c.now_ms(), t0);
        c.advance(std::time::Duration::from_secs(90));
        assert_eq!(c.now_ms(), t0 + 90_000);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_ms(1_500), "1970-01-01T00:00:01.5Z");
    }
}
