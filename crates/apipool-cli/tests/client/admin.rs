//! login/logout/whoami, key, pool, user and stats commands.

use crate::helpers::{ADMIN, Cli, Mock, PASSWORD, Server, assert_success, start_server, stderr};
use serde_json::Value;

#[test]
fn wrong_password_is_refused_and_nothing_is_stored() {
    let server = start_server(900);
    let cli = Cli::new(&server);
    let out = cli
        .cmd(&["login", "--server", &server.url(), "--username", ADMIN])
        .env("APIPOOL_PASSWORD", "not-the-password")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("login refused"), "{}", stderr(&out));
    assert!(!cli.session_file().exists());

    // no login yet: a clear message and the auth exit code
    let out = cli.run(&["key", "list"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("not logged in"), "{}", stderr(&out));

    // the password from stdin works, the file is private and holds no password
    let out = cli.run_stdin(
        &[
            "login",
            "--server",
            &server.url(),
            "--username",
            ADMIN,
            "--password-stdin",
        ],
        PASSWORD,
    );
    assert_success(&out, &["login"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cli.session_file())
            .expect("session")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let saved = std::fs::read_to_string(cli.session_file()).expect("read");
    assert!(!saved.contains(PASSWORD));
    let me = cli.json(&["whoami"]);
    assert_eq!(me["username"], ADMIN);
    assert_eq!(me["role"], "admin");
}

#[test]
fn short_lived_tokens_are_renewed_and_logout_revokes() {
    // Access tokens live 30 s, under the CLI's 60 s margin: every command renews first.
    let server = start_server(30);
    let cli = Cli::new(&server);
    cli.login(ADMIN, PASSWORD);
    let refresh_of = |cli: &Cli| -> String {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(cli.session_file()).expect("read"))
                .expect("json");
        v["refresh_token"]
            .as_str()
            .expect("refresh token")
            .to_owned()
    };
    let first = refresh_of(&cli);
    assert_eq!(cli.json(&["whoami"])["username"], ADMIN);
    let second = refresh_of(&cli);
    assert_ne!(first, second, "the rotated refresh token is saved");
    assert_eq!(cli.json(&["whoami"])["username"], ADMIN);
    let third = refresh_of(&cli);
    assert_ne!(second, third);

    let out = cli.run(&["logout"]);
    assert_success(&out, &["logout"]);
    assert!(!cli.session_file().exists());
    // the server revoked the login: its refresh token is refused
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/auth/refresh", server.url()))
        .json(&serde_json::json!({ "refresh_token": third }))
        .send()
        .expect("refresh");
    assert_eq!(r.status(), 401);
    let out = cli.run(&["whoami"]);
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn keys_from_add_to_delete() {
    let server = start_server(900);
    let mock = Mock::start(&["raw-secret-alpha-1", "raw-secret-beta-22"], 100, 1.0);
    let cli = Cli::new(&server);
    cli.login(ADMIN, PASSWORD);

    // the secret from stdin, and from APIPOOL_KEY
    let cfg = format!(
        r#"{{"base_url": "{}", "verify_path": "/echo/verify"}}"#,
        mock.url()
    );
    let out = cli.run_stdin(
        &[
            "key",
            "add",
            "alpha",
            "--key-stdin",
            "--tag",
            "prod",
            "--alias",
            "Alpha",
            "--client-config",
            &cfg,
        ],
        "raw-secret-alpha-1\n",
    );
    assert_success(&out, &["key", "add", "alpha"]);
    let out = cli
        .cmd(&["key", "add", "beta", "--description", "second"])
        .env("APIPOOL_KEY", "raw-secret-beta-22")
        .output()
        .expect("run");
    assert_success(&out, &["key", "add", "beta"]);
    let out = cli.run(&["key", "add", "gamma"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no key given"), "{}", stderr(&out));
    // duplicate identifier: the server's message, plainly
    let out = cli.run_stdin(&["key", "add", "alpha", "--key-stdin"], "x");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("409"), "{}", stderr(&out));

    let table = cli.ok(&["key", "list"]);
    assert!(table.starts_with("IDENTIFIER"), "{table}");
    assert!(
        table.contains("alpha") && table.contains("beta") && table.contains("prod"),
        "{table}"
    );
    assert!(
        !table.contains("raw-secret"),
        "raw keys never listed: {table}"
    );
    let list = cli.json(&["key", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    assert!(!list.to_string().contains("raw-secret"));
    let only = cli.json(&["key", "list", "--tag", "prod"]);
    assert_eq!(only.as_array().map(Vec::len), Some(1));

    let shown = cli.ok(&["key", "show", "alpha"]);
    assert!(
        shown.contains("Alpha") && !shown.contains("raw-secret"),
        "{shown}"
    );

    let v = cli.json(&["key", "verify", "alpha"]);
    assert_eq!(v["verification_status"], "valid", "{v}");

    // export without and with raw keys; import the raw export into a second account's view
    let csv = cli.ok(&["key", "export"]);
    assert!(
        csv.starts_with("identifier,") && !csv.contains("raw-secret"),
        "{csv}"
    );
    let backup = cli.path("backup.csv");
    let out = cli.run(&[
        "key",
        "export",
        "--include-raw",
        "--output",
        backup.to_str().expect("utf8"),
    ]);
    assert_success(&out, &["key", "export"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup)
            .expect("backup")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(
        std::fs::read_to_string(&backup)
            .expect("read")
            .contains("raw-secret-alpha-1")
    );
    let out = cli.run(&["key", "delete", "beta"]);
    assert_success(&out, &["key", "delete"]);
    let out = cli.run(&["key", "show", "beta"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    // an import is all or nothing: alpha still exists, so the backup is refused as a whole
    let out = cli.run(&["key", "import", backup.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("422"), "{}", stderr(&out));
    assert_success(&cli.run(&["key", "delete", "alpha"]), &["key", "delete"]);
    let report = cli.json(&["key", "import", backup.to_str().expect("utf8")]);
    assert_eq!(report["imported"], 2, "{report}");
    assert!(
        cli.ok(&["key", "show", "alpha"]).contains("Alpha"),
        "the alias came back"
    );
    let jsonl = cli.path("more.jsonl");
    std::fs::write(
        &jsonl,
        "{\"identifier\": \"delta\", \"raw_key\": \"raw-secret-delta\"}\n",
    )
    .expect("write");
    assert_eq!(
        cli.json(&["key", "import", jsonl.to_str().expect("utf8")])["imported"],
        1
    );
    assert_eq!(cli.json(&["key", "list"]).as_array().map(Vec::len), Some(3));

    let out = cli.run_stdin(
        &["key", "rotate", "delta", "--key-stdin"],
        "raw-secret-delta-v2",
    );
    assert_success(&out, &["key", "rotate"]);
    assert_eq!(
        raw_of(&cli, &server, "delta")["raw_key"],
        "raw-secret-delta-v2"
    );
    assert_eq!(
        raw_of(&cli, &server, "beta")["raw_key"],
        "raw-secret-beta-22",
        "the secret survived export and import"
    );

    assert_eq!(cli.json(&["key", "disable", "alpha"])["is_active"], false);
    assert_eq!(cli.json(&["key", "show", "alpha"])["is_active"], false);
    assert_eq!(cli.json(&["key", "enable", "alpha"])["is_active"], true);
}

fn raw_of(cli: &Cli, server: &Server, id: &str) -> Value {
    reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/keys/{id}/raw", server.url()))
        .bearer_auth(session_access(cli))
        .send()
        .expect("raw")
        .json()
        .expect("json")
}

fn session_access(cli: &Cli) -> String {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(cli.session_file()).expect("read"))
            .expect("json");
    v["access_token"].as_str().expect("access").to_owned()
}

#[test]
fn pools_members_config_status_and_unknown_pool() {
    let server = start_server(900);
    let cli = Cli::new(&server);
    cli.login(ADMIN, PASSWORD);
    for (id, raw) in [
        ("k1", "raw-one-1111"),
        ("k2", "raw-two-2222"),
        ("k3", "raw-three-3333"),
    ] {
        assert_success(
            &cli.run_stdin(&["key", "add", id, "--key-stdin"], raw),
            &["key", "add"],
        );
    }
    let p = cli.json(&[
        "pool",
        "create",
        "prices",
        "--key",
        "k1",
        "--key",
        "k2",
        "--strategy",
        "round_robin",
        "--upstream-url",
        "http://127.0.0.1:9/",
        "--upstream-auth",
        "header:x-api-key",
        "--rate-limit",
        "20",
        "--rate-interval",
        "1",
    ]);
    assert_eq!(p["member_count"], 2, "{p}");
    assert_eq!(p["pool_config"]["rate_limit"], 20);
    let table = cli.ok(&["pool", "list"]);
    assert!(
        table.contains("prices") && table.contains("round_robin"),
        "{table}"
    );

    assert_success(
        &cli.run(&["pool", "add-members", "prices", "k3", "--priority", "1"]),
        &["add-members"],
    );
    let shown = cli.ok(&["pool", "show", "prices"]);
    assert!(
        shown.contains("k3") && shown.contains("members:"),
        "{shown}"
    );
    assert_success(
        &cli.run(&["pool", "remove-member", "prices", "k1"]),
        &["remove-member"],
    );
    let members: Vec<String> = cli.json(&["pool", "show", "prices"])["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["key_identifier"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(members.len(), 2);
    assert!(!members.contains(&"k1".to_owned()), "{members:?}");

    let c = cli.json(&["pool", "config", "get", "prices"]);
    assert_eq!(c["rotation_strategy"], "round_robin");
    assert_eq!(c["pool_config"]["rate_limit"], 20);
    assert_success(
        &cli.run(&[
            "pool",
            "config",
            "set",
            "prices",
            "rate_limit=5",
            "max_retries=2",
            "--strategy",
            "least_used",
        ]),
        &["config", "set"],
    );
    let c = cli.json(&["pool", "config", "get", "prices"]);
    assert_eq!(c["pool_config"]["rate_limit"], 5);
    assert_eq!(c["pool_config"]["max_retries"], 2);
    assert_eq!(
        c["pool_config"]["rate_limit_interval"], 1.0,
        "other fields kept: {c}"
    );
    assert_eq!(c["rotation_strategy"], "least_used");
    let out = cli.run(&["pool", "config", "set", "prices", "timeout=0"]);
    assert_eq!(out.status.code(), Some(1), "an invalid config is refused");
    assert!(
        stderr(&out).contains("422") || stderr(&out).contains("timeout"),
        "{}",
        stderr(&out)
    );

    let s = cli.json(&["pool", "status", "prices"]);
    assert_eq!(s["total_keys"], 2);
    assert_eq!(s["available_keys"], 2);
    assert!(
        cli.ok(&["pool", "status", "prices"])
            .contains("available_keys:")
    );

    for args in [
        &["pool", "show", "nope"][..],
        &["pool", "status", "nope"],
        &["pool", "config", "get", "nope"],
        &["stats", "usage", "nope"],
    ] {
        let out = cli.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("not found") && err.contains("404"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn users_are_admin_only() {
    let server = start_server(900);
    let admin = Cli::new(&server);
    admin.login(ADMIN, PASSWORD);
    let out = admin
        .cmd(&["user", "add", "bob", "--email", "bob@example.com"])
        .env("APIPOOL_NEW_USER_PASSWORD", "bob-password-123")
        .output()
        .expect("run");
    assert_success(&out, &["user", "add"]);
    let users = admin.json(&["user", "list"]);
    assert!(
        users
            .as_array()
            .expect("list")
            .iter()
            .any(|u| u["username"] == "bob")
    );
    assert!(admin.ok(&["user", "list"]).contains("bob@example.com"));

    let bob = Cli::new(&server);
    bob.login("bob", "bob-password-123");
    let out = bob.run(&["user", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    let out = bob
        .cmd(&["user", "add", "eve", "--email", "e@x.io"])
        .env("APIPOOL_NEW_USER_PASSWORD", "eve-password-1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));

    let u = admin.json(&["user", "disable", "bob"]);
    assert_eq!(u["is_active"], false);
    let out = admin.run(&["user", "disable", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"));
    assert_eq!(admin.json(&["user", "enable", "bob"])["is_active"], true);
}

#[test]
fn every_command_has_help_with_examples() {
    let commands: &[&[&str]] = &[
        &["login"],
        &["logout"],
        &["whoami"],
        &["key", "add"],
        &["key", "list"],
        &["key", "show"],
        &["key", "import"],
        &["key", "export"],
        &["key", "rotate"],
        &["key", "verify"],
        &["key", "enable"],
        &["key", "disable"],
        &["key", "delete"],
        &["pool", "create"],
        &["pool", "list"],
        &["pool", "show"],
        &["pool", "add-members"],
        &["pool", "remove-member"],
        &["pool", "config", "get"],
        &["pool", "config", "set"],
        &["pool", "status"],
        &["user", "add"],
        &["user", "list"],
        &["user", "disable"],
        &["stats", "usage"],
        &["stats", "timeline"],
        &["stats", "logs"],
        &["batch", "run"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let out = crate::helpers::apipool().args(&args).output().expect("run");
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Example"), "{args:?} has no example:\n{text}");
    }
    let top = crate::helpers::apipool()
        .arg("--help")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&top.stdout);
    for word in ["serve", "vault", "login", "batch", "Exit codes"] {
        assert!(text.contains(word), "{word}: {text}");
    }
    let key_add = crate::helpers::apipool()
        .args(["key", "add", "--help"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&key_add.stdout).contains("shell history"));
}
