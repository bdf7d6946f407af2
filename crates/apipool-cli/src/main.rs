//! The `apipool` command line.
//!
//! Run the server with zero set-up: `cargo run -p apipool-cli -- serve` (SQLite and the master key
//! in `./data`, listening on 127.0.0.1:8000; open <http://127.0.0.1:8000/docs>).
//!
//! Administer a server from a terminal: `apipool login`, then `key`, `pool`, `user`, `stats`
//! commands (tables by default, `--json` for scripts), and run durable batch jobs with
//! `apipool batch run` (progress, resume, graceful Ctrl-C).

/// mimalloc instead of the system allocator: a proxied request allocates a few hundred small
/// blocks on and across the runtime's threads, where glibc's allocator spent about a tenth of
/// the server's CPU time (docs/BENCHMARKS.md, "Proxy").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod api;
mod batch;
mod failure;
mod output;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use apipool_server::config::{ServeArgs, StorageArgs};
use clap::{Parser, Subcommand};

const EXIT_CODES: &str = "Exit codes: 0 success; 1 error (the server's message is printed, e.g. an unknown pool); \
2 bad command line; 3 a batch finished with failed items or malformed input lines; \
4 not logged in, wrong password or session refused; 130 a batch was interrupted (rerun it to resume).

Quick start:
  apipool serve                                              # a server with SQLite in ./data
  APIPOOL_PASSWORD=... apipool login --server http://127.0.0.1:8000 --username admin
  printf '%s' \"$KEY\" | apipool key add k1 --key-stdin
  apipool pool create prices --key k1 --upstream-url https://api.example
  apipool batch run --pool prices --input items.jsonl --output results.jsonl";

/// apipool: one pool of API keys with N× the quota.
#[derive(Debug, Parser)]
#[command(name = "apipool", version, about, propagate_version = true, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run apipool-server (SQLite in ./data by default; see --help for every option).
    Serve(ServeArgs),
    /// Operate the key vault of a server's database.
    Vault {
        #[command(subcommand)]
        command: VaultCommand,
    },
    /// Log in to a server and save the session (mode 0600) for the other commands
    Login(admin::LoginArgs),
    /// Revoke the saved session at the server and delete it
    Logout(admin::LogoutArgs),
    /// Show who the saved session belongs to
    Whoami(admin::WhoamiArgs),
    /// Manage your API keys (secrets are read from stdin or APIPOOL_KEY, never printed)
    Key(admin::KeyArgs),
    /// Manage pools: members, configuration, status
    Pool(admin::PoolArgs),
    /// Manage users (admin only)
    User(admin::UserArgs),
    /// Usage statistics of a pool
    Stats(admin::StatsArgs),
    /// Durable batch jobs through a pool (progress bar, resume, graceful Ctrl-C)
    Batch(batch::BatchArgs),
}

#[derive(Debug, Subcommand)]
enum VaultCommand {
    /// Generate a new master key and re-wrap every data key under it, online: running servers
    /// keep working. In key-file mode the file is updated in place; with APIPOOL_MASTER_KEY the
    /// new key is printed (or written to --new-key-file) and must replace the old one before the
    /// next restart.
    RotateMasterKey(RotateArgs),
}

#[derive(Debug, clap::Args)]
struct RotateArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// Seconds the old key's hand-over stays readable so running servers learn the new key
    /// (they poll every 5 s)
    #[arg(long, default_value_t = 10)]
    handoff_grace_secs: u64,
    /// Write the new key to this file (mode 0600) instead of printing it (env-key mode)
    #[arg(long)]
    new_key_file: Option<PathBuf>,
}

/// The async runtime. `serve` runs on one thread (the accept loop, the statistics writer,
/// background work; with `--workers 1` the requests too) and serves requests on its own
/// serving threads (one per core, or `--workers N`, each with its own runtime); the other
/// commands on one worker per core.
fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Serve(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server_side = matches!(cli.command, Command::Serve(_) | Command::Vault { .. });
    apipool_server::telemetry::init_logging(if server_side {
        "info,sqlx=warn"
    } else {
        "warn"
    });
    let runtime = match runtime_for(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if server_side {
        return match runtime.block_on(run(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:?}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(client(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {f}");
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Vault {
            command: VaultCommand::RotateMasterKey(args),
        } => rotate(args).await,
        _ => anyhow::bail!("not a server command"),
    }
}

/// The commands that talk to a server (or, for `batch run --keys-file`, to an upstream).
async fn client(command: Command) -> failure::CliResult {
    match command {
        Command::Login(a) => admin::login(a).await,
        Command::Logout(a) => admin::logout(a).await,
        Command::Whoami(a) => admin::whoami(a).await,
        Command::Key(a) => admin::key(a).await,
        Command::Pool(a) => admin::pool(a).await,
        Command::User(a) => admin::user(a).await,
        Command::Stats(a) => admin::stats(a).await,
        Command::Batch(a) => batch::batch(a).await,
        Command::Serve(_) | Command::Vault { .. } => Err(failure::Failure::error(
            "serve and vault run on the server side",
        )),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let app = apipool_server::startup::Application::build(config.clone()).await?;
    let addr = std::net::SocketAddr::new(config.bind.ip(), app.port());
    tracing::info!(
        %addr,
        data_dir = %config.data_dir.display(),
        "apipool-server listening; Swagger UI at http://{addr}/docs"
    );
    app.run_until_stopped().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let config = args.storage.load_config(&args.storage)?;
    apipool_server::startup::ensure_data_dir(&config)?;
    let db = apipool_server::db::Db::connect(&config.effective_database_url(), 2).await?;
    let source = apipool_server::startup::key_source(&config)?;
    let opts = apipool_server::vault::RotateOptions {
        handoff_grace: Duration::from_secs(args.handoff_grace_secs),
        new_key_file: args.new_key_file,
    };
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let report = apipool_server::vault::rotate_master_key(&db, &source, &opts, now).await?;
    println!(
        "master key rotated: version {} -> {}, {} data keys re-wrapped",
        report.old_version, report.new_version, report.rewrapped
    );
    if let Some(path) = &report.key_file {
        println!("the new master key is in {}", path.display());
    }
    if let Some(key) = &report.new_key_base64 {
        println!(
            "new master key (store it safely, it is shown once):\n{}",
            key.as_str()
        );
        println!(
            "set APIPOOL_MASTER_KEY to this value before restarting any server; the old key no longer opens anything"
        );
    }
    Ok(())
}
