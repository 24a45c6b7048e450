//! Throwaway local PostgreSQL clusters (tests and `floodgate demo`).
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory, configures `pg_hba.conf`
//! and `postgresql.conf` for the caller's needs, and starts the server with `pg_ctl` on a free
//! TCP port of 127.0.0.1 (plus a Unix socket in the temporary directory, used for superuser
//! work). Dropping the cluster stops it at once and deletes everything. When the process runs as
//! root, every PostgreSQL binary runs as the `postgres` OS user, since the server refuses root.

use std::ffi::{CString, OsStr};
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What went wrong while creating, driving or stopping a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No `initdb` under `/usr/lib/postgresql/*/bin`.
    #[error(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install the Debian \
         package `postgresql` (apt-get install postgresql)"
    )]
    BinariesNotFound,
    /// Running as root, but there is no `postgres` OS user to run the server as.
    #[error(
        "running as root, but the OS user `postgres` does not exist (the server refuses to run as \
         root): install the Debian package `postgresql`, which creates it"
    )]
    NoPostgresUser,
    /// A file-system or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PostgreSQL binary exited with a failure status.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (and stdout).
        stderr: String,
    },
    /// The server did not start; the tail of its log usually says why.
    #[error("PostgreSQL did not start on port {port}: {detail}\n--- tail of {log} ---\n{log_tail}")]
    StartFailed {
        /// The port it was told to listen on.
        port: u16,
        /// What `pg_ctl` said.
        detail: String,
        /// Path of the server log.
        log: String,
        /// The last lines of the server log.
        log_tail: String,
    },
}

/// Authentication method for the `host` lines of `pg_hba.conf` (127.0.0.1 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaAuth {
    /// No password.
    Trust,
    /// `md5`; users created by [`PgCluster::create_user`] get md5-hashed passwords.
    Md5,
    /// `scram-sha-256` (the PostgreSQL default).
    ScramSha256,
}

impl HbaAuth {
    fn method(self) -> &'static str {
        match self {
            HbaAuth::Trust => "trust",
            HbaAuth::Md5 => "md5",
            HbaAuth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// How to set up a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Method for TCP connections from 127.0.0.1 (Unix-socket connections are always trusted).
    pub auth: HbaAuth,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// Lines appended to `postgresql.conf` as they are, e.g. `"log_connections = on"`.
    pub extra_conf: Vec<String>,
    /// Files written into the data directory before the server starts, readable by the server
    /// only (mode 0600, its owner): certificates and keys for `ssl = on`, say.
    pub data_files: Vec<(String, Vec<u8>)>,
    /// Only TLS connections over TCP (`hostssl` in pg_hba.conf instead of `host`).
    pub tls_only: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            auth: HbaAuth::ScramSha256,
            max_connections: 100,
            extra_conf: Vec::new(),
            data_files: Vec::new(),
            tls_only: false,
        }
    }
}

/// A running throwaway PostgreSQL server; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    /// Directory of `initdb`, `pg_ctl`, `psql`.
    bin: PathBuf,
    /// `(uid, gid)` of the `postgres` OS user when we run as root, else `None`.
    run_as: Option<(u32, u32)>,
    /// How passwords are hashed by `create_user`.
    auth: HbaAuth,
    port: u16,
    /// Holds the data directory, the socket and the log; deleted on drop.
    dir: tempfile::TempDir,
}

/// How many fresh ports `start` tries before giving up (parallel tests may race for one).
const START_ATTEMPTS: u32 = 5;

impl PgCluster {
    /// The highest-versioned `/usr/lib/postgresql/*/bin` that contains `initdb`.
    pub fn bin_dir() -> Result<PathBuf, ClusterError> {
        let entries =
            fs::read_dir("/usr/lib/postgresql").map_err(|_| ClusterError::BinariesNotFound)?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .max_by_key(|(version, _)| *version)
            .map(|(_, bin)| bin)
            .ok_or(ClusterError::BinariesNotFound)
    }

