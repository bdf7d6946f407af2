use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
}

#[tokio::test]
async fn binary_prints_its_address_first_and_stops_on_sigterm() {
    let mut child = binary()
        .args(["--bind", "127.0.0.1:0", "--keys", "k1,k2", "--rate", "1"])
        .args(["--interval", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a line within 10 s")
        .expect("readable stdout")
        .expect("a first line");
    let url = first
        .strip_prefix("listening on ")
        .expect("the first line announces the address");
    assert!(url.starts_with("http://127.0.0.1:"), "{first}");

    let c = crate::helpers::client();
    let get = |key: &'static str| c.get(format!("{url}/price?id=x")).bearer_auth(key).send();
    assert_eq!(get("k1").await.expect("answer").status(), 200);
    assert_eq!(get("k1").await.expect("answer").status(), 429);
    assert_eq!(get("zz").await.expect("answer").status(), 401);

    let pid = child.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits within 10 s after SIGTERM")
        .expect("output");
    assert!(out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().expect("final stats on stderr");
    let stats: mock_upstream::StatsSnapshot =
        serde_json::from_str(last).expect("final stats are JSON");
    assert_eq!(stats.total_requests, 3);
    assert!(!stderr.contains("\"k1\""));
}

#[tokio::test]
async fn binary_refuses_bad_settings_with_advice() {
    let out = binary()
        .args(["--keys", "k1", "--error-rate", "2"])
        .output()
        .await
        .expect("the binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error_rate must be a probability"),
        "{stderr}"
    );
}
