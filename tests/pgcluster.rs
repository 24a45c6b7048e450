//! The test harness's own foundation: a throwaway PostgreSQL cluster.

use floodgate::pgcluster::{ClusterOptions, HbaAuth, PgCluster};

#[test]
fn cluster_starts_runs_sql_stops_restarts_and_cleans_up() {
    let cluster = PgCluster::start(ClusterOptions {
        auth: HbaAuth::Md5,
        max_connections: 20,
        extra_conf: vec!["application_name = 'cluster_test'".into()],
        ..ClusterOptions::default()
    })
    .expect("start cluster");
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(
        cluster.sql("postgres", "SHOW max_connections").unwrap(),
        "20"
    );
    assert_eq!(
        cluster.sql("postgres", "SHOW port").unwrap(),
        cluster.port().to_string()
    );
    cluster.create_user("app", "it's secret").unwrap();
    cluster.create_database("app", "app").unwrap();
    let hash = cluster
        .sql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
        )
        .unwrap();
    assert!(
        hash.starts_with("md5"),
        "md5 cluster stores md5 hashes: {hash}"
    );
    assert_eq!(cluster.backend_count("app", "app").unwrap(), 0);
    let err = cluster
        .sql("app", "SELECT * FROM no_such_table")
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");

    let port = cluster.port();
    cluster.stop().unwrap();
    assert!(
        cluster.sql("postgres", "SELECT 1").is_err(),
        "stopped server answers"
    );
    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    assert_eq!(
        cluster.sql("app", "SELECT current_database()").unwrap(),
        "app"
    );

    let dir = cluster.socket_dir().to_path_buf();
    drop(cluster);
    assert!(!dir.exists(), "temp dir removed on drop");
}

#[test]
fn scram_cluster_stores_scram_secrets() {
    let cluster = PgCluster::start(ClusterOptions::default()).expect("start cluster");
    cluster.create_user("app", "secret").unwrap();
    let hash = cluster
        .sql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
        )
        .unwrap();
    assert!(hash.starts_with("SCRAM-SHA-256$"), "{hash}");
}

#[test]
fn start_failure_reports_the_server_log() {
    let err = PgCluster::start(ClusterOptions {
        extra_conf: vec!["no_such_setting = 1".into()],
        ..ClusterOptions::default()
    })
    .expect_err("a bad setting must stop the server from starting");
    let text = err.to_string();
    assert!(text.contains("did not start"), "{text}");
    assert!(
        text.contains("no_such_setting"),
        "the log tail names the bad setting: {text}"
    );
}
