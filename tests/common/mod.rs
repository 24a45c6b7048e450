//! Test harness: a real PostgreSQL (via `floodgate::pgcluster`) with user `app` / password
//! `secret` and database `app`, a Floodgate proxy in-process on `127.0.0.1:0` in front of it,
//! tokio-postgres clients, and raw-socket helpers to speak (and mangle) the wire protocol.
//!
//! Every test builds its own [`Env`], so test files and tests run in parallel. Awaits that talk
//! to the network go through [`within`] (60 s), so a hang fails the test instead of the suite.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use floodgate::Proxy;
use floodgate::config::Config;
use floodgate::pgcluster::{ClusterOptions, HbaAuth, PgCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Upper bound for any single network step of a test.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Awaits `fut`, failing the test if it takes longer than [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {TIMEOUT:?}: {what}"),
    }
}

/// Logs of the proxy go to the test output when `RUST_LOG` is set.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Starts a cluster with `auth` in pg_hba, user `app` / `secret` and database `app`.
pub async fn start_cluster(auth: HbaAuth, max_connections: u32) -> Arc<PgCluster> {
    let cluster = tokio::task::spawn_blocking(move || {
        let opts = ClusterOptions {
            auth,
            max_connections,
            ..ClusterOptions::default()
        };
        let cluster = PgCluster::start(opts)?;
        cluster.create_user("app", "secret")?;
        cluster.create_database("app", "app")?;
        Ok::<_, floodgate::pgcluster::ClusterError>(cluster)
    });
    match within("starting PostgreSQL", cluster).await {
        Ok(Ok(cluster)) => Arc::new(cluster),
        Ok(Err(e)) => panic!("cannot start PostgreSQL: {e}"),
        Err(e) => panic!("cluster task failed: {e}"),
    }
}

/// How the proxy in front of the cluster is configured.
#[derive(Debug, Clone)]
pub struct ProxyOpts {
    /// `[floodgate] auth_type`: `trust`, `md5` or `scram-sha-256`.
    pub auth_type: &'static str,
    /// `[floodgate] pool_mode`: `transaction` or `session`.
    pub pool_mode: &'static str,
    /// `[databases.app] pool_size`.
    pub pool_size: usize,
    /// Extra `key = value` lines for `[floodgate]` (they win over the harness defaults).
    pub extra: Vec<String>,
    /// `[[users]]` as (name, password).
    pub users: Vec<(String, String)>,
}

impl Default for ProxyOpts {
    fn default() -> Self {
        ProxyOpts {
            auth_type: "scram-sha-256",
            pool_mode: "transaction",
            pool_size: 5,
            extra: Vec::new(),
            users: vec![("app".into(), "secret".into())],
        }
    }
}

/// The proxy's TOML configuration for `opts`, pointing `[databases.app]` at `cluster`.
pub fn proxy_toml(cluster: &PgCluster, opts: &ProxyOpts) -> String {
    let mut general = vec![
        "listen = \"127.0.0.1:0\"".to_string(),
        format!("auth_type = \"{}\"", opts.auth_type),
        format!("pool_mode = \"{}\"", opts.pool_mode),
        format!("default_pool_size = {}", opts.pool_size),
    ];
    let defaults = [
        "query_wait_timeout = \"30s\"",
        "server_connect_timeout = \"10s\"",
    ];
    let key = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
    for default in defaults {
        if !opts.extra.iter().any(|l| key(l) == key(default)) {
            general.push(default.to_string());
        }
    }
    general.extend(opts.extra.iter().cloned());
    let mut toml = format!("[floodgate]\n{}\n", general.join("\n"));
    for (name, password) in &opts.users {
        toml += &format!("\n[[users]]\nname = \"{name}\"\npassword = \"{password}\"\n");
    }
    toml += &format!(
        "\n[databases.app]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\npool_size = {}\n",
        cluster.host(),
        cluster.port(),
        opts.pool_size
    );
    toml
}

/// A proxy with `auth_type = "trust"` (so raw sockets can log in) and a pool of `pool_size`,
/// plus `extra` lines for `[floodgate]`, in front of a SCRAM upstream.
pub async fn trust_env(pool_size: usize, extra: &[&str]) -> Env {
    let opts = ProxyOpts {
        auth_type: "trust",
        pool_size,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..ProxyOpts::default()
    };
    Env::start(HbaAuth::ScramSha256, opts).await
}

