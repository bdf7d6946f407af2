//! `apipool login|logout|whoami|key|pool|user|stats`: the server's management API from a terminal.

use crate::api::{self, Api};
use crate::failure::{CliResult, Context, Failure};
use crate::output::{self, Out, fields, table};
use crate::store::Store;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value, json};
use std::io::Read as _;
use std::path::PathBuf;

/// Options every server command takes.
#[derive(Debug, Args, Clone)]
pub(crate) struct Common {
    /// Print the server's JSON instead of a table
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Where the login is saved [default: $XDG_CONFIG_HOME/apipool or ~/.config/apipool]
    #[arg(long, global = true, env = "APIPOOL_CONFIG_DIR", value_name = "DIR")]
    pub(crate) config_dir: Option<PathBuf>,
}

impl Common {
    pub(crate) fn store(&self) -> CliResult<Store> {
        Store::locate(self.config_dir.clone())
    }

    pub(crate) fn out(&self) -> Out {
        Out { json: self.json }
    }
}

// ---------------------------------------------------------------------------------------------
// login / logout / whoami

/// `apipool login`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  apipool login --server http://127.0.0.1:8000 --username alice   # password from APIPOOL_PASSWORD
  printf '%s' \"$PW\" | apipool login --server https://keys.example --username alice --password-stdin")]
pub(crate) struct LoginArgs {
    /// The server's base URL
    #[arg(long, env = "APIPOOL_SERVER")]
    server: String,
    /// Your username
    #[arg(long, env = "APIPOOL_USERNAME")]
    username: String,
    /// The password (prefer APIPOOL_PASSWORD or --password-stdin: the command line is visible
    /// to other users and kept in shell history)
    #[arg(
        long,
        env = "APIPOOL_PASSWORD",
        hide_env_values = true,
        conflicts_with = "password_stdin"
    )]
    password: Option<String>,
    /// Read the password from standard input
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    common: Common,
}

pub(crate) async fn login(a: LoginArgs) -> CliResult {
    let password = match (a.password, a.password_stdin) {
        (_, true) => read_stdin_secret("the password")?,
        (Some(p), false) => p,
        (None, false) => {
            return Err(Failure::auth(
                "no password: pass --password-stdin, set APIPOOL_PASSWORD, or --password",
            ));
        }
    };
    let store = a.common.store()?;
    let me = api::login(&store, &a.server, &a.username, &password).await?;
    a.common.out().emit(&me, |me| {
        format!(
            "logged in to {} as {} ({}); session saved in {}\n",
            a.server,
            output::cell(&me["username"]),
            output::cell(&me["role"]),
            store.path().display()
        )
    });
    Ok(())
}

/// `apipool logout`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  apipool logout")]
pub(crate) struct LogoutArgs {
    #[command(flatten)]
    common: Common,
}

pub(crate) async fn logout(a: LogoutArgs) -> CliResult {
    let store = a.common.store()?;
    match api::logout(&store).await? {
        None => println!("logged out"),
        Some(warning) => eprintln!("warning: {warning}"),
    }
    Ok(())
}

/// `apipool whoami`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  apipool whoami --json")]
pub(crate) struct WhoamiArgs {
    #[command(flatten)]
    common: Common,
}

pub(crate) async fn whoami(a: WhoamiArgs) -> CliResult {
    with_api(&a.common, async |api| {
        let me = api.get(&["auth", "me"], &[]).await?;
        a.common.out().emit(&me, |me| {
            format!(
                "{} ({}) on {}\n",
                output::cell(&me["username"]),
                output::cell(&me["role"]),
                api.server()
            )
        });
        Ok(())
    })
    .await
}

/// Opens the saved session, runs `f`, and saves renewed tokens whatever `f` returned.
pub(crate) async fn with_api<T>(
    common: &Common,
    f: impl AsyncFnOnce(&Api) -> CliResult<T>,
) -> CliResult<T> {
    let store = common.store()?;
    let api = Api::open(&store).await?;
    let r = f(&api).await;
    let saved = api.persist();
    let v = r?;
    saved?;
    Ok(v)
}

