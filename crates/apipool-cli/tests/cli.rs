//! The `apipool` binary: zero set-up `serve`, graceful SIGTERM, `vault rotate-master-key`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{apipool, free_port};

struct Server {
    child: Child,
    stderr_lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &std::path::Path, extra_env: &[(&str, &str)]) -> Server {
    let port = free_port();
    let mut cmd = apipool();
    cmd.current_dir(dir)
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn apipool serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Server {
        child,
        stderr_lines: rx,
        port,
    }
}

/// Sends SIGTERM and expects a graceful exit with status 0.
fn stop_gracefully(server: &mut Server) {
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = server.child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}

fn wait_healthy(port: u16) -> serde_json::Value {
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/health")).send() {
            return r.json().expect("health json");
        }
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn collect(rx: &std::sync::mpsc::Receiver<String>, until: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = String::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            out.push_str(&line);
            out.push('\n');
            if line.contains(until) {
                break;
            }
        }
    }
    out
}

#[test]
fn help_lists_the_subcommands() {
    let out = apipool().arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("serve") && text.contains("vault"), "{text}");
    let out = apipool().args(["serve", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--bind",
        "--data-dir",
        "--database-url",
        "--open-registration",
        "APIPOOL_BIND",
    ] {
        assert!(text.contains(flag), "serve --help lacks {flag}");
    }
}

