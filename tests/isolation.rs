//! No client ever sees another client's session state: per-client session parameters (startup
//! packet, libpq `options`, session-level SET), roles, settings, LISTEN, SQL-prepared
//! statements, WITH HOLD cursors, temporary tables and advisory locks left by one client never
//! reach the next one on the same server; the proxy's shared statements cannot be replaced by a
//! client; a stale plan does not break a statement for good; a fixed upstream user shares one
//! pool; the SCRAM exchange does not reveal which users exist.

mod common;

use std::sync::Arc;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::io::AsyncWriteExt;

/// A proxy with pool `pool_size` (SCRAM upstream, trust for raw sockets).
async fn env(pool_size: usize) -> Env {
    trust_env(pool_size, &[]).await
}

/// Three tenant schemas, each with a table `t` holding its own name, and `public.t` holding
/// "public" (what a client without a search_path of its own sees).
async fn tenant_schemas(env: &Env) {
    let mut sql = String::from(
        "CREATE TABLE public.t (v text); INSERT INTO public.t VALUES ('public'); \
         GRANT SELECT ON public.t TO app;",
    );
    for n in 0..3 {
        sql += &format!(
            "CREATE SCHEMA tenant_{n} AUTHORIZATION app; \
             CREATE TABLE tenant_{n}.t (v text); INSERT INTO tenant_{n}.t VALUES ('tenant_{n}'); \
             ALTER TABLE tenant_{n}.t OWNER TO app;"
        );
    }
    env.sql("app", &sql).await;
}

/// Connects with libpq-style `options`.
async fn connect_with_options(env: &Env, options: &str) -> Conn {
    let mut config = env.config("app", None, "app");
    config.options(options);
    env.connect_with(&config).await
}

/// What `SELECT v FROM t` and `SHOW search_path` say, through the extended protocol.
async fn tenant_seen(c: &Conn) -> (String, String) {
    let row = within("select the tenant", c.query_one("SELECT v FROM t", &[]))
        .await
        .expect("SELECT v FROM t");
    let path = scalar(c, "SHOW search_path").await;
    (row.get(0), path)
}

/// Issue: search_path set at startup leaked between clients, and a client that set nothing
/// inherited someone else's. 20 clients, 3 tenants (and clients with no search_path), pool 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_stays_with_its_client() {
    let env = env(2).await;
    tenant_schemas(&env).await;
    let env = Arc::new(env);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            // Every fourth client sets nothing and must see the server's default.
            let tenant = (i % 4 < 3).then(|| format!("tenant_{}", i % 4));
            let c = match &tenant {
                Some(t) => connect_with_options(&env, &format!("-c search_path={t}")).await,
                None => env.connect_with(&env.config("app", None, "app")).await,
            };
            let expected_table = tenant.clone().unwrap_or_else(|| "public".into());
            let expected_path = tenant.unwrap_or_else(|| "\"$user\", public".into());
            for round in 0..10 {
                let (table, path) = tenant_seen(&c).await;
                assert_eq!(table, expected_table, "client {i} round {round}");
                assert_eq!(path, expected_path, "client {i} round {round}");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
}

/// A search_path in the startup packet itself (asyncpg's server_settings, pgjdbc's
/// currentSchema) is applied like libpq's options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_as_a_startup_parameter() {
    let env = env(1).await;
    tenant_schemas(&env).await;
    let mut raw = raw_connect(env.addr()).await;
    let startup = startup_message(&[
        ("user", "app"),
        ("database", "app"),
        ("search_path", "tenant_2"),
    ]);
    send_raw(&mut raw, &startup).await;
    read_until_ready(&mut raw).await;
    send_raw(&mut raw, &query_message("SELECT v FROM t")).await;
    let rows = read_until_ready(&mut raw).await;
    assert!(
        rows.iter()
            .any(|(t, body)| *t == b'D' && body.ends_with(b"tenant_2")),
        "{rows:?}"
    );
    // Another client on the same (only) server sees the default.
    let other = env.connect_with(&env.config("app", None, "app")).await;
    assert_eq!(tenant_seen(&other).await.0, "public");
}

/// Reads messages until ReadyForQuery; returns them (type, body).
async fn read_until_ready(raw: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    within("messages up to ReadyForQuery", async {
        let mut seen = Vec::new();
        loop {
            match read_message(raw).await {
                Incoming::Message(b'Z', body) => {
                    seen.push((b'Z', body));
                    return seen;
                }
                Incoming::Message(t, body) => seen.push((t, body)),
                Incoming::Closed => panic!("closed; got {seen:?}"),
            }
        }
    })
    .await
}

