//! Drop-in proof for the admin console: the PgBouncer exporter from PyPI
//! (`prometheus-pgbouncer-exporter` 2.1.2, unchanged) scrapes Floodgate's console while pgbench
//! runs through Floodgate, and reports non-zero figures. The test installs the pinned packages
//! of `tests/exporter/requirements.txt` into `target/exporter-venv` when missing (python3 with
//! the venv module must be there; `.ci/run` installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// pip on a cold cache downloads packages.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// The venv's exporter command, installing it first when needed.
async fn exporter() -> PathBuf {
    let venv = target_dir().join("exporter-venv");
    let program = venv.join("bin/pgbouncer-exporter");
    let requirements =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/exporter/requirements.txt");
    let stamp = venv.join(".floodgate-installed");
    let wanted = std::fs::read(&requirements).expect("requirements.txt");
    if program.exists() && std::fs::read(&stamp).ok().as_deref() == Some(&wanted[..]) {
        return program;
    }
    run_step(
        "python3 -m venv target/exporter-venv (apt-get install python3-venv)",
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .await;
    run_step(
        "pip install --no-deps -r tests/exporter/requirements.txt",
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-deps", "-r"])
            .arg(&requirements),
    )
    .await;
    std::fs::write(&stamp, wanted).expect("stamp");
    program
}

async fn run_step(what: &str, cmd: &mut Command) {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(INSTALL_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {what}: {e}"),
        Err(_) => panic!("timed out: {what}"),
    };
    assert!(out.status.success(), "{what} failed\n{}", tool_text(&out));
}

/// A free local port (for the exporter's HTTP server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET /metrics` over plain HTTP; `None` while nothing listens yet.
async fn scrape(port: u16) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// The value of sample `name` whose labels include every one of `labels` (in any order).
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let metric = series.split('{').next().unwrap_or("");
            metric == name && labels.iter().all(|label| series.contains(label))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_pgbouncer_exporter_reads_the_console_while_pgbench_runs() {
    let program = exporter().await;
    let opts = ProxyOpts {
        pool_size: 4,
        extra: vec!["admin_users = [\"ops\"]".into()],
        users: vec![
            ("app".into(), "secret".into()),
            ("ops".into(), "ops-pw".into()),
        ],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("exporter.yml");
    std::fs::write(
        &config,
        format!(
            "exporter_host: 127.0.0.1\nexporter_port: {port}\npgbouncers:\n  - dsn: \
             postgresql://ops:ops-pw@{}:{}/pgbouncer\n    connect_timeout: 5\n",
            env.addr().ip(),
            env.addr().port()
        ),
    )
    .expect("exporter config");
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").expect("script");

    let mut exporter = Command::new(&program)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the exporter starts");
    let mut args = vec![
        "-n".to_string(),
        "-c".into(),
        "4".into(),
        "-T".into(),
        "8".into(),
    ];
    args.extend(["-f".to_string(), script.display().to_string()]);
    args.extend(host_port(env.addr()));
    args.extend(["-U".to_string(), "app".into(), "app".into()]);
    let pgbench = tokio::spawn(run_tool("pgbench", args));

    // While pgbench runs: the exporter is up and sees transactions and servers in use.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = within("the exporter to report pgbouncer_up 1", async {
        loop {
            let metrics = scrape(port).await.unwrap_or_default();
            if sample(&metrics, "pgbouncer_up", &[]) == Some(1.0) {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let pgbench = within("pgbench", pgbench).await.expect("pgbench task");
    assert!(pgbench.status.success(), "{}", tool_text(&pgbench));
    let _ = exporter.start_kill();
    let out = exporter.wait_with_output().await.expect("exporter output");
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);

    let app = "database=\"app\"";
    let transactions = sample(&metrics, "pgbouncer_stats_transactions_total", &[app]);
    assert!(
        transactions.is_some_and(|t| t > 0.0),
        "no transactions reported\n{metrics}\n{log}"
    );
    let queries = sample(&metrics, "pgbouncer_stats_queries_total", &[app]);
    assert!(queries.is_some_and(|q| q > 0.0), "{metrics}");
    let clients = sample(
        &metrics,
        "pgbouncer_pools_client_active_connections",
        &[app, "user=\"app\""],
    );
    assert!(clients.is_some_and(|c| c > 0.0), "{metrics}");
    let pool_size = sample(&metrics, "pgbouncer_databases_database_pool_size", &[app]);
    assert_eq!(pool_size, Some(4.0), "{metrics}");
    let max_client_conn = sample(&metrics, "pgbouncer_config_max_client_conn", &[]);
    assert_eq!(max_client_conn, Some(10000.0), "{metrics}");
}
