//! The Prometheus metric families. Histograms and event counters live in a registry for the
//! process; each pool looks its handles up once ([`PoolHandles`]), so recording a transaction is
//! a few atomic adds. Gauges and the per-pool totals already kept for SHOW STATS are read from
//! the live state when `/metrics` is scraped, and cost the relay nothing.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::shared::Shared;
use crate::stats::idx;

const POOL: &[&str] = &["database", "user"];

/// Bucket bounds for waits and durations, in seconds: 100 µs to a minute.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Why a server connection was closed (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Lost or broken while in use, or its session parameters could not be applied.
    Error = 0,
    /// Unused for `server_idle_timeout`.
    Idle,
    /// Older than `server_lifetime`.
    Lifetime,
    /// RECONNECT, PAUSE, or a reload that changed its upstream.
    Reconnect,
    /// The server closed it (restart, terminate) while it was idle.
    ClosedByServer,
    /// Its client left session state or a transaction that could not be cleaned up.
    ResetFailed,
    /// KILL, or its client's task ended while it held the server.
    Killed,
    /// Closed to make room under `max_db_connections` / `max_user_connections`.
    Cap,
    /// Floodgate stopped.
    Shutdown,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Error => "error",
            CloseReason::Idle => "idle",
            CloseReason::Lifetime => "lifetime",
            CloseReason::Reconnect => "reconnect",
            CloseReason::ClosedByServer => "closed_by_server",
            CloseReason::ResetFailed => "reset_failed",
            CloseReason::Killed => "killed",
            CloseReason::Cap => "cap",
            CloseReason::Shutdown => "shutdown",
        }
    }

    pub fn from_u8(v: u8) -> CloseReason {
        [
            CloseReason::Error,
            CloseReason::Idle,
            CloseReason::Lifetime,
            CloseReason::Reconnect,
            CloseReason::ClosedByServer,
            CloseReason::ResetFailed,
            CloseReason::Killed,
            CloseReason::Cap,
            CloseReason::Shutdown,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(CloseReason::Error)
    }
}

/// The families recorded as things happen.
pub struct Telemetry {
    registry: Registry,
    queue_wait: HistogramVec,
    transaction_duration: HistogramVec,
    query_duration: HistogramVec,
    server_connect: HistogramVec,
    servers_opened: IntCounterVec,
    servers_closed: IntCounterVec,
    /// ErrorResponses sent to clients, by SQLSTATE (the server's and Floodgate's own).
    pub errors: IntCounterVec,
    /// Timeouts, by setting.
    pub timeouts: IntCounterVec,
    /// Clients refused, by reason.
    pub refused: IntCounterVec,
    /// CancelRequests forwarded to a server.
    pub cancels: IntCounter,
    /// Reloads (RELOAD, SIGHUP, SET), by result.
    pub reloads: IntCounterVec,
}

/// One pool's handles, looked up once.
pub struct PoolHandles {
    pub queue_wait: Histogram,
    pub transaction: Histogram,
    pub query: Histogram,
    pub connect: Histogram,
    pub opened: IntCounter,
    closed: IntCounterVec,
    labels: [String; 2],
}

impl PoolHandles {
    pub fn closed(&self, reason: CloseReason) {
        let [db, user] = &self.labels;
        self.closed
            .with_label_values(&[db.as_str(), user.as_str(), reason.label()])
            .inc();
    }
}

fn histogram(registry: &Registry, name: &str, help: &str) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
    let h = HistogramVec::new(opts, POOL).expect("valid histogram");
    registry.register(Box::new(h.clone())).expect("unique name");
    h
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry.register(Box::new(c.clone())).expect("unique name");
    c
}

impl Default for Telemetry {
    fn default() -> Self {
        let r = Registry::new();
        let cancels = IntCounter::new(
            "floodgate_cancel_requests_forwarded_total",
            "CancelRequests forwarded to the server the client held.",
        )
        .expect("valid counter");
        r.register(Box::new(cancels.clone())).expect("unique name");
        Telemetry {
            queue_wait: histogram(
                &r,
                "floodgate_queue_wait_seconds",
                "Time a client waited for a server (0 when one was free).",
            ),
            transaction_duration: histogram(
                &r,
                "floodgate_transaction_duration_seconds",
                "Time a server was attached to a client: one transaction (the session in \
                 session mode).",
            ),
            query_duration: histogram(
                &r,
                "floodgate_query_duration_seconds",
                "Time from a request to its ReadyForQuery.",
            ),
            server_connect: histogram(
                &r,
                "floodgate_server_connect_seconds",
                "Time to connect to PostgreSQL and log in.",
            ),
            servers_opened: counter(
                &r,
                "floodgate_server_connections_opened_total",
                "Server connections opened.",
                POOL,
            ),
            servers_closed: counter(
                &r,
                "floodgate_server_connections_closed_total",
                "Server connections closed, by reason.",
                &["database", "user", "reason"],
            ),
            errors: counter(
                &r,
                "floodgate_client_errors_total",
                "ErrorResponses sent to clients (PostgreSQL's and Floodgate's own), by SQLSTATE.",
                &["sqlstate"],
            ),
            timeouts: counter(
                &r,
                "floodgate_timeouts_total",
                "Timeouts, by setting.",
                &["kind"],
            ),
            refused: counter(
                &r,
                "floodgate_clients_refused_total",
                "Client connections refused, by reason.",
                &["reason"],
            ),
            reloads: counter(
                &r,
                "floodgate_reloads_total",
                "Configuration reloads (RELOAD, SIGHUP, SET), by result.",
                &["result"],
            ),
            cancels,
            registry: r,
        }
    }
}

