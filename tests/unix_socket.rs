//! Server connections over PostgreSQL's Unix socket: a `host` that starts with `/` names the
//! directory holding `.s.PGSQL.<port>`, as libpq and PgBouncer read it.

mod common;

use std::sync::Arc;

use common::*;
use floodgate::pgcluster::{HbaAuth, PgCluster};

/// The harness's configuration with `[databases.app] host` set to the cluster's socket directory
/// (the harness's clusters trust local connections and ask SCRAM over TCP).
fn unix_toml(cluster: &PgCluster, opts: &ProxyOpts) -> String {
    let tcp_host = format!("host = \"{}\"", cluster.host());
    let toml = proxy_toml(cluster, opts);
    assert!(toml.contains(&tcp_host), "{toml}");
    toml.replace(
        &tcp_host,
        &format!("host = \"{}\"", cluster.socket_dir().display()),
    )
}

struct UnixEnv {
    cluster: Arc<PgCluster>,
    proxy: floodgate::Proxy,
}

impl UnixEnv {
    async fn start(opts: ProxyOpts) -> UnixEnv {
        let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
        let proxy = start_proxy(&unix_toml(&cluster, &opts)).await;
        UnixEnv { cluster, proxy }
    }

    fn config(&self) -> tokio_postgres::Config {
        client_config(self.proxy.local_addr(), "app", Some("secret"), "app")
    }

    async fn connect(&self) -> Conn {
        within("connecting through the proxy", connect(&self.config()))
            .await
            .unwrap_or_else(|e| panic!("cannot connect through the proxy: {e}"))
    }

    /// `app`'s client backends on `app` that came over TCP and over the Unix socket, as
    /// PostgreSQL itself sees them (`client_addr` is NULL for a Unix-socket connection).
    async fn backends_by_transport(&self) -> (i64, i64) {
        let counts = cluster_sql(
            &self.cluster,
            "postgres",
            "SELECT count(*) FILTER (WHERE client_addr IS NOT NULL) || ' ' || \
                    count(*) FILTER (WHERE client_addr IS NULL) \
             FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app' \
             AND backend_type = 'client backend'",
        )
        .await;
        let (tcp, unix) = counts.trim().split_once(' ').expect("two counts");
        (tcp.parse().unwrap(), unix.parse().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_run_over_the_servers_unix_socket() {
    let env = Arc::new(
        UnixEnv::start(ProxyOpts {
            pool_size: 2,
            ..ProxyOpts::default()
        })
        .await,
    );
    let c = env.connect().await;
    // The server sees no network peer: the connection is its Unix socket.
    assert_eq!(
        scalar(&c, "SELECT coalesce(inet_server_addr()::text, 'local')").await,
        "local"
    );
    // Twenty clients, three transactions each, share the pool of two.
    let clients: Vec<_> = (0..20)
        .map(|id| {
            let env = env.clone();
            tokio::spawn(async move {
                let c = env.connect().await;
                for tx in 0..3 {
                    let sql = format!("SELECT {id} * 10 + {tx}");
                    let got = scalar(&c, &sql).await;
                    assert_eq!(got, (id * 10 + tx).to_string(), "client {id}");
                }
            })
        })
        .collect();
    for client in within("20 clients", futures_util::future::join_all(clients)).await {
        client.expect("client task");
    }
    let (tcp, unix) = env.backends_by_transport().await;
    assert_eq!(tcp, 0, "no server connection over TCP");
    assert!(
        (1..=2).contains(&unix),
        "{unix} server connections over the Unix socket, pool_size 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_server_over_its_unix_socket() {
    let env = UnixEnv::start(ProxyOpts::default()).await;
    let c = env.connect().await;
    cancel_a_running_pg_sleep(&c, &env.cluster).await;
}

/// As in libpq, `server_tls_sslmode` does not apply to a Unix socket: `require` against a
/// server without TLS refuses over TCP (tests/tls.rs) but logs in over the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_not_asked_for_over_a_unix_socket() {
    let env = UnixEnv::start(ProxyOpts {
        extra: vec!["server_tls_sslmode = \"require\"".into()],
        ..ProxyOpts::default()
    })
    .await;
    let c = env.connect().await;
    assert_eq!(
        scalar(&c, "SELECT 'over the socket'").await,
        "over the socket"
    );
}

/// A directory with no PostgreSQL socket in it: the client is told what could not be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_is_named_in_the_error() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let opts = ProxyOpts {
        extra: vec!["query_wait_timeout = \"1s\"".into()],
        ..ProxyOpts::default()
    };
    let missing = tempfile::tempdir().expect("temp dir");
    let toml = unix_toml(&cluster, &opts).replace(
        &format!("host = \"{}\"", cluster.socket_dir().display()),
        &format!("host = \"{}\"", missing.path().display()),
    );
    let proxy = start_proxy(&toml).await;
    let config = client_config(proxy.local_addr(), "app", Some("secret"), "app");
    let err = within("connecting through the proxy", connect(&config))
        .await
        .err()
        .expect("no server to log in to");
    assert_eq!(sqlstate(&err), "08006", "{}", describe(&err));
    let message = db_message(&err);
    assert!(
        message.contains(&missing.path().display().to_string()),
        "{message}"
    );
}

/// `/readyz` before any pool is open connects to the upstream itself: over the socket when
/// `host` is a directory, and it says which database cannot be reached when there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_checks_the_unix_socket() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let metrics = "\n[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let toml = unix_toml(&cluster, &ProxyOpts::default()) + metrics;
    let proxy = start_proxy(&toml).await;
    let addr = proxy.metrics_addr().expect("[metrics] listen is served");
    let (status, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");

    let missing = tempfile::tempdir().expect("temp dir");
    let toml = toml.replace(
        &format!("host = \"{}\"", cluster.socket_dir().display()),
        &format!("host = \"{}\"", missing.path().display()),
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.metrics_addr().expect("[metrics] listen is served");
    let (status, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database app"), "{body}");
    assert!(body.contains("unreachable"), "{body}");
}