fn read_stdin_secret(what: &str) -> CliResult<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context(|| format!("cannot read {what} from standard input"))?;
    let s = s.trim_end_matches(['\n', '\r']).to_owned();
    if s.is_empty() {
        return Err(Failure::error(format!("{what} on standard input is empty")));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// key

/// `apipool key ...`.
#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: KeyCommand,
}

/// Where a raw key comes from.
#[derive(Debug, Args)]
struct SecretInput {
    /// Read the raw key from standard input (recommended)
    #[arg(long)]
    key_stdin: bool,
    /// The raw key. Also read from APIPOOL_KEY. Passing it here puts it in your shell history
    /// and in the process list: prefer --key-stdin or the environment variable
    #[arg(long, env = "APIPOOL_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl SecretInput {
    fn read(self) -> CliResult<String> {
        if self.key_stdin {
            return read_stdin_secret("the key");
        }
        self.key.filter(|k| !k.is_empty()).ok_or_else(|| {
            Failure::error("no key given: pipe it into --key-stdin or set APIPOOL_KEY")
        })
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Store a key (the secret comes from --key-stdin or APIPOOL_KEY)
    #[command(after_help = "Examples:
  printf '%s' \"$OPENAI_KEY\" | apipool key add openai-1 --key-stdin --tag prod
  APIPOOL_KEY=sk-... apipool key add openai-2 --alias backup")]
    Add {
        /// A name for the key (unique among your keys)
        identifier: String,
        #[command(flatten)]
        secret: SecretInput,
        /// A display name
        #[arg(long)]
        alias: Option<String>,
        /// A tag (repeat for several)
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A description
        #[arg(long)]
        description: Option<String>,
        /// The key's client_config as JSON (e.g. '{"base_url": "https://api.example"}')
        #[arg(long, value_name = "JSON")]
        client_config: Option<String>,
    },
    /// List your keys (identifiers and state; never the secrets)
    #[command(after_help = "Examples:\n  apipool key list\n  apipool key list --tag prod --json")]
    List {
        /// Only keys with this tag
        #[arg(long)]
        tag: Option<String>,
        /// Only keys whose identifier or alias contains this
        #[arg(long)]
        search: Option<String>,
    },
    /// Show one key
    #[command(after_help = "Example:\n  apipool key show openai-1")]
    Show { identifier: String },
    /// Import keys from a CSV file (header with identifier,raw_key[,alias,description,tags,
    /// client_config], as `key export --include-raw` writes), a JSON array or JSON lines
    #[command(after_help = "Examples:
  apipool key import keys.csv
  apipool key import keys.jsonl   # {\"identifier\": \"k1\", \"raw_key\": \"...\"} per line")]
    Import {
        /// The file (`-` for standard input)
        file: PathBuf,
    },
    /// Export your keys as CSV (to standard output or --output)
    #[command(after_help = "Examples:
  apipool key export > keys.csv
  apipool key export --include-raw --output backup.csv   # file mode 0600")]
    Export {
        /// Include the raw keys (the file then holds secrets)
        #[arg(long)]
        include_raw: bool,
        /// Write to this file (mode 0600) instead of standard output
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Replace a key's secret (from --key-stdin or APIPOOL_KEY)
    #[command(
        after_help = "Example:\n  printf '%s' \"$NEW\" | apipool key rotate openai-1 --key-stdin"
    )]
    Rotate {
        identifier: String,
        #[command(flatten)]
        secret: SecretInput,
    },
    /// Check a key against its upstream now
    #[command(after_help = "Example:\n  apipool key verify openai-1")]
    Verify { identifier: String },
    /// Enable a key (pools use it again)
    #[command(after_help = "Example:\n  apipool key enable openai-1")]
    Enable { identifier: String },
    /// Disable a key (pools stop using it)
    #[command(after_help = "Example:\n  apipool key disable openai-1")]
    Disable { identifier: String },
    /// Delete a key (and its pool memberships)
    #[command(after_help = "Example:\n  apipool key delete openai-1")]
    Delete { identifier: String },
}

const KEY_COLUMNS: &[(&str, &str)] = &[
    ("IDENTIFIER", "identifier"),
    ("ALIAS", "alias"),
    ("ACTIVE", "is_active"),
    ("ARCHIVED", "is_archived"),
    ("VERIFIED", "verification_status"),
    ("TAGS", "tags"),
];

