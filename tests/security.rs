//! Who may log in: `auth_file` (userlist.txt), `hba_file` (pg_hba.conf format), the brute-force
//! lockout, and startup parameters that would change identity.

mod common;

use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;

/// A proxy with a fixed upstream login (`app`), `[floodgate]` lines `extra`.
async fn env(extra: &str) -> Env {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\nauth_type = \"scram-sha-256\"\n\
         default_pool_size = 2\nquery_wait_timeout = \"30s\"\n{extra}\n\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\nuser = \"app\"\npassword = \"secret\"\n",
        cluster.host(),
        cluster.port()
    );
    let proxy = start_proxy(&toml).await;
    Env { cluster, proxy }
}

async fn refused(env: &Env, user: &str, password: &str) -> tokio_postgres::Error {
    match env.try_connect(user, Some(password), "app").await {
        Ok(_) => panic!("{user} logged in"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn users_from_an_auth_file_log_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("userlist.txt");
    std::fs::write(
        &file,
        "; PgBouncer's format\n\"alice\" \"alice-pw\"\n\"app\" \"not-this-one\"\n",
    )
    .unwrap();
    let env = env(&format!("auth_file = \"{}\"", file.display())).await;
    let alice = env
        .try_connect("alice", Some("alice-pw"), "app")
        .await
        .expect("a user from auth_file logs in");
    assert_eq!(scalar(&alice, "SELECT current_user").await, "app");
    // [[users]] wins over the file for the same name.
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
    assert_eq!(sqlstate(&refused(&env, "alice", "wrong").await), "28P01");
}

#[tokio::test]
async fn hba_file_rules_allow_and_reject() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hba.conf");
    std::fs::write(
        &file,
        "# who may log in\nhost app mallory 127.0.0.1/32 reject\n\
         host app app,mallory 127.0.0.0/8 md5\nhostssl all all all scram-sha-256\n",
    )
    .unwrap();
    let dir2 = tempfile::tempdir().expect("tempdir");
    let list = dir2.path().join("userlist.txt");
    std::fs::write(&list, "\"mallory\" \"m-pw\"\n\"eve\" \"e-pw\"\n").unwrap();
    let env = env(&format!(
        "hba_file = \"{}\"\nauth_file = \"{}\"",
        file.display(),
        list.display()
    ))
    .await;
    // app is allowed (md5 from this line: tokio-postgres answers whatever is asked).
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
    let err = refused(&env, "mallory", "m-pw").await;
    assert_eq!(sqlstate(&err), "28000");
    assert!(db_message(&err).contains("line 2"), "{}", describe(&err));
    // No line for eve over plain text.
    let err = refused(&env, "eve", "e-pw").await;
    assert_eq!(sqlstate(&err), "28000");
    assert!(
        db_message(&err).contains("no hba_file entry"),
        "{}",
        describe(&err)
    );
}

#[tokio::test]
async fn repeated_failures_lock_an_address_out_until_the_ban_ends() {
    let env =
        env("auth_failure_limit = 3\nauth_failure_window = \"60s\"\nauth_failure_ban = \"1500ms\"")
            .await;
    for _ in 0..3 {
        assert_eq!(sqlstate(&refused(&env, "app", "guess").await), "28P01");
    }
    // Now even the right password is refused, with the reason.
    let err = refused(&env, "app", "secret").await;
    assert_eq!(sqlstate(&err), "28000");
    assert!(
        db_message(&err).contains("auth_failure_limit"),
        "{}",
        describe(&err)
    );
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
}

#[tokio::test]
async fn identity_changing_startup_parameters_are_refused() {
    let env = env("").await;
    let mut config = env.config("app", Some("secret"), "app");
    config.options("-c role=postgres");
    let err = match connect(&config).await {
        Ok(_) => panic!("a role was set at startup"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "28000", "{}", describe(&err));
    let mut config = env.config("app", Some("secret"), "app");
    config.options("-c session_authorization=postgres");
    let err = match connect(&config).await {
        Ok(_) => panic!("a session authorization was set at startup"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "28000", "{}", describe(&err));
    let mut raw = raw_connect(env.addr()).await;
    let startup = startup_message(&[
        ("user", "app"),
        ("database", "app"),
        ("replication", "database"),
    ]);
    send_raw(&mut raw, &startup).await;
    let fields = expect_error_then_close(&mut raw, "a replication startup").await;
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("0A000"),
        "{fields:?}"
    );
    // The proxy goes on serving.
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT 1").await, "1");
}

/// SCRAM pass-through: `[[users]]` holds only PostgreSQL's own SCRAM secret; the client's proof
/// gives Floodgate the key it logs in upstream with, and no plain-text password is stored.
#[tokio::test]
async fn a_scram_secret_alone_logs_in_upstream() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let secret = cluster_sql(
        &cluster,
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
    )
    .await;
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\nauth_type = \"scram-sha-256\"\n\
         default_pool_size = 2\n\n[[users]]\nname = \"app\"\npassword = \"{secret}\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n",
        cluster.host(),
        cluster.port()
    );
    assert!(
        !toml.contains("\"secret\""),
        "no plain-text password in the config"
    );
    let proxy = start_proxy(&toml).await;
    let env = Env { cluster, proxy };
    let app = env.connect().await;
    assert_eq!(scalar(&app, "SELECT current_user").await, "app");
    // More servers log in with the same key.
    let others: Vec<Conn> = two_more_clients(&env).await;
    for conn in &others {
        admin_sql(conn, "BEGIN").await;
        assert_eq!(scalar(conn, "SELECT 1").await, "1");
    }
    for conn in &others {
        admin_sql(conn, "COMMIT").await;
    }
    assert_eq!(env.backend_count().await, 2);
    // A wrong password still fails, and does not replace the key.
    assert_eq!(sqlstate(&refused(&env, "app", "wrong").await), "28P01");
    assert_eq!(scalar(&app, "SELECT 2").await, "2");
}

