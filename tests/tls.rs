//! TLS on both sides, with certificates made by the test (rcgen): psql with sslmode=require and
//! verify-full, client certificates under verify-ca, plain text refused under require, data
//! sent after an SSLRequest never read, direct TLS (ALPN `postgresql`), certificates re-read on
//! reload without dropping sessions, hostssl rules; upstream TLS from prefer to verify-full
//! against a PostgreSQL with `ssl = on`, and no fallback to plain text when TLS is required.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use floodgate::pgcluster::{ClusterOptions, HbaAuth, PgCluster};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority that signs the test's certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), and its key, both PEM.
    fn issue(&self, common_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pair {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

struct Pair {
    cert: String,
    key: String,
}

/// Files for a proxy's `client_tls_*`: its certificate (localhost, 127.0.0.1) and key, the CA
/// that signed it (what clients trust) and the CA client certificates must come from.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        // libpq refuses a private key others can read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// Writes the proxy's certificate (signed by `ca`) and returns the `[floodgate]` lines for
/// `mode`.
fn client_tls(files: &Files, ca: &Ca, mode: &str) -> Vec<String> {
    let proxy = ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    files.write("proxy.crt", &proxy.cert);
    files.write("proxy.key", &proxy.key);
    files.write("ca.crt", &ca.pem());
    vec![
        format!("client_tls_sslmode = \"{mode}\""),
        format!("client_tls_cert_file = \"{}\"", files.path("proxy.crt")),
        format!("client_tls_key_file = \"{}\"", files.path("proxy.key")),
        format!("client_tls_ca_file = \"{}\"", files.path("ca.crt")),
    ]
}

async fn env_with(extra: Vec<String>) -> Env {
    let opts = ProxyOpts {
        extra,
        ..ProxyOpts::default()
    };
    Env::start(HbaAuth::ScramSha256, opts).await
}

/// Runs `psql` with a libpq connection string through the proxy at `port` and `sql`.
async fn psql(port: u16, conninfo: &str, sql: &str) -> std::process::Output {
    let conn = format!("host=localhost port={port} user=app dbname=app {conninfo}");
    run_tool("psql", vec![conn, "-X".into(), "-Atc".into(), sql.into()]).await
}

fn ok_text(out: &std::process::Output) -> String {
    assert!(out.status.success(), "psql failed: {}", tool_text(out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn failed_with(out: &std::process::Output, needle: &str) {
    let text = tool_text(out);
    assert!(!out.status.success(), "psql should have failed: {text}");
    assert!(
        text.contains(needle),
        "psql's error mentions {needle:?}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_require_and_verify_full_and_plain_text_refused() {
    let (files, ca, other_ca) = (Files::new(), Ca::new("test CA"), Ca::new("other CA"));
    files.write("other.crt", &other_ca.pem());
    let mut extra = client_tls(&files, &ca, "require");
    extra.push("admin_users = [\"app\"]".into());
    let env = env_with(extra).await;
    let port = env.addr().port();

    let out = psql(port, "sslmode=require", "SELECT 40 + 2").await;
    assert_eq!(ok_text(&out), "42");
    let conninfo = psql(port, "sslmode=require", "\\conninfo").await;
    assert!(
        ok_text(&conninfo).contains("SSL connection"),
        "{}",
        tool_text(&conninfo)
    );

    let root = format!("sslmode=verify-full sslrootcert={}", files.path("ca.crt"));
    assert_eq!(
        ok_text(&psql(port, &root, "SELECT current_user").await),
        "app"
    );
    let wrong = format!(
        "sslmode=verify-full sslrootcert={}",
        files.path("other.crt")
    );
    failed_with(
        &psql(port, &wrong, "SELECT 1").await,
        "certificate verify failed",
    );

    // Plain text: refused with 28000, whoever asks.
    failed_with(
        &psql(port, "sslmode=disable", "SELECT 1").await,
        "SSL/TLS required",
    );
    let err = env
        .try_connect("app", Some("secret"), "app")
        .await
        .err()
        .expect("a plain-text login is refused under require");
    assert_eq!(sqlstate(&err), "28000", "{}", describe(&err));

    // The console shows a connected client's TLS.
    let ca_file = PathBuf::from(files.path("ca.crt"));
    let session = direct_session(&env, &ca_file, Some(b"postgresql"))
        .await
        .unwrap();
    let clients = psql(port, "sslmode=require dbname=pgbouncer", "SHOW CLIENTS");
    let clients = ok_text(&clients.await);
    assert!(
        clients.contains("TLSv1."),
        "SHOW CLIENTS has a tls column: {clients}"
    );
    drop(session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_under_verify_ca() {
    let (files, ca, other_ca) = (Files::new(), Ca::new("test CA"), Ca::new("other CA"));
    let env = env_with(client_tls(&files, &ca, "verify-ca")).await;
    let port = env.addr().port();
    let good = ca.issue("app", &[], ExtendedKeyUsagePurpose::ClientAuth);
    files.write("good.crt", &good.cert);
    files.write("good.key", &good.key);
    let foreign = other_ca.issue("app", &[], ExtendedKeyUsagePurpose::ClientAuth);
    files.write("foreign.crt", &foreign.cert);
    files.write("foreign.key", &foreign.key);

    let with = |name: &str| {
        format!(
            "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            files.path("ca.crt"),
            files.path(&format!("{name}.crt")),
            files.path(&format!("{name}.key"))
        )
    };
    assert_eq!(ok_text(&psql(port, &with("good"), "SELECT 1").await), "1");
    let out = psql(port, &with("foreign"), "SELECT 1").await;
    assert!(
        !out.status.success(),
        "a certificate from another CA is refused: {}",
        tool_text(&out)
    );
    let none = "sslmode=require sslcert=/nonexistent sslkey=/nonexistent";
    let out = psql(port, none, "SELECT 1").await;
    assert!(
        !out.status.success(),
        "no certificate is refused: {}",
        tool_text(&out)
    );
    // The proxy still serves a good client afterwards.
    assert_eq!(ok_text(&psql(port, &with("good"), "SELECT 2").await), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_sent_with_the_ssl_request_is_never_read() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let env = env_with(client_tls(&files, &ca, "prefer")).await;
    let bystander = env.connect().await;
    // SSLRequest and, in the same packet, a StartupMessage an attacker slipped in before the
    // handshake: it must never be taken as the client's.
    let mut stream = raw_connect(env.addr()).await;
    let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let startup = startup_message(&[("user", "app"), ("database", "app")]);
    send_raw(&mut stream, &[&ssl_request[..], &startup].concat()).await;
    let fields = expect_error_then_close(&mut stream, "data after SSLRequest").await;
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{fields:?}"
    );
    assert!(
        fields
            .get(&'M')
            .is_some_and(|m| m.contains("unencrypted data after SSL request")),
        "{fields:?}"
    );
    assert_eq!(scalar(&bystander, "SELECT 1").await, "1");
    // Under prefer, plain text still works.
    let plain = env.connect().await;
    assert_eq!(scalar(&plain, "SELECT 3").await, "3");
}

/// A rustls client trusting `ca_file`, offering `alpn`.
fn tls_client(ca_file: &Path, alpn: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Direct TLS (no SSLRequest first) and a tokio-postgres session over it.
async fn direct_session(env: &Env, ca_file: &Path, alpn: Option<&[u8]>) -> Result<Conn, String> {
    let tcp = raw_connect(env.addr()).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = within(
        "TLS handshake",
        tls_client(ca_file, alpn).connect(name, tcp),
    )
    .await
    .map_err(|e| format!("handshake: {e}"))?;
    let config = env.config("app", Some("secret"), "app");
    let (client, connection) = within(
        "login over direct TLS",
        config.connect_raw(tls, tokio_postgres::NoTls),
    )
    .await
    .map_err(|e| format!("login: {}", describe(&e)))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn { client, task })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_and_certificates_reread_on_reload() {
    let (files, ca, next_ca) = (Files::new(), Ca::new("test CA"), Ca::new("next CA"));
    let extra = client_tls(&files, &ca, "require");
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let opts = ProxyOpts {
        extra,
        ..ProxyOpts::default()
    };
    let config_file = files.write("floodgate.toml", &proxy_toml(&cluster, &opts));
    let config = floodgate::config::Config::load(&config_file).unwrap();
    let proxy = floodgate::Proxy::start_from(config, Some(config_file))
        .await
        .unwrap();
    let env = Env { cluster, proxy };
    let ca_file = PathBuf::from(files.path("ca.crt"));
    files.write("first-ca.crt", &ca.pem());
    let first_ca = PathBuf::from(files.path("first-ca.crt"));

    let session = direct_session(&env, &ca_file, Some(b"postgresql"))
        .await
        .expect("direct TLS with ALPN postgresql logs in");
    assert_eq!(scalar(&session, "SELECT 'direct'").await, "direct");
    let without_alpn = direct_session(&env, &ca_file, None).await;
    assert!(without_alpn.is_err(), "direct TLS without ALPN is refused");
    let wrong_alpn = direct_session(&env, &ca_file, Some(b"http/1.1")).await;
    assert!(
        wrong_alpn.is_err(),
        "direct TLS with another ALPN is refused"
    );

    // New certificate from another CA, same file names: a reload reads them again.
    client_tls(&files, &next_ca, "require");
    env.proxy.shared().reload().expect("reload");
    let renewed = direct_session(&env, &ca_file, Some(b"postgresql"))
        .await
        .expect("new clients get the new certificate");
    assert_eq!(scalar(&renewed, "SELECT 'renewed'").await, "renewed");
    assert!(
        direct_session(&env, &first_ca, Some(b"postgresql"))
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    // The session established before the reload goes on.
    assert_eq!(scalar(&session, "SELECT 'still here'").await, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_hostssl_and_hostnossl_see_the_clients_encryption() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let hba = files.write(
        "hba.conf",
        "hostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
    );
    let mut extra = client_tls(&files, &ca, "prefer");
    extra.push(format!("hba_file = \"{}\"", hba.display()));
    let env = env_with(extra).await;
    let port = env.addr().port();
    assert_eq!(
        ok_text(&psql(port, "sslmode=require", "SELECT 1").await),
        "1"
    );
    failed_with(
        &psql(port, "sslmode=disable", "SELECT 1").await,
        "rejects connection",
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------------

/// A cluster with `ssl = on`, its certificate for `localhost` only (not 127.0.0.1) signed by
/// `ca`; `tls_only` refuses plain-text TCP logins.
async fn tls_cluster(ca: &Ca, tls_only: bool) -> Arc<PgCluster> {
    let server = ca.issue(
        "localhost",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let opts = ClusterOptions {
        auth: HbaAuth::ScramSha256,
        extra_conf: vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
        ],
        data_files: vec![
            ("server.crt".into(), server.cert.into_bytes()),
            ("server.key".into(), server.key.into_bytes()),
        ],
        tls_only,
        ..ClusterOptions::default()
    };
    let cluster = tokio::task::spawn_blocking(move || {
        let cluster = PgCluster::start(opts)?;
        cluster.create_user("app", "secret")?;
        cluster.create_database("app", "app")?;
        Ok::<_, floodgate::pgcluster::ClusterError>(cluster)
    });
    Arc::new(
        within("starting PostgreSQL", cluster)
            .await
            .unwrap()
            .unwrap(),
    )
}

/// A proxy in front of `cluster` reached as `host`, with `extra` `[floodgate]` lines.
async fn proxy_to(cluster: &Arc<PgCluster>, host: &str, extra: Vec<String>) -> Env {
    let opts = ProxyOpts {
        extra,
        ..ProxyOpts::default()
    };
    let toml = proxy_toml(cluster, &opts).replace(
        &format!("host = \"{}\"", cluster.host()),
        &format!("host = \"{host}\""),
    );
    Env {
        cluster: cluster.clone(),
        proxy: start_proxy(&toml).await,
    }
}

/// Whether the server connection a client's query runs on is encrypted (PostgreSQL's view).
async fn upstream_uses_tls(env: &Env) -> Result<String, String> {
    let conn = env
        .try_connect("app", Some("secret"), "app")
        .await
        .map_err(|e| describe(&e))?;
    let rows = conn
        .client
        .simple_query("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .map_err(|e| describe(&e))?;
    Ok(first_value(&rows).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_verify_full_checks_the_host_name_and_prefer_encrypts() {
    let (files, ca) = (Files::new(), Ca::new("server CA"));
    let ca_file = files.write("server-ca.crt", &ca.pem());
    let cluster = tls_cluster(&ca, true).await;
    let verify = |mode: &str| {
        vec![
            format!("server_tls_sslmode = \"{mode}\""),
            format!("server_tls_ca_file = \"{}\"", ca_file.display()),
            "server_login_retry = \"0s\"".to_string(),
        ]
    };

    // The certificate names localhost: verify-full through that name works...
    let by_name = proxy_to(&cluster, "localhost", verify("verify-full")).await;
    assert_eq!(upstream_uses_tls(&by_name).await.unwrap(), "true");
    // ...and through 127.0.0.1 is refused: wrong host name.
    let by_ip = proxy_to(&cluster, "127.0.0.1", verify("verify-full")).await;
    let err = upstream_uses_tls(&by_ip)
        .await
        .expect_err("wrong host name");
    assert!(err.contains("TLS") && err.contains("127.0.0.1"), "{err}");
    // verify-ca checks the chain only.
    let chain_only = proxy_to(&cluster, "127.0.0.1", verify("verify-ca")).await;
    assert_eq!(upstream_uses_tls(&chain_only).await.unwrap(), "true");
    // A CA that did not sign it: refused.
    let other = files.write("other-ca.crt", &Ca::new("other CA").pem());
    let extra = vec![
        "server_tls_sslmode = \"verify-ca\"".to_string(),
        format!("server_tls_ca_file = \"{}\"", other.display()),
    ];
    let untrusted = proxy_to(&cluster, "localhost", extra).await;
    let err = upstream_uses_tls(&untrusted).await.expect_err("unknown CA");
    assert!(err.contains("TLS"), "{err}");
    // The default (prefer) uses TLS when the server offers it, against a TLS-only server.
    let default = proxy_to(&cluster, "127.0.0.1", Vec::new()).await;
    assert_eq!(upstream_uses_tls(&default).await.unwrap(), "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_require_never_falls_back_to_plain_text() {
    // A server without TLS: prefer goes on in plain text, require refuses.
    let env = env_with(vec!["server_tls_sslmode = \"require\"".into()]).await;
    let err = env
        .try_connect("app", Some("secret"), "app")
        .await
        .err()
        .expect("no plain-text fallback");
    let text = describe(&err);
    assert!(text.contains("does not accept TLS"), "{text}");
    let plain = env_with(Vec::new()).await;
    assert_eq!(upstream_uses_tls(&plain).await.unwrap(), "false");
    // The proxy that refused still answers others (its console, for one).
    let mut stream = raw_connect(env.addr()).await;
    stream
        .write_all(&startup_message(&[("user", "nobody")]))
        .await
        .unwrap();
    let mut first = [0u8; 1];
    within("an answer", stream.read_exact(&mut first))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_and_requests_over_tls_on_both_sides() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let cluster = tls_cluster(&ca, true).await;
    let mut extra = client_tls(&files, &ca, "require");
    extra.push("server_tls_sslmode = \"verify-ca\"".into());
    extra.push(format!("server_tls_ca_file = \"{}\"", files.path("ca.crt")));
    let env = proxy_to(&cluster, "127.0.0.1", extra).await;
    let ca_file = PathBuf::from(files.path("ca.crt"));
    let session = direct_session(&env, &ca_file, Some(b"postgresql"))
        .await
        .unwrap();
    // About 20 MB down: many TLS records, socket buffers full on the way.
    let rows = session
        .simple_query("SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
        .await
        .unwrap();
    let data_rows = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(data_rows, 20000);
    // 8 MB up, in one query.
    let literal = "y".repeat(8 << 20);
    let sql = format!("SELECT length('{literal}')");
    assert_eq!(scalar(&session, &sql).await, (8 << 20).to_string());
    let sql = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert_eq!(scalar(&session, sql).await, "true");
}