const KEY_FIELDS: &[&str] = &[
    "identifier",
    "alias",
    "description",
    "tags",
    "is_active",
    "is_archived",
    "verification_status",
    "last_verified_at",
    "client_config",
    "created_at",
    "updated_at",
];

pub(crate) async fn key(a: KeyArgs) -> CliResult {
    let out = a.common.out();
    // Read secrets before any network call, so a missing one fails fast.
    let cmd = a.command;
    with_api(&a.common, async |api| match cmd {
        KeyCommand::Add {
            identifier,
            secret,
            alias,
            tags,
            description,
            client_config,
        } => {
            let raw = secret.read()?;
            let mut body = json!({ "identifier": identifier, "raw_key": raw, "tags": tags });
            put_opt(&mut body, "alias", alias.map(Value::from));
            put_opt(&mut body, "description", description.map(Value::from));
            put_opt(
                &mut body,
                "client_config",
                client_config
                    .map(|c| parse_json("--client-config", &c))
                    .transpose()?,
            );
            let k = api.json(Method::POST, &["keys"], &[], Some(&body)).await?;
            out.emit(&k, |k| {
                format!("key {} added\n", output::cell(&k["identifier"]))
            });
            Ok(())
        }
        KeyCommand::List { tag, search } => {
            let mut q = Vec::new();
            if let Some(t) = tag {
                q.push(("tag", t));
            }
            if let Some(s) = search {
                q.push(("search", s));
            }
            let items = api.all_pages(&["keys"], &q).await?;
            out.emit(&Value::Array(items), |v| {
                table(v.as_array().map_or(&[], Vec::as_slice), KEY_COLUMNS)
            });
            Ok(())
        }
        KeyCommand::Show { identifier } => {
            let k = api.get(&["keys", &identifier], &[]).await?;
            out.emit(&k, |k| fields(k, KEY_FIELDS));
            Ok(())
        }
        KeyCommand::Import { file } => {
            let keys = read_key_file(&file)?;
            let n = keys.len();
            let report = api
                .json(
                    Method::POST,
                    &["keys", "import"],
                    &[],
                    Some(&json!({ "keys": keys })),
                )
                .await?;
            out.emit(&report, |r| {
                let rows = r["results"].as_array().map_or(&[][..], Vec::as_slice);
                format!(
                    "{}imported {} of {n} keys\n",
                    table(rows, &[("IDENTIFIER", "identifier"), ("STATUS", "status")]),
                    output::cell(&r["imported"])
                )
            });
            Ok(())
        }
        KeyCommand::Export {
            include_raw,
            output,
        } => {
            let resp = api
                .send(
                    Method::GET,
                    &["keys", "export"],
                    &[("include_raw", include_raw.to_string())],
                    None,
                )
                .await?;
            let csv = resp
                .text()
                .await
                .map_err(|e| Failure::error(format!("reading the export: {e}")))?;
            match output {
                Some(path) => {
                    write_private(&path, csv.as_bytes())?;
                    eprintln!(
                        "exported {} keys to {}",
                        csv.lines().count().saturating_sub(1),
                        path.display()
                    );
                }
                None => print!("{csv}"),
            }
            Ok(())
        }
        KeyCommand::Rotate { identifier, secret } => {
            let raw = secret.read()?;
            let k = api
                .json(
                    Method::PATCH,
                    &["keys", &identifier, "rotate"],
                    &[],
                    Some(&json!({ "new_raw_key": raw })),
                )
                .await?;
            out.emit(&k, |k| {
                format!("key {} rotated\n", output::cell(&k["identifier"]))
            });
            Ok(())
        }
        KeyCommand::Verify { identifier } => {
            let v = api
                .json(Method::POST, &["keys", &identifier, "verify"], &[], None)
                .await?;
            out.emit(&v, |v| {
                format!(
                    "key {}: {} ({})\n",
                    output::cell(&v["identifier"]),
                    output::cell(&v["verification_status"]),
                    output::cell(&v["detail"])
                )
            });
            Ok(())
        }
        KeyCommand::Enable { identifier } => set_key_active(api, out, &identifier, true).await,
        KeyCommand::Disable { identifier } => set_key_active(api, out, &identifier, false).await,
        KeyCommand::Delete { identifier } => {
            let v = api
                .json(Method::DELETE, &["keys", &identifier], &[], None)
                .await?;
            out.emit(&json!({ "deleted": identifier, "answer": v }), |_| {
                format!("key {identifier} deleted\n")
            });
            Ok(())
        }
    })
    .await
}