async fn two_more_clients(env: &Env) -> Vec<Conn> {
    vec![env.connect().await, env.connect().await]
}

async fn admin_sql(conn: &Conn, sql: &str) {
    within(sql, conn.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
}

/// auth_query: a user only PostgreSQL knows logs in (its SCRAM secret looked up through the
/// auth_user's pool, then used for pass-through); an expired role (VALID UNTIL) does not.
#[tokio::test]
async fn auth_query_finds_users_postgres_knows_and_honours_valid_until() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    cluster_sql(
        &cluster,
        "postgres",
        "CREATE ROLE authq LOGIN SUPERUSER PASSWORD 'authq-pw'; \
         CREATE ROLE dyn LOGIN PASSWORD 'dyn-pw'; \
         CREATE ROLE old LOGIN PASSWORD 'old-pw' VALID UNTIL '2000-01-01'",
    )
    .await;
    let toml = format!(
        "[floodgate]\nlisten = \"127.0.0.1:0\"\nauth_type = \"scram-sha-256\"\n\
         default_pool_size = 2\nauth_user = \"authq\"\n\n\
         [[users]]\nname = \"authq\"\npassword = \"authq-pw\"\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n",
        cluster.host(),
        cluster.port()
    );
    let proxy = start_proxy(&toml).await;
    let env = Env { cluster, proxy };
    let dyn_user = env
        .try_connect("dyn", Some("dyn-pw"), "app")
        .await
        .expect("a user found by auth_query logs in");
    assert_eq!(scalar(&dyn_user, "SELECT current_user").await, "dyn");
    assert_eq!(sqlstate(&refused(&env, "dyn", "wrong").await), "28P01");
    assert_eq!(sqlstate(&refused(&env, "old", "old-pw").await), "28P01");
    assert_eq!(sqlstate(&refused(&env, "nobody", "x").await), "28P01");
    // The client's startup parameters never reach the lookup's session.
    let mut config = env.config("dyn", Some("dyn-pw"), "app");
    config.options("-c search_path=evil");
    let again = connect(&config).await.expect("login with a search_path");
    assert_eq!(scalar(&again, "SELECT 1").await, "1");
}
