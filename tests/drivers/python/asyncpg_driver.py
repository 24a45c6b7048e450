"""asyncpg against PostgreSQL or Floodgate: the contract is in ../README.md.

Named statements: asyncpg prepares every query that has arguments (and every `fetch`) under a
name of its own (`__asyncpg_stmt_N__`) and keeps it in its statement cache, so later runs send
only Bind/Execute. search_path: `server_settings={'search_path': 'tenant_N'}`, which asyncpg
sends as a startup parameter. 20 clients are 20 connections driven by one event loop.
"""

import asyncio
import sys
import time

import asyncpg

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

WHOAMI = "SELECT current_setting('search_path') AS search_path, $1::int AS client, $2::text AS token"
INSERT = "INSERT INTO public.ledger (client, seq, tenant) VALUES ($1, $2, $3)"
COUNT = "SELECT count(*)::int, coalesce(max(seq), 0) FROM public.ledger WHERE client = $1"
PREPARED = "SELECT count(*)::int FROM pg_prepared_statements WHERE statement = $1"

# What asyncpg raises: errors from the server, misuse, and its own protocol errors (such as rows
# that do not match the statement's description).
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)


async def connect(**extra):
    return await asyncpg.connect(
        host=HOST, port=PORT, user=USER, password=PASSWORD, database=DB, timeout=30, **extra
    )


def describe(e):
    if isinstance(e, CheckFailed):
        return str(e)
    code = getattr(e, "sqlstate", None)
    return f"{code} {e}" if code else f"{type(e).__name__}: {e}"


async def check_state(conn, client, tenant, seq, in_txn):
    """search_path, the client's own values back, its own tenant's rows."""
    token = f"client-{client}-seq-{seq}-{'txn' if in_txn else 'auto'}"
    who = [tuple(r) for r in await conn.fetch(WHOAMI, client, token)]
    check(
        who == [(tenant, client, token)],
        f"whoami ({'in a transaction' if in_txn else 'autocommit'}) returned {who}, "
        f"expected [({tenant!r}, {client}, {token!r})]",
    )
    items = [tuple(r) for r in await conn.fetch(ITEMS)]
    check(
        items == [(tenant, rows_of(tenant))],
        f"unqualified items returned {items}, expected [({tenant!r}, {rows_of(tenant)})]",
    )


async def worker(client):
    tenant = tenant_of(client)
    try:
        conn = await connect(server_settings={"search_path": tenant})
    except (asyncpg.PostgresError, OSError) as e:
        raise CheckFailed(
            f"client {client}: connect with server_settings search_path={tenant}: {describe(e)}"
        ) from None
    try:
        committed = 0
        for seq in range(1, TXNS + 1):
            rollback = seq % 10 == 0
            txn = conn.transaction()
            await txn.start()
            await check_state(conn, client, tenant, seq, True)
            await conn.execute(INSERT, client, -seq if rollback else seq, tenant)
            if seq == 1:
                # The statement runs under its name on whichever server this transaction holds.
                prepared = await conn.fetchval(PREPARED, ITEMS)
                check(prepared >= 1, f"items is not a server-side prepared statement ({prepared})")
            if rollback:
                await txn.rollback()
            else:
                counted = tuple(await conn.fetchrow(COUNT, client))
                check(
                    counted == (committed + 1, seq),
                    f"ledger inside transaction {seq}: {counted}, expected {(committed + 1, seq)}",
                )
                await txn.commit()
                committed += 1
            # The same checks outside a transaction: each statement may get another server.
            await check_state(conn, client, tenant, seq, False)
        n = await conn.fetchval(COUNT, client)
        check(n == committed, f"ledger at the end: {n} rows, expected {committed}")
    except (CheckFailed, *DRIVER_ERRORS) as e:
        raise CheckFailed(f"client {client} ({tenant}): {describe(e)}") from None
    finally:
        await conn.close()


async def shape_result(conn):
    """("ok", columns) or ("error", sqlstate or asyncpg's exception, message) for `SELECT *`,
    run with `fetch` (a cached named statement)."""
    try:
        rows = await conn.fetch(SHAPE)
        return ("ok", ",".join(rows[0].keys()))
    except asyncpg.PostgresError as e:
        return ("error", e.sqlstate, str(e))
    except DRIVER_ERRORS as e:
        return ("error", type(e).__name__, str(e))


async def run_shape(conn, in_txn):
    """`shape_result` outside a transaction, or in one that commits or, after an error, rolls
    back."""
    if not in_txn:
        return await shape_result(conn)
    txn = conn.transaction()
    await txn.start()
    result = await shape_result(conn)
    if result[0] == "ok":
        await txn.commit()
    elif result[1] == "0A000":
        await txn.rollback()
    else:
        # After an error of another kind the connection may be unusable: the result says what
        # went wrong, and the check that follows fails on it.
        try:
            await txn.rollback()
        except DRIVER_ERRORS:
            pass
    return result


def show(result):
    return f"rows with columns {result[1]}" if result[0] == "ok" else f"error {result[1]} {result[2]}"


NEW = ("ok", "id,a,b")