#[test]
fn serve_with_zero_setup_then_sigterm_then_rotate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = serve(dir.path(), &[]);
    let health = wait_healthy(server.port);
    assert_eq!(health["status"], "ok");
    // first start: ./data with the database and a private master key, admin password printed once
    let data = dir.path().join("data");
    assert!(data.join("apipool.db").exists());
    let key = data.join("master.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let log = collect(&server.stderr_lines, "listening");
    let password = log
        .lines()
        .find_map(|l| l.split("with password: ").nth(1))
        .expect("generated admin password printed")
        .trim()
        .to_owned();
    let client = reqwest::blocking::Client::new();
    let r = client
        .post(format!(
            "http://127.0.0.1:{}/api/v1/auth/login",
            server.port
        ))
        .json(&serde_json::json!({ "username": "admin", "password": password }))
        .send()
        .expect("login");
    assert_eq!(r.status(), 200);
    let docs = client
        .get(format!("http://127.0.0.1:{}/docs/", server.port))
        .send()
        .expect("docs");
    assert_eq!(docs.status(), 200);

    // SIGTERM: graceful exit with status 0
    stop_gracefully(&mut server);

    // rotate the master key of that data dir
    let before = std::fs::read_to_string(&key).expect("key");
    let out = apipool()
        .current_dir(dir.path())
        .args(["vault", "rotate-master-key", "--handoff-grace-secs", "0"])
        .output()
        .expect("rotate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("version 1 -> 2"), "{text}");
    let after = std::fs::read_to_string(&key).expect("key");
    assert_ne!(before, after);

    // a second start does not print a password again and still opens the vault
    let mut server = serve(dir.path(), &[]);
    wait_healthy(server.port);
    let log = collect(&server.stderr_lines, "listening");
    assert!(!log.contains("with password"), "{log}");
    let r = client
        .post(format!(
            "http://127.0.0.1:{}/api/v1/auth/login",
            server.port
        ))
        .json(&serde_json::json!({ "username": "admin", "password": password }))
        .send()
        .expect("login");
    assert_eq!(r.status(), 200);
    let _ = server.child.kill();
}

#[test]
fn refuses_a_world_readable_master_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(
        data.join("master.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("master.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
    }
    let out = apipool()
        .current_dir(dir.path())
        .args(["serve", "--bind", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn admin_credentials_and_options_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(
        dir.path(),
        &[
            ("APIPOOL_ADMIN_USERNAME", "root_user"),
            ("APIPOOL_ADMIN_PASSWORD", "a-long-admin-password"),
            ("APIPOOL_OPEN_REGISTRATION", "true"),
            (
                "APIPOOL_MASTER_KEY",
                "0000000000000000000000000000000000000000000000000000000000000001",
            ),
            ("APIPOOL_DATA_DIR", "elsewhere"),
        ],
    );
    wait_healthy(server.port);
    assert!(dir.path().join("elsewhere/apipool.db").exists());
    assert!(
        !dir.path().join("elsewhere/master.key").exists(),
        "the env key is used, no file"
    );
    let client = reqwest::blocking::Client::new();
    let base = format!("http://127.0.0.1:{}/api/v1", server.port);
    let r = client
        .post(format!("{base}/auth/login"))
        .json(&serde_json::json!({ "username": "root_user", "password": "a-long-admin-password" }))
        .send()
        .expect("login");
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/auth/register"))
        .json(&serde_json::json!({ "username": "newbie", "email": "n@x.io", "password": "password-123" }))
        .send()
        .expect("register");
    assert_eq!(r.status(), 201, "open registration from the environment");
}

#[test]
fn serve_on_one_worker_thread_proxies_then_stops_gracefully() {
    serve_proxies_then_stops_gracefully("1", 0);
}

#[test]
fn serve_on_three_serving_threads_proxies_then_stops_gracefully() {
    serve_proxies_then_stops_gracefully("3", 3);
}

/// Names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// `serve --workers WORKERS` runs SERVING_THREADS serving threads (none for 1: everything on
/// the main thread), proxies concurrent calls and exits cleanly on SIGTERM.
fn serve_proxies_then_stops_gracefully(workers: &str, serving_threads: usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let up = rt
        .block_on(mock_upstream::spawn(
            mock_upstream::Config::with_keys(["one-thread-raw-key"]).expect("cfg"),
        ))
        .expect("mock");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = serve(
        dir.path(),
        &[
            ("APIPOOL_WORKERS", workers),
            ("APIPOOL_ADMIN_PASSWORD", "one-thread-admin-pw"),
        ],
    );
    wait_healthy(server.port);
    let base = format!("http://127.0.0.1:{}/api/v1", server.port);
    let client = reqwest::blocking::Client::new();
    let token = client
        .post(format!("{base}/auth/login"))
        .json(&serde_json::json!({ "username": "admin", "password": "one-thread-admin-pw" }))
        .send()
        .expect("login")
        .json::<serde_json::Value>()
        .expect("login json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let post = |path: &str, body: serde_json::Value| {
        let r = client
            .post(format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .expect("post");
        assert!(r.status().is_success(), "{path}: {}", r.status());
    };
    post(
        "/keys",
        serde_json::json!({"identifier": "k1", "raw_key": "one-thread-raw-key"}),
    );
    post(
        "/pools",
        serde_json::json!({"identifier": "solo", "name": "solo", "key_identifiers": ["k1"],
            "upstream": {"base_url": up.url(), "auth": "bearer"}}),
    );
    let serving = thread_names(server.child.id())
        .into_iter()
        .filter(|n| n.starts_with("apipool-serve-"))
        .count();
    assert_eq!(
        serving,
        serving_threads,
        "{:?}",
        thread_names(server.child.id())
    );
    // Concurrent calls through the proxy, on as many connections.
    std::thread::scope(|s| {
        for t in 0..4 {
            let (client, base, token) = (&client, &base, &token);
            s.spawn(move || {
                for i in 0..25 {
                    let r = client
                        .get(format!("{base}/proxy/solo/http/price?id=c{t}-{i}"))
                        .bearer_auth(token)
                        .send()
                        .expect("proxy");
                    assert_eq!(r.status(), 200);
                    let body: serde_json::Value = r.json().expect("json");
                    assert_eq!(body["id"], format!("c{t}-{i}"));
                }
            });
        }
    });
    stop_gracefully(&mut server);
    drop(up);
}

#[test]
fn serve_refuses_zero_workers_and_says_why() {
    let out = apipool()
        .args(["serve", "--workers", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");
}
