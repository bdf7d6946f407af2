//! Query filters, result types, and the SQL behind every query (one implementation, used by both
//! the sync and the async methods).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

use super::db::{Arg, Col, Dialect, Sql, Val};
use super::error::StatsError;
use super::writer::{Shared, duration_micros, micros};
use crate::status::CallStatus;

/// Most buckets a timeline may have (a year of hours is 8,760).
const MAX_BUCKETS: i64 = 100_000;

/// Which events a query looks at. Every field narrows the set; the default is every event.
///
/// A [`Duration`] converts into a filter over the last `duration` (`window`), so
/// `collector.timeline(Duration::from_secs(3600), Bucket::Minute)` works, as does
/// `collector.timeline(StatsFilter::last(Duration::from_secs(3600)).pool("p"), Bucket::Minute)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsFilter {
    /// Only events that finished within this long before the collector's clock's "now".
    pub window: Option<Duration>,
    /// Only events that finished at or after this time.
    pub since: Option<SystemTime>,
    /// Only events that finished at or before this time.
    pub until: Option<SystemTime>,
    /// Only this key (its safe identifier).
    pub key: Option<String>,
    /// Only this status.
    pub status: Option<CallStatus>,
    /// Only this pool; `Some("")` means events recorded without a pool.
    pub pool: Option<String>,
    /// Only this method/label.
    pub method: Option<String>,
}

impl StatsFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Events of the last `window`.
    pub fn last(window: Duration) -> Self {
        Self {
            window: Some(window),
            ..Self::default()
        }
    }

    /// Events of the last `n` seconds (the seed's "recent n seconds").
    pub fn recent_seconds(n: u64) -> Self {
        Self::last(Duration::from_secs(n))
    }

    /// Narrows to one key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Narrows to one status.
    pub fn status(mut self, status: CallStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Narrows to one pool.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Narrows to one method/label.
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Only events at or after `t`.
    pub fn since(mut self, t: SystemTime) -> Self {
        self.since = Some(t);
        self
    }

    /// Only events at or before `t`.
    pub fn until(mut self, t: SystemTime) -> Self {
        self.until = Some(t);
        self
    }

    pub(crate) fn resolve(&self, now: SystemTime) -> Resolved {
        let from_window = self
            .window
            .map(|w| micros(now).saturating_sub(duration_micros(w)));
        let since = match (self.since.map(micros), from_window) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Resolved {
            since,
            until: self.until.map(micros),
            now: micros(now),
            key: self.key.clone(),
            status: self.status,
            pool: self.pool.clone(),
            method: self.method.clone(),
        }
    }
}

impl From<Duration> for StatsFilter {
    fn from(window: Duration) -> Self {
        Self::last(window)
    }
}

impl From<&StatsFilter> for StatsFilter {
    fn from(f: &StatsFilter) -> Self {
        f.clone()
    }
}

/// A filter with times turned into microseconds.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    since: Option<i64>,
    until: Option<i64>,
    now: i64,
    key: Option<String>,
    status: Option<CallStatus>,
    pool: Option<String>,
    method: Option<String>,
}

impl Resolved {
    fn where_clause(&self, sql: &mut Sql) {
        sql.push(" WHERE 1 = 1");
        if let Some(s) = self.since {
            sql.push(" AND finished_at >= ").bind_i64(s);
        }
        if let Some(u) = self.until {
            sql.push(" AND finished_at <= ").bind_i64(u);
        }
        if let Some(k) = &self.key {
            sql.push(" AND key_identifier = ").bind_str(k);
        }
        if let Some(s) = self.status {
            sql.push(" AND status_id = ").bind(Arg::I32(s.id()));
        }
        if let Some(p) = &self.pool {
            sql.push(" AND pool = ").bind_str(p);
        }
        if let Some(m) = &self.method {
            sql.push(" AND method = ").bind_str(m);
        }
    }
}

/// Timeline bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    /// 60 seconds.
    Minute,
    /// 3,600 seconds.
    Hour,
    /// 86,400 seconds (UTC days).
    Day,
}

impl Bucket {
    /// The width in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Bucket::Minute => 60,
            Bucket::Hour => 3_600,
            Bucket::Day => 86_400,
        }
    }
}

impl FromStr for Bucket {
    type Err = StatsError;

