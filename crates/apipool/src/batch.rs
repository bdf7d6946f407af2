//! `batch_exec` / `abatch_exec` and `call_concurrent` / `acall_concurrent`.
//!
//! Both run one operation over many inputs at bounded concurrency through the pool, which paces
//! them to its capacity. The bookkeeping (dedupe, results, progress, banned keys) is one
//! [`Collector`]; sync and async differ only in their workers (threads vs. futures).

use crate::error::{CallError, Error};
use crate::key::ApiKey;
use crate::manager::{ApiKeyManager, CallOpts, KeyClient, RetryPolicy};
use crate::outcome::{Classifier, DefaultClassifier};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How far a batch has got, passed to the progress callback after every item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchProgress {
    /// Items to run (after removing duplicates).
    pub total: usize,
    /// Items finished.
    pub done: usize,
    /// Items that succeeded.
    pub succeeded: usize,
    /// Items that failed.
    pub failed: usize,
    /// Time since the batch started.
    pub elapsed: Duration,
}

type ProgressFn = dyn Fn(&BatchProgress) + Send + Sync;

/// Options for a batch. Unset fields come from the pool's [`crate::PoolConfig`]
/// (`concurrency`, `batch_retry_on_failure`, `batch_max_retries`).
#[derive(Clone, Default)]
pub struct BatchOptions {
    concurrency: Option<usize>,
    retry: Option<RetryPolicy>,
    max_wait: Option<Duration>,
    progress: Option<Arc<ProgressFn>>,
    label: Option<Arc<str>>,
}

impl std::fmt::Debug for BatchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchOptions")
            .field("concurrency", &self.concurrency)
            .field("retry", &self.retry)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl BatchOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Items in flight at once (must be ≥ 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Retry failures on another key up to `max_retries` times (rate limits are always retried).
    pub fn retry(mut self, retry_on_failure: bool, max_retries: u32) -> Self {
        self.retry = Some(RetryPolicy {
            retry_on_failure,
            max_retries,
            ..RetryPolicy::default()
        });
        self
    }

    /// How long one item may wait for a free key (default: the pool's `max_wait`, which defaults
    /// to its `timeout`). Pacing waits are short; an item whose next key is further away than this
    /// (every key banned, a daily quota spent) fails with `PoolExhausted { retry_at }` instead.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = Some(d);
        self
    }

    /// Called after every finished item.
    pub fn on_progress(mut self, f: impl Fn(&BatchProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Labels the batch's calls in statistics.
    pub fn label(mut self, label: impl Into<Arc<str>>) -> Self {
        self.label = Some(label.into());
        self
    }
}

/// What a batch did.
#[derive(Debug)]
pub struct BatchResult<Id, T, E> {
    /// Distinct items run.
    pub total: usize,
    /// Items that succeeded.
    pub succeeded: usize,
    /// Items that failed (after retries).
    pub failed: usize,
    /// Each successful item's value.
    pub results: HashMap<Id, T>,
    /// Each failed item's error.
    pub errors: HashMap<Id, CallError<E>>,
    /// Item ids that appeared more than once in the input (each ran once).
    pub duplicates: Vec<Id>,
    /// Keys banned or archived when the batch ended.
    pub banned_keys: Vec<String>,
    /// Wall time of the batch.
    pub elapsed: Duration,
}

impl<Id, T, E> BatchResult<Id, T, E> {
    /// Fraction of items that succeeded (1.0 for an empty batch).
    pub fn success_rate(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.succeeded as f64 / self.total as f64
        }
    }
}

/// Successes and failures by item id.
type Outcomes<Id, T, E> = (HashMap<Id, T>, HashMap<Id, CallError<E>>);

/// A batch's shared bookkeeping.
struct Collector<Id, T, E> {
    started: Instant,
    total: usize,
    /// Each item's outcome. Ids are distinct (batches are deduplicated, `call_concurrent` uses
    /// input indices), so the two maps' sizes are the items succeeded and failed so far.
    results: Mutex<Outcomes<Id, T, E>>,
    progress: Option<Arc<ProgressFn>>,
}

impl<Id: Eq + Hash + Clone, T, E> Collector<Id, T, E> {
    /// Removes duplicate ids, keeping each id's first input.
    fn dedupe<I>(items: impl IntoIterator<Item = (Id, I)>) -> (Vec<(Id, I)>, Vec<Id>) {
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        let mut dups = Vec::new();
        for (id, input) in items {
            if seen.insert(id.clone()) {
                unique.push((id, input));
            } else {
                dups.push(id);
            }
        }
        (unique, dups)
    }

    fn new(total: usize, progress: Option<Arc<ProgressFn>>) -> Self {
        Self {
            started: Instant::now(),
            total,
            results: Mutex::new((HashMap::with_capacity(total), HashMap::new())),
            progress,
        }
    }

