//! Secrets never leave Floodgate: after logins (right and wrong passwords, SCRAM and md5
//! upstream), console SHOWs and a /metrics scrape, with every log level on, no configured
//! password or token appears in its logs, console output or metrics.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The upstream password, the console user's, the HTTP token, a wrong guess, a client's.
const SECRETS: [&str; 5] = [
    "Upstr3am-marker",
    "Op3rat0r-pw-marker",
    "T0ken-marker-xyz",
    "Wr0ng-guess-marker",
    "Al1ce-marker",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn no_secret_in_logs_console_or_metrics() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    cluster_sql(
        &cluster,
        "postgres",
        &format!("ALTER ROLE app PASSWORD '{}'", SECRETS[0]),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("floodgate.toml");
    let (port, metrics_port) = (free_port(), free_port());
    std::fs::write(
        &file,
        format!(
            "[floodgate]\nlisten = \"127.0.0.1:{port}\"\nadmin_users = [\"ops\"]\n\
             default_pool_size = 2\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             admin_token = \"{}\"\n\n[[users]]\nname = \"alice\"\npassword = \"{}\"\n\n\
             [[users]]\nname = \"ops\"\npassword = \"{}\"\n\n[databases.app]\nhost = \"{}\"\n\
             port = {}\nuser = \"app\"\npassword = \"{}\"\n",
            SECRETS[2],
            SECRETS[4],
            SECRETS[1],
            cluster.host(),
            cluster.port(),
            SECRETS[0]
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("floodgate starts");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let app_config = client_config(addr, "alice", Some(SECRETS[4]), "app");
    let app = within("floodgate to listen", async {
        loop {
            if let Ok(conn) = connect(&app_config).await {
                return conn;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut seen = String::new();
    seen += &scalar(&app, "SELECT 1").await;
    assert!(
        connect(&client_config(addr, "alice", Some(SECRETS[3]), "app"))
            .await
            .is_err()
    );
    assert!(
        connect(&client_config(addr, "nobody", Some(SECRETS[3]), "app"))
            .await
            .is_err()
    );
    let ops = connect(&client_config(addr, "ops", Some(SECRETS[1]), "pgbouncer"))
        .await
        .expect("console");
    for what in [
        "POOLS",
        "STATS",
        "CLIENTS",
        "SERVERS",
        "DATABASES",
        "USERS",
        "CONFIG",
        "LISTS",
        "STATE",
        "MEM",
        "TOTALS",
    ] {
        for m in ops
            .simple_query(&format!("SHOW {what}"))
            .await
            .expect("SHOW")
        {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                for i in 0..row.len() {
                    seen += row.get(i).unwrap_or("");
                    seen.push('\n');
                }
            }
        }
    }
    let mut http = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
        .await
        .expect("metrics");
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    http.read_to_string(&mut seen).await.unwrap();
    drop((app, ops));
    // SIGTERM, then everything it logged.
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id().expect("pid") as i32, libc::SIGTERM) };
    let _ = within("floodgate to exit", child.wait()).await;
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "logs were captured: {logs}"
    );
    for secret in SECRETS {
        assert!(
            !seen.contains(secret),
            "{secret} in console or metrics output"
        );
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}
