//! Bounded memory per client (GitHub issue 12). The proxy runs as its own process (the
//! `floodgate` binary) in front of a harness cluster, so its resident set, read from
//! `/proc/PID/status`, holds only the proxy's allocations, never this test's clients.
//!
//! The bounds are generous next to the targets (4 KiB per idle client; 256 KiB for a
//! client that pipelines without reading, whatever it sends; 1 MiB for a 100 MB Bind, nothing
//! left after) and allow for a debug build: they fail on memory that grows with what a client
//! sends or with the number of clients, not on a few KiB. `benches/memory.rs` measures the real
//! numbers against PgBouncer.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use floodgate::pgcluster::{HbaAuth, PgCluster};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

const BIN: &str = env!("CARGO_BIN_EXE_floodgate");

/// Most RSS growth, in KiB, while one client pipelines without reading (target: 256 KiB).
const PIPELINE_BOUND_KIB: i64 = 8 * 1024;
/// Most RSS growth, in KiB, while a 100 MB Bind goes through (target: 1 MiB).
const BIND_PEAK_BOUND_KIB: i64 = 8 * 1024;
/// Most RSS left over the baseline, in KiB, once the 100 MB Bind is answered (target: none).
const BIND_AFTER_BOUND_KIB: i64 = 4 * 1024;
/// Most RSS per idle logged-in client, in KiB, before and after a query (target: 4 KiB).
const IDLE_BOUND_KIB: f64 = 8.0;
/// Idle clients in the per-client test.
const IDLE_CLIENTS: usize = 1000;
/// A pipelining writer that makes no progress for this long is being held back by the proxy:
/// backpressure, the behaviour wanted.
const STALL: Duration = Duration::from_secs(2);
/// Longest a pipelining writer keeps sending (a debug build relays slowly).
const FLOOD_TIME_CAP: Duration = Duration::from_secs(30);
/// Pause before reading RSS, so the proxy has finished reacting to what it was sent.
const SETTLE: Duration = Duration::from_secs(1);
/// Server connections in the proxy's pool.
const POOL: usize = 2;

// ---------------------------------------------------------------------------------------------
// The proxy as a process, and its memory.
// ---------------------------------------------------------------------------------------------

