//! Counters per pool (database, upstream user), as PgBouncer's SHOW STATS reports them: totals
//! since start and averages over the last `stats_period`. Recording a transaction is a few
//! relaxed atomic adds on counters the pool already holds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The counters, in SHOW STATS order.
pub const NAMES: [&str; 12] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "received",
    "sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
    "client_connect_count",
];

/// Indexes into [`NAMES`].
pub mod idx {
    pub const ASSIGNMENTS: usize = 0;
    pub const XACTS: usize = 1;
    pub const QUERIES: usize = 2;
    pub const RECEIVED: usize = 3;
    pub const SENT: usize = 4;
    pub const XACT_TIME: usize = 5;
    pub const QUERY_TIME: usize = 6;
    pub const WAIT_TIME: usize = 7;
    pub const CLIENT_PARSES: usize = 8;
    pub const SERVER_PARSES: usize = 9;
    pub const BINDS: usize = 10;
    pub const LOGINS: usize = 11;
}

/// One pool's counters, and its handles in the Prometheus families.
pub struct PoolStats {
    counters: [AtomicU64; 12],
    pub metrics: crate::metrics::PoolHandles,
}

/// A copy of the counters at one moment.
pub type Snapshot = [u64; 12];

/// Every pool's counters at one moment, by (database, user).
type PoolSnapshots = BTreeMap<(String, String), Snapshot>;

/// What one attachment of a server to a client did, added to the pool's counters at its end.
#[derive(Default, Debug, Clone, Copy)]
pub struct TxStats {
    /// Transactions completed (ReadyForQuery idle).
    pub xacts: u64,
    /// Queries answered (ReadyForQuery).
    pub queries: u64,
    /// Bytes from the client forwarded to the server.
    pub received: u64,
    /// Bytes from the server forwarded to the client.
    pub sent: u64,
    /// Microseconds with a query running (something awaiting ReadyForQuery).
    pub query_us: u64,
    pub client_parses: u64,
    pub binds: u64,
    /// The relay's last clock reading (when the last query ended), so the caller need not read
    /// the clock again to close the transaction's books.
    pub last_clock: Option<std::time::Instant>,
}

impl PoolStats {
    pub fn add(&self, index: usize, n: u64) {
        if n > 0 {
            self.counters[index].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds one attachment: `held_us` with the server, after waiting `wait_us` for it.
    pub fn record(&self, tx: &TxStats, held_us: u64, wait_us: u64) {
        self.metrics.queue_wait.observe(wait_us as f64 / 1e6);
        self.metrics.transaction.observe(held_us as f64 / 1e6);
        self.add(idx::ASSIGNMENTS, 1);
        self.add(idx::XACTS, tx.xacts);
        self.add(idx::QUERIES, tx.queries);
        self.add(idx::RECEIVED, tx.received);
        self.add(idx::SENT, tx.sent);
        self.add(idx::XACT_TIME, held_us);
        self.add(idx::QUERY_TIME, tx.query_us);
        self.add(idx::WAIT_TIME, wait_us);
        self.add(idx::CLIENT_PARSES, tx.client_parses);
        self.add(idx::BINDS, tx.binds);
    }

    pub fn snapshot(&self) -> Snapshot {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }
}

/// Every pool's counters (kept when a pool is replaced by a reload), and the snapshots the
/// averages are computed from.
#[derive(Default)]
pub struct Stats {
    pools: Mutex<BTreeMap<(String, String), Arc<PoolStats>>>,
    /// The Prometheus families recorded as things happen.
    pub telemetry: crate::metrics::Telemetry,
    /// The two latest period boundaries: (when, counters by pool).
    periods: Mutex<Vec<(Instant, PoolSnapshots)>>,
}

impl Stats {
    pub fn pool(&self, db: &str, user: &str) -> Arc<PoolStats> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry((db.to_owned(), user.to_owned()))
            .or_insert_with(|| {
                Arc::new(PoolStats {
                    counters: Default::default(),
                    metrics: self.telemetry.pool(db, user),
                })
            })
            .clone()
    }

    /// Totals by pool (database, user).
    pub fn totals_by_pool(&self) -> BTreeMap<(String, String), Snapshot> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .iter()
            .map(|(k, s)| (k.clone(), s.snapshot()))
            .collect()
    }

    /// Totals by database, summed over its pools.
    pub fn totals_by_db(&self) -> BTreeMap<String, Snapshot> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<String, Snapshot> = BTreeMap::new();
        for ((db, _), stats) in pools.iter() {
            add_into(out.entry(db.clone()).or_insert([0; 12]), &stats.snapshot());
        }
        out
    }

    /// Closes a period: called every `stats_period`.
    pub fn rotate(&self) {
        let now = Instant::now();
        let counters: BTreeMap<_, _> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .iter()
                .map(|(k, s)| (k.clone(), s.snapshot()))
                .collect()
        };
        let mut periods = self.periods.lock().unwrap_or_else(|e| e.into_inner());
        periods.push((now, counters));
        if periods.len() > 2 {
            periods.remove(0);
        }
    }

    /// Averages by database over the last complete period: per second for counts and bytes,
    /// per transaction / query / assignment for times (PgBouncer's units). Zero before the first
    /// period ends.
    pub fn averages_by_db(&self) -> BTreeMap<String, Snapshot> {
        let periods = self.periods.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<String, Snapshot> = BTreeMap::new();
        let [(t0, old), (t1, new)] = periods.as_slice() else {
            return out;
        };
        let secs = t1
            .duration_since(*t0)
            .max(Duration::from_millis(1))
            .as_secs_f64();
        let mut deltas: BTreeMap<String, Snapshot> = BTreeMap::new();
        for ((db, user), counters) in new {
            let before = old
                .get(&(db.clone(), user.clone()))
                .copied()
                .unwrap_or([0; 12]);
            let delta: Snapshot = std::array::from_fn(|i| counters[i].saturating_sub(before[i]));
            add_into(deltas.entry(db.clone()).or_insert([0; 12]), &delta);
        }
        for (db, d) in deltas {
            let per = |n: u64, by: u64| n.checked_div(by).unwrap_or(0);
            let mut avg: Snapshot = std::array::from_fn(|i| (d[i] as f64 / secs) as u64);
            avg[idx::XACT_TIME] = per(d[idx::XACT_TIME], d[idx::XACTS]);
            avg[idx::QUERY_TIME] = per(d[idx::QUERY_TIME], d[idx::QUERIES]);
            avg[idx::WAIT_TIME] = per(d[idx::WAIT_TIME], d[idx::ASSIGNMENTS]);
            out.insert(db, avg);
        }
        out
    }
}

fn add_into(total: &mut Snapshot, more: &Snapshot) {
    for (t, m) in total.iter_mut().zip(more) {
        *t += m;
    }
}
