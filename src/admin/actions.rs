//! What the switches do, shared by the console, the signals (and later the HTTP endpoint).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::protocol::sqlstate;
use crate::shared::{Shared, StopMode};

/// How often a command that waits (PAUSE, WAIT_CLOSE) looks again.
const POLL: Duration = Duration::from_millis(20);

/// Why a switch could not be thrown.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no such database: {0}")]
    UnknownDatabase(String),
    #[error("no such client: {0} (see SHOW CLIENTS, column id)")]
    UnknownClient(String),
    #[error("{0}")]
    Invalid(String),
}

impl ActionError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ActionError::UnknownDatabase(_) => sqlstate::UNKNOWN_DATABASE,
            ActionError::UnknownClient(_) => sqlstate::UNDEFINED_OBJECT,
            ActionError::Invalid(_) => sqlstate::SYNTAX_ERROR,
        }
    }
}

/// The databases a command applies to: `db`, which must be configured, or all of them.
pub fn targets(shared: &Shared, db: Option<&str>) -> Result<Vec<String>, ActionError> {
    let config = shared.config();
    match db {
        Some(db) if config.databases.contains_key(db) => Ok(vec![db.to_owned()]),
        Some(db) => Err(ActionError::UnknownDatabase(db.to_owned())),
        None => Ok(config.databases.keys().cloned().collect()),
    }
}

/// Server connections held by clients of these databases.
fn active_servers(shared: &Shared, dbs: &[String]) -> usize {
    shared
        .pools
        .list()
        .iter()
        .filter(|p| dbs.contains(&p.database))
        .map(|p| p.active_servers())
        .sum()
}

/// PAUSE: new transactions wait; returns once the transactions in flight have finished, with
/// the servers closed (as PgBouncer does, so the database can be restarted or moved).
pub async fn pause(shared: &Arc<Shared>, db: Option<&str>) -> Result<(), ActionError> {
    let dbs = targets(shared, db)?;
    for db in &dbs {
        shared.switches.get(db).pause();
    }
    while active_servers(shared, &dbs) > 0 {
        tokio::time::sleep(POLL).await;
    }
    for pool in shared.pools.list() {
        if dbs.contains(&pool.database) {
            pool.close_idle(crate::metrics::CloseReason::Reconnect);
        }
    }
    Ok(())
}

pub fn resume(shared: &Shared, db: Option<&str>) -> Result<(), ActionError> {
    for db in targets(shared, db)? {
        shared.switches.get(&db).resume();
    }
    Ok(())
}

pub fn set_disabled(shared: &Shared, db: &str, disabled: bool) -> Result<(), ActionError> {
    for db in targets(shared, Some(db))? {
        shared.switches.get(&db).set_disabled(disabled);
    }
    Ok(())
}

pub fn shed(shared: &Shared, db: Option<&str>, percent: u8) -> Result<(), ActionError> {
    if percent > 100 {
        return Err(ActionError::Invalid(format!(
            "SHED takes a percentage from 0 to 100, not {percent}"
        )));
    }
    for db in targets(shared, db)? {
        shared.switches.get(&db).set_shed(percent);
    }
    Ok(())
}

/// KILL: every client of the database(s) gets FATAL 57P01 now, their servers are closed, and
/// (as in PgBouncer) the database stays paused until RESUME.
pub fn kill(shared: &Shared, db: Option<&str>) -> Result<usize, ActionError> {
    let dbs = targets(shared, db)?;
    for db in &dbs {
        shared.switches.get(db).pause();
    }
    let mut killed = 0;
    for client in shared.sessions.clients() {
        if dbs.contains(&client.database) {
            client.kill.fire();
            killed += 1;
        }
    }
    for pool in shared.pools.list() {
        if dbs.contains(&pool.database) {
            pool.reconnect();
        }
    }
    Ok(killed)
}

pub fn kill_client(shared: &Shared, id: &str) -> Result<(), ActionError> {
    let client = id
        .parse()
        .ok()
        .and_then(|id| shared.sessions.client(id))
        .ok_or_else(|| ActionError::UnknownClient(id.to_owned()))?;
    client.kill.fire();
    Ok(())
}

/// RECONNECT: every server of the database(s) is replaced, idle ones now, the others as their
/// clients release them.
pub fn reconnect(shared: &Shared, db: Option<&str>) -> Result<(), ActionError> {
    let dbs = targets(shared, db)?;
    for server in shared.sessions.servers() {
        if dbs.contains(&server.database) {
            server.close_needed.store(true, Ordering::Relaxed);
        }
    }
    for pool in shared.pools.list() {
        if dbs.contains(&pool.database) {
            pool.reconnect();
        }
    }
    Ok(())
}

/// WAIT_CLOSE: returns when no server marked for closing (RECONNECT, reload) is left.
pub async fn wait_close(shared: &Shared, db: Option<&str>) -> Result<(), ActionError> {
    let dbs = targets(shared, db)?;
    loop {
        let pending = shared
            .sessions
            .servers()
            .into_iter()
            .any(|s| dbs.contains(&s.database) && s.close_needed.load(Ordering::Relaxed));
        if !pending {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

pub fn shutdown(shared: &Shared, mode: StopMode) {
    shared.request_stop(mode);
}