/// Asserts an ErrorResponse is FATAL with SQLSTATE `code` and a message naming `setting`.
pub fn assert_fatal_naming(fields: &BTreeMap<char, String>, code: &str, setting: &str) {
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some(code),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    let message = fields.get(&'M').cloned().unwrap_or_default();
    assert!(
        message.contains(setting),
        "the message names {setting}: {message}"
    );
}

/// A simple Query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Starts a proxy from configuration text.
pub async fn start_proxy(toml: &str) -> Proxy {
    init_tracing();
    let config = Config::from_toml_str(toml)
        .unwrap_or_else(|e| panic!("harness config rejected: {e}\n{toml}"));
    within("starting the proxy", Proxy::start(config))
        .await
        .unwrap_or_else(|e| panic!("proxy did not start: {e}\n{toml}"))
}

/// A cluster and a proxy in front of it.
pub struct Env {
    /// The upstream PostgreSQL.
    pub cluster: Arc<PgCluster>,
    /// The proxy under test.
    pub proxy: Proxy,
}

impl Env {
    /// Starts a cluster (pg_hba `hba`, max_connections 100) and a proxy configured by `opts`.
    pub async fn start(hba: HbaAuth, opts: ProxyOpts) -> Env {
        let cluster = start_cluster(hba, 100).await;
        let proxy = start_proxy(&proxy_toml(&cluster, &opts)).await;
        Env { cluster, proxy }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.proxy.local_addr()
    }

    /// Connects through the proxy as `app` / `secret` to `app`, panicking on failure.
    pub async fn connect(&self) -> Conn {
        self.connect_with(&self.config("app", Some("secret"), "app"))
            .await
    }

    /// Connects through the proxy with `config`, panicking on failure.
    pub async fn connect_with(&self, config: &tokio_postgres::Config) -> Conn {
        within("connecting through the proxy", connect(config))
            .await
            .unwrap_or_else(|e| panic!("cannot connect through the proxy: {e}"))
    }

    /// Connects through the proxy; the error is the caller's to inspect.
    pub async fn try_connect(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> Result<Conn, tokio_postgres::Error> {
        within(
            "connecting through the proxy",
            connect(&self.config(user, password, db)),
        )
        .await
    }

    /// A tokio-postgres configuration for the proxy.
    pub fn config(&self, user: &str, password: Option<&str>, db: &str) -> tokio_postgres::Config {
        client_config(self.addr(), user, password, db)
    }

    /// Runs SQL on the cluster directly as superuser (psql over the Unix socket).
    pub async fn sql(&self, db: &str, sql: &str) -> String {
        cluster_sql(&self.cluster, db, sql).await
    }

    /// Client backends of user `app` on database `app`, counted by the server itself.
    pub async fn backend_count(&self) -> i64 {
        let cluster = self.cluster.clone();
        let count = tokio::task::spawn_blocking(move || cluster.backend_count("app", "app"));
        match within("counting backends", count).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("backend_count: {e}"),
            Err(e) => panic!("backend_count task failed: {e}"),
        }
    }
}

/// Runs `SELECT pg_sleep(60)` on `c`, cancels it with the client's cancel key (through the
/// proxy) once PostgreSQL shows it running, and asserts it ended with 57014 within 30 s and the
/// connection still answers.
pub async fn cancel_a_running_pg_sleep(c: &Conn, cluster: &Arc<PgCluster>) {
    let token = c.cancel_token();
    let client = &c.client;
    let sleeping = async {
        tokio::time::timeout(
            Duration::from_secs(30),
            client.simple_query("SELECT pg_sleep(60)"),
        )
        .await
    };
    let canceller = async {
        wait_until("pg_sleep running upstream", || async {
            cluster_sql(
                cluster,
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
            )
            .await
                == "1"
        })
        .await;
        within("cancel", token.cancel_query(tokio_postgres::NoTls)).await
    };
    let (slept, cancelled) = tokio::join!(sleeping, canceller);
    cancelled.expect("sending the CancelRequest to the proxy");
    let err = slept
        .expect("the cancel did not stop pg_sleep(60) within 30 s")
        .expect_err("pg_sleep was not cancelled");
    assert_eq!(sqlstate(&err), "57014", "{err}");
    assert_eq!(scalar(c, "SELECT 'alive'").await, "alive");
}

/// One HTTP/1.1 request (connection closed after it): (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    within(&format!("{method} {path}"), async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        (status, body)
    })
    .await
}

