//! `floodgate import-pgbouncer`: a PgBouncer configuration (comments, `%include`, a `*` fallback
//! database, quoted connection strings) becomes an equivalent floodgate.toml, and what cannot be
//! mapped is listed with the reason.

use std::process::Command;

fn import(args: &[&std::path::Path]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .arg("import-pgbouncer")
        .args(args)
        .output()
        .expect("floodgate runs")
}

#[test]
fn a_pgbouncer_ini_becomes_an_equivalent_floodgate_toml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ini = dir.path().join("pgbouncer.ini");
    let more = dir.path().join("databases.ini");
    let users = dir.path().join("userlist.txt");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    std::fs::write(
        &ini,
        format!(
            "; main file\n[pgbouncer]\nlisten_addr = *\nlisten_port = 6543\n# comment\n\
         auth_type = scram-sha-256\npool_mode = transaction\ndefault_pool_size = 25\n\
         reserve_pool_size = 5\nreserve_pool_timeout = 2.5\nmax_client_conn = 5000\n\
         query_wait_timeout = 60\nserver_lifetime = 1800\nadmin_users = ops, admin\n\
         ignore_startup_parameters = extra_float_digits,options\nlogfile = /var/log/pgbouncer.log\n\
         client_tls_sslmode = require\nclient_tls_key_file = {key}\n\
         client_tls_cert_file = {cert}\nclient_tls_ecdhcurve = auto\n%include databases.ini\n",
            key = key.display(),
            cert = cert.display(),
        ),
    )
    .unwrap();
    std::fs::write(
        &more,
        "[databases]\napp = host=db1.internal port=5433 dbname='app prod' pool_size=40\n\
         reports = host=db2 dbname=reports user=reader password='it\\'s' reserve_pool=3\n\
         * = host=fallback\n",
    )
    .unwrap();
    std::fs::write(
        &users,
        "\"app\" \"app-pw\"\n\"ops\" \"SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5\"\n",
    )
    .unwrap();
    let out = import(&[&ini, &users]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let toml = String::from_utf8_lossy(&out.stdout).to_string();
    let config =
        floodgate::config::Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let g = &config.floodgate;
    assert_eq!(g.listen.to_string(), "0.0.0.0:6543");
    assert_eq!(g.default_pool_size, 25);
    assert_eq!(g.reserve_pool_size, 5);
    assert_eq!(
        g.reserve_pool_timeout,
        std::time::Duration::from_millis(2500)
    );
    assert_eq!(g.max_client_conn, 5000);
    assert_eq!(g.query_wait_timeout, std::time::Duration::from_secs(60));
    assert_eq!(g.server_lifetime, std::time::Duration::from_secs(1800));
    assert_eq!(g.admin_users, ["ops", "admin"]);
    assert_eq!(
        g.ignore_startup_parameters,
        ["extra_float_digits", "options"]
    );
    let app = &config.databases["app"];
    assert_eq!((app.host.as_str(), app.port), ("db1.internal", 5433));
    assert_eq!(app.dbname.as_deref(), Some("app prod"));
    assert_eq!(app.pool_size, Some(40));
    let reports = &config.databases["reports"];
    assert_eq!(reports.user.as_deref(), Some("reader"));
    assert_eq!(reports.password.as_deref(), Some("it's"));
    assert_eq!(reports.reserve_pool_size, Some(3));
    assert_eq!(config.users.len(), 2);
    assert!(config.user("ops").is_some());
    // What could not be mapped is listed, with why.
    assert_eq!(g.client_tls_sslmode, floodgate::tls::SslMode::Require);
    assert_eq!(g.client_tls_key_file.as_deref(), Some(key.as_path()));
    for expected in ["[databases] *", "logfile", "client_tls_ecdhcurve"] {
        assert!(
            stderr.contains(expected),
            "{expected} not listed:\n{stderr}"
        );
    }
    assert!(stderr.contains("key-exchange groups"), "{stderr}");
}

/// As in PgBouncer, a database without `host` is reached over the Unix socket in
/// `unix_socket_dir` (default /tmp); a host that is a directory stays one.
#[test]
fn databases_without_a_host_use_the_unix_socket_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ini = dir.path().join("pgbouncer.ini");
    let databases = "[databases]\nlocal = dbname=app\nsocket = host=/var/run/postgresql port=5433\n\
                     tcp = host=10.0.0.5\n";
    std::fs::write(
        &ini,
        format!("[pgbouncer]\nlisten_port = 6432\n{databases}"),
    )
    .unwrap();
    let config = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let toml = String::from_utf8_lossy(&out.stdout).to_string();
        floodgate::config::Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
    };
    let defaults = config(&import(&[&ini]));
    assert_eq!(defaults.databases["local"].host, "/tmp");
    assert_eq!(defaults.databases["socket"].host, "/var/run/postgresql");
    assert_eq!(defaults.databases["socket"].port, 5433);
    assert_eq!(defaults.databases["tcp"].host, "10.0.0.5");

    let with_dir = "[pgbouncer]\nunix_socket_dir = /run/pg\n";
    std::fs::write(&ini, format!("{with_dir}{databases}")).unwrap();
    assert_eq!(config(&import(&[&ini])).databases["local"].host, "/run/pg");

    // Unix sockets off: the database falls back to 127.0.0.1, and the import says so.
    std::fs::write(&ini, format!("[pgbouncer]\nunix_socket_dir =\n{databases}")).unwrap();
    let out = import(&[&ini]);
    assert_eq!(config(&out).databases["local"].host, "127.0.0.1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[databases] local: no host"), "{stderr}");
}

#[test]
fn an_unreadable_file_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.ini");
    let out = import(&[&missing]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.ini"));
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(&ini, "[pgbouncer]\n%include missing.ini\n").unwrap();
    assert!(!import(&[&ini]).status.success());
}