    /// Creates and starts a new cluster with superuser `postgres` (trusted over the Unix socket).
    pub fn start(opts: ClusterOptions) -> Result<PgCluster, ClusterError> {
        let bin = Self::bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_ids()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("floodgate-pg-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io("creating a temporary directory"))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(io("setting permissions of the temporary directory"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io("giving the temporary directory to the postgres user"))?;
        }
        let mut cluster = PgCluster {
            bin,
            run_as,
            auth: opts.auth,
            port: 0,
            dir,
        };
        let data = cluster.data_dir();
        let initdb = "-U postgres --auth=trust -E UTF8 --no-sync --locale=C -D";
        cluster.run("initdb", initdb, &[data.as_os_str()])?;
        let host = if opts.tls_only { "hostssl" } else { "host" };
        let hba = format!(
            "local all all trust\n{host} all all 127.0.0.1/32 {}\n",
            opts.auth.method()
        );
        for (name, content) in &opts.data_files {
            let path = data.join(name);
            fs::write(&path, content).map_err(io("writing a file into the data directory"))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(io("setting permissions of a data file"))?;
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(io("giving a data file to the postgres user"))?;
            }
        }
        fs::write(data.join("pg_hba.conf"), hba).map_err(io("writing pg_hba.conf"))?;
        let conf = data.join("postgresql.conf");
        let mut main_conf = fs::read_to_string(&conf).map_err(io("reading postgresql.conf"))?;
        main_conf.push_str("include 'floodgate.conf'\n");
        fs::write(&conf, main_conf).map_err(io("writing postgresql.conf"))?;
        let socket_dir = cluster.dir.path().display();
        let mut ours = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{socket_dir}'\n\
             max_connections = {}\nfsync = off\n",
            opts.max_connections
        );
        for line in &opts.extra_conf {
            ours.push_str(&format!("{line}\n"));
        }
        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            let text = format!("{ours}port = {}\n", cluster.port);
            fs::write(data.join("floodgate.conf"), text).map_err(io("writing floodgate.conf"))?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                // Another process took the port between our probe and the server's bind.
                Err(ClusterError::StartFailed { log_tail, .. })
                    if attempt < START_ATTEMPTS && log_tail.contains("already in use") =>
                {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The TCP host the server listens on: always `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sql` in database `db` as superuser `postgres` with
    /// `psql -X -At -v ON_ERROR_STOP=1`; returns its trimmed standard output.
    pub fn sql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let port = self.port.to_string();
        let more = [&port, "-d", db, "-c", sql, "-h"].map(OsStr::new);
        let flags = "-X -At -v ON_ERROR_STOP=1 -U postgres -p";
        let out = self.run(
            "psql",
            flags,
            &[&more[..], &[self.dir.path().as_os_str()]].concat(),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates a login role with `password`, hashed with md5 for [`HbaAuth::Md5`] clusters and
    /// with SCRAM-SHA-256 otherwise.
    pub fn create_user(&self, name: &str, password: &str) -> Result<(), ClusterError> {
        let encryption = if self.auth == HbaAuth::Md5 {
            "md5"
        } else {
            "scram-sha-256"
        };
        self.sql(
            "postgres",
            &format!(
                "SET password_encryption = '{encryption}'; CREATE ROLE {} LOGIN PASSWORD {}",
                quote_ident(name),
                quote_literal(password)
            ),
        )
        .map(drop)
    }

    /// Creates database `name` owned by role `owner`.
    pub fn create_database(&self, name: &str, owner: &str) -> Result<(), ClusterError> {
        self.sql(
            "postgres",
            &format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(name),
                quote_ident(owner)
            ),
        )
        .map(drop)
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping its data directory and port.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run("pg_ctl", "-w -m fast stop -D", &[data.as_os_str()])
            .map(drop)
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    /// Number of client backends connected to database `db` as role `user` (the query's own
    /// connection excluded).
    pub fn backend_count(&self, db: &str, user: &str) -> Result<i64, ClusterError> {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = {} AND usename = {} \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            quote_literal(db),
            quote_literal(user)
        );
        let out = self.sql("postgres", &sql)?;
        out.parse().map_err(|_| ClusterError::Command {
            command: sql,
            status: "unexpected output".into(),
            stderr: out,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let (data, log) = (self.data_dir(), self.log_file());
        let more = [data.as_os_str(), OsStr::new("-l"), log.as_os_str()];
        let started = self.run("pg_ctl", "-w -t 60 start -D", &more);
        started.map(drop).map_err(|e| ClusterError::StartFailed {
            port: self.port,
            detail: e.to_string(),
            log: log.display().to_string(),
            log_tail: log_tail(&log),
        })
    }

    /// Runs PostgreSQL binary `name` with the whitespace-separated `flags` then `more`
    /// arguments (as the postgres OS user when we are root) and waits for it.
    fn run(&self, name: &str, flags: &str, more: &[&OsStr]) -> Result<Output, ClusterError> {
        let program = self.bin.join(name);
        let mut cmd = Command::new(if self.run_as.is_some() {
            "setpriv".as_ref()
        } else {
            program.as_os_str()
        });
        if self.run_as.is_some() {
            cmd.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ]);
            cmd.arg(&program);
        }
        cmd.args(flags.split_whitespace()).args(more);
        cmd.current_dir(self.dir.path())
            .env("HOME", self.dir.path());
        // The caller's PGHOST, PGTZ, PGOPTIONS... must not leak into our commands.
        let is_pg = |k: &std::ffi::OsString| k.as_encoded_bytes().starts_with(b"PG");
        for (var, _) in std::env::vars_os().filter(|(k, _)| is_pg(k)) {
            cmd.env_remove(var);
        }
        let line = format!("{} {flags}", program.display());
        let out = cmd.output().map_err(io(format!("running {line}")))?;
        if out.status.success() {
            return Ok(out);
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        let stderr = [text(&out.stderr), text(&out.stdout)]
            .join("\n")
            .trim()
            .to_string();
        let status = out.status.to_string();
        Err(ClusterError::Command {
            command: line,
            status,
            stderr,
        })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let data = self.data_dir();
            let _ = self.run("pg_ctl", "-w -m immediate stop -D", &[data.as_os_str()]);
        }
    }
}

/// Wraps an `io::Error` with what was being done.
fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

/// The last 30 lines of the server log (or why it could not be read).
fn log_tail(log: &Path) -> String {
    match fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(e) => format!("(could not read the log: {e})"),
    }
}

/// `(uid, gid)` of the `postgres` OS user.
fn postgres_ids() -> Result<(u32, u32), ClusterError> {
    let name = CString::new("postgres").map_err(|_| ClusterError::NoPostgresUser)?;
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
    if rc != 0 || result.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// SQL identifier in double quotes.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL string literal in single quotes (standard_conforming_strings is on by default).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