async fn set_key_active(api: &Api, out: Out, identifier: &str, active: bool) -> CliResult {
    let k = api
        .json(
            Method::PUT,
            &["keys", identifier],
            &[],
            Some(&json!({ "is_active": active })),
        )
        .await?;
    out.emit(&k, |k| {
        format!(
            "key {} {}\n",
            output::cell(&k["identifier"]),
            if active { "enabled" } else { "disabled" }
        )
    });
    Ok(())
}

fn put_opt(body: &mut Value, name: &str, v: Option<Value>) {
    if let (Some(v), Some(o)) = (v, body.as_object_mut()) {
        o.insert(name.to_owned(), v);
    }
}

fn parse_json(flag: &str, text: &str) -> CliResult<Value> {
    serde_json::from_str(text).map_err(|e| Failure::error(format!("{flag} is not valid JSON: {e}")))
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> CliResult {
    use std::io::Write as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .context(|| format!("cannot write {}", path.display()))
}

/// Keys from a CSV, JSON array or JSON-lines file, as `POST /keys/import` items.
fn read_key_file(path: &std::path::Path) -> CliResult<Vec<Value>> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context(|| "cannot read standard input".to_owned())?;
        s
    } else {
        std::fs::read_to_string(path).context(|| format!("cannot read {}", path.display()))?
    };
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(trimmed).map_err(|e| {
            Failure::error(format!("{}: not a JSON array of keys: {e}", path.display()))
        })?;
        return Ok(v);
    }
    if trimmed.starts_with('{') {
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    Failure::error(format!(
                        "{} line {}: not a JSON object: {e}",
                        path.display(),
                        i + 1
                    ))
                })
            })
            .collect();
    }
    keys_from_csv(&text).map_err(|e| Failure::error(format!("{}: {e}", path.display())))
}

fn keys_from_csv(text: &str) -> Result<Vec<Value>, String> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let headers = r
        .headers()
        .map_err(|e| format!("bad CSV header: {e}"))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(id_col), Some(raw_col)) = (col("identifier"), col("raw_key")) else {
        return Err(
            "the CSV needs `identifier` and `raw_key` columns (export with --include-raw)"
                .to_owned(),
        );
    };
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| format!("CSV row {}: {e}", i + 2))?;
        let get = |c: Option<usize>| c.and_then(|c| rec.get(c)).filter(|s| !s.is_empty());
        let mut o = Map::new();
        o.insert(
            "identifier".to_owned(),
            get(Some(id_col)).unwrap_or_default().into(),
        );
        o.insert(
            "raw_key".to_owned(),
            get(Some(raw_col)).unwrap_or_default().into(),
        );
        for name in ["alias", "description"] {
            if let Some(v) = get(col(name)) {
                o.insert(name.to_owned(), v.into());
            }
        }
        if let Some(tags) = get(col("tags")) {
            let list: Vec<String> = serde_json::from_str(tags)
                .unwrap_or_else(|_| tags.split(',').map(|t| t.trim().to_owned()).collect());
            o.insert("tags".to_owned(), json!(list));
        }
        if let Some(cc) = get(col("client_config")) {
            let v: Value = serde_json::from_str(cc)
                .map_err(|e| format!("CSV row {}: client_config is not JSON: {e}", i + 2))?;
            o.insert("client_config".to_owned(), v);
        }
        out.push(Value::Object(o));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// pool

