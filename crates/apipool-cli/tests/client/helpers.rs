//! A real server (the `apipool serve` binary on a free port, SQLite in a temp dir), a real
//! mock-upstream on its own runtime, and a CLI runner with its own config directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub(crate) const ADMIN: &str = "admin";
pub(crate) const PASSWORD: &str = "cli-test-password-1";

pub(crate) use crate::common::{Server, apipool};

/// `apipool serve` with its own data directory, the test admin and this access-token lifetime.
pub(crate) fn start_server(ttl_secs: u64) -> Server {
    crate::common::Serve::new()
        .admin(ADMIN, PASSWORD)
        .env("APIPOOL_ACCESS_TOKEN_TTL_SECS", &ttl_secs.to_string())
        .spawn()
}

/// mock-upstream on a private runtime.
pub(crate) struct Mock {
    server: Option<mock_upstream::MockServer>,
    rt: tokio::runtime::Runtime,
}

impl Mock {
    /// `keys` with `rate` requests per `interval` seconds each.
    pub(crate) fn start(keys: &[&str], rate: u32, interval: f64) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = mock_upstream::Config {
            rate,
            interval,
            ..mock_upstream::Config::with_keys(keys.iter().copied()).expect("mock config")
        };
        let server = rt.block_on(mock_upstream::spawn(config)).expect("mock");
        Self {
            server: Some(server),
            rt,
        }
    }

    pub(crate) fn url(&self) -> String {
        self.server.as_ref().expect("running").url()
    }

    pub(crate) fn stats(&self) -> mock_upstream::StatsSnapshot {
        self.server.as_ref().expect("running").stats()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.rt.block_on(s.shutdown());
        }
    }
}

/// The CLI with its own config directory (its own saved login).
pub(crate) struct Cli {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) server: String,
}

impl Cli {
    pub(crate) fn new(server: &Server) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            server: server.url(),
        }
    }

    pub(crate) fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub(crate) fn session_file(&self) -> PathBuf {
        self.config_dir().join("session.json")
    }

    /// A path in this runner's temp directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = apipool();
        c.args(args)
            .env("APIPOOL_CONFIG_DIR", self.config_dir())
            .stdin(Stdio::null());
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run apipool")
    }

    /// Runs with `input` on standard input.
    pub(crate) fn run_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut c = self.cmd(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("wait")
    }

    /// Runs and asserts success; returns stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs with `--json` and parses stdout.
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }

    pub(crate) fn login(&self, user: &str, password: &str) {
        let out = self
            .cmd(&["login", "--server", &self.server, "--username", user])
            .env("APIPOOL_PASSWORD", password)
            .output()
            .expect("login");
        assert_success(&out, &["login", user]);
    }
}

pub(crate) fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "apipool {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `n` price items (`id` = `item-<i>`) as JSON lines.
pub(crate) fn price_items(path: &Path, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "{{\"id\": \"item-{i}\", \"method\": \"GET\", \"path\": \"/price\", \"query\": {{\"id\": \"item-{i}\"}}}}\n"
        ));
    }
    std::fs::write(path, text).expect("write items");
}

/// The result lines of an output file, parsed.
pub(crate) fn results(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad result line {l:?}: {e}")))
        .collect()
}

/// A logged-in admin CLI and a pool `prices` of `keys` (raw values as given) whose upstream is
/// `mock`, paced at `rate`/`interval` per key.
pub(crate) fn seeded_pool(
    server: &Server,
    mock: &Mock,
    keys: &[&str],
    rate: u32,
    interval: f64,
) -> Cli {
    let cli = Cli::new(server);
    cli.login(ADMIN, PASSWORD);
    let mut ids = Vec::new();
    for (i, raw) in keys.iter().enumerate() {
        let id = format!("k{}", i + 1);
        let out = cli.run_stdin(&["key", "add", &id, "--key-stdin"], raw);
        assert_success(&out, &["key", "add", &id]);
        ids.push(id);
    }
    let mut args = vec![
        "pool".to_owned(),
        "create".to_owned(),
        "prices".to_owned(),
        "--upstream-url".to_owned(),
        mock.url(),
        "--rate-limit".to_owned(),
        rate.to_string(),
        "--rate-interval".to_owned(),
        interval.to_string(),
    ];
    for id in &ids {
        args.push("--key".to_owned());
        args.push(id.clone());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    cli.ok(&a);
    cli
}
