"""psycopg 3 against PostgreSQL or Floodgate: the contract is in ../README.md.

Named statements: every statement runs with `prepare=True`, so psycopg prepares it under a name
(`_pg3_N`) on first use and afterwards sends only Bind/Execute. search_path: libpq's `options`
in the conninfo (`options='-c search_path=tenant_N'`). 20 clients are 20 threads, each with its
own connection, the way a threaded application uses psycopg.
"""

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import psycopg
from psycopg.conninfo import make_conninfo

from common import (
    CLIENTS,
    COMMITTED,
    DB,
    HOST,
    ITEMS,
    PASSWORD,
    POOL_SIZE,
    PORT,
    SHAPE,
    TXNS,
    USER,
    CheckFailed,
    check,
    rows_of,
    summary,
    tenant_of,
)

WHOAMI = "SELECT current_setting('search_path') AS search_path, %s::int AS client, %s::text AS token"
INSERT = "INSERT INTO public.ledger (client, seq, tenant) VALUES (%s, %s, %s)"
COUNT = "SELECT count(*)::int, coalesce(max(seq), 0) FROM public.ledger WHERE client = %s"
PREPARED = "SELECT count(*)::int FROM pg_prepared_statements WHERE statement = %s"


def connect(**extra):
    conninfo = make_conninfo(
        "",
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        dbname=DB,
        connect_timeout=30,
        **extra,
    )
    return psycopg.connect(conninfo, autocommit=True)


def rows(conn, sql, params=()):
    """Runs `sql` as a named prepared statement and returns its rows."""
    return conn.execute(sql, params, prepare=True).fetchall()


def check_state(conn, client, tenant, seq, in_txn):
    """search_path, the client's own values back, its own tenant's rows."""
    token = f"client-{client}-seq-{seq}-{'txn' if in_txn else 'auto'}"
    who = rows(conn, WHOAMI, (client, token))
    check(
        who == [(tenant, client, token)],
        f"whoami ({'in a transaction' if in_txn else 'autocommit'}) returned {who}, "
        f"expected [({tenant!r}, {client}, {token!r})]",
    )
    items = rows(conn, ITEMS)
    check(
        items == [(tenant, rows_of(tenant))],
        f"unqualified items returned {items}, expected [({tenant!r}, {rows_of(tenant)})]",
    )


def worker(client):
    tenant = tenant_of(client)
    try:
        conn = connect(options=f"-c search_path={tenant}")
    except psycopg.Error as e:
        raise CheckFailed(f"client {client}: connect with options='-c search_path={tenant}': {describe(e)}")
    try:
        committed = 0
        for seq in range(1, TXNS + 1):
            rollback = seq % 10 == 0
            with conn.transaction() as txn:
                check_state(conn, client, tenant, seq, True)
                conn.execute(INSERT, (client, -seq if rollback else seq, tenant), prepare=True)
                if seq == 1:
                    # The statement runs under its name on whichever server this transaction holds.
                    [(prepared,)] = rows(conn, PREPARED, (ITEMS,))
                    check(prepared >= 1, f"items is not a server-side prepared statement ({prepared})")
                if rollback:
                    raise psycopg.Rollback(txn)
                counted = rows(conn, COUNT, (client,))
                check(
                    counted == [(committed + 1, seq)],
                    f"ledger inside transaction {seq}: {counted}, expected [({committed + 1}, {seq})]",
                )
            if not rollback:
                committed += 1
            # The same checks outside a transaction: each statement may get another server.
            check_state(conn, client, tenant, seq, False)
        [(n, _)] = rows(conn, COUNT, (client,))
        check(n == committed, f"ledger at the end: {n} rows, expected {committed}")
    except (CheckFailed, psycopg.Error) as e:
        raise CheckFailed(f"client {client} ({tenant}): {describe(e)}") from None
    finally:
        conn.close()


def describe(e):
    if isinstance(e, CheckFailed):
        return str(e)
    if isinstance(e, psycopg.Error) and e.sqlstate:
        return f"{e.sqlstate} {str(e).strip()}"
    return f"{type(e).__name__}: {str(e).strip()}"


def shape_columns(conn):
    """Runs the prepared SELECT * and returns its column names, comma-separated."""
    cur = conn.execute(SHAPE, prepare=True)
    cur.fetchall()
    return ",".join(c.name for c in cur.description)


def run_shape(conn):
    """("ok", columns) or ("error", sqlstate, message) for the prepared SELECT *, run in a
    transaction block: an error leaves the block with ROLLBACK, which is what makes psycopg
    forget its prepared statements (and DEALLOCATE ALL on the server)."""
    try:
        with conn.transaction():
            return ("ok", shape_columns(conn))
    except psycopg.Error as e:
        if e.sqlstate is None:
            raise
        return ("error", e.sqlstate, str(e).strip())


