//! `apipool batch run`: a durable batch of HTTP calls through a pool, with progress, results
//! appended as they finish, resume after Ctrl-C or a crash, and graceful SIGINT/SIGTERM.

mod exec;
mod input;
mod ledger;
mod progress;

use crate::admin::{Common, with_api};
use crate::api::Api;
use crate::failure::{CliResult, Context, Failure, code};
use apipool::http::{AuthPlacement, HttpKey};
use apipool::{ApiKeyManager, PoolConfig};
use clap::{Args, Subcommand};
use exec::{Backend, Done};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use input::Item;
use ledger::{Ledger, Prior};
use progress::Progress;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// `apipool batch ...`.
#[derive(Debug, Args)]
pub(crate) struct BatchArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: BatchCommand,
}

#[derive(Debug, Subcommand)]
enum BatchCommand {
    /// Run one HTTP call per input line through a pool; rerun the same command to resume
    #[command(long_about = RUN_ABOUT, after_help = RUN_EXAMPLES)]
    Run(RunArgs),
}

const RUN_ABOUT: &str = "\
Run one HTTP call per input line through a pool and append one result line per finished item.

Input (JSON lines): {\"id\": \"btc\", \"method\": \"GET\", \"path\": \"/price\", \"query\": {\"id\": \"btc\"}, \"json\": null, \"headers\": {}}
`id` (string or number) is required and must be unique; `method` defaults to GET; `query` values
may be lists. A malformed line is reported with its line number and skipped; the rest run.

Output (JSON lines, appended as items finish):
{\"id\", \"ok\", \"status\", \"body\" (JSON or text) or \"error\", \"attempts\", \"latency_ms\"}

Calls go through the logged-in server's transparent proxy (/api/v1/proxy/POOL/http/PATH; the
server picks keys, paces and retries), or, with --keys-file and --base-url, through a local pool.

Resume: rerunning the same command skips every id that already has a result in the output, so a
successful item is never sent twice (--retry-failed sends failed ones again). The ids being sent
are journaled in OUTPUT.journal: after a hard kill (SIGKILL, power loss) the items that were in
flight have no result; the next run reports them and sends them again, so the upstream may see
those few twice. A torn last line left by a kill is detected and cut off.

SIGINT/SIGTERM: no new items are sent, the ones in flight get --grace seconds to finish and their
results are written; a second signal stops at once.

Exit codes: 0 every input item has a successful result; 1 error (unknown pool, bad file, ...);
3 some items failed or input lines were malformed; 4 not logged in / session refused;
130 interrupted (rerun to resume).";

const RUN_EXAMPLES: &str = "Examples:
  apipool batch run --pool prices --input items.jsonl --output results.jsonl
  apipool batch run --pool prices --input items.jsonl --output results.jsonl --concurrency 64
  apipool batch run --keys-file keys.txt --base-url https://api.example --auth header:x-api-key \\
      --rate-limit 20 --rate-interval 1 --input items.jsonl --output results.jsonl";

#[derive(Debug, Args)]
struct RunArgs {
    /// The server pool to call through (its upstream must be set)
    #[arg(long, required_unless_present = "keys_file")]
    pool: Option<String>,
    /// Input: one JSON request per line
    #[arg(long)]
    input: PathBuf,
    /// Output: one JSON result per line (appended; also the resume checkpoint)
    #[arg(long)]
    output: PathBuf,
    /// Items in flight at once [default: the pool's concurrency setting, else 4 per key]
    #[arg(long)]
    concurrency: Option<usize>,
    /// Extra attempts of an item on a transport error or a 429/502/503/504 (server mode), or on
    /// a failed call (local mode; rate limits are always retried on another key)
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Send items whose earlier result failed again
    #[arg(long)]
    retry_failed: bool,
    /// Seconds in-flight items may take to finish after SIGINT/SIGTERM
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    /// Seconds between progress lines when stderr is not a terminal
    #[arg(long, env = "APIPOOL_PROGRESS_INTERVAL", default_value_t = 5.0)]
    progress_interval: f64,
    /// Local mode: a file of raw keys, one per line (`#` comments); no server needed
    #[arg(long, requires = "base_url", conflicts_with = "pool")]
    keys_file: Option<PathBuf>,
    /// Local mode: the upstream's base URL
    #[arg(long, requires = "keys_file")]
    base_url: Option<String>,
    /// Local mode: where the key goes: bearer, header:NAME or query:NAME
    #[arg(long, default_value = "bearer", requires = "keys_file")]
    auth: String,
    /// Local mode: calls per key per --rate-interval (0 = learn from 429s)
    #[arg(long, default_value_t = 0, requires = "keys_file")]
    rate_limit: u32,
    /// Local mode: the rate-limit window in seconds
    #[arg(long, default_value_t = 60.0, requires = "keys_file")]
    rate_interval: f64,
    /// Local mode: per-call timeout in seconds
    #[arg(long, default_value_t = 30.0, requires = "keys_file")]
    timeout: f64,
}

pub(crate) async fn batch(a: BatchArgs) -> CliResult {
    let BatchCommand::Run(args) = a.command;
    let json_out = a.common.json;
    let plan = Plan::read(&args)?;
    if args.keys_file.is_some() {
        let (backend, keys) = local_backend(&args)?;
        return run(&args, plan, backend, keys, None, json_out, None).await;
    }
    let pool = args.pool.clone().unwrap_or_default();
    with_api(&a.common, async |api: &Api| {
        // An unknown pool fails here, before anything is sent.
        let p = api.get(&["pools", &pool], &[]).await?;
        if p["upstream"].is_null() {
            return Err(Failure::error(format!(
                "pool '{pool}' has no upstream: set one with `apipool pool create ... --upstream-url` or in the dashboard"
            )));
        }
        let keys = p["member_count"].as_u64().unwrap_or(1) as usize;
        let configured = p["pool_config"]["concurrency"].as_u64().unwrap_or(0) as usize;
        let backend = Backend::Proxy {
            proxy: apipool::sdk::RemoteProxy::new(api.session(), &pool),
            retries: args.retries,
        };
        run(&args, plan, backend, keys, Some(configured), json_out, Some(api)).await
    })
    .await
}

/// The input read and matched against an earlier run's output.
struct Plan {
    todo: Vec<Item>,
    malformed: usize,
    total_items: usize,
    skipped_done: usize,
    prior: Prior,
}

impl Plan {
    fn read(args: &RunArgs) -> CliResult<Self> {
        let text = std::fs::read_to_string(&args.input)
            .context(|| format!("cannot read {}", args.input.display()))?;
        let prior = Prior::load(&args.output)?;
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut todo = Vec::new();
        let (mut malformed, mut total_items, mut skipped_done) = (0, 0, 0);
        for (i, l) in text.lines().enumerate() {
            let n = i + 1;
            let item = match input::parse_line(l) {
                Ok(Some(item)) => item,
                Ok(None) => continue,
                Err(why) => {
                    malformed += 1;
                    eprintln!("input line {n}: {why} (skipped)");
                    continue;
                }
            };
            if let Some(first) = seen.insert(item.key.clone(), n) {
                malformed += 1;
                eprintln!(
                    "input line {n}: id {} repeats line {first} (skipped)",
                    item.key
                );
                seen.insert(item.key.clone(), first);
                continue;
            }
            total_items += 1;
            match prior.results.get(&item.key) {
                Some(true) => skipped_done += 1,
                Some(false) if !args.retry_failed => skipped_done += 1,
                _ => todo.push(item),
            }
        }
        if prior.torn {
            eprintln!("resume: cut off a torn last line (left by a killed run)");
        }
        if prior.bad_lines > 0 {
            eprintln!(
                "resume: {} unreadable lines in {} were ignored",
                prior.bad_lines,
                args.output.display()
            );
        }
        let in_flight = todo
            .iter()
            .filter(|i| prior.unknown.contains(&i.key))
            .count();
        if !prior.results.is_empty() || in_flight > 0 {
            eprintln!(
                "resume: {skipped_done} items already have a result and are skipped; {in_flight} were in flight when the last run stopped and are sent again"
            );
        }
        Ok(Self {
            todo,
            malformed,
            total_items,
            skipped_done,
            prior,
        })
    }
}

fn local_backend(args: &RunArgs) -> CliResult<(Backend, usize)> {
    let path = args
        .keys_file
        .as_ref()
        .ok_or_else(|| Failure::error("--keys-file is required"))?;
    let text =
        std::fs::read_to_string(path).context(|| format!("cannot read {}", path.display()))?;
    let placement = parse_auth(&args.auth)?;
    let keys: Vec<HttpKey> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|k| HttpKey::new(k, placement.clone()))
        .collect();
    if keys.is_empty() {
        return Err(Failure::error(format!("{} holds no keys", path.display())));
    }
    let n = keys.len();
    let config = PoolConfig {
        rate_limit: args.rate_limit,
        rate_limit_interval: args.rate_interval,
        timeout: args.timeout,
        retry_on_failure: args.retries > 0,
        max_retries: args.retries,
        ..PoolConfig::default()
    };
    let pool = ApiKeyManager::builder()
        .keys(keys)
        .config(config)
        .no_stats()
        .build()
        .map_err(|e| Failure::error(format!("cannot build the local pool: {e}")))?;
    let base_text = args.base_url.as_deref().unwrap_or_default();
    let base = reqwest::Url::parse(base_text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| Failure::error(format!("--base-url {base_text:?} is not an http(s) URL")))?;
    let http = reqwest::Client::builder()
        .build()
        .map_err(|e| Failure::error(format!("cannot build the HTTP client: {e}")))?;
    Ok((
        Backend::Local {
            pool: Arc::new(pool),
            http,
            base,
        },
        n,
    ))
}

