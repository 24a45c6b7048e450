//! The `floodgate` command: run, check, demo, version.

/// mimalloc, told to give freed memory back to the OS at once: a traffic spike of 10,000
/// clients must not leave its peak behind as RSS (see README, Memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in the mimalloc 2.x option enum
/// (`mimalloc.h` of the bundled version; libmimalloc-sys does not name them).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn configure_allocator() {
    // SAFETY: mi_option_set only stores an integer option; prctl(PR_SET_THP_DISABLE) only sets a
    // flag of this process. Neither touches memory.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        // Transparent huge pages would grow RSS in 2 MiB steps for what are many small
        // allocations, and keep them after a spike.
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

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
    /// Print a floodgate.toml equivalent to a PgBouncer configuration (and list what could not
    /// be mapped, on stderr).
    ImportPgbouncer {
        /// pgbouncer.ini
        ini: PathBuf,
        /// userlist.txt (default: the ini's auth_file)
        userlist: Option<PathBuf>,
    },
    /// Exit 0 if the [metrics] endpoint at ADDR answers /healthz (a container HEALTHCHECK).
    Healthcheck {
        #[arg(default_value = "127.0.0.1:9187")]
        addr: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    configure_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "floodgate=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = load_for(&cli).and_then(|config| {
        let workers = config.as_ref().map_or(1, Config::worker_threads);
        runtime(workers)?.block_on(dispatch(cli, config))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floodgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration, for the commands that need one.
fn load_for(cli: &Cli) -> anyhow::Result<Option<Config>> {
    match cli.command {
        None | Some(Command::Run) | Some(Command::Check) => {
            let path = cli
                .config
                .as_ref()
                .context("no configuration file: pass --config FILE (see config/floodgate.toml)")?;
            Ok(Some(Config::load(path)?))
        }
        _ => Ok(None),
    }
}

/// One thread: a current-thread runtime, with no cross-thread wake-ups. More: a work-stealing
/// runtime with that many workers.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

async fn dispatch(cli: Cli, config: Option<Config>) -> anyhow::Result<()> {
    match (cli.command.unwrap_or(Command::Run), config) {
        (Command::Run, Some(config)) => run(config, cli.config.clone()).await,
        (Command::Check, Some(config)) => check(&config).await,
        (Command::Demo { listen }, _) => floodgate::demo::run(listen).await,
        (Command::Healthcheck { addr }, _) => healthcheck(addr),
        (Command::ImportPgbouncer { ini, userlist }, _) => {
            let imported = floodgate::import::import(&ini, userlist.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?;
            print!("{}", imported.toml);
            for line in &imported.unmapped {
                eprintln!("not mapped: {line}");
            }
            Ok(())
        }
        (Command::Version, _) => {
            println!("floodgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        (_, None) => anyhow::bail!("no configuration loaded"),
    }
}

async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    raise_open_files_limit(&config);
    // The same math as `floodgate check`, as a warning: the proxy runs either way.
    floodgate::shared::warn_connection_math(std::sync::Arc::new(config.clone()));
    let proxy = floodgate::Proxy::start_from(config, path).await?;
    proxy.run().await;
    tracing::info!("stopped");
    Ok(())
}

/// GET /healthz on `addr`; Ok when it answers 200.
fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        other => anyhow::bail!("{addr}/healthz answered {}", other.unwrap_or("nothing")),
    }
}

/// Raises the soft open-files limit to the hard one (every client and server connection is a
/// file descriptor) and warns when the configured connections cannot fit in it.
fn raise_open_files_limit(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let servers: usize = config
        .databases
        .values()
        .map(|db| config.pool_size(db))
        .sum::<usize>()
        * config.users.len().max(1);
    let needed = (config.floodgate.max_client_conn + servers + 64) as u64;
    if limit.rlim_cur < needed {
        tracing::warn!(
            open_files_limit = limit.rlim_cur,
            needed,
            "max_client_conn plus the server pools need more file descriptors than the open-files \
             limit allows: raise it (ulimit -n, LimitNOFILE=) or lower max_client_conn"
        );
    }
}

/// The connection math against every upstream; fails when a host is over `connection_budget`.
async fn check(config: &Config) -> anyhow::Result<()> {
    println!("configuration is valid");
    let g = &config.floodgate;
    for (name, db) in &config.databases {
        let reserve = db.reserve_pool_size.unwrap_or(g.reserve_pool_size);
        println!(
            "  [databases.{name}] {}:{} pool_size {} reserve_pool_size {reserve}",
            db.host,
            db.port,
            config.pool_size(db)
        );
    }
    let reports = floodgate::check::connection_math(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot do the connection math: {e}"))?;
    for report in &reports {
        println!("{report}");
    }
    let over = reports.iter().filter(|r| r.over_budget()).count();
    if over > 0 {
        anyhow::bail!(
            "{over} upstream host(s) over connection_budget: lower pool sizes, reserve or instances, or raise max_connections"
        );
    }
    Ok(())
}
