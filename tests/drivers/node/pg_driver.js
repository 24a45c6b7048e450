// node-postgres (npm `pg`) against PostgreSQL or Floodgate: the contract is in ../README.md.
//
// Named statements: every query is sent as `{ name, text, values }`, so pg sends Parse with that
// name once per connection and only Bind/Execute afterwards. search_path: the `options` startup
// parameter (`-c search_path=tenant_N`), as libpq-style applications set it.
'use strict';

const { Client } = require('pg');

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) fail(`environment variable ${name} is not set`);
  return value;
};

function fail(message) {
  process.stderr.write(`FAIL: ${message}\n`);
  process.exit(1);
}

const HOST = env('DRIVER_HOST');
const PORT = Number(env('DRIVER_PORT'));
const USER = env('DRIVER_USER');
const PASSWORD = env('DRIVER_PASSWORD');
const DB = env('DRIVER_DB');
const CLIENTS = Number(env('DRIVER_CLIENTS', '20'));
const TXNS = Number(env('DRIVER_TXNS', '50'));
const TENANTS = Number(env('DRIVER_TENANTS', '3'));
// The proxy's pool size: this many connections in transactions at once hold every server.
const POOL_SIZE = Number(env('DRIVER_POOL_SIZE', '4'));

const SQL = {
  whoami: "SELECT current_setting('search_path') AS search_path, $1::int AS client, $2::text AS token",
  items: 'SELECT tenant, count(*)::int AS rows FROM items GROUP BY tenant',
  insert: 'INSERT INTO public.ledger (client, seq, tenant) VALUES ($1, $2, $3)',
  count: 'SELECT count(*)::int AS n, coalesce(max(seq), 0) AS last FROM public.ledger WHERE client = $1',
  prepared: 'SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement = $1',
  shape: 'SELECT * FROM public.shape ORDER BY id',
};

/** Tenant schema of client `id`: clients are spread over the tenants round-robin. */
const tenantOf = (id) => `tenant_${(id % TENANTS) + 1}`;

/** Rows in `tenant_N.items` (the Rust test inserts 10 * N). */
const rowsOf = (tenant) => 10 * Number(tenant.split('_')[1]);

function connect(options) {
  return new Client({
    host: HOST,
    port: PORT,
    user: USER,
    password: PASSWORD,
    database: DB,
    connectionTimeoutMillis: 30000,
    ...options,
  });
}

/** Runs the named statement `name` (text from SQL) with `values`. */
const run = (client, name, values = []) => client.query({ name, text: SQL[name], values });

function check(cond, what) {
  if (!cond) throw new Error(what);
}

/** The checks run in and after every transaction: search_path, own values back, own tenant's rows. */
async function checkState(client, id, tenant, seq, inTxn) {
  const token = `client-${id}-seq-${seq}-${inTxn ? 'txn' : 'auto'}`;
  const who = (await run(client, 'whoami', [id, token])).rows;
  check(
    who.length === 1 && who[0].search_path === tenant && who[0].client === id && who[0].token === token,
    `whoami (${inTxn ? 'in a transaction' : 'autocommit'}) returned ${JSON.stringify(who)}, ` +
      `expected search_path ${tenant}, client ${id}, token ${token}`,
  );
  const items = (await run(client, 'items')).rows;
  check(
    items.length === 1 && items[0].tenant === tenant && items[0].rows === rowsOf(tenant),
    `unqualified items returned ${JSON.stringify(items)}, expected [{tenant: ${tenant}, rows: ${rowsOf(tenant)}}]`,
  );
}

async function worker(id) {
  const tenant = tenantOf(id);
  const client = connect({ options: `-c search_path=${tenant}` });
  try {
    await client.connect();
  } catch (e) {
    throw new Error(`client ${id}: connect with options=-c search_path=${tenant}: ${describe(e)}`);
  }
  try {
    let committed = 0;
    for (let seq = 1; seq <= TXNS; seq++) {
      const rollback = seq % 10 === 0;
      await client.query('BEGIN');
      await checkState(client, id, tenant, seq, true);
      await run(client, 'insert', [id, rollback ? -seq : seq, tenant]);
      if (seq === 1) {
        // The statement runs under its name on whichever server this transaction holds.
        const prepared = (await run(client, 'prepared', [SQL.items])).rows[0].n;
        check(prepared >= 1, `items is not a server-side prepared statement (pg_prepared_statements: ${prepared})`);
      }
      if (rollback) {
        await client.query('ROLLBACK');
      } else {
        const counted = (await run(client, 'count', [id])).rows[0];
        check(
          counted.n === committed + 1 && counted.last === seq,
          `ledger for client ${id} inside transaction ${seq}: ${JSON.stringify(counted)}, expected n=${committed + 1}, last=${seq}`,
        );
        await client.query('COMMIT');
        committed++;
      }
      // The same checks outside a transaction: each statement may get another server.
      await checkState(client, id, tenant, seq, false);
    }
    const counted = (await run(client, 'count', [id])).rows[0];
    check(counted.n === committed, `ledger for client ${id} at the end: ${counted.n} rows, expected ${committed}`);
  } catch (e) {
    throw new Error(`client ${id} (${tenant}): ${describe(e)}`);
  } finally {
    await client.end().catch(() => {});
  }
}

function describe(e) {
  return e.code ? `${e.code} ${e.message}` : e.message;
}

/**
 * Runs `shape` on `client`: `{ ok: true, columns }` or `{ ok: false, code, message }` (code is
 * the SQLSTATE, or 'client' for an error raised by pg itself).
 */
