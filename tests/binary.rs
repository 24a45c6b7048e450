//! The `floodgate` binary itself: command-line and configuration errors, `check`, a real run in
//! front of a harness cluster stopped by SIGTERM, and `demo` stopped by SIGINT.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use floodgate::pgcluster::{HbaAuth, PgCluster};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_floodgate");

/// The binary with a clean environment for logging and libpq.
fn floodgate(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("PG")) {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUST_LOG").args(args).stdin(Stdio::null());
    cmd
}

/// Runs the binary to its end and collects its output.
async fn run_to_end(args: &[&str]) -> Output {
    let mut cmd = floodgate(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("floodgate {}", args.join(" "));
    within(&what, cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn report(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `text` to `name` in `dir`.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing the config file");
    path
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `[[users]]` and `[databases.app]` for `cluster` (user `app` / `secret`).
fn users_and_app_db(cluster: &PgCluster, pool_size: usize) -> String {
    format!(
        "\n[[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\npool_size = {pool_size}\n",
        cluster.host(),
        cluster.port()
    )
}

/// A running `floodgate` process. Dropping it (e.g. when a test fails) sends SIGINT so it can
/// clean up, then kills it if it has not exited after a while.
struct Running {
    child: Child,
    pid: i32,
    /// Where its stderr goes (read for failure messages).
    stderr_path: PathBuf,
    /// Holds the stderr file (and whatever the test put there).
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts `floodgate args`; stdout as given, stderr to a file.
    fn spawn(args: &[&str], stdout: Stdio, dir: tempfile::TempDir) -> Running {
        let stderr_path = dir.path().join("floodgate.stderr");
        let file = std::fs::File::create(&stderr_path).expect("creating the stderr file");
        let mut cmd = floodgate(args);
        cmd.stdout(stdout).stderr(Stdio::from(file));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let pid = child.id().expect("a running child has a pid") as i32;
        Running {
            child,
            pid,
            stderr_path,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own child, not reaped
        // yet (we only reap it in `wait_exit` / `Drop`, after the last signal).
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid);
    }

    /// Waits until `addr` accepts TCP connections; fails if the process exits first.
    async fn wait_for_port(&mut self, addr: SocketAddr) {
        within("floodgate starts listening", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    panic!(
                        "floodgate exited before listening on {addr}: {status}\n{}",
                        self.stderr()
                    );
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Waits for the process to exit.
    async fn wait_exit(&mut self, what: &str) -> ExitStatus {
        within(what, self.child.wait())
            .await
            .unwrap_or_else(|e| panic!("{what}: waiting for floodgate: {e}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: as in `signal`; the child has not been reaped.
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.start_kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Command line and configuration errors.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_config_file_is_named() {
    let out = run_to_end(&["--config", "/nonexistent.toml"]).await;
    assert!(!out.status.success(), "{}", report(&out));
    assert!(
        stderr(&out).contains("/nonexistent.toml"),
        "stderr does not name the file\n{}",
        report(&out)
    );
}

#[tokio::test]
async fn unknown_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[floodgate]\nlisten = \"127.0.0.1:6432\"\npool_sise = 3\n";
    let path = write_config(dir.path(), "typo.toml", text);
    let out = run_to_end(&["--config", path.to_str().unwrap()]).await;
    assert!(!out.status.success(), "{}", report(&out));
    let err = stderr(&out);
    assert!(
        err.contains("pool_sise"),
        "stderr does not name the key\n{}",
        report(&out)
    );
    assert!(
        err.contains("line 3"),
        "stderr does not name the line\n{}",
        report(&out)
    );
}

#[tokio::test]
async fn bad_duration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[floodgate]\nlisten = \"127.0.0.1:6432\"\nquery_wait_timeout = \"soon\"\n";
    let path = write_config(dir.path(), "duration.toml", text);
    let out = run_to_end(&["--config", path.to_str().unwrap()]).await;
    assert!(!out.status.success(), "{}", report(&out));
    assert!(
        stderr(&out).contains("query_wait_timeout"),
        "stderr does not name the key\n{}",
        report(&out)
    );
}

#[tokio::test]
async fn no_config_flag_is_an_error_mentioning_it() {
    let out = run_to_end(&[]).await;
    assert!(!out.status.success(), "{}", report(&out));
    assert!(
        stderr(&out).contains("--config"),
        "stderr does not mention --config\n{}",
        report(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_validates_and_prints_the_pool_sizes() {
    // A live upstream, so the test holds whether or not `check` looks at the server.
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let db = |name: &str, pool: &str| {
        format!(
            "\n[databases.{name}]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\nuser = \"app\"\n\
             password = \"secret\"\n{pool}",
            cluster.host(),
            cluster.port()
        )
    };
    let text = format!(
        "[floodgate]\nlisten = \"127.0.0.1:{}\"\ndefault_pool_size = 3\n\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n{}{}",
        free_port(),
        db("orders", "pool_size = 7\n"),
        db("reports", "")
    );
    let path = write_config(dir.path(), "valid.toml", &text);
    let out = run_to_end(&["check", "--config", path.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tokens = |line: &str| -> Vec<String> {
        line.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    };
    for (name, size) in [("orders", "7"), ("reports", "3")] {
        let line = stdout
            .lines()
            .find(|l| tokens(l).iter().any(|t| t == name))
            .unwrap_or_else(|| panic!("no line for database {name}\n{}", report(&out)));
        assert!(
            tokens(line).iter().any(|t| t == size),
            "the line for {name} does not show its pool size {size}: {line:?}\n{}",
            report(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Running for real.
// ---------------------------------------------------------------------------------------------

/// True when a new client is turned away: refused at connect, or its first query fails.
async fn turned_away(config: &tokio_postgres::Config) -> bool {
    match within("connect attempt", connect(config)).await {
        Err(_) => true,
        Ok(late) => within("late client's query", late.simple_query("SELECT 1"))
            .await
            .is_err(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_open_transaction_commit_then_exits_zero() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    cluster_sql(
        &cluster,
        "app",
        "CREATE TABLE term (id int); ALTER TABLE term OWNER TO app",
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[floodgate]\nlisten = \"{addr}\"\nauth_type = \"scram-sha-256\"\n\
         pool_mode = \"transaction\"\ndefault_pool_size = 2\nshutdown_timeout = \"20s\"\n\
         query_wait_timeout = \"30s\"\nserver_connect_timeout = \"10s\"\n{}",
        users_and_app_db(&cluster, 2)
    );
    let path = write_config(dir.path(), "run.toml", &text);
    let path = path.to_str().unwrap().to_string();
    let mut proc = Running::spawn(&["--config", &path], Stdio::null(), dir);
    proc.wait_for_port(addr).await;

    let config = client_config(addr, "app", Some("secret"), "app");
    let first = within("first client", connect(&config))
        .await
        .unwrap_or_else(|e| panic!("cannot connect: {}\n{}", describe(&e), proc.stderr()));
    assert_eq!(scalar(&first, "SELECT 40 + 2").await, "42");
    drop(first);

    let c = within("second client", connect(&config))
        .await
        .unwrap_or_else(|e| panic!("cannot connect: {}\n{}", describe(&e), proc.stderr()));
    within(
        "BEGIN; INSERT",
        c.batch_execute("BEGIN; INSERT INTO term VALUES (1)"),
    )
    .await
    .expect("BEGIN; INSERT");

    proc.signal(libc::SIGTERM);
    wait_until("new connections are refused after SIGTERM", || {
        turned_away(&config)
    })
    .await;
    assert!(
        proc.child.try_wait().expect("try_wait").is_none(),
        "floodgate exited with a transaction still open\n{}",
        proc.stderr()
    );

    within("COMMIT after SIGTERM", c.batch_execute("COMMIT"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "COMMIT of the open transaction failed after SIGTERM: {}\n{}",
                describe(&e),
                proc.stderr()
            )
        });
    assert_eq!(
        cluster_sql(&cluster, "app", "SELECT count(*) FROM term").await,
        "1",
        "the committed row is not visible"
    );
    assert!(
        turned_away(&config).await,
        "a new client was served after SIGTERM"
    );
    drop(c);

    let status = proc.wait_exit("floodgate exits after SIGTERM").await;
    assert!(
        status.success(),
        "floodgate exited with {status}\n{}",
        proc.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------------------------

/// A running postmaster: its pid and data directory.
#[derive(Debug, Clone)]
struct Postmaster {
    pid: i32,
    data_dir: PathBuf,
}

/// Processes whose command line is `.../postgres ... -D DIR ...` (a postmaster; its children
/// overwrite their command line), with DIR.
fn postmasters() -> Vec<Postmaster> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_postgres = args
            .first()
            .is_some_and(|a| a == "postgres" || a.ends_with("/postgres"));
        if !is_postgres {
            continue;
        }
        if let Some(i) = args.iter().position(|a| a == "-D")
            && let Some(dir) = args.get(i + 1)
        {
            found.push(Postmaster {
                pid,
                data_dir: PathBuf::from(dir),
            });
        }
    }
    found
}

/// The postmaster listening on `port`, found by the port line (4th) of its `postmaster.pid`.
fn postmaster_on_port(port: u16) -> Option<Postmaster> {
    postmasters().into_iter().find(|pm| {
        std::fs::read_to_string(pm.data_dir.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().nth(3).map(|l| l.trim() == port.to_string()))
            .unwrap_or(false)
    })
}

/// Whether `pid` is a live process (a zombie has exited).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_printed_url_and_cleans_up_on_sigint() {
    let listen = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Running::spawn(&["demo", "--listen", &listen], Stdio::piped(), dir);
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let url = within("demo prints the psql line", async {
        loop {
            match lines.next_line().await.expect("reading demo's stdout") {
                Some(line) => {
                    printed.push(line.clone());
                    if let Some(url) = line.trim().strip_prefix("psql ") {
                        return url.trim().to_string();
                    }
                }
                None => panic!(
                    "demo's stdout ended before the psql line\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    printed.join("\n"),
                    proc.stderr()
                ),
            }
        }
    })
    .await;
    assert!(url.starts_with("postgres://"), "printed: {url}");
    // Keep draining stdout so the demo can never block on a full pipe.
    let drain = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });

    let mut config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("the printed URL {url} does not parse: {e}"));
    config.connect_timeout(Duration::from_secs(30));
    let client = within("connecting with the printed URL", connect(&config))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to {url}: {}\n{}",
                describe(&e),
                proc.stderr()
            )
        });
    assert_eq!(scalar(&client, "SELECT 1").await, "1");
    // The upstream's own port, as the server sees it: how the demo's cluster is found.
    let pg_port: u16 = scalar(&client, "SELECT inet_server_port()")
        .await
        .parse()
        .expect("inet_server_port() is a port");
    drop(client);
    let postmaster = postmaster_on_port(pg_port).unwrap_or_else(|| {
        panic!(
            "no postgres -D process whose postmaster.pid names port {pg_port}; postmasters: {:?}",
            postmasters()
        )
    });
    assert!(
        postmaster.data_dir.join("PG_VERSION").is_file(),
        "{postmaster:?} is not a data directory"
    );
    // The data directory lives in a temporary directory created for it (tempfile's `.tmp`
    // style names under the system temp dir); the demo must remove that too.
    let cluster_dir = postmaster
        .data_dir
        .parent()
        .expect("data directory has a parent")
        .to_path_buf();
    assert!(
        cluster_dir.starts_with(std::env::temp_dir()) && cluster_dir != std::env::temp_dir(),
        "the demo's cluster is not in a temporary directory: {cluster_dir:?}"
    );

    proc.signal(libc::SIGINT);
    let status = proc.wait_exit("demo exits after SIGINT").await;
    let rest = within("demo's stdout closes", drain).await.unwrap();
    assert!(
        status.success(),
        "demo exited with {status}\n--- stdout ---\n{}\n{}\n--- stderr ---\n{}",
        printed.join("\n"),
        rest.join("\n"),
        proc.stderr()
    );
    assert!(
        !alive(postmaster.pid),
        "the demo's postmaster {postmaster:?} is still running"
    );
    let left: Vec<Postmaster> = postmasters()
        .into_iter()
        .filter(|pm| pm.data_dir == postmaster.data_dir && alive(pm.pid))
        .collect();
    assert!(
        left.is_empty(),
        "postgres processes for the demo's cluster remain: {left:?}"
    );
    assert!(
        !postmaster.data_dir.exists(),
        "the demo's data directory {:?} still exists",
        postmaster.data_dir
    );
    assert!(
        !cluster_dir.exists(),
        "the demo's temporary directory {cluster_dir:?} still exists"
    );
}
