//! The published Python SDK, apipool-ng 1.0.9 from PyPI, unchanged, against the real `apipool`
//! binary: login, get_keys, get_config, connect + `dummyclient.get(...)` reaching a local
//! upstream, the async twins, and DynamicKeyManager / AsyncDynamicKeyManager following the
//! server. The checks themselves are `tests/compat/sdk_check.py`.
//!
//! The SDK is installed once into a virtualenv under the target directory
//! (`target/tmp/compat-venv`, reused while it holds apipool-ng 1.0.9); needs `python3` with
//! `venv` (or pip, as a fallback) and access to PyPI for that first install. `APIPOOL_PYTHON`
//! picks another interpreter; `APIPOOL_COMPAT_VENV` another virtualenv (e.g. one made by CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Serve, Server, run};

use serde_json::{Value, json};

const PACKAGE: &str = "apipool-ng==1.0.9";
const ADMIN: &str = "admin";
const PASSWORD: &str = "compat-admin-password-1";

/// Where the SDK is importable from: an interpreter plus (for the fallback) a PYTHONPATH.
struct Python {
    exe: PathBuf,
    path: Option<PathBuf>,
}

fn has_sdk(py: &Python) -> bool {
    let mut cmd = Command::new(&py.exe);
    cmd.args([
        "-c",
        "import apipool, httpx, sys; sys.exit(0 if apipool.__version__ == '1.0.9' and hasattr(apipool, 'connect') else 1)",
    ]);
    if let Some(p) = &py.path {
        cmd.env("PYTHONPATH", p);
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pip_install(python: &Path, extra: &[&str]) -> Output {
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
        ])
        .args(extra)
        .arg(PACKAGE))
}

/// The SDK in a virtualenv (created and filled on first use; fast when already there).
fn python_with_sdk() -> Python {
    let host = std::env::var("APIPOOL_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let venv = std::env::var_os("APIPOOL_COMPAT_VENV").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("compat-venv"),
        PathBuf::from,
    );
    let venv_py = Python {
        exe: venv.join("bin").join("python"),
        path: None,
    };
    if has_sdk(&venv_py) {
        return venv_py;
    }
    let made = run(Command::new(&host).arg("-m").arg("venv").arg(&venv));
    if made.status.success() && venv_py.exe.exists() {
        let out = pip_install(&venv_py.exe, &[]);
        assert!(
            out.status.success(),
            "pip install {PACKAGE} into {} failed:\n{}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            has_sdk(&venv_py),
            "{PACKAGE} is not importable after install"
        );
        return venv_py;
    }
    // No `venv` module (e.g. Debian without python3-venv): install into a directory instead.
    let site = venv.with_file_name("compat-site");
    let fallback = Python {
        exe: PathBuf::from(&host),
        path: Some(site.clone()),
    };
    if has_sdk(&fallback) {
        return fallback;
    }
    let target = site.to_string_lossy().into_owned();
    let out = pip_install(Path::new(&host), &["--target", &target]);
    assert!(
        out.status.success(),
        "`{host} -m venv` failed ({}) and `pip install --target` failed too:\n{}",
        String::from_utf8_lossy(&made.stderr).trim(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        has_sdk(&fallback),
        "{PACKAGE} is not importable after install"
    );
    fallback
}

async fn start_server() -> Server {
    let spec = Serve::new().admin(ADMIN, PASSWORD);
    spec.aspawn().await
}

async fn api(client: &reqwest::Client, token: &str, method: &str, url: String, body: Value) {
    let r = client
        .request(method.parse().expect("method"), &url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status();
    assert!(
        status.is_success(),
        "{method} {url}: {status} {}",
        r.text().await.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apipool_ng_1_0_9_sdk_works_unchanged() {
    let python = tokio::task::spawn_blocking(python_with_sdk)
        .await
        .expect("python set-up");
    let raw = [
        "compat-key-one",
        "compat-key-two",
        "compat-spare-1",
        "compat-spare-2",
    ];
    let up = mock_upstream::spawn(mock_upstream::Config::with_keys(raw).expect("keys"))
        .await
        .expect("mock upstream");
    let server = start_server().await;
    let client = reqwest::Client::new();
    let api_url = |p: &str| format!("{}/api/v1{p}", server.url());
    let login: Value = client
        .post(api_url("/auth/login"))
        .json(&json!({"username": ADMIN, "password": PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = login["access_token"].as_str().expect("token").to_owned();
    api(
        &client,
        &token,
        "POST",
        api_url("/auth/register"),
        json!({
            "username": "pyuser", "email": "py@example.com", "password": "py-password-1"
        }),
    )
    .await;
    let user: Value = client
        .post(api_url("/auth/login"))
        .json(&json!({"username": "pyuser", "password": "py-password-1"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let user_token = user["access_token"].as_str().expect("token").to_owned();
    for (id, key) in [("one", raw[0]), ("two", raw[1])] {
        api(
            &client,
            &user_token,
            "POST",
            api_url("/keys"),
            json!({"identifier": id, "raw_key": key}),
        )
        .await;
    }
    api(
        &client,
        &user_token,
        "POST",
        api_url("/pools"),
        json!({
            "identifier": "compat", "name": "Compatibility", "key_identifiers": ["one", "two"],
            "rotation_strategy": "round_robin", "reach_limit_exception": "httpx.HTTPStatusError",
            "upstream": {"base_url": up.url(), "auth": "bearer"},
            "pool_config": {"rate_limit": 100, "rate_limit_interval": 1, "retry_on_failure": true,
                            "max_retries": 2, "custom": {"team": "compat"}},
        }),
    )
    .await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat/sdk_check.py");
    let mut cmd = Command::new(&python.exe);
    if let Some(p) = &python.path {
        cmd.env("PYTHONPATH", p);
    }
    cmd.arg(&script)
        .env("APIPOOL_URL", server.url())
        .env("APIPOOL_USER", "pyuser")
        .env("APIPOOL_PASSWORD", "py-password-1")
        .env("POOL", "compat")
        .env("UPSTREAM", up.url())
        .env(
            "PRICE_BITCOIN",
            mock_upstream::price_for("bitcoin").to_string(),
        )
        .env(
            "PRICE_ETHEREUM",
            mock_upstream::price_for("ethereum").to_string(),
        )
        .env("SPARE_KEY", raw[2])
        .env("SPARE_KEY_2", raw[3])
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .expect("python run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the compatibility script failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for check in [
        "login",
        "get_keys",
        "get_config",
        "connect_dummyclient",
        "proxy_refusals",
        "dynamic_key_manager",
        "alogin",
        "aget_keys",
        "aget_config",
        "async_connect_adummyclient",
        "async_dynamic_key_manager",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("OK {check}")),
            "check {check} missing\n{stdout}"
        );
    }
    assert_eq!(stdout.lines().last(), Some("ALL OK"), "{stdout}");

    // The proxied calls reached the upstream with the pool's keys; nothing with an unknown key.
    let stats = up.stats();
    assert_eq!(stats.unknown_key, 0);
    assert!(stats.key(0).expect("key 0").admitted > 0 && stats.key(1).expect("key 1").admitted > 0);
    // And the server recorded them, by identifier.
    let usage: Value = client
        .get(api_url("/stats/compat/usage?seconds=3600"))
        .bearer_auth(&user_token)
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("json");
    assert!(usage["total"].as_u64().unwrap_or(0) >= 15, "{usage}");
    assert!(
        !usage.to_string().contains("compat-key"),
        "no raw key in stats: {usage}"
    );
    up.shutdown().await.expect("mock shutdown");
}