impl Telemetry {
    /// The handles of pool (`db`, `user`).
    pub fn pool(&self, db: &str, user: &str) -> PoolHandles {
        let labels = [db, user];
        PoolHandles {
            queue_wait: self.queue_wait.with_label_values(&labels),
            transaction: self.transaction_duration.with_label_values(&labels),
            query: self.query_duration.with_label_values(&labels),
            connect: self.server_connect.with_label_values(&labels),
            opened: self.servers_opened.with_label_values(&labels),
            closed: self.servers_closed.clone(),
            labels: [db.to_owned(), user.to_owned()],
        }
    }

    /// An ErrorResponse with `code` went to a client.
    pub fn error(&self, code: &str) {
        self.errors.with_label_values(&[code]).inc();
    }
}

/// Families computed from the live state at scrape time.
struct Live {
    registry: Registry,
}

impl Live {
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
        self.registry
            .register(Box::new(g.clone()))
            .expect("unique name");
        g
    }

    fn fgauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
        let g = prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
        self.registry
            .register(Box::new(g.clone()))
            .expect("unique name");
        g
    }

    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        counter(&self.registry, name, help, labels)
    }
}

/// The whole exposition, in Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let live = Live {
        registry: Registry::new(),
    };
    pools(shared, &live);
    budget(shared, &live);
    process(shared, &live);
    let mut families = shared.stats.telemetry.registry.gather();
    families.extend(live.registry.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// `instances = "auto"`: the budget per upstream host, as the last poll saw it (no series
/// when `instances` is a number, or before a host's first poll).
fn budget(shared: &Shared, live: &Live) {
    let Some(budget) = &shared.pools.budget else {
        return;
    };
    let host = &["host"];
    let instances = live.gauge(
        "floodgate_budget_instances",
        "Live Floodgate instances sharing the upstream host's budget (this one included).",
        host,
    );
    let total = live.gauge(
        "floodgate_budget_connections",
        "The budget: connection_budget x (max_connections - superuser_reserved_connections).",
        host,
    );
    let share = live.gauge(
        "floodgate_budget_share_connections",
        "Each live instance's fair share of the budget.",
        host,
    );
    let cap = live.gauge(
        "floodgate_budget_cap_connections",
        "Server connections this instance may open on the host now (its share, less while \
         others still hold more than theirs).",
        host,
    );
    for h in budget.hosts() {
        let v = h.view();
        if !v.polled {
            continue;
        }
        let labels = [h.addr.as_str()];
        instances.with_label_values(&labels).set(v.instances as i64);
        total.with_label_values(&labels).set(v.budget as i64);
        share.with_label_values(&labels).set(v.share as i64);
        cap.with_label_values(&labels).set(h.cap.max() as i64);
    }
}

fn pools(shared: &Shared, live: &Live) {
    let config = shared.config();
    let clients = live.gauge(
        "floodgate_clients",
        "Client connections by state: active (holding a server), waiting (for a server), idle.",
        &["database", "user", "state"],
    );
    let servers = live.gauge(
        "floodgate_servers",
        "Server connections by state: active (held by a client), idle, login (connecting).",
        &["database", "user", "state"],
    );
    let reserve = live.gauge(
        "floodgate_reserve_servers",
        "Reserve-pool server connections open.",
        POOL,
    );
    let size = live.gauge("floodgate_pool_size", "pool_size of the pool.", POOL);
    let paused = live.gauge(
        "floodgate_paused",
        "1 while the database is paused.",
        &["database"],
    );
    let disabled = live.gauge(
        "floodgate_disabled",
        "1 while the database is disabled.",
        &["database"],
    );
    let shed = live.fgauge(
        "floodgate_shed_ratio",
        "Share of new transactions shed (SHED), 0 to 1.",
        &["database"],
    );
    let oldest = live.fgauge(
        "floodgate_oldest_wait_seconds",
        "How long the longest-waiting client of the pool has waited.",
        POOL,
    );
    let totals: [(&str, &str, usize); 7] = [
        (
            "floodgate_transactions_total",
            "Transactions completed (ReadyForQuery idle).",
            idx::XACTS,
        ),
        (
            "floodgate_queries_total",
            "Queries answered (ReadyForQuery).",
            idx::QUERIES,
        ),
        (
            "floodgate_client_received_bytes_total",
            "Bytes received from clients and forwarded to servers.",
            idx::RECEIVED,
        ),
        (
            "floodgate_client_sent_bytes_total",
            "Bytes from servers forwarded to clients.",
            idx::SENT,
        ),
        (
            "floodgate_server_assignments_total",
            "Times a server was attached to a client.",
            idx::ASSIGNMENTS,
        ),
        (
            "floodgate_client_logins_total",
            "Clients logged in.",
            idx::LOGINS,
        ),
        (
            "floodgate_parse_messages_total",
            "Parse messages relayed from clients.",
            idx::CLIENT_PARSES,
        ),
    ];
    let counters: Vec<IntCounterVec> = totals
        .iter()
        .map(|(name, help, _)| live.counter(name, help, POOL))
        .collect();
    for (key, values) in shared.stats.totals_by_pool() {
        let labels = [key.0.as_str(), key.1.as_str()];
        for (counter, (_, _, i)) in counters.iter().zip(&totals) {
            counter.with_label_values(&labels).inc_by(values[*i]);
        }
    }
    // Clients per pool and state, and the longest wait (every pool listed, zeros included).
    let mut by_pool = shared.clients_by_pool();
    for pool in shared.pools.list() {
        by_pool
            .entry((pool.database.clone(), pool.user.clone()))
            .or_default();
    }
    for ((db, user), c) in by_pool {
        for (state, n) in [
            ("active", c.active),
            ("waiting", c.waiting),
            ("idle", c.idle),
        ] {
            clients.with_label_values(&[&db, &user, state]).set(n);
        }
        oldest
            .with_label_values(&[&db, &user])
            .set(c.longest_wait_us as f64 / 1e6);
    }
    for pool in shared.pools.list() {
        let labels = [pool.database.as_str(), pool.user.as_str()];
        let sv = |state: &str, n: usize| {
            servers
                .with_label_values(&[labels[0], labels[1], state])
                .set(n as i64)
        };
        sv("active", pool.active_servers());
        sv("idle", pool.idle_servers());
        sv("login", pool.logins());
        reserve
            .with_label_values(&labels)
            .set(pool.reserve_servers() as i64);
        size.with_label_values(&labels).set(pool.size() as i64);
    }
    for db in config.databases.keys() {
        let position = shared.switches.get(db).position();
        paused
            .with_label_values(&[db])
            .set(i64::from(position.paused()));
        disabled
            .with_label_values(&[db])
            .set(i64::from(position.disabled()));
        shed.with_label_values(&[db])
            .set(f64::from(position.shed_percent()) / 100.0);
    }
    let prepared = &shared.statements.counters;
    for (name, help, value) in [
        (
            "floodgate_prepared_statements_prepared_total",
            "Named statements Floodgate prepared on a server for a client.",
            &prepared.prepared,
        ),
        (
            "floodgate_prepared_statements_cache_hits_total",
            "Named statements a server already had when a client used them.",
            &prepared.hits,
        ),
        (
            "floodgate_prepared_statements_evictions_total",
            "Named statements closed on a server to stay within max_prepared_statements.",
            &prepared.evictions,
        ),
    ] {
        let c = live.counter(name, help, &[]);
        c.with_label_values(&[] as &[&str])
            .inc_by(value.load(std::sync::atomic::Ordering::Relaxed));
    }
}

fn process(shared: &Shared, live: &Live) {
    let _ = shared;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as i64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as i64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .unwrap_or(0)
        * page;
    let single = |name: &str, help: &str, value: i64| {
        live.gauge(name, help, &[])
            .with_label_values(&[] as &[&str])
            .set(value);
    };
    single("floodgate_open_fds", "Open file descriptors.", fds);
    single(
        "floodgate_max_fds",
        "The open-files limit.",
        limit.rlim_cur.min(i64::MAX as u64) as i64,
    );
    single(
        "floodgate_resident_memory_bytes",
        "Resident memory of the process.",
        rss,
    );
    live.fgauge(
        "floodgate_uptime_seconds",
        "Time since the process started.",
        &[],
    )
    .with_label_values(&[] as &[&str])
    .set(crate::sessions::started().elapsed().as_secs_f64());
    live.gauge(
        "floodgate_build_info",
        "Always 1; the version in a label.",
        &["version"],
    )
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
}
