//! Memory per client: Floodgate against PgBouncer, side by side (GitHub issue 12, "bounded memory
//! per client").
//!
//! ```sh
//! cargo build --release                 # the bench measures this binary, it builds nothing
//! cargo bench --bench memory
//! MEM_BENCH_CLIENTS=1000 MEM_BENCH_STORM=2000 cargo bench --bench memory   # a quick run
//! ```
//!
//! Why a separate process: the proxies run as subprocesses (Floodgate from `FLOODGATE_BIN` or
//! `target/release/floodgate`, PgBouncer from `PGBOUNCER_BIN` or `/usr/sbin/pgbouncer`, as the
//! `postgres` OS user when we are root, since it refuses root) and what is measured is their
//! resident set from `/proc/PID/status`, so the clients this process runs (raw protocol over tokio
//! sockets, the cheapest client there is) never count. Every scenario gets a fresh proxy process,
//! so one scenario's leftovers cannot show up in the next, and each starts from a baseline taken
//! after a warm-up that opened the whole pool: server connections are a fixed cost, not a
//! per-client one.
//!
//! Scenarios (each against both proxies, pool 10, transaction mode, trust authentication):
//! - idle clients (`MEM_BENCH_CLIENTS`, default 1000,5000,10000): RSS growth per client once all
//!   have logged in, again once each has run `SELECT 1`, and what is left once all have gone;
//! - storm (`MEM_BENCH_STORM`, default 10000): that many clients connect at once and each runs
//!   one `SELECT 1` through the pool of 10; peak RSS (VmRSS sampled every 10 ms, and VmHWM);
//! - one client pipelining without reading: `MEM_BENCH_SYNCS` (default 1,000,000) Syncs;
//!   `MEM_BENCH_PIPELINE_MB` (default 150) MB of `Close S "a"` + `Parse "a" "SELECT 1"` pairs
//!   without a Sync; one Bind with a `MEM_BENCH_BIND_MB` (default 100) MB text parameter. A
//!   sender stops when a write makes no progress for 2 s: that is the proxy applying
//!   backpressure, the behaviour we want, and the table says how much it had accepted.
//!
//! `MEM_BENCH_PROXIES=floodgate` (or `pgbouncer`) measures one proxy only.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use floodgate::pgcluster::{ClusterOptions, HbaAuth, PgCluster};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Server connections per pool, for both proxies.
const POOL: usize = 10;
/// `max_client_conn` of both proxies: above the largest scenario, so no client is refused.
const MAX_CLIENT_CONN: usize = 20_000;
/// Logins in flight at once when filling up with idle clients (the storm has no such limit).
const LOGIN_CONCURRENCY: usize = 256;
/// Pause before reading RSS, so the proxy has finished reacting (freeing, closing) first.
const SETTLE: Duration = Duration::from_secs(2);
/// A pipelining sender that makes no progress for this long is being held back by the proxy.
const STALL: Duration = Duration::from_secs(2);
/// Longest any one scenario may take before it is reported as failed.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(900);
/// How often the peak sampler reads VmRSS.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// The database and user the clients log in as (trusted everywhere).
const DB: &str = "bench";

// ---------------------------------------------------------------------------------------------
// Settings and the programs under test.
// ---------------------------------------------------------------------------------------------

/// The proxies this bench knows how to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Floodgate,
    PgBouncer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Floodgate => "Floodgate",
            Kind::PgBouncer => "PgBouncer",
        }
    }
}

/// What to run, from the environment (every knob has a default that matches issue 12).
struct Settings {
    idle_clients: Vec<usize>,
    storm_clients: usize,
    syncs: u64,
    pipeline_bytes: u64,
    bind_bytes: u64,
    proxies: Vec<Kind>,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let number = |name: &str, default: u64| -> Result<u64, String> {
            match var(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("{name}={v:?} is not a number")),
            }
        };
        let idle_clients = match var("MEM_BENCH_CLIENTS") {
            None => vec![1000, 5000, 10_000],
            Some(v) => v
                .split(',')
                .map(|n| n.trim().replace('_', "").parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("MEM_BENCH_CLIENTS={v:?}: expected e.g. 1000,5000,10000"))?,
        };
        let proxies = match var("MEM_BENCH_PROXIES") {
            None => vec![Kind::Floodgate, Kind::PgBouncer],
            Some(v) => v
                .split(',')
                .map(|p| match p.trim().to_ascii_lowercase().as_str() {
                    "floodgate" => Ok(Kind::Floodgate),
                    "pgbouncer" => Ok(Kind::PgBouncer),
                    other => Err(format!(
                        "MEM_BENCH_PROXIES: unknown proxy {other:?} (floodgate, pgbouncer)"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let settings = Settings {
            idle_clients,
            storm_clients: number("MEM_BENCH_STORM", 10_000)? as usize,
            syncs: number("MEM_BENCH_SYNCS", 1_000_000)?,
            pipeline_bytes: number("MEM_BENCH_PIPELINE_MB", 150)? * 1_000_000,
            bind_bytes: number("MEM_BENCH_BIND_MB", 100)? * 1_000_000,
            proxies,
        };
        let most = settings
            .idle_clients
            .iter()
            .chain([&settings.storm_clients])
            .max()
            .copied()
            .unwrap_or(0);
        if most + 100 > MAX_CLIENT_CONN {
            return Err(format!(
                "at most {} clients per scenario (max_client_conn {MAX_CLIENT_CONN})",
                MAX_CLIENT_CONN - 100
            ));
        }
        Ok(settings)
    }
}

/// Where the two proxies' programs are, and whom PgBouncer runs as.
struct Programs {
    floodgate: PathBuf,
    pgbouncer: PathBuf,
    /// `(uid, gid)` of the `postgres` OS user when we are root (PgBouncer refuses root).
    run_as: Option<(u32, u32)>,
}

impl Programs {
    fn find(settings: &Settings) -> Result<Programs, String> {
        let floodgate = match std::env::var_os("FLOODGATE_BIN") {
            Some(path) => PathBuf::from(path),
            None => {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
                target.join("release").join("floodgate")
            }
        };
        if settings.proxies.contains(&Kind::Floodgate) && !floodgate.is_file() {
            return Err(format!(
                "no Floodgate binary at {}: run `cargo build --release` first (or set \
                 FLOODGATE_BIN); this bench measures a release build and builds nothing itself",
                floodgate.display()
            ));
        }
        let pgbouncer = std::env::var_os("PGBOUNCER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"));
        if settings.proxies.contains(&Kind::PgBouncer) && !pgbouncer.is_file() {
            return Err(format!(
                "no PgBouncer at {}: install it (apt-get install pgbouncer), set PGBOUNCER_BIN, \
                 or measure Floodgate alone with MEM_BENCH_PROXIES=floodgate",
                pgbouncer.display()
            ));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_ids().ok_or(
                "running as root but there is no `postgres` OS user to run PgBouncer as \
                 (it refuses root): install the Debian package `postgresql`",
            )?)
        } else {
            None
        };
        Ok(Programs {
            floodgate,
            pgbouncer,
            run_as,
        })
    }

    fn version(&self, kind: Kind) -> String {
        let program = match kind {
            Kind::Floodgate => &self.floodgate,
            Kind::PgBouncer => &self.pgbouncer,
        };
        let arg = if kind == Kind::Floodgate {
            "version"
        } else {
            "--version"
        };
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "(version unknown)".into())
    }
}

