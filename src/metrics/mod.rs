//! `[metrics] listen`: a small HTTP server (hyper) for Prometheus (`GET /metrics`), probes
//! (`GET /healthz`, `GET /readyz`) and the kill switch for automation (`POST /admin/...`,
//! guarded by a bearer token). Nothing else is served; headers are bounded, slow clients are
//! timed out, and at most [`MAX_CONNECTIONS`] are served at once.

pub mod families;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::actions;
use crate::shared::Shared;

pub use families::{CloseReason, PoolHandles, Telemetry};

/// HTTP connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may last (a PAUSE over HTTP returns within it or keeps going alone).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// How long a readiness answer is reused, so probes cannot load the database.
const READY_CACHE: Duration = Duration::from_secs(1);
/// Longest a readiness check of the upstream may take.
const READY_CHECK: Duration = Duration::from_secs(2);

/// The readiness answer last computed, and when.
type ReadyCache = Mutex<Option<(Instant, Result<(), String>)>>;

struct Endpoint {
    shared: Arc<Shared>,
    ready: ReadyCache,
}

/// Serves `listener` (until the task is aborted).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let endpoint = Arc::new(Endpoint {
        shared: shared.clone(),
        ready: Mutex::new(None),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Served until the proxy has stopped (the task is aborted then): readiness must say
    // "shutting down" while clients drain.
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: too many HTTP connections at once
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(endpoint.handle(req, peer).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

impl Endpoint {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/metrics") => {
                let mut response = reply(StatusCode::OK, families::render(&self.shared));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (&Method::GET, "/healthz") => reply(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => match self.ready().await {
                Ok(()) => reply(StatusCode::OK, "ready\n"),
                Err(reason) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            },
            (&Method::POST, p) if p.starts_with("/admin/") => self.admin(&req, peer).await,
            _ => reply(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Ready: not stopping, not paused for all, the upstream reachable. Computed at most once
    /// a second.
    async fn ready(&self) -> Result<(), String> {
        if self.shared.stop.borrow().is_some() || *self.shared.shutdown.borrow() {
            return Err("not ready: shutting down".into());
        }
        if let Some((at, answer)) = self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && at.elapsed() < READY_CACHE
        {
            return answer.clone();
        }
        let answer = check_ready(&self.shared).await;
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), answer.clone()));
        answer
    }

    async fn admin(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let Some(token) = admin_token(&self.shared) else {
            return reply(StatusCode::NOT_FOUND, "not found\n");
        };
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            tracing::warn!(%peer, path = %req.uri().path(), "HTTP admin request refused: bad token");
            return reply(StatusCode::UNAUTHORIZED, "unauthorized\n");
        }
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| v.to_owned())
            })
        };
        let database = param("database");
        let db = database.as_deref();
        let action = req.uri().path().trim_start_matches("/admin/").to_owned();
        tracing::info!(%peer, %action, database = ?db, "HTTP admin action");
        let shared = &self.shared;
        let result: Result<(), String> = match action.as_str() {
            "pause" => actions::pause(shared, db).await.map_err(|e| e.to_string()),
            "resume" => actions::resume(shared, db).map_err(|e| e.to_string()),
            "disable" | "enable" => match db {
                Some(db) => actions::set_disabled(shared, db, action == "disable")
                    .map_err(|e| e.to_string()),
                None => Err(format!("{action} needs ?database=NAME")),
            },
            "shed" => match param("percent").and_then(|p| p.parse::<u8>().ok()) {
                Some(percent) => actions::shed(shared, db, percent).map_err(|e| e.to_string()),
                None => Err("shed needs ?percent=N (0 to 100)".into()),
            },
            "kill" => actions::kill(shared, db)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            "reconnect" => actions::reconnect(shared, db).map_err(|e| e.to_string()),
            "reload" => shared.reload().map(|_| ()),
            _ => return reply(StatusCode::NOT_FOUND, "not found\n"),
        };
        match result {
            Ok(()) => reply(StatusCode::OK, "ok\n"),
            Err(e) => reply(StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
}

/// The bearer token for `/admin/...`: `admin_token`, or the first line of `admin_token_file`.
fn admin_token(shared: &Shared) -> Option<String> {
    let config = shared.config();
    let metrics = config.metrics.as_ref()?;
    if let Some(token) = &metrics.admin_token {
        return Some(token.clone()).filter(|t| !t.is_empty());
    }
    let file = metrics.admin_token_file.as_ref()?;
    let text = std::fs::read_to_string(file).ok()?;
    Some(text.lines().next()?.trim().to_owned()).filter(|t| !t.is_empty())
}

/// Compares without an early exit, so timing does not tell how much of a token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, x) in b.iter().enumerate() {
        diff |= x ^ a.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Every configured database reachable: through one of its pooled servers (taken without
/// waiting and given straight back; a pool whose servers are all in use is reachable), or, with
/// no server open yet, a TCP connect to its host.
async fn check_ready(shared: &Shared) -> Result<(), String> {
    let config = shared.config();
    if !config.databases.is_empty()
        && config
            .databases
            .keys()
            .all(|db| shared.switches.get(db).position().paused())
    {
        return Err("not ready: every database is paused".into());
    }
    let pools = shared.pools.list();
    for (name, db) in &config.databases {
        let open: Vec<_> = pools
            .iter()
            .filter(|p| &p.database == name && p.open_servers() > 0)
            .collect();
        let reachable = match open.first() {
            Some(pool) => match tokio::time::timeout(READY_CHECK, pool.try_checkout()).await {
                Ok(Ok(Some(mut server))) => {
                    server.dirty = false;
                    true
                }
                Ok(Ok(None)) => true,
                _ => false,
            },
            None => {
                let addr = format!("{}:{}", db.host, db.port);
                let connected = async {
                    match crate::server::unix_socket_path(&addr) {
                        Some(path) => tokio::net::UnixStream::connect(path).await.map(drop),
                        None => tokio::net::TcpStream::connect(addr).await.map(drop),
                    }
                };
                matches!(
                    tokio::time::timeout(READY_CHECK, connected).await,
                    Ok(Ok(()))
                )
            }
        };
        if !reachable {
            return Err(format!(
                "not ready: database {name} ({}:{}) is unreachable",
                db.host, db.port
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abd", b"abc"));
        assert!(!super::constant_time_eq(b"ab", b"abc"));
        assert!(!super::constant_time_eq(b"abcd", b"abc"));
        assert!(!super::constant_time_eq(b"", b"abc"));
    }
}
