#!/usr/bin/env bash
# benches/load.sh — pgbench against PostgreSQL directly, through PgBouncer, and through
# Floodgate (and any other proxy), measured side by side in one run on one machine.
# Floodgate's copy of the workplace's shared/bench/pgbench-compare.sh, plus TLS=1 (below).
#
# What it does
#   1. initdb's a throwaway PostgreSQL cluster in a temp dir (as the `postgres` OS user when run as
#      root) on a free 127.0.0.1 port, tuned for benchmarking (fsync, synchronous_commit and
#      full_page_writes off), trust auth on loopback; creates role+database `bench` and runs
#      `pgbench -i -s $SCALE`.
#   2. starts PgBouncer (transaction mode, default_pool_size=$POOL) on another free port, as the
#      postgres user (PgBouncer refuses root), with a config file of its own in the temp dir.
#   3. optionally starts Floodgate (FLOODGATE_BIN) and/or any other proxy (PROXY_CMD, see below).
#   4. runs every workload against every target, interleaved (A B C, B C A, C A B, ... — the
#      order rotates each repeat so no target always runs right after the same neighbour), each
#      run bounded by `pgbench -T`; records TPS, latency and the CPU time each process tree used.
#      Before every run, untimed and straight to PostgreSQL: CHECKPOINT, and for the write
#      workloads also what pgbench's own pre-run vacuum does (VACUUM branches and tellers,
#      TRUNCATE history), so every run starts from the same table state whatever the order.
#   5. prints medians over the repeats with ratios, writes every run to $OUT (CSV) and the medians
#      to ${OUT%.csv}-summary.csv; on exit stops everything it started, by PID, and deletes the
#      temp dir.
#
# The most stable figure on a small noisy machine is a proxy's CPU time per transaction:
#   cpu_us_per_tx = (user+sys CPU of the proxy's process tree during the run) / transactions.
# TPS on a 2-core box is shared between pgbench, Postgres and the proxy, so it moves with
# whatever else the machine does; CPU per transaction moves much less. Quote ratios, not
# absolute numbers, and look at the spread column before believing a difference.
#
# Settings (environment variables, defaults in brackets)
#   SCRIPTS        workloads, space separated: select-only (pgbench -S), tpcb (built-in TPC-B-like),
#                  simple-update (pgbench -N: TPC-B without the branch/teller updates, so less
#                  lock contention) ["select-only tpcb"]
#   MODES          pgbench -M query modes run against every target ["simple extended"]
#   DIRECT_EXTRA_MODES  modes run against PostgreSQL directly only ["prepared"]. PgBouncer before
#                  1.21 cannot keep named prepared statements in transaction mode, so `prepared`
#                  is never sent to an older PgBouncer, even when listed in MODES.
#   CLIENTS        pgbench -c values, space separated ["10 100"]
#   THREADS        pgbench -j [2]
#   DURATION       pgbench -T seconds per run [15]
#   REPEATS        runs of every (workload, mode, clients, target) [3]
#   SCALE          pgbench -i scale factor [10]
#   POOL           server-side pool size for every proxy [10]
#   MAX_CLIENT_CONN  PgBouncer max_client_conn (and Floodgate's) [2000]
#   PG_MAX_CONNECTIONS  PostgreSQL max_connections [200]; direct runs with more clients than
#                  PostgreSQL can take are skipped (raise this to include them)
#   SHARED_BUFFERS PostgreSQL shared_buffers [256MB]
#   PGBOUNCER      pgbouncer binary for target `pgbouncer` [pgbouncer on PATH, else /usr/sbin/pgbouncer]
#   OUT            CSV of every run [$PWD/bench-results.csv]
#   KEEP_WORKDIR   1 = keep the temp dir (logs, configs) instead of deleting it [0]
#   TLS            1 = clients connect with sslmode=require to every target: PostgreSQL gets
#                  ssl = on, PgBouncer and Floodgate client_tls_sslmode = require, all with one
#                  self-signed certificate (openssl) made for the run; both proxies use
#                  server_tls_sslmode = prefer, so their server connections are encrypted too [0]
#   UPSTREAM       how every proxy reaches PostgreSQL: tcp (127.0.0.1) or unix (the cluster's
#                  socket directory, PgBouncer's and Floodgate's `host` set to it; a PROXY_CONFIG
#                  template gets it as {PG_HOST}) [tcp]
#   SYSCALLS       1 = also count each proxy's system calls per transaction (perf stat on the
#                  raw_syscalls:sys_enter tracepoint; costs the proxies a little CPU) [0]
#   FLOODGATE_BIN  path to a floodgate binary; runs it as target `floodgate` with a config
#                  written from the contract in shared/DESIGN.md [unset: skipped]
#
# Contract for a proxy under test (PROXY_CMD)
#   PROXY_CMD      a shell command line that starts the proxy in the FOREGROUND (no daemonizing:
#                  its CPU is read from /proc of the started process and all its descendants).
#                  It runs via `bash -c` as the invoking user, with stdout+stderr to
#                  <tempdir>/<name>.log. Placeholders replaced before it runs (the same values
#                  are also exported as environment variables):
#                    {PORT}     port it must listen on, on 127.0.0.1        (env PROXY_PORT)
#                    {PG_PORT}  PostgreSQL's port on 127.0.0.1              (env PG_PORT)
#                    {PG_HOST}  where to reach it: 127.0.0.1, or its socket directory with
#                               UPSTREAM=unix                              (env PG_HOST)
#                    {POOL}     server pool size to use                     (env POOL_SIZE)
#                    {MAX_CLIENT_CONN} client connection cap                (env MAX_CLIENT_CONN)
#                    {DIR}      the temp dir, for logs/sockets/pid files    (env BENCH_DIR)
#                    {CONFIG}   the rendered PROXY_CONFIG file, if given    (env PROXY_CONFIG_FILE)
#   PROXY_CONFIG   optional path to a config file template; the same placeholders are replaced
#                  in it and the result is written to <tempdir>/<name>.conf ({CONFIG}).
#   PROXY_NAME     target name in the tables [proxy]
#   PROXY_START_TIMEOUT  seconds to wait for {PORT} to accept connections [30]
#   What the proxy must offer: pool database `bench` for user `bench` (password `bench`;
#   pgbench sends it if asked, PGPASSWORD=bench) in transaction mode, at most {POOL} server
#   connections, plain TCP (clients use sslmode=disable). Upstream PostgreSQL trusts every
#   loopback login; user `bench` owns database `bench`, password `bench`.
#   A proxy that refuses to run as root can be prefixed, when the script runs as root, with
#   `setpriv --reuid=postgres --regid=postgres --init-groups` (the temp dir is postgres-owned).
#   Examples:
#     PROXY_NAME=myproxy PROXY_CMD='target/release/myproxy --listen 127.0.0.1:{PORT}
#       --upstream 127.0.0.1:{PG_PORT} --pool {POOL}' shared/bench/pgbench-compare.sh
#     PROXY_NAME=other PROXY_CONFIG=/tmp/other.toml.tmpl PROXY_CMD='/opt/other/bin/pooler {CONFIG}' \
#       shared/bench/pgbench-compare.sh     # the template says port = {PORT}, pool_size = {POOL}, ...
#
# Output columns (CSV, one line per pgbench run)
#   tps            pgbench's tps, without initial connection time
#   latency_ms     pgbench's average latency
#   connect_ms     pgbench's initial connection time
#   transactions / failed   transactions processed / failed (pgbench 15+)
#   proxy_cpu_s    CPU seconds the proxy's process tree used during the run (nan for direct)
#   cpu_us_per_tx  proxy_cpu_s / transactions, in microseconds
#   proxy_core_pct proxy_cpu_s / wall time of the run: 100 = one core saturated
#   pg_cpu_s, pg_us_per_tx   the same for the whole PostgreSQL cluster (postmaster tree)
#   client_cpu_s   CPU seconds pgbench itself used
#   busy_pct       whole-machine CPU busy during the run (100 = all cores)
#   other_pct      machine CPU used by anything other than PostgreSQL, the proxy and pgbench
#                  (100 = all cores). 0-5 is normal (kernel threads, tick sampling); more means a
#                  foreign load shared the box and the run's TPS is suspect
#   elapsed_s      wall time of the pgbench command
#   proxy_sys_pct  share of the proxy's CPU spent in the kernel (stime / (utime + stime))
#   syscalls_per_tx  the proxy's system calls per transaction (SYSCALLS=1; nan otherwise)
#
# The summary prints, per workload: median TPS with its spread ((max-min)/median), latency,
# CPU µs/tx and core use of each proxy, PostgreSQL's µs/tx, all_us/tx (PostgreSQL + proxy +
# pgbench: on a box where all three share the cores, TPS ~ busy cores / all_us/tx, and a proxy
# also changes what PostgreSQL and pgbench spend per transaction), then
#   ratio pgbouncer/direct: tps R
#   ratio NAME/pgbouncer: tps R, cpu_us/tx R        (for every other proxy; bars parse this line)
# computed as ratios of medians.
#
# Usage
#   [VAR=value ...] pgbench-compare.sh          run the benchmark
#   pgbench-compare.sh --summary FILE.csv       print the summary of an earlier run's CSV again
#   pgbench-compare.sh --help                   print this header
# Example:  DURATION=10 CLIENTS=100 SCRIPTS=select-only shared/bench/pgbench-compare.sh
set -euo pipefail