/// `apipool pool ...`.
#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create a pool
    #[command(after_help = "Examples:
  apipool pool create prices --key k1 --key k2 --upstream-url https://api.example --rate-limit 20 --rate-interval 1
  apipool pool create search --strategy round_robin --config '{\"timeout\": 10, \"max_retries\": 2}'")]
    Create {
        /// The pool's identifier
        identifier: String,
        /// Display name [default: the identifier]
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// random, round_robin or least_used
        #[arg(long)]
        strategy: Option<String>,
        /// Member keys (repeat)
        #[arg(long = "key")]
        keys: Vec<String>,
        /// The upstream the transparent proxy calls (http(s)://host[:port][/prefix])
        #[arg(long)]
        upstream_url: Option<String>,
        /// Where the proxy puts the key: bearer, header:NAME or query:NAME
        #[arg(long, requires = "upstream_url")]
        upstream_auth: Option<String>,
        /// The whole pool_config as JSON
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// pool_config.rate_limit: calls per key per --rate-interval
        #[arg(long)]
        rate_limit: Option<u32>,
        /// pool_config.rate_limit_interval in seconds
        #[arg(long)]
        rate_interval: Option<f64>,
    },
    /// List your pools
    #[command(after_help = "Example:\n  apipool pool list")]
    List,
    /// Show a pool and its members
    #[command(after_help = "Example:\n  apipool pool show prices")]
    Show { pool: String },
    /// Add keys to a pool
    #[command(after_help = "Example:\n  apipool pool add-members prices k3 k4 --priority 1")]
    AddMembers {
        pool: String,
        /// Key identifiers
        #[arg(required = true)]
        keys: Vec<String>,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        #[arg(long, default_value_t = 1)]
        weight: i64,
    },
    /// Remove a key from a pool
    #[command(after_help = "Example:\n  apipool pool remove-member prices k3")]
    RemoveMember { pool: String, key: String },
    /// Read or change a pool's configuration
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Key counts of a pool (available, archived, inactive, verification)
    #[command(after_help = "Example:\n  apipool pool status prices")]
    Status { pool: String },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the pool's configuration (the SDK's view: strategy and pool_config)
    #[command(after_help = "Example:\n  apipool pool config get prices --json")]
    Get { pool: String },
    /// Change pool_config fields (FIELD=VALUE; values are JSON, else strings), or replace it
    /// with --replace JSON
    #[command(after_help = "Examples:
  apipool pool config set prices rate_limit=20 rate_limit_interval=1 max_retries=2
  apipool pool config set prices --strategy least_used
  apipool pool config set prices --replace '{\"timeout\": 10}'")]
    Set {
        pool: String,
        /// FIELD=VALUE pairs merged into the current pool_config
        #[arg(value_name = "FIELD=VALUE")]
        pairs: Vec<String>,
        /// Replace the whole pool_config with this JSON
        #[arg(long, value_name = "JSON", conflicts_with = "pairs")]
        replace: Option<String>,
        /// Also change the rotation strategy
        #[arg(long)]
        strategy: Option<String>,
    },
}

const POOL_COLUMNS: &[(&str, &str)] = &[
    ("IDENTIFIER", "identifier"),
    ("NAME", "name"),
    ("STRATEGY", "rotation_strategy"),
    ("MEMBERS", "member_count"),
    ("ACTIVE", "is_active"),
];

