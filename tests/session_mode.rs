//! Session pooling: a client keeps its server (so named prepared statements work across
//! transactions), and the server is reset (DISCARD ALL) before the next client gets it.

mod common;

use common::*;
use floodgate::pgcluster::HbaAuth;

async fn env(pool_size: usize) -> Env {
    let opts = ProxyOpts {
        pool_mode: "session",
        pool_size,
        ..ProxyOpts::default()
    };
    Env::start(HbaAuth::ScramSha256, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_work_across_transactions() {
    let env = env(2).await;
    let mut a = env.connect().await;
    let b = env.connect().await;
    let add = within("prepare", a.prepare("SELECT $1::int4 + 1"))
        .await
        .unwrap();
    let echo = within("prepare", b.prepare("SELECT $1::text || ' from b'"))
        .await
        .unwrap();

    for i in 0..5i32 {
        let t = within("begin", a.transaction()).await.unwrap();
        let row = within("execute in tx", t.query_one(&add, &[&i]))
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        within("commit", t.commit()).await.unwrap();
        // Another client's named statement, interleaved.
        let row = within("execute b", b.query_one(&echo, &[&i.to_string()]))
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), format!("{i} from b"));
        // Outside any transaction too.
        let row = within("execute outside tx", a.query_one(&add, &[&(i * 10)]))
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 10 + 1);
    }
    let names = scalar(&a, "SELECT count(*) FROM pg_prepared_statements").await;
    assert_eq!(names, "1", "A's server holds exactly A's statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_client_does_not_inherit_session_state() {
    let env = env(1).await;
    let a = env.connect().await;
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    within(
        "session state",
        a.batch_execute(
            "CREATE TEMP TABLE sess_tmp (x int); INSERT INTO sess_tmp VALUES (1); \
             SET TimeZone = 'Asia/Tokyo'; SET floodgate_test.marker = 'from_a'; \
             PREPARE sess_stmt AS SELECT 1; LISTEN sess_channel; \
             SELECT pg_advisory_lock(7)",
        ),
    )
    .await
    .unwrap();
    let _stmt = within("prepare", a.prepare("SELECT 2")).await.unwrap();
    assert_eq!(scalar(&a, "SELECT count(*) FROM sess_tmp").await, "1");
    drop(_stmt);
    drop(a);

    let b = env.connect().await;
    let pid_b = scalar(&b, "SELECT pg_backend_pid()").await;
    assert_eq!(
        pid_a, pid_b,
        "pool of 1 in session mode: B reuses A's server"
    );
    assert_eq!(
        scalar(&b, "SELECT to_regclass('pg_temp.sess_tmp') IS NULL").await,
        "t",
        "A's TEMP table"
    );
    assert_ne!(
        scalar(&b, "SHOW TimeZone").await,
        "Asia/Tokyo",
        "A's SET TimeZone"
    );
    let marker = scalar(
        &b,
        "SELECT coalesce(current_setting('floodgate_test.marker', true), '')",
    )
    .await;
    assert_eq!(marker, "", "A's custom setting");
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM pg_prepared_statements").await,
        "0",
        "A's prepared statements"
    );
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM pg_listening_channels()").await,
        "0",
        "A's LISTEN"
    );
    let locks = scalar(
        &b,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(locks, "0", "A's advisory lock");
    // B can use the names A used.
    within(
        "B",
        b.batch_execute("PREPARE sess_stmt AS SELECT 3; CREATE TEMP TABLE sess_tmp (y int)"),
    )
    .await
    .unwrap();
}