    /// Parses `minute`, `hour` or `day` (the server's `interval` parameter).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "minute" | "min" | "m" => Ok(Bucket::Minute),
            "hour" | "h" => Ok(Bucket::Hour),
            "day" | "d" => Ok(Bucket::Day),
            other => Err(StatsError::InvalidQuery(format!(
                "unknown bucket `{other}`; use minute, hour or day"
            ))),
        }
    }
}

/// Event counts, in total and per status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    /// All events (including statuses this version does not know).
    pub total: u64,
    /// Events per status.
    pub by_status: BTreeMap<CallStatus, u64>,
}

impl StatusCounts {
    /// Events with `status`.
    pub fn get(&self, status: CallStatus) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Successful events.
    pub fn success(&self) -> u64 {
        self.get(CallStatus::Success)
    }

    /// Successes divided by all events; `None` when there were none.
    pub fn success_rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.success() as f64 / self.total as f64)
    }

    fn add(&mut self, status_id: i32, n: u64) {
        self.total += n;
        if let Some(s) = CallStatus::from_id(status_id) {
            *self.by_status.entry(s).or_default() += n;
        }
    }
}

/// One timeline bucket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TimelineBucket {
    /// Start of the bucket (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Events that finished in `[start, start + bucket)`.
    pub counts: StatusCounts,
}

/// Success rates for the whole selection and per key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SuccessRates {
    /// Every selected event (the pool as a whole).
    pub overall: StatusCounts,
    /// Per key identifier.
    pub per_key: BTreeMap<String, StatusCounts>,
}

/// Latency percentiles (nearest-rank) of a set of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LatencyStats {
    /// Events measured.
    pub count: u64,
    /// Median.
    #[serde(rename = "p50_us", serialize_with = "ser_micros")]
    pub p50: Duration,
    /// 95th percentile.
    #[serde(rename = "p95_us", serialize_with = "ser_micros")]
    pub p95: Duration,
    /// 99th percentile.
    #[serde(rename = "p99_us", serialize_with = "ser_micros")]
    pub p99: Duration,
    /// Slowest.
    #[serde(rename = "max_us", serialize_with = "ser_micros")]
    pub max: Duration,
}

fn ser_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl LatencyStats {
    /// Percentiles of `sorted` latencies in microseconds (ascending). `None` when empty.
    fn from_sorted_micros(sorted: &[i64]) -> Option<Self> {
        let n = sorted.len();
        let last = *sorted.last()?;
        let rank = |p: u64| -> Duration {
            // Nearest rank: the smallest value with at least p% of the values at or below it.
            let r = (p as usize * n).div_ceil(100).clamp(1, n);
            Duration::from_micros(u64::try_from(sorted[r - 1]).unwrap_or(0))
        };
        Some(Self {
            count: n as u64,
            p50: rank(50),
            p95: rank(95),
            p99: rank(99),
            max: Duration::from_micros(u64::try_from(last).unwrap_or(0)),
        })
    }
}

/// Latency percentiles for the whole selection and per key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencyReport {
    /// Every selected event; `None` when there were none.
    pub overall: Option<LatencyStats>,
    /// Per key identifier.
    pub per_key: BTreeMap<String, LatencyStats>,
}

/// A page request for [`crate::stats::StatsCollector::events`]: `page` starts at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// 1-based page number.
    pub page: u32,
    /// Events per page (1 to 10,000).
    pub page_size: u32,
}