fn parse_auth(s: &str) -> CliResult<AuthPlacement> {
    let bad = || {
        Failure::error(format!(
            "--auth {s:?}: use bearer, header:NAME or query:NAME"
        ))
    };
    match s.split_once(':') {
        None if s.eq_ignore_ascii_case("bearer") => Ok(AuthPlacement::Bearer),
        Some(("header", name)) if !name.is_empty() => {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map(AuthPlacement::Header)
                .map_err(|_| bad())
        }
        Some(("query", name)) if !name.is_empty() => Ok(AuthPlacement::Query(name.to_owned())),
        _ => Err(bad()),
    }
}

/// Why the dispatcher stopped early.
enum Stop {
    Signal(&'static str),
    Fatal(Failure),
}

async fn run(
    args: &RunArgs,
    plan: Plan,
    backend: Backend,
    keys: usize,
    configured: Option<usize>,
    json_out: bool,
    api: Option<&Api>,
) -> CliResult {
    let concurrency = args
        .concurrency
        .or(configured.filter(|c| *c > 0))
        .unwrap_or((keys * 4).clamp(4, 256))
        .max(1);
    let grace = Duration::try_from_secs_f64(args.grace).unwrap_or(Duration::from_secs(30));
    let every =
        Duration::try_from_secs_f64(args.progress_interval).unwrap_or(Duration::from_secs(5));
    let mut sigint =
        signal(SignalKind::interrupt()).context(|| "cannot watch SIGINT".to_owned())?;
    let mut sigterm =
        signal(SignalKind::terminate()).context(|| "cannot watch SIGTERM".to_owned())?;
    let mut ledger = Ledger::open(&args.output)?;
    let to_send = plan.todo.len();
    let mut progress = Progress::new(to_send as u64, every);
    let mut queue = plan.todo.into_iter();
    let mut inflight = FuturesUnordered::new();
    let mut stop: Option<(Stop, tokio::time::Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (mut ok, mut failed, mut abandoned) = (0usize, 0usize, 0usize);
    loop {
        while stop.is_none() && inflight.len() < concurrency {
            let Some(item) = queue.next() else { break };
            ledger.started(&item.key)?;
            let backend = backend.clone();
            inflight.push(async move {
                let done = backend.run(&item).await;
                (item, done)
            });
        }
        if inflight.is_empty() {
            break;
        }
        let deadline = stop.as_ref().map(|(_, d)| *d);
        tokio::select! {
            Some((_item, done)) = inflight.next() => match done {
                Done::Line { result, ok: good } => {
                    ledger.finished(&result)?;
                    progress.finished(good);
                    if good { ok += 1 } else { failed += 1 }
                }
                Done::Fatal(f) => {
                    if !matches!(stop, Some((Stop::Fatal(_), _))) {
                        eprintln!("stopping: {f}");
                        stop = Some((Stop::Fatal(f), tokio::time::Instant::now() + grace));
                    }
                }
            },
            _ = sigint.recv() => {
                if stop.is_some() { abandoned = inflight.len(); break; }
                eprintln!("SIGINT: sending no new items; waiting up to {:.0}s for {} in flight (press Ctrl-C again to stop now)", grace.as_secs_f64(), inflight.len());
                stop = Some((Stop::Signal("SIGINT"), tokio::time::Instant::now() + grace));
            }
            _ = sigterm.recv() => {
                if stop.is_some() { abandoned = inflight.len(); break; }
                eprintln!("SIGTERM: sending no new items; waiting up to {:.0}s for {} in flight", grace.as_secs_f64(), inflight.len());
                stop = Some((Stop::Signal("SIGTERM"), tokio::time::Instant::now() + grace));
            }
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                abandoned = inflight.len();
                break;
            }
            _ = tick.tick() => {
                progress.tick();
                // The proxy session renews its token during a long batch: save it at once, so
                // even a hard kill leaves the current refresh token on disk.
                if let Some(api) = api {
                    api.persist()?;
                }
            }
        }
    }
    drop(inflight);
    progress.finish();
    let not_sent = queue.len();
    let elapsed = progress.elapsed();
    let sent = ok + failed;
    let rate = if elapsed.as_secs_f64() > 0.0 {
        sent as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    // Failed earlier (and skipped now) still count as failed items of the input.
    let prior_failed = plan.prior.results.values().filter(|v| !**v).count();
    let still_failed = if args.retry_failed {
        failed
    } else {
        failed + prior_failed
    };
    let complete = stop.is_none() && not_sent == 0 && abandoned == 0;
    if complete {
        ledger.close_complete()?;
    }
    let summary = json!({
        "items": plan.total_items,
        "sent": sent,
        "ok": ok,
        "failed": failed,
        "skipped_done": plan.skipped_done,
        "malformed_lines": plan.malformed,
        "not_sent": not_sent,
        "abandoned": abandoned,
        "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "rate_per_s": (rate * 10.0).round() / 10.0,
        "concurrency": concurrency,
        "output": args.output.display().to_string(),
    });
    eprintln!(
        "batch: {sent} sent ({ok} ok, {failed} failed), {} skipped (already done), {} malformed lines, {not_sent} not sent; {:.1}s, {rate:.1}/s; results in {}",
        plan.skipped_done,
        plan.malformed,
        elapsed.as_secs_f64(),
        args.output.display()
    );
    if json_out {
        println!("{summary}");
    }
    match stop {
        Some((Stop::Fatal(f), _)) => Err(f),
        Some((Stop::Signal(sig), _)) => Err(Failure::new(
            code::INTERRUPTED,
            format!(
                "interrupted by {sig}: {sent} results written, {} items not finished{}; rerun the same command to resume",
                not_sent + abandoned,
                if abandoned > 0 {
                    format!(
                        " ({abandoned} abandoned in flight after the grace period; they will be sent again)"
                    )
                } else {
                    String::new()
                }
            ),
        )),
        None if still_failed > 0 || plan.malformed > 0 => Err(Failure::new(
            code::BATCH_INCOMPLETE,
            format!(
                "{still_failed} items failed and {} input lines were malformed; failed items have \"ok\": false in {} (rerun with --retry-failed to send them again)",
                plan.malformed,
                args.output.display()
            ),
        )),
        None => Ok(()),
    }
}
