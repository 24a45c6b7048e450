//! `floodgate check`: the connection math against a live server's `max_connections`.

mod common;

use common::*;
use floodgate::pgcluster::{HbaAuth, PgCluster};

/// Runs `floodgate check` on a config with `pool_size`, `reserve` and `instances` against a
/// server started with `max_connections = 20` (3 reserved for superusers: 17 usable).
async fn check(
    cluster: &PgCluster,
    pool_size: usize,
    reserve: usize,
    instances: usize,
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    let text = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\ndefault_pool_size = {pool_size}\n\
         reserve_pool_size = {reserve}\ninstances = {instances}\n\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n",
        cluster.host(),
        cluster.port()
    );
    std::fs::write(&path, text).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output();
    within("floodgate check", out)
        .await
        .expect("run floodgate check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_within_budget_and_fails_over_it() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 20).await;

    // 5 + 2 reserve = 7 of 17 usable: 41 %, within the default 70 % budget.
    let out = check(&cluster, 5, 2, 1).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("at most 7 server connections"), "{stdout}");
    assert!(stdout.contains("max_connections 20"), "{stdout}");
    assert!(stdout.contains("41%"), "{stdout}");

    // The same pools on three instances: 21 of 17, over budget.
    let out = check(&cluster, 5, 2, 3).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "over budget must fail\n{stdout}");
    assert!(
        stdout.contains("at most 21 server connections") && stdout.contains("OVER BUDGET"),
        "{stdout}"
    );
    assert!(stderr.contains("connection_budget"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_clearly_when_the_upstream_is_down() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 20).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .unwrap()
        .unwrap();
    let out = check(&cluster, 5, 0, 1).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("could not connect") || stderr.contains("connect"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&cluster.port().to_string()),
        "names the upstream: {stderr}"
    );
}