/// A client's own session-level SET of a tracked parameter stays with it (as on a direct
/// connection) and never reaches another client, on a pool of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_set_search_path_follows_its_client_only() {
    let env = env(1).await;
    tenant_schemas(&env).await;
    let a = env.connect_with(&env.config("app", None, "app")).await;
    let b = connect_with_options(&env, "-c search_path=tenant_0").await;
    scalar(&a, "SET search_path = tenant_1; SELECT 1").await;
    for _ in 0..3 {
        assert_eq!(tenant_seen(&b).await.0, "tenant_0");
        assert_eq!(tenant_seen(&a).await.0, "tenant_1");
    }
    // A SET rolled back with its transaction is undone, as on PostgreSQL.
    scalar(&a, "BEGIN; SET search_path = tenant_2; ROLLBACK; SELECT 1").await;
    assert_eq!(tenant_seen(&a).await.0, "tenant_1");
    scalar(&a, "RESET search_path; SELECT 1").await;
    assert_eq!(tenant_seen(&a).await.0, "public");
    assert_eq!(tenant_seen(&b).await.0, "tenant_0");
}

/// Issue: after `SET ROLE other`, the next client of the pool ran as `other` and, with row-level
/// security keyed on current_user, saw another tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_never_reaches_the_next_client() {
    let env = env(1).await;
    env.sql(
        "app",
        "CREATE ROLE other; GRANT other TO app; \
         CREATE TABLE secrets (owner name, v text); \
         INSERT INTO secrets VALUES ('app', 'mine'), ('other', 'theirs'); \
         ALTER TABLE secrets ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY own ON secrets USING (owner = current_user); \
         GRANT SELECT ON secrets TO app, other;",
    )
    .await;
    let a = env.connect().await;
    let pid = scalar(&a, "SELECT pg_backend_pid()").await;
    scalar(&a, "SET ROLE other; SELECT 1").await;
    assert_eq!(scalar(&a, "SELECT current_user").await, "app", "not kept");
    scalar(&a, "SET SESSION ROLE other; SELECT 1").await;
    a.vanish().await;

    let b = env.connect().await;
    assert_eq!(
        scalar(&b, "SELECT pg_backend_pid()").await,
        pid,
        "same server"
    );
    assert_eq!(scalar(&b, "SELECT current_user").await, "app");
    assert_eq!(
        scalar(&b, "SELECT string_agg(v, ',') FROM secrets").await,
        "mine"
    );
}

/// Settings, LISTEN, SQL PREPARE, WITH HOLD cursors, temporary tables and advisory locks one
/// client leaves on a server are gone before the next client gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_is_cleaned_before_the_next_client() {
    let env = env(1).await;
    let a = env.connect().await;
    let pid = scalar(&a, "SELECT pg_backend_pid()").await;
    for sql in [
        "SET statement_timeout = '1234s'",
        "SELECT set_config('work_mem', '7MB', false)",
        "LISTEN floodgate_test",
        "PREPARE q(int) AS SELECT $1",
        "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        "CREATE TEMP TABLE scratch (a int)",
        "SELECT pg_advisory_lock(4242)",
    ] {
        within(sql, a.batch_execute(sql)).await.expect(sql);
    }
    let b = env.connect().await;
    assert_eq!(
        scalar(&b, "SELECT pg_backend_pid()").await,
        pid,
        "same server"
    );
    let checks = [
        ("SHOW statement_timeout", "0"),
        ("SHOW work_mem", "4MB"),
        ("SELECT count(*) FROM pg_listening_channels()", "0"),
        (
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'q'",
            "0",
        ),
        ("SELECT count(*) FROM pg_cursors", "0"),
        (
            "SELECT count(*) FROM pg_class WHERE relname = 'scratch'",
            "0",
        ),
        (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
    ];
    for (sql, expected) in checks {
        assert_eq!(scalar(&b, sql).await, expected, "{sql}");
    }
    // The client that left the state is still served (on the cleaned server).
    assert_eq!(scalar(&a, "SELECT 1").await, "1");
}

/// The last statement the pool's one server ran, as PostgreSQL itself reports it.
async fn last_server_query(env: &Env) -> String {
    env.sql(
        "postgres",
        "SELECT query FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app'",
    )
    .await
}