pub(crate) async fn pool(a: PoolArgs) -> CliResult {
    let out = a.common.out();
    let cmd = a.command;
    with_api(&a.common, async |api| match cmd {
        PoolCommand::Create {
            identifier,
            name,
            description,
            strategy,
            keys,
            upstream_url,
            upstream_auth,
            config,
            rate_limit,
            rate_interval,
        } => {
            let mut cfg = match config {
                Some(c) => parse_json("--config", &c)?,
                None => json!({}),
            };
            if let Some(o) = cfg.as_object_mut() {
                if let Some(r) = rate_limit {
                    o.insert("rate_limit".to_owned(), r.into());
                }
                if let Some(i) = rate_interval {
                    o.insert("rate_limit_interval".to_owned(), i.into());
                }
            }
            let mut body = json!({
                "identifier": identifier,
                "name": name.unwrap_or_else(|| identifier.clone()),
                "key_identifiers": keys,
                "pool_config": cfg,
            });
            put_opt(&mut body, "description", description.map(Value::from));
            put_opt(&mut body, "rotation_strategy", strategy.map(Value::from));
            if let Some(url) = upstream_url {
                let mut up = json!({ "base_url": url });
                put_opt(&mut up, "auth", upstream_auth.map(Value::from));
                put_opt(&mut body, "upstream", Some(up));
            }
            let p = api.json(Method::POST, &["pools"], &[], Some(&body)).await?;
            out.emit(&p, |p| {
                format!(
                    "pool {} created with {} keys\n",
                    output::cell(&p["identifier"]),
                    output::cell(&p["member_count"])
                )
            });
            Ok(())
        }
        PoolCommand::List => {
            let items = api.all_pages(&["pools"], &[]).await?;
            out.emit(&Value::Array(items), |v| {
                table(v.as_array().map_or(&[], Vec::as_slice), POOL_COLUMNS)
            });
            Ok(())
        }
        PoolCommand::Show { pool } => {
            let p = api.get(&["pools", &pool], &[]).await?;
            out.emit(&p, |p| {
                let members = p["members"].as_array().map_or(&[][..], Vec::as_slice);
                format!(
                    "{}\nmembers:\n{}",
                    fields(
                        p,
                        &[
                            "identifier",
                            "name",
                            "description",
                            "rotation_strategy",
                            "is_active",
                            "member_count",
                            "upstream",
                            "pool_config",
                        ]
                    ),
                    table(
                        members,
                        &[
                            ("KEY", "key_identifier"),
                            ("ALIAS", "alias"),
                            ("PRIORITY", "priority"),
                            ("WEIGHT", "weight"),
                            ("ACTIVE", "is_active"),
                            ("VERIFIED", "verification_status"),
                        ]
                    )
                )
            });
            Ok(())
        }
        PoolCommand::AddMembers {
            pool,
            keys,
            priority,
            weight,
        } => {
            let body = json!({ "key_identifiers": keys, "priority": priority, "weight": weight });
            let v = api
                .json(Method::POST, &["pools", &pool, "members"], &[], Some(&body))
                .await?;
            out.emit(&v, |_| format!("added {} keys to {pool}\n", keys.len()));
            Ok(())
        }
        PoolCommand::RemoveMember { pool, key } => {
            let v = api
                .json(
                    Method::DELETE,
                    &["pools", &pool, "members", &key],
                    &[],
                    None,
                )
                .await?;
            out.emit(
                &json!({ "removed": key, "pool": pool, "answer": v }),
                |_| format!("removed {key} from {pool}\n"),
            );
            Ok(())
        }
        PoolCommand::Config {
            command: ConfigCommand::Get { pool },
        } => {
            let c = api.get(&["pools", &pool, "config"], &[]).await?;
            out.emit(&c, |c| {
                let mut s = fields(
                    c,
                    &[
                        "pool_identifier",
                        "client_type",
                        "rotation_strategy",
                        "reach_limit_exception",
                    ],
                );
                s.push_str("pool_config:\n");
                s.push_str(&serde_json::to_string_pretty(&c["pool_config"]).unwrap_or_default());
                s.push('\n');
                s
            });
            Ok(())
        }
        PoolCommand::Config {
            command:
                ConfigCommand::Set {
                    pool,
                    pairs,
                    replace,
                    strategy,
                },
        } => {
            let mut body = Map::new();
            if let Some(r) = replace {
                body.insert("pool_config".to_owned(), parse_json("--replace", &r)?);
            } else if !pairs.is_empty() {
                let current = api.get(&["pools", &pool], &[]).await?;
                let mut cfg = current["pool_config"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                for p in &pairs {
                    let (k, v) = p.split_once('=').ok_or_else(|| {
                        Failure::error(format!("{p:?} is not FIELD=VALUE (e.g. rate_limit=20)"))
                    })?;
                    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::from(v));
                    cfg.insert(k.trim().to_owned(), v);
                }
                body.insert("pool_config".to_owned(), Value::Object(cfg));
            }
            if let Some(s) = strategy {
                body.insert("rotation_strategy".to_owned(), s.into());
            }
            if body.is_empty() {
                return Err(Failure::error(
                    "nothing to change: give FIELD=VALUE pairs, --replace JSON or --strategy",
                ));
            }
            let p = api
                .json(
                    Method::PUT,
                    &["pools", &pool],
                    &[],
                    Some(&Value::Object(body)),
                )
                .await?;
            out.emit(&p, |p| {
                format!(
                    "pool {} updated; pool_config is now {}\n",
                    output::cell(&p["identifier"]),
                    p["pool_config"]
                )
            });
            Ok(())
        }
        PoolCommand::Status { pool } => {
            let s = api.get(&["pools", &pool, "status"], &[]).await?;
            out.emit(&s, |s| {
                fields(
                    s,
                    &[
                        "pool_identifier",
                        "is_active",
                        "total_keys",
                        "available_keys",
                        "archived_keys",
                        "inactive_keys",
                        "valid_keys",
                        "invalid_keys",
                        "unverified_keys",
                    ],
                )
            });
            Ok(())
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// user

/// `apipool user ...` (admin only).
#[derive(Debug, Args)]
pub(crate) struct UserArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user (admin; the password from APIPOOL_NEW_USER_PASSWORD or --password-stdin)
    #[command(after_help = "Example:
  printf '%s' \"$PW\" | apipool user add bob --email bob@example.com --password-stdin")]
    Add {
        username: String,
        #[arg(long)]
        email: String,
        /// The new user's password (prefer the environment variable or --password-stdin)
        #[arg(long, env = "APIPOOL_NEW_USER_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Read the password from standard input
        #[arg(long, conflicts_with = "password")]
        password_stdin: bool,
        /// Make the user an admin
        #[arg(long)]
        admin: bool,
    },
    /// List users (admin)
    #[command(after_help = "Example:\n  apipool user list")]
    List,
    /// Disable a user and revoke their logins (admin)
    #[command(after_help = "Example:\n  apipool user disable bob")]
    Disable { username: String },
    /// Enable a user again (admin)
    #[command(after_help = "Example:\n  apipool user enable bob")]
    Enable { username: String },
}

pub(crate) async fn user(a: UserArgs) -> CliResult {
    let out = a.common.out();
    let cmd = a.command;
    with_api(&a.common, async |api| match cmd {
        UserCommand::Add {
            username,
            email,
            password,
            password_stdin,
            admin,
        } => {
            let password = match (password, password_stdin) {
                (_, true) => read_stdin_secret("the password")?,
                (Some(p), false) => p,
                (None, false) => {
                    return Err(Failure::error(
                        "no password: pass --password-stdin or set APIPOOL_NEW_USER_PASSWORD",
                    ));
                }
            };
            let body = json!({
                "username": username,
                "email": email,
                "password": password,
                "role": if admin { "admin" } else { "user" },
            });
            let u = api
                .json(Method::POST, &["auth", "register"], &[], Some(&body))
                .await?;
            out.emit(&u, |u| {
                format!(
                    "user {} created ({})\n",
                    output::cell(&u["username"]),
                    output::cell(&u["role"])
                )
            });
            Ok(())
        }
        UserCommand::List => {
            let items = api.all_pages(&["users"], &[]).await?;
            out.emit(&Value::Array(items), |v| {
                table(
                    v.as_array().map_or(&[], Vec::as_slice),
                    &[
                        ("USERNAME", "username"),
                        ("EMAIL", "email"),
                        ("ROLE", "role"),
                        ("ACTIVE", "is_active"),
                        ("CREATED", "created_at"),
                    ],
                )
            });
            Ok(())
        }
        UserCommand::Disable { username } => set_user_active(api, out, &username, false).await,
        UserCommand::Enable { username } => set_user_active(api, out, &username, true).await,
    })
    .await
}

async fn set_user_active(api: &Api, out: Out, username: &str, active: bool) -> CliResult {
    let users = api.all_pages(&["users"], &[]).await?;
    let id = users
        .iter()
        .find(|u| u["username"] == username)
        .and_then(|u| u["id"].as_str())
        .ok_or_else(|| Failure::error(format!("user '{username}' not found")))?
        .to_owned();
    let u = api
        .json(
            Method::PATCH,
            &["users", &id],
            &[],
            Some(&json!({ "is_active": active })),
        )
        .await?;
    out.emit(&u, |u| {
        format!(
            "user {} {}\n",
            output::cell(&u["username"]),
            if active { "enabled" } else { "disabled" }
        )
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// stats

/// `apipool stats ...`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: StatsCommand,
}

#[derive(Debug, Subcommand)]
enum StatsCommand {
    /// Calls per key (or per status/method) over a window
    #[command(
        after_help = "Examples:\n  apipool stats usage prices\n  apipool stats usage prices --seconds 86400 --group-by status"
    )]
    Usage {
        pool: String,
        /// The window, in seconds back from now
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        /// key, status or method (the server's default: key)
        #[arg(long)]
        group_by: Option<String>,
    },
    /// Counts per time bucket
    #[command(
        after_help = "Example:\n  apipool stats timeline prices --seconds 86400 --interval hour"
    )]
    Timeline {
        pool: String,
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        /// minute, hour or day
        #[arg(long, default_value = "minute")]
        interval: String,
    },
    /// Recent calls (newest first)
    #[command(after_help = "Example:\n  apipool stats logs prices --status failed --page-size 20")]
    Logs {
        pool: String,
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        /// Only this key
        #[arg(long)]
        key: Option<String>,
        /// Only this status (success, failed, reach limit, ...)
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 1)]
        page: u32,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
    },
}