/// `(uid, gid)` of the `postgres` OS user.
fn postgres_ids() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); getpwnam_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is the buffer's real size.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// Raises this process's soft open-files limit to the hard one: 10,000 clients are 10,000
/// sockets here, and the proxies (which inherit the limit; Floodgate raises its own too) need as
/// many again plus their servers.
fn raise_open_files_limit(needed: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(format!("getrlimit: {}", io::Error::last_os_error()));
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
    if limit.rlim_cur < needed {
        return Err(format!(
            "the open-files limit is {} but this run needs about {needed} (one socket per client \
             here and in the proxy): raise the hard limit (ulimit -Hn, LimitNOFILE=) or scale \
             down with MEM_BENCH_CLIENTS / MEM_BENCH_STORM",
            limit.rlim_cur
        ));
    }
    Ok(limit.rlim_cur)
}

// ---------------------------------------------------------------------------------------------
// Cleanup on Ctrl-C: drops do not run when a signal ends the process.
// ---------------------------------------------------------------------------------------------

/// Temporary directories of running proxies, removed if the bench is interrupted. (The proxies
/// themselves die with us: they are started with a parent-death signal.)
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// On SIGINT or SIGTERM: stop PostgreSQL, delete its directory and the proxies' ones, exit 130.
fn cleanup_on_signal(rt: &tokio::runtime::Runtime, cluster: Arc<PgCluster>) {
    rt.spawn(async move {
        floodgate::shutdown_signal().await;
        eprintln!("interrupted: stopping PostgreSQL and the proxies");
        let _ = cluster.stop();
        let _ = fs::remove_dir_all(cluster.socket_dir());
        for dir in SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
}

// ---------------------------------------------------------------------------------------------
// Proxy processes.
// ---------------------------------------------------------------------------------------------

/// A running proxy; killed (SIGKILL: nothing of it needs to survive) and reaped on drop.
struct ProxyProcess {
    kind: Kind,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `kind` in front of `cluster` on a free port (retrying on another port if the one
    /// chosen was taken in between) and waits until it accepts connections.
    fn start(kind: Kind, programs: &Programs, cluster: &PgCluster) -> Result<Self, String> {
        let mut last = String::new();
        for _attempt in 0..3 {
            let mut proxy = Self::spawn(kind, programs, cluster)?;
            match proxy.wait_listening() {
                Ok(()) => return Ok(proxy),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn spawn(kind: Kind, programs: &Programs, cluster: &PgCluster) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("floodgate-membench-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        // PgBouncer runs as `postgres` and must read its files in here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", dir.path().display()))?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let write = |name: &str, text: &str| -> Result<PathBuf, String> {
            let path = dir.path().join(name);
            fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            Ok(path)
        };
        let mut cmd = match kind {
            Kind::Floodgate => {
                let config = write(
                    "floodgate.toml",
                    &format!(
                        "[floodgate]\nlisten = \"{addr}\"\nauth_type = \"trust\"\n\
                         pool_mode = \"transaction\"\ndefault_pool_size = {POOL}\n\
                         max_client_conn = {MAX_CLIENT_CONN}\nquery_wait_timeout = \"600s\"\n\
                         client_login_timeout = \"600s\"\n\n\
                         [[users]]\nname = \"{DB}\"\npassword = \"{DB}\"\n\n\
                         [databases.{DB}]\nhost = \"{}\"\nport = {}\ndbname = \"{DB}\"\n",
                        cluster.host(),
                        cluster.port()
                    ),
                )?;
                let mut cmd = Command::new(&programs.floodgate);
                cmd.arg("--config")
                    .arg(config)
                    // One line per client would cost the proxy CPU, not memory: keep it quiet.
                    .env("RUST_LOG", "floodgate=warn");
                cmd
            }
            Kind::PgBouncer => {
                // trust still requires the user to be listed in the auth_file.
                let userlist = write("userlist.txt", &format!("\"{DB}\" \"{DB}\"\n"))?;
                // listen_backlog as tokio's listener (Floodgate's) has it, so a storm meets
                // the same accept queue; no log file, no pid file: nothing to write but stderr.
                let ini = write(
                    "pgbouncer.ini",
                    &format!(
                        "[databases]\n{DB} = host={} port={} dbname={DB}\n\n\
                         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                         unix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                         pool_mode = transaction\ndefault_pool_size = {POOL}\n\
                         max_client_conn = {MAX_CLIENT_CONN}\nlisten_backlog = 1024\n\
                         query_wait_timeout = 600\nclient_login_timeout = 600\n\
                         log_connections = 0\nlog_disconnections = 0\n",
                        cluster.host(),
                        cluster.port(),
                        userlist.display()
                    ),
                )?;
                let mut cmd = Command::new(&programs.pgbouncer);
                cmd.arg(ini);
                if let Some((uid, gid)) = programs.run_as {
                    // std drops supplementary groups, then sets gid and uid, before pre_exec.
                    cmd.uid(uid).gid(gid);
                }
                cmd
            }
        };
        let log = dir
            .path()
            .join(format!("{}.log", kind.name().to_lowercase()));
        let log_file = fs::File::create(&log).map_err(|e| format!("creating the log: {e}"))?;
        let log_err = log_file.try_clone().map_err(|e| format!("log file: {e}"))?;
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err));
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kind.name()))?;
        SCRATCH
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.path().to_path_buf());
        Ok(ProxyProcess {
            kind,
            child,
            addr,
            log,
            dir,
        })
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited before listening on {} ({status}):\n{}",
                    self.kind.name(),
                    self.addr,
                    self.log_tail()
                ));
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "{} did not listen on {} within 20 s:\n{}",
            self.kind.name(),
            self.addr,
            self.log_tail()
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// RSS and high-water mark now; an error naming the log when the proxy is gone.
    fn mem(&mut self) -> Result<Mem, String> {
        self.alive()?;
        Mem::of(self.pid())
    }

    /// Fails, with the proxy's last log lines, when it has exited (crashed, killed by OOM...).
    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}):\n{}",
                self.kind.name(),
                self.log_tail()
            )),
            Err(e) => Err(format!("waiting for {}: {e}", self.kind.name())),
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        SCRATCH
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != self.dir.path());
    }
}

