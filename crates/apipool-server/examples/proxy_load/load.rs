//! A closed-loop HTTP load generator: `clients` tasks, each sending one request after another
//! for `duration` over its own keep-alive connection, counting every answer by status.
//!
//! Shared by the `proxy_load` example (the documented 60 s / 10 min runs) and the CI load test
//! (`tests/api/load.rs`), so both count the same way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What to send.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    /// Full URL of every request (GET).
    pub(crate) url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub(crate) token: String,
    /// Concurrent clients (one connection each).
    pub(crate) clients: usize,
    /// How long to send.
    pub(crate) duration: Duration,
    /// Per-request timeout (a request past it counts in `timeouts`).
    pub(crate) timeout: Duration,
}

/// What came back.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LoadReport {
    /// Concurrent clients.
    pub(crate) clients: usize,
    /// Wall time of the run, seconds.
    pub(crate) elapsed_s: f64,
    /// Requests answered or failed.
    pub(crate) requests: u64,
    /// Requests per second.
    pub(crate) rps: f64,
    /// Answers by HTTP status.
    pub(crate) by_status: BTreeMap<u16, u64>,
    /// Requests with no answer (connect or read error).
    pub(crate) transport_errors: u64,
    /// Requests past the per-request timeout.
    pub(crate) timeouts: u64,
    /// Latency percentiles of answered requests, milliseconds.
    pub(crate) p50_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// Slowest answer.
    pub(crate) max_ms: f64,
    /// The first few transport errors, in words.
    pub(crate) sample_errors: Vec<String>,
}

impl LoadReport {
    /// Answers other than 2xx, plus requests with no answer: with enough quota upstream, every one
    /// of these is an error of the server under test.
    pub(crate) fn errors(&self) -> u64 {
        let non_2xx: u64 = self
            .by_status
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        non_2xx + self.transport_errors + self.timeouts
    }
}

struct ClientResult {
    by_status: BTreeMap<u16, u64>,
    transport_errors: u64,
    timeouts: u64,
    latencies_us: Vec<u32>,
    sample_errors: Vec<String>,
}

/// Runs the load; `progress` is bumped once per finished request (for live sampling).
pub(crate) async fn run(spec: &LoadSpec, progress: Arc<AtomicU64>) -> anyhow::Result<LoadReport> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(spec.clients)
        .tcp_nodelay(true)
        .timeout(spec.timeout)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(spec.clients);
    for _ in 0..spec.clients {
        let (client, url, token) = (client.clone(), spec.url.clone(), spec.token.clone());
        let (stop, progress) = (stop.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult {
                by_status: BTreeMap::new(),
                transport_errors: 0,
                timeouts: 0,
                latencies_us: Vec::new(),
                sample_errors: Vec::new(),
            };
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let answer = match client.get(&url).bearer_auth(&token).send().await {
                    // Read the whole body: a request counts once its answer is complete.
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        resp.bytes().await.map(|_| status)
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(status) => {
                        *r.by_status.entry(status).or_default() += 1;
                        let us = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                        r.latencies_us.push(us);
                    }
                    Err(e) if e.is_timeout() => r.timeouts += 1,
                    Err(e) => {
                        r.transport_errors += 1;
                        if r.sample_errors.len() < 3 {
                            r.sample_errors.push(format!("{e:?}"));
                        }
                    }
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            r
        }));
    }
    tokio::time::sleep(spec.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut report = LoadReport {
        clients: spec.clients,
        ..LoadReport::default()
    };
    let mut latencies = Vec::new();
    for task in tasks {
        let r = task.await?;
        for (s, n) in r.by_status {
            *report.by_status.entry(s).or_default() += n;
        }
        report.transport_errors += r.transport_errors;
        report.timeouts += r.timeouts;
        latencies.extend(r.latencies_us);
        for e in r.sample_errors {
            if report.sample_errors.len() < 5 {
                report.sample_errors.push(e);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    report.elapsed_s = elapsed;
    report.requests =
        report.by_status.values().sum::<u64>() + report.transport_errors + report.timeouts;
    report.rps = report.requests as f64 / elapsed;
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        f64::from(latencies[i]) / 1000.0
    };
    report.p50_ms = pct(0.50);
    report.p99_ms = pct(0.99);
    report.max_ms = pct(1.0);
    Ok(report)
}