def show(result):
    return f"rows with columns {result[1]}" if result[0] == "ok" else f"error {result[1]} {result[2]}"


NEW = ("ok", "id,a,b")


def fresh_connections():
    """POOL_SIZE new connections run the statement in transactions open at the same time, so
    through the proxy each is on a different server: all get the new columns."""
    conns = [connect() for _ in range(POOL_SIZE)]
    results = []
    try:
        with ExitStack() as open_transactions:
            for conn in conns:
                open_transactions.enter_context(conn.transaction(force_rollback=True))
                try:
                    results.append(("ok", shape_columns(conn)))
                except psycopg.Error as e:
                    results.append(("error", e.sqlstate, str(e).strip()))
    finally:
        for conn in conns:
            conn.close()
    print(f"schema change: {POOL_SIZE} new connections at once: {summary(results, show)}", flush=True)
    for i, result in enumerate(results):
        check(
            result == NEW,
            f"shape on new connection {i} of {POOL_SIZE} (in transactions at once) "
            f"after ALTER: {show(result)}, expected columns id,a,b",
        )


def schema_change():
    """A `SELECT *` prepared before `ALTER TABLE ... ADD COLUMN` and run again after it.

    Before the ALTER, POOL_SIZE connections run the statement in transactions open at the same
    time, so through the proxy every server connection has it prepared: a retry cannot pass by
    landing on a server that has not.

    Directly against PostgreSQL, psycopg raises 0A000 "cached plan must not change result type"
    once: the transaction block rolls back, and ROLLBACK makes psycopg drop its prepared
    statements (DEALLOCATE ALL), so the retry prepares the statement again and returns the new
    columns. (On an autocommit connection outside a transaction block nothing clears them and
    every rerun fails; applications retry transactions, so that is not what is checked.)
    Through the proxy the first rerun may raise the same error or return the new columns; the
    retry after an error must return the new columns, and so must new connections on every
    server (see fresh_connections).
    """
    conns = [connect() for _ in range(POOL_SIZE)]
    b = connect()
    try:
        with ExitStack() as open_transactions:
            for i, conn in enumerate(conns):
                open_transactions.enter_context(conn.transaction())
                cols = shape_columns(conn)
                check(cols == "id,a", f"shape before ALTER on connection {i}: columns {cols}, expected id,a")
        b.execute("ALTER TABLE public.shape ADD COLUMN b int NOT NULL DEFAULT 7")
        a = conns[0]
        first = run_shape(a)
        print(f"schema change: rerun 1 on the same connection: {show(first)}", flush=True)
        check(
            first == NEW or first[:2] == ("error", "0A000"),
            f"shape rerun 1 after ALTER: {show(first)}, expected error 0A000 (as directly) or columns id,a,b",
        )
        if first != NEW:
            second = run_shape(a)
            print(f"schema change: rerun 2 on the same connection: {show(second)}", flush=True)
            check(
                second == NEW,
                f"shape rerun 2 after ALTER (psycopg prepares it again after the "
                f"rollback): {show(second)}, expected columns id,a,b",
            )
        fresh_connections()
    finally:
        for conn in conns + [b]:
            conn.close()


def check_ledger():
    """Every committed row is there once, tagged with its client's tenant."""
    with connect() as conn:
        rows = conn.execute(
            "SELECT client, count(*)::int, min(tenant), max(tenant) FROM public.ledger"
            " GROUP BY client ORDER BY client"
        ).fetchall()
    check(len(rows) == CLIENTS, f"ledger has rows of {len(rows)} clients, expected {CLIENTS}")
    for client, n, lo, hi in rows:
        tenant = tenant_of(client)
        check(
            (n, lo, hi) == (COMMITTED, tenant, tenant),
            f"ledger for client {client}: {(n, lo, hi)}, expected {COMMITTED} rows of {tenant}",
        )


def concurrent_clients():
    """CLIENTS threads at once, then every committed row checked; raises what went wrong."""
    started = time.monotonic()
    failures = []
    lock = threading.Lock()

    def guarded(client):
        try:
            worker(client)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its client
            with lock:
                failures.append(describe(e))

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        list(pool.map(guarded, range(CLIENTS)))
    if failures:
        more = f"; last: {failures[-1]}" if len(failures) > 1 else ""
        raise CheckFailed(f"{len(failures)} of {CLIENTS} clients failed; first: {failures[0]}{more}")
    check_ledger()
    print(f"{CLIENTS} clients x {TXNS} transactions in {time.monotonic() - started:.1f} s", flush=True)


def main():
    """Both parts run even when the first fails, so one run shows every failure."""
    failed = False
    for part, body in (("concurrent clients", concurrent_clients), ("schema change", schema_change)):
        try:
            body()
            print(f"ok: {part}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported with its part
            print(f"FAIL: {part}: {describe(e)}", file=sys.stderr, flush=True)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