/// Makes the child get SIGKILL when this process dies, even by a signal that skips our drops.
/// (Children are spawned from the main thread, which lives as long as the process: the signal
/// follows the thread that forked.)
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure only makes async-signal-safe system calls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would ever stop this child.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Memory readings.
// ---------------------------------------------------------------------------------------------

/// A process's resident set now (`VmRSS`) and its peak since it started (`VmHWM`), in KiB.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Mem {
    fn of(pid: u32) -> Result<Mem, String> {
        let path = format!("/proc/{pid}/status");
        let text = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .ok_or_else(|| format!("{path} has no {name} (has the process exited?)"))
        };
        Ok(Mem {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

/// Reads a process's VmRSS every [`SAMPLE_EVERY`] on its own thread and keeps the largest:
/// VmHWM cannot be reset, so a peak within a scenario needs sampling (VmHWM still catches
/// spikes shorter than the period, and is used when it rose during the scenario).
struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PeakSampler {
    fn start(pid: u32) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(mem) = Mem::of(pid) {
                    p.fetch_max(mem.rss_kib, Ordering::Relaxed);
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        PeakSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// The peak seen so far, in KiB.
    fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The peak RSS of a scenario: VmHWM if it rose past what it was at the baseline (so the peak
/// was in this scenario and VmHWM saw it exactly), else the sampled peak.
fn scenario_peak(base: Mem, sampled_kib: u64, now: Mem) -> u64 {
    let hwm = if now.hwm_kib > base.hwm_kib {
        now.hwm_kib
    } else {
        0
    };
    hwm.max(sampled_kib).max(now.rss_kib)
}

fn mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

fn growth_kib(base: Mem, kib: u64) -> i64 {
    kib as i64 - base.rss_kib as i64
}

// ---------------------------------------------------------------------------------------------
// The raw protocol client.
// ---------------------------------------------------------------------------------------------

/// A typed frontend message: type byte, length, body.
fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

/// A StartupMessage (protocol 3.0) for user and database [`DB`].
fn startup_message() -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", DB), ("database", DB)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend(body);
    msg
}

/// A simple Query.
fn query_message(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// `Parse name sql` with no parameter types.
fn parse_message(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for s in [name, sql] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &body)
}

/// `Close S name`.
fn close_statement_message(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    message(b'C', &body)
}

fn sync_message() -> Vec<u8> {
    message(b'S', &[])
}

/// Reads one backend message into `body`, returning its type. Messages over 16 MiB are refused:
/// nothing these clients ask for is that large except the Bind scenario's row, read apart.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R, body: &mut Vec<u8>) -> io::Result<u8> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if !(4..=16 << 20).contains(&len) {
        return Err(io::Error::other(format!(
            "backend message {:?} has length {len}",
            header[0] as char
        )));
    }
    body.resize(len as usize - 4, 0);
    r.read_exact(body).await?;
    Ok(header[0])
}

/// SQLSTATE and message of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let mut code = String::new();
    let mut text = String::new();
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            Some((b'M', v)) => text = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    format!("{code} {text}")
}

/// Reads until ReadyForQuery; an ErrorResponse on the way is an error.
async fn until_ready<R: AsyncRead + Unpin>(r: &mut R, what: &str) -> Result<(), String> {
    let mut body = Vec::new();
    loop {
        match read_message(r, &mut body).await {
            Ok(b'Z') => return Ok(()),
            Ok(b'E') => return Err(format!("{what}: {}", error_text(&body))),
            Ok(_) => {}
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// Connects and logs in (trust), reading through the first ReadyForQuery.
async fn login(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .write_all(&startup_message())
        .await
        .map_err(|e| format!("sending the startup message: {e}"))?;
    until_ready(&mut stream, "login").await?;
    Ok(stream)
}

/// Runs one simple query and reads its answer through ReadyForQuery.
async fn simple_query(stream: &mut TcpStream, sql: &str) -> Result<(), String> {
    stream
        .write_all(&query_message(sql))
        .await
        .map_err(|e| format!("sending {sql}: {e}"))?;
    until_ready(stream, sql).await
}

/// Says goodbye (Terminate) and closes, as a polite client does.
async fn terminate(mut stream: TcpStream) {
    let _ = stream.write_all(&message(b'X', &[])).await;
    let _ = stream.shutdown().await;
}

/// `n` logged-in clients, at most [`LOGIN_CONCURRENCY`] logging in at a time.
async fn login_many(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>, String> {
    let gate = Arc::new(Semaphore::new(LOGIN_CONCURRENCY));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            login(addr).await
        });
    }
    let mut clients = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        clients.push(joined.map_err(|e| format!("login task: {e}"))??);
    }
    Ok(clients)
}

/// Each client runs `SELECT 1` once ([`LOGIN_CONCURRENCY`] at a time); the clients come back.
async fn query_each(clients: Vec<TcpStream>) -> Result<Vec<TcpStream>, String> {
    let gate = Arc::new(Semaphore::new(LOGIN_CONCURRENCY));
    let mut set = JoinSet::new();
    for mut stream in clients {
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            simple_query(&mut stream, "SELECT 1").await?;
            Ok::<_, String>(stream)
        });
    }
    let mut back = Vec::new();
    while let Some(joined) = set.join_next().await {
        back.push(joined.map_err(|e| format!("query task: {e}"))??);
    }
    Ok(back)
}