/// A `floodgate` process in front of a cluster (trust for clients); killed on drop.
struct Floodgate {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Floodgate {
    async fn start(cluster: &PgCluster) -> Floodgate {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("local_addr").port()
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = dir.path().join("floodgate.toml");
        let text = format!(
            "[floodgate]\nlisten = \"{addr}\"\nauth_type = \"trust\"\npool_mode = \"transaction\"\n\
             default_pool_size = {POOL}\nmax_client_conn = {}\nquery_wait_timeout = \"60s\"\n\n\
             [[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
             [databases.app]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n",
            IDLE_CLIENTS + 100,
            cluster.host(),
            cluster.port()
        );
        std::fs::write(&config, text).expect("writing the config");
        let stderr = dir.path().join("floodgate.stderr");
        let file = std::fs::File::create(&stderr).expect("creating the stderr file");
        let child = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "floodgate=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let mut proxy = Floodgate {
            child,
            addr,
            stderr,
            _dir: dir,
        };
        within("floodgate starts listening", async {
            while TcpStream::connect(addr).await.is_err() {
                proxy.assert_alive();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        proxy
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "floodgate exited ({status}):\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
    }

    /// RSS and high-water mark now.
    fn mem(&mut self) -> Mem {
        self.assert_alive();
        Mem::of(self.pid())
    }

    /// Opens the whole pool (clients holding servers at once) and runs a login, a query and a
    /// logout, then lets things settle: after this, the fixed costs are in the baseline.
    async fn warm_up(&mut self) -> Mem {
        let addr = self.addr;
        let clients: Vec<_> = (0..2 * POOL)
            .map(|_| {
                tokio::spawn(async move {
                    let mut stream = raw_login_trust(addr).await;
                    assert_eq!(query(&mut stream, "SELECT pg_sleep(0.1)").await, "");
                    send_raw(&mut stream, &message(b'X', &[])).await;
                })
            })
            .collect();
        for client in clients {
            client.await.expect("warm-up client");
        }
        tokio::time::sleep(SETTLE).await;
        self.mem()
    }
}

impl Drop for Floodgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's `VmRSS` and `VmHWM` (its peak since it started), in KiB.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    hwm: u64,
}

impl Mem {
    fn of(pid: u32) -> Mem {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{path} has no {name}: has floodgate exited?"))
        };
        Mem {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

fn mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

/// Follows a process's peak RSS from a baseline: VmRSS sampled every 10 ms on a thread of its
/// own (VmHWM cannot be reset), and VmHWM itself once it rises past its value at the baseline
/// (then the peak happened here, and VmHWM saw even spikes shorter than the sampling period).
struct PeakWatch {
    pid: u32,
    base: Mem,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakWatch {
    fn start(pid: u32, base: Mem) -> PeakWatch {
        let peak = Arc::new(AtomicU64::new(base.rss));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    let rss = text
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
                    if let Some(rss) = rss {
                        p.fetch_max(rss, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        PeakWatch {
            pid,
            base,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Largest growth over the baseline so far, in KiB.
    fn growth(&self) -> i64 {
        let now = Mem::of(self.pid);
        let hwm = if now.hwm > self.base.hwm { now.hwm } else { 0 };
        let peak = self.peak.load(Ordering::Relaxed).max(hwm).max(now.rss);
        peak as i64 - self.base.rss as i64
    }
}

impl Drop for PeakWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side.
// ---------------------------------------------------------------------------------------------

/// Runs a simple query; returns the first value of the first row ("" when there is none).
async fn query(stream: &mut TcpStream, sql: &str) -> String {
    send_raw(stream, &query_message(sql)).await;
    let mut value = None;
    within(sql, async {
        loop {
            match read_message(stream).await {
                Incoming::Message(b'D', body) if value.is_none() => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                    let text = &body[6..6 + len.max(0) as usize];
                    value = Some(String::from_utf8_lossy(text).into_owned());
                }
                Incoming::Message(b'E', body) => panic!("{sql}: {:?}", error_fields(&body)),
                Incoming::Message(b'Z', _) => break,
                Incoming::Message(..) => {}
                Incoming::Closed => panic!("{sql}: the proxy closed the connection"),
            }
        }
    })
    .await;
    value.unwrap_or_default()
}

/// A new client logs in and runs a query: the proxy still serves others.
async fn assert_serves_others(addr: SocketAddr, after: &str) {
    let mut other = raw_login_trust(addr).await;
    assert_eq!(
        query(&mut other, "SELECT 'still here'").await,
        "still here",
        "another client after {after}"
    );
}

/// `Parse name sql` with no parameter types.
fn parse_message(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for s in [name, sql] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &body)
}

/// How a pipelining writer ended.
#[derive(Debug)]
struct Flooded {
    /// Bytes written into the socket (accepted by the proxy or the kernel on its way).
    sent: u64,
    /// Why it stopped before sending everything, if it did.
    stopped: Option<&'static str>,
    elapsed: Duration,
}

/// Writes `unit` over and over, `total` bytes in all, reading nothing. Stops early when a write
/// makes no progress for [`STALL`] (the proxy holds the client back), after
/// [`FLOOD_TIME_CAP`], or once `watch` shows growth of 8 times `bound_kib`: the verdict is in
/// and a debug build need not buffer hundreds of MB first. A cancelled pending `write` has
/// written nothing, so `sent` is exact.
async fn flood(
    w: &mut OwnedWriteHalf,
    unit: &[u8],
    total: u64,
    watch: &PeakWatch,
    bound_kib: i64,
) -> Flooded {
    let chunk = unit.repeat((64 * 1024 / unit.len()).max(1));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut stopped = None;
    let mut writes = 0u64;
    while sent < total {
        if started.elapsed() > FLOOD_TIME_CAP {
            stopped = Some("time cap");
            break;
        }
        writes += 1;
        if writes.is_multiple_of(16) && watch.growth() > 8 * bound_kib {
            stopped = Some("growth already 8x the bound");
            break;
        }
        let offset = (sent % chunk.len() as u64) as usize;
        let left = (chunk.len() - offset).min((total - sent) as usize);
        match tokio::time::timeout(STALL, w.write(&chunk[offset..offset + left])).await {
            Err(_) => {
                stopped = Some("backpressure: a write made no progress for 2 s");
                break;
            }
            Ok(Ok(0)) => panic!("the proxy closed the connection after {sent} bytes"),
            Ok(Ok(n)) => sent += n as u64,
            Ok(Err(e)) => panic!("writing after {sent} bytes: {e}"),
        }
    }
    Flooded {
        sent,
        stopped,
        elapsed: started.elapsed(),
    }
}

/// The rest of the unit a flood stopped in, so the stream is whole messages again.
fn rest_of_unit(unit: &[u8], sent: u64) -> Vec<u8> {
    let partial = (sent % unit.len() as u64) as usize;
    if partial == 0 {
        Vec::new()
    } else {
        unit[partial..].to_vec()
    }
}

/// Reads backend messages through a buffer (a million of them, one at a time, would be two
/// system calls each) until `n` ReadyForQuery have arrived; any ErrorResponse fails the test.
async fn read_ready<R: AsyncRead + Unpin>(r: &mut R, n: u64) {
    let mut body = Vec::new();
    let mut ready = 0u64;
    while ready < n {
        let mut header = [0u8; 5];
        r.read_exact(&mut header)
            .await
            .unwrap_or_else(|e| panic!("after {ready} of {n} ReadyForQuery: {e}"));
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        assert!((4..1 << 20).contains(&len), "message of length {len}");
        body.resize(len as usize - 4, 0);
        r.read_exact(&mut body)
            .await
            .unwrap_or_else(|e| panic!("after {ready} of {n} ReadyForQuery: {e}"));
        match header[0] {
            b'Z' => ready += 1,
            b'E' => panic!("after {ready} ReadyForQuery: {:?}", error_fields(&body)),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

/// One client sends a million Syncs and reads nothing. Each is answered by a ReadyForQuery the
/// client does not read: a proxy that queues them (or the bookkeeping of each Sync in flight)
/// grows with what the client sends; one that stops reading the client when it cannot write to
/// it stays flat. Afterwards the client reads every answer, and the proxy still serves others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_syncs_sent_without_reading_do_not_grow_the_proxy() {
    const SYNCS: u64 = 1_000_000;
    let cluster = start_cluster(HbaAuth::ScramSha256, 20).await;
    let mut proxy = Floodgate::start(&cluster).await;
    proxy.warm_up().await;
    let mut stream = raw_login_trust(proxy.addr).await;
    assert_eq!(query(&mut stream, "SELECT 1").await, "1");
    tokio::time::sleep(SETTLE).await;
    let base = proxy.mem();
    let watch = PeakWatch::start(proxy.pid(), base);

    let (r, mut w) = stream.into_split();
    let sync = message(b'S', &[]);
    let flooded = flood(&mut w, &sync, SYNCS * 5, &watch, PIPELINE_BOUND_KIB).await;
    tokio::time::sleep(SETTLE).await; // what is still in the socket buffers reaches the proxy
    let unread = watch.growth();
    eprintln!(
        "{} Syncs written in {:.1} s ({}), proxy RSS baseline {:.1} MiB, growth while unread \
         {:.1} MiB",
        flooded.sent / 5,
        flooded.elapsed.as_secs_f64(),
        flooded.stopped.unwrap_or("all sent"),
        mib(base.rss as i64),
        mib(unread)
    );

    // The client finally reads: one ReadyForQuery per Sync (the one cut in two finished first).
    let expected = flooded.sent.div_ceil(5);
    let rest = rest_of_unit(&sync, flooded.sent);
    let writer = tokio::spawn(async move {
        w.write_all(&rest).await.expect("finishing the last Sync");
        w
    });
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    within(
        "reading every ReadyForQuery",
        read_ready(&mut reader, expected),
    )
    .await;
    let w = writer.await.expect("writer task");
    let mut stream = reader.into_inner().reunite(w).expect("reunite");
    assert_eq!(query(&mut stream, "SELECT 2").await, "2");
    let overall = watch.growth();
    eprintln!(
        "all {expected} answers read; growth overall {:.1} MiB",
        mib(overall)
    );
    assert_serves_others(proxy.addr, "the Sync flood").await;

    assert!(
        unread <= PIPELINE_BOUND_KIB,
        "proxy RSS grew by {:.1} MiB (baseline {:.1} MiB) while one client sent {} Syncs \
         ({:.1} MB) without reading; bound {:.0} MiB (issue 12 target: 0.25 MiB)",
        mib(unread),
        mib(base.rss as i64),
        flooded.sent / 5,
        flooded.sent as f64 / 1e6,
        mib(PIPELINE_BOUND_KIB)
    );
}

/// One client sends `Close S "a"` + `Parse "a" "SELECT 1"` pairs, up to 100 MB, with no Sync
/// and without reading. The server answers each message and the proxy can neither deliver the
/// answers nor end the transaction: it must stop reading the client (the client's write then
/// blocks, which the test takes as the expected outcome), not buffer. Afterwards the client
/// leaves and the proxy still serves others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_parse_pairs_without_sync_or_reading_do_not_grow_the_proxy() {
    const BYTES: u64 = 100_000_000;
    let cluster = start_cluster(HbaAuth::ScramSha256, 20).await;
    let mut proxy = Floodgate::start(&cluster).await;
    proxy.warm_up().await;
    let mut stream = raw_login_trust(proxy.addr).await;
    assert_eq!(query(&mut stream, "SELECT 1").await, "1");
    tokio::time::sleep(SETTLE).await;
    let base = proxy.mem();
    let watch = PeakWatch::start(proxy.pid(), base);

    let (r, mut w) = stream.into_split();
    let mut pair = message(b'C', b"Sa\0");
    pair.extend(parse_message("a", "SELECT 1"));
    let total = BYTES / pair.len() as u64 * pair.len() as u64;
    let flooded = flood(&mut w, &pair, total, &watch, PIPELINE_BOUND_KIB).await;
    tokio::time::sleep(SETTLE).await;
    let growth = watch.growth();
    eprintln!(
        "{:.1} MB of Close/Parse written in {:.1} s ({}), proxy RSS baseline {:.1} MiB, \
         growth {:.1} MiB",
        flooded.sent as f64 / 1e6,
        flooded.elapsed.as_secs_f64(),
        flooded.stopped.unwrap_or("all sent"),
        mib(base.rss as i64),
        mib(growth)
    );
    drop((r, w));
    assert_serves_others(proxy.addr, "the Close/Parse flood").await;

    assert!(
        growth <= PIPELINE_BOUND_KIB,
        "proxy RSS grew by {:.1} MiB (baseline {:.1} MiB) while one client sent {:.1} MB of \
         Close/Parse pairs without Sync and without reading (stopped: {}); bound {:.0} MiB \
         (issue 12 target: 0.25 MiB)",
        mib(growth),
        mib(base.rss as i64),
        flooded.sent as f64 / 1e6,
        flooded.stopped.unwrap_or("all sent"),
        mib(PIPELINE_BOUND_KIB)
    );
}

/// `Parse "s" "SELECT $1::text"`, then a Bind of it with one `bytes`-long text parameter
/// (streamed from a small buffer), Execute, Sync.
async fn send_big_bind(w: &mut OwnedWriteHalf, bytes: u64) -> std::io::Result<()> {
    w.write_all(&parse_message("s", "SELECT $1::text")).await?;
    // Portal "", statement "s", no parameter formats, one parameter, no result formats.
    let len = 4 + (1 + 2 + 2 + 2 + 4) + bytes + 2;
    let mut head = vec![b'B'];
    head.extend_from_slice(&(len as i32).to_be_bytes());
    head.extend_from_slice(b"\0s\0");
    head.extend_from_slice(&0i16.to_be_bytes());
    head.extend_from_slice(&1i16.to_be_bytes());
    head.extend_from_slice(&(bytes as i32).to_be_bytes());
    w.write_all(&head).await?;
    let block = vec![b'x'; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        w.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    w.write_all(&0i16.to_be_bytes()).await?;
    let mut rest = message(b'E', b"\0\0\0\0\0");
    rest.extend(message(b'S', &[]));
    w.write_all(&rest).await
}

/// Reads through ReadyForQuery, skipping the large row without keeping it; returns the length
/// of the row's value and whether it is all `x`.
async fn read_big_row<R: AsyncRead + Unpin>(r: &mut R) -> (u64, bool) {
    let mut value = (0, false);
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        let mut header = [0u8; 5];
        r.read_exact(&mut header)
            .await
            .expect("reading the answers");
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as u64 - 4;
        if header[0] == b'D' {
            let mut head = [0u8; 6];
            r.read_exact(&mut head).await.expect("reading the row");
            let n = i32::from_be_bytes([head[2], head[3], head[4], head[5]]);
            let (mut left, mut all_x) = (len - 6, true);
            while left > 0 {
                let take = left.min(sink.len() as u64) as usize;
                r.read_exact(&mut sink[..take])
                    .await
                    .expect("reading the row");
                all_x &= sink[..take].iter().all(|&b| b == b'x');
                left -= take as u64;
            }
            value = (n.max(0) as u64, all_x);
            continue;
        }
        assert!(
            len < 1 << 20,
            "answer {:?} of {len} bytes",
            header[0] as char
        );
        let mut body = vec![0u8; len as usize];
        r.read_exact(&mut body).await.expect("reading the answers");
        match header[0] {
            b'Z' => return value,
            b'E' => panic!("the Bind failed: {:?}", error_fields(&body)),
            _ => {}
        }
    }
}

/// One 100 MB Bind (a text parameter), and the row it makes read back as large: the proxy
/// relays both as they arrive. Its RSS may grow by a little while they pass (not by the
/// parameter's size) and must be back near the baseline afterwards, with the client still
/// connected: no per-client buffer stays sized for the largest message ever seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_bind_passes_through_without_being_held() {
    const BYTES: u64 = 100_000_000;
    let cluster = start_cluster(HbaAuth::ScramSha256, 20).await;
    let mut proxy = Floodgate::start(&cluster).await;
    proxy.warm_up().await;
    let mut stream = raw_login_trust(proxy.addr).await;
    assert_eq!(query(&mut stream, "SELECT 1").await, "1");
    tokio::time::sleep(SETTLE).await;
    let base = proxy.mem();
    let watch = PeakWatch::start(proxy.pid(), base);

    let (r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        send_big_bind(&mut w, BYTES)
            .await
            .expect("sending the Bind");
        w
    });
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let (len, all_x) = within("the 100 MB row", read_big_row(&mut reader)).await;
    let w = within("the Bind sent", writer).await.expect("writer task");
    let during = watch.growth();
    tokio::time::sleep(SETTLE).await;
    let after = proxy.mem().rss as i64 - base.rss as i64;
    eprintln!(
        "100 MB Bind: proxy RSS baseline {:.1} MiB, growth during {:.1} MiB, after {:.1} MiB",
        mib(base.rss as i64),
        mib(during),
        mib(after)
    );
    assert_eq!(
        (len, all_x),
        (BYTES, true),
        "the row carries the parameter back"
    );
    let mut stream = reader.into_inner().reunite(w).expect("reunite");
    assert_eq!(query(&mut stream, "SELECT 'next'").await, "next");

    assert!(
        during <= BIND_PEAK_BOUND_KIB,
        "proxy RSS grew by {:.1} MiB (baseline {:.1} MiB) while a 100 MB Bind and its 100 MB \
         row went through; bound {:.0} MiB (issue 12 target: 1 MiB)",
        mib(during),
        mib(base.rss as i64),
        mib(BIND_PEAK_BOUND_KIB)
    );
    assert!(
        after <= BIND_AFTER_BOUND_KIB,
        "{:.1} MiB of proxy RSS stayed after a 100 MB Bind (client still connected, idle); \
         bound {:.0} MiB (issue 12 target: nothing stays)",
        mib(after),
        mib(BIND_AFTER_BOUND_KIB)
    );
}

/// Raises this process's open-files limit to the hard limit: a thousand clients are a thousand
/// sockets, past the usual soft limit of 1024.
fn raise_open_files_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
    }
    assert!(
        limit.rlim_max >= needed,
        "this test needs {needed} open files; the hard limit is {}",
        limit.rlim_max
    );
}

/// A thousand idle logged-in clients cost the proxy less than 8 KiB each, both right after
/// logging in and after each has run one query (buffers a query needed must not stay with an
/// idle client). Issue 12's target is 4 KiB; PgBouncer needs about 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_cost_under_8_kib_each() {
    raise_open_files_limit(IDLE_CLIENTS as u64 + 200);
    let cluster = start_cluster(HbaAuth::ScramSha256, 20).await;
    let mut proxy = Floodgate::start(&cluster).await;
    let base = proxy.warm_up().await;
    let addr = proxy.addr;
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let logins: Vec<_> = (0..IDLE_CLIENTS)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                raw_login_trust(addr).await
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(IDLE_CLIENTS);
    for login in logins {
        clients.push(login.await.expect("login task"));
    }
    tokio::time::sleep(SETTLE).await;
    let logged_in = proxy.mem();

    let queries: Vec<_> = clients
        .into_iter()
        .map(|mut stream| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                assert_eq!(query(&mut stream, "SELECT 1").await, "1");
                stream
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(IDLE_CLIENTS);
    for q in queries {
        clients.push(q.await.expect("query task"));
    }
    tokio::time::sleep(SETTLE).await;
    let queried = proxy.mem();

    let per_client = |m: Mem| (m.rss as f64 - base.rss as f64) / IDLE_CLIENTS as f64;
    let (fresh, used) = (per_client(logged_in), per_client(queried));
    eprintln!(
        "{IDLE_CLIENTS} idle clients: proxy RSS baseline {:.1} MiB, logged in {:.1} MiB \
         ({fresh:.1} KiB each), after one query each {:.1} MiB ({used:.1} KiB each)",
        mib(base.rss as i64),
        mib(logged_in.rss as i64),
        mib(queried.rss as i64)
    );
    drop(clients);
    assert!(
        fresh < IDLE_BOUND_KIB && used < IDLE_BOUND_KIB,
        "{IDLE_CLIENTS} idle logged-in clients cost the proxy {fresh:.1} KiB each, {used:.1} KiB \
         each after one query each (baseline {:.1} MiB); bound {IDLE_BOUND_KIB} KiB (issue 12 \
         target: 4 KiB)",
        mib(base.rss as i64)
    );
}
