// pgjdbc against PostgreSQL or Floodgate: the contract is in ../README.md. Run as a single-file
// program: java -cp /usr/share/java/postgresql.jar PgjdbcDriver.java
//
// Named statements: prepareThreshold=1 makes pgjdbc prepare every PreparedStatement under a name
// (S_N) on its first execution; its per-connection statement cache keeps that name for the SQL
// text, so the next prepareStatement of the same text sends only Bind/Execute. search_path: the
// URL's currentSchema=tenant_N. 20 clients are 20 threads, each with its own connection.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class PgjdbcDriver {
    static final String HOST = env("DRIVER_HOST", null);
    static final int PORT = Integer.parseInt(env("DRIVER_PORT", null));
    static final String USER = env("DRIVER_USER", null);
    static final String PASSWORD = env("DRIVER_PASSWORD", null);
    static final String DB = env("DRIVER_DB", null);
    static final int CLIENTS = Integer.parseInt(env("DRIVER_CLIENTS", "20"));
    static final int TXNS = Integer.parseInt(env("DRIVER_TXNS", "50"));
    static final int TENANTS = Integer.parseInt(env("DRIVER_TENANTS", "3"));
    /** The proxy's pool size: this many connections in transactions at once hold every server. */
    static final int POOL_SIZE = Integer.parseInt(env("DRIVER_POOL_SIZE", "4"));
    /** Every tenth transaction inserts a row and rolls back. */
    static final int COMMITTED = TXNS - TXNS / 10;

    static final String WHOAMI =
            "SELECT current_setting('search_path') AS search_path, ?::int AS client, ?::text AS token";
    static final String ITEMS = "SELECT tenant, count(*)::int AS rows FROM items GROUP BY tenant";
    static final String INSERT = "INSERT INTO public.ledger (client, seq, tenant) VALUES (?, ?, ?)";
    static final String COUNT =
            "SELECT count(*)::int, coalesce(max(seq), 0) FROM public.ledger WHERE client = ?";
    static final String PREPARED = "SELECT count(*)::int FROM pg_prepared_statements WHERE statement = ?";
    static final String SHAPE = "SELECT * FROM public.shape ORDER BY id";

    static String env(String name, String fallback) {
        String value = System.getenv(name);
        if (value == null) value = fallback;
        if (value == null) fail("environment variable " + name + " is not set");
        return value;
    }

    static void fail(String message) {
        System.err.println("FAIL: " + message);
        System.err.flush();
        System.exit(1);
    }

    /** A result differs from what the client must see. */
    static class CheckFailed extends Exception {
        CheckFailed(String message) {
            super(message);
        }
    }

    static void check(boolean cond, String what) throws CheckFailed {
        if (!cond) throw new CheckFailed(what);
    }

    static String describe(Throwable e) {
        if (e instanceof SQLException sql && sql.getSQLState() != null) {
            return sql.getSQLState() + " " + sql.getMessage();
        }
        return e.getMessage() == null ? e.toString() : e.getMessage();
    }

    /** Tenant schema of client {@code id}: clients are spread over the tenants round-robin. */
    static String tenantOf(int id) {
        return "tenant_" + (id % TENANTS + 1);
    }

    /** Rows in tenant_N.items (the Rust test inserts 10 * N). */
    static int rowsOf(String tenant) {
        return 10 * Integer.parseInt(tenant.substring("tenant_".length()));
    }

    /** A connection with prepareThreshold=1 and, when {@code tenant} is set, currentSchema. */
    static Connection connect(String tenant) throws SQLException {
        String url = "jdbc:postgresql://" + HOST + ":" + PORT + "/" + DB + "?prepareThreshold=1&connectTimeout=30";
        if (tenant != null) url += "&currentSchema=" + tenant;
        Properties props = new Properties();
        props.setProperty("user", USER);
        props.setProperty("password", PASSWORD);
        return DriverManager.getConnection(url, props);
    }

    /** Runs {@code sql} with {@code args} and returns its rows, each column as a string. */
    static List<List<String>> rows(Connection conn, String sql, Object... args) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            for (int i = 0; i < args.length; i++) ps.setObject(i + 1, args[i]);
            List<List<String>> out = new ArrayList<>();
            try (ResultSet rs = ps.executeQuery()) {
                int n = rs.getMetaData().getColumnCount();
                while (rs.next()) {
                    List<String> row = new ArrayList<>();
                    for (int c = 1; c <= n; c++) row.add(rs.getString(c));
                    out.add(row);
                }
            }
            return out;
        }
    }

    static void update(Connection conn, String sql, Object... args) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            for (int i = 0; i < args.length; i++) ps.setObject(i + 1, args[i]);
            ps.executeUpdate();
        }
    }

    /** search_path, the client's own values back, its own tenant's rows. */
    static void checkState(Connection conn, int id, String tenant, int seq, boolean inTxn)
            throws SQLException, CheckFailed {
        String token = "client-" + id + "-seq-" + seq + "-" + (inTxn ? "txn" : "auto");
        List<List<String>> who = rows(conn, WHOAMI, id, token);
        check(who.equals(List.of(List.of(tenant, String.valueOf(id), token))),
                "whoami (" + (inTxn ? "in a transaction" : "autocommit") + ") returned " + who
                        + ", expected [[" + tenant + ", " + id + ", " + token + "]]");
        List<List<String>> items = rows(conn, ITEMS);
        check(items.equals(List.of(List.of(tenant, String.valueOf(rowsOf(tenant))))),
                "unqualified items returned " + items + ", expected [[" + tenant + ", " + rowsOf(tenant) + "]]");
    }

    static void worker(int id) throws Exception {
        String tenant = tenantOf(id);
        Connection conn;
        try {
            conn = connect(tenant);
        } catch (SQLException e) {
            throw new CheckFailed("client " + id + ": connect with currentSchema=" + tenant + ": " + describe(e));
        }
        try (conn) {
            int committed = 0;
            for (int seq = 1; seq <= TXNS; seq++) {
                boolean rollback = seq % 10 == 0;
                conn.setAutoCommit(false);
                checkState(conn, id, tenant, seq, true);
                update(conn, INSERT, id, rollback ? -seq : seq, tenant);
                if (seq == 1) {
                    // The statement runs under its name on whichever server this transaction holds.
                    int prepared = Integer.parseInt(rows(conn, PREPARED, ITEMS).get(0).get(0));
                    check(prepared >= 1, "items is not a server-side prepared statement (" + prepared + ")");
                }
                if (rollback) {
                    conn.rollback();
                } else {
                    List<List<String>> counted = rows(conn, COUNT, id);
                    check(counted.equals(List.of(List.of(String.valueOf(committed + 1), String.valueOf(seq)))),
                            "ledger inside transaction " + seq + ": " + counted + ", expected [["
                                    + (committed + 1) + ", " + seq + "]]");
                    conn.commit();
                    committed++;
                }
                conn.setAutoCommit(true);
                // The same checks outside a transaction: each statement may get another server.
                checkState(conn, id, tenant, seq, false);
            }
            String n = rows(conn, COUNT, id).get(0).get(0);
            check(n.equals(String.valueOf(committed)), "ledger at the end: " + n + " rows, expected " + committed);
        } catch (SQLException | CheckFailed e) {
            throw new CheckFailed("client " + id + " (" + tenant + "): " + describe(e));
        }
    }

    /**
     * "rows with columns a,b" or "error SQLSTATE message" for the prepared SELECT *, in the
     * connection's current transaction mode.
     */
    static String shapeResult(Connection conn) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(SHAPE); ResultSet rs = ps.executeQuery()) {
            ResultSetMetaData md = rs.getMetaData();
            List<String> cols = new ArrayList<>();
            for (int c = 1; c <= md.getColumnCount(); c++) cols.add(md.getColumnName(c));
            while (rs.next()) {
                // Reading every column of every row: a shape mismatch would show here.
                for (int c = 1; c <= cols.size(); c++) rs.getString(c);
            }
            return "rows with columns " + String.join(",", cols);
        } catch (SQLException e) {
            if (e.getSQLState() == null) throw e;
            return "error " + e.getSQLState() + " " + e.getMessage();
        }
    }

    /** {@link #shapeResult} in autocommit mode, or in a transaction that commits or rolls back. */
    static String runShape(Connection conn, boolean inTxn) throws SQLException {
        if (!inTxn) return shapeResult(conn);
        conn.setAutoCommit(false);
        try {
            String result = shapeResult(conn);
            if (result.startsWith("rows ")) conn.commit();
            else conn.rollback();
            return result;
        } finally {
            conn.setAutoCommit(true);
        }
    }

    /** Distinct results with how many connections got each, for the progress line. */
    static String summary(List<String> results) {
        Map<String, Integer> counts = new LinkedHashMap<>();
        for (String r : results) counts.merge(r, 1, Integer::sum);
        List<String> parts = new ArrayList<>();
        counts.forEach((text, n) -> parts.add(n + " x " + text));
        return String.join(" | ", parts);
    }

    static final String NEW = "rows with columns id,a,b";

    /**
     * POOL_SIZE new connections run the statement in transactions open at the same time, so
     * through the proxy each is on a different server: all get the new columns.
     */
    static void freshConnections() throws Exception {
        List<Connection> conns = new ArrayList<>();
        try {
            List<String> results = new ArrayList<>();
            for (int i = 0; i < POOL_SIZE; i++) {
                Connection conn = connect(null);
                conns.add(conn);
                conn.setAutoCommit(false);
                results.add(shapeResult(conn));
            }
            for (Connection conn : conns) conn.rollback();
            System.out.println("schema change: " + POOL_SIZE + " new connections at once: " + summary(results));
            for (int i = 0; i < results.size(); i++) {
                check(results.get(i).equals(NEW), "shape on new connection " + i + " of " + POOL_SIZE
                        + " (in transactions at once) after ALTER: " + results.get(i) + ", expected columns id,a,b");
            }
        } finally {
            for (Connection conn : conns) conn.close();
        }
    }

    /**
     * A SELECT * prepared before ALTER TABLE ... ADD COLUMN and run again after it.
     *
     * <p>Before the ALTER, POOL_SIZE connections run the statement in transactions open at the
     * same time, so through the proxy every server connection has it prepared: a retry cannot
     * pass by landing on a server that has not.
     *
     * <p>Directly against PostgreSQL, pgjdbc gets 0A000 "cached plan must not change result type"
     * and forgets its server-prepared statements. In autocommit mode it then prepares the
     * statement again and retries by itself, so the caller gets the new columns at once; inside a
     * transaction it raises the error once (the transaction is aborted) and the retried
     * transaction gets the new columns. Through the proxy the same must hold: the autocommit
     * rerun returns the new columns, the transactional rerun raises at most 0A000 and its retry
     * returns the new columns, and new connections get the new columns on every server (see
     * freshConnections). The transactional rerun comes after the autocommit one on purpose: a
     * connection whose statement was described with the old columns must not get rows of the
     * new shape unannounced once another client has prepared it again.
     */
    static void schemaChange() throws Exception {
        List<Connection> conns = new ArrayList<>();
        try (Connection b = connect(null)) {
            for (int i = 0; i < POOL_SIZE; i++) conns.add(connect(null));
            for (int i = 0; i < conns.size(); i++) {
                Connection conn = conns.get(i);
                conn.setAutoCommit(false);
                List<List<String>> shape = rows(conn, SHAPE);
                check(shape.get(0).size() == 2, "shape before ALTER on connection " + i + ": " + shape + ", expected 2 columns");
            }
            for (Connection conn : conns) {
                conn.commit();
                conn.setAutoCommit(true);
            }
            try (Statement st = b.createStatement()) {
                st.execute("ALTER TABLE public.shape ADD COLUMN b int NOT NULL DEFAULT 7");
            }

            String auto = runShape(conns.get(0), false);
            System.out.println("schema change: rerun outside a transaction: " + auto);
            check(auto.equals(NEW), "shape rerun outside a transaction after ALTER: " + auto
                    + ", expected columns id,a,b (pgjdbc re-prepares and retries by itself, as it does directly)");

            String first = runShape(conns.get(1), true);
            System.out.println("schema change: rerun 1 in a transaction: " + first);
            check(first.equals(NEW) || first.startsWith("error 0A000 "), "shape rerun 1 in a transaction after ALTER: "
                    + first + ", expected error 0A000 (as directly) or columns id,a,b");
            if (!first.equals(NEW)) {
                String second = runShape(conns.get(1), true);
                System.out.println("schema change: rerun 2 in a transaction: " + second);
                check(second.equals(NEW), "shape rerun 2 in a transaction after ALTER: " + second + ", expected columns id,a,b");
            }

            freshConnections();
        } finally {
            for (Connection conn : conns) conn.close();
        }
    }

    /** Every committed row is there once, tagged with its client's tenant. */
    static void checkLedger() throws Exception {
        try (Connection conn = connect(null)) {
            List<List<String>> rows = rows(conn,
                    "SELECT client, count(*)::int, min(tenant), max(tenant) FROM public.ledger GROUP BY client ORDER BY client");
            check(rows.size() == CLIENTS, "ledger has rows of " + rows.size() + " clients, expected " + CLIENTS);
            for (List<String> row : rows) {
                String tenant = tenantOf(Integer.parseInt(row.get(0)));
                check(row.subList(1, 4).equals(List.of(String.valueOf(COMMITTED), tenant, tenant)),
                        "ledger for client " + row.get(0) + ": " + row + ", expected " + COMMITTED + " rows of " + tenant);
            }
        }
    }

    /** CLIENTS threads at once, then every committed row checked; throws what went wrong. */
    static void concurrentClients() throws Exception {
        long started = System.nanoTime();
        ExecutorService pool = Executors.newFixedThreadPool(CLIENTS);
        List<Future<?>> futures = new ArrayList<>();
        for (int id = 0; id < CLIENTS; id++) {
            final int client = id;
            futures.add(pool.submit(() -> {
                worker(client);
                return null;
            }));
        }
        List<String> failures = new ArrayList<>();
        for (Future<?> f : futures) {
            try {
                f.get();
            } catch (ExecutionException e) {
                failures.add(describe(e.getCause()));
            }
        }
        pool.shutdown();
        if (!failures.isEmpty()) {
            throw new CheckFailed(failures.size() + " of " + CLIENTS + " clients failed; first: " + failures.get(0)
                    + (failures.size() > 1 ? "; last: " + failures.get(failures.size() - 1) : ""));
        }
        checkLedger();
        System.out.printf("%d clients x %d transactions in %.1f s%n", CLIENTS, TXNS,
                (System.nanoTime() - started) / 1e9);
    }

    interface Part {
        void run() throws Exception;
    }

    /** Both parts run even when the first fails, so one run shows every failure. */
    public static void main(String[] args) {
        boolean failed = false;
        String[] names = {"concurrent clients", "schema change"};
        Part[] parts = {PgjdbcDriver::concurrentClients, PgjdbcDriver::schemaChange};
        for (int i = 0; i < parts.length; i++) {
            try {
                parts[i].run();
                System.out.println("ok: " + names[i]);
            } catch (Exception e) {
                System.err.println("FAIL: " + names[i] + ": " + describe(e));
                failed = true;
            }
        }
        System.out.flush();
        System.err.flush();
        System.exit(failed ? 1 : 0);
    }
}