async function runShape(client) {
  try {
    const result = await run(client, 'shape');
    return { ok: true, columns: result.fields.map((f) => f.name).join(',') };
  } catch (e) {
    return { ok: false, code: e.code ?? 'client', message: e.message };
  }
}

const show = (r) => (r.ok ? `rows with columns ${r.columns}` : `error ${r.code} ${r.message}`);

/** Distinct results with how many connections got each, for the progress line. */
function summary(results) {
  const counts = new Map();
  for (const r of results) counts.set(show(r), (counts.get(show(r)) ?? 0) + 1);
  return [...counts].map(([text, n]) => `${n} x ${text}`).join(' | ');
}

/**
 * POOL_SIZE new connections run the statement (same name, same text) in transactions open at
 * the same time, so through the proxy each is on a different server: all get the new columns.
 */
async function freshConnections() {
  const fresh = Array.from({ length: POOL_SIZE }, () => connect());
  try {
    const results = [];
    for (const c of fresh) {
      await c.connect();
      await c.query('BEGIN');
      results.push(await runShape(c));
    }
    for (const c of fresh) await c.query('ROLLBACK');
    console.log(`schema change: ${POOL_SIZE} new connections at once: ${summary(results)}`);
    for (const [i, r] of results.entries()) {
      check(r.ok && r.columns === 'id,a,b', `shape on new connection ${i} of ${POOL_SIZE} (in transactions at once) after ALTER: ${show(r)}, expected columns id,a,b`);
    }
  } finally {
    for (const c of fresh) await c.end().catch(() => {});
  }
}

/**
 * A named `SELECT *` prepared before `ALTER TABLE ... ADD COLUMN` and run again after it.
 *
 * Before the ALTER, POOL_SIZE connections run the statement in transactions open at the same
 * time, so through the proxy every server connection has it prepared: a rerun cannot pass by
 * landing on a server that has not.
 *
 * Directly against PostgreSQL pg keeps Binding the name it has parsed (it never parses a name
 * twice on one connection), so every rerun raises 0A000 "cached plan must not change result
 * type" and the connection stays usable; new connections parsing the same name and text get
 * the new columns. Through the proxy the reruns may raise the same error (or, better, return
 * the new columns), but nothing else, and new connections must get the new columns on every
 * server (see freshConnections).
 */
async function schemaChange() {
  const conns = Array.from({ length: POOL_SIZE }, () => connect());
  const b = connect();
  try {
    for (const conn of [...conns, b]) await conn.connect();
    for (const [i, conn] of conns.entries()) {
      await conn.query('BEGIN');
      const before = await runShape(conn);
      check(before.ok && before.columns === 'id,a', `shape before ALTER on connection ${i}: ${show(before)}, expected columns id,a`);
    }
    for (const conn of conns) await conn.query('COMMIT');
    await b.query('ALTER TABLE public.shape ADD COLUMN b int NOT NULL DEFAULT 7');
    const a = conns[0];
    for (let attempt = 1; attempt <= 2; attempt++) {
      const after = await runShape(a);
      console.log(`schema change: rerun ${attempt} on the same connection: ${show(after)}`);
      check(
        (after.ok && after.columns === 'id,a,b') || (!after.ok && after.code === '0A000'),
        `shape rerun ${attempt} after ALTER: ${show(after)}, expected error 0A000 (as directly) or columns id,a,b`,
      );
    }
    const still = (await a.query('SELECT 1 AS one')).rows;
    check(still.length === 1 && still[0].one === 1, 'the connection is unusable after the 0A000 error');
    await freshConnections();
  } finally {
    for (const conn of [...conns, b]) await conn.end().catch(() => {});
  }
}

/** Every committed row is there once, tagged with its client's tenant. */
async function checkLedger(committedPerClient) {
  const client = connect();
  await client.connect();
  try {
    const rows = (
      await client.query(
        'SELECT client, count(*)::int AS n, min(tenant) AS lo, max(tenant) AS hi FROM public.ledger GROUP BY client ORDER BY client',
      )
    ).rows;
    check(rows.length === CLIENTS, `ledger has rows of ${rows.length} clients, expected ${CLIENTS}`);
    for (const row of rows) {
      const tenant = tenantOf(row.client);
      check(
        row.n === committedPerClient && row.lo === tenant && row.hi === tenant,
        `ledger for client ${row.client}: ${JSON.stringify(row)}, expected ${committedPerClient} rows of ${tenant}`,
      );
    }
  } finally {
    await client.end().catch(() => {});
  }
}

/** CLIENTS clients at once, then every committed row checked; throws what went wrong. */
async function concurrentClients() {
  const started = Date.now();
  const results = await Promise.allSettled(Array.from({ length: CLIENTS }, (_, id) => worker(id)));
  const failures = results.filter((r) => r.status === 'rejected').map((r) => r.reason.message);
  if (failures.length) {
    throw new Error(
      `${failures.length} of ${CLIENTS} clients failed; first: ${failures[0]}` +
        (failures.length > 1 ? `; last: ${failures[failures.length - 1]}` : ''),
    );
  }
  await checkLedger(TXNS - Math.floor(TXNS / 10));
  console.log(`${CLIENTS} clients x ${TXNS} transactions in ${Date.now() - started} ms`);
}

/** Both parts run even when the first fails, so one run shows every failure. */
async function main() {
  const problems = [];
  for (const [part, body] of [['concurrent clients', concurrentClients], ['schema change', schemaChange]]) {
    try {
      await body();
      console.log(`ok: ${part}`);
    } catch (e) {
      problems.push(`${part}: ${describe(e)}`);
    }
  }
  if (problems.length) fail(problems.join('\nFAIL: '));
}

main().catch((e) => fail(describe(e)));