/// Runs SQL on `cluster` as superuser, panicking on failure.
pub async fn cluster_sql(cluster: &Arc<PgCluster>, db: &str, sql: &str) -> String {
    let (cluster, db, sql) = (cluster.clone(), db.to_string(), sql.to_string());
    let out = tokio::task::spawn_blocking(move || cluster.sql(&db, &sql));
    match within("psql", out).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => panic!("psql task failed: {e}"),
    }
}

/// A tokio-postgres configuration for `addr`.
pub fn client_config(
    addr: SocketAddr,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .dbname(db)
        .connect_timeout(Duration::from_secs(30));
    if let Some(password) = password {
        config.password(password);
    }
    config
}

/// A tokio-postgres client and the task driving its connection.
pub struct Conn {
    /// The client.
    pub client: Client,
    /// Drives the connection; abort it to drop the socket without a Terminate message.
    pub task: JoinHandle<()>,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Conn {
    /// Drops the socket abruptly, the way a crashed client does (no Terminate message).
    pub async fn vanish(self) {
        self.task.abort();
        let _ = self.task.await;
        drop(self.client);
    }
}

/// Connects with `config` and spawns the connection task.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Conn, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn { client, task })
}

/// The first column of the first row of a simple query, as text.
pub async fn scalar(client: &Client, sql: &str) -> String {
    let messages = within(sql, client.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("`{sql}` failed: {e}"));
    first_value(&messages).unwrap_or_else(|| panic!("`{sql}` returned no row"))
}

/// The first column of the first row in simple-query results (NULL as `None`).
pub fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
        _ => None,
    })?
}

/// The SQLSTATE of an error, or a description of why there is none.
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    match err.code() {
        Some(code) => code.code().to_string(),
        None => format!("<no SQLSTATE: {err}>"),
    }
}

/// SQLSTATE and message of an error, for test output.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => format!("<no SQLSTATE> {err}"),
    }
}

/// The server-reported message of an error (empty when it did not come from a server).
pub fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default()
}

/// Polls `cond` (e.g. "the query is running on the server") every 20 ms until it holds,
/// failing the test after [`TIMEOUT`]. Sleeping here only paces the polling.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Raw wire protocol.
// ---------------------------------------------------------------------------------------------

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;

/// A StartupMessage for protocol 3.0 with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (k, v) in params {
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

/// A typed frontend message: type byte, length, body.
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

/// What a raw read produced.
#[derive(Debug)]
pub enum Incoming {
    /// A whole backend message.
    Message(u8, Vec<u8>),
    /// The peer closed (EOF or connection reset).
    Closed,
}

/// Reads one backend message (or the close of the connection).
pub async fn read_message(stream: &mut TcpStream) -> Incoming {
    let mut header = [0u8; 5];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if is_close(&e) => return Incoming::Closed,
        Err(e) => panic!("reading from the proxy: {e}"),
    }
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    assert!(
        (4..=64 * 1024 * 1024).contains(&len),
        "backend message {:?} has length {len}",
        header[0] as char
    );
    let mut body = vec![0u8; len as usize - 4];
    match stream.read_exact(&mut body).await {
        Ok(_) => Incoming::Message(header[0], body),
        Err(e) if is_close(&e) => Incoming::Closed,
        Err(e) => panic!("reading from the proxy: {e}"),
    }
}