    fn record(&self, id: Id, result: Result<T, CallError<E>>) {
        // Both counts are read under the lock that records the outcome, so every report is one
        // consistent moment (two separate counters let a report see another worker's success
        // before its own `done`, and `failed = done - succeeded` underflowed).
        let (succeeded, failed) = {
            let mut r = self.results.lock();
            match result {
                Ok(v) => {
                    r.0.insert(id, v);
                }
                Err(e) => {
                    r.1.insert(id, e);
                }
            }
            (r.0.len(), r.1.len())
        };
        if let Some(p) = &self.progress {
            p(&BatchProgress {
                total: self.total,
                done: succeeded + failed,
                succeeded,
                failed,
                elapsed: self.started.elapsed(),
            });
        }
    }

    fn finish<K: ApiKey>(
        self,
        pool: &ApiKeyManager<K>,
        duplicates: Vec<Id>,
    ) -> BatchResult<Id, T, E> {
        let (results, errors) = self.results.into_inner();
        let banned_keys = pool
            .key_reports()
            .into_iter()
            .filter(|r| matches!(r.state.name(), "banned" | "archived"))
            .map(|r| r.identifier.to_string())
            .collect();
        BatchResult {
            total: self.total,
            succeeded: results.len(),
            failed: errors.len(),
            results,
            errors,
            duplicates,
            banned_keys,
            elapsed: self.started.elapsed(),
        }
    }
}

impl<K: ApiKey> ApiKeyManager<K> {
    fn batch_opts(&self, opts: &BatchOptions, batch: bool) -> Result<(CallOpts, usize), Error> {
        let settings = self.call_settings();
        let concurrency = match opts.concurrency {
            Some(0) => return Err(Error::ZeroConcurrency),
            Some(n) => n,
            None if settings.concurrency > 0 => settings.concurrency as usize,
            None => self.pool_size().max(1),
        };
        let retry = opts.retry.map_or(
            if batch {
                settings.batch_retry
            } else {
                settings.retry
            },
            |r| RetryPolicy {
                max_refusals: settings.retry.max_refusals,
                ..r
            },
        );
        let call = CallOpts {
            retry,
            max_wait: opts.max_wait.unwrap_or(settings.max_wait),
            timeout: settings.timeout,
            label: opts.label.clone(),
        };
        Ok((call, concurrency))
    }