async fn terminate_all(clients: Vec<TcpStream>) {
    let mut set = JoinSet::new();
    for stream in clients {
        set.spawn(terminate(stream));
    }
    while set.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------------------------------

/// One number of the table.
struct Measure {
    label: String,
    target: &'static str,
    value: f64,
}

/// What one scenario run found; measures are kept even if the scenario fails part-way.
#[derive(Default)]
struct Found {
    measures: Vec<Measure>,
    notes: Vec<String>,
}

impl Found {
    fn put(&mut self, label: impl Into<String>, target: &'static str, value: f64) {
        let label = label.into();
        eprintln!("    {label}: {value:.2}");
        self.measures.push(Measure {
            label,
            target,
            value,
        });
    }

    fn note(&mut self, note: String) {
        eprintln!("    note: {note}");
        self.notes.push(note);
    }
}

/// What to measure, each against a fresh proxy process.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    Idle(usize),
    Storm(usize),
    Syncs(u64),
    ClosePairs(u64),
    Bind(u64),
}

impl Scenario {
    fn title(self) -> String {
        match self {
            Scenario::Idle(n) => format!("{n} idle clients"),
            Scenario::Storm(n) => format!("storm of {n} clients x SELECT 1, pool {POOL}"),
            Scenario::Syncs(n) => format!("{n} Syncs sent without reading"),
            Scenario::ClosePairs(b) => {
                format!(
                    "{} MB of Close/Parse pairs, no Sync, no reading",
                    b / 1_000_000
                )
            }
            Scenario::Bind(b) => format!("one Bind with a {} MB parameter", b / 1_000_000),
        }
    }
}

/// The shared context of every scenario.
struct Bench<'a> {
    cluster: &'a Arc<PgCluster>,
    programs: &'a Programs,
}

impl Bench<'_> {
    async fn run(&self, kind: Kind, scenario: Scenario) -> Found {
        let mut found = Found::default();
        let mut proxy = match ProxyProcess::start(kind, self.programs, self.cluster) {
            Ok(p) => p,
            Err(e) => {
                found.note(format!("could not start: {e}"));
                return found;
            }
        };
        let body = async {
            let servers = warm_up(proxy.addr, self.cluster).await?;
            if servers < POOL {
                found.note(format!(
                    "warm-up opened {servers} of {POOL} server connections: the baseline \
                     misses the rest"
                ));
            }
            match scenario {
                Scenario::Idle(n) => idle(&mut proxy, n, &mut found).await,
                Scenario::Storm(n) => storm(&mut proxy, n, &mut found).await,
                Scenario::Syncs(n) => syncs(&mut proxy, n, &mut found).await,
                Scenario::ClosePairs(b) => close_pairs(&mut proxy, b, &mut found).await,
                Scenario::Bind(b) => bind(&mut proxy, b, &mut found).await,
            }
        };
        let outcome = match tokio::time::timeout(SCENARIO_TIMEOUT, body).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("did not finish within {SCENARIO_TIMEOUT:?}")),
        };
        if let Err(e) = outcome {
            let e = match proxy.alive() {
                Ok(()) => e,
                Err(dead) => format!("{e}\n{dead}"),
            };
            found.note(format!("failed: {e}"));
        }
        drop(proxy);
        // The next proxy's warm-up counts server connections: let this one's close first.
        if let Err(e) = wait_no_backends(self.cluster).await {
            found.note(e);
        }
        found
    }
}