/// The common path pays no extra round trip: after `SET LOCAL` in a transaction (and ordinary
/// statements) the server's last statement is the client's own, not a cleanup. A session-level
/// SET is followed by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_costs_no_cleanup() {
    let env = env(1).await;
    let a = env.connect().await;
    let sql = "BEGIN; SET LOCAL statement_timeout = '7s'; SELECT 1; COMMIT";
    a.batch_execute(sql).await.unwrap();
    assert_eq!(last_server_query(&env).await, sql);
    let s = a.prepare("SELECT $1::int").await.unwrap();
    a.query(&s, &[&1i32]).await.unwrap();
    assert_eq!(last_server_query(&env).await, "SELECT $1::int");

    a.batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    let last = last_server_query(&env).await;
    assert!(
        last.contains("RESET ALL"),
        "cleaned up after a session SET: {last}"
    );
    assert_eq!(scalar(&a, "SHOW statement_timeout").await, "0");
}

/// Issue: any client could `DEALLOCATE` a shared statement and `PREPARE` its own under that
/// name; the next client whose statement mapped to it got 42 instead of its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_statements_cannot_be_replaced() {
    let env = env(1).await;
    let a = env.connect().await;
    let statement = within("prepare", a.prepare("SELECT $1::int2 AS v"))
        .await
        .expect("prepare");
    let first: i16 = a.query_one(&statement, &[&7i16]).await.unwrap().get(0);
    assert_eq!(first, 7);

    let b = env.connect().await;
    let name = scalar(
        &b,
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int2%'",
    )
    .await;
    let well_formed = name
        .strip_prefix("__fg_")
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(tag, n)| {
            tag.len() == 8 && tag.bytes().all(|c| c.is_ascii_hexdigit()) && n.parse::<u64>().is_ok()
        });
    assert!(well_formed, "proxy names carry a per-process tag: {name}");
    within(
        "replace the statement",
        b.batch_execute(&format!(
            "DEALLOCATE {name}; PREPARE {name}(int2) AS SELECT 42::int2"
        )),
    )
    .await
    .expect("a client may run SQL PREPARE");
    for v in [8i16, 9, 10] {
        let got: i16 = within("run the statement", a.query_one(&statement, &[&v]))
            .await
            .expect("the statement still works")
            .get(0);
        assert_eq!(got, v, "the client's own statement answered");
    }
}

/// Issue: after `ALTER TABLE` under a prepared `SELECT *`, every retry failed with 0A000 until
/// the server was recycled. Now the first use fails as on PostgreSQL, and preparing again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_plan_is_prepared_again() {
    let env = env(1).await;
    env.sql(
        "app",
        "CREATE TABLE sc (a int); INSERT INTO sc VALUES (1); ALTER TABLE sc OWNER TO app;",
    )
    .await;
    let c = env.connect().await;
    let before = within("prepare", c.prepare("SELECT * FROM sc"))
        .await
        .unwrap();
    assert_eq!(c.query(&before, &[]).await.unwrap()[0].len(), 1);
    env.sql("app", "ALTER TABLE sc ADD COLUMN b int DEFAULT 2")
        .await;

    // In one transaction, as pgjdbc and asyncpg retry: the failure, then a new Parse.
    let err = within("stale", c.query(&before, &[]))
        .await
        .expect_err("PostgreSQL refuses the stale plan");
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    let again = within("prepare again", c.prepare("SELECT * FROM sc"))
        .await
        .expect("prepare again");
    let rows = within("run again", c.query(&again, &[])).await.unwrap();
    assert_eq!(rows[0].len(), 2, "the new plan sees the new column");
    // Another client preparing the same text gets the fresh plan too.
    let other = env.connect().await;
    let s = other.prepare("SELECT * FROM sc").await.unwrap();
    assert_eq!(other.query(&s, &[]).await.unwrap()[0].len(), 2);
}