# ---------------------------------------------------------------- settings
SCRIPTS=${SCRIPTS:-"select-only tpcb"}
MODES=${MODES:-"simple extended"}
DIRECT_EXTRA_MODES=${DIRECT_EXTRA_MODES-"prepared"}
CLIENTS=${CLIENTS:-"10 100"}
THREADS=${THREADS:-2}
DURATION=${DURATION:-15}
REPEATS=${REPEATS:-3}
SCALE=${SCALE:-10}
POOL=${POOL:-10}
MAX_CLIENT_CONN=${MAX_CLIENT_CONN:-2000}
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-200}
SHARED_BUFFERS=${SHARED_BUFFERS:-256MB}
OUT=${OUT:-$PWD/bench-results.csv}
SUMMARY=${OUT%.csv}-summary.csv
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
PROXY_NAME=${PROXY_NAME:-proxy}
PROXY_START_TIMEOUT=${PROXY_START_TIMEOUT:-30}

# Clients: password for proxies that ask, no TLS or GSS negotiation round trips.
TLS=${TLS:-0}
SYSCALLS=${SYSCALLS:-0}
if [[ $SYSCALLS == 1 ]] && ! perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
  echo "SYSCALLS=1 needs perf with the raw_syscalls tracepoint (linux-perf, root or perf_event_paranoid <= 1)" >&2
  exit 1
