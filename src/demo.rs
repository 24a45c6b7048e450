//! `floodgate demo`: a throwaway local PostgreSQL with Floodgate in front, until Ctrl-C.

use crate::config::Config;
use crate::pgcluster::{ClusterOptions, HbaAuth, PgCluster};
use crate::proxy::Proxy;

/// What the demo creates.
const USER: &str = "demo";
const PASSWORD: &str = "demo";
const DATABASE: &str = "demo";

/// Runs the demo; everything it created is removed when it returns.
pub async fn run(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    println!("starting a throwaway PostgreSQL cluster (initdb in a temporary directory)...");
    let cluster = tokio::task::spawn_blocking(|| {
        let cluster = PgCluster::start(ClusterOptions {
            auth: HbaAuth::ScramSha256,
            ..Default::default()
        })?;
        cluster.create_user(USER, PASSWORD)?;
        cluster.create_database(DATABASE, USER)?;
        Ok::<_, crate::pgcluster::ClusterError>(cluster)
    })
    .await??;
    let config = Config::from_toml_str(&format!(
        r#"
[floodgate]
listen = "{listen}"
auth_type = "scram-sha-256"
pool_mode = "transaction"
default_pool_size = 5

[[users]]
name = "{USER}"
password = "{PASSWORD}"

[databases.{DATABASE}]
host = "{host}"
port = {port}
"#,
        host = cluster.host(),
        port = cluster.port(),
    ))?;
    let proxy = Proxy::start(config).await?;
    let addr = proxy.local_addr();
    println!();
    println!(
        "PostgreSQL {} is on {}:{} (only Floodgate needs it).",
        pg_version(&cluster),
        cluster.host(),
        cluster.port()
    );
    println!("Floodgate listens on {addr}: transaction pooling, at most 5 server connections.");
    println!();
    println!("  psql postgres://{USER}:{PASSWORD}@{addr}/{DATABASE}");
    println!(
        "  PGPASSWORD={PASSWORD} pgbench -h {} -p {} -U {USER} -i {DATABASE}",
        addr.ip(),
        addr.port()
    );
    println!();
    println!("Ctrl-C stops both and deletes the cluster.");
    crate::shutdown_signal().await;
    println!("stopping...");
    proxy.shared().request_stop(crate::shared::StopMode::Fast);
    proxy.stopped().await;
    drop(cluster);
    Ok(())
}

fn pg_version(cluster: &PgCluster) -> String {
    cluster
        .sql("postgres", "SHOW server_version")
        .unwrap_or_default()
}
