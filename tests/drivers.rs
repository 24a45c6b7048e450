//! Real drivers through the proxy in transaction mode: node-postgres, pgjdbc, psycopg 3 and
//! asyncpg, each a program under `tests/drivers/` run as a subprocess (the contract the programs
//! follow is in `tests/drivers/README.md`): 20 clients on a pool of 4 using named prepared
//! statements, a search_path per client set at connection start in the driver's own way, and a
//! prepared `SELECT *` across `ALTER TABLE ... ADD COLUMN`.
//!
//! These are the clients the README promises work unchanged, and each speaks the protocol a
//! little differently (when it Parses, Describes and Syncs; how it names statements; how it
//! reacts to 0A000), which hand-written protocol tests do not cover. Each program runs directly
//! against PostgreSQL first, so a failure through the proxy is the proxy's, not the program's.
//!
//! What a program needs from its package registry is installed here when missing (`npm ci` in
//! `tests/drivers/node`, a venv in `target/driver-venv` from `requirements.txt`), under a file
//! lock so parallel tests and parallel `cargo test` runs install once. A missing system tool
//! fails the test naming the Debian package to install (`.ci/run` installs them): a driver test
//! never passes without running its driver.

mod common;

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::process::Command;

/// Client connections each program opens at once.
const CLIENTS: usize = 20;
/// Transactions each client runs.
const TXNS: usize = 50;
/// Tenant schemas (`tenant_1` ..), each with its own `items`.
const TENANTS: usize = 3;
/// Server connections the proxy may open: far fewer than clients, so every client's
/// transactions move between servers.
const POOL_SIZE: usize = 4;
/// `npm ci` or `pip install` on a cold cache downloads packages; the programs themselves get
/// [`TIMEOUT`] per run.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Where the driver programs and their manifests are.
fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`): `CARGO_TARGET_TMPDIR` is `<target>/tmp`.
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .unwrap_or_else(|| panic!("CARGO_TARGET_TMPDIR {} has no parent", tmp.display()))
        .to_path_buf()
}

/// A driver program: how to start it and from where.
struct Program {
    name: &'static str,
    exe: OsString,
    args: Vec<OsString>,
    dir: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_through_the_proxy() {
    direct_then_through_proxy(node_program().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_through_the_proxy() {
    direct_then_through_proxy(java_program().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_through_the_proxy() {
    direct_then_through_proxy(python_program("psycopg 3", "psycopg_driver.py").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_through_the_proxy() {
    direct_then_through_proxy(python_program("asyncpg", "asyncpg_driver.py").await).await;
}

/// Runs `program` against PostgreSQL directly, then through a proxy with a pool of
/// [`POOL_SIZE`], each time on freshly created tables; both runs must exit 0.
async fn direct_then_through_proxy(program: Program) {
    let opts = ProxyOpts {
        pool_size: POOL_SIZE,
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;

    env.sql("app", &schema_sql()).await;
    let direct = run_program(&program, env.cluster.host(), env.cluster.port()).await;
    println!(
        "{} directly:\n{}",
        program.name,
        String::from_utf8_lossy(&direct.stdout)
    );
    assert!(
        direct.status.success(),
        "{} failed directly against PostgreSQL: the program or the machine is wrong, not the \
         proxy\n{}",
        program.name,
        tool_text(&direct)
    );

    env.sql("app", &schema_sql()).await;
    let addr = env.addr();
    let proxied = run_program(&program, &addr.ip().to_string(), addr.port()).await;
    println!(
        "{} through the proxy:\n{}",
        program.name,
        String::from_utf8_lossy(&proxied.stdout)
    );
    assert!(
        proxied.status.success(),
        "{} failed through the proxy (pool_size {POOL_SIZE}) and passed directly against \
         PostgreSQL\n{}\n--- stdout of the direct run ---\n{}",
        program.name,
        tool_text(&proxied),
        String::from_utf8_lossy(&direct.stdout)
    );
}

/// The tables the programs expect (see `tests/drivers/README.md`), dropped and created again so
/// the run through the proxy starts from the same state as the direct one. Every tenant's
/// `items` has the same columns: a statement prepared under one tenant's search_path is then
/// re-planned by PostgreSQL under another's (what happens to a statement the proxy shares
/// between clients), rather than rejected with 0A000.
fn schema_sql() -> String {
    let mut sql = String::new();
    for n in 1..=TENANTS {
        sql += &format!(
            "DROP SCHEMA IF EXISTS tenant_{n} CASCADE;
             CREATE SCHEMA tenant_{n};
             CREATE TABLE tenant_{n}.items (tenant text NOT NULL, n int NOT NULL);
             INSERT INTO tenant_{n}.items SELECT 'tenant_{n}', g FROM generate_series(1, {}) g;
             GRANT USAGE ON SCHEMA tenant_{n} TO app;
             GRANT SELECT ON tenant_{n}.items TO app;\n",
            10 * n
        );
    }
    sql += "DROP TABLE IF EXISTS public.ledger, public.shape;
            CREATE TABLE public.ledger (client int NOT NULL, seq int NOT NULL,
                                        tenant text NOT NULL, PRIMARY KEY (client, seq));
            GRANT SELECT, INSERT ON public.ledger TO app;
            CREATE TABLE public.shape (id int PRIMARY KEY, a text NOT NULL);
            INSERT INTO public.shape VALUES (1, 'one'), (2, 'two');
            ALTER TABLE public.shape OWNER TO app;";
    sql
}

/// Runs `program` against `host:port` as `app` / `secret` on database `app`, with no `PG*`
/// variables from the caller's environment (libpq and asyncpg read them).
async fn run_program(program: &Program, host: &str, port: u16) -> Output {
    let mut cmd = Command::new(&program.exe);
    cmd.args(&program.args)
        .current_dir(&program.dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (var, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("PG")) {
        cmd.env_remove(var);
    }
    cmd.env("DRIVER_HOST", host)
        .env("DRIVER_PORT", port.to_string())
        .env("DRIVER_USER", "app")
        .env("DRIVER_PASSWORD", "secret")
        .env("DRIVER_DB", "app")
        .env("DRIVER_CLIENTS", CLIENTS.to_string())
        .env("DRIVER_TXNS", TXNS.to_string())
        .env("DRIVER_TENANTS", TENANTS.to_string())
        .env("DRIVER_POOL_SIZE", POOL_SIZE.to_string())
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let what = format!("{} against {host}:{port}", program.name);
    within(&what, cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// What each program needs.
// ---------------------------------------------------------------------------------------------

/// `node pg_driver.js`, after `npm ci` when `node_modules` is missing or was installed from
/// another `package-lock.json`.
async fn node_program() -> Program {
    const HINT: &str = "the node-postgres test needs Node.js (16 or later) and npm: \
                        apt-get install nodejs npm (.ci/run does)";
    require("node", &["--version"], HINT).await;
    let dir = drivers_dir().join("node");
    let lock = read(&dir.join("package-lock.json"));
    let stamp = dir.join("node_modules/.floodgate-installed");
    let _guard = exclusive(target_dir().join("driver-node.lock")).await;
    if std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) {
        require("npm", &["--version"], HINT).await;
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .env("NPM_CONFIG_UPDATE_NOTIFIER", "false");
        install("npm ci in tests/drivers/node", npm, HINT).await;
        write(&stamp, &lock);
    }
    Program {
        name: "node-postgres",
        exe: "node".into(),
        args: vec!["pg_driver.js".into()],
        dir,
    }
}

/// `target/driver-venv/bin/python SCRIPT`, after creating the venv and installing
/// `requirements.txt` when the venv is missing, cannot import the drivers, or was installed
/// from other requirements.
async fn python_program(name: &'static str, script: &str) -> Program {
    const HINT: &str = "the Python driver tests need python3 with the venv module: \
                        apt-get install python3-venv (.ci/run does)";
    let dir = drivers_dir().join("python");
    let requirements = dir.join("requirements.txt");
    let wanted = read(&requirements);
    let venv = target_dir().join("driver-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".floodgate-installed");
    let _guard = exclusive(target_dir().join("driver-venv.lock")).await;
    let ready = std::fs::read(&stamp).ok().as_deref() == Some(&wanted[..])
        && succeeds(Command::new(&python).args(["-c", "import psycopg, asyncpg"])).await;
    if !ready {
        let mut create = Command::new("python3");
        create.args(["-m", "venv", "--clear"]).arg(&venv);
        install("python3 -m venv target/driver-venv", create, HINT).await;
        let mut pip = Command::new(&python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ])
        .arg("-r")
        .arg(&requirements);
        install(
            "pip install -r tests/drivers/python/requirements.txt",
            pip,
            "PyPI must be reachable",
        )
        .await;
        write(&stamp, &wanted);
    }
    Program {
        name,
        exe: python.into(),
        args: vec![script.into()],
        dir,
    }
}

/// `java -cp postgresql.jar PgjdbcDriver.java`: the JDK compiles and runs the single file.
async fn java_program() -> Program {
    const HINT: &str = "the pgjdbc test needs a JDK (11 or later; it runs a .java file): \
                        apt-get install default-jdk-headless (.ci/run does)";
    require("java", &["-version"], HINT).await;
    require("javac", &["-version"], HINT).await;
    let jar = std::env::var_os("FLOODGATE_PGJDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    assert!(
        jar.is_file(),
        "the pgjdbc test needs the pgjdbc jar at {}: apt-get install libpostgresql-jdbc-java \
         (.ci/run does), or set FLOODGATE_PGJDBC_JAR to another jar",
        jar.display()
    );
    Program {
        name: "pgjdbc",
        exe: "java".into(),
        args: vec!["-cp".into(), jar.into(), "PgjdbcDriver.java".into()],
        dir: drivers_dir().join("java"),
    }
}

/// Fails the test with `hint` unless `program args` runs and exits 0.
async fn require(program: &str, args: &[&str], hint: &str) {
    let line = format!("{program} {}", args.join(" "));
    let out = within(&line, Command::new(program).args(args).output()).await;
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`{line}` failed: {hint}\n{}", tool_text(&out)),
        Err(e) => panic!("cannot run `{line}` ({e}): {hint}"),
    }
}

/// Whether `cmd` runs and exits 0 (its output is not needed).
async fn succeeds(cmd: &mut Command) -> bool {
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    matches!(within("checking the venv", status).await, Ok(s) if s.success())
}

/// Runs an install step, failing the test with its output (and `hint`) if it fails.
async fn install(what: &str, mut cmd: Command, hint: &str) {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(INSTALL_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {what} ({e}): {hint}"),
        Err(_) => panic!("timed out after {INSTALL_TIMEOUT:?}: {what}"),
    };
    assert!(
        out.status.success(),
        "{what} failed ({hint})\n{}",
        tool_text(&out)
    );
}

/// An exclusive lock on `path` (created if needed), held until the file is dropped. It is
/// taken on a blocking thread: another test or `cargo test` may be installing.
async fn exclusive(path: PathBuf) -> File {
    let shown = path.display().to_string();
    let locked = tokio::task::spawn_blocking(move || {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    });
    // Bounded by the other holder's install timeout.
    match tokio::time::timeout(INSTALL_TIMEOUT + TIMEOUT, locked).await {
        Ok(Ok(Ok(file))) => file,
        Ok(Ok(Err(e))) => panic!("cannot lock {shown}: {e}"),
        Ok(Err(e)) => panic!("locking {shown}: {e}"),
        Err(_) => panic!("timed out waiting for the lock {shown}"),
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()))
}