fn is_close(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Fields of an ErrorResponse or NoticeResponse body, by field code (`'C'` is the SQLSTATE).
pub fn error_fields(body: &[u8]) -> BTreeMap<char, String> {
    let mut fields = BTreeMap::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        fields.insert(
            code as char,
            String::from_utf8_lossy(&tail[..end]).into_owned(),
        );
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    fields
}

/// Reads until an ErrorResponse arrives, then requires the connection to be closed.
/// Returns the error's fields; panics if the connection closes without one.
pub async fn expect_error_then_close(stream: &mut TcpStream, what: &str) -> BTreeMap<char, String> {
    let fields = within(what, async {
        loop {
            match read_message(stream).await {
                Incoming::Message(b'E', body) => return error_fields(&body),
                Incoming::Message(_, _) => continue,
                Incoming::Closed => panic!("{what}: connection closed without an ErrorResponse"),
            }
        }
    })
    .await;
    expect_closed(stream, what).await;
    fields
}

/// Requires the proxy to close the connection (anything it still sends is skipped).
pub async fn expect_closed(stream: &mut TcpStream, what: &str) {
    within(what, async {
        while let Incoming::Message(..) = read_message(stream).await {}
    })
    .await
}

/// Opens a raw connection to `addr`.
pub async fn raw_connect(addr: SocketAddr) -> TcpStream {
    within("raw connect", TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Logs in over a raw socket to a proxy with `auth_type = "trust"` as `app` to `app`, reading
/// through the first ReadyForQuery.
pub async fn raw_login_trust(addr: SocketAddr) -> TcpStream {
    let mut stream = raw_connect(addr).await;
    let startup = startup_message(&[("user", "app"), ("database", "app")]);
    within("raw startup", stream.write_all(&startup))
        .await
        .expect("send startup");
    within("raw login", async {
        loop {
            match read_message(&mut stream).await {
                Incoming::Message(b'Z', _) => break,
                Incoming::Message(b'R', body) => {
                    assert_eq!(body, [0, 0, 0, 0], "trust login expects AuthenticationOk")
                }
                Incoming::Message(b'E', body) => panic!("login refused: {:?}", error_fields(&body)),
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("connection closed during login"),
            }
        }
    })
    .await;
    stream
}

/// Sends `bytes` (ignoring a reset: the proxy may already have hung up).
pub async fn send_raw(stream: &mut TcpStream, bytes: &[u8]) {
    match within("raw send", stream.write_all(bytes)).await {
        Ok(()) => {}
        Err(e) if is_close(&e) => {}
        Err(e) => panic!("sending to the proxy: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// libpq command-line tools (psql, pgbench).
// ---------------------------------------------------------------------------------------------

/// Runs a libpq tool with a clean PG* environment plus `PGPASSWORD=secret`.
pub async fn run_tool(program: &'static str, args: Vec<String>) -> std::process::Output {
    let line = format!("{program} {}", args.join(" "));
    let out = within(
        &line.clone(),
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(program);
            for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("PG")) {
                cmd.env_remove(var);
            }
            cmd.args(&args)
                .env("PGPASSWORD", "secret")
                .env("PGCONNECT_TIMEOUT", "30")
                .output()
        }),
    )
    .await
    .unwrap();
    out.unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"))
}

/// A tool's exit status and output, for assertion messages.
pub fn tool_text(out: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `-h HOST -p PORT` for a libpq tool.
pub fn host_port(addr: SocketAddr) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
    ]
}

// ---------------------------------------------------------------------------------------------
// The built binary as a separate process.
// ---------------------------------------------------------------------------------------------

/// A `floodgate` process started by a test, and the log lines it wrote; killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the built binary with the configuration `toml` (listening on port 0 is fine) and
/// waits for the address it logs; `name` is for messages.
pub fn start_binary(toml: &str, name: &str) -> Process {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, toml).expect("writing the configuration");
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "floodgate=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting floodgate");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    // Keeps draining stderr so the process never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = listening_addr(&line) {
                let _ = tx.send(addr);
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = match rx.recv_timeout(TIMEOUT) {
        Ok(addr) => addr,
        Err(_) => panic!("{name} did not start: {:?}", log.lock().unwrap()),
    };
    Process {
        child,
        addr,
        log,
        _dir: dir,
    }
}

/// The address in the "floodgate listening local_addr=..." log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("floodgate listening") {
        return None;
    }
    let rest = line.split("local_addr=").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `pgbench -i -q` on database `app` as `app`, directly against `cluster`.
pub async fn pgbench_init(cluster: &PgCluster) {
    let upstream: SocketAddr = format!("{}:{}", cluster.host(), cluster.port())
        .parse()
        .expect("the cluster's address");
    let mut init = vec!["-i".into(), "-q".into(), "-U".into(), "app".into()];
    init.extend(host_port(upstream));
    init.push("app".into());
    let out = run_tool("pgbench", init).await;
    assert!(out.status.success(), "pgbench -i: {}", tool_text(&out));
}

/// A superuser session on `cluster` over its Unix socket (database `postgres`): for watching
/// `pg_stat_activity` without being counted as user `app`.
pub async fn superuser_connect(cluster: &PgCluster) -> Conn {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(cluster.socket_dir())
        .port(cluster.port())
        .user("postgres")
        .dbname("postgres");
    within("superuser connects", connect(&config))
        .await
        .expect("superuser connection over the Unix socket")
}