impl Page {
    /// Page `page` (1-based) of `page_size` events.
    pub fn new(page: u32, page_size: u32) -> Self {
        Self {
            page: page.max(1),
            page_size: page_size.clamp(1, 10_000),
        }
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::new(1, 50)
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRow {
    /// The event's own id (auto increment).
    pub id: i64,
    /// The key's safe identifier.
    pub key_identifier: String,
    /// The stored status id (1 success, 5 failed, 9 reach limit, ...).
    pub status_id: i32,
    /// The status, when the id is one this version knows.
    pub status: Option<CallStatus>,
    /// When the call finished (UTC, microsecond precision).
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Call latency (microsecond precision).
    #[serde(rename = "latency_us", serialize_with = "ser_micros")]
    pub latency: Duration,
    /// The call's method/label.
    pub method: Option<String>,
    /// The pool, if the event named one.
    pub pool: Option<String>,
    /// The client's dedup id, if any.
    pub dedup_id: Option<String>,
}

impl EventRow {
    /// `finished_at` as a [`SystemTime`].
    pub fn finished_at_system(&self) -> SystemTime {
        SystemTime::from(self.finished_at)
    }
}

/// One page of events, newest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventPage {
    /// The events on this page.
    pub items: Vec<EventRow>,
    /// Events matching the filter, on all pages.
    pub total: u64,
    /// This page's number (1-based).
    pub page: u32,
    /// Page size.
    pub page_size: u32,
}

/// UTC time for stored microseconds.
pub(crate) fn from_micros(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_u64(v: &Val) -> u64 {
    u64::try_from(v.i64()).unwrap_or(0)
}

fn select(d: Dialect, what: &str, f: &Resolved) -> Sql {
    let mut sql = Sql::new(d, "SELECT ");
    sql.push(what).push(" FROM apipool_stats_events");
    f.where_clause(&mut sql);
    sql
}

pub(crate) async fn count(shared: &Shared, f: &Resolved) -> Result<u64, StatsError> {
    let sql = select(shared.dialect, "COUNT(*)", f);
    let rows = shared.db.fetch(sql, &[Col::I64]).await?;
    Ok(rows.first().map_or(0, |r| to_u64(&r[0])))
}

pub(crate) async fn count_by_key(
    shared: &Shared,
    f: &Resolved,
) -> Result<BTreeMap<String, u64>, StatsError> {
    let mut sql = select(shared.dialect, "key_identifier, COUNT(*)", f);
    sql.push(" GROUP BY key_identifier");
    let rows = shared.db.fetch(sql, &[Col::Str, Col::I64]).await?;
    Ok(rows
        .into_iter()
        .map(|mut r| {
            let n = to_u64(&r[1]);
            (r.swap_remove(0).into_string(), n)
        })
        .collect())
}

pub(crate) async fn success_rates(
    shared: &Shared,
    f: &Resolved,
) -> Result<SuccessRates, StatsError> {
    let mut sql = select(shared.dialect, "key_identifier, status_id, COUNT(*)", f);
    sql.push(" GROUP BY key_identifier, status_id");
    let rows = shared
        .db
        .fetch(sql, &[Col::Str, Col::I32, Col::I64])
        .await?;
    let mut out = SuccessRates::default();
    for mut r in rows {
        let (status, n) = (r[1].i32(), to_u64(&r[2]));
        out.overall.add(status, n);
        out.per_key
            .entry(r.swap_remove(0).into_string())
            .or_default()
            .add(status, n);
    }
    Ok(out)
}

pub(crate) async fn timeline(
    shared: &Shared,
    f: &Resolved,
    bucket: Bucket,
) -> Result<Vec<TimelineBucket>, StatsError> {
    let d = shared.dialect;
    let width = i64::try_from(bucket.seconds()).unwrap_or(60) * 1_000_000;
    let end = f.until.unwrap_or(f.now).min(f.now);
    let mut f = f.clone();
    f.until = Some(end);
    if let Some(since) = f.since
        && (end.div_euclid(width) - since.div_euclid(width)) >= MAX_BUCKETS
    {
        return Err(StatsError::InvalidQuery(format!(
            "a {bucket:?} timeline of that window has more than {MAX_BUCKETS} buckets; use a larger bucket or a shorter window"
        )));
    }
    let bucket_expr = match d {
        Dialect::MySql => "CAST(finished_at DIV ? AS SIGNED)".to_owned(),
        Dialect::Sqlite => "(finished_at / ?)".to_owned(),
        Dialect::Postgres => "(finished_at / $1)".to_owned(),
    };
    // The bucket width is the first bound argument; the filter's follow.
    let mut sql = Sql::new(d, "SELECT ");
    sql.args.push(Arg::I64(width));
    sql.push(&bucket_expr)
        .push(", status_id, COUNT(*) FROM apipool_stats_events");
    f.where_clause(&mut sql);
    sql.push(" GROUP BY 1, 2");
    let rows = shared
        .db
        .fetch(sql, &[Col::I64, Col::I32, Col::I64])
        .await?;
    let mut by_bucket: BTreeMap<i64, StatusCounts> = BTreeMap::new();
    for r in &rows {
        by_bucket
            .entry(r[0].i64())
            .or_default()
            .add(r[1].i32(), to_u64(&r[2]));
    }
    let first = match f.since {
        Some(s) => s.div_euclid(width),
        None => match by_bucket.keys().next() {
            Some(k) => *k,
            None => return Ok(Vec::new()),
        },
    };
    let last = end.div_euclid(width).max(first);
    Ok((first..=last)
        .map(|b| TimelineBucket {
            start: from_micros(b * width),
            counts: by_bucket.remove(&b).unwrap_or_default(),
        })
        .collect())
}

pub(crate) async fn latency(shared: &Shared, f: &Resolved) -> Result<LatencyReport, StatsError> {
    let sql = select(shared.dialect, "key_identifier, latency_us", f);
    let rows = shared.db.fetch(sql, &[Col::Str, Col::I64]).await?;
    let mut all: Vec<i64> = Vec::with_capacity(rows.len());
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for mut r in rows {
        let us = r[1].i64();
        all.push(us);
        per_key
            .entry(r.swap_remove(0).into_string())
            .or_default()
            .push(us);
    }
    all.sort_unstable();
    Ok(LatencyReport {
        overall: LatencyStats::from_sorted_micros(&all),
        per_key: per_key
            .into_iter()
            .filter_map(|(k, mut v)| {
                v.sort_unstable();
                LatencyStats::from_sorted_micros(&v).map(|s| (k, s))
            })
            .collect(),
    })
}

pub(crate) async fn events(
    shared: &Shared,
    f: &Resolved,
    page: Page,
) -> Result<EventPage, StatsError> {
    let page = Page::new(page.page, page.page_size);
    let total = count(shared, f).await?;
    let mut sql = select(
        shared.dialect,
        "id, key_identifier, status_id, finished_at, latency_us, method, pool, dedup_id",
        f,
    );
    sql.push(" ORDER BY finished_at DESC, id DESC LIMIT ")
        .bind_i64(i64::from(page.page_size))
        .push(" OFFSET ")
        .bind_i64(i64::from(page.page - 1) * i64::from(page.page_size));
    let cols = [
        Col::I64,
        Col::Str,
        Col::I32,
        Col::I64,
        Col::I64,
        Col::OptStr,
        Col::Str,
        Col::OptStr,
    ];
    let rows = shared.db.fetch(sql, &cols).await?;
    let items = rows
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let mut next = || it.next().unwrap_or(Val::OptStr(None));
            let id = next().i64();
            let key_identifier = next().into_string();
            let status_id = next().i32();
            let finished_at = from_micros(next().i64());
            let latency = Duration::from_micros(u64::try_from(next().i64()).unwrap_or(0));
            let method = next().into_opt_string();
            let pool = next().into_opt_string().filter(|p| !p.is_empty());
            let dedup_id = next().into_opt_string();
            EventRow {
                id,
                key_identifier,
                status_id,
                status: CallStatus::from_id(status_id),
                finished_at,
                latency,
                method,
                pool,
                dedup_id,
            }
        })
        .collect();
    Ok(EventPage {
        items,
        total,
        page: page.page,
        page_size: page.page_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        let s = LatencyStats::from_sorted_micros(&v).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_micros(50));
        assert_eq!(s.p95, Duration::from_micros(95));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        let one = LatencyStats::from_sorted_micros(&[7]).unwrap();
        assert_eq!(
            (one.p50, one.p99),
            (Duration::from_micros(7), Duration::from_micros(7))
        );
        assert!(LatencyStats::from_sorted_micros(&[]).is_none());
    }

    #[test]
    fn window_and_since_take_the_later_bound() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let f = StatsFilter::last(Duration::from_secs(100))
            .since(SystemTime::UNIX_EPOCH + Duration::from_secs(950))
            .resolve(now);
        assert_eq!(f.since, Some(950_000_000));
        let f = StatsFilter::last(Duration::from_secs(10))
            .since(SystemTime::UNIX_EPOCH)
            .resolve(now);
        assert_eq!(f.since, Some(990_000_000));
    }

    #[test]
    fn buckets_parse() {
        assert_eq!("minute".parse::<Bucket>().unwrap(), Bucket::Minute);
        assert_eq!("HOUR".parse::<Bucket>().unwrap(), Bucket::Hour);
        assert_eq!("day".parse::<Bucket>().unwrap(), Bucket::Day);
        assert!("week".parse::<Bucket>().is_err());
    }
}
