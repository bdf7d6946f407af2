//! Shared by this crate's integration tests: the real `apipool serve` binary on a free port with
//! its own data directory, killed when dropped.
//!
//! Each test crate uses part of it (`mod common;`), hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs a tool (python3, pip, schemathesis) to completion.
pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is python3 installed?)"))
}

/// A `Command` for the binary with no inherited `APIPOOL_*` or `RUST_LOG` variables.
pub(crate) fn apipool() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_apipool"));
    for (k, _) in std::env::vars() {
        if k.starts_with("APIPOOL_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// How to start `apipool serve`: `Serve::new().admin(..).env(..).spawn()`.
#[derive(Debug, Clone)]
pub(crate) struct Serve {
    data: Option<PathBuf>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    log_to_file: bool,
}

impl Default for Serve {
    fn default() -> Self {
        Self::new()
    }
}

impl Serve {
    /// A server in a fresh temporary data directory, `RUST_LOG=warn`, output discarded.
    pub(crate) fn new() -> Self {
        Self {
            data: None,
            env: vec![("RUST_LOG".to_owned(), "warn".to_owned())],
            args: Vec::new(),
            log_to_file: false,
        }
    }

    /// The first start creates this admin.
    pub(crate) fn admin(self, username: &str, password: &str) -> Self {
        self.env("APIPOOL_ADMIN_USERNAME", username)
            .env("APIPOOL_ADMIN_PASSWORD", password)
    }

    /// An environment variable of the server (later ones win).
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Extra command-line arguments after `serve`.
    pub(crate) fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Uses this data directory (kept after the server stops) instead of a temporary one.
    pub(crate) fn data_dir(mut self, path: &Path) -> Self {
        self.data = Some(path.to_owned());
        self
    }

    /// Sends stdout and stderr to `server.log` in the temporary directory ([`Server::log`]).
    pub(crate) fn log_to_file(mut self) -> Self {
        self.log_to_file = true;
        self
    }

    /// Starts the server and waits until `/health` answers 200 (60 s at most).
    pub(crate) fn spawn(self) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = self.data.clone().unwrap_or_else(|| dir.path().join("data"));
        let mut server = Server {
            child: None,
            port: free_port(),
            data,
            log: dir.path().join("server.log"),
            spec: self,
            dir,
        };
        server.start();
        server
    }

    /// [`Self::spawn`] from async tests (the health wait blocks, so it runs off the runtime).
    pub(crate) async fn aspawn(self) -> Server {
        tokio::task::spawn_blocking(move || self.spawn())
            .await
            .expect("server start")
    }
}

/// A running `apipool serve`; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    spec: Serve,
    dir: tempfile::TempDir,
}

impl Server {
    /// `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The data directory.
    pub(crate) fn data(&self) -> &Path {
        &self.data
    }

    /// The temporary directory the server's log (and by default its data) lives in.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server printed so far (with [`Serve::log_to_file`]).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of the log file (with [`Serve::log_to_file`]).
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL, then reaps the process.
    pub(crate) fn kill(&mut self) {
        let mut c = self.child.take().expect("the server is running");
        c.kill().expect("SIGKILL");
        c.wait().expect("reaped");
    }

    /// Kills the server and waits until its port refuses connections.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "server still answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port with the same data.
    pub(crate) fn start(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let mut cmd = apipool();
        cmd.args(["serve", "--bind", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.spec.args);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        if self.spec.log_to_file {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("log file");
            cmd.stdout(Stdio::from(out.try_clone().expect("log handle")))
                .stderr(Stdio::from(out));
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        self.child = Some(cmd.spawn().expect("spawn apipool serve"));
        self.wait_healthy();
    }

    /// Blocks until `GET /health` answers 200 (plain socket, so it works from sync and async
    /// tests alike).
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200") {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("apipool serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "apipool serve did not become healthy:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