    /// Runs every item through the pool on `concurrency` worker threads (the sync core of
    /// `batch_exec` and `call_concurrent`).
    fn run_threads<Id, I, T, E, C, F>(
        &self,
        items: &[(Id, I)],
        classifier: &C,
        call: &CallOpts,
        concurrency: usize,
        op: &F,
        collector: &Collector<Id, T, E>,
    ) where
        Id: Eq + Hash + Clone + Send + Sync,
        I: Sync,
        T: Send,
        E: Send,
        C: Classifier<T, E> + ?Sized,
        F: Fn(&K::Client, &I) -> Result<T, E> + Sync,
    {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..concurrency.min(items.len()) {
                s.spawn(|| {
                    while let Some((id, input)) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let r = self.call_with_opts(classifier, call, |client| op(client, input));
                        collector.record(id.clone(), r);
                    }
                });
            }
        });
    }

    /// Runs every item through the pool as `concurrency` futures at a time (the async core of
    /// `abatch_exec` and `acall_concurrent`).
    async fn run_futures<Id, I, T, E, C, F, Fut>(
        &self,
        items: impl IntoIterator<Item = (Id, I)>,
        classifier: &C,
        call: &CallOpts,
        concurrency: usize,
        op: &F,
        collector: &Collector<Id, T, E>,
    ) where
        Id: Eq + Hash + Clone,
        I: Clone,
        C: Classifier<T, E> + ?Sized,
        F: Fn(Arc<KeyClient<K>>, I) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        futures::stream::iter(items)
            .map(|(id, input)| async move {
                let r = self
                    .acall_with_opts(classifier, call, |client| op(client, input.clone()))
                    .await;
                collector.record(id, r);
            })
            .buffer_unordered(concurrency)
            .collect::<()>()
            .await;
    }

    /// Runs `op` once per distinct item id through the pool, `concurrency` at a time, paced to the
    /// pool's capacity, retrying on other keys per the batch retry policy. Duplicate ids are
    /// reported, not run twice. Sync: worker threads that wait with thread sleeps.
    pub fn batch_exec<Id, I, T, E, C, F>(
        &self,
        items: impl IntoIterator<Item = (Id, I)>,
        classifier: &C,
        op: F,
        opts: BatchOptions,
    ) -> Result<BatchResult<Id, T, E>, Error>
    where
        Id: Eq + Hash + Clone + Send + Sync,
        I: Sync,
        T: Send,
        E: Send,
        C: Classifier<T, E> + ?Sized,
        F: Fn(&K::Client, &I) -> Result<T, E> + Sync,
    {
        let (call, concurrency) = self.batch_opts(&opts, true)?;
        let (unique, duplicates) = Collector::<Id, T, E>::dedupe(items);
        let collector = Collector::new(unique.len(), opts.progress.clone());
        self.run_threads(&unique, classifier, &call, concurrency, &op, &collector);
        Ok(collector.finish(self, duplicates))
    }

    /// Async twin of [`Self::batch_exec`]: `op` gets the key's client handle and a clone of the input
    /// for each attempt; per-call timeouts are enforced.
    pub async fn abatch_exec<Id, I, T, E, C, F, Fut>(
        &self,
        items: impl IntoIterator<Item = (Id, I)>,
        classifier: &C,
        op: F,
        opts: BatchOptions,
    ) -> Result<BatchResult<Id, T, E>, Error>
    where
        Id: Eq + Hash + Clone,
        I: Clone,
        C: Classifier<T, E> + ?Sized,
        F: Fn(Arc<KeyClient<K>>, I) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (call, concurrency) = self.batch_opts(&opts, true)?;
        let (unique, duplicates) = Collector::<Id, T, E>::dedupe(items);
        let collector = Collector::new(unique.len(), opts.progress.clone());
        self.run_futures(unique, classifier, &call, concurrency, &op, &collector)
            .await;
        Ok(collector.finish(self, duplicates))
    }

    /// Runs `op` over `inputs`, `concurrency` at a time (default from the pool config), with the
    /// pool's call retry policy; results come back in input order, one per input.
    pub fn call_concurrent<I, T, E, F>(
        &self,
        inputs: &[I],
        op: F,
        opts: BatchOptions,
    ) -> Result<Vec<Result<T, CallError<E>>>, Error>
    where
        I: Sync,
        T: Send,
        E: Send,
        F: Fn(&K::Client, &I) -> Result<T, E> + Sync,
    {
        let (call, concurrency) = self.batch_opts(&opts, false)?;
        let collector = Collector::<usize, T, E>::new(inputs.len(), opts.progress.clone());
        let items: Vec<(usize, &I)> = inputs.iter().enumerate().collect();
        let op = |client: &K::Client, input: &&I| op(client, input);
        self.run_threads(
            &items,
            &DefaultClassifier,
            &call,
            concurrency,
            &op,
            &collector,
        );
        Ok(in_order(collector, inputs.len()))
    }

    /// Async twin of [`Self::call_concurrent`], with enforced per-call timeouts.
    pub async fn acall_concurrent<I, T, E, F, Fut>(
        &self,
        inputs: Vec<I>,
        op: F,
        opts: BatchOptions,
    ) -> Result<Vec<Result<T, CallError<E>>>, Error>
    where
        I: Clone,
        F: Fn(Arc<KeyClient<K>>, I) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (call, concurrency) = self.batch_opts(&opts, false)?;
        let n = inputs.len();
        let collector = Collector::<usize, T, E>::new(n, opts.progress.clone());
        let items = inputs.into_iter().enumerate();
        self.run_futures(
            items,
            &DefaultClassifier,
            &call,
            concurrency,
            &op,
            &collector,
        )
        .await;
        Ok(in_order(collector, n))
    }
}

fn in_order<T, E>(collector: Collector<usize, T, E>, n: usize) -> Vec<Result<T, CallError<E>>> {
    let (mut ok, mut err) = collector.results.into_inner();
    (0..n)
        .map(|i| match ok.remove(&i) {
            Some(v) => Ok(v),
            None => Err(err
                .remove(&i)
                .unwrap_or(CallError::Pool(Error::NoUsableKeys))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers finishing at once each report one consistent moment: `done` counts every success
    /// the report shows, and never more items than the batch has.
    #[test]
    fn concurrent_progress_reports_are_consistent() {
        const WORKERS: usize = 16;
        const PER_WORKER: usize = 20_000;
        let total = WORKERS * PER_WORKER;
        let reports = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&reports);
        let progress: Arc<ProgressFn> = Arc::new(move |p: &BatchProgress| {
            assert!(
                p.succeeded + p.failed == p.done && p.done <= p.total,
                "{p:?}"
            );
            seen.fetch_add(1, Ordering::Relaxed);
        });
        let collector = Collector::<usize, (), ()>::new(total, Some(progress));
        std::thread::scope(|s| {
            for w in 0..WORKERS {
                let collector = &collector;
                s.spawn(move || {
                    for id in w * PER_WORKER..(w + 1) * PER_WORKER {
                        collector.record(id, Ok(()));
                    }
                });
            }
        });
        assert_eq!(reports.load(Ordering::Relaxed), total);
        let (ok, err) = collector.results.into_inner();
        assert_eq!((ok.len(), err.len()), (total, 0));
    }
}