pub(crate) async fn stats(a: StatsArgs) -> CliResult {
    let out = a.common.out();
    let cmd = a.command;
    with_api(&a.common, async |api| match cmd {
        StatsCommand::Usage {
            pool,
            seconds,
            group_by,
        } => {
            let mut q = vec![("seconds", seconds.to_string())];
            if let Some(g) = group_by {
                q.push(("group_by", g));
            }
            let v = api.get(&["stats", &pool, "usage"], &q).await?;
            out.emit(&v, |v| {
                let items = v["items"].as_array().map_or(&[][..], Vec::as_slice);
                format!(
                    "{}total: {}\n",
                    table(items, &[("GROUP", "group"), ("COUNT", "count")]),
                    output::cell(&v["total"])
                )
            });
            Ok(())
        }
        StatsCommand::Timeline {
            pool,
            seconds,
            interval,
        } => {
            let q = [("seconds", seconds.to_string()), ("interval", interval)];
            let v = api.get(&["stats", &pool, "timeline"], &q).await?;
            out.emit(&v, |v| {
                let rows: Vec<Vec<String>> = v["buckets"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|b| {
                        vec![
                            output::cell(&b["start"]),
                            output::cell(&b["total"]),
                            output::cell(&b["success"]),
                            output::cell(&b["failed"]),
                            output::cell(&b["reach_limit"]),
                        ]
                    })
                    .collect();
                output::render(
                    ["START", "TOTAL", "SUCCESS", "FAILED", "REACH LIMIT"]
                        .map(str::to_owned)
                        .to_vec(),
                    &rows,
                )
            });
            Ok(())
        }
        StatsCommand::Logs {
            pool,
            seconds,
            key,
            status,
            page,
            page_size,
        } => {
            let mut q = vec![
                ("seconds", seconds.to_string()),
                ("page", page.to_string()),
                ("page_size", page_size.to_string()),
            ];
            if let Some(k) = key {
                q.push(("key_identifier", k));
            }
            if let Some(s) = status {
                q.push(("status", s));
            }
            let v = api.get(&["stats", &pool, "logs"], &q).await?;
            out.emit(&v, |v| {
                let items = v["items"].as_array().map_or(&[][..], Vec::as_slice);
                format!(
                    "{}{} of {} entries\n",
                    table(
                        items,
                        &[
                            ("FINISHED", "finished_at"),
                            ("KEY", "key_identifier"),
                            ("STATUS", "status"),
                            ("METHOD", "method"),
                            ("LATENCY MS", "latency_ms"),
                        ]
                    ),
                    items.len(),
                    output::cell(&v["total"])
                )
            });
            Ok(())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_import_reads_export_columns() {
        let csv = "identifier,alias,description,tags,client_config,is_active,raw_key\n\
                   k1,,,\"[\"\"a\"\",\"\"b\"\"]\",\"{\"\"base_url\"\":\"\"http://x\"\"}\",true,secret-1\n\
                   k2,Two,,,,true,secret-2\n";
        let keys = keys_from_csv(csv).unwrap();
        assert_eq!(keys[0]["identifier"], "k1");
        assert_eq!(keys[0]["raw_key"], "secret-1");
        assert_eq!(keys[0]["tags"], json!(["a", "b"]));
        assert_eq!(keys[0]["client_config"]["base_url"], "http://x");
        assert_eq!(keys[1]["alias"], "Two");
        assert!(keys[1].get("tags").is_none());
        assert!(keys_from_csv("identifier,alias\nk1,x\n").is_err());
    }
}