/// Server connections of user [`DB`] open on the cluster.
async fn backends(cluster: &Arc<PgCluster>) -> Result<usize, String> {
    let c = cluster.clone();
    let n = tokio::task::spawn_blocking(move || c.backend_count(DB, DB))
        .await
        .map_err(|e| format!("backend count task: {e}"))?
        .map_err(|e| format!("backend count: {e}"))?;
    Ok(n.max(0) as usize)
}

async fn wait_no_backends(cluster: &Arc<PgCluster>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = backends(cluster).await?;
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{n} server connections still open 30 s after the proxy died"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes the proxy open its whole pool (clients holding servers in `pg_sleep` at once) and
/// exercises login, query and logout once, so the baseline holds every fixed cost. Returns how
/// many server connections are open.
async fn warm_up(addr: SocketAddr, cluster: &Arc<PgCluster>) -> Result<usize, String> {
    let mut servers = 0;
    for _round in 0..5 {
        let mut set = JoinSet::new();
        for _ in 0..2 * POOL {
            set.spawn(async move {
                let mut stream = login(addr).await?;
                simple_query(&mut stream, "SELECT pg_sleep(0.2)").await?;
                terminate(stream).await;
                Ok::<_, String>(())
            });
        }
        while let Some(joined) = set.join_next().await {
            joined.map_err(|e| format!("warm-up task: {e}"))??;
        }
        servers = backends(cluster).await?;
        if servers >= POOL {
            break;
        }
    }
    tokio::time::sleep(SETTLE).await;
    Ok(servers)
}

/// Idle clients: KiB per client logged in, then after one query each; MiB left once all left.
async fn idle(proxy: &mut ProxyProcess, n: usize, found: &mut Found) -> Result<(), String> {
    let base = proxy.mem()?;
    let per_client = |mem: Mem| growth_kib(base, mem.rss_kib) as f64 / n as f64;
    let clients = login_many(proxy.addr, n).await?;
    tokio::time::sleep(SETTLE).await;
    let logged_in = proxy.mem()?;
    found.put(
        format!("{n} idle clients logged in: KiB per client"),
        "<= 4",
        per_client(logged_in),
    );
    let clients = query_each(clients).await?;
    tokio::time::sleep(SETTLE).await;
    let queried = proxy.mem()?;
    found.put(
        format!("{n} idle clients after one SELECT 1 each: KiB per client"),
        "<= 4",
        per_client(queried),
    );
    terminate_all(clients).await;
    tokio::time::sleep(SETTLE).await;
    let gone = proxy.mem()?;
    found.put(
        format!("{n} clients gone: RSS left over baseline (MiB)"),
        "~0",
        mib(growth_kib(base, gone.rss_kib)),
    );
    found.note(format!(
        "{n} idle clients: baseline {:.1} MiB, logged in {:.1}, after query {:.1}, gone {:.1}",
        mib(base.rss_kib as i64),
        mib(logged_in.rss_kib as i64),
        mib(queried.rss_kib as i64),
        mib(gone.rss_kib as i64)
    ));
    Ok(())
}

/// `n` clients connect at once, each runs `SELECT 1` through the pool and leaves.
async fn storm(proxy: &mut ProxyProcess, n: usize, found: &mut Found) -> Result<(), String> {
    let base = proxy.mem()?;
    let sampler = PeakSampler::start(proxy.pid());
    let addr = proxy.addr;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..n {
        set.spawn(async move {
            let mut stream = login(addr).await?;
            simple_query(&mut stream, "SELECT 1").await?;
            terminate(stream).await;
            Ok::<_, String>(())
        });
    }
    let (mut failed, mut first_error) = (0usize, None);
    while let Some(joined) = set.join_next().await {
        if let Err(e) = joined.map_err(|e| e.to_string()).and_then(|r| r) {
            failed += 1;
            first_error.get_or_insert(e);
        }
    }
    let elapsed = started.elapsed();
    let now = proxy.mem()?;
    let peak = scenario_peak(base, sampler.peak_kib(), now);
    drop(sampler);
    found.put(
        format!("storm of {n} x SELECT 1: peak RSS (MiB)"),
        "< 64",
        mib(peak as i64),
    );
    found.put(
        format!("storm of {n} x SELECT 1: peak growth (MiB)"),
        "",
        mib(growth_kib(base, peak)),
    );
    tokio::time::sleep(SETTLE).await;
    let after = proxy.mem()?;
    found.put(
        format!("storm of {n}: RSS left after (MiB)"),
        "~0",
        mib(growth_kib(base, after.rss_kib)),
    );
    found.note(format!(
        "storm of {n}: {} served in {:.1} s, baseline {:.1} MiB",
        n - failed,
        elapsed.as_secs_f64(),
        mib(base.rss_kib as i64)
    ));
    if failed > 0 {
        found.note(format!(
            "storm: {failed} of {n} clients failed; first: {}",
            first_error.unwrap_or_default()
        ));
    }
    Ok(())
}

/// How a pipelining sender ended.
#[derive(Debug, Clone, Copy)]
struct Flooded {
    /// Bytes the proxy accepted (written into the socket).
    sent: u64,
    /// A write made no progress for [`STALL`]: the proxy is holding the client back.
    stalled: bool,
}

/// Writes `unit` over and over, `total` bytes in all (a whole number of units), stopping early
/// when one write makes no progress for [`STALL`]. Cancelling a pending `write` writes nothing,
/// so `sent` is exact and the caller can finish the unit it stopped in.
async fn flood(w: &mut OwnedWriteHalf, unit: &[u8], total: u64) -> Result<Flooded, String> {
    let chunk: Vec<u8> = unit.repeat((64 * 1024 / unit.len()).max(1));
    let mut sent = 0u64;
    while sent < total {
        let offset = (sent % chunk.len() as u64) as usize;
        let left = (chunk.len() - offset).min((total - sent) as usize);
        match tokio::time::timeout(STALL, w.write(&chunk[offset..offset + left])).await {
            Err(_) => {
                return Ok(Flooded {
                    sent,
                    stalled: true,
                });
            }
            Ok(Ok(0)) => return Err(format!("the proxy closed after {sent} bytes")),
            Ok(Ok(n)) => sent += n as u64,
            Ok(Err(e)) => return Err(format!("writing after {sent} bytes: {e}")),
        }
    }
    Ok(Flooded {
        sent,
        stalled: false,
    })
}

/// The rest of the unit a flood stopped in, so the stream is whole messages again.
fn rest_of_unit(unit: &[u8], sent: u64) -> &[u8] {
    let partial = (sent % unit.len() as u64) as usize;
    if partial == 0 { &[] } else { &unit[partial..] }
}

/// Logs in the one client of a pipelining scenario and has it run a query first.
async fn abuser(proxy: &mut ProxyProcess) -> Result<(TcpStream, Mem), String> {
    let mut stream = login(proxy.addr).await?;
    simple_query(&mut stream, "SELECT 1").await?;
    tokio::time::sleep(SETTLE).await;
    Ok((stream, proxy.mem()?))
}

fn report_flood(found: &mut Found, what: &str, flooded: Flooded, total: u64, base: Mem, peak: u64) {
    found.put(
        format!("{what}: MB accepted before backpressure"),
        "",
        flooded.sent as f64 / 1e6,
    );
    found.put(
        format!("{what}: peak growth while unread (MiB)"),
        "<= 0.25",
        mib(growth_kib(base, peak)),
    );
    found.note(format!(
        "{what}: {} of {} MB accepted{}",
        flooded.sent as f64 / 1e6,
        total as f64 / 1e6,
        if flooded.stalled {
            ", then the proxy held the client back (a write made no progress for 2 s)"
        } else {
            ", all of it (no backpressure)"
        }
    ));
}

/// One client sends `n` Syncs without reading; then reads every ReadyForQuery, runs a query and
/// leaves.
async fn syncs(proxy: &mut ProxyProcess, n: u64, found: &mut Found) -> Result<(), String> {
    let (stream, base) = abuser(proxy).await?;
    let sampler = PeakSampler::start(proxy.pid());
    let (r, mut w) = stream.into_split();
    let unit = sync_message();
    let total = n * unit.len() as u64;
    let flooded = flood(&mut w, &unit, total).await?;
    // What the proxy still had in its socket buffers reaches it meanwhile.
    tokio::time::sleep(SETTLE).await;
    let peak = scenario_peak(base, sampler.peak_kib(), proxy.mem()?);
    report_flood(found, &format!("{n} Syncs"), flooded, total, base, peak);
    // Now read: one ReadyForQuery per Sync that went out (finishing the one cut in two).
    let expected = flooded.sent.div_ceil(unit.len() as u64);
    let rest = rest_of_unit(&unit, flooded.sent).to_vec();
    let writer = tokio::spawn(async move { w.write_all(&rest).await.map(|()| w) });
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut body = Vec::new();
    let mut ready = 0u64;
    while ready < expected {
        match read_message(&mut reader, &mut body).await {
            Ok(b'Z') => ready += 1,
            Ok(b'E') => return Err(format!("after {ready} Syncs: {}", error_text(&body))),
            Ok(_) => {}
            Err(e) => return Err(format!("reading after {ready} of {expected} answers: {e}")),
        }
    }
    let w = writer
        .await
        .map_err(|e| format!("writer task: {e}"))?
        .map_err(|e| format!("finishing the last Sync: {e}"))?;
    let mut stream = reader
        .into_inner()
        .reunite(w)
        .map_err(|e| format!("reunite: {e}"))?;
    simple_query(&mut stream, "SELECT 1").await?;
    let peak_all = scenario_peak(base, sampler.peak_kib(), proxy.mem()?);
    drop(sampler);
    found.put(
        format!("{n} Syncs: peak growth until all read (MiB)"),
        "",
        mib(growth_kib(base, peak_all)),
    );
    terminate(stream).await;
    tokio::time::sleep(SETTLE).await;
    found.put(
        format!("{n} Syncs: RSS left after the client left (MiB)"),
        "~0",
        mib(growth_kib(base, proxy.mem()?.rss_kib)),
    );
    Ok(())
}

/// One client sends `bytes` of `Close S "a"` + `Parse "a" "SELECT 1"` pairs with no Sync and
/// reads nothing; then sends the Sync and reads every answer.
async fn close_pairs(
    proxy: &mut ProxyProcess,
    bytes: u64,
    found: &mut Found,
) -> Result<(), String> {
    let (stream, base) = abuser(proxy).await?;
    let sampler = PeakSampler::start(proxy.pid());
    let (r, mut w) = stream.into_split();
    let mut unit = close_statement_message("a");
    unit.extend(parse_message("a", "SELECT 1"));
    let total = bytes / unit.len() as u64 * unit.len() as u64;
    let flooded = flood(&mut w, &unit, total).await?;
    // What the proxy still had in its socket buffers reaches it meanwhile.
    tokio::time::sleep(SETTLE).await;
    let peak = scenario_peak(base, sampler.peak_kib(), proxy.mem()?);
    let what = format!("{} MB of Close/Parse", bytes / 1_000_000);
    report_flood(found, &what, flooded, total, base, peak);
    // Finish the pair cut in two, Sync, and read the two answers of every pair.
    let pairs = flooded.sent.div_ceil(unit.len() as u64);
    let mut rest = rest_of_unit(&unit, flooded.sent).to_vec();
    rest.extend(sync_message());
    let writer = tokio::spawn(async move { w.write_all(&rest).await.map(|()| w) });
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut body = Vec::new();
    let (mut answers, mut error) = (0u64, None);
    loop {
        match read_message(&mut reader, &mut body).await {
            Ok(b'Z') => break,
            Ok(b'1' | b'3') => answers += 1,
            Ok(b'E') => error = Some(error_text(&body)),
            Ok(_) => {}
            Err(e) => return Err(format!("reading after {answers} answers: {e}")),
        }
    }
    if let Some(e) = error {
        found.note(format!("{what}: the server reported {e}"));
    }
    if answers != 2 * pairs {
        found.note(format!(
            "{what}: {answers} Close/Parse completions for {pairs} pairs (expected {})",
            2 * pairs
        ));
    }
    let w = writer
        .await
        .map_err(|e| format!("writer task: {e}"))?
        .map_err(|e| format!("finishing the pairs: {e}"))?;
    let mut stream = reader
        .into_inner()
        .reunite(w)
        .map_err(|e| format!("reunite: {e}"))?;
    simple_query(&mut stream, "SELECT 1").await?;
    drop(sampler);
    terminate(stream).await;
    tokio::time::sleep(SETTLE).await;
    found.put(
        format!("{what}: RSS left after the client left (MiB)"),
        "~0",
        mib(growth_kib(base, proxy.mem()?.rss_kib)),
    );
    Ok(())
}

/// One client sends Parse, a Bind with one `bytes`-long text parameter, Execute, Sync, and reads
/// the row back (as large); RSS growth during, and after with the client still connected.
async fn bind(proxy: &mut ProxyProcess, bytes: u64, found: &mut Found) -> Result<(), String> {
    let (stream, base) = abuser(proxy).await?;
    let sampler = PeakSampler::start(proxy.pid());
    let (r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move { send_big_bind(&mut w, bytes).await.map(|()| w) });
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let row = read_big_result(&mut reader).await?;
    if row != Some(bytes) {
        return Err(format!(
            "the row came back with a value of {row:?} bytes instead of {bytes}"
        ));
    }
    let w = writer
        .await
        .map_err(|e| format!("writer task: {e}"))?
        .map_err(|e| format!("sending the Bind: {e}"))?;
    let peak = scenario_peak(base, sampler.peak_kib(), proxy.mem()?);
    drop(sampler);
    let what = format!("{} MB Bind", bytes / 1_000_000);
    found.put(
        format!("{what}: peak growth (MiB)"),
        "<= 1",
        mib(growth_kib(base, peak)),
    );
    tokio::time::sleep(SETTLE).await;
    found.put(
        format!("{what}: RSS left after, client still connected (MiB)"),
        "~0",
        mib(growth_kib(base, proxy.mem()?.rss_kib)),
    );
    let stream = reader
        .into_inner()
        .reunite(w)
        .map_err(|e| format!("reunite: {e}"))?;
    terminate(stream).await;
    Ok(())
}

/// `Parse "s" "SELECT $1::text"`, then a Bind of it with one `bytes`-long text parameter
/// (streamed from a small buffer: the client holds no copy), Execute, Sync.
async fn send_big_bind(w: &mut OwnedWriteHalf, bytes: u64) -> io::Result<()> {
    w.write_all(&parse_message("s", "SELECT $1::text")).await?;
    // Bind: portal "", statement "s", no parameter formats (text), 1 parameter, no result
    // formats (text).
    let head_len = 1 + 2 + 2 + 2 + 4;
    let tail_len = 2;
    let len = 4 + head_len + bytes + tail_len;
    let len = i32::try_from(len).map_err(|_| io::Error::other("Bind over 2 GiB"))?;
    let mut head = vec![b'B'];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(b"\0s\0");
    head.extend_from_slice(&0i16.to_be_bytes());
    head.extend_from_slice(&1i16.to_be_bytes());
    head.extend_from_slice(&(bytes as i32).to_be_bytes());
    w.write_all(&head).await?;
    let block = vec![b'x'; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        w.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    w.write_all(&0i16.to_be_bytes()).await?;
    let mut rest = message(b'E', b"\0\0\0\0\0");
    rest.extend(sync_message());
    w.write_all(&rest).await
}

/// Reads the Bind scenario's answers through ReadyForQuery, skipping the large row without
/// keeping it; returns the length of the row's one value.
async fn read_big_result<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<u64>, String> {
    let mut value_len = None;
    let mut body = Vec::new();
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        let mut header = [0u8; 5];
        r.read_exact(&mut header)
            .await
            .map_err(|e| format!("reading the Bind's answers: {e}"))?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as i64 - 4;
        match header[0] {
            b'D' => {
                let mut head = [0u8; 6];
                r.read_exact(&mut head)
                    .await
                    .map_err(|e| format!("reading the row: {e}"))?;
                let n = i32::from_be_bytes([head[2], head[3], head[4], head[5]]);
                value_len = Some(n.max(0) as u64);
                let mut left = (len - 6).max(0) as u64;
                while left > 0 {
                    let take = left.min(sink.len() as u64) as usize;
                    r.read_exact(&mut sink[..take])
                        .await
                        .map_err(|e| format!("reading the row: {e}"))?;
                    left -= take as u64;
                }
            }
            kind => {
                if !(0..=1 << 20).contains(&len) {
                    return Err(format!("answer {:?} of length {len}", kind as char));
                }
                body.resize(len as usize, 0);
                r.read_exact(&mut body)
                    .await
                    .map_err(|e| format!("reading the Bind's answers: {e}"))?;
                match kind {
                    b'Z' => return Ok(value_len),
                    b'E' => return Err(format!("the Bind failed: {}", error_text(&body))),
                    _ => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table.
// ---------------------------------------------------------------------------------------------

/// Every measure by label (rows in first-seen order) and proxy.
#[derive(Default)]
struct Table {
    rows: Vec<(String, &'static str)>,
    cells: HashMap<(String, Kind), f64>,
    notes: Vec<String>,
}

impl Table {
    fn add(&mut self, kind: Kind, scenario: Scenario, found: Found) {
        for m in found.measures {
            if !self.rows.iter().any(|(l, _)| *l == m.label) {
                self.rows.push((m.label.clone(), m.target));
            }
            self.cells.insert((m.label, kind), m.value);
        }
        for note in found.notes {
            self.notes
                .push(format!("{} / {}: {note}", kind.name(), scenario.title()));
        }
    }

    fn print(&self, proxies: &[Kind]) {
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(10) + 2;
        let mut header = format!("{:<width$}{:>9}", "measure", "target");
        for kind in proxies {
            header += &format!("{:>12}", kind.name());
        }
        let both = proxies.contains(&Kind::Floodgate) && proxies.contains(&Kind::PgBouncer);
        if both {
            header += &format!("{:>10}", "FG/PgB");
        }
        println!("\n{header}\n{}", "-".repeat(header.len()));
        for (label, target) in &self.rows {
            let mut line = format!("{label:<width$}{target:>9}");
            for kind in proxies {
                match self.cells.get(&(label.clone(), *kind)) {
                    Some(v) => line += &format!("{v:>12.2}"),
                    None => line += &format!("{:>12}", "-"),
                }
            }
            if both {
                let fg = self.cells.get(&(label.clone(), Kind::Floodgate));
                let pgb = self.cells.get(&(label.clone(), Kind::PgBouncer));
                match (fg, pgb) {
                    (Some(f), Some(p)) if *p > 0.05 && *f >= 0.0 => {
                        line += &format!("{:>10}", format!("{:.1}x", f / p))
                    }
                    _ => line += &format!("{:>10}", "-"),
                }
            }
            println!("{line}");
        }
        if !self.notes.is_empty() {
            println!("\nnotes:");
            for note in &self.notes {
                println!("  - {note}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let settings = Settings::from_env()?;
    let programs = Programs::find(&settings)?;
    let most = settings
        .idle_clients
        .iter()
        .chain([&settings.storm_clients])
        .max()
        .copied()
        .unwrap_or(0);
    let nofile = raise_open_files_limit(most as u64 + 1000)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    eprintln!("starting PostgreSQL...");
    let cluster = PgCluster::start(ClusterOptions {
        auth: HbaAuth::Trust,
        max_connections: 100,
        extra_conf: Vec::new(),
        ..ClusterOptions::default()
    })
    .map_err(|e| format!("cannot start PostgreSQL: {e}"))?;
    let cluster = Arc::new(cluster);
    cleanup_on_signal(&rt, cluster.clone());
    cluster
        .create_user(DB, DB)
        .and_then(|()| cluster.create_database(DB, DB))
        .map_err(|e| format!("creating user and database {DB}: {e}"))?;

    let mut scenarios: Vec<Scenario> = settings
        .idle_clients
        .iter()
        .map(|&n| Scenario::Idle(n))
        .collect();
    scenarios.push(Scenario::Storm(settings.storm_clients));
    scenarios.push(Scenario::Syncs(settings.syncs));
    scenarios.push(Scenario::ClosePairs(settings.pipeline_bytes));
    scenarios.push(Scenario::Bind(settings.bind_bytes));

    let bench = Bench {
        cluster: &cluster,
        programs: &programs,
    };
    let mut table = Table::default();
    let started = Instant::now();
    // Proxies interleaved per scenario, each in a fresh process; spawned from this (the main)
    // thread, as `die_with_parent` requires.
    rt.block_on(async {
        for &scenario in &scenarios {
            for &kind in &settings.proxies {
                eprintln!("{}: {}", kind.name(), scenario.title());
                let found = bench.run(kind, scenario).await;
                table.add(kind, scenario, found);
            }
        }
    });

    println!(
        "\nproxy memory (RSS of the proxy process), pool {POOL}, transaction mode, trust; \
         open-files limit {nofile}; {} s",
        started.elapsed().as_secs()
    );
    for &kind in &settings.proxies {
        let path = match kind {
            Kind::Floodgate => programs.floodgate.display().to_string(),
            Kind::PgBouncer => programs.pgbouncer.display().to_string(),
        };
        println!("  {}: {} ({path})", kind.name(), programs.version(kind));
    }
    println!(
        "  KiB per client = (RSS with the clients - baseline) / clients; the baseline is taken \
         after a warm-up that opened the whole pool; growth and left-over in MiB over it"
    );
    table.print(&settings.proxies);
    drop(rt);
    Ok(())
}
