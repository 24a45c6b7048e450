//! The `floodgate` binary and its signals: SIGUSR1 pauses every database, SIGUSR2 resumes them,
//! SIGHUP reloads the file, SIGTERM drains and exits 0.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) sends a signal to the child this test started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// `paused` of database `db` in SHOW DATABASES, if the database is listed.
async fn paused(console: &Conn, db: &str) -> Option<String> {
    let messages = within("SHOW DATABASES", console.simple_query("SHOW DATABASES"))
        .await
        .expect("SHOW DATABASES");
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) if row.get("name") == Some(db) => {
            row.get("paused").map(str::to_string)
        }
        _ => None,
    })
}

#[tokio::test]
async fn signals_pause_resume_reload_and_drain() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("floodgate.toml");
    let port = free_port();
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:{port}\"\nadmin_users = [\"app\"]\n\
         default_pool_size = 2\n\n[[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n",
        cluster.host(),
        cluster.port()
    );
    std::fs::write(&file, &toml).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .arg("--config")
        .arg(&file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("floodgate starts");
    let pid = child.id().expect("pid");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let console_config = client_config(addr, "app", Some("secret"), "floodgate");
    let console = within("floodgate to listen", async {
        loop {
            if let Ok(console) = connect(&console_config).await {
                return console;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(paused(&console, "app").await.as_deref(), Some("0"));

    signal(pid, libc::SIGUSR1);
    wait_until("SIGUSR1 to pause", || async {
        paused(&console, "app").await.as_deref() == Some("1")
    })
    .await;
    signal(pid, libc::SIGUSR2);
    wait_until("SIGUSR2 to resume", || async {
        paused(&console, "app").await.as_deref() == Some("0")
    })
    .await;

    let app = connect(&client_config(addr, "app", Some("secret"), "app"))
        .await
        .expect("a client");
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
    let more = format!(
        "{toml}\n[databases.other]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
        cluster.host(),
        cluster.port()
    );
    std::fs::write(&file, more).expect("config");
    signal(pid, libc::SIGHUP);
    wait_until("SIGHUP to reload", || async {
        paused(&console, "other").await.is_some()
    })
    .await;
    assert_eq!(scalar(&app, "SELECT 2").await, "2");

    signal(pid, libc::SIGTERM);
    let status = within("floodgate to exit", child.wait())
        .await
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    let err = within("query after SIGTERM", app.simple_query("SELECT 1"))
        .await
        .expect_err("the proxy is gone");
    assert!(
        err.code().map(|c| c.code()) == Some("57P01") || err.is_closed(),
        "{}",
        describe(&err)
    );
}
