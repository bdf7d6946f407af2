//! `apipool batch run` through the server's proxy and through a local pool.

use crate::helpers::{
    Cli, Mock, assert_success, price_items, results, seeded_pool, start_server, stderr,
};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf8 path")
}

#[test]
fn malformed_lines_are_reported_the_rest_run_and_a_rerun_sends_nothing() {
    let server = start_server(900);
    let mock = Mock::start(&["raw-key-aaaa-1", "raw-key-bbbb-2"], 50, 1.0);
    let cli = seeded_pool(
        &server,
        &mock,
        &["raw-key-aaaa-1", "raw-key-bbbb-2"],
        50,
        1.0,
    );
    let input = cli.path("items.jsonl");
    price_items(&input, 40);
    let mut text = std::fs::read_to_string(&input).expect("read");
    // line 41: not JSON; line 42: no path; line 43: a repeated id; line 44: a POST with a body
    text.push_str("{oops\n{\"id\": \"x\"}\n{\"id\": \"item-3\", \"path\": \"/price\"}\n");
    text.push_str("{\"id\": 99, \"method\": \"POST\", \"path\": \"/echo/submit\", \"json\": {\"a\": [1, 2]}, \"headers\": {\"x-trace\": \"t1\"}}\n");
    std::fs::write(&input, text).expect("write");
    let output = cli.path("results.jsonl");
    let args = [
        "batch",
        "run",
        "--pool",
        "prices",
        "--input",
        p(&input),
        "--output",
        p(&output),
        "--json",
    ];
    let out = cli.run(&args);
    assert_eq!(
        out.status.code(),
        Some(3),
        "malformed lines → exit 3: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains("input line 41: not valid JSON"), "{err}");
    assert!(err.contains("input line 42: \"path\""), "{err}");
    assert!(
        err.contains("input line 43: id item-3 repeats line 4"),
        "{err}"
    );
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    assert_eq!(summary["sent"], 41);
    assert_eq!(summary["ok"], 41);
    assert_eq!(summary["malformed_lines"], 3);

    let lines = results(&output);
    assert_eq!(lines.len(), 41);
    assert!(
        lines
            .iter()
            .all(|l| l["ok"] == true && l["status"] == 200 && l["attempts"].as_u64() >= Some(1))
    );
    let posted = lines.iter().find(|l| l["id"] == 99).expect("item 99");
    assert_eq!(posted["body"]["method"], "POST");
    assert_eq!(posted["body"]["path"], "/echo/submit");
    assert_eq!(posted["body"]["headers"]["x-trace"], "t1");
    let sent: Value =
        serde_json::from_str(posted["body"]["body"].as_str().expect("echoed body")).expect("json");
    assert_eq!(sent, serde_json::json!({"a": [1, 2]}));
    let price = lines.iter().find(|l| l["id"] == "item-7").expect("item-7");
    assert_eq!(price["body"]["id"], "item-7");
    assert!(price["latency_ms"].as_f64().is_some());
    let stats = mock.stats();
    for i in 0..40 {
        assert_eq!(stats.id_count(&format!("item-{i}")), 1, "item-{i}");
    }
    assert!(
        !cli.path("results.jsonl.journal").exists(),
        "the journal goes when the run is complete"
    );

    // a rerun skips everything (still exit 3 for the malformed lines) and sends nothing
    let before = mock.stats().total_requests;
    let out = cli.run(&args);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("41 items already have a result"),
        "{}",
        stderr(&out)
    );
    assert_eq!(mock.stats().total_requests, before);
    assert_eq!(results(&output).len(), 41);

    // stats of what the batch did
    let usage = cli.json(&["stats", "usage", "prices"]);
    assert_eq!(usage["total"], 41, "{usage}");
    assert!(cli.ok(&["stats", "usage", "prices"]).contains("total: 41"));
    let timeline = cli.json(&["stats", "timeline", "prices", "--interval", "minute"]);
    let counted: u64 = timeline["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| b["total"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, 41, "{timeline}");
    assert!(
        cli.ok(&["stats", "timeline", "prices"])
            .starts_with("START")
    );
    let logs = cli.json(&["stats", "logs", "prices", "--page-size", "5"]);
    assert_eq!(logs["items"].as_array().map(Vec::len), Some(5));
    assert_eq!(logs["total"], 41);
    assert!(
        cli.ok(&["stats", "logs", "prices", "--key", "k1"])
            .contains("k1")
    );
}

#[test]
fn an_unknown_pool_stops_before_anything_is_sent() {
    let server = start_server(900);
    let mock = Mock::start(&["raw-key-aaaa-1"], 50, 1.0);
    let cli = seeded_pool(&server, &mock, &["raw-key-aaaa-1"], 50, 1.0);
    let input = cli.path("items.jsonl");
    price_items(&input, 3);
    let output = cli.path("out.jsonl");
    let out = cli.run(&[
        "batch",
        "run",
        "--pool",
        "nope",
        "--input",
        p(&input),
        "--output",
        p(&output),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    assert!(!output.exists());
    assert_eq!(mock.stats().total_requests, 0);
}

/// Progress lines look like `[batch] 200/400 done, 0 failed, 57.1/s, ETA 3.5s, elapsed 3.5s`.
fn parse_progress(line: &str) -> Option<(u64, u64, f64)> {
    let rest = line.strip_prefix("[batch] ")?;
    let (done, rest) = rest.split_once('/')?;
    let (total, rest) = rest.split_once(' ')?;
    let eta = rest.split("ETA ").nth(1)?.split('s').next()?;
    Some((done.parse().ok()?, total.parse().ok()?, eta.parse().ok()?))
}

/// Starts a batch, waits for `fraction` of `n` results in the output, then sends `signal`.
fn interrupt_at(
    cli: &Cli,
    args: &[&str],
    output: &std::path::Path,
    n: usize,
    fraction: f64,
    signal: &str,
) -> (std::process::ExitStatus, Vec<String>) {
    let mut child = cli
        .cmd(args)
        .env("APIPOOL_PROGRESS_INTERVAL", "0.2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn batch");
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = (n as f64 * fraction) as usize;
    loop {
        let done = std::fs::read_to_string(output)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if done >= target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the batch did not get to {target} results"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let status = child.wait().expect("wait");
    (status, reader.join().expect("stderr lines"))
}

#[test]
fn sigint_at_half_way_then_resume_sends_every_id_exactly_once() {
    let server = start_server(900);
    let keys = ["raw-key-aaaa-1", "raw-key-bbbb-2", "raw-key-cccc-3"];
    let mock = Mock::start(&keys, 20, 1.0);
    let cli = seeded_pool(&server, &mock, &keys, 20, 1.0);
    let n = 400;
    let input = cli.path("items.jsonl");
    price_items(&input, n);
    let output = cli.path("results.jsonl");
    let args = [
        "batch",
        "run",
        "--pool",
        "prices",
        "--input",
        p(&input),
        "--output",
        p(&output),
    ];
    let (status, lines) = interrupt_at(&cli, &args, &output, n, 0.5, "-INT");
    let err = lines.join("\n");
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT: sending no new items"), "{err}");
    assert!(
        err.contains("interrupted by SIGINT") && err.contains("rerun the same command"),
        "{err}"
    );
    // plain progress lines (stderr is not a terminal) with done/total, rate and an ETA
    let progress: Vec<(u64, u64, f64)> = lines.iter().filter_map(|l| parse_progress(l)).collect();
    assert!(!progress.is_empty(), "{err}");
    let (done, total, eta) = *progress.last().expect("a progress line");
    assert_eq!(total, n as u64);
    assert!(done > 0 && eta > 0.0 && eta < 60.0, "{err}");
    let first = results(&output);
    assert!(
        first.len() >= n / 2 && first.len() < n,
        "{} results",
        first.len()
    );
    assert!(
        first.iter().all(|l| l["ok"] == true),
        "in-flight items finished, not cut off"
    );

    let out = cli.run(&args);
    assert_success(&out, &args);
    assert!(
        stderr(&out).contains(&format!("{} items already have a result", first.len())),
        "{}",
        stderr(&out)
    );
    let all = results(&output);
    assert_eq!(all.len(), n);
    let ids: HashSet<&str> = all.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(ids.len(), n);
    let stats = mock.stats();
    for i in 0..n {
        assert_eq!(
            stats.id_count(&format!("item-{i}")),
            1,
            "item-{i} succeeded exactly once upstream"
        );
    }
    assert_eq!(stats.status(200), n as u64);
}

#[test]
fn sigkill_then_resume_never_resends_a_recorded_success() {
    let server = start_server(900);
    let keys = ["raw-key-aaaa-1", "raw-key-bbbb-2", "raw-key-cccc-3"];
    let mock = Mock::start(&keys, 20, 1.0);
    let cli = seeded_pool(&server, &mock, &keys, 20, 1.0);
    let n = 300;
    let input = cli.path("items.jsonl");
    price_items(&input, n);
    let output = cli.path("results.jsonl");
    let args = [
        "batch",
        "run",
        "--pool",
        "prices",
        "--input",
        p(&input),
        "--output",
        p(&output),
    ];
    let (status, _) = interrupt_at(&cli, &args, &output, n, 0.4, "-KILL");
    assert_eq!(status.code(), None, "killed by a signal");
    // what the killed run recorded as successful, and a torn line as a kill mid-write leaves
    let recorded: HashSet<String> = results(&output)
        .iter()
        .filter(|l| l["ok"] == true)
        .filter_map(|l| l["id"].as_str().map(str::to_owned))
        .collect();
    assert!(!recorded.is_empty());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&output)
        .expect("open");
    std::io::Write::write_all(&mut f, b"{\"id\": \"item-299\", \"ok\": tr").expect("tear");
    drop(f);
    let journal = std::fs::read_to_string(cli.path("results.jsonl.journal"))
        .expect("journal kept after a kill");
    let started: HashSet<String> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let in_flight: HashSet<&String> = started
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    let at_kill: HashMap<String, u64> = (0..n)
        .map(|i| format!("item-{i}"))
        .map(|id| {
            let c = mock.stats().id_count(&id);
            (id, c)
        })
        .collect();

    let out = cli.run(&args);
    assert_success(&out, &args);
    let err = stderr(&out);
    assert!(err.contains("torn last line"), "{err}");
    assert!(
        err.contains("were in flight when the last run stopped and are sent again"),
        "{err}"
    );
    let stats = mock.stats();
    for id in &recorded {
        assert_eq!(
            stats.id_count(id),
            1,
            "{id} was recorded as a success and must not be sent again"
        );
    }
    for i in 0..n {
        let id = format!("item-{i}");
        let c = stats.id_count(&id);
        assert!(c >= 1, "{id} never succeeded");
        if c > 1 {
            assert!(
                in_flight.contains(&id) && at_kill[&id] == 1,
                "{id} sent twice but was not in flight at the kill"
            );
        }
    }
    let all = results(&output);
    let ids: HashSet<&str> = all.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(ids.len(), n);
}

#[test]
fn a_local_pool_from_a_keys_file() {
    let keys = ["raw-key-aaaa-1", "raw-key-bbbb-2"];
    let mock = Mock::start(&keys, 10, 1.0);
    let dir = tempfile::tempdir().expect("tempdir");
    let keys_file = dir.path().join("keys.txt");
    std::fs::write(
        &keys_file,
        format!("# two keys\n{}\n\n{}\n", keys[0], keys[1]),
    )
    .expect("write");
    let input = dir.path().join("items.jsonl");
    price_items(&input, 30);
    let output = dir.path().join("out.jsonl");
    let url = mock.url();
    let args = [
        "batch",
        "run",
        "--keys-file",
        p(&keys_file),
        "--base-url",
        &url,
        "--auth",
        "header:x-api-key",
        "--rate-limit",
        "10",
        "--rate-interval",
        "1",
        "--input",
        p(&input),
        "--output",
        p(&output),
        "--json",
    ];
    let out = crate::helpers::apipool().args(args).output().expect("run");
    assert_success(&out, &args);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["ok"], 30);
    let lines = results(&output);
    assert_eq!(lines.len(), 30);
    assert!(lines.iter().all(|l| l["ok"] == true));
    let stats = mock.stats();
    assert!(
        stats.keys.iter().all(|k| k.admitted_ok > 0),
        "both keys used: {stats:?}"
    );
    for i in 0..30 {
        assert_eq!(stats.id_count(&format!("item-{i}")), 1);
    }
    let out = crate::helpers::apipool()
        .args([
            "batch",
            "run",
            "--keys-file",
            p(&keys_file),
            "--base-url",
            &url,
            "--auth",
            "cookie",
            "--input",
            p(&input),
            "--output",
            p(&output),
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--auth"), "{}", stderr(&out));
}