/// Issue: a fixed upstream `user` still made one pool per client user, so pool_size was
/// exceeded by the number of users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_upstream_user_shares_one_pool() {
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let opts = ProxyOpts {
        auth_type: "trust",
        pool_size: 2,
        extra: vec!["query_wait_timeout = \"1s\"".into()],
        users: vec![
            ("app".into(), "secret".into()),
            ("reporter".into(), "other".into()),
        ],
        ..ProxyOpts::default()
    };
    let toml = proxy_toml(&cluster, &opts) + "user = \"app\"\npassword = \"secret\"\n";
    let proxy = start_proxy(&toml).await;
    let env = Env { cluster, proxy };
    let a = env.connect_with(&env.config("app", None, "app")).await;
    let r = env.connect_with(&env.config("reporter", None, "app")).await;
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    r.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Both servers of the one pool are held: a third client of either user waits, then gets
    // 53300 from query_wait_timeout.
    let third = env.connect_with(&env.config("reporter", None, "app")).await;
    let err = within("wait", third.simple_query("SELECT 1"))
        .await
        .expect_err("the pool is full");
    assert_eq!(sqlstate(&err), "53300", "{}", describe(&err));
    assert_eq!(env.backend_count().await, 2);
    a.batch_execute("COMMIT").await.unwrap();
    r.batch_execute("COMMIT").await.unwrap();
}

/// The salt a SCRAM exchange offers for `user`.
async fn scram_salt(env: &Env, user: &str) -> String {
    let mut raw = raw_connect(env.addr()).await;
    send_raw(
        &mut raw,
        &startup_message(&[("user", user), ("database", "app")]),
    )
    .await;
    match within("AuthenticationSASL", read_message(&mut raw)).await {
        Incoming::Message(b'R', body) => assert_eq!(&body[..4], &10i32.to_be_bytes()),
        other => panic!("expected AuthenticationSASL, got {other:?}"),
    }
    let first = b"n,,n=,r=abcdefghijklmnop";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first);
    raw.write_all(&message(b'p', &body)).await.unwrap();
    let server_first = match within("SASLContinue", read_message(&mut raw)).await {
        Incoming::Message(b'R', body) => String::from_utf8(body[4..].to_vec()).unwrap(),
        other => panic!("expected AuthenticationSASLContinue, got {other:?}"),
    };
    server_first
        .split(',')
        .find_map(|f| f.strip_prefix("s="))
        .expect("a salt")
        .to_string()
}

/// Issue: an unknown user's salt changed on every attempt, a real user's did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_does_not_reveal_which_users_exist() {
    let env = Env::start(HbaAuth::ScramSha256, ProxyOpts::default()).await;
    let real = scram_salt(&env, "app").await;
    assert_eq!(real, scram_salt(&env, "app").await);
    let ghost = scram_salt(&env, "ghost").await;
    assert_eq!(
        ghost,
        scram_salt(&env, "ghost").await,
        "stable, like a real one"
    );
    assert_ne!(ghost, scram_salt(&env, "phantom").await, "per user");
    assert_ne!(ghost, real);
}

/// libpq's options: only `-c name=value` of tracked (or ignored) parameters; anything else is
/// refused with a message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_outside_the_tracked_set_are_refused_clearly() {
    let env = env(1).await;
    let mut config = env.config("app", None, "app");
    config.options("-c geqo=off");
    let err = within("connect", connect(&config))
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), "08P01", "{}", describe(&err));
    assert!(db_message(&err).contains("geqo"), "{}", describe(&err));
    assert!(db_message(&err).contains("track_extra_parameters"));

    config.options("-c TimeZone=Asia/Tokyo --application-name=tagged");
    let c = env.connect_with(&config).await;
    assert_eq!(scalar(&c, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(scalar(&c, "SHOW application_name").await, "tagged");
}

/// `track_extra_parameters`: a parameter set at startup is carried per client, and a client
/// without it gets the default back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_tracked_parameters_follow_their_client() {
    let env = trust_env(
        1,
        &["track_extra_parameters = [\"statement_timeout\", \"app.tenant\"]"],
    )
    .await;
    let mut config = env.config("app", None, "app");
    config.options("-c statement_timeout=5s -c app.tenant=42");
    let a = env.connect_with(&config).await;
    let b = env.connect_with(&env.config("app", None, "app")).await;
    for _ in 0..3 {
        assert_eq!(scalar(&a, "SHOW statement_timeout").await, "5s");
        assert_eq!(
            scalar(&a, "SELECT current_setting('app.tenant')").await,
            "42"
        );
        assert_eq!(scalar(&b, "SHOW statement_timeout").await, "0");
        assert_eq!(
            scalar(
                &b,
                "SELECT coalesce(current_setting('app.tenant', true), '')"
            )
            .await,
            ""
        );
    }
}
