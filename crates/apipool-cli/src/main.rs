//! The `apipool` command line.
//!
//! Run the server with zero set-up: `cargo run -p apipool-cli -- serve` (SQLite and the master key
//! in `./data`, listening on 127.0.0.1:8000; open <http://127.0.0.1:8000/docs>).
//!
//! Subcommands are grouped so later ones (`login`, `key ...`, `pool ...`, `user ...`,
//! `stats ...`, `batch run`) slot into [`Command`] next to `serve` and `vault`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use apipool_server::config::{ServeArgs, StorageArgs};
use clap::{Parser, Subcommand};

/// apipool: one pool of API keys with N× the quota.
#[derive(Debug, Parser)]
#[command(name = "apipool", version, about, propagate_version = true)]
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    apipool_server::telemetry::init_logging("info,sqlx=warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Vault {
            command: VaultCommand::RotateMasterKey(args),
        } => rotate(args).await,
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
