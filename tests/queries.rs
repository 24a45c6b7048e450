//! Queries through the proxy in transaction mode: simple and extended protocol, multi-statement
//! queries, transactions, COPY in both directions, pipelining and cancellation.

mod common;

use bytes::Bytes;
use common::*;
use floodgate::pgcluster::HbaAuth;
use futures_util::{SinkExt, TryStreamExt, pin_mut};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

async fn env() -> Env {
    Env::start(HbaAuth::ScramSha256, ProxyOpts::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_returns_rows_and_command_tags() {
    let env = env().await;
    let c = env.connect().await;
    let messages = within(
        "simple query",
        c.simple_query("SELECT 1 AS one, 'two' AS two, NULL AS three"),
    )
    .await
    .unwrap();
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((r.get(0), r.get(1), r.get(2))),
            _ => None,
        })
        .collect();
    assert_eq!(rows, [(Some("1"), Some("two"), None)]);
    assert!(
        messages
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(1))),
        "CommandComplete with 1 row"
    );
    assert_eq!(scalar(&c, "SELECT current_user").await, "app");
    assert_eq!(scalar(&c, "SELECT current_database()").await, "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_simple_query_runs_every_statement() {
    let env = env().await;
    let c = env.connect().await;
    let sql = "CREATE TABLE multi (id int); INSERT INTO multi VALUES (1); \
               INSERT INTO multi VALUES (2), (3); SELECT count(*) FROM multi; SELECT 'last'";
    let messages = within("multi-statement query", c.simple_query(sql))
        .await
        .unwrap();
    let values: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["3", "last"]);
    let completes = messages
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
        .count();
    assert_eq!(completes, 5, "one CommandComplete per statement");
    assert_eq!(env.sql("app", "SELECT count(*) FROM multi").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_query_with_unnamed_statements_binds_parameters() {
    let env = env().await;
    let c = env.connect().await;
    let rows = within(
        "query_typed",
        c.query_typed(
            "SELECT $1::int4 + $2::int4, $3::text || '!', $4::bytea, $5::int8 IS NULL",
            &[
                (&40i32, Type::INT4),
                (&2i32, Type::INT4),
                (&"hello", Type::TEXT),
                (&vec![0u8, 255, 7], Type::BYTEA),
                (&None::<i64>, Type::INT8),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    assert_eq!(rows[0].get::<_, String>(1), "hello!");
    assert_eq!(rows[0].get::<_, Vec<u8>>(2), vec![0u8, 255, 7]);
    assert!(rows[0].get::<_, bool>(3));
    // Many rows, and an error in the extended protocol leaves the connection usable.
    let rows = within(
        "generate_series",
        c.query_typed(
            "SELECT g FROM generate_series(1, $1::int4) g",
            &[(&1000i32, Type::INT4)],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.get::<_, i32>(0)).sum::<i32>(),
        500_500
    );
    let err = within(
        "division by zero",
        c.query_typed("SELECT 1 / $1::int4", &[(&0i32, Type::INT4)]),
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    let rows = within(
        "after error",
        c.query_typed("SELECT $1::text", &[(&"ok", Type::TEXT)]),
    )
    .await
    .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_rollback_and_failed_transaction() {
    let env = env().await;
    let mut c = env.connect().await;
    within("create", c.batch_execute("CREATE TABLE tx (id int)"))
        .await
        .unwrap();

    within(
        "commit",
        c.batch_execute("BEGIN; INSERT INTO tx VALUES (1)"),
    )
    .await
    .unwrap();
    within("commit", c.batch_execute("INSERT INTO tx VALUES (2)"))
        .await
        .unwrap();
    within("commit", c.batch_execute("COMMIT")).await.unwrap();

    within("rollback", c.batch_execute("BEGIN")).await.unwrap();
    within("rollback", c.batch_execute("INSERT INTO tx VALUES (3)"))
        .await
        .unwrap();
    within("rollback", c.batch_execute("ROLLBACK"))
        .await
        .unwrap();

    within("failing", c.batch_execute("BEGIN")).await.unwrap();
    within("failing", c.batch_execute("INSERT INTO tx VALUES (4)"))
        .await
        .unwrap();
    let err = within(
        "failing",
        c.query_typed("SELECT 1 / $1::int4", &[(&0i32, Type::INT4)]),
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    let err = within("aborted", c.batch_execute("INSERT INTO tx VALUES (5)"))
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&err),
        "25P02",
        "statements in a failed transaction are refused"
    );
    // COMMIT of a failed transaction is answered with ROLLBACK.
    let messages = within("commit failed", c.simple_query("COMMIT"))
        .await
        .unwrap();
    assert!(
        messages
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
    );

    let t = within("next tx", c.transaction()).await.unwrap();
    within("next tx", t.batch_execute("INSERT INTO tx VALUES (6)"))
        .await
        .unwrap();
    within("next tx", t.commit()).await.unwrap();

    assert_eq!(
        scalar(&c, "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx").await,
        "1,2,6"
    );
    assert_eq!(
        env.sql(
            "app",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM tx"
        )
        .await,
        "1,2,6"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_copy_out_50k_rows() {
    const ROWS: usize = 50_000;
    let env = env().await;
    let c = env.connect().await;
    within(
        "create",
        c.batch_execute("CREATE TABLE copied (id int, name text)"),
    )
    .await
    .unwrap();

    let sink = within("copy in", c.copy_in("COPY copied (id, name) FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..ROWS {
        chunk.push_str(&format!("{i}\tname-{i}\n"));
        if chunk.len() > 64 * 1024 {
            within(
                "copy data",
                sink.send(Bytes::from(std::mem::take(&mut chunk))),
            )
            .await
            .unwrap();
        }
    }
    within("copy data", sink.send(Bytes::from(chunk)))
        .await
        .unwrap();
    let copied = within("copy finish", sink.as_mut().finish()).await.unwrap();
    assert_eq!(copied, ROWS as u64);
    assert_eq!(
        env.sql("app", "SELECT count(*), sum(id) FROM copied").await,
        "50000|1249975000"
    );

    let stream = within("copy out", c.copy_out("COPY copied TO STDOUT"))
        .await
        .unwrap();
    let chunks: Vec<Bytes> = within("copy out data", stream.try_collect()).await.unwrap();
    let data: Vec<u8> = chunks.concat();
    let text = String::from_utf8(data).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), ROWS);
    let sum: u64 = lines
        .iter()
        .map(|l| l.split('\t').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, 1_249_975_000);
    assert!(
        lines
            .iter()
            .all(|l| l.split('\t').nth(1).is_some_and(|n| n.starts_with("name-")))
    );
    // The connection is in sync after both COPYs.
    assert_eq!(scalar(&c, "SELECT count(*) FROM copied").await, "50000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_500_statements_returns_every_result_in_order() {
    let env = env().await;
    let c = env.connect().await;
    let queries = (0..500i32).map(|i| {
        let c = &c.client;
        async move {
            let rows = c
                .query_typed("SELECT $1::int4 * 2, $1::int4", &[(&i, Type::INT4)])
                .await?;
            Ok::<_, tokio_postgres::Error>((i, rows[0].get::<_, i32>(0), rows[0].get::<_, i32>(1)))
        }
    });
    let results = within("pipeline", futures_util::future::join_all(queries)).await;
    assert_eq!(results.len(), 500);
    for result in results {
        let (i, doubled, echoed) = result.unwrap();
        assert_eq!((doubled, echoed), (i * 2, i), "result of statement {i}");
    }
    assert_eq!(scalar(&c, "SELECT 'still in sync'").await, "still in sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_through_proxy_stops_pg_sleep() {
    let env = env().await;
    let c = env.connect().await;
    cancel_a_running_pg_sleep(&c, &env.cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_with_unknown_key_is_ignored() {
    let env = env().await;
    let c = env.connect().await;
    // CancelRequest: length 16, code 80877102, pid, secret key that no client has.
    let mut cancel = 16i32.to_be_bytes().to_vec();
    cancel.extend_from_slice(&80_877_102i32.to_be_bytes());
    cancel.extend_from_slice(&12345i32.to_be_bytes());
    cancel.extend_from_slice(&67890i32.to_be_bytes());
    let mut raw = raw_connect(env.addr()).await;
    send_raw(&mut raw, &cancel).await;
    expect_closed(&mut raw, "proxy closes a cancel connection").await;
    assert_eq!(scalar(&c, "SELECT 'unaffected'").await, "unaffected");
}