async def fresh_connections():
    """POOL_SIZE new connections run the statement in transactions open at the same time, so
    through the proxy each is on a different server: all get the new columns."""
    conns = [await connect() for _ in range(POOL_SIZE)]
    try:
        txns = [conn.transaction() for conn in conns]
        results = []
        for conn, txn in zip(conns, txns):
            await txn.start()
            results.append(await shape_result(conn))
        for txn in txns:
            await txn.rollback()
    finally:
        for conn in conns:
            await conn.close()
    print(f"schema change: {POOL_SIZE} new connections at once: {summary(results, show)}", flush=True)
    for i, result in enumerate(results):
        check(
            result == NEW,
            f"shape on new connection {i} of {POOL_SIZE} (in transactions at once) "
            f"after ALTER: {show(result)}, expected columns id,a,b",
        )


async def schema_change():
    """A `SELECT *` prepared before `ALTER TABLE ... ADD COLUMN` and run again after it.

    Before the ALTER, POOL_SIZE connections run the statement in transactions open at the same
    time, so through the proxy every server connection has it prepared: a retry cannot pass by
    landing on a server that has not.

    Directly against PostgreSQL, asyncpg gets 0A000 "cached plan must not change result type"
    (InvalidCachedStatementError) and drops its statement cache. Outside a transaction it then
    prepares the statement again under a new name and retries by itself, so the caller gets the
    new columns at once; inside a transaction it raises the error once (the transaction is
    aborted) and the retried transaction gets the new columns. Through the proxy the same must
    hold: the autocommit rerun returns the new columns, the transactional rerun raises at most
    0A000 and its retry returns the new columns, and new connections get the new columns on
    every server (see fresh_connections). The transactional rerun comes after the autocommit
    one on purpose: a connection whose statement was described with the old columns must not
    get rows of the new shape unannounced once another client has prepared it again.
    """
    conns = [await connect() for _ in range(POOL_SIZE)]
    b = await connect()
    try:
        txns = [conn.transaction() for conn in conns]
        for i, (conn, txn) in enumerate(zip(conns, txns)):
            await txn.start()
            rows = await conn.fetch(SHAPE)
            cols = ",".join(rows[0].keys())
            check(cols == "id,a", f"shape before ALTER on connection {i}: columns {cols}, expected id,a")
        for txn in txns:
            await txn.commit()
        await b.execute("ALTER TABLE public.shape ADD COLUMN b int NOT NULL DEFAULT 7")

        auto = await run_shape(conns[0], in_txn=False)
        print(f"schema change: rerun outside a transaction: {show(auto)}", flush=True)
        check(
            auto == NEW,
            f"shape rerun outside a transaction after ALTER: {show(auto)}, expected "
            "columns id,a,b (asyncpg re-prepares and retries by itself, as it does directly)",
        )

        first = await run_shape(conns[1], in_txn=True)
        print(f"schema change: rerun 1 in a transaction: {show(first)}", flush=True)
        check(
            first == NEW or first[:2] == ("error", "0A000"),
            f"shape rerun 1 in a transaction after ALTER: {show(first)}, expected error 0A000 "
            "(as directly) or columns id,a,b",
        )
        if first != NEW:
            second = await run_shape(conns[1], in_txn=True)
            print(f"schema change: rerun 2 in a transaction: {show(second)}", flush=True)
            check(
                second == NEW,
                f"shape rerun 2 in a transaction after ALTER: {show(second)}, expected columns id,a,b",
            )

        await fresh_connections()
    finally:
        for conn in conns + [b]:
            await conn.close()


async def check_ledger():
    """Every committed row is there once, tagged with its client's tenant."""
    conn = await connect()
    try:
        rows = await conn.fetch(
            "SELECT client, count(*)::int, min(tenant), max(tenant) FROM public.ledger"
            " GROUP BY client ORDER BY client"
        )
    finally:
        await conn.close()
    check(len(rows) == CLIENTS, f"ledger has rows of {len(rows)} clients, expected {CLIENTS}")
    for client, n, lo, hi in rows:
        tenant = tenant_of(client)
        check(
            (n, lo, hi) == (COMMITTED, tenant, tenant),
            f"ledger for client {client}: {(n, lo, hi)}, expected {COMMITTED} rows of {tenant}",
        )


async def concurrent_clients():
    """CLIENTS connections at once, then every committed row checked; raises what went wrong."""
    started = time.monotonic()
    results = await asyncio.gather(*(worker(c) for c in range(CLIENTS)), return_exceptions=True)
    failures = [describe(r) for r in results if isinstance(r, BaseException)]
    if failures:
        more = f"; last: {failures[-1]}" if len(failures) > 1 else ""
        raise CheckFailed(f"{len(failures)} of {CLIENTS} clients failed; first: {failures[0]}{more}")
    await check_ledger()
    print(f"{CLIENTS} clients x {TXNS} transactions in {time.monotonic() - started:.1f} s", flush=True)


async def main():
    """Both parts run even when the first fails, so one run shows every failure."""
    failed = False
    for part, body in (("concurrent clients", concurrent_clients), ("schema change", schema_change)):
        try:
            await body()
            print(f"ok: {part}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported with its part
            print(f"FAIL: {part}: {describe(e)}", file=sys.stderr, flush=True)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    asyncio.run(main())
