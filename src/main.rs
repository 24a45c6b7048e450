//! The `floodgate` command: run, check, demo, version.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use floodgate::config::Config;

#[derive(Parser)]
#[command(
    name = "floodgate",
    version,
    about = "A transaction-pooling PostgreSQL proxy"
)]
struct Cli {
    /// Configuration file (TOML); runs the proxy when no subcommand is given.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the pools it defines.
    Check,
    /// Start a throwaway local PostgreSQL with Floodgate in front, until Ctrl-C.
    Demo {
        /// Address Floodgate listens on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "floodgate=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(dispatch(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floodgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(load(cli.config)?).await,
        Command::Check => check(&load(cli.config)?),
        Command::Demo { listen } => floodgate::demo::run(listen).await,
        Command::Version => {
            println!("floodgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let path =
        path.context("no configuration file: pass --config FILE (see config/floodgate.toml)")?;
    Ok(Config::load(&path)?)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let proxy = floodgate::Proxy::start(config).await?;
    floodgate::shutdown_signal().await;
    tracing::info!("shutting down: no new clients; waiting for transactions in flight");
    proxy.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Prints the pools and the most server connections they can open.
fn check(config: &Config) -> anyhow::Result<()> {
    println!("configuration is valid");
    let users = config.users.len().max(1);
    let mut total = 0;
    for (name, db) in &config.databases {
        let size = config.pool_size(db);
        // A pool per (database, user): without a fixed upstream user, every user may get one.
        let pools = if db.user.is_some() { 1 } else { users };
        total += size * pools;
        println!(
            "  [databases.{name}] {}:{} pool_size {size} x {pools} pool(s) = {} server connections",
            db.host,
            db.port,
            size * pools
        );
    }
    println!("at most {total} server connections in all");
    Ok(())
}