fi
export PGPASSWORD=bench PGSSLMODE=disable PGGSSENCMODE=disable
if [[ $TLS == 1 ]]; then export PGSSLMODE=require; fi

# ---------------------------------------------------------------- tools
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -x $PGBIN/initdb ]] || { echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench not found (apt-get install postgresql-client)" >&2; exit 1; }
command -v psql >/dev/null || { echo "psql not found (apt-get install postgresql-client)" >&2; exit 1; }
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
[[ -x $PGBOUNCER ]] || { echo "pgbouncer not found (apt-get install pgbouncer)" >&2; exit 1; }
if [[ -n ${FLOODGATE_BIN:-} ]]; then
  FLOODGATE_BIN=$(readlink -f "$FLOODGATE_BIN")
  [[ -x $FLOODGATE_BIN ]] || { echo "FLOODGATE_BIN is not an executable: $FLOODGATE_BIN" >&2; exit 1; }
fi
CLK_TCK=$(getconf CLK_TCK)
# Every client connection is a file descriptor in pgbench and in the proxy; children inherit this.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------- helpers
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# PostgreSQL and PgBouncer refuse to run as root. as_pg runs a command as `postgres` when we are
# root (runuser: fine for commands we wait for); DROP_TO_PG is a prefix that exec's instead of
# forking, so the PID we record is the server's own PID.
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
DROP_TO_PG=()
if [[ $(id -u) == 0 ]]; then DROP_TO_PG=(setpriv --reuid=postgres --regid=postgres --init-groups); fi

free_port() {  # ask the kernel for an unused loopback port
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
  else
    local p
    while :; do
      p=$((20000 + RANDOM % 30000))
      ss -Htan "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
  fi
}

wait_port() {  # port timeout_s: wait until something accepts TCP connections on 127.0.0.1:port
  local deadline=$((SECONDS + ${2:-30}))
  while ((SECONDS < deadline)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after ${2:-30}s" >&2
  return 1
}

# The process tree rooted at PID $1 as "pid user sys" lines, where user = utime+cutime and
# sys = stime+cstime in clock ticks (a process's threads are summed into its /proc/PID/stat). cutime/cstime count
# too, so the CPU of a child that exits and is reaped during a run moves into its parent's total
# instead of vanishing. `cat` tolerates processes that disappear between the glob and the read
# (and then fails, hence `|| true` under pipefail); awk would abort.
proc_tree() {
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$1" '
    { pid = $1; sub(/^.*\) /, "")   # drop "pid (comm) ": comm may contain spaces and parentheses
      parent[pid] = $2; user[pid] = $12 + $14; sys[pid] = $13 + $15 }
    END {
      if (!(root in parent)) exit
      intree[root] = 1; grew = 1
      while (grew) { grew = 0
        for (p in parent) if (!(p in intree) && (parent[p] in intree)) { intree[p] = 1; grew = 1 } }
      for (p in intree) print p, user[p], sys[p] }'
}
tree_ticks() { proc_tree "$1" | awk '{ t += $2 + $3; n++ } END { print n ? t : "nan" }'; }
tree_sys_ticks() { proc_tree "$1" | awk '{ t += $3; n++ } END { print n ? t : "nan" }'; }
tree_pids() { proc_tree "$1" | awk '{ print $1 }'; }

machine_ticks() {  # "busy total" clock ticks of the whole machine, from /proc/stat
  # user nice system idle iowait irq softirq steal; guest time is already inside user, so not added
  awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

# CPU ticks of this shell's reaped children (cutime+cstime): read before and after a pgbench run
# it is pgbench's CPU (plus a few ms of date/awk helpers).
children_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat"; }

now() { date +%s.%N; }

# SYSCALLS=1: count the proxy's system calls during a run with perf's raw_syscalls:sys_enter
# tracepoint (a software event) on every thread of its process tree. Counting costs the proxy a
# little CPU, equally for every proxy; off by default so CPU figures stay undisturbed.
syscalls_start() {  # pid-of-tree -> starts perf in the background, output in $WORK/perf.out
  local pids; pids=$(tree_pids "$1" | paste -sd,)
  perf stat -x, -e raw_syscalls:sys_enter -p "$pids" -o "$WORK/perf.out" 2>/dev/null &
  PERF_PID=$!
  sleep 0.2
}
syscalls_stop() {  # -> the count, or nan, in CALLS (not via $(...): wait needs this shell)
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  CALLS=$(awk -F, '/raw_syscalls:sys_enter/ { print ($1 ~ /^[0-9]+$/) ? $1 : "nan"; found = 1 }
           END { if (!found) print "nan" }' "$WORK/perf.out" 2>/dev/null || echo nan)
}

# ---------------------------------------------------------------- summary
# print_summary RUNS_CSV SUMMARY_CSV: medians over repeats per (script, mode, clients, target);
# failed runs (nan) are left out and n says how many runs count (of the most repeats seen).
# Ratios are ratios of medians within the same workload.
print_summary() {
  awk -F, -v summary="$2" '
  function median(list,   v, n, i, j, x) {
    n = split(list, v, " ")
    for (i = 2; i <= n; i++) { x = v[i] + 0; for (j = i - 1; j >= 1 && v[j] + 0 > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
    if (n == 0) return "nan"
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  function spread(list,   v, n, i, lo, hi, m) {
    n = split(list, v, " "); if (n < 2) return "-"
    lo = hi = v[1] + 0; for (i = 2; i <= n; i++) { if (v[i] + 0 < lo) lo = v[i] + 0; if (v[i] + 0 > hi) hi = v[i] + 0 }
    m = median(list); return (m > 0) ? sprintf("%.0f%%", 100 * (hi - lo) / m) : "-"
  }
  function add(k, col, val) { if (val != "nan" && val != "") vals[k, col] = vals[k, col] " " val }
  function fmt(x, f) { return (x == "nan" || x == "") ? "-" : sprintf(f, x) }
  function ratio(a, b) { return (a == "nan" || b == "nan" || b == 0) ? "-" : sprintf("%.2f", a / b) }
  NR == 1 { next }
  {
    if ($5 + 0 > repeats) repeats = $5 + 0
    w = $1 SUBSEP $2 SUBSEP $3; k = w SUBSEP $4
    if (!(w in wseen)) { wseen[w] = 1; worder[++nw] = w }
    if (!(k in kseen)) { kseen[k] = 1; ntg[w]++; tg[w, ntg[w]] = $4 }
    if ($6 != "nan") n[k]++
    add(k, "tps", $6); add(k, "lat", $7); add(k, "cpu", $12); add(k, "core", $13)
    add(k, "pg", $15); add(k, "busy", $17); add(k, "other", $18); add(k, "sys", $20); add(k, "calls", $21)
    # everything this transaction cost the box: PostgreSQL + proxy + pgbench
    if ($9 > 0 && $15 != "nan") add(k, "all", $15 + ($12 == "nan" ? 0 : $12) + $16 * 1e6 / $9)
  }
  END {
    print "script,mode,clients,target,runs,tps,tps_spread,latency_ms,cpu_us_per_tx,proxy_core_pct,pg_us_per_tx,all_us_per_tx,busy_pct,other_pct,proxy_sys_pct,syscalls_per_tx" > summary
    printf "%-13s %-9s %7s | %-10s %3s %9s %6s %8s %10s %6s %5s %6s %9s %9s %6s %6s\n", "script", "mode", "clients",
           "target", "n", "tps", "spread", "lat_ms", "cpu_us/tx", "core%", "sys%", "sc/tx", "pg_us/tx", "all_us/tx", "busy%", "other%"
    for (i = 1; i <= nw; i++) {
      w = worder[i]; split(w, p, SUBSEP)
      for (j = 1; j <= ntg[w]; j++) {
        t = tg[w, j]; k = w SUBSEP t
        m["tps"] = median(vals[k, "tps"]); m["lat"] = median(vals[k, "lat"]); m["cpu"] = median(vals[k, "cpu"])
        m["core"] = median(vals[k, "core"]); m["pg"] = median(vals[k, "pg"]); m["busy"] = median(vals[k, "busy"])
        m["other"] = median(vals[k, "other"]); m["all"] = median(vals[k, "all"])
        m["sys"] = median(vals[k, "sys"]); m["calls"] = median(vals[k, "calls"])
        med_tps[w, t] = m["tps"]; med_cpu[w, t] = m["cpu"]
        printf "%-13s %-9s %7s | %-10s %3s %9s %6s %8s %10s %6s %5s %6s %9s %9s %6s %6s\n", p[1], p[2], p[3], t,
               (n[k] + 0) "/" repeats, fmt(m["tps"], "%.0f"), spread(vals[k, "tps"]), fmt(m["lat"], "%.3f"),
               fmt(m["cpu"], "%.1f"), fmt(m["core"], "%.0f"), fmt(m["sys"], "%.0f"), fmt(m["calls"], "%.2f"),
               fmt(m["pg"], "%.1f"), fmt(m["all"], "%.1f"),
               fmt(m["busy"], "%.0f"),
               fmt(m["other"], "%.0f") (m["other"] != "nan" && m["other"] > 5 ? "!" : "")
        if (m["other"] != "nan" && m["other"] > 5) disturbed++
        print p[1], p[2], p[3], t, n[k] + 0, m["tps"], spread(vals[k, "tps"]), m["lat"], m["cpu"], m["core"], m["pg"],
              m["all"], m["busy"], m["other"], m["sys"], m["calls"] > summary
      }
      if ((w, "pgbouncer") in med_tps && (w, "direct") in med_tps)
        printf "  ratio pgbouncer/direct: tps %s\n", ratio(med_tps[w, "pgbouncer"], med_tps[w, "direct"])
      for (j = 1; j <= ntg[w]; j++) {
        t = tg[w, j]
        if (t == "direct" || t == "pgbouncer" || !((w, "pgbouncer") in med_tps)) continue
        printf "  ratio %s/pgbouncer: tps %s, cpu_us/tx %s\n", t, ratio(med_tps[w, t], med_tps[w, "pgbouncer"]),
               ratio(med_cpu[w, t], med_cpu[w, "pgbouncer"])
      }
    }
    if (disturbed)
      print "! other% > 5: something besides PostgreSQL, the proxy and pgbench used the CPU during those runs" \
            " (0-5% is normal: kernel threads such as ksoftirqd, tick-sampled accounting)"
  }' OFS=, "$1"
}

case ${1:-} in
  -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | cut -c3-; exit 0 ;;
  --summary) print_summary "${2:?--summary needs a CSV file}" "${2%.csv}-summary.csv"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------- cleanup (set before starting anything)
WORK=$(mktemp -d /tmp/pgbench-compare.XXXXXX)
chmod 755 "$WORK"
declare -A PORT=() PID=()   # per target: port clients use; PID of the process tree we measure
STARTED=()                  # PIDs we started ourselves, stopped on exit
PG_STARTED=0

cleanup() {
  # Stop what we started: each recorded PID and its descendants (e.g. a proxy that a PROXY_CMD
  # wrapper forked), politely first, then by force after 5 s.
  local pid pids=()
  for pid in "${STARTED[@]}"; do mapfile -t -O "${#pids[@]}" pids < <(tree_pids "$pid"); done
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  if ((PG_STARTED)); then as_pg "$PGBIN/pg_ctl" -D "$WORK/data" stop -m fast >/dev/null 2>&1 || true; fi
  if [[ $KEEP_WORKDIR == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- PostgreSQL
PG_PORT=$(free_port)
if [[ $(id -u) == 0 ]]; then chown postgres: "$WORK"; fi
as_pg "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
if [[ $TLS == 1 ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
  chmod 600 "$WORK/tls.key"
  if [[ $(id -u) == 0 ]]; then chown postgres: "$WORK/tls.key" "$WORK/tls.crt"; fi
  printf "ssl = on\nssl_cert_file = '%s'\nssl_key_file = '%s'\n" "$WORK/tls.crt" "$WORK/tls.key" \
    >>"$WORK/data/postgresql.conf"
fi
cat >>"$WORK/data/postgresql.conf" <<EOF

# pgbench-compare.sh: a throwaway cluster tuned to measure proxies, not durability
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = $PG_MAX_CONNECTIONS
shared_buffers = $SHARED_BUFFERS
fsync = off
synchronous_commit = off
full_page_writes = off
max_wal_size = 4GB
EOF
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w start >/dev/null
PG_STARTED=1
PID[direct]=$(head -1 "$WORK/data/postmaster.pid")   # postmaster: its tree is the whole cluster
PORT[direct]=$PG_PORT
PG_PID=${PID[direct]}
case ${UPSTREAM:-tcp} in
  tcp) PG_HOST=127.0.0.1 ;;
  unix) PG_HOST=$WORK ;;
  *) echo "UPSTREAM must be tcp or unix, not $UPSTREAM" >&2; exit 2 ;;
esac

pg_admin() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }
pg_admin -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" postgres
pg_admin -c "CREATE DATABASE bench OWNER bench" postgres
log "pgbench -i -s $SCALE ..."
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1 \
  || { cat "$WORK/pgbench-init.log" >&2; exit 1; }
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (postmaster $PG_PID), scale $SCALE"

TARGETS=(direct)

# ---------------------------------------------------------------- PgBouncer
PGBOUNCER_VERSION=$("$PGBOUNCER" --version | awk 'NR == 1 {print $2}')
# Named prepared statements in transaction mode arrived in PgBouncer 1.21 (max_prepared_statements).
pgbouncer_has_prepared() { [[ $(printf '%s\n1.21\n' "$PGBOUNCER_VERSION" | sort -V | head -1) == 1.21 ]]; }

start_pgbouncer() {
  local port; port=$(free_port)
  echo '"bench" "bench"' >"$WORK/userlist.txt"   # trust still requires the user to be listed
  cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
bench = host=$PG_HOST port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $MAX_CLIENT_CONN
logfile = $WORK/pgbouncer.log
; one line per client connection is noise here, not a cost worth measuring
log_connections = 0
log_disconnections = 0
EOF
  if pgbouncer_has_prepared; then echo "max_prepared_statements = 200" >>"$WORK/pgbouncer.ini"; fi
  if [[ $TLS == 1 ]]; then
    # server_tls_sslmode spelled out: PgBouncer before 1.20 defaults to disable (Floodgate and
    # later PgBouncers to prefer), and both legs must be encrypted for a fair comparison.
    printf 'client_tls_sslmode = require\nclient_tls_key_file = %s\nclient_tls_cert_file = %s\nserver_tls_sslmode = prefer\n' \
      "$WORK/tls.key" "$WORK/tls.crt" >>"$WORK/pgbouncer.ini"
  fi
  if [[ $(id -u) == 0 ]]; then chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"; fi
  "${DROP_TO_PG[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini" >"$WORK/pgbouncer.out" 2>&1 &
  PID[pgbouncer]=$!; STARTED+=("$!"); PORT[pgbouncer]=$port
  wait_port "$port" 10 || { cat "$WORK/pgbouncer.out" >&2; exit 1; }
  TARGETS+=(pgbouncer)
  log "PgBouncer $PGBOUNCER_VERSION on 127.0.0.1:$port (pid ${PID[pgbouncer]}), pool $POOL, transaction mode"
}

# ---------------------------------------------------------------- proxies under test
fill_placeholders() {  # text port conf -> text with {PORT} {PG_PORT} {PG_HOST} {POOL} {MAX_CLIENT_CONN} {DIR} {CONFIG} replaced
  local s=$1
  s=${s//\{PORT\}/$2}; s=${s//\{PG_PORT\}/$PG_PORT}; s=${s//\{POOL\}/$POOL}
  s=${s//\{PG_HOST\}/$PG_HOST}
  s=${s//\{MAX_CLIENT_CONN\}/$MAX_CLIENT_CONN}; s=${s//\{DIR\}/$WORK}; s=${s//\{CONFIG\}/$3}
  printf '%s' "$s"
}

start_proxy() {  # name command-template config-template-text(may be empty)
  local name=$1 port conf="" cmd
  port=$(free_port)
  if [[ -n $3 ]]; then
    conf=$WORK/$name.conf
    fill_placeholders "$3" "$port" "$conf" >"$conf"
  fi
  cmd=$(fill_placeholders "$2" "$port" "$conf")
  echo "$cmd" >"$WORK/$name.cmd"
  (
    export PROXY_PORT=$port PG_PORT PG_HOST POOL_SIZE=$POOL MAX_CLIENT_CONN BENCH_DIR=$WORK PROXY_CONFIG_FILE=$conf
    exec bash -c "$cmd"
  ) >"$WORK/$name.log" 2>&1 &
  PID[$name]=$!; STARTED+=("$!"); PORT[$name]=$port
  if ! wait_port "$port" "$PROXY_START_TIMEOUT"; then
    echo "$name did not start; command: $cmd" >&2; tail -20 "$WORK/$name.log" >&2; exit 1
  fi
  TARGETS+=("$name")
  log "$name on 127.0.0.1:$port (pid ${PID[$name]}; CPU counts its whole process tree)"
}

# Floodgate's own config, following the contract in shared/DESIGN.md.
FLOODGATE_CONFIG='[floodgate]
listen = "127.0.0.1:{PORT}"
auth_type = "trust"
pool_mode = "transaction"
default_pool_size = {POOL}
max_client_conn = {MAX_CLIENT_CONN}

[[users]]
name = "bench"
password = "bench"

[databases.bench]
host = "{PG_HOST}"
port = {PG_PORT}
dbname = "bench"
'

if [[ $TLS == 1 ]]; then
  FLOODGATE_CONFIG=${FLOODGATE_CONFIG/\[\[users\]\]/client_tls_sslmode = \"require\"
client_tls_key_file = \"$WORK/tls.key\"
client_tls_cert_file = \"$WORK/tls.crt\"

[[users]]}
fi

start_pgbouncer
if [[ -n ${FLOODGATE_BIN:-} ]]; then start_proxy floodgate "exec '$FLOODGATE_BIN' --config {CONFIG}" "$FLOODGATE_CONFIG"; fi
if [[ -n ${PROXY_CMD:-} ]]; then
  PROXY_CONFIG_TEXT=""
  if [[ -n ${PROXY_CONFIG:-} ]]; then PROXY_CONFIG_TEXT=$(<"$PROXY_CONFIG"); fi
  start_proxy "$PROXY_NAME" "$PROXY_CMD" "$PROXY_CONFIG_TEXT"
fi

# ---------------------------------------------------------------- one run
echo "script,mode,clients,target,repeat,tps,latency_ms,connect_ms,transactions,failed,proxy_cpu_s,cpu_us_per_tx,proxy_core_pct,pg_cpu_s,pg_us_per_tx,client_cpu_s,busy_pct,other_pct,elapsed_s,proxy_sys_pct,syscalls_per_tx" >"$OUT"

reset_tables() {  # what pgbench's own pre-run vacuum does, done directly so no proxy is involved
  pg_admin -c "VACUUM pgbench_branches" -c "VACUUM pgbench_tellers" -c "TRUNCATE pgbench_history" \
    -c "CHECKPOINT" bench
}

run_one() {  # script mode clients target repeat
  local script=$1 mode=$2 clients=$3 target=$4 rep=$5 flags=() run_log=$WORK/run.log
  case $script in
    select-only) flags=(-S) ;;
    simple-update) flags=(-N) ;;
    tpcb) flags=() ;;
    *) echo "unknown script '$script' (select-only, tpcb, simple-update)" >&2; exit 1 ;;
  esac
  if [[ $script == select-only ]]; then pg_admin -c CHECKPOINT bench; else reset_tables; fi

  local p0 g0 m0 c0 t0 p1 g1 m1 c1 t1 s0=nan s1=nan calls=nan
  p0=nan; if [[ $target != direct ]]; then p0=$(tree_ticks "${PID[$target]}"); s0=$(tree_sys_ticks "${PID[$target]}"); fi
  if [[ $SYSCALLS == 1 && $target != direct ]]; then syscalls_start "${PID[$target]}"; fi
  g0=$(tree_ticks "$PG_PID"); m0=$(machine_ticks); c0=$(children_ticks); t0=$(now)
  # -T bounds the run; timeout bounds a proxy that hangs so pgbench never reaches its deadline.
  timeout $((DURATION + 60)) pgbench -n "${flags[@]}" -M "$mode" -c "$clients" -j "$THREADS" -T "$DURATION" \
    -h 127.0.0.1 -p "${PORT[$target]}" -U bench bench >"$run_log" 2>&1 || true
  t1=$(now); c1=$(children_ticks); m1=$(machine_ticks); g1=$(tree_ticks "$PG_PID")
  p1=nan; if [[ $target != direct ]]; then p1=$(tree_ticks "${PID[$target]}"); s1=$(tree_sys_ticks "${PID[$target]}"); fi
  if [[ $SYSCALLS == 1 && $target != direct ]]; then syscalls_stop; calls=$CALLS; fi

  local tps lat conn tx failed
  tps=$(awk '/^tps = /{print $3; exit}' "$run_log")
  lat=$(awk '/^latency average/{print $4; exit}' "$run_log")
  conn=$(awk '/^initial connection time/{print $5; exit}' "$run_log")
  tx=$(awk '/number of transactions actually processed/{split($NF, a, "/"); print a[1]; exit}' "$run_log")
  failed=$(awk '/number of failed transactions/{print $5; exit}' "$run_log")
  if [[ -z $tps || -z $tx || $tx == 0 ]]; then
    log "  $target $script -M $mode -c $clients: pgbench failed: $(grep -m1 -iE 'error|fatal|abort' "$run_log" || tail -1 "$run_log")"
    tps=nan lat=nan tx=0
  fi
  awk -F, -v OFS=, -v hz="$CLK_TCK" -v tx="$tx" -v p0="$p0" -v p1="$p1" -v g0="$g0" -v g1="$g1" \
      -v m0="$m0" -v m1="$m1" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" \
      -v s0="$s0" -v s1="$s1" -v calls="$calls" \
      -v head="$script,$mode,$clients,$target,$rep,$tps,${lat:-nan},${conn:-nan},$tx,${failed:-0}" '
    function per_tx(s) { return (s == "nan" || tx == 0) ? "nan" : sprintf("%.2f", s * 1e6 / tx) }
    BEGIN {
      wall = t1 - t0
      pcpu = (p0 == "nan" || p1 == "nan") ? "nan" : (p1 - p0) / hz
      gcpu = (g0 == "nan" || g1 == "nan") ? "nan" : (g1 - g0) / hz
      ccpu = (c1 - c0) / hz
      split(m0, a, " "); split(m1, b, " "); total = b[2] - a[2]
      busy = other = "nan"
      if (total > 0) {
        busy = 100 * (b[1] - a[1]) / total
        if (gcpu != "nan") other = 100 * (b[1] - a[1] - (gcpu + (pcpu == "nan" ? 0 : pcpu) + ccpu) * hz) / total
      }
      print head, (pcpu == "nan" ? "nan" : sprintf("%.3f", pcpu)), per_tx(pcpu),
            (pcpu == "nan" ? "nan" : sprintf("%.1f", 100 * pcpu / wall)),
            (gcpu == "nan" ? "nan" : sprintf("%.3f", gcpu)), per_tx(gcpu), sprintf("%.3f", ccpu),
            (busy == "nan" ? "nan" : sprintf("%.1f", busy)), (other == "nan" ? "nan" : sprintf("%.1f", other)),
            sprintf("%.2f", wall),
            ((pcpu == "nan" || pcpu == 0 || s0 == "nan") ? "nan" : sprintf("%.1f", 100 * (s1 - s0) / hz / pcpu)),
            ((calls == "nan" || tx == 0) ? "nan" : sprintf("%.2f", calls / tx)) }' >>"$OUT"
}

targets_for() {  # mode clients -> the targets that run it, in TARGETS order
  local mode=$1 clients=$2 t
  for t in "${TARGETS[@]}"; do
    if [[ $t == direct ]] && ((clients > PG_MAX_CONNECTIONS - 3)); then continue; fi
    if [[ $t != direct && " $DIRECT_EXTRA_MODES " == *" $mode "* && " $MODES " != *" $mode "* ]]; then continue; fi
    if [[ $t == pgbouncer && $mode == prepared ]] && ! pgbouncer_has_prepared; then continue; fi
    echo "$t"
  done
}

# ---------------------------------------------------------------- all runs
ALL_MODES=$(echo $MODES $DIRECT_EXTRA_MODES | tr ' ' '\n' | awk 'NF && !seen[$0]++' | tr '\n' ' ')
for clients in $CLIENTS; do
  if ((clients > PG_MAX_CONNECTIONS - 3)); then
    log "note: direct skipped at $clients clients (PG_MAX_CONNECTIONS=$PG_MAX_CONNECTIONS)"
  fi
done
if [[ " $ALL_MODES " == *" prepared "* ]] && ! pgbouncer_has_prepared; then
  log "note: PgBouncer $PGBOUNCER_VERSION has no prepared statements in transaction mode: -M prepared skipped for it"
fi
IDLE0=$(machine_ticks); sleep 2; IDLE1=$(machine_ticks)
log "machine busy in the 2 s before the runs: $(awk -v a="$IDLE0" -v b="$IDLE1" 'BEGIN { split(a, x, " "); split(b, y, " ")
  printf "%.0f%%", 100 * (y[1] - x[1]) / (y[2] - x[2]) }') of $(nproc) cores (should be near 0 for clean numbers)"

for script in $SCRIPTS; do
  for clients in $CLIENTS; do
    for mode in $ALL_MODES; do
      mapfile -t group < <(targets_for "$mode" "$clients")
      ((${#group[@]})) || continue
      for rep in $(seq "$REPEATS"); do
        # rotate the order each repeat: A B C, B C A, C A B, ...
        for ((i = 0; i < ${#group[@]}; i++)); do
          run_one "$script" "$mode" "$clients" "${group[(i + rep - 1) % ${#group[@]}]}" "$rep"
        done
      done
      log "done: $script -M $mode -c $clients ($(IFS=' '; echo "${group[*]}"))"
    done
  done
done


print_summary "$OUT" "$SUMMARY"
echo "medians of $REPEATS runs x ${DURATION}s, pgbench -j $THREADS, pool $POOL, scale $SCALE, upstream ${UPSTREAM:-tcp}, $(nproc) cores;" \
  "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), PgBouncer $PGBOUNCER_VERSION"
echo "every run: $OUT   medians: $SUMMARY"
